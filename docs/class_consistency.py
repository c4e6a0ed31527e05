"""
Do class-conditional samples show their class? Against the guidance scale (docs/findings.md).

The shapes data's label is the kind of the first shape drawn (circle, square or triangle); up to two more
shapes of any kind follow, often on top of it. So the image alone cannot tell the label, but it shows whether
a shape of that kind is present: every real image of class c holds a c-shape. A small CNN learns which kinds
each image holds (three yes/no outputs) from training images; it then judges samples of a class-conditional
Stackformer drawn at several --cfg-scale values, classes cycled: the share of samples that hold a shape of
their own class. Two references from real validation images: the share of images of class c the CNN finds a
c-shape in (the ceiling), and the share it finds a shape of a class drawn at random in (what samples that
ignore their class would score).

    python train_mqvae.py
    python train_stackformer.py --stage1 out/mqvae-shapes/ckpt.pt --cond class --out-dir out/stackformer-shapes-class
    python docs/class_consistency.py --ckpt out/stackformer-shapes-class/ckpt.pt

Writes the figures to --json and the first samples of every scale to --grid (a row per scale).
"""

import argparse
import json
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data      # noqa: E402  (the project's modules, from the folder above)
import sample    # noqa: E402
from stackformer import SamplingConfig   # noqa: E402
from utils import load_stackformer   # noqa: E402


def classifier() -> nn.Module:
    """Three logits: does the image hold a circle, a square, a triangle."""
    return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(), nn.AdaptiveMaxPool2d(1), nn.Flatten(),
                         nn.Linear(128, 3))


def shapes_images(size: int, count: int, split: str):
    """count images of the split as (count, 3, H, W) in [-1, 1], their labels (count,) and which kinds each
    holds (count, 3) as 0/1."""
    dataset = data.ShapesDataset(size, count, split)
    images = torch.stack([dataset[i]["image"] for i in range(count)])
    labels = torch.tensor([dataset.label(i) for i in range(count)])
    holds = torch.zeros(count, 3)
    for i in range(count):
        for kind, *_ in dataset.describe(i)[3]:
            holds[i, kind] = 1.0
    return images, labels, holds


def train_classifier(x, holds, steps: int, device) -> nn.Module:
    net = classifier().to(device)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    for _ in range(steps):
        batch = torch.randint(0, len(x), (64,))
        xb = x[batch].to(device)
        xb = torch.where(torch.rand(64, 1, 1, 1, device=device) < 0.5, xb, xb.flip(3))   # samples come from flipped data too
        loss = F.binary_cross_entropy_with_logits(net(xb), holds[batch].to(device))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()


@torch.no_grad()
def finds(net, x, device, batch: int = 500) -> torch.Tensor:
    """(n, 3) booleans: the kinds the CNN finds in each image."""
    return torch.cat([net(x[i:i + batch].to(device)).cpu() > 0 for i in range(0, len(x), batch)])


def as_input(images) -> torch.Tensor:
    """uint8 (n, H, W, 3) images -> (n, 3, H, W) in [-1, 1], as the data loaders give them."""
    return torch.stack([data.to_tensor(image) for image in images])


def guidance_parser(doc: str, what: str, n_help: str, json_name: str) -> argparse.ArgumentParser:
    """The flags this script and caption_consistency.py share; what: the kind of checkpoint."""
    parser = argparse.ArgumentParser(description=doc.strip().split("\n\n")[0])
    parser.add_argument("--ckpt", required=True, help=f"a {what} Stackformer trained on the shapes data")
    parser.add_argument("--scales", default="1,1.5,2,3,4", help="guidance scales, comma-separated")
    parser.add_argument("--batch-size", type=int, default=100, help="samples per generate() call")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--n", type=int, default=300, help=n_help)
    parser.add_argument("--json", default=json_name)
    return parser


def samples_per_scale(args, model, mqvae, cond):
    """(scale, uint8 (n, H, W, 3) samples, one per condition row, seed 0) for every --scales value."""
    for scale in (float(s) for s in args.scales.split(",")):
        yield scale, sample.sample_images(model, mqvae, len(cond), cond=cond, batch_size=args.batch_size, seed=0,
                                          settings=SamplingConfig(cfg_scale=scale))


def main():
    parser = guidance_parser(__doc__, "class-conditional", "samples per scale", "class_consistency.json")
    parser.add_argument("--steps", type=int, default=3000, help="classifier training steps (batch 64)")
    parser.add_argument("--train-images", type=int, default=12000, help="classifier training images")
    parser.add_argument("--val-images", type=int, default=1000, help="real images for the two references")
    parser.add_argument("--grid", default="class_consistency.png")
    args = parser.parse_args()
    torch.manual_seed(0)
    device = torch.device(args.device)
    model, mqvae, _, _ = load_stackformer(args.ckpt, device)
    size = mqvae.config.resolution
    x_train, _, holds_train = shapes_images(size, args.train_images, "train")
    x_val, y_val, holds_val = shapes_images(size, args.val_images, "val")
    net = train_classifier(x_train, holds_train, args.steps, device)
    found = finds(net, x_val, device)
    rows = torch.arange(len(y_val))
    result = dict(
        classifier_agreement=(found == holds_val.bool()).float().mean().item(),   # over all (image, kind) pairs
        ceiling=found[rows, y_val].float().mean().item(),
        ignoring_class=found.float().mean().item(),    # a class drawn at random, independent of the image
        n=args.n, scales={})
    print(f"classifier: right on {result['classifier_agreement']:.1%} of (image, kind) pairs of {len(x_val)} real "
          f"validation images; finds the image's own class in {result['ceiling']:.1%} (the ceiling), a random "
          f"class in {result['ignoring_class']:.1%} (samples that ignore their class)")
    labels = torch.arange(args.n) % model.config.num_classes
    firsts = []
    for scale, images in samples_per_scale(args, model, mqvae, labels):
        x = as_input(images)
        found = finds(net, x, device)
        shows = found[torch.arange(args.n), labels].float().mean().item()
        kinds = found.float().sum(1).mean().item()
        result["scales"][f"{scale:g}"] = dict(shows_class=shows, kinds_per_sample=kinds)
        print(f"cfg scale {scale:g}: {shows:.1%} of {args.n} samples hold a shape of their class "
              f"({kinds:.2f} kinds found per sample)", flush=True)
        firsts.append(x[:12])
    with open(args.json, "w") as fh:
        json.dump(result, fh, indent=2)
    from torchvision.utils import save_image
    save_image(torch.cat(firsts) * 0.5 + 0.5, args.grid, nrow=12, padding=1)
    print(f"wrote {args.json} and {args.grid} (a row per scale; columns cycle circle, square, triangle)")


if __name__ == "__main__":
    main()
