"""Structured logs: a call's fields in both formats; `debug` is Parley's, not its libraries'."""

import json
import logging

import pytest

from server.logs import JsonFormatter, TextFormatter, configure_logging


def record(**fields) -> logging.LogRecord:
    entry = logging.LogRecord("parley.rpc", logging.DEBUG, __file__, 1, "call", (), None)
    entry.__dict__.update(fields)
    return entry


def test_a_records_fields_appear_in_json_and_in_text():
    line = json.loads(JsonFormatter().format(record(method="Translate", code="OK", duration_ms=4.2)))
    assert (line["message"], line["logger"], line["level"]) == ("call", "parley.rpc", "debug")
    assert (line["method"], line["code"], line["duration_ms"]) == ("Translate", "OK", 4.2)
    assert TextFormatter().format(record(method="Translate", code="OK")).endswith(
        "DEBUG parley.rpc: call method=Translate code=OK")
    assert TextFormatter().format(record()).endswith("parley.rpc: call")


@pytest.fixture
def restored_logging():
    root, parley = logging.getLogger(), logging.getLogger("parley")
    saved = root.handlers[:], root.level, parley.level
    yield
    root.handlers[:], root.level = saved[0], saved[1]
    parley.setLevel(saved[2])


@pytest.mark.parametrize("level,parley_debug,library_info,library_debug", [
    ("debug", True, True, False), ("info", False, True, False), ("warning", False, False, False)])
def test_debug_is_parleys_own(restored_logging, level, parley_debug, library_info, library_debug):
    configure_logging(level, "text")
    assert logging.getLogger("parley.rpc").isEnabledFor(logging.DEBUG) == parley_debug
    assert logging.getLogger("grpc._cython.cygrpc").isEnabledFor(logging.INFO) == library_info
    assert logging.getLogger("grpc._cython.cygrpc").isEnabledFor(logging.DEBUG) == library_debug
