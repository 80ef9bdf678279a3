"""Padded text tokens stay out of calibration statistics (quant.observed_rows).

The official OpenSora STDiT packs the kept caption tokens before ``cross_attn.kv_linear``; ours keeps
``[B, L, C]`` with a key mask, so every calibration observer of that layer must see the kept rows only.
"""
from __future__ import annotations

import copy

import pytest
import torch

from mpq_lightning.models import build
from mpq_lightning.models.stdit import STDIT_KEEP_FP
from mpq_lightning.quant import InputStats, QuantConfig, TimestepActQuantizer, calibrate, observed_rows, quantize_model
from mpq_lightning.quant.convert import _StaticActObserver
from mpq_lightning.quant.layers import QuantLinear
from mpq_lightning.quant.quantizers import observed_row_mask
from mpq_lightning.quant.smooth import ActAbsMaxObserver


def _padded(seed: int = 0, pad_value: float = 1e3):
    """x [3, 5, 4] whose padded rows (mask False) hold ``pad_value``; per-sample kept lengths 2, 5, 3."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 5, 4, generator=g)
    mask = torch.arange(5)[None, :] < torch.tensor([2, 5, 3])[:, None]
    return x.masked_fill(~mask[..., None], pad_value), mask


def test_mask_must_fit_the_input():
    x, mask = _padded()
    assert observed_row_mask(x) is None  # outside a context nothing is masked
    with observed_rows(mask):
        assert torch.equal(observed_row_mask(x), mask)
        with pytest.raises(ValueError, match=r"\(3, 5\).*\(3, 4, 5\)"):
            observed_row_mask(x.transpose(1, 2))
    assert observed_row_mask(x) is None


def test_timestep_table_sees_kept_rows_only():
    x, mask = _padded()
    steps = torch.tensor([0, 1, 0])

    def fitted(inputs):
        torch.manual_seed(0)
        q = TimestepActQuantizer(bits=4, num_steps=2, init="minmax")
        q.observing = True
        for xi, si, m in inputs:
            q.step_index = si
            with observed_rows(m):
                q(xi)
        q.finish_calibration()
        return q.scale.detach().clone(), q.zero_point.detach().clone()

    masked = fitted([(x, steps, mask)])
    other_pads = fitted([(x.masked_fill(~mask[..., None], -7.0), steps, mask)])
    # the same rows packed by hand, one call per step (as the official packed layer would see them)
    packed = fitted([(x[(steps == s)[:, None] & mask][None], s, None) for s in (0, 1)])
    unmasked = fitted([(x, steps, None)])
    for a, b in zip(masked, other_pads):
        assert torch.equal(a, b)
    for a, b in zip(masked, packed):
        torch.testing.assert_close(a, b)
    assert unmasked[0][0] > 10 * masked[0][0]  # the 1e3 pads would set the range without the mask


@pytest.mark.parametrize("momentum", [None, 0.5])
def test_smoothquant_maxima_by_hand(momentum):
    x, mask = _padded()
    obs = ActAbsMaxObserver(channel_dim=-1, momentum=momentum)
    with observed_rows(mask):
        obs.observe(x)
    kept = [x[i][mask[i]].abs() for i in range(3)]
    if momentum is None:
        expected = torch.cat(kept).amax(0)
    else:  # batch mean of each sample's max over its kept tokens
        expected = torch.stack([k.amax(0) for k in kept]).mean(0)
    torch.testing.assert_close(obs.stat, expected)


def test_static_observer_and_input_stats_keep_kept_rows():
    x, mask = _padded()
    kept = x[mask]  # [10, 4]
    obs = _StaticActObserver()
    with observed_rows(mask):
        obs(x)
    vals = torch.cat(obs.values)
    assert vals.max() == kept.max() and vals.min() == kept.min()
    assert torch.equal(vals[:-2].sort().values, kept.reshape(-1).sort().values)

    layer = QuantLinear.from_module(torch.nn.Linear(4, 3))
    stats = InputStats.for_layer(layer, max_rows=64)  # d = 4 <= 64: exact Gram
    with observed_rows(mask):
        stats.observe(layer, x)
    assert stats.n == kept.shape[0]
    torch.testing.assert_close(stats.gram()[0], (kept.T @ kept).double() / kept.shape[0])


def _calibrated_student(pad_scale: float, seed: int = 0):
    """Tiny STDiT, W3A6 TALSQ + FZ-RMQ + output-aware OOLRI + SmoothQuant, calibrated on captions whose
    padded tokens (mask 0) are random values times ``pad_scale``."""
    torch.manual_seed(seed)
    teacher = build("tiny-stdit")
    student = copy.deepcopy(teacher)
    cfg = QuantConfig(w_bits=3, a_bits=6, num_steps=2, w_quantizer="fzrmq", lora_rank=2,
                      lora_init="svd_output_error", lora_quantized_base=True, smooth_alpha=0.5, keep_fp=list(STDIT_KEEP_FP))
    quantize_model(student.backbone, cfg)
    g = torch.Generator().manual_seed(1)
    b, length = 2, student.cond_spec["y"].shape[1]
    x = torch.randn(b, *student.latent_shape, generator=g)
    y = torch.randn(b, 1, length, student.cond_spec["y"].shape[2], generator=g)
    mask = (torch.arange(length)[None, :] < torch.tensor([3, length - 2])[:, None]).long()
    pads = torch.randn(y.shape, generator=g) * pad_scale
    y = torch.where(mask.bool()[:, None, :, None], y, pads)
    cond = {"y": y, "mask": mask}

    def run(m):
        for step in (0, 1):
            student(x, torch.full((b,), 500 - 400 * step), cond, step)

    torch.manual_seed(seed)
    calibrate(student.backbone, run)
    return student


def test_stdit_calibration_ignores_padded_caption_tokens(monkeypatch):
    """Every quantizer, smoothing scale and LoRA factor of the student is the same whatever the padded
    caption tokens hold; without observed_rows the kv_linear activation tables would follow the pads."""
    a, b = _calibrated_student(1.0), _calibrated_student(50.0)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k

    import mpq_lightning.models.stdit as stdit_module
    from contextlib import nullcontext

    monkeypatch.setattr(stdit_module, "observed_rows", lambda mask: nullcontext())
    c, d = _calibrated_student(1.0), _calibrated_student(50.0)
    kv = [k for k in sa if k.endswith(("cross_attn.kv_linear.act_quantizer.scale", "cross_attn.kv_linear.smooth_scale"))]
    assert len(kv) == 4 and all(d.state_dict()[k].mean() > 2 * c.state_dict()[k].mean() for k in kv)
