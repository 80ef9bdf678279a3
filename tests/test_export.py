"""Real low-bit export: packing, export → load bit-exactness, sizes, CLI, bad inputs
(mpq_lightning/quant/export.py, mpq_lightning/export.py)."""
from __future__ import annotations

import copy
import json
import math
import os
from dataclasses import asdict

import pytest
import torch
from torch import nn

from mpq_lightning.quant import QuantConfig, calibrate, quantize_model, set_quant_state
from mpq_lightning.quant.export import (
    ExportFormatError,
    PackedLayer,
    export_quantized,
    export_report,
    load_quantized,
    pack_bits,
    packed_nbytes,
    read_safetensors_header,
    unpack_bits,
    verify_export,
    write_manifest,
)
from mpq_lightning.quant.layers import QuantLayer
from mpq_lightning.quant.mixed import MixedQuantizerBase, channel_kurtosis, classes_for_split

# ---------------------------------------------------------------------------------------------
# Packing
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("numel", [1, 7, 13, 1001])
def test_pack_unpack_roundtrip(bits, numel):
    g = torch.Generator().manual_seed(bits * 7919 + numel)
    codes = torch.randint(0, 2**bits, (numel,), generator=g)
    codes[0] = 2**bits - 1  # the extreme codes are present
    codes[-1] = 0 if numel > 1 else codes[-1]
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(numel * bits / 8) == packed_nbytes(numel, bits)
    assert torch.equal(unpack_bits(packed, bits, numel), codes.to(torch.uint8))
    # any shape / integer dtype packs to the same stream
    assert torch.equal(pack_bits(codes.to(torch.int32).view(1, -1), bits), packed)


def test_pack_is_a_dense_little_endian_stream():
    # 1 = 0b001, 7 = 0b111, 2 = 0b010 → bits (LSB first) 100 111 010 → bytes 0b01111001, 0b00000000 + 1 bit
    assert pack_bits(torch.tensor([1, 7, 2]), 3).tolist() == [0b10111001, 0b0]
    assert pack_bits(torch.tensor([1, 0, 1, 1, 0, 0, 0, 1, 1]), 1).tolist() == [0b10001101, 0b1]
    assert pack_bits(torch.tensor([0xA, 0x5]), 4).tolist() == [0x5A]


@pytest.mark.parametrize("bits", [0, 9, 16, 2.5, True])
def test_pack_rejects_unsupported_bits(bits):
    with pytest.raises(ValueError, match="bit widths 1..8"):
        pack_bits(torch.zeros(4, dtype=torch.uint8), bits)
    with pytest.raises(ValueError, match="bit widths 1..8"):
        unpack_bits(torch.zeros(4, dtype=torch.uint8), bits, 4)


def test_pack_rejects_bad_codes():
    with pytest.raises(ValueError, match=r"\[0, 7\]"):
        pack_bits(torch.tensor([0, 8]), 3)
    with pytest.raises(ValueError, match=r"\[0, 7\]"):
        pack_bits(torch.tensor([-1, 2]), 3)
    with pytest.raises(ValueError, match="integer codes"):
        pack_bits(torch.tensor([0.0, 1.0]), 3)
    with pytest.raises(ValueError, match="need 2 bytes"):
        unpack_bits(torch.zeros(3, dtype=torch.uint8), 3, 5)


# ---------------------------------------------------------------------------------------------
# Helpers: calibrated students with every method on
# ---------------------------------------------------------------------------------------------


def _redraw_zeros(denoiser: nn.Module) -> None:
    with torch.no_grad():
        for p in denoiser.parameters():
            if not p.any():
                p.normal_(std=0.1)


def _force_mixed_classes(model: nn.Module) -> None:
    """Every mixed quantizer gets all three classes (tiny layers would otherwise pick k = 0)."""
    for m in model.modules():
        if isinstance(m, QuantLayer) and isinstance(m.weight_quantizer, MixedQuantizerBase):
            wq = m.weight_quantizer
            cout = wq.weight_shape[0]
            if int(wq.split) == 0 and cout >= 3:
                w = m.latent_weight().detach().float()
                order = torch.argsort(channel_kurtosis(w), descending=True, stable=True)
                wq.set_classes(classes_for_split(order, max(1, cout // 4)))


@torch.no_grad()
def _perturb_adapters(model: nn.Module, seed: int = 1) -> None:
    """Non-zero LoRA B, TQE β and frame scales, FZ-RMQ residual scales: every branch matters."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if not isinstance(m, QuantLayer):
            continue
        if m.lora is not None:
            m.lora.B.add_(0.02 * torch.randn(m.lora.B.shape, generator=g))
        tqe = m.corrections["tqe"] if "tqe" in m.corrections else None
        if tqe is not None:
            tqe.beta.copy_(0.05 * torch.randn(tqe.beta.shape, generator=g))
            if hasattr(tqe, "m"):
                tqe.m.copy_(0.5 + torch.rand(tqe.m.shape, generator=g))
        for n, p in m.weight_quantizer.named_parameters() if m.weight_quantizer is not None else []:
            if n.startswith("residual_scale"):
                p.mul_(1 + 0.1 * torch.rand(p.shape, generator=g))


def _random_cond(denoiser, batch: int) -> dict:
    from mpq_lightning.models import random_cond

    return random_cond(denoiser, batch, 0, length=6, num_classes=3)


def _layer_info(denoiser):
    from mpq_lightning.module import QATModule

    return QATModule._layer_info_fn(denoiser)


def _student(name: str, cfg: QuantConfig, steps: int = 2):
    """A calibrated (random inputs, every step index) and perturbed Denoiser student + its inputs."""
    from mpq_lightning.models import build

    torch.manual_seed(0)
    den = build(name).eval()
    _redraw_zeros(den)
    quantize_model(den.backbone, cfg, layer_info=_layer_info(den))
    x = torch.randn(2, *den.latent_shape)
    t = torch.tensor([900.0, 100.0])
    cond = _random_cond(den, 2)

    def run(_):
        for s in range(steps):
            den(x, t, cond, torch.full((2,), s))

    calibrate(den.backbone, run)
    _force_mixed_classes(den.backbone)
    _perturb_adapters(den.backbone)
    set_quant_state(den.backbone, True, True)
    return den, (x, t, cond, torch.tensor([0, steps - 1]))


def _assert_exact(student, loaded, inputs):
    with torch.no_grad():
        ref = student(*inputs)
        out = loaded(*inputs)
    assert torch.equal(out, ref), float((out - ref).abs().max())
    packed = {n: m for n, m in loaded.named_modules() if isinstance(m, PackedLayer)}
    quant = {n: m for n, m in student.named_modules() if isinstance(m, QuantLayer)}
    assert packed.keys() == quant.keys()
    for n, m in quant.items():
        assert torch.equal(packed[n].weight, m.quantized_weight().detach()), n


FAST = dict(w_init="minmax", a_init="minmax")  # CPU test budget: no Lp search


# ---------------------------------------------------------------------------------------------
# Export → load reproduces the student exactly (fp32, CPU, weight + activation quantization)
# ---------------------------------------------------------------------------------------------


def test_stdit_omq_oolri_tqe_smooth_exact(tmp_path):
    from mpq_lightning.models.stdit import STDIT_KEEP_FP

    cfg = QuantConfig(w_bits=3, a_bits=6, w_quantizer="omq", omq_group_frac=0.25, num_steps=2, lora_rank=2,
                      lora_init="svd_weight_error", lora_quantized_base=True, tqe=True, tqe_frame_scale="all",
                      smooth_alpha=0.5, keep_fp=STDIT_KEEP_FP, **FAST,
                      bit_map={"blocks.*.mlp.fc*": {"w": 8, "a": 8, "w_quantizer": "uniform"}})
    student, inputs = _student("tiny-stdit", cfg)
    out = export_quantized(student, tmp_path / "stdit", fp_dtype="fp32", model_name="tiny-stdit")
    qmap = json.loads((out / "quant_map.json").read_text())
    formats = {e["weight"]["format"] for e in qmap["layers"].values()}
    assert formats == {"omq", "uniform"}
    omq = next(e for e in qmap["layers"].values() if e["weight"]["format"] == "omq")
    assert [s["bits"] for s in omq["weight"]["segments"]] == [2, 3, 4] and all(s["rows"] for s in omq["weight"]["segments"])
    assert omq["tqe"]["frame_mode"] == "paper" and omq["smooth"] and omq["act"]["kind"] == "timestep"
    assert not any(".lora." in k or "base_weight" in k for e in qmap["layers"].values() for k in e["tensors"])
    loaded = load_quantized(out)
    assert type(loaded).__name__ == "STDiTDenoiser"
    _assert_exact(student, loaded, inputs)


def test_unet_fzrmq_figure_oolri_tqe_exact(tmp_path):
    cfg = QuantConfig(w_bits=3, a_bits=6, w_quantizer="fzrmq", fzrmq_layout="figure", omq_group_frac=0.25,
                      a_quantizer="static", lora_rank=2, lora_init="svd_weight_error", lora_quantized_base=True,
                      tqe=True, keep_fp=["*conv_shortcut", "*downsamplers.*"], **FAST)
    student, inputs = _student("tiny-unet2d", cfg, steps=1)
    out = export_quantized(student, tmp_path / "unet", fp_dtype="fp32", model_name="tiny-unet2d")
    qmap = json.loads((out / "quant_map.json").read_text())
    fz = qmap["layers"]["backbone.mid_block.resnets.0.conv1"]
    assert fz["kind"] == "conv2d" and fz["weight"]["format"] == "fzrmq_figure"
    seg, (r1, r2) = fz["weight"]["segments"][0], fz["weight"]["residuals"]
    assert seg["bits"] == 2 and seg["rows"] == 16 and r1["classes"] == [1, 2] and r2["classes"] == [2]
    assert 0 < r2["rows"] < r1["rows"] < 16  # sign bits only on the channels with the branch
    numel = 16 * 16 * 9
    assert fz["tensors"]["backbone.mid_block.resnets.0.conv1.wq_signs_r1"]["shape"] == [math.ceil(r1["rows"] * numel / 16 / 8)]
    _assert_exact(student, load_quantized(out), inputs)


def test_plain_module_fzrmq_proposal_fp_branch_exact(tmp_path):
    """A model outside the registry (load fills an FP skeleton), FZ-RMQ proposal layout, fp_branch
    OOLRI LoRA, per-token dynamic activations, group-free channel classes on conv and linear."""
    torch.manual_seed(0)
    fp = nn.Sequential(nn.Conv2d(4, 16, 3, padding=1), nn.SiLU(), nn.Flatten(), nn.Linear(16 * 25, 24))
    cfg = QuantConfig(w_bits=4, a_bits=8, a_quantizer="dynamic_token", w_quantizer="fzrmq", fzrmq_layout="proposal",
                      omq_group_frac=0.25, lora_rank=3, lora_init="svd_weight_error", lora_placement="fp_branch", **FAST)
    model = quantize_model(copy.deepcopy(fp), cfg)
    x = torch.randn(6, 4, 5, 5)
    calibrate(model, lambda m: m(x))
    _force_mixed_classes(model)
    _perturb_adapters(model)
    out = export_quantized(model, tmp_path / "seq", fp_dtype="fp32")
    assert json.loads((out / "model.json").read_text())["kind"] == "module"
    with pytest.raises(ValueError, match="pass model="):
        load_quantized(out)
    loaded = load_quantized(out, model=copy.deepcopy(fp))
    assert isinstance(loaded[0], PackedLayer) and loaded[0].lora is not None
    _assert_exact(model, loaded, (x,))


def test_bf16_export_is_smaller_and_close(tmp_path):
    torch.manual_seed(0)
    fp = nn.Sequential(nn.Linear(32, 64), nn.LayerNorm(64), nn.Linear(64, 16))
    model = quantize_model(copy.deepcopy(fp), QuantConfig(w_bits=4, a_bits=None, include=["0"], **FAST))
    calibrate(model, lambda m: None)
    x = torch.randn(5, 32)
    a = export_quantized(model, tmp_path / "bf16")
    b = export_quantized(model, tmp_path / "fp32", fp_dtype="fp32")
    ha, hb = read_safetensors_header(a / "model.safetensors"), read_safetensors_header(b / "model.safetensors")
    assert ha["2.weight"]["dtype"] == "BF16" and hb["2.weight"]["dtype"] == "F32"
    assert ha["0.wq_scale_w"]["dtype"] == "F32"  # steps stay fp32 whatever fp_dtype
    la, lb = load_quantized(a, model=copy.deepcopy(fp)), load_quantized(b, model=copy.deepcopy(fp))
    with torch.no_grad():
        ref = model(x)
        assert torch.equal(lb(x), ref)
        assert torch.allclose(la(x), ref, atol=0.05, rtol=0.05)
        assert torch.equal(la[0].weight, lb[0].weight)  # the quantized layer itself is exact in both


# ---------------------------------------------------------------------------------------------
# Sizes: a W3 export holds exactly codes + the metadata we store
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("granularity,group_size", [("channel", None), ("group", 16)])
def test_w3_bytes_match_bit_accounting(tmp_path, granularity, group_size):
    from mpq_lightning.models.stdit import STDIT_KEEP_FP

    steps = 2
    cfg = QuantConfig(w_bits=3, a_bits=6, num_steps=steps, w_granularity=granularity, w_group_size=group_size,
                      keep_fp=STDIT_KEEP_FP, **FAST)
    student, _ = _student("tiny-stdit", cfg, steps=steps)
    out = export_quantized(student, tmp_path / "w3", model_name="tiny-stdit")
    report = {r["name"]: r for r in export_report(out)["layers"]}
    header = read_safetensors_header(out / "model.safetensors")
    layers = {n: m for n, m in student.named_modules() if isinstance(m, QuantLayer)}
    assert report.keys() == layers.keys()
    for name, layer in layers.items():
        cout, cin = layer.weight.shape[:2]
        numel = layer.weight.numel()
        rows = cout if granularity == "channel" else numel // (group_size * (numel // (cout * cin)))
        codes = math.ceil(numel * 3 / 8)  # one dense 3-bit stream
        wmeta = 4 * rows + math.ceil(rows * 3 / 8)  # fp32 step + 3-bit packed zero point per row
        ameta = 2 * 4 * steps + 1  # fp32 step and zero point per sampler step + the 'initialized' flag
        r = report[name]
        assert (r["codes_bytes"], r["wmeta_bytes"], r["ameta_bytes"]) == (codes, wmeta, ameta), name
        assert r["quantized_bytes"] == codes + wmeta and r["side_bytes"] == 0
        own = {k: v["nbytes"] for k, v in header.items() if k.startswith(name + ".")}
        assert sum(own.values()) == codes + wmeta + ameta + 2 * cout  # + the bf16 bias, nothing else
        acc = layer.bit_accounting()
        assert acc["weight_bits"] == 3 * numel and codes == math.ceil(acc["weight_bits"] / 8)
    # the file is header + tensors, nothing else
    size = (out / "model.safetensors").stat().st_size
    with open(out / "model.safetensors", "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
    assert size == 8 + header_len + sum(v["nbytes"] for v in header.values())
    totals = export_report(out)["totals"]
    assert totals["bits_per_weight"] == pytest.approx(3.0, abs=0.01)
    assert totals["disk_bytes"] == sum(totals["files"].values())
    loaded = load_quantized(out)  # bf16 FP parameters, but every quantized weight is exact
    for name, m in loaded.named_modules():
        if isinstance(m, PackedLayer):
            assert torch.equal(m.weight, layers[name].quantized_weight().detach()), name


def test_diffusers_folder_export_needs_no_fp_weights(tmp_path):
    """A backbone loaded from a diffusers folder is rebuilt from its config: the folder can go."""
    import shutil

    from mpq_lightning.models import build

    torch.manual_seed(0)
    build("tiny-unet2d").backbone.save_pretrained(tmp_path / "unet")
    den = build("tiny-unet2d", path=str(tmp_path / "unet")).eval()
    quantize_model(den.backbone, QuantConfig(w_bits=4, a_bits=None, keep_fp=den.default_keep_fp, **FAST))
    calibrate(den.backbone, lambda m: None)
    out = export_quantized(den, tmp_path / "export", fp_dtype="fp32", model_name="tiny-unet2d",
                           model_kwargs={"path": str(tmp_path / "unet")})
    desc = json.loads((out / "model.json").read_text())
    assert "path" not in desc["kwargs"] and desc["kwargs"]["config"]["block_out_channels"] == [8, 16]
    shutil.rmtree(tmp_path / "unet")
    x, t = torch.randn(2, *den.latent_shape), torch.tensor([10, 500])
    with torch.no_grad():
        assert torch.equal(load_quantized(out)(x, t), den(x, t))


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def test_cli_config_and_checkpoint(tmp_path, capsys):
    import lightning as L
    import yaml

    from mpq_lightning.export import main
    from mpq_lightning.module import QATModule

    from mpq_lightning.models import build

    torch.manual_seed(0)
    teacher = build("tiny-stdit")
    _redraw_zeros(teacher)  # the official init zeroes the output layer
    torch.save({"ema": teacher.backbone.state_dict()}, tmp_path / "teacher.pth")
    quant = QuantConfig(w_bits=3, a_bits=6, lora_rank=2, num_steps=2, w_quantizer="omq", tqe=True, **FAST,
                        lora_init="svd_weight_error", lora_quantized_base=True,  # OOLRI base rebuilt on load
                        bit_map={"blocks.*.mlp.fc*": {"w": 8, "a": 8, "w_quantizer": "uniform"}})  # TQE: release 1 + m
    module = QATModule("tiny-stdit", {"ckpt_path": str(tmp_path / "teacher.pth")}, quant=quant)
    den = module.student
    x, t, cond = torch.randn(2, *den.latent_shape), torch.tensor([900.0, 100.0]), _random_cond(den, 2)
    calibrate(den.backbone, lambda _: [den(x, t, cond, torch.full((2,), s)) for s in range(2)])
    _perturb_adapters(den.backbone)
    ckpt = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
            "pytorch-lightning_version": L.__version__}
    module.on_save_checkpoint(ckpt)
    run = tmp_path / "run"
    run.mkdir()
    torch.save(ckpt, run / "last.ckpt")
    hp = {k: (asdict(v) if hasattr(v, "__dataclass_fields__") else v) for k, v in module.hparams.items()}
    (run / "config.yaml").write_text(yaml.safe_dump({"seed_everything": 0, "model": hp, "run_name": "run",
                                                          "trainer": {"max_steps": 2}}))

    assert main(["--config", str(run / "config.yaml"), "--ckpt_path", "last", "--out", str(tmp_path / "a"),
                 "--fp_dtype", "fp32", "--report"]) == 0
    assert "quantized layers" in capsys.readouterr().out
    modes = {e["tqe"]["frame_mode"] for e in json.loads((tmp_path / "a" / "quant_map.json").read_text())["layers"].values()}
    assert modes == {"release", "none"}
    b = ["--ckpt_path", str(run / "last.ckpt"), "--out", str(tmp_path / "b")]
    assert main(b) == 0
    assert main(b) == 1
    err = capsys.readouterr().err
    assert err.startswith("python -m mpq_lightning.export: error: ") and "already exists" in err
    assert main(b + ["--overwrite"]) == 0

    set_quant_state(den.backbone, True, True)
    step = torch.tensor([0, 1])
    with torch.no_grad():
        ref = den(x, t, cond, step)
        assert torch.equal(load_quantized(tmp_path / "a")(x, t, cond, step), ref)
        approx = load_quantized(tmp_path / "b")(x, t, cond, step)  # bf16 FP parameters
    assert torch.isfinite(approx).all() and (approx - ref).abs().max() < 0.1 * ref.abs().max()
    assert json.loads((tmp_path / "b" / "model.json").read_text()) == {
        "format": "mpq-lightning-packed/1", "kind": "registry", "name": "tiny-stdit", "kwargs": {}}  # no FP weight file
    (tmp_path / "teacher.pth").unlink()
    assert load_quantized(tmp_path / "b") is not None  # the export never needs the FP weights again


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def small_export(tmp_path):
    torch.manual_seed(0)
    fp = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 4))
    model = quantize_model(copy.deepcopy(fp), QuantConfig(w_bits=3, a_bits=None, **FAST))
    calibrate(model, lambda m: None)
    return export_quantized(model, tmp_path / "small"), fp, model


def test_export_folder_and_files_have_ordinary_permissions(small_export):
    """The export is built in a mkdtemp folder (0700) and safetensors writes 0600 files: after the
    rename every reader of a shared machine sees an ordinary folder (0777 / 0666 less the umask)."""
    out = small_export[0]
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask
    files = sorted(p.name for p in out.iterdir())
    assert "model.safetensors" in files and "manifest.json" in files
    for path in out.iterdir():
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path.name


def test_uninitialised_quantizers_refused_naming_layer(tmp_path):
    fp = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 4))
    model = quantize_model(copy.deepcopy(fp), QuantConfig(w_bits=3, a_bits=8))
    with pytest.raises(ValueError, match=r"layer '0'.*never initialised"):
        export_quantized(model, tmp_path / "x")
    model[0].weight_quantizer.initialize(model[0].weight)
    model[1].weight_quantizer.initialize(model[1].weight)
    with pytest.raises(ValueError, match=r"layer '0': the activation quantizer"):
        export_quantized(model, tmp_path / "x")
    assert not (tmp_path / "x").exists() and not list(tmp_path.iterdir())  # nothing written
    with pytest.raises(ValueError, match="no quantized layers"):
        export_quantized(fp, tmp_path / "x")


def test_bits_unsupported_by_packer_refused(tmp_path):
    model = quantize_model(nn.Sequential(nn.Linear(8, 16)), QuantConfig(w_bits=3, a_bits=None, **FAST))
    calibrate(model, lambda m: None)
    model[0].weight_quantizer.bits = 9  # a quantizer whose codes need 9 bits
    with pytest.raises(ValueError, match=r"layer '0'.*bit widths 1..8"):
        export_quantized(model, tmp_path / "x")


def test_an_interrupted_export_is_cleaned_up_and_the_previous_one_put_back(small_export):
    """A process killed while exporting leaves a hidden build folder (removed once its process is
    gone) or, killed between the two renames of an overwrite, the previous export moved aside (put
    back, so it is neither lost nor silently replaced without ``overwrite``)."""
    import subprocess

    out, _, model = small_export
    dead = subprocess.Popen(["true"])
    dead.wait()
    build = out.parent / f".{out.name}.tmp-{dead.pid}-abcd"
    build.mkdir()
    mine = out.parent / f".{out.name}.tmp-{os.getpid()}-live"  # a live process's build stays
    mine.mkdir()
    aside = out.parent / f".{out.name}.old-1234abcd"
    os.rename(out, aside)
    with pytest.raises(FileExistsError, match="already exists"):
        export_quantized(model, out)
    assert out.is_dir() and not aside.exists() and not build.exists() and mine.exists()
    verify_export(out)


def test_existing_out_dir_refused_unless_overwrite(small_export):
    out, _, model = small_export
    with pytest.raises(FileExistsError, match="already exists"):
        export_quantized(model, out)
    (out / "stale").write_text("x")
    export_quantized(model, out, overwrite=True)
    assert not (out / "stale").exists() and not [p for p in out.parent.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("missing", ["model.safetensors", "quant_map.json", "model.json", "manifest.json"])
def test_missing_file_named(small_export, missing):
    out, fp, _ = small_export
    (out / missing).unlink()
    with pytest.raises(ExportFormatError, match=missing.replace(".", r"\.") + ": missing"):
        load_quantized(out, model=copy.deepcopy(fp))


def test_truncated_safetensors_named(small_export):
    out, fp, _ = small_export
    data = (out / "model.safetensors").read_bytes()
    (out / "model.safetensors").write_bytes(data[:-5])
    with pytest.raises(ExportFormatError, match=r"model\.safetensors: truncated"):
        load_quantized(out, model=copy.deepcopy(fp))
    with pytest.raises(ExportFormatError, match=r"model\.safetensors: truncated safetensors file"):
        load_quantized(out, model=copy.deepcopy(fp), checksums=False)  # caught from the header too


def test_checksum_mismatch_named(small_export):
    out, fp, _ = small_export
    data = bytearray((out / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF  # same size, one flipped byte of a tensor
    (out / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(ExportFormatError, match=r"model\.safetensors: sha256 checksum mismatch"):
        load_quantized(out, model=copy.deepcopy(fp))


def test_quant_map_referencing_missing_tensor_named(small_export):
    out, fp, _ = small_export
    qmap = json.loads((out / "quant_map.json").read_text())
    qmap["layers"]["1"]["tensors"]["1.wq_scale_extra"] = {"role": "wmeta", "dtype": "float32", "shape": [4]}
    (out / "quant_map.json").write_text(json.dumps(qmap))
    with pytest.raises(ExportFormatError, match=r"quant_map\.json: (truncated or modified|modified|sha256 checksum mismatch)"):
        load_quantized(out, model=copy.deepcopy(fp))
    write_manifest(out)  # consistent checksums: the reference itself is what is wrong
    with pytest.raises(ExportFormatError, match=r"references tensor '1\.wq_scale_extra' \(layer '1'\).*model\.safetensors"):
        load_quantized(out, model=copy.deepcopy(fp))


def test_wrong_skeleton_named(small_export):
    out, _, _ = small_export
    with pytest.raises(ExportFormatError, match=r"layer '1' has geometry"):
        load_quantized(out, model=nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 5)))


def test_dynamic_token_layout_survives_export():
    """The batch pool of a_token_share_batch (token layout and axis sizes) is part of the quant map."""
    from mpq_lightning.quant import DynamicTokenQuantizer
    from mpq_lightning.quant.export import _act_entry, build_act_quantizer

    q = DynamicTokenQuantizer(6, share_batch=True, token_layout="(b s) f c", num_frames=3, tokens_per_frame=4)
    entry = json.loads(json.dumps(_act_entry(q)))
    r = build_act_quantizer(entry)
    x = torch.randn(8, 3, 5)
    assert r.token_layout == "(b s) f c" and torch.equal(r(x), q(x))
    assert not torch.equal(DynamicTokenQuantizer(6, share_batch=True)(x), q(x))  # the layout matters here
    # a quant map written before these fields pools the leading axis, as such exports did
    legacy = {k: v for k, v in entry.items() if k not in ("token_layout", "num_frames", "tokens_per_frame")}
    assert build_act_quantizer(legacy).token_layout is None


@pytest.mark.parametrize("layers", [False, True])
def test_size_report_fits_80_columns_and_adds_up(tmp_path, layers):
    """``--report`` prints one row per weight format and bit setting (``--layers``: per layer) within
    80 columns, nothing cut; the rows add up to the report's totals."""
    from rich.console import Console

    from mpq_lightning.models.stdit import STDIT_KEEP_FP
    from mpq_lightning.quant.export import print_export_report

    cfg = QuantConfig(w_bits=3, a_bits=6, num_steps=2, keep_fp=STDIT_KEEP_FP, w_quantizer="fzrmq", **FAST,
                      bit_map={"blocks.*.mlp.fc*": {"w": 8, "a": 8, "w_quantizer": "uniform"}})
    student, _ = _student("tiny-stdit", cfg, steps=2)
    report = export_report(export_quantized(student, tmp_path / "e", model_name="tiny-stdit"))
    console = Console(width=80, record=True)
    print_export_report(report, layers=layers, console=console)
    text = console.export_text()
    assert max(map(len, text.splitlines())) <= 80 and "…" not in text
    lines = [line.split() for line in text.splitlines()]
    rows = [cells for cells in lines if len(cells) >= 6 and cells[-4].isdigit()] if layers else \
        [[c for c in cells if c != "│"] for cells in lines if cells[:1] == ["│"]]
    weights = [int(cells[-4]) for cells in rows]
    assert sum(weights) == report["totals"]["quantized_weights"]
    if layers:  # every layer, names without the common backbone. prefix, never folded onto a second line
        assert [cells[0] for cells in rows] == [r["name"].removeprefix("backbone.") for r in report["layers"]]
    else:
        residuals = [sum(1 for n in r["residual_rows"] if n) for r in report["layers"]]
        assert {(cells[0], cells[1]) for cells in rows} == {  # FZ-RMQ's 2-bit base + its binary residual branches
            (r["format"], "/".join(map(str, r["bits"])) + (f"+{k}" if k else "")) for r, k in zip(report["layers"], residuals)}
        assert ("uniform", "8") in {(cells[0], cells[1]) for cells in rows} and max(residuals) >= 1
        assert sum(int(cells[2]) for cells in rows) == len(report["layers"])
    assert f"{report['totals']['layers']} quantized layers" in text


def test_cli_ctrl_c_is_one_line_and_status_130(tmp_path, capsys, monkeypatch):
    """A Ctrl-C while exporting: one line and 130, as train.py and evaluate.py (was a traceback)."""
    import mpq_lightning.export as E

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(E, "load_qat_module", interrupted)
    assert E.main(["--ckpt_path", str(tmp_path / "x.ckpt"), "--out", str(tmp_path / "out")]) == 130
    assert "interrupted (Ctrl-C)" in capsys.readouterr().err and not (tmp_path / "out").exists()
