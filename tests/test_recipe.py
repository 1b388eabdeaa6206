"""`weights/recipe.sh`, the default weights' recipe, as far as it runs without the fetched
photos: it must refuse before it removes anything."""

import subprocess
from pathlib import Path

RECIPE = Path(__file__).resolve().parents[1] / "weights" / "recipe.sh"


def test_the_recipe_refuses_a_mirrors_folder_that_is_not_there_before_removing_any_run(tmp_path):
    """A mistyped or unmounted MIRRORS deleted the trained runs and emptied their logs, then
    failed at the first step."""
    runs = tmp_path / "runs"
    (runs / "det-synth").mkdir(parents=True)
    (runs / "det-synth" / "detector.json").write_text("{}")
    (runs / "timings.tsv").write_text("detector_pretrain\t3600\n")
    (tmp_path / "empty").mkdir()
    for mirrors in (tmp_path / "nowhere", tmp_path / "empty"):
        r = subprocess.run(["bash", str(RECIPE)], capture_output=True, text=True, timeout=60,
                           env={"PATH": "/usr/bin:/bin", "MIRRORS": str(mirrors), "RUNS": str(runs),
                                "DATA": str(tmp_path / "data")})
        assert r.returncode == 2 and f"error: MIRRORS={mirrors} is no folder of repository snapshots" in r.stderr
        assert (runs / "det-synth" / "detector.json").is_file()
        assert (runs / "timings.tsv").read_text() == "detector_pretrain\t3600\n"
    # a folder of something else: past the check above, it deleted the runs too (an audit)
    other = tmp_path / "other"
    (other / "naghim+colposcopy-digital-atlas-dataset" / "repo").mkdir(parents=True)  # no git inside
    (other / "notes.txt").write_text("not snapshots")
    r = subprocess.run(["bash", str(RECIPE)], capture_output=True, text=True, timeout=60,
                       env={"PATH": "/usr/bin:/bin", "MIRRORS": str(other), "RUNS": str(runs),
                            "DATA": str(tmp_path / "data")})
    assert r.returncode == 2 and "holds no snapshot of" in r.stderr and "naghim/colposcopy-digital" in r.stderr, r.stderr
    assert (runs / "det-synth" / "detector.json").is_file()
    assert (runs / "timings.tsv").read_text() == "detector_pretrain\t3600\n"


def test_make_weights_checks_mirrors_before_it_installs_anything(tmp_path):
    """A mistyped MIRRORS waited out a whole install to be refused."""
    r = subprocess.run(["make", "-n", "-C", str(RECIPE.parents[1]), "weights"], capture_output=True, text=True,
                       timeout=60, env={"PATH": "/usr/bin:/bin", "MIRRORS": str(tmp_path / "nowhere")})
    lines = r.stdout.splitlines()
    check = next(i for i, line in enumerate(lines) if 'test -d "$MIRRORS"' in line)
    assert check < next(i for i, line in enumerate(lines) if "install" in line)
    for mirrors, said in (("", "error: set MIRRORS to the folder of repository snapshots"),
                          (str(tmp_path / "nowhere"), f"error: MIRRORS={tmp_path / 'nowhere'} is not a folder")):
        # without the "Entering directory" lines: a clone in /tmp/tmp.XWFg7JZjuv had "uv" in its name
        r = subprocess.run(["make", "--no-print-directory", "-C", str(RECIPE.parents[1]), "weights"],
                           capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin", "MIRRORS": mirrors})
        assert r.returncode != 0 and said in r.stderr, r.stderr  # it said "set MIRRORS" when it was set
        assert "uv" not in r.stdout  # nothing installed or run
