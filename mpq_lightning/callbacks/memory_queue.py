"""Lightning callback owning MPQ-DMv2's time-aware pixel queue (MTRD memory).

Interface for the LightningModule (written separately)
------------------------------------------------------
Add the callback to the trainer::

    queue_cb = MemoryQueue(num_steps=20, pixels_per_step=256)
    trainer = L.Trainer(callbacks=[queue_cb, ...])

In :meth:`setup` the callback attaches itself and its queue to the module **without registering the queue
as a submodule** (so its buffers are not part of the model ``state_dict`` and DDP does not broadcast them):

* ``pl_module.memory_queue`` — the :class:`~mpq_lightning.losses.memory.TimeAwarePixelQueue`;
* ``pl_module.memory_queue_callback`` — this callback.

Per sampler step ``i`` in ``training_step`` (manual optimisation), the recommended order is::

    l_mem = self.mtrd(f_student, f_teacher, self.memory_queue)            # MemoryRelationLoss
    ...  backward / optimizer step  ...
    self.memory_queue_callback.enqueue_and_sync(f_teacher, step_index=i)  # after the loss

``enqueue_and_sync`` samples teacher pixels locally, then all-gathers every rank's pixels and writes them in
rank order, so every rank holds the same queue (call it on **every** rank, same number of times — it is a
collective under DDP). The queue is checkpointed through the callback's ``state_dict`` (Lightning stores it
under ``checkpoint['callbacks'][state_key]``), together with the callback's sampling generator state.
"""

from __future__ import annotations

import warnings

from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from torch import Tensor

from mpq_lightning.losses.memory import TimeAwarePixelQueue

__all__ = ["MemoryQueue"]


class MemoryQueue(Callback):
    """Owns a :class:`TimeAwarePixelQueue`, exposes it to the module, syncs it across ranks, checkpoints it.

    Args:
        num_steps: sampler steps (queue slots).
        pixels_per_step: slot capacity (paper value unknown; default 256).
        dim: feature dimension (``None``: from the first enqueue).
        refresh: ``'replace'`` | ``'fifo'`` (see :class:`TimeAwarePixelQueue`).
        pixels_per_enqueue: pixels written per step slot and write, **summed over ranks** (default
            ``pixels_per_step``). Each rank samples that many; ranks at the same step share the write
            (``ceil(n / ranks)`` each, a prefix of each rank's random selection), a rank alone at its step
            writes all of its own. So a slot is refilled as fully as in one process whatever the ranks'
            steps (a shuffled cache puts them at different steps).
        attr_name: attribute name used on the LightningModule.
        seed: seed of the CPU generator used for pixel selection (offset by the global rank so ranks draw
            different pixels); ``None`` uses the global RNG.
    """

    def __init__(
        self,
        num_steps: int,
        pixels_per_step: int = 256,
        dim: int | None = None,
        refresh: Literal["replace", "fifo"] = "replace",
        pixels_per_enqueue: int | None = None,
        attr_name: str = "memory_queue",
        seed: int | None = 3407,
    ) -> None:
        super().__init__()
        self.queue = TimeAwarePixelQueue(
            num_steps=num_steps,
            pixels_per_step=pixels_per_step,
            dim=dim,
            refresh=refresh,
            pixels_per_enqueue=pixels_per_enqueue,
        )
        self.attr_name = attr_name
        self.seed = seed
        self.generator: torch.Generator | None = torch.Generator().manual_seed(seed) if seed is not None else None
        self._trainer: Any = None
        self._pl_module: Any = None
        self._generator_fixed = False  # set once rank-seeded in setup() or restored from a checkpoint

    # ----------------------------------------------------------------------------------------------
    @property
    def state_key(self) -> str:
        return self._generate_state_key(attr_name=self.attr_name)

    def _world_size(self) -> int:
        if self._trainer is not None:
            return int(getattr(self._trainer, "world_size", 1))
        if dist.is_available() and dist.is_initialized():
            return dist.get_world_size()
        return 1

    def _global_rank(self) -> int:
        if self._trainer is not None:
            return int(getattr(self._trainer, "global_rank", 0))
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank()
        return 0

    def _to_device(self, device: torch.device) -> None:
        if self.queue.feats.device != device:
            self.queue.to(device)

    def attach(self, pl_module: Any) -> None:
        """Expose the queue and this callback on ``pl_module`` (not as a registered submodule)."""
        object.__setattr__(pl_module, self.attr_name, self.queue)
        object.__setattr__(pl_module, f"{self.attr_name}_callback", self)
        self._pl_module = pl_module
        device = getattr(pl_module, "device", None)
        if isinstance(device, torch.device):
            self._to_device(device)

    # ----------------------------------------------------------------------------------------------
    # Lightning hooks
    # ----------------------------------------------------------------------------------------------
    def setup(self, trainer, pl_module, stage: str) -> None:
        self._trainer = trainer
        self.attach(pl_module)
        # offset the seed by the rank once; never override a generator state restored from a checkpoint
        if self.seed is not None and not self._generator_fixed:
            self.generator = torch.Generator().manual_seed(self.seed + self._global_rank())
        self._generator_fixed = True

    def on_fit_start(self, trainer, pl_module) -> None:  # model is on its device by now
        self.attach(pl_module)

    def on_train_start(self, trainer, pl_module) -> None:
        self.attach(pl_module)

    def state_dict(self) -> dict[str, Any]:
        state = {
            "queue": {k: v.detach().cpu() if isinstance(v, Tensor) else v for k, v in self.queue.state_dict().items()},
            "generator": self.generator.get_state() if self.generator is not None else None,
        }
        if state["generator"] is not None and self._world_size() > 1 and self._pl_module is not None:
            # every rank draws its own pixels: keep every rank's generator (Lightning builds the checkpoint
            # on every rank, so this collective runs everywhere; rank 0 writes it)
            gathered = self._pl_module.all_gather(state["generator"].to(self._pl_module.device))
            state["generators"] = [g.cpu().clone() for g in gathered]  # own storage: set_state reads from its start
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.queue.load_state_dict(state_dict["queue"])
        gen_state = state_dict.get("generator")
        per_rank = state_dict.get("generators")
        if per_rank is not None:
            rank, world = self._global_rank(), self._world_size()
            if len(per_rank) == world:
                gen_state = per_rank[rank].clone()
            else:
                warnings.warn(f"MemoryQueue: checkpoint of {len(per_rank)} ranks resumed on {world}: pixel sampling "
                              "is reseeded per rank, so it differs from the original run", stacklevel=2)
                gen_state = torch.Generator().manual_seed((self.seed or 0) + rank + 7919 * len(per_rank)).get_state()
        if gen_state is not None:
            if self.generator is None:
                self.generator = torch.Generator()
            self.generator.set_state(gen_state)
            self._generator_fixed = True

    # ----------------------------------------------------------------------------------------------
    # API for the LightningModule
    # ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def enqueue_and_sync(
        self,
        features: Tensor,
        step_index: int,
        num: int | None = None,
        channel_dim: int = 1,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Sample teacher pixels of ``features`` locally, all-gather across ranks, write in rank order.

        Uses ``pl_module.all_gather`` when attached to a trainer with world size > 1, else
        ``torch.distributed`` if initialised, else a local write. Collective: call on every rank.

        Returns:
            The vectors written this call (all ranks, rank order), ``[k_total, C]``.
        """
        return self.enqueue_many_and_sync([features], [step_index], num, channel_dim, generator)[0]

    def enqueue_many_and_sync(
        self,
        features: Sequence[Tensor] | Tensor,
        steps: Sequence[int],
        num: int | None = None,
        channel_dim: int = 1,
        generator: torch.Generator | None = None,
    ) -> list[Tensor]:
        """``enqueue_and_sync(features[i], steps[i])`` for i = 0, 1, ... (e.g. each sample of a batch at
        its own step): the same pixels drawn and the same writes in the same order, with one gather of
        all of them (one collective and one host sync under DDP instead of two collectives and a few syncs
        per call). A tensor ``features`` stands for its rows ``features[i : i + 1]``. Collective: every
        rank, the same number of calls and the same ``num``."""
        if len(features) != len(steps):
            raise ValueError(f"enqueue_many_and_sync: {len(features)} features for {len(steps)} steps")
        if not len(steps):
            return []
        self._to_device(features[0].device)
        world = self._world_size()
        if num is None:  # all_gather_ shares a slot's write among the ranks at that step
            num = self.queue.pixels_per_enqueue
        draw = generator if generator is not None else self.generator
        if isinstance(features, Tensor):  # a batch: the same draws as sample by sample, gathered at once
            vectors = list(self.queue.select_pixels(features, num=num, generator=draw, channel_dim=channel_dim,
                                                    per_sample=True))
        else:
            vectors = [self.queue.select_pixels(f, num=num, generator=draw, channel_dim=channel_dim) for f in features]
        gather_fn = None
        if world > 1 and self._trainer is not None and self._pl_module is not None:
            gather_fn = self._pl_module.all_gather
        # every rank draws at most num pixels per call (num is the same everywhere): one collective
        return self.queue.all_gather_many_(vectors, steps, gather_fn=gather_fn, max_count=num)

    def sample(self, num: int, mode: Literal["time_wise", "uniform"] = "time_wise", generator=None):
        """Shortcut for ``queue.sample`` with this callback's generator."""
        return self.queue.sample(num, mode=mode, generator=generator if generator is not None else self.generator)
