"""Run jobs in child processes, one per job, so that a crash in one never ends the others.

A corrupt slide can make a native library segfault; in a worker pool that breaks every job
still queued. Here each job gets its own short-lived process and a crash becomes that job's
error message.
"""

from __future__ import annotations

import multiprocessing
import signal
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Generic, TypeVar

from formats.errors import one_line

Job = TypeVar("Job")
Result = TypeVar("Result")


@dataclass(frozen=True)
class Outcome(Generic[Result]):
    """A job's result, or the one-line reason it failed."""

    result: Result | None = None
    error: str | None = None


def _child(fn: Callable[[Job], Result], job: Job, conn: Connection) -> None:
    try:
        conn.send(Outcome(result=fn(job)))
    except Exception as exc:  # every failure of a job is reported, none is fatal to the run
        conn.send(Outcome(error=one_line(exc)))
    finally:
        conn.close()


def _crash_reason(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        return f"worker process killed by {signal.Signals(-exitcode).name}"
    return f"worker process exited with code {exitcode} before reporting"


def run_isolated(fn: Callable[[Job], Result], jobs: Iterable[Job],
                 workers: int = 1) -> Iterator[tuple[Job, Outcome[Result]]]:
    """Run ``fn(job)`` for every job, at most ``workers`` at a time, each in its own process.

    Yields ``(job, outcome)`` as jobs finish. If the caller is interrupted, running children
    are sent SIGTERM (which the CLI turns into a clean exit that deletes partial files).
    """
    ctx = multiprocessing.get_context("fork")
    queue = list(jobs)
    queue.reverse()
    running: dict[Connection, tuple[multiprocessing.process.BaseProcess, Job]] = {}
    try:
        while queue or running:
            while queue and len(running) < max(1, workers):
                job = queue.pop()
                reader, writer = ctx.Pipe(duplex=False)
                process = ctx.Process(target=_child, args=(fn, job, writer))
                process.start()
                writer.close()
                running[reader] = (process, job)
            for reader in wait(list(running)):
                process, job = running.pop(reader)
                try:
                    outcome = reader.recv()
                except EOFError:
                    process.join()
                    outcome = Outcome(error=_crash_reason(process.exitcode))
                reader.close()
                process.join()
                yield job, outcome
    finally:
        for process, _ in running.values():
            process.terminate()
        for process, _ in running.values():
            process.join()
