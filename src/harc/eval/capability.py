"""Standard capability benchmarks (MMLU, GSM8K, IFEval, ...) through EleutherAI's lm-eval.

HARC's own capability items (`harc.data.capability`) are small and run offline; published
benchmarks need lm-evaluation-harness and its hub datasets, so lm-eval is an optional extra
(`pip install 'harc[lm-eval]'`), imported only when a task is asked for. The model is passed in
already loaded, so an adapted model (PeftModel) is scored with its adapter active, exactly as the
rest of the evaluation sees it; HARC input filters do not apply here. Prompts are scored the
way lm-eval scores them by default (no chat template), so numbers compare with its published ones.
"""

from __future__ import annotations

import math

from harc.errors import HarcError

INSTALL_HINT = "pip install 'harc[lm-eval]'"


def require_lm_eval():
    """Import lm-eval, or raise a one-line HarcError that says how to install it."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise HarcError(f"lm-eval benchmarks need the optional lm-eval package; {INSTALL_HINT}") from e
    return lm_eval, HFLM, TaskManager


def lm_eval_scores(model, tokenizer, tasks: list[str], *, limit: int | None = None,
                   batch_size: int = 8, include_path: str | None = None) -> dict[str, dict]:
    """Run lm-eval tasks on a loaded model; return {task: {metric: value}}.

    Metric names are lm-eval's with the default ",none" filter dropped (other filters stay, e.g.
    "exact_match,strict-match" for GSM8K); "<metric>_stderr" is kept where lm-eval gives one, and
    "n" is the number of documents scored. Groups (e.g. "mmlu") appear beside their subtasks.
    `limit` caps documents per task (quick checks only: scores are then not comparable);
    `include_path` is a folder of extra task YAMLs.
    """
    if not tasks:
        raise HarcError("lm_eval_scores needs at least one task name")
    lm_eval, HFLM, TaskManager = require_lm_eval()
    manager = TaskManager(include_path=include_path)
    # lm-eval raises a bare KeyError deep in task loading; name the task here instead.
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise HarcError(f"lm-eval has no task {unknown[0]!r}; list them with `lm-eval ls tasks`")
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    try:
        # log_samples=False: per-document records would only be held in memory and dropped.
        out = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), limit=limit,
                                      task_manager=manager, log_samples=False)
    except ModuleNotFoundError as e:  # a task's own dependency, e.g. IFEval's langdetect
        raise HarcError(f"lm-eval task needs the missing module {e.name!r}; {INSTALL_HINT}") from e
    counts = out.get("n-samples", {})
    scores = {}
    for task, rec in out["results"].items():
        row = {}
        for key, value in rec.items():
            metric, _, filt = key.partition(",")
            # keys without a filter are labels ("alias", "name", "sample_len"); "N/A" stderrs
            # are strings: neither is a score.
            if not filt or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            name = metric if filt == "none" else f"{metric},{filt}"
            row[name] = float(value) if math.isfinite(value) else None  # JSON has no NaN
        if task in counts:
            row["n"] = counts[task]["effective"]
        scores[task] = row
    return scores
