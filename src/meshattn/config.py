"""Configuration dataclasses and every size check, with messages that name the fix.

Nothing here imports torch.distributed or the rest of meshattn: a configuration can be
built and validated on a laptop, and every rank validates the same one the same way before
any collective is issued.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from enum import Enum


class ConfigError(ValueError):
    """An invalid configuration. The message says what to change."""


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _legal(values: list[int]) -> str:
    return ", ".join(str(v) for v in values)


# -- Options: every name a user types is defined here once. The CLI's choices, the bench layout
# grammar and every check read these definitions; a derived rule is a property of its option.

class Option(str, Enum):
    """A closed set of names. Configs store the plain string; `parse` is the one check."""

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(m.value for m in cls)

    @classmethod
    def parse(cls, value, field_name: str):
        try:
            return cls(value)
        except ValueError:
            raise ConfigError(f"{field_name}={value!r} is unknown; choose one of {cls.names()}") from None

    def __str__(self) -> str:
        return self.value


def _option(name: str, values: str, doc: str):
    """An Option whose members are the space-separated `values` (member names: upper case)."""
    cls = Option(name, [(v.upper(), v) for v in values.split()], module=__name__)
    cls.__doc__ = doc
    return cls


Norm = _option("Norm", "layernorm rmsnorm", "The normalisation of every block and the final norm.")
Position = _option("Position", "rope learned", "Rotary angles, or a learned position embedding.")
Activation = _option("Activation", "gelu swiglu", "The MLP: fc -> gelu -> proj, or silu(gate) * fc -> proj.")
Recompute = _option("Recompute", "none attention block",
                    "Activation checkpointing: nothing, the attention core, or whole blocks (parallel/recompute.py).")
VocabParallel = _option("VocabParallel", "auto on off",
                        "Split the embedding and LM head over tp (on), keep them whole (off), or decide (auto).")
OnNonfinite = _option("OnNonfinite", "stop skip", "A non-finite loss or gradient norm: stop the run, or skip the step.")
ShardMode = _option("ShardMode", "none dp",
                    "Parameters, gradients and AdamW state replicated over the dp x cp ranks (none), or sharded "
                    "over them with FSDP2 (dp; parallel/fsdp.py).")
MoeDispatch = _option("MoeDispatch", "all_to_all gather",
                      "How tokens reach their experts' ranks (parallel/moe.py): all-to-all dispatch and combine, or "
                      "all-gather before the experts and reduce-scatter after.")


class CpImpl(Option):
    """How attention crosses the sequence split (parallel/context.py holds one function each)."""

    ALLGATHER = "allgather"  # K/V all-gathered once
    RING = "ring"  # K/V blocks passed around the ring, merged by log-sum-exp
    ULYSSES = "ulysses"  # all-to-all to head shards and back
    HYBRID = "hybrid"  # Ulysses inside groups of ulysses_size ranks, ring across them

    @property
    def splits_heads(self) -> bool:
        """Whether the impl splits heads over a (Ulysses) group."""
        return self in (CpImpl.ULYSSES, CpImpl.HYBRID)

    @property
    def needs_ulysses_size(self) -> bool:
        return self is CpImpl.HYBRID


class CpLayout(Option):
    """Which chunks of the global sequence each cp rank holds (parallel/layout.py: chunks_of)."""

    CONTIGUOUS = "contiguous"  # p chunks, rank r holds chunk r
    ZIGZAG = "zigzag"  # 2p chunks, rank r holds r and 2p-1-r: equal causal work
    BALANCED = "balanced"  # 4p chunks dealt per batch by their masked work (packed documents)

    @property
    def chunks_per_rank(self) -> int:
        return {CpLayout.CONTIGUOUS: 1, CpLayout.ZIGZAG: 2, CpLayout.BALANCED: 4}[self]

    def n_chunks(self, p: int) -> int:
        """Equal chunks the global sequence is cut into over p ranks."""
        return self.chunks_per_rank * p


class DType(Option):
    """Training precision: bfloat16 and float16 are autocast over fp32 weights."""

    FLOAT32 = "float32"
    FLOAT64 = "float64"
    BFLOAT16 = "bfloat16"
    FLOAT16 = "float16"

    @property
    def autocast(self) -> bool:
        """Whether the forward runs under autocast (float16 also scales the loss)."""
        return self in (DType.BFLOAT16, DType.FLOAT16)


def check_head_split(n_heads: int, n_kv_heads: int, group: int, who: str = "Ulysses",
                     group_name: str = "group size", hint: str = "", whose: str = "") -> None:
    """Refuse splitting n_heads query and n_kv_heads KV heads over a group of `group` ranks
    unless query heads divide evenly and KV heads divide or are divided by it (then replicated)."""
    if n_heads % group or (n_kv_heads % group and group % n_kv_heads):
        legal = [g for g in divisors(n_heads) if n_kv_heads % g == 0 or g % n_kv_heads == 0]
        raise ConfigError(f"{who} splits {whose}{n_heads} query and {n_kv_heads} KV heads over {group_name}={group}: query "
                          f"heads must be divisible by it and KV heads must divide or be divisible by it; legal "
                          f"{group_name}: {_legal(legal)}{hint}")


def check_ulysses_size(cp: int, ulysses_size) -> None:
    if ulysses_size is None or ulysses_size < 1 or cp % ulysses_size:
        raise ConfigError(f"cp_impl='hybrid' needs ulysses_size dividing cp={cp}; legal: {_legal(divisors(cp))}")


@dataclass(frozen=True)
class ModelConfig:
    """A decoder-only transformer: sizes, norm, positions, MLP kind.

    n_kv_heads < n_heads is grouped-query attention (GQA); n_kv_heads == 1 is multi-query (MQA).
    None means n_kv_heads = n_heads and d_ff = 4 * d_model.
    """

    d_model: int = 128
    n_heads: int = 4
    n_kv_heads: int | None = None
    n_layers: int = 2
    d_ff: int | None = None
    vocab_size: int = 256
    max_seq_len: int = 256
    norm: str = "layernorm"
    position: str = "rope"
    activation: str = "gelu"
    bias: bool = False  # every Linear and LayerNorm has a bias (GPT-2)
    qkv_bias: bool = False  # the Q/K/V projection alone has a bias (Qwen2)
    tie_embeddings: bool = False
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # Llama-3 rotary frequency scaling: (factor, low_freq_factor, high_freq_factor,
    # original_max_position_embeddings); None: plain rotary angles.
    rope_scaling: tuple[float, float, float, int] | None = None
    init_std: float = 0.02
    window: int | None = None  # sliding-window attention: a query sees the last `window` keys
    document_positions: bool = True  # with packed documents, positions restart at each document
    # Mixture of experts (model/moe.py). n_experts = 0 is a dense model.
    n_experts: int = 0  # routed experts per MoE layer
    top_k: int = 2  # experts per token; their gates are the softmax probabilities renormalised over the k
    expert_ffn: int | None = None  # hidden size of each routed expert (None: d_ff)
    n_shared_experts: int = 0  # shared experts every token passes through (one SwiGLU of this many x expert_ffn)
    dense_layers: int = 0  # the first layers keep the dense MLP (DeepSeek's first_k_dense_replace)
    aux_loss_coef: float = 0.01  # the load-balancing loss's weight (summed over MoE layers)
    z_loss_coef: float = 0.001  # the router z-loss's weight (summed over MoE layers)
    capacity_factor: float | None = None  # None: dropless; else each expert takes ceil(c * N * k / E) tokens

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            object.__setattr__(self, "n_kv_heads", self.n_heads)
        if self.d_ff is None:
            object.__setattr__(self, "d_ff", 4 * self.d_model)
        if self.expert_ffn is None:
            object.__setattr__(self, "expert_ffn", self.d_ff)
        if self.rope_scaling is not None:  # JSON gives a list back
            self._check_rope_scaling()
        for name in ("d_model", "n_heads", "n_kv_heads", "n_layers", "d_ff", "vocab_size", "max_seq_len", "expert_ffn"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be a positive integer")
        if self.d_model % self.n_heads:
            raise ConfigError(
                f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}; "
                f"legal n_heads: {_legal(divisors(self.d_model))}"
            )
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}; "
                f"legal n_kv_heads: {_legal(divisors(self.n_heads))}"
            )
        if self.window is not None and (isinstance(self.window, bool) or not isinstance(self.window, int)
                                        or self.window < 1):
            raise ConfigError(f"window={self.window!r} must be None or an int >= 1 (a query sees the last "
                              "`window` keys, itself included)")
        for name, option in (("norm", Norm), ("position", Position), ("activation", Activation)):
            object.__setattr__(self, name, option.parse(getattr(self, name), name).value)
        self._check_moe()
        if self.position == "rope" and self.head_dim % 2:
            raise ConfigError(
                f"rotary positions need an even head_dim, got d_model/n_heads={self.head_dim}; "
                "change d_model or n_heads, or use position='learned'"
            )

    def _check_rope_scaling(self) -> None:
        value = self.rope_scaling
        try:
            factor, low, high, original = (float(v) for v in value)
        except (TypeError, ValueError):
            raise ConfigError(f"rope_scaling={value!r} must be None or (factor, low_freq_factor, high_freq_factor, "
                              "original_max_position_embeddings), Llama-3's rotary scaling") from None
        if not (factor >= 1 and 0 < low < high and original >= 1 and original == int(original)):
            raise ConfigError(f"rope_scaling={value!r} needs factor >= 1, 0 < low_freq_factor < high_freq_factor "
                              "and an integer original_max_position_embeddings >= 1")
        object.__setattr__(self, "rope_scaling", (factor, low, high, int(original)))

    def _check_moe(self) -> None:
        for name in ("n_experts", "n_shared_experts", "dense_layers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"{name}={value!r} must be an integer >= 0")
        for name in ("aux_loss_coef", "z_loss_coef"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ConfigError(f"{name}={value!r} must be a finite number >= 0")
        if self.n_experts == 0:
            return
        if not 1 <= self.top_k <= self.n_experts:
            raise ConfigError(f"top_k={self.top_k} must be between 1 and n_experts={self.n_experts}")
        if self.dense_layers >= self.n_layers:
            raise ConfigError(f"dense_layers={self.dense_layers} leaves no MoE layer among n_layers={self.n_layers}; "
                              f"use dense_layers < {self.n_layers} (or n_experts=0 for a dense model)")
        c = self.capacity_factor
        if c is not None and (isinstance(c, bool) or not isinstance(c, (int, float)) or not math.isfinite(c) or c <= 0):
            raise ConfigError(f"capacity_factor={c!r} must be None (dropless) or a number > 0 (e.g. 1.25)")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def is_moe(self) -> bool:
        return self.n_experts > 0

    def moe_layer(self, i: int) -> bool:
        """Whether block i's feed-forward is a mixture of experts (else the dense MLP)."""
        return self.n_experts > 0 and i >= self.dense_layers

    @property
    def n_moe_layers(self) -> int:
        return self.n_layers - self.dense_layers if self.n_experts > 0 else 0  # moe_layer's rule, counted

    def moe_params(self) -> tuple[int, int]:
        """Parameters of one MoE feed-forward layer: (all of them, those one token uses)."""
        h, f = self.d_model, self.expert_ffn
        expert = 3 * h * f  # SwiGLU: gate, up, down
        router, shared = self.n_experts * h, self.n_shared_experts * expert
        return router + shared + self.n_experts * expert, router + shared + self.top_k * expert

    def num_params(self) -> int:
        h, f, v, b = self.d_model, self.d_ff, self.vocab_size, int(self.bias)
        qkv_rows = (self.n_heads + 2 * self.n_kv_heads) * self.head_dim
        n_fc = 2 if self.activation == "swiglu" else 1
        norm = h * (2 if self.norm == "layernorm" and self.bias else 1)
        attn = (h + (b or int(self.qkv_bias))) * qkv_rows + (h + b) * h
        mlp = n_fc * (h + b) * f + (f + b) * h
        emb = v * h + (self.max_seq_len * h if self.position == "learned" else 0)
        head = 0 if self.tie_embeddings else v * h
        moe = self.n_moe_layers * (self.moe_params()[0] - mlp)
        return self.n_layers * (attn + mlp + 2 * norm) + moe + emb + head + norm


# Named presets. Vocabulary sizes are padded to a multiple of 64 (as nanoGPT pads GPT-2's
# 50257 to 50304) so that common tensor-parallel sizes divide them.
PRESETS: dict[str, ModelConfig] = {
    # The CPU default: trains in a minute on two cores with byte-level tokens.
    "tiny": ModelConfig(d_model=128, n_heads=4, n_kv_heads=2, n_layers=2, d_ff=512, vocab_size=256,
                        max_seq_len=256, norm="rmsnorm", position="rope", activation="swiglu"),
    "small": ModelConfig(d_model=256, n_heads=8, n_kv_heads=4, n_layers=4, d_ff=1024, vocab_size=256,
                         max_seq_len=512, norm="rmsnorm", position="rope", activation="swiglu"),
    # GPT-2 small (124M): learned positions, LayerNorm with bias, GELU, tied embeddings.
    "gpt2-small": ModelConfig(d_model=768, n_heads=12, n_layers=12, d_ff=3072, vocab_size=50304,
                              max_seq_len=1024, norm="layernorm", position="learned", activation="gelu",
                              bias=True, tie_embeddings=True),
    # Llama-3.2-1B shaped: GQA with 8 KV heads for 32 query heads, RMSNorm, rotary, SwiGLU.
    "llama-1b": ModelConfig(d_model=2048, n_heads=32, n_kv_heads=8, n_layers=16, d_ff=8192,
                            vocab_size=128256, max_seq_len=8192, norm="rmsnorm", position="rope",
                            activation="swiglu", tie_embeddings=True, rope_theta=500000.0),
    # DeepSeek/Mixtral-shaped and CPU-sized: a dense first layer, then 8 routed SwiGLU experts (top-2)
    # beside one shared expert; 1.8M parameters, 0.9M active per token.
    "moe-tiny": ModelConfig(d_model=128, n_heads=4, n_kv_heads=2, n_layers=4, d_ff=512, vocab_size=256,
                            max_seq_len=256, norm="rmsnorm", position="rope", activation="swiglu",
                            n_experts=8, top_k=2, expert_ffn=128, n_shared_experts=1, dense_layers=1),
    # DeepSeek-V2-Lite's sizes for the planner: 64 routed experts of 1408 (top-6) and 2 shared, the
    # first layer dense (10944). Attention is plain multi-head attention with 16 heads of 128, not
    # DeepSeek's latent attention (MLA): 15.8B parameters, 2.7B active (15.7B and 2.4B with MLA).
    "deepseek-v2-lite": ModelConfig(d_model=2048, n_heads=16, n_layers=27, d_ff=10944, vocab_size=102400,
                                    max_seq_len=4096, norm="rmsnorm", position="rope", activation="swiglu",
                                    n_experts=64, top_k=6, expert_ffn=1408, n_shared_experts=2, dense_layers=1),
}


def preset(name: str, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **overrides)


@dataclass(frozen=True)
class ParallelConfig:
    """Sizes of the mesh axes dp x cp x tp (outermost to innermost) and how each is used.

    tp splits attention heads and MLP columns (Megatron style); sequence_parallel additionally
    shards the activations between blocks (norms, residual) over tp along the sequence.
    cp splits the sequence: cp_impl chooses how attention crosses the split (allgather, ring,
    ulysses, hybrid = ulysses inside groups of ulysses_size ranks, ring across them) and cp_layout
    which chunks each rank holds (contiguous, or zigzag for causal load balance).
    """

    dp: int = 1
    tp: int = 1
    cp: int = 1
    sequence_parallel: bool = False
    cp_impl: str = "ring"
    cp_layout: str = "zigzag"
    ulysses_size: int | None = None
    node_size: int | None = None  # ranks per node: makes the gradient all-reduce hierarchical
    # Post ring transfers and the tensor-parallel input-gradient all-reduce before the computation
    # that hides them; False waits for each at once (to measure what overlap buys).
    overlap: bool = True
    # Split the embedding and LM head over tp ("on", Megatron's vocab-parallel layers), keep them
    # whole on every tp rank ("off"), or decide from the sizes ("auto"; see splits_vocab).
    vocab_parallel: str = "auto"
    # Expert parallelism: the MoE layers' experts split over ep ranks. ep borrows the dp x cp x tp
    # ranks (it adds none): consecutive ranks form an ep group, experts are replicated over the
    # world / ep groups, and every rank routes its own tokens (see parallel/moe.py).
    ep: int = 1
    moe_dispatch: str = "all_to_all"
    # "dp": FSDP2 shards each rank's (tp-local) parameters, gradients and optimizer state over the
    # dp x cp ranks; "none": they are replicated there and DDP averages the gradients.
    shard: str = "none"

    def __post_init__(self) -> None:
        for name in ("dp", "tp", "cp", "ep"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name}={value!r} must be a positive integer")
        for name, option in (("cp_impl", CpImpl), ("cp_layout", CpLayout), ("vocab_parallel", VocabParallel),
                             ("moe_dispatch", MoeDispatch), ("shard", ShardMode)):
            object.__setattr__(self, name, option.parse(getattr(self, name), name).value)
        if self.impl.needs_ulysses_size:
            check_ulysses_size(self.cp, self.ulysses_size)
        if self.node_size is not None and (self.node_size < 1 or self.node_size % self.tp):
            raise ConfigError(f"node_size={self.node_size} must be a positive multiple of tp={self.tp} (tensor-"
                              "parallel groups stay inside a node)")
        if self.vocab_parallel == "off" and self.sequence_parallel and self.tp > 1:
            raise ConfigError("vocab_parallel='off' keeps the LM head whole, which sequence parallelism does not "
                              "support; use vocab_parallel='on' (or 'auto') with sequence_parallel")
        if not self.impl.needs_ulysses_size and self.ulysses_size is not None:
            raise ConfigError(f"ulysses_size is only used by cp_impl='hybrid' (cp_impl={self.cp_impl!r}); drop it")
        if self.shard == "dp" and self.batch_ranks == 1:
            raise ConfigError(f"shard='dp' shards over the dp x cp ranks, and there is {self.batch_ranks}; use dp or "
                              "cp > 1, or shard='none'")
        if self.shard == "dp" and self.node_size is not None:
            raise ConfigError("node_size makes the data-parallel all-reduce hierarchical, and shard='dp' replaces "
                              "that all-reduce with FSDP's reduce-scatter; drop node_size")
        if self.world_size % self.ep:
            raise ConfigError(f"ep={self.ep} must divide the world dp*cp*tp = {self.world_size} (expert parallelism "
                              f"borrows those ranks); legal ep: {_legal(divisors(self.world_size))}")

    @property
    def expert_replicas(self) -> int:
        """Copies of each expert: one per ep group (world / ep)."""
        return self.world_size // self.ep

    @property
    def world_size(self) -> int:
        return self.dp * self.cp * self.tp

    @property
    def impl(self) -> CpImpl:
        return CpImpl(self.cp_impl)

    @property
    def layout(self) -> CpLayout:
        return CpLayout(self.cp_layout)

    @property
    def ulysses_group(self) -> int | None:
        """Ranks a Ulysses all-to-all splits heads over (cp for ulysses, ulysses_size for the
        hybrid); None when no heads are split."""
        if self.cp == 1 or not self.impl.splits_heads:
            return None
        return self.cp if self.impl is CpImpl.ULYSSES else self.ulysses_size

    @property
    def seq_chunks(self) -> int:
        """Equal chunks the global sequence is cut into for the cp layout (1 without cp)."""
        return self.layout.n_chunks(self.cp) if self.cp > 1 else 1

    @property
    def sequence_sharded(self) -> bool:
        """Whether activations between tensor-parallel regions are sequence shards over tp."""
        return self.sequence_parallel and self.tp > 1

    @property
    def seq_unit(self) -> int:
        """The global sequence length must be a multiple of this: the cp layout's chunks, each
        split again over tp under sequence parallelism."""
        return self.seq_chunks * (self.tp if self.sequence_sharded else 1)

    @property
    def batch_ranks(self) -> int:
        """Ranks holding different tokens (dp x cp): the axis losses and gradients average over."""
        return self.dp * self.cp

    def splits_vocab(self, model: ModelConfig) -> bool:
        """Whether the embedding and LM head are split over tp.

        Split, each rank holds V/tp rows and computes V/tp logits, at the price of two more
        collectives of B*S*h values per step (the embedding's exit, the head's entry) and three
        all-reduces of B*S values in the loss, each a synchronisation point. Whole, each rank
        computes all V logits: 6*B*S*V*h (1 - 1/tp) more FLOPs and 2*V*h more parameters per rank,
        and no communication. "auto" keeps them whole when V <= 4*h, where the head costs at most
        what one layer's four h x h attention projections cost (byte- and character-level
        vocabularies); real subword vocabularies (32k-256k) are split. Under sequence
        parallelism the vocabulary is always split.
        """
        if self.tp == 1:
            return False
        if self.vocab_parallel == "auto":
            return self.sequence_parallel or model.vocab_size > 4 * model.d_model
        return self.vocab_parallel == "on"

    def check_world(self, world_size: int) -> None:
        if self.node_size is not None and world_size % self.node_size:
            raise ConfigError(f"node_size={self.node_size} does not divide the world size {world_size}")
        if self.world_size != world_size:
            raise ConfigError(
                f"dp*cp*tp = {self.dp}*{self.cp}*{self.tp} = {self.world_size} does not match the "
                f"world size {world_size}; choose sizes whose product is {world_size} "
                f"(legal tp sizes for this world: {_legal(divisors(world_size))})"
            )

    def check_model(self, model: ModelConfig) -> None:
        """Refuse a model this layout cannot split exactly."""
        tp = self.tp
        if self.ep > 1 and not model.is_moe:
            raise ConfigError(f"ep={self.ep} splits experts, but the model is dense (n_experts=0); use an MoE model "
                              "(e.g. --preset moe-tiny) or ep=1")
        shared = model.n_shared_experts * model.expert_ffn
        if model.is_moe and shared and shared % tp:
            raise ConfigError(f"the shared expert's {shared} hidden units (n_shared_experts x expert_ffn) are not "
                              f"divisible by tp={tp}; legal tp sizes: "
                              f"{_legal([t for t in divisors(shared) if model.n_heads % t == 0])}")
        if model.is_moe and model.n_experts % self.ep:
            raise ConfigError(f"n_experts={model.n_experts} is not divisible by ep={self.ep}; legal ep: "
                              f"{_legal([e for e in divisors(model.n_experts) if self.world_size % e == 0])}")
        if model.n_heads % tp:
            legal = [t for t in divisors(model.n_heads) if _kv_ok(model.n_kv_heads, t)]
            raise ConfigError(
                f"n_heads={model.n_heads} is not divisible by tp={tp}; legal tp sizes: {_legal(legal)}"
            )
        if not _kv_ok(model.n_kv_heads, tp):
            legal = [t for t in divisors(model.n_heads) if _kv_ok(model.n_kv_heads, t)]
            raise ConfigError(
                f"n_kv_heads={model.n_kv_heads} is neither a multiple nor a divisor of tp={tp}, so KV "
                f"heads can be neither split nor replicated evenly; legal tp sizes: {_legal(legal)}"
            )
        group = self.ulysses_group
        if group:
            check_head_split(model.n_heads // tp, max(model.n_kv_heads // tp, 1), group,
                             f"cp_impl={self.cp_impl!r}", "cp" if self.impl is CpImpl.ULYSSES else "ulysses_size",
                             " (or use cp_impl='ring' or 'allgather', which do not split heads)", "each tp rank's ")
        if model.d_ff % tp:
            raise ConfigError(
                f"d_ff={model.d_ff} is not divisible by tp={tp}; legal tp sizes: "
                f"{_legal([t for t in divisors(model.d_ff) if model.n_heads % t == 0])}"
            )
        if self.splits_vocab(model) and model.vocab_size % tp:
            padded = -(-model.vocab_size // tp) * tp
            raise ConfigError(
                f"vocab_size={model.vocab_size} is not divisible by tp={tp} (the vocabulary is split "
                f"over tp); pad vocab_size to {padded}, set vocab_parallel='off', or choose tp among "
                f"{_legal([t for t in divisors(model.vocab_size) if model.n_heads % t == 0])}"
            )

    def check_batch(self, batch_size: int, seq_len: int, grad_accum: int = 1) -> None:
        chunks, unit = self.seq_chunks, self.seq_unit
        if seq_len % unit:
            why = f"cp={self.cp} with the {self.cp_layout} layout cuts it into {chunks} chunks" if self.cp > 1 else ""
            if self.sequence_sharded:
                why += (" and " if why else "") + f"sequence parallelism splits each over tp={self.tp}"
            raise ConfigError(f"seq_len={seq_len} must be a multiple of {unit} ({why}); use seq_len="
                              f"{-(-seq_len // unit) * unit}")
        if batch_size % (self.dp * grad_accum):
            raise ConfigError(
                f"batch_size={batch_size} is not divisible by dp*grad_accum={self.dp}*{grad_accum}; "
                f"use a batch size that is a multiple of {self.dp * grad_accum}"
            )


def _kv_ok(n_kv_heads: int, tp: int) -> bool:
    return n_kv_heads % tp == 0 or tp % n_kv_heads == 0


@dataclass(frozen=True)
class TrainConfig:
    """One training run: the model, its layout and the optimisation settings.

    batch_size is the global number of sequences per optimizer step, split over dp and over
    grad_accum micro-batches. Construction validates the whole combination.
    """

    model: ModelConfig = field(default_factory=lambda: PRESETS["tiny"])
    parallel: ParallelConfig = field(default_factory=lambda: ParallelConfig(tp=2))
    steps: int = 300
    batch_size: int = 16
    seq_len: int = 256
    grad_accum: int = 1
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup: int = 20
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    dtype: str = "float32"
    checkpoint: str = "none"  # activation checkpointing: none | attention | block
    nonfinite: str = "stop"  # a non-finite loss or gradient norm: stop the run, or skip the step
    save_every: int = 0  # write a checkpoint every N steps (0: only at the end)
    resume: str | None = None  # a checkpoint (or a folder with a `latest`) to continue from
    # A Hugging Face model folder to fine-tune: its weights start the run (unless resuming), its
    # tokenizer tokenises the text, and the final checkpoint is exported back to OUT/hf.
    init_from: str | None = None
    data: str | None = None
    pack_documents: bool = False  # the corpus's files as packed documents: masked, positions restarted
    out: str = "runs/default"
    sample_tokens: int = 200

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "seq_len", "grad_accum"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be a positive integer")
        if self.seq_len > self.model.max_seq_len:
            raise ConfigError(
                f"seq_len={self.seq_len} exceeds the model's max_seq_len={self.model.max_seq_len}; "
                f"lower --seq-len or raise max_seq_len"
            )
        if self.init_from is None and self.model.vocab_size < 256:  # a folder's tokenizer brings its own ids
            raise ConfigError(f"vocab_size={self.model.vocab_size} cannot hold the byte-level tokens (0..255) of the "
                              "training text; use vocab_size >= 256")
        for name, option in (("checkpoint", Recompute), ("dtype", DType), ("nonfinite", OnNonfinite)):
            object.__setattr__(self, name, option.parse(getattr(self, name), name).value)
        for name in ("lr", "min_lr", "weight_decay", "grad_clip"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ConfigError(f"{name}={value!r} must be a finite number >= 0")
        if self.lr == 0:
            raise ConfigError("lr=0 would never change the model; use a learning rate > 0 (e.g. 3e-3)")
        if self.min_lr > self.lr:
            raise ConfigError(f"min_lr={self.min_lr} exceeds lr={self.lr}; the schedule decays from lr to min_lr")
        for name in ("warmup", "save_every", "sample_tokens"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 0")
        if self.init_from is not None and self.pack_documents:
            raise ConfigError("pack_documents packs byte-level files, but init_from tokenises the text with the "
                              "folder's tokenizer; leave out pack_documents (--pack-documents) to fine-tune")
        self.parallel.check_model(self.model)
        self.parallel.check_batch(self.batch_size, self.seq_len, self.grad_accum)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        d = dict(d)
        d["model"] = ModelConfig(**d["model"])
        d["parallel"] = ParallelConfig(**d["parallel"])
        return cls(**d)

    def fingerprint(self) -> str:
        """A short hash every rank can compare to prove they run the same configuration."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]
