"""File helpers shared by the writers and readers of run artefacts (mpq_lightning/files.py)."""
import os

import pytest
import torch

from mpq_lightning.files import atomic_write, read_checkpoint, read_tensor_file


def test_atomic_write_replaces_whole_or_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "report.json"
    atomic_write(path, b"old")
    atomic_write(path, b"new")
    assert path.read_bytes() == b"new"

    def fail(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", fail)  # killed between writing and renaming
    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, b"half")
    assert path.read_bytes() == b"new" and [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_checkpoint_io_keeps_the_old_checkpoint_when_a_save_fails(tmp_path, monkeypatch):
    """AtomicCheckpointIO writes beside the old checkpoint and renames: a save that dies half-way (full
    disk, kill) leaves the old last.ckpt whole and no temporary file; a save replaces it, with the
    permissions a plain write gives."""
    import mpq_lightning.checkpoint_io as cio

    io = cio.AtomicCheckpointIO()
    path = tmp_path / "run" / "last.ckpt"
    io.save_checkpoint({"global_step": 1, "w": torch.ones(1000)}, path)
    io.save_checkpoint({"global_step": 2, "w": torch.full((1000,), 2.0)}, path)
    assert io.load_checkpoint(path)["global_step"] == 2
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    real_save = torch.save

    def dies_half_way(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        f.truncate(100)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cio.torch, "save", dies_half_way)
    with pytest.raises(OSError, match="No space left"):
        io.save_checkpoint({"global_step": 3, "w": torch.zeros(1000)}, path)
    assert torch.equal(io.load_checkpoint(path)["w"], torch.full((1000,), 2.0))
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]


def test_the_cli_trainer_saves_checkpoints_atomically_and_keeps_a_users_io():
    from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
    from lightning.pytorch import Trainer

    from mpq_lightning.checkpoint_io import AtomicCheckpointIO, use_atomic_checkpoints

    class Mine(TorchCheckpointIO):
        pass

    default, own = (Trainer(accelerator="cpu", logger=False, plugins=p) for p in (None, [Mine()]))
    for trainer in (default, own):
        use_atomic_checkpoints(trainer)
    assert type(default.strategy.checkpoint_io) is AtomicCheckpointIO and type(own.strategy.checkpoint_io) is Mine


def test_readers_name_the_file_and_keep_torch_s_reason(tmp_path):
    good = tmp_path / "good.pt"
    torch.save({"state_dict": {"w": torch.ones(2)}}, good)
    assert torch.equal(read_checkpoint(good, mmap=True)["state_dict"]["w"], torch.ones(2))
    legacy = tmp_path / "legacy.pt"  # torch's pre-zip format cannot be memory-mapped: read plainly
    torch.save({"state_dict": {}}, legacy, _use_new_zipfile_serialization=False)
    assert read_checkpoint(legacy, mmap=True) == {"state_dict": {}}
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match=f"embeddings {empty} cannot be read by torch.load \\(EOFError"):
        read_tensor_file(empty, "embeddings", weights_only=True)
    torch.save({"ema": {}}, tmp_path / "weights.pt")
    with pytest.raises(ValueError, match=r"is not a Lightning checkpoint \(no 'state_dict'; it holds keys \['ema'\]\)"):
        read_checkpoint(tmp_path / "weights.pt")


def test_an_intact_file_holding_more_than_tensors_is_not_called_corrupted(tmp_path):
    """weights_only=True refuses pickled objects (here an argparse.Namespace beside the weights): the
    error names the file and the object, and says how to keep the tensors alone."""
    import argparse

    path = tmp_path / "official.pth"
    torch.save({"model": {"w": torch.ones(2)}, "args": argparse.Namespace(lr=1)}, path)
    with pytest.raises(ValueError) as error:
        read_tensor_file(path, "weights file", weights_only=True)
    message = str(error.value)
    assert f"weights file {path} holds objects other than tensors" in message and "argparse.Namespace" in message
    assert "corrupted" not in message
