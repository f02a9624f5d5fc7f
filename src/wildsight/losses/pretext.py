"""Losses of the pretext tasks of "Revisiting" (Kolesnikov et al., 2019): pure functions.

Rotation, Jigsaw and Relative patch location are classification: `pretext_classification_loss`.
Exemplar is metric learning over the heavily augmented copies of each image, with the
triplet loss Revisiting uses (`triplet_loss`, semi-hard mining as FaceNet) or a
classification form (`exemplar_classification_loss`).

None of them needs a cross-process reduction: every label is local (an image's copies,
tiles and rotations stay on the process that drew them), each rank takes the mean over its
own samples, and DDP's gradient average over equal local batches is the global mean.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

TripletMining = Literal["semihard", "hard", "all"]


def pretext_classification_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy -(1/N) sum_i log softmax(logits_i)[y_i], in float32 even under bf16.

    logits [N, K], labels [N] int64 in [0, K): the rotation (K = 4), the permutation index
    (K = 100) or the neighbour position (K = 8)."""
    if logits.dim() != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(
            f"logits must be [N, K] and labels [N], got {tuple(logits.shape)}, {tuple(labels.shape)}"
        )
    return F.cross_entropy(logits.float(), labels)


@torch.no_grad()
def classification_accuracy(logits: Tensor, labels: Tensor) -> Tensor:
    """Fraction of rows whose arg-max is the label: scalar float32 (the pretext accuracy)."""
    return (logits.argmax(dim=1) == labels).float().mean()


def pairwise_sq_distances(z: Tensor) -> Tensor:
    """||z_i - z_j||^2 = 2 - 2 z_i . z_j for L2-normalised rows z [N, D] -> [N, N], >= 0."""
    return (2.0 - 2.0 * z @ z.t()).clamp_min(0.0)


def triplet_loss(
    embeddings: Tensor,
    labels: Tensor,
    margin: float = 0.5,
    mining: TripletMining = "semihard",
) -> Tensor:
    """Triplet loss on L2-normalised embeddings with squared Euclidean distances d.

    embeddings [N, D] (normalised inside, in float32), labels [N] (Exemplar: the index of the
    image each copy came from). For an anchor a, positives p share its label (p != a) and
    negatives n do not; each triplet costs max(0, d(a, p) - d(a, n) + margin).

    - "semihard" (Schroff et al., 2015, FaceNet §3.2; Revisiting's Exemplar with margin 0.5,
      as TensorFlow's `triplet_semihard_loss`): for every pair (a, p), the closest negative
      farther than p, d(a, n) > d(a, p); the farthest negative if none is. Mean over pairs.
    - "hard" (Hermans et al., 2017, batch hard): per anchor, the farthest positive and the
      closest negative. Mean over anchors.
    - "all" (Hermans et al., 2017, batch all): mean over every valid (a, p, n).

    Revisiting's code normalises the embeddings along the batch axis (axis=0), a slip; rows
    are normalised here. Memory is N x P x N for P the most positives of an anchor (the
    copies per image minus one), not N^3.
    """
    if embeddings.dim() != 2 or labels.shape != embeddings.shape[:1]:
        raise ValueError(
            f"triplet_loss needs embeddings [N, D] and labels [N], got "
            f"{tuple(embeddings.shape)}, {tuple(labels.shape)}"
        )
    if margin < 0:
        raise ValueError(f"triplet margin must be >= 0, got {margin}")
    z = F.normalize(embeddings.float(), dim=1)
    dist = pairwise_sq_distances(z)  # [N, N]
    n = z.shape[0]
    same = labels[:, None] == labels[None, :]  # [N, N]
    eye = torch.eye(n, dtype=torch.bool, device=z.device)
    positive, negative = same & ~eye, ~same  # [N, N]
    if not positive.any() or not negative.any(dim=1).all():
        raise ValueError(
            "triplet_loss needs every sample to have a negative and some sample a positive: "
            "at least 2 images with 2 copies each"
        )
    if mining == "hard":
        has_pos = positive.any(dim=1)  # [N]
        hardest_pos = dist.masked_fill(~positive, float("-inf")).amax(dim=1)  # [N]
        hardest_neg = dist.masked_fill(~negative, float("inf")).amin(dim=1)  # [N]
        return F.relu(hardest_pos - hardest_neg + margin)[has_pos].mean()
    # the positives of each anchor as columns: pos_idx [N, P], padded where an anchor has fewer
    p = int(positive.sum(dim=1).max())
    pos_valid, pos_idx = positive.float().topk(p, dim=1)  # [N, P] 1.0 where a real positive
    pos_valid = pos_valid.bool()
    d_ap = dist.gather(1, pos_idx)  # [N, P]
    d_an = dist[:, None, :]  # [N, 1, N]
    neg = negative[:, None, :]  # [N, 1, N]
    if mining == "all":
        valid = pos_valid[:, :, None] & neg  # [N, P, N]
        cost = F.relu(d_ap[:, :, None] - d_an + margin)  # [N, P, N]
        return cost[valid].mean()
    if mining != "semihard":
        raise ValueError(f"triplet mining must be 'semihard', 'hard' or 'all', got {mining!r}")
    outside = neg & (d_an > d_ap[:, :, None])  # [N, P, N] negatives farther than p
    closest_outside = d_an.masked_fill(~outside, float("inf")).amin(dim=2)  # [N, P]
    farthest = dist.masked_fill(~negative, float("-inf")).amax(dim=1, keepdim=True)  # [N, 1]
    d_neg = torch.where(outside.any(dim=2), closest_outside, farthest)  # [N, P]
    return F.relu(d_ap - d_neg + margin)[pos_valid].mean()


def exemplar_classification_loss(embeddings: Tensor, temperature: float = 0.1) -> Tensor:
    """Exemplar as classification, within the batch: every image is a class.

    embeddings [V, B, D]: V copies of each of B images (normalised inside, float32). Copy v
    of image i is classified among the B images by cosine similarity to their class means,
    softmax with `temperature`, target i; its own class mean leaves it out (the mean of the
    other V - 1 copies), so it cannot match itself. Mean over the V B copies.

    Dosovitskiy et al. (2014) train a softmax over N fixed surrogate classes (one per seed
    image), which needs each image's dataset index; the trainer hands methods views only,
    so this batch-local form keeps the idea (copies of one image form a class) without it.
    """
    if embeddings.dim() != 3 or embeddings.shape[0] < 2 or embeddings.shape[1] < 2:
        raise ValueError(
            "exemplar_classification_loss needs embeddings [V, B, D] with V >= 2 copies of "
            f"B >= 2 images, got {tuple(embeddings.shape)}"
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    z = F.normalize(embeddings.float(), dim=-1)  # [V, B, D]
    copies, batch = z.shape[:2]
    total = z.sum(dim=0)  # [B, D]; its direction is the direction of the class mean
    logits = z @ F.normalize(total, dim=-1).t()  # [V, B, B] cosine to every class mean
    own = (z * F.normalize(total[None] - z, dim=-1)).sum(dim=-1)  # [V, B] leave-one-out
    index = torch.arange(batch, device=z.device)
    logits = logits.clone()
    logits[:, index, index] = own
    target = index.repeat(copies)  # [V B]
    return F.cross_entropy(logits.reshape(copies * batch, batch) / temperature, target)
