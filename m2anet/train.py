"""Training a config on the synthetic cohort: weights plus a training record (`m2a-train`).

Seeded and deterministic on the CPU (same seed, same thread count -> same weights), unless
`--max-minutes` cuts the run short.
"""

from __future__ import annotations

import json
import math
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from m2anet.data import Cohort, load_split
from m2anet.io import sha256_file
from m2anet.metrics import binary_metrics, dice, roc_auc, sigmoid, youden_threshold
from m2anet.model import M2ANet, config_dict, create_model
from m2anet.preprocess import short_axis_mm


@torch.no_grad()
def predict(model: M2ANet, cohort: Cohort, batch: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Metastasis probabilities and thresholded node masks (bool) for a whole cohort."""
    model.eval()
    probs, masks = [], []
    for i in range(0, len(cohort), batch):
        out = model(
            torch.from_numpy(cohort.ct[i : i + batch]),
            torch.from_numpy(cohort.mask[i : i + batch]),
        )
        probs.append(sigmoid(out[0].numpy()[:, 0]))
        if len(out) > 1:
            masks.append(out[1].numpy() > 0)
    return np.concatenate(probs), (np.concatenate(masks) if masks else np.zeros(0, bool))


def evaluate(model: M2ANet, cohort: Cohort, threshold: float) -> dict[str, float]:
    prob, seg = predict(model, cohort)
    return {
        **binary_metrics(cohort.label, prob, threshold),
        "auc": roc_auc(cohort.label, prob),
        "dice": dice(seg, cohort.seg > 0.5) if seg.size else float("nan"),
        "threshold": threshold,
        "nodes": len(cohort),
    }


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


def _soft_dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    p = torch.sigmoid(logits).flatten(1)
    t = target.flatten(1)
    return (1 - (2 * (p * t).sum(1) + 1) / (p.sum(1) + t.sum(1) + 1)).mean()


def _flip(gen: torch.Generator, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Random left-right / anterior-posterior / craniocaudal flips, the same for all inputs."""
    dims = [d for d in (2, 3, 4) if torch.rand((), generator=gen) < 0.5]
    return tuple(x.flip(dims) if dims else x for x in xs)


@torch.no_grad()
def _standardise_geometry(model: M2ANet, cohort: Cohort, batch: int = 256) -> None:
    """Set the geometry features' mean and std from the training contours (no gradient)."""
    masks = (torch.from_numpy(cohort.mask[i : i + batch]) for i in range(0, len(cohort), batch))
    g = torch.cat([model.geometry(model.sme(m)) for m in masks])
    model.geometry_mean.copy_(g.mean(0))
    model.geometry_std.copy_(g.std(0))


def _init_record(init: Path | None) -> dict | None:
    """Where a continued run started: the weights' hash and the record of the run that made them."""
    if init is None:
        return None
    previous = init.with_suffix(".json")
    return {
        "weights_sha256": sha256_file(init),
        "previous_record": json.loads(previous.read_text()) if previous.is_file() else None,
    }


def train(
    name: str,
    epochs: int,
    seed: int = 0,
    batch: int = 8,
    lr: float = 2e-3,
    n_train: int | None = None,
    max_minutes: float | None = None,
    init: Path | None = None,
) -> tuple[M2ANet, dict]:
    """Train `name`; `init` continues from earlier weights (with their record beside them)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    t0 = time.time()
    train_set, val_set = load_split("train", n=n_train), load_split("val")
    model = create_model(name, weights=str(init) if init else None)
    if init is None:
        _standardise_geometry(model, train_set)
    model.train()
    pos = float(train_set.label.mean())
    pos_weight = torch.tensor([(1 - pos) / pos])
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps_per_epoch = math.ceil(len(train_set) / batch)
    total = epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total, pct_start=0.1)
    history, best_auc, best_state, stopped_early = [], -1.0, None, False
    bar = tqdm(total=total, desc=f"train {name}", unit="step", file=sys.stderr)
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(train_set), generator=gen).numpy()
        losses = []
        for i in range(0, len(order), batch):
            idx = np.sort(order[i : i + batch])
            ct, mask, seg = _flip(
                gen,
                *(torch.from_numpy(a[idx]) for a in (train_set.ct, train_set.mask, train_set.seg)),
            )
            label = torch.from_numpy(train_set.label[idx]).float()[:, None]
            met_logit, seg_logit = model(ct, mask)
            loss = F.binary_cross_entropy_with_logits(met_logit, label, pos_weight=pos_weight) + 0.5 * (
                _soft_dice_loss(seg_logit, seg) + F.binary_cross_entropy_with_logits(seg_logit, seg)
            )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
            bar.update()
            bar.set_postfix(epoch=epoch + 1, loss=f"{np.mean(losses[-50:]):.3f}")
            if max_minutes is not None and time.time() - t0 > 60 * max_minutes:
                stopped_early = True
                break
        prob, _ = predict(model, val_set)
        val_auc = roc_auc(val_set.label, prob)
        history.append({"epoch": epoch + 1, "loss": float(np.mean(losses)), "val_auc": val_auc})
        tqdm.write(
            f"epoch {epoch + 1}: loss {np.mean(losses):.4f} val AUC {val_auc:.4f}",
            file=sys.stderr,
        )
        if val_auc > best_auc:
            best_auc, best_state = (
                val_auc,
                {k: v.clone() for k, v in model.state_dict().items()},
            )
        if stopped_early:
            break
    bar.close()
    model.load_state_dict(best_state)
    prob, _ = predict(model, val_set)
    threshold = youden_threshold(val_set.label, prob)
    test_set = load_split("test")
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
        "threshold": threshold,
        "threshold_rule": "Youden's J on the synthetic val split",
        "history": history,
        "wall_time_s": round(time.time() - t0, 1),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "test": evaluate(model, test_set, threshold),
        "test_size_rule": size_rule(test_set),
    }
    return model, record
