"""Train the FP teachers of the hub-free digits benchmarks and write them to mpq_lightning/assets/.

    python benchmarks/train_teachers.py --which unet    # class-conditional UNet2DModel on Digits (16x16)
    python benchmarks/train_teachers.py --which stdit   # tiny STDiT on Moving-Digits (1x8x16x16)

Both: ε-prediction on the DDPM 1000-step linear schedule (β 1e-4..0.02) of a diffusers scheduler (noise by
``scheduler.add_noise``), AdamW with linear warm-up and cosine decay, gradient clipping 1.0, an EMA of the
weights (the EMA is what is shipped), 10 % label / caption dropout for classifier-free guidance, one CPU
thread, everything seeded (--seed): the run is reproducible on the same machine and torch build.

* unet: ``UNet2DModel`` (32, 64) channels, one ResNet per level, attention at 8x8, ``num_class_embeds=11``
  (class 10 = null class for CFG). Sampled with DDIM (50 steps, η = 0, x0 clipped to [-1, 1]).
* stdit: our ``STDiT`` (depth 4, hidden 64, 4 heads, patch (1, 2, 2): 8 frames × 64 tokens, learned sigma),
  batch 16. Classes are captions: a fixed seeded table ``class_embeddings`` [10, 8, 128] (N(0, 30²)) with a
  per-class key mask ``class_mask`` [10, 8] (class c keeps its first 3..8 tokens), shipped in
  ``moving_digits_stdit_class_tokens.safetensors``; the null caption is the model's ``y_embedding``.
  Loss: OpenSora's IDDPM hybrid ``w(t)·mse(ε) + L_vb`` with the learned-range variance (the KL term sees
  the mean detached, as in IDDPM) and min-SNR-5 weights w(t) = min(SNR, 5)/SNR (Hang et al. 2023).
  Sampled with IDDPM-100 (``make_scheduler("iddpm-100")``), CFG on the ε channel only (``cfg_channels=1``).
  Design notes (earlier runs of this script, same seed; ε-MSE at t = 500 on 64 held-out videos with the
  right / a wrong class caption, printed every 250 steps): with N(0, 1/C) caption entries (C = 32) the
  projected caption tokens are ~0.002 and after 2000 steps (patch (1, 4, 4), hidden 96, batch 32) the label
  had no effect at all (class consistency 9.5 %, chance); with N(0, 30²) entries the label starts to matter
  but slowly (patch (1, 4, 4): 0.01510 / 0.01510 at step 1000 without min-SNR, 0.01411 / 0.01415 with it);
  the shipped patch (1, 2, 2) / batch 16 run (same time per step) reached 0.01343 / 0.01347 at step 1000
  and 0.01226 / 0.01237 at step 3000. In a video the digit's identity stays visible in x_t up to high noise
  (8 frames of the same digit), so the ε loss gets little signal from the class, and a 20-minute CPU budget
  gives a weak class-conditional teacher (see ``quality`` in the JSON: class consistency 0.165 without CFG,
  0.315 at CFG 4). ``--steps`` / ``--device`` train it longer, e.g. on a GPU.

After training, samples are drawn with the project sampler (``mpq_lightning.models.sample``) and scored
with the shipped feature networks (train them first: ``benchmarks/train_feature_nets.py``): class
consistency under the classifier, Fréchet distance against the held-out and train splits. Everything
goes to <stem>.json next to <stem>.safetensors. ``--eval-only`` re-scores the shipped weights.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel
from torch import nn

from mpq_lightning.data.digits import DigitsDataset, MovingDigitsDataset, load_digits_teacher, stdit_class_cond

ASSETS = Path(__file__).resolve().parent.parent / "mpq_lightning" / "assets"

NOISE_SCHEDULE = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)

UNET_CONFIG: dict[str, Any] = dict(
    sample_size=16,
    in_channels=1,
    out_channels=1,
    block_out_channels=[32, 64],
    layers_per_block=1,
    down_block_types=["DownBlock2D", "AttnDownBlock2D"],
    up_block_types=["AttnUpBlock2D", "UpBlock2D"],
    norm_num_groups=8,
    attention_head_dim=8,
    num_class_embeds=11,
)
UNET_TRAIN: dict[str, Any] = dict(steps=2000, batch_size=64, lr=1e-3, weight_decay=0.0, warmup=200, ema_decay=0.999,
                                  grad_clip=1.0, label_dropout=0.1, null_class=10)  # fmt: skip
UNET_SCHEDULER: dict[str, Any] = dict(
    name="DDIMScheduler",
    config=dict(**NOISE_SCHEDULE, clip_sample=True, set_alpha_to_one=True, prediction_type="epsilon"),
    num_inference_steps=50,
    guidance_scale=1.0,  # CFG 2 barely raises class consistency (0.942 -> 0.946) and triples FID
)

STDIT_CONFIG: dict[str, Any] = dict(
    input_size=[8, 16, 16],
    in_channels=1,
    patch_size=[1, 2, 2],
    hidden_size=64,
    depth=4,
    num_heads=4,
    mlp_ratio=4.0,
    class_dropout_prob=0.1,
    pred_sigma=True,
    caption_channels=128,
    model_max_length=8,
)
STDIT_TRAIN: dict[str, Any] = dict(steps=3000, batch_size=16, lr=1e-3, weight_decay=0.0, warmup=200, ema_decay=0.999,
                                   grad_clip=1.0, videos_per_epoch=1438, data_seed_base=10_000,
                                   caption_min_tokens=3, caption_std=30.0, snr_gamma=5.0)  # fmt: skip
STDIT_NOTES = (
    "Weak teacher (CPU training budget: 3000 steps x 16 videos on one thread): motion statistics match real "
    "videos (temporal_consistency, frame_difference), digit shapes are speckled and only partly class-consistent; "
    "use guidance 4 (the default) and compare students against the teacher's own samples (psnr_ssim, FVD to "
    "teacher), not against real data. Longer training: --steps N [--device cuda]."
)
STDIT_SCHEDULER: dict[str, Any] = dict(name="iddpm", config={}, num_inference_steps=100, guidance_scale=4.0)


# -------------------------------------------------------------------------------------------------
# Shared pieces
# -------------------------------------------------------------------------------------------------


def _lr(step: int, cfg: dict[str, Any]) -> float:
    warm = min(1.0, (step + 1) / cfg["warmup"])
    return cfg["lr"] * warm * 0.5 * (1 + math.cos(math.pi * step / cfg["steps"]))


def _optimise(opt, model: nn.Module, ema: nn.Module, loss: torch.Tensor, step: int, cfg: dict[str, Any]) -> None:
    """One AdamW step of a teacher: scheduled lr, clipped gradients, EMA update."""
    for group in opt.param_groups:
        group["lr"] = _lr(step, cfg)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
    opt.step()
    _ema_update(ema, model, cfg["ema_decay"], step)


@torch.no_grad()
def _ema_update(ema: nn.Module, model: nn.Module, decay: float, step: int) -> None:
    d = min(decay, (1 + step) / (10 + step))
    for pe, pm in zip(ema.parameters(), model.parameters()):
        pe.lerp_(pm, 1 - d)


def _save(model: nn.Module, stem: str, meta: dict[str, Any], out: Path, extra: dict[str, torch.Tensor] | None = None) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, str(out / f"{stem}.safetensors"))
    if extra is not None:
        save_file({k: v.contiguous() for k, v in extra.items()}, str(out / f"{stem}_class_tokens.safetensors"))
    (out / f"{stem}.json").write_text(json.dumps(meta, indent=2) + "\n")
    size = sum(p.stat().st_size for p in out.glob(f"{stem}*.safetensors"))
    print(f"wrote {out}/{stem}.* ({size / 1e6:.2f} MB of weights)", flush=True)


def _machine(threads: int) -> str:
    return f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {threads} thread(s)"


# -------------------------------------------------------------------------------------------------
# IDDPM variational bound (learned-range variance), schedule quantities taken from the diffusers scheduler
# -------------------------------------------------------------------------------------------------


class IDDPMTerms:
    """q(x_{t-1} | x_t, x_0) and the learned-range model variance for a DDPMScheduler's betas (IDDPM §3.1)."""

    def __init__(self, scheduler: DDPMScheduler) -> None:
        betas = scheduler.betas.double()
        ac = scheduler.alphas_cumprod.double()
        ac_prev = torch.cat([ac.new_ones(1), ac[:-1]])
        post_var = betas * (1 - ac_prev) / (1 - ac)
        self.log_beta = betas.log()
        self.post_log_var = torch.cat([post_var[1:2], post_var[1:]]).log()  # clipped at t = 0
        self.coef_x0 = betas * ac_prev.sqrt() / (1 - ac)
        self.coef_xt = (1 - ac_prev) * (1 - betas).sqrt() / (1 - ac)
        self.sqrt_recip_ac = (1 / ac).sqrt()
        self.sqrt_recipm1_ac = (1 / ac - 1).sqrt()

    @staticmethod
    def _g(v: torch.Tensor, t: torch.Tensor, ndim: int) -> torch.Tensor:
        return v.to(t.device)[t].float().reshape(-1, *([1] * (ndim - 1)))

    def vb(self, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, var_out: torch.Tensor) -> torch.Tensor:
        """Per-sample L_vb in bits/dim: KL(q ‖ p) for t > 0, the discretized decoder NLL for t = 0."""
        n = x0.dim()
        g = lambda v: self._g(v, t, n)  # noqa: E731
        true_mean = g(self.coef_x0) * x0 + g(self.coef_xt) * xt
        true_log_var = g(self.post_log_var)
        x0_pred = (g(self.sqrt_recip_ac) * xt - g(self.sqrt_recipm1_ac) * eps).clamp(-1, 1)
        model_mean = g(self.coef_x0) * x0_pred + g(self.coef_xt) * xt
        frac = (var_out + 1) / 2
        model_log_var = frac * g(self.log_beta) + (1 - frac) * true_log_var
        kl = 0.5 * (-1 + model_log_var - true_log_var + (true_log_var - model_log_var).exp()
                    + (true_mean - model_mean).square() * (-model_log_var).exp())  # fmt: skip
        kl = kl.flatten(1).mean(1) / math.log(2.0)
        # discretized Gaussian decoder NLL (data on 255 bins in [-1, 1])
        inv_std = (-0.5 * model_log_var).exp()
        centered = x0 - model_mean
        cdf_plus = torch.special.ndtr(inv_std * (centered + 1 / 255))
        cdf_min = torch.special.ndtr(inv_std * (centered - 1 / 255))
        log_prob = torch.where(
            x0 < -0.999,
            cdf_plus.clamp(min=1e-12).log(),
            torch.where(x0 > 0.999, (1 - cdf_min).clamp(min=1e-12).log(), (cdf_plus - cdf_min).clamp(min=1e-12).log()),
        )
        nll = -log_prob.flatten(1).mean(1) / math.log(2.0)
        return torch.where(t == 0, nll, kl)


# -------------------------------------------------------------------------------------------------
# UNet on Digits
# -------------------------------------------------------------------------------------------------


def train_unet(args: argparse.Namespace) -> None:
    cfg = {**UNET_TRAIN, "seed": args.seed}
    if args.steps:
        cfg["steps"] = args.steps
    torch.manual_seed(cfg["seed"])
    g = torch.Generator().manual_seed(cfg["seed"])
    x_all, y_all = DigitsDataset("train").tensors()
    dev = torch.device(args.device)
    model = UNet2DModel(**UNET_CONFIG).to(dev)
    ema = copy.deepcopy(model).requires_grad_(False)
    noise_sched = DDPMScheduler(**NOISE_SCHEDULE)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    t0, losses, perm, pos = time.time(), [], torch.randperm(len(y_all), generator=g), 0
    model.train()
    for step in range(cfg["steps"]):
        if pos + cfg["batch_size"] > len(perm):
            perm, pos = torch.randperm(len(y_all), generator=g), 0
        idx = perm[pos : pos + cfg["batch_size"]]
        pos += cfg["batch_size"]
        x0, labels = x_all[idx], y_all[idx].clone()
        labels[torch.rand(len(labels), generator=g) < cfg["label_dropout"]] = cfg["null_class"]
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, NOISE_SCHEDULE["num_train_timesteps"], (len(idx),), generator=g)
        x0, labels, noise, t = x0.to(dev), labels.to(dev), noise.to(dev), t.to(dev)
        xt = noise_sched.add_noise(x0, noise, t)
        loss = F.mse_loss(model(xt, t, class_labels=labels).sample, noise)
        _optimise(opt, model, ema, loss, step, cfg)
        losses.append(loss.item())
        if step % 100 == 99 or step == cfg["steps"] - 1:
            print(f"[unet] step {step + 1}/{cfg['steps']} loss(avg100) {sum(losses[-100:]) / len(losses[-100:]):.4f} "
                  f"({time.time() - t0:.0f}s)", flush=True)  # fmt: skip
    wall = time.time() - t0
    meta = {
        "name": "digits-unet",
        "backbone": "diffusers.UNet2DModel",
        "model_config": UNET_CONFIG,
        "num_params": sum(p.numel() for p in model.parameters()),
        "latent_shape": [1, 16, 16],
        "data": "DigitsDataset('train'): 1438 images [1, 16, 16] in [-1, 1] (sklearn digits 0..1437)",
        "cond": "{'class_labels': LongTensor [B]} digit 0..9; null class 10 (UNet2DDenoiser(null_class=10))",
        "null_class": cfg["null_class"],
        "prediction_type": "epsilon",
        "noise_schedule": {"class": "DDPMScheduler", **NOISE_SCHEDULE},
        "scheduler": UNET_SCHEDULER,
        "train_config": {**cfg, "optimizer": "AdamW", "lr_schedule": "linear warmup + cosine", "threads": args.threads, "device": args.device,
                         "shipped_weights": "EMA"},  # fmt: skip
        "final_loss_avg100": sum(losses[-100:]) / len(losses[-100:]),
        "loss_curve_avg100": [round(sum(losses[i : i + 100]) / len(losses[i : i + 100]), 5) for i in range(0, len(losses), 100)],
        "wall_time_s": round(wall, 1),
        "machine": _machine(args.threads),
        "command": f"python benchmarks/train_teachers.py --which unet --seed {args.seed}"
        + (f" --steps {args.steps}" if args.steps else ""),
    }
    _save(ema.eval().cpu(), "digits_unet", meta, args.out)
    if not args.no_eval:
        evaluate_unet(args)


@torch.no_grad()
def evaluate_unet(args: argparse.Namespace) -> None:
    from mpq_lightning.metrics import ImageFeatureNet, class_consistency, frechet_distance, load_image_classifier
    from mpq_lightning.models.diffusers_adapters import UNet2DDenoiser
    from mpq_lightning.models.sampling import make_scheduler, sample

    backbone, meta = load_digits_teacher("unet", args.out)
    meta["scheduler"] = spec = UNET_SCHEDULER
    dev = torch.device(args.device)
    denoiser = UNet2DDenoiser(backbone, null_class=meta["null_class"], default_scheduler=spec).eval().to(dev)
    clf = load_image_classifier(args.out)
    net = ImageFeatureNet(clf)
    real_held, _ = DigitsDataset("heldout").tensors()
    real_train, _ = DigitsDataset("train").tensors()
    per_class = args.eval_per_class
    labels = torch.arange(10).repeat_interleave(per_class)
    quality: dict[str, Any] = {"num_samples": len(labels), "per_class": per_class, "sampler": spec["name"],
                               "num_inference_steps": spec["num_inference_steps"], "noise_seed": 0}  # fmt: skip
    t0 = time.time()
    scales = args.eval_guidance if args.eval_guidance else [1.0, 2.0]
    for scale in sorted({*map(float, scales), float(spec["guidance_scale"])}):
        noise = torch.randn(len(labels), 1, 16, 16, generator=torch.Generator().manual_seed(0))
        out = []
        for i in range(0, len(labels), 250):
            sched = make_scheduler(spec["name"], **spec["config"])
            out.append(sample(denoiser, sched, noise[i : i + 250].to(dev), {"class_labels": labels[i : i + 250].to(dev)},
                              guidance_scale=scale, num_inference_steps=spec["num_inference_steps"]).cpu())  # fmt: skip
        x = torch.cat(out).clamp(-1, 1)
        quality[f"cfg{scale:g}"] = {
            "class_consistency": class_consistency(x, labels, clf),
            "fid_vs_heldout": frechet_distance(real_held, x, net),
            "fid_vs_train": frechet_distance(real_train, x, net),
        }
        print(f"[unet] guidance {scale:g}: {quality[f'cfg{scale:g}']} ({time.time() - t0:.0f}s)", flush=True)
        if scale == float(spec["guidance_scale"]):
            # one row per class: its first 8 samples
            _save_grid(x.view(10, per_class, 1, 16, 16)[:, :8].reshape(-1, 1, 16, 16),
                       args.out / "digits_unet_samples.png", nrow=min(8, per_class))  # fmt: skip
    quality["reference_real"] = {
        "classifier_acc_heldout": class_consistency(real_held, DigitsDataset("heldout").labels, clf),
        "fid_heldout_vs_train": frechet_distance(real_train, real_held, net),
    }
    quality["eval_wall_time_s"] = round(time.time() - t0, 1)
    meta["quality"] = quality
    (args.out / "digits_unet.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(json.dumps(quality, indent=2), flush=True)


# -------------------------------------------------------------------------------------------------
# STDiT on Moving-Digits
# -------------------------------------------------------------------------------------------------


def class_token_tables(seed: int, num_classes: int = 10, length: int = 8, channels: int = 128,
                       min_tokens: int = 3, std: float = 3.0) -> dict[str, torch.Tensor]:  # fmt: skip
    """The fixed class captions: embeddings [classes, L, C] ~ N(0, std²) (zero after each class's length) and
    the keep-mask [classes, L] (class c keeps its first n_c ∈ [min_tokens, L] tokens).

    std = 3 with C = 128 makes the caption tokens after STDiT's y_proj (N(0, 0.02) init) about as large
    as OpenSora's T5-XXL ones (std ≈ 0.08); with N(0, 1/C) entries they are ~0.002 and the class signal
    through cross-attention is not learned in a short run (measured: no effect of the label at all)."""
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(num_classes, length, channels, generator=g) * std
    lengths = torch.randint(min_tokens, length + 1, (num_classes,), generator=g)
    mask = (torch.arange(length)[None] < lengths[:, None]).to(torch.int64)
    return {"class_embeddings": emb * mask[..., None], "class_mask": mask}


@torch.no_grad()
def _label_effect(model: nn.Module, sched: DDPMScheduler, tables: dict[str, torch.Tensor], t: int = 500,
                  device: torch.device | str = "cpu") -> str:  # fmt: skip
    """Diagnostic: ε-MSE on 64 fixed held-out videos noised to t with the right vs a wrong class caption."""
    data = MovingDigitsDataset("heldout", 64, seed=0).tensors()
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(data["x"].shape, generator=g)
    tt = torch.full((64,), t)
    xt = sched.add_noise(data["x"], noise, tt).to(device)
    noise, tt = noise.to(device), tt.to(device)
    was_training = model.training
    model.eval()
    out = []
    for labels in (data["label"], (data["label"] + 1) % 10):
        cond = stdit_class_cond(labels.to(device), tables)
        out.append(F.mse_loss(model(xt, tt, cond["y"], cond["mask"])[:, :1], noise).item())
    model.train(was_training)
    return f"{out[0]:.5f} / {out[1]:.5f}"


def train_stdit(args: argparse.Namespace) -> None:
    from mpq_lightning.models.stdit import STDiT

    cfg = {**STDIT_TRAIN, "seed": args.seed, "class_token_seed": args.seed + 1}
    if args.steps:
        cfg["steps"] = args.steps
    if args.snr_gamma is not None:
        cfg["snr_gamma"] = args.snr_gamma or None
    torch.manual_seed(cfg["seed"])
    g = torch.Generator().manual_seed(cfg["seed"])
    tables = class_token_tables(cfg["class_token_seed"], length=STDIT_CONFIG["model_max_length"],
                                channels=STDIT_CONFIG["caption_channels"], min_tokens=cfg["caption_min_tokens"],
                                std=cfg["caption_std"])  # fmt: skip
    meta_tables = {"class_embeddings": tables["class_embeddings"], "class_mask": tables["class_mask"]}
    dev = torch.device(args.device)
    model = STDiT(**STDIT_CONFIG).to(dev)
    ema = copy.deepcopy(model).requires_grad_(False)
    noise_sched = DDPMScheduler(**NOISE_SCHEDULE)
    vlb = IDDPMTerms(noise_sched)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    t0, losses, mses, epoch, data, perm, pos = time.time(), [], [], -1, None, None, 0
    model.train()
    bs = cfg["batch_size"]
    for step in range(cfg["steps"]):
        if data is None or pos + bs > len(perm):  # fresh motions every epoch
            epoch += 1
            data = MovingDigitsDataset("train", cfg["videos_per_epoch"], seed=cfg["data_seed_base"] + epoch).tensors()
            perm, pos = torch.randperm(len(data["label"]), generator=g), 0
        idx = perm[pos : pos + bs]
        pos += bs
        x0 = data["x"][idx]
        cond = stdit_class_cond(data["label"][idx], meta_tables)
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, NOISE_SCHEDULE["num_train_timesteps"], (bs,), generator=g)
        x0, noise, t = x0.to(dev), noise.to(dev), t.to(dev)
        cond = {k: v.to(dev) for k, v in cond.items()}
        xt = noise_sched.add_noise(x0, noise, t)
        out = model(xt, t, cond["y"], cond["mask"])
        eps, var_out = out[:, :1], out[:, 1:]
        mse = (eps - noise).square().flatten(1).mean(1)
        if cfg["snr_gamma"]:  # min-SNR-γ weighting of the ε loss (Hang et al. 2023): min(SNR, γ) / SNR
            ac = noise_sched.alphas_cumprod.to(dev)[t]
            snr = ac / (1 - ac)
            mse = mse * snr.clamp(max=cfg["snr_gamma"]) / snr
        vb = vlb.vb(x0, xt, t, eps.detach(), var_out)
        loss = (mse + vb).mean()
        _optimise(opt, model, ema, loss, step, cfg)
        losses.append(loss.item())
        mses.append(mse.mean().item())
        if step % 100 == 99 or step == cfg["steps"] - 1:
            print(f"[stdit] step {step + 1}/{cfg['steps']} loss(avg100) {sum(losses[-100:]) / len(losses[-100:]):.4f} "
                  f"mse {sum(mses[-100:]) / len(mses[-100:]):.4f} ({time.time() - t0:.0f}s)", flush=True)  # fmt: skip
        if step % 250 == 249:
            print(f"[stdit] step {step + 1} EMA ε-mse at t=500, right / wrong class: "
                  f"{_label_effect(ema, noise_sched, meta_tables, device=dev)}", flush=True)  # fmt: skip
    wall = time.time() - t0
    meta = {
        "name": "moving-digits-stdit",
        "backbone": "mpq_lightning.models.stdit.STDiT",
        "model_config": STDIT_CONFIG,
        "num_params": sum(p.numel() for p in model.parameters()),
        "latent_shape": [1, 8, 16, 16],
        "data": "MovingDigitsDataset('train', 1438 videos, seed=data_seed_base + epoch): [1, 8, 16, 16] in [-1, 1]",
        "cond": "stdit_class_cond(labels, meta) -> {'y': [B, 1, 8, 128], 'mask': [B, 8]}; null caption = "
        "backbone.y_embedder.y_embedding (STDiTDenoiser.null_cond); tables in moving_digits_stdit_class_tokens.safetensors",
        "prediction_type": "epsilon",
        "learned_sigma": True,
        "cfg_channels": 1,
        "notes": STDIT_NOTES,
        "noise_schedule": {"class": "DDPMScheduler", **NOISE_SCHEDULE},
        "scheduler": STDIT_SCHEDULER,
        "train_config": {**cfg, "loss": "IDDPM hybrid: w(t)·mse(eps) + L_vb (learned_range, mean detached); w = min(SNR, snr_gamma)/SNR if snr_gamma else 1",
                         "optimizer": "AdamW", "lr_schedule": "linear warmup + cosine", "threads": args.threads, "device": args.device,
                         "shipped_weights": "EMA"},  # fmt: skip
        "final_loss_avg100": sum(losses[-100:]) / len(losses[-100:]),
        "final_mse_avg100": sum(mses[-100:]) / len(mses[-100:]),
        "loss_curve_avg100": [round(sum(losses[i : i + 100]) / len(losses[i : i + 100]), 5) for i in range(0, len(losses), 100)],
        "wall_time_s": round(wall, 1),
        "machine": _machine(args.threads),
        "command": f"python benchmarks/train_teachers.py --which stdit --seed {args.seed}"
        + (f" --steps {args.steps}" if args.steps else ""),
    }
    _save(ema.eval().cpu(), "moving_digits_stdit", meta, args.out, extra=tables)
    if not args.no_eval:
        evaluate_stdit(args)


@torch.no_grad()
def evaluate_stdit(args: argparse.Namespace) -> None:
    from mpq_lightning.metrics import (
        VideoFeatureNet,
        class_consistency,
        frame_difference,
        frechet_distance,
        load_video_classifier,
        temporal_consistency,
    )
    from mpq_lightning.models.registry import STDiTDenoiser
    from mpq_lightning.models.sampling import make_scheduler, sample

    backbone, meta = load_digits_teacher("stdit", args.out)
    meta["scheduler"] = spec = STDIT_SCHEDULER
    dev = torch.device(args.device)
    denoiser = STDiTDenoiser(backbone).eval().to(dev)
    clf = load_video_classifier(args.out)
    net = VideoFeatureNet(clf)
    real_held = MovingDigitsDataset("heldout", 359 * 3, seed=0).tensors()
    real_train = MovingDigitsDataset("train", 1438, seed=0).tensors()
    per_class = args.eval_per_class
    labels = torch.arange(10).repeat_interleave(per_class)
    quality: dict[str, Any] = {"num_samples": len(labels), "per_class": per_class, "sampler": spec["name"],
                               "num_inference_steps": spec["num_inference_steps"], "cfg_channels": 1,
                               "noise_seed": 0}  # fmt: skip
    t0 = time.time()
    scales = args.eval_guidance if args.eval_guidance else [1.0]
    for scale in sorted({*map(float, scales), float(spec["guidance_scale"])}):
        noise = torch.randn(len(labels), 1, 8, 16, 16, generator=torch.Generator().manual_seed(0))
        out = []
        for i in range(0, len(labels), 100):
            sched = make_scheduler(spec["name"], **spec["config"])
            cond = stdit_class_cond(labels[i : i + 100].to(dev), meta)
            out.append(sample(denoiser, sched, noise[i : i + 100].to(dev), cond, guidance_scale=scale,
                              num_inference_steps=spec["num_inference_steps"], cfg_channels=1,
                              generator=torch.Generator(dev).manual_seed(i)).cpu())  # fmt: skip
        x = torch.cat(out).clamp(-1, 1)
        quality[f"cfg{scale:g}"] = {
            "class_consistency": class_consistency(x, labels, clf),
            "fvd_vs_heldout": frechet_distance(real_held["x"], x, net),
            "fvd_vs_train": frechet_distance(real_train["x"], x, net),
            "temporal_consistency": temporal_consistency(x),
            "frame_difference": frame_difference(x),
        }
        print(f"[stdit] guidance {scale:g}: {quality[f'cfg{scale:g}']} ({time.time() - t0:.0f}s)", flush=True)
        if scale == float(spec["guidance_scale"]):
            # one row per video (8 frames): the first 2 videos of each class
            videos = x.view(10, per_class, 1, 8, 16, 16)[:, :2].reshape(-1, 1, 8, 16, 16)
            _save_grid(videos.transpose(1, 2).reshape(-1, 1, 16, 16), args.out / "moving_digits_stdit_samples.png", nrow=8)
    quality["reference_real"] = {
        "classifier_digit_acc_heldout": class_consistency(real_held["x"], real_held["label"], clf),
        "fvd_heldout_vs_train": frechet_distance(real_train["x"], real_held["x"], net),
        "temporal_consistency_heldout": temporal_consistency(real_held["x"]),
        "frame_difference_heldout": frame_difference(real_held["x"]),
    }
    quality["eval_wall_time_s"] = round(time.time() - t0, 1)
    meta = {k: v for k, v in meta.items() if k not in ("class_embeddings", "class_mask")}
    meta["quality"] = quality
    (args.out / "moving_digits_stdit.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(json.dumps(quality, indent=2), flush=True)


def _save_grid(x: torch.Tensor, path: Path, nrow: int) -> None:
    """Write images [N, 1, H, W] in [-1, 1] as a PNG grid (skipped when neither PIL nor matplotlib is present)."""
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover
        return
    n, _, h, w = x.shape
    rows = math.ceil(n / nrow)
    grid = torch.full((rows * (h + 1) + 1, nrow * (w + 1) + 1), 0.5)
    for i in range(n):
        r, c = divmod(i, nrow)
        grid[1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + c * (w + 1) : 1 + c * (w + 1) + w] = (x[i, 0] + 1) / 2
    img = (grid.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    Image.fromarray(img, mode="L").resize((img.shape[1] * 4, img.shape[0] * 4), Image.NEAREST).save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--which", choices=("unet", "stdit"), required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=None, help="override the number of training steps")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ASSETS)
    parser.add_argument("--eval-only", action="store_true", help="only re-score the weights in --out")
    parser.add_argument("--snr-gamma", type=float, default=None, help="stdit: min-SNR-γ loss weighting (0 = off)")
    parser.add_argument("--device", default="cpu", help="torch device for training and sampling (metrics run on CPU)")
    parser.add_argument("--no-eval", action="store_true", help="train and save only")
    parser.add_argument("--eval-per-class", type=int, default=None, help="samples per class (unet 50, stdit 20)")
    parser.add_argument("--eval-guidance", type=float, nargs="*", default=None, help="guidance scales to score besides the default one (default: unet 1 2, stdit 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.eval_per_class is None:
        args.eval_per_class = 50 if args.which == "unet" else 20
    if args.which == "unet":
        evaluate_unet(args) if args.eval_only else train_unet(args)
    else:
        evaluate_stdit(args) if args.eval_only else train_stdit(args)


if __name__ == "__main__":
    main()
