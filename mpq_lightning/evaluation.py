"""Evaluation of a trained run: samples of student and teacher from the same noise, metrics, media.

    python evaluate.py --config checkpoints/<run>/config.yaml [--ckpt_path last] [--num_samples 16]

Writes ``<run>/eval/`` atomically (built in a temporary folder, then renamed): ``metrics.json``,
``grid.png`` (teacher row over student row; for videos, frames side by side) and ``videos.gif``
(video models), and prints a rich table. Metrics (torchmetrics): PSNR / SSIM of the student's
samples against the teacher's from the same noise; Fréchet distance between student and teacher
samples in a feature network's space (the shipped digits networks, chosen automatically for the
digits teachers, or the user's ``eval.feature = "package.module:factory"``); class consistency for class-conditional digits teachers; the student–teacher
ε error per sampler step along the teacher's trajectory (teacher forcing); and for videos a
temporal-consistency score of both. Everything is computed on the denoiser's output space (pixels
for the digits teachers, latents for the real models) unless ``eval.vae`` names a local diffusers
autoencoder folder: then both sample sets are decoded to pixels first, frame by frame for an image
autoencoder, whole for a video one (Wan, CogVideoX), and the media show pixels; the latent MSE is
still reported. Runs on ``eval.device``.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from einops import rearrange
from torch import Tensor

from .callbacks.samples import make_grid, map_to_trained_entries, to_uint8
from .checks import check_numbers
from .compare import conditions
from .data.trajectories import MANIFEST
from .files import ordinary_permissions, read_checkpoint, read_run_config
from .models.sampling import _cat_cond, guide, make_scheduler, sample, step_noise_seed
from .models.vae import decode_latents, load_vae, vae_class
from .quant import set_quant_state


@dataclass
class EvalConfig:
    """What evaluate.py samples and how it measures it.

    Args:
        num_samples: samples drawn with the student and with the teacher, from the same fixed-seed noise
        seed: seed of the noise (one generator per sample, so results do not depend on batch_size)
        num_inference_steps: sampler steps; null: the training sampler's (the quantizer tables' steps: the
            trajectory cache's or on-the-fly stream's, else the one saved in the checkpoint)
        guidance_scale: classifier-free guidance; null: the training sampler's
        feature: network of the Fréchet distance: auto | digits-image | digits-video | none |
            package.module:factory (factory() returns an nn.Module mapping samples in [0, 1] to [N, D])
        batch_size: samples per sampling batch (memory only: the samples do not depend on it)
        device: auto (cuda when available, else cpu) or any torch device string
        vae: local diffusers autoencoder folder (config.json + weights) that decodes both sample sets to
            pixels before the metrics and media, e.g. sd-vae-ft-ema for OpenSora v1.0, Latte and DiT;
            null: measure what the denoiser produces (latents for the real models)
        vae_scaling_factor: latent scaling to undo; null: the autoencoder config's scaling_factor (and
            shift_factor); set it where the config lacks the teacher's (1.0 for an LDM VQ-f4 saved without)
        save_samples: also write samples.safetensors: the teacher's and the student's samples as measured
            (float32 [N, C, (F,) H, W]; pixels after an eval.vae decode, whose latents come as
            latents_teacher / latents_student), the class labels where the model takes them and each
            sample's noise seed, for metrics of your own (FID-50K with another tool)
    """

    num_samples: int = 16
    seed: int = 1234
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    feature: str = "auto"
    batch_size: int = 16
    device: str = "auto"
    vae: str | None = None
    vae_scaling_factor: float | None = None
    save_samples: bool = False

    def __post_init__(self) -> None:
        check_numbers("eval", vars(self), counts=("num_samples", "batch_size"), optional_counts=("num_inference_steps",),
                      optional_nonnegative=("guidance_scale",))
        if self.vae is not None:
            vae_class(self.vae, key="eval.vae")  # a folder of a supported autoencoder, before any sampling
        if not isinstance(self.save_samples, bool):
            raise ValueError(f"eval.save_samples must be true or false, got {self.save_samples!r}")
        if self.vae_scaling_factor is not None and not self.vae_scaling_factor > 0:
            raise ValueError(f"eval.vae_scaling_factor must be > 0, got {self.vae_scaling_factor}")
        if self.feature not in FEATURES and ":" not in self.feature:
            raise ValueError(f"eval.feature must be one of {FEATURES} or 'package.module:factory', got {self.feature!r}")
        if ":" in self.feature:
            feature_factory(self.feature)  # importable, before any sampling
        try:
            torch.device(self.resolved_device())
        except RuntimeError as err:
            raise ValueError(f"eval.device: {self.device!r} is not a torch device ({err})") from None
        if self.resolved_device().startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"eval.device={self.device!r} but CUDA is not available on this machine")

    def resolved_device(self) -> str:
        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device


FEATURES = ("auto", "digits-image", "digits-video", "none")


def feature_factory(spec: str):
    """The callable named by ``eval.feature = "package.module:factory"``."""
    import importlib

    module_name, _, attr = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"eval.feature: cannot import {spec!r} ({err})") from None
    if not callable(factory):
        raise ValueError(f"eval.feature: {spec!r} is not callable")
    return factory


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def resolve_checkpoint(config_path: Path, ckpt_path: str) -> Path:
    path = config_path.parent / "last.ckpt" if ckpt_path == "last" else Path(ckpt_path)
    if not path.exists():  # a file, or a DeepSpeed checkpoint folder
        raise FileNotFoundError(f"checkpoint {path} does not exist (ckpt_path={ckpt_path!r}, run {config_path.parent})")
    return path


def load_run(config: str, ckpt_path: str = "last", overrides: list[str] | None = None):
    """(QATModule with the checkpoint restored, data module) from a run's resolved ``config.yaml``."""
    from .cli import MPQCLI

    config_path = Path(config)
    if not config_path.is_file():
        raise FileNotFoundError(f"config {config_path} does not exist")
    ckpt = resolve_checkpoint(config_path, ckpt_path)
    import yaml

    resolved = read_run_config(config_path)
    for key in ("ckpt_path", "weights_only"):  # `fit` options saved with the run, not model/data config
        resolved.pop(key, None)
    if isinstance(resolved.get("trainer"), dict):
        # evaluation uses the model and data only: the training machine's accelerator, devices, strategy,
        # logger and callbacks (and their local files) play no part, so a GPU run evaluates anywhere
        root = resolved["trainer"].get("default_root_dir")
        resolved["trainer"] = {"accelerator": "cpu", "devices": 1, "logger": False, "enable_progress_bar": False,
                               "enable_model_summary": False, **({"default_root_dir": root} if root else {})}
    import sys

    argv, sys.argv = sys.argv, sys.argv[:1]  # LightningCLI warns when it sees both args and sys.argv
    # the CLI's Trainer is a placeholder (sampling runs on eval.device): its report of the devices it
    # does not use ("GPU available: True (cuda), used: False", "GPU available but not used") misled
    report = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    level = report.level
    report.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"GPU available but not used")
            cli = MPQCLI(args=["--config", yaml.safe_dump(resolved), *(overrides or [])], run=False)
    finally:
        sys.argv = argv
        report.setLevel(level)
    module, datamodule = cli.model, cli.datamodule
    checkpoint = read_checkpoint(ckpt)  # our own Lightning checkpoint
    module.check_checkpoint(checkpoint, source=str(ckpt))  # names the file; on_load_checkpoint checks again
    module.on_load_checkpoint(checkpoint)
    module.load_state_dict(checkpoint["state_dict"], strict=True)
    return module.eval(), datamodule, ckpt


# ---------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------


def _conditions(module, datamodule, n: int) -> tuple[dict | None, dict | None, Tensor | None]:
    """``compare.conditions`` (the final report's: digit labels ``i % 10`` reduced to the model's class
    count, never its null class; text from the data module), with labels for class models only: they
    are what class consistency is measured against."""
    cond, uncond, labels = conditions(module.teacher, n, datamodule)
    return cond, uncond, labels if module.teacher.cond_kind == "class" else None


def _sampler_setup(module, datamodule, cfg: EvalConfig) -> tuple[str, dict, int, float, float]:
    """The training sampler (``compare.training_sampler``) with eval.num_inference_steps / guidance_scale."""
    spec = module.training_sampler(datamodule)
    steps = cfg.num_inference_steps or spec.num_inference_steps
    scale = cfg.guidance_scale if cfg.guidance_scale is not None else spec.guidance_scale
    return spec.scheduler, dict(spec.scheduler_config or {}), int(steps), float(scale), spec.eta


@torch.no_grad()
def generate(module, datamodule, cfg: EvalConfig) -> dict[str, Any]:
    """Teacher and student samples from the same noise, and the per-step ε error (teacher forcing)."""
    teacher, student = module.teacher, module.student
    device = next(module.parameters()).device
    name, sched_cfg, steps, scale, eta = _sampler_setup(module, datamodule, cfg)
    set_quant_state(student.backbone, True, True)
    # sampling step i -> the trained activation-table entry of the nearest timestep (a cache that kept
    # every 5th step trains 1 entry in 5); another step count needs the cache's timesteps
    table_steps = module.step_table_length
    student, step_map = map_to_trained_entries(student, datamodule, make_scheduler(name, **sched_cfg), steps, table_steps)
    if step_map == "proportionally":
        raise ValueError(
            f"num_inference_steps={steps} but the student's activation step tables have quant.num_steps="
            f"{table_steps} entries, and the training timesteps that would map one onto the other are unknown (no "
            "trajectory cache behind the run, or its sampler does not have quant.num_steps steps); evaluate with "
            "the training sampler or resample the tables"
        )
    n = cfg.num_samples
    cond, uncond, labels = _conditions(module, datamodule, n)
    cond, uncond = (None if c is None else {k: v.to(device) for k, v in c.items()} for c in (cond, uncond))
    seeds = [cfg.seed + i for i in range(n)]  # sample i's initial noise (its sampler noise: step_noise_seed)
    noise = torch.stack([  # on the CPU from fixed seeds: the same samples on every device
        torch.randn(teacher.latent_shape, generator=torch.Generator().manual_seed(s)) for s in seeds
    ]).to(device)
    step_err = torch.zeros(steps, dtype=torch.float64)
    use_cfg = scale != 1.0
    if use_cfg and uncond is None and cond is not None:
        uncond = teacher.null_cond(cond)
    channels = teacher.cfg_channels or (teacher.in_channels if teacher.learned_sigma else teacher.out_channels)
    batch_cond: dict = {}  # the conditions of the batch being sampled, as the model takes them

    def guided(model, x: Tensor, t: Tensor, i: int) -> Tensor:
        x_in = torch.cat([x, x]) if use_cfg else x
        rows = x_in.shape[0]
        out = model(x_in, t.expand(rows), batch_cond, torch.full((rows,), i, dtype=torch.long, device=x.device))
        if use_cfg:
            oc, ou = out.chunk(2)
            out = guide(oc, ou, scale, channels)
        return out

    def record(step_index, t, x_t, cond, model_output, x_prev):  # teacher forcing: same x_t for both
        err = (guided(student, x_t, t, step_index) - model_output).float().pow(2).mean()
        step_err[step_index] += float(err) * x_t.shape[0]  # a sum over samples: batches may differ in size

    results = {}
    for who, model in (("teacher", teacher), ("student", student)):
        outs = []
        for start in range(0, n, cfg.batch_size):
            sl = slice(start, start + cfg.batch_size)
            c = {k: v[sl] for k, v in cond.items()} if cond else None
            u = {k: v[sl] for k, v in uncond.items()} if uncond else None
            batch_cond.clear()
            batch_cond.update(_cat_cond(c or {}, u or {}) if use_cfg else dict(c or {}))
            # one generator per sample (diffusers' randn_tensor takes a list): a stochastic sampler's noise,
            # like the initial noise, depends on the sample's seed only, not on eval.batch_size
            g = [torch.Generator().manual_seed(step_noise_seed(cfg.seed, i)) for i in range(n)[sl]]
            outs.append(sample(model, make_scheduler(name, **sched_cfg), noise[sl], c, u, scale, steps,
                               generator=g, eta=eta, recorder=record if who == "teacher" else None))
        results[who] = torch.cat(outs).cpu()
    step_err /= n  # the mean over samples
    return {"teacher": results["teacher"], "student": results["student"], "labels": labels, "noise_seed": seeds,
            "step_error": step_err.tolist(), "scheduler": name, "steps": steps, "guidance_scale": scale,
            "student_step_map": step_map or "identity"}


# ---------------------------------------------------------------------------------------------
# Metrics and media
# ---------------------------------------------------------------------------------------------


def _feature_choice(teacher, feature: str) -> str:
    if feature != "auto":
        return feature
    shape = tuple(teacher.latent_shape)
    if shape == (1, 16, 16):
        return "digits-image"
    if shape == (1, 8, 16, 16):
        return "digits-video"
    return "none"


def compute_metrics(gen: dict[str, Any], teacher, feature: str) -> dict[str, Any]:
    from . import metrics as M

    s, t = gen["student"].float(), gen["teacher"].float()
    out: dict[str, Any] = {"num_samples": s.shape[0], "scheduler": gen["scheduler"], "steps": gen["steps"],
                           "guidance_scale": gen["guidance_scale"],
                           "sample_space": gen.get("sample_space", "denoiser output"),
                           "student_step_map": gen.get("student_step_map", "identity")}
    shown_s, shown_t = s[:, :3], t[:, :3]
    rng = (float(min(shown_s.min(), shown_t.min())), float(max(shown_s.max(), shown_t.max())))
    value_range = (-1.0, 1.0) if rng[0] >= -1.5 and rng[1] <= 1.5 else rng
    out.update({f"{k}_student_vs_teacher": v for k, v in M.psnr_ssim(shown_s, shown_t, value_range).items()})
    latents = gen.get("latents", {"student": s, "teacher": t})  # the samples before an eval.vae decode
    out["latent_mse_student_vs_teacher"] = float((latents["student"].float() - latents["teacher"].float()).pow(2).mean())
    out["step_error"] = gen["step_error"]
    choice = _feature_choice(teacher, feature)
    out["feature_network"] = choice
    net, fd_range = None, (-1.0, 1.0)  # the digits networks take [-1, 1] samples
    if ":" in choice:  # the user's feature network, on the samples mapped to [0, 1]
        net, fd_range = feature_factory(choice)().eval(), value_range
        if not hasattr(net, "num_features"):  # torchmetrics would probe it with a 299x299 RGB image
            with torch.no_grad():
                net.num_features = int(net(M._to_unit(t[:1], value_range)).shape[-1])
    elif choice in ("digits-image", "digits-video"):
        net = M.ImageFeatureNet() if choice == "digits-image" else M.VideoFeatureNet()
    if net is not None and s.shape[0] < 2:
        warnings.warn(f"eval.num_samples={s.shape[0]}: the Fréchet distance (and class consistency) need at least 2 "
                      "samples; left out", stacklevel=2)
    if net is not None and s.shape[0] >= 2:
        out["frechet_distance_student_vs_teacher"] = M.frechet_distance(t, s, net, value_range=fd_range)
        if gen["labels"] is not None and choice in ("digits-image", "digits-video"):  # our digit classifiers
            clf = M.load_image_classifier() if choice == "digits-image" else M.load_video_classifier()
            kw = {} if choice == "digits-image" else {"head": "digit"}
            out["class_consistency_teacher"] = M.class_consistency(t, gen["labels"], clf, **kw)
            out["class_consistency_student"] = M.class_consistency(s, gen["labels"], clf, **kw)
    if teacher.is_video:
        out["temporal_consistency_teacher"] = M.temporal_consistency(shown_t, value_range=value_range)
        out["temporal_consistency_student"] = M.temporal_consistency(shown_s, value_range=value_range)
    return out


def _to_unit(x: Tensor) -> Tensor:
    """Samples to [0, 1]: pixels in [-1, 1] as they are, anything else (latents) by its own range."""
    lo, hi = (-1.0, 1.0) if x.min() >= -1.5 and x.max() <= 1.5 else (float(x.min()), float(x.max()))
    return (x.clamp(lo, hi) - lo) / max(hi - lo, 1e-8)


def _png_image(grid: Tensor):
    from PIL import Image

    array = to_uint8(grid).permute(1, 2, 0).numpy()  # C H W -> H W C
    return Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)


def write_media(gen: dict[str, Any], folder: Path) -> list[str]:
    """grid.png (teacher row over student row; for videos, a teacher / student row pair per sample with
    the frames across) and, for videos, videos.gif (the image grid per frame). Small samples are
    enlarged (``make_grid``'s nearest-neighbour factor), tiles separated by white borders."""
    t, s = gen["teacher"][:, :3].float(), gen["student"][:, :3].float()
    both = _to_unit(torch.stack([t, s]))  # [2, N, C, (F,) H, W], one range for teacher and student
    if both.shape[2] == 2:
        both = torch.cat([both, both[:, :, :1]], 2)
    if both.dim() == 5:  # images
        _png_image(make_grid(both)).save(folder / "grid.png")
        return ["grid.png"]
    written = []
    _png_image(make_grid(rearrange(both, "r n c f h w -> (n r) f c h w"))).save(folder / "grid.png")
    written.append("grid.png")
    pics = [_png_image(make_grid(frame)) for frame in rearrange(both, "r n c f h w -> f r n c h w")]
    pics[0].save(folder / "videos.gif", save_all=True, append_images=pics[1:], duration=250, loop=0)
    written.append("videos.gif")
    return written


def write_samples(gen: dict[str, Any], folder: Path, metrics: dict[str, Any]) -> list[str]:
    """samples.safetensors: the samples the metrics were computed on (see ``EvalConfig.save_samples``);
    its metadata holds the sampler and the checkpoint."""
    from safetensors.torch import save_file

    tensors = {who: gen[who].float().contiguous() for who in ("teacher", "student")}
    for who, latents in (gen.get("latents") or {}).items():
        tensors[f"latents_{who}"] = latents.float().contiguous()
    if gen["labels"] is not None:
        tensors["labels"] = gen["labels"].long().contiguous()
    tensors["noise_seed"] = torch.tensor(gen["noise_seed"], dtype=torch.long)
    meta = {k: str(metrics[k]) for k in ("scheduler", "steps", "guidance_scale", "sample_space", "checkpoint")
            if k in metrics}
    save_file(tensors, str(folder / "samples.safetensors"), metadata=meta)
    return ["samples.safetensors"]


def _check_output_folder(target: Path) -> None:
    """Refuse an output folder that exists and holds anything but an earlier evaluation (the files its
    ``metrics.json`` lists)."""
    if not target.exists():
        return
    if not target.is_dir():
        raise FileExistsError(f"evaluation output {target} exists and is not a folder: choose another --out")
    try:
        written = set(json.loads((target / "metrics.json").read_text())["files"])
    except (OSError, ValueError, KeyError, TypeError):
        written = set()
    foreign = sorted(p.name for p in target.iterdir() if p.name not in written)
    if foreign:
        raise FileExistsError(
            f"evaluation output {target} holds files that are not an earlier evaluation's "
            f"({', '.join(foreign[:5])}{' ...' if len(foreign) > 5 else ''}): it would be replaced; choose another "
            "--out (a new or an earlier evaluation's folder)"
        )


def print_table(metrics: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    table = Table(title="evaluation")
    table.add_column("metric", no_wrap=True)
    table.add_column("value", overflow="fold")  # paths wrap whole rather than end in "…"
    for k, v in metrics.items():
        if k == "step_error":
            worst = max(range(len(v)), key=v.__getitem__)
            table.add_row("step_error (mean / worst step)", f"{sum(v) / len(v):.5g} / step {worst}: {v[worst]:.5g}")
        elif isinstance(v, float):
            table.add_row(k, f"{v:.5g}")
        elif isinstance(v, (list, tuple)):
            table.add_row(k, ", ".join(map(str, v)))
        else:
            table.add_row(k, escape(str(v)))  # a path with brackets is not Rich markup
    Console().print(table)


def _fallback_sampler(module) -> str:
    return "the training sampler saved in the checkpoint" if module.trained_sampler else "the teacher's default sampler"


def _check_feature(teacher, cfg: EvalConfig) -> None:
    """The shipped digits networks measure the digits teachers' kind of sample: refused for others
    before any sampling (decoded samples of ``eval.vae`` are not judged here)."""
    from .metrics import VIDEO_SHAPE

    if cfg.vae is not None or cfg.feature not in ("digits-image", "digits-video"):
        return
    shape = tuple(teacher.latent_shape)
    video = cfg.feature == "digits-video"
    fits = (len(shape) == 4 and shape[1:] == tuple(VIDEO_SHAPE)) if video else len(shape) == 3
    if not fits:
        want = f"[C, {', '.join(map(str, VIDEO_SHAPE))}] videos" if video else "[C, H, W] images"
        raise ValueError(f"eval.feature={cfg.feature!r} measures {want}; this run's samples are {list(shape)}: use "
                         "'auto', 'none' or a network of your own ('package.module:factory')")


def evaluate(config: str, ckpt_path: str = "last", eval_cfg: EvalConfig | None = None, out: str | None = None,
             overrides: list[str] | None = None) -> dict[str, Any]:
    """Load the run, sample, compute metrics, write ``<run>/eval`` (or ``out``) atomically."""
    cfg = eval_cfg or EvalConfig()
    target = Path(out) if out else Path(config).parent / "eval"
    _check_output_folder(target)  # before any model is built
    module, datamodule, ckpt = load_run(config, ckpt_path, overrides)
    _check_feature(module.teacher, cfg)
    module.to(cfg.resolved_device())
    vae = load_vae(cfg.vae, module.teacher, cfg.resolved_device(), key="eval.vae") if cfg.vae else None  # before sampling
    cache_dir = getattr(datamodule, "cache_dir", None)
    if cache_dir is not None and not (Path(cache_dir) / MANIFEST).is_file():
        # evaluation reads the sampler recipe and the conditions from the run's cache, and never
        # generates one (hours of teacher sampling for the real models)
        msg = (f"the run's trajectory cache {cache_dir} does not exist (relative paths are read from the "
               f"current folder, {Path.cwd()}): run from the training folder, point to the cache with "
               "`evaluate.py --config ... -- --data.init_args.cache <path>`, copy it from the training machine, "
               "or build it with `python -m mpq_lightning.data.trajectories`")
        if module.teacher.cond_kind == "text":
            raise FileNotFoundError(msg + " (the text conditions come from it)")
        print(f"note: {msg}; using {_fallback_sampler(module)}")
    else:
        try:
            if hasattr(datamodule, "prepare_cache"):
                datamodule.prepare_cache(module.teacher)  # a complete cache is only checked
            if hasattr(datamodule, "setup"):
                datamodule.setup("validate")
        except Exception as err:
            if module.teacher.cond_kind == "text":
                raise
            print(f"note: data module not available ({err}); using {_fallback_sampler(module)}")
    gen = generate(module, datamodule, cfg)
    if vae is not None:
        gen["latents"] = {who: gen[who] for who in ("teacher", "student")}
        for who in ("teacher", "student"):
            gen[who] = decode_latents(vae, gen[who], cfg.batch_size, cfg.vae_scaling_factor)
        gen["sample_space"] = f"pixels ({type(vae).__name__} {cfg.vae})"
    metrics = compute_metrics(gen, module.teacher, cfg.feature)
    metrics["checkpoint"] = str(ckpt)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".eval-", dir=target.parent))
    try:
        samples = write_samples(gen, tmp, metrics) if cfg.save_samples else []
        metrics["files"] = write_media(gen, tmp) + samples + ["metrics.json"]
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2))
        ordinary_permissions(tmp)  # mkdtemp's folder is private (0700); the result is an ordinary folder
        _check_output_folder(target)  # nothing else appeared there while sampling
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print_table(metrics)
    print(f"wrote {target}")
    return metrics
