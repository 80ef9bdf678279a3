#!/usr/bin/env bash
# One prepared run on a lent GPU machine (see README "Benchmarks"): wheels the image lacks are in .whl/.
# Writes results and logs under $OUT. Usage there: bash benchmarks/gpu_check.sh
set -u
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi -L | tee "$OUT/device.txt"; python3 -c "import torch, lightning; print(torch.__version__, lightning.__version__)" | tee -a "$OUT/device.txt"
run() { local name=$1; shift; echo "== $name" | tee -a "$OUT/all.log"; ( timeout 100 "$@" ) > /tmp/$name.log 2>&1; local rc=$?
        cat /tmp/$name.log >> "$OUT/all.log"; echo "rc=$rc $name" | tee -a "$OUT/summary.txt"; tail -4 /tmp/$name.log; }
run step_time_cuda python3 benchmarks/step_time.py --device cuda --repeats 20 --out "$OUT/step_time_cuda.json"
run step_time_cpu2 python3 benchmarks/step_time.py --device cpu --threads 2 --repeats 5 --out "$OUT/step_time_cpu_2threads.json"
run quant_init_cpu2 python3 benchmarks/quant_init.py --threads 2 --repeats 3 --out "$OUT/quant_init_2threads.json"
T="--config configs/tiny/stdit_w3a6.yaml --trainer.accelerator gpu --trainer.devices 1 --trainer.max_steps 4 --log_samples false --trainer.enable_progress_bar false"
run fit_ddp_bf16 python3 train.py $T --run_name gpu_ddp --trainer.strategy ddp --trainer.precision bf16-mixed
run fit_auto_16 python3 train.py $T --run_name gpu_16 --trainer.precision 16-mixed
run fit_fsdp_bf16 python3 train.py $T --run_name gpu_fsdp --trainer.strategy fsdp --trainer.precision bf16-mixed
run deepspeed_import python3 -c "import deepspeed; print(deepspeed.__version__)"
