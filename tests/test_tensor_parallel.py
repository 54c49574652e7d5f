"""Tensor (x data) parallel model == single-device model: logits, loss, the gradient at the input
of the first block, and every weight gradient, on gloo process groups of 1, 2 and 4 ranks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from distributed import mesh_for
from meshattn import CommCounter, ModelConfig, ParallelConfig, Transformer
from meshattn.comm import Axis, all_gather_raw
from meshattn.parallel import gather_state_dict, parallelize
from meshattn.planner import tensor_parallel_comm
from parity import assert_close

# Small models covering every feature the split must respect. H=4 query heads throughout, so
# tp=4 gives one head per rank; KV heads 4 (MHA), 2 (GQA: replicated when tp=4) and 1 (MQA).
MODELS = {
    "mha-gpt2": dict(d_model=32, n_heads=4, n_kv_heads=4, n_layers=2, d_ff=64, vocab_size=64, max_seq_len=16,
                     norm="layernorm", position="learned", activation="gelu", bias=True, tie_embeddings=True),
    "gqa-llama": dict(d_model=32, n_heads=4, n_kv_heads=2, n_layers=2, d_ff=64, vocab_size=64, max_seq_len=16,
                      norm="rmsnorm", position="rope", activation="swiglu"),
    "mqa": dict(d_model=32, n_heads=4, n_kv_heads=1, n_layers=2, d_ff=64, vocab_size=64, max_seq_len=16,
                norm="layernorm", position="rope", activation="swiglu", bias=True),
}
# (world, dp, tp, sequence_parallel, vocab_parallel). These models' vocabulary (64 <= 4 * d_model)
# is kept whole under "auto" unless sequence parallelism forces the split; "on" and "off" cover both
# ways on plain tensor parallelism.
LAYOUTS = [(1, 1, 1, False, "auto"), (2, 1, 2, False, "on"), (2, 1, 2, False, "off"), (2, 2, 1, False, "auto"),
           (2, 1, 2, True, "auto"), (4, 1, 4, False, "on"), (4, 1, 4, False, "off"), (4, 4, 1, False, "auto"),
           (4, 2, 2, False, "on"), (4, 2, 2, True, "auto"), (4, 1, 4, True, "on")]
B, S = 4, 8


def _batch(cfg: ModelConfig, seed: int = 1, seq: int = S):
    """Random ids; the first two targets of every row are ignored (-100), as padding would be,
    so context-parallel ranks hold unequal numbers of counted tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (B, seq + 1), generator=g)
    targets = ids[:, 1:].clone()
    targets[:, :2] = -100
    return ids[:, :-1], targets


def packed_documents(seq: int, seed: int = 2) -> torch.Tensor:
    """(B, seq) document ids of packed rows: random lengths with length-1 documents, one row a
    single document, one row ending in padding (negative ids)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for b in range(B):
        ids, doc = [], 0
        while len(ids) < seq:
            n = 1 if torch.rand(1, generator=g) < 0.3 else int(torch.randint(2, seq, (1,), generator=g))
            ids += [doc] * n
            doc += 1
        rows.append(ids[:seq])
    rows[1] = [0] * seq
    rows[2] = rows[2][: seq - 3] + [-1] * 3
    return torch.tensor(rows)


def _capture_block_input(block: torch.nn.Module) -> dict:
    store = {}

    def hook(module, args):
        args[0].retain_grad()
        store["x"] = args[0]

    block.register_forward_pre_hook(hook)
    return store


def check_parity(rank, world, dp, tp, sp, model, dtype, cp=1, cp_impl="ring", cp_layout="zigzag",
                 ulysses_size=None, seq=S, overlap=True, vocab="auto", window=None, packed=False, shard="none",
                 recompute="none"):
    """packed: the batch is packed documents (packed_documents), targets never cross a boundary;
    window: the model's sliding window; shard="dp": parameters sharded over dp x cp by FSDP."""
    dtype = getattr(torch, dtype)
    cfg = ModelConfig(**(MODELS[model] if isinstance(model, str) else model), window=window)
    torch.manual_seed(0)
    ref = Transformer(cfg).to(dtype)
    ids, targets = _batch(cfg, seq=seq)
    documents, extra = None, {}
    if packed:
        from meshattn.model.mask import boundary_targets

        documents = packed_documents(seq)
        nxt = torch.cat([documents[:, 1:], documents[:, -1:]], dim=1)  # the next token's document
        targets = boundary_targets(targets, documents, nxt)
        extra = dict(documents=documents)
    ref_in = _capture_block_input(ref.blocks[0])
    ref_logits, ref_loss = ref(ids, targets, **extra)
    ref_loss.backward()

    par = ParallelConfig(dp=dp, tp=tp, cp=cp, sequence_parallel=sp, cp_impl=cp_impl, cp_layout=cp_layout,
                         ulysses_size=ulysses_size, overlap=overlap, vocab_parallel=vocab, shard=shard)
    pm = parallelize(ref, mesh_for(par), recompute=recompute)
    if shard == "dp":  # every parameter is FSDP's DTensor, this rank holding its dim-0 piece
        from meshattn.parallel.fsdp import is_sharded

        assert all(is_sharded(p) and p.to_local().shape[0] == -(-p.shape[0] // pm.axes.batch.size)
                   or p.to_local().shape[0] == 0 for p in pm.parameters())
    assert pm.local.vocab_parallel == par.splits_vocab(cfg)
    dp_axis, tp_axis, batch_axis = pm.axes.dp, pm.axes.tp, pm.axes.batch
    par_in = _capture_block_input(pm.local.blocks[0])
    rows = torch.arange(B).chunk(dp)[dp_axis.rank]
    batch = pm.shard_batch(ids, targets, **extra)  # (B/dp, S/cp) tokens, and (B/dp, S) documents
    logits, loss = pm(*batch[:2], **({} if documents is None else dict(documents=batch[2])))  # (B/dp, S/cp, V/tp | V)
    loss.backward()
    local_docs = None if documents is None else documents[rows]

    def unshard(t, seq_dim, tp_dim=None):  # this replica's rows, whole sequence, whole vocab/width
        plain_tp = Axis(tp_axis.name, tp_axis.group, tp_axis.size, tp_axis.rank)
        if tp_dim is not None and tp > 1:
            t = all_gather_raw(t, tp_dim, plain_tp, "fwd")
        return pm.unshard_sequence(t, seq_dim, local_docs)

    vocab_dim = 2 if pm.local.vocab_parallel else None
    assert_close(unshard(logits.detach(), 1, tp_dim=vocab_dim), ref_logits.detach()[rows], "logits")
    # Each rank's loss is weighted so that its mean over dp x cp is the global mean.
    mean_loss = loss.detach().reshape(1).clone()
    if batch_axis.size > 1:
        torch.distributed.all_reduce(mean_loss, group=batch_axis.group)
    assert_close(mean_loss[0] / batch_axis.size, ref_loss.detach(), "loss")

    # The global loss is the mean of dp*cp rank losses: a rank's activation gradient is dp*cp
    # times the reference's for its tokens.
    x_grad = par_in["x"].grad
    x_grad = unshard(x_grad, 1, tp_dim=1 if sp else None)  # (B/dp, S, h)
    assert_close(x_grad / batch_axis.size, ref_in["x"].grad[rows], "block-0 input grad")

    params = gather_state_dict(pm)
    grads = gather_state_dict(pm, grads=True)
    expected = dict(ref.named_parameters(remove_duplicate=False))
    assert params.keys() == expected.keys()
    for name, p in expected.items():
        torch.testing.assert_close(params[name], p.detach(), rtol=0, atol=0, msg=f"param {name} round trip")
        assert_close(grads[name], p.grad, f"grad {name}")
    return len(expected)


@pytest.mark.parametrize("model", sorted(MODELS))
@pytest.mark.parametrize("world,dp,tp,sp,vocab", LAYOUTS,
                         ids=[f"w{w}-dp{d}-tp{t}{'-sp' if s else ''}-vocab-{v}" for w, d, t, s, v in LAYOUTS])
def test_parity_fp32(pools, world, dp, tp, sp, vocab, model):
    counts = pools.run(world, check_parity, dp=dp, tp=tp, sp=sp, model=model, dtype="float32", vocab=vocab)
    n_params = len(list(Transformer(ModelConfig(**MODELS[model])).named_parameters(remove_duplicate=False)))
    assert counts == [n_params] * world


@pytest.mark.parametrize("world,dp,tp,sp,vocab", [(2, 1, 2, False, "on"), (4, 2, 2, True, "auto"),
                                                  (4, 1, 4, False, "off")])
@pytest.mark.parametrize("model", ["gqa-llama", "mqa"])
def test_parity_fp64(pools, world, dp, tp, sp, vocab, model):
    pools.run(world, check_parity, dp=dp, tp=tp, sp=sp, model=model, dtype="float64", vocab=vocab)


@pytest.mark.parametrize("model", ["gqa-llama", "mqa"])
def test_parity_without_overlap(pools, model):
    """overlap=False (ring transfers and TP input-gradient all-reduces completed at once) is exact too."""
    pools.run(4, check_parity, dp=1, tp=2, sp=False, model=model, dtype="float32", cp=2, overlap=False)


def check_replica_sum_is_needed(rank, world):
    """Without summing the replicated KV weights' gradients over their replica group the K/V
    gradients are wrong: the parity check must notice (it is not a check that cannot fail)."""
    cfg = ModelConfig(**MODELS["mqa"])
    torch.manual_seed(0)
    ref = Transformer(cfg)
    ids, targets = _batch(cfg)
    ref(ids, targets)[1].backward()
    par = ParallelConfig(tp=world)
    pm = parallelize(ref, mesh_for(par))
    for block in pm.local.blocks:
        block.attn.kv_axis = Axis.single("kv")  # drop the replica-group sum
    pm(ids, targets)[1].backward()
    grads = gather_state_dict(pm, grads=True)
    with pytest.raises(AssertionError):
        assert_close(grads["blocks.0.attn.qkv.weight"], ref.blocks[0].attn.qkv.weight.grad)


def test_parity_check_detects_missing_replica_sum(pools):
    pools.run(2, check_replica_sum_is_needed)


def measure_comm(rank, world, tp, sp, model, vocab):
    cfg = ModelConfig(**MODELS[model])
    torch.manual_seed(0)
    ref = Transformer(cfg)
    ids, targets = _batch(cfg)
    par = ParallelConfig(tp=tp, sequence_parallel=sp, vocab_parallel=vocab)
    counter = CommCounter()
    pm = parallelize(ref, mesh_for(par), counter)
    pm(ids, targets)[1].backward()
    return {f"{a}/{k}/{p}": (counter.calls[(a, k, p)], b) for (a, k, p), b in counter.nbytes.items()}


@pytest.mark.parametrize("model", sorted(MODELS))
@pytest.mark.parametrize("tp,sp,vocab", [(2, False, "on"), (2, False, "off"), (4, False, "on"), (2, True, "on"),
                                         (4, True, "on")])
def test_comm_bytes_match_analytic(pools, tp, sp, vocab, model):
    measured = pools.run(tp, measure_comm, tp=tp, sp=sp, model=model, vocab=vocab)
    assert all(m == measured[0] for m in measured), "every tp rank moves the same volume"
    cfg = ModelConfig(**MODELS[model])
    predicted = tensor_parallel_comm(cfg, ParallelConfig(tp=tp, sequence_parallel=sp, vocab_parallel=vocab), B, S,
                                     itemsize=4)
    assert measured[0] == {k: (v.calls, v.nbytes) for k, v in predicted.items()}
    # The headline figure, written out independently of the planner: per layer, 2 collectives of
    # B*S*d_model fp32 elements forward and 2 backward on the tp axis (all-reduces, or all-gather +
    # reduce-scatter pairs under sequence parallelism), plus, for a split vocabulary, one each for
    # the embedding and the head and three all-reduces of B*S values in the loss.
    split = vocab == "on"
    act = B * S * cfg.d_model * 4
    fwd_kinds = ["tp/all_gather/fwd", "tp/reduce_scatter/fwd"] if sp else ["tp/all_reduce/fwd"]
    fwd_activation_bytes = sum(measured[0][k][1] for k in fwd_kinds) - (3 * B * S * 4 if split and not sp else 0)
    assert fwd_activation_bytes == (2 * cfg.n_layers + split) * act * (2 if sp else 1)
    bwd_kinds = ["tp/all_gather/bwd", "tp/reduce_scatter/bwd"] if sp else ["tp/all_reduce/bwd"]
    bwd_activation_bytes = sum(measured[0][k][1] for k in bwd_kinds)
    # Under sequence parallelism each entry saved only its shard and gathers it again in backward:
    # per region an all-gather (the exit's mirror), a re-gather and a reduce-scatter.
    assert bwd_activation_bytes == (2 * cfg.n_layers + split) * act * (3 if sp else 1)
    # Replicated KV heads: per layer, the K and V weight (+ bias) slices of one KV head, summed
    # over the tp/G ranks that hold it.
    if cfg.n_kv_heads < tp:
        per_layer = 2 * (cfg.head_dim * cfg.d_model + (cfg.head_dim if cfg.bias else 0)) * 4
        assert measured[0]["kv/all_reduce/bwd"][1] == cfg.n_layers * per_layer
    else:
        assert "kv/all_reduce/bwd" not in measured[0]


def saved_shapes_under_sequence_parallelism(rank, world):
    """Shapes of every tensor autograd saves in one forward of a tp=world + sp model."""
    cfg = ModelConfig(**MODELS["gqa-llama"])
    torch.manual_seed(0)
    ids, targets = _batch(cfg)
    par = ParallelConfig(tp=world, sequence_parallel=True)
    pm = parallelize(Transformer(cfg), mesh_for(par))
    params = {p.data_ptr() for p in pm.parameters()}
    shapes = []

    def pack(t):
        if t.data_ptr() not in params:
            shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = pm(ids, targets)[1]
    loss.backward()
    return shapes, cfg.d_model


def test_sequence_parallel_entries_save_only_their_shard(pools):
    """Megatron's re-gather: a column-parallel entry under sequence parallelism keeps its input
    shard (B, S/tp, h) for the weight gradients and gathers it again in backward, so no gathered
    (B, S, h) block input is saved (at tp=4 no other saved tensor has that shape: heads and MLP
    columns are h/4 and F/4 wide)."""
    shapes, h = pools.run(4, saved_shapes_under_sequence_parallelism)[0]
    assert (B, S, h) not in shapes and (B * S, h) not in shapes, shapes  # F.linear saves its input as 2-D
    assert (B, S // 4, h) in shapes
