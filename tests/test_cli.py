"""What every m2a-* command shares: numbers and output folders checked by the parser, no abbreviated
flags, a real --version, and one line (exit 2) instead of a traceback for bad input.

Each case here ran (or crashed with a traceback, or ran the wrong command) before the shared
parser of m2anet.cli.args; none of them needs an export.
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch

from m2anet import __version__
from m2anet.cli import bench, export, predict, train, triton, verify

CLIS = {
    "m2a-bench": bench,
    "m2a-export": export,
    "m2a-predict": predict,
    "m2a-train": train,
    "m2a-triton": triton,
    "m2a-verify": verify,
}


def _exit(main, argv) -> int:
    try:
        return main(argv)
    except SystemExit as e:  # argparse ends parse errors and --version this way
        return int(e.code or 0)


def _errors(capsys, prog: str) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith(f"{prog}: error:")]


BAD_NUMBERS = [
    ("m2a-predict", ["--demo", "--threshold", "nan"], "--threshold"),
    ("m2a-predict", ["--demo", "--threshold", "5"], "--threshold"),
    ("m2a-predict", ["--demo", "--threshold", "0"], "--threshold"),
    ("m2a-predict", ["--demo", "--max-batch", "0"], "--max-batch"),
    ("m2a-bench", ["--warmup", "-5"], "--warmup"),
    ("m2a-bench", ["--warmup", "inf"], "--warmup"),
    ("m2a-bench", ["--duration", "-1"], "--duration"),
    ("m2a-bench", ["--duration", "nan"], "--duration"),
    ("m2a-bench", ["--threads", "0"], "--threads"),
    ("m2a-bench", ["--copy-mib", "-1"], "--copy-mib"),
    ("m2a-bench", ["--matmul-size", "-8"], "--matmul-size"),
    ("m2a-bench", ["--min-queries", "0"], "--min-queries"),
    ("m2a-bench", ["--study-nodes", "0"], "--study-nodes"),
    ("m2a-bench", ["--batches", "1,-2"], "--batches"),
    ("m2a-bench", ["--compare", "a", "b", "--threshold", "nan"], "--threshold"),
    ("m2a-verify", ["torch:cpu", "--stress-batch", "-3"], "--stress-batch"),
    ("m2a-verify", ["torch:cpu", "--n", "1"], "--n"),
    ("m2a-verify", ["torch:cpu", "--threshold", "nan"], "--threshold"),
    ("m2a-verify", ["torch:cpu", "--threshold", "1"], "--threshold"),
    ("m2a-verify", ["torch:cpu", "--seed", "-1"], "--seed"),
    ("m2a-export", ["--threads", "0"], "--threads"),
    ("m2a-export", ["--threshold", "5"], "--threshold"),
    ("m2a-export", ["--parity-nodes", "0"], "--parity-nodes"),
    ("m2a-export", ["--calib-size", "-4"], "--calib-size"),
    ("m2a-export", ["--opt-level", "9"], "--opt-level"),
    ("m2a-export", ["--batch", "4,2,1"], "--batch"),
    ("m2a-triton", ["FOLDER", "--out", "repo", "--queue-delay-us", "-1"], "--queue-delay-us"),
    ("m2a-triton", ["FOLDER", "--out", "repo", "--instances", "0"], "--instances"),
    ("m2a-train", ["--epochs", "0"], "--epochs"),
    ("m2a-train", ["--lr", "-1"], "--lr"),
    ("m2a-train", ["--lr", "nan"], "--lr"),
    ("m2a-train", ["--batch", "1"], "--batch"),
    ("m2a-train", ["--n-train", "0"], "--n-train"),
    ("m2a-train", ["--max-minutes", "-2"], "--max-minutes"),
    ("m2a-train", ["--seed", "x"], "--seed"),
]


@pytest.mark.parametrize(("prog", "argv", "flag"), BAD_NUMBERS, ids=[" ".join(c[1]) for c in BAD_NUMBERS])
def test_bad_numbers_are_refused_by_the_parser(tmp_path, monkeypatch, capsys, prog, argv, flag):
    monkeypatch.chdir(tmp_path)  # nothing may be written: the parser refuses before any work
    assert _exit(CLIS[prog].main, argv) == 2
    errors = _errors(capsys, prog)
    assert len(errors) == 1 and f"argument {flag}" in errors[0], errors
    assert list(tmp_path.iterdir()) == []


def test_fitting_the_outline_term_needs_trained_weights(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert _exit(train.main, ["--fit-outline"]) == 2
    errors = _errors(capsys, "m2a-train")
    assert len(errors) == 1 and "give them with --init" in errors[0], errors
    assert list(tmp_path.iterdir()) == []


def test_layer_profiles_are_refused_under_the_server_scenario(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert _exit(bench.main, ["--scenario", "server", "--layers"]) == 2
    errors = _errors(capsys, "m2a-bench")
    assert len(errors) == 1 and "--layers" in errors[0] and "drop one" in errors[0], errors
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("prog", CLIS)
def test_version_prints_the_version_and_runs_nothing(tmp_path, monkeypatch, capsys, prog):
    monkeypatch.chdir(tmp_path)
    assert _exit(CLIS[prog].main, ["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"{prog} {__version__}"
    assert list(tmp_path.iterdir()) == []  # m2a-export --version once ran --version-compatible


@pytest.mark.parametrize(
    ("prog", "argv"),
    [
        ("m2a-export", ["--version-c"]),  # a prefix of --version-compatible
        ("m2a-export", ["--precis", "fp32"]),
        ("m2a-bench", ["--dur", "1"]),
        ("m2a-predict", ["--dem"]),
        ("m2a-verify", ["torch:cpu", "--diag"]),
    ],
)
def test_abbreviated_flags_are_refused(tmp_path, monkeypatch, capsys, prog, argv):
    monkeypatch.chdir(tmp_path)
    assert _exit(CLIS[prog].main, argv) == 2
    (error,) = _errors(capsys, prog)
    assert "unrecognized arguments" in error and argv[-1 if prog != "m2a-export" else 0] in error
    assert list(tmp_path.iterdir()) == []


def _file(tmp_path):
    path = tmp_path / "a-file"
    path.write_text("not a folder")
    return path


@pytest.mark.parametrize(
    ("prog", "argv", "flag"),
    [
        ("m2a-export", ["--out", "{file}"], "--out"),
        ("m2a-export", ["--out", "{file}/sub"], "--out"),  # NotADirectoryError before
        ("m2a-predict", ["--demo", "--out", "{file}/sub"], "--out"),
        ("m2a-verify", ["torch:cpu", "--report", "{file}"], "--report"),  # FileExistsError after the run
        ("m2a-bench", ["--out", "{file}"], "--out"),
        ("m2a-triton", ["FOLDER", "--out", "{file}/repo"], "--out"),
        ("m2a-train", ["--out", "{file}"], "--out"),
    ],
)
def test_an_output_folder_blocked_by_a_file_is_refused_before_any_work(tmp_path, capsys, prog, argv, flag):
    """Tests run as root, where no folder is unwritable: a file in the path is what blocks here."""
    file = _file(tmp_path)
    argv = [a.format(file=file) for a in argv]
    assert _exit(CLIS[prog].main, argv) == 2
    (error,) = _errors(capsys, prog)
    assert f"argument {flag}" in error and "is a file" in error
    assert file.read_text() == "not a folder"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_torch_cuda_without_cuda_is_one_line_naming_the_fix(capsys):
    code = verify.main(["torch:cuda", "--model", "m2anet_small", "--n", "4", "--no-stress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("m2a-verify: error: cuda cannot run here") and "torch:cpu" in err[0]


@pytest.mark.parametrize("prog", ["m2a-verify", "m2a-bench"])
def test_a_mistyped_backend_option_is_one_line_naming_the_options(tmp_path, capsys, prog):
    """Before, m2a-verify ended in the runner's TypeError traceback, and m2a-bench measured the other
    backends first and then reported this one as failed."""
    spec = "torch:cpu@chanels_last=false"
    out = tmp_path / "out"
    argv = (
        [spec, "--report", str(out)]
        if prog == "m2a-verify"
        else ["--backend", "torch:cpu", spec, "--out", str(out)]
    )
    assert CLIS[prog].main([*argv, "--model", "m2anet_small"]) == 2
    (error,) = _errors(capsys, prog)
    assert "has no option 'chanels_last'" in error and " channels_last," in error
    assert not out.exists()


@pytest.mark.parametrize(
    ("prog", "where", "argv"),
    [
        ("m2a-predict", "write_study", ["--demo", "--out", "{tmp}"]),
        ("m2a-export", "export_artifacts", ["--out", "{tmp}"]),
        ("m2a-verify", "verify", ["torch:cpu"]),
        ("m2a-bench", "run_bench", ["--out", "{tmp}"]),
        ("m2a-triton", "write_repository", ["{tmp}", "--out", "{tmp}/repo"]),
        ("m2a-train", "train", ["--out", "{tmp}"]),
    ],
)
def test_ctrl_c_is_one_line_and_exit_130(tmp_path, monkeypatch, capsys, prog, where, argv):
    """Ctrl-C at the first step of each command (m2a-bench's own partial-report line: test_bench)."""

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(CLIS[prog], where, interrupted)
    assert CLIS[prog].main([a.format(tmp=tmp_path) for a in argv]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"{prog}: interrupted (Ctrl-C); no file was left half-written"]


LOADING = """
import os, signal, sys
# as in a terminal: xdist's workers, and so their children, start with SIGINT ignored, which the
# launcher leaves alone (a background job's Ctrl-C is not its own)
signal.signal(signal.SIGINT, signal.default_int_handler)
class Interrupt:  # a real Ctrl-C while the command's dependencies load: numpy is among every command's
    def find_spec(self, name, path=None, target=None):
        if name == "numpy":
            os.kill(os.getpid(), signal.SIGINT)
sys.meta_path.insert(0, Interrupt())
import m2anet.cli
sys.exit(getattr(m2anet.cli, sys.argv[1])())
"""


def test_every_console_script_starts_at_its_launcher():
    scripts = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {prog: f"m2anet.cli:{prog.replace('-', '_')}" for prog in CLIS}


def test_ctrl_c_while_the_command_loads_is_one_line_and_exit_130():
    """Half a second into m2a-predict the interrupt came during its imports: a traceback and a death by
    SIGINT (exit -2), or "ImportError: initialization failed" inside ONNX Runtime's extension (exit 1).
    Every console script starts at a launcher like this one (the test above)."""
    run = subprocess.run(
        [sys.executable, "-c", LOADING, "m2a_predict"], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 130, run.stderr[-2000:]
    assert run.stderr.splitlines() == ["m2a-predict: interrupted (Ctrl-C); no file was left half-written"]


def test_training_threshold_rule_is_checked_before_any_work(tmp_path, monkeypatch, capsys):
    """Accuracy on val by default (issue 14); an unknown rule is refused by the parser, and by `train`
    before it generates a single node."""
    from m2anet import train as training

    monkeypatch.chdir(tmp_path)
    assert _exit(train.main, ["--threshold-rule", "median"]) == 2
    assert "--threshold-rule" in _errors(capsys, "m2a-train")[0]
    assert train.parser().parse_args([]).threshold_rule == "accuracy"
    monkeypatch.setattr(training, "load_split", lambda *a, **k: pytest.fail("generated nodes"))
    with pytest.raises(ValueError, match="threshold rule 'median': choose one of accuracy, youden"):
        training.train("m2anet_small", 1, threshold_rule="median")
