"""The API key: checked in constant time, on the raw header bytes. No model is loaded: GET /v1/models
never reaches the worker."""

from __future__ import annotations

import hmac
import http.client
import json
import threading

import pytest

KEY = "s3cret-ключ"  # non-ASCII on purpose: compare_digest refuses such str, so bytes must be compared


@pytest.fixture
def keyed_server():
    from taille.serve.server import ServeSettings, build_server

    srv = build_server(None, {}, ServeSettings(port=0, api_key=KEY), "bare")
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.worker.jobs.put(None)
    srv.server_close()


def get_models(server, authorization: bytes | None):
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=30)
    conn.request("GET", "/v1/models", headers={} if authorization is None else {"Authorization": authorization})
    response = conn.getresponse()
    body = json.loads(response.read())
    conn.close()
    return response.status, body


def test_api_key_is_compared_in_constant_time(keyed_server, monkeypatch):
    calls = []
    real = hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    wrong = [f"Bearer {KEY[:-1]}X".encode(), f"Bearer {KEY}".encode()[:-1], b"Bearer ", KEY.encode(), None]
    for header in wrong:
        calls.clear()
        status, body = get_models(keyed_server, header)
        assert calls, f"{header!r} was not checked with hmac.compare_digest"
        assert status == 401, header
        assert body["error"]["type"] == "authentication_error" and body["error"]["code"] == "invalid_api_key"

    calls.clear()
    status, body = get_models(keyed_server, f"Bearer {KEY}".encode())  # UTF-8 on the wire, as clients send it
    assert calls and all(isinstance(a, bytes) and isinstance(b, bytes) for a, b in calls)
    assert status == 200 and [m["id"] for m in body["data"]] == ["bare"]
