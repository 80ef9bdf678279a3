"""``QuantConfig.compile_quantizers`` (torch.compile of the element-wise quantizer math) and
``QATModule(compile_model=True)`` (whole backbones compiled) give the eager values and gradients
(mpq_lightning/quant/functional.py: fake_quantize, compilable; mpq_lightning/module.py)."""
from __future__ import annotations

import copy
import shutil

import pytest
import torch
from torch import nn

from mpq_lightning.quant import set_quant_state, step_index_context
from mpq_lightning.quant.functional import _leading_rows, quantizer_compile_enabled
from mpq_lightning.quant.layers import LayerSpec, QuantLinear
from mpq_lightning.quant.mixed import init_mixed_quantizer


@pytest.mark.parametrize(
    "x_shape,p_shape,rows",
    [
        ((6, 5), (6, 1), 6),  # per output channel
        ((6, 5, 3, 3), (6, 1, 1, 1), 6),  # conv weight per output channel
        ((4, 7, 9), (4, 1, 1), 4),  # per sample (timestep table gathered per sample)
        ((4, 7, 9), (4, 7, 1), 28),  # per token
        ((4, 7, 9), (), 1),  # per tensor
        ((4, 7, 9), (1, 1), 1),
        ((4, 9), (1, 9), None),  # per input channel: not a leading-rows layout
        ((4, 7, 9), (7, 1), None),  # broadcast over a leading dim
        ((3,), (1, 1, 3), None),  # more dims than x
    ],
)
def test_leading_rows(x_shape, p_shape, rows):
    assert _leading_rows(torch.Size(x_shape), torch.Size(p_shape)) == rows


def _layer(compiled: bool) -> QuantLinear:
    torch.manual_seed(0)
    spec = LayerSpec(w_bits=3, a_bits=6, a_quantizer="timestep", num_steps=4, w_quantizer="fzrmq",
                     omq_group_frac=0.25, lora_rank=2, tqe=True, tqe_frame_scale="all",
                     extras={"layer_info": {"token_layout": "(b f) s c", "num_frames": 2}},
                     compile_quantizers=compiled)
    layer = QuantLinear.from_module(nn.Linear(16, 12), spec)
    init_mixed_quantizer(layer)
    q = layer.act_quantizer
    with torch.no_grad():
        q.scale.copy_(torch.tensor([0.02, 0.03, 0.05, 0.08]))
        q.zero_point.copy_(torch.tensor([30.0, 31.0, 33.0, 29.0]))
        layer.lora.B.normal_(std=0.05)
        layer.corrections["tqe"].beta.normal_(std=0.05)
    q.initialized.fill_(True)
    set_quant_state(layer, True, True)
    return layer


# inductor compiles C++ kernels on CPU
needs_cpp = pytest.mark.skipif(not any(map(shutil.which, ("g++", "c++", "clang++"))), reason="no C++ compiler for inductor")


@needs_cpp
def test_compiled_quantizers_match_eager_values_and_gradients():
    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    eager = _layer(False)
    comp = copy.deepcopy(eager)
    comp.spec.compile_quantizers = True
    x = torch.randn(4, 5, 16) * 2  # (b f) s c with b = 2, f = 2
    step = torch.tensor([0, 3, 1, 2])
    outs, grads = [], []
    for layer in (eager, comp):
        xi = x.clone().requires_grad_(True)
        with step_index_context(layer, step):
            y = layer(xi)
            y.pow(2).sum().backward()
        outs.append(y.detach())
        grads.append({"x": xi.grad, **{n: p.grad for n, p in layer.named_parameters() if p.requires_grad}})
        with torch.no_grad(), step_index_context(layer, step):  # inference graphs (sampling)
            outs.append(layer(x))
    assert not quantizer_compile_enabled()  # the layer switches it on only for its own forward
    assert torch._dynamo.utils.counters["frames"]["ok"] >= 2  # FZ-RMQ chain + activation fake-quant compiled
    torch.testing.assert_close(outs[2], outs[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(outs[3], outs[1], rtol=1e-6, atol=1e-6)
    assert set(grads[0]) == set(grads[1]) and len(grads[0]) >= 8  # x, LoRA, steps, zero points, b1, b2, TQE
    for name in grads[0]:
        assert grads[0][name] is not None and grads[1][name] is not None, name
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-6, msg=name)


def test_compile_without_a_compiler_is_refused_naming_the_key(monkeypatch):
    from mpq_lightning.quant import functional

    monkeypatch.setattr(functional.shutil, "which", lambda name: None)
    monkeypatch.delenv("CXX", raising=False)
    with pytest.raises(RuntimeError, match="compile_quantizers"):
        functional.check_compile_support("cpu")
    monkeypatch.setattr(functional.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(RuntimeError, match="compile_quantizers.*Triton"):
        functional.check_compile_support("cuda")
    monkeypatch.setattr(functional.importlib.util, "find_spec", lambda name: True)
    with pytest.raises(RuntimeError, match="model.compile_model=true on CPU needs a C\\+\\+ compiler"):
        functional.check_compile_support("cpu", "model.compile_model")


class _OneBatch:
    def __init__(self, batch: dict) -> None:
        self.batch = batch

    def train_dataloader(self):
        return [self.batch]


def _qat_module(depth: int = 1, **kwargs):
    from mpq_lightning.models import random_cond
    from mpq_lightning.module import CalibConfig, LossConfig, OptimConfig, QATModule
    from mpq_lightning.quant import QuantConfig

    torch.manual_seed(0)
    quant = QuantConfig(w_bits=3, a_bits=6, num_steps=4, w_quantizer="fzrmq", lora_rank=2, lora_init="svd_weight_error",
                        lora_quantized_base=True, tqe=True, tqe_frame_scale="all")
    module = QATModule("tiny-stdit", {"config": {"depth": depth}}, quant, True, LossConfig(mse_reduction="mean"),
                       OptimConfig(lora_lr=1e-4), CalibConfig(num_batches=1), **kwargs)
    with torch.no_grad():  # the official zero-initialised output layers would hide the student's error
        for p in module.teacher.parameters():
            if not p.any():
                p.normal_(std=0.1)
    module.student.load_state_dict(module.teacher.state_dict(), strict=False)
    t = module.teacher
    batch = {"x_t": torch.randn(2, *t.latent_shape), "t": torch.tensor([900, 100]), "step_index": torch.tensor([0, 3]),
             "cond": random_cond(t, 2, 0, length=6, num_classes=3)}
    module.calibrate_from(_OneBatch(batch))
    set_quant_state(module.student.backbone, True, True)
    return module, batch


@needs_cpp
def test_compiled_model_is_one_graph_with_eager_values_and_gradients():
    """``QATModule(compile_model=True)`` compiles the student backbone whole: FZ-RMQ, OOLRI, TQE with its
    per-frame factor and TALSQ step tables trace as ONE graph (``fullgraph=True`` raises on any graph
    break), give the eager output, distillation feature and every gradient, and another step index
    reuses the graph (no recompile)."""
    import torch._dynamo

    torch._dynamo.reset()
    module, b = _qat_module()
    student = module.student
    trainable = {n: p for n, p in student.named_parameters() if p.requires_grad}

    def run(step):
        for p in trainable.values():
            p.grad = None
        out = student(b["x_t"], b["t"], b["cond"], step)
        feat = module._feat_s.value
        (out.pow(2).mean() + feat.pow(2).mean()).backward()
        return out.detach(), feat.detach(), {n: p.grad.clone() for n, p in trainable.items() if p.grad is not None}

    steps = [b["step_index"], torch.tensor([2, 1])]
    eager = [run(s) for s in steps]
    student.backbone.compile(fullgraph=True)
    compiled = [run(steps[0])]
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled.append(run(steps[1]))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1
    for (oe, fe, ge), (oc, fc, gc) in zip(eager, compiled):
        torch.testing.assert_close(oc, oe, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(fc, fe, rtol=1e-5, atol=1e-5)
        assert set(gc) == set(ge) and len(ge) >= 10  # LoRA, weight/act steps, zero points, b1, b2, TQE, ...
        for name in ge:
            torch.testing.assert_close(gc[name], ge[name], rtol=1e-3, atol=1e-6, msg=name)


def _blocks_run(depth: int, gradient_checkpointing: bool = False):
    """Eager (not checkpointed) and then block-compiled (``compile_scope="blocks"``) outputs,
    distillation feature and gradients of a depth-``depth`` student, and how many graphs dynamo
    compiled for it."""
    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    module, b = _qat_module(depth, compile_model=True, compile_scope="blocks",
                            gradient_checkpointing=gradient_checkpointing)
    module.student.backbone.grad_checkpointing = False
    student = module.student
    trainable = {n: p for n, p in student.named_parameters() if p.requires_grad}

    def run():
        for p in trainable.values():
            p.grad = None
        out = student(b["x_t"], b["t"], b["cond"], b["step_index"])
        feat = module._feat_s.value
        (out.pow(2).mean() + feat.pow(2).mean()).backward()
        return out.detach(), feat.detach(), {n: p.grad.clone() for n, p in trainable.items() if p.grad is not None}

    eager = run()
    module.student.backbone.grad_checkpointing = gradient_checkpointing
    module.compile_backbones()
    assert module.compile_units() == [f"blocks.{i}" for i in range(depth)]
    assert all(student.backbone.get_submodule(n)._compiled_call_impl is not None for n in module.compile_units())
    assert student.backbone._compiled_call_impl is None  # the rest stays eager
    compiled = run()
    return eager, compiled, torch._dynamo.utils.counters["stats"]["unique_graphs"]


@needs_cpp
def test_compiled_blocks_give_eager_values_and_share_graphs_across_depth():
    """``compile_scope="blocks"`` compiles each transformer block, not the backbone: the student gives
    the eager output, feature and every gradient, and blocks alike share their compiled graph, so a
    deeper model compiles no more graphs (the cold compile does not grow with depth). The runs also
    checkpoint their blocks: eager checkpointing around compiled blocks, recomputed with the
    forward's step index (the step-index cache steps aside in compiled code, so the recomputation
    hits the forward's graph)."""
    eager, compiled, graphs_2 = _blocks_run(2, gradient_checkpointing=True)
    (oe, fe, ge), (oc, fc, gc) = eager, compiled
    torch.testing.assert_close(oc, oe, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fc, fe, rtol=1e-5, atol=1e-5)
    assert set(gc) == set(ge) and len(ge) >= 10
    for name in ge:
        torch.testing.assert_close(gc[name], ge[name], rtol=1e-3, atol=1e-6, msg=name)
    *_, graphs_3 = _blocks_run(3, gradient_checkpointing=True)  # the same block graphs: inductor's cache serves them
    assert graphs_2 >= 1 and graphs_3 == graphs_2


def _student_grads(module, b):
    student = module.student
    trainable = {n: p for n, p in student.named_parameters() if p.requires_grad}
    for p in trainable.values():
        p.grad = None
    out = student(b["x_t"], b["t"], b["cond"], b["step_index"])
    (out.pow(2).mean() + module._feat_s.value.pow(2).mean()).backward()
    return out.detach(), {n: p.grad.clone() for n, p in trainable.items() if p.grad is not None}


def _assert_same_grads(got, want):
    (og, gg), (ow, gw) = got, want
    torch.testing.assert_close(og, ow, rtol=1e-5, atol=1e-5)
    assert set(gg) == set(gw) and len(gw) >= 10
    for name in gw:
        torch.testing.assert_close(gg[name], gw[name], rtol=1e-3, atol=1e-6, msg=name)


def test_gradient_checkpointing_recomputes_with_the_forward_step_index():
    """``gradient_checkpointing=True`` recomputes each student block in backward, after the step-index
    context of the forward has exited: the TALSQ quantizers get the forward's per-sample index back for
    the recomputation (before, backward raised "TimestepActQuantizer needs the sampler step index"),
    so output and every gradient equal the run without checkpointing, and the index is unset after."""
    from mpq_lightning.quant import TimestepActQuantizer

    module, b = _qat_module(2)
    want = _student_grads(module, b)
    module._enable_checkpointing(module.student.backbone)
    assert module.student.backbone.grad_checkpointing
    _assert_same_grads(_student_grads(module, b), want)
    quantizers = [m for m in module.student.modules() if isinstance(m, TimestepActQuantizer)]
    assert quantizers and all(q.step_index is None and q._shared is None for q in quantizers)


@pytest.mark.parametrize("name", ["tiny-dit", "tiny-latte", "tiny-cogvideox", "tiny-wan"])
def test_gradient_checkpointing_of_diffusers_backbones_recomputes_with_the_step_index(name):
    """The same through diffusers' ``enable_gradient_checkpointing(fn)``: the first block runs twice
    (forward and recomputation) and output and gradients equal the run without checkpointing."""
    from mpq_lightning.models import random_cond
    from mpq_lightning.module import CalibConfig, LossConfig, OptimConfig, QATModule
    from mpq_lightning.quant import QuantConfig

    torch.manual_seed(0)
    module = QATModule(name, {}, QuantConfig(w_bits=3, a_bits=6, num_steps=4, lora_rank=2), True,
                       LossConfig(mse_reduction="mean"), OptimConfig(), CalibConfig(num_batches=1))
    t = module.teacher
    b = {"x_t": torch.randn(2, *t.latent_shape), "t": torch.tensor([900, 100]), "step_index": torch.tensor([0, 3]),
         "cond": random_cond(t, 2, 0, length=6, num_classes=3)}
    module.calibrate_from(_OneBatch(b))
    set_quant_state(module.student.backbone, True, True)
    want = _student_grads(module, b)
    module._enable_checkpointing(module.student.backbone)
    first = next(m for m in module.student.backbone.modules() if isinstance(m, nn.ModuleList))[0]
    calls = []
    first.register_forward_pre_hook(lambda *_: calls.append(1))
    _assert_same_grads(_student_grads(module, b), want)
    assert len(calls) == 2  # forward and recomputation in backward


def test_compile_scope_is_checked_naming_the_key():
    from types import SimpleNamespace

    from lightning.pytorch.strategies import SingleDeviceStrategy

    from mpq_lightning.module import QATModule

    with pytest.raises(ValueError, match="model.compile_scope must be one of"):
        QATModule("tiny-stdit", {"config": {"depth": 1}}, compile_model=True, compile_scope="layers")
    module = QATModule("tiny-stdit", {"config": {"depth": 1}}, compile_model=True, gradient_checkpointing=True)
    module._trainer = SimpleNamespace(strategy=SingleDeviceStrategy("cpu"), precision="32-true")
    with pytest.raises(ValueError, match="gradient_checkpointing=true with model.compile_model=true needs "
                                         "model.compile_scope blocks"):
        module.check_compile_settings(module._trainer)
    module.compile_scope = "blocks"
    module.check_compile_settings(module._trainer)  # accepted
    module = QATModule("tiny-stdit", {"config": {"depth": 1}}, compile_model=True, compile_scope="blocks")
    module.teacher.backbone = nn.Linear(2, 2)  # a backbone without a list of blocks
    module._trainer = SimpleNamespace(strategy=SingleDeviceStrategy("cpu"), precision="32-true")
    with pytest.raises(ValueError, match="model.compile_scope=blocks: the tiny-stdit backbone has no nn.ModuleList"):
        module.check_compile_settings(module._trainer)


def test_compile_mode_and_options_reach_torch_compile_and_cuda_graphs_mark_each_step(monkeypatch):
    """``compile_mode``'s inductor settings and ``compile_options`` on top reach ``torch.compile`` for
    every compiled unit of both backbones; with CUDA graphs (the mode's or the options') each training /
    validation step marks a new CUDA-graph step, so a step's graph outputs may be reused by the next;
    a bad mode or setting, or either without ``compile_model``, is refused naming the key."""
    from mpq_lightning.module import QATModule

    tiny = ("tiny-stdit", {"config": {"depth": 1}})
    with pytest.raises(ValueError, match="model.compile_mode must be one of"):
        QATModule(*tiny, compile_model=True, compile_mode="fast")
    with pytest.raises(ValueError, match="model.compile_mode=reduce-overhead needs model.compile_model true"):
        QATModule(*tiny, compile_mode="reduce-overhead")
    with pytest.raises(ValueError, match="model.compile_options needs model.compile_model true"):
        QATModule(*tiny, compile_options={"cpp_wrapper": True})
    with pytest.raises(ValueError, match=r"model.compile_options: \['cpp_wraper'\] are not torch._inductor.config"):
        QATModule(*tiny, compile_model=True, compile_options={"cpp_wraper": True})
    seen, marks = [], []
    monkeypatch.setattr(torch, "compile", lambda fn, *a, **kw: (seen.append(kw.get("options")), fn)[1])
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    for mode, options, want, graphs in (
        ("reduce-overhead", None, {"triton.cudagraphs": True}, True),
        ("default", None, None, False),
        ("default", {"cpp_wrapper": True}, {"cpp_wrapper": True}, False),
        ("max-autotune", {"triton.cudagraphs": False}, {"max_autotune": True, "triton.cudagraphs": False,
                                                       "coordinate_descent_tuning": True}, False),
    ):
        seen.clear(), marks.clear()
        module = QATModule("tiny-stdit", {"config": {"depth": 2}}, compile_model=True, compile_scope="blocks",
                           compile_mode=mode, compile_options=options)
        module.compile_backbones()
        assert seen == [want] * 4  # two blocks in each of the two backbones
        module.mark_cudagraph_step()
        assert len(marks) == graphs


def test_compile_model_is_refused_under_fsdp_and_cpu_16_bit_naming_the_key():
    from types import SimpleNamespace

    from lightning.pytorch.strategies import FSDPStrategy

    from mpq_lightning.module import QATModule

    module = QATModule("tiny-stdit", {"config": {"depth": 1}}, compile_model=True)
    module._trainer = SimpleNamespace(strategy=FSDPStrategy(), precision="32-true")
    with pytest.raises(ValueError, match="model.compile_model=true .* not with FSDPStrategy"):
        module.check_compile_settings(module._trainer)
    from lightning.pytorch.strategies import SingleDeviceStrategy

    module._trainer = SimpleNamespace(strategy=SingleDeviceStrategy("cpu"), precision="bf16-mixed")
    with pytest.raises(ValueError, match="compile_model=true with trainer.precision bf16-mixed on CPU"):
        module.check_compile_settings(module._trainer)
    module._trainer = SimpleNamespace(strategy=SingleDeviceStrategy("cpu"), precision="32-true")
    module.check_compile_settings(module._trainer)  # single device, fp32: accepted


def test_fused_adamw_is_the_default_and_steps_like_foreach():
    """``optim.fused`` None picks torch's fused AdamW for CPU tensors; one step moves every trainable
    tensor as the foreach AdamW does (same groups and learning rates)."""
    from mpq_lightning.module import OptimConfig

    module, b = _qat_module()
    states = {}
    for fused in (None, False):
        m = copy.deepcopy(module)
        m.optim_cfg = OptimConfig(lora_lr=1e-4, fused=fused)
        opt = m.build_optimizer()
        assert opt.defaults["fused"] is (True if fused is None else None) and opt.defaults["foreach"] is (fused is False)
        out = m.student(b["x_t"], b["t"], b["cond"], b["step_index"])
        (out.pow(2).mean() + m._feat_s.value.pow(2).mean()).backward()
        opt.step()
        states[fused] = {n: p.detach().clone() for n, p in m.student.named_parameters() if p.requires_grad}
    before = {n: p for n, p in module.student.named_parameters() if p.requires_grad}
    moved = [n for n in before if not torch.equal(states[None][n], before[n])]
    assert len(moved) >= 10
    for n in before:
        torch.testing.assert_close(states[None][n], states[False][n], rtol=1e-5, atol=1e-7, msg=n)
