"""Benchmark layouts: what `meshattn bench` runs, by name.

A layout name is either a peer or a meshattn mesh:

    single              the reference model in one process (all cores)
    native-tp2          PyTorch's own tensor parallelism (DTensor parallelize_module) at tp=2
    tp2                 meshattn tensor parallelism; "tp2+sp" adds sequence parallelism; "+vp"
                        splits the vocabulary over tp, "+wv" keeps it whole (default: decided
                        from the sizes, ParallelConfig.splits_vocab)
    dp2xtp2             axes joined by "x", any order: dp<N>, tp<N>[+sp][+vp|+wv], cp<N>[:impl[:layout]]
    cp2:ring            context parallelism: impl ring | ulysses | allgather | hybrid<U>
    cp4:hybrid2:zigzag  (U = the Ulysses group size), layout zigzag (default) | contiguous
    dp4xep4             expert parallelism (MoE models) over ranks the other axes already hold:
                        ep<N>[:all_to_all|:gather], the token dispatch (default all_to_all)
    tp2@block           any meshattn layout with activation checkpointing: @attention or @block

`default_layouts(world, ...)` lists every valid dp/tp/cp/impl combination for a world size with
the zigzag layout, plus the two peers; for a mixture-of-experts model also the ep variants of each
dp x cp x tp split, and no PyTorch-native peer (`peer_notes` says why it is left out).
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass

from ..config import PRESETS, ConfigError, CpImpl, ModelConfig, MoeDispatch, ParallelConfig, Recompute, TrainConfig, \
    divisors

KINDS = ("single", "native", "meshattn")


@dataclass(frozen=True)
class Layout:
    kind: str  # one of KINDS
    parallel: ParallelConfig
    checkpoint: str = "none"  # activation checkpointing of meshattn layouts

    @property
    def world(self) -> int:
        return self.parallel.world_size

    @property
    def name(self) -> str:
        p = self.parallel
        if self.kind == "single":
            return "single"
        if self.kind == "native":
            return f"native-tp{p.tp}"
        parts = []
        if p.dp > 1:
            parts.append(f"dp{p.dp}")
        if p.cp > 1:
            impl = f"hybrid{p.ulysses_size}" if p.cp_impl == "hybrid" else p.cp_impl
            parts.append(f"cp{p.cp}:{impl}" + ("" if p.cp_layout == "zigzag" else f":{p.cp_layout}"))
        if p.tp > 1 or p.sequence_parallel:
            vocab = {"auto": "", "on": "+vp", "off": "+wv"}[p.vocab_parallel]
            parts.append(f"tp{p.tp}" + ("+sp" if p.sequence_parallel else "") + vocab)
        if p.ep > 1:
            parts.append(f"ep{p.ep}" + ("" if p.moe_dispatch == "all_to_all" else f":{p.moe_dispatch}"))
        name = "x".join(parts) or "dp1"
        return name if self.checkpoint == "none" else f"{name}@{self.checkpoint}"

    @property
    def native_peer(self) -> str | None:
        """The PyTorch-native layout this one is compared with: plain tensor parallelism (either
        vocabulary plan, no sequence parallelism, no checkpointing) against native-tpN."""
        p = self.parallel
        if self.kind != "meshattn" or p.dp > 1 or p.cp > 1 or p.tp == 1 or p.sequence_parallel:
            return None
        return Layout("native", ParallelConfig(tp=p.tp)).name if self.checkpoint == "none" else None


def parse_layout(name: str) -> Layout:
    """'dp2xtp2', 'cp4:hybrid2', 'native-tp2', 'single' -> Layout (ConfigError naming the grammar)."""
    text, _, checkpoint = name.strip().lower().partition("@")
    if checkpoint and (checkpoint not in Recompute.names() or text == "single" or "-tp" in text):
        raise ConfigError(f"layout {name!r}: write @attention or @block after a meshattn layout (e.g. tp2@block) for "
                          "activation checkpointing")
    if text == "single":
        return Layout("single", ParallelConfig())
    m = re.fullmatch(r"(?:native|dtensor)-tp(\d+)", text)
    if m:
        return Layout("native", ParallelConfig(tp=int(m.group(1))))
    sizes = {"dp": 1, "tp": 1, "cp": 1}
    extra: dict = {}
    for part in text.split("x"):
        m = re.fullmatch(rf"ep(\d+)(?::({'|'.join(MoeDispatch.names())}))?", part)
        if m:
            extra["ep"] = int(m.group(1))
            if m.group(2):
                extra["moe_dispatch"] = m.group(2)
            continue
        m = re.fullmatch(r"(dp|tp|cp)(\d+)(\+sp)?(\+vp|\+wv)?(?::([a-z]+)(\d+)?)?(?::([a-z]+))?", part)
        if not m or ((m.group(3) or m.group(4)) and m.group(1) != "tp") or (m.group(5) and m.group(1) != "cp"):
            raise ConfigError(f"layout {name!r}: cannot read {part!r}; write e.g. single, native-tp2, tp2, tp2+sp, "
                              "tp2+wv, dp2xtp2, cp2:ring, cp2:ulysses:contiguous, cp4:hybrid2, dp4xep4 (axes dp<N>, "
                              "tp<N>[+sp][+vp|+wv], cp<N>[:impl[:layout]], "
                              f"ep<N>[:{'|:'.join(MoeDispatch.names())}] joined by 'x'; impl one of "
                              f"{', '.join(CpImpl.names())})")
        axis, size = m.group(1), int(m.group(2))
        sizes[axis] = size
        if m.group(3):
            extra["sequence_parallel"] = True
        if m.group(4):
            extra["vocab_parallel"] = "on" if m.group(4) == "+vp" else "off"
        if m.group(5):
            extra["cp_impl"] = m.group(5)
            if m.group(6):
                extra["ulysses_size"] = int(m.group(6))
        if m.group(7):
            extra["cp_layout"] = m.group(7)
    _check_ep_ranks(name, sizes, extra.get("ep", 1))
    return Layout("meshattn", ParallelConfig(**sizes, **extra), checkpoint or "none")


def _check_ep_ranks(name: str, sizes: dict, ep: int) -> None:
    """ep borrows the dp x cp x tp ranks: refuse an ep that does not divide them, naming a layout
    with enough data-parallel replicas."""
    world = sizes["dp"] * sizes["cp"] * sizes["tp"]
    if world % ep == 0:
        return
    more = ep // math.gcd(ep, world)  # the fewest replicas that make a multiple of ep
    fixed = Layout("meshattn", ParallelConfig(**{**sizes, "dp": sizes["dp"] * more}, ep=ep)).name
    others = [str(e) for e in divisors(world) if e > 1]
    raise ConfigError(f"layout {name!r}: ep{ep} borrows the dp x cp x tp = {world} ranks and must divide them; write "
                      f"e.g. {fixed}" + (f", or ep among {', '.join(others)}" if others else ""))


def check_layout(layout: Layout, model: ModelConfig, batch_size: int, seq_len: int) -> TrainConfig:
    """The training config of a layout, or ConfigError saying why it cannot run this model."""
    par = layout.parallel
    if layout.kind == "native" and model.is_moe:
        raise ConfigError(f"layout {layout.name}: PyTorch's tensor parallelism as bench plans it (DTensor "
                          "parallelize_module on the dense MLP) cannot split mixture-of-experts layers; leave it out "
                          "for an MoE model and compare single, dp<N> and the ep layouts")
    if layout.kind == "native" and (model.n_heads % par.tp or model.n_kv_heads % par.tp):
        raise ConfigError(f"{layout.name}: PyTorch's tensor parallelism splits heads evenly; n_heads={model.n_heads} "
                          f"and n_kv_heads={model.n_kv_heads} must both be divisible by tp={par.tp}")
    if par.ep > 1:
        _check_ep(layout, model)
    return TrainConfig(model=model, parallel=par, batch_size=batch_size, seq_len=seq_len, steps=1,
                       warmup=1, sample_tokens=0, checkpoint=layout.checkpoint)


def _check_ep(layout: Layout, model: ModelConfig) -> None:
    """An ep<N> part needs an MoE model whose experts N divides (parse_layout checks the ranks)."""
    par, ep = layout.parallel, f"ep{layout.parallel.ep}"
    if not model.is_moe:
        moe = ", ".join(name for name, m in PRESETS.items() if m.is_moe)
        raise ConfigError(f"layout {layout.name}: {ep} splits experts, but this model is dense (n_experts=0); choose "
                          f"an MoE --preset ({moe}) or drop {ep} from the layout")
    if model.n_experts % par.ep:
        legal = _expert_splits(par.world_size, model)
        fix = (f"choose ep among {', '.join(map(str, legal))} for {par.world_size} ranks" if legal else
               f"no ep > 1 divides both the {par.world_size} ranks and the experts; write e.g. dp2xep2")
        raise ConfigError(f"layout {layout.name}: {ep} does not divide the model's {model.n_experts} experts; {fix}")


def _expert_splits(world: int, model: ModelConfig) -> list[int]:
    """The ep sizes > 1 that divide both the world and the experts."""
    return [e for e in divisors(world) if e > 1 and model.n_experts % e == 0]


def peer_notes(world: int, model: ModelConfig, batch_size: int, seq_len: int) -> list[str]:
    """Why the default list has no PyTorch-native peer, if it has none (one line each)."""
    try:
        check_layout(Layout("native", ParallelConfig(tp=world)), model, batch_size, seq_len)
    except ConfigError as e:
        return [f"no PyTorch-native peer: {e}"]
    return []


def default_layouts(world: int, model: ModelConfig, batch_size: int, seq_len: int) -> list[Layout]:
    """The single-process reference, PyTorch-native TP at tp=world, and every valid meshattn
    dp x cp x tp layout of `world` ranks (each cp impl, zigzag layout). For an MoE model, after
    each dp x cp x tp split its ep variants (cp with the default impl): every ep > 1 dividing the
    ranks and the experts with the all-to-all dispatch, and the largest with the gather too."""
    candidates = [Layout("single", ParallelConfig()), Layout("native", ParallelConfig(tp=world))]
    for tp in divisors(world):
        for cp in divisors(world // tp):
            dp = world // (tp * cp)
            candidates += _cp_variants(dp, cp, tp)
            if model.is_moe:
                candidates += _ep_variants(ParallelConfig(dp=dp, tp=tp, cp=cp), model)
    valid = []
    for layout in candidates:
        try:
            check_layout(layout, model, batch_size, seq_len)
        except ConfigError:
            continue
        valid.append(layout)
    return valid


def _cp_variants(dp: int, cp: int, tp: int) -> list[Layout]:
    """dp x cp x tp with each cp impl (and each Ulysses size of the hybrid); one layout if cp = 1."""
    if cp == 1:
        return [Layout("meshattn", ParallelConfig(dp=dp, tp=tp))]
    out = []
    for impl in CpImpl:
        sizes = [u for u in divisors(cp) if 1 < u < cp] if impl.needs_ulysses_size else [None]
        out += [Layout("meshattn", ParallelConfig(dp=dp, tp=tp, cp=cp, cp_impl=impl.value, ulysses_size=u))
                for u in sizes]
    return out


def _ep_variants(base: ParallelConfig, model: ModelConfig) -> list[Layout]:
    """base with each valid ep (all-to-all), and the largest ep with every other dispatch too."""
    eps = _expert_splits(base.world_size, model)
    out = [Layout("meshattn", dataclasses.replace(base, ep=ep)) for ep in eps]
    if eps:
        out += [Layout("meshattn", dataclasses.replace(base, ep=eps[-1], moe_dispatch=d.value))
                for d in MoeDispatch if d is not MoeDispatch.ALL_TO_ALL]
    return out


def layout_to_dict(layout: Layout) -> dict:
    return {"kind": layout.kind, "parallel": dataclasses.asdict(layout.parallel), "checkpoint": layout.checkpoint}


def layout_from_dict(d: dict) -> Layout:
    return Layout(d["kind"], ParallelConfig(**d["parallel"]), d.get("checkpoint", "none"))
