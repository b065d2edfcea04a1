import numpy as np
import pytest

from m2anet.contract import PATCH_SHAPE
from m2anet.data import SIGN_NAMES, SPLITS, load_split


def test_same_seed_same_arrays_and_prefix_stability():
    a, b = load_split("calib", n=5), load_split("calib", n=5)
    for field in ("ct", "mask", "seg", "label", "patient_id", "node_id"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    longer = load_split("calib", n=9)
    np.testing.assert_array_equal(longer.ct[:5], a.ct)
    assert a.sha256() == b.sha256() != longer.sha256()


def test_other_seed_gives_a_fresh_cohort():
    a, b = load_split("val", n=4), load_split("val", n=4, seed=77)
    assert not np.array_equal(a.ct, b.ct)
    assert not set(a.patient_id) & set(b.patient_id)


def test_worker_processes_draw_the_same_cohort():
    """Each node has its own generator, spawned in order before any worker starts."""
    assert load_split("calib", n=10, workers=2).sha256() == load_split("calib", n=10, workers=1).sha256()


def test_arrays_are_model_inputs():
    c = load_split("train", n=8)
    assert c.ct.shape == c.mask.shape == c.seg.shape == (8, 1, *PATCH_SHAPE)
    assert c.ct.dtype == c.mask.dtype == np.float32
    assert c.ct.min() >= 0.0 and c.ct.max() <= 1.0
    assert set(np.unique(c.mask)) <= {0.0, 1.0} and set(np.unique(c.seg)) <= {0.0, 1.0}
    assert (c.seg.sum(axis=(1, 2, 3, 4)) > 0).all()
    # the node sits near the patch centre and the noisy contour still overlaps it
    overlap = (c.mask * c.seg).sum(axis=(1, 2, 3, 4)) / c.seg.sum(axis=(1, 2, 3, 4))
    assert (overlap > 0.3).all()
    _z, y, x = np.nonzero(c.seg[0, 0])
    assert abs(y.mean() - 31.5) < 10 and abs(x.mean() - 31.5) < 10
    # the signs training supervises are the node's own: its short axis, and yes/no signs as 0/1
    assert c.signs.shape == (8, len(SIGN_NAMES)) and c.signs.dtype == np.float32
    np.testing.assert_array_equal(c.signs[:, SIGN_NAMES.index("short_axis_mm")], c.short_axis_mm)
    for name in ("necrosis", "fatty_hilum", "calcified"):
        assert set(np.unique(c.signs[:, SIGN_NAMES.index(name)])) <= {0.0, 1.0}


def test_splits_are_disjoint_by_patient_and_grouped(test_split):
    # the test split's first nodes are the session's (prefix stability is tested above)
    ids = {name: set(load_split(name, n=12).patient_id) for name in SPLITS if name != "test"}
    ids["test"] = set(test_split.patient_id[:12])
    names = list(ids)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not ids[a] & ids[b], (a, b)
    counts = np.unique(test_split.patient_id[:40], return_counts=True)[1]
    assert counts[:-1].min() >= 2 and counts.max() <= 6  # the last patient may be cut by n


def test_label_model_is_realistic(test_split):
    """Best achievable accuracy 85-92%; the size rule well below it; both classes present."""
    p, y = test_split.bayes_probability, test_split.label
    assert 0.83 <= np.mean((p >= 0.5) == y) <= 0.93
    assert 0.2 < y.mean() < 0.6
    assert np.mean((test_split.short_axis_mm >= 10) == y) < np.mean((p >= 0.5) == y) - 0.05


def test_unknown_split():
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        load_split("dev")
