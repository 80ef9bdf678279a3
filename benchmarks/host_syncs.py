"""Host syncs of one QAT training step on a GPU: what the step reads back from the device, and where.

    python benchmarks/host_syncs.py [--steps 4] [--modes eager,model] [--out FILE]

Builds the tiny STDiT with our full method as ``benchmarks/step_time.py`` does (W3A6 FZ-RMQ + OOLRI +
TQE + MTRD + TMD, TALSQ over 10 steps, the MTRD memory queue attached) and runs training steps on a
batch as the data modules give it (``step_index_host`` included): ``compute_losses``, backward, the
module's AdamW step, and ``PerTimestepError.update`` as its callback makes it after each batch. Under
``torch.cuda.set_sync_debug_mode("warn")`` every CUDA call that waits for the device warns; the script
counts them per step, by the source line that made them. Each sync stops the host from queueing work
ahead of the GPU, which a small model's step, bound by kernel launches, feels most. Not counted:
``QATModule.check_finite``'s one read per optimiser step (by design: it stops a NaN step before the
update) and Lightning's own logging. Mode ``model`` compiles both backbones (``compile_model``).

Needs CUDA for the counts (``--device cpu`` runs the same steps and reports none: a CPU does not sync).
Writes benchmarks/results/host_syncs_<device>.json.
"""
from __future__ import annotations

import argparse
import collections
import json
import warnings
from pathlib import Path

import torch

from mpq_lightning.callbacks import PerTimestepError
from mpq_lightning.models import build
from step_time import batch_for, qat_setup


def count_syncs(device: torch.device, mode: str, steps: int) -> dict:
    b = batch_for(build("tiny-stdit"), 4, device)
    module, _, qat_step = qat_setup("tiny-stdit", {}, b, device, False, "model" if mode == "model" else None)
    errors = PerTimestepError(num_steps=10)

    def step():
        qat_step()  # compute_losses + backward + AdamW
        last = module._last
        errors.update(last["out_s"], last["out_t"], last["step_index"], "train", last.get("step_index_host"))

    for _ in range(2):  # warm-up: compilation, lazy buffers, caches
        step()
    per_step, where = [], collections.Counter()
    for _ in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("warn")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            step()
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode("default")
        syncs = [w for w in caught if "synchroniz" in str(w.message).lower()]
        per_step.append(len(syncs))
        where.update(f"{Path(w.filename).name}:{w.lineno}" for w in syncs)
    return {"mode": mode, "steps": steps, "syncs_per_step": per_step,
            "by_line": {k: v / steps for k, v in where.most_common()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--modes", default="eager,model", help="comma-separated: eager, model (compile_model)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    device = torch.device(args.device)
    modes = [m for m in args.modes.split(",") if m]
    if bad := [m for m in modes if m not in ("eager", "model")]:
        ap.error(f"--modes: unknown {bad}; choose from ['eager', 'model']")
    out = Path(args.out or Path(__file__).parent / "results" / f"host_syncs_{device.type}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    info = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu (no syncs to detect)",
            "torch": torch.__version__, "rows": []}
    for mode in modes:  # written after each mode, so a run cut short keeps what it finished
        info["rows"].append(count_syncs(device, mode, args.steps))
        out.write_text(json.dumps(info, indent=2))
        row = info["rows"][-1]
        print(f"{mode}: syncs per step {row['syncs_per_step']}; by line: {row['by_line'] or 'none'}")
    print(f"-> {out}")


if __name__ == "__main__":
    main()
