"""Untrained models at the default sizes, for timing only (speed does not depend on the
weights). Their cards say so; nothing else may use them."""

from __future__ import annotations

from pathlib import Path

import torch

from models.classifier import ClassifierConfig, RegularityClassifier
from models.deep_sad import DeepSAD
from models.detector import DetectorConfig, build_detector
from models.io import ModelCard, save_weights

NOTE = {"warning": "UNTRAINED: random weights for benchmarking speed only"}


def write_untrained_weights(folder: Path, detector: DetectorConfig = DetectorConfig(score_thresh=0.0),
                            classifier: ClassifierConfig = ClassifierConfig()) -> Path:
    torch.manual_seed(0)
    save_weights(build_detector(detector).state_dict(), folder / "detector",
                 ModelCard(name="detector", architecture=f"{detector.arch}_{detector.backbone}_fpn",
                           config=detector.as_dict(), input_size=[detector.min_size, detector.max_size],
                           classes=["cervix"], thresholds={"score": 0.0}, data=NOTE))
    sad = DeepSAD()
    sad.c.fill_(0.1)
    save_weights(sad.state_dict(), folder / "deep_sad", ModelCard(
        name="deep_sad", architecture="lenet32_deep_sad", config={"rep_dim": 128}, input_size=[32, 32],
        thresholds={"distance": 1.0}, data=NOTE))
    save_weights(RegularityClassifier(classifier).state_dict(), folder / "classifier", ModelCard(
        name="classifier", architecture=classifier.arch, config=classifier.as_dict(),
        input_size=[classifier.input_size] * 2, classes=["regular", "green", "iodine"],
        thresholds={"probability": 0.5}, data=NOTE))
    return folder
