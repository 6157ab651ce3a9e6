"""probe's lens pass vs a bare forward pass over the same batches (target <= 1.5x, answers).

    python bench/bench_probe.py [--layers 12 --hidden 576 --vocab 49152 --n 16 --seq 160]
                                [--answer-tokens 3 --batch 8 --repeats 2 --threads 0]

A random-weight Llama with SmolLM2-135M's vocabulary (49,152) and width (hidden 576, 9 heads,
3 KV heads, MLP 1536), ``--layers`` blocks. Texts of ``seq/2..seq`` random tokens, each ending
in an answer of ``--answer-tokens`` tokens (a GSM8K final number: the text's last tokens).
Timed side by side, interleaved per repeat so a load change hits all alike:

- ``bare``: the model's own forward pass (``model(**batch)``: decoder and LM head, logits at
  every position), the same right-padded batches;
- ``decoder``: the decoder alone (no LM head), the same batches;
- ``probe answer``: ``lens_pass`` as ``probe --tokens answer`` runs it: the lens at every
  hidden state j = 0..L, but only at the answer tokens (answer_prob, answer_rank, accuracy and
  loss there);
- ``probe all``: ``lens_pass`` as ``probe --tokens all`` runs it: also next-token accuracy and
  loss at every real position of every layer (the head runs L+1 times per position).

Prints the median seconds of the repeats, each probe's ratio to ``bare`` and to ``decoder``,
tokens/s and the load average (on a busy machine the ratios are what to read).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

os.environ.setdefault("SFTSCOPE_NO_PROGRESS", "1")

from sftscope.capture.engine import batches  # noqa: E402
from sftscope.capture.hooks import inner_model  # noqa: E402
from sftscope.experiments.lens import AnswerSlot, answer_positions, lens_pass  # noqa: E402
from sftscope.load.data import TokenizedSet  # noqa: E402
from sftscope.load.tiny import build_tiny_model  # noqa: E402


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--hidden", type=int, default=576)
    ap.add_argument("--heads", type=int, default=9)
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--intermediate", type=int, default=1536)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--n", type=int, default=16, help="texts")
    ap.add_argument("--seq", type=int, default=160, help="longest text (tokens)")
    ap.add_argument("--answer-tokens", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--skip-all", action="store_true", help="time only the answer setting")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    model = build_tiny_model("llama", a.vocab, n_layers=a.layers, hidden=a.hidden,
                             n_heads=a.heads, n_kv_heads=a.kv_heads,
                             intermediate=a.intermediate, max_positions=a.seq + 8)
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(a.seq // 2, a.seq + 1, (a.n,), generator=g).tolist()
    ids = [torch.randint(4, a.vocab, (n,), generator=g).tolist() for n in lengths]
    tok = TokenizedSet(ids, [n - a.answer_tokens - 1 for n in lengths], 0, a.seq)
    answers: list[AnswerSlot | None] = [
        AnswerSlot(tuple(range(n - a.answer_tokens - 1, n - 1)), tuple(x[-a.answer_tokens:]))
        for n, x in zip(lengths, ids, strict=True)]
    n_tokens = sum(lengths)
    run = inner_model(model)

    def timed(fn) -> float:
        t0 = time.perf_counter()
        with torch.inference_mode():
            fn()
        return time.perf_counter() - t0

    def bare(ts: TokenizedSet, _ans) -> None:
        for b in batches(ts, a.batch, 0):
            model(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False)

    def decoder(ts: TokenizedSet, _ans) -> None:
        for b in batches(ts, a.batch, 0):
            run(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False)

    def probe_answer(ts: TokenizedSet, ans) -> None:
        lens_pass(model, ts, 0, batch_size=a.batch, positions=answer_positions(ans),
                  answers=ans)

    def probe_all(ts: TokenizedSet, ans) -> None:
        lens_pass(model, ts, 0, batch_size=a.batch, answers=ans)

    setups = {"bare": bare, "decoder": decoder, "probe answer": probe_answer}
    if not a.skip_all:
        setups["probe all"] = probe_all
    one = TokenizedSet(ids[:1], tok.prompt_lengths[:1], 0, a.seq)
    for fn in setups.values():  # warm-up on one text
        timed(lambda fn=fn: fn(one, answers[:1]))
    times: dict[str, list[float]] = {k: [] for k in setups}
    print(f"llama, {a.layers} blocks, hidden {a.hidden}, vocab {a.vocab}: {a.n} texts, "
          f"{n_tokens} tokens, {a.answer_tokens} answer tokens each, batch {a.batch}, "
          f"{torch.get_num_threads()} threads; load {_load()}")
    for r in range(a.repeats):
        for k, fn in setups.items():
            times[k].append(timed(lambda fn=fn: fn(tok, answers)))
        print(f"repeat {r + 1}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()))
    med = {k: statistics.median(v) for k, v in times.items()}
    best = {k: min(v) for k, v in times.items()}
    for k in setups:
        line = f"{k:>13}: {med[k]:7.2f} s  {n_tokens / med[k]:8.1f} tokens/s"
        if k.startswith("probe"):
            line += (f"  ratio to bare {med[k] / med['bare']:.2f}x (fastest runs "
                     f"{best[k] / best['bare']:.2f}x), to decoder {med[k] / med['decoder']:.2f}x")
        print(line)
    print(f"load average now {_load()}")


if __name__ == "__main__":
    main()
