"""Quality findings: each score moves with the degradation it names, the engine reports them
against its card's thresholds without touching the label, clean copies flagged files into
finding folders, and calibration keeps false flags within the budget it was given."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from pipelines.clean.run import clean
from pipelines.data import degradations
from pipelines.engine.findings import finding_scores, load_findings_card
from pipelines.engine.qc import QCPipeline
from pipelines.engine.qc_result import FINDINGS, Label, QCResult
from pipelines.evaluation.findings_calibration import pick_threshold
from tests.qc_fixtures import tiny_weights

PASS_ALL = dict.fromkeys(FINDINGS, 1e9)


def _tissue(seed: int = 0, side: int = 256) -> np.ndarray:
    """A pink, textured, mid-grey photo stand-in: blobs and fine detail at several scales."""
    rng = np.random.default_rng(seed)
    base = np.zeros((side, side), np.float32)
    for scale in (1, 2, 4, 16, 64):
        small = rng.normal(0, 1, (side // scale + 1, side // scale + 1)).astype(np.float32)
        base += np.asarray(Image.fromarray(small).resize((side, side), Image.BICUBIC))[:side, :side] / scale ** 0.3
    base = (base - base.min()) / (base.max() - base.min())
    rgb = np.stack([0.35 + 0.6 * base, 0.15 + 0.55 * base, 0.15 + 0.5 * base], -1)
    return (rgb * 255).astype(np.uint8)


def _scores(images: list[np.ndarray]) -> dict[str, np.ndarray]:
    crops = torch.stack([torch.from_numpy(np.array(Image.fromarray(x).resize((128, 128), Image.BOX))).permute(2, 0, 1)
                         for x in images]).float() / 255
    return {k: v.numpy() for k, v in finding_scores(crops).items()}


def test_blur_score_rises_with_the_blur_and_ignores_exposure():
    import cv2

    sharp = _tissue()
    sigmas = (1.0, 2.0, 4.0, 8.0, 16.0)
    s = _scores([sharp, *[cv2.GaussianBlur(sharp, (0, 0), s) for s in sigmas], (sharp * 0.5).astype(np.uint8)])["blur"]
    assert s[0] < s[1] < s[2] < s[3], s
    assert min(s[4:6]) > s[1], f"a photo blurred beyond recognition must not read as sharp as a slight blur: {s}"
    assert abs(s[6] - s[0]) < 0.1, "halving the exposure must not read as blur"


def test_blur_is_judged_by_the_sharpest_blocks_so_a_crop_in_focus_in_places_reads_sharp():
    """Defocus and motion blur the whole crop; smooth tissue lacks fine detail in places. A
    crop sharp in its left third and a little soft elsewhere must read near the sharp crop,
    not near the soft one: measured 0.06 of the way, where the whole-crop ratio (the second
    version) read 0.35."""
    import cv2

    sharp = _tissue(6)
    soft = cv2.GaussianBlur(sharp, (0, 0), 1.0)
    partly = soft.copy()
    partly[:, :86] = sharp[:, :86]  # a third of the 256 px photo: three of the nine blocks
    s = _scores([sharp, partly, soft])["blur"]
    assert s[1] - s[0] < 0.15 * (s[2] - s[0]), s


def test_a_photo_without_its_finest_detail_still_reads_more_blur_as_blurrier():
    """A small source's photos, upsampled to the crop, lack the finest octave. On such a photo
    the one-octave ratio had almost stopped moving: blurring it from 2 to 4 px added 0.16 of
    what 0 to 2 px did (and thresholds chosen without the 384 px AnnoCerv photos flagged 10.7%
    of them); read over two octaves it adds 0.46."""
    import cv2

    for seed in range(3):
        soft_source = np.asarray(Image.fromarray(_tissue(seed + 10, 128)).resize((256, 256), Image.BICUBIC))
        s = _scores([soft_source, *[cv2.GaussianBlur(soft_source, (0, 0), sigma) for sigma in (2.0, 4.0)]])["blur"]
        assert s[2] - s[1] > 0.3 * (s[1] - s[0]), s


def test_dark_and_overexposed_scores_follow_the_exposure():
    photo = _tissue(1)
    rng = np.random.default_rng(0)
    s = _scores([photo, degradations.dark(photo, rng), degradations.overexposed(photo, rng)])
    assert s["dark"][1] > s["dark"][0] + 0.2
    assert s["overexposed"][2] > s["overexposed"][0] + 0.2


def test_overexposure_is_read_on_the_lit_frame_so_a_black_surround_does_not_hide_it():
    """An overexposed photo that stage 0 calls no_cervix is judged whole, and a colposcope's
    black surround filled most of its frame: the median over every pixel read it as normal."""
    rng = np.random.default_rng(0)
    bright = degradations.overexposed(_tissue(1), rng)
    framed = np.zeros_like(bright)
    framed[64:192, 64:192] = bright[64:192, 64:192]  # a quarter of the frame is tissue, the rest black
    s = _scores([bright, framed, np.zeros_like(bright)])
    assert s["overexposed"][1] == pytest.approx(s["overexposed"][0], abs=0.05)
    assert s["dark"][1] > 0.9, "dark still reads the whole frame: a black photo is dark"
    assert s["overexposed"][2] == 0.0 and s["dark"][2] == 1.0, "an all-black frame is dark, not a missing score"


def test_glare_score_is_the_share_of_the_crop_under_highlights():
    photo = _tissue(2)
    white = photo.copy()
    white[:64, :] = 255  # a quarter of the crop
    s = _scores([photo, white])["glare"]
    assert s[0] < 0.01 and s[1] == pytest.approx(0.25, abs=0.02)


def test_pick_threshold_flags_no_more_than_the_budget():
    rng = np.random.default_rng(0)
    negatives = rng.normal(0, 1, 1000)
    t = pick_threshold(negatives, 0.02)
    assert (negatives >= t).mean() <= 0.02
    assert (negatives >= t - 0.05).mean() > 0.015, "the threshold should be as low as the budget allows"


def test_thresholds_hold_every_large_source_to_the_budget_not_only_the_pool():
    from pipelines.evaluation.findings_calibration import CalibrationConfig, source_threshold

    rng = np.random.default_rng(1)
    rows = pd.DataFrame({"source": ["a"] * 900 + ["b"] * 300 + ["tiny"] * 20,
                         "blur": np.r_[rng.normal(0, 1, 900), rng.normal(1, 1, 300), rng.normal(5, 1, 20)]})
    cfg = CalibrationConfig(max_false_flags=0.02, min_source_rows=100)
    t = source_threshold(rows, "blur", cfg)
    flagged = (rows["blur"] >= t).groupby(rows["source"]).mean()
    assert flagged["a"] <= 0.02 and flagged["b"] <= 0.02
    large = rows[rows["source"] != "tiny"]
    assert (large["blur"] >= pick_threshold(large["blur"], 0.02)).groupby(large["source"]).mean()["b"] > 0.02, \
        "the pooled threshold alone lets the shifted source over the budget"
    assert flagged["tiny"] > 0.5, "a source under min_source_rows does not move the threshold"


def test_each_source_left_out_is_judged_by_the_threshold_the_others_choose():
    from pipelines.evaluation.findings_calibration import CalibrationConfig, new_source_metrics

    rng = np.random.default_rng(2)
    rows = []
    for source, shift in (("a", 0.0), ("b", 0.0), ("brighter", 0.5)):
        for variant, extra in (("original", 0.0), ("nuisance", 0.0), ("blur", 2.0)):
            rows += [{"source": source, "variant": variant, "blur": v} for v in rng.uniform(0, 1, 400) + shift + extra]
    cfg = CalibrationConfig(max_false_flags=0.015, min_source_rows=100)
    got = new_source_metrics(pd.DataFrame(rows), "blur", cfg)
    assert set(got) == {"a", "b", "brighter"}
    # a and b choose about 0.985; half of the shifted source's undegraded photos lie above it
    assert 0.97 < got["brighter"]["threshold"] < 1.0
    assert 0.4 < got["brighter"]["false_flags_original"] < 0.6 and 0.4 < got["brighter"]["false_flags_nuisance"] < 0.6
    # the shifted source drives the threshold chosen for the others up: they are not flagged
    assert got["a"]["threshold"] > 1.4 and got["a"]["false_flags_original"] == 0.0
    assert got["a"]["recall"] == got["brighter"]["recall"] == 1.0
    assert new_source_metrics(pd.DataFrame(rows[:1200]), "blur", cfg) == {}, "one source: nothing to leave out"


def test_a_photo_known_to_have_a_finding_is_no_false_flag_of_it_but_still_one_of_the_others():
    """The generator's own camera blur: its photo's original and ordinary copy score as blurred
    as a degraded copy, and counting them as must-not-flag rows held its AUC down."""
    from pipelines.evaluation.findings_calibration import CalibrationConfig, finding_metrics, source_threshold

    rng = np.random.default_rng(4)
    rows = []
    for i in range(200):
        known = "blur" if i < 20 else ""
        for variant, extra in (("original", 0.0), ("nuisance", 0.0), ("blur", 2.0), ("dark", 0.0)):
            shift = 2.0 if known and variant != "dark" else extra
            dark = rng.uniform(0, 1) + (2.0 if variant == "dark" else 0.0)
            rows.append({"path": f"p{i}", "source": "gen", "variant": variant, "known_findings": known,
                         "blur": rng.uniform(0, 1) + shift, "dark": dark})
    scores = pd.DataFrame(rows)
    blur = finding_metrics(scores, "blur", 1.5)
    assert blur["n_undegraded"] == 2 * 180 and blur["n_degraded"] == 200
    assert blur["auc"] == 1.0 and blur["false_flags_original"] == 0.0
    assert finding_metrics(scores.drop(columns="known_findings"), "blur", 1.5)["auc"] < 0.96
    dark = finding_metrics(scores, "dark", 1.5)
    assert dark["n_undegraded"] == 2 * 200, "a photo known to be blurred is still one dark must not flag"
    undegraded = scores[scores["variant"].isin(("original", "nuisance"))]
    cfg = CalibrationConfig(max_false_flags=0.015)
    assert source_threshold(undegraded, "blur", cfg) < 1.0 < source_threshold(undegraded.drop(columns="known_findings"),
                                                                               "blur", cfg)
    # every photo known to be blurred: nothing tells where the threshold lies (an IndexError before)
    with pytest.raises(ValueError, match="blur: every calibration photo is known to have it"):
        source_threshold(undegraded.assign(known_findings="blur"), "blur", cfg)
    assert finding_metrics(scores.assign(known_findings="blur"), "blur", 1.5)["auc"] is None  # printed as -


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(3)
    Image.fromarray(_tissue(4)).save(folder / "sharp.jpg", quality=95)
    Image.fromarray(degradations.dark(_tissue(5), rng)).save(folder / "dark.jpg", quality=95)
    return folder


def test_engine_reports_every_finding_against_the_card_without_changing_the_label(tmp_path, photos):
    # detector threshold 0: both photos are cropped and reach stage 2, whose answers must not move
    plain = QCPipeline(tiny_weights(tmp_path / "plain", detector_threshold=0.0))
    carded = QCPipeline(tiny_weights(tmp_path / "carded", detector_threshold=0.0,
                                     findings={**PASS_ALL, "dark": 0.7}))
    files = sorted(photos.iterdir())
    without, with_card = plain.run(files), carded.run(files)
    assert all(r.findings == {} for r in without)
    assert all(r.label in (Label.REGULAR, Label.NON_REGULAR) and r.deep_sad_score is not None for r in without)
    for a, b in zip(without, with_card):
        assert a.label == b.label and a.deep_sad_score == b.deep_sad_score
        assert set(b.findings) == set(FINDINGS)
        assert all(f.flagged == (f.score >= f.threshold) for f in b.findings.values())
        assert b.phash is not None and len(b.phash) == 16
    by_name = {r.path.rsplit("/", 1)[-1]: r for r in with_card}
    assert by_name["dark.jpg"].flags() == ["dark"] and by_name["sharp.jpg"].flags() == []
    row = by_name["dark.jpg"].csv_row()
    assert list(row) == QCResult.csv_fields() and row["flags"] == "dark"
    assert row["dark_score"] == by_name["dark.jpg"].findings["dark"].score


def test_clean_copies_flagged_files_into_finding_folders_and_keeps_the_label(tmp_path, photos):
    weights = tiny_weights(tmp_path / "w", detector_threshold=0.05, findings={**PASS_ALL, "dark": 0.7})
    out, quarantine = tmp_path / "out", tmp_path / "q"
    clean(QCPipeline(weights), photos, out, quarantine, quarantine_findings=("dark",))
    assert sorted(p.name for p in (quarantine / "dark").iterdir()) == ["dark.jpg"]
    # the label's folder as without findings: this detector finds no cervix in either photo
    assert sorted(p.name for p in (quarantine / "no_cervix").iterdir()) == ["dark.jpg", "sharp.jpg"]
    csv = pd.read_csv(out / "results.csv", keep_default_na=False).set_index("path")
    assert set(csv["label"]) == {"no_cervix"}
    assert csv.loc["dark.jpg", "flags"] == "dark" and csv.loc["sharp.jpg", "flags"] == ""
    assert {"blur_score", "dark_score", "overexposed_score", "glare_score", "duplicate_group"} <= set(csv.columns)


def test_calibrate_findings_writes_a_card_the_engine_loads(tmp_path):
    from pipelines.cli import app

    rows = []
    for i in range(12):
        name = f"p{i}.jpg"
        Image.fromarray(_tissue(10 + i)).save(tmp_path / name, quality=95)
        rows.append({"path": name, "patient_id": f"p{i}", "source": "st"[i % 2], "device": "", "kind": "regular",
                     "split": ("train", "val", "test")[i % 3]})
    # a truncated photo ended the scoring in a traceback; one the engine refuses (8 px) scored
    # NaN and the AUC failed: both are left out and named
    (tmp_path / "cut.jpg").write_bytes((tmp_path / "p0.jpg").read_bytes()[:300])
    Image.fromarray(_tissue(3)[:8, :8]).save(tmp_path / "tiny.jpg")
    rows += [{"path": n, "patient_id": n, "source": "s", "device": "", "kind": "regular", "split": "test"}
             for n in ("cut.jpg", "tiny.jpg")]
    pd.DataFrame(rows).to_csv(tmp_path / "split.csv", index=False)
    weights = tiny_weights(tmp_path / "w", detector_threshold=0.05)
    refused = CliRunner().invoke(app, ["calibrate-findings", str(tmp_path / "split.csv"), "--weights",
                                       str(tmp_path / "none"), "-o", str(tmp_path / "cal")])
    assert refused.exit_code == 2 and not (tmp_path / "cal").exists()  # an empty -o was left (an audit)
    pd.DataFrame(rows).assign(split="test").to_csv(tmp_path / "all-test.csv", index=False)
    refused = CliRunner().invoke(app, ["calibrate-findings", str(tmp_path / "all-test.csv"), "--weights",
                                       str(tmp_path / "none"), "-o", str(tmp_path / "cal")])  # before the weights load
    assert refused.exit_code == 2 and "no row in the splits train, val" in refused.output, refused.output
    result = CliRunner().invoke(app, ["calibrate-findings", str(tmp_path / "split.csv"), "--weights", str(weights),
                                      "-o", str(tmp_path / "cal"), "--max-false-flags", "0.1"])
    assert result.exit_code == 0, result.output
    assert "2 photos could not be read or were refused by the engine, left out: cut.jpg, tiny.jpg" in result.output
    again = CliRunner().invoke(app, ["calibrate-findings", str(tmp_path / "split.csv"), "--weights",
                                     str(tmp_path / "none"), "-o", str(tmp_path / "cal")])  # replaced unsaid before
    assert "holds an earlier findings.json: fitting again replaces it" in again.output, again.output
    card = load_findings_card(tmp_path / "cal" / "findings.json")
    assert set(card.thresholds) == set(FINDINGS)
    assert card.metrics["test"]["dark"]["n_degraded"] == 4
    scores = pd.read_csv(tmp_path / "cal" / "findings_scores.csv")
    assert len(scores) == 12 * 6 and set(scores["variant"]) == {"original", "nuisance", *FINDINGS}
    cal = scores[scores["split"] != "test"]
    for name in FINDINGS:  # the budget holds where the thresholds were chosen
        undegraded = cal[cal["variant"].isin(("original", "nuisance"))]
        assert (undegraded[name] >= card.thresholds[name]).mean() <= 0.1
    assert json.loads((tmp_path / "cal" / "findings.json").read_text())["training"]["command"].startswith("cervixqc")
    from pipelines.evaluation.findings_report import findings_section

    section = findings_section(tmp_path / "cal")
    for name in FINDINGS:
        assert f"<h3>{name}</h3>" in section and f"{name}: undegraded photos with the highest scores" in section
    assert set(card.metrics["calibration_new_source"]["blur"]) == {"s", "t"}
    assert "Thresholds at a source that did not choose them" in section and section.count("<td>blur</td>") == 3
    assert sorted(p.name for p in (tmp_path / "cal").iterdir()) == ["findings.json", "findings_scores.csv",
                                                                    "findings_thumbs.npz"]  # no temp files left
    assert "2 left out, unreadable or refused by the engine" in section  # as the command said
    import shutil

    shutil.copytree(tmp_path / "cal", tmp_path / "cal0")

    def report(folder: str) -> tuple[int, str]:
        r = CliRunner().invoke(app, ["report", "--findings", str(tmp_path / folder), "-o", str(tmp_path / "r.html")])
        assert "Traceback" not in r.output and not (tmp_path / "r.html").exists(), r.output
        return r.exit_code, r.output

    # damaged or foreign files: one error line each, exit 2 (tracebacks, or a foreign card's
    # "no test split" page, exit 0: an audit)
    thumbs = tmp_path / "cal" / "findings_thumbs.npz"
    thumbs.write_bytes(thumbs.read_bytes()[:1000])
    code, out = report("cal")
    assert code == 2 and "is not the file its findings.json was written with" in out
    card = json.loads((tmp_path / "cal0" / "findings.json").read_text())
    del card["training"]["files_sha256"]  # a card from before the sha256s: the file's own checks
    (tmp_path / "cal" / "findings.json").write_text(json.dumps(card))
    code, out = report("cal")
    assert code == 2 and "cannot read its thumbnails" in out
    with np.load(tmp_path / "cal0" / "findings_thumbs.npz") as z:  # another run's, of another size
        np.savez_compressed(thumbs, thumbs=z["thumbs"][:40])
    code, out = report("cal")
    assert code == 2 and "40 thumbnails for 72 score rows" in out
    (tmp_path / "cal" / "findings.json").write_text('{"x": 1}')
    assert report("cal")[0] == 2
    (tmp_path / "cal" / "findings.json").write_text('{"thresholds": {"blur')  # named no file (an audit)
    code, out = report("cal")
    assert code == 2 and "findings.json: not a findings card" in out, out
    (tmp_path / "cal" / "findings.json").write_bytes('{"note": "für"}'.encode("latin-1"))  # not UTF-8 text
    code, out = report("cal")
    assert code == 2 and "findings.json: not a findings card" in out, out
    del card["thresholds"]["blur"]
    (tmp_path / "cal" / "findings.json").write_text(json.dumps(card))
    code, out = report("cal")
    assert code == 2 and "no threshold for blur" in out
    shutil.copy(tmp_path / "cal0" / "findings_thumbs.npz", thumbs)
    card = json.loads((tmp_path / "cal0" / "findings.json").read_text())
    del card["training"]["files_sha256"]
    (tmp_path / "cal" / "findings.json").write_text(json.dumps(card))
    scores_csv = tmp_path / "cal" / "findings_scores.csv"
    scores_csv.write_text(scores_csv.read_text().replace("blur", "blurx", 1))
    code, out = report("cal")
    assert code == 2 and "no blur column" in out
    thumbs.unlink()
    r = CliRunner().invoke(app, ["report", "--findings", str(tmp_path / "cal"), "-o", str(tmp_path / "r.html")])
    assert r.exit_code == 2 and "no findings_thumbs.npz" in r.output


def test_calibrate_findings_judges_another_cards_thresholds_on_every_photo(tmp_path):
    """A site (or a synthetic set) checks the bundled thresholds on its own photos: nothing is
    chosen, no split is needed, every photo is judged, and the report reads the folder."""
    from pipelines.cli import app
    from pipelines.engine.findings import SCORES_VERSION

    rows = []
    for i in range(7):
        Image.fromarray(_tissue(30 + i)).save(tmp_path / f"p{i}.jpg", quality=95)
        rows.append({"path": f"p{i}.jpg", "patient_id": f"p{i}", "source": "site", "device": "",
                     "kind": "regular" if i < 6 else "no_cervix",  # no cervix crop: left out, said
                     "known_findings": "blur" if i == 0 else ""})  # not a false flag of blur, said
    pd.DataFrame(rows).to_csv(tmp_path / "photos.csv", index=False)  # no split column
    weights = tiny_weights(tmp_path / "w", detector_threshold=0.05)
    given = {"blur": 0.5, "dark": 0.7, "overexposed": 0.8, "glare": 0.1}
    (tmp_path / "given.json").write_text(json.dumps({"thresholds": {**given, "noise": 3.0},
                                                     "scores_version": SCORES_VERSION}))
    (tmp_path / "not-a-card.json").write_text('{"x": 1}')
    # thresholds chosen on the one-octave blur (a card without a version): 23% of real photos flagged blurred
    (tmp_path / "old.json").write_text(json.dumps({"thresholds": given}))
    (tmp_path / "nan.json").write_text(json.dumps({"thresholds": {**given, "blur": float("nan")},
                                                   "scores_version": SCORES_VERSION}))
    run = lambda *a: CliRunner().invoke(app, ["calibrate-findings", str(tmp_path / "photos.csv"),  # noqa: E731
                                              "--weights", str(weights), *a])
    refused = run("-o", str(tmp_path / "bad"), "--thresholds-from", str(tmp_path / "not-a-card.json"))
    assert refused.exit_code == 2 and "not a findings card" in refused.output and not (tmp_path / "bad").exists()
    refused = run("-o", str(tmp_path / "bad"), "--thresholds-from", str(tmp_path / "old.json"))
    assert refused.exit_code == 2 and "thresholds chosen on version 1 of the findings' scores" in refused.output
    refused = run("-o", str(tmp_path / "bad"), "--thresholds-from", str(tmp_path / "nan.json"))
    assert refused.exit_code == 2 and "threshold of blur is not a number" in refused.output, refused.output
    assert run("-o", str(tmp_path / "chosen")).exit_code == 2  # choosing needs a split
    result = run("-o", str(tmp_path / "judged"), "--thresholds-from", str(tmp_path / "given.json"))
    assert result.exit_code == 0, result.output
    assert "1 no_cervix photos left out" in result.output and "1 photos known to have blur" in result.output
    card = load_findings_card(tmp_path / "judged" / "findings.json")
    assert card.thresholds == given and "calibration" not in card.metrics
    assert card.metrics["data"]["thresholds_from"]["card"] == str(tmp_path / "given.json")
    scores = pd.read_csv(tmp_path / "judged" / "findings_scores.csv")
    assert len(scores) == 6 * 6 and set(scores["split"]) == {"test"}
    for name in FINDINGS:  # the figures are those thresholds' on every photo
        m = card.metrics["test"][name]
        assert m["n_degraded"] == 6
        originals = scores[(scores["variant"] == "original") & ((scores["path"] != "p0.jpg") | (name != "blur"))]
        assert m["false_flags_original"] == pytest.approx((originals[name] >= given[name]).mean())
        assert m["n_undegraded"] == 2 * len(originals)
    report = CliRunner().invoke(app, ["report", "--findings", str(tmp_path / "judged"), "-o", str(tmp_path / "r.html")])
    page = (tmp_path / "r.html").read_text()
    assert report.exit_code == 0 and "Judged, not chosen" in page, report.output
    assert "1 photos known to have blur" in page and "known to have dark" not in page


def test_a_findings_card_calibrated_on_another_detector_is_warned_about(tmp_path, caplog):
    """`make weights` published a new detector beside the previous detector's findings card
    (its thresholds are for that detector's crops) and nothing said so."""
    import logging

    weights = tiny_weights(tmp_path / "w", 0.0, findings=PASS_ALL)
    detector_sha = json.loads((weights / "detector.json").read_text())["sha256"]
    card = json.loads((weights / "findings.json").read_text())
    for data, warned in (({"weights_detector_sha256": detector_sha}, False),
                         ({"weights_detector_sha256": "0" * 64}, True), (None, False)):  # None: a traceback
        card["metrics"] = {"data": data}
        (weights / "findings.json").write_text(json.dumps(card))
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="pipelines.engine.qc"):
            QCPipeline(weights).close()
        assert ("calibrated on another detector's crops" in caplog.text) == warned, caplog.text


def test_a_findings_card_of_the_one_octave_blur_is_refused_by_the_engine_and_the_service_check(tmp_path):
    """Its blur threshold (0.636) on today's scores (the bundled one is 0.952) flagged 23% of
    the real undegraded photos as blurred, without a word (an audit)."""
    from models.io import WeightsIntegrityError
    from pipelines.engine.weights_folder import check_weights

    weights = tiny_weights(tmp_path / "w", 0.0, findings=PASS_ALL)
    card = json.loads((weights / "findings.json").read_text())
    del card["scores_version"]  # as every card before 2026-12-03
    (weights / "findings.json").write_text(json.dumps(card))
    for load in (lambda: QCPipeline(weights).close(), lambda: check_weights(weights, exports=False)):
        with pytest.raises(WeightsIntegrityError, match="thresholds chosen on version 1 of the findings' scores"):
            load()


def test_the_findings_crop_sees_the_cervix_box_and_not_the_frame_around_it():
    from pipelines.engine.crops import resized_crops

    image = torch.zeros(3, 300, 400, dtype=torch.uint8)
    image[:, 50:250, 100:300] = 200  # the "cervix"; the frame around it is black
    crop = resized_crops([image], torch.tensor([[100.0, 50.0, 300.0, 250.0]]), 128)
    assert crop.shape == (1, 3, 128, 128) and torch.allclose(crop, torch.tensor(200.0), atol=1e-3)
    scores = finding_scores(crop / 255)
    assert float(scores["dark"][0]) == pytest.approx(1 - 200 / 255, abs=0.01)


def test_the_sliced_laplacian_equals_the_convolution():
    import torch.nn.functional as F

    from pipelines.engine.findings import _laplacian

    x = torch.rand(2, 1, 20, 17)
    kernel = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])[None, None]
    assert torch.allclose(_laplacian(x), F.conv2d(x, kernel), atol=1e-6)


def test_the_engine_crops_findings_from_the_detector_input_as_from_the_decoded_photo(tmp_path, photos):
    """The findings' crop comes from the detector's normalized input where the box is at least
    the crop's size there (the whole 256 px frame at a 160 px input: no box clears a threshold
    over 1); undone, it must read as the same box of the decoded photo does."""
    from pipelines.engine.crops import resized_crops, whole_frames
    from pipelines.engine.decode import decode

    qc = QCPipeline(tiny_weights(tmp_path / "w", detector_threshold=1.01, findings=PASS_ALL, detector_size=160))
    for path, result in zip(sorted(photos.iterdir()), qc.run(sorted(photos.iterdir()))):
        image = decode(path.read_bytes(), qc.cfg.limits, None).image.float() / 255
        direct = finding_scores(resized_crops([image], whole_frames([image]), 128, qc.cfg.crop_margin))
        for name in ("dark", "overexposed", "glare"):
            assert result.findings[name].score == pytest.approx(float(direct[name][0]), abs=0.01), (path.name, name)


def test_a_box_smaller_than_the_findings_crop_in_the_detector_input_is_cropped_from_the_decoded_photo(tmp_path):
    """Upsampled from the detector's input (96 px here, 320 in the bundled weights, where the
    generator's small cervixes sit), a crop had lost the fine detail the blur score reads and a
    sharp photo read as blurred; the decoded photo still has that detail."""
    from torchvision.transforms.v2 import functional as TF

    from pipelines.engine.crops import resized_crops, whole_frames

    photo = _tissue(8, side=512)
    qc = QCPipeline(tiny_weights(tmp_path / "w", detector_threshold=1.01, findings=PASS_ALL))  # the whole frame
    result = qc.run([photo])[0]
    image = torch.from_numpy(photo).permute(2, 0, 1).float() / 255
    direct = float(finding_scores(resized_crops([image], whole_frames([image]), 128))["blur"][0])
    small = TF.resize(image, [96, 96], antialias=True)
    upsampled = float(finding_scores(resized_crops([small], whole_frames([small]), 128))["blur"][0])
    assert result.findings["blur"].score == pytest.approx(direct, abs=1e-3)
    assert upsampled > direct + 0.3, "the detector's input would not have read blurrier: the test shows nothing"


def test_a_photo_smaller_than_the_detector_input_is_judged_on_a_crop_of_its_own_size(tmp_path):
    """A 100 px photo was enlarged into the detector's input and its crop taken from there (or
    a small region enlarged to 128 px): the finest detail gone, 38% of sharp real photos at a
    quarter size read blurred (an audit; `_crop_for_findings`). Its crop is now the photo's own
    size, so a sharp small photo reads about as sharp as it is."""
    from pipelines.engine.crops import resized_crops, whole_frames

    photo = np.asarray(Image.fromarray(_tissue(8, side=512)).resize((100, 100), Image.LANCZOS))
    qc = QCPipeline(tiny_weights(tmp_path / "w", detector_threshold=1.01, findings=PASS_ALL, detector_size=160))
    result = qc.run([photo])[0]
    image = torch.from_numpy(photo.copy()).permute(2, 0, 1).float() / 255
    own = float(finding_scores(resized_crops([image], whole_frames([image]), 96))["blur"][0])
    enlarged = float(finding_scores(resized_crops([image], whole_frames([image]), 128))["blur"][0])
    assert result.findings["blur"].score == pytest.approx(own, abs=1e-3)
    assert enlarged > own + 0.2, "an enlarged crop would not have read blurrier: the test shows nothing"
    # a batch of both sizes: each photo keeps its own crop's scores
    big = _tissue(9, side=512)
    both = qc.run([photo, big])
    assert both[0].findings["blur"].score == pytest.approx(own, abs=1e-3)
    assert both[1].findings["blur"].score == pytest.approx(qc.run([big])[0].findings["blur"].score, abs=1e-6)


def test_a_photo_stage0_calls_no_cervix_gets_findings_of_the_detectors_confident_box(tmp_path):
    """The detector is confident (threshold 0) but stage 0 says no cervix (threshold 0.99): the
    findings describe the box, as for a photo stage 0 vouches for. Judged on the whole frame, a
    washed-out scene that lost stage 0's vote was read with its dark surround (synthetic
    overexposed AUC 0.948; 0.963 on the box)."""
    from pipelines.engine.crops import resized_crops, whole_frames

    photo = _tissue(7)
    photo[:, :128] = 10  # a dark left half: the box and the frame read differently
    weights = tiny_weights(tmp_path / "w", detector_threshold=0.0, presence_threshold=0.99, findings=PASS_ALL)
    vetoed = QCPipeline(weights).run([photo])[0]
    assert vetoed.label.value == "no_cervix" and vetoed.cervix_score > 0
    (tmp_path / "w" / "presence.json").unlink()  # no stage 0: the same detector's box is the cervix
    (tmp_path / "w" / "presence.safetensors").unlink()
    boxed = QCPipeline(weights).run([photo])[0]
    assert boxed.label.value != "no_cervix" and boxed.cervix_box is not None
    assert vetoed.findings["dark"].score == pytest.approx(boxed.findings["dark"].score, abs=1e-4)
    image = torch.from_numpy(photo).permute(2, 0, 1).float() / 255
    whole = float(finding_scores(resized_crops([image], whole_frames([image]), 128))["dark"][0])
    assert abs(vetoed.findings["dark"].score - whole) > 0.01, "box and frame read alike: the test shows nothing"


def test_a_finding_is_flagged_on_the_score_as_stored():
    """0.6358399 was stored as 0.63584 but left unflagged at a threshold of 0.63584."""
    from pipelines.engine.findings import FINDINGS, FindingsCard, judge

    card = FindingsCard(thresholds=dict.fromkeys(FINDINGS, 0.63584))
    found = judge({name: torch.tensor([0.6358399, 0.63583]) for name in FINDINGS}, card)
    assert [(f["blur"].score, f["blur"].flagged) for f in found] == [(0.63584, True), (0.63583, False)]


def test_a_rerun_with_a_new_quarantine_or_added_findings_copies_the_rows_already_done(tmp_path, photos):
    """Copies were made only as rows were stored: a rerun naming a quarantine, or adding
    --quarantine-findings, copied nothing for the rows already done, exit 0 (an audit)."""
    weights = tiny_weights(tmp_path / "w", detector_threshold=0.05, findings={**PASS_ALL, "dark": 0.7})
    out, quarantine = tmp_path / "out", tmp_path / "q"
    clean(QCPipeline(weights), photos, out)  # no quarantine
    again = clean(QCPipeline(weights), photos, out, quarantine)
    assert again.processed_now == 0
    assert sorted(p.name for p in (quarantine / "no_cervix").iterdir()) == ["dark.jpg", "sharp.jpg"]
    assert not (quarantine / "dark").exists()
    clean(QCPipeline(weights), photos, out, quarantine, quarantine_findings=("dark",))
    assert sorted(p.name for p in (quarantine / "dark").iterdir()) == ["dark.jpg"]
    (quarantine / "dark" / "dark.jpg").unlink()  # a reviewer's removal is not undone by a rerun as it was
    clean(QCPipeline(weights), photos, out, quarantine, quarantine_findings=("dark",))
    assert not (quarantine / "dark" / "dark.jpg").exists()
