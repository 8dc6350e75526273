"""What `ldm serve` runs with: one frozen value, built by its command line (or by a test).

Every limit a client can run into is here, with its reason, so the HTTP layer, the A1111 layer,
the web UI and the Ray deployment enforce the same numbers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

from ldm_engine.errors import UserInputError

LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")


@dataclass(frozen=True, kw_only=True)
class Limits:
    """What one request may ask for; each breach is a 4xx with a one-line message."""

    # A JSON body with two 16-MP PNG uploads in base64 fits; anything larger is refused before
    # it is read to the end (413).
    max_body_bytes: int = 48 * 2**20
    # An uploaded image (init image, mask): encoded size, and decoded pixels checked from the
    # header before decoding (a 40 kB PNG can expand to gigabytes: a decompression bomb).
    max_image_bytes: int = 32 * 2**20
    max_image_pixels: int = 4096 * 4096
    # A1111's prompt box has no limit; ours keeps a request's text (and its PNG chunk) sane.
    # Long prompts are fine: 75-token windows are concatenated (pipelines.prompts).
    max_prompt_chars: int = 8000
    # A1111's UI slider stops at 150 steps.
    max_steps: int = 150
    # Images per request (A1111's batch_size x n_iter).
    max_images: int = 16
    # Output side in pixels (the model's own size limits, ldm_engine.limits, apply as well).
    max_side: int = 2048


@dataclass(frozen=True, kw_only=True)
class ServerConfig:
    # Model folders or single files the server may use; clients pick one by its name (folder
    # name or file stem), never by a path. The first is the default.
    models: tuple[Path, ...]
    # Where images go (<out_dir>/<job id>/<k>.png) and, by default, the job database.
    out_dir: Path
    # SQLite file holding jobs and results; None: <out_dir>/jobs.sqlite3.
    db_path: Path | None = None
    host: str = "127.0.0.1"
    port: int = 7860
    # SHA-256 hex digests of the accepted API keys (keys are never kept in plain text).
    api_key_hashes: tuple[str, ...] = ()
    # Serving on a non-loopback address without a key needs this said out loud.
    insecure: bool = False
    # Queued (not yet running) jobs beyond this are refused with 429 and Retry-After.
    queue_size: int = 64
    workers_per_device: int = 1
    # Dynamic batching: compatible queued jobs (same model, mode and every setting but prompt,
    # negative prompt and seed) share one UNet batch of up to this many images. 1 turns it off.
    max_batch: int = 8
    # A running job stores a preview (decoded x0 estimate) every this many steps; 0: never.
    preview_every: int = 5
    # How the networks are loaded (Pipeline.from_folder's options).
    device: str = "cpu"
    dtype: str = "fp32"
    compile: bool = False
    # A worker that stops renewing its claim on a job for this long (killed, hung) loses it:
    # the job goes back to the queue for another worker (or this server after a restart).
    lease_seconds: float = 30.0
    # Gradio web UI mounted at "/".
    ui: bool = False
    limits: Limits = field(default_factory=Limits)

    @property
    def database(self) -> Path:
        return self.db_path if self.db_path is not None else self.out_dir / "jobs.sqlite3"

    def replace(self, **changes) -> "ServerConfig":
        return dataclasses.replace(self, **changes)

    def check(self) -> None:
        """Refuse a configuration that would serve unsafely or not at all (one line each)."""
        if not self.models:
            raise UserInputError("ldm serve needs at least one model")
        names = [model_name(m) for m in self.models]
        if len(set(names)) != len(names):
            raise UserInputError(f"two models share a name: {', '.join(names)}")
        if not is_loopback(self.host) and not self.api_key_hashes and not self.insecure:
            raise UserInputError(f"refusing to serve on {self.host} (not loopback) without an "
                                 "API key: give --api-key/--api-keys-file, or --insecure")
        if not 0 < self.port < 65536 and self.port != 0:
            raise UserInputError(f"port must be 1-65535 (or 0: any free one), got {self.port}")
        for name in ("queue_size", "workers_per_device", "max_batch"):
            if getattr(self, name) < 1:
                raise UserInputError(f"{name.replace('_', '-')} must be >= 1, got "
                                     f"{getattr(self, name)}")

    def model_names(self) -> list[str]:
        return [model_name(m) for m in self.models]


def model_name(path: Path) -> str:
    """How clients name a model: its folder's name, or a single file's stem."""
    return path.stem if path.is_file() else path.name


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def hash_key(key: str) -> str:
    """The stored form of an API key: its SHA-256 in hex (keys are long random tokens, so a
    fast hash is enough; a password would need a slow one)."""
    return hashlib.sha256(key.encode()).hexdigest()


def key_matches(given: str, hashes: tuple[str, ...]) -> bool:
    """Constant-time check of a presented key against the stored hashes (every hash is
    compared, so the time does not say which one, or whether any, matched early)."""
    digest = hash_key(given)
    found = False
    for h in hashes:
        found |= hmac.compare_digest(digest, h)
    return found

