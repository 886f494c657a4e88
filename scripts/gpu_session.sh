#!/usr/bin/env bash
# The GPU checks and benchmarks in one command: run this on a machine with a CUDA GPU
# (on an 80 GB H100 the default shapes peaked at 56.2 GB and it took 316 s with
# --budget-s 330; BENCHMARKS.md):
#   bash scripts/gpu_session.sh            # writes $OUT (default results/bench): gpu.txt, gpu_tests.log,
#                                          # methods_gpu.json (what python -m aisp_bench.plan reads), bench_methods.log
# 1. the gpu-marked tests that need no hydra: the decode steps (CUDA graphs give eager's
#    tokens, fp32) and base_logprob in bf16 against the CPU (tests/test_scoring.py);
# 2. scripts/bench_methods.py: fp32 checks on CUDA (engine, decode steps, shared-prefix
#    reward scoring), the decode paths, one AISP iteration's reward scoring per setting, the
#    three methods end to end at paper settings, profiler tables (its --budget-s, default
#    360 s, skips what is left; extra arguments are passed to it, e.g. --parts reward).
# Needs torch with CUDA and transformers; not hydra, datasets or openai (the benchmark
# calls the library directly). PY=/path/to/python picks the interpreter (default python3).
# BENCHMARKS.md says what each number is for.
set -o pipefail
OUT=${OUT:-results/bench}
PY=${PY:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,memory.used,clocks.sm,clocks.mem --format=csv 2>&1 | tee "$OUT/gpu.txt"
$PY -m pytest -q -p no:cacheprovider -m gpu tests/test_decode_steps.py tests/test_scoring.py 2>&1 | tee "$OUT/gpu_tests.log"
$PY scripts/bench_methods.py --out "$OUT/methods_gpu.json" "$@" 2>&1 | tee "$OUT/bench_methods.log"
