"""Fake quantization with straight-through gradients, and vectorised range initialisers.

All arithmetic here is fp32, whatever the input dtype or autocast state (quantizer math must not
run in bf16/fp16: a 16-bit mantissa cannot represent a W3 grid plus its rounding boundaries).

Gradients of :func:`fake_quantize` (LSQ / LSQ+, see Esser et al. 2020 and Bhalgat et al. 2020):

* x:          1 where ``round(x / s) + z`` lies inside ``[qmin, qmax]``, else 0 (the mask PyTorch's
              ``fake_quantize_*_affine`` uses).
* scale s:    ``round(x/s) - x/s`` inside the range, ``q_clamped - z`` outside (LSQ).
* zero z:     0 inside the range, ``-s`` outside (LSQ+ offset gradient, written for an integer
              zero point: LSQ+'s ``beta = -z s``). The forward rounds z, the backward is STE.

Both are multiplied by an optional ``grad_scale`` (LSQ's ``g = 1/sqrt(N qmax)``; 1.0 = off, the
EfficientDM / Q-VDiT choice).
"""
from __future__ import annotations

import functools
import importlib.util
import math
import os
import shutil

import torch
from torch import Tensor

# ---------------------------------------------------------------------------------------------
# Integer ranges
# ---------------------------------------------------------------------------------------------


def qrange(bits: int, symmetric: bool) -> tuple[int, int]:
    """Integer code range of a ``bits``-bit quantizer: asymmetric [0, 2^b-1], symmetric signed."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    if symmetric:
        if bits == 1:
            raise ValueError(
                "a symmetric 1-bit quantizer has no level on each side of zero; use symmetric=False "
                "(asymmetric 1-bit: two levels) or a binary residual branch (FZ-RMQ)"
            )
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


# ---------------------------------------------------------------------------------------------
# STE primitives
# ---------------------------------------------------------------------------------------------


def round_ste(x: Tensor) -> Tensor:
    """Round half to even in the forward pass, identity in the backward pass."""
    return x + (torch.round(x) - x).detach()


def sign_ste(x: Tensor) -> Tensor:
    """sign(x) in {-1, +1} (0 maps to +1) forward, identity gradient (straight-through)."""
    return _SignSTE.apply(x)


class _SignSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):  # type: ignore[override]
        return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return grad


class _FakeQuantize(torch.autograd.Function):
    """``min(max(round(x / s), qmin - z), qmax - z) * s``, equal bit for bit to
    ``(clamp(round(x/s) + z, qmin, qmax) - z) * s`` (every value is an integer in fp32). The in-range
    mask is saved as fp32 0/1 ("the clamp changed nothing") so the backward multiplies instead of
    selecting; only what the requested gradients need is saved."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin, qmax, grad_scale):  # type: ignore[override]
        s = scale.float()
        z = torch.round(zero_point.float())
        xs = x.float() * (1.0 / s)
        r = torch.round(xs)
        rc = torch.minimum(torch.maximum(r, qmin - z), qmax - z)
        out = rc * s
        # 1.0 where round(x/s) + z is in [qmin, qmax]
        inside = (rc == r).to(rc.dtype) if torch.compiler.is_compiling() else torch.eq(rc, r, out=torch.empty_like(rc))
        need_s, need_z = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        ctx.save_for_backward(inside, xs if need_s else None, rc if need_s else None, s if need_z else None)
        ctx.grad_scale = grad_scale
        ctx.shapes = (scale.shape, zero_point.shape)
        return out

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        inside, xs, rc, s = ctx.saved_tensors
        s_shape, z_shape = ctx.shapes
        g = grad.float()
        gx = g * inside
        gs = gz = None
        if ctx.needs_input_grad[1]:  # LSQ: round(x/s) - x/s inside (rc = r there), q_clamped - z outside
            gs = (g * torch.addcmul(rc, xs, inside, value=-1)).sum_to_size(s_shape)
            gs = gs if ctx.grad_scale == 1.0 else gs * ctx.grad_scale
        if ctx.needs_input_grad[2]:  # LSQ+: 0 inside, -s outside
            d = gx - g
            gz = d.sum_to_size(z_shape) * s if s.shape == z_shape else (d * s).sum_to_size(z_shape)
            gz = gz if ctx.grad_scale == 1.0 else gz * ctx.grad_scale
        return gx.to(grad.dtype), gs, gz, None, None, None


def fake_quantize(
    x: Tensor,
    scale: Tensor,
    zero_point: Tensor,
    qmin: int,
    qmax: int,
    grad_scale: float = 1.0,
) -> Tensor:
    """``(clamp(round(x / s) + round(z), qmin, qmax) - round(z)) * s`` in fp32 with LSQ/LSQ+ grads.

    ``scale`` and ``zero_point`` broadcast against ``x``. The forward is bit-identical (CPU, fp32)
    to ``torch.fake_quantize_per_tensor_affine`` / ``torch.fake_quantize_per_channel_affine`` for
    integer zero points. The result is fp32. With :func:`set_compiled_quantizers` on, the same
    function runs through ``torch.compile`` (fused element-wise kernels, same values).
    """
    if torch.is_autocast_enabled(x.device.type):  # quantizer math stays fp32 under autocast
        with torch.autocast(device_type=x.device.type, enabled=False):
            return fake_quantize(x, scale, zero_point, qmin, qmax, grad_scale)
    if not torch.is_tensor(scale):
        scale = torch.tensor(float(scale), device=x.device)
    if not torch.is_tensor(zero_point):
        zero_point = torch.tensor(float(zero_point), device=x.device)
    if _COMPILE.enabled and not torch.compiler.is_compiling():
        rows = _leading_rows(x.shape, scale.shape)
        zrows = _leading_rows(x.shape, zero_point.shape)
        if rows is not None and zrows in (rows, 1):
            # one 2-D [rows, K] form for every granularity: few graphs, no recompiles per rank
            fn = _compiled(_fake_quantize_rows)
            return fn(x.reshape(rows, -1), scale.reshape(-1, 1), zero_point.reshape(-1, 1),
                      int(qmin), int(qmax), float(grad_scale)).view(x.shape)
    return _FakeQuantize.apply(x, scale, zero_point, int(qmin), int(qmax), float(grad_scale))


def _fake_quantize_rows(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int, grad_scale: float) -> Tensor:
    return _FakeQuantize.apply(x, scale, zero_point, qmin, qmax, grad_scale)


# ---------------------------------------------------------------------------------------------
# Optional torch.compile of the element-wise quantizer math
# ---------------------------------------------------------------------------------------------


class _CompileState:
    enabled = False
    fns: dict = {}


_COMPILE = _CompileState()
RECOMPILE_LIMIT = 64  # graphs per quantizer function: bit widths x grad modes x which inputs need grad


def _leading_rows(x_shape: torch.Size, p_shape: torch.Size) -> int | None:
    """Rows ``R`` such that a parameter of shape ``p_shape`` broadcast on ``x`` is one value per row of
    ``x.reshape(R, -1)`` (per tensor: 1; per output channel / group / token / sample: leading dims),
    or None when it is not of that form (e.g. a per-input-channel vector)."""
    nd = len(x_shape)
    if len(p_shape) > nd:
        return None
    ps = (1,) * (nd - len(p_shape)) + tuple(p_shape)
    k = nd
    while k > 0 and ps[k - 1] == 1:
        k -= 1
    if tuple(ps[:k]) != tuple(x_shape[:k]):
        return None
    return math.prod(x_shape[:k])


def _compiled(fn):
    """``torch.compile(fn, dynamic=True)``, built once per function."""
    c = _COMPILE.fns.get(fn)
    if c is None:
        import torch._dynamo.config as dynamo_config

        dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, RECOMPILE_LIMIT)
        c = _COMPILE.fns[fn] = torch.compile(fn, dynamic=True)
    return c


def set_compiled_quantizers(enabled: bool) -> bool:
    """Switch ``torch.compile`` of the quantizer math on or off; returns the previous setting.
    Quantized layers switch it per forward from their ``LayerSpec.compile_quantizers``."""
    previous = _COMPILE.enabled
    _COMPILE.enabled = bool(enabled)
    return previous


def quantizer_compile_enabled() -> bool:
    return _COMPILE.enabled


def check_compile_support(device: torch.device | str, key: str = "model.quant.compile_quantizers") -> None:
    """Refuse a compile switch (``key``, as the command line spells it) up front where
    ``torch.compile`` cannot build kernels: no C++ compiler on CPU (inductor), no Triton on CUDA."""
    device = torch.device(device)
    if device.type == "cpu" and not os.environ.get("CXX") and not any(map(shutil.which, ("g++", "c++", "clang++"))):
        raise RuntimeError(f"{key}=true on CPU needs a C++ compiler for torch.compile "
                           "(none of g++ / c++ / clang++ is on PATH and CXX is unset): install one or set "
                           f"{key} false")
    if device.type == "cuda" and importlib.util.find_spec("triton") is None:
        raise RuntimeError(f"{key}=true on CUDA needs Triton (pip install triton) or set {key} false")


def compilable(fn):
    """Decorator for pure quantizer functions: run through ``torch.compile`` while compiled
    quantizers are switched on (and not already inside a traced region), eagerly otherwise."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if _COMPILE.enabled and not torch.compiler.is_compiling():
            return _compiled(fn)(*args, **kwargs)
        return fn(*args, **kwargs)

    return wrapper


# ---------------------------------------------------------------------------------------------
# Quantization parameters from a range
# ---------------------------------------------------------------------------------------------

EPS = 1e-8


def qparams_from_range(
    xmin: Tensor, xmax: Tensor, bits: int, symmetric: bool
) -> tuple[Tensor, Tensor]:
    """Step and (integer-valued, fp32) zero point covering ``[xmin, xmax]`` (zero included)."""
    qmin, qmax = qrange(bits, symmetric)
    xmin = torch.minimum(xmin.float(), torch.zeros_like(xmin, dtype=torch.float32))
    xmax = torch.maximum(xmax.float(), torch.zeros_like(xmax, dtype=torch.float32))
    if symmetric:
        amax = torch.maximum(-xmin, xmax)
        # qmax·s ≥ amax and qmin·s ≤ -amax: the whole range is covered at every bit width (2·amax/(qmax-qmin)
        # would clip +amax to 2/3 of it at 2 bits, [-2, 1] codes, and the Lp / grid searches only shrink)
        scale = (amax / qmax).clamp_min(EPS)
        zero = torch.zeros_like(scale)
    else:
        scale = ((xmax - xmin) / (qmax - qmin)).clamp_min(EPS)
        zero = (qmin - torch.round(xmin / scale)).clamp(qmin, qmax)
    return scale, zero


def _quant_dequant(x: Tensor, scale: Tensor, zero: Tensor, qmin: int, qmax: int) -> Tensor:
    """Plain (no autograd bookkeeping) fake-quant used by the searches; same math as the forward.
    One new tensor of the broadcast shape, then in place: the searches run it over every candidate
    at once, where a temporary per operation cost 4x the time on a CPU."""
    q = x * (1.0 / scale)
    return q.round_().add_(zero).clamp_(qmin, qmax).sub_(zero).mul_(scale)


# ---------------------------------------------------------------------------------------------
# Initialisers. ``x`` is a 2-D view [rows, K]: one (scale, zero) per row. Vectorised over rows
# and over candidates; candidates are processed in chunks sized by ``memory_budget`` elements.
# ---------------------------------------------------------------------------------------------


def init_minmax(x: Tensor, bits: int, symmetric: bool) -> tuple[Tensor, Tensor]:
    """Per-row min/max range. Returns scale, zero of shape [rows, 1]."""
    x = x.detach().float()
    return qparams_from_range(x.amin(1, keepdim=True), x.amax(1, keepdim=True), bits, symmetric)


def _search(
    x: Tensor,
    bits: int,
    symmetric: bool,
    ratios: Tensor,
    error_fn,
    memory_budget: int,
) -> tuple[Tensor, Tensor]:
    """Shrink the per-row [min, max] range by every ratio, keep the ratio with the lowest error.
    ``error_fn`` gets the candidates' errors ``Q(x) - x`` [n, rows, K] as scratch it may overwrite."""
    x = x.detach().float()
    qmin, qmax = qrange(bits, symmetric)
    lo = x.amin(1, keepdim=True)
    hi = x.amax(1, keepdim=True)
    rows, k = x.shape
    best_err = torch.full((rows, 1), float("inf"), device=x.device)
    best_scale = torch.empty(rows, 1, device=x.device)
    best_zero = torch.empty(rows, 1, device=x.device)
    chunk = max(1, memory_budget // max(1, x.numel()))
    ratios = ratios.to(x.device, torch.float32)
    for start in range(0, len(ratios), chunk):  # fixed number of chunks, not per channel
        r = ratios[start : start + chunk].view(-1, 1, 1)  # [n, 1, 1]
        scale, zero = qparams_from_range(r * lo, r * hi, bits, symmetric)  # [n, rows, 1]
        err = error_fn(_quant_dequant(x.unsqueeze(0), scale, zero, qmin, qmax).sub_(x))  # [n, rows, 1]
        e, i = err.min(0)
        better = e < best_err
        pick = i.view(1, rows, 1)
        best_scale = torch.where(better, scale.gather(0, pick)[0], best_scale)
        best_zero = torch.where(better, zero.gather(0, pick)[0], best_zero)
        best_err = torch.where(better, e, best_err)
    return best_scale, best_zero


def lp_error_(d: Tensor, p: float = 2.4) -> Tensor:
    """The Lp search's score of candidate errors ``d`` [n, rows, K]: ``mean |d|^p`` per row, computed
    in place (``d`` is the search's scratch)."""
    return d.abs_().pow_(p).mean(-1, keepdim=True)


def init_lp_search(
    x: Tensor,
    bits: int,
    symmetric: bool,
    p: float = 2.4,
    num_candidates: int = 80,
    memory_budget: int = 2**22,
) -> tuple[Tensor, Tensor]:
    """EfficientDM / LAPQ 'mse' init: shrink [min, max] by ``1 - 0.01 i`` (i < 80), score by
    ``mean |x - Q(x)|^p``. Candidate i = 0 is the min-max range, so it is never worse than min-max."""
    ratios = 1.0 - 0.01 * torch.arange(num_candidates, dtype=torch.float32)
    ratios = ratios[ratios > 0]
    return _search(x, bits, symmetric, ratios, lambda d: lp_error_(d, p), memory_budget)


def _search_sse_sorted(
    x: Tensor, bits: int, symmetric: bool, ratios: Tensor, memory_budget: int
) -> tuple[Tensor, Tensor]:
    """Exact-SSE range search without quantizing every element for every candidate.

    Rows are sorted once; with float64 prefix sums of x and x², the SSE of a candidate (s, z) is
    ``Σ_q [Σx² − 2 v_q Σx + n_q v_q²]`` over its 2^b code bins, whose edges ``(q − z + ½) s`` are
    found by ``searchsorted``: O(2^b log K) per row and candidate instead of O(K). Elements lying
    exactly on a rounding edge go to the upper bin (PyTorch rounds half to even), a measure-zero
    difference that only matters for exact ties between candidates.
    """
    x = x.detach().float()
    qmin, qmax = qrange(bits, symmetric)
    rows, k = x.shape
    xs = x.sort(dim=1).values.double()
    zero_col = torch.zeros(rows, 1, dtype=torch.float64, device=x.device)
    c1 = torch.cat([zero_col, xs.cumsum(1)], 1)
    c2 = torch.cat([zero_col, xs.pow(2).cumsum(1)], 1)
    lo, hi = xs[:, :1], xs[:, -1:]
    codes = torch.arange(qmin, qmax + 1, dtype=torch.float64, device=x.device)  # [L]
    levels = codes.numel()
    ratios = ratios.to(x.device, torch.float64)
    best_err = torch.full((rows,), float("inf"), dtype=torch.float64, device=x.device)
    best_scale = torch.empty(rows, 1, device=x.device)
    best_zero = torch.empty(rows, 1, device=x.device)
    chunk = max(1, memory_budget // max(1, rows * levels * 4))
    for start in range(0, len(ratios), chunk):  # fixed number of chunks, not per channel
        r = ratios[start : start + chunk].view(1, -1, 1)  # [1, n, 1]
        scale32, zero32 = qparams_from_range((r * lo.unsqueeze(1)).float(), (r * hi.unsqueeze(1)).float(), bits, symmetric)
        scale, zero = scale32.double(), zero32.double()  # [rows, n, 1]
        n = scale.shape[1]
        edges = (codes[:-1] - zero + 0.5) * scale  # [rows, n, L-1]
        idx = torch.searchsorted(xs, edges.reshape(rows, -1)).view(rows, n, levels - 1)
        idx = torch.cat([idx.new_zeros(rows, n, 1), idx, idx.new_full((rows, n, 1), k)], 2)  # [rows, n, L+1]
        s1 = c1.gather(1, idx.view(rows, -1)).view(rows, n, -1).diff(dim=2)
        s2 = c2.gather(1, idx.view(rows, -1)).view(rows, n, -1).diff(dim=2)
        cnt = idx.diff(dim=2).double()
        v = (codes - zero) * scale  # dequantised level of every code, [rows, n, L]
        err = (s2 - 2 * v * s1 + cnt * v * v).sum(2)  # [rows, n]
        e, i = err.min(1)
        better = e < best_err
        best_scale = torch.where(better.view(-1, 1), scale32.gather(1, i.view(-1, 1, 1)).view(-1, 1), best_scale)
        best_zero = torch.where(better.view(-1, 1), zero32.gather(1, i.view(-1, 1, 1)).view(-1, 1), best_zero)
        best_err = torch.where(better, e, best_err)
    return best_scale, best_zero


def _ratio_grid(num_ratios: int, include_full_range: bool) -> Tensor:
    """Q-VDiT's candidate ratios ``i / n`` (fp32, i = 0..n-1), plus 1.0 with ``include_full_range``."""
    ratios = torch.arange(num_ratios, dtype=torch.float32) * (1.0 / num_ratios)
    return torch.cat([ratios, torch.ones(1)]) if include_full_range else ratios


def _search_sse_grid_hist(
    x: Tensor, bits: int, symmetric: bool, num_ratios: int, include_full_range: bool, memory_budget: int
) -> tuple[Tensor, Tensor]:
    """Exact-SSE search over the ratio grid ``i / n`` (i = 0..n) from one histogram per row, no sort.

    Every candidate's zero point equals the full range's ``z`` (the ratio cancels in ``lo / scale``) and
    its step is ``scale_1 * i / n``, so each rounding edge ``(c - z + 1/2) * scale_1 * i / n`` is the
    integer ``(2c - 2z + 1) * i`` in units of ``scale_1 / 2n``. Cells ``[g, g + 1)`` of
    ``g = floor(2n x / scale_1)`` hold no edge inside, so per-row histograms of count and Σx over the
    ~2n(2^b - 1) cells (int32 cell index; Σx accumulated in fp32 per cell, cumulative sums in float64)
    give every candidate's per-bin sums: O(K) per row plus O(n 2^b) per candidate. Σx² is not needed:
    over a candidate's bins it always sums to the row's Σx², a constant that cannot move the argmin.
    Rows where the zero point differs between ratios (float rounding at a .5 tie) or whose range is at
    the fp32 floor go through :func:`_search_sse_sorted`. Elements within float rounding of an edge
    may fall in the neighbouring bin (measure zero, as for the sorted search).
    """
    x = x.detach().float()
    qmin, qmax = qrange(bits, symmetric)
    rows, k = x.shape
    n, dev = num_ratios, x.device
    r = _ratio_grid(n, True).to(dev)  # i / n, i = 0..n
    lo, hi = x.amin(1, keepdim=True), x.amax(1, keepdim=True)
    scale, zero = qparams_from_range(r * lo, r * hi, bits, symmetric)  # [rows, n + 1]: the candidates
    z, s1 = zero[:, -1:], scale[:, -1:]
    codes = torch.arange(qmin, qmax + 1, dtype=torch.float64, device=dev)
    unit = (2 * n) / s1
    gmin, gmax = torch.floor(torch.minimum(lo, torch.zeros_like(lo)) * unit), torch.floor(hi.clamp_min(0) * unit)
    cells = int((gmax - gmin).max().item()) + 1
    err = torch.empty(rows, n + 1, dtype=torch.float64, device=dev)
    ii = torch.arange(1, n + 1, device=dev, dtype=torch.float64).view(1, -1, 1)
    # row chunks bound memory and keep every flat cell index an exact float32 integer (< 2^24)
    chunk = max(1, min(memory_budget // (2 * cells + k), (2**24 - 1) // cells))
    for start in range(0, rows, chunk):
        sl = slice(start, start + chunk)
        xc, m = x[sl], x[sl].shape[0]
        g = torch.floor(xc * unit[sl])  # in [gmin, gmax] of its row by monotonicity of fp32 mul and floor
        g.add_(torch.arange(m, device=dev, dtype=torch.float32).view(-1, 1) * cells - gmin[sl])
        flat = g.view(-1).int()
        zero_col = torch.zeros(m, 1, dtype=torch.float64, device=dev)
        # per-cell count and Σx (no Σx², see the docstring)
        cum = [torch.cat([zero_col, torch.bincount(flat, weights=w, minlength=m * cells).view(m, cells)
                          .cumsum(1, dtype=torch.float64)], 1) for w in (None, xc.reshape(-1))]
        e = (2 * codes[:-1] - 2 * z[sl].double() + 1).unsqueeze(1) * ii  # [m, n, L-1] edges of ratios 1..n
        j = (e - gmin[sl].double().unsqueeze(1)).clamp(0, cells).long()
        idx = torch.cat([j.new_zeros(m, n, 1), j, j.new_full((m, n, 1), cells)], 2).view(m, -1)
        s0, s1_ = (c.gather(1, idx).view(m, n, -1).diff(dim=2) for c in cum)
        v = (codes - zero[sl, 1:].double().unsqueeze(2)) * scale[sl, 1:].double().unsqueeze(2)  # [m, n, L]
        err[sl, 1:] = (s0 * v * v - 2 * v * s1_).sum(2)  # SSE minus the row's Σx²
        # ratio 0: step EPS, every x < 0 lands on the lowest level, every x >= 0 on the highest
        neg = (-gmin[sl]).clamp(0, cells).long()
        v0 = (torch.tensor([qmin, qmax], dtype=torch.float64, device=dev) - zero[sl, :1].double()) * scale[sl, :1].double()
        tot = [c[:, -1:] for c in cum]
        below = [c.gather(1, neg) for c in cum]
        err[sl, :1] = (below[0] * v0[:, :1] ** 2 - 2 * v0[:, :1] * below[1]
                       + (tot[0] - below[0]) * v0[:, 1:] ** 2 - 2 * v0[:, 1:] * (tot[1] - below[1]))
    if not include_full_range:
        err[:, -1] = float("inf")
    best = err.argmin(1, keepdim=True)
    out_s, out_z = scale.gather(1, best), zero.gather(1, best)
    exact = ~(zero[:, 1:] == z).all(1) | ((hi - lo).view(-1) < 1e3 * EPS * (qmax - qmin))
    if exact.any():
        s_e, z_e = _search_sse_sorted(x[exact], bits, symmetric, r if include_full_range else r[:-1], memory_budget)
        out_s[exact], out_z[exact] = s_e, z_e
    return out_s, out_z


def init_grid_search(
    x: Tensor,
    bits: int,
    symmetric: bool,
    num_ratios: int = 50,
    include_full_range: bool = True,
    memory_budget: int = 2**24,
) -> tuple[Tensor, Tensor]:
    """Q-VDiT ``grid_search_lp`` init: ratios 0, 0.02, ..., 0.98 of the zero-including per-row
    range, per-row sum of squared errors. ``include_full_range`` adds ratio 1.0 (= min-max), which
    the release omits, so the result is never worse than min-max. The release scores each candidate
    with ``x / (delta + 1e-4)``; we score the quantizer actually used (documented deviation).
    Low bit widths (histogram cells <= 4 K) use :func:`_search_sse_grid_hist`, others the sorted
    prefix-sum search; both are exact up to elements lying on a rounding edge."""
    x = x.detach().float()
    cells = 2 * num_ratios * (2**bits - 1) + 2
    if cells <= 4 * x.shape[1]:
        return _search_sse_grid_hist(x, bits, symmetric, num_ratios, include_full_range, memory_budget)
    return _search_sse_sorted(x, bits, symmetric, _ratio_grid(num_ratios, include_full_range), memory_budget)


INITIALISERS = {"minmax": init_minmax, "lp": init_lp_search, "grid": init_grid_search}


def init_qparams(x2d: Tensor, bits: int, symmetric: bool, method: str) -> tuple[Tensor, Tensor]:
    """Dispatch to one of :data:`INITIALISERS` by name."""
    try:
        fn = INITIALISERS[method]
    except KeyError:
        raise ValueError(f"unknown quantizer init {method!r}; choose one of {sorted(INITIALISERS)}") from None
    return fn(x2d, bits, symmetric)


@torch.no_grad()
def assign_(param: Tensor, value: Tensor) -> None:
    """Write ``value`` into ``param`` in place (same storage, version bumped) when the shapes agree,
    else rebind its data. In place matters under FSDP: ``summon_full_params(writeback=True)`` writes
    back what was written into the gathered parameters, not a rebound ``.data``."""
    if param.shape == value.shape:
        param.copy_(value)
    else:
        param.data = value.to(param.device)


def lsq_grad_scale(numel: int, qmax: int) -> float:
    """LSQ's step-gradient scale ``1 / sqrt(N * qmax)``."""
    return 1.0 / math.sqrt(max(1, numel) * max(1, qmax))
