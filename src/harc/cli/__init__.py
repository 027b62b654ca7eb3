"""The `harc` program: thin commands over the library; every user error is one line.

Exit codes (docs/cli.md): 1 input or environment (`HarcError`, an output folder that cannot be
written, a full disk), 2 usage (a bad command line), 130 interrupted. `HARC_DEBUG=1` shows the
traceback instead.
"""

from __future__ import annotations

import errno
import os
import sys
from collections.abc import Sequence

from rich.text import Text

# Importing the command modules registers their commands on the app; they import torch,
# transformers and peft inside the commands, so `harc --help` stays fast.
from harc.cli import compare, data, directions, evaluate, export, judges, serve, train  # noqa: F401
from harc.cli.common import app, click_exceptions, console
from harc.errors import HarcError

INTERRUPTED = 130


def main(argv: Sequence[str] | None = None) -> None:
    """Run the program; a failure exits with its code (docs/cli.md)."""
    rc = run(argv)
    if rc:
        sys.exit(rc)


def run(argv: Sequence[str] | None = None) -> int:
    """The program as a function: the exit code, every failure reported as one stderr line."""
    exc = click_exceptions()
    debug = os.environ.get("HARC_DEBUG", "").strip() not in ("", "0")
    try:
        rc = app(args=list(argv) if argv is not None else None, standalone_mode=False,
                 prog_name="harc")
    except (KeyboardInterrupt, *exc.abort) as e:
        if isinstance(e, exc.abort) and not isinstance(e.__context__, KeyboardInterrupt):
            # click turns Ctrl-C into Abort (its cause); anything else is the end of input
            if debug:
                raise
            return _fail("aborted (end of input)", 1)
        if debug:
            raise
        return _interrupted()
    except exc.usage as e:
        if debug:
            raise
        return _fail(_usage_line(e), 2)
    except exc.base as e:  # other click errors (a file option that cannot be opened, ...)
        if debug:
            raise
        return _fail(e.format_message(), e.exit_code or 1)
    except HarcError as e:
        if debug:
            raise
        return _fail(str(e), e.exit_code)
    except OSError as e:  # read-only or full output folders, unreadable inputs
        if debug:
            raise
        return _fail(_os_line(e), 1)
    except MemoryError:
        if debug:
            raise
        return _fail("out of memory: lower batch_size (or the set sizes) and run again", 1)
    except Exception as e:
        if type(e).__name__ == "OutOfMemoryError" and not debug:  # torch's, without importing it
            return _fail("out of GPU memory: lower batch_size (or max_prompt_tokens) and run "
                         "again", 1)
        raise
    # Recent typer turns Ctrl-C into a silent exit code 130 instead of raising.
    return _interrupted() if rc == INTERRUPTED else rc if isinstance(rc, int) else 0


def _interrupted() -> int:
    return _fail("interrupted; finished stages, checkpoints and cached generations are kept: "
                 "run the same command again to continue", INTERRUPTED)


def _fail(message: str, code: int) -> int:
    line = " ".join(message.split())  # one line, whatever the message held
    label = ("harc: ", "yellow") if code == INTERRUPTED else ("error: ", "red")
    console.print(Text.assemble(label, line), highlight=False, soft_wrap=True)
    return code


def _usage_line(e) -> str:
    ctx = getattr(e, "ctx", None)
    where = ctx.command_path if ctx is not None else "harc"
    if type(e).__name__ == "NoArgsIsHelpError":
        cmds = ctx.command.list_commands(ctx) if ctx is not None else []
        return (f"missing command: `{where}` takes one of {', '.join(cmds)}; "
                f"`{where} --help` describes them")
    msg = e.format_message().rstrip(".")
    return f"{msg}; `{where} --help` shows the usage"


def _os_line(e: OSError) -> str:
    where = f" ({e.filename})" if e.filename else ""
    if e.errno == errno.ENOSPC:
        return (f"no space left on the device{where}: free some space or choose another output "
                "folder, then run the command again (finished work is kept)")
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return (f"permission denied{where}: choose an output folder you can write to "
                "(--out or output_dir=...)")
    return f"{e.strerror or e}{where}"
