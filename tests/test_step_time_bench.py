"""benchmarks/step_time.py's timing: steps timed once per round in rotating order, ratios paired
within rounds. On a simulated machine whose speed drifts 3x during the run, the paired ratio recovers
the true cost ratio; the ratio of separately timed medians does not."""
import importlib.util
import statistics
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def _step_time():
    spec = importlib.util.spec_from_file_location("step_time_bench", REPO / "benchmarks" / "step_time.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class _Clock:
    """A fake perf_counter; a step of cost c advances it by c times the machine's current slowness,
    which grows linearly with the work done so far (from 1x to about 3x over the run)."""

    def __init__(self):
        self.now, self.work = 0.0, 0.0

    def __call__(self):
        return self.now

    def run(self, cost):
        self.now += cost * (1.0 + self.work / 50.0)
        self.work += cost


def test_paired_ratio_cancels_drift(monkeypatch):
    st = _step_time()
    clock = _Clock()
    monkeypatch.setattr(st.time, "perf_counter", clock)
    none = lambda: None  # noqa: E731
    steps = {"fp": (none, lambda: clock.run(1.0)), "qat": (none, lambda: clock.run(1.5)),
             "other": (none, lambda: clock.run(0.5))}
    times = st.interleaved(steps, 20, torch.device("cpu"))
    assert all(len(v) == 20 for v in times.values())
    ratio, (q1, q3) = st.paired_ratio(times["qat"], times["fp"])
    assert abs(ratio - 1.5) < 0.03 and q1 <= ratio <= q3

    # the same steps timed in blocks, one after the other: the drift lands in the ratio
    clock2 = _Clock()
    blocks = {}
    for name, cost in (("fp", 1.0), ("qat", 1.5)):
        blocks[name] = []
        for _ in range(20):
            t0 = clock2()
            clock2.run(cost)
            blocks[name].append(clock2() - t0)
    assert statistics.median(blocks["qat"]) / statistics.median(blocks["fp"]) > 1.5 + 0.3


def test_rounds_rotate_the_order(monkeypatch):
    st = _step_time()
    order = []
    steps = {n: (lambda: None, (lambda n=n: order.append(n))) for n in "abc"}
    st.interleaved(steps, 3, torch.device("cpu"))
    assert order == list("abc") + list("bca") + list("cab")


def test_profile_counts_a_steps_ops_per_call():
    """--profile's counts are per call of the step: a step of three adds and one matmul, profiled over
    two calls, has 4 aten ops, with the adds' 3 calls per step in its table of top ops."""
    st = _step_time()
    x, w = torch.randn(64, 64), torch.randn(64, 64)
    prepared = []
    steps = {"s": (lambda: prepared.append(1), lambda: [x + 1.0 for _ in range(3)] + [x @ w])}
    row = st.profile_steps(steps, torch.device("cpu"), n=2)["s"]
    assert prepared == [1]  # the step's prepare runs once before it is profiled
    assert row["aten_ops"] == 4 and "kernels" not in row and row["wall_s"] > 0
    calls = {name: count for name, count, seconds in row["top"]}
    assert calls["aten::add"] == 3 and calls["aten::mm"] == 1
