"""The DiT forward benchmark (benchmarks/dit_forward.py): its FLOP counts, its GEMM peak, and tiny runs of both families."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks import dit_forward as bench
from models.flux.config import FluxDiTConfig
from models.flux.transformer import FluxTransformer
from models.random_init import randomize_parameters
from models.wan.config import WanDiTConfig
from models.wan.transformer import WanTransformer

pytest.importorskip("diffusers")


def matmul_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta) -> torch.Tensor:  # noqa: ANN001
    """Attention as two batched matmuls, which the FLOP counter sees (it does not count CPU SDPA kernels)."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    return torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1).matmul(v).transpose(1, 2)


@torch.no_grad()
def test_flop_counts_match_torch_flop_counter() -> None:
    """The analytic counts equal what torch counts for the matmuls and attention of a real forward."""
    flux = FluxDiTConfig(hidden_size=64, num_heads=2, num_double_blocks=2, num_single_blocks=1, context_dim=48,
                         pooled_dim=24, axes_dims_rope=(8, 12, 12))
    model = randomize_parameters(FluxTransformer(flux, attn_fn=matmul_attention)).set_weight_prepacking(False)
    latents, context = torch.randn(1, 16, 6, 4), torch.randn(1, 5, 48)
    with FlopCounterMode(display=False) as counter:
        model(latents, 500.0, context, torch.randn(1, 24), 3.5)
    assert counter.get_total_flops() == bench.flux_forward_flops(flux, 1, tokens=6, text_len=5)

    wan = WanDiTConfig(dim=64, ffn_dim=128, num_heads=2, num_layers=2, freq_dim=32, text_dim=48, text_len=24)
    model = randomize_parameters(WanTransformer(wan, attn_fn=matmul_attention)).set_weight_prepacking(False)
    with FlopCounterMode(display=False) as counter:
        model(torch.randn(1, 16, 1, 4, 6), torch.tensor([500.0]), torch.randn(1, 24, 48))
    assert counter.get_total_flops() == bench.forward_flops(wan, 1, tokens=6)


@torch.no_grad()
def test_flop_counts_of_the_image_families_match_torch_flop_counter() -> None:
    """Qwen-Image and Z-Image (with its 32-row padding of image and caption) as torch counts them."""
    from models.qwen_image.config import QwenImageDiTConfig
    from models.qwen_image.transformer import QwenImageTransformer
    from models.z_image.config import ZImageDiTConfig
    from models.z_image.transformer import ZImageTransformer

    qwen = QwenImageDiTConfig(num_layers=2, num_attention_heads=2, attention_head_dim=16, joint_attention_dim=24,
                              axes_dims_rope=(4, 6, 6))
    model = randomize_parameters(QwenImageTransformer(qwen, attn_fn=matmul_attention))
    with FlopCounterMode(display=False) as counter:
        model(torch.randn(1, 16, 6, 4), torch.tensor([0.5]), torch.randn(1, 5, 24))
    assert counter.get_total_flops() == bench.qwen_image_forward_flops(qwen, 1, tokens=6, text_len=5)

    from models.flux2.config import Flux2DiTConfig
    from models.flux2.transformer import Flux2Transformer

    flux2 = Flux2DiTConfig(in_channels=16, hidden_size=64, num_heads=2, num_double_blocks=2, num_single_blocks=1,
                           context_dim=24, axes_dims_rope=(8, 8, 8, 8))
    model = randomize_parameters(Flux2Transformer(flux2, attn_fn=matmul_attention)).set_weight_prepacking(False)
    with FlopCounterMode(display=False) as counter:
        model(torch.randn(1, 16, 3, 2), torch.tensor([500.0]), torch.randn(1, 5, 24))
    assert counter.get_total_flops() == bench.flux2_forward_flops(flux2, 1, tokens=6, text_len=5)

    z = ZImageDiTConfig(dim=32, n_heads=2, n_kv_heads=2, n_layers=2, n_refiner_layers=1, cap_feat_dim=24,
                        axes_dims=(4, 6, 6), axes_lens=(256, 32, 32))
    model = randomize_parameters(ZImageTransformer(z, attn_fn=matmul_attention)).set_weight_prepacking(False)
    with FlopCounterMode(display=False) as counter:
        model(torch.randn(1, 16, 6, 4), torch.tensor([0.5]), torch.randn(1, 5, 24))
    assert counter.get_total_flops() == bench.z_image_forward_flops(z, 1, tokens=6, text_len=5)


def test_peak_is_the_best_of_plain_and_packed_gemms_at_the_given_shapes(monkeypatch) -> None:
    assert bench.SQUARE_GEMM == (2048, 2048, 4096)  # what a real run adds; shrunk below to keep the test fast
    monkeypatch.setattr(bench, "SQUARE_GEMM", (128, 128, 256))
    peak = bench.GemmPeak(torch.float32, [(64, 96, 128)])
    best = max(peak.sample() for _ in range(2))
    assert set(peak.best_by_gemm) == {f"{kind} {shape}" for kind in ("mm", "packed", "packed+gelu")
                                      for shape in ("64x96x128", "128x128x256")}
    assert best == max(peak.best_by_gemm.values()) > 0


@pytest.mark.parametrize("family,sizes", [
    ("wan", ["--layers", "1", "--frames", "1", "--height", "8", "--width", "8", "--dim", "128", "--heads", "2",
             "--ffn-dim", "256"]),
    ("flux", ["--double", "1", "--single", "1", "--height", "8", "--width", "8", "--text-len", "16", "--dim", "128",
              "--heads", "2", "--context-dim", "64", "--pooled-dim", "32"]),
    ("flux2", ["--double", "1", "--single", "1", "--height", "8", "--width", "8", "--text-len", "16", "--dim", "128",
               "--heads", "2", "--context-dim", "48"]),
    ("qwen-image", ["--layers", "1", "--height", "8", "--width", "8", "--text-len", "16", "--dim", "128",
                    "--heads", "2", "--context-dim", "64"]),
    ("z-image", ["--layers", "1", "--height", "8", "--width", "8", "--text-len", "16", "--dim", "128",
                 "--heads", "2", "--context-dim", "64"]),
])
def test_tiny_run_writes_json_and_plot(tmp_path, monkeypatch, family: str, sizes: list[str]) -> None:
    """Every family, fp32 and bf16, one repeat. The square peak GEMM is shrunk: at 2048x2048x4096 it dominated the
    run (seconds per sample, minutes on a CPU without bf16 units, where bf16 GEMMs are emulated)."""
    monkeypatch.setattr(bench, "SQUARE_GEMM", (128, 128, 256))
    out = tmp_path / f"{family}.json"
    report = bench.main(["--family", family, *sizes, "--repeats", "1", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["family"] == family and saved == json.loads(json.dumps(report))
    assert out.with_suffix(".png").stat().st_size > 0
    assert [r["dtype"] for r in saved["results"]] == ["float32", "bfloat16"]
    for r in saved["results"]:
        assert r["tokens"] == 16 and r["median_s"]["ours"] > 0 and r["median_s"]["diffusers"] > 0
        assert r["speedup_vs_diffusers"] == pytest.approx(r["median_s"]["diffusers"] / r["median_s"]["ours"])
        assert r["matmul_peak_gflops"] == max(r["peak_by_gemm_gflops"].values())
        assert any(name.startswith("packed") for name in r["peak_by_gemm_gflops"])
        assert r["fraction_of_peak"]["ours"] == pytest.approx(r["gflops"]["ours"] / r["matmul_peak_gflops"])
        assert r["ours_packed_weight_bytes"] >= 0 and r["ours_param_bytes"] > 0
    fp32, bf16 = saved["results"]
    assert fp32["max_abs_err"] <= 1e-4 * max(1.0, fp32["out_absmax"])  # same weights, same math
    assert bf16["max_abs_err_vs_fp32"]["ours"] < 0.1 * max(1.0, fp32["out_absmax"])
