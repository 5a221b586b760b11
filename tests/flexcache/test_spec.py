"""The request's `cache` parameter: accepted forms, errors that name the knob and its range (Python, CLI,
HTTP contract), and the CLI's KIND[:key=value,...] form end to end with the sidecar record."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from flexcache.spec import FBCacheSpec, parse_cache_option
from stages.params import GenerationParams

BAD_CACHES = {
    "threshold out of range": ({"kind": "fbcache", "threshold": 2}, "cache.threshold must be a number between 0 and 1"),
    "unknown kind": ({"kind": "nope"}, "cache.kind must be one of 'fbcache', 'dbcache', 'teacache'"),
    "unknown knob": ({"kind": "fbcache", "window": 3}, "cache has no knob 'window' for fbcache"),
    "no kind": ({"threshold": 0.1}, "cache.kind must be one of 'fbcache', 'dbcache', 'teacache'"),
    "teacache mode": ({"kind": "teacache", "mode": "fast"}, "cache.mode must be 'default' or 'ret_steps' (Wan)"),
    "not an object": (3, "cache must be null (no feature cache) or an object"),
}


def test_a_cache_object_and_its_defaults() -> None:
    params = GenerationParams(prompt="p", cache={"kind": "fbcache"})
    assert params.cache == FBCacheSpec(kind="fbcache", threshold=0.08)
    assert GenerationParams(prompt="p").cache is None


@pytest.mark.parametrize("case", list(BAD_CACHES))
def test_bad_caches_are_refused_naming_the_knob(case: str) -> None:
    value, message = BAD_CACHES[case]
    with pytest.raises(ValidationError) as info:
        GenerationParams(prompt="p", cache=value)
    (error,) = info.value.errors()
    assert error["loc"][0] == "cache" and message in error["msg"]


def test_the_cli_form() -> None:
    assert parse_cache_option("fbcache") == {"kind": "fbcache"}
    assert parse_cache_option("fbcache:threshold=0.12") == {"kind": "fbcache", "threshold": 0.12}
    assert parse_cache_option("teacache:threshold=0.1,coefficients=2.5e2;-1;0") == {
        "kind": "teacache", "threshold": 0.1, "coefficients": [250.0, -1, 0]}
    with pytest.raises(ValueError, match="KIND"):
        parse_cache_option("fbcache:threshold")


@pytest.mark.parametrize("case", list(BAD_CACHES))
def test_the_http_contract_answers_422_naming_the_knob(case: str, tmp_path: Path) -> None:
    from actors.config import ServiceConfig
    from models.registry import describe
    from models.wan.default_model import write_random_checkpoint
    from serve_app import ApiError, RequestContract

    contract = RequestContract(ServiceConfig().limits, describe(write_random_checkpoint(tmp_path)), "wan-tiny")
    value, message = BAD_CACHES[case]
    with pytest.raises(ApiError) as info:
        contract.parse({"prompt": "p", "cache": value}, image=False)
    assert info.value.status == 422 and message in str(info.value) and info.value.param == "cache"
    _, params = contract.parse({"prompt": "p", "cache": {"kind": "fbcache", "threshold": 0.2}}, image=False)
    assert params.cache == FBCacheSpec(kind="fbcache", threshold=0.2)


def test_cli_runs_with_a_cache_and_records_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture) -> None:
    from models.wan.default_model import write_random_checkpoint
    from stages.cli import main

    root = write_random_checkpoint(tmp_path / "wan")
    out = tmp_path / "clip.mp4"
    args = ["generate", "--model", str(root), "--prompt", "a red circle", "--height", "32", "--width", "32",
            "--frames", "5", "--steps", "6", "--seed", "1", "-q", "--out", str(out)]
    assert main(args + ["--cache", "fbcache:threshold=0.9"]) == 0
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["params"]["cache"] == {"kind": "fbcache", "threshold": 0.9, "target_psnr": None}
    assert record["cache"]["forwards_computed"] + record["cache"]["forwards_reused"] == 6
    assert main(args + ["--cache", "fbcache:threshold=7"]) == 2
    assert "cache.threshold must be a number between 0 and 1" in capsys.readouterr().err
