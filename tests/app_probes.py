"""Callbacks the application tests add through the CLI (``--trainer.callbacks+=app_probes.RankProbe``)."""
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback

from mpq_lightning.quant import QuantLayer


class RankProbe(Callback):
    """Each rank writes what its student computes with, at the start and the end of fitting, and a
    fingerprint of every sample it trained on: the 2-process DDP test checks the ranks agree."""

    def __init__(self, out_dir: str = "ddp_probe") -> None:
        self.out_dir = Path(out_dir)
        self.seen: list[list[float]] = []

    @torch.no_grad()
    def _dump(self, trainer, pl_module, tag: str) -> None:
        tensors = {}
        for name, layer in pl_module.student.backbone.named_modules():
            if isinstance(layer, QuantLayer):
                tensors[f"{name}.quantized_weight"] = layer.quantized_weight().detach().cpu().clone()
                if layer.base_weight is not None:
                    tensors[f"{name}.base_weight"] = layer.base_weight.detach().cpu().clone()
        for key, value in pl_module.student.state_dict().items():
            tensors[f"state.{key}"] = value.detach().cpu().clone()
        if self.seen:
            tensors["batches_seen"] = torch.tensor(self.seen)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        torch.save(tensors, self.out_dir / f"{tag}_rank{trainer.global_rank}.pt")

    def on_train_start(self, trainer, pl_module) -> None:
        self._dump(trainer, pl_module, "start")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        # one fingerprint per sample, so the test can check the ranks trained on different data
        # (noisy latents only: a guided trajectory's conditional and unconditional samples share them)
        self.seen.append(batch["x_t"].detach().double().flatten(1).sum(1).cpu().tolist())

    def on_train_end(self, trainer, pl_module) -> None:
        self._dump(trainer, pl_module, "end")


class NanAt(Callback):
    """Makes the loss non-finite from global step ``step`` on (a diverging run)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            object.__setattr__(pl_module.loss_cfg, "mse_weight", float("nan"))


class NanGradAt(Callback):
    """A finite loss whose backward gives a non-finite gradient at global step ``step``."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_after_backward(self, trainer, pl_module) -> None:
        if trainer.global_step == self.step:
            p = next(p for p in pl_module.parameters() if p.requires_grad and p.grad is not None)
            p.grad.view(-1)[0] = float("nan")


class FailAtTrainEnd(Callback):
    """Stands for end-of-training sampling that fails (e.g. out of memory in a VAE decode)."""

    def on_train_end(self, trainer, pl_module) -> None:
        raise RuntimeError("out of memory (simulated, end-of-training sampling)")


class _PooledFeatures(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        return torch.nn.functional.adaptive_avg_pool1d(x[:, None], 8)[:, 0].double()


def pooled_features() -> torch.nn.Module:
    """A feature network for ``eval.feature = "app_probes:pooled_features"`` (8 pooled values)."""
    return _PooledFeatures()


class LrProbe(Callback):
    """Records, when training starts, the LoRA learning rates the optimizer holds and the ones the
    module computes from its (now calibrated) quantizer steps."""

    def on_train_start(self, trainer, pl_module) -> None:
        self.used = {g["name"]: g["initial_lr"] for g in trainer.optimizers[0].param_groups if g["name"].startswith("lora:")}
        self.scheduler_base = dict(zip([g["name"] for g in trainer.optimizers[0].param_groups],
                                       trainer.lr_scheduler_configs[0].scheduler.base_lrs))
        self.want = {g["name"]: g["lr"] for g in pl_module.param_groups() if g["name"].startswith("lora:")}


class SignalAt(Callback):
    """Sends ``signum`` to this process at the end of batch ``batch`` (a scheduler preempting the job,
    a Ctrl-C), on rank ``rank`` only (``kill`` of one process); ``batch`` -1: at train start, before
    RunCheckpoint's own handler is set (Lightning's is, from the sanity check on)."""

    def __init__(self, batch: int, signum: int = 15, rank: int = 0) -> None:
        self.batch, self.signum, self.rank = batch, signum, rank

    def on_train_start(self, trainer, pl_module) -> None:
        if self.batch == -1 and trainer.global_rank == self.rank:
            import os

            os.kill(os.getpid(), self.signum)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx == self.batch and trainer.global_rank == self.rank:
            import os

            os.kill(os.getpid(), self.signum)


class FailAtTrainStart(Callback):
    """Stands for a fit that fails before its first step (calibration out of memory, a damaged first shard)."""

    def on_train_start(self, trainer, pl_module) -> None:
        raise RuntimeError("out of memory (simulated, before the first step)")


class InterruptAtTrainStart(Callback):
    """A Ctrl-C while the student is calibrated (the KeyboardInterrupt Python raises in the main thread)."""

    def on_train_start(self, trainer, pl_module) -> None:
        raise KeyboardInterrupt


class CrashAt(Callback):
    """Raises at the end of optimiser step ``step``, before the checkpoint callbacks (a process killed
    after it logged steps its last checkpoint does not hold)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            raise MemoryError(f"crash at step {self.step}")


class _OwnVideoNet(torch.nn.Module):
    """A video backbone of a user's own (no registry entry): conv3d in and out, a per-position MLP."""

    def __init__(self, channels: int = 4, hidden: int = 16) -> None:
        super().__init__()
        self.inp = torch.nn.Conv3d(channels, hidden, 3, padding=1)
        self.time = torch.nn.Linear(1, hidden)
        self.mid = torch.nn.Linear(hidden, hidden)
        self.out = torch.nn.Conv3d(hidden, channels, 3, padding=1)

    def forward(self, x, t):
        h = self.inp(x) + self.time((t.float() / 1000).view(-1, 1))[:, :, None, None, None]
        h = self.mid(torch.nn.functional.silu(h).movedim(1, -1)).movedim(-1, 1)
        return self.out(torch.nn.functional.silu(h))


def own_video_model(hidden: int = 16, seed: int = 0):
    """``--model.model app_probes:own_video_model``: a Denoiser around ``_OwnVideoNet``."""
    from mpq_lightning.models import Denoiser

    torch.manual_seed(seed)
    return Denoiser(
        _OwnVideoNet(4, hidden), latent_shape=(4, 4, 8, 8), patch_size=(1, 1, 1), out_channels=4, cond_kind="none",
        cond_spec={}, prediction_type="epsilon",
        default_scheduler={"name": "ddim", "config": {}, "num_inference_steps": 4, "guidance_scale": 1.0},
        feature_site="mid", feature_layout="b f h w c")


def not_a_denoiser():
    return torch.nn.Linear(2, 2)
