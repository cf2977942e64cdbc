"""The ``medseg`` command line: a thin typed layer over the library.

Each command calls one API function. Any :class:`~medseg.errors.MedsegError` becomes a one-line
message on stderr and exit code 2 (``--debug`` shows the traceback).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import typer
from rich.console import Console

from medseg.errors import MedsegError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Self-configuring medical image segmentation.")
console = Console(stderr=True)
_state = {"debug": False}


@app.callback()
def _main(debug: bool = typer.Option(False, "--debug", help="Show tracebacks and debug logs.")) -> None:
    _state["debug"] = debug
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, format="%(message)s")


@app.command()
def check(dataset: Path = typer.Argument(..., help="Dataset folder (MSD, nnU-Net v2 or imagesTr/+labelsTr/).")) -> None:
    """Check a dataset: geometry, labels, channels, NaN/Inf, missing files. Exit 2 on any problem."""
    from medseg.io.check import check_dataset
    from medseg.io.dataset import load_dataset

    ds = load_dataset(dataset)
    for note in ds.notes:
        console.print(f"[yellow]note:[/] {note}")
    problems = check_dataset(ds)
    if problems:
        for p in problems:
            print(p, file=sys.stderr)
        raise typer.Exit(2)
    console.print(f"[green]ok[/]: {len(ds.cases)} cases, {ds.num_channels} channel(s), labels {sorted(ds.labels)}")


def main() -> None:
    try:
        rc = app(standalone_mode=False)
    except MedsegError as exc:
        if _state["debug"]:
            raise
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        sys.exit(130)
    except Exception as exc:  # click usage errors
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        raise
    if isinstance(rc, int) and rc:
        sys.exit(rc)


if __name__ == "__main__":
    main()
