"""Loading user files and registered datasets into canonical records (no network)."""

from pathlib import Path

import pytest

from harc.data import load, registry
from harc.data.loaders import read_rows
from harc.data.registry import Builtin, DatasetEntry
from harc.errors import HarcError

pytestmark = pytest.mark.unit
FIX = Path(__file__).resolve().parents[2] / "fixtures" / "data"


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HARC_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("HARC_OFFLINE", raising=False)


def test_jsonl_prompts_keep_optional_category_and_skip_blank_lines():
    recs = load(FIX / "prompts.jsonl")
    assert recs == [
        {"prompt": "Plan a picnic for four people.", "category": "leisure"},
        {"prompt": "Explain how tides work.", "category": "science"},
        {"prompt": "Suggest a name for a goldfish."},
    ]


def test_json_list_with_alias_column_and_null_category():
    recs = load(FIX / "prompts_list.json")
    assert recs == [{"prompt": "List three uses for a paperclip."},
                    {"prompt": "Describe a sunrise in one sentence.", "category": "writing"}]


def test_json_object_holding_one_list_and_jsonl_named_json():
    assert [r["prompt"] for r in load(FIX / "prompts_object.json")] == [
        "First wrapped prompt.", "Second wrapped prompt."]
    assert load(FIX / "lines_named.json")[1] == {
        "prompt": "A JSON-lines file with a .json name, second."}


def test_list_of_strings_reads_as_prompts_or_templates():
    assert load(FIX / "strings.json")[1] == {"prompt": "Template two."}
    recs = load(FIX / "strings.json", kind="jailbreak_templates", field_map={"template": "text"})
    assert recs[0] == {"template": "Template one with {generator.name} inside."}


def test_txt_one_prompt_per_line():
    assert load(FIX / "prompts.txt") == [{"prompt": "First prompt from a text file."},
                                        {"prompt": "Second prompt from a text file."}]


def test_csv_with_quoted_commas_and_limit():
    recs = load(FIX / "advbench_like.csv")
    assert len(recs) == 4  # a user file keeps every row, the toy one included
    assert recs[2] == {"prompt": "Write a fake request number two, with a comma"}
    assert len(load(FIX / "advbench_like.csv", limit=2)) == 2
    assert load(FIX / "advbench_like.csv", limit=0) == []


def test_pairs_inferred_from_columns_and_tsv_with_field_map():
    assert load(FIX / "pairs.csv")[0] == {"prompt": "Give me a tip for sleeping well.",
                                          "response": "Keep a regular bedtime."}
    recs = load(FIX / "pairs.tsv", field_map={"prompt": "question", "response": "answer_text"})
    assert recs == [{"prompt": "What is two plus two?", "response": "Four."},
                    {"prompt": "Name a color.", "response": "Blue."}]


def test_triples_in_circuit_breakers_shape():
    recs = load(FIX / "triples_cb.json")
    assert recs[0] == {"prompt": "Placeholder harmful prompt A",
                       "refusal": "I can't help with that.",
                       "completion": "Placeholder harmful completion A",
                       "category": "placeholder"}


def test_refusal_without_completion_keeps_the_refusal(tmp_path):
    f = tmp_path / "refusals.jsonl"
    f.write_text('{"prompt": "Placeholder harmful prompt", "refusal": "I can\'t help."}\n')
    assert load(f) == [{"prompt": "Placeholder harmful prompt", "refusal": "I can't help."}]
    with pytest.raises(HarcError, match="no column for required field 'completion'"):
        load(f, kind="triples")


def test_explicit_kind_drops_fields_of_other_kinds():
    assert load(FIX / "pairs.csv", kind="harmless")[1] == {"prompt": "Name a large mammal."}


@pytest.mark.parametrize("fname, fragments", [
    ("bad_json.jsonl", ["bad_json.jsonl", "line 3", "invalid JSON"]),
    ("missing_field.jsonl", ["missing_field.jsonl", "line 2", "'prompt'", "missing"]),
    ("empty_field.csv", ["empty_field.csv", "line 3", "'prompt'", "column 'goal'", "empty"]),
    ("extra_field.csv", ["extra_field.csv", "line 3", "header has 2"]),
    ("wrong_type.json", ["wrong_type.json", "record 2", "'prompt'", "must be text"]),
    ("empty.jsonl", ["empty.jsonl", "no records"]),
])
def test_malformed_files_name_file_line_and_field(fname, fragments):
    with pytest.raises(HarcError) as err:
        load(FIX / fname)
    msg = str(err.value)
    assert "\n" not in msg
    for frag in fragments:
        assert frag in msg


def test_field_map_to_a_missing_column_names_it():
    with pytest.raises(HarcError, match=r"line 1: field 'prompt' \(column 'nope'\) is missing"):
        load(FIX / "prompts.jsonl", field_map={"prompt": "nope"})


def test_unknown_inputs_raise_helpful_errors(tmp_path):
    with pytest.raises(HarcError, match="does not exist"):
        load(tmp_path / "missing.jsonl")
    with pytest.raises(HarcError, match="did you mean \'advbench\'"):
        load("advbnch")
    with pytest.raises(HarcError, match="unknown data format"):
        (tmp_path / "x.xml").write_text("<a/>")
        load(tmp_path / "x.xml")
    with pytest.raises(HarcError, match="unknown field"):
        load(FIX / "prompts.jsonl", field_map={"promt": "prompt"})
    with pytest.raises(HarcError, match="no column for required field 'response'"):
        load(FIX / "prompts.jsonl", kind="pairs")


def test_parquet_without_pyarrow_says_what_to_install(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_pyarrow(name, *a, **kw):
        if name.startswith("pyarrow"):
            raise ImportError(name)
        return real_import(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_pyarrow)
    (tmp_path / "x.parquet").write_bytes(b"PAR1")
    with pytest.raises(HarcError, match="needs pyarrow"):
        load(tmp_path / "x.parquet")


def test_parquet_round_trip(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"goal": ["p1", "p2"], "n": [1, 2]}), tmp_path / "x.parquet")
    assert load(tmp_path / "x.parquet") == [{"prompt": "p1"}, {"prompt": "p2"}]


def test_read_rows_reports_csv_line_numbers_across_multiline_fields():
    locs = [loc for loc, _ in read_rows(FIX / "harmbench_like.csv")]
    assert locs == ["line 2", "line 4", "line 5"]  # the context field spans lines 3-4


@pytest.fixture
def temp_entry():
    added = []

    def add(entry):
        registry.register(entry)
        added.append(entry.name)
        return entry

    yield add
    for n in added:
        registry.DATASETS.unregister(n)


def test_registered_builtin_sets_load_with_their_schema():
    benign = load("harc-benign")
    assert len(benign) == 300 and all(set(r) == {"prompt", "category"} for r in benign)
    cap = load("harc-capability", limit=5)
    assert len(cap) == 5 and set(cap[0]) == {"prompt", "answer", "check", "category"}
    with pytest.raises(HarcError, match="is capability, not pairs"):
        load("harc-capability", kind="pairs")


def test_registry_entry_applies_where_skip_transform_and_source_stem(temp_entry, monkeypatch):
    from harc.data import sources

    monkeypatch.setattr(sources, "files", lambda e: [("harmbench_like",
                                                      FIX / "harmbench_like.csv")])
    temp_entry(DatasetEntry(
        "t-hb", "harmful", Builtin("unused.jsonl"), "MIT",
        (("prompt", "_prompt"), ("category", "SemanticCategory")), "test",
        where=(("FunctionalCategory", ("standard", "contextual")),),
        transform="harmbench_context"))
    recs = load("t-hb")
    assert [r["category"] for r in recs] == ["illegal", "harmful"]
    assert recs[1]["prompt"] == ("Placeholder context paragraph\nspanning two lines.\n\n---\n\n"
                                 "Using the notes above, write a placeholder harmful follow-up")
    temp_entry(DatasetEntry("t-adv", "harmful", Builtin("unused.jsonl"), "MIT",
                            (("prompt", "goal"), ("category", "_source")), "test", skip=1))
    monkeypatch.setattr(sources, "files", lambda e: [("advbench_like",
                                                      FIX / "advbench_like.csv")])
    recs = load("t-adv")
    assert len(recs) == 3 and recs[0]["prompt"].startswith("Write a fake request number one")
    assert recs[0]["category"] == "advbench_like"
    # a user field_map overrides the registry's mapping
    assert load("t-adv", field_map={"prompt": "target"})[0]["prompt"] == "Sure, here is number one"
