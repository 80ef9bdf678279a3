"""``RunCheckpoint``: Lightning's ModelCheckpoint that always leaves the final step in ``last.ckpt``,
and saves it when the job is asked to stop.

Lightning saves ``last`` when a periodic checkpoint is written, and at the end of training only if
no ``last`` was written at all. With ``max_steps`` not a multiple of ``every_n_train_steps`` the
steps after the last periodic checkpoint would be lost, and ``evaluate.py`` / ``--ckpt_path last``
would use an older student. This callback saves the final step when training ends normally (a run
stopped by an exception keeps its last good checkpoint untouched), and already at the batch that
reaches ``max_steps`` or ends the last of ``max_epochs``: Lightning runs checkpoint callbacks after the others, so a failing
end-of-training callback (sampling out of memory) would otherwise lose the steps since the last
periodic checkpoint. ``fast_dev_run`` saves nothing, as Lightning documents for it.

**Stopping.** While training, a SIGTERM (a scheduler preempting the job, ``kill``, torchrun passing
on its own) or a first Ctrl-C (SIGINT) asks the run to stop: at the end of the current optimiser
step (never inside a gradient-accumulation window) every rank stops together, ``last.ckpt`` is
saved at that step, and the fit raises Lightning's ``SIGTERMException`` carrying ``signum``, which
``train.py`` turns into exit status 128 + signum. Resuming with ``--ckpt_path last`` then continues as
if the job had not stopped. A second Ctrl-C (at least a second after the first) stops at once, as
Lightning does, without saving. Without this, Lightning (2.6) stops a SIGTERM'd fit with status 0
and no checkpoint (the steps since the last periodic one lost), and Ctrl-C with none either. Under
several processes the ranks agree on stopping with one small all-reduce per optimiser step, so a
signal that reaches only one rank (``kill`` of rank 0) stops them all at the same step.

**SLURM auto-requeue.** Under Lightning's ``SLURMEnvironment`` with ``auto_requeue`` (its default when
SLURM runs the job), its requeue signal (SIGUSR1 unless configured; ``sbatch --signal=SIGUSR1@90``) is
taken over too: the run stops and saves as above, then global rank 0 requeues the job with ``scontrol
requeue``. Lightning's own handler saved ``hpc_ckpt_<n>.ckpt`` from inside the signal handler (mid-step
possibly) into the shared ``checkpoints/`` root, from which Lightning then resumed any run started
without ``--ckpt_path`` (see ``MPQCLI.before_fit``); the requeued job resumes with ``--ckpt_path last``.
"""
from __future__ import annotations

import os
import signal
import subprocess
import threading
import time

import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_NAMES = {signal.SIGTERM: "SIGTERM", signal.SIGINT: "Ctrl-C (SIGINT)"}
_REPEAT_S = 1.0  # a second Ctrl-C sooner than this is the same press (a terminal and torchrun both pass it on)


class RunCheckpoint(ModelCheckpoint):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._stop_signal: int | None = None
        self._stop_asked_at = 0.0
        self._handlers: dict[int, object] = {}
        self._step_seen = -1
        self._rank_zero = True
        self._pid = os.getpid()
        self._requeue_signal: int | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        self._step_seen, self._rank_zero = trainer.global_step, trainer.is_global_zero
        self._stop_signal = signal.SIGTERM if trainer.received_sigterm else None  # Lightning's (sanity check)
        self._pid = os.getpid()
        # (a single-device strategy has none of its own: Lightning's signal set-up reads the connector's)
        environment = getattr(getattr(trainer, "_accelerator_connector", None), "cluster_environment", None)
        self._requeue_signal = (environment.requeue_signal if isinstance(environment, SLURMEnvironment)
                                and environment.auto_requeue else None)
        if threading.current_thread() is threading.main_thread():  # Python runs handlers in the main thread only
            for signum in (*STOP_SIGNALS, *([self._requeue_signal] if self._requeue_signal else [])):
                self._handlers[signum] = signal.signal(signum, self._ask_to_stop)

    def _ask_to_stop(self, signum: int, frame) -> None:
        if os.getpid() != self._pid:  # a DataLoader worker forked with this handler (a terminal's Ctrl-C reaches
            return  # it too): it keeps serving batches until the step ends, and dies with the loader
        now = time.monotonic()
        if self._stop_signal is None:
            self._stop_signal, self._stop_asked_at = signum, now
            if self._rank_zero:  # os.write: a print here could re-enter a write the main thread is in
                again = " (Ctrl-C again to stop at once, without saving)" if signum == signal.SIGINT else ""
                again = " and requeueing the SLURM job" if signum == self._requeue_signal else again
                os.write(2, f"\n{self._name(signum)}: stopping after this step and saving last.ckpt"
                            f"{again}\n".encode())
        elif signum == signal.SIGINT and now - self._stop_asked_at > _REPEAT_S:
            raise KeyboardInterrupt

    def _name(self, signum: int) -> str:
        return _NAMES.get(signum) or f"{signal.Signals(signum).name} (SLURM requeue)"

    def _restore_handlers(self) -> None:
        for signum, handler in self._handlers.items():
            signal.signal(signum, handler)
        self._handlers = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        final = trainer.max_steps is not None and 0 < trainer.max_steps <= trainer.global_step
        if trainer.max_epochs is not None and trainer.max_epochs > 0 and trainer.current_epoch + 1 >= trainer.max_epochs:
            last_batch = batch_idx + 1 >= trainer.num_training_batches  # limit_train_batches included
            final = final or last_batch or bool(getattr(trainer.fit_loop.epoch_loop.batch_progress, "is_last_batch", False))
        if final:
            self._save_last_now(trainer)
        if trainer.global_step == self._step_seen:  # inside a gradient-accumulation window: no optimiser step yet
            return
        self._step_seen = trainer.global_step
        stop = self._stop_signal is not None
        requeue = stop and self._stop_signal == self._requeue_signal
        if trainer.world_size > 1:  # every rank, every optimiser step: all stop at the same one
            votes = trainer.strategy.reduce(torch.tensor([stop, requeue], dtype=torch.int32,
                                                         device=trainer.strategy.root_device), reduce_op="sum")
            stop, requeue = bool(votes[0]), bool(votes[1])
        if stop and not final:
            self._stop(trainer, requeue)

    def _stop(self, trainer, requeue: bool) -> None:
        self._save_last_now(trainer)
        signum = self._requeue_signal if requeue else (self._stop_signal or signal.SIGTERM)  # or another rank's
        if trainer.is_global_zero:
            saved = f"saved {self.last_model_path}; resume with --ckpt_path last" if self.last_model_path else "nothing saved"
            print(f"{self._name(signum)}: stopped after step {trainer.global_step}: {saved}", flush=True)
            if requeue:
                _requeue_slurm_job()
        error = SIGTERMException(128 + signum)
        error.signum = signum
        raise error

    def _save_last_now(self, trainer) -> None:
        """``last.ckpt`` at this step, unless saved already (or Lightning saves nothing here)."""
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._restore_handlers()
        super().on_exception(trainer, pl_module, exception)

    def on_train_end(self, trainer, pl_module) -> None:
        self._restore_handlers()
        if trainer.fast_dev_run:  # Lightning's own on_train_end saves `last` even then (2.6)
            return
        super().on_train_end(trainer, pl_module)
        self._save_last_now(trainer)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self._restore_handlers()
        super().teardown(trainer, pl_module, stage)


def _requeue_slurm_job() -> None:
    """``scontrol requeue`` this job (an array job's task by its array ids), as Lightning's SLURM
    handler does; a failure is reported, not raised (the checkpoint is saved either way)."""
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    job = f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array_job else os.environ.get("SLURM_JOB_ID", "")
    try:
        done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
        failed = done.returncode and (done.stderr.strip() or f"status {done.returncode}")
    except (OSError, subprocess.TimeoutExpired) as error:
        failed = str(error)
    print(f"scontrol requeue {job}: {'failed: ' + failed if failed else 'requeued'}", flush=True)
