"""Model conversion: ``QuantConfig`` and ``quantize_model`` for any ``nn.Module``, calibration.

Layers are chosen by fnmatch patterns over dotted module names: ``include`` minus ``exclude``
minus ``keep_fp`` (the papers' FP-layer lists), restricted to ``layer_types``. ``bit_map`` entries
``{pattern: {"w": bits, "a": bits, "lora_rank": r}}`` override the defaults per layer, later
entries winning (e.g. ``{"blocks.*.mlp.fc*": {"w": 8, "a": 8}}`` as Q-VDiT's released configs);
``"w_quantizer"`` and ``"tqe"`` may be overridden the same way (e.g. MPQ-DM's 8-bit layers stay
``uniform``).

The papers' methods are config switches: ``w_quantizer: omq | fzrmq`` (mixed.py),
``lora_init: svd_weight_error | svd_output_error`` (OOLRI, lora_init.py) and ``tqe: true``
(tqe.py, with the backbone's ``layer_info`` passed to :func:`quantize_model`).
"""
from __future__ import annotations

import fnmatch
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Callable, Iterable

import torch
from torch import nn

from .functional import qrange
from .layers import (
    ACT_QUANTIZERS,
    LAYER_TYPE_NAMES,
    LORA_INITS,
    LORA_PARAMS,
    LORA_PLACEMENTS,
    QUANT_LAYER_TYPES,
    W_QUANTIZERS,
    LayerSpec,
    QuantLayer,
)
from .functional import INITIALISERS
from .quantizers import GRANULARITIES, TimestepActQuantizer, UniformQuantizer, observed_row_mask
from .lora_init import SVD_INITS, InputStats, needs_input_stats, oolri_init, wants_oolri
from .mixed import FZRMQ_BASE_FITS, FZRMQ_LAYOUTS, OMQ_SEARCHES, init_mixed_quantizer, is_mixed
from .smooth import ActAbsMaxObserver, smooth_scale
from .tqe import LAYER_INFO_KEYS, TQE_FRAME_SCALES

BIT_MAP_KEYS = ("w", "a", "lora_rank", "w_quantizer", "tqe")


def _check_bits(value, key: str, allow_none: bool) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 8:
        raise ValueError(f"QuantConfig.{key} must be an integer bit width in 1..8{' or None' if allow_none else ''}, got {value!r}")


@dataclass
class QuantConfig:
    """What to quantize and how. Every field is a YAML-friendly scalar, list or dict.

    Args:
        w_bits: weight bits (1-8); null: weights stay FP
        a_bits: activation bits (1-8); null: activations stay FP
        w_symmetric: symmetric weight range (no zero point)
        a_symmetric: symmetric activation range
        w_granularity: one weight step per tensor | channel | group (of w_group_size inputs)
        w_group_size: inputs per group with w_granularity group
        w_init: weight range init: minmax | lp (EfficientDM's range shrink scored by mean |x - Q(x)|^2.4) |
            grid (Q-VDiT's grid search of the squared error)
        a_init: activation range init from the calibration batches: minmax | lp | grid
        a_quantizer: timestep (TALSQ: a step and zero point per sampler step) | dynamic_token (Q-VDiT:
            per-token min-max at run time) | static (one per layer) | null (activations FP)
        a_token_share_batch: dynamic_token: pool each token position over the batch, as the Q-VDiT release
            computes it (results then depend on the batch composition); false: each sample on its own
        num_steps: sampler steps, i.e. entries of the timestep activation tables
        learn_w_scale: train the weight steps
        learn_w_zero_point: train the weight zero points
        learn_a_scale: train the activation steps
        learn_a_zero_point: train the activation zero points
        lsq_grad_scale: scale the step gradients by LSQ's 1 / sqrt(N * qmax)
        include: fnmatch patterns of the layers (dotted module names) to consider
        exclude: patterns of layers left out (not quantized)
        keep_fp: patterns of layers kept in FP (the papers' FP-layer lists; reported apart from exclude)
        bit_map: per-pattern overrides, e.g. {"blocks.*.mlp.fc*": {"w": 8, "a": 8, "w_quantizer": "uniform"}}
            (keys w, a, lora_rank, w_quantizer, tqe)
        layer_types: module types to quantize: linear | conv1d | conv2d | conv3d
        lora_rank: rank of each quantized layer's LoRA adapter; 0: none
        lora_init: kaiming_zero (EfficientDM: A Kaiming, B zero) | svd_weight_error | svd_output_error
            (OOLRI: from the SVD of the quantization error, of the weights or of the layer's outputs)
        lora_param: efficientdm (conv A k x k, B 1 x 1) | per_position (the MPQ-DM release: B per kernel
            position)
        lora_placement: merged (B A added to the weight before its quantizer) | fp_branch (an FP side branch)
        lora_quantized_base: the adapter trains on a frozen Q(W) base (OOLRI) instead of the FP weight
        lora_exclude: patterns of quantized layers without an adapter
        smooth_alpha: SmoothQuant migration strength in [0, 1]; null: off
        smooth_momentum: SmoothQuant channel maxima: null = running max (MPQ-DM), else an EMA with this
            momentum (the Q-VDiT release, 0.95)
        strict_patterns: refuse a pattern of include / exclude / keep_fp / lora_exclude / bit_map that
            matches no layer
        w_quantizer: uniform | omq (MPQ-DM's outlier-aware mixed precision) | fzrmq (MPQ-DMv2's Z-order
            residual mixed quantization)
        omq_group_frac: OMQ / FZ-RMQ split granularity g = floor(Cout * omq_group_frac)
        omq_search: paper (split sizes up to Cout / 2) | release (split sizes 0 or g)
        omq_search_init: the fits the split search scores: null = w_init (the quantizer then used) |
            minmax (the MPQ-DM release) | lp | grid
        fzrmq_layout: figure (the MPQ-DMv2 framework figure) | proposal (the earlier spec)
        fzrmq_base_fit: joint (base step fitted for base + residuals) | greedy (base alone)
        oolri_damp: svd_output_error damping: H + damp * mean(diag H) * I
        oolri_refit_quantizer: after OOLRI, re-fit the weight quantizer on the adapted weight
        calib_max_rows: calibration-input statistics (for the OMQ / FZ-RMQ split search and output-aware
            OOLRI): a Gram matrix where d_in <= this, else a reservoir of this many input rows
        calib_stats_device: device that holds those statistics
        tqe: Q-VDiT's token-aware quantization estimator (low-rank and per-frame error correction)
        tqe_rank: rank of TQE's correction
        tqe_frame_scale: temporal (the release: 1 + m on temporal attention) | all (the paper: m) | none
        compile_quantizers: torch.compile the element-wise quantizer math (same values, faster)
    """

    w_bits: int | None = 4
    a_bits: int | None = 8
    w_symmetric: bool = False
    a_symmetric: bool = False
    w_granularity: str = "channel"
    w_group_size: int | None = None
    w_init: str = "lp"
    a_init: str = "lp"
    a_quantizer: str | None = "timestep"
    a_token_share_batch: bool = False
    num_steps: int = 1
    learn_w_scale: bool = True
    learn_w_zero_point: bool = False
    learn_a_scale: bool = True
    learn_a_zero_point: bool = True
    lsq_grad_scale: bool = False
    include: list[str] = field(default_factory=lambda: ["*"])
    exclude: list[str] = field(default_factory=list)
    keep_fp: list[str] = field(default_factory=list)
    bit_map: dict[str, dict] = field(default_factory=dict)
    layer_types: list[str] = field(default_factory=lambda: ["linear", "conv1d", "conv2d", "conv3d"])
    lora_rank: int = 0
    lora_init: str = "kaiming_zero"
    lora_param: str = "efficientdm"
    lora_placement: str = "merged"
    lora_quantized_base: bool = False
    lora_exclude: list[str] = field(default_factory=list)
    smooth_alpha: float | None = None
    smooth_momentum: float | None = None
    strict_patterns: bool = True
    # -- the papers' methods (each off by default) ---------------------------------------------
    w_quantizer: str = "uniform"
    omq_group_frac: float = 0.1
    omq_search: str = "paper"
    omq_search_init: str | None = None
    fzrmq_layout: str = "figure"
    fzrmq_base_fit: str = "joint"
    oolri_damp: float = 0.01
    oolri_refit_quantizer: bool = False
    calib_max_rows: int = 2048
    calib_stats_device: str = "cpu"
    tqe: bool = False
    tqe_rank: int = 1
    tqe_frame_scale: str = "temporal"
    # -- speed ----------------------------------------------------------------------------------
    compile_quantizers: bool = False

    def __post_init__(self) -> None:
        _check_bits(self.w_bits, "w_bits", allow_none=True)
        _check_bits(self.a_bits, "a_bits", allow_none=True)
        if self.w_granularity not in GRANULARITIES[:3]:
            raise ValueError(f"QuantConfig.w_granularity must be one of {GRANULARITIES[:3]}, got {self.w_granularity!r}")
        if self.w_granularity == "group" and not (isinstance(self.w_group_size, int) and self.w_group_size > 0):
            raise ValueError(f"QuantConfig.w_group_size must be a positive int with w_granularity='group', got {self.w_group_size!r}")
        for key in ("w_init", "a_init"):
            if getattr(self, key) not in INITIALISERS:
                raise ValueError(f"QuantConfig.{key} must be one of {sorted(INITIALISERS)}, got {getattr(self, key)!r}")
        if self.a_quantizer is not None and self.a_quantizer not in ACT_QUANTIZERS:
            raise ValueError(f"QuantConfig.a_quantizer must be one of {ACT_QUANTIZERS} or None, got {self.a_quantizer!r}")
        if not isinstance(self.num_steps, int) or self.num_steps < 1:
            raise ValueError(f"QuantConfig.num_steps must be a positive int, got {self.num_steps!r}")
        if not isinstance(self.lora_rank, int) or self.lora_rank < 0:
            raise ValueError(f"QuantConfig.lora_rank must be an int >= 0, got {self.lora_rank!r}")
        for key, allowed in (("lora_init", LORA_INITS), ("lora_param", LORA_PARAMS), ("lora_placement", LORA_PLACEMENTS)):
            if getattr(self, key) not in allowed:
                raise ValueError(f"QuantConfig.{key} must be one of {allowed}, got {getattr(self, key)!r}")
        unknown = set(self.layer_types) - set(LAYER_TYPE_NAMES)
        if unknown:
            raise ValueError(f"QuantConfig.layer_types has unknown types {sorted(unknown)}; choose from {sorted(LAYER_TYPE_NAMES)}")
        for pattern, entry in self.bit_map.items():
            if not isinstance(entry, dict) or set(entry) - set(BIT_MAP_KEYS):
                raise ValueError(f"QuantConfig.bit_map[{pattern!r}] must be a dict with keys from {BIT_MAP_KEYS}, got {entry!r}")
            for k in ("w", "a"):
                if k in entry:
                    _check_bits(entry[k], f"bit_map[{pattern!r}][{k!r}]", allow_none=True)
        if self.smooth_alpha is not None and not 0.0 <= self.smooth_alpha <= 1.0:
            raise ValueError(f"QuantConfig.smooth_alpha must be in [0, 1] or None, got {self.smooth_alpha!r}")
        if self.a_token_share_batch and self.a_quantizer != "dynamic_token":
            raise ValueError(f"QuantConfig.a_token_share_batch applies to a_quantizer 'dynamic_token', not {self.a_quantizer!r}")
        if self.smooth_momentum is not None and not 0.0 <= self.smooth_momentum < 1.0:
            raise ValueError(f"QuantConfig.smooth_momentum must be in [0, 1) or None, got {self.smooth_momentum!r}")
        if self.w_symmetric and self.w_bits == 1:
            qrange(1, True)  # raises the explanatory error
        self._check_methods()

    def _check_methods(self) -> None:
        """Validation of the papers' method switches (mixed.py, lora_init.py, tqe.py)."""
        for key, allowed in (("w_quantizer", W_QUANTIZERS), ("omq_search", OMQ_SEARCHES),
                             ("fzrmq_layout", FZRMQ_LAYOUTS), ("fzrmq_base_fit", FZRMQ_BASE_FITS),
                             ("tqe_frame_scale", TQE_FRAME_SCALES)):
            if getattr(self, key) not in allowed:
                raise ValueError(f"QuantConfig.{key} must be one of {allowed}, got {getattr(self, key)!r}")
        for entry in self.bit_map.values():
            if "w_quantizer" in entry and entry["w_quantizer"] not in W_QUANTIZERS:
                raise ValueError(f"QuantConfig.bit_map w_quantizer must be one of {W_QUANTIZERS}, got {entry['w_quantizer']!r}")
            if "tqe" in entry and not isinstance(entry["tqe"], bool):
                raise ValueError(f"QuantConfig.bit_map tqe must be a bool, got {entry['tqe']!r}")
        if self.omq_search_init is not None and self.omq_search_init not in INITIALISERS:
            raise ValueError(f"QuantConfig.omq_search_init must be None or one of {sorted(INITIALISERS)}, "
                             f"got {self.omq_search_init!r}")
        if not isinstance(self.omq_group_frac, (int, float)) or not 0.0 < self.omq_group_frac <= 0.5:
            raise ValueError(f"QuantConfig.omq_group_frac must be in (0, 0.5], got {self.omq_group_frac!r}")
        uses_mixed = self.w_quantizer != "uniform" or any(e.get("w_quantizer", "uniform") != "uniform" for e in self.bit_map.values())
        if uses_mixed and self.w_granularity != "channel":
            raise ValueError(f"QuantConfig.w_quantizer={self.w_quantizer!r} is channel-wise: needs w_granularity='channel', got {self.w_granularity!r}")
        if uses_mixed and self.w_symmetric and self.w_bits is not None and self.w_bits - 1 < 2:
            raise ValueError(f"QuantConfig.w_quantizer={self.w_quantizer!r} at w_bits={self.w_bits} has a 1-bit class: "
                             "needs w_symmetric=False (asymmetric 1-bit)")
        if self.lora_init in SVD_INITS and not (self.lora_quantized_base or self.lora_placement == "fp_branch"):
            raise ValueError(
                f"QuantConfig.lora_init={self.lora_init!r} (OOLRI) needs lora_quantized_base=True or "
                "lora_placement='fp_branch': with the FP base inside the quantizer, B A ~ W - Q(W) moves the latent "
                "weight away from W (mpqdm.md §4.2)"
            )
        if not isinstance(self.oolri_damp, (int, float)) or self.oolri_damp < 0:
            raise ValueError(f"QuantConfig.oolri_damp must be a float >= 0, got {self.oolri_damp!r}")
        if not isinstance(self.calib_max_rows, int) or self.calib_max_rows < 1:
            raise ValueError(f"QuantConfig.calib_max_rows must be a positive int, got {self.calib_max_rows!r}")
        if not isinstance(self.tqe_rank, int) or isinstance(self.tqe_rank, bool) or self.tqe_rank < 1:
            raise ValueError(f"QuantConfig.tqe_rank must be a positive int, got {self.tqe_rank!r}")
        if not isinstance(self.tqe, bool):
            raise ValueError(f"QuantConfig.tqe must be a bool, got {self.tqe!r}")
        if not isinstance(self.compile_quantizers, bool):
            raise ValueError(f"QuantConfig.compile_quantizers must be a bool, got {self.compile_quantizers!r}")

    def layer_spec(self, name: str) -> LayerSpec:
        """Settings for the layer called ``name`` after applying ``bit_map`` and ``lora_exclude``."""
        w, a, rank = self.w_bits, self.a_bits, self.lora_rank
        wq, tqe = self.w_quantizer, self.tqe
        for pattern, entry in self.bit_map.items():
            if fnmatch.fnmatchcase(name, pattern):
                w, a, rank = entry.get("w", w), entry.get("a", a), entry.get("lora_rank", rank)
                wq, tqe = entry.get("w_quantizer", wq), entry.get("tqe", tqe)
        if any(fnmatch.fnmatchcase(name, p) for p in self.lora_exclude):
            rank = 0
        spec_fields = {f.name for f in fields(LayerSpec)}
        kwargs = {k: v for k, v in asdict(self).items() if k in spec_fields}
        kwargs.update(w_bits=w, a_bits=a, lora_rank=rank, w_quantizer=wq, tqe=tqe)
        return LayerSpec(**kwargs)


# ---------------------------------------------------------------------------------------------
# quantize_model
# ---------------------------------------------------------------------------------------------


@dataclass
class LayerReport:
    name: str
    kind: str
    shape: tuple[int, ...]
    status: str  # quantized | kept_fp | excluded
    w_bits: int | None = None
    a_bits: int | None = None
    lora_rank: int = 0


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def plan_quantization(model: nn.Module, config: QuantConfig) -> list[LayerReport]:
    """Decide, without touching the model, what ``quantize_model`` will do; validates the config
    against the model (patterns that match nothing, LoRA rank vs. layer shape)."""
    types = tuple(LAYER_TYPE_NAMES[t] for t in config.layer_types)
    candidates = [(n, m) for n, m in model.named_modules() if n and type(m) in QUANT_LAYER_TYPES and isinstance(m, types)]
    names = [n for n, _ in candidates]
    if config.strict_patterns and not candidates:
        present = sorted({k for k, t in LAYER_TYPE_NAMES.items() for m in model.modules() if type(m) is t})
        raise ValueError(f"QuantConfig.layer_types {list(config.layer_types)} selects no layer of {type(model).__name__}, "
                         f"whose quantizable layers are of the types {present}")
    if config.strict_patterns:
        for key in ("include", "exclude", "keep_fp", "lora_exclude"):
            for p in getattr(config, key):
                if not any(fnmatch.fnmatchcase(n, p) for n in names):
                    raise ValueError(
                        f"QuantConfig.{key} pattern {p!r} matches no {'/'.join(config.layer_types)} layer of "
                        f"{type(model).__name__} (first layers: {names[:5]})"
                    )
        for p in config.bit_map:
            if not any(fnmatch.fnmatchcase(n, p) for n in names):
                raise ValueError(f"QuantConfig.bit_map pattern {p!r} matches no layer of {type(model).__name__}")
    plan = []
    for name, module in candidates:
        kind = type(module).__name__
        shape = tuple(module.weight.shape)
        if not _matches(name, config.include) or _matches(name, config.exclude):
            plan.append(LayerReport(name, kind, shape, "excluded"))
            continue
        if _matches(name, config.keep_fp):
            plan.append(LayerReport(name, kind, shape, "kept_fp"))
            continue
        spec = config.layer_spec(name)
        d_out, d_in = shape[0], math.prod(shape[1:])
        if spec.lora_rank > min(d_in, d_out):
            raise ValueError(
                f"QuantConfig.lora_rank={spec.lora_rank} is larger than min(d_in, d_out)={min(d_in, d_out)} "
                f"of layer {name!r} (weight {shape}); lower it or add the layer to lora_exclude"
            )
        if spec.w_granularity == "group" and shape[1] % spec.w_group_size:
            raise ValueError(f"QuantConfig.w_group_size={spec.w_group_size} does not divide the {shape[1]} input channels of {name!r}")
        if spec.w_bits is not None and spec.w_quantizer != "uniform":
            lo, hi = (2, 7) if spec.w_quantizer == "omq" else (2, 8)
            if not lo <= spec.w_bits <= hi:
                raise ValueError(
                    f"QuantConfig.w_quantizer={spec.w_quantizer!r} needs w bits in {lo}..{hi}, layer {name!r} has "
                    f"{spec.w_bits}; set bit_map[...]['w_quantizer'] = 'uniform' for it"
                )
        if spec.lora_rank and spec.lora_init in SVD_INITS and spec.w_bits is None:
            raise ValueError(
                f"QuantConfig.lora_init={spec.lora_init!r} (OOLRI) initialises each adapter from its layer's weight "
                f"quantization error, but layer {name!r} has no weight quantizer (w bits None): set lora_init "
                "'kaiming_zero', give the layer weight bits (w_bits or bit_map), or add it to lora_exclude")
        if spec.tqe and spec.tqe_rank > min(d_in, d_out):
            raise ValueError(f"QuantConfig.tqe_rank={spec.tqe_rank} is larger than min(d_in, d_out)={min(d_in, d_out)} of layer {name!r}")
        plan.append(LayerReport(name, kind, shape, "quantized", spec.w_bits, spec.a_bits, spec.lora_rank))
    return plan


def _layer_info(layer_info: Callable[[str], dict | None] | None, name: str) -> dict:
    if layer_info is None:
        return {}
    info = layer_info(name) or {}
    if not isinstance(info, dict) or set(info) - set(LAYER_INFO_KEYS):
        raise ValueError(f"layer_info({name!r}) must return a dict with keys from {LAYER_INFO_KEYS}, got {info!r}")
    return dict(info)


def quantize_model(
    model: nn.Module,
    config: QuantConfig,
    verbose: bool = False,
    layer_info: Callable[[str], dict | None] | None = None,
) -> nn.Module:
    """Swap the selected Linear/Conv layers of ``model`` for quantized ones, in place; returns it.

    The whole plan is validated before any module is replaced. New layers start in FP mode
    (quantization off) until :func:`calibrate` or :func:`set_quant_state` switches them on.
    Keep an FP teacher with ``copy.deepcopy`` before calling this.

    ``layer_info(name) -> {"kind": "spatial" | "temporal" | ..., "token_layout": "(b f) s c",
    "num_frames": F}`` (from the backbone's Denoiser) tells TQE a layer's token layout; it is
    stored in ``spec.extras["layer_info"]``.
    """
    plan = plan_quantization(model, config)
    specs = {}
    for row in plan:  # build every spec (and validate layer_info) before replacing anything
        if row.status == "quantized":
            spec = config.layer_spec(row.name)
            info = _layer_info(layer_info, row.name)
            if info:
                spec.extras["layer_info"] = info
            specs[row.name] = spec
    for row in plan:
        if row.status != "quantized":
            continue
        parent_name, _, child = row.name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        module = getattr(parent, child)
        qcls = QUANT_LAYER_TYPES[type(module)]
        setattr(parent, child, qcls.from_module(module, specs[row.name]))
    model._mpq_quant_plan = plan  # type: ignore[attr-defined]
    if verbose:
        print_quantization_report(plan)
    return model


def print_quantization_report(plan: list[LayerReport]) -> None:
    """Rich table of what ``quantize_model`` did (one row per layer, plus totals)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="quantize_model", show_lines=False)
    for col in ("layer", "type", "weight", "status", "W", "A", "LoRA"):
        table.add_column(col)
    for r in plan:
        table.add_row(r.name, r.kind, "×".join(map(str, r.shape)), r.status,
                      str(r.w_bits or "-"), str(r.a_bits or "-"), str(r.lora_rank or "-"))
    counts = {s: sum(r.status == s for r in plan) for s in ("quantized", "kept_fp", "excluded")}
    table.caption = ", ".join(f"{v} {k}" for k, v in counts.items())
    Console().print(table)


def quant_layers(model: nn.Module) -> Iterable[tuple[str, QuantLayer]]:
    return ((n, m) for n, m in model.named_modules() if isinstance(m, QuantLayer))


def set_quant_state(model: nn.Module, weight: bool = True, act: bool = True) -> nn.Module:
    """Switch every quantized layer between FP, weight-only and weight+activation fake quantization."""
    for _, m in quant_layers(model):
        m.weight_quant, m.act_quant = bool(weight), bool(act)
    return model


# ---------------------------------------------------------------------------------------------
# Calibration: smoothing statistics → weight quantizers → (LoRA init hook) → activation quantizers
# ---------------------------------------------------------------------------------------------


class _StaticActObserver:
    """Reservoir of activation values for a static (per-tensor) activation quantizer."""

    def __init__(self, reservoir: int = 65536) -> None:
        self.values: list[torch.Tensor] = []
        self.reservoir = reservoir

    def __call__(self, x: torch.Tensor) -> None:
        rows = observed_row_mask(x)  # padded rows stay out (observed_rows)
        v = (x.detach()[rows] if rows is not None else x.detach()).float().reshape(-1)
        if v.numel() == 0:
            return
        keep = torch.randperm(v.numel(), device=v.device)[: self.reservoir]
        self.values.append(torch.cat([v[keep], v.min().view(1), v.max().view(1)]).cpu())


@torch.no_grad()
def calibrate(
    model: nn.Module,
    run: Callable[[nn.Module], None],
    lora_init: Callable[[nn.Module], None] | None = None,
    weight_quant: bool = True,
    act_quant: bool = True,
    smooth_momentum: float | None = None,
) -> nn.Module:
    """Initialise every quantizer of ``model`` from calibration data.

    ``run(model)`` performs the calibration forwards (it sets the step index itself, e.g. with
    :func:`step_index_context`, for timestep-aware activation quantizers). Stages:
    1. FP pass: per-input-channel |x| max for layers with SmoothQuant, and input statistics
       (:class:`~mpq_lightning.quant.lora_init.InputStats`) for layers with an OMQ / FZ-RMQ split
       search or output-aware OOLRI (skipped when neither).
    2. Weight quantizers from ``W_lat · s`` with their configured init (OMQ / FZ-RMQ: kurtosis
       classes and split search by calibration output MSE).
    3. ``lora_init(model)`` if given; otherwise OOLRI (:func:`~mpq_lightning.quant.lora_init.oolri_init`)
       when some layer's ``lora_init`` is an SVD init. Layers carry their statistics as
       ``layer.input_stats`` during this stage.
    4. Pass with weight quantization on: activation quantizers observe, then initialise.
    Ends with the quant state ``(weight_quant, act_quant)``.
    """
    layers = dict(quant_layers(model))
    if not layers:
        raise ValueError(f"calibrate: {type(model).__name__} has no quantized layers (run quantize_model first)")
    set_quant_state(model, False, False)
    smoothed = {n: m for n, m in layers.items() if m.smooth_scale is not None}
    stats = {n: InputStats.for_layer(m, m.spec.calib_max_rows, m.spec.calib_stats_device)
             for n, m in layers.items() if needs_input_stats(m)}
    if smoothed or stats:
        observers = {n: ActAbsMaxObserver(m.channel_dim, m.spec.smooth_momentum if smooth_momentum is None else smooth_momentum)
                     for n, m in smoothed.items()}

        def _observe(layer, x, o=None, st=None):
            if o is not None:
                o.observe(x)
            if st is not None:
                st.observe(layer, x)

        for n in set(smoothed) | set(stats):
            layers[n].observer = lambda layer, x, o=observers.get(n), st=stats.get(n): _observe(layer, x, o, st)
        try:
            run(model)
        finally:
            for n in set(smoothed) | set(stats):
                layers[n].observer = None
        for n in stats:
            if stats[n].empty:
                raise RuntimeError(f"calibrate: layer {n!r} saw no input during the calibration run")
        for n, m in smoothed.items():
            if observers[n].stat is None:
                raise RuntimeError(f"calibrate: layer {n!r} saw no input during the calibration run")
            m.smooth_scale.copy_(smooth_scale(observers[n].stat, m.weight, m.spec.smooth_alpha).to(m.smooth_scale))
    for n, m in layers.items():
        if is_mixed(m.weight_quantizer):
            init_mixed_quantizer(m, stats.get(n))  # kurtosis classes + split search on W_lat · s
        elif m.weight_quantizer is not None and hasattr(m.weight_quantizer, "initialize"):
            m.weight_quantizer.initialize(m.quantized_weight().detach())  # quant still off: W_lat · s
    for n, st in stats.items():
        layers[n].input_stats = st
    try:
        if lora_init is not None:
            lora_init(model)
        elif wants_oolri(model):
            oolri_init(model)
    finally:
        for n in stats:
            del layers[n].input_stats  # free the statistics (up to calib_max_rows · d values per layer)
    act_layers = {n: m for n, m in layers.items() if m.act_quantizer is not None and not bool(m.act_quantizer.initialized)}
    if act_layers:
        set_quant_state(model, weight_quant, False)
        static: dict[str, _StaticActObserver] = {}
        for n, m in act_layers.items():
            m.act_quant = True
            if isinstance(m.act_quantizer, TimestepActQuantizer):
                m.act_quantizer.observing = True
            elif isinstance(m.act_quantizer, UniformQuantizer):
                static[n] = _StaticActObserver()
                m.act_quant = False
                m.observer = lambda layer, x, o=static[n]: o(
                    x / layer._bcast_in(layer.smooth_scale, x.dim()) if layer.smooth_scale is not None else x
                )
        try:
            run(model)
        finally:
            for m in act_layers.values():
                m.observer = None
                if isinstance(m.act_quantizer, TimestepActQuantizer):
                    m.act_quantizer.observing = False
        for n, m in act_layers.items():
            if isinstance(m.act_quantizer, TimestepActQuantizer):
                m.act_quantizer.finish_calibration()
            elif n in static:
                if not static[n].values:
                    raise RuntimeError(f"calibrate: layer {n!r} saw no input during the calibration run")
                m.act_quantizer.initialize(torch.cat(static[n].values).view(1, -1))
    set_quant_state(model, weight_quant, act_quant)
    return model
