"""Continuous batching: texts from many requests share one running decode batch per model.

The event loop only queues work (``submit``) and awaits futures; one worker thread per
model owns the engine. At every step boundary the worker drops cancelled and expired
texts, admits queued texts while the batch has room (rows = texts x beams, tokens =
source tokens x beams), runs one decoder step for the whole batch, and resolves the
futures of the texts that finished. A short text therefore never waits for a long one
to finish; it waits at most one step to join.

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
        self._cancelled: set[int] = set()
        self._accepting = True
        self._stopped = False
        self._active: dict[int, Row] = {}
        self._thread = threading.Thread(target=self._run, name=f"parley-engine-{name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def queue_depth(self) -> int:
        return len(self._pending)

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
            self._condition.notify()

    def cancel(self, keys: set[int]) -> None:
        """Stop working on these texts at the next step boundary (their futures are then cancelled)."""
        with self._condition:
            self._cancelled |= keys
            self._condition.notify()

    def stop_accepting(self) -> None:
        with self._condition:
            self._accepting = False

    def stop(self, timeout: float = 5.0) -> None:
        """End the worker; every text still queued or running is answered UNAVAILABLE."""
        with self._condition:
            self._accepting = False
            self._stopped = True
            self._condition.notify()
        self._thread.join(timeout)

    def _run(self) -> None:
        batch = self.engine.new_search()
        while True:
            with self._condition:
                while not self._stopped and not self._pending and not self._active and not self._cancelled:
                    self._condition.wait()
                if self._stopped:
                    break
                if not self._active and self._pending:
                    self._wait_to_fill()
                cancelled, self._cancelled = self._cancelled, set()
                admitted = self._take_admissible()
                self.metrics.queue_depth.labels(self.name).set(len(self._pending))
            try:
                self._drop(batch, cancelled)
                if admitted:
                    self._admit(batch, admitted)
                if len(batch):
                    self._step(batch)
            except Exception as error:  # an engine failure fails the texts in the batch, not the server
                log.exception("engine step failed", extra={"model": self.name})
                for row in list(self._active.values()):
                    self._resolve(row, error=ServingError(f"engine failure: {error}"))
                batch = self.engine.new_search()
        for row in list(self._active.values()) + self._pending:
            self._resolve(row, error=Unavailable("the server stopped before this text was translated"))
        self._pending = []

    def _wait_to_fill(self) -> None:
        """An idle engine waits up to max_queue_delay_ms for more texts, unless a batch is already full."""
        until = time.monotonic() + self.config.max_queue_delay_ms / 1000
        while not self._stopped and sum(r.rows for r in self._pending) < self.config.max_batch_rows:
            left = until - time.monotonic()
            if left <= 0:
                break
            self._condition.wait(left)

    def _take_admissible(self) -> list[Row]:
        """Under the lock: the queued texts that fit the batch now, oldest first, then similar lengths."""
        rows_used = sum(r.rows for r in self._active.values())
        tokens_used = sum(r.cost_tokens for r in self._active.values())
        if not self._pending:
            return []
        head_bucket = length_bucket(len(self._pending[0].tokens))
        order = [self._pending[0]] + sorted(self._pending[1:],
                                            key=lambda r: length_bucket(len(r.tokens)) != head_bucket)
        admitted = []
        for row in order:
            fits = rows_used + row.rows <= self.config.max_batch_rows and \
                tokens_used + row.cost_tokens <= self.config.max_batch_tokens
            if not fits and (self._active or admitted):  # an empty batch always takes one text
                continue
            admitted.append(row)
            rows_used += row.rows
            tokens_used += row.cost_tokens
        taken = {id(r) for r in admitted}
        self._pending = [r for r in self._pending if id(r) not in taken]
        return admitted

    def _drop(self, batch, cancelled: set[int]) -> None:
        """Remove cancelled and expired texts, queued or running."""
        now = time.monotonic()
        expired = {k for k, r in self._active.items() if r.deadline is not None and r.deadline <= now}
        with self._condition:
            for row in self._pending:
                if row.key in cancelled or (row.deadline is not None and row.deadline <= now):
                    self._resolve(row, error=Cancelled("cancelled") if row.key in cancelled else
                                  DeadlineExceeded("the deadline passed while the text was queued"))
            self._pending = [r for r in self._pending if not r.answered]
        gone = batch.cancel((cancelled | expired) & self._active.keys())
        for key in gone:
            self._resolve(self._active[key], error=DeadlineExceeded("the deadline passed during translation")
                          if key in expired else Cancelled("cancelled"))

    def _admit(self, batch, rows: list[Row]) -> None:
        now = time.monotonic()
        rows = sorted(rows, key=lambda r: len(r.tokens))  # one encoder run; sorted keeps its padding low
        try:
            self.engine.admit(batch, [r.key for r in rows], [r.tokens for r in rows], [r.params for r in rows])
        except Exception as error:  # these texts could not be encoded; the running batch is untouched
            log.exception("admission failed", extra={"model": self.name})
            for row in rows:
                self._resolve(row, error=ServingError(f"engine failure: {error}"))
            return
        for row in rows:
            self._active[row.key] = row
            self.metrics.queue_duration.labels(self.name).observe(now - row.enqueued)

    def _step(self, batch) -> None:
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
                self._resolve(self._active[key], result=result)
            else:  # every hypothesis scored NaN or -inf: never answer with an empty translation
                self._resolve(self._active[key], error=ServingError(
                    "the model produced no finite-scored translation for this text (numerical failure)"))

    def _resolve(self, row: Row, result: list[TextHypothesis] | None = None, error: Exception | None = None) -> None:
        """Answer a text exactly once, on its event loop."""
        self._active.pop(row.key, None)
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

