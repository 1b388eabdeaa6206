"""The one training loop's checkpoints as an operator meets them: runs killed and resumed."""

import json
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from models.io import sha256_file
from pipelines.training.loop import LoopConfig, fit


class Killed(Exception):
    """Stands for the process dying in the middle of an epoch."""


class TinyTask:
    def __init__(self, kill_at_epoch: int | None = None):
        g = torch.Generator().manual_seed(1)
        self.vx, self.vy = torch.randn(16, 4, generator=g), torch.randn(16, 1, generator=g)
        self.kill_at, self.epoch = kill_at_epoch, 0

    def training_step(self, model, batch, device):
        x, y = batch
        return {"mse": F.mse_loss(model(x), y)}

    def batch_size(self, batch) -> int:
        return len(batch[0])

    def validate(self, model, device):
        if self.epoch == self.kill_at:
            raise Killed
        self.epoch += 1
        model.eval()
        with torch.no_grad():
            return {"mse": float(F.mse_loss(model(self.vx), self.vy))}


def _run(out, epochs: int, resume: bool = False, kill_at: int | None = None, **cfg):
    """A model with dropout and a shuffling loader: both draw from the random state each epoch."""
    torch.manual_seed(0)
    hidden = cfg.pop("hidden", 16)
    model = nn.Sequential(nn.Linear(4, hidden), nn.ReLU(), nn.Dropout(0.3), nn.Linear(hidden, 1))
    g = torch.Generator().manual_seed(2)
    data = TensorDataset(torch.randn(64, 4, generator=g), torch.randn(64, 1, generator=g))
    loader = DataLoader(data, batch_size=8, shuffle=True)
    loop = LoopConfig(out_dir=out, epochs=epochs, warmup_iters=0, schedule="constant", grad_clip=None,
                      select_metric="mse", select_mode="min", resume=resume, progress=False,
                      recipe=cfg.pop("recipe", {"lr": "0.01"}))
    task = TinyTask(kill_at)
    task.epoch = 0 if not resume else -1  # a resumed run's validation is never killed here
    return fit(model, task, loader, torch.optim.Adam(model.parameters(), lr=1e-2), loop, torch.device("cpu")), model


def _epochs(out) -> list[int]:
    return [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_resume_with_no_checkpoint_says_it_trains_from_the_start(tmp_path, caplog):
    """A mistyped -o under --resume trained a whole run from scratch with no word (an audit)."""
    with caplog.at_level("WARNING", logger="pipelines.training.loop"):
        _run(tmp_path / "typo", epochs=1, resume=True)
    assert f"{tmp_path / 'typo'} holds no checkpoint.pt: training from the start" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="pipelines.training.loop"):
        _run(tmp_path / "typo", epochs=2, resume=True)  # its checkpoint now: resumed, nothing said
    assert "holds no checkpoint" not in caplog.text


def test_a_run_killed_and_resumed_trains_as_the_run_that_was_never_stopped(tmp_path):
    """No random state was checkpointed: the resumed epoch k replayed epoch 0's shuffle and
    dropout, and the resumed run ended with other weights and another best epoch."""
    whole, model = _run(tmp_path / "whole", epochs=5)
    with pytest.raises(Killed):
        _run(tmp_path / "cut", epochs=5, kill_at=2)  # epochs 0 and 1 committed
    with (tmp_path / "cut" / "metrics.jsonl").open("a") as f:  # a line the kill left past the checkpoint
        f.write(json.dumps({"epoch": 2, "train_loss": -1}) + "\n")
    resumed, resumed_model = _run(tmp_path / "cut", epochs=5, resume=True)
    assert resumed.best_epoch == whole.best_epoch
    assert sha256_file(resumed.best_weights) == sha256_file(whole.best_weights)
    for a, b in zip(model.state_dict().values(), resumed_model.state_dict().values()):
        assert torch.equal(a, b)
    assert _epochs(tmp_path / "cut") == [0, 1, 2, 3, 4]  # the stray line gone, no epoch twice


def test_a_kill_between_the_best_weights_and_the_checkpoint_never_ships_another_epochs_weights(tmp_path):
    """The best weights were written before the checkpoint: killed between the two, the resumed
    run exported the next epoch's weights under the previous epoch's card."""
    out = tmp_path / "run"
    first, _ = _run(out, epochs=3)
    committed = sha256_file(first.best_weights)
    # killed after a new best was written aside, before its epoch's checkpoint: not the best
    (out / "best.pending.safetensors").write_bytes(b"weights of an epoch no checkpoint committed")
    again, _ = _run(out, epochs=3, resume=True)
    assert sha256_file(again.best_weights) == committed and not (out / "best.pending.safetensors").exists()
    # killed after the checkpoint committed the epoch, before the rename: the pending file is it
    (out / "best.safetensors").rename(out / "best.pending.safetensors")
    again, _ = _run(out, epochs=3, resume=True)
    assert sha256_file(again.best_weights) == committed
    # best weights that are not the checkpoint's are refused, not exported
    (out / "best.safetensors").write_bytes(b"another run's weights")
    with pytest.raises(ValueError, match="is not the best epoch's weights its checkpoint records"):
        _run(out, epochs=3, resume=True)


def test_a_resume_with_other_settings_is_refused_naming_them(tmp_path):
    """A resume with a lower --lr kept the checkpoint's rate, trained on, and the card recorded
    the new one for the whole run."""
    out = tmp_path / "run"
    _run(out, epochs=2)
    with pytest.raises(ValueError, match=r"other settings than it was started with \(lr: 0.01 -> 0.001\)"):
        _run(out, epochs=3, resume=True, recipe={"lr": "0.001"})
    longer, _ = _run(out, epochs=3, resume=True)  # --epochs may change
    assert [r["epoch"] for r in longer.history] == [0, 1, 2]


def test_a_resume_with_another_model_names_the_setting_and_does_not_call_the_checkpoint_damaged(tmp_path):
    """The weights loaded before the settings were compared: another --arch read "damaged or
    from another model: move it away", as if the run were lost (an audit)."""
    out = tmp_path / "run"
    _run(out, epochs=2, recipe={"model": "resnest14d"})
    with pytest.raises(ValueError, match=r"other settings than it was started with \(model: resnest14d -> resnest26d\)"):
        _run(out, epochs=3, resume=True, hidden=32, recipe={"model": "resnest26d"})


def test_a_resume_with_fewer_epochs_than_trained_is_refused(tmp_path):
    """It re-exported the run under a card recording the smaller count beside a log of the larger."""
    out = tmp_path / "run"
    _run(out, epochs=3)
    with pytest.raises(ValueError, match=r"--epochs 2: it has trained 3 epochs; pass --epochs 3"):
        _run(out, epochs=2, resume=True)
    again, _ = _run(out, epochs=3, resume=True)  # the same count: exported again, nothing trained
    assert [r["epoch"] for r in again.history] == [0, 1, 2]


def test_a_resume_by_another_number_of_processes_is_refused_and_a_longer_schedule_is_said(tmp_path, caplog):
    """A 2-process torchrun run resumed as 1 trained on with other steps per epoch, another
    effective batch and schedule, unsaid; a resume with more --epochs moved the rate of every
    remaining step, also unsaid (an audit)."""
    out = tmp_path / "run"
    _run(out, epochs=2)
    ck = torch.load(out / "checkpoint.pt", weights_only=True)
    assert [r["threads"] for r in json.loads(ck["history"])] == [torch.get_num_threads()] * 2
    with caplog.at_level("WARNING", logger="pipelines.training.loop"):
        longer, _ = _run(out, epochs=3, resume=True)
    assert "resumed with --epochs 3, planned 2: the learning rate follows the 3-epoch schedule" in caplog.text
    history = json.loads(ck["history"])
    ck["history"] = json.dumps([{**r, "world_size": 2} for r in history])  # as two processes wrote it
    torch.save(ck, out / "checkpoint.pt")
    with pytest.raises(ValueError, match=r"with 1 training process\(es\): it was trained by 2"):
        _run(out, epochs=3, resume=True)


def test_the_resume_check_sees_edited_data_at_the_same_paths():
    """A box file edited in place (or a manifest without a sha256 column, whose split
    fingerprint is empty) was resumed under the old run unsaid (an audit)."""
    import tempfile
    from pathlib import Path

    from pipelines.data.crop_set import CropSet
    from pipelines.training.detector import DetectorTrainConfig, _box_files
    from pipelines.training.stage2 import Stage2Config, _resume_recipe

    def crops(value: int) -> CropSet:
        return CropSet(torch.full((2, 3, 8, 8), value, dtype=torch.uint8), torch.tensor([0, 1]), ["a", "b"],
                       ["p", "q"], ["s", "s"])

    cfg = Stage2Config(out_dir="o")
    same = _resume_recipe(cfg, None, crops(1), crops(2))
    assert same == _resume_recipe(cfg, None, crops(1), crops(2))
    assert same["crops"] != _resume_recipe(cfg, None, crops(1), crops(3))["crops"]
    with tempfile.TemporaryDirectory() as d:
        t, v = Path(d) / "t.json", Path(d) / "v.json"
        t.write_text('{"images": []}')
        v.write_text('{"images": []}')
        det = DetectorTrainConfig(train_coco=t, val_coco=v, out_dir=Path(d) / "o")
        before = _box_files(det)
        t.write_text('{"images": [], "annotations": []}')
        assert _box_files(det)["train_coco_sha256"] != before["train_coco_sha256"]
        assert _box_files(det)["val_coco_sha256"] == before["val_coco_sha256"] and "extra_coco_sha256" not in before


def test_the_recipe_keeps_what_a_resume_may_not_change():
    from pipelines.training.detector import DetectorTrainConfig
    from pipelines.training.loop import recipe_of

    cfg = DetectorTrainConfig(train_coco="t.json", val_coco="v.json", out_dir="o")
    recipe = recipe_of(cfg)
    assert {"lr", "batch_size", "train_coco", "model", "extra_ratio"} <= set(recipe)
    assert not {"epochs", "resume", "workers", "progress", "out_dir"} & set(recipe)
    assert recipe_of(replace(cfg, epochs=99, workers=0)) == recipe != recipe_of(replace(cfg, lr=1e-3))


def test_a_diverged_run_and_an_interrupted_one_say_what_to_do(tmp_path, caplog):
    """A loss gone to NaN was a 60-line traceback (FloatingPointError escaped every command's
    ValueError); Ctrl-C ended a run with exit 130 and no word of the checkpoint."""
    from pipelines.training.loop import DivergedError

    class Diverging(TinyTask):
        def training_step(self, model, batch, device):
            return {"mse": torch.tensor(float("nan"), requires_grad=True)}

    class Interrupted(TinyTask):
        def validate(self, model, device):
            if self.epoch == 1:
                raise KeyboardInterrupt
            return super().validate(model, device)

    model = nn.Linear(4, 1)
    loader = DataLoader(TensorDataset(torch.randn(16, 4), torch.randn(16, 1)), batch_size=8)
    loop = LoopConfig(out_dir=tmp_path / "nan", epochs=2, warmup_iters=0, select_metric="mse", select_mode="min",
                      progress=False)
    with pytest.raises(ValueError, match="training diverged; train again into a new folder with a lower --lr") as e:
        fit(model, Diverging(), loader, torch.optim.SGD(model.parameters(), lr=1.0), loop, torch.device("cpu"))
    assert isinstance(e.value, DivergedError)
    with caplog.at_level("WARNING", logger="pipelines.training.loop"), pytest.raises(KeyboardInterrupt):
        fit(model, Interrupted(), loader, torch.optim.SGD(model.parameters(), lr=0.01),
            replace(loop, out_dir=tmp_path / "cut", epochs=3), torch.device("cpu"))
    assert "interrupted in epoch 1; the checkpoint holds epochs 0-0: the same command with --resume" in caplog.text


def test_a_checkpoint_or_weights_that_cannot_be_written_fail_as_an_os_error_naming_the_file(tmp_path):
    """torch.save said "unexpected pos ... vs ..." and safetensors raised SafetensorError for a
    full disk: the CLI, which prints an OSError in one line, printed a 130-line traceback that
    never said where or why. A file-size limit stands for the full disk (in a child process)."""
    import subprocess
    import sys

    code = f"""
import resource, signal, torch
from pathlib import Path
from models.io import ModelCard, save_weights
from tests.test_training_loop import _run
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (3000, resource.RLIM_INFINITY))
for attempt in (lambda: _run(Path({str(tmp_path)!r}) / "run", epochs=2),
                lambda: save_weights({{"w": torch.zeros(4096)}}, Path({str(tmp_path)!r}) / "w" / "m",
                                     ModelCard(name="m", architecture="x", input_size=[1]))):
    try:
        attempt()
    except OSError as e:
        print("OSError", Path(e.filename).name, e.strerror)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    lines = r.stdout.splitlines()
    assert [line.split(" ", 2)[:2] for line in lines] == [["OSError", "checkpoint.pt"],
                                                          ["OSError", "m.safetensors"]], (r.stdout, r.stderr[-2000:])
    assert all("cannot write it" in line for line in lines)
    assert not list((tmp_path / "w").glob("*.tmp"))  # the half-written file goes


def test_an_epoch_capped_at_max_steps_draws_that_many_batches_and_averages_over_them(tmp_path):
    """The cap broke after drawing one batch more, and the epoch's mean loss was divided by one
    step too many: a constant loss of 1.0 read 0.75 over three steps."""
    drawn = []

    class Counted(TensorDataset):
        def __getitem__(self, i):
            drawn.append(i)
            return super().__getitem__(i)

    class ConstantLoss(TinyTask):
        def training_step(self, model, batch, device):
            return {"one": model(batch[0]).sum() * 0 + 1.0}

    model = nn.Linear(4, 1)
    loader = DataLoader(Counted(torch.randn(10, 4), torch.randn(10, 1)), batch_size=1)
    loop = LoopConfig(out_dir=tmp_path, epochs=1, warmup_iters=0, schedule="constant", grad_clip=None,
                      select_metric="mse", select_mode="min", max_steps_per_epoch=3, progress=False)
    fit(model, ConstantLoss(), loader, torch.optim.SGD(model.parameters(), lr=0.1), loop, torch.device("cpu"))
    record = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert record["train_loss"] == pytest.approx(1.0) and record["train_one"] == pytest.approx(1.0)
    assert len(drawn) == 3


def test_each_rank_draws_its_own_augmentations_after_a_resume_and_rank_0_the_restored_ones():
    """Only rank 0's random state is checkpointed: every rank restored it and drew rank 0's
    augmentations and worker seeds after a resume (an audit)."""
    import random

    import numpy as np

    from pipelines.training.loop import _rng_state, _set_rng_state, apart_for_rank

    torch.manual_seed(5)
    saved = _rng_state()
    draws = {}
    for rank in (0, 1, 2):
        _set_rng_state(saved)
        apart_for_rank(rank)
        draws[rank] = (torch.rand(3).tolist(), np.random.rand(), random.random())
    _set_rng_state(saved)
    assert draws[0][0] == torch.rand(3).tolist()  # rank 0: the run it continued
    assert len({str(d) for d in draws.values()}) == 3
    _set_rng_state(saved)
    apart_for_rank(1)
    assert (torch.rand(3).tolist(), np.random.rand(), random.random()) == draws[1]  # and reproducibly so
