"""Benchmark of ``tune --packing``: padded against packed training steps on ragged data.

Builds a small llama (``--layers``, ``--hidden``) and GSM8K-like examples whose lengths are
spread from 20 to 250 tokens (uniform), then times ``--steps`` training steps of ``tune`` with
``--packing off`` and ``--packing on`` alternately (``--repeats`` each, in this process, after
one warm-up of each), on the thread count the CLI would use. Prints the median step time of
each and the paired ratio (median over repeats of off / on); the issue's target is >= 1.25x.

Usage: ``python bench/bench_packing.py`` (``--steps 20 --repeats 3``). Run it on an idle
machine: shared cores make the times meaningless.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path


def make_data(path: Path, n: int, seed: int) -> None:
    """GSM8K-format records of ragged length (about 20..250 tokens of the tiny tokenizer)."""
    rng = random.Random(seed)
    words = ["apples", "pears", "boxes", "coins", "marbles", "books", "pens", "cards",
             "shells", "stones"]
    with path.open("w") as f:
        for _ in range(n):
            a, b = rng.randint(1, 99), rng.randint(1, 99)
            filler = " ".join(rng.choice(words) for _ in range(rng.randint(5, 110)))
            f.write(json.dumps({"question": f"Tom has {a} {filler}. How many now?",
                                "answer": f"He has {a} + {b} = {a + b}.\n#### {a + b}"}) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    from sftscope.process import setup_process

    setup_process()
    from sftscope.experiments import tune as TU
    from sftscope.load.tiny import save_tiny_model, train_tokenizer

    root = Path(tempfile.mkdtemp(prefix="bench-packing-"))
    make_data(root / "train.jsonl", args.steps * args.batch, seed=0)
    model = save_tiny_model(root / "model", "llama", seed=0, tokenizer=train_tokenizer(),
                            n_layers=args.layers, hidden=args.hidden)

    def run(mode: str, k: int) -> float:
        cfg = TU.TuneConfig(model=str(model), train=f"gsm8k:{root / 'train.jsonl'}",
                            out=str(root / f"{mode}-{k}"), mask="1" * 1, rank=8,
                            batch_size=args.batch, micro_batch_size=args.batch,
                            max_steps=args.steps, lr=1e-3, logging_steps=args.steps,
                            save_steps=10 ** 6, run_eval=False, n_train=None, packing=mode)
        t = time.perf_counter()
        TU.tune(cfg)
        return (time.perf_counter() - t) / args.steps

    run("off", -1), run("on", -1)  # warm-up
    times: dict[str, list[float]] = {"off": [], "on": []}
    for k in range(args.repeats):
        for mode in ("off", "on") if k % 2 == 0 else ("on", "off"):
            times[mode].append(run(mode, k))
    ratios = [a / b for a, b in zip(times["off"], times["on"], strict=True)]
    print(f"step time padded {statistics.median(times['off']):.3f} s, packed "
          f"{statistics.median(times['on']):.3f} s; paired speed-up "
          f"{statistics.median(ratios):.2f}x (repeats {args.repeats}, {args.steps} steps of "
          f"{args.batch} examples, llama {args.layers}x{args.hidden})")


if __name__ == "__main__":
    main()
