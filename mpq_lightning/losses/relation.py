"""Relation (similarity-map) distillation losses: MPQ-DM's TRD and MPQ-DMv2's MTRD.

* :func:`relation_kl` — the pixel-to-pixel relation KL of MPQ-DM (mpqdm.md §3.8, verified against the
  released ``OurDDIMSampler_trainer.relational_loss``): features are flattened to pixels/tokens, L2-normalised
  per pixel along channels, ``S = P Pᵀ`` per sample (cosine similarities, ``HW × HW``), rows are
  soft-maxed with temperature τ and ``KL(teacher ‖ student) = Σ p_t (log p_t − log p_s)`` is *summed*
  (``F.kl_div(..., size_average=False)``).
* :class:`TimeSmoothedRelationLoss` — TRD: the above, applied to features averaged over a window of
  consecutive sampler steps (window 2, weight 100 in the release).
* :class:`MemoryRelationLoss` — MTRD (MPQ-DMv2): KL between the teacher's and the student's relations of the
  *current* pixels to teacher pixels drawn from the online time-aware pixel queue
  (papers_extra.md §1.1 framework figure; loss form grounded on CIRKD's pixel-memory KL, mpqdm.md §4.3).
  Everything about MTRD beyond the figure is **inferred** (paper text and code unavailable) and is exposed as
  switches: temperatures, weight, anchors, memory sample size and the sampling mode.

All relation maps are computed in (at least) fp32 with autocast disabled (bf16 cosine maps saturate the softmax).
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Literal, Sequence

import torch
import torch.nn as nn
from einops import rearrange
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from .memory import host_to_device

if TYPE_CHECKING:  # pragma: no cover
    from mpq_lightning.losses.memory import TimeAwarePixelQueue

__all__ = [
    "relation_kl",
    "memory_relation_kl",
    "TimeSmoothedRelationLoss",
    "MemoryRelationLoss",
]

Reduction = Literal["sum", "batchmean", "mean", "none"]
_REDUCTIONS = ("sum", "batchmean", "mean", "none")

# ==================================================================================================
# Helpers
# ==================================================================================================


def _no_autocast(device: torch.device):
    """Context that disables autocast on ``device`` (relation maps must be fp32)."""
    try:
        return torch.autocast(device_type=device.type, enabled=False)
    except (RuntimeError, ValueError):  # pragma: no cover - exotic device types
        return contextlib.nullcontext()


def _to_pixels(x: Tensor, channel_dim: int, name: str) -> Tensor:
    """``[B, C, *spatial]`` (``channel_dim=1``) or ``[B, *tokens, C]`` (``channel_dim=-1``) → ``[B, N, C]``."""
    if x.dim() < 3:
        raise ValueError(
            f"{name} must have shape [B, C, *spatial] or [B, N, C] (>= 3 dims), got {tuple(x.shape)}"
        )
    if channel_dim == 1:
        return rearrange(x, "b c ... -> b (...) c")
    if channel_dim in (-1, x.dim() - 1):
        return rearrange(x, "b ... c -> b (...) c")
    raise ValueError(f"channel_dim must be 1 (channels-first) or -1 (channels-last), got {channel_dim}")


def _at_least_fp32(x: Tensor) -> Tensor:
    """fp16/bf16 → fp32; fp32/fp64 unchanged."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _prepare(x: Tensor, channel_dim: int, normalize: bool, name: str) -> Tensor:
    z = _at_least_fp32(_to_pixels(x, channel_dim, name))
    if normalize:
        z = torch.nn.functional.normalize(z, p=2, dim=-1)
    return z


def _row_kl(zs: Tensor, zt: Tensor, rows: Tensor | None, tau: float) -> Tensor:
    """Per-row ``KL(softmax(S_t[rows]/τ) ‖ softmax(S_s[rows]/τ))`` → ``[B, R]``.

    ``zs``/``zt``: ``[B, N, C]`` normalised pixels; ``rows``: row (query pixel) indices or ``None`` (all).
    """
    qs = zs if rows is None else zs[:, rows]
    qt = zt if rows is None else zt[:, rows]
    log_ps = torch.log_softmax(torch.bmm(qs, zs.transpose(1, 2)) / tau, dim=-1)
    log_pt = torch.log_softmax(torch.bmm(qt, zt.transpose(1, 2)) / tau, dim=-1)
    return (log_pt.exp() * (log_pt - log_ps)).sum(dim=-1)


def _sample_indices(n: int, k: int | None, generator: torch.Generator | None, device) -> Tensor | None:
    """Sorted random subset of ``k`` out of ``n`` indices (CPU generator), or ``None`` if ``k`` is None/≥ n."""
    if k is None or k >= n:
        return None
    if k <= 0:
        raise ValueError(f"anchors must be a positive integer, got {k}")
    idx = torch.randperm(n, generator=generator)[:k].sort().values
    return host_to_device(idx, device)  # drawn on the host: the copy need not wait for the device


def _reduce_rows(row_kl: Tensor, reduction: str, n_cols: int, sum_scale: float = 1.0) -> Tensor:
    if reduction == "none":
        return row_kl
    total = row_kl.sum()
    if reduction == "sum":
        return total * sum_scale
    if reduction == "batchmean":
        return total / row_kl.numel()
    if reduction == "mean":
        return total / (row_kl.numel() * n_cols)
    raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")


# ==================================================================================================
# MPQ-DM relation KL (TRD core)
# ==================================================================================================


def relation_kl(
    f_student: Tensor,
    f_teacher: Tensor,
    tau: float = 1.0,
    reduction: Reduction = "sum",
    *,
    channel_dim: int = 1,
    normalize: bool = True,
    chunk_size: int | None = None,
    anchors: int | None = None,
    generator: torch.Generator | None = None,
    anchor_rescale: bool = True,
    checkpoint_chunks: bool = True,
    detach_teacher: bool = True,
) -> Tensor:
    """MPQ-DM's pixel-relation KL (mpqdm.md §3.8, ``relational_loss`` of the release).

    For each sample, pixels/tokens ``z_i ∈ R^C`` (L2-normalised along channels) give
    ``S_ij = <z_i, z_j>``; with ``p_i = softmax_j(S_ij / τ)`` the loss is
    ``Σ_{b,i,j} p^T_{b,ij} (log p^T_{b,ij} − log p^S_{b,ij})``. The released code uses ``τ = 1``,
    the sum reduction, and an external weight of 100 (applied by :class:`TimeSmoothedRelationLoss`).

    Args:
        f_student: student feature ``[B, C, *spatial]`` (``channel_dim=1``) or ``[B, N, C]`` (``channel_dim=-1``).
        f_teacher: teacher feature, same shape.
        tau: softmax temperature.
        reduction: ``'sum'`` (release) | ``'batchmean'`` (sum / number of rows ``B·R``) |
            ``'mean'`` (sum / ``B·R·N``, PyTorch ``kl_div`` element mean) | ``'none'`` (per-row KL ``[B, R]``).
        channel_dim: ``1`` (channels-first) or ``-1`` (channels-last / tokens).
        normalize: L2-normalise pixels first (release: yes).
        chunk_size: process the similarity matrix in blocks of ``chunk_size`` rows; peak memory is
            ``O(B · chunk · N)`` instead of ``O(B · N²)`` — with ``checkpoint_chunks`` also in backward
            (each block is recomputed during backward). The result equals the unchunked one up to fp rounding.
        anchors: if set, only ``anchors`` randomly chosen query pixels (rows; same for every sample and for
            both models) are used; every kept row is still a distribution over **all** N pixels, so each row's
            KL equals the released row's KL. Memory ``O(B · anchors · N)``. Not in the release (memory option).
        generator: CPU generator for the anchor draw (reproducibility).
        anchor_rescale: with anchors and ``reduction='sum'``, multiply by ``N / anchors`` so that the loss is an
            unbiased estimate of the full released sum (keeps the weight of 100 meaningful).
        checkpoint_chunks: recompute chunks in backward (``torch.utils.checkpoint``, non-reentrant).
        detach_teacher: the teacher relation is a target (default ``True``).

    Returns:
        0-d tensor, or ``[B, R]`` for ``reduction='none'``.
    """
    if f_student.shape != f_teacher.shape:
        raise ValueError(
            f"relation_kl: f_student shape {tuple(f_student.shape)} != f_teacher shape {tuple(f_teacher.shape)}"
        )
    if reduction not in _REDUCTIONS:
        raise ValueError(f"relation_kl: reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if tau <= 0:
        raise ValueError(f"relation_kl: tau must be > 0, got {tau}")
    if chunk_size is not None and chunk_size <= 0:
        raise ValueError(f"relation_kl: chunk_size must be positive, got {chunk_size}")
    if detach_teacher:
        f_teacher = f_teacher.detach()

    with _no_autocast(f_student.device):
        zs = _prepare(f_student, channel_dim, normalize, "f_student")
        zt = _prepare(f_teacher, channel_dim, normalize, "f_teacher")
        n = zs.shape[1]
        rows = _sample_indices(n, anchors, generator, zs.device)
        n_rows = n if rows is None else rows.numel()

        if chunk_size is None or chunk_size >= n_rows:
            row_kl = _row_kl(zs, zt, rows, tau)
        else:
            all_rows = torch.arange(n, device=zs.device) if rows is None else rows
            use_ckpt = checkpoint_chunks and torch.is_grad_enabled() and (zs.requires_grad or zt.requires_grad)
            parts = []
            for chunk in all_rows.split(chunk_size):
                if use_ckpt:
                    parts.append(checkpoint(_row_kl, zs, zt, chunk, tau, use_reentrant=False))
                else:
                    parts.append(_row_kl(zs, zt, chunk, tau))
            row_kl = torch.cat(parts, dim=1)

        scale = (n / n_rows) if (rows is not None and anchor_rescale) else 1.0
        return _reduce_rows(row_kl, reduction, n, sum_scale=scale)


# ==================================================================================================
# TRD: time-smoothed relation distillation (MPQ-DM v1)
# ==================================================================================================


class TimeSmoothedRelationLoss(nn.Module):
    """MPQ-DM's Time-smoothed Relation Distillation (TRD), mpqdm.md §3.8.

    What the release does (and this module reproduces by default): forward hooks collect the output of the
    last UNet decoder block of teacher and student at every DDIM step; when ``window`` (= 2) steps have been
    collected, the buffered features are **averaged over the window, separately for teacher and student**
    (``F̄ = mean(F_t, F_{t−1})``), L2-normalised per pixel, and :func:`relation_kl` (τ = 1, sum) times
    ``weight`` (= 100) is added to the ε-MSE of the step that closes the window; the buffers are then
    cleared. On the other steps this module returns a zero tensor (no gradient).

    The release stores ``output.clone().detach()`` for the student too, so its TRD term is a constant and
    gives no gradient (mpqdm.md §3.8, §6.1). ``detach_student=True`` reproduces that exactly (the returned
    loss then has ``requires_grad == False``). With ``detach_student=False`` (default) the student feature
    stays in the graph according to ``grad_mode``:

    * ``'current_only'`` (default): ``F̄_q = mean(F_q,t, sg(F_q,t−1), …)`` — gradient flows only through the
      feature of the step that closes the window; buffered earlier features are detached. Works with one
      optimizer step per DDIM step (the release's schedule).
    * ``'accumulate'``: earlier student features are kept *with* their graph, so the caller must not free the
      graph in between (accumulate the per-step losses and call backward/step once per window).

    The release never resets the window buffer between trajectories; with an even number of DDIM steps
    (20) that is the same as calling :meth:`reset` at the start of each trajectory, which is recommended.

    Args:
        window: number of consecutive sampler steps averaged (release: 2).
        tau: softmax temperature (release: 1).
        weight: loss weight (release: 100).
        reduction: see :func:`relation_kl` (release: ``'sum'``).
        detach_student: reproduce the released (gradient-free) behaviour.
        grad_mode: ``'current_only'`` | ``'accumulate'`` (see above).
        chunk_size: row chunking of the similarity matrix (memory option, identical result).
        anchors: random query-pixel sub-sampling (memory option, not in the release).
        anchor_rescale: see :func:`relation_kl`.
        seed: seed of this module's CPU generator for the anchor draw (``None``: global RNG).
        channel_dim: ``1`` for ``[B, C, H, W]`` UNet features, ``-1`` for ``[B, N, C]`` DiT tokens.
        checkpoint_chunks: recompute chunks in backward.
    """

    def __init__(
        self,
        window: int = 2,
        tau: float = 1.0,
        weight: float = 100.0,
        reduction: Reduction = "sum",
        detach_student: bool = False,
        grad_mode: Literal["current_only", "accumulate"] = "current_only",
        chunk_size: int | None = None,
        anchors: int | None = None,
        anchor_rescale: bool = True,
        seed: int | None = None,
        channel_dim: int = 1,
        checkpoint_chunks: bool = True,
    ) -> None:
        super().__init__()
        if window < 1:
            raise ValueError(f"TimeSmoothedRelationLoss: window must be >= 1, got {window}")
        if grad_mode not in ("current_only", "accumulate"):
            raise ValueError(f"grad_mode must be 'current_only' or 'accumulate', got {grad_mode!r}")
        if reduction not in _REDUCTIONS or reduction == "none":
            raise ValueError(f"reduction must be one of ('sum', 'batchmean', 'mean'), got {reduction!r}")
        self.window = window
        self.tau = tau
        self.weight = weight
        self.reduction = reduction
        self.detach_student = detach_student
        self.grad_mode = grad_mode
        self.chunk_size = chunk_size
        self.anchors = anchors
        self.anchor_rescale = anchor_rescale
        self.channel_dim = channel_dim
        self.checkpoint_chunks = checkpoint_chunks
        self.generator: torch.Generator | None = None
        if seed is not None:
            self.generator = torch.Generator().manual_seed(seed)
        self._student_buf: list[Tensor] = []
        self._teacher_buf: list[Tensor] = []
        self.window_closed: bool = False

    # ----------------------------------------------------------------------------------------------
    @property
    def pending(self) -> int:
        """Number of steps buffered in the current (open) window."""
        return len(self._student_buf)

    def reset(self) -> None:
        """Drop buffered features (call at the start of every trajectory)."""
        self._student_buf.clear()
        self._teacher_buf.clear()
        self.window_closed = False

    # ----------------------------------------------------------------------------------------------
    def forward(self, f_student: Tensor, f_teacher: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Buffer this step's features; return ``weight · relation_kl`` when the window closes, else ``0``."""
        if f_student.shape != f_teacher.shape:
            raise ValueError(
                f"TimeSmoothedRelationLoss: f_student shape {tuple(f_student.shape)} != "
                f"f_teacher shape {tuple(f_teacher.shape)}"
            )
        if self._student_buf and self._student_buf[0].shape != f_student.shape:
            raise ValueError(
                f"TimeSmoothedRelationLoss: feature shape {tuple(f_student.shape)} differs from the shape "
                f"{tuple(self._student_buf[0].shape)} buffered earlier in this window; call reset()"
            )
        closes = len(self._student_buf) + 1 == self.window
        live = not self.detach_student and (closes or self.grad_mode == "accumulate")
        f_s, f_t = (f_student if live else f_student.detach()), f_teacher.detach()
        if not closes:  # kept past this call: a copy, since the producer may reuse the memory (a compiled
            # backbone replayed as a CUDA graph writes its next step's outputs over this step's)
            f_s, f_t = f_s.clone(), f_t.clone()
        self._student_buf.append(f_s)
        self._teacher_buf.append(f_t)
        self.window_closed = closes
        if not closes:
            return f_student.new_zeros((), dtype=torch.float32)

        fs = torch.stack(self._student_buf).mean(dim=0)
        ft = torch.stack(self._teacher_buf).mean(dim=0)
        self._student_buf.clear()
        self._teacher_buf.clear()
        loss = relation_kl(
            fs,
            ft,
            tau=self.tau,
            reduction=self.reduction,
            channel_dim=self.channel_dim,
            chunk_size=self.chunk_size,
            anchors=self.anchors,
            generator=generator if generator is not None else self.generator,
            anchor_rescale=self.anchor_rescale,
            checkpoint_chunks=self.checkpoint_chunks,
        )
        return self.weight * loss

    def extra_repr(self) -> str:
        return (
            f"window={self.window}, tau={self.tau}, weight={self.weight}, reduction={self.reduction!r}, "
            f"detach_student={self.detach_student}, grad_mode={self.grad_mode!r}, "
            f"chunk_size={self.chunk_size}, anchors={self.anchors}"
        )


# ==================================================================================================
# MTRD: memory-based temporal relation distillation (MPQ-DMv2, inferred)
# ==================================================================================================


def memory_relation_kl(
    z_student: Tensor,
    z_teacher: Tensor,
    memory: Tensor,
    tau_c: float = 0.1,
    tau_kd: float = 1.0,
    reduction: Reduction = "batchmean",
) -> Tensor:
    """CIRKD-style pixel-to-memory relation KL (mpqdm.md §4.3).

    ``ℓ_s = z_s Mᵀ / τ_c``, ``ℓ_t = z_t Mᵀ / τ_c``;
    ``L = τ_kd² · KL(softmax(ℓ_t/τ_kd) ‖ softmax(ℓ_s/τ_kd))`` with ``'batchmean'`` = mean over anchors
    (CIRKD ``contrast_sim_kd``).

    Args:
        z_student, z_teacher: ``[A, C]`` anchor embeddings (already normalised).
        memory: ``[K, C]`` queue entries.
    """
    if z_student.shape != z_teacher.shape or z_student.dim() != 2:
        raise ValueError(
            f"memory_relation_kl: z_student {tuple(z_student.shape)} and z_teacher {tuple(z_teacher.shape)} "
            "must both be [A, C]"
        )
    if memory.dim() != 2 or memory.shape[1] != z_student.shape[1]:
        raise ValueError(
            f"memory_relation_kl: memory shape {tuple(memory.shape)} does not match anchors "
            f"{tuple(z_student.shape)} (expected [K, {z_student.shape[1]}])"
        )
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    m = memory.to(device=z_student.device, dtype=z_student.dtype)
    log_ps = torch.log_softmax(z_student @ m.T / (tau_c * tau_kd), dim=-1)
    log_pt = torch.log_softmax(z_teacher @ m.T / (tau_c * tau_kd), dim=-1)
    row_kl = (log_pt.exp() * (log_pt - log_ps)).sum(dim=-1)
    return (tau_kd**2) * _reduce_rows(row_kl.unsqueeze(0), reduction, m.shape[0]).squeeze(0)


class MemoryRelationLoss(nn.Module):
    """MPQ-DMv2 Memory-based Temporal Relation Distillation (MTRD) loss — **inferred design**.

    From the framework figure (papers_extra.md §1.1): FP pixels of every timestep are cached in an online
    time-aware pixel queue (one slot per step, refreshing gate); "time-wise pixel sampling" draws pixels from
    it; the current FP and quantized features are each related to the sampled pixels (``r_t^FP``, ``r_t^Q``)
    and the loss is ``KL(r_t^FP ‖ r_t^Q)``. The relation form (cosine similarity / ``τ_c``, softmax with
    ``τ_kd``, ``τ_kd²`` factor, batch-mean over anchors) follows CIRKD's pixel-memory loss (mpqdm.md §4.3);
    the paper's temperatures, weight, anchor and memory sizes are **unknown**, the defaults are CIRKD's
    (``τ_c = 0.1``, ``τ_kd = 1``, weight 0.1, 4096 anchors / 4096 contrast pixels).

    Recommended order per step (the queue is owned by :class:`mpq_lightning.callbacks.MemoryQueue`): compute
    this loss against the queue as it is, *then* enqueue the current teacher feature, so the memory relates
    the current step to pixels cached at other steps / earlier trajectories. The queue persists across
    trajectories. With an empty queue the loss is ``0``.

    Args:
        tau_c: contrast temperature applied to the cosine similarities.
        tau_kd: distillation temperature (the loss is multiplied by ``τ_kd²``).
        weight: loss weight λ_mem.
        anchors: number of current pixels (over batch × spatial, same for both models) used as queries;
            ``None`` = all.
        memory_samples: number of queue entries drawn per call.
        sampling: ``'time_wise'`` (v2 figure: an equal share from every filled step slot) or ``'uniform'``
            (uniform over all filled entries).
        reduction: ``'batchmean'`` (CIRKD; mean over anchors) | ``'sum'`` | ``'mean'`` (÷ anchors · K).
        channel_dim: ``1`` for ``[B, C, *spatial]``, ``-1`` for ``[B, N, C]``.
        detach_student: no gradient to the student (debug / parity with a detached TRD).
        seed: seed of this module's CPU generator (anchors and queue sampling); ``None`` = global RNG.
    """

    def __init__(
        self,
        tau_c: float = 0.1,
        tau_kd: float = 1.0,
        weight: float = 0.1,
        anchors: int | None = 4096,
        memory_samples: int = 4096,
        sampling: Literal["time_wise", "uniform"] = "time_wise",
        reduction: Reduction = "batchmean",
        channel_dim: int = 1,
        detach_student: bool = False,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        if sampling not in ("time_wise", "uniform"):
            raise ValueError(f"MemoryRelationLoss: sampling must be 'time_wise' or 'uniform', got {sampling!r}")
        if reduction not in _REDUCTIONS or reduction == "none":
            raise ValueError(f"reduction must be one of ('sum', 'batchmean', 'mean'), got {reduction!r}")
        if tau_c <= 0 or tau_kd <= 0:
            raise ValueError(f"temperatures must be > 0, got tau_c={tau_c}, tau_kd={tau_kd}")
        if memory_samples <= 0:
            raise ValueError(f"memory_samples must be positive, got {memory_samples}")
        self.tau_c = tau_c
        self.tau_kd = tau_kd
        self.weight = weight
        self.anchors = anchors
        self.memory_samples = memory_samples
        self.sampling = sampling
        self.reduction = reduction
        self.channel_dim = channel_dim
        self.detach_student = detach_student
        self.generator: torch.Generator | None = None
        if seed is not None:
            self.generator = torch.Generator().manual_seed(seed)
        self.last_memory_tags: Tensor | None = None

    def forward(
        self,
        f_student: Tensor,
        f_teacher: Tensor,
        queue: "TimeAwarePixelQueue",
        generator: torch.Generator | None = None,
        steps: Sequence[int] | None = None,
    ) -> Tensor:
        """``weight · MTRD(f_student, f_teacher; queue)``.

        Args:
            f_student, f_teacher: current-step features (same shape).
            queue: the time-aware pixel queue (teacher pixels).
            generator: CPU generator overriding this module's one.
            steps: restrict memory sampling to these step slots (``None`` = all filled slots).
        """
        if f_student.shape != f_teacher.shape:
            raise ValueError(
                f"MemoryRelationLoss: f_student shape {tuple(f_student.shape)} != "
                f"f_teacher shape {tuple(f_teacher.shape)}"
            )
        gen = generator if generator is not None else self.generator
        if self.detach_student:
            f_student = f_student.detach()
        f_teacher = f_teacher.detach()
        with _no_autocast(f_student.device):
            # pixels are normalised after the anchor draw: only the anchors are (row-wise, so the same)
            zs = rearrange(_prepare(f_student, self.channel_dim, False, "f_student"), "b n c -> (b n) c")
            zt = rearrange(_prepare(f_teacher, self.channel_dim, False, "f_teacher"), "b n c -> (b n) c")
            if queue.dim is not None and queue.dim != zs.shape[1]:
                raise ValueError(
                    f"MemoryRelationLoss: feature of shape {tuple(f_student.shape)} has {zs.shape[1]} channels "
                    f"but the queue stores dim={queue.dim}"
                )
            memory, tags = queue.sample(self.memory_samples, mode=self.sampling, generator=gen, steps=steps)
            self.last_memory_tags = tags
            if memory.shape[0] == 0:
                return zs.new_zeros(())
            idx = _sample_indices(zs.shape[0], self.anchors, gen, zs.device)
            if idx is not None:
                zs, zt = zs[idx], zt[idx]
            zs, zt = torch.nn.functional.normalize(zs, p=2, dim=-1), torch.nn.functional.normalize(zt, p=2, dim=-1)
            loss = memory_relation_kl(zs, zt, memory, self.tau_c, self.tau_kd, self.reduction)
        return self.weight * loss

    def extra_repr(self) -> str:
        return (
            f"tau_c={self.tau_c}, tau_kd={self.tau_kd}, weight={self.weight}, anchors={self.anchors}, "
            f"memory_samples={self.memory_samples}, sampling={self.sampling!r}, reduction={self.reduction!r}"
        )
