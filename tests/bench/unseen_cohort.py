"""The shipped weights on a cohort that nothing in the project had drawn when they were chosen (issue 14).

The fresh cohort (seed 9090) of the training records was looked at while the outline term was chosen
(model_gaps.py, which groups add to the logit), so its numbers are no longer those of an untouched cohort.
This draws one more cohort from a seed first used here and scores on it every reader of issue 14's goals:
each config as trained (the head's logit at its training run's threshold) and as shipped (with the fitted
outline term, at the shipped threshold), the cohort study's radiomics reader (refitted as the study fits
it: logistic regression on its train nodes, threshold on val), the 10 mm rules and the label model.

    python3 tests/bench/unseen_cohort.py --out docs/cohort-study
"""

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from m2anet import create_model
from m2anet.cohort_study import measure, radiomics_reader, reader_scores, readers
from m2anet.data import FRESH_NODES, SPLITS, load_split
from m2anet.metrics import sigmoid
from m2anet.parity import bootstrap_auc_difference
from m2anet.weights import training_record

SEED = 112_826
"""First drawn by this script, after the shipped weights and their outline term were fixed."""
MODELS = ("m2anet_small", "m2anet_base")
STUDY = Path(__file__).parents[2] / "docs" / "cohort-study" / "cohort_study.json"


def logits(name: str, ct: np.ndarray, mask: np.ndarray, batch: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """(head logit as trained, shipped logit with the outline term) of the shipped weights."""
    model = create_model(name, pretrained=True, heads="cls").eval()
    head: list[np.ndarray] = []
    model.head.register_forward_hook(lambda _m, _i, out: head.append(out[:, 0].numpy().copy()))
    shipped = []
    with torch.no_grad():
        for i in range(0, len(ct), batch):
            shipped.append(
                model(torch.from_numpy(ct[i : i + batch]), torch.from_numpy(mask[i : i + batch]))[0][:, 0]
            )
    return np.concatenate(head), torch.cat(shipped).numpy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=FRESH_NODES)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    reader_train = json.loads(STUDY.read_text(encoding="utf-8"))["reader"]["train_nodes"]
    _, prob, threshold = radiomics_reader(
        measure("train", SPLITS["train"][0], reader_train), measure("val", *SPLITS["val"])
    )
    report = {
        "seed": SEED,
        "nodes": args.nodes,
        "readers": readers(measure("unseen", SEED, args.nodes), prob, threshold),
    }
    cohort = load_split("test", n=args.nodes, seed=SEED)
    for name in MODELS:
        record = training_record(name)
        head, shipped = logits(name, cohort.ct, cohort.mask)
        trained_threshold = record["init"]["previous_record"]["threshold"]
        report[f"{name} as trained"] = reader_scores(cohort.label, sigmoid(head), trained_threshold)
        report[f"{name} shipped"] = reader_scores(cohort.label, sigmoid(shipped), record["threshold"])
        report[f"{name} outline gain ci95"] = bootstrap_auc_difference(cohort.label, head, shipped)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "unseen_cohort.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
    lines = [
        f"Seed {SEED}, {args.nodes} nodes, first drawn after the shipped weights were fixed "
        "(`python3 tests/bench/unseen_cohort.py --out docs/cohort-study`).",
        "",
        "| reader | accuracy | sensitivity | specificity | AUC |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    rows = {k: v for k, v in report.items() if isinstance(v, dict) and "auc" in v}
    for key, m in [*rows.items(), *report["readers"].items()]:
        lines.append(
            f"| {key} | {m['accuracy']:.3f} | {m['sensitivity']:.3f} | {m['specificity']:.3f} | "
            f"{m['auc']:.3f} |"
        )
    lines.append("")
    for name in MODELS:
        ci = report[f"{name} outline gain ci95"]
        lines.append(
            f"{name}: AUC gain of the outline term, paired bootstrap 95% interval "
            f"{ci['low']:+.3f} .. {ci['high']:+.3f}."
        )
    (args.out / "unseen_cohort.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
