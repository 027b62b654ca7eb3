"""A pipeline stage: a folder whose `stage.json` records the hash of its inputs, so that a stage
whose inputs are unchanged is skipped and an interrupted run resumes where it stopped."""

from __future__ import annotations

import json
import time
from pathlib import Path

from harc.errors import HarcError
from harc.io import atomic_write_json, sha256_json


class Stage:
    """A pipeline stage folder that is skipped when its inputs hash is unchanged; `finish`
    records how long the work took, so a run that skips the stage still reports it."""

    def __init__(self, root: Path, name: str, inputs: object):
        self.dir = root / name
        self.name = name
        self.hash = sha256_json(inputs)[:20]
        self.started = time.time()
        marker = self.dir / "stage.json"
        try:
            self.record = json.loads(marker.read_text()) if marker.is_file() else {}
        except ValueError:  # cut short by a crash: the stage runs again
            self.record = {}

    def done(self) -> bool:
        return self.record.get("inputs") == self.hash

    @property
    def seconds(self) -> float | None:
        """How long the stage took when it ran (None for stages finished by older versions)."""
        s = self.record.get("seconds")
        return float(s) if isinstance(s, int | float) else None

    def finish(self, info: dict | None = None) -> None:
        self.record = {"inputs": self.hash, "finished": time.time(),
                       "seconds": round(time.time() - self.started, 2), **(info or {})}
        atomic_write_json(self.dir / "stage.json", self.record)


def read_jsonl(path: Path) -> list[dict]:
    """Records of a JSON-lines file; a last line cut short by an interruption is dropped."""
    lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    out = []
    for i, line in enumerate(lines):
        try:
            out.append(json.loads(line))
        except ValueError:
            if i < len(lines) - 1:
                raise HarcError(f"{path}, line {i + 1}, is not JSON; delete the file to "
                                "recompute it") from None
    return out
