"""Batch runs: a JSONL file of prompts through the same stage engine and pools as the service.

    ray job submit --working-dir . -- python -m actors.batch --input prompts.jsonl --output out/
    python -m actors.batch --input prompts.jsonl --output out/ --set dit.chunk_steps=5   # local Ray

Each input line is a JSON object with a "prompt" and any request parameter (height, num_frames,
seed, ...), optionally an "id". All prompts stream through the pools together (encoding of one
overlaps denoising of another). Results land in the output folder next to a `manifest.jsonl` with
one line per input line (status, result path or error). The job store lives in the output folder,
so a re-run skips prompts that already succeeded, finishes the ones a crashed run left behind and
retries the failed ones.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import pydantic
from tqdm import tqdm

from actors.config import ServiceConfig
from actors.engine import QueueFull, StageEngine
from actors.job_store import JobStore
from stages.params import format_validation_error

logger = logging.getLogger(__name__)

MANIFEST = "manifest.jsonl"
JOB_STORE = "jobs.sqlite"


@dataclass
class BatchItem:
    line: int
    key: str
    params: dict[str, Any] | None
    error: str | None = None


def read_items(path: Path) -> list[BatchItem]:
    """One item per non-empty line; a line that is not a JSON object becomes a failed item."""
    items = []
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        if not raw.strip():
            continue
        digest = hashlib.sha1(raw.encode()).hexdigest()[:12]
        try:
            data = json.loads(raw)
            if not isinstance(data, dict):
                raise ValueError("each line must be a JSON object with a 'prompt'")
        except (json.JSONDecodeError, ValueError) as exc:
            items.append(BatchItem(number, f"line{number}-{digest}", None, f"line {number}: {exc}"))
            continue
        key = str(data.pop("id", f"line{number}-{digest}"))
        items.append(BatchItem(number, key, data))
    return items


async def run_batch(items: list[BatchItem], engine: StageEngine, progress: bool = True) -> list[dict[str, Any]]:
    """Submit every item (skipping finished ones), wait for all, return one manifest row per item."""
    store = engine.store
    waiting: dict[str, BatchItem] = {}
    rows: dict[str, dict[str, Any]] = {}
    bar = tqdm(total=len(items), desc="batch", unit="prompt", disable=not progress)

    for item in items:
        existing = store.get_by_key(item.key)
        if existing is not None and existing.status == "succeeded":
            rows[item.key] = _row(item, existing.to_dict(), skipped=True)
            bar.update()
            continue
        if existing is not None and not existing.done:  # resumed by the engine after a crash
            waiting[existing.id] = item
            continue
        if existing is not None:  # failed or cancelled before: try again
            store.delete(existing.id)
        if item.params is None:
            rows[item.key] = _row(item, {"status": "failed", "error": item.error})
            bar.update()
            continue
        while True:
            try:
                record = await engine.submit(item.params, key=item.key)
                waiting[record.id] = item
                break
            except pydantic.ValidationError as exc:
                rows[item.key] = _row(item, {"status": "failed", "error": format_validation_error(exc)})
                bar.update()
                break
            except QueueFull:
                await _wait_any(engine, waiting, rows, bar)

    while waiting:
        await _wait_any(engine, waiting, rows, bar)
    bar.close()
    return [rows[item.key] for item in items]


async def _wait_any(engine: StageEngine, waiting: dict[str, BatchItem], rows: dict[str, dict[str, Any]],
                    bar: tqdm) -> None:
    tasks = {asyncio.ensure_future(engine.wait(job_id)): job_id for job_id in waiting}
    done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    for task in pending:
        task.cancel()
    for task in done:
        job_id = tasks[task]
        item = waiting.pop(job_id)
        rows[item.key] = _row(item, task.result().to_dict())
        bar.update()


def _row(item: BatchItem, record: dict[str, Any], skipped: bool = False) -> dict[str, Any]:
    return {"line": item.line, "key": item.key, "id": record.get("id"), "status": record.get("status"),
            "skipped": skipped, "result_path": record.get("result_path"), "error": record.get("error"),
            "params": record.get("params", item.params), "cache": record.get("cache")}


async def main_async(args: argparse.Namespace) -> int:
    output = Path(args.output).resolve()
    output.mkdir(parents=True, exist_ok=True)
    cfg = ServiceConfig.load(args.config, [*args.set, f"output_dir={output}", f"job_store={output / JOB_STORE}"])
    items = read_items(Path(args.input))
    engine = StageEngine(cfg, store=JobStore(cfg.job_store))
    await engine.start()
    try:
        rows = await run_batch(items, engine, progress=not args.quiet)
    finally:
        await engine.shutdown()
    with open(output / MANIFEST, "w") as manifest:
        for row in rows:
            manifest.write(json.dumps(row, ensure_ascii=False) + "\n")
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    skipped = sum(row["skipped"] for row in rows)
    print(f"batch done: {counts} ({skipped} skipped as already finished); manifest: {output / MANIFEST}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m actors.batch", description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", required=True, help="JSONL file, one request object per line")
    parser.add_argument("--output", required=True, help="folder for results, manifest.jsonl and the job store")
    parser.add_argument("--config", default=None, help="service YAML (pool sizes, model, ...)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, e.g. --set dit.world_size=2 (repeatable)")
    parser.add_argument("--address", default=None, help="Ray cluster address (default: the job's cluster or local)")
    parser.add_argument("-q", "--quiet", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    import ray

    ray.init(address=args.address, log_to_driver=False)
    try:
        return asyncio.run(main_async(args))
    finally:
        ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())
