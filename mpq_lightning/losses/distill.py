"""Output-level distillation losses (EfficientDM / MPQ-DM ε-MSE).

Spec: ``mpqdm.md`` §2 item 5 and §3.7 (EfficientDM and MPQ-DM train the quantized student on the
FP teacher's ε prediction along the teacher trajectory with ``sum((ε_q − ε_fp)²)``, i.e. the deprecated
``size_average=False`` = ``reduction='sum'``); ``qvdit.md`` §5.2 (Q-VDiT uses the element mean).
"""

from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from torch import Tensor

__all__ = ["output_mse", "split_learned_sigma"]

# ==================================================================================================
# ε-prediction MSE
# ==================================================================================================


def output_mse(
    student: Tensor,
    teacher: Tensor,
    reduction: Literal["sum", "mean"] = "sum",
    detach_teacher: bool = True,
) -> Tensor:
    """Squared error between the student's and the teacher's model outputs.

    ``reduction='sum'`` is EfficientDM/MPQ-DM's ``F.mse_loss(ε_q, ε_fp, size_average=False)``
    (mpqdm.md §2.5, §6.3: the loss scale grows with batch and resolution and the released learning rates
    were tuned for that); ``reduction='mean'`` is Q-VDiT's element mean (qvdit.md §5.2 step 1).

    Args:
        student: quantized-model output, any shape.
        teacher: FP-model output, same shape as ``student``.
        reduction: ``'sum'`` (EfficientDM / MPQ-DM default) or ``'mean'``.
        detach_teacher: the teacher is a fixed target (default ``True``).

    Returns:
        0-d tensor.
    """
    if student.shape != teacher.shape:
        raise ValueError(
            f"output_mse: student shape {tuple(student.shape)} != teacher shape {tuple(teacher.shape)}"
        )
    if reduction not in ("sum", "mean"):
        raise ValueError(f"output_mse: reduction must be 'sum' or 'mean', got {reduction!r}")
    if detach_teacher:
        teacher = teacher.detach()
    return F.mse_loss(student, teacher.to(student.dtype), reduction=reduction)


# ==================================================================================================
# Learned-σ outputs
# ==================================================================================================


def split_learned_sigma(pred: Tensor, in_channels: int, dim: int = 1) -> Tensor:
    """Return the ε part of a model output that may carry learned-σ channels.

    Models with ``learn_sigma=True`` (DiT, OpenSora STDiT: 4 latent channels → 8 output channels) output
    ``cat([ε, σ_interp], dim)``; LDM-4 outputs ε only. This helper returns the first ``in_channels``
    channels when the output has ``2 · in_channels`` channels and the output unchanged when it has
    ``in_channels``. Note Q-VDiT's TMD and MSE act on the *full* output including σ (qvdit.md §5.2), so do
    not split before calling :func:`mpq_lightning.losses.temporal.tmd_loss` if you reproduce the release.

    Raises:
        ValueError: if ``pred.shape[dim]`` is neither ``in_channels`` nor ``2 · in_channels``.
    """
    if pred.dim() == 0:
        raise ValueError("split_learned_sigma: pred must have at least one dimension, got a 0-d tensor")
    c = pred.shape[dim]
    if c == in_channels:
        return pred
    if c == 2 * in_channels:
        return pred.narrow(dim, 0, in_channels)
    raise ValueError(
        f"split_learned_sigma: pred of shape {tuple(pred.shape)} has {c} channels along dim {dim}; "
        f"expected {in_channels} (ε only) or {2 * in_channels} (ε + learned σ)"
    )
