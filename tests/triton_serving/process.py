"""A real Triton Inference Server as a subprocess of the tests: start, wait, crash, stop.

The server is `serve.py` under the server venv's python; it starts `tritonserver`, which starts
one Python backend stub per model instance. All of them run in a process group of their own, so a
stop or a simulated crash reaches every one and leaves no orphan, whatever state the server is in.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

SERVE = Path(__file__).with_name("serve.py")


class ServerError(RuntimeError):
    """The server did not come up; the message ends with the last lines of its log."""


class TritonProcess:
    """One server on loopback ports; `start` after `kill` serves again on the same ports."""

    def __init__(self, python: Path, repository: Path, workdir: Path, threads: int = 1) -> None:
        self.python, self.repository, self.workdir, self.threads = python, repository, workdir, threads
        self.ports: dict[str, int] = {}
        self.info: dict = {}
        self.starts = 0
        self._proc: subprocess.Popen | None = None

    def url(self, model: str, protocol: str = "grpc") -> str:
        """A `triton:` backend spec for one served model."""
        return f"triton:{protocol}://127.0.0.1:{self.ports[protocol]}/{model}"

    @property
    def log(self) -> Path:
        return self.workdir / f"server-{self.starts}.log"

    def start(self, timeout_s: float = 180) -> None:
        """Start and wait until every model is loaded; ports are kept across restarts."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.starts += 1
        ready = self.workdir / f"ready-{self.starts}.json"
        command = [str(self.python), str(SERVE), str(self.repository), "--ready-file", str(ready)]
        command += [
            "--workspace",
            str(self.workdir / f"workspace-{self.starts}"),
            "--threads",
            str(self.threads),
        ]
        for name, port in self.ports.items():
            command += [f"--{name}-port", str(port)]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # the log ends where the server stopped
        with open(self.log, "wb") as log:
            self._proc = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        deadline = time.monotonic() + timeout_s
        while not ready.is_file():
            if self._proc.poll() is not None:
                self._reap()
                raise ServerError(
                    f"the Triton server exited with status {self._proc.returncode}: {self._tail()}"
                )
            if time.monotonic() > deadline:
                self.kill()
                raise ServerError(f"the Triton server was not ready after {timeout_s:.0f} s: {self._tail()}")
            time.sleep(0.2)
        self.info = json.loads(ready.read_text())
        self.ports = self.info["ports"]

    def kill(self) -> None:
        """A crash: SIGKILL to every process of the server at once, no shutdown of any kind."""
        if self._proc is not None:
            leftovers = self._leftovers()
            self._signal_group(signal.SIGKILL)
            self._proc.wait()
            self._reap(leftovers)

    def stop(self, timeout_s: float = 60) -> None:
        """A clean shutdown (SIGTERM: models unloaded, shared memory freed), else a kill."""
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(timeout_s)
        self.kill()

    def _signal_group(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):  # the group outlives its leader while one is left
            os.killpg(self._proc.pid, sig)

    def _leftovers(self) -> set[Path]:
        """What a killed server cannot remove: the /dev/shm files its processes have mapped (the
        Python backend's regions, pytriton's tensor buffers) and each model's copy of pytriton's
        proxy, which tritonserver unpacks into a temp folder of its own."""
        found = set()
        for proc in Path("/proc").glob("[0-9]*"):
            try:
                if int((proc / "stat").read_text().rpartition(")")[2].split()[2]) != self._proc.pid:
                    continue
                maps = (proc / "maps").read_text()
                argv = (proc / "cmdline").read_bytes().decode(errors="replace").split("\0")
            except (OSError, ValueError, IndexError):  # gone meanwhile, or not ours to read
                continue
            found |= {Path(line.split(maxsplit=5)[5]) for line in maps.splitlines() if " /dev/shm/" in line}
            if argv[0].endswith("triton_python_backend_stub") and argv[1:] and argv[1].endswith("/model.py"):
                found.add(Path(argv[1]).parents[1])  # FOLDER/VERSION/model.py
        return found

    def _reap(self, leftovers: set[Path] = frozenset()) -> None:
        """Anything of the group still running is killed, and what a crashed server left behind is
        removed (pytriton names the backend's shared memory after serve.py's pid)."""
        self._signal_group(signal.SIGKILL)
        for path in {*leftovers, *Path("/dev/shm").glob(f"pytrtion{self._proc.pid}-*")}:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)

    def _tail(self, lines: int = 5) -> str:
        text = self.log.read_text(errors="replace").strip().splitlines() if self.log.is_file() else []
        return " | ".join(text[-lines:]) or "no output"
