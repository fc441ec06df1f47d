"""The search service's settings (`duch serve`)."""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from duch.pipeline import DuchError
from duch.pipeline.encoders.runtime import check_runtime

MOST_K = 200  # hits a page may ask for at once
MOST_DEPTH = 10_000  # offset + k: how deep paging reaches


@dataclass
class ServeConfig:
    """A search service over one run's encoded archive (and other archives coded with its model)."""

    run: str  # run directory with a finished encode-archive stage
    bits: int = 64
    archives: tuple[str, ...] = ()  # other runs encoded with this run's model (`encode-archive --archive`)
    host: str = "127.0.0.1"  # loopback unless asked: the service has no authentication
    port: int = 8000
    device: str = "auto"
    runtime: str = "auto"  # what codes a query: torch, onnx (ONNX Runtime on the CPU) or auto (encoders/runtime.py)
    verify: bool = True  # SHA-256 of the code files against their manifests at start
    max_in_flight: int = 32  # queries admitted at once; past it a 503 with Retry-After, at once
    # Of them, at most this many from one client address (None: half of max_in_flight, at least 1): a few clients
    # on many connections cannot take every slot.
    max_per_client: int | None = None
    timeout: float = 10.0  # seconds a query may take before its answer is a 503
    max_upload_mb: float = 20.0  # request bodies (an uploaded image) above this get a 413
    max_json_kb: float = 64.0  # a JSON search request needs kilobytes: a larger JSON body gets a 413 unparsed
    header_timeout: float = 10.0  # seconds a client may take to send a request's headers (then the connection ends)
    body_timeout: float = 60.0  # seconds a client may take to send a request's body (then a 408)
    # A client address whose requests keep being refused (4xx for what it sent) gets `refusal_burst` of them, then
    # `refusal_rate` a second: its requests wait until its bucket refills (fairness.py). 0: no such rule.
    refusal_burst: int = 20
    refusal_rate: float = 2.0
    max_batch: int = 64  # captions coded in one pass of the text encoder and head
    # Images coded in one pass of the image encoder: on a CPU, one at a time costs the same CPU per query as
    # batches do and answers each sooner (measured: docs/results.md, 3.6); on a GPU batches pay.
    max_image_batch: int = 1
    thumb_size: int = 256  # longest side of a thumbnail, pixels
    # Torch threads while serving (None: torch's default, every core; an image pass then uses them all, twice the
    # images a second of one thread on 2 cores: docs/results.md, 3.6). A number bounds the service's share.
    threads: int | None = None
    cors_origins: tuple[str, ...] = field(default_factory=tuple)  # none: no cross-origin access
    # Host names (NAME or NAME:PORT) answered besides the loopback names and `host`: the names a reverse proxy or
    # the users' browsers reach the service by. Any other Host header gets a 400 (against DNS rebinding).
    allowed_hosts: tuple[str, ...] = field(default_factory=tuple)
    watch_interval: float = 0.5  # seconds between looks at the archives' generation (duch add, remove, compact)
    # The map panel of scene archives draws lon/lat on its own, offline; a basemap (an XYZ tile URL template such
    # as https://tile.openstreetmap.org/{z}/{x}/{y}.png) is fetched by the browser only when given here.
    basemap: str | None = None
    basemap_attribution: str = ""  # shown on the map beneath a basemap (its provider's terms usually ask for it)

    def validate(self) -> None:
        if self.port < 0 or self.port > 65535:
            raise DuchError(f"`port` must be 0..65535, got {self.port}")
        for name in ("max_in_flight", "max_batch", "max_image_batch", "thumb_size", "refusal_burst"):
            if getattr(self, name) < 1:
                raise DuchError(f"`{name}` must be at least 1, got {getattr(self, name)}")
        check_runtime(self.runtime)
        if not self.refusal_rate >= 0:
            raise DuchError(f"`refusal_rate` must be 0 (no limit) or more, got {self.refusal_rate}")
        if self.max_per_client is not None and not 1 <= self.max_per_client <= self.max_in_flight:
            raise DuchError(f"`max_per_client` must be 1 to `max_in_flight` ({self.max_in_flight}), got "
                            f"{self.max_per_client}")
        if self.threads is not None and self.threads < 1:
            raise DuchError(f"`threads` must be at least 1, got {self.threads}")
        for name in ("timeout", "max_upload_mb", "max_json_kb", "header_timeout", "body_timeout"):
            if not getattr(self, name) > 0:
                raise DuchError(f"`{name}` must be positive, got {getattr(self, name)}")
        for name in self.allowed_hosts:
            if not name or any(c in name for c in "/@ ,") or name.count(":") > 1 and not name.startswith("["):
                raise DuchError(f"`allowed_hosts`: {name!r} is not a host name; give NAME or NAME:PORT (an IPv6 "
                                "address in brackets), e.g. search.example.org")
        if self.basemap is not None:
            missing = [p for p in ("{z}", "{x}", "{y}") if p not in self.basemap]
            if not self.basemap.startswith(("http://", "https://")) or missing:
                raise DuchError(f"`basemap` {self.basemap!r}: give an XYZ tile URL template, http(s)://... with "
                                f"{{z}}, {{x}} and {{y}} (e.g. https://tile.openstreetmap.org/{{z}}/{{x}}/{{y}}.png)"
                                + (f"; {', '.join(missing)} missing" if missing else ""))

    @property
    def per_client(self) -> int:
        """Queries one client address may have in flight."""
        return self.max_per_client if self.max_per_client is not None else max(1, self.max_in_flight // 2)

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1_000_000)

    @property
    def max_json_bytes(self) -> int:
        return int(self.max_json_kb * 1024)

    def loopback(self) -> bool:
        """Whether the service is reachable from this machine only."""
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False
