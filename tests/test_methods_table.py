"""CI smoke of the methods-table pipeline (benchmarks/methods_table.py --smoke): both shipped digits
teachers, W3A6, naive PTQ + two trained methods + a three-row ablation, tiny budgets; the script must
write the markdown, the JSON and the plots itself, with finite metrics in every row."""
import json
import math
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_methods_table_smoke(tmp_path):
    out = tmp_path / "docs"
    cmd = [sys.executable, str(REPO / "benchmarks" / "methods_table.py"), "--smoke", "--out", str(out),
           "--root", str(tmp_path / "runs"), "--cache-dir", str(tmp_path / "caches")]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((out / "results_smoke.json").read_text())
    assert set(data["results"]) == {"video W3A6", "image W3A6", "ablation video W3A6"}
    for key, rows in data["results"].items():
        expected = {"FP", "naive PTQ"} | ({"base (EfficientDM)", "+ MTRD", "+ TMD (= ours)"} if key.startswith("ablation")
                                          else {"EfficientDM", "ours"})
        assert set(rows) == expected, key
        for name, row in rows.items():
            assert "fd_real" in row and "class_consistency" in row, (key, name)
            assert ("temporal_consistency" in row) == key.startswith(("video", "ablation")), (key, name)
            assert ("psnr_vs_fp" in row) == (name != "FP"), (key, name)
            assert all(math.isfinite(v) for v in row.values()), (key, name, row)
    # the ablation's first and last rows are the same runs as EfficientDM and ours: trained once, same numbers
    video, abl = data["results"]["video W3A6"], data["results"]["ablation video W3A6"]
    assert abl["base (EfficientDM)"] == video["EfficientDM"] and abl["+ TMD (= ours)"] == video["ours"]
    md = (out / "results_smoke.md").read_text()
    for key in data["results"]:
        assert f"## {key}" in md
        png = f"results_smoke_{key.replace(' ', '_')}.png"
        assert f"]({png})" in md and (out / png).stat().st_size > 1000
    assert (tmp_path / "caches" / "moving_digits_ddim20").is_dir() and (tmp_path / "caches" / "digits_unet_ddim20").is_dir()
