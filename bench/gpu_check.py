"""GPU check: the costs of sftscope's passes as ratios, measured in one run on one device.

    python bench/gpu_check.py                 # ~1.1B random-weight Llama, bf16, cuda
    python bench/gpu_check.py --tiny          # a tiny model on CPU (seconds; the tests run it)
    python bench/gpu_check.py --json out.json # the figures as JSON as well

The default model has TinyLlama-1.1B's shape (22 blocks, hidden 2048, MLP 5632, 32 heads, 4 KV
heads, vocabulary 32000; random weights, so nothing is downloaded). Inputs are random token ids,
every text exactly ``--seq`` tokens (no padding: the FLOP count below is exact). Prints:

1. capture vs bare forward: ``capture.stream.capture`` (pooled mean/last of every hidden state,
   and token metrics on the first ``--n-token`` texts) and capture of pooled vectors only
   (``n_token = 0``), each relative to the bare forward pass of the same batches (the decoder
   without the LM head, no hooks: what capture runs). Model-FLOPs utilisation of the bare
   pass: ``FLOPs = 2 * P * N + 4 * L * d * sum_i T_i**2`` where ``P`` is the parameter count of
   the decoder blocks (embedding lookup and LM head excluded: the pass runs neither), ``N`` the
   tokens, ``L`` the blocks, ``d`` the hidden size and ``T_i`` the length of text ``i`` (the
   attention scores and the weighted sum, counted over the full square as in PaLM's MFU);
   MFU = FLOPs / seconds / peak dense bf16 FLOP/s of the device (H100/H200 SXM 989e12, A100
   312e12; ``--peak-tflops`` for another).
2. tune step time (forward + backward + AdamW step; the LoRA modules ``tune.apply_lora`` places,
   full-depth rank budget ``--rank``) of each one-segment mask of K = 5 relative to ``11111``:
   blocks below the lowest adapted block need no backward pass.
3. probe vs bare forward: ``experiments.lens.lens_pass`` (the logit lens at every hidden state:
   final norm + LM head + loss/accuracy sums) relative to the bare forward.

Timings are medians of ``--repeats`` runs after a warm-up, interleaved so a change of load hits
all alike; the device is synchronised around each. Under ~4 minutes on one H200 at the default
size (the GPU checks must fit in 8).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable

import torch

os.environ.setdefault("SFTSCOPE_NO_PROGRESS", "1")

from sftscope.capture.engine import batches  # noqa: E402
from sftscope.capture.hooks import inner_model  # noqa: E402
from sftscope.capture.stream import CaptureConfig, capture  # noqa: E402
from sftscope.experiments import tune as TU  # noqa: E402
from sftscope.experiments.lens import lens_pass  # noqa: E402
from sftscope.load.arch import get_blocks  # noqa: E402
from sftscope.load.data import TokenizedSet  # noqa: E402
from sftscope.load.tiny import tiny_config  # noqa: E402
from sftscope.segments import mask_blocks  # noqa: E402

MASKS = ("11111", "10000", "01000", "00100", "00010", "00001")
PEAK_BF16 = {"H200": 989e12, "H100 SXM": 989e12, "H100 80GB HBM3": 989e12, "H100 PCIe": 756e12,
             "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10": 125e12}
SIZES = {
    "default": {"layers": 22, "hidden": 2048, "intermediate": 5632, "heads": 32, "kv_heads": 4,
                "vocab": 32000, "n": 64, "seq": 512, "batch": 16, "n_token": 32,
                "tune_batch": 8, "tune_seq": 512, "tune_steps": 8, "warmup": 2, "repeats": 3},
    "tiny": {"layers": 5, "hidden": 64, "intermediate": 128, "heads": 4, "kv_heads": 2,
             "vocab": 512, "n": 8, "seq": 32, "batch": 4, "n_token": 4,
             "tune_batch": 2, "tune_seq": 32, "tune_steps": 2, "warmup": 1, "repeats": 1},
}


def build(a, device: str, dtype: torch.dtype, seed: int = 0):
    """The random-weight Llama of the chosen size, built directly on ``device``."""
    from transformers import AutoModelForCausalLM

    cfg = tiny_config("llama", a.vocab, n_layers=a.layers, hidden=a.hidden, n_heads=a.heads,
                      n_kv_heads=a.kv_heads, intermediate=a.intermediate,
                      max_positions=max(a.seq, a.tune_seq) + 8)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model.eval()
    model.config.use_cache = False
    return model


def block_params(model) -> int:
    return sum(p.numel() for b in get_blocks(model) for p in b.parameters())


def forward_flops(model, lengths: list[int]) -> float:
    """``2 * P * N + 4 * L * d * sum T_i^2`` (see the module docstring)."""
    n_layers, d = len(get_blocks(model)), int(model.config.hidden_size)
    return 2.0 * block_params(model) * sum(lengths) + 4.0 * n_layers * d * sum(
        t * t for t in lengths)


def peak_flops(device: str, given: float | None) -> tuple[float | None, str]:
    if given:
        return given * 1e12, "given"
    if not device.startswith("cuda"):
        return None, "unknown for CPU (give --peak-tflops)"
    name = torch.cuda.get_device_name()
    for key, v in PEAK_BF16.items():
        if key in name:
            return v, f"{name}: dense bf16 {v / 1e12:.0f} TFLOP/s"
    return None, f"{name}: unknown peak (give --peak-tflops)"


def timed(fn: Callable[[], object], device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def pass_ratios(a, model, device: str) -> dict:
    """Part 1 and 3: bare forward, capture (with and without token metrics), probe."""
    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(4, a.vocab, (a.seq,), generator=g).tolist() for _ in range(a.n)]
    tok = TokenizedSet(ids, [None] * a.n, 0, a.seq)
    run = inner_model(model)

    def bare() -> None:
        with torch.inference_mode():
            for b in batches(tok, a.batch, 0):
                run(input_ids=b.input_ids.to(device), attention_mask=b.attention_mask.to(device),
                    use_cache=False)

    fns = {
        "bare forward": bare,
        "capture": lambda: capture(model, tok, CaptureConfig(batch_size=a.batch,
                                                             n_token=a.n_token), 0),
        "capture, pooled only": lambda: capture(model, tok, CaptureConfig(batch_size=a.batch,
                                                                          n_token=0), 0),
        "probe (lens, all states)": lambda: lens_pass(model, tok, 0, batch_size=a.batch),
    }
    for fn in fns.values():  # warm-up: kernels, allocator, libraries
        timed(fn, device)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(a.repeats):
        for k, fn in fns.items():
            times[k].append(timed(fn, device))
    med = {k: statistics.median(v) for k, v in times.items()}
    flops = forward_flops(model, [len(x) for x in ids])
    return {"seconds": med, "runs": times, "flops": flops, "tokens": a.n * a.seq,
            "ratios": {k: med[k] / med["bare forward"] for k in fns}}


def mask_step(a, mask: str, x: torch.Tensor, device: str, dtype: torch.dtype) -> dict:
    """Median LoRA step time of ``mask`` on a fresh model (the same weights every time)."""
    model = build(a, device, dtype)
    blocks = mask_blocks(mask, a.layers)
    rank = TU.budget_rank(a.rank, a.layers, len(blocks))
    peft = TU.apply_lora(model, blocks, rank=rank, alpha=2 * rank, dropout=0.0)
    peft.train()
    opt = torch.optim.AdamW([p for p in peft.parameters() if p.requires_grad], lr=1e-4)

    def step() -> None:
        loss = peft(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(a.warmup):
        timed(step, device)
    times = [timed(step, device) for _ in range(a.tune_steps)]
    return {"step_s": statistics.median(times), "blocks": f"{blocks[0]}-{blocks[-1]}",
            "rank": rank, "params": TU.trainable_params(peft)}


def tune_ratios(a, device: str, dtype: torch.dtype) -> dict:
    """Part 2: LoRA step time of each one-segment mask relative to 11111."""
    g = torch.Generator().manual_seed(1)
    x = torch.randint(4, a.vocab, (a.tune_batch, a.tune_seq), generator=g).to(device)
    out = {}
    for mask in MASKS:
        out[mask] = mask_step(a, mask, x, device, dtype)
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    full = out["11111"]["step_s"]
    for r in out.values():
        r["ratio"] = r["step_s"] / full
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="a tiny model on CPU (seconds)")
    ap.add_argument("--device", default=None, help="default: cuda (cpu with --tiny)")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32", "float16"))
    ap.add_argument("--rank", type=float, default=64, help="full-depth LoRA rank budget")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="peak dense FLOP/s of the device in TFLOP/s (for the MFU)")
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    for k, v in SIZES["default"].items():
        ap.add_argument(f"--{k.replace('_', '-')}", type=int, default=None,
                        help=f"default {v} (tiny {SIZES['tiny'][k]})")
    a = ap.parse_args(argv)
    for k, v in SIZES["tiny" if a.tiny else "default"].items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    device = a.device or ("cpu" if a.tiny else "cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device visible; use --tiny for the CPU path")
    dtype = getattr(torch, a.dtype)
    t_start = time.perf_counter()
    model = build(a, device, dtype)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: llama {a.layers} blocks, hidden {a.hidden}, MLP {a.intermediate}, "
          f"{a.heads}/{a.kv_heads} heads, vocab {a.vocab}: {n_params / 1e6:,.1f}M parameters "
          f"({block_params(model) / 1e6:,.1f}M in the blocks), {a.dtype}, {device}")
    print(f"data: {a.n} texts x {a.seq} tokens, batch {a.batch}, token metrics on "
          f"{a.n_token}; median of {a.repeats} after a warm-up")
    p = pass_ratios(a, model, device)
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    peak, peak_note = peak_flops(device, a.peak_tflops)
    bare_s = p["seconds"]["bare forward"]
    achieved = p["flops"] / bare_s
    mfu = achieved / peak if peak else None
    print("\n1. capture vs bare forward (and 3. probe)")
    for k, s in p["seconds"].items():
        print(f"  {k:26s} {s:8.3f} s  {p['tokens'] / s:12,.0f} tok/s  {p['ratios'][k]:6.2f}x")
    print(f"  bare forward FLOPs = 2*P*N + 4*L*d*sum(T_i^2) = {p['flops']:.3e} "
          f"-> {achieved / 1e12:.1f} TFLOP/s"
          + (f", MFU {100 * mfu:.1f} % ({peak_note})" if mfu is not None
             else f" (MFU: peak {peak_note})"))
    t = tune_ratios(a, device, dtype)
    print(f"\n2. tune step ({a.tune_batch} x {a.tune_seq} tokens, full-depth rank {a.rank:g}) "
          f"vs 11111")
    for mask, r in t.items():
        print(f"  {mask}  blocks {r['blocks']:>6}  rank {r['rank']:>4}  {r['params']:>11,} "
              f"params  {1000 * r['step_s']:8.1f} ms  {r['ratio']:5.2f}x")
    total = time.perf_counter() - t_start
    print(f"\ntotal {total:.0f} s")
    result = {"device": device, "dtype": a.dtype, "params": n_params,
              "passes": {"seconds": p["seconds"], "ratios": p["ratios"], "flops": p["flops"],
                         "tokens": p["tokens"], "tflops": achieved / 1e12, "mfu": mfu,
                         "peak": peak_note},
              "tune": t, "total_s": total}
    if a.json:
        with open(a.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
