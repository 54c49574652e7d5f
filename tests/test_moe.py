"""Mixture of experts: the reference layer against a dense float64 oracle, and expert parallelism
(all-to-all and gather dispatch) beside data-, tensor- and context-parallel attention against the
single-device model: logits, losses, the balance and z-losses, expert counts and every gradient.

Determinism: routing is a discrete choice. Both sides compute the router in float64 (model/moe.py),
where two layouts' logits differ by about 1e-16 relative; every test asserts that the reference's
gap between each token's k-th and (k+1)-th probability (and, with a capacity, between the
competing tokens' probabilities) exceeds 1e-9, so no layout can choose other experts or drop
other tokens.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from distributed import mesh_for
from meshattn import ModelConfig, ParallelConfig, Transformer
from meshattn.comm import Axis, all_gather_raw
from meshattn.model.moe import MoE, route
from meshattn.parallel import gather_state_dict, parallelize
from parity import assert_close
from test_tensor_parallel import _capture_block_input, packed_documents

MOE = ModelConfig(d_model=32, n_heads=4, n_kv_heads=2, n_layers=3, d_ff=64, vocab_size=64, max_seq_len=32,
                  norm="rmsnorm", position="rope", activation="swiglu", n_experts=8, top_k=2, expert_ffn=16,
                  n_shared_experts=1, dense_layers=1, z_loss_coef=0.01)
B, S = 4, 16
MARGIN = 1e-9


def _batch(cfg: ModelConfig, seq: int = S, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (B, seq + 1), generator=g)
    targets = ids[:, 1:].clone()
    targets[:, :2] = -100
    return ids[:, :-1], targets


def routing_margin(model: Transformer, ids, documents=None) -> float:
    """The smallest gap, over MoE layers and tokens, between the k-th and (k+1)-th router
    probability of the reference forward."""
    gaps = []

    def hook(module, args, out):
        flat = args[0].reshape(-1, args[0].shape[-1])
        probs = route(flat, module.router.weight, module.cfg.top_k + 1).probs
        top = probs.topk(module.cfg.top_k + 1, dim=-1).values
        gaps.append((top[:, -2] - top[:, -1]).min().item())

    handles = [b.moe.register_forward_hook(hook) for b in model.blocks if b.moe is not None]
    with torch.no_grad():
        model(ids, documents=documents)
    for h in handles:
        h.remove()
    return min(gaps)


def check_model(rank, world, dp=1, tp=1, cp=1, ep=1, sp=False, dispatch="all_to_all", cp_impl="ring",
                dtype="float64", model=None, packed=False, recompute="none"):
    dtype = getattr(torch, dtype)
    cfg = MOE if model is None else ModelConfig(**model)
    torch.manual_seed(0)
    ref = Transformer(cfg).to(dtype)
    ids, targets = _batch(cfg)
    documents, extra = None, {}
    if packed:
        documents = packed_documents(S)
        targets = targets.masked_fill(documents < 0, -100)
        extra = dict(documents=documents)
    assert routing_margin(ref, ids, documents) > MARGIN
    ref_in = _capture_block_input(ref.blocks[0])
    ref_stats: dict = {}
    ref_logits, ref_loss = ref(ids, targets, stats=ref_stats, **extra)
    ref_loss.backward()

    par = ParallelConfig(dp=dp, tp=tp, cp=cp, ep=ep, sequence_parallel=sp, moe_dispatch=dispatch, cp_impl=cp_impl)
    pm = parallelize(ref, mesh_for(par), recompute=recompute)
    par_in = _capture_block_input(pm.local.blocks[0])
    rows = torch.arange(B).chunk(dp)[pm.axes.dp.rank]
    batch = pm.shard_batch(ids, targets, **extra)
    stats: dict = {}
    logits, loss = pm(*batch[:2], documents=batch[2] if packed else None, stats=stats)
    loss.backward()
    local_docs = None if documents is None else documents[rows]
    tp_axis, batch_axis, world_axis = pm.axes.tp, pm.axes.batch, pm.axes.experts.world

    def unshard(t, seq_dim, tp_dim=None):
        plain = Axis(tp_axis.name, tp_axis.group, tp_axis.size, tp_axis.rank)
        if tp_dim is not None and tp > 1:
            t = all_gather_raw(t, tp_dim, plain, "fwd")
        return pm.unshard_sequence(t, seq_dim, local_docs)

    vocab_dim = 2 if pm.local.vocab_parallel else None
    assert_close(unshard(logits.detach(), 1, tp_dim=vocab_dim), ref_logits.detach()[rows], "logits")
    lm = stats["lm_loss"].reshape(1).clone()
    torch.distributed.all_reduce(lm, group=batch_axis.group) if batch_axis.size > 1 else None
    assert_close(lm[0] / batch_axis.size, ref_stats["lm_loss"], "lm loss")
    assert len(stats["moe"]) == len(ref_stats["moe"]) == cfg.n_moe_layers
    for i, (mine, want) in enumerate(zip(stats["moe"], ref_stats["moe"])):
        shares = torch.stack([mine["aux"].detach(), mine["z"].detach()]) / batch_axis.size
        torch.distributed.all_reduce(shares, group=world_axis.group)
        assert_close(shares[0], want["aux"].detach(), f"layer {i} balance loss")
        assert_close(shares[1], want["z"].detach(), f"layer {i} z-loss")
        assert torch.equal(mine["counts"], want["counts"]), f"layer {i} expert counts"
    x_grad = unshard(par_in["x"].grad, 1, tp_dim=1 if sp else None)
    assert_close(x_grad / batch_axis.size, ref_in["x"].grad[rows], "block-0 input grad")
    params, grads = gather_state_dict(pm), gather_state_dict(pm, grads=True)
    expected = dict(ref.named_parameters())
    assert params.keys() == expected.keys()
    for name, p in expected.items():
        torch.testing.assert_close(params[name], p.detach(), rtol=0, atol=0, msg=f"param {name} round trip")
        assert_close(grads[name], p.grad, f"grad {name}")
    return sum(1 for n in expected if ".experts." in n)


LAYOUTS = {  # name: (world, layout)
    "dp2-ep2": (2, dict(dp=2, ep=2)),
    "tp2-ep2-gather": (2, dict(tp=2, ep=2, dispatch="gather")),
    "dp2xtp2-ep4": (4, dict(dp=2, tp=2, ep=4)),
    "dp2xtp2+sp-ep2": (4, dict(dp=2, tp=2, sp=True, ep=2)),
    "dp2xcp2-ep4-gather": (4, dict(dp=2, cp=2, ep=4, dispatch="gather")),
    "dp4-ep1": (4, dict(dp=4, ep=1)),
    "dp2xcp2-ep2-packed": (4, dict(dp=2, cp=2, ep=2, packed=True)),
    "cp2:ulysses-ep2@block": (2, dict(cp=2, ep=2, cp_impl="ulysses", recompute="block")),
}


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_model_parity(pools, name):
    world, layout = LAYOUTS[name]
    assert pools.run(world, check_model, **layout) == [3 * MOE.n_moe_layers] * world
