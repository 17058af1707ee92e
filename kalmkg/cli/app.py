"""The `kalmkg` command line: the Typer app, the workspace option every command shares, and `main`, which
turns whatever a command raises into one line and an exit code.

The commands live by group in graph.py, train.py, links.py and offline.py; each imports the heavy parts
of the library inside the command, so `kalmkg --help` stays fast and loads no torch, numpy or store.
"""

from __future__ import annotations

import errno
import logging
import os
import sys
import traceback
from pathlib import Path
from typing import Optional

import typer

from kalmkg.cli import graph, links, offline, runs, train
from kalmkg.cli.options import click_module
from kalmkg.errors import KalmkgError
from kalmkg.workspace import ENV_VAR, Workspace

DEBUG_VAR = "KALMKG_DEBUG"  # =1: unexpected errors (and KalmkgErrors) show their traceback
INTERRUPTED = 130  # the exit code of a process stopped by Ctrl-C, as shells report it
# what `pip install 'kalmkg[train]'` adds (pyproject.toml): train, export, and the torch backends need it
TRAIN_EXTRA = ("torch", "transformers", "peft", "accelerate", "safetensors", "sentencepiece")

app = typer.Typer(
    name="kalmkg",
    help="Make a language model know a knowledge graph.\n\n"
    "Ingest RDF or TSV into a local store, fine-tune an LLM on it with KaLM, predict links by name, "
    "and answer questions offline through llama.cpp.",
    no_args_is_help=True,
    add_completion=True,  # --install-completion / --show-completion for bash, zsh, fish, PowerShell
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _print_version(value: bool) -> None:
    if value:
        from kalmkg import __version__

        typer.echo(f"kalmkg {__version__}")
        raise typer.Exit()


@app.callback()
def _workspace_option(
    ctx: typer.Context,
    workspace: Optional[Path] = typer.Option(
        None, "--workspace", "-w", envvar=ENV_VAR, show_envvar=True,
        help="Workspace folder holding the graph store, runs and models.", show_default="./.kalmkg",
    ),
    debug: bool = typer.Option(False, "--debug", help=f"Show the traceback of an error (as {DEBUG_VAR}=1 does)."),
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                 help="Print kalmkg's version and exit."),
) -> None:
    if debug:
        os.environ[DEBUG_VAR] = "1"  # read by main() when an error leaves the command
    ctx.obj = Workspace.resolve(workspace)


# In the order `kalmkg --help` lists them: the graph, training, links, the offline side.
COMMANDS = (graph.ingest, graph.stats, graph.entities, graph.split, graph.sql, graph.dump, train.train, links.embed, links.predict,
            links.evaluate, offline.export, offline.ask, offline.serve, offline.doctor)
for _command in COMMANDS:
    app.command()(_command)
app.add_typer(runs.app, name="runs")


def _quiet_libraries() -> None:
    """The CLI draws its own progress: silence the ML libraries' bars and advisory warnings."""
    import warnings

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*requires_grad=True to a scalar.*")
    # imported by peft whenever installed, it logs on every AVX512-BF16 CPU that an optional faster
    # 4-bit kernel package is missing: a line in the middle of `predict`'s table
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def _stdout_to_devnull() -> None:
    """After a closed pipe (`kalmkg ... | head`): later writes, and the flush at exit, go nowhere."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):  # stdout is not a file here (a test runner's capture)
        pass


def one_line(exc: BaseException) -> str:
    """An exception's message on one line (some libraries' messages span several)."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


_DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # no space, over quota, over a file size limit


_DISK_FULL_WORDS = ("file write failed", *(os.strerror(e) for e in _DISK_FULL))


def _out_of_disk(exc: BaseException) -> bool:
    """A write the disk refused. Libraries that write from C or Rust say so in words without an errno:
    torch's zip writer ("file write failed"), safetensors ("I/O error: No space left on device")."""
    if isinstance(exc, OSError) and exc.errno is not None:
        return exc.errno in _DISK_FULL
    return any(words in str(exc) for words in _DISK_FULL_WORDS)


def exit_code_for(exc: BaseException, debug: bool = False) -> int:
    """The last resort of `main`: what the user sees for an exception that left a command, and the exit
    code. One line on stderr in every case but the bare `kalmkg` help; a traceback only when `debug`."""
    click = click_module()
    if isinstance(exc, BrokenPipeError) or (isinstance(exc, OSError) and exc.errno == errno.EPIPE):
        _stdout_to_devnull()  # the reader has gone: nothing to tell it
        return 1
    if isinstance(exc, (KeyboardInterrupt, typer.Abort)):  # older click turn Ctrl-C into Abort
        sys.stderr.write("interrupted\n")
        return INTERRUPTED
    if isinstance(exc, getattr(click.exceptions, "NoArgsIsHelpError", ())):  # bare `kalmkg` (click >= 8.2)
        exc.show()
        return 2
    if isinstance(exc, click.exceptions.UsageError):  # a missing argument, a bad option value
        command = exc.ctx.command_path if exc.ctx is not None else "kalmkg"
        sys.stderr.write(f"error: {exc.format_message()} (see `{command} --help`)\n")
        return 1
    if isinstance(exc, click.exceptions.ClickException):
        sys.stderr.write(f"error: {exc.format_message()}\n")
        return 1
    if debug:
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
    if isinstance(exc, KalmkgError):
        sys.stderr.write(f"error: {exc}\n")
    elif isinstance(exc, ModuleNotFoundError) and (exc.name or "").split(".")[0] in TRAIN_EXTRA:
        sys.stderr.write(f"error: this command needs kalmkg's training libraries (no module {exc.name!r} here): "
                         "pip install 'kalmkg[train]'\n")
    elif _out_of_disk(exc):
        where = f" writing {exc.filename}" if getattr(exc, "filename", None) else ""
        sys.stderr.write(f"error: out of disk space{where} ({one_line(exc)}); what was written before is kept "
                         "whole: free some space and run the command again\n")
    else:
        sys.stderr.write(f"error: unexpected {one_line(exc)}"
                         f"{'' if debug else f' (run with {DEBUG_VAR}=1 for the traceback)'}\n")
    return 1


def main() -> None:
    _quiet_libraries()
    try:
        code = app(standalone_mode=False)
        sys.stdout.flush()  # a closed pipe shows here, not as a traceback at interpreter exit
    except (Exception, KeyboardInterrupt) as exc:  # SystemExit passes: rich and click have said all
        code = exit_code_for(exc, debug=os.environ.get(DEBUG_VAR) == "1")
    else:
        if code == INTERRUPTED:  # recent typer turn Ctrl-C into this exit code, silently
            sys.stderr.write("interrupted\n")
    sys.exit(code if isinstance(code, int) else 0)
