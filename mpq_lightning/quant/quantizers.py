"""Quantizer modules: uniform (static), timestep-aware (TALSQ) and dynamic per-token.

Every quantizer is an ``nn.Module`` whose state (steps, zero points, tables, ``initialized`` flag)
is registered at construction, so a checkpoint restores it strictly before any calibration.
"""
from __future__ import annotations

import weakref
from contextlib import contextmanager, nullcontext
from contextvars import ContextVar
from typing import Iterator, Sequence

import torch
import torch.utils.checkpoint
from torch import Tensor, nn

from .functional import assign_, fake_quantize, init_qparams, lsq_grad_scale, qrange

GRANULARITIES = ("tensor", "channel", "group", "token")


def _rows_view(x: Tensor, granularity: str, group_size: int | None) -> Tensor:
    """2-D view [rows, K] with one quantization parameter per row."""
    if granularity == "tensor":
        return x.reshape(1, -1)
    if granularity == "channel":  # output channel = dim 0 (weights)
        return x.reshape(x.shape[0], -1)
    if granularity == "group":  # groups of ``group_size`` consecutive input channels (dim 1)
        if x.dim() < 2 or x.shape[1] % group_size:
            raise ValueError(
                f"group granularity needs dim 1 of shape {tuple(x.shape)} divisible by group_size={group_size}"
            )
        return x.reshape(-1, group_size * (x[0, 0].numel()))
    if granularity == "token":  # one row per token: all dims but the last
        return x.reshape(-1, x.shape[-1])
    raise ValueError(f"unknown granularity {granularity!r}; choose one of {GRANULARITIES}")


# ---------------------------------------------------------------------------------------------
# Uniform static quantizer
# ---------------------------------------------------------------------------------------------


class UniformQuantizer(nn.Module):
    """Uniform ``bits``-bit fake quantizer with learnable step / zero point.

    ``granularity``: ``tensor`` | ``channel`` (dim 0) | ``group`` (``group_size`` input channels) |
    ``token`` (one row per token, last dim = channels; the token count is fixed by :meth:`initialize`).
    The parameter shape is set by :meth:`initialize` (or by ``shape`` when known up front, which a
    checkpoint restore needs): ``[rows, 1]``.
    """

    def __init__(
        self,
        bits: int,
        symmetric: bool = False,
        granularity: str = "channel",
        group_size: int | None = None,
        init: str = "lp",
        learn_scale: bool = True,
        learn_zero_point: bool = False,
        lsq_grad_scale: bool = False,
        shape: tuple[int, ...] | None = None,
    ) -> None:
        super().__init__()
        if granularity not in GRANULARITIES:
            raise ValueError(f"unknown granularity {granularity!r}; choose one of {GRANULARITIES}")
        if granularity == "group" and not group_size:
            raise ValueError("granularity='group' needs group_size > 0")
        self.bits, self.symmetric = int(bits), bool(symmetric)
        self.qmin, self.qmax = qrange(self.bits, self.symmetric)
        self.granularity, self.group_size, self.init_method = granularity, group_size, init
        self.use_lsq_grad_scale = lsq_grad_scale
        rows = 1 if shape is None else _rows_view(torch.empty(shape, device="meta"), granularity, group_size).shape[0]
        self.scale = nn.Parameter(torch.ones(rows, 1), requires_grad=learn_scale)
        self.zero_point = nn.Parameter(torch.zeros(rows, 1), requires_grad=learn_zero_point)
        self.register_buffer("initialized", torch.tensor(False))

    def extra_repr(self) -> str:
        return f"bits={self.bits}, symmetric={self.symmetric}, granularity={self.granularity}, init={self.init_method}"

    @torch.no_grad()
    def initialize(self, x: Tensor, method: str | None = None) -> None:
        """Set step and zero point from ``x`` with ``method`` (minmax | lp | grid)."""
        rows = _rows_view(x.detach(), self.granularity, self.group_size)
        scale, zero = init_qparams(rows, self.bits, self.symmetric, method or self.init_method)
        assign_(self.scale, scale)
        assign_(self.zero_point, zero)
        self.initialized.fill_(True)

    def forward(self, x: Tensor) -> Tensor:
        rows = _rows_view(x, self.granularity, self.group_size)
        if rows.shape[0] != self.scale.shape[0]:
            raise ValueError(
                f"quantizer was initialised for {self.scale.shape[0]} {self.granularity} rows, input of shape "
                f"{tuple(x.shape)} has {rows.shape[0]}"
            )
        g = lsq_grad_scale(rows.shape[1], self.qmax) if self.use_lsq_grad_scale else 1.0
        return fake_quantize(rows, self.scale, self.zero_point, self.qmin, self.qmax, g).view(x.shape)


# ---------------------------------------------------------------------------------------------
# Explicit sampler step index
# ---------------------------------------------------------------------------------------------


def _check_step_range(idx: Tensor, num_steps: int) -> None:
    if not idx.numel():
        return
    lo, hi = torch.stack(torch.aminmax(idx)).tolist()  # one host sync
    if lo < 0 or hi >= num_steps:
        raise IndexError(f"step index {idx.tolist()} out of range for a table of {num_steps} steps")


def _expand_index(step_index: Tensor, n: int) -> Tensor:
    """Map a per-sample index [B] onto a leading dim of size n = B * k (batch-major layouts such as
    ``(b f) s c``)."""
    if step_index.dim() == 0:
        return step_index.expand(n)
    b = step_index.shape[0]
    if n == b:
        return step_index
    if n % b:
        raise ValueError(f"step_index of batch {b} cannot be broadcast to a leading dim of size {n}")
    return step_index.repeat_interleave(n // b)


class TimestepActQuantizer(nn.Module):
    """EfficientDM's TALSQ: one learnable (step, zero point) per sampler step, per tensor.

    The step index comes from :func:`step_index_context` (set by the Denoiser / sampler), never from
    a call counter. A per-sample LongTensor [B] index is supported: the leading dim of the input
    must be a multiple of B with the batch index major.
    """

    def __init__(
        self,
        bits: int,
        num_steps: int,
        symmetric: bool = False,
        init: str = "lp",
        learn_scale: bool = True,
        learn_zero_point: bool = True,
        reservoir: int = 4096,
        lsq_grad_scale: bool = False,
    ) -> None:
        super().__init__()
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        self.bits, self.symmetric, self.num_steps, self.init_method = int(bits), symmetric, num_steps, init
        self.use_lsq_grad_scale = lsq_grad_scale  # LSQ's g = 1/sqrt(N qmax), N = one sample's elements
        self.qmin, self.qmax = qrange(self.bits, symmetric)
        self.scale = nn.Parameter(torch.ones(num_steps), requires_grad=learn_scale)
        self.zero_point = nn.Parameter(torch.zeros(num_steps), requires_grad=learn_zero_point)
        self.register_buffer("initialized", torch.tensor(False))
        self.step_index: Tensor | int | None = None  # set by step_index_context
        # (step_index, {(n, device): expanded index}) shared by the quantizers of one step_index_context:
        # the index is range-checked once there and expanded once per leading size, not once per layer
        self._shared: tuple | None = None
        self.observing = False
        self._reservoir = reservoir
        self._samples: dict[int, list[Tensor]] = {}

    def extra_repr(self) -> str:
        return f"bits={self.bits}, num_steps={self.num_steps}, init={self.init_method}"

    def _index(self, n: int, device: torch.device) -> Tensor:
        if self.step_index is None:
            raise RuntimeError(
                "TimestepActQuantizer needs the sampler step index: call the model through "
                "Denoiser.forward(..., step_index) or inside step_index_context(model, step_index)"
            )
        shared = self._shared
        by_hand = shared is None or shared[0] is not self.step_index  # set outside step_index_context
        # in a compiled graph the cache's writes would be side effects and its keys guards: no cache there
        if by_hand or torch.compiler.is_compiling():
            idx = torch.as_tensor(self.step_index, device=device, dtype=torch.long)
            if by_hand:
                _check_step_range(idx, self.num_steps)
            return _expand_index(idx, n)
        cache = shared[1]
        if (n, device) not in cache:
            cache[n, device] = _expand_index(torch.as_tensor(self.step_index, device=device, dtype=torch.long), n)
        return cache[n, device]

    # -- calibration ---------------------------------------------------------------------------
    @torch.no_grad()
    def _observe(self, x: Tensor) -> None:
        idx = self._index(x.shape[0], x.device)
        xf = x.detach().float()
        rows = observed_row_mask(x)  # padded rows stay out (observed_rows)
        for step in idx.unique().tolist():  # loop over distinct steps in the batch, not channels
            sel = idx == step
            vals = (xf[sel][rows[sel]] if rows is not None else xf[sel]).reshape(-1)
            if vals.numel() == 0:
                continue
            keep = torch.randperm(vals.numel(), device=vals.device)[: self._reservoir]
            # always keep the extremes so the min-max candidate is exact
            vals = torch.cat([vals[keep], vals.min().view(1), vals.max().view(1)])
            self._samples.setdefault(step, []).append(vals.cpu())

    @torch.no_grad()
    def finish_calibration(self, method: str | None = None) -> None:
        """Initialise every step's (step, zero) from the observed activations. Steps never seen
        take the parameters fitted on all observations together (EfficientDM's shared init)."""
        if not self._samples:
            raise RuntimeError("TimestepActQuantizer.finish_calibration: no activations were observed")
        method = method or self.init_method
        pooled = torch.cat([torch.cat(v) for v in self._samples.values()]).view(1, -1)
        s_all, z_all = init_qparams(pooled, self.bits, self.symmetric, method)
        scale = s_all.view(1).repeat(self.num_steps)
        zero = z_all.view(1).repeat(self.num_steps)
        for step, vals in self._samples.items():
            s, z = init_qparams(torch.cat(vals).view(1, -1), self.bits, self.symmetric, method)
            scale[step], zero[step] = s.view(()), z.view(())
        assign_(self.scale, scale)
        assign_(self.zero_point, zero)
        self.initialized.fill_(True)
        self._samples.clear()
        self.observing = False

    # -- forward -------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        if self.observing:
            self._observe(x)
            return x
        idx = self._index(x.shape[0], x.device)
        view = (-1,) + (1,) * (x.dim() - 1)
        g = lsq_grad_scale(x[0].numel(), self.qmax) if self.use_lsq_grad_scale else 1.0
        return fake_quantize(x, self.scale[idx].view(view), self.zero_point[idx].view(view), self.qmin, self.qmax, g)


def resample_step_table(
    table: Tensor, old_timesteps: Tensor | None = None, new_timesteps: Tensor | None = None, new_steps: int | None = None
) -> Tensor:
    """Resample a per-step table (last dim = steps) to another sampler.

    With ``old_timesteps`` / ``new_timesteps`` (the schedulers' ``timesteps``), every new step takes
    the entry of the old step with the nearest diffusion timestep (100 -> 20 DDIM steps picks
    entries 4, 9, ..., 99). With only ``new_steps``, entries are taken at evenly spaced indices that
    end at the last (least noisy) step: EfficientDM's ``downsample_talsq_ckpt.py`` stride, whose
    table counts the steps down, i.e. entries 4, 9, ..., 99 here too (index 0 is the noisiest step).
    """
    if old_timesteps is not None and new_timesteps is not None:
        old_t = torch.as_tensor(old_timesteps, dtype=torch.float64).view(-1, 1)
        new_t = torch.as_tensor(new_timesteps, dtype=torch.float64).view(1, -1)
        if old_t.shape[0] != table.shape[-1]:
            raise ValueError(f"table has {table.shape[-1]} steps but old_timesteps has {old_t.shape[0]}")
        idx = (old_t - new_t).abs().argmin(0)
    elif new_steps is not None:
        old = table.shape[-1]
        if old % new_steps == 0:
            idx = (torch.arange(new_steps) + 1) * (old // new_steps) - 1
        else:
            idx = torch.linspace(0, old - 1, new_steps).round().long()
    else:
        raise ValueError("resample_step_table needs (old_timesteps, new_timesteps) or new_steps")
    return table[..., idx.to(table.device)].clone()


# Every submodule registration anywhere bumps this counter (a global nn.Module hook), so the
# per-model list of step quantizers below is rebuilt after any change of a module tree.
_structure_version = 0


def _bump_structure_version(module: nn.Module, name: str, submodule: nn.Module | None) -> None:
    global _structure_version
    _structure_version += 1


nn.modules.module.register_module_module_registration_hook(_bump_structure_version)
_step_quantizers_cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def step_quantizers(model: nn.Module, fresh: bool = False) -> list[TimestepActQuantizer]:
    """The TimestepActQuantizers of ``model``, walked once per module-tree version (the walk costs
    about 0.5 ms per forward on a 300-module model, a step of a small model is a few ms). Adding or
    replacing a submodule anywhere bumps the version; deleting one (``del``) does not, so a removed
    quantizer can stay listed until the next change (it then only receives an unused step index;
    :func:`step_index_context` walks afresh before reporting an out-of-range index). ``fresh``
    walks the tree now."""
    cached = _step_quantizers_cache.get(model)
    if fresh or cached is None or cached[0] != _structure_version:
        cached = (_structure_version, [m for m in model.modules() if isinstance(m, TimestepActQuantizer)])
        _step_quantizers_cache[model] = cached
    return cached[1]


@contextmanager
def step_index_context(
    model: nn.Module, step_index: int | Tensor | None, host: Sequence[int] | None = None
) -> Iterator[None]:
    """Hand the sampler step index (int or LongTensor [B]) to every TimestepActQuantizer in model.

    The index is range-checked once here, not per quantizer. That reads a device tensor back (a GPU
    sync) unless ``host`` gives its values on the host (the data modules' ``step_index_host``)."""
    quantizers = step_quantizers(model)
    shared = None
    if quantizers and step_index is not None:
        if host is not None:
            count = step_index.numel() if isinstance(step_index, Tensor) else 1
            if len(host) != count:
                raise ValueError(f"step_index_host has {len(host)} entries for a step index of {count}")
            checked = torch.tensor(list(host), dtype=torch.long)
        else:
            checked = torch.as_tensor(step_index)
        try:
            _check_step_range(checked, min(q.num_steps for q in quantizers))
        except IndexError:  # a deleted quantizer may still be listed: judge by the current tree
            quantizers = step_quantizers(model, fresh=True)
            if quantizers:
                _check_step_range(checked, min(q.num_steps for q in quantizers))
        shared = (step_index, {})
    previous = _swap_step_state(quantizers, [(step_index, shared)] * len(quantizers))
    try:
        yield
    finally:
        _swap_step_state(quantizers, previous)


def _swap_step_state(quantizers: list[TimestepActQuantizer], states: list[tuple]) -> list[tuple]:
    """Give each quantizer its ``(step_index, _shared)`` from ``states``; returns the ones they had."""
    previous = [(q.step_index, q._shared) for q in quantizers]
    setattr_ = object.__setattr__  # plain attributes (no parameter, buffer or module): skip nn.Module's
    for q, (index, shared) in zip(quantizers, states):
        setattr_(q, "step_index", index)
        setattr_(q, "_shared", shared)
    return previous


def checkpoint_with_step_index(module: nn.Module, *args):
    """``torch.utils.checkpoint`` (non-reentrant) of ``module(*args)`` whose recomputation in backward
    sees the step index that the forward saw. The TALSQ quantizers read it from
    :func:`step_index_context`, which has exited by the time backward recomputes the block; this
    hands them the forward's index again for the recomputation only. The backbones' gradient
    checkpointing calls it (STDiT's ``grad_checkpointing_func``, diffusers'
    ``enable_gradient_checkpointing``), around compiled blocks too (``compile_scope="blocks"``;
    checkpointing inside a whole-backbone graph is refused by ``QATModule``)."""
    return torch.utils.checkpoint.checkpoint(module, *args, use_reentrant=False,
                                             context_fn=lambda: _replay_step_index(module))


def _replay_step_index(module: nn.Module):
    """``(forward context, recomputation context)`` for :func:`checkpoint_with_step_index`: the second
    sets the step index the quantizers of ``module`` hold now, and restores theirs afterwards."""
    quantizers = step_quantizers(module)
    saved = [(q.step_index, q._shared) for q in quantizers]

    @contextmanager
    def replay() -> Iterator[None]:
        previous = _swap_step_state(quantizers, saved)
        try:
            yield
        finally:
            _swap_step_state(quantizers, previous)

    return nullcontext(), replay()


# ---------------------------------------------------------------------------------------------
# Rows the calibration observers may see (padded text tokens)
# ---------------------------------------------------------------------------------------------

_observed_rows: ContextVar[Tensor | None] = ContextVar("mpq_observed_rows", default=None)


@contextmanager
def observed_rows(mask: Tensor | None) -> Iterator[None]:
    """Calibration observers of the layers called inside see only the rows of their ``[B, L, C]``
    input where ``mask`` (bool ``[B, L]``, True = kept) is True; the forward itself is unchanged.

    For padded rows that the model masks out downstream and that the official model never computes:
    OpenSora's STDiT packs the kept text tokens before ``kv_linear`` (opensora_stdit.md §3.4), ours keeps
    ``[B, L, C]`` with a key mask. Padded rows then stay out of activation ranges (TALSQ tables,
    static steps), SmoothQuant maxima and the input statistics of the OMQ / FZ-RMQ split search and
    OOLRI. Wrap only the layers that take the masked rows (an input of another shape is an error)."""
    token = _observed_rows.set(mask)
    try:
        yield
    finally:
        _observed_rows.reset(token)


def observed_row_mask(x: Tensor) -> Tensor | None:
    """The bool ``[B, L]`` mask of the enclosing :func:`observed_rows` for an input ``x`` ``[B, L, C]``,
    or None outside one."""
    mask = _observed_rows.get()
    if mask is None:
        return None
    if x.dim() != 3 or tuple(x.shape[:2]) != tuple(mask.shape):
        raise ValueError(
            f"observed_rows: a mask of shape {tuple(mask.shape)} does not fit an input of shape {tuple(x.shape)} "
            "(expected [B, L, C] with [B, L] = the mask's shape)"
        )
    return mask.to(device=x.device, dtype=torch.bool)


# ---------------------------------------------------------------------------------------------
# Dynamic per-token quantizer (Q-VDiT / ViDiT-Q)
# ---------------------------------------------------------------------------------------------


class DynamicTokenQuantizer(nn.Module):
    """Asymmetric min-max per token (last dim = channels), recomputed every forward, no state.

    ``share_batch=True`` pools the statistics of each token over the batch as the Q-VDiT release
    does (qvdit.md §3.3: the input viewed as ``[B, tokens, C]``, min / max over ``B × C`` per token).
    With the layer's ``token_layout`` (from the Denoiser, e.g. ``"(b f) s c"``) the pool is the true
    batch ``b``, so a spatial layer pools each (frame, spatial) token over the samples, not over samples
    and frames; ``num_frames`` / ``tokens_per_frame`` give the sizes of ``f`` / ``s`` when they share the
    leading axis with ``b``. Text-token layouts (axis ``l``) pool nothing: the release packs the prompts
    into ``[1, ΣL, C]`` before ``kv_linear``. Without a layout, the leading axis of a 3-D or wider input is
    the batch. Unlike the release, a tiny step is clamped per token; it never overwrites the other
    tokens' steps.
    """

    def __init__(self, bits: int, share_batch: bool = False, eps: float = 1e-6, channel_dim: int = -1,
                 token_layout: str | None = None, num_frames: int | None = None,
                 tokens_per_frame: int | None = None) -> None:
        super().__init__()
        self.bits, self.share_batch, self.eps, self.channel_dim = int(bits), share_batch, eps, channel_dim
        self.token_layout, self.num_frames, self.tokens_per_frame = token_layout, num_frames, tokens_per_frame
        self._pool = self._batch_pool(token_layout, {"f": num_frames, "s": tokens_per_frame}) if share_batch else None
        self.qmin, self.qmax = qrange(self.bits, False)
        self.register_buffer("initialized", torch.tensor(True))  # stateless: always ready

    @staticmethod
    def _batch_pool(layout: str | None, sizes: dict[str, int | None]) -> tuple[int, int] | str | None:
        """How the batch is found in an input: None (leading axis), "none" (text layout: no pooling) or
        (number of axes, product of the sizes sharing the leading axis with ``b``)."""
        if layout is None:
            return None
        from .tqe import parse_token_layout

        dims = parse_token_layout(layout)
        if any("l" in group for group in dims):
            return "none"
        if dims[0][0] != "b":
            raise ValueError(f"a_token_share_batch: token layout {layout!r} must lead with the batch axis 'b'")
        inner = 1
        for letter in dims[0][1:]:
            if not sizes.get(letter):
                raise ValueError(f"a_token_share_batch: token layout {layout!r} needs the size of axis {letter!r} "
                                 "(num_frames for 'f', tokens_per_frame for 's') to find the batch")
            inner *= sizes[letter]
        return len(dims), inner

    def extra_repr(self) -> str:
        layout = f", token_layout={self.token_layout!r}" if self.token_layout else ""
        return f"bits={self.bits}, share_batch={self.share_batch}, channel_dim={self.channel_dim}{layout}"

    def _batch(self, x: Tensor) -> int | None:
        """Batch size to pool over for ``x`` (channels last), or None for per-token statistics."""
        if not self.share_batch or self._pool == "none":
            return None
        if self._pool is None:
            return x.shape[0] if x.dim() >= 3 else None
        ndim, inner = self._pool
        if x.dim() != ndim or x.shape[0] % inner:
            raise ValueError(f"DynamicTokenQuantizer: input of shape {tuple(x.shape)} does not fit token layout "
                             f"{self.token_layout!r} (leading axis a multiple of {inner})")
        return x.shape[0] // inner

    def qparams(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Per-token (step, zero) for ``x`` with channels last."""
        xd = x.detach().float()
        b = self._batch(xd)
        if b is None:
            lo = xd.amin(dim=-1, keepdim=True).clamp_max(0)
            hi = xd.amax(dim=-1, keepdim=True).clamp_min(0)
        else:  # every sample is batch-major in x: [b, tokens, C] keeps token identity across samples
            xv = xd.reshape(b, -1, xd.shape[-1])
            shape = xd.shape[:-1] + (1,)
            lo = xv.amin(dim=(0, -1), keepdim=True).clamp_max(0).expand(b, -1, 1).reshape(shape)
            hi = xv.amax(dim=(0, -1), keepdim=True).clamp_min(0).expand(b, -1, 1).reshape(shape)
        scale = ((hi - lo) / (self.qmax - self.qmin)).clamp_min(self.eps)
        zero = (self.qmin - torch.round(lo / scale)).clamp(self.qmin, self.qmax)
        return scale, zero

    def forward(self, x: Tensor) -> Tensor:
        if self.channel_dim not in (-1, x.dim() - 1):
            xt = x.movedim(self.channel_dim, -1)
            scale, zero = self.qparams(xt)
            return fake_quantize(xt, scale, zero, self.qmin, self.qmax).movedim(-1, self.channel_dim)
        scale, zero = self.qparams(x)
        return fake_quantize(x, scale, zero, self.qmin, self.qmax)
