"""`ldm serve --ray`: the same FastAPI app as a Ray Serve deployment, one replica per device.

    ldm serve --ray --replicas 2                       # a local Ray instance, 2 fixed replicas
    serve run docs/serve-config.yaml                   # a cluster, autoscaled on queue depth

Every replica is a whole `ldm serve`: its own JobService with its own workers on its device, and
create_app's routes in front. What makes them one service is the job store they share (SQLite
under config.out_dir): a job submitted through any replica is claimed by whichever worker is free
first, and GET /v1/jobs/{id}, its images and its events work through every replica. Ray's HTTP
proxy spreads the (short) HTTP requests over the replicas; the queue spreads the work.

A replica that dies (killed, OOM, its node lost) leaves its running jobs RUNNING under a lease it
no longer renews: when the lease (config.lease_seconds) runs out, or at once when the dead worker
was a process on the same host, a surviving replica's worker puts them back in the queue and runs
them again with the same seeds, so the image is the one the first run would have made. Ray Serve
meanwhile starts a replacement replica; starting, it must not take running jobs away from the
others (the service requeues only jobs whose workers are gone).

Scaling: a fixed number of replicas (`--replicas N`; one per GPU), or autoscaling with
QueueDepthPolicy on the depth of the shared queue (the default Serve policy counts ongoing HTTP
requests, which here say nothing about load: a submit returns 202 in milliseconds whatever the
queue holds).

Sharing SQLite: replicas on one machine share the file safely (WAL, busy timeouts). Across
machines the database and out_dir must be on storage every node mounts, and SQLite over NFS is a
risk: its locking relies on POSIX byte-range locks that many NFS setups implement loosely or not
at all, and WAL mode needs shared memory that does not work across hosts at all, so concurrent
writers can corrupt the file. docs/serving.md says what to do instead.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import signal
import time
import typing
from pathlib import Path
from typing import Any

from ldm_engine.errors import UserInputError

from .config import Limits, ServerConfig

APP_NAME = "ldm"
DEPLOYMENT_NAME = "LDMServer"
# HTTP requests a replica may hold at once before Ray's proxy queues more for it. Ray's default
# (5) suits requests that each run a model; here a request submits or reads a job in
# milliseconds, and an event stream (/v1/jobs/{id}/events) is held open, idle, while its job runs:
# 16 clients following their jobs would hold 16 requests, so the limit must be well above the
# clients a replica serves, or the proxy would queue the short requests behind the streams.
MAX_ONGOING_REQUESTS = 1000


def replica_config(config: ServerConfig) -> ServerConfig:
    """The configuration a replica runs with. Ray gives each GPU replica one GPU through
    CUDA_VISIBLE_DEVICES, which the replica sees as device 0: "cuda:N" becomes "cuda"."""
    if config.device.startswith("cuda"):
        return config.replace(device="cuda")
    return config


def actor_options(config: ServerConfig) -> dict[str, Any]:
    """One replica per GPU on CUDA; on CPU one core's worth (Ray then sets OMP_NUM_THREADS=1 in
    the replica, so replicas on one machine do not fight over the cores)."""
    if config.device.startswith("cuda"):
        return {"num_gpus": 1}
    return {"num_cpus": 1}


class QueueDepthPolicy:
    """A Serve autoscaling policy: as many replicas as the shared queue needs.

    Each replica reports (record_autoscaling_stats) the store's depth, which every replica reads
    from the same database, so the policy takes the largest report, not their sum. Demand is
    queued + running jobs; a replica is wanted per `jobs_per_replica` of them (a replica's
    workers take up to max_batch compatible jobs at once, so about max_batch x workers). Ray
    applies min/max_replicas and the up/downscale delays around the number returned.

    Ray pickles this class by value into its controller: it uses nothing but `math`.
    """

    def __init__(self, jobs_per_replica: float = 8):
        if jobs_per_replica <= 0:
            raise ValueError(f"jobs_per_replica must be > 0, got {jobs_per_replica}")
        self.jobs_per_replica = jobs_per_replica

    def __call__(self, ctx) -> tuple[int, dict]:
        metrics = ctx.aggregated_metrics or {}
        queued = max(metrics.get("queued", {}).values(), default=0.0)
        running = max(metrics.get("running", {}).values(), default=0.0)
        if not metrics:                 # no report yet (replicas starting): keep the target
            return ctx.target_num_replicas, {}
        return max(1, math.ceil((queued + running) / self.jobs_per_replica)), {}


def autoscaling_config(config: ServerConfig, *, min_replicas: int, max_replicas: int,
                       jobs_per_replica: float | None = None) -> dict[str, Any]:
    if not 1 <= min_replicas <= max_replicas:
        raise UserInputError(f"replicas must satisfy 1 <= min ({min_replicas}) <= max "
                             f"({max_replicas})")
    per_replica = jobs_per_replica or config.max_batch * config.workers_per_device
    return {
        # Never 0: the work is in the database, not in Serve's request queue, so a scaled-to-zero
        # deployment would never see a reason to come back while jobs wait.
        "min_replicas": min_replicas, "max_replicas": max_replicas,
        "initial_replicas": min_replicas,
        "metrics_interval_s": 2.0, "look_back_period_s": 10.0,
        # Up fast (a replica takes seconds to load its model); down slowly (a model reload per
        # burst would cost more than an idle replica).
        "upscale_delay_s": 5.0, "downscale_delay_s": 120.0,
        "policy": {"policy_function": f"{__name__}:QueueDepthPolicy",
                   "policy_kwargs": {"jobs_per_replica": per_replica}},
    }


def _deployment_class():
    """The deployment class, built on first use so that importing this module needs no Ray."""
    from ray import serve

    @serve.deployment(name=DEPLOYMENT_NAME, max_ongoing_requests=MAX_ONGOING_REQUESTS)
    @serve.ingress()                # late-bound: the app is made from the replica's own service
    class LDMServer:
        def __init__(self, config: ServerConfig):
            from ldm_engine.apps.server.service import JobService

            # Workers start with the app's lifespan (create_app), which Serve runs after
            # __serve_build_asgi_app__, and stop when the replica shuts down.
            self.service = JobService(replica_config(config))

        def __serve_build_asgi_app__(self):
            from ldm_engine.apps.server.app import create_app
            return create_app(self.service)

        def record_autoscaling_stats(self) -> dict[str, float]:
            stats = self.service.stats()
            return {"queued": float(stats["queue_depth"]),
                    "running": float(stats["jobs"].get("running", 0))}

        def identity(self) -> dict[str, Any]:
            """Which process this replica is (through a DeploymentHandle): tests and operators
            match it to the worker ids in the job records (host:pid:n)."""
            return {"pid": os.getpid(),
                    "actor": serve.get_replica_context().replica_id.to_full_id_str()}

    return LDMServer


def application(config: ServerConfig, *, replicas: int | None = 1,
                autoscaling: dict[str, Any] | None = None):
    """The bound Serve application: `replicas` fixed replicas, or `autoscaling` (a Serve
    autoscaling_config, e.g. from autoscaling_config())."""
    options: dict[str, Any] = {"ray_actor_options": actor_options(config)}
    if autoscaling is not None:
        options["autoscaling_config"] = autoscaling
    else:
        if replicas is None or replicas < 1:
            raise UserInputError(f"replicas must be >= 1, got {replicas}")
        options["num_replicas"] = replicas
    return _deployment_class().options(**options).bind(config)


def serve_ray(config: ServerConfig, replicas: int) -> None:
    """Serve `config` on Ray Serve with `replicas` replicas until SIGINT/SIGTERM (as uvicorn.run).

    Joins the Ray cluster RAY_ADDRESS names (or the one `ray start` made on this machine), or
    starts a local one. Ray's HTTP proxy listens on config.host:config.port.
    """
    import ray
    from ray import serve

    config.check()
    config.out_dir.mkdir(parents=True, exist_ok=True)
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False)
    # After ray.init, which installs handlers of its own: SIGTERM (systemd, docker stop) stops
    # the app as Ctrl-C does, also while serve.run is still waiting for the replicas.
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        # Replicas open these by path from Ray's working directories, not ours: absolute paths.
        config = config.replace(out_dir=config.out_dir.resolve(),
                                db_path=config.db_path.resolve() if config.db_path else None,
                                models=tuple(m.resolve() for m in config.models))
        serve.start(http_options={"host": config.host, "port": config.port})
        serve.run(application(config, replicas=replicas), name=APP_NAME, route_prefix="/")
        print(f"ldm serve: {replicas} Ray Serve replica(s) on "
              f"http://{config.host}:{config.port}", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        # Replicas stop their workers; a job they were running goes back to the queue (its
        # lease) and runs when the service next runs on this store.
        with contextlib.suppress(Exception):
            serve.delete(APP_NAME)
        if started_here:
            serve.shutdown()
            ray.shutdown()


# --- `serve run` ---------------------------------------------------------------------------------

def config_from_args(args: dict[str, Any]) -> ServerConfig:
    """A ServerConfig from a Serve config file's `args:` (or `serve run ... key=value`, where
    every value is a string): ServerConfig's field names; "models" a list or comma-separated
    string; "api_keys" plain keys to hash (prefer "api_key_hashes"); "limits" a mapping."""
    from .config import hash_key

    args = dict(args)
    keys = args.pop("api_keys", None)
    limits = args.pop("limits", None) or {}
    hints = typing.get_type_hints(ServerConfig)
    fields = {f.name for f in dataclasses.fields(ServerConfig)} - {"limits"}
    unknown = sorted(set(args) - fields)
    if unknown:
        raise UserInputError(f"unknown ServerConfig argument(s) {', '.join(unknown)}; valid: "
                             f"{', '.join(sorted(fields | {'api_keys', 'limits'}))}")
    values = {name: _coerce(name, value, hints[name]) for name, value in args.items()}
    if keys:
        values["api_key_hashes"] = tuple(values.get("api_key_hashes", ())) + tuple(
            hash_key(k) for k in _as_list(keys))
    if limits:
        limit_hints = typing.get_type_hints(Limits)
        bad = sorted(set(limits) - set(limit_hints))
        if bad:
            raise UserInputError(f"unknown limit(s) {', '.join(bad)}")
        values["limits"] = Limits(**{k: _coerce(k, v, limit_hints[k]) for k, v in limits.items()})
    if "models" not in values:
        from ldm_engine.paths import BUNDLED_MODEL
        values["models"] = (BUNDLED_MODEL,)
    values.setdefault("out_dir", Path("outputs").resolve())
    # A Serve config describes a cluster, whose proxy usually listens on every interface
    # (http_options.host): unless the file says the host is loopback, it is taken to be public,
    # so config.check() wants an API key (or insecure: true).
    values.setdefault("host", "0.0.0.0")
    config = ServerConfig(**values)
    config.check()
    return config


def _as_list(value: Any) -> list:
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return list(value)


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """A config-file or command-line value as the field's type (one-line error otherwise)."""
    origin, inner = typing.get_origin(hint), typing.get_args(hint)
    try:
        if origin is tuple:                                 # tuple[Path, ...] / tuple[str, ...]
            items = _as_list(value)
            return tuple(Path(v).resolve() if inner[0] is Path else str(v) for v in items)
        if hint is Path or Path in inner:                   # Path, Path | None
            return None if value is None else Path(value).resolve()
        if hint is bool:
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(value)
                return value.lower() in ("true", "1", "yes")
            return bool(value)
        if hint in (int, float, str):
            if hint is not str and isinstance(value, bool):
                raise ValueError(value)
            return hint(value)
    except (TypeError, ValueError):
        raise UserInputError(f"{name}: {value!r} is not a valid {getattr(hint, '__name__', hint)}"
                             ) from None
    return value


def build_app(args: dict[str, Any]):
    """The application builder `serve run` calls:

        serve run ldm_engine.apps.server.ray_app:build_app models=ldm_engine/models/default
        serve run docs/serve-config.yaml

    `args` holds ServerConfig fields (config_from_args) plus "replicas" (fixed) or
    "min_replicas"/"max_replicas" (autoscaling on queue depth; "jobs_per_replica" optional).
    A config file's own `deployments:` autoscaling_config, if any, overrides what this sets.
    """
    args = dict(args)
    replicas = args.pop("replicas", None)
    low, high = args.pop("min_replicas", None), args.pop("max_replicas", None)
    per_replica = args.pop("jobs_per_replica", None)
    config = config_from_args(args)
    config.out_dir.mkdir(parents=True, exist_ok=True)
    if low is not None or high is not None:
        low = int(low if low is not None else 1)
        scaling = autoscaling_config(config, min_replicas=low,
                                     max_replicas=int(high if high is not None else low),
                                     jobs_per_replica=float(per_replica) if per_replica else None)
        return application(config, autoscaling=scaling)
    return application(config, replicas=int(replicas or 1))
