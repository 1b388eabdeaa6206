"""The stage-2 models train on tiny crops (both networks through the shared loop, the
crop-colour scorer in one fit), export a card with a validation threshold, and load back."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from models.classifier import ClassifierConfig
from models.deep_sad import DeepSAD
from models.io import load_weights, sha256_file
from pipelines.data.crop_set import split_crops
from pipelines.data.manifest import load_manifest, rebased, write_manifest
from pipelines.data.splits import SplitFractions, patient_split
from pipelines.data.synth import SizePolicy, SynthConfig, generate
from pipelines.training.stage2 import Stage2Config, train_classifier, train_deep_sad


@pytest.fixture(scope="module")
def split_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("s2")
    r = generate(SynthConfig(n_images=70, seed=9, ratio=2.0, no_cervix_fraction=0.05, size=SizePolicy(max_side=160)),
                 out, workers=1)
    df = load_manifest(r.manifest)
    df["split"] = patient_split(df, SplitFractions(0.6, 0.4, 0.0), seed=0)
    write_manifest(df, out / "split.csv")
    return out / "split.csv", r.coco


def test_deep_sad_trains_exports_a_threshold_and_reloads(split_set, tmp_path):
    manifest, coco = split_set
    crops = split_crops(manifest, coco, 32, splits=("train", "val"))
    assert crops["train"].images.shape[1:] == (3, 32, 32) and crops["val"].non_regular.sum() > 0
    cfg = Stage2Config(out_dir=tmp_path, epochs=2, pretrain_epochs=2, batch_size=8, progress=False, marks=0.3)
    card_path = train_deep_sad(cfg, crops["train"], crops["val"], torch.device("cpu"))
    state, card = load_weights(card_path)
    net = DeepSAD()
    net.load_state_dict(state)
    assert card.thresholds["distance"] > 0 and 0 <= card.metrics["val"]["f1"] <= 1
    assert torch.count_nonzero(net.c) == net.c.numel()  # the eps rule held
    assert "pretrain_epochs" in card.training and "synthesise" in card.training and card.training["marks"] == 0.3
    assert card.training["threshold_rule"].startswith("max F1 on the validation split")
    n_pos = int(crops["train"].non_regular.sum())  # what a reader of the card needs to judge it
    assert card.training["train_crops"] == {"regular": len(crops["train"].kinds) - n_pos, "non_regular": n_pos}
    log = [json.loads(line) for line in (tmp_path / "deep_sad" / "metrics.jsonl").read_text().splitlines()]
    assert len(log) == 2 and "val_roc_auc" in log[-1]
    assert (tmp_path / "autoencoder" / "metrics.jsonl").is_file()


def test_resnest_classifier_trains_with_weighted_bce_and_exports(split_set, tmp_path, monkeypatch):
    from models.classifier import class_weights

    manifest, coco = split_set
    crops = split_crops(manifest, coco, 37, splits=("train", "val"))
    seen, bce = [], torch.nn.functional.binary_cross_entropy_with_logits

    def recording_bce(logits, target, weight=None, **kw):  # torch's own loss, its weights kept
        seen.append((target.detach().clone(), None if weight is None else weight.detach().clone()))
        return bce(logits, target, weight=weight, **kw)

    monkeypatch.setattr(torch.nn.functional, "binary_cross_entropy_with_logits", recording_bce)
    cfg = Stage2Config(out_dir=tmp_path, epochs=2, batch_size=16, lr=5e-4, weight_decay=0.0, progress=False)
    card_path = train_classifier(cfg, ClassifierConfig(arch="resnest14d", input_size=32), crops["train"],
                                 crops["val"], torch.device("cpu"))
    _, card = load_weights(card_path)
    assert 0 < card.thresholds["probability"] < 1 and card.classes == ["regular", "green", "iodine"]
    assert "synthesise" in card.training and not {"pretrain_epochs", "eta", "unsupervised"} & set(card.training)
    log = [json.loads(line) for line in (tmp_path / "classifier" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [0, 1] and all(r["train_bce"] > 0 for r in log)
    # the paper's class weights, N / (2 n_c), each sample weighted by its own class
    per_class = class_weights(crops["train"].non_regular, 2)
    assert per_class[1] > 1 > per_class[0] and seen
    for target, weight in seen:
        assert weight is not None and torch.equal(weight, per_class[target.long()])


def test_eval_command_reports_metrics_per_source_at_the_cards_threshold(split_set, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import pipelines.engine.stage2 as engine_stage2
    from pipelines.cli import app

    manifest, coco = split_set
    crops = split_crops(manifest, coco, 32, splits=("train", "val"))
    cfg = Stage2Config(out_dir=tmp_path, epochs=1, pretrain_epochs=1, batch_size=8, progress=False)
    card_path = train_deep_sad(cfg, crops["train"], crops["val"], torch.device("cpu"))
    reads = []  # the real loader, counted: the weights were read and hashed twice, once for the card
    monkeypatch.setattr(engine_stage2, "load_weights", lambda *a, **k: reads.append(a) or load_weights(*a, **k))
    r = CliRunner().invoke(app, ["eval", str(card_path), str(manifest), "--coco", str(coco), "-o", str(tmp_path),
                                 "--split", "val"])
    assert r.exit_code == 0, r.output
    assert len(reads) == 1, reads
    monkeypatch.undo()
    report = json.loads((tmp_path / "deep_sad_32_val_metrics.json").read_text())
    assert set(report) == {"overall", "left_out_without_box", "left_out_without_box_by_source", "model_sha256", "card",
                           "manifest_sha256", "coco_sha256", "role"} | set(crops["val"].sources)
    assert report["model_sha256"] == json.loads(Path(card_path).read_text())["sha256"]
    assert report["left_out_without_box"] == {}
    _, card = load_weights(card_path)
    assert report["overall"]["threshold"] == card.thresholds["distance"]
    assert report["overall"]["n"] == len(crops["val"])
    # a photo without a box (a detector's miss) is counted, not left out unsaid
    boxes = json.loads(Path(coco).read_text())
    missed = next(im for im in boxes["images"] if im["file_name"] == crops["val"].paths[0])
    one_less = tmp_path / "one_less.json"
    one_less.write_text(json.dumps({**boxes, "annotations": [a for a in boxes["annotations"]
                                                               if a["image_id"] != missed["id"]]}))
    r = CliRunner().invoke(app, ["eval", str(card_path), str(manifest), "--coco", str(one_less), "-o", str(tmp_path),
                                 "--split", "val"])
    assert r.exit_code == 0 and "left out, no box in one_less.json: 1 " in r.output, r.output
    report = json.loads((tmp_path / "deep_sad_32_val_metrics.json").read_text())
    assert sum(report["left_out_without_box"].values()) == 1 and report["overall"]["n"] == len(crops["val"]) - 1
    # and on its source's row: that row read as if every photo of the source had been scored (an audit)
    from pipelines.data.crop_set import KIND_INDEX

    source, kind = crops["val"].sources[0], {i: k for k, i in KIND_INDEX.items()}[int(crops["val"].kinds[0])]
    assert report["left_out_without_box_by_source"] == {source: {kind: 1}}
    assert any(line.strip().startswith(f"{source}:") and line.endswith(f"; left out, no box: 1 {kind})")
               for line in r.output.splitlines()), r.output
    no_boxes = tmp_path / "no_boxes.json"
    no_boxes.write_text(json.dumps({**boxes, "annotations": []}))
    r = CliRunner().invoke(app, ["eval", str(card_path), str(manifest), "--coco", str(no_boxes), "-o", str(tmp_path),
                                 "--split", "val"])
    assert r.exit_code == 2 and "nothing to score" in r.output
    r = CliRunner().invoke(app, ["eval", str(card_path), str(manifest), "--coco", str(coco), "-o", str(tmp_path),
                                 "--split", "vall"])  # said as a split that is not there, not as missing boxes
    assert r.exit_code == 2 and "has no 'vall' split (its splits: train, val)" in r.output, r.output
    # another model's eval into the same folder: refused, not replaced unsaid; the scores file
    # carries the photos left out and the weights' sha256 for the report
    with np.load(tmp_path / "deep_sad_32_val_scores.npz") as z:
        assert str(z["model_sha256"]) == card.sha256 and int(z["left_out_counts"].sum()) == 1  # one_less's
    other = json.loads(Path(card_path).read_text()) | {"sha256": "0" * 64}
    metrics = json.loads((tmp_path / "deep_sad_32_val_metrics.json").read_text())
    (tmp_path / "deep_sad_32_val_metrics.json").write_text(json.dumps(metrics | {"model_sha256": other["sha256"]}))
    r = CliRunner().invoke(app, ["eval", str(card_path), str(manifest), "--coco", str(coco), "-o", str(tmp_path),
                                 "--split", "val"])
    assert r.exit_code == 2 and "holds an eval of other weights (sha256 000000000000" in r.output, r.output
    # -o naming a file: refused before the scoring (it failed after it, exit 1, "File exists")
    r = CliRunner().invoke(app, ["eval", str(card_path), str(manifest), "--coco", str(one_less), "-o", str(one_less),
                                 "--split", "val"])
    assert r.exit_code == 2 and f"--out {one_less} is a file: name a folder" in r.output, r.output


def test_eval_says_what_the_rows_are_to_the_cards_threshold_from_the_cards_records(split_set, tmp_path):
    """The report named a row by its split alone: test rows that `calibrate-stage2 --split
    all` had chosen the threshold on read "held out" and `eval` said nothing, while any
    manifest's val rows read "optimistic" (an audit). The card's `site_calibration` and
    `data.split_fingerprint` say what the rows are."""
    from typer.testing import CliRunner

    from pipelines.cli import app
    from pipelines.data.splits import split_fingerprint

    manifest, coco = split_set
    crops = split_crops(manifest, coco, 32, splits=("train", "val"))
    cfg = Stage2Config(out_dir=tmp_path, epochs=1, pretrain_epochs=1, batch_size=8, progress=False)
    card_path = Path(train_deep_sad(cfg, crops["train"], crops["val"], torch.device("cpu")))
    card = json.loads(card_path.read_text())
    df = load_manifest(manifest)
    df["sha256"] = [sha256_file(p) for p in df["abspath"]]  # a split's fingerprint is of its photos' sha256
    manifest = tmp_path / "hashed.csv"
    write_manifest(rebased(df, manifest), manifest)
    fingerprint = split_fingerprint(load_manifest(manifest))
    other = tmp_path / "other.csv"  # the same photos, split otherwise: not the training's split
    df["split"] = np.where(df["split"] == "val", "train", "val")
    write_manifest(rebased(df, other), other)

    def role(card_fields: dict, rows: Path, split: str = "val") -> tuple[str, str]:
        card_path.write_text(json.dumps(card | card_fields))
        out = tmp_path / f"ev{len(list(tmp_path.glob('ev*')))}"
        r = CliRunner().invoke(app, ["eval", str(card_path), str(rows), "--coco", str(coco), "-o", str(out),
                                     "--split", split])
        assert r.exit_code == 0, r.output
        with np.load(out / f"deep_sad_32_{split}_scores.npz") as z:
            assert str(z["role"]) == json.loads((out / f"deep_sad_32_{split}_metrics.json").read_text())["role"]
            return str(z["role"]), r.output

    trained = {"data": card["data"] | {"split_fingerprint": fingerprint}}
    assert role(trained, manifest)[0] == "threshold chosen here: optimistic"
    assert role(trained, manifest, "train")[0] == "trained on these rows"
    assert role(trained, other)[0] == "not the training's split"
    chosen = {"metrics": card["metrics"] | {"site_calibration": {"manifest_sha256": sha256_file(other),
                                                                   "split": "all"}}}
    said, output = role(trained | chosen, other)
    assert said == "threshold chosen on these rows (calibrate-stage2): optimistic"
    assert "warning: the threshold in deep_sad.json was chosen on these val rows (calibrate-stage2)" in output
    chosen["metrics"]["site_calibration"]["split"] = "train"
    assert role(trained | chosen, other)[0] == "held out (threshold chosen on this manifest's train rows)"
    assert role({"data": {}}, manifest)[0] == "val: optimistic if the training's (threshold chosen there)"
    assert role({"data": {}}, manifest, "train")[0] == "train: trained on these rows if the training's split"


def test_report_contains_every_figure_of_the_paper(split_set, tmp_path):
    import re

    from typer.testing import CliRunner

    from pipelines.cli import app

    manifest, coco = split_set
    runner = CliRunner()
    crops32 = split_crops(manifest, coco, 32, splits=("train", "val"))
    sad = train_deep_sad(Stage2Config(out_dir=tmp_path / "sad", epochs=1, pretrain_epochs=1, batch_size=8,
                                      progress=False), crops32["train"], crops32["val"], torch.device("cpu"))
    crops37 = split_crops(manifest, coco, 37, splits=("train", "val"))
    res = train_classifier(Stage2Config(out_dir=tmp_path / "res", epochs=1, batch_size=16, progress=False),
                           ClassifierConfig(arch="resnest14d", input_size=32), crops37["train"], crops37["val"],
                           torch.device("cpu"))
    for card in (sad, res):
        r = runner.invoke(app, ["eval", str(card), str(manifest), "--coco", str(coco), "-o", str(tmp_path / "ev"),
                                "--split", "val"])
        assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["report", str(tmp_path / "ev"), "--manifest", str(manifest), "--coco", str(coco),
                            "-o", str(tmp_path / "report.html")])
    assert r.exit_code == 0, r.output
    page = (tmp_path / "report.html").read_text()
    for heading in ("Performance of models (Table 6)", "Confusion matrices", "ROC and precision-recall",
                    "Deep SAD, 32x32", "ResNeSt, 32x32"):
        assert heading in page
    for caption in ("scores by class", "t-SNE of ResNeSt", "lowest scores", "highest scores", "misclassified"):
        assert caption in page
    assert re.search(r"<p>Made \d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00 by <code>cervixqc", page)  # when, by what
    assert len(re.findall(r'src="data:image/png;base64,', page)) >= 2 + 2 * 4 + 1  # curves, boxes, galleries, t-SNE
    assert "http://" not in page and "https://" not in page  # self-contained
    # another set's manifest: blank tiles and other photos under these scores, exit 0 (an audit)
    df = load_manifest(manifest)
    write_manifest(rebased(df.iloc[: len(df) // 2], tmp_path / "half.csv"), tmp_path / "half.csv")
    r = runner.invoke(app, ["report", str(tmp_path / "ev"), "--manifest", str(tmp_path / "half.csv"), "--coco",
                            str(coco), "-o", str(tmp_path / "other.html")])
    assert r.exit_code == 2 and f"--manifest {tmp_path / 'half.csv'} is not the file" in r.output, r.output
    # other boxes of the same photos: galleries of other crops under these scores, exit 0 (an audit)
    moved = json.loads(coco.read_text())
    for a in moved["annotations"]:
        a["bbox"] = [0, 0, 8, 8]
    (tmp_path / "moved.json").write_text(json.dumps(moved))
    r = runner.invoke(app, ["report", str(tmp_path / "ev"), "--manifest", str(manifest), "--coco",
                            str(tmp_path / "moved.json"), "-o", str(tmp_path / "other.html")])
    assert r.exit_code == 2 and "--coco" in r.output and "is not the file" in r.output, r.output
    assert not (tmp_path / "other.html").exists()
    # two evals of one split over different manifests (a re-split): one Table 6, unsaid (an audit)
    for card, rows in ((sad, manifest), (res, tmp_path / "half.csv")):
        r = runner.invoke(app, ["eval", str(card), str(rows), "--coco", str(coco), "-o", str(tmp_path / "mixed"),
                                "--split", "val"])
        assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["report", str(tmp_path / "mixed"), "--manifest", str(manifest), "--coco", str(coco),
                            "-o", str(tmp_path / "mixed.html")])
    assert r.exit_code == 2 and "the 'val' evals scored different manifests" in r.output, r.output
    # a damaged scores file and a folder as -o: named, not tracebacks
    r = runner.invoke(app, ["report", str(tmp_path / "ev"), "--manifest", str(manifest), "--coco", str(coco),
                            "-o", str(tmp_path)])
    assert r.exit_code == 2 and "is a folder" in r.output
    (tmp_path / "ev" / "x_scores.npz").write_bytes(b"PK\x03\x04 cut short")
    r = runner.invoke(app, ["report", str(tmp_path / "ev"), "--manifest", str(manifest), "--coco", str(coco),
                            "-o", str(tmp_path / "report.html")])
    assert r.exit_code == 2 and "x_scores.npz: not a readable scores file" in r.output
    assert (tmp_path / "report.html").read_text() == page  # the report before stays whole


def test_minority_synthesis_relabels_regular_crops_it_turns_green_or_iodine(split_set):
    from pipelines.data.crop_set import CropDataset

    manifest, coco = split_set
    crops = split_crops(manifest, coco, 32, splits=("train",))["train"]
    regular = crops.subset(crops.kinds == 0)
    torch.manual_seed(0)
    ds = CropDataset(regular, synthesise=1.0)
    kinds = [int(ds[i][1]) for i in range(len(ds))]
    assert set(kinds) == {1, 2}
    img, _ = ds[0]
    assert not torch.allclose(img, regular.images[0].float() / 255)
    assert all(int(CropDataset(regular)[i][1]) == 0 for i in range(3))


def test_the_classifiers_loss_is_balanced_over_the_labels_it_meets_synthesised_ones_included(
        split_set, tmp_path, monkeypatch):
    """The class weights came from the crops' own labels: with no real green or iodine crop and
    --synthesise, every synthesised positive weighed 0 (the model learnt one class, exit 0)."""
    from models.classifier import balanced_weights
    from pipelines.data.crop_set import CropDataset

    manifest, coco = split_set
    crops = split_crops(manifest, coco, 32, splits=("train", "val"))
    regular = crops["train"].subset(crops["train"].kinds == 0)
    expected = CropDataset(regular, synthesise=0.5).label_counts()
    n = len(regular)
    assert expected.tolist() == pytest.approx([n / 2, n / 4, n / 4])
    assert CropDataset(regular, synthesise=0.5).label_counts().sum() == n == CropDataset(regular).label_counts()[0]
    seen, bce = [], torch.nn.functional.binary_cross_entropy_with_logits

    def recording_bce(logits, target, weight=None, **kw):
        seen.append((target.detach().clone(), weight.detach().clone()))
        return bce(logits, target, weight=weight, **kw)

    monkeypatch.setattr(torch.nn.functional, "binary_cross_entropy_with_logits", recording_bce)
    cfg = Stage2Config(out_dir=tmp_path, epochs=1, batch_size=8, synthesise=0.5, progress=False)
    train_classifier(cfg, ClassifierConfig(arch="resnest14d", input_size=32), regular, crops["val"],
                     torch.device("cpu"))
    per_class = balanced_weights(torch.tensor([n / 2, n / 2]))  # half the regulars relabelled: 1:1
    assert per_class.tolist() == pytest.approx([1.0, 1.0])
    targets = torch.cat([t for t, _ in seen])
    assert targets.sum() > 0  # synthesised positives were met, and weighed as the regulars do
    for target, weight in seen:
        assert torch.allclose(weight, per_class[target.long()])


def test_classifier_can_start_from_our_own_smaller_input_model(split_set, tmp_path):
    """Progressive resizing (32 px weights as the start of a larger-input run) copies every
    tensor, and a card of another architecture is refused rather than half-loaded."""
    from models.classifier import RegularityClassifier
    from pipelines.training.stage2 import _init_from_card

    manifest, coco = split_set
    crops = split_crops(manifest, coco, 37, splits=("train", "val"))
    small = train_classifier(Stage2Config(out_dir=tmp_path / "s", epochs=1, batch_size=16, progress=False),
                             ClassifierConfig(arch="resnest14d", input_size=32), crops["train"], crops["val"],
                             torch.device("cpu"))
    state, _ = load_weights(small)
    big = RegularityClassifier(ClassifierConfig(arch="resnest14d", input_size=64))
    assert any(not torch.equal(v, state[k]) for k, v in big.state_dict().items() if v.is_floating_point())
    _init_from_card(big, str(small))
    assert all(torch.equal(v, state[k]) for k, v in big.state_dict().items())
    with pytest.raises(ValueError, match="resnest14d"):
        _init_from_card(RegularityClassifier(ClassifierConfig(arch="resnest26d", input_size=64)), str(small))
    from typer.testing import CliRunner

    from pipelines.cli import app

    base = ["train-resnest", str(manifest), "--coco", str(coco), "-o", str(tmp_path / "cli"), "--size", "64"]
    for extra, says in ((["--arch", "resnest26d", "--init-from", str(small)], "is a resnest14d, not a resnest26d"),
                        (["--arch", "resnest14d", "--init-from", str(tmp_path / "none.json")], "no such model card"),
                        (["--arch", "resnest14d", "--init-from", str(manifest)], "not a model card"),
                        # a file that is no weights: a 50-line UnpicklingError traceback (an audit)
                        (["--arch", "resnest14d", "--imagenet-weights", str(manifest)], "cannot load it as this")):
        r = CliRunner().invoke(app, base + extra)
        assert r.exit_code == 2 and says in r.output, r.output

    crops64 = split_crops(manifest, coco, 73, splits=("train", "val"))
    card = train_classifier(Stage2Config(out_dir=tmp_path / "b", epochs=1, batch_size=16, progress=False),
                            ClassifierConfig(arch="resnest14d", input_size=64), crops64["train"], crops64["val"],
                            torch.device("cpu"), init_card=str(small))
    assert load_weights(card)[1].training["init_from"] == str(small)


def test_train_colour_names_an_empty_split_not_the_classes(tmp_path):
    """An empty manifest or a blank split column read "needs regular and non-regular training
    crops"; train-presence names the split (an audit)."""
    from pipelines.data.crop_set import CropSet
    from pipelines.training.colour import ColourTrainConfig, train_colour

    none = CropSet(torch.zeros(0, 3, 32, 32, dtype=torch.uint8), torch.zeros(0, dtype=torch.int64), [], [], [])
    some = CropSet(torch.full((2, 3, 32, 32), 100, dtype=torch.uint8), torch.tensor([0, 1]), ["a", "b"],
                   ["p", "q"], ["s", "s"])
    with pytest.raises(ValueError, match="no train crop: no cervix photo of the manifest's train split has a box"):
        train_colour(ColourTrainConfig(tmp_path / "a"), none, none)
    with pytest.raises(ValueError, match="no val crop"):
        train_colour(ColourTrainConfig(tmp_path / "b"), some, none)


def test_train_colour_says_when_its_model_is_no_better_than_chance_on_validation(tmp_path, caplog):
    """--c 1e-6 exported a colour model at validation ROC-AUC 0.0 with exit 0 and no word,
    where Deep SAD and the classifier warn (an audit). Here validation's colours are training's
    swapped: red regular and green non-regular crops to learn, the other way round to judge."""
    from pipelines.data.crop_set import CropSet
    from pipelines.training.colour import ColourTrainConfig, train_colour

    def crops(regular: tuple, flagged: tuple) -> CropSet:
        images = torch.zeros(8, 3, 32, 32, dtype=torch.uint8)
        for i in range(8):
            images[i] = torch.tensor(regular if i < 4 else flagged, dtype=torch.uint8).view(3, 1, 1)
        return CropSet(images, torch.tensor([0] * 4 + [1] * 4), [f"{i}.jpg" for i in range(8)],
                       [f"p{i}" for i in range(8)], ["s"] * 8)

    red, green = (200, 60, 60), (60, 200, 60)
    with caplog.at_level("WARNING", logger="pipelines.training.stage2"):
        train_colour(ColourTrainConfig(tmp_path / "swapped", c=10.0, synthesise=0.0, copies=1), crops(red, green),
                     crops(green, red))
    assert "the colour model is no better than chance on the validation crops" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="pipelines.training.stage2"):
        train_colour(ColourTrainConfig(tmp_path / "same", c=10.0, synthesise=0.0, copies=1), crops(red, green),
                     crops(red, green))
    assert "no better than chance" not in caplog.text


def test_train_colour_fits_the_crop_colour_scorer_with_a_validation_threshold_the_engine_reproduces(
        split_set, tmp_path):
    from typer.testing import CliRunner

    from pipelines.cli import app
    from pipelines.engine.stage2 import colour_scores, load_colour
    from pipelines.evaluation.classification import binary_metrics

    manifest, coco = split_set
    runner = CliRunner()
    r = runner.invoke(app, ["train-colour", str(manifest), "--coco", str(coco), "-o", str(tmp_path / "c"),
                            "--extra-manifest", str(manifest), "--extra-coco", str(coco)])
    assert r.exit_code == 0, r.output
    model, card = load_colour(tmp_path / "c" / "colour.json")
    assert card.name == "colour" and 0 < card.thresholds["probability"] < 1 and card.input_size == [32, 32]
    val = split_crops(manifest, coco, 32, splits=("val",))["val"]
    scores = colour_scores(model, val.images).numpy()
    m = binary_metrics(val.non_regular.numpy(), scores, card.thresholds["probability"])
    assert m.as_dict() == card.metrics["val"]  # the engine's histogram path is the one it was fitted on
    assert m.roc_auc > 0.8  # green filter and iodine are colours
    bad = runner.invoke(app, ["train-colour", str(manifest), "--coco", str(coco), "-o", str(tmp_path / "x"),
                              "--extra-manifest", str(manifest)])
    assert bad.exit_code != 0 and "together" in bad.output


def test_the_training_clis_choose_their_thresholds_on_the_validation_crops(split_set, tmp_path):
    """The CLIs wire the splits themselves: one that passed the training crops as validation
    calibrated the threshold on what the model had learnt, and no test saw it (a mutation)."""
    from typer.testing import CliRunner

    from pipelines.cli import app

    manifest, coco = split_set
    runner = CliRunner()
    common = [str(manifest), "--coco", str(coco), "--epochs", "1", "--batch-size", "8"]
    for args, card_name, crop_size in ((["train-deep-sad", "--pretrain-epochs", "1"], "deep_sad.json", 32),
                                       (["train-resnest", "--arch", "resnest14d", "--size", "32"], "classifier.json",
                                        37)):
        out = tmp_path / card_name.split(".")[0]
        r = runner.invoke(app, [args[0], *common, *args[1:], "-o", str(out)])
        assert r.exit_code == 0, r.output
        val = split_crops(manifest, coco, crop_size, splits=("val",))["val"]
        card = load_weights(out / card_name)[1]
        metrics = card.metrics["val"]
        assert set(card.data) >= {"manifest", "boxes", "split_fingerprint"}  # None here: no sha256 column
        # so the files are named and checkable all the same (the path as typed and None named nothing)
        assert card.data["manifest"] == str(manifest.resolve()) and card.data["manifest_sha256"] == sha256_file(manifest)
        assert card.data["boxes"] == str(coco.resolve()) and card.data["boxes_sha256"] == sha256_file(coco)
        assert metrics["n"] == len(val.kinds) and metrics["n_positive"] == int(val.non_regular.sum()), card_name


def test_a_training_that_would_take_no_step_or_overwrite_a_run_is_refused_before_it_starts(split_set, tmp_path):
    """Too few crops for one batch exported an untrained model with exit code 0; a second
    run into a run folder without --resume overwrote its weights and doubled its log."""
    from typer.testing import CliRunner

    from pipelines.cli import app

    manifest, coco = split_set
    base = ["train-deep-sad", str(manifest), "--coco", str(coco), "--epochs", "1", "--pretrain-epochs", "1"]
    r = CliRunner().invoke(app, [*base, "-o", str(tmp_path / "big"), "--batch-size", "100000"])
    assert r.exit_code == 2 and "no training step" in r.output and "Traceback" not in r.output, r.output
    # the autoencoder's regular crops counted as such, not as all the training items (an audit)
    assert "from the" in r.output and "regular training crops alone (of" in r.output, r.output
    assert not list((tmp_path / "big").rglob("*.safetensors"))
    r = CliRunner().invoke(app, [*base, "-o", str(tmp_path / "run"), "--batch-size", "8", "--seed", "3"])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "run" / "deep_sad.json").read_text())["training"]["seed"] == 3
    weights = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*.safetensors")}
    log = (tmp_path / "run" / "deep_sad" / "metrics.jsonl").read_text()
    r = CliRunner().invoke(app, [*base, "-o", str(tmp_path / "run"), "--batch-size", "8"])
    assert r.exit_code == 2 and "already holds a training run: pass --resume" in r.output, r.output
    assert {p: p.read_bytes() for p in (tmp_path / "run").rglob("*.safetensors")} == weights
    assert (tmp_path / "run" / "deep_sad" / "metrics.jsonl").read_text() == log
    (tmp_path / "run" / "autoencoder" / "checkpoint.pt").write_bytes(b"cut short")
    r = CliRunner().invoke(app, [*base, "-o", str(tmp_path / "run"), "--batch-size", "8", "--resume"])
    assert r.exit_code == 2 and "cannot resume from" in r.output and "checkpoint.pt" in r.output, r.output
    crops = split_crops(manifest, coco, 32, splits=("train", "val"))
    regulars_only = crops["val"].subset(crops["val"].kinds == 0)
    with pytest.raises(ValueError, match="validation split needs regular and non-regular"):
        train_deep_sad(Stage2Config(out_dir=tmp_path / "one-class", batch_size=8, progress=False), crops["train"],
                       regulars_only, torch.device("cpu"))
    assert not (tmp_path / "one-class").exists()  # refused before the autoencoder's first epoch
    # a training split of one class: the classifier trained it at weight 0 and exported it
    from pipelines.training.stage2 import train_classifier

    val, train = crops["val"], crops["train"]
    cfg = Stage2Config(out_dir=tmp_path / "one-class-train", batch_size=8, progress=False)
    with pytest.raises(ValueError, match="the training split has no green or iodine crop"):
        train_classifier(cfg, ClassifierConfig(arch="resnest14d", input_size=32), train.subset(train.kinds == 0), val,
                         torch.device("cpu"))
    with pytest.raises(ValueError, match="the training split has no regular crop"):
        train_deep_sad(cfg, train.subset(train.kinds != 0), val, torch.device("cpu"))
    assert not (tmp_path / "one-class-train").exists()


def test_training_into_a_weights_folder_is_refused_before_any_data_loads(tmp_path):
    """`train-colour -o weights` replaced the bundled colour scorer, and with it the folder's
    default policy; `train-detector` replaced the detector under a presence head of the old
    one's features. Each training command now refuses a folder holding its card without a run."""
    from typer.testing import CliRunner

    from pipelines.cli import app
    from tests.qc_fixtures import tiny_weights

    weights = tiny_weights(tmp_path / "weights", 0.0, colour_threshold=0.5, presence_threshold=0.5)
    before = {p.name: p.read_bytes() for p in weights.iterdir() if p.is_file()}
    none = str(tmp_path / "none.csv")
    for args, card in ((["train-detector", none, none], "detector.json"),
                       (["train-deep-sad", none, "--coco", none], "deep_sad.json"),
                       (["train-resnest", none, "--coco", none, "--resume"], "classifier.json"),
                       (["train-colour", none, "--coco", none], "colour.json"),
                       (["train-presence", none, "--detector", none], "presence.json")):
        r = CliRunner().invoke(app, [*args, "-o", str(weights)])
        assert r.exit_code == 2 and f"holds {card} and no training run" in r.output, (args, r.output)
    assert {p.name: p.read_bytes() for p in weights.iterdir() if p.is_file()} == before


def test_every_training_command_refuses_an_out_it_cannot_write_before_any_work(tmp_path):
    """`-o` naming a file was exit 1 from the catch-all, after the crops loaded (or after
    presence's whole fit); a refused command left its -o folder behind, empty (an audit)."""
    from typer.testing import CliRunner

    from pipelines.cli import app

    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    none = str(tmp_path / "none.csv")
    for args in (["train-detector", none, none], ["train-deep-sad", none, "--coco", none],
                 ["train-resnest", none, "--coco", none], ["train-colour", none, "--coco", none],
                 ["train-presence", none, "--detector", none]):
        r = CliRunner().invoke(app, [*args, "-o", str(a_file / "run")])
        said = f"-o {a_file / 'run'}: {a_file} is a file, so no folder"  # "cannot write there (Not a directory)"
        assert r.exit_code == 2 and said in r.output, (args, r.output)
        r = CliRunner().invoke(app, [*args, "-o", str(tmp_path / "new" / "run")])  # refused: no manifest
        assert r.exit_code == 2 and not (tmp_path / "new").exists(), (args, r.output)
    r = CliRunner().invoke(app, ["baseline-colour", none, "-o", str(tmp_path / "new" / "base")])
    assert r.exit_code == 2 and not (tmp_path / "new").exists(), r.output


def test_train_detector_refuses_an_extra_ratio_without_its_set_and_a_set_it_would_never_draw(tmp_path):
    """Either alone trained on the real photos only, exit 0; a negative ratio blamed the batch size (an audit)."""
    from typer.testing import CliRunner

    from pipelines.cli import app

    none = str(tmp_path / "none.json")
    for extra, said in ((["--extra-ratio", "0.5"], "mixes in nothing"), (["--extra-coco", none], "at 0 none is drawn"),
                        (["--extra-coco", none, "--extra-ratio", "-1"], "greater than or equal to 0")):
        r = CliRunner().invoke(app, ["train-detector", none, none, "-o", str(tmp_path / "run"), *extra],
                               env={"COLUMNS": "200"})
        assert r.exit_code == 2 and said in r.output, (extra, r.output)


def test_a_model_that_scores_every_validation_crop_alike_is_warned_about(caplog):
    """A classifier trained at --lr 1e3 read AUC 0.5 with a threshold of 1.0 and was exported
    without a word."""
    import numpy as np

    from pipelines.training.stage2 import _warn_if_flat

    with caplog.at_level("WARNING", logger="pipelines.training.stage2"):
        _warn_if_flat(np.array([0.3, 0.7, 0.5]), "the classifier")
        assert not caplog.text
        _warn_if_flat(np.full(5, 1.0), "the classifier")
    assert "the classifier gives every validation crop the same score (1)" in caplog.text


def test_a_model_no_better_than_chance_on_validation_is_warned_about(caplog):
    """A Deep SAD trained at --lr 10 read ROC-AUC 0.2, sensitivity 1, specificity 0 (it flags
    every photo) and was exported with exit 0 and no word (an audit)."""
    import numpy as np

    from pipelines.evaluation.classification import binary_metrics
    from pipelines.training.stage2 import _warn_if_chance

    y = np.array([0, 0, 0, 1, 1])
    with caplog.at_level("WARNING", logger="pipelines.training.stage2"):
        _warn_if_chance(binary_metrics(y, np.array([0.1, 0.2, 0.3, 0.8, 0.9]), 0.5), "Deep SAD")
        _warn_if_chance(binary_metrics(y, np.array([0.1, 0.2, 0.9, 0.8, 0.3]), 0.5), "Deep SAD")  # AUC 0.67
        assert not caplog.text
        _warn_if_chance(binary_metrics(y, np.array([0.9, 0.8, 0.7, 0.2, 0.1]), 0.05), "Deep SAD")
    assert "Deep SAD is no better than chance" in caplog.text and "flags every validation crop" in caplog.text


def test_a_cervix_photo_without_a_box_is_refused_by_training_unless_allowed_and_then_counted(split_set, tmp_path):
    """A box file missing some photos trained on the rest without a word: 15 of 21 regulars
    once, and a box file naming none of them blamed the validation split (an audit)."""
    from typer.testing import CliRunner

    from pipelines.cli import app
    from pipelines.data.coco import load_coco, save_coco

    manifest, coco = split_set
    df = load_manifest(manifest)
    train = df[(df["split"] == "train") & (df["kind"] == "regular")]["path"].tolist()[:3]
    ds = load_coco(coco)
    lost = {im.id for im in ds.images if im.file_name in train}
    assert len(lost) == 3
    ds.annotations = [a for a in ds.annotations if a.image_id not in lost]
    partial = save_coco(ds, tmp_path / "partial.json")
    runner = CliRunner()
    r = runner.invoke(app, ["train-colour", str(manifest), "--coco", str(partial), "-o", str(tmp_path / "c")])
    assert r.exit_code == 2 and "3 of" in r.output and "no box in partial.json (the train split)" in r.output
    assert train[0] in r.output and not (tmp_path / "c").exists()
    r = runner.invoke(app, ["train-colour", str(manifest), "--coco", str(partial), "-o", str(tmp_path / "c"),
                            "--allow-unboxed"])
    assert r.exit_code == 0, r.output
    assert "left out, no box: 3 train" in r.output
    card = json.loads((tmp_path / "c" / "colour.json").read_text())
    assert card["data"]["left_out_without_box"] == {"train": 3}


def test_deep_sad_without_labelled_anomalies_says_it_trains_as_deep_svdd(split_set, tmp_path, caplog):
    """With no green or iodine crop it ran as Deep SVDD, its card saying unsupervised: false, unsaid (an audit)."""
    manifest, coco = split_set
    crops = split_crops(manifest, coco, 32, splits=("train", "val"))
    cfg = Stage2Config(out_dir=tmp_path, epochs=1, pretrain_epochs=1, batch_size=8, progress=False)
    with caplog.at_level("WARNING", logger="pipelines.training.stage2"):
        train_deep_sad(cfg, crops["train"].subset(crops["train"].kinds == 0), crops["val"], torch.device("cpu"))
    assert "this trains as Deep SVDD" in caplog.text


def test_a_training_stopped_with_sigterm_ends_as_interrupted_and_says_how_to_resume(split_set, tmp_path):
    """`docker stop`, systemd and batch schedulers stop with SIGTERM: a training run died at it
    with exit 143 and no word (an audit); Ctrl-C's path says how to resume, exit 130."""
    import signal
    import subprocess
    import sys
    import time

    manifest, coco = split_set
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "train-deep-sad", str(manifest), "--coco", str(coco),
                             "--epochs", "100000", "--pretrain-epochs", "1", "--batch-size", "8", "-o", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not (out / "deep_sad" / "checkpoint.pt").exists() and proc.poll() is None:
            assert time.monotonic() < deadline, "no epoch finished in 240 s"
            time.sleep(0.1)
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err[-2000:]
    assert "the same command with --resume continues" in err and "Traceback" not in err, err[-2000:]
