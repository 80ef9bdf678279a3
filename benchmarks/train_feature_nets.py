"""Train the metric feature networks on the real digits and write them to mpq_lightning/assets/.

    python benchmarks/train_feature_nets.py --which image   # ImageClassifier on Digits (16x16)
    python benchmarks/train_feature_nets.py --which video   # VideoClassifier on Moving-Digits (8x16x16)
    python benchmarks/train_feature_nets.py                  # both

Writes <stem>.safetensors (fp32 weights) and <stem>.json (model_config, train_config, held-out accuracy,
reference metric values on real data, wall time) for stem = image_classifier / video_classifier.
Deterministic given --seed on one thread (the default: on a shared 2-core machine one thread is also the
fastest). Trained on the "train" split only; accuracies are on the "heldout" split.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from mpq_lightning.data.digits import DigitsDataset, MovingDigitsDataset
from mpq_lightning.metrics import (
    ImageClassifier,
    ImageFeatureNet,
    VideoClassifier,
    VideoFeatureNet,
    class_consistency,
    frame_difference,
    frechet_distance,
    temporal_consistency,
)

ASSETS = Path(__file__).resolve().parent.parent / "mpq_lightning" / "assets"


def _shift(x: torch.Tensor, max_shift: int, g: torch.Generator) -> torch.Tensor:
    """Random integer translation (zero fill, i.e. -1 background) of each sample's last two dims."""
    if max_shift == 0:
        return x
    pad = [max_shift] * 4
    xp = F.pad(x, pad, value=-1.0)
    h, w = x.shape[-2:]
    out = torch.empty_like(x)
    offs = torch.randint(0, 2 * max_shift + 1, (x.shape[0], 2), generator=g)
    for i, (dy, dx) in enumerate(offs.tolist()):
        out[i] = xp[i, ..., dy : dy + h, dx : dx + w]
    return out


def _cosine_lr(opt: torch.optim.Optimizer, base: float, step: int, total: int, warmup: int) -> None:
    lr = base * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(step, total) / total))
    for group in opt.param_groups:
        group["lr"] = lr


def _save(model: torch.nn.Module, stem: str, meta: dict, out: Path) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / f"{stem}.safetensors"))
    (out / f"{stem}.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"wrote {out / (stem + '.safetensors')} ({(out / (stem + '.safetensors')).stat().st_size / 1e6:.2f} MB)")


def train_image(args: argparse.Namespace) -> None:
    cfg = dict(seed=args.seed, epochs=30, batch_size=64, lr=2e-3, weight_decay=1e-4, warmup=100, max_shift=1,
               noise_std=0.05, optimizer="AdamW", schedule="cosine")  # fmt: skip
    torch.manual_seed(cfg["seed"])
    g = torch.Generator().manual_seed(cfg["seed"])
    x_train, y_train = DigitsDataset("train").tensors()
    x_held, y_held = DigitsDataset("heldout").tensors()
    model = ImageClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    steps_per_epoch = math.ceil(len(y_train) / cfg["batch_size"])
    total = cfg["epochs"] * steps_per_epoch
    t0, step, loss = time.time(), 0, torch.tensor(0.0)
    for epoch in range(cfg["epochs"]):
        model.train()
        perm = torch.randperm(len(y_train), generator=g)
        for i in range(0, len(perm), cfg["batch_size"]):
            idx = perm[i : i + cfg["batch_size"]]
            x = _shift(x_train[idx], cfg["max_shift"], g)
            x = x + cfg["noise_std"] * torch.randn(x.shape, generator=g)
            _cosine_lr(opt, cfg["lr"], step, total, cfg["warmup"])
            loss = F.cross_entropy(model((x.clamp(-1, 1) + 1) / 2), y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
        if epoch % 5 == 4 or epoch == cfg["epochs"] - 1:
            model.eval()
            acc = class_consistency(x_held, y_held, model)
            print(f"[image] epoch {epoch + 1} loss {loss.item():.4f} heldout acc {acc:.4f} ({time.time() - t0:.0f}s)")
    wall = time.time() - t0
    model.eval().requires_grad_(False)
    acc_train = class_consistency(x_train, y_train, model)
    acc_held = class_consistency(x_held, y_held, model)
    net = ImageFeatureNet(model)
    g_noise = torch.Generator().manual_seed(123)
    noise = torch.rand(x_held.shape, generator=g_noise) * 2 - 1
    reference = {
        "fid_heldout_vs_train": frechet_distance(x_train, x_held, net),
        "fid_heldout_vs_uniform_noise": frechet_distance(x_held, noise, net),
        "fid_heldout_vs_shifted_heldout_1px": frechet_distance(x_held, torch.roll(x_held, 1, -1), net),
    }
    meta = {
        "model": "ImageClassifier",
        "model_config": model.config,
        "input": "[N, 1, 16, 16] float in [0, 1] (Digits images mapped from [-1, 1])",
        "train_config": {**cfg, "data": "DigitsDataset('train') (indices 0..1437), 1438 images",
                         "threads": args.threads},  # fmt: skip
        "final_train_loss": loss.item(),
        "accuracy": {"train": acc_train, "heldout": acc_held},
        "reference": reference,
        "wall_time_s": wall,
        "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} thread(s)",
        "command": "python benchmarks/train_feature_nets.py --which image",
    }
    print(json.dumps({k: meta[k] for k in ("final_train_loss", "accuracy", "reference", "wall_time_s")}, indent=2))
    _save(model, "image_classifier", meta, args.out)


def _videos(split: str, num: int, seed: int) -> dict[str, torch.Tensor]:
    return MovingDigitsDataset(split, num_videos=num, seed=seed).tensors()


def train_video(args: argparse.Namespace) -> None:
    cfg = dict(seed=args.seed, epochs=10, videos_per_digit=2, batch_size=64, lr=2e-3, weight_decay=1e-4, warmup=100,
               noise_std=0.05, data_seed_base=1000, optimizer="AdamW", schedule="cosine",
               direction_loss_weight=1.0)  # fmt: skip
    torch.manual_seed(cfg["seed"])
    g = torch.Generator().manual_seed(cfg["seed"])
    n_train = 1438 * cfg["videos_per_digit"]
    held = _videos("heldout", 359 * 3, seed=0)
    model = VideoClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    total = cfg["epochs"] * math.ceil(n_train / cfg["batch_size"])
    t0, step, loss = time.time(), 0, torch.tensor(0.0)
    for epoch in range(cfg["epochs"]):
        data = _videos("train", n_train, seed=cfg["data_seed_base"] + epoch)  # fresh motions each epoch
        model.train()
        perm = torch.randperm(n_train, generator=g)
        for i in range(0, n_train, cfg["batch_size"]):
            idx = perm[i : i + cfg["batch_size"]]
            x = data["x"][idx] + cfg["noise_std"] * torch.randn(data["x"][idx].shape, generator=g)
            _cosine_lr(opt, cfg["lr"], step, total, cfg["warmup"])
            out = model.logits((x.clamp(-1, 1) + 1) / 2)
            loss = F.cross_entropy(out["digit"], data["label"][idx]) + cfg["direction_loss_weight"] * F.cross_entropy(
                out["direction"], data["direction"][idx]
            )
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
        model.eval()
        acc_d = class_consistency(held["x"], held["label"], model)
        acc_m = class_consistency(held["x"], held["direction"], model, head="direction")
        print(f"[video] epoch {epoch + 1} loss {loss.item():.4f} heldout digit {acc_d:.4f} direction {acc_m:.4f} "
              f"({time.time() - t0:.0f}s)", flush=True)  # fmt: skip
    wall = time.time() - t0
    model.eval().requires_grad_(False)
    train_eval = _videos("train", 1438, seed=0)
    accuracy = {
        "train_digit": class_consistency(train_eval["x"], train_eval["label"], model),
        "train_direction": class_consistency(train_eval["x"], train_eval["direction"], model, head="direction"),
        "heldout_digit": class_consistency(held["x"], held["label"], model),
        "heldout_direction": class_consistency(held["x"], held["direction"], model, head="direction"),
    }
    net = VideoFeatureNet(model)
    g_noise = torch.Generator().manual_seed(123)
    noise = torch.rand(held["x"].shape, generator=g_noise) * 2 - 1
    # frames of different videos: same marginal per frame, no temporal coherence
    shuffled = held["x"][torch.randperm(len(held["x"]), generator=g_noise)]
    mixed = held["x"].clone()
    mixed[:, :, 1::2] = shuffled[:, :, 1::2]
    reference = {
        "fvd_heldout_vs_train": frechet_distance(train_eval["x"], held["x"], net),
        "fvd_heldout_vs_uniform_noise": frechet_distance(held["x"], noise, net),
        "fvd_heldout_vs_frame_mixed": frechet_distance(held["x"], mixed, net),
        "temporal_consistency": temporal_consistency(held["x"]),
        "temporal_consistency_frame_mixed": temporal_consistency(mixed),
        "frame_difference": frame_difference(held["x"]),
        "frame_difference_frame_mixed": frame_difference(mixed),
    }
    meta = {
        "model": "VideoClassifier",
        "model_config": model.config,
        "input": "[N, 1, 8, 16, 16] float in [0, 1] (Moving-Digits videos mapped from [-1, 1])",
        "train_config": {**cfg, "data": f"MovingDigitsDataset('train', num_videos={n_train}, seed=data_seed_base+epoch)",
                         "threads": args.threads},  # fmt: skip
        "eval_data": "MovingDigitsDataset('heldout', num_videos=1077, seed=0); train: ('train', 1438, seed=0)",
        "final_train_loss": loss.item(),
        "accuracy": accuracy,
        "reference": reference,
        "wall_time_s": wall,
        "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} thread(s)",
        "command": "python benchmarks/train_feature_nets.py --which video",
    }
    print(json.dumps({k: meta[k] for k in ("final_train_loss", "accuracy", "reference", "wall_time_s")}, indent=2))
    _save(model, "video_classifier", meta, args.out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--which", choices=("image", "video", "all"), default="all")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ASSETS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    if args.which in ("image", "all"):
        train_image(args)
    if args.which in ("video", "all"):
        train_video(args)


if __name__ == "__main__":
    main()
