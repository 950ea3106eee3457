"""End-to-end demo of the DIR methods (``python -m imbreg_fast``, ``make demo``).

A synthetic imbalanced regression task after the Balanced MSE paper's synthetic benchmark (Ren et al.,
CVPR 2022, Sec. 5.1): training labels follow a skewed distribution, the inputs are noisy observations of
them, and the test labels are uniform over the label range. A small MLP is trained with plain MSE and with
each Balanced MSE variant (BMC, GAI with a :func:`imbreg_fast.fit_gmm` prior, BNI with a
:func:`imbreg_fast.bin_prior` prior), with classification-aided regression (an MSE head plus a
balanced-class cross-entropy head, :class:`imbreg_fast.reg_cls.RegClsLoss`) and with BSAM (SAM on the
SQINV-weighted MSE, :class:`imbreg_fast.optim.BSAM`); the table reports the test error overall and on the many / medium /
few-shot label regions of the DIR protocol (docs/methods.md §6, :func:`imbreg_fast.metrics.shot_metrics`).

The pieces are separate functions (data, criteria, training loop, evaluation, table) so that larger
benchmarks can reuse them.

The task (all tensors ``[N, 1]``)::

    y_train ~ p_train (skewed, truncated to [y_low, y_high]),   x_train = y_train + eps,  eps ~ N(0, noise^2)
    y_test  ~ Uniform(y_low, y_high),                           x_test  = y_test

so x is the label observed through Gaussian noise. Plain MSE learns E[y | x] under the skewed training prior
and regresses rare labels towards the frequent ones; the balanced losses remove the training prior from the
likelihood and learn y ~= x, which is what a uniform test distribution rewards.
"""
from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional

import torch
from torch import nn

from .. import _dispatch
from .. import nn as inn
from ..functional import weighted_mse_loss
from ..lds import LabelWeights
from ..metrics import SHOTS, shot_metrics
from ..optim import BSAM, bsam_step
from ..priors import bin_prior, fit_gmm
from ..reg_cls import ClassBins, RegClsLoss

__all__ = ["SyntheticConfig", "Dataset", "make_synthetic", "make_model", "make_criteria", "train",
           "evaluate", "format_table", "run", "main"]


# --------------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SyntheticConfig:
    """The synthetic task. ``train_dist``: ``'normal'`` (N(y_mean, y_std^2)) or ``'exp'`` (y_low +
    Exponential(rate)), truncated to ``[y_low, y_high]``. Shot groups use bins of width ``shot_bin_width``;
    the BNI prior uses ``bni_bins`` equal-width bins over the label range and GAI ``gmm_components``;
    reg+cls equalises ``regcls_classes`` classes; BSAM perturbs with radius ``bsam_rho``."""
    n_train: int = 8192
    n_test: int = 4096
    y_low: float = 0.0
    y_high: float = 10.0
    train_dist: str = "normal"
    y_mean: float = 5.0
    y_std: float = 1.0
    exp_rate: float = 0.5
    noise_std: float = 1.0
    shot_bin_width: float = 0.5
    bni_bins: int = 100
    gmm_components: int = 8
    regcls_classes: int = 20
    bsam_rho: float = 0.05


class Dataset(NamedTuple):
    x_train: torch.Tensor      # [N, 1]
    y_train: torch.Tensor      # [N, 1]
    x_test: torch.Tensor       # [M, 1]
    y_test: torch.Tensor       # [M, 1]
    shot_edges: torch.Tensor   # [B + 1] bins of the shot groups over [y_low, y_high]


def _sample_train_labels(cfg: SyntheticConfig, n: int, gen: torch.Generator) -> torch.Tensor:
    out = []
    have = 0
    while have < n:   # rejection to the label range (a few rounds at most)
        if cfg.train_dist == "normal":
            y = cfg.y_mean + cfg.y_std * torch.randn(2 * n, generator=gen, dtype=torch.float64)
        elif cfg.train_dist == "exp":
            y = cfg.y_low - torch.log1p(-torch.rand(2 * n, generator=gen, dtype=torch.float64)) / cfg.exp_rate
        else:
            raise ValueError(f"train_dist must be 'normal' or 'exp', got {cfg.train_dist!r}")
        y = y[(y >= cfg.y_low) & (y <= cfg.y_high)]
        out.append(y)
        have += y.numel()
    return torch.cat(out)[:n]


def make_synthetic(cfg: SyntheticConfig, seed: int, dtype: torch.dtype = torch.float32) -> Dataset:
    """The data set of ``cfg``, deterministic in ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    y_train = _sample_train_labels(cfg, cfg.n_train, gen)
    x_train = y_train + cfg.noise_std * torch.randn(cfg.n_train, generator=gen, dtype=torch.float64)
    y_test = cfg.y_low + (cfg.y_high - cfg.y_low) * torch.rand(cfg.n_test, generator=gen, dtype=torch.float64)
    n_bins = max(1, round((cfg.y_high - cfg.y_low) / cfg.shot_bin_width))
    edges = torch.linspace(cfg.y_low, cfg.y_high, n_bins + 1, dtype=torch.float64)
    col = lambda t: t.reshape(-1, 1).to(dtype)  # noqa: E731
    return Dataset(col(x_train), col(y_train), col(y_test), col(y_test), edges)


# --------------------------------------------------------------------------------------------------
# model and criteria
# --------------------------------------------------------------------------------------------------


def make_model(hidden: int = 64, seed: int = 0, outputs: int = 1) -> nn.Module:
    """A 2-hidden-layer MLP on 1-D inputs, initialised from ``seed``; output 0 is the prediction (further
    outputs: the class logits of reg+cls)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(1, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                             nn.Linear(hidden, outputs))


class Criterion(NamedTuple):
    name: str
    module: nn.Module           # called as module(pred, target), or module(pred, logits, target) for reg+cls
    op: Optional[str]           # public op for selected_backend, None for the torch-only ones
    kind: str = "loss"          # 'loss' | 'regcls' (model has 1 + C outputs) | 'bsam' (BSAM, SQINV weights)
    weights: Optional[LabelWeights] = None   # 'bsam': the per-sample weights of both passes


def make_criteria(data: Dataset, cfg: SyntheticConfig, *, backend: str = "auto", init_noise_std: float = 1.5,
                  names=("MSE", "BMC", "GAI", "BNI", "REGCLS", "BSAM")) -> list[Criterion]:
    """The losses to compare. The balanced ones learn sigma from ``init_noise_std`` (the true noise is
    ``cfg.noise_std``; like the paper we start from a wrong guess). Priors, classes and weights are fitted on
    the training labels."""
    y = data.y_train.reshape(-1)
    out = []
    for name in names:
        if name == "MSE":
            out.append(Criterion(name, nn.MSELoss(), None))
        elif name == "BMC":
            out.append(Criterion(name, inn.BMCLoss(init_noise_std, backend=backend), "bmc_loss"))
        elif name == "GAI":
            gmm = fit_gmm(y, cfg.gmm_components, seed=0)
            out.append(Criterion(f"GAI (K={cfg.gmm_components})", inn.GAILoss(gmm, init_noise_std, backend=backend),
                                 "gai_loss"))
        elif name == "BNI":
            centers, weights = bin_prior(y, cfg.bni_bins, range=(cfg.y_low, cfg.y_high))
            out.append(Criterion(f"BNI ({centers.numel()} bins)",
                                 inn.BNILoss(centers, weights, init_noise_std, backend=backend), "bni_loss"))
        elif name == "REGCLS":
            bins = ClassBins.fit(y, cfg.regcls_classes, range=(cfg.y_low, cfg.y_high), num_bins=cfg.bni_bins)
            loss = RegClsLoss(lambda p, t: weighted_mse_loss(p, t, backend=backend), bins, lam=1.0)
            out.append(Criterion(f"reg-cls MSE (C={bins.num_classes})", loss, "weighted_regression_loss",
                                 "regcls"))
        elif name == "BSAM":
            lw = LabelWeights(cfg.bni_bins, range=(cfg.y_low, cfg.y_high), scheme="sqrt_inv", lds=False).fit(y)
            loss = lambda p, t, w: weighted_mse_loss(p, t, w, backend=backend)  # noqa: E731
            out.append(Criterion("SQINV MSE + BSAM", _Weighted(loss), "weighted_regression_loss", "bsam", lw))
        else:
            raise ValueError(f"unknown criterion {name!r}")
    return out


class _Weighted(nn.Module):
    """A weighted loss ``fn(pred, target, weight)`` as a module (BSAM's criterion)."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, pred, target, weight):
        return self.fn(pred, target, weight)


# --------------------------------------------------------------------------------------------------
# training and evaluation
# --------------------------------------------------------------------------------------------------


class TrainResult(NamedTuple):
    seconds: float
    final_loss: float
    noise_sigma: float          # NaN for plain MSE


def train(model: nn.Module, criterion, data: Dataset, *, steps: int, batch_size: int = 256,
          lr: float = 3e-3, sigma_lr: float = 3e-2, seed: int = 0, rho: float = 0.05,
          log: Optional[Callable[[str], None]] = None) -> TrainResult:
    """Adam on ``model`` (cosine-decayed ``lr``) and on the criterion's learnable sigma (``sigma_lr``), with
    minibatches drawn with replacement from a generator seeded with ``seed`` (the same batches for every
    criterion). ``criterion``: a loss module, or a :class:`Criterion` (reg+cls: the model's extra outputs are
    the class logits; BSAM: Adam wrapped in :class:`imbreg_fast.optim.BSAM` with radius ``rho``, SQINV weights
    in both passes, as the published recipe)."""
    if not isinstance(criterion, Criterion):
        criterion = Criterion("loss", criterion, None)
    module = criterion.module
    params = [{"params": model.parameters(), "lr": lr}]
    sigma = getattr(module, "noise_sigma", None)
    if isinstance(sigma, nn.Parameter):
        params.append({"params": [sigma], "lr": sigma_lr})
    if criterion.kind == "bsam":
        opt = BSAM(params, torch.optim.Adam, rho=rho)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt.base_optimizer, T_max=steps)
    else:
        opt = torch.optim.Adam(params)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    gen = torch.Generator().manual_seed(seed)
    n = data.x_train.shape[0]
    model.train()
    loss = torch.zeros(())
    start = time.perf_counter()
    for step in range(steps):
        idx = torch.randint(n, (batch_size,), generator=gen)
        x, y = data.x_train[idx], data.y_train[idx]
        if criterion.kind == "bsam":
            w = criterion.weights.weights(y)
            loss = bsam_step(opt, lambda weight: module(model(x), y, weight), w, w)
        else:
            out = model(x)
            if criterion.kind == "regcls":
                loss = module(out[:, :1], out[:, 1:], y, generator=gen)
            else:
                loss = module(out, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
        if log is not None and (step + 1) % max(1, steps // 4) == 0:
            log(f"    step {step + 1:5d}  loss {float(loss):.4f}")
    seconds = time.perf_counter() - start
    return TrainResult(seconds, float(loss.detach()), float(sigma.detach()) if sigma is not None else math.nan)


@torch.no_grad()
def evaluate(model: nn.Module, data: Dataset) -> dict[str, float]:
    """The test metrics of ``model``: :func:`imbreg_fast.metrics.shot_metrics` as Python floats (keys such as
    ``'few/mae'``)."""
    model.eval()
    metrics = shot_metrics(model(data.x_test)[:, :1], data.y_test, data.y_train, data.shot_edges)
    return {key: value.item() for key, value in metrics.items()}


# --------------------------------------------------------------------------------------------------
# table
# --------------------------------------------------------------------------------------------------


class Row(NamedTuple):
    loss: str
    backend: str
    sigma: float
    metrics: dict
    seconds: float


def format_table(rows: list[Row]) -> str:
    """Fixed-width text table: one line per criterion."""
    head = (f"{'loss':<20} {'backend':<8} {'sigma':>6} | "
            + " ".join(f"{'MSE ' + s:>10}" for s in SHOTS) + " | "
            + " ".join(f"{'MAE ' + s:>10}" for s in SHOTS) + f" | {'time s':>6}")
    lines = [head, "-" * len(head)]
    for r in rows:
        sigma = "-" if math.isnan(r.sigma) else f"{r.sigma:.3f}"
        lines.append(f"{r.loss:<20} {r.backend:<8} {sigma:>6} | "
                     + " ".join(f"{r.metrics[f'{s}/mse']:>10.3f}" for s in SHOTS) + " | "
                     + " ".join(f"{r.metrics[f'{s}/mae']:>10.3f}" for s in SHOTS) + f" | {r.seconds:>6.2f}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------------------


def run(*, backend: str = "auto", steps: int = 1500, seed: int = 0, cfg: SyntheticConfig = SyntheticConfig(),
        init_noise_std: float = 1.5, verbose: bool = False, print_fn: Callable[[str], None] = print) -> list[Row]:
    """Train one model per criterion and print the comparison table; returns the rows."""
    data = make_synthetic(cfg, seed)
    counts = shot_metrics(data.y_test, data.y_test, data.y_train, data.shot_edges)
    if cfg.train_dist == "normal":
        dist = f"N({cfg.y_mean:g}, {cfg.y_std:g}^2)"
    else:
        dist = f"{cfg.y_low:g} + Exp(rate {cfg.exp_rate:g})"
    print_fn(f"imbreg_fast demo: train labels ~ {dist} on [{cfg.y_low:g}, {cfg.y_high:g}] (n={cfg.n_train}), "
             f"x = y + N(0, {cfg.noise_std:g}^2); test labels ~ Uniform (n={cfg.n_test}), x = y")
    print_fn(f"shot groups (train count per {cfg.shot_bin_width:g}-wide label bin: many > 100, few < 20): "
             + ", ".join(f"{s} {int(counts[f'{s}/count'])}" for s in SHOTS[1:]) + " test samples")
    print_fn(f"model: MLP 1-64-64-1, Adam, {steps} steps of batch 256, seed {seed}; sigma learned from "
             f"{init_noise_std:g} (true noise {cfg.noise_std:g}); torch threads {torch.get_num_threads()}")
    rows = []
    for crit in make_criteria(data, cfg, backend=backend, init_noise_std=init_noise_std):
        used = "torch" if crit.op is None else _dispatch.selected_backend(data.y_train, crit.op, backend)
        if verbose:
            print_fn(f"  {crit.name} [{used}]")
        outputs = 1 + crit.module.class_bins.num_classes if crit.kind == "regcls" else 1
        model = make_model(seed=seed, outputs=outputs)
        result = train(model, crit, data, steps=steps, seed=seed, rho=cfg.bsam_rho,
                       log=print_fn if verbose else None)
        rows.append(Row(crit.name, used, result.noise_sigma, evaluate(model, data), result.seconds))
    print_fn("")
    print_fn(format_table(rows))
    print_fn("errors against the noise-free uniform test labels; sigma: learned noise scale; time: training "
             "wall-clock")
    return rows


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m imbreg_fast",
        description="Train a small MLP on a synthetic imbalanced regression task with plain MSE, each "
                    "Balanced MSE loss (BMC, GAI, BNI), classification-aided regression and BSAM; print test "
                    "MSE/MAE overall and on the many/medium/few-shot label regions.")
    p.add_argument("--backend", default="auto", choices=("auto",) + _dispatch.BACKENDS,
                   help="kernel backend of the losses (default: auto, or $IMBREG_BACKEND)")
    p.add_argument("--steps", type=int, default=1500, help="training steps per loss (default: 1500)")
    p.add_argument("--seed", type=int, default=0, help="seed of data, model initialisation and batches")
    p.add_argument("--train-dist", default="normal", choices=("normal", "exp"),
                   help="training label distribution (default: normal)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (default: 1). The problems are tiny: more threads only add "
                        "synchronisation, and on a busy 2-core machine 2 threads ran this demo ~30x slower")
    p.add_argument("--verbose", action="store_true", help="print the training loss while training")
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if args.steps < 1:
        raise SystemExit("--steps must be >= 1")
    if args.threads < 1:
        raise SystemExit("--threads must be >= 1")
    torch.set_num_threads(args.threads)
    run(backend=args.backend, steps=args.steps, seed=args.seed,
        cfg=SyntheticConfig(train_dist=args.train_dist), verbose=args.verbose)
    return 0
