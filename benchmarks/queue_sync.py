"""MTRD memory-queue writes under DDP: one gather per sample vs one gather per batch.

    python benchmarks/queue_sync.py [--ranks 2] [--batch 4] [--repeats 50] [--out FILE]

Spawns ``--ranks`` gloo processes (CPU, one thread each). Every rank enqueues a batch of teacher
features [batch, 64, 2, 4, 4] per step, each sample at its own sampler step, the way
``QATModule.compute_losses`` does: ``MemoryQueue.enqueue_and_sync`` once per sample (one collective
and a few host syncs per sample) against ``enqueue_many_and_sync`` once per batch (one collective and
one host sync per batch; the same queue, tests/test_memory_queue.py), and against the same batch
gathered without a bound on the ranks' counts (``per_batch_two_collectives``: the counts and steps
first, then the vectors, as before the bound). Writes the median milliseconds per step of each to
benchmarks/results/queue_sync_cpu.json.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mpq_lightning.callbacks.memory_queue import MemoryQueue


def _work(rank: int, ranks: int, port: int, batch: int, repeats: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=ranks)
    try:
        feats = torch.randn(batch, 64, 2, 4, 4, generator=torch.Generator().manual_seed(rank))
        steps = [(3 + 4 * i + rank) % 20 for i in range(batch)]
        medians: dict[str, list[float]] = {"per_sample": [], "per_batch": [], "per_batch_two_collectives": []}
        for _ in range(2):  # alternate the two, twice
            for mode in medians:
                queue = MemoryQueue(num_steps=20, pixels_per_step=64, seed=0)
                times = []
                for it in range(repeats + 5):
                    dist.barrier()
                    t0 = time.perf_counter()
                    if mode == "per_sample":
                        for i, step in enumerate(steps):
                            queue.enqueue_and_sync(feats[i : i + 1], step)
                    elif mode == "per_batch":
                        queue.enqueue_many_and_sync(feats, steps)
                    else:  # the same draws, gathered with the counts and steps in a collective of their own
                        drawn = queue.queue.select_pixels(feats, generator=queue.generator, per_sample=True)
                        queue.queue.all_gather_many_(list(drawn), steps)
                    if it >= 5:  # warm-up
                        times.append(time.perf_counter() - t0)
                medians[mode].append(statistics.median(times))
        if rank == 0:
            Path(out).write_text(json.dumps({k: min(v) for k, v in medians.items()}))
    finally:
        dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "queue_sync_cpu.json"))
    args = ap.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw.json"
        mp.spawn(_work, args=(args.ranks, port, args.batch, args.repeats, str(raw)), nprocs=args.ranks)
        medians = json.loads(raw.read_text())
    result = {"ranks": args.ranks, "batch": args.batch, "repeats": args.repeats, "backend": "gloo (CPU)",
              "torch": torch.__version__,
              **{f"{k}_ms_per_step": round(v * 1e3, 3) for k, v in medians.items()},
              "speedup": round(medians["per_sample"] / medians["per_batch"], 2),
              "one_vs_two_collectives_speedup": round(medians["per_batch_two_collectives"] / medians["per_batch"], 2)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(result)
    print(f"-> {out}")


if __name__ == "__main__":
    main()
