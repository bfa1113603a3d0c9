"""Background jobs (pattern calibration) with a status a client can poll.

Jobs run one at a time on their own thread: calibration reads the checkpoint layer by layer and would
only compete with itself; serving threads are separate and keep answering meanwhile.
"""

from __future__ import annotations

import threading
import time
import traceback
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

#: a job function gets a progress callback (fraction done, 0..1) and returns a JSON-able result
JobFunction = Callable[[Callable[[float], None]], dict[str, Any]]


@dataclass
class Job:
    id: str
    kind: str
    description: str
    status: str = "queued"  # queued, running, succeeded, failed
    progress: float = 0.0
    result: dict[str, Any] | None = None
    error: str | None = None
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "job",
            "kind": self.kind,
            "description": self.description,
            "status": self.status,
            "progress": round(self.progress, 4),
            "result": self.result,
            "error": self.error,
            "created": self.created,
            "started": self.started,
            "finished": self.finished,
        }


class JobRefused(Exception):
    """A job that cannot be taken now: one for the same subject is queued or running (`busy`), or the queue
    is full."""

    def __init__(self, message: str, busy: bool) -> None:
        super().__init__(message)
        self.busy = busy


class JobRunner:
    def __init__(
        self, keep: int = 200, on_error: Callable[[Job, str], None] | None = None, max_pending: int = 8
    ) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="taskmoe-job")
        self._jobs: dict[str, Job] = {}
        self._subjects: dict[str, str] = {}  # subject -> id of its queued or running job
        self._lock = threading.Lock()
        self._keep = keep
        self._on_error = on_error
        self.max_pending = max_pending

    def submit(self, kind: str, description: str, function: JobFunction, subject: str | None = None) -> Job:
        """Queue a job. With a `subject` (a pattern name), a second job for it while the first is queued or
        running is refused; so is any job when `max_pending` are queued or running."""
        job = Job(id=f"job-{uuid.uuid4().hex[:16]}", kind=kind, description=description)
        with self._lock:
            pending = [j for j in self._jobs.values() if j.finished is None]
            if subject is not None and subject in self._subjects:
                other = self._jobs[self._subjects[subject]]
                raise JobRefused(f"job {other.id} for {subject!r} is still {other.status}", busy=True)
            if len(pending) >= self.max_pending:
                raise JobRefused(f"{len(pending)} jobs are queued or running, the most this server takes", busy=False)
            if subject is not None:
                self._subjects[subject] = job.id
            self._jobs[job.id] = job
            finished = [j for j in self._jobs.values() if j.finished is not None]
            for old in sorted(finished, key=lambda j: j.finished or 0)[: max(0, len(self._jobs) - self._keep)]:
                del self._jobs[old.id]
        self._executor.submit(self._run, job, function, subject)
        return job

    def _run(self, job: Job, function: JobFunction, subject: str | None = None) -> None:
        job.status, job.started = "running", time.time()

        def progress(fraction: float) -> None:
            job.progress = min(1.0, max(0.0, fraction))

        try:
            job.result = function(progress)
            job.status, job.progress = "succeeded", 1.0
        except Exception as error:  # a job's failure is its status, not a crash of the server
            job.status, job.error = "failed", str(error) or type(error).__name__
            if self._on_error is not None:
                self._on_error(job, traceback.format_exc())
        finally:
            job.finished = time.time()
            with self._lock:
                if subject is not None and self._subjects.get(subject) == job.id:
                    del self._subjects[subject]

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            return self._jobs.get(job_id)

    def list(self) -> list[Job]:
        with self._lock:
            return sorted(self._jobs.values(), key=lambda j: j.created, reverse=True)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
