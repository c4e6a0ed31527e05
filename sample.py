"""
Sample images from a trained Stackformer (stage 2) and decode them with the MQ-VAE it embeds.

Every image is N (code, position) pairs drawn autoregressively by Stackformer.generate(): at each
step the Code-Transformer picks the next code v_{t+1}, then the Position-Transformer picks where
it goes, p_{t+1}. The MQ-VAE's adaptive de-mask then fills the T − N latent positions that got no
code (with its learned mask token and the μ-scaled attention) and the decoder turns the H×W grid
into pixels. The checkpoint holds everything: both models, the tokenizer and the class names.

    python sample.py --ckpt out/stackformer-shapes/ckpt.pt            # 64 samples -> out/stackformer-shapes/samples.png
    python sample.py --ckpt out/stackformer-shapes/ckpt.pt --device cpu --n 16 --batch-size 16 --show-positions   # CPU smoke run
    python sample.py --ckpt out/stackformer-ffhq/ckpt.pt --n 50000 --out-dir out/samples-ffhq    # one GPU, PNGs for fid.py
    torchrun --standalone --nproc_per_node=8 sample.py --ckpt out/stackformer-ffhq/ckpt.pt --num-samples 50000 --npz samples.npz
    python sample.py --ckpt out/stackformer-imagenet/ckpt.pt --class-id 207 --n 16      # class-conditional, one class
    torchrun --standalone --nproc_per_node=8 sample.py --ckpt out/stackformer-imagenet/ckpt.pt \\
        --classes all --num-samples 50000 --npz imagenet.npz                          # 50 per class, for FID
    python sample.py --ckpt out/stackformer-coco/ckpt.pt --prompt "a man riding a wave" --n 16   # text-conditional
    python sample.py --ckpt out/stackformer-coco/ckpt.pt --prompts-file captions.txt --npz coco.npz   # one image per caption
    python fid.py samples.npz ref_stats.npz

--n is short for --num-samples; under torchrun write --num-samples, since torchrun's own parser
rejects --n as an ambiguous abbreviation of its flags (--nnodes, --nproc-per-node, ...).

Outputs: a grid PNG of the first ≤ 256 images (--grid; on by default for n ≤ 256), a folder of
000000.png, 000001.png, ... named by global sample index (--out-dir) and/or one uint8 (n, H, W, 3)
array `images` in an .npz (--npz, with `labels` or `prompts` for conditional models): what
fid.py reads. --show-positions adds <grid>_positions.png with the latent cells that got no code
dimmed: the regions the model chose not to spend codes on.

Reproducibility. Sample indices 0..n-1 are cut into chunks [0, B), [B, 2B), ... of --batch-size B,
and each chunk is one generate() call whose torch.Generator is seeded from (--seed, chunk start)
alone. Every chunk runs at the full batch size B (the last one is padded and the extra images are
dropped), so every generate() call has the same shapes. Hence image i depends on the checkpoint,
the seed, B, its own condition, the sampling flags, --dtype and the device type, and on nothing
else: not on n, not on the number of torchrun ranks (chunk k goes to rank k % world), and not on
--skip-existing (a resumed folder equals an uninterrupted one). Changing --batch-size changes the
images, because one generator feeds all rows of a chunk.
"""

import argparse
import dataclasses
import hashlib
import json
import math
import os
import re
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import List, NamedTuple, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image

from data import to_uint8
from stackformer import SamplingConfig
from utils import (CompileFallback, UserError, add_config_flags, atomic_path, check, cleanup_distributed, compile_module,
                   compiles_on, config_to_parser, load_stackformer, run_checkpoint, run_main, setup_distributed, uncompile,
                   write_json)


# -----------------------------------------------------------------------------
# Configuration: every default in one place; --help shows the comment of each field.

@dataclass
class SampleConfig:
    ckpt: str = ""                          # Stackformer checkpoint written by train_stackformer.py, or its run folder (required)
    num_samples: Optional[int] = None       # images to sample, --n for short (64; the number of classes with --classes all, of prompts with --prompts-file)
    batch_size: int = 64                    # images per generate() call; part of the seed rule, so changing it changes the images
    seed: int = 0                           # chunk starting at sample i is seeded from (seed, i)
    # outputs
    grid: Optional[str] = None              # grid PNG of the first <= 256 images (default <ckpt dir>/samples.png when n <= 256; 'none' = off)
    out_dir: Optional[str] = None           # folder of 000000.png, 000001.png, ... by global sample index (what fid.py reads)
    npz: Optional[str] = None               # .npz with uint8 (n, H, W, 3) 'images' (+ 'labels' or 'prompts'), what fid.py reads
    show_positions: bool = False            # also write <grid stem>_positions.png: latent cells that got no code dimmed
    skip_existing: bool = False             # with --out-dir: chunks whose PNGs all exist are not sampled again (resume)
    overwrite: bool = False                 # replace outputs that exist already (the grid, the .npz, the PNGs in --out-dir)
    # conditioning
    class_id: Optional[str] = None          # class-conditional: every image this class (an index, or a name the checkpoint stores)
    classes: Optional[str] = None           # class-conditional: '0,1,2' cycled over the images, or 'all'; no class flag = cycle over all classes
    prompt: Optional[str] = None            # text-conditional: every image this caption
    prompts_file: Optional[str] = None      # text-conditional: one caption per line (blank lines skipped), cycled
    # sampling: the flags of stackformer.SamplingConfig, and these
    kv_cache: bool = True                   # --no-kv-cache recomputes the whole prefix each step (reference path, slow)
    # run
    device: Optional[str] = None            # default cuda if available; under torchrun every rank uses cuda:LOCAL_RANK
    dtype: str = "bf16"                     # bf16 | fp32: Stackformer weights on CUDA (CPU runs fp32; decoding always fp32)
    compile: bool = True                    # torch.compile the MQ-VAE decoding (de-mask and decoder) on CUDA (CPU runs stay eager); pixels may differ by a uint8 level from an eager run's (docs/speed.md, Reproducibility); --no-compile: eager
    compile_step: bool = False              # also torch.compile the sampling step: compiles first (base's step: 22 s on an H200), then faster; the tokens differ from an uncompiled run's and between two compiled runs


GRID_MAX = 256              # images in a grid at most; also the largest n that gets a grid by default
PROGRESS_EVERY_S = 5.0      # seconds between progress lines


def parse_config(argv) -> Tuple[SampleConfig, SamplingConfig]:
    parser = config_to_parser(SampleConfig(), __doc__.strip().split("\n\n")[0], required=("ckpt",))
    add_config_flags(parser, SamplingConfig())
    parser.add_argument("--n", dest="num_samples", type=int, default=argparse.SUPPRESS, metavar="N",
                        help="short for --num-samples (not under torchrun, which takes --n for one of its own flags)")
    flags = vars(parser.parse_args(argv))
    sampling = {f.name: flags.pop(f.name) for f in dataclasses.fields(SamplingConfig)}
    try:
        settings = SamplingConfig(**sampling)
    except ValueError as e:     # its message starts with the field's name
        name, rest = str(e).split(" ", 1)
        raise UserError(f"--{name.replace('_', '-')} {rest}") from None
    return SampleConfig(**flags), settings


def validate(cfg: SampleConfig):
    """Flag checks that need no checkpoint; they run before anything is loaded."""
    check(bool(cfg.ckpt), "--ckpt is required: a Stackformer checkpoint written by train_stackformer.py")
    cfg.ckpt = run_checkpoint(cfg.ckpt)
    check(cfg.num_samples is None or cfg.num_samples > 0, f"--n/--num-samples must be positive, got {cfg.num_samples}")
    check(cfg.batch_size > 0, f"--batch-size must be positive, got {cfg.batch_size}")
    check(cfg.seed >= 0, f"--seed must be >= 0, got {cfg.seed}")
    check(cfg.dtype in ("bf16", "fp32"), f"--dtype must be bf16 or fp32, got {cfg.dtype!r}")
    check(cfg.class_id is None or cfg.classes is None, "give --class-id or --classes, not both")
    check(cfg.prompt is None or cfg.prompts_file is None, "give --prompt or --prompts-file, not both")
    check(not cfg.skip_existing or cfg.out_dir, "--skip-existing needs --out-dir (it looks for the PNGs there)")
    check(cfg.npz is None or cfg.npz.endswith(".npz"), f"--npz must end in .npz (fid.py tells files apart by suffix), got {cfg.npz}")


# -----------------------------------------------------------------------------
# Which images go where: chunks, their seeds, and their share of the ranks

def shard_chunks(n: int, batch_size: int, rank: int = 0, world: int = 1) -> List[Tuple[int, int]]:
    """Chunks (start, stop) of the sample indices 0..n-1 that `rank` of `world` generates.

    The chunks are [0, B), [B, 2B), ..., the last one cut at n; chunk k goes to rank k % world, so
    the ranks' shares are disjoint, cover 0..n-1, differ by at most one chunk, and the chunks
    themselves do not depend on the number of ranks.
    """
    if n < 0 or batch_size <= 0 or not 0 <= rank < world:
        raise ValueError(f"need n >= 0, batch_size > 0 and 0 <= rank < world; got {n}, {batch_size}, {rank}, {world}")
    starts = range(0, n, batch_size)
    return [(start, min(start + batch_size, n)) for k, start in enumerate(starts) if k % world == rank]


def chunk_seed(seed: int, start: int) -> int:
    """Seed of the chunk whose first sample is `start`. SeedSequence hashes the pair, so nearby
    (seed, start) pairs get unrelated streams and no two pairs collide in practice."""
    return int(np.random.SeedSequence([seed, start]).generate_state(1, dtype=np.uint64)[0])


# -----------------------------------------------------------------------------
# Conditions: image i is conditioned on cycle[i % len(cycle)]

@dataclass
class Conditioning:
    mode: str                               # none | class | text
    cycle: list                             # class ids or prompts; [] when unconditional
    tokens: Optional[torch.Tensor] = None   # (len(cycle), text_len) caption ids, text mode
    note: str = ""                          # how the flags were read, for the log

    def rows(self, start: int, stop: int) -> Optional[torch.Tensor]:
        """The condition of samples start..stop-1: labels (B,), caption ids (B, L), or None."""
        if self.mode == "none":
            return None
        which = torch.arange(start, stop) % len(self.cycle)
        return torch.tensor(self.cycle, dtype=torch.long)[which] if self.mode == "class" else self.tokens[which]

    def per_image(self, n: int) -> dict:
        """What the .npz stores next to the images: labels (n,) int64 or prompts (n,) str."""
        which = np.arange(n) % max(len(self.cycle), 1)
        if self.mode == "class":
            return {"labels": np.asarray(self.cycle, dtype=np.int64)[which]}
        if self.mode == "text":
            return {"prompts": np.asarray(self.cycle, dtype=str)[which]}
        return {}


def parse_class(token: str, num_classes: int, names: Optional[List[str]]) -> int:
    token = token.strip()
    if re.fullmatch(r"[+-]?\d+", token):
        label = int(token)
        check(0 <= label < num_classes,
              f"class id {label} is out of range: this model has {num_classes} classes, valid ids 0..{num_classes - 1}")
        return label
    check(names is not None, f"class {token!r} is not a number and the checkpoint stores no class names; "
                             f"give an id in 0..{num_classes - 1}")
    if token not in names:
        shown = ", ".join(names[:10]) + (f", ... ({len(names)} in all)" if len(names) > 10 else "")
        raise UserError(f"unknown class {token!r}; the checkpoint's classes are: {shown}")
    return names.index(token)


def read_prompts(path: str) -> List[str]:
    check(os.path.isfile(path), f"prompts file not found: {path}")
    try:
        with open(path, encoding="utf-8") as fh:
            prompts = [line.strip() for line in fh if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read prompts file {path}: {e}") from None
    check(len(prompts) > 0, f"prompts file {path} holds no prompts (one caption per line)")
    return prompts


def resolve_conditioning(cfg: SampleConfig, model_config, tokenizer, class_names) -> Conditioning:
    """Check the conditioning flags against the checkpoint's kind of model and turn them into a cycle."""
    mode = model_config.cond
    class_flag = "--class-id" if cfg.class_id is not None else "--classes" if cfg.classes is not None else None
    text_flag = "--prompt" if cfg.prompt is not None else "--prompts-file" if cfg.prompts_file is not None else None
    kinds = {"none": "unconditional", "class": f"class-conditional ({model_config.num_classes} classes)",
             "text": "text-conditional"}
    if class_flag and mode != "class":
        raise UserError(f"{class_flag} needs a class-conditional model, but this checkpoint is {kinds[mode]}"
                        + ("; give --prompt or --prompts-file" if mode == "text" else ""))
    if text_flag and mode != "text":
        raise UserError(f"{text_flag} needs a text-conditional model, but this checkpoint is {kinds[mode]}")
    if mode == "none":
        return Conditioning("none", [], note="unconditional")
    if mode == "class":
        K = model_config.num_classes
        if cfg.class_id is not None:
            cycle, note = [parse_class(cfg.class_id, K, class_names)], f"class {cfg.class_id}"
        elif cfg.classes is None or cfg.classes.strip() == "all":
            cycle = list(range(K))
            note = "all classes, cycled" + ("" if cfg.classes else " (no class flag given)")
        else:
            tokens = [t for t in cfg.classes.split(",") if t.strip()]
            check(len(tokens) > 0, "--classes is empty: give ids like 0,1,2 or 'all'")
            cycle, note = [parse_class(t, K, class_names) for t in tokens], f"classes {cfg.classes}, cycled"
        return Conditioning("class", cycle, note=note)
    # text
    check(text_flag is not None, "this checkpoint is text-conditional: give --prompt TEXT or --prompts-file FILE")
    check(tokenizer is not None, "this text-conditional checkpoint stores no tokenizer")
    prompts = [cfg.prompt] if cfg.prompt is not None else read_prompts(cfg.prompts_file)
    note = f"prompt {cfg.prompt!r}" if cfg.prompt is not None else f"{len(prompts)} prompts from {cfg.prompts_file}, cycled"
    return Conditioning("text", prompts, tokens=tokenizer.encode_batch(prompts), note=note)


def text_warnings(prompts: List[str], tokenizer) -> List[str]:
    """Words the tokenizer does not know (they become <unk>) and captions longer than its text_len."""
    words = tokenizer.split
    unknown = sorted({w for p in prompts for w in words(p) if w not in tokenizer.word_to_id})
    long = sum(len(words(p)) > tokenizer.text_len for p in prompts)
    messages = []
    if unknown:
        shown = ", ".join(unknown[:20]) + (f", ... ({len(unknown)} in all)" if len(unknown) > 20 else "")
        messages.append(f"words not in the tokenizer's vocabulary, encoded as <unk>: {shown}")
    if long:
        messages.append(f"{long} prompt(s) longer than {tokenizer.text_len} words were truncated")
    return messages


# -----------------------------------------------------------------------------
# Sampling: one chunk per generate() call

class Chunk(NamedTuple):
    images: torch.Tensor        # (B, H, W, 3) uint8, CPU
    positions: torch.Tensor     # (B, N) int64 raster positions, CPU
    token_seconds: float        # generate() alone
    decode_seconds: float       # de-mask + decoder + conversion to uint8


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def sample_chunk(model, mqvae, start: int, stop: int, batch_size: int, cond: Optional[torch.Tensor],
                 seed: int, settings: Optional[SamplingConfig] = None, use_kv_cache: bool = True,
                 compile_step: bool = False, decode=None, reuse: Optional[dict] = None) -> Chunk:
    """Samples start..stop-1 (stop - start ≤ batch_size) from one generate() call of batch_size rows.

    The rows past stop are padding: they repeat the last condition and are thrown away. Rows never
    interact (attention, norms and the sampler are per row), so padding changes no real image;
    it only keeps every call at the same shapes, which makes the generator's draws per row, and
    the kernels chosen on CUDA, the same for a chunk wherever it is cut. With the KV cache the chunk
    is drawn by fast_sampling.generate (CUDA graphs on a GPU), without it by the reference
    Stackformer.generate(use_kv_cache=False). decode: (codes, positions) -> images, by default mqvae.decode
    (compile_decoding's, compiled).
    """
    import fast_sampling    # here: it imports Triton, ~0.3 s at every start of sample.py otherwise
    device = model.code_emb.weight.device
    count = stop - start
    if not 0 < count <= batch_size:
        raise ValueError(f"chunk {start}..{stop} does not fit a batch of {batch_size}")
    if cond is not None:
        cond = torch.cat([cond, cond[-1:].expand(batch_size - count, *cond.shape[1:])]).to(device)   # (B,) or (B, L)
    generator = torch.Generator(device=device).manual_seed(chunk_seed(seed, start))
    _sync(device)
    t0 = time.perf_counter()
    if use_kv_cache:
        codes, positions = fast_sampling.generate(model, batch_size, cond, settings, generator,
                                                  compile=compile_step, reuse=reuse)  # (B, N) each
    else:
        codes, positions = model.generate(batch_size, cond, settings, generator, use_kv_cache=False)
    _sync(device)
    t1 = time.perf_counter()
    # The decoder runs in fp32: it costs one forward pass against the Stackformer's N sequential
    # steps, and a bf16 output has 8 mantissa bits, enough to move pixels by one uint8 level.
    images = to_uint8((decode or mqvae.decode)(codes, positions))[:count].cpu()       # (count, H, W, 3)
    t2 = time.perf_counter()
    return Chunk(images, positions[:count].cpu(), t1 - t0, t2 - t1)


def sample_images(model, mqvae, n: int, cond: Optional[torch.Tensor] = None, batch_size: int = 64, seed: int = 0,
                  return_positions: bool = False, **options):
    """n images as a uint8 (n, H, W, 3) numpy array; image i equals the i-th image sample.py writes
    with the same seed, batch size and flags. cond: None, labels (n,) or caption ids (n, L).
    options: sample_chunk's (settings, use_kv_cache, compile_step, decode). With return_positions, also the
    (n, N) latent positions each image got its codes at."""
    images, positions = [], []
    kept = {}       # buffers and CUDA graphs of the first chunk, reused by the others
    for start, stop in shard_chunks(n, batch_size):
        chunk = sample_chunk(model, mqvae, start, stop, batch_size, None if cond is None else cond[start:stop],
                             seed, reuse=kept, **options)
        images.append(chunk.images)
        positions.append(chunk.positions)
    images = torch.cat(images).numpy()
    return (images, torch.cat(positions).numpy()) if return_positions else images


# -----------------------------------------------------------------------------
# Files: atomic writes, grids

def png_path(out_dir: str, index: int) -> str:
    return os.path.join(out_dir, f"{index:06d}.png")


def write_png(array: np.ndarray, path: str):
    """Atomic: a crash leaves either no file or a whole one, so --skip-existing can trust what exists."""
    try:
        with atomic_path(path) as tmp:
            Image.fromarray(array).save(tmp, format="PNG")
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or e}") from None


def read_png(path: str, size: int) -> np.ndarray:
    """An image --skip-existing found, checked to be one of ours."""
    try:
        with Image.open(path) as img:
            image = np.asarray(img.convert("RGB"))
    except Exception as e:
        raise UserError(f"cannot read existing {path} ({type(e).__name__}); delete it or run without --skip-existing") from None
    check(image.shape == (size, size, 3), f"existing {path} is {image.shape[1]}x{image.shape[0]}, not {size}x{size}; "
                                          f"delete it or run without --skip-existing")
    return image


def write_npz(path: str, arrays: dict):
    try:
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, **arrays)
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or e}") from None


def check_writable(folder: str, what: str):
    """Create the folder and a file in it now, so a bad path fails before the sampling, not after."""
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise UserError(f"cannot write {what} to {folder}: {e.strerror or e}") from None


def image_grid(images: np.ndarray, columns: int, padding: int = 2) -> np.ndarray:
    """(B, H, W, 3) uint8 -> one (rows·(H+p)+p, columns·(W+p)+p, 3) image on white."""
    B, H, W, C = images.shape
    rows = math.ceil(B / columns)
    grid = np.full((rows * (H + padding) + padding, columns * (W + padding) + padding, C), 255, np.uint8)
    for i, image in enumerate(images):
        top, left = padding + (i // columns) * (H + padding), padding + (i % columns) * (W + padding)
        grid[top:top + H, left:left + W] = image
    return grid


def grid_columns(count: int, period: int) -> int:
    """About square; a multiple of the condition's period when it is short, so each column holds one condition."""
    columns = math.ceil(math.sqrt(count))
    if 1 < period <= 16:
        columns = math.ceil(columns / period) * period
    return min(columns, count)


def mark_positions(images: np.ndarray, positions: np.ndarray, grid_size: int, dim: float = 0.3) -> np.ndarray:
    """The images with every latent cell that got no code dimmed to `dim` of its brightness:
    (B, H, W, 3) uint8, positions (B, N) raster indices on the grid_size × grid_size latent grid."""
    B, H, W, _ = images.shape
    kept = np.zeros((B, grid_size * grid_size), dtype=bool)
    np.put_along_axis(kept, positions, True, axis=1)
    kept = kept.reshape(B, grid_size, grid_size)
    kept = kept.repeat(H // grid_size, axis=1).repeat(W // grid_size, axis=2)[..., None]    # (B, H, W, 1), nearest
    return np.where(kept, images, (images * dim).round().astype(np.uint8))


# -----------------------------------------------------------------------------
# The script

def main(argv=None) -> dict:
    cfg, settings = parse_config(argv)
    validate(cfg)
    rank, world, local_rank, device = setup_distributed()
    result = sample(cfg, settings, rank, world, device)
    cleanup_distributed()
    return result


def pick_device(cfg: SampleConfig, world: int, device: torch.device) -> torch.device:
    if world > 1 or cfg.device is None:
        return device   # torchrun: setup_distributed gave this rank cuda:LOCAL_RANK (CPU without CUDA)
    try:
        device = torch.device(cfg.device)
    except RuntimeError:
        raise UserError(f"unknown device {cfg.device!r} (cpu, cuda, cuda:1, ...)") from None
    check(device.type != "cuda" or torch.cuda.is_available(), f"--device {cfg.device}: CUDA is not available here")
    return device


def load_models(path: str, device: torch.device):
    try:
        model, mqvae, tokenizer, ckpt = load_stackformer(path, device)
    except (RuntimeError, KeyError, TypeError, ValueError) as e:   # config or weights that do not fit this code
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise UserError(f"cannot rebuild the models from {path}: {type(e).__name__}: {first}") from None
    mcfg, scfg = mqvae.config, model.config
    check((scfg.codebook_size, scfg.num_positions, scfg.seq_len) == (mcfg.codebook_size, mcfg.num_tokens, mcfg.seq_len),
          f"{path}: the Stackformer (V={scfg.codebook_size}, T={scfg.num_positions}, N={scfg.seq_len}) does not fit "
          f"its MQ-VAE (V={mcfg.codebook_size}, T={mcfg.num_tokens}, N={mcfg.seq_len})")
    return model, mqvae, tokenizer, ckpt


def sample(cfg: SampleConfig, settings: SamplingConfig, rank: int, world: int, device) -> dict:
    master = rank == 0
    log = print if master else (lambda *a, **k: None)
    device = pick_device(cfg, world, device)
    model, mqvae, tokenizer, ckpt = load_models(cfg.ckpt, device)
    if device.type == "cuda" and cfg.dtype == "bf16":
        # bf16 weights rather than autocast: the fast sampler then replays its steps as CUDA graphs
        # (autocast's weight-cast cache does not mix with graph capture). Sampling stays in fp32.
        model.to(torch.bfloat16)
    cond = resolve_conditioning(cfg, model.config, tokenizer, ckpt.get("classes"))
    check(settings.cfg_scale == 1 or model.config.cond_drop > 0,
          f"--cfg-scale {settings.cfg_scale} needs a model trained with --cond-drop > 0 (null "
          f"conditions); this one was not (cond {model.config.cond}): sample with --cfg-scale 1")
    if cond.mode == "text" and master:
        for message in text_warnings(cond.cycle, tokenizer):
            print(f"warning: {message}", file=sys.stderr)
    n = cfg.num_samples
    if n is None:
        n = len(cond.cycle) if (cond.mode == "class" and cfg.classes == "all") or cfg.prompts_file else 64
    grid, positions_grid = output_paths(cfg, n)
    record = sampling_record(cfg, settings, ckpt.get("step"), cond, device, n)
    if cfg.out_dir and master:
        write_sample_record(cfg, record)

    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    decode = compile_decoding(mqvae, log) if cfg.compile and compiles_on(device) else None
    mc = mqvae.config
    options = dict(settings=settings, use_kv_cache=cfg.kv_cache, compile_step=cfg.compile_step, decode=decode)
    log(f"checkpoint {cfg.ckpt} (step {ckpt.get('step')}): {model.num_params() / 1e6:.1f}M Stackformer parameters, "
        f"{mc.resolution}px images, {mc.grid_size}x{mc.grid_size} latent grid, N = {model.config.seq_len} of "
        f"T = {mc.num_tokens} positions, V = {mc.codebook_size} codes; {cond.note}")
    log(f"sampling {n} images in {math.ceil(n / cfg.batch_size)} chunks of {cfg.batch_size} over {world} rank(s) on "
        f"{device} ({record['dtype']}), seed {cfg.seed}; "
        + ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(settings).items())
        + f", use_kv_cache={cfg.kv_cache}, compiled decoding={decode is not None}, compile_step={cfg.compile_step}")
    chunks = shard_chunks(n, cfg.batch_size, rank, world)
    grid_count = min(n, GRID_MAX) if grid else 0
    stats, npz_images, npz_indices, grid_images, grid_positions = sample_chunks(
        cfg, model, mqvae, cond, chunks, options, grid_count, positions_grid is not None, n, world,
        log)

    # Gather: the grid's images and the run's numbers to rank 0; the .npz through per-rank parts.
    npz_extra = dict(**cond.per_image(n), config=np.asarray(json.dumps(record)))
    if cfg.npz and world > 1:
        write_npz(npz_part(cfg.npz, rank, world), dict(images=npz_images, indices=npz_indices))
    elif cfg.npz:   # one process: its chunks are 0..n-1 in order
        write_npz(cfg.npz, dict(images=npz_images, **npz_extra))
    if world > 1:
        stats, grid_images, grid_positions = gather_on_rank_0(stats, grid_images, grid_positions,
                                                              world)
    if not master:
        return stats
    if grid:
        kept = f"{model.config.seq_len} of {mc.num_tokens} cells per image kept"
        write_grids(grid, positions_grid, grid_images, grid_positions, len(cond.cycle),
                    mc.grid_size, kept, log)
    if cfg.npz and world > 1:
        merge_npz_parts(cfg.npz, n, world, npz_extra)
    if cfg.npz:
        log(f"wrote {cfg.npz} (images {n}x{mc.resolution}x{mc.resolution}x3 uint8)")
    if cfg.out_dir:
        log(f"wrote {cfg.out_dir}/000000.png ... {os.path.basename(png_path(cfg.out_dir, n - 1))}")
    log(summary(stats))
    return dict(stats, n=n, grid=grid, positions_grid=positions_grid)


def compile_decoding(mqvae, log):
    """torch.compile the MQ-VAE's de-mask (a VQGAN's decoder input) and decoder in place. -> decode(codes,
    positions): mqvae.decode through a CompileFallback, so that a failing compile decodes eager instead."""
    middle = "decoder_input" if mqvae.config.masker == "none" else "demask"
    setattr(mqvae, middle, compile_module(getattr(mqvae, middle)))
    mqvae.decoder = compile_module(mqvae.decoder)
    fallback = CompileFallback(True, lambda failed: uncompile(mqvae), log, next(mqvae.parameters()).device)
    return lambda codes, positions: fallback(mqvae.decode, codes, positions)


def sampling_record(cfg: SampleConfig, settings: SamplingConfig, step, cond: Conditioning, device,
                    n: int) -> dict:
    """What was sampled how: printed, stored in the .npz and next to the PNGs."""
    conditions = hashlib.sha256(json.dumps(cond.cycle).encode()).hexdigest()[:16]
    record = dict(ckpt=os.path.abspath(cfg.ckpt), ckpt_step=step, seed=cfg.seed,
                  batch_size=cfg.batch_size, conditions_sha256=conditions,
                  dtype=cfg.dtype if device.type == "cuda" else "fp32", device_type=device.type,
                  **dataclasses.asdict(settings), compile=cfg.compile and compiles_on(device),
                  compile_step=cfg.compile_step)
    record.update(n=n, conditioning=cond.note)    # the keys above fix the images; these two do not
    return record


def gather_on_rank_0(stats: dict, grid_images: list, grid_positions: list, world: int):
    """On every rank: all ranks' numbers summed (times: the slowest's), and their grid images."""
    gathered = [None] * world
    dist.all_gather_object(gathered, (stats, grid_images, grid_positions))   # also a barrier
    every = [s for s, _, _ in gathered]
    summed = ("generated", "skipped", "steady_images_per_s")
    slowest = ("token_s", "decode_s", "wall_s", "first_chunk_s")
    stats = {**{key: sum(s[key] for s in every) for key in summed},
             **{key: max(s[key] for s in every) for key in slowest}}
    return (stats, [part for _, images, _ in gathered for part in images],
            [part for _, _, positions in gathered for part in positions])


def write_grids(grid: str, positions_grid: Optional[str], grid_images: list, grid_positions: list,
                period: int, grid_size: int, kept: str, log):
    """The grid PNG of the first images and, with --show-positions, its copy with the latent cells
    that got no code dimmed."""
    shown = np.concatenate([images for _, images in sorted(grid_images, key=lambda part: part[0])])
    columns = grid_columns(len(shown), period)
    write_png(image_grid(shown, columns), grid)
    log(f"wrote {grid} ({len(shown)} images)")
    if positions_grid:
        where = np.concatenate([p for _, p in sorted(grid_positions, key=lambda part: part[0])])
        write_png(image_grid(mark_positions(shown, where, grid_size), columns), positions_grid)
        log(f"wrote {positions_grid} (latent cells that got no code dimmed; {kept})")


def summary(stats: dict) -> str:
    made = stats["generated"]
    token_s, decode_s = stats["token_s"], stats["decode_s"]
    line = f"done: {made} images sampled in {stats['wall_s']:.1f} s"
    if stats["skipped"]:
        line += f", {stats['skipped']} already there (--skip-existing)"
    if made:
        line += (f" | tokens only {made / max(token_s, 1e-9):.1f} img/s, with decoding "
                 f"{made / max(token_s + decode_s, 1e-9):.1f} img/s (generate {token_s:.1f} s, "
                 f"decode {decode_s:.1f} s)")
    if stats["steady_images_per_s"] > 0:
        line += (f"; the first chunk, which also warms up, took {stats['first_chunk_s']:.1f} s, "
                 f"the others ran at {stats['steady_images_per_s']:.1f} img/s with decoding")
    return line


def output_paths(cfg: SampleConfig, n: int):
    """-> (grid PNG or None, positions grid PNG or None); checks that every output can be written, before sampling."""
    grid = cfg.grid
    if grid is None and n <= GRID_MAX:
        grid = os.path.join(os.path.dirname(os.path.abspath(cfg.ckpt)), "samples.png")
    grid = None if grid is None or grid.lower() == "none" else grid
    check(grid or cfg.out_dir or cfg.npz, "nothing to write: give --out-dir, --npz or --grid"
          + (f" (n = {n} > {GRID_MAX} gets no grid by default)" if cfg.grid is None else ""))
    check(not cfg.show_positions or grid, "--show-positions draws on the grid, which is off; give --grid PATH")
    positions_grid = os.path.splitext(grid)[0] + "_positions.png" if grid and cfg.show_positions else None
    grid_what = "the grid" + (" (by default next to the checkpoint; give --grid PATH or --grid none)" if cfg.grid is None else "")
    for folder, what in ((cfg.out_dir, "images"), (grid and os.path.dirname(os.path.abspath(grid)), grid_what),
                         (cfg.npz and os.path.dirname(os.path.abspath(cfg.npz)), "the .npz")):
        if folder:
            check_writable(folder, what)
    for path in (grid, cfg.npz):
        check(not path or not os.path.isdir(path), f"{path} is a folder; give a file name")
    for path in (grid, positions_grid, cfg.npz):
        check(not path or cfg.overwrite or not os.path.exists(path),
              f"{path} exists; give --overwrite to replace it, or another path")
    if cfg.out_dir and not (cfg.overwrite or cfg.skip_existing):
        found = [name for name in os.listdir(cfg.out_dir) if re.fullmatch(r"\d{6}\.png", name)]
        check(not found, f"{cfg.out_dir} holds {len(found)} sampled images already; --skip-existing keeps them and "
                         f"samples the rest, --overwrite replaces them")
    return grid, positions_grid


def write_sample_record(cfg: SampleConfig, record: dict):
    """out_dir/sample_config.json; with --skip-existing, the folder's earlier settings must be these."""
    record_path = os.path.join(cfg.out_dir, "sample_config.json")
    if cfg.skip_existing and os.path.isfile(record_path):
        with open(record_path) as fh:
            before = json.load(fh)
        differ = [k for k in record if k not in ("n", "conditioning") and before.get(k) != record[k]]
        check(not differ, f"{cfg.out_dir} was sampled with other settings ({', '.join(differ)} differ); "
                          f"--skip-existing would mix two kinds of images there")
    write_json(record_path, record)


def sample_chunks(cfg: SampleConfig, model, mqvae, cond: Conditioning, chunks, options: dict,
                  grid_count: int, want_positions: bool, n: int, world: int, log):
    """This rank's chunks: each is sampled (or, with --skip-existing, read back), its PNGs written, and kept
    as far as the grid and the .npz need it. -> (stats, npz images, their indices, grid images, grid positions)."""
    share = sum(stop - start for start, stop in chunks)       # this rank's images
    R = mqvae.config.resolution
    # The .npz share is allocated once: 50k 256px images are 9.8 GB, too much to hold twice.
    npz_images = np.empty((share, R, R, 3), np.uint8) if cfg.npz else None
    npz_indices = np.concatenate([np.arange(start, stop) for start, stop in chunks] or [np.zeros(0, np.int64)])
    grid_images, grid_positions = [], []
    generated = skipped = done = 0
    token_s = decode_s = 0.0
    first = None    # (images, seconds) of the first chunk sampled: it also warms up (kernels, graph capture, compile)
    t_start = t_log = time.perf_counter()
    writer = ThreadPoolExecutor(max_workers=4) if cfg.out_dir else None   # PNG encoding overlaps the next chunk
    pending = []
    kept = {}       # the fast sampler's buffers and CUDA graph, captured once and replayed for every chunk
    try:
        for k, (start, stop) in enumerate(chunks):
            files = [png_path(cfg.out_dir, i) for i in range(start, stop)] if cfg.out_dir else []
            needs_positions = want_positions and start < grid_count   # not stored in the PNGs
            images = positions = None
            if cfg.skip_existing and not needs_positions and all(os.path.isfile(f) for f in files):
                skipped += stop - start
                if cfg.npz or start < grid_count:
                    images = np.stack([read_png(f, R) for f in files])             # (count, H, W, 3)
            else:
                chunk = sample_chunk(model, mqvae, start, stop, cfg.batch_size, cond.rows(start, stop), cfg.seed,
                                     reuse=kept, **options)
                images, positions = chunk.images.numpy(), chunk.positions.numpy()
                generated += stop - start
                token_s += chunk.token_seconds
                decode_s += chunk.decode_seconds
                first = first or (stop - start, chunk.token_seconds + chunk.decode_seconds)
                for future in pending:   # at most one chunk of PNGs in flight
                    future.result()
                pending = [writer.submit(write_png, image, f) for image, f in zip(images, files)] if writer else []
            if cfg.npz:
                npz_images[done:done + stop - start] = images
            if start < grid_count:
                grid_images.append((start, images[:grid_count - start]))
                if positions is not None:
                    grid_positions.append((start, positions[:grid_count - start]))
            done += stop - start
            now = time.perf_counter()
            if k == 0 or done == share or now - t_log >= PROGRESS_EVERY_S:
                t_log = now
                rate = generated / max(now - t_start, 1e-9)                       # this rank's
                eta = (share - done) / rate if rate > 0 else 0.0
                log(f"{done}/{share} images" + (f" on rank 0 (of {n} on {world} ranks)" if world > 1 else "")
                    + f" | {rate * world:.1f} img/s | ETA {eta / 60:.1f} min", flush=True)
        for future in pending:
            future.result()
    finally:
        if writer:
            writer.shutdown(wait=True)
    first_images, first_s = first or (0, 0.0)
    stats = dict(generated=generated, skipped=skipped, token_s=token_s, decode_s=decode_s,
                 wall_s=time.perf_counter() - t_start, first_chunk_s=first_s,
                 steady_images_per_s=(generated - first_images) / max(token_s + decode_s - first_s, 1e-9))
    return stats, npz_images, npz_indices, grid_images, grid_positions


def npz_part(path: str, rank: int, world: int) -> str:
    return f"{path[:-len('.npz')]}.part{rank}-of-{world}.npz"


def merge_npz_parts(path: str, n: int, world: int, extra: dict):
    """Rank 0: put every rank's images at their sample index, check each index came exactly once,
    write the final .npz atomically and delete the parts."""
    parts = [npz_part(path, r, world) for r in range(world)]
    images, seen = None, np.zeros(n, dtype=np.int64)
    for part in parts:
        with np.load(part, allow_pickle=False) as f:
            part_images, indices = f["images"], f["indices"]
        if images is None:
            images = np.zeros((n, *part_images.shape[1:]), np.uint8)
        images[indices] = part_images
        np.add.at(seen, indices, 1)
    check(bool((seen == 1).all()), f"merging {path}: indices missing or repeated across ranks "
                                   f"({int((seen == 0).sum())} missing, {int((seen > 1).sum())} repeated)")
    write_npz(path, dict(images=images, **extra))
    for part in parts:
        os.remove(part)


if __name__ == "__main__":
    run_main(main)
