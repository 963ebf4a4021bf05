"""A small training loop on in-memory arrays (random aligned crops, flips and rotations).

The base of ``geoseg train``; also used by the tests to get a model whose decisions are stable
enough to measure the tiler rather than near-ties of a random network.
"""

from __future__ import annotations

import numpy as np
import torch
from numpy.typing import NDArray
from torch import nn

from geoseg.models.card import ModelCard
from geoseg.models.store import normalize

IGNORE_INDEX = 255


def fit(
    model: nn.Module,
    card: ModelCard,
    image: NDArray[np.generic],
    labels: NDArray[np.integer],
    *,
    steps: int = 200,
    crop: int = 64,
    batch_size: int = 8,
    lr: float = 3e-3,
    seed: int = 0,
) -> list[float]:
    """Train ``model`` in place on one raw image ``(bands, H, W)`` and its labels ``(H, W)``.

    Labels equal to 255 are ignored. Crops are ``crop`` pixels (rounded down to the card's total
    stride), augmented with flips and 90-degree rotations. Returns the loss per step.
    """
    generator = np.random.default_rng(seed)
    torch.manual_seed(seed)
    crop = max(card.total_stride, crop - crop % card.total_stride)
    _, height, width = image.shape
    if height < crop or width < crop:
        raise ValueError(f"image {height}x{width} is smaller than the crop {crop}")
    x_all = normalize(torch.from_numpy(image.astype(np.float32))[None], card)[0]
    y_all = torch.from_numpy(labels.astype(np.int64))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    loss_fn = nn.CrossEntropyLoss(ignore_index=IGNORE_INDEX)
    model.train()
    losses = []
    for _ in range(steps):
        xs, ys = [], []
        for _ in range(batch_size):
            r = int(generator.integers(0, height - crop + 1))
            c = int(generator.integers(0, width - crop + 1))
            x = x_all[:, r : r + crop, c : c + crop]
            y = y_all[r : r + crop, c : c + crop]
            k = int(generator.integers(0, 4))
            x, y = torch.rot90(x, k, (1, 2)), torch.rot90(y, k, (0, 1))
            if generator.random() < 0.5:
                x, y = torch.flip(x, (2,)), torch.flip(y, (1,))
            xs.append(x)
            ys.append(y)
        optimizer.zero_grad()
        loss = loss_fn(model(torch.stack(xs)), torch.stack(ys))
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    model.eval()
    return losses
