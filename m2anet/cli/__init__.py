"""The `m2a-*` commands: each parses its arguments, calls the library, prints and sets the exit code.

Their console scripts start at the `m2a_*` functions here. A Ctrl-C while a command's module loads numpy,
ONNX Runtime, SimpleITK or torch (the first second or more of a cold start) ended in a traceback and a
death by SIGINT, or, landing inside a compiled extension's initialisation, in "ImportError: initialization
failed". So the import runs with Ctrl-C held back until it is done, and then ends the command with the
same one line and exit 130 as an interrupt of its `main` (`args.interruptible`).
"""

from __future__ import annotations

import importlib
import signal

from m2anet.cli.args import interrupted


def _launch(command: str) -> int:
    pressed: list[int] = []
    held = signal.getsignal(signal.SIGINT) is signal.default_int_handler  # not where SIGINT is ignored
    if held:
        signal.signal(signal.SIGINT, lambda signum, frame: pressed.append(signum))
    try:
        main = importlib.import_module(f"m2anet.cli.{command}").main
    finally:
        if held:
            signal.signal(signal.SIGINT, signal.default_int_handler)
    if pressed:
        return interrupted(f"m2a-{command}")
    return main()


def m2a_train() -> int:
    return _launch("train")


def m2a_export() -> int:
    return _launch("export")


def m2a_verify() -> int:
    return _launch("verify")


def m2a_predict() -> int:
    return _launch("predict")


def m2a_triton() -> int:
    return _launch("triton")


def m2a_bench() -> int:
    return _launch("bench")
