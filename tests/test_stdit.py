"""Tests for mpq_lightning.models.stdit (spec: research/opensora_stdit.md)."""

from __future__ import annotations

import math
import re

import pytest
import torch
from einops import rearrange

from mpq_lightning.models.stdit import (
    STDIT_KEEP_FP,
    STDIT_MLP_W8A8_BIT_MAP,
    STDIT_TOKEN_LAYOUTS,
    CheckpointMismatchError,
    STDiT,
    STDiT_XL_2,
    convert_official_state_dict,
    load_official_checkpoint,
    stdit_feature_site,
    stdit_layer_kind,
    tiny_stdit,
)

try:  # tests/ as a package or rootdir on sys.path, else pytest's default "prepend" import mode
    from tests._official_stdit_reference import OfficialSTDiTReference
except ImportError:
    from _official_stdit_reference import OfficialSTDiTReference

TINY = dict(input_size=(4, 8, 8), hidden_size=64, depth=2, num_heads=4, caption_channels=32, model_max_length=8)


# =====================================================================================================
# Fixtures
# =====================================================================================================


def _randomize(module: torch.nn.Module, seed: int = 0) -> None:
    """Random weights everywhere (the official init zeroes several outputs, which would hide bugs)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            std = 1.0 / math.sqrt(p[0].numel()) if p.dim() >= 2 else 0.1
            p.copy_(torch.randn(p.shape, generator=gen) * std)


@pytest.fixture(scope="module")
def reference() -> OfficialSTDiTReference:
    torch.manual_seed(0)
    ref = OfficialSTDiTReference(**TINY).eval()
    _randomize(ref)
    return ref


@pytest.fixture()
def official_sd(reference: OfficialSTDiTReference) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in reference.state_dict().items()}


@pytest.fixture()
def model() -> STDiT:
    torch.manual_seed(1)
    return tiny_stdit(class_dropout_prob=0.0).eval()


def _inputs(b: int = 2, frames: int = 4, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 4, frames, 8, 8, generator=gen)
    t = torch.randint(0, 1000, (b,), generator=gen)
    y = torch.randn(b, 1, 8, 32, generator=gen)
    return x, t, y


# =====================================================================================================
# Equivalence with the official structure
# =====================================================================================================


@pytest.mark.parametrize(
    "mask",
    [
        None,
        torch.tensor([[1, 1, 1, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]]),
        torch.tensor([[1, 0, 1, 1, 0, 0, 1, 0], [1, 1, 0, 0, 0, 0, 0, 0]]),
        torch.tensor([[1, 1, 1, 1, 1, 0, 0, 0]]),  # B' = 1 < B: repeated, as in the CFG batch
    ],
    ids=["no-mask", "prefix-lengths-3-8", "holes", "mask-repeated"],
)
def test_matches_official_reference(reference, official_sd, model, mask) -> None:
    load_official_checkpoint(model, official_sd)
    x, t, y = _inputs()
    with torch.no_grad():
        want = reference(x, t, y, mask)
        got = model(x, t, y, mask)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_mask_changes_output(official_sd, model) -> None:
    load_official_checkpoint(model, official_sd)
    x, t, y = _inputs()
    with torch.no_grad():
        full = model(x, t, y)
        masked = model(x, t, y, torch.tensor([[1, 1, 1, 0, 0, 0, 0, 0], [1] * 8]))
    assert not torch.allclose(full[0], masked[0], atol=1e-4)
    torch.testing.assert_close(full[1], masked[1], atol=1e-6, rtol=0)


# =====================================================================================================
# Loader
# =====================================================================================================


def test_convert_splits_fused_qkv(official_sd) -> None:
    sd = convert_official_state_dict(official_sd)
    assert len(sd) == len(official_sd) + 2 * 2 * 2 * 2  # 2 blocks × 2 attentions × (w, b) × (3 - 1)
    assert not any(".qkv." in k for k in sd)
    fused = official_sd["blocks.1.attn_temp.qkv.weight"]
    torch.testing.assert_close(sd["blocks.1.attn_temp.k.weight"], fused[64:128])
    assert convert_official_state_dict(sd).keys() == sd.keys()  # idempotent on a split checkpoint


def test_load_is_strict_and_complete(official_sd, model) -> None:
    result = load_official_checkpoint(model, official_sd)
    assert result.missing_keys == [] and result.unexpected_keys == []
    torch.testing.assert_close(model.blocks[0].attn.v.bias, official_sd["blocks.0.attn.qkv.bias"][128:])
    torch.testing.assert_close(model.y_embedder.y_embedding, official_sd["y_embedder.y_embedding"])


def test_pos_embed_recomputed_present_or_absent(official_sd, model) -> None:
    want = model.pos_embed.clone()
    official_sd["pos_embed"] = torch.zeros(1, 4, 64)  # another resolution: ignored, as upstream
    load_official_checkpoint(model, official_sd)
    torch.testing.assert_close(model.pos_embed, want)
    del official_sd["pos_embed"], official_sd["pos_embed_temporal"]
    load_official_checkpoint(model, official_sd)


def test_pos_embed_tables_match_reference(reference, model) -> None:
    torch.testing.assert_close(model.pos_embed, reference.pos_embed, atol=0, rtol=0)
    torch.testing.assert_close(model.pos_embed_temporal, reference.pos_embed_temporal, atol=0, rtol=0)


def test_missing_key_is_named(official_sd, model) -> None:
    del official_sd["blocks.1.cross_attn.kv_linear.bias"]
    message = r"missing keys \(1\):\n\s+blocks\.1\.cross_attn\.kv_linear\.bias"
    with pytest.raises(CheckpointMismatchError, match=message) as err:
        load_official_checkpoint(model, official_sd)
    assert err.value.missing == ["blocks.1.cross_attn.kv_linear.bias"]


def test_missing_fused_key_names_official_name(official_sd, model) -> None:
    del official_sd["blocks.0.attn.qkv.weight"]
    with pytest.raises(ValueError, match=re.escape("blocks.0.attn.q.weight (official: blocks.0.attn.qkv.weight)")):
        load_official_checkpoint(model, official_sd)


def test_shape_mismatch_names_key_and_shapes(official_sd, model) -> None:
    official_sd["blocks.0.mlp.fc1.weight"] = torch.zeros(10, 64)
    with pytest.raises(ValueError, match=re.escape("blocks.0.mlp.fc1.weight: expected (256, 64), found (10, 64)")):
        load_official_checkpoint(model, official_sd, strict=False)  # shapes are checked even when not strict


def test_unexpected_key_reported_and_nothing_modified(official_sd, model) -> None:
    official_sd["blocks.0.extra.weight"] = torch.zeros(3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointMismatchError, match=r"unexpected keys \(1\):\n\s+blocks\.0\.extra\.weight") as err:
        load_official_checkpoint(model, official_sd)
    assert err.value.unexpected == ["blocks.0.extra.weight"]
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} was modified by a failed load"
    result = load_official_checkpoint(model, official_sd, strict=False)
    assert result.unexpected_keys == ["blocks.0.extra.weight"]


def test_pth_with_wrappers_loads_weights_only(tmp_path, official_sd, model) -> None:
    path = tmp_path / "OpenSora-v1-tiny.pth"
    torch.save({"ema": {f"module.{k}": v for k, v in official_sd.items()}, "step": 3}, path)
    load_official_checkpoint(model, path)
    torch.testing.assert_close(model.final_layer.linear.weight, official_sd["final_layer.linear.weight"])


def test_safetensors_loads(tmp_path, official_sd, model) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "stdit.safetensors"
    save_file({k: v.contiguous() for k, v in convert_official_state_dict(official_sd).items()}, str(path))
    load_official_checkpoint(model, str(path))
    torch.testing.assert_close(model.blocks[1].attn_temp.q.weight, official_sd["blocks.1.attn_temp.qkv.weight"][:64])


# =====================================================================================================
# Forward / backward and input validation
# =====================================================================================================


def test_forward_backward_shape() -> None:
    torch.manual_seed(0)
    net = tiny_stdit().train()  # caption dropout active (class_dropout_prob 0.1)
    x, t, y = _inputs(b=3)
    out = net(x, t, y, torch.ones(3, 8, dtype=torch.long))
    assert out.shape == (3, net.out_channels, 4, 8, 8) and net.out_channels == 8
    out.square().mean().backward()
    assert net.blocks[0].attn.q.weight.grad is not None
    assert net.x_embedder.proj.weight.grad is not None


def test_grad_checkpointing_matches(official_sd, model) -> None:
    load_official_checkpoint(model, official_sd)
    x, t, y = _inputs()
    plain = model(x, t, y)
    model.grad_checkpointing = True
    torch.testing.assert_close(model(x, t, y), plain)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reduced_precision_forward(dtype) -> None:
    """A 16-bit model (the official inference dtype) returns fp32 (opensora_stdit.md §3.5) close to the
    same weights in fp32: within a few 16-bit roundings of the output's scale."""
    ref = tiny_stdit().eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # the zero-initialised final / adaLN layers would make every output 0
        for p in ref.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    net = tiny_stdit(dtype=dtype).eval()
    net.load_state_dict(ref.state_dict())
    net = net.to(dtype)
    x, t, y = _inputs()
    mask = torch.tensor([[1, 1, 0, 0, 0, 0, 0, 0]])
    with torch.no_grad():  # like upstream the timestep is cast to the model dtype (bf16: 999 -> 1000)
        out, want = net(x, t, y, mask), ref(x, t.to(dtype).float(), y, mask)
    assert out.dtype == torch.float32 and torch.isfinite(out).all() and want.abs().max() > 0.1
    rel = float((out - want).abs().max() / want.abs().max())
    assert rel < (0.05 if dtype == torch.bfloat16 else 0.01), rel


def test_weights_cast_after_construction_set_the_input_dtype() -> None:
    """Upstream casts inputs to the constructor's ``dtype``; a strategy that casts the module afterwards
    (DeepSpeed under bf16-mixed) leaves that at fp32. Inputs follow the weights, so such a model runs
    and equals the one built with ``dtype=bf16``."""
    x, t, y = _inputs()
    built = tiny_stdit(dtype=torch.bfloat16).eval().to(torch.bfloat16)
    cast = tiny_stdit().eval()
    cast.load_state_dict(built.state_dict())
    cast = cast.to(torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(cast(x, t, y), built(x, t, y))


def test_freeze_not_temporal() -> None:
    net = tiny_stdit(freeze="not_temporal")
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    assert trainable and all(".attn_temp." in n for n in trainable)


def test_facts_on_instance() -> None:
    net = tiny_stdit(pred_sigma=False)
    assert (net.num_frames, net.tokens_per_frame, net.patch_size) == (4, 16, (1, 2, 2))
    assert (net.in_channels, net.out_channels, net.caption_channels, net.model_max_length) == (4, 4, 32, 8)
    assert stdit_feature_site(net) == "blocks.1"
    assert dict(net.named_modules())[stdit_feature_site(net)] is net.blocks[-1]


@pytest.mark.parametrize(
    ("x_shape", "y_shape", "message"),
    [
        ((2, 4, 8, 8), (2, 1, 8, 32), r"5 dims.*got shape \[2, 4, 8, 8\]"),
        ((2, 3, 4, 8, 8), (2, 1, 8, 32), r"3 channels.*expected \[2, 4, 4, 8, 8\], got \[2, 3, 4, 8, 8\]"),
        ((2, 4, 4, 7, 8), (2, 1, 8, 32), r"not divisible by patch_size \(1, 2, 2\).*got \[2, 4, 4, 7, 8\]"),
        ((2, 4, 3, 8, 8), (2, 1, 8, 32), r"do not match input_size \(4, 8, 8\).*expected \[2, 4, 4, 8, 8\]"),
        ((2, 4, 4, 8, 8), (2, 1, 8, 16), r"caption width 16 != caption_channels 32.*got \[2, 1, 8, 16\]"),
        ((2, 4, 4, 8, 8), (2, 8, 32), r"y must be \[B, 1, L, caption_channels\] = \[2, 1, L, 32\]"),
    ],
    ids=["ndim", "channels", "patch", "frames", "caption-width", "caption-dims"],
)
def test_bad_inputs(model, x_shape, y_shape, message) -> None:
    with pytest.raises(ValueError, match=message):
        model(torch.zeros(x_shape), torch.zeros(2), torch.zeros(y_shape))


def test_bad_mask_and_timestep(model) -> None:
    x, t, y = _inputs()
    with pytest.raises(ValueError, match=r"mask must be \[B', L\].*got shape \[2, 5\]"):
        model(x, t, y, torch.ones(2, 5))
    with pytest.raises(ValueError, match="at least one kept text token"):
        model(x, t, y, torch.tensor([[1] * 8, [0] * 8]))
    with pytest.raises(ValueError, match=r"timestep must be \[B\] = \[2\]"):
        model(x, t[:1], y)


def test_constructor_errors() -> None:
    with pytest.raises(ValueError, match="divisible by patch_size"):
        tiny_stdit(input_size=(4, 9, 8))
    with pytest.raises(NotImplementedError, match="sequence"):
        tiny_stdit(enable_sequence_parallelism=True)
    with pytest.raises(ValueError, match="freeze"):
        tiny_stdit(freeze="everything")


# =====================================================================================================
# Quantization facts
# =====================================================================================================


def _expected_shape(layout: str, sizes: dict[str, int]) -> tuple[int, ...]:
    groups = re.findall(r"\(([^)]*)\)|(\w)", layout)
    return tuple(math.prod(sizes[a] for a in (grp or single).split()) for grp, single in groups)


def test_token_layouts_hold() -> None:
    """Hook one linear per kind; batch = 2 copies of one sample, so the b axis must split into equal halves."""
    torch.manual_seed(0)
    net = tiny_stdit(input_size=(3, 8, 8), model_max_length=5).eval()
    _randomize(net)
    x, t, y = _inputs(b=1, frames=3)
    x, t, y = x.repeat(2, 1, 1, 1, 1), t.repeat(2), y[:, :, :5].repeat(2, 1, 1, 1)
    seen: dict[str, torch.Tensor] = {}
    names = [
        "blocks.1.attn.k", "blocks.0.attn.proj", "blocks.0.attn_temp.v", "blocks.1.attn_temp.proj",
        "blocks.0.cross_attn.q_linear", "blocks.0.cross_attn.kv_linear", "blocks.1.cross_attn.proj",
        "blocks.0.mlp.fc1", "blocks.1.mlp.fc2",
    ]  # fmt: skip
    modules = dict(net.named_modules())
    for name in names:
        modules[name].register_forward_hook(lambda m, inp, out, name=name: seen.__setitem__(name, inp[0]))
    with torch.no_grad():
        net(x, t, y, torch.tensor([[1, 1, 1, 0, 1]]))
    assert {stdit_layer_kind(n) for n in names} == set(STDIT_TOKEN_LAYOUTS)
    for name in names:
        layout, inp = STDIT_TOKEN_LAYOUTS[stdit_layer_kind(name)], seen[name]
        sizes = dict(b=2, f=3, s=16, l=5, c=inp.shape[-1])
        assert tuple(inp.shape) == _expected_shape(layout, sizes), name
        halves = rearrange(inp, f"{layout} -> b ({' '.join(a for a in 'fslc' if a in layout)})", **{
            k: v for k, v in sizes.items() if k in layout and k != "c"
        })
        torch.testing.assert_close(halves[0], halves[1], msg=name)


def test_layer_kinds_and_fp_lists() -> None:
    assert stdit_layer_kind("blocks.3.attn.q") == "spatial"
    assert stdit_layer_kind("model.blocks.27.attn_temp.proj") == "temporal"
    assert stdit_layer_kind("blocks.0.cross_attn.q_linear") == "cross_q"
    assert stdit_layer_kind("blocks.0.cross_attn.kv_linear") == "cross_kv"
    assert stdit_layer_kind("blocks.0.cross_attn.proj") == "cross_proj"
    assert stdit_layer_kind("blocks.0.mlp.fc2") == "mlp"
    assert stdit_layer_kind("final_layer.linear") == "other"
    assert stdit_layer_kind("t_block.1") == "other"

    from fnmatch import fnmatch

    net = tiny_stdit()
    linears = [n for n, m in net.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv3d))]
    kept = [n for n in linears if any(fnmatch(n, p) for p in STDIT_KEEP_FP)]
    quantized = [n for n in linears if n not in kept]
    assert len(quantized) == 13 * 2 and all(stdit_layer_kind(n) != "other" for n in quantized)
    assert all(stdit_layer_kind(n) == "other" for n in kept)
    mlp = [n for n in quantized if any(fnmatch(n, p) for p in STDIT_MLP_W8A8_BIT_MAP)]
    assert mlp == ["blocks.0.mlp.fc1", "blocks.0.mlp.fc2", "blocks.1.mlp.fc1", "blocks.1.mlp.fc2"]


# =====================================================================================================
# STDiT-XL/2 on the meta device (spec §2)
# =====================================================================================================


def test_xl2_meta_matches_official_layout() -> None:
    with torch.device("meta"):
        net = STDiT_XL_2()
    assert net.x_embedder.proj.weight.is_meta and net.pos_embed.is_meta and net.y_embedder.y_embedding.is_meta
    assert sum(p.numel() for p in net.parameters()) == 759_620_768
    sd = net.state_dict()
    assert len(sd) == 774  # 550 official keys with 112 fused qkv entries split into 336
    shapes = {
        "pos_embed": (1, 1024, 1152),
        "pos_embed_temporal": (1, 16, 1152),
        "x_embedder.proj.weight": (1152, 4, 1, 2, 2),
        "t_block.1.weight": (6912, 1152),
        "y_embedder.y_embedding": (120, 4096),
        "y_embedder.y_proj.fc1.weight": (1152, 4096),
        "blocks.27.attn.q.weight": (1152, 1152),
        "blocks.27.attn_temp.v.bias": (1152,),
        "blocks.0.cross_attn.kv_linear.weight": (2304, 1152),
        "blocks.0.mlp.fc1.weight": (4608, 1152),
        "blocks.0.scale_shift_table": (6, 1152),
        "final_layer.linear.weight": (32, 1152),
        "final_layer.scale_shift_table": (2, 1152),
    }
    for key, shape in shapes.items():
        assert tuple(sd[key].shape) == shape, key
    assert (net.num_frames, net.tokens_per_frame, stdit_feature_site(net)) == (16, 1024, "blocks.27")


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_unreadable_weights_file_is_refused_naming_it(tmp_path, suffix):
    """A truncated download of the official weights (either format): an error naming the file, and
    the model is left as it was."""
    from safetensors.torch import save_file

    model = tiny_stdit()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    whole = tmp_path / f"whole{suffix}"
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    torch.save(state, whole) if suffix == ".pth" else save_file(state, str(whole))
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(ValueError, match=f"weights file {re.escape(str(cut))} cannot be read"):
        load_official_checkpoint(model, cut)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
