"""`meshattn plan`: check the flags, build the model, job and cluster, search or evaluate, report.

Every bad input is refused here with one line (ConfigError -> `meshattn: error: ...`, status 2).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from ..config import ConfigError, ModelConfig
from ..planner.cluster import GpuCluster, HostCluster
from ..planner.estimate import Job
from ..planner.hardware import gpu
from ..planner.layout import RECOMPUTE_NAMES, SHARDS, parse_plan
from ..planner.models import load_model, model_from_sizes
from ..planner.moe import EXPERT_IMBALANCE
from ..planner.report import budget_text, plot, ranking_text
from ..planner.search import evaluate, largest_micro_batch, longest_sequence, search, why
from ..planner.stack import MESHATTN, MESHATTN_FP32
from .checks import check_at_least

_SIZES = ("hidden_size", "layers", "heads", "kv_heads", "ffn_size", "vocab_size")


def plan_command(a: argparse.Namespace) -> int:
    calibration = _calibration(a)
    if a.calibrate and not _has_model(a):
        return 0  # measured and saved: nothing to plan
    model = _model(a)
    check_at_least(a, 1, "gpus", "top")
    seq = a.seq_len if a.seq_len is not None else model.max_seq_len
    batch = a.global_batch if a.global_batch is not None else a.gpus
    check_at_least(argparse.Namespace(seq_len=seq, global_batch=batch), 1, "seq_len", "global_batch")
    if a.micro_batch is not None:
        check_at_least(a, 1, "micro_batch")
    if seq > model.max_seq_len:
        model = dataclasses.replace(model, max_seq_len=seq)
    job = Job(seq, batch, expert_imbalance=_expert_imbalance(a, model))
    if a.gpu == "this":
        cluster = HostCluster(calibration or _load_calibration(a), a.gpus)
        stack = MESHATTN if a.dtype == "bfloat16" else MESHATTN_FP32
    else:
        cluster = GpuCluster(gpu(a.gpu))
        stack = MESHATTN_FP32 if a.dtype == "float32" else MESHATTN
    if a.memory and a.layout is None:
        raise ConfigError("--memory reports one layout's budget: give it with --layout (e.g. --layout dp2xtp4)")
    if a.layout is not None:
        plan = parse_plan(a.layout, a.recompute, a.sequence_parallel, a.shard or "none", a.micro_batch or 1)
        est = evaluate(model, job, plan, cluster, stack, a.gpus)
        if a.memory:
            largest = largest_micro_batch(model, job, plan, cluster, stack)
            longest = longest_sequence(model, job, plan, cluster, stack)
            if a.json:
                print(json.dumps({**est.to_dict(), "largest_micro_batch": largest, "longest_seq_len": longest},
                                 indent=2))
            else:
                print(budget_text(est, largest, longest))
        elif a.json:
            print(json.dumps(est.to_dict(), indent=2))
        else:
            print(ranking_text([est], a.top, f"{cluster.name} x {a.gpus}"))
        _plot([est], a)
        return 0
    ranking = search(model, job, cluster, stack, a.gpus, pipeline=a.pipeline,
                     recompute=(a.recompute,) if a.recompute else RECOMPUTE_NAMES,
                     sequence_parallel=(True,) if a.sequence_parallel else (False, True),
                     shards=(a.shard,) if a.shard else SHARDS,
                     micro_batches=[a.micro_batch] if a.micro_batch else None, progress=sys.stderr.isatty())
    if not ranking.ranked:
        raise ConfigError(_nothing_fits(ranking, a))
    first, second = ranking.ranked[0], (ranking.ranked[1] if len(ranking.ranked) > 1 else None)
    reason = why(first, second)
    if a.json:
        print(json.dumps({**first.to_dict(), "why": reason, "searched": ranking.searched,
                          "fit": len(ranking.ranked), "candidates": [e.to_dict() for e in ranking.ranked[:a.top]]},
                         indent=2))
    else:
        print(ranking_text(ranking.ranked, a.top, f"{cluster.name} x {a.gpus}", ranking.searched))
        print(reason)
    _plot(ranking.ranked[:a.top], a)
    return 0


def _expert_imbalance(a, model: ModelConfig) -> float:
    """--expert-imbalance (an MoE model's busiest ep rank's routed rows over the mean; planner/moe.py
    says why the default). Read with a default: the flag is defined in options.py."""
    given = getattr(a, "expert_imbalance", None)
    if given is None:
        return EXPERT_IMBALANCE
    if not model.is_moe:
        raise ConfigError("--expert-imbalance applies to mixture-of-experts models (n_experts > 0); drop it for "
                          "this dense model")
    return given  # (Job checks it)


def _has_model(a) -> bool:
    return a.preset is not None or a.model is not None or any(getattr(a, k) is not None for k in _SIZES)


def _model(a) -> ModelConfig:
    given = [name for name, on in (("--preset", a.preset is not None), ("--model", a.model is not None),
                                   ("the sizes", any(getattr(a, k) is not None for k in _SIZES))) if on]
    if len(given) != 1:
        raise ConfigError("give the model one way: --preset NAME, --model FILE (ModelConfig JSON or Hugging Face "
                          "config.json), or --hidden-size --layers --heads [--kv-heads --ffn-size --vocab-size]"
                          + (f" (got {' and '.join(given)})" if given else ""))
    try:
        if a.preset is not None or a.model is not None:
            return load_model(a.preset or a.model)
        missing = [f"--{k.replace('_', '-')}" for k in ("hidden_size", "layers", "heads") if getattr(a, k) is None]
        if missing:
            raise ConfigError(f"model sizes: also give {' '.join(missing)}")
        check_at_least(a, 1, *[k for k in _SIZES if getattr(a, k) is not None])
        return model_from_sizes(a.hidden_size, a.layers, a.heads, a.kv_heads, a.ffn_size, a.vocab_size)
    except ValueError as e:  # ConfigError is a ValueError too
        raise ConfigError(str(e)) from None


def _calibration(a):
    """Measure and save this machine when --calibrate is given; the Calibration, or None."""
    if not a.calibrate:
        return None
    from ..planner import calibrate

    path = Path(a.calibration or calibrate.default_path())
    print("meshattn plan: calibrating this machine (compute, memory bandwidth, gloo collectives)", file=sys.stderr,
          flush=True)
    cal = calibrate.measure(world_sizes=sorted({2, 4, a.gpus} - {1}) if a.gpu == "this" else (2, 4))
    calibrate.save(cal, path)
    print(calibrate.summary(cal), file=sys.stderr)
    print(f"saved {path}", file=sys.stderr, flush=True)
    return cal


def _load_calibration(a):
    from ..planner import calibrate

    path = Path(a.calibration or calibrate.default_path())
    if not path.is_file():
        raise ConfigError(f"--gpu this needs this machine's measurements: run `meshattn plan --calibrate` first "
                          f"(no {path})")
    try:
        return calibrate.load(path)
    except ValueError as e:
        raise ConfigError(f"{path}: {e}; run `meshattn plan --calibrate` again") from None


def _nothing_fits(ranking, a) -> str:
    s = ranking.smallest
    if s is None:
        return (f"no valid layout of {a.gpus} GPUs for this model and batch; check that the heads, sequence and "
                f"global batch divide (e.g. --global-batch a multiple of {a.gpus})")
    need = s.memory_bytes["total"] / 2**30
    return (f"no layout of {a.gpus} GPUs fits: the smallest, {s.plan.describe()}, needs {need:.1f} GiB per GPU "
            f"of {s.capacity_bytes / 2**30:.1f}; use more GPUs, a shorter --seq-len, or --recompute full")


def _plot(estimates, a) -> None:
    if a.no_plots or not estimates:
        return
    path = Path(a.out) / "plan.png"
    plot(estimates, path)
    print(f"wrote {path}", file=sys.stderr if a.json else sys.stdout, flush=True)
