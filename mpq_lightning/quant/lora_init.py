"""OOLRI: LoRA initialised from the quantization error (MPQ-DMv2; mpqdm.md §4.2, papers_extra.md §1.1),
and the calibration-input statistics it and the OMQ / FZ-RMQ split search use.

With the prior quantized weight ``Q(W)`` (weight space: ``Q(W) = Q_w(W · s) ⊘ s``) and the error
``E_w = W - Q(W)``, the adapter starts at the best rank-r approximation of ``E_w``:

* ``svd_weight_error`` (the figure's flow): ``E_w ≈ U_r Σ_r V_rᵀ``, ``B = U_r Σ_r^½``,
  ``A = Σ_r^½ V_rᵀ`` (Eckart–Young: ``‖E_w - B A‖_F`` is the rank-r truncation error).
* ``svd_output_error`` (CLoQ-style): minimise ``‖X (E_w - B A)ᵀ‖_F`` with ``H = XᵀX + εI = L Lᵀ``
  (damped Cholesky, ``ε = oolri_damp · mean diag H``): ``B A = SVD_r(E_w L) L⁻¹``.

Placement (mpqdm.md §4.2): (a) ``lora_quantized_base``: ``base_weight := Q(W)`` so the latent
``Q(W) + B A ≈ W``; (b) ``lora_placement = fp_branch``: the FP branch ``(B A) X`` next to ``Q(W s)``.
The v1 placement ``Q((W + B A) s)`` with the FP base would move the latent *away* from W and is
refused by ``QuantConfig``.

Use: ``calibrate`` calls :func:`oolri_init` automatically (after the weight quantizers are
initialised) for layers whose ``lora_init`` is an SVD init when no ``lora_init`` callable is given;
``calibrate(..., lora_init=oolri_init)`` does the same explicitly.
"""
from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor, nn

from .layers import QuantLayer
from .quantizers import observed_row_mask
from .mixed import is_mixed, needs_output_search

SVD_INITS = ("svd_weight_error", "svd_output_error")


# ---------------------------------------------------------------------------------------------
# Calibration-input statistics (patch Gram matrix or a reservoir of patch rows)
# ---------------------------------------------------------------------------------------------


class InputStats:
    """Second-order statistics of a layer's calibration inputs, in weight space (unsmoothed X).

    Rows are the layer's input patches (:meth:`QuantLayer.input_patches`, [n, groups, d]; d = Cin
    for Linear, Cin/groups · Πk for Conv), so ``op(X, D)`` is ``P D_gᵀ`` per group. Memory-aware:
    when ``d <= max_rows`` the exact Gram ``H = Σ p pᵀ`` is accumulated ([groups, d, d], fp64);
    otherwise a uniform reservoir of ``max_rows`` rows is kept (bottom-k random keys), so a layer
    never holds more than ``max_rows · d`` values. Both live on ``device`` (default CPU).
    """

    def __init__(self, groups: int, dim: int, max_rows: int = 2048, device: str | torch.device = "cpu",
                 chunk_elems: int = 2**25) -> None:
        if max_rows < 1:
            raise ValueError(f"calib_max_rows must be >= 1, got {max_rows}")
        self.groups, self.dim, self.max_rows = groups, dim, max_rows
        self.device, self.chunk_elems = torch.device(device), chunk_elems
        self.mode = "gram" if dim <= max_rows else "rows"
        self.n = 0
        self._gram: Tensor | None = None
        self._rows: Tensor | None = None
        self._keys: Tensor | None = None

    @classmethod
    def for_layer(cls, layer: QuantLayer, max_rows: int = 2048, device: str | torch.device = "cpu") -> "InputStats":
        groups = getattr(layer, "groups", 1)
        return cls(groups, math.prod(layer.weight.shape[1:]), max_rows, device)

    # -- collection ------------------------------------------------------------------------------
    @torch.no_grad()
    def observe(self, layer: QuantLayer, x: Tensor) -> None:
        """Add the input ``x`` of ``layer`` (unfolded in batch chunks of ≤ ``chunk_elems`` values)."""
        rows = observed_row_mask(x)
        if rows is not None:  # padded rows stay out (observed_rows): keep [n, C] token rows
            x = x[rows]
        per_sample = max(1, x[0].numel() * (math.prod(layer.weight.shape[2:]) if layer.weight.dim() > 2 else 1))
        bs = max(1, self.chunk_elems // per_sample)
        for xc in x.detach().split(bs):
            self._add(layer.input_patches(xc).float())

    def _add(self, p: Tensor) -> None:
        n = p.shape[0]
        if n == 0:
            return
        self.n += n
        if self.mode == "gram":
            pt = p.transpose(0, 1)  # [g, n, d]
            g = (pt.transpose(1, 2) @ pt).to(self.device, torch.float64)
            self._gram = g if self._gram is None else self._gram + g
            return
        keys = torch.rand(n, device=p.device)
        if n > self.max_rows:
            keys, idx = keys.topk(self.max_rows, largest=False)
            p = p[idx]
        p, keys = p.to(self.device), keys.to(self.device)
        if self._rows is not None:
            p, keys = torch.cat([self._rows, p]), torch.cat([self._keys, keys])
            if keys.numel() > self.max_rows:
                keys, idx = keys.topk(self.max_rows, largest=False)
                p = p[idx]
        self._rows, self._keys = p, keys

    # -- use -------------------------------------------------------------------------------------
    @property
    def empty(self) -> bool:
        return self.n == 0

    def gram(self, device: torch.device | None = None) -> Tensor:
        """Normalised Gram ``H / n`` [groups, d, d] (fp64): mean outer product of the patches."""
        if self.empty:
            raise RuntimeError("InputStats: no calibration input was observed")
        if self.mode == "gram":
            h = self._gram / self.n
        else:
            r = self._rows.double().transpose(0, 1)  # [g, m, d]
            h = r.transpose(1, 2) @ r / r.shape[1]
        return h.to(device or self.device)

    @torch.no_grad()
    def row_errors(self, d: Tensor) -> Tensor:
        """Per-output-channel mean squared output error ``mean_positions (op(X, D))_o²`` [Cout] of a
        weight-space error ``d`` [Cout, Cin/groups, *k]."""
        if self.empty:
            raise RuntimeError("InputStats: no calibration input was observed")
        cout = d.shape[0]
        dg = d.reshape(self.groups, cout // self.groups, self.dim).double()
        if self.mode == "gram":
            h = self._gram.to(d.device) / self.n
            return ((dg @ h) * dg).sum(-1).reshape(cout)
        r = self._rows.to(d.device).double().transpose(0, 1)  # [g, m, d]
        y = r @ dg.transpose(1, 2)  # [g, m, Cout/g]
        return y.pow(2).mean(1).reshape(cout)


def needs_input_stats(layer: QuantLayer) -> bool:
    """Whether ``calibrate`` must collect :class:`InputStats` for ``layer``: an OMQ / FZ-RMQ split
    search with more than one candidate, or an output-aware OOLRI."""
    spec = layer.spec
    oolri_out = layer.lora is not None and spec.lora_init == "svd_output_error"
    return needs_output_search(layer.weight_quantizer) or oolri_out


# ---------------------------------------------------------------------------------------------
# Truncated SVD factorisations
# ---------------------------------------------------------------------------------------------


def _split_sqrt(u: Tensor, s: Tensor, vh: Tensor, r: int) -> tuple[Tensor, Tensor]:
    """``B = U_r Σ_r^½``, ``A = Σ_r^½ V_rᵀ`` (batched over leading dims)."""
    sq = s[..., :r].clamp_min(0).sqrt()
    return u[..., :, :r] * sq.unsqueeze(-2), sq.unsqueeze(-1) * vh[..., :r, :]


def svd_factors(e: Tensor, r: int, h: Tensor | None = None, damp: float = 0.01) -> tuple[Tensor, Tensor]:
    """Rank-``r`` factors ``(B, A)`` of ``e`` [..., m, n] (batched).

    ``h`` None: Frobenius-optimal ``B A ≈ e``. ``h`` [..., n, n] (input second moment): minimise
    ``‖(e - B A) L‖_F`` with ``h + εI = L Lᵀ``, i.e. ``B A = SVD_r(e L) L⁻¹``. ``r`` is capped at
    ``min(m, n)``; the returned factors have that many columns / rows. Computed in fp64.
    """
    e = e.double()
    r = min(r, e.shape[-1], e.shape[-2])
    if h is None:
        u, s, vh = torch.linalg.svd(e, full_matrices=False)
        return _split_sqrt(u, s, vh, r)
    h = h.double().to(e.device)
    diag_mean = torch.diagonal(h, dim1=-2, dim2=-1).mean(-1).clamp_min(1e-12)
    eye = torch.eye(h.shape[-1], dtype=h.dtype, device=h.device)
    hd = h + (damp * diag_mean)[..., None, None] * eye
    chol, info = torch.linalg.cholesky_ex(hd)
    if bool((info != 0).any()):  # retry with a stronger damping (rank-deficient reservoir)
        chol = torch.linalg.cholesky(h + (max(damp, 1e-2) * 10 * diag_mean)[..., None, None] * eye)
    u, s, vh = torch.linalg.svd(e @ chol, full_matrices=False)
    b, a = _split_sqrt(u, s, vh, r)
    a = torch.linalg.solve_triangular(chol, a, upper=False, left=False)  # a L⁻¹
    return b, a


# ---------------------------------------------------------------------------------------------
# OOLRI per layer / per model
# ---------------------------------------------------------------------------------------------


def prior_quantized_weight(layer: QuantLayer) -> Tensor:
    """``Q(W)`` in weight space: ``Q_w(W · s) ⊘ s`` from the FP weight and the initialised weight
    quantizer (OMQ / FZ-RMQ included), fp32."""
    wq = layer.weight_quantizer
    if wq is None or not bool(wq.initialized):
        raise RuntimeError("OOLRI needs an initialised weight quantizer: run it inside calibrate (after stage 2)")
    w = layer.weight.detach().float()
    s = layer.smooth_scale
    ws = layer._scale_weight(w, s.float()) if s is not None else w
    q = wq(ws).float()
    return q / s.view(1, -1, *([1] * (w.dim() - 2))).float() if s is not None else q


@torch.no_grad()
def oolri_init_layer(layer: QuantLayer, method: str | None = None, stats: InputStats | None = None,
                     damp: float | None = None) -> dict | None:
    """Initialise ``layer.lora`` from the rank-r SVD of ``E_w = W - Q(W)`` (``method`` defaults to
    the layer's ``lora_init``; non-SVD inits are skipped, returning None). Sets ``base_weight := Q(W)``
    when the layer has a quantized base. Returns ``{"error_fro", "residual_fro", "method"}``."""
    lora, spec = layer.lora, layer.spec
    method = method or spec.lora_init
    if lora is None or method not in SVD_INITS:
        return None
    if layer.base_weight is None and layer.lora_placement != "fp_branch":
        raise ValueError(
            "OOLRI needs lora_quantized_base=True (frozen Q(W) base) or lora_placement='fp_branch'; with the FP base "
            "inside the quantizer B A ≈ W - Q(W) would move the latent weight away from W (mpqdm.md §4.2)"
        )
    damp = spec.oolri_damp if damp is None else damp
    stats = stats if stats is not None else getattr(layer, "input_stats", None)
    if method == "svd_output_error":
        if stats is None or stats.empty:
            raise RuntimeError(
                "lora_init='svd_output_error' needs calibration-input statistics: call oolri_init inside "
                "calibrate(...) (it collects them) or pass stats=InputStats(...)"
            )
        if stats.groups != 1:
            warnings.warn("svd_output_error on a grouped conv: falling back to svd_weight_error", stacklevel=2)
            method, stats = "svd_weight_error", None
    w = layer.weight.detach().float()
    q = prior_quantized_weight(layer)
    e = w - q  # [Cout, Cin, *k]
    cout, cin = e.shape[:2]
    h = stats.gram(e.device)[0] if method == "svd_output_error" else None
    r = lora.rank
    if lora.B.dim() == 2:  # Linear or EfficientDM conv: Cout × (Cin·Πk)
        b, a = svd_factors(e.reshape(cout, -1), r, h, damp)
        k = b.shape[-1]
        lora.B.zero_()
        lora.B[:, :k] = b.to(lora.B)
        lora.A[:k] = a.reshape(k, *lora.A.shape[1:]).to(lora.A)
    else:  # per-position conv: one SVD per kernel position, batched
        npos = math.prod(e.shape[2:])
        ep = e.reshape(cout, cin, npos).permute(2, 0, 1)  # [P, Cout, Cin]
        hp = None
        if h is not None:  # diagonal blocks H_pp (cross-position correlations are ignored)
            hp = torch.diagonal(h.view(cin, npos, cin, npos), dim1=1, dim2=3).permute(2, 0, 1)
        b, a = svd_factors(ep, r, hp, damp)  # [P, Cout, k], [P, k, Cin]
        k = b.shape[-1]
        lora.B.zero_()
        lora.B.view(cout, r, npos)[:, :k] = b.permute(1, 2, 0).to(lora.B)
        lora.A.view(r, cin, npos)[:k] = a.permute(1, 2, 0).to(lora.A)
    if layer.base_weight is not None:
        layer.base_quantizer.load_state_dict(layer.weight_quantizer.state_dict())  # snapshot of the prior Q
        layer.base_weight.copy_(q.to(layer.base_weight))
    if spec.oolri_refit_quantizer:
        lat = layer.latent_weight().detach().float()
        if layer.smooth_scale is not None:
            lat = layer._scale_weight(lat, layer.smooth_scale.float())
        wq = layer.weight_quantizer
        wq.refit(lat) if is_mixed(wq) else wq.initialize(lat)
    delta = lora.delta().float()
    return {
        "method": method,
        "error_fro": float(e.norm()),
        "residual_fro": float((e - delta).norm()),
    }


@torch.no_grad()
def oolri_init(model: nn.Module, method: str | None = None) -> dict[str, dict]:
    """OOLRI on every quantized layer of ``model`` whose ``lora_init`` (or ``method``) is an SVD
    init. Usable as ``calibrate(model, run, lora_init=oolri_init)``: inside ``calibrate`` the layers
    carry the calibration statistics the output-aware variant needs. Returns per-layer summaries."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, QuantLayer):
            res = oolri_init_layer(m, method)
            if res is not None:
                out[name] = res
    return out


def wants_oolri(model: nn.Module) -> bool:
    """True when some quantized layer of ``model`` has a LoRA with an SVD ``lora_init``."""
    return any(isinstance(m, QuantLayer) and m.lora is not None and m.spec.lora_init in SVD_INITS
               for m in model.modules())
