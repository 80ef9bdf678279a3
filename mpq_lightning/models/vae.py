"""Decoding latents to pixels with a local diffusers autoencoder (``evaluate.py --eval.vae``,
``SampleLogger(vae=...)``): the real teachers denoise latents, and metrics or pictures of latents say
little. Nothing is downloaded: the folder is one saved with ``save_pretrained`` (config.json +
weights), e.g. ``stabilityai/sd-vae-ft-ema`` for OpenSora v1.0, Latte and DiT, or a pipeline
folder's ``vae/``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from einops import rearrange
from torch import Tensor

#: the autoencoders accepted: "frame" ones decode [N, C, H, W] (a video frame by frame, as OpenSora
#: v1.0 and Latte do), "video" ones decode [B, C, F, H, W] whole.
VAE_KINDS = {"AutoencoderKL": "frame", "VQModel": "frame", "AutoencoderKLWan": "video",
             "AutoencoderKLCogVideoX": "video"}


def vae_class(folder: str, key: str = "vae") -> str:
    """The diffusers class named in ``folder/config.json``; a clear error naming ``key`` otherwise."""
    config = Path(folder) / "config.json"
    if not Path(folder).is_dir():
        raise ValueError(f"{key}: {folder} is not a folder (a diffusers autoencoder saved with save_pretrained)")
    try:
        name = json.loads(config.read_text()).get("_class_name")
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{key}: cannot read {config} ({err})") from None
    if name not in VAE_KINDS:
        raise ValueError(f"{key}: {config} names _class_name={name!r}; supported: {sorted(VAE_KINDS)}")
    return name


def check_vae(folder: str, teacher, key: str = "vae") -> str:
    """Check ``folder``'s config against the teacher's latents without loading weights (channels; a
    video autoencoder needs a video teacher); returns the class name."""
    name = vae_class(folder, key)
    config = json.loads((Path(folder) / "config.json").read_text())
    channels = config.get("z_dim") or config.get("latent_channels")
    if channels is None:  # a config written without it keeps the class default
        channels = {"AutoencoderKL": 4, "VQModel": 3}.get(name)
    if channels != teacher.in_channels:
        raise ValueError(f"{key}: {folder} ({name}) has {channels} latent channels, the teacher's latents "
                         f"{tuple(teacher.latent_shape)} have {teacher.in_channels}")
    if VAE_KINDS[name] == "video" and not teacher.is_video:
        raise ValueError(f"{key}: {folder} is a video autoencoder ({name}) but the teacher makes images")
    return name


def load_vae(folder: str, teacher, device, key: str = "vae") -> Any:
    """The autoencoder in ``folder``, in fp32 on ``device`` without gradients, checked against the
    teacher's latents first (:func:`check_vae`)."""
    import diffusers

    name = check_vae(folder, teacher, key)
    try:
        vae = getattr(diffusers, name).from_pretrained(folder).eval().requires_grad_(False)
    except (OSError, ValueError, RuntimeError) as err:
        raise ValueError(f"{key}: cannot load {name} from {folder} ({err})") from None
    return vae.to(device=device, dtype=torch.float32)


def unscale_latents(vae, z: Tensor, scaling_factor: float | None = None) -> Tensor:
    """Undo the latent normalisation the teacher was trained in, as the diffusers pipelines do:
    Wan ``z·std + mean`` per channel; else ``z / scaling_factor + shift_factor``."""
    config = vae.config
    if type(vae).__name__ == "AutoencoderKLWan" and scaling_factor is None:
        shape = (1, -1) + (1,) * (z.dim() - 2)
        mean = torch.tensor(config.latents_mean, dtype=z.dtype, device=z.device).view(shape)
        std = torch.tensor(config.latents_std, dtype=z.dtype, device=z.device).view(shape)
        return z * std + mean
    factor = scaling_factor if scaling_factor is not None else config.get("scaling_factor", 1.0)
    return z / factor + (config.get("shift_factor") or 0.0)


@torch.no_grad()
def decode_latents(vae, latents: Tensor, batch_size: int, scaling_factor: float | None = None) -> Tensor:
    """Pixels in [-1, 1] of ``latents`` ([N, C, H, W] or [N, C, F, H, W]), decoded in chunks of
    ``batch_size`` images or frames (video autoencoders: one video at a time)."""
    device = next(vae.parameters()).device
    video = latents.dim() == 5
    per_frame = VAE_KINDS[type(vae).__name__] == "frame"
    if video and per_frame:
        items = rearrange(latents, "n c f h w -> (n f) c h w")
    else:
        items, batch_size = latents, (1 if video else batch_size)
    outs = [vae.decode(unscale_latents(vae, chunk.to(device).float(), scaling_factor)).sample.clamp(-1, 1).cpu()
            for chunk in items.split(batch_size)]
    pixels = torch.cat(outs)
    if video and per_frame:
        pixels = rearrange(pixels, "(n f) c h w -> n c f h w", n=latents.shape[0])
    return pixels
