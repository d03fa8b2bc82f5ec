"""The server's one settings object.

Every setting comes from an environment variable ``FORGEDIT_<NAME>`` (case-insensitive) or,
if ``FORGEDIT_CONFIG_FILE`` names one, from a ``KEY=value`` dotenv file; the environment wins.
Lists and maps are JSON, e.g. ``FORGEDIT_BASE_MODELS='{"sd15": "/models/sd15"}'`` or
``FORGEDIT_AUTH_TOKENS='[{"name": "alice", "token": "...", "admin": false}]'``.
``MLFLOW_TRACKING_URI`` is honoured when ``FORGEDIT_MLFLOW_TRACKING_URI`` is unset.

With no configuration at all the server runs the embedded default: the tiny deterministic
model (written on first use by ``forgedit.zoo``), MLflow on a local SQLite
file under the data directory, loopback only, no token.

``ServerSettings()`` is built once in ``main()`` and passed down; nothing else reads the
environment.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from forgedit.config import DeltaFormat, parse_size
from forgedit.errors import InvalidInputError
from server.auth import TokenEntry, token_entries
from server.shares import quarter
from server.transport import MAX_MESSAGE_BYTES, MIB

# Of FORGEDIT_GRPC_THREADS (gRPC's bound on calls at once, see ``server.interceptors``): at most
# HEALTH_CALLS health calls (they need no token; a quarter of them per client address), and at
# least UNARY_THREADS left for the other unary calls, beside FORGEDIT_MAX_STREAMS streams.
HEALTH_CALLS = 8
UNARY_THREADS = 8

LogFormat = Literal["json", "text"]


class TimePrior(BaseModel):
    """Where the run-time estimator starts for one kind of base model on one kind of device,
    before it has measured anything (it then follows measured rates)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    training_sample_s: float = Field(
        gt=0, description="One training sample (one image of an update's batch), fwd + bwd."
    )
    image_step_s: float = Field(
        gt=0, description="One denoising step of one image at the native size, CFG included."
    )


# Keys are "<size>-<device kind>", size from the UNet's config (``server.main.model_size``).
DEFAULT_TIME_PRIORS: dict[str, TimePrior] = {
    # SD 1.x on an A100 (the paper and the two-stage letter): joint training 30-40 s for 40
    # updates of batch 10, i.e. ~0.0875 s per sample (two_stage: 29 s + 86 s for 400 + 1000
    # samples); 1.6 s per 50-step 512² image in eager fp32.
    "sd1-cuda": TimePrior(training_sample_s=0.0875, image_step_s=0.032),
    # SD 1.x on a CPU: an order of magnitude only (never measured here); set your own.
    "sd1-cpu": TimePrior(training_sample_s=15.0, image_step_s=4.0),
    # The tiny model at 64², one torch thread on this project's shared 2-core CPU (BENCHMARKS.md):
    # 50 ms per sample at joint's batch 10, 100 ms at two_stage's batch 1 (per-update overhead
    # dominates); 22 ms per image-step in batches of 8.
    "tiny-cpu": TimePrior(training_sample_s=0.075, image_step_s=0.022),
    # Not measured: the CPU's numbers as an upper bound.
    "tiny-cuda": TimePrior(training_sample_s=0.075, image_step_s=0.022),
}


class ServerSettings(BaseSettings):
    """Configuration of one replica. See each field's description."""

    model_config = SettingsConfigDict(
        env_prefix="FORGEDIT_",
        case_sensitive=False,
        env_file=os.environ.get("FORGEDIT_CONFIG_FILE"),
        extra="ignore",
        frozen=True,
        populate_by_name=True,
        env_parse_none_str="none",
    )

    # ----------------------------------------------------------------------------- models
    base_models: dict[str, Path] = Field(
        default_factory=dict,
        description="Base models served, name -> diffusers SD-1.x directory, or 'shapes' for "
        "the shipped toy world (forgedit.zoo.shapes, with its own BLIP). Empty: the tiny "
        "model, named 'tiny'. The first entry is the default for requests that name none.",
    )
    vae_dirs: dict[str, Path] = Field(
        default_factory=dict,
        description="A separate VAE per base model, name -> directory (a VAE folder or a "
        "pipeline with vae/), as the engine CLI's --vae: needed for a base model shipped "
        'without one (Realistic Vision "noVAE"). Names must be in FORGEDIT_BASE_MODELS.',
    )
    blip_dir: Path | None = Field(
        default=None,
        description="BLIP captioning model directory. Unset: the tiny BLIP when serving the "
        "tiny model, the toy world's for 'shapes', otherwise no captioner (requests must then "
        "give a source prompt).",
    )
    devices: list[str] = Field(
        default_factory=lambda: ["cpu"],
        description="Torch devices, one worker (one job at a time) per device, e.g. "
        '["cuda:0","cuda:1"].',
    )
    precision: Literal["faithful", "fast"] = Field(
        default="faithful",
        description="Default numerics when a request leaves precision unset; 'fast' on GPUs.",
    )
    unet_backend: Literal["auto", "torch", "onnxruntime", "tensorrt"] = Field(
        default="auto",
        description="Which UNet samples: 'auto' = TensorRT on CUDA where it imports and its "
        "canary passes, else ONNX Runtime where installed, else torch. Exports and engine "
        "plans are cached under data_dir/engines; every fallback is logged and counted.",
    )
    delta_format: DeltaFormat | None = Field(
        default=None,
        description="How new edit models store their delta when a request leaves it unset. "
        "Unset: fp32 for faithful precision (exact), int8 for fast (a quarter of the bytes).",
    )
    resolutions: Annotated[list[tuple[int, int]], NoDecode] = Field(
        default_factory=list,
        description="Resolutions served, as WIDTHxHEIGHT separated by commas, e.g. "
        "'512x512,768x512', for every base model. Each replica builds its compiled UNet for "
        "each at warm-up, and is ready only once every one is built or loaded and its canary "
        "passed. Unset: each base model's native size.",
    )
    other_resolutions: Literal["refuse", "torch"] = Field(
        default="refuse",
        description="A request at a resolution not in FORGEDIT_RESOLUTIONS: 'refuse' answers "
        "INVALID_ARGUMENT naming the served sizes; 'torch' serves it on eager torch (no graph "
        "is ever built inside a request; slower than the compiled UNet, same numerics as the "
        "torch backend).",
    )
    max_batch: int = Field(
        default=8,
        ge=1,
        le=64,
        description="Images per batched denoising loop (memory bound; as the engine's "
        "--max-batch).",
    )
    data_dir: Path = Field(
        default=Path(".forgedit-data"),
        description="Local state: the tiny model, the embedded MLflow store, caches, spool.",
    )
    mlflow_tracking_uri: str | None = Field(
        default=None,
        validation_alias=AliasChoices("FORGEDIT_MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_URI"),
        description="MLflow tracking server URI; unset: embedded SQLite under data_dir.",
    )

    mlflow_backend_store_uri: SecretStr | None = Field(
        default=None,
        description="MLflow's own database (the --backend-store-uri of `mlflow server`, e.g. "
        "postgresql://user:pw@db/mlflow): with a tracking server, a deletion needs it to "
        "purge the edit model's runs from the database (README, 'Deletion'); unset with a "
        "tracking server: runs are only soft-deleted, and a warning says so at start-up. "
        "Unneeded for the embedded store.",
    )
    edit_model_ttl_s: float | None = Field(
        default=None,
        description="Time-to-live of new edit models whose request leaves ttl_seconds unset, "
        "1 s to ten years (the registry's rule); unset: kept until deleted.",
    )
    retention_sweep_interval_s: float = Field(
        default=60.0,
        gt=0,
        description="How often the registry deletes expired edit models (at most 20 per "
        "round) and finishes deletions an MLflow outage interrupted.",
    )

    # ----------------------------------------------------------------------------- network
    host: str = Field(
        default="127.0.0.1",
        description="Interface to listen on; '0.0.0.0' or '[::]' in a container.",
    )
    grpc_port: int = Field(default=50051, ge=0, le=65535, description="gRPC port; 0 = any free.")
    metrics_port: int | None = Field(
        default=9464,
        ge=0,
        le=65535,
        description="Prometheus /metrics HTTP port; 0 = any free; 'none' = disabled.",
    )
    metrics_host: str = Field(default="127.0.0.1", description="Interface of the metrics port.")
    max_message_bytes: int = Field(
        default=MAX_MESSAGE_BYTES,
        ge=4 * MIB,
        description="gRPC message size limit, both directions (>= a 4096x4096 PNG).",
    )
    registry_timeout_s: float = Field(
        default=10.0,
        gt=0,
        description="Longest a request waits for the MLflow registry (describe, list, delete) "
        "before answering UNAVAILABLE; a request's own deadline shortens it.",
    )
    registry_threads: int = Field(
        default=8,
        ge=1,
        description="Registry calls of requests that may wait for MLflow at once; more are "
        "answered UNAVAILABLE at once, so a hung MLflow cannot pin the RPC threads.",
    )
    grpc_threads: int = Field(
        default=64,
        ge=4,
        description="Threads serving RPCs, and the most calls gRPC admits at once; each open "
        "stream holds one while it runs. At least FORGEDIT_MAX_STREAMS + 16: 8 for health "
        "calls (no token needed, 2 per client address), 8 for other unary calls.",
    )
    health_port: int | None = Field(
        default=50052,
        ge=0,
        le=65535,
        description="Port of a second gRPC server that answers grpc.health.v1 and reflection "
        "(no token needed) on its own threads, for probes: it answers whatever application "
        "calls do. 0 = any free; 'none' = off (health is always also served on the gRPC port, "
        "reflection there with a token when tokens are configured).",
    )
    max_streams: int = Field(
        default=48,
        ge=1,
        description="Open streams (Edit, Sample, WatchJob, reflection) in all; more -> "
        "RESOURCE_EXHAUSTED. At most FORGEDIT_GRPC_THREADS - 16 (see there).",
    )
    max_streams_per_client: int = Field(
        default=16,
        ge=1,
        description="Open streams per client (its principal with tokens, else its IP address).",
    )
    streams_kept_for_new_clients: int | None = Field(
        default=None,
        ge=0,
        description="The last this many of FORGEDIT_MAX_STREAMS open only for clients with no "
        "stream open, so however many streams a few clients hold, others still get one. "
        "Unset: a quarter of FORGEDIT_MAX_STREAMS.",
    )
    max_connection_age_s: float | None = Field(
        default=300.0,
        gt=0,
        description="After this long a connection is asked to close (GOAWAY), so clients "
        "re-resolve and new replicas receive traffic; 'none' = never.",
    )
    max_connection_age_grace_s: float | None = Field(
        default=None,
        gt=0,
        description="How long calls still open on such a connection may finish; 'none' = "
        "as long as they take (a running Edit is never cut).",
    )

    # ----------------------------------------------------------------------------- security
    auth_tokens: list[TokenEntry | SecretStr] = Field(
        default_factory=list,
        description="Accepted bearer tokens (JSON list): objects "
        '{"name": principal, "token": ..., "admin": false}, or plain token strings (principal '
        "'token-<sha256 prefix>'). Empty: no authentication, one anonymous principal. Health "
        "checks never need one; reflection needs one on the gRPC port, none on the health port.",
    )
    tls_cert_file: Path | None = Field(default=None, description="PEM server certificate.")
    tls_key_file: Path | None = Field(default=None, description="PEM private key of the cert.")
    tls_client_ca_file: Path | None = Field(
        default=None,
        description="PEM CA bundle; when set, clients must present a certificate it signed "
        "(mutual TLS).",
    )

    # ----------------------------------------------------------------------------- limits
    max_image_bytes: int = Field(
        default=32 * MIB, ge=1, description="Largest encoded input image accepted."
    )
    max_image_pixels: int = Field(
        default=4096 * 4096, ge=1, description="Most pixels (w*h, from the header) accepted."
    )
    image_formats: list[str] = Field(
        default_factory=lambda: ["PNG", "JPEG", "WEBP"],
        description="Accepted input formats (detected from content).",
    )
    max_prompt_chars: int = Field(default=1000, ge=1, le=1000, description="Per prompt.")
    max_prompts: int = Field(default=16, ge=1, description="Target prompts per request.")
    max_sweep_values: int = Field(
        default=64, ge=1, description="Entries per list (gammas, alphas, seeds, strategies)."
    )
    max_sweep_images: int = Field(default=256, ge=1, description="Images per request.")
    max_steps: int = Field(default=200, ge=1, le=1000, description="DDIM steps per image.")
    max_training_updates: int = Field(
        default=5000, ge=1, description="Optimiser updates per fine-tune, all stages."
    )
    max_training_overtakes: int = Field(
        default=4,
        ge=0,
        description="Sampling jobs that may start ahead of the first queued Edit before it "
        "runs next (bounded priority of sampling over training; 0 = Edits are never overtaken).",
    )
    max_batch_pixels: int = Field(
        default=2048 * 2048,
        ge=64 * 64,
        description="Per device: most width × height × batch of one training update or "
        "denoising batch (memory grows with it); more -> INVALID_ARGUMENT naming this limit. "
        "The default admits Forgedit's 512x512 batch of 10; raise it on large GPUs.",
    )
    queue_size: int = Field(
        default=16, ge=0, description="Jobs waiting (not running); more -> RESOURCE_EXHAUSTED."
    )
    queue_kept_for_new_clients: int | None = Field(
        default=None,
        ge=0,
        description="The last this many places of FORGEDIT_QUEUE_SIZE take only jobs of "
        "clients with none waiting, so a client that queues many (detached) jobs cannot lock "
        "others out; queued jobs start round-robin by client. Unset: a quarter of the queue.",
    )

    # ----------------------------------------------------------------------------- jobs
    heartbeat_interval_s: float = Field(
        default=5.0, gt=0, description="A heartbeat event fills every silence this long."
    )
    grace_period_s: float = Field(
        default=30.0, ge=0, description="On SIGTERM, how long running jobs may still finish."
    )
    job_retention_s: float = Field(
        default=600.0, ge=0, description="Finished jobs stay visible (GetJob, WatchJob)."
    )
    max_retained_jobs: int = Field(default=64, ge=1, description="Finished jobs kept at most.")
    max_retained_job_bytes: int = Field(
        default=256 * MIB,
        ge=MIB,
        description="Bytes of events (mostly PNGs) that finished jobs keep for replay, in all; "
        "beyond it the oldest finished jobs are forgotten first (gauge "
        "forgedit_retained_job_bytes). At least FORGEDIT_REPLAY_MAX_BYTES, so the newest "
        "finished job always fits. A finished job keeps nothing else of its request.",
    )
    replay_max_events: int = Field(default=4096, ge=16, description="Events buffered per job.")
    replay_max_bytes: int = Field(
        default=64 * MIB, ge=MIB, description="Event bytes (mostly PNGs) buffered per job."
    )
    preview_max_x0: int = Field(
        default=256,
        ge=0,
        description="x0 previews one job may send (PreviewOptions.x0_every); a request that "
        "plans more is refused with INVALID_ARGUMENT naming the x0_every that fits. 0 = none.",
    )
    preview_max_bytes: int = Field(
        default=8 * MIB,
        ge=0,
        description="Bytes of previews one job may send, all kinds together; previews past it "
        "are not sent (the job goes on). In the replay buffer a preview replaces the previous "
        "one of the same image, so previews hold at most one slot per image there.",
    )
    time_priors: dict[str, TimePrior] = Field(
        default_factory=lambda: dict(DEFAULT_TIME_PRIORS),
        description="Run-time estimates before any job is measured (deadline check, retry "
        "hints), per '<size>-<device kind>' (sd1-cuda, sd1-cpu, tiny-cpu, tiny-cuda) as JSON "
        '{"sd1-cuda": {"training_sample_s": 0.0875, "image_step_s": 0.032}}; entries given '
        "replace the built-in ones of the same key.",
    )

    # ----------------------------------------------------------------------------- logs
    log_format: LogFormat = Field(default="json", description="'json' lines or 'text'.")
    log_level: str = Field(default="INFO", description="Python logging level name.")

    @field_validator("resolutions", mode="before")
    @classmethod
    def _parse_resolutions(cls, value: object) -> object:
        """'512x512,768x512' -> [(width, height), ...] (``forgedit.config.parse_size``)."""
        if isinstance(value, str):
            texts = [t for t in (t.strip() for t in value.split(",")) if t]
            try:
                return [parse_size(t, "FORGEDIT_RESOLUTIONS") for t in texts]
            except InvalidInputError as e:
                raise ValueError(str(e)) from None
        return value

    @model_validator(mode="after")
    def _check(self) -> ServerSettings:
        unknown = sorted(set(self.vae_dirs) - set(self.base_models))
        if unknown:
            raise ValueError(
                f"FORGEDIT_VAE_DIRS names base models not in FORGEDIT_BASE_MODELS: "
                f"{', '.join(unknown)}"
            )
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError(
                "set both FORGEDIT_TLS_CERT_FILE and FORGEDIT_TLS_KEY_FILE, or neither"
            )
        if self.edit_model_ttl_s is not None:
            from registry.records import check_ttl  # the one rule for a time-to-live

            check_ttl(self.edit_model_ttl_s, field="FORGEDIT_EDIT_MODEL_TTL_S")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError("mutual TLS (FORGEDIT_TLS_CLIENT_CA_FILE) needs a server certificate")
        if self.max_image_bytes >= self.max_message_bytes:
            raise ValueError("FORGEDIT_MAX_IMAGE_BYTES must be below FORGEDIT_MAX_MESSAGE_BYTES")
        if len(set(self.resolutions)) != len(self.resolutions):
            raise ValueError("FORGEDIT_RESOLUTIONS lists a resolution twice")
        if not self.devices:
            raise ValueError("FORGEDIT_DEVICES must name at least one device")
        entries = token_entries(self.auth_tokens)
        if any(not e.token.get_secret_value() for e in entries):
            raise ValueError("FORGEDIT_AUTH_TOKENS must not contain empty tokens")
        admin_of: dict[str, bool] = {}
        for e in entries:  # a name may repeat (rotation: old and new token), its rights not
            if admin_of.setdefault(e.name, e.admin) != e.admin:
                raise ValueError(
                    f"FORGEDIT_AUTH_TOKENS: the tokens of principal {e.name!r} disagree on admin"
                )
        if len({e.token.get_secret_value() for e in entries}) != len(entries):
            raise ValueError("FORGEDIT_AUTH_TOKENS: a token is listed twice")
        if self.max_retained_job_bytes < self.replay_max_bytes:
            raise ValueError(
                f"FORGEDIT_MAX_RETAINED_JOB_BYTES ({self.max_retained_job_bytes}) must be at "
                f"least FORGEDIT_REPLAY_MAX_BYTES ({self.replay_max_bytes}), so the newest "
                "finished job always fits"
            )
        if self.max_streams > self.grpc_threads - HEALTH_CALLS - UNARY_THREADS:
            raise ValueError(
                f"FORGEDIT_MAX_STREAMS ({self.max_streams}) must leave "
                f"{HEALTH_CALLS + UNARY_THREADS} of FORGEDIT_GRPC_THREADS ({self.grpc_threads}): "
                f"{HEALTH_CALLS} for health calls and {UNARY_THREADS} for other unary calls"
            )
        if self.streams_kept >= self.max_streams:
            raise ValueError(
                f"FORGEDIT_STREAMS_KEPT_FOR_NEW_CLIENTS ({self.streams_kept}) must be below "
                f"FORGEDIT_MAX_STREAMS ({self.max_streams})"
            )
        if self.queue_size and self.queue_kept >= self.queue_size:
            raise ValueError(
                f"FORGEDIT_QUEUE_KEPT_FOR_NEW_CLIENTS ({self.queue_kept}) must be below "
                f"FORGEDIT_QUEUE_SIZE ({self.queue_size})"
            )
        return self

    @property
    def streams_kept(self) -> int:
        """FORGEDIT_STREAMS_KEPT_FOR_NEW_CLIENTS, or its default (``server.shares.quarter``)."""
        kept = self.streams_kept_for_new_clients
        return quarter(self.max_streams) if kept is None else kept

    @property
    def queue_kept(self) -> int:
        """FORGEDIT_QUEUE_KEPT_FOR_NEW_CLIENTS, or its default (``server.shares.quarter``)."""
        kept = self.queue_kept_for_new_clients
        return quarter(self.queue_size) if kept is None else kept

    @property
    def tls(self) -> bool:
        return self.tls_cert_file is not None

    def declared_sizes(self) -> list[tuple[int, int]] | None:
        """``resolutions`` as the engine takes them, ``(height, width)``; None: native."""
        return [(height, width) for width, height in self.resolutions] or None

    def time_prior(self, key: str) -> TimePrior:
        """The prior for ``key`` ("sd1-cuda", ...): the operator's, else the built-in one."""
        priors = {**DEFAULT_TIME_PRIORS, **self.time_priors}
        if key not in priors:
            raise ValueError(
                f"no run-time prior for {key!r}; set FORGEDIT_TIME_PRIORS (known: "
                f"{', '.join(sorted(priors))})"
            )
        return priors[key]
