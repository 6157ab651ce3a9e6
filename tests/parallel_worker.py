"""One rank of tests/test_parallel.py's multi-process run (started by ``torchrun``).

argv[1] is a JSON object: the keyword arguments of analyze, probe and swap, and of the failing
runs. Each rank writes what it saw to ``<report>/rank<R>.json``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def one_and_two(tmp_path: Path, an: dict, pr: dict, sw: dict, env: dict[str, str],
                timeout: int = 300):
    """Run analyze, probe and swap in this process into ``tmp_path/one``, then the same under
    ``torchrun`` with 2 processes (this worker) into ``tmp_path/two``; the finished process."""
    import subprocess

    from sftscope.experiments.analyze import AnalyzeConfig, analyze
    from sftscope.experiments.lens import probe
    from sftscope.experiments.swap import swap

    one, two = tmp_path / "one", tmp_path / "two"
    analyze(AnalyzeConfig(out=str(one / "analyze"), cache_dir=str(tmp_path / "c1"), **an))
    probe(out=str(one / "probe"), **pr)
    swap(out=str(one / "swap"), **sw)
    args = {"analyze": {"out": str(two / "analyze"), "cache_dir": str(tmp_path / "c2"), **an},
            "probe": {"out": str(two / "probe"), **pr},
            "swap": {"out": str(two / "swap"), **sw},
            "analyze_bad": {"out": str(two / "bad"), "cache_dir": str(tmp_path / "c2"), **an},
            "probe_bad": {**pr}, "report": str(tmp_path)}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node", "2", str(Path(__file__)), json.dumps(args)],
                          env=env, capture_output=True, text=True, timeout=timeout)


def main() -> None:
    args = json.loads(sys.argv[1])
    import torch

    torch.set_num_threads(1)
    from sftscope.errors import SftscopeError
    from sftscope.experiments import analyze as analyze_mod
    from sftscope.experiments import lens as lens_mod
    from sftscope.experiments.analyze import AnalyzeConfig, analyze
    from sftscope.experiments.lens import probe
    from sftscope.experiments.swap import swap

    rank = int(os.environ["RANK"])
    report: dict = {"rank": rank, "world": int(os.environ["WORLD_SIZE"])}
    report["analyze_rows"] = len(analyze(AnalyzeConfig(**args["analyze"])))
    report["probe_rows"] = len(probe(**args["probe"]))
    report["swap_rows"] = len(swap(**args["swap"]))

    # validation fails on rank 1 only: every rank raises the same error, none waits forever
    if rank == 1:
        def broken(*_a, **_k):
            raise SftscopeError("data broken on rank 1")

        analyze_mod.prepare_data = broken
    try:
        analyze(AnalyzeConfig(**args["analyze_bad"]))
    except SftscopeError as e:
        report["validation_error"] = str(e)

    # the work fails on rank 1 only (a bug): rank 0 learns of it instead of waiting
    if rank == 1:
        def boom(*_a, **_k):
            raise RuntimeError("boom")

        lens_mod.lens_pass = boom
    try:
        probe(**args["probe_bad"])
    except Exception as e:  # noqa: BLE001 - the test checks what each rank raised
        report["work_error"] = f"{type(e).__name__}: {e}"
    Path(args["report"], f"rank{rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main()
