"""The command line's options: one parser per command, and the configurations built from them.

Every choice list reads its option's one definition in `config` (CpImpl, CpLayout, DType, ...).
"""

from __future__ import annotations

import argparse
import dataclasses

from .. import hf
from ..config import (CpImpl, CpLayout, DType, ModelConfig, MoeDispatch, OnNonfinite, ParallelConfig, PRESETS,
                      Recompute, ShardMode, TrainConfig, VocabParallel, preset)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meshattn", description="multi-head self-attention and transformer "
                                     "layers in parallel over a DeviceMesh, checked against one device")
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    _bench_parser(sub)
    _profile_parser(sub)
    _plan_parser(sub)
    from .generate import generate_parser  # the command's own module holds its flags

    generate_parser(sub)
    return parser


def _train_parser(sub) -> None:
    p = sub.add_parser("train", help="train a small causal LM on the chosen dp x tp layout",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d = TrainConfig()
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="model preset (ignored with --init-from)")
    p.add_argument("--init-from", default=None, metavar="FOLDER",
                   help="fine-tune a Hugging Face model folder (Llama, Mistral, Qwen2, Mixtral: config.json, "
                        "safetensors, tokenizer.json): the model is the folder's, not --preset's, each rank reads "
                        "only its slices of the weights, the text is tokenised with the folder's tokenizer, and the "
                        "final checkpoint is also written as a Hugging Face folder OUT/hf. With --resume the "
                        "weights come from the checkpoint")
    p.add_argument("--dp", type=int, default=1, help="data-parallel replicas")
    p.add_argument("--tp", type=int, default=2, help="tensor-parallel ranks per replica")
    p.add_argument("--cp", type=int, default=1, help="context-parallel ranks (the sequence split across them)")
    p.add_argument("--cp-impl", default="ring", choices=CpImpl.names(),
                   help="how attention crosses the sequence split")
    p.add_argument("--cp-layout", default="zigzag", choices=CpLayout.names(),
                   help="which sequence chunks each cp rank holds (zigzag balances causal work)")
    p.add_argument("--ulysses-size", type=int, default=None, help="Ulysses group size for --cp-impl hybrid")
    p.add_argument("--sp", action="store_true", help="Megatron sequence parallelism for norms/residuals")
    p.add_argument("--vocab-parallel", default="auto", choices=VocabParallel.names(),
                   help="split the embedding and LM head over tp (on), keep them whole on every tp rank (off), or "
                        "keep them whole only for a vocabulary of at most 4 x d_model (auto)")
    p.add_argument("--node-size", type=int, default=None,
                   help="ranks per node: gradients are reduce-scattered inside a node, all-reduced across nodes")
    p.add_argument("--ep", type=int, default=1,
                   help="expert parallelism for an MoE preset (e.g. moe-tiny): the experts split over ep of the "
                        "dp*cp*tp ranks (it adds no ranks)")
    p.add_argument("--moe-dispatch", default="all_to_all", choices=MoeDispatch.names(),
                   help="how tokens reach their experts: all-to-all, or all-gather then reduce-scatter")
    p.add_argument("--shard", default="none", choices=ShardMode.names(),
                   help="dp: shard parameters, gradients and AdamW state over the dp x cp ranks with FSDP2 (each rank "
                        "keeps 1/(dp*cp) of its tp shard's; weights are all-gathered per block, gradients "
                        "reduce-scattered). none: replicate them and average gradients with DDP (less traffic, "
                        "the default while the model fits)")
    p.add_argument("--capacity-factor", type=float, default=None,
                   help="each expert takes at most ceil(c * tokens * top_k / experts) tokens of its ep group, "
                        "dropping the lowest router probabilities (default: the preset's; dropless)")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="global sequences per step")
    p.add_argument("--seq-len", type=int, default=d.seq_len)
    p.add_argument("--grad-accum", type=int, default=d.grad_accum, help="micro-batches per step")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--dtype", default=d.dtype, choices=DType.names(),
                   help="bfloat16/float16: autocast with fp32 weights, fp32 softmax statistics and loss; float16 "
                        "adds dynamic loss scaling")
    p.add_argument("--on-nonfinite", default=d.nonfinite, choices=OnNonfinite.names(),
                   help="a NaN/Inf loss or gradient norm (seen by every rank before the optimizer step): stop the "
                        "run, or skip the step")
    p.add_argument("--checkpoint", default="none", choices=Recompute.names(),
                   help="activation checkpointing: recompute the attention core or whole blocks in backward")
    p.add_argument("--data", default=None, help="text file or folder (default: Python's standard library)")
    p.add_argument("--pack-documents", action="store_true",
                   help="train on the files as packed documents: attention stops at file boundaries, positions "
                        "restart, no token predicts across a boundary (pair with --cp-layout balanced)")
    p.add_argument("--window", type=int, default=None,
                   help="sliding-window attention: each token sees the last N tokens (default: all earlier ones)")
    p.add_argument("--out", default=d.out, help="folder for the checkpoint and metrics")
    _verbose_flag(p)
    p.add_argument("--sample-tokens", type=int, default=d.sample_tokens)
    p.add_argument("--save-every", type=int, default=d.save_every,
                   help="write a checkpoint every N steps under OUT/checkpoint (0: only at the end)")
    p.add_argument("--resume", default=None, metavar="DIR",
                   help="continue from a checkpoint (OUT/checkpoint, or one step-* folder), at any layout")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds before a stuck collective fails")
    p.add_argument("--backend", default=None, choices=["gloo", "nccl"], help="default: nccl on GPU, else gloo")
    p.add_argument("--no-progress", action="store_true")


def _bench_parser(sub) -> None:
    p = sub.add_parser("bench", help="time and memory of parallel layouts side by side, with the single process "
                                     "and PyTorch-native tensor parallelism as peers",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _model_flags(p)
    p.add_argument("--world", type=int, default=2, help="ranks for the default layout list")
    p.add_argument("--layouts", nargs="+", default=None,
                   help="e.g. single native-tp2 tp2 tp2+sp dp2 cp2:ring cp2:ulysses dp2xtp2 cp4:hybrid2, or for an "
                        "MoE --preset dp4xep4 dp4xep4:gather dp2xtp2xep4 (default: every valid layout of --world "
                        "ranks, plus the two peers; for an MoE model the ep variants too and no native peer)")
    p.add_argument("--seq-len", type=int, nargs="+", default=[256], help="one or more (several: a scaling plot)")
    p.add_argument("--steps", type=int, default=5, help="timed forward+backward steps per layout")
    _job_flags(p)
    p.add_argument("--rounds", type=int, default=1,
                   help="run the whole list this many times, alternating; report medians (the machine's load drifts)")
    p.add_argument("--out", default="runs/bench", help="folder for bench.json and the PNG plots")
    _verbose_flag(p)
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--no-progress", action="store_true")


def _verbose_flag(p) -> None:
    p.add_argument("--verbose", action="store_true", help="on a failure inside the workers, also print every failed "
                   "rank's full traceback (always written to the log file the error line names)")


def _model_flags(p) -> None:
    p.add_argument("--preset", default="small", choices=sorted(PRESETS), help="model preset; sizes below override it")
    for flag in ("d-model", "n-heads", "n-kv-heads", "n-layers", "d-ff"):
        p.add_argument(f"--{flag}", type=int, default=None)


def _job_flags(p) -> None:
    """What bench and profile share besides the model: batch, warm-up, precision, data, transport."""
    p.add_argument("--batch-size", type=int, default=2, help="global sequences per step")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--dtype", default="float32", choices=DType.names())
    p.add_argument("--data", default=None, help="text file or folder (default: Python's standard library)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds before a stuck collective fails")
    p.add_argument("--backend", default=None, choices=["gloo", "nccl"])


def _profile_parser(sub) -> None:
    p = sub.add_parser("profile", help="one layout under torch.profiler on every rank: traces and the compute / "
                                       "communication split per rank (and, for an MoE model, the experts' load "
                                       "and the dispatch/combine time)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--layout", default="tp2", help="a layout name as for bench, e.g. tp2, dp2xtp2, cp2:ring, "
                                                   "native-tp2, dp4xep4 (with an MoE --preset such as moe-tiny)")
    _model_flags(p)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=3, help="profiled forward+backward steps")
    _job_flags(p)
    p.add_argument("--no-overlap", action="store_true",
                   help="complete ring transfers and TP input-gradient all-reduces at once (to see what overlap hides)")
    p.add_argument("--out", default="runs/profile", help="folder for the per-rank traces, profile.json and, for a "
                                                         "mixture of experts, profile_moe.png")
    _verbose_flag(p)
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--no-progress", action="store_true", help="accepted like train's and bench's (profile shows "
                                                              "no progress bar)")


def _plan_parser(sub) -> None:
    from ..planner.hardware import GPUS
    from ..planner.layout import RECOMPUTE_NAMES, SHARDS
    from ..planner.moe import EXPERT_IMBALANCE

    p = sub.add_parser("plan", help="choose the dp x cp x tp layout for a model and a cluster: predicted step "
                                    "time and memory per GPU, ranked",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    m = p.add_argument_group("model (one of --preset, --model, or the sizes)")
    m.add_argument("--preset", default=None, choices=sorted(PRESETS), help="a model preset")
    m.add_argument("--model", default=None, metavar="FILE",
                   help="a meshattn ModelConfig JSON or a Hugging Face config.json (llama, mistral, qwen2)")
    for flag, what in (("hidden-size", "d_model"), ("layers", "transformer blocks"), ("heads", "query heads"),
                       ("kv-heads", "KV heads (default: --heads)"),
                       ("ffn-size", "MLP width (default: Llama's 8/3 h)"),
                       ("vocab-size", "vocabulary (default 32000)")):
        m.add_argument(f"--{flag}", type=int, default=None, help=what)
    j = p.add_argument_group("job")
    j.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: the model's maximum)")
    j.add_argument("--global-batch", type=int, default=None, help="sequences per optimizer step (default: GPUs)")
    j.add_argument("--micro-batch", type=int, default=None, help="sequences per micro-batch per data-parallel "
                                                                "replica (default: searched)")
    j.add_argument("--dtype", default=None, choices=["bfloat16", "float32"],
                   help="training precision (default: bfloat16 autocast on GPUs, float32 on --gpu this)")
    c = p.add_argument_group("cluster")
    c.add_argument("--gpu", default="h100", choices=[*GPUS, "this"],
                   help="GPU preset in 8-GPU nodes; 'this': this machine's CPU processes, from --calibrate")
    c.add_argument("--gpus", type=int, default=8, help="GPUs (for --gpu this: local processes)")
    c.add_argument("--calibrate", action="store_true",
                   help="measure this machine (compute, memory bandwidth, gloo collectives) and save it for "
                        "--gpu this")
    c.add_argument("--calibration", default=None, metavar="FILE",
                   help="where --calibrate saves and --gpu this reads (default: $MESHATTN_CALIBRATION or "
                        "~/.cache/meshattn/calibration.json)")
    L = p.add_argument_group("layout (default: searched)")
    L.add_argument("--layout", default=None, help="evaluate this one layout: the bench grammar plus ppN, e.g. "
                                                  "dp4xtp8xpp4, dp2xcp4:ring, cp4:hybrid2, tp8+sp@attention, "
                                                  "dp4xep4 (MoE: ep<N>[:gather])")
    L.add_argument("--recompute", default=None, choices=RECOMPUTE_NAMES,
                   help="activation checkpointing: selective = the attention core, full = whole blocks "
                        "(default: searched; none with --layout)")
    L.add_argument("--sequence-parallel", action="store_true", help="Megatron sequence parallelism (tp > 1)")
    L.add_argument("--shard", default=None, choices=SHARDS,
                   help="shard optimizer state (zero1, modelled only) or everything (zero3: what meshattn train "
                        "--shard dp runs, the experts of an MoE model left whole) over dp x cp (default: searched)")
    L.add_argument("--pipeline", action="store_true", help="search pipeline stages too (modelled analytically; "
                                                           "meshattn itself does not run pipelines)")
    L.add_argument("--expert-imbalance", type=float, default=None, metavar="X",
                   help="MoE models: the busiest expert-parallel rank's routed rows over the mean, applied to its "
                        "expert compute, dispatch volume and activations (1 = balanced; default "
                        f"{EXPERT_IMBALANCE}, see planner/moe.py)")
    o = p.add_argument_group("output")
    o.add_argument("--memory", action="store_true", help="the memory budget of one layout: its breakdown, the "
                                                         "largest micro-batch and the longest sequence that fit")
    o.add_argument("--top", type=int, default=5, help="candidates to print")
    o.add_argument("--json", action="store_true", help="print JSON instead of the table")
    o.add_argument("--out", default="runs/plan", help="folder for plan.png")
    o.add_argument("--no-plots", action="store_true")


def bench_model(a: argparse.Namespace, seq_lens: list[int]) -> ModelConfig:
    """The preset with bench/profile's size flags applied, long enough for every sequence length."""
    sizes = {"d_model": a.d_model, "n_heads": a.n_heads, "n_kv_heads": a.n_kv_heads, "n_layers": a.n_layers,
             "d_ff": a.d_ff}
    overrides = {k: v for k, v in sizes.items() if v is not None}
    if "n_heads" in overrides and "n_kv_heads" not in overrides:
        overrides["n_kv_heads"] = overrides["n_heads"]  # --n-heads alone means plain multi-head attention
    base = preset(a.preset)
    return preset(a.preset, max_seq_len=max(base.max_seq_len, *seq_lens), **overrides)


def config_from_args(a: argparse.Namespace) -> TrainConfig:
    parallel = ParallelConfig(dp=a.dp, tp=a.tp, cp=a.cp, sequence_parallel=a.sp, cp_impl=a.cp_impl,
                              cp_layout=a.cp_layout, ulysses_size=a.ulysses_size, node_size=a.node_size,
                              vocab_parallel=a.vocab_parallel, ep=a.ep, moe_dispatch=a.moe_dispatch,
                              shard=a.shard)
    model = preset(a.preset) if a.init_from is None else hf.read_config(a.init_from)
    if a.window is not None:
        model = dataclasses.replace(model, window=a.window)
    if a.capacity_factor is not None:
        model = dataclasses.replace(model, capacity_factor=a.capacity_factor)
    return TrainConfig(model=model, parallel=parallel,
                       steps=a.steps, batch_size=a.batch_size, seq_len=a.seq_len, grad_accum=a.grad_accum,
                       lr=a.lr, min_lr=a.lr / 10, seed=a.seed, dtype=a.dtype, checkpoint=a.checkpoint,
                       nonfinite=a.on_nonfinite, save_every=a.save_every, resume=a.resume,
                       init_from=a.init_from, data=a.data, pack_documents=a.pack_documents, out=a.out,
                       sample_tokens=a.sample_tokens)


def layout_name(par: ParallelConfig) -> str:
    cp = ""
    if par.cp > 1:
        impl = par.cp_impl + (f"(ulysses {par.ulysses_size})" if par.cp_impl == "hybrid" else "")
        cp = f" cp={par.cp} {impl} {par.cp_layout}"
    ep = "" if par.ep == 1 else f" ep={par.ep}" + ("" if par.moe_dispatch == "all_to_all" else f" ({par.moe_dispatch})")
    shard = " (sharded over dp x cp)" if par.shard == "dp" else ""
    return f"dp={par.dp}{cp} tp={par.tp}{' +sp' if par.sequence_parallel else ''}{ep}{shard}"
