"""Lightning callback: side-by-side teacher / student samples in TensorBoard.

Every ``every_n_steps`` optimizer steps (and at the end of training unless ``at_train_end=False``), on
global rank zero only, :class:`SampleLogger` draws ``num_samples`` latents with the FP teacher and the
quantized student from the *same* noise (fixed ``seed``) with the same sampler, and logs

* image models: ``{prefix}/teacher_student`` — a grid, teacher row on top, student row below;
* video models: ``{prefix}/video`` — one clip whose frames are that two-row grid (``add_video`` when
  ``moviepy<2`` is installed, else a GIF encoded with Pillow), and ``{prefix}/frames`` — every frame as
  a still grid (rows: teacher samples then student samples; columns: frames);
* ``{prefix}/mse`` — the mean squared difference between the two final latents.

Latents are shown as they are (1 or 3 channels directly, else the first 3 channels, 2 channels as the
first one in grey) with [-1, 1] mapped to [0, 1] and clamped, unless ``vae`` names a local diffusers
autoencoder folder (``mpq_lightning.models.vae``): then both are decoded to pixels first (the MSE stays
the latents').

Sampler: the teacher's ``default_scheduler`` unless ``scheduler`` (a name for ``make_scheduler`` plus
``scheduler_config``) is given. Steps: ``num_inference_steps``, else ``pl_module.quant_cfg.num_steps``
when it is > 1 (the student's timestep-wise quantizers have one entry per trained step index), else the
scheduler default. A student trained with a single shared step entry (``num_steps == 1``) gets step index
0 at every sampling step; any other mismatch maps each sampling step to the trained entry of the nearest
diffusion timestep when the data module's cache tells the training sampler and its kept steps, else
proportionally (with a warning either way).

Conditions: ``cond_kind == "class"``: labels ``class_labels`` or 0..n-1 (modulo the number of classes when
the backbone says); ``"text"``: ``trainer.datamodule.sample_conditions(n)`` → a dict of batched tensors, or a
``(cond, uncond)`` pair (text models without it are skipped, with one warning); ``"none"``: nothing.
``guidance_scale`` (``None``: the scheduler spec's) uses ``denoiser.null_cond`` as the unconditional branch
unless the data module gave one; without either, sampling falls back to scale 1 (one warning).

Sampling runs under ``torch.no_grad()``, with the models in eval mode (train mode restored after), the
student's quantizers in their training state (weights + activations as ``calib.train_act_quant``),
the trainer's precision context, and forked RNG state (training randomness is unaffected).

YAML (LightningCLI)::

    trainer:
      callbacks:
        - class_path: mpq_lightning.callbacks.SampleLogger
          init_args: {every_n_steps: 200, num_samples: 4, num_inference_steps: 20}
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
from typing import Any

import torch
from einops import rearrange
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers.logger import DummyLogger
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

__all__ = ["SampleLogger", "latents_to_images", "make_grid", "to_uint8"]


# -------------------------------------------------------------------------------------------------
# Image helpers (torchvision-free)
# -------------------------------------------------------------------------------------------------


def latents_to_images(x: Tensor) -> Tensor:
    """Latents [B, C, ...] → displayable float [B, 1 or 3, ...] in [0, 1]: 1/3 channels kept, 2 → the first,
    more → the first 3; [-1, 1] → [0, 1] with clamping."""
    c = x.shape[1]
    x = x[:, :1] if c == 2 else x[:, :3]
    return ((x.detach().float() + 1.0) / 2.0).clamp(0.0, 1.0)


def make_grid(images: Tensor, pad: int = 2, value: float = 1.0, min_side: int = 64) -> Tensor:
    """Rows × columns of images [R, N, C, H, W] → one image [C, R·(kH+2p), N·(kW+2p)] (``value``
    borders). Small images are enlarged by the integer factor k (nearest neighbour: every pixel a
    k × k block) that brings their shorter side to at least ``min_side``: 8 × 8 digits become 64 × 64
    tiles that a viewer shows at a readable size; images as large as that keep k = 1."""
    if images.ndim != 5:
        raise ValueError(f"make_grid expects [rows, cols, C, H, W], got {tuple(images.shape)}")
    k = max(1, -(-min_side // max(1, min(images.shape[-2:]))))
    if k > 1:
        images = images.repeat_interleave(k, dim=-2).repeat_interleave(k, dim=-1)
    if pad:
        images = torch.nn.functional.pad(images, (pad, pad, pad, pad), value=value)
    return rearrange(images, "r n c h w -> c (r h) (n w)")


def to_uint8(x: Tensor) -> Tensor:
    """Images in [0, 1] to 8-bit values (clamped, rounded)."""
    return (x.float().clamp(0, 1) * 255).round().to(torch.uint8)


def _gif_summary(tag: str, frames: Tensor, fps: int):
    """A TensorBoard image summary holding an animated GIF of frames [T, C, H, W] in [0, 1] (Pillow)."""
    from PIL import Image
    from tensorboard.compat.proto.summary_pb2 import Summary

    arr = to_uint8(frames).permute(0, 2, 3, 1).cpu().numpy()  # T H W C
    t, h, w, c = arr.shape
    pics = [Image.fromarray(a[..., 0] if c == 1 else a, mode="L" if c == 1 else "RGB") for a in arr]
    buf = io.BytesIO()
    pics[0].save(buf, format="GIF", save_all=True, append_images=pics[1:], duration=max(1, round(1000 / fps)), loop=0)
    image = Summary.Image(height=h, width=w, colorspace=c, encoded_image_string=buf.getvalue())
    return Summary(value=[Summary.Value(tag=tag, image=image)])


def _has_moviepy_editor() -> bool:
    """``SummaryWriter.add_video`` needs ``moviepy.editor`` (moviepy < 2); otherwise it logs nothing useful."""
    try:
        return importlib.util.find_spec("moviepy") is not None and importlib.util.find_spec("moviepy.editor") is not None
    except (ImportError, ValueError):
        return False


def trained_step_entries(datamodule, sample_timesteps, num_table_steps: int) -> Tensor | None:
    """For each sampling step (``sample_timesteps``: the sampler's timesteps; None: the training
    sampler's own), the trained table entry of the nearest diffusion timestep: entries are the
    training sampler's steps (the trajectory cache's scheduler timesteps) that the data module
    actually serves (the cache's kept steps, the data module's ``steps`` / ``step_stride``). None when
    the training sampler is unknown or its step count is not the table's (then indices are mapped
    proportionally)."""
    try:
        manifest = datamodule.manifest
        kept = list(manifest["structure"]["kept_steps"])
        train_t = torch.as_tensor(manifest["scheduler"]["timesteps"], dtype=torch.float64)
    except Exception:  # no cache behind the data module (on-the-fly stream, tests): proportional
        return None
    options = getattr(datamodule, "options", {}) or {}
    wanted, stride = options.get("steps"), int(options.get("step_stride") or 1)
    allowed = [i for i in kept if (wanted is None or i in wanted) and i % stride == 0]
    if len(train_t) != num_table_steps or not allowed:
        return None
    allowed_t = torch.as_tensor(allowed, dtype=torch.long)
    sample_t = train_t if sample_timesteps is None else torch.as_tensor(sample_timesteps).double().cpu()
    nearest = (train_t[allowed_t].view(-1, 1) - sample_t.view(1, -1)).abs().argmin(0)
    return allowed_t[nearest]


def map_to_trained_entries(denoiser, datamodule, sampler, num_sample_steps: int, num_table_steps: int | None):
    """``(model, how)``: the student to sample with ``num_sample_steps`` steps of ``sampler``, and how its
    step indices are remapped (None: not at all). With a trajectory cache, sampling step i uses the
    trained table entry of the nearest timestep: entries of steps the cache does not keep (Q-VDiT's
    OpenSora set keeps every 5th of 100) get no gradient and hold the calibration's pooled value.
    Without one, a different step count is mapped proportionally."""
    if not num_table_steps or num_table_steps <= 1:
        return denoiser, None
    sampler.set_timesteps(num_sample_steps)
    entries = trained_step_entries(datamodule, sampler.timesteps, num_table_steps)
    if entries is not None and len(entries) != num_sample_steps:  # a sampler that does not take num_sample_steps
        entries = None
    if entries is None:
        if num_sample_steps == num_table_steps:
            return denoiser, None
        return _StepIndexMap(denoiser, num_sample_steps, num_table_steps), "proportionally"
    if num_sample_steps == num_table_steps and torch.equal(entries, torch.arange(num_table_steps)):
        return denoiser, None
    trained = len(set(entries.tolist()))
    return (_StepIndexMap(denoiser, num_sample_steps, num_table_steps, entries),
            f"to the trained entry of the nearest timestep ({trained} of the {num_table_steps} entries are trained)")


class _StepIndexMap:
    """A denoiser whose ``step_index`` argument is remapped (sampling steps → trained quantizer entries):
    through ``entries`` (one table entry per sampling step) when given, else proportionally."""

    def __init__(self, denoiser, num_sample_steps: int, num_table_steps: int, entries: Tensor | None = None) -> None:
        self._denoiser = denoiser
        self._s, self._n = num_sample_steps, num_table_steps
        self._entries = entries

    def __getattr__(self, name: str):
        return getattr(self._denoiser, name)

    def _map(self, step_index):
        if step_index is None or (self._s == self._n and self._entries is None):
            return step_index
        idx = torch.as_tensor(step_index, dtype=torch.long)
        if self._entries is not None:
            return self._entries.to(idx.device)[idx]
        if self._n == 1:
            return torch.zeros_like(idx)
        return torch.round(idx.double() * (self._n - 1) / max(self._s - 1, 1)).long().clamp_(0, self._n - 1)

    def __call__(self, x_t, t, cond=None, step_index=None):
        return self._denoiser(x_t, t, cond, self._map(step_index))


# -------------------------------------------------------------------------------------------------
# Callback
# -------------------------------------------------------------------------------------------------


class SampleLogger(Callback):
    """Periodic teacher / student samples from the same noise, logged to TensorBoard.

    Args:
        every_n_steps: sample every this many optimizer steps (0: never periodically).
        num_samples: samples per model (text models: at most what ``sample_conditions`` returns).
        seed: seed of the shared initial noise (and of the sampler noise, the same for both models).
        scheduler: a ``make_scheduler`` name; ``None``: the training sampler (the trajectory cache's
            recipe, the on-the-fly stream's scheduler, else the teacher's ``default_scheduler``), with its
            configuration and step count.
        scheduler_config: constructor arguments for ``scheduler`` (ignored when it is ``None``).
        num_inference_steps: sampling steps; ``None``: the training sampler's, or with another
            ``scheduler`` ``quant_cfg.num_steps`` if > 1, else that scheduler's default.
        guidance_scale: classifier-free guidance scale; ``None``: the training sampler's.
        class_labels: labels for class-conditional models (``None``: 0..n-1).
        eta: DDIM's η; ``None``: the training sampler's.
        at_train_start: also sample once when training starts (after calibration).
        at_train_end: also sample when training ends.
        vae: a local diffusers autoencoder folder (e.g. stabilityai/sd-vae-ft-ema for OpenSora v1.0): samples
            are logged decoded to pixels; loaded on first use on the teacher's device.
        vae_scaling_factor: overrides the autoencoder config's scaling factor.
        fps: frame rate of logged videos.
        log_frame_grid: for video models, also log all frames as a still grid.
        prefix: tag prefix.
    """

    def __init__(
        self,
        every_n_steps: int = 500,
        num_samples: int = 4,
        seed: int = 0,
        scheduler: str | None = None,
        scheduler_config: dict[str, Any] | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        class_labels: list[int] | None = None,
        eta: float | None = None,
        at_train_start: bool = False,
        at_train_end: bool = True,
        fps: int = 4,
        log_frame_grid: bool = True,
        prefix: str = "samples",
        vae: str | None = None,
        vae_scaling_factor: float | None = None,
    ) -> None:
        super().__init__()
        if vae is not None:
            from mpq_lightning.models.vae import vae_class

            vae_class(vae, key="SampleLogger.vae")
        if vae_scaling_factor is not None and not vae_scaling_factor > 0:
            raise ValueError(f"SampleLogger.vae_scaling_factor must be > 0, got {vae_scaling_factor}")
        if every_n_steps < 0:
            raise ValueError(f"every_n_steps must be >= 0, got {every_n_steps}")
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if num_inference_steps is not None and num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        self.every_n_steps = every_n_steps
        self.num_samples = num_samples
        self.seed = seed
        self.scheduler = scheduler
        self.scheduler_config = dict(scheduler_config or {})
        self.num_inference_steps = num_inference_steps
        self.guidance_scale = guidance_scale
        self.class_labels = list(class_labels) if class_labels is not None else None
        self.eta = eta
        self.at_train_start = at_train_start
        self.at_train_end = at_train_end
        self.fps = fps
        self.log_frame_grid = log_frame_grid
        self.prefix = prefix
        self.vae, self.vae_scaling_factor, self._vae = vae, vae_scaling_factor, None
        self._last_step = -1
        self._warned: set[str] = set()

    # -- hooks ---------------------------------------------------------------------------------
    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.vae is not None:  # on every rank, before training: not at the first sample, on rank 0 alone
            from mpq_lightning.models.vae import check_vae

            check_vae(self.vae, pl_module.teacher, key="SampleLogger.vae")

    def on_train_start(self, trainer, pl_module) -> None:
        if self.at_train_start:
            self._maybe_log(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0:
            self._maybe_log(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.at_train_end:
            self._maybe_log(trainer, pl_module)

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(message)

    def _maybe_log(self, trainer, pl_module) -> None:
        from mpq_lightning.module import full_parameters

        step = trainer.global_step
        if step == self._last_step:
            return
        self._last_step = step
        with full_parameters(trainer):  # FSDP: every rank gathers the parameters, rank zero samples
            if trainer.is_global_zero:
                self._log_samples(trainer, pl_module, step)

    def _log_samples(self, trainer, pl_module, step: int) -> None:
        # (fast_dev_run's DummyLogger answers every attribute with a no-op returning None: not a writer)
        writers = [lg.experiment for lg in trainer.loggers
                   if not isinstance(lg, DummyLogger) and hasattr(getattr(lg, "experiment", None), "add_image")]
        if not writers:
            self._warn_once("logger", "SampleLogger: no logger with add_image (e.g. TensorBoardLogger); not sampling")
            return
        if getattr(pl_module, "_calibrated", True) is False:
            self._warn_once("calib", "SampleLogger: the student is not calibrated yet; not sampling")
            return
        result = self.generate(pl_module, trainer.datamodule if _has_datamodule(trainer) else None, trainer)
        if result is None:
            return
        teacher, student = result
        mse = float((teacher - student).pow(2).mean())  # of the latents
        if self.vae is not None:
            teacher, student = self.decode(pl_module, teacher, student)
        self._log(writers, teacher, student, step, video=pl_module.teacher.is_video, mse=mse)

    def decode(self, pl_module, teacher: Tensor, student: Tensor) -> tuple[Tensor, Tensor]:
        """Both sample sets decoded to pixels with ``vae`` (loaded once, on the teacher's device)."""
        from mpq_lightning.models.vae import decode_latents, load_vae

        if self._vae is None:
            device = next(iter(pl_module.teacher.parameters())).device
            self._vae = load_vae(self.vae, pl_module.teacher, device, key="SampleLogger.vae")
        both = decode_latents(self._vae, torch.cat([teacher, student]), len(teacher), self.vae_scaling_factor)
        return both[: len(teacher)], both[len(teacher) :]

    # -- sampling ------------------------------------------------------------------------------
    def _sampler(self, teacher, datamodule, table_steps: int | None):
        """``(make_scheduler, steps, guidance_scale, eta)``: the training sampler
        (``compare.training_sampler``) where this callback leaves a choice unset."""
        from mpq_lightning.compare import training_sampler
        from mpq_lightning.models.sampling import make_scheduler

        spec = training_sampler(teacher, datamodule, table_steps)
        if self.scheduler is None:
            make = lambda: make_scheduler(spec.scheduler, **(spec.scheduler_config or {}))  # noqa: E731
            fallback = spec.num_inference_steps
        else:  # another sampler: the table's step count unless told
            make = lambda: make_scheduler(self.scheduler, **self.scheduler_config)  # noqa: E731
            fallback = (table_steps if table_steps and table_steps > 1 else None) or make().num_inference_steps \
                or spec.num_inference_steps
        steps = self.num_inference_steps or fallback
        if not steps:
            raise ValueError("SampleLogger: set num_inference_steps (the scheduler has no default step count)")
        scale = spec.guidance_scale if self.guidance_scale is None else self.guidance_scale
        return make, int(steps), float(scale), spec.eta if self.eta is None else float(self.eta)

    def _conditions(self, teacher, datamodule, n: int, device) -> tuple[dict | None, dict | None] | None:
        from mpq_lightning.models.sampling import class_condition

        kind = teacher.cond_kind
        if kind == "none":
            return {}, None
        if kind == "class":
            chosen = self.class_labels if self.class_labels is not None else list(range(n))
            labels = torch.tensor(chosen, dtype=torch.long)
            labels = labels[:n] if labels.numel() >= n else labels.repeat(-(-n // labels.numel()))[:n]
            cond = class_condition(teacher, labels)
            if cond is not None:
                return move_data_to_device(cond, device), None
        fn = getattr(datamodule, "sample_conditions", None) if datamodule is not None else None
        if not callable(fn):
            self._warn_once(
                "cond", f"SampleLogger: {type(teacher).__name__} needs {kind} conditions and the data module has no "
                "`sample_conditions(n)`; not sampling",
            )
            return None
        out = fn(n)
        cond, uncond = out if isinstance(out, tuple) else (out, None)
        cond = move_data_to_device(dict(cond), device)
        return cond, (move_data_to_device(dict(uncond), device) if uncond is not None else None)

    @torch.no_grad()
    def generate(self, pl_module, datamodule=None, trainer=None) -> tuple[Tensor, Tensor] | None:
        """Sample with teacher and student from the same noise; returns the final latents (teacher, student)
        on the CPU as float32, or None when the conditions are unavailable."""
        from mpq_lightning.models.sampling import sample

        teacher, student = pl_module.teacher, pl_module.student
        device = next(iter(teacher.parameters())).device
        quant = getattr(pl_module, "quant_cfg", None)
        table_steps = int(getattr(quant, "num_steps", 0) or 0) or None
        make_sched, steps, scale, eta = self._sampler(teacher, datamodule, table_steps)
        model_student, how = map_to_trained_entries(student, datamodule, make_sched(), steps, table_steps)
        if how is not None:
            self._warn_once(
                "steps", f"SampleLogger: sampling with {steps} steps, the student's timestep quantizers have "
                f"{table_steps} entries; step indices are mapped {how}",
            )

        conds = self._conditions(teacher, datamodule, self.num_samples, device)
        if conds is None:
            return None
        cond, uncond = conds
        n = next(iter(cond.values())).shape[0] if cond else self.num_samples
        if teacher.cond_kind == "none":
            scale = 1.0
        if scale != 1.0 and uncond is None:
            try:
                uncond = teacher.null_cond(cond)
            except ValueError:
                self._warn_once(
                    "cfg", f"SampleLogger: {type(teacher).__name__} has no null condition; sampling without CFG"
                )
                scale = 1.0

        noise = torch.randn((n, *teacher.latent_shape), generator=torch.Generator().manual_seed(self.seed)).to(device)

        precision = getattr(trainer, "precision_plugin", None) if trainer is not None else None
        forward_ctx = getattr(precision, "forward_context", None) or contextlib.nullcontext
        fork_devices = [device] if device.type == "cuda" else []
        outs = []
        with torch.random.fork_rng(devices=fork_devices), _eval_mode(teacher, student), _train_quant_state(pl_module):
            for model in (teacher, model_student):
                gen = torch.Generator(device=device).manual_seed(self.seed + 1)
                if callable(mark := getattr(pl_module, "mark_cudagraph_step", None)):
                    mark()  # each sampling run is its own CUDA-graph step (QATModule.mark_cudagraph_step)
                with forward_ctx():
                    out = sample(model, make_sched(), noise, cond=cond or None, uncond=uncond, guidance_scale=scale,
                                 num_inference_steps=steps, generator=gen, eta=eta)
                outs.append(out.float().cpu())
        return outs[0], outs[1]

    # -- logging -------------------------------------------------------------------------------
    def _log(self, writers, teacher: Tensor, student: Tensor, step: int, video: bool, mse: float | None = None) -> None:
        mse = float((teacher - student).pow(2).mean()) if mse is None else mse
        t_img, s_img = latents_to_images(teacher), latents_to_images(student)
        for writer in writers:
            if hasattr(writer, "add_scalar"):
                writer.add_scalar(f"{self.prefix}/mse", mse, step)
        if not video:
            grid = make_grid(torch.stack([t_img, s_img]))
            for writer in writers:
                writer.add_image(f"{self.prefix}/teacher_student", grid, step, dataformats="CHW")
            return
        # [N, C, F, H, W] → clip of F frames, each the 2 × N grid
        pair = rearrange(torch.stack([t_img, s_img]), "r n c f h w -> f r n c h w")
        clip = torch.stack([make_grid(frame) for frame in pair])  # [F, C, H', W']
        moviepy = _has_moviepy_editor()
        for writer in writers:
            if moviepy and hasattr(writer, "add_video"):
                writer.add_video(f"{self.prefix}/video", clip[None], step, fps=self.fps)
            elif hasattr(writer, "_get_file_writer"):
                writer._get_file_writer().add_summary(_gif_summary(f"{self.prefix}/video", clip, self.fps), step)
        if self.log_frame_grid or not any(hasattr(w, "_get_file_writer") or moviepy for w in writers):
            frames = rearrange(torch.cat([t_img, s_img]), "r c f h w -> r f c h w")  # rows: samples, cols: frames
            grid = make_grid(frames)
            for writer in writers:
                writer.add_image(f"{self.prefix}/frames", grid, step, dataformats="CHW")


def _has_datamodule(trainer) -> bool:
    try:
        return trainer.datamodule is not None
    except AttributeError:
        return False


@contextlib.contextmanager
def _eval_mode(*models):
    modes = [m.training for m in models]
    try:
        for m in models:
            m.eval()
        yield
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)


@contextlib.contextmanager
def _train_quant_state(pl_module):
    """The student's quantizers as in training (weights on, activations as ``calib.train_act_quant``);
    the flags are restored afterwards."""
    try:
        from mpq_lightning.quant.layers import QuantLayer
    except ImportError:  # pragma: no cover
        yield
        return
    layers = [m for m in pl_module.student.modules() if isinstance(m, QuantLayer)]
    saved = [(m.weight_quant, m.act_quant) for m in layers]
    calib = getattr(pl_module, "calib_cfg", None)
    try:
        if calib is not None:
            act = bool(getattr(calib, "train_act_quant", True))
            for m in layers:
                m.weight_quant, m.act_quant = True, act
        yield
    finally:
        for m, (w, a) in zip(layers, saved):
            m.weight_quant, m.act_quant = w, a
