import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from m2anet import create_model
from m2anet.data import FRESH_SEED, GENERATOR_VERSION, SPLITS, load_split
from m2anet.metrics import binary_metrics, roc_auc
from m2anet.train import evaluate
from m2anet.weights import FITTED_AFTER_TRAINING, WeightsError, load_weights, save_weights, training_record


def test_round_trip(tmp_path):
    model = create_model("m2anet_small")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    save_weights(model, tmp_path / "w.safetensors", metadata={"model": "m2anet_small"})
    again = create_model("m2anet_small", weights=str(tmp_path / "w.safetensors"))
    for (k, a), b in zip(model.state_dict().items(), again.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]  # no temp file left behind


def test_torch_state_dict_loads_weights_only(tmp_path):
    model = create_model("m2anet_small")
    torch.save(model.state_dict(), tmp_path / "w.pt")
    create_model("m2anet_small", weights=str(tmp_path / "w.pt"))
    torch.save({"state_dict": model.state_dict(), "optimizer": object()}, tmp_path / "pickled.pt")
    with pytest.raises(WeightsError, match="weights-only"):
        create_model("m2anet_small", weights=str(tmp_path / "pickled.pt"))


def test_mismatch_names_the_first_bad_key(tmp_path):
    state = create_model("m2anet_small").state_dict()
    bad = dict(state)
    bad["s1.0.0.weight"] = torch.zeros(3, 1, 3, 3, 3)
    save_file(bad, str(tmp_path / "shape.safetensors"))
    with pytest.raises(WeightsError, match=r"'s1\.0\.0\.weight' has shape \(3, 1, 3, 3, 3\)"):
        create_model("m2anet_small", weights=str(tmp_path / "shape.safetensors"))
    missing = {k: v for k, v in state.items() if k != "head.3.bias"}
    save_file(missing, str(tmp_path / "missing.safetensors"))
    with pytest.raises(WeightsError, match=r"missing key 'head\.3\.bias'"):
        create_model("m2anet_small", weights=str(tmp_path / "missing.safetensors"))
    # base weights into small: m2a-train recorded the model they fit in the safetensors metadata
    with pytest.raises(
        WeightsError, match=r"another config \(m2anet_base, by its metadata: pass --model m2anet_base\)$"
    ):
        load_weights(create_model("m2anet_small"), "m2anet_base")
    (tmp_path / "junk.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="not a valid safetensors file"):
        create_model("m2anet_small", weights=str(tmp_path / "junk.safetensors"))
    with pytest.raises(WeightsError, match="not found"):
        create_model("m2anet_small", weights=str(tmp_path / "absent.safetensors"))


def test_weights_from_before_the_outline_term_load_with_the_identity(tmp_path):
    """A trained checkpoint has no fitted outline term yet (m2a-train writes it, --fit-outline reads it):
    it loads with the term that leaves its logit as it was trained, whatever the model held before."""
    trained = create_model("m2anet_small")
    state = {k: v for k, v in trained.state_dict().items() if k not in FITTED_AFTER_TRAINING}
    save_file(state, str(tmp_path / "trained.safetensors"))
    model = create_model("m2anet_small")
    with torch.no_grad():
        model.outline_weight.copy_(torch.tensor([0.5, 1.0, 1.0, 1.0]))
    load_weights(model, tmp_path / "trained.safetensors")
    for key in FITTED_AFTER_TRAINING:
        torch.testing.assert_close(model.state_dict()[key], trained.state_dict()[key], rtol=0, atol=0)


def test_a_checkpoint_path_without_a_suffix_is_a_file_not_a_model_name(tmp_path, monkeypatch):
    """Before, any name without a suffix was looked up as a shipped model: "no shipped weights"."""
    model = create_model("m2anet_small")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    torch.save(model.state_dict(), tmp_path / "last")
    save_weights(model, tmp_path / "best")  # safetensors, recognised by its header
    monkeypatch.chdir(tmp_path)
    for path in (str(tmp_path / "last"), str(tmp_path / "best"), "last"):
        again = create_model("m2anet_small", weights=path)
        for (k, a), b in zip(model.state_dict().items(), again.state_dict().values(), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"{path}: {k}")
    with pytest.raises(WeightsError, match=r"weights file .*/absent not found"):
        create_model("m2anet_small", weights=str(tmp_path / "absent"))
    with pytest.raises(WeightsError, match="no shipped weights for 'm2anet_tiny' and no file of that name"):
        create_model("m2anet_small", weights="m2anet_tiny")


def test_classification_only_model_takes_the_two_head_checkpoint():
    both = create_model("m2anet_small", pretrained=True)
    cls = create_model("m2anet_small", pretrained=True, heads="cls")
    ct = torch.rand(2, 1, 16, 64, 64)
    mask = (torch.rand(2, 1, 16, 64, 64) > 0.9).float()
    with torch.no_grad():
        torch.testing.assert_close(both(ct, mask)[0], cls(ct, mask)[0])


PREFIX = {"test": 8, "fresh": 16}
"""Nodes the shipped weights are run on, of the test split and of the fresh cohort: their probabilities
must be the record's. The record's metrics are then checked on its own per-node probabilities and labels
of the whole split and cohort (600 fresh nodes through m2anet_base take minutes on two cores)."""

STUDY = Path(__file__).parents[1] / "docs" / "cohort-study" / "cohort_study.json"
"""The cohort study of the shipped generator (`python -m m2anet.cli.cohort_study`): the radiomics reader and
the label-model ceiling on the same fresh cohort, which the README's table sets beside the weights."""


@pytest.fixture(scope="module", params=["m2anet_small", "m2anet_base"])
def shipped(request):
    """(name, record, {"test": ..., "fresh": ...}: the two-head model run again on the first nodes)."""
    record = training_record(request.param)
    model = create_model(request.param, pretrained=True)
    cohorts = {
        "test": load_split("test", n=PREFIX["test"]),
        "fresh": load_split("test", n=PREFIX["fresh"], seed=record["fresh"]["seed"]),
    }
    again = {k: evaluate(model, c, record["threshold"], per_node=True) for k, c in cohorts.items()}
    return request.param, record, again


def _metrics(stored: dict, threshold: float) -> dict:
    prob, label = np.array(stored["probability"]), np.array(stored["label"])
    assert len(prob) == len(label) == stored["nodes"]
    return {**binary_metrics(label, prob, threshold), "auc": roc_auc(label, prob)}


def test_shipped_weights_reproduce_their_record(shipped):
    _name, record, again = shipped
    for split, fresh in again.items():
        stored = record[split]
        np.testing.assert_allclose(fresh["probability"], stored["probability"][: PREFIX[split]], atol=1e-4)
        assert fresh["label"] == stored["label"][: PREFIX[split]]
        recomputed = _metrics(stored, record["threshold"])
        assert abs(recomputed["accuracy"] - stored["accuracy"]) <= 0.005
        assert abs(recomputed["auc"] - stored["auc"]) <= 0.005
        assert np.isfinite(fresh["dice"]) and fresh["dice"] > 0.5
    assert record["fresh"]["seed"] == FRESH_SEED and FRESH_SEED not in [seed for seed, _ in SPLITS.values()]


def test_shipped_weights_beat_the_size_rule(shipped):
    """Against the rule applied to the short axis measured on the same contour the model sees."""
    _name, record, _ = shipped
    rule, test = record["test_size_rule"]["contour"], record["test"]
    assert test["accuracy"] > rule["accuracy"] and test["auc"] > rule["auc"]


GOALS = {"m2anet_small": {"accuracy": 0.77, "auc": 0.83}, "m2anet_base": {"accuracy": 0.80, "auc": 0.86}}
"""Issue 14's goals for each config on the fresh cohort, at the shipped threshold."""
CEILING_GAP = 0.07
"""Issue 14: within this AUC of the label model on the signs alone (what no reader sees exactly)."""


def test_shipped_weights_on_a_fresh_cohort(shipped):
    """On 600 nodes of a seed no training run saw, at the shipped threshold: the config's own goals, a higher
    AUC than the cohort study's radiomics reader, accuracy and AUC above the 10 mm rule on the contour the
    model sees and on the generator's true diameter, and within CEILING_GAP of the signs-only label model."""
    name, record, _ = shipped
    fresh = _metrics(record["fresh"], record["threshold"])
    goal = GOALS[name]
    assert fresh["accuracy"] >= goal["accuracy"] and fresh["auc"] >= goal["auc"], (name, fresh)
    for rule in ("contour", "oracle"):
        size = record["fresh"]["size_rule"][rule]
        assert fresh["accuracy"] > size["accuracy"] and fresh["auc"] > size["auc"], (name, rule, size)
    study = json.loads(STUDY.read_text(encoding="utf-8"))
    assert study["generator_version"] == GENERATOR_VERSION  # the readers the README compares with
    readers = study["ceilings"][f"fresh (seed {record['fresh']['seed']}, {record['fresh']['nodes']} nodes)"]
    assert fresh["auc"] > readers["radiomics reader"]["auc"], (name, fresh, readers["radiomics reader"])
    assert readers["label model, signs only"]["auc"] - fresh["auc"] <= CEILING_GAP, (name, fresh)
