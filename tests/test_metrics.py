"""Feature networks and metric helpers (mpq_lightning.metrics) on real digits."""

from __future__ import annotations

import math

import pytest
import torch
from torchmetrics.image.fid import FrechetInceptionDistance

from mpq_lightning.data.digits import DigitsDataset, MovingDigitsDataset
from mpq_lightning.metrics import (
    ImageClassifier,
    ImageFeatureNet,
    VideoFeatureNet,
    class_consistency,
    frame_difference,
    frechet_distance,
    load_image_classifier,
    load_video_classifier,
    psnr_ssim,
    temporal_consistency,
)

# measured when training (see the JSON next to the weights): image 0.978, video digit 0.935 on 1077
# held-out videos, direction 1.000; the thresholds leave a margin
MIN_IMAGE_ACC = 0.95
MIN_VIDEO_DIGIT_ACC = 0.90
MIN_VIDEO_DIRECTION_ACC = 0.98


@pytest.fixture(scope="module")
def images():
    return {"train": DigitsDataset("train").tensors(), "heldout": DigitsDataset("heldout").tensors()}


@pytest.fixture(scope="module")
def videos():
    return {
        "train": MovingDigitsDataset("train", num_videos=300, seed=0).tensors(),
        "heldout": MovingDigitsDataset("heldout", num_videos=359, seed=0).tensors(),
    }


@pytest.fixture(scope="module")
def image_clf():
    return load_image_classifier()


@pytest.fixture(scope="module")
def video_clf():
    return load_video_classifier()


def test_shipped_classifiers_load(image_clf, video_clf):
    _, meta = load_image_classifier(with_meta=True)
    assert meta["accuracy"]["heldout"] >= MIN_IMAGE_ACC
    for clf in (image_clf, video_clf):
        assert not clf.training and not any(p.requires_grad for p in clf.parameters())
    assert image_clf(torch.rand(3, 1, 16, 16)).shape == (3, 10)
    logits = video_clf.logits(torch.rand(3, 1, 8, 16, 16))
    assert logits["digit"].shape == (3, 10) and logits["direction"].shape == (3, 8)


def test_image_classifier_heldout_accuracy(images, image_clf):
    x, y = images["heldout"]
    assert class_consistency(x, y, image_clf) >= MIN_IMAGE_ACC


def test_video_classifier_heldout_accuracy(videos, video_clf):
    v = videos["heldout"]
    assert class_consistency(v["x"], v["label"], video_clf) >= MIN_VIDEO_DIGIT_ACC
    assert class_consistency(v["x"], v["direction"], video_clf, head="direction") >= MIN_VIDEO_DIRECTION_ACC


def test_class_consistency_sanity(images, image_clf):
    x, y = images["heldout"]
    acc = class_consistency(x, y, image_clf)
    wrong = class_consistency(x, (y + 1) % 10, image_clf)
    assert wrong < 0.05 < acc
    # the [0, 1] convention: the same images given in [0, 1] with value_range=(0, 1) score the same
    assert class_consistency((x + 1) / 2, y, image_clf, value_range=(0, 1)) == acc

    class Oracle(torch.nn.Module):
        def forward(self, z):
            return torch.nn.functional.one_hot(z.flatten(1)[:, 0].round().long() * 3, 10).float()

    z = torch.tensor([0.0, 1.0, 0.0]).reshape(3, 1, 1, 1)  # in [-1, 1] -> 0.5 -> rounds to 0 / 1 -> class 0 / 3
    assert class_consistency(z * 2 - 1, torch.tensor([0, 3, 0]), Oracle()) == 1.0
    with pytest.raises(ValueError):
        class_consistency(x[:3], y[:2], image_clf)


def test_torchmetrics_fid_with_image_features(images):
    net = ImageFeatureNet()
    assert net.num_features == 64
    x_train, _ = images["train"]
    x_held, _ = images["heldout"]
    noise = torch.rand(x_held.shape, generator=torch.Generator().manual_seed(0))

    fid = FrechetInceptionDistance(feature=net, normalize=True)
    fid.update((x_train + 1) / 2, real=True)
    fid.update((x_held + 1) / 2, real=False)
    real_vs_real = float(fid.compute())
    fid.reset()
    fid.update((x_held + 1) / 2, real=True)
    fid.update(noise, real=False)
    real_vs_noise = float(fid.compute())
    assert 0 < real_vs_real * 20 < real_vs_noise
    # the helper is the same computation from [-1, 1]
    assert math.isclose(frechet_distance(x_train, x_held, net), real_vs_real, rel_tol=1e-3)
    # a feature net stays in eval mode inside a metric that is put in train mode
    fid.train()
    assert not net.training and not net.classifier.training


def test_image_features_input_conventions(images, image_clf):
    x = (images["heldout"][0][:8] + 1) / 2
    net = ImageFeatureNet(image_clf)
    f = net(x)
    assert f.shape == (8, 64)
    u8 = (x * 255).round().to(torch.uint8)
    assert torch.allclose(net(u8), f, rtol=0.02, atol=0.2)  # 8-bit rounding
    assert torch.allclose(net(x.expand(-1, 3, -1, -1)), f, atol=1e-5)  # grey RGB
    assert net(torch.nn.functional.interpolate(x, size=(32, 32))).shape == (8, 64)
    assert isinstance(net.classifier, ImageClassifier)


def test_video_fid_with_torchmetrics(videos):
    net = VideoFeatureNet()
    real, held = videos["train"]["x"], videos["heldout"]["x"]
    noise = torch.rand(held.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    fid = FrechetInceptionDistance(feature=net, normalize=True)
    fid.update((real + 1) / 2, real=True)
    fid.update((held + 1) / 2, real=False)
    real_vs_real = float(fid.compute())
    held, noise = held[:150], noise[:150]
    real_vs_noise = frechet_distance(held, noise, net)
    # temporally scrambled videos (odd frames from other videos) are far too
    mixed = held.clone()
    mixed[:, :, 1::2] = held.roll(1, dims=0)[:, :, 1::2]
    real_vs_mixed = frechet_distance(held, mixed, net)
    assert 0 < real_vs_real * 10 < real_vs_mixed < real_vs_noise


def test_psnr_ssim(images, videos):
    x = images["heldout"][0][:16]
    same = psnr_ssim(x, x.clone())
    assert math.isinf(same["psnr"]) and same["psnr"] > 0
    assert same["ssim"] == pytest.approx(1.0, abs=1e-6)
    noisy = (x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))).clamp(-1, 1)
    worse = psnr_ssim(noisy, x)
    assert 10 < worse["psnr"] < 60 and 0 < worse["ssim"] < 1
    v = videos["heldout"]["x"][:4]
    assert psnr_ssim(v, v)["ssim"] == pytest.approx(1.0, abs=1e-6)
    vn = (v + 0.1 * torch.randn(v.shape, generator=torch.Generator().manual_seed(1))).clamp(-1, 1)
    per_frame = psnr_ssim(vn, v)
    assert 10 < per_frame["psnr"] < 60
    frames = psnr_ssim(vn.transpose(1, 2).reshape(-1, 1, 16, 16), v.transpose(1, 2).reshape(-1, 1, 16, 16))
    assert per_frame == pytest.approx(frames)
    with pytest.raises(ValueError):
        psnr_ssim(v, x)


def test_temporal_consistency_orders_real_above_scrambled(videos):
    held = videos["heldout"]["x"]
    mixed = held.clone()
    mixed[:, :, 1::2] = held.roll(1, dims=0)[:, :, 1::2]
    static = held[:, :, :1].expand(-1, -1, 8, -1, -1)
    noise = torch.rand(held.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    tc = {k: temporal_consistency(v) for k, v in (("real", held), ("mixed", mixed), ("static", static), ("noise", noise))}
    assert tc["static"] == pytest.approx(1.0, abs=1e-5)
    assert tc["static"] > tc["real"] > tc["mixed"] > tc["noise"]
    assert abs(tc["noise"]) < 0.05
    assert frame_difference(static) == 0 < frame_difference(held) < frame_difference(mixed)
    # custom features: the video classifier's (time-pooled) features of single frames are not defined; use any map
    assert temporal_consistency(held, feature_fn=lambda f: f.flatten(1)) > 0


def test_metrics_are_computed_by_the_calling_process_alone(images, tmp_path, monkeypatch):
    """FinalReport computes them on rank zero while the other ranks wait: torchmetrics' default gather
    across the process group at compute waited for ranks that never came (a 2-process DDP fit of the
    default config crashed there). Inside a process group, no metric here gathers."""
    import torch.distributed as dist
    import torchmetrics.metric

    def gather(*args, **kwargs):
        raise AssertionError("a metric gathered across the process group")

    monkeypatch.setattr(torchmetrics.metric, "gather_all_tensors", gather)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        x = images["heldout"][0][:16]
        assert math.isfinite(frechet_distance(x[:8], x[8:], ImageFeatureNet()))
        assert psnr_ssim(x[8:], x[:8])["ssim"] < 1
        with pytest.raises(AssertionError, match="gathered"):  # what torchmetrics does by default here
            fid = FrechetInceptionDistance(feature=ImageFeatureNet(), normalize=True)
            fid.update((x[:8] + 1) / 2, real=True)
            fid.update((x[8:] + 1) / 2, real=False)
            fid.compute()
    finally:
        dist.destroy_process_group()
