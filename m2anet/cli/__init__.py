"""The `m2a-*` commands: each parses its arguments, calls the library, prints and sets the exit code.

Their console scripts start at the `m2a_*` functions here. A Ctrl-C while a command's module loads numpy,
ONNX Runtime, SimpleITK or torch (the first second or more of a cold start) ended in a traceback and a
death by SIGINT, or, landing inside a compiled extension's initialisation, in "ImportError: initialization
failed". So the import runs with Ctrl-C held back until it is done, and then ends the command with the
same one line and exit 130 as an interrupt of its `main` (`args.interruptible`).
"""

from __future__ import annotations

import functools
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


m2a_train = functools.partial(_launch, "train")
m2a_export = functools.partial(_launch, "export")
m2a_verify = functools.partial(_launch, "verify")
m2a_predict = functools.partial(_launch, "predict")
m2a_triton = functools.partial(_launch, "triton")
m2a_bench = functools.partial(_launch, "bench")
