"""Benchmark of ``tune --packing``: padded against packed training steps on ragged data.

Builds a small llama (``--layers``, ``--hidden``) and GSM8K-like examples whose tokenized
lengths are spread uniformly from 20 to 250 tokens, then trains ``--steps`` steps of ``tune``
with ``--packing off``, ``--packing on`` and, for comparison, packed rows whose attention is
confined by a mask (per-example attention turned off: the layout of models not on ``sdpa``),
in turn (``--repeats`` each, in this process, the order reversed every other repeat, after
one short warm-up of each), on the thread count the CLI would use. Only the training steps
are timed (a callback reads the clocks at the end of every step, batching included; the first
``--skip`` steps are left out): model loading, tokenization, the packing check and saving
are the same in every mode and are not the speed of training. All modes see the same
examples in the same order. Prints the median step time of each, in CPU and wall seconds,
and the paired speed-ups (median over repeats of padded / packed total); the issue's target
is >= 1.25x for ``on``.

Usage: ``python bench/bench_packing.py`` (``--steps 30 --repeats 3``). Shared cores make wall
times noisy: read the CPU seconds and the load average printed with them.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

WORDS = ["apples", "pears", "boxes", "coins", "marbles", "books", "pens", "cards", "shells",
         "stones"]


def make_data(path: Path, n: int, seed: int, tokenizer) -> None:
    """GSM8K-format records whose tokenized length (question, answer and the end token) is
    drawn uniformly from 20..250 tokens of ``tokenizer``: filler words are added to the
    question until the record reaches its drawn length."""
    rng = random.Random(seed)

    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    cost = {w: count(" " + w) for w in WORDS}  # byte-level BPE: words tokenize apart
    with path.open("w") as f:
        for _ in range(n):
            a, b = rng.randint(1, 99), rng.randint(1, 99)
            target = rng.randint(20, 250)
            answer = f"#### {a + b}"
            filler = [rng.choice(WORDS)]
            have = count(f"Question: {a} {filler[0]}?\nAnswer: {answer}") + 2  # BOS, EOS
            while have < target:
                filler.append(rng.choice(WORDS))
                have += cost[filler[-1]]
            f.write(json.dumps({"question": f"{a} {' '.join(filler)}?",
                                "answer": answer}) + "\n")


def step_clock():
    """A callback recording (wall, CPU) seconds at the end of every training step."""
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def __init__(self) -> None:
            self.marks: list[tuple[float, float]] = []

        def on_train_begin(self, args, state, control, **kwargs):
            self.marks = [(time.perf_counter(), time.process_time())]

        def on_step_end(self, args, state, control, **kwargs):
            self.marks.append((time.perf_counter(), time.process_time()))

        def steps(self, skip: int) -> list[tuple[float, float]]:
            m = self.marks[skip:]
            return [(b[0] - a[0], b[1] - a[1]) for a, b in zip(m, m[1:])]

    return Clock()


def report(times: dict[str, list[list[tuple[float, float]]]], whole: dict[str, list[float]],
           args: argparse.Namespace, load0: tuple[float, float, float]) -> None:
    """Median step times, paired speed-ups (CPU and wall) and the whole calls' CPU seconds."""
    for i, what in ((1, "CPU"), (0, "wall")):
        med = {m: statistics.median(s[i] for r in times[m] for s in r) for m in times}
        print(f"{what:4s} s/step padded {med['off']:.3f}, packed {med['on']:.3f}, packed in "
              f"masked rows {med['rows']:.3f}")
        for mode in ("on", "rows"):
            ratios = [sum(s[i] for s in a) / sum(s[i] for s in b)
                      for a, b in zip(times["off"], times[mode], strict=True)]
            print(f"     paired speed-up padded / {mode}: {statistics.median(ratios):.2f}x "
                  f"(repeats: {', '.join(f'{r:.2f}' for r in ratios)})")
    calls = {m: statistics.median(v) for m, v in whole.items()}
    print(f"whole tune call (load, tokenize, check, train, save), CPU s: padded "
          f"{calls['off']:.1f}, packed {calls['on']:.1f} ({calls['off'] / calls['on']:.2f}x)")
    print(f"({args.repeats} repeats of {args.steps} steps, first {args.skip} left out, "
          f"{args.batch} examples per step, llama {args.layers}x{args.hidden}; load average "
          f"{load0[0]:.1f} before, {os.getloadavg()[0]:.1f} after)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--skip", type=int, default=2, help="first steps left out (warm-up)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    from sftscope.process import setup_process

    setup_process()
    from sftscope.experiments import tune as TU
    from sftscope.load.tiny import save_tiny_model, train_tokenizer

    root = Path(tempfile.mkdtemp(prefix="bench-packing-"))
    tok = train_tokenizer()
    make_data(root / "train.jsonl", args.steps * args.batch, 0, tok)
    model = save_tiny_model(root / "model", "llama", seed=0, tokenizer=tok,
                            n_layers=args.layers, hidden=args.hidden)

    modes = ("off", "on", "rows")  # rows: packed, but attention confined by a mask

    def run(mode: str, k: int, steps: int) -> list[tuple[float, float]]:
        clock = step_clock()
        cfg = TU.TuneConfig(model=str(model), train=f"gsm8k:{root / 'train.jsonl'}",
                            out=str(root / f"{mode}-{k}"), mask="1", rank=8,
                            batch_size=args.batch, micro_batch_size=args.batch,
                            max_steps=steps, lr=1e-3, logging_steps=steps,
                            save_steps=10 ** 6, run_eval=False, n_train=None,
                            packing="on" if mode == "rows" else mode)
        TU.PerExampleAttention = (rows_only if mode == "rows" else per_example)
        start = time.process_time()
        try:
            res = TU.tune(cfg, callbacks=[clock])
        finally:
            TU.PerExampleAttention = per_example
        if k >= 0:
            whole[mode].append(time.process_time() - start)
        if k < 0:
            print(f"{mode}: {res.n_train} examples, longest {res.longest_example} tokens, "
                  f"{res.n_truncated} truncated")
        return clock.steps(args.skip)

    per_example = TU.PerExampleAttention

    def rows_only(model: object, wanted: bool = True) -> object:
        return per_example(model, False)

    load0 = os.getloadavg()
    for mode in modes:  # warm-up
        run(mode, -1, args.skip + 2)
    times: dict[str, list[list[tuple[float, float]]]] = {m: [] for m in modes}
    whole: dict[str, list[float]] = {m: [] for m in modes}  # CPU s of each tune call
    for k in range(args.repeats):
        for mode in modes if k % 2 == 0 else modes[::-1]:
            times[mode].append(run(mode, k, args.steps))
    report(times, whole, args, load0)


if __name__ == "__main__":
    main()
