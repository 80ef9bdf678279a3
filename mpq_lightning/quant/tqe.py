"""TQE: Q-VDiT's token-aware quantization estimator (Q-VDiT §3.2 Eq. 7-8; qvdit.md §4).

A rank-r (paper: r = 1) FP correction on the quantized input, added after the weight quantizer:

    y = Q(X) Q(W)ᵀ + g ⊙ (Q(X) αᵀ) βᵀ        α [r, d_in] Kaiming-uniform, β [d_out, r] zeros

so it is an exact no-op at init. ``g`` is the per-frame scale along the ``f`` axis of the layer's
token layout (``tqe_frame_scale``):

* ``temporal`` (release, ``qdiff/models/stdit_quant_layer.py``): ``g = 1 + m_f`` on temporal-attention
  layers only (``layer_info(name)["kind"] == "temporal"``), ``m`` initialised to ones;
* ``all`` (paper Eq. 8, ``(M ⊙ Q(X)) α β``): ``g = m_f`` on every layer whose layout has ``f``,
  ``m`` initialised to ones (Eq. 9's data-dependent init is not implemented);
* ``none``: ``g = 1``.

A per-token (per-frame) scalar commutes with α, so ``g`` scales the rank-r intermediate. For
Conv layers α is a conv kernel [r, Cin, *k] with the layer's geometry and β a 1×1 conv.

Token layouts are einops-style patterns over the *input* of the layer, e.g. ``"(b f) s c"``
(spatial attention, [(B·F), S, C]), ``"(b s) f c"`` (temporal), ``"b (f s) c"`` (full attention);
``c`` is the channel dim and must stand alone; other single letters (b, f, s, l, h, w, …) name
the remaining axes. The frame index of a position in a grouped axis is
``(p // Π sizes after f) % F``.

Export: ``β αᵀ`` must stay a separate FP rank-r path (folding it into the dense weight would
undo low-bit storage); :meth:`TQE.export_state` gives the tensors an exporter needs.
"""
from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from torch import Tensor, nn

TQE_FRAME_SCALES = ("temporal", "all", "none")
LAYER_INFO_KEYS = ("kind", "token_layout", "num_frames", "tokens_per_frame")


# ---------------------------------------------------------------------------------------------
# Token layouts
# ---------------------------------------------------------------------------------------------


def parse_token_layout(layout: str) -> list[list[str]]:
    """``"(b f) s c"`` → ``[["b", "f"], ["s"], ["c"]]``; validates letters and the channel axis."""
    if not isinstance(layout, str) or not layout.strip():
        raise ValueError(f"token_layout must be a non-empty einops-style string, got {layout!r}")
    dims = []
    for group, single in re.findall(r"\(([^()]*)\)|([^\s()]+)", layout):
        letters = group.split() if group else [single]
        for letter in letters:
            if not re.fullmatch(r"[a-z]", letter):
                raise ValueError(f"token_layout {layout!r}: axis names must be single lowercase letters, got {letter!r}")
        dims.append(letters)
    flat = [x for d in dims for x in d]
    if len(set(flat)) != len(flat):
        raise ValueError(f"token_layout {layout!r} repeats an axis")
    if ["c"] not in dims:
        raise ValueError(f"token_layout {layout!r} needs a standalone channel axis 'c'")
    return dims


def frame_index(dims: list[list[str]], shape: tuple[int, ...], num_frames: int) -> tuple[int, Tensor]:
    """(axis holding ``f``, frame index of every position along it) for a tensor of ``shape``."""
    if len(shape) != len(dims):
        raise ValueError(f"token layout with {len(dims)} axes {dims} does not match a tensor of shape {tuple(shape)}")
    for axis, letters in enumerate(dims):
        if "f" not in letters:
            continue
        size = shape[axis]
        if size % num_frames:
            raise ValueError(f"axis {axis} of size {size} is not divisible by num_frames={num_frames} (layout {dims})")
        after = letters[letters.index("f") + 1 :]
        others = [x for x in letters if x != "f"]
        if len(others) > 1:
            raise ValueError(f"token layout group {letters} has more than one unknown size besides 'f'")
        inner = size // num_frames if after else 1
        return axis, (torch.arange(size) // inner) % num_frames
    raise ValueError(f"token layout {dims} has no frame axis 'f'")


# ---------------------------------------------------------------------------------------------
# The estimator
# ---------------------------------------------------------------------------------------------


class TQE(nn.Module):
    """Rank-r correction ``g ⊙ (Q(X) αᵀ) βᵀ`` of one Linear / Conv layer; called as ``tqe(xq, layer)``.

    ``frame_mode``: ``none`` (g = 1), ``release`` (g = 1 + m_f) or ``paper`` (g = m_f).
    """

    def __init__(self, weight_shape: tuple[int, ...], rank: int = 1, frame_mode: str = "none",
                 token_layout: str | None = None, num_frames: int | None = None) -> None:
        super().__init__()
        if frame_mode not in ("none", "release", "paper"):
            raise ValueError(f"unknown TQE frame_mode {frame_mode!r}")
        cout, cin, *k = weight_shape
        if not isinstance(rank, int) or not 1 <= rank <= min(cout, cin * math.prod(k)):
            raise ValueError(f"tqe_rank must be in 1..min(d_out, d_in)={min(cout, cin * math.prod(k))}, got {rank!r}")
        self.rank, self.frame_mode, self.token_layout = rank, frame_mode, token_layout
        self.alpha = nn.Parameter(torch.empty(rank, cin, *k))
        nn.init.kaiming_uniform_(self.alpha.view(rank, -1), a=math.sqrt(5))
        self.beta = nn.Parameter(torch.zeros(cout, rank))
        self._dims = None
        self.num_frames = None
        self._frame_idx: dict = {}  # (input shape, device) -> (frame axis, frame index on device)
        if frame_mode != "none":
            if token_layout is None:
                raise ValueError("a TQE frame scale needs layer_info(...)['token_layout']")
            self._dims = parse_token_layout(token_layout)
            if not any("f" in d for d in self._dims):
                raise ValueError(f"a TQE frame scale needs an 'f' axis in token_layout {token_layout!r}")
            if not isinstance(num_frames, int) or num_frames < 1:
                raise ValueError(f"a TQE frame scale needs layer_info(...)['num_frames'] >= 1, got {num_frames!r}")
            self.num_frames = num_frames
            self.m = nn.Parameter(torch.ones(num_frames))

    def extra_repr(self) -> str:
        extra = f", layout={self.token_layout!r}, frames={self.num_frames}" if self._dims else ""
        return f"rank={self.rank}, frame_mode={self.frame_mode}{extra}"

    def frame_factor(self, shape: tuple[int, ...], device: torch.device) -> Tensor | None:
        """Broadcastable per-frame factor g for a tensor of ``shape`` laid out as the input."""
        if self._dims is None:
            return None
        # eager: built once per shape (no host-to-device copy per forward); under dynamo a constant of
        # the graph, since a cache would add a guard per shape
        compiling, key = torch.compiler.is_compiling(), (shape, device)
        entry = None if compiling else self._frame_idx.get(key)
        if entry is None:
            axis, idx = frame_index(self._dims, shape, self.num_frames)
            entry = (axis, idx.to(device))
            if not compiling:
                self._frame_idx[key] = entry
        axis, idx = entry
        g = self.m.float()[idx]
        if self.frame_mode == "release":
            g = 1.0 + g
        view = [1] * len(shape)
        view[axis] = shape[axis]
        return g.view(view)

    def forward(self, xq: Tensor, layer: nn.Module) -> Tensor:
        """The correction in fp32, returned in the dtype of the layer's own output (the autocast
        dtype under autocast, else the input's), so adding it does not promote the layer output."""
        dev = xq.device.type
        out_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else xq.dtype
        with torch.autocast(device_type=dev, enabled=False):
            x = xq.float()
            r = self.rank
            alpha, beta = self.alpha.float(), self.beta.float()  # fp32 even if a strategy casts params
            if layer.channel_dim == -1:  # Linear: [..., Cin] → [..., r] → [..., Cout]
                t = F.linear(x, alpha.view(r, -1))
                g = self.frame_factor(tuple(xq.shape), xq.device)
                y = F.linear(t if g is None else t * g, beta)
            elif getattr(layer, "groups", 1) == 1:  # Conv: α conv with the layer geometry, β 1×1
                t = layer._op(x, alpha, None)
                g = self.frame_factor(tuple(t.shape), xq.device)
                y = torch.einsum("br...,or->bo...", t if g is None else t * g, beta)
            else:  # grouped conv: dense rank-r kernel (a per-position scalar commutes with β)
                delta = (beta @ alpha.view(r, -1)).view(beta.shape[0], *alpha.shape[1:])
                y = layer._op(x, delta, None)
                g = self.frame_factor(tuple(y.shape), xq.device)
                y = y if g is None else y * g
        return y.to(out_dtype)

    @property
    def foldable(self) -> bool:
        """True without a per-frame factor: the correction is then the rank-r weight
        :meth:`weight_delta`, which a layer may add to its quantized weight instead (same math)."""
        return self._dims is None

    def weight_delta(self) -> Tensor:
        """``β αᵀ`` as a weight-shaped tensor [Cout, Cin, *k] (without the frame scale)."""
        return (self.beta @ self.alpha.view(self.rank, -1)).view(self.beta.shape[0], *self.alpha.shape[1:])

    @torch.no_grad()
    def export_state(self) -> dict:
        """What an exporter stores for this branch: α, β, the per-frame m and its meaning. The branch
        stays a separate FP GEMV + outer product at inference (not merged into the integer weight)."""
        return {
            "alpha": self.alpha.detach().clone(),
            "beta": self.beta.detach().clone(),
            "frame_scale": None if self._dims is None else self.m.detach().clone(),
            "frame_mode": self.frame_mode,
            "token_layout": self.token_layout,
        }


def build_tqe(spec, weight_shape: tuple[int, ...]) -> TQE | None:
    """TQE for a layer built from ``spec`` (``tqe``, ``tqe_rank``, ``tqe_frame_scale``) and the
    backbone's ``spec.extras["layer_info"]`` (``kind``, ``token_layout``, ``num_frames``)."""
    if not getattr(spec, "tqe", False):
        return None
    info = dict(spec.extras.get("layer_info") or {})
    mode = spec.tqe_frame_scale
    if mode not in TQE_FRAME_SCALES:
        raise ValueError(f"unknown tqe_frame_scale {mode!r}; choose one of {TQE_FRAME_SCALES}")
    layout, frames = info.get("token_layout"), info.get("num_frames")
    has_f = layout is not None and any("f" in d for d in parse_token_layout(layout))
    frame_mode = "none"
    if mode == "temporal" and info.get("kind") == "temporal":
        if not has_f:
            raise ValueError(f"tqe_frame_scale='temporal': a layer of kind 'temporal' needs a token_layout with an "
                             f"'f' axis in layer_info, got {layout!r}")
        frame_mode = "release"
    elif mode == "all" and has_f:
        frame_mode = "paper"
    return TQE(tuple(weight_shape), spec.tqe_rank, frame_mode, layout, frames)
