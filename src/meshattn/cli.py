"""The `meshattn` command. The only module that reads argv and the environment."""

from __future__ import annotations

import argparse
import os
import sys

from .config import PRESETS, ConfigError, ParallelConfig, TrainConfig, preset


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
    p.add_argument("--node-size", type=int, default=None,
                   help="ranks per node: gradients are reduce-scattered inside a node, all-reduced across nodes")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="global sequences per step")
    p.add_argument("--seq-len", type=int, default=d.seq_len)
    p.add_argument("--grad-accum", type=int, default=d.grad_accum, help="micro-batches per step")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--dtype", default=d.dtype, choices=["float32", "float64", "bfloat16"],
                   help="bfloat16: autocast with fp32 weights, fp32 softmax statistics and loss")
    p.add_argument("--checkpoint", default="none", choices=["none", "attention", "block"],
                   help="activation checkpointing: recompute the attention core or whole blocks in backward")
    p.add_argument("--data", default=None, help="text file or folder (default: Python's standard library)")
    p.add_argument("--out", default=d.out, help="folder for the checkpoint and metrics")
    p.add_argument("--sample-tokens", type=int, default=d.sample_tokens)
    p.add_argument("--timeout", type=float, default=300.0, help="seconds before a stuck collective fails")
    p.add_argument("--backend", default=None, choices=["gloo", "nccl"], help="default: nccl on GPU, else gloo")
    p.add_argument("--no-progress", action="store_true")


def config_from_args(a: argparse.Namespace) -> TrainConfig:
    parallel = ParallelConfig(dp=a.dp, tp=a.tp, cp=a.cp, sequence_parallel=a.sp, cp_impl=a.cp_impl,
                              cp_layout=a.cp_layout, ulysses_size=a.ulysses_size, node_size=a.node_size)
    return TrainConfig(model=preset(a.preset), parallel=parallel,
                       steps=a.steps, batch_size=a.batch_size, seq_len=a.seq_len, grad_accum=a.grad_accum,
                       lr=a.lr, min_lr=a.lr / 10, seed=a.seed, dtype=a.dtype, checkpoint=a.checkpoint,
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
    a = parser.parse_args(argv)
    from .launch import WorkerFailed, launch

    try:
        cfg = config_from_args(a)
    except ConfigError as e:
        print(f"meshattn: error: {e}", file=sys.stderr)
        return 2
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
