"""A pipeline stage: a folder whose `stage.json` records the hash of its inputs, so that a stage
whose inputs are unchanged is skipped and an interrupted run resumes where it stopped."""

from __future__ import annotations

import json
import time
from pathlib import Path

from harc.io import atomic_write_json, sha256_json


class Stage:
    """A pipeline stage folder that is skipped when its inputs hash is unchanged."""

    def __init__(self, root: Path, name: str, inputs: object):
        self.dir = root / name
        self.hash = sha256_json(inputs)[:20]

    def done(self) -> bool:
        marker = self.dir / "stage.json"
        return marker.exists() and json.loads(marker.read_text()).get("inputs") == self.hash

    def finish(self, info: dict | None = None) -> None:
        atomic_write_json(self.dir / "stage.json",
                          {"inputs": self.hash, "finished": time.time(), **(info or {})})


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
