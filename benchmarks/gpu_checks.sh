#!/usr/bin/env bash
# The GPU half of the test suite and the short GPU checks, in one device call:
#   source benchmarks/device_env.sh && bash benchmarks/gpu_checks.sh "$OUT" [seconds per step]
# Writes each step's log (and the multi-GPU JSON) under $1; a failing or timed-out step does
# not stop the others. Needs torch + Triton with CUDA, keras and h5py (carry .whl); no
# TensorFlow.
out=${1:-/tmp/gpu_checks}
limit=${2:-600}
mkdir -p "$out"
step() {  # name, command...
  local name=$1; shift
  local t0=$SECONDS
  timeout "$limit" "$@" >"$out/$name.log" 2>&1
  echo "$name: rc=$? $((SECONDS - t0))s  $(tail -1 "$out/$name.log")"
}
export PYTHONSAFEPATH=1  # tests import keras_hps from the mapped site, not the checkout
step kernels_and_tiers python3 -m pytest -q -p no:cacheprovider \
  tests/test_kernels_strided.py tests/test_kernels_static.py tests/test_kernels_cache.py \
  tests/test_kernels_combiners.py tests/test_gpu_cache.py tests/test_gpu_tier.py \
  tests/test_gpu_shards.py tests/test_capture.py tests/test_lookup_tables.py \
  tests/test_convert_plan.py tests/test_combiner.py tests/test_interpreter_threads.py
step layers_torch env KERAS_BACKEND=torch python3 -m pytest -q -p no:cacheprovider \
  tests/test_layers_torch.py
step updates env KERAS_HPS_TEST_GPU_TIER=auto python3 -m pytest -q -p no:cacheprovider \
  tests/test_updates.py
step unload python3 benchmarks/check_unload_gpu.py --rows 2000000
step multigpu_virtual python3 benchmarks/bench_multigpu.py lookup --virtual --gpus 1,2,4 \
  --seconds 2 --json "$out/multigpu_virtual.json"
