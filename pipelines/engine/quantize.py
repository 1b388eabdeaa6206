"""The detector's heads at INT8 for CPUs: NNCF's post-training quantization of its OpenVINO
export, calibrated on the inputs the engine itself feeds the detector for a set of photos
(`cervixqc export --int8-calibration`). Not the bundled default; the README says why.

Why the heads: RetinaNet's two heads run four 256-channel 3x3 convolutions on every FPN
level, most of the detector's time, and the detector is most of the engine's on a CPU
(12.4 of 22.8 ms a photo on the 300 real-mix photos). Why not the backbone and FPN too: the
presence head (stage 0) reads the FPN maps, and with them quantized its score moved up to
0.29 on real photos and one real validation photo turned no_cervix; with the heads alone
it moves at most 0.05 (val and test). Why the heads' output convolutions stay float: with
them quantized the cervix score moved 0.24 at the median (threshold 0.5) and 2 of the 300
bench photos changed label.

Measured on the 2-core EPYC (AVX-512 VNNI) with the bundled weights calibrated on the real
train split: `cervixqc bench --weights W --mix-from .cache/real-data/real --device cpu
--modes torch,openvino:bf16,auto` (one run; openvino:bf16 is the float detector): detector
3.63 -> 3.24 s per 300 photos, 44.9 -> 47.2 images/s (1.05x), labels differing from torch
0 of 300 in both. `cervixqc eval-pipeline .cache/real-data/split.csv --split val|test` on
the float and the INT8 folders: 0 of 106 val labels differ, 1 of 113 test photos (a cervix
called no_cervix: its score moved 0.10).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

IGNORED = (".*backbone.*", ".*cls_logits.*", ".*bbox_reg.*")
PRESET = "mixed"  # symmetric weights, asymmetric activations: mobilenet_v3's hardswish goes below zero


def describe(n_photos: int, source: str) -> str:
    """The export card's `quantization` entry."""
    return (f"int8: NNCF post-training quantization (preset {PRESET}); the heads' inner convolutions at INT8; "
            f"backbone and FPN activations in float (their weights stored at INT8, dequantized); the heads' output "
            f"convolutions (cls_logits, bbox_reg) in float; calibrated on the detector inputs of {n_photos} photos "
            f"of {source}")


def quantize_detector(ov_model, inputs: Sequence[np.ndarray]):
    """The OpenVINO detector with its heads at INT8 (FakeQuantize nodes), from calibration
    `inputs` (batches as the engine feeds them; any sizes)."""
    import nncf

    nncf.set_log_level(logging.WARNING)  # else a line per ignored node and a progress bar per pass
    if not inputs:
        raise ValueError("no calibration inputs: the calibration photos could not be decoded")
    quantized = nncf.quantize(ov_model, nncf.Dataset(list(inputs)), subset_size=len(inputs),
                              preset=nncf.QuantizationPreset.MIXED,
                              ignored_scope=nncf.IgnoredScope(patterns=list(IGNORED)))
    return _heads_only(quantized)


def _heads_only(model):
    """Bypass every activation quantizer that feeds anything but a head's convolution. The
    ignored scope alone left 46 of them in the backbone (mobilenet_v3's squeeze-excitation
    and hardswish nodes; NNCF also stores the backbone's weights at INT8, which this leaves),
    and the FPN maps, which the presence head reads, moved by up to 2 on uniform-noise input
    (0.5 after this), enough to turn one real validation photo no_cervix."""
    for fq in [op for op in model.get_ordered_ops() if op.get_type_name() == "FakeQuantize"]:
        consumers = [t.get_node() for t in fq.output(0).get_target_inputs()]
        if all(c.get_type_name() == "Convolution" and ".head." in c.get_friendly_name() for c in consumers):
            continue
        for target in list(fq.output(0).get_target_inputs()):
            target.replace_source_output(fq.input_value(0))
    model.validate_nodes_and_infer_types()
    return model
