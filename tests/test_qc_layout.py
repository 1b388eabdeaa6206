"""The engine's channels_last layout is a speed choice only: the same inputs give the same
labels, boxes and scores as the default layout."""

import numpy as np
import pytest

from pipelines.engine.config import QCConfig
from pipelines.engine.qc import QCPipeline
from tests.qc_fixtures import fuzz_set, tiny_weights


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return tiny_weights(tmp_path_factory.mktemp("w"), detector_threshold=0.0)


def test_channels_last_gives_the_same_results_as_the_default_layout(weights, tiny_dataset):
    inputs = [data for data, _ in fuzz_set().values()]
    inputs += [p.read_bytes() for p in sorted(tiny_dataset.out_dir.rglob("*.jpg"))[:12]]
    fast = QCPipeline(weights, QCConfig(channels_last=True)).run(inputs)
    plain = QCPipeline(weights, QCConfig(channels_last=False)).run(inputs)
    assert any(r.cervix_box for r in plain), "the comparison needs images that reach stage 2"
    for a, b in zip(fast, plain):
        assert (a.label, a.kind, a.error) == (b.label, b.kind, b.error)
        if b.cervix_box:
            np.testing.assert_allclose(a.cervix_box, b.cervix_box, atol=0.5)
            assert a.deep_sad_score == pytest.approx(b.deep_sad_score, rel=1e-3)
            assert a.resnest_prob == pytest.approx(b.resnest_prob, rel=1e-3, abs=1e-4)
