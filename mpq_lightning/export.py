"""Export a trained run as a real low-bit model (bit-packed safetensors + quant map).

    python -m mpq_lightning.export --config RUN/config.yaml --ckpt_path RUN/last.ckpt --out DIR [--report]
    python -m mpq_lightning.export --ckpt_path RUN/last.ckpt --out DIR      # model rebuilt from the ckpt's hparams
    python -m mpq_lightning.export --out DIR --report                       # report of an existing export

``--config`` is the run's resolved LightningCLI config (its ``model`` section = QATModule's
arguments, its ``seed_everything`` the seed the teacher was built under); the checkpoint must
match it (QATModule refuses another model, teacher or quantization setting). A teacher with random
weights (no ``ckpt_path`` / ``path``) is only reproduced under the run's seed: without
``--config``, pass it as ``--seed``.
``--ckpt_path last`` with ``--config`` means ``last.ckpt`` beside the config. Load the export with
:func:`mpq_lightning.quant.export.load_quantized`.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any, Sequence

from .files import read_checkpoint, read_run_config
from .quant.export import FP_DTYPES, ExportFormatError, export_quantized, export_report, print_export_report


def _init_args(section: Any) -> dict:
    """A LightningCLI config section: plain arguments or ``{class_path, init_args}``."""
    if section is None:
        return {}
    if isinstance(section, dict) and "class_path" in section:
        return dict(section.get("init_args") or {})
    return dict(section)


def _dataclass(cls, value: Any):
    if value is None or isinstance(value, cls):
        return value if value is not None else cls()
    args = _init_args(value)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(args) - known)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown keys {unknown} in the config")
    return cls(**args)


def load_qat_module(config: str | Path | None, ckpt_path: str | Path, seed: int | None = None):
    """The trained QATModule of a run: built from ``config``'s model section (or the checkpoint's
    hparams when ``config`` is None) under the run's seed (``config``'s ``seed_everything``, else
    ``seed``), then the checkpoint restored strictly."""
    import lightning as L

    from .module import CalibConfig, LossConfig, OptimConfig, QATModule
    from .quant import QuantConfig

    if config is not None and not Path(config).is_file():
        raise FileNotFoundError(f"config {str(config)!r} does not exist")
    ckpt_path = Path(ckpt_path)
    if config is not None and str(ckpt_path) == "last":
        ckpt_path = Path(config).parent / "last.ckpt"
    if not ckpt_path.exists():  # a file, or a DeepSpeed checkpoint folder
        raise FileNotFoundError(f"checkpoint {str(ckpt_path)!r} does not exist")
    if config is None and ckpt_path.is_dir():
        raise ValueError(f"checkpoint {str(ckpt_path)!r} is a folder (DeepSpeed): pass the run's --config with it")
    ckpt = read_checkpoint(ckpt_path, mmap=True)  # a Lightning checkpoint (hparams objects), read before any build
    if config is None:
        if seed is not None:
            L.seed_everything(seed, verbose=False)
        return QATModule.load_from_checkpoint(ckpt_path, map_location="cpu", weights_only=False).eval()
    config = Path(config)
    raw = read_run_config(config)
    args = _init_args(raw.get("model", raw))
    run_seed = raw.get("seed_everything", seed)
    if run_seed is not None and not isinstance(run_seed, bool):
        L.seed_everything(int(run_seed), verbose=False)
    for key, cls in (("quant", QuantConfig), ("loss", LossConfig), ("optim", OptimConfig), ("calib", CalibConfig)):
        if key in args:
            args[key] = _dataclass(cls, args[key])
    module = QATModule(**args)
    module.on_load_checkpoint(ckpt)
    module.load_state_dict(ckpt["state_dict"], strict=True)
    return module.eval()


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mpq_lightning.export", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="the run's config.yaml (LightningCLI); optional with a Lightning checkpoint")
    ap.add_argument("--ckpt_path", help="checkpoint of the run (last.ckpt), or 'last' beside --config")
    ap.add_argument("--out", required=True, help="export folder to create")
    ap.add_argument("--fp_dtype", choices=sorted(FP_DTYPES), default="bf16",
                    help="dtype of non-quantized parameters, biases and FP side branches (fp32: exact reload)")
    ap.add_argument("--seed", type=int, help="seed the run's teacher was built under (without --config)")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    ap.add_argument("--report", action="store_true", help="print the size report (alone: of an existing export)")
    ap.add_argument("--layers", action="store_true", help="with --report: one row per layer")
    args = ap.parse_args(argv)
    try:
        if args.ckpt_path is None:
            if not args.report:
                ap.error("--ckpt_path is required to export (or pass --report to report on an existing export)")
        else:
            module = load_qat_module(args.config, args.ckpt_path, args.seed)
            out = export_quantized(module, args.out, fp_dtype=args.fp_dtype, overwrite=args.overwrite)
            print(f"exported {module.model_name} to {out}")
        if args.report:
            print_export_report(export_report(args.out), layers=args.layers)
    except (FileExistsError, FileNotFoundError, ExportFormatError, ValueError) as e:
        print(f"{ap.prog}: error: {e}", file=sys.stderr)  # as argparse prints its own
        return 1
    except KeyboardInterrupt:  # the export folder is built aside and renamed: nothing half-written is left
        print(f"\n{ap.prog}: interrupted (Ctrl-C)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
