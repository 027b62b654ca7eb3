"""Read a registered dataset or a user file into canonical records (plain dicts).

Canonical fields (docs/architecture.md): prompt sets `{"prompt", "category"?}`, pairs
`{"prompt", "response"}`, triples `{"prompt", "refusal", "completion"}`, jailbreak templates
`{"template", "name"?}`, capability items `{"prompt", "answer", "check"}`; a user file with a
refusal but no harmful completion reads as `{"prompt", "refusal"}`. User files may be a
JSON list (or an object holding one list), JSON lines, CSV/TSV, plain text (one prompt a line) or
Parquet (with pyarrow). Their columns are matched by common names (`goal`, `instruction`,
`output`, ...) unless `field_map` says otherwise. A malformed file fails on the first bad row with
the file, the line (or record) and the field named, instead of training on half a dataset.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import harc.data.registry as registry
import harc.data.sources as sources
from harc.data.registry import KINDS, DatasetEntry
from harc.errors import HarcError

# Kinds a user file may be read as: the registry's, plus "prompts" (harmful or harmless is the
# caller's business) and "refusals" (prompt + refusal target, no harmful completion).
_FIELDS = {"prompts": (("prompt",), ("category",)),
           "refusals": (("prompt", "refusal"), ("category",)), **KINDS}

# column names tried, in order, for each canonical field of a user file without a field_map
ALIASES: dict[str, tuple[str, ...]] = {
    "prompt": ("prompt", "instruction", "goal", "Goal", "Behavior", "behavior", "question",
               "query", "forbidden_prompt", "bad_q", "text"),
    "response": ("response", "output", "completion", "answer"),
    "refusal": ("refusal", "llama3_output", "censored_response"),
    "completion": ("completion", "harmful_completion", "output", "uncensored_response"),
    "category": ("category", "Category", "type", "SemanticCategory", "topic"),
    "template": ("template",),
    "name": ("name",),
    "answer": ("answer",),
    "check": ("check",),
}

_SUFFIX_FORMAT = {".json": "json", ".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv",
                  ".tsv": "tsv", ".txt": "txt", ".parquet": "parquet"}


def _harmbench_context(row: dict) -> dict:
    # HarmBench's own prompt for contextual behaviors: the context, a rule, then the request
    context = (row.get("ContextString") or "").strip()
    behavior = row.get("Behavior") or ""
    return {**row, "_prompt": f"{context}\n\n---\n\n{behavior}" if context else behavior}


TRANSFORMS: dict[str, Callable[[dict], dict]] = {"harmbench_context": _harmbench_context}


# --------------------------------------------------------------------------------------------
# Raw rows


def read_rows(path: str | Path, *, records_key: str | None = None) -> Iterator[tuple[str, dict]]:
    """(location, row) for each row of a data file; location is "line N", "record N" or "row N"."""
    path = Path(path)
    fmt = _SUFFIX_FORMAT.get(path.suffix.lower())
    if fmt is None:
        raise HarcError(f"{path}: unknown data format {path.suffix!r}; use .json, .jsonl, .csv, "
                        ".tsv, .txt or .parquet")
    if fmt == "parquet":
        yield from _parquet_rows(path)
        return
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise HarcError(f"{path}: not UTF-8 text (byte {e.start}); re-save it as UTF-8") from None
    except OSError as e:
        raise HarcError(f"cannot read {path}: {e.strerror or e}") from None
    if fmt in ("csv", "tsv"):
        yield from _csv_rows(path, text, "\t" if fmt == "tsv" else ",")
    elif fmt == "txt":
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                yield f"line {n}", {"text": line}
    elif fmt == "jsonl":
        yield from _jsonl_rows(path, text)
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            if e.msg == "Extra data":  # several JSON values: a JSON-lines file named .json
                yield from _jsonl_rows(path, text)
                return
            raise HarcError(f"{path}, line {e.lineno}: invalid JSON ({e.msg})") from None
        yield from _json_rows(path, data, records_key)


def _csv_rows(path: Path, text: str, delimiter: str) -> Iterator[tuple[str, dict]]:
    reader = csv.DictReader(text.splitlines(keepends=True), delimiter=delimiter)
    header = reader.fieldnames or []
    try:
        for row in reader:
            where = f"line {reader.line_num}"
            if None in row:
                raise HarcError(f"{path}, {where}: {len(header) + len(row[None])} fields but the "
                                f"header has {len(header)} (an unquoted separator?)")
            if any(v is None for v in row.values()):
                raise HarcError(f"{path}, {where}: fewer fields than the {len(header)} in the "
                                "header")
            yield where, row
    except csv.Error as e:
        raise HarcError(f"{path}, line {reader.line_num}: malformed CSV ({e})") from None


def _jsonl_rows(path: Path, text: str) -> Iterator[tuple[str, dict]]:
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            raise HarcError(f"{path}, line {n}: invalid JSON ({e.msg}, column {e.colno})") from None
        yield f"line {n}", _as_row(path, f"line {n}", value)


def _json_rows(path: Path, data: Any, records_key: str | None) -> Iterator[tuple[str, dict]]:
    if isinstance(data, dict):
        if records_key is not None:
            data = data.get(records_key)
        else:
            lists = [v for v in data.values() if isinstance(v, list)]
            if len(lists) != 1:
                raise HarcError(f"{path}: a JSON object must hold exactly one list of records "
                                f"(found {len(lists)}); give a JSON list instead")
            data = lists[0]
    if not isinstance(data, list):
        raise HarcError(f"{path}: expected a JSON list of records")
    for i, value in enumerate(data, 1):
        yield f"record {i}", _as_row(path, f"record {i}", value)


def _as_row(path: Path, where: str, value: Any) -> dict:
    if isinstance(value, str):  # a list of bare strings: prompts or templates
        return {"text": value}
    if not isinstance(value, dict):
        raise HarcError(f"{path}, {where}: expected an object or a string, got "
                        f"{type(value).__name__}")
    return value


def _parquet_rows(path: Path) -> Iterator[tuple[str, dict]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise HarcError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow), or "
                        "convert the file to JSON lines") from None
    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises its own error types for damaged files
        raise HarcError(f"{path}: unreadable Parquet ({e})") from None
    for i, row in enumerate(rows, 1):
        yield f"row {i}", row


# --------------------------------------------------------------------------------------------
# Canonical records


def _infer_kind(columns: Iterable[str], field_map: Mapping[str, str]) -> str:
    cols = set(columns)

    def has(f: str) -> bool:
        return f in field_map or any(a in cols for a in ALIASES.get(f, ()))

    if has("template") and not has("prompt"):
        return "jailbreak_templates"
    if has("answer") and has("check"):
        return "capability"
    if has("refusal"):
        return "triples" if has("completion") else "refusals"
    if has("response"):
        return "pairs"
    return "prompts"


def _resolve_columns(kind: str, columns: Iterable[str], field_map: Mapping[str, str]
                     ) -> dict[str, str]:
    """canonical field -> column for a user file: explicit map first, then the first alias found."""
    cols = list(columns)
    required, optional = _FIELDS[kind]
    out: dict[str, str] = {}
    taken: set[str] = set()
    for f in required + optional:
        if f in field_map:
            out[f] = field_map[f]
        else:
            # one column feeds one field: "output" cannot be both the refusal and the completion
            found = next((a for a in ALIASES.get(f, ()) if a in cols and a not in taken), None)
            if found is not None:
                out[f] = found
            elif f in required:
                raise HarcError(f"no column for required field {f!r} (columns: "
                                f"{', '.join(cols) or 'none'}); pass field_map={{{f!r}: COLUMN}}")
        if f in out:
            taken.add(out[f])
    return out


_SURROGATE = re.compile("[\ud800-\udfff]")


def _text(value: Any) -> str | None:
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return None


def _records(rows: Iterable[tuple[str, dict]], origin: str, kind: str, columns: dict[str, str],
             where: tuple[tuple[str, tuple[str, ...]], ...] = (), transform: str | None = None,
             skip: int = 0) -> Iterator[dict]:
    required, optional = _FIELDS[kind]
    if transform is not None and transform not in TRANSFORMS:
        raise HarcError(f"{origin}: unknown row transform {transform!r}")
    fn = TRANSFORMS[transform] if transform else None
    for i, (loc, row) in enumerate(rows):
        if i < skip:
            continue
        if fn is not None:
            row = fn(row)
        if any(str(sources.resolve(row, c)) not in allowed for c, allowed in where):
            continue
        rec: dict[str, str] = {}
        for f, col in columns.items():
            raw = sources.resolve(row, col)
            label = f"field {f!r}" + (f" (column {col!r})" if col != f else "")
            if raw is None or raw == "":
                if f in required:
                    state = "is missing" if raw is None and col not in row else "is empty"
                    raise HarcError(f"{origin}, {loc}: {label} {state}")
                continue
            value = _text(raw)
            if value is None:
                raise HarcError(f"{origin}, {loc}: {label} must be text, got "
                                f"{type(raw).__name__}")
            if not value and f in required:
                raise HarcError(f"{origin}, {loc}: {label} is blank")
            if _SURROGATE.search(value):  # from a JSON "\\ud800" escape: no tokenizer takes it
                raise HarcError(f"{origin}, {loc}: {label} holds a lone surrogate "
                                f"({_SURROGATE.search(value).group()!r}), not valid Unicode; "
                                "fix the text")
            if value:
                rec[f] = value
        yield {f: rec[f] for f in required + optional if f in rec}


def _check_field_map(field_map: Mapping[str, str] | None) -> dict[str, str]:
    field_map = dict(field_map or {})
    known = {f for req, opt in _FIELDS.values() for f in req + opt}
    bad = [f for f in field_map if f not in known]
    if bad:
        raise HarcError(f"field_map: unknown field(s) {bad}; known: {sorted(known)}")
    return field_map


def _looks_like_path(x: str | Path) -> bool:
    if isinstance(x, Path):
        return True
    return "/" in x or "\\" in x or Path(x).suffix.lower() in _SUFFIX_FORMAT


def load(name_or_path: str | Path, *, field_map: Mapping[str, str] | None = None,
         limit: int | None = None, kind: str | None = None) -> list[dict]:
    """Records of a registered dataset (by name) or of a user data file.

    `field_map` maps canonical fields to source columns (`{"prompt": "goal"}`), overriding the
    registry's mapping or the column-name guesses for files. `kind` fixes which fields a file must
    have; left out, it is inferred from its columns (prompts, pairs, triples, ...). `limit` keeps
    the first N records.
    """
    field_map = _check_field_map(field_map)
    if kind is not None and kind not in _FIELDS:
        raise HarcError(f"unknown kind {kind!r}; one of {sorted(_FIELDS)}")
    if limit is not None and limit < 0:
        raise HarcError(f"limit must be >= 0, got {limit}")
    if isinstance(name_or_path, str) and name_or_path in registry.DATASETS:
        return _load_entry(registry.get(name_or_path), field_map, limit, kind)
    path = Path(name_or_path)
    if not path.exists():
        if _looks_like_path(name_or_path):
            raise HarcError(f"data file {path} does not exist")
        registry.get(str(name_or_path))  # raises with close names
    if path.is_dir():
        raise HarcError(f"{path} is a folder; pass a data file or a registered dataset name")
    return _load_file(path, field_map, limit, kind)


def _load_file(path: Path, field_map: dict[str, str], limit: int | None, kind: str | None
               ) -> list[dict]:
    rows = read_rows(path)
    first = next(rows, None)
    if first is None:
        raise HarcError(f"{path} holds no records")
    kind = kind or _infer_kind(first[1], field_map)
    try:
        columns = _resolve_columns(kind, first[1], field_map)
    except HarcError as e:
        raise HarcError(f"{path}: {e}") from None
    return _take(_records(_chain(first, rows), str(path), kind, columns), limit)


def _load_entry(entry: DatasetEntry, field_map: dict[str, str], limit: int | None,
                kind: str | None) -> list[dict]:
    if kind is not None and kind != entry.kind:
        raise HarcError(f"dataset {entry.name!r} is {entry.kind}, not {kind}")
    columns = {**entry.field_map, **field_map}

    def gen() -> Iterator[dict]:
        for stem, path in sources.files(entry):
            # `_source` lets a multi-file set take its category from the file name
            rows = ((loc, {**row, "_source": stem}) for loc, row in
                    read_rows(path, records_key=entry.records_key))
            yield from _records(rows, f"{entry.name} ({path})", entry.kind, columns,
                                where=entry.where, transform=entry.transform, skip=entry.skip)

    return _take(gen(), limit)


def _chain(first: tuple[str, dict], rest: Iterator[tuple[str, dict]]
           ) -> Iterator[tuple[str, dict]]:
    yield first
    yield from rest


def _take(records: Iterator[dict], limit: int | None) -> list[dict]:
    out = []
    for rec in records:
        if limit is not None and len(out) >= limit:
            break
        out.append(rec)
    return out
