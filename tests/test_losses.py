"""Mathematical-property tests for the distillation losses (CPU, fast).

Covers: ε-MSE, MPQ-DM relation KL / TRD (mpqdm.md §3.8), MTRD (papers_extra.md §1.1, mpqdm.md §4.3) and
Q-VDiT TMD (qvdit.md §5, papers_extra.md §2.3).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mpq_lightning.losses import (
    MemoryRelationLoss,
    TimeAwarePixelQueue,
    TimeSmoothedRelationLoss,
    frame_vectors,
    memory_relation_kl,
    output_mse,
    relation_kl,
    split_learned_sigma,
    tmd_loss,
)

# ==================================================================================================
# Helpers: independent restatements of the released formulas
# ==================================================================================================


def _released_relational_loss(q_feat: torch.Tensor, fp_feat: torch.Tensor) -> torch.Tensor:
    """MPQ-DM ``relational_loss`` restated: per-sample pixel sim maps, KL(sum), no weight."""
    b, c, h, w = q_feat.shape
    qn = F.normalize(q_feat, p=2, dim=1).reshape(b, c, -1)
    fn = F.normalize(fp_feat, p=2, dim=1).reshape(b, c, -1)
    s_map = torch.bmm(qn.transpose(1, 2), qn).reshape(-1, h * w)
    t_map = torch.bmm(fn.transpose(1, 2), fn).reshape(-1, h * w)
    return F.kl_div(F.log_softmax(s_map, dim=1), F.softmax(t_map, dim=1), reduction="sum")


def _feat(*shape, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype)


# ==================================================================================================
# ε-MSE
# ==================================================================================================


def test_output_mse_reductions_and_shape_error():
    s, t = _feat(2, 4, 3, 3, seed=1), _feat(2, 4, 3, 3, seed=2)
    assert torch.allclose(output_mse(s, t), ((s - t) ** 2).sum())
    assert torch.allclose(output_mse(s, t, reduction="mean"), ((s - t) ** 2).mean())
    with pytest.raises(ValueError, match=r"\(2, 4, 3, 3\)"):
        output_mse(s, t[:, :3])


def test_split_learned_sigma():
    x = _feat(2, 8, 3, 3)
    assert torch.equal(split_learned_sigma(x, 4), x[:, :4])
    assert split_learned_sigma(x, 8) is x
    with pytest.raises(ValueError, match=r"\(2, 8, 3, 3\)"):
        split_learned_sigma(x, 3)


# ==================================================================================================
# relation_kl (TRD core)
# ==================================================================================================


def test_relation_kl_zero_when_equal_and_positive_otherwise():
    f = _feat(2, 6, 5, 5)
    assert relation_kl(f, f.clone()).item() == 0.0
    assert relation_kl(f, f + 0.5 * _feat(2, 6, 5, 5, seed=3)).item() > 0.0


def test_relation_kl_matches_released_formula():
    s, t = _feat(3, 6, 4, 5, seed=1), _feat(3, 6, 4, 5, seed=2)
    torch.testing.assert_close(relation_kl(s, t), _released_relational_loss(s, t), rtol=1e-12, atol=1e-12)
    # reductions are rescalings of the sum
    n_rows, n = 3 * 20, 20
    total = relation_kl(s, t)
    torch.testing.assert_close(relation_kl(s, t, reduction="batchmean"), total / n_rows)
    torch.testing.assert_close(relation_kl(s, t, reduction="mean"), total / (n_rows * n))
    assert relation_kl(s, t, reduction="none").shape == (3, 20)


def test_relation_kl_channels_last_equals_channels_first():
    s, t = _feat(2, 6, 4, 4, seed=1), _feat(2, 6, 4, 4, seed=2)
    s_tok = s.flatten(2).transpose(1, 2)  # [B, N, C]
    t_tok = t.flatten(2).transpose(1, 2)
    torch.testing.assert_close(relation_kl(s, t), relation_kl(s_tok, t_tok, channel_dim=-1))


def test_relation_kl_gradient_reaches_student():
    s = _feat(2, 6, 4, 4, seed=1).requires_grad_(True)
    t = _feat(2, 6, 4, 4, seed=2)
    relation_kl(s, t).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("anchors", [None, 20])
def test_relation_kl_chunked_equals_unchunked(dtype, anchors):
    s0, t = _feat(2, 8, 6, 6, seed=1, dtype=dtype), _feat(2, 8, 6, 6, seed=2, dtype=dtype)
    s1, s2 = s0.clone().requires_grad_(True), s0.clone().requires_grad_(True)
    full = relation_kl(s1, t, anchors=anchors, generator=torch.Generator().manual_seed(5))
    chunked = relation_kl(s2, t, chunk_size=7, anchors=anchors, generator=torch.Generator().manual_seed(5))
    full.backward()
    chunked.backward()
    torch.testing.assert_close(chunked, full, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(s2.grad, s1.grad, atol=1e-6, rtol=1e-6)
    # without checkpointing too
    nockpt = relation_kl(s0, t, chunk_size=5, anchors=anchors, generator=torch.Generator().manual_seed(5),
                         checkpoint_chunks=False)
    torch.testing.assert_close(nockpt, full.detach(), atol=1e-6, rtol=1e-6)


def test_relation_kl_anchor_rows_are_released_rows():
    s, t = _feat(2, 6, 5, 5, seed=1), _feat(2, 6, 5, 5, seed=2)
    n = 25
    full_rows = relation_kl(s, t, reduction="none")  # [B, N]
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(7))[:9].sort().values
    sub = relation_kl(s, t, reduction="none", anchors=9, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(sub, full_rows[:, idx])
    summed = relation_kl(s, t, anchors=9, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(summed, full_rows[:, idx].sum() * n / 9)


def test_relation_kl_shape_mismatch_message():
    with pytest.raises(ValueError, match=r"\(2, 6, 5, 5\).*\(2, 6, 5, 4\)"):
        relation_kl(_feat(2, 6, 5, 5), _feat(2, 6, 5, 4))


# ==================================================================================================
# TimeSmoothedRelationLoss (TRD)
# ==================================================================================================


def test_trd_window_averaging_matches_release():
    trd = TimeSmoothedRelationLoss(window=2, weight=100.0)
    s1, s2 = _feat(2, 6, 4, 4, seed=1), _feat(2, 6, 4, 4, seed=2)
    t1, t2 = _feat(2, 6, 4, 4, seed=3), _feat(2, 6, 4, 4, seed=4)
    first = trd(s1, t1)
    assert first.item() == 0.0 and not first.requires_grad and trd.pending == 1 and not trd.window_closed
    second = trd(s2, t2)
    assert trd.window_closed and trd.pending == 0
    expected = 100.0 * _released_relational_loss((s1 + s2) / 2, (t1 + t2) / 2)
    torch.testing.assert_close(second, expected, rtol=1e-10, atol=1e-10)


def test_trd_buffers_the_values_a_step_had_when_its_memory_is_reused():
    """A window's earlier features are the values they had at their step, even when the memory they came
    in is overwritten before the window closes (a CUDA-graph replay writes the next step's outputs there)."""
    s1, s2 = _feat(2, 6, 4, 4, seed=1), _feat(2, 6, 4, 4, seed=2)
    t1, t2 = _feat(2, 6, 4, 4, seed=3), _feat(2, 6, 4, 4, seed=4)
    expected = TimeSmoothedRelationLoss(window=2)
    expected(s1.clone(), t1.clone())
    want = expected(s2, t2)
    for grad_mode in ("current_only", "accumulate"):
        trd = TimeSmoothedRelationLoss(window=2, grad_mode=grad_mode)
        out_s, out_t = s1.clone(), t1.clone()  # the producer's output memory
        trd(out_s, out_t)
        out_s.copy_(s2), out_t.copy_(t2)  # ... reused by the next step
        torch.testing.assert_close(trd(out_s, out_t), want, rtol=1e-10, atol=1e-10)


def test_trd_zero_when_equal_positive_otherwise():
    trd = TimeSmoothedRelationLoss(window=2)
    f1, f2 = _feat(2, 6, 4, 4, seed=1), _feat(2, 6, 4, 4, seed=2)
    trd(f1, f1.clone())
    assert trd(f2, f2.clone()).item() == 0.0
    trd(f1, f2)
    assert trd(f2, f2).item() > 0.0  # student mean (f1+f2)/2 vs teacher mean f2


def test_trd_detach_student_has_no_grad_path():
    trd = TimeSmoothedRelationLoss(window=2, detach_student=True)
    s1 = _feat(2, 6, 4, 4, seed=1).requires_grad_(True)
    s2 = _feat(2, 6, 4, 4, seed=2).requires_grad_(True)
    trd(s1, _feat(2, 6, 4, 4, seed=3))
    loss = trd(s2, _feat(2, 6, 4, 4, seed=4))
    assert loss.item() > 0.0
    assert not loss.requires_grad and loss.grad_fn is None


def test_trd_current_only_vs_accumulate_gradients():
    t1, t2 = _feat(2, 6, 4, 4, seed=3), _feat(2, 6, 4, 4, seed=4)
    for mode, prev_gets_grad in (("current_only", False), ("accumulate", True)):
        s1 = _feat(2, 6, 4, 4, seed=1).requires_grad_(True)
        s2 = _feat(2, 6, 4, 4, seed=2).requires_grad_(True)
        trd = TimeSmoothedRelationLoss(window=2, grad_mode=mode)
        trd(s1, t1)
        trd(s2, t2).backward()
        assert s2.grad is not None and s2.grad.abs().sum() > 0
        assert (s1.grad is not None and s1.grad.abs().sum() > 0) == prev_gets_grad


def test_trd_chunked_equals_unchunked():
    s1, s2 = _feat(2, 8, 5, 5, seed=1, dtype=torch.float32), _feat(2, 8, 5, 5, seed=2, dtype=torch.float32)
    t1, t2 = _feat(2, 8, 5, 5, seed=3, dtype=torch.float32), _feat(2, 8, 5, 5, seed=4, dtype=torch.float32)
    a = TimeSmoothedRelationLoss(reduction="batchmean")
    b = TimeSmoothedRelationLoss(reduction="batchmean", chunk_size=4)
    a(s1, t1), b(s1, t1)
    torch.testing.assert_close(b(s2, t2), a(s2, t2), atol=1e-6, rtol=1e-6)


def test_trd_reset_and_shape_check():
    trd = TimeSmoothedRelationLoss(window=3)
    trd(_feat(1, 4, 3, 3), _feat(1, 4, 3, 3))
    with pytest.raises(ValueError, match=r"\(1, 4, 2, 2\)"):
        trd(_feat(1, 4, 2, 2), _feat(1, 4, 2, 2))
    trd.reset()
    assert trd.pending == 0


# ==================================================================================================
# MemoryRelationLoss (MTRD)
# ==================================================================================================


def _filled_queue(c=6, steps=4, p=10):
    q = TimeAwarePixelQueue(num_steps=steps, pixels_per_step=p)
    for s in range(steps):
        q.enqueue(_feat(2, c, 3, 3, seed=100 + s), s, generator=torch.Generator().manual_seed(s))
    return q


def test_mtrd_zero_equal_positive_otherwise_and_grad():
    q = _filled_queue()
    mtrd = MemoryRelationLoss(anchors=10, memory_samples=16, seed=0)
    f = _feat(2, 6, 4, 4, seed=1)
    assert mtrd(f, f.clone(), q).item() == 0.0
    s = _feat(2, 6, 4, 4, seed=2).requires_grad_(True)
    loss = mtrd(s, f, q)
    assert loss.item() > 0.0
    loss.backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    s2 = _feat(2, 6, 4, 4, seed=2).requires_grad_(True)
    detached = MemoryRelationLoss(anchors=10, memory_samples=16, seed=0, detach_student=True)(s2, f, q)
    assert detached.item() > 0.0 and not detached.requires_grad


def test_mtrd_matches_independent_computation():
    q = _filled_queue()
    tau_c, tau_kd, weight = 0.1, 2.0, 0.3
    s, t = _feat(2, 6, 4, 4, seed=1), _feat(2, 6, 4, 4, seed=2)
    for mode in ("time_wise", "uniform"):
        mtrd = MemoryRelationLoss(tau_c=tau_c, tau_kd=tau_kd, weight=weight, anchors=12, memory_samples=20,
                                  sampling=mode)
        got = mtrd(s, t, q, generator=torch.Generator().manual_seed(9))
        g = torch.Generator().manual_seed(9)  # same draw order: memory first, then anchors
        mem, tags = q.sample(20, mode=mode, generator=g)
        assert torch.equal(tags, mtrd.last_memory_tags)
        idx = torch.randperm(32, generator=g)[:12].sort().values
        zs = F.normalize(s, dim=1).permute(0, 2, 3, 1).reshape(-1, 6)[idx]
        zt = F.normalize(t, dim=1).permute(0, 2, 3, 1).reshape(-1, 6)[idx]
        m = mem.double()
        ref = F.kl_div(F.log_softmax(zs @ m.T / tau_c / tau_kd, 1), F.softmax(zt @ m.T / tau_c / tau_kd, 1),
                       reduction="batchmean") * tau_kd**2 * weight
        torch.testing.assert_close(got, ref)


def test_mtrd_empty_queue_is_zero_and_time_wise_is_balanced():
    q = TimeAwarePixelQueue(num_steps=4, pixels_per_step=10, dim=6)
    assert MemoryRelationLoss()(_feat(1, 6, 3, 3), _feat(1, 6, 3, 3, seed=1), q).item() == 0.0
    q = _filled_queue()
    _, tags = q.sample(20, mode="time_wise", generator=torch.Generator().manual_seed(0))
    assert torch.bincount(tags, minlength=4).tolist() == [5, 5, 5, 5]
    z = F.normalize(_feat(5, 6), dim=1)
    assert memory_relation_kl(z, z, q.feats[0].double()).item() == 0.0


# ==================================================================================================
# TMD (Q-VDiT)
# ==================================================================================================


def _video(seed, b=2, c=3, f=5, h=2, w=3):
    return _feat(b, c, f, h, w, seed=seed)


def test_tmd_zero_equal_positive_otherwise_and_grad():
    x = _video(1)
    for legacy in (False, True):
        assert tmd_loss(x, x.clone(), num_frames=5, legacy_reshape=legacy).item() == 0.0
    s = _video(2).requires_grad_(True)
    loss = tmd_loss(s, x, num_frames=5, weight=100.0)
    assert loss.item() > 0.0
    loss.backward()
    assert s.grad is not None and s.grad.abs().sum() > 0


def test_tmd_frame_permutation_and_channel_invariance():
    s, t = _video(1), _video(2)
    base = tmd_loss(s, t, num_frames=5)
    frame_perm = torch.tensor([4, 2, 0, 1, 3])
    assert not torch.allclose(tmd_loss(s[:, :, frame_perm], t, num_frames=5), base)
    ch_perm = torch.tensor([2, 0, 1])
    torch.testing.assert_close(tmd_loss(s[:, ch_perm], t[:, ch_perm], num_frames=5), base)
    # permuting frames identically in both only permutes rows/cols of both relation maps
    torch.testing.assert_close(tmd_loss(s[:, :, frame_perm], t[:, :, frame_perm], num_frames=5), base)


def test_tmd_layouts_agree_and_reductions():
    s, t = _video(1), _video(2)
    base = tmd_loss(s, t, num_frames=5)
    torch.testing.assert_close(tmd_loss(s.transpose(1, 2), t.transpose(1, 2), num_frames=5, layout="b f c h w"), base)
    tok = lambda x: x.permute(0, 2, 3, 4, 1).reshape(2, 5 * 6, 3)  # noqa: E731  [b, (f h w), c]
    torch.testing.assert_close(tmd_loss(tok(s), tok(t), num_frames=5, layout="b (f n) c"), base)
    total = tmd_loss(s, t, num_frames=5, reduction="sum")
    torch.testing.assert_close(base, total / (2 * 25))
    torch.testing.assert_close(tmd_loss(s, t, num_frames=5, reduction="batchmean"), total / 2)
    torch.testing.assert_close(tmd_loss(s, t, num_frames=5, reduction="frame_mean"), total / 10)
    with pytest.raises(ValueError, match=r"\(2, 3, 5, 2, 3\)"):
        tmd_loss(s, t, num_frames=4)


def test_tmd_legacy_reshape_hand_checked():
    """b=1, c=2, t=4, h=w=1: the released ``reshape(b, t, -1)`` makes row i = memory chunk i of the
    channel-major layout: rows (c0: f0,f1), (c0: f2,f3), (c1: f0,f1), (c1: f2,f3)."""
    s_vals = [[1.0, 2.0, 0.5, -1.0], [3.0, -2.0, 1.0, 4.0]]  # [c][f]
    t_vals = [[0.0, 1.0, 2.0, 1.0], [-1.0, 1.0, 3.0, 0.5]]
    s = torch.tensor(s_vals, dtype=torch.float64).reshape(1, 2, 4, 1, 1)
    t = torch.tensor(t_vals, dtype=torch.float64).reshape(1, 2, 4, 1, 1)

    def rows(v):
        flat = v[0] + v[1]  # channel-major memory order
        return [flat[2 * i: 2 * i + 2] for i in range(4)]

    def rel(rs):
        unit = [[x / math.sqrt(sum(y * y for y in r)) for x in r] for r in rs]
        sim = [[sum(a * b for a, b in zip(u, v)) for v in unit] for u in unit]
        out = []
        for row in sim:
            z = sum(math.exp(x) for x in row)
            out.append([math.exp(x) / z for x in row])
        return out

    ps, pt = rel(rows(s_vals)), rel(rows(t_vals))
    kl = sum(pt[i][j] * (math.log(pt[i][j]) - math.log(ps[i][j])) for i in range(4) for j in range(4))
    expected = 100.0 * kl / (1 * 4 * 4)  # kl_div 'mean' × 100
    got = tmd_loss(s, t, num_frames=4, legacy_reshape=True, weight=100.0)
    assert got.item() == pytest.approx(expected, rel=1e-12)
    # paper mode differs on the same example (rows are real frames there)
    assert tmd_loss(s, t, num_frames=4, weight=100.0).item() != pytest.approx(expected, rel=1e-6)
    assert torch.equal(frame_vectors(s, 4, legacy_reshape=True)[0, 1], torch.tensor([0.5, -1.0], dtype=torch.float64))
    assert torch.equal(frame_vectors(s, 4)[0, 1], torch.tensor([2.0, -2.0], dtype=torch.float64))


def test_tmd_legacy_equals_paper_when_single_channel():
    s, t = _video(1, c=1), _video(2, c=1)
    torch.testing.assert_close(tmd_loss(s, t, 5, legacy_reshape=True), tmd_loss(s, t, 5))


def test_relation_kl_temperature_divides_both_similarity_maps():
    """τ ≠ 1 (MPQ-DM's τ; the releases use 1): softmax(S / τ) on both sides, sum-reduced KL."""
    s, t = _feat(2, 5, 3, 3, seed=3), _feat(2, 5, 3, 3, seed=4)
    b, c, h, w = s.shape

    def maps(f):
        fn = F.normalize(f, p=2, dim=1).reshape(b, c, -1)
        return torch.bmm(fn.transpose(1, 2), fn).reshape(-1, h * w)

    for tau in (0.5, 2.0):
        want = F.kl_div(F.log_softmax(maps(s) / tau, dim=1), F.softmax(maps(t) / tau, dim=1), reduction="sum")
        torch.testing.assert_close(relation_kl(s, t, tau=tau), want, rtol=1e-12, atol=1e-12)


def test_tmd_temperature_by_hand():
    """TMD at τ = 0.5: per-row KL(softmax(T_fp / τ) ‖ softmax(T_q / τ)) of the frame-cosine maps,
    'mean' = Σ / (b·t²), computed here from the frames directly."""
    s, t = _video(1), _video(2)
    b, f = s.shape[0], s.shape[2]

    def cos_map(x):
        v = F.normalize(x.transpose(1, 2).reshape(b, f, -1), dim=-1)  # frame i: all channels and pixels
        return v @ v.transpose(1, 2)

    tau = 0.5
    p_t, log_p_s = F.softmax(cos_map(t) / tau, -1), F.log_softmax(cos_map(s) / tau, -1)
    want = (p_t * (p_t.log() - log_p_s)).sum() / (b * f * f)
    torch.testing.assert_close(tmd_loss(s, t, num_frames=f, tau=tau), want)
    assert not torch.allclose(tmd_loss(s, t, num_frames=f, tau=1.0), want)
