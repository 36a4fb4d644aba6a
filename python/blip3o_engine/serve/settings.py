"""`ServeSettings`: what the server needs beyond its engine (names, keys, limits); checked once, up front."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError

MIB = 1 << 20


@dataclass(frozen=True)
class ServeSettings:
    """The server's options (the `serve` command's flags, `build_app`'s arguments).

    served_model_name: the model id clients send and /v1/models lists.
    api_keys: accepted `Authorization: Bearer` keys; empty = no authentication.
    max_body_mb: largest request body (uploads and data: URIs included); more is 413.
    allowed_media_domains: hosts whose http(s) image URLs the server fetches (exact names; none by default).
    allowed_local_media_path: a directory whose files `file://` image URLs may name (None: no local files).
    media_timeout_s / max_media_mb / max_image_pixels: limits on one fetched or uploaded image.
    drain_timeout_s: on SIGTERM, how long running requests may finish before they are aborted.
    replica_name: sent in every response's `x-blip3o-replica` header (default: host name and process id).
    """

    served_model_name: str = "tiny"
    api_keys: tuple[str, ...] = ()
    max_body_mb: float = 32.0
    allowed_media_domains: tuple[str, ...] = ()
    allowed_local_media_path: Path | None = None
    media_timeout_s: float = 10.0
    max_media_mb: float = 20.0
    max_image_pixels: int = 4096 * 4096
    drain_timeout_s: float = 30.0
    replica_name: str = field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")

    def __post_init__(self) -> None:
        if not self.served_model_name:
            raise ConfigError("served_model_name must not be empty")
        object.__setattr__(self, "api_keys", tuple(self.api_keys))
        if any(not k or k != k.strip() for k in self.api_keys):
            raise ConfigError("API keys must be non-empty and have no surrounding whitespace")
        for name in ("max_body_mb", "media_timeout_s", "max_media_mb"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if self.max_image_pixels < 1 or self.drain_timeout_s < 0:
            raise ConfigError("max_image_pixels must be >= 1 and drain_timeout_s >= 0")
        domains = tuple(d.strip().lower().rstrip(".") for d in self.allowed_media_domains)
        if any(not d or "/" in d or ":" in d for d in domains):
            raise ConfigError(f"allowed media domains are host names (no scheme, port or path), got "
                              f"{list(self.allowed_media_domains)}")
        object.__setattr__(self, "allowed_media_domains", domains)
        if self.allowed_local_media_path is not None:
            root = Path(self.allowed_local_media_path).expanduser().resolve()
            if not root.is_dir():
                raise ConfigError(f"--allowed-local-media-path {self.allowed_local_media_path} is not a directory")
            object.__setattr__(self, "allowed_local_media_path", root)

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * MIB)

    @property
    def max_media_bytes(self) -> int:
        return int(self.max_media_mb * MIB)


__all__ = ["ServeSettings"]
