"""A command-line client: python -m server.client "A man is riding a bike." [options]

Texts come from the arguments, or one a line from standard input (a whole file: they go in
requests of --texts-per-request, several in flight, and come back in order; with --stream,
each as it finishes).
"""

from __future__ import annotations

import argparse
import json
import queue
import sys
import threading
from collections import deque
from pathlib import Path
from typing import Callable, NoReturn, Sequence

import grpc

from parley.v1 import translate_pb2 as pb
from parley.v1 import translate_pb2_grpc as pb_grpc
from server.tls import pem_problems


def channel(address: str, ca: Path | None, cert: Path | None, key: Path | None) -> grpc.Channel:
    if not ca and not cert:
        return grpc.insecure_channel(address)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=ca.read_bytes() if ca else None,
        private_key=key.read_bytes() if key else None,
        certificate_chain=cert.read_bytes() if cert else None,
    )
    return grpc.secure_channel(address, credentials)


def at_least(least: int):
    """An argparse type: a whole number >= least (0 for the API's unsigned fields)."""
    def whole_number(text: str) -> int:
        value = int(text)
        if value < least:
            raise argparse.ArgumentTypeError(f"must be >= {least}, got {value}")
        return value
    return whole_number



def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="parley-client", description="Translate texts with a Parley server.")
    p.add_argument("texts", nargs="*", help="texts to translate (default: read lines from stdin)")
    p.add_argument("--address", default="localhost:50051", help="the server, host:port (default: localhost:50051)")
    p.add_argument("--model", default="", help="model name (default: the server's default, or the one serving "
                                               "--source-language -> --target-language)")
    p.add_argument("--source-language", default="", help="language code of the texts, e.g. en")
    p.add_argument("--target-language", default="", help="language code to translate into, e.g. de")
    p.add_argument("--beam", type=at_least(0), default=0,
                   help="beam size; 1 is greedy (default: 0, the server's default)")
    p.add_argument("--n-best", type=at_least(0), default=1, help="hypotheses per text, best first (default: 1)")
    p.add_argument("--length-penalty", type=float,
                   help="score = log-probability / length ^ this (default: the server's, 1.0)")
    p.add_argument("--max-output-tokens", type=at_least(0), default=0,
                   help="cap on generated tokens per text (default: 0, the server's rule)")
    p.add_argument("--min-output-tokens", type=at_least(0), default=0,
                   help="tokens to generate before the translation may end (default: 0)")
    p.add_argument("--stream", action="store_true", help="print each translation as soon as it is done")
    p.add_argument("--json", action="store_true", help="print JSON lines with scores and token counts")
    p.add_argument("--timeout", type=float, default=30.0, help="deadline of each request in seconds (default: 30)")
    p.add_argument("--texts-per-request", type=at_least(1), default=64,
                   help="texts sent in one request, more go in several (default: 64, the server's default limit)")
    p.add_argument("--parallel", type=at_least(1), default=4,
                   help="requests in flight at once, so the server batches them together (default: 4)")
    p.add_argument("--list-models", action="store_true", help="list the server's models and exit")
    p.add_argument("--tls-ca", type=Path, help="CA bundle to verify the server (enables TLS)")
    p.add_argument("--tls-cert", type=Path, help="client certificate, for mTLS")
    p.add_argument("--tls-key", type=Path, help="client private key, for mTLS")
    return p


def main(argv: Sequence[str] | None = None) -> None:
    p = parser()
    args = p.parse_args(argv)

    if bool(args.tls_cert) != bool(args.tls_key):
        p.error("--tls-cert and --tls-key go together")
    try:
        problems = pem_problems({"--tls-cert": args.tls_cert, "--tls-ca": args.tls_ca}, ("--tls-key", args.tls_key))
        stub = pb_grpc.TranslatorStub(channel(args.address, args.tls_ca, args.tls_cert, args.tls_key))
    except OSError as error:
        p.error(f"cannot read {error.filename}: {error.strerror}")
    if problems:
        p.error("; ".join(problems))
    if args.list_models:
        try:
            models = stub.ListModels(pb.ListModelsRequest(), timeout=args.timeout).models
        except grpc.RpcError as error:
            sys.exit(f"error: {error.code().name}: {error.details()}")
        for m in models:
            default = " (default)" if m.is_default else ""
            print(f"{m.name}{default}: {m.source_language}->{m.target_language} {m.precision} on {m.device}")
        return
    texts = args.texts or [line.rstrip("\n") for line in sys.stdin]
    if not texts:
        p.error("no texts: give them as arguments, or one a line on standard input")
    options = pb.DecodingOptions(beam_size=args.beam, num_hypotheses=args.n_best,
                                 max_output_tokens=args.max_output_tokens, min_output_tokens=args.min_output_tokens)
    if args.length_penalty is not None:
        options.length_penalty = args.length_penalty
    size = args.texts_per_request
    chunks = [range(first, min(first + size, len(texts))) for first in range(0, len(texts), size)]

    def request(chunk: range) -> pb.TranslateRequest:
        return pb.TranslateRequest(texts=texts[chunk.start : chunk.stop], model=args.model, options=options,
                                   source_language=args.source_language, target_language=args.target_language)

    def show_answer(chunk: range, answer: grpc.Future) -> None:
        try:
            response = answer.result()
        except grpc.RpcError as error:
            fail(chunk, error)
        for translation in response.translations:
            show(translation, chunk.start, texts, args.json)

    def fail(chunk: range, error: grpc.RpcError) -> NoReturn:
        where = f"texts {chunk.start}-{chunk.stop - 1} (one request): " if len(chunks) > 1 else ""
        hint = " (lower --texts-per-request)" if "texts in one request" in (error.details() or "") else ""
        sys.exit(f"error: {where}{error.code().name}: {error.details()}{hint}")

    if args.stream:  # every text as it finishes, --parallel requests streaming at once
        failure = stream_all(chunks, lambda chunk: stub.TranslateStream(request(chunk), timeout=args.timeout),
                             args.parallel, lambda chunk, translation: show(translation, chunk.start, texts, args.json))
        if failure:
            fail(*failure)
        return
    in_flight: deque = deque()  # (chunk, future), in input order
    try:
        for chunk in chunks:
            in_flight.append((chunk, stub.Translate.future(request(chunk), timeout=args.timeout)))
            while in_flight and (len(in_flight) == args.parallel or chunk is chunks[-1]):
                first, future = in_flight.popleft()
                show_answer(first, future)
    finally:  # after a failure, the requests still in flight are not needed
        for _, future in in_flight:
            future.cancel()


def stream_all(chunks: Sequence[range], open_stream: Callable[[range], grpc.Call], parallel: int,
               show: Callable[[range, pb.Translation], None]) -> tuple[range, grpc.RpcError] | None:
    """Opens a stream for each chunk, `parallel` at a time (the next as one ends), and shows
    each translation as it arrives, whichever stream it comes from. Returns the first failed
    stream's chunk and error, the streams still open cancelled, or None."""
    arrivals: queue.Queue = queue.Queue()  # (chunk, a translation, an error, or None: the stream ended)
    open_calls: dict[range, grpc.Call] = {}
    waiting = iter(chunks)

    def receive(chunk: range, call: grpc.Call) -> None:
        try:
            for response in call:
                for translation in response.translations:
                    arrivals.put((chunk, translation))
            arrivals.put((chunk, None))
        except grpc.RpcError as error:
            arrivals.put((chunk, error))

    def open_next() -> None:
        chunk = next(waiting, None)
        if chunk is not None:
            open_calls[chunk] = open_stream(chunk)
            threading.Thread(target=receive, args=(chunk, open_calls[chunk]), daemon=True).start()

    for _ in range(parallel):
        open_next()
    try:
        while open_calls:
            chunk, arrival = arrivals.get()
            if isinstance(arrival, grpc.RpcError):
                return chunk, arrival
            if arrival is None:
                del open_calls[chunk]
                open_next()
            else:
                show(chunk, arrival)
        return None
    finally:  # after a failure, the streams still open are not needed
        for call in open_calls.values():
            call.cancel()


def show(translation: pb.Translation, first: int, texts: Sequence[str], as_json: bool) -> None:
    """A translation of the request whose first text is texts[first]."""
    index = first + translation.index
    if as_json:
        print(json.dumps({"index": index, "source": texts[index],
                          "hypotheses": [{"text": h.text, "score": round(h.score, 4), "tokens": h.token_count}
                                         for h in translation.hypotheses]}, ensure_ascii=False), flush=True)
        return
    for hypothesis in translation.hypotheses:
        print(hypothesis.text, flush=True)


if __name__ == "__main__":
    main()
