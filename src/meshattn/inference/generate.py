"""Batched generation: prefill, then one decode step per new token, through the KV cache.

    result = run(model, prompts, max_new_tokens, Sampling(...), eos_token_ids)

`model` is the reference Transformer, or a ParallelModel on every rank with the same arguments:
each dp group serves its contiguous share of the requests (a group with none runs an idle
padding row, which the experts of a mixture-of-experts layer still exchange with), and the
outputs are gathered over dp so every rank returns all of them, in prompt order.

A request stops at its first end-of-sequence token (kept in its output) or after
max_new_tokens. A group stops when its requests have; with a mixture of experts, or with weights
sharded over dp x cp, every rank keeps stepping until all ranks have stopped (one sum over the
world per step), since the expert collectives and FSDP's all-gathers span the dp groups.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from ..comm import Axis, all_reduce_
from ..parallel import ParallelModel
from .engine import Engine
from .sampling import Sampling, pick


@dataclass
class Generation:
    tokens: list[list[int]]  # the new tokens of every request, in prompt order
    prompt_tokens: int  # real prompt tokens, all requests
    prefill_s: float  # the slowest rank's prefill
    decode_s: float  # the slowest rank's decode steps
    steps: list[float] = field(default_factory=list)  # this rank's seconds per decode step

    @property
    def new_tokens(self) -> int:
        return sum(map(len, self.tokens))

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else float("inf")

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens made by decode steps (each request's first comes from the prefill) per second."""
        made = self.new_tokens - sum(1 for t in self.tokens if t)
        return made / self.decode_s if self.decode_s > 0 else float("nan")


def share(n: int, dp: int, rank: int) -> range:
    """The requests dp group `rank` serves: a contiguous block of ceil(n / dp) (maybe none)."""
    per = math.ceil(n / dp)
    return range(min(rank * per, n), min((rank + 1) * per, n))


def generate(model, prompts: list[list[int]], max_new_tokens: int, *, greedy: bool = True, temperature: float = 1.0,
             top_k: int = 0, top_p: float = 1.0, seed: int = 0, eos_token_ids=()) -> list[list[int]]:
    """The new tokens of every prompt (token-id lists), greedy or sampled; see `run`."""
    sampling = Sampling(greedy, temperature, top_k, top_p, seed)
    return run(model, prompts, max_new_tokens, sampling, eos_token_ids).tokens


@torch.no_grad()
def run(model, prompts: list[list[int]], max_new_tokens: int, sampling: Sampling = Sampling(), eos_token_ids=(),
        on_token: Callable[[int, int], None] | None = None) -> Generation:
    """Generate for every prompt. on_token(request index, token id) is called as tokens are
    chosen, for this rank's requests."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    parallel = isinstance(model, ParallelModel)
    dp = model.axes.dp if parallel else Axis.single("dp")
    mine = share(len(prompts), dp.size, dp.rank)
    lockstep = parallel and (model.local.cfg.is_moe or model.cfg.shard != "none")  # collectives span dp groups
    world = Axis.from_group(None, "world") if lockstep and dist.get_world_size() > 1 else None
    engine = Engine(model)
    eos = set(eos_token_ids)
    outputs: list[list[int]] = [[] for _ in mine]
    done = [False] * len(mine)
    generators = sampling.generators(list(mine))
    steps: list[float] = []

    t0 = time.perf_counter()
    logits = engine.prefill([list(prompts[i]) for i in mine], max_new_tokens)
    prefill_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    for t in range(max_new_tokens):
        tokens = pick(logits, sampling, generators) if mine else logits.argmax(-1)
        for b, token in enumerate(tokens[: len(mine)].tolist()):
            if not done[b]:
                outputs[b].append(token)
                done[b] = token in eos
                if on_token is not None:
                    on_token(mine[b], token)
        last = t + 1 == max_new_tokens
        if last or group_sum(int(not all(done)), world) == 0:
            break
        s = time.perf_counter()
        logits = engine.decode(tokens)
        steps.append(time.perf_counter() - s)
    decode_s = time.perf_counter() - t1
    prompt_tokens = sum(len(p) for p in prompts)
    if not parallel:
        return Generation(outputs, prompt_tokens, prefill_s, decode_s, steps)
    return _gathered(model, outputs, prompt_tokens, prefill_s, decode_s, steps)


def _gathered(model: ParallelModel, outputs, prompt_tokens, prefill_s, decode_s, steps) -> Generation:
    """Every dp group's outputs in prompt order and the slowest rank's times, on every rank."""
    dp = model.axes.dp
    every = [outputs]
    if dp.size > 1:
        every = [None] * dp.size
        dist.all_gather_object(every, outputs, group=dp.group)
    times = torch.tensor([prefill_s, decode_s], dtype=torch.float64)
    all_reduce_(times, Axis.from_group(None, "world"), "fwd", op="max")
    tokens = [t for group in every for t in group]
    return Generation(tokens, prompt_tokens, float(times[0]), float(times[1]), steps)


def group_sum(flag: int, axis: Axis | None) -> int:
    """flag summed over axis (itself when axis is None or has one rank)."""
    if axis is None or axis.size == 1:
        return flag
    t = torch.tensor([flag], dtype=torch.long)
    all_reduce_(t, axis, "fwd")
    return int(t.item())
