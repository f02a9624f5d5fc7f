"""Projection heads and the SwAV prototype layer."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class MLP(nn.Sequential):
    """Projection MLP: (Linear [-> BN] -> ReLU) x len(hidden) -> Linear [-> BN].

    dims = (in, *hidden, out). SwAV ResNet-50: (2048, 2048, 128) with BN; SEER: (D, 8192, 8192, 256)
    without BN (`batchnorm=False`); SimCLR v2: 3 layers with BN; BYOL: (D, 4096, 256) with BN.
    Hidden linear layers drop their bias when followed by BN (it would be cancelled).
    """

    def __init__(
        self, dims: Sequence[int], *, batchnorm: bool = True, last_batchnorm: bool = False
    ):
        if len(dims) < 2 or any(d < 1 for d in dims):
            raise ValueError(
                f"MLP dims must be at least (in, out) with positive sizes, got {tuple(dims)}"
            )
        layers: list[nn.Module] = []
        for d_in, d_out in zip(dims[:-2], dims[1:-1], strict=True):
            layers.append(nn.Linear(d_in, d_out, bias=not batchnorm))
            if batchnorm:
                layers.append(nn.BatchNorm1d(d_out))
            layers.append(nn.ReLU(inplace=True))
        layers.append(nn.Linear(dims[-2], dims[-1], bias=not last_batchnorm))
        if last_batchnorm:
            layers.append(nn.BatchNorm1d(dims[-1], affine=False))
        super().__init__(*layers)
        self.dims = tuple(dims)


class Prototypes(nn.Module):
    """SwAV prototypes: K learnable vectors c_k, a linear layer WITHOUT bias (SPEC §4).

    scores = z @ C^T with z and the rows of C L2-normalised, so scores are cosine similarities in
    [-1, 1]. The weights are re-normalised in place before every step (`normalize_()`, called by
    `SwAV.before_step`), as in SwAV's training loop; forward itself has no side effect.
    """

    def __init__(self, dim: int, num_prototypes: int):
        super().__init__()
        if dim < 1 or num_prototypes < 2:
            raise ValueError(
                f"prototypes need dim >= 1 and at least 2 prototypes, got {dim}, {num_prototypes}"
            )
        self.weight = nn.Parameter(torch.empty(num_prototypes, dim))  # [K, D]
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)  # nn.Linear's default
        with torch.no_grad():
            self.weight.copy_(F.normalize(self.weight, dim=1))

    @torch.no_grad()
    def normalize_(self) -> None:
        self.weight.copy_(F.normalize(self.weight, dim=1))

    def forward(self, z: Tensor) -> Tensor:
        return z @ self.weight.t()  # [B, K]


class PatchClassifier(nn.Sequential):
    """Revisiting's patch-task head (AlexNet fc7-fc8): Linear -> BN -> ReLU -> Dropout -> Linear.

    Jigsaw and Relative patch location feed it the concatenated embeddings of one image's
    tiles in the order to be recognised (Kolesnikov et al., 2019, code: 4096 hidden units,
    dropout 0.5): [N, tiles x embed_dim] -> logits [N, num_classes].
    """

    def __init__(self, in_dim: int, hidden_dim: int, num_classes: int, dropout: float = 0.5):
        if min(in_dim, hidden_dim, num_classes) < 1 or not 0.0 <= dropout < 1.0:
            raise ValueError(
                "PatchClassifier needs positive sizes and dropout in [0, 1), got "
                f"{in_dim}, {hidden_dim}, {num_classes}, {dropout}"
            )
        super().__init__(
            nn.Linear(in_dim, hidden_dim, bias=False),
            nn.BatchNorm1d(hidden_dim),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden_dim, num_classes),
        )
