"""fake_quantize vs PyTorch's ops, STE gradients, range initialisers."""
import pytest
import torch

from mpq_lightning.quant import fake_quantize, init_grid_search, init_lp_search, init_minmax, qrange
from mpq_lightning.quant.functional import _quant_dequant, qparams_from_range


@pytest.mark.parametrize("bits", range(1, 9))
def test_bit_exact_per_channel_and_per_tensor(bits):
    g = torch.Generator().manual_seed(bits)
    qmin, qmax = qrange(bits, False)
    for _ in range(10):
        x = torch.randn(12, 7, 3, generator=g) * 4
        scale = torch.rand(12, generator=g) * 0.7 + 1e-3
        zp = torch.randint(qmin, qmax + 1, (12,), generator=g, dtype=torch.int32)
        ref = torch.fake_quantize_per_channel_affine(x, scale, zp, 0, qmin, qmax)
        out = fake_quantize(x, scale.view(-1, 1, 1), zp.float().view(-1, 1, 1), qmin, qmax)
        assert torch.equal(ref, out)
        ref_t = torch.fake_quantize_per_tensor_affine(x, float(scale[0]), int(zp[0]), qmin, qmax)
        out_t = fake_quantize(x, scale[0], zp[0].float(), qmin, qmax)
        assert torch.equal(ref_t, out_t)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_bit_exact_symmetric_and_other_axis(bits):
    g = torch.Generator().manual_seed(0)
    qmin, qmax = qrange(bits, True)
    x = torch.randn(5, 9, generator=g) * 3
    scale = torch.rand(9, generator=g) * 0.5 + 1e-2
    zp = torch.zeros(9, dtype=torch.int32)
    ref = torch.fake_quantize_per_channel_affine(x, scale, zp, 1, qmin, qmax)
    assert torch.equal(ref, fake_quantize(x, scale.view(1, -1), zp.float().view(1, -1), qmin, qmax))


def test_ste_gradients_values():
    x = torch.tensor([-1.0, -0.26, 0.0, 0.24, 0.5, 0.9, 3.0], requires_grad=True)
    scale = torch.tensor(0.2, requires_grad=True)
    zero = torch.tensor(2.0, requires_grad=True)
    qmin, qmax = 0, 7  # representable range: (0-2)*0.2 = -0.4 .. (7-2)*0.2 = 1.0
    y = fake_quantize(x, scale, zero, qmin, qmax)
    y.backward(torch.ones_like(y))
    inside = torch.tensor([0, 1, 1, 1, 1, 1, 0], dtype=torch.float32)
    assert torch.equal(x.grad, inside)
    # LSQ: d/ds = round(x/s) - x/s inside, (q_clamped - z) outside
    xs = x.detach() / 0.2
    expected_s = torch.where(inside.bool(), torch.round(xs) - xs, torch.tensor([0.0 - 2, 0, 0, 0, 0, 0, 7 - 2]))
    torch.testing.assert_close(scale.grad, expected_s.sum(), rtol=1e-5, atol=1e-5)
    # LSQ+: d/dz = 0 inside, -s outside
    torch.testing.assert_close(zero.grad, torch.tensor(-0.2 * 2))
    # reference check of the x-gradient mask against PyTorch's own fake-quant op
    x2 = x.detach().clone().requires_grad_(True)
    torch.fake_quantize_per_tensor_affine(x2, 0.2, 2, qmin, qmax).sum().backward()
    assert torch.equal(x2.grad, x.grad)


def test_per_channel_grad_reduces_to_scale_shape():
    x = torch.randn(4, 6)
    scale = torch.full((4, 1), 0.3, requires_grad=True)
    zero = torch.zeros(4, 1, requires_grad=True)
    fake_quantize(x, scale, zero, 0, 3).sum().backward()
    assert scale.grad.shape == (4, 1) and zero.grad.shape == (4, 1)


def test_fp32_under_autocast():
    x = torch.randn(8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fake_quantize(x, torch.tensor(0.1), torch.tensor(3.0), 0, 15)
    assert y.dtype == torch.float32
    assert torch.equal(y, torch.fake_quantize_per_tensor_affine(x, 0.1, 3, 0, 15))


def test_qrange_errors():
    with pytest.raises(ValueError, match="bits must be in 1..8"):
        qrange(9, False)
    with pytest.raises(ValueError, match="symmetric 1-bit"):
        qrange(1, True)


def _heavy_tailed(rows, cols, seed):
    g = torch.Generator().manual_seed(seed)
    t = torch.distributions.StudentT(torch.tensor(2.5))
    torch.manual_seed(seed)
    return t.sample((rows, cols)) * (torch.rand(rows, 1, generator=g) + 0.1)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_searches_never_worse_than_minmax(bits):
    w = _heavy_tailed(64, 257, bits)
    qmin, qmax = qrange(bits, False)
    s0, z0 = init_minmax(w, bits, False)
    sg, zg = init_grid_search(w, bits, False)
    sl, zl = init_lp_search(w, bits, False)
    err0 = (_quant_dequant(w, s0, z0, qmin, qmax) - w)
    errg = (_quant_dequant(w, sg, zg, qmin, qmax) - w)
    errl = (_quant_dequant(w, sl, zl, qmin, qmax) - w)
    # per row, in each search's own criterion (SSE for grid, mean |.|^2.4 for Lp)
    assert torch.all(errg.pow(2).sum(1) <= err0.pow(2).sum(1) * (1 + 1e-6) + 1e-12)
    assert torch.all(errl.abs().pow(2.4).mean(1) <= err0.abs().pow(2.4).mean(1) * (1 + 1e-6) + 1e-12)
    # and strictly better on average for heavy tails at low bits
    if bits <= 4:
        assert errg.pow(2).sum() < err0.pow(2).sum()


def test_searches_vectorised_match_row_by_row():
    w = _heavy_tailed(6, 50, 1)
    s, z = init_grid_search(w, 3, False)
    for i in range(6):
        si, zi = init_grid_search(w[i : i + 1], 3, False)
        assert torch.equal(si, s[i : i + 1]) and torch.equal(zi, z[i : i + 1])


@pytest.mark.parametrize("bits,symmetric", [(1, False), (2, False), (3, False), (4, True), (5, False)])
def test_grid_histogram_search_equals_brute_force(bits, symmetric):
    """The sort-free histogram search picks the candidate a brute-force scan over all 51 ratios picks,
    including zero rows, one-signed rows, tiny rows, row chunking and without the full-range ratio."""
    from mpq_lightning.quant.functional import _search_sse_grid_hist

    w = _heavy_tailed(40, 300, bits)
    w[0], w[1], w[2], w[3] = 0.0, w[1].abs(), -w[2].abs(), 1e-12
    qmin, qmax = qrange(bits, symmetric)
    ratios = torch.cat([torch.arange(50, dtype=torch.float32) * (1.0 / 50), torch.ones(1)])  # as Q-VDiT's grid
    for full in (True, False):
        errs, cands = [], []
        for rr in ratios[: None if full else -1]:
            s_, z_ = qparams_from_range(rr * w.amin(1, keepdim=True), rr * w.amax(1, keepdim=True), bits, symmetric)
            errs.append((_quant_dequant(w, s_, z_, qmin, qmax) - w).double().pow(2).sum(1))
            cands.append(s_)
        best = torch.stack(errs, 1).argmin(1)
        expected = torch.stack(cands, 1).squeeze(2).gather(1, best.view(-1, 1))
        for budget in (2**24, 2000):  # one chunk / many row chunks
            s, _ = _search_sse_grid_hist(w, bits, symmetric, 50, full, budget)
            torch.testing.assert_close(s, expected, rtol=0, atol=0)


def test_chunked_search_matches_unchunked():
    w = _heavy_tailed(16, 64, 2)
    a = init_lp_search(w, 3, False, memory_budget=2**30)
    b = init_lp_search(w, 3, False, memory_budget=w.numel() * 3)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_symmetric_min_max_range_covers_both_extremes(bits):
    """Symmetric codes are [-2^(b-1), 2^(b-1) - 1]: the step must make the positive end reach +amax too
    (2·amax / (qmax - qmin) clipped it to 2/3 of amax at 2 bits)."""
    x = torch.tensor([[-0.5, -0.1, 0.0, 0.2, 1.0], [-1.0, -0.3, 0.0, 0.1, 0.4]])
    scale, zero = qparams_from_range(x.amin(1, keepdim=True), x.amax(1, keepdim=True), bits, True)
    qmin, qmax = qrange(bits, True)
    q = _quant_dequant(x, scale, zero, qmin, qmax)
    amax = x.abs().amax(1)
    assert torch.all(zero == 0)
    torch.testing.assert_close(q.abs().amax(1), amax)  # neither +1.0 nor -1.0 is clipped


@pytest.mark.parametrize("bits,symmetric", [(6, False), (8, False), (8, True)])
def test_grid_sorted_search_equals_brute_force(bits, symmetric):
    """At 6-8 bits ``init_grid_search`` uses the sorted prefix-sum search: its pick has the lowest
    quantize-dequantize SSE of all 51 candidates (up to float rounding of near ties)."""
    w = _heavy_tailed(24, 300, bits)
    qmin, qmax = qrange(bits, symmetric)
    s, z = init_grid_search(w, bits, symmetric)
    assert 2 * 50 * (2**bits - 1) + 2 > 4 * w.shape[1]  # the sorted path, not the histogram one
    ratios = torch.cat([torch.arange(50, dtype=torch.float32) * (1.0 / 50), torch.ones(1)])
    errs = []
    for rr in ratios:
        s_, z_ = qparams_from_range(rr * w.amin(1, keepdim=True), rr * w.amax(1, keepdim=True), bits, symmetric)
        errs.append((_quant_dequant(w, s_, z_, qmin, qmax) - w).double().pow(2).sum(1))
    best = torch.stack(errs, 1).min(1).values
    got = (_quant_dequant(w, s, z, qmin, qmax) - w).double().pow(2).sum(1)
    assert torch.all(got <= best * (1 + 1e-6) + 1e-12)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_lp_search_equals_brute_force(bits):
    """EfficientDM's Lp init: of the 80 ranges [min, max]·(1 − 0.01 i), the one with the lowest
    mean |x − Q(x)|^2.4 per row (heavy tails at low bits pick ratios far below 0.8)."""
    w = _heavy_tailed(32, 257, bits)
    qmin, qmax = qrange(bits, False)
    s, z = init_lp_search(w, bits, False)
    errs, picks = [], []
    for i in range(80):
        r = 1.0 - 0.01 * i
        s_, z_ = qparams_from_range(r * w.amin(1, keepdim=True), r * w.amax(1, keepdim=True), bits, False)
        errs.append((_quant_dequant(w, s_, z_, qmin, qmax) - w).abs().pow(2.4).mean(1))
    errs = torch.stack(errs, 1)
    got = (_quant_dequant(w, s, z, qmin, qmax) - w).abs().pow(2.4).mean(1)
    assert torch.all(got <= errs.min(1).values * (1 + 1e-5) + 1e-12)
    if bits == 2:
        assert (errs.argmin(1) > 20).any()  # the data needs the deep candidates
