"""JobStore: the server's jobs and results in one SQLite file, the only authoritative state.

Every process that serves (one `ldm serve`, or several Ray replicas) opens the same file; no
in-memory copy is trusted. A job moves QUEUED -> RUNNING -> DONE | FAILED | CANCELLED, each move
one transaction. A worker claims jobs under a lease (lease_until) that it renews while it works;
a job whose lease ran out (its worker was killed or hung) goes back to QUEUED and runs again with
the same seeds, so it makes the same images.

Durability: WAL with synchronous=FULL, so a commit is fsynced before it returns. A submit that
returned has been promised to a client; with NORMAL a power cut could lose it (a killed process
cannot: the WAL is in the OS's hands). The other writes are cheap enough to fsync too (progress is
throttled by the worker).
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

# A writer that waits longer than this for another process's write lock fails (never forever).
BUSY_TIMEOUT_MS = 30_000
# Finished jobs' durations that QueueFull's retry estimate averages.
RECENT_JOBS = 20


class JobState(str, enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def final(self) -> bool:
        return self in FINAL_STATES


FINAL_STATES = frozenset({JobState.DONE, JobState.FAILED, JobState.CANCELLED})


@dataclass(frozen=True)
class JobView:
    """A snapshot of one job, safe to hand to any thread or serialise."""

    id: str                         # uuid4 hex
    state: JobState
    mode: str                       # request.mode
    model: str                      # model name
    num_images: int
    request: dict                   # request_to_json(request): seeds resolved
    created: float                  # unix times
    started: float | None
    finished: float | None
    step: int                       # steps done / in all, over every pass of the running job
    total: int
    error: str | None               # one line, for FAILED
    outputs: tuple[str, ...]        # absolute paths of the PNGs, for DONE
    infos: tuple[str, ...]          # each PNG's A1111 `parameters` text
    seeds: tuple[int, ...]
    preview: bytes | None           # the latest preview PNG while RUNNING
    queue_position: int | None      # 0 = next, for QUEUED
    worker: str | None              # host:pid:thread of the worker that runs / ran it
    attempts: int                   # times claimed (> 1: re-queued after a dead worker)

    def to_json(self) -> dict:
        """JSON-safe: no image bytes but the preview (base64); outputs relative to out_dir
        (<job id>/<k>.png), so no server path is shown to a client."""
        import base64

        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["state"] = self.state.value
        out["outputs"] = [f"{self.id}/{Path(p).name}" for p in self.outputs]
        out["infos"] = list(self.infos)
        out["seeds"] = list(self.seeds)
        out["preview"] = (base64.b64encode(self.preview).decode("ascii")
                          if self.preview is not None else None)
        return out


@dataclass(frozen=True)
class Claim:
    """One job of a claimed batch: what a worker needs to run it."""

    id: str
    model: str
    num_images: int
    request: dict
    attempts: int


SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,   -- submission order (created can tie)
    id TEXT NOT NULL UNIQUE,
    state TEXT NOT NULL,
    mode TEXT NOT NULL,
    model TEXT NOT NULL,
    num_images INTEGER NOT NULL,
    images INTEGER NOT NULL,                 -- images the job makes (frames for sequences)
    request_json TEXT NOT NULL,
    batch_key TEXT NOT NULL,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    step INTEGER NOT NULL DEFAULT 0,
    total INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    outputs_json TEXT NOT NULL DEFAULT '[]', -- file names relative to out_dir
    infos_json TEXT NOT NULL DEFAULT '[]',
    seeds_json TEXT NOT NULL DEFAULT '[]',
    preview BLOB,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    worker_id TEXT,
    lease_until REAL,
    attempts INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS jobs_queue ON jobs (state, batch_key, seq);
"""

# What a view reads (request_json is parsed; preview only kept while running).
_VIEW_COLUMNS = ("id, state, mode, model, num_images, request_json, created, started, finished, "
                 "step, total, error, outputs_json, infos_json, seeds_json, preview, worker_id, "
                 "attempts, seq")


class QueueFullError(Exception):
    """Raised by insert when `limit` jobs already wait (the service turns it into QueueFull)."""

    def __init__(self, depth: int):
        super().__init__(f"{depth} jobs are queued")
        self.depth = depth


def batch_key(request_json: dict, shared_json: dict, model: str) -> str:
    """Which queued jobs may share one Pipeline.run batch: a digest of the model and the
    request's JSON form without what a batch lets differ (Mode.shared: prompts, seed, a
    sequence's per-image fields). Images that Mode.shared would let differ are kept in the key
    through the request's own image hashes: equal images, equal sizes, nothing to reason about."""
    hashes = {k: request_json.get(k, "") for k in ("init_image_hash", "mask_hash",
                                                   "end_image_hash")}
    text = json.dumps({"model": model, "shared": shared_json, "images": hashes},
                      sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


class JobStore:
    """The jobs table of one SQLite file; one connection per thread, every method atomic."""

    def __init__(self, path: str | Path, *, out_dir: str | Path):
        self.path = Path(path)
        self.out_dir = Path(out_dir)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._all_lock = threading.Lock()
        # executescript commits on its own; CREATE ... IF NOT EXISTS makes it safe to race.
        self._db().executescript(SCHEMA)

    # --- connections ----------------------------------------------------------------------

    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            # isolation_level=None: no implicit transactions; writes say BEGIN IMMEDIATE, so a
            # read-then-write (claim, insert under the queue limit) holds the write lock
            # throughout and two processes can never claim the same job.
            db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000,
                                 isolation_level=None, check_same_thread=False)
            db.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            self._local.db = db
            with self._all_lock:
                self._all.append(db)
        return db

    class _Tx:
        def __init__(self, db: sqlite3.Connection):
            self.db = db

        def __enter__(self) -> sqlite3.Connection:
            self.db.execute("BEGIN IMMEDIATE")
            return self.db

        def __exit__(self, kind, value, tb) -> None:
            self.db.execute("COMMIT" if kind is None else "ROLLBACK")

    def _write(self) -> "JobStore._Tx":
        return JobStore._Tx(self._db())

    def close(self) -> None:
        with self._all_lock:
            for db in self._all:
                try:
                    db.close()
                except sqlite3.Error:
                    pass
            self._all.clear()
        self._local = threading.local()

    # --- submitting and reading -----------------------------------------------------------

    def insert(self, *, mode: str, model: str, num_images: int, images: int, request: dict,
               key: str, limit: int | None = None, now: float | None = None) -> str:
        """A new QUEUED job (durable on return); QueueFullError when `limit` jobs wait."""
        job_id = uuid.uuid4().hex
        with self._write() as db:
            if limit is not None:
                (depth,) = db.execute("SELECT COUNT(*) FROM jobs WHERE state = ?",
                                      (JobState.QUEUED.value,)).fetchone()
                if depth >= limit:
                    raise QueueFullError(depth)
            db.execute("INSERT INTO jobs (id, state, mode, model, num_images, images, "
                       "request_json, batch_key, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       (job_id, JobState.QUEUED.value, mode, model, num_images, images,
                        json.dumps(request), key, time.time() if now is None else now))
        return job_id

    def get(self, job_id: str) -> JobView | None:
        if not isinstance(job_id, str):
            return None
        row = self._db().execute(f"SELECT {_VIEW_COLUMNS} FROM jobs WHERE id = ?",
                                 (job_id,)).fetchone()
        return None if row is None else self._view(row)

    def state(self, job_id: str) -> JobState | None:
        """Only the state (no JSON parsing): for pollers."""
        row = self._db().execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return None if row is None else JobState(row[0])

    def list(self, state: JobState | None = None, limit: int = 100) -> list[JobView]:
        """The newest `limit` jobs (of one state), newest first."""
        if state is None:
            rows = self._db().execute(f"SELECT {_VIEW_COLUMNS} FROM jobs ORDER BY seq DESC "
                                      "LIMIT ?", (limit,)).fetchall()
        else:
            rows = self._db().execute(f"SELECT {_VIEW_COLUMNS} FROM jobs WHERE state = ? "
                                      "ORDER BY seq DESC LIMIT ?",
                                      (JobState(state).value, limit)).fetchall()
        return [self._view(r) for r in rows]

    def _view(self, row: tuple) -> JobView:
        (job_id, state, mode, model, num_images, request_json, created, started, finished, step,
         total, error, outputs, infos, seeds, preview, worker, attempts, seq) = row
        state = JobState(state)
        position = None
        if state is JobState.QUEUED:
            (position,) = self._db().execute(
                "SELECT COUNT(*) FROM jobs WHERE state = ? AND seq < ?",
                (JobState.QUEUED.value, seq)).fetchone()
        return JobView(
            id=job_id, state=state, mode=mode, model=model, num_images=num_images,
            request=json.loads(request_json), created=created, started=started,
            finished=finished, step=step, total=total, error=error,
            outputs=tuple(str(self.out_dir / p) for p in json.loads(outputs)),
            infos=tuple(json.loads(infos)), seeds=tuple(json.loads(seeds)),
            preview=bytes(preview) if preview is not None and state is JobState.RUNNING
            else None,
            queue_position=position, worker=worker, attempts=attempts)

    def counts(self) -> dict[str, int]:
        """Jobs per state (every state present, 0 when none)."""
        out = {s.value: 0 for s in JobState}
        for state, n in self._db().execute("SELECT state, COUNT(*) FROM jobs GROUP BY state"):
            out[state] = n
        return out

    def queue_depth(self) -> int:
        (n,) = self._db().execute("SELECT COUNT(*) FROM jobs WHERE state = ?",
                                  (JobState.QUEUED.value,)).fetchone()
        return n

    def recent_durations(self, n: int = RECENT_JOBS) -> list[float]:
        """Run times (finished - started) of the last n DONE jobs, newest first."""
        rows = self._db().execute("SELECT finished - started FROM jobs WHERE state = ? AND "
                                  "started IS NOT NULL ORDER BY finished DESC LIMIT ?",
                                  (JobState.DONE.value, n)).fetchall()
        return [r[0] for r in rows]

    def images_done(self) -> int:
        (n,) = self._db().execute("SELECT COALESCE(SUM(images), 0) FROM jobs WHERE state = ?",
                                  (JobState.DONE.value,)).fetchone()
        return n

    # --- workers --------------------------------------------------------------------------

    def claim_batch(self, worker_id: str, *, max_images: int, lease_seconds: float,
                    models: Iterable[str] | None = None, now: float | None = None
                    ) -> list[Claim]:
        """The oldest QUEUED job (of the given models) and, while their images fit max_images,
        the next QUEUED jobs with its batch key, all marked RUNNING under worker_id's lease.
        One BEGIN IMMEDIATE transaction: no other worker, in any process, gets them. A job
        larger than max_images alone is still claimed (alone)."""
        now = time.time() if now is None else now
        with self._write() as db:
            where, args = "state = ?", [JobState.QUEUED.value]
            if models is not None:
                names = list(models)
                where += f" AND model IN ({','.join('?' * len(names))})"
                args += names
            first = db.execute(f"SELECT seq, batch_key FROM jobs WHERE {where} ORDER BY seq "
                               "LIMIT 1", args).fetchone()
            if first is None:
                return []
            rows = db.execute("SELECT seq, id, model, num_images, images, request_json, attempts "
                              "FROM jobs WHERE state = ? AND batch_key = ? AND seq >= ? "
                              "ORDER BY seq LIMIT ?",
                              (JobState.QUEUED.value, first[1], first[0], max_images)).fetchall()
            taken, count = [], 0
            for seq, job_id, model, num_images, images, request_json, attempts in rows:
                if taken and count + images > max_images:
                    break
                taken.append(Claim(job_id, model, num_images, json.loads(request_json),
                                   attempts + 1))
                count += images
            db.executemany("UPDATE jobs SET state = ?, worker_id = ?, lease_until = ?, "
                           "started = ?, step = 0, total = 0, preview = NULL, "
                           "attempts = attempts + 1 WHERE id = ?",
                           [(JobState.RUNNING.value, worker_id, now + lease_seconds, now, c.id)
                            for c in taken])
        return taken

    def renew(self, worker_id: str, lease_seconds: float, now: float | None = None) -> int:
        """Extend the lease of every job worker_id runs; returns how many it still holds."""
        now = time.time() if now is None else now
        with self._write() as db:
            return db.execute("UPDATE jobs SET lease_until = ? WHERE worker_id = ? AND state = ?",
                              (now + lease_seconds, worker_id, JobState.RUNNING.value)).rowcount

    def progress(self, job_ids: Sequence[str], worker_id: str, step: int, total: int,
                 previews: dict[str, bytes] | None = None) -> None:
        """Steps done / in all for running jobs (and their latest preview PNGs)."""
        with self._write() as db:
            db.executemany("UPDATE jobs SET step = ?, total = ? WHERE id = ? AND worker_id = ? "
                           "AND state = ?", [(step, total, j, worker_id, JobState.RUNNING.value)
                                             for j in job_ids])
            for j, png in (previews or {}).items():
                db.execute("UPDATE jobs SET preview = ? WHERE id = ? AND worker_id = ? AND "
                           "state = ?", (png, j, worker_id, JobState.RUNNING.value))

    def finish(self, job_id: str, worker_id: str, *, outputs: Sequence[str],
               infos: Sequence[str], seeds: Sequence[int], now: float | None = None) -> bool:
        """RUNNING -> DONE with its outputs (names relative to out_dir, already written).
        False when the job is no longer this worker's (its lease expired and it was re-queued,
        or it was cancelled): nothing changes."""
        now = time.time() if now is None else now
        with self._write() as db:
            return db.execute(
                "UPDATE jobs SET state = ?, finished = ?, outputs_json = ?, infos_json = ?, "
                "seeds_json = ?, preview = NULL, step = total, lease_until = NULL "
                "WHERE id = ? AND worker_id = ? AND state = ?",
                (JobState.DONE.value, now, json.dumps(list(outputs)), json.dumps(list(infos)),
                 json.dumps(list(seeds)), job_id, worker_id, JobState.RUNNING.value)).rowcount == 1

    def end(self, job_ids: Sequence[str], worker_id: str, state: JobState,
            error: str | None = None, now: float | None = None) -> list[str]:
        """Running jobs of worker_id -> FAILED or CANCELLED; returns the ids changed."""
        if state not in (JobState.FAILED, JobState.CANCELLED):
            raise ValueError(f"end() sets failed or cancelled, not {state}")
        now = time.time() if now is None else now
        changed = []
        with self._write() as db:
            for j in job_ids:
                if db.execute("UPDATE jobs SET state = ?, finished = ?, error = ?, preview = NULL, "
                              "lease_until = NULL WHERE id = ? AND worker_id = ? AND state = ?",
                              (state.value, now, error, j, worker_id,
                               JobState.RUNNING.value)).rowcount:
                    changed.append(j)
        return changed

    def fail(self, job_ids: Sequence[str], worker_id: str, error: str) -> list[str]:
        return self.end(job_ids, worker_id, JobState.FAILED, error)

    def release(self, job_ids: Sequence[str], worker_id: str) -> list[str]:
        """Running jobs of a worker that is stopping -> QUEUED again (to run elsewhere or at
        the next start), as if their lease had expired."""
        changed = []
        with self._write() as db:
            for j in job_ids:
                if db.execute("UPDATE jobs SET state = ?, worker_id = NULL, lease_until = NULL, "
                              "step = 0, total = 0, preview = NULL WHERE id = ? AND "
                              "worker_id = ? AND state = ?",
                              (JobState.QUEUED.value, j, worker_id,
                               JobState.RUNNING.value)).rowcount:
                    changed.append(j)
        return changed

    def request_cancel(self, job_id: str, now: float | None = None) -> JobState | None:
        """A QUEUED job is CANCELLED at once; a RUNNING one is marked for its worker, which
        stops it at its next step. Returns the job's state after, None if there is no such job."""
        now = time.time() if now is None else now
        with self._write() as db:
            row = db.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                return None
            state = JobState(row[0])
            if state is JobState.QUEUED:
                db.execute("UPDATE jobs SET state = ?, finished = ?, cancel_requested = 1 "
                           "WHERE id = ?", (JobState.CANCELLED.value, now, job_id))
                return JobState.CANCELLED
            if state is JobState.RUNNING:
                db.execute("UPDATE jobs SET cancel_requested = 1 WHERE id = ?", (job_id,))
            return state

    def cancel_running(self) -> list[str]:
        """Mark every RUNNING job for cancellation (A1111's /interrupt); returns their ids."""
        with self._write() as db:
            ids = [r[0] for r in db.execute("SELECT id FROM jobs WHERE state = ? AND "
                                            "cancel_requested = 0", (JobState.RUNNING.value,))]
            db.execute("UPDATE jobs SET cancel_requested = 1 WHERE state = ?",
                       (JobState.RUNNING.value,))
        return ids

    def cancelled_ids(self, job_ids: Sequence[str]) -> set[str]:
        """Which of these jobs a client asked to cancel."""
        if not job_ids:
            return set()
        rows = self._db().execute(f"SELECT id FROM jobs WHERE cancel_requested = 1 AND id IN "
                                  f"({','.join('?' * len(job_ids))})", list(job_ids)).fetchall()
        return {r[0] for r in rows}

    def requeue_expired(self, now: float | None = None) -> list[str]:
        """RUNNING jobs whose lease ran out -> QUEUED (their worker is dead or hung); a job a
        client asked to cancel is CANCELLED instead."""
        now = time.time() if now is None else now
        return self._requeue("lease_until < ?", (now,), now)

    def requeue_all_running(self, now: float | None = None) -> list[str]:
        """Every RUNNING job -> QUEUED: for a single server starting, whose previous process
        is gone, so no running job has a live worker."""
        return self._requeue("1", (), time.time() if now is None else now)

    def requeue_workers(self, worker_ids: Iterable[str], now: float | None = None) -> list[str]:
        """RUNNING jobs of these (known dead) workers -> QUEUED."""
        ids = list(worker_ids)
        if not ids:
            return []
        return self._requeue(f"worker_id IN ({','.join('?' * len(ids))})", tuple(ids),
                             time.time() if now is None else now)

    def running_workers(self) -> set[str]:
        return {r[0] for r in self._db().execute(
            "SELECT DISTINCT worker_id FROM jobs WHERE state = ? AND worker_id IS NOT NULL",
            (JobState.RUNNING.value,))}

    def _requeue(self, condition: str, args: tuple, now: float) -> list[str]:
        with self._write() as db:
            rows = db.execute(f"SELECT id, cancel_requested FROM jobs WHERE state = ? AND "
                              f"{condition}", (JobState.RUNNING.value, *args)).fetchall()
            for job_id, cancel in rows:
                if cancel:
                    db.execute("UPDATE jobs SET state = ?, finished = ?, preview = NULL, "
                               "lease_until = NULL WHERE id = ?",
                               (JobState.CANCELLED.value, now, job_id))
                else:
                    db.execute("UPDATE jobs SET state = ?, worker_id = NULL, lease_until = NULL, "
                               "step = 0, total = 0, preview = NULL WHERE id = ?",
                               (JobState.QUEUED.value, job_id))
        return [r[0] for r in rows if not r[1]]


def one_line(text: str, limit: int = 500) -> str:
    """An error message as one line of at most `limit` characters."""
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[:limit - 3] + "..."

