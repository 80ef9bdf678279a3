"""Backbones behind one `Denoiser` interface, the registry of them by name, and the sampling loop."""

from mpq_lightning.models import diffusers_adapters  # noqa: F401  (registers the diffusers backbones)
from mpq_lightning.models.registry import LAYER_KINDS, CondSpec, Denoiser, STDiTDenoiser, build, list_models, random_cond, register
from mpq_lightning.models.sampling import guide, make_scheduler, sample

__all__ = [
    "LAYER_KINDS",
    "CondSpec",
    "Denoiser",
    "STDiTDenoiser",
    "build",
    "guide",
    "list_models",
    "make_scheduler",
    "random_cond",
    "register",
    "sample",
]
