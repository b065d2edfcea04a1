"""M2ANet: multi-task, multi-scale mask-attention network for lymph-node metastasis.

This is a *reconstruction* of M2ANet (Med Biol Eng Comput 2025, doi 10.1007/s11517-025-03391-1):
the paper's code and full text are not public, only its abstract, which describes soft
expansion of the node mask, mask-guided attention aggregation of image features at several
scales, and two branches that predict the metastasis probability and the node mask together.
Every choice below that the abstract does not fix is ours, made so that the graph exports to
ONNX and TensorRT with static shapes except the batch: no Resize, adaptive pooling, NonZero,
TopK, GridSample, If/Loop or data-dependent shapes.

The forward pass follows the figure: encoder S1..S5 on the CT -> soft mask expansion of the
given node contour -> ring x attention pooling at S3, S4, S5 plus a global token -> gated
token fusion -> metastasis logit; a U-Net decoder from S5 predicts the node mask.

The geometry features (our addition) go to the head beside the fused tokens: the masses of the
three rings (the contoured volume and how much the dilations add to it) and the contour's long,
middle and short extent from its second moments. Pooled tokens are normalised means and so
blind to size and shape, the strongest clinical signs (short axis, roundness). Fed in as one
more token, or unstandardised, they were learned slowly (the short extent varies by a few
tenths around a larger offset) and CPU-trained checkpoints stayed below the short-axis rule, so
they are standardised with statistics of the training split, stored with the weights.

The intensity statistics (issue 14) go beside them for the same reason: heterogeneous enhancement, a
necrotic core and a fatty hilum change the spread and the low-attenuation share of the voxels inside
the contour, which normalised attention means hardly show.

The outline term (issue 14, also ours) is the logit's last step: the contour's roundness and sphericity
at the patch's full resolution, which the rings on the S3 grid average away, enter the logit linearly
beside the head's output, with coefficients fitted after training on held-out nodes, the network frozen
(`m2a-train --fit-outline`). Trained weights carry the identity term until then.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, cast

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from m2anet.contract import HU_WINDOW, INPUTS, PATCH_SHAPE, PATCH_SPACING_MM, InputContract, hu_scale

S3_SHAPE = (16, 16, 16)
S3_SPACING_MM = (3.0, 3.2, 3.2)
"""Grid of the soft masks: the patch after the (1, 4, 4) pooling of S2 and S3."""
RING_VOXEL_CM3 = S3_SPACING_MM[0] * S3_SPACING_MM[1] * S3_SPACING_MM[2] / 1000.0
"""Volume of one S3 voxel: ring masses become the contoured volume (core) and its surroundings."""
SHAPE_UNIT_MM = 4.0
"""Length unit of the contour moments: any mask in the patch, from one voxel to all of it, keeps
the determinant of its covariance a normal FP16 number (at most about 14^3)."""

Heads = Literal["both", "cls"]


@dataclass(frozen=True)
class M2ANetConfig:
    widths: tuple[int, int, int, int, int]
    blocks: tuple[int, int, int, int, int] = (1, 1, 2, 2, 1)
    token_dim: int = 128
    attn_dim: int = 64
    head_hidden: int = 64
    dropout: float = 0.2
    eps: float = 1e-3  # keeps the pooled mean finite for an empty ring; representable in FP16
    inputs: InputContract = INPUTS


_REGISTRY: dict[str, M2ANetConfig] = {
    "m2anet_base": M2ANetConfig(widths=(16, 32, 64, 128, 256)),
    "m2anet_small": M2ANetConfig(widths=(8, 16, 32, 64, 128), token_dim=64, attn_dim=32, head_hidden=32),
}


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def get_config(name: str) -> M2ANetConfig:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}: choose one of {', '.join(list_models())}") from None


def _conv_bn_relu(cin: int, cout: int, stride: int | tuple[int, int, int] = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv3d(cin, cout, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm3d(cout),
        nn.ReLU(inplace=True),
    )


class ResBlock(nn.Module):
    """Basic 3D residual block; a 1x1x1 projection shortcut where shape or width changes."""

    def __init__(self, cin: int, cout: int, stride: int | tuple[int, int, int] = 1) -> None:
        super().__init__()
        self.conv1 = _conv_bn_relu(cin, cout, stride)
        self.conv2 = nn.Conv3d(cout, cout, 3, padding=1, bias=False)
        self.bn2: nn.BatchNorm3d | nn.Identity = nn.BatchNorm3d(cout)  # Identity once folded
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv3d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm3d(cout)
            )
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn2(self.conv2(self.conv1(x))) + self.shortcut(x))


def _stage(cin: int, cout: int, n_blocks: int, stride: int | tuple[int, int, int]) -> nn.Sequential:
    return nn.Sequential(
        ResBlock(cin, cout, stride),
        *(ResBlock(cout, cout) for _ in range(n_blocks - 1)),
    )


class SoftMaskExpansion(nn.Module):
    """Three soft rings around the node (core, near, far) at S3 resolution.

    Dilating the occupancy with stride-1 max pooling and mixing the dilations with learned
    softmax weights gives masks that are 1 on the node and decay outward, so pooling can
    look at the node's margin and surroundings and absorb a few voxels of contour error.
    """

    def __init__(self) -> None:
        super().__init__()
        self.down = nn.AvgPool3d((1, 4, 4))
        self.dilate = nn.MaxPool3d(3, stride=1, padding=1)
        self.near_logits = nn.Parameter(torch.zeros(3))
        self.far_logits = nn.Parameter(torch.zeros(5))

    def forward(self, mask: torch.Tensor) -> torch.Tensor:
        d = [self.down(mask)]
        for _ in range(4):
            d.append(self.dilate(d[-1]))
        stack = torch.cat(d, dim=1)  # (B, 5, 16, 16, 16)
        near_w = torch.softmax(self.near_logits, 0).view(1, 3, 1, 1, 1)
        far_w = torch.softmax(self.far_logits, 0).view(1, 5, 1, 1, 1)
        near = (stack[:, :3] * near_w).sum(1, keepdim=True)
        far = (stack * far_w).sum(1, keepdim=True)
        return torch.cat([d[0], near, far], dim=1)  # (B, 3, ...): core, near, far


class MaskAttentionPool(nn.Module):
    """One token per ring: attention-weighted mean of the features inside that ring."""

    def __init__(self, channels: int, token_dim: int, eps: float) -> None:
        super().__init__()
        self.attn = nn.Conv3d(channels, 3, 1)
        self.proj = nn.Linear(channels, token_dim)
        self.eps = eps

    def forward(self, feat: torch.Tensor, rings: torch.Tensor) -> torch.Tensor:
        w = (rings * torch.sigmoid(self.attn(feat))).flatten(2)  # (B, 3, N)
        f = feat.flatten(2).transpose(1, 2)  # (B, N, C)
        pooled = torch.matmul(w, f) / (w.sum(2, keepdim=True) + self.eps)  # (B, 3, C)
        return self.proj(pooled)


def _coordinate_products(c: torch.Tensor, dim: int) -> torch.Tensor:
    """The squares and cross products of coordinates (z, y, x) stacked along `dim`, in the order
    (zz, yy, xx, zy, yx, xz): each cross product pairs an axis with the next one, so `roll` makes them in
    one operation, and `_invariants` reads covariances in this order."""
    return torch.cat([c * c, c * c.roll(-1, dim)], dim=dim)


def _invariants(cov: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Trace, sum of principal minors and determinant of symmetric 3 x 3 covariances given as (B, 6) rows of
    (zz, yy, xx, zy, yx, xz): rotation-invariant, and what a graph computes without an eigensolver. Each
    diagonal entry's opposite off-diagonal entry (zz and yx, ...) is one place on, so a `roll` pairs them
    all: a dozen operations for the whole batch, as an eager forward dispatches them one by one."""
    d, o = cov[:, :3], cov[:, 3:]
    squares = o * o
    i1 = d.sum(1)
    i2 = (d * d.roll(-1, 1)).sum(1) - squares.sum(1)
    i3 = d.prod(1) + 2.0 * o.prod(1) - (d * squares.roll(-1, 1)).sum(1)
    return i1, i2, i3


class ContourShape(nn.Module):
    """Long, middle and short extent of the contour, rotation invariant, without an eigensolver.

    The covariance of the core occupancy has invariants I1 (trace), I2 (sum of principal minors)
    and I3 (determinant); I1, I2 / I1 and I3 / I2 track the largest, middle and smallest principal
    variance, so their square roots give the node's extents in SHAPE_UNIT_MM. Only MatMul, Mul,
    Add, Sub, Div, ReduceSum, ReduceProd, Slice, Concat and Sqrt, so it exports everywhere;
    model.fp16.onnx keeps it in FP32, because the variances subtract nearly equal second moments.
    The mask is not a parameter, so no gradient flows through the square roots.
    """

    moments: torch.Tensor  # buffer, registered in __init__

    def __init__(self, eps: float) -> None:
        super().__init__()
        axes = [
            (torch.arange(n) - (n - 1) / 2.0) * sp / SHAPE_UNIT_MM
            for n, sp in zip(S3_SHAPE, S3_SPACING_MM, strict=True)
        ]
        coords = torch.stack(torch.meshgrid(*axes, indexing="ij")).flatten(1)  # (3, N)
        # (N, 9): each voxel's coordinates and their products, so one MatMul gives every moment
        moments = torch.cat([coords, _coordinate_products(coords, 0)]).T.contiguous()
        self.register_buffer("moments", moments, persistent=False)
        self.eps = eps

    def forward(self, core: torch.Tensor) -> torch.Tensor:
        w = core.flatten(1)  # (B, N)
        mass = w.sum(1, keepdim=True) + self.eps
        e = torch.matmul(w, self.moments) / mass  # (B, 9): means, then second moments
        i1, i2, i3 = _invariants(e[:, 3:] - _coordinate_products(e[:, :3], 1))
        variances = torch.stack([i1, i2 / (i1 + self.eps), i3 / (i2 + self.eps)], dim=1)
        return torch.sqrt(torch.relu(variances))


class ContourOutline(nn.Module):
    """Roundness and sphericity of the contour at the patch's own 0.8 mm, where the network sees it only
    through the rings on the S3 grid (3.2 mm in-plane), which average an irregular margin away. Of the
    cohort study's hand features, the contour's full-resolution shape is the one group that adds to the
    trained models' logits (docs/cohort-study/model_gaps.md); these three carry that gain and need no
    convex hull or eigensolver:

    * moment roundness: sqrt(I3 / I2 / I1) of the covariance invariants (smallest over total extent);
    * axial roundness: short over long axis of the in-plane (y, x) covariance, as read on an axial slice;
    * sphericity: pi^(1/3) (6 V)^(2/3) / A, with A the area of the voxel faces between contour and outside.

    The covariance has a voxel's own extent (spacing^2 / 12) added, as `cohort_study.node_features` does.
    Its moments are linear in the contour's projections onto the (z, y), (z, x) and (y, x) planes, so one
    product with a fixed basis and one sum give all ten (Mul and ReduceSum, exact in FP32 on every
    backend, where a MatMul would run in half precision under autocast or in TF32). The graph holds
    ReduceSum, ReduceProd, Mul, Sub, Abs, Pad, Slice, Concat, Div, Pow and Sqrt on tensors of rank 4 and
    less: model.fp16.onnx keeps all of it in FP32. No parameters, and no gradient reaches it (the mask has
    none).
    """

    N_MEASURES = 3
    basis: torch.Tensor  # buffers, registered in __init__
    voxel: torch.Tensor
    face_mm2: torch.Tensor

    def __init__(self, eps: float) -> None:
        super().__init__()
        sz, sy, sx = PATCH_SPACING_MM
        z, y, x = (
            (torch.arange(n) - (n - 1) / 2.0) * sp for n, sp in zip(PATCH_SHAPE, (sz, sy, sx), strict=True)
        )
        zy, zx, yx = (torch.meshgrid(a, b, indexing="ij") for a, b in ((z, y), (z, x), (y, x)))
        basis = torch.block_diag(  # one row per moment over the three projections, flattened side by side
            torch.stack([zy[0] ** 0, zy[0], zy[1], zy[0] ** 2, zy[1] ** 2, zy[0] * zy[1]]).flatten(1),
            torch.stack([zx[1], zx[1] ** 2, zx[1] * zx[0]]).flatten(1),
            (yx[0] * yx[1]).flatten()[None],
        )  # rows: 1 z y zz yy zy | x xx xz | yx
        # mass, means, then the second moments in `_coordinate_products`' order
        self.register_buffer("basis", basis[[0, 1, 2, 6, 3, 4, 7, 5, 9, 8]], persistent=False)
        voxel = torch.tensor([sz * sz, sy * sy, sx * sx, 0.0, 0.0, 0.0]) / 12.0
        self.register_buffer("voxel", voxel, persistent=False)
        self.register_buffer("face_mm2", torch.tensor([sy * sx, sz * sx, sz * sy]), persistent=False)
        self.sphere = (math.pi * (6.0 * sz * sy * sx) ** 2) ** (1.0 / 3.0)  # sphericity = this n^(2/3) / A
        self.eps = eps

    def forward(self, mask: torch.Tensor) -> torch.Tensor:
        m = mask[:, 0]  # (B, Z, Y, X)
        planes = torch.cat([m.sum(3).flatten(1), m.sum(2).flatten(1), m.sum(1).flatten(1)], dim=1)
        sums = (planes[:, None] * self.basis).sum(2)  # (B, 10)
        n = sums[:, 0]
        e = sums[:, 1:] / (n + self.eps)[:, None]  # means, then second moments
        bessel = n / torch.clamp(n - 1.0, min=1.0)
        cov = (e[:, 3:] - _coordinate_products(e[:, :3], 1)) * bessel[:, None] + self.voxel
        i1, i2, i3 = _invariants(cov)
        moment = torch.sqrt(torch.relu(i3 / (i2 + self.eps)) / (i1 + self.eps))
        cyy, cxx, cyx = cov[:, 1], cov[:, 2], cov[:, 4]
        half = (cyy + cxx) / 2.0
        disc = torch.sqrt((cyy - cxx) * (cyy - cxx) / 4.0 + cyx * cyx)
        axial = torch.sqrt(torch.relu(half - disc) / (half + disc + self.eps))
        p = nn.functional.pad(m, (1, 1, 1, 1, 1, 1))
        faces = torch.stack([p.diff(dim=d).abs().sum((1, 2, 3)) for d in (1, 2, 3)], dim=1)  # z, y, x
        area = (faces * self.face_mm2).sum(1)
        sphericity = self.sphere * torch.pow(n, 2.0 / 3.0) / (area + self.eps)
        return torch.stack([moment, axial, sphericity], dim=1)  # (B, 3)


class IntensityStats(nn.Module):
    """What a radiologist reads inside the contour, beside the attention means: mean and spread of the
    lightly smoothed CT over the contour and over its interior (eroded two voxels in-plane, past the
    delineation error), the rim's excess over the interior (a hypodense core: necrosis), and the soft
    fractions of interior voxels that are low-attenuation (necrosis), fat (a fatty hilum) and
    calcium. Attention means of normalised features are blind to spread and to a small hypodense
    part; these are not. No parameters, and nothing in them has a gradient (the inputs have none).
    """

    N_STATS = 8
    _BRIGHT = hu_scale(150.0)
    _SOFTNESS = 10.0 / (HU_WINDOW[1] - HU_WINDOW[0])  # 10 HU
    below: torch.Tensor  # buffer, registered in __init__

    def __init__(self, eps: float) -> None:
        super().__init__()
        self.smooth = nn.AvgPool3d((1, 3, 3), stride=1, padding=(0, 1, 1))
        self.spread = nn.MaxPool3d((1, 5, 5), stride=1, padding=(0, 2, 2))
        # low attenuation (necrosis) and fat (a fatty hilum): the soft share of interior voxels below each
        below = torch.tensor([hu_scale(15.0), hu_scale(-40.0)]).view(1, 2, 1, 1, 1)
        self.register_buffer("below", below, persistent=False)
        self.eps = eps

    def forward(self, ct: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Both weightings (contour, interior) go through each step at once, channels of one tensor: an
        eager forward dispatches each operation once, not once per weighting and statistic."""
        x = self.smooth(ct)
        interior = (1.0 - self.spread(1.0 - mask)) + 0.01 * mask  # the contour itself if nothing is left
        w = torch.cat([mask, interior], dim=1)  # (B, 2, ...): contour, interior
        mass = w.sum((2, 3, 4)) + self.eps
        mean = (w * x).sum((2, 3, 4)) / mass
        centred = x - mean[:, :, None, None, None]
        spread = torch.sqrt((w * centred * centred).sum((2, 3, 4)) / mass + self.eps * self.eps)
        rim_excess = mean[:, :1] - mean[:, 1:]  # contour mean minus interior mean
        below = (interior * torch.sigmoid((self.below - x) / self._SOFTNESS)).sum((2, 3, 4)) / mass[:, 1:]
        bright = (mask * torch.sigmoid((ct - self._BRIGHT) / self._SOFTNESS)).sum((2, 3, 4)) / mass[:, :1]
        stats = torch.stack([mean, spread], dim=2).flatten(1)  # contour mean, spread, interior mean, spread
        return torch.cat([stats, rim_excess, below, bright], dim=1)  # (B, 8)


class GatedAttentionFusion(nn.Module):
    """Gated attention pooling over tokens (Ilse et al. 2018): which scale and ring matter."""

    def __init__(self, dim: int, attn_dim: int) -> None:
        super().__init__()
        self.v = nn.Linear(dim, attn_dim)
        self.u = nn.Linear(dim, attn_dim)
        self.w = nn.Linear(attn_dim, 1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        score = self.w(torch.tanh(self.v(tokens)) * torch.sigmoid(self.u(tokens)))  # (B, T, 1)
        alpha = torch.softmax(score, dim=1)
        return (alpha * tokens).sum(1)


class UpBlock(nn.Module):
    def __init__(self, cin: int, cskip: int, cout: int, stride: tuple[int, int, int]) -> None:
        super().__init__()
        self.up = nn.ConvTranspose3d(cin, cout, stride, stride=stride)
        self.conv = _conv_bn_relu(cout + cskip, cout)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([self.up(x), skip], dim=1))


class M2ANet(nn.Module):
    geometry_mean: torch.Tensor  # buffers, registered in __init__
    geometry_std: torch.Tensor
    intensity_mean: torch.Tensor
    intensity_std: torch.Tensor
    outline_mean: torch.Tensor
    outline_std: torch.Tensor
    outline_weight: torch.Tensor
    outline_bias: torch.Tensor

    def __init__(self, config: M2ANetConfig, heads: Heads = "both") -> None:
        super().__init__()
        if heads not in ("both", "cls"):
            raise ValueError(f"heads must be 'both' or 'cls', got {heads!r}")
        self.config, self.heads = config, heads
        w, b, td = config.widths, config.blocks, config.token_dim
        self.s1 = nn.Sequential(_conv_bn_relu(1, w[0]), _stage(w[0], w[0], b[0], 1))
        self.s2 = _stage(w[0], w[1], b[1], (1, 2, 2))
        self.s3 = _stage(w[1], w[2], b[2], (1, 2, 2))
        self.s4 = _stage(w[2], w[3], b[3], 2)
        self.s5 = _stage(w[3], w[4], b[4], 2)

        self.sme = SoftMaskExpansion()
        self.to_s4 = nn.AvgPool3d(2)
        self.to_s5 = nn.AvgPool3d(4)
        self.pool3 = MaskAttentionPool(w[2], td, config.eps)
        self.pool4 = MaskAttentionPool(w[3], td, config.eps)
        self.pool5 = MaskAttentionPool(w[4], td, config.eps)
        self.global_proj = nn.Linear(w[4], td)
        self.shape = ContourShape(config.eps)
        # standardisation of the geometry features, set from the training split by m2a-train
        self.register_buffer("geometry_mean", torch.zeros(6))
        self.register_buffer("geometry_std", torch.ones(6))
        self.geometry_proj = nn.Linear(6, td)
        self.intensity = IntensityStats(config.eps)
        self.register_buffer("intensity_mean", torch.zeros(IntensityStats.N_STATS))
        self.register_buffer("intensity_std", torch.ones(IntensityStats.N_STATS))
        self.intensity_proj = nn.Linear(IntensityStats.N_STATS, td)
        self.token_embed = nn.Parameter(torch.zeros(1, 10, td))  # which scale/ring a token is
        self.fusion = GatedAttentionFusion(td, config.attn_dim)
        self.head = nn.Sequential(
            nn.Linear(2 * td, config.head_hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(config.dropout),
            nn.Linear(config.head_hidden, 1),
        )
        # the logit's last step, fitted after training (m2a-train --fit-outline): a logistic regression of
        # the head's logit and the standardised full-resolution outline measures; the identity until then
        self.outline = ContourOutline(config.eps)
        self.register_buffer("outline_mean", torch.empty(ContourOutline.N_MEASURES))
        self.register_buffer("outline_std", torch.empty(ContourOutline.N_MEASURES))
        self.register_buffer("outline_weight", torch.empty(1 + ContourOutline.N_MEASURES))
        self.register_buffer("outline_bias", torch.empty(1))
        self.reset_outline()

        if heads == "both":
            self.up4 = UpBlock(w[4], w[3], w[3], (2, 2, 2))
            self.up3 = UpBlock(w[3], w[2], w[2], (2, 2, 2))
            self.up2 = UpBlock(w[2], w[1], w[1], (1, 2, 2))
            self.up1 = UpBlock(w[1], w[0], w[0], (1, 2, 2))
            self.seg_out = nn.Conv3d(w[0], 1, 1)

    def geometry(self, rings3: torch.Tensor) -> torch.Tensor:
        """Ring masses (cm^3) and contour extents, before standardisation: (B, 6)."""
        return torch.cat([rings3.sum((2, 3, 4)) * RING_VOXEL_CM3, self.shape(rings3[:, :1])], dim=1)

    @torch.no_grad()
    def reset_outline(self) -> None:
        """The identity outline term: the head's logit as it was trained."""
        self.outline_mean.zero_()
        self.outline_std.fill_(1.0)
        self.outline_weight.zero_()
        self.outline_weight[0] = 1.0
        self.outline_bias.zero_()

    def outline_logit(self, head_logit: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The head's logit with the fitted outline term added: (B, 1)."""
        outline = (self.outline(mask) - self.outline_mean) / self.outline_std
        terms = torch.cat([head_logit, outline], dim=1)
        return (terms * self.outline_weight).sum(1, keepdim=True) + self.outline_bias

    def forward(self, ct: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        f1 = self.s1(ct)
        f2 = self.s2(f1)
        f3 = self.s3(f2)
        f4 = self.s4(f3)
        f5 = self.s5(f4)

        rings3 = self.sme(mask)
        rings4 = self.to_s4(rings3)
        rings5 = self.to_s5(rings3)
        tokens = torch.cat(
            [
                self.pool3(f3, rings3),
                self.pool4(f4, rings4),
                self.pool5(f5, rings5),
                self.global_proj(f5.mean((2, 3, 4))).unsqueeze(1),
            ],
            dim=1,
        )
        geometry = (self.geometry(rings3) - self.geometry_mean) / self.geometry_std
        intensity = (self.intensity(ct, mask) - self.intensity_mean) / self.intensity_std
        fused = self.fusion(tokens + self.token_embed)
        described = self.geometry_proj(geometry) + self.intensity_proj(intensity)
        met_logit = self.outline_logit(self.head(torch.cat([fused, described], dim=1)), mask)
        if self.heads == "cls":
            return (met_logit,)

        x = self.up4(f5, f4)
        x = self.up3(x, f3)
        x = self.up2(x, f2)
        x = self.up1(x, f1)
        return met_logit, self.seg_out(x)


def create_model(
    name: str,
    pretrained: bool = False,
    heads: Heads = "both",
    weights: str | Path | None = None,
) -> M2ANet:
    """Build a registered config; `pretrained` loads the shipped weights, `weights` a file."""
    model = M2ANet(get_config(name), heads=heads)
    if pretrained or weights is not None:
        from m2anet.weights import load_weights

        load_weights(model, weights if weights is not None else name)
    return model.eval()


def fold_batchnorm(model: M2ANet) -> M2ANet:
    """`model` (in eval mode) with each BatchNorm folded into the convolution before it: scaled weights and
    a bias, the same function up to rounding. Eager inference then makes one pass over each activation
    fewer; torch.compile's freezing does the same by itself."""
    if model.training:
        raise ValueError("fold_batchnorm needs a model in eval mode: call model.eval() first")
    for module in list(model.modules()):
        if isinstance(module, ResBlock):
            bn2 = cast(nn.BatchNorm3d, module.bn2)
            module.conv2, module.bn2 = fuse_conv_bn_eval(module.conv2, bn2), nn.Identity()
        elif isinstance(module, nn.Sequential):
            for i in range(len(module) - 1):
                if isinstance(module[i], nn.Conv3d) and isinstance(module[i + 1], nn.BatchNorm3d):
                    conv, bn = cast(nn.Conv3d, module[i]), cast(nn.BatchNorm3d, module[i + 1])
                    module[i], module[i + 1] = fuse_conv_bn_eval(conv, bn), nn.Identity()
    return model


def model_stats(name: str, heads: Heads = "both") -> dict[str, float]:
    """Parameters and FLOPs per node (FLOP = 2 x multiply-accumulate), from torch's counter.

    The benchmarks divide these FLOPs by the measured device peak to get the arithmetic floor.
    """
    from torch.utils.flop_counter import FlopCounterMode

    model = M2ANet(get_config(name), heads=heads).eval()
    ct = torch.zeros(1, 1, *PATCH_SHAPE)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(ct, ct)
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "flops_per_node": counter.get_total_flops(),
    }


def config_dict(name: str) -> dict:
    """The architecture of a registered config, as training records and manifests store it."""
    return {"name": name, **{k: v for k, v in asdict(get_config(name)).items() if k != "inputs"}}
