"""Ray Serve replicas of `ldm serve` (ldm_engine.apps.server.ray_app).

Fast: the queue-depth autoscaling policy, `serve run` arguments, the committed Serve config file.
Slow: a local Ray instance with 2 CPU replicas on the bundled model sharing one job database; both
replicas run jobs, one is killed (ray.kill) while it runs one, and every accepted job still ends
DONE, the killed one re-run by a survivor with the image an uninterrupted run makes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from ldm_engine.apps.server import ray_app
from ldm_engine.apps.server.config import ServerConfig
from ldm_engine.errors import UserInputError
from ldm_engine.paths import BUNDLED_MODEL

REPO = Path(__file__).resolve().parents[1]


# --- fast ----------------------------------------------------------------------------------------

@dataclass
class Ctx:
    """The fields of Ray's AutoscalingContext the policy reads."""

    aggregated_metrics: dict
    target_num_replicas: int = 1


def test_policy_scales_on_shared_queue_depth():
    policy = ray_app.QueueDepthPolicy(jobs_per_replica=8)
    # Two replicas report the same shared depth (30 queued, 2 running): 32 jobs -> 4 replicas,
    # not 8 (their reports are not added up).
    metrics = {"queued": {"r1": 30.0, "r2": 30.0}, "running": {"r1": 2.0, "r2": 2.0}}
    assert policy(Ctx(metrics, 2)) == (4, {})
    assert policy(Ctx({"queued": {"r1": 0.0}, "running": {"r1": 0.0}}, 3))[0] == 1
    assert policy(Ctx({"queued": {"r1": 9.0}, "running": {"r1": 0.0}}))[0] == 2
    # No report yet: keep the current target.
    assert policy(Ctx({}, 3))[0] == 3
    with pytest.raises(ValueError):
        ray_app.QueueDepthPolicy(jobs_per_replica=0)


def test_replica_resources(tmp_path):
    cpu = ServerConfig(models=(BUNDLED_MODEL,), out_dir=tmp_path)
    gpu = cpu.replace(device="cuda:1")
    assert ray_app.actor_options(cpu) == {"num_cpus": 1}
    assert ray_app.actor_options(gpu) == {"num_gpus": 1}
    # Ray's CUDA_VISIBLE_DEVICES makes the replica's one GPU device 0.
    assert ray_app.replica_config(gpu).device == "cuda"
    scaling = ray_app.autoscaling_config(cpu.replace(max_batch=4), min_replicas=1,
                                         max_replicas=3)
    assert (scaling["min_replicas"], scaling["max_replicas"]) == (1, 3)
    assert scaling["policy"]["policy_kwargs"] == {"jobs_per_replica": 4}
    with pytest.raises(UserInputError, match="min"):
        ray_app.autoscaling_config(cpu, min_replicas=0, max_replicas=2)


def test_serve_run_args(tmp_path):
    config = ray_app.config_from_args({"models": str(BUNDLED_MODEL), "out_dir": str(tmp_path),
                                       "host": "127.0.0.1", "max_batch": "4",
                                       "lease_seconds": "2.5", "ui": "false",
                                       "limits": {"max_steps": 50}})
    assert config.models == (BUNDLED_MODEL,)
    assert (config.max_batch, config.lease_seconds, config.ui) == (4, 2.5, False)
    assert config.limits.max_steps == 50
    with pytest.raises(UserInputError, match="unknown ServerConfig argument.*max_btach"):
        ray_app.config_from_args({"max_btach": 4})
    with pytest.raises(UserInputError, match="max_batch: 'many' is not a valid int"):
        ray_app.config_from_args({"max_batch": "many"})
    # A Serve config is for a cluster: without a host said to be loopback it is public, and
    # refused without an API key.
    with pytest.raises(UserInputError, match="without an API key"):
        ray_app.config_from_args({"out_dir": str(tmp_path)})
    keyed = ray_app.config_from_args({"out_dir": str(tmp_path), "api_keys": "k1,k2"})
    assert len(keyed.api_key_hashes) == 2 and "k1" not in keyed.api_key_hashes


def test_committed_serve_config_is_valid():
    schema = pytest.importorskip("ray.serve.schema")
    yaml = pytest.importorskip("yaml")
    data = yaml.safe_load((REPO / "docs" / "serve-config.yaml").read_text())
    config = schema.ServeDeploySchema.model_validate(data)
    (app,) = config.applications
    assert app.import_path == "ldm_engine.apps.server.ray_app:build_app"
    # Its args are ones build_app takes: every key but the replica counts is a config field.
    args = {k: v for k, v in app.args.items()
            if k not in ("min_replicas", "max_replicas", "jobs_per_replica", "replicas")}
    config = ray_app.config_from_args(args)
    assert config.device == "cuda" and config.api_key_hashes


# --- slow: real replicas -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    ray = pytest.importorskip("ray")
    serve = pytest.importorskip("ray.serve")
    from ldm_engine.apps.server.loadtest import free_port

    out = tmp_path_factory.mktemp("ray-out")
    # Short leases: a survivor takes a dead replica's job within seconds.
    config = ServerConfig(models=(BUNDLED_MODEL,), out_dir=out, max_batch=1, lease_seconds=3.0)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(ray_app.application(config, replicas=2), name=ray_app.APP_NAME,
                  route_prefix="/")
        yield ray, serve, f"http://127.0.0.1:{port}", out
    finally:
        serve.shutdown()
        ray.shutdown()


def _views(client, ids):
    got = {}
    for job_id in ids:
        # Right after a replica dies the proxy may still route to it once: retry.
        for _ in range(20):
            r = client.get(f"/v1/jobs/{job_id}")
            if r.status_code == 200:
                got[job_id] = r.json()
                break
            time.sleep(0.2)
        else:
            raise AssertionError(f"GET /v1/jobs/{job_id}: {r.status_code} {r.text[:200]}")
    return got


def _pid(worker: str) -> int:
    return int(worker.split(":")[1])


@pytest.mark.slow
def test_two_replicas_share_the_queue_and_survive_a_kill(cluster):
    import httpx

    ray, serve, url, out = cluster
    handle = serve.get_deployment_handle(ray_app.DEPLOYMENT_NAME, app_name=ray_app.APP_NAME)
    replicas = {}
    for _ in range(40):
        who = handle.identity.remote().result()
        replicas[who["pid"]] = who["actor"]
        if len(replicas) == 2:
            break
    assert len(replicas) == 2, replicas

    bodies = [{"request": {"prompt": "a red circle", "seed": i, "steps": 16}, "num_images": 1}
              for i in range(12)]
    with httpx.Client(base_url=url, timeout=30) as client:
        ids = []
        for body in bodies:
            r = client.post("/v1/jobs", json=body)
            assert r.status_code == 202, r.text
            ids.append(r.json()["id"])

        # Both replicas' workers claim jobs from the one database.
        deadline = time.monotonic() + 300
        while True:
            views = _views(client, ids)
            running = {v["id"]: v["worker"] for v in views.values() if v["state"] == "running"}
            if len({_pid(w) for w in running.values()}) == 2:
                break
            assert time.monotonic() < deadline, "the two replicas never ran jobs at once"
            assert sum(v["state"] == "done" for v in views.values()) < len(ids) - 1, \
                "the queue emptied before both replicas ran a job at once"
            time.sleep(0.1)

        victim_job, victim_worker = next(iter(running.items()))
        victim_pid = _pid(victim_worker)
        assert victim_pid in replicas
        ray.kill(ray.get_actor(replicas[victim_pid], namespace="serve"), no_restart=True)

        deadline = time.monotonic() + 300
        while True:
            views = _views(client, ids)
            if all(v["state"] in ("done", "failed", "cancelled") for v in views.values()):
                break
            assert time.monotonic() < deadline, sorted(v["state"] for v in views.values())
            time.sleep(0.5)
        png = client.get(f"/v1/jobs/{victim_job}/images/0")

    assert [v["state"] for v in views.values()] == ["done"] * len(ids)
    victim = views[victim_job]
    # The killed replica's job was claimed again and finished by another process.
    assert victim["attempts"] >= 2
    assert _pid(victim["worker"]) != victim_pid

    # The re-run made the image an uninterrupted run makes.
    import io

    import numpy as np
    from PIL import Image

    from pipelines.base import Pipeline
    from pipelines.jsonform import request_from_json

    i = ids.index(victim_job)
    want = Pipeline.from_folder(BUNDLED_MODEL).run(request_from_json(bodies[i]["request"]))
    assert png.status_code == 200
    got = np.asarray(Image.open(io.BytesIO(png.content)).convert("RGB"))
    assert np.array_equal(got, np.asarray(want.images[0].convert("RGB")))
