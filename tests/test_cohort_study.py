"""The cohort study (issue 14): its report, and the measurements it rests on."""

import json

import numpy as np

from m2anet.cli import cohort_study as cli
from m2anet.cohort_study import FEATURES, SIGN_MEASUREMENTS, rendered_nodes, simulate_label_model
from m2anet.data import load_split
from m2anet.metrics import accuracy_threshold, binary_metrics


def test_rendered_nodes_are_the_split_nodes():
    """The study measures exactly what load_split gives the model, with the signs read back."""
    split = load_split("val", n=4)
    nodes = list(rendered_nodes(3003, 4))
    np.testing.assert_array_equal(np.stack([n.ct for n in nodes]), split.ct[:, 0])
    np.testing.assert_array_equal(np.stack([n.mask for n in nodes]), split.mask[:, 0])
    assert [n.label for n in nodes] == split.label.tolist()
    np.testing.assert_allclose([n.signs.short_axis_mm for n in nodes], split.short_axis_mm, rtol=1e-6)


def test_label_model_terms_and_ceilings():
    sim = simulate_label_model(20_000, seed=5, progress=False)
    summary = sim.summary()
    # every sign of NodeSigns moves the label today; the patient effect is reported beside them
    assert set(summary["logit_sd"]) == {*SIGN_MEASUREMENTS, "patient_effect"}
    # the terms add up to the signs' logit (up to a constant): nothing is missed or counted twice
    residual = sim.signs_logit - sum(sim.terms.values())
    assert residual.std() < 1e-9
    # knowing the patient effect helps; hiding the two heaviest signs costs more
    assert summary["with_patient_effect"]["auc"] > summary["signs_only"]["auc"]
    hidden = sim.without(["heterogeneity", "roundness"])
    assert hidden["auc"] < summary["signs_only"]["auc"] - 0.03


def test_accuracy_threshold_is_the_best_one():
    rng = np.random.default_rng(0)
    for _ in range(50):
        label = rng.random(30) < 0.35
        score = np.round(rng.normal(size=30) + label, 1)  # ties included
        best = max(binary_metrics(label, score, float(t))["accuracy"] for t in np.unique(score))
        assert binary_metrics(label, score, accuracy_threshold(label, score))["accuracy"] == best


def test_report(tmp_path, capsys):
    args = ["--out", str(tmp_path), "--quiet", "--nodes", "40", "--sim-nodes", "2000"]
    args += ["--val-nodes", "20", "--test-nodes", "20", "--fresh-nodes", "20"]
    assert cli.main(args) == 0
    assert "signs the image does not carry" in capsys.readouterr().out
    report = json.loads((tmp_path / "cohort_study.json").read_text(encoding="utf-8"))
    assert report["command"].startswith("python -m m2anet.cli.cohort_study --out")
    vis = report["visibility"]
    assert vis["nodes"] == 100
    assert {row["sign"] for row in vis["signs"]} == set(SIGN_MEASUREMENTS)
    for row in vis["signs"]:
        assert row["measurement"] in SIGN_MEASUREMENTS[row["sign"]]
        assert row["flagged"] == (row["logit_sd"] >= 1 and abs(row["r"]) < 0.6)
    # the contour's short axis follows the true one: the measurements read the right voxels
    assert vis["correlations"]["short_axis_mm"]["contour_short_axis_mm"] > 0.8
    assert vis["correlations"]["roundness"]["contour_moment_roundness"] > 0.5
    assert report["reader"]["features"] == list(FEATURES)
    assert len(report["ceilings"]) == 2
    for rows in report["ceilings"].values():
        assert set(rows) == {
            "label model, with patient effect",
            "label model, signs only",
            "radiomics reader",
            "size rule, contour",
            "size rule, true diameter",
        }
        assert all(0 <= m["accuracy"] <= 1 and 0 <= m["auc"] <= 1 for m in rows.values())
    text = (tmp_path / "cohort_study.md").read_text(encoding="utf-8")
    assert "| sign | logit SD | best measurement | r | flagged |" in text
    assert text.count("| reader | accuracy | sensitivity | specificity | AUC |") == 3
