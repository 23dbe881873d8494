"""Continuous batching: texts from many requests share running decode batches, one per engine lane.

The event loop only queues work (``submit``) and awaits futures. Each engine lane is a
worker process with its own running batch (server.engine.lanes): at every step boundary
it takes in the texts and cancellations sent to it, drops texts whose deadline passed,
runs one decoder step and reports the texts that ended. A short text therefore never
waits for a long one to finish; it waits at most one step to join.

Here, a feeder thread sends the lanes queued texts while their batches have room (rows =
texts x beams, tokens = source tokens x beams; the least busy lane first) and
cancellations; a collector thread per lane answers the texts the lane reports. Admission
prefers, after the oldest waiting text, texts of a similar length (same length bucket) so
that padding in the shared batch stays small; nothing waits forever because the oldest
text always goes first.
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
from server.engine.engine import TextHypothesis
from server.engine.lanes import Ending, Job, LaneEngine
from server.errors import Cancelled, DeadlineExceeded, Overloaded, ServingError, Unavailable
from server.metrics import Metrics

log = logging.getLogger("parley.scheduler")
RUNNING, RESTARTING, FAILED = "running", "restarting", "failed"  # a lane's states; only a running lane takes texts
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
    answered: bool = False  # set when the row is answered (exactly once)
    cancelled: bool = False  # set by the caller; the lane drops the row at its next step
    lane: int | None = None  # the lane decoding it, once admitted

    @property
    def rows(self) -> int:
        return self.params.beam_size

    @property
    def cost_tokens(self) -> int:
        return (len(self.tokens) + 1) * self.params.beam_size


class Scheduler:
    WAKE_S = 0.05  # feeders look at queued texts' deadlines at least this often

    def __init__(self, name: str, engine: LaneEngine, config: ServerConfig, metrics: Metrics):
        self.name, self.engine, self.config, self.metrics = name, engine, config, metrics
        self._condition = threading.Condition()
        self._pending: list[Row] = []
        self._pending_cancelled = False  # a queued row was cancelled: feeders drop it
        self._accepting = True
        self._stopped = False
        lanes = range(len(engine.lanes))
        self._active: list[dict[int, Row]] = [{} for _ in lanes]  # per lane: texts sent to it, not yet answered
        self._load = [[0, 0] for _ in lanes]  # per lane: rows and tokens of its active texts
        self._to_cancel: list[set[int]] = [set() for _ in lanes]  # per lane: keys to cancel there
        self._lane_states = [RUNNING for _ in lanes]
        # Admission is worth another look only after something changed (texts queued, a lane's
        # batch shrank, a lane restarted): `_changes` counts those, `_seen` is the feeder's last look.
        self._changes = 0
        self._seen = -1
        self._feeder = threading.Thread(target=self._feed, name=f"parley-feed-{name}", daemon=True)
        self._collectors = [threading.Thread(target=self._collect, args=(lane,), name=f"parley-collect-{name}-{lane}",
                                             daemon=True) for lane in lanes]

    def start(self) -> None:
        for thread in [self._feeder] + self._collectors:
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
            if all(state == FAILED for state in self._lane_states):
                raise Unavailable(f"model {self.name} has no running decode lane (see the server log); "
                                  "retry on another replica")
            if len(self._pending) + len(rows) > self.config.queue_limit:
                raise Overloaded(f"model {self.name} has {len(self._pending)} texts waiting (limit "
                                 f"{self.config.queue_limit}); retry with backoff")
            self._pending += rows
            self._changes += 1
            self.metrics.queue_depth.labels(self.name).set(len(self._pending))
            self._condition.notify_all()

    def cancel(self, rows: list[Row]) -> None:
        """Stop working on these texts at the next step boundary (they are answered CANCELLED)."""
        with self._condition:
            for row in rows:
                row.cancelled = True
                if row.lane is not None and row.key in self._active[row.lane]:
                    self._to_cancel[row.lane].add(row.key)
                else:
                    self._pending_cancelled = True
            self._condition.notify_all()

    def stop_accepting(self) -> None:
        with self._condition:
            self._accepting = False

    def stop(self, timeout: float = 5.0) -> None:
        """End the workers and the lanes; every text still queued or running is answered UNAVAILABLE."""
        with self._condition:
            self._accepting = False
            self._stopped = True
            self._condition.notify_all()
        self._feeder.join(timeout)
        self.engine.close()  # the collectors read what the lanes sent before they stopped, then end
        for thread in self._collectors:
            thread.join(timeout)
        with self._condition:
            left, self._pending = [r for active in self._active for r in active.values()] + self._pending, []
            for lane in range(len(self._active)):
                self._release_all(lane)
        for row in left:
            self._resolve(row, error=Unavailable("the server stopped before this text was translated"))

    def _feed(self) -> None:
        """Send the lanes queued texts while they have room, and the cancellations of their texts."""
        while True:
            with self._condition:
                self._condition.wait_for(lambda: self._stopped or self._has_work(), self.WAKE_S)
                if self._stopped:
                    return
                gone = self._take_gone()
                cancels = [(lane, list(keys)) for lane, keys in enumerate(self._to_cancel) if keys]
                for keys in self._to_cancel:
                    keys.clear()
                admissions = self._admit_to_lanes()
                self._seen = self._changes
                self.metrics.queue_depth.labels(self.name).set(len(self._pending))
            for row in gone:
                self._resolve(row, error=Cancelled("cancelled") if row.cancelled else
                              DeadlineExceeded("the deadline passed while the text was queued"))
            for lane, keys in cancels:
                self._send(lane, ("cancel", keys))
            now = time.monotonic()
            for lane, rows in admissions:
                self._send(lane, ("admit", [Job(r.key, r.tokens, r.params, r.deadline) for r in rows]))
                for row in rows:
                    self.metrics.queue_duration.labels(self.name).observe(now - row.enqueued)

    def _send(self, lane: int, message: tuple) -> None:
        try:
            self.engine.lanes[lane].send(message)
        except OSError:  # the lane died: its collector answers the texts it held
            pass

    def _has_work(self) -> bool:
        return any(self._to_cancel) or self._pending_cancelled or \
            (bool(self._pending) and self._seen != self._changes and
             any(self._has_room(lane) for lane in range(len(self._active))))

    def _admit_to_lanes(self) -> list[tuple[int, list[Row]]]:
        """Under the lock: queued texts for the lanes, the least busy lane first, while they fit."""
        admissions = []
        lanes = sorted((lane for lane in range(len(self._active)) if self._has_room(lane)),
                       key=lambda lane: self._load[lane][0])
        for lane in lanes:
            if not self._pending:
                break
            if not self._active[lane]:
                self._wait_to_fill()
            admitted = self._take_admissible(lane)
            if admitted:
                admissions.append((lane, admitted))
        return admissions

    def _has_room(self, lane: int) -> bool:
        rows, tokens = self._load[lane]
        return self._lane_states[lane] == RUNNING and rows < self.config.max_batch_rows and \
            tokens < self.config.max_batch_tokens

    def _take_gone(self) -> list[Row]:
        """Under the lock: remove and return queued texts that were cancelled or whose deadline passed."""
        now = time.monotonic()
        self._pending_cancelled = False
        gone = [r for r in self._pending if r.cancelled or (r.deadline is not None and r.deadline <= now)]
        if gone:
            leaving = {id(r) for r in gone}
            self._pending = [r for r in self._pending if id(r) not in leaving]
        return gone

    def _wait_to_fill(self) -> None:
        """An idle lane waits up to max_queue_delay_ms for more texts, unless a batch is already full."""
        until = time.monotonic() + self.config.max_queue_delay_ms / 1000
        while not self._stopped and sum(r.rows for r in self._pending) < self.config.max_batch_rows:
            left = until - time.monotonic()
            if left <= 0:
                break
            self._condition.wait(left)

    def _take_admissible(self, lane: int) -> list[Row]:
        """Under the lock: the queued texts that fit the lane's batch now, oldest first, then
        similar lengths; they become the lane's."""
        rows_used, tokens_used = self._load[lane]
        if not self._pending:
            return []
        head_bucket = length_bucket(len(self._pending[0].tokens))
        order = [self._pending[0]] + sorted(self._pending[1:],
                                            key=lambda r: length_bucket(len(r.tokens)) != head_bucket)
        admitted = []
        for row in order:
            fits = rows_used + row.rows <= self.config.max_batch_rows and \
                tokens_used + row.cost_tokens <= self.config.max_batch_tokens
            if not fits and (self._active[lane] or admitted):  # an empty batch always takes one text
                continue
            admitted.append(row)
            rows_used += row.rows
            tokens_used += row.cost_tokens
        taken = {id(r) for r in admitted}
        self._pending = [r for r in self._pending if id(r) not in taken]
        for row in admitted:
            row.lane = lane
            self._active[lane][row.key] = row
        self._load[lane] = [rows_used, tokens_used]
        return admitted

    def _release(self, lane: int, key: int) -> Row:
        """Under the lock: the lane is done with this text."""
        row = self._active[lane].pop(key)
        self._load[lane][0] -= row.rows
        self._load[lane][1] -= row.cost_tokens
        return row

    def _release_all(self, lane: int) -> list[Row]:
        rows = list(self._active[lane].values())
        self._active[lane].clear()
        self._load[lane] = [0, 0]
        return rows

    def _collect(self, lane: int) -> None:
        """Answer the texts the lane reports; restart the lane if its process dies."""
        while True:
            try:
                _, endings, stats = self.engine.lanes[lane].recv()
            except (EOFError, OSError):
                if self._stopped or not self._restart(lane):
                    return
                continue
            for rows, padding in stats:
                self.metrics.batch_size.labels(self.name).observe(rows)
                self.metrics.padding_ratio.labels(self.name).observe(padding)
            self.settle(lane, endings)

    def settle(self, lane: int, endings: list[Ending]) -> None:
        """Answer the texts that left the lane: their translations, or why not."""
        if not endings:
            return
        with self._condition:
            ended = [(self._release(lane, e.key), e) for e in endings if e.key in self._active[lane]]
            self._changes += 1
            self._condition.notify_all()  # the lane has room again
        finished = [(row, e.hypotheses) for row, e in ended if not e.reason]
        texts = self.engine.detokenize_many([hypotheses for _, hypotheses in finished])  # one call per report
        self.metrics.generated_tokens.labels(self.name).inc(sum(len(h[0].tokens) for _, h in finished if h))
        for (row, _), result in zip(finished, texts):
            if result:
                self._resolve(row, result=result)
            else:  # every hypothesis scored NaN or -inf: never answer with an empty translation
                self._resolve(row, error=ServingError(
                    "the model produced no finite-scored translation for this text (numerical failure)"))
        for row, ending in ended:
            if ending.reason == "cancelled":
                self._resolve(row, error=Cancelled("cancelled"))
            elif ending.reason == "expired":
                self._resolve(row, error=DeadlineExceeded("the deadline passed during translation"))
            elif ending.reason:
                log.error("engine failure", extra={"model": self.name, "error": ending.reason})
                self._resolve(row, error=ServingError(ending.reason))

    def _restart(self, lane: int) -> bool:
        """The lane's process died: answer its texts, start a new one. False if that failed too."""
        process = self.engine.lanes[lane].process
        process.join(5)
        log.error("decode lane died; restarting it", extra={"model": self.name, "lane": lane,
                                                             "exit_code": process.exitcode})
        with self._condition:
            self._lane_states[lane] = RESTARTING
            lost = self._release_all(lane)
            self._to_cancel[lane].clear()
        for row in lost:
            self._resolve(row, error=ServingError(
                f"the decode lane stopped unexpectedly (exit code {process.exitcode}); retry the request"))
        if self._stopped:  # the server is stopping: no new process to leave behind
            return False
        try:
            self.engine.lanes[lane].start()
            self.engine.lanes[lane].wait_ready()
        except Exception:
            log.exception("decode lane could not restart", extra={"model": self.name, "lane": lane})
            with self._condition:
                self._lane_states[lane] = FAILED
                stranded = []
                if all(state == FAILED for state in self._lane_states):  # nobody will take the queue
                    stranded, self._pending = self._pending, []
            for row in stranded:
                self._resolve(row, error=Unavailable(f"model {self.name} has no running decode lane"))
            return False
        with self._condition:
            self._lane_states[lane] = RUNNING
            self._changes += 1
            self._condition.notify_all()
        return True

    def _resolve(self, row: Row, result: list[TextHypothesis] | None = None,
                 error: Exception | None = None) -> None:
        """Answer a text exactly once, on its event loop."""
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
