"""Real low-bit export: bit-packed integer codes in safetensors, a JSON quantization map, and a
reference loader whose forward equals the fake-quantized student bit for bit (fp32, CPU).

An export folder holds four files, written atomically (temp folder, then rename):

* ``model.safetensors``  every tensor, named like the state dict of the *loaded* model:
  quantized layers hold ``<layer>.wq_*`` (packed codes, steps, zero points, class ids, residual
  signs / scales), ``<layer>.act_quantizer.*``, ``<layer>.smooth_scale``, ``<layer>.corrections.tqe.*``,
  ``<layer>.lora.*`` (fp_branch only) and ``<layer>.bias``; every other parameter / persistent
  buffer of the model is stored under its own name.
* ``quant_map.json``     per quantized layer: kind, geometry, weight format (segments of rows with
  their bit width, step / zero-point tensors, residual branches), activation quantizer, TQE,
  fp-branch LoRA, and every tensor with its role (codes | wmeta | ameta | side | fp), dtype, shape.
* ``model.json``         how to rebuild the backbone without its FP weights (registry name and
  builder kwargs, weight-file arguments replaced by the diffusers config).
* ``manifest.json``      sha256 and byte size of the three files above.

Storage decisions (bit-exact reload of the quantized layers in fp32):

* Codes ``q - qmin`` of each segment are one dense little-endian bit stream (element ``i`` owns
  bits ``[i·b, (i+1)·b)``), padded only at the segment's last byte. OMQ stores each channel class
  at its own width (rows in channel order), FZ-RMQ its base codes plus one sign bit per weight for
  each residual branch, only on the channels that have that branch. Class ids: 2 bits per channel.
* Steps and residual scales are fp32 (an fp16 step would change the dequantised grid); integer
  zero points are packed at the segment's width (int32 when a learned zero point left the range,
  omitted for symmetric quantizers whose zero points are all 0). Activation tables and smoothing
  scales are fp32 (metadata).
* Non-quantized parameters, biases, TQE's FP branch and fp_branch LoRA are stored in ``fp_dtype``
  (bf16 default; ``fp32`` makes the whole reloaded model equal the student). Merged LoRA and
  OOLRI's frozen base are folded into the latent weight before quantization and not stored.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import struct
import tempfile
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..files import ordinary_permissions
from .layers import LoRA, fold_corrections, QuantConv1d, QuantConv2d, QuantConv3d, QuantLayer, QuantLinear
from .mixed import FZRMQQuantizer, MixedQuantizerBase, OMQQuantizer
from .quantizers import DynamicTokenQuantizer, TimestepActQuantizer, UniformQuantizer, _rows_view
from .tqe import TQE

FORMAT = "mpq-lightning-packed/1"
WEIGHTS_FILE, QUANT_MAP_FILE, MODEL_FILE, MANIFEST_FILE = "model.safetensors", "quant_map.json", "model.json", "manifest.json"
HASHED_FILES = (WEIGHTS_FILE, QUANT_MAP_FILE, MODEL_FILE)
FP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
ROLES = ("codes", "wmeta", "ameta", "side", "fp")
CLASS_ID_BITS = 2
_WEIGHT_ARGS = ("ckpt_path", "path", "subfolder", "from_pretrained", "torch_dtype")  # builder kwargs naming FP weights


class ExportFormatError(ValueError):
    """An export folder is incomplete, truncated, corrupted or inconsistent (the message names the file)."""


# ---------------------------------------------------------------------------------------------
# Bit packing
# ---------------------------------------------------------------------------------------------

_CHUNK = 1 << 22  # elements per packing chunk (a multiple of 8: chunks end on byte boundaries)


def _check_pack_bits(bits: Any) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"the packer supports integer bit widths 1..8, got {bits!r}")
    return bits


def packed_nbytes(numel: int, bits: int) -> int:
    """Bytes of ``numel`` codes of ``bits`` bits in one dense stream: ``ceil(numel · bits / 8)``."""
    return (int(numel) * _check_pack_bits(bits) + 7) // 8


def pack_bits(codes: Tensor, bits: int) -> Tensor:
    """Pack unsigned integer ``codes`` (any shape, values in ``[0, 2^bits)``) into a dense uint8
    bit stream: element ``i`` owns bits ``[i·bits, (i+1)·bits)``, little-endian within and across
    bytes; only the last byte is padded (with zeros). Vectorised: every 8 codes form one ``8·bits``-bit
    integer, i.e. ``bits`` whole bytes (loops run over the 8 lanes, the bytes and fixed-size chunks)."""
    bits = _check_pack_bits(bits)
    codes = torch.as_tensor(codes)
    if codes.is_floating_point() or codes.is_complex():
        raise ValueError(f"pack_bits needs integer codes, got {codes.dtype}")
    flat = codes.detach().reshape(-1)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) > 2**bits - 1):
        raise ValueError(f"codes must lie in [0, {2**bits - 1}] for {bits}-bit packing, "
                         f"got [{int(flat.min())}, {int(flat.max())}]")
    if bits == 8:
        return flat.to(torch.uint8, copy=True)
    n = flat.numel()
    out = torch.empty(packed_nbytes(n, bits), dtype=torch.uint8, device=flat.device)
    for start in range(0, n, _CHUNK):
        chunk = flat[start : start + _CHUNK]
        groups = (chunk.numel() + 7) // 8
        lanes = torch.zeros(groups * 8, dtype=torch.int64, device=flat.device)
        lanes[: chunk.numel()] = chunk
        lanes = lanes.view(groups, 8)
        word = lanes[:, 0].clone()  # 8 codes → one (8·bits)-bit little-endian integer
        for j in range(1, 8):
            word |= lanes[:, j] << (j * bits)
        packed = torch.stack([(word >> (8 * k)) & 0xFF for k in range(bits)], 1).to(torch.uint8).reshape(-1)
        b0 = start * bits // 8
        nb = packed_nbytes(chunk.numel(), bits)
        out[b0 : b0 + nb] = packed[:nb]
    return out


def unpack_bits(packed: Tensor, bits: int, numel: int) -> Tensor:
    """Inverse of :func:`pack_bits`: the first ``numel`` codes of a dense ``bits``-bit stream, uint8."""
    bits = _check_pack_bits(bits)
    if packed.dtype != torch.uint8:
        raise ValueError(f"unpack_bits needs a uint8 stream, got {packed.dtype}")
    packed = packed.reshape(-1)
    need = packed_nbytes(numel, bits)
    if packed.numel() != need:
        raise ValueError(f"{numel} codes of {bits} bits need {need} bytes, got {packed.numel()}")
    if bits == 8:
        return packed.clone()
    out = torch.empty(numel, dtype=torch.uint8, device=packed.device)
    mask = (1 << bits) - 1
    for start in range(0, numel, _CHUNK):
        n = min(_CHUNK, numel - start)
        groups = (n + 7) // 8
        b0 = start * bits // 8
        nb = packed_nbytes(n, bits)
        raw = torch.zeros(groups * bits, dtype=torch.int64, device=packed.device)
        raw[:nb] = packed[b0 : b0 + nb]
        raw = raw.view(groups, bits)
        word = raw[:, 0].clone()
        for k in range(1, bits):
            word |= raw[:, k] << (8 * k)
        codes = torch.stack([(word >> (j * bits)) & mask for j in range(8)], 1).reshape(-1)
        out[start : start + n] = codes[:n].to(torch.uint8)
    return out


# ---------------------------------------------------------------------------------------------
# Weight encoding / decoding (the arithmetic of functional._FakeQuantize.forward, term by term)
# ---------------------------------------------------------------------------------------------


def _rows_of(class_ids: Tensor | None, classes: list[int] | None, rows: int, device) -> Tensor:
    if classes is None:
        return torch.arange(rows, device=device)
    return torch.isin(class_ids, torch.tensor(classes, device=device)).nonzero().squeeze(1)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class _LayerTensors:
    """Tensors of one layer (state-dict suffix → tensor) with their roles."""

    def __init__(self) -> None:
        self.tensors: dict[str, Tensor] = {}
        self.roles: dict[str, str] = {}

    def add(self, suffix: str, tensor: Tensor, role: str) -> str:
        assert role in ROLES and suffix not in self.tensors
        self.tensors[suffix] = tensor.detach().contiguous()
        self.roles[suffix] = role
        return suffix


def _encode_segment(out: _LayerTensors, name: str, rows: Tensor, q: UniformQuantizer, idx: Tensor | None,
                    classes: list[int] | None) -> tuple[dict, Tensor]:
    """Codes, steps and zero points of ``rows`` under quantizer ``q`` (its rows ``idx``); returns the
    segment's map entry and its dequantised rows."""
    s = q.scale.detach().float()
    z = torch.round(q.zero_point.detach().float())
    if idx is not None:
        s, z = s[idx], z[idx]
    if s.shape != (rows.shape[0], 1):
        raise ValueError(f"quantizer has step shape {tuple(s.shape)}, expected [{rows.shape[0]}, 1]")
    qc = (torch.round(rows * (1.0 / s)) + z).clamp(q.qmin, q.qmax)
    deq = (qc - z) * s
    entry = {"name": name, "classes": classes, "bits": q.bits, "symmetric": q.symmetric, "qmin": q.qmin,
             "qmax": q.qmax, "rows": int(rows.shape[0])}
    entry["codes"] = out.add(f"wq_codes_{name}", pack_bits((qc - q.qmin).to(torch.uint8), q.bits), "codes")
    entry["scale"] = out.add(f"wq_scale_{name}", s.reshape(-1), "wmeta")
    zi = z.reshape(-1)
    if q.symmetric and bool((zi == 0).all()):
        entry["zero_format"], entry["zero"] = "none", None
    elif bool(((zi >= q.qmin) & (zi <= q.qmax)).all()):
        entry["zero_format"] = "packed"
        entry["zero"] = out.add(f"wq_zero_{name}", pack_bits((zi - q.qmin).to(torch.uint8), q.bits), "wmeta")
    else:  # a learned zero point outside the code range: keep it exactly
        entry["zero_format"] = "int32"
        entry["zero"] = out.add(f"wq_zero_{name}", zi.to(torch.int32), "wmeta")
    return entry, deq


def _signs(r: Tensor) -> Tensor:
    """``sign`` of :func:`~mpq_lightning.quant.functional.sign_ste` (0 → +1)."""
    return torch.where(r >= 0, 1.0, -1.0)


def _encode_residual(out: _LayerTensors, name: str, sign: Tensor, scale: Tensor, class_ids: Tensor,
                     classes: list[int]) -> dict:
    idx = _rows_of(class_ids, classes, sign.shape[0], sign.device)
    entry = {"name": name, "classes": classes, "rows": int(idx.numel())}
    entry["signs"] = out.add(f"wq_signs_{name}", pack_bits((sign[idx] > 0).to(torch.uint8), 1), "codes")
    entry["scale"] = out.add(f"wq_rscale_{name}", scale.detach().float()[idx].reshape(-1), "wmeta")
    return entry


def _latent_for_quantizer(layer: QuantLayer) -> Tensor:
    """What ``QuantLayer.quantized_weight`` hands the weight quantizer: ``(W_base + B A) · s``, fp32."""
    w = layer.latent_weight().detach()
    if layer.smooth_scale is not None:
        w = layer._scale_weight(w.float(), layer.smooth_scale)
    return w.float()


def _check_initialized(name: str, module: nn.Module | None, what: str) -> None:
    if module is not None and hasattr(module, "initialized") and not bool(module.initialized):
        raise ValueError(f"layer {name!r}: the {what} ({type(module).__name__}) was never initialised "
                         "(run calibrate(...) or load a trained checkpoint before exporting)")


@torch.no_grad()
def encode_weight(layer: QuantLayer, out: _LayerTensors, name: str = "?", fp_dtype: torch.dtype = torch.float32) -> dict:
    """Quantize the layer's latent weight with its learned quantizer into packed codes (added to
    ``out``); returns the weight's quant-map entry. ``name`` is used in error messages; ``fp_dtype``
    is the dtype of a weight without weight quantizer (activation-only layer)."""
    wq = layer.weight_quantizer
    shape = [int(d) for d in layer.weight.shape]
    numel = math.prod(shape)
    w = _latent_for_quantizer(layer)
    if wq is None:  # activation-only layer: the (smoothed) latent weight stays FP
        return {"format": "fp", "shape": shape, "numel": numel, "tensor": out.add("wq_fp_weight", w.to(fp_dtype), "fp")}
    _check_initialized(name, wq, "weight quantizer")
    for sub in getattr(wq, "quantizers", []):
        _check_initialized(name, sub, "weight quantizer")
    try:
        if isinstance(wq, UniformQuantizer):
            rows = _rows_view(w, wq.granularity, wq.group_size)
            seg, _ = _encode_segment(out, "w", rows, wq, None, None)
            return {"format": "uniform", "shape": shape, "numel": numel, "granularity": wq.granularity,
                    "group_size": wq.group_size, "rows": int(rows.shape[0]), "row_len": int(rows.shape[1]),
                    "class_ids": None, "segments": [seg], "residuals": []}
        if not isinstance(wq, MixedQuantizerBase):
            raise ValueError(f"unsupported weight quantizer {type(wq).__name__}")
        rows = w.reshape(shape[0], -1)
        gid = wq.group_id.to(rows.device)
        entry = {"shape": shape, "numel": numel, "granularity": "channel", "group_size": None,
                 "rows": shape[0], "row_len": int(rows.shape[1]),
                 "class_ids": out.add("wq_class_ids", pack_bits(gid, CLASS_ID_BITS), "wmeta"),
                 "segments": [], "residuals": []}
        full = torch.empty_like(rows)

        def segment(seg_name: str, q: UniformQuantizer, classes: list[int]) -> None:
            idx = _rows_of(gid, classes, rows.shape[0], rows.device)
            seg, deq = _encode_segment(out, seg_name, rows[idx], q, idx, classes)
            entry["segments"].append(seg)
            full[idx] = deq

        if isinstance(wq, OMQQuantizer):
            entry["format"] = "omq"
            for c, q in enumerate(wq.quantizers):
                segment(f"c{c}", q, [c])
        elif isinstance(wq, FZRMQQuantizer) and wq.layout == "figure":
            entry["format"] = "fzrmq_figure"
            segment("base", wq.base, [0, 1, 2])
            s1 = _signs(rows - full)
            s2 = _signs(rows - full - wq.b1.detach().float() * s1)
            entry["residuals"].append(_encode_residual(out, "r1", s1, wq.b1, gid, [1, 2]))
            entry["residuals"].append(_encode_residual(out, "r2", s2, wq.b2, gid, [2]))
        elif isinstance(wq, FZRMQQuantizer):
            entry["format"] = "fzrmq_proposal"
            segment("c0", wq.base, [0])
            segment("c12", wq.mid, [1, 2])
            entry["residuals"].append(_encode_residual(out, "r1", _signs(rows - full), wq.b1, gid, [2]))
        else:
            raise ValueError(f"unsupported weight quantizer {type(wq).__name__}")
        return entry
    except ValueError as e:
        raise ValueError(f"layer {name!r}: {e}") from e


def decode_weight(meta: dict, get: Callable[[str], Tensor]) -> Tensor:
    """Dequantised fp32 weight from a quant-map weight entry; ``get(suffix)`` returns a stored tensor.
    Same arithmetic, in the same order, as the fake-quantized forward of each quantizer."""
    shape = tuple(meta["shape"])
    if meta["format"] == "fp":
        return get(meta["tensor"]).float().view(shape)
    rows, k = meta["rows"], meta["row_len"]
    device = get(meta["segments"][0]["codes"]).device
    class_ids = None
    if meta["class_ids"] is not None:
        class_ids = unpack_bits(get(meta["class_ids"]), CLASS_ID_BITS, rows).long()
    out = torch.zeros(rows, k, device=device)
    for seg in meta["segments"]:
        idx = _rows_of(class_ids, seg["classes"], rows, device)
        n = seg["rows"]
        codes = unpack_bits(get(seg["codes"]), seg["bits"], n * k).view(n, k)
        scale = get(seg["scale"]).float().view(n, 1)
        if seg["zero_format"] == "none":
            zero = torch.zeros(n, 1, device=device)
        elif seg["zero_format"] == "packed":
            zero = unpack_bits(get(seg["zero"]), seg["bits"], n).float().view(n, 1) + seg["qmin"]
        else:
            zero = get(seg["zero"]).float().view(n, 1)
        vals = (codes.float() + seg["qmin"] - zero) * scale
        if seg["classes"] is None:
            out = vals
        else:
            out[idx] = vals
    for res in meta["residuals"]:  # Ŵ + m ⊙ (b · sign R), in the forward's order
        idx = _rows_of(class_ids, res["classes"], rows, device)
        n = res["rows"]
        sign = torch.ones(rows, k, device=device)
        sign[idx] = unpack_bits(get(res["signs"]), 1, n * k).view(n, k).float() * 2 - 1
        b = torch.zeros(rows, 1, device=device)
        b[idx] = get(res["scale"]).float().view(n, 1)
        mask = torch.isin(class_ids, torch.tensor(res["classes"], device=device)).float().unsqueeze(1)
        out = out + mask * (b * sign)
    return out.reshape(shape)


# ---------------------------------------------------------------------------------------------
# Layer export (everything but the weight)
# ---------------------------------------------------------------------------------------------

_LAYER_KIND = {QuantLinear: "linear", QuantConv1d: "conv1d", QuantConv2d: "conv2d", QuantConv3d: "conv3d"}
_CONV_ATTRS = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups", "padding_mode")


def _geometry(layer: nn.Module) -> dict:
    if isinstance(layer, (QuantLinear, nn.Linear)):
        return {"in_features": layer.in_features, "out_features": layer.out_features}
    return {a: (list(v) if isinstance(v, tuple) else v) for a in _CONV_ATTRS for v in [getattr(layer, a)]}


def _act_entry(aq: nn.Module | None) -> dict | None:
    if aq is None:
        return None
    if isinstance(aq, TimestepActQuantizer):
        return {"kind": "timestep", "bits": aq.bits, "symmetric": aq.symmetric, "num_steps": aq.num_steps,
                "init": aq.init_method}
    if isinstance(aq, DynamicTokenQuantizer):
        return {"kind": "dynamic_token", "bits": aq.bits, "share_batch": aq.share_batch, "eps": aq.eps,
                "channel_dim": aq.channel_dim, "token_layout": aq.token_layout, "num_frames": aq.num_frames,
                "tokens_per_frame": aq.tokens_per_frame}
    if isinstance(aq, UniformQuantizer):
        return {"kind": "static", "bits": aq.bits, "symmetric": aq.symmetric, "granularity": aq.granularity,
                "group_size": aq.group_size, "rows": int(aq.scale.shape[0])}
    raise ValueError(f"unsupported activation quantizer {type(aq).__name__}")


def build_act_quantizer(entry: dict | None) -> nn.Module | None:
    """The activation quantizer module described by a quant-map entry (state filled by the loader)."""
    if entry is None:
        return None
    if entry["kind"] == "timestep":
        return TimestepActQuantizer(entry["bits"], entry["num_steps"], entry["symmetric"], entry.get("init", "lp"))
    if entry["kind"] == "dynamic_token":
        return DynamicTokenQuantizer(entry["bits"], entry["share_batch"], entry["eps"], entry["channel_dim"],
                                     entry.get("token_layout"), entry.get("num_frames"), entry.get("tokens_per_frame"))
    q = UniformQuantizer(entry["bits"], entry["symmetric"], entry["granularity"], entry["group_size"])
    q.scale = nn.Parameter(torch.ones(entry["rows"], 1))
    q.zero_point = nn.Parameter(torch.zeros(entry["rows"], 1))
    return q


@torch.no_grad()
def export_layer(layer: QuantLayer, name: str, fp_dtype: torch.dtype, check: bool = True) -> tuple[dict, dict[str, Tensor]]:
    """Quant-map entry and tensors (state-dict suffix → tensor) of one quantized layer."""
    kind = next((k for cls, k in _LAYER_KIND.items() if isinstance(layer, cls)), None)
    if kind is None:
        raise ValueError(f"layer {name!r}: unsupported quantized layer type {type(layer).__name__}")
    _check_initialized(name, layer.act_quantizer, "activation quantizer")
    out = _LayerTensors()
    weight = encode_weight(layer, out, name, fp_dtype)
    if check and weight["format"] != "fp":
        was = layer.weight_quant
        layer.weight_quant = True
        try:
            ref = layer.quantized_weight().detach().float()
        finally:
            layer.weight_quant = was
        if not torch.equal(decode_weight(weight, out.tensors.__getitem__), ref):
            raise RuntimeError(f"layer {name!r}: the packed weight does not dequantise to the fake-quant weight "
                               "(exporter bug; please report)")
    entry: dict[str, Any] = {"kind": kind, "module": _geometry(layer), "weight": weight}
    if layer.bias is not None:
        out.add("bias", layer.bias.to(fp_dtype), "fp")
    entry["bias"] = layer.bias is not None
    entry["smooth"] = layer.smooth_scale is not None
    if layer.smooth_scale is not None:
        out.add("smooth_scale", layer.smooth_scale.float(), "ameta")
    entry["act"] = _act_entry(layer.act_quantizer)
    if layer.act_quantizer is not None:
        for k, v in layer.act_quantizer.state_dict().items():
            out.add(f"act_quantizer.{k}", v.float() if v.is_floating_point() else v.clone(), "ameta")
    entry["lora"] = None
    if layer.lora is not None and layer.lora_placement == "fp_branch":
        entry["lora"] = {"rank": layer.lora.rank, "param": layer.lora.param}
        for k, v in layer.lora.state_dict().items():
            out.add(f"lora.{k}", v.to(fp_dtype), "side")
    entry["tqe"] = None
    for cname, corr in layer.corrections.items():
        if not isinstance(corr, TQE) or cname != "tqe":
            raise ValueError(f"layer {name!r}: unsupported output correction {cname!r} ({type(corr).__name__})")
        entry["tqe"] = {"rank": corr.rank, "frame_mode": corr.frame_mode, "token_layout": corr.token_layout,
                        "num_frames": corr.num_frames}
        for k, v in corr.state_dict().items():
            out.add(f"corrections.tqe.{k}", v.to(fp_dtype), "side")
    entry["tensors"] = {
        f"{name}.{suffix}": {"role": out.roles[suffix], "dtype": _dtype_name(t.dtype), "shape": list(t.shape)}
        for suffix, t in out.tensors.items()
    }
    return entry, {f"{name}.{s}": t for s, t in out.tensors.items()}


# ---------------------------------------------------------------------------------------------
# Reference modules of the loaded model
# ---------------------------------------------------------------------------------------------


class PackedLayer(nn.Module):
    """Reference dequantising layer: packed codes as buffers, dequantised once to an fp32 weight
    (cached per device), then the student's quantized forward: ``Q_a(X / s) · Ŵᵀ + b`` plus the
    fp_branch LoRA and TQE terms."""

    channel_dim: int = 1

    def _setup(self, name: str, entry: dict) -> None:
        self.layer_name, self.meta = name, entry["weight"]
        self.weight_shape = tuple(self.meta["shape"])
        prefix = name + "."
        for key, spec in entry["tensors"].items():
            suffix = key[len(prefix):]
            if suffix.startswith("wq_"):
                self.register_buffer(suffix, torch.empty(spec["shape"], dtype=getattr(torch, spec["dtype"])))
        self.bias = nn.Parameter(torch.empty(self.weight_shape[0]), requires_grad=False) if entry["bias"] else None
        self.register_buffer("smooth_scale", torch.ones(self.weight_shape[1]) if entry["smooth"] else None)
        self.act_quantizer = build_act_quantizer(entry["act"])
        lora = entry.get("lora")
        self.lora = LoRA(torch.Size(self.weight_shape), lora["rank"], lora["param"]) if lora else None
        self.lora_placement = "fp_branch"
        self.corrections = nn.ModuleDict()
        t = entry.get("tqe")
        if t is not None:
            self.corrections["tqe"] = TQE(self.weight_shape, t["rank"], t["frame_mode"], t["token_layout"], t["num_frames"])
        self.act_quant = True
        self._cache: Tensor | None = None

    def _apply(self, fn, recurse=True):  # .to() / .cuda(): drop the cached weight
        self._cache = None
        return super()._apply(fn, recurse)

    def dequantized_weight(self) -> Tensor:
        """The fp32 weight ``Ŵ`` (smoothed space) decoded from the packed buffers."""
        return decode_weight(self.meta, lambda s: getattr(self, s))

    @property
    def weight(self) -> Tensor:
        if self._cache is None:
            with torch.no_grad():
                self._cache = self.dequantized_weight()
        return self._cache

    def _bcast_in(self, s: Tensor, ndim: int) -> Tensor:
        return s if self.channel_dim == -1 else s.view(-1, *([1] * (ndim - 2)))

    def forward(self, x: Tensor) -> Tensor:
        xs = x
        if self.smooth_scale is not None:
            xs = x / self._bcast_in(self.smooth_scale, x.dim()).to(x.dtype)
        xq = self.act_quantizer(xs) if (self.act_quant and self.act_quantizer is not None) else xs
        xq = xq.to(x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        w, branches = fold_corrections(self.corrections, self.weight, x)  # as the QuantLayer does
        y = self._op(xq, w.to(x.dtype), bias)
        if self.lora is not None:
            y = y + self._op(x, self.lora.delta().to(x.dtype), None)
        for corr in branches:
            y = y + corr(xq, self)
        return y

    def extra_repr(self) -> str:
        segs = "/".join(str(s["bits"]) for s in self.meta.get("segments", []))
        return f"format={self.meta['format']}, shape={self.weight_shape}, bits={segs or 'fp'}"


class PackedLinear(PackedLayer):
    channel_dim = -1

    def __init__(self, name: str, entry: dict, module: nn.Linear | None = None) -> None:
        super().__init__()
        geo = entry["module"]
        self.in_features, self.out_features = geo["in_features"], geo["out_features"]
        self._setup(name, entry)

    def _op(self, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        return F.linear(x, w, b)


class _PackedConvNd(PackedLayer):
    _conv_fn = None

    def __init__(self, name: str, entry: dict, module: nn.Module) -> None:
        super().__init__()
        for attr in _CONV_ATTRS + ("_reversed_padding_repeated_twice",):
            setattr(self, attr, getattr(module, attr))
        self._setup(name, entry)

    def _op(self, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        fn = type(self)._conv_fn
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return fn(x, w, b, self.stride, 0, self.dilation, self.groups)
        return fn(x, w, b, self.stride, self.padding, self.dilation, self.groups)


class PackedConv1d(_PackedConvNd):
    _conv_fn = staticmethod(F.conv1d)


class PackedConv2d(_PackedConvNd):
    _conv_fn = staticmethod(F.conv2d)


class PackedConv3d(_PackedConvNd):
    _conv_fn = staticmethod(F.conv3d)


PACKED_TYPES = {"linear": (nn.Linear, PackedLinear), "conv1d": (nn.Conv1d, PackedConv1d),
                "conv2d": (nn.Conv2d, PackedConv2d), "conv3d": (nn.Conv3d, PackedConv3d)}


# ---------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------


def _jsonable(value: Any, where: str) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v, where) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, where) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise ValueError(f"{where}: {value!r} ({type(value).__name__}) cannot be written to {MODEL_FILE}")


def _model_description(root: nn.Module, name: str | None, kwargs: dict | None, sampler: dict | None = None) -> dict:
    """``model.json``: registry name + builder kwargs with weight-file arguments dropped (a diffusers
    backbone loaded from a folder is rebuilt from its config), and the ``sampler`` the model was
    trained on (its activation step tables belong to that sampler's steps) where known."""
    extra = {"sampler": _jsonable(dict(sampler), "sampler")} if sampler else {}
    if name is None:
        return {"format": FORMAT, "kind": "module", "class": f"{type(root).__module__}.{type(root).__qualname__}", **extra}
    kwargs = dict(kwargs or {})
    had_path = kwargs.get("path") is not None
    for key in _WEIGHT_ARGS:
        kwargs.pop(key, None)
    backbone = getattr(root, "backbone", root)
    if had_path and hasattr(backbone, "config"):  # diffusers: the config instead of the weight folder
        kwargs["config"] = {k: v for k, v in dict(backbone.config).items() if not k.startswith("_")}
        if hasattr(root, "default_scheduler"):
            kwargs["default_scheduler"] = root.default_scheduler
    return {"format": FORMAT, "kind": "registry", "name": name, "kwargs": _jsonable(kwargs, "model kwargs"), **extra}


def _resolve_model(model: nn.Module, name: str | None, kwargs: dict | None) -> tuple[nn.Module, str | None, dict | None]:
    """QATModule → its student Denoiser and registry name / kwargs from its hparams."""
    student = getattr(model, "student", None)
    hparams = getattr(model, "hparams", None)
    if isinstance(student, nn.Module) and hparams is not None and "model" in hparams:
        return student, name or hparams["model"], kwargs if kwargs is not None else hparams.get("model_kwargs")
    return model, name, kwargs


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(folder: str | os.PathLike) -> dict:
    """(Re)write ``manifest.json`` with the sha256 and size of the export's files."""
    folder = Path(folder)
    files = {f: {"sha256": _sha256(folder / f), "bytes": (folder / f).stat().st_size} for f in HASHED_FILES}
    manifest = {"format": FORMAT, "files": files}
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1))
    return manifest


@torch.no_grad()
def export_quantized(
    model: nn.Module,
    out_dir: str | os.PathLike,
    *,
    fp_dtype: str = "bf16",
    overwrite: bool = False,
    model_name: str | None = None,
    model_kwargs: dict | None = None,
    check: bool = True,
    sampler: dict | None = None,
) -> Path:
    """Export a fake-quantized model (a ``QATModule``, its student ``Denoiser``, or any module with
    ``QuantLayer`` s) to ``out_dir`` as bit-packed safetensors + quant map (module docstring).

    ``model_name`` / ``model_kwargs``: registry entry to rebuild the backbone at load time (taken
    from a QATModule's hparams); without one, :func:`load_quantized` needs ``model=`` (an FP skeleton).
    ``fp_dtype``: ``bf16`` (size) | ``fp16`` | ``fp32`` (exact reload of the whole model).
    ``check``: verify that every packed weight dequantises to the student's fake-quant weight.
    ``sampler``: the sampler the model was trained on, as a Denoiser's ``default_scheduler`` (``name``,
    ``config``, ``num_inference_steps``, ``guidance_scale``, ``eta``; by default a QATModule's
    ``trained_sampler``, from its checkpoint),
    written to ``model.json``; :func:`load_quantized` makes it the Denoiser's ``default_scheduler``.
    Refuses an existing ``out_dir`` unless ``overwrite``; writes atomically.
    """
    if fp_dtype not in FP_DTYPES:
        raise ValueError(f"fp_dtype must be one of {sorted(FP_DTYPES)}, got {fp_dtype!r}")
    out = Path(out_dir)
    _recover_interrupted(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass overwrite=True (--overwrite) to replace it")
    sampler = sampler if sampler is not None else getattr(model, "trained_sampler", None)
    root, name, kwargs = _resolve_model(model, model_name, model_kwargs)
    dtype = FP_DTYPES[fp_dtype]
    layers = {n: m for n, m in root.named_modules() if isinstance(m, QuantLayer)}
    if not layers:
        raise ValueError(f"{type(root).__name__} has no quantized layers (run quantize_model + calibrate first)")
    tensors: dict[str, Tensor] = {}
    quant_layers: dict[str, dict] = {}
    for lname, layer in layers.items():  # everything is encoded (and checked) before anything is written
        entry, ts = export_layer(layer, lname, dtype, check)
        quant_layers[lname] = entry
        tensors.update(ts)
    fp_tensors: dict[str, dict] = {}
    for key, value in root.state_dict().items():
        if any(p in layers for p in _prefixes(key.rpartition(".")[0])):
            continue  # exported with its layer
        t = value.detach().to(dtype) if value.is_floating_point() else value.detach()
        tensors[key] = t.contiguous().clone() if t.data_ptr() == value.data_ptr() else t.contiguous()
        fp_tensors[key] = {"role": "fp", "dtype": _dtype_name(t.dtype), "shape": list(t.shape)}
    quant_map = {"format": FORMAT, "fp_dtype": fp_dtype, "torch": torch.__version__, "layers": quant_layers,
                 "fp_tensors": fp_tensors}
    description = _model_description(root, name, kwargs, sampler)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
    try:
        from safetensors.torch import save_file

        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": FORMAT})
        (tmp / QUANT_MAP_FILE).write_text(json.dumps(quant_map, indent=1))
        (tmp / MODEL_FILE).write_text(json.dumps(description, indent=1))
        write_manifest(tmp)
        ordinary_permissions(tmp)  # mkdtemp's folder and save_file's weights are private (0700 / 0600)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


def _recover_interrupted(out: Path) -> None:
    """Clean up after an export killed mid-way: the hidden build folders of dead processes go, and a
    previous export moved aside by an interrupted ``overwrite`` (``out`` missing) is put back."""
    if not out.parent.is_dir():
        return
    for tmp in out.parent.glob(f".{out.name}.tmp-*"):
        pid = tmp.name[len(f".{out.name}.tmp-"):].split("-", 1)[0]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)
    olds = sorted(out.parent.glob(f".{out.name}.old-*"), key=lambda p: p.stat().st_mtime)
    if olds and not out.exists():
        os.rename(olds.pop(), out)
    if out.exists():
        for old in olds:
            shutil.rmtree(old, ignore_errors=True)


def _prefixes(name: str) -> Iterator[str]:
    """``a.b.c`` → ``a``, ``a.b``, ``a.b.c``."""
    parts = name.split(".") if name else []
    for i in range(1, len(parts) + 1):
        yield ".".join(parts[:i])


# ---------------------------------------------------------------------------------------------
# Reading and verification
# ---------------------------------------------------------------------------------------------


def read_safetensors_header(path: str | os.PathLike) -> dict[str, dict]:
    """``{name: {"dtype", "shape", "nbytes"}}`` from a safetensors header (no tensor is read);
    raises :class:`ExportFormatError` naming the file when it is truncated or malformed."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ExportFormatError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        (n,) = struct.unpack("<Q", raw)
        if 8 + n > size:
            raise ExportFormatError(f"{path}: truncated safetensors file (header of {n} bytes, file of {size})")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ExportFormatError(f"{path}: malformed safetensors header ({e})") from None
    header.pop("__metadata__", None)
    end = max((v["data_offsets"][1] for v in header.values()), default=0)
    if 8 + n + end > size:
        raise ExportFormatError(f"{path}: truncated safetensors file ({size} bytes, tensors need {8 + n + end})")
    return {k: {"dtype": v["dtype"], "shape": v["shape"], "nbytes": v["data_offsets"][1] - v["data_offsets"][0]}
            for k, v in header.items()}


_ST_DTYPES = {"U8": "uint8", "I8": "int8", "I16": "int16", "I32": "int32", "I64": "int64", "F16": "float16",
              "BF16": "bfloat16", "F32": "float32", "F64": "float64", "BOOL": "bool"}


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise ExportFormatError(f"{path}: missing from the export folder")
    try:
        return json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ExportFormatError(f"{path}: not valid JSON ({e})") from None


def verify_export(folder: str | os.PathLike, checksums: bool = True) -> tuple[dict, dict, dict[str, dict]]:
    """Check an export folder: every file present, sizes and sha256 as in the manifest (``checksums``),
    a complete safetensors file, and every tensor the quant map names present with its dtype and
    shape. Returns (quant_map, model description, safetensors header)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ExportFormatError(f"{folder}: not an export folder (does not exist)")
    manifest = _read_json(folder / MANIFEST_FILE)
    if manifest.get("format") != FORMAT:
        raise ExportFormatError(f"{folder / MANIFEST_FILE}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    for fname in HASHED_FILES:
        path, want = folder / fname, (manifest.get("files") or {}).get(fname)
        if not path.is_file():
            raise ExportFormatError(f"{path}: missing from the export folder")
        if want is None:
            raise ExportFormatError(f"{folder / MANIFEST_FILE}: has no entry for {fname}")
        if checksums:
            size = path.stat().st_size
            if size != want["bytes"]:
                kind = "truncated or modified" if size < want["bytes"] else "modified"
                raise ExportFormatError(f"{path}: {kind} ({size} bytes, {MANIFEST_FILE} says {want['bytes']})")
            if _sha256(path) != want["sha256"]:
                raise ExportFormatError(f"{path}: sha256 checksum mismatch with {MANIFEST_FILE} (corrupted or edited)")
    header = read_safetensors_header(folder / WEIGHTS_FILE)
    quant_map = _read_json(folder / QUANT_MAP_FILE)
    description = _read_json(folder / MODEL_FILE)
    expected = dict(quant_map.get("fp_tensors", {}))
    for lname, entry in quant_map.get("layers", {}).items():
        for key, spec in entry["tensors"].items():
            expected[key] = {**spec, "layer": lname}
    for key, spec in expected.items():
        where = f"layer {spec['layer']!r}" if "layer" in spec else "FP parameters"
        got = header.get(key)
        if got is None:
            raise ExportFormatError(f"{folder / QUANT_MAP_FILE} references tensor {key!r} ({where}) that "
                                    f"{folder / WEIGHTS_FILE} does not contain")
        if _ST_DTYPES.get(got["dtype"], got["dtype"]) != spec["dtype"] or list(got["shape"]) != list(spec["shape"]):
            raise ExportFormatError(f"{folder / WEIGHTS_FILE}: tensor {key!r} is {got['dtype']}{got['shape']}, "
                                    f"{QUANT_MAP_FILE} says {spec['dtype']}{spec['shape']}")
    extra = sorted(set(header) - set(expected))
    if extra:
        raise ExportFormatError(f"{folder / WEIGHTS_FILE}: tensors {extra[:5]} are not in {QUANT_MAP_FILE}")
    return quant_map, description, header


# ---------------------------------------------------------------------------------------------
# Load
# ---------------------------------------------------------------------------------------------

_INIT_FNS = ("uniform_", "normal_", "trunc_normal_", "xavier_uniform_", "xavier_normal_", "kaiming_uniform_",
             "kaiming_normal_", "constant_", "zeros_", "ones_", "orthogonal_", "eye_", "dirac_", "sparse_")


@contextlib.contextmanager
def skip_init() -> Iterator[None]:
    """Make ``torch.nn.init`` fills no-ops while a skeleton is built (its tensors are overwritten)."""
    saved = {n: getattr(nn.init, n) for n in _INIT_FNS if hasattr(nn.init, n)}
    try:
        for n in saved:
            setattr(nn.init, n, lambda tensor, *a, **k: tensor)
        yield
    finally:
        for n, fn in saved.items():
            setattr(nn.init, n, fn)


def _build_skeleton(description: dict, folder: Path) -> nn.Module:
    if description.get("kind") != "registry":
        raise ValueError(f"{folder / MODEL_FILE} describes a {description.get('class')} without a registry name: "
                         "pass model=<an instance of the same architecture> to load_quantized")
    from mpq_lightning.models import build

    with skip_init():
        return build(description["name"], **description.get("kwargs", {}))


@torch.no_grad()
def load_quantized(
    folder: str | os.PathLike,
    device: str | torch.device = "cpu",
    *,
    model: nn.Module | None = None,
    act_quant: bool = True,
    checksums: bool = True,
) -> nn.Module:
    """Rebuild an exported model: the backbone from ``model.json`` (registry build with ``nn.init``
    skipped; or ``model``, an FP instance of the same architecture, filled in place), every quantized
    layer replaced by a :class:`PackedLayer` (codes unpacked and dequantised once), all other tensors
    from ``model.safetensors``. Returns the Denoiser (registry exports) or ``model``, in eval mode on
    ``device``; a Denoiser's ``default_scheduler`` becomes the sampler it was trained on where the
    export records one (``sample(model, None, noise, ...)`` then uses it; its ``guidance_scale`` is
    for the caller to pass). ``act_quant=False`` turns the activation quantizers off."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    quant_map, description, _ = verify_export(folder, checksums)
    root = model if model is not None else _build_skeleton(description, folder)
    for lname, entry in quant_map["layers"].items():
        parent_name, _, child = lname.rpartition(".")
        try:
            parent = root.get_submodule(parent_name) if parent_name else root
            old = getattr(parent, child)
        except AttributeError:
            raise ExportFormatError(f"{folder / QUANT_MAP_FILE}: layer {lname!r} does not exist in the rebuilt "
                                    f"{type(root).__name__}") from None
        fp_cls, packed_cls = PACKED_TYPES[entry["kind"]]
        if not isinstance(old, (fp_cls, PackedLayer, QuantLayer)):
            raise ExportFormatError(f"{folder / QUANT_MAP_FILE}: layer {lname!r} is a {entry['kind']} but the rebuilt "
                                    f"model has a {type(old).__name__}")
        geo = _geometry(old) if isinstance(old, fp_cls) else entry["module"]
        if geo != entry["module"]:
            raise ExportFormatError(f"{folder / QUANT_MAP_FILE}: layer {lname!r} has geometry {entry['module']}, the "
                                    f"rebuilt model {geo}")
        setattr(parent, child, packed_cls(lname, entry, old))
    try:
        state = load_file(str(folder / WEIGHTS_FILE))
    except SafetensorError as e:
        raise ExportFormatError(f"{folder / WEIGHTS_FILE}: cannot be read ({e})") from None
    missing, unexpected = root.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ExportFormatError(f"{folder / WEIGHTS_FILE} does not match the rebuilt model: missing {missing[:5]}, "
                                f"unexpected {unexpected[:5]}")
    for m in root.modules():
        if isinstance(m, PackedLayer):
            m.act_quant = act_quant
    if description.get("sampler") and hasattr(root, "default_scheduler"):  # the sampler the tables belong to
        root.default_scheduler = dict(description["sampler"])
    return root.to(device).eval()


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def export_report(folder: str | os.PathLike) -> dict:
    """Bytes on disk by role (codes, weight metadata, activation metadata, FP side branches, FP
    parameters), per layer and in total, bits per weight, and the size against the model in bf16
    (quantized weights + FP parameters at 2 bytes each). Reads only headers and JSON files."""
    folder = Path(folder)
    quant_map, _, header = verify_export(folder, checksums=False)
    nbytes = {k: v["nbytes"] for k, v in header.items()}
    rows = []
    tot = dict.fromkeys(ROLES, 0)
    weight_numel = 0
    for lname, entry in quant_map["layers"].items():
        by_role = dict.fromkeys(ROLES, 0)
        for key, spec in entry["tensors"].items():
            by_role[spec["role"]] += nbytes[key]
        w = entry["weight"]
        numel = w["numel"]
        if w["format"] == "fp":  # activation-only layer: its FP weight counts as its weight bits
            fp_w = nbytes[f"{lname}.{w['tensor']}"]
            by_role["codes"], by_role["fp"] = by_role["codes"] + fp_w, by_role["fp"] - fp_w
        weight_numel += numel
        for r in ROLES:
            tot[r] += by_role[r]
        rows.append({
            "name": lname, "kind": entry["kind"], "format": w["format"], "numel": numel,
            "bits": [s["bits"] for s in w.get("segments", [])],
            "rows_per_segment": [s["rows"] for s in w.get("segments", [])],
            "residual_rows": [r["rows"] for r in w.get("residuals", [])],
            **{f"{r}_bytes": by_role[r] for r in ROLES},
            "quantized_bytes": by_role["codes"] + by_role["wmeta"],
            "bits_per_weight": 8 * by_role["codes"] / numel,
            "bits_per_weight_with_metadata": 8 * (by_role["codes"] + by_role["wmeta"]) / numel,
            "bf16_bytes": 2 * numel,
        })
    fp_bytes = sum(nbytes[k] for k in quant_map["fp_tensors"])
    tot["fp"] += fp_bytes
    fp_numel = sum(math.prod(s["shape"]) for k, s in quant_map["fp_tensors"].items()
                   if s["dtype"] in ("float32", "bfloat16", "float16", "float64"))
    fp_numel += sum(math.prod(s["shape"]) for e in quant_map["layers"].values()
                    for k, s in e["tensors"].items() if s["role"] == "fp" and ".wq_" not in k)
    files = {f: (folder / f).stat().st_size for f in HASHED_FILES + (MANIFEST_FILE,)}
    disk = sum(files.values())
    quantized = tot["codes"] + tot["wmeta"]
    bf16 = 2 * (weight_numel + fp_numel)
    return {
        "folder": str(folder), "fp_dtype": quant_map["fp_dtype"], "layers": rows,
        "totals": {
            **{f"{r}_bytes": tot[r] for r in ROLES},
            "layers": len(rows), "quantized_weights": weight_numel, "fp_params": fp_numel,
            "quantized_bytes": quantized, "quantized_bf16_bytes": 2 * weight_numel,
            "quantized_vs_bf16": quantized / max(1, 2 * weight_numel),
            "bits_per_weight": 8 * tot["codes"] / max(1, weight_numel),
            "bits_per_weight_with_metadata": 8 * quantized / max(1, weight_numel),
            "metadata_share_of_quantized": (tot["wmeta"] + tot["ameta"]) / max(1, quantized + tot["ameta"]),
            "metadata_share_of_disk": (tot["wmeta"] + tot["ameta"]) / max(1, disk),
            "header_and_json_bytes": disk - sum(nbytes.values()),
            "files": files, "disk_bytes": disk, "bf16_model_bytes": bf16, "disk_vs_bf16": disk / max(1, bf16),
        },
    }


def _mib(n: int) -> str:
    return f"{n / 2**20:.3f}"


def _bits_label(row: dict) -> str:
    """``2``, ``2/4`` (mixed segments), ``2+1`` (with one non-empty binary residual branch), ``fp``."""
    bits = "/".join(map(str, row["bits"])) or "fp"
    residuals = sum(1 for n in row.get("residual_rows", []) if n)
    return f"{bits}+{residuals}" if residuals else bits


def print_export_report(report: dict, layers: bool = False, console=None) -> None:
    """:func:`export_report` for a terminal of 80 columns: one row per weight format and bit setting
    (``layers=True``: one per layer), then the totals by role. Every number is in the report dict."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    rows = report["layers"]
    prefix = "backbone." if rows and all(r["name"].startswith("backbone.") for r in rows) else ""
    groups: dict[tuple[str, ...], list[dict]] = {}
    for r in rows:
        key = (r["name"][len(prefix):], r["format"]) if layers else (r["format"], _bits_label(r))
        groups.setdefault(key, []).append(r)
    title = f"{prefix}<layer>" if layers and prefix else "each layer" if layers else "by weight format and bits"
    # one row per layer: long names (blocks.27.cross_attn.kv_linear), so no vertical rules between columns
    table = Table(title=f"export {report['folder']}: {title}",
                  **({"box": box.SIMPLE_HEAD, "pad_edge": False, "collapse_padding": True} if layers else {}))
    for col in ("layer", "format") if layers else ("format", "bits", "layers"):
        table.add_column(col, justify="right" if col == "layers" else "left", overflow="fold")
    for col in ("weights", "bits/w", "+ meta", "KiB"):
        table.add_column(col, justify="right")
    for key, members in groups.items():
        numel = sum(r["numel"] for r in members)
        codes, wmeta = sum(r["codes_bytes"] for r in members), sum(r["wmeta_bytes"] for r in members)
        kib = sum(r["codes_bytes"] + r["wmeta_bytes"] + r["ameta_bytes"] + r["side_bytes"] for r in members) / 1024
        names = list(key) if layers else [*key, str(len(members))]
        table.add_row(*names, str(numel), f"{8 * codes / numel:.3f}", f"{8 * (codes + wmeta) / numel:.3f}", f"{kib:.1f}")
    console.print(table)
    t = report["totals"]
    console.print(
        f"{t['layers']} quantized layers, {t['quantized_weights']} weights: {t['bits_per_weight']:.3f} bits/w, "
        f"{t['bits_per_weight_with_metadata']:.3f} with their metadata (bits: per segment, a/b mixed, +n binary "
        f"residual branches; bits/w: codes; + meta: with the weights' steps and zero points; KiB: codes, weight "
        f"and activation metadata, FP side branches)\n"
        f"quantized weights {_mib(t['quantized_bytes'])} MiB vs {_mib(t['quantized_bf16_bytes'])} MiB in bf16 "
        f"({t['quantized_vs_bf16']:.4f}x)\n"
        f"on disk {_mib(t['disk_bytes'])} MiB vs the bf16 model's {_mib(t['bf16_model_bytes'])} MiB "
        f"({t['disk_vs_bf16']:.4f}x): codes {_mib(t['codes_bytes'])}, weight metadata {_mib(t['wmeta_bytes'])}, "
        f"activation metadata {_mib(t['ameta_bytes'])}, FP side branches {_mib(t['side_bytes'])}, FP parameters "
        f"{_mib(t['fp_bytes'])} ({report['fp_dtype']}), headers and JSON {_mib(t['header_and_json_bytes'])}; "
        f"metadata {100 * t['metadata_share_of_quantized']:.2f}% of the quantized layers",
        highlight=False)
