"""Deep SAD (Ruff et al., ICLR 2020) with the paper's LeNet-type network for 32x32 RGB.

No layer has a bias and BatchNorm has no affine part: with a bias (or a learnable shift) the
network can map every input onto the centre c and the hypersphere collapses to a constant
score. The centre is a buffer, saved with the weights, and it is the one the loss reads
(pyod once shipped a Deep SVDD whose fitted centre was stored where the loss never looked).

Pretraining: the autoencoder's encoder *is* a `LeNetEncoder`, so `load_pretrained_encoder`
copies it with strict key matching; the reference implementation's keys never match and it
silently trains from scratch (its issue #9).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

REP_DIM = 128


def _bn2d(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, eps=1e-4, affine=False)


class LeNetEncoder(nn.Module):
    """32x(5x5) -> 64x(5x5) -> 128x(5x5) conv modules (BN, LeakyReLU, max-pool), dense 128."""

    def __init__(self, rep_dim: int = REP_DIM) -> None:
        super().__init__()
        self.rep_dim = rep_dim
        self.conv1, self.bn1 = nn.Conv2d(3, 32, 5, bias=False, padding=2), _bn2d(32)
        self.conv2, self.bn2 = nn.Conv2d(32, 64, 5, bias=False, padding=2), _bn2d(64)
        self.conv3, self.bn3 = nn.Conv2d(64, 128, 5, bias=False, padding=2), _bn2d(128)
        self.fc1 = nn.Linear(128 * 4 * 4, rep_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv, bn in ((self.conv1, self.bn1), (self.conv2, self.bn2), (self.conv3, self.bn3)):
            x = F.max_pool2d(F.leaky_relu(bn(conv(x))), 2)
        return self.fc1(x.flatten(1))


class LeNetDecoder(nn.Module):
    """The encoder mirrored with transposed convolutions and 2x upsampling."""

    def __init__(self, rep_dim: int = REP_DIM) -> None:
        super().__init__()
        self.rep_dim = rep_dim
        self.deconv1, self.bn1 = nn.ConvTranspose2d(rep_dim // 16, 128, 5, bias=False, padding=2), _bn2d(128)
        self.deconv2, self.bn2 = nn.ConvTranspose2d(128, 64, 5, bias=False, padding=2), _bn2d(64)
        self.deconv3, self.bn3 = nn.ConvTranspose2d(64, 32, 5, bias=False, padding=2), _bn2d(32)
        self.deconv4 = nn.ConvTranspose2d(32, 3, 5, bias=False, padding=2)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = F.leaky_relu(z.view(z.shape[0], self.rep_dim // 16, 4, 4))
        for deconv, bn in ((self.deconv1, self.bn1), (self.deconv2, self.bn2), (self.deconv3, self.bn3)):
            x = F.interpolate(F.leaky_relu(bn(deconv(x))), scale_factor=2)
        return torch.sigmoid(self.deconv4(x))


class DeepSADAutoencoder(nn.Module):
    def __init__(self, rep_dim: int = REP_DIM) -> None:
        super().__init__()
        self.encoder = LeNetEncoder(rep_dim)
        self.bn_code = nn.BatchNorm1d(rep_dim, eps=1e-4, affine=False)
        self.decoder = LeNetDecoder(rep_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.bn_code(self.encoder(x)))


class DeepSAD(nn.Module):
    """Encoder plus hypersphere centre; `forward` gives embeddings, `score` the distance to c."""

    def __init__(self, rep_dim: int = REP_DIM) -> None:
        super().__init__()
        self.encoder = LeNetEncoder(rep_dim)
        self.register_buffer("c", torch.zeros(rep_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def score(self, x: torch.Tensor) -> torch.Tensor:
        return torch.linalg.vector_norm(self.encoder(x) - self.c, dim=1)

    def load_pretrained_encoder(self, autoencoder: DeepSADAutoencoder) -> None:
        """Copy every encoder weight from the pretrained autoencoder (strict: all keys)."""
        self.encoder.load_state_dict(autoencoder.encoder.state_dict(), strict=True)

    @torch.no_grad()
    def set_center(self, embeddings: torch.Tensor, eps: float = 0.1) -> torch.Tensor:
        """c = mean embedding; coordinates closer to 0 than eps are pushed to +-eps, since a
        zero coordinate is trivially matched by zero weights."""
        c = embeddings.mean(0)
        c = torch.where((c.abs() < eps) & (c < 0), torch.full_like(c, -eps), c)
        c = torch.where((c.abs() < eps) & (c >= 0), torch.full_like(c, eps), c)
        self.c.copy_(c)
        return self.c


def deep_sad_loss(embeddings: torch.Tensor, c: torch.Tensor, semi_targets: torch.Tensor,
                  eta: float = 1.0, eps: float = 1e-6) -> torch.Tensor:
    """Mean Deep SAD loss. semi_targets: 0 unlabeled, +1 labeled normal, -1 labeled anomaly.

    Unlabeled: d^2. Labeled: eta * (d^2 + eps)^y, i.e. eta * d^2 for normals and
    eta / (d^2 + eps) for anomalies, which pushes them away from c. With no labels at all
    this is Deep SVDD.
    """
    dist = ((embeddings - c) ** 2).sum(dim=1)
    labeled = eta * (dist + eps) ** semi_targets.float()
    return torch.where(semi_targets == 0, dist, labeled).mean()
