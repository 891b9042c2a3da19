"""The job table in SQLite (WAL; the service process is its one writer)."""

from __future__ import annotations

import json
import sqlite3
import time
import uuid
from pathlib import Path

STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    seq INTEGER NOT NULL,
    api_key TEXT,
    idempotency_key TEXT,
    status TEXT NOT NULL,
    settings TEXT NOT NULL,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    error TEXT,
    progress TEXT,
    report TEXT,
    runs INTEGER NOT NULL DEFAULT 0
);
CREATE UNIQUE INDEX IF NOT EXISTS jobs_idempotency ON jobs (api_key, idempotency_key);
"""


class JobStore:
    """Jobs by id, first come first served; JSON columns are decoded on the way out."""

    def __init__(self, path: Path) -> None:
        self.db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(SCHEMA)

    def submit(self, settings: dict, api_key: str | None, idempotency_key: str | None) -> tuple[dict, bool]:
        """Queue a job (or return the one this key and Idempotency-Key already made); True when new."""
        if idempotency_key is not None:
            found = self.get_by_idempotency(api_key, idempotency_key)
            if found is not None:
                return found, False
        seq = self.db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM jobs").fetchone()[0]
        job_id = uuid.uuid4().hex[:16]
        self.db.execute(
            "INSERT INTO jobs (id, seq, api_key, idempotency_key, status, settings, created) VALUES (?,?,?,?,?,?,?)",
            (job_id, seq, api_key, idempotency_key, "queued", json.dumps(settings), time.time()),
        )
        return self.get(job_id), True

    def get_by_idempotency(self, api_key: str | None, idempotency_key: str) -> dict | None:
        row = self.db.execute(
            "SELECT * FROM jobs WHERE api_key IS ? AND idempotency_key = ?", (api_key, idempotency_key)
        ).fetchone()
        return self._decode(row) if row is not None else None

    def set_output(self, job_id: str, output: str) -> None:
        settings = self.get(job_id)["settings"]
        settings = json.dumps({**settings, "output": output})
        self.db.execute("UPDATE jobs SET settings = ? WHERE id = ?", (settings, job_id))

    def get(self, job_id: str) -> dict | None:
        row = self.db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return self._decode(row) if row is not None else None

    def list(self, status: str | None = None) -> list[dict]:
        query, args = "SELECT * FROM jobs ORDER BY seq", ()
        if status is not None:
            query, args = "SELECT * FROM jobs WHERE status = ? ORDER BY seq", (status,)
        return [self._decode(row) for row in self.db.execute(query, args).fetchall()]

    def queued_for(self, api_key: str | None) -> int:
        query = "SELECT COUNT(*) FROM jobs WHERE status = 'queued' AND api_key IS ?"
        return self.db.execute(query, (api_key,)).fetchone()[0]

    def start(self, job_id: str) -> None:
        self.db.execute(
            "UPDATE jobs SET status = 'running', started = COALESCE(started, ?), runs = runs + 1 WHERE id = ?",
            (time.time(), job_id),
        )

    def progress(self, job_id: str, progress: dict) -> None:
        self.db.execute("UPDATE jobs SET progress = ? WHERE id = ?", (json.dumps(progress), job_id))

    def finish(self, job_id: str, status: str, error: str | None = None, report: dict | None = None) -> None:
        assert status in TERMINAL
        self.db.execute(
            "UPDATE jobs SET status = ?, finished = ?, error = ?, report = ? WHERE id = ?",
            (status, time.time(), error, json.dumps(report) if report is not None else None, job_id),
        )

    @staticmethod
    def _decode(row: sqlite3.Row) -> dict:
        job = dict(row)
        for key in ("settings", "progress", "report"):
            job[key] = json.loads(job[key]) if job[key] is not None else None
        return job
