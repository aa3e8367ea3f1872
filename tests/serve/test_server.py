"""The OpenAI-compatible server, started on 127.0.0.1 and spoken to with the official `openai` client.

The model is the embedded SmolLM2-135M-Instruct GGUF, run by llama.cpp; replies are kept short."""

from __future__ import annotations

import concurrent.futures
import contextlib
import http.client
import json
import logging
import socket
import threading
import time

import pytest

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install -e .[export])")
openai = pytest.importorskip("openai")


@contextlib.contextmanager
def running(model: str, personas: dict | None = None, **settings):
    """A server on its own model instance (one worker each: they must not share a llama.cpp context). One
    llama.cpp thread: its thread pool spins at barriers, so on a small shared machine every core (the
    default) can run 10x slower than one."""
    from taille.chat.engine import gguf_for
    from taille.models.llamacpp import open_gguf
    from taille.serve.server import ServeSettings, build_server

    settings = ServeSettings(port=0, threads=1, engine="llama-cpp-python", **settings)
    llm = open_gguf(gguf_for(model), n_ctx=settings.n_ctx, threads=settings.threads)
    srv = build_server(llm, personas or {}, settings, "smollm2")
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.worker.jobs.put(None)
        srv.server_close()


@pytest.fixture(scope="module")
def server(smollm2):
    from taille.chat.persona import load_personas, shipped_personas

    with running(smollm2, load_personas(shipped_personas()), n_ctx=512, max_tokens=64, max_body=4096,
                 queue_size=16) as srv:
        yield srv


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


def test_json_schema_replies_parse_in_process_too(server):
    # the in-process engine builds the same grammar llama-server does (a persona's actions take this path)
    schema = {"type": "object", "properties": {"say": {"type": "string", "maxLength": 60},
                                               "action": {"enum": ["none", "trade", "attack"]}},
              "required": ["say", "action"]}
    api = client(server)
    for seed in range(2):
        reply = api.chat.completions.create(
            model="old-tam", messages=[{"role": "user", "content": "Are you an AI? Write me Python code."}],
            seed=seed, response_format={"type": "json_schema", "json_schema": {"name": "npc", "schema": schema}})
        value = json.loads(reply.choices[0].message.content)
        assert set(value) == {"say", "action"} and value["action"] in ("none", "trade", "attack")
    with pytest.raises(openai.BadRequestError, match="cannot build a grammar"):
        api.chat.completions.create(model="old-tam", messages=[{"role": "user", "content": "hi"}], response_format={
            "type": "json_schema", "json_schema": {"name": "npc", "schema": {"type": "feeling"}}})


def test_eight_clients_four_requests_each_all_answered(server):
    api = client(server)

    def one(i: int) -> str:
        reply = api.chat.completions.create(
            model=("brenna-ironhand", "old-tam", "halcyon")[i % 3], max_tokens=8, seed=i,
            messages=[{"role": "user", "content": f"Tell me about thing number {i}."}], stream=i % 2 == 0)
        if i % 2 == 0:
            return "".join(c.choices[0].delta.content or "" for c in reply)
        return reply.choices[0].message.content

    with concurrent.futures.ThreadPoolExecutor(8) as pool:  # 8 x 10 runs in benchmarks/serve_load.py
        replies = list(pool.map(one, range(32)))
    assert len(replies) == 32 and all(isinstance(r, str) for r in replies)
    assert sum(bool(r.strip()) for r in replies) >= 28  # a reply may be an immediate end of turn


class Replies:
    """Wraps the worker's stream_reply: pieces each call produced, and events for its first piece and its end."""

    def __init__(self, monkeypatch, delay: float = 0.0):
        from taille.serve import server as module

        self.real, self.delay = module.stream_reply, delay
        self.pieces: list[int] = []
        self.first, self.finished = threading.Event(), threading.Event()
        monkeypatch.setattr(module, "stream_reply", self.stream_reply)

    def stream_reply(self, *args, **kwargs):
        call = len(self.pieces)
        self.pieces.append(0)
        time.sleep(self.delay)  # stands for a slow prefill
        inner = self.real(*args, **kwargs)
        try:
            for piece in inner:
                self.pieces[call] += 1
                self.first.set()
                yield piece
        finally:
            inner.close()
            self.finished.set()


def wait_for_log(caplog, text: str, timeout: float = 60.0) -> logging.LogRecord:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        records = [r for r in caplog.records if text in r.getMessage()]
        if records:
            return records[0]
        time.sleep(0.05)
    raise AssertionError(f"no log line with {text!r}")


LONG = [{"role": "user", "content": "Write the numbers from 1 to 500 separated by commas."}]
"""At temperature 0 the embedded model runs to 400 tokens on this (finish_reason length)."""


@pytest.fixture(scope="module")
def roomy_server(smollm2):
    with running(smollm2, n_ctx=512, max_tokens=400) as srv:
        yield srv


def hang_up_on(server, body: dict, when: threading.Event | None = None) -> None:
    """Send a request on a raw socket and close it without reading (after `when` is set, if given)."""
    data = json.dumps(body).encode()
    with socket.create_connection(server.server_address[:2], timeout=60) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(data), data))
        if when is not None:
            assert when.wait(60), "generation never started"


def test_plain_request_whose_client_hangs_up_mid_reply_stops_generating(roomy_server, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="taille.serve.server")
    replies = Replies(monkeypatch)
    hang_up_on(roomy_server, {"model": "smollm2", "messages": LONG, "max_tokens": 400, "temperature": 0},
               when=replies.first)
    assert replies.finished.wait(60)
    assert replies.pieces[0] < 100, f"{replies.pieces[0]} pieces generated for a client that had gone"
    record = wait_for_log(caplog, "stopped a reply after")
    assert record.args[0] < 100 and record.args[1] == 400 and "went away" in record.getMessage()
    reply = client(roomy_server).chat.completions.create(model="smollm2", messages=LONG, max_tokens=4)
    assert reply.choices[0].finish_reason in ("stop", "length")


def test_plain_request_whose_client_hangs_up_at_once_is_dropped(roomy_server, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="taille.serve.server")
    replies = Replies(monkeypatch)
    hang_up_on(roomy_server, {"model": "smollm2", "messages": LONG, "max_tokens": 400, "temperature": 0})
    # the worker either never starts it (still queued when the hang-up is seen) or stops at its first tokens
    deadline = time.monotonic() + 60
    while not any("went away" in r.getMessage() for r in caplog.records) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sum(replies.pieces) < 100, f"{replies.pieces} pieces generated for a client that had gone"
    assert any("went away" in r.getMessage() for r in caplog.records)
    started = time.monotonic()
    reply = client(roomy_server).chat.completions.create(model="smollm2", messages=LONG, max_tokens=4)
    assert reply.choices[0].finish_reason in ("stop", "length") and time.monotonic() - started < 10


@pytest.fixture(scope="module")
def impatient_server(smollm2):
    with running(smollm2, n_ctx=512, max_tokens=64, timeout=0.5) as srv:
        yield srv


def test_timeout_bounds_the_wait_in_the_queue_not_the_reply(impatient_server, monkeypatch, caplog):
    """--timeout 0.5: a request queued behind a reply that takes longer gets 503 at about 0.5 s; the reply
    itself, 1.5 s of (simulated) prefill before its first token, is not cut short."""
    caplog.set_level(logging.INFO, logger="taille.serve.server")
    replies = Replies(monkeypatch, delay=1.5)
    api = client(impatient_server)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        first = pool.submit(api.chat.completions.create, model="smollm2", messages=LONG, max_tokens=8)
        deadline = time.monotonic() + 30
        while not replies.pieces and time.monotonic() < deadline:  # the worker has taken the first request
            time.sleep(0.01)
        started = time.monotonic()
        status, body = raw(impatient_server, "POST", "/v1/chat/completions", json.dumps(
            {"model": "smollm2", "messages": LONG, "max_tokens": 8, "stream": True}).encode())
        waited = time.monotonic() - started
        reply = first.result(timeout=60)
    assert reply.choices[0].finish_reason in ("stop", "length") and reply.usage.completion_tokens > 0
    assert status == 503 and 0.4 < waited < 1.4, (status, waited)
    assert set(body["error"]) == {"message", "type", "param", "code"} and body["error"]["code"] == "timeout"
    assert "waited over 0.5 s in the queue" in body["error"]["message"]
    assert "waited over 0.5 s in the queue" in wait_for_log(caplog, "dropped a queued request").getMessage()
    assert len(replies.pieces) == 1  # the timed-out request was never generated
