"""Run by ``test_dynamics.py`` under ``torch.distributed.run`` (2 CPU processes, gloo): the
dynamics recorder on FSDP2-sharded weights (full fine-tuning and LoRA) must give the norms of
the whole tensors. Prints ``OK <method>`` on rank 0 when every check passes."""

from __future__ import annotations

import math
import sys

import torch
import torch.distributed as dist


def main(model_dir: str, method: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from sftscope.experiments import dynamics as DY
    from sftscope.experiments import tune as TU
    from sftscope.load.arch import arch_for, get_blocks
    from sftscope.load.models import load_model

    dist.init_process_group("gloo")
    torch.manual_seed(0)
    DY._distributed_type = lambda: "fsdp"  # what accelerate reports under FSDP
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    model = load_model(model_dir)
    spec = arch_for(model)
    n_blocks = len(get_blocks(model, spec))
    if method == "full":
        TU.unfreeze_blocks(model, [1, 2], spec)
    else:
        model = TU.apply_lora(model, [1, 2], rank=4, alpha=8, spec=spec)
        with torch.no_grad():  # non-zero B so the update and both gradients are not zero
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.1)
    w0 = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    rec = DY.DynamicsRecorder(model, spec, n_blocks, every=1, method=method, path=None,
                              write=False)
    inner = model.get_base_model() if method == "lora" else model
    for b in get_blocks(inner, spec):
        fully_shard(b, mesh=mesh)
    fully_shard(model, mesh=mesh)
    rec.begin(model, 0)
    assert rec.sharded and not rec.disabled, rec.notes
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    x = torch.randint(5, 300, (2, 12), generator=torch.Generator().manual_seed(1))
    model.train()
    model(input_ids=x, labels=x).loss.backward()
    opt.step()
    rows = rec.measure(model)
    full = {DY.clean_name(n): p for n, p in model.named_parameters() if p.requires_grad}
    grads = {n: p.grad.full_tensor() for n, p in full.items()}
    weights = {n: p.detach().full_tensor() for n, p in full.items()}
    if dist.get_rank() == 0:
        got = {(b, m): (g, u) for b, m, _e, g, u in rows}
        want_g: dict[tuple[int, str], float] = {}
        want_u: dict[tuple[int, str], float] = {}
        for n, g in grads.items():
            b, rel = DY.locate(n, spec)
            key = (b, DY.param_role(rel, spec) if method == "full" else
                   DY.module_role(rel.split(".lora_")[0], spec))
            want_g[key] = want_g.get(key, 0.0) + float(g.square().sum())
            if method == "full":
                w = weights[n] - w0[DY.clean_name(n)]
                want_u[key] = want_u.get(key, 0.0) + float(w.square().sum())
        if method == "lora":
            for n in weights:
                if ".lora_A." not in n:
                    continue
                b, rel = DY.locate(n, spec)
                key = (b, DY.module_role(rel.split(".lora_")[0], spec))
                a, bb = weights[n], weights[n.replace(".lora_A.", ".lora_B.")]
                want_u[key] = float((2.0 * bb @ a).square().sum())  # alpha / r = 8 / 4
        assert set(want_g) == {k for k, (g, _) in got.items() if not math.isnan(g)}
        for key in want_g:
            g, u = got[key]
            assert math.isclose(g, math.sqrt(want_g[key]), rel_tol=1e-4), (key, g, want_g[key])
            assert math.isclose(u, math.sqrt(want_u[key]), rel_tol=1e-4), (key, u, want_u[key])
            assert u > 0
        for key, (g, u) in got.items():
            if key not in want_g:
                assert math.isnan(g) and u == 0.0, key
        print(f"OK {method}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
