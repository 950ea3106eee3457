"""BSAM (imbreg_fast.optim) against SAM / ASAM updates written out by hand in fp64.

The model is a tiny linear regressor y = x W^T + b with the weighted MSE
L(W, b; w) = mean_{i,j} w_i (x_i . W_j + b_j - y_ij)^2, whose gradient is computed here in closed form
(never with autograd), and the base optimisers' updates (SGD with momentum / weight decay, Adam) are
written out too. A second reference is the published BSAM training step (manmanjun/BSAM_for_Imbalanced_Regression,
agedb/train.py), rewritten here as a per-parameter loop.
"""
import copy
import math

import pytest
import torch

from imbreg_fast import lds
from imbreg_fast.functional import weighted_l1_loss
from imbreg_fast.optim import BSAM, NORM_EPS, bsam_step

D = torch.float64
N, DIN, DOUT = 6, 3, 2


# --------------------------------------------------------------------------------------------------
# Hand references
# --------------------------------------------------------------------------------------------------


def make_problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, DIN, generator=g, dtype=D)
    y = torch.randn(N, DOUT, generator=g, dtype=D)
    W = torch.randn(DOUT, DIN, generator=g, dtype=D)
    b = torch.randn(DOUT, generator=g, dtype=D)
    wa = torch.rand(N, generator=g, dtype=D) + 0.2          # ascent weights
    wd = torch.rand(N, generator=g, dtype=D) + 0.2          # descent weights (different on purpose)
    return x, y, W, b, wa, wd


def hand_grad(W, b, x, y, w):
    """dL/dW, dL/db of L = mean_{i,j} w_i r_ij^2, r = x W^T + b - y (closed form)."""
    r = x @ W.T + b - y
    c = 2.0 / (N * DOUT)
    wr = w[:, None] * r
    return c * wr.T @ x, c * wr.sum(0)


def hand_perturbation(params, grads, rhos, adaptive, eta=0.0):
    """SAM / ASAM e per tensor, with one global norm; rhos/adaptive per tensor."""
    vs = [((p.abs() + eta) * g if a else g) for p, g, a in zip(params, grads, adaptive)]
    norm = math.sqrt(sum(float((v * v).sum()) for v in vs))
    es = []
    for p, g, r, a in zip(params, grads, rhos, adaptive):
        t2 = (p.abs() + eta) ** 2 if a else 1.0
        es.append(r * t2 * g / (norm + NORM_EPS))
    return es


def hand_sam_sgd(W, b, x, y, wa, wd, steps, rho, lr, momentum, weight_decay, adaptive=False, eta=0.0):
    W, b = W.clone(), b.clone()
    buf = None
    for _ in range(steps):
        gW, gb = hand_grad(W, b, x, y, wa)
        eW, eb = hand_perturbation([W, b], [gW, gb], [rho, rho], [adaptive, adaptive], eta)
        gW2, gb2 = hand_grad(W + eW, b + eb, x, y, wd)
        d = [gW2 + weight_decay * W, gb2 + weight_decay * b]
        buf = d if buf is None else [momentum * bu + di for bu, di in zip(buf, d)]
        W, b = W - lr * buf[0], b - lr * buf[1]
    return W, b


def hand_sam_adam(W, b, x, y, wa, wd, steps, rho, lr, betas, eps):
    W, b = W.clone(), b.clone()
    m = [torch.zeros_like(W), torch.zeros_like(b)]
    v = [torch.zeros_like(W), torch.zeros_like(b)]
    b1, b2 = betas
    for t in range(1, steps + 1):
        gW, gb = hand_grad(W, b, x, y, wa)
        eW, eb = hand_perturbation([W, b], [gW, gb], [rho, rho], [False, False])
        g2 = hand_grad(W + eW, b + eb, x, y, wd)
        m = [b1 * mi + (1 - b1) * gi for mi, gi in zip(m, g2)]
        v = [b2 * vi + (1 - b2) * gi * gi for vi, gi in zip(v, g2)]
        upd = [(mi / (1 - b1 ** t)) / ((vi / (1 - b2 ** t)).sqrt() + eps) for mi, vi in zip(m, v)]
        W, b = W - lr * upd[0], b - lr * upd[1]
    return W, b


# --------------------------------------------------------------------------------------------------
# Model side (autograd through a plain torch loss)
# --------------------------------------------------------------------------------------------------


def params_of(W, b):
    return torch.nn.Parameter(W.clone()), torch.nn.Parameter(b.clone())


def loss_of(Wp, bp, x, y):
    def loss_fn(w):
        return (w[:, None] * (x @ Wp.T + bp - y) ** 2).mean()
    return loss_fn


def explicit_step(opt, loss_fn, wa, wd):
    opt.zero_grad()
    loss_fn(wa).backward()
    opt.first_step(zero_grad=True)
    loss_fn(wd).backward()
    opt.second_step()


def close(a, b, tol=1e-12):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


# --------------------------------------------------------------------------------------------------
# One (and several) BSAM steps equal the hand-computed SAM / ASAM updates
# --------------------------------------------------------------------------------------------------


def test_sgd_momentum_weight_decay_matches_hand_sam_with_different_weights():
    x, y, W, b, wa, wd = make_problem()
    Wp, bp = params_of(W, b)
    opt = BSAM([Wp, bp], torch.optim.SGD, rho=0.3, lr=0.1, momentum=0.9, weight_decay=0.01)
    loss_fn = loss_of(Wp, bp, x, y)
    for _ in range(3):
        bsam_step(opt, loss_fn, wa, wd)
    W3, b3 = hand_sam_sgd(W, b, x, y, wa, wd, 3, rho=0.3, lr=0.1, momentum=0.9, weight_decay=0.01)
    close(Wp.detach(), W3)
    close(bp.detach(), b3)
    # and the weights passed as ascent/descent weights matter (a swapped call differs)
    Ws, _ = hand_sam_sgd(W, b, x, y, wd, wa, 3, rho=0.3, lr=0.1, momentum=0.9, weight_decay=0.01)
    assert not torch.allclose(Ws, W3, rtol=1e-6, atol=1e-6)


def test_adam_matches_hand_sam():
    x, y, W, b, wa, wd = make_problem(1)
    Wp, bp = params_of(W, b)
    opt = BSAM([Wp, bp], torch.optim.Adam, rho=0.1, lr=0.05, betas=(0.8, 0.95), eps=1e-6)
    loss_fn = loss_of(Wp, bp, x, y)
    for _ in range(3):
        explicit_step(opt, loss_fn, wa, wd)
    W3, b3 = hand_sam_adam(W, b, x, y, wa, wd, 3, rho=0.1, lr=0.05, betas=(0.8, 0.95), eps=1e-6)
    close(Wp.detach(), W3)
    close(bp.detach(), b3)


@pytest.mark.parametrize("eta", [0.0, 0.01, 0.5])
def test_adaptive_matches_hand_asam(eta):
    x, y, W, b, wa, wd = make_problem(2)
    Wp, bp = params_of(W, b)
    opt = BSAM([Wp, bp], torch.optim.SGD, rho=0.8, adaptive=True, adaptive_eta=eta, lr=0.1, momentum=0.5)
    loss_fn = loss_of(Wp, bp, x, y)
    for _ in range(2):
        bsam_step(opt, loss_fn, wa, wd)
    W2, b2 = hand_sam_sgd(W, b, x, y, wa, wd, 2, rho=0.8, lr=0.1, momentum=0.5, weight_decay=0.0,
                          adaptive=True, eta=eta)
    close(Wp.detach(), W2)
    close(bp.detach(), b2)


def test_first_step_perturbation_is_exactly_e_and_second_step_restores_bitwise():
    x, y, W, b, wa, _ = make_problem(3)
    Wp, bp = params_of(W, b)
    opt = BSAM([Wp, bp], torch.optim.SGD, rho=0.25, lr=0.0)
    loss_of(Wp, bp, x, y)(wa).backward()
    opt.first_step()
    gW, gb = hand_grad(W, b, x, y, wa)
    eW, eb = hand_perturbation([W, b], [gW, gb], [0.25, 0.25], [False, False])
    close(Wp.detach() - W, eW)
    close(bp.detach() - b, eb)
    close(torch.cat([eW.flatten(), eb]).norm(), torch.tensor(0.25, dtype=D))   # ‖e‖ = rho
    assert Wp.grad is not None                     # zero_grad=False keeps the gradients
    opt.restore()
    assert torch.equal(Wp.detach(), W) and torch.equal(bp.detach(), b)    # exact, not (w + e) - e
    opt.first_step(zero_grad=True)
    assert Wp.grad is None and bp.grad is None
    opt.second_step()                              # lr 0, no grads: only the restore
    assert torch.equal(Wp.detach(), W) and torch.equal(bp.detach(), b)


def test_rho_zero_is_the_base_optimizer():
    x, y, W, b, wa, _ = make_problem(4)
    Wp, bp = params_of(W, b)
    opt = BSAM([Wp, bp], torch.optim.SGD, rho=0.0, lr=0.1, momentum=0.9)
    bsam_step(opt, loss_of(Wp, bp, x, y), wa, wa)
    gW, gb = hand_grad(W, b, x, y, wa)
    close(Wp.detach(), W - 0.1 * gW)
    close(bp.detach(), b - 0.1 * gb)


# --------------------------------------------------------------------------------------------------
# Closure form, helper, instance form
# --------------------------------------------------------------------------------------------------


def test_closure_form_equals_explicit_form():
    x, y, W, b, wa, _ = make_problem(5)
    runs = []
    for form in ("closure", "explicit"):
        Wp, bp = params_of(W, b)
        opt = BSAM([Wp, bp], torch.optim.SGD, rho=0.2, lr=0.1, momentum=0.9)
        loss_fn = loss_of(Wp, bp, x, y)
        for _ in range(3):
            if form == "closure":
                opt.zero_grad()
                loss_fn(wa).backward()

                def closure():
                    loss = loss_fn(wa)
                    loss.backward()
                    return loss
                out = opt.step(closure)
                assert out.requires_grad and out.dim() == 0      # the closure's value, at w + e
            else:
                explicit_step(opt, loss_fn, wa, wa)
        runs.append((Wp.detach().clone(), bp.detach().clone()))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


def test_instance_form_equals_class_form():
    x, y, W, b, wa, wd = make_problem(6)
    out = []
    for form in ("class", "instance", "instance_same_params"):
        Wp, bp = params_of(W, b)
        if form == "class":
            opt = BSAM([Wp, bp], torch.optim.Adam, rho=0.1, lr=0.01)
        elif form == "instance":
            opt = BSAM(None, torch.optim.Adam([Wp, bp], lr=0.01), rho=0.1)
        else:
            opt = BSAM([bp, Wp], torch.optim.Adam([Wp, bp], lr=0.01), rho=0.1)
        assert opt.param_groups is opt.base_optimizer.param_groups and opt.state is opt.base_optimizer.state
        for _ in range(2):
            bsam_step(opt, loss_of(Wp, bp, x, y), wa, wd)
        out.append(torch.cat([Wp.detach().flatten(), bp.detach()]))
    assert torch.equal(out[0], out[1]) and torch.equal(out[0], out[2])


def test_returns_ascent_loss_detached():
    x, y, W, b, wa, wd = make_problem(7)
    Wp, bp = params_of(W, b)
    opt = BSAM([Wp, bp], torch.optim.SGD, lr=0.1)
    loss = bsam_step(opt, loss_of(Wp, bp, x, y), wa, wd)
    r = x @ W.T + b - y
    close(loss, (wa[:, None] * r * r).mean())
    assert not loss.requires_grad


def test_matches_published_bsam_training_step_with_label_weights():
    """BSAM + LabelWeights('sqrt_inv', no LDS) = the published step: 1/sqrt(n_{int(y)}) weights (unnormalised)
    in both passes, L1 loss, its SAM class (per-parameter norms, e stored and subtracted), SGD momentum + wd."""
    g = torch.Generator().manual_seed(8)
    K = 6
    train_y = torch.cat([torch.arange(K, dtype=D).repeat_interleave(torch.tensor([9, 4, 1, 2, 7, 3])),
                         torch.rand(5, generator=g, dtype=D) * K])
    counts = torch.bincount(train_y.long(), minlength=K).to(D)
    table = counts.sqrt()                                     # the published '*_sqrt_weight.pt' table
    x = torch.randn(8, 4, generator=g, dtype=D)
    yb = (torch.rand(8, generator=g, dtype=D) * K).reshape(-1, 1)
    lin = torch.nn.Linear(4, 1).double()
    ref_model = copy.deepcopy(lin)

    # --- the published loop, rewritten (agedb/train.py: SAM.first_step / second_step)
    base = torch.optim.SGD(ref_model.parameters(), lr=0.2, momentum=0.9, weight_decay=1e-4)
    eps_state = {}

    def ref_loss():
        out = ref_model(x)
        w = torch.stack([1 / table[int(yb[i, 0])] for i in range(yb.shape[0])]).view(-1, 1)
        return torch.mean(w * torch.nn.functional.l1_loss(out, yb, reduction="none"))

    for _ in range(3):
        base.zero_grad()
        ref_loss().backward()
        with torch.no_grad():
            norm = torch.norm(torch.stack([torch.norm(p.grad, p=2) for p in ref_model.parameters()
                                           if p.grad is not None]), p=2) + 1.e-16
            for p in ref_model.parameters():
                if p.grad is not None:
                    eps_state[p] = p.grad * (0.2 / norm)
                    p.add_(eps_state[p])
        base.zero_grad()
        ref_loss().backward()
        with torch.no_grad():
            for p in ref_model.parameters():
                if p.grad is not None:
                    p.sub_(eps_state[p])
        base.step()
        base.zero_grad()

    # --- ours
    lw = lds.LabelWeights(K, range=(0, K), scheme="sqrt_inv", lds=False).fit(train_y)
    to_published = lw.counts.sqrt().sum() / lw.counts.sum()   # our weights have mean 1; the published do not
    w = lw.weights(yb) * to_published
    opt = BSAM(lin.parameters(), torch.optim.SGD, rho=0.2, lr=0.2, momentum=0.9, weight_decay=1e-4)
    for _ in range(3):
        bsam_step(opt, lambda ww: weighted_l1_loss(lin(x), yb, ww, check_finite=False), w, w)
    for p, q in zip(lin.parameters(), ref_model.parameters()):
        close(p.detach(), q.detach())


# --------------------------------------------------------------------------------------------------
# Parameters without gradients, zero gradients, groups, dtypes
# --------------------------------------------------------------------------------------------------


def test_params_without_grad_are_skipped_and_untouched():
    x, y, W, b, wa, wd = make_problem(9)
    Wp, bp = params_of(W, b)
    unused = torch.nn.Parameter(torch.randn(4, dtype=D))                   # never in the loss
    frozen = torch.nn.Parameter(torch.randn(3, dtype=D), requires_grad=False)
    only_ascent = torch.nn.Parameter(torch.randn(2, dtype=D))               # grad in pass 1 only
    before = [t.detach().clone() for t in (unused, frozen, only_ascent)]
    opt = BSAM([Wp, unused, bp, frozen, only_ascent], torch.optim.SGD, rho=0.3, lr=0.1, momentum=0.9,
               weight_decay=0.1)
    base_loss = loss_of(Wp, bp, x, y)
    calls = []

    def loss_fn(w):
        calls.append(1)
        # only_ascent enters the ascent loss with a zero-gradient term only (its grad exists and is 0):
        # it must not change the norm, and it is restored exactly after the descent pass, which skips it
        extra = (only_ascent * 0.0).sum() if len(calls) % 2 == 1 else 0.0
        return base_loss(w) + extra

    for _ in range(2):
        bsam_step(opt, loss_fn, wa, wd)
    W2, b2 = hand_sam_sgd(W, b, x, y, wa, wd, 2, rho=0.3, lr=0.1, momentum=0.9, weight_decay=0.1)
    close(Wp.detach(), W2)
    close(bp.detach(), b2)
    for t, t0 in zip((unused, frozen, only_ascent), before):
        assert torch.equal(t.detach(), t0)
    assert unused not in opt.state and only_ascent not in opt.state    # no momentum buffer either


def test_param_with_grad_in_ascent_only_is_perturbed_then_restored_exactly():
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=D))
    q = torch.nn.Parameter(torch.tensor([0.5], dtype=D))
    opt = BSAM([p, q], torch.optim.SGD, rho=0.1, lr=0.1)
    (p * p).sum().backward()
    (q * 3).sum().backward()
    opt.first_step(zero_grad=True)
    assert not torch.equal(p.detach(), torch.tensor([1.0, -2.0], dtype=D))
    (q * 3).sum().backward()          # p gets no gradient in the descent pass
    opt.second_step()
    assert torch.equal(p.detach(), torch.tensor([1.0, -2.0], dtype=D))
    close(q.detach(), torch.tensor([0.5 - 0.1 * 3], dtype=D))


@pytest.mark.parametrize("adaptive", [False, True])
def test_zero_gradient_gives_no_nan(adaptive):
    x, y, W, b, _, _ = make_problem(10)
    Wp, bp = params_of(W, b)
    zeros = torch.nn.Parameter(torch.zeros(3, dtype=D))      # |w| = 0: T = 0 for ASAM with eta 0
    opt = BSAM([Wp, bp, zeros], torch.optim.SGD, rho=0.5, adaptive=adaptive, lr=0.1, momentum=0.9)
    w0 = torch.zeros(N, dtype=D)                             # all weights 0: every gradient is exactly 0

    def loss_fn(w):
        return loss_of(Wp, bp, x, y)(w) + (zeros * 0.0).sum()

    bsam_step(opt, loss_fn, w0, w0)
    assert torch.equal(Wp.detach(), W) and torch.equal(bp.detach(), b)
    assert torch.equal(zeros.detach(), torch.zeros(3, dtype=D))
    # a zero ascent gradient, nonzero descent: e = 0, a plain SGD step
    wd = torch.ones(N, dtype=D)
    bsam_step(opt, loss_fn, w0, wd)
    gW, gb = hand_grad(W, b, x, y, wd)
    close(Wp.detach(), W - 0.1 * gW)
    close(bp.detach(), b - 0.1 * gb)
    assert all(torch.isfinite(t).all() for t in (Wp, bp, zeros))


def test_no_grad_anywhere_is_a_noop_pair():
    p = torch.nn.Parameter(torch.ones(2, dtype=D))
    opt = BSAM([p], torch.optim.SGD, lr=0.1)
    opt.first_step()
    opt.second_step()
    assert torch.equal(p.detach(), torch.ones(2, dtype=D))


def test_param_groups_with_own_rho_and_adaptive_share_one_norm():
    x, y, W, b, wa, wd = make_problem(11)
    Wp, bp = params_of(W, b)
    opt = BSAM([{"params": [Wp]}, {"params": [bp], "rho": 0.7, "adaptive": True, "adaptive_eta": 0.1,
                                   "lr": 0.05}],
               torch.optim.SGD, rho=0.2, lr=0.1)
    bsam_step(opt, loss_of(Wp, bp, x, y), wa, wd)
    gW, gb = hand_grad(W, b, x, y, wa)
    eW, eb = hand_perturbation([W, b], [gW, gb], [0.2, 0.7], [False, True], eta=0.1)
    # adaptive_eta is per tensor in hand_perturbation: W is not adaptive, so its eta does not enter
    gW2, gb2 = hand_grad(W + eW, b + eb, x, y, wd)
    close(Wp.detach(), W - 0.1 * gW2)
    close(bp.detach(), b - 0.05 * gb2)
    assert opt.param_groups[0]["rho"] == 0.2 and opt.param_groups[1]["rho"] == 0.7


def test_add_param_group_reaches_the_base_optimizer():
    p = torch.nn.Parameter(torch.ones(2, dtype=D))
    q = torch.nn.Parameter(torch.ones(3, dtype=D))
    opt = BSAM([p], torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9)
    opt.add_param_group({"params": [q], "rho": 0.3})
    assert len(opt.base_optimizer.param_groups) == 2
    grp = opt.param_groups[1]
    assert grp["rho"] == 0.3 and grp["adaptive"] is False and grp["momentum"] == 0.9 and grp["lr"] == 0.1
    with pytest.raises(ValueError, match="rho"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(1))], "rho": -1.0})


def test_mixed_dtypes_in_one_group_share_one_norm():
    a = torch.nn.Parameter(torch.tensor([0.3, -1.2], dtype=torch.float32))
    c = torch.nn.Parameter(torch.tensor([2.0, 0.5, -0.7], dtype=D))
    opt = BSAM([a, c], torch.optim.SGD, rho=0.4, lr=0.0)
    ga = torch.tensor([1.5, -0.25], dtype=torch.float32)
    gc = torch.tensor([0.1, 3.0, -2.0], dtype=D)
    a.grad, c.grad = ga.clone(), gc.clone()
    opt.first_step()
    n = math.sqrt(float((ga.double() ** 2).sum() + (gc ** 2).sum()))
    close((a.detach() - torch.tensor([0.3, -1.2])).double(), 0.4 * ga.double() / n, tol=1e-6)
    close(c.detach() - torch.tensor([2.0, 0.5, -0.7], dtype=D), 0.4 * gc / n)
    assert a.dtype == torch.float32 and c.dtype == D
    opt.restore()


def test_lr_scheduler_on_bsam_drives_the_base_optimizer():
    p = torch.nn.Parameter(torch.ones(2, dtype=D))
    opt = BSAM([p], torch.optim.SGD, lr=1.0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    p.grad = torch.ones(2, dtype=D)
    opt.step(lambda: p.sum().backward())
    sched.step()
    assert opt.base_optimizer.param_groups[0]["lr"] == 0.5


def test_lr_scheduler_on_base_optimizer_with_bsam_step_no_warning():
    import warnings
    p = torch.nn.Parameter(torch.ones(2, dtype=D))
    opt = BSAM([p], torch.optim.SGD, lr=1.0)
    sched = torch.optim.lr_scheduler.StepLR(opt.base_optimizer, step_size=1, gamma=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bsam_step(opt, lambda w: (p * p).sum(), None, None)
        sched.step()
    assert opt.param_groups[0]["lr"] == 0.5


# --------------------------------------------------------------------------------------------------
# state_dict
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("base,kwargs,buffers", [
    (torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=0.01), ("momentum_buffer",)),
    (torch.optim.Adam, dict(lr=0.05), ("exp_avg", "exp_avg_sq", "step")),
])
@pytest.mark.parametrize("fresh", ["class", "instance", "bare_base"])
def test_state_dict_round_trip_gives_identical_next_steps(base, kwargs, buffers, fresh):
    x, y, W, b, wa, wd = make_problem(12)
    Wp, bp = params_of(W, b)
    opt = BSAM([Wp, bp], base, rho=0.15, adaptive=True, **kwargs)
    for _ in range(2):
        bsam_step(opt, loss_of(Wp, bp, x, y), wa, wd)
    sd = copy.deepcopy(opt.state_dict())
    assert set(sd["state"][0]) == set(buffers)
    assert sd["param_groups"][0]["rho"] == 0.15 and sd["param_groups"][0]["adaptive"] is True

    W2, b2 = params_of(Wp.detach(), bp.detach())
    if fresh == "class":
        opt2 = BSAM([W2, b2], base, rho=0.9, **kwargs)          # rho, adaptive come from the checkpoint
        opt2.load_state_dict(sd)
        assert opt2.param_groups[0]["rho"] == 0.15 and opt2.param_groups[0]["adaptive"] is True
    elif fresh == "instance":
        opt2 = BSAM(None, base([W2, b2], **kwargs), rho=0.15, adaptive=True)
        opt2.load_state_dict(sd)
    else:   # a checkpoint of the bare base optimizer: BSAM keeps its own options
        bare = base([W2, b2], **kwargs)
        bare.load_state_dict({"state": sd["state"], "param_groups": [
            {k: v for k, v in g.items() if k not in ("rho", "adaptive", "adaptive_eta")} for g in sd["param_groups"]]})
        opt2 = BSAM([W2, b2], base, rho=0.15, adaptive=True, **kwargs)
        opt2.load_state_dict(bare.state_dict())
        assert opt2.param_groups[0]["rho"] == 0.15 and opt2.param_groups[0]["adaptive"] is True
    assert opt2.param_groups is opt2.base_optimizer.param_groups and opt2.state is opt2.base_optimizer.state
    for _ in range(2):
        bsam_step(opt, loss_of(Wp, bp, x, y), wa, wd)
        bsam_step(opt2, loss_of(W2, b2, x, y), wa, wd)
    assert torch.equal(Wp.detach(), W2.detach()) and torch.equal(bp.detach(), b2.detach())


def test_deepcopy_keeps_groups_and_state_shared():
    p = torch.nn.Parameter(torch.ones(2, dtype=D))
    opt = BSAM([p], torch.optim.SGD, lr=0.1, momentum=0.9)
    p.grad = torch.ones(2, dtype=D)
    opt.step(lambda: p.sum().backward())
    c = copy.deepcopy(opt)
    assert c.param_groups is c.base_optimizer.param_groups and c.state is c.base_optimizer.state
    assert "BSAM(base_optimizer=SGD)" in repr(opt)


def test_load_state_dict_refused_between_the_two_steps():
    p = torch.nn.Parameter(torch.ones(2, dtype=D))
    opt = BSAM([p], torch.optim.SGD, lr=0.1)
    sd = opt.state_dict()
    p.grad = torch.ones(2, dtype=D)
    opt.first_step()
    with pytest.raises(RuntimeError, match="between first_step"):
        opt.load_state_dict(sd)


# --------------------------------------------------------------------------------------------------
# AMP GradScaler
# --------------------------------------------------------------------------------------------------


def test_grad_scaler_order_equals_unscaled_steps():
    x, y, W, b, wa, wd = make_problem(13)
    results = []
    for use_scaler in (False, True):
        Wp, bp = params_of(W, b)
        opt = BSAM([Wp, bp], torch.optim.SGD, rho=0.2, lr=0.1, momentum=0.9)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12) if use_scaler else None
        loss_fn = loss_of(Wp, bp, x, y)
        for _ in range(3):
            if scaler is None:
                bsam_step(opt, loss_fn, wa, wd)
            else:   # the documented order, written out
                opt.zero_grad()
                scaler.scale(loss_fn(wa)).backward()
                scaler.unscale_(opt)
                close(Wp.grad, hand_grad(Wp.detach(), bp.detach(), x, y, wa)[0])     # unscaled
                opt.first_step(zero_grad=True)
                scaler.scale(loss_fn(wd)).backward()
                opt.second_step(scaler=scaler)
                scaler.update()
        results.append(torch.cat([Wp.detach().flatten(), bp.detach()]))
    close(results[0], results[1])


def test_grad_scaler_through_bsam_step_and_first_pass_without_unscale():
    """bsam_step(scaler=...) equals the unscaled step; and first_step on still-scaled gradients gives the
    same perturbation (e does not depend on the loss scale)."""
    x, y, W, b, wa, wd = make_problem(14)
    Wp, bp = params_of(W, b)
    opt = BSAM([Wp, bp], torch.optim.SGD, rho=0.2, lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    bsam_step(opt, loss_of(Wp, bp, x, y), wa, wd, scaler=scaler)
    scaler.update()
    W1, b1 = hand_sam_sgd(W, b, x, y, wa, wd, 1, rho=0.2, lr=0.1, momentum=0.0, weight_decay=0.0)
    close(Wp.detach(), W1)
    close(bp.detach(), b1)

    W3, b3 = params_of(W, b)
    opt = BSAM([W3, b3], torch.optim.SGD, rho=0.2, lr=0.0)
    (2.0 ** 20 * loss_of(W3, b3, x, y)(wa)).backward()
    opt.first_step()
    gW, gb = hand_grad(W, b, x, y, wa)
    eW, _ = hand_perturbation([W, b], [gW, gb], [0.2, 0.2], [False, False])
    close(W3.detach() - W, eW)
    opt.restore()


@pytest.mark.parametrize("bad_pass", ["ascent", "descent"])
def test_grad_scaler_overflow_skips_step_and_restores_weights_exactly(bad_pass):
    x, y, W, b, wa, wd = make_problem(15)
    Wp, bp = params_of(W, b)
    opt = BSAM([Wp, bp], torch.optim.SGD, rho=0.2, lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    loss_fn = loss_of(Wp, bp, x, y)
    bsam_step(opt, loss_fn, wa, wd, scaler=scaler)              # one good step: a momentum buffer exists
    scaler.update()
    Wg, bg = Wp.detach().clone(), bp.detach().clone()
    buf = opt.state[Wp]["momentum_buffer"].clone()
    bad = wa.clone()
    bad[0] = float("inf")
    bsam_step(opt, loss_fn, bad if bad_pass == "ascent" else wa, bad if bad_pass == "descent" else wd,
              scaler=scaler)
    scaler.update()
    assert torch.equal(Wp.detach(), Wg) and torch.equal(bp.detach(), bg)      # skipped, restored bitwise
    assert torch.equal(opt.state[Wp]["momentum_buffer"], buf)
    assert scaler.get_scale() == 2.0 ** 9                                     # the scaler saw the overflow


# --------------------------------------------------------------------------------------------------
# No host synchronisation
# --------------------------------------------------------------------------------------------------


def _forbid_sync(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("host synchronisation: a tensor value was read during the step")
    for name in ("item", "__bool__", "__float__", "__int__", "__index__", "tolist", "numpy", "nonzero"):
        monkeypatch.setattr(torch.Tensor, name, boom)


@pytest.mark.parametrize("adaptive", [False, True])
def test_step_reads_no_tensor_value(monkeypatch, adaptive):
    x, y, W, b, wa, wd = make_problem(16)
    Wp, bp = params_of(W, b)
    f32 = torch.nn.Parameter(torch.randn(3))
    opt = BSAM([{"params": [Wp, f32]}, {"params": [bp], "rho": 0.3}], torch.optim.SGD, rho=0.1,
               adaptive=adaptive, adaptive_eta=0.01, lr=0.1, momentum=0.9, foreach=True)

    def loss_fn(w):
        return loss_of(Wp, bp, x, y)(w) + (f32 ** 2).sum()

    bsam_step(opt, loss_fn, wa, wd)         # creates the momentum buffers outside the check
    _forbid_sync(monkeypatch)
    bsam_step(opt, loss_fn, wa, wd)         # first_step, restore, SGD's foreach step
    opt.zero_grad()
    loss_fn(wa).backward()

    def closure():
        loss = loss_fn(wd)
        loss.backward()
        return loss
    opt.step(closure)
    monkeypatch.undo()
    assert torch.isfinite(Wp).all()


def test_sync_check_catches_a_sync():
    _ = torch.ones(1)
    mp = pytest.MonkeyPatch()
    _forbid_sync(mp)
    try:
        with pytest.raises(AssertionError, match="host synchronisation"):
            torch.ones(1).item()
        with pytest.raises(AssertionError, match="host synchronisation"):
            bool(torch.ones(1))
    finally:
        mp.undo()


@pytest.mark.parametrize("adaptive", [False, True])
def test_first_step_compiles_without_graph_break(adaptive):
    x, y, W, b, wa, _ = make_problem(17)
    Wp, bp = params_of(W, b)
    opt = BSAM([Wp, bp], torch.optim.SGD, rho=0.2, adaptive=adaptive, adaptive_eta=0.05, lr=0.1)
    loss_of(Wp, bp, x, y)(wa).backward()
    torch._dynamo.reset()
    torch.compile(opt.first_step, backend="eager", fullgraph=True)()      # a data-dependent branch would raise
    gW, gb = hand_grad(W, b, x, y, wa)
    eW, eb = hand_perturbation([W, b], [gW, gb], [0.2, 0.2], [adaptive, adaptive], eta=0.05)
    close(Wp.detach() - W, eW)
    close(bp.detach() - b, eb)
    opt.restore()
    assert torch.equal(Wp.detach(), W)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA sync debug mode needs CUDA")
def test_cuda_step_does_not_synchronise():
    x, y, W, b, wa, wd = (t.cuda() for t in make_problem(18))
    Wp, bp = params_of(W, b)
    opt = BSAM([Wp, bp], torch.optim.SGD, rho=0.2, adaptive=True, lr=0.1, momentum=0.9)
    loss_fn = loss_of(Wp, bp, x, y)
    bsam_step(opt, loss_fn, wa, wd)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        bsam_step(opt, loss_fn, wa, wd)
    finally:
        torch.cuda.set_sync_debug_mode(0)


# --------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------


def _p():
    return [torch.nn.Parameter(torch.ones(2))]


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(rho=-0.1), ValueError, "rho"),
    (dict(rho=float("nan")), ValueError, "rho"),
    (dict(rho=float("inf")), ValueError, "rho"),
    (dict(rho="0.1"), TypeError, "rho"),
    (dict(rho=True), TypeError, "rho"),
    (dict(adaptive=1), TypeError, "adaptive"),
    (dict(adaptive_eta=-1.0), ValueError, "adaptive_eta"),
])
def test_bad_options(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        BSAM(_p(), torch.optim.SGD, lr=0.1, **kwargs)


def test_bad_per_group_options():
    with pytest.raises(ValueError, match="rho"):
        BSAM([{"params": _p(), "rho": -1.0}], torch.optim.SGD, lr=0.1)
    with pytest.raises(TypeError, match="adaptive"):
        BSAM([{"params": _p(), "adaptive": "yes"}], torch.optim.SGD, lr=0.1)
    opt = BSAM(_p(), torch.optim.SGD, lr=0.1)
    opt.param_groups[0]["rho"] = -2.0               # edited after construction: caught at the next step
    opt.param_groups[0]["params"][0].grad = torch.ones(2)
    with pytest.raises(ValueError, match="rho"):
        opt.first_step()


@pytest.mark.parametrize("base", [None, "SGD", torch.nn.Linear, torch.nn.MSELoss(), lambda ps: None, BSAM])
def test_bad_base_optimizer(base):
    with pytest.raises(TypeError, match="base_optimizer"):
        BSAM(_p(), base, lr=0.1)


def test_bsam_instance_as_base_is_refused():
    inner = BSAM(_p(), torch.optim.SGD, lr=0.1)
    with pytest.raises(TypeError, match="base_optimizer"):
        BSAM(None, inner)


def test_instance_form_argument_errors():
    ps = _p()
    sgd = torch.optim.SGD(ps, lr=0.1)
    with pytest.raises(TypeError, match="base_kwargs"):
        BSAM(None, sgd, lr=0.2)
    with pytest.raises(ValueError, match="params"):
        BSAM(_p(), sgd)                              # other parameters
    with pytest.raises(ValueError, match="params"):
        BSAM([{"params": ps}], sgd)
    with pytest.raises(TypeError, match="params"):
        BSAM(None, torch.optim.SGD, lr=0.1)          # class form needs params
    with pytest.raises(ValueError, match="empty"):
        BSAM([], torch.optim.SGD, lr=0.1)


def test_step_without_closure_or_with_bad_closure():
    opt = BSAM(_p(), torch.optim.SGD, lr=0.1)
    with pytest.raises(TypeError, match="closure"):
        opt.step()
    with pytest.raises(TypeError, match="closure"):
        opt.step(3.0)
    scaler = torch.amp.GradScaler("cpu")
    p = opt.param_groups[0]["params"][0]
    scaler.scale(p.sum()).backward()
    with pytest.raises(TypeError, match="closure"):    # scaler.step(opt) is not the way: second_step(scaler=)
        scaler.step(opt)


def test_step_order_errors():
    opt = BSAM(_p(), torch.optim.SGD, lr=0.1)
    p = opt.param_groups[0]["params"][0]
    with pytest.raises(RuntimeError, match="without a preceding first_step"):
        opt.second_step()
    with pytest.raises(RuntimeError, match="without a preceding first_step"):
        opt.restore()
    p.grad = torch.ones(2)
    opt.first_step()
    with pytest.raises(RuntimeError, match="twice"):
        opt.first_step()
    opt.second_step()


def test_failing_closure_restores_the_weights():
    p = torch.nn.Parameter(torch.tensor([1.0, 2.0], dtype=D))
    opt = BSAM([p], torch.optim.SGD, lr=0.1)
    p.grad = torch.ones(2, dtype=D)

    def closure():
        raise KeyError("boom")
    with pytest.raises(KeyError):
        opt.step(closure)
    assert torch.equal(p.detach(), torch.tensor([1.0, 2.0], dtype=D))
    p.grad = torch.ones(2, dtype=D)
    opt.first_step()                                 # usable again
    opt.restore()


def test_bsam_step_argument_errors():
    p = torch.nn.Parameter(torch.ones(2, dtype=D))
    opt = BSAM([p], torch.optim.SGD, lr=0.1)
    with pytest.raises(TypeError, match="optimizer"):
        bsam_step(torch.optim.SGD([p], lr=0.1), lambda w: p.sum(), None, None)
    with pytest.raises(TypeError, match="loss_fn"):
        bsam_step(opt, "loss", None, None)
    with pytest.raises(TypeError, match="loss_fn"):
        bsam_step(opt, lambda w: 1.0, None, None)
    with pytest.raises(ValueError, match="loss_fn"):
        bsam_step(opt, lambda w: p * 2, None, None)
    calls = []

    def fails_in_descent(w):
        calls.append(w)
        if len(calls) == 2:
            raise RuntimeError("descent failed")
        return (p * p).sum()
    with pytest.raises(RuntimeError, match="descent failed"):
        bsam_step(opt, fails_in_descent, "a", "d")
    assert calls == ["a", "d"]                       # the weights are passed through untouched
    assert torch.equal(p.detach(), torch.ones(2, dtype=D))


def test_sparse_gradients_refused():
    emb = torch.nn.Embedding(5, 2, sparse=True).double()
    opt = BSAM(emb.parameters(), torch.optim.SGD, lr=0.1)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.first_step()
