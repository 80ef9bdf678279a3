"""Quantization core: fake quantizers, quantized layers, model conversion and calibration."""
from .convert import (
    LayerReport,
    QuantConfig,
    calibrate,
    plan_quantization,
    print_quantization_report,
    quant_layers,
    quantize_model,
    set_quant_state,
)
from .functional import (
    fake_quantize,
    init_grid_search,
    init_lp_search,
    init_minmax,
    qparams_from_range,
    qrange,
    round_ste,
    sign_ste,
)
from .layers import LoRA, LayerSpec, QuantConv1d, QuantConv2d, QuantConv3d, QuantLayer, QuantLinear
from .quantizers import (
    DynamicTokenQuantizer,
    TimestepActQuantizer,
    UniformQuantizer,
    resample_step_table,
    step_index_context,
)
from .smooth import smooth_scale

__all__ = [
    "DynamicTokenQuantizer", "LayerReport", "LayerSpec", "LoRA", "QuantConfig", "QuantConv1d", "QuantConv2d",
    "QuantConv3d", "QuantLayer", "QuantLinear", "TimestepActQuantizer", "UniformQuantizer", "calibrate",
    "fake_quantize", "init_grid_search", "init_lp_search", "init_minmax", "plan_quantization",
    "print_quantization_report", "qparams_from_range", "qrange", "quant_layers", "quantize_model",
    "resample_step_table", "round_ste", "set_quant_state", "sign_ste", "smooth_scale", "step_index_context",
]
