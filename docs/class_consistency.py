"""
How well class-conditional samples show their class, against the guidance scale (docs/findings.md).

A small CNN learns the shapes data's labels (the kind of the first shape drawn: circle, square or triangle)
from the training images; it then classifies samples of a class-conditional Stackformer drawn at several
--cfg-scale values, classes cycled. Its accuracy on real validation images is the ceiling to compare with.

    python train_mqvae.py
    python train_stackformer.py --stage1 out/mqvae-shapes/ckpt.pt --cond class --out-dir out/stackformer-shapes-class
    python docs/class_consistency.py --ckpt out/stackformer-shapes-class/ckpt.pt
"""

import argparse
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data      # noqa: E402  (the project's modules, from the folder above)
import sample    # noqa: E402
from utils import load_stackformer   # noqa: E402


def classifier() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(64, 3))


def images_and_labels(dataset, count: int):
    items = [dataset[i] for i in range(count)]
    return torch.stack([it["image"] for it in items]), torch.tensor([it["label"] for it in items])


def main():
    parser = argparse.ArgumentParser(description=__doc__.strip().split("\n\n")[0])
    parser.add_argument("--ckpt", required=True, help="a class-conditional Stackformer trained on the shapes data")
    parser.add_argument("--scales", default="1,1.5,2,3,4")
    parser.add_argument("--n", type=int, default=300, help="samples per scale")
    parser.add_argument("--steps", type=int, default=1500, help="classifier training steps (batch 64)")
    args = parser.parse_args()
    torch.manual_seed(0)
    model, mqvae, _, ckpt = load_stackformer(args.ckpt)
    size = mqvae.config.resolution
    x_train, y_train = images_and_labels(data.ShapesDataset(size, 20000, "train"), 8000)
    x_val, y_val = images_and_labels(data.ShapesDataset(size, 500, "val"), 500)
    net = classifier()
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    for step in range(args.steps):
        batch = torch.randint(0, len(x_train), (64,))
        x = x_train[batch]
        x = torch.where(torch.rand(64, 1, 1, 1) < 0.5, x, x.flip(3))      # the samples come from flipped data too
        loss = F.cross_entropy(net(x), y_train[batch])
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    with torch.no_grad():
        real = (net(x_val).argmax(1) == y_val).float().mean().item()
    print(f"classifier: accuracy {real:.1%} on {len(x_val)} real validation images (the ceiling)")
    labels = torch.arange(args.n) % model.config.num_classes
    for scale in (float(s) for s in args.scales.split(",")):
        images = sample.sample_images(model, mqvae, args.n, cond=labels, batch_size=100, seed=0, cfg_scale=scale)
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
        with torch.no_grad():
            accuracy = (net(x).argmax(1) == labels).float().mean().item()
        print(f"cfg scale {scale:g}: {accuracy:.1%} of {args.n} samples classified as their class")


if __name__ == "__main__":
    main()
