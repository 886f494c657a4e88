"""scripts/bench_methods.py (make bench-gpu) as a CPU dry run with tiny shapes: the GPU
benchmark runs end to end, its checks pass and its numbers add up, so it never rots."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_methods_dry_run(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_methods", ROOT / "scripts" / "bench_methods.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "m.json"
    report = bench.main(["--device", "cpu", "--out", str(out)])
    assert json.loads(out.read_text())["sanity_failures"] == report["sanity_failures"] == []
    assert all(v is not False for part in report["checks"].values() for v in part.values())
    assert report["checks"]["decode_steps"]["eos_rows"] > 0  # the step checks had rows end early
    assert report["checks"]["reward"]["reward_prefix_tokens_saved"] > 0  # the reward check shared its prompts
    c = report["device_ceilings"]
    assert c["bandwidth_bytes_s"] > 0 and c["matmul_flops_s"] > 0
    dec = report["decode"]
    assert {"eager_copy", "eager_shared", "eager_shared_sync1", "static"} <= set(dec)
    for name in ("eager_copy", "eager_shared", "static"):
        r = dec[name]
        assert r["tokens"] == dec["rows"] * 8 and 0 < r["floor_fraction"] < 1
        assert r["agreement_with_eager_copy"] == 1.0  # fp32: every path decodes the same tokens
    rew = report["reward"]
    assert rew["prompts"] == 64 // 4 and rew["rows"] == 64 and rew["settings"]["attention"] == "auto"
    for name in ("configured", "full", "split", "sdpa", "tokens_x2"):
        r = rew[name]
        assert r["seconds_per_prompt_iteration"] > 0 and 0 < r["floor_fraction"] < 1
        assert r["max_abs_diff_to_configured"] < 1e-4  # fp32: every setting scores the same
    assert "aten::mm" in rew["profile"]["table"]
    m = report["methods"]
    assert set(m) == {"aisp/default", "bon_gaussian/N8/default", "bon_topp/N8/default", "bon_topp/N8/prefilter0",
                      "bon_gaussian/N16/default", "bon_topp/N16/default", "bon_topp/N16/prefilter0",
                      "spec_rejection/N32/default", "particle_filter/N16/default"}
    for name, r in m.items():
        parts = r["per_prompt"]
        assert math.isclose(sum(parts.values()), r["seconds_per_prompt"], rel_tol=1e-6)
        assert parts["decode"] > 0 and parts["reward"] > 0 and 0 < r["floor_fraction"] < 1
        assert r["all_rows_full_length"] and r["rewards_finite"]
    aisp = m["aisp/default"]
    assert aisp["prompts"] == 64 // 4 and len(aisp["iterations"]) == 3
    for it in aisp["iterations"]:
        assert math.isclose(it["decode"] + it["reward"] + it["other"], it["seconds"], rel_tol=1e-6)
    bon = m["bon_topp/N16/default"]  # as run.py batches: 64 rows // N prompts
    assert bon["prompts"] == 64 // 16 and bon["tokens"] == bon["prompts"] * 16 * 8
    # the CPU's default samples through the top-k prefilter; prefilter0 is the full sort
    for N in (8, 16):  # ... and gives the same results
        assert m[f"bon_topp/N{N}/prefilter0"]["results_sha256"] == m[f"bon_topp/N{N}/default"]["results_sha256"]
    sr, pf = m["spec_rejection/N32/default"], m["particle_filter/N16/default"]  # at BoN N = 16's token budget
    assert sr["prompts"] == 64 // 32 and sr["tokens"] == 2 * (32 * 2 + 16 * 2 + 8 * 2 + 4 * 2) < 2 * 16 * 8
    assert sr["reward_calls"] == 4 and pf["reward_calls"] == 8 and pf["tokens"] == pf["prompts"] * 16 * 8
    profile = report["profile"]
    assert "aten::sort" in profile["eager_topp"]["table"] and "aten::mm" in profile["eager_noise"]["table"]
    assert len(report["table"]) == 2 + 4 + 5 + 9 and "bon_topp/N16/prefilter0" in report["table"][-1]
