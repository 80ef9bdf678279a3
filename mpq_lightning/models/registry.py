"""The `Denoiser` interface every backbone is wrapped in, and the registry of backbones by name.

`build("opensora-stdit-xl/2")`, `build("tiny-wan")`, ... return a `Denoiser`: one call signature
`forward(x_t, t, cond, step_index)` for all backbones, plus the facts the quantization methods need
(video or not, frames, tokens per frame, layer kinds and token layouts, feature site, default
FP-kept layers and bit maps, default sampler). All module names it reports (`layer_kind`,
`feature_site`, `default_keep_fp`, `default_bit_map`) are relative to `denoiser.backbone`.
"""

from __future__ import annotations

import fnmatch
import importlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mpq_lightning.models import stdit
from mpq_lightning.quant import step_index_context

__all__ = [
    "LAYER_KINDS",
    "CondSpec",
    "Denoiser",
    "STDiTDenoiser",
    "build",
    "random_cond",
    "list_models",
    "register",
]

# -------------------------------------------------------------------------------------------------
# Vocabulary
# -------------------------------------------------------------------------------------------------

#: Layer kinds a `Denoiser.layer_kind` may return. `token_layouts` maps a kind to the einops layout of
#: that layer's input (letters: b batch, f frames, s tokens per frame, l text tokens, c channels).
#: "self" is full self-attention over all tokens (Wan, DiT, UNet attention), "joint" attention over
#: concatenated text + video tokens (CogVideoX; no einops layout), "temporal_mlp" an MLP applied in
#: the temporal layout (Latte's temporal blocks), "conv" a UNet convolution.
LAYER_KINDS = (
    "spatial",
    "temporal",
    "self",
    "joint",
    "cross_q",
    "cross_kv",
    "cross_proj",
    "mlp",
    "temporal_mlp",
    "conv",
    "other",
)


@dataclass(frozen=True)
class CondSpec:
    """Per-sample shape of one conditioning tensor (None = any size) and its dtype kind."""

    shape: tuple[int | None, ...]
    dtype: str = "float"  # "float" | "long" (class labels) | "mask" (int or bool keep-mask)
    required: bool = True


# -------------------------------------------------------------------------------------------------
# Denoiser
# -------------------------------------------------------------------------------------------------

_QUANTIZABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _matches_any(pattern: str, names: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(n, pattern) for n in names)


class Denoiser(nn.Module):
    """Wraps a backbone as `forward(x_t, t, cond, step_index) -> prediction`.

    x_t is [B, C, F, H, W] for video and [B, C, H, W] for images (channels first, frames second,
    whatever the backbone's own layout); the prediction has `out_channels` channels in the same
    layout. `cond` is a dict of batched tensors described by `cond_spec` (or None when the spec is
    empty). `step_index` (int or LongTensor [B], the position in the sampler's timestep list) is
    handed to every timestep-aware activation quantizer via `step_index_context`.

    Subclasses adapt a backbone by overriding `call_backbone` (and `null_cond` where the backbone
    defines a null condition); a backbone whose forward is `(x, t, **cond)` needs no subclass.
    """

    def __init__(
        self,
        backbone: nn.Module,
        *,
        latent_shape: Sequence[int],
        patch_size: Sequence[int],
        out_channels: int,
        cond_kind: str,
        cond_spec: Mapping[str, CondSpec],
        prediction_type: str,
        default_scheduler: Mapping[str, Any],
        feature_site: str,
        feature_layout: str,
        layer_kinds: Sequence[tuple[str, str]] | Callable[[str], str] = (),
        token_layouts: Mapping[str, str] | None = None,
        tokens_per_frame: int | None = None,
        default_keep_fp: Sequence[str] = (),
        default_bit_map: Mapping[str, Mapping[str, int]] | None = None,
        cfg_channels: int | None = None,
    ) -> None:
        super().__init__()
        if cond_kind not in ("text", "class", "none"):
            raise ValueError(f"cond_kind must be 'text', 'class' or 'none', got {cond_kind!r}")
        if len(patch_size) != len(latent_shape) - 1:
            raise ValueError(
                f"patch_size {tuple(patch_size)} needs one entry per non-channel dim of "
                f"latent_shape {tuple(latent_shape)}"
            )
        self.backbone = backbone
        self.latent_shape = tuple(int(d) for d in latent_shape)
        self.patch_size = tuple(int(p) for p in patch_size)
        self.out_channels = int(out_channels)
        self.cond_kind = cond_kind
        self.cond_spec = dict(cond_spec)
        self.default_scheduler = dict(default_scheduler)
        # the scheduler config (e.g. a pipeline folder's) overrides the model's usual prediction type
        self.prediction_type = self.default_scheduler["config"].get("prediction_type", prediction_type)
        self.feature_site = feature_site
        self.feature_layout = feature_layout
        self._layer_kinds = layer_kinds
        self.tokens_per_frame = tokens_per_frame
        # facts keep only the kinds and patterns that match a layer here (strict pattern checks pass)
        layers = [n for n, m in backbone.named_modules() if isinstance(m, _QUANTIZABLE)]
        kinds = {self.layer_kind(n) for n in layers}
        self.token_layouts = {k: v for k, v in (token_layouts or {}).items() if k in kinds}
        self.default_keep_fp = [p for p in default_keep_fp if _matches_any(p, layers)]
        self.default_bit_map = {p: dict(v) for p, v in (default_bit_map or {}).items() if _matches_any(p, layers)}
        self.cfg_channels = cfg_channels
        self._check_latent_shape(self.latent_shape, where="latent_shape")

    # ---- facts ------------------------------------------------------------------------------------

    @property
    def in_channels(self) -> int:
        return self.latent_shape[0]

    @property
    def is_video(self) -> bool:
        return len(self.latent_shape) == 4

    @property
    def num_frames(self) -> int | None:
        """Latent frames (None for images)."""
        return self.latent_shape[1] if self.is_video else None

    @property
    def learned_sigma(self) -> bool:
        """True when the output stacks a learned variance after the prediction (IDDPM style)."""
        return self.out_channels == 2 * self.in_channels

    def layer_kind(self, name: str) -> str:
        """Kind of the module `name` (relative to the backbone; a leading 'backbone.' is ignored)."""
        name = name.removeprefix("backbone.")
        if callable(self._layer_kinds):
            return self._layer_kinds(name)
        for pattern, kind in self._layer_kinds:
            if fnmatch.fnmatchcase(name, pattern):
                return kind
        return "other"

    # ---- forward ----------------------------------------------------------------------------------

    def forward(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor | float | int,
        cond: Mapping[str, torch.Tensor] | None = None,
        step_index: torch.Tensor | int | None = None,
        step_index_host: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """``step_index_host``: the step indices' values on the host (the data modules' batch key of
        that name), so that their range check reads nothing back from the GPU."""
        t, cond = self.validate(x_t, t, cond, step_index)
        x_t, cond, out_dtype = self._to_weight_dtype(x_t, cond)
        if step_index is None:
            out = self.call_backbone(x_t, t, cond)
        else:
            with step_index_context(self.backbone, step_index, host=step_index_host):
                out = self.call_backbone(x_t, t, cond)
        return out if out_dtype is None else out.to(out_dtype)

    def _to_weight_dtype(self, x_t: torch.Tensor, cond: dict[str, torch.Tensor]):
        """``x_t`` and the floating conditions in the weights' dtype where it differs and no autocast
        runs: a strategy that casts the whole module (DeepSpeed under bf16/16-mixed, a ``*-true``
        precision) converts the batch only inside its own forward, and calibration and the sampling
        callbacks call the model outside it. The output comes back in ``x_t``'s dtype then; returns
        (x_t, cond, that dtype or None when nothing was converted)."""
        if not x_t.is_floating_point() or torch.is_autocast_enabled(x_t.device.type):
            return x_t, cond, None
        weight = next((p.dtype for p in self.backbone.parameters() if p.is_floating_point()), x_t.dtype)
        if weight == x_t.dtype:
            return x_t, cond, None
        cond = {k: v.to(weight) if v.is_floating_point() else v for k, v in cond.items()}
        return x_t.to(weight), cond, x_t.dtype

    def call_backbone(self, x_t: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        """Map (x_t [B, C, (F,) H, W], t [B], cond) to the backbone's forward and back."""
        return self.backbone(x_t, t, **cond)

    def null_cond(self, cond: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The unconditional branch for classifier-free guidance, batched like `cond`."""
        raise ValueError(
            f"{type(self).__name__} has no built-in null condition; pass `uncond` explicitly "
            "(e.g. the text encoder's embedding of the empty prompt)"
        )

    # ---- validation -------------------------------------------------------------------------------

    def validate(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor | float | int,
        cond: Mapping[str, torch.Tensor] | None,
        step_index: torch.Tensor | int | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Check all inputs; return t as a [B] tensor and cond as a dict. Raises ValueError."""
        if x_t.ndim != len(self.latent_shape) + 1:
            layout = "[B, C, F, H, W]" if self.is_video else "[B, C, H, W]"
            raise ValueError(f"x_t must be {layout} with per-sample shape {self.latent_shape}, got {tuple(x_t.shape)}")
        self._check_latent_shape(tuple(x_t.shape[1:]), where="x_t")
        batch = x_t.shape[0]
        t = torch.as_tensor(t, device=x_t.device)
        if t.ndim == 0:
            t = t.expand(batch)
        if t.shape != (batch,):
            raise ValueError(f"t must be a scalar or have shape [{batch}], got {tuple(t.shape)}")
        if isinstance(step_index, torch.Tensor) and step_index.shape not in ((), (batch,)):
            raise ValueError(f"step_index must be an int or have shape [{batch}], got {tuple(step_index.shape)}")
        return t, self._check_cond(cond, batch)

    def _check_latent_shape(self, shape: tuple[int, ...], where: str) -> None:
        names = ("channels", "frames", "height", "width") if self.is_video else ("channels", "height", "width")
        if shape[0] != self.latent_shape[0]:
            raise ValueError(f"{where}: expected {self.latent_shape[0]} channels, got {shape[0]} (shape {shape})")
        for name, size, patch in zip(names[1:], shape[1:], self.patch_size):
            if size % patch:
                raise ValueError(
                    f"{where}: {name} {size} is not divisible by {patch} "
                    f"(patch size / total downsampling; shape {shape})"
                )
        if where != "latent_shape" and shape != self.latent_shape:
            dims = ", ".join(f"{n} {g} (expected {e})" for n, g, e in zip(names, shape, self.latent_shape) if g != e)
            raise ValueError(
                f"{where}: per-sample shape {shape} does not match latent_shape {self.latent_shape}: {dims}. "
                "Build the model with latent_shape=... to use another size."
            )

    def _check_cond(self, cond: Mapping[str, torch.Tensor] | None, batch: int) -> dict[str, torch.Tensor]:
        cond = dict(cond or {})
        unknown = sorted(set(cond) - set(self.cond_spec))
        if unknown:
            raise ValueError(f"unknown cond keys {unknown}; expected keys {sorted(self.cond_spec)}")
        for key, spec in self.cond_spec.items():
            if key not in cond:
                if spec.required:
                    raise ValueError(
                        f"missing cond key {key!r} (per-sample shape {spec.shape}); got keys {sorted(cond)}"
                    )
                continue
            value = cond[key]
            if not isinstance(value, torch.Tensor):
                raise ValueError(f"cond[{key!r}] must be a tensor, got {type(value).__name__}")
            got = tuple(value.shape)
            ok = len(got) == len(spec.shape) + 1 and got[0] == batch
            ok = ok and all(e is None or e == g for e, g in zip(spec.shape, got[1:]))
            if not ok:
                expected = ", ".join(["B"] + ["*" if e is None else str(e) for e in spec.shape])
                raise ValueError(f"cond[{key!r}]: expected shape [{expected}] with B={batch}, got {list(got)}")
            if spec.dtype == "long" and value.is_floating_point():
                raise ValueError(f"cond[{key!r}] must be an integer tensor (labels), got {value.dtype}")
            if spec.dtype == "float" and not value.is_floating_point():
                raise ValueError(f"cond[{key!r}] must be a floating-point tensor, got {value.dtype}")
            # a keep-mask row of zeros leaves attention nothing to attend (NaN); checked on the host only
            # (condition files, CPU forwards): on a GPU the check would make the host wait every forward
            empty = ~(value != 0).any(-1) if spec.dtype == "mask" and value.device.type == "cpu" else None
            if empty is not None and bool(empty.any()):
                rows = torch.nonzero(empty).flatten().tolist()
                raise ValueError(f"cond[{key!r}]: rows {rows[:10]} keep no token (all zeros); every mask row "
                                 "needs at least one kept token")
        return cond


# -------------------------------------------------------------------------------------------------
# Registry
# -------------------------------------------------------------------------------------------------

_BUILDERS: dict[str, Callable[..., Denoiser]] = {}


def register(name: str) -> Callable[[Callable[..., Denoiser]], Callable[..., Denoiser]]:
    """Decorator: `@register("my-model")` on a function returning a `Denoiser`."""

    def decorator(builder: Callable[..., Denoiser]) -> Callable[..., Denoiser]:
        if name in _BUILDERS:
            raise ValueError(f"a model named {name!r} is already registered")
        _BUILDERS[name] = builder
        return builder

    return decorator


def list_models() -> list[str]:
    """Names accepted by `build`."""
    return sorted(_BUILDERS)


def random_cond(
    denoiser: Denoiser, batch: int, seed: int = 0, length: int = 8, num_classes: int = 2
) -> dict[str, torch.Tensor]:
    """Random conditioning matching ``denoiser.cond_spec`` (free lengths become ``length``): float
    tensors ~ N(0, 1), masks all ones, labels uniform in [0, num_classes). For random test teachers,
    smoke tests and benchmarks, never for real models."""
    g = torch.Generator().manual_seed(seed)
    cond = {}
    for key, spec in denoiser.cond_spec.items():
        shape = [batch] + [length if d is None else d for d in spec.shape]
        if spec.dtype == "long":
            cond[key] = torch.randint(0, num_classes, shape, generator=g)
        elif spec.dtype == "mask":
            cond[key] = torch.ones(shape, dtype=torch.long)
        else:
            cond[key] = torch.randn(shape, generator=g)
    return cond


def _build_from_factory(name: str, kwargs: dict[str, Any]) -> Denoiser:
    module_name, _, attr = name.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as err:
        raise ValueError(f"model {name!r}: cannot import {attr!r} from {module_name!r} ({err}); a model of your own "
                         "is 'package.module:function', the package importable (PYTHONPATH), the function returning "
                         "a Denoiser") from None
    denoiser = factory(**kwargs)
    if not isinstance(denoiser, Denoiser):
        raise TypeError(f"model {name!r}: {attr}() returned a {type(denoiser).__name__}, not a "
                        "mpq_lightning.models.Denoiser (wrap the backbone in one: see its docstring)")
    return denoiser


def build(name: str, **kwargs: Any) -> Denoiser:
    """Build the registered backbone `name` wrapped in its `Denoiser`; or, for a model of your own,
    `name` = ``"package.module:function"``: that function, imported, called with ``kwargs``, must
    return a `Denoiser` (as `register` builders do, without editing this package).

    ``tiny-*`` models are random test teachers: they take ``seed`` (default 0) so every process
    builds identical weights, and their zero-initialised parameters (e.g. OpenSora's zero output
    layer) are re-drawn with std 0.1 so predictions depend on x, t and the condition.
    """
    if ":" in name and name not in _BUILDERS:
        return _build_from_factory(name, kwargs)
    if name not in _BUILDERS:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(list_models())}, or 'package.module:function' "
                         "for a model of your own (a function returning a Denoiser)")
    if not name.startswith("tiny-"):
        return _BUILDERS[name](**kwargs)
    seed = int(kwargs.pop("seed", 0))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        denoiser = _BUILDERS[name](**kwargs)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for param in denoiser.parameters():
            if param.numel() and not param.any():
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return denoiser


# -------------------------------------------------------------------------------------------------
# OpenSora v1.0 STDiT (opensora_stdit.md; Q-VDiT's model)
# -------------------------------------------------------------------------------------------------

#: IDDPM-100 with CFG 4.0 on the first 3 channels: Q-VDiT's quant config (opensora_stdit.md §6).
STDIT_SCHEDULER = {"name": "iddpm", "config": {}, "num_inference_steps": 100, "guidance_scale": 4.0}


class STDiTDenoiser(Denoiser):
    """OpenSora v1.0 STDiT: cond {"y": [B, 1, L, caption_channels], "mask": [B, L] (optional)}."""

    def __init__(self, backbone: stdit.STDiT) -> None:
        frames, size = backbone.num_frames, backbone.input_size[1:]
        patch = tuple(backbone.patch_size)
        length, width = backbone.model_max_length, backbone.caption_channels
        super().__init__(
            backbone,
            latent_shape=(backbone.in_channels, frames, *size),
            patch_size=patch,
            out_channels=backbone.out_channels,
            cond_kind="text",
            cond_spec={"y": CondSpec((1, length, width)), "mask": CondSpec((length,), "mask", required=False)},
            prediction_type="epsilon",
            default_scheduler=STDIT_SCHEDULER,
            feature_site=stdit.stdit_feature_site(backbone),
            feature_layout="b (f s) c",
            layer_kinds=stdit.stdit_layer_kind,
            token_layouts=stdit.STDIT_TOKEN_LAYOUTS,
            tokens_per_frame=backbone.tokens_per_frame,
            default_keep_fp=stdit.STDIT_KEEP_FP,
            default_bit_map=stdit.STDIT_MLP_W8A8_BIT_MAP,
            cfg_channels=3,
        )

    def call_backbone(self, x_t: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.backbone(x_t, t, cond["y"], cond.get("mask"))

    def null_cond(self, cond: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The `y_embedding` null caption; the null branch keeps each prompt's mask (§6)."""
        y = cond["y"]
        null = self.backbone.y_embedder.y_embedding.to(y)
        out = {"y": null.expand(y.shape[0], 1, *null.shape).clone()}
        if "mask" in cond:
            out["mask"] = cond["mask"]
        return out


def _stdit_denoiser(model: stdit.STDiT, ckpt_path: str | Path | None) -> STDiTDenoiser:
    if ckpt_path is not None:
        if not Path(ckpt_path).is_file():
            raise ValueError(f"STDiT checkpoint {str(ckpt_path)!r} does not exist")
        stdit.load_official_checkpoint(model, str(ckpt_path))
    return STDiTDenoiser(model)


@register("opensora-stdit-xl/2")
def _build_stdit_xl(
    ckpt_path: str | Path | None = None, config: Mapping[str, Any] | None = None, **kwargs: Any
) -> STDiTDenoiser:
    """STDiT-XL/2 16x512x512 (random weights unless `ckpt_path` is the official .pth); `config` and
    keyword arguments go to the STDiT constructor."""
    return _stdit_denoiser(stdit.STDiT_XL_2(**{**(config or {}), **kwargs}), ckpt_path)


@register("tiny-stdit")
def _build_tiny_stdit(
    ckpt_path: str | Path | None = None, config: Mapping[str, Any] | None = None, **kwargs: Any
) -> STDiTDenoiser:
    """A two-block STDiT for CPU tests; `config` and keyword arguments override its constructor arguments."""
    return _stdit_denoiser(stdit.tiny_stdit(**{**(config or {}), **kwargs}), ckpt_path)


# -------------------------------------------------------------------------------------------------
# Shipped digits teachers (issue 8): trained by us on scikit-learn's digits, weights in mpq_lightning/assets
# -------------------------------------------------------------------------------------------------


class ClassCaptionSTDiTDenoiser(STDiTDenoiser):
    """STDiT conditioned on class ids through fixed caption-token tables (cross-attention path):
    cond {"class_labels": [B]}; label ``num_classes`` is the null caption (STDiT's ``y_embedding``)."""

    def __init__(self, backbone: stdit.STDiT, class_embeddings: torch.Tensor, class_mask: torch.Tensor,
                 default_scheduler: Mapping[str, Any]) -> None:
        super().__init__(backbone)
        self.cond_kind = "class"
        self.cond_spec = {"class_labels": CondSpec((), "long")}
        self.default_scheduler = dict(default_scheduler)
        self.cfg_channels = backbone.in_channels
        self.num_classes = class_embeddings.shape[0]
        self.register_buffer("class_embeddings", class_embeddings.float(), persistent=False)
        self.register_buffer("class_mask", class_mask.long(), persistent=False)

    def call_backbone(self, x_t: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        labels = cond["class_labels"].long()
        null = labels >= self.num_classes
        rows = labels.clamp_max(self.num_classes - 1)
        y = self.class_embeddings[rows].to(x_t.dtype)
        y = torch.where(null.view(-1, 1, 1), self.backbone.y_embedder.y_embedding.to(y), y)
        mask = torch.where(null.view(-1, 1), torch.ones_like(self.class_mask[rows]), self.class_mask[rows])
        return self.backbone(x_t, t, y[:, None], mask)

    def null_cond(self, cond: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"class_labels": torch.full_like(cond["class_labels"], self.num_classes)}


@register("digits-unet")
def _build_digits_unet(assets_dir: str | None = None) -> Denoiser:
    """Class-conditional UNet2DModel trained on Digits (16×16, 1 channel); null class 10."""
    from mpq_lightning.data.digits import load_digits_teacher
    from mpq_lightning.models.diffusers_adapters import UNet2DDenoiser

    model, meta = load_digits_teacher("digits-unet", assets_dir)
    return UNet2DDenoiser(model, default_scheduler=meta["scheduler"], null_class=meta["null_class"])


@register("moving-digits-stdit")
def _build_moving_digits_stdit(assets_dir: str | None = None) -> Denoiser:
    """Our STDiT trained on Moving-Digits ([1, 8, 16, 16]); classes as caption tokens, null = 10."""
    from mpq_lightning.data.digits import load_digits_teacher

    model, meta = load_digits_teacher("moving-digits-stdit", assets_dir)
    model.class_dropout_prob = 0.0
    return ClassCaptionSTDiTDenoiser(model, meta["class_embeddings"], meta["class_mask"], meta["scheduler"])
