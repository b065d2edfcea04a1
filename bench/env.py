"""Where a benchmark ran: without the machine, driver, library versions and threads beside them,
two reports cannot be compared and a number cannot be reproduced."""

from __future__ import annotations

import datetime
import os
import platform
from typing import Any

import onnxruntime
import torch

from m2anet.engines.environment import cpu_model, driver_version, git_commit, library_versions


def capture(ort_threads: int | None) -> dict[str, Any]:
    env: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "os": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": {
            "torch": torch.get_num_threads(),
            "onnxruntime": ort_threads or "default (one per physical core)",
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        },
        "libraries": library_versions(),
        "onnxruntime_providers": onnxruntime.get_available_providers(),
        "git": git_commit(),
        "gpus": [],
    }
    if torch.cuda.is_available():
        env["cuda"] = torch.version.cuda
        env["cudnn"] = torch.backends.cudnn.version()
        env["driver"] = driver_version()
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            env["gpus"].append(
                {
                    "name": p.name,
                    "compute_capability": f"{p.major}.{p.minor}",
                    "memory_gib": round(p.total_memory / 2**30, 1),
                    "multiprocessors": p.multi_processor_count,
                }
            )
    return env
