"""Context-parallel self-attention: Ulysses all-to-all, Ring with log-sum-exp merge, and their hybrid.

One implementation covers all three (docs/design.md, "Context parallelism"): with ulysses_degree u and
ring_degree r, a rank holds S_pad/(u*r) tokens of every head;
1. Ulysses (u > 1): q, k and v are all-to-all'ed inside the Ulysses group, so the rank holds the u
   neighbouring shards (one contiguous block of S_pad/r tokens) for H/u heads;
2. Ring (r > 1): the K/V blocks of the r ring ranks rotate with point-to-point send/recv while the
   rank attends to the block it has, and the partial outputs merge by log-sum-exp;
3. the output goes back through the inverse all-to-all.
Pure Ulysses is r = 1, pure Ring is u = 1. The sequence is padded to a multiple of u*r at the end;
padded keys are masked by trimming them off the blocks that contain them (they are always the
tail of the sequence), so any token count works and the padding never changes a result.

Plugged into the model as its `AttentionFn` (B, L, H, D) seam; cross-attention needs none of it.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.distributed as dist
import torch.nn.functional as F

from models.attention import AttentionFn, AttentionMeta, auto_attention
from parallel.mesh import ParallelMesh

_FLASH_AVAILABLE = importlib.util.find_spec("flash_attn") is not None


def attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention that also returns the log-sum-exp of the scores (what Ring needs to merge blocks).

    q (B, Lq, H, D), k/v (B, Lk, H, D) -> out (B, Lq, H, D) in q's dtype, lse (B, Lq, H) fp32.
    flash-attn on CUDA when installed, else the fused SDPA flash kernels of PyTorch (CPU or CUDA).
    """
    if q.is_cuda and _FLASH_AVAILABLE:
        from flash_attn import flash_attn_func  # GPU extra only

        dtype = q.dtype
        half = (torch.float16, torch.bfloat16)
        cast = (lambda t: t) if dtype in half else (lambda t: t.to(torch.bfloat16))
        out, lse, _ = flash_attn_func(cast(q), cast(k), cast(v), return_attn_probs=True)
        return out.to(dtype), lse.transpose(1, 2).float()
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if q.is_cuda and q.dtype == torch.float32:
        # The CUDA flash kernel takes only fp16/bf16: exact fp32 by the definition (memory S_q x S_k).
        scores = (qt @ kt.transpose(-1, -2)) * q.shape[-1] ** -0.5
        lse = torch.logsumexp(scores, dim=-1)
        out = torch.softmax(scores, dim=-1) @ vt
    elif q.is_cuda:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(qt, kt, vt)[:2]
    else:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(qt, kt, vt)
    return out.transpose(1, 2), lse.transpose(1, 2).float()


def merge_lse(out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor,
              block_lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine two partial attentions over disjoint key sets (the ring-flash-attention form, in fp32):
    o' = o - sigmoid(lse_b - lse) * (o - o_b), lse' = lse - logsigmoid(lse - lse_b).
    """
    weight = torch.sigmoid(block_lse - lse).unsqueeze(-1)
    out = out - weight * (out - block_out.float())
    lse = lse - F.logsigmoid(lse - block_lse)
    return out, lse


# ---------------------------------------------------------------------------------------------
# Ulysses all-to-all: (B, Ls, H, D) sharded by tokens <-> (B, u*Ls, H/u, D) sharded by heads
# ---------------------------------------------------------------------------------------------
def seq_to_heads(x: torch.Tensor, group: dist.ProcessGroup, degree: int) -> torch.Tensor:
    """Gather the u token shards of the group, keep H/u heads: (B, Ls, H, D) -> (B, u*Ls, H/u, D)."""
    b, ls, h, d = x.shape
    send = x.reshape(b, ls, degree, h // degree, d).permute(2, 0, 1, 3, 4).contiguous()
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)  # recv[j] = shard j's tokens, my heads
    return recv.permute(1, 0, 2, 3, 4).reshape(b, degree * ls, h // degree, d)


def heads_to_seq(x: torch.Tensor, group: dist.ProcessGroup, degree: int) -> torch.Tensor:
    """The inverse of seq_to_heads: (B, u*Ls, H/u, D) -> (B, Ls, H, D)."""
    b, lu, hu, d = x.shape
    send = x.reshape(b, degree, lu // degree, hu, d).permute(1, 0, 2, 3, 4).contiguous()
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)  # recv[j] = my tokens, head group j
    return recv.permute(1, 2, 0, 3, 4).reshape(b, lu // degree, degree * hu, d)


# ---------------------------------------------------------------------------------------------
# Ring: rotate K/V blocks, merge by log-sum-exp
# ---------------------------------------------------------------------------------------------
def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mesh: ParallelMesh,
                   seq_len: int) -> torch.Tensor:
    """q, k, v: this ring rank's block (B, Lb, h, D) of a sequence whose real length is seq_len
    (block j covers tokens [j*Lb, (j+1)*Lb)); returns the attention of q over all real keys.

    Each of the r-1 rotations sends the current K/V to the next ring rank and receives the previous
    rank's while attending to the current one (isend/irecv: overlapped where the backend allows).
    """
    degree = mesh.layout.ring_degree
    block = k.shape[1]
    kv = torch.stack([k, v]).contiguous()
    out: torch.Tensor | None = None
    lse: torch.Tensor | None = None
    for step in range(degree):
        pending: list[dist.Work] = []
        if step < degree - 1:
            incoming = torch.empty_like(kv)
            pending = [dist.isend(kv, dst=mesh.ring_next, group=mesh.ring_group),
                       dist.irecv(incoming, src=mesh.ring_prev, group=mesh.ring_group)]
        owner = (mesh.ring_index - step) % degree
        valid = min(max(seq_len - owner * block, 0), block)
        if valid > 0:
            block_out, block_lse = attention_with_lse(q, kv[0, :, :valid], kv[1, :, :valid])
            if out is None:
                out, lse = block_out.float(), block_lse
            else:
                out, lse = merge_lse(out, lse, block_out, block_lse)
        for work in pending:
            work.wait()
        if pending:
            kv = incoming
    assert out is not None, "block 0 always holds real keys"
    return out.to(q.dtype)


class ContextParallelAttention:
    """The `AttentionFn` of one rank: Ulysses, Ring or both, over the mesh's groups.

    `seq_len`, the real (unpadded) count of image/video tokens, is set by the caller before each
    forward (stages/runner.py does): the model does not know how the runner padded its shards.
    Cross-attention (queries on this rank's tokens, text keys replicated) is token-local and goes
    straight to `attn_fn`.
    """

    def __init__(self, mesh: ParallelMesh, attn_fn: AttentionFn = auto_attention) -> None:
        self.mesh = mesh
        self.attn_fn = attn_fn
        self.seq_len: int | None = None

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMeta) -> torch.Tensor:
        if meta.kind == "cross":
            return self.attn_fn(q, k, v, meta)
        if meta.kind == "joint":
            raise NotImplementedError("joint attention under context parallelism is not wired yet")
        if self.seq_len is None:
            raise RuntimeError("ContextParallelAttention.seq_len is unset; set it to the real token count "
                               "before the forward (stages.runner.BlockRunner does)")
        layout = self.mesh.layout
        u, r = layout.ulysses_degree, layout.ring_degree
        if u > 1:
            if q.shape[2] % u:
                raise ValueError(f"ulysses_degree {u} does not divide the {q.shape[2]} attention heads")
            q, k, v = (seq_to_heads(t, self.mesh.ulysses_group, u) for t in (q, k, v))
        if r > 1:
            out = ring_attention(q, k, v, self.mesh, self.seq_len)
        else:
            # The whole (padded) sequence is here: drop the padded keys, then one plain attention call.
            out = self.attn_fn(q, k[:, : self.seq_len], v[:, : self.seq_len], meta)
        if u > 1:
            out = heads_to_seq(out, self.mesh.ulysses_group, u)
        return out
