"""What bench and profile report of a mixture of experts' routing, from the MoE layers' stats.

Each MoE layer's forward appends to the model's stats (model/moe.py, parallel/moe.py) the batch's
tokens per expert "counts" (E,), and, in a parallel model, "sent" (this rank's routed slots) and
"received" (the slots this rank's experts computed). A rank keeps, per MoE layer, plain numbers
of these (`layer_view`); the parent combines every rank's view (`summary`):

    expert_counts     tokens (routing slots) per expert per layer: the batch's, every rank alike
    expert_imbalance  the busiest expert's slots over the mean, worst layer (1 = uniform routing)
    received, sent    per rank, per layer
    rank_imbalance    per layer, max over ranks / mean of the slots each rank's experts computed;
                      rank_imbalance_max is the worst layer's (1 = every rank equally busy). With
                      ep = 1 each rank computes its own slots, so it measures the token split.

The reference model (the single layout) reports counts only: its one rank sends and computes
every slot.
"""

from __future__ import annotations

import statistics

from ..model.moe import expert_imbalance


def layer_view(layers: list) -> dict:
    """One rank's plain view of a forward's MoE stats entries (one per MoE layer)."""
    counts = [s["counts"].tolist() for s in layers]  # (layers, E)
    return {"counts": counts,
            "sent": [int(s.get("sent", sum(c))) for s, c in zip(layers, counts)],
            "received": [int(s.get("received", sum(c))) for s, c in zip(layers, counts)]}


def rank_imbalance(received: list[list[int]]) -> list[float]:
    """Per layer: max over ranks / mean of the slots computed; received (ranks, layers)."""
    return [max(layer) / max(statistics.mean(layer), 1e-12) for layer in zip(*received)]


def summary(views: list[dict]) -> dict:
    """Every rank's layer_view (in rank order) -> the routing figures of the module doc."""
    received = [v["received"] for v in views]
    per_layer = rank_imbalance(received)
    counts = views[0]["counts"]
    return {"expert_counts": counts, "expert_imbalance": expert_imbalance(counts),
            "sent": [v["sent"] for v in views], "received": received,
            "rank_imbalance": per_layer, "rank_imbalance_max": max(per_layer)}
