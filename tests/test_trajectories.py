"""Trajectory cache: generation vs the sampler, resume, identity checks, corrupt / missing files."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import safetensors.torch
import torch

from mpq_lightning.data import CacheError, TrajectoryCache, TrajectoryDataModule, TrajectoryRecipe, ensure_cache
from mpq_lightning.data.trajectories import main, shard_name
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
    with pytest.raises(CacheError, match=f"{re.escape(str(shard))}: sha256"):
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
    with pytest.raises(CacheError, match=f"{re.escape(str(shard))}: missing file"):
        TrajectoryDataModule(str(copy)).setup()


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
