# aisp-bench: `make help` lists the targets.
#
# SCALE=smoke (default on a machine without CUDA) runs every experiment on the offline
# pair with tiny budgets; SCALE=paper runs the paper's budgets (a GPU and the hub needed).
# PAIR=<model>__<reward> picks the model/reward pair, e.g. PAIR=llama3_8b__ultrarm.
# Every target only computes what is missing: complete runs are reused, tables and
# figures are rebuilt from the files on disk.

SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
# make test: pytest-xdist workers, one torch thread each (the suite is mostly many small models
# and subprocesses; 2 keeps both cores of a small machine busy)
TEST_WORKERS ?= 2
SCALE ?= smoke
# The commands share one syntax (key=value overrides, see each one's --help) and one run
# selection (results_dir=..., select.pair=..., select.variant=...).
# EVAL_REWARD: the reward model Table 1 reports (the paper: UltraRM for every pair);
# empty = each run's own reward model. GOLD_REWARD: the held-out reward of Table 1's extended
# view (the other of UltraRM and Eurus on GPU; MiniLM similarity offline); empty: none.
# JUDGE_ARGS: how Tables 2-3 are judged (the paper: GPT-4, aisp_bench/conf/judge/gpt4.yaml;
# offline: a held-out reward model, in process). SENSITIVITY_GRID: the fixed-budget sweep
# (conf/experiment/sensitivity.yaml: n·κ = 1024, n 8..128, σ 0.25/0.5/1; smoke: n·κ = 8,
# (n, κ) = (2, 4), (4, 2), σ 0.25 and 1, 4 tokens, on the 2 demo prompts: a few seconds a run).
ifeq ($(SCALE),smoke)
  PAIR ?= smollm2_135m__smollm2_judge
  RESULTS ?= $(or $(AISP_BENCH_RESULTS),results)/smoke
  ENCODER ?= minilm
  EVAL_REWARD ?=
  GOLD_REWARD ?= minilm_similarity
  JUDGE_ARGS ?= judge=reward_model reward=minilm_similarity
  SENSITIVITY_GRID ?= sensitivity_budget=8 'budget.n=2,4' 'method.sigma=0.25,1.0' generation.max_new_tokens=4 budget.tau=4
  SENSITIVITY_DATASET ?= demo
  LAMBDA_DATASET ?= demo
else ifeq ($(SCALE),paper)
  PAIR ?= llama3_8b__ultrarm
  RESULTS ?= $(or $(AISP_BENCH_RESULTS),results)
  ENCODER ?= simcse
  EVAL_REWARD ?= ultrarm
  GOLD_REWARD ?= $(if $(filter eurus,$(REWARD)),ultrarm,eurus)
  JUDGE_ARGS ?=
  SENSITIVITY_GRID ?=
  SENSITIVITY_DATASET ?= shp
  LAMBDA_DATASET ?= shp
else
  $(error SCALE must be smoke or paper, got '$(SCALE)')
endif
MODEL := $(word 1,$(subst __, ,$(PAIR)))
REWARD := $(word 2,$(subst __, ,$(PAIR)))
SWEEP := $(PY) -m aisp_bench -m scale=$(SCALE) model=$(MODEL) reward=$(REWARD) progress=false results_dir=$(RESULTS)

# On a cluster (README: "On a cluster"): CLUSTER=slurm submits the runs of `make runs` as one
# Slurm job array (aisp_bench/conf/hydra/launcher/slurm.yaml, e.g.
# LAUNCHER_ARGS='hydra.launcher.partition=gpu'); CLUSTER=ray runs them as Ray tasks, one GPU
# each, on this machine's GPUs (or a Ray cluster: LAUNCHER_ARGS=hydra.launcher.address=auto);
# CLUSTER=local as local processes. SHARDS=K splits every run's prompts into K jobs (SHARD=3,7:
# only those); PLAN=1 prints the plan of `make runs` / `make paper` (jobs, tokens, GPU-hours,
# and with GPUS=8 the wall time; PLAN_ARGS=plan.tokens_per_second=...) and runs nothing. The
# other targets read shards as runs: `make table1` needs no SHARDS.
CLUSTER ?=
SHARDS ?= 1
LAUNCH := $(if $(CLUSTER),hydra/launcher=$(CLUSTER) $(LAUNCHER_ARGS))
SHARDING := $(if $(filter-out 1,$(SHARDS)),dataset.num_shards=$(SHARDS) 'dataset.shard=$(or $(SHARD),range($(SHARDS)))')
TABLE1_GRID = experiment=table1 $(if $(SEEDS),seed=$(SEEDS)) $(SHARDING) $(LAUNCH)
ifneq ($(PLAN),)
  ifneq ($(filter-out paper runs plan,$(MAKECMDGOALS)),)
    $(error PLAN=1 shows the plan of make paper or make runs, not of $(filter-out paper runs plan,$(MAKECMDGOALS)))
  endif
endif
REPORT := $(PY) -m aisp_bench.report results_dir=$(RESULTS)
TABLE1_RUNS := results_dir=$(RESULTS) select.pair=$(PAIR) select.variant=table1
# evaluate the runs of PAIR in the variants $(1) (e.g. table1, 'sensitivity*', [table1,sensitivity*])
EVALUATE = $(PY) -m aisp_bench.evaluate results_dir=$(RESULTS) select.pair=$(PAIR) 'select.variant=$(1)' \
  encoder=$(ENCODER) $(if $(EVAL_REWARD),reward=$(EVAL_REWARD)) $(if $(GOLD_REWARD),gold_reward=$(GOLD_REWARD))
EVAL_VARIANTS ?= table1

# The benchmark data beside this checkout, where present (../shared/data); elsewhere the hub.
# The SHP file is the lineage's 1000 prompts (the paper's set). The HH-RLHF file is the
# harmless-base subset only, so it stands in for HH-RLHF below SCALE=paper alone; the
# paper's HH-RLHF is the hub's whole test split (AISP_HH_PATH=FILE to choose otherwise).
SHARED_DATA ?= ../shared/data
ifneq ($(wildcard $(SHARED_DATA)/shp/test_1000.jsonl),)
  export AISP_SHP_PATH ?= $(abspath $(SHARED_DATA)/shp/test_1000.jsonl)
endif
ifneq ($(wildcard $(SHARED_DATA)/hh-rlhf/harmless-base/test.jsonl.gz),)
  ifneq ($(SCALE),paper)
    export AISP_HH_PATH ?= $(abspath $(SHARED_DATA)/hh-rlhf/harmless-base/test.jsonl.gz)
  endif
endif

.PHONY: help setup demo test test-fast bench bench-gpu bench-gpu-engine plan slurm-local fault-injection runs table1 table2 table3 figure2 compute budget \
        judge judge_bias lambda_runs lambda_sweep sensitivity_runs sensitivity evaluate report paper smoke clean-smoke

help:  ## list the targets
	@grep -E '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | expand -t 16

setup:  ## create .venv and install aisp-bench with the offline models (idempotent; SKIP_SETUP=1 skips)
	@if [ -z "$(SKIP_SETUP)" ]; then VENV=$(VENV) bash scripts/setup_env.sh; fi

demo: setup  ## offline demo: AISP and both BoN on 3 prompts with SmolLM2, then a comparison table
	$(PY) -m aisp_bench -m experiment=demo progress=false
	$(PY) -m aisp_bench.report target=compare select.dataset=demo select.variant=demo

test: setup  ## run the test suite (what CI runs), on TEST_WORKERS processes (pytest-xdist)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadgroup

test-fast: setup  ## the tests that load no model
	$(PY) -m pytest -q -m "not slow"

bench: setup  ## engine vs transformers generate on the CPU (results/bench/engine_cpu.json)
	$(PY) scripts/bench_engine.py
	$(PY) scripts/bench_rewards.py

bench-gpu: setup  ## the three methods end to end on CUDA at paper settings (results/bench/methods_gpu.json: what make plan reads)
	$(PY) scripts/bench_methods.py --out results/bench/methods_gpu.json

bench-gpu-engine: setup  ## the engine against transformers generate on CUDA (results/bench/engine_gpu.json)
	$(PY) scripts/bench_gpu.py

fault-injection: setup  ## kill -9 tiny runs at every step and at random times, rerun, check (RANDOM_KILLS=10)
	$(PY) scripts/fault_injection.py --random $(or $(RANDOM_KILLS),10)

plan: setup  ## what `make runs` costs: jobs, prompts, samples, tokens, GPU-hours (CLUSTER, SHARDS, GPUS, PLAN_ARGS)
	$(PY) -m aisp_bench.plan -m scale=$(SCALE) model=$(MODEL) reward=$(REWARD) results_dir=$(RESULTS) $(TABLE1_GRID) \
	  $(if $(GPUS),plan.gpus=$(GPUS)) $(PLAN_ARGS)

slurm-local:  ## a one-node Slurm on this machine (root; apt-get install slurm-wlm munge); SLURM=stop stops it
	bash scripts/local_slurm.sh $(or $(SLURM),start)

ifeq ($(PLAN),)
runs: setup  ## the Table 1 runs for PAIR (3 methods x SHP, HH-RLHF x seeds 0-2; SEEDS=0,1; CLUSTER, SHARDS)
	$(SWEEP) $(TABLE1_GRID)
else
runs: plan
endif

evaluate: runs  ## reward, gold reward, diversity, coherence, base_logprob of those runs into their summary.json
	$(call EVALUATE,$(EVAL_VARIANTS))

table1: evaluate  ## results/tables/table1.{md,csv,tex} (paper values beside) and table1_extended (intervals)
	$(REPORT) target=table1

figure2: runs  ## results/figures/figure2_<dataset>.png: reward against iteration k (100 seeded prompts)
	$(REPORT) target=figure2

compute: runs  ## best reward against samples, tokens, FLOPs, depth, seconds (figure and table; equal-compute view)
	$(REPORT) target=compute

budget: evaluate  ## proxy and gold reward of the returned response as the budget grows, and against base_logprob
	$(REPORT) target=budget

# AISP's seeds vs the baselines' seeds (trial k = seed k), on every dataset of the Table 1
# runs; one call judges every baseline it is given (one model load, one request budget).
JUDGE = $(PY) -m aisp_bench.judge $(TABLE1_RUNS) method_a=aisp 'method_b=$(1)' $(JUDGE_ARGS)

table2: runs  ## win rate AISP vs BoN (top-p) by the judge (aisp_bench/conf/judge/gpt4.yaml; OPENAI_API_KEY)
	$(call JUDGE,bon_topp)
	$(REPORT) target=table2

table3: runs  ## win rate AISP vs BoN (N(0,σ²I)) by the judge
	$(call JUDGE,bon_gaussian)
	$(REPORT) target=table3

BASELINES := [bon_topp,bon_gaussian]
judge: runs  ## the win rates of Tables 2 and 3 in one judge call
	$(call JUDGE,$(BASELINES))

judge_bias: judge  ## the judge's position and length bias (results/tables/judge_bias.{md,csv})
	$(REPORT) target=judge_bias

lambda_runs: setup  ## the λ-sweep runs of AISP (DATASET=shp; smoke: demo, where smollm2_judge's λ was tuned)
	$(SWEEP) experiment=lambda_sweep dataset=$(or $(DATASET),$(LAMBDA_DATASET))

lambda_sweep: lambda_runs  ## AISP over a λ grid with the std(r/λ) tuning signal (DATASET=shp; smoke: demo)
	$(REPORT) target=lambda_sweep

sensitivity_runs: setup  ## AISP at a fixed budget n·κ: splits (n, κ) x σ (DATASET=shp, smoke: demo; SENSITIVITY_GRID)
	$(SWEEP) experiment=sensitivity dataset=$(or $(DATASET),$(SENSITIVITY_DATASET)) $(SENSITIVITY_GRID)

sensitivity: sensitivity_runs  ## final reward, base_logprob and seconds of those runs: table and figure
	$(call EVALUATE,sensitivity*)
	$(REPORT) target=sensitivity

report:  ## every table and figure from the files on disk (loads no model; skips what has no input)
	$(REPORT) 'target=[table1,figure2,compute,budget,table2,table3,judge_bias,lambda_sweep,sensitivity]'

ifeq ($(PLAN),)
paper: evaluate judge  ## every artefact for PAIR (CLUSTER=slurm SHARDS=16: the runs as one Slurm array)
	$(MAKE) report
else
paper: plan
endif

smoke: setup  ## the whole chain offline on CPU in minutes (tables, figures, budget curves, win rates, judge bias, λ sweep, sensitivity)
	$(MAKE) sensitivity_runs evaluate judge lambda_runs SCALE=smoke EVAL_VARIANTS='[table1,sensitivity*]'
	$(MAKE) report SCALE=smoke

clean-smoke:  ## delete results/smoke
	rm -rf results/smoke
