"""Time the full-size demo: a first run (trains the pair) and a cached second run.

    python bench/bench_demo.py [--out /tmp/sftscope-demo-bench] [--quick]

Targets on a 2-core CPU: first run under 10 minutes, cached run under 3. Prints where the time
went in each run.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time

os.environ.setdefault("SFTSCOPE_NO_PROGRESS", "1")

from sftscope.demo.run import DemoConfig, run_demo, time_summary  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="/tmp/sftscope-demo-bench")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--keep", action="store_true", help="Do not delete an existing folder first.")
    a = ap.parse_args()
    if not a.keep:
        shutil.rmtree(a.out, ignore_errors=True)
    for label in ("first run", "cached run"):
        t0 = time.perf_counter()
        res = run_demo(DemoConfig(out=a.out, quick=a.quick))
        print(f"{label}: {time.perf_counter() - t0:.1f} s\n{time_summary(res)}", flush=True)
    for p in res.patterns:
        print(f"  {p['holds']!s:>5}  {p['pattern']}: {p['evidence']}")
    print("pair:", {k: round(v, 3) for k, v in res.pair.get("metrics", {}).items()})


if __name__ == "__main__":
    main()
