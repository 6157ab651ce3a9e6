"""Time the full-size demo: a first run (trains the pair) and a cached second run.

    python bench/bench_demo.py [--out /tmp/sftscope-demo-bench] [--quick] [--first-only]
    python bench/bench_demo.py --moe --first-only        # the MoE demo
    python bench/bench_demo.py --stages --first-only     # the demo continued by DPO and GRPO

Targets on an idle 2-core CPU: first run under 5 minutes (`--moe`, `--stages`: at most 3 more),
cached run under 3. Prints, for each run, the wall and the CPU seconds (this process, all
threads) of every step and the load average before and after: on a shared machine wall seconds
are inflated by other work while CPU seconds move much less, so an idle wall time can be
estimated as max(CPU seconds / threads, sum of the steps' wall seconds at the load shown). Then
the paper's patterns as the report judges them and what the pair learned.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time

from sftscope.process import cpu_seconds, setup_process

os.environ.setdefault("SFTSCOPE_NO_PROGRESS", "1")
setup_process()  # as the CLI sets itself up, before torch is imported

from sftscope.demo.run import DemoConfig, run_demo, time_summary  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="/tmp/sftscope-demo-bench")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--moe", action="store_true")
    ap.add_argument("--stages", action="store_true")
    ap.add_argument("--first-only", action="store_true", help="Skip the cached second run.")
    ap.add_argument("--keep", action="store_true", help="Do not delete an existing folder first.")
    a = ap.parse_args()
    if not a.keep:
        shutil.rmtree(a.out, ignore_errors=True)
    for label in ("first run",) if a.first_only else ("first run", "cached run"):
        load0, t0, c0 = os.getloadavg(), time.perf_counter(), cpu_seconds()
        res = run_demo(DemoConfig(out=a.out, quick=a.quick, moe=a.moe, stages=a.stages))
        wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0
        load1 = os.getloadavg()
        print(f"{label}: wall {wall:.1f} s, cpu {cpu:.1f} s, load average {load0[0]:.2f} before "
              f"and {load1[0]:.2f} after (2 cores)\n{time_summary(res)}", flush=True)
    for p in res.patterns:
        print(f"  {p['holds']!s:>5}  {p['pattern']}: {p['evidence']}")
    print("pair:", {k: round(v, 3) for k, v in res.pair.get("metrics", {}).items()})


if __name__ == "__main__":
    main()
