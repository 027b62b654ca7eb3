"""Evaluation: attacks, judges and policy layers (plugins), the engine that runs a policy through
them, and the accessors that read its results."""

from harc.eval.config import EvalConfig
from harc.eval.data import load_eval_data
from harc.eval.engine import Evaluator, GenerationCache, adapter_fingerprint

__all__ = ["EvalConfig", "Evaluator", "GenerationCache", "adapter_fingerprint", "load_eval_data"]
