"""Published training runs the cost model must reproduce, and the comparison.

Every figure is copied from docs/published_runs.md, which gives each one's source and how it was
verified. Throughput rows: Narayanan et al. 2021 (SC'21) Tables 1 and 2; Korthikanti et al. 2022
Table 5 (and the runs their text states: 530B with 8-way data parallelism, sec. 6.3; 530B with
full recomputation on 2240 GPUs, the abstract). Activation-memory rows: Korthikanti Figure 7
(per-layer activations as a share of the tensor-parallel baseline, eq. 2) and Figure 1 (the first
pipeline stage's activations in GiB), compared with the paper's formula values, which the
digitized bars match (the figures print no numbers).

The model: Megatron's GPT (MHA, GELU, d_ff = 4h, LayerNorm, learned positions, biases, tied
embeddings), s = 2048, V = 51200, on DGX A100 nodes, run by the MEGATRON stack (ZeRO-3 rows:
DeepSpeed's, which prefetches and overlaps its gathers). The paper's TFLOP/s count eq. 3 (full
recomputation FLOPs, every attention pair); iteration times are converted to the same count.

CALIBRATION names the rows the efficiency constants were fitted on (at most a third of the
throughput rows); every other row must land within 20% (throughput) and every memory row within
10%.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import ModelConfig, ParallelConfig
from .cluster import GpuCluster
from .estimate import GIB, Job, estimate
from .flops import model_flops_korthikanti, narayanan_flops
from .hardware import gpu
from .layout import Plan
from .memory import activation_bytes_per_layer, korthikanti_activation_bytes
from .stack import MEGATRON, Efficiency, Stack

SEQ, VOCAB = 2048, 51200
DEEPSPEED = MEGATRON.replace(name="deepspeed-zero3", grad_bytes=2, optim_bytes=12, overlap_dp=True)


def gpt(hidden: int, heads: int, layers: int) -> ModelConfig:
    return ModelConfig(d_model=hidden, n_heads=heads, n_layers=layers, vocab_size=VOCAB, max_seq_len=SEQ,
                       norm="layernorm", position="learned", activation="gelu", bias=True, tie_embeddings=True)


@dataclass(frozen=True)
class Run:
    key: str  # short name used in tables and CALIBRATION
    source: str
    model: ModelConfig
    tp: int
    pp: int
    gpus: int
    batch: int
    micro_batch: int
    interleave: int
    recompute: str
    sequence_parallel: bool
    stack: Stack
    tflops: float  # published per-GPU TFLOP/s, or the one implied by a published iteration time / MFU
    shard: str = "none"
    published: str = ""  # the figure as printed

    @property
    def dp(self) -> int:
        return self.gpus // (self.tp * self.pp)

    def plan(self) -> Plan:
        par = ParallelConfig(dp=self.dp, tp=self.tp, sequence_parallel=self.sequence_parallel, vocab_parallel="on")
        return Plan(par, pp=self.pp, recompute=self.recompute, shard=self.shard, micro_batch=self.micro_batch,
                    interleave=self.interleave)


def _eq3_tflops(model: ModelConfig, batch: int, gpus: int, seconds: float) -> float:
    return narayanan_flops(batch, SEQ, model.n_layers, model.d_model, VOCAB) / (gpus * seconds) / 1e12


def _runs() -> list[Run]:
    runs = []
    # Narayanan et al. 2021, Table 1 (columns from the paper; micro-batch, interleaving and DDP kind
    # from the authors' examples/sc21/run_table_1.sh: DDP=torch (overlapped) for t*p <= 8).
    table1 = [  # params, heads, h, layers, t, p, n, B, TFLOP/s, micro-batch, layers per virtual stage
        ("1.7B", 24, 2304, 24, 1, 1, 32, 512, 137, 16, None), ("3.6B", 32, 3072, 30, 2, 1, 64, 512, 138, 16, None),
        ("7.5B", 32, 4096, 36, 4, 1, 128, 512, 142, 16, None), ("18.4B", 48, 6144, 40, 8, 1, 256, 1024, 135, 8, None),
        ("39.1B", 64, 8192, 48, 8, 2, 512, 1536, 138, 4, None), ("76.1B", 80, 10240, 60, 8, 4, 1024, 1792, 140, 2, 5),
        ("145.6B", 96, 12288, 80, 8, 8, 1536, 2304, 148, 2, 5),
        ("310.1B", 128, 16384, 96, 8, 16, 1920, 2160, 155, 1, 3),
        ("529.6B", 128, 20480, 105, 8, 35, 2520, 2520, 163, 1, 1),
        ("1008B", 160, 25600, 128, 8, 64, 3072, 3072, 163, 1, None),
    ]
    for name, a, h, L, t, p, n, B, X, b, per_virtual in table1:
        v = L // p // per_virtual if per_virtual else 1
        stack = MEGATRON.replace(overlap_dp=t * p <= 8)
        runs.append(Run(f"N1-{name}", "Narayanan 2021 Table 1", gpt(h, a, L), t, p, n, B, b, v, "full", False, stack,
                        X, published=f"{X} TFLOP/s"))
    # Narayanan et al. 2021, Table 2: ZeRO-3 without model parallelism, and PTD-P (t x p inferred: 8 x 12, 8 x 35).
    for size, (a, h, L), zero, ptdp in (
            ("174.6B", (96, 12288, 96), [(1536, 384, 4, 144), (1536, 768, 2, 88), (1536, 1536, 1, 44)],
             [(1536, 384, 153), (1536, 768, 149), (1536, 1536, 141)]),
            ("529.6B", (128, 20480, 105), [(2560, 640, 4, 138), (2240, 1120, 2, 98), (2240, 2240, 1, 48)],
             [(2240, 560, 171), (2240, 1120, 167), (2240, 2240, 159)])):
        for B, n, b, X in zero:
            runs.append(Run(f"N2-ZeRO3-{size}-{n}", "Narayanan 2021 Table 2", gpt(h, a, L), 1, 1, n, B, b, 1, "full",
                            False, DEEPSPEED, X, shard="zero3", published=f"{X} TFLOP/s"))
        p = 12 if size == "174.6B" else 35
        for B, n, X in ptdp:
            runs.append(Run(f"N2-PTDP-{size}-{n}", "Narayanan 2021 Table 2", gpt(h, a, L), 8, p, n, B, 1, 1, "full",
                            False, MEGATRON, X, published=f"{X} TFLOP/s"))
    # Korthikanti et al. 2022, Tables 3 and 5 (m = 3 interleaving stages for 175B and 530B).
    for name, a, h, L, p, n, B, b, v, full_s, present_s in (
            ("22B", 64, 6144, 48, 1, 8, 4, 4, 1, 1.42, 1.10), ("175B", 96, 12288, 96, 8, 64, 64, 1, 3, 18.13, 13.75),
            ("530B", 128, 20480, 105, 35, 280, 280, 1, 3, 49.05, 37.83),
            ("1T", 160, 25600, 128, 64, 512, 512, 1, 1, 94.42, 71.49)):
        model = gpt(h, a, L)
        runs.append(Run(f"K5-{name}-full", "Korthikanti 2022 Table 5", model, 8, p, n, B, b, v, "full", False,
                        MEGATRON, _eq3_tflops(model, B, n, full_s), published=f"{full_s} s"))
        runs.append(Run(f"K5-{name}-sp-selective", "Korthikanti 2022 Table 5", model, 8, p, n, B, b, v, "selective",
                        True, MEGATRON, _eq3_tflops(model, B, n, present_s), published=f"{present_s} s"))
    model = gpt(20480, 128, 105)
    runs.append(Run("K-530B-dp8", "Korthikanti 2022 sec. 6.3", model, 8, 35, 2240, 2240, 1, 3, "selective", True,
                    MEGATRON, _eq3_tflops(model, 2240, 2240, 39.15), published="39.15 s"))
    mfu_s = model_flops_korthikanti(2240, SEQ, 105, 20480, VOCAB) / (2240 * 312e12 * 0.421)
    runs.append(Run("K-530B-2240-full", "Korthikanti 2022 abstract", model, 8, 35, 2240, 2240, 1, 3, "full", False,
                    MEGATRON, _eq3_tflops(model, 2240, 2240, mfu_s), published="MFU 42.1%"))
    return runs


RUNS = _runs()
# The rows the four efficiency constants were fitted on (10 of 32): small and large GEMMs, both
# recomputation modes, pipelines with and without interleaving, and one ZeRO-3 run.
CALIBRATION = ("N1-1.7B", "N1-18.4B", "N1-529.6B", "N2-ZeRO3-174.6B-768", "K5-22B-full", "K5-175B-sp-selective")


def predict(run: Run, eff: Efficiency | None = None) -> dict:
    """The cost model's figures for one run, on A100-80GB nodes."""
    est = estimate(run.model, Job(SEQ, run.batch, causal=True), run.plan(), GpuCluster(gpu("a100-80gb"), eff),
                   run.stack)
    tflops = _eq3_tflops(run.model, run.batch, run.gpus, est.step_time_s)
    return {"key": run.key, "source": run.source, "published": run.published, "published_tflops": run.tflops,
            "predicted_tflops": tflops, "ratio": tflops / run.tflops, "step_time_s": est.step_time_s,
            "calibration": run.key in CALIBRATION, "fits": est.fits,
            "memory_gib": est.memory_bytes["total"] / GIB}


# Korthikanti et al. 2022 Figure 7: per-layer activations as % of eq. 2 (the TP baseline), t = 8;
# the bars as digitized (+SP, +selective, +SP+selective, full recompute).
FIGURE7 = {"22B": ((64, 6144, 48), (66.6, 49.3, 16.1, 7.4)), "175B": ((96, 12288, 96), (61.8, 56.4, 18.4, 8.4)),
           "530B": ((128, 20480, 105), (58.2, 61.8, 20.2, 9.2)), "1T": ((160, 25600, 128), (58.2, 61.8, 20.2, 9.2))}
# ... and Figure 1: first-stage activations in GiB, the paper's formula value and the digitized bar.
FIGURE1 = {  # name: (micro-batch, pp, interleave, (baseline formula, bar), (present work formula, bar))
    "22B": (4, 1, 1, (59.25, 59.2), (9.56, 9.5)), "175B": (1, 8, 3, (66.84, 66.8), (12.35, 12.2)),
    "530B": (1, 35, 3, (114.02, 113.6), (23.08, 22.9)), "1T": (1, 64, 1, (131.25, 131.2), (26.56, 26.5)),
}


def memory_rows() -> list[dict]:
    """Predicted vs published activation memory: Figure 7's four bars per model and Figure 1's
    two activation bars per model, against the paper's formula value ("published") and the bar
    as digitized (the planner's activation_bytes_per_layer for Megatron's GPT,
    with dropout, unfused attention, 16-bit activations and no small terms)."""
    rows = []
    for name, ((a, h, L), bars) in FIGURE7.items():
        model = gpt(h, a, L)

        def per_layer(sp: bool, recompute: str, b: int = 1) -> int:
            return activation_bytes_per_layer(model, b, SEQ, 8, sp, recompute, dtype_bytes=2, dropout=True,
                                              attention="unfused", residual_bytes=2, small_terms=False)["total"]

        base = korthikanti_activation_bytes(SEQ, 1, h, a, 8)
        for (label, sp, rc), bar in zip((("+SP", True, "none"), ("+selective", False, "selective"),
                                          ("+SP+selective", True, "selective"), ("full recompute", False, "full")),
                                         bars):
            paper = korthikanti_activation_bytes(SEQ, 1, h, a, 8, sp, rc) / base * 100
            rows.append({"key": f"K7-{name}-{label}", "source": "Korthikanti 2022 Figure 7", "published": paper,
                         "digitized": bar, "predicted": per_layer(sp, rc) / base * 100, "unit": "% of baseline"})
        b, p, v, baseline, present = FIGURE1[name]
        stage = L * (1 + (p - 1) / (p * v) if v > 1 else 1)  # layers' worth of activations on the first stage
        for label, sp, rc, (paper, bar) in (("baseline", False, "none", baseline),
                                            ("present work", True, "selective", present)):
            rows.append({"key": f"K1-{name}-{label}", "source": "Korthikanti 2022 Figure 1", "published": paper,
                         "digitized": bar, "predicted": per_layer(sp, rc, b) * stage / GIB, "unit": "GiB"})
    for r in rows:
        r["ratio"] = r["predicted"] / r["published"]
        r["ratio_digitized"] = r["predicted"] / r["digitized"]
    return rows


def throughput_rows(eff: Efficiency | None = None) -> list[dict]:
    return [predict(run, eff) for run in RUNS]
