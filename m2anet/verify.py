"""`m2a-verify`: is a deployed artifact clinically equivalent to the PyTorch FP32 reference?

Runs the reference and the candidate on the same labelled synthetic nodes and reports tensor
agreement, the nodes whose diagnosis changes, task metrics side by side (with a bootstrap
interval of the AUC change), and stress inputs no split contains (random masks, empty
background, extreme HU, the profile's largest batch) where FP16 overflow or INT8 saturation
would show. Exit 0 on pass, 1 on fail (failing criteria first), 2 on bad input.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from m2anet.data import SPLITS, Cohort, load_split
from m2anet.engines import Backend, open_backend
from m2anet.engines.spec import SPEC_HELP, artifact_path
from m2anet.io import atomic_path, write_json
from m2anet.metrics import sigmoid
from m2anet.model import list_models
from m2anet.parity import TIERS, compare, run_cohort
from m2anet.weights import training_record

STRESS_PROB_ABS = 0.05
"""On inputs outside the data distribution only gross disagreement (overflow, saturation) fails."""


def artifact_context(spec: str) -> dict[str, Any]:
    """Model, heads, weights, threshold and precision of the artifact a spec opens (if any)."""
    from m2anet.export.manifest import artifact_entry, read_manifest

    path = artifact_path(spec)
    if not path:
        return {}
    entry = artifact_entry(path, verify=False)  # the backend verifies the hash when it opens
    manifest = read_manifest(Path(path).parent)
    m = manifest["model"]
    return {
        "model_name": m["name"],
        "heads": m["heads"],
        "weights": m["weights"],
        "threshold": m["threshold"],
        "precision": entry["precision"],
        "max_batch": manifest["batch_profile"]["max"],
        "artifact": str(path),
    }


def stress_inputs(cohort: Cohort, batch: int, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    n = min(8, len(cohort))
    ct, mask = cohort.ct[:n], cohort.mask[:n]
    blob = np.zeros_like(mask)
    blob[:, :, 6:10, 28:36, 28:36] = 1.0
    random_masks = (rng.random(mask.shape) < 0.02).astype(np.float32)
    random_masks[:, :, 8, 32, 32] = 1.0
    reps = -(-batch // len(cohort))
    return {
        "random masks": (ct, random_masks),
        "all-background patch": (np.full_like(ct, (-100.0 + 175.0) / 450.0), blob),
        "extreme HU (all >= 275)": (np.ones_like(ct), blob),
        "extreme HU (all <= -175)": (np.zeros_like(ct), blob),
        "extreme HU (checkerboard)": (
            (np.indices(ct.shape[2:]).sum(0) % 2).astype(np.float32)[None, None].repeat(n, 0),
            blob,
        ),
        f"largest batch ({batch})": (
            np.tile(cohort.ct, (reps, 1, 1, 1, 1))[:batch],
            np.tile(cohort.mask, (reps, 1, 1, 1, 1))[:batch],
        ),
    }


def stress(reference: Backend, candidate: Backend, cohort: Cohort, batch: int) -> list[dict]:
    rows = []
    for name, (ct, mask) in stress_inputs(cohort, batch).items():
        ref = reference.infer(ct, mask, check=False)
        cand = candidate.infer(ct, mask, check=False)
        finite = all(np.isfinite(c).all() for c in cand)
        err = float(np.abs(sigmoid(ref[0]) - sigmoid(cand[0])).max()) if finite else float("inf")
        rows.append(
            {
                "case": name,
                "nodes": len(ct),
                "finite": finite,
                "prob_max_abs": err,
                "passed": finite and err <= STRESS_PROB_ABS,
            }
        )
    return rows


def verify(args: argparse.Namespace) -> dict:
    ctx = artifact_context(args.backend)
    model_name = ctx.get("model_name", args.model)
    heads = ctx.get("heads", args.heads)
    weights = ctx.get("weights")
    threshold = args.threshold or ctx.get("threshold") or training_record(model_name)["threshold"]
    precision = ctx.get("precision") or (
        args.backend.split(":")[2] if args.backend.count(":") >= 2 else "fp32"
    )
    tier_name = precision if args.tier == "auto" else args.tier
    if tier_name not in TIERS:
        raise ValueError(f"no parity tier for precision {tier_name!r}: pass --tier fp32|fp16|int8")
    model_opts = {"model_name": model_name, "heads": heads, "weights": weights}
    cohort = load_split(args.split, n=args.n)
    cand_opts = {} if ctx else model_opts
    with (
        open_backend(args.reference, **model_opts) as reference,
        open_backend(args.backend, **cand_opts) as cand,
    ):
        ref_out = run_cohort(reference, cohort, desc=f"reference {reference.name}")
        cand_out = run_cohort(cand, cohort, desc=f"candidate {cand.name}")
        report = compare(ref_out, cand_out, cohort, float(threshold), TIERS[tier_name], seed=args.seed)
        if args.stress:
            report["stress"] = stress(reference, cand, cohort, args.stress_batch or ctx.get("max_batch", 32))
            bad = [r["case"] for r in report["stress"] if not r["passed"]]
            if bad:
                report["failures"].append(f"stress inputs disagree or overflow: {', '.join(bad)}")
                report["passed"] = False
    report.update(
        {
            "candidate_spec": args.backend,
            "reference_spec": args.reference,
            "model": model_name,
            "heads": heads,
            "split": args.split,
            "cohort_sha256": cohort.sha256(),
        }
    )
    report["_probabilities"] = (sigmoid(ref_out[0][:, 0]), sigmoid(cand_out[0][:, 0]), cohort.label)
    report["_reference_outputs"] = ref_out
    return report


def summary_table(r: dict) -> str:
    ref, cand = r["reference"], r["candidate"]
    ci = r["auc_difference_ci95"]
    rows = [
        ("accuracy", "accuracy"),
        ("AUC", "auc"),
        ("sensitivity", "sensitivity"),
        ("specificity", "specificity"),
        ("calibration error (ECE)", "ece"),
        ("mask Dice vs truth", "dice_vs_truth"),
    ]
    lines = ["| metric | reference | candidate | change |", "| --- | --- | --- | --- |"]
    for label, key in rows:
        if key in ref:
            lines.append(f"| {label} | {ref[key]:.4f} | {cand[key]:.4f} | {cand[key] - ref[key]:+.4f} |")
    lines.append(f"| AUC change, 95% bootstrap interval | | | [{ci['low']:+.4f}, {ci['high']:+.4f}] |")
    return "\n".join(lines)


def render_text(r: dict) -> str:
    verdict = "PASS" if r["passed"] else "FAIL"
    out = []
    for f in r["failures"]:
        out.append(f"FAIL: {f}")
    out.append(
        f"{r['candidate_spec']} vs {r['reference_spec']}: {r['nodes']} {r['split']} nodes, "
        f"tier {r['tier']}: {verdict}"
    )
    share = r["label_flips"] / r["nodes"]
    out.append(
        f"nodes changing diagnosis: {r['label_flips']} of {r['nodes']} ({share:.1%}); "
        f"max probability change {r['prob_max_abs']:.2e}"
        + (f"; predicted-mask Dice vs reference {r['mask_dice']:.4f}" if "mask_dice" in r else "")
    )
    out.append(summary_table(r))
    for f in r["flipped"][:10]:
        out.append(f"  flipped {f['node_id']}: {f['reference']:.3f} -> {f['candidate']:.3f}")
    for s in r.get("stress", []):
        state = "ok" if s["passed"] else "FAIL"
        out.append(f"  stress {s['case']}: {state} (max probability change {s['prob_max_abs']:.2e})")
    return "\n".join(out)


def write_report(r: dict, folder: Path) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    p_ref, p_cand, label = r["_probabilities"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4.5))
    ax1.scatter(p_ref, p_cand, s=8, c=np.where(label == 1, "tab:red", "tab:blue"), alpha=0.7)
    ax1.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax1.axvline(r["threshold"], color="gray", lw=0.6)
    ax1.axhline(r["threshold"], color="gray", lw=0.6)
    ax1.set(xlabel="reference probability", ylabel="candidate probability", title="per-node probability")
    bins = np.linspace(0, 1, 11)
    for name, p in (("reference", p_ref), ("candidate", p_cand)):
        which = np.clip(np.digitize(p, bins) - 1, 0, 9)
        xs = [p[which == b].mean() for b in range(10) if (which == b).any()]
        ys = [label[which == b].mean() for b in range(10) if (which == b).any()]
        ax2.plot(xs, ys, "o-", label=name)
    ax2.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax2.set(xlabel="predicted probability", ylabel="observed metastasis rate", title="reliability diagram")
    ax2.legend()
    fig.tight_layout()
    paths = {"json": folder / "verify.json", "markdown": folder / "verify.md", "plot": folder / "verify.png"}
    with atomic_path(paths["plot"]) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    write_json(paths["json"], public(r))
    md = [
        f"# Parity: {r['candidate_spec']}",
        "",
        "```",
        render_text(r),
        "```",
        "",
        summary_table(r),
        "",
        "![probabilities](verify.png)",
        "",
    ]
    with atomic_path(paths["markdown"]) as tmp:
        tmp.write_text("\n".join(md))
    return paths


def public(r: dict) -> dict:
    return {k: v for k, v in r.items() if not k.startswith("_")}


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="m2a-verify", description=__doc__.splitlines()[0])
    ap.add_argument("backend", metavar="BACKEND_SPEC", help=SPEC_HELP)
    ap.add_argument("--reference", default="torch:cpu")
    ap.add_argument("--model", default="m2anet_base", choices=list_models(), help="for torch specs")
    ap.add_argument("--heads", default="both", choices=["both", "cls"], help="for torch specs")
    ap.add_argument("--split", default="test", choices=list(SPLITS))
    ap.add_argument("--n", type=int, default=None, help="first N nodes of the split (default: all)")
    ap.add_argument("--tier", default="auto", choices=["auto", *TIERS])
    ap.add_argument("--threshold", type=float, default=None)
    ap.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    ap.add_argument("--no-stress", dest="stress", action="store_false")
    ap.add_argument("--stress-batch", type=int, default=None, help="default: the profile's max batch")
    ap.add_argument("--json", action="store_true", help="print the JSON report on stdout")
    ap.add_argument("--report", type=Path, default=None, help="write verify.json/.md/.png here")
    ap.add_argument("--diagnose", action="store_true", help="INT8: find the layers to keep in FP32")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.n is not None and args.n < 2:
        parser().error("--n must be >= 2 (AUC needs both classes)")
    try:
        report = verify(args)
        if args.diagnose and not report["passed"]:
            from m2anet.export.diagnose import diagnose_int8

            report["diagnosis"] = diagnose_int8(args, report)
    except (ValueError, RuntimeError, FileNotFoundError, KeyError) as e:
        print(f"m2a-verify: error: {e}", file=sys.stderr)
        return 2
    if args.report:
        write_report(report, args.report)
    if args.json:
        print(json.dumps(public(report), indent=2))
    else:
        print(render_text(report))
        if "diagnosis" in report:
            print(report["diagnosis"]["advice"])
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
