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

Structured replies: a request's `response_format` (json_object or json_schema), or else the persona's
`actions` schema, constrains the reply to JSON with a llama.cpp grammar; the persona's `never` phrases are
then cut from its `say` string alone, once the reply is whole, so a constrained reply always parses.
Conversations: with llama-server, every request names the slot it runs in (Slots); a request's `user`
brings a player's conversation back to the slot whose cache holds it, so a follow-up does not read the
history again. Personas given as a folder are read again when a card there changes (Catalog); a folder
that no longer loads leaves the previous set serving.
"""

from __future__ import annotations

import hmac
import http.client
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

from taille.chat.engine import ContextFull, JsonGuard, PhraseGuard, Reply, fit_messages, json_grammar, stream_reply
from taille.chat.persona import Persona, load_personas
from taille.errors import TailleError

log = logging.getLogger(__name__)

ENGINES = ("llama-server", "llama-cpp-python")
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
POLL_S = 0.25
"""How often a request thread waiting on the worker looks at its socket and the queue deadline (it also
looks at each piece of a reply); each look wakes a thread, so not much more often."""
RELOAD_S = 1.0
"""How often, at most, a request looks for changed persona cards (a stat of each card in the folder)."""


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
    engine: str = "llama-server"
    """llama-server (llama.cpp's own server: parallel slots, continuous batching, a prompt cache that
    evaluates each persona's system prompt once, JSON-schema output) or llama-cpp-python (one request at
    a time, in this process)."""
    parallel: int | None = None
    """llama-server: requests generated at once (slots, each holding the whole --ctx; default 4)."""

    def __post_init__(self):
        if self.max_tokens < 1 or self.n_ctx < 16 or self.queue_size < 1 or self.max_body < 1024:
            raise TailleError("--max-tokens >= 1, --ctx >= 16, --queue >= 1 and --max-body >= 1024 are required")
        if self.max_tokens >= self.n_ctx:
            raise TailleError(f"--max-tokens {self.max_tokens} leaves no room for a prompt in --ctx {self.n_ctx}")
        if self.engine not in ENGINES:
            raise TailleError(f"--engine {self.engine}: use one of {', '.join(ENGINES)}")
        if self.engine != "llama-server" and self.parallel not in (None, 1):
            raise TailleError(f"--parallel {self.parallel}: the llama-cpp-python engine answers one request at a "
                              "time; use --engine llama-server")
        self.parallel = self.parallel or (4 if self.engine == "llama-server" else 1)
        if self.parallel < 1:
            raise TailleError(f"--parallel {self.parallel}: must be at least 1")
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
    response_format: dict | None = None
    """OpenAI's response_format (json_schema / json_object; the persona's actions when the request names
    none): the reply is JSON, decoded under a grammar."""
    user: str | None = None
    """The conversation (OpenAI's end-user id): kept in one llama-server slot when possible."""
    slot: int | None = None
    """The llama-server slot the job ran in, for the access log."""
    include_usage: bool = False
    """stream_options.include_usage: a last streamed chunk carries the token counts, as OpenAI sends it."""
    queued_at: float = field(default_factory=time.monotonic)
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


def stop_workers(jobs: queue.Queue, workers: int) -> None:
    """Cancel what waits in the (bounded) queue, then tell each worker to stop: a full queue must not hold
    up Ctrl-C."""
    while True:
        try:
            job = jobs.get_nowait()
        except queue.Empty:
            break
        if job is not None:
            job.cancel("the server is stopping")
            job.events.put(("error", ApiError(503, "the server is stopping", "server_busy")))
    for _ in range(workers):
        jobs.put(None)


def work(jobs: queue.Queue, stats: "Stats", answer, lost=None) -> None:
    """A worker thread's loop: take jobs until None, skip those cancelled while queued, answer the rest. A
    failure in one request must not stop the server: 500, or 502 when the connection to the engine broke
    (`lost` is then called, to start it again)."""
    while (job := jobs.get()) is not None:
        if not job.claim():
            log.info("dropped a queued request: %s", job.reason)
            continue
        stats.busy(+1)
        try:
            answer(job)
        except Exception as e:
            if lost is not None and isinstance(e, (OSError, http.client.HTTPException)):
                job.events.put(("error", ApiError(502, f"the engine stopped during the request ({e}); retry",
                                                  "server_error", code="engine_failed")))
                lost()
            else:
                log.exception("request failed")
                job.events.put(("error", ApiError(500, f"generation failed: {e}", "server_error")))
        finally:
            stats.busy(-1)


class Worker(threading.Thread):
    """Owns the model; runs one job at a time."""

    def __init__(self, llm, size: int):
        super().__init__(daemon=True, name="taille-serve-worker")
        self.llm = llm
        self.jobs: queue.Queue[Job | None] = queue.Queue(maxsize=size)
        self.stats = Stats(slots=1)

    def engine_metrics(self) -> str:
        return ""

    def run(self):
        work(self.jobs, self.stats, self.answer)

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
        try:
            grammar = grammar_for(job.response_format)
        except Exception as e:  # llama-cpp-python's converter raises what it meets; the schema is the caller's
            job.events.put(("error", ApiError(400, f"'response_format': llama.cpp cannot build a grammar from the "
                                                   f"schema: {e}", param="response_format")))
            return
        reply = Reply()
        pieces = stream_reply(self.llm, ids, reply, job.max_tokens, job.temperature, job.top_p, job.stop,
                              job.persona.never if job.persona else (), job.seed, job.repeat_penalty,
                              job.frequency_penalty, job.presence_penalty, grammar=grammar)
        for piece in pieces:
            if job.cancelled.is_set():
                pieces.close()  # stops llama.cpp sampling and counts the reply so far
                log.info("stopped a reply after %d of at most %d tokens: %s", reply.tokens, job.max_tokens,
                         job.reason)
                return
            job.events.put(("piece", piece))
        job.events.put(("done", reply, len(ids)))


def grammar_for(response_format: dict | None):
    """The llama.cpp grammar for an OpenAI response_format (None: no constraint)."""
    if response_format is None:
        return None
    if response_format["type"] == "json_object":
        return json_grammar(None)
    return json_grammar(json.dumps(response_format["json_schema"]["schema"]))


class Stats:
    """What /metrics reports: counters since start, the slots in use, and request latencies."""

    BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, math.inf)

    def __init__(self, slots: int):
        self.lock = threading.Lock()
        self.slots, self.in_use = slots, 0
        self.requests: dict[int, int] = {}
        self.completion_tokens = self.prompt_tokens = self.cached_prompt_tokens = 0
        self.latency = [0] * len(self.BUCKETS)
        self.latency_sum = 0.0
        self.first_token = [0] * len(self.BUCKETS)
        self.first_token_sum = 0.0

    def busy(self, change: int) -> None:
        with self.lock:
            self.in_use += change

    def cached(self, tokens: int) -> None:
        with self.lock:
            self.cached_prompt_tokens += tokens

    def finished(self, status: int, seconds: float, first_token: float | None, prompt: int, completion: int) -> None:
        with self.lock:
            self.requests[status] = self.requests.get(status, 0) + 1
            self.prompt_tokens += prompt
            self.completion_tokens += completion
            self.latency_sum += seconds
            self.latency[next(i for i, b in enumerate(self.BUCKETS) if seconds <= b)] += 1
            if first_token is not None:
                self.first_token_sum += first_token
                self.first_token[next(i for i, b in enumerate(self.BUCKETS) if first_token <= b)] += 1

    def prometheus(self, queued: int) -> str:
        with self.lock:
            lines = ["# TYPE taille_requests_total counter"]
            lines += [f'taille_requests_total{{status="{code}"}} {n}' for code, n in sorted(self.requests.items())]
            lines += ["# TYPE taille_prompt_tokens_total counter", f"taille_prompt_tokens_total {self.prompt_tokens}",
                      "# TYPE taille_prompt_tokens_cached_total counter",
                      f"taille_prompt_tokens_cached_total {self.cached_prompt_tokens}",
                      "# TYPE taille_completion_tokens_total counter",
                      f"taille_completion_tokens_total {self.completion_tokens}",
                      "# TYPE taille_queue_depth gauge", f"taille_queue_depth {queued}",
                      "# TYPE taille_slots gauge", f"taille_slots {self.slots}",
                      "# TYPE taille_slots_in_use gauge", f"taille_slots_in_use {self.in_use}"]
            for name, counts, total in (("taille_request_seconds", self.latency, self.latency_sum),
                                        ("taille_first_token_seconds", self.first_token, self.first_token_sum)):
                lines.append(f"# TYPE {name} histogram")
                running = 0
                for bucket, n in zip(self.BUCKETS, counts):
                    running += n
                    lines.append(f'{name}_bucket{{le="{"+Inf" if bucket == math.inf else bucket}"}} {running}')
                lines += [f"{name}_sum {total:.6f}", f"{name}_count {running}"]
        return "\n".join(lines) + "\n"


class EngineWorker(threading.Thread):
    """One of `--parallel` threads feeding llama-server: each takes a job from the shared queue and
    streams it through the engine, which batches the threads' requests across its slots. The persona's
    system prompt comes first in every request, so the engine's prompt cache reuses its KV cache."""

    def __init__(self, pool: "EnginePool", index: int):
        super().__init__(daemon=True, name=f"taille-serve-engine-{index}")
        self.pool, self.stats = pool, pool.stats

    def run(self):
        work(self.pool.jobs, self.stats, self.answer, lost=self.pool.recover)

    def request_body(self, job: Job) -> dict:
        body = {"messages": job.messages, "max_tokens": job.max_tokens, "temperature": job.temperature,
                "top_p": job.top_p, "stop": job.stop, "repeat_penalty": job.repeat_penalty,
                "frequency_penalty": job.frequency_penalty, "presence_penalty": job.presence_penalty,
                "stream": True, "cache_prompt": True, "id_slot": job.slot}
        if self.pool.ban:
            body["logit_bias"] = self.pool.ban
        if job.seed is not None:
            body["seed"] = job.seed
        if job.response_format is not None:
            body["response_format"] = job.response_format
        return body

    def answer(self, job: Job) -> None:
        if not self.pool.engine.alive():  # it died while idle: bring it back before this request
            self.pool.recover()
        job.slot, held = self.pool.slots.acquire(job.user, job.persona.id if job.persona else None)
        if job.user is not None:
            log.debug("user %s -> slot %d (%s)", job.user, job.slot, "its conversation" if held else "new there")
        try:
            self.stream(job)
        finally:
            self.pool.slots.release(job.slot)

    def stream(self, job: Job) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", self.pool.engine.port, timeout=600)
        try:
            connection.request("POST", "/v1/chat/completions", json.dumps(self.request_body(job)),
                               {"Content-Type": "application/json"})
            response = connection.getresponse()
            if response.status != 200:
                message = _engine_error(response.read())
                code = "context_length_exceeded" if "context" in message.lower() else None
                status = 400 if response.status == 400 else 502
                job.events.put(("error", ApiError(status, message, param="messages" if code else None, code=code)))
                return
            never = job.persona.never if job.persona else ()
            guard = JsonGuard(never) if job.response_format is not None else PhraseGuard(never)
            reply, prompt_tokens = Reply(), 0
            ended = False  # the engine said the reply is over; a stream that just stops means it died
            for line in response:
                if job.cancelled.is_set():  # closing the connection makes the engine stop sampling
                    log.info("stopped a reply after %d of at most %d tokens: %s", reply.tokens, job.max_tokens,
                             job.reason)
                    return
                if line.strip() == b"data: [DONE]":
                    ended = True
                if not line.startswith(b"data: ") or ended:
                    continue
                chunk = json.loads(line[6:])
                timings = chunk.get("timings")
                if timings:
                    prompt_tokens = timings.get("prompt_n", 0) + timings.get("cache_n", 0)
                    reply.cached_tokens = timings.get("cache_n", 0)
                    reply.tokens = timings.get("predicted_n", reply.tokens)
                if not chunk.get("choices"):
                    continue
                choice = chunk["choices"][0]
                safe, blocked = guard.feed(choice.get("delta", {}).get("content") or "")
                if safe:
                    reply.text += safe
                    job.events.put(("piece", safe))
                if blocked:
                    reply.finish_reason = "content_filter"
                    break
                if choice.get("finish_reason"):
                    reply.finish_reason = choice["finish_reason"]
            else:
                if not ended:
                    raise ConnectionError("the stream stopped before the reply ended")
            rest, cut = guard.finish()  # after a phrase cut the stream, nothing is left
            if cut:
                reply.finish_reason = "content_filter"
            if rest:
                reply.text += rest
                job.events.put(("piece", rest))
            self.stats.cached(reply.cached_tokens)
            job.events.put(("done", reply, prompt_tokens))
        finally:
            connection.close()


class Slots:
    """Which llama-server slot each request runs in (its `id_slot`).

    Every request names its slot. llama-server defers a request whose slot is busy, and first saves and
    reloads that slot's cache while another reply is being generated in it (get_available_slot in its
    server-context.cpp); the pool has one feeding thread per slot, so a thread taking a job always finds a
    free slot, and no two requests ever share one. A conversation (the request's `user`) goes back to the
    slot that holds it when that slot is free, so its history is in the cache. Otherwise the job takes the
    free slot that holds no other player's conversation, then the same persona's prompt, then the least
    recently used one: llama-server keeps what it evicts in its prompt cache in RAM (--cache-ram)."""

    def __init__(self, n: int):
        self.lock = threading.Lock()
        self.busy = [False] * n
        self.last_used = [0.0] * n
        self.persona: list[str | None] = [None] * n
        """The persona id of each slot's last request."""
        self.holder: list[str | None] = [None] * n
        """The user whose conversation each slot holds (None: a request without a user)."""

    def acquire(self, user: str | None, persona: str | None) -> tuple[int, bool]:
        """A free slot for a request; (slot, whether it holds this user's conversation)."""
        with self.lock:
            free = [s for s, busy in enumerate(self.busy) if not busy]
            held = next((s for s in free if user is not None and self.holder[s] == user), None)
            slot = held if held is not None else min(free, key=lambda s: (
                self.holder[s] is not None, self.persona[s] != persona, self.last_used[s]))
            if user is not None:  # the conversation moves with its newest turn
                self.holder = [None if h == user else h for h in self.holder]
            self.busy[slot], self.persona[slot], self.holder[slot] = True, persona, user
            return slot, held is not None

    def release(self, slot: int) -> None:
        with self.lock:
            self.busy[slot], self.last_used[slot] = False, time.monotonic()

    def forget(self) -> None:
        """The engine started again with empty slots."""
        with self.lock:
            self.persona, self.holder = [None] * len(self.busy), [None] * len(self.busy)


class EnginePool:
    """llama-server and the threads that feed it, one per slot, sharing one bounded queue.

    Every request bans the vocabulary's control tokens that do not end generation (`logit_bias` false), as
    `taille chat` does (taille.chat.engine.banned): a small student that opens the next turn instead of
    closing its own (`<|im_start|>user ...`) would otherwise hand the player the roles' text, since
    llama-server stops at end-of-generation tokens only and a control token renders as no text, so no stop
    string sees it."""

    def __init__(self, engine, size: int, parallel: int):
        from taille.serve.engine import control_tokens

        self.engine = engine
        try:
            self.ban = [[t, False] for t in control_tokens(engine.gguf)]
        except Exception as e:  # e.g. an architecture this llama-cpp-python cannot load but $TAILLE_LLAMA_SERVER can
            log.warning("could not read %s's control tokens (%s): a reply ends at end-of-generation tokens only",
                        getattr(engine, "gguf", "the model"), e)
            self.ban = []
        self.jobs: queue.Queue[Job | None] = queue.Queue(maxsize=size)
        self.stats = Stats(slots=parallel)
        self.slots = Slots(parallel)
        self.restart = threading.Lock()
        self.threads = [EngineWorker(self, i) for i in range(parallel)]
        for thread in self.threads:
            thread.start()

    def recover(self) -> None:
        """Start the engine again if it died (the requests it was serving got 502); once, whichever thread
        notices first."""
        with self.restart:
            if self.engine.alive():
                return
            log.error("llama-server stopped (status %s; log %s): starting it again", self.engine.proc.returncode,
                      self.engine.log_path)
            self.slots.forget()
            try:
                self.engine.start()
            except (TailleError, OSError, http.client.HTTPException) as e:  # the workers must live on
                log.error("llama-server could not be started again: %s", e)

    def engine_metrics(self) -> str:
        """llama-server's own Prometheus counters (prompt tokens, decode speed, slots)."""
        try:
            return self.engine.get("/metrics")
        except (OSError, http.client.HTTPException):
            return ""

    def close(self) -> None:
        self.engine.stop()  # requests in flight fail at once
        stop_workers(self.jobs, len(self.threads))


def _engine_error(raw: bytes) -> str:
    try:
        error = json.loads(raw).get("error", {})
        return error.get("message", "") if isinstance(error, dict) else str(error)
    except (ValueError, AttributeError):
        return raw.decode(errors="replace")[:300]


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
    job.response_format = _response_format(body)
    if body.get("response_format") is None and persona is not None and persona.actions:
        job.response_format = {"type": "json_schema", "json_schema": {"name": persona.id,
                                                                        "schema": persona.action_schema}}
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise ApiError(400, "'user' must be a string", param="user")
    job.user = user
    options = body.get("stream_options") or {}
    if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
        raise ApiError(400, "'stream_options' must be {include_usage: true | false}", param="stream_options")
    job.include_usage = stream and options.get("include_usage", False)
    return job, stream


def _response_format(body: dict) -> dict | None:
    """OpenAI's response_format: text (nothing to do: no persona's actions either), json_object, or
    json_schema {schema: {...}}."""
    fmt = body.get("response_format")
    if fmt is None or (isinstance(fmt, dict) and fmt.get("type") == "text"):
        return None
    if not isinstance(fmt, dict) or fmt.get("type") not in ("json_object", "json_schema"):
        raise ApiError(400, "'response_format' must be {type: text | json_object | json_schema}", param="response_format")
    if fmt["type"] == "json_schema" and not isinstance((fmt.get("json_schema") or {}).get("schema"), dict):
        raise ApiError(400, "'response_format': json_schema needs {json_schema: {schema: {...}}}", param="response_format")
    return fmt


class Catalog:
    """The model ids requests may name: the personas and the bare model (no persona). Personas given as a
    folder are read again when a card there is added, removed or changed (looked at by a request, at most
    every RELOAD_S); a folder that then fails to load leaves the previous set serving, with a warning."""

    def __init__(self, personas: dict[str, Persona] | str | Path, base_name: str):
        self.base_name, self.lock = base_name, threading.Lock()
        self.folder = None if isinstance(personas, dict) else Path(personas)
        if self.folder is not None:
            self.stamp = _stamp(self.folder)  # before reading: a card changed meanwhile is read again
            personas = load_personas(self.folder)
        self.current = self._with_base(personas)
        self.checked = time.monotonic()

    def _with_base(self, personas: dict[str, Persona]) -> dict[str, Persona | None]:
        models: dict[str, Persona | None] = dict(personas)
        models.setdefault(self.base_name, None)
        return models

    def models(self) -> dict[str, Persona | None]:
        """The current set (a dict that is replaced, never changed, so a request may keep using it)."""
        if self.folder is not None and time.monotonic() - self.checked >= RELOAD_S:
            with self.lock:
                if time.monotonic() - self.checked >= RELOAD_S:
                    self.reload()
                    self.checked = time.monotonic()
        return self.current

    def reload(self) -> None:
        stamp = _stamp(self.folder)
        if stamp == self.stamp:
            return
        self.stamp = stamp  # a broken set is reported once, and read again when it changes again
        try:
            personas = load_personas(self.folder)
        except Exception as e:  # a half-written card, a deleted folder...: serving goes on
            log.warning("the personas in %s changed and do not load (%s); still serving %s", self.folder,
                        " ".join(str(e).split()), ", ".join(p for p in self.current if p != self.base_name))
            return
        self.current = self._with_base(personas)
        log.info("personas reloaded from %s: %s", self.folder, ", ".join(personas))


def _stamp(folder: Path) -> tuple | None:
    """What changes when a card in `folder` is added, removed or written (None: the folder is gone)."""
    try:
        return tuple(sorted((p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in folder.iterdir()
                            if p.suffix in (".yaml", ".yml")))
    except OSError:
        return None


def make_handler(catalog: Catalog, worker: Worker, settings: ServeSettings):
    created = int(time.time())

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "taille"

        def log_message(self, format, *args):  # http.server's own line: debug; the access log is `finish_request`
            log.debug("%s %s", self.address_string(), format % args)

        def send_response(self, code, message=None):
            self.status = code
            super().send_response(code, message)

        def access_log(self, started: float) -> None:
            """One access-log line per request, and its numbers into /metrics."""
            seconds, first, job = time.monotonic() - started, self.first_piece, self.job
            prompt, completion = self.usage
            worker.stats.finished(self.status, seconds, None if first is None else first - started, prompt, completion)
            log.info('%s "POST %s" %d model=%s %.3fs first_token=%s prompt=%d completion=%d user=%s slot=%s',
                     self.address_string(), self.path, self.status, job.persona.id if job and job.persona else "-",
                     seconds, "-" if first is None else f"{first - started:.3f}s", prompt, completion,
                     (job.user if job else None) or "-", "-" if job is None or job.slot is None else job.slot)

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
                data = [{"id": name, "object": "model", "created": created, "owned_by": "taille"}
                        for name in catalog.models()]
                self.send_json(200, {"object": "list", "data": data})
            elif self.path.rstrip("/") == "/health":
                self.send_json(200, {"status": "ok", "queued": worker.jobs.qsize()})
            elif self.path.rstrip("/") == "/metrics":
                text = worker.stats.prometheus(worker.jobs.qsize()) + worker.engine_metrics()
                data = text.encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            else:
                self.fail(ApiError(404, f"no route {self.path}", code="not_found"))

        def do_POST(self):
            self.job, self.first_piece, self.usage, self.status, started = None, None, (0, 0), 0, time.monotonic()
            try:
                self.post()
            finally:
                self.access_log(started)

        def post(self):
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
                job, stream = parse_request(body, catalog.models(), settings)
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
            self.job = job
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
                    self.first_piece = self.first_piece or time.monotonic()
                    event = self.next_event(job)
                    if event is None:
                        return
                if event[0] == "error":
                    return self.fail(event[1])
                _, reply, prompt_tokens = event
                self.usage = (prompt_tokens, reply.tokens)
                return self.send_json(200, {
                    "id": rid, "object": "chat.completion", "created": now, "model": model,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": reply.text},
                                 "finish_reason": reply.finish_reason}],
                    "usage": usage(prompt_tokens, reply),
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
                    self.first_piece = self.first_piece or time.monotonic()
                    self.send_event(chunk({"content": event[1]}))
                    event = self.next_event(job)
                    if event is None:
                        return
                if event[0] == "done":
                    self.usage = (event[2], event[1].tokens)
                    self.send_event(chunk({}, event[1].finish_reason))
                    if job.include_usage:
                        self.send_event({**chunk({}), "choices": [], "usage": usage(event[2], event[1])})
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


def usage(prompt_tokens: int, reply: Reply) -> dict:
    """OpenAI's usage, with the prompt tokens the engine found in its cache."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": reply.tokens,
            "total_tokens": prompt_tokens + reply.tokens,
            "prompt_tokens_details": {"cached_tokens": reply.cached_tokens}}


class HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024
    """Connections the kernel holds before accept (socketserver's default, 5, makes the 6th simultaneous
    client wait for a SYN retry: a second or more)."""


def build_server(llm, personas: dict[str, Persona] | str | Path, settings: ServeSettings, base_name: str):
    """The HTTP server and its worker, not yet serving (tests start it on port 0 in a thread). `personas`:
    a fixed set, or a folder of cards, watched for changes."""
    catalog = Catalog(personas, base_name)
    worker = Worker(llm, settings.queue_size)
    worker.start()
    server = HTTPServer((settings.host, settings.port), make_handler(catalog, worker, settings))
    server.worker, server.catalog = worker, catalog
    return server


def build_engine_server(engine, personas: dict[str, Persona] | str | Path, settings: ServeSettings,
                        base_name: str):
    """The HTTP server in front of a started llama-server, with one feeding thread per slot. `personas`:
    a fixed set, or a folder of cards, watched for changes."""
    catalog = Catalog(personas, base_name)
    pool = EnginePool(engine, settings.queue_size, settings.parallel)
    server = HTTPServer((settings.host, settings.port), make_handler(catalog, pool, settings))
    server.worker, server.catalog = pool, catalog
    return server


def serve(model: str, personas: dict[str, Persona] | str | Path, settings: ServeSettings, quant: str = "f16") -> None:
    """Load the model and serve until Ctrl-C or SIGTERM (the engine stops with the server). `personas`: a
    folder of cards (read again when they change while serving) or a fixed set."""
    import signal

    from taille.chat.engine import gguf_for

    if not isinstance(personas, dict):
        load_personas(personas)  # a bad folder is one clear line before the model loads
    path = gguf_for(model, quant)
    if settings.engine == "llama-server":
        from taille.models.load import check_gguf
        from taille.serve.engine import LlamaServer

        check_gguf(Path(path))  # a broken file is one clear line, not an engine that exits while starting
        engine = LlamaServer(path, settings.parallel, settings.n_ctx, settings.threads).start()
        try:
            server = build_engine_server(engine, personas, settings, Path(path).stem.lower())
        except (OSError, TailleError):  # the port is taken, the cards changed meanwhile: no engine left behind
            engine.stop()
            raise
    else:
        from taille.models.llamacpp import open_gguf

        llm = open_gguf(path, n_ctx=settings.n_ctx, threads=settings.threads)
        server = build_server(llm, personas, settings, Path(path).stem.lower())

    def stop(signum, frame):  # SIGTERM ends the server the way Ctrl-C does: engine and all
        raise KeyboardInterrupt

    # SIGINT too: a shell starts a background job (`taille serve ... &` in a script) with SIGINT ignored, and
    # Python then installs no Ctrl-C handler, so `kill -INT` would leave the server and its engine running
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stop)
    host, port = server.server_address[:2]
    log.info("serving %s as %s on http://%s:%d/v1 (%s, %d at once)", path, ", ".join(server.catalog.models()),
             host, port, settings.engine, settings.parallel)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        if settings.engine == "llama-server":
            server.worker.close()
        else:
            stop_workers(server.worker.jobs, 1)
        server.server_close()
