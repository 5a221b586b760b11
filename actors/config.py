"""System params: one validated config for the service, the batch runner and the benchmarks.

Built once at start-up from an optional YAML file plus `key.sub=value` overrides (CLI or Serve
builder args); `extra="forbid"` everywhere, so a misspelt or renamed key fails at start-up.
Only entry points build it; everything below receives it through constructors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Iterable, Literal, Mapping

import yaml
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator, model_validator


DATA_DIR = "smartdiff-data"
"""The service's default folder for its job store and results (relative to where it starts; git-ignored)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _HealthChecked(_Strict):
    """The periodic health check every stage's actors (or ranks) get from the engine."""

    health_check_period_s: float = Field(5.0, gt=0, le=3600,
                                         description="How often the engine pings every actor or rank of the stage "
                                                     "(in its own health thread, so busy ones answer too); a dead "
                                                     "or silent one is replaced (its group rebuilt) without waiting "
                                                     "for a job, and /readyz says 503 until it is back.")
    health_check_timeout_s: float = Field(30.0, gt=0, le=3600,
                                          description="An actor or rank that does not answer a ping within this is "
                                                      "treated as hung and replaced (its group rebuilt).")


class _RankGroupFaults(_Strict):
    """How long a rank group waits for its other ranks after one rank's call failed."""

    fault_grace_s: float = Field(5.0, gt=0, le=600,
                                 description="Rank groups (every DiT group; a decode replica with patch_parallel > "
                                             "1): after one rank's call raises (e.g. out of memory), how long the "
                                             "other ranks get to finish it; ranks still running then are stuck in "
                                             "a collective the failed rank left, so the group is killed, rebuilt "
                                             "and the job retried.")


class PoolConfig(_HealthChecked):
    """A pool of identical stage actors, all in one placement group (one bundle per actor)."""

    replicas: int = Field(1, ge=1, le=64, description="Number of actors in the pool.")
    num_cpus: float | None = Field(
        None, ge=0, description="CPUs reserved per actor (its placement-group bundle). Unset: 1, or an equal share "
                                "of the cluster's CPUs when it has fewer than one per stage actor (actors/resources.py).")
    num_gpus: float = Field(0.0, ge=0, description="GPUs reserved per actor; 0 on CPU-only clusters.")
    init_timeout_s: float = Field(120.0, gt=0, le=3600,
                                  description="Time allowed for placement and for each actor to load its weights "
                                              "(start-up and every replacement).")
    call_timeout_s: float = Field(600.0, gt=0, le=86_400,
                                  description="Longest one call (an encode batch, a decode) may take; after it the "
                                              "actor (or VAE group) is treated as hung: killed, replaced, and the "
                                              "job retried.")


class VAEConfig(PoolConfig, _RankGroupFaults):
    """The decode pool. With patch_parallel > 1 each replica is a group of that many rank actors (one
    torch.distributed group in one STRICT_PACK placement group, num_cpus/num_gpus per rank) that decode
    one horizontal strip each and give the same frames as one actor (parallel/vae_decode.py)."""

    patch_parallel: int = Field(1, ge=1, le=64,
                                description="Rank actors per decode replica (1 = one actor). N > 1: N ranks in one "
                                            "torch.distributed group each decode a strip of rows, for frames too "
                                            "large or slow for one device; exact. num_cpus/num_gpus are per rank.")


class DiTConfig(_HealthChecked, _RankGroupFaults):
    """DiT groups: each is `world_size` rank actors in one STRICT_PACK placement group."""

    groups: int = Field(1, ge=1, le=64, description="Independent DiT groups (data parallel across requests).")
    world_size: int = Field(1, ge=1, le=64, description="Rank actors per group (one torch.distributed group).")
    num_cpus: float | None = Field(None, ge=0, description="CPUs reserved per rank. Unset: 1, or an equal share of "
                                                           "the cluster's CPUs (as for the other pools).")
    num_gpus: float = Field(0.0, ge=0, description="GPUs reserved per rank (1 on GPU clusters).")
    chunk_steps: int | None = Field(None, ge=1, le=1000,
                                    description="Most denoising steps per dispatch to the DiT group; unset = every "
                                                "step that is left, in one dispatch. Progress events, cancellation "
                                                "and priority preemption act per step either way (streamed and "
                                                "out of band); a smaller chunk only adds a round trip and a group "
                                                "check per chunk.")
    step_events: bool = Field(True, description="Stream a progress event per denoising step from the running "
                                                "group (the job's step and the SSE events); false: progress moves "
                                                "once per dispatch.")
    init_timeout_s: float = Field(120.0, gt=0, description="Time allowed for placement and process-group start-up.")
    step_timeout_s: float = Field(300.0, gt=0, le=86_400,
                                  description="Longest one denoising step may take on the ranks (a dispatch gets "
                                              "its steps times this, any other group call once this); after it "
                                              "the group is treated as hung: killed, rebuilt and the job retried.")
    cfg_degree: int | None = Field(None, ge=1, le=2,
                                   description="Ranks per request over the CFG branches (1 or 2). The three degrees "
                                               "must multiply to world_size; all unset = automatic layout, "
                                               "otherwise an unset degree is 1.")
    ring_degree: int | None = Field(None, ge=1, le=64, description="Ring-attention degree (K/V blocks rotate).")
    ulysses_degree: int | None = Field(None, ge=1, le=64,
                                       description="Ulysses degree (all-to-all over heads); must divide the heads.")


class SchedulerConfig(_Strict):
    max_pending_jobs: int = Field(32, ge=1, le=100_000,
                                  description="Accepted but unfinished jobs; more are refused with 429 + Retry-After.")
    text_batch_size: int = Field(8, ge=1, le=256, description="Requests encoded together in one text-encoder call.")
    max_attempts: int = Field(2, ge=1, le=10,
                              description="Tries per job when a stage actor dies (the pool is rebuilt between tries).")
    retry_after_s: int = Field(5, ge=1, le=3600, description="Retry-After sent with 429/503 responses.")


# The request schema's own maxima (stages/params.py: MAX_SIZE, MAX_FRAMES, MAX_STEPS), restated here so
# that loading the config never imports torch; tests/test_api_contract.py checks that they agree.
SCHEMA_MAX_SIZE, SCHEMA_MAX_FRAMES, SCHEMA_MAX_STEPS = 2048, 257, 200


class LimitsConfig(_Strict):
    """Operator limits on what one HTTP request may ask for, at or below the request schema's maxima.

    Enforced when a request is accepted (422 naming the field and the limit) and published in the
    service's /openapi.json, so clients and fuzzers see the bounds the service really applies. A
    request that leaves a field empty gets the model's default, capped at these limits.
    """

    max_width: int = Field(SCHEMA_MAX_SIZE, ge=16, le=SCHEMA_MAX_SIZE, multiple_of=16,
                           description="Largest frame width in pixels a request may ask for (multiple of 16).")
    max_height: int = Field(SCHEMA_MAX_SIZE, ge=16, le=SCHEMA_MAX_SIZE, multiple_of=16,
                            description="Largest frame height in pixels a request may ask for (multiple of 16).")
    max_frames: int = Field(SCHEMA_MAX_FRAMES, ge=1, le=SCHEMA_MAX_FRAMES,
                            description="Most video frames a request may ask for (of the form 4n+1).")
    max_steps: int = Field(SCHEMA_MAX_STEPS, ge=1, le=SCHEMA_MAX_STEPS,
                           description="Most denoising steps a request may ask for.")
    max_body_bytes: int = Field(1 << 20, ge=1024, le=1 << 30,
                                description="Largest request body in bytes; larger ones are refused with 413 "
                                            "before they are parsed.")
    image_timeout_s: float = Field(600.0, gt=0, le=86_400,
                                   description="How long POST /v1/images/generations waits for its image; after "
                                               "that it answers 503 naming the job id (the job keeps running).")

    @field_validator("max_frames")
    @classmethod
    def _four_n_plus_one(cls, value: int) -> int:
        if (value - 1) % 4:
            raise ValueError(f"max_frames must be of the form 4n+1 (1, 5, 9, ..., 81, ...), got {value}; "
                             f"use {4 * ((value - 1) // 4) + 1}")
        return value


ApiKey = Annotated[str, StringConstraints(min_length=8, max_length=512, pattern=r"^[!-~]+$")]


class AuthConfig(_Strict):
    """Optional API keys. With any key set, every route except /healthz, /readyz, /docs and /openapi.json
    needs `Authorization: Bearer <key>` (401 otherwise); with none set the API is open."""

    api_keys: list[ApiKey] = Field(default_factory=list, max_length=10_000,
                                   description="Accepted keys (8-512 visible ASCII characters each). Prefer "
                                               "api_keys_file, which keeps keys out of the Serve config.")
    api_keys_file: Path | None = Field(None, description="File of accepted keys, one per line; blank lines and "
                                                         "lines starting with # are ignored. Read at start-up.")

    def keys(self) -> list[str]:
        """api_keys plus the keys in api_keys_file (read now), each checked like api_keys."""
        keys = list(self.api_keys)
        if self.api_keys_file is not None:
            lines = Path(self.api_keys_file).read_text().splitlines()
            for number, line in enumerate(lines, 1):
                key = line.strip()
                if not key or key.startswith("#"):
                    continue
                if not 8 <= len(key) <= 512 or not all("!" <= c <= "~" for c in key):
                    raise ValueError(f"{self.api_keys_file}:{number}: an API key must be 8-512 visible ASCII "
                                     f"characters without spaces (got {len(key)} characters)")
                keys.append(key)
        return keys


class ServiceConfig(_Strict):
    """Everything the operator fixes at start-up: the system params (docs/design.md, "Three kinds of parameters")."""

    model: str | None = Field(None, description="Checkpoint folder (original or diffusers layout); "
                                                "None = the embedded default model.")
    cache_calibration: Path | None = Field(None, description="Feature-cache calibration file (`smartdiff "
                                                             "calibrate`); None = the checkpoint folder's own, if any.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = cuda when actors get GPUs.")
    dtype: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto = bf16 on CUDA, fp32 on CPU.")
    text_encoder: PoolConfig = PoolConfig()
    dit: DiTConfig = DiTConfig()
    vae: VAEConfig = VAEConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    job_store: Path = Field(Path(DATA_DIR) / "jobs.sqlite",
                            description="SQLite file recording every accepted job. A relative path is taken from the "
                                        "folder the service (or batch run) was started in.")
    job_store_lock_timeout_s: float = Field(
        120.0, gt=0, le=3600, description="How long a starting engine waits for the previous owner of job_store "
                                         "(e.g. the replica it replaces) to stop before failing with that owner's pid.")
    output_dir: Path = Field(Path(DATA_DIR) / "outputs",
                             description="Where results (mp4/png + JSON sidecar) are written; relative as job_store.")
    resume_unfinished: bool = Field(True, description="On start-up, re-queue jobs a previous run accepted but did "
                                                      "not finish (False: mark them failed with the reason).")
    limits: LimitsConfig = LimitsConfig()
    auth: AuthConfig = AuthConfig()

    @model_validator(mode="after")
    def _gpus_need_cuda(self) -> "ServiceConfig":
        if self.device == "cpu" and (self.dit.num_gpus or self.vae.num_gpus or self.text_encoder.num_gpus):
            raise ValueError("device is 'cpu' but GPUs are reserved for actors; set device to 'auto' or 'cuda'")
        return self

    def actor_device(self, num_gpus: float) -> str:
        """The torch device of an actor that reserves `num_gpus`."""
        if self.device == "auto":
            return "cuda" if num_gpus > 0 else "cpu"
        return self.device

    @classmethod
    def load(cls, path: str | Path | None = None, overrides: Iterable[str] | Mapping[str, Any] = ()) -> "ServiceConfig":
        """YAML file (optional) + overrides such as ``["dit.world_size=2", "model=/ckpt"]`` or a nested dict."""
        data: dict[str, Any] = {}
        if path is not None:
            loaded = yaml.safe_load(Path(path).read_text()) or {}
            if not isinstance(loaded, dict):
                raise ValueError(f"{path} must hold a mapping of config keys")
            data = loaded
        items = overrides.items() if isinstance(overrides, Mapping) else (_split(o) for o in overrides)
        for key, value in items:
            _set_dotted(data, key, value)
        return cls.model_validate(data)


def _split(override: str) -> tuple[str, Any]:
    if "=" not in override:
        raise ValueError(f"override {override!r} must look like key.sub=value")
    key, raw = override.split("=", 1)
    return key.strip(), yaml.safe_load(raw) if raw.strip() else None


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    if isinstance(value, Mapping):
        for sub, v in value.items():
            _set_dotted(data, f"{key}.{sub}", v)
        return
    *parents, leaf = key.split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"cannot set {key}: {part} is not a section")
    node[leaf] = value
