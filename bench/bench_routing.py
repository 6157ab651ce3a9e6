"""Routing capture of an MoE model vs the same capture without it (target <= 1.05x).

    python bench/bench_routing.py [--family mixtral --layers 8 --hidden 256 --experts 8
                                   --top-k 2 --n 128 --seq 128 --threads 2 --repeats 3]

Side by side in one process, interleaved per repeat (a load change hits all alike): the
hidden-state capture alone, and the same capture with each routing mode of
``capture.routing``: ``record`` (the base's pass of ``--router-input own``: per-sample
routing sums plus one file per sample of router probabilities written to a store),
``compare`` (the SFT's pass: the base's stored routing read batch by batch, JS and top-k
overlap per token) and ``apply`` (``--router-input base``: a copy of a second model's routers
run on the base's router inputs). Prints the median of the repeats, each ratio to the plain
capture and the paired ratio (each run over the plain capture of its own repeat), the store's
size on disk, the load average and peak RSS. Timings need an idle machine.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from sftscope.process import setup_process, tune_malloc  # noqa: E402

os.environ.setdefault("SFTSCOPE_NO_PROGRESS", "1")
setup_process(malloc=False)

import torch  # noqa: E402

from sftscope.capture.routing import (  # noqa: E402
    RouterStore,
    RoutingTask,
    router_copies,
    routing_shape,
)
from sftscope.capture.stream import CaptureConfig, capture  # noqa: E402
from sftscope.load.data import TokenizedSet  # noqa: E402
from sftscope.load.tiny import build_tiny_model  # noqa: E402


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--family", default="mixtral")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--n", type=int, default=128, help="texts (pooled set)")
    ap.add_argument("--n-token", type=int, default=32, help="texts with token-level metrics")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--no-tune-malloc", action="store_true")
    return ap.parse_args()


def main() -> None:
    a = _args()
    malloc = "untuned" if a.no_tune_malloc else ("tuned" if tune_malloc() else "untunable")
    if a.threads:
        torch.set_num_threads(a.threads)
    kw = dict(n_layers=a.layers, hidden=a.hidden, n_heads=max(4, a.hidden // 64),
              max_positions=a.seq + 8, n_experts=a.experts, top_k=a.top_k)
    model = build_tiny_model(a.family, a.vocab, seed=0, **kw).eval()
    other = router_copies(build_tiny_model(a.family, a.vocab, seed=1, **kw))
    shape = routing_shape(model.config)
    assert shape is not None, f"{a.family} is not a mixture of experts"
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(a.seq // 2, a.seq + 1, (a.n,), generator=g).tolist()
    ids = [torch.randint(4, a.vocab, (n,), generator=g).tolist() for n in lengths]
    tok = TokenizedSet(ids, [None] * a.n, 0, a.seq)
    n_tokens = sum(lengths)
    work = Path(tempfile.mkdtemp(prefix="bench-routing-"))
    base_store, scratch = RouterStore(work / "base"), work / "scratch"
    tasks = {"plain": lambda: None,
             "record": lambda: RoutingTask("record", *shape, store=RouterStore(scratch)),
             "compare": lambda: RoutingTask("compare", *shape, store=base_store),
             "apply": lambda: RoutingTask("apply", *shape, partners={"sft": other})}
    cfg = CaptureConfig(batch_size=a.batch, n_token=a.n_token)

    def timed(name: str) -> float:
        shutil.rmtree(scratch, ignore_errors=True)
        t0 = time.perf_counter()
        capture(model, tok, cfg, 0, routing=tasks[name]())
        return time.perf_counter() - t0

    load_before = _load()
    capture(model, tok, cfg, 0, routing=RoutingTask("record", *shape, store=base_store))
    for name in tasks:  # warm-up
        timed(name)
    times: dict[str, list[float]] = {k: [] for k in tasks}
    for _ in range(a.repeats):
        for name in tasks:
            times[name].append(timed(name))
    store_mb = sum(f.stat().st_size for f in (work / "base").iterdir()) / 2**20
    shutil.rmtree(work, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    paired = {k: statistics.median(x / p for x, p in zip(v, times["plain"], strict=True))
              for k, v in times.items()}
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"model: {a.family} {a.layers} blocks, hidden {a.hidden}, {a.experts} experts top-"
          f"{a.top_k}, {params:.1f}M params; {a.n} texts, {n_tokens} tokens, batch {a.batch}, "
          f"token metrics on {a.n_token}; threads {torch.get_num_threads()}; median of "
          f"{a.repeats}")
    print(f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, malloc {malloc}; "
          f"load average before {load_before}, after {_load()}")
    for k, v in med.items():
        runs = ", ".join(f"{x:.2f}" for x in times[k])
        print(f"capture {k:8s} {v:7.2f} s  {n_tokens / v:9.0f} tok/s  ratio "
              f"{v / med['plain']:6.3f}x, paired {paired[k]:6.3f}x  (runs: {runs})")
    print(f"router store      {store_mb:7.1f} MiB on disk ({n_tokens} tokens x "
          f"{len(shape[0])} blocks x {a.experts} experts, float32 + top-k)  (target <= 1.05x)")
    print(f"peak RSS          {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:7.0f} "
          f"MiB")


if __name__ == "__main__":
    main()
