"""Smallest end-to-end QAT demo: W4A8 EfficientDM-style distillation of a tiny random UNet.

    python -m mpq_lightning.demo [--steps 10] [--trajectories 4] [--w-bits 4] [--a-bits 8]

A randomly initialised diffusers ``UNet2DModel`` is the FP teacher; a copy is fake-quantized
(timestep-aware activation steps, LoRA merged before the weight quantizer), calibrated on one
teacher DDIM trajectory, then distilled on teacher-forced trajectories (one optimiser step per
sampler step, output MSE). It prints the student-teacher error before and after. No weights are
downloaded; the numbers only show that the machinery learns, not image quality.
"""
from __future__ import annotations

import argparse
import copy

import torch
from diffusers import DDIMScheduler, UNet2DModel
from rich.console import Console
from rich.table import Table

from .quant import QuantConfig, calibrate, quantize_model, step_index_context


def tiny_unet(seed: int = 0) -> UNet2DModel:
    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8, attention_head_dim=8,
    ).eval()


def trajectory_error(student, teacher, scheduler, noise: torch.Tensor) -> float:
    """Mean squared student-teacher ε error along the teacher's trajectory."""
    x, errs = noise, []
    with torch.no_grad():
        for i, t in enumerate(scheduler.timesteps):
            tt = t.repeat(x.shape[0])
            eps_t = teacher(x, tt).sample
            with step_index_context(student, i):
                eps_s = student(x, tt).sample
            errs.append((eps_s - eps_t).pow(2).mean().item())
            x = scheduler.step(eps_t, t, x).prev_sample
    return sum(errs) / len(errs)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10, help="DDIM steps per trajectory")
    ap.add_argument("--trajectories", type=int, default=4, help="training trajectories")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--w-bits", type=int, default=4)
    ap.add_argument("--a-bits", type=int, default=8)
    ap.add_argument("--lora-rank", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-4, help="LoRA learning rate")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    console = Console()

    teacher = tiny_unet(args.seed).requires_grad_(False)
    config = QuantConfig(
        w_bits=args.w_bits, a_bits=args.a_bits, num_steps=args.steps, lora_rank=args.lora_rank,
        bit_map={"conv_in": {"w": 8, "a": 8}, "conv_out": {"w": 8, "a": 8}}, lora_exclude=["conv_in", "conv_out"],
    )
    student = quantize_model(copy.deepcopy(teacher), config, verbose=False)
    scheduler = DDIMScheduler(num_train_timesteps=1000)
    scheduler.set_timesteps(args.steps)
    gen = torch.Generator().manual_seed(args.seed)
    calib_noise = torch.randn(args.batch, 3, 8, 8, generator=gen)

    def run_calibration(model):
        x = calib_noise
        for i, t in enumerate(scheduler.timesteps):
            tt = t.repeat(x.shape[0])
            with step_index_context(model, i):
                model(x, tt)
            x = scheduler.step(teacher(x, tt).sample, t, x).prev_sample

    with torch.no_grad():
        calibrate(student, run_calibration)
    eval_noise = torch.randn(args.batch, 3, 8, 8, generator=torch.Generator().manual_seed(args.seed + 10_000))
    before = trajectory_error(student, teacher, scheduler, eval_noise)

    groups = {"lora": [], "weight_quantizer": [], "act_quantizer": []}  # EfficientDM's three lr groups
    for name, p in student.named_parameters():
        if p.requires_grad:
            groups[next(k for k in groups if f"{k}." in name or name.startswith(k))].append(p)
    opt = torch.optim.AdamW([
        {"params": groups["lora"], "lr": args.lr},
        {"params": groups["weight_quantizer"], "lr": 1e-6},
        {"params": groups["act_quantizer"], "lr": 5e-4},
    ])
    for traj in range(args.trajectories):
        x = torch.randn(args.batch, 3, 8, 8, generator=torch.Generator().manual_seed(args.seed + traj))
        for i, t in enumerate(scheduler.timesteps):  # one optimiser step per sampler step
            tt = t.repeat(x.shape[0])
            with torch.no_grad():
                eps_t = teacher(x, tt).sample
            with step_index_context(student, i):
                loss = (student(x, tt).sample - eps_t).pow(2).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
            x = scheduler.step(eps_t, t, x).prev_sample  # teacher forcing
    after = trajectory_error(student, teacher, scheduler, eval_noise)

    table = Table(title=f"tiny UNet, W{args.w_bits}A{args.a_bits}, {args.steps} DDIM steps")
    table.add_column("student vs FP teacher")
    table.add_column("mean ε MSE over the trajectory")
    table.add_row("after calibration (PTQ)", f"{before:.5f}")
    table.add_row(f"after {args.trajectories} QAT trajectories", f"{after:.5f}")
    console.print(table)
    return {"ptq": before, "qat": after}


if __name__ == "__main__":
    main()
