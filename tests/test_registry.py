"""Registry, Denoiser interface and validation, OpenSora STDiT adapter."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from mpq_lightning.models import LAYER_KINDS, CondSpec, Denoiser, build, list_models, register, registry
from mpq_lightning.quant import QuantConfig, TimestepActQuantizer, quant_layers, quantize_model, set_quant_state

ALL_NAMES = [
    "opensora-stdit-xl/2", "tiny-stdit", "latte", "tiny-latte", "wan", "tiny-wan", "cogvideox", "tiny-cogvideox",
    "dit", "tiny-dit", "unet2d", "tiny-unet2d", "unet2d-condition", "ldm", "tiny-unet2d-condition",
]  # fmt: skip


# ---------------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------------


def test_list_models_has_every_backbone():
    assert set(ALL_NAMES) <= set(list_models())


def test_unknown_name_lists_available():
    with pytest.raises(ValueError, match=r"unknown model 'nope'; available: .*tiny-stdit"):
        build("nope")


class _Toy(nn.Module):
    """A user's backbone with the plain (x, t, **cond) signature."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, 3, 1)
        self.label = nn.Embedding(5, 3)

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.proj(x) + self.label(labels)[:, :, None, None] + t[:, None, None, None]


def _toy_denoiser() -> Denoiser:
    return Denoiser(
        _Toy(),
        latent_shape=(3, 4, 4),
        patch_size=(1, 1),
        out_channels=3,
        cond_kind="class",
        cond_spec={"labels": CondSpec((), "long")},
        prediction_type="epsilon",
        default_scheduler={"name": "ddim", "config": {}, "num_inference_steps": 2, "guidance_scale": 1.0},
        feature_site="proj",
        feature_layout="b c h w",
        layer_kinds=[("proj", "conv")],
        default_keep_fp=["proj", "no_such_layer"],
    )


def test_a_denoiser_cast_to_16_bits_takes_fp32_inputs_outside_autocast():
    """A strategy that casts the whole module (DeepSpeed under bf16-mixed) converts the batch only in
    its own forward, while calibration and the sampling callbacks call the denoiser with fp32 latents:
    those run in the weights' dtype and come back in the input's dtype, equal to converting by hand."""
    x, t, cond = torch.randn(2, 3, 4, 4), torch.tensor([3, 7]), {"labels": torch.tensor([1, 4])}
    d = _toy_denoiser().eval().to(torch.bfloat16)
    with torch.no_grad():
        out, by_hand = d(x, t, cond), d.backbone(x.bfloat16(), t, cond["labels"])
    assert out.dtype == torch.float32 and torch.equal(out, by_hand.float())
    fp = _toy_denoiser().eval()  # and the other way round: fp32 weights, a bf16 latent
    with torch.no_grad():
        out, by_hand = fp(x.bfloat16(), t, cond), fp.backbone(x.bfloat16().float(), t, cond["labels"])
    assert out.dtype == torch.bfloat16 and torch.equal(out, by_hand.bfloat16())


def test_register_user_backbone(monkeypatch):
    monkeypatch.setattr(registry, "_BUILDERS", dict(registry._BUILDERS))  # leave the real registry untouched
    register("test-toy")(_toy_denoiser)
    d = build("test-toy")
    out = d(torch.zeros(2, 3, 4, 4), 1.0, {"labels": torch.tensor([0, 4])})
    assert out.shape == (2, 3, 4, 4)
    assert d.layer_kind("proj") == "conv" and d.layer_kind("backbone.proj") == "conv" and d.layer_kind("x") == "other"
    assert d.default_keep_fp == ["proj"]  # patterns matching no layer are dropped
    assert not d.is_video and d.num_frames is None and d.cond_kind == "class"
    with pytest.raises(ValueError, match="already registered"):
        register("test-toy")(_toy_denoiser)


def test_default_null_cond_asks_for_uncond():
    with pytest.raises(ValueError, match="no built-in null condition; pass `uncond`"):
        _toy_denoiser().null_cond({"labels": torch.tensor([0])})


# ---------------------------------------------------------------------------------------------------
# STDiT adapter facts
# ---------------------------------------------------------------------------------------------------


def test_stdit_facts(stdit_denoiser):
    from mpq_lightning.models import stdit as spec

    d, bb = stdit_denoiser, stdit_denoiser.backbone
    assert d.is_video and d.num_frames == bb.num_frames == 4
    assert d.latent_shape == (4, 4, 8, 8) and d.tokens_per_frame == bb.tokens_per_frame == 16
    assert d.learned_sigma and d.out_channels == 8 and d.cfg_channels == 3
    assert d.cond_kind == "text" and set(d.cond_spec) == {"y", "mask"}
    assert d.cond_spec["y"].shape == (1, bb.model_max_length, bb.caption_channels)
    assert d.token_layouts == spec.STDIT_TOKEN_LAYOUTS and set(d.token_layouts) <= set(LAYER_KINDS)
    assert d.layer_kind("blocks.0.attn_temp.q") == "temporal" and d.layer_kind("t_block.1") == "other"
    assert d.feature_site in dict(bb.named_modules())
    assert d.default_keep_fp == spec.STDIT_KEEP_FP and d.default_bit_map == spec.STDIT_MLP_W8A8_BIT_MAP
    assert d.prediction_type == "epsilon" and d.default_scheduler["name"] == "iddpm"
    assert d.default_scheduler["num_inference_steps"] == 100


def test_stdit_forward_matches_backbone_and_backward(stdit_denoiser, random_cond):
    x = torch.randn(2, *stdit_denoiser.latent_shape)
    cond = random_cond(stdit_denoiser, 2)
    t = torch.tensor([3, 700])
    with torch.no_grad():
        direct = stdit_denoiser.backbone(x, t, cond["y"], cond["mask"])
        assert torch.equal(stdit_denoiser(x, t, cond, 0), direct)
    model = copy.deepcopy(stdit_denoiser).train()
    model(x, t, cond, 0).square().mean().backward()
    assert model.backbone.blocks[0].attn.q.weight.grad is not None


def test_stdit_null_cond_is_y_embedding_with_prompt_mask(stdit_denoiser, random_cond):
    cond = random_cond(stdit_denoiser, 3)
    cond["mask"][1, 4:] = 0
    null = stdit_denoiser.null_cond(cond)
    y_null = stdit_denoiser.backbone.y_embedder.y_embedding
    assert null["y"].shape == cond["y"].shape and torch.equal(null["y"][2, 0], y_null)
    assert torch.equal(null["mask"], cond["mask"])


def test_stdit_quantized_fp_state_is_exact(stdit_denoiser, random_cond):
    d = stdit_denoiser
    x, cond, t = torch.randn(2, *d.latent_shape), random_cond(d, 2), torch.tensor([5, 900])
    q = copy.deepcopy(d)
    quantize_model(q.backbone, QuantConfig(w_bits=4, a_bits=8, lora_rank=0))
    set_quant_state(q.backbone, weight=False, act=False)
    layers = [n for n, m in d.backbone.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d, nn.Conv3d))]
    assert sorted(n for n, _ in quant_layers(q.backbone)) == sorted(layers)
    with torch.no_grad():
        ref = d(x, t, cond, 0)
        assert ref.abs().sum() > 0 and torch.equal(q(x, t, cond, torch.tensor([0, 0])), ref)


def test_step_index_reaches_timestep_quantizers(stdit_denoiser, random_cond):
    q = copy.deepcopy(stdit_denoiser)
    quantize_model(q.backbone, QuantConfig(w_bits=4, a_bits=8, a_quantizer="timestep", num_steps=10))
    quantizers = [m for m in q.backbone.modules() if isinstance(m, TimestepActQuantizer)]
    assert quantizers
    seen = []
    _, layer = next(iter(quant_layers(q.backbone)))
    layer.register_forward_pre_hook(lambda *_: seen.append(quantizers[0].step_index))
    step = torch.tensor([7, 2])
    with torch.no_grad():
        q(torch.randn(2, *q.latent_shape), torch.tensor([1, 2]), random_cond(q, 2), step)
    assert seen and all(s is step for s in seen)
    assert quantizers[0].step_index is None  # restored after the call


def test_stdit_ckpt_path_must_exist(tmp_path):
    with pytest.raises(ValueError, match="STDiT checkpoint .*missing.pth' does not exist"):
        build("tiny-stdit", ckpt_path=tmp_path / "missing.pth")


# ---------------------------------------------------------------------------------------------------
# Input validation
# ---------------------------------------------------------------------------------------------------


def _good(d: Denoiser, random_cond):
    return torch.zeros(2, *d.latent_shape), torch.tensor([1, 2]), random_cond(d, 2)


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda x, t, c: (x[:, :, 0], t, c), r"x_t must be \[B, C, F, H, W\] with per-sample shape \(4, 4, 8, 8\)"),
        (lambda x, t, c: (x[:, :3], t, c), r"x_t: expected 4 channels, got 3"),
        (lambda x, t, c: (x[:, :, :3], t, c), r"frames 3 \(expected 4\)"),
        (lambda x, t, c: (x[..., :7], t, c), r"width 7 is not divisible by 2"),
        (lambda x, t, c: (torch.zeros(2, 4, 4, 8, 12), t, c), r"width 12 \(expected 8\)"),
        (lambda x, t, c: (x, torch.tensor([1, 2, 3]), c), r"t must be a scalar or have shape \[2\], got \(3,\)"),
        (lambda x, t, c: (x, t, {"mask": c["mask"]}), r"missing cond key 'y'"),
        (lambda x, t, c: (x, t, {**c, "text": c["y"]}), r"unknown cond keys \['text'\]"),
        (lambda x, t, c: (x, t, {**c, "y": c["y"][..., :16]}),
         r"cond\['y'\]: expected shape \[B, 1, 8, 32\] with B=2, got \[2, 1, 8, 16\]"),
        (lambda x, t, c: (x, t, {**c, "y": c["y"][:1]}), r"cond\['y'\]: expected shape .* got \[1, 1, 8, 32\]"),
        (lambda x, t, c: (x, t, {**c, "y": c["y"].long()}), r"cond\['y'\] must be a floating-point tensor"),
        (lambda x, t, c: (x, t, None), r"missing cond key 'y'"),
    ],
)  # fmt: skip
def test_bad_inputs_raise(stdit_denoiser, random_cond, change, match):
    x, t, cond = change(*_good(stdit_denoiser, random_cond))
    with pytest.raises(ValueError, match=match):
        stdit_denoiser(x, t, cond, 0)


def test_bad_step_index_and_labels(stdit_denoiser, random_cond):
    x, t, cond = _good(stdit_denoiser, random_cond)
    with pytest.raises(ValueError, match=r"step_index must be an int or have shape \[2\], got \(3,\)"):
        stdit_denoiser(x, t, cond, torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"cond\['labels'\] must be an integer tensor \(labels\)"):
        _toy_denoiser()(torch.zeros(1, 3, 4, 4), 0, {"labels": torch.zeros(1)})


def test_bad_latent_shape_at_construction():
    with pytest.raises(ValueError, match=r"latent_shape: height 5 is not divisible by 2"):
        build("tiny-dit", latent_shape=(4, 5, 8))
    with pytest.raises(ValueError, match=r"latent_shape \(3, 8, 8\) has 3 channels but the model takes 4"):
        build("tiny-dit", latent_shape=(3, 8, 8))
    with pytest.raises(ValueError, match="cond_kind must be 'text', 'class' or 'none'"):
        Denoiser(nn.Identity(), latent_shape=(1, 2, 2), patch_size=(1, 1), out_channels=1, cond_kind="image",
                 cond_spec={}, prediction_type="epsilon", default_scheduler={"config": {}}, feature_site="",
                 feature_layout="b c h w")  # fmt: skip


def test_stdit_loads_checkpoint_and_config(stdit_denoiser, tmp_path, random_cond):
    path = tmp_path / "tiny.pth"
    torch.save({"ema": stdit_denoiser.backbone.state_dict()}, path)
    loaded = build("tiny-stdit", ckpt_path=path).eval()
    x, t, cond = torch.randn(2, *stdit_denoiser.latent_shape), torch.tensor([3, 9]), random_cond(stdit_denoiser, 2)
    with torch.no_grad():
        assert torch.equal(loaded(x, t, cond, 0), stdit_denoiser(x, t, cond, 0))
    assert build("tiny-stdit", config={"depth": 1}).feature_site == "blocks.0"


@pytest.mark.parametrize(
    "name, params, latent",
    [
        ("opensora-stdit-xl/2", 759_620_768, (4, 16, 64, 64)),  # opensora_stdit.md §2
        ("latte", None, (4, 16, 64, 64)),
        ("wan", None, (16, 21, 60, 104)),
        ("cogvideox", None, (16, 13, 60, 90)),
        ("dit", None, (4, 32, 32)),
        ("ldm", None, (3, 64, 64)),
    ],
)
def test_full_size_presets_build(name, params, latent):
    """Full-size architectures (random weights) build; on the meta device, so no memory is used."""
    with torch.device("meta"):
        d = build(name)
    assert d.latent_shape == latent and d.feature_site in dict(d.backbone.named_modules())
    if params is not None:
        assert sum(p.numel() for p in d.backbone.parameters()) == params
