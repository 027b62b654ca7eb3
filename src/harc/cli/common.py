"""What the commands share: the typer app, consoles, progress bars and model loading."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from harc.chat import ChatFormat
from harc.data import load
from harc.errors import HarcError
from harc.models import load_model

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Harmfulness-And-Refusal Coupling: extract, diagnose, train, evaluate, report.")
console = Console(stderr=True)
out = Console()

ModelOpt = Annotated[str, typer.Option("--model", "-m", help="built-in name, local folder, .gguf file or hub id")]
Overrides = Annotated[list[str] | None, typer.Argument(help="config overrides key=value (dots for nesting)")]


@contextmanager
def progress_bars():
    """Rich progress bars; yields `progress(description, total) -> advance(n)`, the callback
    shape the library takes, one bar per call."""
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console) as bars:
        def progress(description: str, total: int) -> Callable[[int], None]:
            task = bars.add_task(description, total=total)
            return lambda n=1: bars.advance(task, n)
        yield progress


def quiet_transformers() -> None:
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def load_prompts(spec: str, limit: int | None = None) -> list[str]:
    """Prompts from a registry name or a file (JSON, JSON lines, CSV, text: one per line)."""
    path = Path(spec)
    if path.suffix == ".txt":
        if not path.is_file():
            raise HarcError(f"prompt file not found: {path}")
        prompts = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
    else:
        prompts = [r["prompt"] for r in load(spec, limit=None)]
    if not prompts:
        raise HarcError(f"{spec} holds no prompts")
    return prompts[:limit] if limit else prompts


def load_quietly(model: str, device: str | None, dtype: str | None,
                 trust_remote_code: bool = False):
    quiet_transformers()
    with console.status(f"loading {model}"):
        return load_model(model, device=device, dtype=dtype, trust_remote_code=trust_remote_code)


def chat_format(tok, raw_template: str | None, system_prompt: str | None,
                max_prompt_tokens: int = 256) -> ChatFormat:
    return ChatFormat(tok, raw_template=raw_template, system_prompt=system_prompt,
                      max_prompt_tokens=max_prompt_tokens)
