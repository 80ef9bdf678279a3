"""MPQ-DMv2's online time-aware pixel queue (MTRD memory).

Spec: papers_extra.md §1.1 (framework figure, which **corrects** mpqdm.md §4.3's single-FIFO proposal):
"Pixel Caching at Timestep N" → "Online Time-aware Pixel Queue" with **one slot per timestep**
(T = N … 1) guarded by a **Refreshing Gate** → "Time-wise Pixel Sampling". The figure gives no sizes; the
paper's queue length, pixels per step and refresh rule are **unknown**. Choices made here (all switchable):

* ``num_steps`` slots (one per sampler step index), each holding up to ``pixels_per_step`` (default 256)
  L2-normalised, detached **teacher** pixel vectors. 256 × 20 steps = 5120 entries, the same order as CIRKD's
  pixel memory per class and enough for a 4096-entry contrast draw.
* Refreshing gate ``refresh='replace'`` (default, the inferred reading of the figure): when a step index is
  enqueued again, its slot is emptied and refilled, so the memory always holds the most recent visit of
  every step (spanning the whole trajectory and persisting across trajectories).
  ``refresh='fifo'``: the slot is a ring buffer; new vectors overwrite the oldest ones of that slot.
* Every written vector gets a global, monotonically increasing write stamp (``write_order``) so FIFO age is
  observable and checkpointed; ``step_tags`` holds the step index of every entry (``-1`` = empty).

Distributed training: every rank samples pixels from its own teacher feature, then :meth:`all_gather_`
gathers every rank's vectors and writes them **in rank order** on every rank, so all queues stay identical
(as CIRKD's ``concat_all_gather`` before enqueue). All buffers are persistent (checkpointed).
"""

from __future__ import annotations

from typing import Callable, Literal, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

__all__ = ["TimeAwarePixelQueue", "host_to_device"]

GatherFn = Callable[[Tensor], Tensor]


def host_to_device(t: Tensor, device: torch.device | str) -> Tensor:
    """A host tensor (an index drawn with a CPU generator) on ``device``, without making the host
    wait for the work queued on the GPU: a copy from pageable memory waits for the stream, one from
    pinned memory does not (the caching host allocator keeps the pinned block until the copy has
    run). Elsewhere a plain ``to``."""
    device = torch.device(device)
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _dist_world_size(group=None) -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(group)
    return 1


def _dist_gather(t: Tensor, group=None) -> Tensor:
    """``torch.distributed.all_gather`` → ``[world, *t.shape]``."""
    out = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, t.contiguous(), group=group)
    return torch.stack(out)


# ==================================================================================================
# Queue
# ==================================================================================================


class TimeAwarePixelQueue(nn.Module):
    """One slot of teacher pixel embeddings per sampler step, with a refreshing gate.

    Buffers (all persistent):

    * ``feats`` ``[num_steps, P, C]`` float32 — the vectors (``C = 0`` until the first enqueue if ``dim`` is
      not given; loading a state dict materialises it).
    * ``valid`` ``[num_steps, P]`` bool, ``step_tags`` ``[num_steps, P]`` long (``-1`` empty),
      ``write_order`` ``[num_steps, P]`` long (global write stamp, ``-1`` empty),
      ``ptr`` ``[num_steps]`` long (next ring position per slot), ``refresh_count`` ``[num_steps]`` long
      (how often each slot was written), ``num_writes`` ``[]`` long (global write counter).

    Args:
        num_steps: number of sampler steps (slots), e.g. 20 DDIM steps.
        pixels_per_step: slot capacity P (paper value unknown; default 256).
        dim: feature dimension C (``None``: taken from the first enqueue).
        refresh: ``'replace'`` (refreshing gate empties the slot when its step comes again) or ``'fifo'``
            (ring buffer inside the slot; oldest entries are overwritten first).
        pixels_per_enqueue: default number of pixels sampled per :meth:`enqueue` (default ``P``).
    """

    def __init__(
        self,
        num_steps: int,
        pixels_per_step: int = 256,
        dim: int | None = None,
        refresh: Literal["replace", "fifo"] = "replace",
        pixels_per_enqueue: int | None = None,
    ) -> None:
        super().__init__()
        if num_steps <= 0 or pixels_per_step <= 0:
            raise ValueError(
                f"TimeAwarePixelQueue: num_steps ({num_steps}) and pixels_per_step ({pixels_per_step}) must be > 0"
            )
        if refresh not in ("replace", "fifo"):
            raise ValueError(f"TimeAwarePixelQueue: refresh must be 'replace' or 'fifo', got {refresh!r}")
        if dim is not None and dim <= 0:
            raise ValueError(f"TimeAwarePixelQueue: dim must be positive, got {dim}")
        self.num_steps = num_steps
        self.pixels_per_step = pixels_per_step
        self.refresh = refresh
        self.pixels_per_enqueue = pixels_per_enqueue or pixels_per_step
        s, p = num_steps, pixels_per_step
        self.register_buffer("feats", torch.zeros(s, p, dim or 0))
        self.register_buffer("valid", torch.zeros(s, p, dtype=torch.bool))
        self.register_buffer("step_tags", torch.full((s, p), -1, dtype=torch.long))
        self.register_buffer("write_order", torch.full((s, p), -1, dtype=torch.long))
        self.register_buffer("ptr", torch.zeros(s, dtype=torch.long))
        self.register_buffer("refresh_count", torch.zeros(s, dtype=torch.long))
        self.register_buffer("num_writes", torch.zeros((), dtype=torch.long))
        # the host's copy of each slot's fill and ``ptr``: writing and sampling work out positions from
        # it, so they never read the buffers back from the device (a GPU sync each); rebuilt from the
        # buffers (one read) after a state dict is loaded, see _host_state
        self._host: tuple[list[int], list[int]] | None = ([0] * s, [0] * s)

    # ----------------------------------------------------------------------------------------------
    # Introspection
    # ----------------------------------------------------------------------------------------------
    @property
    def dim(self) -> int | None:
        """Feature dimension, or ``None`` before the first enqueue."""
        c = self.feats.shape[-1]
        return c if c > 0 else None

    @property
    def num_valid(self) -> int:
        return int(self.valid.sum())

    def __len__(self) -> int:
        return self.num_valid

    def slot_counts(self) -> Tensor:
        """Number of filled entries per step slot, ``[num_steps]``."""
        return self.valid.sum(dim=1)

    @torch.no_grad()
    def reset(self) -> None:
        """Empty the queue (keeps ``dim``)."""
        self.feats.zero_()
        self.valid.fill_(False)
        self.step_tags.fill_(-1)
        self.write_order.fill_(-1)
        self.ptr.zero_()
        self.refresh_count.zero_()
        self.num_writes.zero_()
        self._host = ([0] * self.num_steps, [0] * self.num_steps)

    def _host_state(self) -> tuple[list[int], list[int]]:
        """``(fill, ptr)``: the number of filled entries and the ring pointer of every slot, as ints on
        the host. The gate fills a slot from position 0 on (``replace``: 0 … k−1; ``fifo``: the ring
        from 0, full once it wraps), so a slot's filled entries are the first ``fill`` positions. Kept
        in step with the buffers by every write; read from them once where unknown (after loading a
        state dict). Edit the buffers only through the write methods, or set ``_host = None`` after
        editing them by hand."""
        if self._host is None:
            valid = self.valid.detach().cpu()
            fill = valid.sum(dim=1)
            if not all(bool(valid[s, :n].all()) for s, n in enumerate(fill.tolist())):
                raise ValueError("TimeAwarePixelQueue: the filled entries of a slot must be its first positions "
                                 f"(valid per slot: {valid.int().tolist()}); edit the queue through its write methods")
            self._host = (fill.tolist(), self.ptr.tolist())
        return self._host

    def extra_repr(self) -> str:
        return (
            f"num_steps={self.num_steps}, pixels_per_step={self.pixels_per_step}, dim={self.dim}, "
            f"refresh={self.refresh!r}, pixels_per_enqueue={self.pixels_per_enqueue}"
        )

    # ----------------------------------------------------------------------------------------------
    # Pixel selection and writing
    # ----------------------------------------------------------------------------------------------
    def _check_step(self, step_index: int) -> int:
        step_index = int(step_index)
        if not 0 <= step_index < self.num_steps:
            raise ValueError(f"step_index must be in [0, {self.num_steps}), got {step_index}")
        return step_index

    def _pixel_table(self, features: Tensor, num: int | None, channel_dim: int, name: str,
                     per_sample: bool) -> tuple[Tensor, int]:
        """``features`` as pixel rows, ``[M, C]`` (every sample's pixels together) or, ``per_sample``,
        ``[B, N, C]``, detached; and the number to draw (``num`` or ``pixels_per_enqueue``), checked."""
        x = features.detach()
        if x.dim() < 2 + per_sample:
            raise ValueError(f"{name}: features of shape {tuple(x.shape)} need >= {2 + per_sample} dims")
        if channel_dim == 1:
            pix = rearrange(x, "b c ... -> b (...) c" if per_sample else "b c ... -> (b ...) c")
        elif channel_dim in (-1, x.dim() - 1):
            pix = rearrange(x, "b ... c -> b (...) c" if per_sample else "... c -> (...) c")
        else:
            raise ValueError(f"{name}: channel_dim must be 1 or -1, got {channel_dim}")
        if self.dim is not None and pix.shape[-1] != self.dim:
            raise ValueError(
                f"{name}: features of shape {tuple(features.shape)} have {pix.shape[-1]} channels, queue dim is {self.dim}"
            )
        num = self.pixels_per_enqueue if num is None else int(num)
        if num <= 0:
            raise ValueError(f"{name}: num must be positive, got {num}")
        return pix, num

    @torch.no_grad()
    def select_pixels(
        self,
        features: Tensor,
        num: int | None = None,
        generator: torch.Generator | None = None,
        channel_dim: int = 1,
        per_sample: bool = False,
    ) -> Tensor:
        """Sample ``num`` pixel vectors (without replacement) from a teacher feature; nothing is written.

        Args:
            features: ``[B, C, *spatial]`` (``channel_dim=1``), ``[B, N, C]`` or ``[M, C]`` (``channel_dim=-1``).
            num: number of pixels (default ``pixels_per_enqueue``; all pixels if fewer are available).
            generator: CPU generator.
            per_sample: draw ``num`` of each sample's own pixels: ``select_pixels(features[i : i + 1])``
                for i = 0, 1, ..., the same draws from ``generator`` in the same order, stacked, with one
                gather and one normalisation for the batch instead of one each per sample.

        Returns:
            ``[k, C]`` (``per_sample``: ``[B, k, C]``) detached, fp32, L2-normalised vectors on the
            feature's device.
        """
        pix, num = self._pixel_table(features, num, channel_dim, "select_pixels", per_sample)
        n = pix.shape[-2]
        if num < n and per_sample:
            idx = torch.stack([torch.randperm(n, generator=generator)[:num] for _ in range(pix.shape[0])])
            pix = pix.gather(1, host_to_device(idx, pix.device)[..., None].expand(-1, -1, pix.shape[2]))
        elif num < n:
            pix = pix[host_to_device(torch.randperm(n, generator=generator)[:num], pix.device)]
        return F.normalize(pix.float(), p=2, dim=-1)

    @torch.no_grad()
    def _materialize(self, dim: int, device: torch.device) -> None:
        if self.dim is None:
            self.feats = torch.zeros(self.num_steps, self.pixels_per_step, dim, device=device, dtype=self.feats.dtype)

    @torch.no_grad()
    def write_(self, vectors: Tensor, step_index: int) -> None:
        """Write already-selected vectors ``[k, C]`` into the slot of ``step_index`` (refreshing gate applies).

        ``replace``: the slot is emptied first, the vectors fill positions ``0 … k−1``. ``fifo``: the vectors go
        to the ring positions ``ptr, ptr+1, …`` (mod P), overwriting the oldest entries. If ``k > P`` only the
        last ``P`` vectors are kept in both modes.
        """
        self.write_many_([vectors], [step_index])

    @torch.no_grad()
    def write_many_(self, vectors: Sequence[Tensor], steps: Sequence[int]) -> None:
        """``write_(vectors[i], steps[i])`` for i = 0, 1, ... in that order (several may share a step),
        as one write of each buffer: the positions are worked out on the host from its copy of the
        slots' fill and ``ptr`` (committed once the buffers are written), so nothing is read back
        from the device."""
        steps = [self._check_step(st) for st in steps]
        if len(vectors) != len(steps):
            raise ValueError(f"write_many_: {len(vectors)} vector sets for {len(steps)} steps")
        for v in vectors:
            if v.dim() != 2:
                raise ValueError(f"write_: vectors must be [k, C], got shape {tuple(v.shape)}")
        if not vectors:
            return
        self._materialize(vectors[0].shape[1], self.feats.device)
        for v in vectors:
            if v.shape[1] != self.dim:
                raise ValueError(f"write_: vectors of shape {tuple(v.shape)} do not match queue dim {self.dim}")
        fill, ptr = (list(v) for v in self._host_state())
        p = self.pixels_per_step
        final: dict[int, dict[int, int]] = {}  # slot -> {position: row of the concatenated vectors}
        emptied: set[int] = set()
        writes: dict[int, int] = {}  # slot -> writes this call (refresh_count)
        kept, rows = [], 0
        for v, st in zip(vectors, steps):
            k = v.shape[0]
            if k == 0:  # nothing written, the gate does not fire
                continue
            if k > p:
                v, k = v[-p:], p
            kept.append(v)
            if self.refresh == "replace":
                emptied.add(st)
                final[st], start, fill[st] = {}, 0, 0
            else:
                start = ptr[st]
            end = start + k  # ring positions start .. end - 1 (mod P)
            ptr[st], fill[st] = end % p, min(fill[st] + k, p)
            final.setdefault(st, {}).update(zip([*range(start, min(end, p)), *range(end - p)], range(rows, rows + k)))
            writes[st] = writes.get(st, 0) + 1
            rows += k
        if not kept:
            return
        slots, gone = sorted(final), sorted(emptied)
        at_slot = [st for st in slots for _ in final[st]]
        # every index in one non-blocking copy: slot, position and source row of each entry written
        # (the row is its write stamp too, counted from num_writes), the emptied slots, the slots
        # written, their new pointers and write counts
        flat = torch.tensor([*at_slot, *(q for st in slots for q in final[st]), *(r for st in slots for r in final[st].values()),
                             *gone, *slots, *(ptr[st] for st in slots), *(writes[st] for st in slots)], dtype=torch.long)
        flat = host_to_device(flat, self.feats.device)
        m, e, t = len(at_slot), len(gone), len(slots)
        at_slot, at_pos, row, gone, touched, new_ptr, count = flat.split([m, m, m, e, t, t, t])
        # no Python scalar assigned through an index: ``t[i] = 0`` copies the scalar from host memory
        # first, which on a GPU makes the host wait (one sync each, counted by benchmarks/host_syncs.py)
        if e:
            self.feats.index_fill_(0, gone, 0)
            self.valid.index_fill_(0, gone, False)
            self.step_tags.index_fill_(0, gone, -1)
            self.write_order.index_fill_(0, gone, -1)
        self.feats[at_slot, at_pos] = torch.cat(kept).to(device=self.feats.device, dtype=self.feats.dtype)[row]
        self.valid[at_slot, at_pos] = torch.ones_like(at_slot, dtype=torch.bool)
        self.step_tags[at_slot, at_pos] = at_slot
        self.write_order[at_slot, at_pos] = self.num_writes + row
        self.num_writes += rows
        self.ptr[touched] = new_ptr
        self.refresh_count[touched] += count
        self._host = (fill, ptr)

    @torch.no_grad()
    def enqueue(
        self,
        features: Tensor,
        step_index: int,
        generator: torch.Generator | None = None,
        num: int | None = None,
        channel_dim: int = 1,
    ) -> Tensor:
        """Sample ``num`` teacher pixels of ``features`` and write them to slot ``step_index`` (local only).

        Returns the written ``[k, C]`` vectors. For multi-process training use
        :meth:`select_pixels` + :meth:`all_gather_` (or ``MemoryQueue.enqueue_and_sync``).
        """
        vectors = self.select_pixels(features, num=num, generator=generator, channel_dim=channel_dim)
        self.write_(vectors, step_index)
        return vectors

    # ----------------------------------------------------------------------------------------------
    # Distributed synchronisation
    # ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def all_gather_(
        self,
        vectors: Tensor,
        step_index: int,
        gather_fn: GatherFn | None = None,
        group=None,
    ) -> Tensor:
        """Gather every rank's selected vectors and write them on every rank in rank order.

        Without ``gather_fn`` this uses ``torch.distributed`` if it is initialised with world size > 1, and
        otherwise just writes the local vectors. ``gather_fn(t)`` may be e.g. ``LightningModule.all_gather``
        (returns ``[world, *t.shape]``; a result without the world dimension is treated as world size 1).
        Ranks may contribute different numbers of vectors (padded internally) and different step indices;
        vectors of the same step are concatenated in rank order and written at once (so ``replace`` keeps
        all ranks' contributions of this step). When the ranks at one step bring more than a slot holds,
        each keeps the first ``ceil(P / ranks at that step)`` of its vectors (a uniform random subset, as
        they were drawn without replacement), so every rank is represented.

        Returns:
            The gathered vectors, concatenated in rank order, ``[Σ k_r, C]``.
        """
        return self.all_gather_many_([vectors], [step_index], gather_fn, group)[0]

    @torch.no_grad()
    def all_gather_many_(
        self,
        vectors: Sequence[Tensor],
        steps: Sequence[int],
        gather_fn: GatherFn | None = None,
        group=None,
        max_count: int | None = None,
    ) -> list[Tensor]:
        """``all_gather_(vectors[i], steps[i])`` for i = 0, 1, ... in one go: the same writes in the same
        order, with one host sync in all instead of a few per call (a batch's samples, each at its own
        step). Every rank passes the same number of calls.

        The ranks' vector counts are not known to each other, so by default a first collective gathers
        each call's count and step, and a second the vectors padded to the largest count. ``max_count``,
        a bound on every call's count that every rank passes alike (e.g. the number of pixels drawn per
        sample), saves the first: each call's count and step travel in front of its vectors, padded to
        the bound, in one collective (as floating point, exact for integers below 2**24).

        Returns:
            Per call, the gathered vectors concatenated in rank order.
        """
        steps = [self._check_step(s) for s in steps]
        if len(vectors) != len(steps):
            raise ValueError(f"all_gather_many_: {len(vectors)} vector sets for {len(steps)} steps")
        for v in vectors:
            if v.dim() != 2:
                raise ValueError(f"all_gather_: vectors must be [k, C], got shape {tuple(v.shape)}")
        if not vectors:
            return []
        if gather_fn is None:
            if _dist_world_size(group) <= 1:
                self.write_many_(vectors, steps)
                return list(vectors)

            def gather_fn(t: Tensor) -> Tensor:
                return _dist_gather(t, group)

        first = vectors[0]
        dim = first.shape[1]
        if max_count is None:  # two collectives: the counts and steps, then the vectors padded to the largest count
            meta = torch.tensor([[v.shape[0], s] for v, s in zip(vectors, steps)], dtype=torch.long, device=first.device)
            metas = gather_fn(meta)
            if metas.dim() == 2:  # world size 1
                metas = metas.unsqueeze(0)
            metas = metas.tolist()  # [rank][call] = [count, step]: the one host sync
            kmax = max(count for rank in metas for count, _ in rank)
            padded = first.new_zeros(len(vectors), kmax, dim)
            for i, v in enumerate(vectors):
                padded[i, : v.shape[0]] = v
            gathered = gather_fn(padded)
            if gathered.dim() == 3:
                gathered = gathered.unsqueeze(0)
        else:  # one collective: row i = [count, step, vectors padded to max_count]
            max_count = int(max_count)
            for v in vectors:
                if v.shape[0] > max_count:
                    raise ValueError(f"all_gather_many_: {v.shape[0]} vectors of shape {tuple(v.shape)} exceed max_count {max_count}")
            if max(max_count, *steps) >= 2**24:
                raise ValueError(f"all_gather_many_: max_count {max_count} or a step index >= 2**24 is not exact as a float")
            dtype = torch.promote_types(first.dtype, torch.float32)
            packed = first.new_zeros(len(vectors), 2 + max_count * dim, dtype=dtype)
            packed[:, :2] = host_to_device(torch.tensor([[v.shape[0], s] for v, s in zip(vectors, steps)], dtype=dtype),
                                           first.device)
            for i, v in enumerate(vectors):
                packed[i, 2 : 2 + v.numel()] = v.reshape(-1)
            gathered = gather_fn(packed)
            if gathered.dim() == 2:  # world size 1
                gathered = gathered.unsqueeze(0)
            metas = gathered[..., :2].long().tolist()  # [rank][call] = [count, step]: the one host sync
            gathered = gathered[..., 2:].reshape(*gathered.shape[:2], max_count, dim).to(first.dtype)
        out, writes, write_steps = [], [], []
        for i in range(len(vectors)):  # each call's writes, in call order, as separate all_gather_ calls make them
            per_rank = [gathered[r, i, : metas[r][i][0]] for r in range(len(metas))]
            rank_steps = [metas[r][i][1] for r in range(len(metas))]
            for s in dict.fromkeys(rank_steps):  # unique steps, first-appearance (rank) order
                parts = [v for v, st in zip(per_rank, rank_steps) if st == s]
                if sum(v.shape[0] for v in parts) > self.pixels_per_step:
                    share = -(-self.pixels_per_step // len(parts))
                    parts = [v[:share] for v in parts]
                writes.append(torch.cat(parts))
                write_steps.append(s)
            out.append(torch.cat(per_rank))
        self.write_many_(writes, write_steps)
        return out

    # ----------------------------------------------------------------------------------------------
    # Sampling
    # ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(
        self,
        num: int,
        mode: Literal["time_wise", "uniform"] = "time_wise",
        generator: torch.Generator | None = None,
        steps: Sequence[int] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Draw up to ``num`` stored vectors without replacement.

        ``'time_wise'`` (v2 figure's "time-wise pixel sampling"): ``num`` is split equally over the filled step
        slots (the remainder goes to randomly chosen slots), then each slot is sampled uniformly — every
        timestep is represented equally regardless of fill level. ``'uniform'``: uniform over all filled
        entries. Output is grouped by step (ascending) in ``time_wise`` mode and in random order otherwise.

        Args:
            num: number of vectors requested (fewer are returned if the queue holds fewer).
            mode: ``'time_wise'`` | ``'uniform'``.
            generator: CPU generator.
            steps: restrict sampling to these step slots.

        Returns:
            ``(vectors [n, C], step_tags [n])`` on the queue's device.
        """
        if mode not in ("time_wise", "uniform"):
            raise ValueError(f"sample: mode must be 'time_wise' or 'uniform', got {mode!r}")
        if num < 0:
            raise ValueError(f"sample: num must be >= 0, got {num}")
        if self.dim is None:  # nothing enqueued yet (lazy dim)
            return self.feats.new_zeros(0, 0), self.step_tags.new_zeros(0)
        fill = list(self._host_state()[0])  # the host's copy: no read from the device
        if steps is not None:
            keep = {self._check_step(s) for s in steps}
            fill = [n if s in keep else 0 for s, n in enumerate(fill)]
        p = self.pixels_per_step
        if mode == "uniform":
            flat = torch.tensor([s * p + i for s, n in enumerate(fill) for i in range(n)], dtype=torch.long)
            n = min(num, flat.numel())
            idx = flat[torch.randperm(flat.numel(), generator=generator)[:n]]
        else:
            slots = [s for s, n in enumerate(fill) if n]
            parts: list[Tensor] = []
            if slots and num > 0:
                base, rem = divmod(num, len(slots))
                extra = set(torch.randperm(len(slots), generator=generator)[:rem].tolist())
                for j, s in enumerate(slots):  # a slot's filled entries are its first fill[s] positions
                    q = min(base + (1 if j in extra else 0), fill[s])
                    if q > 0:
                        parts.append(s * p + torch.randperm(fill[s], generator=generator)[:q])
            idx = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)
        idx = host_to_device(idx, self.feats.device)
        c = self.feats.shape[-1]
        vectors = self.feats.reshape(-1, c)[idx]
        tags = self.step_tags.reshape(-1)[idx]
        return vectors, tags

    # ----------------------------------------------------------------------------------------------
    # Checkpointing
    # ----------------------------------------------------------------------------------------------
    def get_extra_state(self) -> dict:
        return {"num_steps": self.num_steps, "pixels_per_step": self.pixels_per_step, "refresh": self.refresh}

    def set_extra_state(self, state: dict) -> None:
        if state.get("num_steps") != self.num_steps or state.get("pixels_per_step") != self.pixels_per_step:
            raise ValueError(
                f"TimeAwarePixelQueue: checkpoint has num_steps={state.get('num_steps')}, "
                f"pixels_per_step={state.get('pixels_per_step')}; this queue has num_steps={self.num_steps}, "
                f"pixels_per_step={self.pixels_per_step}"
            )

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        key = prefix + "feats"
        incoming = state_dict.get(key)
        if (
            incoming is not None
            and incoming.dim() == 3
            and incoming.shape[:2] == self.feats.shape[:2]
            and incoming.shape[2] != self.feats.shape[2]
            and 0 in (incoming.shape[2], self.feats.shape[2])
        ):  # lazy dim on either side
            self.feats = torch.zeros(incoming.shape, device=self.feats.device, dtype=self.feats.dtype)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        self._host = None  # rebuilt from the loaded buffers when next needed
