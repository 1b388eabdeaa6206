"""The stage-2 report's tables, from hand-made runs (no model): what each row claims to be."""

import numpy as np

from pipelines.evaluation.report import table6


def _run(split: str, y: list[int], score: list[float]) -> dict:
    return {"model": "classifier", "input_size": 32, "split": split, "y": np.array(y), "score": np.array(score),
            "threshold": 0.5}


def test_a_validation_run_beside_a_test_run_is_named_as_such():
    """`eval` writes val and test runs of one model into one folder; both rows read
    "ResNeSt, 32x32", so a validation figure could pass for a test one."""
    page = table6([_run("test", [1, 0], [0.9, 0.1]), _run("val", [0, 0], [0.1, 0.2])])
    assert "ResNeSt, 32x32, test" in page and "ResNeSt, 32x32, val" in page
    assert "n/a" in page and "nan" not in page  # the val run has no positive: no sensitivity
