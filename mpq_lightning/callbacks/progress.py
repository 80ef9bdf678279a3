"""The training progress bar: Lightning's Rich one, fitted to runs bounded by ``max_steps``, with
plain progress lines where the output is not a terminal (a batch job's log file)."""
from __future__ import annotations

import datetime
import time

from lightning.pytorch.callbacks import RichProgressBar


class StepRichProgressBar(RichProgressBar):
    """Lightning's :class:`~lightning.pytorch.callbacks.RichProgressBar`, mended for runs bounded by
    ``trainer.max_steps`` alone (Lightning sets ``max_epochs = -1`` there):

    * the description read ``Epoch 0/-2``; it reads ``Epoch 0`` (runs with a ``max_epochs`` keep
      Lightning's ``Epoch 0/9``);
    * a run resumed mid-epoch read ``102/1``: Lightning's total is the optimiser steps left, while
      the count is the batch index within the epoch, which a resumed run starts part-way. The total
      here is that index plus the batches left (steps left times ``accumulate_grad_batches``, less
      the micro-batches of the current window), capped at the epoch's length;
    * where the output is not a terminal (a SLURM or nohup log file), Rich draws nothing until the
      run ends, so a day-long run's log stayed silent: there, a plain line (step, share done, rate,
      time left, the bar's metrics) is printed every ``trainer.log_every_n_steps`` steps, at most one
      per ``line_every_s`` seconds, and at the last step.
    """

    #: the least time between two plain progress lines (non-terminal output only)
    line_every_s: float = 30.0

    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        self._line_start = (time.monotonic(), trainer.global_step)
        self._line_last, self._line_step = float("-inf"), None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        console = getattr(self, "_console", None)
        if console is None or console.is_terminal or not trainer.is_global_zero or self.is_disabled:
            return
        step, total = trainer.global_step, trainer.max_steps
        last = total is not None and step >= total > 0
        now = time.monotonic()
        every = max(1, trainer.log_every_n_steps or 1)
        # (one line per step: a step of several accumulated batches ends more than one batch)
        if not last and (step % every or now - self._line_last < self.line_every_s or step == self._line_step):
            return
        self._line_last, self._line_step = now, step
        start_t, start_step = self._line_start
        rate = (step - start_step) / max(now - start_t, 1e-9)
        parts = [f"step {step}" + (f"/{total} ({100 * step / total:.1f}%)" if total and total > 0 else ""),
                 f"epoch {trainer.current_epoch}", f"{rate:.2f} steps/s"]
        if total and total > 0 and rate > 0 and not last:
            parts.append(f"{datetime.timedelta(seconds=round((total - step) / rate))} left")
        metrics = self.get_metrics(trainer, pl_module)
        parts += [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items() if k != "v_num"]
        console.print(" · ".join(parts), highlight=False, markup=False, soft_wrap=True)

    def _get_train_description(self, current_epoch: int) -> str:
        max_epochs = self.trainer.max_epochs
        if max_epochs is None or max_epochs >= 0:
            return super()._get_train_description(current_epoch)
        description = f"Epoch {current_epoch}"
        # padded to the validation bar's description, as Lightning does, so the bars do not flicker
        return f"{description:{len(self.validation_description)}}"

    @property
    def total_train_batches(self) -> int | float:
        trainer = self.trainer
        if not (trainer.max_epochs == -1 and trainer.max_steps is not None and trainer.max_steps > 0):
            return super().total_train_batches
        done = trainer.fit_loop.epoch_loop.batch_progress.current.processed  # batches of this epoch so far
        accumulate = trainer.accumulate_grad_batches
        left = (trainer.max_steps - trainer.global_step) * accumulate - done % accumulate
        return min(trainer.num_training_batches, done + left)
