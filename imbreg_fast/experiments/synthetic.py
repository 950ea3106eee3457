"""``python -m imbreg_fast benchmark synthetic``: the synthetic benchmark of the Balanced MSE paper.

Ren et al., "Balanced MSE for Imbalanced Visual Regression", CVPR 2022, supplement; the published scripts are
``synthetic_benchmark/main_1d.py`` and ``main_2d.py`` of github.com/jiawei-ren/BalancedMSE. A linear model is
trained on 1024 samples whose labels follow a skewed distribution and carry Gaussian noise, and is tested on
labels that are uniform over the label range and noise-free. This module follows the published scripts; where
it departs from them it says so below.

**Data** (:func:`make_data`, one draw per setting and seed):

- 1-D settings (labels in ``[0, 10]``): the observed training label ``y ~ p_train`` is drawn and kept only if it
  lies in ``[0, 10]`` (rejection: the published script draws twice the samples it needs and trims); the noise
  is ``eps ~ N(0, 1)``; the input is the oracle label, ``x = y - eps`` (the published ``K = 1, B = 0``), so x
  may fall outside ``[0, 10]``. ``p_train`` is Normal(5, s^2) with s = 0.5 / 0.75 / 1 (``normal-high`` /
  ``normal-moderate`` / ``normal-low`` skew) or Exponential(rate) with rate = 2 / 1.5 / 1 (``exp-high`` /
  ``exp-moderate`` / ``exp-low``). Validation and test sets: 1024 labels each, Uniform(0, 10), ``x = y``.
- 2-D setting ``mvn``: ``y ~ N(0, [[1, .5], [.5, 1]])`` (not truncated, as published), ``eps ~ N(0, I)``,
  ``x = A (y - eps)`` with a random ``A = 0.01 * randn(2, 2)`` drawn per seed (the published
  ``ORACLE_MATRIX``). Validation and test sets: 256 labels each, Uniform([-5, 5]^2), ``x = A y``.

**Model and optimisation** (:func:`train_run`): ``nn.Linear(d, d)`` (torch's default initialisation, the same
for every method of one seed); 1-D: SGD (momentum 0.9, lr 1e-3) for 2000 epochs; 2-D: Adam (lr 0.2) for
10000 epochs; both with a cosine schedule over the epochs, batches of 256 from a fresh permutation every epoch
(4 steps per epoch). A learned noise scale starts at 1.5 times the true sigma = 1 and is one more parameter
group of the same optimiser, with lr 1e-3 (1-D) or 1e-2 (2-D), as published.

**Methods** (:data:`METHODS`; the published script's name in brackets): ``MSE`` [MSE]; ``Reweight``
[Reweight]: MSE weighted by the inverse of the true training-label density, normalised over the batch;
``GAI (true noise)`` [GAI] and ``BMC (true noise)`` [BMC]: sigma fixed at the true noise 1;
``GAI (learned noise)`` [GAI Learnable Noise] and ``BMC (learned noise)`` [BMC Learnable Noise];
``BNI (learned noise)``: not in the published script, added because the library has it; its prior is the
histogram of the training labels (:func:`imbreg_fast.bin_prior`; for 2-D a ``bins x bins`` grid over the
label square, since the loss takes ``[K, d]`` centres). The GAI prior is, as published, a GMM fitted to 10000
samples of the true training-label distribution (1 component for the Normal and MVN settings, 64 for the
Exponential), here with :func:`imbreg_fast.fit_gmm`; ``--gai-prior train`` fits it to the 1024 training
labels instead. The Balanced MSE losses and the weighted MSE run on the library's kernels with ``--backend``.

**Which parameters are tested** (``--select``): the validation MSE is computed every ``--eval-every``
epochs and after the last, and ``synthetic.json`` holds the test MSE of both the parameters with the lowest
validation MSE (``best_val``) and the last ones (``last``); the table shows ``--select`` (default
``best-val``: model selection on the validation set, as the protocol prescribes; the published script keeps
the best-validation model but computes its test loss with the last one, a slip we do not copy). Note what the
selection does here: the validation labels are balanced and noise-free, i.e. drawn like the test labels, and
SGD on MSE first fits the label mean with the slope (passing near ``y = x`` when the bias starts near 0)
before it slides along the ill-conditioned valley to the MSE solution ``E_train[y | x]``; ``best-val`` picks
that early iterate of plain MSE (normal-high, 5 seeds, published recipe: MSE's test error 0.28 ± 0.24, chosen
at epoch 20 or 40, against 5.1 ± 0.2 after the last epoch; Balanced MSE's is about 0.015 either way). The
comparison narrows but holds; ``--select last`` shows the end-of-training numbers.

**Also different**: the published script draws a fresh initialisation for every method; here every method of
one (setting, seed) starts from the same initialisation and sees the same batches (a paired comparison).
Every random draw comes from a CPU generator seeded from ``(--seed + i, setting name)``, so a run is
deterministic and does not depend on which other settings or methods are selected.

**--quick**: one seed, 100 epochs (1-D) / 200 epochs (2-D) at 10 times the learning rates (and sigma
learning rates), so the parameters travel about as far as in the full recipe; a smoke test of the trends,
not the published recipe.

**Speed**: the problems are tiny, so a step costs mostly Python and dispatch overhead: the data stay on the
device as whole tensors (no DataLoader), evaluation runs under ``no_grad``, the losses skip their value checks
(``check_finite=False``), and torch runs on one thread unless ``--threads`` is given. ``--jobs N`` trains
whole (setting, seed) units in N worker processes (CPU); the numbers do not depend on it.
"""
from __future__ import annotations

import argparse
import math
import multiprocessing
import time
import warnings
import zlib
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import nn as inn
from .._dispatch import selected_backend
from ..functional import weighted_mse_loss
from ..priors import GMM, ConvergenceWarning, bin_prior, fit_gmm
from .common import (CommonArgs, backend_of, environment, fmt_mean_std, format_table, int_at_least, mean_std,
                     progress, pyplot, write_json)

__all__ = ["METHODS", "SETTINGS", "Setting", "SyntheticData", "RunResult", "Options", "SeedResult", "make_data",
           "label_log_density", "gai_prior", "bni_prior", "make_model", "make_criterion", "train_run",
           "run_setting_seed", "evaluate_mse", "results_table", "add_arguments", "run"]

JSON_NAME = "synthetic.json"

METHODS = {
    "mse": "MSE",
    "reweight": "Reweight",
    "gai-true": "GAI (true noise)",
    "bmc-true": "BMC (true noise)",
    "gai": "GAI (learned noise)",
    "bmc": "BMC (learned noise)",
    "bni": "BNI (learned noise)",
}
"""Command-line key -> the method's name in the table and in ``synthetic.json``."""

# method key -> (public op of the library it runs, learns the noise scale)
_METHOD_OPS = {"mse": (None, False), "reweight": ("weighted_regression_loss", False),
               "gai-true": ("gai_loss", False), "bmc-true": ("bmc_loss", False),
               "gai": ("gai_loss", True), "bmc": ("bmc_loss", True), "bni": ("bni_loss", True)}

N_TRAIN = 1024
BATCH_SIZE = 256
NOISE_SIGMA = 1.0            # the true label noise
LEARNED_NOISE_INIT = 1.5     # learned sigma starts at this multiple of the true noise (published)
MOMENTUM = 0.9               # SGD momentum of the 1-D settings
GMM_SAMPLES = 10000          # samples of the true label distribution the GAI prior is fitted to (published)
ORACLE_SCALE = 0.01          # 2-D: x = A y_oracle with A = ORACLE_SCALE * randn(d, d) (published)
DEFAULT_SEEDS = 5
DEFAULT_BNI_BINS = 50
EVALS_PER_RUN = 100          # default --eval-every: this many validations per run


@dataclass(frozen=True)
class Setting:
    """One label distribution of the protocol and its training recipe.

    ``family``: ``'normal'`` (Normal(mean, ``param``^2) truncated to ``[low, high]``), ``'exp'``
    (Exponential(rate ``param``) truncated to ``[low, high]``) or ``'mvn'`` (d-variate normal, mean at the
    centre of the label box, unit variances and correlation ``param``, not truncated). ``low``/``high``: the
    label range of the (uniform) validation and test labels, per dimension.
    """
    name: str
    family: str
    param: float
    dim: int
    low: float
    high: float
    n_eval: int             # size of the validation set and of the test set
    optimizer: str          # 'sgd' | 'adam'
    lr: float
    sigma_lr: float
    epochs: int
    quick_epochs: int
    quick_lr_scale: float   # --quick: lr and sigma lr times this (fewer epochs, same distance travelled)
    gmm_components: int

    @property
    def mean(self) -> float:
        return 0.5 * (self.low + self.high)

    def describe(self) -> str:
        """E.g. ``'Normal(5, 0.5^2) on [0, 10]'``."""
        if self.family == "normal":
            return f"Normal({self.mean:g}, {self.param:g}^2) on [{self.low:g}, {self.high:g}]"
        if self.family == "exp":
            return f"Exponential(rate {self.param:g}) on [{self.low:g}, {self.high:g}]"
        return (f"MVN(0, unit variances, correlation {self.param:g}) in {self.dim}-D, test on "
                f"[{self.low:g}, {self.high:g}]^{self.dim}")


def _one_d(name: str, family: str, param: float) -> Setting:
    return Setting(name, family, param, dim=1, low=0.0, high=10.0, n_eval=1024, optimizer="sgd", lr=1e-3,
                   sigma_lr=1e-3, epochs=2000, quick_epochs=100, quick_lr_scale=10.0,
                   gmm_components=1 if family == "normal" else 64)


SETTINGS = {s.name: s for s in (
    _one_d("normal-high", "normal", 0.5), _one_d("normal-moderate", "normal", 0.75),
    _one_d("normal-low", "normal", 1.0),
    _one_d("exp-high", "exp", 2.0), _one_d("exp-moderate", "exp", 1.5), _one_d("exp-low", "exp", 1.0),
    Setting("mvn", "mvn", 0.5, dim=2, low=-5.0, high=5.0, n_eval=256, optimizer="adam", lr=0.2, sigma_lr=1e-2,
            epochs=10000, quick_epochs=200, quick_lr_scale=10.0, gmm_components=1),
)}
"""The seven settings, by command-line name, in the order of the paper's table."""


# --------------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------------


def _seed(seed: int, setting: str, stream: str) -> int:
    """A generator seed for one random stream of one (setting, seed), independent of the others."""
    return (seed * 1_000_003 + zlib.crc32(f"{setting}/{stream}".encode())) % (2 ** 63)


def _generator(seed: int, setting: str, stream: str) -> torch.Generator:
    return torch.Generator().manual_seed(_seed(seed, setting, stream))


def _mvn_covariance(setting: Setting) -> Tensor:
    d = setting.dim
    return torch.full((d, d), setting.param, dtype=torch.float64).fill_diagonal_(1.0)


def _sample_labels(setting: Setting, n: int, gen: torch.Generator) -> Tensor:
    """``n`` training labels ``[n, d]`` (float64) from the setting's distribution (1-D: truncated to the
    label range by rejection)."""
    if setting.family == "mvn":
        chol = torch.linalg.cholesky(_mvn_covariance(setting))
        return setting.mean + torch.randn(n, setting.dim, generator=gen, dtype=torch.float64) @ chol.T
    kept, have = [], 0
    while have < n:
        if setting.family == "normal":
            y = setting.mean + setting.param * torch.randn(2 * n, generator=gen, dtype=torch.float64)
        else:
            y = setting.low - torch.log1p(-torch.rand(2 * n, generator=gen, dtype=torch.float64)) / setting.param
        y = y[(y >= setting.low) & (y <= setting.high)]
        kept.append(y)
        have += y.numel()
    return torch.cat(kept)[:n].reshape(n, 1)


def label_log_density(setting: Setting, y: Tensor) -> Tensor:
    """Log density ``[N]`` of the training-label distribution at labels ``y`` ``[N, d]``, up to the truncation
    constant (which cancels in Reweight's batch-normalised weights)."""
    y = y.to(torch.float64)
    if setting.family == "normal":
        z = (y[:, 0] - setting.mean) / setting.param
        return -0.5 * z * z - math.log(setting.param * math.sqrt(2 * math.pi))
    if setting.family == "exp":
        return math.log(setting.param) - setting.param * (y[:, 0] - setting.low)
    mean = torch.full((setting.dim,), setting.mean, dtype=torch.float64)
    return torch.distributions.MultivariateNormal(mean, _mvn_covariance(setting)).log_prob(y)


class SyntheticData(NamedTuple):
    """One draw of a setting; every tensor ``[N, d]`` on the target device (``oracle_matrix``: ``[d, d]`` for
    the 2-D setting, else None)."""
    x_train: Tensor          # model input of the training samples
    y_train: Tensor          # observed (noisy) training labels
    oracle_train: Tensor     # noise-free label of each training input (y_train - noise)
    reweight: Tensor         # [N, 1] Reweight's weight 1 / p_train(y_train), times max p (the scale cancels)
    x_val: Tensor
    y_val: Tensor
    x_test: Tensor
    y_test: Tensor
    oracle_matrix: Optional[Tensor]


def make_data(setting: Setting, seed: int, *, device: torch.device | str = "cpu",
              dtype: torch.dtype = torch.float32) -> SyntheticData:
    """The training, validation and test sets of ``setting`` for ``seed`` (see the module docstring),
    deterministic in ``(setting.name, seed)``."""
    gen = _generator(seed, setting.name, "data")
    d = setting.dim
    y = _sample_labels(setting, N_TRAIN, gen)
    noise = NOISE_SIGMA * torch.randn(N_TRAIN, d, generator=gen, dtype=torch.float64)
    oracle = y - noise
    y_val = setting.low + (setting.high - setting.low) * torch.rand(setting.n_eval, d, generator=gen,
                                                                    dtype=torch.float64)
    y_test = setting.low + (setting.high - setting.low) * torch.rand(setting.n_eval, d, generator=gen,
                                                                     dtype=torch.float64)
    if setting.family == "mvn":
        a = ORACLE_SCALE * torch.randn(d, d, generator=gen, dtype=torch.float64)
        to_x = lambda labels: labels @ a.T  # noqa: E731
    else:
        a, to_x = None, (lambda labels: labels.clone())
    log_p = label_log_density(setting, y)
    inv_density = torch.exp(log_p.max() - log_p).reshape(-1, 1)     # max_i p(y_i) / p(y): >= 1, no overflow

    def put(t):
        return None if t is None else t.to(device=device, dtype=dtype)

    return SyntheticData(put(to_x(oracle)), put(y), put(oracle), put(inv_density), put(to_x(y_val)), put(y_val),
                         put(to_x(y_test)), put(y_test), put(a))


def gai_prior(setting: Setting, data: SyntheticData, seed: int, *, source: str = "true",
              components: Optional[int] = None) -> tuple[GMM, bool]:
    """The GAI prior ``(GMM, converged)``: :func:`imbreg_fast.fit_gmm` with ``components`` (default: the
    setting's, as published) fitted to :data:`GMM_SAMPLES` fresh samples of the true training-label
    distribution (``source='true'``, published) or to the training labels (``'train'``); float32 on the
    data's device."""
    k = setting.gmm_components if components is None else components
    if source == "true":
        labels = _sample_labels(setting, GMM_SAMPLES, _generator(seed, setting.name, "gmm"))
    elif source == "train":
        labels = data.y_train.detach().cpu().double()
    else:
        raise ValueError(f"source must be 'true' or 'train', got {source!r}")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        gmm = fit_gmm(labels if setting.dim > 1 else labels.reshape(-1), k,
                      seed=_seed(seed, setting.name, "gmm-fit"), dtype=torch.float32)
    converged = True
    for w in caught:        # non-convergence is reported in the results; anything else is passed on
        if issubclass(w.category, ConvergenceWarning):
            converged = False
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return GMM(*(t.to(data.y_train.device) for t in gmm)), converged


def bni_prior(setting: Setting, labels: Tensor, bins: int) -> tuple[Tensor, Tensor]:
    """The BNI prior ``(centers, weights)`` of the training labels ``[N, d]``: ``bins`` equal-width bins per
    dimension over the setting's label range, empty bins dropped. 1-D: :func:`imbreg_fast.bin_prior`
    (centres ``[K]``); d > 1: the ``bins^d`` grid (centres ``[K, d]``), with bin_prior's conventions (labels
    outside the range count in the edge bins)."""
    if setting.dim == 1:
        centers, weights = bin_prior(labels.reshape(-1), bins, range=(setting.low, setting.high))
        return centers.to(labels), weights.to(labels)
    edges = torch.linspace(setting.low, setting.high, bins + 1, dtype=torch.float64, device=labels.device)
    index = torch.bucketize(labels.double(), edges[1:-1], right=True)             # [N, d], in [0, bins)
    flat = (index * torch.tensor([bins ** i for i in range(setting.dim)], device=labels.device)).sum(1)
    counts = torch.bincount(flat, minlength=bins ** setting.dim).double()
    keep = torch.nonzero(counts > 0).reshape(-1)
    mids = 0.5 * (edges[:-1] + edges[1:])
    centers = torch.stack([mids[(keep // bins ** i) % bins] for i in range(setting.dim)], dim=1)
    return centers.to(labels), (counts[keep] / counts.sum()).to(labels)


# --------------------------------------------------------------------------------------------------
# model, criteria, training
# --------------------------------------------------------------------------------------------------


def make_model(dim: int, seed: int) -> nn.Linear:
    """``nn.Linear(dim, dim)`` with torch's default initialisation drawn from ``seed`` (CPU)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Linear(dim, dim)


Criterion = Callable[[Tensor, Tensor, Optional[Tensor]], Tensor]


def make_criterion(method: str, setting: Setting, *, gmm: Optional[GMM] = None,
                   bins: Optional[tuple[Tensor, Tensor]] = None, backend: str = "auto",
                   device: torch.device | str = "cpu") -> tuple[Criterion, Optional[nn.Parameter]]:
    """``(loss(pred, target, weight), learned sigma or None)`` for method key ``method`` (see :data:`METHODS`);
    ``weight`` is the per-sample inverse density (used by Reweight only). GAI needs ``gmm``, BNI ``bins``."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    learn = _METHOD_OPS[method][1]
    init = LEARNED_NOISE_INIT * NOISE_SIGMA if learn else NOISE_SIGMA
    opts = dict(learn_noise=learn, backend=backend, check_finite=False)
    d = setting.dim
    if method == "mse":
        return (lambda p, y, w: F.mse_loss(p, y)), None
    if method == "reweight":
        # published: sum_i w_i |p_i - y_i|^2 / sum_i w_i (squared error summed over the d dimensions)
        return (lambda p, y, w: d * weighted_mse_loss(p, y, w, reduction="weighted_mean", backend=backend,
                                                      check_finite=False)), None
    if method in ("gai", "gai-true"):
        if gmm is None:
            raise ValueError("GAI needs the gmm prior")
        module = inn.GAILoss(gmm, init, **opts)
    elif method in ("bmc", "bmc-true"):
        module = inn.BMCLoss(init, **opts)
    else:
        if bins is None:
            raise ValueError("BNI needs the bins prior")
        module = inn.BNILoss(bins[0], bins[1], init, **opts)
    module = module.to(device)
    sigma = module.noise_sigma if learn else None
    return (lambda p, y, w: module(p, y)), sigma


@torch.no_grad()
def evaluate_mse(model: nn.Module, x: Tensor, y: Tensor) -> float:
    """Mean squared error of ``model(x)`` against ``y`` over every element (the published test loss)."""
    return float(F.mse_loss(model(x), y))


class RunResult(NamedTuple):
    """One (setting, method, seed) run. ``best_*``: the parameters with the lowest validation MSE (NaN /
    epoch 0 if no validation MSE was finite); ``last_*``: the parameters after the last epoch."""
    last_test: float
    last_val: float
    best_test: float
    best_val: float
    best_epoch: int
    noise_sigma: Optional[float]   # final learned sigma (None: not learned)
    seconds: float                 # training wall-clock
    last_state: dict               # parameters (CPU)
    best_state: dict

    def test(self, select: str) -> float:
        """The test MSE of the parameters chosen by ``select`` (``'last'`` | ``'best-val'``)."""
        return self.last_test if select == "last" else self.best_test

    def state(self, select: str) -> dict:
        return self.last_state if select == "last" else self.best_state


def train_run(setting: Setting, method: str, data: SyntheticData, *, epochs: int, eval_every: int, seed: int,
              lr_scale: float = 1.0, gmm: Optional[GMM] = None, bins: Optional[tuple[Tensor, Tensor]] = None,
              backend: str = "auto", show_progress: bool = False) -> RunResult:
    """Train the linear model of ``setting`` with method ``method`` on ``data`` for ``epochs`` epochs: the
    setting's optimiser, lr and learned-sigma lr (both times ``lr_scale``), cosine schedule over the epochs,
    a fresh permutation of the training set every epoch. The validation MSE is computed every ``eval_every``
    epochs and after the last; the result holds the test MSE of the last parameters and of those with the
    lowest validation MSE. The initialisation and the batch order depend only on ``(setting.name, seed)``."""
    if epochs < 1 or eval_every < 1:
        raise ValueError(f"epochs and eval_every must be >= 1, got {epochs} and {eval_every}")
    if not lr_scale > 0:
        raise ValueError(f"lr_scale must be > 0, got {lr_scale}")
    device = data.x_train.device
    model = make_model(setting.dim, _seed(seed, setting.name, "model")).to(device)
    criterion, sigma = make_criterion(method, setting, gmm=gmm, bins=bins, backend=backend, device=device)
    groups = [{"params": list(model.parameters())}]
    if sigma is not None:
        groups.append({"params": [sigma], "lr": setting.sigma_lr * lr_scale})
    lr = setting.lr * lr_scale
    if setting.optimizer == "sgd":
        opt = torch.optim.SGD(groups, lr=lr, momentum=MOMENTUM, foreach=False)
    else:
        opt = torch.optim.Adam(groups, lr=lr, foreach=False)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    gen = _generator(seed, setting.name, "batches")
    use_weight = method == "reweight"
    n = data.x_train.shape[0]
    best_val, best_epoch, best_state, val = math.inf, 0, None, math.nan
    start = time.perf_counter()
    model.train()
    for epoch in progress(range(epochs), enabled=show_progress, desc=f"{setting.name} {METHODS[method]}",
                          position=1, unit="ep"):
        perm = torch.randperm(n, generator=gen).to(device)
        xs, ys = data.x_train[perm].split(BATCH_SIZE), data.y_train[perm].split(BATCH_SIZE)
        ws = data.reweight[perm].split(BATCH_SIZE) if use_weight else (None,) * len(xs)
        for xb, yb, wb in zip(xs, ys, ws):
            loss = criterion(model(xb), yb, wb)
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
        if (epoch + 1) % eval_every == 0 or epoch + 1 == epochs:
            val = evaluate_mse(model, data.x_val, data.y_val)
            if val < best_val:          # NaN never wins
                best_val, best_epoch = val, epoch + 1
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    seconds = time.perf_counter() - start
    last_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    last_test = evaluate_mse(model, data.x_test, data.y_test)
    if best_state is None:
        best_test, best_state = math.nan, last_state
    else:
        model.load_state_dict(best_state)
        best_test = evaluate_mse(model, data.x_test, data.y_test)
    cpu = lambda state: {k: v.cpu() for k, v in state.items()}  # noqa: E731
    return RunResult(last_test, val, best_test, best_val, best_epoch,
                     None if sigma is None else float(sigma.detach()), seconds, cpu(last_state), cpu(best_state))


@dataclass(frozen=True)
class Options:
    """What every run of one invocation shares (picklable: sent to the ``--jobs`` worker processes)."""
    methods: tuple[str, ...]
    epochs: dict              # setting name -> epochs
    eval_every: dict          # setting name -> validation period in epochs
    lr_scale: dict            # setting name -> lr multiplier (1, or the --quick scale)
    gai_prior: str = "true"
    gmm_components: Optional[int] = None
    bni_bins: int = DEFAULT_BNI_BINS
    backend: str = "auto"
    device: str = "cpu"


class SeedResult(NamedTuple):
    """All methods of one (setting, seed): method key -> result; ``data`` (CPU) when asked for."""
    runs: dict
    gmm_converged: Optional[bool]
    data: Optional[SyntheticData]


def run_setting_seed(setting_name: str, seed: int, options: Options, *, keep_data: bool = False,
                     show_progress: bool = False, on_run: Optional[Callable[[str], None]] = None) -> SeedResult:
    """Draw the data and priors of ``(setting, seed)`` once and train every method of ``options`` on them;
    ``on_run(method)`` is called after each run."""
    setting = SETTINGS[setting_name]
    data = make_data(setting, seed, device=options.device)
    gmm, converged, bins = None, None, None
    if any(m.startswith("gai") for m in options.methods):
        gmm, converged = gai_prior(setting, data, seed, source=options.gai_prior, components=options.gmm_components)
    if "bni" in options.methods:
        bins = bni_prior(setting, data.y_train, options.bni_bins)
    runs = {}
    for m in options.methods:
        runs[m] = train_run(setting, m, data, epochs=options.epochs[setting_name],
                            eval_every=options.eval_every[setting_name], seed=seed,
                            lr_scale=options.lr_scale[setting_name], gmm=gmm, bins=bins, backend=options.backend,
                            show_progress=show_progress)
        if on_run is not None:
            on_run(m)
    if keep_data:
        data = SyntheticData(*(None if t is None else t.cpu() for t in data))
    return SeedResult(runs, converged, data if keep_data else None)


def _worker_init(threads: int) -> None:
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------------


def _choices(kind: str, valid: Sequence[str]) -> Callable[[str], list[str]]:
    """argparse type: a comma list of names from ``valid`` (or 'all'), in ``valid``'s order, no duplicates."""
    def parse(text: str) -> list[str]:
        names = [t.strip() for t in text.split(",") if t.strip()]
        if names == ["all"]:
            return list(valid)
        if not names:
            raise argparse.ArgumentTypeError(f"no {kind} given; valid {kind}s: {', '.join(valid)}")
        unknown = [t for t in names if t not in valid]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {kind}{'s' if len(unknown) > 1 else ''} "
                                             f"{', '.join(map(repr, unknown))}; valid {kind}s: {', '.join(valid)}")
        return [v for v in valid if v in names]
    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """This experiment's own flags (``cli`` adds the common ones)."""
    settings = ", ".join(f"{name} = {s.describe()}" for name, s in SETTINGS.items())
    g = parser.add_argument_group("protocol")
    g.add_argument("--settings", type=_choices("setting", list(SETTINGS)), default=None, metavar="S1,S2",
                   help=f"comma-separated label distributions to run, or 'all' (default: all seven): {settings}")
    g.add_argument("--methods", type=_choices("method", list(METHODS)), default=None, metavar="M1,M2",
                   help="comma-separated methods, or 'all' (default: all): "
                        + ", ".join(f"{k} = {v}" for k, v in METHODS.items()))
    g.add_argument("--seeds", type=int_at_least(1), default=None, metavar="N",
                   help=f"repetitions per (setting, method), with seeds --seed, --seed + 1, ...; the table shows "
                        f"mean ± std over them (default: {DEFAULT_SEEDS}; 1 with --quick)")
    g.add_argument("--epochs", type=int_at_least(1), default=None, metavar="E",
                   help="training epochs of every setting (4 steps of batch 256 each); default: the published "
                        "2000 for the 1-D settings and 10000 for mvn; with --quick "
                        f"{SETTINGS['normal-high'].quick_epochs} and {SETTINGS['mvn'].quick_epochs} at "
                        f"{SETTINGS['mvn'].quick_lr_scale:g}x the learning rates")
    g.add_argument("--select", choices=("best-val", "last"), default="best-val",
                   help="which parameters of a run are tested: 'best-val' = those with the lowest validation MSE "
                        "(model selection, the default), 'last' = after the last epoch (what the published script "
                        "reports). The validation labels are balanced and noise-free, so 'best-val' can pick an "
                        "early iterate of plain MSE that lies near the oracle line before MSE has learned the "
                        "skewed p_train(y|x); both are in the JSON")
    g.add_argument("--eval-every", type=int_at_least(1), default=None, metavar="E",
                   help="compute the validation MSE every E epochs (and after the last) for 'best-val' "
                        f"(default: epochs / {EVALS_PER_RUN}, at least 1)")
    g.add_argument("--jobs", type=int_at_least(1), default=1, metavar="N",
                   help="worker processes (CPU only), each training whole (setting, seed) units on one torch "
                        "thread (or --threads); default: 1, in this process. The numbers do not depend on it")
    p = parser.add_argument_group("priors")
    p.add_argument("--gai-prior", choices=("true", "train"), default="true",
                   help=f"what the GAI GMM is fitted to: 'true' = {GMM_SAMPLES} samples of the true training-label "
                        "distribution (as the published script), 'train' = the 1024 training labels "
                        "(default: true)")
    p.add_argument("--gmm-components", type=int_at_least(1), default=None, metavar="K",
                   help="GMM components of the GAI prior (default: as published, 1 for the Normal and MVN "
                        "settings, 64 for the Exponential ones)")
    p.add_argument("--bni-bins", type=int_at_least(1), default=DEFAULT_BNI_BINS, metavar="B",
                   help=f"BNI histogram bins per label dimension over the label range (default: "
                        f"{DEFAULT_BNI_BINS}; mvn uses a B x B grid)")
    o = parser.add_argument_group("output")
    o.add_argument("--plot-setting", choices=list(SETTINGS), default=None, metavar="S",
                   help="the setting whose fitted models (first seed) are drawn in synthetic_<S>.png: a 1-D "
                        "setting shows each method's line over the training data and label histogram, mvn "
                        "each method's test predictions in the label plane (default: normal-high if run, else "
                        "the first 1-D setting run, else mvn)")


# --------------------------------------------------------------------------------------------------
# table, figure
# --------------------------------------------------------------------------------------------------


def results_table(doc: dict) -> str:
    """The test-MSE table of a ``synthetic.json`` document: rows = methods, columns = settings,
    ``mean ± std`` over seeds (``n/a`` where a method could not run)."""
    rows = []
    for method in doc["methods"]:
        row = [method]
        for setting in doc["settings"]:
            r = doc["results"][method][setting]
            row.append("n/a" if r.get("reason") else fmt_mean_std(r["mean"], r["std"]))
        rows.append(row)
    return format_table(["test MSE"] + list(doc["settings"]), rows)


def _plot_1d(plt, setting: Setting, data: SyntheticData, states: dict, path: Path) -> None:
    fig, (ax, hax) = plt.subplots(1, 2, figsize=(11, 5), sharey=True, gridspec_kw={"width_ratios": [3, 1]})
    x = data.x_train.cpu().reshape(-1)
    y = data.y_train.cpu().reshape(-1)
    ax.scatter(x, y, s=6, alpha=0.15, color="tab:blue", linewidths=0, label="training samples")
    grid = torch.linspace(setting.low, setting.high, 2)
    ax.plot(grid, grid, "k--", lw=1.5, label="oracle y = x")
    for name, state in states.items():
        w, b = float(state["weight"].reshape(())), float(state["bias"].reshape(()))
        ax.plot(grid, w * grid + b, lw=1.5, label=f"{name}: y = {w:.2f} x {'+' if b >= 0 else '-'} {abs(b):.2f}")
    ax.set_xlim(setting.low, setting.high)
    ax.set_ylim(setting.low, setting.high)
    ax.set_xlabel("x (input = noise-free label)")
    ax.set_ylabel("y (label)")
    ax.legend(fontsize=7, loc="upper left")
    ax.set_title(f"{setting.name}: {setting.describe()}, fitted lines (first seed)", fontsize=9)
    hax.hist(y.numpy(), bins=40, range=(setting.low, setting.high), density=True, orientation="horizontal",
             color="tab:blue", alpha=0.5, label="training labels")
    hax.axvline(1.0 / (setting.high - setting.low), color="k", ls="--", lw=1, label="test labels (uniform)")
    hax.set_xlabel("density")
    hax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_2d(plt, setting: Setting, data: SyntheticData, states: dict, path: Path) -> None:
    panels = 1 + len(states)
    cols = min(4, panels)
    rows = math.ceil(panels / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.2 * rows), squeeze=False)
    axes = axes.reshape(-1)
    y_train, y_test = data.y_train.cpu(), data.y_test.cpu()
    axes[0].scatter(y_train[:, 0], y_train[:, 1], s=3, alpha=0.3, linewidths=0)
    axes[0].set_title("training labels", fontsize=9)
    model = make_model(setting.dim, 0)
    for ax, (name, state) in zip(axes[1:], states.items()):
        model.load_state_dict(state)
        with torch.no_grad():
            pred = model(data.x_test.cpu())
        ax.scatter(y_test[:, 0], y_test[:, 1], s=3, color="0.7", linewidths=0, label="test labels")
        ax.scatter(pred[:, 0], pred[:, 1], s=3, color="tab:red", linewidths=0, label="predictions")
        ax.set_title(name, fontsize=9)
    for ax in axes[:panels]:
        ax.set_xlim(setting.low - 1, setting.high + 1)
        ax.set_ylim(setting.low - 1, setting.high + 1)
        ax.set_aspect("equal")
        ax.tick_params(labelsize=7)
    for ax in axes[panels:]:
        ax.axis("off")
    axes[min(1, panels - 1)].legend(fontsize=6, loc="upper left")
    fig.suptitle(f"{setting.name}: test predictions (first seed); a balanced model covers the test square",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------------------


def _method_backend(method: str, setting: Setting, device: torch.device, backend: str) -> tuple[str, Optional[str]]:
    """(backend that runs ``method`` on ``setting``'s batches, None) or ('', why it cannot run)."""
    op = _METHOD_OPS[method][0]
    if op is None:
        return "torch", None
    try:
        return selected_backend(torch.empty(BATCH_SIZE, setting.dim, device=device), op, backend), None
    except (RuntimeError, ValueError) as exc:
        return "", str(exc)


def _summary(values: list[float]) -> dict:
    mean, std = mean_std(values)
    return {"mean": mean, "std": std, "per_seed": values}


def run(common: CommonArgs, args: argparse.Namespace, *, print_fn: Callable[[str], None] = print) -> dict:
    """Run the protocol for the selected settings, methods and seeds; print the table; write
    ``synthetic.json`` (and ``synthetic_<setting>.png``) into ``common.out``; return the JSON document plus
    ``'artefacts'`` (the written paths)."""
    settings = [SETTINGS[s] for s in (getattr(args, "settings", None) or list(SETTINGS))]
    methods = list(getattr(args, "methods", None) or list(METHODS))
    n_seeds = args.seeds if getattr(args, "seeds", None) is not None else (1 if common.quick else DEFAULT_SEEDS)
    seeds = [common.seed + i for i in range(n_seeds)]
    epochs = {s.name: args.epochs if getattr(args, "epochs", None) is not None
              else (s.quick_epochs if common.quick else s.epochs) for s in settings}
    eval_every = {name: args.eval_every if getattr(args, "eval_every", None) is not None
                  else max(1, e // EVALS_PER_RUN) for name, e in epochs.items()}
    lr_scale = {s.name: s.quick_lr_scale if common.quick else 1.0 for s in settings}
    select = getattr(args, "select", "best-val")
    jobs = getattr(args, "jobs", 1) or 1
    device, backend = common.device, common.backend
    if jobs > 1 and device.type != "cpu":
        raise SystemExit(f"--jobs {jobs}: worker processes run on the CPU only; use --jobs 1 with --device {device}")
    names = [s.name for s in settings]
    plot_name = None
    if common.plots:
        chosen = getattr(args, "plot_setting", None)
        if chosen:
            if chosen not in names:
                raise SystemExit(f"--plot-setting {chosen} is not among the settings run ({', '.join(names)})")
            plot_name = chosen
        else:
            one_d = [n for n in names if SETTINGS[n].dim == 1]
            plot_name = "normal-high" if "normal-high" in names else (one_d[0] if one_d else names[0])

    threads_before = torch.get_num_threads()
    if getattr(args, "threads", None) is None:
        torch.set_num_threads(1)        # tiny problems: more threads only add synchronisation
    threads = torch.get_num_threads()

    availability = {m: {s.name: _method_backend(m, s, device, backend) for s in settings} for m in methods}
    method_backends = {METHODS[m]: backend_of(_METHOD_OPS[m][0], device, backend) for m in methods}
    options = {s.name: Options(tuple(m for m in methods if availability[m][s.name][1] is None), epochs, eval_every,
                               lr_scale, getattr(args, "gai_prior", "true"), getattr(args, "gmm_components", None),
                               getattr(args, "bni_bins", DEFAULT_BNI_BINS), backend, str(device))
               for s in settings}

    print_fn("benchmark synthetic: the Balanced MSE paper's synthetic protocol (linear model, skewed noisy "
             "training labels, balanced noise-free test labels)")
    for s in settings:
        lr = "" if lr_scale[s.name] == 1 else f" x {lr_scale[s.name]:g} (--quick)"
        print_fn(f"  {s.name:<16} {s.describe()}; {s.optimizer.upper()} lr {s.lr:g}{lr}, {epochs[s.name]} epochs")
    print_fn(f"  {N_TRAIN} training samples (batch {BATCH_SIZE}), label noise sigma {NOISE_SIGMA:g}, learned sigma "
             f"from {LEARNED_NOISE_INIT * NOISE_SIGMA:g}; seeds {seeds[0]}..{seeds[-1]}; {device}, torch threads "
             f"{threads}, jobs {jobs}; backend {backend}: " + ", ".join(f"{n} {b}" for n, b in method_backends.items()))

    tasks = [(s.name, seed) for s in settings for seed in seeds]
    done: dict[tuple[str, int], SeedResult] = {}
    total_runs = sum(len(options[name].methods) for name, _ in tasks)
    start = time.perf_counter()
    try:
        with progress(total=total_runs, enabled=common.progress, desc="synthetic", unit="run", position=0) as bar:
            if jobs == 1:
                for name, seed in tasks:
                    bar.set_postfix_str(f"{name} seed {seed}")
                    done[(name, seed)] = run_setting_seed(
                        name, seed, options[name], keep_data=(name == plot_name and seed == seeds[0]),
                        show_progress=common.progress, on_run=lambda m: bar.update(1))
            else:
                ctx = multiprocessing.get_context("spawn")
                with ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_worker_init,
                                         initargs=(threads,)) as pool:
                    futures = {pool.submit(run_setting_seed, name, seed, options[name],
                                           keep_data=(name == plot_name and seed == seeds[0])): (name, seed)
                               for name, seed in tasks}
                    for future in as_completed(futures):
                        done[futures[future]] = future.result()
                        bar.update(len(options[futures[future][0]].methods))
    finally:
        torch.set_num_threads(threads_before)
    total_seconds = time.perf_counter() - start

    results: dict[str, dict] = {}
    per_epoch: dict[int, list[float]] = {}
    for m in methods:
        results[METHODS[m]] = {}
        for s in settings:
            used, reason = availability[m][s.name]
            if reason is not None:
                results[METHODS[m]][s.name] = {"mean": None, "std": None, "per_seed": None, "reason": reason}
                continue
            runs = [done[(s.name, seed)].runs[m] for seed in seeds]
            per_epoch.setdefault(s.dim, []).extend(r.seconds / epochs[s.name] for r in runs)
            results[METHODS[m]][s.name] = {
                **_summary([r.test(select) for r in runs]),
                "backend": used,
                "last": _summary([r.last_test for r in runs]),
                "best_val": {**_summary([r.best_test for r in runs]), "epoch": [r.best_epoch for r in runs],
                             "val_mse": [r.best_val for r in runs]},
                "noise_sigma": None if runs[0].noise_sigma is None else [r.noise_sigma for r in runs],
                "train_seconds": [r.seconds for r in runs]}
    gmm_unconverged = [f"{name}/seed {seed}" for (name, seed), r in sorted(done.items())
                       if r.gmm_converged is False]

    # seconds per epoch by label dimension -> the full protocol at the published epochs, one process
    projected = None
    if all(s.dim in per_epoch for s in SETTINGS.values()):
        projected = sum(sum(per_epoch[s.dim]) / len(per_epoch[s.dim]) * s.epochs * len(METHODS) * DEFAULT_SEEDS
                        for s in SETTINGS.values())

    doc = {
        "experiment": "benchmark synthetic",
        "settings": names,
        "methods": [METHODS[m] for m in methods],
        "metric": "test MSE on the balanced, noise-free test labels (mean over all label elements) of the "
                  + ("parameters after the last epoch" if select == "last" else
                     "parameters with the lowest validation MSE")
                  + f" (select={select}); 'last' and 'best_val' hold both",
        "results": results,
        "config": {
            "seeds": seeds, "device": str(device), "backend": backend, "method_backends": method_backends,
            "threads": threads, "jobs": jobs, "quick": common.quick, "select": select,
            "n_train": N_TRAIN, "batch_size": BATCH_SIZE, "noise_sigma": NOISE_SIGMA,
            "learned_noise_init": LEARNED_NOISE_INIT * NOISE_SIGMA, "sgd_momentum": MOMENTUM,
            "lr_schedule": "cosine over the epochs (stepped per epoch)",
            "gai_prior": options[names[0]].gai_prior,
            "gai_prior_samples": GMM_SAMPLES if options[names[0]].gai_prior == "true" else N_TRAIN,
            "gmm_components": {s.name: options[s.name].gmm_components or s.gmm_components for s in settings},
            "gmm_unconverged": gmm_unconverged, "bni_bins_per_dim": options[names[0]].bni_bins,
            "oracle_scale_2d": ORACLE_SCALE,
            "settings": {s.name: {"distribution": s.describe(), "family": s.family, "param": s.param,
                                  "dim": s.dim, "label_range": [s.low, s.high], "n_val": s.n_eval,
                                  "n_test": s.n_eval, "optimizer": s.optimizer, "lr": s.lr * lr_scale[s.name],
                                  "sigma_lr": s.sigma_lr * lr_scale[s.name], "epochs": epochs[s.name],
                                  "eval_every": eval_every[s.name]}
                         for s in settings},
            "method_keys": {METHODS[m]: m for m in methods},
            "environment": environment(),
        },
        "timing": {"total_s": total_seconds,
                   "s_per_epoch": {f"{d}-D": sum(v) / len(v) for d, v in sorted(per_epoch.items())},
                   "projected_full_protocol_s": projected},
    }

    print_fn("")
    print_fn(results_table(doc))
    which = "after the last epoch" if select == "last" else "with the lowest validation MSE"
    print_fn(f"test MSE on balanced noise-free labels (mean ± std over {len(seeds)} seed(s)) of the parameters "
             f"{which}; synthetic.json also has the other choice ('last', 'best_val')")
    for m in methods:
        if not _METHOD_OPS[m][1]:
            continue
        sig = [f"{s.name} {mean_std(r)[0]:.2f}" for s in settings
               if (r := results[METHODS[m]][s.name].get("noise_sigma"))]
        if sig:
            print_fn(f"  learned sigma of {METHODS[m]} (true {NOISE_SIGMA:g}): " + ", ".join(sig))
    if gmm_unconverged:
        print_fn(f"  note: the GAI prior's EM did not converge for {', '.join(gmm_unconverged)}")
    line = f"time: {total_seconds:.1f} s"
    if per_epoch:
        line += " (" + ", ".join(f"{d}-D {1e3 * sum(v) / len(v):.1f} ms/epoch"
                                 for d, v in sorted(per_epoch.items())) + " per run)"
    if projected is not None:
        line += (f"; projected full protocol ({len(SETTINGS)} settings x {len(METHODS)} methods x {DEFAULT_SEEDS} "
                 f"seeds, published epochs, one process): ~{projected / 60:.0f} min")
    print_fn(line)

    out = Path(common.out)
    artefacts = []
    if plot_name is not None and done.get((plot_name, seeds[0])) is not None:
        first = done[(plot_name, seeds[0])]
        states = {METHODS[m]: r.state(select) for m, r in first.runs.items()}
        if states:
            path = out / f"synthetic_{plot_name}.png"
            setting = SETTINGS[plot_name]
            (_plot_1d if setting.dim == 1 else _plot_2d)(pyplot(), setting, first.data, states, path)
            artefacts.append(str(path))
    artefacts.insert(0, str(write_json(out / JSON_NAME, doc)))
    return {**doc, "artefacts": artefacts}
