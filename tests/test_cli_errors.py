"""The `cervixqc` console command as a data manager meets it: a real process, exit codes that a
script can act on, one line per mistake (never a traceback), and machine output alone on stdout."""

import subprocess
import sys

import pandas as pd
import pytest

from tests.qc_fixtures import fuzz_set, tiny_weights

pytestmark = pytest.mark.timeout(180)


def _cervixqc(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "import sys; from service.cli import main; sys.exit(main())", *args],
                          capture_output=True, text=True)


def test_version_and_short_help_are_there_without_importing_torch():
    """torch's import was 3 of the 4.5 s that `--version` took on the 2-core machine."""
    r = _cervixqc("--version")
    assert r.returncode == 0 and r.stdout.startswith("cervixqc ")
    assert _cervixqc("-h").returncode == 0
    code = "import sys; import service.cli; print(sorted({'torch', 'timm', 'openvino'} & set(sys.modules)))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "[]"


def test_an_output_that_cannot_be_written_is_one_line_not_a_traceback(tmp_path):
    """split, synth, eval and a dozen more ended in a 40-60 line traceback for an output path
    under a missing or unwritable folder; `main` is the last net under every command."""
    manifest = {"path": ["a.jpg"], "patient_id": ["p1"], "source": ["s"], "device": ["d"], "kind": ["regular"]}
    pd.DataFrame(manifest).to_csv(tmp_path / "m.csv", index=False)
    (tmp_path / "a.jpg").write_bytes(fuzz_set()["ok.jpg"][0])
    r = _cervixqc("split", str(tmp_path / "m.csv"), "-o", "/proc/no/such/split.csv")
    # refused before the split, as every output the README lists: exit 2 (it was 1, after the work)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1].startswith("error: ") and "/proc/no" in r.stderr
    # checked before the work since 2026-12-04 (exit 1 from main's net before, naming a temporary file)
    for args in (["contact-sheet", "/proc/no/such/sheet.png"],
                 ["import-cvat", str(tmp_path / "m.csv"), "-o", "/proc/no/such/c.json"],
                 ["match-boxes", str(tmp_path / "m.csv"), "--boxes", str(tmp_path / "m.csv"), "-o", "/proc/no/b.json"]):
        r = _cervixqc(*args)
        assert r.returncode == 2 and "Traceback" not in r.stderr, (args, r.stderr[-2000:])
        assert r.stderr.strip().splitlines()[-1].startswith("error: ") and "/proc/no" in r.stderr


def test_predict_refuses_names_that_do_not_exist_before_the_models_load(tmp_path):
    """A mistyped name loaded the models, then printed an unreadable row and exited 1: a missing
    input is exit 2, refused before any work, as for every command."""
    said = "import sys; from service.cli import main\ntry:\n    main()\nfinally:\n    print('torch' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", said, "predict", str(tmp_path / "nothere.jpg")], capture_output=True,
                       text=True)
    assert r.returncode == 2 and f"error: {tmp_path / 'nothere.jpg'} does not exist" in r.stderr, r.stderr
    assert r.stdout.strip() == "False"
    r = subprocess.run([sys.executable, "-c", said, "predict", str(tmp_path / "a.jpg"), str(tmp_path / "b.jpg")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "not one of the 2 files given exists" in r.stderr, r.stderr


def test_clean_exits_2_on_a_source_without_files_and_1_when_nothing_could_be_read(tmp_path):
    """A share not mounted printed "0 files" and exited 0 (a cron job saw success); a folder of
    damaged files exited 0 too, where `predict` says 1. The progress bar goes to stderr: in a
    redirected stdout it was the bar's last frame."""
    weights = tiny_weights(tmp_path / "w", detector_threshold=0.0)
    (tmp_path / "empty").mkdir()
    # said before the engine's import (torch: 8 of the 10 s this refusal took)
    said = "import sys; from service.cli import main\ntry:\n    main()\nfinally:\n    print('torch' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", said, "clean", str(tmp_path / "empty"), "-o", str(tmp_path / "o1"),
                        "--weights", str(weights)], capture_output=True, text=True)
    assert r.returncode == 2 and "holds no files to clean" in r.stderr and r.stdout.strip() == "False", r.stdout
    (tmp_path / "bad").mkdir()
    for name in ("zero.jpg", "text.jpg"):
        (tmp_path / "bad" / name).write_bytes(fuzz_set()[name][0])
    r = _cervixqc("clean", str(tmp_path / "bad"), "-o", str(tmp_path / "o2"), "--weights", str(weights),
                  "--runtime", "torch")
    assert r.returncode == 1 and "not one of the 2 files could be read" in r.stderr, r.stderr[-2000:]
    assert (tmp_path / "o2" / "results.csv").is_file() and "━" not in r.stdout
    assert r.stdout.splitlines()[0] == "2 files: 2 processed now, 0 already done; unreadable 2"


def test_clean_on_ray_says_what_stops_ray_before_it_starts(tmp_path):
    """An unreachable cluster had `ray.init` retry for minutes without a word; weights that
    cannot be read were a traceback from Ray's side of the run."""
    pytest.importorskip("ray")
    from typer.testing import CliRunner

    from pipelines.cli import app

    weights = tiny_weights(tmp_path / "w", detector_threshold=0.0)
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.jpg").write_bytes(fuzz_set()["ok.jpg"][0])
    args = ["clean", str(tmp_path / "src"), "-o", str(tmp_path / "out"), "--engine", "ray"]
    for address in ("127.0.0.1:1", "ray://127.0.0.1:1"):  # the README's Ray Client form: a traceback before
        r = CliRunner().invoke(app, [*args, "--weights", str(weights), "--address", address])
        assert r.exit_code == 2 and f"--address {address}: no Ray cluster answers there" in r.output, r.output
    assert not (tmp_path / "out" / "state.sqlite").exists()  # -o not tied to the source by a run that never ran
    if not __import__("torch").cuda.is_available():  # a device this machine lacks: said before -o is made
        for engine in ("local", "ray"):
            r = CliRunner().invoke(app, ["clean", str(tmp_path / "src"), "-o", str(tmp_path / f"cuda-{engine}"),
                                         "--engine", engine, "--weights", str(weights), "--device", "cuda"])
            assert r.exit_code == 2 and "--device" in r.output and not (tmp_path / f"cuda-{engine}").exists(), r.output
    (weights / "detector.openvino.json").write_text('{"name": "detector", "source')  # an export cut short
    r = CliRunner().invoke(app, [*args, "--weights", str(weights)])  # every actor died on it, a traceback each
    assert r.exit_code == 2 and "detector.openvino.json" in r.output and "Traceback" not in r.output, r.output
    assert CliRunner().invoke(app, [*args, "--weights", str(weights), "--runtime", "torch"]).exit_code == 0
    r = CliRunner().invoke(app, [*args, "--weights", str(tmp_path / "nowhere")])
    assert r.exit_code == 2 and "no weights in" in r.output, r.output


def test_an_output_that_is_the_commands_own_input_is_refused_and_the_input_kept(tmp_path):
    """`-o` naming the manifest, label sheet, box file or duplicates table being read replaced
    it with the result, exit 0 (an audit). Also: a negative seed, an image name PIL cannot
    write, more folds than patients, a box file without a cervix category."""
    from typer.testing import CliRunner

    from pipelines.cli import app

    runner = CliRunner()
    rows = [(f"p{i}.jpg", f"p{i}", "s", "d", "regular") for i in range(6)]
    manifest = tmp_path / "m.csv"
    pd.DataFrame(rows, columns=["path", "patient_id", "source", "device", "kind"]).to_csv(manifest, index=False)
    for i in range(6):
        (tmp_path / f"p{i}.jpg").write_bytes(fuzz_set()["ok.jpg"][0])
    labels = tmp_path / "labels.csv"
    labels.write_text("file,kind,case\np0.jpg,regular,c0\n")
    (tmp_path / "m.compared.csv").write_bytes(manifest.read_bytes())
    coco = tmp_path / "boxes.json"
    coco.write_text('{"images": [], "annotations": [], "categories": []}')
    (tmp_path / "listing.csv").write_text("file,repo,commit,path_in_repo,sha256\n")
    before = {p: p.read_bytes() for p in (manifest, labels, coco)}
    cases = [
        (["split", str(manifest), "-o", str(manifest)], "is the input"),
        (["split", str(manifest), "-o", str(tmp_path / "." / "m.csv")], "is the input"),
        (["merge-manifests", str(manifest), str(manifest), "-o", str(manifest)], "is the input"),
        (["import-labels", str(labels), "--images", str(tmp_path), "-o", str(labels), "--source", "s"], "is the input"),
        (["import-cvat", str(coco), "-o", str(coco)], "is the input"),
        (["match-boxes", str(manifest), "--boxes", str(coco), "-o", str(coco)], "is the input"),
        (["duplicates", str(manifest), "-o", str(manifest)], "is the input"),
        (["split", str(manifest), "-o", str(tmp_path / "s.csv"), "--seed", "-1"], "greater than or equal to 0"),
        (["train-deep-sad", str(manifest), "-o", str(tmp_path / "sad"), "--seed", "-1"], "greater than or equal to 0"),
        (["split", str(manifest), "-o", str(tmp_path / "s.csv"), "--folds", "7"], "6 patients"),
        (["split", str(manifest), "-o", str(tmp_path / "s.csv"), "--fractions", "abc"], "--fractions needs three"),
        (["split", str(manifest), "-o", str(tmp_path / "s.csv"), "--coco", str(coco)], "lists no images"),
        (["import-cvat", str(coco), "-o", str(tmp_path / "c.json")], "lists no images"),
        (["bench", "--mix-from", str(tmp_path)], "no .jpg photos in its subfolders"),  # photos, no subfolders
        (["bench", "--mix-from", str(tmp_path), "--keep-mix", str(labels)], "a file, not a folder"),
        (["validate", str(manifest), "--coco", str(coco)], "lists no images"),
        (["fix-boxes", str(coco), str(tmp_path / "nope.csv"), "-o", str(tmp_path / "f.json")],
         "nope.csv: no such file"),
        (["train-presence", str(manifest), "--detector", str(tmp_path / "nope.json"), "-o", str(tmp_path / "p2")],
         "--detector:"),
        (["train-deep-sad", str(manifest), "-o", str(tmp_path / "sad"), "--pretrain-epochs", "-1"],
         "Invalid value for '--pretrain-epochs'"),
        (["extract-listed", str(tmp_path / "listing.csv"), "--mirrors", str(tmp_path), "-o", str(tmp_path / "x")],
         "lists no files"),
        (["train-presence", str(manifest), "--detector", "d.json", "-o", str(tmp_path / "p"), "--c-hist", "0"],
         "--c-hist must be > 0"),
        (["import-labels", str(labels), "--images", str(labels), "-o", str(tmp_path / "l.csv"), "--source", "s"],
         "a file, not a folder"),
        (["contact-sheet", str(tmp_path / "sheet.txt")], ".jpg or .png"),
        (["demo", "--out", str(labels)], f"--out {labels} is a file"),  # it said OUT, synth's argument (an audit)
        (["validate", str(manifest), "--root", str(labels)], "--root"),  # every row's file was "missing"
        (["synth", str(tmp_path / "sy"), "--sources", ",,"], "names no source"),  # "unknown source(s) []"
        # -o d.csv writes d.compared.csv beside it: a manifest of that name was replaced
        (["duplicates", str(tmp_path / "m.compared.csv"), "-o", str(tmp_path / "m.csv")], "is the input"),
        (["match-boxes", str(manifest), "--boxes", str(coco), "-o", str(tmp_path / "b.json")], "cervix"),
        # said as what they are (an audit): an output that is a file, a folder that is not there, a card's folder
        (["extract-listed", str(tmp_path / "listing.csv"), "--mirrors", str(tmp_path), "-o", str(labels)],
         f"--out {labels} is a file: name a folder"),
        (["report", str(tmp_path / "nothere"), "--manifest", str(manifest), "--coco", str(coco), "-o",
          str(tmp_path / "r.html")], "nothere: no such folder"),
        (["export", "--weights", str(tmp_path / "sy")], "name the weights folder with --weights"),
        (["calibrate-findings", str(manifest), "--thresholds-from", str(tmp_path), "-o", str(tmp_path / "cf")],
         f"is a folder: give the findings card in it ({tmp_path / 'findings.json'})"),
    ]
    for args, said in cases:
        r = runner.invoke(app, args)
        assert r.exit_code == 2 and said in r.output, (args, r.exit_code, r.output[-500:])
    assert {p: p.read_bytes() for p in before} == before
    # eval-pipeline writes results.csv into -o: a manifest of that name there was replaced
    (tmp_path / "ev").mkdir()
    (tmp_path / "ev" / "results.csv").write_bytes(manifest.read_bytes())
    r = runner.invoke(app, ["eval-pipeline", str(tmp_path / "ev" / "results.csv"), "-o", str(tmp_path / "ev")])
    assert r.exit_code == 2 and "is the input" in r.output, r.output[-500:]
    # more outputs that were inputs, or another program's files, each written over it, exit 0 (an audit)
    (tmp_path / "s_val.json").write_bytes(coco.read_bytes())  # named as split writes its val boxes beside -o
    fixes = tmp_path / "fixes.csv"
    fixes.write_text("file,action,x1,y1,x2,y2,note\n")
    run_folder = tmp_path / "run"  # a clean run's results folder
    run_folder.mkdir()
    (run_folder / "state.sqlite").write_bytes(b"")
    foreign = tmp_path / "foreign"  # another program's results
    foreign.mkdir()
    (foreign / "results.csv").write_text("my,own,results\n")
    trained = tmp_path / "trained"  # a training run's folder
    trained.mkdir()
    (trained / "deep_sad.json").write_text("{}")
    protected = {p: p.read_bytes() for p in (tmp_path / "s_val.json", fixes, run_folder / "state.sqlite",
                                             foreign / "results.csv", trained / "deep_sad.json",
                                             *(tmp_path / f"p{i}.jpg" for i in range(6)))}
    for args, said in [
        (["split", str(manifest), "-o", str(tmp_path / "s.csv"), "--coco", str(tmp_path / "s_val.json")],
         "is the input"),
        (["propose-boxes", str(manifest), "-o", str(manifest)], "is the input"),
        (["fix-boxes", str(coco), str(fixes), "-o", str(fixes)], "is the input"),
        (["duplicates", str(run_folder), "-o", str(run_folder / "state.sqlite")], "one of the clean run's own files"),
        (["eval-duplicates", str(manifest), "-o", str(manifest), "--weights", str(tmp_path)], "is the input"),
        (["report", str(tmp_path), "--manifest", str(manifest), "-o", str(manifest)], "is the input"),
        (["clean", str(tmp_path), "-o", str(foreign), "--weights", str(tmp_path)], "holds results.csv but no state"),
        (["eval-pipeline", str(manifest), "-o", str(foreign), "--weights", str(tmp_path)], "that no eval-pipeline"),
        (["calibrate-stage2", str(manifest), "-o", str(trained), "--weights", str(tiny_weights(tmp_path / "w", 0.0))],
         "of a training run"),
        (["detect", str(tmp_path / "w" / "detector.json"), str(manifest), "-o", str(manifest)], "is the input"),
        # a photo the command reads, replaced by its table, page or JSON (an audit)
        (["duplicates", str(tmp_path), "-o", str(tmp_path / "p1.jpg")], "holds a file that is not a duplicates table"),
        (["duplicates", str(manifest), "-o", str(tmp_path / "p1.jpg")], "holds a file that is not a duplicates table"),
        (["report", str(tmp_path / "ev"), "--manifest", str(manifest), "--coco", str(coco), "-o",
          str(tmp_path / "p2.jpg")], "holds a file that is not a report of this command"),
        (["eval-duplicates", str(manifest), "-o", str(tmp_path / "p3.jpg"), "--weights", str(tmp_path)],
         "holds a file that is not a JSON result"),
        (["bench", "--images", str(tmp_path), "--out", str(tmp_path / "p4.jpg")], "holds a file that is not a JSON"),
        (["bench-detector", str(coco), "--out", str(tmp_path / "p5.jpg")], "holds a file that is not a JSON"),
    ]:
        r = runner.invoke(app, args)
        assert r.exit_code == 2 and said in r.output, (args, r.exit_code, r.output[-500:])
    assert {p: p.read_bytes() for p in protected} == protected and manifest.read_bytes() == before[manifest]
    # and clean's: results.csv fed back as a manifest with -o its own folder was replaced by the results
    for name in ("results.csv", "duplicates.csv"):
        (tmp_path / name).write_bytes(manifest.read_bytes())
        r = runner.invoke(app, ["clean", str(tmp_path / name), "-o", str(tmp_path), "--weights", str(tmp_path)])
        assert r.exit_code == 2 and f"writes its {name}, which is the source manifest" in r.output, r.output[-500:]
        assert (tmp_path / name).read_bytes() == manifest.read_bytes()


def test_an_empty_argument_is_refused_not_read_as_the_current_folder(tmp_path):
    """Click reads "" as ".": `cervixqc clean "$SRC" -o "$OUT"` with OUT unset wrote the state
    and results into the current folder, and with SRC unset cleaned it, exit 0 (an audit)."""
    (tmp_path / "p.jpg").write_bytes(fuzz_set()["ok.jpg"][0])
    main = "import sys; from service.cli import main; sys.exit(main())"
    for args, said in ((["clean", str(tmp_path), "-o", ""], "argument 4 is empty"),
                       (["clean", "", "-o", str(tmp_path / "out")], "argument 2 is empty"),
                       (["clean", str(tmp_path), "--out="], "argument 3 '--out=' is empty")):
        r = subprocess.run([sys.executable, "-c", main, *args], capture_output=True, text=True, cwd=tmp_path)
        assert r.returncode == 2 and said in r.stderr and "Traceback" not in r.stderr, r.stderr[-500:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.jpg"]


def test_synth_refuses_a_folder_holding_a_dataset_it_did_not_write(tmp_path):
    """A site's manifest.csv and coco.json were replaced by generated ones, exit 0 (an audit);
    synth's own earlier output is written again."""
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "manifest.csv").write_text("path,patient_id,source,device,kind\n")
    r = _cervixqc("synth", str(tmp_path / "theirs"), "--preset", "tiny", "-n", "2")
    assert r.returncode == 2 and "manifest.csv that synth did not write" in r.stderr, r.stderr[-500:]
    assert (tmp_path / "theirs" / "manifest.csv").read_text() == "path,patient_id,source,device,kind\n"
    for _ in range(2):
        r = _cervixqc("synth", str(tmp_path / "ours"), "--preset", "tiny", "-n", "2", "--workers", "1")
        assert r.returncode == 0, r.stderr[-500:]


def test_a_precision_the_torch_runtime_does_not_take_is_said_not_ignored(capsys):
    """`predict --runtime torch --precision bf16` ran at f32 without a word (an audit)."""
    from pipelines.commands.engine import _check_runtime

    _check_runtime("torch", "bf16")
    assert "--precision bf16 is OpenVINO's" in capsys.readouterr().err
    _check_runtime("openvino", "bf16")
    _check_runtime("torch", "auto")
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("args, said", [
    (["train-detector", "t.json", "v.json", "-o", "run", "--lr", "inf"], "--lr must be a number > 0"),
    # 1e300 overflowed in torch, a 121-line traceback; --workers 100000 started 1,156 loaders (audits)
    (["train-detector", "t.json", "v.json", "-o", "run", "--lr", "1e300"], "--lr must be a number > 0 and <= 10"),
    (["train-detector", "t.json", "v.json", "-o", "run", "--workers", "100000"], "--workers must be >= 0 and <="),
    (["train-detector", "t.json", "v.json", "-o", "run", "--workers", "-1"], "--workers must be >= 0"),
    (["train-deep-sad", "m.csv", "--coco", "c.json", "-o", "run", "--weight-decay", "1e300"], "--weight-decay"),
    (["train-resnest", "m.csv", "--coco", "c.json", "-o", "run", "--lr", "1e300"], "and <= 10"),
    (["synth", "run", "-n", "4", "--workers", "5000"], "--workers must be >= 1 and <="),
    (["train-detector", "t.json", "v.json", "-o", "run", "--max-steps", "0"], "--max-steps"),
    (["train-detector", "t.json", "v.json", "-o", "run", "--size", "0"], "--size"),
    (["train-detector", "t.json", "v.json", "-o", "run", "--warmup", "-5"], "--warmup"),
    (["train-deep-sad", "m.csv", "--coco", "c.json", "-o", "run", "--eta", "-1"], "--eta must be a number > 0"),
    (["train-deep-sad", "m.csv", "--coco", "c.json", "-o", "run", "--marks", "nan"], "--marks must be a number"),
    (["train-deep-sad", "m.csv", "--coco", "c.json", "-o", "run", "--synthesise", "5"], "and <= 1"),
    (["train-resnest", "m.csv", "--coco", "c.json", "-o", "run", "--marks", "2"], "--marks must be a number"),
    (["train-resnest", "m.csv", "--coco", "c.json", "-o", "run", "--size", "0"], "--size"),
    (["train-resnest", "m.csv", "--coco", "c.json", "-o", "run", "--batch-size", "0"], "--batch-size"),
    (["train-colour", "m.csv", "--coco", "c.json", "-o", "run", "--c", "nan"], "need --c > 0"),
    (["train-colour", "m.csv", "--coco", "c.json", "-o", "run", "--copies", "100000000"], "--copies"),
    (["train-presence", "m.csv", "--detector", "d.json", "-o", "run", "--colour-weight", "nan"], "--colour-weight"),
    (["train-presence", "m.csv", "--detector", "d.json", "-o", "run", "--extra-weight", "inf"], "--extra-weight"),
    (["train-presence", "m.csv", "--detector", "d.json", "-o", "run", "--c-feat", "inf"], "--c-feat must be > 0"),
])
def test_a_training_number_out_of_range_or_not_finite_is_refused_before_any_work(tmp_path, monkeypatch, args, said):
    """Click's ranges let nan and inf through: --lr inf exported a detector of NaN weights, exit
    0; --max-steps 0 an untrained one; --eta -1 weighted the labelled anomalies negatively;
    --marks 2 failed in NumPy after the pretraining, naming no option (an audit)."""
    from typer.testing import CliRunner

    from pipelines.cli import app

    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 2 and said in r.output and "Traceback" not in r.output, r.output[-400:]
    assert not (tmp_path / "run").exists()


def test_bench_detector_refuses_bad_options_in_one_line_before_the_benchmark(tmp_path):
    """An unknown arch, batch sizes `a,b` or `0`, an unknown device, a missing box file: each a
    traceback, and a bad --out was found only after the whole benchmark (an audit)."""
    from typer.testing import CliRunner

    from pipelines.cli import app

    (tmp_path / "a-file").write_text("")
    for args, said in ((["--arch", "nope"], "unknown detector 'nope'"), (["--batch-sizes", "a,b"], "positive integers"),
                       (["--batch-sizes", "0"], "positive integers"), (["--device", "bogus"], "is not a device"),
                       (["-o", str(tmp_path / "a-file" / "x.json")], "--out")):
        r = CliRunner().invoke(app, ["bench-detector", str(tmp_path / "missing.json"), *args])
        assert r.exit_code == 2 and said in r.output and "Traceback" not in r.output, (args, r.output[-300:])
    r = CliRunner().invoke(app, ["bench-detector", str(tmp_path / "missing.json")])
    assert r.exit_code == 2 and "missing.json" in r.output


def test_a_synth_ratio_or_a_thread_count_that_cannot_be_is_refused_in_one_line(tmp_path):
    """`synth --ratio nan` was a traceback from int(nan); `--threads 99999` ran the process out
    of memory maps, exit 139 (an audit)."""
    from typer.testing import CliRunner

    from pipelines.cli import app

    r = CliRunner().invoke(app, ["synth", str(tmp_path / "s"), "--preset", "tiny", "-n", "2", "--ratio", "nan"])
    assert r.exit_code == 2 and "ratio (regular : non-regular) must be a positive number" in r.output, r.output
    assert not (tmp_path / "s").exists()
    r = CliRunner().invoke(app, ["--threads", "99999", "stats", str(tmp_path / "m.csv")])
    assert r.exit_code == 2 and "--threads" in r.output and "4 per core" in r.output, r.output
