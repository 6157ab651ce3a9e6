"""Generation throughput of the GSM8K evaluator: batched left-padded vs one prompt at a time.

    python bench/bench_eval.py [--layers 10 --hidden 256 --n 32 --new 64 --batches 1,8,32]

Runs `evaluate.generate` (the evaluator's own path: left padding, attention mask, greedy,
stop-string criterion) on `--n` GSM8K-style prompts of varied length with a random tiny llama,
and prints generated tokens/s for each batch size and whether the completions equal the
one-by-one ones (greedy decoding should not depend on padding). The load average is printed
because the machine may be shared.
"""

from __future__ import annotations

import argparse
import os
import random
import time

import torch

os.environ.setdefault("SFTSCOPE_NO_PROGRESS", "1")

from sftscope.experiments.evaluate import generate  # noqa: E402
from sftscope.load.tiny import build_tiny_model, train_tokenizer  # noqa: E402
from sftscope.tasks.gsm8k import STOPS  # noqa: E402
from sftscope.tasks.gsm8k import prompt as gsm8k_prompt  # noqa: E402


def prompts(n: int, shots: int, seed: int = 0) -> list[str]:
    rnd = random.Random(seed)

    def rec() -> dict:
        a, b = rnd.randint(1, 99), rnd.randint(1, 99)
        filler = " Then she counts them again." * rnd.randint(0, 4)
        return {"question": f"Tom has {a} apples and buys {b} more.{filler} How many now?",
                "answer": f"He has {a} + {b} = {a + b} apples.\n#### {a + b}"}

    return [gsm8k_prompt(rec(), [rec() for _ in range(shots)]) for _ in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--layers", type=int, default=10)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--shots", type=int, default=1)
    ap.add_argument("--new", type=int, default=64, help="max new tokens")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--threads", type=int, default=0)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    tok = train_tokenizer()
    model = build_tiny_model("llama", len(tok), n_layers=a.layers, hidden=a.hidden,
                             n_heads=max(4, a.hidden // 64), max_positions=2048)
    ps = prompts(a.n, a.shots)
    lens = [len(tok(p)["input_ids"]) for p in ps]
    print(f"llama, {a.layers} blocks, hidden {a.hidden}; {a.n} prompts of {min(lens)}-"
          f"{max(lens)} tokens, {a.new} new tokens max, {torch.get_num_threads()} threads, "
          f"load average {os.getloadavg()[0]:.2f}")
    generate(model, tok, ps[:2], max_new_tokens=4, batch_size=2, stops=STOPS)  # warm-up
    ref = None
    print(f"{'batch':>6} {'seconds':>8} {'new tokens':>10} {'tokens/s':>9} {'cpu s':>7} "
          f"{'speed-up':>8}  same as one-by-one")
    base = None
    for bs in [int(b) for b in a.batches.split(",")]:
        t0, c0 = time.perf_counter(), time.process_time()
        gens = generate(model, tok, ps, max_new_tokens=a.new, batch_size=bs, stops=STOPS)
        secs, cpu = time.perf_counter() - t0, time.process_time() - c0
        n_new = sum(g.new_tokens for g in gens)
        rate = n_new / secs
        if ref is None:
            ref, base = [g.raw for g in gens], rate
        same = sum(g.raw == r for g, r in zip(gens, ref))
        print(f"{bs:>6} {secs:>8.2f} {n_new:>10} {rate:>9.1f} {cpu:>7.2f} {rate / base:>8.2f}  "
              f"{same}/{len(gens)}")


if __name__ == "__main__":
    main()
