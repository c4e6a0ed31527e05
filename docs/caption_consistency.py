"""
Do text-conditional samples show the colours their captions name? Against the guidance scale (docs/findings.md).

Each shapes caption names the colour and kind of every shape, "a red circle and a blue square on a light
background". This script samples one image per validation caption with a text-conditional Stackformer at
several --cfg-scale values and counts the named colours the image shows: a colour counts as shown when at
least --min-share of the pixels lie within --tolerance (per channel, of 255) of it. Two references from the
real validation images: the share of the named colours the image itself shows (the ceiling; also through the
MQ-VAE, encoded and decoded, the ceiling for stage 2), and the share of the colours of the next image's caption
it shows (what samples that ignore their caption would score).

    python train_mqvae.py
    python train_stackformer.py --stage1 out/mqvae-shapes/ckpt.pt --cond text --out-dir out/stackformer-shapes-text
    python docs/caption_consistency.py --ckpt out/stackformer-shapes-text/ckpt.pt
"""

import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data      # noqa: E402  (the project's modules, from the folder above)
from class_consistency import as_input, guidance_parser, samples_per_scale   # noqa: E402  (beside this file)
from utils import load_stackformer   # noqa: E402


def shown_colours(image: np.ndarray, names, tolerance: int, min_share: float) -> list:
    """For each colour name, whether the (H, W, 3) uint8 image shows it."""
    pixels = image.reshape(-1, 3).astype(np.int16)
    return [(np.abs(pixels - np.array(data.COLORS[name])).max(1) <= tolerance).mean() >= min_share for name in names]


def share_shown(images, colour_lists, tolerance: int, min_share: float) -> float:
    hits = [h for image, names in zip(images, colour_lists) for h in shown_colours(image, names, tolerance, min_share)]
    return float(np.mean(hits))


@torch.no_grad()
def reconstructed(mqvae, images: list, device) -> list:
    """The images encoded and decoded by the MQ-VAE, as uint8 (H, W, 3) arrays."""
    x = as_input(images).to(device)
    out = []
    for i in range(0, len(x), 100):
        codes, positions, _ = mqvae.encode(x[i:i + 100])
        out += list(data.to_uint8(mqvae.decode(codes, positions)).cpu().numpy())
    return out


def main():
    parser = guidance_parser(__doc__, "text-conditional", "validation captions, one sample each per scale",
                             "caption_consistency.json")
    parser.add_argument("--tolerance", type=int, default=48, help="per-channel distance to the colour, of 255")
    parser.add_argument("--min-share", type=float, default=0.02, help="share of the pixels a shown colour covers")
    args = parser.parse_args()
    model, mqvae, tokenizer, _ = load_stackformer(args.ckpt, torch.device(args.device))
    if tokenizer is None:
        sys.exit(f"{args.ckpt} is not text-conditional: train stage 2 with --cond text")
    dataset = data.ShapesDataset(mqvae.config.resolution, args.n, "val")
    captions = [dataset.caption(i) for i in range(args.n)]
    colours = [[colour for _, colour, *_ in dataset.describe(i)[3]] for i in range(args.n)]
    real = [np.array(dataset.render(i)) for i in range(args.n)]
    judge = dict(tolerance=args.tolerance, min_share=args.min_share)
    result = dict(ceiling=share_shown(real, colours, **judge),
                  ceiling_through_mqvae=share_shown(reconstructed(mqvae, real, args.device), colours, **judge),
                  ignoring_caption=share_shown(real, colours[1:] + colours[:1], **judge), n=args.n, scales={})
    print(f"real validation images show {result['ceiling']:.1%} of the colours their captions name (the ceiling; "
          f"{result['ceiling_through_mqvae']:.1%} through the MQ-VAE), {result['ignoring_caption']:.1%} of those the "
          f"next caption names (samples that ignore their caption)")
    tokens = tokenizer.encode_batch(captions)
    for scale, images in samples_per_scale(args, model, mqvae, tokens):
        shown = share_shown(images, colours, **judge)
        result["scales"][f"{scale:g}"] = shown
        print(f"cfg scale {scale:g}: the samples show {shown:.1%} of the colours their captions name", flush=True)
    with open(args.json, "w") as fh:
        json.dump(result, fh, indent=2)


if __name__ == "__main__":
    main()
