#!/usr/bin/env bash
# The GPU checks and benchmarks in one command, on a machine with one CUDA GPU (80 GB class:
# the two bf16 models of the paper's shapes peaked at 56.2 GB on an H100). Budgeted to about
# 8 minutes: the benchmarks' --budget-s 150 and 210 (each may overrun by its last workload),
# plus the gpu tests and the sampler alone.
#
#   bash scripts/gpu_session.sh           # writes $OUT (default results/bench)
#   bash scripts/gpu_session.sh prepare   # where the GPU machine's Python lacks hydra/omegaconf: copies
#                                         # them (pure Python, 4 MB) from .venv into .gpu/pylib, which
#                                         # the run then puts on PYTHONPATH
#
# It writes gpu.txt, gpu_tests.log, precision_gpu.json (+ .log), sampling_gpu.json (+ .log),
# methods_gpu.json (what python -m aisp_bench.plan reads), bench_methods.log. In order:
# 1. every gpu-marked test (the files below; without hydra only those that need none):
#    CUDA graphs give eager's tokens, bf16 base_logprob against fp32, the top-p prefilter on
#    CUDA's kernels, shared-prefix reward scoring on the GPU;
# 2. scripts/bench_precision.py: bf16 against fp32 for reward scoring (the prompt shared
#    or not, re-batched, split and sdpa attention; UltraRM-13B and Eurus-RM-7B shapes)
#    and base_logprob (Llama-3-8B shape); one "verdict" line each;
# 3. scripts/bench_sampling.py: the top-p sampler alone, full sort against the top-k
#    prefilter, 256 rows of bf16 logits, 49k and 128k vocabularies;
# 4. scripts/bench_methods.py: the fp32 checks on CUDA, one AISP iteration's reward
#    scoring per setting (split against sdpa), the methods as python -m aisp_bench runs
#    them (the plan's throughputs) and BoN top-p with the prefilter (its --budget-s skips
#    what is left; extra arguments are passed to it).
# Needs torch with CUDA and transformers; not datasets or openai (the benchmarks call the
# library directly). PY=/path/to/python picks the interpreter (default python3).
# BENCHMARKS.md says what each number is for.
set -o pipefail
PY=${PY:-python3}
LIB=.gpu/pylib
if [ "${1:-}" = "prepare" ]; then
  SITE=$(.venv/bin/python -c "import site; print(site.getsitepackages()[0])")
  rm -rf "$LIB" && mkdir -p "$LIB" && cp -r "$SITE"/hydra "$SITE"/omegaconf "$SITE"/antlr4 "$LIB"/
  du -sh "$LIB"
  exit 0
fi
OUT=${OUT:-results/bench}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
TESTS="tests/test_decode_steps.py tests/test_scoring.py tests/test_sampling.py"
if $PY -c "import hydra" 2>/dev/null; then
  TESTS="$TESTS tests/test_reward_prefix.py tests/test_rewards.py"
elif [ -d "$LIB" ]; then
  export PYTHONPATH="$PYTHONPATH:$PWD/$LIB"
  TESTS="$TESTS tests/test_reward_prefix.py tests/test_rewards.py"
fi
nvidia-smi --query-gpu=name,memory.total,memory.used,clocks.sm,clocks.mem --format=csv 2>&1 | tee "$OUT/gpu.txt"
$PY -m pytest -q -p no:cacheprovider -m gpu $TESTS 2>&1 | tee "$OUT/gpu_tests.log"
$PY scripts/bench_precision.py --out "$OUT/precision_gpu.json" --budget-s 150 2>&1 | tee "$OUT/precision_gpu.log"
$PY scripts/bench_sampling.py --device cuda --rows 256 --dtype bfloat16 --kinds peaked flat \
  --out "$OUT/sampling_gpu.json" 2>&1 | tee "$OUT/sampling_gpu.log"
$PY scripts/bench_methods.py --out "$OUT/methods_gpu.json" --parts reward methods --bon-n 1024 \
  --steps cuda_graph --budget-s 210 "$@" 2>&1 | tee "$OUT/bench_methods.log"
