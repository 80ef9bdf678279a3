"""QATModule: the fake-quantized student and the frozen FP teacher in one LightningModule.

    batch (x_t, t, step_index, cond[, teacher_output])
      ├─ teacher (frozen, eval, no grad) ─► ε_fp, feature_fp
      └─ student (quantize_model(copy))  ─► ε_q,  feature_q
    loss = mse(ε_q, ε_fp) + TRD(feature) + MTRD(feature, queue) + TMD(ε)     (each switchable)

Checkpoints hold only what training changes (LoRA, quantizer state, TQE, residual scales, ...):
the teacher and the student's frozen FP weights are stripped on save and refilled from the
teacher weights on load, so a checkpoint is a small fraction of the model.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
from dataclasses import MISSING, asdict, dataclass, field, fields
from multiprocessing.reduction import ForkingPickler
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from torch import Tensor, nn

from .checks import check_numbers
from .losses import MemoryRelationLoss, TimeSmoothedRelationLoss, output_mse, tmd_loss
from .optim import FlatAdamW
from .quant import QuantConfig, calibrate, checkpoint_with_step_index, quantize_model, set_quant_state
from .quant.layers import QuantLayer
from .quant.quantizers import TimestepActQuantizer
from .quant.functional import check_compile_support

# ---------------------------------------------------------------------------------------------
# Configuration (typed dataclasses: the YAML schema, see configs/)
# ---------------------------------------------------------------------------------------------


@dataclass
class LossConfig:
    """Which distillation terms are on and their weights (mpqdm.md §2.5, §3.8, §4.3; qvdit.md §5).

    Args:
        mse_weight: weight of the ε-MSE between student and teacher outputs
        mse_reduction: sum (EfficientDM, MPQ-DM) | mean (Q-VDiT)
        trd: MPQ-DM's time-smoothed relation distillation on the feature site
        trd_weight: weight of TRD
        trd_window: consecutive sampler steps smoothed over; > 1 needs an ordered step stream
            (OnTheFlyDataModule)
        trd_tau: TRD softmax temperature
        trd_detach_student: no gradient through the student's relation (the release); false: gradient
        trd_chunk_size: rows of the pixel-similarity matrix per block (memory only, same result); null: all
        trd_anchors: random query pixels per step (memory option, not in the release); null: all
        mtrd: MPQ-DMv2's memory-based relation distillation against the time-aware pixel queue (the
            MemoryQueue callback is added for it)
        mtrd_weight: weight of MTRD
        mtrd_tau_c: contrast temperature of the cosine similarities
        mtrd_tau_kd: distillation temperature (the loss is multiplied by its square)
        mtrd_anchors: current pixels used as queries; null: all
        mtrd_memory_samples: queue entries drawn per step
        mtrd_sampling: time_wise (an equal share from every filled step slot, the v2 figure) | uniform
        mtrd_pixels_per_step: capacity of each sampler step's slot in the queue
        tmd: Q-VDiT's temporal maintenance distillation (frame-relation KL on the output; video only)
        tmd_weight: weight of TMD (Q-VDiT: 100 with mean reduction)
        tmd_tau: TMD softmax temperature
        tmd_legacy_reshape: reproduce the release's channel-major reshape (qvdit.md §5.3)
    """

    mse_weight: float = 1.0
    mse_reduction: str = "sum"
    trd: bool = False
    trd_weight: float = 100.0
    trd_window: int = 1
    trd_tau: float = 1.0
    trd_detach_student: bool = False
    trd_chunk_size: int | None = None
    trd_anchors: int | None = None
    mtrd: bool = False
    mtrd_weight: float = 0.1
    mtrd_tau_c: float = 0.1
    mtrd_tau_kd: float = 1.0
    mtrd_anchors: int | None = 1024
    mtrd_memory_samples: int = 1024
    mtrd_sampling: str = "time_wise"
    mtrd_pixels_per_step: int = 64
    tmd: bool = False
    tmd_weight: float = 1.0
    tmd_tau: float = 1.0
    tmd_legacy_reshape: bool = False

    def __post_init__(self) -> None:
        if self.mse_reduction not in ("sum", "mean"):
            raise ValueError(f"loss.mse_reduction must be 'sum' or 'mean', got {self.mse_reduction!r}")
        if self.trd_window < 1:
            raise ValueError(f"loss.trd_window must be >= 1, got {self.trd_window}")
        if self.mtrd_sampling not in ("time_wise", "uniform"):
            raise ValueError(f"loss.mtrd_sampling must be 'time_wise' or 'uniform', got {self.mtrd_sampling!r}")
        # judged here, when the config is parsed: not in the first training step, after the cache
        # and calibration, with the run folder already written
        check_numbers("model.loss", vars(self), nonnegative=("mse_weight", "trd_weight", "mtrd_weight", "tmd_weight"),
                       positive=("trd_tau", "mtrd_tau_c", "mtrd_tau_kd", "tmd_tau"),
                       counts=("mtrd_memory_samples", "mtrd_pixels_per_step"),
                       optional_counts=("trd_chunk_size", "trd_anchors", "mtrd_anchors"))


@dataclass
class OptimConfig:
    """AdamW parameter groups as the recipes need them (EfficientDM §2.6, Q-VDiT §6.3).

    Args:
        lora_lr: learning rate of every LoRA adapter; null: EfficientDM's scale-aware rate per layer,
            mean |weight step| / lora_lr_div
        lora_lr_div: divisor of the scale-aware LoRA rate (lora_lr null)
        w_scale_lr: learning rate of the weight quantizers' parameters (steps, zero points)
        a_scale_lr: learning rate of the activation quantizers' parameters (TALSQ per-step tables)
        tqe_lr: learning rate of Q-VDiT's token-aware estimator (TQE corrections)
        residual_lr: learning rate of FZ-RMQ's binary residual scales
        other_lr: learning rate of any other trainable student parameter
        weight_decay: AdamW weight decay, every group
        schedule: learning-rate schedule after warm-up: linear (decay to 0) | cosine | constant
        warmup_steps: linear warm-up steps
        fused: AdamW implementation: true = torch's fused kernel per group, false = foreach, null = fused
            when every trainable tensor is floating point on CPU or CUDA
        flat_params: one contiguous tensor per parameter group, stepped at once (the parameters become
            its views); null = on a CPU unless the strategy keeps the parameters' storage (FSDP,
            DeepSpeed), off on a GPU; false = AdamW over each tensor
    """

    lora_lr: float | None = None
    lora_lr_div: float = 2500.0
    w_scale_lr: float = 1e-6
    a_scale_lr: float = 5e-4
    tqe_lr: float = 1e-5
    residual_lr: float = 1e-6
    other_lr: float = 1e-5
    weight_decay: float = 0.01
    schedule: str = "linear"
    warmup_steps: int = 0
    fused: bool | None = None
    flat_params: bool | None = None

    def __post_init__(self) -> None:
        if self.schedule not in ("linear", "cosine", "constant"):
            raise ValueError(f"optim.schedule must be 'linear', 'cosine' or 'constant', got {self.schedule!r}")
        check_numbers("model.optim", vars(self), nonnegative=("w_scale_lr", "a_scale_lr", "tqe_lr", "residual_lr",
                                                             "other_lr", "weight_decay", "warmup_steps"),
                       positive=("lora_lr_div",), optional_nonnegative=("lora_lr",))


@dataclass
class CalibConfig:
    """Quantizer initialisation from the first batches of the training stream (once, in setup).

    Args:
        num_batches: batches of the data module's calibration stream that initialise the quantizers
        smooth_momentum: moved to quant.smooth_momentum (kept so that saved configs parse; must be null)
        train_act_quant: train with activation quantization on (EfficientDM, MPQ-DM); false keeps
            activations in FP during training (Q-VDiT); sampling for evaluation quantizes them
    """

    num_batches: int = 4
    smooth_momentum: float | None = None
    train_act_quant: bool = True

    def __post_init__(self) -> None:
        check_numbers("model.calib", vars(self), counts=("num_batches",))
        if self.smooth_momentum is not None:
            raise ValueError("calib.smooth_momentum moved to model.quant.smooth_momentum (a quantization setting, "
                             "beside quant.smooth_alpha)")


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


COMPILE_SCOPES = ("model", "blocks")  # QATModule(compile_scope=...)
# QATModule(compile_mode=...): torch.compile's modes; the last two replay CUDA graphs on a GPU
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs", "reduce-overhead", "max-autotune")
#: why DeepSpeed ZeRO-3 is refused (by the CLI by name, and at fit start however configured)
ZERO3_REFUSAL = ("trainer.strategy: DeepSpeed ZeRO stage 3 partitions the parameters between forwards and would drop "
                 "the quantizer calibration; use deepspeed_stage_2 (optionally _offload) or fsdp")


def _data_steps(datamodule, teacher) -> tuple[int | None, str]:
    """(sampler steps of the trajectories a data module serves, the config key that sets them), read
    without generating anything; (None, "") when unknown."""
    from .data.trajectories import MANIFEST, sampler_steps

    stream = getattr(datamodule, "stream_args", None)  # on-the-fly trajectories (its recipe holds conditions only)
    recipe = getattr(datamodule, "recipe", None)
    if isinstance(stream, dict):
        return (sampler_steps(stream.get("scheduler"), stream.get("num_inference_steps"), teacher),
                "data.init_args.num_inference_steps")
    if recipe is not None and hasattr(recipe, "num_inference_steps"):
        return (sampler_steps(recipe.scheduler, recipe.num_inference_steps, teacher),
                "data.init_args.recipe.num_inference_steps")
    cache_dir = getattr(datamodule, "cache_dir", None)
    if cache_dir is not None and (Path(cache_dir) / MANIFEST).is_file():
        manifest = json.loads((Path(cache_dir) / MANIFEST).read_text())
        return manifest.get("recipe", {}).get("num_inference_steps"), f"the cache {cache_dir}"
    return None, ""


def full_parameters(trainer, writeback: bool = False):
    """A context in which every parameter is whole, for module calls outside the strategy's forward
    (calibration, the sampling callbacks): FSDP keeps parameters sharded between forwards. Under FSDP
    it gathers them (a collective: enter it on every rank) and, with ``writeback``, keeps what was
    written into them in place; with any other strategy it does nothing."""
    model = getattr(getattr(trainer, "strategy", None), "model", None)
    if model is None or not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return contextlib.nullcontext()
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    if not any(isinstance(m, FSDP) for m in model.modules()):
        return contextlib.nullcontext()
    return FSDP.summon_full_params(model, writeback=writeback)


def state_hash(module: nn.Module) -> str:
    """Short sha256 over a module's state (names, shapes and bytes): the teacher's identity."""
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        h.update(str(tuple(v.shape)).encode())
        h.update(v.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes() if v.numel() else b"")
    return h.hexdigest()[:16]


def _rebuild_generator(device: str, state: bytes) -> torch.Generator:
    generator = torch.Generator(device)
    generator.set_state(torch.frombuffer(bytearray(state), dtype=torch.uint8))
    return generator


def _reduce_generator(generator: torch.Generator):
    """How multiprocessing pickles a ``torch.Generator``: its state as bytes. Torch's own reduce makes
    a temporary state tensor; pickled into a spawned process (Lightning's ``ddp_spawn``) under torch's
    ``file_descriptor`` sharing strategy, that tensor travels as a file descriptor which is closed
    when the pickling ends, before the child starts, and the child read whatever took the number (the
    spawn pipe): "unable to resize file ... Invalid argument (22)", the parent waiting for good. The
    relation losses and the memory queue hold generators."""
    return _rebuild_generator, (str(generator.device), generator.get_state().numpy().tobytes())


ForkingPickler.register(torch.Generator, _reduce_generator)


class _FeatureHook:
    """Keeps the output of one module (the relation-loss feature site)."""

    def __init__(self, module: nn.Module) -> None:
        self.value: Tensor | None = None
        self.module, self.handle = module, None
        self.attach()

    def attach(self) -> None:
        """Register the hook unless it is there: Lightning's DeepSpeed strategy strips every module's
        hooks before a stand-alone validation (``remove_module_hooks``)."""
        if self.handle is None or self.handle.id not in self.module._forward_hooks:
            self.handle = self.module.register_forward_hook(self._hook)

    def _hook(self, module, args, output) -> None:
        self.value = output[0] if isinstance(output, (tuple, list)) else getattr(output, "sample", output)


# ---------------------------------------------------------------------------------------------
# The module
# ---------------------------------------------------------------------------------------------


def _drop_teacher_keys(module: "QATModule", state_dict: dict, prefix: str, local_metadata) -> None:
    for k in [k for k in state_dict if k.startswith(prefix) and module.from_teacher(k.removeprefix(prefix))]:
        del state_dict[k]


def fill_deepspeed_micro_batch(strategy, datamodule) -> None:
    """Set DeepSpeed's ``train_micro_batch_size_per_gpu`` from ``datamodule.batch_size`` (1 without
    one) when its config lacks it; any other strategy is left alone."""
    config = getattr(strategy, "config", None)
    if type(strategy).__name__ != "DeepSpeedStrategy" or not isinstance(config, dict):
        return
    config.setdefault("train_micro_batch_size_per_gpu", int(getattr(datamodule, "batch_size", None) or 1))


class QATModule(L.LightningModule):
    """Quantization-aware distillation of a diffusion backbone.

    Args:
        model: registry name (``mpq_lightning.models.list_models()``), e.g. ``tiny-stdit``.
        model_kwargs: keyword arguments of the registry builder (``ckpt_path``, ``path``, ``config``).
        quant: what to quantize and how (``QuantConfig``); ``quant.keep_fp`` / ``quant.bit_map``
            default to the backbone's paper defaults when ``use_model_defaults``.
        use_model_defaults: add the backbone's default keep-FP list and bit map to ``quant``.
        loss, optim, calib: see the dataclasses above.
        gradient_checkpointing: recompute the student's blocks in backward (XL models at batch 4).
        compile_model: run the student and teacher backbones through ``torch.compile`` once the
            quantizers are calibrated (quantizer math fused into the graphs; single device or DDP).
            Needs a C++ compiler on CPU, Triton on CUDA.
        compile_scope: what ``compile_model`` compiles. ``"model"``: each backbone whole, one graph
            (the fastest steps; the cold compile grows with depth). ``"blocks"``: each member of the
            backbone's outermost ``nn.ModuleList`` s (the repeated transformer / UNet blocks), the rest
            eager; blocks alike share one compiled graph, so the cold compile does not grow with depth.
        compile_mode: ``torch.compile``'s mode for ``compile_model``. ``"reduce-overhead"`` (and
            ``"max-autotune"``) replay CUDA graphs on a GPU, which takes the kernel-launch cost off a
            small model's step; each training and validation step marks a new CUDA-graph step. On a
            CPU they compile as ``"default"``.
        compile_options: inductor settings for ``compile_model`` on top of the mode's, e.g.
            ``{"cpp_wrapper": true}`` (the compiled graphs' wrapper code in C++, not Python: less
            per-call overhead). Keys are ``torch._inductor.config`` names, checked up front.
    """

    def __init__(
        self,
        model: str = "tiny-stdit",
        model_kwargs: dict[str, Any] | None = None,
        quant: QuantConfig = QuantConfig(w_bits=3, a_bits=6, lora_rank=4),
        use_model_defaults: bool = True,
        loss: LossConfig = LossConfig(),
        optim: OptimConfig = OptimConfig(),
        calib: CalibConfig = CalibConfig(),
        gradient_checkpointing: bool = False,
        compile_model: bool = False,
        compile_scope: Literal["model", "blocks"] = "model",
        compile_mode: Literal["default", "max-autotune-no-cudagraphs", "reduce-overhead", "max-autotune"] = "default",
        compile_options: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        from .models import build

        if compile_scope not in COMPILE_SCOPES:
            raise ValueError(f"model.compile_scope must be one of {COMPILE_SCOPES}, got {compile_scope!r}")
        if compile_mode not in COMPILE_MODES:
            raise ValueError(f"model.compile_mode must be one of {COMPILE_MODES}, got {compile_mode!r}")
        if compile_mode != "default" and not compile_model:
            raise ValueError(f"model.compile_mode={compile_mode} needs model.compile_model true")
        if compile_options:
            if not compile_model:
                raise ValueError("model.compile_options needs model.compile_model true")
            import torch._inductor.config as inductor_config

            known = inductor_config.get_config_copy()
            if unknown := sorted(k for k in compile_options if k not in known):
                raise ValueError(f"model.compile_options: {unknown} are not torch._inductor.config settings "
                                 f"(e.g. cpp_wrapper, triton.cudagraphs, max_autotune)")
        self.compile_options = dict(compile_options or {})
        self.save_hyperparameters()
        self.model_name, self.loss_cfg, self.optim_cfg, self.calib_cfg = model, loss, optim, calib
        self.compile_model, self.compile_scope, self.compile_mode = compile_model, compile_scope, compile_mode
        # settled here, not in every step's mark_cudagraph_step
        self._replays_cudagraphs = bool(compile_model and self.inductor_options().get("triton.cudagraphs"))
        try:
            teacher = build(model, **(model_kwargs or {}))
        except TypeError as error:  # a misspelt argument of the model's builder or backbone config
            if "unexpected keyword argument" not in str(error):
                raise
            raise TypeError(f"model.model_kwargs of model {model!r}: {error}") from error
        if use_model_defaults:
            quant = copy.deepcopy(quant)
            quant.keep_fp = list(dict.fromkeys(list(teacher.default_keep_fp) + list(quant.keep_fp)))
            defaults = {p: dict(v) for p, v in teacher.default_bit_map.items()}
            for entry in defaults.values():  # the papers' 8-bit layers keep a plain uniform quantizer
                if entry.get("w", 0) >= 8 and quant.w_quantizer != "uniform":
                    entry.setdefault("w_quantizer", "uniform")
            quant.bit_map = {**defaults, **quant.bit_map}
        self.quant_cfg = quant
        self.teacher_hash = state_hash(teacher)
        self.teacher = teacher.eval().requires_grad_(False)
        student = copy.deepcopy(teacher)
        quantize_model(student.backbone, quant, layer_info=self._layer_info_fn(teacher))
        self.student = student.eval()
        self.gradient_checkpointing = gradient_checkpointing
        if gradient_checkpointing:
            self._enable_checkpointing(self.student.backbone)
        self._fp_keys = {f"student.{k}" for k in teacher.state_dict()}
        # checkpoints carry neither the teacher nor the student's frozen FP weights, so strategies that load
        # module states before on_load_checkpoint (FSDP, DeepSpeed) must not demand them; on_load_checkpoint
        # refills them and checks every other key itself
        self.strict_loading = False
        # DDP re-broadcasts every buffer from rank 0 before each forward. OOLRI's base weights are weight-sized,
        # derived from the state and rebuilt on every state load (sync_student_from_rank0, resume): keep
        # them out of that per-step broadcast
        self._ddp_params_and_buffers_to_ignore = [
            f"student.{n}" for n, _ in self.student.named_buffers() if n.rsplit(".", 1)[-1] == "base_weight"
        ]
        self._feat_t = _FeatureHook(self.teacher.backbone.get_submodule(teacher.feature_site))
        self._feat_s = _FeatureHook(self.student.backbone.get_submodule(teacher.feature_site))
        self.feature_channel_dim = 1 if teacher.feature_layout.split()[1] == "c" else -1
        self.trd = (
            TimeSmoothedRelationLoss(
                window=loss.trd_window, tau=loss.trd_tau, weight=loss.trd_weight, detach_student=loss.trd_detach_student,
                chunk_size=loss.trd_chunk_size, anchors=loss.trd_anchors, channel_dim=self.feature_channel_dim, seed=0,
            )
            if loss.trd else None
        )
        self.mtrd = (
            MemoryRelationLoss(
                tau_c=loss.mtrd_tau_c, tau_kd=loss.mtrd_tau_kd, weight=loss.mtrd_weight, anchors=loss.mtrd_anchors,
                memory_samples=loss.mtrd_memory_samples, sampling=loss.mtrd_sampling,
                channel_dim=self.feature_channel_dim, seed=0,
            )
            if loss.mtrd else None
        )
        if loss.tmd and not teacher.is_video:
            raise ValueError(f"loss.tmd needs a video backbone; {model!r} is an image model")
        self._calibrated = False
        self.resuming = False  #: set by MPQCLI when fit restores a checkpoint (see on_fit_start)
        self._step_fill: Tensor | None = None  # see untrained_step_fill
        #: the sampler the student was trained on (``compare.training_sampler`` in the form of a Denoiser's
        #: ``default_scheduler``: name, config, num_inference_steps, guidance_scale, eta), saved in every
        #: checkpoint as ``mpq_sampler`` and written into exports, whose step tables belong to it
        self.trained_sampler: dict | None = None
        #: optimiser steps of the learning-rate schedule (None: constant), this fit's and the resumed checkpoint's
        self._schedule_steps: int | None = None
        self._resumed_schedule_steps: int | None = None
        self._loss_finite: Tensor | None = None  # since the last optimiser step, see check_finite
        self._loss_terms: dict[str, Tensor] | None = None

    @staticmethod
    def _enable_checkpointing(backbone: nn.Module) -> None:
        """Activation checkpointing of the student's blocks (our STDiT, or diffusers' switch)."""
        # recomputation in backward needs the step index of the forward (TALSQ): checkpoint_with_step_index
        if hasattr(backbone, "grad_checkpointing"):
            backbone.grad_checkpointing = True
            backbone.grad_checkpointing_func = checkpoint_with_step_index
        elif hasattr(backbone, "enable_gradient_checkpointing"):
            backbone.enable_gradient_checkpointing(checkpoint_with_step_index)
        else:
            raise ValueError(f"gradient_checkpointing: {type(backbone).__name__} has no checkpointing switch")

    @staticmethod
    def _layer_info_fn(denoiser):
        """What TQE and the batch-pooled dynamic quantizer need to know of a layer: its kind, the token
        layout of its input and the sizes of the frame and per-frame token axes."""

        def info(name: str) -> dict:
            kind = denoiser.layer_kind(name)
            out = {"kind": kind}
            if denoiser.token_layouts.get(kind):
                out["token_layout"] = denoiser.token_layouts[kind]
            if denoiser.num_frames:
                out["num_frames"] = denoiser.num_frames
            if denoiser.tokens_per_frame:
                out["tokens_per_frame"] = denoiser.tokens_per_frame
            return out

        return info

    # -- Lightning plumbing --------------------------------------------------------------------
    def configure_callbacks(self):
        if self.mtrd is None:
            return []
        from .callbacks.memory_queue import MemoryQueue

        return [MemoryQueue(num_steps=self.quant_cfg.num_steps, pixels_per_step=self.loss_cfg.mtrd_pixels_per_step)]

    def train(self, mode: bool = True):
        """Teacher and student backbones always run in eval mode: distillation compares them on the
        same inputs, so training-only behaviour (dropout, OpenSora's caption dropout) stays off.
        What trains is the quantizer state and adapters, which have no train/eval difference."""
        super().train(mode)
        self.teacher.eval()
        self.student.eval()
        return self

    def setup(self, stage: str) -> None:
        """Runs before the strategy's own setup. DeepSpeed needs a micro-batch size in its config
        (for its throughput logging and batch bookkeeping); Lightning reads it off the dataloader's
        ``batch_sampler``, which our loaders do not have (they yield whole batches,
        ``batch_size=None``), so it is taken from the data module's ``batch_size`` here unless the
        strategy's config sets ``train_micro_batch_size_per_gpu`` itself. DeepSpeed's engine also
        saves the module's state dict itself (``on_save_checkpoint`` does not see it) and leaves out
        only frozen *parameters*: the teacher's buffers would stay, so under DeepSpeed the module's
        state dict drops what ``on_save_checkpoint`` drops (:meth:`leave_teacher_out_of_state_dicts`)."""
        fill_deepspeed_micro_batch(self.trainer.strategy, self.trainer.datamodule)
        if type(self.trainer.strategy).__name__ == "DeepSpeedStrategy":
            self.leave_teacher_out_of_state_dicts()

    def leave_teacher_out_of_state_dicts(self) -> None:
        """From now on ``state_dict()`` leaves out the teacher and the student's frozen FP weights (the
        keys ``on_save_checkpoint`` strips; a load restores them from the teacher), and checkpoints
        carry the student's other frozen parameters as ``mpq_frozen_params``: DeepSpeed's
        ``exclude_frozen_parameters`` (which keeps the teacher's weights out) drops every parameter
        without a gradient, calibrated ones included (weight zero points when
        ``quant.learn_w_zero_point`` is false), and a resume does not calibrate again. Idempotent."""
        hook = getattr(self, "_teacher_out_hook", None)
        if hook is None or hook.id not in self._state_dict_hooks:  # (stripped like the feature hooks)
            self._teacher_out_hook = self.register_state_dict_post_hook(_drop_teacher_keys)

    def from_teacher(self, key: str) -> bool:
        """Whether state-dict entry ``key`` comes from the teacher on a load (the teacher itself and the
        student's frozen FP weights), so that checkpoints leave it out."""
        return key.startswith("teacher.") or key in self._fp_keys

    def _frozen_student_params(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.named_parameters() if not p.requires_grad and not self.from_teacher(n)}

    def frozen_student_state(self) -> dict[str, Tensor]:
        """The student's parameters without a gradient that are not FP weights (calibrated quantizer
        state such as frozen zero points), on the CPU, by their names in this module."""
        return {n: p.detach().cpu().clone() for n, p in self._frozen_student_params().items()}

    def check_frozen_student_state(self, state: dict[str, Tensor], source: str = "checkpoint") -> None:
        """Refuse a :meth:`frozen_student_state` whose names or shapes are not this module's."""
        mine = self._frozen_student_params()
        want = set(mine)
        if set(state) != want:
            missing, unexpected = sorted(want - set(state)), sorted(set(state) - want)
            raise ValueError(f"{source}: mpq_frozen_params does not fit this model: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
        for n, v in state.items():
            if tuple(v.shape) != tuple(mine[n].shape):
                raise ValueError(f"{source}: mpq_frozen_params[{n!r}] has shape {list(v.shape)}, "
                                 f"the model {list(mine[n].shape)}")

    def load_frozen_student_state(self, state: dict[str, Tensor], source: str = "checkpoint") -> None:
        """Copy :meth:`frozen_student_state` back (checked by :meth:`check_frozen_student_state`)."""
        self.check_frozen_student_state(state, source)
        # through load_state_dict: its post-hooks rebuild what derives from these (OOLRI's quantized
        # base weight from its frozen quantizer), which DeepSpeed's own load computed before them
        self.load_state_dict(state, strict=False)

    def on_fit_start(self) -> None:
        """Calibrate once, on the device, after any checkpoint restore (a restore marks the module
        calibrated, so resuming never re-initialises quantizers). FSDP and DeepSpeed restore after this
        hook, before ``trainer.ckpt_path`` is set (Lightning 2.6): ``MPQCLI`` sets ``resuming`` for
        them; a ``trainer.fit(ckpt_path=...)`` of one's own under those strategies calibrates and the
        restore then overwrites it. Under DDP every rank calibrates on its own shard, then rank 0's
        state is broadcast so all ranks start identical."""
        self.start_run()

    def on_validation_start(self) -> None:
        """``trainer.validate`` (``train.py validate``) on its own: the start of fitting's preparation,
        after the checkpoint restore, which every strategy does before this hook there. Without a
        checkpoint the student is calibrated, so validation measures the initialised, untrained
        student; with one, its quantizers are switched on (they were left off: validation measured
        the FP student with its LoRA once)."""
        if self.trainer.state.fn == "validate":
            self.start_run()

    def start_run(self) -> None:
        """What each fit or stand-alone validation does before its first step (see ``on_fit_start``)."""
        self.reattach_hooks()
        self.check_precision(self.trainer)
        self.check_compile_settings(self.trainer)
        self.check_strategy(self.trainer)
        self.check_data(self.trainer.datamodule)
        if not self._calibrated and self.trainer.ckpt_path is None and not self.resuming:
            with full_parameters(self.trainer, writeback=True):  # FSDP: calibrate the gathered parameters
                self.calibrate_from(self.trainer.datamodule)
                if self.trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
                    self.sync_student_from_rank0()
                self.refresh_scale_aware_lrs()
        for optimizer in self.trainer.optimizers:  # members calibration re-bound become views again
            if isinstance(optimizer, FlatAdamW):
                optimizer.relink()
        self._step_fill = self.untrained_step_fill(self.trainer.datamodule)
        # the quant switches are not state-dict entries: set them on every start, resumed or not
        set_quant_state(self.student.backbone, weight=True, act=self.calib_cfg.train_act_quant)
        if self.compile_model:  # after calibration, whose observers are data-dependent Python
            self.compile_backbones()

    def reattach_hooks(self) -> None:
        """The module's own hooks (relation-loss feature sites; under DeepSpeed the state-dict hook that
        leaves the teacher out), registered again where a strategy removed them: Lightning's DeepSpeed
        strategy strips every hook of the model before a stand-alone validation, and MTRD / TRD then
        found no student features."""
        self._feat_t.attach()
        self._feat_s.attach()
        if getattr(self, "_teacher_out_hook", None) is not None:
            self.leave_teacher_out_of_state_dicts()

    def untrained_step_fill(self, datamodule) -> Tensor | None:
        """For each activation-table entry, the trained entry of the nearest training timestep, or None
        when every entry trains. A cache that keeps 1 sampler step in 5 (Q-VDiT's OpenSora set) trains 1
        entry in 5; the others keep the calibration's pooled value, so checkpoints store them as copies
        of their nearest trained neighbour (:meth:`on_save_checkpoint`) and a sampler of the training
        step count, in or outside this package, uses trained values at every step."""
        from .callbacks.samples import trained_step_entries

        q = self.quant_cfg
        if q.a_quantizer != "timestep" or q.num_steps <= 1:
            return None
        fill = trained_step_entries(datamodule, None, q.num_steps)  # None without a trajectory cache
        if fill is None or torch.equal(fill, torch.arange(q.num_steps)):
            return None
        return fill

    @torch.no_grad()
    def fill_untrained_entries(self, state_dict: dict | None = None) -> None:
        """Write each untrained activation-table entry as a copy of its nearest trained one
        (:meth:`untrained_step_fill`), in place, and in ``state_dict``'s copies of the tables when
        given; trained entries map to themselves, so this is idempotent and leaves training unchanged."""
        fill = self._step_fill
        if fill is None:
            return
        for name, m in self.named_modules():
            if not isinstance(m, TimestepActQuantizer):
                continue
            for attr in ("scale", "zero_point"):
                live, key = getattr(m, attr), f"{name}.{attr}"
                if live.shape == fill.shape:
                    live.copy_(live[fill.to(live.device)].clone())
                saved = state_dict.get(key) if state_dict is not None else None
                if type(saved) is torch.Tensor and saved.shape == fill.shape:  # not a shard (FSDP)
                    state_dict[key] = saved[fill.to(saved.device)].clone()

    def refresh_scale_aware_lrs(self) -> None:
        """``optim.lora_lr: null`` sets each layer's LoRA lr from its calibrated weight steps (mean Δ_w /
        lora_lr_div). Lightning builds the optimizer before ``on_fit_start``, i.e. before calibration,
        so the groups' (and the schedulers' base) learning rates are set again here, once calibrated.
        A resumed run keeps the optimizer state of its checkpoint instead."""
        if self.optim_cfg.lora_lr is not None or self._trainer is None:
            return
        fresh = self.scale_aware_lrs()
        for optimizer in self.trainer.optimizers:
            schedulers = [c.scheduler for c in self.trainer.lr_scheduler_configs if c.scheduler.optimizer is optimizer]
            for i, group in enumerate(optimizer.param_groups):
                lr = fresh.get(group.get("name"))
                if lr is None:
                    continue
                base = group.get("initial_lr", group["lr"])
                factor = group["lr"] / base if base else 1.0  # the scheduler's current factor (warm-up)
                group["initial_lr"], group["lr"] = lr, lr * factor
                for scheduler in schedulers:
                    scheduler.base_lrs[i] = lr

    @torch.no_grad()
    def sync_student_from_rank0(self, broadcast=None) -> None:
        """Rank 0's calibrated student state on every rank. A broadcast writes tensor storage without
        the in-place version bump that state-derived caches key on (FZ-RMQ / OMQ channel classes,
        OOLRI's frozen quantized base weight, which is not a state-dict entry), so the broadcast state
        is then loaded through ``load_state_dict``, whose hooks rebuild every one of them."""
        broadcast = broadcast or torch.distributed.broadcast
        state = self.student.state_dict()
        for tensor in state.values():
            broadcast(tensor, src=0)
        self.student.load_state_dict(state)

    def compile_units(self) -> list[str]:
        """Names (in the backbone) of the modules ``compile_scope`` compiles: ``[""]`` (the backbone)
        for ``"model"``; for ``"blocks"`` the members of the teacher backbone's outermost
        ``nn.ModuleList`` s (taken from the FP teacher, so the quantized layers' own lists of
        corrections never count), the same names in the student."""
        if self.compile_scope == "model":
            return [""]
        lists: list[str] = []
        for name, m in self.teacher.backbone.named_modules():
            if isinstance(m, nn.ModuleList) and not any(name.startswith(f"{o}.") for o in lists):
                lists.append(name)
        return [f"{name}.{i}" for name in lists for i in range(len(self.teacher.backbone.get_submodule(name)))]

    def compile_backbones(self) -> None:
        """``nn.Module.compile()`` of the student's and teacher's :meth:`compile_units` (lazy:
        compiled on first call; the state-dict keys stay those of the eager modules)."""
        units = self.compile_units()
        if self.compile_scope == "blocks":
            # every compiled block shares one code object, and so dynamo's per-code cache: 8 graphs per
            # block name, its teacher and student copies together (grad / no-grad, training / CFG batch, bits)
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 8 * len(units))
            torch._dynamo.config.accumulated_recompile_limit = max(
                torch._dynamo.config.accumulated_recompile_limit, 16 * len(units))
        for backbone in (self.student.backbone, self.teacher.backbone):
            for name in units:
                backbone.get_submodule(name).compile(options=self.inductor_options() or None)

    def inductor_options(self) -> dict[str, Any]:
        """What ``compile_model`` hands to ``torch.compile(options=...)``: ``compile_mode``'s settings
        (torch.compile takes a mode or options, not both), then ``compile_options``."""
        import torch._inductor

        return {**torch._inductor.list_mode_options(self.compile_mode), **self.compile_options}

    def mark_cudagraph_step(self) -> None:
        """A new step for CUDA-graph replay (``compile_mode`` reduce-overhead / max-autotune, or
        ``triton.cudagraphs`` in ``compile_options``): the previous step's graph outputs may be
        overwritten from here on (none is read after its step). Training and validation steps call it,
        and ``SampleLogger`` before each sampling run: until a first mark, torch's CUDA-graph trees
        start a new generation at every no-grad call of a compiled unit, and with ``compile_scope
        blocks`` (one graph shared by the blocks) a block's replay then overwrote the previous block's
        output (benchmarks/step_time.py's teacher forward on an H200, 2026-11-28)."""
        if self._replays_cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()

    def check_strategy(self, trainer: L.Trainer) -> None:
        """Refuse sharding this module cannot train under, naming the key. Calibration and the sampling
        callbacks call the student outside the strategy's forward: DeepSpeed ZeRO-3 gathers parameters
        only inside a module's forward and drops writes made outside it; FSDP units nested inside this
        module (an ``auto_wrap_policy``) cannot run a forward inside ``summon_full_params``. FSDP
        wrapping the whole module (Lightning's default) and ZeRO-2 work."""
        strategy = trainer.strategy
        if getattr(strategy, "zero_stage_3", False):
            raise ValueError(ZERO3_REFUSAL)
        if torch.distributed.is_available():
            from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

            nested = [n for n, m in self.named_modules() if n and isinstance(m, FSDP)]
            if nested:
                raise ValueError(f"trainer.strategy: FSDP units inside the module ({nested[0]}, ...: an auto_wrap_policy) "
                                 "are not supported; let FSDP wrap the whole module (no auto_wrap_policy)")

    def check_data(self, datamodule) -> None:
        """Refuse, before any trajectory is generated, data this model cannot train on: a sampler step
        count that is not the activation tables' / memory queue's (``model.quant.num_steps``; a step
        index beyond it fails in the first forward, entries beyond the sampler's never train), and
        ``loss.trd_window > 1`` on the shuffled trajectory cache (its window assumes consecutive steps of
        the same trajectories, which only the on-the-fly stream serves)."""
        from .data import TrajectoryDataModule

        if datamodule is None:
            return
        loss, q = self.loss_cfg, self.quant_cfg
        if loss.trd and loss.trd_window > 1 and isinstance(datamodule, TrajectoryDataModule):
            raise ValueError(
                f"loss.trd_window={loss.trd_window} averages TRD over consecutive batches as consecutive sampler steps "
                "of the same trajectories, but TrajectoryDataModule serves shuffled samples: use loss.trd_window 1 or "
                "data.class_path mpq_lightning.data.OnTheFlyDataModule"
            )
        if q.a_quantizer != "timestep" and not loss.mtrd:
            return
        steps, key = _data_steps(datamodule, self.teacher)
        if steps is not None and steps != q.num_steps:
            raise ValueError(
                f"model.quant.num_steps={q.num_steps} but the training sampler has {steps} steps ({key}): the "
                "activation step tables and the MTRD memory queue have one entry per sampler step; set both alike"
            )

    def check_schedule(self, trainer: L.Trainer) -> None:
        """A decaying learning-rate schedule needs the run's length: refused for a run that trains until
        it is stopped (``max_steps`` and ``max_epochs`` -1), where Lightning's step estimate is infinite,
        or until ``max_time`` (``max_epochs`` then stays None and the estimate is -1: the schedule was at
        its end from the first step, a learning rate of 0 throughout)."""
        if trainer.max_steps == -1 and trainer.max_epochs in (-1, None) and self.optim_cfg.schedule != "constant":
            raise ValueError(
                f"model.optim.schedule {self.optim_cfg.schedule} decays the learning rate over the run's length, but "
                "this run has none (trainer.max_steps -1 and trainer.max_epochs -1: it trains until stopped, or until "
                "trainer.max_time, which bounds its time, not its steps): set trainer.max_steps, or "
                "model.optim.schedule constant")

    @staticmethod
    def check_precision(trainer: L.Trainer) -> None:
        """Refuse ``16-true`` / ``bf16-true``: Lightning casts the whole module to 16 bits there, the
        quantizers' step sizes, zero points and residual scales and the LoRA factors included (a
        bf16 step size has 8 significant bits), while the quantizer math is meant to stay fp32."""
        precision = str(trainer.precision)
        if precision in ("16-true", "bf16-true"):
            raise ValueError(f"trainer.precision {precision} casts the whole student to 16 bits, its quantizer step "
                             "sizes and LoRA factors included; use bf16-mixed or 16-mixed (16-bit matmuls, quantizer "
                             "math in fp32) or 32-true")

    def check_compile_settings(self, trainer: L.Trainer) -> None:
        """Refuse a compile switch this run cannot honour, naming the key: called by the CLI before
        anything is written or built, and again in ``on_fit_start`` for runs without the CLI."""
        if not self.compile_model:
            if self.quant_cfg.compile_quantizers:
                check_compile_support(trainer.strategy.root_device)
            return
        if self.gradient_checkpointing and self.compile_scope == "model":
            # a checkpointed block inside one traced graph may not write Python state, and the distillation
            # feature is kept by a forward hook on a block: dynamo gives up on the whole graph there
            raise ValueError("model.gradient_checkpointing=true with model.compile_model=true needs "
                             "model.compile_scope blocks (checkpointed blocks around compiled ones)")
        if not self.compile_units():
            raise ValueError(f"model.compile_scope=blocks: the {self.model_name} backbone has no nn.ModuleList of "
                             "blocks; set model.compile_scope model")
        strategy = type(trainer.strategy).__name__
        if "FSDP" in strategy or "DeepSpeed" in strategy:
            raise ValueError(f"model.compile_model=true is supported on a single device and with DDP, not with "
                             f"{strategy}: set model.compile_model false (model.quant.compile_quantizers works there)")
        device = trainer.strategy.root_device
        check_compile_support(device, "model.compile_model")  # covers compile_quantizers too: same compiler
        precision = str(trainer.precision)
        if device.type == "cpu" and not precision.startswith(("32", "64")):
            # torch 2.13 inductor's vectorised CPU code gives non-finite gradients for the plain FP STDiT
            # under bf16 autocast (eager, aot_eager and cpp.simdlen=1 are finite): refuse, not NaN later
            raise ValueError(f"model.compile_model=true with trainer.precision {precision} on CPU: torch.compile's "
                             "CPU kernels give non-finite gradients under 16-bit autocast; use trainer.precision "
                             "32-true on CPU or set model.compile_model false")

    @torch.no_grad()
    def calibrate_from(self, datamodule) -> None:
        """Initialise every quantizer on the first ``calib.num_batches`` batches of the data."""
        from lightning.fabric.utilities.apply_func import move_data_to_device

        if datamodule is None:
            raise ValueError("QATModule needs a data module for calibration (trainer.fit(model, datamodule=...))")
        loader = datamodule.calibration_dataloader() if hasattr(datamodule, "calibration_dataloader") else datamodule.train_dataloader()
        batches = []
        for i, batch in enumerate(loader):
            if i >= self.calib_cfg.num_batches:
                break
            batches.append(move_data_to_device(batch, self.device))
        if not batches:
            raise ValueError("calibration: the data module yielded no batch")

        def run(student_backbone: nn.Module) -> None:
            for b in batches:
                self.student(b["x_t"], b["t"], b.get("cond"), b["step_index"])

        calibrate(self.student.backbone, run, act_quant=self.calib_cfg.train_act_quant)
        self._calibrated = True

    # -- training ------------------------------------------------------------------------------
    def _student_teacher(self, batch: dict) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        x_t, t, step, cond = batch["x_t"], batch["t"], batch["step_index"], batch.get("cond")
        host = batch.get("step_index_host")  # the step indices on the host: their range check needs no GPU sync
        cached = batch.get("teacher_output")
        f_t = None
        if cached is None or self.trd is not None or self.mtrd is not None:  # features need the live teacher
            with torch.no_grad():
                out_t = self.teacher(x_t, t, cond, step)
            f_t = self._feat_t.value
        # the cached output is the teacher's in full fp32; a live forward runs under the trainer's
        # autocast (bf16-mixed: a bf16 target), so the cache wins where it has the output
        out_t = cached if cached is not None else out_t
        out_s = self.student(x_t, t, cond, step, step_index_host=host)
        return out_s, out_t, self._feat_s.value, f_t

    def _sample_major(self, f: Tensor | None, batch: int) -> Tensor | None:
        """A feature with the sample on axis 0: Latte's temporal site ``(b s) f c`` (b outer) becomes
        ``b (s f) c``, so TRD relates the pixels of one sample and the queue takes each sample's own."""
        if f is None or not self.teacher.feature_layout.startswith("(b "):
            return f
        return f.reshape(batch, -1, f.shape[-1])

    def compute_losses(self, batch: dict, training: bool = True) -> dict[str, Tensor]:
        """The configured loss terms of one batch. ``training=False`` (validation) leaves the training
        state alone: no memory-queue writes (MTRD is judged against the queue as training left it), the
        relation losses' random anchors drawn from a fresh generator (seed 0: the same draw at every
        validation, and the losses' own generators, which training resumes from, do not move), and no
        time-smoothing window (TRD with ``trd_window > 1`` is left out; the shuffled cache that serves
        validation refuses that window anyway)."""
        out_s, out_t, f_s, f_t = self._student_teacher(batch)
        n = batch["x_t"].shape[0]
        f_s, f_t = self._sample_major(f_s, n), self._sample_major(f_t, n)
        cfg = self.loss_cfg
        losses = {"mse": cfg.mse_weight * output_mse(out_s.float(), out_t.float(), reduction=cfg.mse_reduction)}
        draw = None if training else torch.Generator().manual_seed(0)
        if self.trd is not None and (training or self.trd.window == 1):
            host = batch.get("step_index_host")  # no GPU sync where the data gives the host copy
            if self.trd.window > 1 and (host[0] if host else int(batch["step_index"][0])) == 0:
                self.trd.reset()  # a window never spans two trajectories (the stream starts one at step 0)
            losses["trd"] = self.trd(f_s.float(), f_t.float(), generator=draw)
        if self.mtrd is not None:
            losses["mtrd"] = self.mtrd(f_s.float(), f_t.float(), self.memory_queue, generator=draw)
            if training:  # each sample's pixels at its own step; one gather for the batch (a collective under DDP)
                # the data modules' host copy of the step indices: reading the tensor back costs a GPU sync
                steps = batch.get("step_index_host") or batch["step_index"].tolist()
                self.memory_queue_callback.enqueue_many_and_sync(f_t.float(), steps, channel_dim=self.feature_channel_dim)
        if cfg.tmd:
            losses["tmd"] = tmd_loss(out_s.float(), out_t.float(), self.teacher.num_frames, layout="b c f h w",
                                     tau=cfg.tmd_tau, legacy_reshape=cfg.tmd_legacy_reshape, weight=cfg.tmd_weight)
        self._last = {"out_s": out_s.detach(), "out_t": out_t.detach(), "step_index": batch["step_index"],
                      "step_index_host": batch.get("step_index_host")}
        return losses

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        self.mark_cudagraph_step()
        losses = self.compute_losses(batch)
        loss = sum(losses.values())
        # judged with the gradients in on_before_optimizer_step: one host sync per step, before any update
        finite = torch.isfinite(loss.detach())
        self._loss_finite = finite if self._loss_finite is None else self._loss_finite & finite
        self._loss_terms = {k: v.detach() for k, v in losses.items()}
        bs = batch["x_t"].shape[0]
        for k, v in losses.items():
            self.log(f"train/{k}", v, batch_size=bs)
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        return loss

    def on_before_optimizer_step(self, optimizer) -> None:
        self.check_finite(optimizer)

    def check_finite(self, optimizer) -> None:
        """Stop before the optimiser step when the loss of any micro-batch since the last step, or a
        gradient, is NaN / Inf on any rank, naming the step and the offending terms or parameter: the
        parameters and the last good checkpoint stay untouched. A non-finite loss is reported before
        gradients (under DDP one rank's NaN loss makes every rank's averaged gradients NaN). Under
        ``16-mixed`` the grad scaler skips steps with non-finite gradients by design, and DeepSpeed keeps
        its gradients in its own partitions (``p.grad`` is unset): there only the loss is judged. One
        host sync per step, plus one collective under multi-process training."""
        loss_bad = self._loss_finite is not None and ~self._loss_finite
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        grad_bad = False
        if grads and getattr(self.trainer.precision_plugin, "scaler", None) is None:
            grad_bad = ~torch.isfinite(torch.nn.utils.get_total_norm(grads, float("inf")))  # max |g|: NaN / Inf iff an entry is
        loss_terms, self._loss_finite = self._loss_terms, None
        flags = torch.stack([torch.as_tensor(f, device=self.device).reshape(()) for f in (loss_bad, grad_bad)]).float()
        mine = flags.clone()
        if self.trainer.world_size > 1:  # ranks with a non-finite loss / gradient; every rank stops together
            flags = self.trainer.strategy.reduce(flags, reduce_op="sum")
        (loss_ranks, grad_ranks), (my_loss, my_grad) = flags.tolist(), mine.tolist()  # the one host sync
        if not (loss_ranks or grad_ranks):
            return
        step, rank = f"global step {self.global_step}", self.global_rank
        if my_loss:
            raise FloatingPointError(
                f"non-finite loss at {step} (rank {rank}'s last terms: "
                f"{ {k: float(v) for k, v in (loss_terms or {}).items()} }); the last good checkpoint is kept")
        if loss_ranks:
            raise FloatingPointError(f"non-finite loss at {step} on {int(loss_ranks)} other rank(s) than rank {rank}; "
                                     "the last good checkpoint is kept")
        if my_grad:
            # the module's own parameters: every trainable one is in the optimiser (FlatAdamW's as members)
            bad = [n for n, p in self.named_parameters() if p.grad is not None and not bool(torch.isfinite(p.grad).all())]
            raise FloatingPointError(
                f"non-finite gradient at {step} with a finite loss (rank {rank}: {', '.join(bad[:3])}"
                f"{' ...' if len(bad) > 3 else ''}); the optimiser step was not taken and the last good checkpoint is kept")
        raise FloatingPointError(f"non-finite gradient at {step} on {int(grad_ranks)} other rank(s) than rank {rank}, "
                                 "with a finite loss everywhere; the last good checkpoint is kept")

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        """The training losses on held-out trajectories (``data.init_args.val_trajectories``), each
        term and their sum logged as ``val/...`` (epoch means over all ranks). Runs in a forked RNG:
        validation (and Lightning's sanity check, which repeats on resume) does not move the random
        stream training draws from, so runs with and without it, or resumed, train alike."""
        devices = [self.device] if self.device.type == "cuda" else []
        self.mark_cudagraph_step()
        with torch.random.fork_rng(devices=devices):
            losses = self.compute_losses(batch, training=False)
        bs = batch["x_t"].shape[0]
        for k, v in losses.items():
            self.log(f"val/{k}", v, batch_size=bs, sync_dist=True)
        self.log("val/loss", sum(losses.values()), batch_size=bs, sync_dist=True)

    # -- optimisation --------------------------------------------------------------------------
    def param_groups(self) -> list[dict]:
        """AdamW groups: per-layer scale-aware LoRA lr, weight steps, activation tables, TQE, residuals."""
        cfg = self.optim_cfg
        groups: dict[str, dict] = {}
        seen: set[int] = set()

        def add(key: str, p: nn.Parameter, lr: float) -> None:
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                groups.setdefault(key, {"params": [], "lr": lr, "name": key})["params"].append(p)

        scale_aware = self.scale_aware_lrs() if cfg.lora_lr is None else {}
        for name, layer in self.student.backbone.named_modules():
            if not isinstance(layer, QuantLayer):
                continue
            if layer.lora is not None:
                if cfg.lora_lr is None:
                    for p in layer.lora.parameters():
                        add(f"lora:{name}", p, scale_aware[f"lora:{name}"])
                else:
                    for p in layer.lora.parameters():
                        add("lora", p, cfg.lora_lr)
            for pname, p in layer.named_parameters():
                if pname.startswith("lora."):
                    continue
                if "act_quantizer" in pname:
                    add("act_quantizer", p, cfg.a_scale_lr)
                elif "residual" in pname:
                    add("residual", p, cfg.residual_lr)
                elif "weight_quantizer" in pname:
                    add("weight_quantizer", p, cfg.w_scale_lr)
                elif "corrections" in pname or "tqe" in pname:
                    add("tqe", p, cfg.tqe_lr)
        for p in self.student.parameters():
            add("other", p, cfg.other_lr)
        return list(groups.values())

    def scale_aware_lrs(self) -> dict[str, float]:
        """EfficientDM's per-layer LoRA lr, mean |Δ_w| / ``optim.lora_lr_div``, keyed by group name
        (``lora:<layer>``); 1e-3 / div for a layer without weight steps. The sums and counts are
        all-reduced when a process group is up: replicated parameters give W·Σ / W·n, sharded ones
        (FSDP) the whole layer's mean, and an empty shard no NaN. A collective then: call on every rank."""
        names, stats = [], []
        for name, layer in self.student.backbone.named_modules():
            if isinstance(layer, QuantLayer) and layer.lora is not None:
                flat = [p.detach().double().abs().flatten().cpu() for p in self._serving_steps(layer.weight_quantizer)]
                names.append(f"lora:{name}")
                stats.append(torch.stack([torch.cat(flat).sum() if flat else torch.zeros((), dtype=torch.float64),
                                          torch.tensor(float(sum(t.numel() for t in flat)), dtype=torch.float64)]))
        if not stats:
            return {}
        stats = torch.stack(stats)
        if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            stats = stats.to(self.device)
            torch.distributed.all_reduce(stats)
        means = torch.where(stats[:, 1] > 0, stats[:, 0] / stats[:, 1].clamp_min(1), torch.full_like(stats[:, 0], 1e-3))
        return {n: float(m) / self.optim_cfg.lora_lr_div for n, m in zip(names, means.cpu())}

    @staticmethod
    def _serving_steps(quantizer) -> list[Tensor]:
        """The weight steps Δ_w of the quantizer serving each output channel: OMQ holds three
        quantizers over all channels and FZ-RMQ's proposal layout two, so their ``scale`` property
        picks each channel's own; a uniform quantizer's ``scale`` is its parameter. On parameters
        FSDP has sharded (outside its summon) the property cannot gather them: every step then."""
        if quantizer is None:
            return []
        try:
            return [quantizer.scale]
        except (RuntimeError, IndexError):
            return [p for n, p in quantizer.named_parameters() if "scale" in n and "residual" not in n]

    def use_flat_params(self, trainer: L.Trainer | None = None) -> bool:
        """Whether the optimiser steps flat groups (``optim.flat_params``; None: on a CPU, unless
        ``trainer``'s strategy keeps the parameters' storage itself). Refuses ``true`` with such a
        strategy. On a GPU the default is off until measured there: torch's fused CUDA AdamW already
        steps many tensors per kernel, and with flat groups autograd adds each gradient into its
        slice with a kernel launch of its own instead of taking the new gradient over."""
        strategy = getattr(trainer, "strategy", None)  # no trainer: a single process
        name = type(strategy).__name__
        owns_storage = any(s in name for s in ("FSDP", "DeepSpeed", "ModelParallel"))
        flat = self.optim_cfg.flat_params
        if flat and owns_storage:
            raise ValueError(f"model.optim.flat_params=true with {name}: that strategy keeps the parameters' "
                             "storage itself; set model.optim.flat_params null (or false)")
        if flat is None:
            device = getattr(strategy, "root_device", None) or self.device
            return not owns_storage and torch.device(device).type == "cpu"
        return flat

    def build_optimizer(self) -> torch.optim.AdamW:
        """AdamW over :meth:`param_groups`, fused or foreach as ``optim.fused`` says, over one flat tensor
        per group as ``optim.flat_params`` says (:class:`~mpq_lightning.optim.FlatAdamW`)."""
        groups = self.param_groups()
        fused = self.optim_cfg.fused
        if fused is None:
            fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for g in groups for p in g["params"])
        cls = FlatAdamW if self.use_flat_params(self._trainer) else torch.optim.AdamW
        return cls(groups, weight_decay=self.optim_cfg.weight_decay, fused=fused or None, foreach=not fused)

    def configure_optimizers(self):
        cfg = self.optim_cfg
        opt = self.build_optimizer()
        total = self.trainer.estimated_stepping_batches if self.trainer is not None else 1
        if not (math.isfinite(total) and total >= 0):  # no length (-1, inf): constant only (check_schedule)
            if cfg.schedule != "constant":
                self.check_schedule(self.trainer)
                raise ValueError(f"model.optim.schedule {cfg.schedule} needs the run's length, but Lightning estimates "
                                 f"{total} optimiser steps: set trainer.max_steps, or model.optim.schedule constant")
            total = 1
        total = max(1, int(total))  # (max_steps 0 trains nothing)

        def factor(step: int) -> float:
            if step < cfg.warmup_steps:
                return (step + 1) / cfg.warmup_steps
            progress = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
            if cfg.schedule == "linear":
                return 1.0 - progress
            if cfg.schedule == "cosine":
                return 0.5 * (1 + math.cos(math.pi * progress))
            return 1.0

        self._schedule_steps = total if cfg.schedule != "constant" else None  # saved as mpq_schedule_steps
        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_train_start(self) -> None:
        # a resume under another max_steps is a legitimate way to train on, but not the run a straight one
        # would be: say so (the schedule is rebuilt from the new length; its state holds only the step)
        old, new = self._resumed_schedule_steps, self._schedule_steps
        if old is not None and new is not None and old != new and self.trainer.is_global_zero:
            print(f"note: the {self.optim_cfg.schedule} learning-rate schedule (model.optim.schedule) of the resumed "
                  f"checkpoint ran over {old} optimiser steps, this fit's over {new} (trainer.max_steps / max_epochs): "
                  f"from step {self.global_step} the learning rates follow the {new}-step schedule")

    # -- checkpoints ---------------------------------------------------------------------------
    def _identity(self) -> dict:
        return {"model": self.model_name, "teacher_hash": self.teacher_hash, "quant": asdict(self.quant_cfg)}

    @property
    def step_table_length(self) -> int | None:
        """Entries of the per-timestep activation tables (``quant.num_steps``); None without them."""
        return self.quant_cfg.num_steps if self.quant_cfg.a_quantizer == "timestep" else None

    def training_sampler(self, datamodule=None):
        """The sampler the student trains / was trained on (``compare.training_sampler``): that of
        ``datamodule`` (default: the fit's), else the one its checkpoint recorded (``trained_sampler``)."""
        from .compare import training_sampler

        if datamodule is None and self._trainer is not None:
            datamodule = getattr(self._trainer, "datamodule", None)
        return training_sampler(self.teacher, datamodule, self.step_table_length, saved=self.trained_sampler)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        sd = checkpoint["state_dict"]
        for k in [k for k in sd if self.from_teacher(k)]:
            del sd[k]
        bad = [k for k, v in sd.items() if type(v) is torch.Tensor and v.is_floating_point() and not bool(v.isfinite().all())]
        if self._trainer is not None and self.trainer.world_size > 1:
            bad = self.trainer.strategy.broadcast(bad)  # FSDP collects the state on rank 0 only: every rank stops
        if bad:  # never replace a good checkpoint with a broken one (check_finite stops training before this)
            raise FloatingPointError(f"not saving a checkpoint at global step {self.global_step}: non-finite values "
                                     f"in {', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}; the last good checkpoint is kept")
        checkpoint["mpq_identity"] = self._identity()
        if self._trainer is not None and getattr(self._trainer, "datamodule", None) is not None:
            self.trained_sampler = self.training_sampler().as_default_scheduler()
        if self.trained_sampler is not None:
            checkpoint["mpq_sampler"] = self.trained_sampler
        if self._schedule_steps is not None:
            checkpoint["mpq_schedule_steps"] = self._schedule_steps
        if getattr(self, "_teacher_out_hook", None) is not None:  # DeepSpeed: see leave_teacher_out_of_state_dicts
            checkpoint["mpq_frozen_params"] = self.frozen_student_state()
        if self._step_fill is not None:
            # the live parameters (what DeepSpeed's engine saves; under FSDP the gathered ones, written
            # back; every rank is here) and the state dict collected before this hook (a copy under FSDP)
            with full_parameters(self.trainer, writeback=True):
                self.fill_untrained_entries(sd)
            checkpoint["mpq_step_fill"] = self._step_fill.tolist()
        if self.trd is not None and self.trd.pending:  # a TRD window open at the save: resume completes it
            checkpoint["mpq_trd_pending"] = {"student": [f.detach().cpu() for f in self.trd._student_buf],
                                             "teacher": [f.detach().cpu() for f in self.trd._teacher_buf]}
        checkpoint["mpq_rng"] = {
            "trd": self.trd.generator.get_state() if self.trd is not None and getattr(self.trd, "generator", None) is not None else None,
            "mtrd": self.mtrd.generator.get_state() if self.mtrd is not None and self.mtrd.generator is not None else None,
        }

    #: QuantConfig fields that change how the quantizers are computed, not what they hold: a checkpoint
    #: resumes or evaluates with other values of these
    EXECUTION_ONLY_QUANT_KEYS = ("compile_quantizers", "calib_stats_device",
                                 # shapes only the SmoothQuant statistic of the first calibration, whose
                                 # result (smooth_scale) the checkpoint holds; earlier checkpoints record None
                                 "smooth_momentum")

    def check_checkpoint(self, checkpoint: dict, source: str = "checkpoint") -> None:
        """Refuse a checkpoint of another model, teacher or quantization setting, naming each key."""
        saved = checkpoint.get("mpq_identity")
        if saved is None:
            raise ValueError(f"{source} has no 'mpq_identity': it was not written by QATModule")
        mine = self._identity()
        # a key the checkpoint lacks was added to QuantConfig after it was written: it had the default then
        defaults = {f.name: f.default if f.default is not MISSING else f.default_factory() for f in fields(QuantConfig)}
        saved_quant = {**defaults, **saved.get("quant", {})}
        diff = [k for k in ("model", "teacher_hash") if saved.get(k) != mine[k]]
        diff += [f"quant.{k}" for k in mine["quant"]
                 if k not in self.EXECUTION_ONLY_QUANT_KEYS and saved_quant.get(k) != mine["quant"][k]]
        if diff:
            details = "; ".join(
                f"{k}: checkpoint {saved.get(k) if not k.startswith('quant.') else saved_quant.get(k[6:])!r} "
                f"vs config {mine.get(k) if not k.startswith('quant.') else mine['quant'][k[6:]]!r}"
                for k in diff
            )
            hint = ""
            if {"quant.keep_fp", "quant.bit_map"} & set(diff):
                hint = (" (model.use_model_defaults adds the backbone's keep-FP list and bit map to these: "
                        f"it is {self.hparams.get('use_model_defaults')} now)")
            raise ValueError(f"{source} does not match this run's model / quantization setting ({details}){hint}")

    def check_optimizer_state(self, checkpoint: dict, source: str = "checkpoint") -> None:
        """Refuse a checkpoint whose optimiser parameter groups are not the ones this config builds
        (``model.optim``: e.g. ``lora_lr: null`` makes one LoRA group per layer), before anything is
        written; torch would only say "different number of parameter groups" during the restore."""
        states = checkpoint.get("optimizer_states") or []
        if not states or "param_groups" not in states[0]:
            return
        saved = [(g.get("name"), len(g["params"])) for g in states[0]["param_groups"]]
        mine = [(g.get("name"), len(g["params"])) for g in self.param_groups()]
        if saved != mine:
            i = next((i for i, (a, b) in enumerate(zip(saved, mine)) if a != b), min(len(saved), len(mine)))
            first = lambda groups: groups[i] if i < len(groups) else "none"  # noqa: E731
            raise ValueError(
                f"{source}: its optimiser has {len(saved)} parameter groups, this config builds {len(mine)} (first "
                f"difference at group {i}: saved (name, tensors) {first(saved)}, now {first(mine)}): resume with "
                "the model.optim settings the run was trained with"
            )

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.check_checkpoint(checkpoint)
        sd = checkpoint.get("state_dict")
        frozen = checkpoint.get("mpq_frozen_params")  # a DeepSpeed checkpoint's (leave_teacher_out_of_state_dicts)
        if sd is not None:  # FSDP loads module states inside the strategy, before this hook (non-strictly)
            if frozen is not None:  # a DeepSpeed folder read as one dict (files.read_deepspeed_checkpoint)
                self.check_frozen_student_state(frozen)  # loaded with sd by the caller
                sd.update({k: v for k, v in frozen.items() if k not in sd})
            own = self.state_dict()
            for k, v in own.items():  # teacher and frozen FP weights come from the teacher
                if k not in sd and self.from_teacher(k):
                    sd[k] = v
            missing, unexpected = [k for k in own if k not in sd], [k for k in sd if k not in own]
            if missing or unexpected:  # our own strictness: Lightning loads with strict_loading = False
                raise ValueError(f"checkpoint state_dict does not fit this model: missing keys {missing[:5]}"
                                 f"{' ...' if len(missing) > 5 else ''}, unexpected keys {unexpected[:5]}"
                                 f"{' ...' if len(unexpected) > 5 else ''}")
        elif frozen is not None:  # DeepSpeed's restore: it loaded its module states before this hook
            self.load_frozen_student_state(frozen)
        pending = checkpoint.get("mpq_trd_pending")
        if self.trd is not None:
            self.trd.reset()
            if pending is not None:  # the earlier steps of a window are constants at its close, as without a stop
                self.trd._student_buf.extend(f.to(self.device) for f in pending["student"])
                self.trd._teacher_buf.extend(f.to(self.device) for f in pending["teacher"])
        self.trained_sampler = checkpoint.get("mpq_sampler", self.trained_sampler)
        self._resumed_schedule_steps = checkpoint.get("mpq_schedule_steps")
        rng = checkpoint.get("mpq_rng", {})
        for key, loss in (("trd", self.trd), ("mtrd", self.mtrd)):
            state = rng.get(key)
            if state is not None and loss is not None and getattr(loss, "generator", None) is not None:
                loss.generator.set_state(state)
        self._calibrated = True
        # the trained student quantized, weights and activations, as evaluate.py and the export use it:
        # QATModule.load_from_checkpoint(...).student was its FP weights with the LoRA (the switches are
        # no state-dict entries); a fit or validation sets its training state again in start_run
        set_quant_state(self.student.backbone, weight=True, act=True)
