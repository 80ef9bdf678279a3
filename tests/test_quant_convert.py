"""QuantConfig validation, quantize_model on diffusers models, calibration."""
import copy

import pytest
import torch
from torch import nn

from mpq_lightning.quant import (
    QuantConfig,
    QuantLayer,
    TimestepActQuantizer,
    calibrate,
    plan_quantization,
    quantize_model,
    set_quant_state,
    step_index_context,
)


def tiny_unet():
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4, attention_head_dim=4,
    ).eval()


def tiny_wan():
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=16, ffn_dim=32, num_layers=1, rope_max_seq_len=32,
    ).eval()


def _count(model, types=(nn.Linear, nn.Conv2d, nn.Conv3d, nn.Conv1d)):
    return sum(type(m) in types for m in model.modules())


def test_quantize_unet_swaps_expected_layers_and_fp_exact():
    fp = tiny_unet()
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([10, 500])
    ref = fp(x, t).sample
    cfg = QuantConfig(w_bits=4, a_bits=8, keep_fp=["*conv_shortcut*"], bit_map={"conv_in": {"w": 8, "a": 8}, "conv_out": {"w": 8, "a": 8}}, lora_rank=2)
    n_candidates = _count(fp)
    n_fp = sum("conv_shortcut" in n for n, m in fp.named_modules() if isinstance(m, nn.Conv2d))
    q = quantize_model(copy.deepcopy(fp), cfg)
    quantized = [n for n, m in q.named_modules() if isinstance(m, QuantLayer)]
    assert len(quantized) == n_candidates - n_fp
    assert _count(q) == n_fp  # only the kept-FP layers remain plain
    assert q.get_submodule("conv_in").spec.w_bits == 8 and q.get_submodule("conv_out").spec.a_bits == 8
    assert q.get_submodule("down_blocks.0.resnets.0.conv1").spec.w_bits == 4
    with torch.no_grad():
        assert torch.equal(q(x, t).sample, ref)


def test_quantize_wan_fp_exact_and_calibrated_close():
    fp = tiny_wan()
    x = torch.randn(1, 4, 2, 4, 4)
    t = torch.tensor([500])
    enc = torch.randn(1, 3, 16)
    with torch.no_grad():
        ref = fp(x, t, enc).sample
    q = quantize_model(copy.deepcopy(fp), QuantConfig(w_bits=8, a_bits=8, a_quantizer="dynamic_token"))
    assert len([m for m in q.modules() if isinstance(m, QuantLayer)]) == _count(fp)
    with torch.no_grad():
        assert torch.equal(q(x, t, enc).sample, ref)
        calibrate(q, lambda m: m(x, t, enc))
        out = q(x, t, enc).sample
    rel = (out - ref).pow(2).mean() / ref.pow(2).mean()
    assert 0 < rel < 1e-2


def test_calibrate_timestep_tables_and_state():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4))
    q = quantize_model(copy.deepcopy(model), QuantConfig(w_bits=4, a_bits=6, num_steps=3, smooth_alpha=0.5, lora_rank=2))
    data = [torch.randn(5, 8) * (i + 1) for i in range(3)]

    def run(m):
        for i, x in enumerate(data):
            with step_index_context(m, i):
                m(x)

    calibrate(q, run)
    aq = q[0].act_quantizer
    assert isinstance(aq, TimestepActQuantizer) and bool(aq.initialized)
    assert aq.scale[0] < aq.scale[2]
    assert bool(q[0].weight_quantizer.initialized) and not torch.all(q[0].smooth_scale == 1)
    assert q[0].weight_quant and q[0].act_quant
    set_quant_state(q, False, False)
    assert torch.equal(q(data[0]), model(data[0]))


def test_static_act_quantizer_calibration():
    """``a_quantizer: static`` with min-max init: one (step, zero) over the calibration input,
    step = (max − min) / 255 at 8 bits, and the layer quantizes its input with it (exact forward)."""
    from mpq_lightning.quant.functional import fake_quantize

    model = nn.Sequential(nn.Linear(8, 4))
    q = quantize_model(copy.deepcopy(model), QuantConfig(w_bits=8, a_bits=8, a_quantizer="static", a_init="minmax"))
    x = torch.randn(16, 8)
    calibrate(q, lambda m: m(x))
    aq = q[0].act_quantizer
    assert bool(aq.initialized)
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    assert float(aq.scale) == pytest.approx((hi - lo) / 255, rel=1e-6)
    xq = fake_quantize(x, aq.scale.detach().view(1, 1), aq.zero_point.detach().view(1, 1), 0, 255)
    want = torch.nn.functional.linear(xq, q[0].weight_quantizer(q[0].weight), q[0].bias)
    torch.testing.assert_close(q(x), want)
    torch.testing.assert_close(q(x), model(x), rtol=0, atol=0.05)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(w_bits=9), "w_bits"),
        (dict(w_bits=0), "w_bits"),
        (dict(a_bits=12), "a_bits"),
        (dict(w_granularity="row"), "w_granularity"),
        (dict(w_granularity="group"), "w_group_size"),
        (dict(a_quantizer="dynamic"), "a_quantizer"),
        (dict(w_init="kl"), "w_init"),
        (dict(lora_rank=-1), "lora_rank"),
        (dict(lora_init="gaussian"), "lora_init"),
        (dict(bit_map={"fc": {"w": 10}}), r"bit_map\['fc'\]"),
        (dict(bit_map={"fc": {"bits": 4}}), "bit_map"),
        (dict(layer_types=["lstm"]), "layer_types"),
        (dict(w_symmetric=True, w_bits=1), "symmetric 1-bit"),
    ],
)
def test_bad_config_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        QuantConfig(**kwargs)


def test_bad_config_against_model():
    model = nn.Sequential(nn.Linear(8, 4), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="lora_rank=3 is larger than min"):
        quantize_model(model, QuantConfig(lora_rank=3))
    with pytest.raises(ValueError, match="keep_fp pattern 'blocks.*' matches no"):
        quantize_model(model, QuantConfig(keep_fp=["blocks.*"]))
    with pytest.raises(ValueError, match="bit_map pattern"):
        quantize_model(model, QuantConfig(bit_map={"mlp.*": {"w": 8}}))
    with pytest.raises(ValueError, match="w_group_size=3 does not divide"):
        quantize_model(model, QuantConfig(w_granularity="group", w_group_size=3))
    # a layer type the model does not have: named with the types it has (it listed "first layers: []")
    with pytest.raises(ValueError, match=r"layer_types \['conv2d'\] selects no layer of Sequential, whose "
                                         r"quantizable layers are of the types \['linear'\]"):
        quantize_model(model, QuantConfig(layer_types=["conv2d"]))
    # OOLRI on a layer without a weight quantizer: refused by name here, not in calibration's stage 3
    with pytest.raises(ValueError, match=r"lora_init='svd_weight_error' \(OOLRI\) .* layer '1' has no weight quantizer"):
        quantize_model(model, QuantConfig(w_bits=None, bit_map={"0": {"w": 4}}, lora_rank=2,
                                          lora_init="svd_weight_error", lora_quantized_base=True))
    # nothing was swapped by the failed calls
    assert not any(isinstance(m, QuantLayer) for m in model.modules())
    # the same layer without an adapter, or an adapter initialised otherwise, is fine
    for cfg in (QuantConfig(w_bits=None, bit_map={"0": {"w": 4}}, lora_rank=2, lora_exclude=["1"],
                            lora_init="svd_weight_error", lora_quantized_base=True),
                QuantConfig(w_bits=None, lora_rank=2)):
        plan_quantization(model, cfg)


def test_lora_exclude_and_bit_map_order():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 2))
    cfg = QuantConfig(lora_rank=2, lora_exclude=["0"], bit_map={"*": {"w": 3}, "2": {"w": 8, "a": 8}})
    plan = {r.name: r for r in plan_quantization(model, cfg)}
    assert plan["0"].lora_rank == 0 and plan["1"].lora_rank == 2
    assert plan["1"].w_bits == 3 and plan["2"].w_bits == 8 and plan["2"].a_bits == 8


def test_report_table_prints(capsys):
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2))
    quantize_model(model, QuantConfig(keep_fp=["1"]), verbose=True)
    out = capsys.readouterr().out
    assert "quantized" in out and "kept_fp" in out


def test_a_lora_init_that_cannot_train_is_refused():
    """A = B = 0 ("zero") would be an adapter with zero gradients forever: not an option."""
    with pytest.raises(ValueError, match="lora_init"):
        QuantConfig(lora_rank=2, lora_init="zero")


def test_smooth_scale_formula_by_hand():
    """``s_j = a_j^α / (max_i |W_ij|)^(1-α)`` at Q-VDiT's α = 0.11 (qvdit.md §3.4), where α and 1 − α
    differ: a = [4, 1], max |W| per input channel = [2, 0.5] → s = [2^-0.67, 2^0.89]."""
    from mpq_lightning.quant.smooth import smooth_scale

    w = torch.tensor([[2.0, -0.5], [1.0, 0.25]])
    s = smooth_scale(torch.tensor([4.0, 1.0]), w, 0.11)
    torch.testing.assert_close(s, torch.tensor([2 ** -0.67, 2 ** 0.89]))
    torch.testing.assert_close(smooth_scale(torch.tensor([4.0, 1.0]), w, 0.5), torch.tensor([2 ** 0.5, 2 ** 0.5]))


def test_activation_statistic_running_max_and_qvdit_ema():
    """MPQ-DM: the running max over every sample and token. Q-VDiT's ``momentum_act_max``: an EMA over
    batches of the batch mean of each sample's max over its tokens."""
    from mpq_lightning.quant.smooth import ActAbsMaxObserver

    b1 = torch.tensor([[[1.0], [-0.5]], [[3.0], [2.0]]])  # [B=2, N=2, C=1]: sample maxima 1, 3 → mean 2
    b2 = torch.tensor([[[5.0], [0.0]], [[-7.0], [1.0]]])  # maxima 5, 7 → mean 6
    running, ema = ActAbsMaxObserver(-1), ActAbsMaxObserver(-1, momentum=0.9)
    for b in (b1, b2):
        running.observe(b)
        ema.observe(b)
    torch.testing.assert_close(running.stat, torch.tensor([7.0]))
    torch.testing.assert_close(ema.stat, torch.tensor([0.9 * 2 + 0.1 * 6]))


def test_quant_config_smooth_momentum_reaches_calibration():
    from mpq_lightning.module import CalibConfig
    from mpq_lightning.quant.smooth import smooth_scale

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    data = [torch.randn(2, 5, 4), 3 * torch.randn(2, 5, 4)]
    for momentum in (None, 0.9):
        q = quantize_model(copy.deepcopy(model), QuantConfig(w_bits=4, a_bits=None, smooth_alpha=0.5,
                                                             smooth_momentum=momentum))
        calibrate(q, lambda m: [m(x) for x in data])
        per_batch = [x.abs().amax(1).mean(0) for x in data]
        stat = (torch.maximum(*[x.abs().reshape(-1, 4).amax(0) for x in data]) if momentum is None
                else 0.9 * per_batch[0] + 0.1 * per_batch[1])
        torch.testing.assert_close(q[0].smooth_scale, smooth_scale(stat, model[0].weight, 0.5))
    with pytest.raises(ValueError, match="QuantConfig.smooth_momentum must be in"):
        QuantConfig(smooth_momentum=1.0)
    with pytest.raises(ValueError, match="calib.smooth_momentum moved to model.quant.smooth_momentum"):
        CalibConfig(smooth_momentum=0.9)
