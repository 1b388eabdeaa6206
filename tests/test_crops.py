import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.engine.crops import band_weights, box_weights, crop_boxes, expand_boxes, weigh_rows
from pipelines.data.synth import PRESETS, render_image, plan


@pytest.fixture(scope="module")
def photos():
    cfg = PRESETS["tiny"]
    from io import BytesIO

    out = []
    for spec in plan(cfg)[:12]:
        img = render_image(spec, cfg.size)
        if img.box is not None:
            out.append((Image.open(BytesIO(img.jpeg)).convert("RGB"), img.box))
    return out[:6]


def test_crops_match_a_pil_crop_and_resize_of_the_same_box(photos):
    images = [torch.from_numpy(np.array(p)).permute(2, 0, 1) for p, _ in photos]
    boxes = torch.tensor([b for _, b in photos], dtype=torch.float32).round()
    crops = crop_boxes(images, boxes, sizes=(32, 224))
    assert crops[32].shape == (len(photos), 3, 32, 32) and crops[224].shape == (len(photos), 3, 224, 224)
    for i, (pil, _) in enumerate(photos):
        x1, y1, x2, y2 = boxes[i].int().tolist()
        for size, resample in ((32, Image.Resampling.BOX), (224, Image.Resampling.BILINEAR)):
            ref = np.asarray(pil.crop((x1, y1, x2, y2)).resize((size, size), resample), np.float32)
            ours = crops[size][i].permute(1, 2, 0).numpy()
            assert np.abs(ours - ref).mean() < 6.0, (i, size, np.abs(ours - ref).mean())


def test_margin_grows_the_box_and_stays_inside_the_image():
    boxes = torch.tensor([[10.0, 10.0, 50.0, 30.0], [0.0, 0.0, 100.0, 100.0]])
    grown = expand_boxes(boxes, 0.1, width=100, height=100)
    assert grown[0].tolist() == pytest.approx([6.0, 8.0, 54.0, 32.0])
    assert grown[1].tolist() == [0.0, 0.0, 100.0, 100.0]


def test_images_of_different_sizes_crop_in_one_call():
    a = torch.zeros(3, 50, 80, dtype=torch.uint8)
    a[:, 5:25, 25:45] = 200  # crop well inside: bilinear samples at the edge see neighbours
    b = torch.full((3, 300, 120), 7, dtype=torch.uint8)
    out = crop_boxes([a, b], torch.tensor([[30.0, 10.0, 40.0, 20.0], [0.0, 0.0, 120.0, 300.0]]), sizes=(8,))
    assert torch.allclose(out[8][0], torch.full((3, 8, 8), 200.0))
    assert torch.allclose(out[8][1], torch.full((3, 8, 8), 7.0))


def test_a_crop_pixel_is_the_area_average_of_its_bin_sub_pixel_edges_included():
    ramp = torch.arange(8, dtype=torch.float32).repeat(3, 4, 1)  # value = column index
    # one output pixel over columns 0.5..2.5: half of column 0, all of 1, half of 2
    out = crop_boxes([ramp], torch.tensor([[0.5, 0.0, 2.5, 4.0]]), sizes=(1,))[1]
    assert out.flatten().tolist() == pytest.approx([1.0, 1.0, 1.0])
    # two output pixels over columns 0..8: the means of 0..3 and 4..7
    out = crop_boxes([ramp], torch.tensor([[0.0, 0.0, 8.0, 4.0]]), sizes=(2,))[2]
    assert out[0, 0].flatten().tolist() == pytest.approx([1.5, 5.5, 1.5, 5.5])


def test_the_sparse_band_product_equals_the_dense_weights_product():
    """Stacked bands of several sizes, wider and narrower bins than a pixel, edges clipped to
    the pixels and a first pixel other than 0: the CSR rows carry the same weights."""
    planes = torch.rand(3, 57, 40, generator=torch.Generator().manual_seed(0)) * 255
    cases = [(0.0, 57.0, 32), (3.3, 50.7, 37), (10.2, 20.9, 32), (0.0, 57.0, 1), (56.5, 57.2, 2)]
    for first in (0, 5):
        bands = [band_weights(a + first, b + first, first, 57, size) for a, b, size in cases]
        dense = torch.cat([box_weights(a + first, b + first, first, 57, size) for a, b, size in cases])
        assert torch.allclose(dense.sum(1), torch.ones(len(dense)))
        assert torch.allclose(weigh_rows(bands, planes), dense @ planes, atol=1e-3)


def test_degenerate_boxes_crop_to_pixels_of_the_image():
    """Boxes a detector can return at the edges: inverted, outside the photo, thinner than a
    pixel, on a one-pixel photo. The sparse rows are built from them, so they must stay valid
    (a malformed CSR matrix would read out of bounds, not raise)."""
    image = torch.randint(0, 256, (3, 7, 5), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    tiny = torch.full((3, 1, 1), 9, dtype=torch.uint8)
    boxes = [[4.0, 6.0, 1.0, 2.0], [-30.0, -30.0, -10.0, -10.0], [10.0, 10.0, 40.0, 40.0], [2.2, 3.1, 2.3, 3.15],
             [0.0, 0.0, 5.0, 7.0]]
    for size in (1, 3, 32):
        out = crop_boxes([image] * len(boxes), torch.tensor(boxes), sizes=(size,), margin=0.05)[size]
        assert out.shape == (len(boxes), 3, size, size)
        assert torch.isfinite(out).all() and out.min() >= 0 and out.max() <= 255
        assert crop_boxes([tiny], torch.tensor([[0.0, 0.0, 1.0, 1.0]]), sizes=(size,))[size].eq(9).all()
