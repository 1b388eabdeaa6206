"""Stage 0, the presence head: colour histograms and the detector's own pooled features, a
linear head on each; it is fitted with a validation threshold, refuses another detector's
features, decides no_cervix alone in the engine, and a cervix it vouches for that the
detector cannot place is cropped as the whole frame (a close-up)."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from models.detector import DetectorConfig, build_detector
from models.io import load_card, load_weights, sha256_file
from pipelines.data.manifest import load_manifest
from pipelines.engine.presence import colour_histograms, detect_with_features, load_presence
from pipelines.engine.qc import QCPipeline
from pipelines.engine.qc_result import Label
from pipelines.training.presence import (PhotoFeatures, PresenceTrainConfig, balanced_threshold, fit_head,
                                         new_source_rates, train_presence, zoomed)
from tests.qc_fixtures import tiny_weights


def test_balanced_threshold_separates_the_classes_from_the_middle_of_the_gap():
    y = np.array([1, 1, 1, 0, 0, 0])
    s = np.array([2.0, 1.5, 0.6, 0.2, -1.0, -2.0])
    t, bacc = balanced_threshold(y, s)
    assert bacc == 1.0 and t == pytest.approx(0.4)


def test_histograms_are_normalised_and_pooled_features_do_not_depend_on_batch_padding():
    red, green = torch.zeros(3, 40, 60, dtype=torch.uint8), torch.zeros(3, 90, 50, dtype=torch.uint8)
    red[0], green[1] = 220, 220
    h = colour_histograms([red, green])
    assert h.shape == (2, 512) and torch.allclose((h**2).sum(1), torch.ones(2))
    assert h[0].argmax() != h[1].argmax()
    torch.manual_seed(0)
    det = build_detector(DetectorConfig(backbone="resnet18", min_size=96, max_size=96)).eval()
    a, b = torch.rand(3, 60, 80), torch.rand(3, 90, 40)
    _, alone = detect_with_features(det, [a], torch.device("cpu"))
    _, batched = detect_with_features(det, [a, b], torch.device("cpu"))  # one batch would pad a to b's height
    assert torch.equal(alone[0], batched[0])


def test_presence_head_fits_exports_its_threshold_and_refuses_another_detector(tiny_dataset, tmp_path):
    weights = tiny_weights(tmp_path / "w", detector_threshold=0.0)
    df = load_manifest(tiny_dataset.manifest)
    card_path = train_presence(PresenceTrainConfig(out_dir=tmp_path / "p"), weights / "detector.json", df, df,
                               torch.device("cpu"))
    _, card = load_weights(card_path)
    val = card.metrics["val"]
    assert card.name == "presence" and val["n_no_cervix"] == int((df["kind"] == "no_cervix").sum())
    assert val["roc_auc"] > 0.9  # fitted and scored on the same photos here: it must at least fit them
    left_out = {k: v for k, v in card.metrics["new_source"].items() if not k.startswith("pooled_")}
    assert set(left_out) == set(df["source"]) and all(0 <= v["correct"] <= 1 for v in left_out.values())
    det_card = load_card(weights / "detector.json")
    head, _ = load_presence(card_path, det_card)
    assert head.hist_weight.abs().sum() > 0 and head.feat_weight.abs().sum() > 0
    with pytest.raises(ValueError, match="another detector"):  # e.g. the detector was retrained, the head not
        load_presence(card_path, det_card.model_copy(update={"sha256": "f" * 64}))



def test_turned_copies_of_every_training_photo_join_the_fit(tiny_dataset, tmp_path):
    """A photo stored turned by a quarter (no EXIF tag) changed 6.2% of the validation labels,
    mostly to no_cervix: `turn_copies` adds each training photo turned by 90 (and 270) degrees."""
    weights = tiny_weights(tmp_path / "w", detector_threshold=0.0)
    df = load_manifest(tiny_dataset.manifest)
    known = int(df["kind"].isin(["regular", "green", "iodine", "no_cervix"]).sum())
    plain = load_weights(train_presence(PresenceTrainConfig(out_dir=tmp_path / "a"), weights / "detector.json", df,
                                        df, torch.device("cpu")))
    turned = load_weights(train_presence(PresenceTrainConfig(out_dir=tmp_path / "b", turn_copies=2),
                                         weights / "detector.json", df, df, torch.device("cpu")))
    assert plain[1].training["n_train_turned"] == 0 and turned[1].training["n_train_turned"] == 2 * known
    assert not torch.equal(plain[0]["feat_weight"], turned[0]["feat_weight"])  # the copies moved the fit

def test_the_presence_head_alone_decides_no_cervix(tiny_dataset, tmp_path):
    paths = sorted(tiny_dataset.out_dir.glob("images/**/*.jpg"))[:4]
    qc = QCPipeline(tiny_weights(tmp_path / "never", detector_threshold=0.0, presence_threshold=1.0))
    results = qc.run(paths)
    assert all(r.label == Label.NO_CERVIX and r.presence_score == 0.0 for r in results)
    assert all(r.cervix_score is not None for r in results) and "presence" in results[0].timings_ms


def test_a_vouched_cervix_the_detector_cannot_place_is_cropped_whole(tiny_dataset, tmp_path):
    paths = sorted(tiny_dataset.out_dir.glob("images/**/*.jpg"))[:4]
    qc = QCPipeline(tiny_weights(tmp_path / "closeup", detector_threshold=1.01, presence_threshold=-1.0))
    for r in qc.run(paths):
        assert r.label in (Label.REGULAR, Label.NON_REGULAR)
        assert r.cervix_box == [0.0, 0.0, float(r.width), float(r.height)]
    without = QCPipeline(tiny_weights(tmp_path / "old", detector_threshold=1.01))  # no stage 0: the old rule
    assert without.presence is None
    assert all(r.label == Label.NO_CERVIX and r.presence_score is None for r in without.run(paths))


def test_extra_training_photos_join_training_but_never_the_threshold(tiny_dataset, tmp_path):
    """Synthetic scenes join the presence head's training (the recipe's fix for synthetic
    cervixes called no_cervix) while the threshold stays on the main manifest's validation."""
    from typer.testing import CliRunner

    from pipelines.cli import app
    from pipelines.engine.detector import load_detector
    from pipelines.training.presence import photo_features, score

    weights = tiny_weights(tmp_path / "w", detector_threshold=0.0)
    df = pd.read_csv(tiny_dataset.manifest)  # the shared set's folder stays untouched: absolute paths
    df["path"] = [str((tiny_dataset.manifest.parent / p).resolve()) for p in df["path"]]
    df["split"] = np.where(np.arange(len(df)) % 2 == 0, "train", "val")
    main = tmp_path / "presence_main.csv"
    df.to_csv(main, index=False)
    # the same photos with the other split and the other answer (cervix <-> none): pooled into the
    # threshold, either half of them moves it (with the answers kept it stood still, unseen)
    extra = df.assign(source="extra-" + df["source"], split=np.where(df["split"] == "val", "train", "val"),
                      kind=np.where(df["kind"] == "no_cervix", "regular", "no_cervix"))
    extra_path = tmp_path / "presence_extra.csv"
    extra.to_csv(extra_path, index=False)
    runs = {}
    for name, more in (("alone", []), ("mixed", ["--extra-manifest", str(extra_path)]),
                       ("zoomed", ["--zoom-copies", "1"])):
        r = CliRunner().invoke(app, ["train-presence", str(main), "--detector", str(weights / "detector.json"),
                                     "-o", str(tmp_path / name), *more])
        assert r.exit_code == 0, r.output
        runs[name] = load_card(tmp_path / name / "presence.json")
    n_alone, n_mixed = (sum(runs[k].training["n_train"].values()) for k in ("alone", "mixed"))
    assert n_mixed == n_alone + int((extra["split"] == "train").sum())
    assert any(s.startswith("extra-") for s in runs["mixed"].training["train_sources"])
    val = runs["mixed"].metrics["val"]
    assert val["n_cervix"] + val["n_no_cervix"] == int((df["split"] == "val").sum())  # main validation only
    assert not any(s.startswith("extra-") for s in val["per_source"])
    detector, det_card = load_detector(weights / "detector.json")
    main_val = load_manifest(main).query("split == 'val'")
    f = photo_features(detector, det_card.config["max_size"], main_val, torch.device("cpu"))
    head, card = load_presence(tmp_path / "mixed" / "presence.json", det_card)
    assert card.thresholds["score"] == pytest.approx(balanced_threshold(f.labels, score(head, f))[0], abs=1e-6)
    zoomed = runs["zoomed"].training  # copies join training, not the counts of photos
    assert zoomed["n_train_zoomed"] == n_alone and sum(zoomed["n_train"].values()) == n_alone
    assert runs["zoomed"].sha256 != runs["alone"].sha256
    # refused before the folder's earlier head is said to be replaced (it was said, then refused)
    r = CliRunner().invoke(app, ["train-presence", str(main), "--detector", str(weights / "detector.json"),
                                 "-o", str(tmp_path / "alone"), "--zoom-copies", "-1"])
    assert r.exit_code != 0 and "--zoom-copies must be >= 0" in r.output
    assert "fitting again replaces it" not in r.output
    assert load_card(tmp_path / "alone" / "presence.json").sha256 == runs["alone"].sha256


def _features(groups: dict[str, tuple[int, list[float]]], rng: np.random.Generator, n: int = 30) -> PhotoFeatures:
    """n photos per source: (label, mean of the features); the histograms carry the same
    two values in their first bins (both heads see the same photos)."""
    feats = np.concatenate([rng.normal(mean, 0.3, (n, len(mean))) for _, mean in groups.values()])
    labels = np.concatenate([np.full(n, label) for label, _ in groups.values()])
    sources = np.concatenate([np.full(n, name, dtype=object) for name in groups])
    hist = np.zeros((len(labels), 512))
    hist[:, : feats.shape[1]] = feats
    return PhotoFeatures(hist, feats, labels, sources)


# 'odd' negatives look like cervixes on the first feature and differ only on the second
ODD_ONE_OUT = {"cervix-a": (1, [2.0, 0.0]), "cervix-b": (1, [2.0, 0.0]), "gut": (0, [-2.0, 0.0]),
               "skin": (0, [-2.0, 0.0]), "odd": (0, [2.0, 3.0])}


def test_a_source_unlike_the_others_shows_its_own_rate_when_left_out():
    """Validation pooled over known sources hides a kind of photo the head only gets right
    because it trained on it; leaving each source out shows it ('odd')."""
    rng = np.random.default_rng(0)
    train, val = _features(ODD_ONE_OUT, rng), _features(ODD_ONE_OUT, rng)
    rates = new_source_rates(train, val, None, PresenceTrainConfig(out_dir=Path("."), c_hist=1.0, c_feat=1.0))
    assert rates["odd"]["correct"] < 0.2 and rates["odd"]["n"] == 60
    assert all(rates[s]["correct"] > 0.9 for s in ("cervix-a", "cervix-b", "gut", "skin"))
    assert rates["pooled_other_sources"]["sources"] == 3 and rates["pooled_cervix_sources"]["n"] == 120


def test_a_left_out_sources_zoomed_copies_leave_with_it():
    """Copies of the left-out source kept in training would teach the head that very source
    and hide its rate; here the copies are like the photos, so a leak would show."""
    rng = np.random.default_rng(0)
    train, val, copies = _features(ODD_ONE_OUT, rng), _features(ODD_ONE_OUT, rng), _features(ODD_ONE_OUT, rng)
    cfg = PresenceTrainConfig(out_dir=Path("."), c_hist=1.0, c_feat=1.0, zoom_weight=1.0)
    rates = new_source_rates(train, val, None, cfg, [(copies, cfg.zoom_weight)])
    assert rates["odd"]["correct"] < 0.2 and rates["odd"]["n"] == 60


def test_zoomed_copies_keep_the_photos_aspect_and_at_least_the_minimum_area():
    g = torch.Generator().manual_seed(0)
    photo = torch.zeros(3, 300, 400, dtype=torch.uint8)
    parts = [zoomed(photo, 0.35, g) for _ in range(200)]
    areas = [p.shape[1] * p.shape[2] / (300 * 400) for p in parts]
    assert min(areas) >= 0.34 and max(areas) <= 1.0 and max(areas) - min(areas) > 0.4
    assert all(abs(p.shape[2] / p.shape[1] - 4 / 3) < 0.02 for p in parts)


def test_a_colour_weight_of_zero_leaves_the_score_to_the_detector_features():
    rng = np.random.default_rng(1)
    f = _features({"cervix": (1, [2.0, 0.0]), "gut": (0, [-2.0, 0.0])}, rng)
    f.hist[:] = rng.normal(0, 1, f.hist.shape)  # colours that disagree with the features
    heads = {w: fit_head(f, PresenceTrainConfig(out_dir=Path("."), colour_weight=w)) for w in (0.0, 1.0)}
    other_colours = torch.as_tensor(rng.normal(0, 1, f.hist.shape))
    feats, hist = torch.as_tensor(f.feats), torch.as_tensor(f.hist)
    assert torch.allclose(heads[0.0](hist, feats), heads[0.0](other_colours, feats))
    assert not torch.allclose(heads[1.0](hist, feats), heads[1.0](other_colours, feats))


def test_train_presence_names_a_missing_class_before_reading_a_photo_and_fits_again_into_its_run(
        tiny_dataset, tmp_path, caplog, capsys):
    """A site without no-cervix photos was told so after every photo's features, with no counts
    and no way on; a second fit into the head's own run folder was refused as a weights folder."""
    from typer.testing import CliRunner

    from pipelines.cli import app
    from pipelines.data.manifest import rebased, write_manifest

    weights = tiny_weights(tmp_path / "w", detector_threshold=0.0)
    df = load_manifest(tiny_dataset.manifest)
    df["split"] = ["train" if i % 2 else "val" for i in range(len(df))]
    df["sha256"] = [f"{i:064x}" for i in range(len(df))]  # as import-labels records them
    assert (df["kind"] == "no_cervix").any() and (df["kind"] != "no_cervix").any()
    both, cervix_only = tmp_path / "both.csv", tmp_path / "cervix_only.csv"
    write_manifest(rebased(df, both), both)
    write_manifest(rebased(df[df["kind"] != "no_cervix"], cervix_only), cervix_only)
    runner = CliRunner()
    base = ["train-presence", "--detector", str(weights / "detector.json"), "-o", str(tmp_path / "p")]
    r = runner.invoke(app, [*base, str(cervix_only)])
    assert r.exit_code == 2 and "0 without" in r.output and "kind no_cervix" in r.output, r.output
    assert not (tmp_path / "p").exists()
    blank = tmp_path / "blank.csv"  # blamed on missing no_cervix photos (an audit)
    write_manifest(rebased(df.assign(split=""), blank), blank)
    r = runner.invoke(app, [*base, str(blank)])
    assert r.exit_code == 2 and "no row in the train split" in r.output and "no_cervix" not in r.output, r.output
    # a card whose weights check out but whose config the builder refuses: a traceback after the
    # header check
    import json
    import shutil

    broken = tmp_path / "broken"
    broken.mkdir()
    shutil.copy(weights / "detector.safetensors", broken / "detector.safetensors")
    card = json.loads((weights / "detector.json").read_text())
    card["config"]["no_such_setting"] = 1
    (broken / "detector.json").write_text(json.dumps(card))
    r = runner.invoke(app, ["train-presence", "--detector", str(broken / "detector.json"), "-o",
                            str(tmp_path / "p"), str(both)])
    assert r.exit_code == 2 and "--detector: " in r.output and "cannot load it" in r.output, r.output
    assert not (tmp_path / "p").exists()
    for _ in range(2):
        with caplog.at_level("WARNING", logger="pipelines.training.presence"):
            r = runner.invoke(app, [*base, str(both)])
        assert r.exit_code == 0 and (tmp_path / "p" / "presence.json").is_file(), r.output
    assert "fitting again replaces it" in r.output and "validation: cervix found" in r.output
    assert "each source left out once" in r.output  # the tiny set has several sources
    # fitted again into a detector's run folder: it was told to pass --resume, which it has not
    run = tmp_path / "p"
    (run / "detector.json").write_bytes((weights / "detector.json").read_bytes())
    (run / "checkpoint.pt").write_bytes(b"a detector's checkpoint")
    r = runner.invoke(app, [*base, str(both)])
    assert r.exit_code == 0 and "fitting again replaces it" in r.output and "--resume" not in r.output, r.output
    for name in ("detector.json", "checkpoint.pt"):
        (run / name).unlink()
    # the split it was fitted under, on its card: judged on that split, no warning of a leak
    from pipelines.commands.evaluation import _check_split
    from pipelines.data.splits import split_fingerprint

    assert load_card(tmp_path / "p" / "presence.json").data["split_fingerprint"] == split_fingerprint(df) is not None
    assert load_card(tmp_path / "p" / "presence.json").data["manifest_sha256"] == sha256_file(both)
    for name in ("presence.json", "presence.safetensors"):
        (weights / name).write_bytes((tmp_path / "p" / name).read_bytes())
    _check_split(both, weights)
    reshuffled = tmp_path / "reshuffled.csv"
    write_manifest(rebased(df.assign(split=df["split"].map({"train": "val", "val": "train"})), reshuffled), reshuffled)
    _check_split(reshuffled, weights)
    assert capsys.readouterr().err.count("is not the split any of") == 1
    assert "rest on few photos" in caplog.text  # a handful of each here
