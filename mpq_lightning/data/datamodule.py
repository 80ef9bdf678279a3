"""Training streams over teacher trajectories: `TrajectoryDataModule` (the cache) and
`TeacherForcedTrajectories` (on the fly, EfficientDM / MPQ-DM).

Both yield batches as dicts: x_t [B, C, (F,) H, W] (the denoiser's input), t [B], step_index [B],
cond {key: [B, ...]}, teacher_output [B, out_channels, ...] (the teacher's raw output for that row,
when available), and the ids branch (0 cond, 1 uncond), trajectory, cond_index and uid.

Cache stream, per epoch e (every rank computes the same plan, nothing is communicated):
  1. the selected samples of every shard (steps, step_stride, conditions, branches) are known from the
     manifest alone; with shuffle, the shard order and each shard's sample order are permuted with
     generators seeded by (seed, e) and (seed, e, shard);
  2. the concatenated stream is cut into W equal contiguous blocks, one per DDP rank (padded by wrapping
     around like DistributedSampler, or cut to whole batches with drop_last), so ranks are disjoint,
     read disjoint shards (except at block edges) and their union is the selection;
  3. a rank's batches are split into contiguous runs, one per dataloader worker; each worker walks its
     run in windows of `shuffle_buffer` samples, permuting each window with a generator seeded by
     (seed, e, rank, window start). Resident: one shard + one window (+ the batches in flight).
The DataLoader interleaves worker batches round-robin; the position in the stream is (epoch, batches
delivered), which `state_dict` returns and `load_state_dict` restores: the next pass replays the
round-robin to find how many batches each worker delivered (skipped as whole windows without reading
them, the rest of a window after loading it) and which worker is next (workers are re-numbered so the
DataLoader's restart at worker 0 continues the original cycle), so a resumed run sees exactly the
remaining batches. A mid-epoch position is only meaningful for the layout it was saved with (world
size, batch size, workers, selection, shuffling), which is saved with it; resuming it under another
layout is refused.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import lightning as L
from lightning.pytorch.utilities import rank_zero_warn
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mpq_lightning.checks import check_numbers
from mpq_lightning.data.trajectories import (
    BRANCHES,
    CacheError,
    TrajectoryCache,
    TrajectoryRecipe,
    cache_progress,
    ensure_cache,
    mix_seed,
    sample_ids,
    sampler_steps,
    teacher_fingerprint,
)
from mpq_lightning.models.registry import Denoiser
from mpq_lightning.models.sampling import SchedulerStep, _cat_cond, _takes_variance, guide, make_scheduler

__all__ = ["OnTheFlyDataModule", "TeacherForcedTrajectories", "TrajectoryDataModule", "TrajectoryDataset"]


#: Layout entries that decide which batches a rank delivers in an epoch (teacher_output only drops a key).
_ORDER_KEYS = (
    "world_size", "num_workers", "batch_size", "shuffle", "shuffle_buffer", "seed", "steps", "step_stride",
    "conditions", "branches", "drop_last", "val_trajectories",
)
#: Layout keys added after checkpoints were first written, with the value those checkpoints implied.
_LAYOUT_DEFAULTS = {"val_trajectories": None}

#: Per-sample ids; inside a batch they travel as one [B, 5] "ids" tensor (one shared-memory transfer
#: from a DataLoader worker instead of five) and are unpacked in the main process.
_IDS = ("step_index", "trajectory", "branch", "cond_index", "uid")


def _rank_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if rank is not None and world_size is not None:
        return rank, world_size
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _split(total: int, parts: int) -> list[int]:
    """Contiguous split sizes, the first `total % parts` one larger."""
    return [total // parts + (i < total % parts) for i in range(parts)]


def _resume_plan(counts: list[int], consumed: int) -> tuple[list[int], int]:
    """Replay the DataLoader's round-robin over workers with `counts` batches for `consumed` batches:
    (batches each worker already delivered, the worker whose batch comes next)."""
    skips, worker = [0] * len(counts), 0
    consumed = min(consumed, sum(counts))
    while consumed:
        if skips[worker] < counts[worker]:
            skips[worker] += 1
            consumed -= 1
        worker = (worker + 1) % len(counts)
    return skips, worker


# -------------------------------------------------------------------------------------------------
# Epoch plan: which sample sits at which position of the epoch's stream
# -------------------------------------------------------------------------------------------------


class _EpochPlan:
    """Positions 0..total-1 of one epoch's stream mapped to (shard, row); positions wrap modulo total."""

    def __init__(self, selected: list[torch.Tensor], shuffle: bool, seed: int, epoch: int) -> None:
        order = list(range(len(selected)))
        if shuffle:
            order = torch.randperm(len(order), generator=torch.Generator().manual_seed(mix_seed(seed, epoch))).tolist()
        self.order = [k for k in order if len(selected[k])]
        self.offsets = [0]
        for k in self.order:
            self.offsets.append(self.offsets[-1] + len(selected[k]))
        self.selected, self.shuffle, self.seed, self.epoch = selected, shuffle, seed, epoch

    @property
    def total(self) -> int:
        return self.offsets[-1]

    def _rows(self, shard: int) -> torch.Tensor:
        rows = self.selected[shard]
        if self.shuffle:
            g = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch, shard))
            rows = rows[torch.randperm(len(rows), generator=g)]
        return rows

    def segments(self, start: int, stop: int) -> Iterator[tuple[int, torch.Tensor]]:
        """(shard, rows) covering positions [start, stop) in order."""
        while start < stop:
            base = (start // self.total) * self.total
            pos = start - base
            i = bisect.bisect_right(self.offsets, pos) - 1
            end = min(stop - base, self.offsets[i + 1])
            shard = self.order[i]
            yield shard, self._rows(shard)[pos - self.offsets[i] : end - self.offsets[i]]
            start = base + end


# -------------------------------------------------------------------------------------------------
# Cache dataset
# -------------------------------------------------------------------------------------------------


class TrajectoryDataset(IterableDataset):
    """Batches from a trajectory cache for one DDP rank; `len()` is its batch count per epoch.

    Yields collated batches itself (use a DataLoader with batch_size=None). `set_position(epoch, skip)`
    picks the epoch and the number of already-delivered batches to skip. In a DataLoader worker it
    yields packed batches (ids in one tensor, no cond) that `finish` completes in the main process.
    """

    def __init__(
        self,
        cache: TrajectoryCache,
        batch_size: int,
        *,
        shuffle: bool = True,
        shuffle_buffer: int = 256,
        seed: int = 0,
        steps: list[int] | None = None,
        step_stride: int = 1,
        conditions: list[int] | None = None,
        branches: list[str] | None = None,
        teacher_output: bool = True,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
        trajectories: list[int] | None = None,
        exclude_trajectories: list[int] | None = None,
    ) -> None:
        if batch_size < 1 or shuffle_buffer < 1 or step_stride < 1:
            raise ValueError("batch_size, shuffle_buffer and step_stride must be >= 1")
        self.cache, self.batch_size, self.shuffle, self.seed = cache, batch_size, shuffle, seed
        self.window = -(-shuffle_buffer // batch_size) * batch_size  # whole batches per window
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        self.keys = [
            k for k in cache.sample_keys if k not in (*_IDS, "seed") and (teacher_output or k != "teacher_output")
        ]
        if teacher_output and "teacher_output" not in cache.specs:
            raise CacheError(
                f"{cache.directory}: the cache has no teacher outputs (recipe.store_teacher_output was false); "
                "set the data module's teacher_output: false (data.init_args.teacher_output) to train with "
                "the teacher run on the fly, or generate a cache with store_teacher_output: true"
            )
        self.selected = self._select(steps, step_stride, conditions, branches, trajectories, exclude_trajectories)
        total = sum(len(s) for s in self.selected)
        if total == 0:
            kept = "" if trajectories is None else f", trajectories {trajectories}"
            held = "" if exclude_trajectories is None else f", without the validation trajectories {exclude_trajectories}"
            raise CacheError(
                f"{cache.directory}: the selection (steps {steps}, stride {step_stride}, conditions {conditions}, "
                f"branches {branches}{kept}{held}) is empty"
            )
        if drop_last:
            self.per_rank = total // world_size // batch_size * batch_size
            if self.per_rank == 0:
                raise CacheError(
                    f"{cache.directory}: {total} selected samples give no full batch of {batch_size} on {world_size} ranks"
                )
        else:
            self.per_rank = -(-total // world_size)
        self.total = total
        self.epoch, self.skip = 0, 0
        self._tables: dict[str, torch.Tensor] | None = None

    def _select(
        self, steps: list[int] | None, stride: int, conditions: list[int] | None, branches: list[str] | None,
        trajectories: list[int] | None = None, exclude: list[int] | None = None,
    ) -> list[torch.Tensor]:
        structure = self.cache.structure
        count = structure["num_trajectories"]
        for key, picked in (("trajectories", trajectories), ("data.init_args.val_trajectories", exclude)):
            if picked is not None and (bad := [j for j in picked if not 0 <= j < count]):
                raise CacheError(f"{self.cache.directory}: {key} {bad} out of range (the cache has {count} trajectories)")
        kept = structure["kept_steps"]
        if steps is not None and (missing := sorted(set(steps) - set(kept))):
            raise CacheError(f"{self.cache.directory}: steps {missing} are not in the cache (kept steps {kept})")
        if branches is not None and (unknown := sorted(set(branches) - set(structure["branches"]))):
            raise CacheError(
                f"{self.cache.directory}: branches {unknown} are not in the cache ({structure['branches']})"
            )
        if conditions is not None and (bad := [c for c in conditions if not 0 <= c < structure["num_conditions"]]):
            raise CacheError(
                f"{self.cache.directory}: conditions {bad} out of range (the cache has {structure['num_conditions']})"
            )
        step_ok = torch.tensor([i % stride == 0 and (steps is None or i in steps) for i in range(max(kept) + 1)])
        branch_ok = torch.tensor([branches is None or b in branches for b in BRANCHES])
        cond_ok = torch.tensor([conditions is None or c in conditions for c in range(structure["num_conditions"])])
        traj_ok = torch.tensor([(trajectories is None or j in trajectories) and (exclude is None or j not in exclude)
                                for j in range(count)])
        selected = []
        for index in range(self.cache.num_shards):
            ids = sample_ids(structure, index)
            mask = (step_ok[ids["step_index"]] & branch_ok[ids["branch"]] & cond_ok[ids["cond_index"]]
                    & traj_ok[ids["trajectory"]])
            selected.append(mask.nonzero().flatten())
        return selected

    def __len__(self) -> int:
        return -(-self.per_rank // self.batch_size)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_tables": None}  # workers load the condition table themselves

    def set_position(self, epoch: int, skip: int) -> None:
        self.epoch, self.skip = epoch, skip

    # ---- iteration --------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        counts = _split(len(self), workers)
        skips, first = _resume_plan(counts, self.skip)
        worker = (worker + first) % workers  # the DataLoader restarts its round-robin at worker 0
        first_batch, skip = sum(counts[:worker]), skips[worker]
        start = first_batch * self.batch_size  # this worker's run, in positions of the rank's block
        stop = min((first_batch + counts[worker]) * self.batch_size, self.per_rank)
        plan = _EpochPlan(self.selected, self.shuffle, self.seed, self.epoch)
        offset = self.rank * self.per_rank
        packed = info is not None
        resume = start + skip * self.batch_size
        window = start + (resume - start) // self.window * self.window
        shard_cache: dict[int, dict[str, torch.Tensor]] = {}
        while window < stop:
            end = min(window + self.window, stop)
            data = self._gather(plan, offset + window, offset + end, shard_cache)
            order = torch.arange(end - window)
            if self.shuffle:
                g = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch, self.rank, window))
                order = torch.randperm(end - window, generator=g)
            for pos in range(max(resume, window), end, self.batch_size):
                batch = {k: v[order[pos - window : min(pos + self.batch_size, end) - window]] for k, v in data.items()}
                yield batch if packed else self.finish(batch)
            window = end

    def _gather(
        self, plan: _EpochPlan, start: int, stop: int, shard_cache: dict[int, dict[str, torch.Tensor]]
    ) -> dict[str, torch.Tensor]:
        """The window's samples, loading shards one at a time (the previous one is released first)."""
        pieces: dict[str, list[torch.Tensor]] = {k: [] for k in (*self.keys, "ids")}
        for shard, rows in plan.segments(start, stop):
            if shard not in shard_cache:
                shard_cache.clear()
                shard_cache[shard] = self.cache.load_shard(shard)
            tensors = shard_cache[shard]
            for key in self.keys:
                pieces[key].append(tensors[key][rows])
            pieces["ids"].append(torch.stack([tensors[k][rows] for k in _IDS], 1))
        return {k: torch.cat(v) for k, v in pieces.items()}

    def _condition_tables(self) -> dict[str, torch.Tensor]:
        """{key: [branches, N, ...]}: row (branch, cond_index) is a sample's condition."""
        table = self.cache.conditions()
        keys = sorted({k.split(".", 1)[1] for k in table})
        branches = self.cache.structure["branches"]
        out = {}
        for key in keys:
            parts = [table[f"{b}.{key}"] for b in branches]
            out[key] = torch.stack(parts)
        return out

    def finish(self, packed: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        """Unpack the ids and look up each sample's condition (row (branch, cond_index) of the table)."""
        if self._tables is None:
            self._tables = self._condition_tables()
        batch: dict[str, Any] = {k: v for k, v in packed.items() if k != "ids"}
        batch.update({k: packed["ids"][:, i] for i, k in enumerate(_IDS)})
        batch["cond"] = {k: v[batch["branch"], batch["cond_index"]] for k, v in self._tables.items()}
        batch["step_index_host"] = batch["step_index"].tolist()  # for the memory queue, without a GPU sync
        return batch


class _ResumableLoader(DataLoader):
    """A DataLoader over a TrajectoryDataset that counts passes (epochs) and delivered batches. Its
    `state_dict` / `load_state_dict` make Lightning treat it as resumable (it checkpoints loaders too).

    epoch_length: the batches after which the trainer ends an epoch (fewer than len() with
    limit_train_batches): a position there is saved as the start of the next epoch. layout / restore:
    the data module's layout, saved with the position, and its check of a restored position."""

    def __init__(
        self,
        dataset: TrajectoryDataset,
        epoch: int = 0,
        skip: int = 0,
        *,
        epoch_length: Callable[[], float] | None = None,
        layout: dict[str, Any] | None = None,
        restore: Callable[[Mapping[str, Any]], dict[str, int]] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(dataset, batch_size=None, **kwargs)
        self.epoch, self.consumed = epoch, skip
        self._next = (epoch, skip)
        self._epoch_length = epoch_length or (lambda: len(self))
        self._layout, self._restore = layout, restore

    def state_dict(self) -> dict[str, Any]:
        epoch, batches = self.epoch, self.consumed
        if 0 < min(len(self), self._epoch_length()) <= batches:  # the epoch is over
            epoch, batches = epoch + 1, 0
        state: dict[str, Any] = {"epoch": epoch, "batches": batches}
        if self._layout is not None:
            state["layout"] = self._layout
        return state

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        position = self._restore(state_dict) if self._restore is not None else state_dict
        self.epoch, self.consumed = position["epoch"], position["batches"]
        self._next = (self.epoch, self.consumed)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        epoch, skip = self._next
        if skip >= len(self):  # saved at the end of an epoch: continue with the next one
            epoch, skip = epoch + 1, 0
        self.dataset.set_position(epoch, skip)
        self.epoch, self.consumed = epoch, skip
        self._next = (epoch + 1, 0)
        for batch in super().__iter__():
            self.consumed += 1
            yield self.dataset.finish(batch) if self.num_workers else batch


# -------------------------------------------------------------------------------------------------
# DataModule
# -------------------------------------------------------------------------------------------------


class TrajectoryDataModule(L.LightningDataModule):
    """Streams a trajectory cache (see the module docstring) for image or video teachers.

    Args:
        cache: the cache directory, e.g. data/opensora_iddpm100.
        batch_size: samples per batch (per rank).
        shuffle / shuffle_buffer / seed: epoch-dependent shuffling of shards, samples within a shard
            and windows of `shuffle_buffer` samples (rounded up to whole batches).
        steps / step_stride: keep sampler steps in `steps` (None: all cached) with i % step_stride == 0.
        conditions: condition-table rows to keep (None: all); branches: "cond" and/or "uncond".
        teacher_output: yield the cached teacher output.
        drop_last: cut every rank to whole, equal batches instead of padding by wrapping around.
        num_workers / pin_memory: DataLoader options (workers are re-created each epoch).
        verify: "full" (sha256 of every shard at setup), "open" (sizes at setup, sha256 at load), "size".
        expect: dotted manifest keys the cache must have, e.g. {"teacher.weights_sha256": "..."}.
        rank / world_size: override torch.distributed's (tests, custom launchers).
        recipe: how to generate the cache when it is missing or unfinished (`prepare_cache`); its name
            must be the cache directory's name.
        val_trajectories: trajectory indices held out of training and calibration and served by
            `val_dataloader` (every selected step and branch of them, in stored order); None: no
            validation. Validation then runs at Lightning's `trainer.val_check_interval` /
            `check_val_every_n_epoch`, logging `val/<term>`, `val/loss` and the per-timestep error.

    Resuming: Lightning stores `state_dict()` = {"epoch", "batches", "layout"} in checkpoints (under
    the class name, and the loader's own copy under the fit loop's "combined_loader") and calls
    `load_state_dict` before `train_dataloader()`; the next pass skips the delivered batches, so the
    remaining ones equal the uninterrupted run's. An epoch that the trainer ended early
    (`limit_train_batches`) is saved as finished, so a resumed run starts the next epoch. A checkpoint
    from the middle of an epoch needs the same layout (world size, batch size, num_workers, selection
    and shuffling options): another one raises a ValueError naming the changed keys; from the end of an
    epoch any layout continues with the next epoch.
    """

    def __init__(
        self,
        cache: str,
        batch_size: int = 8,
        shuffle: bool = True,
        shuffle_buffer: int = 256,
        seed: int = 0,
        steps: list[int] | None = None,
        step_stride: int = 1,
        conditions: list[int] | None = None,
        branches: list[str] | None = None,
        teacher_output: bool = True,
        drop_last: bool = False,
        num_workers: int = 0,
        pin_memory: bool = False,
        verify: Literal["full", "open", "size"] = "open",
        expect: dict[str, Any] | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        recipe: TrajectoryRecipe | None = None,
        on_layout_change: Literal["refuse", "next_epoch"] = "refuse",
        val_trajectories: list[int] | None = None,
    ) -> None:
        super().__init__()
        if on_layout_change not in ("refuse", "next_epoch"):
            raise ValueError(f"data.init_args.on_layout_change must be 'refuse' or 'next_epoch', got {on_layout_change!r}")
        # judged when the config is parsed, before the run folder or the cache is written
        check_numbers("data.init_args", locals(), counts=("batch_size", "shuffle_buffer", "step_stride"),
                      indices=("num_workers",))
        self.on_layout_change = on_layout_change
        self.cache_dir = Path(cache)
        if recipe is not None and recipe.name != self.cache_dir.name:
            raise ValueError(
                f"data.init_args.recipe.name {recipe.name!r} must be the name of the cache directory "
                f"data.init_args.cache={str(cache)!r}, {self.cache_dir.name!r}: set both alike, or "
                "data.init_args.recipe null to train on an existing cache as it is")
        self.recipe = recipe
        self.options = dict(
            batch_size=batch_size,
            shuffle=shuffle,
            shuffle_buffer=shuffle_buffer,
            seed=seed,
            steps=steps,
            step_stride=step_stride,
            conditions=conditions,
            branches=branches,
            teacher_output=teacher_output,
            drop_last=drop_last,
            val_trajectories=sorted(set(val_trajectories)) if val_trajectories else None,
        )
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.verify, self.expect = verify, expect
        self.rank, self.world_size = rank, world_size
        self.cache: TrajectoryCache | None = None
        self._loader: _ResumableLoader | None = None
        self._position = {"epoch": 0, "batches": 0}

    @property
    def batch_size(self) -> int:
        """Samples per batch and rank (``data.init_args.batch_size``)."""
        return self.options["batch_size"]

    def setup(self, stage: str | None = None) -> None:
        """Open the cache: manifest, identity `expect`ations, file sizes (and checksums for verify="full")."""
        if self.cache is None:
            self.cache = TrajectoryCache(self.cache_dir, verify=self.verify, expect=self.expect)

    def prepare_cache(self, teacher: Denoiser) -> None:
        """Before fitting, on every rank (MPQCLI.before_fit): generate / finish the cache from `recipe`
        with the frozen teacher, or, without a recipe, check that the cache was made by this teacher."""
        if self.recipe is None:
            self.check_teacher(teacher)
        else:
            held, count = self.options["val_trajectories"], self.recipe.num_trajectories
            if held and count is not None and (bad := [j for j in held if not 0 <= j < count]):
                raise ValueError(f"data.init_args.val_trajectories {bad} out of range: the recipe makes {count} "
                                 "trajectories (data.init_args.recipe.num_trajectories)")
            with cache_progress(self.cache_dir) as report:  # a bar on rank 0 while the teacher samples
                ensure_cache(self.recipe, teacher, self.cache_dir.parent, on_progress=report)

    def check_selection(self, rank: int, world_size: int) -> None:
        """Build this rank's training (and held-out) selection of the ready cache once, so that one
        that is empty (``val_trajectories`` holding out every trajectory, steps or conditions the cache
        lacks) or gives no full batch is refused before anything is written (MPQCLI.before_fit), not
        after the run's config and events (calibration reads the first batches)."""
        self.setup()
        if self.rank is not None and self.world_size is not None:  # set on the data module itself
            rank, world_size = self.rank, self.world_size
        self._dataset(rank, world_size, **self.options)
        if self.options["val_trajectories"]:
            self._val_dataset(rank, world_size)

    def check_teacher(self, teacher: Denoiser) -> None:
        """Raise CacheError unless the cache was generated by these teacher weights."""
        self.setup()
        expected = teacher_fingerprint(teacher)["weights_sha256"]
        stored = self.cache.manifest["teacher"]["weights_sha256"]
        if stored != expected:
            raise CacheError(
                f"{self.cache_dir / 'manifest.json'}: teacher.weights_sha256 is {stored}, this teacher's is {expected}"
            )

    @property
    def manifest(self) -> dict[str, Any]:
        self.setup()
        return self.cache.manifest

    def sample_conditions(self, n: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
        """The first ``n`` rows of the cache's condition table as ``(cond, uncond)`` (rows repeat
        cyclically when the table is shorter), for sampling callbacks and evaluation."""
        self.setup()
        table = self.cache.conditions()
        cond = {k[5:]: v for k, v in table.items() if k.startswith("cond.")}
        uncond = {k[7:]: v for k, v in table.items() if k.startswith("uncond.")}
        if not cond:
            return {}, None
        rows = len(next(iter(cond.values())))
        index = torch.arange(n) % rows
        pick = lambda d: {k: v[index % len(v)] for k, v in d.items()}  # noqa: E731
        return pick(cond), (pick(uncond) if uncond else None)

    def train_dataloader(self) -> DataLoader:
        """The training loader, continuing where the previous one stopped (a restored position, or the
        live position of a loader this data module built before: ``reload_dataloaders_every_n_epochs``)."""
        position = self._loader.state_dict() if self._loader is not None else self._position
        self._loader = self._make_loader(position["epoch"], position["batches"])
        return self._loader

    def calibration_dataloader(self) -> DataLoader:
        """The training order from its start (the first batches calibrate the quantizers), without
        touching the training loader or its checkpointed position."""
        return self._make_loader(0, 0)

    @property
    def has_validation(self) -> bool:
        """Whether ``val_dataloader`` serves anything (``val_trajectories`` set)."""
        return bool(self.options["val_trajectories"])

    def val_dataloader(self) -> DataLoader | list:
        """The held-out trajectories (``val_trajectories``), unshuffled and split between ranks like
        training (without ``drop_last`` the last rank's share wraps around to the common length);
        an empty list, so no validation, without them."""
        if not self.options["val_trajectories"]:
            return []
        self.setup()
        dataset = self._val_dataset(*_rank_world(self.rank, self.world_size))
        return _ResumableLoader(dataset, num_workers=self.num_workers, pin_memory=self.pin_memory)

    def _val_dataset(self, rank: int, world: int) -> TrajectoryDataset:
        """The held-out trajectories, in order, every sample kept (see ``val_dataloader``)."""
        options = {**self.options, "shuffle": False, "drop_last": False, "val_trajectories": None}
        return self._dataset(rank, world, trajectories=self.options["val_trajectories"], **options)

    def _dataset(self, rank: int, world: int, **options: Any) -> TrajectoryDataset:
        """A TrajectoryDataset from the data module's options (``val_trajectories`` held out)."""
        exclude = options.pop("val_trajectories", None)
        return TrajectoryDataset(self.cache, rank=rank, world_size=world, exclude_trajectories=exclude, **options)

    def _make_loader(self, epoch: int, skip: int) -> _ResumableLoader:
        self.setup()
        rank, world = _rank_world(self.rank, self.world_size)
        dataset = self._dataset(rank, world, **self.options)
        return _ResumableLoader(
            dataset,
            epoch,
            skip,
            epoch_length=self._epoch_length,
            layout=self._current_layout(),
            restore=self._restore,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
        )

    def _current_layout(self, world_size: int | None = None) -> dict[str, Any]:
        world = world_size or _rank_world(self.rank, self.world_size)[1]
        return {"world_size": world, "num_workers": self.num_workers, **self.options}

    def check_resume(self, checkpoint: Mapping[str, Any], world_size: int) -> None:
        """Judge a checkpoint's data position against this layout before anything is written (MPQCLI's
        resume checks; ``world_size``: the trainer's devices x nodes, as no process group exists yet)."""
        state = checkpoint.get(type(self).__qualname__)
        if isinstance(state, Mapping) and "epoch" in state:
            self._restore(state, world_size)

    def _epoch_length(self) -> float:
        """Batches after which the trainer ends a training epoch (``limit_train_batches``)."""
        return getattr(self.trainer, "num_training_batches", float("inf"))

    def state_dict(self) -> dict[str, Any]:
        if self._loader is None:
            return {**self._position, "layout": self._current_layout()}
        return self._loader.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._position = self._restore(state_dict)
        if self._loader is not None:
            self._loader.load_state_dict(state_dict)

    def _restore(self, state: Mapping[str, Any], world_size: int | None = None) -> dict[str, int]:
        """The position to continue from. Mid-epoch, the delivered batches only identify the delivered
        samples under the saved layout (world size, batch size, workers, selection, shuffling): another
        layout is refused rather than skipping or repeating samples, or, with ``on_layout_change:
        next_epoch``, continues with the next epoch (the rest of the interrupted one is skipped). At an
        epoch's end any layout continues with the next epoch."""
        epoch, batches = int(state["epoch"]), int(state["batches"])
        if batches == 0 or state.get("layout") is None:
            return {"epoch": epoch, "batches": batches}
        saved = {**_LAYOUT_DEFAULTS, **state["layout"]}
        current = self._current_layout(world_size)
        changed = [k for k in _ORDER_KEYS if k in saved and saved[k] != current[k]]
        if not changed:
            return {"epoch": epoch, "batches": batches}
        if batches >= self._saved_epoch_batches(saved):  # saved at the end of an epoch (older checkpoints)
            return {"epoch": epoch + 1, "batches": 0}
        if self.on_layout_change == "next_epoch":
            fn = self.trainer.state.fn if self.trainer is not None else None
            if fn in (None, "fit"):  # a stand-alone validation restores the position but never trains
                rank_zero_warn(f"TrajectoryDataModule: data layout changed mid-epoch ({', '.join(changed)}); the "
                               f"rest of epoch {epoch} is skipped and training continues with epoch {epoch + 1}")
            return {"epoch": epoch + 1, "batches": 0}
        raise ValueError(
            f"TrajectoryDataModule ({self.cache_dir}): the checkpoint stopped in the middle of epoch {epoch} "
            f"({batches} batches delivered on each rank) with another data layout: "
            + "; ".join(f"{k}: saved {saved[k]!r}, now {current[k]!r}" for k in changed)
            + ". The rest of that epoch is only defined for the saved layout (another one would skip or repeat "
            "samples): resume with the saved values (world_size = trainer devices x num_nodes; the others are "
            "data.init_args keys), or set data.init_args.on_layout_change next_epoch to skip the rest of the "
            "epoch."
        )

    def _saved_epoch_batches(self, layout: Mapping[str, Any]) -> float:
        """Batches per epoch and rank under a saved layout (inf when it cannot be rebuilt)."""
        self.setup()
        try:
            options = {**{k: layout[k] for k in self.options}, "teacher_output": False}
            return len(self._dataset(0, layout["world_size"], **options))
        except (KeyError, TypeError, ValueError):
            return float("inf")


# -------------------------------------------------------------------------------------------------
# On-the-fly trajectories (EfficientDM / MPQ-DM): teacher-forced sampling, one batch per sampler step
# -------------------------------------------------------------------------------------------------


class TeacherForcedTrajectories:
    """Samples trajectories with the teacher and yields one batch per sampler step, i = 0..S-1 in order.

    Trajectory batch g (counted across epochs) on rank r holds trajectories j = (g·W + r)·B + b,
    b < batch_size, starting from x_T = randn(latent_shape, seed + j) with condition row
    randint(N, seed + j) (random_conditions) or j % N. Each batch is the teacher's call at that step:
    x_t [R, ...] (R = 2B with guidance: cond rows then uncond rows, as `models.sampling.sample`),
    t, step_index, cond, teacher_output (raw), branch, trajectory, cond_index; x_t is then advanced
    with the teacher's guided prediction (teacher forcing), exactly like `sample` with the same noise.

    An iterable with `len()` (batches per epoch) and `state_dict()` / `load_state_dict()`: return it
    from `train_dataloader()` and Lightning checkpoints the position; resuming mid-trajectory replays
    the teacher up to that step. Runs in the main process on the teacher's device.
    """

    def __init__(
        self,
        teacher: Denoiser,
        conditions: Mapping[str, torch.Tensor] | None = None,
        uncond: Mapping[str, torch.Tensor] | None = None,
        *,
        scheduler: str | None = None,
        scheduler_config: Mapping[str, Any] | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        cfg_channels: int | None = None,
        eta: float = 0.0,
        batch_size: int = 4,
        trajectories_per_epoch: int = 4,
        seed: int = 0,
        random_conditions: bool = True,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        spec = teacher.default_scheduler
        default = scheduler is None
        self.teacher = teacher
        self.scheduler_name = spec["name"] if default else scheduler
        self.scheduler_config = dict(spec["config"] if default else (scheduler_config or {}))
        self.steps = sampler_steps(scheduler, num_inference_steps, teacher)
        if not self.steps:
            raise ValueError(f"set num_inference_steps for scheduler {scheduler!r}")
        self.guidance_scale = float(guidance_scale if guidance_scale is not None else spec.get("guidance_scale", 1.0))
        self.cfg_channels, self.eta = cfg_channels, eta
        self.conditions = dict(conditions or {})
        sizes = {len(v) for v in self.conditions.values()}
        if len(sizes) > 1:
            raise ValueError(f"condition tensors have different row counts {sizes}")
        self.num_conditions = sizes.pop() if sizes else 1
        self.uncond = dict(uncond) if uncond is not None else None
        self.batch_size, self.seed, self.random_conditions = batch_size, seed, random_conditions
        self.rank, self.world_size = _rank_world(rank, world_size)
        self.batches_per_epoch = trajectories_per_epoch // (batch_size * self.world_size)
        if self.batches_per_epoch < 1:
            raise ValueError(
                f"trajectories_per_epoch {trajectories_per_epoch} < batch_size {batch_size} x world size {self.world_size}"
            )
        self.position = 0  # batches delivered since the start (all epochs)

    def __len__(self) -> int:
        return self.batches_per_epoch * self.steps

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position}

    def load_state_dict(self, state_dict: Mapping[str, int]) -> None:
        self.position = int(state_dict["position"])

    def trajectory_inputs(
        self, group: int
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor] | None, torch.Tensor, torch.Tensor]:
        """(noise, cond, uncond, trajectory ids, condition rows) of trajectory batch `group` on this rank."""
        param = next(self.teacher.parameters())
        first = (group * self.world_size + self.rank) * self.batch_size
        ids = torch.arange(first, first + self.batch_size)
        generators = [torch.Generator().manual_seed(self.seed + int(j)) for j in ids]
        noise = torch.stack([torch.randn(self.teacher.latent_shape, generator=g) for g in generators])
        if self.random_conditions:
            rows = torch.stack([torch.randint(self.num_conditions, (), generator=g) for g in generators])
        else:
            rows = ids % self.num_conditions
        cond = {k: v[rows].to(param.device) for k, v in self.conditions.items()}
        uncond = None
        if self.guidance_scale != 1.0:
            uncond = (
                {k: v[rows].to(param.device) for k, v in self.uncond.items()}
                if self.uncond is not None
                else self.teacher.null_cond(cond)
            )
        return noise.to(param.device, param.dtype), cond, uncond, ids, rows

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if get_worker_info() is not None:
            raise RuntimeError("TeacherForcedTrajectories runs the teacher: use it in the main process (num_workers=0)")
        epoch_end = (self.position // len(self) + 1) * len(self)
        while self.position < epoch_end:
            group, step = divmod(self.position, self.steps)
            for i, batch in enumerate(self._trajectory(group)):
                if i >= step:
                    self.position += 1
                    yield batch

    @torch.no_grad()
    def _trajectory(self, group: int) -> Iterator[dict[str, Any]]:
        """The teacher-forced sampling loop of `models.sampling.sample`, yielding each step's call."""
        teacher = self.teacher
        noise, cond, uncond, ids, rows = self.trajectory_inputs(group)
        scheduler = make_scheduler(self.scheduler_name, **self.scheduler_config)
        scheduler.set_timesteps(self.steps, device=noise.device)
        use_cfg = self.guidance_scale != 1.0
        model_cond = _cat_cond(cond, uncond) if use_cfg else cond
        takes_variance = _takes_variance(scheduler, teacher)
        predicted = teacher.in_channels if teacher.learned_sigma else teacher.out_channels
        channels = self.cfg_channels or teacher.cfg_channels or predicted
        generator = torch.Generator(noise.device).manual_seed(mix_seed(self.seed, int(ids[0]), 1))
        step = SchedulerStep(scheduler, generator, self.eta)
        scale_input = getattr(scheduler, "scale_model_input", lambda x, t: x)
        repeat = 2 if use_cfg else 1
        x = noise * getattr(scheduler, "init_noise_sigma", 1.0)
        for i, t in enumerate(scheduler.timesteps):
            x_in = scale_input(x, t)
            x_in = torch.cat([x_in] * repeat)
            step_index = torch.full((len(x_in),), i, dtype=torch.long, device=x.device)
            out = teacher(x_in, t.expand(len(x_in)), model_cond, step_index)
            batch = {
                "x_t": x_in,
                "t": t.expand(len(x_in)).clone(),
                "step_index": step_index,
                "cond": model_cond,
                "teacher_output": out,
                "branch": torch.arange(repeat).repeat_interleave(len(ids)),
                "trajectory": ids.repeat(repeat),
                "cond_index": rows.repeat(repeat),
                "step_index_host": [i] * len(x_in),  # for the memory queue, without a GPU sync
            }
            if use_cfg:
                out = guide(*out.chunk(2), self.guidance_scale, channels)
            x = step(out if takes_variance else out[:, :predicted], i, t, x)
            yield batch


class _FromTheStart:
    """A TeacherForcedTrajectories stream that starts from its first batch at every pass (validation
    sees the same trajectories each time, where the training stream moves on to the next epoch)."""

    def __init__(self, stream: TeacherForcedTrajectories) -> None:
        self.stream = stream

    def __len__(self) -> int:
        return len(self.stream)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self.stream.position = 0
        return iter(self.stream)


# -------------------------------------------------------------------------------------------------
# On-the-fly DataModule (EfficientDM / MPQ-DM recipe): no cache, the teacher samples during training
# -------------------------------------------------------------------------------------------------


class OnTheFlyDataModule(L.LightningDataModule):
    """Teacher-forced trajectories sampled during training, one batch per sampler step in order
    (so TRD's time smoothing over consecutive steps applies), trajectory j seeded ``seed + j``.

    The teacher is handed over by ``prepare_cache(teacher)`` (``MPQCLI.before_fit``; call it
    yourself with the QATModule's ``teacher`` outside the CLI). Conditions: ``class_labels``,
    ``cond_path`` (precomputed embeddings file, as for the cache) or ``random_conditions`` rows.
    Calibration draws from a separate stream (seed offset 10^6) so training data is unchanged by it.
    ``val_trajectories`` > 0 adds validation on that many trajectories of a third stream (seed offset
    2·10^6): the same trajectories at every validation, sampled by the teacher each time.
    """

    def __init__(
        self,
        scheduler: str | None = None,
        scheduler_config: dict[str, Any] | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        cfg_channels: int | None = None,
        eta: float = 0.0,
        batch_size: int = 4,
        trajectories_per_epoch: int = 64,
        seed: int = 0,
        class_labels: list[int] | None = None,
        cond_path: str | None = None,
        random_conditions: int | None = None,
        val_trajectories: int = 0,
    ) -> None:
        super().__init__()
        check_numbers("data.init_args", locals(), counts=("batch_size", "trajectories_per_epoch"))
        if val_trajectories < 0 or 0 < val_trajectories < batch_size:
            raise ValueError(f"data.init_args.val_trajectories={val_trajectories}: 0 (no validation) or at least "
                             f"data.init_args.batch_size={batch_size} (one trajectory batch per rank)")
        self.val_trajectories = val_trajectories
        self.stream_args = dict(
            scheduler=scheduler, scheduler_config=scheduler_config, num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale, cfg_channels=cfg_channels, eta=eta, batch_size=batch_size,
            trajectories_per_epoch=trajectories_per_epoch,
        )
        self.seed = seed
        self.recipe = TrajectoryRecipe(name="on-the-fly", class_labels=class_labels, cond_path=cond_path,
                                       random_conditions=random_conditions, seed=seed)
        self.teacher: Denoiser | None = None
        self._stream: TeacherForcedTrajectories | None = None
        self._position = 0

    @property
    def batch_size(self) -> int:
        """Trajectories per batch and rank (``data.init_args.batch_size``; with guidance a batch holds
        twice as many rows, cond then uncond)."""
        return self.stream_args["batch_size"]

    def prepare_cache(self, teacher: Denoiser) -> None:
        """Keep the (frozen) teacher and build the condition table; nothing is written to disk."""
        from mpq_lightning.data.trajectories import _conditions

        self.teacher = teacher
        cfg = (self.stream_args["guidance_scale"] if self.stream_args["guidance_scale"] is not None
               else teacher.default_scheduler.get("guidance_scale", 1.0)) != 1.0
        table, _ = _conditions(self.recipe, teacher, cfg)
        self.cond = {k[5:]: v for k, v in table.items() if k.startswith("cond.")}
        self.uncond = {k[7:]: v for k, v in table.items() if k.startswith("uncond.")} or None

    def _make(self, seed: int, **overrides: Any) -> TeacherForcedTrajectories:
        if self.teacher is None:
            raise RuntimeError("OnTheFlyDataModule needs the teacher: call prepare_cache(teacher) before fitting")
        return TeacherForcedTrajectories(self.teacher, self.cond, self.uncond, seed=seed,
                                         random_conditions=False, **{**self.stream_args, **overrides})

    @property
    def has_validation(self) -> bool:
        """Whether ``val_dataloader`` serves anything (``val_trajectories`` set)."""
        return bool(self.val_trajectories)

    def val_dataloader(self) -> "_FromTheStart | list":
        """``val_trajectories`` held-out trajectories (their own seeds), the same ones at every
        validation; an empty list, so no validation, without them."""
        if not self.val_trajectories:
            return []
        try:
            stream = self._make(self.seed + 2 * 10**6, trajectories_per_epoch=self.val_trajectories)
        except ValueError as err:
            raise ValueError(f"data.init_args.val_trajectories={self.val_trajectories}: {err}") from err
        return _FromTheStart(stream)

    def train_dataloader(self) -> TeacherForcedTrajectories:
        if self._stream is None:
            self._stream = self._make(self.seed)
            self._stream.position = self._position
        return self._stream

    def calibration_dataloader(self) -> TeacherForcedTrajectories:
        return self._make(self.seed + 10**6)

    def sample_conditions(self, n: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
        if not self.cond:
            return {}, None
        rows = torch.arange(n) % len(next(iter(self.cond.values())))
        return {k: v[rows] for k, v in self.cond.items()}, ({k: v[rows] for k, v in self.uncond.items()} if self.uncond else None)

    def state_dict(self) -> dict[str, Any]:
        return {"position": self._stream.position if self._stream is not None else self._position}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._position = int(state_dict["position"])
        if self._stream is not None:
            self._stream.position = self._position
