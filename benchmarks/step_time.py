"""Training-step time: our full method (QATModule) vs the same backbone's plain FP training step.

    python benchmarks/step_time.py [--device cpu|cuda] [--repeats 20] [--threads N] [--modes eager,quantizers,model]
                                   [--breakdown] [--profile N] [--models tiny-stdit,mid-stdit] [--compile-cache DIR]
                                   [--compile-options '{"cpp_wrapper": true}']

For each model (the tiny STDiT and a mid-size STDiT) it times these training steps:
* FP step: forward + MSE to a target + backward + fused AdamW step over all backbone parameters,
  eager, and (with mode ``model``) with the backbone compiled;
* QAT step: ``QATModule.compute_losses`` (frozen teacher + fake-quantized student, W3A6 with FZ-RMQ,
  OOLRI, TQE, MTRD, TMD) + backward + the module's own AdamW step over the trainable quantization
  state (``optim.flat_params``'s default: ``FlatAdamW`` on a CPU), in each mode: ``eager``; ``quantizers`` (``QuantConfig.compile_quantizers``: torch.compile
  of the element-wise quantizer math); ``model`` (``QATModule(compile_model=True)``: student and
  teacher backbones compiled whole); ``blocks`` (the same with ``compile_scope="blocks"``: each
  transformer block compiled, blocks alike sharing a graph, the rest eager); ``cudagraphs`` (``model``
  with ``compile_mode="reduce-overhead"``: the compiled graphs replayed as CUDA graphs on a GPU;
  ``blocks_cudagraphs``: ``blocks`` likewise);
  ``model_per_tensor`` / ``model_flat`` (``model`` with ``optim.flat_params`` false / true: torch's
  AdamW over each tensor / over one flat tensor per group; the default is flat on a CPU only);
  ``model_compiled_autograd`` (``model`` with the whole step, backward included, run under torch's
  compiled autograd, a private torch API: tried for the per-tensor gradient accumulation, not a
  QATModule option);
* the same eager QAT step with every quantizer switched off (teacher forward, LoRA student, losses,
  AdamW): the floor that no eager quantizer speed-up can go below.
Every step is warmed up first (compilation happens there); ``<step>_first_step_s`` is its first call,
compiling included. Each step compiles into a fresh inductor cache folder unless ``--compile-cache``
names one, so compiles are cold, as in a user's first run (in-process caches aside). Then ``--repeats``
rounds each run every step once, in an order rotated each round, so that the machine's slow drift
falls on all of them alike. ``<step>_step_s`` is a step's median time; ``<step>_ratio`` is the
median of the per-round ratios to the eager FP step of the same round (``_q1_q3``: their quartiles).
The compiled-model step is also given against the compiled FP step. ``--breakdown`` also times the
parts of each QAT step on their own, afterwards (frozen-teacher forward, student forward,
``compute_losses`` = both forwards + losses + memory-queue writes, backward, optimiser; medians) and
writes them as ``<mode>_phases_s``, the eager FP step's as ``fp_phases_s``. ``--profile N`` runs every
step N more times under torch.profiler (``profile_steps``: host-dispatched aten ops, and on a GPU kernel
launches and GPU busy time per step, to tell a launch-bound step from a compute-bound one).
Writes benchmarks/results/step_time_<device>.json. Targets (issue 7): ratio <= 1.6 on CPU, <= 1.3 on
GPU.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path

import torch

from mpq_lightning.callbacks.memory_queue import MemoryQueue
from mpq_lightning.models import build
from mpq_lightning.module import CalibConfig, LossConfig, OptimConfig, QATModule
from mpq_lightning.quant import QuantConfig, set_quant_state

MODELS = {
    "tiny-stdit": {},
    "mid-stdit": {"config": {"depth": 8, "hidden_size": 384, "num_heads": 6, "input_size": [8, 16, 16],
                             "caption_channels": 64, "model_max_length": 16}},
}


def batch_for(denoiser, batch: int, device) -> dict:
    g = torch.Generator().manual_seed(0)
    cond = {}
    for key, spec in denoiser.cond_spec.items():
        shape = [batch] + [8 if d is None else d for d in spec.shape]
        cond[key] = torch.ones(shape, dtype=torch.long) if spec.dtype == "mask" else torch.randn(shape, generator=g)
    step_index = torch.randint(0, 10, (batch,), generator=g)
    return {
        "x_t": torch.randn(batch, *denoiser.latent_shape, generator=g).to(device),
        "t": torch.randint(0, 1000, (batch,), generator=g).to(device),
        "step_index": step_index.to(device),
        "step_index_host": step_index.tolist(),  # as the data modules give it (no GPU sync to read it)
        "cond": {k: v.to(device) for k, v in cond.items()},
    }


class _Calib:
    def __init__(self, batch):
        self.batch = batch

    def train_dataloader(self):
        return [self.batch, self.batch]


def timed(fn, repeats: int, device, warmup: int = 3, prepare=None) -> float:
    """Median seconds of ``fn()`` after ``warmup`` untimed calls; ``prepare()`` runs untimed before each."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if prepare is not None:
            prepare()
        times.append(_once(fn, device))
    return statistics.median(times)


def _once(fn, device) -> float:
    """Seconds of one ``fn()``, the device's queued work included."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


MODES = {  # QAT step variants: (key, QuantConfig.compile_quantizers, QATModule.compile_model / compile_scope,
    #                             compile_mode, OptimConfig.flat_params)
    "eager": ("qat", False, None, "default", None),
    "quantizers": ("qat_compiled", True, None, "default", None),
    "model": ("qat_compiled_model", False, "model", "default", None),
    "model_per_tensor": ("qat_compiled_model_per_tensor", False, "model", "default", False),
    "model_flat": ("qat_compiled_model_flat", False, "model", "default", True),
    "blocks": ("qat_compiled_blocks", False, "blocks", "default", None),
    # ``model`` with the backward traced too (torch's compiled autograd): its 234 AccumulateGrad nodes fold
    # into the compiled backward graph
    "model_compiled_autograd": ("qat_compiled_model_compiled_autograd", False, "model", "default", None),
    "cudagraphs": ("qat_cudagraphs", False, "model", "reduce-overhead", None),
    "blocks_cudagraphs": ("qat_cudagraphs_blocks", False, "blocks", "reduce-overhead", None),
}


def loss_backward_optimizer(loss_fn, opt: torch.optim.Optimizer, repeats: int, device,
                            forward_key: str = "forward") -> dict[str, float]:
    """Median seconds of ``loss_fn()``, of the backward of its result and of ``opt.step()``, each
    timed on its own after the untimed parts before it."""
    state = {}

    def forward():
        state["loss"] = loss_fn()

    def backward():
        opt.zero_grad(set_to_none=True)
        state["loss"].backward()

    return {forward_key: timed(forward, repeats, device),
            "backward": timed(backward, repeats, device, warmup=0, prepare=forward),
            "optimizer": timed(opt.step, repeats, device, warmup=0, prepare=lambda: (forward(), backward()))}


def phase_times(module: QATModule, opt: torch.optim.Optimizer, b: dict, repeats: int, device) -> dict[str, float]:
    """Median seconds of each phase of one QAT step, each timed on its own."""
    x_t, t, cond, step = b["x_t"], b["t"], b["cond"], b["step_index"]

    def teacher():
        with torch.no_grad():
            module.teacher(x_t, t, cond, step)

    return {"teacher_forward": timed(teacher, repeats, device),
            "student_forward": timed(lambda: module.student(x_t, t, cond, step), repeats, device),
            # both forwards + losses + queue writes
            **loss_backward_optimizer(lambda: sum(module.compute_losses(b).values()), opt, repeats, device,
                                      forward_key="compute_losses")}


def interleaved(steps: dict, repeats: int, device) -> dict[str, list[float]]:
    """Seconds of one call of each ``steps[name] = (prepare, step)`` per round, ``repeats`` rounds.

    Every round runs every step once, in an order rotated each round, so slow drift of the machine
    (other tenants, clocks) falls on all steps alike; ratios are then taken within a round."""
    names = list(steps)
    times = {n: [] for n in names}
    for r in range(repeats):
        k = r % len(names)
        for n in names[k:] + names[:k]:
            prepare, step = steps[n]
            prepare()
            times[n].append(_once(step, device))
    return times


def paired_ratio(num: list[float], den: list[float]) -> tuple[float, list[float]]:
    """Median and quartiles of the per-round ratios ``num[r] / den[r]``."""
    ratios = [a / b for a, b in zip(num, den)]
    q1, _, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else (ratios[0],) * 3
    return statistics.median(ratios), [q1, q3]


def bench(name: str, kwargs: dict, batch: int, repeats: int, device, modes: list[str], breakdown: bool = False,
          fresh_cache: bool = True, compile_options: dict | None = None, profile: int = 0) -> dict:
    # -- FP training step (fused AdamW where torch has it, as QATModule uses by default) --------
    fp = build(name.replace("mid-stdit", "tiny-stdit"), **kwargs).to(device)
    b = batch_for(fp, batch, device)
    target = torch.randn_like(fp(b["x_t"], b["t"], b["cond"], None))

    def fp_step_for(model):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)

        def step():
            loss = (model(b["x_t"], b["t"], b["cond"], None) - target).pow(2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return step, opt

    none = lambda: None  # noqa: E731
    fp_step, fp_opt = fp_step_for(fp)
    steps = {"fp": (none, fp_step)}
    warmups = {"fp": 3}
    if "model" in modes:  # the fair baseline for a compiled QAT step is a compiled FP step
        fp_c = copy.deepcopy(fp)
        fp_c.backbone.compile(options=compile_options or None)
        steps["fp_compiled"] = (none, fp_step_for(fp_c)[0])
        warmups["fp_compiled"] = 5
    modules, row_optimizers = {}, {}
    for mode in modes:
        key, compile_quantizers, compile_scope, compile_mode, flat_params = MODES[mode]
        compile_model = compile_scope is not None
        module, qopt, qat_step = qat_setup(name, kwargs, b, device, compile_quantizers, compile_scope, compile_mode,
                                           compile_options if compile_scope is not None else None, flat_params)
        if mode == "model_compiled_autograd":
            qat_step = _under_compiled_autograd(qat_step)
        modules[key] = (module, qopt)
        row_optimizers[key] = type(qopt).__name__
        quant_on = partial(set_quant_state, module.student.backbone, True, True)
        steps[key] = (quant_on, qat_step)
        warmups[key] = 5 if compile_quantizers or compile_model else 3
        if not (compile_quantizers or compile_model):  # the same step, every quantizer off: the eager floor
            steps["no_quantizers"] = (partial(set_quant_state, module.student.backbone, False, False), qat_step)
            warmups["no_quantizers"] = 3
    row = {"model": name, "params": sum(p.numel() for p in fp.parameters()), "batch": batch, "rounds": repeats,
           "qat_optimizers": row_optimizers}
    for n, (prepare, step) in steps.items():  # compilation happens here, outside the rounds
        if fresh_cache:  # each step compiles cold: nothing from the variants compiled before it
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix=f"step_time_inductor_{n}_")
        for i in range(warmups[n]):
            prepare()
            seconds = _once(step, device)
            if i == 0:  # the first call: compiling included (cold: see fresh_cache)
                row[f"{n}_first_step_s"] = seconds
    times = interleaved(steps, repeats, device)

    for n, ts in times.items():
        row[f"{n}_step_s"] = statistics.median(ts)
        if n != "fp":
            row[f"{n}_ratio"], row[f"{n}_ratio_q1_q3"] = paired_ratio(ts, times["fp"])
    if "qat_compiled_model" in times:
        row["qat_compiled_model_ratio_vs_fp_compiled"], row["qat_compiled_model_ratio_vs_fp_compiled_q1_q3"] = \
            paired_ratio(times["qat_compiled_model"], times["fp_compiled"])
    if breakdown:
        row["fp_phases_s"] = loss_backward_optimizer(
            lambda: (fp(b["x_t"], b["t"], b["cond"], None) - target).pow(2).mean(), fp_opt, repeats, device)
        for key, (module, qopt) in modules.items():
            if key.endswith("_compiled_autograd"):  # its phases would run without compiled autograd
                continue
            set_quant_state(module.student.backbone, True, True)
            row[f"{key}_phases_s"] = phase_times(module, qopt, b, repeats, device)
    if profile:
        row["profile"] = profile_steps(steps, device, profile)
    return row


def _outermost_aten(event) -> bool:
    """An aten call with no aten call around it (``x @ w`` counts once, not as matmul, mm, ...)."""
    if not event.name.startswith("aten::"):
        return False
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("aten::"):
            return False
        parent = parent.cpu_parent
    return True


def profile_steps(steps: dict, device, n: int, top: int = 12) -> dict:
    """Each step of ``steps`` (name: (prepare, step), warmed up) under torch.profiler for ``n`` calls, per
    call: ``wall_s``; ``aten_ops`` (aten calls not made inside another aten call: the ops the host
    dispatched, from Python, autograd or a compiled graph's wrapper); on a GPU ``kernels``
    (kernel launches) and ``gpu_busy_s`` (the kernels' summed time: far below ``wall_s`` means the host,
    not the GPU, sets the pace); ``top``: the ops with the most self time (device time on a GPU, CPU
    time on a CPU) as [name, calls, seconds] per call."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    out = {}
    for name, (prepare, step) in steps.items():
        prepare()
        with profile(activities=activities) as prof:
            t0 = time.perf_counter()
            for _ in range(n):
                step()
            if cuda:
                torch.cuda.synchronize()
            wall = time.perf_counter() - t0
        events = prof.events()
        row = {"wall_s": wall / n, "aten_ops": sum(map(_outermost_aten, events)) / n}
        if cuda:
            kernels = [e for e in events if e.device_type == DeviceType.CUDA]
            row["kernels"] = len(kernels) / n
            row["gpu_busy_s"] = sum(e.device_time_total for e in kernels) * 1e-6 / n
        self_time = (lambda a: a.self_device_time_total) if cuda else (lambda a: a.self_cpu_time_total)
        averages = sorted(prof.key_averages(), key=self_time, reverse=True)[:top]
        row["top"] = [[a.key, a.count / n, self_time(a) * 1e-6 / n] for a in averages]
        out[name] = row
    return out


def qat_setup(name: str, kwargs: dict, b: dict, device, compile_quantizers: bool, compile_scope: str | None,
              compile_mode: str = "default", compile_options: dict | None = None, flat_params: bool | None = None):
    """A calibrated ``QATModule`` with our full method, its own optimiser and one training step on ``b``
    (``compile_scope``: ``QATModule.compile_scope`` with ``compile_model``; None: not compiled;
    ``compile_mode`` / ``compile_options``: ``QATModule``'s; ``flat_params``: ``OptimConfig``'s)."""
    quant = QuantConfig(w_bits=3, a_bits=6, num_steps=10, w_quantizer="fzrmq", lora_rank=8, lora_init="svd_weight_error",
                        lora_quantized_base=True, tqe=True, compile_quantizers=compile_quantizers)
    loss = LossConfig(mse_reduction="mean", mtrd=True, mtrd_anchors=256, mtrd_memory_samples=256, tmd=True)
    module = QATModule(name.replace("mid-stdit", "tiny-stdit"), kwargs, quant, True, loss, OptimConfig(lora_lr=1e-4, flat_params=flat_params),
                       CalibConfig(num_batches=2), compile_model=compile_scope is not None,
                       compile_scope=compile_scope or "model", compile_mode=compile_mode,
                       compile_options=compile_options).to(device)
    b = {k: v for k, v in b.items() if k != "teacher_output"}
    module.calibrate_from(_Calib(b))
    set_quant_state(module.student.backbone, True, True)
    if compile_scope is not None:  # as QATModule.on_fit_start does after calibration
        module.compile_backbones()
    queue = MemoryQueue(num_steps=10, pixels_per_step=64)
    queue.attach(module)
    qopt = module.build_optimizer()  # the module's own AdamW (fused where available)
    module.mark_cudagraph_step()  # a first CUDA-graph step, as the app's first training / validation step marks
    with torch.no_grad():
        # a copy: a compiled teacher replayed as a CUDA graph (mode cudagraphs) writes its next output
        # into the same memory, and this cached target is read at every step (the app's comes from the cache)
        b["teacher_output"] = module.teacher(b["x_t"], b["t"], b["cond"], b["step_index"]).clone()

    def qat_step():
        module.mark_cudagraph_step()  # as training_step does
        losses = module.compute_losses(b)
        total = sum(losses.values())
        qopt.zero_grad(set_to_none=True)
        total.backward()
        qopt.step()

    return module, qopt, qat_step


def _under_compiled_autograd(step):
    """``step`` with its backward traced and compiled by torch's compiled autograd (private API)."""
    from torch._dynamo import compiled_autograd

    def run():
        with compiled_autograd._enable(torch.compile(dynamic=False)):
            step()
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None)
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {list(MODELS)}")
    ap.add_argument("--breakdown", action="store_true", help="also time each phase of the QAT step (<mode>_phases_s)")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="also run each step N times under torch.profiler: aten ops, kernel launches and GPU busy "
                         "time per step, and the top ops (row['profile'])")
    ap.add_argument("--modes", default="eager,quantizers,model",
                    help="comma-separated QAT step variants: eager, quantizers (compile_quantizers), model (compile_model), "
                         "blocks (compile_model with compile_scope blocks), cudagraphs (compile_model with "
                         "compile_mode reduce-overhead: CUDA graphs on a GPU), blocks_cudagraphs (blocks likewise), model_per_tensor / model_flat "
                         "(model with optim.flat_params false / true), model_compiled_autograd (model, backward "
                         "compiled by torch's compiled autograd)")
    ap.add_argument("--compile-cache", default=None,
                    help="inductor's cache folder (TORCHINDUCTOR_CACHE_DIR); default: a fresh one, so compiles are cold")
    ap.add_argument("--compile-options", type=json.loads, default=None,
                    help='inductor settings for every compiled step (QATModule.compile_options and the compiled FP '
                         'step), as JSON, e.g. \'{"cpp_wrapper": true}\'')
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.compile_cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = args.compile_cache
    device = torch.device(args.device)
    modes = [m for m in args.modes.split(",") if m]
    if bad := [m for m in modes if m not in MODES]:
        ap.error(f"--modes: unknown {bad}; choose from {list(MODES)}")
    models = [m for m in args.models.split(",") if m]
    if bad := [m for m in models if m not in MODELS]:
        ap.error(f"--models: unknown {bad}; choose from {list(MODELS)}")
    out = Path(args.out or Path(__file__).parent / "results" / f"step_time_{device.type}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    info = {"device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or platform.machine(),
            "torch": torch.__version__, "threads": torch.get_num_threads(), "timing": "interleaved rounds, paired ratios",
            "rows": [], "compile_options": args.compile_options,
            "method": "W3A6 FZ-RMQ + OOLRI(svd_weight_error, quantized base, r=8) + TQE + MTRD + TMD, TALSQ 10 steps"}
    rows = info["rows"]
    for n in models:  # written after each model, so a run cut short keeps the rows it finished
        rows.append(bench(n, MODELS[n], args.batch, args.repeats, device, modes, args.breakdown,
                          fresh_cache=args.compile_cache is None, compile_options=args.compile_options,
                          profile=args.profile))
        out.write_text(json.dumps(info, indent=2))
    for r in rows:
        qat = ", ".join(f"{label} {r[k + '_step_s'] * 1e3:.1f} ms (ratio {r[k + '_ratio']:.2f}, "
                        f"quartiles {r[k + '_ratio_q1_q3'][0]:.2f}-{r[k + '_ratio_q1_q3'][1]:.2f})"
                        for k, label in [(key, f"QAT {mode}") for mode, (key, *_) in MODES.items()]
                        + [("no_quantizers", "same step, quantizers off")] if k + "_step_s" in r)
        if "fp_compiled_step_s" in r:
            qat += (f", FP compiled {r['fp_compiled_step_s'] * 1e3:.1f} ms (compiled QAT / compiled FP "
                    f"{r['qat_compiled_model_ratio_vs_fp_compiled']:.2f})")
        print(f"{r['model']:>10} ({r['params'] / 1e6:.2f} M params, batch {r['batch']}, {r['rounds']} rounds): "
              f"FP {r['fp_step_s'] * 1e3:.1f} ms, {qat}")
        for k, p in r.get("profile", {}).items():
            print(f"{'':>10} {k} profile: {p['wall_s'] * 1e3:.1f} ms, {p['aten_ops']:.0f} aten ops"
                  + (f", {p['kernels']:.0f} kernels, GPU busy {p['gpu_busy_s'] * 1e3:.1f} ms" if "kernels" in p else ""))
        for k in [k for k in r if k.endswith("_phases_s")]:
            print(f"{'':>10} {k[:-len('_phases_s')]} phases: " + ", ".join(f"{p} {v * 1e3:.1f} ms" for p, v in r[k].items()))
    print(f"-> {out}")


if __name__ == "__main__":
    main()
