#!/usr/bin/env bash
# One prepared run on a lent GPU machine (see README "Benchmarks"): wheels the image lacks are in .whl/
# (git-ignored: pass carry [".whl"]), DeepSpeed and its pure-Python deps in .whl/deepspeed/ (installed
# apart, so a DeepSpeed that fails to import cannot break the other checks).
# Writes results and logs under $OUT. Usage there: bash benchmarks/gpu_check.sh
set -u
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi -L | tee "$OUT/device.txt"; python3 -c "import torch, lightning; print(torch.__version__, lightning.__version__)" | tee -a "$OUT/device.txt"
# ONLY="name ..." runs just those checks; a check past its limit gets SIGABRT first, so Python's
# faulthandler (enabled, no watchdog) prints where the main thread was (rc 124 all the same)
export PYTHONFAULTHANDLER=1
run() { local t=$1 name=$2; shift 2; if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]]; then return; fi
        echo "== $name $(date +%T)" | tee -a "$OUT/all.log"
        ( set -o pipefail; timeout -s ABRT -k 10 "$t" "$@" 2>&1 | while IFS= read -r l; do printf '%(%T)T %s\n' -1 "$l"; done ) > /tmp/$name.log; local rc=$?
        cat /tmp/$name.log >> "$OUT/all.log"; echo "rc=$rc $name $(date +%T)" | tee -a "$OUT/summary.txt"; tail -4 /tmp/$name.log; }
T="--config configs/tiny/stdit_w3a6.yaml --trainer.accelerator gpu --trainer.devices 1 --log_samples false --trainer.enable_progress_bar false"
# most wanted first: CUDA graphs (compile_mode reduce-overhead) after the marks added on 2026-11-28 (the benchmark
# marks before its set-up forward, SampleLogger before each sampling run): their step time (tiny and mid-size, whole
# model and blocks) and a fit with blocks and sampling at train start; then the checks that passed on the H200 on
# 2026-11-28 (DeepSpeed ZeRO-2 fit / checkpoint / resume / evaluate, host syncs: 0, mid-size blocks step time:
# 2.45x, CUDA-graph fit, compiled bf16 fit: exited) and on the H100 before (FSDP fit + resume, DDP).
# A session's device time (900 s, a start of 40-170 s included) holds the first few.
# The wheels in .whl/ (not in the repo): diffusers, jsonargparse (+ docstring_parser, typeshed_client),
# importlib_metadata, lightning; .whl/deepspeed/: deepspeed (pip wheel --no-deps --no-build-isolation with
# DS_BUILD_OPS=0 from its sdist), pydantic + pydantic_core (cp312), annotated_types, typing_inspection,
# typing_extensions, hjson. $OUT/summary.txt grows check by check if a call is cut short;
# each output line carries its time, to tell a slow compile from a hang at exit; the compiled fits also print
# every thread's stack every 30 s (benchmarks/run_with_stacks.py: SIGABRT printed nothing there on the H100)
run 200 step_time_cuda_tiny_cudagraphs python3 benchmarks/step_time.py --device cuda --models tiny-stdit --modes cudagraphs,blocks_cudagraphs,model --repeats 20 --profile 3 --out "$OUT/step_time_cuda_tiny.json"
run 150 fit_cudagraphs_blocks_samples python3 benchmarks/run_with_stacks.py 30 train.py $T --config benchmarks/gpu_samples_at_start.yaml --trainer.max_steps 4 --run_name gpu_cgb --model.compile_model true --model.compile_scope blocks --model.compile_mode reduce-overhead
run 260 step_time_cuda_mid_cudagraphs python3 benchmarks/step_time.py --device cuda --models mid-stdit --modes blocks_cudagraphs,blocks --repeats 10 --profile 3 --out "$OUT/step_time_cuda_mid_cudagraphs.json"
# one wheel at a time: the binary ones exist for cp310 / cp311 / cp312 and only the matching one installs
for w in .whl/deepspeed/*.whl; do python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site_ds "$w" > /dev/null 2>&1; done
if [ -d /tmp/site_ds/deepspeed ]; then
  run 30 deepspeed_import env PYTHONPATH=/tmp/site_ds:$PYTHONPATH python3 -c "import deepspeed; print(deepspeed.__version__)"
  run 100 fit_deepspeed2_bf16 env PYTHONPATH=/tmp/site_ds:$PYTHONPATH DS_BUILD_OPS=0 python3 train.py $T --trainer.max_steps 2 --checkpoint_every_n_steps 2 --run_name gpu_ds --trainer.strategy deepspeed_stage_2 --trainer.precision bf16-mixed
  run 30 deepspeed_ckpt_no_frozen env PYTHONPATH=/tmp/site_ds:$PYTHONPATH python3 -c "import glob, torch; f = glob.glob('checkpoints/gpu_ds/last.ckpt/checkpoint/*model_states.pt')[0]; st = torch.load(f, weights_only=False, map_location='cpu'); sd = st['module']; bad = [k for k in sd if k.startswith('teacher.')]; fz = st.get('mpq_frozen_params') or {}; print(len(sd), 'module keys,', len(bad), 'teacher keys,', len(fz), 'frozen student params'); assert sd and not bad and fz"
  run 100 resume_deepspeed2_bf16 env PYTHONPATH=/tmp/site_ds:$PYTHONPATH DS_BUILD_OPS=0 python3 train.py $T --trainer.max_steps 4 --checkpoint_every_n_steps 2 --run_name gpu_ds --trainer.strategy deepspeed_stage_2 --trainer.precision bf16-mixed --ckpt_path last
  run 90 evaluate_deepspeed_run env PYTHONPATH=/tmp/site_ds:$PYTHONPATH python3 evaluate.py --config checkpoints/gpu_ds/config.yaml --eval.num_samples 4 --eval.device cuda
  run 100 fit_deepspeed2_32 env PYTHONPATH=/tmp/site_ds:$PYTHONPATH DS_BUILD_OPS=0 python3 train.py $T --trainer.max_steps 2 --run_name gpu_ds32 --trainer.strategy deepspeed_stage_2 --trainer.precision 32-true
fi
run 90 host_syncs python3 benchmarks/host_syncs.py --modes eager --out "$OUT/host_syncs_cuda.json"
# mid-stdit with compile_scope blocks: the whole-model compile of its QAT step did not finish in 300 s on the H100
run 300 step_time_cuda_mid python3 benchmarks/step_time.py --device cuda ${STEP_ARGS:---models mid-stdit --modes blocks --repeats 10} --out "$OUT/step_time_cuda.json"
# the whole-model CUDA-graph fit (passed on the H200, 2026-11-28) and the compiled bf16 fit that did not exit on the
# H100 (exited on the H200), with inductor's compile-worker pool and without it
run 150 fit_cudagraphs python3 benchmarks/run_with_stacks.py 30 train.py $T --trainer.max_steps 4 --run_name gpu_cg --model.compile_model true --model.compile_mode reduce-overhead
run 120 fit_bf16_compiled_model python3 benchmarks/run_with_stacks.py 30 train.py $T --trainer.max_steps 4 --run_name gpu_bfcm --trainer.precision bf16-mixed --model.compile_model true
run 120 fit_bf16_compiled_model_1thread env TORCHINDUCTOR_COMPILE_THREADS=1 python3 benchmarks/run_with_stacks.py 30 train.py $T --trainer.max_steps 4 --run_name gpu_bfcm1 --trainer.precision bf16-mixed --model.compile_model true
run 90 fit_fsdp_bf16 python3 train.py $T --trainer.max_steps 2 --checkpoint_every_n_steps 2 --run_name gpu_fsdp --trainer.strategy fsdp --trainer.precision bf16-mixed
run 90 resume_fsdp_bf16 python3 train.py $T --trainer.max_steps 4 --checkpoint_every_n_steps 2 --run_name gpu_fsdp --trainer.strategy fsdp --trainer.precision bf16-mixed --ckpt_path last
run 90 evaluate_fsdp_run python3 evaluate.py --config checkpoints/gpu_fsdp/config.yaml --eval.num_samples 4 --eval.device cuda
run 60 fit_ddp_bf16 python3 train.py $T --trainer.max_steps 4 --run_name gpu_ddp --trainer.strategy ddp --trainer.precision bf16-mixed
run 120 fit_16_compiled python3 train.py $T --trainer.max_steps 4 --run_name gpu_16c --trainer.precision 16-mixed --model.quant.compile_quantizers true
