"""Training dynamics: per-block gradient and update norms, recorded while ``tune`` trains.

``RUN/dynamics.csv`` has one row per recorded step, block and module (``q``, ``k``, ``v``,
``o``, ``qkv``, the MLP roles of :mod:`sftscope.load.arch`, and ``other`` for the rest of a
block's trained weights, such as its norms) with, in mixture-of-experts blocks, one row per
routed expert (module ``expert``, its index in the ``expert`` column, empty on other rows; the
slice ``[e]`` of the fused expert parameters, or expert ``e``'s LoRA pair), ``router``,
``shared_expert`` and ``shared_expert_gate`` rows, and

- ``grad_norm``: Frobenius norm of the gradient the optimizer applies at that step (after
  ``--max-grad-norm`` clipping, which scales every gradient of a step by the same factor, so
  the depth profile is that of the raw gradient; the Trainer logs the unclipped total in its
  ``grad_norm``). LoRA: the gradient of the module's LoRA factors A and B together. Empty
  (NaN) for modules that do not train: they have no gradient.
- ``update_norm``: Frobenius norm of the change of the *effective* weight since step 0. Full
  fine-tuning: ``||W_t - W_0||``. LoRA: ``||(alpha/r) B A||`` (B starts at zero), computed as
  ``s * sqrt(trace((B^T B)(A A^T)))`` without forming ``B A``. Exactly 0 for frozen modules.

Recording happens in ``on_optimizer_step`` (after the optimizer step, before the gradients are
zeroed), every ``every`` steps and at the last step; other steps cost one integer test. At a
recording step every norm is reduced on its device and read back with one transfer per device.
Full fine-tuning keeps a copy of ``W_0`` of the trained parameters only (on their device).

Several processes (``accelerate launch``): with DDP the gradients and weights are replicated,
so rank 0 computes alone; with FSDP (``fsdp_use_orig_params: true``, or FSDP2) every rank sums
its shard's squares and the sums are all-reduced (LoRA factors are gathered: they are small).
FSDP1 with LoRA and DeepSpeed are not measured (a note says so). Only rank 0 writes.
On ``--resume`` the rows up to the checkpoint's step are kept and recording continues.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sftscope.load.arch import ArchSpec

DYNAMICS_COLUMNS = ["step", "block", "module", "expert", "grad_norm", "update_norm"]
DYNAMICS_FILE = "dynamics.csv"
OTHER = "other"
_WRAPPERS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")
_PEFT_PREFIXES = ("base_model.model.", "module.")
EXPERT = "expert"  # one row per routed expert (the ``expert`` column holds its index)
MODULE_ORDER = ("q", "k", "v", "qkv", "o", "gate", "up", "gate_up", "down", "fc_in", "fc_out",
                "router", "shared_expert_gate", "shared_expert", EXPERT, OTHER)
NO_EXPERT = -1  # the expert of a row that is not a routed expert's (empty in the file)
_MTS = ".modules_to_save.default"  # PEFT's trainable copy of a module (MoE routers)


def clean_name(name: str) -> str:
    """A parameter or module name without wrapper segments (PEFT, DDP, FSDP, checkpointing,
    torch.compile), as the unwrapped causal LM names it."""
    for w in _WRAPPERS:
        name = name.replace(w, "")
    changed = True
    while changed:
        changed = False
        for p in _PEFT_PREFIXES:
            if name.startswith(p):
                name, changed = name[len(p):], True
    return name


def locate(name: str, spec: ArchSpec) -> tuple[int, str] | None:
    """``(block, block-relative path)`` of a clean name inside the decoder blocks, else None."""
    m = re.match(rf"^{re.escape(spec.blocks)}\.(\d+)\.(.+)$", name)
    return (int(m.group(1)), m.group(2)) if m else None


def module_role(rel_module: str, spec: ArchSpec) -> str:
    """The role (q, k, v, o, qkv, MLP and MoE roles) of a block-relative module path, else
    ``other``; PEFT's ``base_layer`` segments are ignored."""
    rel_module = rel_module.replace(".base_layer", "")
    return spec.role_of(rel_module) or OTHER


def param_role(rel_param: str, spec: ArchSpec) -> str:
    """The role of a block-relative parameter path (``self_attn.q_proj.weight`` -> ``q``)."""
    return module_role(rel_param.rsplit(".", 1)[0] if "." in rel_param else "", spec)


def _order(module: str) -> int:
    return MODULE_ORDER.index(module) if module in MODULE_ORDER else len(MODULE_ORDER)


def _local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (FSDP2), else the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a DTensor (a collective: every rank calls it), else the tensor."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _sq(t: torch.Tensor) -> torch.Tensor:
    """Squared Frobenius norm in float32 (0-d, on the tensor's device)."""
    if t.numel() == 0:
        return torch.zeros((), dtype=torch.float32, device=t.device)
    return torch.linalg.vector_norm(t, dtype=torch.float32).square()


def lora_update_sq(a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """``||s B A||_F^2 = s^2 trace((B^T B)(A A^T))`` without forming ``B A`` (``A``: r x in,
    ``B``: out x r); clamped at 0 against rounding."""
    af, bf = a.float(), b.float()
    btb = bf.T @ bf
    aat = af @ af.T
    return (float(scaling) ** 2 * (btb * aat).sum()).clamp(min=0.0)


def _distributed_type() -> str:
    """``deepspeed``, ``fsdp``, ``multi`` (DDP and the like) or ``single`` (accelerate's state,
    as the Trainer set it up)."""
    try:
        from accelerate.state import AcceleratorState

        state = AcceleratorState()
        kind = str(getattr(state, "distributed_type", "NO")).upper()
    except Exception:  # no accelerate state yet: a plain process
        return "single"
    if "DEEPSPEED" in kind:
        return "deepspeed"
    if "FSDP" in kind:
        return "fsdp"
    return "single" if kind.endswith("NO") else "multi"


def _rank() -> int:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    from sftscope.parallel import rank

    return rank()


class DynamicsRecorder:
    """Collects the rows of ``dynamics.csv`` (see the module docstring).

    Build it on the model about to train (after LoRA is applied or the blocks are unfrozen,
    before the Trainer starts): it decides which modules train and, for full fine-tuning,
    snapshots ``W_0`` of the trained parameters. :meth:`callback` gives the TrainerCallback.
    """

    def __init__(self, model: nn.Module, spec: ArchSpec, n_blocks: int, *, every: int,
                 method: str, path: str | Path | None, write: bool = True,
                 experts: dict[str, list[int]] | None = None) -> None:
        if every < 1:
            raise ValueError("every must be at least 1")
        self.spec, self.n_blocks, self.every, self.method = spec, n_blocks, every, method
        self.path = Path(path) if path is not None else None
        self.write = write
        self.experts = ({int(b): set(e) for b, e in experts.items()}
                        if experts is not None else None)  # --experts: the trained ones
        self.rows: list[tuple[int, int, str, int, float, float]] = []
        self.notes: list[str] = []
        self.disabled = False
        self.since_step = 0
        self.sharded = False
        self.mode = "single"
        self._collect(model)
        self.w0: dict[str, torch.Tensor] = {}
        if _rank() == 0:  # DDP: only rank 0 measures (FSDP: see begin)
            params = self._params(model)
            self.w0 = {n: _local(params[n]).detach().clone() for n in self.param_keys}

    # -------------------------------------------------------------------- what trains

    def _params(self, model: nn.Module) -> dict[str, nn.Parameter]:
        return {clean_name(n).replace(_MTS, ""): p for n, p in model.named_parameters()}

    def _collect(self, model: nn.Module) -> None:
        """The trained modules: ``self.keys`` (block, module, expert) rows of every block, and
        the parameters (full; with LoRA: the modules PEFT trains in full, MoE routers) or LoRA
        layers (lora) behind the trained ones."""
        spec = self.spec
        self.param_keys: dict[str, tuple[int, str]] = {}
        self.lora_keys: dict[tuple[int, str], list[nn.Module]] = {}
        self.n_experts = 0
        trained: set[tuple[int, str, int]] = set()
        if self.method == "lora":
            from peft.tuners.lora import LoraLayer

            for name, mod in model.named_modules():
                where = locate(clean_name(name), spec) if isinstance(mod, LoraLayer) else None
                if where is None:
                    continue
                key = (where[0], module_role(where[1], spec))
                self.lora_keys.setdefault(key, []).append(mod)
                trained |= self._rows_of(*key, int(getattr(mod, "num_experts", 1)))
        for name, p in self._params(model).items():
            if not p.requires_grad or (self.method == "lora" and ".lora_" in name):
                continue
            where = locate(name, spec)
            if where is None:
                continue
            self.param_keys[name] = key = (where[0], param_role(where[1], spec))
            trained |= self._rows_of(*key, int(p.shape[0]) if p.dim() else 1)
        self.trained = trained
        modules = sorted({m for _, m, _ in trained}, key=_order)
        self.keys = [(b, m, e) for b in range(self.n_blocks) for m in modules
                     for e in (range(self.n_experts) if m == EXPERT else (NO_EXPERT,))]
        if not trained:
            self._disable("no trained weight could be placed in a decoder block")

    def _rows_of(self, block: int, role: str, n: int) -> set[tuple[int, str, int]]:
        """The trained rows of a block's module of ``role``: one per routed expert (``n`` of
        them; with ``--experts`` only the chosen ones), else one."""
        if role != "experts":
            return {(block, role, NO_EXPERT)}
        self.n_experts = max(self.n_experts, n)
        keep = self.experts.get(block, set(range(n))) if self.experts is not None else range(n)
        return {(block, EXPERT, e) for e in keep}

    def _disable(self, why: str) -> None:
        if not self.disabled:
            self.disabled = True
            self.notes.append(f"training dynamics not recorded: {why}")

    # -------------------------------------------------------------------- measuring

    def measure(self, model: nn.Module) -> list[tuple[int, str, int, float, float]] | None:
        """``(block, module, expert, grad_norm, update_norm)`` for every row (expert -1 off
        the routed experts), or None where this process has nothing to measure (another
        rank does it)."""
        if self.disabled:
            return None
        if not self.sharded and _rank() != 0:
            return None
        index = {k: i for i, k in enumerate(self.keys)}
        reduce_g: dict[int, list[torch.Tensor]] = {}
        reduce_u: dict[int, list[torch.Tensor]] = {}
        whole_u: dict[int, list[torch.Tensor]] = {}
        for (b, role), mods in self.lora_keys.items():
            for mod in mods:
                for a in getattr(mod, "active_adapters", None) or list(mod.lora_A):
                    if a in mod.lora_A:
                        self._lora_parts(mod, a, b, role, index, reduce_g, whole_u)
        params = self._params(model)
        for name, (b, role) in self.param_keys.items():
            p = params.get(name)
            if p is None:
                self._disable(f"parameter {name} is gone from the model")
                return None
            loc = _local(p.detach())
            w0 = self.w0.get(name)
            if w0 is None:
                self._disable(f"no step-0 copy of {name}")
                return None
            if loc.shape != w0.shape:
                self._disable(f"{name} changed shape while training (sharded after the "
                              f"snapshot?)")
                return None
            grad = _local(p.grad.detach()) if p.grad is not None else None
            for i, dw, g in self._slices(b, role, loc.float() - w0.float(), grad, index):
                reduce_u.setdefault(i, []).append(_sq(dw))
                if g is not None:
                    reduce_g.setdefault(i, []).append(_sq(g))
        return self._rows(reduce_g, reduce_u, whole_u)

    def _slices(self, block: int, role: str, dw: torch.Tensor, grad: torch.Tensor | None,
                index: dict[tuple[int, str, int], int]):
        """``(row, update part, gradient part)``: per expert ``[e]`` of a fused expert
        parameter, else the whole tensor."""
        if role != "experts":
            return [(index[(block, role, NO_EXPERT)], dw, grad)]
        return [(index[(block, EXPERT, e)], dw[e], grad[e] if grad is not None else None)
                for e in range(dw.shape[0])]

    def _lora_parts(self, mod: nn.Module, a: str, block: int, role: str,
                    index: dict[tuple[int, str, int], int],
                    reduce_g: dict[int, list[torch.Tensor]],
                    whole_u: dict[int, list[torch.Tensor]]) -> None:
        """One LoRA layer's squared update and gradient norms, per expert for PEFT's wrapper
        of a fused expert parameter (expert ``e``: rows ``[e*r, (e+1)*r)`` of A, the
        columns ``e::E`` of B)."""
        wa, wb = mod.lora_A[a].weight, mod.lora_B[a].weight
        n = int(getattr(mod, "num_experts", 1))
        if role != "experts" or n == 1:
            parts = [(index[(block, role if role != "experts" else EXPERT,
                             NO_EXPERT if role != "experts" else 0)], slice(None), slice(None))]
        else:
            r = wa.shape[0] // n
            parts = [(index[(block, EXPERT, e)], slice(e * r, (e + 1) * r),
                      slice(e, None, n)) for e in range(n)]
        full_a, full_b = _full(wa), _full(wb)
        for i, ra, cb in parts:
            whole_u.setdefault(i, []).append(
                lora_update_sq(full_a[ra], full_b[:, cb], mod.scaling[a]))
            for w, sl in ((wa, (ra,)), (wb, (slice(None), cb))):
                if w.grad is not None:
                    reduce_g.setdefault(i, []).append(_sq(_local(w.grad)[sl]))

    def _rows(self, reduce_g, reduce_u, whole_u) -> list[tuple[int, str, int, float, float]]:
        n = len(self.keys)
        g = self._gather(reduce_g, n, reduce=self.sharded)
        u = self._gather(reduce_u, n, reduce=self.sharded)
        w = self._gather(whole_u, n, reduce=False)
        out = []
        for i, (b, m, e) in enumerate(self.keys):
            trained = (b, m, e) in self.trained
            grad = math.sqrt(max(g[i], 0.0)) if trained else math.nan
            upd = math.sqrt(max(u[i] + w[i], 0.0)) if trained else 0.0
            out.append((b, m, e, grad, upd))
        return out

    def _gather(self, parts: dict[int, list[torch.Tensor]], n: int, reduce: bool) -> list[float]:
        """Sum the 0-d tensors of each row; one transfer per device (an all-reduce when the
        weights are sharded)."""
        import torch.distributed as dist

        totals = [0.0] * n
        by_dev: dict[torch.device, tuple[list[int], list[torch.Tensor]]] = {}
        for i, ts in parts.items():
            for t in ts:
                idx, vals = by_dev.setdefault(t.device, ([], []))
                idx.append(i)
                vals.append(t)
        if reduce:
            dev = next(iter(by_dev), None)
            if dev is None:  # this rank holds nothing: it still joins the all-reduce
                dev = torch.device("cuda", torch.cuda.current_device()) if (
                    torch.cuda.is_available() and dist.get_backend() == "nccl") else (
                    torch.device("cpu"))
            vec = torch.zeros(n, dtype=torch.float32, device=dev)
            for idx, vals in by_dev.values():
                vec.index_add_(0, torch.tensor(idx, device=dev),
                               torch.stack(vals).to(dev, torch.float32))
            dist.all_reduce(vec)
            return vec.cpu().tolist()
        for idx, vals in by_dev.values():
            for i, v in zip(idx, torch.stack(vals).float().cpu().tolist()):
                totals[i] += v
        return totals

    # -------------------------------------------------------------------- the file

    def table(self):
        """The rows so far as a DataFrame (the columns of dynamics.csv)."""
        import pandas as pd

        df = pd.DataFrame(self.rows, columns=DYNAMICS_COLUMNS)
        df["expert"] = df["expert"].astype("Int64").mask(df["expert"] == NO_EXPERT)
        return df

    def save(self) -> None:
        if self.write and self.path is not None:
            from sftscope.io import write_table

            write_table(self.table(), self.path)

    def restore(self, step: int) -> None:
        """Keep the rows of an earlier attempt up to ``step`` (a resumed run), else none."""
        self.rows = []
        if step <= 0 or self.path is None or not self.path.is_file():
            return
        import pandas as pd

        try:
            old = pd.read_csv(self.path)
        except Exception:  # an unreadable file from a killed run: start the table again
            return
        if list(old.columns) != DYNAMICS_COLUMNS:
            return
        old = old[old["step"] <= step]
        self.rows = [(int(r.step), int(r.block), str(r.module),
                      NO_EXPERT if r.expert != r.expert else int(r.expert), float(r.grad_norm),
                      float(r.update_norm)) for r in old.itertuples(index=False)]

    def due(self, step: int, max_steps: int) -> bool:
        """Record at this (1-based, after the update) optimizer step?"""
        return step % self.every == 0 or step == max_steps

    def record(self, step: int, model: nn.Module) -> None:
        rows = self.measure(model)
        if rows is None or _rank() != 0:
            return
        self.rows += [(step, b, m, e, gr, up) for b, m, e, gr, up in rows]
        self.save()

    def begin(self, model: nn.Module, global_step: int) -> None:
        """At the start of training (after the Trainer prepared the model)."""
        kind = _distributed_type()
        self.mode = kind
        if kind == "deepspeed":
            self._disable("DeepSpeed keeps gradients in its own partitions; use DDP or FSDP "
                          "to record them")
        elif kind == "fsdp":
            self.sharded = True
            dtensor = any(hasattr(p, "to_local") for p in model.parameters())
            if self.method == "lora" and not dtensor:
                self._disable("LoRA factors under FSDP1 are flat shards (use FSDP2, "
                              "fsdp_version: 2, to record them)")
            self._collect(model)
            if any(role == "experts" for _, role in self.param_keys.values()):
                self._disable("per-expert rows of sharded expert weights are not measured "
                              "(each rank holds some experts' slices); use DDP to record them")
            if self.param_keys and not self.disabled:
                params = self._params(model)
                self.w0 = {n: _local(params[n]).detach().clone() for n in self.param_keys}
                if global_step > 0:
                    self.since_step = global_step
                    self.notes.append(f"update_norm of the resumed FSDP run is measured from "
                                      f"step {global_step} (the checkpoint it resumed)")
        if _rank() == 0:
            self.restore(global_step)
            self.rows = [r for r in self.rows if r[0] <= global_step]
            if global_step == 0 and self.path is not None and self.write:
                self.path.unlink(missing_ok=True)

    def info(self) -> dict[str, Any]:
        """What run.json records about the dynamics."""
        return {"file": DYNAMICS_FILE if not self.disabled else None, "every": self.every,
                "rows": len(self.rows), "steps": sorted({r[0] for r in self.rows}),
                "modules": sorted({m for _, m, _ in self.keys}, key=_order),
                "update_since_step": self.since_step, "processes": self.mode,
                "sharded": self.sharded, "notes": list(self.notes)}

    def callback(self):
        """The ``transformers.TrainerCallback`` that drives this recorder."""
        from transformers import TrainerCallback

        rec = self

        class Dynamics(TrainerCallback):
            def on_train_begin(self, args, state, control, model=None, **kw):  # noqa: ANN001
                if model is not None:
                    rec.begin(model, int(state.global_step))

            def on_optimizer_step(self, args, state, control, model=None, **kw):  # noqa: ANN001
                step = int(state.global_step) + 1  # the step this update completes
                if model is None or rec.disabled or not rec.due(step, int(state.max_steps)):
                    return
                rec.record(step, model)

        return Dynamics()

