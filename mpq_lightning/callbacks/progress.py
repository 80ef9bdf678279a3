"""The training progress bar: Lightning's Rich one, with a description that fits step-bounded runs."""
from __future__ import annotations

from lightning.pytorch.callbacks import RichProgressBar


class StepRichProgressBar(RichProgressBar):
    """Lightning's :class:`~lightning.pytorch.callbacks.RichProgressBar`, except in a run bounded by
    ``trainer.max_steps`` alone. There Lightning sets ``max_epochs = -1`` and the bar read
    ``Epoch 0/-2``; this one reads ``Epoch 0`` (the bar's own count shows the steps). Runs with a
    ``max_epochs`` keep Lightning's ``Epoch 0/9``."""

    def _get_train_description(self, current_epoch: int) -> str:
        max_epochs = self.trainer.max_epochs
        if max_epochs is None or max_epochs >= 0:
            return super()._get_train_description(current_epoch)
        description = f"Epoch {current_epoch}"
        # padded to the validation bar's description, as Lightning does, so the bars do not flicker
        return f"{description:{len(self.validation_description)}}"
