"""Context-parallel attention: Ulysses all-to-all, Ring with log-sum-exp merge, and their hybrid.

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

Joint attention (FLUX: one sequence of text rows, then image rows) shards only the image tokens; the
text tokens are replicated on every rank, a few hundred rows against thousands of image rows. A rank
gets (text, its image shard) and:
1. Ulysses: all-to-alls only the image rows, and keeps its H/u heads of the (replicated) text rows by
   slicing, no communication;
2. attends the text + image block queries to the text keys (once, never rotated: every rank has them)
   and to every image key (rotated by the ring when r > 1, merged by log-sum-exp);
3. sends the image output back through the inverse all-to-all and all-gathers the text output over
   the Ulysses group along the heads, so every rank ends with the whole text output again.
The text queries see every key, so every rank computes the same text output (equal up to rounding
across ring ranks, which merge the blocks in another order). A text mask masks text keys only.

Plugged into the model as its `AttentionFn` (B, L, H, D) seam; cross-attention needs none of it.
"""

from __future__ import annotations

import importlib.util
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from models.attention import AttentionFn, AttentionMeta, auto_attention
from parallel.dit import all_gather_cat
from parallel.mesh import ParallelMesh

_FLASH_AVAILABLE = importlib.util.find_spec("flash_attn") is not None


def attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       key_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention that also returns the log-sum-exp of the scores (what Ring needs to merge blocks).

    q (B, Lq, H, D), k/v (B, Lk, H, D) -> out (B, Lq, H, D) in q's dtype, lse (B, Lq, H) fp32.
    flash-attn on CUDA when installed, else the fused SDPA flash kernels of PyTorch (CPU or CUDA).
    key_mask (B, Lk) bool, True = a real key: the fused kernels take no mask, so a masked call is
    computed by the definition (`masked_attention_with_lse`); unmasked calls keep the fast path.
    """
    if key_mask is not None:
        return masked_attention_with_lse(q, k, v, key_mask)
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


def masked_attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              key_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`attention_with_lse` over the keys where key_mask (B, Lk) is True, exactly, in fp32.

    Memory is Lq x Lk scores per head, which is why only the text block (Lk = text length) comes here.
    A query whose keys are all masked gets out 0 and lse -inf: `merge_lse` then gives the block weight 0,
    provided the running (out, lse) it merges into is finite.
    """
    qt, kt, vt = (t.transpose(1, 2).float() for t in (q, k, v))
    scores = (qt @ kt.transpose(-1, -2)) * q.shape[-1] ** -0.5
    scores = scores.masked_fill(~key_mask.to(torch.bool)[:, None, None, :], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse.unsqueeze(-1))
    probs = torch.where(torch.isfinite(lse).unsqueeze(-1), probs, torch.zeros_like(probs))
    return (probs @ vt).transpose(1, 2).to(q.dtype), lse.transpose(1, 2)


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
    (block j covers tokens [j*Lb, (j+1)*Lb)); returns the attention of q over all real keys."""
    out, _ = ring_blocks(q, k, v, mesh, seq_len)
    return out.to(q.dtype)


def ring_blocks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mesh: ParallelMesh, seq_len: int,
                local: Callable[[], tuple[torch.Tensor, torch.Tensor]] | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The fp32 (out, lse) of q over the real keys of every ring rank's K/V block (see `ring_attention`).

    Each of the r-1 rotations sends the current K/V to the next ring rank and receives the previous
    rank's while attending to the current one (isend/irecv: overlapped where the backend allows).
    `local`, when given, is a partial attention over keys that do not rotate (joint attention's text
    keys): it runs while the first rotation is in flight and is merged in last, after the image blocks,
    so a `local` block whose keys are all masked (lse -inf) merges into a finite running result.
    """
    degree = mesh.layout.ring_degree
    block = k.shape[1]
    kv = torch.stack([k, v]).contiguous()
    out: torch.Tensor | None = None
    lse: torch.Tensor | None = None
    fixed: tuple[torch.Tensor, torch.Tensor] | None = None
    for step in range(degree):
        pending: list[dist.Work] = []
        if step < degree - 1:
            incoming = torch.empty_like(kv)
            pending = [dist.isend(kv, dst=mesh.ring_next, group=mesh.ring_group),
                       dist.irecv(incoming, src=mesh.ring_prev, group=mesh.ring_group)]
        if step == 0 and local is not None:
            fixed = local()
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
    assert out is not None and lse is not None, "block 0 always holds real keys"
    if fixed is not None:
        out, lse = merge_lse(out, lse, *fixed)
    return out, lse


class ContextParallelAttention:
    """The `AttentionFn` of one rank: Ulysses, Ring or both, over the mesh's groups.

    `seq_len`, the real (unpadded) count of image/video tokens, is set by the caller before each
    forward (stages/runner.py does): the model does not know how the runner padded its shards.
    Cross-attention (queries on this rank's tokens, text keys replicated) is token-local and goes
    straight to `attn_fn`. Joint attention takes (B, text_len + shard, H, D): the replicated text rows,
    then this rank's image shard; it returns the same layout, with the text rows' full output.
    """

    def __init__(self, mesh: ParallelMesh, attn_fn: AttentionFn = auto_attention) -> None:
        self.mesh = mesh
        self.attn_fn = attn_fn
        self.seq_len: int | None = None

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMeta) -> torch.Tensor:
        if meta.kind == "cross":
            return self.attn_fn(q, k, v, meta)
        seq_len = self._real_len()
        self._check_heads(q.shape[2])
        if meta.kind == "joint" and meta.text_len > 0:
            return self._joint(q, k, v, meta, seq_len)
        return self._self(q, k, v, meta, seq_len)

    def _real_len(self) -> int:
        if self.seq_len is None:
            raise RuntimeError("ContextParallelAttention.seq_len is unset; set it to the real token count "
                               "before the forward (stages.runner.BlockRunner does)")
        return self.seq_len

    def _check_heads(self, heads: int) -> None:
        u = self.mesh.layout.ulysses_degree
        if heads % u:
            raise ValueError(f"ulysses_degree {u} does not divide the {heads} attention heads")

    def _self(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMeta,
              seq_len: int) -> torch.Tensor:
        """Self-attention over the sharded tokens of every rank (the module docstring's steps 1-3)."""
        layout = self.mesh.layout
        u, r = layout.ulysses_degree, layout.ring_degree
        if u > 1:
            q, k, v = (seq_to_heads(t, self.mesh.ulysses_group, u) for t in (q, k, v))
        if r > 1:
            out = ring_attention(q, k, v, self.mesh, seq_len)
        else:
            # The whole (padded) sequence is here: drop the padded keys, then one plain attention call.
            out = self.attn_fn(q, k[:, :seq_len], v[:, :seq_len], meta)
        if u > 1:
            out = heads_to_seq(out, self.mesh.ulysses_group, u)
        return out

    def _joint(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMeta,
               seq_len: int) -> torch.Tensor:
        """Joint attention with replicated text rows and sharded image rows (the module docstring's scheme)."""
        layout, text_len = self.mesh.layout, meta.text_len
        u, r = layout.ulysses_degree, layout.ring_degree
        shard = -(-seq_len // layout.sp_degree)
        if q.shape[1] != text_len + shard:
            raise ValueError(f"joint attention on a context-parallel rank expects text_len {text_len} + "
                             f"{shard} image rows (a shard of {seq_len} image tokens over {layout.sp_degree} "
                             f"ranks), got {q.shape[1]} rows")
        (q_txt, q_img), (k_txt, k_img), (v_txt, v_img) = (t.split([text_len, shard], dim=1) for t in (q, k, v))
        if u > 1:
            q_img, k_img, v_img = (seq_to_heads(t, self.mesh.ulysses_group, u) for t in (q_img, k_img, v_img))
            q_txt, k_txt, v_txt = (self._my_heads(t) for t in (q_txt, k_txt, v_txt))
        queries = torch.cat([q_txt, q_img], dim=1)
        if r > 1:
            out = joint_ring_attention(queries, (k_txt, v_txt), (k_img, v_img), self.mesh, seq_len, meta.text_mask)
        else:
            # Text keys and every real image key are here: one attention call, the text mask via meta.
            out = self.attn_fn(queries, torch.cat([k_txt, k_img[:, :seq_len]], dim=1),
                               torch.cat([v_txt, v_img[:, :seq_len]], dim=1), meta)
        out_txt, out_img = out[:, :text_len], out[:, text_len:]
        if u > 1:
            out_img = heads_to_seq(out_img, self.mesh.ulysses_group, u)
            out_txt = all_gather_cat(out_txt, self.mesh.ulysses_group, dim=2)
        return torch.cat([out_txt, out_img], dim=1)

    def _my_heads(self, x: torch.Tensor) -> torch.Tensor:
        """The heads `seq_to_heads` leaves on this rank (head group ulysses_index) of a replicated (B, L, H, D)."""
        per_rank = x.shape[2] // self.mesh.layout.ulysses_degree
        return x.narrow(2, self.mesh.ulysses_index * per_rank, per_rank)


def joint_ring_attention(q: torch.Tensor, text_kv: tuple[torch.Tensor, torch.Tensor],
                         image_kv: tuple[torch.Tensor, torch.Tensor], mesh: ParallelMesh, seq_len: int,
                         text_mask: torch.Tensor | None) -> torch.Tensor:
    """q (B, Lq, h, D) over the text keys (B, text_len, h, D), attended once, and every ring rank's image
    block (B, Lb, h, D) of seq_len real image tokens, rotated; text_mask (B, text_len) masks text keys."""
    k_txt, v_txt = text_kv

    def text_block() -> tuple[torch.Tensor, torch.Tensor]:
        return attention_with_lse(q, k_txt, v_txt, text_mask)

    out, _ = ring_blocks(q, *image_kv, mesh, seq_len, local=text_block)
    return out.to(q.dtype)
