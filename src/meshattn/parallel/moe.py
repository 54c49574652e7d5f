"""The mixture-of-experts layer with expert parallelism beside data-parallel attention.

Which ranks hold which tokens. Attention runs on its dp x cp x tp layout. At the MoE layer every
rank of the world holds *different* tokens: the rank's rows and sequence chunks (dp, cp), and of
those, under tensor parallelism, 1/tp (without sequence parallelism the tp ranks hold the same
tokens, so each takes its part of them, `split_rows`, and the outputs are gathered back over tp,
`gather_rows`; with it they already hold sequence shards). Expert parallelism borrows these
ranks: ep consecutive ranks form an ep group and split the E experts (rank j of the group owns
experts [j E/ep, (j+1) E/ep)); the world / ep groups hold copies of them (the "edp" axis).

Every rank routes its own tokens (model/moe.py owns the routing, the losses and the drop
policy), then the tokens reach their experts' ranks inside the ep group, by either dispatch:
- "all_to_all" (the default): the (token, expert) slots sorted by expert, hence by destination;
  one all-to-all of E counts, one all_to_all_single of the rows with those exact split sizes,
  the experts, and the reverse all-to-all back (combine); the gate-weighted sum is taken at the
  token's rank. Per layer and rank it moves the n k h values of its slots each way (a fraction
  1/ep of them stays on the rank).
- "gather": all-gather every rank's tokens (padded to the largest count) with their routing,
  each rank applies its experts to the slots that chose them, and a reduce-scatter sums the
  experts' weighted outputs and returns each rank its own tokens. Each rank receives ep n_max h
  values and sends as many through the reduce-scatter: more than the all-to-all once k < ep
  (k/ep of the gathered tokens are used on a rank), but two plain collectives of equal sizes.
A rank with no tokens still takes part in every collective, with zero sizes.

Gradients. Backward of each collective is its adjoint (the all-to-all with the sizes swapped;
reduce-scatter for all-gather and back). Each expert's weights see the tokens of the whole ep
group through the exchange, so they need no reduction over ep; their copies over edp are summed
in backward, and since every rank's loss is its share scaled so that the mean over the dp x cp
ranks is the global loss (vocab.py), the sum is divided by dp x cp. With ep = 1 and tp = 1 the
experts are ordinary replicated parameters and DDP averages them with the rest ("plain DDP").
The router is replicated: DDP averages it over dp x cp and, since the tp ranks route different
tokens, its gradient is summed over tp first. The shared expert is tensor-parallel like the MLP.

The balance and z-losses need the batch's expert counts: one all-reduce of E + 1 numbers over the
world per layer (forward); each rank then adds its tokens' share (model/moe.balance_terms) to
its loss, scaled by dp x cp for the same reason as the expert gradients.
"""

from __future__ import annotations

import dataclasses

import torch

from torch.profiler import record_function

from ..comm import (Axis, _Adjoint, all_gather, all_gather_raw, all_reduce_, all_to_all_counts, all_to_all_rows,
                    copy_to_group, gather_rows, reduce_scatter, split_rows)
from ..config import ModelConfig, MoeDispatch
from ..mesh import ExpertAxes
from ..model.moe import balance_terms, capacity, expert_counts, keep_mask, route, swiglu
from .region import Region
from .shard import Shard, ShardedModule


def _sync(w: torch.Tensor, edp: Axis, scale: float) -> torch.Tensor:
    """Identity forward; backward sums the gradient over the expert's copies (edp) and scales it."""
    def backward(g: torch.Tensor) -> torch.Tensor:
        g = all_reduce_(g.contiguous().clone(), edp, "bwd") if edp.size > 1 else g
        return g * scale
    return _Adjoint.apply(w, lambda t: t.view_as(t), backward)


class ParallelMoE(ShardedModule):
    """Router (replicated), E/ep routed experts of this rank, the shared expert split over tp.

    forward(x (B, S' , h), active (B, S') bool | None, stats list) -> (B, S', h), S' the rank's
    sequence (S/cp, or S/cp/tp under sequence parallelism). Appends this layer's
    {"aux", "z", "counts"}: this rank's shares of the losses (float64 scalars, scaled so that
    the loss each rank backpropagates is right; see the module doc) and the batch's counts (E,),
    with "sent" (this rank's slots) and "received" (the slots its experts computed).
    Profiler ranges: moe.dispatch, moe.experts, moe.combine.
    """

    def __init__(self, cfg: ModelConfig, prefix: str, region: Region, experts: ExpertAxes, batch_ranks: int,
                 dispatch: str = "all_to_all"):
        super().__init__()
        from .transformer import ParallelMLP  # the shared expert is a tensor-parallel SwiGLU MLP

        self.cfg, self.region, self.axes = cfg, region, experts
        self.dispatch = MoeDispatch.parse(dispatch, "moe_dispatch")
        self.batch_ranks = batch_ranks
        ep = experts.ep
        self.n_local = cfg.n_experts // ep.size
        self.first = ep.rank * self.n_local  # this rank's experts: [first, first + n_local)
        # Replicated experts with no tp: ordinary parameters, averaged by DDP with the rest.
        self.ddp_experts = ep.size == 1 and region.axis.size == 1
        E, F, h = cfg.n_experts, cfg.expert_ffn, cfg.d_model
        self.declare("router_weight", Shard(f"{prefix}.router.weight", (E, h)))
        for name, shape in (("gate", (E, F, h)), ("up", (E, F, h)), ("down", (E, h, F))):
            self.declare(f"experts_{name}", Shard(f"{prefix}.experts.{name}", shape, 0, ep.size, axis="ep"))
        shared = cfg.n_shared_experts * F
        self.shared = None
        if shared:
            mlp_cfg = dataclasses.replace(cfg, d_ff=shared, activation="swiglu", bias=False)
            self.shared = ParallelMLP(mlp_cfg, f"{prefix}.shared", region)

    @property
    def expert_parameter_names(self) -> list[str]:
        """Local names of the parameters DDP must leave alone (they are synced here)."""
        return [] if self.ddp_experts else ["experts_gate", "experts_up", "experts_down"]

    def forward(self, x: torch.Tensor, active: torch.Tensor | None, stats: list) -> torch.Tensor:
        B, S, h = x.shape
        tp = self.region.axis
        flat = x.reshape(B * S, h)  # (N, h)
        act = None if active is None else active.reshape(B * S)
        split = tp.size > 1 and not self.region.sp  # the tp ranks hold the same tokens: take a part each
        if split:
            flat = split_rows(flat, tp)  # (n, h)
            act = None if act is None else act.tensor_split(tp.size)[tp.rank]
        out = self.routed(flat, act, stats)  # (n, h)
        if split:
            out = gather_rows(out, B * S, tp)  # (N, h)
        out = out.view(B, S, h)
        return out if self.shared is None else out + self.shared(x)

    def _weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ws = (self.experts_gate, self.experts_up, self.experts_down)
        if self.ddp_experts:
            return ws
        return tuple(_sync(w, self.axes.edp, 1.0 / self.batch_ranks) for w in ws)

    def routed(self, x: torch.Tensor, act: torch.Tensor | None, stats: list) -> torch.Tensor:
        """This rank's tokens x (n, h) through their routed experts -> (n, h)."""
        cfg, tp = self.cfg, self.region.axis
        E, k = cfg.n_experts, cfg.top_k
        router = copy_to_group(self.router_weight, tp) if tp.size > 1 else self.router_weight
        r = route(x, router, k)
        counts = expert_counts(r.experts, act, E)  # (E,) this rank's assignments
        n_active = x.shape[0] if act is None else int(act.sum())
        every = torch.cat([counts.double(), counts.new_tensor([n_active]).double()])  # (E + 1,)
        every = all_reduce_(every, self.axes.world, "fwd")  # the batch's counts and tokens
        total, n_total = every[:E].long(), int(every[E])
        aux, z = balance_terms(r, act, total, n_total, E, k)
        entry = {"aux": aux * self.batch_ranks, "z": z * self.batch_ranks, "counts": total}
        stats.append(entry)

        slot = torch.arange(x.shape[0] * k, device=x.device)  # (n k,) slot s is token s // k's choice s % k
        expert_of, gate = r.experts.reshape(-1), r.gates.reshape(-1)  # (n k,)
        priority = r.probs.detach().gather(1, r.experts).reshape(-1)  # (n k,) float64
        if act is not None:  # inactive tokens take no slot
            live = act.repeat_interleave(k)
            slot, expert_of, gate, priority = slot[live], expert_of[live], gate[live], priority[live]
        limit = None
        if cfg.capacity_factor is not None:  # over the ep group's tokens (the batch's when ep = world)
            ep = self.axes.ep
            group = n_total if ep.size == self.axes.world.size else int(
                all_reduce_(torch.tensor([n_active], dtype=torch.float64, device=x.device), ep, "fwd")[0])
            limit = capacity(group, cfg)
        rows = x  # the rows that travel: in the autocast dtype when there is one (the experts compute in it)
        if torch.is_autocast_enabled(x.device.type):
            rows = x.to(torch.get_autocast_dtype(x.device.type))
        if self.dispatch is MoeDispatch.ALL_TO_ALL or self.axes.ep.size == 1:
            return self._all_to_all(rows, slot // k, expert_of, gate, priority, limit, entry).to(x.dtype)
        return self._gather(rows, slot, expert_of, gate, priority, limit, entry, x.dtype)

    def _experts(self, rows: torch.Tensor, local_expert: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """rows (m, h) through this rank's experts (local_expert (m,) in [0, n_local)) -> (m, h);
        rows not kept give 0. Every local expert runs, on zero rows if need be: its weights then
        still get a (zero) gradient, so every copy enters the same gradient collectives."""
        gate_w, up_w, down_w = self._weights()
        out = rows.new_zeros(rows.shape)
        for j in range(self.n_local):
            idx = ((local_expert == j) & keep).nonzero().squeeze(1)  # (m_j,)
            out = out.index_copy(0, idx, swiglu(rows[idx], gate_w[j], up_w[j], down_w[j]).to(out.dtype))
        return out

    def _all_to_all(self, x, token, expert_of, gate, priority, limit, entry):
        ep, L = self.axes.ep, self.n_local
        with record_function("moe.dispatch"):
            order = torch.argsort(expert_of, stable=True)  # slots by expert, hence by destination rank
            token, expert_of, gate, priority = token[order], expert_of[order], gate[order], priority[order]
            sent = torch.bincount(expert_of, minlength=self.cfg.n_experts)  # (E,) slots per expert
            got = all_to_all_counts(sent, ep).view(ep.size, L)  # (ep, L): from each rank, per local expert
            send = sent.view(ep.size, L).sum(1).tolist()
            recv = got.sum(1).tolist()
            rows = all_to_all_rows(x[token], send, recv, ep)  # (m, h) grouped by source, then expert
            local_expert = torch.arange(L, device=x.device).repeat(ep.size).repeat_interleave(got.reshape(-1))  # (m,)
            keep = torch.ones_like(local_expert, dtype=torch.bool)
            if limit is not None:
                prio = all_to_all_rows(priority, send, recv, ep)  # (m,) float64
                keep = keep_mask(local_expert, prio, limit)
        entry.update(sent=len(token), received=int(keep.sum()))
        with record_function("moe.experts"):
            y = self._experts(rows, local_expert, keep)  # (m, h)
        with record_function("moe.combine"):
            back = all_to_all_rows(y, recv, send, ep)  # (n k live, h) in the order sent
            out = torch.zeros(x.shape, dtype=gate.dtype, device=x.device)  # (n, h) summed in the gates' dtype
            return out.index_add(0, token, back * gate[:, None])

    def _gather(self, x, slot, expert_of, gate, priority, limit, entry, dtype):
        with record_function("moe.dispatch"):
            rows, mine, local_expert, keep, gates_all = self._gather_dispatch(x, slot, expert_of, gate, priority, limit)
        entry.update(sent=len(slot), received=int(keep.sum()))
        with record_function("moe.experts"):
            y = self._experts(rows[mine // self.cfg.top_k], local_expert, keep)  # (mine, h)
        with record_function("moe.combine"):
            partial = torch.zeros(rows.shape, dtype=dtype, device=rows.device)  # (ep most, h) in x's dtype
            partial = partial.index_add(0, mine // self.cfg.top_k, (y * gates_all[mine, None]).to(dtype))
            return reduce_scatter(partial, 0, self.axes.ep)[:x.shape[0]]  # (n, h) summed over the experts' ranks

    def _gather_dispatch(self, x, slot, expert_of, gate, priority, limit):
        """Every rank's tokens and their routing, padded to the largest count, and which of the
        gathered slots chose this rank's experts."""
        ep, L, k = self.axes.ep, self.n_local, self.cfg.top_k
        n = x.shape[0]
        most = int(all_gather_raw(torch.tensor([n], device=x.device), 0, ep, "fwd").max())  # the largest count
        slot_expert = torch.full((most * k,), -1, dtype=torch.long, device=x.device)  # -1: no expert
        slot_prio = torch.zeros(most * k, dtype=torch.float64, device=x.device)
        slot_expert[slot] = expert_of
        slot_prio[slot] = priority
        slot_gate = gate.new_zeros(most * k).index_put((slot,), gate)  # (most k,) differentiable in gate
        rows = all_gather(torch.nn.functional.pad(x, (0, 0, 0, most - n)), 0, ep)  # (ep most, h)
        experts_all = all_gather_raw(slot_expert, 0, ep, "fwd")  # (ep most k,)
        gates_all = all_gather(slot_gate, 0, ep)  # (ep most k,)
        mine = ((experts_all >= self.first) & (experts_all < self.first + L)).nonzero().squeeze(1)  # my slots
        local_expert = experts_all[mine] - self.first
        keep = torch.ones_like(local_expert, dtype=torch.bool)
        if limit is not None:
            keep = keep_mask(local_expert, all_gather_raw(slot_prio, 0, ep, "fwd")[mine], limit)
        return rows, mine, local_expert, keep, gates_all

