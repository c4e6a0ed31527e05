"""
Real photographs for the small-scale experiments: random square crops of 23 photographs that Debian
ships in two wallpaper packages, resized to 64 px, written as OUT/train/*.png and OUT/val/*.png (use
`--data OUT`). Three of the photographs give the validation crops only, so no validation crop shares a
photograph with a training crop.

    apt-get download mate-backgrounds plasma-workspace-wallpapers
    for deb in mate-backgrounds_*.deb plasma-workspace-wallpapers_*.deb; do dpkg -x $deb debian-wallpapers; done
    python experiments/photos.py --source debian-wallpapers --out data/photos64

The photographs (paths inside the packages): the 12 files of mate-backgrounds' nature folder, and the
largest landscape image (by area) of 11 photographic wallpapers of plasma-workspace-wallpapers (the others there
are drawings and renders). Each photograph is first scaled to a short side of 512 px; every crop is a
square of 64 to 256 px of that image at a random place, resized to 64 px (bicubic), drawn from a
generator seeded by the photograph's index, so the same source gives the same crops.
"""

import argparse
import glob
import os
from concurrent.futures import ProcessPoolExecutor

import numpy as np
from PIL import Image

MATE_NATURE = ["Aqua", "Blinds", "Dune", "FreshFlower", "Garden", "GreenMeadow", "LadyBird", "RainDrops", "Storm",
               "TwoWings", "Wood", "YellowFlower"]
PLASMA_PHOTOS = ["BytheWater", "ColdRipple", "ColorfulCups", "DarkestHour", "EveningGlow", "FallenLeaf", "Grey", "Kite",
                 "OneStandsOut", "Path", "summer_1am"]
SHORT_SIDE = 512
CROP_SIDES = (64, 256)


def photographs(source: str) -> list:
    """The 23 source files under `source` (the packages extracted with dpkg -x), in a fixed order."""
    files = [os.path.join(source, "usr/share/backgrounds/mate/nature", name + ".jpg") for name in MATE_NATURE]
    for name in PLASMA_PHOTOS:
        candidates = glob.glob(os.path.join(source, "usr/share/wallpapers", name, "contents/images/*"))
        sizes = {path: Image.open(path).size for path in candidates}
        landscape = [path for path, (w, h) in sizes.items() if w >= h]
        if not landscape:
            raise SystemExit(f"no image of the wallpaper {name} under {source}: extract plasma-workspace-wallpapers there")
        files.append(max(landscape, key=lambda path: (sizes[path][0] * sizes[path][1], path)))   # the largest
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        raise SystemExit(f"missing under {source}: {missing[0]} (and {len(missing) - 1} more); extract "
                         f"mate-backgrounds and plasma-workspace-wallpapers there with dpkg -x")
    return files


def crops_of(task):
    """Write `count` crops of one photograph; -> the number written."""
    index, path, count, folder = task
    image = Image.open(path).convert("RGB")
    image.info.pop("icc_profile", None)     # raw RGB values, no colour profile copied into the crops
    scale = SHORT_SIDE / min(image.size)
    if scale < 1:
        image = image.resize((round(image.width * scale), round(image.height * scale)), Image.LANCZOS)
    rng = np.random.default_rng(index)
    for k in range(count):
        side = int(rng.integers(CROP_SIDES[0], min(CROP_SIDES[1], *image.size) + 1))
        left = int(rng.integers(0, image.width - side + 1))
        top = int(rng.integers(0, image.height - side + 1))
        crop = image.resize((64, 64), Image.BICUBIC, box=(left, top, left + side, top + side))
        crop.save(os.path.join(folder, f"p{index:02d}_{k:05d}.png"))
    return count


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().split("\n\n")[0])
    parser.add_argument("--source", required=True, help="where the two packages were extracted (dpkg -x)")
    parser.add_argument("--out", default="data/photos64", help="output folder (default: data/photos64)")
    parser.add_argument("--train-crops", type=int, default=1000, help="crops per training photograph (default 1000)")
    parser.add_argument("--val-crops", type=int, default=250, help="crops per validation photograph (default 250)")
    args = parser.parse_args(argv)
    files = photographs(args.source)
    tasks = []
    for index, path in enumerate(files):
        split = "val" if index % 6 == 5 else "train"        # photographs 5, 11 and 17: validation only
        folder = os.path.join(args.out, split)
        os.makedirs(folder, exist_ok=True)
        tasks.append((index, path, args.val_crops if split == "val" else args.train_crops, folder))
    with ProcessPoolExecutor() as pool:
        written = sum(pool.map(crops_of, tasks))
    print(f"wrote {written} crops of {len(files)} photographs to {args.out}/train and {args.out}/val")


if __name__ == "__main__":
    main()
