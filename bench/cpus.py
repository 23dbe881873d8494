"""Keeping the server and the load generator on CPUs of their own (BENCH_SERVER_CPUS).

In production the clients run on other machines; on one machine they take CPU from the
server they measure. Where the machine has cores to spare, the benchmark's engines and
servers run on the CPUs named, the load generator on the others.
"""

from __future__ import annotations

import contextlib
import os
from typing import Callable, Iterator


def parse_cpus(text: str | None) -> list[int] | None:
    """'0,1' or '0-3,8' -> the CPU numbers; None or '' -> None (no pinning)."""
    if not text:
        return None
    cpus = set()
    for part in text.split(","):
        first, _, last = part.strip().partition("-")
        try:
            cpus.update(range(int(first), int(last or first) + 1))
        except ValueError:
            raise ValueError(f"BENCH_SERVER_CPUS={text!r}: expected CPU numbers and ranges, e.g. 0,1 or 0-3") from None
    available = os.sched_getaffinity(0)
    if not cpus <= available or cpus == available:
        raise ValueError(f"BENCH_SERVER_CPUS={text!r}: name some of this process's CPUs {sorted(available)}, "
                         "leaving at least one for the load generator")
    return sorted(cpus)


def pinned_to(cpus: list[int] | None) -> Callable[[], None] | None:
    """A preexec_fn that confines a child process (and the processes it starts) to `cpus`."""
    if cpus is None:
        return None
    return lambda: os.sched_setaffinity(0, cpus)


@contextlib.contextmanager
def load_generator_cpus(server_cpus: list[int] | None) -> Iterator[None]:
    """Within the block this process (the load generator) runs on the CPUs the server does not."""
    if server_cpus is None:
        yield
        return
    before = os.sched_getaffinity(0)
    _set_process_affinity(before - set(server_cpus))
    try:
        yield
    finally:
        _set_process_affinity(before)


def _set_process_affinity(cpus: set[int]) -> None:
    # Every thread: gRPC's threads may have started already, and an affinity is per thread.
    for thread_id in os.listdir("/proc/self/task"):
        with contextlib.suppress(ProcessLookupError):  # a thread that has ended since
            os.sched_setaffinity(int(thread_id), cpus)
