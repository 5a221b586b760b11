"""Context-parallel JOINT attention (text rows replicated, image rows sharded) equals one full SDPA call.

One spawn of 4 gloo ranks runs every layout and case (ranks outside a smaller layout only take part in
creating its groups). Every rank draws the same full q/k/v, keeps the text rows and its image shard as
the runner does, and returns its output; the reference is `sdpa_attention` over the whole sequence.

The cases: 7 text rows and 23 image tokens (neither divides 2, 3 or 4, so the text is never evenly
split and every layout pads the image); 5 image tokens, so under 4 ranks the last shard is all padding
and under ring 3 the last block is part padding; and a text mask that drops some text keys of the first
sample and every text key of the second (only its image keys count).

Tolerance: fp32 values O(1) within 2e-6 absolute (measured at most 6e-7: the log-sum-exp merges
and the masked block by the definition sum in another order than SDPA); a dropped mask, an unmasked
padded key or a wrong head slice gives differences of order 0.1.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.attention import AttentionMeta, sdpa_attention
from parallel.dit import take_shard
from parallel.launch import run_local
from parallel.mesh import ParallelLayout, ParallelMesh

LAYOUTS = {
    "ulysses2": ParallelLayout(ulysses_degree=2),
    "ring2": ParallelLayout(ring_degree=2),
    "ring3": ParallelLayout(ring_degree=3),
    "ulysses2xring2": ParallelLayout(ring_degree=2, ulysses_degree=2),
}
CASES = {"text7_image23": (7, 23, False), "text7_image5": (7, 5, False), "text7_image23_masked": (7, 23, True)}
WORLD = 4
BATCH, HEADS, HEAD_DIM = 2, 4, 8
TOLERANCE = 2e-6


def _inputs(text_len: int, image_len: int, masked: bool) -> tuple[torch.Tensor, ...]:
    """Full q, k, v (B, text_len + image_len, H, D) fp32 and the text mask (B, text_len) or None."""
    generator = torch.Generator().manual_seed(text_len * 100 + image_len)
    q, k, v = (torch.randn(BATCH, text_len + image_len, HEADS, HEAD_DIM, generator=generator) for _ in range(3))
    if not masked:
        return q, k, v, None
    mask = torch.ones(BATCH, text_len, dtype=torch.bool)
    mask[0, 4:] = False  # a padded prompt: its last text keys are padding
    mask[1] = False  # no real text key at all: only the image keys count
    return q, k, v, mask


def _meta(text_len: int, mask: torch.Tensor | None) -> AttentionMeta:
    return AttentionMeta(layer=0, kind="joint", text_len=text_len, text_mask=mask)


def _local_rows(x: torch.Tensor, text_len: int, image_len: int, mesh: ParallelMesh) -> torch.Tensor:
    """What a rank holds: every text row, then its zero-padded shard of the image rows."""
    shard = take_shard(x[:, text_len:], 1, image_len, mesh.layout.sp_degree, mesh.sp_index)
    return torch.cat([x[:, :text_len], shard], dim=1)


def _all_layouts(rank: int, world: int) -> dict[tuple[str, str], tuple[int, np.ndarray]]:
    """On every rank: each layout's mesh over its first ranks; per case, (sp_index, local output)."""
    from parallel.attention import ContextParallelAttention

    torch.set_num_threads(1)
    results = {}
    for name, layout in LAYOUTS.items():
        mesh = ParallelMesh.build(layout, ranks=range(layout.world_size))
        if mesh is None:
            continue
        attention = ContextParallelAttention(mesh, sdpa_attention)
        for case, (text_len, image_len, masked) in CASES.items():
            q, k, v, mask = _inputs(text_len, image_len, masked)
            attention.seq_len = image_len
            local = (_local_rows(t, text_len, image_len, mesh) for t in (q, k, v))
            results[name, case] = (mesh.sp_index, attention(*local, _meta(text_len, mask)).numpy())
    return results


@pytest.fixture(scope="module")
def parallel_results() -> list[dict]:
    return run_local(_all_layouts, WORLD, backend="gloo", timeout_s=300)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_joint_attention_matches_one_full_call(name: str, case: str, parallel_results) -> None:
    text_len, image_len, masked = CASES[case]
    q, k, v, mask = _inputs(text_len, image_len, masked)
    reference = sdpa_attention(q, k, v, _meta(text_len, mask))
    layout = LAYOUTS[name]
    shard = -(-image_len // layout.sp_degree)
    for rank in range(layout.world_size):
        index, out = parallel_results[rank][name, case]
        out = torch.from_numpy(out)
        assert out.shape == (BATCH, text_len + shard, HEADS, HEAD_DIM)
        # The text rows: the whole text output, on every rank.
        text_diff = float((out[:, :text_len] - reference[:, :text_len]).abs().max())
        assert text_diff <= TOLERANCE, f"{name}/{case}, rank {rank}: text rows differ by {text_diff:.3g}"
        # The image rows: this rank's shard, its padded rows past image_len ignored.
        start = index * shard
        real = max(min(image_len - start, shard), 0)
        expected = reference[:, text_len + start: text_len + start + real]
        image_diff = float((out[:, text_len: text_len + real] - expected).abs().max()) if real else 0.0
        assert image_diff <= TOLERANCE, f"{name}/{case}, rank {rank}: image rows differ by {image_diff:.3g}"
    # The mask changes the result, so the masked case checks that the mask is applied.
    if masked:
        unmasked = sdpa_attention(q, k, v, _meta(text_len, None))
        assert float((unmasked - reference).abs().max()) > 0.1


# ---- kernels and checks (no processes) ---------------------------------------------------------

def test_masked_attention_with_lse_matches_the_definition() -> None:
    """The masked block: masked keys weigh nothing, its lse is the logsumexp of the real keys' scores, and
    a query with no real key gets out 0, lse -inf (which merges with weight 0)."""
    from parallel.attention import attention_with_lse, merge_lse

    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, n, 3, 8, generator=generator) for n in (5, 6, 6))
    mask = torch.tensor([[True, True, False, True, False, False], [False] * 6])
    out, lse = attention_with_lse(q, k, v, mask)
    real = mask[0]
    expected = sdpa_attention(q[:1], k[:1, real], v[:1, real])
    assert float((out[:1] - expected).abs().max()) < 1e-6
    scores = torch.einsum("blhd,bmhd->bhlm", q[:1], k[:1, real]) / 8 ** 0.5
    assert float((lse[:1] - torch.logsumexp(scores, -1).transpose(1, 2)).abs().max()) < 1e-5
    assert torch.equal(out[1], torch.zeros_like(out[1])) and torch.isneginf(lse[1]).all()
    # Merging that empty block into a finite partial result leaves it unchanged.
    base_out, base_lse = attention_with_lse(q, k, v)
    merged_out, merged_lse = merge_lse(base_out.float(), base_lse, out, lse)
    assert torch.equal(merged_out[1], base_out[1].float()) and torch.equal(merged_lse[1], base_lse[1])


def _unconnected_mesh(layout: ParallelLayout) -> ParallelMesh:
    """A mesh with no process groups: enough for the checks that run before any communication."""
    return ParallelMesh(layout=layout, rank=0, cfg_index=0, ring_index=0, ulysses_index=0, cfg_group=None,
                        sp_group=None, ring_group=None, ulysses_group=None, ring_ranks=[0])


def test_joint_attention_checks_heads_seq_len_and_rows_before_communicating() -> None:
    from parallel.attention import ContextParallelAttention

    attention = ContextParallelAttention(_unconnected_mesh(ParallelLayout(ulysses_degree=2)))
    x = torch.zeros(1, 7 + 3, 3, 8)
    meta = _meta(7, None)
    with pytest.raises(RuntimeError, match="seq_len is unset"):
        attention(x, x, x, meta)
    attention.seq_len = 5
    with pytest.raises(ValueError, match="ulysses_degree 2 does not divide the 3 attention heads"):
        attention(x, x, x, meta)
    y = torch.zeros(1, 7 + 2, 4, 8)
    with pytest.raises(ValueError, match=r"expects text_len 7 \+ 3 image rows \(a shard of 5 image tokens over "
                                         r"2 ranks\), got 9 rows"):
        attention(y, y, y, meta)
