"""The ranking web app: a JSON API under /api/ and one static page that uses only that API.

Every /api call carries `Authorization: Bearer <token>`; a missing, unknown or revoked token is 401 (looked up on
every call, so a revocation takes effect at once). Handlers are plain (sync) functions, so FastAPI runs them in its
thread pool and a slow database write never blocks the event loop. A write is acknowledged (200/201) only after its
transaction has committed; a database locked for longer than `busy_timeout` is a fast 503 with Retry-After.

A request body over `max_body_bytes` is 413 before it is read (by Content-Length) or as soon as the bytes received
pass the limit (no or a false Content-Length): one labeler's huge body never stalls the others. JSON with NaN or
Infinity is 422, and no 422 echoes the request body back.

`GET /api/tasks/next` answers 200 `{"task": null}` when nothing is left for this labeler (rather than 204), so
that every answer has a JSON body the page and the schema describe the same way.

A task's responses reach a labeler in that labeler's own order when the task was imported with shuffling
(`store.shown_order`); every index a labeler sends or sees refers to that order, and is mapped to the stored one
here. Which model wrote a response is never sent. `GET /api/review` (reviewers only) lists tasks by agreement.
"""
from __future__ import annotations

import json
from contextlib import asynccontextmanager
from datetime import datetime
from pathlib import Path
from typing import Annotated, Literal, Union

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi import Path as PathParam
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field, StrictInt
from sqlalchemy.exc import OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from ..data import DataError, parse_ranking_groups
from ..body_limit import BodyLimit
from . import store

STATIC_DIR = Path(__file__).parent / "static"
MAX_ID = 2**63 - 1  # the largest id a database integer column holds
MAX_K = 64
MAX_LOC_CHARS = 64  # a field name quoted back in a 422 (it may be the client's own key) is cut to this
PAGE_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; "
            "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")

Id = Annotated[StrictInt, Field(ge=1, le=MAX_ID)]
Index = Annotated[StrictInt, Field(ge=0, le=MAX_K - 1)]


# --- request and response bodies ----------------------------------------------------------------------------
class Error(BaseModel):
    detail: str


class Me(BaseModel):
    labeler_id: int
    name: str
    done: int = Field(description="rankings this labeler has submitted")
    skipped: int = Field(description="tasks this labeler has skipped")
    remaining: int = Field(description="tasks this labeler could still rank")
    max_labelers_per_task: int


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


Text = Union[str, list[Message]]  # a string, or a conversation's messages


class TaskOut(BaseModel):
    id: int
    prompt: Text = Field(description="a string, or the conversation so far (its turns, to be rendered as turns)")
    responses: list[Text] = Field(description="the K responses, in the order the ranking's indices refer to")
    lease_expires_at: datetime | None = Field(None, description="the task is held for this labeler until then")


class NextTask(BaseModel):
    task: TaskOut | None = Field(description="null when no task is left for this labeler")


class FlagIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    index: Index = Field(description="index of the flagged response")
    flag: Literal["toxic", "harmful", "nonsense"]


class RankingIn(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"task_id": 1, "ranking": [2, [0, 3], 1], "flags": [{"index": 1, "flag": "nonsense"}]}]})
    task_id: Id
    ranking: list[Index | Annotated[list[Index], Field(max_length=MAX_K)]] = Field(
        max_length=MAX_K, description="indices into the task's responses, best first, each exactly once; "
                                      "a nested list is a tie")
    flags: list[FlagIn] = Field(default_factory=list, max_length=3 * MAX_K)


class RankingOut(BaseModel):
    id: int
    task_id: int
    prompt: Text
    responses: list[Text]
    ranking: list[int | list[int]]
    flags: list[FlagIn]
    created_at: datetime


class SkipOut(BaseModel):
    task_id: int
    skipped: bool


class Guidelines(BaseModel):
    markdown: str | None = Field(description="the project's labeling guidelines (Markdown), null when none")


class ReviewTask(BaseModel):
    task_id: int
    prompt: Text
    responses: list[Text]
    models: list[str | None] | None
    consensus: list[int | list[int]] = Field(description="the exported consensus: stored indices, best first")
    mean_ranks: list[float]
    labelers: list[str] = Field(description="the included labelers who ranked it")
    rankings: list[list[int | list[int]]]
    agreement: float | None = Field(description="mean pairwise agreement of its labelers; null below two")
    kendall_tau: float | None
    flags: dict[str, int]


class ReviewLabeler(BaseModel):
    name: str
    rankings: int
    excluded: bool
    pairwise_agreement: float | None


class Review(BaseModel):
    tasks: list[ReviewTask] = Field(description="least agreement first, then most flags; one labeler last")
    labelers: list[ReviewLabeler]


def _ranking_json(groups: list[list[int]]) -> list:
    return [g[0] if len(g) == 1 else list(g) for g in groups]


def _invalid(field: str, message: str) -> HTTPException:
    """422 in FastAPI's own validation-error shape, so clients handle one format."""
    return HTTPException(422, [{"loc": ["body", field], "msg": message, "type": "value_error"}])


bearer = HTTPBearer(auto_error=False, description="the labeler's token")


def _unauthorized(message: str) -> HTTPException:
    return HTTPException(401, message, headers={"WWW-Authenticate": "Bearer"})


def current_labeler(request: Request,
                    cred: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> store.Labeler:
    """The labeler whose token is in `Authorization: Bearer ...`, else 401.

    Looked up on every call (one indexed query), never cached: a revoked or deleted labeler is refused at once.
    """
    found = None if cred is None else store.labeler_for_token(request.app.state.engine, cred.credentials)
    if found is None:
        raise _unauthorized("missing or unknown token")
    if found.revoked_at is not None:
        raise _unauthorized("this token was revoked")
    return found


Who = Annotated[store.Labeler, Depends(current_labeler)]
ERRORS = {401: {"model": Error, "description": "missing, unknown or revoked token"},
          503: {"model": Error, "description": "the database is busy; nothing was saved, retry after Retry-After"}}


# --- request bodies: size limit and strict JSON -------------------------------------------------------------
def _no_constant(name: str):
    """json.loads would read NaN and ±Infinity into floats; they are not JSON."""
    raise HTTPException(422, [{"loc": ["body"], "msg": f"invalid JSON: {name} is not a JSON number",
                               "type": "json_invalid"}])


class StrictJSONRequest(Request):
    async def json(self):
        if not hasattr(self, "_json"):
            self._json = json.loads(await self.body(), parse_constant=_no_constant)
        return self._json


class StrictJSONRoute(APIRoute):
    def get_route_handler(self):
        handler = super().get_route_handler()

        async def strict(request: Request):
            return await handler(StrictJSONRequest(request.scope, request.receive))

        return strict


def _short(part):
    return part if not isinstance(part, str) or len(part) <= MAX_LOC_CHARS else part[:MAX_LOC_CHARS] + "…"


def _without_input(error: dict) -> dict:
    """A validation error without the offending value (pydantic's `input`), which may be the whole body."""
    msg = error["msg"]
    if error["type"] == "json_invalid":
        msg = f"invalid JSON: {error.get('ctx', {}).get('error', 'cannot be parsed')}"
    return {"loc": [_short(p) for p in error["loc"]], "msg": msg, "type": error["type"]}


# --- the app ----------------------------------------------------------------------------------------------
def create_app(db_url: str, max_labelers_per_task: int = 3, lease_seconds: float = 600, *, create: bool = True,
               max_body_bytes: int = store.MAX_BODY_BYTES, busy_timeout: float = 1.0,
               guidelines: str | None = None) -> FastAPI:
    """The app over the database at `db_url` (schema created now; create=False: it must exist); a task takes at
    most N rankings; a write waits at most `busy_timeout` seconds for a locked database, then is 503.
    `guidelines`: the project's labeling guidelines in Markdown, shown at /guidelines."""
    if max_labelers_per_task < 1:
        raise ValueError("max_labelers_per_task must be at least 1")
    if max_body_bytes < 1:
        raise ValueError("max_body_bytes must be at least 1")
    engine = store.open_store(db_url, create=create, busy_timeout=busy_timeout)
    N = max_labelers_per_task

    @asynccontextmanager
    async def lifespan(_app):
        yield
        engine.dispose()

    app = FastAPI(title="instructrl labeling", version="1", lifespan=lifespan,
                  description="Rank K responses per prompt. Every /api call needs `Authorization: Bearer <token>` "
                              "(create one with `instructrl label add-labeler NAME --db URL`).")
    app.state.engine = engine
    app.router.route_class = StrictJSONRoute
    app.add_middleware(BodyLimit, limit=max_body_bytes)

    @app.exception_handler(RequestValidationError)
    async def invalid(_req: Request, exc: RequestValidationError):
        return JSONResponse({"detail": [_without_input(e) for e in exc.errors()]}, status_code=422)

    @app.exception_handler(store.Unauthorized)
    async def unauthorized(_req: Request, exc: store.Unauthorized):
        return JSONResponse({"detail": str(exc)}, status_code=401, headers={"WWW-Authenticate": "Bearer"})

    @app.exception_handler(store.NotFound)
    async def not_found(_req: Request, exc: store.NotFound):
        return JSONResponse({"detail": str(exc)}, status_code=404)

    @app.exception_handler(store.Conflict)
    async def conflict(_req: Request, exc: store.Conflict):
        return JSONResponse({"detail": str(exc)}, status_code=409)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        """405 lists every method of the path in `Allow`; Starlette names only those of the first matching route."""
        if exc.status_code == 405:
            allowed = {m for r in request.app.router.routes if r.matches(request.scope)[0] == Match.PARTIAL
                       for m in getattr(r, "methods", None) or ()}
            exc.headers = {**(exc.headers or {}), "Allow": ", ".join(sorted(allowed))}
        return await http_exception_handler(request, exc)

    @app.exception_handler(OperationalError)
    @app.exception_handler(store.Busy)
    async def busy(_req: Request, exc: OperationalError | store.Busy):
        return JSONResponse({"detail": f"database unavailable, nothing was saved; retry ({getattr(exc, 'orig', exc)})"},
                            status_code=503, headers={"Retry-After": "1"})

    @app.get("/api/me", response_model=Me, responses=ERRORS, summary="who am I, and my progress")
    def me(who: Who):
        return Me(labeler_id=who.id, name=who.name, max_labelers_per_task=N, **store.progress(engine, who.id, N))

    @app.get("/api/tasks/next", response_model=NextTask, responses=ERRORS,
             summary="the next task to rank, or {task: null} when none is left")
    def next_task(who: Who):
        t = store.next_task(engine, who.id, N, lease_seconds)
        if t is None:
            return NextTask(task=None)
        shown = store.shown_order(t, who.id)
        return NextTask(task=TaskOut(id=t.id, prompt=t.prompt, responses=[t.responses[i] for i in shown],
                                     lease_expires_at=t.lease_expires_at))

    @app.post("/api/rankings", response_model=RankingOut, status_code=201, summary="submit a ranking",
              responses={**ERRORS, 400: {"model": Error, "description": "the body is not JSON"},
                         404: {"model": Error, "description": "no such task"},
                         409: {"model": Error, "description": "already ranked or skipped by you, or the task is full"},
                         413: {"model": Error, "description": "the body is larger than the server's limit"}})
    def submit(body: RankingIn, who: Who):
        task = store.get_task(engine, body.task_id)
        k = len(task.responses)
        n_indices = sum(len(g) if isinstance(g, list) else 1 for g in body.ranking)
        if n_indices != k:
            raise _invalid("ranking", f"the task has {k} responses but the ranking lists {n_indices} indices")
        try:
            groups = parse_ranking_groups(body.ranking, k, path=f"task {task.id}")
        except DataError as e:
            raise _invalid("ranking", str(e)) from None
        if len(groups) < 2:  # all tied: no comparison, nothing for a reward model to learn
            raise _invalid("ranking", f"a ranking must order at least two responses; this one ties all {k}")
        flags = {}
        for f in body.flags:
            if f.index >= k:
                raise _invalid("flags", f"flag index {f.index} out of range for {k} responses")
            flags[(f.index, f.flag)] = {"index": f.index, "flag": f.flag}
        flag_list = sorted(flags.values(), key=lambda f: (f["index"], f["flag"]))
        shown = store.shown_order(task, who.id)  # shown position -> stored index
        rid, created = store.submit_ranking(engine, who.id, task.id, [[shown[i] for i in g] for g in groups],
                                            sorted(({**f, "index": shown[f["index"]]} for f in flag_list),
                                                   key=lambda f: (f["index"], f["flag"])), N)
        return RankingOut(id=rid, task_id=task.id, prompt=task.prompt, responses=[task.responses[i] for i in shown],
                          ranking=_ranking_json(groups), flags=flag_list, created_at=created)

    @app.post("/api/tasks/{task_id}/skip", response_model=SkipOut, summary="skip a task (not offered again)",
              responses={**ERRORS, 404: {"model": Error, "description": "no such task"},
                         409: {"model": Error, "description": "already ranked by you"}})
    def skip(task_id: Annotated[int, PathParam(ge=1, le=MAX_ID)], who: Who):
        store.skip_task(engine, who.id, task_id)
        return SkipOut(task_id=task_id, skipped=True)

    @app.get("/api/rankings", response_model=list[RankingOut], responses=ERRORS,
             summary="my own rankings, newest first")
    def my_rankings(who: Who, limit: Annotated[int, Query(ge=1, le=1000)] = 100,
                    offset: Annotated[int, Query(ge=0, le=MAX_ID)] = 0):
        out = []
        for r, t in store.history(engine, who.id, limit, offset):
            task = store.TaskView.of(t)
            shown = store.shown_order(task, who.id)
            at = {stored: pos for pos, stored in enumerate(shown)}
            out.append(RankingOut(
                id=r.id, task_id=t.id, prompt=task.prompt, responses=[task.responses[i] for i in shown],
                ranking=_ranking_json([[at[i] for i in g] for g in r.ranking]),
                flags=sorted(({**f, "index": at[f["index"]]} for f in r.flags), key=lambda f: (f["index"], f["flag"])),
                created_at=store.aware(r.created_at)))
        return out

    @app.get("/api/guidelines", response_model=Guidelines, responses=ERRORS, summary="the labeling guidelines")
    def get_guidelines(who: Who):
        return Guidelines(markdown=guidelines)

    @app.get("/api/review", response_model=Review, summary="every task's consensus and agreement (reviewers only)",
             responses={**ERRORS, 403: {"model": Error, "description": "this labeler is not a reviewer"}})
    def review(who: Who):
        if not who.reviewer:
            raise HTTPException(403, "only reviewers see the review page (add-labeler NAME --reviewer)")
        from .export import review_data

        return review_data(engine)

    @app.get("/healthz", include_in_schema=False)
    def healthz():
        return {"ok": True}

    def html(name: str) -> Response:
        return FileResponse(STATIC_DIR / name, headers={"Content-Security-Policy": PAGE_CSP})

    app.get("/", include_in_schema=False)(lambda: html("index.html"))
    app.get("/guidelines", include_in_schema=False)(lambda: html("page.html"))  # pages.js picks by the path
    app.get("/review", include_in_schema=False)(lambda: html("page.html"))

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.middleware("http")
    async def security_headers(request: Request, call_next):
        response = await call_next(request)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        if request.url.path.startswith("/static/"):
            response.headers.setdefault("Content-Security-Policy", PAGE_CSP)
        return response

    return app
