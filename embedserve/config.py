"""Server configuration: defaults, then a TOML file, then environment variables.

Every setting has an environment variable `EMBEDSERVE_<NAME>` (upper case). A config file, given
by `EMBEDSERVE_CONFIG=path.toml`, holds the same names in lower case at the top level:

    model = "barlow-twins-resnet18-imagenette"
    device = "cpu"
    max_batch_size = 32

Several models in one server: `models` (a list in the file; EMBEDSERVE_MODELS=a,b,c, comma-
separated) instead of `model`; setting both is an error. Environment variables win over the
file, so one file can serve several deployments.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

ENV_PREFIX = "EMBEDSERVE_"
CONFIG_ENV = "EMBEDSERVE_CONFIG"

DEVICES = ("auto", "cuda", "cpu")
# The longer side of the index's thumbnails in pixels (embedserve.thumbnails): default and limit.
DEFAULT_THUMBNAIL_SIZE = 128
MAX_THUMBNAIL_SIZE = 1024
DEFAULT_MILVUS_COLLECTION = "embedserve"
VARIANTS = ("auto", "fp32", "fp16", "int8")


class ConfigError(ValueError):
    """A setting has a value that cannot be used (the message names the setting)."""


def cpu_count() -> int:
    """Cores this process may use (the affinity mask, not the host's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class ServeConfig:
    """What `make serve` / `bentoml serve embedserve.service:EmbedService` runs."""

    # A package name in models_dir or a path to a package folder; None: models/DEFAULT.
    model: str | None = None
    # Several packages (names or paths) served at once, the first the default; None: `model`.
    models: tuple[str, ...] | None = None
    models_dir: str | None = None  # None: the repository's models/
    # auto: CUDA when a CUDA session really starts, else the CPU; cuda: fail without a GPU.
    device: str = "auto"
    # auto: fp16 on CUDA, int8 on a CPU with VNNI (when the package has them), else fp32.
    variant: str = "auto"
    # Adaptive batching: at most this many images per model call ...
    max_batch_size: int = 32
    # ... and a request that would wait longer than this in the batch queue gets a 503
    # (BentoML's dispatcher sheds load rather than queue without bound).
    max_latency_ms: int = 10_000
    # Longest time an idle model waits for more requests to join a batch (BentoML's dispatcher
    # learns the wait; this caps it). Under load, batches form while the model is busy.
    max_batch_wait_ms: int = 5
    # The search index (embedserve.index_backend): a FAISS index folder, a Milvus Lite file
    # (*.db) or a Milvus server's URI (http(s)://...); None: /search answers 409.
    index: str | None = None
    # With Milvus: the collection, and the token ("user:password" or an API key) if it needs one.
    milvus_collection: str = DEFAULT_MILVUS_COLLECTION
    milvus_token: str | None = field(default=None, repr=False)
    # Limits on what a client may send.
    max_images_per_request: int = 64
    max_request_bytes: int = 64 * 1024 * 1024
    max_image_pixels: int = 40_000_000  # a decompression bomb declares far more
    max_k: int = 1000
    # Requests handled at once per worker (parsing, decoding, queued for the model); more get
    # an immediate 503 with Retry-After instead of holding memory while they wait.
    max_concurrent_requests: int = 256
    # Bytes of request bodies a worker holds at once (what bounds its memory; see docs/serving.md,
    # "Memory ceiling"). A body that would pass it gets an immediate 503 with Retry-After.
    max_inflight_bytes: int = 256 * 1024 * 1024
    # A request whose response has not started this many seconds after it arrived gets a 504
    # (BentoML's traffic timeout): bounds a slow client that trickles its body in.
    request_timeout_s: int = 120
    # Optional bearer token for /embed, /search and /info; required for POST /index/add, which
    # is off without one. Never logged, never in /info or repr (compared in constant time).
    api_key: str | None = field(default=None, repr=False)
    # POST /index/add appends to a write-ahead log in the index folder; past this size the
    # index is saved as a new version (atomic) and the log emptied.
    index_log_max_bytes: int = 64 * 1024 * 1024
    # Images added to the index (POST /index/add) get a JPEG thumbnail of at most this many
    # pixels on their longer side, made from the decoded image in the decode pool and stored in
    # the index (GET /index/items/{id}/thumbnail serves it); 0 stores none. See
    # embedserve.thumbnails (`embedserve index build/add` store them too: --no-thumbnails).
    thumbnails: int = DEFAULT_THUMBNAIL_SIZE
    # ONNX Runtime intra-op threads per worker; None: the cores divided among the workers.
    threads: int | None = None
    # Threads that decode images (Pillow releases the GIL); None: the cores of this process.
    decode_threads: int | None = None
    workers: int = 1  # BentoML worker processes, each with its own model session
    # One log line per request (BentoML's access log); off saves ~0.2 ms of CPU per request.
    access_log: bool = True

    def __post_init__(self) -> None:
        if self.models is not None:
            object.__setattr__(self, "models", tuple(self.models))  # a list given in code
            if self.model is not None:
                raise ConfigError(
                    "set either model (EMBEDSERVE_MODEL, one model) or models (EMBEDSERVE_MODELS, "
                    "several), not both"
                )
            if not self.models or any(not m for m in self.models):
                raise ConfigError("models must list one or more package names or paths")
            if len(set(self.models)) != len(self.models):
                raise ConfigError(f"models lists a package twice: {', '.join(self.models)}")
        if self.device not in DEVICES:
            raise ConfigError(f"device must be one of {', '.join(DEVICES)}, not {self.device!r}")
        if self.variant not in VARIANTS:
            raise ConfigError(f"variant must be one of {', '.join(VARIANTS)}, not {self.variant!r}")
        for name in (
            "max_batch_size",
            "max_latency_ms",
            "max_images_per_request",
            "max_request_bytes",
            "max_image_pixels",
            "max_k",
            "workers",
            "max_concurrent_requests",
            "max_inflight_bytes",
            "request_timeout_s",
            "index_log_max_bytes",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, not {getattr(self, name)}")
        if self.max_inflight_bytes < self.max_request_bytes:
            raise ConfigError(
                f"max_inflight_bytes ({self.max_inflight_bytes}) must be at least max_request_bytes "
                f"({self.max_request_bytes}), or a request of the largest allowed size is never served"
            )
        if self.max_batch_size < 2:
            raise ConfigError("max_batch_size must be at least 2 (BentoML's batching needs it)")
        if self.max_batch_wait_ms < 0:
            raise ConfigError(f"max_batch_wait_ms must be 0 or more, not {self.max_batch_wait_ms}")
        if not 0 <= self.thumbnails <= MAX_THUMBNAIL_SIZE:
            raise ConfigError(
                f"thumbnails must be 0 (none) or a size in pixels up to {MAX_THUMBNAIL_SIZE}, "
                f"not {self.thumbnails}"
            )
        for name in ("threads", "decode_threads"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name} must be at least 1, not {value}")
        if self.api_key is not None and len(self.api_key) < 16:
            # the length only: the key itself must never appear in a message
            raise ConfigError(f"api_key must be at least 16 characters, not {len(self.api_key)}")

    @property
    def model_refs(self) -> list[str | None]:
        """The packages to serve, the default first: `models`, or [`model`] (None: DEFAULT)."""
        return list(self.models) if self.models is not None else [self.model]

    @property
    def intra_op_threads(self) -> int:
        """ONNX Runtime threads per worker: set, or the cores shared among the workers."""
        return self.threads or max(1, cpu_count() // self.workers)

    @property
    def decoder_threads(self) -> int:
        return self.decode_threads or cpu_count()

    def public(self) -> dict:
        """The settings as JSON-able values (for /info and the log), without secrets: the API
        key is replaced by whether one is set."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.repr}
        values["auth"] = "api key required" if self.api_key else "open"
        return values


_FIELDS = {f.name: f for f in dataclasses.fields(ServeConfig)}


def _coerce(name: str, value: object, where: str) -> object:
    """A raw value from the environment (str) or TOML to the field's type."""
    kind = _FIELDS[name].type
    if value is None:
        return None
    if name == "models":  # a TOML list, or comma-separated text (the environment)
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
            raise ConfigError(f"{where}: models must be a list of package names or paths")
        items = [i.strip() for i in items if i.strip()]
        if not items:
            raise ConfigError(f"{where}: models needs one or more package names or paths")
        return tuple(items)
    if isinstance(value, str) and value.strip().lower() in ("", "none", "null"):
        if "None" in str(kind):
            return None
        raise ConfigError(f"{where}: {name} needs a value")
    if str(kind) == "bool":
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{where}: {name} must be true or false, not {value!r}")
    if "int" in str(kind):
        try:
            if isinstance(value, bool):
                raise ValueError
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: {name} must be an integer, not {value!r}") from None
    return str(value)


def load_config(
    environ: Mapping[str, str] | None = None, config_file: str | os.PathLike | None = None
) -> ServeConfig:
    """Defaults < the TOML file (`config_file` or $EMBEDSERVE_CONFIG) < EMBEDSERVE_* variables."""
    environ = os.environ if environ is None else environ
    values: dict[str, object] = {}
    config_file = config_file or environ.get(CONFIG_ENV)
    if config_file:
        path = Path(config_file)
        try:
            data = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{CONFIG_ENV}: config file {path} does not exist") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: not valid TOML ({e})") from None
        unknown = sorted(set(data) - set(_FIELDS))
        if unknown:
            raise ConfigError(
                f"{path}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(_FIELDS)}"
            )
        values.update({k: _coerce(k, v, str(path)) for k, v in data.items()})
    for name in _FIELDS:
        env = ENV_PREFIX + name.upper()
        if env in environ:
            values[name] = _coerce(name, environ[env], env)
    return ServeConfig(**values)


def unknown_variables(environ: Mapping[str, str] | None = None) -> list[str]:
    """EMBEDSERVE_* variables that name no setting (likely typos; the server logs them)."""
    environ = os.environ if environ is None else environ
    return sorted(
        k
        for k in environ
        if k.startswith(ENV_PREFIX)
        and k != CONFIG_ENV
        and k[len(ENV_PREFIX) :].lower() not in _FIELDS
    )
