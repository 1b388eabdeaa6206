"""Drawn marks on stage-2 training crops: thin lines in the atlas photos' colours, the same
shape and range out as in, reproducible under torch's seed, and off unless asked for."""

import torch

from pipelines.data.marks import MARK_COLOURS, ClinicianMarks
from pipelines.data.presets import classification_train, deep_sad_train


def _tissue(side: int = 37) -> torch.Tensor:
    return torch.tensor([0.85, 0.45, 0.45])[:, None, None].expand(3, side, side).clone()  # pink cervix


def test_marks_change_a_minority_of_pixels_towards_a_mark_colour():
    crop = _tissue()
    palette = torch.tensor(MARK_COLOURS, dtype=torch.float32) / 255
    changed_shares = []
    for seed in range(20):
        torch.manual_seed(seed)
        out = ClinicianMarks()(crop)
        assert out.shape == crop.shape and out.dtype == crop.dtype
        assert 0.0 <= float(out.min()) and float(out.max()) <= 1.0
        changed = (out - crop).abs().amax(0) > 0.05
        changed_shares.append(float(changed.float().mean()))
        if changed.any():  # the most changed pixel moved towards one of the palette's colours
            y, x = divmod(int((out - crop).abs().sum(0).argmax()), crop.shape[-1])
            before, after = crop[:, y, x], out[:, y, x]
            assert float(((palette - after).norm(dim=1) - (palette - before).norm(dim=1)).min()) < 0
    assert max(changed_shares) < 0.35  # lines, not paint
    assert sum(s > 0 for s in changed_shares) >= 15  # an empty draw (no outline, no arrow) is rare


def test_marks_are_reproducible_under_torchs_seed_and_keep_uint8_input_uint8():
    crop = (torch.rand(3, 32, 32) * 255).byte()
    torch.manual_seed(3)
    a = ClinicianMarks()(crop)
    torch.manual_seed(3)
    b = ClinicianMarks()(crop)
    assert a.dtype == torch.uint8 and torch.equal(a, b)


def test_presets_draw_marks_only_when_asked():
    crop = _tissue()
    torch.manual_seed(0)
    plain = [deep_sad_train()(crop) for _ in range(10)]  # flips of a flat crop are the crop itself
    assert all(torch.equal(p, crop) for p in plain)
    marked = [deep_sad_train(marks=1.0)(crop) for _ in range(10)]
    assert sum(not torch.equal(m, crop) for m in marked) >= 8
    out = classification_train(32, marks=1.0)(crop)
    assert out.shape == (3, 32, 32)
