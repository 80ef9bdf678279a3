"""Lightning callback: student–teacher error per sampler step index.

After every ``compute_losses`` call, :class:`~mpq_lightning.module.QATModule` leaves
``pl_module._last = {"out_s", "out_t", "step_index", "step_index_host"}`` (detached predictions, the
LongTensor [B] of sampler step indices and, where the data gives it, their values on the host). :class:`PerTimestepError` turns that into the per-sample MSE
``mean((out_s - out_t)^2)`` and accumulates sums and counts per step index, so that

* every ``log_every_n_steps`` optimizer steps (and at the end of training) the running means are logged
  as scalars ``timestep_error/step_{i:03d}`` (steps seen so far only) and as a curve image
  ``timestep_error/curve`` (error vs step index; matplotlib when installed, else a plain raster drawn
  with torch);
* validation batches (if any) are accumulated separately per validation run and logged under
  ``timestep_error_val/...`` at the end of each validation epoch (never during the sanity check).

Under DDP each rank accumulates locally; at each logging point the pending sums/counts are summed over
ranks (``trainer.strategy.reduce``) and folded into the running totals, which are then identical on all
ranks. The totals are the callback's checkpoint state (``state_dict`` / ``load_state_dict``), so a resumed
run continues the running means. With one process the checkpoint is exact; under DDP the batches since the
last logging point are not in it (checkpoint at multiples of ``log_every_n_steps`` for an exact resume).

YAML (LightningCLI)::

    trainer:
      callbacks:
        - class_path: mpq_lightning.callbacks.PerTimestepError
          init_args: {log_every_n_steps: 50}
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor

__all__ = ["PerTimestepError", "render_curve"]

_STAGES = ("train", "val")


class _Stats:
    """Running sums and counts per step index: ``total`` (synced, CPU float64 [2, N]: sums; counts) and
    ``pending`` (this rank's batches since the last sync, on the batches' device)."""

    def __init__(self, size: int) -> None:
        self.total = torch.zeros(2, size, dtype=torch.float64)
        self.pending: Tensor | None = None

    @property
    def size(self) -> int:
        return max(self.total.shape[1], 0 if self.pending is None else self.pending.shape[1])

    def grow(self, size: int) -> None:
        if size > self.total.shape[1]:
            self.total = torch.cat([self.total, self.total.new_zeros(2, size - self.total.shape[1])], dim=1)
        if self.pending is not None and size > self.pending.shape[1]:
            self.pending = torch.cat([self.pending, self.pending.new_zeros(2, size - self.pending.shape[1])], dim=1)

    def add(self, err: Tensor, steps: Tensor, host: Sequence[int] | None = None) -> None:
        """``host``: the values of ``steps`` on the host, so that sizing the table reads nothing back
        from the GPU."""
        if steps.numel() == 0:
            return
        lo, hi = (min(host), max(host)) if host else (int(steps.min()), int(steps.max()))
        if lo < 0:
            raise ValueError(f"PerTimestepError: negative sampler step index {lo}")
        dtype = torch.float32 if err.device.type == "mps" else torch.float64
        if self.pending is None:
            self.pending = torch.zeros(2, self.total.shape[1], dtype=dtype, device=err.device)
        self.grow(max(hi + 1, self.size))
        self.pending[0].index_add_(0, steps, err.to(self.pending.dtype))
        self.pending[1].index_add_(0, steps, torch.ones_like(err, dtype=self.pending.dtype))

    def local(self) -> Tensor:
        """total + pending on the CPU (this rank's view)."""
        if self.pending is None:
            return self.total.clone()
        out = torch.zeros(2, self.size, dtype=torch.float64)
        out[:, : self.total.shape[1]] += self.total
        out[:, : self.pending.shape[1]] += self.pending.detach().double().cpu()
        return out

    def reset(self, size: int) -> None:
        self.total = torch.zeros(2, size, dtype=torch.float64)
        self.pending = None


def _means(stats: Tensor, size: int) -> Tensor:
    """[2, M] sums; counts → [max(size, M)] float32 means, nan where unseen."""
    n = max(size, stats.shape[1])
    sums = torch.zeros(n, dtype=torch.float64)
    counts = torch.zeros(n, dtype=torch.float64)
    sums[: stats.shape[1]], counts[: stats.shape[1]] = stats[0], stats[1]
    means = sums / counts.clamp_min(1)
    means[counts == 0] = float("nan")
    return means.float()


class PerTimestepError(Callback):
    """Running mean of the student–teacher MSE per sampler step index, logged as scalars and a curve.

    Args:
        num_steps: size of the per-step buffers; ``None`` takes ``pl_module.quant_cfg.num_steps`` (the
            buffers grow if a larger index shows up).
        log_every_n_steps: log every this many optimizer steps; ``None`` uses the trainer's
            ``log_every_n_steps``.
        prefix: tag prefix (validation uses ``f"{prefix}_val"``).
        log_curve: also log the curve image.
        log_scale: logarithmic error axis in the curve.
        validation: accumulate and log validation batches too.
        attr: the module attribute holding the last predictions.
    """

    def __init__(
        self,
        num_steps: int | None = None,
        log_every_n_steps: int | None = None,
        prefix: str = "timestep_error",
        log_curve: bool = True,
        log_scale: bool = False,
        validation: bool = True,
        attr: str = "_last",
    ) -> None:
        super().__init__()
        if num_steps is not None and num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        if log_every_n_steps is not None and log_every_n_steps < 1:
            raise ValueError(f"log_every_n_steps must be >= 1, got {log_every_n_steps}")
        self.num_steps = num_steps
        self.log_every_n_steps = log_every_n_steps
        self.prefix = prefix
        self.log_curve = log_curve
        self.log_scale = log_scale
        self.validation = validation
        self.attr = attr
        self._size = num_steps or 0
        self._stats = {stage: _Stats(self._size) for stage in _STAGES}
        self._seen: Any = None  # the last `_last` dict consumed (each is counted once)
        self._last_logged_step = -1
        self._trainer: Any = None

    # -- public API ----------------------------------------------------------------------------
    def errors(self, stage: str = "train") -> Tensor:
        """Mean MSE per step index (float32 [N], nan for steps not seen): this rank's view (totals synced
        at the last logging point plus the local batches since)."""
        return _means(self._stats[stage].local(), self._size)

    def counts(self, stage: str = "train") -> Tensor:
        """Samples seen per step index (float64 [N]), this rank's view."""
        local = self._stats[stage].local()
        out = torch.zeros(max(self._size, local.shape[1]), dtype=torch.float64)
        out[: local.shape[1]] = local[1]
        return out

    def update(self, out_s: Tensor, out_t: Tensor, step_index: Tensor | int, stage: str = "train",
               step_index_host: Sequence[int] | None = None) -> None:
        """Accumulate one batch: per-sample MSE over all non-batch dims, grouped by step index
        (``step_index_host``: its values on the host, as the data modules give them: no GPU sync)."""
        if out_s.shape != out_t.shape:
            raise ValueError(f"student and teacher outputs differ in shape: {tuple(out_s.shape)} vs {tuple(out_t.shape)}")
        with torch.no_grad():
            err = (out_s.detach().float() - out_t.detach().float()).pow(2).flatten(1).mean(1)
            steps = torch.as_tensor(step_index, device=err.device, dtype=torch.long).reshape(-1)
            if steps.numel() == 1:
                steps = steps.expand(err.shape[0])
            if steps.shape != err.shape:
                raise ValueError(f"step_index has {steps.numel()} entries for a batch of {err.shape[0]}")
            self._stats[stage].add(err, steps, step_index_host)

    # -- Lightning hooks -----------------------------------------------------------------------
    def setup(self, trainer, pl_module, stage: str) -> None:
        self._trainer = trainer
        if self.num_steps is None:
            quant = getattr(pl_module, "quant_cfg", None)
            self._size = max(self._size, int(getattr(quant, "num_steps", 0) or 0))
        for s in self._stats.values():
            s.grow(self._size)

    def _consume(self, pl_module, stage: str) -> None:
        last = getattr(pl_module, self.attr, None)
        if not last or last is self._seen:
            return
        self._seen = last
        self.update(last["out_s"], last["out_t"], last["step_index"], stage, last.get("step_index_host"))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._consume(pl_module, "train")
        step = trainer.global_step
        every = self.log_every_n_steps or max(1, int(getattr(trainer, "log_every_n_steps", 50) or 50))
        if step > 0 and step % every == 0 and step != self._last_logged_step:
            self._sync_and_log(trainer, "train")

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.global_step != self._last_logged_step:
            self._sync_and_log(trainer, "train")

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._stats["val"].reset(self._size)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if self.validation and not trainer.sanity_checking:
            self._consume(pl_module, "val")

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if self.validation and not trainer.sanity_checking:
            self._sync_and_log(trainer, "val")

    # -- sync + logging ------------------------------------------------------------------------
    def _sync(self, trainer, stage: str) -> None:
        """Fold every rank's pending sums/counts into the (then identical) totals. Collective."""
        stats = self._stats[stage]
        world = int(getattr(trainer, "world_size", 1) or 1)
        device = trainer.strategy.root_device if world > 1 else torch.device("cpu")
        if world > 1:
            size = torch.tensor([float(stats.size)], device=device)
            size = trainer.strategy.reduce(size, reduce_op="max")
            stats.grow(int(size.item()))
        pending = stats.pending
        if pending is None:
            pending = torch.zeros(2, stats.size, dtype=torch.float64, device=device)
        if world > 1:
            pending = trainer.strategy.reduce(pending.to(device).clone(), reduce_op="sum")
        stats.grow(pending.shape[1])
        stats.total[:, : pending.shape[1]] += pending.detach().double().cpu()
        stats.pending = None

    def _sync_and_log(self, trainer, stage: str) -> None:
        self._sync(trainer, stage)
        if stage == "train":
            self._last_logged_step = trainer.global_step
        if not trainer.is_global_zero:
            return
        total = self._stats[stage].total
        means = _means(total, self._size)
        seen = [i for i in range(total.shape[1]) if total[1, i] > 0]
        if not seen:
            return
        prefix = self.prefix if stage == "train" else f"{self.prefix}_val"
        step = trainer.global_step
        metrics = {f"{prefix}/step_{i:03d}": float(means[i]) for i in seen}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        if self.log_curve:
            image = None
            for logger in trainer.loggers:
                experiment = getattr(logger, "experiment", None)
                if hasattr(experiment, "add_image"):
                    if image is None:
                        title = f"student-teacher MSE per sampler step ({stage}, step {step})"
                        image = render_curve(means, log_scale=self.log_scale, title=title)
                    experiment.add_image(f"{prefix}/curve", image, step, dataformats="HWC")

    # -- checkpointing -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        stats = self._stats["train"]
        world = int(getattr(self._trainer, "world_size", 1) or 1) if self._trainer is not None else 1
        # single process: pending batches are exact and go in; under DDP only the synced totals do
        values = stats.local() if world == 1 else stats.total.clone()
        return {
            "num_steps": self._size,
            "sums": values[0].clone(),
            "counts": values[1].clone(),
            "last_logged_step": self._last_logged_step,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        sums, counts = state_dict["sums"].double().cpu(), state_dict["counts"].double().cpu()
        self._size = max(self._size, int(state_dict.get("num_steps", 0)))
        stats = _Stats(max(self._size, sums.numel()))
        stats.total[0, : sums.numel()] = sums
        stats.total[1, : counts.numel()] = counts
        self._stats["train"] = stats
        self._last_logged_step = int(state_dict.get("last_logged_step", -1))


# -------------------------------------------------------------------------------------------------
# Curve rendering
# -------------------------------------------------------------------------------------------------


def render_curve(values: Tensor, log_scale: bool = False, title: str = "", width: int = 480, height: int = 320) -> "Any":
    """Error vs step index as an HWC uint8 numpy image (NaN entries are skipped).

    Uses matplotlib (Agg canvas, no global backend change) when installed, else :func:`_raster_curve`.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return _raster_curve(values, log_scale=log_scale, width=width, height=height).numpy()
    import numpy as np

    v = values.detach().float().cpu()
    idx = torch.arange(v.numel())
    ok = torch.isfinite(v) & ((v > 0) if log_scale else torch.ones_like(v, dtype=torch.bool))
    fig = Figure(figsize=(width / 100, height / 100), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(idx[ok].numpy(), v[ok].numpy(), marker="o", markersize=3, linewidth=1.5)
    ax.set_xlabel("sampler step index")
    ax.set_ylabel("MSE(student, teacher)")
    if log_scale:
        ax.set_yscale("log")
    ax.set_xlim(-0.5, max(v.numel() - 0.5, 0.5))
    ax.grid(True, alpha=0.3)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.canvas.draw()
    return np.ascontiguousarray(np.asarray(fig.canvas.buffer_rgba())[..., :3])


# 3x5 bitmap glyphs for the axis labels of the raster fallback
_GLYPHS = {
    "0": "111101101101111", "1": "010110010010111", "2": "111001111100111", "3": "111001111001111",
    "4": "101101111001001", "5": "111100111001111", "6": "111100111101111", "7": "111001010010010",
    "8": "111101111101111", "9": "111101111001111", ".": "000000000000010", "-": "000000111000000",
    "e": "000111101110011", "+": "000010111010000",
}  # fmt: skip


def _draw_text(img: Tensor, text: str, x: int, y: int, scale: int = 2, color=(0, 0, 0)) -> None:
    for k, ch in enumerate(text):
        glyph = _GLYPHS.get(ch)
        if glyph is None:
            continue
        g = torch.tensor([int(b) for b in glyph], dtype=torch.bool).view(5, 3)
        g = g.repeat_interleave(scale, 0).repeat_interleave(scale, 1)
        x0 = x + k * 4 * scale
        h, w = g.shape
        if x0 < 0 or y < 0 or x0 + w > img.shape[1] or y + h > img.shape[0]:
            continue
        region = img[y : y + h, x0 : x0 + w]
        region[g] = torch.tensor(color, dtype=torch.uint8)


def _fmt(v: float) -> str:
    return f"{v:.3g}" if 1e-3 <= abs(v) < 1e4 or v == 0 else f"{v:.1e}".replace("e-0", "e-").replace("e+0", "e")


def _raster_curve(values: Tensor, log_scale: bool = False, width: int = 480, height: int = 320) -> Tensor:
    """Matplotlib-free curve: white canvas, axes, polyline + dots, min/max labels. HWC uint8 tensor."""
    img = torch.full((height, width, 3), 255, dtype=torch.uint8)
    left, right, top, bottom = 64, 12, 12, 28
    x0, x1, y0, y1 = left, width - right, top, height - bottom  # plot box (y0 top, y1 bottom)
    img[y0 : y1 + 1, x0] = 0
    img[y1, x0 : x1 + 1] = 0
    v = values.detach().double().cpu()
    n = v.numel()
    ok = torch.isfinite(v) & ((v > 0) if log_scale else torch.ones_like(v, dtype=torch.bool))
    _draw_text(img, "0", x0 - 3, y1 + 6)
    if n > 1:
        _draw_text(img, str(n - 1), x1 - 8 * len(str(n - 1)) + 4, y1 + 6)
    if not ok.any():
        return img
    idx = torch.arange(n, dtype=torch.float64)[ok]
    val = v[ok]
    tv = val.log10() if log_scale else val
    lo = float(tv.min()) if log_scale else min(0.0, float(tv.min()))
    hi = float(tv.max())
    if hi - lo <= 0:  # a single value (or all equal)
        lo, hi = (lo - 0.5, hi + 0.5) if log_scale else (lo, lo + (abs(lo) or 1.0))
    hi += 0.05 * (hi - lo)
    px = x0 + 4 + (idx / max(n - 1, 1)) * (x1 - x0 - 8)
    py = y1 - 2 - (tv - lo) / (hi - lo) * (y1 - y0 - 4)
    color = torch.tensor([31, 119, 180], dtype=torch.uint8)
    for a in range(len(px) - 1):
        steps = int(max(abs(px[a + 1] - px[a]), abs(py[a + 1] - py[a]))) + 1
        for s in torch.linspace(0, 1, steps + 1, dtype=torch.float64):
            cx = int(round(float(px[a] + s * (px[a + 1] - px[a]))))
            cy = int(round(float(py[a] + s * (py[a + 1] - py[a]))))
            img[max(cy - 1, 0) : cy + 1, max(cx - 1, 0) : cx + 1] = color
    for cx, cy in zip(px.round().long().tolist(), py.round().long().tolist()):
        img[max(cy - 2, 0) : cy + 3, max(cx - 2, 0) : cx + 3] = color
    top_label = 10 ** hi if log_scale else hi
    bottom_label = 10 ** lo if log_scale else lo
    _draw_text(img, _fmt(top_label), 2, y0)
    _draw_text(img, _fmt(bottom_label), 2, y1 - 10)
    return img
