"""Sample-quality metrics for the digits benchmarks, with feature networks we train ourselves.

Feature networks (trained by ``benchmarks/train_feature_nets.py`` on the real train split of
:mod:`mpq_lightning.data.digits`, shipped in ``mpq_lightning/assets/``):

* :class:`ImageClassifier` — a small CNN on Digits images ``[N, 1, 16, 16]`` → 10 digit logits.
* :class:`VideoClassifier` — a (2+1)D CNN on Moving-Digits videos ``[N, 1, 8, 16, 16]`` → 10 digit logits
  and 8 motion-direction logits (direction of the initial velocity, ``digits.DIRECTIONS``).
* :class:`ImageFeatureNet`, :class:`VideoFeatureNet` — the frozen classifiers' penultimate layer (64-d, before
  the ReLU) as torchmetrics feature extractors: ``FrechetInceptionDistance(feature=ImageFeatureNet(),
  normalize=True)`` (and the same with ``VideoFeatureNet()``: torchmetrics' FID only calls the module and
  counts ``imgs.shape[0]``, so video tensors work unchanged).

**Input contract of every network here: float tensors in [0, 1]** (torchmetrics' ``normalize=True``
convention; with a custom feature module torchmetrics passes the tensor as it is, it does not convert to
uint8). uint8 input is accepted and divided by 255. Images may also be ``[N, 3, H, W]`` (averaged to grey)
or another size (bilinearly resized to 16×16). Videos are channels-first ``[N, C, F, H, W]`` (the
``Denoiser`` layout) with C = 1 (or 3, averaged) and exactly 8×16×16.

**Helpers** take samples in ``value_range`` (default (-1, 1): the data / diffusion range of the digits
datasets) and map them to [0, 1] (clamped) themselves: :func:`class_consistency`, :func:`frechet_distance`,
:func:`psnr_ssim`, :func:`temporal_consistency`, :func:`frame_difference`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ASSETS_DIR",
    "ImageClassifier",
    "ImageFeatureNet",
    "VideoClassifier",
    "VideoFeatureNet",
    "class_consistency",
    "frame_difference",
    "frechet_distance",
    "load_image_classifier",
    "load_video_classifier",
    "psnr_ssim",
    "temporal_consistency",
]

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
IMAGE_SIZE = 16
VIDEO_SHAPE = (8, 16, 16)  # frames, height, width


# -------------------------------------------------------------------------------------------------
# Input handling
# -------------------------------------------------------------------------------------------------


def _unit_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 → /255; anything else → float (assumed already in [0, 1])."""
    if x.dtype == torch.uint8:
        return x.float() / 255.0
    return x.float()


def _prep_image(x: torch.Tensor) -> torch.Tensor:
    """[N, C, H, W] in [0, 1] (or uint8) → [N, 1, 16, 16] in [-1, 1]."""
    if x.dim() != 4:
        raise ValueError(f"images must be [N, C, H, W]; got shape {tuple(x.shape)}")
    x = _unit_float(x)
    if x.shape[1] != 1:
        x = x.mean(dim=1, keepdim=True)
    if x.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
        x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    return x * 2 - 1


def _prep_video(x: torch.Tensor) -> torch.Tensor:
    """[N, C, F, H, W] in [0, 1] (or uint8) → [N, 1, 8, 16, 16] in [-1, 1]."""
    if x.dim() != 5 or tuple(x.shape[2:]) != VIDEO_SHAPE:
        raise ValueError(f"videos must be [N, C, {', '.join(map(str, VIDEO_SHAPE))}]; got shape {tuple(x.shape)}")
    x = _unit_float(x)
    if x.shape[1] != 1:
        x = x.mean(dim=1, keepdim=True)
    return x * 2 - 1


def _to_unit(x: torch.Tensor, value_range: tuple[float, float]) -> torch.Tensor:
    lo, hi = value_range
    return ((x.float() - lo) / (hi - lo)).clamp(0, 1)


# -------------------------------------------------------------------------------------------------
# Classifiers
# -------------------------------------------------------------------------------------------------


class ImageClassifier(nn.Module):
    """conv32-conv32-pool-conv64-conv64-pool-fc(features)-ReLU-fc(10) on [N, 1, 16, 16] in [0, 1]."""

    def __init__(self, width: int = 32, num_features: int = 64, num_classes: int = 10) -> None:
        super().__init__()
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(1, w, 3, padding=1), nn.ReLU(),
            nn.Conv2d(w, w, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),  # 8x8
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),  # 4x4
            nn.Flatten(),
        )  # fmt: skip
        self.fc = nn.Linear(2 * w * 16, num_features)
        self.head = nn.Linear(num_features, num_classes)
        self.config = {"width": width, "num_features": num_features, "num_classes": num_classes}

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """[N, num_features] (pre-activation penultimate layer)."""
        return self.fc(self.body(_prep_image(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Digit logits [N, num_classes]."""
        return self.head(F.relu(self.features(x)))


class VideoClassifier(nn.Module):
    """(2+1)D CNN on [N, 1, 8, 16, 16] in [0, 1]: digit (10) and motion-direction (8) heads on shared features.

    Convs are Conv3d → GroupNorm(8) → ReLU, spatial (1, 3, 3) or temporal (3, 1, 1):
    2 spatial @16×16 → pool (1, 2, 2) → spatial + temporal @8×8 → pool (1, 2, 2) → spatial + temporal @4×4,
    then [global max over (F, H, W) ‖ average-pooled (2, 2, 2) grid, flattened] → fc → features.
    """

    def __init__(self, width: int = 32, num_features: int = 64, num_classes: int = 10, num_directions: int = 8) -> None:
        super().__init__()
        w = width

        def conv(cin: int, cout: int, temporal: bool) -> list[nn.Module]:
            k, p = ((3, 1, 1), (1, 0, 0)) if temporal else ((1, 3, 3), (0, 1, 1))
            return [nn.Conv3d(cin, cout, k, padding=p), nn.GroupNorm(8, cout), nn.ReLU()]

        self.body = nn.Sequential(
            *conv(1, w, False), *conv(w, w, False), nn.MaxPool3d((1, 2, 2)),  # [w, 8, 8, 8]
            *conv(w, 2 * w, False), *conv(2 * w, 2 * w, True), nn.MaxPool3d((1, 2, 2)),  # [2w, 8, 4, 4]
            *conv(2 * w, 2 * w, False), *conv(2 * w, 2 * w, True),
        )  # fmt: skip
        self.fc = nn.Linear(2 * w + 2 * w * 8, num_features)
        self.digit_head = nn.Linear(num_features, num_classes)
        self.direction_head = nn.Linear(num_features, num_directions)
        self.config = {"width": width, "num_features": num_features, "num_classes": num_classes,
                       "num_directions": num_directions}  # fmt: skip

    def _pooled(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body(_prep_video(x))
        return torch.cat([h.amax(dim=(2, 3, 4)), F.adaptive_avg_pool3d(h, (2, 2, 2)).flatten(1)], dim=1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """[N, num_features] (pre-activation penultimate layer)."""
        return self.fc(self._pooled(x))

    def logits(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """{"digit": [N, 10], "direction": [N, 8]}."""
        h = F.relu(self.features(x))
        return {"digit": self.digit_head(h), "direction": self.direction_head(h)}

    def forward(self, x: torch.Tensor, head: str = "digit") -> torch.Tensor:
        """Logits of ``head`` ("digit" or "direction")."""
        h = F.relu(self.features(x))
        if head == "digit":
            return self.digit_head(h)
        if head == "direction":
            return self.direction_head(h)
        raise ValueError(f"head must be 'digit' or 'direction'; got {head!r}")


# -------------------------------------------------------------------------------------------------
# Shipped weights
# -------------------------------------------------------------------------------------------------


def _load(cls: type[nn.Module], stem: str, assets_dir: str | Path | None) -> tuple[nn.Module, dict[str, Any]]:
    from safetensors.torch import load_file

    assets = Path(assets_dir) if assets_dir is not None else ASSETS_DIR
    meta_path, weights = assets / f"{stem}.json", assets / f"{stem}.safetensors"
    if not meta_path.is_file() or not weights.is_file():
        raise FileNotFoundError(
            f"{weights} / {meta_path} missing: run `python benchmarks/train_feature_nets.py` "
            "or reinstall the package with its assets"
        )
    meta = json.loads(meta_path.read_text())
    model = cls(**meta["model_config"])
    model.load_state_dict(load_file(str(weights)), strict=True)
    model.eval().requires_grad_(False)
    return model, meta


def load_image_classifier(assets_dir: str | Path | None = None, with_meta: bool = False):
    """The shipped :class:`ImageClassifier` (eval, frozen); ``with_meta`` also returns its JSON dict."""
    model, meta = _load(ImageClassifier, "image_classifier", assets_dir)
    return (model, meta) if with_meta else model


def load_video_classifier(assets_dir: str | Path | None = None, with_meta: bool = False):
    """The shipped :class:`VideoClassifier` (eval, frozen); ``with_meta`` also returns its JSON dict."""
    model, meta = _load(VideoClassifier, "video_classifier", assets_dir)
    return (model, meta) if with_meta else model


# -------------------------------------------------------------------------------------------------
# torchmetrics feature extractors
# -------------------------------------------------------------------------------------------------


class _FrozenFeatures(nn.Module):
    """A classifier's ``features`` as a frozen module that stays in eval mode (like torchmetrics' Inception)."""

    def __init__(self, classifier: nn.Module) -> None:
        super().__init__()
        self.classifier = classifier.eval().requires_grad_(False)
        #: read by torchmetrics' FID to size its states without a dummy forward
        self.num_features = int(classifier.config["num_features"])

    def train(self, mode: bool = True) -> _FrozenFeatures:  # noqa: ARG002 - always eval
        return super().train(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier.features(x)


class ImageFeatureNet(_FrozenFeatures):
    """[N, C, H, W] images in [0, 1] (float; uint8 / 255 also accepted) → [N, 64] features of the shipped
    (or given) :class:`ImageClassifier`. Use with ``FrechetInceptionDistance(feature=ImageFeatureNet(),
    normalize=True)`` and float inputs in [0, 1]."""

    def __init__(self, classifier: ImageClassifier | None = None) -> None:
        super().__init__(classifier if classifier is not None else load_image_classifier())


class VideoFeatureNet(_FrozenFeatures):
    """[N, C, 8, 16, 16] videos in [0, 1] → [N, 64] features of the shipped (or given) :class:`VideoClassifier`.
    Works as ``FrechetInceptionDistance(feature=VideoFeatureNet(), normalize=True)`` (a Fréchet video
    distance with our own video network)."""

    def __init__(self, classifier: VideoClassifier | None = None) -> None:
        super().__init__(classifier if classifier is not None else load_video_classifier())


# -------------------------------------------------------------------------------------------------
# Helpers
# -------------------------------------------------------------------------------------------------


def _batches(x: torch.Tensor, batch_size: int):
    for i in range(0, x.shape[0], batch_size):
        yield x[i : i + batch_size]


#: every metric here is computed by the calling process alone: FinalReport runs them on rank zero
#: while the other ranks wait, so torchmetrics' default gather across the process group at compute
#: would wait for ranks that never come (a 2-process DDP fit of the default config crashed there)
LOCAL = {"sync_on_compute": False, "dist_sync_on_step": False}


@torch.no_grad()
def class_consistency(
    samples: torch.Tensor,
    labels: torch.Tensor,
    classifier: nn.Module,
    value_range: tuple[float, float] = (-1.0, 1.0),
    batch_size: int = 512,
    **classifier_kwargs: Any,
) -> float:
    """Fraction of ``samples`` (in ``value_range``) that ``classifier`` assigns to their conditioning ``labels``.

    ``classifier`` takes [0, 1] inputs and returns logits (e.g. :class:`ImageClassifier`, or
    :class:`VideoClassifier` with ``head="direction"`` passed through ``classifier_kwargs``).
    """
    labels = torch.as_tensor(labels).reshape(-1)
    if labels.shape[0] != samples.shape[0]:
        raise ValueError(f"{samples.shape[0]} samples but {labels.shape[0]} labels")
    preds = torch.cat(
        [classifier(_to_unit(b, value_range), **classifier_kwargs).argmax(-1).cpu() for b in _batches(samples, batch_size)]
    )
    return float((preds == labels.cpu()).float().mean())


@torch.no_grad()
def frechet_distance(
    real: torch.Tensor,
    fake: torch.Tensor,
    feature_net: nn.Module,
    value_range: tuple[float, float] = (-1.0, 1.0),
    batch_size: int = 512,
) -> float:
    """Fréchet distance between ``real`` and ``fake`` (both in ``value_range``) in the features of
    ``feature_net`` (:class:`ImageFeatureNet` for images, :class:`VideoFeatureNet` for videos), computed with
    torchmetrics' ``FrechetInceptionDistance(feature=feature_net, normalize=True)``. Needs ≥ 2 samples each."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    fid = FrechetInceptionDistance(feature=feature_net, normalize=True, **LOCAL)
    fid = fid.to(real.device)
    for b in _batches(real, batch_size):
        fid.update(_to_unit(b, value_range), real=True)
    for b in _batches(fake, batch_size):
        fid.update(_to_unit(b, value_range), real=False)
    return float(fid.compute())


def _frames(x: torch.Tensor) -> torch.Tensor:
    """[N, C, F, H, W] → [N·F, C, H, W]; images pass through."""
    if x.dim() == 5:
        return x.transpose(1, 2).reshape(-1, x.shape[1], *x.shape[-2:])
    if x.dim() == 4:
        return x
    raise ValueError(f"expected [N, C, H, W] images or [N, C, F, H, W] videos; got shape {tuple(x.shape)}")


@torch.no_grad()
def psnr_ssim(
    student: torch.Tensor, teacher: torch.Tensor, value_range: tuple[float, float] = (-1.0, 1.0)
) -> dict[str, float]:
    """Mean per-image (per-frame for videos [N, C, F, H, W]) PSNR (dB) and SSIM of ``student`` against
    ``teacher``, both mapped from ``value_range`` to [0, 1] (``data_range=1``), with torchmetrics'
    ``PeakSignalNoiseRatio`` and ``StructuralSimilarityIndexMeasure`` (Gaussian 11×11, σ 1.5).
    Identical inputs give PSNR = inf and SSIM = 1."""
    from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

    if student.shape != teacher.shape:
        raise ValueError(f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} differ in shape")
    s, t = _frames(_to_unit(student, value_range)), _frames(_to_unit(teacher, value_range))
    psnr = PeakSignalNoiseRatio(data_range=1.0, reduction="elementwise_mean", dim=(1, 2, 3), **LOCAL)
    ssim = StructuralSimilarityIndexMeasure(data_range=1.0, **LOCAL)
    return {"psnr": float(psnr(s, t)), "ssim": float(ssim(s, t))}


@torch.no_grad()
def temporal_consistency(
    video: torch.Tensor,
    feature_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    value_range: tuple[float, float] = (-1.0, 1.0),
) -> float:
    """Mean cosine similarity of consecutive frames' features over all videos [N, C, F, H, W] (in
    ``value_range``); higher = smoother. ``feature_fn`` maps frames [M, C, H, W] in [0, 1] to [M, d]; the
    default is the frames' pixels (flattened, mean-free per frame, so a black canvas does not count as
    similar). Warping-free: a moving digit lowers it too, so compare against the real-data reference stored
    in ``video_classifier.json`` (``reference.temporal_consistency``) rather than against 1."""
    if video.dim() != 5:
        raise ValueError(f"video must be [N, C, F, H, W]; got shape {tuple(video.shape)}")
    n, _, f = video.shape[:3]
    frames = _frames(_to_unit(video, value_range))
    if feature_fn is None:
        feats = frames.reshape(frames.shape[0], -1)
        feats = feats - feats.mean(dim=1, keepdim=True)
    else:
        feats = feature_fn(frames).reshape(frames.shape[0], -1)
    feats = feats.reshape(n, f, -1).float()
    sim = F.cosine_similarity(feats[:, 1:], feats[:, :-1], dim=-1, eps=1e-8)
    return float(sim.mean())


@torch.no_grad()
def frame_difference(video: torch.Tensor, value_range: tuple[float, float] = (-1.0, 1.0)) -> float:
    """Mean absolute difference of consecutive frames (in [0, 1] units) — a flicker statistic; compare with
    the real-data reference (``reference.frame_difference`` in ``video_classifier.json``)."""
    if video.dim() != 5:
        raise ValueError(f"video must be [N, C, F, H, W]; got shape {tuple(video.shape)}")
    v = _to_unit(video, value_range)
    return float((v[:, :, 1:] - v[:, :, :-1]).abs().mean())
