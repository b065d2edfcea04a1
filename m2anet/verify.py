"""Is a deployed artifact clinically equivalent to the PyTorch FP32 reference? (`m2a-verify`)

Runs the reference and the candidate on the same labelled synthetic nodes and reports tensor
agreement, the nodes whose diagnosis changes, task metrics side by side (with a bootstrap
interval of the AUC change), and stress inputs no split contains (random masks, empty
background, extreme HU, the profile's largest batch) where FP16 overflow or INT8 saturation
would show.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np

from m2anet.data import load_split
from m2anet.engines import Backend, BackendSpec, open_backend, run_cohort
from m2anet.export.diagnose import diagnose_int8
from m2anet.io import atomic_path, write_json
from m2anet.manifest import artifact_entry, read_manifest, verified_weights
from m2anet.metrics import sigmoid
from m2anet.parity import TIERS, compare, judge_stress, stress_inputs, stress_outputs
from m2anet.weights import training_record

matplotlib.use("Agg")
import matplotlib.pyplot as plt


@dataclass
class VerifyOptions:
    """What `m2a-verify` takes; every field but `backend` has the command line's default."""

    backend: str
    reference: str = "torch:cpu"
    model: str | None = None
    """For torch specs (default m2anet_base); an artifact or server knows its own and refuses another."""
    heads: str | None = None
    """For torch specs (default both); as `model` otherwise."""
    split: str = "test"
    n: int | None = None
    tier: str = "auto"
    threshold: float | None = None
    seed: int = 0
    stress: bool = True
    stress_batch: int | None = None
    diagnose: bool = False


@dataclass
class Verification:
    report: dict[str, Any]
    """JSON-ready: tensor error, flips, metrics, stress rows, pass/fail and why."""
    reference_probability: np.ndarray
    candidate_probability: np.ndarray
    label: np.ndarray


def artifact_context(spec: BackendSpec) -> dict[str, Any]:
    """Model, heads, weights and threshold of the artifact a spec opens (if any)."""
    path = spec.artifact
    if path is None:
        return {}
    artifact_entry(path, verify=False)  # listed in the manifest (the backend verifies the hash when it opens)
    manifest = read_manifest(path.parent)
    m = manifest["model"]
    return {
        "model_name": m["name"],
        "heads": m["heads"],
        "weights": str(verified_weights(m)),
        "threshold": m["threshold"],
        "max_batch": manifest["batch_profile"]["max"],
        "artifact": str(path),
    }


def served_context(backend: Backend) -> dict[str, Any]:
    """What `m2a-triton` recorded in the served model's config: model, heads, threshold (the reference
    runs the shipped weights of that model; the backend reads the precision from the same record)."""
    params: dict[str, str] = getattr(backend, "parameters", {})
    keys = {"model_name": "m2anet_model", "heads": "m2anet_heads"}
    ctx: dict[str, Any] = {k: params[p] for k, p in keys.items() if p in params}
    if "m2anet_threshold" in params:
        ctx["threshold"] = float(params["m2anet_threshold"])
    return ctx


def verify(options: VerifyOptions) -> Verification:
    """Run reference and candidate on the same nodes and judge the candidate by its precision's tier;
    with `diagnose`, a failing INT8 graph also gets the layers to keep in FP32."""
    spec = BackendSpec.parse(options.backend)
    with contextlib.ExitStack() as stack:
        model_name, heads = options.model or "m2anet_base", options.heads or "both"
        if spec.kind.startswith("torch"):
            ctx: dict[str, Any] = {}
            cand = stack.enter_context(open_backend(spec, model_name=model_name, heads=heads))
        else:  # artifacts and servers know their model
            ctx = artifact_context(spec)
            cand = stack.enter_context(open_backend(spec))
            ctx = ctx or served_context(cand)
            asked = {"model": ("model_name", options.model), "heads": ("heads", options.heads)}
            for flag, (key, value) in asked.items():
                if value is not None and ctx.get(key, value) != value:
                    raise ValueError(
                        f"--{flag} {value} does not match {spec.label}, which holds {ctx[key]}: "
                        f"drop --{flag} (an artifact or a served model knows its own)"
                    )
            model_name, heads = ctx.get("model_name", model_name), ctx.get("heads", heads)
        threshold = options.threshold or ctx.get("threshold") or training_record(model_name)["threshold"]
        model_opts = {"model_name": model_name, "heads": heads, "weights": ctx.get("weights")}
        reference = stack.enter_context(open_backend(options.reference, **model_opts))
        cohort = load_split(options.split, n=options.n)  # after the backends: a bad spec fails at once
        # what runs, not what was asked or recorded: TF32 asked of a pre-Ampere GPU runs and is judged as
        # FP32; an FP32 graph runs in TF32 on ONNX Runtime's TensorRT provider (ort_backend.precision_run)
        precision = cand.precision
        tier_name = precision if options.tier == "auto" else options.tier
        if tier_name not in TIERS:
            raise ValueError(f"no parity tier for precision {tier_name!r}: pass --tier {'|'.join(TIERS)}")
        ref_out = run_cohort(reference, cohort, desc=f"reference {reference.name}")
        cand_out = run_cohort(cand, cohort, desc=f"candidate {cand.name}")
        report = compare(ref_out, cand_out, cohort, float(threshold), TIERS[tier_name], seed=options.seed)
        if options.stress:
            inputs = stress_inputs(cohort, options.stress_batch or ctx.get("max_batch", 32))
            judge_stress(report, stress_outputs(reference, inputs), stress_outputs(cand, inputs))
    report.update(
        {
            "candidate_spec": options.backend,
            "precision": precision,
            "reference_spec": options.reference,
            "model": model_name,
            "heads": heads,
            "split": options.split,
            "cohort_sha256": cohort.sha256(),
        }
    )
    if options.diagnose and not report["passed"]:
        if spec.kind != "ort" or spec.artifact is None:
            raise ValueError(
                "--diagnose needs an INT8 ONNX artifact: m2a-verify ort:cpu:FOLDER/model.int8.onnx"
            )
        report["diagnosis"] = diagnose_int8(spec.artifact, ref_out, cohort, float(threshold))
    return Verification(report, sigmoid(ref_out[0][:, 0]), sigmoid(cand_out[0][:, 0]), cohort.label)


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


def write_report(v: Verification, folder: Path) -> dict[str, Path]:
    """verify.json, verify.md and verify.png (per-node probabilities and reliability diagram)."""
    r = v.report
    p_ref, p_cand, label = v.reference_probability, v.candidate_probability, v.label
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
    write_json(paths["json"], r)
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
        tmp.write_text("\n".join(md), encoding="utf-8")
    return paths
