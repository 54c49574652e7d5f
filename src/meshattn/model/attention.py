"""Local attention blocks that return the log-sum-exp, their backward, and the one merge helper.

Everything context parallelism computes is built from one operation: attend a block of queries
to a block of keys, either fully or causally on the diagonal, and return the output together with
the log-sum-exp (lse) of each query row's scores. Partial results over disjoint key sets are then
combined exactly by `merge_`. The backward of a block, given the *global* output and lse of its
query rows, yields that block's exact share of dq and its dk, dv.

Kernels (`KERNELS`; `pick_kernel` chooses one per call, `auto_kernel` is the rule itself):

    flash      the device's fused flash kernel: on CPU `_scaled_dot_product_flash_attention_for_cpu`
               (any dtype, with a block mask); on CUDA `_scaled_dot_product_flash_attention`
               (fp16/bf16, head dim a multiple of 8 up to 256, no mask, sm80+).
    efficient  CUDA's memory-efficient kernel `_scaled_dot_product_efficient_attention` with
               compute_log_sumexp (fp16/bf16/fp32, takes the block mask as attn_bias).
    math       an explicit implementation in fp32 (fp64 for fp64 inputs), tiled over query rows,
               exact to rounding; the fallback on every device.

"auto" is, per call: fp64 -> math anywhere; CPU -> flash; CUDA -> flash where it applies, else
efficient where it applies (fp32, a masked block, a head dim flash does not take), else math;
other devices -> math. "flash" asks for the device's flash kernel (on CUDA a masked block, which
flash cannot take, runs on the efficient kernel); "math" forces the exact kernel. Every fused
kernel also has an explicit backward op that takes the lse, which is what lets the backward run
with the global out and lse. Fused kernels return out in q's dtype (the merge upcasts); the lse
is fp32 (fp64 for fp64 inputs) from every kernel.

Precision: the math kernel and the merge run with autocast disabled, so under any autocast
(CPU bf16 included) their matmuls, softmax statistics and accumulators stay fp32; fused kernels
run in their inputs' dtype with fp32 statistics of their own. Grouped KV heads are repeated for
the kernel and their gradients summed back. A query row that sees no key (its row of the block
mask all -inf) gets out = 0, lse = -inf and zero gradients from every kernel.

Shapes: q (B, H, Sq, D); k, v (B, G, Sk, D) with H % G == 0; lse (B, H, Sq); bias (B | 1, 1, Sq, Sk).
"""

from __future__ import annotations

import contextlib
import functools
import math

import torch

KERNELS = ("auto", "flash", "efficient", "math")

HALF = (torch.float16, torch.bfloat16)
FUSED_MAX_HEAD_DIM = 256  # the largest head dim given to a fused CUDA kernel (flash's own limit)
LSE_ALIGN = 32  # the efficient kernel's lse rows are padded to a multiple of this (its backward reads them)
BIAS_ALIGN = 16  # the efficient kernel wants the mask's row stride a multiple of this many elements


def _repeat_kv(t: torch.Tensor, n_rep: int) -> torch.Tensor:
    return t if n_rep == 1 else t.repeat_interleave(n_rep, dim=1)  # (B, G, S, D) -> (B, H, S, D)


def _sum_kv(t: torch.Tensor, n_rep: int) -> torch.Tensor:
    if n_rep == 1:
        return t
    B, H, S, D = t.shape
    return t.view(B, H // n_rep, n_rep, S, D).sum(dim=2)  # (B, H, S, D) -> (B, G, S, D)


# -- kernel choice ------------------------------------------------------------------------------

def cuda_kernel(dtype: torch.dtype, head_dim: int, has_bias: bool, capability: tuple[int, int] = (9, 0)) -> str:
    """The kernel "auto" runs a CUDA block on, from what the fused kernels take (a pure function):

    flash      fp16/bf16, head dim a multiple of 8 and <= 256, no block mask, compute capability
               8.0+ (PyTorch's flash kernel needs Ampere; head dims above 192 only on sm80/sm90 in
               its backward);
    efficient  fp16/bf16/fp32 with the head dim a multiple of 16 bytes (8 or 4 elements) and
               <= 256, sm50+: fp32, masked blocks, and what flash does not take;
    math       anything else (fp64, odd head dims).
    """
    if dtype not in (*HALF, torch.float32) or not 0 < head_dim <= FUSED_MAX_HEAD_DIM:
        return "math"
    half = dtype in HALF
    big_dim_ok = head_dim <= 192 or capability in ((8, 0), (9, 0))
    if half and not has_bias and head_dim % 8 == 0 and capability >= (8, 0) and big_dim_ok:
        return "flash"
    if head_dim % (8 if half else 4) == 0 and capability >= (5, 0):
        return "efficient"
    return "math"


def auto_kernel(device_type: str, dtype: torch.dtype, head_dim: int, has_bias: bool = False,
                capability: tuple[int, int] = (9, 0)) -> str:
    """kernel="auto" as a pure function of the block: fp64 -> math on every device; CPU -> its
    fused flash kernel; CUDA -> `cuda_kernel`; any other device -> math."""
    if dtype == torch.float64:
        return "math"
    if device_type == "cpu":
        return "flash"
    if device_type == "cuda":
        return cuda_kernel(dtype, head_dim, has_bias, capability)
    return "math"


@functools.lru_cache(maxsize=None)
def _capability(index: int | None) -> tuple[int, int]:
    return tuple(torch.cuda.get_device_capability(index))


def resolve_kernel(kernel: str, device_type: str, dtype: torch.dtype, head_dim: int, has_bias: bool = False,
                   capability: tuple[int, int] = (9, 0)) -> str:
    """The kernel ("flash", "efficient" or "math") a block runs on for the kernel asked for (a
    pure function of the block); ValueError for a kernel that is unknown or cannot run it."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel={kernel!r} is unknown; choose one of {KERNELS}")
    if kernel == "math":
        return "math"
    if kernel == "auto":
        return auto_kernel(device_type, dtype, head_dim, has_bias, capability)
    if device_type == "cpu":
        if kernel == "efficient":
            raise ValueError("kernel='efficient' is a CUDA kernel; on CPU use 'auto', 'flash' (the CPU fused kernel) "
                             "or 'math'")
        return "flash"
    if device_type != "cuda":
        raise ValueError(f"kernel={kernel!r}: no fused kernel on {device_type}; use kernel='math' or 'auto'")
    if cuda_kernel(dtype, head_dim, kernel == "efficient", capability) != kernel:
        auto = auto_kernel(device_type, dtype, head_dim, has_bias, capability)
        raise ValueError(f"kernel={kernel!r} does not take {dtype} with head dim {head_dim} on compute capability "
                         f"{capability[0]}.{capability[1]}; use kernel='auto' (here: {auto}) or 'math'")
    if has_bias:  # flash takes no block mask: a masked block runs on the efficient kernel
        return cuda_kernel(dtype, head_dim, True, capability)
    return kernel


def pick_kernel(kernel: str, q: torch.Tensor, bias: torch.Tensor | None = None) -> str:
    """The kernel ("flash", "efficient" or "math") that runs this block (`resolve_kernel` on q's
    device, dtype and head dim, and the GPU's compute capability)."""
    cap = _capability(q.device.index) if q.device.type == "cuda" else (9, 0)
    return resolve_kernel(kernel, q.device.type, q.dtype, q.shape[-1], bias is not None, cap)


# -- the exact kernel -----------------------------------------------------------------------------

def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _exact(device: torch.device):
    """Autocast off for the device's type while it is on: what runs inside keeps the dtypes it is
    given. (Nothing to do, and no cost, when no autocast is on.)"""
    try:
        on = torch.is_autocast_enabled(device.type)
    except (RuntimeError, TypeError, ValueError):  # a device type autocast does not know has none
        return contextlib.nullcontext()
    return torch.autocast(device.type, enabled=False) if on else contextlib.nullcontext()


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
    precision so the fp32 merge sees unrounded partial results. Run under `_exact`: an autocast
    would otherwise round the score and value matmuls to its low precision."""
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


# -- the fused CUDA kernels -----------------------------------------------------------------------
# Both take (B, H, S, D) views whose last dim is contiguous and whose other strides and offset
# keep 16-byte aligned rows (slices of a contiguous tensor along S with D a multiple of 8 (4 for
# fp32) do); dropout is 0, so their philox seed/offset arguments are never read and go as None.

def _aligned(t: torch.Tensor) -> torch.Tensor:
    """t itself if the fused kernels can read it in place, else a contiguous copy."""
    n = 16 // t.element_size()
    if t.stride(-1) == 1 and t.storage_offset() % n == 0 and all(s % n == 0 for s in t.stride()[:-1]):
        return t
    return t.contiguous()


def _bshd(t: torch.Tensor) -> torch.Tensor:
    """t (B, H, S, D) laid out (B, S, H, D) in memory (a copy only when it is not)."""
    return t if t.transpose(1, 2).is_contiguous() else t.transpose(1, 2).contiguous().transpose(1, 2)


def _attn_bias(bias: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The block mask (B | 1, 1, Sq, Sk) as the efficient kernel takes it: (B, H, Sq, Sk) in q's
    dtype, broadcast over heads (and batch) by stride 0, each row padded to a multiple of
    BIAS_ALIGN elements so every stride is aligned (what SDPA's own mask preprocessing does)."""
    B, H, Sq, _ = q.shape
    Sk = k.shape[2]
    pad = -(-Sk // BIAS_ALIGN) * BIAS_ALIGN
    buf = torch.zeros((bias.shape[0], 1, Sq, pad), dtype=q.dtype, device=q.device)
    buf[..., :Sk].copy_(bias)
    return buf[..., :Sk].expand(B, H, Sq, Sk)


def _dead_rows(bias: torch.Tensor | None) -> torch.Tensor | None:
    """(B | 1, 1, Sq) bool: rows of the block mask that see no key (None without a mask)."""
    return None if bias is None else torch.isneginf(bias.amax(-1))


def _flash_cuda_forward(q, k, v, causal, scale):
    res = torch.ops.aten._scaled_dot_product_flash_attention(_aligned(q), _aligned(k), _aligned(v), 0.0, causal,
                                                             False, scale=scale)
    return res[0], res[1]  # out (B, H, Sq, D) in q's dtype, lse (B, H, Sq) fp32


def _flash_cuda_backward(dout, q, k, v, out, lse, causal, scale):
    # The kernel reads lse as a contiguous (B, H, Sq) array; out and dout in q's dtype (it makes
    # them contiguous itself). cum_seq_q/k None: the dense (not varlen) path.
    return torch.ops.aten._scaled_dot_product_flash_attention_backward(
        dout.to(q.dtype), _aligned(q), _aligned(k), _aligned(v), out.to(q.dtype), _finite(lse).float().contiguous(),
        None, None, q.shape[2], k.shape[2], 0.0, causal, None, None, scale=scale)


def _efficient_cuda_forward(q, k, v, causal, scale, bias):
    attn_bias = None if bias is None else _attn_bias(bias, q, k)
    out, lse, _, _ = torch.ops.aten._scaled_dot_product_efficient_attention(
        _aligned(q), _aligned(k), _aligned(v), attn_bias, True, 0.0, causal, scale=scale)
    lse = lse[:, :, : q.shape[2]]  # its rows come padded to a multiple of LSE_ALIGN
    dead = _dead_rows(bias)
    if dead is not None:  # rows with no key: out 0 and lse -inf whatever the kernel's version reports
        out = torch.where(dead[..., None], torch.zeros((), dtype=out.dtype, device=out.device), out)
        lse = lse.masked_fill(dead, float("-inf"))
    return out, lse


def _efficient_cuda_backward(dout, q, k, v, out, lse, causal, scale, bias):
    B, H, Sq, _ = q.shape
    # The backward reads lse rows up to the next multiple of LSE_ALIGN (+inf there: no weight),
    # as a contiguous (B, H, padded) array, and out as the forward lays it out, (B, S, H, D) in
    # memory (its row stride is taken to be H * D).
    padded = torch.full((B, H, -(-Sq // LSE_ALIGN) * LSE_ALIGN), float("inf"), dtype=torch.float32, device=q.device)
    padded[:, :, :Sq] = _finite(lse)
    attn_bias = None if bias is None else _attn_bias(bias, q, k)
    dq, dk, dv, _ = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
        dout.to(q.dtype), _aligned(q), _aligned(k), _aligned(v), attn_bias, _bshd(out.to(q.dtype)), padded, None, None,
        0.0, [True, True, True, False], causal, scale=scale)
    return dq, dk, dv


# -- one block ----------------------------------------------------------------------------------

def block_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float,
                  kernel: str = "auto", bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q to k/v (causal: square block on the diagonal) -> (out, lse fp32).

    bias: an additive mask (B or 1, 1, Sq, Sk) of 0 and -inf in q's dtype (masked blocks). A row
    that sees no key returns out = 0 and lse = -inf, so merging it changes nothing.
    out is in q's dtype from a fused kernel and in fp32 from the math kernel; float64 inputs
    keep a float64 lse, so float64 runs stay exact to ~1e-15.
    """
    if bias is not None and bias.device != q.device:
        bias = bias.to(q.device)
    n_rep = q.shape[1] // k.shape[1]
    name = pick_kernel(kernel, q, bias)
    with _exact(q.device):
        k, v = _repeat_kv(k, n_rep), _repeat_kv(v, n_rep)
        if name == "math":
            out, lse = _math_forward(q, k, v, causal, scale, bias)
        elif q.device.type == "cpu":
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, attn_mask=bias,
                                                                                  scale=scale)
            if bias is not None:  # the kernel reports lse = 0 for a row with no key
                lse = lse.masked_fill(_dead_rows(bias), float("-inf"))
        elif name == "flash":
            out, lse = _flash_cuda_forward(q, k, v, causal, scale)
        else:
            out, lse = _efficient_cuda_forward(q, k, v, causal, scale, bias)
    return out, lse if q.dtype == torch.float64 else lse.float()


def block_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                   lse: torch.Tensor, causal: bool, scale: float, kernel: str = "auto",
                   bias: torch.Tensor | None = None):
    """dq, dk, dv of one block, given the global out and lse of its query rows (and the block's
    additive mask, as in block_forward). Rows that see no key at all get zero gradients."""
    if bias is not None and bias.device != q.device:
        bias = bias.to(q.device)
    n_rep = q.shape[1] // k.shape[1]
    name = pick_kernel(kernel, q, bias)
    with _exact(q.device):
        ke, ve = _repeat_kv(k, n_rep), _repeat_kv(v, n_rep)
        if name == "math":
            dq, dk, dv = _math_backward(dout, q, ke, ve, out, lse, causal, scale, bias)
        elif q.device.type == "cpu":
            # The CPU kernel wants out and dout in the inputs' dtype; it reads strided slices as
            # they are, so no contiguous copies are made here.
            dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                dout.to(q.dtype), q, ke, ve, out.to(q.dtype), lse if bias is None else _finite(lse), 0.0, causal,
                attn_mask=bias, scale=scale)
        elif name == "flash":
            dq, dk, dv = _flash_cuda_backward(dout, q, ke, ve, out, lse, causal, scale)
        else:
            dq, dk, dv = _efficient_cuda_backward(dout, q, ke, ve, out, lse, causal, scale, bias)
    return dq, _sum_kv(dk, n_rep), _sum_kv(dv, n_rep)


def merge_(out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor, block_lse: torch.Tensor) -> None:
    """Fold one partial result into a running one, in place (out, lse are the fp32 accumulators;
    block_out is consumed as scratch). Runs with autocast off: the accumulators stay fp32.

    Softmax over the union of two disjoint key sets A and B, per query row:
        lse   = log(exp(lse_A) + exp(lse_B))
        out   = exp(lse_A - lse) * out_A + exp(lse_B - lse) * out_B
    since out_X = sum_{j in X} exp(s_j - lse_X) v_j. A row that has seen no key yet has
    lse = -inf and out = 0; where both sides are -inf the weights would be exp(-inf + inf) = nan,
    so those rows keep lse = -inf and out = 0.
    """
    with _exact(out.device):
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
