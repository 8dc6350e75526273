"""`ldm serve` security: API keys (Bearer, X-API-Key, HTTP Basic), the open /healthz, refusing a
public address without a key, keys files with hashed lines, and keys never kept in plain text."""

from __future__ import annotations

import base64
import hashlib

import pytest
from fastapi.testclient import TestClient

from ldm_engine.apps import cli
from ldm_engine.apps.server.cli_serve import config_from_args, read_keys_file
from ldm_engine.apps.server.config import ServerConfig, hash_key
from ldm_engine.errors import UserInputError
from ldm_engine.paths import BUNDLED_MODEL

pytestmark = pytest.mark.usefixtures("deadline")
DEADLINE_SECONDS = 60
KEY = "k-3f9a1c2e-correct"


def basic(user: str, password: str) -> dict:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def make_client(tmp_path, hashes: tuple[str, ...]) -> TestClient:
    """An app with these key hashes over a service whose workers never start (no request here
    needs an image made): TestClient without `with` runs no lifespan."""
    from ldm_engine.apps.server.app import create_app
    from ldm_engine.apps.server.service import JobService

    config = ServerConfig(models=(BUNDLED_MODEL,), out_dir=tmp_path, api_key_hashes=hashes)
    return TestClient(create_app(JobService(config, start_workers=False)))


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    return make_client(tmp_path_factory.mktemp("secure"), (hash_key(KEY),))


@pytest.mark.parametrize("headers", [
    {},
    {"Authorization": "Bearer wrong"},
    {"Authorization": f"Bearer {KEY}x"},
    {"X-API-Key": "wrong"},
    basic("user", "wrong"),
    basic(KEY, ""),                             # the key as user name is not the password
    {"Authorization": f"Token {KEY}"},          # an unknown scheme
    {"Authorization": "Basic %%%notbase64"},
], ids=["none", "bearer-wrong", "bearer-longer", "x-api-key-wrong", "basic-wrong",
        "basic-key-as-user", "other-scheme", "basic-garbage"])
def test_refused_without_the_right_key(client, headers):
    for method, path in (("GET", "/v1/models"), ("GET", "/metrics"), ("GET", "/docs"),
                         ("POST", "/v1/jobs"), ("GET", "/v1/jobs/" + "0" * 32),
                         ("GET", "/no/such/path")):
        r = client.request(method, path, headers=headers)
        assert r.status_code == 401, (method, path, r.text)
        assert set(r.json()) == {"error"} and "API key" in r.json()["error"]
        challenges = r.headers.get_list("www-authenticate")
        assert any(c.startswith("Basic") for c in challenges)
        assert any(c.startswith("Bearer") for c in challenges)


@pytest.mark.parametrize("headers", [
    {"Authorization": f"Bearer {KEY}"},
    {"authorization": f"bearer {KEY}"},
    {"X-API-Key": KEY},
    basic("anyone", KEY),
    basic("", KEY),
], ids=["bearer", "bearer-lowercase", "x-api-key", "basic", "basic-no-user"])
def test_accepted_with_the_right_key(client, headers):
    r = client.get("/v1/models", headers=headers)
    assert r.status_code == 200, r.text
    assert [m["name"] for m in r.json()] == [BUNDLED_MODEL.name]


def test_healthz_is_open(client):
    r = client.get("/healthz")
    assert r.status_code == 200 and r.json()["status"] == "ok"


def test_no_body_is_read_before_the_key(client):
    # Unauthenticated, a huge declared body is a 401, not a 413: nothing of it is looked at.
    r = client.post("/v1/jobs", content=b"{}", headers={"Content-Length": str(10**12),
                                                       "Content-Type": "application/json"})
    assert r.status_code == 401


def test_open_without_keys(tmp_path):
    client = make_client(tmp_path, ())
    assert client.get("/v1/models").status_code == 200


def parse(argv: list[str]):
    return cli.build_parser().parse_args(["serve", *argv])


def test_public_host_without_key_exits_2_and_serves_nothing(monkeypatch, capsys):
    import uvicorn

    def never(*args, **kwargs):
        raise AssertionError("a server was started")

    monkeypatch.setattr(uvicorn, "run", never)
    assert cli.main(["serve", "--host", "0.0.0.0"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1 and "0.0.0.0" in err and "API key" in err
    # With a key, or said out loud, the same address is accepted.
    assert config_from_args(parse(["--host", "0.0.0.0", "--api-key", KEY])).host == "0.0.0.0"
    assert config_from_args(parse(["--host", "0.0.0.0", "--insecure"])).insecure


def test_serve_runs_uvicorn_with_the_checked_config(monkeypatch, tmp_path):
    import uvicorn

    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(app=app, **kw))
    assert cli.main(["serve", "--port", "7999", "--out", str(tmp_path), "--api-key", KEY]) == 0
    assert seen["host"] == "127.0.0.1" and seen["port"] == 7999
    service = seen["app"].state.service
    assert service.config.api_key_hashes == (hash_key(KEY),)
    assert not service.config.ui
    assert cli.build_parser().parse_args(["ui"]).ui


def test_plain_keys_are_not_kept(tmp_path):
    config = config_from_args(parse(["--api-key", KEY, "--out", str(tmp_path)]))
    assert config.api_key_hashes == (hashlib.sha256(KEY.encode()).hexdigest(),)
    assert KEY not in repr(config)
    assert all(KEY not in repr(getattr(config, f)) for f in config.__dataclass_fields__)


def test_keys_file_with_plain_and_hashed_lines(tmp_path):
    hashed_only = "k-only-its-hash-is-on-disk"
    keys = tmp_path / "keys"
    keys.write_text(f"# operators\n{KEY}   # alice\n\n"
                    f"sha256:{hash_key(hashed_only).upper()}\n")
    assert read_keys_file(keys) == (hash_key(KEY), hash_key(hashed_only))
    config = config_from_args(parse(["--api-keys-file", str(keys), "--host", "0.0.0.0"]))
    client = make_client(tmp_path, config.api_key_hashes)
    assert client.get("/v1/models", headers={"X-API-Key": hashed_only}).status_code == 200
    assert client.get("/v1/models", headers={"X-API-Key": KEY}).status_code == 200
    assert client.get("/v1/models", headers={"X-API-Key": "sha256:" + hash_key(KEY)}
                      ).status_code == 401           # a digest is not a key


@pytest.mark.parametrize("text, words", [
    ("# nothing\n\n", "no API keys"),
    ("sha256:abc\n", "64 hex"),
    ("sha256:" + "g" * 64 + "\n", "64 hex"),
])
def test_bad_keys_file(tmp_path, text, words):
    keys = tmp_path / "keys"
    keys.write_text(text)
    with pytest.raises(UserInputError, match=words):
        read_keys_file(keys)


def test_missing_keys_file_is_one_line(tmp_path, capsys):
    assert cli.main(["serve", "--api-keys-file", str(tmp_path / "absent")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "absent" in err


def test_serve_parsing_imports_no_server_library():
    import subprocess
    import sys

    code = ("import sys; from ldm_engine.apps.cli import build_parser; "
            "build_parser().parse_args(['serve', '--host', '0.0.0.0', '--api-key', 'k']); "
            "print(*(m in sys.modules for m in ('torch', 'fastapi', 'uvicorn', 'pipelines')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.split() == ["False"] * 4
