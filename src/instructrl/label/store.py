"""The labeling database: tables, and the few transactions the app and the CLI run on them.

Any SQLAlchemy URL works through the same code; a bare path means a SQLite file. SQLite runs in WAL mode
(readers never block the one writer) with a busy timeout (writers queue instead of failing) and
synchronous=FULL, so a ranking acknowledged to a labeler survives a crash of the server or of the machine.

Concurrency rules, all enforced inside one transaction so that no interleaving of requests can break them:
  - a labeler ranks a task at most once (a unique constraint);
  - a task gets at most N rankings (a guarded UPDATE of its counter: `n_rankings < N`);
  - a task handed out by `next_task` is leased to that labeler for a while, so concurrent labelers are
    spread over tasks instead of all racing for the same last slot.
"""
from __future__ import annotations

import contextlib
import hashlib
import secrets
import threading
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

from sqlalchemy import (JSON, DateTime, Engine, ForeignKey, Integer, String, Text, UniqueConstraint, create_engine,
                        delete, event, func, insert, select, update)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column
from sqlalchemy.pool import StaticPool

from ..data import DataError

SCHEMA_VERSION = 1
FLAGS = ("toxic", "harmful", "nonsense")
MAX_NAME_LEN = 100


class StoreError(ValueError):
    """A request the database state refuses (the CLI prints it and exits 2)."""


class NotFound(StoreError):
    pass


class Conflict(StoreError):
    pass


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


class Task(Base):
    __tablename__ = "tasks"
    id: Mapped[int] = mapped_column(primary_key=True)
    prompt: Mapped[str] = mapped_column(Text)
    responses: Mapped[list] = mapped_column(JSON)
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


class Skip(Base):
    __tablename__ = "skips"
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id"), primary_key=True)
    labeler_id: Mapped[int] = mapped_column(ForeignKey("labelers.id"), primary_key=True, index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


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


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA busy_timeout=30000")  # first: the WAL switch itself may have to wait
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=FULL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def open_store(db: str | Path, create: bool = True) -> Engine:
    """An engine with the schema created (idempotent) and its version checked.

    create=False refuses a SQLite file that does not exist yet, so that a mistyped path given to a read-only
    command (export, stats) is an error instead of a new, empty database.
    """
    url = normalize_url(db)
    engine_url = make_url(url)
    is_file = engine_url.get_backend_name() == "sqlite" and engine_url.database not in (None, "", ":memory:")
    if not create and is_file and not Path(engine_url.database).is_file():
        raise StoreError(f"no database at {engine_url.database}")
    if url.startswith("sqlite"):
        memory = url in ("sqlite://", "sqlite:///:memory:") or "mode=memory" in url
        kw = ({"poolclass": StaticPool} if memory else {"pool_size": 20, "max_overflow": 20})
        engine = create_engine(url, connect_args={"check_same_thread": False}, **kw)
        event.listen(engine, "connect", _sqlite_pragmas)
        _WRITE_LOCKS[engine] = threading.Lock()
    else:
        engine = create_engine(url, pool_pre_ping=True)
    Base.metadata.create_all(engine)
    with Session(engine) as s, s.begin():
        found = s.scalar(select(func.max(SchemaVersion.version)))
        if found is None:
            s.add(SchemaVersion(version=SCHEMA_VERSION))
        elif found > SCHEMA_VERSION:
            engine.dispose()
            raise StoreError(f"{url}: schema version {found} is newer than this instructrl ({SCHEMA_VERSION})")
    return engine


_WRITE_LOCKS: weakref.WeakKeyDictionary[Engine, threading.Lock] = weakref.WeakKeyDictionary()


@contextlib.contextmanager
def writing(engine: Engine, durable: bool = True) -> Iterator[Session]:
    """A write transaction.

    On SQLite, writers of this process first queue on a lock: SQLite admits one writer at a time anyway, and its
    busy handler retries with sleeps of up to 100 ms, which made the latency tail long. `durable=False` commits
    without an fsync (synchronous=NORMAL, for leases, which a crash may lose at no cost); a process crash still
    keeps such a commit, and the next durable commit fsyncs the log with it.
    """
    sqlite = engine.dialect.name == "sqlite"
    relaxed = sqlite and not durable
    with _WRITE_LOCKS.get(engine) if sqlite else contextlib.nullcontext(), Session(engine) as s:
        if relaxed:  # outside any SQLite transaction: pysqlite begins one only before INSERT/UPDATE/DELETE
            s.connection().exec_driver_sql("PRAGMA synchronous=NORMAL")
        try:
            yield s
            s.commit()
        except BaseException:
            s.rollback()
            raise
        finally:
            if relaxed:
                conn = s.connection()
                try:
                    conn.exec_driver_sql("PRAGMA synchronous=FULL")
                    s.commit()
                except Exception:  # never hand a relaxed connection back to the pool
                    conn.invalidate()


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
def add_labeler(db, name: str) -> str:
    """Create a labeler and return its token; only the token's hash is stored, so this is the one chance to see it."""
    name = name.strip()
    if not name or len(name) > MAX_NAME_LEN:
        raise StoreError(f"labeler name must be 1..{MAX_NAME_LEN} characters")
    token = secrets.token_urlsafe(32)
    with using(db) as engine:
        try:
            with writing(engine) as s:
                s.add(Labeler(name=name, token_hash=hash_token(token)))
        except IntegrityError:
            raise StoreError(f"a labeler named {name!r} already exists") from None
    return token


def labeler_for_token(engine: Engine, token: str) -> Labeler | None:
    with Session(engine) as s:
        return s.scalar(select(Labeler).where(Labeler.token_hash == hash_token(token)))


def validate_task(prompt, responses, where: str = "<enqueue>", line: int | None = None) -> None:
    """The same rules `read_rankings` applies, checked on the way in so that every export is readable."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise DataError(where, line, "must be a non-empty string", "prompt")
    if not isinstance(responses, list) or len(responses) < 2:
        raise DataError(where, line, "need a list of K >= 2 responses", "responses")
    for i, r in enumerate(responses):
        if not isinstance(r, str) or not r.strip():
            raise DataError(where, line, f"responses[{i}] must be a non-empty string", "responses")
    if len(set(responses)) != len(responses):
        raise DataError(where, line, "duplicate responses", "responses")


def enqueue_tasks(db, prompts: list[str], responses: list[list[str]]) -> list[int]:
    """Store one ranking task per prompt; all or nothing. Returns the new task ids."""
    if len(prompts) != len(responses):
        raise DataError("<enqueue>", None, f"{len(prompts)} prompts but {len(responses)} response lists")
    for i, (p, rs) in enumerate(zip(prompts, responses), start=1):
        validate_task(p, rs, line=i)
    if not prompts:
        return []
    now = utcnow()
    rows = [{"prompt": p, "responses": list(rs), "n_rankings": 0, "created_at": now} for p, rs in zip(prompts, responses)]
    with using(db) as engine, writing(engine) as s:
        first = (s.scalar(select(func.max(Task.id))) or 0) + 1
        s.execute(insert(Task), rows)
        ids = list(s.scalars(select(Task.id).where(Task.id >= first).order_by(Task.id)))
    return ids


# --- the labeling transactions ----------------------------------------------------------------------------
@dataclass
class TaskView:
    id: int
    prompt: str
    responses: list[str]
    lease_expires_at: datetime | None = None


def get_task(engine: Engine, task_id: int) -> TaskView:
    with Session(engine) as s:
        t = s.get(Task, task_id)
        if t is None:
            raise NotFound(f"task {task_id} does not exist")
        return TaskView(t.id, t.prompt, list(t.responses))


def _open_for(labeler_id: int, max_labelers: int):
    """SQL condition: the task still takes rankings and this labeler has neither ranked nor skipped it."""
    ranked = select(RankingRow.id).where(RankingRow.task_id == Task.id, RankingRow.labeler_id == labeler_id)
    skipped = select(Skip.task_id).where(Skip.task_id == Task.id, Skip.labeler_id == labeler_id)
    return (Task.n_rankings < max_labelers) & ~ranked.exists() & ~skipped.exists()


def next_task(engine: Engine, labeler_id: int, max_labelers: int, lease_seconds: float = 600) -> TaskView | None:
    """The labeler's current lease if still valid, else the oldest open task not fully leased to others."""
    now = utcnow()
    is_open = _open_for(labeler_id, max_labelers)
    with Session(engine) as s:
        held = s.execute(select(Task, Assignment.expires_at).join(Assignment, Assignment.task_id == Task.id)
                         .where(Assignment.labeler_id == labeler_id, Assignment.expires_at > now, is_open)).first()
        if held is not None:
            return TaskView(held[0].id, held[0].prompt, list(held[0].responses), aware(held[1]))
    with writing(engine, durable=False) as s:
        # Writing first makes this whole claim one serialised write transaction on SQLite.
        s.execute(delete(Assignment).where(Assignment.labeler_id == labeler_id))
        leased = (select(func.count()).select_from(Assignment)
                  .where(Assignment.task_id == Task.id, Assignment.expires_at > now).scalar_subquery())
        task = s.scalar(select(Task).where(is_open, Task.n_rankings + leased < max_labelers).order_by(Task.id).limit(1))
        if task is None:
            return None
        expires = now + timedelta(seconds=lease_seconds)
        s.add(Assignment(labeler_id=labeler_id, task_id=task.id, expires_at=expires))
        return TaskView(task.id, task.prompt, list(task.responses), expires)


def submit_ranking(engine: Engine, labeler_id: int, task_id: int, groups: list[list[int]], flags: list[dict],
                   max_labelers: int) -> tuple[int, datetime]:
    """Store one ranking; returns (ranking id, created_at) only once the transaction has committed."""
    created = utcnow()
    try:
        with writing(engine) as s:
            bumped = s.execute(update(Task).where(Task.id == task_id, Task.n_rankings < max_labelers)
                               .values(n_rankings=Task.n_rankings + 1)
                               .execution_options(synchronize_session=False)).rowcount
            if bumped == 0:
                if s.get(Task, task_id) is None:
                    raise NotFound(f"task {task_id} does not exist")
                if _has_ranked(s, labeler_id, task_id):
                    raise Conflict(f"you have already ranked task {task_id}")
                raise Conflict(f"task {task_id} already has {max_labelers} rankings")
            row = RankingRow(task_id=task_id, labeler_id=labeler_id, ranking=groups, flags=flags, created_at=created)
            s.add(row)
            s.flush()
            s.execute(delete(Assignment).where(Assignment.labeler_id == labeler_id))
            ranking_id = row.id
    except IntegrityError:
        raise Conflict(f"you have already ranked task {task_id}") from None
    return ranking_id, created


def _has_ranked(s: Session, labeler_id: int, task_id: int) -> bool:
    return s.scalar(select(RankingRow.id).where(RankingRow.task_id == task_id,
                                                RankingRow.labeler_id == labeler_id)) is not None


def skip_task(engine: Engine, labeler_id: int, task_id: int) -> None:
    """Mark a task as skipped by this labeler (idempotent); it is not offered to them again."""
    with writing(engine) as s:
        s.execute(delete(Assignment).where(Assignment.labeler_id == labeler_id))
        if s.get(Task, task_id) is None:
            raise NotFound(f"task {task_id} does not exist")
        if _has_ranked(s, labeler_id, task_id):
            raise Conflict(f"you have already ranked task {task_id}")
        if s.get(Skip, (task_id, labeler_id)) is None:
            s.add(Skip(task_id=task_id, labeler_id=labeler_id))


def progress(engine: Engine, labeler_id: int, max_labelers: int) -> dict:
    """done, skipped, and remaining = open tasks this labeler could still rank."""
    with Session(engine) as s:
        done = s.scalar(select(func.count()).select_from(RankingRow).where(RankingRow.labeler_id == labeler_id))
        skipped = s.scalar(select(func.count()).select_from(Skip).where(Skip.labeler_id == labeler_id))
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
