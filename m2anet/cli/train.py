"""`m2a-train`: train a config on the synthetic cohort and write weights plus a training record.

Seeded and deterministic on the CPU (same seed, same thread count -> same weights), unless
`--max-minutes` cuts the run short. `--device cuda` trains in bf16 autocast and channels-last.
`--throughput STEPS` measures training nodes/s on the device instead, writing no weights. Each
completed epoch is checkpointed, so the same command rerun after an interruption continues the run.
`--fit-outline --init WEIGHTS` trains nothing: it fits the trained weights' outline term (the logit's
last step, `M2ANet.outline_logit`) on nodes no split draws, then chooses the threshold and evaluates again.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from m2anet.cli.args import (
    int_at_least,
    interruptible,
    make_parser,
    non_negative_int,
    output_dir,
    positive_float,
    positive_int,
)
from m2anet.io import write_json
from m2anet.model import list_models
from m2anet.train import THRESHOLD_RULES, TRAIN_DEFAULTS, fit_outline_term, train, train_throughput
from m2anet.weights import save_weights


def parser() -> argparse.ArgumentParser:
    cpu, cuda = TRAIN_DEFAULTS["cpu"], TRAIN_DEFAULTS["cuda"]
    ap = make_parser("m2a-train", __doc__)
    ap.add_argument("--model", default="m2anet_small", choices=list_models())
    ap.add_argument("--epochs", type=positive_int, default=6)
    ap.add_argument("--seed", type=non_negative_int, default=0)
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    ap.add_argument(
        "--precision",
        choices=["fp32", "bf16"],
        help=f"default: {cpu['precision']} on the CPU, {cuda['precision']} autocast on cuda",
    )
    ap.add_argument(
        "--batch",
        type=int_at_least(2),
        default=None,
        help=f"nodes per step (BatchNorm needs two); default: {cpu['batch']} on the CPU, "
        f"{cuda['batch']} on cuda",
    )
    ap.add_argument(
        "--lr",
        type=positive_float,
        default=None,
        help=f"peak learning rate; default: {cpu['lr']:g} on the CPU, {cuda['lr']:g} on cuda",
    )
    ap.add_argument(
        "--n-train",
        type=int_at_least(2),
        default=None,
        help="train on the first N nodes of the train split's seed (default 2000; more draws more nodes)",
    )
    ap.add_argument("--max-minutes", type=positive_float, default=None, help="stop after this wall time")
    ap.add_argument("--init", type=Path, default=None, help="continue from these weights")
    ap.add_argument(
        "--checkpoint",
        type=Path,
        help="where each completed epoch is saved, and a rerun with the same options resumes from "
        "(default: OUT/MODEL.checkpoint.pt; removed once the weights are written)",
    )
    ap.add_argument(
        "--threshold-rule",
        choices=list(THRESHOLD_RULES),
        default="accuracy",
        help="how the decision threshold is chosen on the val split (default: best accuracy)",
    )
    ap.add_argument(
        "--fit-outline",
        action="store_true",
        help="fit the outline term of the --init weights (network frozen) instead of training",
    )
    ap.add_argument(
        "--throughput",
        type=positive_int,
        metavar="STEPS",
        help="measure training nodes/s over STEPS timed steps (after 5 untimed) and write "
        "<model>.throughput.json instead of training",
    )
    ap.add_argument(
        "--out",
        type=output_dir,
        default=Path("."),
        help="folder for <model>.safetensors/.json",
    )
    return ap


def _write(model: torch.nn.Module, record: dict, out: Path, name: str) -> Path:
    """OUT/<name>.safetensors (the threshold in its metadata) and its record beside it."""
    weights = out / f"{name}.safetensors"
    save_weights(model, weights, metadata={"model": name, "threshold": repr(record["threshold"])})
    write_json(weights.with_suffix(".json"), record)
    return weights


@interruptible("m2a-train")
def main(argv: list[str] | None = None) -> int:
    ap = parser()
    args = ap.parse_args(argv)
    kind = args.device.split(":")[0]
    if kind not in TRAIN_DEFAULTS:
        ap.error(f"--device {args.device}: use cpu, cuda or cuda:N")
    batch = args.batch or int(TRAIN_DEFAULTS[kind]["batch"])
    lr = args.lr or float(TRAIN_DEFAULTS[kind]["lr"])
    try:
        if args.throughput is not None:
            result = train_throughput(
                args.model,
                args.device,
                batch,
                args.throughput,
                n_train=args.n_train or 64,
                precision=args.precision,
                seed=args.seed,
            )
            write_json(args.out / f"{args.model}.throughput.json", result)
            print(json.dumps(result))
            return 0
        if args.fit_outline:
            if args.init is None:
                ap.error("--fit-outline fits the outline term of trained weights: give them with --init")
            model, record = fit_outline_term(args.model, args.init, args.device, args.threshold_rule)
            weights = _write(model, record, args.out, args.model)
            fit, t, f = record["outline_fit"]["fit_auc"], record["test"], record["fresh"]
            print(
                f"{args.model}: outline term fitted on {record['outline_fit']['nodes']} nodes (AUC there "
                f"{fit['head']:.3f} -> {fit['with outline']:.3f}); test accuracy {t['accuracy']:.3f} AUC "
                f"{t['auc']:.3f}, fresh accuracy {f['accuracy']:.3f} AUC {f['auc']:.3f} -> {weights}"
            )
            return 0
        if kind == "cpu":
            torch.use_deterministic_algorithms(True, warn_only=True)
        checkpoint = args.checkpoint or args.out / f"{args.model}.checkpoint.pt"
        model, record = train(
            args.model,
            args.epochs,
            args.seed,
            batch,
            lr,
            args.n_train,
            args.max_minutes,
            args.init,
            args.device,
            args.precision,
            args.threshold_rule,
            checkpoint,
        )
    except ValueError as e:
        print(f"m2a-train: error: {e}", file=sys.stderr)
        return 2
    weights = _write(model, record, args.out, args.model)
    if not record["stopped_early"]:  # a run cut by --max-minutes continues from it when rerun
        checkpoint.unlink(missing_ok=True)
    t, b = record["test"], record["test_size_rule"]["contour"]
    print(
        f"{args.model}: test accuracy {t['accuracy']:.3f} AUC {t['auc']:.3f} Dice {t['dice']:.3f} "
        f"(size rule on the contour: accuracy {b['accuracy']:.3f} AUC {b['auc']:.3f}) on {record['device']}, "
        f"{record['train_nodes_per_s']:.0f} nodes/s -> {weights}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
