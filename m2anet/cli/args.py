"""What every `m2a-*` command shares: its parser (no abbreviations, a real `--version`), argument
types that refuse bad numbers and unusable output folders while parsing, and Ctrl-C as one line.

A number is checked by its type, not after parsing, so every flag gets the same one-line error
naming it (`m2a-predict: error: argument --threshold: 'nan' is not a number between 0 and 1`) and
no value can slip past a check that was forgotten. argparse's own prefix matching is off: it turned
`m2a-export --version` into `--version-compatible` and ran an export.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path

from m2anet import __version__

INTERRUPTED = 130
"""Exit status after Ctrl-C, as shells report a process ended by SIGINT (128 + 2)."""


def make_parser(prog: str, doc: str | None) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description=(doc or "").splitlines()[0], allow_abbrev=False)
    ap.add_argument("--version", action="version", version=f"{prog} {__version__}")
    return ap


def _number(kind: type, text: str, ok: Callable[[float], bool], what: str) -> float:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
    if not (math.isfinite(value) and ok(value)):
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
    return value


def int_at_least(low: int) -> Callable[[str], int]:
    """An integer type with a lower bound: `--n` needs 2 nodes for an AUC, `--batch` 2 for BatchNorm."""

    def parse(text: str) -> int:
        return int(_number(int, text, lambda v: v >= low, f"an integer >= {low}"))

    parse.__name__ = f"int_at_least_{low}"
    return parse


positive_int = int_at_least(1)
non_negative_int = int_at_least(0)


def positive_float(text: str) -> float:
    return _number(float, text, lambda v: v > 0, "a finite number > 0")


def non_negative_float(text: str) -> float:
    return _number(float, text, lambda v: v >= 0, "a finite number >= 0")


def probability(text: str) -> float:
    """A decision threshold: 0 and 1 would call every node one class, NaN would call none metastatic."""
    return _number(float, text, lambda v: 0 < v < 1, "a number between 0 and 1 (exclusive)")


def output_dir(text: str) -> Path:
    """A folder that exists or can be made: a file in its path is refused before any work is done."""
    path = Path(text)
    existing = next((p for p in (path, *path.parents) if p.exists()), Path("."))
    if not existing.is_dir():
        what = "is a file" if existing == path else f"cannot be made: {existing} is a file"
        raise argparse.ArgumentTypeError(f"{text} {what}: give a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"{text}: no permission to write in {existing}")
    return path


def interrupted(prog: str) -> int:
    """The one line of an interrupted `prog`, and its exit status."""
    print(f"{prog}: interrupted (Ctrl-C); no file was left half-written", file=sys.stderr)
    return INTERRUPTED


def interruptible(prog: str) -> Callable[[Callable[..., int]], Callable[..., int]]:
    """Ctrl-C ends `main` with one line and exit 130 instead of a traceback; whatever the command had
    finished is already on disk (every file is written atomically)."""

    def wrap(main: Callable[..., int]) -> Callable[..., int]:
        @functools.wraps(main)
        def run(argv: list[str] | None = None) -> int:
            try:
                return main(argv)
            except KeyboardInterrupt:
                return interrupted(prog)

        return run

    return wrap
