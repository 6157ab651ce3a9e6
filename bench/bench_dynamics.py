"""Cost of recording training dynamics (RUN/dynamics.csv) in `tune()`, LoRA and full.

    python bench/bench_dynamics.py [--layers 10 --hidden 256 --batch 8 --seq 128 --steps 20]

For each method the bench times whole `tune()` runs (Trainer path, same data and steps) with
`--dynamics-every 0` (off), the default-like `10`, and `1` (every step: the worst case), and
prints the median step time and the overhead against `off`. Steps that record nothing cost one
integer test; a recording step reduces every norm on its device and reads them back with one
transfer, then rewrites the CSV.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

os.environ.setdefault("SFTSCOPE_NO_PROGRESS", "1")

from sftscope.experiments import tune as TU  # noqa: E402
from sftscope.load.tiny import save_tiny_model, train_tokenizer  # noqa: E402


def run(root: str, data: str, a, method: str, every: int) -> float:
    kw = dict(rank=a.rank, dropout=0.0) if method == "lora" else {}
    cfg = TU.TuneConfig(model=os.path.join(root, "model"), train=data,
                        out=os.path.join(root, f"run-{method}-{every}"), mask=a.mask,
                        method=method, batch_size=a.batch, micro_batch_size=a.batch,
                        max_steps=a.steps, run_eval=False, n_train=None, logging_steps=1000,
                        dynamics_every=every, overwrite=True, **kw)
    return TU.tune(cfg).step_time_s or float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--layers", type=int, default=10)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--rank", type=float, default=8)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--mask", default="01110")
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as root:
        tok = train_tokenizer()
        save_tiny_model(os.path.join(root, "model"), "llama", tokenizer=tok, n_layers=a.layers,
                        hidden=a.hidden, n_heads=max(4, a.hidden // 64),
                        max_positions=a.seq + 8)
        path = os.path.join(root, "train.jsonl")
        q = "How many apples?"
        while len(tok(q + " more apples?")["input_ids"]) < a.seq - 24:
            q += " more apples?"
        with open(path, "w") as f:
            for i in range(a.batch * (a.steps + 1)):
                f.write(json.dumps({"question": q, "answer": f"#### {i}"}) + "\n")
        print(f"llama, {a.layers} blocks, hidden {a.hidden}, batch {a.batch} x {a.seq} tokens, "
              f"mask {a.mask}, {a.steps} steps, load average {os.getloadavg()[0]:.2f}")
        for method in ("lora", "full"):
            times = {}
            for every in (0, 10, 1):
                ts = sorted(run(root, f"gsm8k:{path}", a, method, every)
                            for _ in range(a.repeat))
                times[every] = ts[len(ts) // 2]
            for every, t in times.items():
                what = "off" if every == 0 else f"every {every}"
                print(f"{method:>5} dynamics {what:>9}: {1000 * t:8.1f} ms/step "
                      f"({100 * (t / times[0] - 1):+.1f} %)")


if __name__ == "__main__":
    main()
