"""The labeling database: tables, and the few transactions the app and the CLI run on them.

Any SQLAlchemy URL works through the same code; a bare path means a SQLite file. SQLite runs in WAL mode
(readers never block the one writer) with a busy timeout (writers queue for that long, then fail with nothing
written) and synchronous=FULL, so a ranking acknowledged to a labeler survives a crash of the server or the machine.

Concurrency rules, all enforced inside one transaction so that no interleaving of requests can break them:
  - a labeler answers a task at most once, by ranking it or by skipping it, never both (the primary key of
    `answers`, which every ranking and every skip inserts into first);
  - a task gets at most N rankings (a guarded UPDATE of its counter: `n_rankings < N`);
  - a task handed out by `next_task` is leased to that labeler for a while, so concurrent labelers are
    spread over tasks instead of all racing for the same last slot;
  - a revoked or deleted labeler writes nothing (checked after the transaction's first write, when no
    revocation can commit in between).
"""
from __future__ import annotations

import contextlib
import hashlib
import random
import secrets
import threading
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

from sqlalchemy import (JSON, Boolean, DateTime, Engine, ForeignKey, Integer, String, Text, UniqueConstraint, column,
                        create_engine, delete, event, exists, func, insert, literal, select, table, text, update)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column
from sqlalchemy.pool import StaticPool

from ..data import DataError, parse_candidates

SCHEMA_VERSION = 3
FLAGS = ("toxic", "harmful", "nonsense")
MAX_NAME_LEN = 100
MAX_BODY_BYTES = 1 << 20  # the app's default request limit: a ranking of K = 64 with every flag is a few kB


class StoreError(ValueError):
    """A request the database state refuses (the CLI prints it and exits 2)."""


class NotFound(StoreError):
    pass


class Conflict(StoreError):
    pass


class Unauthorized(StoreError):
    """The labeler was revoked or deleted."""


class Busy(StoreError):
    """The database stayed locked by another writer for longer than the busy timeout; nothing was written."""


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def aware(dt: datetime) -> datetime:
    """SQLite hands back naive datetimes; we only ever store UTC."""
    return dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)


def iso(dt: datetime) -> str:
    return aware(dt).isoformat()


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


# --- tables ---------------------------------------------------------------------------------------------
class Base(DeclarativeBase):
    pass


class SchemaVersion(Base):
    __tablename__ = "schema_version"
    version: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    applied_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Labeler(Base):
    __tablename__ = "labelers"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(MAX_NAME_LEN), unique=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)  # SHA-256 hex; the token itself is never stored
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    excluded_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)  # not exported
    reviewer: Mapped[bool | None] = mapped_column(Boolean, nullable=True)  # may read the review page


class Task(Base):
    __tablename__ = "tasks"
    id: Mapped[int] = mapped_column(primary_key=True)
    prompt: Mapped[str] = mapped_column(Text)  # the text, or for a conversation its last user turn (for display)
    responses: Mapped[list] = mapped_column(JSON)  # each a string, or messages of the assistant
    prompt_messages: Mapped[list | None] = mapped_column(JSON, nullable=True)  # the conversation, when there is one
    models: Mapped[list | None] = mapped_column(JSON, nullable=True)  # who wrote each response: exported, never shown
    shuffle: Mapped[bool | None] = mapped_column(Boolean, nullable=True)  # each labeler sees its own order
    n_rankings: Mapped[int] = mapped_column(Integer, default=0)  # kept in step with `rankings` to cap it atomically
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class RankingRow(Base):
    __tablename__ = "rankings"
    __table_args__ = (UniqueConstraint("task_id", "labeler_id", name="one_ranking_per_labeler"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id"), index=True)
    labeler_id: Mapped[int] = mapped_column(ForeignKey("labelers.id"), index=True)
    ranking: Mapped[list] = mapped_column(JSON)  # groups of tied indices, best first
    flags: Mapped[list] = mapped_column(JSON, default=list)  # [{"index": i, "flag": "toxic"}, ...]
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Answer(Base):
    """A labeler's one answer to a task: "ranked" (its ranking is in `rankings`) or "skipped".

    Its primary key makes ranking and skipping mutually exclusive in the database itself, whatever the interleaving.
    """
    __tablename__ = "answers"
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id"), primary_key=True)
    labeler_id: Mapped[int] = mapped_column(ForeignKey("labelers.id"), primary_key=True, index=True)
    kind: Mapped[str] = mapped_column(String(8))  # RANKED or SKIPPED
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


RANKED, SKIPPED = "ranked", "skipped"


class Assignment(Base):
    """The lease on the task a labeler is looking at; at most one per labeler."""
    __tablename__ = "assignments"
    labeler_id: Mapped[int] = mapped_column(ForeignKey("labelers.id"), primary_key=True)
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id"), index=True)
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


# --- engine ---------------------------------------------------------------------------------------------
def normalize_url(db: str | Path) -> str:
    """A SQLAlchemy URL as given, or a file path turned into a SQLite URL."""
    db = str(db)
    if "://" in db:
        return db
    if not db.strip():
        raise StoreError("--db is empty: give a SQLAlchemy URL or a SQLite file path")
    return "sqlite:///" + str(Path(db).expanduser().resolve())


def _sqlite_pragmas(busy_timeout: float):
    def apply(dbapi_conn, _record) -> None:
        cur = dbapi_conn.cursor()
        cur.execute(f"PRAGMA busy_timeout={round(busy_timeout * 1000)}")  # first: the WAL switch may have to wait
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=FULL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()
    return apply


def open_store(db: str | Path, create: bool = True, busy_timeout: float = 30) -> Engine:
    """An engine with the schema created (idempotent), upgraded to this version and checked.

    create=False refuses a SQLite file that does not exist yet, so that a mistyped path is an error instead of a
    new, empty database. A SQLite writer waits at most `busy_timeout` seconds for the write lock (held by this
    process or another), then fails with `Busy` or OperationalError "database is locked"; nothing is written.
    """
    url = normalize_url(db)
    engine_url = make_url(url)
    is_file = engine_url.get_backend_name() == "sqlite" and engine_url.database not in (None, "", ":memory:")
    if not create and is_file and not Path(engine_url.database).is_file():
        raise StoreError(f"no database at {engine_url.database} "
                         "(only add-labeler, enqueue and serve --create start a new one)")
    if url.startswith("sqlite"):
        memory = url in ("sqlite://", "sqlite:///:memory:") or "mode=memory" in url
        kw = ({"poolclass": StaticPool} if memory else {"pool_size": 20, "max_overflow": 20})
        engine = create_engine(url, connect_args={"check_same_thread": False}, **kw)
        event.listen(engine, "connect", _sqlite_pragmas(busy_timeout))
        _SQLITE_WRITERS[engine] = _Writers(threading.Lock(), busy_timeout)
    else:
        engine = create_engine(url, pool_pre_ping=True)
    Base.metadata.create_all(engine)
    with Session(engine) as s, s.begin():
        found = s.scalar(select(func.max(SchemaVersion.version)))
        if found is None:
            s.add(SchemaVersion(version=SCHEMA_VERSION))
    if found is not None and found > SCHEMA_VERSION:
        engine.dispose()
        raise StoreError(f"{url}: schema version {found} is newer than this instructrl ({SCHEMA_VERSION})")
    if found is not None and found < SCHEMA_VERSION:
        _upgrade(engine, found)
    return engine


_LEGACY_SKIPS = table("skips", column("task_id"), column("labeler_id"), column("created_at"))


def _upgrade(engine: Engine, found: int) -> None:
    """Bring a schema 1 or 2 database to this version, in one transaction.

    1 → 2: labelers get `revoked_at`; every ranking and skip becomes an answer. Where schema 1 let a labeler both
    skip and rank a task, the ranking wins. The old `skips` table stays as it was (nothing is lost).
    2 → 3: tasks get `prompt_messages`, `models`, `shuffle`; labelers get `excluded_at`, `reviewer` (all nullable).

    The new version row goes in first: of two processes upgrading at once, the second fails there (once the first
    has committed) and goes on with the upgraded database.
    """
    answer_columns = ["task_id", "labeler_id", "kind", "created_at"]
    old = _LEGACY_SKIPS.c

    def add_column(s: Session, tbl: str, name: str, kind) -> None:
        s.execute(text(f"ALTER TABLE {tbl} ADD COLUMN {name} {kind.compile(dialect=engine.dialect)}"))

    try:
        with writing(engine) as s:
            s.add(SchemaVersion(version=SCHEMA_VERSION))
            s.flush()
            if found < 2:
                add_column(s, "labelers", "revoked_at", DateTime(timezone=True))
                s.execute(insert(Answer).from_select(answer_columns, select(
                    RankingRow.task_id, RankingRow.labeler_id, literal(RANKED), RankingRow.created_at)))
                answered = exists().where(Answer.task_id == old.task_id, Answer.labeler_id == old.labeler_id)
                s.execute(insert(Answer).from_select(answer_columns, select(
                    old.task_id, old.labeler_id, literal(SKIPPED), old.created_at).where(~answered)))
            for tbl, name, kind in (("tasks", "prompt_messages", JSON()), ("tasks", "models", JSON()),
                                    ("tasks", "shuffle", Boolean()), ("labelers", "reviewer", Boolean()),
                                    ("labelers", "excluded_at", DateTime(timezone=True))):
                add_column(s, tbl, name, kind)
    except IntegrityError:
        pass  # another process upgraded it meanwhile


@dataclass
class _Writers:
    lock: threading.Lock
    busy_timeout: float


_SQLITE_WRITERS: weakref.WeakKeyDictionary[Engine, _Writers] = weakref.WeakKeyDictionary()


def _set_pragmas(conn, busy_timeout: float, synchronous: str) -> None:
    conn.exec_driver_sql(f"PRAGMA busy_timeout={round(busy_timeout * 1000)}")
    conn.exec_driver_sql(f"PRAGMA synchronous={synchronous}")
    conn.commit()  # PRAGMAs begin no SQLite transaction; this ends SQLAlchemy's, so the Session starts its own


@contextlib.contextmanager
def writing(engine: Engine, durable: bool = True) -> Iterator[Session]:
    """A write transaction.

    On SQLite, writers of this process first queue on a lock: SQLite admits one writer at a time anyway, and its
    busy handler retries with sleeps of up to 100 ms, which made the latency tail long. The busy timeout is one
    deadline for queueing and SQLite's own wait together, so that writers queued behind a locked database all fail
    one busy timeout after they came, not one after another. `durable=False` commits without an fsync
    (synchronous=NORMAL, for leases, which a crash may lose at no cost); a process crash still keeps such a commit,
    and the next durable commit fsyncs the log with it. Both settings are put back on the same connection before
    it returns to the pool, so no later ranking commits without an fsync.
    """
    writers = _SQLITE_WRITERS.get(engine)
    if writers is None:
        with Session(engine) as s, s.begin():
            yield s
        return
    start = time.monotonic()
    if not writers.lock.acquire(timeout=writers.busy_timeout):
        raise Busy(f"the database stayed busy for {writers.busy_timeout:g} s")
    try:
        with engine.connect() as conn:
            left = max(0.0, writers.busy_timeout - (time.monotonic() - start))
            _set_pragmas(conn, left, "FULL" if durable else "NORMAL")
            try:
                with Session(bind=conn) as s, s.begin():
                    yield s
            finally:
                try:
                    _set_pragmas(conn, writers.busy_timeout, "FULL")
                except Exception:  # never hand a connection with other settings back to the pool
                    conn.invalidate()
    finally:
        writers.lock.release()


@contextlib.contextmanager
def using(db: str | Path | Engine, create: bool = True) -> Iterator[Engine]:
    """An open engine for a URL (disposed afterwards), or the given engine as is."""
    if isinstance(db, Engine):
        yield db
        return
    engine = open_store(db, create)
    try:
        yield engine
    finally:
        engine.dispose()


# --- labelers and tasks ---------------------------------------------------------------------------------
def add_labeler(db, name: str, reviewer: bool = False) -> str:
    """Create a labeler and return its token; only the token's hash is stored, so this is the one chance to see it.
    A reviewer may also read the review page (every labeler's rankings, consensus and agreement)."""
    name = name.strip()
    if not name or len(name) > MAX_NAME_LEN:
        raise StoreError(f"labeler name must be 1..{MAX_NAME_LEN} characters")
    token = secrets.token_urlsafe(32)
    with using(db) as engine:
        try:
            with writing(engine) as s:
                s.add(Labeler(name=name, token_hash=hash_token(token), reviewer=reviewer or None))
        except IntegrityError:
            raise StoreError(f"a labeler named {name!r} already exists") from None
    return token


def labeler_for_token(engine: Engine, token: str) -> Labeler | None:
    """The token's labeler, revoked or not (the caller tells the two apart), or None."""
    with Session(engine) as s:
        return s.scalar(select(Labeler).where(Labeler.token_hash == hash_token(token)))


def _find_labeler(s: Session, who: str) -> Labeler:
    """By name, or by id when no labeler has that name."""
    labeler = s.scalar(select(Labeler).where(Labeler.name == who))
    if labeler is None and who.isdigit():
        labeler = s.get(Labeler, int(who))
    if labeler is None:
        raise NotFound(f"no labeler named {who!r}" + (f" or with id {who}" if who.isdigit() else ""))
    return labeler


def revoke_labeler(db, who: str) -> tuple[str, int, bool]:
    """Revoke a labeler's token at once: by name, or by id when no labeler has that name. Their rankings stay;
    their lease is released. Returns (name, id, whether it was revoked already)."""
    with using(db, create=False) as engine, writing(engine) as s:
        labeler = _find_labeler(s, who)
        was_revoked = labeler.revoked_at is not None
        if not was_revoked:
            labeler.revoked_at = utcnow()
        s.execute(delete(Assignment).where(Assignment.labeler_id == labeler.id))
        return labeler.name, labeler.id, was_revoked


def exclude_labeler(db, who: str, excluded: bool = True) -> tuple[str, int, bool]:
    """Leave a labeler's rankings out of every export and consensus (excluded=False: put them back); nothing is
    deleted, and their token keeps working. Returns (name, id, whether it already was in that state)."""
    with using(db, create=False) as engine, writing(engine) as s:
        labeler = _find_labeler(s, who)
        already = (labeler.excluded_at is not None) == excluded
        if not already:
            labeler.excluded_at = utcnow() if excluded else None
        return labeler.name, labeler.id, already


def validate_task(prompt, responses, where: str = "<enqueue>", line: int | None = None) -> None:
    """The same rules `read_rankings` applies, checked on the way in so that every export is readable."""
    if isinstance(prompt, list) or isinstance(responses, list) and any(isinstance(r, list) for r in responses):
        parse_candidates({"prompt": prompt, "responses": responses}, where, line)  # conversations
        return
    if not isinstance(prompt, str) or not prompt.strip():
        raise DataError(where, line, "must be a non-empty string", "prompt")
    if not isinstance(responses, list) or len(responses) < 2:
        raise DataError(where, line, "need a list of K >= 2 responses", "responses")
    for i, r in enumerate(responses):
        if not isinstance(r, str) or not r.strip():
            raise DataError(where, line, f"responses[{i}] must be a non-empty string", "responses")
    if len(set(responses)) != len(responses):
        raise DataError(where, line, "duplicate responses", "responses")


def prompt_text(prompt) -> str:
    """A prompt as one string for display: itself, or a conversation's last user turn."""
    if isinstance(prompt, str):
        return prompt
    return next((m["content"] for m in reversed(prompt) if m["role"] == "user"), prompt[-1]["content"])


def enqueue_tasks(db, prompts: list, responses: list[list], models: list[list[str]] | None = None,
                  shuffle: bool = False) -> list[int]:
    """Store one ranking task per prompt; all or nothing. Returns the new task ids.

    A prompt is a string or a conversation (messages); a response a string or assistant messages. `models` names
    the model of each response (kept for export, never sent to labelers); `shuffle` shows each labeler the
    responses in their own random order (against position bias)."""
    if len(prompts) != len(responses) or models is not None and len(models) != len(prompts):
        raise DataError("<enqueue>", None, f"{len(prompts)} prompts but {len(responses)} response lists"
                        + ("" if models is None else f" and {len(models)} model lists"))
    for i, (p, rs) in enumerate(zip(prompts, responses), start=1):
        validate_task(p, rs, line=i)
        if models is not None and len(models[i - 1]) != len(rs):
            raise DataError("<enqueue>", i, f"{len(rs)} responses but {len(models[i - 1])} model names", "models")
    if not prompts:
        return []
    now = utcnow()
    rows = [{"prompt": prompt_text(p), "prompt_messages": p if isinstance(p, list) else None,
             "responses": list(rs), "models": None if models is None else list(models[i]),
             "shuffle": shuffle or None, "n_rankings": 0, "created_at": now}
            for i, (p, rs) in enumerate(zip(prompts, responses))]
    with using(db) as engine, writing(engine) as s:
        # the ids the database gave these very rows, in their order, whatever other processes insert meanwhile
        return list(s.scalars(insert(Task).returning(Task.id, sort_by_parameter_order=True), rows))


# --- the labeling transactions ----------------------------------------------------------------------------
@dataclass
class TaskView:
    id: int
    prompt: str | list  # the conversation when there is one
    responses: list
    lease_expires_at: datetime | None = None
    models: list | None = None
    shuffle: bool = False

    @classmethod
    def of(cls, t: Task, lease_expires_at: datetime | None = None) -> TaskView:
        return cls(t.id, t.prompt_messages or t.prompt, list(t.responses), lease_expires_at, t.models, bool(t.shuffle))


def shown_order(task: TaskView, labeler_id: int) -> list[int]:
    """The stored index of the response a labeler sees at each position: the same every time they look, a
    different random order for each labeler when the task shuffles (so no position carries a model's bias)."""
    order = list(range(len(task.responses)))
    if task.shuffle:
        random.Random(f"instructrl.label:{task.id}:{labeler_id}").shuffle(order)
    return order


def get_task(engine: Engine, task_id: int) -> TaskView:
    with Session(engine) as s:
        t = s.get(Task, task_id)
        if t is None:
            raise NotFound(f"task {task_id} does not exist")
        return TaskView.of(t)


def _open_for(labeler_id: int, max_labelers: int):
    """SQL condition: the task still takes rankings and this labeler has not answered it (ranked or skipped)."""
    answered = select(Answer.task_id).where(Answer.task_id == Task.id, Answer.labeler_id == labeler_id)
    return (Task.n_rankings < max_labelers) & ~answered.exists()


def _require_active(s: Session, labeler_id: int) -> None:
    """Inside a write transaction, after its first write: so no revocation can commit between check and commit."""
    found = s.execute(select(Labeler.revoked_at).where(Labeler.id == labeler_id)).first()
    if found is None:
        raise Unauthorized(f"labeler {labeler_id} does not exist")
    if found.revoked_at is not None:
        raise Unauthorized(f"labeler {labeler_id} was revoked: their token no longer works")


def _answer(s: Session, labeler_id: int, task_id: int, kind: str) -> None:
    """Record the labeler's one answer to the task, as the transaction's first write. A second answer, or a
    missing task or labeler, fails right here with IntegrityError; `_refusal` then says which."""
    s.execute(insert(Answer).values(task_id=task_id, labeler_id=labeler_id, kind=kind, created_at=utcnow()))
    _require_active(s, labeler_id)


def _answered(engine: Engine, labeler_id: int, task_id: int) -> str | None:
    with Session(engine) as s:
        return s.scalar(select(Answer.kind).where(Answer.task_id == task_id, Answer.labeler_id == labeler_id))


def _refusal(engine: Engine, labeler_id: int, task_id: int) -> StoreError | None:
    """Why inserting this labeler's answer to this task failed, read back after the rollback (None: not known)."""
    kind = _answered(engine, labeler_id, task_id)
    if kind == RANKED:
        return Conflict(f"you have already ranked task {task_id}")
    if kind == SKIPPED:
        return Conflict(f"you have skipped task {task_id}, so you cannot rank it")
    with Session(engine) as s:
        if s.get(Labeler, labeler_id) is None:
            return Unauthorized(f"labeler {labeler_id} does not exist")
        if s.get(Task, task_id) is None:
            return NotFound(f"task {task_id} does not exist")
    return None


def next_task(engine: Engine, labeler_id: int, max_labelers: int, lease_seconds: float = 600) -> TaskView | None:
    """The labeler's current lease if still valid, else the oldest open task not fully leased to others."""
    now = utcnow()
    is_open = _open_for(labeler_id, max_labelers)
    with Session(engine) as s:
        held = s.execute(select(Task, Assignment.expires_at).join(Assignment, Assignment.task_id == Task.id)
                         .where(Assignment.labeler_id == labeler_id, Assignment.expires_at > now, is_open)).first()
        if held is not None:
            return TaskView.of(held[0], aware(held[1]))
    with writing(engine, durable=False) as s:
        # Writing first makes this whole claim one serialised write transaction on SQLite.
        s.execute(delete(Assignment).where(Assignment.labeler_id == labeler_id))
        _require_active(s, labeler_id)
        leased = (select(func.count()).select_from(Assignment)
                  .where(Assignment.task_id == Task.id, Assignment.expires_at > now).scalar_subquery())
        task = s.scalar(select(Task).where(is_open, Task.n_rankings + leased < max_labelers).order_by(Task.id).limit(1))
        if task is None:
            return None
        expires = now + timedelta(seconds=lease_seconds)
        s.add(Assignment(labeler_id=labeler_id, task_id=task.id, expires_at=expires))
        return TaskView.of(task, expires)


def submit_ranking(engine: Engine, labeler_id: int, task_id: int, groups: list[list[int]], flags: list[dict],
                   max_labelers: int) -> tuple[int, datetime]:
    """Store one ranking; returns (ranking id, created_at) only once the transaction has committed."""
    created = utcnow()
    try:
        with writing(engine) as s:
            _answer(s, labeler_id, task_id, RANKED)
            bumped = s.execute(update(Task).where(Task.id == task_id, Task.n_rankings < max_labelers)
                               .values(n_rankings=Task.n_rankings + 1)
                               .execution_options(synchronize_session=False)).rowcount
            if bumped == 0:
                raise Conflict(f"task {task_id} already has {max_labelers} rankings")
            row = RankingRow(task_id=task_id, labeler_id=labeler_id, ranking=groups, flags=flags, created_at=created)
            s.add(row)
            s.flush()
            s.execute(delete(Assignment).where(Assignment.labeler_id == labeler_id))
            ranking_id = row.id
    except IntegrityError as e:
        raise (_refusal(engine, labeler_id, task_id) or e) from None
    return ranking_id, created


def skip_task(engine: Engine, labeler_id: int, task_id: int) -> None:
    """Mark a task as skipped by this labeler (idempotent): it is not offered to them again, nor can they rank it."""
    try:
        with writing(engine) as s:
            _answer(s, labeler_id, task_id, SKIPPED)
            s.execute(delete(Assignment).where(Assignment.labeler_id == labeler_id))
    except IntegrityError as e:
        if _answered(engine, labeler_id, task_id) != SKIPPED:  # skipping again changes nothing
            raise (_refusal(engine, labeler_id, task_id) or e) from None


def progress(engine: Engine, labeler_id: int, max_labelers: int) -> dict:
    """done, skipped, and remaining = open tasks this labeler could still rank."""
    with Session(engine) as s:
        done = s.scalar(select(func.count()).select_from(RankingRow).where(RankingRow.labeler_id == labeler_id))
        skipped = s.scalar(select(func.count()).select_from(Answer)
                           .where(Answer.labeler_id == labeler_id, Answer.kind == SKIPPED))
        remaining = s.scalar(select(func.count()).select_from(Task).where(_open_for(labeler_id, max_labelers)))
    return {"done": done, "skipped": skipped, "remaining": remaining}


def history(engine: Engine, labeler_id: int, limit: int = 100, offset: int = 0) -> list[tuple[RankingRow, Task]]:
    """This labeler's own rankings, newest first; there is deliberately no way to ask for someone else's."""
    with Session(engine) as s:
        rows = s.execute(select(RankingRow, Task).join(Task, Task.id == RankingRow.task_id)
                         .where(RankingRow.labeler_id == labeler_id)
                         .order_by(RankingRow.id.desc()).limit(limit).offset(offset)).all()
        s.expunge_all()
        return [(r, t) for r, t in rows]


def all_rankings(engine: Engine) -> Iterator[tuple[RankingRow, Task, Labeler]]:
    """Every ranking with its task and labeler, in commit order (for export and stats)."""
    with Session(engine) as s:
        q = (select(RankingRow, Task, Labeler).join(Task, Task.id == RankingRow.task_id)
             .join(Labeler, Labeler.id == RankingRow.labeler_id).order_by(RankingRow.id))
        for r, t, l in s.execute(q):
            yield r, t, l
