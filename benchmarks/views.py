"""Throughput of make_views against kornia.augmentation and a per-image PIL loop, on CPU.

    .venv/bin/python benchmarks/views.py [--threads 1] [--iters 3] [--json runs/bench/views.json]

Cases: (a) Fashion-MNIST-sized 28 px -> 2 x 32 + 4 x 16 (default_views(28)), batch 256;
(b) 256 px -> 2 x 224 + 4 x 96 (SEER_VIEWS), batch 64. The kornia pipeline is the
same recipe from kornia.augmentation's modules (RandomResizedCrop, flip, ColorJiggle,
RandomGrayscale, RandomGaussianBlur, Normalize); the PIL loop is torchvision's classic
per-image path rewritten with Pillow (no torchvision here), for (b) on a few images.
Reports img/s by wall clock and by process CPU time (CPU time is the steadier figure on a
shared machine; both are per `--threads` threads).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import kornia
import kornia.augmentation as K
import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageFilter

from wildsight.views import SEER_VIEWS, ViewSpec, default_views, make_views
from wildsight.views.ops import blur_kernel_size


def kornia_pipeline(spec: ViewSpec) -> Callable[[torch.Tensor], list[torch.Tensor]]:
    """The same views from kornia.augmentation's modules (global-RNG draws)."""
    per_group = []
    for group in spec.groups:
        a = group.augment
        steps = [
            K.RandomResizedCrop((group.size, group.size), scale=group.scale, ratio=group.ratio),
            K.RandomHorizontalFlip(p=a.flip_p),
            K.ColorJiggle(a.brightness, a.contrast, a.saturation, a.hue, p=a.color_jitter_p),
            K.RandomGrayscale(p=a.grayscale_p),
        ]
        kernel = blur_kernel_size(group.size, a.blur_sigma[1])
        if a.blur_p > 0 and kernel > 1:
            steps.append(K.RandomGaussianBlur(kernel, a.blur_sigma, p=a.blur_p))
        steps.append(K.Normalize(torch.tensor(a.mean), torch.tensor(a.std)))
        per_group.append((group.count, torch.nn.Sequential(*steps)))

    def run(images: torch.Tensor) -> list[torch.Tensor]:
        x = images.float() / 255
        return [aug(x) for count, aug in per_group for _ in range(count)]

    return run


def pil_pipeline(spec: ViewSpec, seed: int = 0) -> Callable[[torch.Tensor], list[torch.Tensor]]:
    """torchvision's per-image PIL recipe, image by image, with Pillow and numpy."""
    rng = np.random.default_rng(seed)

    def one(img: Image.Image, group) -> np.ndarray:
        a = group.augment
        w, h = img.size
        area = rng.uniform(*group.scale) * w * h
        ratio = np.exp(rng.uniform(np.log(group.ratio[0]), np.log(group.ratio[1])))
        cw = min(w, round(np.sqrt(area * ratio)))
        ch = min(h, round(np.sqrt(area / ratio)))
        top, left = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        img = img.resize((group.size, group.size), Image.BILINEAR, (left, top, left + cw, top + ch))
        if rng.random() < a.flip_p:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        if rng.random() < a.color_jitter_p:
            enhancers = (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color)
            strengths = (a.brightness, a.contrast, a.saturation)
            for op in rng.permutation(4):
                if op < 3:
                    factor = rng.uniform(max(0.0, 1 - strengths[op]), 1 + strengths[op])
                    img = enhancers[op](img).enhance(factor)
                else:
                    hsv = np.array(img.convert("HSV"))
                    hsv[..., 0] += np.uint8(int(rng.uniform(-a.hue, a.hue) * 255) % 256)
                    img = Image.fromarray(hsv, "HSV").convert("RGB")
        if rng.random() < a.grayscale_p:
            img = img.convert("L").convert("RGB")
        if rng.random() < a.blur_p:
            img = img.filter(ImageFilter.GaussianBlur(rng.uniform(*a.blur_sigma)))
        x = np.asarray(img, dtype=np.float32) / 255
        return (x - np.array(a.mean, np.float32)) / np.array(a.std, np.float32)

    def run(images: torch.Tensor) -> list[torch.Tensor]:
        pils = [Image.fromarray(im.permute(1, 2, 0).numpy()) for im in images]
        views = []
        for group in spec.groups:
            for _ in range(group.count):
                batch = np.stack([one(p, group) for p in pils])  # [B, size, size, 3]
                views.append(torch.from_numpy(batch).permute(0, 3, 1, 2))
        return views

    return run


def measure(fn: Callable[[], object], iters: int) -> dict[str, float]:
    fn()  # warm-up
    walls, cpus = [], []
    for _ in range(iters):
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return {"wall_s": statistics.median(walls), "cpu_s": statistics.median(cpus)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument(
        "--pil-images", type=int, default=8, help="images for the PIL loop, 0: skip"
    )
    parser.add_argument("--json", type=Path, default=Path("runs/bench/views.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cases = [
        ("a: 28px -> 2x32+4x16", 256, 28, default_views(28, "swav")),
        ("b: 256px -> 2x224+4x96", 64, 256, SEER_VIEWS),
    ]
    rows = []
    for name, batch, side, spec in cases:
        images = torch.randint(0, 256, (batch, 3, side, side), dtype=torch.uint8)
        generator = torch.Generator().manual_seed(0)
        few = images[: args.pil_images]
        pipelines = {  # name: (call, images per call, timed calls)
            "wildsight.make_views": (
                partial(make_views, images, spec, generator),
                batch,
                args.iters,
            ),
            "kornia.augmentation": (partial(kornia_pipeline(spec), images), batch, args.iters),
        }
        if side > 64 and args.pil_images > 0:
            pipelines["PIL per image"] = (partial(pil_pipeline(spec), few), len(few), 1)
        for impl, (fn, n, iters) in pipelines.items():
            t = measure(fn, iters)
            rows.append(
                {
                    "case": name,
                    "impl": impl,
                    "batch": n,
                    "views": spec.num_views,
                    "img_per_s_wall": n / t["wall_s"],
                    "img_per_s_cpu": n / t["cpu_s"],
                    **t,
                }
            )
    print(f"{'case':<26}{'implementation':<24}{'batch':>6}{'img/s (wall)':>14}{'img/s (CPU)':>13}")
    for r in rows:
        print(
            f"{r['case']:<26}{r['impl']:<24}{r['batch']:>6}"
            f"{r['img_per_s_wall']:>14.0f}{r['img_per_s_cpu']:>13.0f}"
        )
    meta = {
        "device": "cpu",
        "threads": args.threads,
        "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg(),
        "torch": torch.__version__,
        "kornia": kornia.__version__,
        "python": platform.python_version(),
        "note": "img/s counts source images; each yields `views` crops",
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
