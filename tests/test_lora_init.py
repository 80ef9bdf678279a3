"""OOLRI (MPQ-DMv2; mpqdm.md §4.2, papers_extra.md §1.1) and the calibration-input statistics
(mpq_lightning/quant/lora_init.py)."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from mpq_lightning.quant import QuantConfig, calibrate, oolri_init, quantize_model, set_quant_state
from mpq_lightning.quant.layers import LayerSpec, QuantConv2d, QuantLinear
from mpq_lightning.quant.lora_init import InputStats, oolri_init_layer, prior_quantized_weight, svd_factors

# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def correlated(n: int, d: int, seed: int = 0) -> torch.Tensor:
    """Inputs with a strongly non-isotropic, correlated covariance."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) * torch.logspace(0, -2, d).unsqueeze(1)
    return torch.randn(n, d, generator=g) @ mix + 0.3 * torch.randn(1, d, generator=g)


def make_layer(kind: str, param: str = "efficientdm", rank: int = 4, init: str = "svd_weight_error",
               placement: str = "merged", quantized_base: bool = True, smooth: bool = True):
    torch.manual_seed(0)
    if kind == "linear":
        mod = nn.Linear(40, 36)
        x = correlated(256, 40)
        cls = QuantLinear
    else:
        mod = nn.Conv2d(6, 20, 3, padding=1)
        x = correlated(8 * 49, 6).view(8, 7, 7, 6).permute(0, 3, 1, 2).contiguous()
        cls = QuantConv2d
    spec = LayerSpec(w_bits=2, lora_rank=rank, lora_init=init, lora_param=param, lora_placement=placement,
                     lora_quantized_base=quantized_base, smooth_alpha=0.5 if smooth else None)
    layer = cls.from_module(mod, spec)
    if smooth:
        layer.smooth_scale.copy_(torch.rand_like(layer.smooth_scale) + 0.5)
    ws = layer._scale_weight(layer.weight, layer.smooth_scale) if smooth else layer.weight
    layer.weight_quantizer.initialize(ws.detach())
    stats = InputStats.for_layer(layer, max_rows=4096)
    stats.observe(layer, x)
    return layer, mod, x, stats


def truncation_error(e: torch.Tensor, r: int) -> float:
    s = torch.linalg.svdvals(e.detach().double())
    return float(s[..., r:].pow(2).sum().sqrt())


def output_error(layer, x, w_hat) -> float:
    """‖op(X, W - Ŵ)‖_F (bias cancels)."""
    with torch.no_grad():
        return float(layer._op(x, (layer.weight - w_hat).float(), None).norm())


# ---------------------------------------------------------------------------------------------
# Eckart–Young: weight-space target
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind,param", [("linear", "efficientdm"), ("conv", "efficientdm"), ("conv", "per_position")])
def test_weight_error_init_is_rank_r_truncation(kind, param):
    layer, _, _, stats = make_layer(kind, param)
    q = prior_quantized_weight(layer)
    e = (layer.weight - q).detach()
    oolri_init_layer(layer, stats=stats)
    torch.testing.assert_close(layer.base_weight, q)  # frozen quantized base, weight space (⊘ s)
    resid = float((layer.weight - (layer.base_weight + layer.lora.delta())).detach().norm())
    r = layer.lora.rank
    if param == "efficientdm":
        expect = truncation_error(e.reshape(e.shape[0], -1), r)
    else:  # one SVD per kernel position
        expect = truncation_error(e.flatten(2).permute(2, 0, 1), r)
    assert resid == pytest.approx(expect, rel=1e-4, abs=1e-7)
    assert resid < float(e.norm())


def test_fp_branch_placement_targets_the_same_error():
    layer, _, x, stats = make_layer("linear", placement="fp_branch", quantized_base=False)
    q = prior_quantized_weight(layer)
    oolri_init_layer(layer, stats=stats)
    assert layer.base_weight is None
    resid = float((layer.weight - (q + layer.lora.delta())).detach().norm())
    assert resid == pytest.approx(truncation_error(layer.weight - q, layer.lora.rank), rel=1e-4)
    # the forward is Q(W s) (X/s) + (B A) X: closer to the FP output than without the branch
    set_quant_state(layer, True, False)
    with torch.no_grad():
        y = layer(x)
        y_fp = nn.functional.linear(x, layer.weight, layer.bias)
        no_branch = layer._op(x / layer.smooth_scale, layer.quantized_weight(), layer.bias)
    assert (y - y_fp).norm() < (no_branch - y_fp).norm()


def test_per_position_rank_above_slice_limit_keeps_kaiming_zero_tail():
    torch.manual_seed(0)
    mod = nn.Conv2d(3, 8, 3, padding=1)
    layer = QuantConv2d.from_module(mod, LayerSpec(w_bits=2, lora_rank=5, lora_param="per_position",
                                                   lora_quantized_base=True, lora_init="svd_weight_error"))
    layer.weight_quantizer.initialize(layer.weight.detach())
    oolri_init_layer(layer)
    assert torch.equal(layer.lora.B[:, 3:], torch.zeros_like(layer.lora.B[:, 3:]))  # min(Cout, Cin) = 3 per slice
    e = layer.weight - layer.base_weight
    resid = float((e - layer.lora.delta()).detach().norm())
    assert resid == pytest.approx(0.0, abs=1e-5)  # full rank per slice: exact


# ---------------------------------------------------------------------------------------------
# Output-aware target
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind,param", [("linear", "efficientdm"), ("conv", "efficientdm"), ("conv", "per_position")])
def test_output_aware_beats_weight_space_on_correlated_inputs(kind, param):
    errs = {}
    for init in ("svd_weight_error", "svd_output_error"):
        layer, _, x, stats = make_layer(kind, param, init=init)
        oolri_init_layer(layer, stats=stats, damp=1e-4)
        errs[init] = output_error(layer, x, layer.base_weight + layer.lora.delta())
        errs["none"] = output_error(layer, x, layer.base_weight)
    assert errs["svd_output_error"] < errs["svd_weight_error"] < errs["none"], errs


def test_svd_factors_output_aware_is_optimal():
    """BA = SVD_r(E L) L⁻¹ attains the optimum ‖(E - BA) L‖ = truncation error of E L."""
    torch.manual_seed(0)
    e = torch.randn(12, 9, dtype=torch.float64)
    x = correlated(200, 9).double()
    h = x.T @ x
    b, a = svd_factors(e, 3, h, damp=0.0)
    chol = torch.linalg.cholesky(h)
    got = float(((e - b @ a) @ chol).norm())
    assert got == pytest.approx(truncation_error(e @ chol, 3), rel=1e-8)


# ---------------------------------------------------------------------------------------------
# Statistics and calibrate integration
# ---------------------------------------------------------------------------------------------


def test_input_stats_gram_and_reservoir_agree_when_reservoir_holds_everything():
    torch.manual_seed(0)
    layer = QuantLinear.from_module(nn.Linear(64, 10), LayerSpec(w_bits=3))
    x = torch.randn(40, 64)
    gram = InputStats.for_layer(layer, max_rows=64)
    rows = InputStats.for_layer(layer, max_rows=48)  # d = 64 > 48: reservoir mode, keeps all 40 rows
    assert gram.mode == "gram" and rows.mode == "rows"
    for st in (gram, rows):
        st.observe(layer, x[:25])
        st.observe(layer, x[25:])
    d = torch.randn(10, 64)
    torch.testing.assert_close(gram.row_errors(d), rows.row_errors(d))
    expect = (x.double() @ d.double().T).pow(2).mean(0)
    torch.testing.assert_close(gram.row_errors(d), expect, rtol=1e-5, atol=1e-6)
    small = InputStats.for_layer(layer, max_rows=16)
    small.observe(layer, x)
    assert small._rows.shape[0] == 16


def model_and_data():
    torch.manual_seed(0)
    fp = nn.Sequential(nn.Conv2d(4, 16, 3, padding=1), nn.SiLU(), nn.Flatten(), nn.Linear(16 * 4 * 4, 24))
    return fp, torch.randn(16, 4, 4, 4)


@pytest.mark.parametrize("lora_param", ["efficientdm", "per_position"])
def test_calibrate_runs_oolri_automatically_or_explicitly(lora_param):
    fp, x = model_and_data()
    cfg = QuantConfig(w_bits=2, a_bits=None, lora_rank=3, lora_init="svd_output_error", lora_param=lora_param,
                      lora_quantized_base=True, smooth_alpha=0.5, w_quantizer="omq")
    auto = quantize_model(copy.deepcopy(fp), cfg)
    calibrate(auto, lambda m: m(x))
    explicit = quantize_model(copy.deepcopy(fp), cfg)
    calibrate(explicit, lambda m: m(x), lora_init=oolri_init)
    for a, b in zip(auto.state_dict().values(), explicit.state_dict().values()):
        assert torch.equal(a, b)
    assert auto[0].lora.B.abs().sum() > 0 and auto[3].lora.B.abs().sum() > 0


@pytest.mark.parametrize("w_quantizer", ["uniform", "fzrmq"])
def test_oolri_refit_fits_the_quantizer_on_the_new_latent_weight(w_quantizer):
    """``oolri_refit_quantizer``: after OOLRI the weight quantizer is fitted again on ``(Q(W) + BA)·s``
    (the channel classes kept), so it equals a copy re-fitted by hand; without it the quantizer
    keeps its fit on ``W·s``."""
    fp, x = model_and_data()
    states = {}
    for refit in (False, True):
        cfg = QuantConfig(w_bits=2, a_bits=None, lora_rank=3, lora_init="svd_weight_error", lora_quantized_base=True,
                          oolri_refit_quantizer=refit, w_quantizer=w_quantizer)
        model = quantize_model(copy.deepcopy(fp), cfg)
        calibrate(model, lambda m: m(x))
        assert torch.isfinite(model(x)).all()
        layer = model[0]
        states[refit] = {k: v.clone() for k, v in layer.weight_quantizer.state_dict().items()}
        if refit:
            by_hand = copy.deepcopy(layer.weight_quantizer)
            lat = layer.latent_weight().detach().float()
            by_hand.refit(lat) if hasattr(by_hand, "refit") else by_hand.initialize(lat)
            for k, v in by_hand.state_dict().items():
                torch.testing.assert_close(states[True][k], v, rtol=0, atol=0, msg=k)
    assert any(not torch.equal(states[False][k], states[True][k]) for k in states[True])


def test_oolri_output_init_outside_calibrate_errors():
    fp, x = model_and_data()
    cfg = QuantConfig(w_bits=2, a_bits=None, lora_rank=3, lora_init="svd_output_error", lora_quantized_base=True)
    model = quantize_model(copy.deepcopy(fp), cfg)
    calibrate(model, lambda m: m(x), lora_init=lambda m: None)
    with pytest.raises(RuntimeError, match="calibrate"):
        oolri_init(model)  # no statistics outside calibrate


def test_svd_init_needs_quantized_base_or_fp_branch():
    with pytest.raises(ValueError, match="lora_quantized_base"):
        QuantConfig(lora_rank=4, lora_init="svd_weight_error")
    QuantConfig(lora_rank=4, lora_init="svd_weight_error", lora_placement="fp_branch")
    QuantConfig(lora_rank=4, lora_init="svd_output_error", lora_quantized_base=True)
