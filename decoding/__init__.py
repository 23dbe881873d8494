"""Backend-free decoding: greedy and beam search over a step function (numpy only, no torch, no ONNX)."""

from decoding.search import DecodingParams, Hypothesis, StepBackend, search

__all__ = ["DecodingParams", "Hypothesis", "StepBackend", "search"]
