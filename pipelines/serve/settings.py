"""The Serve application's settings: the ``args`` of infra/serve.yaml, or ``python -m jobs.serve``'s flags."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import get_type_hints

from pipelines.preprocess import MAX_PIXELS


@dataclass
class ServeSettings:
    """``registry`` and ``model`` default to $CROSSVIT_REGISTRY and $CROSSVIT_MODEL."""

    registry: str = ""
    model: str = ""
    alias: str = "production"
    version: int | None = None  # serve this version and follow no alias
    poll_interval_s: float = 10.0  # how often each replica checks the alias
    max_batch_size: int = 16  # the most images per model call
    batch_wait_timeout_s: float = 0.005  # the most a batch waits for requests still being decoded
    max_body_bytes: int = 25 * 2**20
    max_pixels: int = MAX_PIXELS  # checked from the header, before decoding
    max_batch_images: int = 16  # images in one /v1/classify/batch or OIP request
    decode_threads: int = 0  # 0: the replica's CPUs (each holds at most one decoded image: the memory bound)
    decode_on_device: bool = False  # JPEGs decoded by nvJPEG on the replica's GPU (CPU checks first)
    compile: bool = False  # torch.compile, warmed up before the replica reports healthy
    # Classification: optional. A bearer token from this variable or file (a mounted Kubernetes secret, re-read
    # when it changes; the file may also be named by $CROSSVIT_SERVE_TOKEN_FILE); set but empty is an error.
    auth_token_env: str = "CROSSVIT_SERVE_TOKEN"
    auth_token_file: str = ""
    # Administration (reload, the registry's details): off unless a token of its own is configured (the file
    # may also be named by $CROSSVIT_SERVE_ADMIN_TOKEN_FILE).
    admin_token_env: str = "CROSSVIT_SERVE_ADMIN_TOKEN"
    admin_token_file: str = ""
    request_log_level: str = "INFO"  # the per-request line (request id, version, latency, outcome)

    def __post_init__(self) -> None:
        self.registry = self.registry or os.environ.get("CROSSVIT_REGISTRY", "")
        self.model = self.model or os.environ.get("CROSSVIT_MODEL", "")
        self.auth_token_file = self.auth_token_file or os.environ.get("CROSSVIT_SERVE_TOKEN_FILE", "")
        self.admin_token_file = self.admin_token_file or os.environ.get("CROSSVIT_SERVE_ADMIN_TOKEN_FILE", "")
        if not self.registry or not self.model:
            raise ValueError("the registry and the model to serve: args registry/model, or CROSSVIT_REGISTRY/MODEL")
        # `serve run ... key=value` passes strings: convert them by the field's type.
        for name, kind in get_type_hints(ServeSettings).items():
            value = getattr(self, name)
            if isinstance(value, str) and kind in (int, float, int | None, bool):
                if kind is bool:
                    setattr(self, name, value.lower() in ("1", "true", "yes", "on"))
                elif value.lower() in ("", "none", "null"):
                    setattr(self, name, None)
                else:
                    setattr(self, name, float(value) if kind is float else int(value))
        self.request_log_level = str(self.request_log_level).upper()
        if self.request_log_level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ValueError(f"request_log_level {self.request_log_level!r}: DEBUG, INFO, WARNING or ERROR")
        positive = ("max_batch_size", "max_batch_images", "max_body_bytes", "max_pixels", "poll_interval_s")
        if bad := [f"{name}={getattr(self, name)}" for name in positive if not getattr(self, name) > 0]:
            raise ValueError(f"must be positive: {', '.join(bad)}")
