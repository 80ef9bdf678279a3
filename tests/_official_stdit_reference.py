"""Test-only restatement of the OFFICIAL OpenSora v1.0 STDiT structure (research/opensora_stdit.md §2-§3).

Written from the spec, independently of ``mpq_lightning.models.stdit``: fused ``qkv`` linears, eager
attention (fp32 softmax), text tokens packed into ``[1, ΣL, C]`` with ``masked_select`` and cross-attention
under a dense block-diagonal bias (the xformers ``BlockDiagonalMask`` semantics). Its ``state_dict`` has the
official key layout. Inference only (no caption dropout, no drop path).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
from einops import rearrange


def _sincos(dim: int, pos: np.ndarray) -> np.ndarray:
    omega = np.arange(dim // 2, dtype=np.float64)
    omega /= dim / 2.0
    omega = 1.0 / 10000**omega
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def _pos_2d(dim: int, h: int, w: int, scale: float) -> np.ndarray:
    gh = np.arange(h, dtype=np.float32) / scale
    gw = np.arange(w, dtype=np.float32) / scale
    grid = np.stack(np.meshgrid(gw, gh), axis=0).reshape(2, 1, w, h)  # w goes first
    return np.concatenate([_sincos(dim // 2, grid[0]), _sincos(dim // 2, grid[1])], axis=1)


class RefMlp(nn.Module):
    def __init__(self, d_in: int, d_hidden: int, d_out: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_in, d_hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(d_hidden, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class RefAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads, self.hd = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, self.hd).permute(2, 0, 3, 1, 4).unbind(0)
        attn = ((q * self.hd**-0.5) @ k.transpose(-2, -1)).float().softmax(-1).to(q.dtype)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, N, C))


class RefCrossAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads, self.hd = heads, dim // heads
        self.q_linear = nn.Linear(dim, dim)
        self.kv_linear = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, cond: torch.Tensor, y_lens: list[int]) -> torch.Tensor:
        """x [B, N, C]; cond packed [1, ΣL, C]; query block b sees only key block b."""
        B, N, C = x.shape
        q = self.q_linear(x).view(1, B * N, self.heads, self.hd).transpose(1, 2)  # [1, H, BN, d]
        kv = self.kv_linear(cond).view(1, -1, 2, self.heads, self.hd)
        k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)  # [1, H, ΣL, d]
        bias = torch.full((B * N, sum(y_lens)), float("-inf"), device=x.device)
        start = 0
        for b, n in enumerate(y_lens):
            bias[b * N : (b + 1) * N, start : start + n] = 0.0
            start += n
        attn = ((q * self.hd**-0.5) @ k.transpose(-2, -1) + bias).softmax(-1)
        out = (attn @ v).transpose(1, 2).reshape(B, N, C)
        return self.proj(out)


class RefBlock(nn.Module):
    def __init__(self, dim: int, heads: int, d_s: int, d_t: int, mlp_ratio: float) -> None:
        super().__init__()
        self.d_s, self.d_t = d_s, d_t
        self.norm1 = nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False)
        self.attn = RefAttention(dim, heads)
        self.cross_attn = RefCrossAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False)
        self.mlp = RefMlp(dim, int(dim * mlp_ratio), dim)
        self.scale_shift_table = nn.Parameter(torch.randn(6, dim) / dim**0.5)
        self.attn_temp = RefAttention(dim, heads)

    def forward(self, x, y, t0, y_lens, tpe):
        B = x.shape[0]
        sh1, sc1, g1, sh2, sc2, g2 = (self.scale_shift_table[None] + t0.reshape(B, 6, -1)).chunk(6, dim=1)
        xm = self.norm1(x) * (1 + sc1) + sh1
        xs = self.attn(rearrange(xm, "B (T S) C -> (B T) S C", T=self.d_t, S=self.d_s))
        x = x + g1 * rearrange(xs, "(B T) S C -> B (T S) C", T=self.d_t, S=self.d_s)
        xt = rearrange(x, "B (T S) C -> (B S) T C", T=self.d_t, S=self.d_s)
        if tpe is not None:
            xt = xt + tpe
        xt = self.attn_temp(xt)
        x = x + g1 * rearrange(xt, "(B S) T C -> B (T S) C", T=self.d_t, S=self.d_s)
        x = x + self.cross_attn(x, y, y_lens)
        return x + g2 * self.mlp(self.norm2(x) * (1 + sc2) + sh2)


class _PatchEmbed(nn.Module):
    def __init__(self, patch, cin, dim):
        super().__init__()
        self.proj = nn.Conv3d(cin, dim, kernel_size=patch, stride=patch)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class _TEmbed(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(256, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t, dtype):
        freqs = torch.exp(-math.log(10000) * torch.arange(128, dtype=torch.float32, device=t.device) / 128)
        args = t[:, None].float() * freqs[None]
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1).to(dtype))


class _YEmbed(nn.Module):
    def __init__(self, cin, dim, tokens):
        super().__init__()
        self.y_proj = RefMlp(cin, dim, dim)
        self.register_buffer("y_embedding", torch.randn(tokens, cin) / cin**0.5)


class _Final(nn.Module):
    def __init__(self, dim, n_out):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, n_out)
        self.scale_shift_table = nn.Parameter(torch.randn(2, dim) / dim**0.5)


class OfficialSTDiTReference(nn.Module):
    def __init__(
        self,
        input_size=(4, 8, 8),
        in_channels=4,
        patch_size=(1, 2, 2),
        hidden_size=64,
        depth=2,
        num_heads=4,
        mlp_ratio=4.0,
        caption_channels=32,
        model_max_length=8,
        space_scale=1.0,
        time_scale=1.0,
    ) -> None:
        super().__init__()
        self.input_size, self.patch_size = input_size, patch_size
        self.out_channels = 2 * in_channels
        self.T = input_size[0] // patch_size[0]
        hp, wp = input_size[1] // patch_size[1], input_size[2] // patch_size[2]
        self.S = hp * wp
        pe = _pos_2d(hidden_size, hp, wp, space_scale)
        pt = _sincos(hidden_size, np.arange(0, self.T)[..., None] / time_scale)
        self.register_buffer("pos_embed", torch.from_numpy(pe).float().unsqueeze(0))
        self.register_buffer("pos_embed_temporal", torch.from_numpy(pt).float().unsqueeze(0))
        self.x_embedder = _PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = _TEmbed(hidden_size)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))
        self.y_embedder = _YEmbed(caption_channels, hidden_size, model_max_length)
        self.blocks = nn.ModuleList(
            RefBlock(hidden_size, num_heads, self.S, self.T, mlp_ratio) for _ in range(depth)
        )
        self.final_layer = _Final(hidden_size, math.prod(patch_size) * self.out_channels)

    def forward(self, x, timestep, y, mask=None):
        x = self.x_embedder(x)
        x = rearrange(x, "B (T S) C -> B T S C", T=self.T, S=self.S) + self.pos_embed
        x = rearrange(x, "B T S C -> B (T S) C")
        t = self.t_embedder(timestep.float(), dtype=x.dtype)
        t0 = self.t_block(t)
        y = self.y_embedder.y_proj(y)  # [B, 1, L, C]
        C = x.shape[-1]
        if mask is not None:
            if mask.shape[0] != y.shape[0]:
                mask = mask.repeat(y.shape[0] // mask.shape[0], 1)
            mask = mask.squeeze(1).squeeze(1)
            y = y.squeeze(1).masked_select(mask.unsqueeze(-1) != 0).view(1, -1, C)
            y_lens = mask.sum(dim=1).tolist()
        else:
            y_lens = [y.shape[2]] * y.shape[0]
            y = y.squeeze(1).view(1, -1, C)
        for i, block in enumerate(self.blocks):
            x = block(x, y, t0, y_lens, self.pos_embed_temporal if i == 0 else None)
        fl = self.final_layer
        sh, sc = (fl.scale_shift_table[None] + t[:, None]).chunk(2, dim=1)
        x = fl.linear(fl.norm_final(x) * (1 + sc) + sh)
        nt, nh, nw = (i // p for i, p in zip(self.input_size, self.patch_size))
        pt, ph, pw = self.patch_size
        x = x.reshape(x.shape[0], nt, nh, nw, pt, ph, pw, self.out_channels)
        x = rearrange(x, "n t h w r p q c -> n c t r h p w q")
        return x.reshape(x.shape[0], self.out_channels, nt * pt, nh * ph, nw * pw).float()
