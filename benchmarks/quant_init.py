"""Vectorised grid-search weight-quantizer initialisation vs a per-channel Python loop (CPU).

Shapes are STDiT-XL/2's linears. Writes benchmarks/results/quant_init.json and prints a table.
Target (issue 3): speed-up >= 50x.

    python benchmarks/quant_init.py [--bits 3] [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from mpq_lightning.quant.functional import _quant_dequant, init_grid_search, qparams_from_range, qrange

SHAPES = [(1152, 1152), (4608, 1152), (1152, 4608)]


def loop_reference(w: torch.Tensor, bits: int, num_ratios: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
    """The released Q-VDiT style: for every output channel, for every ratio, quantize and score."""
    qmin, qmax = qrange(bits, False)
    ratios = [i / num_ratios for i in range(num_ratios)] + [1.0]
    scales, zeros = [], []
    for row in w:
        lo, hi = row.min(), row.max()
        best = (float("inf"), None, None)
        for r in ratios:
            s, z = qparams_from_range(r * lo, r * hi, bits, False)
            err = (_quant_dequant(row, s, z, qmin, qmax) - row).pow(2).sum().item()
            if err < best[0]:
                best = (err, s, z)
        scales.append(best[1])
        zeros.append(best[2])
    return torch.stack(scales).view(-1, 1), torch.stack(zeros).view(-1, 1)


def timed(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "quant_init.json"))
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = []
    for shape in SHAPES:
        w = torch.randn(shape) * 0.02
        t_vec, (s_vec, _) = timed(lambda: init_grid_search(w, args.bits, False), args.repeats)
        t_loop, (s_loop, _) = timed(lambda: loop_reference(w, args.bits), 1)
        agree = torch.allclose(s_vec, s_loop, rtol=1e-5, atol=0)
        rows.append(dict(shape=list(shape), vectorised_s=t_vec, loop_s=t_loop, speedup=t_loop / t_vec, same_result=agree))
        print(f"{shape[0]}x{shape[1]}: vectorised {t_vec:.3f}s, loop {t_loop:.2f}s, speed-up {t_loop / t_vec:.0f}x, same result: {agree}")
    result = dict(
        benchmark="quant_init grid search (51 ratios incl. 1.0), per-output-channel, CPU",
        bits=args.bits, torch=torch.__version__, threads=torch.get_num_threads(), machine=platform.machine(),
        cpu_count=__import__("os").cpu_count(), rows=rows,
        min_speedup=min(r["speedup"] for r in rows),
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"min speed-up {result['min_speedup']:.0f}x -> {args.out}")


if __name__ == "__main__":
    main()
