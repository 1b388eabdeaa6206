import numpy as np
import pytest

from pipelines.evaluation.classification import binary_metrics, calibrate_threshold, metrics_by_group


def test_metrics_match_the_papers_deep_sad_confusion_matrix():
    # Table 5: 94 of 101 non-regular found, no regular image flagged, 307 regular.
    y = np.array([1] * 101 + [0] * 307)
    scores = np.array([1.0] * 94 + [0.0] * 7 + [0.0] * 307)
    m = binary_metrics(y, scores, threshold=0.5)
    assert m.sensitivity == pytest.approx(0.931, abs=1e-3)
    assert m.specificity == 1.0 and m.precision == 1.0
    assert m.f1 == pytest.approx(0.964, abs=1e-3)
    assert m.accuracy == pytest.approx(0.983, abs=1e-3)
    assert m.confusion == [[307, 0], [7, 94]]


def test_max_f1_threshold_and_target_sensitivity_threshold():
    y = np.array([0, 0, 0, 1, 0, 1, 1, 1])
    s = np.array([0.1, 0.2, 0.3, 0.35, 0.4, 0.6, 0.7, 0.9])
    t = calibrate_threshold(y, s)
    assert binary_metrics(y, s, t).f1 == max(binary_metrics(y, s, c).f1 for c in s)
    assert calibrate_threshold(y, s, rule="edge") == 0.35  # the lowest flagged validation score itself
    t95 = calibrate_threshold(y, s, target_sensitivity=1.0, rule="edge")
    assert t95 == 0.35 and binary_metrics(y, s, t95).sensitivity == 1.0
    with pytest.raises(ValueError, match="both"):
        calibrate_threshold(np.zeros(3), np.ones(3))


def test_metrics_are_reported_overall_and_per_source():
    y = np.array([1, 0, 1, 0])
    s = np.array([0.9, 0.1, 0.2, 0.3])
    out = metrics_by_group(y, s, 0.5, ["a", "a", "b", "b"])
    assert set(out) == {"overall", "a", "b"}
    assert out["a"].accuracy == 1.0 and out["b"].sensitivity == 0.0 and out["overall"].n == 4


def test_midpoint_rule_keeps_every_validation_decision_and_sits_in_the_middle_of_the_gap():
    y = np.array([0, 0, 0, 1, 0, 1, 1, 1])
    s = np.array([0.1, 0.2, 0.3, 0.35, 0.4, 0.6, 0.7, 0.9])
    edge, mid = calibrate_threshold(y, s, rule="edge"), calibrate_threshold(y, s)
    assert ((s >= edge) == (s >= mid)).all()  # the same decisions on validation
    assert mid == pytest.approx(0.325)  # halfway between 0.3 (the score under the cut) and 0.35
    logit = calibrate_threshold(y, s, space="logit")
    assert 0.3 < logit < 0.35 and logit != pytest.approx(0.325)
    assert calibrate_threshold(y, s * 10, space="log") == pytest.approx(np.sqrt(3.0 * 3.5))  # geometric mean
    t = calibrate_threshold(y, s, target_sensitivity=0.75)
    assert 0.4 < t < 0.6 and binary_metrics(y, s, t).sensitivity == 0.75


def test_a_source_without_positives_has_no_sensitivity_rather_than_zero():
    """0.0 read as "finds none" in the cards' rows of sources with no green or iodine photo."""
    quiet = binary_metrics(np.zeros(4), np.array([0.1, 0.2, 0.3, 0.4]), 0.5)
    assert np.isnan(quiet.sensitivity) and np.isnan(quiet.precision) and np.isnan(quiet.f1)
    assert quiet.specificity == 1.0
    one_false_flag = binary_metrics(np.zeros(4), np.array([0.1, 0.2, 0.3, 0.9]), 0.5)
    assert np.isnan(one_false_flag.sensitivity) and one_false_flag.precision == 0.0 and one_false_flag.f1 == 0.0


def test_the_target_sensitivity_asks_for_no_more_positives_than_it_needs():
    y = np.array([1] * 25 + [0] * 5)
    s = np.concatenate([np.arange(25, 0, -1) / 100 + 0.5, np.full(5, 0.1)])
    t = calibrate_threshold(y, s, target_sensitivity=0.56, rule="edge")  # 0.56 * 25 = 14.000000000000002
    assert binary_metrics(y, s, t).confusion[1][1] == 14


def test_the_midpoint_keeps_every_decision_where_scores_fall_under_the_logit_clip():
    y = np.array([0, 0, 1, 1])
    s = np.array([1e-9, 2e-8, 3e-8, 0.9])  # both sides of the cut clip to 1e-7 in logit space
    t = calibrate_threshold(y, s, space="logit")
    assert 2e-8 < t <= 3e-8 and binary_metrics(y, s, t).f1 == 1.0
