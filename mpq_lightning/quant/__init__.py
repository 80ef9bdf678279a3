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
    observed_rows,
    resample_step_table,
    checkpoint_with_step_index,
    step_index_context,
)
from .lora_init import InputStats, oolri_init, oolri_init_layer, svd_factors
from .mixed import (
    FZRMQQuantizer,
    OMQQuantizer,
    bit_accounting_report,
    channel_kurtosis,
    init_mixed_quantizer,
    print_bit_report,
    split_candidates,
)
from .smooth import smooth_scale
from .tqe import TQE, parse_token_layout
from .export import (
    ExportFormatError,
    PackedConv1d,
    PackedConv2d,
    PackedConv3d,
    PackedLayer,
    PackedLinear,
    export_quantized,
    export_report,
    load_quantized,
    pack_bits,
    print_export_report,
    unpack_bits,
    verify_export,
)

__all__ = [
    "DynamicTokenQuantizer", "LayerReport", "LayerSpec", "LoRA", "QuantConfig", "QuantConv1d", "QuantConv2d",
    "QuantConv3d", "QuantLayer", "QuantLinear", "TimestepActQuantizer", "UniformQuantizer", "calibrate",
    "checkpoint_with_step_index", "fake_quantize", "init_grid_search", "init_lp_search", "init_minmax", "observed_rows",
    "plan_quantization",
    "print_quantization_report", "qparams_from_range", "qrange", "quant_layers", "quantize_model",
    "resample_step_table", "round_ste", "set_quant_state", "sign_ste", "smooth_scale", "step_index_context",
    # the papers' methods: OMQ / FZ-RMQ (mixed.py), OOLRI (lora_init.py), TQE (tqe.py)
    "FZRMQQuantizer", "InputStats", "OMQQuantizer", "TQE", "bit_accounting_report", "channel_kurtosis",
    "init_mixed_quantizer", "oolri_init", "oolri_init_layer", "parse_token_layout", "print_bit_report",
    "split_candidates", "svd_factors",
    # real low-bit export (export.py)
    "ExportFormatError", "PackedConv1d", "PackedConv2d", "PackedConv3d", "PackedLayer", "PackedLinear",
    "export_quantized", "export_report", "load_quantized", "pack_bits", "print_export_report", "unpack_bits",
    "verify_export",
]
