"""File-system helpers shared by the writers of run artefacts."""
from __future__ import annotations

import os
from pathlib import Path


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
