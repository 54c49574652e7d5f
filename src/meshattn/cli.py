"""The `meshattn` command. The only module that reads argv and the environment."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

from .config import DTYPE_NAMES, PRESETS, VOCAB_PARALLEL, ConfigError, ParallelConfig, TrainConfig, preset


def _train_parser(sub) -> None:
    p = sub.add_parser("train", help="train a small causal LM on the chosen dp x tp layout",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d = TrainConfig()
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="model preset")
    p.add_argument("--dp", type=int, default=1, help="data-parallel replicas")
    p.add_argument("--tp", type=int, default=2, help="tensor-parallel ranks per replica")
    p.add_argument("--cp", type=int, default=1, help="context-parallel ranks (the sequence split across them)")
    p.add_argument("--cp-impl", default="ring", choices=["allgather", "ring", "ulysses", "hybrid"],
                   help="how attention crosses the sequence split")
    p.add_argument("--cp-layout", default="zigzag", choices=["contiguous", "zigzag"],
                   help="which sequence chunks each cp rank holds (zigzag balances causal work)")
    p.add_argument("--ulysses-size", type=int, default=None, help="Ulysses group size for --cp-impl hybrid")
    p.add_argument("--sp", action="store_true", help="Megatron sequence parallelism for norms/residuals")
    p.add_argument("--vocab-parallel", default="auto", choices=list(VOCAB_PARALLEL),
                   help="split the embedding and LM head over tp (on), keep them whole on every tp rank (off), or "
                        "keep them whole only for a vocabulary of at most 4 x d_model (auto)")
    p.add_argument("--node-size", type=int, default=None,
                   help="ranks per node: gradients are reduce-scattered inside a node, all-reduced across nodes")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="global sequences per step")
    p.add_argument("--seq-len", type=int, default=d.seq_len)
    p.add_argument("--grad-accum", type=int, default=d.grad_accum, help="micro-batches per step")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--dtype", default=d.dtype, choices=list(DTYPE_NAMES),
                   help="bfloat16/float16: autocast with fp32 weights, fp32 softmax statistics and loss; float16 "
                        "adds dynamic loss scaling")
    p.add_argument("--on-nonfinite", default=d.nonfinite, choices=["stop", "skip"],
                   help="a NaN/Inf loss or gradient norm (seen by every rank before the optimizer step): stop the "
                        "run, or skip the step")
    p.add_argument("--checkpoint", default="none", choices=["none", "attention", "block"],
                   help="activation checkpointing: recompute the attention core or whole blocks in backward")
    p.add_argument("--data", default=None, help="text file or folder (default: Python's standard library)")
    p.add_argument("--out", default=d.out, help="folder for the checkpoint and metrics")
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
                   help="e.g. single native-tp2 tp2 tp2+sp dp2 cp2:ring cp2:ulysses dp2xtp2 cp4:hybrid2 "
                        "(default: every valid layout of --world ranks, plus the two peers)")
    p.add_argument("--seq-len", type=int, nargs="+", default=[256], help="one or more (several: a scaling plot)")
    p.add_argument("--steps", type=int, default=5, help="timed forward+backward steps per layout")
    _job_flags(p)
    p.add_argument("--rounds", type=int, default=1,
                   help="run the whole list this many times, alternating; report medians (the machine's load drifts)")
    p.add_argument("--out", default="runs/bench", help="folder for bench.json and the PNG plots")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--no-progress", action="store_true")


def _model_flags(p) -> None:
    p.add_argument("--preset", default="small", choices=sorted(PRESETS), help="model preset; sizes below override it")
    for flag in ("d-model", "n-heads", "n-kv-heads", "n-layers", "d-ff"):
        p.add_argument(f"--{flag}", type=int, default=None)


def _job_flags(p) -> None:
    """What bench and profile share besides the model: batch, warm-up, precision, data, transport."""
    p.add_argument("--batch-size", type=int, default=2, help="global sequences per step")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--dtype", default="float32", choices=list(DTYPE_NAMES))
    p.add_argument("--data", default=None, help="text file or folder (default: Python's standard library)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds before a stuck collective fails")
    p.add_argument("--backend", default=None, choices=["gloo", "nccl"])


def _profile_parser(sub) -> None:
    p = sub.add_parser("profile", help="one layout under torch.profiler on every rank: traces and the compute / "
                                       "communication split per rank", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--layout", default="tp2", help="a layout name as for bench, e.g. tp2, dp2xtp2, cp2:ring, native-tp2")
    _model_flags(p)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=3, help="profiled forward+backward steps")
    _job_flags(p)
    p.add_argument("--no-overlap", action="store_true",
                   help="complete ring transfers and TP input-gradient all-reduces at once (to see what overlap hides)")
    p.add_argument("--out", default="runs/profile", help="folder for the per-rank traces and profile.json")


def run_profile_command(a: argparse.Namespace) -> int:
    import json

    from .bench import parse_layout
    from .bench.layouts import check_layout, layout_to_dict
    from .bench.worker import profile_layout
    from .launch import WorkerFailed, launch

    a.seq_len = [a.seq_len]
    model = _bench_model(a)
    layout = parse_layout(a.layout)
    if a.no_overlap:
        layout = dataclasses.replace(layout, parallel=dataclasses.replace(layout.parallel, overlap=False))
    cfg = dataclasses.replace(check_layout(layout, model, a.batch_size, a.seq_len[0]), dtype=a.dtype, data=a.data)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"meshattn profile: {layout.name}{'' if layout.parallel.overlap else ' (no overlap)'} on {layout.world} "
          f"ranks, {a.warmup} warm-up + {a.steps} profiled fwd+bwd steps of {a.batch_size}x{a.seq_len[0]} tokens",
          flush=True)
    try:
        launch(profile_layout, layout.world, args=(layout_to_dict(layout), cfg.to_dict(), a.warmup, a.steps, str(out)),
               env={}, backend=a.backend, timeout_s=a.timeout)
    except WorkerFailed as e:
        print(f"meshattn: error: {e}", file=sys.stderr)
        return 1
    s = json.loads((out / "profile.json").read_text())
    print("rank  step ms  compute ms  comm ms  hidden  exposed comm ms  other ms  load")
    for r, load in zip(s["ranks"], s["relative_load"]):
        print(f"{r['rank']:>4}  {r['step_s'] * 1e3:7.1f}  {r['compute_s'] * 1e3:10.1f}  {r['comm_s'] * 1e3:7.1f}  "
              f"{r['hidden_share']:6.0%}  {r['exposed_comm_s'] * 1e3:15.1f}  {r['other_s'] * 1e3:8.1f}  {load:4.2f}")
    print(f"load imbalance (max-min)/mean {s['load_imbalance']:.3f}, parallel efficiency min/max {s['efficiency']:.3f}, "
          f"slowest rank {s['slowest_rank']}")
    print(f"wrote {out / 'profile.json'} and {layout.world} traces {out / 'trace_rank*.json'} "
          "(open in https://ui.perfetto.dev or chrome://tracing)", flush=True)
    return 0


def _bench_model(a: argparse.Namespace):
    sizes = {"d_model": a.d_model, "n_heads": a.n_heads, "n_kv_heads": a.n_kv_heads, "n_layers": a.n_layers,
             "d_ff": a.d_ff}
    overrides = {k: v for k, v in sizes.items() if v is not None}
    if "n_heads" in overrides and "n_kv_heads" not in overrides:
        overrides["n_kv_heads"] = overrides["n_heads"]  # --n-heads alone means plain multi-head attention
    base = preset(a.preset)
    return preset(a.preset, max_seq_len=max(base.max_seq_len, *a.seq_len), **overrides)


def run_bench_command(a: argparse.Namespace) -> int:
    from .bench import default_layouts, parse_layout, run_bench
    from .bench.layouts import check_layout
    from .bench.report import native_ratios, plot, table, write_json
    from .launch import WorkerFailed, under_torchrun

    if under_torchrun(os.environ):
        raise ConfigError("meshattn bench starts fresh worker processes for every layout; run it directly, "
                          "not under torchrun")
    model = _bench_model(a)
    if a.layouts:
        layouts = [parse_layout(n) for n in a.layouts]
        for layout in layouts:
            for s in a.seq_len:
                check_layout(layout, model, a.batch_size, s)
    else:
        layouts = default_layouts(a.world, model, a.batch_size, max(a.seq_len))
    print(f"meshattn bench: d_model={model.d_model} heads={model.n_heads}/{model.n_kv_heads} layers={model.n_layers} "
          f"d_ff={model.d_ff}, batch {a.batch_size}, {a.dtype}, {a.warmup} warm-up + {a.steps} timed fwd+bwd steps; "
          f"{len(layouts)} layouts x {len(a.seq_len)} sequence lengths", flush=True)
    try:
        results = run_bench(model, layouts, a.seq_len, a.batch_size, a.warmup, a.steps, a.dtype, a.backend,
                            a.timeout, progress=not a.no_progress, data=a.data, rounds=a.rounds)
    except WorkerFailed as e:
        print(f"meshattn: error: {e}", file=sys.stderr)
        return 1
    print(table(results))
    for line in native_ratios(results):
        print(line)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"command": "meshattn bench " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["bench"] else None,
            "model": dataclasses.asdict(model), "cpu_count": os.cpu_count(), "torch": torch_version()}
    write_json(results, meta, out / "bench.json")
    written = [] if a.no_plots else plot(results, out, f"d_model {model.d_model}, batch {a.batch_size}")
    print(f"wrote {out / 'bench.json'}" + "".join(f", {p}" for p in written), flush=True)
    return 0


def torch_version() -> str:
    import torch

    return torch.__version__


def config_from_args(a: argparse.Namespace) -> TrainConfig:
    parallel = ParallelConfig(dp=a.dp, tp=a.tp, cp=a.cp, sequence_parallel=a.sp, cp_impl=a.cp_impl,
                              cp_layout=a.cp_layout, ulysses_size=a.ulysses_size, node_size=a.node_size,
                              vocab_parallel=a.vocab_parallel)
    return TrainConfig(model=preset(a.preset), parallel=parallel,
                       steps=a.steps, batch_size=a.batch_size, seq_len=a.seq_len, grad_accum=a.grad_accum,
                       lr=a.lr, min_lr=a.lr / 10, seed=a.seed, dtype=a.dtype, checkpoint=a.checkpoint,
                       nonfinite=a.on_nonfinite, save_every=a.save_every, resume=a.resume,
                       data=a.data, out=a.out,
                       sample_tokens=a.sample_tokens)


def _layout_name(par: ParallelConfig) -> str:
    cp = ""
    if par.cp > 1:
        impl = par.cp_impl + (f"(ulysses {par.ulysses_size})" if par.cp_impl == "hybrid" else "")
        cp = f" cp={par.cp} {impl} {par.cp_layout}"
    return f"dp={par.dp}{cp} tp={par.tp}{' +sp' if par.sequence_parallel else ''}"


def run_training(cfg_dict: dict, progress: bool) -> None:
    """Body of every rank (module level so spawned workers can import it)."""
    import torch.distributed as dist

    from .mesh import build_mesh, device_type
    from .train import train

    cfg = TrainConfig.from_dict(cfg_dict)
    mesh = build_mesh(cfg.parallel, device_type(dist.get_backend()))
    result = train(cfg, mesh, progress=progress)
    if dist.get_rank() == 0:
        first, last = result.losses[0], result.losses[-1]
        print(f"loss {first:.3f} -> {last:.3f} over {len(result.losses)} steps; "
              f"validation loss {result.val_loss:.3f}; {result.tokens_per_s:,.0f} tokens/s; "
              f"median step {sorted(result.step_times)[len(result.step_times) // 2] * 1e3:.0f} ms", flush=True)
        if result.sample:
            print("sample:\n" + "-" * 60 + f"\ndef {result.sample}\n" + "-" * 60, flush=True)
        print(f"checkpoint: {result.checkpoint}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="meshattn", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    _bench_parser(sub)
    _profile_parser(sub)
    a = parser.parse_args(argv)
    try:
        if a.command == "bench":
            return run_bench_command(a)
        if a.command == "profile":
            return run_profile_command(a)
        return run_train_command(a)
    except ConfigError as e:
        print(f"meshattn: error: {e}", file=sys.stderr)
        return 2


def run_train_command(a: argparse.Namespace) -> int:
    from .launch import WorkerFailed, launch

    cfg = config_from_args(a)
    if os.environ.get("RANK", "0") == "0":
        print(f"meshattn train: preset={a.preset} ({cfg.model.num_params() / 1e6:.2f}M params), "
              f"{_layout_name(cfg.parallel)}, "
              f"{cfg.steps} steps of {cfg.batch_size}x{cfg.seq_len} tokens", flush=True)
    try:
        launch(run_training, cfg.parallel.world_size, args=(cfg.to_dict(), not a.no_progress), env=dict(os.environ),
               backend=a.backend, timeout_s=a.timeout)
    except (WorkerFailed, ConfigError) as e:
        print(f"meshattn: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
