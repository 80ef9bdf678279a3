"""Evaluate a run: ``python evaluate.py --config checkpoints/<run>/config.yaml [--ckpt_path last]``.

Samples student and teacher from the same noise, computes metrics (PSNR/SSIM, Fréchet distance,
per-timestep error, ...), writes ``<run>/eval/metrics.json``, an image grid and (video) a GIF.
Arguments after ``--`` override the run's config, e.g. paths that moved since training:
``python evaluate.py --config <run>/config.yaml -- --model.model_kwargs.ckpt_path /new/weights.pth``.
"""
import sys

from jsonargparse import ArgumentParser

from mpq_lightning.cli import run_script
from mpq_lightning.evaluation import EvalConfig, evaluate


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--config", required=True, help="the run's resolved config.yaml")
    parser.add_argument("--ckpt_path", default="last", help="checkpoint file, or 'last' (<run>/last.ckpt)")
    parser.add_argument("--out", default=None, help="output folder (default <run>/eval); an existing one is "
                                                    "replaced only if it holds an earlier evaluation alone")
    parser.add_class_arguments(EvalConfig, "eval")
    args = parser.parse_args(argv)
    return evaluate(args.config, args.ckpt_path, EvalConfig(**vars(args.eval)), args.out, overrides)


if __name__ == "__main__":
    run_script(main)
