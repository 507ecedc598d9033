"""What `edgegen serve` was asked for, checked once, before Ray starts."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from edgegen.runtime.errors import BadInputError

DEFAULT_PORT = 8000


@dataclass(frozen=True, slots=True)
class ServeConfig:
    bundle: str  # a bundle directory (the CLI resolves "the default model" before this)
    host: str = "127.0.0.1"  # loopback unless told: the service has no authentication
    port: int = DEFAULT_PORT
    replicas: int = 1
    max_batch: int = 8  # requests gathered into one pipeline call (1: no batching)
    batch_wait_ms: float = 5.0  # how long a batch waits to fill once its first request is in
    backend: str = "auto"
    precision: str = "auto"
    cors: str | None = None  # an origin allowed to call the API from a browser page; None: no CORS headers
    timeout_s: float = 30.0  # each request's deadline, from arrival to answer
    max_queued: int = (
        64  # requests waiting for a generator replica beyond its running ones; more: 503 at once
    )
    cpus_per_replica: float = (
        0.5  # Ray's CPU accounting only (ONNX Runtime uses the cores it finds): small, so
    )
    # two replicas fit on a 2-core machine
    gpus_per_replica: float = 0.0

    def __post_init__(self):
        _positive_int("--replicas", self.replicas)
        _positive_int("--max-batch", self.max_batch)
        _positive_int("--max-queued", self.max_queued)
        if not 0 < self.port < 65536:
            raise BadInputError("--port", f"out of range: {self.port}", "use 1-65535 (default 8000)")
        for flag, value in (
            ("--batch-wait-ms", self.batch_wait_ms),
            ("--cpus-per-replica", self.cpus_per_replica),
            ("--gpus-per-replica", self.gpus_per_replica),
        ):
            if not value >= 0:
                raise BadInputError(flag, f"expected a number >= 0, got {value!r}", "e.g. 0 or 5")
        if not self.timeout_s > 0:
            raise BadInputError("--timeout-s", f"expected a number > 0, got {self.timeout_s!r}", "e.g. 30")
        if self.cors is not None and not self.cors.startswith(("http://", "https://")) and self.cors != "*":
            raise BadInputError(
                "--cors", f"expected an origin, got {self.cors!r}", "e.g. http://localhost:3000"
            )

    @property
    def max_ongoing(self) -> int:
        """Requests a replica holds at once: a batch running and the next one filling."""
        return 2 * self.max_batch

    def to_dict(self) -> dict:
        return asdict(self)


def _positive_int(flag: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise BadInputError(flag, f"expected a positive integer, got {value!r}", "use 1 or more")


def config_from_args(args: dict) -> ServeConfig:
    """A ServeConfig from ``serve run``'s / a Serve config file's ``key=value`` arguments (strings there)."""
    types = {f.name: f.type for f in fields(ServeConfig)}
    unknown = sorted(set(args) - set(types))
    if unknown:
        raise BadInputError("serve arguments", f"unknown: {', '.join(unknown)}", f"use {', '.join(types)}")
    if "bundle" not in args:
        raise BadInputError("serve arguments", "no bundle", "pass bundle=/path/to/bundle")
    converted = {}
    for name, value in args.items():
        kind = {"int": int, "float": float}.get(types[name], str)
        try:
            converted[name] = value if value is None or isinstance(value, kind) else kind(value)
        except ValueError:
            raise BadInputError(
                name, f"expected {types[name]}, got {value!r}", "see docs/serving.md"
            ) from None
    return ServeConfig(**converted)
