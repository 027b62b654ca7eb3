"""`harc compare --jobs N`: compare entries in parallel processes on one device. A small model
leaves a GPU launch-bound, so processes sharing it finish the comparison sooner."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def entry_groups(entries: Sequence, only: Sequence[str] | None = None) -> list[list[str]]:
    """The entries to run (those in `only`, or all) in groups that can run in separate processes,
    in config order: an entry whose `init` chain leads to another entry joins that entry's group,
    since training it trains its predecessor first."""
    root: dict[str, str] = {}
    groups: dict[str, list[str]] = {}
    for e in entries:
        root[e.name] = root.get(e.init, e.init) if e.init else e.name
        if only is None or e.name in only:
            groups.setdefault(root[e.name], []).append(e.name)
    return list(groups.values())


def run_groups(groups: list[list[str]], jobs: int, command: list[str], logs: Path,
               log: Callable[[str], None]) -> None:
    """Each group in its own `command --only GROUP` process, `jobs` at a time, appended to
    `logs/<first entry>.log` (a rerun keeps the log of the process that failed before). A failed
    group is only reported: the caller finishes what is left."""
    logs.mkdir(parents=True, exist_ok=True)

    def one(group: list[str]) -> None:
        path = logs / f"{group[0]}.log"
        log(f"starting {', '.join(group)} in its own process ({path})")
        with open(path, "a") as f:
            rc = subprocess.run([*command, "--only", ",".join(group)], stdout=f,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL).returncode
        log(f"{', '.join(group)}: " + ("done" if rc == 0 else
                                       f"exit {rc}; retried by this process, see {path}"))

    with ThreadPoolExecutor(jobs) as pool:
        list(pool.map(one, groups))
