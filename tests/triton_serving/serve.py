"""Serve an `m2a-triton` model repository from a real Triton Inference Server, on the CPU.

Run by the server venv's python (`server_venv.py`), not the project's: it imports only pytriton,
tritonclient's protos and ONNX Runtime. Each model's `config.pbtxt` is parsed with Triton's own
protobuf definition and everything in it that a CPU can honour is served as written: name,
version, tensors and dtypes, max batch size, dynamic batching (preferred sizes, queue delay),
instance count and the `m2anet_*` parameters that `NodeClassifier` reads back. What differs is
the backend line: the config asks for `onnxruntime_onnx` on GPU instances with ONNX Runtime's
TensorRT accelerator, and here pytriton's Python backend runs the same `model.onnx` on ONNX
Runtime's CPU provider, one session per instance.

    python serve.py REPO --ready-file FILE [--grpc-port P --http-port P --metrics-port P]

Ports default to free loopback ports. Once every model is loaded, FILE (written to a temp name and
renamed) holds the ports, the models and the access token as JSON. SIGTERM or SIGINT stops the
server and exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import threading
from pathlib import Path

import numpy as np
import onnxruntime as ort
from google.protobuf import text_format
from pytriton.decorators import batch
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig
from tritonclient.grpc import model_config_pb2 as mc

DTYPES = {mc.TYPE_FP32: np.float32, mc.TYPE_FP16: np.float16}


class ServeError(RuntimeError):
    """The repository cannot be served here; one line naming the model and the problem."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_model(model_dir: Path) -> tuple[mc.ModelConfig, int, Path]:
    """The parsed config, the version Triton would serve (the highest) and its ONNX file."""
    config = text_format.Parse((model_dir / "config.pbtxt").read_text(), mc.ModelConfig())
    if config.platform != "onnxruntime_onnx":
        raise ServeError(
            f"{model_dir.name}: platform {config.platform!r} cannot run here; "
            "write the repository with m2a-triton --format onnx"
        )
    versions = sorted(
        int(p.name) for p in model_dir.iterdir() if p.name.isdigit() and (p / "model.onnx").is_file()
    )
    if not versions:
        raise ServeError(f"{model_dir.name}: no VERSION/model.onnx in {model_dir}")
    return config, versions[-1], model_dir / str(versions[-1]) / "model.onnx"


def tensors(declared) -> list[Tensor]:
    out = []
    for t in declared:
        if t.data_type not in DTYPES:
            raise ServeError(f"tensor {t.name}: data type {mc.DataType.Name(t.data_type)} is not served here")
        out.append(Tensor(name=t.name, dtype=DTYPES[t.data_type], shape=tuple(t.dims)))
    return out


def infer_function(onnx_path: Path, output_names: list[str], threads: int, int8: bool):
    """One ONNX Runtime session per Triton instance, so instances run side by side as on a GPU.

    INT8 takes the exact u8u8 kernel, as m2anet's OrtBackend does: on x64 CPUs without VNNI the
    fused u8s8 convolution overflows its 16-bit sums."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    if int8:
        options.add_session_config_entry("session.x64quantprecision", "1")
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])

    @batch
    def infer(**inputs: np.ndarray) -> dict[str, np.ndarray]:
        return dict(zip(output_names, session.run(output_names, inputs), strict=True))

    return infer


def bind(triton: Triton, model_dir: Path, threads: int) -> dict:
    config, version, onnx_path = read_model(model_dir)
    batching = config.max_batch_size > 0
    batcher = None
    if config.HasField("dynamic_batching"):
        batcher = DynamicBatcher(
            max_queue_delay_microseconds=config.dynamic_batching.max_queue_delay_microseconds,
            preferred_batch_size=list(config.dynamic_batching.preferred_batch_size) or None,
        )
    instances = sum(g.count or 1 for g in config.instance_group) or 1
    outputs = [o.name for o in config.output]
    int8 = config.parameters["m2anet_precision"].string_value == "int8"
    triton.bind(
        model_name=config.name,
        infer_func=[infer_function(onnx_path, outputs, threads, int8) for _ in range(instances)],
        inputs=tensors(config.input),
        outputs=tensors(config.output),
        model_version=version,
        config=ModelConfig(batching=batching, max_batch_size=max(config.max_batch_size, 1), batcher=batcher),
        strict=True,
    )
    parameters = {k: v.string_value for k, v in config.parameters.items()}
    # pytriton's ModelConfig has no user parameters; its generated config carries them as
    # "backend parameters" (beside its own workspace-path), which Triton reports as the model
    # config's `parameters`, exactly where m2a-triton put them.
    (model,) = (m for m in triton._model_manager.models if m.model_name == config.name)
    model._get_triton_model_config().backend_parameters.update(parameters)
    return {
        "version": version,
        "max_batch_size": config.max_batch_size,
        "instances": instances,
        "parameters": parameters,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="serve.py", description=__doc__.splitlines()[0])
    ap.add_argument("repository", type=Path)
    ap.add_argument("--ready-file", type=Path, required=True)
    ap.add_argument("--workspace", type=Path, help="pytriton's workspace (default: a temp folder)")
    ap.add_argument("--grpc-port", type=int, default=0)
    ap.add_argument("--http-port", type=int, default=0)
    ap.add_argument("--metrics-port", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads per instance")
    args = ap.parse_args(argv)
    ports = {k: getattr(args, f"{k}_port") or free_port() for k in ("grpc", "http", "metrics")}
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    config = TritonConfig(
        grpc_address="127.0.0.1",
        grpc_port=ports["grpc"],
        http_address="127.0.0.1",
        http_port=ports["http"],
        metrics_address="127.0.0.1",
        metrics_port=ports["metrics"],
        allow_gpu_metrics=False,
        exit_on_error=True,
    )
    model_dirs = sorted(p.parent for p in args.repository.glob("*/config.pbtxt"))
    if not model_dirs:
        print(f"serve.py: error: no MODEL/config.pbtxt in {args.repository}", file=sys.stderr)
        return 2
    triton = Triton(config=config, workspace=args.workspace)
    try:
        models = {d.name: bind(triton, d, args.threads) for d in model_dirs}
        triton.run()
        # the token opens the endpoints pytriton restricts (statistics, model repository) to the tests
        ready = {"pid": os.getpid(), "ports": ports, "models": models, "token": triton.get_access_token()}
        tmp = args.ready_file.with_name(args.ready_file.name + ".tmp")
        tmp.write_text(json.dumps(ready))
        tmp.replace(args.ready_file)
        while not stop.wait(1.0):
            if not triton.is_alive():
                print("serve.py: error: the Triton server or a model stopped", file=sys.stderr)
                return 1
    except ServeError as e:
        print(f"serve.py: error: {e}", file=sys.stderr)
        return 2
    finally:
        triton.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
