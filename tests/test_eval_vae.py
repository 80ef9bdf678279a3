"""``eval.vae``: decoding the samples to pixels with a local diffusers autoencoder before metrics."""
import json

import pytest
import torch
from diffusers import AutoencoderKL, AutoencoderKLWan

from mpq_lightning.evaluation import EvalConfig
from mpq_lightning.models import build
from mpq_lightning.models.vae import decode_latents, unscale_latents
from mpq_lightning.models.vae import load_vae as _load_vae


def load_vae(cfg: EvalConfig, teacher, device):
    return _load_vae(cfg.vae, teacher, device, key="eval.vae")


def tiny_kl(scaling_factor: float = 0.5, shift_factor: float | None = 0.1, latent_channels: int = 4) -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels, block_out_channels=(8, 16),
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         layers_per_block=1, norm_num_groups=4, scaling_factor=scaling_factor,
                         shift_factor=shift_factor).eval()


def tiny_wan() -> AutoencoderKLWan:
    torch.manual_seed(0)
    return AutoencoderKLWan(base_dim=3, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                            temperal_downsample=[False, True, True], latents_mean=[0.1, -0.2, 0.3, 0.0],
                            latents_std=[1.5, 2.0, 0.5, 1.0]).eval()


@torch.no_grad()
def test_frame_autoencoder_decodes_each_frame_of_each_video_unscaled():
    """A 2-D autoencoder decodes every (video, frame) on its own from z / scaling_factor + shift,
    whatever the chunk size, and the frames come back in their video and order."""
    vae = tiny_kl()
    z = torch.randn(2, 4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    got = decode_latents(vae, z, batch_size=4)
    assert got.shape == (2, 3, 3, 16, 16)
    for n in range(2):
        for f in range(3):
            want = vae.decode(z[n : n + 1, :, f] / 0.5 + 0.1).sample.clamp(-1, 1)[0]
            torch.testing.assert_close(got[n, :, f], want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(decode_latents(vae, z, batch_size=1), got, atol=1e-5, rtol=1e-5)
    # an explicit scaling factor replaces the config's
    img = z[:, :, 0]
    torch.testing.assert_close(decode_latents(vae, img, 2, scaling_factor=0.25),
                               vae.decode(img / 0.25 + 0.1).sample.clamp(-1, 1), atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_wan_autoencoder_denormalises_per_channel_and_decodes_whole_videos():
    vae = tiny_wan()
    z = torch.randn(2, 4, 3, 4, 4, generator=torch.Generator().manual_seed(2))
    mean = torch.tensor([0.1, -0.2, 0.3, 0.0]).view(1, 4, 1, 1, 1)
    std = torch.tensor([1.5, 2.0, 0.5, 1.0]).view(1, 4, 1, 1, 1)
    torch.testing.assert_close(unscale_latents(vae, z), z * std + mean)  # as diffusers' WanPipeline
    got = decode_latents(vae, z, batch_size=8)
    assert got.shape == (2, 3, 9, 32, 32)  # 4x temporal (causal: 1 + 4·2 frames), 8x spatial
    for n in range(2):
        want = vae.decode(z[n : n + 1] * std + mean).sample.clamp(-1, 1)[0]
        torch.testing.assert_close(got[n], want, atol=1e-5, rtol=1e-5)


def test_eval_vae_bad_input_names_the_key(tmp_path):
    with pytest.raises(ValueError, match="eval.vae: .*missing is not a folder"):
        EvalConfig(vae=str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="eval.vae: cannot read .*config.json"):
        EvalConfig(vae=str(tmp_path / "empty"))
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    with pytest.raises(ValueError, match="_class_name='UNet2DModel'; supported"):
        EvalConfig(vae=str(tmp_path / "unet"))
    with pytest.raises(ValueError, match="eval.vae_scaling_factor must be > 0"):
        EvalConfig(vae_scaling_factor=0.0)
    (tmp_path / "noweights").mkdir()
    tiny_kl().save_pretrained(tmp_path / "noweights")
    for f in (tmp_path / "noweights").glob("*.safetensors"):
        f.unlink()
    teacher = build("tiny-stdit")
    with pytest.raises(ValueError, match="eval.vae: cannot load AutoencoderKL from"):
        load_vae(EvalConfig(vae=str(tmp_path / "noweights")), teacher, "cpu")

    tiny_kl(latent_channels=8).save_pretrained(tmp_path / "kl8")
    with pytest.raises(ValueError, match=r"has 8 latent channels, the teacher's latents \(4, 4, 8, 8\) have 4"):
        load_vae(EvalConfig(vae=str(tmp_path / "kl8")), teacher, "cpu")
    tiny_wan().save_pretrained(tmp_path / "wan")
    with pytest.raises(ValueError, match="is a video autoencoder .* but the teacher makes images"):
        load_vae(EvalConfig(vae=str(tmp_path / "wan")), build("tiny-dit"), "cpu")
    vae = load_vae(EvalConfig(vae=str(tmp_path / "wan")), teacher, "cpu")
    assert type(vae).__name__ == "AutoencoderKLWan" and not any(p.requires_grad for p in vae.parameters())

