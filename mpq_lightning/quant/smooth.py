"""SmoothQuant-style per-input-channel pre-scale (MPQ-DM §3.2, Q-VDiT §3.4).

``s_j = a_j^alpha / w_j^(1 - alpha)`` with ``a_j`` the calibration max |X[..., j]| and
``w_j = max_i |W[i, j]|``; the layer computes ``(X / s) Q(W s)^T``. ``alpha = 0.5`` gives MPQ-DM's
``sqrt(m_x / m_w)``.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .quantizers import observed_row_mask


class ActAbsMaxObserver(nn.Module):
    """Per-input-channel max |x| over calibration batches (MPQ-DM: the running max over every
    sample and token); with ``momentum``, Q-VDiT's ``momentum_act_max`` (qvdit.md §3.4): an EMA over
    batches of the batch mean of each sample's max over its tokens."""

    def __init__(self, channel_dim: int, momentum: float | None = None) -> None:
        super().__init__()
        self.channel_dim, self.momentum = channel_dim, momentum
        self.stat: Tensor | None = None

    @torch.no_grad()
    def observe(self, x: Tensor) -> None:
        xd = x.detach().float().movedim(self.channel_dim, -1).abs()
        rows = observed_row_mask(x)
        if rows is not None:  # padded rows stay out (observed_rows); 0 never raises a max of |x|
            xd = xd.masked_fill(~rows.unsqueeze(-1), 0.0)
        if self.momentum is None:
            cur = xd.reshape(-1, xd.shape[-1]).amax(0)
        else:  # per sample (axis 0) max over its tokens, then the batch mean
            cur = xd.reshape(xd.shape[0], -1, xd.shape[-1]).amax(1).mean(0)
        if self.stat is None:
            self.stat = cur
        elif self.momentum is None:
            self.stat = torch.maximum(self.stat, cur)
        else:
            self.stat = self.momentum * self.stat + (1 - self.momentum) * cur


def smooth_scale(act_absmax: Tensor, weight: Tensor, alpha: float, eps: float = 1e-5) -> Tensor:
    """Per-input-channel scale s (shape [Cin]) for a weight [Cout, Cin, *k]."""
    w = weight.detach().float().abs().transpose(0, 1).reshape(weight.shape[1], -1).amax(1)
    if act_absmax.shape != w.shape:
        raise ValueError(
            f"activation statistics of shape {tuple(act_absmax.shape)} do not match the weight's "
            f"{w.shape[0]} input channels"
        )
    s = act_absmax.float().clamp_min(eps).pow(alpha) / w.clamp_min(eps).pow(1 - alpha)
    return s.clamp_min(eps)
