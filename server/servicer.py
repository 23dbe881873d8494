"""The gRPC Translator service: validate, queue, await, answer. No tensors here."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable, Iterator

import grpc
from google.protobuf.message import DecodeError, Message

from parley.v1 import translate_pb2 as pb
from parley.v1 import translate_pb2_grpc as pb_grpc
from server.config import ServerConfig
from server.errors import InvalidRequest, ServingError, Unavailable
from server.metrics import Metrics
from server.models import LoadedModel, ModelRegistry
from server.requests import ValidatedRequest, empty_translation, translation_pb, validate
from server.scheduler import Row

log = logging.getLogger("parley.rpc")

# Requests with more text than this are tokenized on a worker thread: tokenizing holds the
# event loop, and with it every other call, for ~20 us per KB (a 4 MB request: ~80 ms),
# while the hop to a thread costs ~50-100 us, more than a typical request's tokenizing.
OFF_LOOP_CHARS = 32_768

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Translator"].full_name

# A call that gRPC ends this close to its deadline has expired rather than been cancelled: the
# server's deadline is the client's timeout counted from the call's arrival, a little later
# than the client's own (measured under load: 4 of 97 expired calls within it).
DEADLINE_SLACK_S = 0.05

LOADING = "models are still loading; retry shortly"


@dataclass
class _Call:
    """One RPC, for its metrics: the model label is known once the request is resolved."""

    method: str
    model: str = "unknown"
    started: float = field(default_factory=time.perf_counter)


class TranslatorServicer(pb_grpc.TranslatorServicer):
    def __init__(self, registry: ModelRegistry | None, config: ServerConfig, metrics: Metrics):
        self.registry, self.config, self.metrics = registry, config, metrics  # registry: None while loading
        self.draining = False
        self.active_calls = 0  # Translate/TranslateStream calls between acceptance and answer

    async def Translate(self, request: pb.TranslateRequest, context) -> pb.TranslateResponse:
        call = _Call("Translate")
        try:
            with self._queued(await self._accept(request, call), context) as futures:
                results = await asyncio.gather(*futures)
            response = pb.TranslateResponse(model=call.model,
                                            translations=[translation_pb(i, r) for i, r in enumerate(results)])
        except BaseException as error:
            await self._fail(error, context, call)
        self._record(call, grpc.StatusCode.OK)
        return response

    async def TranslateStream(self, request: pb.TranslateRequest, context) -> AsyncIterator[pb.TranslateResponse]:
        call = _Call("TranslateStream")
        try:
            with self._queued(await self._accept(request, call), context) as futures:
                finished: asyncio.Queue[int] = asyncio.Queue()  # indices, as their futures finish
                for index, future in enumerate(futures):
                    future.add_done_callback(lambda _, index=index: finished.put_nowait(index))
                for _ in futures:
                    index = await finished.get()
                    yield pb.TranslateResponse(model=call.model,
                                               translations=[translation_pb(index, futures[index].result())])
        except BaseException as error:
            await self._fail(error, context, call)
        self._record(call, grpc.StatusCode.OK)

    async def ListModels(self, request: pb.ListModelsRequest, context) -> pb.ListModelsResponse:
        call = _Call("ListModels", model="")
        if self.registry is None:
            await self._fail(Unavailable(LOADING), context, call)
        response = pb.ListModelsResponse(models=[
            pb.ModelInfo(name=m.name, source_language=m.package.source_language,
                         target_language=m.package.target_language, precision=m.engine.precision,
                         device=m.engine.device, is_default=m.name == self.registry.default,
                         max_input_tokens=min(self.config.max_tokens_per_text, m.max_input_tokens),
                         max_output_tokens=min(self.config.max_output_tokens, m.package.max_output_tokens))
            for m in self.registry
        ])
        self._record(call, grpc.StatusCode.OK)
        return response

    async def _accept(self, request: pb.TranslateRequest, call: _Call) -> ValidatedRequest:
        """The request resolved, validated and tokenized (off the event loop when large)."""
        self._check_open()
        model = self.registry.resolve(request.model, request.source_language, request.target_language)
        if sum(map(len, request.texts)) > OFF_LOOP_CHARS:
            validated = await asyncio.to_thread(validate, request, model, self.config)
            self._check_open()  # the server may have begun to drain meanwhile
        else:
            validated = validate(request, model, self.config)
        call.model = model.name
        return validated

    def _check_open(self) -> None:
        if self.draining:
            raise Unavailable("the server is shutting down; retry on another replica")
        if self.registry is None:
            raise Unavailable(LOADING)

    @contextlib.contextmanager
    def _queued(self, validated: ValidatedRequest, context) -> Iterator[list[asyncio.Future]]:
        """Queue the texts; yields one future per text. On leaving, whatever is still running
        (the call failed, was cancelled or expired) is cancelled in the scheduler."""
        with self._inflight(validated.model.name):
            futures, rows = self._submit(validated, context)
            try:
                yield futures
            finally:
                for future in futures:  # nobody awaits them now: a late answer or error is dropped
                    future.cancel()
                self._cancel_unfinished(validated.model, rows)

    def _submit(self, validated: ValidatedRequest, context) -> tuple[list[asyncio.Future], list[Row]]:
        """One future per text: empty texts are answered at once, the rest queued together."""
        loop = asyncio.get_running_loop()
        remaining = context.time_remaining()
        deadline = time.monotonic() + remaining if remaining is not None else None
        futures, rows = [], []
        for ids, params in zip(validated.token_ids, validated.params):
            future = loop.create_future()
            if ids:
                rows.append(Row(ids, params, future, deadline))
            else:
                future.set_result(empty_translation())
            futures.append(future)
        validated.model.scheduler.submit(rows)
        self.metrics.input_tokens.labels(validated.model.name).inc(sum(len(ids) for ids in validated.token_ids))
        return futures, rows

    @staticmethod
    def _cancel_unfinished(model: LoadedModel, rows: list[Row]) -> None:
        """The call is over (answered, failed, cancelled or expired): stop the work that is left."""
        unanswered = [row for row in rows if not row.answered]  # futures may be cancelled, rows still running
        if unanswered:
            model.scheduler.cancel(unanswered)

    @contextlib.contextmanager
    def _inflight(self, model: str):
        self.active_calls += 1
        try:
            with self.metrics.inflight.labels(model).track_inprogress():
                yield
        finally:
            self.active_calls -= 1

    async def parse(self, data: bytes, message_type: type[Message], method: str, context) -> Message:
        """A request's bytes as message_type; one that does not parse ends the call with
        INVALID_ARGUMENT and the reason (gRPC's own parsing would answer UNKNOWN)."""
        try:
            return message_type.FromString(data)
        except DecodeError as error:
            await self._fail(InvalidRequest(f"the request does not parse as {message_type.DESCRIPTOR.full_name}: "
                                            f"{error} (strings must be UTF-8)"), context, _Call(method))

    async def _fail(self, error: BaseException, context, call: _Call):
        """Map an error to its status (the only place that does), record it, end the call."""
        if isinstance(error, (asyncio.CancelledError, GeneratorExit)):  # gRPC ended the call: client or deadline
            remaining = context.time_remaining()
            expired = remaining is not None and remaining < DEADLINE_SLACK_S
            self._record(call, grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED)
            raise error
        if isinstance(error, ServingError):
            code, message = error.code, str(error)
        else:
            log.exception("unexpected error", extra={"model": call.model, "method": call.method})
            code, message = grpc.StatusCode.INTERNAL, f"internal error: {type(error).__name__}"
        self._record(call, code)
        await context.abort(code, message)

    def _record(self, call: _Call, code: grpc.StatusCode) -> None:
        seconds = time.perf_counter() - call.started
        self.metrics.requests.labels(call.model, call.method, code.name).inc()
        self.metrics.request_duration.labels(call.model, call.method).observe(seconds)
        if log.isEnabledFor(logging.DEBUG):  # one line per call: an access log, off at the default level
            log.debug("call", extra={"method": call.method, "model": call.model, "code": code.name,
                                     "duration_ms": round(seconds * 1000, 2)})


def add_to_server(servicer: TranslatorServicer, server: grpc.aio.Server) -> None:
    """Serve the Translator service from `servicer`, its requests parsed by servicer.parse."""

    def unary(method: Callable, request_type: type[Message], response_type: type[Message]):
        async def handle(data: bytes, context):
            return await method(await servicer.parse(data, request_type, method.__name__, context), context)

        return grpc.unary_unary_rpc_method_handler(handle, response_serializer=response_type.SerializeToString)

    def streaming(method: Callable, request_type: type[Message], response_type: type[Message]):
        async def handle(data: bytes, context):
            request = await servicer.parse(data, request_type, method.__name__, context)
            async with contextlib.aclosing(method(request, context)) as responses:  # closed with the call
                async for response in responses:
                    yield response

        return grpc.unary_stream_rpc_method_handler(handle, response_serializer=response_type.SerializeToString)

    handlers = {"Translate": unary(servicer.Translate, pb.TranslateRequest, pb.TranslateResponse),
                "TranslateStream": streaming(servicer.TranslateStream, pb.TranslateRequest, pb.TranslateResponse),
                "ListModels": unary(servicer.ListModels, pb.ListModelsRequest, pb.ListModelsResponse)}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)
