"""Sampling loop: determinism, explicit step indices, CFG (incl. OpenSora's 3-channel quirk), recorder,
IDDPM-100 settings and step (opensora_stdit.md §6), scheduler errors."""

from __future__ import annotations

import math

import pytest
import torch

from mpq_lightning.models import build, guide, make_scheduler, sample


@pytest.fixture(scope="module")
def dit():
    torch.manual_seed(0)
    return build("tiny-dit").eval()


def _noise(d, batch=2, seed=0):
    return torch.randn(batch, *d.latent_shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------------
# Loop
# ---------------------------------------------------------------------------------------------------


@torch.no_grad()
def test_deterministic_with_fixed_seed(dit):
    cond = {"class_labels": torch.tensor([1, 2])}

    def run():
        return sample(dit, make_scheduler("ddpm"), _noise(dit), cond, guidance_scale=4.0, num_inference_steps=5,
                      generator=torch.Generator().manual_seed(3))  # fmt: skip

    first, second = run(), run()
    assert torch.equal(first, second) and torch.isfinite(first).all()


def test_the_default_scheduler_brings_its_eta_and_sampling_keeps_no_graph(dit):
    """``sample(model, None, ...)`` takes the whole default sampler, η included (an export's training
    sampler records it), unless η is passed; and a sampling run builds no autograd graph, even from a
    model whose parameters require gradients (a loaded export)."""
    import copy

    model = copy.deepcopy(dit).requires_grad_(True)
    model.default_scheduler = {"name": "ddim", "config": {"clip_sample": False}, "num_inference_steps": 4,
                               "guidance_scale": 1.0, "eta": 1.0}
    cond = {"class_labels": torch.tensor([1, 2])}

    def run(scheduler, **kwargs):
        return sample(model, scheduler, _noise(model), cond, generator=torch.Generator().manual_seed(5), **kwargs)

    default = run(None)
    explicit = run(make_scheduler("ddim", clip_sample=False), num_inference_steps=4, eta=1.0)
    assert torch.equal(default, explicit) and not default.requires_grad
    assert not torch.equal(run(None, eta=0.0), default)  # a passed η wins


@torch.no_grad()
def test_step_indices_and_recorder(dit):
    seen, records = [], []
    handle = dit.register_forward_pre_hook(lambda m, args: seen.append((args[1], args[3])))
    scheduler = make_scheduler("ddim", clip_sample=False)
    cond = {"class_labels": torch.tensor([0, 5])}
    out = sample(dit, scheduler, _noise(dit), cond, guidance_scale=2.0, num_inference_steps=6,
                 recorder=lambda **r: records.append(r))  # fmt: skip
    handle.remove()
    assert len(seen) == len(records) == 6
    for i, ((t, step), rec) in enumerate(zip(seen, records)):
        assert step.dtype == torch.long and torch.equal(step, torch.full((4,), i))  # [cond; uncond] rows
        assert rec["step_index"] == i and rec["t"] == scheduler.timesteps[i] and torch.equal(t, rec["t"].expand(4))
        assert rec["cond"] is cond and rec["model_output"].shape == (2, 8, 8, 8)
        if i:
            assert rec["x_t"] is records[i - 1]["x_prev"]
    assert records[-1]["x_prev"] is out
    assert scheduler.timesteps.tolist() == sorted(scheduler.timesteps.tolist(), reverse=True)


@torch.no_grad()
def test_cfg_on_first_three_channels(stdit_denoiser, random_cond):
    """OpenSora v1.0: ε[:3] = u + s(c − u); ε[3] and the variance come from the cond branch."""
    raw, records = [], []
    handle = stdit_denoiser.register_forward_hook(lambda m, args, out: raw.append(out))
    cond = random_cond(stdit_denoiser, 2)
    sample(stdit_denoiser, "iddpm-3", _noise(stdit_denoiser), cond, guidance_scale=4.0,
           recorder=lambda **r: records.append(r), generator=torch.Generator().manual_seed(0))  # fmt: skip
    handle.remove()
    for out, rec in zip(raw, records):
        c, u = out.chunk(2)
        guided = rec["model_output"]
        assert torch.equal(guided[:, :3], u[:, :3] + 4.0 * (c[:, :3] - u[:, :3]))
        assert not torch.equal(guided[:, :3], c[:, :3])  # the null caption changes the prediction
        assert torch.equal(guided[:, 3:], c[:, 3:])


def test_guide_all_channels():
    c, u = torch.randn(2, 8, 3), torch.randn(2, 8, 3)
    assert torch.allclose(guide(c, u, 2.5, 8), u + 2.5 * (c - u))
    assert torch.equal(guide(c, u, 1.0, 4)[:, 4:], c[:, 4:])


@torch.no_grad()
def test_default_scheduler_and_null_class(dit):
    """No scheduler: the denoiser's default (50 steps for DiT); CFG's unconditional half carries DiT's
    null class (``num_embeds_ada_norm`` = the class count, 1000 for DiT-XL/2) after the labels."""
    records, labels = [], []
    handle = dit.register_forward_pre_hook(lambda m, args: labels.append(args[2]["class_labels"].clone()))
    out = sample(dit, None, _noise(dit), {"class_labels": torch.tensor([3, 4])}, guidance_scale=4.0,
                 recorder=lambda **r: records.append(r["step_index"]))  # fmt: skip
    handle.remove()
    assert len(records) == dit.default_scheduler["num_inference_steps"] == 50
    assert out.shape == (2, *dit.latent_shape)
    null = int(dit.backbone.config.num_embeds_ada_norm)
    assert len(labels) == 50 and all(lab.tolist() == [3, 4, null, null] for lab in labels)


@torch.no_grad()
@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # inside diffusers' DPM-Solver
@pytest.mark.parametrize("scheduler", ["flow-match-euler", None, "dpm-solver"])
def test_wan_flow_matching(scheduler, random_cond):
    wan = build("tiny-wan").eval()
    cond = random_cond(wan, 1)
    uncond = {"encoder_hidden_states": torch.zeros_like(cond["encoder_hidden_states"])}
    if scheduler == "dpm-solver":
        scheduler = make_scheduler(
            "dpm-solver", prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0
        )
    out = sample(wan, scheduler, _noise(wan, 1), cond, uncond, guidance_scale=5.0, num_inference_steps=3)
    assert out.shape == (1, *wan.latent_shape) and torch.isfinite(out).all()
    if scheduler == "flow-match-euler":  # the WanPipeline loop restated: v = u + 5 (c - u), Euler in σ
        sched = make_scheduler("flow-match-euler")
        sched.set_timesteps(3)
        x = _noise(wan, 1)
        for i, t in enumerate(sched.timesteps):
            c = wan(x, t.view(1), cond, torch.tensor([i]))
            u = wan(x, t.view(1), uncond, torch.tensor([i]))
            x = x + (sched.sigmas[i + 1] - sched.sigmas[i]) * (u + 5.0 * (c - u))
        torch.testing.assert_close(out, x, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------------
# IDDPM as OpenSora v1.0 (opensora_stdit.md §6)
# ---------------------------------------------------------------------------------------------------


def test_iddpm_100_settings():
    s = make_scheduler("iddpm-100")
    expected = [round(i * 999 / 99) for i in range(99, -1, -1)]
    assert s.timesteps.tolist() == expected
    assert expected[-8:] == [71, 61, 50, 40, 30, 20, 10, 0]
    assert torch.equal(s.betas, torch.linspace(1e-4, 0.02, 1000, dtype=torch.float32))
    cfg = s.config
    assert (cfg.variance_type, cfg.prediction_type, cfg.clip_sample, cfg.num_train_timesteps) == (
        "learned_range", "epsilon", False, 1000)  # fmt: skip


def test_iddpm_step_matches_spec_formulas():
    """One respaced step: learned-range variance, unclipped x0, posterior mean (float64 reference)."""
    s = make_scheduler("iddpm-100")
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    abar = torch.cumprod(1 - betas, 0)
    g = torch.Generator().manual_seed(0)
    x, eps = torch.randn(1, 4, 2, 2, generator=g), torch.randn(1, 4, 2, 2, generator=g)
    v = torch.rand(1, 4, 2, 2, generator=g) * 2 - 1
    for i in (40, 99):  # a middle step and the last one (t = 0, no noise)
        tau, prev = int(s.timesteps[i]), (int(s.timesteps[i + 1]) if i < 99 else None)
        a, a_prev = abar[tau], (abar[prev] if prev is not None else torch.tensor(1.0, dtype=torch.float64))
        beta = 1 - a / a_prev
        x0 = math.sqrt(1 / a) * x.double() - math.sqrt(1 / a - 1) * eps.double()
        mean = beta * a_prev.sqrt() / (1 - a) * x0 + (1 - a_prev) * (1 - beta).sqrt() / (1 - a) * x.double()
        if prev is not None:
            frac = (v.double() + 1) / 2
            log_var = frac * beta.log() + (1 - frac) * (beta * (1 - a_prev) / (1 - a)).log()
            z = torch.randn(1, 4, 2, 2, generator=torch.Generator().manual_seed(7))
            mean = mean + (0.5 * log_var).exp() * z.double()
        got = s.step(torch.cat([eps, v], 1), s.timesteps[i], x, generator=torch.Generator().manual_seed(7)).prev_sample
        assert torch.allclose(got.double(), mean, rtol=1e-4, atol=1e-5), i


# ---------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------


def test_make_scheduler_errors():
    with pytest.raises(ValueError, match=r"unknown scheduler 'nope'; use one of \['ddim'"):
        make_scheduler("nope")
    with pytest.raises(ValueError, match=r"expected 'iddpm-<number of steps>'"):
        make_scheduler("iddpm-x")
    assert type(make_scheduler("CogVideoXDDIMScheduler")).__name__ == "CogVideoXDDIMScheduler"


@torch.no_grad()
@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # inside diffusers' DPM-Solver
def test_sample_errors(stdit_denoiser, random_cond):
    cond = random_cond(stdit_denoiser, 2)
    noise = _noise(stdit_denoiser)
    dpm = make_scheduler("dpm-solver", variance_type="learned_range")
    expected = r"DPMSolverMultistepScheduler with variance_type='learned_range' keeps only 3 output channels"
    with pytest.raises(ValueError, match=expected):
        sample(stdit_denoiser, dpm, noise, cond, num_inference_steps=2)
    with pytest.raises(ValueError, match="num_inference_steps is not set"):
        sample(stdit_denoiser, make_scheduler("ddim"), noise, cond)
    with pytest.raises(ValueError, match=r"cond and uncond must have the same keys, got \['mask', 'y'\] and \['y'\]"):
        sample(stdit_denoiser, "iddpm-2", noise, cond, {"y": cond["y"]}, guidance_scale=2.0)
    wan = build("tiny-wan")
    wan_cond = random_cond(wan, 1)
    with pytest.raises(ValueError, match="expects a learned variance .* predicts 4 channels for 4 latent channels"):
        sample(wan, "iddpm-2", _noise(wan, 1), wan_cond)
    with pytest.raises(ValueError, match="WanDenoiser has no built-in null condition; pass `uncond`"):
        sample(wan, None, _noise(wan, 1), wan_cond, guidance_scale=5.0, num_inference_steps=2)


@torch.no_grad()
def test_cogvideox_dpm_scheduler_carries_the_previous_x0_prediction():
    """CogVideoXDPMScheduler (the CogVideoX-5b / 1.5 folders' sampler) steps with the previous x0
    prediction and timestep: ``sample`` gives what diffusers' CogVideoXPipeline loop gives."""
    torch.manual_seed(0)
    d = build("tiny-cogvideox").eval()
    cfg = {"prediction_type": "v_prediction", "timestep_spacing": "trailing", "beta_schedule": "scaled_linear",
           "beta_start": 0.00085, "beta_end": 0.012, "rescale_betas_zero_snr": True, "snr_shift_scale": 1.0}
    noise = _noise(d, batch=1, seed=4)
    cond = {k: torch.randn(1, *[6 if n is None else n for n in spec.shape]) for k, spec in d.cond_spec.items()
            if spec.dtype != "mask"}
    got = sample(d, make_scheduler("CogVideoXDPMScheduler", **cfg), noise, cond, num_inference_steps=4,
                 generator=torch.Generator().manual_seed(1))
    sched = make_scheduler("CogVideoXDPMScheduler", **cfg)
    sched.set_timesteps(4)
    g, x, old = torch.Generator().manual_seed(1), noise * sched.init_noise_sigma, None
    for i, t in enumerate(sched.timesteps):  # diffusers' CogVideoXPipeline.__call__ loop
        out = d(sched.scale_model_input(x, t), t.expand(1), cond, torch.tensor([i]))
        x, old = sched.step(out, old, t, sched.timesteps[i - 1] if i > 0 else None, x, generator=g, return_dict=False)
    assert torch.isfinite(got).all() and torch.equal(got, x)


def test_step_noise_never_repeats_an_initial_noise_seed():
    """A stochastic sampler's noise for sample i (evaluate.py) or the batch starting at i (the final
    report) never draws from the generator of another sample's initial noise (seed + j): within a set
    of over 10 000 samples, nor across runs whose seeds lie 10 000 apart (seed + 10 000 + i collided)."""
    from mpq_lightning.models.sampling import step_noise_seed

    n = 20_001
    for seed in (0, 1234, -1):
        steps = {step_noise_seed(seed, i) for i in range(n)}
        assert len(steps) == n
        assert steps.isdisjoint(range(seed, seed + 3 * n))  # this run's and the next runs' initial noise
