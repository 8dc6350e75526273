"""Bad input over HTTP: each case is a 4xx whose body is one {"error"} line naming the problem,
and the server goes on serving a good request afterwards."""

from __future__ import annotations

import base64
import io
import json
import random
import socket
import struct
import time
import zlib

import httpx
import pytest
from PIL import Image

from ldm_engine.apps.server.config import Limits, ServerConfig
from ldm_engine.paths import BUNDLED_MODEL
from tests.server_util import serving

pytestmark = pytest.mark.usefixtures("deadline")
DEADLINE_SECONDS = 60
# Small limits keep the oversize cases small.
LIMITS = Limits(max_body_bytes=256 * 1024, max_image_bytes=20_000, max_image_pixels=512 * 512)
JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def base_url(tmp_path_factory):
    from ldm_engine.apps.server.app import create_app
    from ldm_engine.apps.server.service import JobService

    config = ServerConfig(models=(BUNDLED_MODEL,), out_dir=tmp_path_factory.mktemp("bad"),
                          limits=LIMITS)
    with serving(create_app(JobService(config))) as url:
        yield url


@pytest.fixture(scope="module")
def http(base_url):
    with httpx.Client(base_url=base_url, timeout=30) as client:
        yield client


def png_b64(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(side: int = 100_000) -> bytes:
    """A ~100-byte PNG whose header says side x side RGB (30 GB decoded); its few bytes of
    IDAT are valid zlib, so only the header check can stop it."""
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def noise_png_b64(side: int) -> str:
    """Random pixels: a PNG that does not compress (about 3 * side**2 bytes)."""
    data = random.Random(0).randbytes(side * side * 3)
    return png_b64(Image.frombytes("RGB", (side, side), data))


def job(**request) -> dict:
    return {"request": {"prompt": "a red circle", "steps": 2, **request}}


def img2img(image: str) -> dict:
    return {"request": {"mode": "img2img", "prompt": "x", "steps": 2, "init_image": image}}


# (name, method, path, body (bytes: sent as is; else JSON), extra headers, status, key words)
CASES = [
    ("malformed-json", "POST", "/v1/jobs", b'{"request": {', {}, 400, "malformed json"),
    ("empty-body", "POST", "/v1/jobs", b"", {}, 400, "empty"),
    ("not-utf8", "POST", "/v1/jobs", b'{"request": "\xff\xfe"}', {}, 400, "utf-8"),
    ("deep-nesting", "POST", "/v1/jobs", b"[" * 100_000 + b"]" * 100_000, {}, 400, "nested"),
    ("nan", "POST", "/v1/jobs", b'{"request": {"prompt": "x", "guidance_scale": NaN}}', {},
     400, "nan"),
    ("body-not-object", "POST", "/v1/jobs", [1, 2], {}, 400, "json object"),
    ("request-not-object", "POST", "/v1/jobs", {"request": "a cat"}, {}, 400, "json object"),
    ("missing-request", "POST", "/v1/jobs", {"num_images": 1}, {}, 400, '"request"'),
    ("unknown-body-field", "POST", "/v1/jobs", {**job(), "priority": 9}, {}, 400, "priority"),
    ("unknown-request-field", "POST", "/v1/jobs", job(cfg=7), {}, 400, "'cfg'"),
    ("missing-prompt", "POST", "/v1/jobs", {"request": {"steps": 2}}, {}, 400, "prompt"),
    ("prompt-not-string", "POST", "/v1/jobs", job(prompt=5), {}, 400, "prompt"),
    ("steps-string", "POST", "/v1/jobs", job(steps="20"), {}, 400, "steps"),
    ("steps-bool", "POST", "/v1/jobs", job(steps=True), {}, 400, "steps"),
    ("steps-fraction", "POST", "/v1/jobs", job(steps=2.5), {}, 400, "steps"),
    ("steps-0", "POST", "/v1/jobs", job(steps=0), {}, 400, "steps"),
    ("steps-1e6", "POST", "/v1/jobs", job(steps=1e6), {}, 400, "steps"),
    ("cfg-string", "POST", "/v1/jobs", job(guidance_scale="high"), {}, 400, "guidance_scale"),
    ("seed-null", "POST", "/v1/jobs", job(seed=None), {}, 400, "seed"),
    ("unknown-mode", "POST", "/v1/jobs", job(mode="txt2video"), {}, 400, "mode"),
    ("unknown-sampler", "POST", "/v1/jobs", job(sampler="warp_drive"), {}, 400, "sampler"),
    ("unknown-model", "POST", "/v1/jobs", {**job(), "model": "sd-xxl"}, {}, 404, "sd-xxl"),
    ("model-not-string", "POST", "/v1/jobs", {**job(), "model": 3}, {}, 400, "model"),
    ("negative-height", "POST", "/v1/jobs", job(height=-64), {}, 400, "height"),
    ("huge-width", "POST", "/v1/jobs", job(width=1_000_000), {}, 400, "1000000x"),
    ("odd-height", "POST", "/v1/jobs", job(height=65), {}, 400, "height"),
    ("too-many-images", "POST", "/v1/jobs", {**job(), "num_images": 1000}, {}, 400,
     "num_images"),
    ("zero-images", "POST", "/v1/jobs", {**job(), "num_images": 0}, {}, 400, "num_images"),
    ("images-string", "POST", "/v1/jobs", {**job(), "num_images": "2"}, {}, 400, "num_images"),
    ("prompt-too-long", "POST", "/v1/jobs", job(prompt="a " * 5000), {}, 400, "prompt"),
    ("bad-base64", "POST", "/v1/jobs", img2img("not/base64!!"), {}, 400, "base64"),
    ("base64-not-image", "POST", "/v1/jobs", img2img(base64.b64encode(b"hello").decode()), {},
     400, "init_image"),
    ("image-not-string", "POST", "/v1/jobs", img2img(7), {}, 400, "init_image"),
    ("oversize-image", "POST", "/v1/jobs", img2img(noise_png_b64(160)), {}, 400, "limit"),
    ("decompression-bomb", "POST", "/v1/jobs", img2img(base64.b64encode(bomb_png()).decode()),
     {}, 400, "pixels"),
    ("oversize-body", "POST", "/v1/jobs", job(prompt="x" * (LIMITS.max_body_bytes + 1)), {},
     413, "limit"),
    ("text-plain", "POST", "/v1/jobs", b'{"request": {"prompt": "x"}}',
     {"Content-Type": "text/plain"}, 415, "application/json"),
    ("no-content-type", "POST", "/v1/jobs", b'{"request": {"prompt": "x"}}',
     {"Content-Type": ""}, 415, "application/json"),
    ("generate-bad-timeout", "POST", "/v1/generate", {**job(), "timeout": -1}, {}, 400,
     "timeout"),
    ("non-hex-job-id", "GET", "/v1/jobs/../../etc/passwd", None, {}, 404, "no"),
    ("short-job-id", "GET", "/v1/jobs/abc123", None, {}, 404, "abc123"),
    ("uppercase-job-id", "GET", "/v1/jobs/" + "A" * 32, None, {}, 404, "job"),
    ("unknown-job", "GET", "/v1/jobs/" + "0" * 32, None, {}, 404, "job"),
    ("cancel-unknown-job", "DELETE", "/v1/jobs/" + "f" * 32, None, {}, 404, "job"),
    ("events-bad-id", "GET", "/v1/jobs/zz/events", None, {}, 404, "zz"),
    ("image-index-not-int", "GET", "/v1/jobs/" + "0" * 32 + "/images/x1", None, {}, 422, "k"),
    ("image-index-path", "GET", "/v1/jobs/" + "0" * 32 + "/images/..%2Fjobs.sqlite3", None, {},
     404, ""),
    ("unknown-path", "GET", "/v2/everything", None, {}, 404, "/v2/everything"),
    ("wrong-method", "PUT", "/v1/jobs", b"{}", {}, 405, "put"),
]


@pytest.mark.parametrize("name, method, path, body, headers, status, words", CASES,
                         ids=[c[0] for c in CASES])
def test_bad_input_is_one_line(http, name, method, path, body, headers, status, words):
    content = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    sent = {**JSON, **headers}
    if not sent["Content-Type"]:
        del sent["Content-Type"]
    r = http.request(method, path, content=content, headers=sent)
    assert r.status_code == status, r.text[:300]
    assert set(r.json()) == {"error"}, r.text[:300]
    message = r.json()["error"]
    assert "\n" not in message and "Traceback" not in message
    assert words.lower() in message.lower(), message


def test_declared_huge_body_is_refused_before_it_is_sent(base_url):
    # Only the headers go out: a server that waited for the body would not answer at all.
    host, port = base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 100000000000\r\n\r\n")
        head = s.recv(4096)
    assert head.startswith(b"HTTP/1.1 413"), head[:200]


def test_streamed_body_is_refused_once_past_the_limit(base_url):
    # Chunked encoding has no Content-Length to check: the bytes are counted as they come. The
    # body is never finished, so a 413 shows the server stopped reading at the limit.
    host, port = base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Transfer-Encoding: chunked\r\n\r\n")
        piece = b"x" * 4096
        for _ in range(LIMITS.max_body_bytes // len(piece) + 2):
            s.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
        head = _whole_response(s)
    assert head.startswith(b"HTTP/1.1 413"), head[:200]
    assert b"limit" in head


def _whole_response(s: socket.socket) -> bytes:
    """The status line, headers and the Content-Length body (uvicorn may send the body in a
    segment of its own, so one recv can end after the headers)."""
    data = b""
    while b"\r\n\r\n" not in data:
        part = s.recv(4096)
        if not part:
            return data
        data += part
    head, _, body = data.partition(b"\r\n\r\n")
    length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    while len(body) < length:
        part = s.recv(4096)
        if not part:
            break
        body += part
    return head + b"\r\n\r\n" + body


def test_internal_errors_do_not_leak(tmp_path, monkeypatch):
    from fastapi.testclient import TestClient

    from ldm_engine.apps.server.app import create_app
    from ldm_engine.apps.server.service import JobService

    service = JobService(ServerConfig(models=(BUNDLED_MODEL,), out_dir=tmp_path),
                         start_workers=False)

    def broken(*args, **kwargs):
        raise RuntimeError("secret at /home/operator/db")

    monkeypatch.setattr(service, "submit", broken)
    client = TestClient(create_app(service), raise_server_exceptions=False)
    r = client.post("/v1/jobs", json=job())
    assert r.status_code == 500
    assert "secret" not in r.text and "Traceback" not in r.text
    assert set(r.json()) == {"error"}


def test_still_serves_a_good_request_after_the_bad_ones(http):
    r = http.post("/v1/jobs", json=job(seed=3))
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    deadline = time.monotonic() + 30
    while (state := http.get(f"/v1/jobs/{job_id}").json()["state"]) in ("queued", "running"):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert state == "done"
    png = http.get(f"/v1/jobs/{job_id}/images/0")
    assert png.status_code == 200 and png.content.startswith(b"\x89PNG")
