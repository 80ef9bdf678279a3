"""PerTimestepError and SampleLogger: accumulation math, checkpoint state, TensorBoard output.

A small fake LightningModule stands in for QATModule (same `_last`, `teacher`, `student`, `quant_cfg`
contract) around pure-torch `Denoiser`s, so a 4-step fit takes a second or two on the CPU.
"""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader

from mpq_lightning.callbacks import PerTimestepError, SampleLogger
from mpq_lightning.callbacks.samples import _StepIndexMap, latents_to_images, make_grid
from mpq_lightning.callbacks.timestep_error import _raster_curve, render_curve
from mpq_lightning.models.registry import CondSpec, Denoiser

NUM_STEPS = 3
SCHED = {
    "name": "ddim",
    "config": {"num_train_timesteps": 1000, "beta_schedule": "linear", "clip_sample": False},
    "num_inference_steps": 10,
    "guidance_scale": 1.0,
}


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -------------------------------------------------------------------------------------------------
# Fakes
# -------------------------------------------------------------------------------------------------


class TinyNet(nn.Module):
    """Per-position channel mixing + time / class / text shifts; any number of spatial dims."""

    def __init__(self, channels: int, classes: int | None = None, text_dim: int | None = None) -> None:
        super().__init__()
        self.mix = nn.Linear(channels, channels)
        self.time = nn.Linear(1, channels)
        self.label = nn.Embedding(classes + 1, channels) if classes else None  # + the null class
        self.text = nn.Linear(text_dim, channels) if text_dim else None

    def forward(self, x, t, class_labels=None, y=None):
        h = self.mix(x.movedim(1, -1)) + self.time((t.float() / 1000).view(-1, 1)).view(-1, *([1] * (x.ndim - 2)), x.shape[1])
        if class_labels is not None:
            h = h + self.label(class_labels).view(-1, *([1] * (x.ndim - 2)), x.shape[1])
        if y is not None:
            h = h + self.text(y.mean(1)).view(-1, *([1] * (x.ndim - 2)), x.shape[1])
        return torch.tanh(h.movedim(-1, 1))


class ClassDenoiser(Denoiser):
    def null_cond(self, cond):
        return {"class_labels": torch.full_like(cond["class_labels"], 4)}


def image_denoiser() -> Denoiser:
    torch.manual_seed(0)
    return ClassDenoiser(
        TinyNet(3, classes=4), latent_shape=(3, 8, 8), patch_size=(1, 1), out_channels=3, cond_kind="class",
        cond_spec={"class_labels": CondSpec((), "long")}, prediction_type="epsilon", default_scheduler=SCHED,
        feature_site="mix", feature_layout="b c h w",
    )


def video_denoiser() -> Denoiser:
    torch.manual_seed(0)
    return Denoiser(
        TinyNet(4, text_dim=6), latent_shape=(4, 3, 8, 8), patch_size=(1, 1, 1), out_channels=4, cond_kind="text",
        cond_spec={"y": CondSpec((None, 6))}, prediction_type="epsilon", default_scheduler=SCHED,
        feature_site="mix", feature_layout="b c f h w",
    )


class FakeQAT(L.LightningModule):
    """What the callbacks use of QATModule: teacher, student, quant_cfg.num_steps and `_last`."""

    def __init__(self, teacher: Denoiser) -> None:
        super().__init__()
        self.teacher = teacher.eval().requires_grad_(False)
        self.student = copy.deepcopy(teacher).train().requires_grad_(True)
        with torch.no_grad():
            for p in self.student.parameters():
                p.add_(0.3 * torch.randn_like(p))
        self.quant_cfg = SimpleNamespace(num_steps=NUM_STEPS)
        self.student_modes: list[bool] = []

    def training_step(self, batch, batch_idx):
        self.student_modes.append(self.student.training)
        cond = batch.get("cond")
        with torch.no_grad():
            out_t = self.teacher(batch["x_t"], batch["t"], cond, batch["step_index"])
        out_s = self.student(batch["x_t"], batch["t"], cond, batch["step_index"])
        self._last = {"out_s": out_s.detach(), "out_t": out_t.detach(), "step_index": batch["step_index"]}
        return (out_s - out_t).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.student.parameters(), lr=0.01)


class DataModule(L.LightningDataModule):
    def __init__(self, denoiser: Denoiser, with_conditions: bool = True) -> None:
        super().__init__()
        self.denoiser, self.with_conditions = denoiser, with_conditions
        if with_conditions:
            self.sample_conditions = lambda n: {"y": torch.randn(n, 5, 6, generator=torch.Generator().manual_seed(1))}

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        items = []
        for i in range(8):
            step = i % NUM_STEPS
            item = {"x_t": torch.randn(*self.denoiser.latent_shape, generator=g), "t": torch.tensor(900 - 300 * step),
                    "step_index": torch.tensor(step)}
            if self.denoiser.cond_kind == "class":
                item["cond"] = {"class_labels": torch.tensor(i % 4)}
            elif self.denoiser.cond_kind == "text":
                item["cond"] = {"y": torch.randn(5, 6, generator=g)}
            items.append(item)
        return DataLoader(items, batch_size=2)


def fit(tmp_path, denoiser, callbacks, **dm_kwargs):
    module = FakeQAT(denoiser)
    trainer = L.Trainer(
        max_steps=4, log_every_n_steps=1, accelerator="cpu", enable_progress_bar=False, enable_checkpointing=False,
        enable_model_summary=False, logger=TensorBoardLogger(str(tmp_path), name="run", version=""), callbacks=callbacks,
    )
    trainer.fit(module, datamodule=DataModule(denoiser, **dm_kwargs))
    return trainer, module


def read_events(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "run"), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    return acc


# -------------------------------------------------------------------------------------------------
# PerTimestepError
# -------------------------------------------------------------------------------------------------


def test_errors_match_hand_computation():
    cb = PerTimestepError(num_steps=4)
    out_t = torch.zeros(3, 2, 2)
    out_s = torch.stack([torch.full((2, 2), 1.0), torch.full((2, 2), 2.0), torch.tensor([[3.0, 0.0], [0.0, 0.0]])])
    cb.update(out_s, out_t, torch.tensor([0, 2, 0]))  # per-sample MSE: 1, 4, 9/4
    cb.update(out_s[:1] * 3, out_t[:1], 2)  # int step index broadcast: MSE 9 at step 2
    err = cb.errors()
    assert err.shape == (4,)
    assert err[0].item() == pytest.approx((1 + 9 / 4) / 2)
    assert err[2].item() == pytest.approx((4 + 9) / 2)
    assert math.isnan(err[1].item()) and math.isnan(err[3].item())
    assert cb.counts().tolist() == [2, 0, 2, 0]
    cb.update(out_s[:1], out_t[:1], torch.tensor([6]))  # beyond num_steps: the buffers grow
    assert cb.errors().shape == (7,) and cb.errors()[6].item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="shape"):
        cb.update(out_s, out_t[:2], torch.tensor([0, 1, 2]))


def test_per_timestep_error_sizes_its_table_from_the_host_copy():
    """With the step indices' host values (``step_index_host``) the accumulation reads nothing back from
    the device: ``meta`` tensors, whose values cannot be read, go through."""
    cb = PerTimestepError(num_steps=2)
    out = torch.zeros(3, 4, device="meta")
    cb.update(out, out, torch.tensor([0, 5, 1], device="meta"), step_index_host=[0, 5, 1])
    assert cb._stats["train"].size == 6
    with pytest.raises(RuntimeError, match="meta"):  # without it the tensor is read
        cb.update(out, out, torch.tensor([0, 5, 1], device="meta"))


def test_state_dict_round_trip_continues_running_means():
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g), torch.randint(0, 5, (4,), generator=g))
               for _ in range(6)]
    full = PerTimestepError(num_steps=5)
    first = PerTimestepError(num_steps=5)
    for i, b in enumerate(batches):
        full.update(*b)
        if i < 3:
            first.update(*b)
    state = first.state_dict()
    resumed = PerTimestepError()  # num_steps comes from the checkpoint
    resumed.load_state_dict(copy.deepcopy(state))
    torch.testing.assert_close(resumed.errors(), first.errors(), equal_nan=True)
    for b in batches[3:]:
        resumed.update(*b)
    torch.testing.assert_close(resumed.errors(), full.errors(), equal_nan=True)
    torch.testing.assert_close(resumed.counts(), full.counts())


def test_resume_from_checkpoint_continues(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    denoiser = image_denoiser()

    def run(max_steps, ckpt_path=None):
        cb = PerTimestepError(log_every_n_steps=100)
        trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", enable_progress_bar=False, enable_model_summary=False,
                            logger=False, callbacks=[cb, ModelCheckpoint(dirpath=tmp_path, save_last=True)])
        trainer.fit(FakeQAT(denoiser), datamodule=DataModule(denoiser), ckpt_path=ckpt_path)
        return cb

    first = run(2)
    assert first.counts().sum() == 4
    resumed = run(4, ckpt_path=str(tmp_path / "last.ckpt"))
    assert resumed.counts().sum() == 8  # the first run's 4 samples came back from the checkpoint
    assert (resumed.counts() >= first.counts()).all()


def test_render_curve_draws_something():
    values = torch.tensor([0.5, float("nan"), 0.2, 0.1, 0.05])
    for img in (_raster_curve(values).numpy(), render_curve(values), render_curve(values, log_scale=True)):
        assert img.dtype.name == "uint8" and img.ndim == 3 and img.shape[2] == 3
        assert (img < 250).any() and (img == 255).any()
    assert _raster_curve(torch.full((3,), float("nan"))).shape == (320, 480, 3)  # nothing seen: just axes
    assert _raster_curve(torch.zeros(1)).shape == (320, 480, 3)


def test_fit_logs_per_step_scalars_and_curve(tmp_path):
    cb = PerTimestepError()
    trainer, _ = fit(tmp_path, image_denoiser(), [cb])
    assert cb.counts().tolist() == [3, 3, 2]  # 4 batches of 2, step indices i % 3
    acc = read_events(tmp_path)
    scalars, images = set(acc.Tags()["scalars"]), set(acc.Tags()["images"])
    assert {f"timestep_error/step_{i:03d}" for i in range(NUM_STEPS)} <= scalars
    assert "timestep_error/curve" in images
    logged = acc.Scalars("timestep_error/step_001")
    assert logged[-1].step == 4 and logged[-1].value == pytest.approx(cb.errors()[1].item(), rel=1e-5)
    assert [e.step for e in acc.Scalars("timestep_error/step_000")] == [1, 2, 3, 4]  # logged every step
    assert len(acc.Images("timestep_error/curve")) == 4
    assert cb.state_dict()["last_logged_step"] == 4


def test_sync_folds_every_rank_and_checkpoints_synced_totals():
    """Under DDP the pending sums/counts are summed over ranks (here a fake second rank with 6 steps)."""
    other = torch.zeros(2, 6, dtype=torch.float64)
    other[:, 5] = torch.tensor([10.0, 2.0])  # the other rank saw step 5 twice, total error 10
    other[:, 0] = torch.tensor([3.0, 1.0])

    def reduce(t, reduce_op):
        if reduce_op == "max":
            return torch.maximum(t, torch.tensor([6.0]))
        return t + other

    trainer = SimpleNamespace(world_size=2, is_global_zero=False, global_step=3, loggers=[],
                              strategy=SimpleNamespace(root_device=torch.device("cpu"), reduce=reduce))
    cb = PerTimestepError(num_steps=3)
    cb._trainer = trainer
    cb.update(torch.ones(2, 4), torch.zeros(2, 4), torch.tensor([0, 1]))  # MSE 1 at steps 0 and 1
    assert cb.state_dict()["counts"].sum() == 0  # nothing synced yet: a DDP checkpoint has no pending batches
    cb._sync_and_log(trainer, "train")
    torch.testing.assert_close(cb.counts(), torch.tensor([2.0, 1, 0, 0, 0, 2], dtype=torch.float64))
    torch.testing.assert_close(cb.errors()[[0, 1, 5]], torch.tensor([2.0, 1.0, 5.0]))
    assert cb.state_dict()["counts"].tolist() == [2, 1, 0, 0, 0, 2]
    assert cb.state_dict()["last_logged_step"] == 3


def test_validation_is_accumulated_separately(tmp_path):
    class WithVal(DataModule):
        def val_dataloader(self):
            return self.train_dataloader()

    class ValModule(FakeQAT):
        def validation_step(self, batch, batch_idx):
            self.training_step(batch, batch_idx)

    cb = PerTimestepError()
    denoiser = image_denoiser()
    trainer = L.Trainer(max_steps=2, log_every_n_steps=1, accelerator="cpu", enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False, val_check_interval=2,
                        num_sanity_val_steps=1, logger=TensorBoardLogger(str(tmp_path), name="run", version=""),
                        callbacks=[cb])
    trainer.fit(ValModule(denoiser), datamodule=WithVal(denoiser))
    assert cb.counts("train").tolist() == [2, 1, 1]
    assert cb.counts("val").tolist() == [3, 3, 2]  # one full validation run, not the sanity check
    acc = read_events(tmp_path)
    assert "timestep_error_val/step_002" in acc.Tags()["scalars"] and "timestep_error_val/curve" in acc.Tags()["images"]


def test_with_qat_module_tiny_stdit(tmp_path):
    """The real QATModule contract: `_last` from compute_losses, quantized student, text conditions."""
    from mpq_lightning.module import CalibConfig, QATModule
    from mpq_lightning.quant import QuantConfig

    torch.manual_seed(0)
    module = QATModule("tiny-stdit", quant=QuantConfig(w_bits=4, a_bits=8, lora_rank=2, num_steps=2),
                       calib=CalibConfig(num_batches=1))
    shape, (length, width) = module.teacher.latent_shape, module.teacher.cond_spec["y"].shape[1:]

    class TextData(L.LightningDataModule):
        def train_dataloader(self):
            g = torch.Generator().manual_seed(0)
            items = [{"x_t": torch.randn(*shape, generator=g), "t": torch.tensor(900 - 800 * (i % 2)),
                      "step_index": torch.tensor(i % 2), "cond": {"y": torch.randn(1, length, width, generator=g)}}
                     for i in range(4)]
            return DataLoader(items, batch_size=2)

        def sample_conditions(self, n):
            return {"y": torch.randn(n, 1, length, width, generator=torch.Generator().manual_seed(3))}

    errors, sampler = PerTimestepError(), SampleLogger(every_n_steps=0, num_samples=2)
    trainer = L.Trainer(max_steps=2, log_every_n_steps=1, accelerator="cpu", enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False,
                        logger=TensorBoardLogger(str(tmp_path), name="run", version=""), callbacks=[errors, sampler])
    trainer.fit(module, datamodule=TextData())
    assert errors.counts().tolist() == [2, 2] and torch.isfinite(errors.errors()).all()
    acc = read_events(tmp_path)
    assert {"timestep_error/curve", "samples/video", "samples/frames"} <= set(acc.Tags()["images"])
    assert {"timestep_error/step_000", "timestep_error/step_001"} <= set(acc.Tags()["scalars"])
    # samples come from the student as it trains (quantizers on), whatever its flags were; flags restored
    from mpq_lightning.quant import QuantLayer, set_quant_state

    layer = next(m for m in module.student.modules() if isinstance(m, QuantLayer))
    seen = []
    handle = layer.register_forward_pre_hook(lambda m, args: seen.append((m.weight_quant, m.act_quant)))
    set_quant_state(module.student.backbone, False, False)
    sampler.generate(module, TextData())
    handle.remove()
    assert seen and set(seen) == {(True, module.calib_cfg.train_act_quant)}
    assert (layer.weight_quant, layer.act_quant) == (False, False)


# -------------------------------------------------------------------------------------------------
# SampleLogger
# -------------------------------------------------------------------------------------------------


def test_grid_and_latent_mapping():
    x = torch.tensor([-2.0, -1.0, 0.0, 1.0, 2.0]).view(1, 5, 1, 1).expand(2, 5, 3, 3)
    img = latents_to_images(x)
    assert img.shape == (2, 3, 3, 3) and img[0, :, 0, 0].tolist() == [0.0, 0.0, 0.5]
    assert latents_to_images(x[:, :1]).shape[1] == 1 and latents_to_images(x[:, :2]).shape[1] == 1
    images = torch.rand(2, 4, 3, 5, 6)
    grid = make_grid(images, pad=1, min_side=1)
    assert grid.shape == (3, 2 * 7, 4 * 8)
    assert (grid[:, 0] == 1).all() and torch.equal(grid[:, 1:6, 1:7], images[0, 0])
    big = make_grid(images, pad=1)  # 5-pixel sides: enlarged 13x (65 >= 64), every pixel a 13 x 13 block
    assert big.shape == (3, 2 * (65 + 2), 4 * (78 + 2))
    tile = big[:, 1:66, 1:79]
    assert torch.equal(tile, images[0, 0].repeat_interleave(13, -2).repeat_interleave(13, -1))
    assert make_grid(torch.rand(1, 1, 1, 64, 70), pad=0).shape == (1, 64, 70)  # large enough: as it is


def test_step_index_map():
    calls = []

    class Model:
        default_scheduler = SCHED

        def __call__(self, x, t, cond, step_index):
            calls.append(step_index)

    model = Model()
    assert _StepIndexMap(model, 10, 10)._map(torch.tensor([3])).tolist() == [3]
    assert _StepIndexMap(model, 10, 1)._map(torch.tensor([0, 9])).tolist() == [0, 0]  # one shared entry
    assert _StepIndexMap(model, 10, 4)._map(torch.tensor([0, 4, 9])).tolist() == [0, 1, 3]  # proportional
    _StepIndexMap(model, 10, 1)(None, None, None, torch.tensor([5]))
    assert calls[0].tolist() == [0]
    assert _StepIndexMap(model, 10, 1).default_scheduler is SCHED


def test_generate_same_noise_and_restores_modes():
    module = FakeQAT(image_denoiser())
    module.student.load_state_dict(module.teacher.state_dict())  # identical weights → identical samples
    module.student.train()
    cb = SampleLogger(num_samples=3, guidance_scale=2.0)
    teacher, student = cb.generate(module)
    assert teacher.shape == (3, 3, 8, 8)
    torch.testing.assert_close(teacher, student)
    assert module.student.training and not module.teacher.training
    again, _ = cb.generate(module)
    torch.testing.assert_close(again, teacher)  # fixed seed
    assert not torch.equal(SampleLogger(num_samples=3, seed=1).generate(module)[0], teacher)


def test_each_sampling_run_marks_a_cuda_graph_step_first():
    """With CUDA-graph replay, a sampling run that began before any step mark would have torch start a
    new generation at every no-grad call of a compiled unit (one block's replay overwrote the previous
    block's output on an H200): SampleLogger marks a step before the teacher's run and the student's."""
    module = FakeQAT(image_denoiser())
    events = []
    module.mark_cudagraph_step = lambda: events.append("mark")
    for name in ("teacher", "student"):
        getattr(module, name).register_forward_pre_hook(lambda m, a, name=name: events.append(name))
    SampleLogger(num_samples=2, guidance_scale=1.0).generate(module)
    calls = [e for i, e in enumerate(events) if i == 0 or e != events[i - 1]]  # runs of forwards collapsed
    assert calls == ["mark", "teacher", "mark", "student"]
    assert events.count("teacher") == events.count("student") == NUM_STEPS  # the quantizers' step table


def test_final_report_marks_a_cuda_graph_step_before_each_sampling_run():
    """FinalReport's comparison samples in batches, teacher first: a mark before each batch's run (as in
    SampleLogger), so a student replayed as CUDA graphs replays the previous run's graphs rather than
    recording one per denoiser call of the whole report."""
    from mpq_lightning.compare import SamplerSpec, compare

    module = FakeQAT(image_denoiser())
    events = []
    for name in ("teacher", "student"):
        getattr(module, name).register_forward_pre_hook(lambda m, a, name=name: events.append(name))
    spec = SamplerSpec("ddim", SCHED["config"], num_inference_steps=2, guidance_scale=1.0)
    rows = compare({"student": module.student}, module.teacher, spec, n=5, seed=0,
                   new_step=lambda: events.append("mark"))
    assert set(rows) == {"FP", "student"}
    calls = [e for i, e in enumerate(events) if i == 0 or e != events[i - 1]]
    assert calls == ["mark", "teacher", "mark", "student"]
    assert events.count("teacher") == events.count("student") == 2
    events.clear()
    compare({"student": module.student}, module.teacher, spec, n=5, seed=0)  # no mark asked: none made
    assert "mark" not in events
    events.clear()
    from mpq_lightning.compare import generate

    generate(module.student, spec, n=5, seed=0, batch=2, new_step=lambda: events.append("mark"))
    assert [e for i, e in enumerate(events) if i == 0 or e != events[i - 1]] == ["mark", "student"] * 3


def test_comparison_samples_text_models_with_the_data_modules_conditions():
    """A text model (OpenSora, Latte, ...) in FinalReport's comparison: every model samples from the same
    condition rows of ``sample_conditions``, batch by batch; without such a data module, a clear error
    (it was a KeyError on the missing prompt embedding after training)."""
    from mpq_lightning.compare import SamplerSpec, compare, generate

    module = FakeQAT(video_denoiser())
    table = {"y": torch.randn(5, 2, 6, generator=torch.Generator().manual_seed(3))}
    null = {"y": torch.zeros(5, 2, 6)}
    seen = {"teacher": [], "student": []}
    for name in seen:
        getattr(module, name).register_forward_pre_hook(
            lambda m, args, name=name: seen[name].append(args[2]["y"].clone()))

    class TextData:
        def sample_conditions(self, n):
            return {k: v[:n] for k, v in table.items()}, {k: v[:n] for k, v in null.items()}

    spec = SamplerSpec("ddim", SCHED["config"], num_inference_steps=2, guidance_scale=2.0)
    rows = compare({"student": module.student}, module.teacher, spec, n=5, seed=0, datamodule=TextData())
    assert math.isfinite(rows["student"]["psnr_vs_fp"]) and "temporal_consistency" in rows["FP"]
    for name, calls in seen.items():
        assert len(calls) == 2  # one batch of 5, 2 steps, conditional and null rows batched together
        assert torch.equal(calls[0][:5], table["y"]), name  # the data module's rows, in order
        assert torch.equal(calls[0][5:], null["y"])
    with pytest.raises(ValueError, match="sample_conditions"):
        generate(module.student, spec, n=2)


def test_fit_logs_image_samples(tmp_path):
    sampler = SampleLogger(every_n_steps=2, num_samples=3, guidance_scale=2.0)
    trainer, module = fit(tmp_path, image_denoiser(), [PerTimestepError(), sampler])
    acc = read_events(tmp_path)
    images = acc.Images("samples/teacher_student")
    assert [im.step for im in images] == [2, 4]  # step 4 is also the end of training: logged once
    assert (images[0].height, images[0].width) == (2 * 68, 3 * 68)  # 8x8 samples enlarged 8x, 2-pixel borders
    assert "samples/mse" in acc.Tags()["scalars"] and acc.Scalars("samples/mse")[0].value > 0
    assert all(module.student_modes) and not module.teacher.training


def test_fit_logs_video_samples(tmp_path):
    sampler = SampleLogger(every_n_steps=0, num_samples=2, at_train_start=True)
    fit(tmp_path, video_denoiser(), [sampler])
    acc = read_events(tmp_path)
    images = set(acc.Tags()["images"])
    assert {"samples/video", "samples/frames"} <= images
    video = acc.Images("samples/video")
    assert [v.step for v in video] == [0, 4]
    assert video[0].encoded_image_string[:3] in (b"GIF", b"\x89PN")
    frames = acc.Images("samples/frames")[0]
    assert (frames.height, frames.width) == (2 * 2 * 68, 3 * 68)  # rows: 2 teacher + 2 student; cols: 3 frames


def test_text_model_without_conditions_is_skipped(tmp_path):
    with pytest.warns(UserWarning, match="sample_conditions"):
        fit(tmp_path, video_denoiser(), [SampleLogger(every_n_steps=1, num_samples=2)], with_conditions=False)
    acc = read_events(tmp_path)
    assert not any(tag.startswith("samples/") for tag in acc.Tags()["images"])


def test_cli_yaml_arguments():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_argument("--callbacks", type=list[L.Callback])
    cfg = parser.parse_args([
        "--callbacks",
        '[{"class_path": "mpq_lightning.callbacks.PerTimestepError", "init_args": {"log_every_n_steps": 7}},'
        ' {"class_path": "mpq_lightning.callbacks.SampleLogger", "init_args": {"every_n_steps": 3, "scheduler": "ddim",'
        ' "scheduler_config": {"num_train_timesteps": 1000}, "class_labels": [1, 2]}}]',
    ])
    init = parser.instantiate if hasattr(parser, "instantiate") else parser.instantiate_classes
    callbacks = init(cfg).callbacks
    assert callbacks[0].log_every_n_steps == 7
    assert callbacks[1].every_n_steps == 3 and callbacks[1].class_labels == [1, 2]
    assert callbacks[1].scheduler_config == {"num_train_timesteps": 1000}


def test_final_report_takes_part_in_the_log_dir_broadcast_on_every_rank():
    """``trainer.log_dir`` is a collective under DDP: a rank that returned before reading it would
    leave rank 0 blocked in the broadcast at the end of every multi-GPU run."""
    from mpq_lightning.callbacks import FinalReport

    class Trainer:
        is_global_zero = False
        reads = 0

        @property
        def log_dir(self):
            Trainer.reads += 1
            return None

    report = FinalReport()
    report.on_train_start(Trainer(), pl_module=None)  # a fit that trained
    report.on_fit_end(Trainer(), pl_module=None)
    assert Trainer.reads == 1


@pytest.mark.parametrize("has_report", [True, False])
def test_final_report_of_a_fit_that_trained_nothing_keeps_the_runs_report(tmp_path, capsys, has_report):
    """Resuming a finished run (a requeued job) trains nothing: the run's report.json is kept, not
    sampled again (minutes on a real model); a run without one (its report failed) gets it."""
    from mpq_lightning.callbacks import FinalReport

    broadcasts, reported = [], []
    strategy = SimpleNamespace(broadcast=lambda obj, src: broadcasts.append(obj) or obj, model=nn.Linear(2, 2))
    trainer = SimpleNamespace(log_dir=str(tmp_path), is_global_zero=True, global_step=4, max_steps=4,
                              strategy=strategy)
    if has_report:
        (tmp_path / "report.json").write_text("{}")
    report = FinalReport()
    report._report = lambda *args: reported.append(args)
    report.on_fit_start(trainer, None)  # no on_train_start: Lightning skipped the training loop
    report.on_fit_end(trainer, None)
    assert broadcasts == [has_report] and len(reported) == (not has_report)
    assert ("report.json is kept" in capsys.readouterr().out) == has_report
    assert (tmp_path / "report.json").exists() == has_report
    report.on_fit_start(trainer, None)
    report.on_train_start(trainer, None)  # a fit that trained: reported again whatever the folder holds
    report.on_fit_end(trainer, None)
    assert len(reported) == 1 + (not has_report) and len(broadcasts) == 1


def test_sample_logger_maps_sampling_steps_to_trained_entries_of_the_nearest_timestep():
    """A 100-entry table trained on a cache that kept every 5th step, sampled with 20 steps: each
    sampling step uses a trained entry, the one whose training timestep is nearest."""
    from mpq_lightning.callbacks.samples import trained_step_entries
    from mpq_lightning.models.sampling import make_scheduler

    train = make_scheduler("ddim")
    train.set_timesteps(100)

    class DataModule:
        manifest = {"scheduler": {"timesteps": train.timesteps.tolist()},
                    "structure": {"kept_steps": list(range(0, 100, 5))}}
        options = {"steps": None, "step_stride": 1}

    sampler = make_scheduler("ddim")
    sampler.set_timesteps(20)
    entries = trained_step_entries(DataModule(), sampler.timesteps, 100)
    kept = torch.arange(0, 100, 5)
    assert set(entries.tolist()) <= set(kept.tolist())
    for i, t in enumerate(sampler.timesteps):
        gaps = (train.timesteps[kept] - t).abs()
        assert (train.timesteps[entries[i]] - t).abs() == gaps.min()
    DataModule.options = {"steps": None, "step_stride": 10}  # the data module serves every 10th step only
    assert set(trained_step_entries(DataModule(), sampler.timesteps, 100).tolist()) <= set(range(0, 100, 10))
    assert trained_step_entries(object(), sampler.timesteps, 100) is None  # no cache: proportional


@pytest.mark.parametrize("source", ["cache", "on_the_fly"])
def test_sample_logger_samples_with_the_training_sampler(source):
    """The student's step tables belong to the sampler it was trained on, so SampleLogger (FinalReport
    and evaluate.py through the same ``training_sampler``) samples with the trajectory cache's recipe or
    the on-the-fly stream's settings, not the teacher's default sampler (DDIM without guidance here):
    the teacher is called at the training sampler's timesteps, with guidance (twice the rows)."""
    from mpq_lightning.models.sampling import make_scheduler

    module = FakeQAT(image_denoiser())
    if source == "cache":
        class Data:
            manifest = {"recipe": {"scheduler": "ddpm", "scheduler_config": {"num_train_timesteps": 1000},
                                   "num_inference_steps": NUM_STEPS, "guidance_scale": 2.5, "eta": 0.0}}
        name = "ddpm"
    else:
        class Data:
            stream_args = {"scheduler": "dpm-solver", "scheduler_config": None, "num_inference_steps": None,
                           "guidance_scale": 2.5, "cfg_channels": None, "eta": 0.0}
        name = "dpm-solver"
        module.teacher.default_scheduler = {**SCHED, "num_inference_steps": NUM_STEPS}  # the stream's step count
    calls = []
    module.teacher.register_forward_pre_hook(lambda m, a: calls.append((a[0].shape[0], float(a[1].flatten()[0]))))
    SampleLogger(num_samples=2).generate(module, Data())
    expected = make_scheduler(name)
    expected.set_timesteps(NUM_STEPS)
    assert calls == [(4, float(t)) for t in expected.timesteps]
    from mpq_lightning.compare import training_sampler

    spec = training_sampler(module.teacher, Data())
    assert (spec.scheduler, spec.num_inference_steps, spec.guidance_scale) == (name, NUM_STEPS, 2.5)
    # nothing known about the training data: the teacher's sampler with the step table's length
    spec = training_sampler(module.teacher, object(), table_steps=7)
    assert (spec.scheduler, spec.num_inference_steps, spec.guidance_scale) == ("ddim", 7, 1.0)


def test_fsdp_ranks_all_gather_parameters_around_calls_outside_the_forward(monkeypatch, tmp_path):
    """FSDP keeps parameters sharded between forwards: the sampling callbacks gather them on every
    rank (a collective; rank zero alone then samples), calibration with write-back. FSDP itself needs
    a GPU, so its ``summon_full_params`` is recorded here on a stand-in FSDP module."""
    import contextlib

    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    from mpq_lightning.callbacks import FinalReport
    from mpq_lightning.module import full_parameters

    calls = []

    @contextlib.contextmanager
    def summon(module, writeback=False, **kwargs):
        calls.append(("enter", writeback))
        yield
        calls.append(("exit", writeback))

    monkeypatch.setattr(FSDP, "summon_full_params", staticmethod(summon))
    fake = FSDP.__new__(FSDP)
    nn.Module.__init__(fake)
    strategy = SimpleNamespace(model=nn.Sequential(fake))
    assert isinstance(full_parameters(SimpleNamespace(strategy=strategy)), contextlib.nullcontext)  # no process group
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        trainer = SimpleNamespace(strategy=strategy, global_step=4, is_global_zero=False, log_dir=None)
        logger = SampleLogger(every_n_steps=2)
        logger.on_train_batch_end(trainer, None, None, None, 0)  # rank 1 of 2: gathers, does not sample
        report = FinalReport()
        report.on_train_start(trainer, None)
        report.on_fit_end(trainer, pl_module=None)
        assert calls == [("enter", False), ("exit", False)] * 2
        calls.clear()
        with full_parameters(trainer, writeback=True):
            pass
        assert calls == [("enter", True), ("exit", True)]
        assert isinstance(full_parameters(SimpleNamespace(strategy=SimpleNamespace(model=nn.Linear(2, 2)))),
                          contextlib.nullcontext)  # DDP / single device: nothing to gather
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("bound, description", [({"max_steps": 5}, "Epoch 0"), ({"max_epochs": 3}, "Epoch 0/2")])
def test_progress_bar_description(bound, description):
    """Lightning's Rich bar reads `Epoch 0/-2` in a run bounded by max_steps alone (max_epochs -1);
    ours drops the bound there and keeps Lightning's `Epoch 0/2` where there is one."""
    from mpq_lightning.callbacks import StepRichProgressBar

    bar = StepRichProgressBar()
    trainer = L.Trainer(accelerator="cpu", logger=False, callbacks=[bar], **bound)
    bar.setup(trainer, None, "fit")
    assert bar._get_train_description(0).strip() == description


def test_final_report_table_fits_80_columns(capsys, monkeypatch):
    """One row per metric, one column per model: nothing truncated on an 80-column terminal, a
    metric a model lacks shown as '-', and each metric says which way is better."""
    from mpq_lightning.compare import print_rows

    monkeypatch.setenv("COLUMNS", "80")
    row = {"fd_real": 219.0, "class_consistency": 0.1875, "psnr_vs_fp": 20.86, "ssim_vs_fp": 0.7176,
           "temporal_consistency": 0.4081}
    fp = {k: v for k, v in row.items() if not k.endswith("_vs_fp")}
    print_rows({"FP": fp, "naive PTQ": row, "trained (ours)": row}, "W3A6")
    lines = capsys.readouterr().out.splitlines()
    assert lines and max(len(x) for x in lines) <= 80 and "…" not in "".join(lines)
    body = {x.split("│")[1].strip(): [c.strip() for c in x.split("│")[2:-1]] for x in lines if x.startswith("│")}
    assert body["psnr_vs_fp"] == ["higher", "-", "20.86", "20.86"]
    assert body["fd_real"] == ["lower", "219", "219", "219"]
    assert list(body) == ["fd_real", "class_consistency", "psnr_vs_fp", "ssim_vs_fp", "temporal_consistency"]


def test_evaluation_table_folds_long_values_at_80_columns(capsys, monkeypatch):
    """evaluate.py's table: a long checkpoint path wraps whole (no '…'), keeps brackets (not read as
    Rich markup), lists print as plain text."""
    from mpq_lightning.evaluation import print_table

    monkeypatch.setenv("COLUMNS", "80")
    path = "checkpoints/a_rather_long_run_name_for_[this]_table/step000100.ckpt"
    print_table({"step_error": [0.1, 0.3, 0.2], "checkpoint": path, "files": ["grid.png", "videos.gif"]})
    lines = capsys.readouterr().out.splitlines()
    assert max(len(x) for x in lines) <= 80 and "…" not in "".join(lines)
    values = "".join(x.split("│")[2].strip() for x in lines if x.startswith("│"))
    assert path in values and "grid.png, videos.gif" in values and "step 1: 0.3" in values


@pytest.mark.parametrize("max_steps, global_step, processed, accumulate, batches, total", [
    (100, 0, 0, 1, 1000, 100),     # a fresh run: the steps to take
    (102, 101, 101, 1, 1000, 102),  # resumed at step 100 of one epoch, one batch later: Lightning's total was 1
    (100, 50, 101, 2, 1000, 200),   # two micro-batches a step, mid-window: 101 done, 99 to go
    (500, 400, 0, 1, 60, 60),       # a later epoch of 60 batches: its length
])
def test_progress_bar_total_of_a_step_bounded_run(max_steps, global_step, processed, accumulate, batches, total):
    """The bar counts the batch index within the epoch; its total must end where max_steps does,
    also in a run resumed mid-epoch (Lightning's reads `102/1` there)."""
    from mpq_lightning.callbacks import StepRichProgressBar

    bar = StepRichProgressBar()
    progress = SimpleNamespace(current=SimpleNamespace(processed=processed))
    bar._trainer = SimpleNamespace(
        max_epochs=-1, max_steps=max_steps, global_step=global_step, accumulate_grad_batches=accumulate,
        num_training_batches=batches, fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(batch_progress=progress)))
    assert bar.total_train_batches == total
