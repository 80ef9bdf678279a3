"""Train a quantized diffusion model: ``python train.py [--config configs/x.yaml] [overrides]``.

With no arguments it runs the embedded default (see README). ``--print_config`` prints the resolved
config, ``--ckpt_path last`` resumes the run named by ``--run_name``.
"""
from mpq_lightning.cli import main, run_script

if __name__ == "__main__":
    run_script(main)
