"""Denoiser adapters for diffusers backbones: Latte, Wan, CogVideoX, DiT, UNet2D, UNet2DCondition.

The file is not called ``diffusers.py``: absolute imports would still find the library, but
``from .diffusers import`` next to ``from diffusers import`` invites mistakes and a script run from
this folder would shadow the library.

Each adapter maps ``(x_t [B, C, (F,) H, W], t [B], cond)`` to the library's forward and back, and
declares the facts of `Denoiser`. Names: ``build("latte")`` / ``build("tiny-latte")`` etc. Keyword
arguments of every builder:

* ``path``: a local diffusers folder (a model folder with ``config.json`` or a pipeline folder, whose
  ``transformer``/``unet`` subfolder is used and whose ``scheduler`` config becomes the default);
* ``config``: a dict merged into the preset config (random weights); ``subfolder``, ``torch_dtype``;
* ``latent_shape``: per-sample latent shape the model is used at (video (C, F, H, W), image (C, H, W)).

FP-kept layers and bit maps (module names relative to the backbone):

* video DiTs keep the patch embedder, timestep / caption embedders and the final layer in FP, as
  Q-VDiT's ``remain_fp.txt`` does for STDiT; Wan uses the Q-VDiT Wan port's list
  (``patch_embedding``, ``condition_embedder``, ``proj_out``). No bit map: Q-VDiT's MLP-W8A8 map is
  specific to STDiT (and the Wan port's copy of it matched nothing, qvdit.md §11).
* UNets follow EfficientDM / MPQ-DM (mpqdm.md §2.1): LDM's ``skip_connection`` (ResBlock 1x1 skip)
  and ``op`` (Downsample conv) stay FP, i.e. diffusers ``*conv_shortcut`` and ``*downsamplers.*``; the
  first three wrapped layers (``time_embed.0``, ``time_embed.2``, input conv) and the output conv are
  W8A8, i.e. ``time_embedding.*``, ``conv_in``, ``conv_out`` (plus ``class_embedding.*`` /
  ``add_embedding.*`` linears where present, which sit beside the timestep embedding).
* UNet feature site: ``up_blocks.{n-1}``, whose output equals LDM's ``output_blocks[-1]`` output (the
  features before the final GroupNorm-SiLU-conv head) that MPQ-DM's TRD hooks.
"""

from __future__ import annotations

import inspect
import json
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import diffusers
import torch
from diffusers import (
    CogVideoXTransformer3DModel,
    DiTTransformer2DModel,
    LatteTransformer3DModel,
    UNet2DConditionModel,
    UNet2DModel,
    WanTransformer3DModel,
)
from diffusers.models.embeddings import get_3d_rotary_pos_embed
from einops import rearrange, repeat
from torch import nn

from mpq_lightning.models.registry import CondSpec, Denoiser, register

__all__ = [
    "CogVideoXDenoiser",
    "DiTDenoiser",
    "LatteDenoiser",
    "UNet2DConditionDenoiser",
    "UNet2DDenoiser",
    "WanDenoiser",
    "load_diffusers_model",
]

# -------------------------------------------------------------------------------------------------
# Shared pieces
# -------------------------------------------------------------------------------------------------

#: Layer kinds of a diffusers `BasicTransformerBlock` (attn1 self, attn2 cross, ff), by suffix.
_BLOCK_KINDS = [
    ("*.attn2.to_q", "cross_q"),
    ("*.attn2.to_k", "cross_kv"),
    ("*.attn2.to_v", "cross_kv"),
    ("*.attn2.add_k_proj", "cross_kv"),
    ("*.attn2.add_v_proj", "cross_kv"),
    ("*.attn2.to_out.0", "cross_proj"),
    ("*.attn1.*", "self"),
    ("*.ff.net.*", "mlp"),
    ("*.ffn.net.*", "mlp"),
]

_UNET_8BIT = ("conv_in", "conv_out", "time_embedding.*", "class_embedding.*", "add_embedding.*")
_UNET_BIT_MAP = {p: {"w": 8, "a": 8} for p in _UNET_8BIT}
_UNET_KEEP_FP = ["*conv_shortcut", "*downsamplers.*"]
_UNET_KINDS = [
    *_BLOCK_KINDS,
    ("*attentions.*.to_[qkv]", "self"),  # UNet2DModel attention blocks (no transformer_blocks)
    ("*attentions.*.to_out.0", "self"),
    ("conv_in", "conv"),
    ("conv_out", "conv"),
    ("*.conv[12]", "conv"),
    ("*conv_shortcut", "conv"),
    ("*samplers.*.conv", "conv"),
]
_UNET_LAYOUTS = {"self": "b s c", "cross_q": "b s c", "cross_kv": "b l c", "cross_proj": "b s c", "mlp": "b s c"}


def _scheduler(name: str, steps: int, guidance: float, **config: Any) -> dict[str, Any]:
    return {"name": name, "config": config, "num_inference_steps": steps, "guidance_scale": guidance}


def _resolve_latent_shape(latent_shape: Sequence[int] | None, default: Sequence[int]) -> tuple[int, ...]:
    shape = tuple(latent_shape) if latent_shape is not None else tuple(default)
    if len(shape) != len(default):
        raise ValueError(f"latent_shape must have {len(default)} entries like {tuple(default)}, got {shape}")
    if shape[0] != default[0]:
        raise ValueError(f"latent_shape {shape} has {shape[0]} channels but the model takes {default[0]}")
    return shape


def _as_pair(size: int | Sequence[int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


# -------------------------------------------------------------------------------------------------
# Latte (LatteTransformer3DModel): [B, C, F, H, W] in and out
# -------------------------------------------------------------------------------------------------


class LatteDenoiser(Denoiser):
    """Latte: cond {"encoder_hidden_states": [B, L, caption_channels], "encoder_attention_mask": [B, L]}."""

    backbone_class = LatteTransformer3DModel
    #: maxin-cn/Latte-1 (T2V, 16x512x512, T5 captions).
    PRESET = dict(
        num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
        cross_attention_dim=1152, attention_bias=True, sample_size=64, patch_size=2,
        activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
        norm_elementwise_affine=False, norm_eps=1e-6, caption_channels=4096, video_length=16,
    )  # fmt: skip
    TINY = dict(PRESET, num_attention_heads=2, attention_head_dim=8, num_layers=2, cross_attention_dim=16,
                sample_size=8, caption_channels=16, video_length=4)  # fmt: skip
    #: Latte-1's scheduler_config (DDIM, linear betas, "leading") with LattePipeline's 50 steps, CFG 7.5.
    SCHEDULER = _scheduler("DDIMScheduler", 50, 7.5, num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02,
                           beta_schedule="linear", clip_sample=False, timestep_spacing="leading")  # fmt: skip

    def __init__(
        self,
        backbone: LatteTransformer3DModel,
        latent_shape: Sequence[int] | None = None,
        default_scheduler: Mapping[str, Any] | None = None,
    ) -> None:
        cfg = backbone.config
        shape = _resolve_latent_shape(latent_shape, (cfg.in_channels, cfg.video_length, cfg.sample_size, cfg.sample_size))
        if shape[1] != cfg.video_length:
            raise ValueError(
                f"Latte's temporal position table has video_length={cfg.video_length} frames; got latent_shape {shape}"
            )
        p, n = cfg.patch_size, cfg.num_layers
        super().__init__(
            backbone,
            latent_shape=shape,
            patch_size=(1, p, p),
            out_channels=backbone.out_channels,
            cond_kind="text",
            cond_spec={
                "encoder_hidden_states": CondSpec((None, cfg.caption_channels)),
                "encoder_attention_mask": CondSpec((None,), "mask", required=False),
            },
            prediction_type="epsilon",
            default_scheduler=default_scheduler or self.SCHEDULER,
            feature_site=f"temporal_transformer_blocks.{n - 1}",
            feature_layout="(b s) f c",
            layer_kinds=[
                ("temporal_transformer_blocks.*.attn1.*", "temporal"),
                ("temporal_transformer_blocks.*.ff.*", "temporal_mlp"),
                ("transformer_blocks.*.attn1.*", "spatial"),
                *_BLOCK_KINDS,
            ],
            token_layouts={
                "spatial": "(b f) s c", "temporal": "(b s) f c", "cross_q": "(b f) s c", "cross_kv": "(b f) l c",
                "cross_proj": "(b f) s c", "mlp": "(b f) s c", "temporal_mlp": "(b s) f c",
            },  # fmt: skip
            tokens_per_frame=(shape[2] // p) * (shape[3] // p),
            default_keep_fp=["pos_embed.proj", "adaln_single.*", "caption_projection.*", "proj_out"],
        )

    def call_backbone(self, x_t: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        text, mask = cond["encoder_hidden_states"], cond.get("encoder_attention_mask")
        if mask is not None:
            # Latte's forward neither converts the keep-mask to a bias nor repeats it over frames
            bias = (1.0 - (mask != 0).to(text.dtype)) * -10000.0
            mask = repeat(bias, "b l -> (b f) 1 l", f=x_t.shape[2])
        out = self.backbone(x_t, timestep=t, encoder_hidden_states=text, encoder_attention_mask=mask, return_dict=False)
        return out[0]


# -------------------------------------------------------------------------------------------------
# Wan 2.1 (WanTransformer3DModel): [B, C, F, H, W] in and out, flow matching
# -------------------------------------------------------------------------------------------------


class WanDenoiser(Denoiser):
    """Wan 2.1 text-to-video: cond {"encoder_hidden_states": [B, L, text_dim]} (UMT5, zero-padded to 512)."""

    backbone_class = WanTransformer3DModel
    #: Wan-AI/Wan2.1-T2V-1.3B-Diffusers.
    PRESET = dict(
        patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
        text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024,
    )  # fmt: skip
    TINY = dict(PRESET, num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4, text_dim=16,
                freq_dim=32, ffn_dim=32, num_layers=2, rope_max_seq_len=32)  # fmt: skip
    #: 480x832x81 → 21 latent frames of 60x104 (qvdit.md §11).
    PRESET_LATENT = (16, 21, 60, 104)
    TINY_LATENT = (4, 3, 8, 8)
    #: The Q-VDiT Wan port: UniPC flow prediction, flow_shift 8.0, 50 steps, CFG 6.0 (qvdit.md §11).
    SCHEDULER = _scheduler("UniPCMultistepScheduler", 50, 6.0, num_train_timesteps=1000,
                           prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=8.0)  # fmt: skip

    def __init__(
        self,
        backbone: WanTransformer3DModel,
        latent_shape: Sequence[int] | None = None,
        default_scheduler: Mapping[str, Any] | None = None,
    ) -> None:
        cfg = backbone.config
        if cfg.image_dim is not None:
            raise ValueError("only text-to-video Wan is supported (this model has an image embedder, image_dim set)")
        shape = _resolve_latent_shape(latent_shape, (cfg.in_channels, *self.PRESET_LATENT[1:]))
        pt, ph, pw = cfg.patch_size
        super().__init__(
            backbone,
            latent_shape=shape,
            patch_size=(pt, ph, pw),
            out_channels=cfg.out_channels,
            cond_kind="text",
            cond_spec={"encoder_hidden_states": CondSpec((None, cfg.text_dim))},
            prediction_type="flow_prediction",
            default_scheduler=default_scheduler or self.SCHEDULER,
            feature_site=f"blocks.{cfg.num_layers - 1}",
            feature_layout="b (f s) c",
            layer_kinds=_BLOCK_KINDS,
            token_layouts={"self": "b (f s) c", "cross_q": "b (f s) c", "cross_kv": "b l c",
                           "cross_proj": "b (f s) c", "mlp": "b (f s) c"},  # fmt: skip
            tokens_per_frame=(shape[2] // ph) * (shape[3] // pw),
            default_keep_fp=["patch_embedding", "condition_embedder.*", "proj_out"],
        )

    def call_backbone(self, x_t: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.backbone(x_t, timestep=t, encoder_hidden_states=cond["encoder_hidden_states"], return_dict=False)[0]


# -------------------------------------------------------------------------------------------------
# CogVideoX (CogVideoXTransformer3DModel): [B, F, C, H, W] in and out
# -------------------------------------------------------------------------------------------------


def _resize_crop_region(grid: tuple[int, int], width: int, height: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """CogVideoX's crop of the base RoPE grid (as the diffusers pipeline computes it)."""
    h, w = grid
    if h / w > height / width:
        rh, rw = height, int(round(height / h * w))
    else:
        rh, rw = int(round(width / w * h)), width
    top, left = int(round((height - rh) / 2.0)), int(round((width - rw) / 2.0))
    return (top, left), (top + rh, left + rw)


class CogVideoXDenoiser(Denoiser):
    """CogVideoX text-to-video: cond {"encoder_hidden_states": [B, L, text_embed_dim]}.

    Attention runs over the concatenated text + video tokens, so the attention linears are kind
    "joint" and no kind has an einops token layout. RoPE (CogVideoX-5b, 1.5) is computed here.
    """

    backbone_class = CogVideoXTransformer3DModel
    #: THUDM/CogVideoX-2b.
    PRESET = dict(
        num_attention_heads=30, attention_head_dim=64, in_channels=16, out_channels=16, flip_sin_to_cos=True,
        freq_shift=0, time_embed_dim=512, text_embed_dim=4096, num_layers=30, attention_bias=True,
        sample_width=90, sample_height=60, sample_frames=49, patch_size=2, temporal_compression_ratio=4,
        max_text_seq_length=226, activation_fn="gelu-approximate", timestep_activation_fn="silu",
        norm_elementwise_affine=True, norm_eps=1e-5, spatial_interpolation_scale=1.875,
        temporal_interpolation_scale=1.0, use_rotary_positional_embeddings=False,
    )  # fmt: skip
    TINY = dict(PRESET, num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=16,
                text_embed_dim=16, num_layers=2, sample_width=8, sample_height=8, sample_frames=9,
                max_text_seq_length=6)  # fmt: skip
    #: CogVideoX-2b's scheduler_config with CogVideoXPipeline's 50 steps, CFG 6.0.
    SCHEDULER = _scheduler(
        "CogVideoXDDIMScheduler", 50, 6.0, num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
        beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=True, steps_offset=0,
        prediction_type="v_prediction", rescale_betas_zero_snr=True, snr_shift_scale=3.0, timestep_spacing="trailing",
    )  # fmt: skip

    def __init__(
        self,
        backbone: CogVideoXTransformer3DModel,
        latent_shape: Sequence[int] | None = None,
        default_scheduler: Mapping[str, Any] | None = None,
    ) -> None:
        cfg = backbone.config
        if cfg.ofs_embed_dim:
            raise ValueError(
                "only text-to-video CogVideoX is supported (this model has an ofs embedding: image-to-video)"
            )
        frames = (cfg.sample_frames - 1) // cfg.temporal_compression_ratio + 1
        shape = _resolve_latent_shape(latent_shape, (cfg.in_channels, frames, cfg.sample_height, cfg.sample_width))
        p, pt = cfg.patch_size, cfg.patch_size_t or 1
        # sin-cos position tables have exactly max_text_seq_length text slots; RoPE takes any length
        length = None if cfg.use_rotary_positional_embeddings else cfg.max_text_seq_length
        super().__init__(
            backbone,
            latent_shape=shape,
            patch_size=(pt, p, p),
            out_channels=cfg.out_channels,
            cond_kind="text",
            cond_spec={"encoder_hidden_states": CondSpec((length, cfg.text_embed_dim))},
            prediction_type="v_prediction",
            default_scheduler=default_scheduler or self.SCHEDULER,
            feature_site="norm_final",
            feature_layout="b (f s) c",
            layer_kinds=[("transformer_blocks.*.attn1.*", "joint"), ("transformer_blocks.*.ff.*", "mlp")],
            tokens_per_frame=(shape[2] // p) * (shape[3] // p),
            default_keep_fp=["patch_embed.*", "time_embedding.*", "norm_out.*", "proj_out"],
        )

    def _rotary(self, frames: int, height: int, width: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.backbone.config
        p = cfg.patch_size
        grid, base = (height // p, width // p), (cfg.sample_height // p, cfg.sample_width // p)
        if cfg.patch_size_t is None:
            return get_3d_rotary_pos_embed(
                embed_dim=cfg.attention_head_dim,
                crops_coords=_resize_crop_region(grid, base[1], base[0]),
                grid_size=grid,
                temporal_size=frames,
                device=device,
            )
        return get_3d_rotary_pos_embed(
            embed_dim=cfg.attention_head_dim,
            crops_coords=None,
            grid_size=grid,
            temporal_size=math.ceil(frames / cfg.patch_size_t),
            grid_type="slice",
            max_size=base,
            device=device,
        )

    def call_backbone(self, x_t: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        _, _, frames, height, width = x_t.shape
        rotary = None
        if self.backbone.config.use_rotary_positional_embeddings:
            rotary = self._rotary(frames, height, width, x_t.device)
        out = self.backbone(
            rearrange(x_t, "b c f h w -> b f c h w"),
            encoder_hidden_states=cond["encoder_hidden_states"],
            timestep=t,
            image_rotary_emb=rotary,
            return_dict=False,
        )[0]
        return rearrange(out, "b f c h w -> b c f h w")


# -------------------------------------------------------------------------------------------------
# DiT (DiTTransformer2DModel): class-conditional images
# -------------------------------------------------------------------------------------------------


class DiTDenoiser(Denoiser):
    """DiT: cond {"class_labels": [B] long}; the null class for CFG is `num_embeds_ada_norm`."""

    backbone_class = DiTTransformer2DModel
    #: facebook/DiT-XL-2-256.
    PRESET = dict(
        num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
        attention_bias=True, sample_size=32, patch_size=2, activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000, norm_type="ada_norm_zero", norm_elementwise_affine=False,
    )  # fmt: skip
    TINY = dict(
        PRESET, num_attention_heads=2, attention_head_dim=8, num_layers=2, sample_size=8, num_embeds_ada_norm=10
    )
    #: DiTPipeline defaults: 50 steps, CFG 4.0, over DDIM with DiT's linear training betas.
    SCHEDULER = _scheduler("DDIMScheduler", 50, 4.0, num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02,
                           beta_schedule="linear", clip_sample=False)  # fmt: skip

    def __init__(
        self,
        backbone: DiTTransformer2DModel,
        latent_shape: Sequence[int] | None = None,
        default_scheduler: Mapping[str, Any] | None = None,
    ) -> None:
        cfg = backbone.config
        shape = _resolve_latent_shape(latent_shape, (cfg.in_channels, cfg.sample_size, cfg.sample_size))
        p = cfg.patch_size
        super().__init__(
            backbone,
            latent_shape=shape,
            patch_size=(p, p),
            out_channels=backbone.out_channels,
            cond_kind="class",
            cond_spec={"class_labels": CondSpec((), "long")},
            prediction_type="epsilon",
            default_scheduler=default_scheduler or self.SCHEDULER,
            feature_site=f"transformer_blocks.{cfg.num_layers - 1}",
            feature_layout="b s c",
            layer_kinds=_BLOCK_KINDS,
            token_layouts={"self": "b s c", "mlp": "b s c"},
            tokens_per_frame=(shape[1] // p) * (shape[2] // p),
            default_keep_fp=["pos_embed.proj", "transformer_blocks.*.norm1.emb.*", "proj_out_1", "proj_out_2"],
        )

    def call_backbone(self, x_t: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.backbone(x_t, timestep=t, class_labels=cond["class_labels"], return_dict=False)[0]

    def null_cond(self, cond: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"class_labels": torch.full_like(cond["class_labels"], self.backbone.config.num_embeds_ada_norm)}


# -------------------------------------------------------------------------------------------------
# UNets (UNet2DModel, UNet2DConditionModel)
# -------------------------------------------------------------------------------------------------


def _unet_facts(backbone: nn.Module, latent_shape: Sequence[int] | None) -> dict[str, Any]:
    cfg = backbone.config
    if latent_shape is None and cfg.sample_size is None:
        raise ValueError("this UNet's config has no sample_size; pass latent_shape=(C, H, W)")
    # without sample_size the default size is a placeholder: latent_shape is given then
    shape = _resolve_latent_shape(latent_shape, (cfg.in_channels, *_as_pair(cfg.sample_size or 1)))
    down = 2 ** (len(cfg.down_block_types) - 1)
    return dict(
        latent_shape=shape,
        patch_size=(down, down),
        out_channels=cfg.out_channels,
        feature_site=f"up_blocks.{len(backbone.up_blocks) - 1}",
        feature_layout="b c h w",
        layer_kinds=_UNET_KINDS,
        token_layouts=_UNET_LAYOUTS,
        default_keep_fp=_UNET_KEEP_FP,
        default_bit_map=_UNET_BIT_MAP,
    )


def _class_spec(backbone: nn.Module) -> dict[str, CondSpec]:
    """`class_labels` spec of a UNet with a class embedding: ids, or embeddings for "identity"."""
    cfg = backbone.config
    if backbone.class_embedding is None:
        return {}
    if cfg.class_embed_type == "identity":
        return {"class_labels": CondSpec((backbone.time_embedding.linear_2.out_features,))}
    return {"class_labels": CondSpec((), "long")}


class UNet2DDenoiser(Denoiser):
    """UNet2DModel: unconditional, or class-conditional (cond {"class_labels": [B]}) via num_class_embeds /
    class_embed_type. `null_class` (optional) is the label used as the unconditional branch."""

    backbone_class = UNet2DModel
    TINY = dict(
        sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4, attention_head_dim=4,
    )  # fmt: skip
    SCHEDULER = _scheduler("DDIMScheduler", 50, 1.0, num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02,
                           beta_schedule="linear", clip_sample=False)  # fmt: skip

    def __init__(
        self,
        backbone: UNet2DModel,
        latent_shape: Sequence[int] | None = None,
        default_scheduler: Mapping[str, Any] | None = None,
        null_class: int | None = None,
    ) -> None:
        spec = _class_spec(backbone)
        super().__init__(
            backbone,
            cond_kind="class" if spec else "none",
            cond_spec=spec,
            prediction_type="epsilon",
            default_scheduler=default_scheduler or self.SCHEDULER,
            **_unet_facts(backbone, latent_shape),
        )
        self.null_class = null_class

    def call_backbone(self, x_t: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.backbone(x_t, t, class_labels=cond.get("class_labels"), return_dict=False)[0]

    def null_cond(self, cond: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.null_class is None:
            return super().null_cond(cond)
        return {"class_labels": torch.full_like(cond["class_labels"], self.null_class)}


class UNet2DConditionDenoiser(Denoiser):
    """UNet2DConditionModel (LDM / Stable Diffusion): cond {"encoder_hidden_states": [B, L, cross_attention_dim]}
    (for LDM-4 ImageNet, the class embedder's [B, 1, 512] output), plus "class_labels" if the UNet has a
    class embedding."""

    backbone_class = UNet2DConditionModel
    TINY = dict(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=2, norm_num_groups=4,
    )  # fmt: skip
    #: LDM-4 ImageNet 256 (CompVis cin256-v2: 192 channels × (1, 2, 3, 5), attention at 1/2-1/8,
    #: 32-channel heads, 512-wide class context) as a diffusers UNet [INFERRED from the LDM yaml].
    LDM_PRESET = dict(
        sample_size=64, in_channels=3, out_channels=3, block_out_channels=(192, 384, 576, 960), layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=512, attention_head_dim=(6, 12, 18, 30),
    )  # fmt: skip
    #: Stable Diffusion v1 DDIM (scaled-linear betas, steps_offset 1), 50 steps, CFG 7.5.
    SCHEDULER = _scheduler("DDIMScheduler", 50, 7.5, num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                           beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                           steps_offset=1)  # fmt: skip
    #: MPQ-DM's LDM-4 ImageNet sampling: DDIM 20 steps, eta 0, CFG 3.0; LDM betas 0.0015-0.0195 (mpqdm.md §3.7).
    LDM_SCHEDULER = _scheduler("DDIMScheduler", 20, 3.0, num_train_timesteps=1000, beta_start=0.0015,
                               beta_end=0.0195, beta_schedule="scaled_linear", clip_sample=False,
                               set_alpha_to_one=False, steps_offset=1)  # fmt: skip

    def __init__(
        self,
        backbone: UNet2DConditionModel,
        latent_shape: Sequence[int] | None = None,
        default_scheduler: Mapping[str, Any] | None = None,
    ) -> None:
        cfg = backbone.config
        super().__init__(
            backbone,
            cond_kind="text",
            cond_spec={"encoder_hidden_states": CondSpec((None, cfg.cross_attention_dim)), **_class_spec(backbone)},
            prediction_type="epsilon",
            default_scheduler=default_scheduler or self.SCHEDULER,
            **_unet_facts(backbone, latent_shape),
        )

    def call_backbone(self, x_t: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.backbone(
            x_t,
            t,
            encoder_hidden_states=cond["encoder_hidden_states"],
            class_labels=cond.get("class_labels"),
            return_dict=False,
        )[0]


# -------------------------------------------------------------------------------------------------
# Loading and registration
# -------------------------------------------------------------------------------------------------


def load_diffusers_model(
    cls: type[nn.Module], path: str | Path, subfolder: str | None = None, torch_dtype: torch.dtype | None = None
) -> tuple[nn.Module, dict[str, Any] | None]:
    """`cls.from_pretrained` on a local folder, checked first; also returns the pipeline folder's
    scheduler (as a `default_scheduler` dict) when there is one."""
    folder = Path(path)
    if not folder.is_dir():
        raise ValueError(f"model folder {str(folder)!r} does not exist")
    if subfolder is None and not (folder / "config.json").is_file():
        subfolder = next((s for s in ("transformer", "unet") if (folder / s / "config.json").is_file()), None)
    config_file = folder / (subfolder or "") / "config.json"
    if not config_file.is_file():
        raise ValueError(
            f"{str(folder)!r} has no config.json (nor transformer/ or unet/ subfolder): not a diffusers model folder"
        )
    found = json.loads(config_file.read_text()).get("_class_name")
    if found != cls.__name__:
        raise ValueError(f"{str(config_file)!r} describes a {found}, expected a {cls.__name__}")
    try:
        model = cls.from_pretrained(folder, subfolder=subfolder, torch_dtype=torch_dtype)
    except (OSError, ValueError, RuntimeError) as err:  # diffusers': a missing or truncated weights file, ...
        where = folder / subfolder if subfolder else folder
        raise ValueError(f"{cls.__name__} cannot be loaded from {str(where)!r} (its weights file missing or "
                         f"truncated?): {str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__}"
                         ) from err
    scheduler_file = folder / "scheduler" / "scheduler_config.json"
    scheduler = None
    if scheduler_file.is_file():
        raw = json.loads(scheduler_file.read_text())
        cls_s = getattr(diffusers, str(raw.get("_class_name")), None)
        accepted = inspect.signature(cls_s.__init__).parameters if isinstance(cls_s, type) else None
        # the keys the class takes, as diffusers' from_config keeps: folders carry others (e.g. a DDIM
        # config with a DDPM's variance_type), which the constructor would refuse
        config = {k: v for k, v in raw.items() if not k.startswith("_") and (accepted is None or k in accepted)}
        scheduler = {"name": raw["_class_name"], "config": config, "num_inference_steps": None, "guidance_scale": None}
    return model, scheduler


def _builder(adapter: type[Denoiser], preset: Mapping[str, Any] | None, **fixed: Any) -> Callable[..., Denoiser]:
    def build(
        path: str | Path | None = None,
        config: Mapping[str, Any] | None = None,
        subfolder: str | None = None,
        torch_dtype: torch.dtype | None = None,
        **kwargs: Any,
    ) -> Denoiser:
        cls = adapter.backbone_class
        kwargs = {**fixed, **kwargs}
        if path is not None:
            if config is not None:
                raise ValueError("pass either path= (a local diffusers folder) or config= (random weights), not both")
            backbone, scheduler = load_diffusers_model(cls, path, subfolder, torch_dtype)
            if scheduler is not None:  # the pipeline's scheduler, with the preset's steps and CFG scale
                preset_spec = kwargs.get("default_scheduler") or adapter.SCHEDULER
                kwargs["default_scheduler"] = {**preset_spec, "name": scheduler["name"], "config": scheduler["config"]}
            return adapter(backbone, **kwargs)
        if preset is None and config is None:
            raise ValueError(
                f"{cls.__name__} has no preset here: pass path= (a local diffusers folder) or config= (a dict)"
            )
        backbone = cls(**{**(preset or {}), **(config or {})})
        if torch_dtype is not None:
            backbone = backbone.to(torch_dtype)
        return adapter(backbone, **kwargs)

    build.__doc__ = f"Build a {adapter.backbone_class.__name__} wrapped in {adapter.__name__}."
    return build


register("latte")(_builder(LatteDenoiser, LatteDenoiser.PRESET))
register("tiny-latte")(_builder(LatteDenoiser, LatteDenoiser.TINY))
register("wan")(_builder(WanDenoiser, WanDenoiser.PRESET))
register("tiny-wan")(_builder(WanDenoiser, WanDenoiser.TINY, latent_shape=WanDenoiser.TINY_LATENT))
register("cogvideox")(_builder(CogVideoXDenoiser, CogVideoXDenoiser.PRESET))
register("tiny-cogvideox")(_builder(CogVideoXDenoiser, CogVideoXDenoiser.TINY))
register("dit")(_builder(DiTDenoiser, DiTDenoiser.PRESET))
register("tiny-dit")(_builder(DiTDenoiser, DiTDenoiser.TINY))
register("unet2d")(_builder(UNet2DDenoiser, None))
register("tiny-unet2d")(_builder(UNet2DDenoiser, UNet2DDenoiser.TINY))
register("unet2d-condition")(_builder(UNet2DConditionDenoiser, None))
register("tiny-unet2d-condition")(_builder(UNet2DConditionDenoiser, UNet2DConditionDenoiser.TINY))
_LDM = UNet2DConditionDenoiser
register("ldm")(_builder(_LDM, _LDM.LDM_PRESET, default_scheduler=_LDM.LDM_SCHEDULER))
