"""GatewaySettings: every gateway option, validated once, from flags, SPLITSERVE_* variables, a file or in-process."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from pydantic import Field

from splitserve.settings_cli import ProcessSettings, SettingsError, build_parser, load_settings

__all__ = ["DEFAULT_PREFIX", "DEFAULT_REDIS_URL", "GatewaySettings", "SettingsError", "gateway_parser", "parse_args"]

DEFAULT_PREFIX = "splitserve"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


class GatewaySettings(ProcessSettings):
    """Options of one gateway process. Sizes are in tokens, times in seconds.

    Built in code, keyword arguments win over SPLITSERVE_* variables, which win over the defaults.
    """

    model: Path = Field(description="model folder: tokenizer.json and config.json are read")
    redis_url: str = Field(DEFAULT_REDIS_URL, description="Redis holding the worker registry")
    host: str = Field("0.0.0.0", description="address to serve gRPC on")
    port: int = Field(50051, ge=0, le=65535, description="gRPC port; 0 picks a free port")
    prefix: str = Field(DEFAULT_PREFIX, min_length=1, description="Redis key prefix of the registry")
    chunk_size: int = Field(512, ge=1, description="prefill chunk size C")
    max_prefill_chunks: int = Field(0, ge=0, description="k: the prefill group computes at most k*C tokens; 0 = all")
    short_prompt_threshold: int = Field(32, ge=0, description="prompts shorter than this skip the prefill group")
    max_inflight: int = Field(256, ge=1, description="requests in flight before RESOURCE_EXHAUSTED")
    max_model_len: int | None = Field(None, ge=1, description="caps the model's context; none = the model's")
    metrics_port: int = Field(0, ge=0, le=65535, description="Prometheus port; 0 = no metrics endpoint")
    log_format: Literal["console", "json"] = Field("console", description="log lines on stderr")
    retries: int = Field(2, ge=0, description="decode attempts after the first when a decode worker dies")
    worker_ttl_s: float = Field(3.0, gt=0, description="a registry entry older than this is dead")
    registry_refresh_s: float = Field(0.5, gt=0, description="how often the registry is re-read from Redis")
    cancel_timeout_s: float = Field(1.0, gt=0, description="deadline of Cancel/AbandonTransfer calls to workers")


def gateway_parser(prog: str = "splitserve gateway") -> argparse.ArgumentParser:
    """The gateway's flags: one per GatewaySettings field, plus --config FILE."""
    return build_parser(GatewaySettings, prog, "splitserve gateway: the public gRPC endpoint",
                        [("gateway settings", list(GatewaySettings.model_fields))])


def parse_args(argv: Sequence[str] | None = None, prog: str = "splitserve gateway") -> GatewaySettings:
    """Flags > SPLITSERVE_* environment > --config file > defaults; SettingsError (one line) on bad input."""
    return load_settings(GatewaySettings, gateway_parser(prog), argv)
