"""Command line: one module per command group parses its arguments, calls :mod:`autocomp.api` and
prints the result (:mod:`autocomp.cli.printing`); this module builds the parser and maps errors to
exit codes.

Commands: ``search``, ``worker`` (:mod:`autocomp.cli.search`); ``pareto``, ``recommend``, ``validate``,
``report``, ``dashboard`` (:mod:`autocomp.cli.read`); ``compress``, ``measure``, ``export``
(:mod:`autocomp.cli.models`); ``llamacpp quantize``, ``llamacpp score`` (:mod:`autocomp.cli.llamacpp`); ``spaces``, ``cache`` (:mod:`autocomp.cli.admin`). Shared argument
groups live in :mod:`autocomp.cli.options`.

Exit codes: 0 success; 2 a user error (named :class:`~autocomp.errors.AutocompError`, printed as one
line ``autocomp: error: ...``, no traceback); 3 ``recommend`` found nothing feasible; 130 interrupted.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from autocomp._version import __version__
from autocomp.cli.read import EXIT_NOTHING_FEASIBLE
from autocomp.errors import AutocompError, disk_write_failure

__all__ = ["EXIT_NOTHING_FEASIBLE", "build_parser", "main"]


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line (``autocomp: error: ...``, exit 2), like
    every other user error; ``--help`` still prints the full usage."""

    def error(self, message: str):
        self.exit(2, f"autocomp: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    """The ``autocomp`` parser; every sub-command sets ``func(args) -> exit code``."""
    from autocomp.cli import admin, llamacpp, models, read, search

    parser = OneLineParser(prog="autocomp", description="Automated compression search for causal LMs.")
    parser.add_argument("--version", action="version", version=f"autocomp {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for group in (search, read, models, llamacpp, admin):  # the order `autocomp --help` lists them in
        group.add_parser(sub)
    return parser


def _quiet_libraries() -> None:
    """Quiet the libraries' own progress bars and advisories; autocomp draws its own trial bar."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if "transformers" in sys.modules:  # already imported (called in-process): the env vars came too late
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns its exit code (argparse itself exits 2 on a malformed command line)."""
    _quiet_libraries()
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except AutocompError as exc:
        print(f"autocomp: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("autocomp: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `autocomp pareto --json | head`
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except Exception as exc:  # a full disk surfaces through many libraries; anything else is a bug
        reason = disk_write_failure(exc)
        if reason is None:
            raise
        print(f"autocomp: error: write failed ({reason}): free disk space or raise the file-size limit, then run "
              "the same command again (finished trials are kept)", file=sys.stderr)
        return 2
