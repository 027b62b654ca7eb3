"""What the commands share: the typer app, consoles, progress, option types and model loading.

Only light modules are imported here and at the top of the command modules: torch, transformers
and peft take seconds to import, so each command imports the library parts it runs inside its
body, and `harc --help` answers at once.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from typer.core import TyperGroup

from harc.errors import HarcError, UsageError

ORDER = ("run", "extract", "diagnose", "train", "eval", "report", "compare", "merge", "export",
         "serve", "redteam", "judge-check", "data", "fetch-model")


class _Commands(TyperGroup):
    """Lists the commands in the order of the loop, then the tools around it."""

    def list_commands(self, ctx) -> list[str]:
        names = super().list_commands(ctx)
        return sorted(names, key=lambda n: ORDER.index(n) if n in ORDER else len(ORDER))


# Plain help (rich_markup_mode=None): typer's rich help prints a spurious "<bool>" after every
# flag, `--help` included.
app = typer.Typer(cls=_Commands, add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  help="Harmfulness-And-Refusal Coupling: extract, diagnose, train, evaluate, "
                       "report. Exit codes: 1 input or environment, 2 usage, 130 interrupted.")
console = Console(stderr=True)
out = Console()

ModelOpt = Annotated[str, typer.Option(
    "--model", "-m", help="built-in name, local folder, .gguf file or hub id (owner/name, "
    "pinned with owner/name@revision)")]
Overrides = Annotated[list[str] | None, typer.Argument(
    help="config overrides key=value (dots for nesting)")]
DeviceOpt = Annotated[str | None, typer.Option(
    help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")]
DtypeOpt = Annotated[str | None, typer.Option(
    help="float32, bfloat16 or float16 (default: bfloat16 on GPU, float32 on CPU)")]
TrustOpt = Annotated[bool, typer.Option(
    "--trust-remote-code", help="run the model repository's own Python code (only for models "
    "you trust)")]
PLAIN_PROGRESS_EVERY_S = 15.0


def click_exceptions() -> SimpleNamespace:
    """The exception classes of the click that typer runs on: recent typer bundles its own copy
    (`typer._click`, with Abort in `typer.exceptions`), older typer uses the `click` package;
    all of them are caught."""
    import importlib

    mods = []
    for name in ("typer.exceptions", "typer._click.exceptions", "click.exceptions"):
        try:
            mods.append(importlib.import_module(name))
        except ImportError:
            pass

    def classes(attr: str) -> tuple[type, ...]:
        return tuple({getattr(m, attr) for m in mods if hasattr(m, attr)})
    return SimpleNamespace(usage=classes("UsageError"), base=classes("ClickException"),
                           abort=classes("Abort"))


def choice(value: str, allowed: tuple[str, ...], option: str) -> str:
    """`value` if it is one of `allowed`, else a usage error naming the option."""
    if value not in allowed:
        raise UsageError(f"{option} must be one of {', '.join(allowed)}, not {value!r}")
    return value


@contextmanager
def progress_bars():
    """Progress for the library's `progress(description, total) -> advance(n)` callbacks: live
    bars with elapsed time and ETA on a terminal; otherwise (a log file, a pipe) plain lines at
    most every PLAIN_PROGRESS_EVERY_S seconds per task, and one when it ends."""
    if console.is_terminal:
        with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                      console=console) as bars:
            def progress(description: str, total: int) -> Callable[[int], None]:
                task = bars.add_task(description, total=total)
                return lambda n=1: bars.advance(task, n)
            yield progress
    else:
        yield plain_progress


def plain_progress(description: str, total: int) -> Callable[[int], None]:
    """A progress callback that writes plain lines: `desc: 12/48 (25%) 0:31, ETA 1:33`."""
    start = last = time.monotonic()
    done = 0

    def advance(n: int = 1) -> None:
        nonlocal done, last
        done += n
        now = time.monotonic()
        if done < total and now - last < PLAIN_PROGRESS_EVERY_S:
            return
        last = now
        spent = now - start
        if done >= total:
            line = f"{description}: {done}/{total} done in {clock(spent)}"
        else:
            eta = spent / done * (total - done) if done else 0.0
            line = (f"{description}: {done}/{total} ({100 * done // max(total, 1)}%) "
                    f"{clock(spent)}, ETA {clock(eta)}")
        print(line, file=sys.stderr, flush=True)
    return advance


def clock(seconds: float) -> str:
    """m:ss (or h:mm:ss) of a duration."""
    s = int(round(seconds))
    h, m = divmod(s // 60, 60)
    return f"{h}:{m:02d}:{s % 60:02d}" if h else f"{m}:{s % 60:02d}"


def stage_logger() -> Callable[[str], None]:
    """Stage lines with the time since the command started: `[2:14] harc: training ...`."""
    start = time.monotonic()
    return lambda m: console.print(f"[dim]\\[{clock(time.monotonic() - start)}][/] "
                                   f"[bold cyan]harc[/]: {m}", highlight=False)


def quiet_transformers() -> None:
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def writable_output(path: Path, need_mb: int = 50) -> Path:
    """Check, before any model loads, that an output folder can be written and has room."""
    from harc.io import check_writable

    return check_writable(path, need_mb << 20)


def read_json(path: Path, what: str):
    """A JSON file the user gave (or one beside their input), with a one-line error."""
    import json

    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise HarcError(f"{what} {path} is not readable JSON ({str(e).splitlines()[0][:80]})"
                        ) from None


def load_prompts(spec: str, limit: int | None = None) -> list[str]:
    """Prompts from a registry name or a file (JSON, JSON lines, CSV, text: one per line)."""
    from harc.data import load

    path = Path(spec)
    if path.suffix == ".txt":
        if not path.is_file():
            raise HarcError(f"prompt file not found: {path}")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise HarcError(f"{path} is not UTF-8 text (byte {e.start}); save it as UTF-8"
                            ) from None
        prompts = [ln.strip() for ln in text.splitlines() if ln.strip()]
    else:
        prompts = [r["prompt"] for r in load(spec, limit=None)]
    if not prompts:
        raise HarcError(f"{spec} holds no prompts")
    return prompts[:limit] if limit else prompts


def load_quietly(model: str, device: str | None, dtype: str | None,
                 trust_remote_code: bool = False):
    from harc.models import load_model

    quiet_transformers()
    with console.status(f"loading {model}"):
        return load_model(model, device=device, dtype=dtype, trust_remote_code=trust_remote_code)


def chat_format(tok, raw_template: str | None, system_prompt: str | None,
                max_prompt_tokens: int = 256):
    from harc.chat import ChatFormat

    return ChatFormat(tok, raw_template=raw_template, system_prompt=system_prompt,
                      max_prompt_tokens=max_prompt_tokens)
