"""The server's one settings object.

Every setting comes from an environment variable ``FORGEDIT_<NAME>`` (case-insensitive) or,
if ``FORGEDIT_CONFIG_FILE`` names one, from a ``KEY=value`` dotenv file; the environment wins.
Lists and maps are JSON, e.g. ``FORGEDIT_AUTH_TOKENS='["token-a","token-b"]'`` or
``FORGEDIT_BASE_MODELS='{"sd15": "/models/sd15"}'``. ``MLFLOW_TRACKING_URI`` is honoured when
``FORGEDIT_MLFLOW_TRACKING_URI`` is unset.

With no configuration at all the server runs the embedded default: the tiny deterministic
model (written on first use by ``forgedit.tiny.ensure_tiny_model``), MLflow on a local SQLite
file under the data directory, loopback only, no token.

``ServerSettings()`` is built once in ``main()`` and passed down; nothing else reads the
environment.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from server.transport import MAX_MESSAGE_BYTES, MIB

LogFormat = Literal["json", "text"]


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
        description="Base models served, name -> diffusers SD-1.x directory. Empty: the tiny "
        "model, named 'tiny'. The first entry is the default for requests that name none.",
    )
    blip_dir: Path | None = Field(
        default=None,
        description="BLIP captioning model directory. Unset: the tiny BLIP when serving the "
        "tiny model, otherwise no captioner (requests must then give a source prompt).",
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
        description="Threads serving RPCs; each open stream holds one while it runs.",
    )

    # ----------------------------------------------------------------------------- security
    auth_tokens: list[SecretStr] = Field(
        default_factory=list,
        description="Accepted bearer tokens (JSON list). Empty: no authentication. Health "
        "checks and reflection never need one.",
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
    replay_max_events: int = Field(default=4096, ge=16, description="Events buffered per job.")
    replay_max_bytes: int = Field(
        default=64 * MIB, ge=MIB, description="Event bytes (mostly PNGs) buffered per job."
    )
    seconds_per_update_prior: float = Field(
        default=0.05,
        gt=0,
        description="Estimate of one training update before any is measured (deadline check).",
    )
    seconds_per_image_step_prior: float = Field(
        default=0.002,
        gt=0,
        description="Estimate of one denoising step of one image before any is measured.",
    )

    # ----------------------------------------------------------------------------- logs
    log_format: LogFormat = Field(default="json", description="'json' lines or 'text'.")
    log_level: str = Field(default="INFO", description="Python logging level name.")

    @model_validator(mode="after")
    def _check(self) -> ServerSettings:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError(
                "set both FORGEDIT_TLS_CERT_FILE and FORGEDIT_TLS_KEY_FILE, or neither"
            )
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError("mutual TLS (FORGEDIT_TLS_CLIENT_CA_FILE) needs a server certificate")
        if self.max_image_bytes >= self.max_message_bytes:
            raise ValueError("FORGEDIT_MAX_IMAGE_BYTES must be below FORGEDIT_MAX_MESSAGE_BYTES")
        if not self.devices:
            raise ValueError("FORGEDIT_DEVICES must name at least one device")
        if any(not t.get_secret_value() for t in self.auth_tokens):
            raise ValueError("FORGEDIT_AUTH_TOKENS must not contain empty tokens")
        return self

    @property
    def tls(self) -> bool:
        return self.tls_cert_file is not None
