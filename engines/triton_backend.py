"""Client of a Triton Inference Server that serves an M2ANet repository written by `m2a-triton`.

`triton:grpc://HOST:8001[/MODEL]` or `triton:http://HOST:8000[/MODEL]` (no scheme: HTTP; no
model: `m2anet`). The server's model config supplies the batch limit, tensor dtypes and what
`m2a-triton` recorded in its parameters (artifact sha256, precision, threshold). Like the
tritonclient objects it holds, one instance is not meant to be used by several threads at once.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import numpy as np

from m2anet.engines.base import INPUT_NAMES, OUTPUT_NAMES, Backend
from m2anet.optional import lazy_import

_INSTALL = "pip install 'tritonclient[grpc,http]'"
CLIENTS = {
    "grpc": lazy_import("tritonclient.grpc", _INSTALL),
    "http": lazy_import("tritonclient.http", _INSTALL),
    "https": lazy_import("tritonclient.http", _INSTALL),
}

DEFAULT_MODEL = "m2anet"
_NUMPY = {"FP32": np.float32, "FP16": np.float16}


class TritonBackend(Backend):
    name = "triton"

    def __init__(
        self, url: str, model_name: str | None = None, model_version: str = "", timeout_s: float = 60.0
    ) -> None:
        parts = urlsplit(url if "://" in url else f"http://{url}")
        if parts.scheme not in ("http", "https", "grpc") or not parts.netloc:
            raise ValueError(f"Triton URL {url!r}: use grpc://HOST:8001 or http://HOST:8000[/MODEL]")
        self.model_name = model_name or parts.path.strip("/") or DEFAULT_MODEL
        self.model_version = model_version
        self.url = f"{parts.scheme}://{parts.netloc}/{self.model_name}"
        client_lib = CLIENTS[parts.scheme]
        if parts.scheme == "grpc":
            self._client: Any = client_lib.InferenceServerClient(url=parts.netloc)
        else:
            self._client = client_lib.InferenceServerClient(
                url=parts.netloc, ssl=parts.scheme == "https", network_timeout=timeout_s
            )
        self._lib = client_lib
        try:
            live = self._client.is_server_live()
            ready = live and self._client.is_model_ready(self.model_name, model_version)
            # a real server answers NOT_FOUND for the config of a model it does not serve: ask only when ready
            as_json = {"as_json": True} if parts.scheme == "grpc" else {}  # HTTP always answers JSON
            config = self._client.get_model_config(self.model_name, model_version, **as_json) if ready else {}
        except Exception as e:  # connection errors come as gevent, grpc or tritonclient exceptions
            self.close()
            why = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
            raise RuntimeError(f"Triton server at {url} cannot be used ({why}): is it running?") from None
        if not ready:
            self.close()
            raise RuntimeError(f"model {self.model_name!r} is not ready on the Triton server at {url}")
        config = config.get("config", config)  # gRPC wraps the config, HTTP does not
        self.max_batch = int(config.get("max_batch_size", 0)) or None
        self._dtypes = {i["name"]: i["data_type"].removeprefix("TYPE_") for i in config.get("input", [])}
        served = {o["name"] for o in config.get("output", [])}
        if sorted(self._dtypes) != sorted(INPUT_NAMES) or "met_logit" not in served:
            self.close()
            raise RuntimeError(
                f"model {self.model_name!r} on {url} has inputs {sorted(self._dtypes)} and outputs "
                f"{sorted(served)}, not M2ANet's: serve a repository written by m2a-triton"
            )
        self.outputs = tuple(n for n in OUTPUT_NAMES if n in served)
        self.parameters: dict[str, str] = {
            k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()
        }
        self.precision = self.parameters.get("m2anet_precision", "unknown")
        self.device = self.url

    def _run(self, ct: np.ndarray, mask: np.ndarray, outputs: tuple[str, ...]) -> tuple[np.ndarray, ...]:
        inputs = []
        for name, array in (("ct", ct), ("mask", mask)):
            dtype = self._dtypes[name]
            tensor = self._lib.InferInput(name, list(array.shape), dtype)
            tensor.set_data_from_numpy(np.ascontiguousarray(array, dtype=_NUMPY[dtype]))
            inputs.append(tensor)
        wanted = [self._lib.InferRequestedOutput(n) for n in outputs]
        result = self._client.infer(self.model_name, inputs, model_version=self.model_version, outputs=wanted)
        return tuple(np.asarray(result.as_numpy(n), dtype=np.float32) for n in outputs)

    def close(self) -> None:
        client = self.__dict__.pop("_client", None)
        if client is not None:
            client.close()
