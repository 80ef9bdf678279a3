"""LightningCLI subclass behind ``train.py`` and ``evaluate.py``.

* ``python train.py --config configs/x.yaml`` needs no ``fit`` subcommand; ``--print_config`` works
  without any weights on disk (nothing is instantiated); dotted overrides (``--model.quant.w_bits 2``).
* Runs live in ``checkpoints/<run_name>/``: TensorBoard events, ``config.yaml`` (the resolved
  config, saved by LightningCLI) and ``last.ckpt`` / periodic checkpoints, so ``--ckpt_path last``
  resumes the run of the same ``run_name``.
* A data module that can build its teacher-trajectory cache (``prepare_cache(teacher)``) gets the
  frozen teacher before fitting, so a missing cache is generated on first use.
* A run folder that already holds a run's files is never written into by accident: ``fit`` refuses it
  unless it resumes that run (``--ckpt_path last`` or a checkpoint inside the folder) or
  ``--overwrite_run true`` starts it afresh (the old files are deleted only after every check and the
  trajectory cache succeeded). ``--ckpt_path last`` with no ``last.ckpt`` yet starts a fresh run (one
  command for a job that may be preempted and requeued), under the same refusal. A checkpoint to
  resume is checked against the model, bit setting and optimiser groups before anything is written
  (not even ``config.yaml``), and the config decides the model: a checkpoint's saved
  hyper-parameters never replace it. ``config.yaml`` is saved in the run folder whatever the logger.
* ``python train.py validate --config <run>/config.yaml`` validates the run's ``last.ckpt`` (or
  ``--ckpt_path``; without any checkpoint, the calibrated, untrained student) on the held-out
  trajectories, logging into ``<run>/validate/`` and leaving the fit's ``config.yaml`` alone; ``test``
  and ``predict`` are refused (``evaluate.py`` is the evaluation).
"""
from __future__ import annotations

import atexit
import importlib.util
import logging
import os
import signal
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Literal, Optional

import torch
from jsonargparse.typing import NonNegativeInt
from lightning.pytorch import LightningDataModule
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.strategies import DeepSpeedStrategy as _LightningDeepSpeedStrategy
from lightning.pytorch.utilities.exceptions import SIGTERMException

from .checkpoint_io import use_atomic_checkpoints
from .files import RunLock, atomic_write, read_checkpoint, read_deepspeed_client_state, read_yaml
from .module import ZERO3_REFUSAL, QATModule

SUBCOMMANDS = ("fit", "validate")  # train.py's; Lightning's test / predict need steps this module has not
_NOT_OURS = ("test", "predict")
DEFAULT_ROOT = "checkpoints"
DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "default.yaml"


class MPQCLI(LightningCLI):
    """Our CLI: QATModule + any LightningDataModule, run folders named by ``run_name``."""

    def __init__(self, *args, **kwargs) -> None:
        quiet_lightning()
        kwargs.setdefault("save_config_callback", RunConfigCallback)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("parser_kwargs", {"parser_mode": "omegaconf"} if _has_omegaconf() else {})
        super().__init__(QATModule, LightningDataModule, *args, subclass_mode_data=True, **kwargs)

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """``fit`` (the default) and ``validate`` (the validation losses of a checkpoint, or of the
        calibrated, untrained student): the module has no test or predict step."""
        return {k: v for k, v in LightningCLI.subcommands().items() if k in SUBCOMMANDS}

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--run_name", type=str, default="default", help="run folder under checkpoints/")
        parser.add_argument("--checkpoint_every_n_steps", type=NonNegativeInt, default=50,
                            help="periodic checkpoint interval in optimiser steps (0: none; last.ckpt is saved at "
                                 "the end and when a signal stops the run either way)")
        parser.add_argument("--log_samples", type=bool, default=True, help="add the SampleLogger callback")
        parser.add_argument("--overwrite_run", type=bool, default=False,
                            help="train into a run folder that holds an earlier run: delete its checkpoints, config, "
                                 "TensorBoard events, report.json and eval/ (after every check has passed) and start "
                                 "afresh (from --ckpt_path when it names a checkpoint outside the folder)")
        parser.add_argument("--matmul_precision", type=Optional[Literal["highest", "high", "medium"]], default=None,
                            help="torch.set_float32_matmul_precision before anything is built ('high': TF32 "
                                 "matmuls under 32-true, the papers' fp32 setting on Ampere and later); null: "
                                 "torch's default")
        parser.set_defaults({
            "data": {"class_path": "mpq_lightning.data.TrajectoryDataModule"},
            "trainer.default_root_dir": DEFAULT_ROOT,
            "trainer.max_steps": 200,
            "trainer.log_every_n_steps": 10,
        })

    def before_instantiate_classes(self) -> None:
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        run = _run_folder(cfg)
        if cfg.get("matmul_precision"):
            torch.set_float32_matmul_precision(cfg.matmul_precision)
        fit_logger = {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                      "init_args": {"save_dir": str(run.parent), "name": run.name, "version": ""}}
        if cfg.trainer.logger is None or cfg.trainer.logger is True:  # False: no logger, as Lightning
            cfg.trainer.logger = fit_logger
        _follow_run_name(cfg.trainer.logger, fit_logger)  # another run's saved config.yaml, run_name changed
        if self.subcommand == "validate" and _same_logger(cfg.trainer.logger, fit_logger):
            # beside the run's own events, not into them (Lightning logs a validation at step 0)
            cfg.trainer.logger = {"class_path": fit_logger["class_path"],
                                  "init_args": {"save_dir": str(run), "name": VALIDATE_DIR, "version": ""}}
        ours, lightning = "mpq_lightning.callbacks", "lightning.pytorch.callbacks"
        defaults = {  # class name: (module, init args)
            "RunCheckpoint": (ours, {"dirpath": str(run), "save_last": True,
                                     "every_n_train_steps": int(cfg.checkpoint_every_n_steps), "save_top_k": -1,
                                     "filename": "step{step:06d}", "auto_insert_metric_name": False,
                                     "enable_version_counter": False}),
            "LearningRateMonitor": (lightning, {"logging_interval": "step"}),
            "StepRichProgressBar": (ours, {}),
        }
        # the callbacks train.py adds follow this run's settings: the entries a run's saved config.yaml
        # holds of them (RunCheckpoint saving into that run's folder, a progress bar with the bar now
        # off, ...) are made again below; RunCheckpoint in any form (run_name, checkpoint_every_n_steps)
        added = {**defaults, "PerTimestepError": (ours, {}), "SampleLogger": (ours, {})}
        callbacks = [c for c in (cfg.trainer.callbacks or []) if not _added_form(c, added)]
        names = {_class_name(c) for c in callbacks}
        # no bar with the bar off, and none beside the user's own (Lightning refuses two)
        if cfg.trainer.enable_progress_bar is False or any(n.endswith("ProgressBar") for n in names):
            defaults.pop("StepRichProgressBar")
        if cfg.trainer.logger is False:  # Lightning refuses a learning-rate monitor with nothing to log to
            defaults.pop("LearningRateMonitor")
        # a checkpoint callback of the user's own (best by val/loss) saves beside ours, which keeps
        # last.ckpt for --ckpt_path last and evaluate.py; with checkpointing off Lightning refuses any
        if cfg.trainer.enable_checkpointing is False:
            defaults.pop("RunCheckpoint")
        for name, (module, init) in defaults.items():
            if name not in names:
                callbacks.append({"class_path": f"{module}.{name}", "init_args": init})
        for name in ("PerTimestepError", "SampleLogger"):
            if name == "SampleLogger" and not cfg.log_samples:
                continue
            if name not in names and _has_callback(name):
                callbacks.append({"class_path": f"mpq_lightning.callbacks.{name}", "init_args": {}})
        cfg.trainer.callbacks = callbacks
        if isinstance(cfg.trainer.strategy, str) and cfg.trainer.strategy.startswith("deepspeed"):
            cfg.trainer.strategy = deepspeed_strategy(cfg.trainer.strategy)
        _refuse_zero3(cfg.trainer.strategy)
        _match_torchrun(cfg.trainer)
        _match_srun(cfg.trainer)
        _check_multinode(cfg.trainer)
        accumulate = cfg.trainer.accumulate_grad_batches
        if accumulate is not None and accumulate < 1:  # (Lightning 2.6 divides by it at the first batch)
            raise ValueError(f"trainer.accumulate_grad_batches must be an integer >= 1, got {accumulate}")
        _check_paths(cfg)
        _check_accelerator(cfg.trainer)
        if self.subcommand == "fit":
            self._run_dir = run
            _check_run_folder(run, cfg.ckpt_path, cfg.overwrite_run)
            _check_overwrite(run, cfg.ckpt_path, cfg.overwrite_run)

    def _parse_ckpt_path(self) -> None:
        """LightningCLI replaces the model config by a checkpoint file's saved hyper-parameters (dropping
        command-line overrides). Here the config decides, and ``QATModule.check_checkpoint`` refuses a
        checkpoint of another model or bit setting by name."""

    def before_fit(self) -> None:
        # every check before the trajectory cache is built or a file (config.yaml included) is written
        self._check_trainer()
        self.model.check_schedule(self.trainer)
        use_atomic_checkpoints(self.trainer)  # a failed save keeps the previous last.ckpt
        self.model.use_flat_params(self.trainer)  # refuses model.optim.flat_params true under FSDP / DeepSpeed
        cfg = self.config[self.subcommand]
        if cfg.ckpt_path is None:
            _refuse_foreign_hpc_resume(self.trainer, self._run_dir)
        ckpt = _resolve_ckpt_path(self.trainer, cfg.ckpt_path)
        # FSDP and DeepSpeed restore after on_fit_start, where trainer.ckpt_path is not set yet: tell the
        # module, so that it does not calibrate a student the restore then overwrites
        self.model.resuming = ckpt is not None and ckpt.exists()
        if self.model.resuming:
            checkpoint = self._checked_checkpoint(ckpt)
            step = int(checkpoint.get("global_step", 0))
            if _inside(ckpt, self._run_dir):
                _refuse_overwriting_later_checkpoints(self._run_dir, ckpt, step)
            self.model.check_optimizer_state(checkpoint, source=str(ckpt))
            _purge_later_events(self.trainer, step)
            check_resume = getattr(self.datamodule, "check_resume", None)
            if callable(check_resume):  # the data position under this data layout (world size, batch size, ...)
                check_resume(checkpoint, self.trainer.world_size)
        elif ckpt is None and cfg.ckpt_path is not None:  # `last` with nothing saved yet: a fresh (requeued) run
            _check_run_folder(self._run_dir, None, cfg.overwrite_run, requeued=True)
        if cfg.overwrite_run and ckpt is not None and _inside(ckpt, self._run_dir):
            raise ValueError(f"--overwrite_run true with --ckpt_path {cfg.ckpt_path}: that resumes {ckpt} inside the run "
                             "folder the overwrite would delete; drop one of the two")
        if self.trainer.global_rank == 0:  # one training process per run folder, before it is written or cleared
            self._run_lock = RunLock(self._run_dir)
            self._run_lock.acquire()
        # a fit that fails before its first step leaves no files behind in a folder it started empty
        # (judged under the lock: no other train.py writes into the folder meanwhile)
        self._fresh_run = not _run_files(self._run_dir)
        self._prepare_data()
        if cfg.overwrite_run:
            _clear_run_folder(self._run_dir)  # only now: every check above and the cache succeeded
            self._fresh_run = True

    def _run_subcommand(self, subcommand: str) -> None:
        try:
            super()._run_subcommand(subcommand)
        except BaseException as error:
            if subcommand == "fit":
                self._forget_failed_start()
            trainer = getattr(self, "trainer", None)
            if isinstance(error, SystemExit) and error.code == 1 and trainer is not None and trainer.interrupted:
                # Lightning's exit after a KeyboardInterrupt (a Ctrl-C in calibration, a second one while
                # training): 130, as a Ctrl-C anywhere else in train.py
                raise SystemExit(128 + signal.SIGINT) from None
            raise
        finally:  # however the fit ended (the process's exit would drop the lock too; tests fit in-process)
            lock = getattr(self, "_run_lock", None)
            if lock is not None:
                lock.release()

    def _forget_failed_start(self) -> None:
        """A fit that failed before its first optimiser step (in calibration, a callback's set-up, the
        first batch) into a folder that held no run: the files it wrote (config.yaml, an empty events
        file) go, so the same command runs again once mended (they made the folder an earlier run's,
        refused without --overwrite_run). A fit that trained keeps its files: its logged steps
        tell what went wrong."""
        trainer = getattr(self, "trainer", None)
        if not getattr(self, "_fresh_run", False) or trainer is None or trainer.global_rank != 0:
            return
        if trainer.global_step > 0 or any(f.endswith(".ckpt") for f in _run_files(self._run_dir)):
            return
        _clear_run_folder(self._run_dir, keep_validate=True)

    def before_validate(self) -> None:
        """``train.py validate``: checked like a fit, before anything is computed: held-out trajectories
        to validate on, the checkpoint's model and bit setting (``--ckpt_path``; ``last`` must exist);
        a missing trajectory cache is generated. Writes nothing into the run folder but
        ``validate/`` (TensorBoard events); ``config.yaml`` stays the fit's."""
        if getattr(self.datamodule, "has_validation", True) is False:
            raise ValueError("validate: the data module holds out no trajectories to validate on; set "
                             "data.init_args.val_trajectories (indices of the cache's trajectories, e.g. [3])")
        self._check_trainer()
        cfg = self.config[self.subcommand]
        run = _run_folder(cfg)
        if cfg.ckpt_path is None and (run / "last.ckpt").exists():  # (a DeepSpeed run's is a folder)
            # validating a run means its latest checkpoint (LightningCLI passes config_init's on)
            cfg.ckpt_path = self.config_init[self.subcommand].ckpt_path = "last"
        ckpt = _resolve_ckpt_path(self.trainer, cfg.ckpt_path)
        if ckpt is None and cfg.ckpt_path is not None:
            raise FileNotFoundError(f"validate --ckpt_path {cfg.ckpt_path}: run folder {run} has no such checkpoint")
        if self.trainer.global_rank == 0:
            what = f"checkpoint {ckpt}" if ckpt is not None else f"the calibrated, untrained student ({run} holds no last.ckpt)"
            print(f"validate: {what}")
        if ckpt is not None:
            self._checked_checkpoint(ckpt)
        if getattr(self.datamodule, "on_layout_change", None) == "refuse":
            # the restore also restores the training position, which validation never reads: another
            # world size or batch size than the fit's is no reason to refuse
            self.datamodule.on_layout_change = "next_epoch"
        self._prepare_data()

    def _check_trainer(self) -> None:
        """The trainer settings this module cannot run under (precision, compile switches)."""
        self.model.check_precision(self.trainer)
        self.model.check_compile_settings(self.trainer)

    def _checked_checkpoint(self, ckpt: Path) -> dict:
        """``ckpt`` read (:func:`_read_run_checkpoint`) and checked against this run's model and bit setting."""
        checkpoint = _read_run_checkpoint(ckpt)
        self.model.check_checkpoint(checkpoint, source=str(ckpt))
        return checkpoint

    def _prepare_data(self) -> None:
        """Check the data module against the model, then build any missing trajectories: the teacher
        samples them on this rank's device (Lightning moves the whole module there later anyway), not
        on the CPU where it was built."""
        self.model.check_data(self.datamodule)
        prepare = getattr(self.datamodule, "prepare_cache", None)
        if callable(prepare):
            prepare(self.model.teacher.to(self.trainer.strategy.root_device))
        check_selection = getattr(self.datamodule, "check_selection", None)
        if callable(check_selection):  # an empty selection: refused before config.yaml and the events
            check_selection(self.trainer.global_rank, self.trainer.world_size)

    def after_fit(self) -> None:
        """Where the run is and what to do with it next (global rank 0; a failed or interrupted fit
        exits before this)."""
        if self.trainer.global_rank != 0:
            return
        from shlex import quote

        from rich.console import Console
        from rich.markup import escape

        run, config = self._run_dir, quote(str(self._run_dir / "config.yaml"))
        events = any(run.glob("events.out.tfevents.*"))
        held = [n for n in ("config.yaml", "last.ckpt") if (run / n).exists()] + ["TensorBoard events"] * events
        lines = [f"{run} ({', '.join(held) or 'empty'})"]
        if events:
            lines.append(f"  tensorboard --logdir {quote(str(run.parent))}")
        if (run / "last.ckpt").exists():  # (a checkpoint callback of the user's own may save elsewhere)
            # commands to paste: paths quoted for the shell, evaluate.py where this train.py is
            evaluate = Path(sys.argv[0]).with_name("evaluate.py")
            evaluate = evaluate if evaluate.is_file() and evaluate.parent.resolve() != Path.cwd() else Path("evaluate.py")
            lines += [f"  python {quote(str(evaluate))} --config {config}",
                      f"  python -m mpq_lightning.export --config {config} --ckpt_path last --out exported/"]
        Console().print("[bold]Run folder[/]: " + escape("\n".join(lines)), highlight=False, soft_wrap=True)


def _destroy_process_group() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


class DeepSpeedStrategy(_LightningDeepSpeedStrategy):
    """Lightning's DeepSpeed strategy with its NCCL process group destroyed at exit, as Lightning's
    own set-up does for DDP and FSDP (``_init_dist_connection``). DeepSpeed creates the group itself,
    and torch warned at the end of every DeepSpeed run ("destroy_process_group() was not called
    before program exit, which can leak resources"; seen on an H200)."""

    _exit_hook = False

    def _init_deepspeed_distributed(self) -> None:
        super()._init_deepspeed_distributed()
        if self._process_group_backend == "nccl" and not DeepSpeedStrategy._exit_hook:
            DeepSpeedStrategy._exit_hook = True
            atexit.register(_destroy_process_group)


def deepspeed_strategy(name: str):
    """Lightning's registered DeepSpeed strategy ``name`` (``deepspeed_stage_2``, ...) with frozen
    parameters left out of its checkpoints: DeepSpeed saves module states itself, so without this the
    teacher and the student's frozen FP weights would be in every checkpoint. They come back from the
    teacher on load (``QATModule`` loads non-strictly and checks its own keys)."""
    from lightning.pytorch.strategies import StrategyRegistry

    if name not in StrategyRegistry:
        return name  # Lightning names the valid strategies
    init = {**StrategyRegistry[name]["init_params"], "exclude_frozen_parameters": True}
    strategy = {"class_path": "mpq_lightning.cli.DeepSpeedStrategy", "init_args": init}
    _refuse_zero3(strategy)
    if importlib.util.find_spec("deepspeed") is None:  # (else jsonargparse's traceback, before any work)
        raise ValueError(f"trainer.strategy {name}: DeepSpeed is not installed; pip install -e \".[deepspeed]\" "
                         "(on a machine with CUDA), or use trainer.strategy ddp or fsdp")
    return strategy


def _refuse_zero3(strategy) -> None:
    """DeepSpeed ZeRO-3 partitions parameters between forwards and gathers them only for the length of
    each module's forward: calibration's writes would be dropped at the next partitioning. Refused by
    name (ZeRO-2 and FSDP shard what this training needs)."""
    if strategy is None or isinstance(strategy, str):
        return
    class_path, init = str(_option(strategy, "class_path") or ""), _option(strategy, "init_args") or {}
    if class_path.endswith("DeepSpeedStrategy") and _option(init, "stage") == 3:
        raise ValueError(ZERO3_REFUSAL)


def _option(obj, key):
    """``key`` of a config section (a jsonargparse Namespace or dict) or of an object; None without it."""
    return obj.get(key) if hasattr(obj, "get") else getattr(obj, key, None)


def _check_accelerator(trainer_cfg) -> None:
    """A GPU trainer on a machine where torch sees no GPU (every real config targets one), more GPUs than
    the machine has, and FSDP without GPUs: refused by key before anything is built (Lightning raised
    them as tracebacks while building the trainer)."""
    accelerator, devices, strategy = trainer_cfg.accelerator, trainer_cfg.devices, trainer_cfg.strategy
    cuda = torch.cuda.is_available()
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if accelerator in ("gpu", "cuda") and not (cuda or (accelerator == "gpu" and mps)):
        build = "a CPU-only build of torch" if torch.version.cuda is None else f"CUDA {torch.version.cuda}, no usable device"
        raise ValueError(f"trainer.accelerator {accelerator!r}, but torch {torch.__version__} sees no GPU here ({build}): "
                         "run on a GPU machine, or pass --trainer.accelerator cpu (configs/tiny/ run on a CPU)")
    try:
        count = int(devices)
    except (TypeError, ValueError):  # "auto", "-1", a list of device ids: Lightning's own checks
        count = None
    if accelerator in ("gpu", "cuda") and cuda and count is not None and count > torch.cuda.device_count():
        raise ValueError(f"trainer.devices {devices}, but this machine has {torch.cuda.device_count()} GPU(s): pass "
                         f"--trainer.devices {torch.cuda.device_count()} (per node; --trainer.num_nodes for more machines)")
    name = strategy if isinstance(strategy, str) else str(_option(strategy, "class_path") or "")
    if "fsdp" in name.lower() and (accelerator == "cpu" or (accelerator == "auto" and not cuda)):
        raise ValueError(f"trainer.strategy {name!r} needs GPUs (Lightning's FSDP runs on CUDA only): use ddp on a CPU, "
                         "or --trainer.accelerator gpu on a GPU machine")


def _match_torchrun(trainer_cfg) -> None:
    """Under ``torchrun`` (WORLD_SIZE > 1 processes) the trainer must run as those processes: Lightning
    builds a single-device strategy for ``devices: 1, num_nodes: 1`` whatever the launcher, and every
    process would train alone as rank 0 into the same run folder. That single-device setting (every
    shipped config's) becomes torchrun's LOCAL_WORLD_SIZE devices on WORLD_SIZE / LOCAL_WORLD_SIZE
    nodes; another count of devices that does not match is refused by key."""
    if "TORCHELASTIC_RUN_ID" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    world = int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    devices, nodes = trainer_cfg.devices, int(trainer_cfg.num_nodes or 1)
    try:
        count = int(devices)
    except (TypeError, ValueError):  # "auto", a list of device ids: Lightning's own checks
        return
    if count == 1 and nodes == 1 and world % local == 0:
        trainer_cfg.devices, trainer_cfg.num_nodes = local, world // local
        if os.environ.get("RANK", "0") == "0":
            print(f"torchrun started {world} processes: trainer.devices {local}, trainer.num_nodes {world // local}")
    elif count > 0 and count * nodes != world:
        raise ValueError(f"torchrun started {world} processes ({local} per node) but trainer.devices {devices} x "
                         f"trainer.num_nodes {nodes} = {count * nodes}: set --trainer.devices {local} --trainer.num_nodes "
                         f"{max(1, world // local)} (or leave both at 1)")


def _check_multinode(trainer_cfg) -> None:
    """``trainer.num_nodes`` > 1 with nothing that tells this process which node it is: no launcher
    Lightning detects (torchrun, SLURM, LSF, MPI), no ``NODE_RANK`` (Lightning's general cluster: set
    by hand on each node) and no cluster-environment plugin. Lightning then takes node 0 with the
    master on this machine and waits for the other nodes' processes for ever (seen: a run that never
    started after 'MEMBER: 1/2'); refused by key instead."""
    try:
        nodes = int(trainer_cfg.num_nodes or 1)
    except (TypeError, ValueError):
        return
    if nodes <= 1 or trainer_cfg.plugins or "NODE_RANK" in os.environ or "GROUP_RANK" in os.environ:
        return
    from lightning.fabric.plugins.environments import (LSFEnvironment, MPIEnvironment, SLURMEnvironment,
                                                       TorchElasticEnvironment)

    for environment in (TorchElasticEnvironment, SLURMEnvironment, LSFEnvironment, MPIEnvironment):
        try:
            if environment.detect():
                return
        except RuntimeError:  # Lightning's own SLURM hints, raised again when the trainer is built
            return
    raise ValueError(
        f"trainer.num_nodes {nodes}, but no launcher tells this process its node: start it on every node with "
        f"torchrun --nnodes {nodes} --node_rank <r> --rdzv_endpoint <host:port> train.py ..., with srun under SLURM, "
        "or set MASTER_ADDR, MASTER_PORT and NODE_RANK on each node (here it would wait for the other nodes for ever); "
        "--trainer.num_nodes 1 runs on this machine alone")


def _match_srun(trainer_cfg) -> None:
    """Under SLURM's ``srun`` (Lightning's ``SLURMEnvironment``: SLURM_NTASKS > 1 tasks, a batch job
    name), as under torchrun: Lightning checks the trainer's devices and nodes against SLURM for
    several devices, but for ``devices: 1, num_nodes: 1`` it builds a single-device trainer in every
    task, each training alone as rank 0 into the same run folder. That setting becomes
    SLURM_NTASKS_PER_NODE devices on SLURM_NNODES nodes; other counts are left to Lightning's check.
    torchrun inside a SLURM allocation is torchrun's (``_match_torchrun``)."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    if "TORCHELASTIC_RUN_ID" in os.environ or int(os.environ.get("SLURM_NTASKS", "1") or 1) <= 1:
        return
    try:
        if not SLURMEnvironment.detect():  # an interactive / "bash" job name: not srun's tasks
            return
    except RuntimeError:  # Lightning's own hint (srun inside srun, ...), raised when the trainer is built
        return
    per_node, nodes = os.environ.get("SLURM_NTASKS_PER_NODE", ""), os.environ.get("SLURM_NNODES", "1")
    try:
        count = int(trainer_cfg.devices)
    except (TypeError, ValueError):
        return
    if count != 1 or int(trainer_cfg.num_nodes or 1) != 1 or not per_node.isdigit() or not nodes.isdigit():
        return  # Lightning validates these (and refuses --ntasks without --ntasks-per-node)
    trainer_cfg.devices, trainer_cfg.num_nodes = int(per_node), int(nodes)
    if os.environ.get("SLURM_PROCID", "0") == "0":
        print(f"srun started {os.environ['SLURM_NTASKS']} tasks: trainer.devices {per_node}, trainer.num_nodes {nodes}")


#: what a run writes into its folder (``checkpoints/<run_name>/``); ``*.ckpt`` may be DeepSpeed folders
RUN_FILES = ("*.ckpt", "config.yaml", "hparams.yaml", "events.out.tfevents.*", "report.json", "eval",
             "checkpoints")  # the last: where a ModelCheckpoint of the user's own without dirpath saves
#: ``train.py validate``'s TensorBoard folder inside a run folder: it does not make a folder an earlier
#: run's (a validation of the untrained student may come first), ``--overwrite_run`` clears it
VALIDATE_DIR = "validate"

#: ``--ckpt_path`` values that Lightning resolves to a checkpoint of this run's own folder
_RESUME_NAMES = ("last", "best")


def _added_form(callback, added: dict) -> bool:
    """Whether a ``trainer.callbacks`` entry is one that ``train.py`` adds, as it adds it: its class
    (``added``: name -> (module, init args)) with every init argument at that value or the class's
    default (jsonargparse writes them all into a saved config). Any RunCheckpoint entry counts: the
    class is this app's, made from run_name and checkpoint_every_n_steps."""
    import dataclasses
    import importlib
    import inspect

    path = callback.get("class_path") if hasattr(callback, "get") else None
    name = path.rsplit(".", 1)[-1] if path else None
    if name not in added:
        return False
    module, init = added[name]
    cls = getattr(importlib.import_module(module), name)
    if path not in (f"{module}.{name}", f"{cls.__module__}.{name}"):
        return False  # another class of that name
    if name == "RunCheckpoint":
        return True
    plain = lambda v: v.as_dict() if hasattr(v, "as_dict") else dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v  # noqa: E731
    signature = inspect.signature(cls.__init__).parameters
    args = plain(callback.get("init_args") or {})  # (a Namespace's keys() are its nested keys, dotted)
    for key in (args if isinstance(args, dict) else {}):
        want = init[key] if key in init else (signature[key].default if key in signature else inspect.Parameter.empty)
        if want is inspect.Parameter.empty or plain(args[key]) != plain(want):
            return False
    return True


def _follow_run_name(logger, default: dict) -> None:
    """A TensorBoard logger in the form ``train.py`` makes it (``version`` '': the events directly in a
    run folder) for another run: the saved ``config.yaml`` of that run, given to a new ``--run_name``
    or ``trainer.default_root_dir``. It takes this run's folder when it names another one under the
    same root, or a folder that holds a run (a ``config.yaml``), so that the new run's events do not go
    into the other run's folder (its other settings stay)."""
    if not hasattr(logger, "get") or logger.get("class_path") != default["class_path"]:
        return
    args, mine = logger.get("init_args"), default["init_args"]
    if args is None or args.get("version") != "":
        return
    here = (str(args.get("save_dir")), str(args.get("name")))
    if here == (mine["save_dir"], mine["name"]):
        return
    if here[0] == mine["save_dir"] or (Path(here[0]) / here[1] / "config.yaml").is_file():
        args["save_dir"], args["name"] = mine["save_dir"], mine["name"]


def _same_logger(logger, default: dict) -> bool:
    """Whether a config's ``trainer.logger`` is ``default`` (a run's saved config holds the one fit used)."""
    if not hasattr(logger, "get") or logger.get("class_path") != default["class_path"]:
        return False
    args = logger.get("init_args") or {}
    return all(str(args.get(k)) == str(v) for k, v in default["init_args"].items())


def _run_folder(cfg) -> Path:
    """``checkpoints/<run_name>/`` of a resolved config; a ``run_name`` that is not a folder below the
    root (empty, absolute, or with a ``.`` / ``..`` part: the root itself, its parent, ...) is refused."""
    name = str(cfg.run_name or "")
    parts = Path(name).parts
    if not name.strip() or Path(name).is_absolute() or any(p in (".", "..") for p in name.replace("\\", "/").split("/")):
        raise ValueError(f"run_name {name!r} must name a folder below trainer.default_root_dir "
                         f"({cfg.trainer.default_root_dir or DEFAULT_ROOT}), e.g. opensora_w3a6 or exp/w3a6, without "
                         "'.' or '..' parts; for runs elsewhere set --trainer.default_root_dir")
    return Path(cfg.trainer.default_root_dir or DEFAULT_ROOT).joinpath(*parts)


def _resumes_folder(ckpt_path) -> bool:
    return isinstance(ckpt_path, str) and ckpt_path in _RESUME_NAMES


def _inside(path, folder: Path) -> bool:
    return Path(path).resolve().is_relative_to(folder.resolve())


def _read_run_checkpoint(path: Path) -> dict:
    """A run's checkpoint file, or a DeepSpeed checkpoint folder's own entries (without gathering the
    shards)."""
    return read_checkpoint(path, mmap=True) if path.is_file() else read_deepspeed_client_state(path)


def _refuse_overwriting_later_checkpoints(run: Path, ckpt: Path, step: int) -> None:
    """Resuming an earlier checkpoint of a run inside its own folder would save over the run's later
    checkpoints (the same step names, ``last.ckpt``) and its ``config.yaml``: refused, naming them."""
    later = []
    for path in sorted(run.glob("step*.ckpt")):
        digits = path.name.removeprefix("step").removesuffix(".ckpt")
        if digits.isdigit() and int(digits) > step and path.resolve() != ckpt.resolve():
            later.append(path.name)
    last = run / "last.ckpt"
    if last.exists() and last.resolve() != ckpt.resolve():
        state = _read_run_checkpoint(last)
        if int(state.get("global_step", 0)) > step:
            later.append(f"last.ckpt (step {state['global_step']})")
    if later:
        raise FileExistsError(
            f"--ckpt_path {ckpt} resumes at step {step}, but {run} holds later checkpoints this run would "
            f"overwrite: {', '.join(later)}. Continue in a folder of its own (--run_name <new> with the same "
            "--ckpt_path), or move those checkpoints away first")


def _run_files(run: Path) -> list[str]:
    return sorted({p.name for pattern in RUN_FILES for p in run.glob(pattern)}) if run.is_dir() else []


def _refuse_foreign_hpc_resume(trainer, run: Path) -> None:
    """Under SLURM, Lightning resumes a fit given no checkpoint from the newest ``hpc_ckpt_<n>.ckpt`` in
    ``trainer.default_root_dir``: the folder every run shares here, so a fresh run would silently
    continue whichever run's SLURM auto-requeue saved it (seen: run B restored run A's). This app saves
    none (``RunCheckpoint`` takes the requeue signal over), so one there is another run's, or a
    Lightning-style job's: refused, naming it."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    if not SLURMEnvironment.detect():
        return
    hpc = getattr(getattr(trainer, "_checkpoint_connector", None), "_hpc_resume_path", None)
    if hpc:
        raise FileExistsError(
            f"{hpc}: under SLURM, Lightning resumes a fit started without --ckpt_path from this auto-requeue "
            f"checkpoint, whichever run saved it, so run folder {run} would continue it: move it out of "
            f"{trainer.default_root_dir}, or resume a run with --ckpt_path (last, or this file)")


def _purge_later_events(trainer, step: int) -> None:
    """A resumed run hides, in TensorBoard, what the earlier process logged after the checkpoint it
    resumes (a run killed at step 380 with last.ckpt at 350 would show steps 350-380 twice, two
    curves drawn over each other): ``SummaryWriter(purge_step=step)`` marks the new event file so that
    TensorBoard drops the older files' events from ``step`` on. Lightning logs the metrics of the
    step that makes ``global_step`` T at step T - 1, so ``step`` is the checkpoint's ``global_step``.
    Set on TensorBoard loggers whose writer does not exist yet (it is made at the first log)."""
    from lightning.pytorch.loggers import TensorBoardLogger

    for logger in trainer.loggers:
        kwargs = getattr(logger, "_kwargs", None)
        if isinstance(logger, TensorBoardLogger) and isinstance(kwargs, dict) and logger._experiment is None:
            kwargs.setdefault("purge_step", step)


def _check_run_folder(run: Path, ckpt_path, overwrite: bool, requeued: bool = False) -> None:
    """Refuse to train into a folder that holds another run's files, unless this resumes that run.
    ``requeued``: ``--ckpt_path last`` found no ``last.ckpt``; only checkpoints refuse the folder then
    (a job preempted before its first checkpoint left only its config and events)."""
    if overwrite or _resumes_folder(ckpt_path) or (ckpt_path is not None and _inside(ckpt_path, run)):
        return  # `last` that finds nothing is judged again once resolved (MPQCLI.before_fit)
    found = [f for f in _run_files(run) if f.endswith(".ckpt") or not requeued]
    if found:
        listed = f"{', '.join(found[:3])}{' ...' if len(found) > 3 else ''}"
        if requeued:
            raise FileExistsError(
                f"--ckpt_path last: run folder {run} has no last.ckpt but holds checkpoints ({listed}): resume one "
                f"with --ckpt_path {run}/<file>, start afresh with --overwrite_run true, or choose another --run_name")
        source = "" if ckpt_path is None else f" (--ckpt_path {ckpt_path} is another run's checkpoint)"
        if not any(f.endswith(".ckpt") for f in found):  # nothing to resume: a fit that failed before saving
            raise FileExistsError(
                f"run folder {run} holds an earlier run that saved no checkpoint ({listed}){source}: start it afresh "
                "with --overwrite_run true (or --ckpt_path last, which keeps its logs), or choose another --run_name")
        raise FileExistsError(
            f"run folder {run} already holds an earlier run ({listed}){source}: resume it with --ckpt_path last, "
            "start it afresh with --overwrite_run true, or choose another --run_name"
        )


def _check_overwrite(run: Path, ckpt_path, overwrite: bool) -> None:
    if overwrite and ckpt_path is not None and not _resumes_folder(ckpt_path) and _inside(ckpt_path, run):
        raise ValueError(f"--overwrite_run true would delete {ckpt_path}, the checkpoint --ckpt_path starts from: "
                         "copy it out of the run folder first, or resume without --overwrite_run")


def _clear_run_folder(run: Path, keep_validate: bool = False) -> None:
    """``--overwrite_run true``: delete what an earlier run wrote (its files only, not the folder). Every
    rank of a torchrun job does this at once, so a file another rank removed first is no error.
    ``keep_validate``: leave ``validate/`` (a validation of the untrained student, not this fit's)."""
    import shutil

    for pattern in (*RUN_FILES, *(() if keep_validate else (VALIDATE_DIR,))):
        for path in run.glob(pattern):
            if path.is_dir():  # eval/ and DeepSpeed checkpoint folders
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


def _keep_none_kwarg() -> dict[str, bool]:
    """jsonargparse's "write keys whose value is None" switch: ``skip_unset`` from 4.49 on, where
    ``skip_none`` is deprecated (removed in 5.0), ``skip_none`` before."""
    from importlib.metadata import version

    major, minor = (int(p) for p in version("jsonargparse").split(".")[:2])
    return {"skip_unset": False} if (major, minor) >= (4, 49) else {"skip_none": False}


_KEEP_NONE = _keep_none_kwarg()


class RunConfigCallback(SaveConfigCallback):
    """Saves the resolved config as ``checkpoints/<run_name>/config.yaml`` whatever the logger:
    Lightning's callback writes into the logger's folder, which without a logger is the shared root."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.already_saved or stage != "fit":  # validate leaves the fit's config.yaml as it is
            return
        if trainer.is_global_zero:
            run = _run_folder(self.config)
            run.mkdir(parents=True, exist_ok=True)
            target = run / self.config_filename
            if self.multifile:  # sub-configs written as files of their own: jsonargparse's save
                self.parser.save(self.config, str(target), overwrite=True, multifile=True, **_KEEP_NONE)
            else:  # what save writes, written whole or not at all: a resume overwrites the run's config.yaml
                atomic_write(target, self.parser.dump(self.config, **_KEEP_NONE).encode())
            self.save_config(trainer, pl_module, stage)
            self.already_saved = True
        self.already_saved = trainer.strategy.broadcast(self.already_saved)


def _resolve_ckpt_path(trainer, ckpt_path) -> Path | None:
    """The file or DeepSpeed folder ``trainer.fit(ckpt_path=...)`` will restore (``last`` / ``best``
    resolved the way Lightning resolves them), or None (no ``ckpt_path``, or ``last`` with nothing saved)."""
    if ckpt_path is None:
        return None
    from lightning.pytorch.trainer.states import TrainerFn

    resolved = trainer._checkpoint_connector._parse_ckpt_path(TrainerFn.FITTING, ckpt_path, model_provided=True,
                                                             model_connected=True)
    if resolved is None:
        return None
    path = Path(resolved)
    if not path.exists():
        raise FileNotFoundError(f"ckpt_path: {ckpt_path} ({path}) does not exist")
    return path


def _check_paths(cfg) -> None:
    """Refuse missing local files named by the config before any model is built."""
    model_kwargs = cfg.model.model_kwargs or {}
    checks = [(f"model.model_kwargs.{k}", model_kwargs.get(k)) for k in ("ckpt_path", "path")]
    data_args = getattr(cfg.data, "init_args", None)
    recipe = getattr(data_args, "recipe", None) if data_args is not None else None
    if recipe is not None:
        checks.append(("data.init_args.recipe.cond_path", getattr(recipe, "cond_path", None)))
    if data_args is not None and isinstance(getattr(data_args, "cond_path", None), str):  # OnTheFlyDataModule
        checks.append(("data.init_args.cond_path", data_args.cond_path))
    for i, callback in enumerate(cfg.trainer.callbacks or []):  # SampleLogger(vae=...): a local folder
        init = callback.get("init_args") if hasattr(callback, "get") else None
        vae = init.get("vae") if init is not None and hasattr(init, "get") else None
        if isinstance(vae, str):
            checks.append((f"trainer.callbacks[{i}].init_args.vae", vae))
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


#: where Lightning's rank-zero info lines go (lightning_utilities logs through whichever imported last)
_LIGHTNING_INFO_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")


def _no_cloud_logger_tip(record: logging.LogRecord) -> bool:
    return "litlogger" not in str(record.msg)


def quiet_lightning() -> None:
    """Silence what Lightning and torch print that is not the user's to act on (every MPQCLI: train.py,
    evaluate.py, export). Idempotent."""
    # distillation runs both backbones in eval mode on purpose (QATModule.train)
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
    warnings.filterwarnings("ignore", message=r"Your `IterableDataset` has `__len__` defined")
    # a data module without held-out trajectories returns [] from val_dataloader (Lightning's "no validation")
    warnings.filterwarnings("ignore", message=r"Total length of `list` across ranks is zero")
    # Lightning 2.6's own pytree helper under torch >= 2.10: nothing a user can act on
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    # ... and its all_gather (the memory queue's gather under DDP), through torch's deprecated autograd collective
    warnings.filterwarnings("ignore", message=r"torch\.distributed\.nn\.functional\.all_gather is deprecated",
                            category=FutureWarning)
    # the run folder is checked by _check_run_folder (TensorBoard's events are written there first)
    warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
    for name in _LIGHTNING_INFO_LOGGERS:  # Lightning's advertisement for its cloud logger, at every Trainer
        logging.getLogger(name).addFilter(_no_cloud_logger_tip)  # (the same function again adds nothing)


def _check_config_files(argv: list[str]) -> None:
    """Every ``--config`` file parses as YAML. jsonargparse's error for one that does not names neither
    the file nor which of several ``--config`` it was (``in "<unicode string>", line 4``). A path that
    is not a file is left to the parser (which names a missing one; a YAML string is allowed)."""
    for i, arg in enumerate(argv):
        path = argv[i + 1] if arg in ("-c", "--config") and i + 1 < len(argv) else None
        path = arg.split("=", 1)[1] if arg.startswith("--config=") else path
        if path is not None and Path(path).is_file():
            read_yaml(path, "--config")


def main(argv: list[str] | None = None, default_subcommand: str = "fit") -> MPQCLI:
    """Entry point of ``train.py``: inserts the ``fit`` subcommand when none is given."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # the embedded default (shipped Moving-Digits teacher, our method at W3A6) unless a config is given:
    # `python train.py` runs it, `python train.py --trainer.max_steps 5` overrides it
    if not any(a in ("-c", "--config", "-h", "--help") or a.startswith("--config=") for a in argv):
        argv = ["--config", str(DEFAULT_CONFIG), *argv]
        if argv[2:3] and argv[2] in (*SUBCOMMANDS, *_NOT_OURS):  # `train.py fit ...`: subcommand first
            argv = [argv[2], *argv[:2], *argv[3:]]
    _check_config_files(argv)
    if argv[0] in _NOT_OURS:
        raise ValueError(f"train.py {argv[0]}: train.py runs fit (the default) and validate; evaluate a run with "
                         "python evaluate.py --config <run>/config.yaml")
    if argv[0] not in SUBCOMMANDS:  # `python train.py --help` too: the options of what train.py runs
        argv = [default_subcommand] + argv
    sys.argv = [sys.argv[0]] + argv  # LightningCLI reads sys.argv; passing args too makes it warn
    return MPQCLI()


#: what our own checks raise with a message written for the user: a bad config key, file, tensor shape
#: or checkpoint (ValueError and its subclasses, FileNotFoundError, ...), a non-finite loss
#: (FloatingPointError), a setting this machine or strategy cannot run (RuntimeError, NotImplementedError)
USER_ERRORS = (ValueError, TypeError, FileNotFoundError, FileExistsError, FloatingPointError, NotImplementedError,
               RuntimeError)
_PACKAGE = Path(__file__).resolve().parent


def _raised_here(error: BaseException) -> bool:
    """Whether ``error`` was raised by this package's own code (its innermost frame is in it)."""
    tb, where = error.__traceback__, None
    while tb is not None:
        where, tb = tb.tb_frame.f_code.co_filename, tb.tb_next
    return where is not None and Path(where).resolve().is_relative_to(_PACKAGE)


def run_script(entry: Callable[[], Any]) -> None:
    """Run a script's ``main``. An error our own checks raise (one of ``USER_ERRORS``, raised in this
    package: its message names the config key, file or shape) is printed as one line on stderr and the
    script exits with status 1; ``MPQ_TRACEBACK=1`` shows the traceback instead. Anything else (an
    error raised inside torch, Lightning, ..., or one of ours without a message: possibly a bug)
    keeps its traceback. A fit stopped by a signal (see ``RunCheckpoint``) exits with 128 + the
    signal's number, never 0: Lightning's own ``SIGTERMException`` carries no status. A Ctrl-C outside
    training (generating the trajectory cache, calibrating, evaluating) exits with 130 and a line
    instead of a traceback (the cache's finished shards are kept: the same command goes on from them)."""
    try:
        entry()
    except KeyboardInterrupt:
        if os.environ.get("MPQ_TRACEBACK", "") not in ("", "0"):
            raise
        print(f"\n{Path(sys.argv[0]).name}: interrupted (Ctrl-C)", file=sys.stderr)
        raise SystemExit(128 + signal.SIGINT) from None
    except SIGTERMException as stopped:
        if stopped.code in (None, 0):
            print(f"{Path(sys.argv[0]).name}: stopped by SIGTERM", file=sys.stderr)
            raise SystemExit(128 + signal.SIGTERM) from None
        raise
    except USER_ERRORS as error:
        ours = _our_check(error)
        if os.environ.get("MPQ_TRACEBACK", "") not in ("", "0") or ours is None:
            raise
        print(f"{Path(sys.argv[0]).name}: error: {type(ours).__name__}: {ours}\n"
              "(set MPQ_TRACEBACK=1 to see the traceback)", file=sys.stderr)
        raise SystemExit(1) from None


def _our_check(error: BaseException) -> BaseException | None:
    """``error`` if one of our checks raised it, or the error of ours that it was raised from:
    jsonargparse re-raises what a data module's ``__init__`` raised as its own "Does not validate
    against any of the Union subtypes", with the class's whole config in the message."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, USER_ERRORS) and str(error) and _raised_here(error):
            return error
        error = error.__cause__
    return None
