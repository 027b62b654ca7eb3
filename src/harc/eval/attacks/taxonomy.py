"""A user's own jailbreak taxonomy: prompts with a technique category, from CSV, JSON or JSONL.

Each row has `prompt` and `category` (the technique, e.g. "role-play"). A prompt containing the
slot `{prompt}` is a template: every request is placed into it. A prompt without the slot is a
complete probe already (its harmful request written in); it is sent once, as is, with the
request it carries taken from an optional `source_prompt` field. The technique goes to
`Probe.meta["technique"]`, keeping `Probe.category` for the request's harm category.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from harc.errors import HarcError
from harc.eval.attacks.base import Attack, Probe, normalize_requests, register_attack

SLOT = "{prompt}"


def load_taxonomy(path: str | Path) -> list[dict]:
    """Rows `{prompt, category, source_prompt?, where}`; malformed input names line and field."""
    path = Path(path)
    if not path.is_file():
        raise HarcError(f"taxonomy file {path} does not exist")
    text = path.read_text(encoding="utf-8-sig")
    suffix = path.suffix.lower()
    rows: list[tuple[str, object]] = []
    if suffix == ".csv":
        reader = csv.DictReader(text.splitlines())
        for field in ("prompt", "category"):
            if field not in (reader.fieldnames or []):
                raise HarcError(f"{path}:1: header has no field {field!r} "
                                f"(found: {', '.join(reader.fieldnames or [])})")
        rows = [(f"{path}:{reader.line_num}", row) for row in reader]
    elif suffix == ".jsonl":
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append((f"{path}:{n}", json.loads(line)))
                except json.JSONDecodeError as e:
                    raise HarcError(f"{path}:{n}: not valid JSON ({e.msg})") from None
    elif suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise HarcError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(data, list):
            raise HarcError(f"{path}: expected a JSON list of {{prompt, category}} objects")
        rows = [(f"{path}: item {i}", row) for i, row in enumerate(data)]
    else:
        raise HarcError(f"taxonomy file {path} must be .csv, .json or .jsonl")
    out = []
    for where, row in rows:
        if not isinstance(row, dict):
            raise HarcError(f"{where}: expected an object with 'prompt' and 'category'")
        for field in ("prompt", "category"):
            v = row.get(field)
            if not isinstance(v, str) or not v.strip():
                raise HarcError(f"{where}: field {field!r} is missing or empty")
        src = row.get("source_prompt")
        if src is not None and not isinstance(src, str):
            raise HarcError(f"{where}: field 'source_prompt' must be text")
        out.append({"prompt": row["prompt"], "category": row["category"].strip(),
                    "source_prompt": src or None, "where": where})
    if not out:
        raise HarcError(f"taxonomy file {path} has no rows")
    return out


@register_attack
class Taxonomy(Attack):
    name = "taxonomy"

    class Config(Attack.Config):
        path: str
        categories: list[str] | None = None  # keep only these techniques

    def apply(self, requests: list[dict]) -> list[Probe]:
        reqs = normalize_requests(requests)
        rows = load_taxonomy(self.config.path)
        if self.config.categories:
            rows = [r for r in rows if r["category"] in self.config.categories]
            if not rows:
                raise HarcError(f"taxonomy {self.config.path} has no rows in categories "
                                f"{self.config.categories}")
        out = []
        for row in rows:
            meta = {"technique": row["category"], "row": row["where"]}
            if SLOT in row["prompt"]:
                # str.replace, not str.format: jailbreak text is full of other braces
                out += [self.probe(r, row["prompt"].replace(SLOT, r["prompt"]), meta=meta)
                        for r in reqs]
            else:
                out.append(Probe(prompt=row["prompt"],
                                 source_prompt=row["source_prompt"] or row["prompt"],
                                 attack=self.name, meta=meta))
        return out
