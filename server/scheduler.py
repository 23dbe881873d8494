"""Continuous batching: texts from many requests share running decode batches, one per engine lane.

The event loop only queues work (``submit``) and awaits futures; one worker thread per
engine lane owns that lane's running batch, and the lanes take work from one shared
queue. At every step boundary a worker drops cancelled and expired texts, admits queued
texts while its batch has room (rows = texts x beams, tokens = source tokens x beams),
runs one decoder step for the whole batch, and resolves the futures of the texts that
finished. A short text therefore never waits for a long one to finish; it waits at most
one step to join.

Admission prefers, after the oldest waiting text, texts of a similar length (same
length bucket) so that padding in the shared batch stays small; nothing waits forever
because the oldest text always goes first.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from dataclasses import dataclass, field

from decoding import DecodingParams
from server.config import ServerConfig
from server.engine.engine import Engine, TextHypothesis
from server.errors import Cancelled, DeadlineExceeded, Overloaded, ServingError, Unavailable
from server.metrics import Metrics

log = logging.getLogger("parley.scheduler")
_keys = itertools.count()


def length_bucket(tokens: int) -> int:
    """0: 1-8 tokens, 1: 9-16, 2: 17-32, ... (padding within a bucket is at most 2x)."""
    return max(0, (max(tokens, 1) - 1).bit_length() - 3)


@dataclass(eq=False)
class Row:
    """One text of one request, from queueing to its answer."""

    tokens: list[int]
    params: DecodingParams
    future: asyncio.Future
    deadline: float | None = None  # time.monotonic() after which the answer is useless
    key: int = field(default_factory=lambda: next(_keys))
    enqueued: float = field(default_factory=time.monotonic)
    answered: bool = False  # set by the worker, which answers every row exactly once
    cancelled: bool = False  # set by the caller; the worker drops the row at its next step

    @property
    def rows(self) -> int:
        return self.params.beam_size

    @property
    def cost_tokens(self) -> int:
        return (len(self.tokens) + 1) * self.params.beam_size


class Scheduler:
    def __init__(self, name: str, engine: Engine, config: ServerConfig, metrics: Metrics):
        self.name, self.engine, self.config, self.metrics = name, engine, config, metrics
        self._condition = threading.Condition()
        self._pending: list[Row] = []
        self._accepting = True
        self._stopped = False
        self._active: list[dict[int, Row]] = [{} for _ in engine.lanes]  # per lane: texts in its running batch
        self._threads = [threading.Thread(target=self._run, args=(lane,), name=f"parley-engine-{name}-{lane}",
                                          daemon=True) for lane in range(len(engine.lanes))]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    @property
    def queue_depth(self) -> int:
        return len(self._pending)

    @property
    def texts_in_flight(self) -> int:
        """Texts queued or decoding."""
        return len(self._pending) + sum(len(active) for active in self._active)

    def submit(self, rows: list[Row]) -> None:
        """Queue texts; all or none are accepted."""
        with self._condition:
            if not self._accepting:
                raise Unavailable("the server is shutting down; retry on another replica")
            if len(self._pending) + len(rows) > self.config.queue_limit:
                raise Overloaded(f"model {self.name} has {len(self._pending)} texts waiting (limit "
                                 f"{self.config.queue_limit}); retry with backoff")
            self._pending += rows
            self.metrics.queue_depth.labels(self.name).set(len(self._pending))
            self._condition.notify_all()

    def cancel(self, rows: list[Row]) -> None:
        """Stop working on these texts at the next step boundary (they are answered CANCELLED)."""
        with self._condition:
            for row in rows:
                row.cancelled = True
            self._condition.notify_all()

    def stop_accepting(self) -> None:
        with self._condition:
            self._accepting = False

    def stop(self, timeout: float = 5.0) -> None:
        """End the workers; every text still queued or running is answered UNAVAILABLE."""
        with self._condition:
            self._accepting = False
            self._stopped = True
            self._condition.notify_all()
        for thread in self._threads:
            thread.join(timeout)

    def _run(self, lane: int) -> None:
        batch = self.engine.new_search(lane)
        active = self._active[lane]
        while True:
            with self._condition:
                while not self._stopped and not self._pending and not active:
                    self._condition.wait()
                if self._stopped:
                    break
                if not active and self._pending:
                    self._wait_to_fill()
                admitted = self._take_admissible(active)
                self.metrics.queue_depth.labels(self.name).set(len(self._pending))
            try:
                self._drop(batch, active)
                if admitted:
                    self._admit(batch, active, admitted)
                if len(batch):
                    self._step(batch, active)
            except Exception as error:  # an engine failure fails the texts in the batch, not the server
                log.exception("engine step failed", extra={"model": self.name})
                for row in list(active.values()):
                    self._resolve(active, row, error=ServingError(f"engine failure: {error}"))
                batch = self.engine.new_search(lane)
        with self._condition:
            left, self._pending = list(active.values()) + self._pending, []
        for row in left:
            self._resolve(active, row, error=Unavailable("the server stopped before this text was translated"))

    def _wait_to_fill(self) -> None:
        """An idle engine waits up to max_queue_delay_ms for more texts, unless a batch is already full."""
        until = time.monotonic() + self.config.max_queue_delay_ms / 1000
        while not self._stopped and sum(r.rows for r in self._pending) < self.config.max_batch_rows:
            left = until - time.monotonic()
            if left <= 0:
                break
            self._condition.wait(left)

    def _take_admissible(self, active: dict[int, Row]) -> list[Row]:
        """Under the lock: the queued texts that fit the batch now, oldest first, then similar lengths."""
        rows_used = sum(r.rows for r in active.values())
        tokens_used = sum(r.cost_tokens for r in active.values())
        if not self._pending:
            return []
        head_bucket = length_bucket(len(self._pending[0].tokens))
        order = [self._pending[0]] + sorted(self._pending[1:],
                                            key=lambda r: length_bucket(len(r.tokens)) != head_bucket)
        admitted = []
        for row in order:
            fits = rows_used + row.rows <= self.config.max_batch_rows and \
                tokens_used + row.cost_tokens <= self.config.max_batch_tokens
            if not fits and (active or admitted):  # an empty batch always takes one text
                continue
            admitted.append(row)
            rows_used += row.rows
            tokens_used += row.cost_tokens
        taken = {id(r) for r in admitted}
        self._pending = [r for r in self._pending if id(r) not in taken]
        return admitted

    def _drop(self, batch, active: dict[int, Row]) -> None:
        """Remove cancelled and expired texts, queued or running in this lane."""
        now = time.monotonic()
        with self._condition:
            gone = [r for r in self._pending if r.cancelled or (r.deadline is not None and r.deadline <= now)]
            if gone:
                leaving = {id(r) for r in gone}
                self._pending = [r for r in self._pending if id(r) not in leaving]
        for row in gone:
            self._resolve(active, row, error=Cancelled("cancelled") if row.cancelled else
                          DeadlineExceeded("the deadline passed while the text was queued"))
        expired = {k for k, r in active.items() if r.deadline is not None and r.deadline <= now}
        cancelled = {k for k, r in active.items() if r.cancelled}
        for key in batch.cancel(cancelled | expired) if cancelled or expired else []:
            self._resolve(active, active[key], error=Cancelled("cancelled") if key in cancelled else
                          DeadlineExceeded("the deadline passed during translation"))

    def _admit(self, batch, active: dict[int, Row], rows: list[Row]) -> None:
        now = time.monotonic()
        try:
            self.engine.admit(batch, [r.key for r in rows], [r.tokens for r in rows], [r.params for r in rows])
        except Exception as error:  # these texts could not be encoded; the running batch is untouched
            log.exception("admission failed", extra={"model": self.name})
            for row in rows:
                self._resolve(active, row, error=ServingError(f"engine failure: {error}"))
            return
        for row in rows:
            active[row.key] = row
            self.metrics.queue_duration.labels(self.name).observe(now - row.enqueued)

    def _step(self, batch, active: dict[int, Row]) -> None:
        backend = batch.backend
        self.metrics.batch_size.labels(self.name).observe(backend.rows)
        self.metrics.padding_ratio.labels(self.name).observe(backend.padding_ratio)
        finished = batch.step()
        if not finished:
            return
        texts = self.engine.detokenize_many([hypotheses for _, hypotheses in finished])  # one call per step
        self.metrics.generated_tokens.labels(self.name).inc(sum(len(h[0].tokens) for _, h in finished if h))
        for (key, _), result in zip(finished, texts):
            if result:
                self._resolve(active, active[key], result=result)
            else:  # every hypothesis scored NaN or -inf: never answer with an empty translation
                self._resolve(active, active[key], error=ServingError(
                    "the model produced no finite-scored translation for this text (numerical failure)"))

    def _resolve(self, active: dict[int, Row], row: Row, result: list[TextHypothesis] | None = None,
                 error: Exception | None = None) -> None:
        """Answer a text exactly once, on its event loop."""
        active.pop(row.key, None)
        row.answered = True
        loop = row.future.get_loop()

        def settle() -> None:
            if row.future.done():
                return
            if error is not None:
                row.future.set_exception(error)
            else:
                row.future.set_result(result)

        try:
            loop.call_soon_threadsafe(settle)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass

