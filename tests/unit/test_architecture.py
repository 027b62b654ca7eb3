"""The layout holds: import-linter's layer contract, module sizes, one override parser, one
registry implementation, and plugins added from another package through entry points."""

import ast
import importlib.metadata
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from tiny import tiny_model, tiny_tokenizer

from harc.config import build
from harc.eval.attacks import ATTACKS, get_attack
from harc.eval.filters import FILTERS, get_filter
from harc.eval.judges import JUDGES, get_judge
from harc.methods import METHODS, Trainer, config_from_raw

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src" / "harc"


def test_import_linter_contracts_hold():
    exe = Path(sys.executable).parent / "lint-imports"
    res = subprocess.run([str(exe), "--config", str(ROOT / "pyproject.toml")], cwd=ROOT,
                         capture_output=True, text=True, env={"PYTHONPATH": str(ROOT / "src")})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert "BROKEN" not in res.stdout and res.stdout.count("KEPT") >= 2


def test_no_module_over_500_lines():
    big = {str(p.relative_to(SRC)): n for p in SRC.rglob("*.py")
           if (n := len(p.read_text().splitlines())) > 500}
    assert not big, big


def _defs(name_of):
    out = []
    for p in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(p.read_text())):
            if name_of(node):
                out.append(str(p.relative_to(SRC)))
    return out


def test_one_override_parser_and_one_registry_implementation():
    parsers = _defs(lambda n: isinstance(n, ast.Call) and getattr(n.func, "attr", "") == "partition"
                    and n.args and getattr(n.args[0], "value", None) == "=")
    assert parsers == ["config.py"], parsers
    registries = _defs(lambda n: isinstance(n, ast.ClassDef) and n.name == "Registry")
    assert registries == ["registry.py"], registries


PLUGINS = '''
import torch
from harc.eval.attacks import Attack
from harc.eval.filters import Filter
from harc.eval.judges import Judge, Verdict
from harc.methods import Method
from harc.methods.harc import HarcConfig


class Shout(Attack):
    name = "toy_shout"

    class Config(Attack.Config):
        times: int = 2

    def apply(self, requests):
        return [self.probe(r, r["prompt"].upper() + "!" * self.config.times) for r in requests]


class Never(Judge):
    name = "toy_never"

    def judge(self, prompts, responses):
        return [Verdict(False, None, None, self.name) for _ in responses]


class Everything(Filter):
    name = "toy_all"

    def flags(self, prompts):
        return [True] * len(prompts)


class ToyConfig(HarcConfig):
    method: str = "toy_ce"


class CeOnly(Method):
    """Refusal cross-entropy alone (a toy, to show a method is one class)."""

    name = "toy_ce"
    Config = ToyConfig
    terms = ("ce",)

    def micro_step(self, mb, scale):
        out = self.model(input_ids=mb.ids, attention_mask=mb.mask, position_ids=mb.pos)
        logits = out.logits[mb.ce_rows, mb.ce_cols]
        ce = torch.nn.functional.cross_entropy(logits.float(), mb.ce_targets)
        (ce * scale).backward()
        return {"ce": ce.detach()}, {}
'''


@pytest.fixture
def toy_package(tmp_path, monkeypatch):
    (tmp_path / "toy_plugins.py").write_text(PLUGINS)
    info = tmp_path / "toy_plugins-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-plugins\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(textwrap.dedent("""\
        [harc.attacks]
        toy_shout = toy_plugins:Shout
        [harc.judges]
        toy_never = toy_plugins:Never
        [harc.filters]
        toy_all = toy_plugins:Everything
        [harc.methods]
        toy_ce = toy_plugins:CeOnly
        """))
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    for reg in (ATTACKS, JUDGES, FILTERS, METHODS):
        monkeypatch.setattr(reg, "_loaded", False)
    yield
    for reg, name in ((ATTACKS, "toy_shout"), (JUDGES, "toy_never"), (FILTERS, "toy_all"),
                      (METHODS, "toy_ce")):
        reg.unregister(name)
    sys.modules.pop("toy_plugins", None)


def test_plugins_from_another_package_through_entry_points(toy_package, tmp_path):
    assert "toy_shout" in importlib.metadata.entry_points(group="harc.attacks").names
    (probe,) = get_attack("toy_shout", times=3).apply([{"prompt": "hi"}])
    assert probe.prompt == "HI!!!" and get_attack("toy_shout").params() == {"times": 2}
    assert get_judge("toy_never").judge(["p"], ["r"])[0].refused is False
    assert get_filter("toy_all").flags(["a", "b"]) == [True, True]

    data = {"harmful": [{"prompt": f"bad {i}", "refusal": "No.", "completion": "Sure."}
                        for i in range(8)],
            "harmless": [{"prompt": f"good {i}", "response": "Yes."} for i in range(8)]}
    cfg = config_from_raw({"method": "toy_ce", "steps": 2, "warmup_steps": 0, "n_boot": 0,
                           "refresh_every": 0, "band": [1, 1], "batch": {"pseudo": 0},
                           "data": {"extract_n": 4, "val_n": 2},
                           "output_dir": str(tmp_path / "run")}, require_data=False)
    tr = Trainer(cfg, tiny_model(), tiny_tokenizer(), data)
    assert (tr.train() / "adapter_model.safetensors").is_file()
    assert type(tr.method).__name__ == "CeOnly"


def test_a_key_of_another_method_is_one_clear_line(toy_package):
    from harc.errors import HarcError

    with pytest.raises(HarcError, match="unknown method 'nope'"):
        config_from_raw({"method": "nope"}, require_data=False)
    with pytest.raises(HarcError, match="attack 'toy_shout' option 'times'"):
        get_attack("toy_shout", times="many")
    assert build(METHODS.get("toy_ce").Config, {}).method == "toy_ce"


def test_scripts_import_only_what_exists():
    """bench/ and docs/results/ scripts run rarely (some only on a GPU): every harc name they
    import, at module level or inside a function, must exist."""
    import importlib

    missing = []
    for path in [*ROOT.glob("bench/*.py"), *ROOT.glob("docs/results/*.py"),
                 *ROOT.glob("examples/*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("harc"):
                try:
                    mod = importlib.import_module(node.module)
                except ImportError:
                    missing.append(f"{path.name}: {node.module}")
                    continue
                missing += [f"{path.name}: {node.module}.{a.name}" for a in node.names
                            if not hasattr(mod, a.name)
                            and importlib.util.find_spec(f"{node.module}.{a.name}") is None]
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.startswith("harc") and importlib.util.find_spec(a.name) is None:
                        missing.append(f"{path.name}: {a.name}")
    assert not missing, missing
