"""Capture with all metrics vs a bare forward pass over the same batches (target <= 1.15x).

    python bench/bench_capture.py [--family llama --layers 8 --hidden 256 --n 256 --seq 128]
                                  [--threads 2 --repeats 3]

Side by side in one process, interleaved per repeat so a load change hits all alike: the bare
pass (the same inner model, no LM head, the same right-padded batches, no hooks), capture with
the token metrics overlapped with the next batch's forward pass (a worker thread, the default),
and capture computing them inline (``overlap=False``, the old schedule). Prints the median of
the repeats, each ratio to the bare pass, tokens/s, the load average and peak RSS.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import time

import torch

os.environ.setdefault("SFTSCOPE_NO_PROGRESS", "1")

from sftscope.capture.engine import batches  # noqa: E402
from sftscope.capture.hooks import inner_model  # noqa: E402
from sftscope.capture.stream import CaptureConfig, capture  # noqa: E402
from sftscope.load.data import TokenizedSet  # noqa: E402
from sftscope.load.tiny import build_tiny_model  # noqa: E402


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--family", default="llama")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--n", type=int, default=256, help="texts (pooled set)")
    ap.add_argument("--n-token", type=int, default=100, help="texts with token-level metrics")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--check", action="store_true",
                    help="also assert both capture schedules give identical numbers")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    model = build_tiny_model(a.family, a.vocab, n_layers=a.layers, hidden=a.hidden,
                             n_heads=max(4, a.hidden // 64), max_positions=a.seq + 8)
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(a.seq // 2, a.seq + 1, (a.n,), generator=g).tolist()
    ids = [torch.randint(4, a.vocab, (n,), generator=g).tolist() for n in lengths]
    tok = TokenizedSet(ids, [None] * a.n, 0, a.seq)
    n_tokens = sum(lengths)
    run = inner_model(model)

    def bare() -> float:
        t0 = time.perf_counter()
        with torch.inference_mode():
            for b in batches(tok, a.batch, 0):
                run(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False)
        return time.perf_counter() - t0

    results = {}

    def full(overlap: bool) -> float:
        t0 = time.perf_counter()
        results[overlap] = capture(model, tok, CaptureConfig(batch_size=a.batch,
                                                             n_token=a.n_token,
                                                             overlap=overlap), 0)
        return time.perf_counter() - t0

    load_before = _load()
    bare()  # warm-up
    full(True)
    full(False)
    times: dict[str, list[float]] = {"bare": [], "overlap": [], "inline": []}
    for _ in range(a.repeats):
        times["bare"].append(bare())
        times["overlap"].append(full(True))
        times["inline"].append(full(False))
    med = {k: statistics.median(v) for k, v in times.items()}
    params = sum(p.numel() for p in model.parameters()) / 1e6
    pooled_mb = 2 * (a.layers + 1) * a.n * a.hidden * 4 / 2**20
    print(f"model: {a.family} {a.layers} blocks, hidden {a.hidden}, {params:.1f}M params; "
          f"{a.n} texts, {n_tokens} tokens, batch {a.batch}, token metrics on {a.n_token}; "
          f"threads {torch.get_num_threads()}; median of {a.repeats}")
    print(f"load average before {load_before}, after {_load()}")
    labels = {"bare": "bare forward", "overlap": "capture (overlapped)",
              "inline": "capture (inline)"}
    for k, v in med.items():
        runs = ", ".join(f"{x:.2f}" for x in times[k])
        print(f"{labels[k]:22s} {v:7.2f} s  {n_tokens / v:9.0f} tok/s  "
              f"ratio {v / med['bare']:6.3f}x  (runs: {runs})")
    print(f"target: capture (overlapped) <= 1.15x bare; got {med['overlap'] / med['bare']:.3f}x")
    print(f"pooled buffers    {pooled_mb:7.1f} MiB (mean + last, [L+1, N, D] float32)")
    print(f"peak RSS          {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:7.0f} "
          f"MiB")
    if a.check:
        x, y = results[True], results[False]
        same = torch.equal(x.pooled_mean, y.pooled_mean) and all(
            torch.equal(x.token[k].nan_to_num(7.0), y.token[k].nan_to_num(7.0))
            for k in x.token)
        print(f"overlapped == inline, bit for bit: {same}")


if __name__ == "__main__":
    main()
