"""The planner benchmark (SPEC §10): plan() on N linked pairs, median of PLANNER_RUNS, with the
peak RSS of its process, against a plain per-record loop that builds its records from the same
input frames (median of LOOP_RUNS).

The frames are built once (``benchmarks.synthetic.make_case``), written as Parquet, and read
back by a fresh process that runs plan(): its inputs are what a columnar staging area hands a
task (Arrow text, categorical low-cardinality text, float amounts), and its RSS holds no garbage
from building them. ``python -m benchmarks.planner child SIZE RUNS FOLDER`` is that process.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PLANNER_SIZES = [int(x) for x in os.environ.get("BENCH_PLANNER_SIZES", "100000,1000000").split(",") if x]
PLANNER_RUNS = int(os.environ.get("BENCH_PLANNER_RUNS", "3"))  # median of these
# the per-record loop: median of these (one by default: about 64 s a run at 1M pairs, some 30x
# the planner, so a second and third run cannot change the verdict; BENCH_LOOP_RUNS=3 for a median)
LOOP_RUNS = int(os.environ.get("BENCH_LOOP_RUNS", "1"))
FRAMES = ("pc", "crm", "links")


def _status() -> dict[str, str]:
    with open("/proc/self/status") as fh:
        return dict(line.split(":", 1) for line in fh if ":" in line)


def child(size: int, runs: int, folder: Path) -> dict[str, Any]:
    """In a fresh process: read the frames, then plan() ``runs`` times; times and peak RSS."""
    import pandas as pd

    from cosell_sync.engine.mapping import load_mapping
    from cosell_sync.engine.plan import plan

    mapping = load_mapping("salesforce")
    pc, crm, links = (pd.read_parquet(folder / f"{name}.parquet") for name in FRAMES)
    assert len(links) == size, (len(links), size)
    inputs_kib = int(_status()["VmRSS"].split()[0])
    with open("/proc/self/clear_refs", "w") as fh:  # the peak from here on: the inputs held, and plan()
        fh.write("5")
    seconds, cpu_seconds, changes = [], [], 0
    for _ in range(runs):
        start, start_cpu = time.perf_counter(), time.process_time()
        changes = len(plan(pc, crm, links, mapping).changes)
        seconds.append(time.perf_counter() - start)
        cpu_seconds.append(time.process_time() - start_cpu)  # every thread's: plan() hashes on two
    peak_kib = int(_status()["VmHWM"].split()[0])
    return {
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "changes": changes,
        "peak_rss_mib": peak_kib / 1024,
        "inputs_rss_mib": inputs_kib / 1024,
    }


def _in_fresh_process(size: int, folder: Path) -> dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "plugins")]))
    done = subprocess.run(  # our own interpreter, on our own code
        [sys.executable, "-m", "benchmarks.planner", "child", str(size), str(PLANNER_RUNS), str(folder)],
        capture_output=True, text=True, env=env, cwd=ROOT, check=False,
    )  # fmt: skip
    if done.returncode:
        raise RuntimeError(f"the planner benchmark process failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def bench_planner() -> list[dict[str, Any]]:
    """The vectorized planner vs the per-record loop, per size in PLANNER_SIZES."""
    from benchmarks.reference_planner import reference_plan
    from benchmarks.synthetic import make_case
    from cosell_sync.engine.mapping import load_mapping

    mapping = load_mapping("salesforce")
    rows = []
    for size in PLANNER_SIZES:
        pc, crm, links = make_case(size, mapping, seed=7)
        with tempfile.TemporaryDirectory(prefix="cosell-planner-") as tmp:
            for name, frame in zip(FRAMES, (pc, crm, links), strict=True):
                frame.to_parquet(Path(tmp) / f"{name}.parquet", index=False)
            planner = _in_fresh_process(size, Path(tmp))
        loop_times, looped = [], None
        for _ in range(LOOP_RUNS):
            start = time.perf_counter()
            looped = reference_plan(pc.to_dict("records"), crm.to_dict("records"), links.to_dict("records"), mapping)
            loop_times.append(time.perf_counter() - start)
        assert looped is not None and planner["changes"] == len(looped["changes"]), "planner and loop disagree"
        plan_s, loop_s = statistics.median(planner["seconds"]), statistics.median(loop_times)
        rows.append(
            {
                "pairs": size,
                "seconds": plan_s,
                "cpu_seconds": statistics.median(planner["cpu_seconds"]),  # less moved by a busy machine
                "loop_from_frames_seconds": loop_s,
                "peak_rss_mib": planner["peak_rss_mib"],  # the whole process: input frames included
                "inputs_rss_mib": planner["inputs_rss_mib"],  # the input frames alone, before plan()
                "planner_rss_over_inputs_mib": planner["peak_rss_mib"] - planner["inputs_rss_mib"],
                "speedup": loop_s / plan_s,
                "runs": {
                    "planner": planner["seconds"],
                    "planner_cpu": planner["cpu_seconds"],
                    "loop_from_frames": loop_times,
                },
                "changes": planner["changes"],
            }
        )
        print(
            f"planner {size:>9,} pairs: {plan_s:6.2f}s median of {PLANNER_RUNS} (target <= 3 s at 1M; CPU "
            f"{statistics.median(planner['cpu_seconds']):.2f}s), peak RSS "
            f"{planner['peak_rss_mib']:,.0f} MiB (target <= 1,536; its inputs {planner['inputs_rss_mib']:,.0f} MiB); "
            f"the per-record loop from the same frames "
            f"{loop_s:6.2f}s -> {loop_s / plan_s:.1f}x (target >= 10x); {planner['changes']:,} field writes planned",
            flush=True,
        )
    return rows


if __name__ == "__main__":
    if sys.argv[1:2] == ["child"]:
        print(json.dumps(child(int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]))))
    else:
        print(json.dumps(bench_planner(), indent=2))
