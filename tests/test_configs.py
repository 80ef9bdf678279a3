"""Every YAML under configs/ parses with the training CLI without any file on disk, the method recipes
switch exactly their components (so they cannot rot silently), and every tiny config trains two steps
on CPU and is evaluated.

* Parsing goes through ``train.py``'s own entry point with ``--print_config`` (nothing is
  instantiated; it exits with status 0 after printing the resolved config), then the typed config
  dataclasses are built from the printed values, which runs their validation.
* The tiny runs happen in a temporary working directory (caches and runs are relative paths) with
  one intra-op thread: on a small shared CPU, OpenMP spinning makes tiny convolutions ~100x slower.
"""
from __future__ import annotations

import contextlib
import functools
import io
import math
import sys
from pathlib import Path

import pytest
import torch
import yaml

from mpq_lightning.cli import main
from mpq_lightning.data.trajectories import TrajectoryRecipe
from mpq_lightning.evaluation import EvalConfig, evaluate
from mpq_lightning.models import list_models
from mpq_lightning.module import CalibConfig, LossConfig, OptimConfig
from mpq_lightning.quant import QuantConfig

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
ALL = sorted(CONFIGS.rglob("*.yaml"))
TINY = [p for p in ALL if p.relative_to(CONFIGS).parts[0] == "tiny"]
#: the shipped-digits CPU configs (the embedded default and its image twin): parsed with ALL, trained
#: by the smoke test below and by test_app-style runs, not held to the GPU-recipe rules of REAL
DIGITS = [CONFIGS / "default.yaml", CONFIGS / "digits_unet_w3a6.yaml"]
REAL = [p for p in ALL if p not in TINY and p not in DIGITS]
TOP_LEVEL = [p for p in REAL if p.parent == CONFIGS]
METHODS = ("efficientdm", "mpqdm", "mpqdmv2", "qvdit", "ours")
FAMILIES = ("unet", "video_dit")
VIDEO_MODELS = {"opensora-stdit-xl/2", "latte", "wan", "cogvideox", "tiny-stdit", "tiny-latte", "tiny-wan",
                "tiny-cogvideox", "moving-digits-stdit"}
QUIET = ["--log_samples", "false", "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


def _id(path: Path) -> str:
    return str(path.relative_to(CONFIGS))


@functools.lru_cache(maxsize=None)
def _printed(path: Path) -> str:
    """``python train.py --config path --print_config`` in-process: the resolved YAML."""
    out, argv = io.StringIO(), list(sys.argv)
    try:
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
            main(["--config", str(path), "--print_config"])
    finally:
        sys.argv = argv  # main() rewrites sys.argv for LightningCLI
    assert exit_info.value.code in (0, None), f"{_id(path)}: --print_config exited with {exit_info.value.code}"
    return out.getvalue()


def resolved(path: Path) -> dict:
    return yaml.safe_load(_printed(path))


def get(cfg: dict, dotted: str):
    for key in dotted.split("."):
        cfg = cfg[key]
    return cfg


def header(path: Path) -> str:
    lines = path.read_text().splitlines()
    return "\n".join(line for line in lines[: next(i for i, l in enumerate(lines) if not l.startswith("#"))])


def family_of(cfg: dict) -> str:
    return "video_dit" if cfg["model"]["model"] in VIDEO_MODELS else "unet"


# -------------------------------------------------------------------------------------------------
# Parsing
# -------------------------------------------------------------------------------------------------


def test_config_tree_is_complete():
    names = {_id(p) for p in ALL}
    expected = {
        "opensora_w3a6.yaml", "opensora_w4a6.yaml", "latte_w3a6.yaml", "wan_w4a6.yaml", "cogvideox_w4a6.yaml",
        "dit_w3a6.yaml", "ldm_imagenet_w2a4.yaml", "ldm_imagenet_w3a6.yaml",
        "tiny/stdit_w3a6.yaml", "tiny/unet2d_w4a8.yaml", "tiny/dit_w3a6.yaml",
        *(f"recipes/{m}/{f}.yaml" for m in METHODS for f in FAMILIES),
        *(f"tiny/recipes/{m}.yaml" for m in METHODS),
    }
    assert expected <= names, sorted(expected - names)


@pytest.mark.parametrize("path", ALL, ids=_id)
def test_parses_without_files(path):
    cfg = resolved(path)
    model = cfg["model"]
    assert model["model"] in list_models()
    QuantConfig(**model["quant"])  # the dataclasses' own validation (e.g. OOLRI needs a quantized base)
    loss = LossConfig(**model["loss"])
    OptimConfig(**model["optim"])
    CalibConfig(**model["calib"])
    if loss.tmd:
        assert model["model"] in VIDEO_MODELS, "TMD needs a video backbone"
    data = cfg["data"]
    assert model["quant"]["num_steps"] >= 1
    if data["class_path"] == "mpq_lightning.data.OnTheFlyDataModule":  # teacher-forced, no cache
        steps = data["init_args"]["num_inference_steps"]
    else:
        assert data["class_path"] == "mpq_lightning.data.TrajectoryDataModule"
        recipe = TrajectoryRecipe(**data["init_args"]["recipe"])
        assert recipe.name == Path(data["init_args"]["cache"]).name  # TrajectoryDataModule requires it
        steps = recipe.num_inference_steps
    if model["quant"]["a_quantizer"] == "timestep":  # one TALSQ entry per sampler step index
        assert model["quant"]["num_steps"] == steps
    assert cfg["run_name"] != "default"
    assert "Needs" in header(path), "configs document what they reproduce and need in a header"


@pytest.mark.parametrize("path", REAL, ids=_id)
def test_real_configs_target_a_gpu_and_document_their_files(path):
    cfg = resolved(path)
    trainer = cfg["trainer"]
    assert trainer["accelerator"] == "gpu" and trainer["precision"] == "bf16-mixed"
    assert trainer["max_steps"] >= 5000
    model_kwargs = cfg["model"]["model_kwargs"] or {}
    recipe = cfg["data"]["init_args"]["recipe"]
    files = [model_kwargs.get("ckpt_path"), model_kwargs.get("path"), recipe["cond_path"]]
    assert model_kwargs.get("ckpt_path") or model_kwargs.get("path"), "real configs name the teacher weights"
    text = header(path) if path.parent == CONFIGS else header(path) + "\n" + header(CONFIGS / _top_level_of(path))
    for file in filter(None, files):
        assert file in text, f"{_id(path)}: the header does not document {file}"
    if cfg["model"]["model"] not in ("dit",):  # DiT takes integer class labels, the rest an embeddings file
        assert recipe["cond_path"], "text / class-embedder teachers need precomputed embeddings"
        assert "key" in text, "the header names the embeddings file's keys"


def _top_level_of(path: Path) -> str:
    return "ldm_imagenet_w3a6.yaml" if path.stem == "unet" else "opensora_w3a6.yaml"


def test_print_config_with_subcommand_and_override():
    """The exact user path: ``train.py fit --config ... --print_config`` with a dotted override."""
    out, argv = io.StringIO(), list(sys.argv)
    try:
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
            main(["fit", "--config", str(CONFIGS / "opensora_w3a6.yaml"), "--model.quant.w_bits", "4", "--print_config"])
    finally:
        sys.argv = argv
    cfg = yaml.safe_load(out.getvalue())
    assert cfg["model"]["quant"]["w_bits"] == 4 and cfg["model"]["model"] == "opensora-stdit-xl/2"


# -------------------------------------------------------------------------------------------------
# Method recipes: the switches of each method (real recipes and their tiny mirrors)
# -------------------------------------------------------------------------------------------------

#: What each method switches (dotted keys of the resolved config).
SWITCHES = {
    "efficientdm": {
        "model.quant.w_quantizer": "uniform", "model.quant.w_init": "lp", "model.quant.a_quantizer": "timestep",
        "model.quant.lora_init": "kaiming_zero", "model.quant.lora_placement": "merged",
        "model.quant.lora_param": "efficientdm", "model.quant.lora_quantized_base": False,
        "model.quant.learn_w_zero_point": False, "model.quant.smooth_alpha": None, "model.quant.tqe": False,
        "model.loss.mse_reduction": "sum", "model.loss.trd": False, "model.loss.mtrd": False, "model.loss.tmd": False,
        "model.calib.train_act_quant": True,
    },
    "mpqdm": {
        "model.quant.w_quantizer": "omq", "model.quant.smooth_alpha": 0.5, "model.quant.learn_w_zero_point": True,
        "model.quant.a_quantizer": "timestep", "model.quant.lora_init": "kaiming_zero",
        "model.quant.lora_param": "per_position", "model.quant.lora_quantized_base": False, "model.quant.tqe": False,
        "model.loss.mse_reduction": "sum", "model.loss.trd": True, "model.loss.trd_weight": 100.0,
        "model.loss.trd_window": 1, "model.loss.trd_tau": 1.0, "model.loss.trd_detach_student": False,
        "model.loss.mtrd": False, "model.loss.tmd": False, "model.calib.train_act_quant": True,
    },
    "mpqdmv2": {
        "model.quant.w_quantizer": "fzrmq", "model.quant.fzrmq_layout": "figure", "model.quant.a_quantizer": "timestep",
        "model.quant.lora_init": "svd_output_error", "model.quant.lora_quantized_base": True,
        "model.quant.smooth_alpha": None, "model.quant.tqe": False,
        "model.loss.trd": False, "model.loss.mtrd": True, "model.loss.mtrd_weight": 0.1, "model.loss.tmd": False,
        "model.calib.train_act_quant": True,
    },
    "qvdit": {
        "model.quant.w_quantizer": "uniform", "model.quant.w_init": "grid", "model.quant.learn_w_zero_point": False,
        "model.quant.a_quantizer": "dynamic_token", "model.quant.lora_init": "kaiming_zero",
        "model.quant.lora_placement": "merged", "model.quant.lora_quantized_base": False,
        "model.quant.smooth_alpha": None, "model.quant.tqe": True, "model.quant.tqe_rank": 1,
        "model.quant.tqe_frame_scale": "temporal",
        "model.loss.mse_reduction": "mean", "model.loss.trd": False, "model.loss.mtrd": False,
        "model.optim.lora_lr": 1e-5, "model.optim.tqe_lr": 1e-5, "model.optim.w_scale_lr": 1e-6,
        "model.optim.schedule": "cosine", "model.calib.train_act_quant": False,
    },
    "ours": {
        "model.quant.w_quantizer": "fzrmq", "model.quant.fzrmq_layout": "figure", "model.quant.a_quantizer": "timestep",
        "model.quant.lora_init": "svd_output_error", "model.quant.lora_quantized_base": True,
        "model.quant.smooth_alpha": None, "model.quant.tqe": True, "model.quant.tqe_rank": 1,
        "model.loss.trd": False, "model.loss.mtrd": True, "model.loss.mtrd_weight": 0.1,
        "model.calib.train_act_quant": True,
    },
}
#: Switches that depend on the family: TMD only exists for video models.
VIDEO_SWITCHES = {"qvdit": {"model.loss.tmd": True, "model.loss.tmd_weight": 100.0},
                  "ours": {"model.loss.tmd": True, "model.loss.tmd_weight": 100.0}}
IMAGE_SWITCHES = {"qvdit": {"model.loss.tmd": False}, "ours": {"model.loss.tmd": False}}
#: The MPQ-DM lineage's scale-aware LoRA lr with linear decay (mpqdm.md §2.6, §3.6) in the unet family.
UNET_LINEAGE_OPTIM = {"model.optim.lora_lr": None, "model.optim.lora_lr_div": 2500.0, "model.optim.w_scale_lr": 1e-6,
                      "model.optim.a_scale_lr": 5e-4, "model.optim.schedule": "linear"}

RECIPES = [(m, CONFIGS / "recipes" / m / f"{f}.yaml") for m in METHODS for f in FAMILIES]
TINY_RECIPES = [(m, CONFIGS / "tiny" / "recipes" / f"{m}.yaml") for m in METHODS]


def _expected(method: str, family: str) -> dict:
    out = dict(SWITCHES[method])
    out.update((VIDEO_SWITCHES if family == "video_dit" else IMAGE_SWITCHES).get(method, {}))
    if family == "unet" and method != "qvdit":
        out.update(UNET_LINEAGE_OPTIM)
    return out


@pytest.mark.parametrize("method,path", RECIPES + TINY_RECIPES, ids=lambda v: _id(v) if isinstance(v, Path) else v)
def test_recipe_switches(method, path):
    cfg = resolved(path)
    family = family_of(cfg)
    if path.parent.parent.name == "recipes":  # recipes/<method>/<family>.yaml
        assert family == path.stem
    wrong = {k: (get(cfg, k), v) for k, v in _expected(method, family).items() if get(cfg, k) != v}
    assert not wrong, f"{_id(path)}: {{key: (got, expected)}} = {wrong}"
    quant = cfg["model"]["quant"]
    assert quant["lora_rank"] == (32 if path.parent.parent.name == "recipes" else 4)
    if method in ("mpqdm", "mpqdmv2", "ours"):  # mixed quantizers only on the low-bit layers
        eight_bit = [p for p, e in quant["bit_map"].items() if e.get("w") == 8]
        assert eight_bit and all(quant["bit_map"][p]["w_quantizer"] == "uniform" for p in eight_bit)


def _protocol(cfg: dict) -> dict:
    """Everything but the method block and run_name (w_bits / a_bits / calibration size are protocol)."""
    out = {k: v for k, v in cfg.items() if k not in ("model", "run_name")}
    model = {k: v for k, v in cfg["model"].items() if k not in ("quant", "loss", "optim", "calib")}
    out["model"] = model
    out["bits"] = (cfg["model"]["quant"]["w_bits"], cfg["model"]["quant"]["a_bits"])
    out["calib_batches"] = cfg["model"]["calib"]["num_batches"]
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_recipes_share_their_family_protocol(family):
    cfgs = {m: resolved(CONFIGS / "recipes" / m / f"{family}.yaml") for m in METHODS}
    base = _protocol(cfgs["ours"])
    for method, cfg in cfgs.items():
        assert _protocol(cfg) == base, f"recipes/{method}/{family}.yaml differs from the family protocol"
        assert cfg["run_name"] == f"{method}_{family}_w3a6"
    lineage = [cfgs[m]["model"]["optim"] for m in ("efficientdm", "mpqdm", "mpqdmv2", "ours")]
    assert all(o == lineage[0] for o in lineage), "the MPQ-DM lineage shares the family's learning rates"


@pytest.mark.parametrize("family", FAMILIES)
def test_ours_is_mpqdmv2_plus_tqe_and_tmd(family):
    v2, ours = (resolved(CONFIGS / "recipes" / m / f"{family}.yaml")["model"] for m in ("mpqdmv2", "ours"))
    drop = lambda d: {k: v for k, v in d.items() if not k.startswith(("tqe", "tmd"))}  # noqa: E731
    for block in ("quant", "loss", "optim", "calib"):
        assert drop(v2[block]) == drop(ours[block]), f"{block} differs beyond TQE / TMD"
    assert not v2["quant"]["tqe"] and ours["quant"]["tqe"]


@pytest.mark.parametrize("recipe,config", [("recipes/ours/unet.yaml", "ldm_imagenet_w3a6.yaml"),
                                           ("recipes/ours/video_dit.yaml", "opensora_w3a6.yaml")])
def test_ours_recipe_equals_the_headline_config(recipe, config):
    a, b = resolved(CONFIGS / recipe), resolved(CONFIGS / config)
    a.pop("run_name"), b.pop("run_name")
    assert a == b


@pytest.mark.parametrize("path", TOP_LEVEL, ids=_id)
def test_headline_configs_run_our_full_method(path):
    cfg = resolved(path)
    family = family_of(cfg)
    expected = _expected("ours", family)
    if family == "video_dit":  # Q-VDiT's learning rates for the video models
        expected.update({"model.optim.lora_lr": 1e-5, "model.optim.w_scale_lr": 1e-6, "model.optim.schedule": "cosine",
                         "model.loss.mse_reduction": "mean"})
    else:
        expected["model.loss.mse_reduction"] = "sum"
    wrong = {k: (get(cfg, k), v) for k, v in expected.items() if get(cfg, k) != v}
    assert not wrong, f"{_id(path)}: {wrong}"
    assert cfg["model"]["use_model_defaults"] is True
    assert cfg["model"]["quant"]["lora_rank"] == 32


def test_opensora_setting_is_qvdits():
    # kept steps: W3A6 the paper's 50 uniformly selected (papers_extra.md §2.4), W4A6 the w4a6_ours 20
    for name, steps, stride in (("opensora_w3a6.yaml", 15000, 2), ("opensora_w4a6.yaml", 10000, 5)):
        cfg = resolved(CONFIGS / name)
        recipe = cfg["data"]["init_args"]["recipe"]
        assert (recipe["scheduler"], recipe["num_inference_steps"], recipe["guidance_scale"]) == ("iddpm", 100, 4.0)
        assert recipe["keep_stride"] * cfg["data"]["init_args"]["step_stride"] == stride and recipe["cond_path"]
        assert cfg["model"]["model_kwargs"]["ckpt_path"].endswith("OpenSora-v1-HQ-16x512x512.pth")
        assert cfg["data"]["init_args"]["batch_size"] == 4 and cfg["trainer"]["max_steps"] == steps


@pytest.mark.parametrize("name", ["ldm_imagenet_w2a4.yaml", "ldm_imagenet_w3a6.yaml"])
def test_ldm_imagenet_setting_is_mpqdms(name):
    cfg = resolved(CONFIGS / name)
    recipe = cfg["data"]["init_args"]["recipe"]
    assert (recipe["scheduler"], recipe["num_inference_steps"], recipe["eta"], recipe["guidance_scale"]) == ("ddim", 20, 0.0, 3.0)
    assert recipe["num_trajectories"] == 3200 and cfg["trainer"]["max_steps"] == 16000
    assert cfg["data"]["init_args"]["batch_size"] == 8 and cfg["model"]["loss"]["mse_reduction"] == "sum"


# -------------------------------------------------------------------------------------------------
# Tiny configs: train two steps on CPU, then evaluate the run
# -------------------------------------------------------------------------------------------------


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("path", TINY, ids=_id)
def test_tiny_config_trains_and_evaluates(path, tmp_path, monkeypatch, one_thread):
    cfg = resolved(path)
    assert cfg["trainer"]["accelerator"] == "cpu" and cfg["trainer"]["max_steps"] <= 8
    data = cfg["data"]["init_args"]
    on_the_fly = "cache" not in data
    cache = None if on_the_fly else data["cache"]
    assert on_the_fly or cache.startswith("data/tiny_")
    recipe = data if on_the_fly else data["recipe"]
    assert recipe["random_conditions"] or recipe["class_labels"], "tiny configs need no embeddings file"
    monkeypatch.chdir(tmp_path)  # the cache and the run live under tmp_path
    root = tmp_path / "checkpoints"
    argv = list(sys.argv)
    try:
        cli = main(["--config", str(path), "--trainer.max_steps", "2", "--trainer.default_root_dir", str(root), *QUIET])
    finally:
        sys.argv = argv
    assert cli.trainer.global_step == 2
    assert math.isfinite(float(cli.trainer.callback_metrics["train/loss"]))
    assert on_the_fly or (tmp_path / cache / "manifest.json").is_file()
    run = root / cfg["run_name"]
    assert (run / "last.ckpt").is_file()
    metrics = evaluate(str(run / "config.yaml"), "last", EvalConfig(num_samples=2))
    assert metrics["num_samples"] == 2 and metrics["steps"] == recipe["num_inference_steps"]
    assert math.isfinite(metrics["latent_mse_student_vs_teacher"])
    assert (run / "eval" / "metrics.json").is_file()
    if not on_the_fly and cli.model.teacher.cond_kind != "text":  # (text conditions come from the cache)
        # evaluated where the cache is not (another machine): the training sampler saved in the checkpoint
        (tmp_path / cache).rename(tmp_path / "moved")
        again = evaluate(str(run / "config.yaml"), "last", EvalConfig(num_samples=2), out=str(tmp_path / "eval2"))
        assert {k: again[k] for k in ("scheduler", "steps", "guidance_scale")} == \
            {k: metrics[k] for k in ("scheduler", "steps", "guidance_scale")}


#: Real configs whose backbone no tiny config covers, with the tiny backbone of the same adapter.
TINY_TWINS = [("latte_w3a6.yaml", "tiny-latte"), ("wan_w4a6.yaml", "tiny-wan"), ("cogvideox_w4a6.yaml", "tiny-cogvideox"),
              ("ldm_imagenet_w3a6.yaml", "tiny-unet2d-condition")]


@pytest.mark.parametrize("config,tiny", TINY_TWINS)
def test_real_config_switches_train_on_the_tiny_twin(config, tiny, tmp_path, monkeypatch, one_thread):
    """The real config's method and sampler, composed (a second ``--config``) with an overlay that swaps
    in the tiny backbone of the same adapter, a small condition file with null rows and tiny sizes."""
    from safetensors.torch import save_file

    from mpq_lightning.models import build

    denoiser = build(tiny)
    table = {}
    for key, spec in denoiser.cond_spec.items():
        shape = [6 if d is None else d for d in spec.shape]
        ones = spec.dtype == "mask"
        table[key] = torch.ones(2, *shape, dtype=torch.long) if ones else torch.randn(2, *shape)
        table[f"null.{key}"] = torch.ones(1, *shape, dtype=torch.long) if ones else torch.zeros(1, *shape)
    save_file(table, str(tmp_path / "cond.safetensors"))
    overlay = {
        "run_name": "twin",
        "trainer": {"accelerator": "cpu", "precision": "32-true", "max_steps": 1, "default_root_dir": str(tmp_path / "runs")},
        "model": {"model": tiny, "model_kwargs": None, "quant": {"num_steps": 3, "lora_rank": 4, "calib_max_rows": 256},
                  "loss": {"mtrd_anchors": 16, "mtrd_memory_samples": 16, "mtrd_pixels_per_step": 4},
                  "calib": {"num_batches": 1}},
        "data": {"init_args": {"cache": "data/twin", "batch_size": 4, "num_workers": 0, "shuffle_buffer": 8,
                               "recipe": {"name": "twin", "cond_path": str(tmp_path / "cond.safetensors"),
                                          "num_inference_steps": 3, "num_trajectories": 2, "batch_size": 2,
                                          "shard_size": 2, "keep_stride": 1}}},
    }
    (tmp_path / "overlay.yaml").write_text(yaml.safe_dump(overlay))
    monkeypatch.chdir(tmp_path)
    argv = list(sys.argv)
    try:
        cli = main(["--config", str(CONFIGS / config), "--config", str(tmp_path / "overlay.yaml"), *QUIET])
    finally:
        sys.argv = argv
    assert cli.trainer.global_step == 1 and math.isfinite(float(cli.trainer.callback_metrics["train/loss"]))
    real = resolved(CONFIGS / config)["model"]
    for key in ("w_quantizer", "lora_init", "tqe", "a_quantizer", "w_bits", "a_bits"):
        assert getattr(cli.model.quant_cfg, key) == real["quant"][key]
    assert cli.model.loss_cfg.tmd == real["loss"]["tmd"] and cli.model.loss_cfg.mtrd == real["loss"]["mtrd"]


def test_tiny_caches_are_distinct():
    caches = [resolved(p)["data"]["init_args"]["cache"] for p in TINY if "cache" in resolved(p)["data"]["init_args"]]
    assert len(set(caches)) == len(caches)
