"""Digits / Moving-Digits datasets and the shipped digits teachers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mpq_lightning.data import digits
from mpq_lightning.data.digits import (
    DIRECTIONS,
    DigitsDataset,
    MovingDigitsDataset,
    bounce_positions,
    direction_index,
    load_digits_teacher,
    split_indices,
    stdit_class_cond,
)

# ---------------------------------------------------------------------------------------------------
# splits
# ---------------------------------------------------------------------------------------------------


def test_splits_fixed_and_disjoint():
    train, held = split_indices("train"), split_indices("heldout")
    assert train.tolist() == list(range(1438)) and held.tolist() == list(range(1438, 1797))
    assert not set(train) & set(held)
    assert sorted(np.concatenate([train, held]).tolist()) == split_indices("all").tolist()
    assert len(held) == round(0.2 * 1797)
    with pytest.raises(ValueError, match="split must be 'train', 'heldout' or 'all'; got 'validation-ish'"):
        split_indices("validation-ish")


def test_splits_match_sklearn_order():
    from sklearn.datasets import load_digits

    ref = load_digits()
    x, y = digits.digit_arrays("heldout")
    assert torch.equal(y, torch.from_numpy(ref.target[1438:]).long())
    assert torch.allclose(x, torch.from_numpy(ref.images[1438:]).float() / 16)


# ---------------------------------------------------------------------------------------------------
# Digits images
# ---------------------------------------------------------------------------------------------------


def test_digits_dataset_shapes_range_determinism():
    a, b = DigitsDataset("train"), DigitsDataset("train")
    held = DigitsDataset("heldout")
    assert (len(a), len(held)) == (1438, 359)
    item = a[5]
    assert item["x"].shape == (1, 16, 16) and item["x"].dtype == torch.float32
    assert item["label"].dtype == torch.int64
    xa, ya = a.tensors()
    xb, yb = b.tensors()
    assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert xa.min() == -1 and xa.max() <= 1 and xa.max() > 0.9
    assert set(ya.tolist()) == set(range(10)) and set(held.labels.tolist()) == set(range(10))
    # every image has its background at -1 (corners of the upsampled 8x8 digits are blank)
    assert (xa[:, 0, 0, 0] == -1).float().mean() > 0.95


def test_digits_upsampling_is_bilinear_of_the_raw_digit():
    x8, _ = digits.digit_arrays("train")
    ref = torch.nn.functional.interpolate(x8[:3, None], size=(16, 16), mode="bilinear", align_corners=False)
    assert torch.allclose(DigitsDataset("train").images[:3], ref.clamp(0, 1) * 2 - 1)


# ---------------------------------------------------------------------------------------------------
# Moving digits
# ---------------------------------------------------------------------------------------------------


def test_moving_digits_deterministic_shapes_range():
    a = MovingDigitsDataset("train", num_videos=20, seed=3)
    b = MovingDigitsDataset("train", num_videos=20, seed=3)
    c = MovingDigitsDataset("train", num_videos=20, seed=4)
    ta, tb, tc = a.tensors(), b.tensors(), c.tensors()
    for key in ta:
        assert torch.equal(ta[key], tb[key]), key
    assert not torch.equal(ta["x"], tc["x"])
    assert ta["x"].shape == (20, 1, 8, 16, 16)
    assert ta["x"].min() == -1 and ta["x"].max() <= 1
    assert torch.equal(a[7]["x"], ta["x"][7])  # random access == sequential
    assert len(MovingDigitsDataset("heldout")) == 359


def test_moving_digits_other_geometry():
    ds = MovingDigitsDataset("train", num_videos=4, frames=6, canvas=24, seed=0)
    assert ds[0]["x"].shape == (1, 6, 24, 24)
    with pytest.raises(ValueError, match="canvas 9 must be at least digit size"):
        MovingDigitsDataset("train", canvas=9)


def test_heldout_videos_only_show_heldout_digits():
    ds = MovingDigitsDataset("heldout", num_videos=200, seed=1)
    idx = ds.tensors()["digit_index"]
    assert idx.min() >= 1438 and idx.max() <= 1796
    ds = MovingDigitsDataset("train", num_videos=200, seed=1)
    assert ds.tensors()["digit_index"].max() < 1438


def test_bounce_positions_reflect():
    # x: 7 -> 9 reflects to 7 (v -> -2), 5, 3, ...; y: 0 -> -1 reflects to 1 (v -> +1), 2, ...
    pos = bounce_positions((7, 0), (2, -1), frames=5, limit=8)
    assert pos.tolist() == [[7, 0], [7, 1], [5, 2], [3, 3], [1, 4]]
    pos = bounce_positions((1, 8), (-2, 2), frames=4, limit=8)
    assert pos.tolist() == [[1, 8], [1, 6], [3, 4], [5, 2]]
    with pytest.raises(ValueError, match=r"velocity \(9, 0\) incompatible with limit 8"):
        bounce_positions((0, 0), (9, 0), frames=3, limit=8)


def test_bouncing_digit_stays_inside_and_moves_by_its_velocity():
    ds = MovingDigitsDataset("train", num_videos=300, seed=0)
    limit = ds.limit
    assert limit == 8
    seen_bounce = 0
    for i in range(len(ds)):
        item, p = ds[i], ds.params(i)
        pos, vel = item["position"].numpy(), np.array(p["velocity"])
        assert pos.min() >= 0 and pos.max() <= limit
        assert (pos[1] - pos[0]).tolist() == vel.tolist()  # the first step is never reflected
        assert item["direction"].item() == direction_index(tuple(vel.tolist()))
        assert DIRECTIONS[item["direction"]] == tuple(int(s) for s in np.sign(vel))
        # step by step: p' = p + v, reflected at the walls (velocity flips on that axis)
        v = vel.copy()
        for f in range(1, len(pos)):
            nxt = pos[f - 1] + v
            for a in range(2):
                if nxt[a] > limit:
                    nxt[a], v[a] = 2 * limit - nxt[a], -v[a]
                    seen_bounce += 1
                elif nxt[a] < 0:
                    nxt[a], v[a] = -nxt[a], -v[a]
                    seen_bounce += 1
            assert nxt.tolist() == pos[f].tolist()
        # the frames show the (whole) digit at those positions and nothing else
        digit = ds.images[p["k"]] * 2 - 1
        video = item["x"][0]
        for f, (x, y) in enumerate(pos):
            assert torch.equal(video[f, y : y + 8, x : x + 8], digit)
            outside = video[f].clone()
            outside[y : y + 8, x : x + 8] = -1
            assert (outside == -1).all()
    assert seen_bounce > 50
    dirs = ds.tensors()["direction"]
    assert set(dirs.tolist()) == set(range(8))


# ---------------------------------------------------------------------------------------------------
# shipped teachers
# ---------------------------------------------------------------------------------------------------


def test_assets_small():
    total = sum(p.stat().st_size for p in digits.ASSETS_DIR.iterdir() if p.is_file())
    assert total < 20e6


def test_load_unet_teacher():
    unet, meta = load_digits_teacher("unet")
    assert meta["name"] == "digits-unet" and meta["null_class"] == 10
    assert not unet.training and not any(p.requires_grad for p in unet.parameters())
    assert unet.config.num_class_embeds == 11 and unet.config.sample_size == 16
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        out = unet(x, torch.tensor([10, 500]), class_labels=torch.tensor([3, 10])).sample
    assert out.shape == (2, 1, 16, 16) and torch.isfinite(out).all()
    assert meta["scheduler"]["name"] == "DDIMScheduler"
    assert meta["quality"]["cfg1"]["class_consistency"] > 0.5
    assert load_digits_teacher("digits-unet")[1]["name"] == "digits-unet"


def test_load_stdit_teacher():
    model, meta = load_digits_teacher("stdit")
    assert meta["name"] == "moving-digits-stdit" and meta["cfg_channels"] == 1
    assert not model.training
    assert model.input_size == (8, 16, 16) and model.in_channels == 1 and model.out_channels == 2
    emb, mask = meta["class_embeddings"], meta["class_mask"]
    assert emb.shape == (10, 8, 128) and mask.shape == (10, 8)
    assert (mask.sum(1) >= 3).all() and (mask[:, 0] == 1).all()
    assert (emb[mask == 0] == 0).all()
    cond = stdit_class_cond(torch.tensor([0, 7]), meta)
    assert cond["y"].shape == (2, 1, 8, 128) and cond["mask"].shape == (2, 8)
    with torch.no_grad():
        out = model(torch.randn(2, 1, 8, 16, 16), torch.tensor([5, 900]), cond["y"], cond["mask"])
    assert out.shape == (2, 2, 8, 16, 16) and torch.isfinite(out).all()
    saved = json.loads((digits.ASSETS_DIR / "moving_digits_stdit.json").read_text())
    assert "quality" in saved and "class_embeddings" not in saved


def test_unknown_teacher():
    with pytest.raises(ValueError, match="unknown teacher .vae.; use one of"):
        load_digits_teacher("vae")


def test_shipped_teachers_run_in_the_project_sampler():
    from mpq_lightning.models.diffusers_adapters import UNet2DDenoiser
    from mpq_lightning.models.registry import STDiTDenoiser
    from mpq_lightning.models.sampling import make_scheduler, sample

    unet, meta = load_digits_teacher("unet")
    spec = meta["scheduler"]
    den = UNet2DDenoiser(unet, null_class=meta["null_class"], default_scheduler=spec)
    noise = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        x = sample(den, make_scheduler(spec["name"], **spec["config"]), noise, {"class_labels": torch.tensor([1, 2])},
                   guidance_scale=2.0, num_inference_steps=4)  # fmt: skip
    assert x.shape == (2, 1, 16, 16) and torch.isfinite(x).all()

    model, meta = load_digits_teacher("stdit")
    den = STDiTDenoiser(model)
    noise = torch.randn(2, 1, 8, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        x = sample(den, make_scheduler("iddpm-4"), noise, stdit_class_cond(torch.tensor([3, 4]), meta),
                   guidance_scale=meta["scheduler"]["guidance_scale"], cfg_channels=meta["cfg_channels"])  # fmt: skip
    assert x.shape == (2, 1, 8, 16, 16) and torch.isfinite(x).all()
