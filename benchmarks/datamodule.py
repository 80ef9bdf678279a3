"""TrajectoryDataModule throughput and resident memory on synthetic caches of 1x and 10x size vs the
consumption of a tiny-STDiT training step (CPU).

Caches have tiny-STDiT's shapes (x_t [4, 4, 8, 8], teacher output [8, 4, 8, 8], y [1, 8, 32]); each
size is streamed for one epoch in a fresh subprocess, so that its peak RSS is its own. The training
step and the main-process stream use the same torch thread count (--threads, default 1: on a shared
machine, intra-op threads of tiny ops spin and make both sides 10-50x slower; DataLoader workers
always use one). Writes benchmarks/results/datamodule.json and prints a table.
Targets (issue 5): peak-RSS ratio 10x / 1x <= 1.2; samples/s >= 10x a tiny-STDiT step's consumption.

    python benchmarks/datamodule.py [--trajectories 64] [--batch_size 8] [--workers 0 2] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch

from mpq_lightning.data import TrajectoryDataModule, synthesize_cache

LATENT, OUT_CHANNELS, KEPT_STEPS = (4, 4, 8, 8), 8, list(range(0, 100, 5))  # Q-VDiT: every 5th of 100 steps


# -------------------------------------------------------------------------------------------------
# One measurement (run in a subprocess)
# -------------------------------------------------------------------------------------------------


def stream(cache: str, batch_size: int, workers: int) -> dict[str, float]:
    """Stream one epoch; samples/s, peak RSS and RSS growth over the state after the first batch."""
    process = psutil.Process()
    dm = TrajectoryDataModule(cache, batch_size=batch_size, shuffle_buffer=256, num_workers=workers)
    loader = dm.train_dataloader()
    samples, peak, start, children = 0, 0, None, None
    t0 = time.perf_counter()
    for batch in loader:
        samples += len(batch["uid"])
        children = process.children() if children is None else children  # the workers, started by iter()
        rss = process.memory_info().rss + sum(c.memory_info().rss for c in children)
        start = start or rss
        peak = max(peak, rss)
    seconds = time.perf_counter() - t0
    return {
        "samples": samples,
        "seconds": seconds,
        "samples_per_s": samples / seconds,
        "peak_rss_mib": peak / 2**20,
        "rss_growth_mib": (peak - start) / 2**20,
    }


def train_step_time(batch_size: int, repeats: int = 20) -> float:
    """Median seconds of one tiny-STDiT forward + backward (MSE to the teacher output) on a batch."""
    from mpq_lightning.models import build

    torch.manual_seed(0)
    model = build("tiny-stdit").train()
    x = torch.randn(batch_size, *LATENT)
    t = torch.randint(0, 1000, (batch_size,))
    cond = {"y": torch.randn(batch_size, 1, 8, 32)}
    target = torch.randn(batch_size, OUT_CHANNELS, *LATENT[1:])
    times = []
    for _ in range(repeats + 3):
        t0 = time.perf_counter()
        loss = torch.nn.functional.mse_loss(model(x, t, cond, step_index=None), target)
        loss.backward()
        model.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return sorted(times[3:])[repeats // 2]


# -------------------------------------------------------------------------------------------------
# Driver
# -------------------------------------------------------------------------------------------------


def measure_in_subprocess(cache: Path, batch_size: int, workers: int, threads: int) -> dict[str, float]:
    out = subprocess.run(
        [
            sys.executable,
            __file__,
            "--measure",
            str(cache),
            "--batch_size",
            str(batch_size),
            "--workers",
            str(workers),
            "--threads",
            str(threads),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trajectories", type=int, default=64, help="trajectories of the 1x cache")
    ap.add_argument("--batch_size", type=int, default=8)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (training step and stream)")
    ap.add_argument("--measure", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "datamodule.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.measure:
        print(json.dumps(stream(args.measure, args.batch_size, args.workers[0])))
        return

    step = train_step_time(args.batch_size)
    consumption = args.batch_size / step
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        caches = {}
        for scale in (1, 10):
            trajectories = args.trajectories * scale
            caches[scale] = synthesize_cache(
                Path(tmp) / f"x{scale}",
                LATENT,
                trajectories,
                KEPT_STEPS,
                shard_size=8,
                num_conditions=10,
                out_channels=OUT_CHANNELS,
            )
        for workers in args.workers:
            for scale, cache in caches.items():
                size = sum(f.stat().st_size for f in cache.iterdir() if f.is_file())
                result = measure_in_subprocess(cache, args.batch_size, workers, args.threads)
                rows.append(
                    {
                        "scale": scale,
                        "workers": workers,
                        "cache_mib": size / 2**20,
                        **result,
                        "x_train_step_consumption": result["samples_per_s"] / consumption,
                    }
                )
    ratios = {
        f"workers={w}": {
            "peak_rss_ratio_10x_over_1x": next(r for r in rows if r["scale"] == 10 and r["workers"] == w)[
                "peak_rss_mib"
            ]
            / next(r for r in rows if r["scale"] == 1 and r["workers"] == w)["peak_rss_mib"]
        }
        for w in args.workers
    }
    report = {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpus": psutil.cpu_count(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
        "setup": {
            "latent": LATENT,
            "teacher_output_channels": OUT_CHANNELS,
            "kept_steps": len(KEPT_STEPS),
            "branches": 2,
            "batch_size": args.batch_size,
            "shuffle_buffer": 256,
            "trajectories_per_shard": 8,
        },
        "tiny_stdit_train_step_s": step,
        "tiny_stdit_consumption_samples_per_s": consumption,
        "streams": rows,
        "ratios": ratios,
        "targets": {"peak_rss_ratio_max": 1.2, "x_train_step_consumption_min": 10},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(f"tiny-STDiT train step (batch {args.batch_size}): {step * 1e3:.1f} ms = {consumption:.0f} samples/s")
    print(
        f"{'scale':>5} {'workers':>7} {'cache MiB':>9} {'samples':>7} {'samples/s':>9} {'x step':>7} {'peak RSS MiB':>12} {'growth MiB':>10}"
    )
    for r in rows:
        print(
            f"{r['scale']:>5} {r['workers']:>7} {r['cache_mib']:>9.1f} {r['samples']:>7} {r['samples_per_s']:>9.0f} "
            f"{r['x_train_step_consumption']:>7.1f} {r['peak_rss_mib']:>12.1f} {r['rss_growth_mib']:>10.1f}"
        )
    for key, value in ratios.items():
        print(f"{key}: peak RSS 10x / 1x = {value['peak_rss_ratio_10x_over_1x']:.3f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
