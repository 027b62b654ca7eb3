"""harc: Harmfulness-And-Refusal Coupling, made usable (extract, diagnose, train, evaluate, report).

The public API; everything else lives in the layered packages below it (docs/architecture.md).

    import harc
    model, tok = harc.load_model("smollm2-135m-instruct")
    cfg = harc.load_config("configs/smollm2_135m.yaml", ["steps=10"])
    adapter = harc.Trainer(cfg, model, tok, harc.load_data(cfg)).train()

Names are imported on first use (PEP 562), so `import harc.errors` or `harc --help` does not pay
for torch, transformers and peft.
"""

from harc._lazy import lazy_getattr
from harc._version import __version__ as __version__

_WHERE = {
    "ChatFormat": "harc.chat", "apply_overrides": "harc.config", "build": "harc.config",
    "Directions": "harc.directions", "extract_directions": "harc.directions",
    "HarcError": "harc.errors", "EvalConfig": "harc.eval", "Evaluator": "harc.eval",
    "load_eval_data": "harc.eval", "Attack": "harc.eval.attacks", "Probe": "harc.eval.attacks",
    "get_attack": "harc.eval.attacks", "register_attack": "harc.eval.attacks",
    "Filter": "harc.eval.filters", "get_filter": "harc.eval.filters",
    "register_filter": "harc.eval.filters", "Judge": "harc.eval.judges",
    "Verdict": "harc.eval.judges", "get_judge": "harc.eval.judges",
    "register_judge": "harc.eval.judges", "export_adapter": "harc.export",
    "merge_adapter": "harc.export", "geometry": "harc.geometry", "layer_scores": "harc.layers",
    "select_layers": "harc.layers", "load_adapter": "harc.lora", "Method": "harc.methods",
    "TrainConfig": "harc.methods", "Trainer": "harc.methods", "load_config": "harc.methods",
    "load_data": "harc.methods", "register_method": "harc.methods",
    "HarcConfig": "harc.methods.harc", "load_model": "harc.models",
    "load_run_config": "harc.pipeline", "run_pipeline": "harc.pipeline",
    "write_report": "harc.report",
}

__all__ = sorted([*_WHERE, "__version__"])


__getattr__ = lazy_getattr(__name__, _WHERE)


def __dir__() -> list[str]:
    return __all__
