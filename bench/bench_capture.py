"""Capture with all metrics vs a bare forward pass over the same batches (target <= 1.15x).

    python bench/bench_capture.py [--family llama --layers 8 --hidden 256 --n 256 --seq 128]

Prints seconds for each, the ratio, tokens/s and peak RSS; the bare pass runs the same inner
model (no LM head) on the same padded batches, without hooks.
"""

from __future__ import annotations

import argparse
import os
import resource
import time

import torch

os.environ.setdefault("SFTSCOPE_NO_PROGRESS", "1")

from sftscope.capture.hooks import inner_model  # noqa: E402
from sftscope.capture.stream import CaptureConfig, capture  # noqa: E402
from sftscope.load.data import TokenizedSet, iter_batches  # noqa: E402
from sftscope.load.tiny import build_tiny_model  # noqa: E402


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
        with torch.no_grad():
            for b in iter_batches(tok, a.batch, 0):
                run(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False)
        return time.perf_counter() - t0

    def full() -> float:
        t0 = time.perf_counter()
        capture(model, tok, CaptureConfig(batch_size=a.batch, n_token=a.n_token), 0)
        return time.perf_counter() - t0

    bare()  # warm-up
    full()
    tb = min(bare() for _ in range(a.repeats))
    tf = min(full() for _ in range(a.repeats))
    params = sum(p.numel() for p in model.parameters()) / 1e6
    pooled_mb = 2 * (a.layers + 1) * a.n * a.hidden * 4 / 2**20
    print(f"model: {a.family} {a.layers} blocks, hidden {a.hidden}, {params:.1f}M params; "
          f"{a.n} texts, {n_tokens} tokens, batch {a.batch}, token metrics on {a.n_token}; "
          f"threads {torch.get_num_threads()}")
    print(f"bare forward      {tb:7.2f} s  {n_tokens / tb:9.0f} tok/s")
    print(f"capture + metrics {tf:7.2f} s  {n_tokens / tf:9.0f} tok/s")
    print(f"ratio             {tf / tb:7.3f}x (target <= 1.15x)")
    print(f"pooled buffers    {pooled_mb:7.1f} MiB (mean + last, [L+1, N, D] float32)")
    print(f"peak RSS          {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:7.0f} MiB")


if __name__ == "__main__":
    main()
