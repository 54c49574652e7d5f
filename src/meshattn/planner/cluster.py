"""How long work takes on a cluster: compute, memory traffic and collectives, in seconds.

Two clusters answer the same five questions:

    GpuCluster   a GPU preset (hardware.py) at the fitted efficiencies (stack.Efficiency)
    HostCluster  this machine, from `meshattn plan --calibrate`'s measurements (calibrate.py):
                 `world` gloo processes sharing its cores, as `meshattn bench` runs them

Collective time is the alpha-beta model: hops x latency + per-rank wire bytes / bandwidth,
where the wire bytes of a ring algorithm are the payload (comm.py's convention: the reduced
tensor, the gathered output, the unscattered input, the exchanged tensor) times
    all-reduce 2 (p-1)/p     all-gather, reduce-scatter, all-to-all (p-1)/p     send/recv 1
and the hops 2 (p-1), p-1 and 1. A group that spans nodes runs at the network's per-GPU bandwidth
(each GPU of a DGX has its own NIC) and latency; one inside a node at NVLink's.
"""

from __future__ import annotations

from ..comm import _WIRE_FACTOR
from .hardware import GPU
from .stack import Efficiency

_HOPS = {
    "all_reduce": lambda p: 2 * (p - 1),
    "all_gather": lambda p: p - 1,
    "reduce_scatter": lambda p: p - 1,
    "all_to_all": lambda p: p - 1,
    "send_recv": lambda p: 1,
}


class GpuCluster:
    """`gpu`-class GPUs, gpus_per_node to a node, at the efficiencies `eff`."""

    def __init__(self, gpu: GPU, eff: Efficiency | None = None):
        self.gpu, self.eff = gpu, eff or Efficiency()
        self.name, self.gpus_per_node, self.memory_bytes = gpu.name, gpu.gpus_per_node, gpu.memory_bytes
        self.peak_flops = gpu.peak_flops
        self.overlap = self.eff.overlap

    def matmul_s(self, flops: float) -> float:
        return flops / (self.gpu.peak_flops * self.eff.matmul)

    def attention_s(self, flops: float) -> float:
        return flops / (self.gpu.peak_flops * self.eff.attention)

    def traffic_s(self, nbytes: float) -> float:
        return nbytes / (self.gpu.memory_bw * self.eff.memory)

    def collective_s(self, kind: str, p: int, payload: float, inter_node: bool) -> float:
        if p <= 1 or payload <= 0:
            return 0.0
        bw = (self.gpu.network_bw if inter_node else self.gpu.nvlink_bw) * self.eff.link
        lat = self.gpu.inter_latency_s if inter_node else self.gpu.intra_latency_s
        return _HOPS[kind](p) * lat + _WIRE_FACTOR[kind](p) * payload / bw


class HostCluster:
    """This machine as `meshattn bench` uses it: `world` processes, each with cores // world
    threads (the launcher's rule), from a Calibration. Compute runs at the rate measured with all
    `world` ranks computing at once (calibrate.Calibration.rank_compute_seconds; one process: all
    cores), memory traffic at the copy bandwidth measured the same way, collectives at the gloo
    fits. One node; measured rates are achieved rates, so no efficiency applies."""

    def __init__(self, cal, world: int):
        self.cal, self.world = cal, max(world, 1)
        self.name, self.gpus_per_node = "this", self.world
        self.memory_bytes = _host_memory() // self.world
        self.peak_flops = 1.0 / self._compute_s(1.0, "matmul")
        self.overlap = 0.5  # gloo runs on its own threads, but they share the cores with compute (assumed)

    def _compute_s(self, flops: float, kind: str) -> float:
        if self.world == 1:
            return self.cal.compute_seconds(flops, self.cal.cores, kind)
        return self.cal.rank_compute_seconds(flops, self.world, kind)

    def matmul_s(self, flops: float) -> float:
        return self._compute_s(flops, "matmul")

    def attention_s(self, flops: float) -> float:
        return self._compute_s(flops, "attention")

    def traffic_s(self, nbytes: float) -> float:
        if self.world > 1 and self.cal.concurrent_flops.get("copy"):
            return self.cal.rank_compute_seconds(nbytes, self.world, "copy")
        return nbytes * self.world / self.cal.memory_bw  # the machine's bandwidth, shared

    def collective_s(self, kind: str, p: int, payload: float, inter_node: bool) -> float:
        if p <= 1 or payload <= 0:
            return 0.0
        return self.cal.collective_seconds(kind, p, payload)


def _host_memory() -> int:
    """MemTotal of /proc/meminfo in bytes (0 where it cannot be read)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0
