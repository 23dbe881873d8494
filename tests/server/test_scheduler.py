"""Scheduler paths that a healthy model never takes, driven by a stand-in engine, and the event
loop's end of a lane's pipe."""

import asyncio
import multiprocessing
import time

import numpy as np
import pytest

from decoding import DecodingParams
from server.config import ServerConfig
from server.engine.lanes import Ending, Job, LoopPipe, from_wire, to_wire
from server.errors import DeadlineExceeded, ServingError
from server.metrics import Metrics
from server.scheduler import RESTARTING, Row, Scheduler


class NoLanes:
    """The scheduler's view of an engine, without lane processes (nothing is started)."""

    lanes = [None]

    def detokenize_many(self, results):
        return [[] for _ in results]


def test_a_text_without_a_finite_hypothesis_gets_an_error_not_an_empty_answer():
    async def scenario():
        scheduler = Scheduler("m", NoLanes(), ServerConfig(), Metrics())
        row = Row([5, 6], DecodingParams(), asyncio.get_running_loop().create_future())
        scheduler._pending = [row]
        assert scheduler._take_admissible(0) == [row]  # as admission takes it, load included
        scheduler.settle(0, [Ending(row.key, hypotheses=[])])  # the lane found no finite-scored hypothesis
        with pytest.raises(ServingError, match="no finite-scored translation"):
            await asyncio.wait_for(row.future, 10)
        assert not scheduler._active[0]
        assert scheduler._load[0] == [0, 0]

    asyncio.run(scenario())


def test_queued_texts_past_their_deadline_are_answered_even_if_the_caller_never_cancels():
    """The servicer cancels a call's texts when gRPC ends the call; the scheduler's own sweep
    answers those of a caller that does not, and they never reach a lane."""
    async def scenario():
        metrics = Metrics()
        scheduler = Scheduler("m", NoLanes(), ServerConfig(), metrics)
        scheduler._loop = asyncio.get_running_loop()
        scheduler._lane_states = [RESTARTING]  # no lane has room: the texts stay queued
        loop = asyncio.get_running_loop()
        soon = Row([5, 6], DecodingParams(), loop.create_future(), deadline=time.monotonic() + 0.1)
        later = Row([7], DecodingParams(), loop.create_future(), deadline=time.monotonic() + 60)
        scheduler.submit([soon, later])
        with pytest.raises(DeadlineExceeded, match="the deadline passed while the text was queued"):
            await asyncio.wait_for(soon.future, 10)
        assert scheduler._pending == [later] and not later.future.done()
        assert metrics.queue_depth.labels("m")._value.get() == 1

    asyncio.run(scenario())


def test_search_reports_no_hypothesis_when_every_score_is_nan():
    from decoding import Candidates, search

    class NaNBackend:
        vocab_size = 6

        def step(self, tokens, top_k):
            rows = len(tokens)
            return Candidates(np.full((rows, top_k), np.nan, np.float32),
                              np.tile(np.arange(top_k), (rows, 1)), np.full(rows, np.nan, np.float32))

        def select(self, rows):
            pass

    assert search(NaNBackend(), [DecodingParams(max_length=2)], bos_id=2, eos_id=3) == [[]]


def test_the_event_loop_end_of_a_lane_pipe_speaks_connection_frames_without_blocking():
    async def scenario():
        loop = asyncio.get_running_loop()
        parent, lane_end = multiprocessing.Pipe()
        received, ended = [], loop.create_future()
        pipe = LoopPipe(loop, parent, received.append, lambda: ended.set_result(True))
        # more than the pipe holds: the rest waits for the reader
        big = ("admit", [Job(i, [4, 5, 6], DecodingParams()) for i in range(60_000)])
        pipe.send(big)
        pipe.send(("cancel", [7]))
        assert pipe.unsent, "the whole message was written: the test needs one the pipe cannot take"
        got = await asyncio.to_thread(lambda: [from_wire(lane_end.recv()), from_wire(lane_end.recv())])
        assert got == [big, ("cancel", [7])]
        reports = [("ended", [], [(3, 0.5, 0.002)]), ("ended", [Ending(i, []) for i in range(15_000)], [])]  # > one read
        for report in reports:
            lane_end.send(to_wire(report))
        while len(received) < len(reports):
            await asyncio.sleep(0.01)
        assert received == reports
        lane_end.close()
        await asyncio.wait_for(ended, 10)
        pipe.detach()  # after the end: reads nothing more (a second on_eof would set `ended` twice and raise)

    asyncio.run(scenario())
