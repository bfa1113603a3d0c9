"""The job runner: one job per subject at a time, and a bounded queue."""

from __future__ import annotations

import threading

import pytest

from server.jobs import JobRefused, JobRunner


def test_one_job_per_subject_and_a_bounded_queue() -> None:
    release = threading.Event()
    runner = JobRunner(max_pending=2)

    def blocked(progress):
        release.wait(10)
        return {}

    first = runner.submit("calibrate", "a", blocked, subject="a")
    with pytest.raises(JobRefused) as same:
        runner.submit("calibrate", "a again", blocked, subject="a")
    assert same.value.busy
    runner.submit("calibrate", "b", blocked, subject="b")
    with pytest.raises(JobRefused) as full:
        runner.submit("calibrate", "c", blocked, subject="c")
    assert not full.value.busy
    release.set()
    for _ in range(100):
        if runner.get(first.id).finished:
            break
        threading.Event().wait(0.05)
    assert runner.get(first.id).status == "succeeded"
    again = runner.submit("calibrate", "a once more", lambda progress: {}, subject="a")
    assert again.status in ("queued", "running", "succeeded")
    runner.shutdown()
