"""torch's AdamW over one contiguous tensor per parameter group (``model.optim.flat_params``).

QAT trains hundreds of small tensors: per quantized layer the LoRA factors, weight steps, an
activation-step table, TQE corrections and residual scales (234 tensors, 44 k values, in the tiny
STDiT). torch's AdamW pays a fixed cost per tensor on a CPU (the Python loop over a group, the step
counters' increment, the fused kernel's per-tensor dispatch): 2.8 ms per step there, against 0.4 ms
for the same values held in one tensor per group. :class:`FlatAdamW` is torch's AdamW (fused or
foreach, unchanged math) whose parameter groups each hold one flat tensor; the model's parameters
(the group's *members*) become views of it, and their ``.grad`` views of one flat gradient, so
autograd, DDP's all-reduce, gradient clipping and the grad scaler read and write the flat buffers
through the members, in place, and the module keeps its own parameters (state dicts, hooks, DDP's
registration are unchanged). Sharding strategies that own the parameters' storage (FSDP, DeepSpeed)
keep torch's AdamW over the members.

Differences from AdamW over the members, by design, as with FSDP's flat parameters:

* ``zero_grad`` zeroes the gradients in place whatever ``set_to_none`` says, so a member that got no
  gradient in a step is updated as if its gradient were zero (its moments decay and weight decay
  applies) where torch's AdamW would skip it;
* members start on 16-element boundaries (64 bytes in fp32), the gaps between them hold zeros;
* a member's in-place write counter (``_version``) is its own, not the flat tensor's: :meth:`step`
  moves every member's, as a write into each would (caches keyed on it, such as the quantized-weight
  cache of sampling, see the step); anything else writing the flat tensor directly must do the same.

``state_dict`` / ``load_state_dict`` use the members' layout, one state entry per member as torch's
AdamW over the same groups writes it, so a checkpoint resumes with either optimiser. A member whose
``.data`` was rebound (a quantizer initialised with another shape) is packed again before the first
step; after a step that is refused, naming the member, since its optimiser state would be lost.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.autograd.graph import increment_version

#: members start on multiples of this many elements
ALIGN = 16


@dataclass
class _Packing:
    """One group's members and where they live in its flat buffers."""

    members: list[Tensor]  # the model's tensors, in order
    offsets: list[int] = field(default_factory=list)
    grad: Tensor | None = None  # the flat gradient
    grad_views: list[Tensor] = field(default_factory=list)  # each member's slice of it
    ptrs: list[int] = field(default_factory=list)  # the members' data pointers when packed

    @torch.no_grad()
    def pack(self, flat: Tensor) -> None:
        """Copy the members (values and any gradients) into fresh flat buffers held by ``flat``
        (its data and grad) and make the members views of them, each on an ``ALIGN`` boundary."""
        self.offsets, end = [], 0
        for p in self.members:
            self.offsets.append(end)
            end += -(-p.numel() // ALIGN) * ALIGN
        data = torch.zeros(end, dtype=flat.dtype, device=flat.device)
        grad = torch.zeros_like(data)
        self.grad_views = []
        for p, o in zip(self.members, self.offsets):
            n = p.numel()
            data[o:o + n].copy_(p.detach().reshape(-1))
            if p.grad is not None and p.grad.shape == p.shape:  # (a member re-bound to another shape: none yet)
                grad[o:o + n].copy_(p.grad.reshape(-1))
            p.grad = None
            p.data = data[o:o + n].view_as(p)
            self.grad_views.append(grad[o:o + n].view_as(p))
            p.grad = self.grad_views[-1]
        flat.data, flat.grad, self.grad = data, grad, grad
        self.ptrs = [p.data_ptr() for p in self.members]


class FlatAdamW(torch.optim.AdamW):
    """:class:`torch.optim.AdamW` whose parameter groups each step one flat tensor holding the
    group's parameters, which become views of it (see the module docstring). Takes what AdamW takes;
    every group's tensors must share dtype and device."""

    def __init__(self, params: Iterable, **kwargs) -> None:
        self._packings: list[_Packing] = []  # per group
        self._all_members: list[Tensor] = []
        super().__init__(params, **kwargs)

    # -- packing -------------------------------------------------------------------------------------
    def add_param_group(self, param_group: dict) -> None:
        params = param_group["params"]
        members = [params] if isinstance(params, Tensor) else list(params)
        name = param_group.get("name", len(self.param_groups))
        if not members:
            raise ValueError(f"optimiser parameter group {name!r} has no tensors")
        if len({id(p) for p in members}) != len(members):
            raise ValueError(f"optimiser parameter group {name!r} holds a tensor twice")
        if not {id(p) for p in members}.isdisjoint(map(id, self._all_members)):
            raise ValueError(f"optimiser parameter group {name!r} holds a tensor of another group")
        kinds = {(p.dtype, p.device) for p in members}
        if len(kinds) > 1:
            raise ValueError(f"optimiser parameter group {name!r} mixes dtypes / devices {sorted(map(str, kinds))}: "
                             "a flat group needs one (model.optim.flat_params false steps each tensor)")
        if not all(p.is_leaf and p.requires_grad and p.is_floating_point() for p in members):
            raise ValueError(f"optimiser parameter group {name!r}: every tensor must be a floating-point leaf "
                             "that requires grad")
        flat = nn.Parameter(torch.empty(0, dtype=members[0].dtype, device=members[0].device))
        packing = _Packing(members)
        packing.pack(flat)
        self._packings.append(packing)
        self._all_members.extend(members)
        super().add_param_group({**param_group, "params": [flat]})

    def relink(self) -> None:
        """Keep every member a view of its group's flat buffers: a member whose ``.data`` was rebound
        is packed again (allowed before the group's first step only; refused after, naming it), and a
        member whose ``.grad`` was replaced or set to None has it copied into / zeroed in the flat
        gradient and becomes a view again. :meth:`step` calls this first; cheap when nothing moved."""
        for i, (group, pk) in enumerate(zip(self.param_groups, self._packings)):
            flat = group["params"][0]
            if [p.data_ptr() for p in pk.members] != pk.ptrs:  # (a re-shape in place fails in autograd first)
                moved = [j for j, p in enumerate(pk.members) if p.data_ptr() != pk.ptrs[j] or p.shape != pk.grad_views[j].shape]
                if self.state.get(flat):
                    p = pk.members[moved[0]]
                    raise RuntimeError(
                        f"optimiser group {group.get('name', i)!r}: its tensor #{moved[0]} (shape {tuple(p.shape)}) was "
                        "re-bound (`.data = ...`) after optimiser steps, so it no longer trains; write into parameters "
                        "in place (copy_) once training has started")
                pk.pack(flat)
                continue
            if flat.grad is not pk.grad:  # set to None or replaced on the flat parameter itself
                flat.grad = pk.grad
            if any(map(operator.is_not, (p.grad for p in pk.members), pk.grad_views)):
                for p, v in zip(pk.members, pk.grad_views):
                    if p.grad is not v:
                        with torch.no_grad():
                            v.copy_(p.grad) if p.grad is not None else v.zero_()
                        p.grad = v

    # -- optimiser API -------------------------------------------------------------------------------
    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero every flat gradient in place (the members' ``.grad`` are views of it): ``set_to_none``
        is ignored, see the module docstring."""
        for pk in self._packings:
            pk.grad.zero_()

    def step(self, closure=None):
        """Run ``closure`` (forward and backward), :meth:`relink`, then AdamW's step on the flat tensors."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.relink()
        # AdamW's own step without the step-hook wrapper torch puts around each optimiser class's step
        # (this class's step has it already: the hooks would run twice)
        adamw_step = torch.optim.AdamW.step
        (adamw_step.__wrapped__ if getattr(adamw_step, "hooked", False) else adamw_step)(self)
        # a member's in-place write counter is its own, not the flat tensor's (``.data`` was re-bound):
        # move it as a write into the member would, for what keys on it (cached quantized weights)
        increment_version(self._all_members)
        return loss

    def members(self, i: int) -> list[Tensor]:
        """Group ``i``'s tensors (the model's parameters), in order."""
        return list(self._packings[i].members)

    def state_dict(self) -> dict:
        """torch's AdamW state dict in the members' layout: one entry per member, numbered across
        groups in order, each moment the member's slice of the flat one."""
        flat_sd = super().state_dict()
        state, groups, index = {}, [], 0
        for i, saved in enumerate(flat_sd["param_groups"]):
            flat_state, pk = flat_sd["state"].get(saved["params"][0]), self._packings[i]
            total = pk.grad.numel()
            ids = []
            for p, o in zip(pk.members, pk.offsets):
                if flat_state is not None:
                    state[index] = {
                        k: (v[o:o + p.numel()].view_as(p).clone() if torch.is_tensor(v) and v.dim() == 1 and v.numel() == total
                            else v.clone() if torch.is_tensor(v) else v)
                        for k, v in flat_state.items()}
                ids.append(index)
                index += 1
            groups.append({**saved, "params": ids})
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state dict in the members' layout (:meth:`state_dict`, or torch's AdamW over the same
        groups). A member without state (never stepped by torch's AdamW) starts its moments at zero; the
        group's step count is its members' largest."""
        groups = state_dict["param_groups"]
        counts = [len(g["params"]) for g in groups]
        mine = [len(pk.members) for pk in self._packings]
        if counts != mine:
            raise ValueError(f"optimiser state has groups of {counts} tensors, this optimiser {mine}")
        self.relink()  # pack rebound members first: the state is laid out on the current shapes
        flat_state, flat_groups = {}, []
        for i, group in enumerate(groups):
            pk = self._packings[i]
            members, offsets, total = pk.members, pk.offsets, pk.grad.numel()
            entries = [state_dict["state"].get(k) for k in group["params"]]
            if any(e is not None for e in entries):
                out = {}
                for key in dict.fromkeys(k for e in entries if e is not None for k in e):
                    values = [e.get(key) if e is not None else None for e in entries]
                    shaped = [v for v in values if torch.is_tensor(v) and v.dim() > 0]
                    if not shaped:  # a step count: the members' largest
                        out[key] = max((v for v in values if v is not None), key=float)
                        continue
                    buf = torch.zeros(total, dtype=shaped[0].dtype, device=shaped[0].device)
                    for j, (v, p, o) in enumerate(zip(values, members, offsets)):
                        if v is None:
                            continue
                        if not torch.is_tensor(v) or v.numel() != p.numel():
                            raise ValueError(f"optimiser state {key!r} of group {group.get('name', i)!r} tensor #{j} "
                                             f"has shape {tuple(getattr(v, 'shape', ()))}, the parameter {tuple(p.shape)}")
                        buf[o:o + p.numel()].copy_(v.reshape(-1))
                    out[key] = buf
                flat_state[i] = out
            flat_groups.append({**group, "params": [i]})
        super().load_state_dict({"state": flat_state, "param_groups": flat_groups})
