"""OpenSora v1.0 STDiT (spatial-temporal DiT) in plain PyTorch, loading the official checkpoint layout.

Spec: ``research/opensora_stdit.md`` (module tree §2, forward §3, pitfalls §8) and ``research/qvdit.md``
§2-§3.1 (what Q-VDiT quantizes). Differences from ``hpcaitech/Open-Sora`` v1.0.0 ``STDiT``:

* the fused ``qkv`` linears of ``attn`` / ``attn_temp`` are split into ``q``, ``k``, ``v`` (as Q-VDiT does,
  spec §5); :func:`convert_official_state_dict` splits an official checkpoint;
* attention is ``F.scaled_dot_product_attention`` (no flash-attn, xformers or apex);
* text cross-attention keeps the padded ``[B, L, C]`` layout with a key mask instead of packing the kept
  tokens into ``[1, ΣL, C]`` with an xformers block-diagonal bias; the result is the same (spec §4).
  ``kv_linear`` runs inside :func:`~mpq_lightning.quant.observed_rows`, so its calibration statistics
  see only the kept tokens, as the packed official layer does.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping
from typing import NamedTuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from einops import rearrange

from ..files import read_tensor_file
from ..quant.quantizers import observed_rows

__all__ = [
    "STDiT",
    "STDiTBlock",
    "STDiT_XL_2",
    "tiny_stdit",
    "convert_official_state_dict",
    "load_official_checkpoint",
    "CheckpointMismatchError",
    "LoadResult",
    "STDIT_KEEP_FP",
    "STDIT_MLP_W8A8_BIT_MAP",
    "STDIT_TOKEN_LAYOUTS",
    "stdit_layer_kind",
    "stdit_feature_site",
]

# =====================================================================================================
# Facts used by quantization and distillation (qvdit.md §3.1, §3.3)
# =====================================================================================================

#: Q-VDiT ``remain_fp.txt``: modules kept in full precision (fnmatch patterns over module names).
STDIT_KEEP_FP: list[str] = ["x_embedder*", "t_embedder*", "t_block*", "y_embedder*", "final_layer*"]

#: Q-VDiT / ViDiT-Q mixed-precision map loaded for W<=4 or A6: every MLP linear at W8A8.
STDIT_MLP_W8A8_BIT_MAP: dict[str, dict] = {"blocks.*.mlp.fc*": {"w": 8, "a": 8}}

#: Input token layout of each kind of block linear in THIS implementation (einops notation):
#: b batch, f temporal tokens, s spatial tokens per frame, l text tokens, c channels.
STDIT_TOKEN_LAYOUTS: dict[str, str] = {
    "spatial": "(b f) s c",
    "temporal": "(b s) f c",
    "cross_q": "b (f s) c",
    "cross_kv": "b l c",
    "cross_proj": "b (f s) c",
    "mlp": "b (f s) c",
}

_LAYER_KIND_PATTERNS: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"(?:^|\.)blocks\.\d+\.attn\.(?:q|k|v|proj)$"), "spatial"),
    (re.compile(r"(?:^|\.)blocks\.\d+\.attn_temp\.(?:q|k|v|proj)$"), "temporal"),
    (re.compile(r"(?:^|\.)blocks\.\d+\.cross_attn\.q_linear$"), "cross_q"),
    (re.compile(r"(?:^|\.)blocks\.\d+\.cross_attn\.kv_linear$"), "cross_kv"),
    (re.compile(r"(?:^|\.)blocks\.\d+\.cross_attn\.proj$"), "cross_proj"),
    (re.compile(r"(?:^|\.)blocks\.\d+\.mlp\.fc[12]$"), "mlp"),
]


def _checkpoint(block: nn.Module, *args):
    return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)


def stdit_layer_kind(module_name: str) -> str:
    """Kind of a block linear by name: spatial / temporal / cross_q / cross_kv / cross_proj / mlp / other.

    A prefix (e.g. ``model.blocks.3.attn.q``) is allowed; "other" has no entry in STDIT_TOKEN_LAYOUTS.
    """
    for pattern, kind in _LAYER_KIND_PATTERNS:
        if pattern.search(module_name):
            return kind
    return "other"


def stdit_feature_site(model: STDiT) -> str:
    """Name of the module whose output ``[B, N, C]`` is the relation-distillation feature: the last block."""
    return f"blocks.{len(model.blocks) - 1}"


# =====================================================================================================
# Fixed sin-cos tables (spec §3.2, §3.3)
# =====================================================================================================


def _sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
    """[sin(p·ω), cos(p·ω)] with ω_k = 10000^(-k/(dim/2)), in float64 (MAE convention)."""
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    out = np.outer(pos.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def spatial_pos_embed(hidden_size: int, grid_hw: tuple[int, int], scale: float = 1.0) -> torch.Tensor:
    """``[1, H'·W', C]``; token h·W'+w gets concat(E(w/scale), E(h/scale)): the column comes first."""
    h, w = grid_hw
    # The official grid is float32 before the float64 outer product.
    grid_h = np.arange(h, dtype=np.float32) / np.float32(scale)
    grid_w = np.arange(w, dtype=np.float32) / np.float32(scale)
    col, row = np.meshgrid(grid_w, grid_h)  # each [H', W']
    table = np.concatenate([_sincos_1d(hidden_size // 2, col), _sincos_1d(hidden_size // 2, row)], axis=1)
    return torch.tensor(table, dtype=torch.float32).unsqueeze(0)


def temporal_pos_embed(hidden_size: int, length: int, scale: float = 1.0) -> torch.Tensor:
    """``[1, T', C]`` with row t = E_C(t/scale)."""
    table = _sincos_1d(hidden_size, np.arange(length) / scale)
    return torch.tensor(table, dtype=torch.float32).unsqueeze(0)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """``[B, dim]`` = [cos(t·f), sin(t·f)] (cos first), computed in fp32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def t2i_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """PixArt adaLN-single modulation: x·(1 + scale) + shift."""
    return x * (1 + scale) + shift


# =====================================================================================================
# Layers (official names kept so the state-dict keys match, spec §2)
# =====================================================================================================


class Mlp(nn.Module):
    """timm ``Mlp`` without dropout: fc1 → GELU(tanh) → fc2."""

    def __init__(self, in_features: int, hidden_features: int, out_features: int | None = None) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_features, out_features or in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DropPath(nn.Module):
    """Stochastic depth per sample (timm ``DropPath``); used only when ``drop_path > 0``."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep


class PatchEmbed3D(nn.Module):
    """Conv3d with kernel = stride = patch, flattened to ``[B, T'·H'·W', C]`` (index t·S + h·W' + w)."""

    def __init__(self, patch_size: tuple[int, int, int], in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rearrange(self.proj(x), "b c t h w -> b (t h w) c")


class SelfAttention(nn.Module):
    """Multi-head self-attention with separate q / k / v linears (Q-VDiT split of the official ``qkv``)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden_size {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (rearrange(lin(x), "n l (h d) -> n h l d", h=self.num_heads) for lin in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(rearrange(out, "n h l d -> n l (h d)"))


class MultiHeadCrossAttention(nn.Module):
    """Video tokens attend to the text tokens of their own sample; padded text tokens are masked out.

    Equals the official xformers ``BlockDiagonalMask`` over packed tokens (spec §3.4) with ``[B, L, C]`` text.
    """

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden_size {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.q_linear = nn.Linear(dim, dim)
        self.kv_linear = nn.Linear(dim, 2 * dim)  # output rows [k | v]
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, cond: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        """x ``[B, N, C]``, cond ``[B, L, C]``, key_mask ``[B, L]`` bool (True = attend) or None (all)."""
        q = rearrange(self.q_linear(x), "b n (h d) -> b h n d", h=self.num_heads)
        if key_mask is None or torch.compiler.is_compiling():
            kv = self.kv_linear(cond)
        else:  # the official model packs the kept tokens: padded ones stay out of calibration statistics
            with observed_rows(key_mask):
                kv = self.kv_linear(cond)
        k, v = rearrange(kv, "b l (two h d) -> two b h l d", two=2, h=self.num_heads)
        attn_mask = None if key_mask is None else key_mask[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.proj(rearrange(out, "b h n d -> b n (h d)"))


class TimestepEmbedder(nn.Module):
    """Sinusoidal timestep features (width 256) → Linear → SiLU → Linear."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )
        self.frequency_embedding_size = frequency_embedding_size

    def forward(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.mlp(timestep_embedding(t, self.frequency_embedding_size).to(dtype))


class CaptionEmbedder(nn.Module):
    """Caption projection (timm Mlp) plus the null caption ``y_embedding`` (a buffer, used for CFG)."""

    def __init__(self, in_channels: int, hidden_size: int, uncond_prob: float, token_num: int) -> None:
        super().__init__()
        self.y_proj = Mlp(in_channels, hidden_size, hidden_size)
        self.register_buffer("y_embedding", torch.randn(token_num, in_channels) / in_channels**0.5)
        self.uncond_prob = uncond_prob

    def forward(self, caption: torch.Tensor, train: bool) -> torch.Tensor:
        """Training-time caption dropout replaces a whole sample by ``y_embedding`` (spec §3.3)."""
        if train and self.uncond_prob > 0:
            drop = torch.rand(caption.shape[0], device=caption.device) < self.uncond_prob
            caption = torch.where(drop[:, None, None, None], self.y_embedding.to(caption.dtype), caption)
        return self.y_proj(caption)


class T2IFinalLayer(nn.Module):
    """PixArt final layer: LN, modulation by the timestep embedding ``t`` (not t0), linear."""

    def __init__(self, hidden_size: int, num_patch: int, out_channels: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, num_patch * out_channels)
        self.scale_shift_table = nn.Parameter(torch.randn(2, hidden_size) / hidden_size**0.5)
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        shift, scale = (self.scale_shift_table[None] + t[:, None]).chunk(2, dim=1)
        return self.linear(t2i_modulate(self.norm_final(x), shift, scale))


# =====================================================================================================
# STDiT block (spec §3.4)
# =====================================================================================================


class STDiTBlock(nn.Module):
    """Spatial attn (adaLN) → temporal attn (raw residual, reuses gate_msa) → cross attn (no norm/gate) → MLP."""

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        d_s: int,
        d_t: int,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.d_s = d_s
        self.d_t = d_t
        # Registration order as official: norm1, attn, cross_attn, norm2, mlp, drop_path, table, attn_temp.
        self.norm1 = nn.LayerNorm(hidden_size, eps=1e-6, elementwise_affine=False)
        self.attn = SelfAttention(hidden_size, num_heads)
        self.cross_attn = MultiHeadCrossAttention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, eps=1e-6, elementwise_affine=False)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.scale_shift_table = nn.Parameter(torch.randn(6, hidden_size) / hidden_size**0.5)
        self.attn_temp = SelfAttention(hidden_size, num_heads)

    def forward(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        t0: torch.Tensor,
        key_mask: torch.Tensor | None,
        tpe: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x ``[B, T'·S, C]``, y ``[B, L, C]``, t0 ``[B, 6C]``, key_mask ``[B, L]`` or None, tpe ``[1, T', C]``."""
        f, s = self.d_t, self.d_s
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            self.scale_shift_table[None] + t0.reshape(x.shape[0], 6, -1)
        ).chunk(6, dim=1)

        # spatial branch
        x_s = rearrange(t2i_modulate(self.norm1(x), shift_msa, scale_msa), "b (f s) c -> (b f) s c", f=f, s=s)
        x_s = rearrange(self.attn(x_s), "(b f) s c -> b (f s) c", f=f, s=s)
        x = x + self.drop_path(gate_msa * x_s)

        # temporal branch: raw residual, temporal pos-emb (block 0 only) on the attention input only
        x_t = rearrange(x, "b (f s) c -> (b s) f c", f=f, s=s)
        if tpe is not None:
            x_t = x_t + tpe
        x_t = rearrange(self.attn_temp(x_t), "(b s) f c -> b (f s) c", f=f, s=s)
        x = x + self.drop_path(gate_msa * x_t)

        # cross attention
        x = x + self.cross_attn(x, y, key_mask)

        # mlp
        x_m = t2i_modulate(self.norm2(x), shift_mlp, scale_mlp)
        return x + self.drop_path(gate_mlp * self.mlp(x_m))


# =====================================================================================================
# STDiT (spec §1-§3)
# =====================================================================================================

_DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "float": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
}


def _to_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in _DTYPES:
        return _DTYPES[dtype.removeprefix("torch.")]
    raise ValueError(f"dtype must be a torch.dtype or one of {sorted(_DTYPES)}; got {dtype!r}")


class STDiT(nn.Module):
    """OpenSora v1.0 STDiT with the official constructor.

    Kernel flags: ``enable_flashattn`` and ``enable_layernorm_kernel`` are accepted and stored; attention is
    always SDPA and LayerNorm always ``nn.LayerNorm`` (same math, neither has parameters).
    ``enable_sequence_parallelism=True`` raises ``NotImplementedError``. ``no_temporal_pos_emb`` is stored and
    unused, as in the official code. ``dtype`` is stored (cast the weights with ``.to(dtype)`` yourself, as
    upstream does); inputs are cast to the weights' dtype, which is upstream's ``dtype`` wherever upstream
    runs, and stays right when a strategy casts the module (DeepSpeed under bf16). Like upstream this casts
    the timestep too, so under bf16 t = 999 becomes 1000 before the sinusoid. Set ``grad_checkpointing = True`` to checkpoint each block.
    """

    def __init__(
        self,
        input_size: tuple[int, int, int] = (1, 32, 32),
        in_channels: int = 4,
        patch_size: tuple[int, int, int] = (1, 2, 2),
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        pred_sigma: bool = True,
        drop_path: float = 0.0,
        no_temporal_pos_emb: bool = False,
        caption_channels: int = 4096,
        model_max_length: int = 120,
        dtype: torch.dtype | str = torch.float32,
        space_scale: float = 1.0,
        time_scale: float = 1.0,
        freeze: str | None = None,
        enable_flashattn: bool = False,
        enable_layernorm_kernel: bool = False,
        enable_sequence_parallelism: bool = False,
    ) -> None:
        super().__init__()
        if enable_sequence_parallelism:
            raise NotImplementedError(
                "enable_sequence_parallelism=True needs colossalai process groups, which this STDiT does not "
                "implement; use Lightning's data-parallel strategies instead"
            )
        input_size, patch_size = tuple(int(v) for v in input_size), tuple(int(v) for v in patch_size)
        if len(input_size) != 3 or len(patch_size) != 3:
            raise ValueError(f"input_size and patch_size must be (T, H, W); got {input_size}, {patch_size}")
        if any(i % p for i, p in zip(input_size, patch_size)):
            raise ValueError(f"input_size {input_size} must be divisible by patch_size {patch_size}")
        if hidden_size % 4:
            raise ValueError(f"hidden_size must be divisible by 4 for the 2-D sin-cos table; got {hidden_size}")

        self.pred_sigma = pred_sigma
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if pred_sigma else in_channels
        self.hidden_size = hidden_size
        self.patch_size = patch_size
        self.input_size = input_size
        self.num_temporal = input_size[0] // patch_size[0]
        self.num_spatial = (input_size[1] // patch_size[1]) * (input_size[2] // patch_size[2])
        self.num_patches = self.num_temporal * self.num_spatial
        self.num_heads = num_heads
        self.depth = depth
        self.mlp_ratio = mlp_ratio
        self.dtype = _to_dtype(dtype)
        self.no_temporal_pos_emb = no_temporal_pos_emb
        self.caption_channels = caption_channels
        self.model_max_length = model_max_length
        self.space_scale = space_scale
        self.time_scale = time_scale
        self.enable_flashattn = enable_flashattn
        self.enable_layernorm_kernel = enable_layernorm_kernel
        self.enable_sequence_parallelism = False
        self.grad_checkpointing = False
        # how a block is checkpointed, called as f(block, *inputs) like diffusers' gradient_checkpointing_func;
        # None: torch's non-reentrant checkpoint
        self.grad_checkpointing_func: Callable | None = None
        # facts for TQE / TMD: latent frames and spatial tokens per temporal token
        self.num_frames = input_size[0]
        self.tokens_per_frame = self.num_spatial

        # Persistent as upstream (so the key set matches the official 550); the loader recomputes them.
        grid = (input_size[1] // patch_size[1], input_size[2] // patch_size[2])
        self.register_buffer("pos_embed", spatial_pos_embed(hidden_size, grid, space_scale))
        self.register_buffer("pos_embed_temporal", temporal_pos_embed(hidden_size, self.num_temporal, time_scale))

        self.x_embedder = PatchEmbed3D(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))
        self.y_embedder = CaptionEmbedder(caption_channels, hidden_size, class_dropout_prob, model_max_length)
        rates = torch.linspace(0, drop_path, depth, device="cpu").tolist()
        self.blocks = nn.ModuleList(
            STDiTBlock(hidden_size, num_heads, self.num_spatial, self.num_temporal, mlp_ratio, rates[i])
            for i in range(depth)
        )
        self.final_layer = T2IFinalLayer(hidden_size, math.prod(patch_size), self.out_channels)

        self.initialize_weights()
        if freeze is not None:
            self._freeze(freeze)

    # ---------------------------------------------------------------- init / freeze

    def initialize_weights(self) -> None:
        """Official init: xavier linears (fused-qkv bound for q/k/v), N(0, 0.02) embedders, zeroed outputs."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        for module in self.modules():
            if isinstance(module, SelfAttention):  # xavier bound of the fused [3C, C] weight
                dim = module.q.in_features
                bound = math.sqrt(6.0 / (dim + 3 * dim))
                for lin in (module.q, module.k, module.v):
                    nn.init.uniform_(lin.weight, -bound, bound)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        for lin in (self.t_embedder.mlp[0], self.t_embedder.mlp[2], self.t_block[1]):
            nn.init.normal_(lin.weight, std=0.02)
        for lin in (self.y_embedder.y_proj.fc1, self.y_embedder.y_proj.fc2):
            nn.init.normal_(lin.weight, std=0.02)
        zeroed = [blk.cross_attn.proj for blk in self.blocks] + [blk.attn_temp.proj for blk in self.blocks]
        for lin in zeroed + [self.final_layer.linear]:
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def _freeze(self, freeze: str) -> None:
        """Official ``freeze``: "not_temporal" trains only attn_temp; "text" freezes cross_attn."""
        if freeze not in ("not_temporal", "text"):
            raise ValueError(f"freeze must be None, 'not_temporal' or 'text'; got {freeze!r}")
        for name, param in self.named_parameters():
            if (freeze == "not_temporal" and "attn_temp" not in name) or (freeze == "text" and "cross_attn" in name):
                param.requires_grad_(False)

    # ---------------------------------------------------------------- forward

    def forward(
        self,
        x: torch.Tensor,
        timestep: torch.Tensor,
        y: torch.Tensor,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x ``[B, C, T, H, W]``, timestep ``[B]`` (0..999), y ``[B, 1, L, caption_channels]``, mask ``[B', L]``
        (1 = keep; B' divides B, repeated to B rows) or None → ``[B, out_channels, T, H, W]`` in float32."""
        self._check_inputs(x, timestep, y)
        key_mask = self._key_mask(mask, x.shape[0], y.shape[2])
        # the weights' dtype: upstream casts to ``dtype`` and sets the weights alike; a strategy that casts
        # the module's parameters (DeepSpeed under bf16-mixed; since DeepSpeed 0.18 its fp32 buffers stay
        # fp32) leaves ``dtype`` behind, so the buffers added to activations follow the weights too
        dtype = self.x_embedder.proj.weight.dtype
        x, timestep, y = x.to(dtype), timestep.to(dtype), y.to(dtype)

        x = rearrange(self.x_embedder(x), "b (f s) c -> b f s c", f=self.num_temporal, s=self.num_spatial)
        x = rearrange(x + self.pos_embed.to(dtype), "b f s c -> b (f s) c")
        t = self.t_embedder(timestep, dtype=dtype)  # [B, C]
        t0 = self.t_block(t)  # [B, 6C]
        y = self.y_embedder(y, self.training).squeeze(1)  # [B, L, C]

        for i, block in enumerate(self.blocks):
            tpe = self.pos_embed_temporal.to(dtype) if i == 0 else None
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = (self.grad_checkpointing_func or _checkpoint)(block, x, y, t0, key_mask, tpe)
            else:
                x = block(x, y, t0, key_mask, tpe)

        x = self.unpatchify(self.final_layer(x, t))
        return x.to(torch.float32)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, N, pt·ph·pw·C_out]`` → ``[B, C_out, T, H, W]``; C_out is the fastest index (spec §3.5)."""
        pt, ph, pw = self.patch_size
        nt, nh, nw = (i // p for i, p in zip(self.input_size, self.patch_size))
        return rearrange(
            x,
            "b (nt nh nw) (pt ph pw c) -> b c (nt pt) (nh ph) (nw pw)",
            nt=nt, nh=nh, nw=nw, pt=pt, ph=ph, pw=pw, c=self.out_channels,
        )  # fmt: skip

    # ---------------------------------------------------------------- input checks

    def _check_inputs(self, x: torch.Tensor, timestep: torch.Tensor, y: torch.Tensor) -> None:
        want_x = [x.shape[0] if x.dim() else "B", self.in_channels, *self.input_size]
        if x.dim() != 5:
            raise ValueError(f"x must be [B, C, T, H, W] = {_fmt(want_x)} (5 dims); got shape {_fmt(x.shape)}")
        if x.shape[1] != self.in_channels:
            raise ValueError(
                f"x has {x.shape[1]} channels but in_channels={self.in_channels}: expected {_fmt(want_x)}, "
                f"got {_fmt(x.shape)}"
            )
        thw = tuple(x.shape[2:])
        if any(n % p for n, p in zip(thw, self.patch_size)):
            raise ValueError(
                f"x frames/height/width {thw} are not divisible by patch_size {self.patch_size}: expected "
                f"{_fmt(want_x)}, got {_fmt(x.shape)}"
            )
        if thw != self.input_size:
            raise ValueError(
                f"x frames/height/width {thw} do not match input_size {self.input_size}: expected "
                f"{_fmt(want_x)}, got {_fmt(x.shape)}"
            )
        batch = x.shape[0]
        if timestep.shape != (batch,):
            raise ValueError(f"timestep must be [B] = [{batch}]; got shape {_fmt(timestep.shape)}")
        want_y = [batch, 1, "L", self.caption_channels]
        if y.dim() != 4 or y.shape[0] != batch or y.shape[1] != 1:
            raise ValueError(f"y must be [B, 1, L, caption_channels] = {_fmt(want_y)}; got shape {_fmt(y.shape)}")
        if y.shape[3] != self.caption_channels:
            raise ValueError(
                f"y caption width {y.shape[3]} != caption_channels {self.caption_channels}: expected "
                f"{_fmt(want_y)}, got {_fmt(y.shape)}"
            )
        if self.training and self.y_embedder.uncond_prob > 0 and y.shape[2] != self.model_max_length:
            raise ValueError(
                f"caption dropout in training needs L = model_max_length = {self.model_max_length}; "
                f"got y of shape {_fmt(y.shape)}"
            )

    @staticmethod
    def _key_mask(mask: torch.Tensor | None, batch: int, length: int) -> torch.Tensor | None:
        """Official mask handling (squeeze ``[B,1,1,L]``, repeat B' → B rows) as a bool ``[B, L]`` key mask."""
        if mask is None:
            return None
        if mask.dim() == 4 and mask.shape[1:3] == (1, 1):
            mask = mask[:, 0, 0]
        if mask.dim() != 2 or mask.shape[1] != length or mask.shape[0] == 0 or batch % mask.shape[0]:
            raise ValueError(
                f"mask must be [B', L] with B' dividing B = {batch} and L = {length}; got shape {_fmt(mask.shape)}"
            )
        keep = mask.repeat(batch // mask.shape[0], 1) != 0
        # eager forwards of host tensors only: on a GPU the check would make the host wait for the device
        # every forward; the data module's masks were checked on the host (Denoiser._check_cond)
        if keep.device.type == "cpu" and not torch.compiler.is_compiling() and not bool(keep.any(dim=1).all()):
            raise ValueError("every mask row needs at least one kept text token (mask row with all zeros)")
        return keep


def _fmt(shape: torch.Size | list | tuple) -> str:
    return "[" + ", ".join(str(s) for s in shape) + "]"


# =====================================================================================================
# Presets
# =====================================================================================================


def STDiT_XL_2(from_pretrained: str | os.PathLike | None = None, **kwargs) -> STDiT:
    """Official STDiT-XL/2 (depth 28, 1152 wide, 16 heads, patch (1, 2, 2)).

    ``input_size`` defaults to the released 16x512x512 latent (16, 64, 64) instead of the class default.
    """
    kwargs.setdefault("input_size", (16, 64, 64))
    model = STDiT(depth=28, hidden_size=1152, patch_size=(1, 2, 2), num_heads=16, **kwargs)
    if from_pretrained is not None:
        load_official_checkpoint(model, from_pretrained)
    return model


def tiny_stdit(**kwargs) -> STDiT:
    """A CPU-sized STDiT for tests: depth 2, 64 wide, 4 heads, latent (4, 8, 8), captions 8 × 32."""
    config = dict(
        input_size=(4, 8, 8),
        in_channels=4,
        patch_size=(1, 2, 2),
        hidden_size=64,
        depth=2,
        num_heads=4,
        caption_channels=32,
        model_max_length=8,
    )
    config.update(kwargs)
    return STDiT(**config)


# =====================================================================================================
# Official checkpoint loading (spec §2 "Loading", §5)
# =====================================================================================================

_FUSED_QKV = re.compile(r"^(.*)\.qkv\.(weight|bias)$")
_SPLIT_QKV = re.compile(r"^(.*\.(?:attn|attn_temp))\.[qkv]\.(weight|bias)$")
_RECOMPUTED_BUFFERS = ("pos_embed", "pos_embed_temporal")
_WRAPPER_KEYS = ("ema", "model", "state_dict", "module")
_MAX_LISTED = 30


class LoadResult(NamedTuple):
    missing_keys: list[str]
    unexpected_keys: list[str]


class CheckpointMismatchError(ValueError):
    """The checkpoint does not fit the model; ``missing``, ``unexpected``, ``mismatched`` hold every item."""

    def __init__(self, message: str, missing: list[str], unexpected: list[str], mismatched: list[str]) -> None:
        super().__init__(message)
        self.missing, self.unexpected, self.mismatched = missing, unexpected, mismatched


def convert_official_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Split every fused ``*.qkv.{weight,bias}`` into ``*.q/.k/.v`` (contiguous thirds along dim 0).

    Idempotent: a Q-VDiT split checkpoint passes through unchanged. Other keys are kept as they are.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        match = _FUSED_QKV.match(key)
        if match is None:
            out[key] = value
            continue
        if value.dim() == 0 or value.shape[0] % 3:
            raise ValueError(f"{key}: a fused qkv tensor needs dim 0 divisible by 3; got shape {tuple(value.shape)}")
        for name, part in zip("qkv", value.chunk(3, dim=0)):
            out[f"{match[1]}.{name}.{match[2]}"] = part
    return out


def _unwrap(obj: object) -> dict[str, torch.Tensor]:
    """Descend into {'ema'|'model'|'state_dict'|'module': ...} wrappers and strip a 'module.' prefix."""
    while isinstance(obj, Mapping):
        inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping):
        raise ValueError(f"checkpoint must hold a state dict (a mapping of tensors); got {type(obj).__name__}")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"checkpoint state dict has non-tensor entries: {bad[:_MAX_LISTED]}")
    sd = dict(obj)
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k.removeprefix("module."): v for k, v in sd.items()}
    return sd


def _read_checkpoint(source: str | os.PathLike | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if isinstance(source, Mapping):
        return _unwrap(source)
    return _unwrap(read_tensor_file(source, "weights file", weights_only=True))


def _listing(title: str, items: list[str]) -> str:
    shown = items[:_MAX_LISTED]
    more = f"\n    ... and {len(items) - len(shown)} more" if len(items) > len(shown) else ""
    return f"  {title} ({len(items)}):\n" + "\n".join(f"    {item}" for item in shown) + more


def _official_name(key: str) -> str:
    """Name of a split q/k/v key in the official fused layout, for error messages."""
    match = _SPLIT_QKV.match(key)
    return f"{key} (official: {match[1]}.qkv.{match[2]})" if match else key


def load_official_checkpoint(
    model: STDiT,
    path_or_state_dict: str | os.PathLike | Mapping[str, torch.Tensor],
    strict: bool = True,
) -> LoadResult:
    """Load an official (fused qkv) or Q-VDiT (split) STDiT checkpoint into ``model``.

    Accepts a ``.pth``/``.pt`` file (``torch.load(weights_only=True)``), a ``.safetensors`` file or a dict,
    unwrapping ``ema`` / ``model`` / ``state_dict`` / ``module`` entries and ``module.`` prefixes.
    ``pos_embed`` and ``pos_embed_temporal`` are dropped and kept as recomputed from ``input_size``, as the
    official loader does. Everything is checked before the model is touched: missing or unexpected keys
    (when ``strict``) and shape mismatches (always) raise :class:`CheckpointMismatchError` (a ``ValueError``).
    """
    sd = convert_official_state_dict(_read_checkpoint(path_or_state_dict))
    for name in _RECOMPUTED_BUFFERS:
        sd.pop(name, None)
    expected = {k: v for k, v in model.state_dict().items() if k not in _RECOMPUTED_BUFFERS}

    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    mismatched = [
        f"{_official_name(k)}: expected {tuple(expected[k].shape)}, found {tuple(sd[k].shape)}"
        for k in expected
        if k in sd and sd[k].shape != expected[k].shape
    ]
    if mismatched or (strict and (missing or unexpected)):
        source = path_or_state_dict if not isinstance(path_or_state_dict, Mapping) else "state dict"
        sections = [
            _listing("missing keys", [_official_name(k) for k in missing]) if strict and missing else "",
            _listing("unexpected keys", unexpected) if strict and unexpected else "",
            _listing("shape mismatches (name: expected, found)", mismatched) if mismatched else "",
        ]
        message = f"STDiT checkpoint ({source}) does not fit the model:\n" + "\n".join(s for s in sections if s)
        raise CheckpointMismatchError(message, missing, unexpected, mismatched)

    model.load_state_dict({k: v for k, v in sd.items() if k in expected}, strict=False)
    return LoadResult(missing, unexpected)
