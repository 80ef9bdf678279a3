"""Diffusers adapters: tiny builds, forward/backward, exact FP quantized state, facts, local folders."""

from __future__ import annotations

import copy
import fnmatch
import json

import pytest
import torch
from einops import rearrange
from torch import nn

from mpq_lightning.models import LAYER_KINDS, build, make_scheduler
from mpq_lightning.quant import QuantConfig, quant_layers, quantize_model, set_quant_state

TINY = ["tiny-latte", "tiny-wan", "tiny-cogvideox", "tiny-dit", "tiny-unet2d", "tiny-unet2d-condition"]
LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


@pytest.fixture(scope="module", params=TINY)
def tiny(request):
    torch.manual_seed(0)
    return build(request.param).eval()


def _inputs(d, random_cond, batch=2):
    g = torch.Generator().manual_seed(1)
    return torch.randn(batch, *d.latent_shape, generator=g), torch.tensor([17, 803][:batch]), random_cond(d, batch)


# ---------------------------------------------------------------------------------------------------
# Every adapter
# ---------------------------------------------------------------------------------------------------


def test_forward_backward_shape(tiny, random_cond):
    x, t, cond = _inputs(tiny, random_cond)
    model = copy.deepcopy(tiny).train()
    out = model(x, t, cond, 0)
    assert out.shape == (2, tiny.out_channels, *tiny.latent_shape[1:])
    out.square().mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


def test_quantized_fp_state_is_exact(tiny, random_cond):
    x, t, cond = _inputs(tiny, random_cond)
    with torch.no_grad():
        ref = tiny(x, t, cond, 0)
    assert ref.abs().sum() > 0
    q = copy.deepcopy(tiny)
    quantize_model(q.backbone, QuantConfig(w_bits=4, a_bits=8, lora_rank=0))
    set_quant_state(q.backbone, weight=False, act=False)
    expected = sorted(n for n, m in tiny.backbone.named_modules() if isinstance(m, LAYERS))
    assert sorted(n for n, _ in quant_layers(q.backbone)) == expected
    with torch.no_grad():
        assert torch.equal(q(x, t, cond, torch.zeros(2, dtype=torch.long)), ref)


def test_facts_are_consistent(tiny):
    names = dict(tiny.backbone.named_modules())
    layers = [n for n, m in names.items() if isinstance(m, LAYERS)]
    assert tiny.feature_site in names
    for pattern in [*tiny.default_keep_fp, *tiny.default_bit_map]:
        assert any(fnmatch.fnmatchcase(n, pattern) for n in layers), pattern
    kinds = {tiny.layer_kind(n) for n in layers}
    assert kinds <= set(LAYER_KINDS) and kinds - {"other"}
    assert set(tiny.token_layouts) <= kinds
    assert tiny.is_video == (len(tiny.latent_shape) == 4)
    assert tiny.num_frames == (tiny.latent_shape[1] if tiny.is_video else None)
    assert tiny.cond_kind in ("text", "class", "none")
    assert tiny.default_scheduler["name"] and tiny.default_scheduler["num_inference_steps"] > 0


def test_feature_site_layout(tiny, random_cond):
    """The hooked feature has the declared layout (einops parses it with the latent's sizes)."""
    x, t, cond = _inputs(tiny, random_cond)
    feats = []
    site = dict(tiny.backbone.named_modules())[tiny.feature_site]
    handle = site.register_forward_hook(lambda m, i, o: feats.append(o[0] if isinstance(o, tuple) else o))
    with torch.no_grad():
        tiny(x, t, cond, 0)
    handle.remove()
    (feat,) = feats
    if tiny.is_video:
        sizes = dict(b=2, f=tiny.num_frames // tiny.patch_size[0], s=tiny.tokens_per_frame)
        assert rearrange(feat, f"{tiny.feature_layout} -> b f s c", **sizes).shape[:3] == tuple(sizes.values())
    elif tiny.feature_layout == "b s c":
        assert feat.shape[:2] == (2, tiny.tokens_per_frame)
    else:
        assert feat.ndim == 4 and feat.shape[0] == 2


@pytest.mark.parametrize("name", ["tiny-latte", "tiny-wan", "tiny-cogvideox", "tiny-unet2d-condition"])
def test_wrong_cond_width(name, random_cond):
    d = build(name)
    x, t, cond = _inputs(d, random_cond)
    cond["encoder_hidden_states"] = cond["encoder_hidden_states"][..., :-1]
    with pytest.raises(ValueError, match=r"cond\['encoder_hidden_states'\]: expected shape \[B, .*, 16\] with B=2"):
        d(x, t, cond, 0)


# ---------------------------------------------------------------------------------------------------
# Adapter-specific behaviour
# ---------------------------------------------------------------------------------------------------


def test_cogvideox_layout_is_frames_second(random_cond):
    d = build("tiny-cogvideox").eval()
    x, t, cond = _inputs(d, random_cond)
    with torch.no_grad():
        direct = d.backbone(x.transpose(1, 2), cond["encoder_hidden_states"], t, return_dict=False)[0]
        assert torch.equal(d(x, t, cond, 0), direct.transpose(1, 2))
    assert d.layer_kind("transformer_blocks.0.attn1.to_q") == "joint" and d.token_layouts == {}
    assert d.prediction_type == "v_prediction" and d.default_scheduler["name"] == "CogVideoXDDIMScheduler"
    with pytest.raises(ValueError, match=r"encoder_hidden_states'\]: expected shape \[B, 6, 16\]"):
        d(x, t, {"encoder_hidden_states": torch.zeros(2, 5, 16)}, 0)


def test_cogvideox_rotary(random_cond):
    d = build("tiny-cogvideox", config={"use_rotary_positional_embeddings": True}).eval()
    assert d.cond_spec["encoder_hidden_states"].shape == (None, 16)  # RoPE: any text length
    x, t, cond = _inputs(d, random_cond)
    assert d(x, t, cond, 0).shape == x.shape


def test_latte_facts_and_mask(random_cond):
    d = build("tiny-latte").eval()
    assert d.learned_sigma and d.layer_kind("temporal_transformer_blocks.1.ff.net.2") == "temporal_mlp"
    assert d.layer_kind("transformer_blocks.1.attn2.to_k") == "cross_kv" and d.token_layouts["temporal"] == "(b s) f c"
    x, t, cond = _inputs(d, random_cond)
    masked = {**cond, "encoder_attention_mask": torch.tensor([[1, 1, 1, 0, 0, 0], [1] * 6])}
    trimmed = {"encoder_hidden_states": cond["encoder_hidden_states"][:1, :3]}
    with torch.no_grad():
        full, part = d(x, t, masked, 0), d(x[:1], t[:1], trimmed, 0)
        assert torch.allclose(full[:1], part, atol=1e-5)  # masked tokens are ignored
        unmasked = d(x[1:], t[1:], {"encoder_hidden_states": cond["encoder_hidden_states"][1:]}, 0)
        assert torch.allclose(full[1:], unmasked, atol=1e-5)
    with pytest.raises(ValueError, match="video_length=4 frames"):
        build("tiny-latte", latent_shape=(4, 8, 8, 8))


def test_wan_latent_shape_override(random_cond):
    d = build("tiny-wan", latent_shape=(4, 5, 8, 16))
    assert d.num_frames == 5 and d.tokens_per_frame == 32 and d.prediction_type == "flow_prediction"
    x, t, cond = _inputs(d, random_cond)
    assert d(x, t, cond, 0).shape == (2, 4, 5, 8, 16)
    tall = build("tiny-wan", latent_shape=(4, 3, 16, 8))
    with pytest.raises(ValueError, match=r"height 8 \(expected 16\)"):
        tall(torch.zeros(1, 4, 3, 8, 8), 1, {k: v[:1] for k, v in cond.items()})


def test_dit_null_class():
    d = build("tiny-dit")
    assert torch.equal(d.null_cond({"class_labels": torch.tensor([1, 2])})["class_labels"], torch.tensor([10, 10]))
    assert d.cond_kind == "class" and d.learned_sigma


def test_unet2d_unconditional_and_class_conditional(random_cond):
    plain = build("tiny-unet2d")
    assert plain.cond_kind == "none" and plain.cond_spec == {}
    assert plain(torch.zeros(1, 3, 8, 8), 10, None, 0).shape == (1, 3, 8, 8)
    with pytest.raises(ValueError, match=r"width 9 is not divisible by 2"):
        plain(torch.zeros(1, 3, 12, 9), 10)
    labelled = build("tiny-unet2d", config={"num_class_embeds": 4}, null_class=3)
    assert labelled.cond_kind == "class"
    out = labelled(torch.zeros(2, 3, 8, 8), 10, {"class_labels": torch.tensor([0, 1])}, 0)
    assert not torch.equal(out[0], out[1])
    assert labelled.null_cond({"class_labels": torch.tensor([0, 1])})["class_labels"].tolist() == [3, 3]


def test_unet_fp_and_8bit_layers():
    """EfficientDM mapping: conv_in / time_embedding / conv_out at W8A8, skip and downsample convs FP."""
    d = build("tiny-unet2d-condition")
    q = quantize_model(
        copy.deepcopy(d.backbone),
        QuantConfig(w_bits=4, a_bits=8, keep_fp=d.default_keep_fp, bit_map=d.default_bit_map, a_quantizer=None),
    )
    quantized = dict(quant_layers(q))
    assert "down_blocks.0.downsamplers.0.conv" not in quantized
    assert not any("conv_shortcut" in n for n in quantized)
    assert {"conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2"} <= set(quantized)
    assert d.feature_site == "up_blocks.1" and d.feature_layout == "b c h w"


def test_presets_need_weights_or_config():
    with pytest.raises(ValueError, match="UNet2DModel has no preset here: pass path="):
        build("unet2d")


# ---------------------------------------------------------------------------------------------------
# Local diffusers folders
# ---------------------------------------------------------------------------------------------------


def test_load_pipeline_folder(tmp_path, random_cond):
    d = build("tiny-dit").eval()
    d.backbone.save_pretrained(tmp_path / "transformer")
    # skip_prk_steps: a PNDM key that some pipeline folders carry in other schedulers' configs
    scheduler = {"_class_name": "DPMSolverMultistepScheduler", "_diffusers_version": "0.0", "beta_schedule": "linear",
                 "skip_prk_steps": True}
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler))
    loaded = build("dit", path=tmp_path).eval()
    assert loaded.default_scheduler["name"] == "DPMSolverMultistepScheduler"
    assert loaded.default_scheduler["config"] == {"beta_schedule": "linear"}  # the class's keys only
    make_scheduler(loaded.default_scheduler["name"], **loaded.default_scheduler["config"])
    x, t, cond = _inputs(d, random_cond)
    with torch.no_grad():
        assert torch.equal(loaded(x, t, cond, 0), d(x, t, cond, 0))
    assert build("dit", path=tmp_path / "transformer").default_scheduler["name"] == "DDIMScheduler"


def test_bad_folders(tmp_path):
    with pytest.raises(ValueError, match=r"model folder '.*nowhere' does not exist"):
        build("tiny-dit", path=tmp_path / "nowhere")
    with pytest.raises(ValueError, match=r"has no config.json .*not a diffusers model folder"):
        build("dit", path=tmp_path)
    build("tiny-unet2d").backbone.save_pretrained(tmp_path / "unet")
    with pytest.raises(ValueError, match=r"describes a UNet2DModel, expected a DiTTransformer2DModel"):
        build("dit", path=tmp_path / "unet")
    with pytest.raises(ValueError, match="either path= .* or config="):
        build("unet2d", path=tmp_path / "unet", config={})
    assert build("unet2d", path=tmp_path).latent_shape == (3, 8, 8)
    weights = tmp_path / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # an interrupted copy: diffusers' OSError, named by folder
    with pytest.raises(ValueError, match=r"UNet2DModel cannot be loaded from '.*unet' \(its weights file missing or "
                                         r"truncated\?\): Unable to load weights"):
        build("unet2d", path=tmp_path)
    weights.unlink()
    with pytest.raises(ValueError, match=r"UNet2DModel cannot be loaded from '.*unet' .*no file named"):
        build("unet2d", path=tmp_path)
