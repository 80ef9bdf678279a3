"""``AtomicCheckpointIO``: Lightning's ``TorchCheckpointIO`` that never leaves half a checkpoint.

Lightning 2.6 serialises a checkpoint into memory, writes it to a file in the system's temporary
folder and moves that file over the old one. Where the run folder is on another file system than
the temporary folder (a cluster's shared disk and a node's local /tmp; /dev/shm), the move is a copy
onto the old ``last.ckpt``: a full disk, a preemption or a kill during it leaves neither the old
checkpoint nor the new one. Here the checkpoint is written beside the old one and renamed over it
(:func:`mpq_lightning.files.atomic_write`), without the in-memory copy. Remote paths (``s3://``)
keep Lightning's way. Under ``AsyncCheckpointIO`` the thread it saves in writes this way too.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io.wrapper import _WrappingCheckpointIO

from .files import atomic_write


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any = None) -> None:
        if storage_options is not None or not isinstance(get_filesystem(path), LocalFileSystem):
            return super().save_checkpoint(checkpoint, path, storage_options)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda f: torch.save(checkpoint, f))


def use_atomic_checkpoints(trainer) -> None:
    """Give ``trainer``'s strategy an :class:`AtomicCheckpointIO` where it has Lightning's default
    ``TorchCheckpointIO``, also inside a wrapper (``AsyncCheckpointIO``, which saves in a thread
    through the IO it wraps: Lightning's default unless the user gave one). A checkpoint IO plugin of
    the user's own stays."""
    io = trainer.strategy.checkpoint_io  # (Lightning puts its default inside an empty wrapper here)
    if type(io) is TorchCheckpointIO:
        trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        return
    while isinstance(io, _WrappingCheckpointIO):
        if type(io.checkpoint_io) is TorchCheckpointIO:
            io._checkpoint_io = AtomicCheckpointIO()  # its setter only fills an empty wrapper
            return
        io = io.checkpoint_io
