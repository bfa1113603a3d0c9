"""The entry point of a completion: an `Ask` in, a started generation (or a plan for an upstream) out.

One worker thread takes the request the whole way down and back: plan it (check, resolve, tokenize:
`server.plan`), lease what serves it (`server.leases`), decode (`server.decoding`), release. The event loop
waits only until the lease is held, so that a refusal (404, 503, ...) is still an HTTP status, and then
streams the deltas the worker hands it through a queue. A client that goes away sets the cancel flag and
the worker stops at the next token.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, replace
from typing import Any

from server.decoding import decode
from server.engine import Delta, Generation
from server.errors import PatternDamaged, PatternNotFound
from server.leases import Lease, LeaseManager
from server.metrics import Metrics
from server.model_info import ModelInfo
from server.plan import Ask, Plan, plan
from server.resolver import Choice, Resolver

log = logging.getLogger("taskmoe.completions")

Event = tuple[str, Any]
"""("delta", (position, Delta)), ("done", Answer) or ("error", exception)."""


@dataclass(frozen=True)
class Answer:
    """What a finished request produced, small enough to cross a process: each choice's (text,
    finish_reason) in response order, and the completion tokens."""

    texts: tuple[tuple[str, str | None], ...]
    completion_tokens: int

    @classmethod
    def of(cls, generations: Sequence[Generation]) -> Answer:
        return cls(
            tuple((choice.text, choice.finish_reason) for generation in generations for choice in generation.choices),
            sum(generation.completion_tokens for generation in generations),
        )


StoreChanged = Callable[[Choice], Choice]
"""What serves a routed choice whose patterns left the store before it was leased (`Resolver.store_changed`)."""


def lease(planned: Plan, leases: LeaseManager, model_name: str, store_changed: StoreChanged) -> tuple[Plan, Lease]:
    """The lease of what serves `planned`, and the plan it serves: a routed request whose patterns were
    removed (or found damaged) since routing is served by `store_changed`'s choice, never refused for
    patterns its client did not name."""
    try:
        return planned, leases.acquire(planned.choice)
    except (PatternNotFound, PatternDamaged):
        if not planned.choice.routed:
            raise
    choice = store_changed(planned.choice)
    log.info("routed to %s, which left the store before it was leased: served by %s", choice.replaced, choice.label)
    planned = replace(planned, choice=choice, model_id=choice.served_id(model_name))
    return planned, leases.acquire(choice)


def execute(
    planned: Plan,
    leases: LeaseManager,
    info: ModelInfo,
    metrics: Metrics,
    cancel: threading.Event,
    store_changed: StoreChanged,
    emit: Callable[[int, Delta], None] | None = None,
    on_leased: Callable[[Plan], None] = lambda served: None,
) -> Answer:
    """Lease what serves `planned`, decode it, release: the model work of one request, on this thread
    (`on_leased` is called with the plan served once the lease is held; a refusal raises before it)."""
    planned, held = lease(planned, leases, info.name, store_changed)
    on_leased(planned)
    metrics.active.inc()
    try:
        return Answer.of(decode(planned, held, info, metrics, cancel, emit))
    finally:
        metrics.active.dec()
        held.release()


@dataclass
class Started:
    """A generation under way (or, when `plan.upstream`, nothing started: another server answers)."""

    plan: Plan
    done: asyncio.Future[Answer]
    cancel: threading.Event
    events: asyncio.Queue[Event] | None = None  # streamed requests only

    async def answer(self) -> Answer:
        return await self.done

    async def stream(self) -> AsyncIterator[Event]:
        """The deltas as they come, then ("done", Answer) or ("error", exception); the generation is
        cancelled when the consumer stops early (the client went away)."""
        assert self.events is not None
        try:
            while True:
                event = await self.events.get()
                yield event
                if event[0] != "delta":
                    return
        finally:
            self.cancel.set()


def _settle(future: asyncio.Future[Any], value: Any = None, error: BaseException | None = None) -> None:
    """Settle `future` on the event loop (scheduled from a worker thread); a cancelled one is left be."""
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(value)


class Completions:
    """Plans, leases and decodes completion requests for one model."""

    def __init__(
        self,
        info: ModelInfo,
        resolver: Resolver,
        leases: LeaseManager,
        metrics: Metrics,
        executor: Executor,
        max_n: int,
        upstream: Sequence[str] = (),
    ) -> None:
        self.info, self.resolver, self.leases, self.metrics = info, resolver, leases, metrics
        self.executor, self.max_n, self.upstream = executor, max_n, tuple(upstream)

    def plan(self, ask: Ask) -> Plan:
        return plan(ask, self.info, self.resolver, self.max_n, self.upstream)

    def run(
        self,
        ask: Ask,
        cancel: threading.Event,
        emit: Callable[[int, Delta], None] | None = None,
        ready: Callable[[Plan | None, BaseException | None], None] = lambda plan, error: None,
    ) -> Answer:
        """One request on the calling thread: plan, lease, decode, release. `ready(plan, None)` is called
        once the lease is held (or the plan is an upstream's), `ready(None, error)` when it is refused."""
        try:
            planned = self.plan(ask)
            if planned.upstream:
                ready(planned, None)
                return Answer((), 0)
            return execute(
                planned,
                self.leases,
                self.info,
                self.metrics,
                cancel,
                self.resolver.store_changed,
                emit,
                lambda served: ready(served, None),
            )
        except BaseException as error:
            ready(None, error)  # ignored once the lease was held: the future is settled
            raise

    async def start(self, ask: Ask, stream: bool) -> Started:
        """Start `ask` on a worker thread and return once it holds its lease (a refusal is raised here)."""
        loop = asyncio.get_running_loop()
        leased: asyncio.Future[Plan] = loop.create_future()
        cancel = threading.Event()
        events: asyncio.Queue[Event] | None = asyncio.Queue() if stream else None  # unbounded: never waits

        def emit(position: int, delta: Delta) -> None:  # on the decoding thread
            loop.call_soon_threadsafe(events.put_nowait, ("delta", (position, delta)))  # type: ignore[union-attr]

        def ready(planned: Plan | None, error: BaseException | None) -> None:
            loop.call_soon_threadsafe(_settle, leased, planned, error)

        done = loop.run_in_executor(self.executor, self.run, ask, cancel, emit if stream else None, ready)
        try:
            planned = await leased
        except asyncio.CancelledError:
            cancel.set()  # the handler went away while waiting: the work ends at its first token
            raise
        except BaseException:
            done.add_done_callback(lambda future: future.cancelled() or future.exception())  # reported once: here
            raise
        if events is not None:
            done.add_done_callback(lambda future: _finish(future, events))
        return Started(planned, done, cancel, events)


def _finish(future: asyncio.Future[Answer], events: asyncio.Queue[Event]) -> None:
    if future.cancelled():
        return
    error = future.exception()
    if error is not None:
        log.error("generation failed", exc_info=error)
    events.put_nowait(("error", error) if error is not None else ("done", future.result()))
