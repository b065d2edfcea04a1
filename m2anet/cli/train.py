"""`m2a-train`: train a config on the synthetic cohort and write weights plus a training record.

Seeded and deterministic on the CPU (same seed, same thread count -> same weights), unless
`--max-minutes` cuts the run short.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from m2anet.io import write_json
from m2anet.model import list_models
from m2anet.train import train
from m2anet.weights import save_weights


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="m2a-train", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="m2anet_small", choices=list_models())
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--n-train", type=int, default=None, help="use the first N training nodes")
    ap.add_argument("--max-minutes", type=float, default=None, help="stop after this wall time")
    ap.add_argument("--init", type=Path, default=None, help="continue from these weights")
    ap.add_argument(
        "--out",
        type=Path,
        default=Path("."),
        help="folder for <model>.safetensors/.json",
    )
    args = ap.parse_args(argv)
    if args.epochs < 1 or args.batch < 2:
        ap.error("--epochs must be >= 1 and --batch >= 2 (BatchNorm needs two nodes per batch)")
    torch.use_deterministic_algorithms(True, warn_only=True)
    model, record = train(
        args.model,
        args.epochs,
        args.seed,
        args.batch,
        args.lr,
        args.n_train,
        args.max_minutes,
        args.init,
    )
    weights = args.out / f"{args.model}.safetensors"
    save_weights(
        model,
        weights,
        metadata={"model": args.model, "threshold": repr(record["threshold"])},
    )
    write_json(weights.with_suffix(".json"), record)
    t, b = record["test"], record["test_size_rule"]["contour"]
    print(
        f"{args.model}: test accuracy {t['accuracy']:.3f} AUC {t['auc']:.3f} Dice {t['dice']:.3f} "
        f"(size rule on the contour: accuracy {b['accuracy']:.3f} AUC {b['auc']:.3f}) -> {weights}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
