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
from test_data_parallel import reference_run
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
                dtype="float64", model=None, packed=False, recompute="none", shard="none"):
    dtype = getattr(torch, dtype)
    cfg = MOE if model is None else ModelConfig(**model)
    torch.manual_seed(0)
    ref = Transformer(cfg).to(dtype)
    ids, targets = _batch(cfg)
    documents, extra = None, {}
    if packed:  # packed documents with padding; "idle": the last dp rank's rows are all padding
        documents = packed_documents(S)
        if packed == "idle":
            documents[B - B // dp:] = -1
        targets = targets.masked_fill(documents < 0, -100)
        extra = dict(documents=documents)
    assert routing_margin(ref, ids, documents) > MARGIN
    ref_in = _capture_block_input(ref.blocks[0])
    ref_stats: dict = {}
    ref_logits, ref_loss = ref(ids, targets, stats=ref_stats, **extra)
    ref_loss.backward()

    par = ParallelConfig(dp=dp, tp=tp, cp=cp, ep=ep, sequence_parallel=sp, moe_dispatch=dispatch, cp_impl=cp_impl,
                         shard=shard)
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
    assert len(stats["moe"]) == len(ref_stats["moe"]) == cfg.n_moe_layers, (len(stats["moe"]), type(stats["moe"]))
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
    "dp2-ep2-idle-rank": (2, dict(dp=2, ep=2, packed="idle")),
    "cp2:ulysses-ep2@block": (2, dict(cp=2, ep=2, cp_impl="ulysses", recompute="block")),
    "dp2xcp2xtp2-ep8": (8, dict(dp=2, cp=2, tp=2, ep=8)),
    "dp4xtp2-ep4-gather": (8, dict(dp=4, tp=2, ep=4, dispatch="gather")),
    # FSDP shards all but the experts over dp x cp; the experts keep their own split and sum
    "dp2xtp2-ep4-sharded": (4, dict(dp=2, tp=2, ep=4, shard="dp")),
}


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_model_parity(pools, name):
    world, layout = LAYOUTS[name]
    assert pools.run(world, check_model, **layout) == [3 * MOE.n_moe_layers] * world


# -- the reference layer against a dense float64 oracle ---------------------------------------------

def dense_oracle(moe: MoE, x: torch.Tensor, active: torch.Tensor | None):
    """The MoE layer written densely from its definition: every expert on every token, a (N, E)
    gate matrix chosen by Python sorting (not topk), capacity by Python sorting too."""
    cfg, w = moe.cfg, moe.experts
    N, E, k = x.shape[0], cfg.n_experts, cfg.top_k
    act = torch.ones(N, dtype=torch.bool) if active is None else active
    logits = x.double() @ moe.router.weight.double().T  # (N, E)
    probs = logits.softmax(-1)
    p = probs.detach().tolist()
    chosen = torch.zeros(N, E, dtype=torch.bool)
    for t in range(N):
        if act[t]:
            for e in sorted(range(E), key=lambda e: -p[t][e])[:k]:
                chosen[t, e] = True
    n = int(act.sum())
    keep = chosen.clone()
    if cfg.capacity_factor is not None:
        limit = -(-int(cfg.capacity_factor * n * k * 1000) // (E * 1000))  # ceil(c n k / E), c with 3 decimals
        for e in range(E):
            cands = sorted((t for t in range(N) if chosen[t, e]), key=lambda t: (-p[t][e], t))
            for t in cands[limit:]:
                keep[t, e] = False
    top = probs * chosen
    gates = (top / top.sum(-1, keepdim=True).clamp(min=1e-300)).to(x.dtype) * keep  # (N, E)
    hidden = torch.einsum("nh,efh->nef", x, w.gate)
    y = torch.einsum("nef,ehf->neh", F.silu(hidden) * torch.einsum("nh,efh->nef", x, w.up), w.down)  # (N, E, h)
    out = torch.einsum("ne,neh->nh", gates, y)
    if moe.shared is not None:
        out = out + moe.shared(x)
    f = chosen.sum(0).double() / (n * k)
    aux = E * (f * probs[act].mean(0)).sum()
    z = logits[act].logsumexp(-1).pow(2).mean()
    return out, aux, z, chosen.sum(0)


@pytest.mark.parametrize("capacity", [None, 1.0])
@pytest.mark.parametrize("padded", [False, True])
def test_reference_layer_against_dense_oracle(capacity, padded):
    cfg = dataclasses.replace(MOE, capacity_factor=capacity)
    torch.manual_seed(0)
    moe = MoE(cfg).double()
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(2, 12, cfg.d_model, dtype=torch.float64, requires_grad=True)
    active = None
    if padded:
        active = torch.ones(2, 12, dtype=torch.bool)
        active[1, 7:] = False
    c = torch.randn(2, 12, cfg.d_model, dtype=torch.float64)
    stats: list = []
    out = moe(x, active, stats)
    ((out * c).sum() + stats[0]["aux"] + stats[0]["z"]).backward()
    got = [x.grad.clone()] + [p.grad.clone() for p in moe.parameters()]
    moe.zero_grad()
    x.grad = None
    want, aux, z, counts = dense_oracle(moe, x.reshape(24, -1), None if active is None else active.reshape(24))
    ((want.view_as(c) * c).sum() + aux + z).backward()
    expected = [x.grad] + [p.grad for p in moe.parameters()]
    assert_close(out, want.view_as(out), "output")
    assert_close(stats[0]["aux"], aux, "balance loss")
    assert_close(stats[0]["z"], z, "z-loss")
    assert torch.equal(stats[0]["counts"], counts)
    if padded:
        assert torch.equal(out[1, 7:], torch.zeros_like(out[1, 7:]) + moe.shared(x)[1, 7:])  # no routed part
    if capacity is not None:  # the capacity binds: some assignment was dropped
        assert int(counts.max()) > -(-12 * 2 * 2 // 8)
    for i, (g, e) in enumerate(zip(got, expected)):
        assert_close(g, e, f"gradient {i}")


# -- the layer alone: uneven and empty token counts, capacity, bytes per collective --------------

TOKENS = {2: [7, 0], 4: [5, 0, 11, 3]}  # tokens per rank: uneven, one rank with none


def check_layer(rank, world, ep, dispatch, capacity=None, idle=False):
    """Every rank holds its own TOKENS[world][rank] tokens (none at all when idle); the layer's
    output, its input gradient, the balance and z-losses and every weight gradient equal the
    reference layer's on all tokens at once; the bytes each collective moved equal the analytic
    volume of this routing."""
    from meshattn import CommCounter
    from meshattn.parallel.moe import ParallelMoE
    from meshattn.parallel.region import Region
    from meshattn.parallel.shard import collect_shards, gather_full, load_full_state_dict

    cfg = dataclasses.replace(MOE, capacity_factor=capacity)
    torch.manual_seed(0)
    ref = torch.nn.Module()
    ref.moe = MoE(cfg).double()
    for p in ref.parameters():
        torch.nn.init.normal_(p, std=0.3)
    counts = [0] * world if idle else TOKENS[world]
    xs = torch.randn(sum(counts), cfg.d_model, dtype=torch.float64).split(counts)
    cs = torch.randn(sum(counts), cfg.d_model, dtype=torch.float64).split(counts)
    x_all = torch.cat(xs).requires_grad_()
    ref_stats: list = []
    out_all = ref.moe(x_all[None], None, ref_stats)[0]
    ((out_all * torch.cat(cs)).sum() + ref_stats[0]["aux"] + ref_stats[0]["z"]).backward()
    r = route(x_all.detach(), ref.moe.router.weight, cfg.top_k + 1)
    if len(x_all):
        top = r.probs.topk(cfg.top_k + 1, dim=-1).values
        assert (top[:, -2] - top[:, -1]).min() > MARGIN
        assert (r.probs.flatten().sort().values.diff().abs().min()) > MARGIN  # no ties for the capacity either

    counter = CommCounter()
    dims = mesh_for(ParallelConfig(dp=world, ep=ep, moe_dispatch=dispatch))
    axes = dims.axes(None, counter, moe=True)
    layer = ParallelMoE(cfg, "moe", Region(axes.tp, False), axes.experts, batch_ranks=1, dispatch=dispatch).double()
    shards = collect_shards(layer)
    load_full_state_dict(layer, shards, ref.state_dict(), axes.shard_axes())
    x = xs[rank].clone().requires_grad_()
    stats: list = []
    out = layer(x[None], None, stats)[0]  # (n, h)
    ((out * cs[rank]).sum() + stats[0]["aux"] + stats[0]["z"]).backward()

    start = sum(counts[:rank])
    assert_close(out, out_all[start:start + counts[rank]].detach(), "output")
    assert_close(x.grad, x_all.grad[start:start + counts[rank]], "input gradient")
    shares = torch.stack([stats[0]["aux"].detach(), stats[0]["z"].detach()])
    torch.distributed.all_reduce(shares)
    assert_close(shares[0], ref_stats[0]["aux"].detach(), "balance loss")
    assert_close(shares[1], ref_stats[0]["z"].detach(), "z-loss")
    assert torch.equal(stats[0]["counts"], ref_stats[0]["counts"])
    for p in (layer.router_weight, *[q for q in layer.shared.parameters()]):
        torch.distributed.all_reduce(p.grad)  # replicated: the ranks' contributions add up
    grads = gather_full(layer, shards, axes.shard_axes(), grads=True)
    for name, p in ref.named_parameters():
        assert_close(grads[name], p.grad, f"grad {name}")

    # Bytes: the rows this rank sends and receives follow from the reference routing.
    h, k, item, E = cfg.d_model, cfg.top_k, 8, cfg.n_experts
    experts = r.experts[:, :k]  # (N, k) the chosen experts of every token
    owner = experts // (E // ep)  # (N, k) the ep rank owning each choice
    group = rank // ep * ep  # the first rank of this rank's ep group
    members = range(group, group + ep)
    mine = owner[sum(counts[:group]):sum(counts[:group + ep])] == rank % ep  # the group's choices I own
    sent, received = counts[rank] * k, int(mine.sum())
    moved = {key: value for key, value in counter.nbytes.items() if key[0] == "ep" and value}
    if dispatch == "all_to_all":
        rows = (sent + received) * h * item  # dispatch, then combine (the rows my experts got, back)
        want = {("ep", "all_to_all", "fwd"): E * 8 + rows + sent * 8 * (capacity is not None),
                ("ep", "all_to_all", "bwd"): rows}
    else:
        most = max(counts[m] for m in members)
        gathered = ep * most * (h * item + k * 8 + k * item + k * 8 * (capacity is not None))
        want = {("ep", "all_gather", "fwd"): ep * 8 + gathered,
                ("ep", "reduce_scatter", "fwd"): ep * most * h * item,
                ("ep", "reduce_scatter", "bwd"): ep * most * (h + k) * item,
                ("ep", "all_gather", "bwd"): ep * most * h * item}
    if ep == 1:
        want = {}
    assert moved == {key: v for key, v in want.items() if v}, (moved, want)
    assert counter.nbytes[("world", "all_reduce", "fwd")] == (E + 1) * 8
    return counts[rank]


LAYER_CASES = [(2, 2, "all_to_all", None, False), (4, 4, "all_to_all", None, False), (4, 2, "gather", None, False),
               (4, 4, "gather", 1.0, False), (2, 2, "all_to_all", 1.0, False), (4, 4, "all_to_all", None, True)]
# A capacity applies per ep group (model/moe.py): the cases with one compare at ep = world, where the
# group is the whole batch the reference sees.


@pytest.mark.parametrize("world,ep,dispatch,capacity,idle", LAYER_CASES,
                         ids=[f"w{w}-ep{e}-{d}{'-cap' if c else ''}{'-idle' if i else ''}"
                              for w, e, d, c, i in LAYER_CASES])
def test_layer_uneven_and_empty(pools, world, ep, dispatch, capacity, idle):
    # A hang would fail: collectives time out, and the job must answer within 60 s.
    got = pools.run(world, check_layer, timeout=60, ep=ep, dispatch=dispatch, capacity=capacity, idle=idle)
    assert got == ([0] * world if idle else TOKENS[world])


# -- training: the single device's curve, and checkpoints across expert layouts -------------------

TRAIN_MODEL = dataclasses.replace(MOE, vocab_size=256)


def _train_cfg(par: ParallelConfig, steps: int, out: str = "runs/test", dtype: str = "float32"):
    from meshattn import TrainConfig

    return TrainConfig(model=TRAIN_MODEL, parallel=par, steps=steps, batch_size=8, seq_len=32, lr=3e-3, warmup=5,
                       dtype=dtype, sample_tokens=0, out=out)


def _corpus():
    from meshattn.training.corpus import Corpus

    return Corpus.from_path(None, max_bytes=1 << 18)


def train_curve(rank, world, steps, dtype, **layout):
    from meshattn.training.step import build_model, make_optimizer, train_step

    cfg = _train_cfg(ParallelConfig(**layout), steps, dtype=dtype)
    corpus = _corpus()
    model = build_model(cfg, mesh_for(cfg.parallel))
    opt = make_optimizer(model, cfg)
    losses, aux = [], []
    for step in range(steps):
        report: dict = {}
        losses.append(train_step(model, opt, corpus, step, cfg, report=report)[0])
        aux.append(report["aux_loss"])
    return losses, aux


@pytest.mark.parametrize("dtype,rtol", [
    # Summation order differs (the all-to-all's combine, tp's splits) and Adam carries the rounding
    # forward; routing is a discrete choice, but in float64 over float32 activations two layouts'
    # probabilities differ by ~1e-8, far below the gaps between a token's k-th and (k+1)-th expert,
    # so both choose alike (a different choice for one token moves the loss by ~1e-4, far outside the
    # band). Measured over 50 steps at dp4 x ep4 (this machine): float32 LM and balance losses within
    # 1.5e-7 and 2.7e-8 relative, float64 within 4.1e-16 and 4.0e-16. The band is ~14x the larger.
    # (dp4: tp beside ep is covered by the parity tests; fewer collectives per step keep this short.)
    ("float32", 2e-6),
])
def test_fifty_steps_at_ep4_follow_the_single_device_curve(pools, dtype, rtol):
    results = pools.run(4, train_curve, steps=50, dtype=dtype, dp=4, ep=4)
    losses, aux = results[0]
    assert all(r == results[0] for r in results), "every rank reports the same losses"
    ref_aux: list = []
    ref_losses, _ = reference_run(_train_cfg(ParallelConfig(), 50, dtype=dtype), _corpus(), ref_aux)
    assert losses[-1] < losses[0] - 1.0, "the loss falls"
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=rtol, atol=0)
    torch.testing.assert_close(torch.tensor(aux), torch.tensor(ref_aux), rtol=rtol, atol=0)


CKPT_LAYOUTS = {"dp2xtp2-ep4": (4, dict(dp=2, tp=2, ep=4)), "dp2-ep2": (2, dict(dp=2, ep=2)), "one": (1, dict())}


def save_then_continue(rank, world, layout, root, before=3, after=2):
    from meshattn.training import checkpoint as ckpt
    from meshattn.training.step import build_model, make_optimizer, train_step

    cfg = _train_cfg(ParallelConfig(**CKPT_LAYOUTS[layout][1]), before + after, root)
    corpus = _corpus()
    model = build_model(cfg, mesh_for(cfg.parallel))
    opt = make_optimizer(model, cfg)
    for step in range(before):
        train_step(model, opt, corpus, step, cfg)
    ckpt.save(model, opt, cfg, before, __import__("pathlib").Path(root))
    full = {k: v.clone() for k, v in gather_state_dict(model).items()}
    return full, [train_step(model, opt, corpus, s, cfg)[0] for s in range(before, before + after)]


def load_and_continue(rank, world, layout, root, full, before=3, after=2):
    from meshattn.training import checkpoint as ckpt
    from meshattn.training.step import build_model, make_optimizer, train_step

    cfg = _train_cfg(ParallelConfig(**CKPT_LAYOUTS[layout][1]), before + after, root)
    corpus = _corpus()
    model = build_model(cfg, mesh_for(cfg.parallel))
    opt = make_optimizer(model, cfg)
    assert ckpt.load(model, opt, cfg, __import__("pathlib").Path(root))["step"] == before
    loaded = gather_state_dict(model)
    assert loaded.keys() == full.keys()
    for name, t in full.items():
        assert torch.equal(loaded[name], t), f"{name} differs after loading"
    return [train_step(model, opt, corpus, s, cfg)[0] for s in range(before, before + after)]


def test_an_ep4_checkpoint_resumes_at_ep2_and_on_one_device(pools, tmp_path):
    full, losses = pools.run(4, save_then_continue, layout="dp2xtp2-ep4", root=str(tmp_path))[0]
    for loaded in ("dp2-ep2", "one"):
        world = CKPT_LAYOUTS[loaded][0]
        resumed = pools.run(world, load_and_continue, layout=loaded, root=str(tmp_path), full=full)[0]
        # Another layout sums in another order: fp32 rounding, amplified a little by Adam.
        assert_close(torch.tensor(resumed), torch.tensor(losses), f"losses after resuming at {loaded}", rtol=1e-5)
