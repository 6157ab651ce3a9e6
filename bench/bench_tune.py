"""Training step time of segment LoRA masks relative to full depth (11111), same model and batch.

    python bench/bench_tune.py [--layers 10 --hidden 256 --batch 8 --seq 128 --steps 10]
    python bench/bench_tune.py --trainer      # also time whole `tune()` runs (Trainer path)

Blocks below the lowest adapted block need no backward pass: nothing there requires a gradient
and no input-gradient hook is installed. So 10000 should cost about as much as 11111 (the
backward runs through every block above block 0), and 00010 less (backward through the top 40 %
only). For each mask the bench prints the median step time (forward + backward + AdamW step,
the LoRA modules of `tune.apply_lora`) in wall and CPU seconds, their ratios to 11111, the
blocks that received a gradient (tensor hooks on every block output), trainable parameters,
and the load average (the machine may be shared: CPU time is the steadier measure).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch

os.environ.setdefault("SFTSCOPE_NO_PROGRESS", "1")

from sftscope.experiments import tune as TU  # noqa: E402
from sftscope.load.arch import get_blocks  # noqa: E402
from sftscope.load.tiny import build_tiny_model  # noqa: E402
from sftscope.segments import mask_blocks  # noqa: E402

MASKS = ("11111", "10000", "01000", "00100", "00010", "00001")


def _model(a):
    m = build_tiny_model("llama", a.vocab, n_layers=a.layers, hidden=a.hidden,
                         n_heads=max(4, a.hidden // 64), max_positions=a.seq + 8)
    m.config.use_cache = False
    return m


def step_times(a, mask: str) -> dict:
    model = _model(a)
    blocks = mask_blocks(mask, a.layers)
    rank = TU.budget_rank(a.rank, a.layers, len(blocks))
    peft = TU.apply_lora(model, blocks, rank=rank, alpha=2 * rank, dropout=0.0)
    peft.train()
    opt = torch.optim.AdamW([p for p in peft.parameters() if p.requires_grad], lr=1e-4)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(4, a.vocab, (a.batch, a.seq), generator=g)
    reached: set[int] = set()

    def hook(i):
        def fn(mod, args, out):
            h = out[0] if isinstance(out, tuple) else out
            if h.requires_grad:
                h.register_hook(lambda grad: reached.add(i))
        return fn

    handles = [blk.register_forward_hook(hook(i)) for i, blk in enumerate(get_blocks(model))]
    times, cpu = [], []
    for s in range(a.warmup + a.steps):
        t0, c0 = time.perf_counter(), time.process_time()
        loss = peft(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if s >= a.warmup:
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    for h in handles:
        h.remove()
    return {"mask": mask, "blocks": f"{blocks[0]}-{blocks[-1]}", "rank": rank,
            "params": TU.trainable_params(peft), "step": statistics.median(times),
            "cpu": statistics.median(cpu), "backward_blocks": sorted(reached)}


def trainer_times(a, mask: str, data: str, root: str) -> float:
    cfg = TU.TuneConfig(model=os.path.join(root, "model"), train=data,
                        out=os.path.join(root, f"run-{mask}"), mask=mask, rank=a.rank,
                        batch_size=a.batch, micro_batch_size=a.batch, max_steps=a.steps,
                        run_eval=False, n_train=None, logging_steps=1000, dropout=0.0)
    return TU.tune(cfg).step_time_s or float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--layers", type=int, default=10)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--rank", type=float, default=8)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--masks", default=",".join(MASKS))
    ap.add_argument("--trainer", action="store_true", help="also time tune() end to end")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    masks = [m.strip() for m in a.masks.split(",") if m.strip()]
    print(f"llama, {a.layers} blocks, hidden {a.hidden}, batch {a.batch} x {a.seq} tokens, "
          f"full-depth rank {a.rank:g}, {torch.get_num_threads()} threads, load average "
          f"{os.getloadavg()[0]:.2f}")
    rows = [step_times(a, m) for m in masks]
    full = next((r for r in rows if r["mask"] == "1" * len(r["mask"])), rows[0])
    print(f"{'mask':>6} {'blocks':>6} {'rank':>5} {'params':>8} {'step ms':>8} {'cpu ms':>8} "
          f"{'wall x':>7} {'cpu x':>6}  blocks with backward")
    for r in rows:
        bb = r["backward_blocks"]
        print(f"{r['mask']:>6} {r['blocks']:>6} {r['rank']:>5} {r['params']:>8,} "
              f"{1000 * r['step']:>8.1f} {1000 * r['cpu']:>8.1f} "
              f"{r['step'] / full['step']:>7.2f} {r['cpu'] / full['cpu']:>6.2f}  "
              f"{bb[0]}-{bb[-1]} ({len(bb)})")
    if a.trainer:
        import json

        from sftscope.load.tiny import save_tiny_model, train_tokenizer

        with tempfile.TemporaryDirectory() as root:
            tok = train_tokenizer()
            save_tiny_model(os.path.join(root, "model"), "llama", tokenizer=tok,
                            n_layers=a.layers, hidden=a.hidden,
                            n_heads=max(4, a.hidden // 64), max_positions=a.seq + 8)
            path = os.path.join(root, "train.jsonl")
            q = "How many apples?"
            while len(tok(q + " more apples?")["input_ids"]) < a.seq - 24:
                q += " more apples?"  # prompt + answer + EOS of about --seq tokens
            with open(path, "w") as f:
                for i in range(a.batch * (a.steps + 1)):
                    f.write(json.dumps({"question": q, "answer": f"#### {i}"}) + "\n")
            print("through tune() (Trainer, bs = batch, same steps):")
            t = {m: trainer_times(a, m, f"gsm8k:{path}", root) for m in masks}
            for m in masks:
                print(f"{m:>6} {1000 * t[m]:>8.1f} ms/step {t[m] / t[full['mask']]:>6.2f} x")


if __name__ == "__main__":
    main()
