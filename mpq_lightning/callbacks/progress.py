"""The training progress bar: Lightning's Rich one, fitted to runs bounded by ``max_steps``."""
from __future__ import annotations

from lightning.pytorch.callbacks import RichProgressBar


class StepRichProgressBar(RichProgressBar):
    """Lightning's :class:`~lightning.pytorch.callbacks.RichProgressBar`, mended for runs bounded by
    ``trainer.max_steps`` alone (Lightning sets ``max_epochs = -1`` there):

    * the description read ``Epoch 0/-2``; it reads ``Epoch 0`` (runs with a ``max_epochs`` keep
      Lightning's ``Epoch 0/9``);
    * a run resumed mid-epoch read ``102/1``: Lightning's total is the optimiser steps left, while
      the count is the batch index within the epoch, which a resumed run starts part-way. The total
      here is that index plus the batches left (steps left times ``accumulate_grad_batches``, less
      the micro-batches of the current window), capped at the epoch's length.
    """

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
