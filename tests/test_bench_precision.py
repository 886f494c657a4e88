"""scripts/bench_precision.py and scripts/bench_sampling.py as CPU dry runs (tiny shapes,
few rows): the GPU session's precision and sampler measurements run end to end, so they
never rot. The numbers themselves are measured on the device (BENCHMARKS.md)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_precision_dry_run(tmp_path):
    out = tmp_path / "p.json"
    report = load("bench_precision").main(["--device", "cpu", "--out", str(out)])
    assert json.loads(out.read_text())["verdicts"] == report["verdicts"]
    assert len(report["verdicts"]) == 3 and all(v.startswith("verdict ") for v in report["verdicts"])
    for shape in ("ultrarm13b", "eurus7b"):
        r = report[shape]
        assert r["prefix_tokens_saved"] > 0 and r["fp32_shared_equal"] and r["within_prompt_std"] > 0
        assert set(r["vs_fp32"]) == {"full", "full_rebatched", "split", "sdpa", "split_fp32_attention",
                                     "fp32_split"}
        assert r["vs_fp32"]["fp32_split"]["max_abs"] < 1e-4  # shared scoring is exact in fp32
        for v in ("full", "split", "sdpa"):  # bf16 moves rewards, a little, in tiny models
            assert 0 < r["vs_fp32"][v]["max_abs"] and r["vs_fp32"][v]["max_frac_of_spread"] < 0.2
    lp = report["logprob"]
    assert set(lp["vs_fp32"]) == {"shared_prefix", "copy", "forward"}
    assert all(0 < d["max_abs"] < 0.1 for d in lp["vs_fp32"].values()) and lp["std_across_responses"] > 0.1


def test_bench_sampling_dry_run(tmp_path):
    out = tmp_path / "s.json"
    report = load("bench_sampling").main(["--kinds", "peaked", "flat", "--vocab", "49k", "--rows", "8",
                                          "--repeats", "1", "--bon-n", "0", "--out", str(out)])
    r = json.loads(out.read_text())["results"]
    assert set(r) == set(report["results"]) == {"peaked/49k", "flat/49k"}
    assert all(x["identical"] and x["full_ms"] > 0 and x["prefilter_ms"] > 0 for x in r.values())
    assert r["flat/49k"]["fallback_fraction"] == 1.0 and r["peaked/49k"]["fallback_fraction"] < 0.5
