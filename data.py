"""
Datasets shared by train_mqvae.py and train_stackformer.py.

    --data shapes      built-in: procedurally drawn coloured shapes (no download; the demo)
    --data ffhq        DATA_DIR/**/*.png; split from ffhqtrain.txt / ffhqvalidation.txt when present
    --data imagenet    DATA_DIR/train/<class>/*, DATA_DIR/val/<class>/*; label = index in sorted class names
    --data coco        DATA_DIR/{train2014,val2014}/ + DATA_DIR/annotations/captions_{train,val}2014.json
                       (2017 names work too)
    --data PATH        any folder of images, recursive (png/jpg/jpeg/webp/bmp); PATH/train and PATH/val
                       are used as splits when both exist, else every 100th file is held out

Every item is a dict: image (3,S,S) float in [-1,1], label (int, -1 when the dataset has none),
index, and bad (-1, or the index of a file that could not be read and was replaced by the next
readable one, so that batches keep their size; the training loop counts and names those files).
Random augmentations draw from a generator seeded by (seed, epoch, index), so a resumed run sees
exactly the crops an uninterrupted run would have seen.
"""

import hashlib
import json
import math
import os
import random
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import List, Optional

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image, ImageDraw, UnidentifiedImageError
from torch.utils.data import Dataset, DistributedSampler

from utils import UserError, atomic_path, write_json

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
DATASET_NAMES = ("shapes", "ffhq", "imagenet", "coco")


# -----------------------------------------------------------------------------
# Reading images robustly

def load_rgb(path: str) -> Image.Image:
    """Open any image as 8-bit RGB: grayscale, palette, CMYK and 16-bit files are converted,
    transparency is composited onto white. Raises on unreadable, truncated or oversized files
    (PIL's decompression-bomb limit stays in force)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as img:
            img.load()
            if img.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit grayscale: scale, don't clip
                arr = np.asarray(img, dtype=np.float64)
                scale = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
                img = Image.fromarray(np.clip(arr / scale * 255.0 + 0.5, 0, 255).astype(np.uint8))
            if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
                img = img.convert("RGBA")
                background = Image.new("RGBA", img.size, (255, 255, 255, 255))
                img = Image.alpha_composite(background, img)
            return img.convert("RGB")


def to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL RGB -> (3,H,W) float in [-1,1]."""
    arr = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy())
    return arr.permute(2, 0, 1).float().div(127.5).sub(1.0)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Images (B, 3, H, W) in [-1, 1] (not clamped) -> (B, H, W, 3) uint8, round((x + 1)·127.5): the
    one conversion used for samples and for FID reference images alike."""
    x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).contiguous()


def resize_short_side(img: Image.Image, size: int) -> Image.Image:
    w, h = img.size
    if min(w, h) == size:
        return img
    scale = size / min(w, h)
    return img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BILINEAR)


def center_crop(img: Image.Image, size: int) -> Image.Image:
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    return img.crop((left, top, left + size, top + size))


def transform_image(img: Image.Image, size: int, mode: str, gen: Optional[torch.Generator]) -> torch.Tensor:
    """mode: "eval" (resize + center crop), "crop" (ImageNet: resize short side, random crop, flip),
    "rrc" (FFHQ: RandomResizedCrop(scale 0.75-1, ratio 1) + flip, the RQ-VAE recipe)."""
    if mode == "rrc":
        w, h = img.size
        frac = 0.75 + 0.25 * torch.rand((), generator=gen).item()
        side = min(int(round(math.sqrt(frac * w * h))), w, h)
        left = int(torch.randint(0, w - side + 1, (), generator=gen))
        top = int(torch.randint(0, h - side + 1, (), generator=gen))
        img = img.resize((size, size), Image.BILINEAR, box=(left, top, left + side, top + side))
    else:
        img = resize_short_side(img, size)
        if mode == "crop":
            w, h = img.size
            left = int(torch.randint(0, w - size + 1, (), generator=gen))
            top = int(torch.randint(0, h - size + 1, (), generator=gen))
            img = img.crop((left, top, left + size, top + size))
        else:
            img = center_crop(img, size)
    if mode != "eval" and torch.rand((), generator=gen).item() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    return to_tensor(img)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    return (seed * 1_000_003 + epoch * 9_176_867 + index * 2_654_435_761) % (2 ** 63)


# -----------------------------------------------------------------------------
# Datasets

class ImageFiles(Dataset):
    """A list of image files with optional labels and captions.

    Paths and labels are kept as numpy arrays rather than Python lists: every DataLoader worker
    reads them, and reading a Python object touches its reference count, which copies the memory
    page into the worker. For ImageNet's 1.28M files that is hundreds of MB per worker."""

    def __init__(self, files: List[str], size: int, mode: str, labels: Optional[List[int]] = None,
                 captions: Optional[List[List[str]]] = None, classes: Optional[List[str]] = None):
        if len(files) == 0:
            raise UserError("no images found")
        self._paths = np.array([os.fsencode(f) for f in files])          # bytes, fixed width
        self.size, self.mode = size, mode
        self.labels = np.asarray(labels, dtype=np.int64) if labels is not None else None
        self.captions, self.classes = captions, classes

    @property
    def files(self) -> List[str]:
        return [os.fsdecode(p) for p in self._paths]

    def __len__(self):
        return len(self._paths)

    def path(self, index: int) -> str:
        return os.fsdecode(self._paths[index])

    def without(self, indices) -> "ImageFiles":
        """The same dataset less the items `indices` (files that cannot be read)."""
        keep = np.setdiff1d(np.arange(len(self)), np.asarray(sorted(indices), dtype=np.int64))
        return ImageFiles([self.path(i) for i in keep], self.size, self.mode,
                          labels=self.labels[keep] if self.labels is not None else None,
                          captions=[self.captions[i] for i in keep] if self.captions is not None else None,
                          classes=self.classes)

    def load(self, index: int, gen) -> torch.Tensor:
        return transform_image(load_rgb(self.path(index)), self.size, self.mode, gen)

    def __getitem__(self, key):
        index, seed = key if isinstance(key, tuple) else (key, index_seed(key))
        gen = torch.Generator().manual_seed(seed)
        bad = -1
        for attempt in range(16):  # a broken file is replaced by the next readable one
            i = (index + attempt) % len(self)
            try:
                image = self.load(i, gen)
                break
            except Exception:
                if bad < 0:
                    bad = i
        else:
            raise UserError(f"16 consecutive unreadable images starting at {self.path(index)}")
        label = int(self.labels[i]) if self.labels is not None else -1
        return dict(image=image, label=label, index=i, bad=bad)


class UnreadableFiles:
    """The files of a split that failed to load (an item whose `bad` is ≥ 0 carries the next readable image
    in its place). Each is named once on stderr; more than 1% of the `share` images this process reads is
    an error. Training counts them and goes on with the replacement; evaluation, token extraction and
    export drop such items (`keep`), so that no image is counted twice."""

    def __init__(self, dataset, share: int, what: str):
        self.dataset, self.share, self.what = dataset, share, what
        self.seen = set()

    def note(self, bad: torch.Tensor) -> torch.Tensor:
        """bad (B,) from a batch -> keep (B,) bool, the items that hold their own image."""
        for index in sorted(set(bad[bad >= 0].tolist()) - self.seen):
            self.seen.add(index)
            print(f"warning: skipped unreadable {self.what} image {self.dataset.path(index)} "
                  f"({len(self.seen)} so far)", file=sys.stderr)
            if too_many_unreadable(len(self.seen), self.share):
                raise UserError(f"{len(self.seen)} of {self.share} {self.what} images could not be read (more "
                                f"than 1%); check the dataset (the files are named above)")
        return bad < 0


def too_many_unreadable(bad: int, total: int) -> bool:
    """The rule for unreadable files: a few are named and skipped, more than 1% of the images (and more than
    one) stop the run, since the data is then more likely wrong than a file or two damaged."""
    return bad > max(1.0, 0.01 * total)


def index_seed(index: int) -> int:
    return sample_seed(0, 0, index)


SHAPE_NAMES = ("circle", "square", "triangle")
COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (240, 210, 40),
          "purple": (140, 50, 180), "orange": (245, 140, 30), "white": (245, 245, 245), "black": (20, 20, 20)}


class ShapesDataset(Dataset):
    """A few coloured shapes on a flat or smoothly shaded background, drawn from the index alone
    (any resolution, no files). The shapes are where the detail is; the background is nearly free
    to encode, so a good importance map lights up the shapes; each item also carries the shapes'
    per-pixel coverage, `objects`, to measure that. Labels: the kind of the first shape
    (0 circle, 1 square, 2 triangle), for class-conditional runs; captions such as "a red circle
    and a blue square on a gray background", for text-conditional runs."""

    classes = list(SHAPE_NAMES)

    def __init__(self, size: int, length: int, split: str = "train"):
        self.size, self.length = size, length
        self.offset = 0 if split == "train" else 10_000_000  # disjoint draws for validation

    def __len__(self):
        return self.length

    def path(self, index: int) -> str:
        return f"shapes:{index}"

    def describe(self, index: int):
        rng = random.Random(self.offset + index)
        color_names = list(COLORS)
        background = rng.choice(["flat", "shaded"])
        bg_a = tuple(rng.randint(60, 200) for _ in range(3))
        bg_b = tuple(min(255, max(0, c + rng.randint(-60, 60))) for c in bg_a)
        shapes = []
        for _ in range(rng.randint(1, 3)):
            kind = rng.randrange(3)
            color = rng.choice(color_names)
            radius = rng.uniform(0.12, 0.25)
            cx, cy = rng.uniform(radius, 1 - radius), rng.uniform(radius, 1 - radius)
            angle = rng.uniform(0, 2 * math.pi)
            shapes.append((kind, color, cx, cy, radius, angle))
        return background, bg_a, bg_b, shapes

    def render(self, index: int, objects_only: bool = False) -> Image.Image:
        """The RGB image; objects_only: the shapes' coverage instead, an "L" image (255 = shape)."""
        background, bg_a, bg_b, shapes = self.describe(index)
        S = self.size * 2  # draw at 2x and downsample: anti-aliased edges
        if objects_only:
            img = Image.new("L", (S, S), 0)
        elif background == "flat":
            img = Image.new("RGB", (S, S), bg_a)
        else:
            t = np.linspace(0.0, 1.0, S)[None, :, None]
            arr = np.array(bg_a)[None, None] * (1 - t) + np.array(bg_b)[None, None] * t
            img = Image.fromarray(np.repeat(arr, S, axis=0).astype(np.uint8))
        draw = ImageDraw.Draw(img)
        for kind, color, cx, cy, r, angle in shapes:
            cx, cy, r = cx * S, cy * S, r * S
            fill = 255 if objects_only else COLORS[color]
            if kind == 0:
                draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
            else:
                corners = 4 if kind == 1 else 3
                pts = [(cx + r * math.cos(angle + 2 * math.pi * i / corners),
                        cy + r * math.sin(angle + 2 * math.pi * i / corners)) for i in range(corners)]
                draw.polygon(pts, fill=fill)
        return img.resize((self.size, self.size), Image.BILINEAR)

    def label(self, index: int) -> int:
        return self.describe(index)[3][0][0]

    def caption(self, index: int) -> str:
        _, bg_a, _, shapes = self.describe(index)
        parts = [f"{'an' if color[0] in 'aeiou' else 'a'} {color} {SHAPE_NAMES[kind]}" for kind, color, *_ in shapes]
        shade = "dark" if sum(bg_a) < 390 else "light"
        return " and ".join(parts) + f" on a {shade} background"

    def __getitem__(self, key):
        index = key[0] if isinstance(key, tuple) else key
        # objects: the fraction of each pixel the shapes cover (1,H,W) in [0,1], which the mask
        # measurements of train_mqvae.evaluate compare the importance map with
        objects = torch.from_numpy(np.asarray(self.render(index, objects_only=True), dtype=np.float32) / 255.0)[None]
        return dict(image=to_tensor(self.render(index)), objects=objects, label=self.label(index), index=index, bad=-1)


def list_images(root: str) -> List[str]:
    files = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames.sort()
        files += [os.path.join(dirpath, f) for f in sorted(filenames) if f.lower().endswith(IMAGE_EXTENSIONS)]
    return files


def _require_dir(path: str, what: str, layout: str = ""):
    if not os.path.isdir(path):
        raise UserError(f"{what} not found: {path}" + (f"; {layout}" if layout else ""))


FFHQ_LAYOUT = ("expected --data-dir DIR (default data/ffhq) holding the images as DIR/**/*.png at any depth "
               "(e.g. DIR/00000/00000.png ... DIR/69000/69999.png), optionally with DIR/ffhqtrain.txt and "
               "DIR/ffhqvalidation.txt listing the split's files relative to DIR (without them the last 1/7 by "
               "path is the validation split)")


def _ffhq(root, size, split):
    _require_dir(root, "FFHQ folder (--data-dir)", FFHQ_LAYOUT)
    list_file = os.path.join(root, "ffhqtrain.txt" if split == "train" else "ffhqvalidation.txt")
    if os.path.isfile(list_file):
        with open(list_file) as fh:
            files = [os.path.join(root, line.strip()) for line in fh if line.strip()]
    else:
        # Documented fallback: files sorted by path, the last 1/7 held out (for the 70,000 FFHQ
        # images named 00000..69999 this is 60000..69999 as validation).
        files = list_images(root)
        if not files:
            raise UserError(f"no images (png/jpg/jpeg/webp/bmp) under {root}; {FFHQ_LAYOUT}")
        cut = len(files) - max(1, len(files) // 7)
        files = files[:cut] if split == "train" else files[cut:]
    return ImageFiles(files, size, "rrc" if split == "train" else "eval")


def _imagenet(root, size, split):
    _require_dir(os.path.join(root, "train"), "ImageNet train folder (--data-dir DIR with DIR/train/<class>/...)")
    classes = sorted(d for d in os.listdir(os.path.join(root, "train")) if os.path.isdir(os.path.join(root, "train", d)))
    if not classes:
        raise UserError(f"{root}/train has no class subfolders; class-conditional data needs DIR/train/<class>/*.JPEG")
    split_dir = os.path.join(root, "train" if split == "train" else "val")
    _require_dir(split_dir, "ImageNet split folder")
    files, labels = [], []
    for label, name in enumerate(classes):
        class_files = list_images(os.path.join(split_dir, name)) if os.path.isdir(os.path.join(split_dir, name)) else []
        files += class_files
        labels += [label] * len(class_files)
    if not files:
        raise UserError(f"no images in {split_dir}/<class>/ (val images must be sorted into class folders too)")
    return ImageFiles(files, size, "crop" if split == "train" else "eval", labels=labels, classes=classes)


def _coco(root, size, split):
    _require_dir(root, "COCO folder (--data-dir)")
    for year in ("2014", "2017"):
        name = ("train" if split == "train" else "val") + year
        ann = os.path.join(root, "annotations", f"captions_{name}.json")
        if os.path.isfile(ann) and os.path.isdir(os.path.join(root, name)):
            break
    else:
        raise UserError(f"COCO needs {root}/train2014/ and {root}/annotations/captions_train2014.json "
                        f"(or the 2017 names, and the val split likewise)")
    with open(ann) as fh:
        meta = json.load(fh)
    captions = {}
    for a in meta["annotations"]:
        captions.setdefault(a["image_id"], []).append(a["caption"].strip())
    images = sorted((im for im in meta["images"] if im["id"] in captions), key=lambda im: im["id"])
    files = [os.path.join(root, name, im["file_name"]) for im in images]
    return ImageFiles(files, size, "crop" if split == "train" else "eval",
                      captions=[captions[im["id"]] for im in images])


def _is_class_layout(train_dir: str) -> bool:
    """torchvision's ImageFolder layout: the images sit in two or more class subfolders, none loose beside them."""
    entries = os.listdir(train_dir)
    loose = [e for e in entries if e.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(train_dir, e))]
    return not loose and sum(os.path.isdir(os.path.join(train_dir, e)) for e in entries) >= 2


def _folder(root, size, split):
    _require_dir(root, "image folder")
    if os.path.isdir(os.path.join(root, "train")) and os.path.isdir(os.path.join(root, "val")):
        if _is_class_layout(os.path.join(root, "train")):    # PATH/train/<class>/, PATH/val/<class>/: labelled
            return _imagenet(root, size, split)
        files = list_images(os.path.join(root, split if split == "train" else "val"))
    else:
        files = list_images(root)
        if len(files) >= 2:  # hold out every 100th file (at least one) for validation
            held = set(range(len(files) - 1, -1, -100))
            files = [f for i, f in enumerate(files) if (i in held) == (split != "train")]
    if not files:
        raise UserError(f"no images (png/jpg/jpeg/webp/bmp) under {root}")
    return ImageFiles(files, size, "crop" if split == "train" else "eval")


def build_dataset(name: str, data_dir: Optional[str], size: int, split: str, shapes_length: int = 20000):
    """name: shapes | ffhq | imagenet | coco | a folder path. split: train | val."""
    if name == "shapes":
        return ShapesDataset(size, shapes_length if split == "train" else max(64, shapes_length // 40), split)
    if name in ("ffhq", "imagenet", "coco"):
        root = data_dir or os.path.join("data", name)
        return {"ffhq": _ffhq, "imagenet": _imagenet, "coco": _coco}[name](root, size, split)
    if os.path.isdir(name):
        return _folder(name, size, split)
    raise UserError(f"unknown dataset {name!r}: use shapes, ffhq, imagenet, coco, or the path of an image folder")


def first_images(dataset, count: Optional[int]):
    """The dataset cut to its first `count` images (the whole of it when count is None or larger): the
    trainers' --train-images, for quick runs and the small-scale experiments."""
    if count is None or count >= len(dataset):
        return dataset
    if isinstance(dataset, ShapesDataset):
        dataset.length = count
        return dataset
    return dataset.without(range(count, len(dataset)))


# -----------------------------------------------------------------------------
# Every file checked before the first step: headers only, in parallel, the result kept in the output folder

def header_problem(path: str) -> Optional[str]:
    """What makes an image file unreadable, judged from its header alone (PIL reads the format, size and mode,
    not the pixels), or None. A file cut off after its header passes; the loader names it when it fails."""
    try:
        if os.path.getsize(path) == 0:
            return "empty file"
        with Image.open(path) as img:
            pixels = img.size[0] * img.size[1]
    except FileNotFoundError:
        return "missing"
    except Image.DecompressionBombError:
        return "larger than PIL's decompression-bomb limit"
    except UnidentifiedImageError:
        return "not an image format PIL knows"
    except Exception as e:
        return f"unreadable header ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    if Image.MAX_IMAGE_PIXELS and pixels > Image.MAX_IMAGE_PIXELS:   # load_rgb refuses these
        return "larger than PIL's decompression-bomb limit"
    return "no pixels" if pixels == 0 else None


CHECK_THREADS = 16      # threads for the file check: opening files waits on the disk (or the network), not the CPU
CHECK_NAMED = 20        # unreadable files named in the message at most; the check's JSON file lists them all


def _in_threads(fn, paths: List[str]) -> list:
    """[fn(path) for path in paths], on CHECK_THREADS threads, in blocks so that 70,000 files are not 70,000 tasks."""
    blocks = [paths[i:i + 256] for i in range(0, len(paths), 256)]
    with ThreadPoolExecutor(CHECK_THREADS) as pool:
        return [result for block in pool.map(lambda b: [fn(p) for p in b], blocks) for result in block]


def _file_stamp(path: str) -> str:
    try:
        st = os.stat(path)
        return f"{st.st_size} {st.st_mtime_ns}"
    except OSError:
        return "missing"


def check_image_files(splits: dict, out_dir: str) -> dict:
    """{split: dataset} -> the same datasets less their unreadable files, found before the first step: the
    header of every file is read (in threads) and all bad files are named in one message; more than 1% of
    the files is a UserError. The result is kept in out_dir under a key of the file names, sizes and
    modification times, so a resumed run does not check again and a changed folder is checked anew. Rank 0
    checks, the other ranks take its result. Datasets without files (shapes) pass as they are."""
    lists = {split: ds.files for split, ds in splits.items() if isinstance(ds, ImageFiles)}
    if not lists:
        return splits
    distributed = dist.is_available() and dist.is_initialized()
    rank0 = not distributed or dist.get_rank() == 0
    files = [f for split_files in lists.values() for f in split_files]
    path = os.path.join(out_dir, f"checked_{'_'.join(lists)}.json")
    found = [None]
    if rank0:
        start = time.time()
        stamps = "\n".join(f"{f} {stamp}" for f, stamp in zip(files, _in_threads(_file_stamp, files)))
        key = hashlib.sha256(f"{list(map(len, lists.values()))}\n{stamps}".encode()).hexdigest()
        try:
            with open(path) as fh:
                saved = json.load(fh)
        except (OSError, ValueError):
            saved = {}
        if saved.get("key") == key:
            found[0], how = saved["unreadable"], f"as checked before: {path}"
        else:
            with warnings.catch_warnings():     # PIL warns below the limit that header_problem applies itself
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                problems = _in_threads(header_problem, files)
            found[0] = {f: problem for f, problem in zip(files, problems) if problem is not None}
            write_json(path, dict(key=key, files=len(files), unreadable=found[0]))
            how = f"headers read in {time.time() - start:.1f} s on {CHECK_THREADS} threads"
        counts = " + ".join(f"{len(split_files)} {split}" for split, split_files in lists.items())
        print(f"image files: {counts}, {len(found[0])} unreadable ({how})", flush=True)
    if distributed:
        dist.broadcast_object_list(found, src=0)
    bad = found[0]
    if not bad:
        return splits
    named = ", ".join(f"{f} ({problem})" for f, problem in list(bad.items())[:CHECK_NAMED])
    if len(bad) > CHECK_NAMED:
        named += f" and {len(bad) - CHECK_NAMED} more (all in {path})"
    if too_many_unreadable(len(bad), len(files)):
        raise UserError(f"{len(bad)} of {len(files)} image files could not be read (more than 1%): {named}; "
                        f"fix or remove them")
    checked = dict(splits)
    for split, split_files in lists.items():
        dropped = [i for i, f in enumerate(split_files) if f in bad]
        if len(dropped) == len(split_files):
            raise UserError(f"none of the {len(split_files)} {split} images can be read: {named}")
        checked[split] = splits[split].without(dropped)
    if rank0:
        print(f"warning: {len(bad)} of {len(files)} image files could not be read and are left out: {named}",
              file=sys.stderr, flush=True)
    return checked


# -----------------------------------------------------------------------------
# Sampling: DDP shards, exact resume, deterministic augmentation

class ResumableSampler(DistributedSampler):
    """DistributedSampler (shuffled by seed + epoch, sharded by rank, drop_last) that can skip the
    first `skip` samples of an epoch, for resuming mid-epoch, and yields (index, augmentation seed)."""

    def __init__(self, dataset, num_replicas=1, rank=0, seed=0, shuffle=True):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=True)
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0):
        super().set_epoch(epoch)
        self.skip = skip

    def __iter__(self):
        indices = list(super().__iter__())[self.skip:]
        return iter([(i, sample_seed(self.seed, self.epoch, i)) for i in indices])

    def __len__(self):
        return super().__len__() - self.skip


# -----------------------------------------------------------------------------
# Export a split as uint8 images: the reference set for fid.py, at the resolution the models see

def export_images(name: str, data_dir: Optional[str], size: int, split: str, count: Optional[int], npz_path: str):
    """Write the first `count` readable images of a split (resize + center crop) as a uint8 (n, S, S, 3) .npz.
    Unreadable files are skipped and named (UnreadableFiles). -> (shape, number skipped)."""
    dataset = build_dataset(name, data_dir, size, split)
    if isinstance(dataset, ImageFiles):
        dataset.mode = "eval"
    n = len(dataset) if count is None else min(count, len(dataset))
    unreadable = UnreadableFiles(dataset, n, split)
    images = [to_uint8(item["image"][None]).numpy() for item in (dataset[i] for i in range(n))
              if unreadable.note(torch.tensor([item["bad"]]))[0]]
    images = np.concatenate(images)
    with atomic_path(npz_path) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, images=images)
    return images.shape, len(unreadable.seen)


def main(argv=None):
    from utils import FlagParser
    parser = FlagParser(description="Export a dataset split as a uint8 .npz (a reference set for fid.py).",
                        epilog="example: python data.py shapes --size 32 --split val --n 1000 --npz out/shapes-val.npz")
    parser.add_argument("data", help="shapes | ffhq | imagenet | coco | PATH")
    parser.add_argument("--data-dir", default=None, help="root of ffhq/imagenet/coco (default: data/<name>)")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels, as the models see them (default: 256)")
    parser.add_argument("--split", default="val", choices=("train", "val"), help="which split (default: val)")
    parser.add_argument("--n", type=int, default=None, help="number of images (default: the whole split)")
    parser.add_argument("--npz", required=True, help="the .npz to write: uint8 (n, size, size, 3) 'images'")
    args = parser.parse_args(argv)
    if args.size <= 0 or (args.n is not None and args.n <= 0):
        raise UserError("--size and --n must be positive")
    shape, skipped = export_images(args.data, args.data_dir, args.size, args.split, args.n, args.npz)
    print(f"wrote {args.npz}: {shape[0]} images of {shape[1]}x{shape[2]}"
          + (f"; {skipped} unreadable files skipped (named above)" if skipped else ""))


if __name__ == "__main__":
    from utils import run_main
    run_main(main)
