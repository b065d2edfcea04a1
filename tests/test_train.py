import functools
import json

import pytest
import torch
import torch.nn.functional as F

from m2anet import create_model
from m2anet import train as training
from m2anet.data import FRESH_SEED, load_split
from m2anet.weights import FITTED_AFTER_TRAINING, save_weights

OPTIONS = {"epochs": 2, "n_train": 8, "batch": 4, "threshold_rule": "accuracy"}
"""Two steps an epoch; the first 8 training nodes hold both classes."""


@pytest.fixture
def tiny_splits(monkeypatch):
    """val, test and the fresh cohort cut to 8 nodes: the run is what is under test, not the metrics."""
    cut = functools.cache(lambda name, n, seed: load_split(name, n=n, seed=seed))  # once for every run
    monkeypatch.setattr(
        training, "load_split", lambda name, n=None, seed=None: cut(name, n if name == "train" else 8, seed)
    )


@pytest.fixture
def deterministic():
    """As m2a-train runs on the CPU; restored afterwards for the other tests."""
    before = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    torch.use_deterministic_algorithms(True, warn_only=True)
    yield
    torch.use_deterministic_algorithms(before[0], warn_only=before[1])


def _train(checkpoint=None, **extra):
    return training.train("m2anet_small", checkpoint=checkpoint, **{**OPTIONS, **extra})


def test_a_run_killed_after_an_epoch_resumes_to_the_uninterrupted_weights(
    tiny_splits, deterministic, tmp_path, monkeypatch
):
    want, want_record = _train()

    real_step, steps = training.TrainSteps.__call__, []

    def killed_in_epoch_two(self, gen, idx):
        steps.append(idx)
        if len(steps) == 3:  # two steps an epoch: the first epoch and its checkpoint are done
            raise KeyboardInterrupt
        return real_step(self, gen, idx)

    checkpoint = tmp_path / "run.checkpoint.pt"
    monkeypatch.setattr(training.TrainSteps, "__call__", killed_in_epoch_two)
    with pytest.raises(KeyboardInterrupt):
        _train(checkpoint)
    monkeypatch.setattr(training.TrainSteps, "__call__", real_step)
    assert checkpoint.is_file()

    got, record = _train(checkpoint)
    for (name, a), b in zip(want.state_dict().items(), got.state_dict().values(), strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=name)
    assert record["history"] == want_record["history"] and record["threshold"] == want_record["threshold"]
    assert record["fresh"]["seed"] == FRESH_SEED and len(record["fresh"]["probability"]) == 8

    with pytest.raises(ValueError, match=r"is of another run \(lr, seed differ\): pass the options"):
        _train(checkpoint, seed=1, lr=1e-3)
    checkpoint.write_bytes(b"half a checkpoint")
    with pytest.raises(ValueError, match=r"cannot be read .*: delete it to start over"):
        _train(checkpoint)


def test_the_outline_term_is_fitted_on_the_frozen_network(tiny_splits, tmp_path):
    """`m2a-train --fit-outline`: only the outline term changes, to the logistic regression's optimum on the
    fit nodes (the trained logit alone is one of the candidates it beats), and the record keeps the run."""
    trained = create_model("m2anet_small")
    init = tmp_path / "m2anet_small.safetensors"
    save_weights(trained, init)
    init.with_suffix(".json").write_text(json.dumps({"run": "the training run"}), encoding="utf-8")
    fitted, record = training.fit_outline_term("m2anet_small", init, n_fit=16)
    for key, value in trained.state_dict().items():
        if key not in FITTED_AFTER_TRAINING:
            torch.testing.assert_close(fitted.state_dict()[key], value, rtol=0, atol=0, msg=key)
    assert not torch.equal(fitted.outline_weight, trained.outline_weight)
    fit = training.load_split("train", n=16, seed=training.OUTLINE_FIT_SEED)  # the fixture's, drawn once
    label = torch.from_numpy(fit.label).float()
    with torch.no_grad():
        losses = [
            F.binary_cross_entropy_with_logits(
                m.eval()(torch.from_numpy(fit.ct), torch.from_numpy(fit.mask))[0][:, 0], label
            )
            for m in (trained, fitted)
        ]
    assert losses[1] < losses[0]
    assert record["init"]["previous_record"] == {"run": "the training run"}
    assert record["outline_fit"]["nodes"] == 16 and len(record["fresh"]["probability"]) == 8
    assert 0.0 < record["threshold"] < 1.0
