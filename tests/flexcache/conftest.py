"""Shared pipelines of the cache tests: tiny random Wan2.2 (two experts, CFG) and FLUX.1-dev checkpoints."""

from __future__ import annotations

import pytest

from models.flux.config import FLUX_TINY
from models.flux.tiny import write_random_checkpoint as write_flux
from models.wan.default_model import write_random_checkpoint as write_wan
from stages.pipeline import GenerationResult, Pipeline


@pytest.fixture(scope="session")
def wan_two_experts(tmp_path_factory: pytest.TempPathFactory) -> Pipeline:
    root = tmp_path_factory.mktemp("wan-fb")
    write_wan(root, num_experts=2, seed=5)
    return Pipeline.from_pretrained(root)


@pytest.fixture(scope="session")
def flux_dev(tmp_path_factory: pytest.TempPathFactory) -> Pipeline:
    return Pipeline.from_pretrained(write_flux(tmp_path_factory.mktemp("flux-fb"), dit=FLUX_TINY, seed=6))


WAN_REQUEST = dict(prompt="a red circle moving left", height=32, width=32, num_frames=5, num_inference_steps=8,
                   guidance_scale=4.0, guidance_scale_2=3.0, seed=2)
FLUX_REQUEST = dict(prompt="a red circle", height=64, width=64, num_inference_steps=8, seed=2)


def full_compute(family: str, request: pytest.FixtureRequest) -> tuple[Pipeline, dict, GenerationResult]:
    """The family's pipeline, its request and the uncached result."""
    pipe: Pipeline = request.getfixturevalue("wan_two_experts" if family == "wan" else "flux_dev")
    params = WAN_REQUEST if family == "wan" else FLUX_REQUEST
    return pipe, params, pipe.generate(params)


@pytest.fixture()
def uncached():
    """full_compute, as a fixture: (family, request) -> (pipeline, request params, the uncached result)."""
    return full_compute
