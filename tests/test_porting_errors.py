"""Porting from jiawei-ren/BalancedMSE to the mainline API: the published argument orders and input forms
raise a TypeError that says what was expected and names the compat equivalent; the int64 bucket centres
of the published ``get_bucket_info`` are accepted (cast to the prediction's dtype)."""
from __future__ import annotations

import pathlib

import numpy as np
import pytest
import torch

import imbreg_fast
import imbreg_fast.functional as F
import imbreg_fast.nn as inn
from conftest import backend_params

COMPAT = "imbreg_fast.compat.balanced_mse"
GMM_DICT = {"means": np.array([[-1.0], [0.5], [2.0]]), "variances": np.array([[[0.3]], [[0.5]], [[0.2]]]),
            "weights": np.array([0.2, 0.5, 0.3])}
GMM_TUPLE = (torch.tensor([0.2, 0.5, 0.3]), torch.tensor([[-1.0], [0.5], [2.0]]),
             torch.tensor([[[0.3]], [[0.5]], [[0.2]]]))
CENTERS = np.array([18, 19, 21, 22, 23, 25], dtype=np.int64)           # get_bucket_info of the age datasets
WEIGHTS = np.array([3.0, 7.0, 12.0, 20.0, 9.0, 4.0]) / 55.0


def _pred_target():
    return torch.randn(6, 1), torch.randn(6, 1)


PUBLISHED_CALLS = {
    # name: (call, a fragment of the expected mainline call, the compat name)
    "GAILoss(2.0, 'gmm.pkl')": (lambda: inn.GAILoss(2.0, "gmm.pkl"), "GAILoss(gmm, init_noise_sigma=2)",
                                f"{COMPAT}.GAILoss"),
    "GAILoss(2.0, dict)": (lambda: inn.GAILoss(2.0, GMM_DICT), "GAILoss(gmm, init_noise_sigma=2)", f"{COMPAT}.GAILoss"),
    "GAILoss(2.0, tuple)": (lambda: inn.GAILoss(2.0, GMM_TUPLE), "GAILoss(gmm, init_noise_sigma=2)",
                            f"{COMPAT}.GAILoss"),
    "GAILoss(tensor, tuple)": (lambda: inn.GAILoss(torch.tensor(2.0), GMM_TUPLE), "GAILoss(gmm, init_noise_sigma=2)",
                               f"{COMPAT}.GAILoss"),
    "GAILoss(np.float64, path)": (lambda: inn.GAILoss(np.float64(1.5), "gmm.pkl"), "GAILoss(gmm, init_noise_sigma=1.5)",
                                  f"{COMPAT}.GAILoss"),
    "GAILoss(init_noise_sigma=, gmm=path)": (lambda: inn.GAILoss(init_noise_sigma=2.0, gmm="gmm.pkl"),
                                             "(weights [K], means [K, d], covariances [K, d, d]) tensors",
                                             f"{COMPAT}.GAILoss"),
    "GAILoss(Path)": (lambda: inn.GAILoss(pathlib.Path("gmm.pkl")), "got a path ('gmm.pkl')", f"{COMPAT}.GAILoss"),
    "GAILoss(dict)": (lambda: inn.GAILoss(GMM_DICT), "got a dict", f"{COMPAT}.GAILoss"),
    "BNILoss(1.0, numpy centres, weights)": (lambda: inn.BNILoss(1.0, CENTERS, WEIGHTS),
                                             "BNILoss(bucket_centers, bucket_weights, init_noise_sigma=1)",
                                             f"{COMPAT}.BNILoss"),
    "BNILoss(1.0, tensor centres, weights)": (lambda: inn.BNILoss(1.0, torch.tensor(CENTERS), torch.tensor(WEIGHTS)),
                                              "BNILoss(bucket_centers, bucket_weights, init_noise_sigma=1)",
                                              f"{COMPAT}.BNILoss"),
    "gai_loss(pred, target, gmm_dict, noise_var)": (lambda: F.gai_loss(*_pred_target(), GMM_DICT, torch.tensor(0.5)),
                                                    "gai_loss(pred, target, noise_var, gmm)", f"{COMPAT}.gai_loss"),
    "gai_loss(pred, target, gmm_tuple, noise_var)": (lambda: F.gai_loss(*_pred_target(), GMM_TUPLE, 0.5),
                                                     "noise_var comes before gmm", f"{COMPAT}.gai_loss"),
    "gai_loss(pred, target, noise_var, gmm_dict)": (lambda: F.gai_loss(*_pred_target(), 0.5, GMM_DICT),
                                                    "torch.as_tensor(g['variances'])", f"{COMPAT}.gai_loss"),
    "gai_loss(pred, target, noise_var, path)": (lambda: F.gai_loss(*_pred_target(), 0.5, "gmm.pkl"),
                                                "got a path ('gmm.pkl')", f"{COMPAT}.gai_loss"),
    "bni_loss(..., numpy centres, numpy weights)": (lambda: F.bni_loss(*_pred_target(), 0.5, CENTERS, WEIGHTS),
                                                    "torch.as_tensor(bin_centers", f"{COMPAT}.bni_loss"),
    "bni_loss(..., tensor centres, list weights)": (lambda: F.bni_loss(*_pred_target(), 0.5, torch.tensor(CENTERS),
                                                                       WEIGHTS.tolist()),
                                                    "bin_weights must be a torch.Tensor", f"{COMPAT}.bni_loss"),
}


class TestPublishedOrders:
    @pytest.mark.parametrize("name", PUBLISHED_CALLS)
    def test_type_error_names_the_expected_call_and_the_compat_name(self, name):
        call, expected, compat = PUBLISHED_CALLS[name]
        with pytest.raises(TypeError) as info:
            call()
        message = str(info.value)
        assert expected in message, message
        assert compat in message, message

    def test_mainline_orders_still_work(self):
        labels = torch.randn(200)
        pred, target = torch.randn(6, 1), torch.randn(6, 1)
        for module in (inn.GAILoss(imbreg_fast.fit_gmm(labels, 2, seed=0)), inn.GAILoss(GMM_TUPLE, 2.0),
                       inn.GAILoss(list(GMM_TUPLE), init_noise_sigma=0.5),
                       inn.BNILoss(torch.tensor([0.5]), torch.tensor([1.0]))):
            assert torch.isfinite(module(pred, target))
        assert torch.isfinite(F.gai_loss(pred, target, 0.5, GMM_TUPLE))
        for module in (inn.BNILoss(torch.tensor(CENTERS, dtype=torch.float32), torch.tensor(WEIGHTS), 0.5),
                       inn.BNILoss(CENTERS, WEIGHTS)):
            assert torch.isfinite(module(pred + 21.0, target + 21.0))

    def test_gmm_of_the_wrong_length(self):
        with pytest.raises(TypeError, match="gmm must be \\(weights \\[K\\], means \\[K, d\\], covariances"):
            inn.GAILoss(GMM_TUPLE[:2])
        with pytest.raises(TypeError, match="gmm must be .* got object"):
            inn.GAILoss(object())


# ----------------------------------------------------------------------------------------------------
# Integer bin centres
# ----------------------------------------------------------------------------------------------------


def _bni_params():
    out = []
    for p in backend_params("bni_loss", ("imbreg_fast::mixture_nll_fwd",)):
        for dtype in (torch.float64, torch.float32):
            out.append(pytest.param(p.values[0], dtype, marks=p.marks, id=f"{p.id}-{str(dtype)[6:]}"))
    return out


class TestIntegerCenters:
    @pytest.mark.parametrize("backend,dtype", _bni_params())
    @pytest.mark.parametrize("d,layout", [(1, "[K]"), (1, "[K, 1]"), (2, "[K, d]")])
    def test_equal_to_float_centres(self, backend, dtype, d, layout):
        """bni_loss with int64 (and int32) centres = with the same centres as floats: loss and gradients."""
        k = len(CENTERS)
        ints = torch.as_tensor(CENTERS)
        if d == 2:
            ints = torch.stack([ints, ints.flip(0) - 3], dim=1)
        elif layout == "[K, 1]":
            ints = ints.reshape(k, 1)
        weights = torch.as_tensor(WEIGHTS, dtype=dtype)
        target = 21.0 + 2.0 * torch.randn(7, d, dtype=dtype)
        pred0 = target + 0.5 * torch.randn(7, d, dtype=dtype)
        results = []
        for centers in (ints, ints.to(torch.int32), ints.to(dtype)):
            pred = pred0.clone().requires_grad_()
            sigma = torch.tensor(1.3, dtype=dtype, requires_grad=True)
            loss = F.bni_loss(pred, target, sigma ** 2, centers, weights, backend=backend)
            assert loss.dtype == dtype
            results.append((loss.detach(), *torch.autograd.grad(loss, (pred, sigma))))
        for other in results[:2]:
            for a, b in zip(other, results[2]):
                assert torch.equal(a, b)

    @pytest.mark.parametrize("backend,dtype", _bni_params())
    def test_module_keeps_int_centres_and_matches_float(self, backend, dtype):
        ints = inn.BNILoss(CENTERS, WEIGHTS, 0.9, backend=backend)          # numpy int64 / float64, as published
        floats = inn.BNILoss(torch.tensor(CENTERS, dtype=torch.float64), torch.tensor(WEIGHTS), 0.9, backend=backend)
        assert ints.bin_centers.dtype == torch.int64
        if dtype == torch.float64:
            ints, floats = ints.double(), floats.double()
            assert ints.bin_centers.dtype == torch.int64 and ints.noise_sigma.dtype == torch.float64
        target = 21.0 + 2.0 * torch.randn(5, dtype=dtype)
        pred = target + 0.5 * torch.randn(5, dtype=dtype)
        assert torch.equal(ints(pred, target), floats(pred, target))

    def test_bool_centres_refused(self):
        with pytest.raises(TypeError, match="bin_centers must hold real numbers"):
            F.bni_loss(torch.randn(4), torch.randn(4), 0.5, torch.tensor([True, False]), torch.tensor([0.5, 0.5]))
