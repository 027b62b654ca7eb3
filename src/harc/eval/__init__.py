"""Evaluation: attacks, judges and policy layers (plugins), the engine that runs a policy through
them, and the accessors that read its results.

The engine (torch) is imported on first use, so the plugin registries stay cheap to import.
"""

from harc._lazy import lazy_getattr

_WHERE = {"EvalConfig": "harc.eval.config", "load_eval_data": "harc.eval.data",
          "Evaluator": "harc.eval.engine", "GenerationCache": "harc.eval.engine",
          "adapter_fingerprint": "harc.eval.engine"}

__all__ = ["EvalConfig", "Evaluator", "GenerationCache", "adapter_fingerprint", "load_eval_data"]


__getattr__ = lazy_getattr(__name__, _WHERE)
