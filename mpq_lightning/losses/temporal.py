"""Q-VDiT's Temporal Maintenance Distillation (TMD).

Paper (papers_extra.md §2.3, Q-VDiT Sec. 3.3): with ``T_ij = cos(S[frame i], S[frame j])`` and
``D_i = softmax_j(T_ij)`` (no temperature in the paper), ``L_temporal = Σ_i KL(D_i^FP ‖ D_i^Q)`` (Eq. 15),
``L_total = L_task + γ · L_temporal`` with ``γ = 100`` (Eq. 19).

Release (qvdit.md §5.2): the full model output ``[b, c, t, h, w]`` (σ channels included) is reshaped to
``[b, t, c·h·w]``, rows are L2-normalised, ``S = p pᵀ`` (``[t, t]``), softmax with ``τ = 1``, and
``F.kl_div(..., reduction='mean')`` = ``Σ KL / (b·t²)`` is weighted by 100.

Legacy quirk (qvdit.md §5.3): that reshape is done **without** moving ``t`` before ``c``, so "row" ``i`` is the
``i``-th contiguous chunk of the channel-major memory (for c = 8, t = 16: channel ⌊i/2⌋, frames
8·(i mod 2) … 8·(i mod 2)+7), not a frame. ``legacy_reshape=True`` reproduces it; the default
(paper mode) permutes frames first so each row really is one frame.
"""

from __future__ import annotations

import re
from typing import Literal

import torch
from einops import EinopsError, rearrange
from torch import Tensor

from mpq_lightning.losses.relation import _at_least_fp32, _no_autocast

__all__ = ["tmd_loss", "frame_vectors"]

_TMD_REDUCTIONS = ("mean", "batchmean", "frame_mean", "sum")

# ==================================================================================================
# Frame flattening
# ==================================================================================================


def _axis_names(layout: str) -> list[str]:
    names = [t for t in re.split(r"[\s()]+", layout) if t]
    if "..." in names:
        raise ValueError(f"layout {layout!r}: '...' is not supported, name every axis")
    if "b" not in names or "f" not in names:
        raise ValueError(f"layout {layout!r} must name the batch axis 'b' and the frame axis 'f'")
    if len(set(names)) != len(names):
        raise ValueError(f"layout {layout!r} repeats an axis name")
    return names


def frame_vectors(x: Tensor, num_frames: int, layout: str = "b c f h w", legacy_reshape: bool = False) -> Tensor:
    """Flatten a video tensor to per-"frame" vectors ``[b, num_frames, D]``.

    Paper mode: ``rearrange(x, '<layout> -> b f (<other axes>)')`` — row i is frame i.
    Legacy mode: the tensor is laid out as given by ``layout`` with ``b`` first, and reshaped to
    ``[b, num_frames, -1]`` without permuting — the released ``x.reshape(b, t, -1)`` on ``[b, c, t, h, w]``.

    ``layout`` is an einops pattern naming every axis; grouped axes are allowed (e.g. ``'b (f s) c'`` for
    token sequences with ``f=num_frames``).
    """
    names = _axis_names(layout)
    rest = [n for n in names if n not in ("b", "f")]
    if not rest:
        raise ValueError(f"layout {layout!r} has no feature axes besides 'b' and 'f'")
    try:
        if legacy_reshape:
            if names[0] != "b" or layout.lstrip().startswith("("):
                raise ValueError(f"legacy_reshape needs a layout starting with a plain 'b' axis, got {layout!r}")
            flat = rearrange(x, f"{layout} -> b ({' '.join(names[1:])})", f=num_frames)
            return flat.reshape(flat.shape[0], num_frames, -1)
        return rearrange(x, f"{layout} -> b f ({' '.join(rest)})", f=num_frames)
    except EinopsError as e:
        raise ValueError(
            f"tmd: tensor of shape {tuple(x.shape)} does not match layout {layout!r} with f={num_frames}: {e}"
        ) from e


# ==================================================================================================
# TMD loss
# ==================================================================================================


def tmd_loss(
    student_out: Tensor,
    teacher_out: Tensor,
    num_frames: int,
    layout: str = "b c f h w",
    tau: float = 1.0,
    legacy_reshape: bool = False,
    weight: float = 1.0,
    reduction: Literal["mean", "batchmean", "frame_mean", "sum"] = "mean",
    detach_teacher: bool = True,
) -> Tensor:
    """Temporal Maintenance Distillation: KL between FP and quantized frame-to-frame relation distributions.

    ``v_i`` = L2-normalised flattened frame ``i`` (see :func:`frame_vectors`), ``T = v vᵀ`` ``[b, t, t]``,
    ``D_i = softmax(T_i / τ)``, per-row ``KL(D_i^FP ‖ D_i^Q)``.

    Args:
        student_out: quantized-model output (e.g. ``[b, c, f, h, w]``).
        teacher_out: FP output, same shape.
        num_frames: number of frames ``t``.
        layout: einops axis names of the inputs (must contain ``b`` and ``f``).
        tau: softmax temperature (paper: none = 1; release: 1.0).
        legacy_reshape: reproduce the released channel-major reshape (qvdit.md §5.3).
        weight: multiplier (the release / paper use 100 with ``reduction='mean'``).
        reduction: ``'mean'`` — release, ``Σ KL / (b·t²)`` (PyTorch ``kl_div`` mean);
            ``'batchmean'`` — paper Eq. 15, ``Σ_i KL`` per video averaged over the batch (``Σ / b``);
            ``'frame_mean'`` — mean per-frame KL (``Σ / (b·t)``); ``'sum'``.
        detach_teacher: the teacher is a fixed target (default ``True``).

    Returns:
        0-d tensor.
    """
    if student_out.shape != teacher_out.shape:
        raise ValueError(
            f"tmd_loss: student_out shape {tuple(student_out.shape)} != teacher_out shape {tuple(teacher_out.shape)}"
        )
    if num_frames < 1:
        raise ValueError(f"tmd_loss: num_frames must be >= 1, got {num_frames}")
    if reduction not in _TMD_REDUCTIONS:
        raise ValueError(f"tmd_loss: reduction must be one of {_TMD_REDUCTIONS}, got {reduction!r}")
    if tau <= 0:
        raise ValueError(f"tmd_loss: tau must be > 0, got {tau}")
    if detach_teacher:
        teacher_out = teacher_out.detach()
    with _no_autocast(student_out.device):
        vs = _at_least_fp32(frame_vectors(student_out, num_frames, layout, legacy_reshape))
        vt = _at_least_fp32(frame_vectors(teacher_out, num_frames, layout, legacy_reshape))
        vs = torch.nn.functional.normalize(vs, p=2, dim=-1)
        vt = torch.nn.functional.normalize(vt, p=2, dim=-1)
        log_ds = torch.log_softmax(torch.bmm(vs, vs.transpose(1, 2)) / tau, dim=-1)
        log_dt = torch.log_softmax(torch.bmm(vt, vt.transpose(1, 2)) / tau, dim=-1)
        total = (log_dt.exp() * (log_dt - log_ds)).sum()
        b, t = vs.shape[0], vs.shape[1]
        denom = {"mean": b * t * t, "batchmean": b, "frame_mean": b * t, "sum": 1}[reduction]
        return weight * total / denom
