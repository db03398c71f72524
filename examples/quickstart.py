"""Quickstart: explain a randomly initialised ResNet18 on a batch of images with all four methods.

Run with ``python examples/quickstart.py``. No downloads: the weights are random and the images synthetic.
"""

from __future__ import annotations

import argparse
import time

import torch
import torchvision

from tsm_lightning import METHODS, explain


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=224)
    args = parser.parse_args()

    torch.manual_seed(0)
    model = torchvision.models.resnet18()
    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
    start = time.perf_counter()
    maps = explain(model, images, layer="layer4", methods=METHODS)
    elapsed = time.perf_counter() - start
    print(f"Explained {args.batch_size} images of {args.image_size}px with ResNet18 'layer4' in {elapsed:.2f} s:")
    for name, m in maps.items():
        print(f"  {name:<18} maps {tuple(m.shape)}  range [{m.min():.2f}, {m.max():.2f}]  mean {m.mean():.3f}")


if __name__ == "__main__":
    main()
