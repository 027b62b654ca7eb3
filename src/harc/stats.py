"""Interval statistics shared by evaluation, judges and the report."""

from __future__ import annotations

from collections.abc import Sequence


def wilson(k: float, n: float, z: float = 1.96) -> list[float]:
    """Wilson score interval of a proportion k/n; [0, 1] when n is 0."""
    if n <= 0:
        return [0.0, 1.0]
    p = k / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * ((p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5) / den
    return [max(0.0, centre - half), min(1.0, centre + half)]


def rate(flags: Sequence[bool]) -> dict:
    """{"n", "k", "rate", "ci"} of a list of outcomes."""
    k, n = int(sum(flags)), len(flags)
    return {"n": n, "k": k, "rate": k / n if n else 0.0, "ci": wilson(k, n)}


def ratio(a: float, b: float) -> float | None:
    return a / b if b else None  # None, not 0: an undefined rate must not look like a bad one


def kappa(a: Sequence[bool], b: Sequence[bool]) -> float | None:
    """Cohen's kappa of two binary raters; None for no items."""
    n = len(a)
    if n == 0:
        return None
    po = sum(x == y for x, y in zip(a, b)) / n
    pa, pb = sum(a) / n, sum(b) / n
    pe = pa * pb + (1 - pa) * (1 - pb)
    if pe == 1:  # both raters constant: kappa is 1 if they agree, undefined otherwise
        return 1.0 if po == 1 else None
    return (po - pe) / (1 - pe)


def binary_metrics(truth: Sequence[bool], predicted: Sequence[bool]) -> dict:
    """Accuracy, precision, recall, F1 and kappa with True as the positive class."""
    tp = sum(h and j for h, j in zip(truth, predicted))
    fp = sum(j and not h for h, j in zip(truth, predicted))
    fn = sum(h and not j for h, j in zip(truth, predicted))
    tn = len(truth) - tp - fp - fn
    p, r = ratio(tp, tp + fp), ratio(tp, tp + fn)
    f1 = 2 * p * r / (p + r) if p is not None and r is not None and p + r else None
    return {"n": len(truth), "accuracy": ratio(tp + tn, len(truth)), "precision": p,
            "recall": r, "f1": f1, "kappa": kappa(truth, predicted),
            "confusion": {"tp": tp, "fp": fp, "fn": fn, "tn": tn}}
