"""Fake-quantized Linear / Conv layers with a LoRA adapter merged before the weight quantizer.

Forward of a quantized layer (EfficientDM / MPQ-DM / Q-VDiT):

    W_lat = W_base + B A                 (merged LoRA; W_base = FP weight, or OOLRI's frozen Q(W))
    y     = Q_a(X / s) · Q_w(W_lat · s)^T + bias
          + (B A) X                      (only with lora_placement = "fp_branch", then no merge)
          + corrections(Q_a(X / s))      (TQE's rank-1 branch and frame scale, methods issue)

with ``s`` the SmoothQuant pre-scale (1 when off). In FP mode (both switches off) the layer
computes ``op(X, W + B A)``, which is the original module's output when B A = 0.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .functional import quantizer_compile_enabled, set_compiled_quantizers
from .mixed import FZRMQQuantizer, OMQQuantizer, uniform_bit_accounting
from .quantizers import DynamicTokenQuantizer, TimestepActQuantizer, UniformQuantizer
from .tqe import build_tqe

# ("zero", A = B = 0, was accepted but never applied; it would be an adapter that cannot train: dL/dA = Bᵀg
# and dL/dB = gAᵀ stay 0)
LORA_INITS = ("kaiming_zero", "svd_weight_error", "svd_output_error")
LORA_PARAMS = ("efficientdm", "per_position")
LORA_PLACEMENTS = ("merged", "fp_branch")
ACT_QUANTIZERS = ("timestep", "dynamic_token", "static")
W_QUANTIZERS = ("uniform", "omq", "fzrmq")  # uniform | OMQ (MPQ-DM) | FZ-RMQ (MPQ-DMv2), see mixed.py


@dataclass
class LayerSpec:
    """Resolved quantization settings of one layer (built by ``QuantConfig.layer_spec``)."""

    w_bits: int | None = 4
    a_bits: int | None = None
    w_symmetric: bool = False
    a_symmetric: bool = False
    w_granularity: str = "channel"
    w_group_size: int | None = None
    w_init: str = "lp"
    a_init: str = "lp"
    a_quantizer: str | None = "timestep"
    a_token_share_batch: bool = False
    num_steps: int = 1
    learn_w_scale: bool = True
    learn_w_zero_point: bool = False
    learn_a_scale: bool = True
    learn_a_zero_point: bool = True
    lsq_grad_scale: bool = False
    lora_rank: int = 0
    lora_init: str = "kaiming_zero"
    lora_param: str = "efficientdm"
    lora_placement: str = "merged"
    lora_quantized_base: bool = False
    smooth_alpha: float | None = None
    smooth_momentum: float | None = None  # None: running max; else Q-VDiT's EMA
    extras: dict = field(default_factory=dict)
    # -- the papers' methods (mixed.py, lora_init.py, tqe.py); defaults keep the plain behaviour --
    w_quantizer: str = "uniform"
    omq_group_frac: float = 0.1
    omq_search: str = "paper"
    omq_search_init: str | None = None
    fzrmq_layout: str = "figure"
    fzrmq_base_fit: str = "joint"
    oolri_damp: float = 0.01
    oolri_refit_quantizer: bool = False
    calib_max_rows: int = 2048
    calib_stats_device: str = "cpu"
    tqe: bool = False
    tqe_rank: int = 1
    tqe_frame_scale: str = "temporal"
    compile_quantizers: bool = False


# ---------------------------------------------------------------------------------------------
# LoRA
# ---------------------------------------------------------------------------------------------


class LoRA(nn.Module):
    """Low-rank weight update ``ΔW = B A`` for a weight of shape [Cout, Cin, *k].

    ``efficientdm``: A is a k×k conv Cin→r ([r, Cin, *k]), B a 1×1 conv r→Cout ([Cout, r]),
    ``ΔW = B · A`` (mpqdm.md §2.3). ``per_position`` (MPQ-DM release, §3.5): A [r, Cin, *k],
    B [Cout, r, *k], ``ΔW[..., u, v] = B[..., u, v] · A[..., u, v]``. Linear layers: A [r, Cin],
    B [Cout, r] either way. No α/r multiplier, so SVD-based initialisation is exact.
    """

    def __init__(self, weight_shape: torch.Size, rank: int, param: str = "efficientdm", init: str = "kaiming_zero") -> None:
        super().__init__()
        if param not in LORA_PARAMS:
            raise ValueError(f"unknown lora_param {param!r}; choose one of {LORA_PARAMS}")
        cout, cin, *k = weight_shape
        if not 1 <= rank <= min(cout, cin * math.prod(k)):
            raise ValueError(f"LoRA rank {rank} must be in 1..min(d_out, d_in)={min(cout, cin * math.prod(k))}")
        self.param, self.rank, self.kernel = param, rank, tuple(k)
        self.A = nn.Parameter(torch.empty(rank, cin, *k))
        b_shape = (cout, rank, *k) if (param == "per_position" and k) else (cout, rank)
        self.B = nn.Parameter(torch.zeros(b_shape))
        self.reset(init)

    @torch.no_grad()
    def reset(self, init: str = "kaiming_zero") -> None:
        """Kaiming-uniform A (a=√5, nn.Linear default) and zero B; SVD inits are set by OOLRI."""
        nn.init.kaiming_uniform_(self.A.view(self.rank, -1), a=math.sqrt(5))
        self.B.zero_()

    def delta(self) -> Tensor:
        """``B A`` in fp32, autocast or not: in the merged placement it is part of the weight
        quantizer's input, whose rounding must not depend on the training precision."""
        device = self.B.device.type
        if torch.is_autocast_enabled(device):
            with torch.autocast(device_type=device, enabled=False):
                return self._delta()
        return self._delta()

    def _delta(self) -> Tensor:
        b, a = self.B.float(), self.A.float()
        if b.dim() == 2:
            return (b @ a.reshape(self.rank, -1)).view(b.shape[0], *a.shape[1:])
        return torch.einsum("or...,ri...->oi...", b, a)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, param={self.param}"


# ---------------------------------------------------------------------------------------------
# Quantized layers
# ---------------------------------------------------------------------------------------------


def fold_corrections(corrections: nn.ModuleDict, w: Tensor, x: Tensor) -> tuple[Tensor, list[nn.Module]]:
    """(``w`` plus the corrections that are a plain rank-r weight, the corrections left as branches).

    A correction without a per-token factor (TQE without frame scale) is the weight ``βα``:
    ``op(xq, W) + op(xq, βα) = op(xq, W + βα)`` by linearity, which saves its passes over the
    activations. Only for an fp32 op: under autocast the branch keeps the small correction out of
    a 16-bit weight."""
    if not len(corrections):
        return w, []
    branches = list(corrections.values())
    if x.dtype == torch.float32 and not torch.is_autocast_enabled(x.device.type):
        for corr in [c for c in branches if getattr(c, "foldable", False)]:
            w = w + corr.weight_delta().float()
            branches.remove(corr)
    return w, branches


def _refresh_base_weight(module: nn.Module, incompatible_keys) -> None:
    """Load post-hook of a layer with a frozen quantized base (OOLRI): recompute ``base_weight``."""
    module.refresh_base_weight()


def build_weight_quantizer(spec: LayerSpec, weight_shape: torch.Size) -> nn.Module | None:
    if spec.w_bits is None:
        return None
    if spec.w_quantizer in ("omq", "fzrmq"):  # channel-wise mixed precision (mixed.py)
        kwargs = dict(symmetric=spec.w_symmetric, init=spec.w_init, learn_scale=spec.learn_w_scale,
                      learn_zero_point=spec.learn_w_zero_point, lsq_grad_scale=spec.lsq_grad_scale,
                      group_frac=spec.omq_group_frac, search=spec.omq_search, search_init=spec.omq_search_init)
        if spec.w_quantizer == "omq":
            return OMQQuantizer(spec.w_bits, tuple(weight_shape), **kwargs)
        return FZRMQQuantizer(spec.w_bits, tuple(weight_shape), layout=spec.fzrmq_layout,
                              base_fit=spec.fzrmq_base_fit, **kwargs)
    if spec.w_quantizer != "uniform":
        raise ValueError(f"unknown w_quantizer {spec.w_quantizer!r}; choose one of {W_QUANTIZERS}")
    return UniformQuantizer(
        spec.w_bits,
        symmetric=spec.w_symmetric,
        granularity=spec.w_granularity,
        group_size=spec.w_group_size,
        init=spec.w_init,
        learn_scale=spec.learn_w_scale,
        learn_zero_point=spec.learn_w_zero_point,
        lsq_grad_scale=spec.lsq_grad_scale,
        shape=tuple(weight_shape),
    )


def build_act_quantizer(spec: LayerSpec, channel_dim: int) -> nn.Module | None:
    if spec.a_bits is None or spec.a_quantizer is None:
        return None
    if spec.a_quantizer == "timestep":
        return TimestepActQuantizer(
            spec.a_bits, spec.num_steps, spec.a_symmetric, spec.a_init, spec.learn_a_scale, spec.learn_a_zero_point,
            lsq_grad_scale=spec.lsq_grad_scale,
        )
    if spec.a_quantizer == "dynamic_token":
        info = (spec.extras.get("layer_info") or {}) if spec.a_token_share_batch else {}
        return DynamicTokenQuantizer(spec.a_bits, share_batch=spec.a_token_share_batch, channel_dim=channel_dim,
                                     token_layout=info.get("token_layout"), num_frames=info.get("num_frames"),
                                     tokens_per_frame=info.get("tokens_per_frame"))
    if spec.a_quantizer == "static":
        return UniformQuantizer(
            spec.a_bits, spec.a_symmetric, "tensor", init=spec.a_init,
            learn_scale=spec.learn_a_scale, learn_zero_point=spec.learn_a_zero_point,
            lsq_grad_scale=spec.lsq_grad_scale, shape=(1,),
        )
    raise ValueError(f"unknown a_quantizer {spec.a_quantizer!r}; choose one of {ACT_QUANTIZERS} or None")


class QuantLayer(nn.Module):
    """Shared machinery of QuantLinear / QuantConv{1,2,3}d. Subclasses define ``_op``."""

    channel_dim: int = 1  # input-channel dim of the activation

    def _setup(self, module: nn.Module, spec: LayerSpec) -> None:
        self.spec = spec
        self.weight = nn.Parameter(module.weight.detach().clone(), requires_grad=False)
        self.bias = None if module.bias is None else nn.Parameter(module.bias.detach().clone(), requires_grad=False)
        self.weight_quantizer = build_weight_quantizer(spec, self.weight.shape)
        self.act_quantizer = build_act_quantizer(spec, self.channel_dim)
        self.lora = LoRA(self.weight.shape, spec.lora_rank, spec.lora_param) if spec.lora_rank else None
        self.lora_placement = spec.lora_placement
        # OOLRI's frozen quantized base replaces W inside the quantizer (mpqdm.md §4.2 (a)). It is
        # not saved: a frozen snapshot of the weight quantizer at OOLRI time (a few values per
        # channel) is, and ``base_weight = Q_snapshot(W·s)/s`` is recomputed from the FP weight after
        # every state-dict load, so checkpoints stay a small fraction of the model.
        self.register_buffer(
            "base_weight", self.weight.detach().clone() if spec.lora_quantized_base else None, persistent=False
        )
        self.base_quantizer = (
            build_weight_quantizer(spec, self.weight.shape).requires_grad_(False)
            if spec.lora_quantized_base and spec.w_bits is not None else None
        )
        if self.base_quantizer is not None:
            self.register_load_state_dict_post_hook(_refresh_base_weight)  # a module function: picklable
        cin = self.weight.shape[1]
        self.register_buffer("smooth_scale", torch.ones(cin) if spec.smooth_alpha is not None else None)
        self.corrections = nn.ModuleDict()  # output corrections on the quantized input (TQE)
        tqe = build_tqe(spec, self.weight.shape)
        if tqe is not None:
            self.corrections["tqe"] = tqe
        self.weight_quant = False
        self.act_quant = False
        self.observer = None  # calibration hook target, see convert.calibrate
        self.cache_weight = False  # set by cached_quantized_weights (no-grad sampling)
        self._weight_cache: tuple | None = None

    @torch.no_grad()
    def refresh_base_weight(self) -> None:
        """``base_weight := Q_snapshot(W · s) ⊘ s`` from the frozen OOLRI quantizer snapshot."""
        if self.base_quantizer is None or not bool(self.base_quantizer.initialized):
            return
        w = self.weight.detach().float()
        s = self.smooth_scale
        ws = self._scale_weight(w, s.float()) if s is not None else w
        q = self.base_quantizer(ws).float()
        if s is not None:
            q = q / s.view(1, -1, *([1] * (w.dim() - 2))).float()
        self.base_weight.copy_(q.to(self.base_weight))

    # -- helpers -------------------------------------------------------------------------------
    def _bcast_in(self, s: Tensor, ndim: int) -> Tensor:
        """Reshape a per-input-channel vector to broadcast on an activation of ``ndim`` dims."""
        if self.channel_dim == -1:
            return s
        return s.view(-1, *([1] * (ndim - 2)))

    def _scale_weight(self, w: Tensor, s: Tensor) -> Tensor:
        return w * s.view(1, -1, *([1] * (w.dim() - 2)))

    def latent_weight(self) -> Tensor:
        """``W_base + B A`` (merged placement) in the original (unsmoothed) weight space."""
        w = self.base_weight if self.base_weight is not None else self.weight
        if self.lora is not None and self.lora_placement == "merged":
            w = w + self.lora.delta().to(w.dtype)
        return w

    def quantized_weight(self) -> Tensor:
        """``Q_w(W_lat · s)`` (smoothed space), or ``W_lat · s`` when weight quantization is off."""
        w = self.latent_weight()
        if self.smooth_scale is not None:
            w = self._scale_weight(w.float(), self.smooth_scale)
        if self.weight_quant and self.weight_quantizer is not None:
            w = self.weight_quantizer(w)
        return w

    def _forward_weight(self) -> Tensor:
        """:meth:`quantized_weight`, reused between no-grad forwards inside
        :func:`cached_quantized_weights` while nothing it depends on has changed."""
        if not self.cache_weight or torch.is_grad_enabled() or torch.compiler.is_compiling():
            return self.quantized_weight()  # a compiled graph has no Python between layers to save
        key = self._weight_state_key()
        if self._weight_cache is None or self._weight_cache[0] != key:
            self._weight_cache = (key, self.quantized_weight())
        return self._weight_cache[1]

    def _weight_state_key(self) -> tuple:
        """Identity, storage and in-place-write counter of every tensor ``Q_w(W_lat · s)`` reads."""
        tensors = [self.weight, self.base_weight, self.smooth_scale]
        for m in (self.lora, self.weight_quantizer):
            if m is not None:
                tensors += [*m.parameters(), *m.buffers()]
        return (self.weight_quant, *((id(t), t.data_ptr(), t._version) for t in tensors if t is not None))

    def input_patches(self, x: Tensor) -> Tensor:
        """Input rows ``P`` [n, groups, d] with ``op(x, D)`` = ``P_g D_gᵀ`` for a weight ``D`` viewed as
        [groups, Cout/groups, d]: tokens for Linear, unfolded receptive fields for Conv (calibration
        statistics of OMQ / FZ-RMQ and OOLRI)."""
        raise NotImplementedError

    def bit_accounting(self) -> dict | None:
        """Weight bits of this layer: per channel class (OMQ / FZ-RMQ) or uniform, the average bits
        per weight, metadata bits (FP16 steps / residual scales, integer zero points) and the FP
        side-branch parameters (``fp_branch`` LoRA, TQE) that stay unmerged. None without weight
        quantization."""
        wq = self.weight_quantizer
        if wq is None:
            return None
        acc = wq.bit_accounting() if hasattr(wq, "bit_accounting") else uniform_bit_accounting(wq, tuple(self.weight.shape))
        side = sum(p.numel() for c in self.corrections.values() for p in c.parameters())
        if self.lora is not None and self.lora_placement == "fp_branch":
            side += self.lora.A.numel() + self.lora.B.numel()
        acc["fp_side_params"] = side
        return acc

    # -- forward -------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        if self.observer is not None:
            self.observer(self, x)
        if not (self.weight_quant or self.act_quant):
            w = self.weight
            if self.lora is not None:  # FP mode keeps the adapter, exact FP when B A = 0
                w = w + self.lora.delta().to(w.dtype)
            return self._op(x, w, self.bias)
        if self.spec.compile_quantizers == quantizer_compile_enabled():
            return self._quant_forward(x)
        previous = set_compiled_quantizers(self.spec.compile_quantizers)
        try:
            return self._quant_forward(x)
        finally:
            set_compiled_quantizers(previous)

    def _quant_forward(self, x: Tensor) -> Tensor:
        xs = x
        if self.smooth_scale is not None:
            xs = x / self._bcast_in(self.smooth_scale, x.dim()).to(x.dtype)
        xq = self.act_quantizer(xs) if (self.act_quant and self.act_quantizer is not None) else xs
        xq = xq.to(x.dtype)
        w, branches = fold_corrections(self.corrections, self._forward_weight(), x)
        y = self._op(xq, w.to(x.dtype), self.bias)
        if self.lora is not None and self.lora_placement == "fp_branch":
            y = y + self._op(x, self.lora.delta().to(x.dtype), None)
        for corr in branches:
            y = y + corr(xq, self)
        return y

    # -- conversions ---------------------------------------------------------------------------
    @classmethod
    def from_module(cls, module: nn.Module, spec: LayerSpec | None = None) -> "QuantLayer":
        raise NotImplementedError

    def to_module(self, merge_lora: bool = True) -> nn.Module:
        """Back to the plain PyTorch module holding the FP weight (``+ B A`` if ``merge_lora``)."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"w_bits={self.spec.w_bits}, a_bits={self.spec.a_bits}, lora_rank={self.spec.lora_rank}"


class QuantLinear(QuantLayer):
    channel_dim = -1

    def __init__(self, module: nn.Linear, spec: LayerSpec) -> None:
        super().__init__()
        self.in_features, self.out_features = module.in_features, module.out_features
        self._setup(module, spec)

    @classmethod
    def from_module(cls, module: nn.Linear, spec: LayerSpec | None = None) -> "QuantLinear":
        if not isinstance(module, nn.Linear):
            raise TypeError(f"QuantLinear.from_module needs nn.Linear, got {type(module).__name__}")
        return cls(module, spec or LayerSpec())

    def _op(self, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        return F.linear(x, w, b)

    def input_patches(self, x: Tensor) -> Tensor:
        return x.reshape(-1, 1, self.in_features)

    def to_module(self, merge_lora: bool = True) -> nn.Linear:
        m = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                      device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            w = self.weight + (self.lora.delta() if (merge_lora and self.lora is not None) else 0)
            m.weight.copy_(w)
            if self.bias is not None:
                m.bias.copy_(self.bias)
        return m


class _QuantConvNd(QuantLayer):
    _conv_cls: type[nn.Module]
    _conv_fn = None

    def __init__(self, module: nn.Module, spec: LayerSpec) -> None:
        super().__init__()
        for attr in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation",
                     "groups", "padding_mode", "_reversed_padding_repeated_twice"):
            setattr(self, attr, getattr(module, attr))
        if spec.smooth_alpha is not None and self.groups != 1:
            spec.smooth_alpha = None  # per-input-channel scale is ill-defined for grouped convs
        self._setup(module, spec)

    @classmethod
    def from_module(cls, module: nn.Module, spec: LayerSpec | None = None) -> "_QuantConvNd":
        if type(module) is not cls._conv_cls and not isinstance(module, cls._conv_cls):
            raise TypeError(f"{cls.__name__}.from_module needs {cls._conv_cls.__name__}, got {type(module).__name__}")
        return cls(module, spec or LayerSpec())

    def _op(self, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        fn = type(self)._conv_fn
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return fn(x, w, b, self.stride, 0, self.dilation, self.groups)
        return fn(x, w, b, self.stride, self.padding, self.dilation, self.groups)

    def input_patches(self, x: Tensor) -> Tensor:
        return conv_input_patches(x, self.kernel_size, self.stride, self.padding, self.dilation, self.groups,
                                  self.padding_mode, self._reversed_padding_repeated_twice)

    def to_module(self, merge_lora: bool = True) -> nn.Module:
        m = self._conv_cls(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                           self.dilation, self.groups, self.bias is not None, self.padding_mode,
                           device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            w = self.weight + (self.lora.delta() if (merge_lora and self.lora is not None) else 0)
            m.weight.copy_(w)
            if self.bias is not None:
                m.bias.copy_(self.bias)
        return m


@contextmanager
def cached_quantized_weights(model: nn.Module) -> Iterator[None]:
    """Inside, every quantized layer of ``model`` computes its quantized weight once and reuses it
    across no-grad forwards (a sampler's steps and CFG branches), recomputing it only when a tensor
    it depends on was replaced or written in place. Forwards with grad enabled never use the cache.
    The cached weights (one per layer) are dropped on exit."""
    layers = [m for m in model.modules() if isinstance(m, QuantLayer)]
    previous = [m.cache_weight for m in layers]
    for m in layers:
        m.cache_weight = True
    try:
        yield
    finally:
        for m, p in zip(layers, previous):
            m.cache_weight, m._weight_cache = p, None


def conv_input_patches(x: Tensor, kernel: tuple[int, ...], stride: tuple[int, ...], padding, dilation: tuple[int, ...],
                       groups: int, padding_mode: str, reversed_padding: list[int]) -> Tensor:
    """N-d ``unfold``: [B, C, *L] → [B·ΠL_out, groups, C/groups · Πk], in the weight's (c, k…) order."""
    nd = len(kernel)
    if padding_mode != "zeros":
        x = F.pad(x, reversed_padding, mode=padding_mode)
    else:
        if isinstance(padding, str):  # 'valid' | 'same' (stride 1)
            pads = [(0, 0)] * nd if padding == "valid" else [
                (d * (k - 1) // 2, d * (k - 1) - d * (k - 1) // 2) for k, d in zip(kernel, dilation)]
        else:
            pads = [(p, p) for p in padding]
        flat = [v for pair in reversed(pads) for v in pair]
        if any(flat):
            x = F.pad(x, flat)
    for i in range(nd):
        x = x.unfold(2 + i, dilation[i] * (kernel[i] - 1) + 1, stride[i])
        if dilation[i] > 1:
            x = x[..., :: dilation[i]]
    b, c = x.shape[:2]
    # [B, C, L1..Ln, K1..Kn] → [B, L1..Ln, C, K1..Kn]
    perm = [0, *range(2, 2 + nd), 1, *range(2 + nd, 2 + 2 * nd)]
    x = x.permute(perm)
    return x.reshape(-1, groups, (c // groups) * math.prod(kernel))


class QuantConv1d(_QuantConvNd):
    _conv_cls = nn.Conv1d
    _conv_fn = staticmethod(F.conv1d)


class QuantConv2d(_QuantConvNd):
    _conv_cls = nn.Conv2d
    _conv_fn = staticmethod(F.conv2d)


class QuantConv3d(_QuantConvNd):
    _conv_cls = nn.Conv3d
    _conv_fn = staticmethod(F.conv3d)


QUANT_LAYER_TYPES: dict[type[nn.Module], type[QuantLayer]] = {
    nn.Linear: QuantLinear,
    nn.Conv1d: QuantConv1d,
    nn.Conv2d: QuantConv2d,
    nn.Conv3d: QuantConv3d,
}
LAYER_TYPE_NAMES = {"linear": nn.Linear, "conv1d": nn.Conv1d, "conv2d": nn.Conv2d, "conv3d": nn.Conv3d}
