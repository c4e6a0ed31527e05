"""Frechet Inception Distance (FID) that reproduces pytorch-fid's numbers.

Compares two image sets, each given as a folder of images, a .npz of uint8
images, or a .npz of precomputed statistics (mu, sigma). With the same images
and the same weights file the result agrees with pytorch-fid's to ~1e-6
relative (CPU and CUDA).

Protocol (pytorch-fid with its default flags):
  1. Decode every image with PIL and convert it with .convert('RGB') to 8-bit
     RGB at its stored resolution (grayscale is replicated, alpha dropped,
     palettes expanded, 16-bit values clipped by PIL). No crop, no antialias.
  2. uint8 -> float32 / 255 -> F.interpolate(size=(299, 299), mode='bilinear',
     align_corners=False) -> 2x - 1.
  3. FID Inception: the TF 2015-12-05 Inception graph ported by pytorch-fid
     (torchvision Inception3, 1008 classes, average pools that ignore padding
     in the Mixed_5*/6*/7b pool branches, a max pool in Mixed_7c's pool branch),
     weights pt_inception-2015-12-05-6726825d.pth, fp32 without TF32.
  4. Features: the 2048-d final average pool (or --dims 64/192/768: the output
     of the first max pool / second max pool / Mixed_6e, averaged over space).
  5. mu = mean, sigma = np.cov(rowvar=False), both float64.
  6. FID = |mu1 - mu2|^2 + tr(s1) + tr(s2) - 2 tr(sqrtm(s1 @ s2)). If sqrtm is
     not finite, 1e-6 is added to both diagonals and it is retried; an
     imaginary part is dropped when its diagonal is within 1e-3 of zero.

Folders are searched recursively for .png/.jpg/.jpeg/.webp/.bmp (any case),
sorted by path (pytorch-fid reads only the top level, and also .tif/.ppm/.pgm).
Unreadable files are skipped with a warning; more than 1% of them is an error.
Images of different sizes may share a folder: each is resized on its own.

Usage:
  python fid.py samples/ real_images/
  python fid.py samples.npz ref_stats.npz             # sample.py --npz output
  python fid.py real_images/ --save-stats ref_stats.npz
  python fid.py samples/ ref_stats.npz --batch-size 250 --device cuda
  python fid.py samples/ ref_stats.npz --weights pt_inception-2015-12-05-6726825d.pth

As a library:
  import fid
  model = fid.build_inception()                       # or build_inception(weights='x.pth')
  mu, sigma, meta = fid.compute_statistics('samples/', model, batch_size=50, device='cuda')
  mu2, sigma2, meta2 = fid.load_stats('ref_stats.npz')
  print(fid.frechet_distance(mu, sigma, mu2, sigma2))
"""

import argparse
import contextlib
import difflib
import hashlib
import os
import sys
import warnings
from pathlib import Path

# Nothing of the project is imported: this file can be copied alone (like pytorch-fid's fid_score).

WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/"
    "fid_weights/pt_inception-2015-12-05-6726825d.pth"
)
WEIGHTS_NAME = WEIGHTS_URL.rsplit("/", 1)[1]
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
DIMS_CHOICES = (64, 192, 768, 2048)
INPUT_SIZE = 299
MAX_FAILED_FRACTION = 0.01  # more unreadable files than this and the statistics are suspect
RESIZE_RULE = (
    "full-res RGB uint8 /255 -> bilinear 299x299 (align_corners=False, no antialias) -> 2x-1"
)


def _warn(msg):
    print(f"warning: {msg}", file=sys.stderr)


class UserError(Exception):
    """A problem with the input that the user can fix: main() prints it in one line, returns 2."""


class _Parser(argparse.ArgumentParser):
    """No abbreviated flags; a bad command line is a UserError that suggests the nearest flag."""

    def __init__(self, **kwargs):
        super().__init__(allow_abbrev=False, **kwargs)

    def error(self, message):
        flags = [s for action in self._actions for s in action.option_strings]
        typed = message.split(":", 1)[1].split() if "unrecognized arguments" in message else []
        for word in typed:
            near = difflib.get_close_matches(word.split("=")[0], flags, n=1, cutoff=0.6)
            if near:
                raise UserError(f"unknown flag {word} (did you mean {near[0]}?); see --help")
        raise UserError(f"{message}; see --help")


def _parser():
    p = _Parser(
        description="FID between two image sets, matching pytorch-fid. Each PATH is a folder of\n"
                    "images (searched recursively), a .npz of uint8 NHWC images (key 'images'),\n"
                    "or a .npz of statistics (mu, sigma).",
        epilog="examples:\n"
               "  python fid.py samples/ real_images/\n"
               "  python fid.py real_images/ --save-stats ref_stats.npz\n"
               "  python fid.py samples.npz ref_stats.npz --batch-size 250",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("path", nargs="+", metavar="PATH", help="two inputs to compare, or one with --save-stats")
    p.add_argument("--save-stats", metavar="OUT.npz", help="save the statistics of the single PATH instead")
    p.add_argument("--overwrite", action="store_true", help="with --save-stats: replace an existing file")
    p.add_argument("--dims", type=int, choices=DIMS_CHOICES, default=None,
                   help="feature layer (default: 2048, or the dims of a given statistics file)")
    p.add_argument("--weights", metavar="PATH",
                   help=f"FID Inception weights (default: {WEIGHTS_NAME} in torch hub's checkpoints "
                        "folder, downloaded from pytorch-fid's release if missing)")
    p.add_argument("--batch-size", type=int, default=50, metavar="N",
                   help="images per forward pass (default 50, as pytorch-fid; larger is faster on GPU)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--num-workers", type=int, default=None, metavar="N",
                   help="image-decoding worker processes (default: min(8, CPU count))")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _fail(e):
    """A UserError as one line on stderr; returns the exit status 2, as argparse and the project's other scripts."""
    print("error: " + " ".join(str(e).split()), file=sys.stderr)
    return 2


if __name__ == "__main__":
    # Run as a script, the flags are checked before the imports below (torch, torchvision, scipy: ~3 s on
    # 2 CPU cores), so --help and a mistyped flag answer at once. main() parses them again.
    try:
        _parser().parse_args()
    except UserError as e:
        sys.exit(_fail(e))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402
from scipy import linalg  # noqa: E402
from torchvision.models.inception import (  # noqa: E402
    BasicConv2d,
    Inception3,
    InceptionA,
    InceptionAux,
    InceptionB,
    InceptionC,
    InceptionD,
    InceptionE,
)
from tqdm import tqdm  # noqa: E402


@contextlib.contextmanager
def exact_fp32():
    """Plain fp32 convolutions and matmuls inside the block (no TF32), restored afterwards.

    pytorch-fid's numbers are plain fp32; TF32 rounds conv inputs to 10 mantissa bits, which moves
    the features and the FID by more than the agreement with pytorch-fid promised above. bench.py
    also uses this block to compare sampling paths, whose TF32 rounding differs from path to path.
    """
    b = torch.backends
    if hasattr(b.cudnn, "conv") and hasattr(b.cudnn.conv, "fp32_precision"):
        # torch >= 2.9 warns or errors when the legacy allow_tf32 flags are mixed with these
        saved = b.cudnn.conv.fp32_precision, b.cuda.matmul.fp32_precision
        b.cudnn.conv.fp32_precision, b.cuda.matmul.fp32_precision = "ieee", "ieee"
        try:
            yield
        finally:
            b.cudnn.conv.fp32_precision, b.cuda.matmul.fp32_precision = saved
    else:
        saved = b.cudnn.allow_tf32, b.cuda.matmul.allow_tf32
        b.cudnn.allow_tf32, b.cuda.matmul.allow_tf32 = False, False
        try:
            yield
        finally:
            b.cudnn.allow_tf32, b.cuda.matmul.allow_tf32 = saved


# -----------------------------------------------------------------------------
# The FID Inception network

def _avg_pool_ignore_pad(x):
    # TF's average pool divides by the number of real pixels under the window,
    # torchvision's by 9 everywhere, so the two disagree along the borders
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


def _max_pool(x):
    return F.max_pool2d(x, kernel_size=3, stride=1, padding=1)


class FIDInceptionA(InceptionA):
    """InceptionA whose pool branch ignores the padding, as in the TF graph."""

    def _forward(self, x):
        return [
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(_avg_pool_ignore_pad(x)),
        ]


class FIDInceptionC(InceptionC):
    """InceptionC whose pool branch ignores the padding, as in the TF graph."""

    def _forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d7 = self.branch7x7dbl_1(x)
        for conv in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            d7 = conv(d7)
        return [self.branch1x1(x), b7, d7, self.branch_pool(_avg_pool_ignore_pad(x))]


class _FIDInceptionE(InceptionE):
    """InceptionE with the pool of its pool branch chosen by the subclass."""

    pool = None

    def _forward(self, x):
        b3 = self.branch3x3_1(x)
        d3 = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        return [
            self.branch1x1(x),
            torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1),
            torch.cat([self.branch3x3dbl_3a(d3), self.branch3x3dbl_3b(d3)], 1),
            self.branch_pool(self.pool(x)),
        ]


class FIDInceptionE1(_FIDInceptionE):
    pool = staticmethod(_avg_pool_ignore_pad)


class FIDInceptionE2(_FIDInceptionE):
    # the ported TF graph max-pools here, unlike the paper and torchvision;
    # pytorch-fid keeps that quirk, and published FID numbers depend on it
    pool = staticmethod(_max_pool)


def preprocess(x):
    """Float images in [0, 1], (N, 3, H, W) -> the network's (N, 3, 299, 299) input in [-1, 1]."""
    x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
    return 2 * x - 1


class FIDInception(Inception3):
    """pytorch-fid's FID Inception: same modules and state-dict keys, returns features.

    forward() takes float images in [0, 1] of any size and returns (N, dims)
    float32 features. Built with random weights; see load_weights/build_inception.
    """

    # the modules run in order; features are taken after _LAST_STAGE[dims]
    _STAGES = (
        "Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1",
        "Conv2d_3b_1x1", "Conv2d_4a_3x3", "maxpool2",
        "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e",
        "Mixed_7a", "Mixed_7b", "Mixed_7c", "avgpool",
    )
    _LAST_STAGE = {64: "maxpool1", 192: "maxpool2", 768: "Mixed_6e", 2048: "avgpool"}

    def __init__(self, dims=2048):
        if dims not in DIMS_CHOICES:
            raise UserError(f"dims must be one of {DIMS_CHOICES}, got {dims}")
        blocks = [BasicConv2d, FIDInceptionA, InceptionB, FIDInceptionC, InceptionD, FIDInceptionE1, InceptionAux]
        super().__init__(num_classes=1008, aux_logits=False, init_weights=False, inception_blocks=blocks)
        self.Mixed_7c = FIDInceptionE2(2048)
        self.dims = dims
        self.weights_name = None  # filled by load_weights, reported in the protocol line
        self.weights_sha256 = None
        self.requires_grad_(False)
        self.eval()

    def forward(self, x, dims=None):
        last = self._LAST_STAGE[dims or self.dims]
        x = preprocess(x)
        for name in self._STAGES:
            x = getattr(self, name)(x)
            if name == last:
                break
        if x.shape[2:] != (1, 1):
            x = F.adaptive_avg_pool2d(x, (1, 1))
        return x.flatten(1)


def default_weights_path():
    return Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_NAME


def resolve_weights(weights=None):
    """Path of the weights file: the given one, else the torch hub copy, downloading it if needed."""
    if weights is not None:
        path = Path(weights)
        if not path.is_file():
            raise UserError(f"weights file not found: {path}")
        return path
    path = default_weights_path()
    if path.is_file():
        return path
    tmp = path.with_name(f"{path.name}.{os.getpid()}.partial")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        print(f"downloading {WEIGHTS_URL} to {path}", file=sys.stderr)
        torch.hub.download_url_to_file(WEIGHTS_URL, str(tmp), progress=True)
        os.replace(tmp, path)  # never leave a half-written file under the final name
    except Exception as e:  # offline, proxy, disk full, ...: the advice is the same
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise UserError(
            f"FID Inception weights {WEIGHTS_NAME} are not in {path.parent} and could not be downloaded "
            f"({type(e).__name__}: {e}). Download {WEIGHTS_URL} and put it in {path.parent}/ "
            f"(or pass --weights PATH)"
        ) from None
    return path


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _some(keys, n=5):
    shown = ", ".join(keys[:n])
    return f"{len(keys)} key(s): {shown}{', ...' if len(keys) > n else ''}"


def load_weights(model, weights):
    """Load a state dict (or a file holding one) strictly, with readable errors."""
    name, sha = "state dict", None
    if isinstance(weights, (str, os.PathLike)):
        name = Path(weights).name
        try:
            state = torch.load(weights, map_location="cpu", weights_only=True)
        except Exception as e:
            raise UserError(f"cannot read weights file {weights}: {type(e).__name__}: {e}") from None
        sha = sha256_file(weights)
    else:
        state = weights
    if not isinstance(state, dict):
        raise UserError(f"weights {name}: expected a state dict, got {type(state).__name__}")

    expected = model.state_dict()
    # older checkpoints predate BatchNorm's num_batches_tracked counter, which eval mode never reads
    optional = {k for k in expected if k.endswith("num_batches_tracked")}
    missing = sorted(set(expected) - set(state) - optional)
    unexpected = sorted(set(state) - set(expected))
    bad_shape = sorted(
        f"{k} {tuple(getattr(state[k], 'shape', ()))} (expected {tuple(expected[k].shape)})"
        for k in set(state) & set(expected)
        if not isinstance(state[k], torch.Tensor) or state[k].shape != expected[k].shape
    )
    problems = []
    if missing:
        problems.append(f"missing {_some(missing)}")
    if unexpected:
        problems.append(f"unexpected {_some(unexpected)}")
    if bad_shape:
        problems.append(f"wrong shape for {_some(bad_shape)}")
    if problems:
        raise UserError(f"weights {name} do not fit the FID Inception: " + "; ".join(problems))

    state = dict(state)
    for k in optional:
        state.setdefault(k, expected[k])
    model.load_state_dict(state, strict=True)
    model.weights_name, model.weights_sha256 = name, sha
    return model


def build_inception(weights=None, dims=2048, device="cpu"):
    """The FID Inception with pytorch-fid's weights (file path or state dict), in eval mode."""
    if not isinstance(weights, dict):
        weights = resolve_weights(weights)  # before building, so a missing file fails fast
    model = FIDInception(dims)
    load_weights(model, weights)
    return model.to(device).eval()


# -----------------------------------------------------------------------------
# Image sources

def _as_rgb_nhwc(arr, label):
    """uint8 (N, H, W[, C]) -> (N, H, W, 3), mirroring PIL's convert('RGB')."""
    if arr.dtype != np.uint8:
        raise UserError(f"{label}: images must be uint8 in [0, 255], got {arr.dtype}")
    if arr.ndim == 3:
        arr = arr[..., None]
    if arr.ndim != 4 or arr.shape[-1] not in (1, 3, 4):
        hint = " (channels-first? expected N,H,W,C)" if arr.ndim == 4 and arr.shape[1] in (1, 3, 4) else ""
        raise UserError(f"{label}: expected images of shape (N, H, W, 3), got {arr.shape}{hint}")
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    return arr[..., :3]  # RGBA -> RGB drops alpha, as PIL does


def _load_npz_images(path):
    try:
        with np.load(path, allow_pickle=False) as f:
            keys = list(f.files)
            if "mu" in keys and "sigma" in keys:
                raise UserError(f"{path} holds statistics (mu, sigma), not images")
            if "images" in keys:
                arr = f["images"]
            elif len(keys) == 1:
                arr = f[keys[0]]
            else:
                raise UserError(f"{path}: no 'images' array among keys {keys}")
    except UserError:
        raise
    except Exception as e:  # not a zip, truncated, pickled objects, ...
        raise UserError(f"cannot read {path}: {type(e).__name__}: {e}") from None
    return _as_rgb_nhwc(arr, str(path))


def _list_images(folder):
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


class _ImageFiles(torch.utils.data.Dataset):
    def __init__(self, files):
        self.files = files

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        path = self.files[i]
        try:
            with Image.open(path) as im:
                arr = np.array(im.convert("RGB"))
        except Exception as e:  # corrupt, truncated or not an image: skipped and counted
            return None, f"{path}: {type(e).__name__}: {e}"
        # contiguous NCHW like ToTensor: the strides decide which conv kernels run
        return torch.from_numpy(arr).permute(2, 0, 1).contiguous(), None


def _collate(items):
    images = [img for img, _ in items if img is not None]
    failed = [err for img, err in items if img is None]
    if images and all(img.shape == images[0].shape for img in images):
        images = torch.stack(images)
    return images, failed  # a list when sizes differ; _to_input resizes those one by one


class ImageSource:
    """A folder, an images .npz, or a uint8 array, checked up front and read in batches."""

    def __init__(self, source):
        self.files, self.array = None, None
        if isinstance(source, np.ndarray):
            self.label, self.kind = "array", "array"
            self.array = _as_rgb_nhwc(source, "array")
        else:
            path = Path(source)
            self.label = str(path)
            if not path.exists():
                raise UserError(f"path not found: {path}")
            if path.is_dir():
                self.kind, self.files = "folder", _list_images(path)
                if not self.files:
                    raise UserError(f"{path}: no images found ({'/'.join(IMAGE_EXTENSIONS)}, searched recursively)")
            elif path.suffix.lower() == ".npz":
                self.kind, self.array = "npz", _load_npz_images(path)
            else:
                raise UserError(f"{path}: expected a folder of images or a .npz file")
        if len(self) < 2:
            raise UserError(f"{self.label}: {len(self)} image(s); FID needs at least 2 (the covariance is undefined)")

    def __len__(self):
        return len(self.files) if self.files is not None else len(self.array)

    def batches(self, batch_size, num_workers=0, pin_memory=False):
        """Yield (uint8 (B, 3, H, W) tensor or list of (3, H, W) tensors, [failure messages])."""
        if self.array is not None:
            # already decoded: worker processes would only add copying
            for i in range(0, len(self.array), batch_size):
                x = torch.from_numpy(self.array[i:i + batch_size]).permute(0, 3, 1, 2).contiguous()
                yield (x.pin_memory() if pin_memory else x), []
            return
        loader = torch.utils.data.DataLoader(
            _ImageFiles(self.files), batch_size=batch_size, shuffle=False, num_workers=num_workers,
            collate_fn=_collate, pin_memory=pin_memory,
        )
        yield from loader


def _to_input(images, device):
    if isinstance(images, torch.Tensor):
        return images.to(device, non_blocking=True).float().div_(255)
    # Mixed sizes: resize each image from its full resolution on its own. The
    # model then resizes 299 -> 299, which is an exact identity, so every
    # image gets the same numbers as in a uniform batch.
    return torch.cat([
        F.interpolate(img.to(device, non_blocking=True).float().div_(255)[None],
                      size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
        for img in images
    ])


def default_num_workers():
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on every OS
        cpus = os.cpu_count() or 1
    return min(8, cpus)


def compute_statistics(source, model, batch_size=50, device=None, num_workers=0, progress=True):
    """Inception statistics of a folder / images .npz / uint8 array.

    Returns (mu, sigma, meta): float64 mean and covariance of the features, and
    a dict with num_images, num_failed, resolutions [(H, W), ...], dims,
    weights_name and weights_sha256.
    """
    src = source if isinstance(source, ImageSource) else ImageSource(source)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model = model.to(device).eval()
    dims = model.dims

    feats = np.empty((len(src), dims), dtype=np.float64)
    n, failures, resolutions = 0, [], set()
    bar = tqdm(total=len(src), unit="img", desc=Path(src.label).name, file=sys.stderr,
               disable=not progress, mininterval=2.0, dynamic_ncols=True)
    with torch.inference_mode(), exact_fp32():
        for images, failed in src.batches(batch_size, num_workers, pin_memory=device.type == "cuda"):
            for msg in failed:
                if len(failures) < 20:
                    _warn(f"skipping unreadable image {msg}")
                elif len(failures) == 20:
                    _warn("more unreadable images; not listing them")
                failures.append(msg)
            if len(images):
                resolutions.update(tuple(img.shape[-2:]) for img in images)
                f = model(_to_input(images, device)).float().cpu().numpy()
                feats[n:n + len(f)] = f  # float32 features widened to float64, as pytorch-fid does
                n += len(f)
            bar.update(len(images) + len(failed))
    bar.close()

    if failures:
        _warn(f"{src.label}: skipped {len(failures)} of {len(src)} unreadable images")
        if len(failures) > MAX_FAILED_FRACTION * len(src):
            raise UserError(f"{src.label}: {len(failures)} of {len(src)} images are unreadable "
                           f"(more than {MAX_FAILED_FRACTION:.0%}); first: {failures[0]}")
    if n < 2:
        raise UserError(f"{src.label}: only {n} readable image(s); FID needs at least 2")
    feats = feats[:n]
    meta = dict(
        num_images=n, num_failed=len(failures), resolutions=sorted(resolutions), dims=dims,
        weights_name=model.weights_name or "", weights_sha256=model.weights_sha256 or "",
    )
    return np.mean(feats, axis=0), np.cov(feats, rowvar=False), meta


# -----------------------------------------------------------------------------
# Statistics files and the distance

def save_stats(path, mu, sigma, meta=None):
    """Write mu, sigma and the metadata to a .npz atomically (readable by pytorch-fid too)."""
    path = Path(path)
    arrays = {"mu": np.asarray(mu, dtype=np.float64), "sigma": np.asarray(sigma, dtype=np.float64)}
    for k, v in (meta or {}).items():
        arrays[k] = np.asarray(v, dtype=np.int64).reshape(-1, 2) if k == "resolutions" else np.asarray(v)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:  # a file object, so numpy doesn't append its own .npz
            np.savez(f, **arrays)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def load_stats(path):
    """(mu, sigma, meta) from a statistics .npz; pytorch-fid's files (no metadata) work too."""
    try:
        with np.load(path, allow_pickle=False) as f:
            if "mu" not in f.files or "sigma" not in f.files:
                raise UserError(f"{path}: not a statistics file (needs 'mu' and 'sigma', has {list(f.files)})")
            data = {k: f[k] for k in f.files}
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"cannot read {path}: {type(e).__name__}: {e}") from None
    mu, sigma = data.pop("mu").astype(np.float64), data.pop("sigma").astype(np.float64)
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
        raise UserError(f"{path}: mu {mu.shape} and sigma {sigma.shape} do not fit together")
    meta = {}
    for k, v in data.items():
        if k == "resolutions":
            meta[k] = [tuple(int(s) for s in r) for r in v.reshape(-1, 2)]
        else:
            meta[k] = v.item() if v.ndim == 0 else v.tolist()
    meta["dims"] = len(mu)
    return mu, sigma, meta


def _sqrtm(m):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # `disp` is deprecated from SciPy 1.16
        try:
            return linalg.sqrtm(m, disp=False)[0]
        except TypeError:  # SciPy releases that removed `disp`
            return linalg.sqrtm(m)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), computed as pytorch-fid does."""
    mu1, mu2 = (np.atleast_1d(np.asarray(m, dtype=np.float64)) for m in (mu1, mu2))
    sigma1, sigma2 = (np.atleast_2d(np.asarray(s, dtype=np.float64)) for s in (sigma1, sigma2))
    d1, d2 = len(mu1), len(mu2)
    if d1 != d2 or sigma1.shape != (d1, d1) or sigma2.shape != (d2, d2):
        raise UserError(f"statistics do not match: dims {d1} (sigma {sigma1.shape}) vs {d2} (sigma {sigma2.shape})")

    diff = mu1 - mu2
    covmean = _sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        _warn(f"sigma1 @ sigma2 is singular; adding {eps} to both diagonals (as pytorch-fid does)")
        offset = np.eye(d1) * eps
        covmean = _sqrtm((sigma1 + offset).dot(sigma2 + offset))
        if not np.isfinite(covmean).all():
            raise UserError("matrix square root is not finite even after regularisation")
    # round-off can leave a tiny imaginary part; a large one means the inputs are not covariances
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise UserError(f"sqrtm(sigma1 @ sigma2) has an imaginary component up to "
                           f"{np.abs(covmean.imag).max():.4g}; are these valid covariance matrices?")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


# -----------------------------------------------------------------------------
# Command line

def _is_stats_file(path):
    path = Path(path)
    if path.suffix.lower() != ".npz" or not path.is_file():
        return False
    try:
        with np.load(path, allow_pickle=False) as f:
            return "mu" in f.files and "sigma" in f.files
    except Exception as e:
        raise UserError(f"cannot read {path}: {type(e).__name__}: {e}") from None


def _describe(meta, kind):
    n = meta.get("num_images")
    res = meta.get("resolutions") or []
    sizes = ", ".join(f"{h}x{w}" for h, w in res[:3]) + (f" +{len(res) - 3} more sizes" if len(res) > 3 else "")
    return f"{n if n is not None else '?'} images ({kind}{', ' + sizes if sizes else ''})"


def _run(args):
    paths = args.path
    if args.save_stats is not None and len(paths) != 1:
        raise UserError(f"--save-stats takes exactly one input PATH, got {len(paths)}")
    if args.save_stats is None and len(paths) != 2:
        raise UserError(f"expected two inputs to compare, got {len(paths)}")
    if args.save_stats is not None and not args.save_stats.lower().endswith(".npz"):
        raise UserError(f"--save-stats file name must end in .npz: {args.save_stats}")
    if args.save_stats is not None and os.path.exists(args.save_stats) and not args.overwrite:
        raise UserError(f"{args.save_stats} exists; give --overwrite to replace it, or another file name")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be positive, got {args.batch_size}")

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {device} requested but CUDA is not available")
    num_workers = default_num_workers() if args.num_workers is None else args.num_workers

    # Open every input before the network is built, so bad paths fail in a second.
    sides = []
    for p in paths:
        if not Path(p).exists():
            raise UserError(f"path not found: {p}")
        if _is_stats_file(p):
            if args.save_stats is not None:
                raise UserError(f"{p} already holds statistics")
            sides.append(("stats file", load_stats(p)))
        else:
            sides.append(("images", ImageSource(p)))

    stats_dims = {p: s[2]["dims"] for p, (kind, s) in zip(paths, sides) if kind == "stats file"}
    if len(set(stats_dims.values())) > 1:
        raise UserError("the statistics files have different dims: "
                       + ", ".join(f"{p} has {d}" for p, d in stats_dims.items()))
    dims = args.dims or next(iter(stats_dims.values()), 2048)
    for p, d in stats_dims.items():
        if d != dims:
            raise UserError(f"dims mismatch: {p} has dims {d} but --dims is {dims}")

    model = None
    for i, (kind, src) in enumerate(sides):
        if kind == "images":
            if model is None:
                model = build_inception(args.weights, dims=dims, device=device)
            mu, sigma, meta = compute_statistics(src, model, args.batch_size, device, num_workers,
                                                 progress=not args.no_progress)
            sides[i] = (src.kind, (mu, sigma, meta))

    if args.save_stats is not None:
        mu, sigma, meta = sides[0][1]
        save_stats(args.save_stats, mu, sigma, meta)
        print(f"saved statistics of {_describe(meta, sides[0][0])}, dims={dims}, "
              f"weights sha256 {meta['weights_sha256'][:12]} to {args.save_stats}")
        return 0

    (kind_a, (mu1, s1, meta_a)), (kind_b, (mu2, s2, meta_b)) = sides
    sha_a, sha_b = meta_a.get("weights_sha256") or "", meta_b.get("weights_sha256") or ""
    if sha_a and sha_b and sha_a != sha_b:
        _warn(f"the two sides used different Inception weights (sha256 {sha_a[:12]} vs {sha_b[:12]}); "
              "this FID mixes two different feature spaces")
    value = frechet_distance(mu1, s1, mu2, s2)
    weights = (model.weights_name if model is not None else None) or meta_a.get("weights_name") \
        or meta_b.get("weights_name") or "unknown weights"
    sha = sha_a or sha_b
    print(f"FID: {value:.4f}")
    print(f"protocol: A={_describe(meta_a, kind_a)}; B={_describe(meta_b, kind_b)}; dims={dims}; "
          f"weights {weights} sha256 {sha[:12] if sha else '?'}; resize: {RESIZE_RULE}")
    return 0


def main(argv=None):
    try:
        return _run(_parser().parse_args(argv))
    except UserError as e:
        return _fail(e)


if __name__ == "__main__":
    sys.exit(main())
