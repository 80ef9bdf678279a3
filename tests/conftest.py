"""Shared tiny fixtures."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch


def _random_cond(denoiser, batch: int, seed: int = 0, length: int = 6) -> dict[str, torch.Tensor]:
    """Random cond tensors matching `denoiser.cond_spec` (free lengths become `length`)."""
    from mpq_lightning.models import random_cond

    return random_cond(denoiser, batch, seed, length=length, num_classes=3)


@pytest.fixture(scope="module")
def stdit_denoiser():
    """tiny-stdit in eval mode; the zero-initialised outputs (official init) are re-drawn so that
    predictions depend on x, t and the caption."""
    from mpq_lightning.models import build

    torch.manual_seed(0)
    denoiser = build("tiny-stdit").eval()
    with torch.no_grad():
        for param in denoiser.parameters():
            if not param.any():
                param.normal_(std=0.1)
    return denoiser


@pytest.fixture
def random_cond() -> Callable[..., dict[str, torch.Tensor]]:
    """`random_cond(denoiser, batch, seed=0)`: random conditioning that passes the denoiser's checks."""
    return _random_cond
