"""The Serve application's settings: the ``args`` of infra/serve.yaml, or ``python -m jobs.serve``'s flags."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, fields
from typing import get_type_hints

from pipelines.preprocess import MAX_PIXELS
from pipelines.serve.rollout import SHADOW, SPLIT, Criteria

BOOLEANS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}


def _typed(settings: object) -> None:
    """`serve run ... key=value` passes strings: convert them by the field's type."""
    for name, kind in get_type_hints(type(settings)).items():
        value = getattr(settings, name)
        if not (isinstance(value, str) and kind in (int, float, int | None, bool)):
            continue
        try:
            if kind is bool:
                setattr(settings, name, BOOLEANS[value.strip().lower()])
            elif value.lower() in ("", "none", "null"):
                setattr(settings, name, None)
            else:
                setattr(settings, name, float(value) if kind is float else int(value))
        except (KeyError, ValueError):
            raise ValueError(f"{name}={value!r}: not a {getattr(kind, '__name__', kind)}") from None


@dataclass
class CanarySettings(Criteria):
    """A canary beside production (pipelines/serve/rollout.py): the version ``alias`` names answers ``percent``
    of the requests (``split``) or runs them in production's shadow (``shadow``); off while ``alias`` is empty.
    ``auto``: the application judges it itself every ``every_s`` with the criteria (Criteria's fields)."""

    alias: str = ""
    percent: float = 10.0
    mode: str = SPLIT
    auto: bool = False
    every_s: float = 60.0

    def __post_init__(self) -> None:
        _typed(self)
        super().__post_init__()
        self.mode = str(self.mode).lower()
        if self.mode not in (SPLIT, SHADOW):
            raise ValueError(f"canary.mode {self.mode!r}: {SPLIT} or {SHADOW}")
        if not 0 <= self.percent <= 100 or not self.every_s > 0:
            raise ValueError(f"canary.percent {self.percent} must be within 0..100 and every_s positive")


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
    canary: CanarySettings = field(default_factory=CanarySettings)  # a dict in the config file

    def __post_init__(self) -> None:
        self.registry = self.registry or os.environ.get("CROSSVIT_REGISTRY", "")
        self.model = self.model or os.environ.get("CROSSVIT_MODEL", "")
        self.auth_token_file = self.auth_token_file or os.environ.get("CROSSVIT_SERVE_TOKEN_FILE", "")
        self.admin_token_file = self.admin_token_file or os.environ.get("CROSSVIT_SERVE_ADMIN_TOKEN_FILE", "")
        if not self.registry or not self.model:
            raise ValueError("the registry and the model to serve: args registry/model, or CROSSVIT_REGISTRY/MODEL")
        _typed(self)
        if isinstance(self.canary, dict):
            known = {f.name for f in fields(CanarySettings)}
            if unknown := sorted(set(self.canary) - known):
                raise ValueError(f"canary: no setting {', '.join(unknown)} (there are {', '.join(sorted(known))})")
            self.canary = CanarySettings(**self.canary)
        if self.canary.alias and self.canary.alias == self.alias:
            raise ValueError(f"canary.alias {self.canary.alias!r} is the served alias: name another (candidate)")
        if self.canary.alias and self.version is not None:
            raise ValueError("a canary needs production to follow its alias, not a pinned version: drop version")
        self.request_log_level = str(self.request_log_level).upper()
        if self.request_log_level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ValueError(f"request_log_level {self.request_log_level!r}: DEBUG, INFO, WARNING or ERROR")
        positive = ("max_batch_size", "max_batch_images", "max_body_bytes", "max_pixels", "poll_interval_s")
        if bad := [f"{name}={getattr(self, name)}" for name in positive if not getattr(self, name) > 0]:
            raise ValueError(f"must be positive: {', '.join(bad)}")

    def to_dict(self) -> dict:
        """What ``ServeSettings(**...)`` takes back (the application's arguments)."""
        return asdict(self)


def nest(args: dict) -> dict:
    """`serve run infra/serve.yaml canary.alias=candidate`: dotted keys into the nested settings."""
    out: dict = {}
    for key, value in args.items():
        head, _, rest = key.partition(".")
        if rest:
            out[head] = {**(out.get(head) or {}), rest: value}
        else:
            out[key] = {**out[key], **value} if isinstance(out.get(key), dict) and isinstance(value, dict) else value
    return out
