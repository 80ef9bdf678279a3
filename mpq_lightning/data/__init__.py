"""Teacher trajectories: the cache (generation, shards, manifest) and the training streams over them.

Names are imported lazily, so that `python -m mpq_lightning.data.trajectories` runs the module once
(no runpy double-import warning) and generation does not import Lightning.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "CacheError": "trajectories",
    "ShardWriter": "trajectories",
    "TrajectoryCache": "trajectories",
    "TrajectoryRecipe": "trajectories",
    "ensure_cache": "trajectories",
    "synthesize_cache": "trajectories",
    "teacher_fingerprint": "trajectories",
    "OnTheFlyDataModule": "datamodule",
    "TeacherForcedTrajectories": "datamodule",
    "TrajectoryDataModule": "datamodule",
    "TrajectoryDataset": "datamodule",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
