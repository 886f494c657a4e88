"""Kill real runs with SIGKILL at every life-cycle phase and at random times; rerun; check the folders.

Each schedule starts a run (``python -m aisp_bench``, tiny offline budget, one process
group), kills it (at a life-cycle step, ``scripts/kill_points.py``, or after a random delay;
a random schedule kills up to ``--max-kills`` successive attempts), then reruns it to the
end and checks the folder: every line of records.jsonl parses, each prompt is there
exactly once, the records equal an uninterrupted run's (every field but timings), the
manifest is closed and the summary counts every prompt. Prints and writes the success
rate (``results/bench/fault_injection.json``)::

    python scripts/fault_injection.py                          # aisp and bon_topp: 6 phases + 10 random each
    python scripts/fault_injection.py --random 40 --methods aisp --seed 3

The test suite (tests/test_fault_injection.py) uses ``check_folder`` and ``run_cli`` from
here and kills forked runs at every phase.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import kill_points

ROOT = Path(__file__).resolve().parents[1]
TINY = ["dataset=demo", "dataset.num_prompts=2", "budget.n=2", "budget.kappa=1", "budget.tau=4",
        "generation.max_new_tokens=4", "progress=false"]  # fmt: skip
def is_timing(key: str) -> bool:
    """Record fields that differ between two runs of one config: ``seconds``, ``final_candidate_seconds``."""
    return key.endswith("seconds")


def run_cli(args: list[str], results: Path, *, kill_at: str | None = None, kill_after: float | None = None,
            timeout: float = 300) -> tuple[int, str]:
    """(exit code, stderr) of ``python -m aisp_bench args`` in its own process group, killed with
    SIGKILL at phase ``kill_at`` (by itself) or ``kill_after`` seconds after its start (the group)."""
    env = dict(os.environ, AISP_BENCH_RESULTS=str(results), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    entry = [str(ROOT / "scripts" / "kill_points.py"), kill_at] if kill_at else ["-m", "aisp_bench"]
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([sys.executable, *entry, *args], cwd=ROOT, env=env,
                                stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
        try:
            proc.wait(timeout=kill_after if kill_after is not None else timeout)
        except subprocess.TimeoutExpired:
            pass
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        err.seek(0)
        return proc.returncode, err.read()


def strip_timings(obj: Any) -> Any:
    """``obj`` without the timing fields, at any depth (AISP's iterations have their own)."""
    if isinstance(obj, dict):
        return {k: strip_timings(v) for k, v in obj.items() if not is_timing(k)}
    if isinstance(obj, list):
        return [strip_timings(v) for v in obj]
    return obj


def read_lines(run_dir: Path) -> list[dict]:
    """Every line of records.jsonl parsed (a line that does not parse raises)."""
    return [json.loads(line) for line in (run_dir / "records.jsonl").read_text().splitlines()]


def check_folder(run_dir: Path, reference: dict[str, dict]) -> list[str]:
    """What is wrong with a rerun folder against the uninterrupted run's records (by prompt id); [] if nothing."""
    try:
        recs = read_lines(run_dir)
        manifest = json.loads((run_dir / "manifest.json").read_text())
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError) as e:
        return [f"unreadable: {type(e).__name__}: {e}"]
    ids = [r["prompt_id"] for r in recs]
    problems = [] if sorted(ids) == sorted(reference) else [f"prompt ids {ids} != {sorted(reference)}"]
    for r in recs:
        ref = reference.get(r["prompt_id"])
        if ref is not None and strip_timings(r) != strip_timings(ref):
            diff = sorted(k for k in set(r) | set(ref) if strip_timings(r.get(k)) != strip_timings(ref.get(k)))
            problems.append(f"record {r['prompt_id']} differs from the uninterrupted run in {diff}")
    if not manifest.get("finished"):
        problems.append("manifest.json is not finished")
    if summary.get("num_done") != len(reference) or not summary.get("complete"):
        problems.append(f"summary.json: num_done {summary.get('num_done')}, complete {summary.get('complete')}")
    return problems


def run_dir_of(results: Path) -> Path:
    [run_dir] = [p.parent for p in results.glob("runs/*/*/*/*/seed*/manifest.json")]
    return run_dir


def schedule(args: list[str], results: Path, reference: dict[str, dict], kills: list[tuple[str, Any]]) -> dict:
    """Run with each kill in turn (("phase", name) or ("after", seconds)), then to the end; check."""
    done = []
    for how, when in kills:
        code, err = run_cli(args, results, **({"kill_at": when} if how == "phase" else {"kill_after": when}))
        done.append({"kill": [how, when], "exit": code, "killed": code == -signal.SIGKILL})
        if code not in (0, -signal.SIGKILL):
            return {"kills": done, "ok": False, "problems": [f"exit {code}: {err.strip()[-300:]}"]}
    code, err = run_cli(args, results)
    problems = [f"rerun exit {code}: {err.strip()[-300:]}"] if code != 0 else check_folder(run_dir_of(results), reference)
    return {"kills": done, "ok": not problems, "problems": problems}


def reference_run(args: list[str], results: Path) -> tuple[dict[str, dict], float, float]:
    """(records by prompt id, seconds until the run folder appeared, total seconds) of an uninterrupted run."""
    env = dict(os.environ, AISP_BENCH_RESULTS=str(results), OMP_NUM_THREADS="1")
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "aisp_bench", *args], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    appeared = None
    try:
        while proc.poll() is None:
            if appeared is None and any(results.glob("runs/*/*/*/*/seed*")):
                appeared = time.monotonic() - t0
            time.sleep(0.005)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    total = time.monotonic() - t0
    if proc.returncode != 0:
        raise SystemExit(f"the uninterrupted run failed (exit {proc.returncode}): {' '.join(args)}")
    recs = {r["prompt_id"]: r for r in read_lines(run_dir_of(results))}
    return recs, appeared if appeared is not None else total, total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default="aisp,bon_topp")
    ap.add_argument("--random", type=int, default=10, help="random kill schedules per method")
    ap.add_argument("--max-kills", type=int, default=3, help="kills per random schedule, at most")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "results" / "bench" / "fault_injection.json"))
    opts = ap.parse_args()
    rng = random.Random(opts.seed)
    results: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="aisp_fault_") as tmp:
        for method in opts.methods.split(","):
            args = [f"method={method}", *TINY]
            reference, t_folder, t_total = reference_run(args, Path(tmp) / method / "reference")
            print(f"{method}: uninterrupted run {t_total:.1f} s, run folder after {t_folder:.1f} s", flush=True)
            plans = [[("phase", p)] for p in kill_points.STEPS]
            for _ in range(opts.random):  # kill times spread over the run's writing window, and a little before
                plans.append([("after", round(rng.uniform(max(0.0, t_folder - 0.5), t_total * 1.05), 3))
                              for _ in range(rng.randint(1, opts.max_kills))])
            for i, kills in enumerate(plans):
                res = schedule(args, Path(tmp) / method / f"s{i}", reference, kills)
                results.append({"method": method, **res})
                print(f"  {'ok ' if res['ok'] else 'BAD'} {kills} {res['problems'] or ''}", flush=True)
    ok = sum(r["ok"] for r in results)
    print(f"{ok}/{len(results)} kill schedules rerun to records equal to an uninterrupted run")
    out = Path(opts.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"ok": ok, "total": len(results), "schedules": results}, indent=2) + "\n")
    sys.exit(0 if ok == len(results) else 1)


if __name__ == "__main__":
    main()
