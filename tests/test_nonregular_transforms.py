import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors

from pipelines.data.transforms import GreenFilter, LugolIodine

PINK = (0.85, 0.5, 0.5)
VESSEL = (0.5, 0.04, 0.06)
COLUMNAR = (0.75, 0.15, 0.17)


def _regular_crop() -> torch.Tensor:
    """Pink tissue, a red transformation zone in the middle, one dark-red vessel."""
    img = np.empty((64, 64, 3), np.float32)
    img[:] = PINK
    img[24:40, 24:40] = COLUMNAR
    img[8, 4:60] = VESSEL
    return torch.from_numpy(img).permute(2, 0, 1).contiguous()


def test_green_filter_drains_red_and_darkens_red_vessels():
    torch.manual_seed(0)
    before = _regular_crop()
    luma = torch.tensor([0.299, 0.587, 0.114])[:, None, None]

    def contrast(img):  # tissue brightness minus vessel brightness
        y = (img * luma).sum(0)
        return float(y[20, 4:60].mean() - y[8, 4:60].mean())

    def redness(img):  # of the red transformation zone
        r, g, b = img[:, 30, 30]
        return float(r / (g + b))

    for _ in range(30):  # every look, from strong green to faint grey-blue
        after = GreenFilter()(before)
        assert redness(after) < 0.7 * redness(before)  # the camera sees green-band light
        assert contrast(after) > contrast(before)  # vessels absorb green light


def test_iodine_stains_tissue_brown_and_leaves_columnar_epithelium_yellower():
    torch.manual_seed(1)
    after = LugolIodine()(_regular_crop())
    tissue = after[:, 50:60, 50:60].mean((1, 2))
    columnar = after[:, 28:36, 28:36].mean((1, 2))
    assert tissue[0] > tissue[1] > tissue[2]  # brown: R > G > B
    assert float(tissue.mean()) < float(np.mean(PINK))  # darker than pink tissue
    # Iodine-negative tissue is mustard: its green/red ratio is higher than the stained area's.
    assert float(columnar[1] / columnar[0]) > float(tissue[1] / tissue[0])


@pytest.mark.parametrize("transform", [GreenFilter(), LugolIodine()])
def test_transforms_keep_type_dtype_shape_and_leave_boxes_alone(transform):
    img = tv_tensors.Image((_regular_crop() * 255).to(torch.uint8))
    boxes = tv_tensors.BoundingBoxes([[1, 2, 30, 40]], format="XYXY", canvas_size=(64, 64))
    out, out_boxes = transform(img, boxes)
    assert isinstance(out, tv_tensors.Image) and out.dtype == torch.uint8 and out.shape == img.shape
    assert torch.equal(out_boxes, boxes)
    pil = transform(Image.fromarray(img.permute(1, 2, 0).numpy()))
    assert isinstance(pil, Image.Image) and pil.size == (64, 64)


def test_transforms_are_reproducible_under_torch_manual_seed():
    img = _regular_crop()
    torch.manual_seed(42)
    a = GreenFilter()(img)
    torch.manual_seed(42)
    b = GreenFilter()(img)
    torch.manual_seed(43)
    c = GreenFilter()(img)
    assert torch.equal(a, b) and not torch.equal(a, c)
