"""One way for the Serve tests to run the real app: on loopback, in the session's Ray, tiny model."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

# Stage actors ask for half a CPU each: the session's Ray advertises 8 logical CPUs on 2 cores.
SMALL_ACTORS = {"text_encoder.num_cpus": 0.5, "vae.num_cpus": 0.5, "dit.num_cpus": 0.5}


def serve_url() -> str:
    """Start Serve on 127.0.0.1 (a free port) unless it runs already, and return its base URL.

    A Serve that an earlier module started keeps its own port (serve.start ignores new HTTP options
    then), so the port is read back from the running Serve rather than assumed.
    """
    from ray import serve
    from ray.serve.context import _get_global_client

    from parallel.launch import free_port

    serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
    return f"http://127.0.0.1:{_get_global_client().http_config.port}"


def service_config(model: str, work: Path, overrides: Mapping[str, Any]) -> Any:
    """The ServiceConfig of a test service: its job store and outputs in `work`, small actors, `overrides`."""
    from actors.config import ServiceConfig

    return ServiceConfig.load(overrides={"model": model, "job_store": str(work / "jobs.sqlite"),
                                         "output_dir": str(work / "out"), **SMALL_ACTORS, **overrides})


@contextmanager
def running_service(app: str, model: str, work: Path, overrides: Mapping[str, Any] = {},
                    route_prefix: str = "/", **deployment_options: Any) -> Iterator[str]:
    """Serve the app named `app` at `route_prefix` for the block; yields its base URL (prefix included)."""
    from ray import serve

    from serve_app import build_app

    url = serve_url()
    serve.run(build_app(service_config(model, work, overrides), **deployment_options),
              name=app, route_prefix=route_prefix)
    try:
        yield url + route_prefix.rstrip("/")
    finally:
        serve.delete(app)
