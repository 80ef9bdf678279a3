"""Trajectory streams: DDP sharding, bounded memory, selection, mid-epoch resume, on-the-fly mode."""

from __future__ import annotations

import json
import os
import re
import socket
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import psutil
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_trajectories import make_teacher, write_prompts

from mpq_lightning.data import (
    CacheError,
    TeacherForcedTrajectories,
    TrajectoryDataModule,
    TrajectoryRecipe,
    ensure_cache,
    synthesize_cache,
)
from mpq_lightning.models import guide, make_scheduler, sample


def uids(loader) -> list[list[int]]:
    return [batch["uid"].tolist() for batch in loader]


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    """30 trajectories x 3 steps x 2 branches = 180 samples in 8 shards of latents [4, 4, 8, 8]."""
    return synthesize_cache(
        tmp_path_factory.mktemp("small") / "small", (4, 4, 8, 8), 30, [0, 2, 4], shard_size=4, num_conditions=3
    )


# -------------------------------------------------------------------------------------------------
# DDP: generation by two ranks, then each rank streams its part
# -------------------------------------------------------------------------------------------------


def _ddp_worker(rank: int, root: str, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    recipe = TrajectoryRecipe(
        name="ddp",
        scheduler="ddim",
        num_inference_steps=2,
        guidance_scale=4.0,
        cond_path=str(Path(root) / "prompts.safetensors"),
        num_trajectories=5,
        shard_size=1,
        batch_size=1,
    )
    written = []
    path = ensure_cache(recipe, make_teacher(), Path(root) / "data",  # rank r writes shards r, r + 2, ...
                        on_shard_written=lambda index, _: written.append(index))
    Path(root, f"written{rank}.json").write_text(json.dumps(written))
    seen = uids(TrajectoryDataModule(str(path), batch_size=3, shuffle_buffer=4).train_dataloader())
    Path(root, f"rank{rank}.json").write_text(json.dumps(seen))
    dist.destroy_process_group()


def test_two_ranks_generate_and_see_disjoint_samples(tmp_path):
    write_prompts(tmp_path / "prompts.safetensors")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(str(tmp_path), port), nprocs=2)
    manifest = json.loads((tmp_path / "data" / "ddp" / "manifest.json").read_text())
    assert manifest["complete"] and len(manifest["shards"]) == 5
    written = [json.loads((tmp_path / f"written{r}.json").read_text()) for r in range(2)]
    assert written == [[0, 2, 4], [1, 3]]  # the shards were split between the ranks
    seen = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert len(seen[0]) == len(seen[1])  # equal batch counts: no DDP hang
    flat = [set(sum(s, [])) for s in seen]
    assert not flat[0] & flat[1]
    assert flat[0] | flat[1] == set(range(manifest["structure"]["num_samples"]))  # 5 x 2 steps x 2 branches


def _race_worker(rank: int, root: str, port: int) -> None:
    from datetime import timedelta

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    # a short collective timeout: a rank left alone at a broadcast fails here instead of hanging CI
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=40))
    from mpq_lightning.data import trajectories

    exclusive = trajectories._exclusive

    @contextmanager
    def reached_the_lock(directory, rank_, world, **kwargs):  # tells the test that this rank is past its own check
        Path(root, f"at_lock{rank_}").touch()
        with exclusive(directory, rank_, world, **kwargs):
            yield

    trajectories._exclusive = reached_the_lock
    manifest = Path(root, "data", "race", "manifest.json")
    if rank == 1:  # reaches the cache only after the other job finished it
        while not (manifest.exists() and json.loads(manifest.read_text()).get("complete")):
            time.sleep(0.05)
    try:
        ensure_cache(_race_recipe(root), make_teacher(), Path(root) / "data")
        Path(root, f"race{rank}.ok").write_text("ok")
    finally:
        dist.destroy_process_group()


def _race_recipe(root: str) -> TrajectoryRecipe:
    return TrajectoryRecipe(name="race", scheduler="ddim", num_inference_steps=2, guidance_scale=4.0,
                            cond_path=str(Path(root) / "prompts.safetensors"), num_trajectories=2, shard_size=1,
                            batch_size=1)


def test_ranks_agree_when_another_job_finishes_the_cache_between_their_checks(tmp_path):
    """Another job holds the generation lock and finishes the cache after rank 0 looked (unfinished)
    and before rank 1 looks (finished). Checked on each rank, rank 1 would return at once and leave
    rank 0 at the lock's broadcast until the process group's timeout; with a process group rank 0
    decides for both, so both return once the other job is done."""
    import fcntl

    write_prompts(tmp_path / "prompts.safetensors")
    ensure_cache(_race_recipe(str(tmp_path)), make_teacher(), tmp_path / "staged", distributed=False)  # the other job's work
    (tmp_path / "data").mkdir()
    with open(tmp_path / "data" / ".race.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the other job is generating
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        ctx = mp.start_processes(_race_worker, args=(str(tmp_path), port), nprocs=2, join=False, start_method="spawn")
        deadline = time.monotonic() + 180  # bounded waits: a failure here must not stall the suite

        def wait(done) -> None:
            while not done():
                if time.monotonic() > deadline:
                    for process in ctx.processes:
                        process.kill()
                    pytest.fail("the two ranks did not get through ensure_cache within 180 s")

        wait(lambda: (tmp_path / "at_lock0").exists() or ctx.join(timeout=0.05))  # rank 0 found no cache and waits
        (tmp_path / "staged" / "race").rename(tmp_path / "data" / "race")  # the other job finishes
    wait(lambda: ctx.join(timeout=1))
    assert Path(tmp_path, "race0.ok").exists() and Path(tmp_path, "race1.ok").exists()


# -------------------------------------------------------------------------------------------------
# Memory, selection
# -------------------------------------------------------------------------------------------------


def test_resident_memory_is_flat(tmp_path):
    # 12 shards of 32 samples x 128 KiB (x_t + teacher output) = 48 MiB, 12x the 32-sample shuffle buffer
    path = synthesize_cache(tmp_path / "big", (4, 4, 32, 32), 96, [0, 1], shard_size=8)
    process = psutil.Process()
    loader = TrajectoryDataModule(str(path), batch_size=8, shuffle_buffer=32, verify="size").train_dataloader()
    rss = []
    for batch in loader:
        del batch
        rss.append(process.memory_info().rss)
    assert len(rss) == 96 * 2 * 2 // 8
    growth = max(rss) - rss[4]
    assert growth < 16 * 2**20, f"RSS grew by {growth / 2**20:.1f} MiB while streaming a 48 MiB cache"


def test_selection_of_steps_conditions_and_branches(small):
    full = sum(uids(TrajectoryDataModule(str(small), batch_size=7, shuffle=False).train_dataloader()), [])
    assert full == list(range(180))  # no shuffle: stored order
    dm = TrajectoryDataModule(
        str(small), batch_size=5, steps=[2, 4], step_stride=4, conditions=[0, 2], branches=["cond"]
    )
    batches = list(dm.train_dataloader())
    steps = torch.cat([b["step_index"] for b in batches])
    assert set(steps.tolist()) == {4}
    assert set(torch.cat([b["cond_index"] for b in batches]).tolist()) == {0, 2}
    assert set(torch.cat([b["branch"] for b in batches]).tolist()) == {0}
    assert len(steps) == 20  # trajectories with j % 3 in {0, 2}: 20 of 30, one step, one branch
    batch = batches[0]
    assert torch.equal(batch["cond"]["y"], dm.cache.conditions()["cond.y"][batch["cond_index"]])


def test_validation_trajectories_are_held_out_of_training_and_calibration(small):
    """``val_trajectories`` leave the training and calibration streams and are exactly what the
    validation loader serves (stored order, every selected step and branch); bad indices name the key."""
    held = [4, 17]
    dm = TrajectoryDataModule(str(small), batch_size=7, seed=1, val_trajectories=held, steps=[2, 4])
    train = torch.cat([b["trajectory"] for b in dm.train_dataloader()])
    calib = torch.cat([b["trajectory"] for b in dm.calibration_dataloader()])
    assert set(train.tolist()) == set(calib.tolist()) == set(range(30)) - set(held) and len(train) == 28 * 2 * 2
    val = list(dm.val_dataloader())
    want = [(j * 3 + pos) * 2 + b for j in held for pos in (1, 2) for b in (0, 1)]  # steps 2 and 4 are kept positions 1, 2
    assert sum(uids(val), []) == want and all(set(batch["step_index"].tolist()) <= {2, 4} for batch in val)
    assert TrajectoryDataModule(str(small), batch_size=7).val_dataloader() == []  # no validation without them
    ranks = [sum(uids(TrajectoryDataModule(str(small), batch_size=3, val_trajectories=held, rank=r, world_size=2)
                      .val_dataloader()), []) for r in (0, 1)]
    assert sorted(ranks[0] + ranks[1]) == sorted(u for j in held for u in range(j * 6, j * 6 + 6))  # split, no overlap
    with pytest.raises(CacheError, match=r"data.init_args.val_trajectories \[30\] out of range \(the cache has 30"):
        TrajectoryDataModule(str(small), val_trajectories=[3, 30]).train_dataloader()


# -------------------------------------------------------------------------------------------------
# Resume mid-epoch
# -------------------------------------------------------------------------------------------------


def test_resume_mid_epoch_gives_the_remaining_batches(small):
    options = dict(batch_size=8, shuffle_buffer=20, seed=3, num_workers=2)
    reference = TrajectoryDataModule(str(small), **options)
    loader = reference.train_dataloader()
    epochs = [uids(loader), uids(loader)]
    assert epochs[0] != epochs[1] and sorted(sum(epochs[0], [])) == list(range(180))  # epoch-dependent shuffle

    interrupted = TrajectoryDataModule(str(small), **options)
    it = iter(interrupted.train_dataloader())
    head = [next(it)["uid"].tolist() for _ in range(9)]
    state = interrupted.state_dict()
    assert head == epochs[0][:9] and state["batches"] == 9

    resumed = TrajectoryDataModule(str(small), **options)
    resumed.load_state_dict(state)
    loader = resumed.train_dataloader()
    assert uids(loader) == epochs[0][9:]
    assert uids(loader) == epochs[1]


def test_a_reloaded_loader_continues_and_calibration_leaves_the_position(small):
    """``train_dataloader()`` called again (``reload_dataloaders_every_n_epochs``, or a callback)
    continues the stream instead of replaying epoch 0; ``calibration_dataloader()`` gives the first
    batches of the training order without moving the checkpointed position."""
    options = dict(batch_size=8, shuffle_buffer=20, seed=3)
    loader = TrajectoryDataModule(str(small), **options).train_dataloader()
    epochs = [uids(loader), uids(loader), uids(loader)]

    dm = TrajectoryDataModule(str(small), **options)
    calib = dm.calibration_dataloader()
    assert [b["uid"].tolist() for b, _ in zip(calib, range(3))] == epochs[0][:3]
    assert dm.state_dict()["batches"] == 0
    assert uids(dm.train_dataloader()) == epochs[0]
    assert uids(dm.train_dataloader()) == epochs[1]  # a new loader: the next epoch, not epoch 0 again
    it = iter(dm.train_dataloader())
    head = [next(it)["uid"].tolist() for _ in range(4)]
    assert head == epochs[2][:4]
    list(zip(dm.calibration_dataloader(), range(2)))  # e.g. FinalReport's naive-PTQ calibration
    assert dm.state_dict()["epoch"] == 2 and dm.state_dict()["batches"] == 4
    assert uids(dm.train_dataloader()) == epochs[2][4:]


class _Recorder(L.LightningModule):
    """Records the uids it trains on; one parameter so that the optimizer has work."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.seen: list[list[int]] = []

    def training_step(self, batch, batch_idx):
        self.seen.append(batch["uid"].tolist())
        return (self.weight * batch["x_t"].mean()) ** 2

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.filterwarnings("ignore:Your `IterableDataset` has `__len__` defined")  # exact here, see TrajectoryDataset
@pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty")
def test_lightning_checkpoint_resumes_the_stream(small, tmp_path):
    def fit(ckpt_path=None, max_steps=-1, callbacks=()):
        model = _Recorder()
        trainer = L.Trainer(
            max_epochs=2,
            max_steps=max_steps,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=bool(callbacks),
            callbacks=list(callbacks),
            default_root_dir=tmp_path,
        )
        trainer.fit(
            model, datamodule=TrajectoryDataModule(str(small), batch_size=16, shuffle_buffer=32), ckpt_path=ckpt_path
        )
        return model.seen

    def every_5_steps():
        return L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=5, save_top_k=-1)

    full = fit()
    assert fit(max_steps=5, callbacks=[every_5_steps()]) == full[:5]
    assert fit(ckpt_path=str(tmp_path / "epoch=0-step=5.ckpt"), callbacks=[every_5_steps()]) == full[5:]


@pytest.mark.filterwarnings("ignore:Your `IterableDataset` has `__len__` defined")
@pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty")
def test_an_epoch_shortened_by_limit_train_batches_resumes_with_the_next_epoch(small, tmp_path):
    """A checkpoint at the end of an epoch that limit_train_batches cut short (at the epoch end or at
    its last batch) resumes with the next epoch, not the rest of the cut one."""

    def fit(ckpt_path=None, max_epochs=2):
        model = _Recorder()
        trainer = L.Trainer(
            max_epochs=max_epochs, limit_train_batches=3, logger=False, enable_progress_bar=False,
            enable_model_summary=False, default_root_dir=tmp_path,
            callbacks=[
                L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, filename="end-{epoch}"),
                L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_train_steps=3,
                                                    filename="{epoch}-{step}"),
            ],
        )  # fmt: skip
        trainer.fit(model, datamodule=TrajectoryDataModule(str(small), batch_size=8), ckpt_path=ckpt_path)
        return model.seen

    full = fit(max_epochs=3)
    assert len(full) == 9
    assert fit(ckpt_path=str(tmp_path / "end-epoch=0.ckpt"), max_epochs=3) == full[3:]  # saved at the epoch end
    assert fit(ckpt_path=str(tmp_path / "epoch=1-step=6.ckpt"), max_epochs=3) == full[6:]  # at its last batch


def test_resuming_mid_epoch_with_another_layout_is_refused(small):
    """A mid-epoch position is only defined for the saved layout: another world size, batch size or
    number of workers is refused naming the change; at an epoch's end any layout continues."""

    def dm(**overrides):
        return TrajectoryDataModule(str(small), **{**dict(batch_size=8, seed=3, rank=0, world_size=2), **overrides})

    reference = dm().train_dataloader()
    epoch0 = uids(reference)
    saved = dm()
    it = iter(saved.train_dataloader())
    [next(it) for _ in range(3)]
    state = saved.state_dict()
    assert (state["epoch"], state["batches"], state["layout"]["world_size"]) == (0, 3, 2)
    for change, message in [
        (dict(world_size=1), "world_size: saved 2, now 1"),
        (dict(batch_size=16), "batch_size: saved 8, now 16"),
        (dict(num_workers=2, batch_size=4), "num_workers: saved 0, now 2; batch_size: saved 8, now 4"),
        (dict(val_trajectories=[5]), "val_trajectories: saved None, now [5]"),
    ]:
        with pytest.raises(ValueError, match=rf"middle of epoch 0 \(3 batches .*{re.escape(message)}\. .*resume with"):
            dm(**change).load_state_dict(state)
    skipping = dm(world_size=1, on_layout_change="next_epoch")
    with pytest.warns(UserWarning, match=r"layout changed mid-epoch \(world_size\); the rest of epoch 0 is skipped"):
        skipping.load_state_dict(state)
    quiet = dm(world_size=1, on_layout_change="next_epoch")  # `train.py validate` on another world size
    quiet.trainer = SimpleNamespace(state=SimpleNamespace(fn="validate"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quiet.load_state_dict(state)
    same = dm(teacher_output=False)  # does not change the order
    same.load_state_dict(state)
    assert uids(same.train_dataloader()) == epoch0[3:]
    older = dm()  # a checkpoint written before val_trajectories existed: none were held out
    older.load_state_dict({**state, "layout": {k: v for k, v in state["layout"].items() if k != "val_trajectories"}})
    assert uids(older.train_dataloader()) == epoch0[3:]

    # at an epoch's end (also as older checkpoints saved it: batches == the epoch's length) any layout continues
    list(it)
    end = saved.state_dict()
    assert (end["epoch"], end["batches"]) == (1, 0)
    for position in (end, {**state, "batches": len(epoch0)}):
        resumed = dm(world_size=1)
        resumed.load_state_dict(position)
        single = dm(world_size=1).train_dataloader()
        uids(single)
        assert uids(resumed.train_dataloader()) == uids(single)  # epoch 1 of the new layout


def test_a_cache_without_teacher_outputs_names_the_data_key(tmp_path):
    path = synthesize_cache(tmp_path / "c", (1, 2, 2), 4, [0, 1], teacher_output=False)
    with pytest.raises(CacheError, match=r"store_teacher_output was false\); set the data module's teacher_output"):
        TrajectoryDataModule(str(path)).train_dataloader()
    assert "teacher_output" not in next(iter(TrajectoryDataModule(str(path), teacher_output=False).train_dataloader()))


# -------------------------------------------------------------------------------------------------
# On the fly (EfficientDM / MPQ-DM)
# -------------------------------------------------------------------------------------------------


def test_teacher_forced_stream_matches_the_sampler():
    teacher = make_teacher()
    prompts = {"y": torch.randn(3, 1, 8, 32)}
    options = dict(
        scheduler="ddim", num_inference_steps=3, guidance_scale=4.0, batch_size=2, trajectories_per_epoch=2, seed=3407
    )
    stream = TeacherForcedTrajectories(teacher, prompts, **options)
    batches = list(stream)
    assert len(batches) == len(stream) == 3
    assert [b["step_index"].tolist() for b in batches] == [[0] * 4, [1] * 4, [2] * 4]

    noise, cond, uncond, ids, _ = stream.trajectory_inputs(0)
    assert ids.tolist() == [0, 1] and torch.equal(
        noise[1], torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(3408))
    )
    recorded = []
    sample(
        teacher,
        make_scheduler("ddim"),
        noise,
        cond,
        uncond,
        guidance_scale=4.0,
        num_inference_steps=3,
        recorder=lambda **kw: recorded.append(kw),
    )
    for batch, rec in zip(batches, recorded, strict=True):  # x_t advanced with the teacher's guided output, as sample()
        assert torch.equal(batch["x_t"][:2], rec["x_t"]) and torch.equal(batch["x_t"][2:], rec["x_t"])
        assert torch.equal(guide(*batch["teacher_output"].chunk(2), 4.0, 3), rec["model_output"])
        assert torch.equal(batch["t"], rec["t"].expand(4)) and batch["branch"].tolist() == [0, 0, 1, 1]

    resumed = TeacherForcedTrajectories(teacher, prompts, **options)
    resumed.load_state_dict({"position": 2})  # mid-trajectory: the teacher replays steps 0-1
    rest = list(resumed)
    assert len(rest) == 1 and torch.equal(rest[0]["x_t"], batches[2]["x_t"])
    assert next(iter(resumed))["trajectory"].tolist() == [2, 3, 2, 3]  # next epoch: new trajectories


class _StreamRecorder(_Recorder):
    """Trains on a TeacherForcedTrajectories stream returned by train_dataloader()."""

    def __init__(self, teacher: torch.nn.Module) -> None:
        super().__init__()
        self.teacher = teacher

    def train_dataloader(self):
        prompts = {"y": torch.randn(3, 1, 8, 32, generator=torch.Generator().manual_seed(0))}
        options = dict(num_inference_steps=3, guidance_scale=4.0, batch_size=2, trajectories_per_epoch=4, seed=1)
        return TeacherForcedTrajectories(self.teacher, prompts, scheduler="ddim", **options)

    def training_step(self, batch, batch_idx):
        self.seen.append([int(batch["step_index"][0]), *batch["trajectory"].tolist(), float(batch["x_t"].sum())])
        return (self.weight * batch["x_t"].mean()) ** 2


@pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty")
@pytest.mark.filterwarnings("ignore:Found .* module\\(s\\) in eval mode")  # the frozen teacher
def test_on_the_fly_validation_replays_its_own_trajectories():
    """``val_trajectories`` on the on-the-fly stream: trajectories of their own seed stream (offset
    2·10^6, apart from training and calibration), the same ones at every validation pass."""
    from mpq_lightning.data import OnTheFlyDataModule

    teacher = make_teacher()
    options = dict(scheduler="ddim", num_inference_steps=2, guidance_scale=4.0, batch_size=2, trajectories_per_epoch=2,
                   random_conditions=3)
    dm = OnTheFlyDataModule(**options, val_trajectories=2)
    dm.prepare_cache(teacher)
    val = dm.val_dataloader()
    first, second = list(val), list(val)
    assert len(first) == len(val) == 2 and [b["step_index"][0].item() for b in first] == [0, 1]
    assert all(torch.equal(a["x_t"], b["x_t"]) for a, b in zip(first, second, strict=True))
    noise = torch.randn(teacher.latent_shape, generator=torch.Generator().manual_seed(2 * 10**6))  # validation trajectory 0
    assert torch.equal(first[0]["x_t"][0], noise)  # DDIM starts from the noise itself
    train, calib = next(iter(dm.train_dataloader())), next(iter(dm.calibration_dataloader()))
    assert not torch.equal(train["x_t"][0], noise) and not torch.equal(calib["x_t"][0], noise)
    assert OnTheFlyDataModule(**options).val_dataloader() == []  # no validation without the key
    with pytest.raises(ValueError, match=r"data.init_args.val_trajectories=1: 0 \(no validation\) or at least "
                                         r"data.init_args.batch_size=2"):
        OnTheFlyDataModule(**options, val_trajectories=1)


def test_lightning_checkpoint_resumes_the_teacher_forced_stream(tmp_path):
    teacher = make_teacher()

    def fit(ckpt_path=None, max_steps=-1):
        model = _StreamRecorder(teacher)
        checkpoint = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=4, save_top_k=-1)
        trainer = L.Trainer(
            max_epochs=1, max_steps=max_steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
            callbacks=[checkpoint], default_root_dir=tmp_path,
        )  # fmt: skip
        trainer.fit(model, ckpt_path=ckpt_path)
        return model.seen

    full = fit()
    assert [row[:3] for row in full] == [[0, 0, 1], [1, 0, 1], [2, 0, 1], [0, 2, 3], [1, 2, 3], [2, 2, 3]]
    fit(max_steps=4)
    assert fit(ckpt_path=str(tmp_path / "epoch=0-step=4.ckpt")) == full[4:]  # mid-trajectory
