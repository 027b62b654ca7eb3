"""Atomic, durable artifact writes (files and folders), output-folder checks, the cache folder,
content hashes and the fingerprint of model weight files.

Atomic: a crash or Ctrl-C mid-write leaves the previous artifact (or none), never a truncated
one, and no temporary file or folder behind. Durable: data is fsynced before the rename that
publishes it, and the folder after it, so a power loss cannot publish an empty file. Permissions
follow the umask (temporary files and folders are created 0600 / 0700 and widened before they
are published).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from harc.errors import HarcError


def cache_dir() -> Path:
    """`$HARC_CACHE`, else `~/.cache/harc`; created on first use."""
    path = Path(os.environ.get("HARC_CACHE") or Path.home() / ".cache" / "harc")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise HarcError(f"cannot create the harc cache {path} ({e.strerror}); set HARC_CACHE to "
                        "a folder you can write to") from None
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_dir(path: str | Path) -> None:
    """Make a folder's entries (a rename into it) durable; a no-op where folders cannot be
    opened (Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp)` on a temporary file beside `path`, then fsync and rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        _fsync_file(Path(tmp))
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")


def append_line(path: str | Path, line: str) -> None:
    """Append one line and fsync it: a log that survives a crash up to its last full line."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(line.rstrip("\n") + "\n")
        f.flush()
        os.fsync(f.fileno())


def temp_dir(parent: str | Path, name: str) -> Path:
    """A new empty folder in `parent` for the artifact `name` (hidden, ending in .tmp, so
    `remove_stale_temps` knows it), with umask permissions."""
    path = Path(tempfile.mkdtemp(dir=parent, prefix=f".{name}.", suffix=".tmp"))
    os.chmod(path, 0o777 & ~_umask())
    return path


def replace_dir(tmp: Path, target: Path) -> None:
    """Publish a finished folder: fsync its files and give them umask permissions (libraries
    such as safetensors write theirs 0600), swap it in for `target` (an existing one is moved
    aside, then removed) and fsync the parent."""
    mask = _umask()
    for root, dirs, names in os.walk(tmp):
        for name in names:
            _fsync_file(Path(root) / name)
            os.chmod(Path(root) / name, 0o666 & ~mask)
        for name in dirs:
            os.chmod(Path(root) / name, 0o777 & ~mask)
        fsync_dir(root)
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}.tmp")
        os.replace(target, old)
    os.replace(tmp, target)
    fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Yield a temporary folder beside `target` to fill; on success it replaces `target`
    atomically, on any failure (Ctrl-C included) it is removed."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir(target.parent, target.name)
    try:
        yield tmp
        replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_stale_temps(folder: str | Path) -> list[Path]:
    """Remove what interrupted `atomic_write` / `atomic_dir` / `replace_dir` calls left in
    `folder`: their temporaries are hidden and end in ".tmp". Returns what was removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    gone = [p for p in folder.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp")]
    for p in gone:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    return gone


def check_writable(path: str | Path, need_bytes: int = 0) -> Path:
    """Create `path` if needed and check that files can be written in it and that it has
    `need_bytes` free: a read-only, misplaced or full output folder fails before any work."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise HarcError(f"output folder {path} is a file; choose a folder (--out / output_dir)")
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".harc-write-check.")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        why = "a part of it is a file" if isinstance(e, (FileExistsError, NotADirectoryError)) \
            else e.strerror
        raise HarcError(f"cannot write to output folder {path} ({why}); choose a folder you "
                        "can write to (--out / output_dir)") from None
    free = shutil.disk_usage(path).free
    if free < need_bytes:
        raise HarcError(f"only {free / 2**20:.0f} MB free under {path}, about "
                        f"{need_bytes / 2**20:.0f} MB needed: free some space or choose another "
                        "output folder")
    return path


def safetensors_header(path: Path) -> bytes | None:
    """The JSON header of a safetensors file, or None if the file is not whole."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 2 <= n <= 100 << 20:
                return None
            header = f.read(n)
        meta = json.loads(header)
        end = max((v["data_offsets"][1] for k, v in meta.items() if k != "__metadata__"),
                  default=0)
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return None
    return header if path.stat().st_size == 8 + n + end else None


def weights_fingerprint(path: str | Path) -> str | None:
    """A cheap fingerprint of a model's weight files (a folder of safetensors, or one .gguf):
    sha256 over each file's name, size and header, and 1 KiB at the start, middle and end of
    every tensor (of 64 blocks spread over a GGUF). Two same-shaped models with other weights
    differ; computing it reads a few MB even for 70B models. None when there are no such files."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(path.glob("*.safetensors"))
    if not files:
        return None
    h = hashlib.sha256()
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.name}:{size}:".encode())
        header = safetensors_header(f) if f.suffix == ".safetensors" else None
        if f.suffix == ".safetensors" and header is None:
            raise HarcError(f"{f} is damaged (shorter or longer than its header says); "
                            "download or convert the model again")
        if header is not None:
            h.update(header)
            base = 8 + len(header)
            spans = [(base + a, base + b) for k, v in json.loads(header).items()
                     if k != "__metadata__" for a, b in [v["data_offsets"]]]
        else:
            spans = [(size * i // 64, size * (i + 1) // 64) for i in range(64)]
        with open(f, "rb") as fh:
            for a, b in spans:
                for at in sorted({a, max(a, (a + b) // 2 - 512), max(a, b - 1024)}):
                    fh.seek(at)
                    h.update(fh.read(min(1024, b - at)))
    return "files:" + h.hexdigest()[:32]


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    """Stable hash of a JSON-serialisable object (keys sorted)."""
    return hashlib.sha256(
        json.dumps(obj, sort_keys=True, ensure_ascii=False, default=str).encode()
    ).hexdigest()
