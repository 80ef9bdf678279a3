"""One sampling loop over diffusers schedulers, with batched classifier-free guidance and an explicit
sampler step index.

`sample(denoiser, scheduler, noise, cond, uncond, guidance_scale)` runs the scheduler's timesteps
t_0 > t_1 > ... and calls the denoiser once per step on the batch [cond; uncond] (cond first, as
OpenSora's `forward_with_cfg`), passing the step index i = 0..S-1 as a LongTensor [2B]. Schedules
are never written by hand: `make_scheduler` only picks a diffusers class and its config.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import diffusers
import torch
from diffusers import DDPMScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from mpq_lightning.models.registry import Denoiser
from mpq_lightning.quant.layers import cached_quantized_weights

__all__ = ["IDDPM_CONFIG", "SCHEDULERS", "Recorder", "guide", "make_scheduler", "sample", "step_noise_seed"]

# -------------------------------------------------------------------------------------------------
# Schedulers
# -------------------------------------------------------------------------------------------------

#: Short names → diffusers scheduler classes. Any diffusers scheduler class name works as well.
SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "iddpm": "DDPMScheduler",
    "dpm-solver": "DPMSolverMultistepScheduler",
    "unipc": "UniPCMultistepScheduler",
    "flow-match-euler": "FlowMatchEulerDiscreteScheduler",
}

#: OpenSora v1.0's IDDPM (linear betas 1e-4..0.02 over 1000 steps, ε prediction, learned-range
#: variance, no x0 clipping) as a DDPMScheduler; "linspace" spacing gives the official respacing
#: τ_i = round(i·999/(S-1)) (opensora_stdit.md §6).
IDDPM_CONFIG = dict(
    num_train_timesteps=1000,
    beta_schedule="linear",
    beta_start=1e-4,
    beta_end=0.02,
    variance_type="learned_range",
    clip_sample=False,
    prediction_type="epsilon",
    timestep_spacing="linspace",
)


def class_condition(denoiser: Denoiser, labels: torch.Tensor) -> dict[str, torch.Tensor] | None:
    """``{key: labels}`` for a class-conditional denoiser: its integer condition key, the labels taken
    modulo the backbone's class count where its config has one; None when no key is an integer one."""
    key = next((k for k, s in denoiser.cond_spec.items() if s.dtype == "long"), None)
    if key is None:
        return None
    config = getattr(denoiser.backbone, "config", None)
    classes = next((getattr(config, a) for a in ("num_embeds_ada_norm", "num_class_embeds") if getattr(config, a, None)),
                   None)
    return {key: labels % int(classes) if classes else labels}


def step_noise_seed(seed: int, index: int) -> int:
    """Seed of a stochastic sampler's own noise (its per-step draws) for sample or batch ``index`` of a
    set whose initial noise is seeded ``seed + index``: a stream of its own, 2**62 above, so that no
    step noise repeats a sample's initial noise (``seed + 10_000 + i`` did for sets of more than
    10 000 samples, and for evaluation runs whose seeds lie 10 000 apart)."""
    return (1 << 62) + int(seed) + int(index)


def make_scheduler(name: str, **config: Any) -> SchedulerMixin:
    """A diffusers scheduler by short name ("ddim", "ddpm", "iddpm", "iddpm-100", "dpm-solver", "unipc",
    "flow-match-euler") or class name ("CogVideoXDDIMScheduler"); `config` goes to its constructor.

    "iddpm" starts from `IDDPM_CONFIG`; "iddpm-<S>" also sets S timesteps (OpenSora's respacing).
    """
    steps = None
    key = name
    if name.startswith("iddpm-"):
        key, count = "iddpm", name.removeprefix("iddpm-")
        if not count.isdigit() or int(count) < 1:
            raise ValueError(f"scheduler {name!r}: expected 'iddpm-<number of steps>', e.g. 'iddpm-100'")
        steps = int(count)
    class_name = SCHEDULERS.get(key, key)
    cls = getattr(diffusers, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, SchedulerMixin)):
        raise ValueError(
            f"unknown scheduler {name!r}; use one of {sorted(SCHEDULERS)}, 'iddpm-<steps>' "
            "or a diffusers scheduler class name"
        )
    if key == "iddpm":
        config = {**IDDPM_CONFIG, **config}
    scheduler = cls(**config)
    if steps is not None:
        scheduler.set_timesteps(steps)
    return scheduler


def _takes_variance(scheduler: SchedulerMixin, denoiser: Denoiser) -> bool:
    """Whether the scheduler consumes the learned-variance channels (only DDPMScheduler does it right)."""
    variance_type = getattr(scheduler.config, "variance_type", None)
    if variance_type not in ("learned", "learned_range"):
        return False
    if not isinstance(scheduler, DDPMScheduler):
        # DPM-Solver & co. slice model_output[:, :3] for learned variances: wrong for 4-channel latents
        raise ValueError(
            f"{type(scheduler).__name__} with variance_type={variance_type!r} keeps only 3 output channels; "
            "leave variance_type unset (the variance channels are dropped here) or use DDPMScheduler"
        )
    if not denoiser.learned_sigma:
        raise ValueError(
            f"the scheduler expects a learned variance (variance_type={variance_type!r}) but the denoiser predicts "
            f"{denoiser.out_channels} channels for {denoiser.in_channels} latent channels"
        )
    return True


# -------------------------------------------------------------------------------------------------
# Guidance
# -------------------------------------------------------------------------------------------------


def guide(out_cond: torch.Tensor, out_uncond: torch.Tensor, scale: float, channels: int) -> torch.Tensor:
    """CFG on the first `channels` channels: u + s(c − u); the other channels come from the cond branch
    (OpenSora v1.0 / DiT guide 3 of 8 channels and keep the rest of each half, §6)."""
    guided = out_uncond[:, :channels] + scale * (out_cond[:, :channels] - out_uncond[:, :channels])
    return torch.cat([guided, out_cond[:, channels:]], dim=1)


def _cat_cond(cond: Mapping[str, torch.Tensor], uncond: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if set(cond) != set(uncond):
        raise ValueError(f"cond and uncond must have the same keys, got {sorted(cond)} and {sorted(uncond)}")
    return {k: torch.cat([cond[k], uncond[k]]) for k in cond}


# -------------------------------------------------------------------------------------------------
# Loop
# -------------------------------------------------------------------------------------------------


class SchedulerStep:
    """``scheduler.step`` for a sampling loop, called as ``step(model_output, i, t, x) -> x_prev``.
    Passes ``generator`` / ``eta`` where the scheduler takes them, and drives CogVideoXDPMScheduler
    (the CogVideoX-5b / 1.5 folders' sampler), whose step also takes the previous x0 prediction and
    timestep, as diffusers' CogVideoXPipeline does."""

    def __init__(self, scheduler: SchedulerMixin, generator: torch.Generator | list[torch.Generator] | None = None,
                 eta: float = 0.0) -> None:
        params = inspect.signature(scheduler.step).parameters
        self.scheduler = scheduler
        self.kwargs = {k: v for k, v in (("generator", generator), ("eta", eta)) if k in params}
        self.carries_x0 = "old_pred_original_sample" in params
        self._old_x0 = None

    def __call__(self, model_output: torch.Tensor, i: int, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        s = self.scheduler
        if self.carries_x0:
            back = s.timesteps[i - 1] if i > 0 else None
            x_prev, self._old_x0 = s.step(model_output, self._old_x0, t, back, x, **self.kwargs, return_dict=False)
            return x_prev
        return s.step(model_output, t, x, **self.kwargs, return_dict=False)[0]


#: Called once per step with keywords step_index (int), t (the scheduler's timestep, 0-dim tensor),
#: x_t, cond, model_output (after CFG, variance channels included) and x_prev.
Recorder = Callable[..., None]


@torch.no_grad()
def sample(
    denoiser: Denoiser,
    scheduler: SchedulerMixin | str | None,
    noise: torch.Tensor,
    cond: Mapping[str, torch.Tensor] | None = None,
    uncond: Mapping[str, torch.Tensor] | None = None,
    guidance_scale: float = 1.0,
    num_inference_steps: int | None = None,
    cfg_channels: int | None = None,
    recorder: Recorder | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
    eta: float | None = None,
) -> torch.Tensor:
    """Denoise `noise` [B, *latent_shape] and return the final latent (under no_grad: a sampling run
    keeps no autograd graph).

    scheduler: a diffusers scheduler, a name for `make_scheduler`, or None for the denoiser's default
    (its recommended guidance scale, `default_scheduler["guidance_scale"]`, is not applied here).
    num_inference_steps: None takes the default scheduler's count, or the steps already set on it.
    uncond: the unconditional branch; None with guidance_scale != 1 uses `denoiser.null_cond(cond)`.
    cfg_channels: leading channels guided; None = the denoiser's convention (3 for OpenSora v1.0,
    otherwise every predicted channel, never the learned-variance ones).
    eta: DDIM's η (ignored by schedulers without it); None: the default scheduler's ``eta`` (an
    export's training sampler records it) when ``scheduler`` is None, else 0; generator: the scheduler's noise RNG, or one per
    sample (diffusers' ``randn_tensor`` draws sample i from generator i).
    """
    spec = denoiser.default_scheduler
    if scheduler is None:
        scheduler = make_scheduler(spec["name"], **spec["config"])
        num_inference_steps = num_inference_steps or spec["num_inference_steps"]
        eta = spec.get("eta", 0.0) if eta is None else eta
    elif isinstance(scheduler, str):
        scheduler = make_scheduler(scheduler)
    steps = num_inference_steps or scheduler.num_inference_steps
    if not steps:
        raise ValueError("num_inference_steps is not set: pass it or call scheduler.set_timesteps first")
    scheduler.set_timesteps(steps, device=noise.device)  # also resets multistep solver state

    use_cfg = guidance_scale != 1.0
    if use_cfg and uncond is None:
        uncond = denoiser.null_cond(cond or {})
    model_cond = _cat_cond(cond or {}, uncond or {}) if use_cfg else dict(cond or {})
    takes_variance = _takes_variance(scheduler, denoiser)
    predicted = denoiser.in_channels if denoiser.learned_sigma else denoiser.out_channels
    channels = cfg_channels or denoiser.cfg_channels or predicted

    step = SchedulerStep(scheduler, generator, 0.0 if eta is None else float(eta))
    scale_input = getattr(scheduler, "scale_model_input", lambda x, t: x)

    batch = noise.shape[0]
    rows = 2 * batch if use_cfg else batch
    x = noise * getattr(scheduler, "init_noise_sigma", 1.0)
    with cached_quantized_weights(denoiser):  # Q(W) once per sampling run (no-grad forwards only)
        for i, t in enumerate(scheduler.timesteps):
            x_in = scale_input(x, t)
            x_in = torch.cat([x_in, x_in]) if use_cfg else x_in
            step_index = torch.full((rows,), i, dtype=torch.long, device=noise.device)
            out = denoiser(x_in, t.expand(rows), model_cond, step_index)
            if use_cfg:
                out_cond, out_uncond = out.chunk(2)
                out = guide(out_cond, out_uncond, guidance_scale, channels)
            step_out = out if takes_variance else out[:, :predicted]
            x_prev = step(step_out, i, t, x)
            if recorder is not None:
                recorder(step_index=i, t=t, x_t=x, cond=cond, model_output=out, x_prev=x_prev)
            x = x_prev
    return x
