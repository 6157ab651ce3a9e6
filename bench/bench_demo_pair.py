"""Time the demo pair build and show what the pair learned.

    python bench/bench_demo_pair.py                 # full size (what `sftscope demo` trains)
    python bench/bench_demo_pair.py --quick         # CI size
    python bench/bench_demo_pair.py --set hidden=64 --set base_steps=1500 --items 100
    python bench/bench_demo_pair.py --set base_seq_len=64 \
        --set doc_mix=prose:0.08,drill:0.42,words:0.08,story:0.24,qa:0.18

Prints per-phase wall and CPU seconds, training tokens/s, the load average (the machine may be
shared: CPU seconds move less than wall seconds when it is), held-out losses, and greedy
accuracy of base and SFT on test items (format `Question: ...\\nAnswer:`; strict = `#### N`
right, flex = last number right), with a few sample answers.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path


def _value(text: str):
    if ":" in text:  # doc_mix: KIND:SHARE,...
        return tuple((k, float(v)) for k, v in (p.split(":", 1) for p in text.split(",")))
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="the CI-sized preset")
    ap.add_argument("--family", default="llama")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="override a PairConfig field (repeatable)")
    ap.add_argument("--items", type=int, default=None,
                    help="test items to score by generation (default: the preset's eval_items)")
    ap.add_argument("--out", default=None, help="keep the pair here (default: a temp folder)")
    ap.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = ap.parse_args(argv)

    from sftscope.demo.pair import FULL, QUICK, build_demo_pair
    from sftscope.progress import enabled

    if not enabled():
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()

    cfg = QUICK if args.quick else FULL
    over = dict(kv.split("=", 1) for kv in args.set)
    if args.items is not None:
        over["eval_items"] = str(args.items)
    cfg = dataclasses.replace(cfg, **{k: _value(v) for k, v in over.items()})
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="bench_demo_pair."))
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    pair = build_demo_pair(out, seed=args.seed, family=args.family, force=True, config=cfg)
    wall = time.perf_counter() - t0
    load1 = os.getloadavg()

    m = pair.metrics
    print(f"demo pair ({args.family}, seed {args.seed}): {pair.n_blocks} blocks, "
          f"{pair.n_params / 1e6:.2f}M params, vocab {pair.tokenizer['vocab_size']}, {out}")
    print("config:", json.dumps(pair.config))
    print(f"load average before {load0[0]:.2f}, after {load1[0]:.2f} "
          f"(2 cores; above ~2 the timings are inflated by other work)")
    print(f"{'phase':10s} {'wall s':>8s} {'cpu s':>8s}")
    for k, v in pair.timings.items():
        print(f"{k:10s} {v:8.1f} {pair.cpu_seconds.get(k, float('nan')):8.1f}")
    t = pair.tokens
    print(f"base: {t['base_trained']} tokens at {t['base_tokens_per_s']} tokens/s; "
          f"sft: {t['sft_trained']} tokens at {t['sft_tokens_per_s']} tokens/s "
          f"(pre-training corpus {t['pretrain_corpus']} tokens)")
    for name in ("base", "sft"):
        h = pair.loss_history.get(name) or [[0, float("nan")]]
        print(f"{name} train loss: {h[0][1]:.3f} (step {h[0][0]:.0f}) -> {h[-1][1]:.3f} "
              f"(step {h[-1][0]:.0f})")
    print(f"{'':6s} {'test loss':>9s} {'general':>8s} {'format':>7s} {'strict':>7s} "
          f"{'flex':>7s}   (n={m.get('eval_items', 0):.0f})")
    for name in ("base", "sft"):
        print(f"{name:6s} {m[f'test_loss_{name}']:9.3f} {m[f'general_loss_{name}']:8.3f} "
              f"{m.get(f'format_{name}', float('nan')):7.2f} "
              f"{m.get(f'strict_acc_{name}', float('nan')):7.2f} "
              f"{m.get(f'flex_acc_{name}', float('nan')):7.2f}")
    _samples(pair)
    print(f"total wall {wall:.1f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "wall_s": wall, "load": [load0, load1], **dataclasses.asdict(pair)}, default=str,
            indent=1))
    return 0


def _samples(pair, n: int = 3) -> None:
    """Greedy answers of both models to the first few test questions."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sftscope.demo.pair import generate_answers

    recs = [json.loads(line) for line in
            pair.data_files["gsm8k_test"].read_text().splitlines()[:n]]
    tok = AutoTokenizer.from_pretrained(pair.base_dir)
    for name, path in (("base", pair.base_dir), ("sft", pair.sft_dir)):
        model = AutoModelForCausalLM.from_pretrained(path)
        outs = generate_answers(model, tok, [r["question"] for r in recs], 40)
        for r, o in zip(recs, outs):
            print(f"[{name}] Q: {r['question']}\n       A: {o!r}   (gold {r['answer'][-6:]!r})")


if __name__ == "__main__":
    sys.exit(main())
