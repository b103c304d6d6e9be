"""A real loopback server speaking Ollama's wire format, for tests and benchmarks.

Plain WSGI on gevent.pywsgi: a streamed body is a generator, so every NDJSON record or
SSE event leaves as its own HTTP chunk the moment it is produced.
"""

from __future__ import annotations

import argparse
import array
import base64
import hashlib
import itertools
import json
import socket
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http import HTTPStatus
from typing import Any

import gevent
from gevent.event import Event
from gevent.pool import Pool
from gevent.pywsgi import WSGIHandler, WSGIServer

DEFAULT_MODELS = ["llama3:latest", "qwen2:0.5b", "nomic-embed-text:latest"]
BUSY = "server busy, please try again.  maximum pending requests exceeded"
PULL_FAILURE = "pull model manifest: connection reset"
SIZE = 4_661_224_676
JSON_TYPE = "application/json; charset=utf-8"
GO_CHUNKING_BUFFER = 2048  # net/http's bufferBeforeChunkingSize
NDJSON = "application/x-ndjson"
TEXT = "text/plain; charset=utf-8"
STATUS_LINES = {s.value: f"{s.value} {s.phrase}" for s in HTTPStatus}
OPENAI_ERROR_TYPES = {400: "invalid_request_error", 404: "not_found_error"}

Body = dict[str, Any]
Reply = tuple[int, str, Iterable[bytes]]  # status, content type, body chunks
Choice = Callable[[str, str | None, bool], Body]  # text, finish_reason, streamed


@dataclass
class Received:
    """One request as the fake saw it; finished and disconnected are set as it ends."""

    method: str
    path: str
    headers: dict[str, str]  # Title-Case names: "Content-Type", "X-User"
    body: bytes
    json: Any | None
    started: float = field(default_factory=time.monotonic)
    finished: float | None = None
    disconnected: bool = False
    ended: Event = field(default_factory=Event)  # set with `finished`, for tests to wait on
    client: socket.socket | None = field(default=None, repr=False, compare=False)

    def client_left(self) -> bool:
        """Whether the client has hung up (Go's server notices it and cancels the request)."""
        raw = getattr(self.client, "_sock", self.client)  # gevent's recv would wait
        try:
            return raw is not None and not raw.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return False
        except OSError:
            return True


class ClientLeft(Exception):
    """The client hung up during a generation."""


class ApiError(Exception):
    """An error answered as JSON: Ollama's shape, or OpenAI's under /v1/."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class Job:
    """One generation or embedding: what to produce, and how long it took."""

    req: Received
    model: str  # as the client spelled it: Ollama echoes that back
    key: str  # the installed model's name in FakeOllama.models
    tokens: int
    prompt_tokens: int
    done_reason: str = "stop"
    t0: float = field(default_factory=time.perf_counter)
    t_load: float = 0.0
    t_end: float = 0.0

    def stats(self) -> dict[str, int]:
        """Ollama's timing fields, in nanoseconds and never zero."""
        load, evaluation = nanos(self.t_load - self.t0), nanos(self.t_end - self.t_load)
        return {
            "total_duration": load + evaluation + 1000,
            "load_duration": load,
            "prompt_eval_count": self.prompt_tokens,
            "prompt_eval_duration": 1000,
            "eval_count": self.tokens,
            "eval_duration": evaluation,
        }

    def usage(self) -> dict[str, int]:
        """OpenAI's token accounting."""
        prompt, completion = self.prompt_tokens, self.tokens
        total = prompt + completion
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": total}


def nanos(seconds: float) -> int:
    return max(1, int(seconds * 1e9))


def normalize(name: str) -> str:
    """Ollama's short form to the full one: 'Llama3' -> 'llama3:latest'."""
    name = name.strip().lower()
    return name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"


def rfc3339(delay: float = 0.0) -> str:
    return (datetime.now(UTC) + timedelta(seconds=delay)).isoformat().replace("+00:00", "Z")


ZERO_USAGE = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}


def compact(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def ndjson(obj: Any) -> bytes:
    return compact(obj) + b"\n"


def sse(obj: Any) -> bytes:
    return b"data: " + compact(obj) + b"\n\n"


def words(text: Any) -> int:
    return len(str(text).split()) if text else 0


def as_list(value: Any) -> list[Any]:
    if not value:
        return []
    return value if isinstance(value, list) else [value]


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def embedding(text: Any) -> list[float]:
    """Eight floats that depend only on the text."""
    return [round((b - 128) / 128, 6) for b in hashlib.sha256(str(text).encode()).digest()[:8]]


def b64(vector: list[float]) -> str:
    """OpenAI's encoding_format=base64: packed little-endian float32."""
    return base64.b64encode(array.array("f", vector).tobytes()).decode()


def model_entry(name: str) -> Body:
    """What /api/tags says about a model nobody described in more detail."""
    family = "nomic-bert" if "embed" in name else "llama"
    details = {"parent_model": "", "format": "gguf", "family": family, "families": [family]}
    details |= {"parameter_size": "8.0B", "quantization_level": "Q4_0"}
    entry = {"name": name, "model": name, "modified_at": rfc3339(), "size": SIZE}
    return {**entry, "digest": sha256(name), "details": details}


def openai_model(key: str) -> Body:
    return {"id": key, "object": "model", "created": int(time.time()), "owned_by": "library"}


def payload(req: Received) -> Body:
    """The request's JSON object, or the 400 that Ollama's Go decoder would give."""
    if not req.body.strip():
        raise ApiError(400, "missing request body")
    if not isinstance(req.json, dict):
        char = req.body.strip()[:1].decode(errors="replace")
        raise ApiError(400, f"invalid character '{char}' looking for beginning of value")
    return req.json


def model_name(body: Body) -> str:
    name = body.get("model") or body.get("name")
    if not name:
        raise ApiError(400, "model is required")
    return str(name)


def num_predict(body: Body) -> Any:
    return (body.get("options") or {}).get("num_predict")


def max_tokens(body: Body) -> Any:
    return body.get("max_completion_tokens", body.get("max_tokens"))


def request_headers(environ: dict[str, Any]) -> dict[str, str]:
    names = {"CONTENT_TYPE": "Content-Type", "CONTENT_LENGTH": "Content-Length"}
    headers = {names[k]: v for k, v in environ.items() if k in names and v}
    for key, value in environ.items():
        if key.startswith("HTTP_"):
            headers[key[5:].replace("_", "-").title()] = value
    return headers


def chat_choice(text: str, finish: str | None, streamed: bool) -> Body:
    message = {"role": "assistant", "content": text}
    return {"index": 0, "delta" if streamed else "message": message, "finish_reason": finish}


def text_choice(text: str, finish: str | None, streamed: bool) -> Body:
    return {"index": 0, "text": text, "finish_reason": finish}


def last_record(records: Iterable[Body]) -> Iterator[bytes]:
    """Run a status stream to its end, then answer only its last record."""
    last: Body = {}
    for last in records:  # noqa: B007 - only the final record is wanted
        pass
    yield compact(last)


class SocketHandler(WSGIHandler):
    """Puts the client's socket in the environ, so a generation can notice a hang-up."""

    def get_environ(self) -> dict[str, Any]:
        return {**super().get_environ(), "fake.socket": self.socket}


class NoDelayServer(WSGIServer):
    """pywsgi with TCP_NODELAY, like Go's net/http: each small record leaves at once."""

    handler_class = SocketHandler

    def handle(self, sock: socket.socket, address: tuple[str, int]) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().handle(sock, address)


class FakeOllama:
    """A fake Ollama server on a free loopback port.

    Every request is a greenlet of the one hub, and no method yields between reading and
    writing state, so the counters need no locks.
    """

    def __init__(
        self,
        models: list[str] | None = None,
        tokens: int = 8,
        token_delay: float = 0.0,
        first_token_delay: float = 0.0,
        pull_chunks: int = 4,
        name: str = "fake",
    ) -> None:
        names = [normalize(m) for m in (DEFAULT_MODELS if models is None else models)]
        self.name = name
        self.models: dict[str, dict] = {m: model_entry(m) for m in names}
        self.loaded: set[str] = set()
        self.tokens = tokens
        self.token_delay = token_delay
        self.first_token_delay = first_token_delay
        self.pull_chunks = pull_chunks
        self.gate: Event | None = None  # generations and embeddings wait on it before headers
        self.stall: Event | None = None  # generations wait on it after `stall_after` tokens
        self.stall_after = 1
        self.stream_usage = True  # False: ignore include_usage in streams, as llama.cpp does
        self.pull_gate: Event | None = None  # pulls wait on it after their first progress record
        self.busy = False  # answer generations and embeddings 503, as a saturated Ollama does
        self.fail_pulls = 0  # how many coming pulls break after one progress record
        self.blobs: set[str] = set()
        self.record = True  # False keeps `received` empty on long benchmark runs
        self.received: list[Received] = []
        self.active = self.max_active = 0  # generations and embeddings in flight, high-water mark
        self.on_request: Callable[[Received], None] | None = None  # called on arrival
        self.url = ""
        self._server: NoDelayServer | None = None
        self._ids = itertools.count(1)
        self._routes: dict[tuple[str, str], Callable[[Received], Reply]] = {
            ("GET", "/"): self._root,
            ("HEAD", "/"): self._root,
            ("GET", "/api/version"): self._version,
            ("GET", "/api/tags"): self._tags,
            ("GET", "/api/ps"): self._ps,
            ("POST", "/api/show"): self._show,
            ("POST", "/api/generate"): self._generate,
            ("POST", "/api/chat"): self._chat,
            ("POST", "/api/embed"): self._embed,
            ("POST", "/api/embeddings"): self._embeddings,
            ("POST", "/api/pull"): self._pull,
            ("POST", "/api/push"): self._push,
            ("POST", "/api/create"): self._create,
            ("POST", "/api/copy"): self._copy,
            ("DELETE", "/api/delete"): self._delete,
            ("GET", "/v1/models"): self._openai_models,
            ("POST", "/v1/chat/completions"): self._openai_chat,
            ("POST", "/v1/completions"): self._openai_completions,
            ("POST", "/v1/embeddings"): self._openai_embeddings,
        }

    # -- lifecycle -------------------------------------------------------------------------

    def start(self, port: int = 0) -> FakeOllama:
        """Bind 127.0.0.1 and serve from the gevent hub without blocking."""
        self._server = NoDelayServer(
            ("127.0.0.1", port), self, spawn=Pool(), backlog=4096, log=None
        )
        self._server.start()
        self.url = f"http://127.0.0.1:{self._server.server_port}"
        return self

    def serve_forever(self) -> None:
        assert self._server is not None, "start() first"
        self._server.serve_forever()

    def stop(self) -> None:
        """Close the listener and kill handlers still running (held gates, keep-alives)."""
        if self._server is not None:
            self._server.stop(timeout=0)
            self._server = None

    def __enter__(self) -> FakeOllama:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def reset(self) -> None:
        self.received.clear()
        self.max_active = self.active

    # -- WSGI plumbing -----------------------------------------------------------------------

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        req = self._receive(environ)
        try:
            status, content_type, body = self._dispatch(req)
        except ApiError as exc:
            status, content_type, body = self._error(req, exc)
        if isinstance(body, list):
            req.finished = time.monotonic()
            req.ended.set()
        start_response(STATUS_LINES[status], [("Content-Type", content_type)])
        return body

    def _receive(self, environ: dict[str, Any]) -> Received:
        started = time.monotonic()
        body = environ["wsgi.input"].read()  # also decodes chunked uploads
        try:
            parsed = json.loads(body) if body else None
        except (ValueError, RecursionError):  # Go's decoder has no depth limit to hit
            parsed = None
        method, path = environ["REQUEST_METHOD"], environ.get("PATH_INFO", "")
        req = Received(method, path, request_headers(environ), body, parsed, started)
        req.client = environ.get("fake.socket")
        if self.record:
            self.received.append(req)
        if self.on_request is not None:
            self.on_request(req)
        return req

    def _dispatch(self, req: Received) -> Reply:
        handler = self._routes.get((req.method, req.path))
        if handler is not None:
            return handler(req)
        if req.path.startswith("/api/blobs/") and req.method in ("HEAD", "POST"):
            return self._blob(req)
        if req.path.startswith("/v1/models/") and req.method == "GET":
            return self._openai_model(req)
        return 404, TEXT, [b"404 page not found"]

    def _error(self, req: Received, exc: ApiError) -> Reply:
        if not req.path.startswith("/v1/"):
            return exc.status, JSON_TYPE, [compact({"error": exc.message})]
        kind = OPENAI_ERROR_TYPES.get(exc.status, "api_error")
        error = {"message": exc.message, "type": kind, "param": None, "code": None}
        return exc.status, JSON_TYPE, [compact({"error": error})]

    def _find(self, name: str) -> str | None:
        """The installed model's key, matched as Ollama does (default tag, any case)."""
        wanted = normalize(name)
        if wanted in self.models:
            return wanted
        return next((key for key in self.models if normalize(key) == wanted), None)

    def _installed(self, name: str) -> str:
        key = self._find(name)
        if key is None:
            raise ApiError(404, f"model '{name}' not found")
        return key

    def _describe(self, key: str) -> Body:
        return {**model_entry(key), **self.models.get(key, {})}

    def _pause(self) -> None:
        if self.token_delay:
            gevent.sleep(self.token_delay)

    def _tracked(self, req: Received, body: Iterable[bytes], counted: bool) -> Iterator[bytes]:
        """Relay a lazy body, keeping active, finished and disconnected true."""
        if counted:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        complete = False
        try:
            yield from body
            complete = True
        except ClientLeft:
            pass  # nobody to answer
        finally:  # also on GeneratorExit: pywsgi closes us when the client goes away
            if counted:
                self.active -= 1
            req.finished = time.monotonic()
            req.disconnected = not complete
            req.ended.set()

    # -- generations and embeddings ----------------------------------------------------------

    def _job(self, req: Received, body: Body, prompt_tokens: int, limit: Any) -> Job:
        """Validate a generation in Ollama's order: model given, installed, then capacity."""
        name = str(body.get("model") or "")
        if not name:
            raise ApiError(400, "model is required")
        key = self._find(name)
        if key is None:
            raise ApiError(404, f'model "{name}" not found, try pulling it first')
        if self.busy:
            raise ApiError(503, BUSY)
        if limit is None or int(limit) < 0:
            return Job(req, name, key, self.tokens, max(1, prompt_tokens))
        return Job(req, name, key, int(limit), max(1, prompt_tokens), "length")

    def _produce(self, job: Job) -> Iterator[str]:
        """Wait at the gate, 'load' the model, then make the tokens one at a time."""
        if self.gate is not None:
            self.gate.wait()
        if self.first_token_delay:
            gevent.sleep(self.first_token_delay)
        self.loaded.add(job.key)
        job.t_load = time.perf_counter()
        for i in range(job.tokens):
            if i:
                self._pause()
                if self.token_delay and job.req.client_left():
                    raise ClientLeft()  # Ollama stops generating for a client that has gone
            if i == self.stall_after and self.stall is not None:
                self.stall.wait()
            yield f"tok{i} "
        job.t_end = time.perf_counter()

    def _single(self, job: Job, build: Callable[[str], Body]) -> Reply:
        """One JSON object built from the whole text, framed as Go's net/http frames it.

        Ollama writes a non-streamed answer once it is made: Go sends it with a
        Content-Length when it fits the 2 KB buffer before chunking, chunked when larger.
        """

        def body() -> Iterator[bytes]:
            yield compact(build("".join(self._produce(job))))

        whole = b"".join(self._tracked(job.req, body(), counted=True))
        return 200, JSON_TYPE, [whole] if len(whole) < GO_CHUNKING_BUFFER else iter([whole])

    def _stream(
        self, job: Job, kind: str, each: Callable[[str], bytes], tail: Callable[[], Iterable[bytes]]
    ) -> Reply:
        """One record per token as it is made, then the closing records."""

        def body() -> Iterator[bytes]:
            for token in self._produce(job):
                yield each(token)
            yield from tail()

        return 200, kind, self._tracked(job.req, body(), counted=True)

    def _generate(self, req: Received) -> Reply:
        body = payload(req)
        prompt = words(body.get("prompt")) + words(body.get("system"))
        job = self._job(req, body, prompt, num_predict(body))
        if not body.get("prompt"):
            return self._load(job, body, {"response": ""})
        return self._ollama(job, body, "response", {"context": [1, 2, 3]})

    def _chat(self, req: Received) -> Reply:
        body = payload(req)
        messages = [m for m in as_list(body.get("messages")) if isinstance(m, dict)]
        prompt = sum(words(m.get("content")) for m in messages)
        job = self._job(req, body, prompt, num_predict(body))
        if not messages:
            return self._load(job, body, {"message": {"role": "assistant", "content": ""}})
        return self._ollama(job, body, "message", {})

    def _ollama(self, job: Job, body: Body, field_name: str, extra: Body) -> Reply:
        """Answer /api/generate or /api/chat: NDJSON records, or one object."""

        def record(text: str, done: bool) -> Body:
            piece = {"role": "assistant", "content": text} if field_name == "message" else text
            return {"model": job.model, "created_at": rfc3339(), field_name: piece, "done": done}

        def final(text: str) -> Body:
            return {**record(text, True), "done_reason": job.done_reason, **extra, **job.stats()}

        def each(token: str) -> bytes:
            return ndjson(record(token, False))

        if body.get("stream") is False:
            return self._single(job, final)
        return self._stream(job, NDJSON, each, lambda: [ndjson(final(""))])

    def _load(self, job: Job, body: Body, piece: Body) -> Reply:
        """An empty prompt loads the model, or unloads it when keep_alive is 0."""
        unload = body.get("keep_alive") in (0, "0", "0s", "0m")
        job.tokens = 0

        def answer(_: str) -> Body:
            if unload:
                self.loaded.discard(job.key)
            done = {"done": True, "done_reason": "unload" if unload else "load"}
            return {"model": job.model, "created_at": rfc3339(), **piece, **done}

        return self._single(job, answer)

    def _openai_chat(self, req: Received) -> Reply:
        body = payload(req)
        messages = [m for m in as_list(body.get("messages")) if isinstance(m, dict)]
        prompt = sum(words(m.get("content")) for m in messages)
        job = self._job(req, body, prompt, max_tokens(body))
        return self._openai(job, body, "chatcmpl", "chat.completion", chat_choice)

    def _openai_completions(self, req: Received) -> Reply:
        body = payload(req)
        job = self._job(req, body, words(body.get("prompt")), max_tokens(body))
        return self._openai(job, body, "cmpl", "text_completion", text_choice)

    def _openai(self, job: Job, body: Body, prefix: str, kind: str, choice: Choice) -> Reply:
        """Answer an OpenAI completion: SSE chunks ending in [DONE], or one object."""
        head = {"id": f"{prefix}-{next(self._ids)}", "object": kind, "created": int(time.time())}
        head |= {"model": job.model, "system_fingerprint": "fp_ollama"}
        chunk = {**head, "object": "chat.completion.chunk" if kind == "chat.completion" else kind}
        finish = "length" if job.done_reason == "length" else "stop"
        asked = bool((body.get("stream_options") or {}).get("include_usage"))
        usage = asked and self.stream_usage

        def whole(text: str) -> Body:
            return {**head, "choices": [choice(text, finish, False)], "usage": job.usage()}

        # Asked for usage, Ollama's /v1/completions puts a zero usage on every chunk too.
        zeros = {"usage": ZERO_USAGE} if usage and kind == "text_completion" else {}

        def each(token: str) -> bytes:
            return sse({**chunk, "choices": [choice(token, None, True)], **zeros})

        def tail() -> Iterator[bytes]:
            yield sse({**chunk, "choices": [choice("", finish, True)], **zeros})
            if usage:
                yield sse({**chunk, "choices": [], "usage": job.usage()})
            yield b"data: [DONE]\n\n"

        if not body.get("stream"):
            return self._single(job, whole)
        return self._stream(job, "text/event-stream", each, tail)

    def _embed(self, req: Received) -> Reply:
        body = payload(req)
        inputs = as_list(body.get("input"))
        job = self._job(req, body, sum(map(words, inputs)), limit=0)  # embeddings make no tokens

        def answer(_: str) -> Body:
            stats = job.stats()
            timing = {k: stats[k] for k in ("total_duration", "load_duration", "prompt_eval_count")}
            return {"model": job.model, "embeddings": [embedding(t) for t in inputs], **timing}

        return self._single(job, answer)

    def _embeddings(self, req: Received) -> Reply:
        body = payload(req)
        prompt = body.get("prompt") or ""
        job = self._job(req, body, words(prompt), limit=0)
        return self._single(job, lambda _: {"embedding": embedding(prompt) if prompt else []})

    def _openai_embeddings(self, req: Received) -> Reply:
        body = payload(req)
        inputs = as_list(body.get("input"))
        job = self._job(req, body, sum(map(words, inputs)), limit=0)
        encode = b64 if body.get("encoding_format") == "base64" else list

        def answer(_: str) -> Body:
            vectors = [encode(embedding(text)) for text in inputs]
            data = [
                {"object": "embedding", "embedding": v, "index": i} for i, v in enumerate(vectors)
            ]
            usage = {"prompt_tokens": job.prompt_tokens, "total_tokens": job.prompt_tokens}
            return {"object": "list", "data": data, "model": job.model, "usage": usage}

        return self._single(job, answer)

    # -- model management --------------------------------------------------------------------

    def _root(self, req: Received) -> Reply:
        return 200, TEXT, [] if req.method == "HEAD" else [b"Ollama is running"]

    def _version(self, req: Received) -> Reply:
        return 200, JSON_TYPE, [compact({"version": "0.12.3"})]

    def _tags(self, req: Received) -> Reply:
        return 200, JSON_TYPE, [compact({"models": [self._describe(k) for k in self.models]})]

    def _ps(self, req: Received) -> Reply:
        running = []
        for key in sorted(self.loaded & self.models.keys()):
            described = self._describe(key)
            entry = {k: described[k] for k in ("name", "model", "size", "digest", "details")}
            running.append({**entry, "expires_at": rfc3339(300), "size_vram": entry["size"]})
        return 200, JSON_TYPE, [compact({"models": running})]

    def _show(self, req: Received) -> Reply:
        key = self._installed(model_name(payload(req)))
        entry = self._describe(key)
        family = entry["details"].get("family", "llama")
        info = {"general.architecture": family, f"{family}.context_length": 8192}
        show = {"license": "", "modelfile": f"FROM {key}\n", "parameters": 'stop "<|eot_id|>"'}
        show |= {"template": "{{ .Prompt }}", "details": entry["details"], "model_info": info}
        show["capabilities"] = ["embedding"] if "embed" in key else ["completion"]
        show["modified_at"] = entry["modified_at"]
        return 200, JSON_TYPE, [compact(show)]

    def _pull(self, req: Received) -> Reply:
        body = payload(req)
        name = normalize(model_name(body))
        failing = self.fail_pulls > 0
        if failing:
            self.fail_pulls -= 1
        records = self._pull_records(name, failing)
        if body.get("stream") is not False:
            return 200, NDJSON, self._tracked(req, map(ndjson, records), counted=False)
        if failing:
            raise ApiError(500, PULL_FAILURE)
        return 200, JSON_TYPE, self._tracked(req, last_record(records), counted=False)

    def _pull_records(self, name: str, failing: bool) -> Iterator[Body]:
        """Ollama's pull progress; a failing pull errors after its first progress record."""
        digest, chunks = sha256(name), max(1, self.pull_chunks)
        yield {"status": "pulling manifest"}
        for i in range(1, chunks + 1):
            self._pause()
            progress = {"total": SIZE, "completed": SIZE * i // chunks}
            yield {"status": f"pulling {digest[:12]}", "digest": f"sha256:{digest}", **progress}
            if failing:
                yield {"error": PULL_FAILURE}
                return
            if i == 1 and self.pull_gate is not None:
                self.pull_gate.wait()
        for status in ("verifying sha256 digest", "writing manifest"):
            self._pause()
            yield {"status": status}
        self.models[name] = model_entry(name)
        yield {"status": "success"}

    def _push(self, req: Received) -> Reply:
        body = payload(req)
        self._installed(model_name(body))
        return self._statuses(req, body, ["retrieving manifest", "pushing manifest", "success"])

    def _create(self, req: Received) -> Reply:
        body = payload(req)
        name = normalize(model_name(body))
        self.models[name] = model_entry(name)
        return self._statuses(req, body, ["using existing layer", "writing manifest", "success"])

    def _statuses(self, req: Received, body: Body, statuses: list[str]) -> Reply:
        if body.get("stream") is False:
            return 200, JSON_TYPE, [compact({"status": statuses[-1]})]
        records = [ndjson({"status": status}) for status in statuses]
        return 200, NDJSON, self._tracked(req, records, counted=False)

    def _delete(self, req: Received) -> Reply:
        key = self._installed(model_name(payload(req)))
        del self.models[key]
        self.loaded.discard(key)
        return 200, JSON_TYPE, []

    def _copy(self, req: Received) -> Reply:
        body = payload(req)
        key = self._installed(str(body.get("source") or ""))
        new = normalize(str(body.get("destination") or ""))
        self.models[new] = {**self._describe(key), "name": new, "model": new}
        return 200, JSON_TYPE, []

    def _blob(self, req: Received) -> Reply:
        digest = req.path.removeprefix("/api/blobs/")
        if req.method == "POST":
            self.blobs.add(digest)
            return 201, JSON_TYPE, []
        return (200 if digest in self.blobs else 404), JSON_TYPE, []

    def _openai_models(self, req: Received) -> Reply:
        data = [openai_model(key) for key in self.models]
        return 200, JSON_TYPE, [compact({"object": "list", "data": data})]

    def _openai_model(self, req: Received) -> Reply:
        key = self._installed(req.path.removeprefix("/v1/models/"))
        return 200, JSON_TYPE, [compact(openai_model(key))]


def main(argv: list[str] | None = None) -> None:
    """Serve until killed, after printing the URL so a parent process can find it."""
    parser = argparse.ArgumentParser(prog="python -m tests.fake_ollama")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--tokens", type=int, default=8)
    parser.add_argument("--token-delay", type=float, default=0.0)
    parser.add_argument("--first-token-delay", type=float, default=0.0)
    parser.add_argument("--pull-chunks", type=int, default=4)
    parser.add_argument("--no-stream-usage", action="store_true", help="llama.cpp-style streams")
    args = parser.parse_args(argv)
    fake = FakeOllama(None, args.tokens, args.token_delay, args.first_token_delay, args.pull_chunks)
    fake.stream_usage = not args.no_stream_usage
    fake.record = False  # a benchmark's millions of requests must not pile up in memory
    fake.start(args.port)
    print(f"listening on {fake.url}", flush=True)  # the contract with the parent process
    try:
        fake.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    from gevent import monkey

    monkey.patch_all()
    main()
