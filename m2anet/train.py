"""Training a config on the synthetic cohort: weights plus a training record (`m2a-train`).

Seeded and deterministic on the CPU (same seed, same thread count -> same weights), unless
`--max-minutes` cuts the run short. On CUDA it trains in bf16 autocast and channels-last (NDHWC),
faster and not bitwise reproducible; validation and test run in IEEE FP32 on either device.
"""

from __future__ import annotations

import contextlib
import json
import math
import platform
import sys
import time
from pathlib import Path
from typing import Any, TypedDict, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from m2anet.data import FRESH_NODES, FRESH_SEED, GENERATOR_VERSION, SIGN_NAMES, Cohort, load_split
from m2anet.engines.torch_backend import channels_last, cuda_math
from m2anet.io import atomic_path, sha256_file
from m2anet.metrics import accuracy_threshold, binary_metrics, dice, roc_auc, sigmoid, youden_threshold
from m2anet.model import ContourOutline, M2ANet, config_dict, create_model
from m2anet.preprocess import short_axis_mm
from m2anet.weights import FITTED_AFTER_TRAINING


class TrainRecipe(TypedDict):
    """One device's recipe in TRAIN_DEFAULTS."""

    batch: int
    lr: float
    precision: str


TRAIN_DEFAULTS: dict[str, TrainRecipe] = {
    "cpu": {"batch": 8, "lr": 2e-3, "precision": "fp32"},
    "cuda": {"batch": 32, "lr": 4e-3, "precision": "bf16"},
}
"""The recipe per device. The shipped weights were trained on the CPU at batch 8, lr 2e-3; a GPU is fed
batch 32, and Adam's learning rate is scaled with the square root of the batch: 2e-3 x sqrt(4) = 4e-3."""


class TrainDevice:
    """Where training runs and in what: the CPU in FP32 and NCDHW, or CUDA in `precision` (bf16 autocast by
    default, which needs no loss scaling) with weights and inputs channels-last."""

    def __init__(self, device: str = "cpu", precision: str | None = None) -> None:
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        if self.cuda and not torch.cuda.is_available():
            raise ValueError(f"--device {device}: torch sees no CUDA GPU here; train with --device cpu")
        self.precision = precision or TRAIN_DEFAULTS[self.device.type]["precision"]
        if self.precision not in ("fp32", "bf16") or (self.precision == "bf16" and not self.cuda):
            raise ValueError(f"training precision {self.precision!r} on {device}: use fp32, or bf16 on cuda")

    def prepare(self, model: M2ANet) -> M2ANet:
        fmt = torch.channels_last_3d if self.cuda else torch.contiguous_format
        # Module.to takes memory_format at runtime; torch's stubs leave it out
        return model.to(self.device, memory_format=fmt)  # type: ignore[call-overload]

    def inputs(self, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(channels_last(x) for x in xs) if self.cuda else xs

    def math(self, tf32: bool | None = None) -> contextlib.AbstractContextManager[Any]:
        """On CUDA: cuDNN's benchmark on, and TF32 as asked (False for evaluation in IEEE FP32)."""
        return cuda_math(tf32, cudnn_benchmark=True) if self.cuda else contextlib.nullcontext()

    def autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16")

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def facts(self) -> dict[str, Any]:
        """What the training record says about the machine that trained."""
        return {
            "device": str(self.device),
            "gpu": torch.cuda.get_device_name(self.device) if self.cuda else None,
            "precision": self.precision,
            "channels_last": self.cuda,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine(),
        }


def _ieee_fp32(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """TF32 off on CUDA, for what must match the CPU: evaluation and the descriptors' statistics."""
    return cuda_math(tf32=False) if device.type == "cuda" else contextlib.nullcontext()


@torch.no_grad()
def predict(model: M2ANet, cohort: Cohort, batch: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Metastasis probabilities and thresholded node masks (bool) for a whole cohort, on the model's
    device, in IEEE FP32 (TF32 off on CUDA)."""
    model.eval()
    dev = next(model.parameters()).device
    probs, masks = [], []
    with _ieee_fp32(dev):
        for i in range(0, len(cohort), batch):
            out = [
                o.cpu()
                for o in model(
                    torch.from_numpy(cohort.ct[i : i + batch]).to(dev),
                    torch.from_numpy(cohort.mask[i : i + batch]).to(dev),
                )
            ]
            probs.append(sigmoid(out[0].numpy()[:, 0]))
            if len(out) > 1:
                masks.append(out[1].numpy() > 0)
    return np.concatenate(probs), (np.concatenate(masks) if masks else np.zeros(0, bool))


def evaluate(model: M2ANet, cohort: Cohort, threshold: float, per_node: bool = False) -> dict[str, Any]:
    """Metrics on `cohort`; `per_node` adds each node's probability (6 decimals) and label, which the
    training record keeps so that a test can check shipped weights on a prefix of the test split and
    the record's metrics from its own numbers."""
    prob, seg = predict(model, cohort)
    result: dict[str, Any] = {
        **binary_metrics(cohort.label, prob, threshold),
        "auc": roc_auc(cohort.label, prob),
        "dice": dice(seg, cohort.seg > 0.5) if seg.size else float("nan"),
        "threshold": threshold,
        "nodes": len(cohort),
    }
    if per_node:
        result["probability"] = [round(float(x), 6) for x in prob]
        result["label"] = [int(x) for x in cohort.label]
    return result


def size_rule(cohort: Cohort) -> dict[str, Any]:
    """The clinical baseline: short-axis diameter >= 10 mm means metastatic.

    `contour`: the short axis measured on the input contour, as a radiologist measures it on the
    image (with the same delineation error the model sees); this is the comparator the shipped
    weights must beat. `oracle`: the generator's true diameter, an upper bound no reader has.
    """
    measured = np.array([short_axis_mm(m[0] > 0) for m in cohort.mask])

    def rule(diameter: np.ndarray) -> dict[str, float]:
        return {**binary_metrics(cohort.label, diameter, 10.0), "auc": roc_auc(cohort.label, diameter)}

    return {"contour": rule(measured), "oracle": rule(cohort.short_axis_mm), "threshold_mm": 10.0}


def fresh_evaluation(model: M2ANet, threshold: float) -> dict[str, Any]:
    """The record's check on a cohort no training or threshold saw (`FRESH_SEED`): per-node numbers, so that
    tests/test_weights.py can hold the shipped weights to issue 14's goals without rerunning 600 nodes."""
    cohort = load_split("test", n=FRESH_NODES, seed=FRESH_SEED)
    return {
        "seed": FRESH_SEED,
        **evaluate(model, cohort, threshold, per_node=True),
        "size_rule": size_rule(cohort),
    }


def _soft_dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    p = torch.sigmoid(logits).flatten(1)
    t = target.flatten(1)
    return (1 - (2 * (p * t).sum(1) + 1) / (p.sum(1) + t.sum(1) + 1)).mean()


def _flip(gen: torch.Generator, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Random left-right / anterior-posterior / craniocaudal flips, the same for all inputs."""
    dims = [d for d in (2, 3, 4) if torch.rand((), generator=gen) < 0.5]
    return tuple(x.flip(dims) if dims else x for x in xs)


@torch.no_grad()
def _standardise_descriptors(model: M2ANet, cohort: Cohort, batch: int = 256) -> None:
    """Set the geometry and intensity features' mean and std from the training split (no gradient), on the
    model's device in IEEE FP32: tens of thousands of GPU-training nodes would take minutes on the CPU."""
    geometry, intensity = [], []
    dev = next(model.parameters()).device
    with _ieee_fp32(dev):
        for i in range(0, len(cohort), batch):
            ct, mask = (torch.from_numpy(a[i : i + batch]).to(dev) for a in (cohort.ct, cohort.mask))
            geometry.append(model.geometry(model.sme(mask)))
            intensity.append(model.intensity(ct, mask))
    for name, values in (("geometry", torch.cat(geometry)), ("intensity", torch.cat(intensity))):
        getattr(model, f"{name}_mean").copy_(values.mean(0))
        getattr(model, f"{name}_std").copy_(values.std(0).clamp_min(1e-6))


SIGNS_WEIGHT = 0.3
"""Weight of the auxiliary sign loss beside the metastasis and segmentation losses."""


class SignSupervision(nn.Module):
    """Synthetic supervision (issue 14): a linear head on the metastasis head's input predicts the
    generator's signs of each node (standardised short axis, roundness, heterogeneity, irregularity by
    squared error; necrosis, fatty hilum, calcification by cross-entropy), so the shared features must
    carry each sign, not only the label they add up to. It lives here, not in the model: the weights,
    exports and engines never see it."""

    BINARY = ("necrosis", "fatty_hilum", "calcified")
    binary: torch.Tensor  # buffers, registered in __init__
    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, model: M2ANet, signs: np.ndarray, device: torch.device) -> None:
        super().__init__()
        self.linear = nn.Linear(cast(nn.Linear, model.head[0]).in_features, len(SIGN_NAMES))
        binary = torch.tensor([k in self.BINARY for k in SIGN_NAMES])
        values = torch.from_numpy(signs)
        self.register_buffer("binary", binary, persistent=False)
        self.register_buffer("mean", torch.where(binary, 0.0, values.mean(0)))
        self.register_buffer("std", torch.where(binary, 1.0, values.std(0).clamp_min(1e-6)))
        self.to(device)
        self.features: torch.Tensor | None = None
        model.head.register_forward_hook(self._capture)

    def _capture(self, module: nn.Module, args: tuple[torch.Tensor, ...], _out: torch.Tensor) -> None:
        if module.training:
            self.features = args[0]

    def loss(self, signs: torch.Tensor) -> torch.Tensor:
        """The loss on the features the last training forward pass captured."""
        if self.features is None:
            raise RuntimeError("SignSupervision.loss before a training forward pass of the model")
        pred = self.linear(self.features.float())
        target = (signs - self.mean) / self.std
        squared = (pred - target) ** 2
        crossed = F.binary_cross_entropy_with_logits(pred, target, reduction="none")
        return torch.where(self.binary, crossed, squared).mean()


class TrainSteps:
    """The optimisation loop's body, shared by `train` and `train_throughput`: the training split held on
    the device once (indexing and flips happen there), the loss, one optimiser step."""

    def __init__(
        self,
        model: M2ANet,
        cohort: Cohort,
        dev: TrainDevice,
        lr: float,
        total: int,
        signs_weight: float = SIGNS_WEIGHT,
    ) -> None:
        self.model, self.dev, self.signs_weight = model, dev, signs_weight
        self.data = {
            k: torch.from_numpy(getattr(cohort, k)).to(dev.device)
            for k in ("ct", "mask", "seg", "label", "signs")
        }
        pos = float(cohort.label.mean())
        self.pos_weight = torch.tensor([(1 - pos) / pos], device=dev.device)
        self.signs = SignSupervision(model, cohort.signs, dev.device) if signs_weight else None
        params = [*model.parameters(), *(self.signs.parameters() if self.signs else ())]
        self.opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
        self.sched = torch.optim.lr_scheduler.OneCycleLR(
            self.opt, max_lr=lr, total_steps=total, pct_start=0.1
        )

    def __call__(self, gen: torch.Generator, idx: np.ndarray) -> torch.Tensor:
        """One step on the nodes `idx`; the loss stays on the device (reading it would wait for the GPU)."""
        index = torch.from_numpy(idx).to(self.dev.device)
        ct, mask, seg = _flip(gen, *(self.data[k][index] for k in ("ct", "mask", "seg")))
        label = self.data["label"][index].float()[:, None]
        with self.dev.math(), self.dev.autocast():
            met_logit, seg_logit = self.model(*self.dev.inputs(ct, mask))
            loss = F.binary_cross_entropy_with_logits(met_logit, label, pos_weight=self.pos_weight) + 0.5 * (
                _soft_dice_loss(seg_logit, seg) + F.binary_cross_entropy_with_logits(seg_logit, seg)
            )
            if self.signs is not None:
                loss = loss + self.signs_weight * self.signs.loss(self.data["signs"][index])
        with self.dev.math():
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
        self.sched.step()
        return loss.detach()


THRESHOLD_RULES = {
    "accuracy": (accuracy_threshold, "best accuracy on the synthetic val split"),
    "youden": (youden_threshold, "Youden's J on the synthetic val split"),
}
"""How `m2a-train` picks the decision threshold on `val`. Accuracy by default: Youden's J weighs a missed
metastasis as much as a false alarm whatever the prevalence, which cost up to 7.5 points of accuracy on
a fresh cohort (issue 14)."""


class Checkpoint:
    """The state of a run at the end of its last completed epoch, so that a run killed or cut short by
    `max_minutes` continues where it was instead of starting over: the model, optimiser and schedule,
    the random generators, the history and the best epoch so far. Written atomically after every epoch,
    loaded without pickle (`weights_only`). A run continues only with the options that started it: the
    same options and the same epoch give the weights an uninterrupted run gives, bit for bit, on the CPU."""

    def __init__(self, path: Path, options: dict[str, Any]) -> None:
        self.path, self.options = Path(path), options

    def load(self) -> dict[str, Any] | None:
        if not self.path.is_file():
            return None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as e:  # a truncated file or not a checkpoint: never silently restarted over
            raise ValueError(
                f"checkpoint {self.path} cannot be read ({type(e).__name__}): delete it to start over"
            ) from None
        changed = sorted(k for k in self.options if state["options"].get(k) != self.options[k])
        if changed:
            raise ValueError(
                f"checkpoint {self.path} is of another run ({', '.join(changed)} differ): "
                "pass the options it was started with, or delete it to start over"
            )
        return state

    def save(self, state: dict[str, Any]) -> None:
        with atomic_path(self.path) as tmp:
            torch.save({"options": self.options, **state}, tmp)


def _rng_state(dev: TrainDevice) -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state()}
    if dev.cuda:
        state["cuda"] = torch.cuda.get_rng_state(dev.device)
    return state


def _set_rng_state(dev: TrainDevice, state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["torch"])
    if dev.cuda:
        torch.cuda.set_rng_state(state["cuda"], dev.device)


def _init_record(init: Path | None) -> dict | None:
    """Where a continued run started: the weights' hash and the record of the run that made them."""
    if init is None:
        return None
    previous = init.with_suffix(".json")
    return {
        "weights_sha256": sha256_file(init),
        "previous_record": json.loads(previous.read_text(encoding="utf-8")) if previous.is_file() else None,
    }


def _threshold_and_evaluation(model: M2ANet, threshold_rule: str, val_set: Cohort) -> dict[str, Any]:
    """The record's decision threshold, chosen on `val` by `threshold_rule`, and what the model does with
    it on the test split and the fresh cohort."""
    choose_threshold, rule_text = THRESHOLD_RULES[threshold_rule]
    prob, _ = predict(model, val_set)
    threshold = choose_threshold(val_set.label, prob)
    test_set = load_split("test")
    return {
        "threshold": threshold,
        "threshold_rule": rule_text,
        "test": evaluate(model, test_set, threshold, per_node=True),
        "test_size_rule": size_rule(test_set),
        "fresh": fresh_evaluation(model, threshold),
    }


OUTLINE_FIT_SEED, OUTLINE_FIT_NODES = 77_777, 3000
"""The nodes the outline term is fitted on: a seed that no split, training run or evaluation draws."""


@torch.no_grad()
def fit_outline(model: M2ANet, cohort: Cohort, batch: int = 32) -> dict[str, Any]:
    """Fit the model's outline term (`M2ANet.outline_logit`) on `cohort`, the network frozen: a logistic
    regression of the head's logit and the three standardised outline measures, by L-BFGS in float64.
    A refit starts from the head's own logit, whatever term the weights carried. Returns what was fitted."""
    model.eval()
    dev = next(model.parameters()).device
    n = ContourOutline.N_MEASURES
    model.reset_outline()
    logits, outlines = [], []
    with _ieee_fp32(dev):
        for i in range(0, len(cohort), batch):
            ct, mask = (torch.from_numpy(a[i : i + batch]).to(dev) for a in (cohort.ct, cohort.mask))
            logits.append(model(ct, mask)[0].double().cpu())
            outlines.append(model.outline(mask).double().cpu())
    outline = torch.cat(outlines)
    mean, std = outline.mean(0), outline.std(0).clamp_min(1e-6)
    x = torch.cat([torch.cat(logits), (outline - mean) / std], dim=1)
    y = torch.from_numpy(cohort.label).double()
    w = torch.zeros(n + 1, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=500, tolerance_grad=1e-10, line_search_fn="strong_wolfe")

    def loss() -> torch.Tensor:
        opt.zero_grad()
        value = F.binary_cross_entropy_with_logits(x @ w + b, y)
        value.backward()
        return value

    with torch.enable_grad():
        opt.step(loss)
    for buffer, value in ((model.outline_mean, mean), (model.outline_std, std), (model.outline_weight, w),
                          (model.outline_bias, b)):  # fmt: skip
        buffer.copy_(value.detach().to(buffer))
    return {
        "seed": OUTLINE_FIT_SEED,
        "nodes": len(cohort),
        "measures": ["moment roundness", "axial roundness", "sphericity"],
        "weight": [float(v) for v in w],
        "bias": float(b),
        "mean": [float(v) for v in mean],
        "std": [float(v) for v in std],
        "fit_auc": {
            "head": roc_auc(cohort.label, x[:, 0].numpy()),
            "with outline": roc_auc(cohort.label, (x @ w + b).detach().numpy()),
        },
    }


def fit_outline_term(
    name: str,
    init: Path,
    device: str = "cpu",
    threshold_rule: str = "accuracy",
    n_fit: int = OUTLINE_FIT_NODES,
) -> tuple[M2ANet, dict]:
    """`m2a-train --fit-outline`: trained weights (`init`, with their record beside them) get their outline
    term fitted on `n_fit` nodes of OUTLINE_FIT_SEED, then a new threshold on `val` and a new evaluation.
    The record keeps the training run's record under `init`."""
    if threshold_rule not in THRESHOLD_RULES:
        raise ValueError(f"threshold rule {threshold_rule!r}: choose one of {', '.join(THRESHOLD_RULES)}")
    t0 = time.time()
    dev = TrainDevice(device, "fp32")
    model = dev.prepare(create_model(name, weights=str(init)))
    classifier = dev.prepare(create_model(name, heads="cls", weights=str(init)))  # the fit needs no decoder
    fitted = fit_outline(classifier, load_split("train", n=n_fit, seed=OUTLINE_FIT_SEED))
    with torch.no_grad():
        for key in FITTED_AFTER_TRAINING:
            getattr(model, key).copy_(getattr(classifier, key))
    record = {
        "model": config_dict(name),
        "init": _init_record(init),
        "generator_version": GENERATOR_VERSION,
        "outline_fit": fitted,
        **dev.facts(),
        **_threshold_and_evaluation(model, threshold_rule, load_split("val")),
        "wall_time_s": round(time.time() - t0, 1),
    }
    # Module.to takes memory_format at runtime; torch's stubs leave it out
    return model.to("cpu", memory_format=torch.contiguous_format), record  # type: ignore[call-overload]


def train(
    name: str,
    epochs: int,
    seed: int = 0,
    batch: int = 8,
    lr: float = 2e-3,
    n_train: int | None = None,
    max_minutes: float | None = None,
    init: Path | None = None,
    device: str = "cpu",
    precision: str | None = None,
    threshold_rule: str = "accuracy",
    checkpoint: Path | None = None,
) -> tuple[M2ANet, dict]:
    """Train `name` on `device` (TRAIN_DEFAULTS gives each device's batch and lr); `init` continues from
    earlier weights (with their record beside them); the threshold comes from THRESHOLD_RULES. With
    `checkpoint`, each completed epoch is saved there and a run with the same options resumes from it.
    The model comes back on the CPU, NCDHW."""
    if threshold_rule not in THRESHOLD_RULES:
        raise ValueError(f"threshold rule {threshold_rule!r}: choose one of {', '.join(THRESHOLD_RULES)}")
    dev = TrainDevice(device, precision)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    t0 = time.time()
    train_set, val_set = load_split("train", n=n_train), load_split("val")
    model = dev.prepare(create_model(name, weights=str(init) if init else None))
    if init is None:
        _standardise_descriptors(model, train_set)
    steps_per_epoch = math.ceil(len(train_set) / batch)
    total = epochs * steps_per_epoch
    step = TrainSteps(model, train_set, dev, lr, total)
    history, best_auc, best_state, stopped_early = [], -1.0, None, False
    trained_s, trained_nodes, earlier_s = 0.0, 0, 0.0
    saver = None
    if checkpoint is not None:
        options = {
            "model": name, "epochs": epochs, "seed": seed, "batch": batch, "lr": lr, "n_train": n_train,
            "init_sha256": sha256_file(init) if init else None, "device": str(dev.device),
            "precision": dev.precision, "threshold_rule": threshold_rule,
        }  # fmt: skip
        saver = Checkpoint(checkpoint, options)
        state = saver.load()
        if state is not None:
            model.load_state_dict(state["model"])
            step.opt.load_state_dict(state["opt"])
            step.sched.load_state_dict(state["sched"])
            if step.signs is not None:
                step.signs.load_state_dict(state["signs"])
            gen.set_state(state["gen"])
            _set_rng_state(dev, state["rng"])
            history, best_auc, best_state = state["history"], state["best_auc"], state["best_state"]
            trained_s, trained_nodes, earlier_s = state["trained_s"], state["trained_nodes"], state["wall_s"]
            tqdm.write(f"resuming {checkpoint} after epoch {len(history)}", file=sys.stderr)
    done = len(history) * steps_per_epoch
    bar = tqdm(total=total, initial=done, desc=f"train {name}", unit="step", file=sys.stderr)
    for epoch in range(len(history), epochs):
        model.train()
        order = torch.randperm(len(train_set), generator=gen).numpy()
        losses = []
        dev.sync()
        t_epoch = time.time()
        for i in range(0, len(order), batch):
            losses.append(step(gen, np.sort(order[i : i + batch])))
            bar.update()
            if len(losses) % 10 == 0:  # reading the loss waits for the GPU: not on every step
                bar.set_postfix(epoch=epoch + 1, loss=f"{torch.stack(losses[-50:]).mean().item():.3f}")
            if max_minutes is not None and time.time() - t0 > 60 * max_minutes:
                stopped_early = True
                break
        dev.sync()
        trained_s += time.time() - t_epoch
        trained_nodes += min(len(order), len(losses) * batch)
        epoch_loss = float(np.mean([loss.item() for loss in losses]))
        prob, _ = predict(model, val_set)
        val_auc = roc_auc(val_set.label, prob)
        history.append({"epoch": epoch + 1, "loss": epoch_loss, "val_auc": val_auc})
        tqdm.write(f"epoch {epoch + 1}: loss {epoch_loss:.4f} val AUC {val_auc:.4f}", file=sys.stderr)
        if val_auc > best_auc:
            best_auc, best_state = (
                val_auc,
                {k: v.clone() for k, v in model.state_dict().items()},
            )
        if stopped_early:  # the checkpoint keeps the last whole epoch: a rerun redoes this one
            break
        if saver is not None:
            saver.save(
                {
                    "model": model.state_dict(), "opt": step.opt.state_dict(),
                    "sched": step.sched.state_dict(), "gen": gen.get_state(), "rng": _rng_state(dev),
                    "signs": step.signs.state_dict() if step.signs is not None else {},
                    "history": history, "best_auc": best_auc, "best_state": best_state,
                    "trained_s": trained_s, "trained_nodes": trained_nodes,
                    "wall_s": earlier_s + time.time() - t0,
                }
            )  # fmt: skip
    bar.close()
    if best_state is None:  # the first epoch sets it (any AUC beats -1): only epochs=0 leaves it unset
        raise ValueError(f"no epoch was validated (epochs={epochs}): there are no best weights to keep")
    model.load_state_dict(best_state)
    record = {
        "model": config_dict(name),
        "seed": seed,
        "init": _init_record(init),
        "epochs": epochs,
        "epochs_completed": len(history),
        "stopped_early": stopped_early,
        "batch": batch,
        "lr": lr,
        "train_nodes": len(train_set),
        "generator_version": GENERATOR_VERSION,
        "signs_weight": SIGNS_WEIGHT,
        "history": history,
        "wall_time_s": round(earlier_s + time.time() - t0, 1),
        "train_nodes_per_s": round(trained_nodes / trained_s, 1),
        **dev.facts(),
        **_threshold_and_evaluation(model, threshold_rule, val_set),
    }
    # Module.to takes memory_format at runtime; torch's stubs leave it out
    return model.to("cpu", memory_format=torch.contiguous_format), record  # type: ignore[call-overload]


def train_throughput(
    name: str,
    device: str = "cuda",
    batch: int | None = None,
    steps: int = 30,
    warmup: int = 5,
    n_train: int = 64,
    precision: str | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Training nodes/s of `name` on `device`: the steps of `train`, `warmup` untimed (cuDNN's benchmark,
    the allocator), then `steps` timed, cycling over the first `n_train` training nodes, with no
    validation, test or weights: the rate a full run would train at, measured in seconds."""
    dev = TrainDevice(device, precision)
    batch = batch or int(TRAIN_DEFAULTS[dev.device.type]["batch"])
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    cohort = load_split("train", n=n_train)
    model = dev.prepare(create_model(name))
    _standardise_descriptors(model, cohort)
    model.train()
    step = TrainSteps(model, cohort, dev, float(TRAIN_DEFAULTS[dev.device.type]["lr"]), warmup + steps)
    batches = [np.sort(torch.randperm(n_train, generator=gen).numpy()[:batch]) for _ in range(warmup + steps)]
    for idx in batches[:warmup]:
        step(gen, idx)
    dev.sync()
    t0 = time.perf_counter()
    for idx in batches[warmup:]:
        loss = step(gen, idx)
    dev.sync()
    seconds = time.perf_counter() - t0
    return {
        "model": name,
        "batch": batch,
        "steps": steps,
        "warmup_steps": warmup,
        "seconds": round(seconds, 3),
        "nodes_per_s": round(steps * batch / seconds, 1),
        "final_loss": float(loss.item()),
        **dev.facts(),
    }
