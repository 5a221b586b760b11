"""Every cache kind through the real pipelines (Wan2.2 with CFG and two experts, FLUX.1-dev): its "off" setting
is full compute bit for bit, and a setting that should reuse work does, at the level the kind works at, and
changes the result. Each kind's decision rule is checked by hand in its own test module."""

from __future__ import annotations

import pytest
import torch

IDENTITY = [1.0, 0.0]  # TeaCache polynomial P(x) = x: the tiny models have no published one

# kind -> (off setting, reusing setting, the counter that must show reuse)
KINDS = {
    "dbcache": ({"kind": "dbcache", "threshold": 0.0, "first_blocks": 1, "last_blocks": 0, "warmup_steps": 1},
                {"kind": "dbcache", "threshold": 0.9, "first_blocks": 1, "last_blocks": 0, "warmup_steps": 1},
                "forwards_reused"),
    "teacache": ({"kind": "teacache", "threshold": 0.0, "coefficients": IDENTITY},
                 {"kind": "teacache", "threshold": 5.0, "coefficients": IDENTITY}, "forwards_reused"),
    "magcache": ({"kind": "magcache", "threshold": 0.0, "ratios": [[1.0] * 8]},
                 {"kind": "magcache", "threshold": 1.0, "retention_ratio": 0.25, "ratios": [[0.95] * 8]},
                 "forwards_reused"),
    "easycache": ({"kind": "easycache", "threshold": 0.0, "ret_steps": 2},
                  {"kind": "easycache", "threshold": 0.9, "ret_steps": 2}, "forwards_reused"),
    "meancache": ({"kind": "meancache", "fresh_steps": 8}, {"kind": "meancache", "fresh_steps": 4}, "forwards_reused"),
    "blockdance": ({"kind": "blockdance", "boundary_block": 0, "group_size": 1},
                   {"kind": "blockdance", "boundary_block": 0, "warmup": 0, "cooldown": 0}, "forwards_reused"),
    "pab": ({"kind": "pab", "self_range": 1, "cross_range": 1},
            {"kind": "pab", "warmup": 2, "cooldown": 1}, "attention_reused"),
    "taylorseer": ({"kind": "taylorseer", "interval": 1}, {"kind": "taylorseer", "interval": 3, "warmup_steps": 2},
                   "forwards_reused"),
    "dbcache_taylorseer": ({"kind": "dbcache", "threshold": 0.0, "first_blocks": 1, "warmup_steps": 1,
                            "taylorseer": True},
                           {"kind": "dbcache", "threshold": 0.9, "first_blocks": 1, "warmup_steps": 2,
                            "max_continuous_cached_steps": 1, "taylorseer": True}, "forwards_reused"),
}


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("family", ["wan", "flux"])
def test_off_is_full_compute_and_on_reuses(family: str, kind: str, request: pytest.FixtureRequest,
                                           uncached) -> None:  # noqa: ANN001 - a fixture
    pipe, params, full = uncached(family, request)
    off_spec, on_spec, counter = KINDS[kind]
    off = pipe.generate(params | {"cache": off_spec})
    assert torch.equal(off.latents, full.latents) and off.cache[counter] == 0
    on = pipe.generate(params | {"cache": on_spec})
    assert on.cache[counter] > 0, on.cache
    if counter == "forwards_reused":
        assert on.cache["forwards_computed"] + on.cache["forwards_reused"] == params["num_inference_steps"]
    assert not torch.equal(on.latents, full.latents)
