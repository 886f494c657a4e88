#!/usr/bin/env bash
# The device checks for a session with a lent GPU, in one command (about 7 minutes; on an
# H100 on 2026-11-28: 316 s, BENCHMARKS.md):
#   bash scripts/gpu_session.sh            # writes $OUT (default results/bench): gpu_tests.log,
#                                          # methods_gpu.json, bench_methods.log
# 1. the gpu-marked tests that need no hydra: the decode steps (CUDA graphs give eager's
#    tokens, fp32) and base_logprob in bf16 against the CPU (tests/test_scoring.py);
# 2. scripts/bench_methods.py: fp32 checks on CUDA (engine, decode steps, shared-prefix
#    reward scoring), the decode paths, one AISP iteration's reward scoring per setting, the
#    three methods end to end at paper settings, profiler tables (its --budget-s, default
#    360 s, skips what is left; extra arguments are passed to it, e.g. --parts reward).
# Needs torch with CUDA and transformers; not hydra, datasets or openai (the benchmark
# calls the library directly). BENCHMARKS.md says what each number is for.
set -o pipefail
OUT=${OUT:-results/bench}
PY=${PY:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,memory.used,clocks.sm,clocks.mem --format=csv 2>&1 | tee "$OUT/gpu.txt"
$PY -m pytest -q -p no:cacheprovider -m gpu tests/test_decode_steps.py tests/test_scoring.py 2>&1 | tee "$OUT/gpu_tests.log"
$PY scripts/bench_methods.py --out "$OUT/methods_gpu.json" "$@" 2>&1 | tee "$OUT/bench_methods.log"
