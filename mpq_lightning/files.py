"""File-system helpers shared by the writers and readers of run artefacts: permissions, atomic
writes, and reading checkpoints / weights / condition files with errors that name the file."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any, BinaryIO, Callable


def ordinary_permissions(folder: str | Path) -> None:
    """Give ``folder`` and the files in it the permissions that ``mkdir`` and ``open`` would have
    given them (0777 / 0666 less the process umask). A folder from ``tempfile.mkdtemp`` is private
    (0700), and safetensors' ``save_file`` creates 0600 files; an artefact built in such a folder and
    then renamed into place would be unreadable to the other users of a shared machine."""
    umask = os.umask(0)
    os.umask(umask)
    folder = Path(folder)
    os.chmod(folder, 0o777 & ~umask)
    for path in folder.rglob("*"):
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def atomic_write(path: str | os.PathLike, data: bytes | Callable[[BinaryIO], Any]) -> None:
    """Write ``data`` (bytes, or a function that writes into the open file) to a temporary file beside
    ``path``, fsync, then ``os.replace``: readers (and a run killed half-way) see the old file or the
    new one, never half of one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_yaml(path: str | os.PathLike, what: str = "config") -> Any:
    """A YAML file's content; a syntax error names the file, line and column (yaml's own message,
    read from the file, and not from a string, whose marks name ``"<unicode string>"``)."""
    import yaml

    with open(path, encoding="utf-8") as f:
        try:
            return yaml.safe_load(f)
        except yaml.YAMLError as error:
            raise ValueError(f"{what} {path} is not valid YAML: {error}") from None


def read_run_config(path: str | os.PathLike) -> dict:
    """A run's ``config.yaml`` (:func:`read_yaml`), refused by name unless it holds a mapping of options."""
    config = read_yaml(path)
    if not isinstance(config, dict):
        raise ValueError(f"config {path} holds no mapping of options (a run's config.yaml does)")
    return config


def read_torch_file(path: str | os.PathLike, what: str, **load_kwargs):
    """``torch.load(path, map_location="cpu", **load_kwargs)``, refusing a file torch cannot read (a
    truncated or corrupted copy, a file of another format) with an error that names ``what`` and the
    file instead of torch's own, which names neither. ``mmap=True`` falls back to a plain read for a
    file in torch's legacy (non-zip) format, which cannot be memory-mapped."""
    import pickle

    import torch

    try:
        return torch.load(path, map_location="cpu", **load_kwargs)
    except (RuntimeError, pickle.UnpicklingError, EOFError, ValueError, UnicodeDecodeError) as error:
        text = str(error).strip()
        if load_kwargs.get("mmap") and "mmap can only be used" in text:
            return read_torch_file(path, what, **{**load_kwargs, "mmap": False})
        if "Unsupported global" in text:  # an intact file holding more than tensors (weights_only's refusal)
            why = next(line.strip().split(". ")[0] for line in text.splitlines() if "Unsupported global" in line)
            raise ValueError(f"{what} {os.fspath(path)} holds objects other than tensors, which torch.load("
                             f"weights_only=True) does not unpickle ({why[:300]}); if you trust the file, save its "
                             "tensors alone (torch.save(torch.load(path, weights_only=False)[key], new_path)) and "
                             "point to that") from error
        first = text.splitlines()[0].split(". ")[0] if text else ""  # torch's first sentence
        reason = f"{type(error).__name__}: {first[:200]}" if first else type(error).__name__
        raise ValueError(f"{what} {os.fspath(path)} cannot be read by torch.load ({reason}): a truncated or "
                         "corrupted copy, or not a file that torch.save wrote") from error


def read_tensor_file(path: str | os.PathLike, what: str, **load_kwargs):
    """A ``.safetensors`` file's tensors (on the CPU), else :func:`read_torch_file`; either way a file
    that cannot be read is refused naming ``what`` and the file."""
    if not os.fspath(path).endswith(".safetensors"):
        return read_torch_file(path, what, **load_kwargs)
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(os.fspath(path), device="cpu")
    except SafetensorError as error:
        raise ValueError(f"{what} {os.fspath(path)} cannot be read as safetensors ({error}): a truncated or "
                         "corrupted copy, or not a safetensors file") from error


def read_checkpoint(path: str | os.PathLike, mmap: bool = False) -> dict:
    """A Lightning checkpoint file (a dict with a ``state_dict``), or an error naming the file. A
    DeepSpeed checkpoint folder is read through :func:`read_deepspeed_checkpoint`."""
    if Path(path).is_dir():
        return read_deepspeed_checkpoint(path)
    checkpoint = read_torch_file(path, "checkpoint", weights_only=False, mmap=mmap)
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        found = (f"keys {sorted(map(str, checkpoint))[:8]}" if isinstance(checkpoint, dict)
                 else type(checkpoint).__name__)
        raise ValueError(f"checkpoint {os.fspath(path)} is not a Lightning checkpoint (no 'state_dict'; it holds "
                         f"{found}): pass a run's last.ckpt or another checkpoint that training saved")
    return checkpoint


def read_deepspeed_checkpoint(path: str | os.PathLike) -> dict:
    """A DeepSpeed checkpoint folder (what ``trainer.strategy deepspeed_stage_2`` saves as ``last.ckpt/``)
    as a Lightning checkpoint dict: Lightning's ``convert_zero_checkpoint_to_fp32_state_dict`` gathers the
    fp32 master weights from the ZeRO shards and keeps the checkpoint's own entries (``mpq_identity``,
    ``mpq_frozen_params``, ...). Needs DeepSpeed installed; without it the error says how to convert the
    folder where it is."""
    import contextlib
    import io
    import tempfile

    folder = Path(path)
    _deepspeed_model_states(folder)  # a DeepSpeed folder at all, fully written
    if importlib.util.find_spec("deepspeed") is None:
        raise ValueError(
            f"checkpoint {os.fspath(path)} is a DeepSpeed checkpoint folder, and reading it needs DeepSpeed "
            "(pip install -e \".[deepspeed]\"); or convert it once where DeepSpeed is installed: python -c \"from "
            "lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict as c; "
            f"c('{os.fspath(path)}', '{os.fspath(path).rstrip('/')}.fp32')\" and pass that file")
    from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict

    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):
        return convert_zero_checkpoint_to_fp32_state_dict(folder, Path(tmp) / "fp32.ckpt")


def _deepspeed_model_states(folder: Path) -> Path:
    """The model-states file of DeepSpeed checkpoint folder ``folder`` (its ``latest`` tag's), or an
    error naming the folder."""
    latest = folder / "latest"
    if not latest.is_file():
        raise ValueError(f"checkpoint {folder} is a folder but not a DeepSpeed checkpoint (no 'latest' file "
                         "in it): pass a checkpoint file, or the folder DeepSpeed saved")
    tag = latest.read_text().strip()
    files = sorted((folder / tag).glob("*model_states.pt"))
    if not files:
        raise ValueError(f"checkpoint {folder}: no *model_states.pt in {folder / tag} (a DeepSpeed "
                         "checkpoint folder that was not fully written)")
    return files[0]


def read_deepspeed_client_state(path: str | os.PathLike) -> dict:
    """The entries of a DeepSpeed checkpoint folder that are not DeepSpeed's own (``mpq_identity``, the data
    module's position, ...), read from its model-states file without gathering the ZeRO shards and
    without DeepSpeed: enough to judge a resume before anything is built."""
    state = read_torch_file(_deepspeed_model_states(Path(path)), "checkpoint", weights_only=False, mmap=True)
    own = ("module", "optimizer", "lr_scheduler", "buffer_names", "param_shapes", "frozen_param_shapes",
           "frozen_param_fragments", "shared_params", "ds_config", "ds_version")
    return {k: v for k, v in state.items() if k not in own}


class RunLock:
    """An exclusive, non-blocking ``flock`` on ``<run>/.lock``, held by the one process that trains into
    the run folder (global rank 0): a second ``train.py`` on the same run (the same command started
    twice, a requeued job while the first still runs) is refused before it writes or deletes anything,
    instead of both saving into one folder. The kernel drops the lock when the holder exits, however
    it exits, so a crash leaves no stale lock (only the file, which the next holder takes over). A
    release deletes the file while still holding the lock (and a folder the lock created, if that is
    all it holds); whoever locked the deleted file meanwhile sees that the path no longer names it and
    tries again, so two holders never coexist. ``flock`` on NFS is emulated with byte-range locks,
    which Linux clients (NFSv4) share across machines; a file system without locks gets a warning."""

    NAME = ".lock"

    def __init__(self, run: str | os.PathLike) -> None:
        self.run = Path(run)
        self._fd: int | None = None
        self._made_folder = False

    def acquire(self) -> None:
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock
            return
        import socket
        import time
        import warnings

        self._made_folder = not self.run.exists()
        self.run.mkdir(parents=True, exist_ok=True)
        path = self.run / self.NAME
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 4096).decode(errors="replace").strip() or "another process"
                os.close(fd)
                raise FileExistsError(f"run folder {self.run} is being trained by {holder} (it holds {path}): wait "
                                      "for it to finish, stop it, or choose another --run_name") from None
            except OSError as error:  # a file system without locks (NFS mounted with nolock: ENOLCK)
                os.close(fd)
                warnings.warn(f"could not lock {path} ({error}): a second train.py on this run would not be refused",
                              stacklevel=2)
                return
            try:
                if os.path.samestat(os.fstat(fd), os.stat(path)):
                    break
            except FileNotFoundError:
                pass
            os.close(fd)  # locked a file its holder deleted on release: lock the one the path names now
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            (self.run / self.NAME).unlink(missing_ok=True)  # still locked: see the class's note
            if self._made_folder and not any(self.run.iterdir()):
                self.run.rmdir()  # a fit that failed before writing anything leaves no folder
        except FileNotFoundError:  # the folder was deleted meanwhile
            pass
        finally:
            os.close(self._fd)
            self._fd = None
