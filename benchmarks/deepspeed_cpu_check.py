"""DeepSpeed ZeRO-2 checkpoints and resume, on a CPU: a developer's check where no GPU is lent.

    pip install deepspeed   # or its wheel; DS_BUILD_OPS=0, nothing compiled
    python benchmarks/deepspeed_cpu_check.py [--workdir /tmp/ds_check] [--out FILE]

Lightning refuses ``DeepSpeedStrategy`` off CUDA. DeepSpeed itself runs on a CPU (its ``cpu``
accelerator, gloo), so each fit here runs in a child process with three patches that only this
script applies: the strategy's CUDA check is skipped, its device-index check too, and DeepSpeed's
``device_rank`` is 0 where Lightning passes the CPU device's index (None). Through ``train.py``'s own
entry point, on ``configs/tiny/stdit_w3a6.yaml`` with ``trainer.strategy deepspeed_stage_2`` (32-true):

1. ``full``: 4 steps; ``half``: stopped after 2 of the same 4 (as a killed job), then resumed with
   ``--ckpt_path last``. The students of ``full`` and ``half`` at step 4 must be equal.
2. The same with ``quant.learn_a_zero_point false``, whose calibrated activation zero points are frozen
   parameters (DeepSpeed's ``exclude_frozen_parameters`` drops them from its module states).
3. ``last.ckpt/``'s module states hold no teacher key, and ``mpq_frozen_params`` is there.
4. ``validate``: a fit of 4 steps validating every 2 on a held-out trajectory, then ``train.py validate
   --config <run>/config.yaml`` (the engine restores ``last.ckpt/``): the same ``val/loss`` as the
   fit logged at step 4.
5. ``sigterm``: a SIGTERM after step 3 exits with 143 and saves ``last.ckpt/`` at step 3; resumed to
   step 4 it equals ``default_full``.

Checkpoints are read back through ``mpq_lightning.files.read_checkpoint`` (Lightning's ZeRO-to-fp32
conversion), as evaluate.py and the exporter read them. Writes benchmarks/results/deepspeed_cpu_check.json.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _patch_and_fit(argv: list[str]) -> None:
    """In the child: the three patches, then train.py's main."""
    import deepspeed
    import lightning.fabric.strategies.deepspeed as fabric_ds
    import lightning.pytorch.strategies.deepspeed as pl_ds
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.strategies.ddp import DDPStrategy

    pl_ds.DeepSpeedStrategy.setup_environment = lambda self: DDPStrategy.setup_environment(self)
    fabric_ds._validate_device_index_selection = pl_ds._validate_device_index_selection = lambda devices: None
    initialize = deepspeed.initialize

    def initialize_on_cpu(*args, **kwargs):
        if getattr(kwargs.get("args"), "device_rank", 0) is None:
            kwargs["args"].device_rank = 0
        return initialize(*args, **kwargs)

    deepspeed.initialize = initialize_on_cpu
    stop = int(os.environ.get("DS_CHECK_STOP", "0"))
    sigterm = int(os.environ.get("DS_CHECK_SIGTERM", "0"))

    class StopAt(Callback):
        def on_train_batch_end(self, trainer, *args) -> None:
            if stop and trainer.global_step >= stop:
                trainer.should_stop = True
            if sigterm and trainer.global_step == sigterm:  # a scheduler preempting the job
                import signal

                os.kill(os.getpid(), signal.SIGTERM)

    from mpq_lightning import cli

    cli_class = cli.MPQCLI

    class WithStop(cli_class):
        def before_fit(self) -> None:
            self.trainer.callbacks.append(StopAt())
            super().before_fit()

    cli.MPQCLI = WithStop
    cli.main(argv)


def fit(workdir: Path, run: str, extra: list[str], stop: int = 0, resume: bool = False, sigterm: int = 0) -> float:
    args = ["--config", str(REPO / "configs" / "tiny" / "stdit_w3a6.yaml"), "--trainer.strategy", "deepspeed_stage_2",
            "--trainer.max_steps", "4", "--checkpoint_every_n_steps", "2", "--log_samples", "false",
            "--trainer.enable_progress_bar", "false", "--run_name", run, *extra,
            *(["--ckpt_path", "last"] if resume else [])]
    return child(workdir, args, stop, what=f"fit {run}", sigterm=sigterm)


def child(workdir: Path, args: list[str], stop: int = 0, what: str = "run", sigterm: int = 0) -> float:
    """train.py with ``args`` in a patched child process; its wall time. ``sigterm``: the step after
    which it sends itself a SIGTERM, and then must exit with 143."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "DS_CHECK_STOP": str(stop), "DS_CHECK_SIGTERM": str(sigterm),
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, __file__, "--child", *args], cwd=workdir, env=env, capture_output=True, text=True)
    if done.returncode != (143 if sigterm else 0):
        sys.exit(f"{what} failed (rc {done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return time.perf_counter() - start


def scalars(folder: Path, tag: str) -> dict[int, float]:
    """``tag``'s values by step in the TensorBoard events of ``folder``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    events.Reload()
    return {e.step: e.value for e in events.Scalars(tag)} if tag in events.Tags()["scalars"] else {}


def validate_case(workdir: Path) -> dict:
    """``train.py validate`` of a DeepSpeed run (its ``last.ckpt/`` folder restored by the engine, no
    calibration): its ``val/loss`` must be the one the fit logged at its last step."""
    run = "validate_fit"
    shutil.rmtree(workdir / "checkpoints" / run, ignore_errors=True)
    val = ["--data.init_args.val_trajectories", "[3]", "--trainer.val_check_interval", "2"]
    seconds = {"fit": fit(workdir, run, val)}
    config = workdir / "checkpoints" / run / "config.yaml"
    seconds["validate"] = child(workdir, ["validate", "--config", str(config), "--trainer.enable_progress_bar", "false"],
                                what=f"validate {run}")
    fitted = scalars(workdir / "checkpoints" / run, "val/loss")
    validated = scalars(workdir / "checkpoints" / run / "validate", "val/loss")
    row = {"case": "validate", "extra": val, "seconds": seconds, "fit_val_loss": fitted,
           "validate_val_loss": list(validated.values())}
    row["ok"] = bool(fitted) and len(validated) == 1 and abs(row["validate_val_loss"][0] - fitted[max(fitted)]) <= 1e-6
    return row


def sigterm_case(workdir: Path) -> dict:
    """A SIGTERM after step 3 (periodic checkpoints at 2 and 4): the run exits with 143, its
    ``last.ckpt/`` holds step 3, and resumed to step 4 it equals ``default_full``."""
    from mpq_lightning.files import read_deepspeed_client_state

    run = "sigterm_half"
    shutil.rmtree(workdir / "checkpoints" / run, ignore_errors=True)
    seconds = {"stopped": fit(workdir, run, [], sigterm=3)}
    stopped = read_deepspeed_client_state(workdir / "checkpoints" / run / "last.ckpt")["global_step"]
    seconds["resume"] = fit(workdir, run, [], resume=True)
    row = {"case": "sigterm", "extra": [], "seconds": seconds, "stopped_at": stopped,
           **compare(workdir / "checkpoints" / run / "last.ckpt", workdir / "checkpoints" / "default_full" / "last.ckpt")}
    row["ok"] = stopped == 3 and row["same_keys"] and row["max_abs_diff"] == 0.0 and row["steps"] == [4, 4]
    return row


def compare(a: Path, b: Path) -> dict:
    import torch

    from mpq_lightning.files import read_checkpoint

    ca, cb = read_checkpoint(a), read_checkpoint(b)
    sa, sb = ca["state_dict"], cb["state_dict"]
    diffs = {k: float((sa[k].double() - sb[k].double()).abs().max()) for k in sa if k in sb and sa[k].numel()}
    fa, fb = ca.get("mpq_frozen_params", {}), cb.get("mpq_frozen_params", {})
    return {"steps": [ca["global_step"], cb["global_step"]], "same_keys": set(sa) == set(sb),
            "max_abs_diff": max(diffs.values()), "frozen_params": len(fa),
            "frozen_equal": set(fa) == set(fb) and all(torch.equal(fa[k], fb[k]) for k in fa)}


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        return _patch_and_fit(sys.argv[2:])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", default="/tmp/ds_cpu_check")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "deepspeed_cpu_check.json"))
    args = ap.parse_args()
    import torch

    import deepspeed  # noqa: F401  (fails here, plainly, where DeepSpeed is missing)

    from mpq_lightning.files import read_deepspeed_client_state

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, extra in (("default", []), ("frozen_act_zero_points", ["--model.quant.learn_a_zero_point", "false"])):
        for run in (f"{name}_full", f"{name}_half"):  # this script's own runs of an earlier call (the cache stays)
            shutil.rmtree(workdir / "checkpoints" / run, ignore_errors=True)
        seconds = {"full": fit(workdir, f"{name}_full", extra), "half": fit(workdir, f"{name}_half", extra, stop=2)}
        stopped = read_deepspeed_client_state(workdir / "checkpoints" / f"{name}_half" / "last.ckpt")["global_step"]
        if stopped != 2:  # else the resume would train nothing and compare trivially
            sys.exit(f"{name}_half: stopped at step {stopped}, not 2")
        seconds["resume"] = fit(workdir, f"{name}_half", extra, resume=True)
        row = {"case": name, "extra": extra, "seconds": seconds,
               **compare(workdir / "checkpoints" / f"{name}_half" / "last.ckpt", workdir / "checkpoints" / f"{name}_full" / "last.ckpt")}
        states = torch.load(next((workdir / "checkpoints" / f"{name}_full" / "last.ckpt" / "checkpoint").glob("*model_states.pt")),
                            map_location="cpu", weights_only=False)
        row["teacher_keys_in_module_states"] = sum(k.startswith("teacher.") for k in states["module"])
        row["ok"] = (row["same_keys"] and row["max_abs_diff"] == 0.0 and row["frozen_equal"] and row["frozen_params"] > 0
                     and row["teacher_keys_in_module_states"] == 0 and row["steps"] == [4, 4])
        rows.append(row)
        print(json.dumps(row), flush=True)
    rows.append(validate_case(workdir))
    print(json.dumps(rows[-1]), flush=True)
    rows.append(sigterm_case(workdir))
    print(json.dumps(rows[-1]), flush=True)
    import deepspeed as ds
    import lightning

    result = {"torch": torch.__version__, "lightning": lightning.__version__, "deepspeed": ds.__version__, "rows": rows}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"-> {args.out}")
    if not all(r["ok"] for r in rows):
        sys.exit("DeepSpeed CPU check failed")


if __name__ == "__main__":
    main()
