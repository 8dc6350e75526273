"""`ldm serve` and `ldm ui`: the command line of the HTTP server.

Importing this module is cheap (no torch, no FastAPI): `ldm --help` builds these parsers. The
server's libraries are imported by cmd_serve, once the configuration has been checked, so a bad
command line (a public address without a key, say) fails in well under a second with one line.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ldm_engine.errors import UserInputError
from ldm_engine.paths import BUNDLED_MODEL

from .config import ServerConfig, hash_key, is_loopback

# As ldm_engine.precision.DTYPE_CHOICES, spelled out so that `ldm --help` need not import torch.
DTYPE_CHOICES = ("auto", "fp32", "bf16", "fp16")
# A keys-file line holding a key's digest instead of the key: "sha256:" + 64 hex digits.
HASHED_PREFIX = "sha256:"


def add_serve_parsers(subparsers) -> None:
    """`serve` and `ui` (the same server with the web UI on) on the `ldm` command's subparsers."""
    s = subparsers.add_parser(
        "serve", help="serve the HTTP API (native /v1, AUTOMATIC1111's /sdapi/v1)",
        description="Serve image generation over HTTP: the native API at /v1 (OpenAPI at "
                    "/docs), AUTOMATIC1111's API at /sdapi/v1, /metrics and /healthz. Jobs are "
                    "kept in SQLite under --out and survive a restart.")
    _server_options(s)
    s.set_defaults(func=cmd_serve, ui=False)
    u = subparsers.add_parser("ui", help="serve the web UI (and the API): ldm serve --ui",
                              description="`ldm serve --ui`: the Gradio web UI at /, the API "
                                          "beside it.")
    _server_options(u)
    u.set_defaults(func=cmd_serve, ui=True)


def _server_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", action="append", metavar="DIR",
                   help="a model folder or single file to serve (repeat for several; the first "
                        "is the default; clients pick one by its name). Default: the bundled "
                        "model")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1; any other needs an API key "
                        "or --insecure)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860; 0: any free one)")
    p.add_argument("--api-key", action="append", default=[], metavar="KEY",
                   help="an accepted API key (repeatable); clients send it as Authorization: "
                        "Bearer KEY, X-API-Key: KEY, or as the password of HTTP Basic")
    p.add_argument("--api-keys-file", metavar="FILE",
                   help="accepted keys, one a line: the key, or sha256:<hex digest of it>; "
                        "'#' starts a comment")
    p.add_argument("--insecure", action="store_true",
                   help="allow a non-loopback --host without any API key")
    p.add_argument("--queue-size", type=int, default=64,
                   help="queued jobs beyond this are refused with 429 (default 64)")
    p.add_argument("--workers-per-device", type=int, default=1,
                   help="worker threads on the device (default 1)")
    p.add_argument("--max-batch", type=int, default=8,
                   help="images of compatible jobs run as one batch (default 8; 1: off)")
    p.add_argument("--out", default="outputs",
                   help="images (<out>/<job id>/<k>.png) and the job database (default outputs/)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default cpu)")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="fp32",
                   help="weights' precision (default fp32)")
    p.add_argument("--ui", action="store_true", help="also serve the web UI at /")
    p.add_argument("--ray", action="store_true",
                   help="run as a Ray Serve deployment (replicas share the job database)")
    p.add_argument("--replicas", type=int, default=1,
                   help="Ray Serve replicas (with --ray; default 1)")


def read_keys_file(path: str | Path) -> tuple[str, ...]:
    """The SHA-256 digests a keys file gives: plain keys are hashed as they are read."""
    hashes = []
    text = Path(path).read_text(encoding="utf-8")
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.partition("#")[0].strip()
        if not line:
            continue
        if line.lower().startswith(HASHED_PREFIX):
            digest = line[len(HASHED_PREFIX):].strip().lower()
            if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
                raise UserInputError(f"{path}:{number}: a sha256: line needs 64 hex digits")
            hashes.append(digest)
        else:
            hashes.append(hash_key(line))
    if not hashes:
        raise UserInputError(f"{path} holds no API keys")
    return tuple(hashes)


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    """The checked ServerConfig of a command line. Keys are hashed here: the plain text of a key
    is in no value the server keeps."""
    models = tuple(Path(m) for m in args.model) if args.model else (BUNDLED_MODEL,)
    for m in models:
        if not m.exists():
            raise UserInputError(f"no model at {m}")
    hashes = [hash_key(k) for k in args.api_key if k]
    if any(not k for k in args.api_key):
        raise UserInputError("--api-key needs a non-empty key")
    if args.api_keys_file:
        hashes += read_keys_file(args.api_keys_file)
    if args.replicas < 1:
        raise UserInputError(f"--replicas must be >= 1, got {args.replicas}")
    config = ServerConfig(
        models=models, out_dir=Path(args.out), host=args.host, port=args.port,
        api_key_hashes=tuple(dict.fromkeys(hashes)), insecure=args.insecure,
        queue_size=args.queue_size, workers_per_device=args.workers_per_device,
        max_batch=args.max_batch, device=args.device, dtype=args.dtype, ui=args.ui)
    config.check()
    return config


def cmd_serve(args: argparse.Namespace) -> int:
    """Check the configuration, then serve until interrupted (uvicorn, or Ray Serve)."""
    config = config_from_args(args)
    if args.ray:
        from .ray_app import serve_ray
        serve_ray(config, args.replicas)
        return 0
    import uvicorn

    from .app import create_app
    from .service import JobService

    config.out_dir.mkdir(parents=True, exist_ok=True)
    # The workers start with the server (create_app's lifespan), once it has its port.
    app = create_app(JobService(config, start_workers=False))
    if not is_loopback(config.host) and not config.api_key_hashes:
        print(f"ldm serve: warning: serving on {config.host} with no API key (--insecure)",
              file=sys.stderr)
    uvicorn.run(app, host=config.host, port=config.port, log_level="info")
    return 0
