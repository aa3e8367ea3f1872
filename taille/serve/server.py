"""`taille serve MODEL --personas DIR`: an OpenAI-compatible HTTP API where `model` names a character.

  GET  /v1/models             the personas (and the bare model, without a persona)
  POST /v1/chat/completions   plain JSON or, with "stream": true, server-sent events
  GET  /health                {"status": "ok", "queued": n}

One worker thread owns the llama.cpp model and answers requests one at a time from a bounded queue
(llama.cpp contexts are not thread-safe; on a PC one request at a time is also the fastest per
request). Request threads check the input and wait on their own result queue, so a slow or vanished
client never blocks the worker: a client that disconnects, streaming or not, queued or mid-reply, cancels
its generation (its request thread watches the socket for EOF between tokens). A request the worker
cannot start within `timeout` seconds of being queued gets 503; once started, a reply runs to its end
(max_tokens bounds it).
Errors use OpenAI's shape, {"error": {"message", "type", "param", "code"}}, with 4xx statuses for the
caller's mistakes: malformed JSON (400), unknown persona (404), body too large (413), max_tokens over
the limit or a prompt over the context window (400), a full queue (429), a missing API key (401), no
start within the queue timeout (503).
"""

from __future__ import annotations

import hmac
import json
import logging
import math
import queue
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from taille.chat.engine import ContextFull, Reply, fit_messages, stream_reply
from taille.chat.persona import Persona
from taille.errors import TailleError

log = logging.getLogger(__name__)

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
POLL_S = 0.25
"""How often a request thread waiting on the worker looks at its socket and the queue deadline (it also
looks at each piece of a reply); each look wakes a thread, so not much more often."""


@dataclass
class ServeSettings:
    host: str = "127.0.0.1"
    """Address to bind (127.0.0.1: this machine only)."""
    port: int = 8000
    """Port."""
    n_ctx: int = field(default=2048, metadata={"flag": "ctx"})
    """Context window in tokens (prompt and reply together)."""
    max_tokens: int = 512
    """Largest `max_tokens` a request may ask for."""
    max_body: int = 1 << 20
    """Largest request body in bytes."""
    queue_size: int = field(default=64, metadata={"flag": "queue"})
    """Requests that may wait; more get 429."""
    timeout: float = 300.0
    """Seconds a request may wait in the queue before it gets 503 (counted from when it is queued to when
    the worker starts it; a started reply is not cut short)."""
    api_key: str | None = field(default=None, metadata={"envvar": "TAILLE_API_KEY"})
    """Require 'Authorization: Bearer KEY' (or set TAILLE_API_KEY)."""
    threads: int | None = None
    """CPU threads (default: every core)."""

    def __post_init__(self):
        if self.max_tokens < 1 or self.n_ctx < 16 or self.queue_size < 1 or self.max_body < 1024:
            raise TailleError("--max-tokens >= 1, --ctx >= 16, --queue >= 1 and --max-body >= 1024 are required")
        if self.max_tokens >= self.n_ctx:
            raise TailleError(f"--max-tokens {self.max_tokens} leaves no room for a prompt in --ctx {self.n_ctx}")
        if not 0 <= self.port < 65536 or self.timeout <= 0 or (self.threads is not None and self.threads < 1):
            raise TailleError("--port must be 0-65535, --timeout positive and --threads at least 1")


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.type, self.param, self.code = status, type_, param, code

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class Job:
    persona: Persona | None
    messages: list[dict]
    max_tokens: int
    temperature: float
    top_p: float
    stop: list[str]
    seed: int | None
    repeat_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    events: queue.Queue = field(default_factory=queue.Queue)
    """('piece', text) ... then ('done', Reply, prompt_tokens) or ('error', ApiError)."""
    cancelled: threading.Event = field(default_factory=threading.Event)
    reason: str = ""
    """Why the job was cancelled, for the worker's log line."""
    deadline: float = math.inf
    """time.monotonic() by which the worker must have started the job, else the request gets 503."""
    started: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    """The worker starting a job and its request thread giving up on it race; the lock makes one win."""

    def claim(self) -> bool:
        """For the worker: take the job, unless it was cancelled first."""
        with self.lock:
            if not self.cancelled.is_set():
                self.started.set()
            return self.started.is_set()

    def cancel(self, reason: str, only_queued: bool = False) -> bool:
        """Stop the job (the worker looks between tokens); with `only_queued`, only if the worker has not
        started it. Returns whether it is cancelled."""
        with self.lock:
            if only_queued and self.started.is_set():
                return False
            if not self.cancelled.is_set():
                self.reason = reason
                self.cancelled.set()
            return True


class Worker(threading.Thread):
    """Owns the model; runs one job at a time."""

    def __init__(self, llm, size: int):
        super().__init__(daemon=True, name="taille-serve-worker")
        self.llm = llm
        self.jobs: queue.Queue[Job | None] = queue.Queue(maxsize=size)

    def run(self):
        while (job := self.jobs.get()) is not None:
            if not job.claim():
                log.info("dropped a queued request: %s", job.reason)
                continue
            try:
                self.answer(job)
            except Exception as e:  # a failure in one request must not stop the server
                log.exception("request failed")
                job.events.put(("error", ApiError(500, f"generation failed: {e}", "server_error")))

    def answer(self, job: Job) -> None:
        try:
            _, ids, dropped = fit_messages(self.llm, job.messages, job.max_tokens)
        except ContextFull as e:
            job.events.put(("error", ApiError(400, str(e), param="messages", code="context_length_exceeded")))
            return
        if dropped:  # the API does not trim a client's conversation behind its back
            job.events.put(("error", ApiError(
                400, f"the messages need more than the {self.llm.n_ctx()}-token context minus max_tokens "
                f"{job.max_tokens}; shorten the conversation", param="messages", code="context_length_exceeded")))
            return
        reply = Reply()
        pieces = stream_reply(self.llm, ids, reply, job.max_tokens, job.temperature, job.top_p, job.stop,
                              job.persona.never if job.persona else (), job.seed, job.repeat_penalty,
                              job.frequency_penalty, job.presence_penalty)
        for piece in pieces:
            if job.cancelled.is_set():
                pieces.close()  # stops llama.cpp sampling and counts the reply so far
                log.info("stopped a reply after %d of at most %d tokens: %s", reply.tokens, job.max_tokens,
                         job.reason)
                return
            job.events.put(("piece", piece))
        job.events.put(("done", reply, len(ids)))


def _content(message: dict, i: int) -> str:
    content = message.get("content")
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
        parts = [p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text"]
        if len(parts) != len(content):
            raise ApiError(400, f"messages[{i}].content: only text parts are supported", param=f"messages[{i}]")
        return "".join(parts)
    if not isinstance(content, str):
        raise ApiError(400, f"messages[{i}].content must be a string", param=f"messages[{i}].content")
    return content


def _number(body: dict, key: str, default, low: float, high: float, kind=float):
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ApiError(400, f"'{key}' must be a number in [{low}, {high}]", param=key)
    return kind(value)


def parse_request(body: dict, models: dict[str, Persona | None], settings: ServeSettings) -> tuple[Job, bool]:
    """Check a chat-completion request and turn it into a job; (job, stream)."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "'model' is required: a persona id from GET /v1/models", param="model")
    if model not in models:
        raise ApiError(404, f"unknown model '{model}'; available: {', '.join(models)}", param="model",
                       code="model_not_found")
    persona = models[model]
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise ApiError(400, "'messages' must be a non-empty list", param="messages")
    messages = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise ApiError(400, f"messages[{i}] needs a role among {', '.join(ROLES)}", param=f"messages[{i}].role")
        messages.append({"role": ROLES[m["role"]], "content": _content(m, i)})
    if persona is not None:
        messages.insert(0, {"role": "system", "content": persona.system_prompt()})
    system = [m for m in messages if m["role"] == "system"]
    if len(system) > 1:  # chat templates take one system message, first
        messages = [{"role": "system", "content": "\n\n".join(m["content"] for m in system)}] + [
            m for m in messages if m["role"] != "system"]
    if messages[-1]["role"] == "assistant":
        raise ApiError(400, "the last message must not be the assistant's", param="messages")
    if _number(body, "n", 1, 1, 1, int) != 1:
        raise ApiError(400, "'n' must be 1", param="n")
    default_tokens = persona.max_tokens if persona else settings.max_tokens
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int)
                                   or not 1 <= max_tokens <= settings.max_tokens):
        raise ApiError(400, f"'max_tokens' must be an integer from 1 to {settings.max_tokens}", param="max_tokens")
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise ApiError(400, "'stop' must be a string or a list of up to 4 strings", param="stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "'stream' must be true or false", param="stream")
    job = Job(
        persona=persona, messages=messages, max_tokens=min(max_tokens or default_tokens, settings.max_tokens),
        temperature=_number(body, "temperature", persona.temperature if persona else 0.7, 0, 2),
        top_p=_number(body, "top_p", persona.top_p if persona else 1.0, 0, 1),
        stop=stop, seed=_number(body, "seed", None, -(2**63), 2**63 - 1, int),
        repeat_penalty=persona.repeat_penalty if persona else 1.0,
        frequency_penalty=_number(body, "frequency_penalty", 0.0, -2, 2),
        presence_penalty=_number(body, "presence_penalty", 0.0, -2, 2),
    )
    if job.top_p == 0:
        job.top_p = 1e-6  # OpenAI accepts 0 (greedy in effect); llama.cpp needs a positive top_p
    return job, stream


def make_handler(models: dict[str, Persona | None], worker: Worker, settings: ServeSettings):
    created = int(time.time())

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "taille"

        def log_message(self, format, *args):  # through logging, not stderr
            log.info("%s %s", self.address_string(), format % args)

        def send_json(self, status: int, payload: dict) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def fail(self, error: ApiError) -> None:
            self.send_json(error.status, error.body())

        def authorized(self) -> bool:
            if settings.api_key is None:
                return True
            # constant time, so response timing does not leak how much of a guessed key is right; bytes,
            # because compare_digest refuses non-ASCII str (http.server decodes headers as latin-1)
            sent = self.headers.get("Authorization", "").encode("latin-1", "replace")
            if hmac.compare_digest(sent, f"Bearer {settings.api_key}".encode()):
                return True
            self.fail(ApiError(401, "missing or wrong API key (Authorization: Bearer ...)", "authentication_error",
                               code="invalid_api_key"))
            return False

        def do_GET(self):
            if not self.authorized():
                return
            if self.path.rstrip("/") == "/v1/models":
                data = [{"id": name, "object": "model", "created": created, "owned_by": "taille"} for name in models]
                self.send_json(200, {"object": "list", "data": data})
            elif self.path.rstrip("/") == "/health":
                self.send_json(200, {"status": "ok", "queued": worker.jobs.qsize()})
            else:
                self.fail(ApiError(404, f"no route {self.path}", code="not_found"))

        def do_POST(self):
            length = self.headers.get("Content-Length")
            if length is None or not length.isdigit():
                self.close_connection = True
                return self.fail(ApiError(411, "a Content-Length header is required"))
            if int(length) > settings.max_body:
                self.close_connection = True  # the body is not read
                return self.fail(ApiError(413, f"request body over {settings.max_body} bytes", code="request_too_large"))
            raw = self.rfile.read(int(length))
            if not self.authorized():
                return
            if self.path.rstrip("/") != "/v1/chat/completions":
                return self.fail(ApiError(404, f"no route {self.path}", code="not_found"))
            try:
                body = json.loads(raw)
                if not isinstance(body, dict):
                    raise ApiError(400, "the request body must be a JSON object")
                job, stream = parse_request(body, models, settings)
            except json.JSONDecodeError as e:
                return self.fail(ApiError(400, f"malformed JSON: {e}"))
            except ApiError as e:
                return self.fail(e)
            job.deadline = time.monotonic() + settings.timeout
            try:
                worker.jobs.put_nowait(job)
            except queue.Full:
                return self.fail(ApiError(429, f"server busy: {settings.queue_size} requests already queued; retry",
                                          "server_busy", code="queue_full"))
            self.respond(job, body["model"], stream)

        def client_gone(self) -> bool:
            """Whether the client has closed the connection: its socket reads as EOF. Peeked without
            blocking, so bytes it did send stay unread. (A client that only shuts down its sending side
            after the request reads as gone too; HTTP clients wait for the reply with the socket open.)"""
            sock = self.connection
            timeout = sock.gettimeout()
            sock.settimeout(0)  # non-blocking for one peek (select() breaks on descriptors over 1023)
            try:
                return sock.recv(1, socket.MSG_PEEK) == b""
            except BlockingIOError:  # nothing to read: still there
                return False
            except OSError:  # reset by the peer
                return True
            finally:
                sock.settimeout(timeout)

        def next_event(self, job: Job):
            """The worker's next event for `job`. Meanwhile, every POLL_S: a client that hung up cancels
            the job (None: nobody to answer), and a job still queued past its deadline gets 503."""
            while True:
                if self.client_gone():
                    job.cancel(f"client {self.address_string()} went away")
                    self.close_connection = True
                    return None
                try:
                    return job.events.get(timeout=POLL_S)
                except queue.Empty:
                    if self.expired(job):
                        return ("error", ApiError(503, f"server busy: the request {job.reason}; retry",
                                                  "server_busy", code="timeout"))

        def expired(self, job: Job) -> bool:
            """Whether `job` is still queued past its deadline; it is then cancelled (the worker skips it).
            A started job never expires: the timeout bounds the wait, not the reply."""
            if job.started.is_set() or time.monotonic() <= job.deadline:
                return False
            return job.cancel(f"waited over {settings.timeout:g} s in the queue", only_queued=True)

        def respond(self, job: Job, model: str, stream: bool) -> None:
            rid, now = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
            event = self.next_event(job)
            if event is None:
                return
            if event[0] == "error":
                return self.fail(event[1])
            if not stream:
                while event[0] == "piece":  # the reply collects the text; pieces only mark progress
                    event = self.next_event(job)
                    if event is None:
                        return
                if event[0] == "error":
                    return self.fail(event[1])
                _, reply, prompt_tokens = event
                return self.send_json(200, {
                    "id": rid, "object": "chat.completion", "created": now, "model": model,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": reply.text},
                                 "finish_reason": reply.finish_reason}],
                    "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": reply.tokens,
                              "total_tokens": prompt_tokens + reply.tokens},
                })
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()

            def chunk(delta: dict, finish: str | None = None) -> dict:
                return {"id": rid, "object": "chat.completion.chunk", "created": now, "model": model,
                        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

            try:
                self.send_event(chunk({"role": "assistant", "content": ""}))
                while event[0] == "piece":
                    self.send_event(chunk({"content": event[1]}))
                    event = self.next_event(job)
                    if event is None:
                        return
                if event[0] == "done":
                    self.send_event(chunk({}, event[1].finish_reason))
                else:  # headers are gone: report the error inside the stream, as OpenAI does
                    self.send_event(event[1].body())
                self.send_data(b"data: [DONE]\n\n")
                self.send_data(b"")
            except (BrokenPipeError, ConnectionResetError):
                job.cancel(f"client {self.address_string()} went away")
                self.close_connection = True

        def send_event(self, payload: dict) -> None:
            self.send_data(f"data: {json.dumps(payload)}\n\n".encode())

        def send_data(self, data: bytes) -> None:
            """One HTTP/1.1 chunk (an empty one ends the body)."""
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            self.wfile.flush()

    return Handler


def build_server(llm, personas: dict[str, Persona], settings: ServeSettings, base_name: str):
    """The HTTP server and its worker, not yet serving (tests start it on port 0 in a thread)."""
    models: dict[str, Persona | None] = dict(personas)
    models.setdefault(base_name, None)
    worker = Worker(llm, settings.queue_size)
    worker.start()
    server = ThreadingHTTPServer((settings.host, settings.port), make_handler(models, worker, settings))
    server.daemon_threads = True
    server.worker = worker
    return server


def serve(model: str, personas: dict[str, Persona], settings: ServeSettings, quant: str = "f16") -> None:
    """Load the model and serve until Ctrl-C."""
    from taille.chat.engine import gguf_for
    from taille.models.llamacpp import open_gguf

    path = gguf_for(model, quant)
    llm = open_gguf(path, n_ctx=settings.n_ctx, threads=settings.threads)
    server = build_server(llm, personas, settings, Path(path).stem.lower())
    host, port = server.server_address[:2]
    log.info("serving %s as %s on http://%s:%d/v1", path, ", ".join(personas), host, port)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.worker.jobs.put(None)
        server.server_close()
