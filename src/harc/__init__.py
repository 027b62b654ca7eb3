"""harc: Harmfulness-And-Refusal Coupling, made usable (extract, diagnose, train, evaluate, report).

The public API; everything else lives in the layered packages below it (docs/architecture.md).

    import harc
    model, tok = harc.load_model("smollm2-135m-instruct")
    cfg = harc.load_config("configs/smollm2_135m.yaml", ["steps=10"])
    adapter = harc.Trainer(cfg, model, tok, harc.load_data(cfg)).train()
"""

from harc._version import __version__
from harc.chat import ChatFormat
from harc.config import apply_overrides, build
from harc.directions import Directions, extract_directions
from harc.errors import HarcError
from harc.eval import EvalConfig, Evaluator, load_eval_data
from harc.eval.attacks import Attack, Probe, get_attack, register_attack
from harc.eval.filters import Filter, get_filter, register_filter
from harc.eval.judges import Judge, Verdict, get_judge, register_judge
from harc.export import export_adapter, merge_adapter
from harc.geometry import geometry
from harc.layers import layer_scores, select_layers
from harc.lora import load_adapter
from harc.methods import (
    Method,
    TrainConfig,
    Trainer,
    load_config,
    load_data,
    register_method,
)
from harc.methods.harc import HarcConfig
from harc.models import load_model
from harc.pipeline import load_run_config, run_pipeline
from harc.report import write_report

__all__ = [
    "Attack", "ChatFormat", "Directions", "EvalConfig", "Evaluator", "Filter", "HarcConfig",
    "HarcError", "Judge", "Method", "Probe", "TrainConfig", "Trainer", "Verdict", "__version__",
    "apply_overrides", "build", "export_adapter", "extract_directions", "geometry", "get_attack",
    "get_filter", "get_judge", "layer_scores", "load_adapter", "load_config", "load_data",
    "load_eval_data", "load_model", "load_run_config", "merge_adapter", "register_attack",
    "register_filter", "register_judge", "register_method", "run_pipeline", "select_layers",
    "write_report",
]
