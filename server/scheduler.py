"""Continuous batching: texts from many requests share running decode batches, one per engine lane.

Each engine lane is a worker process with its own running batch (server.engine.lanes): at
every step boundary it takes in the texts and cancellations sent to it, drops texts whose
deadline passed, runs one decoder step and reports the texts that ended. A short text
therefore never waits for a long one to finish; it waits at most one step to join.

The scheduler keeps the queue and decides what each lane gets, all on the server's event
loop: a text is sent to a lane as it arrives if a lane has room (rows = texts x beams,
tokens = source tokens x beams; the least busy lane first), else when a lane reports that
texts ended; the lanes' reports are read when their pipes are readable. No thread hands
work to another, so a request costs no thread wake-ups or lock hand-offs in this process
(a feeder thread and a collector thread per lane had taken over a quarter of its CPU, CPU
the lanes need). Admission prefers,
after the oldest waiting text, texts of a similar length (same length bucket) so that
padding in the shared batch stays small; nothing waits forever because the oldest text
always goes first.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import Callable

from decoding import DecodingParams
from server.config import ServerConfig
from server.engine.engine import TextHypothesis
from server.engine.lanes import Ending, Job, LaneEngine, LoopPipe
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
    """One model's queue and lanes. Every method runs on the event loop that called start()."""

    # Queued texts' deadlines are checked this often: a safety net for callers that do not
    # cancel their texts when their deadline passes (the servicer does, as gRPC ends the call).
    SWEEP_S = 0.05

    def __init__(self, name: str, engine: LaneEngine, config: ServerConfig, metrics: Metrics):
        self.name, self.engine, self.config = name, engine, config
        self._pending: list[Row] = []
        self._accepting = True
        self._stopped = False
        lanes = range(len(engine.lanes))
        self._active: list[dict[int, Row]] = [{} for _ in lanes]  # per lane: texts sent to it, not yet answered
        self._load = [[0, 0] for _ in lanes]  # per lane: rows and tokens of its active texts
        self._lane_states = [RUNNING for _ in lanes]
        self._pipes: list[LoopPipe | None] = [None for _ in lanes]
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sweep: asyncio.TimerHandle | None = None  # drops queued texts whose deadline passed
        self._fill: asyncio.TimerHandle | None = None  # admits to an idle lane once max_queue_delay_ms is up
        self._restarts: set[asyncio.Task] = set()
        self.on_lanes_lost: Callable[[str], None] | None = None  # called with the model's name when no lane is left
        self._queue_depth = metrics.queue_depth.labels(name)
        self._queue_duration = metrics.queue_duration.labels(name)
        self._batch_size = metrics.batch_size.labels(name)
        self._padding_ratio = metrics.padding_ratio.labels(name)
        self._step_duration = metrics.step_duration.labels(name)
        self._generated_tokens = metrics.generated_tokens.labels(name)
        self._lane_failures = metrics.lane_failures.labels(name)
        self._running_lanes = metrics.running_lanes.labels(name)
        self._running_lanes.set(len(self._lane_states))

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        for lane in range(len(self._active)):
            self._attach(lane)

    @property
    def texts_in_flight(self) -> int:
        """Texts queued or decoding."""
        return len(self._pending) + sum(len(active) for active in self._active)

    def submit(self, rows: list[Row]) -> None:
        """Queue texts; all or none are accepted."""
        if not self._accepting:
            raise Unavailable("the server is shutting down; retry on another replica")
        if all(state == FAILED for state in self._lane_states):
            raise Unavailable(f"model {self.name} has no running decode lane (see the server log); "
                              "retry on another replica")
        if len(self._pending) + len(rows) > self.config.queue_limit:
            raise Overloaded(f"model {self.name} has {len(self._pending)} texts waiting (limit "
                             f"{self.config.queue_limit}); retry with backoff")
        self._pending += rows
        self._admit()

    def cancel(self, rows: list[Row]) -> None:
        """Stop working on these texts at the next step boundary (they are answered CANCELLED)."""
        keys: list[list[int]] = [[] for _ in self._active]
        queued = set()
        for row in rows:
            row.cancelled = True
            if row.lane is not None and row.key in self._active[row.lane]:
                keys[row.lane].append(row.key)
            else:
                queued.add(id(row))
        for lane, lane_keys in enumerate(keys):
            if lane_keys:
                self._send(lane, ("cancel", lane_keys))
        if queued:
            gone = [r for r in self._pending if id(r) in queued]
            self._pending = [r for r in self._pending if id(r) not in queued]
            for row in gone:
                self._resolve(row, error=Cancelled("cancelled"))
            self._queue_depth.set(len(self._pending))

    def stop_accepting(self) -> None:
        self._accepting = False

    async def stop(self) -> None:
        """End the lanes; every text still queued or running is answered UNAVAILABLE."""
        self._accepting = False
        self._stopped = True
        for timer in (self._sweep, self._fill):
            if timer:
                timer.cancel()
        if self._restarts:  # a lane being restarted is closed with the others
            await asyncio.gather(*self._restarts, return_exceptions=True)
        for lane, pipe in enumerate(self._pipes):
            self._pipes[lane] = None
            if pipe:
                pipe.detach()  # reports the lane has already sent are answered
        await asyncio.to_thread(self.engine.close)
        left, self._pending = [r for active in self._active for r in active.values()] + self._pending, []
        for lane in range(len(self._active)):
            self._release_all(lane)
        for row in left:
            self._resolve(row, error=Unavailable("the server stopped before this text was translated; "
                                                    "retry on another replica"))

    def _attach(self, lane: int) -> None:
        self._pipes[lane] = LoopPipe(self._loop, self.engine.lanes[lane].conn,
                                     functools.partial(self._on_report, lane), functools.partial(self._on_exit, lane))

    def _send(self, lane: int, message: tuple) -> None:
        if self._pipes[lane]:
            self._pipes[lane].send(message)

    def _admit(self) -> None:
        """Send queued texts to the lanes with room, the least busy lane first, while they fit."""
        if self._stopped:
            return
        if self._pending:
            now = time.monotonic()
            for lane in sorted((lane for lane in range(len(self._active)) if self._has_room(lane)),
                               key=lambda lane: self._load[lane][0]):
                if not self._pending or (not self._active[lane] and self._waits_to_fill(now)):
                    break
                admitted = self._take_admissible(lane)
                if admitted:
                    self._send(lane, ("admit", [Job(r.key, r.tokens, r.params, r.deadline) for r in admitted]))
                for row in admitted:
                    self._queue_duration.observe(now - row.enqueued)
        if self._pending and not self._sweep:
            self._sweep = self._loop.call_later(self.SWEEP_S, self._drop_expired)
        self._queue_depth.set(len(self._pending))

    def _waits_to_fill(self, now: float) -> bool:
        """An idle lane waits for more texts until the oldest has waited max_queue_delay_ms, unless
        a batch is already full; then they are admitted (a timer)."""
        admit_at = self._pending[0].enqueued + self.config.max_queue_delay_ms / 1000
        if now >= admit_at or sum(r.rows for r in self._pending) >= self.config.max_batch_rows:
            return False
        if not self._fill:
            self._fill = self._loop.call_later(admit_at - now, self._filled)
        return True

    def _filled(self) -> None:
        self._fill = None
        self._admit()

    def _drop_expired(self) -> None:
        """Answer queued texts whose deadline passed; look again while texts are queued."""
        self._sweep = None
        now = time.monotonic()
        gone = [r for r in self._pending if r.deadline is not None and r.deadline <= now]
        if gone:
            leaving = {id(r) for r in gone}
            self._pending = [r for r in self._pending if id(r) not in leaving]
            for row in gone:
                self._resolve(row, error=DeadlineExceeded("the deadline passed while the text was queued"))
        self._admit()

    def _has_room(self, lane: int) -> bool:
        rows, tokens = self._load[lane]
        return self._lane_states[lane] == RUNNING and rows < self.config.max_batch_rows and \
            tokens < self.config.max_batch_tokens

    def _take_admissible(self, lane: int) -> list[Row]:
        """The queued texts that fit the lane's batch now, oldest first, then similar lengths;
        they become the lane's."""
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
        """The lane is done with this text."""
        row = self._active[lane].pop(key)
        self._load[lane][0] -= row.rows
        self._load[lane][1] -= row.cost_tokens
        return row

    def _release_all(self, lane: int) -> list[Row]:
        rows = list(self._active[lane].values())
        self._active[lane].clear()
        self._load[lane] = [0, 0]
        return rows

    def _on_report(self, lane: int, message: tuple) -> None:
        _, endings, stats = message
        for rows, padding, seconds in stats:
            self._batch_size.observe(rows)
            self._padding_ratio.observe(padding)
            self._step_duration.observe(seconds)
        self.settle(lane, endings)
        self._admit()  # the lane has room again

    def settle(self, lane: int, endings: list[Ending]) -> None:
        """Answer the texts that left the lane: their translations, or why not."""
        if not endings:  # a report of step statistics only
            return
        ended = [(self._release(lane, e.key), e) for e in endings if e.key in self._active[lane]]
        finished = [(row, e.hypotheses) for row, e in ended if not e.reason]
        texts = self.engine.detokenize_many([hypotheses for _, hypotheses in finished])  # one call per report
        self._generated_tokens.inc(sum(len(h[0].tokens) for _, h in finished if h))
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

    def _on_exit(self, lane: int) -> None:
        """The lane's pipe closed: its process died (or is stopping with the server)."""
        self._pipes[lane] = None
        if self._stopped:
            return
        self._lane_failures.inc()
        self._set_state(lane, RESTARTING)
        task = self._loop.create_task(self._restart(lane))
        self._restarts.add(task)
        task.add_done_callback(self._restarts.discard)

    async def _restart(self, lane: int) -> None:
        """Answer the dead lane's texts, start a new process; if that fails too, the lane is FAILED."""
        process = self.engine.lanes[lane].process
        await asyncio.to_thread(process.join, 5)
        log.error("decode lane died; restarting it", extra={"model": self.name, "lane": lane,
                                                             "exit_code": process.exitcode})
        for row in self._release_all(lane):
            self._resolve(row, error=ServingError(
                f"the decode lane stopped unexpectedly (exit code {process.exitcode}); retry the request"))
        if self._stopped:  # the server is stopping: no new process to leave behind
            return
        try:
            await asyncio.to_thread(self._start_lane, lane)
        except Exception:
            log.exception("decode lane could not restart", extra={"model": self.name, "lane": lane})
            self._set_state(lane, FAILED)
            if all(state == FAILED for state in self._lane_states):  # nobody will take the queue
                stranded, self._pending = self._pending, []
                for row in stranded:
                    self._resolve(row, error=Unavailable(f"model {self.name} has no running decode lane"))
                if self.on_lanes_lost:
                    self.on_lanes_lost(self.name)
            return
        if self._stopped:
            return
        self._set_state(lane, RUNNING)
        self._attach(lane)
        self._admit()

    def _set_state(self, lane: int, state: str) -> None:
        self._lane_states[lane] = state
        self._running_lanes.set(self._lane_states.count(RUNNING))

    def _start_lane(self, lane: int) -> None:
        self.engine.lanes[lane].start()
        self.engine.lanes[lane].wait_ready()

    def _resolve(self, row: Row, result: list[TextHypothesis] | None = None,
                 error: Exception | None = None) -> None:
        """Answer a text exactly once."""
        row.answered = True
        if row.future.done():  # the call ended (cancelled, expired) before its text did
            return
        if error is not None:
            row.future.set_exception(error)
        else:
            row.future.set_result(result)
