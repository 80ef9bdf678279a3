"""Every method side by side on the shipped digits teachers -> docs/results.md + PNG plots.

    python benchmarks/methods_table.py                 # full table (W4A6, W3A6, W2A4; both teachers)
    python benchmarks/methods_table.py --smoke         # tiny budgets: W3A6, both teachers, 2 methods (CI)
    python benchmarks/methods_table.py --resume        # keep the tables of <out>/results.partial.json, run the rest

Rows: FP, naive PTQ (min-max, no training), EfficientDM, MPQ-DM, Q-VDiT, MPQ-DMv2, ours; plus an
ablation adding each MPQ-DMv2 / Q-VDiT component to the EfficientDM base one at a time (W3A6, video).
Same seeds, same step budget, same trajectory cache for every method of a teacher (the configs
configs/default.yaml and configs/digits_unet_w3a6.yaml with per-method overrides). Metrics
(mpq_lightning.compare): Fréchet distance to held-out real data in our feature network's space,
class consistency, PSNR/SSIM vs the FP teacher from the same noise, temporal consistency (video).
The script writes the markdown and plots itself from the runs. Every finished table goes to
``<out>/<name>.partial.{md,json}`` at once; ``--resume`` takes the tables of that file (same mode,
steps and samples) as they are and runs only the others, so a full run (hours on 2 cores) can be
spread over several sittings. Each table's date and git commit are recorded (``meta.tables``) and
printed in the markdown.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
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

#: follow-up probes of the table's findings (``--probes``): is Q-VDiT's lead its dynamic per-token
#: activation quantizer, and is the W2A4 UNet collapse of MPQ-DMv2 / ours FZ-RMQ's 1-bit base?
PROBES = {
    ("video", "W3A6"): {
        "ours": [],
        "ours + dynamic per-token activations": ["--model.quant.a_quantizer", "dynamic_token",
                                                 "--model.calib.train_act_quant", "false"],
    },
    ("image", "W2A4"): {
        "ours": [],
        "ours with uniform weights (no FZ-RMQ)": ["--model.quant.w_quantizer", "uniform"],
        "ours with OMQ weights": ["--model.quant.w_quantizer", "omq"],
    },
    ("image", "W3A6"): {  # the split search as released: min-max class fits scored, then w_init's fitted
        "MPQ-DM": METHODS["MPQ-DM"],
        "MPQ-DM, release split search (min-max fits)": METHODS["MPQ-DM"] + ["--model.quant.omq_search_init", "minmax"],
    },
}


def _overrides(method_args: list[str], video: bool) -> list[str]:
    out = []
    for a in method_args:
        out.append(("true" if video else "false") if a == "VIDEO" else a)
    return out


def run_one(teacher: str, setting: str, method: str, args: list[str], steps: int, root: Path,
            data_args: list[str]) -> dict:
    w, a = SETTINGS[setting]
    run = f"{teacher}_{setting}_{method}".replace(" ", "").replace("(", "").replace(")", "").replace("+", "p").replace("=", "")
    argv = ["--config", str(TEACHERS[teacher]), "--run_name", run, "--trainer.default_root_dir", str(root),
            "--trainer.max_steps", str(steps), "--model.quant.w_bits", str(w), "--model.quant.a_bits", str(a),
            "--trainer.callbacks=[]", "--overwrite_run", "true", "--log_samples", "false", "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false", *data_args, *_overrides(args, teacher == "video")]
    t0 = time.time()
    cli = cli_main(argv)
    return {"cli": cli, "train_s": time.time() - t0}


def spec_of(cli) -> SamplerSpec:
    r = cli.datamodule.manifest["recipe"]
    return SamplerSpec(r["scheduler"], r["scheduler_config"], r["num_inference_steps"], r["guidance_scale"])


#: trained students by (teacher, setting, overrides): the ablation's first and last rows are the same
#: runs as EfficientDM and ours, trained once
_TRAINED: dict[tuple, tuple] = {}
#: per (teacher, setting, samples, data): the naive PTQ model, sampler, FP teacher and every row's metrics so far
#: (sampling is seeded, so a row is the same in every table: the ablation samples only its new rows)
_SCOPES: dict[tuple, dict] = {}


def data_args_of(teacher: str, cache_dir: str | None, num_trajectories: int | None,
                 calib_batches: int | None = None) -> list[str]:
    """Overrides moving a teacher's trajectory cache under ``cache_dir`` (and shrinking it and the
    calibration for smoke runs).
    Every cached trajectory trains: the table's rows compare methods, not validation (the embedded
    default holds four out for its own validation)."""
    out = ["--data.init_args.val_trajectories", "null"]
    if cache_dir:
        name = "moving_digits_ddim20" if teacher == "video" else "digits_unet_ddim20"
        out += ["--data.init_args.cache", str(Path(cache_dir) / name)]
    if num_trajectories:
        out += ["--data.init_args.recipe.num_trajectories", str(num_trajectories)]
    if calib_batches:
        out += ["--model.calib.num_batches", str(calib_batches)]
    return out


def table_rows(teacher: str, setting: str, methods: dict, steps: int, n: int, root: Path,
               data_args: list[str] = ()) -> dict[str, dict]:
    trained, keys = {}, {"FP": "FP", "naive PTQ": "naive PTQ"}  # row name -> its key in the scope's rows
    scope = _SCOPES.setdefault((teacher, setting, n, tuple(data_args)), {"rows": {}})
    for name, args in methods.items():
        key = keys[name] = (teacher, setting, tuple(args))
        if key in _TRAINED:
            trained[name], cli = _TRAINED[key]
            print(f"[{teacher} {setting}] {name}: same run as an earlier row, reused", flush=True)
        else:
            res = run_one(teacher, setting, name, args, steps, root, list(data_args))
            cli = res["cli"]
            set_quant_state(cli.model.student.backbone, True, True)
            trained[name] = cli.model.student
            _TRAINED[key] = (trained[name], cli)
            print(f"[{teacher} {setting}] {name}: trained {steps} steps in {res['train_s']:.0f} s", flush=True)
        module = cli.model
        if "ptq" not in scope:  # naive PTQ of the same teacher, calibrated on the same cache
            loader = cli.datamodule.train_dataloader()
            batches = [b for _, b in zip(range(module.calib_cfg.num_batches), loader)]
            scope.update(ptq=naive_ptq(module.teacher, module.quant_cfg, batches), spec=spec_of(cli), fp=module.teacher)
    done = scope["rows"]
    models = {"naive PTQ": scope["ptq"], **trained}
    todo = {name: model for name, model in models.items() if keys[name] not in done}
    if todo:
        fresh = compare(todo, scope["fp"], scope["spec"], n)
        done.update({keys[name]: row for name, row in fresh.items()})
    return {name: done[keys[name]] for name in ["FP", *models]}


def _fmt(v) -> str:
    return "-" if v is None else (f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}")


def gap_closed(fp: float, ptq: float, ours: float) -> float | None:
    """(PTQ − ours) / (PTQ − FP): 1 = ours matches FP, 0 = no better than naive PTQ; None without a gap."""
    return None if ptq <= fp else (ptq - ours) / (ptq - fp)


def write_markdown(results: dict, meta: dict, out: Path, plots: dict[str, str] | None = None) -> None:
    cols = ["fd_real", "class_consistency", "psnr_vs_fp", "ssim_vs_fp", "temporal_consistency"]
    lines = ["# Methods on the shipped digits teachers", "",
             f"Written by `benchmarks/methods_table.py` ({meta['mode']}) on {meta['date']}, {meta['device']}; "
             f"{meta['steps']} training steps per method, {meta['samples']} samples per row, same seeds and cache "
             "for every method of a teacher. fd_real: Fréchet distance to held-out real data in our feature net's "
             "space (lower is better); class_consistency: share of samples our classifier assigns to their class; "
             "psnr/ssim vs the FP teacher's samples from the same noise; temporal_consistency: consecutive-frame "
             f"feature cosine (video). Wall time of the {'last sitting' if meta.get('resumed') else 'whole run'}: "
             f"{meta['wall_s']} s. Regenerate with "
             f"`python benchmarks/methods_table.py{ {'smoke': ' --smoke', 'probes': ' --probes'}.get(meta['mode'], '') }`.", ""]
    if meta.get("tables"):
        lines[-1:-1] = ["", "Each table's date, code and wall time (git commit; `+dirty`: with uncommitted changes): " + "; ".join(
            f"{k}: {t.get('date')}, {t.get('commit') or 'commit not recorded'}"
            + (f", {t['table_s']} s" if t.get("table_s") is not None else "") for k, t in meta["tables"].items()) + "."]
    if meta.get("complete") is False:
        lines[-1:-1] = ["", f"**Partial**: the tables this run had finished after {meta['wall_s']} s; the last complete "
                            "run's results are in the file of the same name without `.partial`."]
    for key, rows in results.items():
        lines += [f"## {key}", "", "| model | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 1)]
        for name, r in rows.items():
            lines.append(f"| {name} | " + " | ".join(_fmt(r.get(c)) for c in cols) + " |")
        fp, ptq, ours = rows.get("FP", {}), rows.get("naive PTQ", {}), rows.get("ours", rows.get("+ TMD (= ours)", {}))
        if "fd_real" in fp and "fd_real" in ptq and "fd_real" in ours:
            gap = gap_closed(fp["fd_real"], ptq["fd_real"], ours["fd_real"])
            lines += ["", f"Fraction of the naive-PTQ → FP Fréchet-distance gap closed by ours: {gap:.1%}" if gap is not None
                      else "Naive PTQ's Fréchet distance is not above FP's here: there is no gap to close."]
        if plots and key in plots:
            lines += ["", f"![{key}]({plots[key]})"]
        lines.append("")
    out.write_text("\n".join(lines))


def plot(results: dict, out_dir: Path, prefix: str = "results") -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = {}
    for key, rows in results.items():
        names = list(rows)
        vals = [rows[n].get("fd_real", float("nan")) for n in names]
        fig, ax = plt.subplots(figsize=(7, 3))
        ax.bar(names, vals)
        ax.set_ylabel("Fréchet distance to real (↓)")
        ax.set_title(key)
        ax.tick_params(axis="x", rotation=30)
        fig.tight_layout()
        path = out_dir / f"{prefix}_{key.replace(' ', '_').replace('/', '')}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written[key] = path.name
    return written


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny budgets: W3A6, both teachers, 2 methods, 2 steps")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--probes", action="store_true", help="run PROBES (follow-ups) -> docs/results_probes.md")
    ap.add_argument("--cache-dir", default=None, help="trajectory caches here instead of the configs' data/ paths")
    ap.add_argument("--out", default=str(REPO / "docs"))
    ap.add_argument("--root", default=str(REPO / "checkpoints" / "methods_table"))
    ap.add_argument("--teachers", nargs="+", default=list(TEACHERS))
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS))
    ap.add_argument("--resume", action="store_true",
                    help="keep the finished tables of <out>/<name>.partial.json (an interrupted run of the same "
                         "mode, steps and samples) and run only the others")
    args = ap.parse_args()
    root, out = Path(args.root), Path(args.out)
    methods, ablation = METHODS, ABLATION
    teachers, settings, steps, samples = args.teachers, args.settings, args.steps, args.samples
    num_trajectories, calib_batches = None, None
    if args.smoke:
        methods = {k: METHODS[k] for k in ("EfficientDM", "ours")}
        ablation = {k: ABLATION[k] for k in ("base (EfficientDM)", "+ MTRD", "+ TMD (= ours)")}
        teachers, settings, steps, samples, num_trajectories = list(TEACHERS), ["W3A6"], 2, 8, 10
        calib_batches = 2  # of 8: calibration (forwards and the per-step Lp range searches) was most of a run
    results = {}
    t0 = time.time()
    mode = "smoke" if args.smoke else "probes" if args.probes else "full"
    name = "results_smoke" if args.smoke else "results_probes" if args.probes else "results"
    out.mkdir(parents=True, exist_ok=True)
    kept, tables = (load_partial(out / f"{name}.partial.json", mode, steps, samples) if args.resume else ({}, {}))
    commit = git_commit()

    def table(key: str, *a) -> None:
        if key in kept:
            results[key] = kept[key]
            print(f"[{key}] kept from {name}.partial.json ({tables[key]})", flush=True)
        else:
            start = time.time()
            results[key] = table_rows(*a)
            tables[key] = {"date": time.strftime("%Y-%m-%d"), "commit": commit, "table_s": round(time.time() - start)}
        # every finished table goes to <name>.partial.{md,json} at once, so a run cut short keeps them;
        # the previous complete results stay as they are until this run has all its tables
        write(results, out, f"{name}.partial", _meta(mode, steps, samples, t0, complete=False, tables=tables,
                                                     resumed=args.resume))

    if args.probes:
        methods, ablation, teachers = {}, {}, []
        for (teacher, setting), probe in PROBES.items():
            table(f"probe {teacher} {setting}", teacher, setting, probe, steps, samples, root,
                  data_args_of(teacher, args.cache_dir, None, calib_batches))
    for teacher in teachers:
        data_args = data_args_of(teacher, args.cache_dir, num_trajectories, calib_batches)
        for setting in settings:
            table(f"{teacher} {setting}", teacher, setting, methods, steps, samples, root, data_args)
    if ablation and "video" in teachers:
        table("ablation video W3A6", "video", "W3A6", ablation, steps, samples, root,
              data_args_of("video", args.cache_dir, num_trajectories, calib_batches))
    meta = _meta(mode, steps, samples, t0, complete=True, tables=tables, resumed=args.resume)
    plots = write(results, out, name, meta)
    for suffix in (".md", ".json"):
        (out / f"{name}.partial{suffix}").unlink(missing_ok=True)
    for png in out.glob(f"{name}.partial_*.png"):
        png.unlink()
    print(f"wrote {out / (name + '.md')} and {len(plots)} plots in {meta['wall_s']} s")


def _meta(mode: str, steps: int, samples: int, t0: float, complete: bool, tables: dict | None = None,
          resumed: bool = False) -> dict:
    meta = {"mode": mode, "date": time.strftime("%Y-%m-%d"), "steps": steps, "samples": samples,
            "device": "CPU" if not torch.cuda.is_available() else torch.cuda.get_device_name(),
            "wall_s": round(time.time() - t0), "complete": complete}
    if tables:
        meta["tables"] = dict(tables)
    if resumed:  # wall_s is this sitting's; the tables' own times are in meta.tables
        meta["resumed"] = True
    return meta


def git_commit() -> str | None:
    """The repository's short commit, ``+dirty`` when the package, benchmarks or configs differ from it."""
    try:
        def git(*a: str) -> str:
            return subprocess.run(["git", "-C", str(REPO), *a], capture_output=True, text=True, check=True).stdout.strip()

        dirty = git("status", "--porcelain", "--untracked-files=no", "--", "mpq_lightning", "benchmarks", "configs")
        return git("rev-parse", "--short", "HEAD") + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def load_partial(path: Path, mode: str, steps: int, samples: int) -> tuple[dict, dict]:
    """The finished tables of an interrupted run (``--resume``) and their provenance (date, commit;
    a file written before commits were recorded gives its run's date and ``commit: None``). Refuses a
    missing file or one from another mode, step budget or sample count, naming it."""
    if not path.is_file():
        raise FileNotFoundError(f"--resume: {path} does not exist (no interrupted run to resume)")
    data = json.loads(path.read_text())
    meta = data.get("meta", {})
    for key, want in (("mode", mode), ("steps", steps), ("samples", samples)):
        if meta.get(key) != want:
            raise ValueError(f"--resume: {path} has meta.{key} = {meta.get(key)!r}, this run {want!r}")
    tables = meta.get("tables") or {}
    return data["results"], {k: tables.get(k, {"date": meta.get("date"), "commit": None}) for k in data["results"]}


def write(results: dict, out: Path, name: str, meta: dict) -> dict[str, str]:
    """Plots, ``<name>.md`` and ``<name>.json`` in ``out``, each file replaced whole (written beside
    it, then renamed), so an interrupted write leaves the previous file. Returns the plots."""
    plots = plot(results, out, prefix=name)
    for suffix, write_to in ((".md", lambda p: write_markdown(results, meta, p, plots)),
                             (".json", lambda p: p.write_text(json.dumps({"meta": meta, "results": results}, indent=2)))):
        tmp = out / f".{name}{suffix}.tmp"
        write_to(tmp)
        os.replace(tmp, out / f"{name}{suffix}")
    return plots


if __name__ == "__main__":
    main()
