"""`instructrl serve-rm`: a reward model behind OpenRLHF's remote-RM contract [ORLHF] (`rewards.HTTPReward` is its
client), small and safe to put on a network:
  - POST / or /get_reward {"query": [texts], ...} → {"rewards": [floats]}: each text tokenised as it is (special
    tokens included, as HTTPReward and OpenRLHF send them) and read at its last token (its last `context` tokens).
  - limits: a body over max_body_bytes or with more than max_queries queries is 413 (the body is not read past the
    limit); a body that is not such JSON, or a query the tokenizer cannot read, is 400; uvicorn answers 503 beyond
    max_concurrent requests at once. Memory stays bounded whatever the clients send.
  - fairness: a request is scored in chunks of batch_size texts, each chunk under a FIFO lock released after it: a
    huge request takes its turn chunk by chunk, so a small one waits for at most one chunk of each request ahead.
  - auth: with a token, every request must carry `Authorization: Bearer TOKEN` (401 otherwise).
"""
from __future__ import annotations

import collections
import errno
import hmac
import json
import socket
import threading

import torch

DEFAULT_MAX_BODY_BYTES = 8 << 20


class FairLock:
    """A lock granted in arrival order (threading.Lock promises no order: a thread that releases it and asks again
    at once may keep it for ever)."""

    def __init__(self):
        self._cond = threading.Condition()
        self._queue: collections.deque = collections.deque()

    def __enter__(self):
        me = object()
        with self._cond:
            self._queue.append(me)
            self._cond.wait_for(lambda: self._queue[0] is me)

    def __exit__(self, *exc):
        with self._cond:
            self._queue.popleft()
            self._cond.notify_all()


class Refused(Exception):
    """A request the server will not score: HTTP `status` with `detail`."""

    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status, self.detail = status, detail


def read_queries(raw: bytes, max_queries: int) -> list[str]:
    """The body's queries, else Refused: 400 for what is not {"query": [non-empty strings]}, 413 for too many."""
    try:
        body = json.loads(raw)
    except ValueError as e:  # not UTF-8, not JSON
        raise Refused(400, f"the body is not JSON ({e})") from None
    queries = body.get("query") if isinstance(body, dict) else None
    if not isinstance(queries, list):
        raise Refused(400, 'expected JSON {"query": [non-empty strings], ...}')
    if len(queries) > max_queries:
        raise Refused(413, f"{len(queries)} queries; this server takes at most {max_queries} per request "
                           f"(its --max-queries)")
    for i, q in enumerate(queries):
        if not isinstance(q, str) or not q:
            raise Refused(400, f"query {i}: expected a non-empty string, got {json.dumps(q)[:40]}")
        try:
            q.encode()
        except UnicodeEncodeError as e:  # a lone surrogate (\ud800): valid JSON, but no text a tokenizer reads
            raise Refused(400, f"query {i} cannot be tokenised ({e.reason} at character {e.start})") from None
    return queries


def rm_app(model, tokenizer, batch_size: int = 64, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
           max_queries: int = 1024, token: str | None = None):
    """The ASGI app: `model` (a ScalarHeadModel) scores what `tokenizer` makes of each query."""
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    from .body_limit import BodyLimit
    from .models import context_length
    from .sampling import left_pad

    lock = FairLock()
    device, width = next(model.parameters()).device, context_length(model.backbone)
    tokenizer(["warm-up"], add_special_tokens=False)  # settles the tokenizer's state before threads share it
    expected = f"Bearer {token}".encode() if token else None

    @torch.no_grad()
    def score(queries: list[str]) -> list[float]:
        out = []
        for i in range(0, len(queries), batch_size):
            chunk = queries[i:i + batch_size]
            try:  # outside the lock: tokenising (Rust, without the GIL) overlaps other requests' forwards
                enc = tokenizer(chunk, add_special_tokens=False)["input_ids"]
            except Exception as e:  # whatever this tokenizer cannot read
                raise Refused(400, f"queries {i}–{i + len(chunk) - 1} cannot be tokenised ({type(e).__name__}: "
                                   f"{e})"[:300]) from None
            empty = [i + j for j, e in enumerate(enc) if not e]
            if empty:
                raise Refused(400, f"query {empty[0]} has no tokens")
            enc = [e[-width:] for e in enc]
            with lock:  # one forward at a time, in arrival order
                ids, mask = left_pad(enc, tokenizer.pad_token_id, device)  # left padding: every text ends at the end
                out += model.score(ids, mask, torch.full((len(enc),), ids.shape[1] - 1, device=device)).tolist()
        return out

    async def get_reward(request):
        if expected is not None and not hmac.compare_digest(request.headers.get("authorization", "").encode(),
                                                            expected):
            return JSONResponse({"detail": "missing or wrong token (send Authorization: Bearer TOKEN)"}, 401,
                                headers={"WWW-Authenticate": "Bearer"})
        raw = await request.body()  # BodyLimit: 413 past max_body_bytes
        try:
            rewards = await run_in_threadpool(lambda: score(read_queries(raw, max_queries)))
        except Refused as e:
            return JSONResponse({"detail": e.detail}, e.status)
        # json.dumps writes a non-finite reward as NaN/Infinity, which the client reads (and its run then stops on)
        return Response(json.dumps({"rewards": rewards}), media_type="application/json")

    async def health(request):
        return JSONResponse({"ok": True})

    async def refused(request, e: HTTPException):  # BodyLimit's 413, 404, 405: JSON like every other answer
        return JSONResponse({"detail": e.detail}, e.status_code, headers=e.headers)

    app = Starlette(routes=[Route("/", get_reward, methods=["POST"]),
                            Route("/get_reward", get_reward, methods=["POST"]),
                            Route("/health", health, methods=["GET"])],
                    exception_handlers={HTTPException: refused})
    return BodyLimit(app, max_body_bytes)


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to host:port, else a one-line ValueError (a port in use, an address not of this machine)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as e:
        raise ValueError(f"--host {host}: not an address to listen on ({e.strerror})") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart reuses the port at once (not one in use)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise ValueError(f"--port {port}: {host}:{port} is already in use; stop what listens there or choose "
                             f"another --port") from None
        raise ValueError(f"--host {host} --port {port}: cannot listen there ({e.strerror})") from None
    return sock


def serve(reward: str, host: str, port: int, device: str, batch_size: int, max_body_bytes: int, max_queries: int,
          max_concurrent: int, token: str | None) -> None:
    import uvicorn

    from .models import ScalarHeadModel, load_tokenizer
    from .utils import console, resolve_device

    sock = listen(host, port)  # first: a port in use is said before the model loads
    model = ScalarHeadModel.from_pretrained(reward, resolve_device(device)).eval()
    app = rm_app(model, load_tokenizer(reward), batch_size, max_body_bytes, max_queries, token)
    console.print(f"serving {reward} at http://{host}:{sock.getsockname()[1]}/get_reward"
                  + (" (bearer token required)" if token else ""), markup=False, highlight=False)
    config = uvicorn.Config(app, log_level="warning", limit_concurrency=max_concurrent)
    uvicorn.Server(config).run(sockets=[sock])
