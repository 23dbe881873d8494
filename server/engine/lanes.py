"""Decode lanes in worker processes: each lane owns one Engine (its ONNX Runtime sessions)
and one running decode batch, in a process of its own, fed over a pipe.

Why processes: a lane spends part of every step in Python (search, cache bookkeeping),
holding the GIL. Lanes that are threads of one process wait for each other's GIL, and for
the gRPC event loop's, at every step while their cores idle (two lanes of one thread, each
decoding its own batches of 4: 839-914 greedy sentences/s as threads of one process,
1,160 as two processes). Measured on 2 cores, int8, 2 lanes, against the threads they
replace: over gRPC with 64 clients, greedy 678-680 -> 731-745 sentences/s (p99 201-211 ->
170-181 ms), beam 4 341-342 -> 353; offline, batches of 8 / 32 / 64, greedy 803-830 /
1,411-1,421 / 1,551-1,579 -> 829-843 / 1,460-1,665 / 1,558-1,932 (runs alternated).

A lane decodes on its own (continuous batching): between steps it takes in what the parent
sent (texts to admit, keys to cancel), drops texts whose deadline passed, runs one step and
reports the texts that ended. The parent decides what each lane gets: the server's
scheduler (server.scheduler, through LoopPipe on its event loop) or, offline,
LaneEngine.decode.

Messages, pickled tuples on the pipe:
  parent -> lane: ("admit", [Job]), ("cancel", [key]), ("stop",)
  lane -> parent: ("ready", precision, device) or ("error", exception), once, after loading;
                  then ("ended", [Ending], [(rows, padding ratio, seconds) of each step since the last])
Jobs and Endings travel as plain tuples (to_wire, from_wire): pickle handles those in C,
while each dataclass it reduces and rebuilds in Python (a report of four endings: 38 -> 13
us to pickle, 35 -> 11 to load, measured with the processor's caches cold, as they are
between decoder steps).
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import math
import multiprocessing
import os
import pickle
import select
import shutil
import signal
import struct
import tempfile
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Callable, Hashable, Sequence

from decoding import DecodingParams, Hypothesis
from decoding.padding import length_order
from export.package import ModelPackage, PackageError
from server.engine.cpu_budget import cpu_budget
from server.engine.engine import Engine, TextFront, resolve
from server.engine.memory import keep_freed_memory, return_freed_memory
from server.engine.session import shared_graphs

log = logging.getLogger("parley.lanes")

# An idle lane polls this long for the next message before it sleeps: waking a sleeping
# process costs more on virtual CPUs. Measured, 2 lanes, batches of 8: greedy 752-765 ->
# 793-798 sentences/s.
SPIN_S = 0.002
# Texts that ended are reported together within this time (or when the lane goes idle): each
# report wakes the parent, which takes a core from the lanes. Measured over gRPC against
# reporting at once (alternated, noisy): 64 clients beam 4 350 -> 352-374 sentences/s, p99
# 386-390 -> 342-364 ms; 16 greedy clients p50 23-25 -> 25-26 ms.
REPORT_WITHIN_S = 0.005
STATS_EVERY = 32  # a busy lane reports its step statistics at least this often (in steps)
# A lane idle this long gives its freed heap back to the kernel (memory.return_freed_memory):
# the malloc settings that speed up a busy lane keep up to 256 MB of freed memory, which an
# idle server has no use for. Measured after 64 gRPC clients of mixed beams and request
# sizes: the two lanes held 250 and 510 MB idle (heaps of 179 and 439 MB). The next burst
# faults that memory in again (int8, 2 lanes, greedy batch 64: its first batch 33 -> 36-53
# ms, its first 1,000 sentences ~3% slower), so only a lull returns it, not every pause.
IDLE_RETURN_S = 5.0


@dataclass(frozen=True)
class Job:
    """One text for a lane to decode."""

    key: Hashable
    tokens: list[int]
    params: DecodingParams
    deadline: float | None = None  # time.monotonic() (the same clock in every process) after which to drop it


@dataclass(frozen=True)
class Ending:
    """How one text left its lane: finished with hypotheses (best first; empty if none scored
    finite), or not, with the reason: "cancelled", "expired" or an engine failure's message."""

    key: Hashable
    hypotheses: list[Hypothesis] | None = None
    reason: str = ""


def to_wire(message: tuple) -> tuple:
    """A message with its Jobs or Endings as plain tuples (from_wire restores them)."""
    if message[0] == "admit":
        return "admit", [(j.key, j.tokens, tuple(vars(j.params).values()), j.deadline) for j in message[1]]
    if message[0] == "ended":
        return ("ended", [(e.key, None if e.hypotheses is None else [(h.tokens, h.score) for h in e.hypotheses],
                           e.reason) for e in message[1]], message[2])
    return message


def from_wire(message: tuple) -> tuple:
    if message[0] == "admit":
        return "admit", [Job(key, tokens, DecodingParams(*params), deadline) for key, tokens, params, deadline in message[1]]
    if message[0] == "ended":
        return ("ended", [Ending(key, None if pairs is None else [Hypothesis(tokens, score) for tokens, score in pairs],
                                 reason) for key, pairs, reason in message[1]], message[2])
    return message


@dataclass(frozen=True)
class LaneSpec:
    """What a lane process needs to open its engine."""

    package: ModelPackage
    precision: str | None
    device: str | None
    threads: int
    optimization: str
    graphs: dict[str, Path] | None  # the variant's graphs with their weights packed once for all lanes


# A decoder step's fixed cost (ONNX Runtime's per run, Python's per step), in rows: int8,
# one thread, ~370 us a step at 3.4 rows and ~1,400 at 21, so ~60 us a row on ~170 fixed.
# A lane's share therefore takes as long as its longest text (the steps it runs) as well as
# its rows x tokens.
STEP_ROWS = 3


def length_shares(lengths: Sequence[int], rows: Sequence[int], lanes: int) -> list[list[int]]:
    """Indices of sources for at most `lanes` lanes (rows: each source's beam size): sorted by
    length and cut into contiguous shares whose largest estimated cost is as small as it can
    be, a share costing STEP_ROWS x its longest source plus rows x tokens of its sources (each
    with its EOS). A lane of similar lengths pads its sources and caches less than one of every
    other source (CTranslate2 sorts its sub-batches the same way), and equal costs let the
    lanes finish together. Measured, int8, 2 lanes, batch 64, 512 sentences: greedy 936 ->
    996-1028, beam 4 331-343 -> 361-371 sentences/s with equal token counts against dealing
    in turn. Counting the longest source too (STEP_ROWS): the two lanes are busy 94% of a
    batch's time instead of 86% (greedy, batch 8, each share decoded alone, 1,000
    sentences), and the engine decodes 1.01-1.10x (greedy) and 1.02-1.08x (beam 4) the
    sentences/s at batch 8, 0.98-1.10x at batch 16 (six rounds, alternated with equal token
    counts); at batch 32 and 64 the same within noise.
    """
    order = length_order(lengths)
    steps = [STEP_ROWS * (lengths[i] + 1) for i in order]  # a share's, from its last (longest) source
    tokens = [rows[i] * (lengths[i] + 1) for i in order]

    def cut(limit: int) -> list[list[int]]:
        """Shares filled shortest first while their cost stays within limit."""
        shares: list[list[int]] = []
        held = 0
        for i, step_cost, cost in zip(order, steps, tokens):
            if shares and step_cost + held + cost <= limit:
                shares[-1].append(i)
                held += cost
            else:
                shares.append([i])
                held = cost
        return shares

    low = max((s + t for s, t in zip(steps, tokens)), default=0)  # every source fits in some share
    high = (steps[-1] if steps else 0) + sum(tokens)  # everything in one share
    while low < high:  # the smallest limit that needs no more than `lanes` shares
        middle = (low + high) // 2
        if len(cut(middle)) <= lanes:
            high = middle
        else:
            low = middle + 1
    return cut(low)


class Lane:
    """One worker process and the parent's end of its pipe."""

    def __init__(self, spec: LaneSpec, name: str):
        self.spec, self.name = spec, name
        self.conn: Connection | None = None
        self.start()

    def start(self) -> None:
        """Start the process; it loads in the background (wait_ready)."""
        # spawn, not fork: a forked child would inherit the parent's gRPC and ONNX Runtime threads' locks.
        context = multiprocessing.get_context("spawn")
        if self.conn is not None:  # a restart: the old pipe's process is gone
            self.conn.close()
        self.conn, child_end = context.Pipe()
        self.process = context.Process(target=_lane_main, args=(child_end, self.spec), name=self.name, daemon=True)
        self.process.start()
        child_end.close()  # the parent keeps one end: EOF when the child exits

    def wait_ready(self) -> tuple[str, str]:
        """Wait until the lane has loaded and warmed up; its (precision, device). Raises the
        lane's own error if it could not load."""
        try:
            message = self.conn.recv()
        except EOFError:
            self.process.join(5)
            raise RuntimeError(f"decode lane {self.name} exited while loading (exit code "
                               f"{self.process.exitcode})") from None
        if message[0] == "error":
            self.close()
            raise message[1]
        return message[1], message[2]

    def send(self, message: tuple) -> None:
        self.conn.send(to_wire(message))

    def recv(self) -> tuple:
        """The lane's next report; EOFError if the process is gone."""
        return from_wire(self.conn.recv())

    def close(self, timeout: float = 5.0) -> None:
        try:
            self.conn.send(("stop",))
        except OSError:  # the process is already gone
            pass
        self.process.join(timeout)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.conn.close()


class LoopPipe:
    """The parent's end of a lane's pipe, driven by an asyncio event loop: reports are read when
    the pipe is readable, messages are written without ever blocking the loop (what the pipe
    cannot take now is written when it can). Frames as multiprocessing's Connection does (a
    4-byte big-endian length, then the pickle), so the lane's blocking Connection reads and
    writes the same stream. While attached, the Connection itself must not be used."""

    def __init__(self, loop: asyncio.AbstractEventLoop, conn: Connection,
                 on_message: Callable[[tuple], None], on_eof: Callable[[], None]):
        self.loop, self.conn, self.fd = loop, conn, conn.fileno()
        self.on_message, self.on_eof = on_message, on_eof
        self.received = bytearray()
        self.unsent = bytearray()
        self.ended = False  # the lane's end closed
        os.set_blocking(self.fd, False)
        loop.add_reader(self.fd, self._read)

    def send(self, message: tuple) -> None:
        if self.ended:
            return
        payload = pickle.dumps(to_wire(message))  # what the lane's Connection.recv loads
        self.unsent += struct.pack("!i", len(payload)) + payload
        if len(self.unsent) == len(payload) + 4:  # nothing was waiting: write now
            self._write()

    def detach(self) -> None:
        """Stop watching the pipe and make the Connection usable again (blocking); messages
        that arrived and were not yet read are handled first."""
        self.loop.remove_reader(self.fd)
        self.loop.remove_writer(self.fd)
        if not self.conn.closed:
            self._read(until_empty=True)
            os.set_blocking(self.fd, True)

    def _write(self) -> None:
        try:
            written = os.write(self.fd, self.unsent)
        except BlockingIOError:
            written = 0
        except OSError:  # the lane is gone: its reader sees the end of the pipe
            written = len(self.unsent)
        del self.unsent[:written]
        if self.unsent:
            self.loop.add_writer(self.fd, self._write)
        else:
            self.loop.remove_writer(self.fd)

    def _read(self, until_empty: bool = False) -> None:
        while not self.ended:
            try:
                data = os.read(self.fd, 1 << 16)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:  # nothing is read or written any more: the lane's restart reuses the fd number
                self.ended = True
                self.loop.remove_reader(self.fd)
                self.loop.remove_writer(self.fd)
                self.unsent.clear()
                self.on_eof()
                return
            self.received += data
            while len(self.received) >= 4:
                size = struct.unpack("!i", self.received[:4])[0]
                if len(self.received) < 4 + size:
                    break
                message = from_wire(pickle.loads(self.received[4 : 4 + size]))
                del self.received[: 4 + size]
                self.on_message(message)
            if not until_empty:
                return


class LaneEngine(TextFront):
    """One model decoded by `lanes` worker processes, each with threads / lanes ONNX Runtime
    threads (one lane: all of them).

    The server's scheduler drives the lanes (send, recv); offline, decode splits a batch
    across them. Either owns the lanes while it uses them: one at a time.
    """

    def __init__(self, package: ModelPackage, precision: str | None = None, device: str | None = None,
                 threads: int = 0, optimization: str = "all", lanes: int = 1):
        if lanes < 1:
            raise ValueError(f"lanes must be >= 1, got {lanes}")
        super().__init__(package)
        budget = threads or cpu_budget()  # None: nothing limits this process below the machine
        if lanes == 1:
            self.lane_threads = budget or 0  # 0: ONNX Runtime's default, one thread per physical core
        else:
            self.lane_threads = max(1, (budget or os.cpu_count() or 1) // lanes)
        self.shared_dir = None
        graphs = self._share_weights(*resolve(package, precision, device), optimization) if lanes > 1 else None
        spec = LaneSpec(package, precision, device, self.lane_threads, optimization, graphs)
        self.lanes = [Lane(spec, f"parley-lane-{package.name}-{i}") for i in range(lanes)]  # they load in parallel
        # Registered after multiprocessing's own exit handler, so it runs first: that one would
        # terminate the lanes (which ignore SIGTERM) and wait for them.
        atexit.register(_close_lanes, self.lanes)
        try:
            self.precision, self.device = [lane.wait_ready() for lane in self.lanes][0]
        except BaseException:
            self.close()
            raise

    def decode(self, sources: Sequence[Sequence[int]], params: Sequence[DecodingParams]) -> list[list[Hypothesis]]:
        """Each lane decodes a length-sorted share of the sources (length_shares), all at once."""
        self.check_lengths(sources)
        lanes = min(len(self.lanes), len(sources))
        shares = length_shares([len(s) for s in sources], [p.beam_size for p in params], lanes) if lanes else []
        results: list[list[Hypothesis]] = [[] for _ in sources]
        failures = []
        try:
            for lane, share in zip(self.lanes, shares):
                lane.send(("admit", [Job(i, list(sources[i]), params[i]) for i in share]))
            for lane, share in zip(self.lanes, shares):  # read every lane to the end, even after a failure
                waiting = len(share)
                while waiting:
                    _, endings, _ = lane.recv()
                    for ending in endings:
                        results[ending.key] = ending.hypotheses or []
                        failures += [ending.reason] if ending.reason else []
                    waiting -= len(endings)
        except (EOFError, OSError):  # `lane` is the one that failed
            lane.process.join(5)
            raise RuntimeError(f"decode lane {lane.name} died (exit code {lane.process.exitcode}); "
                               "make a new LaneEngine") from None
        if failures:
            raise RuntimeError(f"decoding failed: {failures[0]}")
        return results

    def _share_weights(self, precision: str, device: str, optimization: str) -> dict[str, Path] | None:
        """On CPU, the variant's graphs with packed weights that every lane maps (one copy in
        memory and in the caches: session.shared_graphs), in a directory of their own until
        close; None (each lane packs its own) elsewhere or where they cannot be written."""
        if device != "cpu":
            return None
        try:
            self.shared_dir = Path(tempfile.mkdtemp(prefix=f"parley-{self.package.name}-"))
            atexit.register(shutil.rmtree, self.shared_dir, True)  # runs after the lanes' close (registered later)
            return shared_graphs(self.package, precision, optimization, self.shared_dir)
        except PackageError:  # a damaged package: the lanes could not load it either
            self._remove_shared()
            raise
        except Exception as error:  # e.g. no writable or a full temporary directory: the lanes still work
            self._remove_shared()
            log.warning("could not pack the weights once for all lanes: each lane packs its own",
                        extra={"reason": f"{type(error).__name__}: {error}"})
            return None
        finally:
            return_freed_memory()  # ONNX Runtime's working memory for the packing (~15 MB for the default model)

    def _remove_shared(self) -> None:
        if self.shared_dir is not None:
            shutil.rmtree(self.shared_dir, ignore_errors=True)
            self.shared_dir = None

    def close(self) -> None:
        """Stop the lane processes and remove their shared graphs (idempotent)."""
        _close_lanes(self.lanes)
        self._remove_shared()


def _close_lanes(lanes: list[Lane]) -> None:
    for lane in lanes:
        if not lane.conn.closed:
            lane.close()


def _lane_main(conn: Connection, spec: LaneSpec) -> None:
    """A lane process: load, warm up, say ready, then decode what arrives until told to stop."""
    # Ctrl-C, `timeout` and systemd signal the whole process group or cgroup; the server drains
    # its in-flight work through the lanes and then stops them, so a lane must not die first.
    # (The parent closes its lanes at exit, before multiprocessing would terminate them.)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    keep_freed_memory()
    try:
        engine = Engine(spec.package, spec.precision, spec.device, spec.threads, spec.optimization, graphs=spec.graphs)
        # First-run allocations and kernel choices, before any request waits on them.
        engine.decode(engine.tokenizer.encode(["Warm-up."]), [DecodingParams(beam_size=2, max_length=8)])
    except Exception as error:
        conn.send(("error", _picklable(error)))
        return
    conn.send(("ready", engine.precision, engine.device))
    _LaneLoop(engine, conn).run()


def _picklable(error: Exception) -> Exception:
    """The error itself where it pickles (PackageError, ValueError: the server reports those
    as they are), else a RuntimeError that says what it was."""
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error}")


class _LaneLoop:
    def __init__(self, engine: Engine, conn: Connection):
        self.engine, self.conn = engine, conn
        # Checked at every step: a poll object costs a system call, Connection.poll ten times that.
        self.poller = select.poll()
        self.poller.register(conn.fileno(), select.POLLIN)
        self.batch = engine.new_search()
        self.deadlines: dict[Hashable, float | None] = {}  # every text in the batch
        self.next_deadline = math.inf  # the earliest of them: no text expires before
        self.endings: list[Ending] = []
        self.first_unsent = 0.0  # when the oldest of `endings` ended
        self.stats: list[tuple[int, float, float]] = []

    def run(self) -> None:
        while True:
            if not len(self.batch) or self._waiting():
                if not self._take_messages():
                    return
            self._expire()
            if len(self.batch):
                self._step()
            idle = not len(self.batch)
            if (idle and (self.endings or self.stats)) or len(self.stats) >= STATS_EVERY or \
                    (self.endings and time.monotonic() - self.first_unsent >= REPORT_WITHIN_S):
                self.conn.send(to_wire(("ended", self.endings, self.stats)))
                self.endings, self.stats = [], []

    def _take_messages(self) -> bool:
        """Wait for a message (an idle lane) or take those waiting; False when told to stop or
        the parent is gone. Texts from all the messages join in one admission: their sources
        are encoded together, in length-sorted runs, not one encoder run per message."""
        jobs, cancelled = [], set()
        try:
            self._spin()
            while True:
                message = from_wire(self.conn.recv())
                if message[0] == "stop":
                    return False
                if message[0] == "admit":
                    jobs += message[1]
                elif message[0] == "cancel":
                    cancelled.update(message[1])
                if not self._waiting():
                    break
        except EOFError:
            return False
        if jobs:
            self._admit(jobs)
        if cancelled:  # after admitting: a cancellation may follow its text's admission
            self._drop(cancelled, "cancelled")
        return True

    def _spin(self) -> None:
        """Poll for up to SPIN_S before sleeping in recv; a lane that stays idle IDLE_RETURN_S
        longer returns its freed memory first."""
        until = time.perf_counter() + SPIN_S
        while not self._waiting() and time.perf_counter() < until:
            pass
        if not self._waiting() and not self.poller.poll(IDLE_RETURN_S * 1000):
            return_freed_memory()

    def _waiting(self) -> bool:
        """A message (or the parent's end of the pipe closing) is there to read."""
        return bool(self.poller.poll(0))

    def _admit(self, jobs: list[Job]) -> None:
        try:
            self.engine.admit(self.batch, [j.key for j in jobs], [j.tokens for j in jobs], [j.params for j in jobs])
        except Exception as error:  # the running batch is untouched: find the texts that fail, the rest join
            if len(jobs) > 1:
                for job in jobs:
                    self._admit([job])
            else:
                self._end([Ending(jobs[0].key, reason=f"engine failure: {error}")])
            return
        self.deadlines.update((j.key, j.deadline) for j in jobs)
        self.next_deadline = min([self.next_deadline] + [j.deadline for j in jobs if j.deadline is not None])

    def _drop(self, keys: set, reason: str) -> None:
        dropped = self.batch.cancel(keys)
        for key in dropped:
            del self.deadlines[key]
        self._end([Ending(key, reason=reason) for key in dropped])

    def _expire(self) -> None:
        now = time.monotonic()
        if now < self.next_deadline:
            return
        expired = {key for key, deadline in self.deadlines.items() if deadline is not None and deadline <= now}
        self._drop(expired, "expired")
        self.next_deadline = min((d for d in self.deadlines.values() if d is not None), default=math.inf)

    def _step(self) -> None:
        backend = self.batch.backend
        rows, padding, started = backend.rows, backend.padding_ratio, time.perf_counter()
        try:
            finished = self.batch.step()
        except Exception as error:  # an engine failure fails the texts in the batch, not the lane
            self._end([Ending(key, reason=f"engine failure: {error}") for key in self.deadlines])
            self.deadlines.clear()
            self.batch = self.engine.new_search()
            return
        self.stats.append((rows, padding, time.perf_counter() - started))
        for key, _ in finished:
            del self.deadlines[key]
        self._end([Ending(key, hypotheses) for key, hypotheses in finished])

    def _end(self, endings: list[Ending]) -> None:
        if endings and not self.endings:
            self.first_unsent = time.monotonic()
        self.endings += endings
