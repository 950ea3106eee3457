"""``python -m imbreg_fast train depth``: dense depth regression on generated long-tailed scenes, with every DIR
method, and what each method costs per training step.

Data (:func:`make_scenes`). Indoor-like scenes rendered by ray casting from a pinhole camera at the origin
looking down +z (y down, depth = z of the first surface hit; ~85 degrees horizontal field of view, as a
wide-angle indoor camera): a room of five planes (back wall at depth Z,
floor, ceiling, left and right walls) and up to four boxes standing on the floor at random depths. Training
rooms are mostly small, Z = 1 m + 2.2 m exp(0.5 e), e ~ N(0, 1), capped at 9.8 m, so that ~89% of the valid
pixels lie at 1-4 m and ~0.5% beyond 6 m (the floor, ceiling and walls run from near the camera to Z; only
the few deep rooms reach far). The
image (3 channels) is a function of the scene from which depth is learnable but not trivially: per-surface
random colours (albedo 0.35-1), a head-light Lambertian shading ``0.25 + 0.75 cos(angle)``, an
inverse-square-like fall-off ``2 / (1 + (z / 4 m)^2)`` (ambiguous with the albedo), a world-space
checker texture (20-35 cm period, whose image frequency shrinks with depth) and Gaussian noise (0.02). The
validity mask has holes: pixels beyond 10 m, grazing surfaces (cos < 0.1), up to three random elliptical
blobs per image (sensor drop-outs) and 1% random speckle; depth is 0 there. Everything is vectorised over
images and pixels (chunks of images), random draws come from one seeded CPU generator (the same data on
every device), the rendering runs on the device.

Test set, as NYUD2-DIR: balanced over 0.1 m depth bins. Test rooms have Z uniform in [2.5, 9.8] m (so that
every depth has pixels), and a balancing mask keeps, in every 0.1 m bin, at most ``cap`` valid pixels chosen
at random (:func:`balance_mask`), ``cap`` being the 10th percentile of the non-empty bins' counts over
[0.7 m, 10 m) (NYUD2-DIR balances the bins from 0.7 m on, with the smallest bin's count).

Shot groups, as NYUD2-DIR: 0.1 m bins over [0, 10) m, grouped by the number of TRAINING pixels in the bin.
NYUD2-DIR fixes the groups from its training histogram (many-shot bins hold > 2.6e7 training pixels, few-shot
< 1e7; its ``util.Evaluator.shot_idx`` lists them); here the training set is orders of magnitude smaller,
so the thresholds are shares of the training pixels: many-shot when a bin holds more than 1.5%, few-shot
when it holds fewer than 0.3% (with 100 bins a uniform share is 1%). With the scene distribution above, the
many-shot region is about 1.4-3.6 m, medium-shot 0.6-1.4 m and 3.6-4.9 m, few-shot below 0.6 m and beyond
~4.9 m (NYUD2-DIR's groups have the same shape: medium on both sides of the many-shot range).

Methods (:mod:`.methods`) with the depth code's settings where it has them: 0.1 m bins over [0, 10) m for
LDS / FDS / BNI / reg+cls, LDS gaussian window (5 bins, sigma 2) with reflect boundaries, RRT's inverse
weights on the raw pixel counts, a GMM of 16 components for GAI. Ours: sigma starts at 0.5 m (learned), FDS
uses the full covariance with a ridge ``eps = 0.1`` (post-BN/ReLU features have per-bin directions of near-zero
variance, which ``S^{-1/2}`` would amplify) and an EMA momentum of 0.5 per epoch (the published 0.9 spans
~10 epochs of its 90; our runs are 6-16 epochs long).

Model: a small encoder-decoder CNN (:class:`DepthNet`). The encoder (stride 1-2-4-8 with BatchNorm, a global
context vector added at 1/8, a decoder back to 1/2 resolution with skips) gives features ``[B, C, H/2, W/2]``;
FDS acts on them. The head (3x3 conv, ReLU, 1x1 conv, bilinear x2 up-sampling) maps them to depth (channel 0)
and, for reg+cls, the class logits. FDS needs labels at the feature resolution: each feature pixel takes the
mean of the valid depths of its 2x2 block, valid when the block has one
(:func:`imbreg_fast.experiments.methods.labels_at`). Predictions are clamped to [1e-3, 10] m for evaluation
(the depth metrics need p > 0), as depth benchmarks clamp to the valid range.

Timing (the number a user cares about): for each method and each backend of ``--timing-backends``, one full
training step (forward, loss, backward, optimiser step; FDS accumulate and re-colouring; BSAM's two passes;
RRT's frozen encoder) on the same model and the same batch, timed with :func:`.common.time_step`, and its
overhead over plain MSE on the same backend. The steps are timed round-robin (``--timing-repeats`` rounds, each
step once per round, after two warm-up calls each; the median over the rounds is reported), so that a change
of load on a shared machine affects every method alike. FDS is timed after one
end-of-epoch update, so that its re-colouring runs. With ``--compare-reference`` the same step with the
published formulations (:data:`.methods.REFERENCE`: N x M materialised BMC, [N, K] GAI / BNI, per-bin Python
FDS loops, host-side per-pixel weights) is timed too, on the torch backend's model. Training for accuracy
runs once, on ``--backend``; timing is separate.

Output: the DIR depth table (RMSE, AbsRel, δ1 over All / Many / Med. / Few) per method, the timing table,
``depth.json`` (schema below) and the figures ``depth_error_by_bin.png`` (per-bin RMSE of each method over
the training histogram), ``depth_label_histogram.png`` and ``depth_samples.png`` (inputs, depth, mask).

``depth.json`` (keys always present; ``null`` where not run)::

    {"schema": "imbreg_fast.train_depth/1",
     "config": {<every flag>, "method_config": {...}, "device", "backend", "seed", "quick",
                "environment": common.environment()},
     "data": {"image_size": [H, W], "train_images", "test_images", "train_pixels" (valid), "test_pixels"
              (balanced), "train_fraction_1_4m", "train_fraction_beyond_6m", "train_hole_fraction",
              "test_cap_per_bin", "generate_seconds"},
     "shots": {"bin_width": 0.1, "many_share", "few_share", "many_threshold", "few_threshold" (pixels),
               "groups": [per bin "many" | "medium" | "few"]},
     "methods": {name: {"display", "backend", "backends": {op: backend}, "metrics": {DIRMetrics key: float},
                        "train_seconds", "epoch_losses": [...], "noise_sigma": float | null,
                        "stage_one": "mse" (RRT) | null}},
     "timing": {name: {backend: {"median_ms", "min_ms", "max_ms", "repeats", "overhead_vs_mse",
                                 "overhead_ms"}},
                "reference": null | {name: {"median_ms", "min_ms", "max_ms", "repeats", "formulation",
                                           "ours_ms", "ours_backend", "speedup"}}},
     "histogram": {"edges": [101 values], "train_counts": [100], "test_counts": [100]},
     "error_by_bin": {name: {"rmse": [100, null where a bin has no test pixel], "count": [100]}}}

``overhead_vs_mse`` is the ratio median / MSE's median on the same backend (null without an MSE timing);
``speedup`` the reference's median over ours (on ``ours_backend``: cpp when timed, else torch).
"""
from __future__ import annotations

import argparse
import functools
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .. import _dispatch
from ..lds import bin_edges, bin_index, label_histogram
from ..metrics import SHOTS, DIRMetrics
from . import common
from . import methods as M

__all__ = ["DepthSet", "DepthNet", "make_scenes", "balance_mask", "add_arguments", "run"]

MAX_DEPTH = 10.0            # m: the label range [0, 10) and the sensor's range
BIN_WIDTH = 0.1             # m: NYUD2-DIR's bins
NUM_BINS = round(MAX_DEPTH / BIN_WIDTH)
MANY_SHARE = 0.015          # many-shot: a bin holds more than this share of the training pixels
FEW_SHARE = 0.003           # few-shot: fewer than this share
BALANCE_FROM = 0.7          # m: the balanced test bins start here (NYUD2-DIR: bin 7)
CLAMP = (1e-3, MAX_DEPTH)   # predictions clamped for evaluation
SCHEMA = "imbreg_fast.train_depth/1"

# --quick and full configurations (flags override)
PRESETS = {
    "quick": dict(image_size=(32, 48), train_images=192, test_images=48, epochs=6, batch_size=8,
                  timing_repeats=5, width=16),
    "full": dict(image_size=(48, 64), train_images=1024, test_images=256, epochs=16, batch_size=16,
                 timing_repeats=15, width=16),
}


# --------------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DepthSet:
    """Images ``[N, 3, H, W]`` float32, depth ``[N, 1, H, W]`` float32 (m, 0 at holes), valid mask
    ``[N, 1, H, W]`` bool."""
    image: torch.Tensor
    depth: torch.Tensor
    mask: torch.Tensor

    def __len__(self) -> int:
        return self.image.shape[0]

    def batches(self, batch_size: int, *, order: Optional[torch.Tensor] = None):
        """``(x, y, mask)`` batches in ``order`` (default: as stored); the last batch may be smaller."""
        n = len(self)
        idx = torch.arange(n) if order is None else order
        for start in range(0, n, batch_size):
            sel = idx[start:start + batch_size].to(self.image.device)
            yield self.image[sel], self.depth[sel], self.mask[sel]


NUM_ROOM = 5                # back wall, floor, ceiling, left wall, right wall
NUM_BOX = 4                 # box slots per scene


def _scene_parameters(n: int, gen: torch.Generator, balanced: bool) -> dict:
    """Scene parameters (float64 CPU tensors) of ``n`` scenes."""
    def u(lo, hi, *shape):
        return lo + (hi - lo) * torch.rand(*(shape or (n,)), generator=gen, dtype=torch.float64)

    if balanced:
        back = u(2.5, 9.8)
    else:
        back = (1.0 + 2.2 * torch.exp(0.5 * torch.randn(n, generator=gen, dtype=torch.float64))).clamp(max=9.8)
    p = dict(back=back, floor=u(1.0, 1.6), ceiling=u(1.0, 1.8), left=u(1.2, 3.0), right=u(1.2, 3.0))
    k = NUM_BOX
    p["box_on"] = torch.rand(n, k, generator=gen, dtype=torch.float64) < 0.6
    size = torch.stack([u(0.2, 0.6, n, k), u(0.15, 0.6, n, k), u(0.2, 0.6, n, k)], -1)          # half sizes
    cx = -p["left"][:, None] + 0.3 + (p["left"] + p["right"] - 0.6)[:, None] * torch.rand(n, k, generator=gen,
                                                                                          dtype=torch.float64)
    cz = 1.0 + (back - 1.5).clamp(min=0.2)[:, None] * torch.rand(n, k, generator=gen, dtype=torch.float64)
    cy = p["floor"][:, None] - size[..., 1]                                                      # on the floor
    p["box_centre"], p["box_size"] = torch.stack([cx, cy, cz], -1), size
    p["albedo"] = u(0.35, 1.0, n, NUM_ROOM + k, 3)
    p["period"] = u(0.2, 0.35, n, NUM_ROOM + k)
    p["phase"] = u(0.0, 1.0, n, NUM_ROOM + k, 2)
    # up to three elliptical holes per image: on/off, centre (v, u) and radii as fractions of the image
    p["blob_on"] = torch.rand(n, 3, generator=gen, dtype=torch.float64) < 0.5
    p["blob_centre"] = u(0.0, 1.0, n, 3, 2)
    p["blob_radius"] = u(0.03, 0.12, n, 3, 2)
    return p


def _render(p: dict, height: int, width: int, noise: torch.Tensor, speckle: torch.Tensor, device: torch.device):
    """(image, depth, mask) of a chunk of scenes; ``noise [n, 3, H, W]`` N(0, 1), ``speckle [n, 1, H, W]``
    U(0, 1)."""
    f32 = dict(dtype=torch.float32, device=device)
    p = {k: v.to(device=device, dtype=torch.float32 if v.is_floating_point() else v.dtype) for k, v in p.items()}
    n = p["back"].shape[0]
    focal = 0.55 * width                                                         # ~85 deg horizontal field of view
    v, u = torch.meshgrid(torch.arange(height, **f32), torch.arange(width, **f32), indexing="ij")
    # ray (dx, dy, 1); the centre pixel of an odd size is nudged off 0 (no 0 / 0 in the slab test)
    dx = ((u + 0.5 - width / 2) / focal).view(1, 1, height, width)
    dy = ((v + 0.5 - height / 2) / focal).view(1, 1, height, width)
    dx, dy = (torch.where(t == 0, torch.full((), 1e-6, **f32), t) for t in (dx, dy))
    inf = torch.full((), math.inf, **f32)
    col = lambda t: t.view(n, 1, 1, 1)                                          # noqa: E731

    def positive(z):
        return torch.where(z > 0, z, inf)

    # room planes: depth of the hit along each ray (z, since the ray's z component is 1)
    room = torch.cat([col(p["back"]).expand(n, 1, height, width),
                      positive(col(p["floor"]) / dy),                             # y = +floor (below the camera)
                      positive(-col(p["ceiling"]) / dy),                          # y = -ceiling
                      positive(-col(p["left"]) / dx),                             # x = -left
                      positive(col(p["right"]) / dx)], 1)                         # [n, 5, H, W]
    room_normal_axis = torch.tensor([2, 1, 1, 0, 0], device=device)
    # boxes: slab intersection per axis; t = z along the ray
    d = torch.stack([dx, dy, torch.ones_like(dx)], -1)                          # [n, 1, H, W, 3]
    lo = (p["box_centre"] - p["box_size"]).view(n, NUM_BOX, 1, 1, 3)
    hi = (p["box_centre"] + p["box_size"]).view(n, NUM_BOX, 1, 1, 3)
    t1, t2 = lo / d, hi / d                                                     # [n, K, H, W, 3]
    t_min, t_max = torch.minimum(t1, t2), torch.maximum(t1, t2)
    t_near, axis = t_min.max(-1)
    t_far = t_max.min(-1).values
    hit = p["box_on"].view(n, NUM_BOX, 1, 1) & (t_near <= t_far) & (t_near > 0)
    boxes = torch.where(hit, t_near, inf)                                       # [n, K, H, W]

    z_all = torch.cat([room, boxes], 1)
    depth, surface = z_all.min(1, keepdim=True)                                 # [n, 1, H, W]
    box_axis = axis.gather(1, (surface - NUM_ROOM).clamp(min=0))
    normal_axis = torch.where(surface < NUM_ROOM, room_normal_axis[surface.clamp(max=NUM_ROOM - 1)], box_axis)

    ray = torch.cat([dx, dy, torch.ones_like(dx)], 1).expand(n, 3, height, width)
    cos = ray.gather(1, normal_axis).abs() * torch.rsqrt(dx * dx + dy * dy + 1.0)
    point = ray * depth.clamp(max=1e3)                                           # world coordinates
    a1 = point.gather(1, (normal_axis + 1) % 3)
    a2 = point.gather(1, (normal_axis + 2) % 3)
    period = p["period"].gather(1, surface.view(n, -1)).view(n, 1, height, width)
    phase = p["phase"].view(n, -1, 2)
    ph = phase.gather(1, surface.view(n, -1, 1).expand(-1, -1, 2)).view(n, height, width, 2)
    texture = torch.sin(2 * math.pi * (a1 / period + ph[..., 0].unsqueeze(1))) \
        * torch.sin(2 * math.pi * (a2 / period + ph[..., 1].unsqueeze(1)))
    albedo = p["albedo"].gather(1, surface.view(n, -1, 1).expand(-1, -1, 3))    # [n, HW, 3]
    albedo = albedo.permute(0, 2, 1).reshape(n, 3, height, width)
    falloff = 2.0 / (1.0 + (depth / 4.0) ** 2)
    image = albedo * (0.25 + 0.75 * cos) * (0.6 + 0.4 * texture) * falloff + 0.02 * noise
    image = (image - 0.5).clamp(-1.0, 1.5)

    # holes: beyond range, grazing surfaces, elliptical blobs, speckle
    vv = ((v + 0.5) / height).view(1, 1, height, width)
    uu = ((u + 0.5) / width).view(1, 1, height, width)
    c, r = p["blob_centre"].view(n, 3, 1, 1, 2), p["blob_radius"].view(n, 3, 1, 1, 2)
    inside = ((vv - c[..., 0]) / r[..., 0]) ** 2 + ((uu - c[..., 1]) / r[..., 1]) ** 2 < 1.0
    blobs = (inside & p["blob_on"].view(n, 3, 1, 1)).any(1, keepdim=True)
    mask = (depth < MAX_DEPTH) & (cos > 0.1) & ~blobs & (speckle >= 0.01)
    depth = torch.where(mask, depth, torch.zeros((), **f32))
    return image, depth, mask


def make_scenes(n: int, height: int, width: int, *, seed: int, device: torch.device | str = "cpu",
                balanced: bool = False, chunk: int = 64) -> DepthSet:
    """``n`` generated scenes of ``height x width`` pixels (module docstring), deterministic in ``seed``.

    ``balanced``: back-wall depth uniform in [2.5, 9.8] m (the test distribution) instead of the long-tailed
    training one. Rendered in chunks of ``chunk`` images on ``device``."""
    for name, value, minimum in (("n", n, 1), ("height", height, 8), ("width", width, 8), ("chunk", chunk, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    device = torch.device(device)
    gen = torch.Generator().manual_seed(seed)
    params = _scene_parameters(n, gen, balanced)
    noise = torch.randn(n, 3, height, width, generator=gen)          # drawn up front: independent of chunk
    speckle = torch.rand(n, 1, height, width, generator=gen)
    parts = []
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        sub = {k: v[start:stop] for k, v in params.items()}
        parts.append(_render(sub, height, width, noise[start:stop].to(device), speckle[start:stop].to(device),
                             device))
    image, depth, mask = (torch.cat(t) for t in zip(*parts))
    return DepthSet(image.contiguous(), depth.contiguous(), mask.contiguous())


def balance_mask(depth: torch.Tensor, mask: torch.Tensor, edges: torch.Tensor, *, start: float, seed: int,
                 quantile: float = 0.1) -> tuple[torch.Tensor, int]:
    """The NYUD2-DIR-style balanced test mask: in every bin of ``edges`` from ``start`` on, at most ``cap``
    valid pixels, chosen at random (seeded); bins below ``start`` are dropped. ``cap`` is the ``quantile`` of
    the non-empty bins' valid counts. Returns ``(mask, cap)``; vectorised (one sort of the pixels)."""
    k = edges.numel() - 1
    bins = bin_index(depth, edges.to(depth.device))
    keep = mask & (depth >= start)
    bins = torch.where(keep, bins, torch.full_like(bins, k)).reshape(-1)        # k: dropped
    counts = torch.bincount(bins, minlength=k + 1)[:k]
    filled = counts[counts > 0].double()
    if filled.numel() == 0:
        raise ValueError("no valid test pixel to balance")
    cap = max(1, int(torch.quantile(filled, quantile)))
    gen = torch.Generator().manual_seed(seed)
    key = bins.double().cpu() + torch.rand(bins.numel(), generator=gen, dtype=torch.float64)
    order = torch.argsort(key).to(depth.device)                                  # by bin, random within
    sorted_bins = bins[order]
    first = torch.cumsum(torch.bincount(bins, minlength=k + 1), 0) - torch.bincount(bins, minlength=k + 1)
    rank = torch.arange(bins.numel(), device=depth.device) - first[sorted_bins]
    chosen = torch.zeros_like(bins, dtype=torch.bool)
    chosen[order] = (rank < cap) & (sorted_bins < k)
    return chosen.view_as(mask), cap


# --------------------------------------------------------------------------------------------------
# model
# --------------------------------------------------------------------------------------------------


def _conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class _Encoder(nn.Module):
    """x [B, 3, H, W] -> features [B, 2w, H/2, W/2]: strides 1-2-4-8 (w, 2w, 3w, 4w channels), a global
    context vector (mean over the 1/8 map, through a linear layer) added at 1/8, then up-sampling with skips
    to 1/2 resolution."""

    def __init__(self, width: int):
        super().__init__()
        w = width
        self.stem = _conv(3, w)
        self.down1, self.down2, self.down3 = _conv(w, 2 * w, 2), _conv(2 * w, 3 * w, 2), _conv(3 * w, 4 * w, 2)
        self.context = nn.Linear(4 * w, 4 * w)
        self.up2 = _conv(4 * w + 3 * w, 3 * w)
        self.up1 = _conv(3 * w + 2 * w, 2 * w)

    def forward(self, x):
        s1 = self.down1(self.stem(x))                      # 1/2
        s2 = self.down2(s1)                                # 1/4
        s3 = self.down3(s2)                                # 1/8
        s3 = s3 + self.context(s3.mean((2, 3)))[:, :, None, None]
        up = F.interpolate(s3, size=s2.shape[-2:], mode="bilinear", align_corners=False)
        s2 = self.up2(torch.cat([up, s2], 1))
        up = F.interpolate(s2, size=s1.shape[-2:], mode="bilinear", align_corners=False)
        return self.up1(torch.cat([up, s1], 1))


class _Head(nn.Module):
    """features [B, C, H/2, W/2] -> [B, out, H, W]: 3x3 conv, ReLU, 1x1 conv, bilinear x2 up-sampling (the 1x1
    conv and the interpolation are both linear per channel, so up-sampling last costs a quarter)."""

    def __init__(self, channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.out = nn.Conv2d(channels, out_channels, 1)

    def forward(self, f):
        y = self.out(F.relu(self.conv(f)))
        return F.interpolate(y, scale_factor=2.0, mode="bilinear", align_corners=False)


class DepthNet(nn.Module):
    """The depth model of the experiment, in the :mod:`.methods` contract: ``encoder`` (features at half
    resolution, ``feature_dim = 2 * width`` channels, where FDS acts) and ``head`` (``out_channels``:
    depth in channel 0, then reg+cls logits). Input sizes must be multiples of 8."""

    def __init__(self, out_channels: int = 1, width: int = 16):
        super().__init__()
        self.feature_dim = 2 * width
        self.encoder = _Encoder(width)
        self.head = _Head(self.feature_dim, out_channels)

    def forward(self, x):
        return self.head(self.encoder(x))


# --------------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------------


def _image_size(text: str) -> tuple[int, int]:
    parts = text.lower().replace("×", "x").split("x")
    try:
        h, w = (int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HxW, e.g. 48x64, got {text!r}") from None
    if h < 16 or w < 16 or h % 8 or w % 8:
        raise argparse.ArgumentTypeError(f"height and width must be multiples of 8 and >= 16 (the network "
                                         f"down-samples by 8), got {h}x{w}")
    return h, w


def _methods(text: str) -> list[str]:
    try:
        return M.parse_methods(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _backends(text: str) -> list[str]:
    names = [t.strip().lower() for t in text.split(",") if t.strip()]
    bad = [n for n in names if n not in _dispatch.BACKENDS]
    if not names or bad:
        raise argparse.ArgumentTypeError(f"unknown backend(s) {', '.join(map(repr, bad)) or '(none)'}; choose "
                                         f"among {','.join(_dispatch.BACKENDS)}")
    return list(dict.fromkeys(names))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """This experiment's flags (the common ones are added by :mod:`.cli`)."""
    q, f = PRESETS["quick"], PRESETS["full"]

    def both(key, fmt=str):
        return f"default: {fmt(f[key])}, with --quick {fmt(q[key])}"

    size = lambda hw: f"{hw[0]}x{hw[1]}"  # noqa: E731
    g = parser.add_argument_group("depth experiment")
    g.add_argument("--methods", type=_methods, default=list(M.METHODS), metavar="LIST",
                   help=f"comma-separated methods to train and time, from {','.join(M.METHODS)} "
                        f"(default: all). rrt re-trains the head of the mse model (trained anyway when mse is "
                        f"not listed)")
    g.add_argument("--epochs", type=common.int_at_least(1), default=None,
                   help=f"training epochs of every method (RRT: of its re-training stage); {both('epochs')}")
    g.add_argument("--train-images", type=common.int_at_least(1), default=None,
                   help=f"generated training scenes (steps per epoch = ceil(train images / batch size)); "
                        f"{both('train_images')}")
    g.add_argument("--test-images", type=common.int_at_least(1), default=None,
                   help=f"generated test scenes, before the per-bin balancing mask; {both('test_images')}")
    g.add_argument("--image-size", type=_image_size, default=None, metavar="HxW",
                   help=f"image height x width, multiples of 8; {both('image_size', size)}")
    g.add_argument("--batch-size", type=common.int_at_least(1), default=None,
                   help=f"images per training step (also the timed batch); {both('batch_size')}")
    g.add_argument("--width", type=common.int_at_least(1), default=None,
                   help=f"base channel width of the CNN (FDS features: 2x); {both('width')}")
    g.add_argument("--bmc-candidates", type=common.int_at_least(1), default=1024,
                   help="BMC: candidate labels sampled per step from the batch's valid pixels (the loss is "
                        "O(pixels x candidates)); default: 1024")
    g.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate, cosine-annealed (default: 1e-3)")
    g.add_argument("--compare-reference", action="store_true",
                   help="also time each step with the published formulations (N x M materialised BMC, [N, K] "
                        "GAI/BNI, per-bin Python FDS loops, host-side per-pixel weights) and show the saving")
    g.add_argument("--timing-backends", type=_backends, default=None, metavar="LIST",
                   help="backends to time each method's step on, e.g. torch,cpp (default: every backend "
                        "available on --device: torch and cpp on CPU when the extension is built, torch and "
                        "triton on CUDA)")
    g.add_argument("--timing-repeats", type=common.int_at_least(1), default=None,
                   help=f"timed calls per measurement (after 2 warm-up calls); the median is reported; "
                        f"{both('timing_repeats')}")


@dataclass(frozen=True)
class _Settings:
    methods: list
    epochs: int
    train_images: int
    test_images: int
    image_size: tuple
    batch_size: int
    width: int
    bmc_candidates: int
    lr: float
    compare_reference: bool
    timing_backends: list
    timing_repeats: int


def _settings(common_args: common.CommonArgs, args: argparse.Namespace) -> _Settings:
    preset = PRESETS["quick" if common_args.quick else "full"]
    pick = lambda key: preset[key] if getattr(args, key, None) is None else getattr(args, key)  # noqa: E731
    device = common_args.device
    if args.timing_backends is None:
        timing = [b for b in _dispatch.BACKENDS if _dispatch.unavailable_reason(b, device) is None
                  and not (b == "triton" and device.type == "cpu")]      # the interpreter is not a timing target
    else:
        timing = args.timing_backends
        for b in timing:
            reason = _dispatch.unavailable_reason(b, device)
            if reason is not None:
                raise SystemExit(f"--timing-backends: {b} cannot run on {device} here: {reason}")
    if not (args.lr > 0 and math.isfinite(args.lr)):
        raise SystemExit(f"--lr must be a finite number > 0, got {args.lr}")
    methods = list(args.methods) if not isinstance(args.methods, str) else _methods(args.methods)
    return _Settings(methods, pick("epochs"), pick("train_images"), pick("test_images"), tuple(pick("image_size")),
                     pick("batch_size"), pick("width"), args.bmc_candidates, float(args.lr),
                     bool(args.compare_reference), timing, pick("timing_repeats"))


# --------------------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------------------


def _method_config(s: _Settings) -> M.MethodConfig:
    """The methods' hyper-parameters for depth: the NYUD2-DIR code's choices where it has them (0.1 m bins
    over [0, 10) m, LDS gaussian ks 5 sigma 2 with reflect boundaries, raw inverse counts for RRT, a GMM of
    16 components, sigma = 1 m initially)."""
    return M.MethodConfig(lr=s.lr, bins=NUM_BINS, label_range=(0.0, MAX_DEPTH), lds_mode="reflect", inv_clip=None,
                          init_noise_sigma=0.5, bmc_candidates=s.bmc_candidates, gmm_components=16,
                          fds_eps=0.1, fds_momentum=0.5)


def _evaluate(run: M.MethodRun, test: DepthSet, test_mask: torch.Tensor, edges: torch.Tensor,
              train_counts: torch.Tensor, many: int, few: int, progress) -> tuple[dict, dict]:
    metric = DIRMetrics(edges, train_counts=train_counts, many=many, few=few, depth=True).to(test.depth.device)
    eval_batch = 32
    batches = list(DepthSet(test.image, test.depth, test_mask).batches(eval_batch))
    for x, y, m in progress(batches, desc=f"{run.name} eval"):
        metric.update(run.predict(x).clamp(*CLAMP), y, m)
    metrics = {k: (float(v) if v.is_floating_point() else int(v)) for k, v in metric.compute().items()}
    per_bin = metric.per_bin()
    return metrics, {"rmse": per_bin["rmse"].tolist(), "count": per_bin["count"].long().tolist()}


def _time_round_robin(steps: dict, device: torch.device, repeats: int, progress) -> dict:
    """Time every step of ``steps`` (key -> callable) with :func:`.common.time_step`: two warm-up calls each,
    then ``repeats`` rounds in which every step is timed once, in turn. Interleaving spreads a change of load
    on a shared machine over all the steps alike (timing them one after the other would bias the ratios).
    Returns key -> median / min / max (ms) over the rounds and the number of rounds."""
    for step in steps.values():
        common.time_step(step, device, warmup=2, repeats=1)
    samples = {key: [] for key in steps}
    for _ in progress(range(repeats), desc="timing rounds"):
        for key, step in steps.items():
            samples[key].append(common.time_step(step, device, warmup=0, repeats=1).median)
    return {key: {"median_ms": 1e3 * statistics.median(v), "min_ms": 1e3 * min(v), "max_ms": 1e3 * max(v),
                  "repeats": repeats} for key, v in samples.items()}


def _timed_run(name: str, priors, factory, device, backend: str, seed: int, stage_one, batch, reference: bool):
    """A run of ``name`` ready to be timed on ``batch``: FDS after one epoch (so that it re-colours)."""
    run = M.build(name, priors, factory, device=device, backend=backend, total_steps=None, seed=seed,
                  pretrained=stage_one if name == "rrt" else None, reference=reference)
    if name == "fds":
        run.step(*batch)
        run.end_epoch()
    return run


def run(common_args: common.CommonArgs, args: argparse.Namespace, *, print_fn: Callable[[str], None] = print) -> dict:
    """Generate the data, train every method, time every step, print the tables, write ``depth.json`` and the
    figures into ``common_args.out``; returns the JSON document plus ``"artefacts"`` (the written paths)."""
    s = _settings(common_args, args)
    device, seed, backend = common_args.device, common_args.seed, common_args.backend
    bar = lambda it, desc=None: common.progress(it, enabled=common_args.progress, desc=desc)  # noqa: E731
    h, w = s.image_size
    out = common.out_dir(common_args.out)

    # ---- data ------------------------------------------------------------------------------------
    start = time.perf_counter()
    train = make_scenes(s.train_images, h, w, seed=seed, device=device)
    test = make_scenes(s.test_images, h, w, seed=seed + 7919, device=device, balanced=True)
    edges = bin_edges(NUM_BINS, (0.0, MAX_DEPTH), device=device)
    test_mask, cap = balance_mask(test.depth, test.mask, edges, start=BALANCE_FROM, seed=seed)
    generate_seconds = time.perf_counter() - start
    valid = train.depth[train.mask]
    train_counts = label_histogram(valid, edges)
    test_counts = label_histogram(test.depth[test_mask], edges)
    total = float(train_counts.sum())
    many, few = int(round(MANY_SHARE * total)), int(round(FEW_SHARE * total))
    groups = ["many" if c > many else "few" if c < few else "medium" for c in train_counts.tolist()]
    data = {"image_size": [h, w], "train_images": s.train_images, "test_images": s.test_images,
            "train_pixels": int(total), "test_pixels": int(test_mask.sum()),
            "train_fraction_1_4m": float(((valid >= 1) & (valid < 4)).double().mean()),
            "train_fraction_beyond_6m": float((valid > 6).double().mean()),
            "train_hole_fraction": float(1.0 - train.mask.double().mean()),
            "test_cap_per_bin": cap, "generate_seconds": generate_seconds}

    steps_per_epoch = math.ceil(s.train_images / s.batch_size)
    print_fn(f"train depth: {s.train_images} training scenes {h}x{w} ({data['train_pixels']} valid pixels: "
             f"{100 * data['train_fraction_1_4m']:.1f}% at 1-4 m, {100 * data['train_fraction_beyond_6m']:.2f}% "
             f"beyond 6 m, {100 * data['train_hole_fraction']:.1f}% holes); test: {s.test_images} scenes "
             f"balanced to <= {cap} pixels per 0.1 m bin from {BALANCE_FROM} m ({data['test_pixels']} pixels)")
    shot_ranges = _shot_ranges(groups)
    print_fn(f"shots by training pixels per 0.1 m bin: many > {many} ({100 * MANY_SHARE:g}%), few < {few} "
             f"({100 * FEW_SHARE:g}%): " + "; ".join(f"{g} {r}" for g, r in shot_ranges.items()))
    print_fn(f"model: encoder-decoder CNN width {s.width} (FDS on {2 * s.width}-channel features at {h // 2}x"
             f"{w // 2}), Adam lr {s.lr:g} cosine, {s.epochs} epochs x {steps_per_epoch} steps of {s.batch_size} "
             f"images; device {device}, backend {backend}, threads {torch.get_num_threads()}, seed {seed}")

    # ---- priors, models ----------------------------------------------------------------------------
    cfg = _method_config(s)
    needed = list(dict.fromkeys(s.methods + (["mse"] if "rrt" in s.methods else [])))
    priors = M.fit_priors(train.depth, train.mask, cfg, methods=needed, seed=seed)
    factory = lambda out_channels: DepthNet(out_channels, s.width)  # noqa: E731

    def batches(epoch: int):
        order = torch.randperm(s.train_images, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
        return list(train.batches(s.batch_size, order=order))

    # ---- training for accuracy (once, on --backend) -------------------------------------------------
    total_steps = s.epochs * steps_per_epoch
    trained: dict[str, M.MethodRun] = {}
    results: dict[str, dict] = {}
    per_bin: dict[str, dict] = {}
    order = [n for n in needed if n != "rrt"] + (["rrt"] if "rrt" in s.methods else [])
    for name in bar(order, desc="methods"):
        run_ = M.build(name, priors, factory, device=device, backend=backend, total_steps=total_steps, seed=seed,
                       pretrained=trained["mse"].model if name == "rrt" else None)
        result = M.train(run_, batches, s.epochs, progress=bar)
        trained[name] = run_
        if name not in s.methods:
            print_fn(f"  (stage one of RRT: MSE trained in {result.seconds:.1f} s, not reported)")
            continue
        metrics, per_bin[name] = _evaluate(run_, test, test_mask, edges, train_counts, many, few, bar)
        results[name] = {"display": run_.display, "backend": run_.backends()[M.METHOD_OPS[name][0]],
                         "backends": run_.backends(), "metrics": metrics, "train_seconds": result.seconds,
                         "epoch_losses": result.epoch_losses, "noise_sigma": run_.noise_sigma,
                         "stage_one": "mse" if name == "rrt" else None}
        print_fn(f"  {run_.display:<28} trained in {result.seconds:6.1f} s on {results[name]['backend']:<6} "
                 f"final loss {result.final_loss:.4f}; RMSE all {metrics['all/rmse']:.3f}, "
                 f"few {metrics['few/rmse']:.3f}")
    print_fn("")
    print_fn(_dir_table(results))

    # ---- timing (separate from training) ------------------------------------------------------------
    batch = next(iter(train.batches(s.batch_size)))
    stage_one = trained["mse"].model if "mse" in trained else None
    steps = {}
    for name in s.methods:
        for b in s.timing_backends:
            steps[(name, b)] = _timed_run(name, priors, factory, device, b, seed, stage_one, batch, reference=False)
    ours_backend = next((b for b in ("cpp", "triton", "torch") if b in s.timing_backends), s.timing_backends[0])
    if s.compare_reference:
        for name in [n for n in s.methods if n in M.REFERENCE]:
            steps[(name, "reference")] = _timed_run(name, priors, factory, device, "torch", seed, stage_one, batch,
                                                    reference=True)
    measured = _time_round_robin({key: functools.partial(r.step, *batch) for key, r in steps.items()}, device,
                                 s.timing_repeats, bar)
    timing: dict = {name: {b: measured[(name, b)] for b in s.timing_backends} for name in s.methods}
    for name, per_backend in timing.items():
        for b, t in per_backend.items():
            base = timing.get("mse", {}).get(b)
            t["overhead_vs_mse"] = t["median_ms"] / base["median_ms"] if base else None
            t["overhead_ms"] = t["median_ms"] - base["median_ms"] if base else None
    reference = None
    if s.compare_reference:
        reference = {}
        for name in [n for n in s.methods if n in M.REFERENCE]:
            t = measured[(name, "reference")]
            ours = timing[name][ours_backend]["median_ms"]
            reference[name] = {**t, "formulation": M.REFERENCE[name], "ours_ms": ours, "ours_backend": ours_backend,
                               "speedup": t["median_ms"] / ours}
    timing["reference"] = reference
    print_fn("")
    print_fn(_timing_table(timing, s, batch, h, w))

    # ---- artefacts ------------------------------------------------------------------------------------
    doc = {
        "schema": SCHEMA,
        "config": {"methods": s.methods, "epochs": s.epochs, "train_images": s.train_images,
                   "test_images": s.test_images, "image_size": [h, w], "batch_size": s.batch_size,
                   "width": s.width, "bmc_candidates": s.bmc_candidates, "lr": s.lr,
                   "compare_reference": s.compare_reference, "timing_backends": s.timing_backends,
                   "timing_repeats": s.timing_repeats, "steps_per_epoch": steps_per_epoch,
                   "method_config": cfg.as_dict(), "device": str(device), "backend": backend, "seed": seed,
                   "quick": common_args.quick, "threads": common_args.threads,
                   "environment": common.environment()},
        "data": data,
        "shots": {"bin_width": BIN_WIDTH, "many_share": MANY_SHARE, "few_share": FEW_SHARE,
                  "many_threshold": many, "few_threshold": few, "groups": groups},
        "methods": results,
        "timing": timing,
        "histogram": {"edges": edges.tolist(), "train_counts": train_counts.tolist(),
                      "test_counts": test_counts.tolist()},
        "error_by_bin": per_bin,
    }
    artefacts = [common.write_json(out / "depth.json", doc)]
    if common_args.plots:
        artefacts += _figures(out, doc, train)
    print_fn("")
    print_fn("DIR protocol: RMSE / AbsRel / δ1 on the balanced test pixels, grouped by the training pixel count "
             "of their 0.1 m depth bin; timing: one full training step (forward, loss, backward, optimiser; "
             "FDS statistics; BSAM's two passes), median over repeats, same model and batch for every method.")
    return {**doc, "artefacts": [str(p) for p in artefacts]}


def _shot_ranges(groups: list) -> dict:
    """{'many': '1.5-4.4 m', ...}: the depth ranges of each group's bins (runs of consecutive bins)."""
    out = {}
    for g in ("many", "medium", "few"):
        runs, start = [], None
        for i, gi in enumerate(groups + [None]):
            if gi == g and start is None:
                start = i
            elif gi != g and start is not None:
                runs.append(f"{start * BIN_WIDTH:.1f}-{i * BIN_WIDTH:.1f}")
                start = None
        out[g] = ", ".join(runs) + " m" if runs else "none"
    return out


def _dir_table(results: dict) -> str:
    header = ["method", "backend"] + [f"{metric} {group}" for metric in ("RMSE", "AbsRel", "δ1")
                                      for group in ("All", "Many", "Med.", "Few")]
    rows = []
    for r in results.values():
        m = r["metrics"]
        rows.append([r["display"], r["backend"]] + [m[f"{shot}/{key}"] for key in ("rmse", "absrel", "delta1")
                                                    for shot in SHOTS])
    return common.format_table(header, rows)


def _timing_table(timing: dict, s: _Settings, batch, h: int, w: int) -> str:
    pixels = batch[0].shape[0] * h * w
    backends = s.timing_backends
    header = ["method"] + [f"{b} ms" for b in backends] + [f"{b} vs MSE" for b in backends]
    reference = timing.get("reference")
    if reference:
        header += ["published ms", "speed-up"]
    rows = []
    for name in s.methods:
        per = timing[name]
        row = [M.METHODS[name]] + [f"{per[b]['median_ms']:.1f}" for b in backends]
        for b in backends:
            t = per[b]
            row.append("-" if t["overhead_vs_mse"] is None else
                       f"{t['overhead_vs_mse']:.2f}x {t['overhead_ms']:+.1f}")
        if reference:
            ref = reference.get(name)
            row += ([f"{ref['median_ms']:.1f}", f"{ref['speedup']:.1f}x ({ref['ours_backend']})"] if ref
                    else ["-", "-"])
        rows.append(row)
    title = (f"training step time per method (batch of {batch[0].shape[0]} images, {pixels} pixels; median of "
             f"{s.timing_repeats} round-robin rounds; 'vs MSE': ratio and extra ms over plain MSE on the same "
             f"backend" + ("; speed-up: published step / ours" if reference else "") + ")")
    return title + "\n" + common.format_table(header, rows)


def _log_heights(counts: list) -> list:
    """Counts for a log axis: empty bins as NaN (not drawn)."""
    return [c if c > 0 else math.nan for c in counts]


def _figures(out: Path, doc: dict, train: DepthSet) -> list[Path]:
    plt = common.pyplot()
    edges = doc["histogram"]["edges"]
    centres = [(a + b) / 2 for a, b in zip(edges[:-1], edges[1:])]
    counts = doc["histogram"]["train_counts"]
    colours = {"many": "#d9f0d3", "medium": "#fee8c8", "few": "#fcbba1"}

    def shade(ax):
        for i, g in enumerate(doc["shots"]["groups"]):
            ax.axvspan(edges[i], edges[i + 1], color=colours[g], lw=0, zorder=0)

    paths = []
    fig, ax = plt.subplots(figsize=(9, 5))
    twin = ax.twinx()                           # behind the curves: shot shading and training histogram
    shade(twin)
    for name, curve in doc["error_by_bin"].items():
        ax.plot(centres, [math.nan if v is None or v != v else v for v in curve["rmse"]], lw=1.4,
                label=doc["methods"][name]["display"], zorder=3)
    ax.set_xlabel("depth bin (m)")
    ax.set_ylabel("test RMSE in the bin (m)")
    ax.set_xlim(0, MAX_DEPTH)
    twin.set_yscale("log")                      # before the bars: they start at 1 pixel, not at log(0)
    twin.bar(centres, _log_heights(counts), width=BIN_WIDTH, bottom=1.0, color="0.45", alpha=0.3, zorder=1)
    twin.set_ylabel("training pixels per 0.1 m bin (grey, log)")
    ax.set_zorder(twin.get_zorder() + 1)
    ax.patch.set_visible(False)
    ax.legend(fontsize=8, ncol=2, loc="upper left")
    ax.set_title("per-depth-bin error of each method (background: many / medium / few-shot bins)")
    fig.tight_layout()
    paths.append(out / "depth_error_by_bin.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(9, 4))
    shade(ax)
    ax.bar(centres, _log_heights(counts), width=BIN_WIDTH, color="tab:blue", label="training pixels")
    test_counts = doc["histogram"]["test_counts"]
    ax.stairs(_log_heights(test_counts), edges, color="tab:orange", lw=1.5, label="balanced test pixels")
    ax.set_yscale("log")
    ax.set_xlim(0, MAX_DEPTH)
    ax.set_xlabel("depth (m), 0.1 m bins")
    ax.set_ylabel("pixels (log)")
    ax.legend(fontsize=8)
    ax.set_title("label distribution (background: many / medium / few-shot bins by training pixels)")
    fig.tight_layout()
    paths.append(out / "depth_label_histogram.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    n = min(4, len(train))
    fig, axes = plt.subplots(3, n, figsize=(2.6 * n, 6.0), squeeze=False)
    for j in range(n):
        img = (train.image[j].permute(1, 2, 0).cpu() + 0.5).clamp(0, 1)
        axes[0][j].imshow(img.numpy())
        axes[1][j].imshow(train.depth[j, 0].cpu().numpy(), cmap="viridis", vmin=0, vmax=MAX_DEPTH)
        axes[2][j].imshow(train.mask[j, 0].cpu().float().numpy(), cmap="gray", vmin=0, vmax=1)
        for i in range(3):
            axes[i][j].set_axis_off()
    axes[0][0].set_title("input", loc="left", fontsize=9)
    axes[1][0].set_title("depth (0-10 m)", loc="left", fontsize=9)
    axes[2][0].set_title("valid mask", loc="left", fontsize=9)
    fig.tight_layout()
    paths.append(out / "depth_samples.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)
    return paths
