"""Trajectory cache: generation vs the sampler, resume, identity checks, corrupt / missing files."""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import re
import shutil
import socket
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch
import torch.distributed as dist

from mpq_lightning.data import CacheError, TrajectoryCache, TrajectoryDataModule, TrajectoryRecipe, ensure_cache
from mpq_lightning.data import trajectories
from mpq_lightning.data.trajectories import ShardWriter, main, shard_name
from mpq_lightning.models import build, guide, make_scheduler, sample


def make_teacher() -> torch.nn.Module:
    """tiny-stdit with the zero-initialised outputs re-drawn (as the conftest fixture)."""
    torch.manual_seed(0)
    denoiser = build("tiny-stdit").eval()
    with torch.no_grad():
        for param in denoiser.parameters():
            if not param.any():
                param.normal_(std=0.1)
    return denoiser


def write_prompts(path: Path, count: int = 2) -> Path:
    g = torch.Generator().manual_seed(1)
    mask = torch.ones(count, 8, dtype=torch.long)
    mask[1:, 6:] = 0
    safetensors.torch.save_file({"y": torch.randn(count, 1, 8, 32, generator=g), "mask": mask}, str(path))
    return path


def make_recipe(prompts: Path, **overrides) -> TrajectoryRecipe:
    fields = dict(
        name="tiny",
        scheduler="ddim",
        num_inference_steps=4,
        guidance_scale=4.0,
        cond_path=str(prompts),
        num_trajectories=3,
        batch_size=2,
        shard_size=2,
        keep_stride=2,
        seed=7,
    )
    return TrajectoryRecipe(**{**fields, **overrides})


@pytest.fixture(scope="module")
def teacher():
    return make_teacher()


@pytest.fixture(scope="module")
def cache(tmp_path_factory, teacher) -> tuple[Path, TrajectoryRecipe]:
    root = tmp_path_factory.mktemp("cache")
    recipe = make_recipe(write_prompts(root / "prompts.safetensors"))
    return ensure_cache(recipe, teacher, root / "data"), recipe


# -------------------------------------------------------------------------------------------------
# Generation
# -------------------------------------------------------------------------------------------------


def test_cache_equals_sampler_recording(cache, teacher):
    path, recipe = cache
    stored = TrajectoryCache(path, verify="full")
    shards = list(stored.iter_shards())
    x_t = torch.cat([s["x_t"] for s in shards])
    output = torch.cat([s["teacher_output"] for s in shards])
    uid = torch.cat([s["uid"] for s in shards])
    assert torch.equal(uid, torch.arange(3 * 2 * 2))  # 3 trajectories x steps {0, 2} x {cond, uncond}
    prompts = safetensors.torch.load_file(recipe.cond_path)
    for trajectories in ([0, 1], [2]):  # the recipe's batches (batch_size 2, shard_size 2)
        noise = torch.stack(
            [torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(7 + j)) for j in trajectories]
        )
        rows = torch.tensor(trajectories) % 2
        cond = {k: v[rows] for k, v in prompts.items()}
        recorded: list[dict] = []
        sample(
            teacher,
            make_scheduler("ddim"),
            noise,
            cond,
            teacher.null_cond(cond),
            guidance_scale=4.0,
            num_inference_steps=4,
            recorder=lambda _out=recorded, **kw: _out.append(kw),
        )
        t = torch.cat([s["t"] for s in shards])
        for n, j in enumerate(trajectories):
            for p, step in enumerate((0, 2)):
                first = (j * 2 + p) * 2  # uid of the cond sample; uncond follows
                rec = recorded[step]
                assert torch.equal(x_t[first], rec["x_t"][n]) and torch.equal(x_t[first + 1], rec["x_t"][n])
                guided = guide(output[first : first + 1], output[first + 1 : first + 2], 4.0, teacher.cfg_channels)
                assert torch.equal(guided[0], rec["model_output"][n])
                assert int(t[first]) == int(rec["t"])
    assert torch.equal(shards[0]["x_T"][1], torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(8)))
    table = stored.conditions()
    assert torch.equal(table["cond.y"], prompts["y"]) and torch.equal(table["uncond.mask"], prompts["mask"])


def test_interrupted_generation_resumes_to_the_same_manifest(cache, teacher, tmp_path):
    path, recipe = cache
    written = []

    def crash_after_first(index: int, shard: Path) -> None:
        written.append(index)
        if len(written) == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ensure_cache(recipe, teacher, tmp_path, on_shard_written=crash_after_first)
    assert not json.loads((tmp_path / "tiny" / "manifest.json").read_text())["complete"]
    with pytest.raises(CacheError, match="has not finished"):
        TrajectoryCache(tmp_path / "tiny")
    ensure_cache(recipe, teacher, tmp_path, on_shard_written=crash_after_first)
    assert written == [0, 1]  # shard 0 was kept, only shard 1 was generated on resume
    assert (tmp_path / "tiny" / "manifest.json").read_text() == (path / "manifest.json").read_text()
    assert sorted(p.name for p in (tmp_path / "tiny").iterdir()) == sorted(p.name for p in path.iterdir())


def test_progress_counts_every_teacher_call_and_a_resumed_run_only_what_is_left(cache, teacher, tmp_path, capsys):
    """on_progress ticks once per teacher call, from 0 to the total of this rank's remaining
    trajectory batches times the sampler steps; resumed, it counts only the unfinished shards; a
    complete cache reports nothing. cache_progress draws rank 0's calls only."""
    from mpq_lightning.data.trajectories import cache_progress

    _, recipe = cache
    calls, written = [], []
    teacher_calls = []
    handle = teacher.register_forward_hook(lambda *_: teacher_calls.append(1))

    def crash_after_first(index: int, shard: Path) -> None:
        written.append(index)
        if len(written) == 1:
            raise KeyboardInterrupt

    try:
        with pytest.raises(KeyboardInterrupt):
            ensure_cache(recipe, teacher, tmp_path, on_shard_written=crash_after_first,
                         on_progress=lambda *a: calls.append(a))
        # 3 trajectories in shards of 2, batches of 2: shard 0 one batch, shard 1 one batch; 4 steps each
        assert calls[0] == (0, 0, 8) and calls[-1] == (0, 4, 8) and len(calls) == 5 and len(teacher_calls) == 4
        calls.clear()
        ensure_cache(recipe, teacher, tmp_path, on_progress=lambda *a: calls.append(a))
        assert calls == [(0, i, 4) for i in range(5)] and len(teacher_calls) == 8
        calls.clear()
        ensure_cache(recipe, teacher, tmp_path, on_progress=lambda *a: calls.append(a))
        assert calls == []
    finally:
        handle.remove()
    capsys.readouterr()
    with cache_progress("somewhere") as report:
        report(1, 0, 4), report(1, 4, 4)
    assert "somewhere" not in capsys.readouterr().out
    with cache_progress("data/some[where]") as report:  # brackets: not Rich markup
        report(0, 0, 4), report(0, 4, 4)
    out = capsys.readouterr().out
    assert "trajectory cache data/some[where] with" in out and "teacher calls" in out and "4/4" in out
    assert max(len(line) for line in out.splitlines()) <= 80


def test_other_teacher_scheduler_or_recipe_is_refused(cache, teacher):
    path, recipe = cache
    other = make_teacher()
    with torch.no_grad():
        next(other.parameters()).add_(1e-3)
    with pytest.raises(CacheError, match=r"teacher\.weights_sha256") as err:
        ensure_cache(recipe, other, path.parent)
    assert str(path / "manifest.json") in str(err.value)
    with pytest.raises(CacheError, match=r"scheduler\.class: cache \"DDIMScheduler\", requested \"DDPMScheduler\""):
        ensure_cache(make_recipe(Path(recipe.cond_path), scheduler="ddpm"), teacher, path.parent)
    with pytest.raises(CacheError, match=r"recipe\.keep_stride"):
        ensure_cache(make_recipe(Path(recipe.cond_path), keep_stride=1), teacher, path.parent)
    with pytest.raises(CacheError, match=r"teacher\.weights_sha256"):
        TrajectoryDataModule(str(path)).check_teacher(other)
    TrajectoryDataModule(str(path)).check_teacher(teacher)
    TrajectoryDataModule(str(path), recipe=recipe).prepare_cache(teacher)  # complete: reused as is
    with pytest.raises(CacheError, match=r"teacher\.weights_sha256"):
        TrajectoryDataModule(str(path), recipe=recipe).prepare_cache(other)
    with pytest.raises(CacheError, match=r"scheduler\.class: cache \"DDIMScheduler\", expected \"DDPMScheduler\""):
        TrajectoryDataModule(str(path), expect={"scheduler.class": "DDPMScheduler"}).setup()


# -------------------------------------------------------------------------------------------------
# Bad files
# -------------------------------------------------------------------------------------------------


@pytest.fixture
def copy(cache, tmp_path) -> Path:
    return Path(shutil.copytree(cache[0], tmp_path / "tiny"))


def test_corrupt_byte_fails_the_checksum(copy):
    shard = copy / shard_name(1)
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CacheError, match=f"{re.escape(str(shard))}: sha256"):
        TrajectoryCache(copy, verify="full")
    lazy = TrajectoryCache(copy, verify="open")  # sizes only at open; the checksum at load
    lazy.load_shard(0)
    with pytest.raises(CacheError, match=f"{re.escape(str(shard))}: sha256 .*delete it\\); a run with the cache's "
                                         "recipe .* regenerates missing"):  # what to do, also mid-training
        lazy.load_shard(1)
    with pytest.raises(CacheError, match=f"{re.escape(str(shard))}: sha256"):  # through the DataModule, never skipped
        list(TrajectoryDataModule(str(copy), batch_size=2).train_dataloader())


def test_truncated_and_missing_shards(copy):
    shard = copy / shard_name(0)
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(CacheError, match=f"{re.escape(str(shard))}: .* bytes, the manifest says"):
        TrajectoryCache(copy, verify="size")
    (copy / shard_name(1)).unlink()
    shard.unlink()
    with pytest.raises(CacheError, match=f"{re.escape(str(shard))}: missing file .*regenerates missing"):
        TrajectoryDataModule(str(copy)).setup()


def test_a_finished_cache_with_missing_or_truncated_files_is_repaired_from_its_recipe(cache, teacher, copy):
    """A complete cache that lost a shard, has a truncated one and lost its condition table is mended by
    ensure_cache with its recipe: only the damaged files are generated again (the intact shard is not
    rewritten), and the repaired cache is byte for byte the original."""
    path, recipe = cache
    original = {p.name: p.read_bytes() for p in path.iterdir() if p.is_file()}
    assert {shard_name(0), shard_name(1), "conditions.safetensors"} <= original.keys()
    (copy / shard_name(0)).unlink()
    (copy / "conditions.safetensors").unlink()
    extra = copy.parent / "other"  # a second damaged copy: a truncated shard
    shutil.copytree(path, extra / "tiny")
    (extra / "tiny" / shard_name(1)).write_bytes((path / shard_name(1)).read_bytes()[:-100])
    for root, damaged in ((copy.parent, [0]), (extra, [1])):
        written = []
        with pytest.warns(UserWarning, match=rf"{shard_name(damaged[0])}.* missing or truncated; regenerating"):
            ensure_cache(recipe, teacher, root, on_shard_written=lambda index, _: written.append(index))
        assert written == damaged  # the intact shard was kept
        repaired = {p.name: p.read_bytes() for p in (root / "tiny").iterdir() if p.is_file()}
        assert repaired == original
        TrajectoryCache(root / "tiny", verify="full")


def test_tensor_shape_differs_from_manifest(copy):
    shard = copy / shard_name(0)
    tensors = safetensors.torch.load_file(str(shard))
    tensors["x_t"] = tensors["x_t"][:, :, :2].contiguous()  # 2 frames instead of 4
    safetensors.torch.save_file(tensors, str(shard))
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["shards"][0]["bytes"] = shard.stat().st_size  # a consistent manifest entry, wrong shape
    manifest["shards"][0]["sha256"] = hashlib.sha256(shard.read_bytes()).hexdigest()
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(
        CacheError,
        match=rf"{re.escape(str(shard))}: tensor 'x_t' is \[8, 4, 2, 8, 8\] float32, the manifest says \[8, 4, 4, 8, 8\]",
    ):
        TrajectoryCache(copy).load_shard(0)


def test_no_cache_and_cli_help(tmp_path, capsys):
    with pytest.raises(CacheError, match="no trajectory cache here"):
        TrajectoryCache(tmp_path)
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "--recipe.keep_stride" in capsys.readouterr().out


def _generate_alone(root: str, results) -> None:
    os.environ.pop("WORLD_SIZE", None)  # a process that does not know of the other (two runs, one recipe)
    torch.set_num_threads(1)
    try:
        ensure_cache(make_recipe(Path(root) / "p.safetensors", num_trajectories=8, shard_size=1, batch_size=1),
                     make_teacher(), Path(root) / "data")
        results.put("ok")
    except BaseException as err:  # noqa: BLE001 - reported to the test
        results.put(f"{type(err).__name__}: {err}")


def test_two_processes_generating_one_cache_take_turns(tmp_path):
    """Without a process group both would generate every shard and one's finalize would delete the
    other's work in progress; the file lock makes the second reuse the first's finished cache."""
    import multiprocessing

    write_prompts(tmp_path / "p.safetensors")
    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    procs = [ctx.Process(target=_generate_alone, args=(str(tmp_path), results)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
    assert sorted(results.get(timeout=5) for _ in procs) == ["ok", "ok"]
    TrajectoryCache(tmp_path / "data" / "tiny", verify="full")


def test_a_complete_manifest_survives_a_second_begin(copy):
    """A second job's `begin` neither re-marks a finished cache incomplete nor deletes temp files."""
    manifest = (copy / "manifest.json").read_bytes()
    header = {k: v for k, v in json.loads(manifest).items() if k not in ("complete", "shards", "conditions_file")}
    other = copy / f".{shard_name(0)}.tmp-99999"  # another process's file in flight
    other.write_bytes(b"x")
    writer = ShardWriter(copy, header)
    with pytest.raises(CacheError, match="the cache is complete; refusing to start its generation again"):
        writer.begin(TrajectoryCache(copy).conditions())
    assert (copy / "manifest.json").read_bytes() == manifest and other.exists()
    TrajectoryCache(copy, verify="full")


def _job_rank(rank: int, root: str, port: int, results, fail_rank: int | None = None) -> None:
    """One rank of a 2-process job that generates the cache of make_recipe(root/prompts.safetensors)
    (rank `fail_rank` fails after writing its first shard)."""
    os.environ.pop("WORLD_SIZE", None)
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
        teacher, written = make_teacher(), []

        def on_shard_written(index: int, shard: Path) -> None:
            written.append(index)
            if rank == fail_rank:
                raise RuntimeError(f"disk full on rank {rank}")

        Path(root, f"ready{rank}").touch()
        ensure_cache(make_recipe(Path(root) / "prompts.safetensors"), teacher, Path(root) / "data",
                     on_shard_written=on_shard_written)
        results.put((rank, written))
    except BaseException as err:  # noqa: BLE001 - reported to the test
        results.put((rank, f"{type(err).__name__}: {err}"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _hold_lock(lock: str, locked, release, finished: str, target: str) -> None:
    """Another job generating the cache: holds its lock, then writes the finished cache and unlocks."""
    with open(lock, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        locked.set()
        release.wait(120)
        shutil.copytree(finished, target)


def test_a_distributed_job_waits_for_the_lock_and_reuses_the_cache_finished_meanwhile(tmp_path):
    """Rank 0 of a process group takes the file lock before writing anything (its other rank waits
    with it) and re-checks the cache once it holds the lock: a cache another job finished meanwhile
    is reused, not generated again or re-begun."""
    import multiprocessing

    recipe = make_recipe(write_prompts(tmp_path / "prompts.safetensors"))
    finished = ensure_cache(recipe, make_teacher(), tmp_path / "other")  # the other job's result
    target = tmp_path / "data" / "tiny"
    target.parent.mkdir()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = multiprocessing.get_context("fork")
    locked, release, results = ctx.Event(), ctx.Event(), ctx.Queue()
    holder = ctx.Process(target=_hold_lock, args=(str(target.parent / ".tiny.lock"), locked, release, str(finished),
                                                  str(target)), daemon=True)  # fmt: skip
    procs = [ctx.Process(target=_job_rank, args=(r, str(tmp_path), port, results), daemon=True) for r in range(2)]
    try:
        holder.start()
        assert locked.wait(60)
        for p in procs:
            p.start()
        deadline = time.monotonic() + 120
        while not all((tmp_path / f"ready{r}").exists() for r in range(2)) and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(2.0)
        assert all(p.is_alive() for p in procs)
        assert not target.exists()  # nothing written while the other job holds the lock
        release.set()
        outcome = dict(results.get(timeout=120) for _ in procs)
    finally:
        release.set()
        for p in [holder, *procs]:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    assert outcome == {0: [], 1: []}  # reused: no shard generated
    assert (target / "manifest.json").read_text() == (finished / "manifest.json").read_text()
    TrajectoryCache(target, verify="full")


def test_an_error_on_one_rank_stops_every_rank_and_keeps_the_finished_shards(tmp_path, teacher):
    """A rank that fails does not leave the others waiting at a barrier; its finished shard is kept."""
    import multiprocessing

    recipe = make_recipe(write_prompts(tmp_path / "prompts.safetensors"))  # 2 shards: one per rank
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    procs = [ctx.Process(target=_job_rank, args=(r, str(tmp_path), port, results, 1), daemon=True) for r in range(2)]
    try:
        for p in procs:
            p.start()
        outcome = dict(results.get(timeout=120) for _ in procs)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    assert outcome[1] == "RuntimeError: disk full on rank 1"
    assert outcome[0] == "CacheError: generation failed on another rank:\n  rank 1: RuntimeError: disk full on rank 1"
    written = []
    ensure_cache(recipe, teacher, tmp_path / "data", on_shard_written=lambda index, _: written.append(index))
    assert written == []  # both shards were finished before the failure: only the manifest was missing
    TrajectoryCache(tmp_path / "data" / "tiny", verify="full")


# -------------------------------------------------------------------------------------------------
# Checks before anything is written
# -------------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # diffusers' Heun / KDPM2 with numpy 2
def test_schedulers_calling_the_model_twice_per_step_are_refused(tmp_path, teacher, monkeypatch):
    prompts = write_prompts(tmp_path / "p.safetensors")
    for name in ("HeunDiscreteScheduler", "KDPM2DiscreteScheduler"):
        refused = rf"recipe\.scheduler '{name}' \({name}\) has 7 timesteps .* num_inference_steps 4"
        with pytest.raises(ValueError, match=refused):
            ensure_cache(make_recipe(prompts, scheduler=name), teacher, tmp_path / "data")
    assert not (tmp_path / "data").exists()
    # past that check (a scheduler it does not catch), generation checks one teacher call per step
    monkeypatch.setattr(trajectories, "_check_one_call_per_step", lambda *args: None)
    with pytest.raises(CacheError, match=r"HeunDiscreteScheduler: the teacher was called 7 times for num_inference_steps"):
        ensure_cache(make_recipe(prompts, scheduler="HeunDiscreteScheduler"), teacher, tmp_path / "data")
    assert not list((tmp_path / "data" / "tiny").glob("shard-*"))


def test_a_condition_file_that_does_not_fit_the_teacher_is_refused_before_writing(tmp_path, teacher):
    prompts = tmp_path / "p.safetensors"
    safetensors.torch.save_file({"y": torch.randn(2, 1, 8, 16)}, str(prompts))  # 16 channels, the teacher has 32
    with pytest.raises(
        CacheError,
        match=rf"{re.escape(str(prompts))}: the cond rows do not fit .*"
        r"cond\['y'\]: expected shape \[B, 1, 8, 32\] with B=2, got \[2, 1, 8, 16\]",
    ):
        ensure_cache(make_recipe(prompts), teacher, tmp_path / "data")
    safetensors.torch.save_file({"y": torch.randn(2, 1, 8, 32), "null.y": torch.randn(1, 1, 4, 32)}, str(prompts))
    with pytest.raises(CacheError, match=r"the null \(unconditional\) rows do not fit .*got \[2, 1, 4, 32\]"):
        ensure_cache(make_recipe(prompts), teacher, tmp_path / "data")
    # a keep-mask row of zeros (NaN attention): refused here, on the host, since a GPU forward does not
    # check it (the check would make the host wait for the device every forward)
    safetensors.torch.save_file({"y": torch.randn(3, 1, 8, 32), "mask": torch.tensor([[1] * 8, [0] * 8, [1] + [0] * 7])},
                                str(prompts))
    with pytest.raises(CacheError, match=r"the cond rows do not fit .*cond\['mask'\]: rows \[1\] keep no token"):
        ensure_cache(make_recipe(prompts), teacher, tmp_path / "data")
    assert not (tmp_path / "data").exists()
    ensure_cache(make_recipe(write_prompts(prompts)), teacher, tmp_path / "data")  # the corrected file


def test_non_finite_conditions_or_teacher_outputs_are_never_written(tmp_path, teacher):
    """A NaN embedding row, or a teacher that gives NaN / Inf (broken weights, fp16 overflow), would fill
    the cache with samples every training step skips or stops on: refused naming the rows, or the shard,
    trajectory and sampler step; the shards finished before it stay, the bad one is not written."""
    prompts = tmp_path / "p.safetensors"
    y = torch.randn(3, 1, 8, 32)
    y[1, 0, 3, 5] = float("nan")
    safetensors.torch.save_file({"y": y}, str(prompts))
    with pytest.raises(CacheError, match=r"the cond rows \[1\] of 'y' hold NaN / Inf"):
        ensure_cache(make_recipe(prompts), teacher, tmp_path / "data")
    assert not (tmp_path / "data").exists()

    calls = []

    def overflow(module, args, output):  # shard 1 holds trajectory 2 alone: 2 rows (cond, uncond)
        calls.append(output.shape[0])
        if output.shape[0] == 2 and calls.count(2) == 3:  # its third sampler step, index 2 (kept: 0, 2)
            return torch.where(torch.arange(output.shape[0]).view(-1, *[1] * (output.dim() - 1)) == 0,
                               torch.full_like(output, float("inf")), output)
        return output

    handle = teacher.register_forward_hook(overflow)
    try:
        with pytest.raises(CacheError, match=r"shard 1 \(shard-00001.safetensors\): the teacher gave non-finite values "
                                             r"\(NaN / Inf\) in teacher_output of 1 samples, first at trajectory 2, "
                                             r"sampler step 2; the shard is not written"):
            ensure_cache(make_recipe(write_prompts(prompts)), teacher, tmp_path / "data")
    finally:
        handle.remove()
    assert (tmp_path / "data" / "tiny" / shard_name(0)).is_file()
    assert not (tmp_path / "data" / "tiny" / shard_name(1)).exists()
    ensure_cache(make_recipe(prompts), teacher, tmp_path / "data")  # the mended teacher finishes the cache


def test_an_unfinished_cache_without_a_finished_shard_restarts_with_another_identity(cache, teacher, tmp_path,
                                                                                     monkeypatch):
    path, recipe = cache
    other = dataclasses.replace(recipe, seed=1)

    def crash(*args):
        raise RuntimeError("the teacher crashed")

    with monkeypatch.context() as patch:
        patch.setattr(trajectories, "_generate_shard", crash)
        with pytest.raises(RuntimeError, match="the teacher crashed"):
            ensure_cache(other, teacher, tmp_path)
    assert not json.loads((tmp_path / "tiny" / "manifest.json").read_text())["complete"]
    ensure_cache(recipe, teacher, tmp_path)  # nothing finished to keep: started again with this recipe
    assert (tmp_path / "tiny" / "manifest.json").read_text() == (path / "manifest.json").read_text()

    shutil.rmtree(tmp_path / "tiny")

    def crash_after_first(index: int, shard: Path) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ensure_cache(other, teacher, tmp_path, on_shard_written=crash_after_first)
    finished = r"(?s)the unfinished cache \(1 shards done\) was made by another .*recipe\.seed: cache 1, requested 7"
    with pytest.raises(CacheError, match=finished):
        ensure_cache(recipe, teacher, tmp_path)  # a finished shard is never thrown away
    assert (tmp_path / "tiny" / shard_name(0)).exists()


def test_a_moved_condition_file_and_scheduler_keys_of_another_diffusers_keep_the_cache(cache, teacher, tmp_path):
    path, recipe = cache
    copy = Path(shutil.copytree(path, tmp_path / "data" / "tiny"))
    moved = Path(shutil.copy(recipe.cond_path, tmp_path / "moved.safetensors"))
    manifest = (copy / "manifest.json").read_text()
    written = []
    ensure_cache(make_recipe(moved), teacher, tmp_path / "data", on_shard_written=lambda i, _: written.append(i))
    assert written == [] and (copy / "manifest.json").read_text() == manifest  # reused as is
    write_prompts(moved, count=3)  # other content: refused by its sha256
    with pytest.raises(CacheError, match=r"conditions\.source_sha256"):
        ensure_cache(make_recipe(moved), teacher, tmp_path / "data")

    stored = json.loads(manifest)
    config = stored["scheduler"]["config"]
    config.pop("rescale_betas_zero_snr")  # an older diffusers without the key ...
    config["added_by_a_newer_diffusers"] = "default"  # ... or a newer one with another
    (copy / "manifest.json").write_text(json.dumps(stored))
    ensure_cache(recipe, teacher, tmp_path / "data", on_shard_written=lambda i, _: written.append(i))
    assert written == []
    config["steps_offset"] = 5  # a key both have, with another value: still refused
    (copy / "manifest.json").write_text(json.dumps(stored))
    with pytest.raises(CacheError, match=r"scheduler\.config\.steps_offset: cache 5, requested 0"):
        ensure_cache(recipe, teacher, tmp_path / "data")


def test_expect_takes_structure_keys_and_whole_sections(cache):
    path, _ = cache
    manifest = TrajectoryCache(path).manifest
    TrajectoryCache(path, expect={"structure.num_trajectories": 3, "scheduler.config": manifest["scheduler"]["config"]})
    with pytest.raises(CacheError, match=r"structure\.num_trajectories: cache 3, expected 4"):
        TrajectoryCache(path, expect={"structure.num_trajectories": 4})
    with pytest.raises(CacheError, match=r"scheduler\.config\.steps_offset: cache 0, expected 1"):
        TrajectoryCache(path, expect={"scheduler.config": {**manifest["scheduler"]["config"], "steps_offset": 1}})


def test_recipe_errors_name_the_key_before_anything_is_written(tmp_path, teacher):
    prompts = write_prompts(tmp_path / "p.safetensors")
    with pytest.raises(ValueError, match=r"keep_steps \[7, 50\] are not sampler steps \(0 \.\. 3 for num_inference_steps"):
        ensure_cache(make_recipe(prompts, keep_stride=1, keep_steps=[0, 3, 7, 50]), teacher, tmp_path / "data")
    with pytest.raises(ValueError, match=r"num_trajectories must be >= 1 \(or null for the default\), got -2"):
        ensure_cache(make_recipe(prompts, num_trajectories=-2), teacher, tmp_path / "data")
    sources = r"set only one of class_labels, cond_path and random_conditions \(the others null\)"
    with pytest.raises(ValueError, match=rf"{sources}, got \['cond_path', 'random_conditions'\]"):
        ensure_cache(make_recipe(prompts, random_conditions=4), teacher, tmp_path / "data")
    assert not (tmp_path / "data").exists()


def _lock_error_worker(rank: int, root: str, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        with trajectories._exclusive(Path(root) / "not_a_folder" / "cache", rank, 2):
            message = "entered"
    except Exception as err:  # noqa: BLE001 - the test reads what each rank raised
        message = f"{type(err).__name__}: {err}"
    Path(root, f"rank{rank}.txt").write_text(message)
    dist.destroy_process_group()


def test_a_lock_error_on_rank_0_is_raised_on_every_rank(tmp_path):
    """An unwritable cache root (here a file where the folder should be) fails rank 0's lock; the other
    ranks get that error named instead of a lost connection at the next collective."""
    import torch.multiprocessing as mp

    (tmp_path / "not_a_folder").write_text("a file")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_lock_error_worker, args=(str(tmp_path), port), nprocs=2)
    assert (tmp_path / "rank0.txt").read_text().startswith(("FileExistsError", "NotADirectoryError"))
    assert (tmp_path / "rank1.txt").read_text().startswith("CacheError: rank 0 could not take the generation lock")


def _no_lock_worker(rank: int, root: str, port: int) -> None:
    import errno

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)

    def no_locks(*args, **kwargs):
        raise OSError(errno.ENOLCK, "No locks available")

    fcntl.flock = no_locks  # this process only (spawned)
    prompts = Path(root) / "prompts.safetensors"
    for name in ("tiny", "unfinished"):
        try:
            message = str(ensure_cache(make_recipe(prompts, name=name), make_teacher(), Path(root) / "data"))
        except Exception as err:  # noqa: BLE001 - the test reads what each rank got
            message = f"{type(err).__name__}: {err}"
        Path(root, f"{name}_rank{rank}.txt").write_text(message)
    dist.destroy_process_group()


def test_a_finished_cache_is_read_by_a_process_group_where_no_lock_can_be_taken(tmp_path, teacher):
    """A multi-GPU job reading a finished cache from a read-only dataset folder, or a file system without
    locks: rank 0 cannot take the generation lock, but only generating needs it, so every rank reads
    the finished cache (it failed before); a cache still to generate is refused on every rank."""
    import torch.multiprocessing as mp

    ensure_cache(make_recipe(write_prompts(tmp_path / "prompts.safetensors")), teacher, tmp_path / "data")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_no_lock_worker, args=(str(tmp_path), port), nprocs=2)
    for rank in (0, 1):
        assert (tmp_path / f"tiny_rank{rank}.txt").read_text() == str(tmp_path / "data" / "tiny")
        assert (tmp_path / f"unfinished_rank{rank}.txt").read_text().startswith(
            ("OSError: [Errno 37] No locks available", "CacheError: rank 0 could not take the generation lock"))
    assert not (tmp_path / "data" / "unfinished").exists()


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_unreadable_condition_file_is_refused_naming_it(tmp_path, suffix):
    """A truncated copy of a precomputed text-embeddings file: a CacheError naming the file."""
    from mpq_lightning.data.trajectories import load_condition_file

    table = {"y": torch.randn(4, 8, 16), "mask": torch.ones(4, 8, dtype=torch.long)}
    whole = tmp_path / f"whole{suffix}"
    torch.save(table, whole) if suffix == ".pt" else safetensors.torch.save_file(table, str(whole))
    assert torch.equal(load_condition_file(whole)["y"], table["y"])
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(CacheError, match=f"condition file {re.escape(str(cut))} cannot be read"):
        load_condition_file(cut)
