"""Tests for the MPQ-DMv2 time-aware pixel queue and its Lightning callback (CPU only).

Spec: papers_extra.md §1.1 (one slot per timestep, refreshing gate, time-wise sampling).
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from mpq_lightning.callbacks import MemoryQueue
from mpq_lightning.losses import TimeAwarePixelQueue

# ==================================================================================================
# Helpers
# ==================================================================================================


def _ids(n: int, c: int = 4, start: int = 0) -> torch.Tensor:
    """``[n, c]`` rows that are distinguishable after L2 normalisation (one-hot-ish + id)."""
    x = torch.zeros(n, c)
    x[:, 0] = 1.0
    x[:, 1] = torch.arange(start, start + n, dtype=torch.float32)
    return x


def _row_id(v: torch.Tensor) -> torch.Tensor:
    return torch.round(v[..., 1] / v[..., 0])


# ==================================================================================================
# Single-process behaviour
# ==================================================================================================


def test_step_tags_and_normalisation():
    q = TimeAwarePixelQueue(num_steps=5, pixels_per_step=6)
    assert q.dim is None and len(q) == 0
    g = torch.Generator().manual_seed(0)
    q.enqueue(torch.randn(2, 3, 4, 4), step_index=3, generator=g)
    q.enqueue(torch.randn(2, 3, 4, 4), step_index=0, generator=g, num=4)
    assert q.dim == 3
    assert q.slot_counts().tolist() == [4, 0, 0, 6, 0]
    assert torch.equal(q.step_tags[q.valid], torch.tensor([0] * 4 + [3] * 6))
    assert (q.step_tags[~q.valid] == -1).all()
    torch.testing.assert_close(q.feats[q.valid].norm(dim=-1), torch.ones(10))
    vec, tags = q.sample(100, mode="uniform", generator=g)
    assert vec.shape == (10, 3) and sorted(tags.tolist()) == [0] * 4 + [3] * 6
    for v, s in zip(vec, tags):  # every returned vector really lives in the slot named by its tag
        assert (q.feats[s][q.valid[s]] == v).all(dim=-1).any()


def test_refresh_gate_replaces_slot():
    q = TimeAwarePixelQueue(num_steps=3, pixels_per_step=4, refresh="replace")
    q.enqueue(_ids(4, start=0), 1, channel_dim=-1)
    q.enqueue(_ids(4, start=100), 2, channel_dim=-1)
    q.enqueue(_ids(2, start=10), 1, channel_dim=-1)  # step 1 comes again → slot 1 refreshed
    assert q.valid[1].tolist() == [True, True, False, False]
    assert _row_id(q.feats[1, :2]).tolist() == [10, 11]
    assert _row_id(q.feats[2]).tolist() == [100, 101, 102, 103]  # other slot untouched
    assert q.refresh_count.tolist() == [0, 2, 1]
    assert q.write_order[1, :2].tolist() == [8, 9] and q.num_writes.item() == 10


def test_fifo_replaces_oldest_first():
    q = TimeAwarePixelQueue(num_steps=2, pixels_per_step=4, refresh="fifo")
    for k in range(3):  # writes ids 0,1 | 2,3 | 4,5 into the same 4-entry ring
        q.enqueue(_ids(2, start=2 * k), 0, channel_dim=-1)
    assert q.valid[0].all()
    assert _row_id(q.feats[0]).tolist() == [4, 5, 2, 3]  # 0,1 (oldest) overwritten
    assert q.write_order[0].tolist() == [4, 5, 2, 3]
    q.enqueue(_ids(1, start=6), 0, channel_dim=-1)  # next oldest (id 2) goes
    assert _row_id(q.feats[0]).tolist() == [4, 5, 6, 3]
    assert q.ptr[0].item() == 3
    # more than P vectors at once: only the newest P survive
    q.enqueue(_ids(6, start=20), 1, channel_dim=-1, num=6)
    assert sorted(_row_id(q.feats[1]).tolist()) == [22, 23, 24, 25]


def test_time_wise_and_uniform_sampling():
    q = TimeAwarePixelQueue(num_steps=4, pixels_per_step=8, dim=3)
    g = torch.Generator().manual_seed(0)
    for s, n in ((0, 8), (1, 8), (3, 2)):
        q.enqueue(torch.randn(1, 3, 4, 4), s, generator=g, num=n)
    _, tags = q.sample(12, mode="time_wise", generator=g)
    assert torch.bincount(tags, minlength=4).tolist() == [4, 4, 0, 2]  # slot 3 only holds 2
    _, tags = q.sample(7, mode="time_wise", generator=g)
    counts = torch.bincount(tags, minlength=4).tolist()
    assert sum(counts) == 7 and all(c in (2, 3) for c in counts[:2] + counts[3:]) and counts[2] == 0
    vec, tags = q.sample(30, mode="uniform", generator=g)
    assert vec.shape == (18, 3)
    _, tags = q.sample(5, mode="time_wise", generator=g, steps=[1])
    assert tags.tolist() == [1] * 5
    with pytest.raises(ValueError, match="mode"):
        q.sample(3, mode="bogus")


def test_state_dict_round_trip_gives_identical_samples():
    q = TimeAwarePixelQueue(num_steps=4, pixels_per_step=5, refresh="fifo")
    g = torch.Generator().manual_seed(1)
    for s in (3, 2, 3, 0):
        q.enqueue(torch.randn(2, 6, 3, 3), s, generator=g, num=3)
    buf = io.BytesIO()
    torch.save(q.state_dict(), buf)
    buf.seek(0)
    fresh = TimeAwarePixelQueue(num_steps=4, pixels_per_step=5, refresh="fifo")  # lazy dim
    fresh.load_state_dict(torch.load(buf, weights_only=False))
    for name, b in q.named_buffers():
        assert torch.equal(b, getattr(fresh, name)), name
    for mode in ("time_wise", "uniform"):
        a = q.sample(7, mode=mode, generator=torch.Generator().manual_seed(42))
        b = fresh.sample(7, mode=mode, generator=torch.Generator().manual_seed(42))
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    with pytest.raises(ValueError, match="num_steps"):
        TimeAwarePixelQueue(num_steps=3, pixels_per_step=5).load_state_dict(q.state_dict())


def test_validation_errors_name_shapes():
    q = TimeAwarePixelQueue(num_steps=2, pixels_per_step=4, dim=3)
    with pytest.raises(ValueError, match=r"\(1, 5, 2, 2\)"):
        q.enqueue(torch.randn(1, 5, 2, 2), 0)
    with pytest.raises(ValueError, match="step_index"):
        q.enqueue(torch.randn(1, 3, 2, 2), 2)


def test_all_gather_without_distributed_is_local_write():
    q = TimeAwarePixelQueue(num_steps=2, pixels_per_step=4)
    v = F.normalize(torch.randn(3, 5), dim=-1)
    out = q.all_gather_(v, 1)
    assert torch.equal(out, v) and torch.equal(q.feats[1, :3], v)


def test_one_collective_gather_with_a_count_bound_writes_what_two_do():
    """``max_count`` packs each call's count and step in front of its vectors: one gather instead of
    two, the same queue and the same returned vectors (here a fake 2-rank gather, ranks with different
    counts and steps, some at the same step as another rank, fifo and a slot overflowing)."""
    g = torch.Generator().manual_seed(0)
    mine = [F.normalize(torch.randn(k, 5, generator=g), dim=-1) for k in (3, 0, 4, 2)]
    other = [F.normalize(torch.randn(k, 5, generator=g), dim=-1) for k in (4, 4, 1, 3)]
    steps_mine, steps_other = [1, 0, 2, 1], [1, 2, 0, 1]
    calls = []

    def fake_gather(t):  # this rank is rank 0; rank 1 packs its own calls the same way
        calls.append(t.shape)
        if t.dtype == torch.long:  # the counts and steps
            o = torch.tensor([[v.shape[0], s] for v, s in zip(other, steps_other)])
        elif t.dim() == 3:  # the vectors padded to the largest count
            o = torch.zeros_like(t)
            for i, v in enumerate(other):
                o[i, : len(v)] = v
        else:  # packed: [count, step, vectors padded to max_count]
            o = torch.zeros_like(t)
            for i, (v, s) in enumerate(zip(other, steps_other)):
                o[i, :2] = torch.tensor([len(v), s])
                o[i, 2 : 2 + v.numel()] = v.reshape(-1)
        return torch.stack([t, o])

    two, one = (TimeAwarePixelQueue(num_steps=3, pixels_per_step=6, refresh="fifo") for _ in range(2))
    out_two = two.all_gather_many_(mine, steps_mine, gather_fn=fake_gather)
    assert len(calls) == 2
    out_one = one.all_gather_many_(mine, steps_mine, gather_fn=fake_gather, max_count=4)
    assert len(calls) == 3 and calls[-1] == (4, 2 + 4 * 5)
    for a, b in zip(out_two, out_one):
        assert torch.equal(a, b)
    for (name, a), b in zip(two.named_buffers(), one.buffers()):
        assert torch.equal(a, b), name
    # slot 1: 3 + 4 > 6, each rank keeps 3, then 2 + 3; slot 2: 4 + 4 in a ring of 6; slot 0: 0, then 1
    assert one.valid.sum(dim=1).tolist() == [1, 6, 6] and one.num_writes.item() == 6 + 4 + 4 + 1 + 5
    with pytest.raises(ValueError, match=r"\(4, 5\) exceed max_count 3"):
        one.all_gather_many_(mine, steps_mine, gather_fn=fake_gather, max_count=3)


def _reference_writes(num_steps: int, p: int, refresh: str, writes) -> dict:
    """The queue's buffers after ``writes`` (``(vectors, step)`` in order), worked out entry by entry
    from the documented gate (replace: empty the slot, fill 0..k-1; fifo: ring from ptr; k > P: last P)."""
    c = writes[0][0].shape[1]
    feats, valid = torch.zeros(num_steps, p, c), torch.zeros(num_steps, p, dtype=torch.bool)
    tags, order = torch.full((num_steps, p), -1), torch.full((num_steps, p), -1)
    ptr, count, n = [0] * num_steps, [0] * num_steps, 0
    for v, s in writes:
        if len(v) == 0:
            continue
        v = v[-p:]
        if refresh == "replace":
            feats[s], valid[s], tags[s], order[s], ptr[s] = 0, False, -1, -1, 0
        for row in v:
            feats[s, ptr[s]], valid[s, ptr[s]], tags[s, ptr[s]], order[s, ptr[s]] = row, True, s, n
            ptr[s], n = (ptr[s] + 1) % p, n + 1
        count[s] += 1
    return {"feats": feats, "valid": valid, "step_tags": tags, "write_order": order, "ptr": torch.tensor(ptr),
            "refresh_count": torch.tensor(count), "num_writes": torch.tensor(n)}


@pytest.mark.parametrize("refresh", ["replace", "fifo"])
def test_writes_of_a_batch_at_once_equal_one_write_each_and_the_gate(refresh):
    """``write_many_`` (a batch's writes as one set of device writes, positions worked out on the host)
    leaves every buffer as the writes one by one do, and as the documented gate says, whatever the mix:
    several writes to one slot, more vectors than a slot holds, empty writes; the host's copy of
    ``valid`` and ``ptr`` stays equal to the buffers."""
    g = torch.Generator().manual_seed(0)
    p, steps = 5, 4
    many, one = (TimeAwarePixelQueue(num_steps=steps, pixels_per_step=p, refresh=refresh) for _ in range(2))
    history = []
    for _ in range(6):
        batch = [(torch.randn(int(torch.randint(0, 8, (), generator=g)), 3, generator=g),
                  int(torch.randint(0, steps, (), generator=g))) for _ in range(4)]
        batch.append((torch.randn(3, 3, generator=g), batch[0][1]))  # always one slot written twice
        many.write_many_([v for v, _ in batch], [s for _, s in batch])
        for v, s in batch:
            one.write_(v, s)
        history += batch
        ref = _reference_writes(steps, p, refresh, history)
        for name, want in ref.items():
            assert torch.equal(getattr(many, name), want), name
            assert torch.equal(getattr(one, name), want), name
        assert many._host_state() == (many.valid.sum(1).tolist(), many.ptr.tolist())


def test_a_batchs_pixels_are_drawn_as_sample_by_sample():
    q = TimeAwarePixelQueue(num_steps=2, pixels_per_step=8)
    for feats, cdim in ((torch.randn(3, 6, 4, 5), 1), (torch.randn(3, 20, 6), -1)):
        got = q.select_pixels(feats, num=7, generator=torch.Generator().manual_seed(3), channel_dim=cdim, per_sample=True)
        g = torch.Generator().manual_seed(3)
        want = torch.stack([q.select_pixels(feats[i : i + 1], num=7, generator=g, channel_dim=cdim) for i in range(3)])
        assert got.shape == (3, 7, 6) and torch.equal(got, want)
    with pytest.raises(ValueError, match=r"\(3, 6\) need >= 3 dims"):
        q.select_pixels(torch.randn(3, 6), per_sample=True)


def test_writing_and_sampling_the_queue_read_nothing_back_from_the_device():
    """The MTRD step (sample the memory, relate, enqueue the batch) with the queue and the features on
    the ``meta`` device, where any read of a tensor's values raises: it needs none, so on a GPU it
    costs no host sync. A queue loaded from a state dict reads its buffers once, then samples as the
    original does."""
    from mpq_lightning.losses import MemoryRelationLoss

    for refresh in ("replace", "fifo"):
        cb = MemoryQueue(num_steps=5, pixels_per_step=8, refresh=refresh, seed=0)
        mtrd = MemoryRelationLoss(anchors=10, memory_samples=12, channel_dim=-1, seed=0)
        f = torch.randn(3, 16, 6, device="meta")
        for step in range(4):
            loss = mtrd(f, f, cb.queue)
            cb.enqueue_many_and_sync(f, [step, 2, 2], num=5, channel_dim=-1)
        assert loss.device.type == "meta" and cb.queue._host_state()[0] == [5, 5, 5 if refresh == "replace" else 8, 5, 0]
        with pytest.raises(NotImplementedError):  # the check is real: reading a meta tensor raises
            cb.queue.valid.tolist()
    q = TimeAwarePixelQueue(num_steps=3, pixels_per_step=4, refresh="fifo")
    q.write_many_([torch.randn(3, 2), torch.randn(6, 2)], [1, 2])
    restored = TimeAwarePixelQueue(num_steps=3, pixels_per_step=4, refresh="fifo")
    restored.load_state_dict(q.state_dict())
    assert restored._host is None
    a, b = (x.sample(5, generator=torch.Generator().manual_seed(0)) for x in (q, restored))
    assert torch.equal(a[0], b[0]) and restored._host_state()[1] == [0, 3, 0]
    state = q.state_dict()
    state["valid"][1] = torch.tensor([False, True, True, True])  # filled entries not the slot's first
    restored.load_state_dict(state)
    with pytest.raises(ValueError, match=r"first positions \(valid per slot: \[\[0, 0, 0, 0\], \[0, 1, 1, 1\]"):
        restored.sample(5)


# ==================================================================================================
# Two-process gloo test
# ==================================================================================================


def _gloo_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        torch.manual_seed(100 + rank)
        q = TimeAwarePixelQueue(num_steps=3, pixels_per_step=8, refresh="replace")
        g = torch.Generator().manual_seed(rank)
        last = None
        for step in (2, 1, 0, 2):
            feats = torch.randn(2, 4, 3, 3)  # different on each rank
            last = q.select_pixels(feats, num=3 + rank, generator=g)  # ranks contribute 3 and 4 vectors
            q.all_gather_(last, step)
        torch.save({"state": q.state_dict(), "last": last}, Path(out_dir) / f"queue{rank}.pt")

        cb = MemoryQueue(num_steps=3, pixels_per_step=8, refresh="fifo", seed=0)  # no trainer: torch.distributed
        for step in (0, 0, 1):
            cb.enqueue_and_sync(torch.randn(2, 4, 3, 3), step)
        torch.save(cb.queue.state_dict(), Path(out_dir) / f"cb{rank}.pt")

        apart = MemoryQueue(num_steps=3, pixels_per_step=8, seed=0)  # a shuffled stream: ranks at different steps
        apart.enqueue_and_sync(torch.randn(2, 4, 3, 3), step_index=rank)
        torch.save(apart.queue.state_dict(), Path(out_dir) / f"apart{rank}.pt")

        # a batch's samples enqueued one call each, and in one call (one gather): the same queue
        one, many = (MemoryQueue(num_steps=3, pixels_per_step=8, refresh=refresh, seed=0) for refresh in ("fifo", "fifo"))
        feats = torch.randn(3, 4, 3, 3, generator=torch.Generator().manual_seed(7 + rank))
        steps = [rank, 2, rank]  # the ranks at different steps, then at the same step
        for i, step in enumerate(steps):
            one.enqueue_and_sync(feats[i : i + 1], step)
        many.enqueue_many_and_sync(feats, steps)
        # the callback's gather (one collective, counts bounded by num) against the unbounded two
        two = TimeAwarePixelQueue(num_steps=3, pixels_per_step=8, refresh="fifo")
        draws = MemoryQueue(num_steps=3, pixels_per_step=8, refresh="fifo", seed=0)
        two.all_gather_many_(list(draws.queue.select_pixels(feats, generator=draws.generator, per_sample=True)), steps)
        torch.save({"one": one.queue.state_dict(), "many": many.queue.state_dict(), "two": two.state_dict()},
                   Path(out_dir) / f"many{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(120)
def test_two_process_gloo_all_gather_keeps_queues_identical(tmp_path):
    mp.spawn(_gloo_worker, args=(2, str(tmp_path / "dist_init"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"queue{r}.pt", weights_only=False) for r in (0, 1))
    for k, v in r0["state"].items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, r1["state"][k]), k
    feats, valid = r0["state"]["feats"], r0["state"]["valid"]
    assert valid[2].sum() == 7  # slot 2 refreshed by the last step: rank 0's 3 then rank 1's 4 vectors
    assert torch.equal(feats[2, :3], r0["last"]) and torch.equal(feats[2, 3:7], r1["last"])
    assert not torch.equal(r0["last"][:3], r1["last"][:3])
    c0, c1 = (torch.load(tmp_path / f"cb{r}.pt", weights_only=False) for r in (0, 1))
    for k, v in c0.items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, c1[k]), k
    # each call writes 8 // 2 = 4 vectors per rank, 8 in all; slot 0's second write overwrote the first
    assert c0["valid"].sum(dim=1).tolist() == [8, 8, 0]
    assert sorted(c0["write_order"][0].tolist()) == list(range(8, 16))
    # ranks at different steps: each slot is refilled as fully as in one process (not 8 // 2)
    a0, a1 = (torch.load(tmp_path / f"apart{r}.pt", weights_only=False) for r in (0, 1))
    assert torch.equal(a0["feats"], a1["feats"])
    assert a0["valid"].sum(dim=1).tolist() == [8, 8, 0]
    # one gather for a whole batch writes exactly what one gather per sample writes, on every rank
    m0, m1 = (torch.load(tmp_path / f"many{r}.pt", weights_only=False) for r in (0, 1))
    for k, v in m0["one"].items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, m0["many"][k]) and torch.equal(v, m1["many"][k]) and torch.equal(v, m1["one"][k]), k
            assert torch.equal(v, m0["two"][k]) and torch.equal(v, m1["two"][k]), k
    assert m0["one"]["valid"].sum(dim=1).tolist() == [8, 8, 8]


# ==================================================================================================
# Lightning callback
# ==================================================================================================


def test_memory_queue_callback_state_round_trip_and_attach():
    import lightning.pytorch as pl

    class Tiny(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(2, 2)

    cb = MemoryQueue(num_steps=4, pixels_per_step=6, seed=3)
    module = Tiny()
    cb.setup(None, module, "fit")
    assert module.memory_queue is cb.queue and module.memory_queue_callback is cb
    assert all(not n.startswith("memory_queue") for n, _ in module.named_modules())
    assert not any(k.startswith("memory_queue") for k in module.state_dict())
    for s in (3, 1, 3):
        cb.enqueue_and_sync(torch.randn(2, 5, 3, 3), s)

    state = cb.state_dict()
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    restored = MemoryQueue(num_steps=4, pixels_per_step=6, seed=99)
    restored.load_state_dict(torch.load(buf, weights_only=False))
    for name, b in cb.queue.named_buffers():
        assert torch.equal(b, getattr(restored.queue, name)), name
    a, b = cb.sample(8), restored.sample(8)  # generator state restored too
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    # next enqueue draws the same pixels
    f = torch.randn(2, 5, 3, 3)
    assert torch.equal(cb.enqueue_and_sync(f, 0), restored.enqueue_and_sync(f, 0))
    assert cb.state_key == restored.state_key == "MemoryQueue{'attr_name': 'memory_queue'}"


@pytest.mark.filterwarnings("ignore:.*LeafSpec.*")
@pytest.mark.filterwarnings("ignore:.*dataloader is not resumable.*")
def test_memory_queue_callback_through_trainer_checkpoint(tmp_path):
    """The queue is filled from ``training_step``, saved in the Lightning checkpoint and restored on resume."""
    import lightning.pytorch as pl

    from mpq_lightning.losses import MemoryRelationLoss

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Conv2d(3, 4, 1)
            self.mtrd = MemoryRelationLoss(anchors=8, memory_samples=16, seed=0)

        def training_step(self, batch, batch_idx):
            f_s = self.proj(batch[0])
            f_t = f_s.detach() + 0.1
            loss = self.mtrd(f_s, f_t, self.memory_queue) + f_s.pow(2).mean()
            self.memory_queue_callback.enqueue_and_sync(f_t, step_index=batch_idx % 3)
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

        def train_dataloader(self):
            data = torch.utils.data.TensorDataset(torch.randn(8, 3, 4, 4))
            return torch.utils.data.DataLoader(data, batch_size=1)

    kw = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
              accelerator="cpu", devices=1)
    cb = MemoryQueue(num_steps=3, pixels_per_step=6)
    trainer = pl.Trainer(max_steps=4, callbacks=[cb], **kw)
    trainer.fit(Module())
    assert cb.queue.slot_counts().tolist() == [6, 6, 6] and cb.queue.num_writes.item() == 24
    ckpt = tmp_path / "last.ckpt"
    trainer.save_checkpoint(ckpt)
    assert cb.state_key in torch.load(ckpt, weights_only=False)["callbacks"]

    cb2 = MemoryQueue(num_steps=3, pixels_per_step=6)
    pl.Trainer(max_steps=5, callbacks=[cb2], **kw).fit(Module(), ckpt_path=ckpt)
    assert cb2.queue.num_writes.item() == 30  # 24 restored + one more step


def test_every_rank_resumes_its_own_pixel_generator():
    """Under DDP each rank samples its own pixels (seed + rank). The checkpoint keeps every rank's
    generator (all-gathered when rank 0's checkpoint is built), and a resumed rank r takes state r,
    not rank 0's (which would make all ranks draw the same pixels from then on)."""
    ranks = [MemoryQueue(num_steps=3, pixels_per_step=6, seed=5) for _ in range(2)]

    class Trainer:
        world_size = 2

        def __init__(self, rank):
            self.global_rank = rank

    class Module:  # what the callback uses of the LightningModule
        device = torch.device("cpu")

        def all_gather(self, tensor):
            return torch.stack([cb.generator.get_state() for cb in ranks])

    for rank, cb in enumerate(ranks):
        cb.setup(Trainer(rank), Module(), "fit")
        torch.rand(rank + 1, generator=cb.generator)  # training has drawn from both
    saved = ranks[0].state_dict()
    assert len(saved["generators"]) == 2
    expected = []
    for cb in ranks:
        continuation = torch.Generator()
        continuation.set_state(cb.generator.get_state())
        expected.append(torch.rand(4, generator=continuation))
    assert not torch.equal(expected[0], expected[1])
    for rank in range(2):
        resumed = MemoryQueue(num_steps=3, pixels_per_step=6, seed=5)
        resumed.setup(Trainer(rank), Module(), "fit")
        resumed.load_state_dict(saved)
        assert torch.equal(torch.rand(4, generator=resumed.generator), expected[rank])


@pytest.mark.parametrize("model", ["tiny-latte", "tiny-stdit"])
def test_module_enqueues_each_samples_own_teacher_pixels_at_its_step(model):
    """``compute_losses`` writes sample i's teacher pixels to the slot of sample i's step, whatever the
    feature site's layout: Latte's temporal site merges the sample axis with space ("(b s) f c")."""
    from mpq_lightning.models import random_cond
    from mpq_lightning.module import CalibConfig, LossConfig, QATModule
    from mpq_lightning.quant import QuantConfig

    torch.manual_seed(0)
    module = QATModule(model, {}, QuantConfig(w_bits=4, a_bits=8, num_steps=4, lora_rank=2), True,
                       LossConfig(mse_reduction="mean", mtrd=True, mtrd_anchors=16, mtrd_memory_samples=16),
                       calib=CalibConfig(num_batches=1))
    t = module.teacher
    batch = {"x_t": torch.randn(2, *t.latent_shape), "t": torch.tensor([900, 300]), "step_index": torch.tensor([1, 3]),
             "cond": random_cond(t, 2, 0, length=6, num_classes=3)}
    module.calibrate_from(type("DM", (), {"train_dataloader": lambda self: [batch]})())
    queue = MemoryQueue(num_steps=4, pixels_per_step=8)
    queue.attach(module)
    module.compute_losses(batch)
    f_t = module._feat_t.value.detach().float()
    if t.feature_layout.startswith("(b "):
        f_t = f_t.unflatten(0, (2, -1))
    own = [F.normalize(f_t[i].reshape(-1, f_t.shape[-1]) if module.feature_channel_dim == -1
                       else f_t[i].reshape(f_t.shape[1], -1).T, dim=-1) for i in range(2)]
    q = queue.queue
    for sample, step in ((0, 1), (1, 3)):
        written = q.feats[step][q.valid[step]]
        assert len(written) == 8
        for v in written:  # every vector is a pixel of its own sample, none of the other's
            assert (own[sample] - v).abs().amax(-1).min() < 1e-5
            assert (own[1 - sample] - v).abs().amax(-1).min() > 1e-4


def test_the_queue_reads_the_step_indices_from_the_data_modules_host_copy(tmp_path):
    """Both data modules hand the batch's step indices over as a host list too (``step_index_host``),
    and ``compute_losses`` writes the queue from it, not from the (GPU) tensor: no device-to-host sync
    per step for it. Without the list (a user's own data) the tensor is read."""
    from mpq_lightning.data import OnTheFlyDataModule, TrajectoryDataModule, synthesize_cache
    from mpq_lightning.models import random_cond
    from mpq_lightning.module import CalibConfig, LossConfig, QATModule
    from mpq_lightning.quant import QuantConfig

    cache = synthesize_cache(tmp_path / "c", (4, 4, 8, 8), 4, [0, 2, 4], shard_size=2, num_conditions=2)
    stream = OnTheFlyDataModule(scheduler="ddim", num_inference_steps=3, guidance_scale=4.0, batch_size=2,
                                trajectories_per_epoch=2, random_conditions=2)
    torch.manual_seed(0)
    module = QATModule("tiny-stdit", {}, QuantConfig(w_bits=4, a_bits=8, num_steps=4, lora_rank=2), True,
                       LossConfig(mse_reduction="mean", mtrd=True, mtrd_anchors=16, mtrd_memory_samples=16),
                       calib=CalibConfig(num_batches=1))
    stream.prepare_cache(module.teacher)
    for batch in [*TrajectoryDataModule(str(cache), batch_size=5).train_dataloader(), *stream.train_dataloader()]:
        assert batch["step_index_host"] == batch["step_index"].tolist()
    t = module.teacher
    batch = {"x_t": torch.randn(2, *t.latent_shape), "t": torch.tensor([900, 300]), "step_index": torch.tensor([1, 3]),
             "cond": random_cond(t, 2, 0)}
    module.calibrate_from(type("DM", (), {"train_dataloader": lambda self: [batch]})())
    for host, slots in (([0, 2], [8, 0, 8, 0]), (None, [0, 8, 0, 8])):
        queue = MemoryQueue(num_steps=4, pixels_per_step=8)
        queue.attach(module)
        module.compute_losses({**batch, "step_index_host": host} if host else batch)  # a disagreeing host copy decides
        assert queue.queue.valid.sum(dim=1).tolist() == slots


def test_cached_teacher_output_is_the_target_when_the_teacher_runs_for_features():
    """With MTRD the teacher runs for its features, but the ε-MSE / TMD target is still the cache's
    fp32 teacher output (a live forward runs under the trainer's autocast)."""
    from mpq_lightning.losses import output_mse
    from mpq_lightning.models import random_cond
    from mpq_lightning.module import CalibConfig, LossConfig, QATModule
    from mpq_lightning.quant import QuantConfig

    torch.manual_seed(0)
    module = QATModule("tiny-stdit", {"config": {"depth": 1}}, QuantConfig(w_bits=4, a_bits=8, num_steps=4, lora_rank=2),
                       True, LossConfig(mse_reduction="mean", mtrd=True, mtrd_anchors=16, mtrd_memory_samples=16),
                       calib=CalibConfig(num_batches=1))
    t = module.teacher
    batch = {"x_t": torch.randn(2, *t.latent_shape), "t": torch.tensor([900, 300]), "step_index": torch.tensor([1, 3]),
             "cond": random_cond(t, 2, 0, length=6, num_classes=3)}
    module.calibrate_from(type("DM", (), {"train_dataloader": lambda self: [batch]})())
    MemoryQueue(num_steps=4, pixels_per_step=8).attach(module)
    with torch.no_grad():
        live = t(batch["x_t"], batch["t"], batch["cond"], batch["step_index"])
    cached = live + 0.5  # distinguishable from the live forward
    out_s, out_t, f_s, f_t = module._student_teacher({**batch, "teacher_output": cached})
    assert torch.equal(out_t, cached) and f_t is not None and f_s is not None
    losses = module.compute_losses({**batch, "teacher_output": cached})
    torch.testing.assert_close(losses["mse"], output_mse(out_s.float(), cached.float(), reduction="mean"))


def test_trd_relates_the_pixels_of_each_sample_on_latte():
    """Latte's feature site is "(b s) f c": TRD relates all s·f pixels of a sample (the in-sample
    relation of MPQ-DM), not the f frames of each spatial position."""
    from mpq_lightning.losses.relation import relation_kl
    from mpq_lightning.models import random_cond
    from mpq_lightning.module import CalibConfig, LossConfig, QATModule
    from mpq_lightning.quant import QuantConfig

    torch.manual_seed(0)
    module = QATModule("tiny-latte", {}, QuantConfig(w_bits=4, a_bits=8, num_steps=4, lora_rank=2), True,
                       LossConfig(mse_reduction="mean", trd=True, trd_window=1), calib=CalibConfig(num_batches=1))
    t = module.teacher
    batch = {"x_t": torch.randn(2, *t.latent_shape), "t": torch.tensor([900, 300]), "step_index": torch.tensor([1, 3]),
             "cond": random_cond(t, 2, 0, length=6, num_classes=3)}
    module.calibrate_from(type("DM", (), {"train_dataloader": lambda self: [batch]})())
    losses = module.compute_losses(batch)
    f_s, f_t = module._feat_s.value.float(), module._feat_t.value.float()
    assert f_s.shape[0] == 2 * t.latent_shape[2] * t.latent_shape[3] // 4  # (b s): 2 samples x 16 positions
    per_sample = 100.0 * relation_kl(f_s.reshape(2, -1, f_s.shape[-1]), f_t.reshape(2, -1, f_t.shape[-1]), channel_dim=-1)
    per_position = 100.0 * relation_kl(f_s, f_t, channel_dim=-1)
    torch.testing.assert_close(losses["trd"], per_sample)
    assert not torch.allclose(losses["trd"], per_position)


@pytest.mark.parametrize("refresh", ["replace", "fifo"])
def test_writes_assign_no_python_scalar_through_an_index(refresh):
    """``t[idx] = 0`` hands the scalar to ``index_put_`` as a host tensor, copied to the device first:
    on the H100 each such line was one host sync per training step (benchmarks/host_syncs.py counted
    five in the queue's write). The writes use ``index_fill_`` and device-made values instead; this
    records every ``index_put_`` of a write and refuses a 0-dim value."""
    from torch.utils._python_dispatch import TorchDispatchMode

    scalars = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func._overloadpacket in (torch.ops.aten.index_put_, torch.ops.aten.index_put, torch.ops.aten._index_put_impl_):
                if args[2].dim() == 0:
                    scalars.append(str(func))
            return func(*args, **(kwargs or {}))

    q = TimeAwarePixelQueue(num_steps=3, pixels_per_step=4, refresh=refresh)
    g = torch.Generator().manual_seed(0)
    with Record():
        for _ in range(3):
            q.write_many_([torch.randn(3, 2, generator=g), torch.randn(5, 2, generator=g)], [0, 2])
    assert q.valid.any() and not scalars, scalars
