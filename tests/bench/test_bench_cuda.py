"""make bench-cuda's graph timer, on the CPU provider: it counts every encoder run and decoder
step, the host caches' included, and leaves the classes it times as it found them."""

import math

import numpy as np
import onnxruntime as ort
import pytest

from bench.cuda import GraphTimer
from decoding import DecodingParams
from export.package import ModelPackage
from server.engine.buffers import HostBuffers
from server.engine.engine import ENCODE_ROWS, Engine


@pytest.mark.parametrize("cache_on_device", [False, True])
def test_the_timer_counts_every_encoder_run_and_decoder_step(tiny_package, cache_on_device):
    engine = Engine(ModelPackage.load(tiny_package), precision="fp32", device="cpu", cache_on_device=cache_on_device)
    rng = np.random.default_rng(0)
    sources = [list(rng.integers(4, 120, size=rng.integers(1, 20))) for _ in range(20)]
    untimed = ort.InferenceSession.run, ort.InferenceSession.run_with_iobinding, HostBuffers.run_decoder
    with GraphTimer() as timer:
        batch, steps = engine.new_search(), 0
        engine.admit(batch, range(20), sources, [DecodingParams(beam_size=2, max_length=12)] * 20)
        while len(batch):
            batch.step()
            steps += 1
        graphs = timer.take()
    assert graphs["encoder"][0] == math.ceil(20 / ENCODE_ROWS)  # on CPU, length-sorted runs
    assert graphs["decoder_step"][0] == steps > 0
    assert (ort.InferenceSession.run, ort.InferenceSession.run_with_iobinding, HostBuffers.run_decoder) == untimed
    assert timer.take() == {}
