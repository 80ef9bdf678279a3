"""Intra-layer mixed-precision weight quantizers: OMQ (MPQ-DM) and FZ-RMQ (MPQ-DMv2).

Both rank the output channels of the (pre-scaled) weight ``W_s`` by kurtosis and split them into
three equal-average classes, ``0 = unsalient`` (lowest κ), ``1 = normal``, ``2 = salient`` (highest
κ), with ``|salient| = |unsalient| = k`` (mpqdm.md §3.3):

* :class:`OMQQuantizer` (MPQ-DM §3.3): one channel-wise uniform quantizer per class at
  ``N-1 / N / N+1`` bits.
* :class:`FZRMQQuantizer` (MPQ-DMv2, papers_extra.md §1.1, ``layout="figure"``): an ``(n-1)``-bit
  base on every channel, ``+ b1 sign(R1)`` on normal and salient channels, ``+ b2 sign(R2)`` on
  salient channels only, ``R1 = W - Q_base(W)``, ``R2 = R1 - b1 sign(R1)``. ``layout="proposal"``
  is mpqdm.md §4.1: ``N-1`` / ``N`` uniform, salient ``= Q_N(W) + b sign(W - Q_N(W))``.

The split size ``k`` is searched over ``{0, g, 2g, …, ⌊Cout/2⌋}`` (``search="paper"``) or ``{0, g}``
(``search="release"``), ``g = ⌊Cout · group_frac⌋``, scoring the calibration output MSE
``MSE(op(X_s, Ŵ_s), op(X, W))`` (:func:`init_mixed_quantizer`). The scored class fits use the
quantizer's own init method by default, i.e. the search scores the quantizer then used;
``search_init="minmax"`` is the MPQ-DM release (mpqdm.md §3.3 steps 5–6: min-max fits for the
search, the chosen classes then fitted with the init method). The output error is additive over
output channels, so every class is reconstructed once for all channels and each candidate ``k``
costs one sum: the search is exact and vectorised (no per-channel or per-candidate quantization).

Every quantizer takes and returns the full weight ``[Cout, Cin, *k]``; the residuals are recomputed
from whatever weight it is given, i.e. from the current latent weight ``(W_base + B A) · s``.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor, nn

from .functional import (INITIALISERS, _quant_dequant, assign_, compilable, fake_quantize, init_qparams, lp_error_,
                         lsq_grad_scale, qparams_from_range, qrange, sign_ste)
from .quantizers import UniformQuantizer

CLASS_NAMES = ("unsalient", "normal", "salient")
OMQ_SEARCHES = ("paper", "release")
FZRMQ_LAYOUTS = ("figure", "proposal")
FZRMQ_BASE_FITS = ("joint", "greedy")
META_FLOAT_BITS = 16  # bits charged per stored FP scalar (step, residual scale) in bit accounting


# ---------------------------------------------------------------------------------------------
# Kurtosis ranking and split candidates (mpqdm.md §3.3 steps 1-4)
# ---------------------------------------------------------------------------------------------


def channel_kurtosis(w: Tensor) -> Tensor:
    """Per-output-channel kurtosis ``mean((w - μ)^4) / σ^4`` of ``w`` [Cout, ...], ``σ`` the unbiased
    std (torch default, as the MPQ-DM release). Constant channels (σ = 0) get ``-inf`` (least salient:
    any bit-width reproduces them exactly)."""
    rows = w.detach().float().reshape(w.shape[0], -1)
    if rows.shape[1] < 2:  # one weight per channel (fan-in 1): no spread to rank by, and no torch warning
        return torch.full((rows.shape[0],), float("-inf"), device=rows.device)
    mu = rows.mean(1, keepdim=True)
    sigma = rows.std(1, keepdim=True)  # unbiased
    kurt = ((rows - mu) ** 4).mean(1) / sigma.squeeze(1) ** 4
    return torch.where(torch.isfinite(kurt), kurt, torch.full_like(kurt, float("-inf")))


def split_candidates(cout: int, group_frac: float, search: str) -> list[int]:
    """Candidate sizes ``k`` of the salient (= unsalient) class.

    ``paper``: multiples of ``g = ⌊Cout · group_frac⌋`` up to ``⌊Cout/2⌋``; ``release``: ``{0, g}``
    (the released MPQ-DM loop). ``g = 0`` (tiny layers) leaves ``{0}``: the layer stays at N bits."""
    if search not in OMQ_SEARCHES:
        raise ValueError(f"unknown omq_search {search!r}; choose one of {OMQ_SEARCHES}")
    g = int(math.floor(cout * group_frac))
    if g <= 0:
        return [0]
    if search == "release":
        return [0, g] if g <= cout // 2 else [0]
    return list(range(0, cout // 2 + 1, g))


def classes_for_split(order: Tensor, k: int) -> Tensor:
    """Class id per channel (0 unsalient / 1 normal / 2 salient) given ``order`` = channels sorted by
    decreasing kurtosis: the first ``k`` are salient, the last ``k`` unsalient."""
    cls = torch.ones(order.numel(), dtype=torch.long, device=order.device)
    if k:
        cls[order[:k]] = 2
        cls[order[order.numel() - k :]] = 0
    return cls


# ---------------------------------------------------------------------------------------------
# Common machinery
# ---------------------------------------------------------------------------------------------


class MixedQuantizerBase(nn.Module):
    """Channel-class bookkeeping shared by OMQ and FZ-RMQ.

    State (registered at construction, so a checkpoint restores strictly): ``group_id`` [Cout]
    (0/1/2, all ``normal`` before calibration), ``split`` (the chosen ``k``), ``initialized``.
    Subclasses implement :meth:`class_reconstructions` (the weight every channel would get in each
    class) and :meth:`forward`.
    """

    kind = "mixed"

    def __init__(self, bits: int, weight_shape: tuple[int, ...], init: str = "lp",
                 group_frac: float = 0.1, search: str = "paper", search_init: str | None = None) -> None:
        super().__init__()
        if search not in OMQ_SEARCHES:
            raise ValueError(f"unknown omq_search {search!r}; choose one of {OMQ_SEARCHES}")
        if search_init is not None and search_init not in INITIALISERS:
            raise ValueError(f"unknown omq_search_init {search_init!r}; choose None or one of {sorted(INITIALISERS)}")
        if not 0.0 < group_frac <= 0.5:
            raise ValueError(f"omq_group_frac must be in (0, 0.5], got {group_frac!r}")
        self.bits, self.init_method = int(bits), init
        self.group_frac, self.search = float(group_frac), search
        self.search_init = search_init
        self.weight_shape = tuple(weight_shape)
        cout = self.weight_shape[0]
        self.register_buffer("group_id", torch.ones(cout, dtype=torch.long))
        self.register_buffer("split", torch.tensor(0, dtype=torch.long))
        self.register_buffer("initialized", torch.tensor(False))
        self._cache_key: tuple | None = None
        self._cache: dict = {}

    # -- class bookkeeping -----------------------------------------------------------------------
    def candidates(self) -> list[int]:
        return split_candidates(self.weight_shape[0], self.group_frac, self.search)

    @torch.no_grad()
    def set_classes(self, group_id: Tensor) -> None:
        if group_id.shape != self.group_id.shape:
            raise ValueError(f"group_id must have shape {tuple(self.group_id.shape)}, got {tuple(group_id.shape)}")
        self.group_id.copy_(group_id.to(self.group_id))
        self.split.fill_(int((self.group_id == 2).sum()))
        self._cache, self._cache_key = {}, None

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        self._cache, self._cache_key = {}, None
        super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, fn, recurse=True):
        self._cache, self._cache_key = {}, None
        return super()._apply(fn, recurse)

    def _derived(self, name: str, build: Callable[[], object]):
        """``build()`` cached on ``group_id`` (invalidated by any in-place write, including
        ``load_state_dict``, and by a move to another device)."""
        if torch.compiler.is_compiling() and name in self._cache:
            # dynamo cannot trace data pointers; the cache is also cleared by set_classes, state-dict
            # loads and device moves (above), which is all that writes group_id in this codebase
            return self._cache[name]
        key = (self.group_id.data_ptr(), self.group_id._version, self.group_id.device)
        if self._cache_key != key:
            self._cache, self._cache_key = {}, key
        if name not in self._cache:
            self._cache[name] = build()
        return self._cache[name]

    def _class_index(self) -> tuple[Tensor, Tensor, list[int]]:
        """(permutation sorting channels by class, its inverse, class sizes), cached on ``group_id``."""

        def build():
            perm = torch.argsort(self.group_id, stable=True)
            inv = torch.empty_like(perm)
            inv[perm] = torch.arange(perm.numel(), device=perm.device)
            return perm, inv, torch.bincount(self.group_id, minlength=3).tolist()

        return self._derived("index", build)  # type: ignore[return-value]

    def class_masks(self) -> tuple[Tensor, Tensor]:
        """(normal ∪ salient, salient) float masks [Cout, 1], cached on ``group_id``."""
        return self._derived("masks", lambda: (self.class_mask((1, 2)), self.class_mask((2,))))  # type: ignore[return-value]

    def class_mask(self, classes: tuple[int, ...]) -> Tensor:
        """[Cout, 1] float mask of the channels whose class is in ``classes``."""
        m = torch.zeros_like(self.group_id, dtype=torch.bool)
        for c in classes:
            m |= self.group_id == c
        return m.float().unsqueeze(1)

    # -- to implement ----------------------------------------------------------------------------
    def fit(self, w: Tensor, method: str | None = None) -> None:  # pragma: no cover - abstract
        """Fit every class's quantizer parameters on all channels of ``w`` (classes unchanged) with the
        init ``method`` (default: the quantizer's own)."""
        raise NotImplementedError

    def class_reconstructions(self, w: Tensor) -> list[Tensor]:  # pragma: no cover - abstract
        """Three tensors shaped like ``w``: the reconstruction of every channel in class 0 / 1 / 2."""
        raise NotImplementedError

    def class_bits(self) -> tuple[int, int, int]:  # pragma: no cover - abstract
        raise NotImplementedError

    def class_metadata_bits(self) -> tuple[int, int, int]:  # pragma: no cover - abstract
        """Metadata bits per channel of each class (FP steps, integer zero points, residual scales)."""
        raise NotImplementedError

    @torch.no_grad()
    def refit(self, w: Tensor) -> None:
        """Re-fit steps (and residual scales) on ``w`` keeping the channel classes."""
        self.fit(w.detach().float())

    # -- initialisation --------------------------------------------------------------------------
    @torch.no_grad()
    def initialize(self, w: Tensor, row_error: Callable[[Tensor], Tensor] | None = None) -> dict:
        """Kurtosis ranking, per-class fits and split search on the pre-scaled weight ``w``.

        ``row_error(D)`` maps a weight-error tensor shaped like ``w`` to the per-output-channel
        error [Cout] (the calibration output MSE built by :func:`init_mixed_quantizer`); without it
        the weight-space squared error is used. The class fits scored are made with ``search_init``
        where it is set and differs from the init method; the chosen classes are then fitted with the
        init method (the MPQ-DM release). Returns ``{"k": chosen, "errors": {k: err}}``.
        """
        w = w.detach().float()
        if tuple(w.shape) != self.weight_shape:
            raise ValueError(f"{type(self).__name__} was built for a weight {self.weight_shape}, got {tuple(w.shape)}")
        order = torch.argsort(channel_kurtosis(w), descending=True, stable=True)
        refit = self.search_init is not None and self.search_init != self.init_method
        self.fit(w, self.search_init if refit else None)
        recs = self.class_reconstructions(w)
        if row_error is None:
            row_error = lambda d: d.reshape(d.shape[0], -1).pow(2).sum(1)  # noqa: E731
        per_class = torch.stack([row_error(r - w).double() for r in recs])  # [3, Cout]
        errors: dict[int, float] = {}
        best_k, best = 0, None
        for k in self.candidates():  # ≤ 6 candidates, each a sum over channels
            e = per_class.gather(0, classes_for_split(order, k).view(1, -1)).sum().item()
            errors[k] = e
            if best is None or e < best:
                best_k, best = k, e
        if refit:  # (FZ-RMQ's joint fit: set_classes gives each channel its class's fit of this one)
            self.fit(w)
        self.set_classes(classes_for_split(order, best_k))
        self.initialized.fill_(True)
        return {"k": best_k, "errors": errors}

    # -- reporting -------------------------------------------------------------------------------
    def bit_accounting(self) -> dict:
        """Bits per weight of each class, their channel counts, the average (exactly ``bits`` when
        ``|salient| = |unsalient|``) and the metadata bits (FP16 steps and residual scales,
        integer zero points)."""
        per_row = math.prod(self.weight_shape[1:])
        counts = torch.bincount(self.group_id.cpu(), minlength=3).tolist()
        bits, meta = self.class_bits(), self.class_metadata_bits()
        numel = per_row * self.weight_shape[0]
        weight_bits = sum(c * b * per_row for c, b in zip(counts, bits))
        metadata_bits = sum(c * m for c, m in zip(counts, meta))
        return {
            "quantizer": self.kind,
            "groups": {n: {"channels": c, "bits_per_weight": b} for n, c, b in zip(CLASS_NAMES, counts, bits)},
            "numel": numel,
            "weight_bits": weight_bits,
            "avg_bits": weight_bits / numel,
            "metadata_bits": metadata_bits,
            "avg_bits_with_metadata": (weight_bits + metadata_bits) / numel,
        }


def _fit_uniform(q: UniformQuantizer, w: Tensor, method: str) -> None:
    """Fit ``q`` (channel-wise, all rows) on ``w`` with ``method``: every row on its own data, so a
    class's rows are fitted exactly as a quantizer restricted to that class would be."""
    scale, zero = init_qparams(w.reshape(w.shape[0], -1), q.bits, q.symmetric, method)
    assign_(q.scale, scale)
    assign_(q.zero_point, zero)
    q.initialized.fill_(True)


def _uniform_meta_bits(q: UniformQuantizer) -> int:
    return META_FLOAT_BITS + (0 if q.symmetric else q.bits)


def _new_uniform(bits: int, symmetric: bool, shape: tuple[int, ...], init: str, learn_scale: bool,
                 learn_zero_point: bool, lsq: bool) -> UniformQuantizer:
    return UniformQuantizer(bits, symmetric=symmetric, granularity="channel", init=init, learn_scale=learn_scale,
                            learn_zero_point=learn_zero_point, lsq_grad_scale=lsq, shape=shape)


def _grouped_fake_quant(rows: Tensor, quantizers: list[UniformQuantizer], perm: Tensor, inv: Tensor,
                        sizes: list[int]) -> Tensor:
    """Quantize the rows of class ``c`` with ``quantizers[c]`` (their own rows of step / zero point)
    in one gather → quantize → gather-back pass; each row is quantized exactly once."""
    parts = []
    chunks = torch.split(rows.index_select(0, perm), sizes)
    idx_chunks = torch.split(perm, sizes)
    for q, x, idx in zip(quantizers, chunks, idx_chunks):
        # an empty class still runs (on 0 rows) so its step gets a zero gradient, not None: DDP
        # without find_unused_parameters needs every trainable parameter in the graph
        g = lsq_grad_scale(x.shape[1], q.qmax) if q.use_lsq_grad_scale else 1.0
        parts.append(fake_quantize(x, q.scale.index_select(0, idx), q.zero_point.index_select(0, idx), q.qmin, q.qmax, g))
    return torch.cat(parts).index_select(0, inv)


# ---------------------------------------------------------------------------------------------
# OMQ (MPQ-DM §3.3)
# ---------------------------------------------------------------------------------------------


class OMQQuantizer(MixedQuantizerBase):
    """Outlier-driven mixed quantization: classes at ``N-1 / N / N+1`` bits, one channel-wise
    uniform quantizer each (``low``, ``mid``, ``high``), all with ``Cout`` rows of step / zero point
    (rows outside a quantizer's class are fitted but unused: fixed shapes for checkpoints)."""

    kind = "omq"

    def __init__(self, bits: int, weight_shape: tuple[int, ...], symmetric: bool = False, init: str = "lp",
                 learn_scale: bool = True, learn_zero_point: bool = False, lsq_grad_scale: bool = False,
                 group_frac: float = 0.1, search: str = "paper", search_init: str | None = None) -> None:
        if not 2 <= bits <= 7:
            raise ValueError(f"OMQ needs w_bits in 2..7 (classes at N-1..N+1 bits within 1..8), got {bits}")
        super().__init__(bits, weight_shape, init, group_frac, search, search_init)
        args = (symmetric, self.weight_shape, init, learn_scale, learn_zero_point, lsq_grad_scale)
        self.low = _new_uniform(bits - 1, *args)
        self.mid = _new_uniform(bits, *args)
        self.high = _new_uniform(bits + 1, *args)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, classes=({self.bits - 1}, {self.bits}, {self.bits + 1}), search={self.search}"

    @property
    def quantizers(self) -> list[UniformQuantizer]:
        return [self.low, self.mid, self.high]

    @torch.no_grad()
    def fit(self, w: Tensor, method: str | None = None) -> None:
        for q in self.quantizers:
            _fit_uniform(q, w, method or self.init_method)

    @torch.no_grad()
    def class_reconstructions(self, w: Tensor) -> list[Tensor]:
        return [q(w) for q in self.quantizers]

    def class_bits(self) -> tuple[int, int, int]:
        return (self.bits - 1, self.bits, self.bits + 1)

    def class_metadata_bits(self) -> tuple[int, int, int]:
        return tuple(_uniform_meta_bits(q) for q in self.quantizers)  # type: ignore[return-value]

    @property
    def scale(self) -> Tensor:
        """Step of the quantizer serving each output channel [Cout, 1] (read-only; for the
        EfficientDM / MPQ-DM LoRA learning-rate rule ``mean(Δ) / 2500``)."""
        steps = torch.stack([q.scale.detach() for q in self.quantizers])  # [3, Cout, 1]
        return steps.gather(0, self.group_id.view(1, -1, 1)).squeeze(0)

    def forward(self, w: Tensor) -> Tensor:
        rows = w.reshape(w.shape[0], -1)
        perm, inv, sizes = self._class_index()
        return _grouped_fake_quant(rows, self.quantizers, perm, inv, sizes).view(w.shape)


# ---------------------------------------------------------------------------------------------
# FZ-RMQ (MPQ-DMv2, papers_extra.md §1.1; mpqdm.md §4.1 as the "proposal" layout)
# ---------------------------------------------------------------------------------------------


def binary_residual(r: Tensor, scale: Tensor) -> Tensor:
    """``scale · sign(r)`` with a straight-through sign; ``scale`` broadcasts per row."""
    return scale * sign_ste(r)


@compilable
def fzrmq_figure(rows: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int, grad_scale: float,
                 b1: Tensor, b2: Tensor, m12: Tensor, m2: Tensor) -> Tensor:
    """FZ-RMQ figure layout on weight rows [Cout, K]: ``Q_base(W) + m₁₂ b₁ sign(R₁) + m₂ b₂ sign(R₂)``,
    ``R₁ = W - Q_base(W)``, ``R₂ = R₁ - b₁ sign(R₁)``; ``m₁₂`` / ``m₂`` [Cout, 1] are the normal ∪ salient
    and salient channel masks. One pure function so ``compiled_quantizers`` fuses the whole chain."""
    qb = fake_quantize(rows, scale, zero_point, qmin, qmax, grad_scale)
    r1 = rows.float() - qb
    s1 = sign_ste(r1)
    s2 = sign_ste(r1 - b1 * s1)
    # masks are 0/1 and signs ±1, so (m b) s is exact in any order: one fused pass per branch
    return torch.addcmul(torch.addcmul(qb, m12 * b1, s1), m2 * b2, s2)


def closed_form_residual_scale(r: Tensor) -> Tensor:
    """``mean |r|`` per row [rows, 1]: the L2-optimal scale of ``b · sign(r)`` (``‖r - b sign r‖²`` is
    minimised at ``b = Σ|r| / n``, giving ``‖r‖² - n b² ≤ ‖r‖²``)."""
    return r.detach().float().abs().mean(1, keepdim=True)


def _sign(r: Tensor) -> Tensor:
    return torch.where(r >= 0, torch.ones_like(r), -torch.ones_like(r))


def residual_reconstruction(x: Tensor, qb: Tensor, n_res: int) -> tuple[Tensor, list[Tensor]]:
    """``qb + Σ_{i≤n_res} b_i sign(R_i)`` with closed-form ``b_i = mean|R_i|`` per row (last dim),
    ``R_1 = x - qb``, ``R_{i+1} = R_i - b_i sign(R_i)``. Returns (reconstruction, [b_i])."""
    rec, scales = qb, []
    r = x - qb
    for _ in range(n_res):
        b = r.abs().mean(-1, keepdim=True)
        step = b * _sign(r)
        rec, r = rec + step, r - step
        scales.append(b)
    return rec, scales


# search space and metric of each init method (functional.init_lp_search / init_grid_search)
_FIT_SEARCH = {
    "minmax": (lambda: torch.ones(1), lambda d: d.pow(2).sum(-1, keepdim=True)),
    "lp": (lambda: (1.0 - 0.01 * torch.arange(80.0)), lp_error_),  # scores the fresh ``rec - x`` in place
    "grid": (lambda: torch.cat([torch.arange(50.0) / 50, torch.ones(1)]), lambda d: d.pow(2).sum(-1, keepdim=True)),
}


@torch.no_grad()
def fit_residual_base(x: Tensor, bits: int, symmetric: bool, method: str, n_res: int,
                      memory_budget: int = 2**26) -> tuple[Tensor, Tensor]:
    """Residual-aware base fit: the init method's clipping-ratio search (same candidates and metric
    as ``method``), each candidate scored on the *final* reconstruction ``Q_base + n_res`` binary
    residuals with their closed-form scales, instead of on ``Q_base`` alone. ``x`` [rows, K];
    returns scale, zero [rows, 1]. Vectorised over rows and candidates (chunked by memory)."""
    if method not in _FIT_SEARCH:
        raise ValueError(f"unknown quantizer init {method!r}; choose one of {sorted(_FIT_SEARCH)}")
    ratios_fn, err_fn = _FIT_SEARCH[method]
    ratios = ratios_fn()
    ratios = ratios[ratios > 0].to(x.device)
    x = x.detach().float()
    qmin, qmax = qrange(bits, symmetric)
    lo, hi = x.amin(1, keepdim=True), x.amax(1, keepdim=True)
    rows = x.shape[0]
    best_err = torch.full((rows, 1), float("inf"), device=x.device)
    best_scale = torch.ones(rows, 1, device=x.device)
    best_zero = torch.zeros(rows, 1, device=x.device)
    chunk = max(1, memory_budget // max(1, 4 * x.numel()))
    for start in range(0, len(ratios), chunk):  # fixed number of chunks, not per channel
        r = ratios[start : start + chunk].view(-1, 1, 1)
        scale, zero = qparams_from_range(r * lo, r * hi, bits, symmetric)  # [n, rows, 1]
        qb = _quant_dequant(x.unsqueeze(0), scale, zero, qmin, qmax)
        rec, _ = residual_reconstruction(x.unsqueeze(0), qb, n_res)
        e, i = err_fn(rec - x).min(0)
        better = e < best_err
        pick = i.view(1, rows, 1)
        best_scale = torch.where(better, scale.gather(0, pick)[0], best_scale)
        best_zero = torch.where(better, zero.gather(0, pick)[0], best_zero)
        best_err = torch.where(better, e, best_err)
    return best_scale, best_zero


class FZRMQQuantizer(MixedQuantizerBase):
    """Flexible Z-order residual mixed quantization.

    ``layout="figure"`` (default; papers_extra.md §1.1): ``Ŵ = Q_{n-1}(W) + m₁ b₁ sign(R₁) + m₂ b₂ sign(R₂)``
    with ``m₁`` = normal ∪ salient, ``m₂`` = salient: bits per weight ``n-1 / n / n+1``.
    ``layout="proposal"`` (mpqdm.md §4.1): unsalient ``Q_{N-1}``, normal ``Q_N``, salient
    ``Q_N + b₁ sign(W - Q_N(W))``: ``N-1 / N / N+1``.
    Residual scales ``b₁``, ``b₂`` [Cout, 1] are learnable, closed-form ``mean |R|`` at init; the sign
    is straight-through (:func:`~mpq_lightning.quant.functional.sign_ste`).

    ``base_fit`` (figure layout): ``joint`` fits the base step of each channel for the
    reconstruction of its class (base + 0 / 1 / 2 residuals, :func:`fit_residual_base`);
    ``greedy`` fits the ``(n-1)``-bit base alone, then the residuals.
    """

    kind = "fzrmq"

    def __init__(self, bits: int, weight_shape: tuple[int, ...], symmetric: bool = False, init: str = "lp",
                 learn_scale: bool = True, learn_zero_point: bool = False, lsq_grad_scale: bool = False,
                 group_frac: float = 0.1, search: str = "paper", layout: str = "figure",
                 base_fit: str = "joint", search_init: str | None = None) -> None:
        if layout not in FZRMQ_LAYOUTS:
            raise ValueError(f"unknown fzrmq_layout {layout!r}; choose one of {FZRMQ_LAYOUTS}")
        if base_fit not in FZRMQ_BASE_FITS:
            raise ValueError(f"unknown fzrmq_base_fit {base_fit!r}; choose one of {FZRMQ_BASE_FITS}")
        if not 2 <= bits <= 8:
            raise ValueError(f"FZ-RMQ needs w_bits in 2..8 (an (n-1)-bit base), got {bits}")
        super().__init__(bits, weight_shape, init, group_frac, search, search_init)
        self.layout, self.base_fit = layout, base_fit
        self._pending: tuple[list[tuple[Tensor, Tensor]], Tensor] | None = None  # (per-class base fits, rows)
        args = (symmetric, self.weight_shape, init, learn_scale, learn_zero_point, lsq_grad_scale)
        cout = self.weight_shape[0]
        self.base = _new_uniform(bits - 1, *args)
        if layout == "proposal":
            self.mid = _new_uniform(bits, *args)
        # b₁, b₂ of the docstrings; named "residual_scale_*" so optimiser groups can pick them out
        self.residual_scale_1 = nn.Parameter(torch.zeros(cout, 1), requires_grad=learn_scale)
        if layout == "figure":
            self.residual_scale_2 = nn.Parameter(torch.zeros(cout, 1), requires_grad=learn_scale)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, layout={self.layout}, base_fit={self.base_fit}, search={self.search}"

    @property
    def quantizers(self) -> list[UniformQuantizer]:
        return [self.base, self.mid] if self.layout == "proposal" else [self.base]

    @property
    def b1(self) -> nn.Parameter:
        """``b₁`` (alias of ``residual_scale_1``)."""
        return self.residual_scale_1

    @property
    def b2(self) -> nn.Parameter:
        """``b₂`` (alias of ``residual_scale_2``; figure layout only)."""
        return self.residual_scale_2

    # -- math on all rows (used by the forward and the init) -------------------------------------
    def _set_base(self, scale: Tensor, zero: Tensor) -> None:
        assign_(self.base.scale, scale)
        assign_(self.base.zero_point, zero)
        self.base.initialized.fill_(True)

    @torch.no_grad()
    def _set_residual_scales(self, rows: Tensor) -> None:
        """Closed-form ``b₁``, ``b₂`` (``mean |R|``) for the current base (figure layout)."""
        qb = self.base(rows).float()
        _, scales = residual_reconstruction(rows, qb, 2)
        assign_(self.residual_scale_1, scales[0])
        assign_(self.residual_scale_2, scales[1])

    @torch.no_grad()
    def fit(self, w: Tensor, method: str | None = None) -> None:
        """Fit on all channels. Figure layout, ``joint``: one base fit per class (kept until the
        classes are chosen, then each channel takes its class's fit); ``greedy``: one base fit."""
        rows = w.reshape(w.shape[0], -1).float()
        method = method or self.init_method
        if self.layout == "proposal":
            for q in self.quantizers:
                _fit_uniform(q, w, method)
            r = rows - self.mid(w).reshape(rows.shape)
            assign_(self.residual_scale_1, closed_form_residual_scale(r))
            return
        if self.base_fit == "greedy":
            _fit_uniform(self.base, w, method)
            self._pending = None
        else:
            b = self.base
            fits = [fit_residual_base(rows, b.bits, b.symmetric, method, n) for n in range(3)]
            self._pending = (fits, rows)
            self._set_base(*fits[1])
        self._set_residual_scales(rows)

    @torch.no_grad()
    def set_classes(self, group_id: Tensor) -> None:
        super().set_classes(group_id)
        if self._pending is not None:  # joint fit: each channel takes its class's base fit
            fits, rows = self._pending
            gid = self.group_id.view(1, -1, 1).to(fits[0][0].device)
            scale = torch.stack([f[0] for f in fits]).gather(0, gid)[0]
            zero = torch.stack([f[1] for f in fits]).gather(0, gid)[0]
            self._pending = None
            self._set_base(scale, zero)
            self._set_residual_scales(rows)

    @torch.no_grad()
    def refit(self, w: Tensor) -> None:
        """Re-fit on ``w`` keeping the channel classes (joint fit: each channel's class fit)."""
        self.fit(w.detach().float())
        self.set_classes(self.group_id.clone())

    @torch.no_grad()
    def class_reconstructions(self, w: Tensor) -> list[Tensor]:
        rows = w.reshape(w.shape[0], -1).float()
        if self.layout == "figure":
            fits = self._pending[0] if self._pending is not None else [(self.base.scale, self.base.zero_point)] * 3
            b = self.base
            recs = []
            for n, (scale, zero) in enumerate(fits):
                qb = _quant_dequant(rows, scale.to(rows.device), torch.round(zero.to(rows.device)), b.qmin, b.qmax)
                recs.append(residual_reconstruction(rows, qb, n)[0])
        else:
            qm = self.mid(w).reshape(rows.shape)
            recs = [self.base(w).reshape(rows.shape), qm, qm + binary_residual(rows - qm, self.b1)]
        return [r.view(w.shape) for r in recs]

    def class_bits(self) -> tuple[int, int, int]:
        return (self.bits - 1, self.bits, self.bits + 1)

    def class_metadata_bits(self) -> tuple[int, int, int]:
        if self.layout == "figure":
            m = _uniform_meta_bits(self.base)
            return (m, m + META_FLOAT_BITS, m + 2 * META_FLOAT_BITS)
        return (_uniform_meta_bits(self.base), _uniform_meta_bits(self.mid), _uniform_meta_bits(self.mid) + META_FLOAT_BITS)

    @property
    def scale(self) -> Tensor:
        """Base step of the quantizer serving each output channel [Cout, 1] (read-only)."""
        if self.layout == "figure":
            return self.base.scale.detach()
        low = self.group_id.view(-1, 1) == 0
        return torch.where(low, self.base.scale.detach(), self.mid.scale.detach())

    def forward(self, w: Tensor) -> Tensor:
        rows = w.reshape(w.shape[0], -1)
        if self.layout == "figure":
            base = self.base
            g = lsq_grad_scale(rows.shape[1], base.qmax) if base.use_lsq_grad_scale else 1.0
            m12, m2 = self.class_masks()
            out = fzrmq_figure(rows, base.scale, base.zero_point, base.qmin, base.qmax, g, self.b1, self.b2, m12, m2)
            return out.view(w.shape)
        perm, inv, sizes = self._class_index()
        # classes 0 → base (N-1 bits), 1 and 2 → mid (N bits); salient adds b₁ sign(W - Q_N(W))
        two = [self.base, self.mid, self.mid]
        qu = _grouped_fake_quant(rows, two, perm, inv, sizes)
        out = qu + self.class_masks()[1] * binary_residual(rows.float() - qu, self.b1)
        return out.view(w.shape)


# ---------------------------------------------------------------------------------------------
# Layer-level initialisation (called by convert.calibrate) and bit accounting
# ---------------------------------------------------------------------------------------------


def is_mixed(quantizer: nn.Module | None) -> bool:
    return isinstance(quantizer, MixedQuantizerBase)


def needs_output_search(quantizer: nn.Module | None) -> bool:
    """True when the split search has more than one candidate (so calibration inputs are needed)."""
    return is_mixed(quantizer) and len(quantizer.candidates()) > 1  # type: ignore[union-attr]


@torch.no_grad()
def init_mixed_quantizer(layer: nn.Module, stats=None) -> dict:
    """Initialise ``layer.weight_quantizer`` (OMQ / FZ-RMQ) on ``W_lat · s``, searching the split by
    the calibration output MSE ``MSE(op(X_s, Ŵ_s), op(X, W))``.

    By linearity ``op(X_s, Ŵ_s) - op(X, W) = op(X, (Ŵ_s - W_s) ⊘ s)``, so the error of a channel
    only needs the input patch statistics ``stats`` (:class:`~mpq_lightning.quant.lora_init.InputStats`,
    collected in the FP pass of ``calibrate``). Without ``stats`` the weight-space MSE is used.
    """
    wq = layer.weight_quantizer
    w = layer.latent_weight().detach().float()
    if layer.smooth_scale is not None:
        w = layer._scale_weight(w, layer.smooth_scale)
    row_error = None
    if stats is not None:
        s = layer.smooth_scale

        def row_error(d: Tensor) -> Tensor:
            if s is not None:
                d = d / s.view(1, -1, *([1] * (d.dim() - 2))).float()
            return stats.row_errors(d)

    return wq.initialize(w, row_error)


def uniform_bit_accounting(q: nn.Module, weight_shape: tuple[int, ...]) -> dict:
    """Bit accounting of a plain :class:`UniformQuantizer` weight quantizer."""
    numel = math.prod(weight_shape)
    rows = q.scale.shape[0]
    meta = rows * _uniform_meta_bits(q)
    return {
        "quantizer": "uniform",
        "groups": {"all": {"channels": weight_shape[0], "bits_per_weight": q.bits}},
        "numel": numel,
        "weight_bits": numel * q.bits,
        "avg_bits": float(q.bits),
        "metadata_bits": meta,
        "avg_bits_with_metadata": (numel * q.bits + meta) / numel,
    }


def bit_accounting_report(model: nn.Module) -> list[dict]:
    """One :meth:`QuantLayer.bit_accounting` row per quantized layer with weight quantization
    (``name`` added), in module order."""
    from .layers import QuantLayer  # local: layers imports this module

    rows = []
    for name, m in model.named_modules():
        if isinstance(m, QuantLayer):
            acc = m.bit_accounting()
            if acc is not None:
                rows.append({"name": name, **acc})
    return rows


def print_bit_report(model: nn.Module) -> list[dict]:
    """Rich table of :func:`bit_accounting_report`: per-class channel counts and bits, the average
    bits per weight, metadata bits per weight and FP side-branch parameters; caption = model
    average. Returns the rows."""
    from rich.console import Console
    from rich.table import Table

    rows = bit_accounting_report(model)
    table = Table(title="weight bit accounting")
    for col in ("layer", "quantizer", "channels (u/n/s)", "bits (u/n/s)", "avg bits", "meta bits/w", "FP side params"):
        table.add_column(col)
    for r in rows:
        g = r["groups"]
        names = [n for n in CLASS_NAMES if n in g] or list(g)
        table.add_row(r["name"], r["quantizer"], "/".join(str(g[n]["channels"]) for n in names),
                      "/".join(str(g[n]["bits_per_weight"]) for n in names), f"{r['avg_bits']:.4f}",
                      f"{r['metadata_bits'] / r['numel']:.4f}", str(r.get("fp_side_params", 0)))
    numel = sum(r["numel"] for r in rows)
    if numel:
        avg = sum(r["weight_bits"] for r in rows) / numel
        meta = sum(r["metadata_bits"] for r in rows) / numel
        table.caption = f"{len(rows)} layers, {numel} weights, average {avg:.4f} bits/weight + {meta:.4f} metadata"
    Console().print(table)
    return rows
