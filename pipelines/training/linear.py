"""The project's small linear models (stage 0's presence heads, stage 2's crop-colour scorer):
a scikit-learn logistic regression on standardised features, kept as plain arrays so that a
torch module can hold them as buffers and the engine runs them without scikit-learn."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.linear_model import LogisticRegression


@dataclass
class StandardisedLogistic:
    mean: np.ndarray
    scale: np.ndarray
    weight: np.ndarray
    bias: float

    def logits(self, x: np.ndarray) -> np.ndarray:
        return ((x - self.mean) / self.scale) @ self.weight + self.bias


def fit_standardised_logistic(x: np.ndarray, y: np.ndarray, c: float, seed: int,
                              sample_weight: np.ndarray | None = None,
                              class_weight: str | None = None) -> StandardisedLogistic:
    """Each feature standardised on the training rows (std + 1e-6: empty histogram bins stay
    finite), then L2-regularised logistic regression with inverse strength `c`."""
    mean, scale = x.mean(0), x.std(0) + 1e-6
    lr = LogisticRegression(C=c, max_iter=5000, class_weight=class_weight, random_state=seed)
    lr.fit((x - mean) / scale, y, sample_weight=sample_weight)
    return StandardisedLogistic(mean, scale, lr.coef_[0], float(lr.intercept_[0]))
