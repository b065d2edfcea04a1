"""Loading and saving weights without pickle: safetensors, or a torch state dict read with
`weights_only=True`. A checkpoint that does not fit the config fails naming the first mismatch.

torch is imported where weights are read or written: the manifest and `NodeClassifier` ask this module
only for paths and records, also where no torch backend runs."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from m2anet.io import atomic_path

if TYPE_CHECKING:
    import torch


class WeightsError(ValueError):
    pass


def shipped_weights(name: str) -> Path:
    return Path(str(resources.files("m2anet") / "weights" / f"{name}.safetensors"))


def training_record(name: str) -> dict:
    """The JSON record written next to the shipped weights by `m2a-train`."""
    return json.loads(shipped_weights(name).with_suffix(".json").read_text(encoding="utf-8"))


def _is_safetensors(path: Path) -> bool:
    """By suffix, or for a file without one by its header: 8 bytes of JSON length, then the JSON."""
    if path.suffix:
        return path.suffix == ".safetensors"
    with open(path, "rb") as f:
        head = f.read(9)
    return (
        len(head) == 9 and 0 < int.from_bytes(head[:8], "little") < path.stat().st_size and head[8:] == b"{"
    )


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    import torch
    from safetensors.torch import load_file

    if not path.is_file():
        raise WeightsError(f"weights file {path} not found: pass an existing .safetensors or .pt file")
    if _is_safetensors(path):
        try:
            return load_file(str(path))
        except Exception as e:  # safetensors raises its own error types for bad headers
            raise WeightsError(f"{path} is not a valid safetensors file ({e}): re-export it") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise WeightsError(
            f"{path} cannot be read as a weights-only torch state dict ({type(e).__name__}): "
            "save it with torch.save(model.state_dict(), path) or as .safetensors"
        ) from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise WeightsError(f"{path} holds a {type(state).__name__}, not a state dict")
    return state


FITTED_AFTER_TRAINING = frozenset({"outline_mean", "outline_std", "outline_weight", "outline_bias"})
"""The outline term that `m2a-train --fit-outline` sets on trained weights: a checkpoint from before it
has none and loads with the model's identity term, computing the logit it was trained and recorded with."""


def load_weights(model: torch.nn.Module, name_or_path: str | Path) -> Path:
    """Load a registered model's shipped weights (by name) or a file; returns the file's path. A file
    wins over a name, and a path without a suffix is still a file (`runs/last` from torch.save)."""
    path = Path(name_or_path)
    if not path.is_file() and not path.suffix and str(name_or_path) == path.name:
        path = shipped_weights(str(name_or_path))
        if not path.is_file():
            raise WeightsError(
                f"no shipped weights for {str(name_or_path)!r} and no file of that name: pass a "
                ".safetensors or .pt file, or train them with m2a-train"
            )
    state = _read_state(path)
    expected = model.state_dict()
    unfitted = FITTED_AFTER_TRAINING & (expected.keys() - state.keys())
    for key, value in expected.items():
        if key in unfitted:
            continue
        if key not in state:
            raise _other_config(path, f"missing key {key!r} (shape {tuple(value.shape)})")
        if tuple(state[key].shape) != tuple(value.shape):
            raise _other_config(
                path, f"{key!r} has shape {tuple(state[key].shape)}, the config expects {tuple(value.shape)}"
            )
    unexpected = [k for k in state if k not in expected and not _decoder_key(k, model)]
    if unexpected:
        raise _other_config(path, f"unexpected key {unexpected[0]!r}")
    if unfitted:
        model.reset_outline()  # type: ignore[operator]  # only M2ANet has these keys
    model.load_state_dict({k: state.get(k, v) for k, v in expected.items()})
    return path


def _other_config(path: Path, mismatch: str) -> WeightsError:
    """The mismatch, and the model to load the checkpoint into where m2a-train recorded it."""
    made_for = None
    if _is_safetensors(path):
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            made_for = (f.metadata() or {}).get("model")
    fix = f" ({made_for}, by its metadata: pass --model {made_for})" if made_for else ""
    return WeightsError(f"{path}: {mismatch}: the checkpoint was made for another config{fix}")


def _decoder_key(key: str, model: torch.nn.Module) -> bool:
    """A classification-only model loads a two-head checkpoint and ignores its decoder."""
    return getattr(model, "heads", "both") == "cls" and key.split(".")[0] in {
        "up4",
        "up3",
        "up2",
        "up1",
        "seg_out",
    }


def save_weights(model: torch.nn.Module, path: str | Path, metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=metadata)
