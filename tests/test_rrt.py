"""imbreg_fast.rrt.freeze_for_retraining: what is frozen, what is re-initialised, what BatchNorm does, errors."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from imbreg_fast.rrt import BATCHNORM_MODES, freeze_for_retraining, frozen_normalization_layers


class Net(nn.Module):
    def __init__(self, head_bn: bool = False):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 8))
        layers = [nn.Linear(8, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 1)] if head_bn else [nn.Linear(8, 1)]
        self.head = nn.Sequential(*layers)

    def forward(self, x):
        return self.head(self.encoder(x))


def _trained_net(head_bn=False, seed=0):
    torch.manual_seed(seed)
    net = Net(head_bn)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for _ in range(3):                                   # stage one: move every parameter and BN statistic
        x = torch.randn(16, 4)
        loss = (net(x) - x.sum(1, keepdim=True)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net


def _snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _train_steps(net, params, steps=5):
    opt = torch.optim.Adam(params, lr=1e-2)
    for _ in range(steps):
        net.train()
        x = torch.randn(16, 4)
        loss = (net(x) - 3.0).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_returns_the_head_parameters_and_freezes_the_rest():
    net = _trained_net()
    params = freeze_for_retraining(net, net.head)
    assert [id(p) for p in params] == [id(p) for p in net.head.parameters()]
    assert all(p.requires_grad for p in net.head.parameters())
    assert not any(p.requires_grad for p in net.encoder.parameters())


def test_frozen_parameters_and_statistics_unchanged_after_training_steps():
    net = _trained_net()
    params = freeze_for_retraining(net, net.head)
    encoder_before = _snapshot(net.encoder)
    head_before = _snapshot(net.head)
    _train_steps(net, params)
    for k, v in net.encoder.state_dict().items():
        assert torch.equal(v, encoder_before[k]), k          # weights and BN running stats (eval mode)
    assert any(not torch.equal(v, head_before[k]) for k, v in net.head.state_dict().items())


def test_head_is_reinitialised_as_a_fresh_layer():
    net = _trained_net()
    stage_one = net.head[0].weight.detach().clone()
    torch.manual_seed(123)
    freeze_for_retraining(net, net.head)
    torch.manual_seed(123)
    fresh = nn.Linear(8, 1)
    assert not torch.equal(net.head[0].weight, stage_one)
    assert torch.equal(net.head[0].weight, fresh.weight)
    assert torch.equal(net.head[0].bias, fresh.bias)


def test_reinit_false_keeps_the_stage_one_head():
    net = _trained_net()
    before = _snapshot(net.head)
    freeze_for_retraining(net, net.head, reinit=False)
    for k, v in net.head.state_dict().items():
        assert torch.equal(v, before[k])


def test_default_batchnorm_eval_holds_encoder_bn_in_eval_mode():
    net = _trained_net()
    freeze_for_retraining(net, net.head)
    bn = net.encoder[1]
    assert frozen_normalization_layers(net) == [bn]
    net.train()                                            # what a training loop does every epoch
    x = torch.randn(16, 4)
    out_train = net.encoder(x)
    assert not bn.training                                 # the pre-hook put it back
    net.eval()
    assert torch.equal(out_train, net.encoder(x))          # the encoder is one fixed function


def test_batchnorm_train_follows_the_published_behaviour():
    net = _trained_net()
    freeze_for_retraining(net, net.head, batchnorm="train")
    bn = net.encoder[1]
    assert frozen_normalization_layers(net) == []
    before = bn.running_mean.clone()
    net.train()
    net(torch.randn(16, 4) + 5.0)
    assert bn.training
    assert not torch.equal(bn.running_mean, before)        # running stats keep updating, as published
    assert not bn.weight.requires_grad                     # but its affine parameters stay frozen


def test_batchnorm_in_the_head_is_trained_normally():
    net = _trained_net(head_bn=True)
    params = freeze_for_retraining(net, net.head)
    head_bn = net.head[1]
    assert any(p is head_bn.weight for p in params)
    before = head_bn.running_mean.clone()                  # reset to 0 by the re-initialisation
    net.train()
    net(torch.randn(16, 4))
    assert head_bn.training
    assert not torch.equal(head_bn.running_mean, before)


def test_calling_twice_adds_no_duplicate_hook_and_train_removes_them():
    net = _trained_net()
    freeze_for_retraining(net, net.head)
    freeze_for_retraining(net, net.head, reinit=False)
    bn = net.encoder[1]
    assert len(bn._forward_pre_hooks) == 1
    freeze_for_retraining(net, net.head, reinit=False, batchnorm="train")
    assert len(bn._forward_pre_hooks) == 0


def test_deepcopy_keeps_the_frozen_behaviour():
    net = _trained_net()
    freeze_for_retraining(net, net.head)
    clone = copy.deepcopy(net)
    clone.train()
    clone(torch.randn(4, 4))
    assert not clone.encoder[1].training
    assert not any(p.requires_grad for p in clone.encoder.parameters())


def test_errors():
    net = _trained_net()
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        freeze_for_retraining("net", net.head)
    with pytest.raises(TypeError, match="head must be a torch.nn.Module"):
        freeze_for_retraining(net, [net.head])
    with pytest.raises(ValueError, match="not a submodule of model"):
        freeze_for_retraining(net, nn.Linear(8, 1))
    with pytest.raises(ValueError, match="whole model"):
        freeze_for_retraining(net, net)
    with pytest.raises(ValueError, match="batchnorm must be one of"):
        freeze_for_retraining(net, net.head, batchnorm="frozen")
    with pytest.raises(TypeError, match="reinit must be a bool"):
        freeze_for_retraining(net, net.head, reinit=1)
    assert BATCHNORM_MODES == ("eval", "train")

    empty = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    with pytest.raises(ValueError, match="no parameters"):
        freeze_for_retraining(empty, empty[1])

    tied = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    tied[1].weight = tied[0].weight
    with pytest.raises(ValueError, match="tied"):
        freeze_for_retraining(tied, tied[1])


class _RawHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x):
        return x * self.scale


def test_head_without_reset_parameters():
    net = nn.Sequential(nn.Linear(2, 2), _RawHead())
    with pytest.raises(ValueError, match=r"cannot re-initialise head parameters \['scale'\]"):
        freeze_for_retraining(net, net[1])
    assert all(p.requires_grad for p in net.parameters())          # nothing changed on error
    params = freeze_for_retraining(net, net[1], reinit=False)
    assert params == [net[1].scale]
    assert not net[0].weight.requires_grad
