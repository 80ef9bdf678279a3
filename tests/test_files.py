"""File helpers shared by the writers and readers of run artefacts (mpq_lightning/files.py)."""
import os

import pytest
import torch

from mpq_lightning.files import RunLock, atomic_write, read_checkpoint, read_tensor_file


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

    from lightning.pytorch.plugins.io import AsyncCheckpointIO

    default, own, threaded, threaded_own = (Trainer(accelerator="cpu", logger=False, plugins=p) for p in (
        None, [Mine()], [AsyncCheckpointIO()], [AsyncCheckpointIO(Mine())]))
    for trainer in (default, own, threaded, threaded_own):
        use_atomic_checkpoints(trainer)
    assert type(default.strategy.checkpoint_io) is AtomicCheckpointIO and type(own.strategy.checkpoint_io) is Mine
    # AsyncCheckpointIO saves in its thread through the IO it wraps: ours in place of Lightning's default
    assert type(threaded.strategy.checkpoint_io) is AsyncCheckpointIO
    assert type(threaded.strategy.checkpoint_io.checkpoint_io) is AtomicCheckpointIO
    assert type(threaded_own.strategy.checkpoint_io.checkpoint_io) is Mine


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


def test_run_lock_admits_one_holder_and_names_it(tmp_path):
    """One holder at a time (flock: another process, or another open of the file in this one); the
    refusal names the holder; released, the next one gets it. Released, the lock file is gone, and so
    is a folder the lock created if nothing else was written; a holder that died leaves the file,
    which the next one takes over."""
    import socket
    import subprocess
    import sys

    run = tmp_path / "checkpoints" / "r"
    first = RunLock(run)
    first.acquire()
    with pytest.raises(FileExistsError, match=rf"run folder {run} is being trained by pid {os.getpid()} on "
                                              rf"{socket.gethostname()}, since .*: wait for it"):
        RunLock(run).acquire()
    first.release()
    assert not run.exists() and (tmp_path / "checkpoints").exists()
    run.mkdir(parents=True)
    (run / "last.ckpt").write_bytes(b"x")
    holder = subprocess.Popen([sys.executable, "-c", "import sys; from mpq_lightning.files import RunLock; "
                               f"RunLock({str(run)!r}).acquire(); print('held', flush=True); sys.stdin.read()"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(FileExistsError, match=rf"being trained by pid {holder.pid} "):
            RunLock(run).acquire()
    finally:
        holder.communicate("", timeout=60)  # the holder exits: the kernel drops its lock
    assert sorted(p.name for p in run.iterdir()) == [".lock", "last.ckpt"]  # the dead holder's
    again = RunLock(run)
    again.acquire()
    again.release()
    assert sorted(p.name for p in run.iterdir()) == ["last.ckpt"]


def test_run_lock_on_a_file_system_without_locks_warns_and_trains(tmp_path, monkeypatch):
    import errno
    import fcntl

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    """``flock`` failing with ENOLCK (NFS mounted with nolock): a warning naming the file and the reason,
    no lock held, and the run is not refused (a second holder is admitted too: nothing can tell them
    apart there)."""
    monkeypatch.setattr(fcntl, "flock", no_locks)
    lock, second = RunLock(tmp_path / "r"), RunLock(tmp_path / "r")
    with pytest.warns(UserWarning, match=r"could not lock .*r/.lock \(\[Errno 37\] No locks available\): a second"):
        lock.acquire()
    assert lock._fd is None  # nothing held, nothing to release
    with pytest.warns(UserWarning, match="could not lock"):
        second.acquire()  # not refused: FileExistsError would fail the test here
    assert second._fd is None
    lock.release()
    assert (tmp_path / "r").is_dir()


def test_run_lock_taken_on_a_file_being_deleted_tries_the_path_again(tmp_path, monkeypatch):
    """A release deletes the lock file while holding it; a process that opened that file just before
    and locks it after the release holds a deleted file: it must notice and lock the path's new file,
    or a third process could hold that one at the same time."""
    import fcntl

    run = tmp_path / "r"
    run.mkdir()
    real_flock, calls = fcntl.flock, []

    def flock_after_a_release(fd, op):  # the first try: the file is deleted (and re-created) under us
        if not calls:
            (run / ".lock").unlink()
            (run / ".lock").write_text("")
        calls.append(fd)
        return real_flock(fd, op)

    monkeypatch.setattr(fcntl, "flock", flock_after_a_release)
    lock = RunLock(run)
    lock.acquire()
    assert len(calls) == 2 and os.path.samestat(os.fstat(lock._fd), os.stat(run / ".lock"))
    monkeypatch.setattr(fcntl, "flock", real_flock)
    with pytest.raises(FileExistsError, match="is being trained by pid"):
        RunLock(run).acquire()
    lock.release()


def test_run_lock_release_survives_its_folder_deleted(tmp_path):
    import shutil

    lock = RunLock(tmp_path / "r")
    lock.acquire()
    shutil.rmtree(tmp_path / "r")  # someone deleted the run folder while it trained
    lock.release()
    assert lock._fd is None
