"""TQE, Q-VDiT's token-aware quantization estimator (Q-VDiT §3.2 Eq. 7-8; qvdit.md §4)
(mpq_lightning/quant/tqe.py)."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from mpq_lightning.quant import QuantConfig, calibrate, parse_token_layout, quantize_model, set_quant_state
from mpq_lightning.quant.layers import LayerSpec, QuantConv2d, QuantLinear
from mpq_lightning.quant.tqe import TQE, frame_index

B, F, S, C, COUT = 2, 3, 4, 16, 12

# token layout → (input shape, frame index of every token position [as a tensor shaped like x[..., 0]])
LAYOUTS = {
    "(b f) s c": ((B * F, S, C), lambda: (torch.arange(B * F) % F).view(-1, 1).expand(B * F, S)),
    "(b s) f c": ((B * S, F, C), lambda: torch.arange(F).view(1, -1).expand(B * S, F)),
    "b (f s) c": ((B, F * S, C), lambda: (torch.arange(F * S) // S).view(1, -1).expand(B, F * S)),
}


def tqe_linear(layout: str, frame_scale: str = "all", kind: str = "spatial", a_bits: int | None = 8) -> QuantLinear:
    torch.manual_seed(0)
    spec = LayerSpec(w_bits=3, a_bits=a_bits, a_quantizer="dynamic_token", tqe=True, tqe_frame_scale=frame_scale,
                     extras={"layer_info": {"kind": kind, "token_layout": layout, "num_frames": F}})
    layer = QuantLinear.from_module(nn.Linear(C, COUT), spec)
    layer.weight_quantizer.initialize(layer.weight.detach())
    set_quant_state(layer, True, a_bits is not None)
    return layer


# ---------------------------------------------------------------------------------------------
# No-op at init
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("frame_scale", ["temporal", "all", "none"])
def test_noop_at_init_equals_tqe_off(frame_scale):
    torch.manual_seed(0)
    fp = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Flatten(1, -1), nn.Unflatten(1, (8, 16)),
                       nn.Linear(16, 12))
    x = torch.randn(F * 2, 3, 4, 4)
    info = {"0": {"kind": "spatial", "token_layout": "(b f) c h w", "num_frames": F},
            "3": {"kind": "temporal", "token_layout": "(b f) s c", "num_frames": F}}
    outs = []
    for tqe in (False, True):
        cfg = QuantConfig(w_bits=3, a_bits=6, a_quantizer="static", tqe=tqe, tqe_frame_scale=frame_scale, lora_rank=2)
        model = quantize_model(copy.deepcopy(fp), cfg, layer_info=info.get)
        assert ("tqe" in model[3].corrections) == tqe
        torch.manual_seed(1)  # the activation reservoir draws random numbers
        calibrate(model, lambda m: m(x))
        outs.append(model(x))
        set_quant_state(model, False, False)
        assert torch.equal(model(x), fp(x))  # FP mode ignores the correction
    assert torch.equal(outs[0], outs[1])


# ---------------------------------------------------------------------------------------------
# Per-frame scale locality
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("frame_scale,kind", [("all", "spatial"), ("temporal", "temporal")])
def test_frame_scale_only_affects_its_frame(layout, frame_scale, kind):
    layer = tqe_linear(layout, frame_scale, kind)
    tqe = layer.corrections["tqe"]
    with torch.no_grad():
        tqe.beta.normal_()
    shape, frames = LAYOUTS[layout]
    x = torch.randn(shape)
    y0 = layer(x).detach()
    target = 1
    with torch.no_grad():
        tqe.m[target] += 0.5
    changed = (layer(x).detach() - y0).abs().amax(-1) > 0  # per token
    assert torch.equal(changed, frames() == target)


def test_frame_index_layouts():
    for layout, (shape, frames) in LAYOUTS.items():
        axis, idx = frame_index(parse_token_layout(layout), shape, F)
        ref = frames()
        assert torch.equal(idx, ref[:, 0] if axis == 0 else ref[0, :])


def test_release_and_paper_factors():
    """release: (1 + m) on temporal layers (m = 1 → 2×); paper: m (= 1 → plain branch); none: 1."""
    x = torch.randn(B * S, F, C)
    outs = {}
    for mode, kind in (("none", "temporal"), ("temporal", "temporal"), ("all", "temporal"), ("temporal", "spatial")):
        layer = tqe_linear("(b s) f c", mode, kind, a_bits=None)
        with torch.no_grad():
            layer.corrections["tqe"].beta.copy_(torch.linspace(-1, 1, COUT * 1).view(COUT, 1))
            base = layer._op(x, layer.quantized_weight(), layer.bias)
            outs[mode, kind] = layer(x) - base
        assert hasattr(layer.corrections["tqe"], "m") == ((mode, kind) in {("temporal", "temporal"), ("all", "temporal")})
    torch.testing.assert_close(outs["temporal", "temporal"], 2 * outs["none", "temporal"])
    torch.testing.assert_close(outs["all", "temporal"], outs["none", "temporal"])
    torch.testing.assert_close(outs["temporal", "spatial"], outs["none", "temporal"])


# ---------------------------------------------------------------------------------------------
# Gradients, conv layers, rank
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("frame_scale,kind", [("all", "spatial"), ("temporal", "temporal")])
def test_gradients_reach_alpha_beta_m(frame_scale, kind):
    layer = tqe_linear("(b f) s c", frame_scale, kind)
    tqe = layer.corrections["tqe"]
    x = torch.randn(B * F, S, C)
    layer(x).pow(2).sum().backward()
    assert tqe.beta.grad.abs().sum() > 0  # β = 0 at init: only β gets a gradient (as LoRA's B)
    assert tqe.alpha.grad.abs().sum() == 0 and tqe.m.grad.abs().sum() == 0
    with torch.no_grad():
        tqe.beta.normal_()
    tqe.zero_grad()
    layer(x).pow(2).sum().backward()
    for p in (tqe.alpha, tqe.beta, tqe.m):
        assert p.grad is not None and p.grad.abs().sum() > 0


@pytest.mark.parametrize("groups", [1, 2])
def test_conv_tqe_matches_dense_rank_r_weight(groups):
    torch.manual_seed(0)
    spec = LayerSpec(w_bits=3, tqe=True, tqe_rank=2, tqe_frame_scale="all",
                     extras={"layer_info": {"token_layout": "(b f) c h w", "num_frames": F}})
    layer = QuantConv2d.from_module(nn.Conv2d(4, 6, 3, padding=1, stride=2, groups=groups), spec)
    layer.weight_quantizer.initialize(layer.weight.detach())
    set_quant_state(layer, True, False)
    tqe = layer.corrections["tqe"]
    with torch.no_grad():
        tqe.beta.normal_()
        tqe.m.copy_(torch.tensor([0.5, 2.0, -1.0]))
    x = torch.randn(B * F, 4, 7, 7)
    with torch.no_grad():
        dense = layer._op(x, tqe.weight_delta(), None)
        g = tqe.m[torch.arange(B * F) % F].view(-1, 1, 1, 1)
        torch.testing.assert_close(tqe(x, layer), dense * g, rtol=1e-5, atol=1e-5)


def test_layer_info_plumbing_and_validation():
    torch.manual_seed(0)
    fp = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    info = {"0": {"kind": "temporal", "token_layout": "(b s) f c", "num_frames": 4}, "1": {"kind": "mlp"}}
    model = quantize_model(copy.deepcopy(fp), QuantConfig(tqe=True, tqe_rank=2), layer_info=info.get)
    assert model[0].corrections["tqe"].m.shape == (4,) and not hasattr(model[1].corrections["tqe"], "m")
    assert model[0].corrections["tqe"].alpha.shape == (2, 8)
    with pytest.raises(ValueError, match="layer_info"):
        quantize_model(copy.deepcopy(fp), QuantConfig(tqe=True), layer_info=lambda n: {"frames": 4})
    with pytest.raises(ValueError, match="'f' axis"):
        quantize_model(copy.deepcopy(fp), QuantConfig(tqe=True), layer_info=lambda n: {"kind": "temporal", "token_layout": "b s c"})
    with pytest.raises(ValueError, match="tqe_frame_scale"):
        QuantConfig(tqe_frame_scale="frames")
    with pytest.raises(ValueError, match="tqe_rank"):
        QuantConfig(tqe_rank=0)
    with pytest.raises(ValueError, match="channel"):
        parse_token_layout("(b f) s")
    state = model[0].corrections["tqe"].export_state()
    assert state["frame_mode"] == "release" and state["frame_scale"].shape == (4,)


def test_tqe_rank_limit():
    with pytest.raises(ValueError, match="tqe_rank"):
        TQE((4, 3), rank=4)


def test_autocast_output_dtype_not_promoted():
    x = torch.randn(B * F, S, C)
    dtypes = []
    for tqe in (False, True):
        layer = tqe_linear("(b f) s c", "all")
        if not tqe:
            del layer.corrections["tqe"]
        with torch.autocast("cpu", torch.bfloat16):
            dtypes.append(layer(x).dtype)
    assert dtypes == [torch.bfloat16, torch.bfloat16]


@pytest.mark.parametrize("conv", [False, True])
def test_folded_tqe_equals_the_branch(conv):
    """Without a frame factor the fp32 forward adds βα to the quantized weight instead of running the
    branch on the activations: same output and same gradients as ``op(xq, Q(W)) + tqe(xq)``."""
    torch.manual_seed(0)
    spec = LayerSpec(w_bits=3, a_bits=8, a_quantizer="dynamic_token", tqe=True, tqe_rank=2, tqe_frame_scale="none")
    if conv:
        layer = QuantConv2d.from_module(nn.Conv2d(4, 6, 3, padding=1), spec)
        x = torch.randn(2, 4, 5, 5)
    else:
        layer = QuantLinear.from_module(nn.Linear(C, COUT), spec)
        x = torch.randn(B, S, C)
    layer.weight_quantizer.initialize(layer.weight.detach())
    set_quant_state(layer, True, True)
    tqe = layer.corrections["tqe"]
    assert tqe.foldable
    with torch.no_grad():
        tqe.beta.normal_()
    layer(x).pow(2).sum().backward()
    folded = [p.grad.clone() for p in (tqe.alpha, tqe.beta)]
    tqe.zero_grad()
    xq = layer.act_quantizer(x)
    reference = layer._op(xq, layer.quantized_weight(), layer.bias) + tqe(xq, layer)
    torch.testing.assert_close(layer(x), reference, rtol=1e-5, atol=1e-5)
    reference.pow(2).sum().backward()
    for a, b in zip(folded, (tqe.alpha.grad, tqe.beta.grad)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_tqe_branch_acts_on_the_quantized_input():
    """Q-VDiT Eq. 7-8: the correction is ``Q(X) αᵀ βᵀ`` on the *quantized* activation (spatial layer,
    no frame factor): the layer output is ``Q(X) Q(W)ᵀ + b + Q(X) αᵀ βᵀ``, and differs from the
    same branch applied to the FP input."""
    layer = tqe_linear("b (f s) c", "none", "spatial", a_bits=4)
    tqe = layer.corrections["tqe"]
    with torch.no_grad():
        tqe.alpha.copy_(torch.linspace(-1, 1, tqe.alpha.numel()).view_as(tqe.alpha))
        tqe.beta.copy_(torch.linspace(-0.5, 0.5, COUT).view(COUT, 1))
        x = torch.randn(B, F * S, C) * 3
        xq = layer.act_quantizer(x)
        assert not torch.allclose(xq, x)  # 4-bit activations: Q(X) ≠ X
        alpha, beta = tqe.alpha.view(1, C), tqe.beta.view(COUT, 1)
        want = xq @ layer.quantized_weight().T + layer.bias + (xq @ alpha.T) @ beta.T
        torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)
        on_fp = xq @ layer.quantized_weight().T + layer.bias + (x @ alpha.T) @ beta.T
        assert not torch.allclose(layer(x), on_fp, rtol=1e-3, atol=1e-3)
