"""Side-by-side quality of FP, naive PTQ and trained students on the shipped digits teachers.

Every model samples from the same noise with the same sampler; metrics (torchmetrics-based,
``mpq_lightning.metrics``): Fréchet distance to held-out real digits in our feature network's
space (``fd_real``), class consistency of the samples under our classifier, PSNR / SSIM against the
FP teacher's samples from the same noise, and (videos) temporal consistency. Used by the
``FinalReport`` callback of the embedded default and by ``benchmarks/methods_table.py``.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from .models.sampling import class_condition, make_scheduler, sample, step_noise_seed
from .quant import QuantConfig, calibrate, quantize_model, set_quant_state, step_index_context


@dataclass
class SamplerSpec:
    scheduler: str = "ddim"
    scheduler_config: dict | None = None
    num_inference_steps: int = 20
    guidance_scale: float = 4.0
    eta: float = 0.0

    @classmethod
    def from_default_scheduler(cls, spec: dict) -> "SamplerSpec":
        """From the form of a Denoiser's ``default_scheduler`` (checkpoints' ``mpq_sampler``, exports)."""
        return cls(spec["name"], dict(spec.get("config") or {}), int(spec["num_inference_steps"]),
                   float(spec.get("guidance_scale", 1.0)), float(spec.get("eta", 0.0)))

    def as_default_scheduler(self) -> dict:
        """In the form of a Denoiser's ``default_scheduler``."""
        return {"name": self.scheduler, "config": dict(self.scheduler_config or {}),
                "num_inference_steps": self.num_inference_steps, "guidance_scale": self.guidance_scale, "eta": self.eta}


def training_sampler(teacher, datamodule=None, table_steps: int | None = None,
                     saved: dict | None = None) -> SamplerSpec:
    """The sampler the student was trained on, which its activation step tables belong to: the trajectory
    cache's recipe (its manifest holds the resolved scheduler, steps, guidance and η), the on-the-fly
    stream's arguments (unset ones are the teacher's); where the data module tells nothing, ``saved``
    (a checkpoint's ``mpq_sampler``), else the teacher's ``default_scheduler`` with ``table_steps`` steps
    (the student's step-table length, when > 1) rather than its default count."""
    recipe: dict[str, Any] = {}
    if hasattr(datamodule, "stream_args"):  # on-the-fly trajectories
        recipe = {k: v for k, v in datamodule.stream_args.items() if v is not None}
    elif datamodule is not None:
        try:
            recipe = dict(datamodule.manifest["recipe"])
        except Exception:  # no cache behind it / not a trajectory data module
            recipe = {}
    if not recipe and saved:
        return SamplerSpec.from_default_scheduler(saved)
    default = teacher.default_scheduler
    named = recipe.get("scheduler")
    config = recipe.get("scheduler_config") if named else default.get("config")
    steps = recipe.get("num_inference_steps") or (table_steps if not recipe and table_steps and table_steps > 1 else None) \
        or default.get("num_inference_steps")
    scale = recipe.get("guidance_scale")
    return SamplerSpec(named or default["name"], dict(config or {}), int(steps) if steps else 0,
                       float(default.get("guidance_scale", 1.0) if scale is None else scale),
                       float(recipe.get("eta") or 0.0))


def real_reference(teacher, n: int = 256) -> torch.Tensor | None:
    """Held-out real data of the digits teacher's kind (images or videos), or None for other models."""
    from .data.digits import DigitsDataset, MovingDigitsDataset

    shape = tuple(teacher.latent_shape)
    if shape == (1, 16, 16):
        return DigitsDataset("heldout").tensors()[0][:n]
    if shape == (1, 8, 16, 16):
        return MovingDigitsDataset("heldout", num_videos=n, seed=12345).tensors()["x"]
    return None


def conditions(denoiser, n: int, datamodule=None) -> tuple[dict | None, dict | None, torch.Tensor]:
    """``(cond, uncond, labels)`` of ``n`` samples: class models get labels ``i % 10`` (the digits'
    classes, modulo the model's class count); text models the data module's ``sample_conditions(n)``
    (the cache's prompts; ``uncond`` None: the model's null condition); unconditional models none."""
    labels = torch.arange(n) % 10
    kind = denoiser.cond_kind
    if kind == "none":
        return None, None, labels
    if kind == "class" and (cond := class_condition(denoiser, labels)) is not None:
        return cond, None, labels
    fn = getattr(datamodule, "sample_conditions", None)
    if not callable(fn):
        raise ValueError(f"{type(denoiser).__name__} takes {kind} conditions: sampling it needs a data module with "
                         f"sample_conditions(n), got {type(datamodule).__name__}")
    cond, uncond = fn(n)
    return dict(cond), (dict(uncond) if uncond is not None else None), labels


@torch.no_grad()
def generate(denoiser, spec: SamplerSpec, n: int, seed: int = 1234, batch: int = 32,
             new_step: Callable[[], None] | None = None, datamodule=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` samples from fixed seeds, and their labels (``conditions``; text models take their
    conditions from ``datamodule``).

    ``new_step`` (``QATModule.mark_cudagraph_step``) is called before each batch's sampling run, so
    that a backbone replayed as CUDA graphs replays the graphs of the previous run's denoiser calls
    rather than recording a new one at every call of the whole report."""
    cond, uncond, labels = conditions(denoiser, n, datamodule)
    scale = 1.0 if denoiser.cond_kind == "none" else spec.guidance_scale  # nothing to guide
    device = next(denoiser.parameters()).device
    rows = lambda table, idx: {k: v[idx].to(device) for k, v in table.items()} if table else None  # noqa: E731
    outs = []
    for start in range(0, n, batch):
        idx = torch.arange(start, min(n, start + batch))
        noise = torch.stack([torch.randn(denoiser.latent_shape, generator=torch.Generator().manual_seed(seed + int(i)))
                             for i in idx]).to(device)
        sched = make_scheduler(spec.scheduler, **(spec.scheduler_config or {}))
        if new_step is not None:
            new_step()
        outs.append(sample(denoiser, sched, noise, rows(cond, idx), rows(uncond, idx), scale,
                           spec.num_inference_steps, generator=torch.Generator(device).manual_seed(step_noise_seed(seed, start)),
                           eta=spec.eta).cpu())
    return torch.cat(outs), labels


def quality(samples: torch.Tensor, labels: torch.Tensor, fp_samples: torch.Tensor | None, real: torch.Tensor | None,
            is_video: bool) -> dict[str, float]:
    from . import metrics as M

    out: dict[str, float] = {}
    if real is not None:
        net = M.VideoFeatureNet() if is_video else M.ImageFeatureNet()
        out["fd_real"] = M.frechet_distance(real, samples, net)
        clf = M.load_video_classifier() if is_video else M.load_image_classifier()
        out["class_consistency"] = M.class_consistency(samples, labels, clf, **({"head": "digit"} if is_video else {}))
    if fp_samples is not None:
        ps = M.psnr_ssim(samples, fp_samples)
        out["psnr_vs_fp"], out["ssim_vs_fp"] = ps["psnr"], ps["ssim"]
    if is_video:
        out["temporal_consistency"] = M.temporal_consistency(samples)
    return out


def naive_ptq(teacher, quant: QuantConfig, calib_batches: list[dict]) -> nn.Module:
    """Min-max W/A quantization of a copy of the teacher, no LoRA, no training (the paper's baseline)."""
    cfg = copy.deepcopy(quant)
    cfg.w_quantizer, cfg.w_init, cfg.a_init, cfg.lora_rank, cfg.tqe, cfg.smooth_alpha = "uniform", "minmax", "minmax", 0, False, None
    cfg.lora_init, cfg.lora_quantized_base = "kaiming_zero", False
    cfg.bit_map = {p: {k: v for k, v in e.items() if k in ("w", "a")} for p, e in cfg.bit_map.items()}
    student = copy.deepcopy(teacher)
    quantize_model(student.backbone, cfg)

    def run(_):
        for b in calib_batches:
            student(b["x_t"], b["t"], b.get("cond"), b["step_index"])

    calibrate(student.backbone, run)
    set_quant_state(student.backbone, True, cfg.a_quantizer is not None and cfg.a_bits is not None)
    return student


def compare(models: dict[str, Any], teacher, spec: SamplerSpec, n: int = 64, seed: int = 1234,
            new_step: Callable[[], None] | None = None, datamodule=None) -> dict[str, dict]:
    """Metrics of every model (FP teacher first) sampling from the same noise and conditions
    (``new_step``, ``datamodule``: see ``generate``)."""
    real = real_reference(teacher)
    fp, labels = generate(teacher, spec, n, seed, new_step=new_step, datamodule=datamodule)
    rows = {"FP": quality(fp, labels, None, real, teacher.is_video)}
    for name, model in models.items():
        samples, _ = generate(model, spec, n, seed, new_step=new_step, datamodule=datamodule)
        rows[name] = quality(samples, labels, fp, real, teacher.is_video)
    return rows


#: the metrics of ``quality`` in print order, with which way is better
METRICS = {"fd_real": "lower", "class_consistency": "higher", "psnr_vs_fp": "higher", "ssim_vs_fp": "higher",
           "temporal_consistency": "near FP"}


def print_rows(rows: dict[str, dict], title: str) -> None:
    """``rows`` (model -> metric -> value) as a Rich table, one row per metric and one column per
    model, so that it fits an 80-column terminal."""
    from rich.console import Console
    from rich.table import Table

    metrics = sorted({k for r in rows.values() for k in r}, key=list(METRICS).index)
    table = Table(title=title)
    table.add_column("metric", no_wrap=True)
    table.add_column("better", no_wrap=True)
    for name in rows:
        table.add_column(name, justify="right", no_wrap=True)
    for m in metrics:
        table.add_row(m, METRICS[m], *[f"{r[m]:.4g}" if m in r else "-" for r in rows.values()])
    Console().print(table)
