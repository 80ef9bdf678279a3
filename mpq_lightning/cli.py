"""LightningCLI subclass behind ``train.py`` and ``evaluate.py``.

* ``python train.py --config configs/x.yaml`` needs no ``fit`` subcommand; ``--print_config`` works
  without any weights on disk (nothing is instantiated); dotted overrides (``--model.quant.w_bits 2``).
* Runs live in ``checkpoints/<run_name>/``: TensorBoard events, ``config.yaml`` (the resolved
  config, saved by LightningCLI) and ``last.ckpt`` / periodic checkpoints, so ``--ckpt_path last``
  resumes the run of the same ``run_name``.
* A data module that can build its teacher-trajectory cache (``prepare_cache(teacher)``) gets the
  frozen teacher before fitting, so a missing cache is generated on first use.
"""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

from lightning.pytorch import LightningDataModule
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from .module import QATModule

SUBCOMMANDS = ("fit", "validate", "test", "predict")
DEFAULT_ROOT = "checkpoints"
DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "default.yaml"


class MPQCLI(LightningCLI):
    """Our CLI: QATModule + any LightningDataModule, run folders named by ``run_name``."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("parser_kwargs", {"parser_mode": "omegaconf"} if _has_omegaconf() else {})
        super().__init__(QATModule, LightningDataModule, *args, subclass_mode_data=True, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--run_name", type=str, default="default", help="run folder under checkpoints/")
        parser.add_argument("--checkpoint_every_n_steps", type=int, default=50, help="periodic checkpoint interval")
        parser.add_argument("--log_samples", type=bool, default=True, help="add the SampleLogger callback")
        parser.set_defaults({
            "data": {"class_path": "mpq_lightning.data.TrajectoryDataModule"},
            "trainer.default_root_dir": DEFAULT_ROOT,
            "trainer.max_steps": 200,
            "trainer.log_every_n_steps": 10,
        })

    def before_instantiate_classes(self) -> None:
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        run = Path(cfg.trainer.default_root_dir or DEFAULT_ROOT) / cfg.run_name
        if not cfg.trainer.logger or cfg.trainer.logger is True:
            cfg.trainer.logger = {
                "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                "init_args": {"save_dir": str(run.parent), "name": run.name, "version": ""},
            }
        callbacks = list(cfg.trainer.callbacks or [])
        names = {_class_name(c) for c in callbacks}
        defaults = {
            "ModelCheckpoint": {"dirpath": str(run), "save_last": True, "every_n_train_steps": cfg.checkpoint_every_n_steps,
                                "save_top_k": -1, "filename": "step{step:06d}", "auto_insert_metric_name": False},
            "LearningRateMonitor": {"logging_interval": "step"},
            "RichProgressBar": {},
        }
        if cfg.trainer.enable_progress_bar is False:
            defaults.pop("RichProgressBar")
        for name, init in defaults.items():
            if name not in names:
                callbacks.append({"class_path": f"lightning.pytorch.callbacks.{name}", "init_args": init})
        for name in ("PerTimestepError", "SampleLogger"):
            if name == "SampleLogger" and not cfg.log_samples:
                continue
            if name not in names and _has_callback(name):
                callbacks.append({"class_path": f"mpq_lightning.callbacks.{name}", "init_args": {}})
        cfg.trainer.callbacks = callbacks
        _check_paths(cfg)

    def before_fit(self) -> None:
        self.model.check_compile_settings(self.trainer)  # before the cache is built or a file written
        prepare = getattr(self.datamodule, "prepare_cache", None)
        if callable(prepare):
            prepare(self.model.teacher)


def _check_paths(cfg) -> None:
    """Refuse missing local files named by the config before any model is built."""
    model_kwargs = cfg.model.model_kwargs or {}
    checks = [(f"model.model_kwargs.{k}", model_kwargs.get(k)) for k in ("ckpt_path", "path")]
    data_args = getattr(cfg.data, "init_args", None)
    recipe = getattr(data_args, "recipe", None) if data_args is not None else None
    if recipe is not None:
        checks.append(("data.init_args.recipe.cond_path", getattr(recipe, "cond_path", None)))
    for key, value in checks:
        if value and not Path(value).exists():
            raise FileNotFoundError(f"{key}: {value} does not exist (see the header of your config for what it needs)")


def _class_name(callback) -> str:
    """Class name of a callback given as a dict / Namespace with ``class_path`` or an instance."""
    path = callback.get("class_path") if hasattr(callback, "get") else None
    return path.rsplit(".", 1)[-1] if path else type(callback).__name__


def _has_omegaconf() -> bool:
    try:
        import omegaconf  # noqa: F401
    except ImportError:
        return False
    return True


def _has_callback(name: str) -> bool:
    from . import callbacks

    return hasattr(callbacks, name)


def main(argv: list[str] | None = None, default_subcommand: str = "fit") -> MPQCLI:
    """Entry point of ``train.py``: inserts the ``fit`` subcommand when none is given."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:  # the embedded default: shipped Moving-Digits teacher, our method at W3A6
        argv = ["--config", str(DEFAULT_CONFIG)]
    if argv[0] not in SUBCOMMANDS + ("-h", "--help"):
        argv = [default_subcommand] + argv
    # distillation runs both backbones in eval mode on purpose (QATModule.train)
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
    warnings.filterwarnings("ignore", message=r"Your `IterableDataset` has `__len__` defined")
    sys.argv = [sys.argv[0]] + argv  # LightningCLI reads sys.argv; passing args too makes it warn
    return MPQCLI()
