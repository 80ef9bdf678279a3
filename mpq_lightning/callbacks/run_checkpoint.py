"""``RunCheckpoint``: Lightning's ModelCheckpoint that always leaves the final step in ``last.ckpt``.

Lightning saves ``last`` when a periodic checkpoint is written, and at the end of training only if
no ``last`` was written at all. With ``max_steps`` not a multiple of ``every_n_train_steps`` the
steps after the last periodic checkpoint would be lost, and ``evaluate.py`` / ``--ckpt_path last``
would use an older student. This callback saves the final step when training ends normally (a run
stopped by an exception keeps its last good checkpoint untouched), and already at the batch that
reaches ``max_steps`` or ends the last of ``max_epochs``: Lightning runs checkpoint callbacks after the others, so a failing
end-of-training callback (sampling out of memory) would otherwise lose the steps since the last
periodic checkpoint. ``fast_dev_run`` saves nothing, as Lightning documents for it.
"""
from __future__ import annotations

from lightning.pytorch.callbacks import ModelCheckpoint


class RunCheckpoint(ModelCheckpoint):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        final = trainer.max_steps is not None and 0 < trainer.max_steps <= trainer.global_step
        if trainer.max_epochs is not None and trainer.max_epochs > 0 and trainer.current_epoch + 1 >= trainer.max_epochs:
            last_batch = batch_idx + 1 >= trainer.num_training_batches  # limit_train_batches included
            final = final or last_batch or bool(getattr(trainer.fit_loop.epoch_loop.batch_progress, "is_last_batch", False))
        if final and self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.fast_dev_run:  # Lightning's own on_train_end saves `last` even then (2.6)
            return
        super().on_train_end(trainer, pl_module)
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
