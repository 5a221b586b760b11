"""The analytic context-parallel communication model (benchmarks/comm_model.py): shapes, bytes, times, plans."""

from __future__ import annotations

import json
import math

import pytest

from benchmarks import comm_model as cm
from benchmarks.comm_model import GPU, WAN_1_3B, WAN_14B, Hardware, Link, ModelShape, Plan

NVL = cm.HARDWARE["H100-NVLink"]
TINY = ModelShape("tiny", dim=4, ffn_dim=8, heads=2, layers=1)


def test_parameter_counts_match_the_released_checkpoints():
    assert cm.param_count(WAN_1_3B) == 1_418_996_800
    assert cm.param_count(WAN_14B) == 14_288_491_584
    d = WAN_1_3B.dim
    assert cm.block_params(WAN_1_3B)["self_attn_qkvo"] == 4 * (d * d + d) == 9_443_328


def test_token_counts():
    assert cm.V480.tokens(WAN_1_3B) == 21 * 30 * 52 == 32_760
    assert cm.V720.tokens(WAN_14B) == 21 * 45 * 80 == 75_600


def test_per_token_flops_are_twice_the_weights_each_token_meets():
    m, s = WAN_14B, 1000
    d, f = m.dim, m.ffn_dim
    fl = cm.forward_flops(m, s)
    bp = cm.block_params(m)
    # self q,k,v,o + cross q,o + FFN weights (biases excluded), and the patch embedding + head weights
    weights = m.layers * ((bp["self_attn_qkvo"] - 4 * d) + (bp["cross_attn_qkvo"] - 4 * d) // 2
                          + (bp["ffn"] - f - d)) + 2 * m.patch_values * d
    assert fl["local"] == 2 * s * weights + m.layers * 4 * s * m.text_len * d
    assert fl["self_attn"] == m.layers * 4 * s * s * d
    assert cm.forward_flops(m, 2 * s)["replicated"] == fl["replicated"]  # text side does not grow with video


def test_nothing_is_sent_on_one_gpu():
    tokens = cm.V480.tokens(WAN_1_3B)
    assert cm.step_bytes(WAN_1_3B, tokens, Plan())["total"] == 0
    t = cm.step_time(WAN_1_3B, tokens, Plan(), NVL)
    assert t["comm_exposed"] == 0 and t["total"] == t["compute"]
    assert cm.evaluate(WAN_1_3B, cm.V480, Plan(), NVL)["speedup"] == 1.0


def test_ulysses_bytes_at_p2_by_hand():
    # 8 tokens, dim 4, 1 layer, bf16: local q = 4 tokens x 4 x 2 B = 32 B, half leaves the rank: 16 B per
    # all-to-all, 4 all-to-alls = 64 B per forward, 2 forwards (cond + uncond) = 128 B.
    # Head all-gather: 4 tokens x 64 values x 4 B = 1024 B per forward = 2048 B.
    b = cm.step_bytes(TINY, 8, Plan(ulysses=2))
    assert b["ulysses_all_to_all"] == 128
    assert b["head_all_gather"] == 2048
    assert b["ring_p2p"] == 0 and b["cfg_gather"] == 0
    assert b["total"] == 2176
    # CFG-parallel: one forward each, plus the 8 x 64 x 4 B velocity exchange
    b2 = cm.step_bytes(TINY, 8, Plan(ulysses=2, cfg=2))
    assert (b2["ulysses_all_to_all"], b2["head_all_gather"], b2["cfg_gather"]) == (64, 1024, 2048)


def test_ulysses_is_invalid_when_the_degree_does_not_divide_the_heads():
    assert cm.ulysses_valid(WAN_1_3B, 4) and not cm.ulysses_valid(WAN_1_3B, 8)
    assert cm.ulysses_valid(WAN_14B, 8) and not cm.ulysses_valid(WAN_14B, 16)
    r = cm.evaluate(WAN_1_3B, cm.V480, Plan(ulysses=8), NVL)
    assert r["valid"] is False and "12 heads" in r["reason"]


@pytest.mark.parametrize("u,r", [(1, 4), (4, 2), (2, 8)])
def test_ring_bytes_are_r_minus_1_kv_blocks_per_layer(u, r):
    m, s = WAN_1_3B, 32_768
    plan = Plan(ulysses=u, ring=r)
    block = (s // r) * (m.dim // u) * cm.ACT_BYTES  # K or V of the local block after the Ulysses gather
    lb = cm.layer_bytes(m, s, plan)
    assert lb["ring_p2p"] == (r - 1) * 2 * block
    assert cm.step_bytes(m, s, plan)["ring_p2p"] == 2 * m.layers * (r - 1) * 2 * block


def test_hybrid_rule():
    assert cm.hybrid_plan(WAN_1_3B, 2) == Plan(2, 1)
    assert cm.hybrid_plan(WAN_1_3B, 8) == Plan(4, 2)
    assert cm.hybrid_plan(WAN_1_3B, 64) == Plan(4, 16)
    assert cm.hybrid_plan(WAN_14B, 8) == Plan(8, 1)
    assert cm.hybrid_plan(WAN_14B, 64) == Plan(8, 8)


def test_padding_and_rank_groups():
    assert cm.padded(32_760, 8) == 32_760 and cm.padded(32_760, 16) == 32_768
    g = cm.groups(Plan(ulysses=4, ring=2, cfg=2))
    assert g["ulysses"][0] == [0, 1, 2, 3] and g["ring"][0] == [0, 4] and g["cfg"][0] == [0, 8]
    assert g["sp"] == [list(range(8)), list(range(8, 16))]


def test_ring_overlap_model():
    fast = Hardware("fast", GPU("g", 100.0, 1.0), Link("inf", 1e12, 0.0), Link("inf", 1e12, 0.0))
    slow = Hardware("slow", fast.gpu, Link("slow", 1.0, 0.0), Link("slow", 1.0, 0.0))
    m, s, plan = WAN_1_3B, 32_768, Plan(ring=4)
    assert cm.step_time(m, s, plan, fast)["ring_exposed_comm"] == pytest.approx(0.0, abs=1e-9)
    c = cm.forward_flops(m, s)["self_attn"] / 4 / fast.gpu.flops_per_s / m.layers / 4  # one block's attention
    transfer = cm.layer_bytes(m, s, plan)["ring_block"] / 1e9
    expected = 2 * m.layers * 3 * (transfer - c)
    assert cm.step_time(m, s, plan, slow)["ring_exposed_comm"] == pytest.approx(expected)


def test_cross_node_groups_use_the_slower_link():
    ib_only = cm.step_time(WAN_1_3B, 32_768, Plan(ring=16), NVL)
    in_node = cm.step_time(WAN_1_3B, 32_768, Plan(ring=8), NVL)
    assert ib_only["ring_exposed_comm"] > 0 == in_node["ring_exposed_comm"]


def test_cfg_parallel_is_nearly_ideal_and_speedups_are_bounded():
    r = cm.evaluate(WAN_1_3B, cm.V480, Plan(cfg=2), NVL)
    assert 1.99 < r["speedup"] <= 2.0
    for row in cm.sweep(["H100-NVLink"]):
        if row["valid"]:
            assert 0 < row["efficiency"] <= 1.0 + 1e-9 and math.isfinite(row["seconds_per_step"]["total"])


def test_main_writes_json_and_markdown(tmp_path, capsys):
    out, md = tmp_path / "comm.json", tmp_path / "comm.md"
    report = cm.main(["--out", str(out), "--markdown", str(md), "--hardware", "H100-NVLink,H100-PCIe4"])
    data = json.loads(out.read_text())
    assert data["models"]["Wan2.1-1.3B"]["parameters"] == 1_418_996_800
    assert len(data["published_comparison"]) == len(cm.PUBLISHED) == len(report["published_comparison"])
    text = md.read_text()
    assert "Model vs published" in text and "invalid" in text
    assert text in capsys.readouterr().out
