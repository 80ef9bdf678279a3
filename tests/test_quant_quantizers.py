"""Uniform, timestep-aware and dynamic per-token quantizers."""
import pytest
import torch
from torch import nn

from mpq_lightning.quant import (
    DynamicTokenQuantizer,
    TimestepActQuantizer,
    UniformQuantizer,
    resample_step_table,
    step_index_context,
)


@pytest.mark.parametrize("granularity,group", [("tensor", None), ("channel", None), ("group", 4), ("token", None)])
@pytest.mark.parametrize("symmetric", [False, True])
def test_uniform_matches_torch_per_row(granularity, group, symmetric):
    w = torch.randn(6, 8, 3)
    q = UniformQuantizer(3, symmetric=symmetric, granularity=granularity, group_size=group, init="minmax")
    q.initialize(w)
    rows = {"tensor": w.reshape(1, -1), "channel": w.reshape(6, -1), "group": w.reshape(-1, 12), "token": w.reshape(-1, 3)}[granularity]
    ref = torch.fake_quantize_per_channel_affine(
        rows, q.scale.detach().view(-1), q.zero_point.detach().view(-1).int(), 0, q.qmin, q.qmax
    )
    assert torch.equal(q(w), ref.view_as(w))
    assert q.scale.shape[0] == rows.shape[0]


def test_uniform_learnable_switches():
    q = UniformQuantizer(4, learn_scale=False, learn_zero_point=True, shape=(5, 3))
    assert not q.scale.requires_grad and q.zero_point.requires_grad
    assert q.scale.shape == (5, 1)  # known up front so a checkpoint restores strictly


def test_uniform_errors():
    with pytest.raises(ValueError, match="unknown granularity"):
        UniformQuantizer(4, granularity="row")
    with pytest.raises(ValueError, match="group_size"):
        UniformQuantizer(4, granularity="group")
    q = UniformQuantizer(4, shape=(5, 3))
    with pytest.raises(ValueError, match="initialised for 5 channel rows"):
        q(torch.randn(4, 3))


def _calibrated_table(steps=4):
    q = TimestepActQuantizer(4, steps, init="minmax")
    q.observing = True
    g = torch.Generator().manual_seed(0)  # fixed data: the tests below must not depend on the global RNG
    for i in range(steps):
        q.step_index = i
        q(torch.randn(2, 10, generator=g) * (i + 1))
    q.finish_calibration()
    q.step_index = None
    return q


def test_timestep_table_calibrated_per_step():
    q = _calibrated_table()
    assert bool(q.initialized)
    assert torch.all(q.scale[1:] > q.scale[:-1])  # wider activations at later entries


def test_timestep_entry_changes_only_its_step():
    q = _calibrated_table()
    x = torch.randn(4, 10) * 2
    idx = torch.arange(4)
    with torch.no_grad():
        with step_index_context(q, idx):
            before = q(x)
        q.scale[2] *= 1.7
        with step_index_context(q, idx):
            after = q(x)
    changed = (before != after).any(1)
    assert changed.tolist() == [False, False, True, False]


def test_timestep_index_per_sample_broadcast_batch_major():
    q = _calibrated_table()
    x = torch.randn(6, 5, 3)  # "(b f) s c" with b = 2, f = 3
    with step_index_context(q, torch.tensor([0, 3])):
        y = q(x)
    with step_index_context(q, 0):
        y0 = q(x[:3])
    with step_index_context(q, 3):
        y3 = q(x[3:])
    assert torch.equal(y, torch.cat([y0, y3]))


def test_timestep_requires_index_and_no_counter():
    q = _calibrated_table()
    with pytest.raises(RuntimeError, match="step index"):
        q(torch.randn(2, 3))
    with step_index_context(q, 1):
        a = q(torch.ones(2, 3))
        b = q(torch.ones(2, 3))  # same index on repeated calls: no hidden counter
    assert torch.equal(a, b)
    with pytest.raises(IndexError):
        with step_index_context(q, 4):
            q(torch.ones(1, 3))


def test_timestep_gradients_reach_only_used_entries():
    q = _calibrated_table()
    with step_index_context(q, torch.tensor([1, 1])):
        q(torch.randn(2, 8) * 3).sum().backward()
    nz = (q.scale.grad != 0).tolist()
    assert nz[1] and not nz[0] and not nz[2] and not nz[3]


def test_resample_step_table():
    table = torch.arange(100.0)
    old_t = torch.arange(990, -1, -10)  # DDIM 100 steps (leading spacing)
    new_t = torch.arange(950, -1, -50)  # DDIM 20 steps
    r = resample_step_table(table, old_t, new_t)
    assert r.tolist() == [4.0 + 5 * j for j in range(20)]
    # the stride form (EfficientDM's, on a table counted from the noisiest step) picks the same entries:
    # the last new step is the last old step, not one 40 timesteps noisier
    assert torch.equal(resample_step_table(table, new_steps=20), r)
    with pytest.raises(ValueError):
        resample_step_table(table, old_t[:5], new_t)


@pytest.mark.parametrize("bits", [4, 6, 8])
def test_dynamic_token_error_within_half_step(bits):
    x = torch.randn(2, 16, 32) * torch.rand(2, 16, 1) * 10
    x[0, 3] = 1e-9  # a tiny token must not collapse the others (Q-VDiT bug)
    q = DynamicTokenQuantizer(bits)
    scale, _ = q.qparams(x)
    err = (q(x) - x).abs()
    assert torch.all(err <= scale / 2 + 1e-6)
    assert scale[1, 5] > 1e-3  # other tokens keep their own step


def test_dynamic_token_is_stateless_per_token():
    q = DynamicTokenQuantizer(4)
    x = torch.randn(3, 7, 5)
    y = q(x)
    y_part = q(x[:, :2])
    assert torch.equal(y[:, :2], y_part)
    assert len(list(q.parameters())) == 0


def test_dynamic_token_conv_channel_dim():
    q = DynamicTokenQuantizer(8, channel_dim=1)
    x = torch.randn(2, 4, 3, 3)
    y = q(x)
    ref = DynamicTokenQuantizer(8)(x.movedim(1, -1)).movedim(-1, 1)
    assert torch.equal(y, ref)


def test_lsq_grad_scale_reaches_the_activation_step_table():
    """``lsq_grad_scale`` multiplies the activation steps' gradients by LSQ's 1/sqrt(N qmax) too
    (N: one sample's elements, which share a step), as it does the weight steps'."""
    from mpq_lightning.quant import QuantConfig, quantize_model
    from mpq_lightning.quant.functional import lsq_grad_scale

    x = torch.randn(2, 10) * 3
    grads = []
    for scaled in (False, True):
        q = _calibrated_table()
        q.use_lsq_grad_scale = scaled
        with step_index_context(q, torch.tensor([1, 1])):
            q(x).sum().backward()
        grads.append(q.scale.grad[1])
    torch.testing.assert_close(grads[1], grads[0] * lsq_grad_scale(10, q.qmax))
    assert q.qmax == 15 and lsq_grad_scale(10, 15) == pytest.approx(1 / 150 ** 0.5)  # 4 bits: 1/sqrt(10·15) ≈ 0.0816
    torch.testing.assert_close(grads[1], grads[0] / 150 ** 0.5)
    model = quantize_model(torch.nn.Sequential(torch.nn.Linear(10, 4)), QuantConfig(a_bits=6, lsq_grad_scale=True))
    assert model[0].act_quantizer.use_lsq_grad_scale


def test_step_index_context_follows_module_tree_changes():
    """The per-model list of step quantizers is cached, and rebuilt after any submodule is added
    or replaced anywhere (a quantizer added later still gets the step index)."""
    from mpq_lightning.quant.quantizers import step_quantizers

    model = nn.Sequential(TimestepActQuantizer(4, 3))
    with step_index_context(model, 1):
        assert model[0].step_index == 1
    assert model[0].step_index is None  # restored
    model.append(nn.Sequential(TimestepActQuantizer(4, 3)))
    model[1].add_module("late", TimestepActQuantizer(4, 3))
    with step_index_context(model, 2):
        assert [q.step_index for q in step_quantizers(model)] == [2, 2, 2]
        assert model[1][0].step_index == 2 and model[1].late.step_index == 2
    model[1][0] = nn.Identity()  # replaced: no longer handed the index
    assert len(step_quantizers(model)) == 2


@pytest.mark.parametrize("w_quantizer", ["uniform", "omq", "fzrmq"])
def test_quant_config_switches_reach_the_built_quantizers(w_quantizer):
    """Each QuantConfig switch arrives in the quantizers ``quantize_model`` builds, weight and
    activation side, whatever the weight quantizer (OMQ / FZ-RMQ build their uniform parts)."""
    from mpq_lightning.quant import QuantConfig, quantize_model

    cfg = QuantConfig(w_bits=4, a_bits=6, num_steps=3, w_quantizer=w_quantizer, w_symmetric=True, w_init="minmax",
                      learn_w_scale=False, learn_w_zero_point=True, a_symmetric=True, a_init="minmax",
                      learn_a_scale=False, learn_a_zero_point=False, lsq_grad_scale=True)
    layer = quantize_model(nn.Sequential(nn.Linear(10, 20)), cfg)[0]
    wq, aq = layer.weight_quantizer, layer.act_quantizer
    parts = list(getattr(wq, "quantizers", None) or [m for m in (getattr(wq, "base", None), getattr(wq, "mid", None))
                                                     if m is not None] or [wq])
    assert parts and type(wq).__name__ == {"uniform": "UniformQuantizer", "omq": "OMQQuantizer",
                                           "fzrmq": "FZRMQQuantizer"}[w_quantizer]
    for q in parts:
        assert q.symmetric and q.init_method == "minmax" and q.use_lsq_grad_scale, type(wq).__name__
        assert not q.scale.requires_grad and q.zero_point.requires_grad
    assert isinstance(aq, TimestepActQuantizer) and aq.symmetric and aq.init_method == "minmax" and aq.num_steps == 3
    assert aq.use_lsq_grad_scale and not aq.scale.requires_grad and not aq.zero_point.requires_grad
    assert (aq.qmin, aq.qmax) == (-32, 31)  # symmetric 6 bits: signed range
    defaults = quantize_model(nn.Sequential(nn.Linear(10, 20)), QuantConfig(w_bits=4, a_bits=6))[0]
    assert not defaults.weight_quantizer.symmetric and defaults.weight_quantizer.scale.requires_grad
    assert not defaults.act_quantizer.symmetric and defaults.act_quantizer.zero_point.requires_grad


def test_timestep_table_unseen_steps_take_the_pooled_fit():
    """Steps never observed in calibration take (step, zero) fitted on all observations together
    (EfficientDM's shared init); observed steps their own fit."""
    from mpq_lightning.quant.functional import init_qparams

    q = TimestepActQuantizer(4, 4, init="minmax")
    q.observing = True
    xs = {0: torch.linspace(-1, 1, 20).view(2, 10), 2: torch.linspace(-2, 6, 20).view(2, 10)}
    for step, x in xs.items():
        q.step_index = step
        q(x)
    q.finish_calibration()
    pooled = init_qparams(torch.cat([x.flatten() for x in xs.values()]).view(1, -1), 4, False, "minmax")
    own = {s: init_qparams(x.reshape(1, -1), 4, False, "minmax") for s, x in xs.items()}
    scale, zero = q.scale.detach(), q.zero_point.detach()
    for step in (1, 3):
        assert float(scale[step]) == pytest.approx(float(pooled[0])) and float(zero[step]) == pytest.approx(float(pooled[1]))
    for step in (0, 2):
        assert float(scale[step]) == pytest.approx(float(own[step][0]))
        assert float(zero[step]) == pytest.approx(float(own[step][1]))
    assert float(scale[0]) != pytest.approx(float(pooled[0]))  # the data tell the fits apart


def test_dynamic_token_quantizer_per_sample_or_pooled_over_the_batch():
    """Per token (channels last) min-max, zero included: each sample's tokens on their own, or with
    ``quant.a_token_share_batch`` each token position pooled over the batch (the Q-VDiT release)."""
    from mpq_lightning.quant import QuantConfig, quantize_model

    x = torch.tensor([[[1.0, -2.0, 3.0], [0.5, 0.25, 0.0]],
                      [[4.0, 1.0, 2.0], [-6.0, 2.0, 1.0]]])  # [B=2, N=2, C=3]
    own = DynamicTokenQuantizer(4)
    scale, _ = own.qparams(x)
    torch.testing.assert_close(scale.view(2, 2), torch.tensor([[5.0, 0.5], [4.0, 8.0]]) / 15)
    pooled_layer = quantize_model(nn.Sequential(nn.Linear(3, 2)), QuantConfig(w_bits=8, a_bits=4,
                                                                              a_quantizer="dynamic_token",
                                                                              a_token_share_batch=True))[0]
    pooled = pooled_layer.act_quantizer
    assert isinstance(pooled, DynamicTokenQuantizer) and pooled.share_batch
    scale, _ = pooled.qparams(x)
    torch.testing.assert_close(scale.view(2, 2), torch.tensor([[6.0, 8.0]] * 2) / 15)  # token 0: [-2, 4]; token 1: [-6, 2]
    assert not quantize_model(nn.Sequential(nn.Linear(3, 2)), QuantConfig(a_bits=4, a_quantizer="dynamic_token"))[0] \
        .act_quantizer.share_batch


def _pooled_range_by_loops(x: torch.Tensor, token_of_row) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (lo, hi) where every row's range is pooled over all rows with the same token id."""
    rows = x.reshape(-1, x.shape[-1])
    ids = [token_of_row(r) for r in range(rows.shape[0])]
    lo, hi = torch.empty(rows.shape[0]), torch.empty(rows.shape[0])
    for r, t in enumerate(ids):
        same = rows[[i for i, u in enumerate(ids) if u == t]]
        lo[r], hi[r] = same.min().clamp_max(0), same.max().clamp_min(0)
    return lo, hi


@pytest.mark.parametrize("layout, shape, token_of_row", [
    # spatial: rows ((i f) + j) · s + k are sample i, frame j, spatial k: pool over i per (j, k)
    ("(b f) s c", (2 * 3, 4, 5), lambda r: (r // 4 % 3, r % 4)),
    # temporal: rows ((i s) + k) · f + j: pool over i per (k, j)
    ("(b s) f c", (2 * 4, 3, 5), lambda r: (r // 3 % 4, r % 3)),
    ("b (f s) c", (2, 12, 5), lambda r: r % 12),
    ("b l c", (2, 7, 5), lambda r: r),  # text tokens: the release packs the prompts, nothing is pooled
])
def test_dynamic_token_share_batch_pools_the_true_batch(layout, shape, token_of_row):
    """With the layer's token layout, a_token_share_batch pools each (frame, spatial) token over the
    samples only (qvdit.md §3.3: [B, T·S, C], min / max over B × C), never over frames or spatial tokens."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    q = DynamicTokenQuantizer(4, share_batch=True, token_layout=layout, num_frames=3, tokens_per_frame=4)
    scale, zero = q.qparams(x)
    lo, hi = _pooled_range_by_loops(x, token_of_row)
    torch.testing.assert_close(scale.reshape(-1), ((hi - lo) / 15).clamp_min(1e-6))
    assert scale.shape == x.shape[:-1] + (1,) and zero.shape == scale.shape


def test_dynamic_token_share_batch_layout_errors():
    with pytest.raises(ValueError, match=r"needs the size of axis 's'"):
        DynamicTokenQuantizer(4, share_batch=True, token_layout="(b s) f c", num_frames=3)
    with pytest.raises(ValueError, match=r"must lead with the batch axis"):
        DynamicTokenQuantizer(4, share_batch=True, token_layout="(f b) s c", num_frames=3)
    q = DynamicTokenQuantizer(4, share_batch=True, token_layout="(b f) s c", num_frames=3)
    with pytest.raises(ValueError, match=r"shape \(4, 2, 5\) does not fit token layout '\(b f\) s c'"):
        q(torch.randn(4, 2, 5))
    DynamicTokenQuantizer(4, token_layout="(b s) f c")  # no pooling: the layout is not needed


def test_share_batch_gets_the_stdit_layouts():
    """QATModule's layer_info reaches the dynamic quantizers: every STDiT block linear pools its true batch
    (the forward checks each layer's real input against its layout and raises on a mismatch)."""
    from mpq_lightning.models import build
    from mpq_lightning.module import QATModule
    from mpq_lightning.quant import QuantConfig, quantize_model, set_quant_state

    teacher = build("tiny-stdit")
    model = quantize_model(build("tiny-stdit").backbone, QuantConfig(a_bits=6, a_quantizer="dynamic_token",
                                                                     a_token_share_batch=True),
                           layer_info=QATModule._layer_info_fn(teacher))
    f, s = teacher.num_frames, teacher.tokens_per_frame
    layouts = {n.rsplit(".", 1)[0]: (m.token_layout, m.num_frames, m.tokens_per_frame)
               for n, m in model.named_modules() if isinstance(m, DynamicTokenQuantizer)}
    assert layouts["blocks.0.attn.q"] == ("(b f) s c", f, s)
    assert layouts["blocks.0.attn_temp.v"] == ("(b s) f c", f, s)
    assert layouts["blocks.1.cross_attn.kv_linear"][0] == "b l c"
    x = torch.randn(2, *teacher.latent_shape)
    y = torch.randn(2, 1, teacher.cond_spec["y"].shape[1], teacher.cond_spec["y"].shape[2])
    set_quant_state(model, False, True)
    assert torch.isfinite(model(x, torch.tensor([10, 900]), y)).all()


def test_step_index_context_after_a_quantizer_is_deleted():
    """``del`` does not bump the module-tree version: a removed 4-step quantizer may stay cached, but a
    step index valid for the quantizers still in the model is accepted (the tree is walked afresh)."""
    from mpq_lightning.quant.quantizers import step_quantizers

    model = nn.Sequential(nn.Linear(2, 2), TimestepActQuantizer(8, 10), TimestepActQuantizer(8, 4))
    assert len(step_quantizers(model)) == 2
    del model[2]
    with step_index_context(model, 7):
        assert model[1].step_index == 7
    assert step_quantizers(model) == [model[1]]
    with pytest.raises(IndexError, match="out of range for a table of 10 steps"):
        with step_index_context(model, 10):
            pass


def test_the_step_range_check_reads_the_host_copy_not_the_device():
    """With ``host`` (the data modules' ``step_index_host``) the per-forward range check judges the host
    values and reads nothing from the index tensor (``meta`` here: reading it raises; on a GPU it would
    be a sync per forward); a host copy of another length or out of range is refused."""
    model = nn.Sequential(TimestepActQuantizer(8, 4))
    idx = torch.tensor([1, 3], device="meta")
    with pytest.raises(NotImplementedError):  # without the host copy the tensor is read
        with step_index_context(model, idx):
            pass
    with step_index_context(model, idx, host=[1, 3]):
        assert model[0].step_index is idx
    with pytest.raises(IndexError, match=r"\[1, 4\] out of range for a table of 4 steps"):
        with step_index_context(model, idx, host=[1, 4]):
            pass
    with pytest.raises(ValueError, match="step_index_host has 1 entries for a step index of 2"):
        with step_index_context(model, idx, host=[1]):
            pass
