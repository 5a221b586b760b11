"""Analytic communication / step-time model of context parallelism for the Wan2.1 DiT (no torch, no GPU).

For Wan2.1 T2V-1.3B and -14B at 480p (32,760 tokens) and 720p (75,600 tokens), 81 frames, it predicts per
denoising step (one forward per CFG branch, all layers): the bytes each GPU sends, the compute time, the
communication time and the resulting step time, speedup and efficiency of Ulysses, Ring, the USP hybrid and
CFG-2 on top, on 2-64 GPUs; and it sets the prediction next to the published scaling numbers
(`PUBLISHED` below, with their sources; docs/design.md, "Context parallelism", summarises them).

Model (what `parallel/` does, per self-attention layer, P = u * r sequence-parallel ranks, ulysses innermost):
- Ulysses (degree u): 4 all-to-alls (q, k, v before attention, output after); each rank sends (u-1)/u of its
  local S/P x dim bf16 tensor. Not overlapped with compute. Valid only when u divides the head count.
- Ring (degree r): after the Ulysses gather each rank holds S/r tokens x dim/u channels; its K and V block is
  passed r-1 times around the ring (point-to-point). Transfer i overlaps attention on block i, so one layer's
  attention takes c + (r-1) * max(c, m) with c = attention time of one block and m = one block's transfer:
  the exposed communication is (r-1) * max(0, m - c).
- Hybrid (USP): u = the largest Ulysses degree <= 8 that divides both the head count and P; r = P / u.
- Every forward ends with an all-gather of the head output (S x 64 values, fp32) over the P ranks.
- CFG-2 doubles the GPUs: each half runs one branch (1 forward per step instead of 2) and the two velocity
  predictions (S x 64, fp32) are exchanged once per step. Without CFG-parallel each GPU runs both branches.
- Cross-attention, modulation and the FFN are token-local: no communication. The text-side work (cross-attention
  k/v on the 512 text tokens, the text and time MLPs) is replicated on every rank; the rest divides by P.
- S is padded to a multiple of P (as the official pipeline does); the padded tokens cost compute and bytes.
- Time of one collective or transfer = latency + bytes / bandwidth (alpha-beta). Groups that span nodes
  (8 GPUs per node) use the inter-node link for their off-node share (all-to-all: max of the on- and off-node
  parts; ring transfers and all-gathers: the slowest hop). Kernel efficiency losses from chunking the ring
  attention, launch skew and T5 / VAE time are not modelled; FSDP weight gathers (used by Wan's own
  multi-GPU runs) appear only in the published comparison, as a separate column.
- Step time = compute (FLOPs / (peak x MFU)) + exposed communication. Speedup = the 1-GPU step (both branches,
  same MFU, no communication) / the predicted step; efficiency = speedup / GPUs.

    .venv/bin/python -m benchmarks.comm_model --out benchmarks/results/comm_model.json --markdown /tmp/comm.md
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # also runnable as `python benchmarks/comm_model.py`

from benchmarks._common import RESULTS, table  # noqa: E402

# ---------------------------------------------------------------------------------------------
# Assumptions (all stated here; change them and re-run)
# ---------------------------------------------------------------------------------------------
ACT_BYTES = 2  # bf16 activations (q, k, v, attention output)
OUT_BYTES = 4  # the head output / velocity prediction: Wan runs the head in fp32
GPUS_PER_NODE = 8
STEPS = 50  # only for the published comparison (its seconds are for 50 steps)


@dataclass(frozen=True)
class GPU:
    name: str
    bf16_tflops: float  # dense BF16 tensor-core peak (FP32 accumulate)
    mfu: float  # assumed fraction of the peak reached by the DiT's matmuls and attention

    @property
    def flops_per_s(self) -> float:
        return self.bf16_tflops * 1e12 * self.mfu


@dataclass(frozen=True)
class Link:
    name: str
    gb_per_s: float  # effective per-GPU bandwidth per direction (what NCCL's busBw reports), 1 GB = 1e9 B
    latency_us: float  # per collective / per point-to-point transfer

    def seconds(self, nbytes: float) -> float:
        return 0.0 if nbytes <= 0 else self.latency_us * 1e-6 + nbytes / (self.gb_per_s * 1e9)


@dataclass(frozen=True)
class Hardware:
    name: str
    gpu: GPU
    intra: Link  # inside one 8-GPU node
    inter: Link  # between nodes (used for groups that span nodes)


# H100 SXM: 989 dense BF16 TFLOPs (NVIDIA datasheet); 40% MFU is a typical DiT figure (the published Wan2.1-14B
# 720p 8-GPU time implies ~30% end to end, FA3 attention kernels alone reach 60-75%).
H100 = GPU("H100 SXM", 989.0, 0.40)
# H20: 148 dense BF16 TFLOPs. 60%: the ChituBench 1-GPU DiT time (311.41 s) implies 61% under this FLOP count.
H20 = GPU("H20", 148.0, 0.60)
# RTX 4090: 165.2 dense BF16 TFLOPs with FP32 accumulate (Ada whitepaper; 82.6 is its FP32/TF32 rate). The
# published 1-GPU 1.3B 480p time (261.4 s end to end) already implies 108 TFLOP/s, i.e. more than 82.6.
RTX4090 = GPU("RTX 4090", 165.2, 0.60)

# NVLink 4 (H100 SXM and H20: 450 GB/s per direction line rate): NCCL reaches ~370 GB/s busBw on non-allreduce
# collectives (NCCL maintainer, NVIDIA/nccl-tests#212). Assumed to hold for all-to-all and send/recv alike.
NVLINK = Link("NVLink4 (NCCL eff.)", 370.0, 10.0)
PCIE5 = Link("PCIe Gen5 x16", 50.0, 15.0)
PCIE4 = Link("PCIe Gen4 x16", 25.0, 15.0)
# GeForce cards have P2P disabled, so NCCL stages through host memory: p2pBandwidthLatencyTest on 8x RTX 4090
# shows 6-8 GB/s unidirectional and 12-18 us (NVIDIA/nccl-tests#117).
PCIE4_NO_P2P = Link("PCIe Gen4, no P2P", 8.0, 15.0)
# InfiniBand NDR 400 Gb/s, one NIC per GPU: 48-49 GB/s effective per NIC (NVIDIA/nccl-tests#267).
IB_NDR = Link("IB NDR 400G", 48.0, 15.0)

HARDWARE = {
    "H100-NVLink": Hardware("H100-NVLink", H100, NVLINK, IB_NDR),
    "H100-PCIe5": Hardware("H100-PCIe5", H100, PCIE5, IB_NDR),
    "H100-PCIe4": Hardware("H100-PCIe4", H100, PCIE4, IB_NDR),
    "H20-NVLink": Hardware("H20-NVLink", H20, NVLINK, IB_NDR),
    "4090-PCIe4-noP2P": Hardware("4090-PCIe4-noP2P", RTX4090, PCIE4_NO_P2P, IB_NDR),
    "4090-PCIe4": Hardware("4090-PCIe4", RTX4090, PCIE4, IB_NDR),
}


# ---------------------------------------------------------------------------------------------
# Model shapes and videos (docs/wan-model.md, "Models")
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelShape:
    name: str
    dim: int
    ffn_dim: int
    heads: int
    layers: int
    text_len: int = 512
    text_dim: int = 4096
    freq_dim: int = 256
    in_dim: int = 16
    out_dim: int = 16
    patch: tuple[int, int, int] = (1, 2, 2)

    @property
    def patch_values(self) -> int:  # 64: per-token inputs of the patch embedding and outputs of the head
        return self.out_dim * math.prod(self.patch)


WAN_1_3B = ModelShape("Wan2.1-1.3B", dim=1536, ffn_dim=8960, heads=12, layers=30)
WAN_14B = ModelShape("Wan2.1-14B", dim=5120, ffn_dim=13824, heads=40, layers=40)


@dataclass(frozen=True)
class Video:
    name: str
    width: int
    height: int
    frames: int

    def tokens(self, m: ModelShape) -> int:
        """Latent 16 x (1 + (frames-1)/4) x H/8 x W/8 (VAE stride 4x8x8), then patch (1,2,2)."""
        f = (self.frames - 1) // 4 + 1
        pt, ph, pw = m.patch
        return (f // pt) * (self.height // 8 // ph) * (self.width // 8 // pw)


V480 = Video("480p", 832, 480, 81)
V720 = Video("720p", 1280, 720, 81)


def block_params(m: ModelShape) -> dict[str, int]:
    """Parameters of one block, by part (Wan2.1's `WanAttentionBlock`)."""
    d, f = m.dim, m.ffn_dim
    return {"self_attn_qkvo": 4 * (d * d + d), "cross_attn_qkvo": 4 * (d * d + d), "qk_norms": 4 * d,
            "cross_norm": 2 * d, "ffn": 2 * d * f + f + d, "modulation": 6 * d}


def param_count(m: ModelShape) -> int:
    d = m.dim
    stem = (m.patch_values * d + d) + (m.text_dim * d + d + d * d + d) + (m.freq_dim * d + d + d * d + d) \
        + (6 * d * d + 6 * d)
    head = m.patch_values * d + m.patch_values + 2 * d
    return stem + m.layers * sum(block_params(m).values()) + head


def forward_flops(m: ModelShape, tokens: int) -> dict[str, float]:
    """FLOPs of one forward (2 per multiply-add; elementwise work not counted), split by how it parallelises.

    `self_attn`: the S^2 attention (QK^T and PV) of all layers; `local`: the other per-token work (linear layers,
    cross-attention, patch embedding, head), which divides by P; `replicated`: text-side work every rank repeats.
    """
    d, f, s, t = m.dim, m.ffn_dim, tokens, m.text_len
    per_layer_local = (2 * s * 4 * d * d  # self q, k, v, o
                       + 2 * s * 2 * d * d  # cross q, o (video tokens)
                       + 4 * s * t * d  # cross-attention QK^T and PV
                       + 4 * s * d * f)  # FFN
    local = m.layers * per_layer_local + 2 * s * m.patch_values * d * 2  # + patch embedding and head
    replicated = (m.layers * 2 * t * 2 * d * d  # cross k, v on the text tokens
                  + 2 * t * (m.text_dim * d + d * d) + 2 * (m.freq_dim * d + d * d + 6 * d * d))
    return {"self_attn": float(m.layers * 4 * s * s * d), "local": float(local), "replicated": float(replicated)}


# ---------------------------------------------------------------------------------------------
# Parallel plans
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Plan:
    ulysses: int = 1
    ring: int = 1
    cfg: int = 1  # 1 or 2

    @property
    def sp(self) -> int:
        return self.ulysses * self.ring

    @property
    def gpus(self) -> int:
        return self.sp * self.cfg

    @property
    def label(self) -> str:
        parts = [f"CFG{self.cfg}"] if self.cfg > 1 else []
        parts += [f"R{self.ring}"] if self.ring > 1 else []
        parts += [f"U{self.ulysses}"] if self.ulysses > 1 else []
        return "x".join(parts) or "1 GPU"


def ulysses_valid(m: ModelShape, u: int) -> bool:
    return u >= 1 and m.heads % u == 0


def hybrid_plan(m: ModelShape, p: int, max_ulysses: int = GPUS_PER_NODE) -> Plan:
    """USP rule: u = the largest degree <= 8 dividing both the heads and P (Ulysses inside a node), ring = P/u."""
    u = max(k for k in range(1, min(p, max_ulysses) + 1) if m.heads % k == 0 and p % k == 0)
    return Plan(ulysses=u, ring=p // u)


def padded(tokens: int, sp: int) -> int:
    return -(-tokens // sp) * sp


def _nodes(ranks: list[int]) -> int:
    return len({r // GPUS_PER_NODE for r in ranks})


def groups(plan: Plan) -> dict[str, list[list[int]]]:
    """Rank groups with ulysses innermost, then ring, then CFG (ChituDiffusion pairs rank i with i + world/2)."""
    u, r, sp, world = plan.ulysses, plan.ring, plan.sp, plan.gpus
    return {"ulysses": [list(range(b, b + u)) for b in range(0, world, u)],
            "ring": [[c * sp + j * u + i for j in range(r)] for c in range(plan.cfg) for i in range(u)],
            "sp": [list(range(c * sp, (c + 1) * sp)) for c in range(plan.cfg)],
            "cfg": [[i, i + sp] for i in range(sp)] if plan.cfg > 1 else []}


# ---------------------------------------------------------------------------------------------
# Bytes and times
# ---------------------------------------------------------------------------------------------
def forwards_per_gpu(plan: Plan) -> int:
    """Forwards each GPU runs per step: cond and uncond, unless CFG-parallel gives each half one branch."""
    return 2 // plan.cfg


def layer_bytes(m: ModelShape, s: int, plan: Plan) -> dict[str, float]:
    """Bytes one rank sends in one self-attention layer (s already padded to a multiple of plan.sp)."""
    u, r, p = plan.ulysses, plan.ring, plan.sp
    local = s // p * m.dim * ACT_BYTES  # q, k, v or the output, sequence-sharded
    ring_block = 2 * (s // r) * (m.dim // u) * ACT_BYTES  # K and V after the Ulysses gather
    return {"ulysses_all_to_all": 4 * local * (u - 1) / u, "ring_p2p": float((r - 1) * ring_block),
            "ring_block": float(ring_block)}


def step_bytes(m: ModelShape, tokens: int, plan: Plan) -> dict[str, float]:
    """Bytes one GPU sends per denoising step."""
    s = padded(tokens, plan.sp)
    lb = layer_bytes(m, s, plan)
    n = forwards_per_gpu(plan)
    out = {"ulysses_all_to_all": n * m.layers * lb["ulysses_all_to_all"],
           "ring_p2p": n * m.layers * lb["ring_p2p"],
           "head_all_gather": n * (plan.sp - 1) * (s // plan.sp) * m.patch_values * OUT_BYTES,
           "cfg_gather": tokens * m.patch_values * OUT_BYTES if plan.cfg > 1 else 0}
    out["total"] = sum(out.values())
    return {k: float(v) for k, v in out.items()}


def _link(hw: Hardware, group: list[int]) -> Link:
    """The slowest link a group's traffic crosses (inter-node traffic cannot beat the intra-node link either)."""
    if _nodes(group) == 1:
        return hw.intra
    return hw.inter if hw.inter.gb_per_s <= hw.intra.gb_per_s else hw.intra


def all_to_all_seconds(hw: Hardware, group: list[int], bytes_sent: float) -> float:
    """Per-rank time of an all-to-all that sends `bytes_sent` (already excluding the rank's own share)."""
    n, k = len(group), _nodes(group)
    if k == 1:
        return hw.intra.seconds(bytes_sent)
    on_node = bytes_sent * (n / k - 1) / (n - 1)  # peers on the same node (groups split evenly over k nodes)
    return max(hw.intra.seconds(on_node), _link(hw, group).seconds(bytes_sent - on_node))


def step_time(m: ModelShape, tokens: int, plan: Plan, hw: Hardware) -> dict[str, float]:
    """Seconds per denoising step on each GPU: compute + exposed communication."""
    s = padded(tokens, plan.sp)
    fl = forward_flops(m, s)
    rate = hw.gpu.flops_per_s
    attn = fl["self_attn"] / plan.sp / rate  # per forward, all layers
    other = (fl["local"] / plan.sp + fl["replicated"]) / rate
    g = groups(plan)
    lb = layer_bytes(m, s, plan)

    a2a = all_to_all_seconds(hw, g["ulysses"][0], lb["ulysses_all_to_all"] / 4) * 4 if plan.ulysses > 1 else 0.0
    ring_exposed = 0.0
    if plan.ring > 1:
        c = attn / m.layers / plan.ring  # attention on one K/V block
        mm = _link(hw, g["ring"][0]).seconds(lb["ring_block"])
        ring_exposed = (plan.ring - 1) * max(0.0, mm - c)
    head_bytes = (plan.sp - 1) * (s // plan.sp) * m.patch_values * OUT_BYTES
    head = _link(hw, g["sp"][0]).seconds(head_bytes) if plan.sp > 1 else 0.0
    cfg = _link(hw, g["cfg"][0]).seconds(tokens * m.patch_values * OUT_BYTES) if plan.cfg > 1 else 0.0

    n = forwards_per_gpu(plan)
    out = {"compute": n * (attn + other), "ulysses_comm": n * m.layers * a2a,
           "ring_exposed_comm": n * m.layers * ring_exposed, "head_all_gather": n * head, "cfg_gather": cfg}
    out["comm_exposed"] = out["ulysses_comm"] + out["ring_exposed_comm"] + out["head_all_gather"] + cfg
    out["total"] = out["compute"] + out["comm_exposed"]
    return out


def evaluate(m: ModelShape, video: Video, plan: Plan, hw: Hardware) -> dict[str, Any]:
    tokens = video.tokens(m)
    if not ulysses_valid(m, plan.ulysses):
        return {"plan": plan.label, "gpus": plan.gpus, "valid": False,
                "reason": f"ulysses {plan.ulysses} does not divide {m.heads} heads"}
    base = step_time(m, tokens, Plan(), hw)["total"]
    t = step_time(m, tokens, plan, hw)
    speedup = base / t["total"]
    return {"plan": plan.label, **asdict(plan), "gpus": plan.gpus, "valid": True, "tokens": tokens,
            "padded_tokens": padded(tokens, plan.sp), "bytes_per_step": step_bytes(m, tokens, plan),
            "seconds_per_step": t, "one_gpu_seconds_per_step": base, "speedup": speedup,
            "efficiency": speedup / plan.gpus, "comm_share": t["comm_exposed"] / t["total"]}


def fsdp_seconds_per_step(m: ModelShape, plan: Plan, hw: Hardware) -> float:
    """Wan's own multi-GPU runs shard the DiT with FSDP (`--dit_fsdp`): every forward all-gathers the bf16
    weights over all GPUs. Counted fully exposed (an upper bound: FSDP can prefetch the next layer)."""
    if plan.gpus == 1:
        return 0.0
    world = list(range(plan.gpus))
    return forwards_per_gpu(plan) * _link(hw, world).seconds(param_count(m) * ACT_BYTES * (plan.gpus - 1) / plan.gpus)


# ---------------------------------------------------------------------------------------------
# Sweep and published comparison
# ---------------------------------------------------------------------------------------------
MODELS = (WAN_1_3B, WAN_14B)
VIDEOS = (V480, V720)
DEGREES = (2, 4, 8, 16, 32, 64)


def sweep_plans(m: ModelShape, p: int) -> dict[str, Plan]:
    hyb = hybrid_plan(m, p)
    return {"ulysses": Plan(ulysses=p), "ring": Plan(ring=p), "hybrid": hyb,
            "cfg2_hybrid": Plan(hyb.ulysses, hyb.ring, cfg=2)}


def sweep(hw_names: list[str]) -> list[dict[str, Any]]:
    rows = []
    for hw_name in hw_names:
        hw = HARDWARE[hw_name]
        for m in MODELS:
            for v in VIDEOS:
                for p in DEGREES:
                    for method, plan in sweep_plans(m, p).items():
                        rows.append({"hardware": hw_name, "model": m.name, "video": v.name, "p": p,
                                     "method": method, **evaluate(m, v, plan, hw)})
    return rows


# (source, hardware, model, video, plan, published speedup, published 1-GPU seconds, scope); the Wan README rows
# ran with FSDP (`--dit_fsdp`), ChituBench replicates the 1.3B weights.
PUBLISHED = [
    ("ChituBench", "H20-NVLink", WAN_1_3B, V480, Plan(cfg=2), 2.001, 311.41, "DiT only"),
    ("ChituBench", "H20-NVLink", WAN_1_3B, V480, Plan(ulysses=2), 1.929, 311.41, "DiT only"),
    ("ChituBench", "H20-NVLink", WAN_1_3B, V480, Plan(ulysses=2, cfg=2), 3.849, 311.41, "DiT only"),
    ("ChituBench", "H20-NVLink", WAN_1_3B, V480, Plan(ulysses=4, cfg=2), 7.252, 311.41, "DiT only"),
    ("ChituBench", "H20-NVLink", WAN_1_3B, V480, Plan(ulysses=4, ring=2), 6.654, 311.41, "DiT only"),
    ("ChituBench", "H20-NVLink", WAN_1_3B, V480, Plan(ulysses=4, ring=2, cfg=2), 12.813, 311.41, "DiT only"),
    ("Wan README", "H100-NVLink", WAN_14B, V720, Plan(ulysses=2), 1.94, 1837.9, "end to end, 1 GPU offloads, FSDP"),
    ("Wan README", "H100-NVLink", WAN_14B, V720, Plan(ulysses=4), 3.70, 1837.9, "end to end, 1 GPU offloads, FSDP"),
    ("Wan README", "H100-NVLink", WAN_14B, V720, Plan(ulysses=8), 6.38, 1837.9, "end to end, 1 GPU offloads, FSDP"),
    ("Wan README", "4090-PCIe4-noP2P", WAN_1_3B, V480, Plan(ulysses=2), 1.39, 261.4, "end to end, 1 GPU t5_cpu, FSDP"),
    ("Wan README", "4090-PCIe4-noP2P", WAN_1_3B, V480, Plan(ulysses=4), 2.16, 261.4, "end to end, 1 GPU t5_cpu, FSDP"),
    ("Wan README", "4090-PCIe4-noP2P", WAN_1_3B, V480, Plan(ring=8), 2.33, 261.4, "end to end, 1 GPU t5_cpu, FSDP"),
]


def compare_published() -> list[dict[str, Any]]:
    rows = []
    for source, hw_name, m, v, plan, published, one_gpu_s, scope in PUBLISHED:
        hw = HARDWARE[hw_name]
        r = evaluate(m, v, plan, hw)
        fsdp = fsdp_seconds_per_step(m, plan, hw) if "FSDP" in scope else None
        flops_50_steps = STEPS * 2 * sum(forward_flops(m, v.tokens(m)).values())
        rows.append({"source": source, "hardware": hw_name, "model": m.name, "video": v.name, "plan": plan.label,
                     "gpus": plan.gpus, "published_speedup": published, "model_speedup": r["speedup"],
                     "model_speedup_with_fsdp": None if fsdp is None else
                     r["one_gpu_seconds_per_step"] / (r["seconds_per_step"]["total"] + fsdp),
                     "fsdp_seconds_per_step": fsdp, "model_efficiency": r["efficiency"],
                     "model_comm_share": r["comm_share"], "model_bytes_per_step": r["bytes_per_step"]["total"],
                     "scope": scope,
                     "published_one_gpu_s": one_gpu_s,
                     "model_one_gpu_s": STEPS * r["one_gpu_seconds_per_step"],
                     "implied_mfu_of_published_one_gpu": flops_50_steps / one_gpu_s / (hw.gpu.bf16_tflops * 1e12)})
    return rows


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------
def _gb(b: float) -> str:
    return f"{b / 1e9:.2f}" if b < 1e11 else f"{b / 1e9:.0f}"


def _cell(r: dict[str, Any]) -> str:
    if not r["valid"]:
        return "invalid"
    t = r["seconds_per_step"]["total"]
    return f"{_gb(r['bytes_per_step']['total'])} GB · {t:.3g} s · {100 * r['efficiency']:.0f}%"


def sweep_markdown(rows: list[dict[str, Any]], hw_name: str) -> str:
    by_key = {(r["model"], r["video"], r["p"], r["method"]): r for r in rows if r["hardware"] == hw_name}
    body = []
    for m in MODELS:
        for v in VIDEOS:
            for p in DEGREES:
                cell = {k: by_key[(m.name, v.name, p, k)] for k in ("ulysses", "ring", "hybrid", "cfg2_hybrid")}
                one = cell["ring"]["one_gpu_seconds_per_step"]
                body.append([m.name.replace("Wan2.1-", ""), v.name, p, f"{one:.3g}", _cell(cell["ulysses"]),
                             _cell(cell["ring"]), f"{cell['hybrid']['plan']}: {_cell(cell['hybrid'])}",
                             f"{cell['cfg2_hybrid']['gpus']} GPUs: {_cell(cell['cfg2_hybrid'])}"])
    header = ["model", "res", "P", "1-GPU s/step", "Ulysses-P", "Ring-P", "hybrid (USP)", "CFG2 x hybrid"]
    return table(header, body)


def link_markdown(rows: list[dict[str, Any]], hw_names: list[str]) -> str:
    """Efficiency of the hybrid (= Ulysses where valid up to 8) and of pure ring, per link."""
    by_key = {(r["hardware"], r["model"], r["video"], r["p"], r["method"]): r for r in rows}
    body = []
    for m in MODELS:
        for v in VIDEOS:
            for p in DEGREES:
                cells = []
                for hw_name in hw_names:
                    hyb, ring = (by_key[(hw_name, m.name, v.name, p, k)] for k in ("hybrid", "ring"))
                    cells.append(f"{100 * hyb['efficiency']:.0f}% / {100 * ring['efficiency']:.0f}%")
                body.append([m.name.replace("Wan2.1-", ""), v.name, p, sweep_plans(m, p)["hybrid"].label, *cells])
    return table(["model", "res", "P", "hybrid", *[f"{h}: hybrid / ring" for h in hw_names]], body)


def published_markdown(rows: list[dict[str, Any]]) -> str:
    body = [[r["source"], r["hardware"], f"{r['model'].replace('Wan2.1-', '')} {r['video']}", r["plan"], r["gpus"],
             f"{r['published_speedup']:.3g}x", f"{r['model_speedup']:.3g}x",
             "–" if r["model_speedup_with_fsdp"] is None else f"{r['model_speedup_with_fsdp']:.3g}x",
             f"{100 * r['model_comm_share']:.1f}%",
             f"{r['published_one_gpu_s']:.0f} / {r['model_one_gpu_s']:.0f}", r["scope"]] for r in rows]
    header = ["source", "hardware (model)", "model, res", "config", "GPUs", "published", "model", "model + FSDP",
              "model comm share", "1-GPU s published / model", "published scope"]
    return table(header, body)


def assumptions() -> dict[str, Any]:
    return {"activation_bytes": ACT_BYTES, "output_bytes": OUT_BYTES, "gpus_per_node": GPUS_PER_NODE,
            "gpus": {g.name: asdict(g) for g in (H100, H20, RTX4090)},
            "links": {lk.name: asdict(lk) for lk in (NVLINK, PCIE5, PCIE4, PCIE4_NO_P2P, IB_NDR)},
            "hybrid_rule": "u = largest degree <= 8 dividing heads and P; ring = P / u; ranks ulysses innermost",
            "overlap": "Ulysses all-to-alls, head all-gather and CFG gather exposed; ring transfer i overlaps "
                       "attention on block i: exposed (r-1)*max(0, transfer - block attention)",
            "not_modelled": "ring-attention kernel efficiency loss, LSE merges, launch skew, T5 / VAE time; "
                            "FSDP weight gathers only in the published comparison's 'model + FSDP' column"}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=RESULTS / "comm_model.json")
    parser.add_argument("--markdown", type=Path, default=None, help="also write the tables here (default: stdout only)")
    parser.add_argument("--hardware", default="H100-NVLink,H100-PCIe5,H100-PCIe4",
                        help=f"sweep hardware, comma-separated, from {sorted(HARDWARE)}")
    args = parser.parse_args(argv)
    hw_names = [h for h in args.hardware.split(",") if h]

    rows = sweep(hw_names)
    published = compare_published()
    shapes = {m.name: {**asdict(m), "parameters": param_count(m),
                       "tokens": {v.name: v.tokens(m) for v in VIDEOS},
                       "gflop_per_forward": {v.name: sum(forward_flops(m, v.tokens(m)).values()) / 1e9
                                             for v in VIDEOS}} for m in MODELS}
    report = {"command": "python -m benchmarks.comm_model " + " ".join(sys.argv[1:] if argv is None else argv),
              "assumptions": assumptions(), "models": shapes, "sweep": rows, "published_comparison": published}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))

    md = [f"### Per-step bytes sent per GPU · predicted step time · efficiency ({hw_names[0]}, IB NDR across nodes)",
          "", sweep_markdown(rows, hw_names[0]), ""]
    if len(hw_names) > 1:
        md += ["### Parallel efficiency per link: hybrid (USP) / pure ring, no CFG-parallel", "",
               link_markdown(rows, hw_names), ""]
    md += ["### Model vs published speedups", "", published_markdown(published), ""]
    text = "\n".join(md)
    print(text)
    if args.markdown:
        args.markdown.write_text(text)
    return report


if __name__ == "__main__":
    main()
