"""Batch runs: `ray job submit ... -- python -m actors.batch` on a local `ray start --head` cluster."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
import pytest

from actors.batch import read_items
from tests.local_cluster import HeadNode

REPO = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).with_name("ray"))


def test_read_items_keys_and_bad_lines(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_text('{"prompt": "a", "id": "first"}\n\nnot json\n[1, 2]\n{"prompt": "b", "seed": 3}\n')
    items = read_items(path)
    assert [i.line for i in items] == [1, 3, 4, 5]
    assert items[0].key == "first" and items[0].params == {"prompt": "a"}
    assert items[1].params is None and "line 3" in items[1].error
    assert items[2].params is None and "JSON object" in items[2].error
    assert items[3].key.startswith("line5-") and items[3].params == {"prompt": "b", "seed": 3}
    assert read_items(path)[3].key == items[3].key, "keys must be stable across runs"


def _submit(env: dict[str, str], args: list[str]) -> subprocess.CompletedProcess[str]:
    """`ray job submit`, retried while the fresh head's job agent is still starting (its 500 says so)."""
    deadline = time.monotonic() + 90
    while True:
        done = subprocess.run(
            [RAY, "job", "submit", "--working-dir", str(REPO), "--", sys.executable, "-m", "actors.batch", *args],
            env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
        if "No available agent" not in done.stderr + done.stdout or time.monotonic() > deadline:
            return done
        time.sleep(2)


@pytest.mark.slow
def test_ray_job_submit_batch_and_resume(head_node: HeadNode, tiny_model: str, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join([
        json.dumps({"id": "red", "prompt": "a red circle moving left", "height": 32, "width": 32, "num_frames": 5,
                    "num_inference_steps": 2, "seed": 1}),
        json.dumps({"id": "blue", "prompt": "a blue square", "height": 32, "width": 48, "num_frames": 1,
                    "num_inference_steps": 2, "seed": 2}),
        json.dumps({"id": "bad", "prompt": "too tall", "height": 100}),
        "this line is not json",
        json.dumps({"id": "cached", "prompt": "a green triangle", "height": 32, "width": 32, "num_frames": 5,
                    "num_inference_steps": 4, "seed": 3, "cache": {"kind": "fbcache", "threshold": 0.5}}),
        json.dumps({"id": "badcache", "prompt": "x", "cache": {"kind": "fbcache", "threshold": 7}}),
    ]) + "\n")
    out = tmp_path / "out"
    args = ["--input", str(prompts), "--output", str(out), "--set", f"model={tiny_model}", "--quiet"]

    first = _submit(head_node.env, args)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    by_key = {row["key"]: row for row in rows}
    assert by_key["red"]["status"] == by_key["blue"]["status"] == "succeeded", rows
    assert Path(by_key["red"]["result_path"]).suffix == ".mp4" and Path(by_key["blue"]["result_path"]).suffix == ".png"
    assert all(Path(row["result_path"]).is_file() for row in rows if row["status"] == "succeeded")
    assert by_key["bad"]["status"] == "failed" and "height" in by_key["bad"]["error"]
    assert [row["status"] for row in rows][3] == "failed" and rows[3]["error"].startswith("line 4")
    # a line's feature cache runs; its settings and counts land in the manifest and the sidecar
    assert by_key["cached"]["status"] == "succeeded" and by_key["cached"]["params"]["cache"]["threshold"] == 0.5
    counts = by_key["cached"]["cache"]
    assert counts["forwards_computed"] + counts["forwards_reused"] == 4
    sidecar = json.loads(Path(by_key["cached"]["result_path"]).with_suffix(".json").read_text())
    assert sidecar["cache"] == counts and sidecar["params"]["cache"]["kind"] == "fbcache"
    assert by_key["badcache"]["status"] == "failed" and "cache.threshold" in by_key["badcache"]["error"]

    second = _submit(head_node.env, args)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    again = {row["key"]: row for row in map(json.loads, (out / "manifest.jsonl").read_text().splitlines())}
    assert again["red"]["skipped"] and again["blue"]["skipped"], again
    assert again["red"]["id"] == by_key["red"]["id"]
    assert again["bad"]["status"] == "failed" and not again["bad"]["skipped"]
