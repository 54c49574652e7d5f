"""Local attention blocks that return the log-sum-exp, their backward, and the one merge helper.

Everything context parallelism computes is built from one operation: attend a block of queries
to a block of keys, either fully or causally on the diagonal, and return the output together with
the log-sum-exp (lse) of each query row's scores. Partial results over disjoint key sets are then
combined exactly by `merge_`. The backward of a block, given the *global* output and lse of its
query rows, yields that block's exact share of dq and its dk, dv.

Kernels: on CPU the fused flash kernel `_scaled_dot_product_flash_attention_for_cpu` (and its
backward), which returns the lse; elsewhere, or with kernel="math", an explicit fp32
implementation that is exact to rounding. Grouped KV heads are repeated for the kernel and their
gradients summed back.

Shapes: q (B, H, Sq, D); k, v (B, G, Sk, D) with H % G == 0; lse (B, H, Sq) in fp32.
"""

from __future__ import annotations

import math

import torch

KERNELS = ("auto", "flash", "math")


def _repeat_kv(t: torch.Tensor, n_rep: int) -> torch.Tensor:
    return t if n_rep == 1 else t.repeat_interleave(n_rep, dim=1)  # (B, G, S, D) -> (B, H, S, D)


def _sum_kv(t: torch.Tensor, n_rep: int) -> torch.Tensor:
    if n_rep == 1:
        return t
    B, H, S, D = t.shape
    return t.view(B, H // n_rep, n_rep, S, D).sum(dim=2)  # (B, H, S, D) -> (B, G, S, D)


def pick_kernel(kernel: str, q: torch.Tensor) -> str:
    if kernel not in KERNELS:
        raise ValueError(f"kernel={kernel!r} is unknown; choose one of {KERNELS}")
    if kernel == "auto":
        return "flash" if q.device.type == "cpu" else "math"
    if kernel == "flash" and q.device.type != "cpu":
        raise ValueError("kernel='flash' is the CPU fused kernel; on other devices use kernel='math' or 'auto'")
    return kernel


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


MATH_TILE = 1024  # query rows per tile of the math kernel: scores are (B, H, tile, Sk), never S x S


def _tiles(n: int):
    """Query-row tiles [a, b) (under a causal mask, tile rows only see keys [0, b))."""
    for a in range(0, n, MATH_TILE):
        yield a, min(a + MATH_TILE, n)


def _tile_scores(q, k, a, b, causal, scale, bias=None):
    f = _acc_dtype(q)
    kk = k[:, :, :b] if causal else k
    s = (q[:, :, a:b].to(f) @ kk.to(f).transpose(-1, -2)) * scale  # (B, H, b-a, Sk')
    if causal:
        rows = torch.arange(a, b, device=s.device)[:, None]
        s = s.masked_fill(torch.arange(b, device=s.device)[None, :] > rows, float("-inf"))
    if bias is not None:
        s = s + bias[:, :, a:b, : s.shape[-1]].to(f)  # (B | 1, 1, b-a, Sk): 0 or -inf
    return s


def _finite(lse: torch.Tensor) -> torch.Tensor:
    """lse with the -inf of rows that see no key replaced by 0, so exp(s - lse) is 0, not nan."""
    return torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)


def _math_forward(q, k, v, causal, scale, bias=None):
    """Exact attention in fp32 (fp64 for fp64 inputs), tiled over query rows; out stays in that
    precision so the fp32 merge sees unrounded partial results."""
    f = _acc_dtype(q)
    out = torch.empty(q.shape, dtype=f, device=q.device)
    lse = torch.empty(q.shape[:3], dtype=f, device=q.device)
    for a, b in _tiles(q.shape[2]):
        s = _tile_scores(q, k, a, b, causal, scale, bias)
        lse[:, :, a:b] = torch.logsumexp(s, dim=-1)
        out[:, :, a:b] = torch.exp(s - _finite(lse[:, :, a:b])[..., None]) @ v[:, :, : s.shape[-1]].to(f)
    return out, lse


def _math_backward(dout, q, k, v, out, lse, causal, scale, bias=None):
    f = _acc_dtype(q)
    dq = torch.empty(q.shape, dtype=f, device=q.device)
    dk = torch.zeros(k.shape, dtype=f, device=k.device)
    dv = torch.zeros(v.shape, dtype=f, device=v.device)
    for a, b in _tiles(q.shape[2]):
        s = _tile_scores(q, k, a, b, causal, scale, bias)
        n = s.shape[-1]
        p = torch.exp(s - _finite(lse[:, :, a:b]).to(f)[..., None])  # (B, H, tile, n), globally normalised
        dof = dout[:, :, a:b].to(f)
        dv[:, :, :n] += p.transpose(-1, -2) @ dof
        dp = dof @ v[:, :, :n].to(f).transpose(-1, -2)
        delta = (dof * out[:, :, a:b].to(f)).sum(dim=-1, keepdim=True)  # rowsum(dout * out), global out
        ds = p * (dp - delta)
        dq[:, :, a:b] = ds @ k[:, :, :n].to(f) * scale
        dk[:, :, :n] += ds.transpose(-1, -2) @ q[:, :, a:b].to(f) * scale
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def block_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float,
                  kernel: str = "auto", bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q to k/v (causal: square block on the diagonal) -> (out, lse fp32).

    bias: an additive mask (B or 1, 1, Sq, Sk) of 0 and -inf in q's dtype (masked blocks). A row
    that sees no key returns out = 0 and lse = -inf, so merging it changes nothing.
    out is in q's dtype from the fused kernel and in fp32 from the math kernel; float64 inputs
    keep a float64 lse, so float64 runs stay exact to ~1e-15.
    """
    n_rep = q.shape[1] // k.shape[1]
    k, v = _repeat_kv(k, n_rep), _repeat_kv(v, n_rep)
    if pick_kernel(kernel, q) == "flash":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, attn_mask=bias,
                                                                              scale=scale)
        if bias is not None:  # the kernel reports lse = 0 for a row with no key
            lse = lse.masked_fill(torch.isneginf(bias.amax(-1)), float("-inf"))
    else:
        out, lse = _math_forward(q, k, v, causal, scale, bias)
    return out, lse if q.dtype == torch.float64 else lse.float()


def block_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                   lse: torch.Tensor, causal: bool, scale: float, kernel: str = "auto",
                   bias: torch.Tensor | None = None):
    """dq, dk, dv of one block, given the global out and lse of its query rows (and the block's
    additive mask, as in block_forward). Rows that see no key at all get zero gradients."""
    n_rep = q.shape[1] // k.shape[1]
    ke, ve = _repeat_kv(k, n_rep), _repeat_kv(v, n_rep)
    if pick_kernel(kernel, q) == "flash":
        # The CPU kernel wants out and dout in the inputs' dtype; it reads strided slices as they
        # are, so no contiguous copies are made here.
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout.to(q.dtype), q, ke, ve, out.to(q.dtype), lse if bias is None else _finite(lse), 0.0, causal,
            attn_mask=bias, scale=scale)
    else:
        dq, dk, dv = _math_backward(dout, q, ke, ve, out, lse, causal, scale, bias)
    return dq, _sum_kv(dk, n_rep), _sum_kv(dv, n_rep)


def merge_(out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor, block_lse: torch.Tensor) -> None:
    """Fold one partial result into a running one, in place (out, lse are the fp32 accumulators;
    block_out is consumed as scratch).

    Softmax over the union of two disjoint key sets A and B, per query row:
        lse   = log(exp(lse_A) + exp(lse_B))
        out   = exp(lse_A - lse) * out_A + exp(lse_B - lse) * out_B
    since out_X = sum_{j in X} exp(s_j - lse_X) v_j. A row that has seen no key yet has
    lse = -inf and out = 0; where both sides are -inf the weights would be exp(-inf + inf) = nan,
    so those rows keep lse = -inf and out = 0.
    """
    new_lse = torch.logaddexp(lse, block_lse)  # (B, H, S)
    seen = torch.isfinite(new_lse)
    safe = torch.where(seen, new_lse, torch.zeros_like(new_lse))
    w_old = torch.where(seen, torch.exp(lse - safe), torch.zeros_like(lse))[..., None]
    w_new = torch.where(seen, torch.exp(block_lse - safe), torch.zeros_like(lse))[..., None]
    block_out = block_out.to(out.dtype)  # a copy only for low-precision blocks
    out.mul_(w_old).add_(block_out.mul_(w_new))  # block_out is the caller's scratch: scaled in place
    lse.copy_(new_lse)


def default_scale(head_dim: int, scale: float | None) -> float:
    return 1.0 / math.sqrt(head_dim) if scale is None else scale
