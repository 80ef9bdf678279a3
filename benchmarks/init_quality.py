"""Sample quality of the calibrated, untrained student against naive PTQ (min-max, uniform, no LoRA).

A method's initialisation (FZ-RMQ, Lp range search, OOLRI, TQE) should start training from a student at
least as good as the baseline the final report compares against. This builds a config's QATModule,
calibrates it as a fit would (``QATModule.calibrate_from``), and compares it and naive PTQ as the final
report does (``final_report.compare_with_naive_ptq``: FP samples from the same noise, the training sampler).
Each variant is the config plus command-line overrides.

    python benchmarks/init_quality.py [--config configs/digits_unet_w3a6.yaml] [--samples 32]
        [--variant "name=--model.quant.w_init minmax --model.quant.a_init minmax" ...]

Writes benchmarks/results/init_quality_<config stem>.json and prints one row per variant.
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VARIANTS = {  # name: overrides of the config (the digits UNet W3A6 recipe's switches, one at a time)
    "config as is": "",
    "uniform, min-max, no LoRA / TQE": "--model.quant.w_quantizer uniform --model.quant.w_init minmax "
                                       "--model.quant.a_init minmax --model.quant.lora_rank 0 --model.quant.tqe false",
    "FZ-RMQ, min-max, no LoRA / TQE": "--model.quant.w_init minmax --model.quant.a_init minmax "
                                      "--model.quant.lora_rank 0 --model.quant.tqe false",
    "OMQ, min-max, no LoRA / TQE": "--model.quant.w_quantizer omq --model.quant.w_init minmax "
                                   "--model.quant.a_init minmax --model.quant.lora_rank 0 --model.quant.tqe false",
    "uniform, Lp weights, min-max acts, no LoRA / TQE": "--model.quant.w_quantizer uniform --model.quant.a_init minmax "
                                                        "--model.quant.lora_rank 0 --model.quant.tqe false",
}


def measure(config: str, overrides: list[str], samples: int) -> dict:
    """One variant, in this process: the rows of ``compare`` for naive PTQ and the untrained student."""
    from mpq_lightning.callbacks.final_report import compare_with_naive_ptq
    from mpq_lightning.cli import MPQCLI

    argv, sys.argv = sys.argv, sys.argv[:1]
    try:
        cli = MPQCLI(args=["--config", config, "--trainer.logger", "false", *overrides], run=False)
    finally:
        sys.argv = argv
    module, dm = cli.model, cli.datamodule
    dm.prepare_cache(module.teacher)
    dm.setup("fit")
    module.calibrate_from(dm)
    return compare_with_naive_ptq(module, dm, samples, 1234, student_name="untrained student")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(REPO / "configs" / "digits_unet_w3a6.yaml"))
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--variant", action="append",
                    help="name=overrides, the name without '=' (repeatable); default: the built-in set")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # a single variant's overrides, in a child process
    args = ap.parse_args()
    if args.one is not None:
        print(json.dumps(measure(args.config, shlex.split(args.one), args.samples)))
        return
    variants = dict(v.split("=", 1) for v in args.variant) if args.variant else VARIANTS
    rows = {}
    for name, overrides in variants.items():  # a process each: calibration state never leaks between them
        start = time.time()
        proc = subprocess.run([sys.executable, __file__, "--config", args.config, "--samples", str(args.samples),
                               "--one", overrides], capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"variant {name!r} ({overrides}) failed:\n{proc.stderr[-3000:]}")
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        rows[name] = {"overrides": overrides, "seconds": round(time.time() - start, 1),
                      "naive PTQ": result["naive PTQ"], "untrained student": result["untrained student"],
                      "FP": result["FP"]}
        ptq, ours = result["naive PTQ"], result["untrained student"]
        print(f"{name:50s} PSNR vs FP: PTQ {ptq['psnr_vs_fp']:.2f}, untrained {ours['psnr_vs_fp']:.2f}; "
              f"fd_real: FP {result['FP']['fd_real']:.1f}, PTQ {ptq['fd_real']:.1f}, untrained {ours['fd_real']:.1f}",
              flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    out = REPO / "benchmarks" / "results" / f"init_quality_{Path(args.config).stem}.json"
    out.write_text(json.dumps({"config": args.config, "samples": args.samples, "commit": commit,
                               "date": time.strftime("%Y-%m-%d"), "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
