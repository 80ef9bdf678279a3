"""Size of a real low-bit export of STDiT-XL/2 (random weights, CPU) vs the same layers in bf16.

For each setting (W3A6 / W2A4 × OMQ / FZ-RMQ figure layout) the full 28-block model is built from
the registry (``opensora-stdit-xl/2``, official init; the zero-initialised projections re-drawn
from N(0, 0.02²)), every block linear is quantized (Q-VDiT's FP list: embedders and final layer
stay FP; no W8 MLP map, so every quantized layer is at the nominal bits), and exported with
``export_quantized`` (bf16 FP parameters, the exporter's bit-exactness check on every layer).

Skipped calibration-heavy steps: weight quantizers are initialised from the weights with min-max
steps and the weight-space split search; random weights have near-equal kurtosis, so the search
picks k = 0 (every channel at N bits) and the split is then forced to k = ⌊0.1·Cout⌋ (the release's
g) by kurtosis rank, so all three channel classes (N-1 / N / N+1 bits) are stored. Activation
quantizers (per-step tables, 100 IDDPM steps) are set to fixed values instead of calibrated.
Sizes do not depend on these values.

Measured: bytes of codes + weight metadata (fp32 steps, packed zero points, 2-bit class ids, fp32
residual scales) of the quantized layers, from the safetensors header, vs 2 bytes per weight;
target ≤ 1.05 × bits / 16. Activation tables, biases and (with --tqe) TQE branches are listed
separately. Writes benchmarks/results/export_size.json and prints a table.

    python benchmarks/export_size.py [--blocks 28] [--settings W3A6-omq W2A4-fzrmq ...] [--tqe]
"""
from __future__ import annotations

import argparse
import gc
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch

from mpq_lightning.models import build
from mpq_lightning.models.stdit import STDIT_KEEP_FP
from mpq_lightning.module import QATModule
from mpq_lightning.quant import QuantConfig, quantize_model, set_quant_state
from mpq_lightning.quant.export import PackedLayer, export_quantized, export_report, load_quantized
from mpq_lightning.quant.layers import QuantLayer
from mpq_lightning.quant.mixed import MixedQuantizerBase, channel_kurtosis, classes_for_split, init_mixed_quantizer
from mpq_lightning.quant.quantizers import TimestepActQuantizer

SETTINGS = {"W3A6-omq": (3, 6, "omq"), "W3A6-fzrmq": (3, 6, "fzrmq"), "W2A4-omq": (2, 4, "omq"), "W2A4-fzrmq": (2, 4, "fzrmq")}
MODEL = "opensora-stdit-xl/2"
NUM_STEPS = 100  # Q-VDiT's IDDPM-100 activation tables


@torch.no_grad()
def student(w_bits: int, a_bits: int, method: str, blocks: int, tqe: bool):
    torch.manual_seed(0)
    den = build(MODEL).eval()
    for p in den.parameters():
        if not p.any():
            p.normal_(std=0.02)
    cfg = QuantConfig(w_bits=w_bits, a_bits=a_bits, w_quantizer=method, w_init="minmax", a_init="minmax",
                      num_steps=NUM_STEPS, keep_fp=STDIT_KEEP_FP, tqe=tqe, include=[f"blocks.{i}.*" for i in range(blocks)])
    quantize_model(den.backbone, cfg, layer_info=QATModule._layer_info_fn(den))
    for m in den.backbone.modules():
        if not isinstance(m, QuantLayer):
            continue
        wq = m.weight_quantizer
        if isinstance(wq, MixedQuantizerBase):
            init_mixed_quantizer(m, None)  # kurtosis classes + weight-space split search
        else:
            wq.initialize(m.quantized_weight())
        if isinstance(wq, MixedQuantizerBase) and int(wq.split) == 0:
            order = torch.argsort(channel_kurtosis(m.latent_weight()), descending=True, stable=True)
            wq.set_classes(classes_for_split(order, int(0.1 * wq.weight_shape[0])))
        aq = m.act_quantizer
        if isinstance(aq, TimestepActQuantizer):
            aq.scale.fill_(0.05)
            aq.zero_point.fill_(2 ** (a_bits - 1))
            aq.initialized.fill_(True)
        if "tqe" in m.corrections:
            m.corrections["tqe"].beta.normal_(std=0.01)
    set_quant_state(den.backbone, True, True)
    return den


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blocks", type=int, default=28, help="quantize blocks 0..N-1 (28 = the whole model)")
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--tqe", action="store_true", help="also store Q-VDiT's TQE branches (FP side bytes)")
    ap.add_argument("--workdir", default=None, help="where the exports are written (deleted afterwards)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "export_size.json"))
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    work = Path(tempfile.mkdtemp(prefix="export_size-", dir=args.workdir))
    results = []
    try:
        for name in args.settings:
            w_bits, a_bits, method = SETTINGS[name]
            t0 = time.perf_counter()
            den = student(w_bits, a_bits, method, args.blocks, args.tqe)
            t_build = time.perf_counter() - t0
            t0 = time.perf_counter()
            out = export_quantized(den, work / name, model_name=MODEL)
            t_export = time.perf_counter() - t0
            rep = export_report(out)
            tot = rep["totals"]
            # spot check at scale: three reloaded layers dequantise to the student's fake-quant weights
            t0 = time.perf_counter()
            loaded = load_quantized(out)
            t_load = time.perf_counter() - t0
            quant = {n: m for n, m in den.named_modules() if isinstance(m, QuantLayer)}
            packed = {n: m for n, m in loaded.named_modules() if isinstance(m, PackedLayer)}
            names = sorted(quant)[:: max(1, len(quant) // 3)][:3]
            exact = all(torch.equal(packed[n].weight, quant[n].quantized_weight()) for n in names)
            classes = {}
            for r in rep["layers"]:
                key = "/".join(map(str, r["bits"]))
                classes[key] = classes.get(key, 0) + 1
            row = {
                "setting": name, "w_bits": w_bits, "a_bits": a_bits, "method": method if method == "omq" else "fzrmq-figure",
                "blocks_quantized": args.blocks, "quantized_layers": tot["layers"], "quantized_weights": tot["quantized_weights"],
                "codes_bytes": tot["codes_bytes"], "weight_metadata_bytes": tot["wmeta_bytes"],
                "quantized_bytes": tot["quantized_bytes"], "bf16_bytes": tot["quantized_bf16_bytes"],
                "ratio_vs_bf16": tot["quantized_vs_bf16"], "target_ratio": 1.05 * w_bits / 16,
                "ratio_over_nominal": tot["quantized_vs_bf16"] / (w_bits / 16),
                "meets_target": tot["quantized_vs_bf16"] <= 1.05 * w_bits / 16,
                "bits_per_weight": tot["bits_per_weight"], "bits_per_weight_with_metadata": tot["bits_per_weight_with_metadata"],
                "act_metadata_bytes": tot["ameta_bytes"], "fp_side_bytes": tot["side_bytes"],
                "fp_params_bytes_bf16": tot["fp_bytes"], "disk_bytes": tot["disk_bytes"],
                "bf16_model_bytes": tot["bf16_model_bytes"], "disk_vs_bf16_model": tot["disk_vs_bf16"],
                "segment_bits_layer_counts": classes, "spot_check_exact": exact,
                "seconds": {"build_and_init": round(t_build, 1), "export": round(t_export, 1), "load": round(t_load, 1)},
            }
            results.append(row)
            print(json.dumps({k: row[k] for k in ("setting", "ratio_vs_bf16", "target_ratio", "bits_per_weight_with_metadata",
                                                  "spot_check_exact", "seconds")}), flush=True)
            del den, loaded, quant, packed
            gc.collect()
            shutil.rmtree(out, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    meta = {"model": MODEL, "device": "cpu", "torch": torch.__version__, "python": platform.python_version(),
            "threads": torch.get_num_threads(), "fp_dtype": "bf16", "tqe": args.tqe, "num_steps": NUM_STEPS,
            "what": "codes + weight metadata of the quantized block linears vs the same weights in bf16 "
                    "(target <= 1.05 x bits/16); full model built, blocks 0..N-1 quantized",
            "note": "random weights (official init, zero projections re-drawn); min-max steps; split forced to "
                    "k = floor(0.1 Cout) where the weight-space search picked k = 0; activation tables set, not calibrated"}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "results": results}, indent=1))

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"STDiT-XL/2 export size ({args.blocks} blocks quantized, CPU)")
    for col in ("setting", "layers", "weights", "codes MiB", "w-meta MiB", "bf16 MiB", "ratio", "target", "bits/w +meta",
                "act-meta KiB", "disk MiB", "exact", "export s"):
        table.add_column(col, justify="left" if col == "setting" else "right")
    for r in results:
        table.add_row(r["setting"], str(r["quantized_layers"]), f"{r['quantized_weights'] / 1e6:.1f}M",
                      f"{r['codes_bytes'] / 2**20:.2f}", f"{r['weight_metadata_bytes'] / 2**20:.3f}",
                      f"{r['bf16_bytes'] / 2**20:.1f}", f"{r['ratio_vs_bf16']:.5f}", f"{r['target_ratio']:.5f}",
                      f"{r['bits_per_weight_with_metadata']:.4f}", f"{r['act_metadata_bytes'] / 1024:.1f}",
                      f"{r['disk_bytes'] / 2**20:.1f}", str(r["spot_check_exact"]), str(r["seconds"]["export"]))
    Console(width=180).print(table)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
