"""Backend-free decoding: greedy and beam search over a step function (numpy only, no torch, no ONNX)."""

from decoding.search import Candidates, DecodingParams, Hypothesis, StepBackend, output_budget, search

__all__ = ["Candidates", "DecodingParams", "Hypothesis", "StepBackend", "output_budget", "search"]
