import numpy as np
import pytest
import torch

from m2anet import create_model, list_models, model_stats
from m2anet.contract import PATCH_SHAPE
from m2anet.model import (
    S3_SHAPE,
    S3_SPACING_MM,
    ContourOutline,
    ContourShape,
    IntensityStats,
    SoftMaskExpansion,
    _invariants,
    fold_batchnorm,
)
from m2anet.parity import FP32_LOGIT_TOLERANCE


@pytest.mark.parametrize("name", ["m2anet_small", "m2anet_base"])
@pytest.mark.parametrize("heads", ["both", "cls"])
@pytest.mark.parametrize("batch", [1, 5])
def test_output_shapes_and_dtypes(name, heads, batch):
    model = create_model(name, heads=heads)
    ct = torch.rand(batch, 1, *PATCH_SHAPE)
    mask = torch.zeros_like(ct)
    mask[:, :, 6:10, 28:36, 28:36] = 1
    with torch.no_grad():
        out = model(ct, mask)
    assert len(out) == (2 if heads == "both" else 1)
    assert out[0].shape == (batch, 1) and out[0].dtype == torch.float32
    if heads == "both":
        assert out[1].shape == (batch, 1, *PATCH_SHAPE) and out[1].dtype == torch.float32
    assert all(torch.isfinite(o).all() for o in out)


def test_batch_rows_are_independent_in_eval():
    model = create_model("m2anet_small")
    ct, mask = torch.rand(3, 1, *PATCH_SHAPE), (torch.rand(3, 1, *PATCH_SHAPE) > 0.8).float()
    with torch.no_grad():
        full = model(ct, mask)[0]
        single = model(ct[1:2], mask[1:2])[0]
    torch.testing.assert_close(full[1:2], single, atol=1e-5, rtol=1e-4)


def test_registry_and_unknown_name():
    assert list_models() == ["m2anet_base", "m2anet_small"]
    with pytest.raises(ValueError, match="unknown model 'resnet'"):
        create_model("resnet")
    with pytest.raises(ValueError, match="heads"):
        create_model("m2anet_small", heads="seg")


def test_stats_match_the_design():
    base, base_cls = model_stats("m2anet_base"), model_stats("m2anet_base", heads="cls")
    assert 6e6 <= base["params"] <= 8e6
    assert 14e9 <= base["flops_per_node"] <= 17e9
    assert base_cls["flops_per_node"] < 0.6 * base["flops_per_node"]
    small = model_stats("m2anet_small")
    assert small["flops_per_node"] < base["flops_per_node"] / 3


def _ball(radius_vox: float) -> torch.Tensor:
    z, y, x = torch.meshgrid(*(torch.arange(n) - n / 2 + 0.5 for n in PATCH_SHAPE), indexing="ij")
    return ((z * 3.0 / 0.8) ** 2 + y**2 + x**2 <= radius_vox**2).float()[None, None]


def test_soft_mask_expansion_rings():
    sme = SoftMaskExpansion()
    with torch.no_grad():
        sme.near_logits.copy_(torch.tensor([0.3, -1.0, 2.0]))
        sme.far_logits.copy_(torch.tensor([1.0, 0.0, -0.5, 0.7, 2.0]))
        rings = sme(_ball(12.0))[0]  # (3, 16, 16, 16)
    assert rings.min() >= 0 and rings.max() <= 1
    centre = (8, 8, 8)
    assert torch.all(rings[(slice(None), *centre)] == 1)
    # monotone outward along the in-plane ray from the centre, and wider for the outer rings
    for ring in rings:
        ray = ring[8, 8, 8:]
        assert torch.all(ray[1:] <= ray[:-1] + 1e-6)
    assert rings[1].sum() > rings[0].sum() and rings[2].sum() > rings[1].sum()
    assert torch.all(rings[1] >= rings[0] - 1e-6)


def _ellipsoid(semi_axes_mm: tuple[float, float, float]) -> torch.Tensor:
    """A solid ellipsoid on the S3 grid, semi-axes along (z, y, x)."""
    grid = np.meshgrid(*(np.arange(n) - (n - 1) / 2 for n in S3_SHAPE), indexing="ij")
    r2 = sum((g * sp / a) ** 2 for g, sp, a in zip(grid, S3_SPACING_MM, semi_axes_mm, strict=True))
    return torch.from_numpy((r2 <= 1).astype(np.float32))[None, None]


def test_covariance_invariants_are_those_of_the_eigenvalues():
    """Trace, sum of pairwise products and product of the eigenvalues, from the six entries in the order
    (zz, yy, xx, zy, yx, xz) that `_invariants` pairs with rolls."""
    a = torch.randn(64, 3, 3, dtype=torch.float64)
    cov = a @ a.transpose(1, 2)
    rows = torch.stack([cov[:, i, j] for i, j in ((0, 0), (1, 1), (2, 2), (0, 1), (1, 2), (2, 0))], dim=1)
    lam = torch.linalg.eigvalsh(cov)
    pairs = lam[:, 0] * lam[:, 1] + lam[:, 0] * lam[:, 2] + lam[:, 1] * lam[:, 2]
    for got, want in zip(_invariants(rows), (lam.sum(1), pairs, lam.prod(1)), strict=True):
        torch.testing.assert_close(got, want)


def test_contour_shape_is_invariant_and_tracks_the_short_axis():
    shape = ContourShape(eps=1e-3)
    node = _ellipsoid((12.0, 20.0, 8.0))
    long, middle, short = shape(node)[0]
    assert long > middle > short > 0
    for moved in (node.flip(2), node.flip(3, 4), node.transpose(3, 4)):  # flips, in-plane rotation
        torch.testing.assert_close(shape(moved), shape(node))
    shorts = [shape(_ellipsoid((15.0, 15.0, c)))[0, 2].item() for c in (4.0, 7.0, 10.0, 13.0)]
    assert shorts == sorted(shorts) and len(set(shorts)) == 4
    empty = shape(torch.zeros_like(node))
    assert torch.equal(empty, torch.zeros_like(empty))


def test_contour_outline_is_the_cohort_studys_measure_of_the_same_contour():
    """Axial roundness and sphericity equal `node_features` on the study's own nodes (exact eigenvalues and
    voxel faces); moment roundness is its invariant-based stand-in, which must rank nodes alike."""
    from m2anet.cohort_study import node_features, rendered_nodes

    outline = ContourOutline(eps=1e-3).double()
    mine, study = [], []
    for node in rendered_nodes(3003, 12):
        mine.append(outline(torch.from_numpy(node.mask > 0.5).double()[None, None])[0].numpy())
        f = node_features(node.ct, node.mask)
        study.append(
            [f[k] for k in ("contour_moment_roundness", "contour_axial_roundness", "contour_sphericity")]
        )
    mine, study = np.array(mine), np.array(study)
    np.testing.assert_allclose(mine[:, 1:], study[:, 1:], rtol=1e-3)  # eps in the denominators
    assert np.corrcoef(mine[:, 0], study[:, 0])[0, 1] > 0.9
    empty = ContourOutline(eps=1e-3)(torch.zeros(1, 1, *PATCH_SHAPE))
    assert torch.isfinite(empty).all()


def test_the_outline_term_is_the_identity_until_fitted():
    model = create_model("m2anet_small").eval()
    ct, mask = torch.rand(3, 1, *PATCH_SHAPE), _ball(6.0).expand(3, -1, -1, -1, -1)
    with torch.no_grad():
        head = torch.randn(3, 1)
        torch.testing.assert_close(model.outline_logit(head, mask), head, rtol=0, atol=0)
        model.outline_weight.copy_(torch.tensor([1.0, 0.0, 0.0, 2.0]))
        moved = model.outline_logit(head, mask) - head
        sphericity = (model.outline(mask)[:, 2:] - model.outline_mean[2]) / model.outline_std[2]
        torch.testing.assert_close(moved, 2.0 * sphericity)
        assert model(ct, mask)[0].shape == (3, 1)


def test_encoder_does_not_see_the_mask_and_pooling_does():
    model = create_model("m2anet_small")
    ct = torch.rand(1, 1, *PATCH_SHAPE)
    m1, m2 = _ball(6.0), torch.roll(_ball(6.0), 12, dims=4)
    with torch.no_grad():
        a, b = model(ct, m1), model(ct, m2)
    torch.testing.assert_close(a[1], b[1])  # segmentation from the CT only
    assert not torch.allclose(a[0], b[0])  # classification depends on which node is masked


def test_descriptors_are_standardised_with_training_statistics_saved_in_the_weights():
    from m2anet.data import load_split
    from m2anet.train import _standardise_descriptors

    model = create_model("m2anet_small")
    cohort = load_split("val", n=12)
    _standardise_descriptors(model, cohort)
    ct, mask = torch.from_numpy(cohort.ct), torch.from_numpy(cohort.mask)
    with torch.no_grad():
        for name, values in (
            ("geometry", model.geometry(model.sme(mask))),
            ("intensity", model.intensity(ct, mask)),
        ):
            z = (values - getattr(model, f"{name}_mean")) / getattr(model, f"{name}_std")
            torch.testing.assert_close(z.mean(0), torch.zeros(z.shape[1]), atol=1e-5, rtol=0)
            torch.testing.assert_close(z.std(0), torch.ones(z.shape[1]))
            assert {f"{name}_mean", f"{name}_std"} <= set(model.state_dict())


def _hu(value: float) -> float:
    return (value + 175.0) / 450.0


def test_intensity_stats_read_mean_spread_a_hypodense_core_and_fat():
    """A uniform node at 40 HU, the same node with a 0 HU core, and with a fat (-90 HU) part."""
    stats = IntensityStats(eps=1e-3)
    node = _ball(8.0)
    uniform = torch.full_like(node, _hu(-100.0)) * (1 - node) + _hu(40.0) * node
    core = uniform.clone()
    core[_ball(4.0).bool()] = _hu(0.0)
    fat = uniform.clone()
    fat[..., 32:] = torch.where(node[..., 32:].bool(), _hu(-90.0), fat[..., 32:])
    names = ("mean", "sd", "interior_mean", "interior_sd", "rim_excess", "low", "fat", "bright")
    u, c, f = (dict(zip(names, stats(x, node)[0].tolist(), strict=True)) for x in (uniform, core, fat))
    assert abs(u["interior_mean"] - _hu(40.0)) < 0.003 and u["interior_sd"] < 0.01  # within about 1 and 4 HU
    assert u["mean"] < u["interior_mean"]  # the contour's edge voxels are smoothed with the fat around
    assert u["low"] < 0.1 and u["fat"] < 0.01 and u["bright"] < 0.01  # soft fractions: 10 HU wide steps
    assert c["low"] > u["low"] + 0.05 and c["rim_excess"] > u["rim_excess"] + 0.01 and c["interior_sd"] > 0.02
    assert f["fat"] > 0.2 and f["low"] > 0.2 and f["interior_mean"] < u["interior_mean"]
    assert stats(uniform, torch.zeros_like(node)).isfinite().all()  # an empty contour stays finite


@pytest.mark.parametrize("name", ["m2anet_small", "m2anet_base"])
def test_folding_batchnorm_keeps_the_function_and_drops_every_norm(name):
    model = create_model(name, pretrained=True)
    ct, mask = torch.randn(2, 1, *PATCH_SHAPE), (torch.rand(2, 1, *PATCH_SHAPE) > 0.9).float()
    with torch.no_grad():
        before = model(ct, mask)
        folded = fold_batchnorm(model)
        after = folded(ct, mask)
    assert not any(isinstance(m, torch.nn.BatchNorm3d) for m in folded.modules())
    for key, a, b in zip(FP32_LOGIT_TOLERANCE, before, after, strict=True):  # an FP32 rewrite: the fp32 tier
        torch.testing.assert_close(a, b, rtol=0, atol=FP32_LOGIT_TOLERANCE[key], msg=key)
    with pytest.raises(ValueError, match="eval mode"):
        fold_batchnorm(create_model(name).train())
