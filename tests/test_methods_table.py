"""CI smoke of the methods-table pipeline (benchmarks/methods_table.py --smoke): both shipped digits
teachers, W3A6, naive PTQ + two trained methods + a three-row ablation, tiny budgets; the script must
write the markdown, the JSON and the plots itself, with finite metrics in every row."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

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
    assert data["meta"]["complete"] and not list(out.glob("*partial*"))  # the per-table partial files are gone
    assert (tmp_path / "caches" / "moving_digits_ddim20").is_dir() and (tmp_path / "caches" / "digits_unet_ddim20").is_dir()


def test_a_partial_write_keeps_the_last_complete_results(tmp_path):
    """After every table the script writes <name>.partial.{md,json}; the complete run's files are
    replaced only when a run has all its tables (each file renamed into place whole)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import methods_table as mt

    rows = {"FP": {"fd_real": 10.0}, "naive PTQ": {"fd_real": 30.0, "psnr_vs_fp": 20.0}, "ours": {"fd_real": 15.0}}
    mt.write({"video W3A6": rows}, tmp_path, "results", mt._meta("full", 2, 8, 0.0, complete=True))
    complete = (tmp_path / "results.md").read_text()
    assert "Partial" not in complete and "gap closed by ours: 75.0%" in complete
    mt.write({"video W4A6": rows}, tmp_path, "results.partial", mt._meta("full", 2, 8, 0.0, complete=False))
    assert (tmp_path / "results.md").read_text() == complete
    partial = (tmp_path / "results.partial.md").read_text()
    assert "**Partial**" in partial and "## video W4A6" in partial
    assert json.loads((tmp_path / "results.partial.json").read_text())["meta"]["complete"] is False
    assert not list(tmp_path.glob(".*.tmp"))


def test_resume_keeps_the_partial_tables_and_records_where_each_came_from(tmp_path, monkeypatch):
    """``--resume`` takes the finished tables of <name>.partial.json as they are (here all of the smoke
    run's, so nothing trains) and writes the complete files with each table's date and commit; a
    partial file of another step budget, or none, is refused by name."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import methods_table as mt

    rows = {"FP": {"fd_real": 10.0}, "naive PTQ": {"fd_real": 30.0, "psnr_vs_fp": 20.0}, "ours": {"fd_real": 15.0}}
    keys = ["video W3A6", "image W3A6", "ablation video W3A6"]
    tables = {"video W3A6": {"date": "2026-11-26", "commit": "abc1234", "table_s": 5}}
    mt.write({k: rows for k in keys}, tmp_path, "results_smoke.partial",
             mt._meta("smoke", 2, 8, 0.0, complete=False, tables=tables))  # two tables without a recorded commit
    monkeypatch.setattr(mt, "table_rows", lambda *a, **k: (_ for _ in ()).throw(AssertionError("trained a kept table")))
    monkeypatch.setattr(sys, "argv", ["methods_table.py", "--smoke", "--resume", "--out", str(tmp_path)])
    mt.main()
    data = json.loads((tmp_path / "results_smoke.json").read_text())
    assert data["meta"]["complete"] and list(data["results"]) == keys and all(data["results"][k] == rows for k in keys)
    assert data["meta"]["tables"]["video W3A6"] == tables["video W3A6"]
    assert data["meta"]["tables"]["image W3A6"]["commit"] is None
    md = (tmp_path / "results_smoke.md").read_text()
    assert "video W3A6: 2026-11-26, abc1234, 5 s" in md and "image W3A6: " in md and "commit not recorded" in md
    assert data["meta"]["resumed"] and "Wall time of the last sitting" in md
    assert not list(tmp_path.glob("*partial*"))
    mt.write({"video W3A6": rows}, tmp_path, "results.partial", mt._meta("full", 100, 128, 0.0, complete=False))
    with pytest.raises(ValueError, match=r"meta.steps = 100, this run 200"):
        mt.load_partial(tmp_path / "results.partial.json", "full", 200, 128)
    with pytest.raises(FileNotFoundError, match="--resume: .*nothing.json does not exist"):
        mt.load_partial(tmp_path / "nothing.json", "full", 200, 128)
