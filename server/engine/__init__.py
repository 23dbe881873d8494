"""Inference on ONNX Runtime: package loading, the step backend, and the engine that ties them to search."""
