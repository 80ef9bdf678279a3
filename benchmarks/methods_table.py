"""Every method side by side on the shipped digits teachers -> docs/results.md + PNG plots.

    python benchmarks/methods_table.py                 # full table (W4A6, W3A6, W2A4; both teachers)
    python benchmarks/methods_table.py --smoke         # tiny budgets, W3A6, one teacher (CI)

Rows: FP, naive PTQ (min-max, no training), EfficientDM, MPQ-DM, Q-VDiT, MPQ-DMv2, ours; plus an
ablation adding each MPQ-DMv2 / Q-VDiT component to the EfficientDM base one at a time (W3A6, video).
Same seeds, same step budget, same trajectory cache for every method of a teacher (the configs
configs/default.yaml and configs/digits_unet_w3a6.yaml with per-method overrides). Metrics
(mpq_lightning.compare): Fréchet distance to held-out real data in our feature network's space,
class consistency, PSNR/SSIM vs the FP teacher from the same noise, temporal consistency (video).
The script writes the markdown and plots itself from the runs.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mpq_lightning.cli import main as cli_main  # noqa: E402
from mpq_lightning.compare import SamplerSpec, compare, naive_ptq  # noqa: E402
from mpq_lightning.quant import set_quant_state  # noqa: E402

TEACHERS = {"video": REPO / "configs" / "default.yaml", "image": REPO / "configs" / "digits_unet_w3a6.yaml"}
SETTINGS = {"W4A6": (4, 6), "W3A6": (3, 6), "W2A4": (2, 4)}

# per-method overrides on top of the teacher's config (which is "ours")
_BASE_OFF = ["--model.loss.mtrd", "false", "--model.loss.tmd", "false", "--model.quant.tqe", "false",
             "--model.loss.trd", "false"]
METHODS = {
    "EfficientDM": _BASE_OFF + ["--model.quant.w_quantizer", "uniform", "--model.quant.lora_init", "kaiming_zero",
                                "--model.quant.lora_quantized_base", "false"],
    "MPQ-DM": _BASE_OFF + ["--model.quant.w_quantizer", "omq", "--model.quant.smooth_alpha", "0.5",
                           "--model.quant.lora_init", "kaiming_zero", "--model.quant.lora_quantized_base", "false",
                           "--model.loss.trd", "true", "--model.loss.trd_weight", "1.0"],
    "Q-VDiT": _BASE_OFF + ["--model.quant.w_quantizer", "uniform", "--model.quant.w_init", "grid",
                           "--model.quant.a_quantizer", "dynamic_token", "--model.calib.train_act_quant", "false",
                           "--model.quant.lora_init", "kaiming_zero", "--model.quant.lora_quantized_base", "false",
                           "--model.quant.tqe", "true", "--model.loss.tmd", "VIDEO"],
    "MPQ-DMv2": _BASE_OFF + ["--model.loss.mtrd", "true"],
    "ours": [],
}
ABLATION = {
    "base (EfficientDM)": METHODS["EfficientDM"],
    "+ FZ-RMQ": _BASE_OFF + ["--model.quant.lora_init", "kaiming_zero", "--model.quant.lora_quantized_base", "false"],
    "+ OOLRI": _BASE_OFF,
    "+ MTRD": _BASE_OFF + ["--model.loss.mtrd", "true"],
    "+ TQE": _BASE_OFF + ["--model.loss.mtrd", "true", "--model.quant.tqe", "true"],
    "+ TMD (= ours)": [],
}


def _overrides(method_args: list[str], video: bool) -> list[str]:
    out = []
    for a in method_args:
        out.append(("true" if video else "false") if a == "VIDEO" else a)
    return out


def run_one(teacher: str, setting: str, method: str, args: list[str], steps: int, root: Path) -> dict:
    w, a = SETTINGS[setting]
    run = f"{teacher}_{setting}_{method}".replace(" ", "").replace("(", "").replace(")", "").replace("+", "p").replace("=", "")
    argv = ["--config", str(TEACHERS[teacher]), "--run_name", run, "--trainer.default_root_dir", str(root),
            "--trainer.max_steps", str(steps), "--model.quant.w_bits", str(w), "--model.quant.a_bits", str(a),
            "--trainer.callbacks=[]", "--log_samples", "false", "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false", *_overrides(args, teacher == "video")]
    t0 = time.time()
    cli = cli_main(argv)
    return {"cli": cli, "train_s": time.time() - t0}


def spec_of(cli) -> SamplerSpec:
    r = cli.datamodule.manifest["recipe"]
    return SamplerSpec(r["scheduler"], r["scheduler_config"], r["num_inference_steps"], r["guidance_scale"])


def table_rows(teacher: str, setting: str, methods: dict, steps: int, n: int, root: Path) -> dict[str, dict]:
    trained, ptq, spec, fp_teacher = {}, None, None, None
    for name, args in methods.items():
        res = run_one(teacher, setting, name, args, steps, root)
        cli = res["cli"]
        module = cli.model
        set_quant_state(module.student.backbone, True, True)
        trained[name] = module.student
        if ptq is None:  # naive PTQ of the same teacher, calibrated on the same cache
            loader = cli.datamodule.train_dataloader()
            batches = [b for _, b in zip(range(module.calib_cfg.num_batches), loader)]
            ptq, spec, fp_teacher = naive_ptq(module.teacher, module.quant_cfg, batches), spec_of(cli), module.teacher
        print(f"[{teacher} {setting}] {name}: trained {steps} steps in {res['train_s']:.0f} s", flush=True)
    rows = compare({"naive PTQ": ptq, **trained}, fp_teacher, spec, n)
    return rows


def _fmt(v) -> str:
    return "-" if v is None else (f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}")


def write_markdown(results: dict, meta: dict, out: Path) -> None:
    cols = ["fd_real", "class_consistency", "psnr_vs_fp", "ssim_vs_fp", "temporal_consistency"]
    lines = ["# Methods on the shipped digits teachers", "",
             f"Written by `benchmarks/methods_table.py` ({meta['mode']}) on {meta['date']}, {meta['device']}; "
             f"{meta['steps']} training steps per method, {meta['samples']} samples per row, same seeds and cache "
             "for every method of a teacher. fd_real: Fréchet distance to held-out real data in our feature net's "
             "space (lower is better); class_consistency: share of samples our classifier assigns to their class; "
             "psnr/ssim vs the FP teacher's samples from the same noise; temporal_consistency: consecutive-frame "
             "feature cosine (video).", ""]
    for key, rows in results.items():
        lines += [f"## {key}", "", "| model | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 1)]
        for name, r in rows.items():
            lines.append(f"| {name} | " + " | ".join(_fmt(r.get(c)) for c in cols) + " |")
        fp, ptq, ours = rows.get("FP", {}), rows.get("naive PTQ", {}), rows.get("ours", rows.get("+ TMD (= ours)", {}))
        if "fd_real" in fp and "fd_real" in ptq and "fd_real" in ours and ptq["fd_real"] != fp["fd_real"]:
            gap = (ptq["fd_real"] - ours["fd_real"]) / (ptq["fd_real"] - fp["fd_real"])
            lines += ["", f"Fraction of the naive-PTQ → FP Fréchet-distance gap closed by ours: {gap:.1%}"]
        lines.append("")
    out.write_text("\n".join(lines))


def plot(results: dict, out_dir: Path) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    for key, rows in results.items():
        names = list(rows)
        vals = [rows[n].get("fd_real", float("nan")) for n in names]
        fig, ax = plt.subplots(figsize=(7, 3))
        ax.bar(names, vals)
        ax.set_ylabel("Fréchet distance to real (↓)")
        ax.set_title(key)
        ax.tick_params(axis="x", rotation=30)
        fig.tight_layout()
        path = out_dir / f"results_{key.replace(' ', '_').replace('/', '')}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path.name)
    return written


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny budgets: W3A6, video teacher, 2 methods, 2 steps")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--out", default=str(REPO / "docs"))
    ap.add_argument("--root", default=str(REPO / "checkpoints" / "methods_table"))
    ap.add_argument("--teachers", nargs="+", default=list(TEACHERS))
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS))
    args = ap.parse_args()
    root, out = Path(args.root), Path(args.out)
    methods, ablation = METHODS, ABLATION
    teachers, settings, steps, samples = args.teachers, args.settings, args.steps, args.samples
    if args.smoke:
        methods = {k: METHODS[k] for k in ("EfficientDM", "ours")}
        ablation, teachers, settings, steps, samples = {}, ["video"], ["W3A6"], 2, 8
    results = {}
    t0 = time.time()
    for teacher in teachers:
        for setting in settings:
            results[f"{teacher} {setting}"] = table_rows(teacher, setting, methods, steps, samples, root)
    if ablation:
        results["ablation video W3A6"] = table_rows("video", "W3A6", ablation, steps, samples, root)
    meta = {"mode": "smoke" if args.smoke else "full", "date": time.strftime("%Y-%m-%d"), "steps": steps,
            "samples": samples, "device": "CPU" if not torch.cuda.is_available() else torch.cuda.get_device_name(),
            "wall_s": round(time.time() - t0)}
    out.mkdir(parents=True, exist_ok=True)
    name = "results_smoke" if args.smoke else "results"
    write_markdown(results, meta, out / f"{name}.md")
    (out / f"{name}.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    if not args.smoke:
        plot(results, out)
    print(f"wrote {out / (name + '.md')} in {meta['wall_s']} s")


if __name__ == "__main__":
    main()
