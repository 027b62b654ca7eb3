"""harc.config: one type check, one override parser and one-line errors for every config."""

from collections.abc import Callable
from typing import Literal

import pytest
from pydantic import Field

from harc.config import Config, apply_overrides, build, read_yaml, to_dict, to_yaml
from harc.errors import HarcError

pytestmark = pytest.mark.unit


class Inner(Config):
    prefix = "inner."
    r: int = 4


class Sample(Config):
    """A config with one field of each kind the parsers must handle."""

    flag: bool = False
    n: int = 1
    x: float = 0.5
    maybe: int | None = None
    names: list[str] = Field(default_factory=list)
    ints: list[int] = Field(default_factory=list)
    pair: tuple[int, int] = (4, 4)
    mode: Literal["a", "b"] = "a"
    fn: Callable | None = None
    inner: Inner = Field(default_factory=Inner)

    def check(self) -> None:
        self.need(self.n >= 0, "n", "must be >= 0")


@pytest.mark.parametrize("raw, field, want", [
    ({"flag": "yes"}, "flag", True), ({"flag": "0"}, "flag", False), ({"n": "12"}, "n", 12),
    ({"x": 3}, "x", 3.0), ({"x": "1e-4"}, "x", 1e-4), ({"maybe": None}, "maybe", None),
    ({"maybe": "3"}, "maybe", 3), ({"names": "dan, aim"}, "names", ["dan", "aim"]),
    ({"ints": [1, "2"]}, "ints", [1, 2]), ({"pair": [4, "4"]}, "pair", (4, 4)),
    ({"mode": "b"}, "mode", "b"), ({"fn": len}, "fn", len), ({"inner": {"r": "8"}}, "inner.r", 8),
])
def test_values_are_parsed(raw, field, want):
    cfg = build(Sample, raw)
    for part in field.split("."):
        cfg = getattr(cfg, part)
    assert cfg == want and type(cfg) is type(want)


@pytest.mark.parametrize("raw, key", [
    ({"flag": "maybe"}, "flag"), ({"n": "1.5"}, "n"), ({"n": True}, "n"), ({"x": False}, "x"),
    ({"x": "x"}, "x"), ({"ints": [1, "a"]}, "ints"), ({"ints": "1,2"}, "ints"),
    ({"pair": [4]}, "pair"), ({"mode": "c"}, "mode"), ({"names": 3}, "names"),
    ({"fn": 3}, "fn"), ({"n": -1}, "n"), ({"inner": {"r": "x"}}, "inner.r"),
])
def test_bad_values_name_the_key_in_one_line(raw, key):
    with pytest.raises(HarcError) as e:
        build(Sample, raw)
    msg = str(e.value)
    assert f"'{key}'" in msg and "\n" not in msg


def test_unknown_keys_get_a_hint_at_every_depth():
    with pytest.raises(HarcError, match="unknown config key 'nn'; did you mean 'n'"):
        build(Sample, {"nn": 1})
    with pytest.raises(HarcError, match="unknown config key 'inner.rr'; did you mean 'inner.r'"):
        build(Sample, {"inner": {"rr": 1}})
    with pytest.raises(HarcError, match="unknown attack 'x' option 'zzz'"):
        build(Sample, {"zzz": 1}, owner="attack 'x' option")


def test_overrides_reach_into_sections_and_read_yaml_values():
    raw = apply_overrides({"inner": {"r": 1}, "n": 2}, ["inner.r=8", "pair=[1, 2]", "maybe=null",
                                                       "names=a,b", "new.deep.key=x"])
    assert raw == {"inner": {"r": 8}, "n": 2, "pair": [1, 2], "maybe": None, "names": "a,b",
                   "new": {"deep": {"key": "x"}}}
    for bad in ("novalue", "=3", "a..b=1"):
        with pytest.raises(HarcError, match="key=value"):
            apply_overrides({}, [bad])
    with pytest.raises(HarcError, match="not a section"):
        apply_overrides({"n": 2}, ["n.x=1"])


def test_round_trip_through_yaml(tmp_path):
    cfg = build(Sample, {"names": ["a"], "pair": [1, 2], "inner": {"r": 2}})
    path = tmp_path / "c.yaml"
    path.write_text(to_yaml(cfg))
    raw, base = read_yaml(path)
    assert build(Sample, raw) == cfg and to_dict(cfg)["pair"] == [1, 2] and base == tmp_path


def test_assignment_is_validated_too():
    cfg = build(Sample, {})
    with pytest.raises(HarcError, match="'n'"):
        cfg.n = -5
