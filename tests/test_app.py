"""The Lightning application end to end on the tiny STDiT: checkpoints, resume, TensorBoard, DDP,
bad input. Every run happens in a temporary working directory (caches and runs are relative)."""
import contextlib
import copy
import math
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from mpq_lightning.cli import main
from mpq_lightning.optim import FlatAdamW

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "tiny" / "stdit_w3a6.yaml")
QUIET = ["--log_samples", "false", "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


def fit(*args: str, run: str = "run") -> object:
    return main(["--config", TINY, "--run_name", run, *QUIET, *args])


class StopAt(Callback):
    """Stops fitting after ``step`` optimiser steps (a job killed and restarted later)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step >= self.step:
            trainer.should_stop = True


def _student_state(cli) -> dict:
    return {k: v.detach().clone() for k, v in cli.model.student.state_dict().items()}


def _assert_trained_alike(resumed, straight, queue: bool = True) -> None:
    """The resumed run's student (and memory queue) are the straight run's, within 1e-6."""
    a, b = _student_state(straight), _student_state(resumed)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6, msg=k)
    if queue:
        torch.testing.assert_close(resumed.model.memory_queue.feats, straight.model.memory_queue.feats, rtol=0, atol=1e-6)


@contextlib.contextmanager
def _probes():
    """``app_probes`` importable for ``--trainer.callbacks+=app_probes.<Probe>``."""
    sys.path.insert(0, str(Path(__file__).parent))
    try:
        yield
    finally:
        sys.path.remove(str(Path(__file__).parent))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    path = tmp_path_factory.mktemp("app")
    old = os.getcwd()
    os.chdir(path)
    yield path
    os.chdir(old)


@pytest.fixture(scope="module")
def full_run(workdir):
    cli = fit("--trainer.max_steps", "4", "--checkpoint_every_n_steps", "2", run="full")
    return cli


def test_checkpoint_has_no_teacher_and_is_small(full_run, workdir):
    from mpq_lightning.checkpoint_io import AtomicCheckpointIO

    assert isinstance(full_run.trainer.strategy.checkpoint_io, AtomicCheckpointIO)  # a failed save keeps the old
    ckpt = torch.load(workdir / "checkpoints" / "full" / "last.ckpt", weights_only=False)
    keys = list(ckpt["state_dict"])
    assert keys and not any(k.startswith("teacher.") for k in keys)
    teacher = full_run.model.teacher
    teacher_keys = {f"student.{k}" for k in teacher.state_dict()}
    assert not teacher_keys & set(keys)  # frozen FP weights are stripped too
    saved = sum(v.numel() * v.element_size() for v in ckpt["state_dict"].values())
    fp = sum(v.numel() * v.element_size() for v in teacher.state_dict().values())
    assert saved < 0.35 * fp, (saved, fp)
    assert ckpt["mpq_identity"]["model"] == "tiny-stdit"


def test_load_from_checkpoint_gives_the_quantized_student(full_run, workdir):
    """``QATModule.load_from_checkpoint`` (Lightning's own reader, what a Python user calls) holds the
    trained student with its quantizers on, weights and activations, as evaluate.py samples it: the
    switches are not state-dict entries, and it was the FP weights with the LoRA."""
    from mpq_lightning.models.registry import random_cond
    from mpq_lightning.module import QATModule
    from mpq_lightning.quant import quant_layers, set_quant_state

    module = QATModule.load_from_checkpoint(workdir / "checkpoints" / "full" / "last.ckpt", weights_only=False)
    layers = dict(quant_layers(module.student.backbone))
    assert layers and all(m.weight_quant and m.act_quant for m in layers.values())
    student = module.student.eval()
    x, cond = torch.randn(2, *student.latent_shape), random_cond(student, 2)
    with torch.no_grad():
        quantized = student(x, torch.tensor([500, 300]), cond, step_index=torch.tensor([3, 5]))
        set_quant_state(student.backbone, weight=False, act=False)
        fp = student(x, torch.tensor([500, 300]), cond, step_index=torch.tensor([3, 5]))
    assert not torch.allclose(quantized, fp)


def test_checkpoint_and_export_carry_the_training_sampler(full_run, workdir):
    """The student's activation step tables belong to the sampler of its training data (the tiny config's
    10-step DDIM cache, guidance 4), not the teacher's default (100-step IDDPM, whose step 10 is beyond a
    10-entry table): checkpoints save it, the export writes it to model.json and ``load_quantized`` makes
    it the default sampler, so ``sample(model, None, ...)`` of the export runs the trained tables."""
    import json

    from mpq_lightning.export import main as export_main
    from mpq_lightning.models.sampling import sample
    from mpq_lightning.quant.export import load_quantized

    run = workdir / "checkpoints" / "full"
    ckpt = torch.load(run / "last.ckpt", weights_only=False)
    recipe = json.loads((workdir / "data" / "tiny_stdit_ddim10" / "manifest.json").read_text())["recipe"]
    want = {"name": recipe["scheduler"], "config": recipe["scheduler_config"],
            "num_inference_steps": 10, "guidance_scale": recipe["guidance_scale"], "eta": recipe["eta"]}
    assert ckpt["mpq_sampler"] == want and full_run.model.teacher.default_scheduler["name"] == "iddpm"
    out = workdir / "exported_full"
    assert export_main(["--config", str(run / "config.yaml"), "--ckpt_path", "last", "--out", str(out)]) == 0
    assert json.loads((out / "model.json").read_text())["sampler"] == want
    model = load_quantized(out)
    assert model.default_scheduler == want
    noise = torch.randn(2, *model.latent_shape, generator=torch.Generator().manual_seed(0))
    cond, uncond = full_run.datamodule.sample_conditions(2)
    x = sample(model, None, noise, cond, uncond, guidance_scale=want["guidance_scale"])
    assert x.shape == noise.shape and torch.isfinite(x).all() and not x.requires_grad


@pytest.mark.parametrize("feature", ["digits-video", "digits-image"])
def test_a_digits_feature_network_for_other_samples_is_refused_before_sampling(full_run, workdir, monkeypatch, feature):
    """The tiny STDiT's samples are [4, 4, 8, 8]: the digits video network takes [C, 8, 16, 16] videos,
    the image network images. Refused by key before sampling (it failed in the metrics, after it)."""
    import mpq_lightning.evaluation as E

    monkeypatch.setattr(E, "generate", lambda *a, **k: pytest.fail("sampled before the check"))
    with pytest.raises(ValueError, match=f"eval.feature='{feature}' measures .* this run's samples are \\[4, 4, 8, 8\\]"):
        E.evaluate(str(workdir / "checkpoints" / "full" / "config.yaml"), "last", E.EvalConfig(feature=feature),
                   out=str(workdir / "eval_feature"))
    assert not (workdir / "eval_feature").exists()


def test_optimizer_holds_every_trainable_tensor_after_calibration(full_run):
    """Lightning builds the optimizer before calibration (on_fit_start): calibration and OOLRI must
    write into the existing parameters, never replace them, or the new ones would not train."""
    opt = full_run.trainer.optimizers[0]
    assert isinstance(opt, FlatAdamW)  # the default (optim.flat_params null, single device)
    held = [p for i in range(len(opt.param_groups)) for p in opt.members(i)]
    trainable = [p for p in full_run.model.parameters() if p.requires_grad]
    assert len(held) == len({id(p) for p in held}) and {id(p) for p in held} == {id(p) for p in trainable}
    for i, group in enumerate(opt.param_groups):  # every one still a view of its group's flat tensor
        storage = group["params"][0].untyped_storage().data_ptr()
        assert all(p.untyped_storage().data_ptr() == storage for p in opt.members(i)), group["name"]
    assert not any(p.requires_grad for p in full_run.model.teacher.parameters())


def test_resolved_config_saved_beside_run(full_run, workdir):
    text = (workdir / "checkpoints" / "full" / "config.yaml").read_text()
    assert "w_quantizer: fzrmq" in text and "run_name: full" in text


def test_tensorboard_has_loss_terms_timestep_error_and_images(full_run, workdir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(workdir / "checkpoints" / "full"))
    acc.Reload()
    scalars = set(acc.Tags()["scalars"])
    assert {"train/mse", "train/mtrd", "train/tmd", "train/loss"} <= scalars
    assert any(t.startswith("timestep_error/step_") for t in scalars)
    assert "timestep_error/curve" in acc.Tags()["images"]


def test_validation_logs_every_term_on_held_out_trajectories_and_leaves_training_alone(workdir):
    """``data.init_args.val_trajectories`` turns validation on: every loss term, their sum and the
    per-timestep error are logged under val. Validation changes nothing that training computes: the
    same run with validation off (``limit_val_batches 0``) ends with the identical student and memory
    queue (no queue writes, a forked RNG, and no inference-mode tensor kept by a layer)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    args = ["--trainer.max_steps", "4", "--checkpoint_every_n_steps", "4", "--data.init_args.val_trajectories", "[3]"]
    with_val = fit(*args, "--trainer.val_check_interval", "2", run="val")
    without = fit(*args, "--trainer.limit_val_batches", "0", run="no_val")
    a, b = _student_state(with_val), _student_state(without)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(with_val.model.memory_queue.feats, without.model.memory_queue.feats)
    acc = EventAccumulator(str(workdir / "checkpoints" / "val"))
    acc.Reload()
    scalars = set(acc.Tags()["scalars"])
    assert {"val/mse", "val/mtrd", "val/tmd", "val/loss"} <= scalars
    assert [e.step for e in acc.Scalars("val/loss")] == [1, 3]  # after steps 2 and 4 (0-based event steps)
    assert any(t.startswith("timestep_error_val/step_") for t in scalars)


def test_validate_subcommand_measures_the_quantized_student(workdir, capsys):
    """``train.py validate --config <run>/config.yaml`` validates the run's last checkpoint and gives the
    losses the fit logged at that step: the quantizers on, as in training (after a restore they were
    left off, so validate measured the FP student with its LoRA). The run's config.yaml stays the fit's,
    the events go to ``<run>/validate/``. Without a checkpoint it validates the calibrated, untrained
    student (it reported 0.0: the uncalibrated student, quantizers off, is the teacher)."""
    from mpq_lightning.quant import QuantLayer

    val = ["--data.init_args.val_trajectories", "[3]"]
    cli = fit("--trainer.max_steps", "2", "--trainer.val_check_interval", "2", *val, run="validated")
    logged = {k: float(v) for k, v in cli.trainer.callback_metrics.items() if k.startswith("val/")}
    assert {"val/loss", "val/mse", "val/mtrd", "val/tmd"} <= set(logged)
    run = workdir / "checkpoints" / "validated"
    config = (run / "config.yaml").read_bytes()
    capsys.readouterr()
    again = main(["validate", "--config", str(run / "config.yaml"), *QUIET])
    assert f"validate: checkpoint {run / 'last.ckpt'}" in capsys.readouterr().out
    got = {k: float(v) for k, v in again.trainer.callback_metrics.items() if k.startswith("val/")}
    assert got.keys() == logged.keys()
    assert all(abs(got[k] - logged[k]) <= 1e-6 * abs(logged[k]) for k in got), (got, logged)
    layers = [m for m in again.model.student.modules() if isinstance(m, QuantLayer)]
    assert layers and all(m.weight_quant for m in layers)
    assert (run / "config.yaml").read_bytes() == config
    assert list((run / "validate").glob("events.out.tfevents.*"))

    fresh = main(["validate", "--config", TINY, "--run_name", "validated_fresh", *QUIET, *val])
    assert "the calibrated, untrained student" in capsys.readouterr().out
    assert fresh.model._calibrated and all(
        m.weight_quant for m in fresh.model.student.modules() if isinstance(m, QuantLayer))
    assert float(fresh.trainer.callback_metrics["val/mse"]) > 0
    assert not list((workdir / "checkpoints" / "validated_fresh").glob("*.ckpt"))

    with pytest.raises(ValueError, match=r"data.init_args.val_trajectories"):
        main(["validate", "--config", TINY, "--run_name", "validated_none", *QUIET])
    with pytest.raises(FileNotFoundError, match="validated_fresh has no such checkpoint"):
        main(["validate", "--config", TINY, "--run_name", "validated_fresh", "--ckpt_path", "last", *QUIET, *val])
    with pytest.raises(ValueError, match="train.py runs fit .* and validate; evaluate a run with"):
        main(["test", "--config", TINY])


def test_on_the_fly_validation_keeps_the_time_smoothing_window_of_training(workdir):
    """On the on-the-fly stream (MPQ-DM recipe: TRD over a window of 2 consecutive steps), validation
    between two steps of one window leaves the window alone: the student equals the run without
    validation; validation logs the terms it can judge on its own (TRD's window is training state)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = str(REPO / "configs" / "tiny" / "recipes" / "mpqdm_onthefly.yaml")
    args = ["--config", config, *QUIET, "--trainer.max_steps", "3", "--data.init_args.val_trajectories", "2"]
    with_val = main([*args, "--run_name", "otf_val", "--trainer.val_check_interval", "1"])
    without = main([*args, "--run_name", "otf_no_val", "--trainer.limit_val_batches", "0"])
    a, b = _student_state(with_val), _student_state(without)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    acc = EventAccumulator(str(workdir / "checkpoints" / "otf_val"))
    acc.Reload()
    scalars = set(acc.Tags()["scalars"])
    assert {"val/mse", "val/loss", "train/trd"} <= scalars and "val/trd" not in scalars
    assert len(acc.Scalars("val/loss")) == 3


def test_sample_logger_writes_media(workdir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    main(["--config", TINY, "--run_name", "samples", "--trainer.max_steps", "1",
          "--trainer.enable_progress_bar", "false"])
    acc = EventAccumulator(str(workdir / "checkpoints" / "samples"))
    acc.Reload()
    assert {"samples/video", "samples/frames"} & set(acc.Tags()["images"])


def test_resume_is_exact(full_run, workdir, capsys):
    # Stop after 2 of 4 steps (as a killed job), then resume from last.ckpt for the remaining 2.
    stopped = _fit_with_stop(workdir, "half", stop=2)
    assert stopped.trainer.global_step == 2
    resumed = fit("--trainer.max_steps", "4", "--checkpoint_every_n_steps", "2", "--ckpt_path", "last", run="half")
    assert resumed.trainer.global_step == 4
    assert resumed.model.resuming and not full_run.model.resuming  # MPQCLI's mark (see on_fit_start)
    _assert_trained_alike(resumed, full_run)
    assert torch.equal(resumed.model.memory_queue.step_tags, full_run.model.memory_queue.step_tags)
    assert "learning-rate schedule" not in capsys.readouterr().out  # the same schedule: nothing to say

    # trained on to 6 steps: the linear schedule is rebuilt over 6 steps from step 4, and the run says so
    longer = fit("--trainer.max_steps", "6", "--checkpoint_every_n_steps", "2", "--ckpt_path", "last", run="half")
    assert longer.trainer.global_step == 6
    assert ("note: the linear learning-rate schedule (model.optim.schedule) of the resumed checkpoint ran over 4 "
            "optimiser steps, this fit's over 6 (trainer.max_steps / max_epochs): from step 4 the learning rates "
            "follow the 6-step schedule") in " ".join(capsys.readouterr().out.split())
    assert torch.load(workdir / "checkpoints" / "half" / "last.ckpt", weights_only=False)["mpq_schedule_steps"] == 6


@pytest.mark.skipif(not any(map(shutil.which, ("g++", "c++", "clang++"))), reason="no C++ compiler for inductor")
def test_compile_switches_train_through_the_app(workdir):
    """``--model.quant.compile_quantizers true`` and ``--model.compile_model true`` (whole backbones, here
    with ``--model.compile_mode reduce-overhead``, whose CUDA graphs a CPU skips) train through Lightning,
    and their first loss (same seed, data, calibration) is the eager run's. ``--model.compile_scope
    blocks`` with inductor's C++ wrapper through ``--model.compile_options`` reaches the blocks, not the
    backbone, from the command line (``max_steps 0``: wrapped, not compiled). A one-block STDiT keeps
    CI's cold compile short: the compiled blocks' values and gradients are test_compiled_quantizers',
    the C++ wrapper's compiled steps the step-time benchmark's (``--compile-options
    '{"cpp_wrapper": true}'``)."""
    small = ("--model.model_kwargs", "{config: {depth: 1}}", "--data.init_args.cache", "data/depth1",
             "--data.init_args.recipe.name", "depth1", "--trainer.max_steps", "1")  # its own teacher's cache
    eager = fit(*small, run="eager1")
    compiled = fit(*small, "--model.quant.compile_quantizers", "true", run="compiled1")
    whole = fit(*small, "--model.compile_model", "true", "--model.compile_mode", "reduce-overhead", run="compiled_model1")
    blocks = fit(*small[:-2], "--trainer.max_steps", "0", "--model.compile_model", "true", "--model.compile_scope", "blocks",
                 "--model.compile_options", "{cpp_wrapper: true}", run="compiled_blocks0")
    from mpq_lightning.quant import QuantLayer

    layers = [m for m in compiled.model.student.modules() if isinstance(m, QuantLayer)]
    assert layers and all(m.spec.compile_quantizers for m in layers) and compiled.trainer.global_step == 1
    backbone = whole.model.student.backbone
    assert backbone._compiled_call_impl is not None and whole.trainer.global_step == 1
    assert whole.model.compile_mode == "reduce-overhead" and blocks.model.compile_options == {"cpp_wrapper": True}
    for model in (blocks.model.student, blocks.model.teacher):
        assert model.backbone._compiled_call_impl is None and len(model.backbone.blocks) == 1
        assert all(blk._compiled_call_impl is not None for blk in model.backbone.blocks)
    a, b, c = (float(r.trainer.callback_metrics["train/loss"]) for r in (eager, compiled, whole))
    assert a == pytest.approx(b, rel=1e-5) and a == pytest.approx(c, rel=1e-5)
    assert torch.isfinite(torch.tensor(c))


def _fit_with_stop(workdir, run: str, stop: int, config: str = TINY, every: int = 2, extra: tuple = ()):
    """Like ``fit`` but with a StopAt callback added through the config (``extra``: more arguments)."""
    cfg = workdir / f"stop_{run}.yaml"
    cfg.write_text(
        "trainer:\n  callbacks:\n    - class_path: test_app.StopAt\n      init_args: {step: %d}\n" % stop
    )
    with _probes():
        return main(["--config", config, "--config", str(cfg), "--run_name", run, *QUIET,
                     "--trainer.max_steps", "4", "--checkpoint_every_n_steps", str(every), *extra])


def test_resume_with_validation_after_every_step_is_exact(workdir):
    """With validation on (as in the embedded default), stopping after 2 of 4 steps and resuming with
    ``--ckpt_path last`` gives the uninterrupted run's student and memory queue: neither the resumed
    run's sanity check nor the validations between steps change anything training computes."""
    val = ("--data.init_args.val_trajectories", "[3]", "--trainer.val_check_interval", "1")
    full = fit("--trainer.max_steps", "4", "--checkpoint_every_n_steps", "2", *val, run="val_full")
    assert _fit_with_stop(workdir, "val_half", stop=2, extra=val).trainer.global_step == 2
    resumed = fit("--trainer.max_steps", "4", "--checkpoint_every_n_steps", "2", "--ckpt_path", "last", *val,
                  run="val_half")
    _assert_trained_alike(resumed, full)


def test_resume_inside_a_trd_window_is_exact(workdir):
    """MPQ-DM's TRD averages features over 2 consecutive sampler steps of an in-order on-the-fly
    stream. Stopped after step 1 (a window half full) and resumed, the window is completed with the
    saved step, as without the stop."""
    config = str(REPO / "configs" / "tiny" / "recipes" / "mpqdm_onthefly.yaml")
    args = [*QUIET, "--trainer.max_steps", "4", "--checkpoint_every_n_steps", "1"]
    full = main(["--config", config, "--run_name", "trd_full", *args])
    _fit_with_stop(workdir, "trd_half", stop=1, config=config, every=1)
    assert "mpq_trd_pending" in torch.load(workdir / "checkpoints" / "trd_half" / "last.ckpt", weights_only=False)
    resumed = main(["--config", config, "--run_name", "trd_half", *args, "--ckpt_path", "last"])
    _assert_trained_alike(resumed, full, queue=False)


def _signal_probe(batch: int, signum: int, rank: int = 0) -> str:
    return ("--trainer.callbacks+={class_path: app_probes.SignalAt, init_args: {batch: %d, signum: %d, rank: %d}}"
            % (batch, signum, rank))


def test_sigterm_saves_the_step_it_stops_at_and_resumes_exactly(full_run, workdir):
    """A SIGTERM (a scheduler preempting the job) after step 3 of 4, between the periodic checkpoints
    of steps 2 and 4: the fit stops at the end of step 3 with exit status 143 (Lightning's own exits
    with 0 and keeps only step 2), last.ckpt holds step 3, the signal handlers are given back, and
    resuming with ``--ckpt_path last`` ends with the uninterrupted run's student and memory queue."""
    import signal

    from lightning.pytorch.utilities.exceptions import SIGTERMException

    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    args = ("--trainer.max_steps", "4", "--checkpoint_every_n_steps", "2")
    with _probes():
        with pytest.raises(SIGTERMException) as stopped:
            fit(*args, _signal_probe(batch=2, signum=signal.SIGTERM), run="preempted")
    assert stopped.value.code == 143 and stopped.value.signum == signal.SIGTERM
    assert {s: signal.getsignal(s) for s in handlers} == handlers
    run = workdir / "checkpoints" / "preempted"
    assert torch.load(run / "last.ckpt", weights_only=False)["global_step"] == 3
    assert not (run / "step000004.ckpt").exists()
    resumed = fit(*args, "--ckpt_path", "last", run="preempted")
    assert resumed.trainer.global_step == 4
    _assert_trained_alike(resumed, full_run)


def test_sigterm_with_validation_after_every_step_resumes_exactly(workdir):
    """The stop is taken before that step's validation: resumed, the run (validating after every step,
    as a sanity check does first) ends with the straight run's student and memory queue."""
    import signal

    from lightning.pytorch.utilities.exceptions import SIGTERMException

    args = ("--trainer.max_steps", "4", "--checkpoint_every_n_steps", "2", "--data.init_args.val_trajectories", "[3]",
            "--trainer.val_check_interval", "1")
    straight = fit(*args, run="val_straight")
    with _probes(), pytest.raises(SIGTERMException):
        fit(*args, _signal_probe(batch=2, signum=signal.SIGTERM), run="val_preempted")
    resumed = fit(*args, "--ckpt_path", "last", run="val_preempted")
    assert resumed.trainer.global_step == 4
    _assert_trained_alike(resumed, straight)


def test_a_resumed_run_hides_the_events_logged_after_its_checkpoint(workdir):
    """A run that died at step 4, after logging it, with last.ckpt at step 2: resumed, TensorBoard
    shows every step once (the old file's events from step 2 on are purged), not two curves over
    each other."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    args = ("--trainer.max_steps", "6", "--checkpoint_every_n_steps", "2", "--trainer.log_every_n_steps", "1")
    with _probes():
        with pytest.raises(MemoryError, match="crash at step 4"):
            fit(*args, "--trainer.callbacks+={class_path: app_probes.CrashAt, init_args: {step: 4}}", run="crashed_tb")
    run = workdir / "checkpoints" / "crashed_tb"
    assert torch.load(run / "last.ckpt", weights_only=False)["global_step"] == 2
    fit(*args, "--ckpt_path", "last", run="crashed_tb")
    assert len(list(run.glob("events.out.tfevents.*"))) == 2
    acc = EventAccumulator(str(run))
    acc.Reload()
    steps = [e.step for e in acc.Scalars("train/loss")]
    assert steps == list(range(6)), steps
    errors = [e.step for e in acc.Scalars(next(t for t in acc.Tags()["scalars"] if t.startswith("timestep_error/step_")))]
    assert errors == sorted(set(errors)), errors


def test_ctrl_c_stops_at_the_end_of_the_optimiser_step_and_saves(workdir):
    """A Ctrl-C inside a gradient-accumulation window (batch 3 of 2-batch steps: step 1 done, step 2
    half) stops at the end of step 2, not mid-window, saves it and exits with 130."""
    import signal

    from lightning.pytorch.utilities.exceptions import SIGTERMException

    with _probes():
        with pytest.raises(SIGTERMException) as stopped:
            fit("--trainer.max_steps", "4", "--checkpoint_every_n_steps", "4", "--trainer.accumulate_grad_batches", "2",
                _signal_probe(batch=2, signum=signal.SIGINT), run="ctrl_c")
    assert stopped.value.code == 130
    ckpt = torch.load(workdir / "checkpoints" / "ctrl_c" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 2 and ckpt["loops"]["fit_loop"]["epoch_loop.batch_progress"]["total"]["processed"] == 4


def test_a_run_without_an_end_trains_until_a_signal_stops_it(workdir):
    """``max_steps -1, max_epochs -1`` with a constant learning rate trains until stopped; a SIGTERM
    then saves the step it stopped at."""
    import signal

    from lightning.pytorch.utilities.exceptions import SIGTERMException

    with _probes():
        with pytest.raises(SIGTERMException) as stopped:
            fit("--trainer.max_steps", "-1", "--trainer.max_epochs", "-1", "--model.optim.schedule", "constant",
                _signal_probe(batch=2, signum=signal.SIGTERM), run="endless")
    assert stopped.value.code == 143
    assert torch.load(workdir / "checkpoints" / "endless" / "last.ckpt", weights_only=False)["global_step"] == 3


def test_a_sigterm_before_training_stops_after_the_first_step_and_saves_it(workdir):
    """A SIGTERM that Lightning's handler received before ours took over at train start (during the
    sanity check, say) is not lost: the run stops after its first step, saves it and exits with 143."""
    import signal

    from lightning.pytorch.utilities.exceptions import SIGTERMException

    with _probes(), pytest.raises(SIGTERMException) as stopped:
        fit("--trainer.max_steps", "4", _signal_probe(batch=-1, signum=signal.SIGTERM), run="early_sigterm")
    assert stopped.value.code == 143
    assert torch.load(workdir / "checkpoints" / "early_sigterm" / "last.ckpt", weights_only=False)["global_step"] == 1


def test_slurm_requeue_signal_saves_the_step_and_requeues_and_no_run_resumes_a_foreign_hpc_checkpoint(
        full_run, workdir, monkeypatch, tmp_path):
    """Under SLURM (Lightning's SLURMEnvironment, auto-requeue on): the requeue signal (SIGUSR1) stops
    at the step's end like SIGTERM, saves last.ckpt there, runs ``scontrol requeue <job>`` and exits with
    138; no ``hpc_ckpt_<n>.ckpt`` is written (Lightning's handler saved one into the shared root, maybe
    mid-step). One found there (another run's) is refused for a run started without --ckpt_path, which
    Lightning would silently continue from it."""
    import signal

    from lightning.pytorch.utilities.exceptions import SIGTERMException

    for key, value in {"SLURM_NTASKS": "1", "SLURM_JOB_NAME": "train", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
                       "SLURM_NODEID": "0", "SLURM_JOB_ID": "4242", "SLURM_NTASKS_PER_NODE": "1"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    scontrol = tmp_path / "scontrol"
    scontrol.write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path / 'calls'}\n")
    scontrol.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    with _probes(), pytest.raises(SIGTERMException) as stopped:
        fit("--trainer.max_steps", "4", "--checkpoint_every_n_steps", "2",
            _signal_probe(batch=2, signum=signal.SIGUSR1), run="requeued")
    assert stopped.value.code == 128 + signal.SIGUSR1
    assert torch.load(workdir / "checkpoints" / "requeued" / "last.ckpt", weights_only=False)["global_step"] == 3
    assert (tmp_path / "calls").read_text() == "requeue 4242\n"
    assert not list((workdir / "checkpoints").glob("hpc_ckpt_*"))
    hpc = workdir / "checkpoints" / "hpc_ckpt_1.ckpt"
    shutil.copy(workdir / "checkpoints" / "full" / "last.ckpt", hpc)  # as a Lightning-style job leaves it
    try:
        with pytest.raises(FileExistsError, match=r"checkpoints/hpc_ckpt_1.ckpt: under SLURM, Lightning resumes a fit "
                                                  r"started without --ckpt_path from this auto-requeue checkpoint"):
            fit("--trainer.max_steps", "1", run="fresh_under_slurm")
        assert not (workdir / "checkpoints" / "fresh_under_slurm").exists()
    finally:
        hpc.unlink()


def test_a_second_ctrl_c_stops_at_once_and_sigterm_never_does(monkeypatch):
    """The stop handler: the first Ctrl-C asks for a stop at the step's end; the same press passed on
    twice (a terminal and torchrun, within a second) changes nothing; a later one raises
    KeyboardInterrupt (Lightning's immediate stop, no save). In a forked DataLoader worker it does
    nothing (the worker keeps serving the step). Repeated SIGTERMs only ask again."""
    import signal

    import mpq_lightning.callbacks.run_checkpoint as R

    clock = [100.0]
    monkeypatch.setattr(R.time, "monotonic", lambda: clock[0])
    cb = R.RunCheckpoint()
    cb._rank_zero = False
    cb._ask_to_stop(signal.SIGINT, None)
    assert cb._stop_signal == signal.SIGINT
    clock[0] += 0.5
    cb._ask_to_stop(signal.SIGINT, None)
    clock[0] += 1.0
    with pytest.raises(KeyboardInterrupt):
        cb._ask_to_stop(signal.SIGINT, None)
    worker = R.RunCheckpoint()  # a DataLoader worker forked with the handler: the signal is the main process's
    monkeypatch.setattr(R.os, "getpid", lambda: worker._pid + 1)
    worker._ask_to_stop(signal.SIGINT, None)
    clock[0] += 5
    worker._ask_to_stop(signal.SIGINT, None)
    assert worker._stop_signal is None
    monkeypatch.undo()
    monkeypatch.setattr(R.time, "monotonic", lambda: clock[0])
    term = R.RunCheckpoint()
    term._rank_zero = False
    for _ in range(3):
        clock[0] += 5
        term._ask_to_stop(signal.SIGTERM, None)
    assert term._stop_signal == signal.SIGTERM


def test_a_sigterm_stop_without_our_checkpoint_still_exits_non_zero(capsys):
    """Lightning's own SIGTERMException (a SIGTERM before training, or with checkpointing off) carries
    no status, which Python turns into 0: train.py exits with 143."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from mpq_lightning.cli import run_script

    def preempted():
        raise SIGTERMException

    with pytest.raises(SystemExit) as exit_:
        run_script(preempted)
    assert exit_.value.code == 143 and "stopped by SIGTERM" in capsys.readouterr().err


def test_a_ctrl_c_outside_training_exits_130_without_a_traceback(capsys, monkeypatch):
    """A Ctrl-C while the trajectory cache is generated, the student calibrated or evaluate.py samples
    (outside RunCheckpoint's stop at a step's end): one line and status 130, not Python's traceback;
    MPQ_TRACEBACK=1 keeps the traceback."""
    from mpq_lightning.cli import run_script

    def interrupted():
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as exit_:
        run_script(interrupted)
    assert exit_.value.code == 130 and "interrupted (Ctrl-C)" in capsys.readouterr().err
    monkeypatch.setenv("MPQ_TRACEBACK", "1")
    with pytest.raises(KeyboardInterrupt):
        run_script(interrupted)


def _digests(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def test_a_new_run_from_a_runs_config_writes_into_its_own_folder(full_run, workdir):
    """``train.py --config checkpoints/<run>/config.yaml --run_name new``: the saved config holds the
    callbacks and logger train.py added for that run; its RunCheckpoint saved the new run's last.ckpt
    over the old run's and its logger wrote the events there. They follow the new run's settings now
    (folder, checkpoint interval, progress bar, samples), and the old run is untouched."""
    import yaml

    full = workdir / "checkpoints" / "full"
    before = _digests(full)
    main(["--config", str(full / "config.yaml"), "--run_name", "from_full", "--trainer.max_steps", "2",
          "--checkpoint_every_n_steps", "1", "--trainer.enable_progress_bar", "true", "--log_samples", "true"])
    assert _digests(full) == before
    new = workdir / "checkpoints" / "from_full"
    assert {"step000001.ckpt", "step000002.ckpt", "last.ckpt", "config.yaml"} <= {p.name for p in new.iterdir()}
    assert any(new.glob("events.out.tfevents.*"))
    saved = yaml.safe_load((new / "config.yaml").read_text())["trainer"]
    assert saved["logger"]["init_args"]["name"] == "from_full"
    names = [c["class_path"].rsplit(".", 1)[-1] for c in saved["callbacks"]]
    assert sorted(names) == sorted(["RunCheckpoint", "LearningRateMonitor", "StepRichProgressBar", "PerTimestepError",
                                    "SampleLogger"])  # each once
    # and from that config, with the bar and the samples off again (Lightning refused a bar it had)
    cli = main(["--config", str(new / "config.yaml"), "--run_name", "from_from_full", "--trainer.max_steps", "1",
                "--trainer.enable_progress_bar", "false", "--log_samples", "false"])
    assert {type(c).__name__ for c in cli.trainer.callbacks} & {"StepRichProgressBar", "SampleLogger"} == set()
    # under another root too
    main(["--config", str(full / "config.yaml"), "--trainer.default_root_dir", "other_root", "--trainer.max_steps", "1",
          *QUIET])
    assert _digests(full) == before
    assert any((workdir / "other_root" / "full").glob("events.out.tfevents.*"))


def test_resuming_an_earlier_checkpoint_never_overwrites_later_ones(workdir):
    """Resuming step 2 of a run that reached step 4, inside its own folder, would save over
    step000004.ckpt, last.ckpt and config.yaml: refused, naming them, before anything is written; the
    same checkpoint continues in a folder of its own."""
    args = ("--trainer.max_steps", "4", "--checkpoint_every_n_steps", "2")
    fit(*args, run="branch")
    run = workdir / "checkpoints" / "branch"
    before = _digests(run)
    with pytest.raises(FileExistsError, match=r"resumes at step 2, but .* holds later checkpoints this run would "
                                              r"overwrite: step000004.ckpt, last.ckpt \(step 4\)"):
        fit(*args, "--ckpt_path", str(run / "step000002.ckpt"), "--model.optim.lora_lr", "0.001", run="branch")
    assert _digests(run) == before
    other = fit(*args, "--ckpt_path", str(run / "step000002.ckpt"), "--model.optim.lora_lr", "0.001", run="branch_b")
    assert other.trainer.global_step == 4 and _digests(run) == before


def test_a_run_being_trained_is_refused_to_a_second_train_py(workdir):
    """While one process trains a run (it holds the run's lock), a second train.py on that run is
    refused before it writes or deletes anything: resuming it with --ckpt_path last, or starting it
    afresh with --overwrite_run true. Once the first is done the run resumes as before."""
    from mpq_lightning.files import RunLock

    args = ("--trainer.max_steps", "2", "--checkpoint_every_n_steps", "2")
    fit(*args, run="busy")
    run = workdir / "checkpoints" / "busy"
    lock = RunLock(run)
    lock.acquire()  # as the first job would, in another process
    before = _digests(run)
    try:
        for extra in (("--ckpt_path", "last", "--trainer.max_steps", "4"), ("--overwrite_run", "true")):
            with pytest.raises(FileExistsError, match=rf"run folder checkpoints/busy is being trained by pid {os.getpid()} "):
                fit(*args, *extra, run="busy")
            assert _digests(run) == before
    finally:
        lock.release()
    assert fit(*args, "--ckpt_path", "last", "--trainer.max_steps", "4", run="busy").trainer.global_step == 4


def test_the_printed_next_commands_work_for_any_run_name(workdir, capsys):
    """The commands printed after a fit paste into a shell as they are: a run name with a space and
    brackets (which Rich would read as markup) is quoted, and names the run's config."""
    import shlex

    fit("--trainer.max_steps", "1", run="exp/a [b]")
    out = capsys.readouterr().out
    assert "Run folder: checkpoints/exp/a [b] (config.yaml, last.ckpt, TensorBoard events)" in out
    commands = [shlex.split(line) for line in out.splitlines() if line.startswith("  python")]
    assert [c[:2] for c in commands] == [["python", "evaluate.py"], ["python", "-m"]]
    for command in commands:
        assert (workdir / command[command.index("--config") + 1]).is_file()


@pytest.mark.parametrize("args, error, match", [
    (("--data.init_args.val_trajectories", "[0, 1, 2, 3]"), Exception,
     r"the selection .* without the validation trajectories \[0, 1, 2, 3\]\) is empty"),
    (("--trainer.accumulate_grad_batches", "0"), ValueError, r"trainer.accumulate_grad_batches must be an integer >= 1"),
    (("--checkpoint_every_n_steps", "-5"), SystemExit, None),  # the parser's error, naming the key
    (("--trainer.max_steps", "-1", "--trainer.max_epochs", "-1"), ValueError,  # (it overflowed in configure_optimizers)
     r"model.optim.schedule linear decays the learning rate over the run's length, but this run has none"),
    (("--trainer.max_steps", "-1", "--trainer.max_time", "00:00:01:00"), ValueError,  # (it trained at a rate of 0)
     r"model.optim.schedule linear decays .* until trainer.max_time, which bounds its time, not its steps"),
])
def test_settings_that_cannot_train_are_refused_before_the_run_folder_is_written(workdir, args, error, match):
    """Found before any file is written (they surfaced after config.yaml and the events: at calibration's
    first batch, or as Lightning's ZeroDivisionError at the first batch)."""
    with pytest.raises(error, match=match):
        fit("--trainer.max_steps", "1", *args, run="never")
    assert not (workdir / "checkpoints" / "never").exists()


def test_a_config_that_is_not_yaml_is_named_with_its_line(full_run, workdir):
    """A YAML syntax error in one of several --config files (train.py), or in a run's config.yaml
    (evaluate.py, export), names the file, line and column (jsonargparse's and a string load's name
    "<unicode string>"); a run config that is not a mapping is refused by name too."""
    from mpq_lightning.evaluation import load_run
    from mpq_lightning.export import load_qat_module

    broken = workdir / "broken_run" / "config.yaml"
    broken.parent.mkdir()
    broken.write_text("model:\n  quant:\n    w_bits: 3\n   a_bits: 6\n")
    shutil.copy(workdir / "checkpoints" / "full" / "last.ckpt", broken.parent / "last.ckpt")
    named = rf"{re.escape(str(broken))} is not valid YAML: .*\n  in \"{re.escape(str(broken))}\", line 4, column 4"
    with pytest.raises(ValueError, match="(?s)--config " + named):
        main(["--config", TINY, "--config", str(broken)])
    for load in (load_run, load_qat_module):
        with pytest.raises(ValueError, match="(?s)config " + named):
            load(str(broken), "last")
    broken.write_text("- a list\n")
    for load in (load_run, load_qat_module):
        with pytest.raises(ValueError, match=r"holds no mapping of options"):
            load(str(broken), "last")


def test_resume_with_other_bits_is_refused(full_run, workdir):
    run = workdir / "checkpoints" / "full"
    before = _digests(run)
    with pytest.raises(ValueError, match=r"last.ckpt does not match .*quant.w_bits: checkpoint 3 vs config 4"):
        fit("--trainer.max_steps", "6", "--ckpt_path", "last", "--model.quant.w_bits", "4", run="full")
    assert _digests(run) == before  # refused before anything was written: config.yaml included
    with pytest.raises(ValueError, match=r"quant.keep_fp: .*model.use_model_defaults adds the backbone's keep-FP list "
                                         r"and bit map to these: it is False now"):
        fit("--trainer.max_steps", "6", "--ckpt_path", "last", "--model.use_model_defaults", "false", run="full")
    assert _digests(run) == before


def test_checkpoint_file_of_another_model_is_refused(full_run, workdir):
    """An explicit checkpoint file is checked like ``last``: the config decides the model (the
    checkpoint's saved hyper-parameters do not replace it) and a mismatch is refused by name."""
    ckpt = str(workdir / "checkpoints" / "full" / "last.ckpt")
    with pytest.raises(ValueError, match=r"does not match .*teacher_hash: checkpoint"):
        fit("--ckpt_path", ckpt, "--model.model_kwargs", "{config: {depth: 1}}", run="other_model")
    with pytest.raises(ValueError, match=r"quant.a_bits: checkpoint 6 vs config 8"):
        fit("--ckpt_path", ckpt, "--model.quant.a_bits", "8", run="other_model")
    assert not (workdir / "checkpoints" / "other_model").exists()


def test_execution_only_switches_do_not_block_a_resume(full_run):
    module = full_run.model
    ckpt = {"mpq_identity": module._identity()}
    ckpt["mpq_identity"]["quant"] = {**ckpt["mpq_identity"]["quant"], "compile_quantizers": True,
                                     "calib_stats_device": "cuda"}
    module.check_checkpoint(ckpt)
    ckpt["mpq_identity"]["quant"]["lora_rank"] = 99
    with pytest.raises(ValueError, match="quant.lora_rank: checkpoint 99"):
        module.check_checkpoint(ckpt)


def test_a_run_folder_with_checkpoints_is_not_reused_by_accident(full_run, workdir):
    run = workdir / "checkpoints" / "full"
    before = _digests(run)
    with pytest.raises(FileExistsError, match=r"checkpoints/full already holds an earlier run .*--ckpt_path last.*--overwrite_run true"):
        fit("--trainer.max_steps", "2", run="full")
    assert _digests(run) == before


def test_run_folders_are_never_mixed_or_lost(full_run, workdir):
    """Another run's checkpoint is not resumed into a folder holding a run; `--ckpt_path last` with no
    last.ckpt starts afresh only in a folder without a run; a folder a crashed run left without any
    checkpoint is refused too; --overwrite_run deletes the old run only after every check and the cache
    succeeded, and never the checkpoint it starts from."""
    full = workdir / "checkpoints" / "full"
    other = workdir / "checkpoints" / "other"
    other.mkdir(parents=True)
    (other / "step000002.ckpt").write_bytes((full / "step000002.ckpt").read_bytes())  # no last.ckpt
    before = _digests(other)
    with pytest.raises(FileExistsError, match=r"--ckpt_path last: run folder checkpoints/other has no last.ckpt but "
                                              r"holds checkpoints \(step000002.ckpt\): resume one with --ckpt_path"):
        fit("--trainer.max_steps", "2", "--ckpt_path", "last", run="other")
    with pytest.raises(FileExistsError, match=r"--ckpt_path .*full/step000002.ckpt is another run's checkpoint"):
        fit("--trainer.max_steps", "3", "--ckpt_path", str(full / "step000002.ckpt"), run="other")
    with pytest.raises(ValueError, match=r"--overwrite_run true would delete .*other/step000002.ckpt"):
        fit("--trainer.max_steps", "3", "--ckpt_path", str(other / "step000002.ckpt"), "--overwrite_run", "true",
            run="other")
    # a failing check after --overwrite_run (here: the cache of another recipe) leaves the old run in place
    with pytest.raises(Exception, match=r"recipe.num_trajectories"):
        fit("--trainer.max_steps", "2", "--overwrite_run", "true", "--data.init_args.recipe.num_trajectories", "3",
            run="other")
    assert _digests(other) == before
    crashed = workdir / "checkpoints" / "crashed"
    crashed.mkdir()
    (crashed / "config.yaml").write_text("run_name: crashed\n")
    with pytest.raises(FileExistsError, match=r"checkpoints/crashed holds an earlier run that saved no checkpoint \(config.yaml\)"):
        fit("--trainer.max_steps", "1", run="crashed")
    # a job preempted before its first checkpoint is requeued with the same command: it starts afresh
    requeued = fit("--trainer.max_steps", "1", "--ckpt_path", "last", run="crashed")
    assert requeued.trainer.global_step == 1 and (crashed / "last.ckpt").is_file()
    with pytest.raises(ValueError, match=r"--overwrite_run true with --ckpt_path last: that resumes .*crashed/last.ckpt"):
        fit("--trainer.max_steps", "2", "--ckpt_path", "last", "--overwrite_run", "true", run="crashed")
    assert (crashed / "last.ckpt").is_file()


def test_resume_with_other_optimizer_groups_is_refused_before_anything_is_written(full_run, workdir):
    run = workdir / "checkpoints" / "full"
    before = _digests(run)
    with pytest.raises(ValueError, match=r"last.ckpt: its optimiser has \d+ parameter groups, this config builds \d+ "
                                         r"\(first difference at group \d+.*model.optim"):
        fit("--trainer.max_steps", "6", "--ckpt_path", "last", "--model.optim.lora_lr", "null", run="full")
    assert _digests(run) == before


def test_resume_mid_epoch_under_another_data_layout_is_refused_before_anything_is_written(full_run, workdir):
    run = workdir / "checkpoints" / "layout"
    shutil.copytree(workdir / "checkpoints" / "full", run)
    before = _digests(run)
    with pytest.raises(ValueError, match=r"stopped in the middle of epoch 0 .*batch_size: saved 4, now 2.*"
                                         r"data.init_args.on_layout_change next_epoch"):
        fit("--trainer.max_steps", "5", "--ckpt_path", "last", "--data.init_args.batch_size", "2", run="layout")
    assert _digests(run) == before  # config.yaml included
    cli = fit("--trainer.max_steps", "5", "--ckpt_path", "last", "--data.init_args.batch_size", "2",
              "--data.init_args.on_layout_change", "next_epoch", run="layout")
    assert cli.trainer.global_step == 5 and cli.trainer.current_epoch == 1


def test_sampler_step_count_must_match_the_tables_before_any_cache_is_built(workdir):
    with pytest.raises(ValueError, match=r"model.quant.num_steps=10 but the training sampler has 7 steps "
                                         r"\(data.init_args.recipe.num_inference_steps\)"):
        fit("--data.init_args.recipe.num_inference_steps", "7", "--data.init_args.recipe.name", "tiny_stdit_ddim7",
            "--data.init_args.cache", "data/tiny_stdit_ddim7", run="bad")
    assert not (workdir / "data" / "tiny_stdit_ddim7").exists()


def test_validation_trajectories_beyond_the_recipe_are_refused_before_any_cache_is_built(workdir):
    with pytest.raises(ValueError, match=r"data.init_args.val_trajectories \[4\] out of range: the recipe makes 4"):
        fit("--data.init_args.val_trajectories", "[1, 4]", "--data.init_args.recipe.name", "tiny_stdit_val",
            "--data.init_args.cache", "data/tiny_stdit_val", run="bad_val")
    assert not (workdir / "data" / "tiny_stdit_val").exists() and not (workdir / "checkpoints" / "bad_val").exists()


def test_overwrite_run_starts_afresh_and_the_final_step_is_saved(workdir):
    run = workdir / "checkpoints" / "again"
    fit("--trainer.max_steps", "2", "--checkpoint_every_n_steps", "2", run="again")
    assert {"last.ckpt", "step000002.ckpt", "config.yaml"} <= set(_digests(run))
    # 3 steps, a checkpoint every 2: last.ckpt still holds step 3 (Lightning alone would leave step 2)
    fit("--trainer.max_steps", "3", "--checkpoint_every_n_steps", "2", "--overwrite_run", "true", run="again")
    assert torch.load(run / "last.ckpt", weights_only=False)["global_step"] == 3
    assert not list(run.glob("last-v*.ckpt"))
    events = list(run.glob("events.out.tfevents.*"))
    assert len(events) == 1  # the earlier run's events were removed with its checkpoints


def test_checkpoint_keys_are_checked_although_lightning_loads_non_strictly(full_run, workdir):
    # strict_loading is off (FSDP / DeepSpeed load module states before on_load_checkpoint and the
    # checkpoint has no teacher keys), so on_load_checkpoint refills teacher / FP keys and checks the rest.
    module = full_run.model
    assert module.strict_loading is False
    ckpt = torch.load(workdir / "checkpoints" / "full" / "last.ckpt", weights_only=False)
    module.on_load_checkpoint(ckpt)  # a genuine checkpoint: teacher and frozen FP weights refilled
    assert set(ckpt["state_dict"]) == set(module.state_dict())
    ckpt = torch.load(workdir / "checkpoints" / "full" / "last.ckpt", weights_only=False)
    lora = next(k for k in ckpt["state_dict"] if "lora" in k)
    ckpt["state_dict"]["student.bogus.weight"] = torch.zeros(1)
    del ckpt["state_dict"][lora]
    with pytest.raises(ValueError, match=rf"missing keys \['{lora}'\].*unexpected keys \['student.bogus.weight'\]"):
        module.on_load_checkpoint(ckpt)


@pytest.mark.parametrize("probe, message", [
    ("NanAt", r"non-finite loss at global step 3 \(rank 0's last terms: \{'mse': nan"),
    # a finite loss whose gradient is NaN (e.g. an LSQ step at 0): the optimiser step is not taken
    ("NanGradAt", r"non-finite gradient at global step 3 with a finite loss \(rank 0: student\."),
])
def test_non_finite_training_stops_naming_the_step_and_keeps_last_checkpoint(workdir, probe, message):
    """The loss (or a gradient) turns non-finite at step 3, between the checkpoints of steps 2 and 4: the
    run stops naming step 3 and the term (or parameter), and last.ckpt is still the good one of step 2."""
    run = workdir / "checkpoints" / f"diverges_{probe}"
    with pytest.raises(FloatingPointError, match=message):
        fit("--trainer.max_steps", "6", "--checkpoint_every_n_steps", "2", f"--trainer.callbacks+=app_probes.{probe}",
            "--trainer.callbacks.init_args.step", "3", run=f"diverges_{probe}")
    last = torch.load(run / "last.ckpt", weights_only=False)
    assert last["global_step"] == 2
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values() if v.is_floating_point())
    assert sorted(p.name for p in run.glob("*.ckpt")) == ["last.ckpt", "step000002.ckpt"]


def _check_finite_on_ranks(losses: list[float], grads: list[float]) -> list[str]:
    """QATModule.check_finite on two simulated DDP ranks: rank r's loss is ``losses[r]`` and its averaged
    gradient entry ``grads[r]`` (DDP makes one rank's NaN everyone's); the strategy's sum-reduce adds both
    ranks' flags. Returns each rank's message and checks that no parameter moved."""
    import types

    from mpq_lightning.module import QATModule

    def flags_of(loss, grad):
        return torch.tensor([float(not math.isfinite(loss)), float(not math.isfinite(grad))])

    total = flags_of(losses[0], grads[0]) + flags_of(losses[1], grads[1])
    messages = []
    for rank in (0, 1):
        net = torch.nn.Linear(3, 1)
        net.weight.grad = torch.zeros_like(net.weight)
        net.bias.grad = torch.full_like(net.bias, grads[rank])
        before = [p.detach().clone() for p in net.parameters()]
        loss = torch.tensor(losses[rank])
        strategy = types.SimpleNamespace(reduce=lambda t, reduce_op: total.clone() if reduce_op == "sum" else None)
        fake = types.SimpleNamespace(
            trainer=types.SimpleNamespace(precision_plugin=types.SimpleNamespace(), world_size=2, strategy=strategy),
            _loss_finite=torch.isfinite(loss), _loss_terms={"mse": loss}, global_step=3, global_rank=rank,
            named_parameters=net.named_parameters, device=torch.device("cpu"))
        try:
            QATModule.check_finite(fake, torch.optim.SGD(net.parameters(), lr=0.1))
            messages.append("no error")
        except FloatingPointError as err:
            messages.append(str(err))
        assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))
    return messages


def test_non_finite_check_under_ddp_names_the_cause_on_every_rank():
    """DDP averages gradients: rank 1's NaN loss makes rank 0's gradients NaN too, yet every rank reports
    the non-finite loss (rank 1 with its terms); a NaN gradient with finite losses is reported as such;
    finite everywhere passes."""
    nan, inf = float("nan"), float("inf")
    r0, r1 = _check_finite_on_ranks([1.0, nan], [nan, nan])
    assert r1.startswith("non-finite loss at global step 3 (rank 1's last terms: {'mse': nan")
    assert r0.startswith("non-finite loss at global step 3 on 1 other rank(s) than rank 0")
    r0, r1 = _check_finite_on_ranks([1.0, 1.0], [0.5, inf])
    assert r1.startswith("non-finite gradient at global step 3 with a finite loss (rank 1: bias)")
    assert r0.startswith("non-finite gradient at global step 3 on 1 other rank(s) than rank 0")
    assert _check_finite_on_ranks([1.0, 2.0], [0.5, 0.25]) == ["no error", "no error"]


def test_a_non_finite_state_is_never_saved(full_run):
    module = full_run.model
    key = next(k for k, v in module.state_dict().items() if "lora" in k)
    sd = {k: v.clone() for k, v in module.state_dict().items()}
    sd[key].view(-1)[0] = float("nan")
    with pytest.raises(FloatingPointError, match=rf"not saving a checkpoint at global step \d+: non-finite values in {key}"):
        module.on_save_checkpoint({"state_dict": sd})


def test_final_checkpoint_survives_a_failing_end_of_training_callback(workdir):
    """Lightning runs checkpoint callbacks last: a failure in end-of-training sampling must not lose the
    steps since the last periodic checkpoint."""
    run = workdir / "checkpoints" / "fails_at_end"
    with pytest.raises(RuntimeError, match="simulated"):
        fit("--trainer.max_steps", "3", "--checkpoint_every_n_steps", "2", "--trainer.callbacks+=app_probes.FailAtTrainEnd",
            run="fails_at_end")
    assert torch.load(run / "last.ckpt", weights_only=False)["global_step"] == 3
    run = workdir / "checkpoints" / "fails_at_end_epochs"  # ended by max_epochs (here 1 epoch of 3 batches)
    with pytest.raises(RuntimeError, match="simulated"):
        fit("--trainer.max_steps", "-1", "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "3",
            "--checkpoint_every_n_steps", "2", "--trainer.callbacks+=app_probes.FailAtTrainEnd", run="fails_at_end_epochs")
    assert torch.load(run / "last.ckpt", weights_only=False)["global_step"] == 3


def test_a_fit_that_fails_before_its_first_step_leaves_no_run_behind(workdir):
    """Its config.yaml and empty events file made the folder an earlier run's: the same command, once
    mended, was refused (and told to resume a run that saved nothing). A fit that trained keeps its files
    (its logged steps tell what went wrong) and the refusal says there is nothing to resume."""
    run = workdir / "checkpoints" / "failed_start"
    with _probes(), pytest.raises(RuntimeError, match="before the first step"):
        fit("--trainer.max_steps", "2", "--trainer.callbacks+=app_probes.FailAtTrainStart", run="failed_start")
    assert not run.exists()
    import signal

    handler = signal.getsignal(signal.SIGINT)  # Lightning ignores SIGINT from its KeyboardInterrupt on
    try:
        with _probes(), pytest.raises(SystemExit) as exit_:  # a Ctrl-C there: Lightning exits with 1, train.py 130
            fit("--trainer.max_steps", "2", "--trainer.callbacks+=app_probes.InterruptAtTrainStart", run="failed_start")
    finally:
        signal.signal(signal.SIGINT, handler)
    assert exit_.value.code == 130 and not run.exists()
    fit("--trainer.max_steps", "2", run="failed_start")  # the mended command runs
    assert (run / "last.ckpt").exists()
    # a failure before the first step of a resume or of an overwrite keeps what the folder holds
    with _probes(), pytest.raises(RuntimeError, match="before the first step"):
        fit("--trainer.max_steps", "3", "--ckpt_path", "last", "--trainer.callbacks+=app_probes.FailAtTrainStart",
            run="failed_start")
    assert {"last.ckpt", "config.yaml"} <= {p.name for p in run.iterdir()}
    run = workdir / "checkpoints" / "failed_later"
    with _probes(), pytest.raises(MemoryError, match="crash at step 1"):
        fit("--trainer.max_steps", "4", "--checkpoint_every_n_steps", "2",
            "--trainer.callbacks+={class_path: app_probes.CrashAt, init_args: {step: 1}}", run="failed_later")
    assert {"config.yaml"} <= {p.name for p in run.iterdir()} and any(run.glob("events.out.tfevents.*"))
    with pytest.raises(FileExistsError, match=r"holds an earlier run that saved no checkpoint \(config.yaml, events"
                                              r".*start it afresh with --overwrite_run true \(or --ckpt_path last, which keeps its logs\), or choose another"):
        fit("--trainer.max_steps", "2", run="failed_later")


def test_deepspeed_strategies_leave_frozen_weights_out_of_checkpoints(monkeypatch):
    import importlib.util

    from mpq_lightning.cli import deepspeed_strategy

    with monkeypatch.context() as patch:  # deepspeed is not installed here: the key is named, no traceback
        patch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else object())
        with pytest.raises(ValueError, match=r"trainer.strategy deepspeed_stage_2: DeepSpeed is not installed; "
                                             r"pip install -e \"\.\[deepspeed\]\""):
            deepspeed_strategy("deepspeed_stage_2")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object())  # as if installed
    assert deepspeed_strategy("deepspeed_stage_2") == {
        "class_path": "mpq_lightning.cli.DeepSpeedStrategy",
        "init_args": {"stage": 2, "exclude_frozen_parameters": True}}
    assert deepspeed_strategy("deepspeed_stage_2_offload")["init_args"] == {
        "stage": 2, "offload_optimizer": True, "exclude_frozen_parameters": True}
    assert deepspeed_strategy("deepspeed_stage_9") == "deepspeed_stage_9"


def test_deepspeed_strategy_destroys_its_nccl_process_group_at_exit(monkeypatch, tmp_path):
    """DeepSpeed creates the process group itself (Lightning registers the exit hook only for the groups
    it creates): ours registers, once, a hook that destroys the group, for NCCL as Lightning does."""
    import atexit

    import torch.distributed as dist
    from lightning.pytorch.strategies import DeepSpeedStrategy as LightningDeepSpeed

    from mpq_lightning import cli

    hooks, backend = [], {}
    monkeypatch.setattr(atexit, "register", hooks.append)
    monkeypatch.setattr(cli.DeepSpeedStrategy, "_exit_hook", False)
    monkeypatch.setattr(LightningDeepSpeed, "_init_deepspeed_distributed",
                        lambda self: setattr(self, "_process_group_backend", backend["name"]))
    strategy = cli.DeepSpeedStrategy.__new__(cli.DeepSpeedStrategy)  # (its __init__ needs deepspeed installed)
    backend["name"] = "gloo"
    strategy._init_deepspeed_distributed()
    assert hooks == []  # gloo: torch does not warn, and Lightning registers nothing either
    backend["name"] = "nccl"
    strategy._init_deepspeed_distributed()
    strategy._init_deepspeed_distributed()  # a second fit in the same process: still one hook
    assert hooks == [cli._destroy_process_group]
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        hooks[0]()
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    hooks[0]()  # nothing to destroy: no error


def test_eval_config_bad_input_names_the_key():
    from mpq_lightning.evaluation import EvalConfig

    with pytest.raises(ValueError, match="eval.feature must be one of"):
        EvalConfig(feature="inception")
    with pytest.raises(ValueError, match="eval.device: 'gpu0' is not a torch device"):
        EvalConfig(device="gpu0")
    assert EvalConfig(device="auto").resolved_device() == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="eval.device='cuda' but CUDA is not available"):
            EvalConfig(device="cuda")
    for key, value, want in (("num_samples", 0, "eval.num_samples must be an integer >= 1, got 0"),
                             ("batch_size", -2, "eval.batch_size must be an integer >= 1, got -2"),
                             ("num_inference_steps", 0, "eval.num_inference_steps must be null or an integer >= 1, got 0"),
                             ("guidance_scale", -1.0, "eval.guidance_scale must be null or a number >= 0, got -1.0")):
        with pytest.raises(ValueError, match=want):
            EvalConfig(**{key: value})


def test_eval_feature_network_from_an_import_path():
    """``eval.feature = "module:factory"``: the Fréchet distance in the user's feature space, 0 for
    identical sample sets and growing with a shift of the student's samples."""
    from mpq_lightning.evaluation import EvalConfig, compute_metrics
    from mpq_lightning.models import build

    with pytest.raises(ValueError, match="eval.feature: cannot import 'app_probes:no_such'"):
        EvalConfig(feature="app_probes:no_such")
    teacher = build("tiny-stdit")
    g = torch.Generator().manual_seed(0)
    samples = torch.rand(16, *teacher.latent_shape, generator=g) * 2 - 1
    gen = {"teacher": samples, "labels": None, "step_error": [], "scheduler": "ddim", "steps": 10, "guidance_scale": 1.0}
    fd = [compute_metrics({**gen, "student": (samples + shift).clamp(-1, 1)}, teacher, "app_probes:pooled_features")
          ["frechet_distance_student_vs_teacher"] for shift in (0.0, 0.2, 0.5)]
    assert abs(fd[0]) < 1e-6 < fd[1] < fd[2]


def test_evaluation_conditions_never_use_the_null_class():
    """evaluate.py draws the final report's conditions: digit labels ``i % 10`` for class models, so the
    Digits UNet (11 class embeddings, the last its null class) never samples its unconditional class as
    a digit; labels (for class consistency) only for class models."""
    from types import SimpleNamespace

    from mpq_lightning.evaluation import _conditions
    from mpq_lightning.models import build

    teacher = build("digits-unet")
    assert teacher.backbone.config.num_class_embeds == 11
    cond, uncond, labels = _conditions(SimpleNamespace(teacher=teacher), None, 16)
    assert torch.equal(labels, torch.arange(16) % 10) and torch.equal(cond["class_labels"], labels) and uncond is None
    assert _conditions(SimpleNamespace(teacher=build("tiny-unet2d")), None, 4) == (None, None, None)


def test_class_consistency_only_with_our_digit_classifiers():
    """A user feature network on a class model gives its Fréchet distance but no class consistency: the
    digit classifiers do not read other models' samples."""
    from mpq_lightning.evaluation import compute_metrics
    from mpq_lightning.models import build

    teacher = build("tiny-dit")
    samples = torch.rand(8, *teacher.latent_shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    gen = {"teacher": samples, "student": samples * 0.5, "labels": torch.arange(8) % 10, "step_error": [],
           "scheduler": "ddim", "steps": 10, "guidance_scale": 1.0}
    out = compute_metrics(gen, teacher, "app_probes:pooled_features")
    assert out["frechet_distance_student_vs_teacher"] > 0 and not any("class_consistency" in k for k in out)


def test_evaluate_never_generates_a_missing_cache(full_run, workdir):
    from mpq_lightning.evaluation import EvalConfig, evaluate

    cache = workdir / "data" / "tiny_stdit_ddim10"
    moved = cache.with_name("moved_away")
    cache.rename(moved)
    try:
        with pytest.raises(FileNotFoundError, match="trajectory cache data/tiny_stdit_ddim10 does not exist"):
            evaluate(str(workdir / "checkpoints" / "full" / "config.yaml"), "last", EvalConfig(num_samples=2))
        assert not cache.exists() and not (workdir / "checkpoints" / "full" / "eval").exists()
    finally:
        moved.rename(cache)


def _evaluate_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("evaluate_script", REPO / "evaluate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_unreadable_checkpoints_and_weights_are_refused_naming_the_file(full_run, workdir, capsys):
    """A truncated copy of a checkpoint, a file of another format and a torch file that is not a
    Lightning checkpoint: train.py, evaluate.py and the exporter each name the file (torch's own error
    names neither), before any file is written; a corrupted teacher weights file likewise."""
    from mpq_lightning.export import main as export_main

    last = workdir / "checkpoints" / "full" / "last.ckpt"
    bad = workdir / "bad"
    bad.mkdir()
    (bad / "truncated.ckpt").write_bytes(last.read_bytes()[:100_000])
    (bad / "text.ckpt").write_text("not a checkpoint")
    torch.save(torch.zeros(3), bad / "tensor.ckpt")
    config = str(workdir / "checkpoints" / "full" / "config.yaml")
    for name, message in [("truncated.ckpt", "cannot be read by torch.load \\(RuntimeError: PytorchStreamReader failed"),
                          ("text.ckpt", "cannot be read by torch.load"),
                          ("tensor.ckpt", "is not a Lightning checkpoint \\(no 'state_dict'; it holds Tensor\\)")]:
        path = bad / name
        pattern = f"checkpoint {path} {message}"
        with pytest.raises(ValueError, match=pattern):
            fit("--ckpt_path", str(path), run="unreadable")
        assert not (workdir / "checkpoints" / "unreadable").exists()
        with pytest.raises(ValueError, match=pattern):
            _evaluate_script()(["--config", config, "--ckpt_path", str(path), "--out", str(workdir / "ev_bad")])
        assert not (workdir / "ev_bad").exists()
        assert export_main(["--config", config, "--ckpt_path", str(path), "--out", str(workdir / "ex_bad")]) == 1
        assert re.search(pattern, capsys.readouterr().err) and not (workdir / "ex_bad").exists()
    with pytest.raises(ValueError, match=f"weights file {bad / 'text.ckpt'} cannot be read by torch.load"):
        fit("--model.model_kwargs", f'{{"ckpt_path": "{bad / "text.ckpt"}"}}', run="unreadable")
    assert not (workdir / "checkpoints" / "unreadable").exists()


def test_evaluate_script_output_folder_overrides_and_trainer(full_run, workdir, caplog):
    """evaluate.py never replaces a folder holding anything but an earlier evaluation; arguments after
    `--` override the run's config (a moved cache); the training machine's trainer section (GPUs,
    strategy) plays no part; Lightning's cloud-logger advertisement and the placeholder Trainer's device
    report ("GPU available: True (cuda), used: False" on a GPU machine) are not printed."""
    import logging

    import yaml

    caplog.set_level(logging.INFO)

    evaluate_main = _evaluate_script()
    config = workdir / "checkpoints" / "full" / "config.yaml"
    mine = workdir / "mydir"
    mine.mkdir()
    (mine / "notes.txt").write_text("precious")
    with pytest.raises(FileExistsError, match=r"mydir holds files that are not an earlier evaluation's \(notes.txt\)"):
        evaluate_main(["--config", str(config), "--out", str(mine), "--eval.num_samples", "2"])
    assert (mine / "notes.txt").read_text() == "precious"

    gpu = yaml.safe_load(config.read_text())
    gpu["trainer"].update(accelerator="gpu", devices=8, strategy="ddp")
    gpu_config = workdir / "checkpoints" / "full" / "gpu_config.yaml"
    gpu_config.write_text(yaml.safe_dump(gpu))
    cache = workdir / "data" / "tiny_stdit_ddim10"
    moved = workdir / "elsewhere" / "tiny_stdit_ddim10"
    moved.parent.mkdir()
    cache.rename(moved)
    try:
        with pytest.raises(FileNotFoundError, match="trajectory cache data/tiny_stdit_ddim10 does not exist"):
            evaluate_main(["--config", str(gpu_config), "--out", str(workdir / "ev"), "--eval.num_samples", "2"])
        metrics = evaluate_main(["--config", str(gpu_config), "--out", str(workdir / "ev"), "--eval.num_samples", "2",
                                 "--eval.device", "cpu", "--", "--data.init_args.cache", str(moved)])
    finally:
        moved.rename(cache)
        gpu_config.unlink()
    assert metrics["num_samples"] == 2 and (workdir / "ev" / "metrics.json").is_file()
    assert oct((workdir / "ev").stat().st_mode & 0o777) != oct(0o700)  # an ordinary folder, not mkdtemp's
    again = evaluate_main(["--config", str(config), "--out", str(workdir / "ev"), "--eval.num_samples", "2"])
    assert again["num_samples"] == 2  # an earlier evaluation's folder is replaced
    # logging is captured (the seed line), and the placeholder Trainer's device report is not printed
    assert "Seed set to" in caplog.text and "GPU available" not in caplog.text and "litlogger" not in caplog.text
    (workdir / "ev" / "my_notes.txt").write_text("mine")  # ... but not once it holds something else
    with pytest.raises(FileExistsError, match=r"ev holds files that are not an earlier evaluation's \(my_notes.txt\)"):
        evaluate_main(["--config", str(config), "--out", str(workdir / "ev"), "--eval.num_samples", "2"])


def test_evaluation_does_not_depend_on_the_batch_size(full_run, workdir, monkeypatch):
    """A stochastic sampler's noise comes from one generator per sample, and the per-step error is a mean
    over samples: the same samples and errors whatever eval.batch_size (3 samples: batches 2 + 1)."""
    import mpq_lightning.evaluation as E

    module, datamodule, _ = E.load_run(str(workdir / "checkpoints" / "full" / "config.yaml"))
    setup = E._sampler_setup
    monkeypatch.setattr(E, "_sampler_setup", lambda *a: ("ddpm", {}, setup(*a)[2], 1.0, 0.0))
    seeds, step_noise_seed = [], E.step_noise_seed
    monkeypatch.setattr(E, "step_noise_seed", lambda seed, i: seeds.append((seed, i)) or step_noise_seed(seed, i))
    one = E.generate(module, datamodule, E.EvalConfig(num_samples=3, batch_size=1, device="cpu"))
    assert seeds == [(1234, 0), (1234, 1), (1234, 2)] * 2  # the sampler's noise: a stream of its own per sample
    two = E.generate(module, datamodule, E.EvalConfig(num_samples=3, batch_size=2, device="cpu"))
    # the FP teacher: the same up to float noise (the student's 6-bit activations can round a value that sits
    # on a step boundary differently in another batch shape, which 10 guided steps amplify)
    torch.testing.assert_close(one["teacher"], two["teacher"], rtol=0, atol=1e-4)
    err1, err2 = torch.tensor(one["step_error"]), torch.tensor(two["step_error"])
    torch.testing.assert_close(err1, err2, rtol=1e-3, atol=0)
    assert one["scheduler"] == "ddpm"


def test_unknown_model_name(workdir):
    with pytest.raises(ValueError, match="unknown model 'no-such-model'; available: .*tiny-stdit"):
        fit("--model.model", "no-such-model", run="bad")


def test_misspelt_model_argument_names_model_kwargs(workdir):
    with pytest.raises(TypeError, match="model.model_kwargs of model 'tiny-stdit': .*unexpected keyword argument 'depthh'"):
        fit("--model.model_kwargs", "{config: {depthh: 1}}", run="bad")
    assert not (workdir / "checkpoints" / "bad").exists()


def test_unknown_config_key(workdir, capsys):
    with pytest.raises(SystemExit):
        fit("--model.quant.w_bitz", "3", run="bad")
    assert "w_bitz" in capsys.readouterr().err


def test_missing_on_the_fly_conditions_refused_before_building(workdir):
    with pytest.raises(FileNotFoundError, match="data.init_args.cond_path: /no/such/cond.safetensors"):
        fit("--data", "mpq_lightning.data.OnTheFlyDataModule", "--data.init_args.cond_path", "/no/such/cond.safetensors",
            run="bad")


def test_overrides_without_a_config_apply_to_the_embedded_default(capsys):
    import yaml

    with pytest.raises(SystemExit):
        main(["--trainer.max_steps", "5", "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    default = yaml.safe_load((REPO / "configs" / "default.yaml").read_text())
    assert printed["trainer"]["max_steps"] == 5
    assert printed["model"]["model"] == default["model"]["model"] and printed["run_name"] == default["run_name"]


def test_the_cache_of_a_train_config_is_built_alone(tmp_path, monkeypatch, capsys):
    """``python -m mpq_lightning.data.trajectories --train_config <resolved train config>`` (a job of its
    own before training) builds the cache the fit then reads as it is: same teacher, recipe and folder."""
    import yaml

    from mpq_lightning.data import trajectories

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        main(["--config", TINY, "--data.init_args.recipe.num_trajectories", "6", "--print_config"])
    (tmp_path / "resolved.yaml").write_text(capsys.readouterr().out)
    path = trajectories.main(["--train_config", "resolved.yaml", "--device", "cpu"])
    assert path == Path("data") / "tiny_stdit_ddim10"
    assert json.loads((path / "manifest.json").read_text())["structure"]["num_trajectories"] == 6  # the override's
    stamps = {p.name: p.stat().st_mtime_ns for p in path.iterdir()}
    cli = fit("--trainer.max_steps", "1", "--data.init_args.recipe.num_trajectories", "6", run="after_cache")
    assert cli.trainer.global_step == 1
    assert stamps == {p.name: p.stat().st_mtime_ns for p in path.iterdir()}  # read, not made again
    # what a train config without a cache to build says
    config = yaml.safe_load((tmp_path / "resolved.yaml").read_text())
    for edit, message in (
            (lambda c: c["data"].update(class_path="mpq_lightning.data.OnTheFlyDataModule"),
             r"data.class_path mpq_lightning.data.OnTheFlyDataModule samples the teacher's trajectories while training"),
            (lambda c: c["data"]["init_args"].update(recipe=None), r"data.init_args.recipe is not set: the run reads"),
            (lambda c: c["data"]["init_args"]["recipe"].update(name="other"),
             r"data.init_args.recipe.name 'other' must be the name of the cache directory"),
            (lambda c: c["model"].pop("model"), r"model.model is not set")):
        bad = copy.deepcopy(config)
        edit(bad)
        (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
        with pytest.raises(ValueError, match=r"--train_config bad.yaml: " + message):
            trajectories.main(["--train_config=bad.yaml"])


def test_logger_false_means_no_logger(workdir):
    cli = fit("--trainer.max_steps", "1", "--trainer.logger", "false", run="no_logger")
    assert cli.trainer.logger is None
    run = workdir / "checkpoints" / "no_logger"
    assert not list(run.glob("events.out.tfevents.*"))
    assert "run_name: no_logger" in (run / "config.yaml").read_text()  # beside the run, not in checkpoints/
    assert not (workdir / "checkpoints" / "config.yaml").exists()


def test_final_report_compares_any_model(workdir):
    """FinalReport (the digits configs' end-of-fit FP / naive PTQ / trained table) on a text-conditioned
    model: the prompts come from the trajectory cache (it raised a KeyError on the missing prompt
    embedding once training had ended); metrics need no real data there: PSNR / SSIM vs FP, temporal
    consistency."""
    report = '{"class_path": "mpq_lightning.callbacks.FinalReport", "init_args": {"num_samples": 2}}'
    fit("--trainer.max_steps", "1", f"--trainer.callbacks+={report}", run="report")
    rows = json.loads((workdir / "checkpoints" / "report" / "report.json").read_text())
    assert list(rows) == ["FP", "naive PTQ", "trained (ours)"]
    for name in ("naive PTQ", "trained (ours)"):
        assert math.isfinite(rows[name]["psnr_vs_fp"]) and 0 < rows[name]["ssim_vs_fp"] <= 1
    assert all(math.isfinite(row["temporal_consistency"]) for row in rows.values())


def test_fast_dev_run_leaves_no_run_behind(workdir):
    """``--trainer.fast_dev_run true`` (one batch, for debugging) writes nothing into the run folder:
    Lightning's ModelCheckpoint saved ``last.ckpt`` at train end even then (and a real run of the same
    name was then refused as an earlier run's folder), FinalReport prints its table but writes no
    report.json, and SampleLogger leaves fast_dev_run's stand-in logger alone (it crashed writing a gif
    through it)."""
    report = '{"class_path": "mpq_lightning.callbacks.FinalReport", "init_args": {"num_samples": 2}}'
    cli = main(["--config", TINY, "--run_name", "debug", "--trainer.fast_dev_run", "true", "--log_samples", "true",
                "--trainer.enable_progress_bar", "false", f"--trainer.callbacks+={report}"])
    assert cli.trainer.global_step == 1
    run = workdir / "checkpoints" / "debug"
    assert not run.exists() or not any(run.iterdir()), list(run.iterdir())
    fit("--trainer.max_steps", "1", run="debug")  # the same run name trains for real afterwards
    assert (run / "last.ckpt").is_file()


def test_missing_files_refused_before_building(workdir):
    with pytest.raises(FileNotFoundError, match="data.init_args.recipe.cond_path: /no/such/t5.safetensors"):
        fit("--data.init_args.recipe.cond_path", "/no/such/t5.safetensors", run="bad")
    with pytest.raises(FileNotFoundError, match="model.model_kwargs.ckpt_path"):
        fit("--model.model_kwargs", "{ckpt_path: /no/such/OpenSora-v1-HQ-16x512x512.pth}", run="bad")


def test_scripts_print_our_errors_in_one_line_and_keep_other_tracebacks(tmp_path, capsys, monkeypatch):
    """train.py / evaluate.py: an error of our own checks is one line on stderr naming the key or file,
    exit status 1, no traceback and no file written (``MPQ_TRACEBACK=1`` brings the traceback back);
    an error raised outside this package (torch, Lightning: possibly a bug) keeps its traceback."""
    from mpq_lightning.cli import run_script
    from mpq_lightning.losses.memory import TimeAwarePixelQueue

    env = {k: v for k, v in os.environ.items() if k != "MPQ_TRACEBACK"}
    bad = [sys.executable, str(REPO / "train.py"), "--config", TINY, "--model.model_kwargs", "{ckpt_path: /no/such/w.pth}"]
    proc = subprocess.run(bad, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "train.py: error: FileNotFoundError: model.model_kwargs.ckpt_path: /no/such/w.pth does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr and not list(tmp_path.iterdir())
    proc = subprocess.run([sys.executable, str(REPO / "evaluate.py"), "--config", str(tmp_path / "no_run" / "config.yaml")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert f"evaluate.py: error: FileNotFoundError: config {tmp_path / 'no_run' / 'config.yaml'} does not exist" in proc.stderr
    # in-process: the same handler, on an error of ours and on one raised inside torch
    with pytest.raises(SystemExit) as exit_:
        run_script(lambda: TimeAwarePixelQueue(num_steps=2, pixels_per_step=4)._check_step(5))
    assert exit_.value.code == 1 and "ValueError: step_index must be in [0, 2), got 5" in capsys.readouterr().err
    monkeypatch.setenv("MPQ_TRACEBACK", "1")  # the exception itself, traceback and all
    with pytest.raises(ValueError, match=r"step_index must be in \[0, 2\), got 5"):
        run_script(lambda: TimeAwarePixelQueue(num_steps=2, pixels_per_step=4)._check_step(5))
    monkeypatch.delenv("MPQ_TRACEBACK")
    with pytest.raises(RuntimeError, match="size of tensor a"):
        run_script(lambda: torch.zeros(2) + torch.zeros(3))
    from mpq_lightning.quant.layers import QuantLayer

    with pytest.raises(NotImplementedError):  # ours, but no message: an abstract method reached, a bug
        run_script(lambda: QuantLayer.to_module(None))
    # a data module's own check, which jsonargparse re-raises as its "Does not validate against any of
    # the Union subtypes" with the whole data config: ours is the line printed
    with pytest.raises(SystemExit):
        run_script(lambda: main(["--config", TINY, "--data.init_args.cache", str(tmp_path / "elsewhere")]))
    err = capsys.readouterr().err
    assert err.splitlines()[0].endswith("'elsewhere': set both alike, or data.init_args.recipe null to train on an "
                                        "existing cache as it is") and "Union subtypes" not in err, err
    assert ": error: ValueError: data.init_args.recipe.name 'tiny_stdit_ddim10' must be the name" in err


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_lists_the_training_options(flag, capsys):
    """`python train.py --help` describes what `python train.py` runs (fit), not LightningCLI's list of
    subcommands."""
    with pytest.raises(SystemExit) as exit_:
        main([flag])
    out = capsys.readouterr().out
    assert exit_.value.code == 0
    assert "--model.quant.w_bits" in out and "--ckpt_path" in out and "--run_name" in out
    # every key of the model's config dataclasses has its help (their docstrings, read by jsonargparse)
    from mpq_lightning.module import CalibConfig, LossConfig, OptimConfig
    from mpq_lightning.quant import QuantConfig

    for group, cls in (("quant", QuantConfig), ("loss", LossConfig), ("optim", OptimConfig), ("calib", CalibConfig)):
        for name in cls.__dataclass_fields__:
            assert _help_of(out, f"--model.{group}.{name}"), f"model.{group}.{name} has no help"


def _help_of(out: str, option: str) -> str:
    """The help text of ``option`` in an argparse help output (its options list, not the usage line),
    without its metavars, alternative forms and the type/default note jsonargparse appends."""
    options = " ".join(out.split("\n\n", 1)[1].split())
    found = re.search(rf"{re.escape(option)}[ ,+](.*?)\(type: ", options)
    metavar = re.compile(r"[A-Z_]+|\[ITEM,\.\.\.\],?|\{true,false\},?|--\S+,?")
    return " ".join(t for t in found.group(1).split() if not metavar.fullmatch(t)) if found else ""


def test_evaluate_help_documents_every_option(capsys):
    from mpq_lightning.evaluation import EvalConfig

    with pytest.raises(SystemExit) as exit_:
        _evaluate_script()(["--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0 and "What evaluate.py samples and how it measures it" in " ".join(out.split())
    for name in EvalConfig.__dataclass_fields__:  # each option has its own line of help before its type
        assert _help_of(out, f"--eval.{name}"), name


def test_progress_bar_of_a_step_bounded_run_and_a_users_own_bar(workdir, capsys, caplog):
    """The default bar reads `Epoch 0`, not Lightning's `Epoch 0/-2`, in a run bounded by max_steps
    alone; a progress bar of the user's own replaces it (Lightning refuses two). Lightning's info lines
    reach the user, less its advertisement for its cloud logger."""
    import logging

    from mpq_lightning.callbacks import StepRichProgressBar

    caplog.set_level(logging.INFO)

    args = ["--config", TINY, "--log_samples", "false", "--trainer.enable_model_summary", "false",
            "--trainer.max_steps", "1"]
    cli = main([*args, "--run_name", "bar"])
    bar = cli.trainer.progress_bar_callback
    assert isinstance(bar, StepRichProgressBar) and cli.trainer.max_epochs == -1
    assert bar._get_train_description(0).strip() == "Epoch 0"
    out = capsys.readouterr().out  # the run's folder and next commands, once training ended
    assert f"python evaluate.py --config {Path('checkpoints') / 'bar' / 'config.yaml'}\n" in out
    assert "(config.yaml, last.ckpt, TensorBoard events)" in out and "tensorboard --logdir checkpoints\n" in out
    assert (workdir / "checkpoints" / "bar" / "config.yaml").is_file()
    assert "`Trainer.fit` stopped: `max_steps=1` reached." in caplog.text and "litlogger" not in caplog.text
    cli = main([*args, "--run_name", "bar_tqdm", "--trainer.callbacks+=lightning.pytorch.callbacks.TQDMProgressBar"])
    assert type(cli.trainer.progress_bar_callback).__name__ == "TQDMProgressBar"


def test_checkpointing_switched_off(workdir, capsys):
    """``--trainer.enable_checkpointing false`` trains without checkpoints (our RunCheckpoint is not added:
    Lightning refused it) and says there is nothing to evaluate."""
    cli = fit("--trainer.max_steps", "2", "--trainer.enable_checkpointing", "false", run="ckpt_off")
    assert cli.trainer.global_step == 2 and not cli.trainer.checkpoint_callbacks
    run = workdir / "checkpoints" / "ckpt_off"
    assert not list(run.glob("*.ckpt")) and (run / "config.yaml").is_file() and list(run.glob("events.out.tfevents.*"))
    out = capsys.readouterr().out
    assert "evaluate.py" not in out and "(config.yaml, TensorBoard events)" in out


def test_a_users_checkpoint_callback_saves_beside_last_ckpt(workdir):
    """A ModelCheckpoint of the user's own (the best by val/loss) does not replace ours: ``last.ckpt``
    is still written for ``--ckpt_path last`` and evaluate.py, and ``--overwrite_run`` clears the
    user's ``checkpoints/`` folder with the rest."""
    args = ("--trainer.max_steps", "4", "--data.init_args.val_trajectories", "[3]", "--trainer.val_check_interval", "2",
            "--trainer.callbacks+=ModelCheckpoint", "--trainer.callbacks.monitor", "val/loss",
            "--trainer.callbacks.save_top_k", "1", "--trainer.callbacks.every_n_train_steps", "2")
    cli = fit(*args, run="own_ckpt")
    run = workdir / "checkpoints" / "own_ckpt"
    assert torch.load(run / "last.ckpt", weights_only=False)["global_step"] == 4
    best = cli.trainer.checkpoint_callback.best_model_path  # the user's: first in the list
    assert Path(best).resolve().parent == run / "checkpoints" and len(list((run / "checkpoints").glob("*.ckpt"))) == 1
    fit(*args, "--overwrite_run", "true", "--trainer.callbacks.save_top_k", "0", run="own_ckpt")
    assert not (run / "checkpoints").exists()


def test_progress_lines_where_the_output_is_no_terminal(workdir, capsys, monkeypatch):
    """Under a batch system the output is a file, where Rich draws nothing until the run ends: the bar
    prints a plain line every log_every_n_steps steps (here with no least interval) and at the end."""
    from mpq_lightning.callbacks import StepRichProgressBar

    monkeypatch.setattr(StepRichProgressBar, "line_every_s", 0.0)
    main(["--config", TINY, "--log_samples", "false", "--trainer.enable_model_summary", "false", "--run_name", "lines",
          "--trainer.max_steps", "4", "--trainer.log_every_n_steps", "2"])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    assert [line.split(" · ")[0] for line in lines] == ["step 2/4 (50.0%)", "step 4/4 (100.0%)"], lines
    assert "left" in lines[0] and "train/loss" in lines[1]


def test_bad_quant_config_names_key(workdir):
    with pytest.raises(ValueError, match="QuantConfig.w_bits"):
        fit("--model.quant.w_bits", "12", run="bad")


@pytest.mark.parametrize("key,value,message", [
    ("model.loss.mtrd_anchors", "0", "model.loss.mtrd_anchors must be null or an integer >= 1, got 0"),
    ("model.loss.tmd_tau", "0", "model.loss.tmd_tau must be a number > 0"),
    ("model.loss.trd_weight", "-1", "model.loss.trd_weight must be a number >= 0"),
    ("model.optim.lora_lr", "-0.001", "model.optim.lora_lr must be null or a number >= 0"),
    ("model.calib.num_batches", "0", "model.calib.num_batches must be an integer >= 1"),
    ("data.init_args.batch_size", "0", "data.init_args.batch_size must be an integer >= 1, got 0"),
    ("data.init_args.num_workers", "-1", "data.init_args.num_workers must be an integer >= 0, got -1"),
    ("data.init_args.recipe.name", "other", "data.init_args.recipe.name 'other' must be the name of the cache directory"),
])
def test_config_numbers_out_of_range_are_refused_before_any_file(workdir, key, value, message):
    """Found in the first training step before, with the cache built and the run folder written (whose
    leftovers then refused the corrected run)."""
    with pytest.raises(ValueError, match=message):
        fit(f"--{key}", value, run="bad_number")
    assert not (workdir / "checkpoints" / "bad_number").exists()


def test_compile_model_with_cpu_16_bit_refused_before_any_file(workdir):
    with pytest.raises(ValueError, match="model.compile_model=true with trainer.precision bf16-mixed on CPU"):
        fit("--trainer.precision", "bf16-mixed", "--model.compile_model", "true", run="bad_compile")
    assert not (workdir / "checkpoints" / "bad_compile").exists()


@pytest.mark.parametrize("precision", ["bf16-true", "16-true"])
def test_true_16_bit_precision_refused_before_any_file(workdir, precision):
    """``*-true`` 16-bit precisions cast the whole module, quantizer step sizes and LoRA included (a fit
    ran with every quantizer parameter in bf16): refused by name, before the cache or run folder."""
    with pytest.raises(ValueError, match=f"trainer.precision {precision} casts the whole student to 16 bits"):
        fit("--trainer.precision", precision, run="bad_true16")
    assert not (workdir / "checkpoints" / "bad_true16").exists()


def test_generators_travel_to_spawned_processes_as_bytes():
    """The module's generators pickle (for a spawned process) as their state's bytes: torch's own
    reduce sent a temporary state tensor whose file descriptor was closed before the child started."""
    import pickle
    from multiprocessing.reduction import ForkingPickler

    import mpq_lightning.module  # noqa: F401  (registers the reducer)

    g = torch.Generator().manual_seed(7)
    torch.rand(3, generator=g)
    payload = bytes(ForkingPickler.dumps(g))
    assert b"rebuild_storage" not in payload  # no shared tensor inside
    copy = pickle.loads(payload)
    assert torch.equal(torch.rand(5, generator=copy), torch.rand(5, generator=g))


def test_ddp_spawn_two_processes_cpu(tmp_path):
    """``--trainer.strategy ddp_spawn`` (the module and trainer pickled into fresh processes) trains
    one student on both ranks, each on its own shard."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
    proc = subprocess.run(
        [sys.executable, str(REPO / "train.py"), "--config", TINY, "--run_name", "spawn", *QUIET,
         "--trainer.devices", "2", "--trainer.strategy", "ddp_spawn", "--trainer.max_steps", "2",
         "--data.init_args.drop_last", "true", "--trainer.callbacks+=app_probes.RankProbe"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert torch.load(tmp_path / "checkpoints" / "spawn" / "last.ckpt", weights_only=False)["global_step"] == 2
    _ranks_agree(tmp_path / "ddp_probe")


class _Batches:
    def __init__(self, batches) -> None:
        self.batches = batches

    def train_dataloader(self):
        return self.batches


def _calibrated_module(seed: int, scale: float):
    """The tiny STDiT (same teacher weights whatever ``seed``) calibrated on ``seed``'s data."""
    from mpq_lightning.models import random_cond
    from mpq_lightning.module import CalibConfig, LossConfig, QATModule
    from mpq_lightning.quant import QuantConfig, set_quant_state

    torch.manual_seed(0)
    quant = QuantConfig(w_bits=3, a_bits=6, num_steps=4, w_quantizer="fzrmq", lora_rank=2, lora_init="svd_weight_error",
                        lora_quantized_base=True, smooth_alpha=0.5)
    module = QATModule("tiny-stdit", {"config": {"depth": 1}}, quant, True, LossConfig(mse_reduction="mean"),
                       calib=CalibConfig(num_batches=2))
    g = torch.Generator().manual_seed(seed)
    t = module.teacher
    batches = [{"x_t": scale * torch.randn(2, *t.latent_shape, generator=g), "t": torch.tensor([900, 100]),
                "step_index": torch.tensor([0, 3]), "cond": random_cond(t, 2, seed, length=6, num_classes=3)}
               for _ in range(2)]
    module.calibrate_from(_Batches(batches))
    set_quant_state(module.student.backbone, True, True)
    return module


def _computed_weights(module) -> dict:
    from mpq_lightning.quant import QuantLayer

    out = {}
    with torch.no_grad():
        for name, layer in module.student.backbone.named_modules():
            if isinstance(layer, QuantLayer):
                out[name] = layer.quantized_weight().clone()
                if layer.base_weight is not None:
                    out[name + ".base"] = layer.base_weight.clone()
    return out


@pytest.mark.parametrize("precision", ["bf16-mixed"])  # Lightning runs 16-mixed as bf16-mixed on a CPU
def test_mixed_precision_trains_with_fp32_quantizer_state(workdir, precision):
    cli = fit("--trainer.max_steps", "2", "--trainer.precision", precision, run=f"prec_{precision}")
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])
    student = cli.model.student
    assert {p.dtype for p in student.parameters()} == {torch.float32}  # autocast, not a 16-bit model
    assert cli.trainer.global_step == 2


def test_scale_aware_lora_lrs_come_from_the_calibrated_steps(workdir):
    """EfficientDM's per-layer LoRA lr (``optim.lora_lr: null``) is mean(Δ_w) / lora_lr_div of the
    *calibrated* weight quantizer, although Lightning builds the optimizer before calibration."""
    cli = fit("--trainer.max_steps", "1", "--model.optim.lora_lr", "null", "--trainer.callbacks+=app_probes.LrProbe",
              run="scale_aware_lr")
    probe = next(c for c in cli.trainer.callbacks if type(c).__name__ == "LrProbe")
    assert probe.used and probe.used.keys() == probe.want.keys()
    for name, lr in probe.want.items():
        assert probe.used[name] == pytest.approx(lr, rel=1e-6) and probe.scheduler_base[name] == probe.used[name]
    assert max(probe.used.values()) < 0.5 / cli.model.optim_cfg.lora_lr_div  # uncalibrated steps (1.0) gave 1 / div


def test_rank_sync_rebuilds_state_derived_caches():
    """Under DDP each rank calibrates on its own shard and then takes rank 0's state. A broadcast
    writes storage without a version bump, so the FZ-RMQ class caches and OOLRI's base weight stay
    those of the rank's own calibration unless the state is re-loaded: after the sync, every weight
    the student computes with is rank 0's."""
    rank0, rank1 = _calibrated_module(1, 1.0), _calibrated_module(2, 4.0)
    assert rank0.teacher_hash == rank1.teacher_hash
    want = _computed_weights(rank0)
    assert any(not torch.equal(want[k], v) for k, v in _computed_weights(rank1).items())

    def fake_broadcast(sources):
        it = iter(list(sources))

        def broadcast(tensor, src):  # what a collective does: a raw write into the storage
            tensor.detach().numpy()[...] = next(it).detach().numpy()
        return broadcast

    stale = copy.deepcopy(rank1)
    for tensor, source in zip(stale.student.state_dict().values(), rank0.student.state_dict().values()):
        fake_broadcast([source])(tensor, 0)
    assert any(not torch.equal(want[k], v) for k, v in _computed_weights(stale).items())  # the bug the sync fixes

    rank1.sync_student_from_rank0(fake_broadcast(rank0.student.state_dict().values()))
    got = _computed_weights(rank1)
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0, msg=k)


def test_calibration_waits_for_a_restore_that_comes_after_fit_start():
    """FSDP and DeepSpeed restore a checkpoint after ``on_fit_start``, and Lightning 2.6 sets
    ``trainer.ckpt_path`` only at that restore (seen with DeepSpeed on a CPU,
    benchmarks/deepspeed_cpu_check.py): ``MPQCLI`` marks the module ``resuming``. With a checkpoint to
    restore the quantizers are not calibrated first (the restore sets them); without one they are."""
    from mpq_lightning.module import QATModule

    class Trainer:  # what on_fit_start reads
        strategy = type("S", (), {"root_device": torch.device("cpu")})()
        precision, world_size, datamodule, optimizers = "32-true", 1, None, []

    module = QATModule("tiny-stdit", {"config": {"depth": 1}})
    module.trainer = Trainer()
    module.trainer.ckpt_path = None
    module.resuming = True  # as MPQCLI.before_fit sets it for --ckpt_path
    module.on_fit_start()
    assert not module._calibrated
    module.resuming = False
    module.trainer.ckpt_path = "run/last.ckpt"  # a restore Lightning announced
    module.on_fit_start()
    assert not module._calibrated
    module.trainer.ckpt_path = None
    with pytest.raises(ValueError, match="needs a data module for calibration"):
        module.on_fit_start()


def test_ddp_ignores_derived_base_weights():
    module = _calibrated_module(1, 1.0)
    ignored = set(module._ddp_params_and_buffers_to_ignore)
    bases = {f"student.{n}" for n, _ in module.student.named_buffers() if n.endswith(".base_weight")}
    assert ignored == bases and bases
    assert not any(k.endswith("base_weight") for k in module.state_dict())  # derived: never saved either


def _ranks_agree(probe_dir: Path) -> None:
    for tag in ("start", "end"):
        r0, r1 = (torch.load(probe_dir / f"{tag}_rank{r}.pt") for r in (0, 1))
        assert r0.keys() == r1.keys() and any(k.endswith("quantized_weight") for k in r0)
        differ = [k for k in r0 if k != "batches_seen" and not torch.equal(r0[k], r1[k])]
        assert not differ, f"{tag}: ranks differ in {differ[:5]}"
    # ... and each rank trained on its own shard of the data
    seen0, seen1 = (set(torch.load(probe_dir / f"end_rank{r}.pt")["batches_seen"].flatten().tolist()) for r in (0, 1))
    assert seen0 and seen1 and not seen0 & seen1


def test_torchrun_two_nodes_cpu(tmp_path):
    """``torchrun`` on two "nodes" (two launchers on this machine, one process each) with
    ``--trainer.num_nodes 2``: one run, both ranks training the same student on their own shards."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
    port = str(29500 + os.getpid() % 1000)
    launchers = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node),
             "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", port,
             str(REPO / "train.py"), "--config", TINY, "--run_name", "nodes", *QUIET, "--trainer.devices", "1",
             "--trainer.num_nodes", "2", "--trainer.strategy", "ddp", "--trainer.max_steps", "2",
             "--data.init_args.drop_last", "true", "--trainer.callbacks+=app_probes.RankProbe"],
            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for node in (0, 1)
    ]
    outputs = [p.communicate(timeout=300)[0] for p in launchers]
    for p, out in zip(launchers, outputs):
        assert p.returncode == 0, out[-3000:]
    assert torch.load(tmp_path / "checkpoints" / "nodes" / "last.ckpt", weights_only=False)["global_step"] == 2
    _ranks_agree(tmp_path / "ddp_probe")


def test_torchrun_with_a_single_device_config_trains_one_run(tmp_path):
    """``torchrun --nproc_per_node 2 train.py --config <devices: 1 config>`` (the README's command):
    Lightning alone would build a single-device trainer in each process, two rank-0 runs into one
    folder; the trainer takes torchrun's processes instead, and both ranks train one student."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
         str(30500 + os.getpid() % 1000), str(REPO / "train.py"), "--config", TINY, "--run_name", "torchrun", *QUIET,
         "--trainer.max_steps", "2", "--data.init_args.drop_last", "true", "--trainer.callbacks+=app_probes.RankProbe"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert "torchrun started 2 processes: trainer.devices 2, trainer.num_nodes 1" in proc.stdout
    assert torch.load(tmp_path / "checkpoints" / "torchrun" / "last.ckpt", weights_only=False)["global_step"] == 2
    _ranks_agree(tmp_path / "ddp_probe")


def test_srun_tasks_with_a_single_device_config_train_one_run(tmp_path):
    """``srun --ntasks-per-node 2 python train.py --config <devices: 1 config>``, with the environment
    srun gives its two tasks: Lightning alone would build a single-device trainer in each task (two
    rank-0 runs into one folder, the second refused by the run lock); the trainer takes SLURM's tasks
    instead, and both ranks train one student on their own shards."""
    port = str(31500 + os.getpid() % 1000)
    base = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")]),
            "SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "2", "SLURM_NNODES": "1", "SLURM_NODEID": "0",
            "SLURM_JOB_NAME": "train", "SLURM_JOB_ID": "4242", "SLURM_NODELIST": "localhost",
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
    tasks = [
        subprocess.Popen(
            [sys.executable, str(REPO / "train.py"), "--config", TINY, "--run_name", "srun", *QUIET,
             "--trainer.max_steps", "2", "--data.init_args.drop_last", "true", "--trainer.callbacks+=app_probes.RankProbe"],
            cwd=tmp_path, env={**base, "SLURM_PROCID": str(r), "SLURM_LOCALID": str(r)},
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for r in (0, 1)
    ]
    outputs = [p.communicate(timeout=300)[0] for p in tasks]
    for p, out in zip(tasks, outputs):
        assert p.returncode == 0, out[-3000:]
    assert "srun started 2 tasks: trainer.devices 2, trainer.num_nodes 1" in outputs[0]
    assert torch.load(tmp_path / "checkpoints" / "srun" / "last.ckpt", weights_only=False)["global_step"] == 2
    _ranks_agree(tmp_path / "ddp_probe")


def test_srun_counts_are_taken_only_for_a_single_device_batch_job(monkeypatch):
    from types import SimpleNamespace

    from mpq_lightning.cli import _match_srun

    cfg = SimpleNamespace(devices=1, num_nodes=1)
    _match_srun(cfg)  # no SLURM: as configured
    assert (cfg.devices, cfg.num_nodes) == (1, 1)
    for key, value in {"SLURM_NTASKS": "8", "SLURM_NTASKS_PER_NODE": "4", "SLURM_NNODES": "2",
                       "SLURM_JOB_NAME": "interactive", "SLURM_PROCID": "3"}.items():
        monkeypatch.setenv(key, value)
    _match_srun(cfg)  # an interactive allocation: Lightning does not use SLURM's tasks either
    assert (cfg.devices, cfg.num_nodes) == (1, 1)
    monkeypatch.setenv("SLURM_JOB_NAME", "train")
    _match_srun(cfg)
    assert (cfg.devices, cfg.num_nodes) == (4, 2)
    _match_srun(other := SimpleNamespace(devices=2, num_nodes=1))  # Lightning's own check refuses this one
    assert (other.devices, other.num_nodes) == (2, 1)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job")  # torchrun inside the allocation: torchrun's processes
    _match_srun(under_torchrun := SimpleNamespace(devices=1, num_nodes=1))
    assert (under_torchrun.devices, under_torchrun.num_nodes) == (1, 1)


def test_several_nodes_without_a_launcher_are_refused(monkeypatch, workdir):
    """``--trainer.num_nodes 2`` started by hand on one machine: Lightning took node 0 and waited for
    the other node for ever; refused by key before anything is written. A launcher (torchrun, SLURM),
    NODE_RANK set by hand on each node or a cluster plugin lets it through."""
    from types import SimpleNamespace

    from mpq_lightning.cli import _check_multinode

    for key in [k for k in os.environ if k.startswith(("SLURM_", "LSB_", "OMPI_", "PMI_"))] + [
            "TORCHELASTIC_RUN_ID", "NODE_RANK", "GROUP_RANK"]:
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(ValueError, match=r"trainer.num_nodes 2, but no launcher tells this process its node: start "
                                         r"it on every node with torchrun --nnodes 2 .* set MASTER_ADDR, MASTER_PORT "
                                         r"and NODE_RANK on each node .* --trainer.num_nodes 1 runs on this machine alone"):
        fit("--trainer.num_nodes", "2", run="two_nodes")
    assert not (workdir / "checkpoints" / "two_nodes").exists()
    _check_multinode(SimpleNamespace(num_nodes=1, plugins=None))
    _check_multinode(SimpleNamespace(num_nodes=2, plugins=["my_pkg.MyCluster"]))
    monkeypatch.setenv("NODE_RANK", "1")
    _check_multinode(SimpleNamespace(num_nodes=2, plugins=None))
    monkeypatch.delenv("NODE_RANK")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job")
    _check_multinode(SimpleNamespace(num_nodes=2, plugins=None))  # under torchrun


def test_torchrun_world_size_must_match_the_trainer(monkeypatch):
    from types import SimpleNamespace

    from mpq_lightning.cli import _match_torchrun

    cfg = SimpleNamespace(devices=1, num_nodes=1)
    _match_torchrun(cfg)  # no torchrun: as configured
    assert (cfg.devices, cfg.num_nodes) == (1, 1)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    _match_torchrun(cfg)
    assert (cfg.devices, cfg.num_nodes) == (4, 2)
    _match_torchrun(matching := SimpleNamespace(devices="4", num_nodes=2))
    assert (matching.devices, matching.num_nodes) == ("4", 2)
    with pytest.raises(ValueError, match=r"torchrun started 8 processes \(4 per node\) but trainer.devices 2 x "
                                         r"trainer.num_nodes 1 = 2: set --trainer.devices 4 --trainer.num_nodes 2"):
        _match_torchrun(SimpleNamespace(devices=2, num_nodes=1))


def test_ddp_two_processes_cpu(workdir):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
    proc = subprocess.run(
        [sys.executable, str(REPO / "train.py"), "--config", TINY, "--run_name", "ddp", *QUIET,
         "--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.max_steps", "2",
         "--data.init_args.drop_last", "true", "--trainer.callbacks+=app_probes.RankProbe",
         "--model.optim.lora_lr", "null"],  # scale-aware lrs: all-reduced step statistics
        cwd=workdir, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "all_gather is deprecated" not in proc.stderr  # Lightning's gather through torch's old collective
    ckpt = torch.load(workdir / "checkpoints" / "ddp" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 2
    queue = next(v for k, v in ckpt["callbacks"].items() if k.startswith("MemoryQueue"))
    assert len(queue["generators"]) == 2 and not torch.equal(*queue["generators"])  # each rank's own pixels
    _ranks_agree(workdir / "ddp_probe")  # one student on both ranks, after calibration and training


def test_ddp_a_sigterm_to_one_rank_stops_every_rank_at_the_same_step(workdir):
    """``kill`` of rank 1 alone under 2-process DDP: both ranks stop after the same step (they agree
    once per step), last.ckpt holds that step, and the job exits with 143."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
    proc = subprocess.run(
        [sys.executable, str(REPO / "train.py"), "--config", TINY, "--run_name", "ddp_sigterm", *QUIET,
         "--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.max_steps", "6",
         "--data.init_args.drop_last", "true", _signal_probe(batch=1, signum=15, rank=1)],
        cwd=workdir, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 143, proc.stderr[-3000:]
    run = workdir / "checkpoints" / "ddp_sigterm"
    assert f"SIGTERM: stopped after step 2: saved {run / 'last.ckpt'}" in proc.stdout
    assert torch.load(run / "last.ckpt", weights_only=False)["global_step"] == 2


def test_evaluate_decodes_with_eval_vae_before_metrics(full_run, workdir, monkeypatch):
    """``--eval.vae``: metrics and media in pixels (a 2x autoencoder: 16x16 frames), the latent MSE
    kept; an autoencoder that does not fit the teacher is refused before any sampling."""
    from PIL import Image

    import mpq_lightning.evaluation as E
    from test_eval_vae import tiny_kl

    tiny_kl().save_pretrained(workdir / "vae")
    tiny_kl(latent_channels=8).save_pretrained(workdir / "vae8")
    run = workdir / "checkpoints" / "full"
    out = workdir / "eval_vae"
    with monkeypatch.context() as m:
        m.setattr(E, "generate", lambda *a, **k: pytest.fail("sampled before checking eval.vae"))
        with pytest.raises(ValueError, match="eval.vae: .*vae8 .* has 8 latent channels"):
            E.evaluate(str(run / "config.yaml"), "last", E.EvalConfig(num_samples=2, vae=str(workdir / "vae8")), str(out))
    assert not out.exists()
    metrics = E.evaluate(str(run / "config.yaml"), "last",
                         E.EvalConfig(num_samples=2, vae=str(workdir / "vae"), save_samples=True), str(out))
    assert metrics["sample_space"].startswith("pixels (AutoencoderKL") and metrics["latent_mse_student_vs_teacher"] > 0
    # eval.save_samples: the samples the metrics were computed on, decoded, with their latents and seeds
    from safetensors import safe_open

    assert "samples.safetensors" in metrics["files"]
    with safe_open(str(out / "samples.safetensors"), "pt") as f:
        saved = {k: f.get_tensor(k) for k in f.keys()}
        assert f.metadata()["checkpoint"] == metrics["checkpoint"] and f.metadata()["steps"] == str(metrics["steps"])
    assert saved["teacher"].shape == saved["student"].shape == (2, 3, 4, 16, 16)  # pixels of the 2x autoencoder
    assert saved["latents_teacher"].shape == (2, *full_run.model.teacher.latent_shape)
    assert float((saved["latents_student"] - saved["latents_teacher"]).pow(2).mean()) == pytest.approx(
        metrics["latent_mse_student_vs_teacher"], rel=1e-6)
    assert saved["noise_seed"].tolist() == [1234, 1235] and "labels" not in saved  # a text model: no labels
    with pytest.raises(ValueError, match="eval.save_samples must be true or false, got 'yes'"):
        E.EvalConfig(save_samples="yes")
    # grid: (teacher, student) x 2 samples of 16-pixel frames down, 4 frames across; RGB; each frame
    # enlarged 4x to 64 pixels, with 2-pixel borders
    tile = 4 * 16 + 2 * 2
    assert Image.open(out / "grid.png").size == (4 * tile, 2 * 2 * tile) and Image.open(out / "grid.png").mode == "RGB"
    assert Image.open(out / "videos.gif").size == (2 * tile, 2 * tile)


def test_checkpoint_file_is_a_small_fraction_of_the_fp_model(workdir):
    """The file on disk, Adam moments and callback state included, against the FP weights saved
    alone, at a LoRA rank / width ratio like the real recipes' (OpenSora: 32 / 1152; here 8 / 256).
    (The tiny STDiT is too narrow for this: its rank-4 LoRA is 1/8 of its width.)"""
    import io

    cli = fit("--trainer.max_steps", "1", "--model.model_kwargs", '{"config": {"hidden_size": 256, "num_heads": 4}}',
              "--model.quant.lora_rank", "8", "--model.calib.num_batches", "1", "--data.init_args.cache", "data/wide",
              "--data.init_args.recipe.name", "wide", "--data.init_args.recipe.num_trajectories", "1",
              "--data.init_args.recipe.random_conditions", "1", run="wide")
    fp = io.BytesIO()
    torch.save(cli.model.teacher.state_dict(), fp)
    size = (workdir / "checkpoints" / "wide" / "last.ckpt").stat().st_size
    print(f"checkpoint file {size} B, FP weights {fp.tell()} B: {size / fp.tell():.3f}")
    assert size < 0.3 * fp.tell(), (size, fp.tell())
    ckpt = torch.load(workdir / "checkpoints" / "wide" / "last.ckpt", weights_only=False)
    assert ckpt["optimizer_states"] and not any(k.startswith("teacher.") for k in ckpt["state_dict"])


def test_fp16_autocast_step_keeps_quantizer_math_fp32():
    """What ``16-mixed`` does on a GPU (fp16 autocast + a grad scaler), run directly on the CPU
    (Lightning substitutes bf16 there): every quantizer computes in fp32, the losses match the
    fp32 step's, and the scaled backward gives finite gradients to every trainable tensor."""
    from mpq_lightning.models import random_cond
    module = _calibrated_module(0, 1.0)
    t = module.teacher
    g = torch.Generator().manual_seed(5)
    batch = {"x_t": torch.randn(2, *t.latent_shape, generator=g), "t": torch.tensor([700, 300]),
             "step_index": torch.tensor([1, 2]), "cond": random_cond(t, 2, 5, length=6, num_classes=3)}
    want = {k: float(v) for k, v in module.compute_losses(batch).items()}
    dtypes = []
    hooks = [m.register_forward_hook(lambda m, a, out: dtypes.append(out.dtype))
             for n, m in module.student.named_modules() if n.endswith(("weight_quantizer", "act_quantizer"))]
    with torch.autocast("cpu", dtype=torch.float16):
        losses = module.compute_losses(batch)
    for h in hooks:
        h.remove()
    assert dtypes and set(dtypes) == {torch.float32}
    for k, v in losses.items():
        assert v.dtype == torch.float32 and abs(float(v) - want[k]) <= 2e-2 * abs(want[k]) + 1e-6, (k, float(v), want[k])
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    module.zero_grad(set_to_none=True)
    scaler.scale(sum(losses.values())).backward()
    trainable = [p for p in module.parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None and torch.isfinite(p.grad).all() for p in trainable)


def test_untrained_step_entries_are_saved_as_their_nearest_trained_entry(workdir):
    """A cache that keeps every 2nd sampler step trains 5 of the 10 activation-table entries. The
    checkpoint stores each untrained entry as a copy of the trained entry of the nearest timestep
    (trained ones untouched), and evaluate.py samples step i with that entry."""
    from mpq_lightning.evaluation import EvalConfig, evaluate
    from mpq_lightning.quant.quantizers import TimestepActQuantizer

    cli = fit("--trainer.max_steps", "2", "--data.init_args.cache", "data/stride2", "--data.init_args.recipe.name",
              "stride2", "--data.init_args.recipe.keep_stride", "2", run="stride2")
    module, kept = cli.model, [0, 2, 4, 6, 8]
    timesteps = torch.tensor(cli.datamodule.manifest["scheduler"]["timesteps"], dtype=torch.float64)
    fill = module._step_fill
    for i, entry in enumerate(fill.tolist()):
        assert entry in kept and abs(timesteps[entry] - timesteps[i]) == (timesteps[kept] - timesteps[i]).abs().min()
    ckpt = torch.load(workdir / "checkpoints" / "stride2" / "last.ckpt", weights_only=False)
    assert ckpt["mpq_step_fill"] == fill.tolist()
    tables = [(name, m) for name, m in module.named_modules() if isinstance(m, TimestepActQuantizer)]
    for name, m in tables:
        for attr in ("scale", "zero_point"):
            live, saved = getattr(m, attr).detach(), ckpt["state_dict"][f"{name}.{attr}"]
            assert torch.equal(saved, saved[fill]) and torch.equal(saved, live)  # the live tables are filled too
    # a value written into an untrained entry is replaced at the next save, in the live parameters
    # (what DeepSpeed's engine saves) and in the state dict; trained entries are left alone
    name, m = tables[0]
    with torch.no_grad():
        m.scale[1] = 123.0
        m.scale[2] = 7.0
    checkpoint = {"state_dict": {k: v.clone() for k, v in module.state_dict().items()}}
    module.on_save_checkpoint(checkpoint)
    assert float(m.scale[1]) == float(m.scale[fill[1]]) != 123.0 and float(m.scale[2]) == 7.0
    assert float(checkpoint["state_dict"][f"{name}.scale"][1]) == float(m.scale[fill[1]])
    metrics = evaluate(str(workdir / "checkpoints" / "stride2" / "config.yaml"), "last", EvalConfig(num_samples=2))
    assert "5 of the 10 entries are trained" in metrics["student_step_map"]


def test_matmul_precision_is_set_before_anything_is_built(workdir):
    from mpq_lightning.cli import MPQCLI

    before = torch.get_float32_matmul_precision()
    try:
        MPQCLI(args=["--config", TINY, "--matmul_precision", "medium", "--run_name", "mm"], run=False)
        assert torch.get_float32_matmul_precision() == "medium"
    finally:
        torch.set_float32_matmul_precision(before)
    with pytest.raises(SystemExit):
        MPQCLI(args=["--config", TINY, "--matmul_precision", "fast"], run=False)


def test_calibration_writes_every_parameter_in_place():
    """Under FSDP calibration runs on gathered parameters (``summon_full_params(writeback=True)``),
    which keeps only in-place writes: every trainable tensor keeps its storage through calibration
    (and the optimiser, built before it, keeps training the calibrated values)."""
    from mpq_lightning.models import random_cond
    from mpq_lightning.module import CalibConfig, LossConfig, QATModule, full_parameters
    from mpq_lightning.quant import QuantConfig

    for w_quantizer, a_quantizer in (("fzrmq", "timestep"), ("omq", "timestep"), ("uniform", "static")):
        torch.manual_seed(0)
        quant = QuantConfig(w_bits=3, a_bits=6, num_steps=4, w_quantizer=w_quantizer, a_quantizer=a_quantizer,
                            lora_rank=2, lora_init="svd_weight_error", lora_quantized_base=True, tqe=True)
        module = QATModule("tiny-stdit", {"config": {"depth": 1}}, quant, True, LossConfig(mse_reduction="mean"),
                           calib=CalibConfig(num_batches=1))
        t = module.teacher
        batch = {"x_t": torch.randn(2, *t.latent_shape), "t": torch.tensor([900, 100]), "step_index": torch.tensor([0, 3]),
                 "cond": random_cond(t, 2, 0, length=6, num_classes=3)}
        before = {n: (p.data_ptr(), p.detach().clone()) for n, p in module.named_parameters() if p.requires_grad}
        with full_parameters(None, writeback=True):  # no strategy: a no-op
            module.calibrate_from(_Batches([batch]))
        after = dict(module.named_parameters())
        assert {n: after[n].data_ptr() for n in before} == {n: ptr for n, (ptr, _) in before.items()}, w_quantizer
        changed = [n for n, (_, v) in before.items() if not torch.equal(v, after[n])]
        assert any("scale" in n for n in changed), (w_quantizer, changed)


def test_deepspeed_zero3_is_refused_by_name_before_anything_is_built(workdir):
    for strategy in ("deepspeed_stage_3", "deepspeed_stage_3_offload",
                     '{"class_path": "lightning.pytorch.strategies.DeepSpeedStrategy", "init_args": {"stage": 3}}'):
        with pytest.raises(ValueError, match="trainer.strategy: DeepSpeed ZeRO stage 3 partitions the parameters"):
            fit("--trainer.strategy", strategy, run="zero3")
    assert not (workdir / "checkpoints" / "zero3").exists()


def test_trainers_this_machine_cannot_build_are_refused_by_key_before_anything_is_built(workdir, monkeypatch):
    """Every real config targets a GPU: on a machine without one, Lightning's "No supported gpu backend
    found!" traceback came at the trainer's construction; so did its refusals of FSDP on the CPU and of
    more GPUs than the machine has."""
    cases = [(("--trainer.accelerator", "gpu"), "trainer.accelerator 'gpu', but torch .* sees no GPU here"),
             (("--trainer.devices", "2", "--trainer.strategy", "fsdp"), "trainer.strategy 'fsdp' needs GPUs")]
    for args, message in cases:
        if torch.cuda.is_available() and "gpu" in args:
            continue
        with pytest.raises(ValueError, match=message):
            fit(*args, run="no_gpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a one-GPU machine
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match=r"trainer.devices 4, but this machine has 1 GPU\(s\): pass --trainer.devices 1"):
        fit("--trainer.accelerator", "gpu", "--trainer.devices", "4", run="no_gpu")
    assert not (workdir / "checkpoints" / "no_gpu").exists()


def test_a_model_of_ones_own_trains_evaluates_and_exports_by_its_import_path(workdir):
    """``--model.model package.module:function`` (a function returning a Denoiser) needs no registry entry:
    a video model of the user's own (tests/app_probes.py) generates its cache, trains, evaluates, exports
    and loads back from the export by that path. A path that does not import, or a function that does
    not return a Denoiser, is refused naming model.model's value."""
    import yaml

    from mpq_lightning.evaluation import EvalConfig, evaluate
    from mpq_lightning.export import main as export_main
    from mpq_lightning.quant.export import load_quantized

    overlay = {"model": {"model": "app_probes:own_video_model", "model_kwargs": {"hidden": 16},
                         "quant": {"tqe": False, "num_steps": 4, "lora_exclude": ["time"]}},
               "data": {"init_args": {"cache": "data/own4", "recipe": {
                   "name": "own4", "random_conditions": None, "guidance_scale": 1.0, "num_inference_steps": 4}}}}
    (workdir / "own.yaml").write_text(yaml.safe_dump(overlay))
    with _probes():
        cli = main(["--config", TINY, "--config", str(workdir / "own.yaml"), "--run_name", "own", *QUIET,
                    "--trainer.max_steps", "2"])
        assert cli.trainer.global_step == 2 and type(cli.model.teacher.backbone).__name__ == "_OwnVideoNet"
        run = workdir / "checkpoints" / "own"
        metrics = evaluate(str(run / "config.yaml"), "last", EvalConfig(num_samples=2))
        assert metrics["steps"] == 4 and math.isfinite(metrics["latent_mse_student_vs_teacher"])
        assert export_main(["--config", str(run / "config.yaml"), "--ckpt_path", "last", "--out", str(workdir / "own_x")]) == 0
        loaded = load_quantized(workdir / "own_x")
        assert type(loaded.backbone).__name__ == "_OwnVideoNet"
        for name, error, match in (("app_probes:nowhere", ValueError, "cannot import 'nowhere' from 'app_probes'"),
                                   ("no_such_pkg.mod:f", ValueError, "cannot import 'f' from 'no_such_pkg.mod'"),
                                   ("app_probes:not_a_denoiser", TypeError, r"not_a_denoiser\(\) returned a Linear, not a")):
            with pytest.raises(error, match=f"model {name!r}: {match}"):
                fit("--model.model", name, run="own_bad")
    assert not (workdir / "checkpoints" / "own_bad").exists()


@pytest.mark.parametrize("name", ["", " ", ".", "..", "a/../b", "/tmp/elsewhere"])
def test_a_run_name_that_is_not_a_folder_below_the_root_is_refused(workdir, name):
    """``--run_name ""`` trained into checkpoints/ itself (the root of every run), ``..`` into its parent,
    an absolute path anywhere: refused by key before anything is written."""
    before = sorted(p.name for p in (workdir / "checkpoints").iterdir()) if (workdir / "checkpoints").exists() else []
    with pytest.raises(ValueError, match="must name a folder below trainer.default_root_dir"):
        fit("--trainer.max_steps", "1", run=name)
    after = sorted(p.name for p in (workdir / "checkpoints").iterdir()) if (workdir / "checkpoints").exists() else []
    assert after == before and not (workdir / "config.yaml").exists()


def test_sample_logger_decodes_with_a_vae(workdir):
    """``SampleLogger(vae=...)`` logs pixels: with a 2x autoencoder the 8x8 latent frames become 16x16
    (4 frames a row, shown 4x enlarged with 2-pixel borders); a missing folder is refused by key before anything is built."""
    import json

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from test_eval_vae import tiny_kl

    tiny_kl().save_pretrained(workdir / "vae_tb")
    callback = {"class_path": "mpq_lightning.callbacks.SampleLogger",
                "init_args": {"every_n_steps": 0, "num_samples": 2, "vae": str(workdir / "vae_tb")}}
    fit("--trainer.max_steps", "1", f"--trainer.callbacks+={json.dumps(callback)}", run="samples_vae")
    acc = EventAccumulator(str(workdir / "checkpoints" / "samples_vae"), size_guidance={"images": 0})
    acc.Reload()
    frames = acc.Images("samples/frames")[-1]
    # rows: 2 teacher + 2 student; each 16-pixel frame enlarged 4x for the viewer
    assert (frames.width, frames.height) == (4 * (64 + 4), 2 * 2 * (64 + 4))
    callback["init_args"]["vae"] = str(workdir / "no_vae")
    with pytest.raises(FileNotFoundError, match=r"trainer.callbacks\[\d\].init_args.vae: .*no_vae does not exist"):
        fit("--trainer.max_steps", "1", f"--trainer.callbacks+={json.dumps(callback)}", run="samples_no_vae")
    assert not (workdir / "checkpoints" / "samples_no_vae").exists()


def test_fine_tuning_reduces_the_student_teacher_error():
    """The point of QAT: 30 AdamW steps of the full method (FZ-RMQ W3A6, OOLRI, TALSQ, TQE, TMD) on
    one batch take the ε-MSE to the teacher below half its calibrated value (measured: about 1/10),
    and TMD down too. A sign error, a dead gradient or a zero learning rate fails this."""
    from mpq_lightning.models import random_cond
    from mpq_lightning.module import CalibConfig, LossConfig, OptimConfig, QATModule
    from mpq_lightning.quant import QuantConfig, set_quant_state

    torch.manual_seed(0)
    quant = QuantConfig(w_bits=3, a_bits=6, num_steps=4, w_quantizer="fzrmq", lora_rank=4, lora_init="svd_weight_error",
                        lora_quantized_base=True, tqe=True)
    optim = OptimConfig(lora_lr=1e-3, tqe_lr=1e-3, w_scale_lr=1e-4, a_scale_lr=1e-3, residual_lr=1e-4)
    module = QATModule("tiny-stdit", {"config": {"depth": 1}}, quant, True, LossConfig(mse_reduction="mean", tmd=True),
                       optim, CalibConfig(num_batches=1))
    t = module.teacher
    g = torch.Generator().manual_seed(1)
    batch = {"x_t": torch.randn(4, *t.latent_shape, generator=g), "t": torch.tensor([900, 600, 300, 100]),
             "step_index": torch.tensor([0, 1, 2, 3]), "cond": random_cond(t, 4, 0, length=6, num_classes=3)}
    with torch.no_grad():
        batch["teacher_output"] = t(batch["x_t"], batch["t"], batch["cond"], batch["step_index"])
    module.calibrate_from(_Batches([batch]))
    set_quant_state(module.student.backbone, True, True)
    opt = module.build_optimizer()
    first = None
    for _ in range(30):
        losses = module.compute_losses(batch)
        first = first or {k: float(v.detach()) for k, v in losses.items()}
        opt.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        opt.step()
    last = {k: float(v.detach()) for k, v in module.compute_losses(batch).items()}
    assert last["mse"] < 0.5 * first["mse"] and last["tmd"] < first["tmd"], (first, last)


def _tiny_module(w_quantizer: str, **optim):
    from mpq_lightning.models import random_cond
    from mpq_lightning.module import CalibConfig, LossConfig, OptimConfig, QATModule
    from mpq_lightning.quant import QuantConfig

    torch.manual_seed(0)
    quant = QuantConfig(w_bits=3, a_bits=6, num_steps=4, w_quantizer=w_quantizer, lora_rank=2, tqe=True,
                        fzrmq_layout="figure")
    module = QATModule("tiny-stdit", {"config": {"depth": 1}}, quant, True, LossConfig(mse_reduction="mean"),
                       OptimConfig(**optim), CalibConfig(num_batches=1))
    t = module.teacher
    batch = {"x_t": torch.randn(2, *t.latent_shape), "t": torch.tensor([900, 100]), "step_index": torch.tensor([0, 3]),
             "cond": random_cond(t, 2, 0, length=6, num_classes=3)}
    module.calibrate_from(_Batches([batch]))
    return module


@pytest.mark.parametrize("w_quantizer", ["uniform", "omq", "fzrmq"])
def test_scale_aware_lora_lr_is_the_mean_serving_step_over_2500(w_quantizer):
    """EfficientDM's rule, lr = mean(Δ_w) / 2500 per layer, with Δ_w the step of the quantizer that
    serves each output channel (OMQ: each channel's own class quantizer; FZ-RMQ: the base)."""
    from mpq_lightning.quant import QuantLayer

    module = _tiny_module(w_quantizer, lora_lr=None)
    lrs = {g["name"]: g["lr"] for g in module.param_groups()}
    kinds = set()
    for name, layer in module.student.backbone.named_modules():
        if not isinstance(layer, QuantLayer) or layer.lora is None:
            continue
        wq = layer.weight_quantizer
        kind = type(wq).__name__
        if kind == "OMQQuantizer":
            steps = [float(wq.quantizers[int(g)].scale[c].abs()) for c, g in enumerate(wq.group_id)]
        elif kind == "FZRMQQuantizer":
            steps = wq.base.scale.detach().abs().flatten().tolist()
        else:
            assert kind == "UniformQuantizer"
            steps = wq.scale.detach().abs().flatten().tolist()
        kinds.add(kind)
        assert lrs[f"lora:{name}"] == pytest.approx(sum(steps) / len(steps) / 2500, rel=1e-6), name
    assert {"uniform": "UniformQuantizer", "omq": "OMQQuantizer", "fzrmq": "FZRMQQuantizer"}[w_quantizer] in kinds


def test_optimizer_groups_and_schedules():
    """Every trainable tensor lands in its recipe group with that group's lr; warm-up then linear /
    cosine decay / constant, read from the scheduler's lambda (total 10 steps, warm-up 2)."""
    from types import SimpleNamespace

    module = _tiny_module("fzrmq", lora_lr=1e-4, w_scale_lr=2e-6, a_scale_lr=3e-4, tqe_lr=4e-5, residual_lr=5e-6,
                          warmup_steps=2)
    group_of = {id(p): g for g in module.param_groups() for p in g["params"]}
    want = {"lora": 1e-4, "weight_quantizer": 2e-6, "act_quantizer": 3e-4, "tqe": 4e-5, "residual": 5e-6}
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        kind = ("lora" if ".lora." in name else "residual" if "residual" in name else "act_quantizer"
                if "act_quantizer" in name else "weight_quantizer" if "weight_quantizer" in name else "tqe")
        assert group_of[id(p)]["name"] == kind and group_of[id(p)]["lr"] == want[kind], name
    assert set(want) == {g["name"] for g in module.param_groups()}
    expected = {"linear": [0.5, 1.0, 1.0, 0.875, 0.75], "cosine": [0.5, 1.0, 1.0, 0.5 * (1 + math.cos(math.pi / 8)),
                                                                      0.5 * (1 + math.cos(math.pi / 4))],
                "constant": [0.5, 1.0, 1.0, 1.0, 1.0]}
    for schedule, factors in expected.items():
        module.optim_cfg.schedule = schedule
        module._trainer = SimpleNamespace(estimated_stepping_batches=10)
        try:
            sched = module.configure_optimizers()["lr_scheduler"]["scheduler"]
        finally:
            module._trainer = None
        assert [sched.lr_lambdas[0](i) for i in range(5)] == pytest.approx(factors), schedule


def test_compute_losses_applies_the_loss_config():
    """Each LossConfig value reaches its term: the ε-MSE weight and reduction, TMD's weight, τ and
    legacy reshape (compared with tmd_loss called directly), TRD's and MTRD's constructor values."""
    from mpq_lightning.losses import output_mse, tmd_loss
    from mpq_lightning.models import random_cond
    from mpq_lightning.module import CalibConfig, LossConfig, QATModule
    from mpq_lightning.quant import QuantConfig

    torch.manual_seed(0)
    loss = LossConfig(mse_weight=2.0, mse_reduction="sum", tmd=True, tmd_weight=50.0, tmd_tau=0.5,
                      tmd_legacy_reshape=True, trd=True, trd_weight=7.0, trd_tau=0.3, trd_anchors=16, trd_chunk_size=8,
                      mtrd=True, mtrd_weight=0.2, mtrd_tau_c=0.05, mtrd_tau_kd=2.0, mtrd_anchors=32,
                      mtrd_memory_samples=48, mtrd_sampling="uniform")
    module = QATModule("tiny-stdit", {"config": {"depth": 1}}, QuantConfig(w_bits=4, a_bits=8, num_steps=4, lora_rank=2),
                       True, loss, calib=CalibConfig(num_batches=1))
    assert (module.trd.weight, module.trd.tau, module.trd.anchors, module.trd.chunk_size) == (7.0, 0.3, 16, 8)
    m = module.mtrd
    assert (m.weight, m.tau_c, m.tau_kd, m.anchors, m.memory_samples, m.sampling) == (0.2, 0.05, 2.0, 32, 48, "uniform")
    t = module.teacher
    batch = {"x_t": torch.randn(2, *t.latent_shape), "t": torch.tensor([900, 100]), "step_index": torch.tensor([0, 3]),
             "cond": random_cond(t, 2, 0, length=6, num_classes=3)}
    with torch.no_grad():
        batch["teacher_output"] = t(batch["x_t"], batch["t"], batch["cond"], batch["step_index"])
    module.calibrate_from(_Batches([batch]))
    from mpq_lightning.callbacks import MemoryQueue

    MemoryQueue(num_steps=4, pixels_per_step=8).attach(module)
    losses = module.compute_losses(batch)
    out_s, out_t = module._last["out_s"], batch["teacher_output"]
    torch.testing.assert_close(losses["mse"].detach(), 2.0 * output_mse(out_s, out_t, reduction="sum"))
    torch.testing.assert_close(losses["tmd"].detach(), tmd_loss(out_s, out_t, t.num_frames, "b c f h w", tau=0.5,
                                                                legacy_reshape=True, weight=50.0))
    assert set(losses) == {"mse", "trd", "mtrd", "tmd"}


def test_checkpoint_without_a_newer_quant_key_is_read_with_its_default():
    """A QuantConfig key added after a checkpoint was written counts as its default in the identity
    check: accepted when this run keeps the default, refused by name when it does not."""
    from mpq_lightning.module import QATModule
    from mpq_lightning.quant import QuantConfig

    module = QATModule("tiny-stdit", {"config": {"depth": 1}}, QuantConfig(w_bits=4, a_bits=8, a_quantizer="dynamic_token"))
    identity = module._identity()
    old = {**identity, "quant": {k: v for k, v in identity["quant"].items() if k != "a_token_share_batch"}}
    module.check_checkpoint({"mpq_identity": old})
    other = QATModule("tiny-stdit", {"config": {"depth": 1}},
                      QuantConfig(w_bits=4, a_bits=8, a_quantizer="dynamic_token", a_token_share_batch=True))
    with pytest.raises(ValueError, match="quant.a_token_share_batch: checkpoint False vs config True"):
        other.check_checkpoint({"mpq_identity": old})


def test_sharding_the_module_cannot_train_under_is_refused_at_fit_start():
    """DeepSpeed ZeRO-3 however configured (Lightning resolves the stage; here a stand-in strategy
    reporting it) and FSDP units nested in the module (an auto_wrap_policy) are refused by name."""
    from types import SimpleNamespace

    from torch import nn
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    from mpq_lightning.module import QATModule

    module = QATModule("tiny-stdit", {"config": {"depth": 1}})
    module.check_strategy(SimpleNamespace(strategy=SimpleNamespace()))  # DDP / single device: fine
    with pytest.raises(ValueError, match="trainer.strategy: DeepSpeed ZeRO stage 3"):
        module.check_strategy(SimpleNamespace(strategy=SimpleNamespace(zero_stage_3=True)))
    fake = FSDP.__new__(FSDP)
    nn.Module.__init__(fake)
    module.student.add_module("wrapped_block", fake)
    with pytest.raises(ValueError, match=r"FSDP units inside the module \(student.wrapped_block, ...: an auto_wrap_policy\)"):
        module.check_strategy(SimpleNamespace(strategy=SimpleNamespace()))


def test_deepspeed_gets_the_micro_batch_size_our_batch_yielding_loaders_hide():
    """Lightning's DeepSpeed strategy reads its micro-batch size off ``loader.batch_sampler``, which
    is None for our loaders (they yield whole batches): the module's ``setup``, which runs before the
    strategy's, fills it from the data module unless the user's DeepSpeed config sets it."""
    from types import SimpleNamespace

    from mpq_lightning.module import fill_deepspeed_micro_batch

    DeepSpeedStrategy = type("DeepSpeedStrategy", (), {})  # deepspeed itself is not installed here

    def strategy(config):
        s = DeepSpeedStrategy()
        s.config = config
        return s

    s = strategy({"zero_optimization": {"stage": 2}})
    fill_deepspeed_micro_batch(s, SimpleNamespace(batch_size=6))
    assert s.config["train_micro_batch_size_per_gpu"] == 6
    s = strategy({"train_micro_batch_size_per_gpu": 3})
    fill_deepspeed_micro_batch(s, SimpleNamespace(batch_size=6))
    assert s.config["train_micro_batch_size_per_gpu"] == 3  # the user's own value stays
    s = strategy({})
    fill_deepspeed_micro_batch(s, None)
    assert s.config["train_micro_batch_size_per_gpu"] == 1
    other = SimpleNamespace(config={})  # DDP, FSDP, ...: untouched
    fill_deepspeed_micro_batch(other, SimpleNamespace(batch_size=6))
    assert other.config == {}
    from mpq_lightning.data import OnTheFlyDataModule, TrajectoryDataModule

    for dm in (TrajectoryDataModule("data/none", batch_size=5), OnTheFlyDataModule(batch_size=5)):  # the real ones
        s = strategy({})
        fill_deepspeed_micro_batch(s, dm)
        assert s.config["train_micro_batch_size_per_gpu"] == 5


def test_under_deepspeed_checkpoints_leave_the_teacher_out_and_keep_the_frozen_calibrated_state():
    """DeepSpeed's engine saves ``module.state_dict()`` minus every parameter without a gradient
    (engine.module_state_dict with exclude_frozen_parameters, 0.19.8), bypassing ``on_save_checkpoint``:
    the teacher's buffers (STDiT's positional embeddings, null caption) would stay, and the student's
    calibrated frozen parameters (weight zero points) would be lost, a resume not calibrating again.
    Under DeepSpeed the state dict drops what a Lightning checkpoint drops, and the checkpoint's own
    entries (DeepSpeed's client state) carry the frozen student state back."""
    from types import SimpleNamespace

    from mpq_lightning.module import CalibConfig, LossConfig, OptimConfig, QATModule
    from mpq_lightning.quant import QuantConfig

    from mpq_lightning.quant import set_quant_state

    def make():
        torch.manual_seed(0)
        quant = QuantConfig(w_bits=3, a_bits=6, num_steps=10, w_quantizer="fzrmq", lora_rank=2,
                            lora_init="svd_weight_error", lora_quantized_base=True)
        return QATModule("tiny-stdit", {}, quant, True, LossConfig(), OptimConfig(), CalibConfig(num_batches=1))

    module = make()
    d = module.teacher
    g = torch.Generator().manual_seed(0)
    batch = {"x_t": torch.randn(2, *d.latent_shape, generator=g), "t": torch.tensor([10, 500]),
             "step_index": torch.tensor([1, 5]), "cond": {"y": torch.randn(2, 1, *d.cond_spec["y"].shape[1:], generator=g)}}
    module.calibrate_from(SimpleNamespace(train_dataloader=lambda: [batch]))
    full = module.state_dict()
    assert any(k.startswith("teacher.") and k.endswith("pos_embed") for k in full)  # a teacher buffer
    DeepSpeedStrategy = type("DeepSpeedStrategy", (), {"config": {"train_micro_batch_size_per_gpu": 2}})
    module._trainer = SimpleNamespace(strategy=DeepSpeedStrategy(), datamodule=None)
    module.setup("fit")
    module.setup("fit")  # idempotent

    def deepspeed_saves(m):  # what DeepSpeed's exclude_frozen_parameters leaves of the state dict
        sd = m.state_dict()
        for n, p in m.named_parameters():
            if not p.requires_grad:
                sd.pop(n, None)
        return sd

    sd = deepspeed_saves(module)
    assert sd and not [k for k in sd if k.startswith("teacher.") or k in module._fp_keys]
    frozen = module.frozen_student_state()
    assert any(k.endswith("weight_quantizer.zero_point") for k in frozen) and not set(frozen) & set(sd)
    assert set(sd) | set(frozen) == {k for k in full if not k.startswith("teacher.") and k not in module._fp_keys}
    with torch.no_grad():  # "trained" state; the frozen one is calibrated: both differ from a fresh module's
        for n, p in module.student.named_parameters():
            if p.requires_grad:
                p.add_(0.5)
    sd, frozen = deepspeed_saves(module), module.frozen_student_state()
    fresh = make()
    result = fresh.load_state_dict(sd, strict=False)  # DeepSpeed loads with the module's strict_loading (False)
    assert not result.unexpected_keys
    fresh.load_frozen_student_state(frozen)  # on_load_checkpoint, from the client state
    for (n, a), b in zip(module.student.named_parameters(), fresh.student.parameters()):
        assert torch.equal(a, b), n
    # and what derives from them: OOLRI's quantized base weight (a cache rebuilt on load) from its frozen
    # quantizer, which DeepSpeed's load saw uncalibrated; the quantized student computes the same
    for m in (module, fresh):
        set_quant_state(m.student.backbone, True, True)
    with torch.no_grad():
        out = [m.student(batch["x_t"], batch["t"], batch["cond"], batch["step_index"]) for m in (module, fresh)]
    assert torch.equal(out[0], out[1])
    with pytest.raises(ValueError, match=r"mpq_frozen_params does not fit this model: missing \['student\."):
        fresh.load_frozen_student_state(dict(list(frozen.items())[1:]))
    # evaluate.py / the exporter read a DeepSpeed folder as one dict (Lightning's ZeRO-to-fp32 conversion:
    # the trainable parameters and buffers DeepSpeed saved, plus the checkpoint's own entries)
    ckpt = {"state_dict": dict(sd), "mpq_identity": module._identity(), "mpq_frozen_params": frozen}
    other = make()
    other.on_load_checkpoint(ckpt)
    other.load_state_dict(ckpt["state_dict"], strict=True)
    for (n, a), b in zip(module.student.named_parameters(), other.student.parameters()):
        assert torch.equal(a, b), n
    assert set(make().state_dict()) == set(full)  # without DeepSpeed: the whole state, as before


@pytest.mark.parametrize("cast", ["module", "parameters"])
def test_a_module_cast_to_bf16_calibrates_from_fp32_batches_and_trains(cast):
    """DeepSpeed under bf16-mixed casts every parameter to bf16 before ``on_fit_start`` (its engine;
    quantizer steps included, with fp32 master copies in its optimiser) and converts only the batches of
    its own forward. Before DeepSpeed 0.18 it cast the whole module; since then the parameters only,
    its fp32 buffers (STDiT's positional embeddings) stay fp32 (seen on the H100 with 0.19.8: a dtype
    error in the timestep embedder). Calibration reads fp32 batches from the data module: it must run on
    that module, and a training step on a converted batch then gives finite losses and gradients."""
    from types import SimpleNamespace

    from mpq_lightning.callbacks.memory_queue import MemoryQueue
    from mpq_lightning.module import CalibConfig, LossConfig, OptimConfig, QATModule
    from mpq_lightning.quant import QuantConfig, set_quant_state

    quant = QuantConfig(w_bits=3, a_bits=6, num_steps=10, w_quantizer="fzrmq", lora_rank=4, lora_init="svd_weight_error",
                        lora_quantized_base=True, tqe=True)
    loss = LossConfig(mse_reduction="mean", mtrd=True, mtrd_anchors=32, mtrd_memory_samples=32, tmd=True)
    module = QATModule("tiny-stdit", {}, quant, True, loss, OptimConfig(lora_lr=1e-4), CalibConfig(num_batches=2))
    d = module.teacher
    g = torch.Generator().manual_seed(0)
    batch = {"x_t": torch.randn(2, *d.latent_shape, generator=g), "t": torch.tensor([10, 500]),
             "step_index": torch.tensor([1, 5]), "cond": {"y": torch.randn(2, 1, *d.cond_spec["y"].shape[1:], generator=g)}}
    if cast == "module":
        module.to(torch.bfloat16)
    else:
        for p in module.parameters():
            p.data = p.data.to(torch.bfloat16)
        assert module.teacher.backbone.pos_embed.dtype == torch.float32
    module.calibrate_from(SimpleNamespace(train_dataloader=lambda: [batch, batch]))
    set_quant_state(module.student.backbone, True, True)
    MemoryQueue(num_steps=10, pixels_per_step=16).attach(module)
    converted = {**batch, "x_t": batch["x_t"].bfloat16(), "cond": {"y": batch["cond"]["y"].bfloat16()}}
    for _ in range(2):  # the second step has a filled memory queue
        module.zero_grad()
        losses = module.compute_losses(converted)
        sum(losses.values()).backward()
        assert all(torch.isfinite(v) for v in losses.values())
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads) and losses["mtrd"] > 0


def test_vae_mismatch_is_found_at_setup_and_evaluation_ignores_training_callbacks(workdir):
    """SampleLogger(vae=...) checks the autoencoder against the teacher in ``setup`` (every rank,
    before training), without loading weights; evaluate.py builds a run without its training
    callbacks, so a sampler's autoencoder folder need not exist where the run is evaluated."""
    import json
    import shutil

    from mpq_lightning.callbacks import SampleLogger
    from mpq_lightning.evaluation import EvalConfig, evaluate
    from mpq_lightning.models import build
    from test_eval_vae import tiny_kl

    tiny_kl(latent_channels=8).save_pretrained(workdir / "vae8_setup")
    logger = SampleLogger(vae=str(workdir / "vae8_setup"))
    with pytest.raises(ValueError, match="SampleLogger.vae: .*has 8 latent channels"):
        logger.setup(None, type("M", (), {"teacher": build("tiny-stdit")})(), "fit")
    tiny_kl().save_pretrained(workdir / "vae_gone")
    callback = {"class_path": "mpq_lightning.callbacks.SampleLogger",
                "init_args": {"every_n_steps": 0, "at_train_end": False, "vae": str(workdir / "vae_gone")}}
    fit("--trainer.max_steps", "1", f"--trainer.callbacks+={json.dumps(callback)}", run="vae_gone")
    shutil.rmtree(workdir / "vae_gone")
    metrics = evaluate(str(workdir / "checkpoints" / "vae_gone" / "config.yaml"), "last", EvalConfig(num_samples=2))
    assert metrics["num_samples"] == 2


def test_quant_config_refuses_token_pooling_without_the_dynamic_quantizer_and_ignores_smooth_momentum_on_resume():
    from mpq_lightning.module import QATModule
    from mpq_lightning.quant import QuantConfig

    with pytest.raises(ValueError, match="a_token_share_batch applies to a_quantizer 'dynamic_token', not 'timestep'"):
        QuantConfig(a_bits=6, a_token_share_batch=True)
    module = QATModule("tiny-stdit", {"config": {"depth": 1}},
                       QuantConfig(w_bits=4, a_bits=8, num_steps=2, smooth_alpha=0.5, smooth_momentum=0.95))
    identity = module._identity()
    module.check_checkpoint({"mpq_identity": {**identity, "quant": {**identity["quant"], "smooth_momentum": None}}})


def test_a_deepspeed_checkpoint_folder_is_read_through_lightnings_conversion_or_refused_saying_how(tmp_path,
                                                                                                  monkeypatch):
    """evaluate.py and the exporter take a DeepSpeed run's ``last.ckpt/`` folder: with DeepSpeed installed
    through Lightning's ZeRO-to-fp32 conversion (stood in for here: DeepSpeed is not installed), without
    it an error naming the folder and the one-line conversion; a folder of something else is refused."""
    import importlib.util
    import sys
    from types import ModuleType

    from mpq_lightning.evaluation import resolve_checkpoint
    from mpq_lightning.files import read_checkpoint

    folder = tmp_path / "run" / "last.ckpt"
    (folder / "checkpoint").mkdir(parents=True)
    (tmp_path / "run" / "config.yaml").write_text("{}")
    assert resolve_checkpoint(tmp_path / "run" / "config.yaml", "last") == folder
    with pytest.raises(ValueError, match=r"is a folder but not a DeepSpeed checkpoint \(no 'latest' file"):
        read_checkpoint(folder)
    (folder / "latest").write_text("checkpoint")
    with pytest.raises(ValueError, match=r"no \*model_states.pt in .* not fully written"):
        read_checkpoint(folder)
    torch.save({"module": {"student.x": torch.zeros(1)}, "ds_version": "0.19.8", "mpq_identity": {"model": "m"},
                "global_step": 2}, folder / "checkpoint" / "mp_rank_00_model_states.pt")
    from mpq_lightning.files import read_deepspeed_client_state

    assert read_deepspeed_client_state(folder) == {"mpq_identity": {"model": "m"}, "global_step": 2}  # resume checks
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else real_find_spec(name, *a))
    with pytest.raises(ValueError, match=rf"{re.escape(str(folder))} is a DeepSpeed checkpoint folder, and reading it "
                                         r"needs DeepSpeed .*convert_zero_checkpoint_to_fp32_state_dict"):
        read_checkpoint(folder)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object())
    seen = []

    def convert(checkpoint_dir, output_file, tag=None):
        seen.append((Path(checkpoint_dir), Path(output_file).parent.exists()))
        print(f"Saving fp32 state dict to {output_file}")  # as Lightning's does: kept off our output
        return {"state_dict": {"student.x": torch.zeros(1)}, "mpq_identity": {}}

    stand_in = ModuleType("lightning.pytorch.utilities.deepspeed")
    stand_in.convert_zero_checkpoint_to_fp32_state_dict = convert
    monkeypatch.setitem(sys.modules, "lightning.pytorch.utilities.deepspeed", stand_in)
    assert read_checkpoint(folder)["state_dict"]["student.x"].shape == (1,)
    assert seen == [(folder, True)]
    from mpq_lightning.export import load_qat_module

    with pytest.raises(ValueError, match=r"is a folder \(DeepSpeed\): pass the run's --config with it"):
        load_qat_module(None, folder)


def test_hooks_a_strategy_strips_are_registered_again():
    """Lightning's DeepSpeed strategy strips every module hook before a stand-alone validation
    (``remove_module_hooks``): the relation-loss feature sites then saw no student features and
    ``train.py validate`` crashed in MTRD. ``start_run`` registers the module's hooks again (once)."""
    from lightning.pytorch.strategies.deepspeed import remove_module_hooks

    from mpq_lightning.models import random_cond

    module = _tiny_module("fzrmq")
    module.leave_teacher_out_of_state_dicts()  # as under DeepSpeed
    t = module.teacher
    batch = {"x_t": torch.randn(2, *t.latent_shape), "t": torch.tensor([900, 100]), "step_index": torch.tensor([0, 3]),
             "cond": random_cond(t, 2, 0, length=6, num_classes=3)}
    with torch.no_grad():
        _, _, f_s, f_t = module._student_teacher(batch)
        remove_module_hooks(module)
        module._feat_s.value = module._feat_t.value = None
        assert module._student_teacher(batch)[2:] == (None, None)  # what validation met
        assert any(k.startswith("teacher.") for k in module.state_dict())
        module.reattach_hooks()
        module.reattach_hooks()
        _, _, f_s2, f_t2 = module._student_teacher(batch)
    assert torch.equal(f_s2, f_s) and torch.equal(f_t2, f_t)
    assert len(module._feat_s.module._forward_hooks) == 1 and len(module._state_dict_hooks) == 1
    assert not any(k.startswith("teacher.") for k in module.state_dict())


def test_a_failed_config_save_keeps_the_runs_config(workdir, monkeypatch):
    """A resume writes config.yaml again; if that fails (a value that does not serialise, a full disk),
    the run keeps its earlier config.yaml whole: evaluate.py, export and the next resume read it."""
    from lightning.pytorch.cli import LightningArgumentParser

    from mpq_lightning.cli import RunConfigCallback

    fit("--trainer.max_steps", "2", run="cfg_kept")
    config = workdir / "checkpoints" / "cfg_kept" / "config.yaml"
    before = config.read_bytes()

    def fails(*args, **kwargs):
        raise TypeError("a value that does not serialise")

    original = RunConfigCallback.setup

    def setup(self, *args, **kwargs):  # the config's dump fails when it is saved, not while it is parsed
        monkeypatch.setattr(LightningArgumentParser, "dump", fails)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(RunConfigCallback, "setup", setup)
    with pytest.raises(TypeError, match="does not serialise"):
        fit("--trainer.max_steps", "4", "--ckpt_path", "last", run="cfg_kept")
    assert config.read_bytes() == before and b"max_steps: 2" in before
