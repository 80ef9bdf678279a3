"""The teacher trajectory cache: generation (resumable, multi-process), shard writer, manifest, reader.

The FP teacher samples trajectories with a diffusers scheduler (`models.sampling.sample`) and every
kept sampler step is stored as one sample per denoiser row: with classifier-free guidance a step
gives a "cond" and an "uncond" sample (the same x_t, the prompt's and the null condition, Q-VDiT's
doubled batch), each with the teacher's raw output for that row. Layout (see data/README.md):

    data/<name>/manifest.json                 identity (recipe, teacher hash, scheduler), structure,
                                              tensor specs, per-shard sha256 / bytes / sample counts
    data/<name>/conditions.safetensors        condition table, stored once: cond.<key>, uncond.<key>
    data/<name>/shard-00000.safetensors ...   trajectories [a, b) of the shard, samples ordered
                                              (trajectory, kept step, branch)

    python -m mpq_lightning.data.trajectories --model tiny-stdit --recipe.name demo --recipe.cond_path p.safetensors
    torchrun --nproc_per_node 8 -m mpq_lightning.data.trajectories --config recipe.yaml
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import safetensors.torch
import torch
import torch.distributed as dist

from mpq_lightning.files import atomic_write, read_tensor_file
from mpq_lightning.models.registry import Denoiser, random_cond
from mpq_lightning.models.sampling import make_scheduler, sample

__all__ = [
    "BRANCHES",
    "CacheError",
    "ShardWriter",
    "TrajectoryCache",
    "TrajectoryRecipe",
    "cache_progress",
    "ensure_cache",
    "load_condition_file",
    "main",
    "synthesize_cache",
    "teacher_fingerprint",
]

FORMAT = "mpq-lightning/trajectories"
VERSION = 1
MANIFEST = "manifest.json"
CONDITIONS = "conditions.safetensors"
PROGRESS = "partial"  # per-shard records of an unfinished generation, merged into the manifest at the end
BRANCHES = ("cond", "uncond")
#: Sections of the manifest that identify a cache; a request differing in any key is refused.
IDENTITY = ("recipe", "teacher", "scheduler", "conditions")


class CacheError(ValueError):
    """A trajectory cache that is missing, corrupt, incomplete or made by another recipe / teacher."""


# -------------------------------------------------------------------------------------------------
# Recipe
# -------------------------------------------------------------------------------------------------


def sampler_steps(scheduler: str | None, num_inference_steps: int | None, denoiser: Denoiser) -> int | None:
    """The sampler step count a recipe or stream asks for: its own, else the teacher's default count,
    but only with the teacher's default scheduler (None: another scheduler without a count)."""
    if num_inference_steps:
        return num_inference_steps
    return denoiser.default_scheduler["num_inference_steps"] if scheduler is None else None


@dataclass
class TrajectoryRecipe:
    """How the teacher samples the cached trajectories; the manifest stores the resolved values.

    Trajectory j (0-based) starts from x_T = randn(latent_shape, seed + j) and uses condition
    j % num_conditions. A condition file (`cond_path`, safetensors or .pt) holds the denoiser's cond
    keys as [N, ...] tensors (e.g. STDiT: "y" [N, 1, L, C], "mask" [N, L]) and optionally
    "null.<key>" ([N, ...] or [1, ...]) for the guidance branch (default: `denoiser.null_cond`).

    Args:
        name: cache directory name (ROOT/<name>).
        scheduler: `make_scheduler` name ("ddim", "iddpm", ...); None: the teacher's default scheduler.
        scheduler_config: scheduler constructor keywords (ignored when scheduler is None).
        num_inference_steps: sampler steps S; None: the teacher's default.
        guidance_scale: classifier-free guidance scale; None: the teacher's default; 1 = no guidance.
        cfg_channels: leading channels guided; None: the teacher's convention.
        eta: DDIM eta (schedulers without it ignore it).
        seed: trajectory j uses seed + j for x_T.
        num_trajectories: None: one per condition.
        batch_size: trajectories per sampler call (stochastic samplers seed their noise per batch).
        class_labels: class-conditional teachers: the condition table.
        cond_path: text-conditional teachers: the condition file described above.
        random_conditions: draw this many random conditions from the teacher's `cond_spec` (seeded by
            `seed`; float tensors ~ N(0, 1), masks all ones, labels uniform) — for random tiny
            teachers and smoke tests, never for real models.
        keep_stride: keep sampler steps i with i % keep_stride == 0 (Q-VDiT: 5 of 100 steps).
        keep_steps: keep only these sampler steps (combined with keep_stride).
        store_teacher_output: store the teacher's raw output for every sample.
        shard_size: trajectories per shard file.
    """

    name: str
    scheduler: str | None = None
    scheduler_config: dict[str, Any] = field(default_factory=dict)
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    cfg_channels: int | None = None
    eta: float = 0.0
    seed: int = 0
    num_trajectories: int | None = None
    batch_size: int = 1
    class_labels: list[int] | None = None
    cond_path: str | None = None
    random_conditions: int | None = None
    keep_stride: int = 1
    keep_steps: list[int] | None = None
    store_teacher_output: bool = True
    shard_size: int = 16

    def resolve(self, denoiser: Denoiser, num_conditions: int) -> dict[str, Any]:
        """The recipe with defaults filled from the teacher, as stored in (and compared with) the manifest."""
        spec = denoiser.default_scheduler
        default = self.scheduler is None
        steps = sampler_steps(self.scheduler, self.num_inference_steps, denoiser)
        if not steps:
            raise ValueError(f"recipe {self.name!r}: set num_inference_steps for scheduler {self.scheduler!r}")
        predicted = denoiser.in_channels if denoiser.learned_sigma else denoiser.out_channels
        for key in ("batch_size", "shard_size", "keep_stride"):
            if getattr(self, key) < 1:
                raise ValueError(f"recipe {self.name!r}: {key} must be >= 1, got {getattr(self, key)}")
        for key in ("num_inference_steps", "num_trajectories"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise ValueError(
                    f"recipe {self.name!r}: {key} must be >= 1 (or null for the default), got {getattr(self, key)}"
                )
        _condition_source(self)
        resolved = {
            **dataclasses.asdict(self),
            "scheduler": spec["name"] if default else self.scheduler,
            "scheduler_config": dict(spec["config"]) if default else dict(self.scheduler_config),
            "num_inference_steps": int(steps),
            "guidance_scale": _guidance(self, denoiser),
            "cfg_channels": int(self.cfg_channels or denoiser.cfg_channels or predicted),
            "num_trajectories": int(self.num_trajectories or num_conditions),
        }
        return _jsonable(resolved)

    @staticmethod
    def kept_steps(resolved: Mapping[str, Any]) -> list[int]:
        keep = set(resolved["keep_steps"]) if resolved["keep_steps"] is not None else None
        count = resolved["num_inference_steps"]
        if keep is not None and (outside := sorted(i for i in keep if not 0 <= i < count)):
            raise ValueError(
                f"recipe {resolved['name']!r}: keep_steps {outside} are not sampler steps "
                f"(0 .. {count - 1} for num_inference_steps {count})"
            )
        steps = [i for i in range(resolved["num_inference_steps"]) if i % resolved["keep_stride"] == 0]
        steps = [i for i in steps if keep is None or i in keep]
        if not steps:
            raise ValueError(f"recipe {resolved['name']!r}: keep_stride / keep_steps keep no sampler step")
        return steps


# -------------------------------------------------------------------------------------------------
# Small helpers: JSON, hashing, seeds, atomic writes, distribution
# -------------------------------------------------------------------------------------------------


def _guidance(recipe: TrajectoryRecipe, denoiser: Denoiser) -> float:
    if recipe.guidance_scale is not None:
        return float(recipe.guidance_scale)
    return float(denoiser.default_scheduler.get("guidance_scale", 1.0))


def _jsonable(value: Any) -> Any:
    """Round-trip through JSON (tuples → lists, numpy scalars → str) so comparisons match the file."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def _flatten(value: Any, prefix: str) -> dict[str, Any]:
    if isinstance(value, dict) and value:
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def _differences(stored: Mapping[str, Any], requested: Mapping[str, Any]) -> list[str]:
    """'key: cache X, requested Y' for every dotted key that differs."""
    a, b = _flatten(dict(stored), ""), _flatten(dict(requested), "")
    lines = []
    for key in sorted(set(a) | set(b)):
        if a.get(key, "<absent>") != b.get(key, "<absent>"):
            lines.append(f"{key}: cache {_short(a.get(key, '<absent>'))}, requested {_short(b.get(key, '<absent>'))}")
    return lines


def _identity_differences(stored: Mapping[str, Any], requested: Mapping[str, Any]) -> list[str]:
    """`_differences` of the IDENTITY sections, without what does not change the cached data: the
    condition file's path (its sha256 is compared) and scheduler config keys that only one side has
    (a diffusers version adding or dropping a key with its default; every key the recipe sets is
    compared under recipe.scheduler_config, and the scheduler class and timesteps always are)."""
    a, b = (_jsonable({k: manifest.get(k) for k in IDENTITY}) for manifest in (stored, requested))
    for side in (a, b):
        if isinstance(side["recipe"], dict):
            side["recipe"].pop("cond_path", None)
    configs = [side["scheduler"].get("config") if isinstance(side["scheduler"], dict) else None for side in (a, b)]
    if all(isinstance(c, dict) for c in configs):
        shared = set(configs[0]) & set(configs[1])
        for side, config in zip((a, b), configs):
            side["scheduler"]["config"] = {k: v for k, v in config.items() if k in shared}
    return _differences(a, b)


def _short(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 80 else text[:77] + "..."


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def mix_seed(*values: int) -> int:
    """A 63-bit seed from integers (stable across processes, unlike Python's str hash)."""
    digest = hashlib.sha256(",".join(str(int(v)) for v in values).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _write_json(path: Path, value: Any) -> None:
    atomic_write(path, (json.dumps(value, indent=1, sort_keys=True) + "\n").encode())


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CacheError(f"{path}: unreadable manifest ({err})") from err


@contextmanager
def _distributed(enabled: bool) -> Iterator[tuple[int, int]]:
    """(rank, world size) of torch.distributed. Under torchrun (WORLD_SIZE > 1) before anyone has set
    up a process group, a gloo group is created for the barriers and destroyed on exit, so that
    Lightning later creates its own."""
    created = enabled and not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    if created:
        # keys under our own prefix of the launcher's store: the default group that Lightning creates
        # next starts its group count at 0 again, and would otherwise read this group's stale keys and
        # hang connecting to its closed sockets
        store, rank, world = next(dist.rendezvous("env://"))
        dist.init_process_group("gloo", store=dist.PrefixStore("mpq_lightning.trajectories", store),
                                rank=rank, world_size=world)
    try:
        yield (dist.get_rank(), dist.get_world_size()) if enabled and dist.is_initialized() else (0, 1)
    finally:
        if created:
            dist.destroy_process_group()


def _ranks_together(enabled: bool) -> bool:
    """Whether every rank of the job makes this call together: a process group exists, or torchrun
    (torchelastic) started all WORLD_SIZE ranks at once."""
    if not enabled:
        return False
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size() > 1
    return "TORCHELASTIC_RUN_ID" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


#: Seconds between a process group's tries for the generation lock (see `_exclusive`).
LOCK_POLL_S = 1.0


@contextmanager
def _exclusive(directory: Path, rank: int, world: int,
               finished: Callable[[], bool] | None = None) -> Iterator[None]:
    """Rank 0 holds an exclusive lock on ``.<name>.lock`` beside the cache directory while its job
    checks, generates and finalises the cache, so that two jobs (or ranks that do not know of each
    other) sharing a recipe take turns and the second finds the cache finished. The other ranks of
    the process group wait for rank 0: it tries the lock every LOCK_POLL_S seconds and broadcasts the
    result, so that waiting for another job's (hours-long) generation never runs into the process
    group's collective timeout. Where the lock cannot be taken at all (a read-only dataset folder, a
    file system without locks), a cache that ``finished()`` finds complete is read without it: only
    generating needs the lock."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        fcntl = None
    handle = None
    try:
        while True:
            state, error = "acquired", None  # rank 0's outcome, which every rank follows
            if rank == 0 and fcntl is not None:
                try:
                    if handle is None:
                        directory.parent.mkdir(parents=True, exist_ok=True)
                        handle = open(directory.parent / f".{directory.name}.lock", "a+")  # noqa: SIM115 - closed below
                    fcntl.flock(handle, fcntl.LOCK_EX | (fcntl.LOCK_NB if world > 1 else 0))
                except BlockingIOError:
                    state = "busy"
                except OSError as err:  # an unwritable cache root, a file system without locks
                    state, error = f"error: {type(err).__name__}: {err}", err
                    try:
                        if finished is not None and finished():
                            state, error = "acquired", None
                            warnings.warn(f"{directory}: no generation lock beside it ({type(err).__name__}: {err}); "
                                          "the cache is complete, so it is read without one", stacklevel=3)
                    except Exception as other:  # noqa: BLE001 - raised below, on every rank
                        state, error = f"error: {type(other).__name__}: {other}", other
            state = _broadcast(state, world)
            if error is not None:
                raise error
            if state.startswith("error"):
                raise CacheError(f"rank 0 could not take the generation lock beside {directory}: {state[7:]}")
            if state == "acquired":
                break
            time.sleep(LOCK_POLL_S)
        yield
    finally:
        if handle is not None:
            handle.close()  # releases the lock


def _broadcast(value: Any, world: int) -> Any:
    """Rank 0's `value` on every rank."""
    if world == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _on_rank0(rank: int, world: int, work: Callable[[], Any]) -> Any:
    """Run `work` on rank 0 and return its result on every rank; an error there is raised on every
    rank (its own exception on rank 0) instead of leaving the others waiting at the next collective."""
    result, error = None, None
    if rank == 0:
        try:
            result = ("ok", work())
        except Exception as err:  # noqa: BLE001 - re-raised below on every rank
            error, result = err, ("error", f"{type(err).__name__}: {err}")
    result = _broadcast(result, world)
    if error is not None:
        raise error
    if result[0] == "error":
        raise CacheError(f"rank 0 failed: {result[1]}")
    return result[1]


def _all_ranks(world: int, work: Callable[[], None]) -> None:
    """Run `work` on every rank, then wait for all of them (the barrier); an error on any rank is
    raised on every rank (its own exception where it happened)."""
    error = None
    try:
        work()
    except Exception as err:  # noqa: BLE001 - re-raised below
        error = err
    if world > 1:
        errors: list[str | None] = [None] * world
        dist.all_gather_object(errors, None if error is None else f"{type(error).__name__}: {error}")
        failed = [f"rank {r}: {e}" for r, e in enumerate(errors) if e is not None]
        if failed and error is None:
            raise CacheError("generation failed on another rank:\n  " + "\n  ".join(failed))
    if error is not None:
        raise error


def teacher_fingerprint(denoiser: torch.nn.Module) -> dict[str, Any]:
    """Class, latent shape and sha256 of every state-dict tensor (names, dtypes, shapes, bytes)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(denoiser.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return {
        "class": type(denoiser).__name__,
        "latent_shape": list(getattr(denoiser, "latent_shape", ())),
        "out_channels": getattr(denoiser, "out_channels", None),
        "weights_sha256": digest.hexdigest(),
    }


def _scheduler_identity(resolved: Mapping[str, Any]) -> tuple[Any, dict[str, Any]]:
    scheduler = make_scheduler(resolved["scheduler"], **resolved["scheduler_config"])
    scheduler.set_timesteps(resolved["num_inference_steps"])
    config = {k: v for k, v in dict(scheduler.config).items() if not k.startswith("_")}
    info = {"class": type(scheduler).__name__, "config": config, "timesteps": scheduler.timesteps.tolist()}
    return scheduler, _jsonable(info)


def _check_one_call_per_step(scheduler: Any, resolved: Mapping[str, Any]) -> None:
    """Refuse schedulers that call the model more than once per step (Heun, KDPM2: their timesteps
    list has 2S - 1 entries): the cache stores one teacher call per sampler step."""
    count = len(scheduler.timesteps)
    if count != resolved["num_inference_steps"]:
        raise ValueError(
            f"recipe {resolved['name']!r}: recipe.scheduler {resolved['scheduler']!r} ({type(scheduler).__name__}) "
            f"has {count} timesteps (model calls) for num_inference_steps {resolved['num_inference_steps']}; "
            "the cache stores one teacher call per sampler step: use a one-call-per-step scheduler "
            "(DDIM, DDPM, IDDPM, DPM-Solver, UniPC, Euler, flow matching)"
        )


# -------------------------------------------------------------------------------------------------
# Conditions
# -------------------------------------------------------------------------------------------------


def load_condition_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a condition file: safetensors, or a .pt/.pth dict of tensors (weights_only)."""
    path = Path(path)
    if not path.is_file():
        raise CacheError(f"{path}: condition file does not exist")
    try:
        table = read_tensor_file(path, "condition file", weights_only=True)
    except ValueError as error:
        raise CacheError(str(error)) from error
    if not isinstance(table, dict) or not all(isinstance(v, torch.Tensor) for v in table.values()):
        raise CacheError(f"{path}: expected a dict of tensors")
    return table


def _class_key(denoiser: Denoiser) -> str:
    keys = [k for k, spec in denoiser.cond_spec.items() if spec.dtype == "long" and spec.required]
    if len(keys) != 1:
        raise ValueError(
            f"class_labels need a denoiser with one class-label cond key, got cond_spec {denoiser.cond_spec}"
        )
    return keys[0]


def _random_conditions(denoiser: Denoiser, count: int, seed: int) -> dict[str, torch.Tensor]:
    """`count` random rows of every cond key of the teacher (free lengths 8; labels < num_class_embeds)."""
    if count < 1:
        raise ValueError(f"random_conditions must be >= 1, got {count}")
    config = getattr(denoiser.backbone, "config", None)
    classes = int(getattr(config, "num_class_embeds", None) or 2) if config is not None else 2
    return random_cond(denoiser, count, seed, length=8, num_classes=classes)


def _condition_source(recipe: TrajectoryRecipe) -> str | None:
    """The one condition option the recipe sets (class_labels, cond_path or random_conditions), if any."""
    given = [k for k in ("class_labels", "cond_path", "random_conditions") if getattr(recipe, k) is not None]
    if len(given) > 1:
        raise ValueError(
            f"recipe {recipe.name!r}: set only one of class_labels, cond_path and random_conditions "
            f"(the others null), got {given}"
        )
    return given[0] if given else None


def _check_rows(denoiser: Denoiser, where: str, rows: Mapping[str, torch.Tensor], count: int, branch: str) -> None:
    """Refuse condition rows that do not fit the teacher's `cond_spec` (keys, shapes, dtypes) before
    anything is written, instead of a bare torch error at the teacher's first forward."""
    try:
        denoiser._check_cond(rows, count)
    except ValueError as err:
        raise CacheError(f"{where}: the {branch} rows do not fit the teacher {type(denoiser).__name__}: {err}") from err
    for key, value in rows.items():  # a NaN embedding would fill the cache with NaN trajectories
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            bad = (~torch.isfinite(value.reshape(len(value), -1))).any(1).nonzero().flatten().tolist()
            raise CacheError(f"{where}: the {branch} rows {bad[:10]} of {key!r} hold NaN / Inf")


def _conditions(recipe: TrajectoryRecipe, denoiser: Denoiser, cfg: bool) -> tuple[dict[str, torch.Tensor], str | None]:
    """The condition table {"cond.<key>": [N, ...], "uncond.<key>": [N, ...]} and the source file's sha256,
    checked against the teacher's `cond_spec`."""
    source = None
    _condition_source(recipe)
    if recipe.class_labels is not None:
        cond = {_class_key(denoiser): torch.tensor(recipe.class_labels, dtype=torch.long)}
        null = {}
    elif recipe.cond_path is not None:
        raw = load_condition_file(recipe.cond_path)
        source = _sha256_file(Path(recipe.cond_path))
        cond = {k: v for k, v in raw.items() if not k.startswith("null.")}
        null = {k.removeprefix("null."): v for k, v in raw.items() if k.startswith("null.")}
        unknown = sorted(set(cond) - set(denoiser.cond_spec))
        if unknown:
            raise CacheError(
                f"{recipe.cond_path}: keys {unknown} are not cond keys of the teacher {sorted(denoiser.cond_spec)}"
            )
    elif recipe.random_conditions is not None:
        cond, null = _random_conditions(denoiser, recipe.random_conditions, recipe.seed), {}
    else:
        required = sorted(k for k, spec in denoiser.cond_spec.items() if spec.required)
        if required:
            raise ValueError(
                f"recipe {recipe.name!r}: the teacher needs conditions {required}; set recipe.cond_path "
                "(precomputed embeddings file), recipe.class_labels or recipe.random_conditions"
            )
        return {}, None
    where = recipe.cond_path or ("class_labels" if recipe.class_labels is not None else "random_conditions")
    sizes = {len(v) for v in cond.values()}
    if len(sizes) != 1:
        raise CacheError(f"{where}: condition tensors have different row counts {sizes}")
    (count,) = sizes
    _check_rows(denoiser, where, cond, count, "cond")
    if cfg:
        if not null:
            try:
                null = denoiser.null_cond(cond)
            except ValueError as err:
                raise CacheError(
                    f"{recipe.cond_path}: guidance needs the null condition; add 'null.<key>' tensors ({err})"
                ) from err
        null = {k: v.expand(count, *v.shape[1:]) if len(v) == 1 else v for k, v in null.items()}
        if set(null) != set(cond) or any(len(v) != count for v in null.values()):
            raise CacheError(
                f"{recipe.cond_path}: null.* keys must match the cond keys {sorted(cond)} with 1 or {count} rows"
            )
        _check_rows(denoiser, where, null, count, "null (unconditional)")
    table = {f"cond.{k}": v.detach().cpu().clone() for k, v in cond.items()}  # clones: null_cond may share tensors
    table.update({f"uncond.{k}": v.detach().cpu().clone() for k, v in null.items()})
    return table, source


def _table_rows(
    table: Mapping[str, torch.Tensor], prefix: str, index: torch.Tensor, device: torch.device
) -> dict[str, torch.Tensor]:
    return {k.removeprefix(prefix): v[index].to(device) for k, v in table.items() if k.startswith(prefix)}


# -------------------------------------------------------------------------------------------------
# Manifest: layout arithmetic shared by the writer and the reader
# -------------------------------------------------------------------------------------------------


#: how a damaged cache is mended (ensure_cache regenerates missing or truncated shards)
_REPAIR = ("; a run with the cache's recipe (data.init_args.recipe, or python -m mpq_lightning.data.trajectories) "
           "regenerates missing and truncated shards and keeps the others")


def _file_problem(directory: Path, record: Mapping[str, Any], hash_it: bool) -> str | None:
    """What is wrong with a file that a manifest lists (missing, another size, with ``hash_it`` another
    sha256), naming it; None when it is intact. The readers refuse such a file, `ensure_cache` repairs it."""
    path = directory / record["file"]
    if not path.is_file():
        return f"{path}: missing file listed in {directory / MANIFEST}"
    size = path.stat().st_size
    if size != record["bytes"]:
        return f"{path}: {size} bytes, the manifest says {record['bytes']} (truncated or rewritten)"
    if hash_it and _sha256_file(path) != record["sha256"]:
        return f"{path}: sha256 does not match the manifest (corrupt file; delete it)"
    return None


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def _structure(
    num_trajectories: int, kept: list[int], branches: int, num_conditions: int, shard_size: int
) -> dict[str, Any]:
    return {
        "num_trajectories": num_trajectories,
        "kept_steps": kept,
        "branches": list(BRANCHES[:branches]),
        "num_conditions": max(num_conditions, 1),
        "trajectories_per_shard": shard_size,
        "num_shards": -(-num_trajectories // shard_size),
        "num_samples": num_trajectories * len(kept) * branches,
    }


def shard_trajectories(structure: Mapping[str, Any], index: int) -> tuple[int, int]:
    per = structure["trajectories_per_shard"]
    return index * per, min((index + 1) * per, structure["num_trajectories"])


def sample_ids(structure: Mapping[str, Any], index: int) -> dict[str, torch.Tensor]:
    """Per-sample trajectory / step / branch / condition / uid of shard `index`, in stored order
    (trajectory-major, then kept step, then branch); uid = (trajectory · K + kept position) · branches + branch."""
    a, b = shard_trajectories(structure, index)
    kept = torch.tensor(structure["kept_steps"], dtype=torch.long)
    nb = len(structure["branches"])
    traj, pos, branch = torch.meshgrid(torch.arange(a, b), torch.arange(len(kept)), torch.arange(nb), indexing="ij")
    traj, pos, branch = traj.reshape(-1), pos.reshape(-1), branch.reshape(-1)
    return {
        "trajectory": traj,
        "step_index": kept[pos],
        "branch": branch,
        "cond_index": traj % structure["num_conditions"],
        "uid": (traj * len(kept) + pos) * nb + branch,
    }


def _tensor_specs(latent: list[int], out_channels: int | None, dtype: str, t_dtype: str) -> dict[str, Any]:
    """Per-sample shapes and dtypes; "per": "trajectory" for x_T (one row per trajectory of the shard)."""
    specs = {
        "x_t": {"shape": latent, "dtype": dtype},
        "t": {"shape": [], "dtype": t_dtype},
        **{
            k: {"shape": [], "dtype": "int64"}
            for k in ("step_index", "trajectory", "branch", "cond_index", "uid", "seed")
        },
        "x_T": {"shape": latent, "dtype": dtype, "per": "trajectory"},
    }
    if out_channels is not None:
        specs["teacher_output"] = {"shape": [out_channels, *latent[1:]], "dtype": dtype}
    return specs


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def check_tensors(
    path: Path, tensors: Mapping[str, torch.Tensor], specs: Mapping[str, Any], samples: int, trajectories: int
) -> None:
    """Raise CacheError naming `path` when keys, shapes or dtypes differ from the manifest's specs."""
    missing, extra = sorted(set(specs) - set(tensors)), sorted(set(tensors) - set(specs))
    if missing or extra:
        raise CacheError(
            f"{path}: tensors {sorted(tensors)} do not match the manifest (missing {missing}, unexpected {extra})"
        )
    for key, spec in specs.items():
        rows = trajectories if spec.get("per") == "trajectory" else samples
        expected = [rows, *spec["shape"]]
        got = tensors[key]
        if list(got.shape) != expected or _dtype_name(got.dtype) != spec["dtype"]:
            raise CacheError(
                f"{path}: tensor {key!r} is {list(got.shape)} {_dtype_name(got.dtype)}, "
                f"the manifest says {expected} {spec['dtype']}"
            )


# -------------------------------------------------------------------------------------------------
# Writer
# -------------------------------------------------------------------------------------------------


class ShardWriter:
    """Writes a cache directory: the manifest header, shards with per-shard progress records, and the
    final manifest. Every file goes through temp file + os.replace. A shard counts as done when its
    progress record exists and the file's size and sha256 match it; anything else is rewritten.
    """

    def __init__(self, directory: str | Path, header: Mapping[str, Any]) -> None:
        self.directory = Path(directory)
        self.header = _jsonable(dict(header))
        self.manifest_path = self.directory / MANIFEST

    # ---- state ------------------------------------------------------------------------------------

    def existing(self) -> dict[str, Any] | None:
        """The manifest on disk, after checking it describes the same cache; None when absent, or when
        it is an unfinished generation of another identity without a finished shard (nothing to lose:
        `begin` starts it again with this header, e.g. after a corrected condition file)."""
        if not self.manifest_path.exists():
            return None
        stored = _read_json(self.manifest_path)
        if stored.get("format") != FORMAT:
            raise CacheError(f"{self.manifest_path}: not a trajectory cache manifest (format {stored.get('format')!r})")
        diffs = _identity_differences(stored, self.header)
        if diffs:
            if not stored.get("complete") and not self.finished_shards():
                return None
            done = len(self.finished_shards())
            state = "the cache" if stored.get("complete") else f"the unfinished cache ({done} shards done)"
            raise CacheError(
                f"{self.manifest_path}: {state} was made by another recipe / teacher / scheduler; "
                "use another recipe name or delete the directory. Differing keys:\n  " + "\n  ".join(diffs)
            )
        return stored

    def finished_shards(self) -> list[Path]:
        """Progress records of shards finished by an unfinished generation."""
        return sorted((self.directory / PROGRESS).glob("*.json"))

    def damaged_files(self, stored: Mapping[str, Any]) -> list[str]:
        """Files of a complete manifest (shards, the condition table) missing or not of the recorded size."""
        return [record["file"] for record in [*stored["shards"], stored["conditions_file"]]
                if _file_problem(self.directory, record, hash_it=False)]

    def reopen(self, stored: Mapping[str, Any], damaged: list[str]) -> None:
        """Turn a complete cache with damaged files back into an unfinished generation of the same
        identity: progress records for the intact shards (from the manifest), the manifest marked
        unfinished, then the damaged files removed, in that order, so an interruption anywhere leaves a
        cache that the next run resumes (`begin` rewrites the condition table, the generation the
        missing shards). The caller holds the generation lock."""
        (self.directory / PROGRESS).mkdir(exist_ok=True)
        for index, record in enumerate(stored["shards"]):
            if record["file"] not in damaged:
                _write_json(self._record_path(index), record)
        _write_json(self.manifest_path, {**stored, "complete": False, "shards": []})
        for name in damaged:
            (self.directory / name).unlink(missing_ok=True)

    def begin(self, conditions: Mapping[str, torch.Tensor]) -> None:
        """Create the directory, drop stale temp files, write the condition table and an incomplete manifest.
        The caller holds the generation lock (`_exclusive`), so no other process is writing here; a
        complete manifest is never replaced."""
        if self.manifest_path.exists() and _read_json(self.manifest_path).get("complete"):
            raise CacheError(f"{self.manifest_path}: the cache is complete; refusing to start its generation again")
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / PROGRESS).mkdir(exist_ok=True)
        for stale in [*self.directory.glob(".*.tmp-*"), *(self.directory / PROGRESS).glob(".*.tmp-*")]:
            stale.unlink(missing_ok=True)
        data = safetensors.torch.save(dict(conditions), metadata={"format": FORMAT})
        atomic_write(self.directory / CONDITIONS, data)
        record = {"file": CONDITIONS, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        record["keys"] = {k: {"shape": list(v.shape), "dtype": _dtype_name(v.dtype)} for k, v in conditions.items()}
        self.header["conditions_file"] = record
        _write_json(self.manifest_path, {**self.header, "complete": False, "shards": []})

    def _record_path(self, index: int) -> Path:
        return self.directory / PROGRESS / f"{shard_name(index)}.json"

    def done(self, index: int) -> bool:
        record_path, path = self._record_path(index), self.directory / shard_name(index)
        if not (record_path.exists() and path.exists()):
            return False
        record = json.loads(record_path.read_text())
        return path.stat().st_size == record["bytes"] and _sha256_file(path) == record["sha256"]

    # ---- writing ----------------------------------------------------------------------------------

    def write(self, index: int, tensors: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        """Check `tensors` against the header's specs, write shard `index` and its progress record."""
        path = self.directory / shard_name(index)
        structure = self.header["structure"]
        a, b = shard_trajectories(structure, index)
        samples = (b - a) * len(structure["kept_steps"]) * len(structure["branches"])
        check_tensors(path, tensors, self.header["tensors"], samples, b - a)
        data = safetensors.torch.save({k: v.contiguous() for k, v in tensors.items()}, metadata={"format": FORMAT})
        atomic_write(path, data)
        record = {
            "file": path.name,
            "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
            "num_samples": samples,
            "trajectories": [a, b],
        }
        _write_json(self._record_path(index), record)
        return record

    def finalize(self) -> dict[str, Any]:
        """Merge the progress records into the complete manifest (rank 0, after all shards exist)."""
        shards = []
        for index in range(self.header["structure"]["num_shards"]):
            record_path = self._record_path(index)
            if not record_path.exists():
                raise CacheError(
                    f"{self.directory / shard_name(index)}: shard was not generated (no {record_path.name})"
                )
            shards.append(json.loads(record_path.read_text()))
        stored = _read_json(self.manifest_path)
        manifest = {**self.header, "conditions_file": stored["conditions_file"], "complete": True, "shards": shards}
        _write_json(self.manifest_path, manifest)
        shutil.rmtree(self.directory / PROGRESS, ignore_errors=True)  # merged into the manifest above
        return manifest


# -------------------------------------------------------------------------------------------------
# Generation
# -------------------------------------------------------------------------------------------------


def ensure_cache(
    recipe: TrajectoryRecipe,
    denoiser: Denoiser,
    root: str | Path = "data",
    *,
    distributed: bool = True,
    on_shard_written: Callable[[int, Path], None] | None = None,
    on_progress: Callable[[int, int, int], None] | None = None,
) -> Path:
    """Return `root/<recipe.name>`, generating or finishing the cache first.

    A complete cache with the same identity (resolved recipe, teacher weights hash, scheduler,
    conditions; see `_identity_differences`) is reused after a size check; an incomplete one is
    resumed (verified shards kept); an incomplete one of another identity without a finished shard is
    started again; any other is refused with a CacheError listing the differing keys. The recipe, the
    scheduler and the conditions are checked before anything is written. With torch.distributed
    initialised, or under torchrun (a temporary gloo group is used), every rank must call this, and
    rank 0 decides for all, also for a finished cache: it takes the file lock beside the cache (other
    jobs wait), checks the cache and writes the incomplete manifest; rank r generates shards r, r + W, ...;
    rank 0 writes the final manifest after all ranks are done, then releases the lock. From
    Lightning's `prepare_data` (local rank 0 only) pass distributed=False. `on_shard_written(index,
    path)` is called after each shard (tests). `on_progress(rank, done, total)` is called on every
    rank that samples, first with done = 0, then after each teacher call: `total` counts the sampler
    steps of this rank's trajectory batches still to generate (see `cache_progress`). Nothing is
    called for a complete cache.
    """
    cfg_rows = 2 if _guidance(recipe, denoiser) != 1.0 else 1
    table, source = _conditions(recipe, denoiser, cfg_rows == 2)
    num_conditions = len(next(iter(table.values()))) if table else 0
    resolved = recipe.resolve(denoiser, max(num_conditions, 1))
    scheduler, scheduler_info = _scheduler_identity(resolved)
    _check_one_call_per_step(scheduler, resolved)
    dtype = next(denoiser.parameters()).dtype
    kept = TrajectoryRecipe.kept_steps(resolved)
    header = {
        "format": FORMAT,
        "version": VERSION,
        "recipe": resolved,
        "teacher": teacher_fingerprint(denoiser),
        "scheduler": scheduler_info,
        "conditions": {
            "source_sha256": source,
            "num_conditions": num_conditions,
            "keys": {k: {"shape": list(v.shape[1:]), "dtype": _dtype_name(v.dtype)} for k, v in table.items()},
        },
        "structure": _structure(resolved["num_trajectories"], kept, cfg_rows, num_conditions, resolved["shard_size"]),
        "tensors": _tensor_specs(
            list(denoiser.latent_shape),
            denoiser.out_channels if resolved["store_teacher_output"] else None,
            _dtype_name(dtype),
            _dtype_name(scheduler.timesteps.dtype),
        ),
    }
    directory = Path(root) / recipe.name
    writer = ShardWriter(directory, header)

    def complete(repair: bool = False) -> bool:  # a refusal of another identity raises here, on every rank that checks
        stored = writer.existing()
        if stored is None or not stored.get("complete"):
            return False
        if damaged := writer.damaged_files(stored):
            if not repair:  # decided under the lock
                return False
            warnings.warn(f"{directory}: {', '.join(damaged)} missing or truncated; regenerating them from the "
                          "recipe (the other shards are kept)", stacklevel=3)
            writer.reopen(stored, damaged)
            return False
        TrajectoryCache(directory, verify="size")
        return True

    # Where every rank runs this call at once (a process group exists, or torchrun started them all),
    # rank 0 decides for all under the lock: checked on each rank, a cache that another job finishes
    # between two ranks' checks would send one rank into the process group and the other home. Ranks
    # that a launcher starts later (Lightning's own, after rank 0 finished the cache) check alone.
    if not _ranks_together(distributed) and complete():
        return directory
    with _distributed(distributed) as (rank, world), _exclusive(directory, rank, world, finished=complete):
        # rank 0 holds the lock: another job may have finished the cache while this one waited for it
        if _on_rank0(rank, world, lambda: complete(repair=True) or writer.begin(table)):
            return directory

        def generate() -> None:  # rank r: shards r, r + W, ...
            todo = [i for i in range(rank, header["structure"]["num_shards"], world) if not writer.done(i)]
            batch = header["recipe"]["batch_size"]  # progress: one tick per teacher call of a trajectory batch
            total = header["recipe"]["num_inference_steps"] * sum(
                -(-(b - a) // batch) for a, b in (shard_trajectories(header["structure"], i) for i in todo))
            report, done = on_progress or (lambda *_: None), 0

            def on_step() -> None:
                nonlocal done
                done += 1
                report(rank, done, total)

            was_training = denoiser.training
            denoiser.eval()
            try:
                report(rank, 0, total)
                for index in todo:
                    writer.write(index, _generate_shard(denoiser, header, table, index, on_step))
                    if on_shard_written is not None:
                        on_shard_written(index, directory / shard_name(index))
            finally:
                denoiser.train(was_training)

        _all_ranks(world, generate)
        _on_rank0(rank, world, lambda: writer.finalize() and None)  # (the manifest is not broadcast)
    return directory


@contextmanager
def cache_progress(directory: str | Path) -> Iterator[Callable[[int, int, int], None]]:
    """An ``on_progress`` for :func:`ensure_cache` that shows rank 0's generation as a Rich progress
    bar (teacher calls done / to do, elapsed and remaining time); other ranks and a complete cache
    show nothing."""
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    progress: Progress | None = None
    task = None

    def report(rank: int, done: int, total: int) -> None:
        nonlocal progress, task
        if rank != 0:
            return
        if progress is None:
            progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TimeElapsedColumn(), TimeRemainingColumn())
            progress.console.print(f"Generating the trajectory cache {directory} with the teacher", highlight=False,
                                   markup=False)
            progress.start()
            task = progress.add_task("teacher calls", total=total)
        progress.update(task, completed=done)

    try:
        yield report
    finally:
        if progress is not None:
            progress.stop()


@torch.no_grad()
def _generate_shard(
    denoiser: Denoiser, header: Mapping[str, Any], table: Mapping[str, torch.Tensor], index: int,
    on_step: Callable[[], None] | None = None,
) -> dict[str, torch.Tensor]:
    """Sample the trajectories of shard `index` in batches and lay the kept steps out as samples
    (`on_step()` after each teacher call)."""
    recipe, structure = header["recipe"], header["structure"]
    device = next(denoiser.parameters()).device
    dtype = next(denoiser.parameters()).dtype
    kept = structure["kept_steps"]
    cfg = len(structure["branches"]) == 2
    a, b = shard_trajectories(structure, index)
    parts: list[dict[str, torch.Tensor]] = []
    for start in range(a, b, recipe["batch_size"]):
        trajectories = torch.arange(start, min(start + recipe["batch_size"], b))
        noise = torch.stack(
            [
                torch.randn(denoiser.latent_shape, generator=torch.Generator().manual_seed(recipe["seed"] + int(j)))
                for j in trajectories
            ]
        ).to(device, dtype)
        rows = trajectories % structure["num_conditions"]
        cond = _table_rows(table, "cond.", rows, device) or None
        uncond = _table_rows(table, "uncond.", rows, device) if cfg else None
        steps = _record_steps(denoiser, recipe, noise, cond, uncond, set(kept), start, on_step)
        n, k = len(trajectories), len(kept)
        x = torch.stack([s["x_t"][:n] for s in steps], 1)  # [n, K, ...]
        part = {
            "x_t": x.unsqueeze(2).expand(n, k, len(structure["branches"]), *x.shape[2:]),
            "t": torch.stack([s["t"] for s in steps])
            .expand(n, k)
            .unsqueeze(2)
            .expand(n, k, len(structure["branches"])),
            "x_T": noise,
        }
        if recipe["store_teacher_output"]:
            out = torch.stack([s["output"] for s in steps], 1)  # [2n or n, K, ...]: cond rows then uncond rows
            part["teacher_output"] = torch.stack(out.chunk(len(structure["branches"])), 2)
        parts.append(part)
    tensors = {}
    for key in parts[0]:
        joined = torch.cat([p[key] for p in parts])
        tensors[key] = joined.reshape(-1, *joined.shape[3:]) if key != "x_T" else joined
    tensors = {k: v.cpu().contiguous() for k, v in tensors.items()}
    ids = sample_ids(structure, index)
    _refuse_non_finite(tensors, ids, index)
    tensors.update(ids)
    tensors["seed"] = ids["trajectory"] + recipe["seed"]
    return tensors


def _refuse_non_finite(tensors: Mapping[str, torch.Tensor], ids: Mapping[str, torch.Tensor], index: int) -> None:
    """A shard is never written with NaN / Inf (a broken teacher, fp16 overflow, bad conditions): every
    step trained on it would be skipped or stop the run. Names the first trajectory and sampler step."""
    for key in ("x_t", "teacher_output"):
        value = tensors.get(key)
        if value is None or not value.is_floating_point():
            continue
        bad = ~torch.isfinite(value.reshape(value.shape[0], -1)).all(1)
        if bool(bad.any()):
            first = int(torch.nonzero(bad)[0])
            raise CacheError(
                f"shard {index} ({shard_name(index)}): the teacher gave non-finite values (NaN / Inf) in {key} of "
                f"{int(bad.sum())} samples, first at trajectory {int(ids['trajectory'][first])}, sampler step "
                f"{int(ids['step_index'][first])}; the shard is not written. Check the teacher weights, its dtype "
                "(fp16 overflows) and the conditions")


def _record_steps(
    denoiser: Denoiser,
    recipe: Mapping[str, Any],
    noise: torch.Tensor,
    cond: dict[str, torch.Tensor] | None,
    uncond: dict[str, torch.Tensor] | None,
    kept: set[int],
    first_trajectory: int,
    on_step: Callable[[], None] | None = None,
) -> list[dict[str, torch.Tensor]]:
    """Run `sample` once; per kept step, the denoiser's input x_t (captured by a forward hook, i.e. after
    scale_model_input), its raw output for every row, and the timestep (from the recorder)."""
    scheduler = make_scheduler(recipe["scheduler"], **recipe["scheduler_config"])
    generator = torch.Generator(noise.device).manual_seed(mix_seed(recipe["seed"], first_trajectory, 1))
    steps: list[dict[str, torch.Tensor]] = []
    call: dict[str, Any] = {"count": 0}
    recorded: list[int] = []

    def hook(module: torch.nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> None:
        call["x_t"] = args[0] if args else kwargs["x_t"]
        call["output"] = output
        call["count"] += 1
        if on_step is not None:
            on_step()

    def recorder(*, step_index: int, t: torch.Tensor, **_: Any) -> None:
        if step_index in kept:
            steps.append({"x_t": call["x_t"].clone(), "output": call["output"].clone(), "t": t.detach().cpu().clone()})
            recorded.append(step_index)

    handle = denoiser.register_forward_hook(hook, with_kwargs=True)
    try:
        sample(
            denoiser,
            scheduler,
            noise,
            cond,
            uncond,
            guidance_scale=recipe["guidance_scale"],
            num_inference_steps=recipe["num_inference_steps"],
            cfg_channels=recipe["cfg_channels"],
            recorder=recorder,
            generator=generator,
            eta=recipe["eta"],
        )
    finally:
        handle.remove()
    # one teacher call per sampler step, each kept step recorded once: otherwise the stored x_t /
    # outputs would be another call's (a scheduler evaluating the model twice per step)
    if call["count"] != recipe["num_inference_steps"] or recorded != sorted(kept):
        raise CacheError(
            f"{type(scheduler).__name__}: the teacher was called {call['count']} times for "
            f"num_inference_steps {recipe['num_inference_steps']} and steps {recorded} were recorded for the kept "
            f"steps {sorted(kept)}; the cache needs exactly one teacher call per sampler step"
        )
    return steps


# -------------------------------------------------------------------------------------------------
# Reader
# -------------------------------------------------------------------------------------------------


class TrajectoryCache:
    """A complete cache on disk: manifest checks at open, shard loading with size / checksum / shape checks.

    verify: "full" hashes every shard now; "open" (default) checks sizes now and each shard's sha256
    when it is loaded; "size" checks sizes only. `expect` maps dotted manifest keys (of recipe, teacher,
    scheduler, conditions, structure) to required values, e.g. {"teacher.weights_sha256": ...,
    "scheduler.class": "DDPMScheduler", "structure.num_trajectories": 64}; a dict value must equal the
    whole section (e.g. "scheduler.config").
    """

    def __init__(
        self,
        directory: str | Path,
        verify: Literal["full", "open", "size"] = "open",
        expect: Mapping[str, Any] | None = None,
    ) -> None:
        if verify not in ("full", "open", "size"):
            raise ValueError(f"verify must be 'full', 'open' or 'size', got {verify!r}")
        self.directory = Path(directory)
        self.verify = verify
        path = self.directory / MANIFEST
        if not path.exists():
            raise CacheError(
                f"{path}: no trajectory cache here (generate it with ensure_cache or `python -m mpq_lightning.data.trajectories`)"
            )
        self.manifest = _read_json(path)
        if self.manifest.get("format") != FORMAT or self.manifest.get("version") != VERSION:
            raise CacheError(
                f"{path}: format {self.manifest.get('format')!r} v{self.manifest.get('version')} is not {FORMAT} v{VERSION}"
            )
        if not self.manifest.get("complete"):
            raise CacheError(f"{path}: generation has not finished; rerun the generation to resume it")
        if expect:
            flat = _flatten({k: self.manifest.get(k) for k in (*IDENTITY, "structure")}, "")
            diffs = []
            for key, value in expect.items():  # a dict value expects the whole section, e.g. "scheduler.config"
                want = _flatten(_jsonable(value), key)
                have = {k: v for k, v in flat.items() if k == key or k.startswith(f"{key}.")}
                diffs += [
                    f"{k}: cache {_short(have.get(k, '<absent>'))}, expected {_short(want.get(k, '<absent>'))}"
                    for k in sorted(set(want) | set(have))
                    if have.get(k, "<absent>") != want.get(k, "<absent>")
                ]
            if diffs:
                raise CacheError(
                    f"{path}: the cache does not match the expected teacher / recipe:\n  " + "\n  ".join(diffs)
                )
        self.structure = self.manifest["structure"]
        self.specs = self.manifest["tensors"]
        if len(self.manifest["shards"]) != self.structure["num_shards"]:
            raise CacheError(
                f"{path}: lists {len(self.manifest['shards'])} shards, the structure needs {self.structure['num_shards']}"
            )
        for record in [*self.manifest["shards"], self.manifest["conditions_file"]]:
            self._check_file(record, hash_it=verify == "full")

    def _check_file(self, record: Mapping[str, Any], hash_it: bool) -> Path:
        if problem := _file_problem(self.directory, record, hash_it):
            raise CacheError(f"{problem}{_REPAIR}")
        return self.directory / record["file"]

    # ---- facts ------------------------------------------------------------------------------------

    @property
    def num_shards(self) -> int:
        return self.structure["num_shards"]

    @property
    def num_inference_steps(self) -> int:
        return self.manifest["recipe"]["num_inference_steps"]

    @property
    def sample_keys(self) -> list[str]:
        """Per-sample tensors of a shard (x_T, one row per trajectory, excluded)."""
        return [k for k, spec in self.specs.items() if spec.get("per") != "trajectory"]

    # ---- loading ----------------------------------------------------------------------------------

    def conditions(self) -> dict[str, torch.Tensor]:
        """The condition table {"cond.<key>": [N, ...], "uncond.<key>": [N, ...]}."""
        record = self.manifest["conditions_file"]
        path = self._check_file(record, hash_it=self.verify != "size")
        try:
            table = safetensors.torch.load_file(str(path))
        except Exception as err:  # safetensors raises its own error types
            raise CacheError(f"{path}: unreadable safetensors file ({err})") from err
        for key, spec in record["keys"].items():
            if (
                key not in table
                or list(table[key].shape) != spec["shape"]
                or _dtype_name(table[key].dtype) != spec["dtype"]
            ):
                raise CacheError(
                    f"{path}: tensor {key!r} missing or not {spec['shape']} {spec['dtype']} as the manifest says"
                )
        return table

    def load_shard(self, index: int) -> dict[str, torch.Tensor]:
        """All tensors of shard `index`, checked against the manifest (size, sha256 unless verify="size",
        keys / shapes / dtypes, sample ids)."""
        record = self.manifest["shards"][index]
        path = self.directory / record["file"]
        try:
            data = path.read_bytes()
        except FileNotFoundError as err:
            raise CacheError(f"{path}: missing shard listed in {self.directory / MANIFEST}{_REPAIR}") from err
        if len(data) != record["bytes"]:
            raise CacheError(f"{path}: {len(data)} bytes, the manifest says {record['bytes']} (truncated or rewritten)"
                             f"{_REPAIR}")
        if self.verify != "size" and hashlib.sha256(data).hexdigest() != record["sha256"]:
            raise CacheError(f"{path}: sha256 does not match the manifest (corrupt shard; delete it){_REPAIR}")
        try:
            tensors = safetensors.torch.load(data)
        except Exception as err:
            raise CacheError(f"{path}: unreadable safetensors file ({err})") from err
        del data
        a, b = shard_trajectories(self.structure, index)
        check_tensors(path, tensors, self.specs, record["num_samples"], b - a)
        if not torch.equal(tensors["uid"], sample_ids(self.structure, index)["uid"]):
            raise CacheError(f"{path}: sample ids do not follow the manifest's layout (shard from another cache?)")
        return tensors

    def iter_shards(self) -> Iterator[dict[str, torch.Tensor]]:
        for index in range(self.num_shards):
            yield self.load_shard(index)


# -------------------------------------------------------------------------------------------------
# Synthetic caches (tests, benchmarks): the same writer, random tensors instead of a teacher
# -------------------------------------------------------------------------------------------------


def synthesize_cache(
    directory: str | Path,
    latent_shape: tuple[int, ...],
    num_trajectories: int,
    kept_steps: list[int],
    *,
    shard_size: int = 4,
    cfg: bool = True,
    num_conditions: int = 2,
    cond_shape: tuple[int, ...] = (1, 8, 32),
    out_channels: int | None = None,
    teacher_output: bool = True,
    seed: int = 0,
) -> Path:
    """A valid cache of random latents with the real layout, written with `ShardWriter`
    (teacher outputs of `out_channels`, default the latent channels)."""
    out_channels = out_channels or latent_shape[0]
    branches = 2 if cfg else 1
    steps = max(kept_steps) + 1
    recipe = {"name": Path(directory).name, "synthetic": True, "num_inference_steps": steps, "seed": seed}
    table = {"cond.y": torch.randn(num_conditions, *cond_shape, generator=torch.Generator().manual_seed(seed))}
    if cfg:
        table["uncond.y"] = torch.zeros(num_conditions, *cond_shape)
    header = {
        "format": FORMAT,
        "version": VERSION,
        "recipe": recipe,
        "teacher": {"class": "synthetic", "latent_shape": list(latent_shape), "weights_sha256": None},
        "scheduler": {"class": "synthetic", "timesteps": list(range(999, -1, -(1000 // steps)))[:steps]},
        "conditions": {
            "source_sha256": None,
            "num_conditions": num_conditions,
            "keys": {k: {"shape": list(v.shape[1:]), "dtype": "float32"} for k, v in table.items()},
        },
        "structure": _structure(num_trajectories, list(kept_steps), branches, num_conditions, shard_size),
        "tensors": _tensor_specs(list(latent_shape), out_channels if teacher_output else None, "float32", "int64"),
    }
    writer = ShardWriter(directory, header)
    writer.begin(table)
    for index in range(header["structure"]["num_shards"]):
        ids = sample_ids(header["structure"], index)
        a, b = shard_trajectories(header["structure"], index)
        g = torch.Generator().manual_seed(mix_seed(seed, index))
        n = len(ids["uid"])
        tensors = {
            **ids,
            "seed": ids["trajectory"] + seed,
            "t": 999 - ids["step_index"] * (1000 // steps),
            "x_t": torch.randn(n, *latent_shape, generator=g),
            "x_T": torch.randn(b - a, *latent_shape, generator=g),
        }
        if teacher_output:
            tensors["teacher_output"] = torch.randn(n, out_channels, *latent_shape[1:], generator=g)
        writer.write(index, tensors)
    writer.finalize()
    return Path(directory)


# -------------------------------------------------------------------------------------------------
# Command line
# -------------------------------------------------------------------------------------------------


def train_config_args(path: str) -> list[str]:
    """The options that build the trajectory cache a ``train.py`` config trains on: its teacher
    (``model.model``, ``model.model_kwargs``, built after ``seed_everything`` as train.py builds it) and
    ``data.init_args.recipe`` under ``data.init_args.cache``. One resolved file: a run's
    ``config.yaml``, or ``train.py --config ... [overrides] --print_config > resolved.yaml``."""
    from mpq_lightning.files import read_run_config

    cfg = read_run_config(path)
    model, data = cfg.get("model") or {}, cfg.get("data") or {}
    init = (data.get("init_args") or {}) if isinstance(data, dict) else {}
    if not isinstance(model, dict) or not model.get("model"):
        raise ValueError(f"--train_config {path}: model.model is not set (a train.py config names its teacher there)")
    if "OnTheFly" in str(data.get("class_path", "")):
        raise ValueError(f"--train_config {path}: data.class_path {data['class_path']} samples the teacher's "
                         "trajectories while training: there is no cache to build")
    recipe, cache = init.get("recipe"), init.get("cache")
    if not cache:
        raise ValueError(f"--train_config {path}: data.init_args.cache is not set")
    if not recipe:
        raise ValueError(f"--train_config {path}: data.init_args.recipe is not set: the run reads the finished "
                         f"cache {cache} as it is (its recipe is the one it was made with)")
    name = Path(cache).name
    recipe = {"name": name, **recipe}
    if recipe["name"] != name:
        raise ValueError(f"--train_config {path}: data.init_args.recipe.name {recipe['name']!r} must be the name of "
                         f"the cache directory data.init_args.cache ({cache})")
    args = ["--model", str(model["model"]), "--model_kwargs", json.dumps(model.get("model_kwargs") or {}),
            "--root", str(Path(cache).parent), "--recipe", json.dumps(recipe)]
    seed = cfg.get("seed_everything")
    if isinstance(seed, int) and not isinstance(seed, bool):
        args += ["--seed", str(seed)]
    return args


def main(argv: list[str] | None = None) -> Path:
    """`python -m mpq_lightning.data.trajectories`: build a registered teacher and ensure its cache."""
    import sys

    from jsonargparse import ActionConfigFile, ArgumentParser

    from mpq_lightning.models import build

    argv = list(sys.argv[1:] if argv is None else argv)
    for i, arg in enumerate(argv):  # --train_config FILE / --train_config=FILE: its options first, later ones win
        if arg == "--train_config" or arg.startswith("--train_config="):
            value = arg.partition("=")[2] if "=" in arg else (argv[i + 1] if i + 1 < len(argv) else None)
            if not value:
                raise ValueError("--train_config needs a file: a train.py config (a run's config.yaml)")
            argv = train_config_args(value) + argv[:i] + argv[i + (1 if "=" in arg else 2):]
            break
    parser = ArgumentParser(
        description="Generate (or resume, or check) a teacher trajectory cache under ROOT/<recipe.name>. "
        "--train_config FILE takes the teacher, recipe and cache folder of a train.py config (a run's "
        "config.yaml, or train.py --config ... --print_config > resolved.yaml); options after it override them."
    )
    parser.add_argument("--config", action=ActionConfigFile, help="YAML with any of the options below")
    parser.add_argument("--model", type=str, required=True, help="registered model name, e.g. tiny-stdit")
    parser.add_argument("--model_kwargs", type=dict, default={}, help="build() keywords, e.g. {ckpt_path: ...}")
    parser.add_argument("--root", type=str, default="data", help="cache root directory")
    parser.add_argument("--device", type=str, default=None, help="default: cuda:LOCAL_RANK when available, else cpu")
    parser.add_argument(
        "--seed", type=int, default=0, help="torch seed before building the model (random-weight models)"
    )
    parser.add_class_arguments(TrajectoryRecipe, "recipe")
    cfg = parser.parse_args(argv)
    recipe = TrajectoryRecipe(**cfg.recipe.as_dict())
    device = cfg.device or (f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(cfg.seed)
    denoiser = build(cfg.model, **cfg.model_kwargs).to(device)
    with cache_progress(Path(cfg.root) / recipe.name) as report:
        path = ensure_cache(recipe, denoiser, cfg.root, on_progress=report)
    if int(os.environ.get("RANK", "0")) == 0:
        manifest = json.loads((path / MANIFEST).read_text())
        print(f"{path}: {manifest['structure']['num_samples']} samples in {manifest['structure']['num_shards']} shards")
    return path


if __name__ == "__main__":
    from mpq_lightning.cli import run_script  # a refusal (e.g. a cache of another teacher) as one line

    run_script(main)
