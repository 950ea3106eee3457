"""Global statistics over torch.distributed (docs/methods.md §7): every synchronised feature, run on 2 and 3
gloo processes on the CPU, equals the single-process result on the concatenated data of all processes.

The workers (tests/dist_harness.py: 3 spawned processes, reused; world size 2 runs on a subgroup, so both
the default group and an explicit ``process_group`` are exercised) run each scenario under a timeout, so a
hang fails its test. Each rank builds the same global data from a seed, takes its shard (sizes differ, one
rank may be empty), runs the synchronised call and compares with the library's single-process call on the
whole data, which every rank also computes; results that must be identical on every rank are compared bit
for bit with plain gloo collectives.
"""
import warnings

import pytest
import torch
import torch.distributed as dist

from conftest import CPP_OK
from dist_harness import Pools
from imbreg_fast import FDS, distributed as D, functional as F, lds, priors
from imbreg_fast.metrics import DIRMetrics, shot_metrics
from imbreg_fast.nn import BMCLoss
from imbreg_fast.reg_cls import ClassBins

WORLD_SIZES = (2, 3)
BACKENDS = ["torch"] + (["cpp"] if CPP_OK else [])
FP32 = dict(rtol=2e-5, atol=2e-6)
FP64 = dict(rtol=1e-10, atol=1e-12)


@pytest.fixture(scope="module")
def pools():
    p = Pools()
    yield p
    p.close()


def _sizes(world_size: int) -> list[int]:
    """Shard sizes: unequal, and with 3 ranks the middle one empty."""
    return [5, 9] if world_size == 2 else [6, 0, 11]


def _shard(x: torch.Tensor, sizes: list[int], rank: int) -> torch.Tensor:
    start = sum(sizes[:rank])
    return x[start:start + sizes[rank]]


def _same_on_every_rank(t: torch.Tensor, group) -> bool:
    """Bit-identical on every rank (compared with plain gloo collectives, not the code under test)."""
    t = t.detach().reshape(-1).contiguous()
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t, group=group)
    bits = (lambda x: x.view(torch.uint8)) if t.is_floating_point() else (lambda x: x)
    return all(torch.equal(bits(p), bits(t)) for p in parts)


def _sum_over_ranks(t: torch.Tensor, group) -> torch.Tensor:
    t = t.detach().double().clone()
    dist.all_reduce(t, group=group)
    return t


# --------------------------------------------------------------------------------------------------
# BMC
# --------------------------------------------------------------------------------------------------


def _bmc_case(rank, world_size, group, backend, layout, masked, given, sigma=0.7):
    """layout: 'rows' ([N]), 'rows2' ([N, 2]) or 'dense' ([B, 1, 2, 3], sharded along B)."""
    dense = layout == "dense"
    sizes = ([1, 2] if world_size == 2 else [1, 0, 2]) if dense else _sizes(world_size)
    n = sum(sizes)
    d = 2 if layout == "rows2" else 1
    g = torch.Generator().manual_seed(100 + 10 * len(layout) + 2 * masked + given)
    shape = (n, 1, 2, 3) if dense else (n,) if d == 1 else (n, d)
    pred_all = torch.randn(shape, generator=g)
    target_all = torch.randn(shape, generator=g) * 2
    mask_all = torch.rand(shape if dense else (n,), generator=g) > 0.3 if masked else None
    if masked:
        mask_all[:sizes[0]] = False                                    # rank 0 keeps no row
    cand_sizes = [7, 0, 4][:world_size]
    cands = [torch.randn((m,) if d == 1 else (m, d), generator=g) for m in cand_sizes] if given else None

    p_ref = pred_all.clone().requires_grad_()
    s_ref = torch.tensor(sigma, requires_grad=True)
    ref = F.bmc_loss(p_ref, target_all, s_ref ** 2, candidates=torch.cat(cands) if given else None,
                     mask=mask_all, reduction="none", backend=backend)
    ref.sum().backward()

    p = _shard(pred_all, sizes, rank).clone().requires_grad_()
    s = torch.tensor(sigma, requires_grad=True)
    y = _shard(target_all, sizes, rank)
    m = None if mask_all is None else _shard(mask_all, sizes, rank)
    out = F.bmc_loss(p, y, s ** 2, candidates=cands[rank] if given else None, mask=m, reduction="none",
                     backend=backend, sync=True, process_group=group)
    torch.testing.assert_close(out, _shard(ref, sizes, rank).detach(), **FP32)
    out.sum().backward()
    torch.testing.assert_close(p.grad, _shard(p_ref.grad, sizes, rank), **FP32)
    torch.testing.assert_close(_sum_over_ranks(s.grad, group).float(), s_ref.grad, **FP32)

    # 'mean' and 'sum' reduce over this rank's kept rows
    kept = out if m is None else out[m]
    for reduction, expected in (("mean", kept.mean() if kept.numel() else out.new_zeros(())),
                                ("sum", kept.sum())):
        got = F.bmc_loss(p, y, s ** 2, candidates=cands[rank] if given else None, mask=m, reduction=reduction,
                         backend=backend, sync=True, process_group=group)
        torch.testing.assert_close(got, expected.detach(), **FP32)

    # unequal shards under DDP-style averaging: 'sum' scaled by world_size / global kept count gives the
    # gradient of the global mean
    p.grad = None
    s.grad = None
    local = F.bmc_loss(p, y, s ** 2, candidates=cands[rank] if given else None, mask=m, reduction="sum",
                       backend=backend, sync=True, process_group=group)
    n_kept = D.all_reduce(torch.tensor(float((y.shape[0] if d > 1 else y.numel()) if m is None else int(m.sum()))),
                          process_group=group)
    (local * world_size / n_kept.clamp(min=1).float()).backward()
    kept_all = target_all.shape[0] if d > 1 else target_all.numel()
    kept_all = kept_all if mask_all is None else int(mask_all.sum())
    torch.testing.assert_close(_sum_over_ranks(s.grad, group) / world_size, s_ref.grad.double() / max(kept_all, 1),
                               **FP32)
    torch.testing.assert_close(p.grad, _shard(p_ref.grad, sizes, rank) * world_size / max(kept_all, 1), **FP32)


def _bmc_scenario(rank, world_size, group, backend):
    for layout in ("rows", "rows2", "dense"):
        for masked in (False, True):
            for given in (False, True):
                _bmc_case(rank, world_size, group, backend, layout, masked, given)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_bmc_matches_single_process(pools, world_size, backend):
    pools.run(_bmc_scenario, world_size, backend)


# --------------------------------------------------------------------------------------------------
# FDS
# --------------------------------------------------------------------------------------------------


def _fds_batches(world_size, dense, seed):
    """Two global batches (features, labels, mask) and their shards: rows [N, C] or dense [B, C, 2, 3]."""
    g = torch.Generator().manual_seed(seed)
    sizes = _sizes(world_size) if not dense else ([1, 2] if world_size == 2 else [2, 0, 1])
    n = sum(sizes)
    out = []
    for _ in range(2):
        if dense:
            labels = torch.rand(n, 1, 2, 3, generator=g, dtype=torch.float64) * 3
            feats = torch.randn(n, 3, 2, 3, generator=g, dtype=torch.float64) + labels
            mask = torch.rand(n, 1, 2, 3, generator=g) > 0.2
        else:
            labels = torch.rand(n, generator=g, dtype=torch.float64) * 3
            feats = torch.randn(n, 3, generator=g, dtype=torch.float64) * (1 + labels.unsqueeze(1))
            feats = feats + labels.unsqueeze(1) * torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
            mask = None
        out.append((feats, labels, mask, sizes))
    return out


def _fds_scenario(rank, world_size, group, backend, covariance):
    kw = dict(feature_dim=3, bins=6, range=(0.0, 3.0), covariance=covariance, momentum=0.5, backend=backend)
    single = FDS(**kw)
    synced = FDS(**kw, sync=True, process_group=group)
    for epoch, dense in enumerate((False, True, False)):
        batches = _fds_batches(world_size, dense, seed=epoch)
        for feats, labels, mask, sizes in batches:
            single.accumulate(feats, labels, mask)
            synced.accumulate(_shard(feats, sizes, rank), _shard(labels, sizes, rank),
                              None if mask is None else _shard(mask, sizes, rank))
        single.update()
        synced.update()
        for name, buf in synced.state_dict().items():
            assert _same_on_every_rank(buf, group), f"epoch {epoch}: {name} differs between ranks"
            torch.testing.assert_close(buf, single.state_dict()[name], rtol=1e-9, atol=1e-10,
                                       msg=lambda m: f"epoch {epoch}, {name}: {m}")
        synced.train()
        single.train()
        feats, labels, mask, sizes = batches[0]
        calibrated = synced(_shard(feats, sizes, rank), _shard(labels, sizes, rank),
                            None if mask is None else _shard(mask, sizes, rank))
        torch.testing.assert_close(calibrated, _shard(single(feats, labels, mask), sizes, rank), rtol=1e-9,
                                   atol=1e-10)
    assert int(synced.epoch) == 3


@pytest.mark.parametrize("covariance", ["full", "diag"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_fds_matches_single_process(pools, world_size, backend, covariance):
    pools.run(_fds_scenario, world_size, backend, covariance)


# --------------------------------------------------------------------------------------------------
# LDS, priors, classes: counts and fits on a sharded training set
# --------------------------------------------------------------------------------------------------


def _labels(world_size, seed=0):
    """Skewed 1-D labels, their shards (sizes unequal, one rank empty with 3 ranks) and a mask."""
    g = torch.Generator().manual_seed(seed)
    sizes = [40, 65] if world_size == 2 else [50, 0, 73]
    total = sum(sizes)
    labels = torch.cat([torch.randn(total // 2, generator=g) * 0.5 + 1.0,
                        torch.rand(total - total // 2, generator=g) * 6.0])[torch.randperm(total, generator=g)]
    mask = torch.rand(total, generator=g) > 0.25
    return labels, mask, sizes


def _lds_scenario(rank, world_size, group):
    labels, mask, sizes = _labels(world_size)
    mine, mine_mask = _shard(labels, sizes, rank), _shard(mask, sizes, rank)
    sync = dict(sync=True, process_group=group)
    for m, m_mine in ((None, None), (mask, mine_mask)):
        hist = lds.label_histogram(labels, 12, (0.0, 6.0), mask=m)
        got = lds.label_histogram(mine, 12, (0.0, 6.0), mask=m_mine, **sync)
        assert torch.equal(got, hist)
        for kw in (dict(scheme="sqrt_inv"), dict(scheme="inv", mode="reflect"), dict(scheme="none", lds=False)):
            dens = lds.label_density(labels, 12, (0.0, 6.0), mask=m, **kw)
            assert torch.equal(lds.label_density(mine, 12, (0.0, 6.0), mask=m_mine, **kw, **sync), dens)
            w = lds.sample_weights(labels, 12, range=(0.0, 6.0), mask=m, **kw)
            assert torch.equal(lds.sample_weights(mine, 12, range=(0.0, 6.0), mask=m_mine, **kw, **sync),
                               _shard(w, sizes, rank))
        lw = lds.LabelWeights(12, range=(0.0, 6.0)).fit(labels, m)
        lw_sync = lds.LabelWeights(12, range=(0.0, 6.0)).fit(mine, m_mine, **sync)
        for name in ("counts", "density", "bin_weights"):
            assert torch.equal(getattr(lw_sync, name), getattr(lw, name)), name


def _priors_scenario(rank, world_size, group):
    labels, mask, sizes = _labels(world_size, seed=1)
    mine, mine_mask = _shard(labels, sizes, rank), _shard(mask, sizes, rank)
    sync = dict(sync=True, process_group=group)
    # BNI histogram: data range all-reduced, explicit range / edges, smoothing
    for args, kw in (((20,), {}), ((20,), dict(range=(-1.0, 7.0))), ((torch.linspace(-1, 7, 9),), {}),
                     ((15,), dict(smooth=("gaussian", 5, 2.0)))):
        ref = priors.bin_prior(labels, *args, **kw)
        got = priors.bin_prior(mine, *args, **kw, **sync)
        for r, g_ in zip(ref, got):
            assert torch.equal(g_, r)                                  # integer counts: exact
    # classes: range from the kept data of every rank, fine bins, equalisation
    for kw in (dict(num_classes=4), dict(num_classes=5, num_bins=30), dict(num_classes=6, equalize=False,
                                                                           range=(0.0, 6.0))):
        ref = ClassBins.fit(labels, mask=mask, **kw)
        got = ClassBins.fit(mine, mask=mine_mask, **kw, **sync)
        assert torch.equal(got.edges, ref.edges) and torch.equal(got.counts, ref.counts), kw
    # k-means and the GAI prior: every initialisation, d = 1 and 2, several runs
    g = torch.Generator().manual_seed(2)
    points = torch.cat([torch.randn(sum(sizes), 2, generator=g) * 0.3 + torch.tensor([[0.0, 0.0]]),
                        torch.randn(sum(sizes), 2, generator=g) * 0.5 + torch.tensor([[3.0, 1.0]])])
    points = points[torch.randperm(points.shape[0], generator=g)[:sum(sizes)]]
    for data in (labels, points):
        shard = _shard(data, sizes, rank)
        d = 1 if data.dim() == 1 else data.shape[1]
        far = torch.full((1, d), 100.0)                                # a cluster left empty: relocation
        for init in ("k-means++", torch.cat([data[:2].reshape(2, d), far])):
            centers, assigned = priors.kmeans(data, 3, init=init)
            c_sync, a_sync = priors.kmeans(shard, 3, init=init, **sync)
            torch.testing.assert_close(c_sync, centers, **FP64)
            assert _same_on_every_rank(c_sync, group)
            assert torch.equal(a_sync, _shard(assigned, sizes, rank))
        for init in ("kmeans", "k-means++", "random", "random_from_data"):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", priors.ConvergenceWarning)
                ref = priors.fit_gmm(data, 3, init=init, n_init=2, seed=5)
                got = priors.fit_gmm(shard, 3, init=init, n_init=2, seed=5, **sync)
            for name, r, g_ in zip(("weights", "means", "covariances"), ref, got):
                torch.testing.assert_close(g_, r, rtol=1e-8, atol=1e-10, msg=lambda m: f"{init} {name}: {m}")
                assert _same_on_every_rank(g_, group), (init, name)


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_lds_counts_and_weights_match_single_process(pools, world_size):
    pools.run(_lds_scenario, world_size)


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_priors_and_classes_match_single_process(pools, world_size):
    pools.run(_priors_scenario, world_size)


# --------------------------------------------------------------------------------------------------
# DIRMetrics: torchmetrics sums the per-bin states across processes
# --------------------------------------------------------------------------------------------------


def _metrics_scenario(rank, world_size, group):
    train, train_mask, train_sizes = _labels(world_size, seed=3)
    counts = lds.label_histogram(_shard(train, train_sizes, rank), 12, (0.0, 6.0),
                                 mask=_shard(train_mask, train_sizes, rank), sync=True, process_group=group)
    g = torch.Generator().manual_seed(4)
    sizes = [30, 7] if world_size == 2 else [25, 0, 14]
    target = torch.rand(sum(sizes), 1, 2, 2, generator=g, dtype=torch.float64) * 6 + 0.01
    pred = target + torch.randn(target.shape, generator=g, dtype=torch.float64) * 0.3
    pred = pred.abs() + 0.01
    mask = torch.rand(target.shape, generator=g) > 0.2
    target[~mask] = float("nan")                                    # holes: masked out
    single = DIRMetrics(12, (0.0, 6.0), train_counts=lds.label_histogram(train, 12, (0.0, 6.0), mask=train_mask),
                        many=10, few=4, depth=True, sync_on_compute=False)
    single.update(pred, target, mask)
    synced = DIRMetrics(12, (0.0, 6.0), train_counts=counts, many=10, few=4, depth=True, process_group=group)
    p, t, m = (_shard(x, sizes, rank) for x in (pred, target, mask))
    half = p.shape[0] // 2
    synced.update(p[:half], t[:half], m[:half])
    synced.update(p[half:], t[half:], m[half:])
    ref, got = single.compute(), synced.compute()
    assert ref.keys() == got.keys()
    for key in ref:
        torch.testing.assert_close(got[key], ref[key], rtol=1e-12, atol=1e-12, equal_nan=True, msg=key)
    assert ref["few/count"] > 0 and ref["many/count"] > 0
    # shot_metrics: sync=True sums the shards (training labels included); the default stays local, so one
    # rank may evaluate alone without waiting for the others
    options = dict(many=10, few=4, depth=True)
    one_call = shot_metrics(p, t, _shard(train, train_sizes, rank), 12, (0.0, 6.0), mask=m, sync=True,
                            process_group=group, **options)
    whole = shot_metrics(pred, target, train, 12, (0.0, 6.0), mask=mask, **options)
    for key in whole:
        torch.testing.assert_close(one_call[key], whole[key], rtol=1e-12, atol=1e-12, equal_nan=True, msg=key)
    if rank == 0:
        alone = shot_metrics(pred, target, train, 12, (0.0, 6.0), mask=mask, **options)
        assert all(torch.equal(alone[k], whole[k]) or bool(alone[k].isnan() & whole[k].isnan()) for k in whole)


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_dir_metrics_match_single_process(pools, world_size):
    pools.run(_metrics_scenario, world_size)


# --------------------------------------------------------------------------------------------------
# End to end: DDP training with BMC + FDS + LDS equals single-process training on the global batch
# --------------------------------------------------------------------------------------------------


class _Net(torch.nn.Module):
    """encoder -> FDS -> decoder, with the BMC criterion (its sigma is a parameter of the DDP module)."""

    def __init__(self, backend, sync=False, group=None):
        super().__init__()
        torch.manual_seed(0)
        self.encoder = torch.nn.Linear(3, 4)
        self.decoder = torch.nn.Linear(4, 1)
        self.fds = FDS(4, bins=3, range=(-2.0, 2.0), eps=0.05, start_smooth=1, backend=backend, sync=sync,
                       process_group=group)
        self.criterion = BMCLoss(init_noise_sigma=1.0, backend=backend, sync=sync, process_group=group)

    def forward(self, x, y, w):
        z = self.encoder(x)
        self.fds.accumulate(z.detach(), y)
        p = self.decoder(self.fds(z, y)).squeeze(1)
        return self.criterion(p, y) + F.weighted_mse_loss(p, y, w)


def _train(net, batches, weights, update_fds):
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for (x, y), w in zip(batches, weights):
        loss = net(x, y, w)
        opt.zero_grad()
        loss.backward()
        opt.step()
        update_fds()                                   # one epoch per step: FDS calibrates from step 2 on
    return loss


def _ddp_scenario(rank, world_size, group, backend):
    per_rank = 8
    g = torch.Generator().manual_seed(6)
    batches = [(torch.randn(per_rank * world_size, 3, generator=g), torch.randn(per_rank * world_size, generator=g))
               for _ in range(3)]
    train = torch.cat([y for _, y in batches])                       # the training labels, sharded below
    sizes = [per_rank] * world_size

    single = _Net(backend)
    lw = lds.LabelWeights(6, range=(-3.0, 3.0)).fit(train)
    _train(single, batches, [lw.weights(y) for _, y in batches], single.fds.update)

    net = _Net(backend, sync=True, group=group)
    ddp = torch.nn.parallel.DistributedDataParallel(net, process_group=group, forward_sync_buffers=False)
    shard_train = torch.cat([_shard(y, sizes, rank) for _, y in batches])
    lw_sync = lds.LabelWeights(6, range=(-3.0, 3.0)).fit(shard_train, sync=True, process_group=group)
    mine = [(_shard(x, sizes, rank), _shard(y, sizes, rank)) for x, y in batches]
    _train(ddp, mine, [lw_sync.weights(y) for _, y in mine], net.fds.update)

    for (name, p), p_ref in zip(net.named_parameters(), single.parameters()):
        assert _same_on_every_rank(p, group), name
        torch.testing.assert_close(p, p_ref, **FP32, msg=lambda m: f"{name}: {m}")
    for name, buf in net.fds.state_dict().items():
        assert _same_on_every_rank(buf, group), name
        torch.testing.assert_close(buf, single.fds.state_dict()[name], rtol=1e-5, atol=1e-6, msg=name)
    assert int(net.fds.epoch) == 3
    assert not torch.allclose(net.fds.transform, torch.eye(4, dtype=torch.float64).expand(3, 4, 4))   # calibrating


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_ddp_training_matches_single_process(pools, world_size, backend):
    pools.run(_ddp_scenario, world_size, backend)


# --------------------------------------------------------------------------------------------------
# A check that fails on one rank, or settings that differ between ranks: every rank raises, none hangs
# --------------------------------------------------------------------------------------------------


def _raised(fn):
    try:
        fn()
    except (ValueError, TypeError, RuntimeError) as exc:
        return type(exc).__name__, str(exc)
    return None, ""


def _failure_scenario(rank, world_size, group):
    sync = dict(sync=True, process_group=group)
    out = {}
    pred = torch.randn(4)
    bad = pred.clone()
    bad[1] = float("nan")
    out["bmc nan on rank 1"] = _raised(lambda: F.bmc_loss(bad if rank == 1 else pred, torch.randn(4), 1.0, **sync))
    out["bmc d differs"] = _raised(lambda: F.bmc_loss(torch.randn(3, 1 + (rank == 0)), torch.randn(3, 1 + (rank == 0)),
                                                      1.0, **sync))
    out["bmc after failures"] = _raised(lambda: F.bmc_loss(pred, torch.randn(4), 1.0, **sync))
    labels = torch.rand(10) * 5
    if rank == world_size - 1:
        labels[0] = float("inf")
    out["weights inf on last rank"] = _raised(lambda: lds.LabelWeights(5, range=(0.0, 5.0)).fit(labels, **sync))
    out["histogram bins differ"] = _raised(lambda: lds.label_histogram(torch.rand(6), 4 + rank, (0.0, 1.0), **sync))
    out["gmm seeds differ"] = _raised(lambda: priors.fit_gmm(torch.randn(20), 2, seed=rank, **sync))
    out["gmm too few samples"] = _raised(lambda: priors.fit_gmm(torch.randn(1) if rank == 0 else torch.empty(0), 2,
                                                                **sync))
    fds = FDS(2, bins=3 + (rank == 1), range=(0.0, 1.0), sync=True, process_group=group)
    out["fds bins differ"] = _raised(fds.update)
    return out


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_failures_raise_on_every_rank(pools, world_size):
    results = pools.run(_failure_scenario, world_size)
    rows = {key: [r[key] for r in results] for key in results[0]}
    kinds = {key: [kind for kind, _ in v] for key, v in rows.items()}
    others = ["RuntimeError"] * world_size
    assert kinds["bmc nan on rank 1"] == others[:1] + ["ValueError"] + others[2:]
    assert "rank(s) [1]" in rows["bmc nan on rank 1"][0][1]
    assert kinds["bmc d differs"] == ["ValueError"] * world_size
    assert all("target dimension" in msg for _, msg in rows["bmc d differs"])
    assert kinds["bmc after failures"] == [None] * world_size
    assert kinds["weights inf on last rank"] == others[:-1] + ["ValueError"]
    assert kinds["histogram bins differ"] == ["ValueError"] * world_size
    assert kinds["gmm seeds differ"] == ["ValueError"] * world_size
    assert all("generator state" in msg for _, msg in rows["gmm seeds differ"])
    assert kinds["gmm too few samples"] == ["ValueError"] * world_size
    assert kinds["fds bins differ"] == ["ValueError"] * world_size


# --------------------------------------------------------------------------------------------------
# A world of one: sync=True without torch.distributed is the single-process computation
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_sync_without_process_group_is_single_process(backend):
    assert not dist.is_initialized()
    assert D.sync_group(True) is None and D.rank() == 0 and D.world_size() == 1
    x = torch.randn(7, 2)
    assert torch.equal(D.all_gather(x)[0], x) and torch.equal(D.all_reduce(x), x.double())
    assert D.min_max(x) == (float(x.min()), float(x.max())) and D.min_max(x[:0]) is None
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(9, generator=g, requires_grad=True), torch.randn(9, generator=g)
    mask = torch.rand(9, generator=g) > 0.3
    for kw in (dict(), dict(mask=mask), dict(candidates=torch.randn(5, generator=g))):
        a = F.bmc_loss(pred, target, 0.5, backend=backend, **kw)
        b = F.bmc_loss(pred, target, 0.5, backend=backend, sync=True, **kw)
        assert torch.equal(a, b)
    labels = torch.rand(50, generator=g) * 4
    assert torch.equal(lds.label_histogram(labels, 8, (0.0, 4.0), sync=True),
                       lds.label_histogram(labels, 8, (0.0, 4.0)))
    assert torch.equal(lds.sample_weights(labels, 8, range=(0.0, 4.0), sync=True),
                       lds.sample_weights(labels, 8, range=(0.0, 4.0)))
    for a, b in zip(priors.bin_prior(labels, 10, sync=True), priors.bin_prior(labels, 10)):
        assert torch.equal(a, b)
    for a, b in zip(priors.fit_gmm(labels, 3, sync=True), priors.fit_gmm(labels, 3)):
        assert torch.equal(a, b)
    assert torch.equal(ClassBins.fit(labels, 4, sync=True).edges, ClassBins.fit(labels, 4).edges)
    fds_a, fds_b = FDS(3, bins=4, range=(0.0, 4.0), backend=backend), FDS(3, bins=4, range=(0.0, 4.0), backend=backend,
                                                                       sync=True)
    feats = torch.randn(50, 3, generator=g, dtype=torch.float64)
    for fds in (fds_a, fds_b):
        fds.accumulate(feats, labels)
        fds.update()
    for name, buf in fds_a.state_dict().items():
        assert torch.equal(buf, fds_b.state_dict()[name]), name
    assert "sync=True" in repr(fds_b) and "sync=True" in repr(BMCLoss(sync=True))


def test_sync_arguments_are_checked():
    with pytest.raises(TypeError, match="sync must be a bool"):
        F.bmc_loss(torch.randn(3), torch.randn(3), 1.0, sync=1)
    with pytest.raises(TypeError, match="sync must be a bool"):
        FDS(2, bins=3, range=(0.0, 1.0), sync="yes")
    with pytest.raises(ValueError, match="op must be one of"):
        D.all_reduce(torch.ones(2), "mean")
    with pytest.raises(ValueError, match="at least one dim"):
        D.all_gather(torch.tensor(1.0))


# --------------------------------------------------------------------------------------------------
# The harness itself: a hang fails the test within its timeout instead of blocking the run
# --------------------------------------------------------------------------------------------------


def _hang_scenario(rank, world_size, group):
    if rank == 0:
        dist.barrier(group=group)          # rank 1 never joins


def test_a_hang_fails_within_the_timeout(pools):
    with pytest.raises(AssertionError, match=r"did not finish within 3 s \(a hang\)"):
        pools.run(_hang_scenario, 2, timeout=3)
