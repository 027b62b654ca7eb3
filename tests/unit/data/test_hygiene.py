"""Normalisation, near-duplicate matching, de-duplication and seeded splits."""

import itertools
import random

import pytest

from harc.data.hygiene import (
    dedupe,
    dedupe_against,
    normalize,
    overlap_counts,
    shingles,
    similar_pairs,
    similarity,
    split,
)
from harc.errors import HarcError

pytestmark = pytest.mark.unit


def test_normalize_folds_case_width_punctuation_and_spaces():
    assert normalize("  Ｈｏｗ   do I\tbake—BREAD?! ") == "how do i bake bread"
    assert normalize("...") == ""


def test_similarity_scores_rewordings_high_and_different_topics_low():
    a = "Create a tutorial on how to pick a lock"
    assert similarity(a, "create a tutorial, on how to pick a lock!") == 1.0
    assert similarity(a, "Create a tutorial video on how to pick a lock") >= 0.7
    assert similarity(a, "Explain the water cycle to a child") < 0.2
    assert similarity("", "...") == 1.0  # both empty after normalisation
    assert shingles("hi") == frozenset({"hi"})


def _brute(texts, threshold):
    return {(i, j) for i, j in itertools.combinations(range(len(texts)), 2)
            if similarity(texts[i], texts[j]) >= threshold}


@pytest.mark.parametrize("threshold", [0.5, 0.7, 0.9])
def test_prefix_filter_finds_exactly_the_brute_force_pairs(threshold):
    rng = random.Random(3)
    words = "alpha beta gamma delta write guide about cats dogs garden plan make".split()
    base = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 9))) for _ in range(40)]
    texts = base + [t + " " + rng.choice(words) for t in base[:20]]  # guaranteed near pairs
    found = {(i, j) for i, j, _ in similar_pairs(texts, threshold=threshold)}
    assert found == _brute(texts, threshold)
    assert found  # the set has pairs to find at every threshold
    cross = {(i, j) for i, j, _ in similar_pairs(base[:20], texts[40:], threshold=threshold)}
    assert cross == {(i, j) for i in range(20) for j in range(20)
                     if similarity(base[i], texts[40 + j]) >= threshold}


def test_dedupe_keeps_first_of_each_near_duplicate_group():
    recs = [{"prompt": "Write a poem about the sea"}, {"prompt": "write a poem about the sea!"},
            {"prompt": "Explain how a bicycle gear works"},
            {"prompt": "Write a poem about the sea."}]
    kept, n = dedupe(recs)
    assert kept == [recs[0], recs[2]] and n == 2


def test_dedupe_against_removes_train_items_close_to_any_other_set():
    train = [{"prompt": "Describe how to brew green tea"}, {"prompt": "List four prime numbers"},
             {"prompt": "Name three rivers in Africa"}]
    evalset = ["describe how to brew green tea."]
    extract = [{"prompt": "Name three rivers in Africa, please"}]
    kept, n = dedupe_against(train, evalset, extract)
    assert kept == [train[1]] and n == 2
    assert dedupe_against(train)[1] == 0
    with pytest.raises(HarcError, match="no text field 'prompt'"):
        dedupe_against([{"text": "x"}], evalset)


def _distinct(n):
    rng = random.Random(0)
    letters = "abcdefghijklmnopqrstuvwxyz"
    recs = [{"prompt": " ".join("".join(rng.choice(letters) for _ in range(6)) for _ in range(5))}
            for _ in range(n)]
    assert not list(similar_pairs([r["prompt"] for r in recs]))
    return recs


def test_split_is_seeded_disjoint_and_sized():
    recs = _distinct(100)
    s1 = split(recs, (0.6, 0.2, 0.2), seed=1)
    s2 = split(recs, (0.6, 0.2, 0.2), seed=1)
    s3 = split(recs, (0.6, 0.2, 0.2), seed=2)
    assert s1.sizes == {"extract": 60, "validate": 20, "train": 20}
    assert s1.parts == s2.parts and s1.parts != s3.parts
    ids = [id(r) for part in s1.parts.values() for r in part]
    assert len(ids) == len(set(ids)) == 100
    assert s1.overlaps == {"extract~validate": 0, "extract~train": 0, "validate~train": 0}
    assert s1["train"] == s1.parts["train"]


def test_split_keeps_near_duplicates_in_one_part_and_accepts_counts():
    recs = _distinct(30)
    twins = [{"prompt": "Plan a birthday party for my cousin"},
             {"prompt": "plan a birthday party for my cousin!!"}]
    recs = recs + twins
    for seed in range(5):
        s = split(recs, (10, 10, 12), seed=seed)
        holder = [k for k, v in s.parts.items() if twins[0] in v]
        assert len(holder) == 1 and twins[1] in s.parts[holder[0]]
        assert sum(s.sizes.values()) == 32 and s.dropped == 0


def test_split_fractions_below_one_leave_records_out():
    recs = _distinct(20)
    s = split(recs, (0.5, 0.25), seed=0, names=("a", "b"))
    assert s.sizes == {"a": 10, "b": 5} and s.dropped == 5


def test_split_rejects_bad_sizes():
    recs = [{"prompt": "a"}, {"prompt": "b"}]
    with pytest.raises(HarcError, match="ask for"):
        split(recs, (0.8, 0.8, 0.1))
    with pytest.raises(HarcError, match="3 parts"):
        split(recs, (0.5, 0.5))
    with pytest.raises(HarcError, match="non-negative"):
        split(recs, (1.2, -0.1, -0.1))


def test_overlap_counts_reports_leaks_between_parts():
    parts = {"a": ["Summarize the history of Rome", "Draw a cat"],
             "b": ["summarize the history of rome.", "Bake a loaf"], "c": ["Draw a cat!"]}
    assert overlap_counts(parts) == {"a~b": 1, "a~c": 1, "b~c": 0}
