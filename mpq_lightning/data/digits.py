"""Hub-free benchmark data: scikit-learn's bundled handwritten digits as images and as bouncing-digit videos.

Source: ``sklearn.datasets.load_digits`` (UCI optical recognition of handwritten digits: 1797 real 8×8
digits, 4-bit intensities 0..16, 10 classes; bundled with scikit-learn, nothing is downloaded).

Splits are fixed by sample index (no shuffling): the first 1438 of the 1797 indices (0..1437) are
``"train"``, the last 359 (1438..1796, round(20 % · 1797)) are ``"heldout"`` — a contiguous block in
scikit-learn's order, not a random subset (classes stay balanced: 33..37 per class held out).
A Moving-Digits video of a split only ever shows digits of that split.

* :class:`DigitsDataset` — class-conditional images ``[1, 16, 16]`` in [-1, 1]: the 8×8 digit scaled to
  [0, 1] (``/16``), bilinearly upsampled to 16×16 (``align_corners=False``, no antialias), then ``2x − 1``.
* :class:`MovingDigitsDataset` — videos ``[1, F, S, S]`` in [-1, 1] (default F = 8 frames, S = 16 canvas):
  the native 8×8 digit (intensity/16 → [0, 1]) pasted on a black canvas at an integer position that moves
  by an integer velocity each frame and reflects at the walls (see :func:`bounce_positions`). Per video a
  generator seeded with ``(seed, index)`` draws the digit (uniformly from the split), the velocity
  ``v = speed · d`` with ``d`` one of the 8 compass directions (each axis −1/0/+1, not both 0) and speed
  1 or 2 px/frame, and the start position, uniform among the positions from which the first step is not
  reflected (so the first displacement equals ``v`` and the direction label is visible in the video).
  Labels: ``label`` = digit class, ``direction`` = index of ``d`` in :data:`DIRECTIONS`.

Items are dicts ``{"x": FloatTensor, "label": LongTensor[], ("direction", "position", "velocity",
"digit_index")}``; content is a pure function of (split, seed, index).

:func:`load_digits_teacher` loads the FP teachers trained by ``benchmarks/train_teachers.py`` from the
package assets (``"unet"`` = ``digits-unet``, ``"stdit"`` = ``moving-digits-stdit``).
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

__all__ = [
    "ASSETS_DIR",
    "DIRECTIONS",
    "HELDOUT_FRACTION",
    "NUM_CLASSES",
    "NUM_DIGITS",
    "NUM_TRAIN",
    "DigitsDataset",
    "MovingDigitsDataset",
    "bounce_positions",
    "digit_arrays",
    "direction_index",
    "load_digits_teacher",
    "split_indices",
    "stdit_class_cond",
    "to_unit",
    "upsample_digits",
]

#: Total number of digits in scikit-learn's bundled set.
NUM_DIGITS = 1797
#: Fraction of indices (the last ones) held out.
HELDOUT_FRACTION = 0.2
#: Indices 0..NUM_TRAIN-1 are "train", NUM_TRAIN..1796 "heldout".
NUM_TRAIN = NUM_DIGITS - int(round(HELDOUT_FRACTION * NUM_DIGITS))  # 1438
NUM_CLASSES = 10

#: The 8 motion directions (dx, dy) in image coordinates (x right, y down), counter-clockwise from east
#: as seen on screen. Index = the ``direction`` label.
DIRECTIONS: tuple[tuple[int, int], ...] = ((1, 0), (1, -1), (0, -1), (-1, -1), (-1, 0), (-1, 1), (0, 1), (1, 1))
DIRECTION_NAMES = ("right", "up-right", "up", "up-left", "left", "down-left", "down", "down-right")
SPEEDS = (1, 2)

ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets"


# -------------------------------------------------------------------------------------------------
# Raw data and splits
# -------------------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _raw() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = bunch.images.astype(np.float32) / 16.0  # [1797, 8, 8] in [0, 1]
    labels = bunch.target.astype(np.int64)
    if images.shape != (NUM_DIGITS, 8, 8):
        raise RuntimeError(f"unexpected sklearn digits shape {images.shape}")
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def split_indices(split: str) -> np.ndarray:
    """Sample indices of ``"train"`` (0..1437) or ``"heldout"`` (1438..1796); ``"all"`` = 0..1796."""
    if split == "train":
        return np.arange(0, NUM_TRAIN)
    if split in ("heldout", "test", "val"):
        return np.arange(NUM_TRAIN, NUM_DIGITS)
    if split == "all":
        return np.arange(NUM_DIGITS)
    raise ValueError(f"split must be 'train', 'heldout' or 'all'; got {split!r}")


def digit_arrays(split: str = "all") -> tuple[torch.Tensor, torch.Tensor]:
    """(images [N, 8, 8] float in [0, 1], labels [N] long) of a split, in index order."""
    images, labels = _raw()
    idx = split_indices(split)
    return torch.from_numpy(images[idx].copy()), torch.from_numpy(labels[idx].copy())


def upsample_digits(images: torch.Tensor, size: int = 16) -> torch.Tensor:
    """[N, 8, 8] (or [N, 1, 8, 8]) in [0, 1] → [N, 1, size, size] in [0, 1], bilinear, align_corners=False."""
    if images.dim() == 3:
        images = images[:, None]
    if images.shape[-1] == size:
        return images.clone()
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)


def to_unit(x: torch.Tensor, value_range: tuple[float, float] = (-1.0, 1.0)) -> torch.Tensor:
    """Map ``x`` from ``value_range`` to [0, 1] (clamped)."""
    lo, hi = value_range
    return ((x.float() - lo) / (hi - lo)).clamp(0, 1)


# -------------------------------------------------------------------------------------------------
# Digits images
# -------------------------------------------------------------------------------------------------


class DigitsDataset(Dataset):
    """Class-conditional digit images ``{"x": [1, size, size] in [-1, 1], "label": long}`` of one split.

    Deterministic (no randomness at all); ``len`` = 1438 for "train", 359 for "heldout".
    """

    def __init__(self, split: str = "train", size: int = 16) -> None:
        images, labels = digit_arrays(split)
        self.split, self.size = split, size
        self.images = upsample_digits(images, size) * 2 - 1  # [N, 1, size, size]
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.images[i], "label": self.labels[i]}

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All (images [N, 1, size, size] in [-1, 1], labels [N])."""
        return self.images, self.labels


# -------------------------------------------------------------------------------------------------
# Moving digits
# -------------------------------------------------------------------------------------------------


def direction_index(velocity: tuple[int, int]) -> int:
    """Index in :data:`DIRECTIONS` of the sign pattern of ``velocity`` = (vx, vy)."""
    key = (int(np.sign(velocity[0])), int(np.sign(velocity[1])))
    if key == (0, 0):
        raise ValueError("velocity (0, 0) has no direction")
    return DIRECTIONS.index(key)


def bounce_positions(start: tuple[int, int], velocity: tuple[int, int], frames: int, limit: int) -> np.ndarray:
    """Integer top-left positions [frames, 2] (x, y) of a point moving by ``velocity`` per frame in
    [0, limit] on each axis, reflecting at the walls: p' = p + v; if p' > limit: p' = 2·limit − p', v = −v;
    if p' < 0: p' = −p', v = −v. Needs |v| ≤ limit per axis."""
    pos = np.array(start, dtype=np.int64)
    vel = np.array(velocity, dtype=np.int64)
    if np.any(np.abs(vel) > limit) or np.any(pos < 0) or np.any(pos > limit):
        raise ValueError(f"start {start} / velocity {velocity} incompatible with limit {limit}")
    out = np.empty((frames, 2), dtype=np.int64)
    for f in range(frames):
        out[f] = pos
        pos = pos + vel
        for a in range(2):
            if pos[a] > limit:
                pos[a], vel[a] = 2 * limit - pos[a], -vel[a]
            elif pos[a] < 0:
                pos[a], vel[a] = -pos[a], -vel[a]
    return out


def render_video(digit: torch.Tensor, positions: np.ndarray, canvas: int) -> torch.Tensor:
    """Paste ``digit`` [h, w] (values in [0, 1]) at each (x, y) of ``positions`` → [1, F, canvas, canvas] in [0, 1]."""
    h, w = digit.shape
    video = torch.zeros(1, len(positions), canvas, canvas)
    for f, (x, y) in enumerate(positions):
        video[0, f, y : y + h, x : x + w] = digit
    return video


class MovingDigitsDataset(Dataset):
    """Bouncing-digit videos ``{"x": [1, frames, canvas, canvas] in [-1, 1], "label", "direction", ...}``.

    ``num_videos`` videos (default: as many as the split has digits; each video's digit is drawn
    uniformly, with replacement, from the split); video ``i`` is drawn by
    ``np.random.default_rng([seed, i])``, so any index can be read alone and the content depends only on
    (split, seed, i, frames, canvas). Use another ``seed`` for fresh videos of the same digits.
    """

    def __init__(
        self,
        split: str = "train",
        num_videos: int | None = None,
        frames: int = 8,
        canvas: int = 16,
        seed: int = 0,
    ) -> None:
        images, labels = digit_arrays(split)
        self.digit_size = images.shape[-1]
        if canvas < self.digit_size + 2:
            raise ValueError(f"canvas {canvas} must be at least digit size + 2 = {self.digit_size + 2}")
        self.split, self.frames, self.canvas, self.seed = split, frames, canvas, seed
        self.images, self.labels = images, labels
        self.indices = split_indices(split)
        self.num_videos = len(labels) if num_videos is None else int(num_videos)
        self.limit = canvas - self.digit_size  # top-left coordinate range [0, limit]

    def __len__(self) -> int:
        return self.num_videos

    def params(self, i: int) -> dict[str, Any]:
        """The random draws of video ``i``: local digit index, velocity (vx, vy), start (x, y), direction."""
        if not 0 <= i < self.num_videos:
            raise IndexError(i)
        rng = np.random.default_rng([self.seed, i])
        k = int(rng.integers(len(self.labels)))
        d = int(rng.integers(len(DIRECTIONS)))
        speed = int(rng.choice(SPEEDS))
        vel = (DIRECTIONS[d][0] * speed, DIRECTIONS[d][1] * speed)
        # first step stays off the walls: p0 + v in [0, limit] without reflection
        start = tuple(int(rng.integers(max(0, -v), self.limit - max(0, v) + 1)) for v in vel)
        return {"k": k, "velocity": vel, "start": start, "direction": d}

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        p = self.params(i)
        positions = bounce_positions(p["start"], p["velocity"], self.frames, self.limit)
        video = render_video(self.images[p["k"]], positions, self.canvas) * 2 - 1
        return {
            "x": video,
            "label": self.labels[p["k"]].clone(),
            "direction": torch.tensor(p["direction"]),
            "position": torch.from_numpy(positions),  # [F, 2] top-left (x, y)
            "velocity": torch.tensor(p["velocity"]),  # initial (vx, vy)
            "digit_index": torch.tensor(int(self.indices[p["k"]])),  # index into sklearn's 1797
        }

    def tensors(self) -> dict[str, torch.Tensor]:
        """All items stacked: {"x": [N, 1, F, S, S], "label": [N], "direction": [N], ...}."""
        items = [self[i] for i in range(len(self))]
        return {k: torch.stack([it[k] for it in items]) for k in items[0]}


# -------------------------------------------------------------------------------------------------
# Shipped teachers
# -------------------------------------------------------------------------------------------------

_TEACHERS = {
    "unet": "digits_unet",
    "digits-unet": "digits_unet",
    "stdit": "moving_digits_stdit",
    "moving-digits-stdit": "moving_digits_stdit",
}


def _read_meta(stem: str, assets_dir: Path) -> dict[str, Any]:
    path = assets_dir / f"{stem}.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: train it with `python benchmarks/train_teachers.py --which ...` "
            "or reinstall the package with its assets"
        )
    return json.loads(path.read_text())


def load_digits_teacher(which: str, assets_dir: str | Path | None = None) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The shipped FP teacher ``which`` ("unet" / "digits-unet" or "stdit" / "moving-digits-stdit") in eval
    mode, and its meta dict (the JSON next to the weights: ``model_config``, ``train_config``,
    ``scheduler`` (a Denoiser ``default_scheduler`` dict), ``quality``, ...).

    For the STDiT, ``meta["class_embeddings"]`` [10, L, caption_channels] and ``meta["class_mask"]`` [10, L]
    are the fixed class-caption tables (see :func:`stdit_class_cond`); the null caption for CFG is the
    backbone's own ``y_embedder.y_embedding``. For the UNet the null class is ``meta["null_class"]`` (10).
    """
    from safetensors.torch import load_file

    if which not in _TEACHERS:
        raise ValueError(f"unknown teacher {which!r}; use one of {sorted(_TEACHERS)}")
    assets = Path(assets_dir) if assets_dir is not None else ASSETS_DIR
    stem = _TEACHERS[which]
    meta = _read_meta(stem, assets)
    state = load_file(str(assets / f"{stem}.safetensors"))
    if stem == "digits_unet":
        from diffusers import UNet2DModel

        model = UNet2DModel(**meta["model_config"])
        model.load_state_dict(state, strict=True)
    else:
        from mpq_lightning.models.stdit import STDiT, load_official_checkpoint

        model = STDiT(**meta["model_config"])
        load_official_checkpoint(model, state, strict=True)
        tables = load_file(str(assets / f"{stem}_class_tokens.safetensors"))
        meta["class_embeddings"] = tables["class_embeddings"]
        meta["class_mask"] = tables["class_mask"]
    model.eval().requires_grad_(False)
    return model, meta


def stdit_class_cond(labels: torch.Tensor, meta: dict[str, Any]) -> dict[str, torch.Tensor]:
    """STDiT cond for class ids: {"y": [B, 1, L, C] (the class caption tokens), "mask": [B, L] long}."""
    labels = torch.as_tensor(labels, dtype=torch.long)
    table, mask = meta["class_embeddings"], meta["class_mask"]
    return {"y": table.to(labels.device)[labels][:, None], "mask": mask.to(labels.device)[labels].long()}
