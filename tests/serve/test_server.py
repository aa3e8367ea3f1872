"""The OpenAI-compatible server, started on 127.0.0.1 and spoken to with the official `openai` client.

The model is the embedded SmolLM2-135M-Instruct GGUF, run by llama.cpp; replies are kept short."""

from __future__ import annotations

import concurrent.futures
import http.client
import json
import threading

import pytest

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install -e .[export])")
openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def server(smollm2):
    from taille.chat.engine import gguf_for
    from taille.chat.persona import load_personas, shipped_personas
    from taille.models.llamacpp import open_gguf
    from taille.serve.server import ServeSettings, build_server

    settings = ServeSettings(port=0, n_ctx=512, max_tokens=64, max_body=4096, queue_size=16)
    llm = open_gguf(gguf_for(smollm2), n_ctx=settings.n_ctx)
    srv = build_server(llm, load_personas(shipped_personas()), settings, "smollm2")
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.worker.jobs.put(None)
    srv.server_close()


def client(server):
    host, port = server.server_address[:2]
    return openai.OpenAI(base_url=f"http://{host}:{port}/v1", api_key="unused", max_retries=0, timeout=120)


def raw(server, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=60)
    conn.request(method, path, body=body, headers=headers or {})
    response = conn.getresponse()
    payload = response.read()
    conn.close()
    return response.status, json.loads(payload) if payload else None


def test_binds_to_localhost_by_default():
    from taille.serve.server import ServeSettings

    assert ServeSettings().host == "127.0.0.1"


def test_models_lists_the_personas(server):
    ids = {m.id for m in client(server).models.list()}
    assert {"brenna-ironhand", "old-tam", "halcyon", "smollm2"} <= ids


def test_plain_and_streaming_chat(server):
    api = client(server)
    messages = [{"role": "user", "content": "Where can I find coal?"}]
    plain = api.chat.completions.create(model="brenna-ironhand", messages=messages, max_tokens=24, seed=1)
    text = plain.choices[0].message.content
    assert text.strip() and plain.choices[0].finish_reason in ("stop", "length")
    assert plain.usage.prompt_tokens > 50 and 0 < plain.usage.completion_tokens <= 25
    assert plain.model == "brenna-ironhand" and plain.id.startswith("chatcmpl-")

    stream = api.chat.completions.create(model="brenna-ironhand", messages=messages, max_tokens=24, seed=1,
                                         stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert streamed == text  # same seed, same reply, in pieces
    assert len([c for c in chunks if c.choices[0].delta.content]) > 1
    assert chunks[-1].choices[0].finish_reason == plain.choices[0].finish_reason


def test_bad_requests_get_openai_style_4xx(server):
    api = client(server)
    with pytest.raises(openai.NotFoundError) as e:
        api.chat.completions.create(model="nobody", messages=[{"role": "user", "content": "hi"}])
    assert "unknown model 'nobody'" in str(e.value) and "brenna-ironhand" in str(e.value)
    with pytest.raises(openai.BadRequestError) as e:
        api.chat.completions.create(model="old-tam", messages=[{"role": "user", "content": "hi"}], max_tokens=10_000)
    assert "max_tokens" in str(e.value)
    with pytest.raises(openai.BadRequestError) as e:  # fits the body limit, not the 512-token context
        api.chat.completions.create(model="old-tam", messages=[{"role": "user", "content": "ale " * 900}])
    assert e.value.code == "context_length_exceeded" and "512 tokens" in str(e.value)
    with pytest.raises(openai.BadRequestError):
        api.chat.completions.create(model="old-tam", messages=[])

    status, body = raw(server, "POST", "/v1/chat/completions", b'{"model": "old-tam", "messages": [',
                       {"Content-Type": "application/json"})
    assert status == 400 and "malformed JSON" in body["error"]["message"]
    status, body = raw(server, "POST", "/v1/chat/completions", b"x" * 5000, {"Content-Type": "application/json"})
    assert status == 413 and body["error"]["code"] == "request_too_large"
    status, body = raw(server, "POST", "/v1/chat/completions", b'["a list"]')
    assert status == 400 and "JSON object" in body["error"]["message"]
    status, body = raw(server, "GET", "/v1/nothing")
    assert status == 404 and body["error"]["type"] == "invalid_request_error"
    status, body = raw(server, "GET", "/health")
    assert status == 200 and body["status"] == "ok"


def test_eight_clients_ten_requests_each_all_answered(server):
    api = client(server)

    def one(i: int) -> str:
        reply = api.chat.completions.create(
            model=("brenna-ironhand", "old-tam", "halcyon")[i % 3], max_tokens=8, seed=i,
            messages=[{"role": "user", "content": f"Tell me about thing number {i}."}], stream=i % 2 == 0)
        if i % 2 == 0:
            return "".join(c.choices[0].delta.content or "" for c in reply)
        return reply.choices[0].message.content

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(one, range(80)))
    assert len(replies) == 80 and all(isinstance(r, str) for r in replies)
    assert sum(bool(r.strip()) for r in replies) >= 70  # a reply may be an immediate end of turn
