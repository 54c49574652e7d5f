"""The planner's mixture-of-experts model: FLOPs by hand, experts' memory falling as 1/ep, the
dispatch bytes against the formula (and what autograd saves against the activation model), dense
plans unchanged to the bit, and the search at 16 H100s choosing expert parallelism."""

from __future__ import annotations

import dataclasses
import json

import pytest

from meshattn.cli import main
from meshattn.cli.options import build_parser
from meshattn.cli.plan import plan_command
from meshattn.config import PRESETS, ConfigError, ModelConfig, ParallelConfig
from meshattn.planner.cluster import GpuCluster
from meshattn.planner.comm import moe_comm, tensor_parallel_comm
from meshattn.planner.estimate import Job, estimate
from meshattn.planner.flops import forward_flops, step_flops
from meshattn.planner.hardware import gpu
from meshattn.planner.layout import Plan, check_plan, enumerate_plans, parse_plan
from meshattn.planner.memory import activation_bytes_per_layer, params_per_rank, state_bytes
from meshattn.planner.moe import EXPERT_IMBALANCE, moe_layers
from meshattn.planner.search import search
from meshattn.planner.stack import MESHATTN

# h=8, H=2, G=1, F=16, V=32, L=3: the first layer dense, then 2 MoE layers of E=4 experts of Fe=6
# (top-2) beside one shared expert of 6
TINY = ModelConfig(d_model=8, n_heads=2, n_kv_heads=1, n_layers=3, d_ff=16, vocab_size=32, max_seq_len=16,
                   norm="rmsnorm", activation="swiglu", n_experts=4, top_k=2, expert_ffn=6, n_shared_experts=1,
                   dense_layers=1)
H100 = GpuCluster(gpu("h100"))
DEEPSEEK = PRESETS["deepseek-v2-lite"]


# -- (a) FLOPs ----------------------------------------------------------------------------------

def test_moe_layer_flops_by_hand():
    f = forward_flops(TINY, batch=2, seq=4)  # 8 tokens
    swiglu = 2 * 8 * (8 * 6 + 8 * 6 + 6 * 8)  # one expert on every token: gate, up, down = 2304
    assert f["mlp"] == 1 * 2 * 8 * 8 * 16 * 3  # the dense first layer only: 6144
    assert f["router"] == 2 * 2 * 8 * 8 * 4  # 2 MoE layers x 2 n h E = 1024
    assert f["experts"] == 2 * 2 * swiglu  # 2 layers x top-2: 9216
    assert f["shared_expert"] == 2 * 1 * swiglu  # 4608
    dense_parts = f["qkv"] + f["attention"] + f["out_proj"] + f["mlp"]
    assert f["blocks"] == dense_parts + 1024 + 9216 + 4608
    assert f["total"] == f["blocks"] + f["lm_head"]
    # per token and MoE layer: the active parameters only, 2 x (router 32 + 2 experts x 144 + shared 144)
    total, active = TINY.moe_params()
    assert (f["router"] + f["experts"] + f["shared_expert"]) == 2 * 8 * 2 * active
    assert active == 32 + 2 * 144 + 144 and total == 32 + 4 * 144 + 144
    assert step_flops(TINY, 2, 4)["model"] == 3 * f["total"]
    assert step_flops(TINY, 2, 4, "full")["recompute"] == f["blocks"]  # the MoE layers are recomputed too
    assert "router" not in forward_flops(PRESETS["tiny"], 2, 4)  # dense: the parts as before


# -- (b) parameters and their memory ------------------------------------------------------------

def test_expert_memory_falls_as_one_over_ep():
    routed = 2 * 4 * 3 * 8 * 6  # 2 MoE layers x E x 3 h Fe = 1152
    assert params_per_rank(TINY)["total"] == TINY.num_params()
    for ep in (1, 2, 4):
        p = params_per_rank(TINY, ep=ep)
        assert p["experts"] * ep == routed
        assert p["total"] == TINY.num_params() - routed + routed // ep
        s = state_bytes(TINY, ep=ep)
        assert s["expert_params"] * ep == routed and s["experts"] * ep == routed * (4 + 4 + 8)
    with pytest.raises(ConfigError, match="legal ep: 1, 2, 4"):
        params_per_rank(TINY, ep=3)
    # tp: the router whole, the shared expert split, each rank's experts whole
    for tp in (1, 2):
        p = params_per_rank(TINY, tp, ep=2)
        kv = (tp - 1) * 2 * 4 * 8 * 3  # G=1 < tp: the K and V head (D h each) on both ranks, in 3 layers
        assert tp * (p["total"] - p["experts"]) == TINY.num_params() - routed + (tp - 1) * p["replicated"] + kv


def test_zero_shards_experts_over_their_replicas():
    """ep=2 on dp x tp = 4 x 2: experts have 4 copies (edp), the rest 4 (dp): ZeRO-1 keeps
    ceil((P - Pe)/4) + ceil(Pe/4) of the optimizer state; at ep=1, tp=1 one flat buffer."""
    P = params_per_rank(TINY, 2, ep=2)
    s = state_bytes(TINY, tp=2, dp=4, shard="zero1", ep=2)
    assert s["optimizer"] == (-(-(P["total"] - P["experts"]) // 4) + -(-P["experts"] // 4)) * 8
    assert s["experts"] == P["experts"] * (4 + 4) + -(-P["experts"] // 4) * 8
    flat = state_bytes(TINY, tp=1, dp=8, shard="zero3")
    assert flat["weights"] == -(-TINY.num_params() // 8) * 4


def test_params_per_rank_equal_the_parallel_model():
    """The local parameters ParallelTransformer declares (tp rank 0 of 2, ep rank 0; no process
    group needed to declare them)."""
    pytest.importorskip("torch")
    from meshattn.comm import Axis
    from meshattn.mesh import ExpertAxes
    from meshattn.parallel.transformer import ParallelTransformer

    for tp, ep in ((1, 1), (2, 2), (2, 4), (1, 4)):
        world = 4
        experts = ExpertAxes(Axis("ep", None, ep, 0), Axis("edp", None, world // ep, 0), Axis("world", None, world, 0))
        model = ParallelTransformer(TINY, Axis("tp", None, tp, 0), Axis("kv", None, min(tp, 1), 0),
                                    vocab_parallel=True, experts=experts)
        declared = sum(p.numel() for p in model.parameters())
        assert declared == params_per_rank(TINY, tp, ep=ep)["total"], (tp, ep)


# -- (c) what the dispatch moves ----------------------------------------------------------------

def test_all_to_all_bytes_per_step_equal_the_formula():
    """moe-tiny on dp2 x tp2 x ep4, micro-batch 2 of 256 tokens, 8 sequences: n = 2 * 256 / tp
    tokens per rank, each layer sends n k h values each way forward and backward (x4), plus the
    E int64 counts; the rows travel in the compute dtype (bf16 under meshattn's autocast)."""
    cfg = PRESETS["moe-tiny"]
    plan = parse_plan("dp2xtp2xep4", micro_batch=2)
    check_plan(plan, cfg, 256, 8, 4)
    n, k, h, E, L, item = 2 * 256 // 2, cfg.top_k, cfg.d_model, cfg.n_experts, 3, 4
    per_layer = 4 * n * k * h * 2 + E * 8
    micro = 8 // (2 * 2)
    est = estimate(cfg, Job(256, 8), plan, H100, MESHATTN)
    assert est.moe["ep_bytes_per_step"] == micro * L * per_layer
    vols = moe_comm(cfg, plan.parallel, 2, 256, item)
    assert vols["ep/all_to_all/fwd"].nbytes == L * (2 * n * k * h * item + E * 8)
    assert vols["ep/all_to_all/bwd"].nbytes == L * 2 * n * k * h * item
    assert vols["ep/all_to_all/fwd"].calls == 3 * L and vols["ep/all_to_all/bwd"].calls == 2 * L
    assert vols["world/all_reduce/fwd"].nbytes == L * (E + 1) * 8
    assert "edp/all_reduce/bwd" not in vols  # ep = world: one copy of each expert
    # the busiest rank at imbalance 1.5 moves 1.5x the rows (not the counts)
    busy = moe_comm(cfg, plan.parallel, 2, 256, item, imbalance=1.5)
    assert busy["ep/all_to_all/bwd"].nbytes == 1.5 * vols["ep/all_to_all/bwd"].nbytes


def test_gather_and_tensor_parallel_bytes():
    """The gather moves every rank's tokens (ep n h) however they route; without sequence
    parallelism the tp ranks split their tokens and all-gather the routed output (forward) and the
    input gradient (backward); the router's gradient is summed over tp."""
    cfg = PRESETS["moe-tiny"]
    par = ParallelConfig(dp=2, tp=2, ep=2, moe_dispatch="gather")
    n, k, h, ep, L, item = 2 * 64 // 2, 2, 128, 2, 3, 4
    v = moe_comm(cfg, par, 2, 64, item)
    assert v["ep/all_gather/fwd"].nbytes == L * (ep * 8 + ep * n * (h * item + k * 8 + k * item))
    assert v["ep/reduce_scatter/fwd"].nbytes == v["ep/all_gather/bwd"].nbytes == L * ep * n * h * item
    assert v["ep/reduce_scatter/bwd"].nbytes == L * ep * n * (h + k) * item
    # experts: ep=2 of a world of 4, two copies: gate, up and down summed over them in every backward
    assert v["edp/all_reduce/bwd"].calls == 3 * L and v["edp/all_reduce/bwd"].nbytes == 3 * L * 4 * 128 * 128 * 4
    tp = tensor_parallel_comm(cfg, par, 2, 64, 2, moe_itemsize=item)
    assert tp["tp/all_gather/fwd"].nbytes == tp["tp/all_gather/bwd"].nbytes == L * 2 * 64 * h * item
    dense_tp = tensor_parallel_comm(dataclasses.replace(cfg, n_experts=0), par, 2, 64, 2)
    # the MoE layers' MLP regions are their shared experts': the same entries and exits as the MLPs'
    assert tp["tp/all_reduce/fwd"].nbytes == dense_tp["tp/all_reduce/fwd"].nbytes
    assert tp["tp/all_reduce/bwd"].nbytes == dense_tp["tp/all_reduce/bwd"].nbytes + L * 8 * h * item
    no_shared = tensor_parallel_comm(dataclasses.replace(cfg, n_shared_experts=0), par, 2, 64, 2, moe_itemsize=item)
    assert no_shared["tp/all_reduce/fwd"].calls == tp["tp/all_reduce/fwd"].calls - L  # no MLP region to leave


def test_activation_bytes_equal_what_autograd_saves():
    """One MoE block of the parallel model at ep = tp = 1, in process: the bytes autograd saves
    (parameters and rotary tables excluded) equal the model's, float32 and autocast, with the
    all-to-all path (the gather dispatch takes it too at ep = 1: there is nothing to exchange)."""
    torch = pytest.importorskip("torch")
    import torch.distributed as dist

    from meshattn.bench.memory import SavedActivations
    from meshattn.comm import Axis
    from meshattn.mesh import ExpertAxes
    from meshattn.model.transformer import rotary_tables
    from meshattn.parallel.moe import ParallelMoE
    from meshattn.parallel.region import Region
    from meshattn.parallel.transformer import ParallelBlock

    B, S = 2, 16
    cfg = ModelConfig(d_model=32, n_heads=4, n_kv_heads=2, n_layers=2, d_ff=64, vocab_size=64, max_seq_len=S,
                      norm="rmsnorm", activation="swiglu", n_experts=4, top_k=2, expert_ffn=24, n_shared_experts=1,
                      dense_layers=1)
    rope = rotary_tables(torch.arange(S), cfg.head_dim, cfg.rope_theta, torch.float32)
    region = Region(Axis.single("tp"), False)
    own_group = not dist.is_initialized()
    if own_group:  # the gather path all-gathers even over one rank
        dist.init_process_group("gloo", store=dist.HashStore(), world_size=1, rank=0)
    try:
        group = dist.group.WORLD
        axes = ExpertAxes(*(Axis(name, group, 1, 0) for name in ("ep", "edp", "world")))
        for dispatch in ("all_to_all", "gather") if own_group else ("all_to_all",):
            torch.manual_seed(0)
            moe = ParallelMoE(cfg, "blocks.1.moe", region, axes, 1, dispatch)
            block = ParallelBlock(cfg, "blocks.1", region, Axis.single("kv"), moe=moe)
            with torch.no_grad():
                for p in block.parameters():
                    p.normal_(0, 0.3)
            for autocast in (False, True):
                x = torch.randn(B, S, cfg.d_model, requires_grad=True)  # the fp32 residual stream
                with SavedActivations([*block.parameters(), *rope]) as saved, \
                        torch.autocast("cpu", torch.bfloat16, enabled=autocast):
                    block(x, rope, stats=[])
                want = activation_bytes_per_layer(cfg, B, S, dtype_bytes=2 if autocast else 4, autocast=autocast,
                                                  ep=1, dispatch=dispatch)
                assert saved.nbytes == want["total"], (dispatch, autocast, saved.nbytes, want)
    finally:
        if own_group:
            dist.destroy_process_group()


# -- (d) dense plans unchanged --------------------------------------------------------------------

def test_dense_estimates_are_unchanged():
    """Recorded before the planner learnt MoE (commit aeff7b1): the same floats, to the bit."""
    e = estimate(PRESETS["llama-1b"], Job(4096, 16), parse_plan("dp2xtp4+sp@attention", shard="zero1", micro_batch=2),
                 H100, MESHATTN)
    assert e.step_time_s == 0.20601405358071634 and e.memory_bytes["total"] == 8833187840.0
    assert e.time_s["tp"] == 0.04030901623478035 and e.time_s["dp"] == 0.0017200904888888889
    assert not e.moe and "ep" not in e.time_s and "moe" not in e.to_dict()
    e = estimate(PRESETS["gpt2-small"], Job(1024, 64), parse_plan("dp8", micro_batch=8), GpuCluster(gpu("a100-80gb")),
                 MESHATTN)
    assert e.step_time_s == 0.04972501708627498 and e.memory_bytes["total"] == 6572032000.0
    assert len(enumerate_plans(PRESETS["llama-1b"], 8192, 16, 8)) == 900  # no ep variants for a dense model


# -- the time model and the imbalance -----------------------------------------------------------

def test_ep_time_by_hand_inside_a_node():
    """dp8 x ep8 (one node): per micro-batch and MoE layer the counts and four row all-to-alls of
    the busiest rank (x1.25 the rows) and the counts' all-reduce over the world, no overlap."""
    job, plan = Job(4096, 16), parse_plan("dp8xep8", micro_batch=1)
    e = estimate(DEEPSEEK, job, plan, H100, MESHATTN)
    n, k, h, E, L = 4096, 6, 2048, 64, 26
    rows = 1.25 * n * k * h * 2  # bf16 rows
    layer = (H100.collective_s("all_to_all", 8, E * 8, False) + 4 * H100.collective_s("all_to_all", 8, rows, False)
             + H100.collective_s("all_reduce", 8, (E + 1) * 8, False))
    assert e.time_s["ep"] == pytest.approx(2 * L * layer)  # 2 micro-batches
    assert e.moe["expert_imbalance"] == EXPERT_IMBALANCE == 1.25 and e.moe["expert_rows_per_rank"] == 1.25 * n * k


def test_imbalance_slows_the_experts_only_where_experts_are_split():
    plan8, plan1 = parse_plan("dp16xep8@block", micro_batch=2), parse_plan("dp16@block", micro_batch=2, shard="zero3")
    for plan in (plan8, plan1):
        even, skewed = (estimate(DEEPSEEK, Job(4096, 64, expert_imbalance=x), plan, H100, MESHATTN) for x in (1, 2))
        if plan.parallel.ep == 1:  # every rank computes its own rows: nothing to wait for
            assert skewed.step_time_s == even.step_time_s
        else:
            assert skewed.time_s["experts"] == pytest.approx(2 * even.time_s["experts"])
            assert skewed.time_s["ep"] > 1.7 * even.time_s["ep"]  # (the counts and latencies do not grow)
            assert skewed.memory_bytes["buffers"] > even.memory_bytes["buffers"]  # the recomputed layer's rows
    capped = dataclasses.replace(DEEPSEEK, capacity_factor=1.1)  # no expert keeps more than 1.1x its share
    e = estimate(capped, Job(4096, 64, expert_imbalance=2), plan8, H100, MESHATTN)
    assert e.moe["imbalance_applied"] == 1.1
    with pytest.raises(ConfigError, match="must be a number >= 1"):
        Job(4096, 64, expert_imbalance=0.5)


# -- (e) the search, the grammar and the command line -------------------------------------------

def test_search_at_16_h100s_chooses_expert_parallelism():
    """DeepSeek-V2-Lite (15.8B parameters, 64 experts): replicated experts (ep=1) need the
    optimizer state of all 15.8B on every GPU and do not fit without ZeRO-3; the first choice splits
    the experts. (A smaller space than the command line's: the test's time.)"""
    job = Job(4096, 64)
    r = search(DEEPSEEK, job, H100, MESHATTN, 16, shards=("none", "zero1"), micro_batches=[2],
               recompute=("none", "full"))
    best = r.best
    assert best.fits and best.plan.parallel.ep > 1 and best.moe["ep"] == best.plan.parallel.ep
    assert all(e.plan.parallel.ep > 1 for e in r.ranked)
    assert not estimate(DEEPSEEK, job, parse_plan("dp16@block"), H100, MESHATTN).fits
    zero3 = parse_plan("dp16@block", shard="zero3")
    assert not estimate(DEEPSEEK, job, zero3, H100, MESHATTN).fits  # meshattn's --shard dp leaves experts whole
    assert estimate(DEEPSEEK, job, zero3, H100, MESHATTN.replace(zero_experts=True)).fits  # ZeRO-3 of all: fits
    eps = {(p.parallel.ep, p.parallel.moe_dispatch) for p in enumerate_plans(DEEPSEEK, 4096, 64, 16)}
    assert eps == {(1, "all_to_all")} | {(e, d) for e in (2, 4, 8, 16) for d in ("all_to_all", "gather")}


def test_plan_names_round_trip():
    p = parse_plan("dp2xtp2xep4:gather@block")
    assert (p.parallel.ep, p.parallel.moe_dispatch, p.recompute) == (4, "gather", "full")
    assert p.name == "dp2xtp2xep4:gather@block" and parse_plan(p.name) == p
    assert parse_plan("dp4xep4").name == "dp4xep4" and parse_plan("dp4xep4").to_dict()["ep"] == 4
    assert Plan(ParallelConfig(dp=4)).to_dict()["moe_dispatch"] is None
    with pytest.raises(ConfigError, match="n_experts=64 is not divisible by ep=3"):
        check_plan(parse_plan("dp6xep3"), DEEPSEEK, 4096, 6, 6)
    with pytest.raises(ConfigError, match="dense"):
        check_plan(parse_plan("dp2xep2"), PRESETS["tiny"], 256, 2, 2)
    assert moe_layers(DEEPSEEK) == DEEPSEEK.n_moe_layers == 26


def test_plan_command_for_an_moe_layout(capsys):
    args = ["plan", "--preset", "deepseek-v2-lite", "--gpus", "16", "--seq-len", "4096", "--global-batch", "64",
            "--layout", "dp8xtp2+spxep8", "--micro-batch", "2", "--shard", "zero1", "--no-plots"]
    assert main([*args, "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["plan"]["ep"] == 8 and d["plan"]["moe_dispatch"] == "all_to_all" and d["fits"]
    assert d["moe"]["expert_imbalance"] == EXPERT_IMBALANCE and d["moe"]["experts_per_rank"] == 8
    assert d["time_s"]["ep"] > 0 and d["time_s"]["step"] == pytest.approx(sum(
        d["time_s"][k] for k in ("compute", "tp", "cp", "ep", "pipeline", "dp", "optimizer")))
    assert main(args) == 0
    text = capsys.readouterr().out
    assert " ep " in text.splitlines()[1] and "1.25x the mean" in text
    a = build_parser().parse_args([*args, "--json"])
    a.expert_imbalance = 1.5  # (the flag as options.py defines it)
    assert plan_command(a) == 0
    assert json.loads(capsys.readouterr().out)["moe"]["expert_imbalance"] == 1.5
    a.expert_imbalance = 0.9
    with pytest.raises(ConfigError, match=">= 1"):
        plan_command(a)
