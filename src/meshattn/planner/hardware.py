"""GPU presets for the planner: peak compute, memory, link bandwidths and latencies.

Every figure is a plain number with its source beside it. Conventions:

- FLOP/s are *dense* bf16 tensor-core peaks. NVIDIA's datasheets print the sparse figure with an
  asterisk ("with sparsity"); the dense peak is half of it.
- Memory is the capacity the driver reports (`nvidia-smi --query-gpu=memory.total`, in MiB),
  converted to bytes as MiB * 2**20. The datasheets' "80GB" / "141GB" are marketing round numbers;
  what a job can allocate is the reported total minus the CUDA context, which the memory model
  accounts for separately.
- Bandwidths are bytes/s **per GPU per direction**. The datasheets quote NVLink as the total over
  both directions ("600GB/s" = 300 GB/s each way); we halve it. NICs are quoted in Gb/s per port
  and per direction (a 200 Gb/s HDR port sends 200 Gb/s while it receives 200 Gb/s); we divide by 8.
  The DGX systems give each GPU its own compute NIC, so the per-GPU network figure is one port.
- Latencies are per message hop (the alpha of an alpha-beta model), not per collective. They are
  taken from NCCL's own tuning model (src/graph/tuning.cc, `hwLat`, Ring/Simple protocol: the
  protocol large collectives use): 3.4 us per hop over NVLink and 9.6 us per hop over the network
  (NVIDIA/nccl at commit 01afd20a77b5804e0ecf1042509dd9d20ebf9e93; NCCL adds a base latency of
  8.4 us per collective on top, which the cost model may add). NCCL uses one table for every GPU
  generation, so all three presets share these two figures: an assumption, to be replaced by
  `--calibrate` measurements where they matter.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

_MIB = 2**20
_GB = 10**9  # datasheet bandwidths are decimal: 1 GB/s = 1e9 bytes/s
_GBIT = 10**9 / 8  # 1 Gb/s in bytes/s

# NCCL tuning.cc hwLat, Ring/Simple, microseconds per hop (see the module docstring).
_NVLINK_HOP_S = 3.4e-6
_NET_HOP_S = 9.6e-6


@dataclass(frozen=True)
class GPU:
    """One GPU model in its usual 8-GPU node, as the planner's cost model sees it.

    All bandwidths are bytes/s per GPU per direction; latencies are seconds per message hop.
    """

    name: str
    peak_flops: float  # dense bf16 tensor-core FLOP/s
    memory_bytes: int  # device memory the driver reports
    memory_bw: float  # device memory (HBM) bytes/s
    nvlink_bw: float  # intra-node (NVLink) bytes/s per GPU per direction
    network_bw: float  # inter-node bytes/s per GPU per direction (its own NIC)
    gpus_per_node: int
    intra_latency_s: float  # per hop inside a node
    inter_latency_s: float  # per hop between nodes

    def __post_init__(self) -> None:
        for name in ("peak_flops", "memory_bytes", "memory_bw", "nvlink_bw", "network_bw", "gpus_per_node",
                     "intra_latency_s", "inter_latency_s"):
            value = getattr(self, name)
            if not value > 0:
                raise ValueError(f"GPU {self.name!r}: {name}={value!r} must be positive")

    @property
    def memory_gib(self) -> float:
        return self.memory_bytes / 2**30


GPUS: dict[str, GPU] = {
    # NVIDIA A100 80GB SXM in a DGX A100.
    "a100-80gb": GPU(
        name="a100-80gb",
        # A100 datasheet (nvidia.com/a100): "BFLOAT16 Tensor Core 312 TFLOPS | 624 TFLOPS*", *sparsity.
        peak_flops=312e12,
        # A100 80GB HBM2e; nvidia-smi reports 81920 MiB for A100-SXM4-80GB.
        memory_bytes=81920 * _MIB,
        # A100 datasheet, A100 80GB SXM column: "GPU Memory Bandwidth 2,039GB/s".
        memory_bw=2039 * _GB,
        # A100 datasheet: "NVLink 600GB/s" (12 third-generation links, both directions) -> 300 GB/s each way.
        nvlink_bw=600 * _GB / 2,
        # DGX A100 datasheet: 8x single-port ConnectX-6 VPI 200 Gb/s HDR InfiniBand, one per GPU -> 25 GB/s.
        network_bw=200 * _GBIT,
        gpus_per_node=8,  # DGX A100: 8 GPUs
        intra_latency_s=_NVLINK_HOP_S,
        inter_latency_s=_NET_HOP_S,
    ),
    # NVIDIA H100 SXM5 80GB in a DGX H100.
    "h100": GPU(
        name="h100",
        # H100 datasheet (nvidia.com/h100), SXM column: "BF16 Tensor Core 1,979 teraFLOPS*", *sparsity -> 989.5.
        peak_flops=1979e12 / 2,
        # H100 SXM 80GB HBM3; nvidia-smi reports 81559 MiB for "NVIDIA H100 80GB HBM3".
        memory_bytes=81559 * _MIB,
        # H100 datasheet, SXM column: "GPU Memory Bandwidth 3.35TB/s".
        memory_bw=3350 * _GB,
        # H100 datasheet, SXM: "NVLink 900GB/s" (18 fourth-generation links, both directions) -> 450 GB/s each way.
        nvlink_bw=900 * _GB / 2,
        # DGX H100 datasheet: 8x single-port ConnectX-7 VPI, up to 400 Gb/s InfiniBand/Ethernet, one per GPU -> 50 GB/s.
        network_bw=400 * _GBIT,
        gpus_per_node=8,  # DGX H100: 8 GPUs
        intra_latency_s=_NVLINK_HOP_S,
        inter_latency_s=_NET_HOP_S,
    ),
}
# NVIDIA H200 SXM 141GB in a DGX H200: the H100 SXM's Hopper compute, NVLink and DGX network (H200
# datasheet, nvidia.com/h200, SXM column: "BF16 Tensor Core 1,979 TFLOPS*" with sparsity, "NVLink
# 900GB/s"; DGX H200 datasheet: 8 GPUs, 8x ConnectX-7 400 Gb/s); only the memory differs: 141GB
# HBM3e at "4.8TB/s" (H200 datasheet, SXM column), nvidia-smi reports 143771 MiB for "NVIDIA H200".
GPUS["h200"] = dataclasses.replace(GPUS["h100"], name="h200", memory_bytes=143771 * _MIB, memory_bw=4800 * _GB)


def gpu(name: str) -> GPU:
    """The preset called `name` (case-insensitive); ValueError listing the presets otherwise."""
    key = name.strip().lower()
    if key not in GPUS:
        raise ValueError(f"unknown GPU {name!r}; choose one of {', '.join(GPUS)}")
    return GPUS[key]
