"""Datasets for HARC: a registry of named sets, loaders for them and for user files, and hygiene
(near-duplicate removal and disjoint seeded splits).

    from harc.data import load, split, dedupe_against
    harmful = load("advbench")
    harmful, n = dedupe_against(harmful, load("harmbench"))
    parts = split(harmful, (0.6, 0.2, 0.2), seed=0)   # parts["extract"], ["validate"], ["train"]
"""

from harc.data.capability import check as check_capability
from harc.data.hygiene import (
    dedupe,
    dedupe_against,
    normalize,
    overlap_counts,
    sample_across,
    similarity,
    split,
)
from harc.data.loaders import load
from harc.data.profile import DataProfile, default_sets, fetch, prepare_sets
from harc.data.registry import DatasetEntry, entries, get, names, register

__all__ = [
    "DataProfile",
    "DatasetEntry",
    "check_capability",
    "dedupe",
    "dedupe_against",
    "default_sets",
    "entries",
    "fetch",
    "get",
    "load",
    "names",
    "normalize",
    "overlap_counts",
    "prepare_sets",
    "register",
    "sample_across",
    "similarity",
    "split",
]
