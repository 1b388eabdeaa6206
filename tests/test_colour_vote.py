"""The two_of_three policy: a crop is non-regular when two of Deep SAD, ResNeSt and the
crop-colour scorer say so; it exists only where the weights folder carries the colour model."""

import re

import pytest

from pipelines.engine.config import QCConfig
from pipelines.engine.qc import QCPipeline
from pipelines.engine.qc_result import Label
from tests.qc_fixtures import jpeg_bytes, textured_scene, tiny_weights

# tiny_weights' thresholds: Deep SAD distance 1.0, ResNeSt probability 0.5, colour as given
SAD_YES, SAD_NO, RES_YES, RES_NO = 2.0, 0.5, 0.9, 0.1


@pytest.fixture(scope="module")
def with_colour(tmp_path_factory):
    return QCPipeline(tiny_weights(tmp_path_factory.mktemp("wc"), detector_threshold=0.0, colour_threshold=0.6),
                      QCConfig(device="cpu", runtime="torch"))


@pytest.mark.parametrize("sad, res, colour, flagged", [
    (SAD_YES, RES_YES, 0.1, True), (SAD_YES, RES_NO, 0.7, True), (SAD_NO, RES_YES, 0.7, True),
    (SAD_YES, RES_YES, 0.7, True),
    (SAD_YES, RES_NO, 0.1, False), (SAD_NO, RES_YES, 0.1, False), (SAD_NO, RES_NO, 0.7, False),
    (SAD_NO, RES_NO, 0.1, False)])
def test_two_of_three_flags_a_crop_exactly_when_two_scorers_do(with_colour, sad, res, colour, flagged):
    want = Label.NON_REGULAR if flagged else Label.REGULAR
    assert with_colour.label_for(sad, res, "two_of_three", colour) == want


def test_a_score_exactly_at_its_threshold_is_flagged_as_the_validation_figures_counted_it(with_colour):
    """binary_metrics counts a score at the threshold as flagged: an engine that did not would
    label such crops otherwise than the card's validation figures say (a mutation survived)."""
    for policy in ("deep_sad", "resnest"):
        assert with_colour.label_for(1.0, 0.5, policy) == Label.NON_REGULAR, policy
    assert with_colour.label_for(SAD_NO, RES_NO, "two_of_three", 0.6) == Label.REGULAR  # one vote of three
    assert with_colour.label_for(SAD_YES, RES_NO, "two_of_three", 0.6) == Label.NON_REGULAR


def test_the_engine_reports_the_colour_score_and_votes_with_it(tmp_path):
    """Deep SAD says no to every crop (its threshold out of reach) and the classifier yes, so
    the colour score decides each label; its random weights put these scenes on both sides."""
    weights = tiny_weights(tmp_path, detector_threshold=0.0, colour_threshold=0.5, colour_spread=1.0,
                           sad_threshold=100.0)
    qc = QCPipeline(weights, QCConfig(device="cpu", runtime="torch"))
    results = qc.run([jpeg_bytes(textured_scene(seed)) for seed in range(3)], policy="two_of_three")
    assert all(r.label in (Label.REGULAR, Label.NON_REGULAR) for r in results)
    assert [r.label for r in results] == [Label.NON_REGULAR if r.colour_score >= 0.5 else Label.REGULAR
                                          for r in results]
    assert len({r.label for r in results}) == 2


def test_a_policy_that_needs_the_colour_model_is_refused_where_the_weights_lack_it(tmp_path):
    plain = tiny_weights(tmp_path / "w", detector_threshold=0.0)
    with pytest.raises(ValueError, match="colour"):
        QCPipeline(plain, QCConfig(device="cpu", policy="two_of_three"))
    qc = QCPipeline(plain, QCConfig(device="cpu", runtime="torch"))
    assert "two_of_three" not in qc.policies
    with pytest.raises(ValueError, match="colour"):
        qc.run([jpeg_bytes(textured_scene(0))], policy="two_of_three")
    assert qc.run([jpeg_bytes(textured_scene(0))])[0].colour_score is None


def test_clean_refuses_the_vote_before_any_engine_starts_where_the_weights_lack_the_colour_model(tmp_path):
    from typer.testing import CliRunner

    from pipelines.cli import app

    src = tmp_path / "photos"
    src.mkdir()
    (src / "a.jpg").write_bytes(jpeg_bytes(textured_scene(0)))
    plain = tiny_weights(tmp_path / "w", detector_threshold=0.0)
    r = CliRunner().invoke(app, ["clean", str(src), "-o", str(tmp_path / "out"), "--weights", str(plain),
                                 "--policy", "two_of_three", "--engine", "ray"])
    assert r.exit_code != 0 and "colour.json" in r.output
    assert not (tmp_path / "out").exists()


def test_a_card_without_the_threshold_the_engine_reads_is_refused_by_the_preflight_and_the_engine(tmp_path):
    """A misspelt threshold key, or a colour model of another crop size, passed `serve`'s and
    Ray's preflight (check_weights); the colour card's also the engine's start, and then failed
    every cervix photo with a traceback (an audit)."""
    import shutil

    from models.io import WeightsIntegrityError, load_weights, save_weights
    from pipelines.engine.weights_folder import check_weights

    base = tiny_weights(tmp_path / "w", 0.0, presence_threshold=0.5, colour_threshold=0.5)
    for name, update, said in (
            ("colour", {"thresholds": {"probabilty": 0.5}},
             "colour.json: cannot load it (ValueError: no 'probability'"),
            ("colour", {"config": {"hist_bins": 8, "crop_side": 64}}, "crop_side 64"),
            ("deep_sad", {"thresholds": {"dist": 1.0}}, "deep_sad.json: cannot load it (ValueError: no 'distance'"),
            ("presence", {"thresholds": {}}, "presence.json: cannot load it (ValueError: no 'score' threshold (it "
                                             "has: none)")):
        folder = tmp_path / f"{name}-{len(str(update))}"
        shutil.copytree(base, folder)
        state, card = load_weights(folder / f"{name}.json")
        save_weights(state, folder / name, card.model_copy(update=update))
        with pytest.raises(WeightsIntegrityError, match=re.escape(said)):
            check_weights(folder, exports=False)
        with pytest.raises(WeightsIntegrityError, match=re.escape(said.split(" (")[0] if "crop_side" not in said
                                                                   else said)):
            QCPipeline(folder, QCConfig(runtime="torch"))


def test_an_optional_card_that_is_a_dangling_link_or_a_folder_is_refused_not_taken_as_absent(tmp_path):
    """presence.json or colour.json as a dangling link (a weights folder copied without the
    link's target) read as no card: stage 0 or the colour vote switched off, unsaid (an audit)."""
    import shutil

    from models.io import WeightsIntegrityError
    from pipelines.engine.weights_folder import check_weights

    base = tiny_weights(tmp_path / "w", 0.0, presence_threshold=0.5, colour_threshold=0.5)
    for name, broken in (("presence.json", "link"), ("colour.json", "folder"), ("findings.json", "link")):
        folder = tmp_path / f"{name}-{broken}"
        shutil.copytree(base, folder)
        (folder / name).unlink(missing_ok=True)
        if broken == "link":
            (folder / name).symlink_to(tmp_path / "gone.json")
        else:
            (folder / name).mkdir()
        with pytest.raises(WeightsIntegrityError, match=re.escape(f"{name}: not a file")):
            check_weights(folder, exports=False)
        with pytest.raises(WeightsIntegrityError, match=re.escape(f"{name}: not a file")):
            QCPipeline(folder, QCConfig(runtime="torch"))
