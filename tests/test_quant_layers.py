"""Quantized layers: from_module / to_module, LoRA merged before the quantizer, mode switches."""
import copy

import pytest
import torch
from torch import nn

from mpq_lightning.quant import LayerSpec, LoRA, QuantConv2d, QuantConv3d, QuantLinear, fake_quantize


def _spec(**kw):
    base = dict(w_bits=4, a_bits=8, a_quantizer="dynamic_token", lora_rank=2, w_init="minmax")
    base.update(kw)
    return LayerSpec(**base)


@pytest.mark.parametrize(
    "module,cls,x",
    [
        (nn.Linear(6, 5), QuantLinear, torch.randn(3, 6)),
        (nn.Conv2d(4, 6, 3, padding=1, stride=2), QuantConv2d, torch.randn(2, 4, 7, 7)),
        (nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect"), QuantConv2d, torch.randn(2, 4, 5, 5)),
        (nn.Conv3d(2, 3, (1, 3, 3), padding=(0, 1, 1)), QuantConv3d, torch.randn(2, 2, 3, 5, 5)),
    ],
)
def test_fp_mode_is_exact_and_roundtrip(module, cls, x):
    q = cls.from_module(module, _spec())
    assert not q.weight.requires_grad
    assert torch.equal(q(x), module(x))  # quant off, LoRA B = 0
    back = q.to_module()
    assert type(back) is type(module)
    assert torch.equal(back(x), module(x))


def test_weight_only_forward_formula():
    lin = nn.Linear(8, 4)
    q = QuantLinear.from_module(lin, _spec(lora_rank=0))
    q.weight_quantizer.initialize(q.weight)
    q.weight_quant, q.act_quant = True, False
    x = torch.randn(5, 8)
    wq = fake_quantize(lin.weight, q.weight_quantizer.scale, q.weight_quantizer.zero_point, 0, 15)
    assert torch.equal(q(x), nn.functional.linear(x, wq, lin.bias))


def test_lora_merged_before_quantizer():
    lin = nn.Linear(8, 4)
    q = QuantLinear.from_module(lin, _spec())
    q.weight_quantizer.initialize(q.weight)
    with torch.no_grad():
        q.lora.B.normal_()
    q.weight_quant, q.act_quant = True, False
    x = torch.randn(5, 8)
    w_lat = lin.weight + q.lora.B @ q.lora.A
    wq = fake_quantize(w_lat, q.weight_quantizer.scale, q.weight_quantizer.zero_point, 0, 15)
    torch.testing.assert_close(q(x), nn.functional.linear(x, wq, lin.bias), rtol=0, atol=1e-6)
    q(x).sum().backward()
    assert q.lora.A.grad.abs().sum() > 0 and q.lora.B.grad.abs().sum() > 0


def test_lora_fp_branch_outside_quantizer():
    lin = nn.Linear(8, 4)
    q = QuantLinear.from_module(lin, _spec(lora_placement="fp_branch"))
    q.weight_quantizer.initialize(q.weight)
    with torch.no_grad():
        q.lora.B.normal_()
    q.weight_quant = True
    x = torch.randn(5, 8)
    wq = fake_quantize(lin.weight, q.weight_quantizer.scale, q.weight_quantizer.zero_point, 0, 15)
    expected = nn.functional.linear(x, wq, lin.bias) + x @ (q.lora.B @ q.lora.A).T
    torch.testing.assert_close(q(x), expected, rtol=1e-6, atol=1e-6)


def test_conv_lora_parameterisations():
    w_shape = torch.Size([6, 4, 3, 3])
    a = LoRA(w_shape, 2, "efficientdm")
    with torch.no_grad():
        a.B.normal_()
    expected = torch.einsum("or,rikl->oikl", a.B, a.A)
    torch.testing.assert_close(a.delta(), expected)
    b = LoRA(w_shape, 2, "per_position")
    assert b.B.shape == (6, 2, 3, 3)
    with torch.no_grad():
        b.B.normal_()
    d = b.delta()
    torch.testing.assert_close(d[:, :, 1, 2], b.B[:, :, 1, 2] @ b.A[:, :, 1, 2])


def test_lora_rank_validation():
    with pytest.raises(ValueError, match="LoRA rank"):
        LoRA(torch.Size([4, 3]), 5)


def test_mode_switch_weight_act():
    lin = nn.Linear(16, 8)
    q = QuantLinear.from_module(lin, _spec(lora_rank=0, a_bits=4))
    q.weight_quantizer.initialize(q.weight)
    x = torch.randn(4, 16)
    fp = q(x)
    q.weight_quant = True
    w_only = q(x)
    q.act_quant = True
    wa = q(x)
    assert not torch.equal(fp, w_only) and not torch.equal(w_only, wa)
    q.weight_quant = q.act_quant = False
    assert torch.equal(q(x), fp)


def test_smoothing_is_equivalent_in_fp():
    """``(X / s) Q(W s)^T``: with quantization off exactly the FP layer; with weights quantized,
    exactly the smoothed formula (the quantizer sees ``W·s``, the input is divided by ``s``)."""
    lin = nn.Linear(8, 4)
    q = QuantLinear.from_module(lin, _spec(lora_rank=0, smooth_alpha=0.5, w_bits=8))
    s = torch.rand(8) + 0.5
    q.smooth_scale.copy_(s)
    x = torch.randn(3, 8)
    torch.testing.assert_close(q.quantized_weight(), lin.weight * s)  # quant off: the smoothed weight
    torch.testing.assert_close(q(x), lin(x))  # ... and the layer is the FP one
    q.weight_quantizer.initialize(q.quantized_weight().detach())  # fitted to W * s
    q.weight_quant = True
    want = torch.nn.functional.linear(x / s, q.weight_quantizer(lin.weight * s), lin.bias)
    torch.testing.assert_close(q(x), want)
    torch.testing.assert_close(q(x), lin(x), rtol=0, atol=0.05)  # 8 bits: close to FP


def test_bf16_autocast_quant_math_fp32():
    lin = nn.Linear(8, 4)
    q = QuantLinear.from_module(lin, _spec(lora_rank=0))
    q.weight_quantizer.initialize(q.weight)
    q.weight_quant = q.act_quant = True
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = q(torch.randn(2, 8))
        assert q.quantized_weight().dtype == torch.float32
    assert y.dtype == torch.bfloat16


def test_bf16_autocast_quantizes_the_fp32_lora_merged_weight():
    """In the merged placement ``W + B A`` is the weight quantizer's input: under 16-bit autocast
    ``B A`` stays fp32, so every weight lands in the same quantization bin as in an fp32 run."""
    torch.manual_seed(0)
    lin = nn.Linear(64, 64)
    q = QuantLinear.from_module(lin, _spec(lora_rank=8, w_bits=3))
    with torch.no_grad():
        q.lora.B.normal_(std=0.05)
    q.weight_quantizer.initialize(q.latent_weight().detach())
    q.weight_quant = True
    want = q.quantized_weight().detach()
    for dtype in (torch.bfloat16, torch.float16):
        with torch.autocast("cpu", dtype=dtype):
            assert q.lora.delta().dtype == torch.float32
            got = q.quantized_weight().detach()
        assert torch.equal(got, want), dtype


def test_deepcopy_and_state_dict_restore_strict():
    lin = nn.Linear(8, 4)
    q = QuantLinear.from_module(lin, _spec(w_granularity="group", w_group_size=4))
    q.weight_quantizer.initialize(q.weight)
    fresh = QuantLinear.from_module(copy.deepcopy(lin), _spec(w_granularity="group", w_group_size=4))
    fresh.load_state_dict(q.state_dict(), strict=True)
    assert torch.equal(fresh.weight_quantizer.scale, q.weight_quantizer.scale)


def test_oolri_base_weight_not_saved_and_recomputed_on_load():
    from mpq_lightning.quant import QuantConfig, calibrate, quantize_model

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 12), nn.Linear(12, 8))
    cfg = QuantConfig(w_bits=3, a_bits=None, lora_rank=2, lora_init="svd_weight_error", lora_quantized_base=True)
    q = quantize_model(copy.deepcopy(model), cfg)
    x = torch.randn(10, 16)
    calibrate(q, lambda m: m(x))
    sd = q.state_dict()
    assert not any(k.endswith("base_weight") for k in sd)  # recomputable: never stored
    assert all(v.numel() < 16 * 12 for k, v in sd.items() if not k.endswith(".weight"))
    fresh = quantize_model(copy.deepcopy(model), cfg)
    fresh.load_state_dict(sd)
    assert torch.equal(fresh[0].base_weight, q[0].base_weight)
    assert not torch.equal(q[0].base_weight, model[0].weight)  # it is Q(W), not W
    from mpq_lightning.quant import set_quant_state

    set_quant_state(fresh, True, False)
    assert torch.equal(fresh(x), q(x))


def test_cached_quantized_weights_reuse_and_invalidate():
    """Inside ``cached_quantized_weights`` no-grad forwards compute Q(W) once; an in-place update of
    any tensor it reads (optimiser step on LoRA, new step size, state-dict load) recomputes it; grad
    forwards never use the cache; the cache is dropped on exit."""
    from mpq_lightning.quant.layers import cached_quantized_weights
    from mpq_lightning.quant import set_quant_state

    torch.manual_seed(0)
    layer = QuantLinear.from_module(nn.Linear(6, 5), _spec())
    layer.weight_quantizer.initialize(layer.weight.detach())
    set_quant_state(layer, True, True)
    with torch.no_grad():
        layer.lora.B.normal_()
    x = torch.randn(3, 6)
    calls = []
    original = layer.quantized_weight
    layer.quantized_weight = lambda: calls.append(1) or original()

    def uncached():
        with torch.no_grad():
            return layer._op(layer.act_quantizer(x), original(), layer.bias)

    with cached_quantized_weights(layer), torch.no_grad():
        y0, y1 = layer(x), layer(x)
        assert len(calls) == 1 and torch.equal(y0, y1) and torch.equal(y0, uncached())
        layer.lora.B.add_(0.1)  # an optimiser-style in-place update
        assert torch.equal(layer(x), uncached()) and not torch.equal(layer(x), y0) and len(calls) == 2
        layer.weight_quantizer.scale.mul_(1.5)
        assert torch.equal(layer(x), uncached()) and len(calls) == 3
        layer.load_state_dict(copy.deepcopy(layer.state_dict()))  # copy_ into every tensor
        layer(x)
        assert len(calls) == 4
        with torch.enable_grad():
            layer(x).sum().backward()  # grad forwards recompute and keep the graph
        assert len(calls) == 5 and layer.lora.B.grad is not None
    assert layer._weight_cache is None and not layer.cache_weight
    with torch.no_grad():
        layer(x), layer(x)
    assert len(calls) == 7  # outside the context: no caching
