"""Which measurable signs do the shipped models leave unused? (issue 14; README, "Reference results")

For each shipped config, a logistic regression of the model's logit together with one group of the
cohort study's hand features (`m2anet.cohort_study.node_features`), fitted on nodes that no split and
no training run draws, is scored on val, test and the fresh cohort. A group whose features raise the
AUC above the logit alone carries information the network does not extract. The groups are fixed
before looking (size, contour shape, texture, attenuation), so no selection on the scored cohorts
inflates a gain; the fresh gain comes with its paired bootstrap 95% interval.

    python3 tests/bench/model_gaps.py --fit-nodes 3000 --out docs/cohort-study    (21 min on 2 cores)
"""

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from tqdm import tqdm

from m2anet import create_model
from m2anet.cohort_study import FEATURES, node_features, rendered_nodes
from m2anet.data import FRESH_NODES, FRESH_SEED, SPLITS
from m2anet.metrics import roc_auc
from m2anet.parity import bootstrap_auc_difference
from m2anet.train import OUTLINE_FIT_SEED

MODELS = ("m2anet_small", "m2anet_base")
FIT_SEED = OUTLINE_FIT_SEED
"""A seed no split, no training run and no test draws from: the fit nodes are new to the models."""
GROUPS = {
    "size": ["contour_short_axis_mm", "contour_equivalent_diameter_mm"],
    "contour shape": [
        "contour_moment_roundness",
        "contour_axial_roundness",
        "contour_solidity",
        "contour_sphericity",
        "image_solidity",
    ],
    "texture": ["interior_sd_hu", "interior_smooth_sd_hu", "texture_excess_hu", "noise_sd_hu"],
    "attenuation": [
        "interior_mean_hu",
        "core_rim_drop_hu",
        "low_attenuation_fraction",
        "fat_fraction",
        "interior_p05_hu",
        "max_hu",
        "bright_fraction",
    ],
    "all": list(FEATURES),
}


def measure(seed: int, n: int, name: str, models: dict[str, torch.nn.Module], batch: int = 16) -> dict:
    """Hand features, labels and each model's metastasis logit of the first n nodes drawn from seed."""
    feats, label, logits, pending = [], [], {m: [] for m in models}, []

    def flush() -> None:
        ct = torch.from_numpy(np.stack([node.ct for node in pending]))[:, None].float()
        mask = torch.from_numpy(np.stack([node.mask for node in pending]))[:, None].float()
        with torch.no_grad():
            for m, model in models.items():
                logits[m].append(model(ct, mask)[0][:, 0].numpy())
        pending.clear()

    for node in tqdm(rendered_nodes(seed, n), total=n, desc=name):
        f = node_features(node.ct, node.mask)
        feats.append([f[k] for k in FEATURES])
        label.append(node.label)
        pending.append(node)
        if len(pending) == batch:
            flush()
    if pending:
        flush()
    return {
        "features": np.array(feats),
        "label": np.array(label),
        **{m: np.concatenate(v) for m, v in logits.items()},
    }


def gaps(cohorts: dict[str, dict], model: str) -> list[dict]:
    rows = []
    for group, names in [("logit alone", []), *GROUPS.items()]:
        cols = [FEATURES.index(k) for k in names]

        def x(c: dict, cols: list[int] = cols) -> np.ndarray:
            return np.c_[c[model], c["features"][:, cols]]

        fit = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000))
        fit.fit(x(cohorts["fit"]), cohorts["fit"]["label"])
        row: dict = {"model": model, "group": group, "features": names}
        scores = {name: fit.decision_function(x(cohorts[name])) for name in ("val", "test", "fresh")}
        for name, score in scores.items():
            row[f"{name}_auc"] = roc_auc(cohorts[name]["label"], score)
        fresh = cohorts["fresh"]
        row["fresh_gain_ci95"] = bootstrap_auc_difference(fresh["label"], fresh[model], scores["fresh"])
        rows.append(row)
    return rows


def markdown(rows: list[dict], fit_nodes: int) -> str:
    lines = [
        f"Logistic regression of the model's logit and one feature group, fitted on {fit_nodes} nodes "
        f"of seed {FIT_SEED}; AUC on each cohort, and the fresh gain over the logit alone with its "
        "paired bootstrap 95% interval (1,000 resamples).",
        "",
        "| model | added to the logit | val AUC | test AUC | fresh AUC | fresh gain, 95% interval |",
        "| --- | --- | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        ci = r["fresh_gain_ci95"]
        lines.append(
            f"| {r['model']} | {r['group']} | {r['val_auc']:.3f} | {r['test_auc']:.3f} | "
            f"{r['fresh_auc']:.3f} | {ci['low']:+.3f} .. {ci['high']:+.3f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fit-nodes", type=int, default=3000)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    models = {m: create_model(m, pretrained=True, heads="cls") for m in MODELS}
    cohorts = {
        "fit": measure(FIT_SEED, args.fit_nodes, "fit", models),
        "val": measure(*SPLITS["val"], "val", models),
        "test": measure(*SPLITS["test"], "test", models),
        "fresh": measure(FRESH_SEED, FRESH_NODES, "fresh", models),
    }
    rows = [row for m in MODELS for row in gaps(cohorts, m)]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "model_gaps.json").write_text(
        json.dumps({"fit_nodes": args.fit_nodes, "fit_seed": FIT_SEED, "rows": rows}, indent=1),
        encoding="utf-8",
    )
    table = markdown(rows, args.fit_nodes)
    (args.out / "model_gaps.md").write_text(table, encoding="utf-8")
    print(table)


if __name__ == "__main__":
    main()
