"""Opt-in fixtures for the Ray tests: one local Ray for the session, the tiny model, an event loop.

Nothing here is autouse: the scheduler and job-store tests run without Ray.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Awaitable, Callable, Iterator, TypeVar

import pytest

T = TypeVar("T")


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[None]:
    """A local Ray with more logical CPUs than cores (Ray allows it); actors ask for 0.5 CPU each."""
    import ray

    started = not ray.is_initialized()
    if started:
        # address="local": never attach to a cluster some other process started with `ray start`
        ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False)
    yield
    if started:
        ray.shutdown()


@pytest.fixture(scope="session")
def head_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A `ray start --head` cluster of its own (tests.local_cluster.HeadNode), shared by the batch and
    `serve deploy` tests; each leaves it as it found it."""
    from tests.local_cluster import head_node as start_head_node

    with start_head_node(tmp_path_factory.mktemp("raytmp")) as node:
        yield node


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The wan-tiny checkpoint with seeded random weights, in a temporary folder (never the user's cache)."""
    from models.wan.default_model import write_random_checkpoint

    return str(write_random_checkpoint(tmp_path_factory.mktemp("wan-tiny")))


@pytest.fixture(scope="module")
def run() -> Iterator[Callable[[Awaitable[Any]], Any]]:
    """Runs coroutines on one event loop per module, so pools and groups built by fixtures stay usable."""
    loop = asyncio.new_event_loop()

    def run_until_complete(awaitable: Awaitable[T]) -> T:
        return loop.run_until_complete(awaitable)

    yield run_until_complete
    loop.close()


@pytest.fixture()
def wait_until_dead() -> Callable[..., None]:
    """Blocks until calls to an actor fail with an actor error, so a test never races ray.kill."""
    import ray
    from ray.exceptions import RayActorError

    def wait(actor: Any, timeout_s: float = 20.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                ray.get(actor.ping.remote(), timeout=timeout_s)
            except RayActorError:
                return
            time.sleep(0.05)
        raise AssertionError(f"{actor} still answers {timeout_s} s after ray.kill")

    return wait
