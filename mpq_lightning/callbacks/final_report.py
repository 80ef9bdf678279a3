"""FinalReport: at the end of fitting, FP vs naive PTQ vs the trained student, side by side.

Samples all three from the same noise and conditions with the training sampler (text models: the
data module's ``sample_conditions``), computes the metrics of ``mpq_lightning.compare`` (PSNR/SSIM
vs FP, temporal consistency of videos; for the shipped digits teachers also Fréchet distance to
held-out real data and class consistency), prints a rich table and writes ``<run>/report.json``.
Each sampling run is its own CUDA-graph step (``QATModule.mark_cudagraph_step``). Rank zero only.
A fit that trained nothing (a finished run resumed, e.g. a requeued job) keeps the run's
``report.json`` rather than sampling it again; it writes one only where the run has none.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.callbacks import Callback

from ..compare import compare, naive_ptq, print_rows
from ..files import atomic_write
from ..models.sampling import make_scheduler
from ..quant import set_quant_state
from .samples import map_to_trained_entries


class FinalReport(Callback):
    def __init__(self, num_samples: int = 64, seed: int = 1234) -> None:
        self.num_samples, self.seed = num_samples, seed
        self.rows: dict | None = None
        self._trained = False

    def on_fit_start(self, trainer, pl_module) -> None:
        self._trained = False

    def on_train_start(self, trainer, pl_module) -> None:
        # Lightning skips the whole training loop (this hook too) when the restored step is at max_steps
        self._trained = True

    @torch.no_grad()
    def on_fit_end(self, trainer, pl_module) -> None:
        from ..module import full_parameters

        log_dir = trainer.log_dir  # a broadcast under DDP: every rank takes part before rank 0 goes on alone
        # the run folder whatever the logger (without one, log_dir is the shared root of every run)
        log_dir = getattr(getattr(trainer, "checkpoint_callback", None), "dirpath", None) or log_dir
        if not self._trained and self._kept_report(trainer, log_dir):
            return
        with full_parameters(trainer):  # FSDP: every rank gathers the parameters, rank zero samples
            if trainer.is_global_zero:
                self._report(trainer, pl_module, log_dir)

    def _kept_report(self, trainer, log_dir) -> bool:
        """Nothing was trained in this fit: keep the run's report where it has one (every rank takes
        part in the broadcast of rank zero's answer, before anyone gathers parameters)."""
        path = Path(log_dir, "report.json") if log_dir else None
        kept = trainer.strategy.broadcast(bool(trainer.is_global_zero and path and path.is_file()), src=0)
        if kept and trainer.is_global_zero:
            print(f"Nothing trained in this fit (at step {trainer.global_step}, trainer.max_steps {trainer.max_steps}): "
                  f"the run's {path} is kept; raise --trainer.max_steps to train on")
        return kept

    def _report(self, trainer, pl_module, log_dir) -> None:
        q = pl_module.quant_cfg
        # each sampling run its own CUDA-graph step, as in SampleLogger (QATModule.mark_cudagraph_step)
        self.rows = compare_with_naive_ptq(pl_module, trainer.datamodule, self.num_samples, self.seed,
                                           new_step=getattr(pl_module, "mark_cudagraph_step", None))
        print_rows(self.rows, f"{pl_module.model_name}: W{q.w_bits}A{q.a_bits}, {self.num_samples} samples")
        if log_dir and not trainer.fast_dev_run:  # a debugging run leaves the run folder alone
            atomic_write(Path(log_dir, "report.json"), json.dumps(self.rows, indent=2).encode())  # never half a file


@torch.no_grad()
def compare_with_naive_ptq(module, datamodule, num_samples: int, seed: int, student_name: str = "trained (ours)",
                           new_step=None) -> dict[str, dict]:
    """``compare.compare`` rows of the FP teacher, naive PTQ (``compare.naive_ptq``, calibrated on the
    module's calibration batches, read without moving the training position) and the module's student
    (quantizers on), all with the training sampler; both quantized models sample step i with the
    activation-table entry trained nearest its timestep."""
    loader = (datamodule.calibration_dataloader() if hasattr(datamodule, "calibration_dataloader")
              else datamodule.train_dataloader())
    batches = []
    for i, b in enumerate(loader):
        if i >= module.calib_cfg.num_batches:
            break
        batches.append(move_data_to_device(b, module.device))
    ptq = naive_ptq(module.teacher, module.quant_cfg, batches)
    set_quant_state(module.student.backbone, True, True)
    spec = module.training_sampler(datamodule)
    sampler = make_scheduler(spec.scheduler, **(spec.scheduler_config or {}))
    models = {name: map_to_trained_entries(model, datamodule, sampler, spec.num_inference_steps,
                                           module.step_table_length)[0]
              for name, model in (("naive PTQ", ptq), (student_name, module.student))}
    return compare(models, module.teacher, spec, num_samples, seed, new_step=new_step, datamodule=datamodule)
