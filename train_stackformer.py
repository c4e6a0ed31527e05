"""
Train the Stackformer (stage 2) on the (code, position) sequences of a frozen MQ-VAE.

    loss = CE_code + 1.0 · CE_pos      (both logged: the supplementary's Figure 1 curves)

1. Token pre-extraction. The frozen MQ-VAE (eval mode) encodes every training image once, plus a
   horizontally flipped copy, and every validation image, into uint16 arrays of codes and
   positions (out_dir/tokens/<split>/*.npy, with labels or caption tokens). They are reused while
   the stage-1 checkpoint is the same file (keyed by its SHA-256) and rebuilt when it changes.
   Under torchrun every rank encodes its own shard. The official code re-encodes augmented images
   every step instead; pre-extraction makes stage 2 ~2x cheaper and its data exactly repeatable.
2. Sequences are put in raster order (positions ascending; `--order importance` keeps the
   descending-score order of the mask, supp. Table 3) and modelled with AdamW(0.9, 0.95),
   weight decay 0.01 on matrix weights, peak lr 5e-4 with warmup then cosine, bf16 autocast.

    python train_stackformer.py --stage1 out/mqvae-shapes/ckpt.pt               # demo (after train_mqvae.py)
    python train_stackformer.py --stage1 out/mqvae-ffhq/ckpt.pt --preset base   # FFHQ, unconditional
    torchrun --standalone --nproc_per_node=8 train_stackformer.py --stage1 out/mqvae-imagenet/ckpt.pt   # class-cond.
    torchrun --standalone --nproc_per_node=8 train_stackformer.py --stage1 out/mqvae-imagenet/ckpt.pt \
        --data coco --data-dir data/coco                                        # text-conditional (COCO)
    torchrun --nnodes=2 --nproc_per_node=8 --node_rank=0 --master_addr=HOST --master_port=29500 \
        train_stackformer.py --stage1 ...                                       # multi-node
    python train_stackformer.py --stage1 out/mqvae-shapes/ckpt.pt --resume      # continue exactly

Outputs in --out-dir: config.json, log.jsonl, samples_<step>.png, tokens/, ckpt.pt (which embeds the
MQ-VAE, so `python sample.py --ckpt out_dir/ckpt.pt` needs nothing else).
"""

import dataclasses
import hashlib
import json
import os
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader

import data
from stackformer import PRESETS, Stackformer, StackformerConfig, WordTokenizer, reproducible_attention
from utils import (COMPILE_MODES, CompileFallback, LogCadence, TrainingRun, UserError, atomic_path, barrier, check,
                   check_identical_across_ranks, check_positive, compile_module, compiles_on, default_workers, fill_defaults, ignore_interrupts, launch, load_checkpoint, mqvae_from_checkpoint, resume_from, run_main,
                   save_grid, uncompile, seed_or_restore_rng, strip_compile_prefix, warmup_cosine_lr, write_json)


@dataclass
class TrainConfig:
    stage1: str = "out/mqvae-shapes/ckpt.pt"  # the frozen MQ-VAE checkpoint (train_mqvae.py)
    # data (default: the dataset stage 1 was trained on)
    data: Optional[str] = None            # shapes | ffhq | imagenet | coco | PATH
    data_dir: Optional[str] = None        # root of ffhq/imagenet/coco (default: stage 1's)
    cond: Optional[str] = None            # none | class | text (default: class for imagenet, text for coco, else none)
    cond_drop: Optional[float] = None     # share of training sequences with the null class / empty caption, for guidance (0.1 with a condition)
    train_images: Optional[int] = None    # train on the first N training images only (default: all)
    flip: bool = True                     # also encode a horizontally flipped copy of the training set
    views: Optional[int] = None           # training views per image: 1 = the centre crop, K > 1 = K draws of the training augmentation (8; 1 for shapes)
    text_min_count: int = 1               # tokenizer: keep words seen at least this often in the training captions
    # model
    preset: Optional[str] = None          # tiny | demo | small | base | large (base; demo for shapes)
    code_layers: Optional[int] = None     # Code-Transformer depth (default: the preset's; supp. Table 1)
    pos_layers: Optional[int] = None      # Position-Transformer depth (default: the preset's; supp. Table 1)
    order: str = "raster"                 # raster | importance (supp. Table 3)
    abs_pos: bool = True                  # the absolute sequence embedding a_t (--no-abs-pos: supp. Table 3)
    variant: str = "code-first"           # code-first | position-first (Stackformer_r)
    dropout: float = 0.1                  # embeddings, residuals and attention (supp.: 0.1)
    # optimisation
    batch_size: Optional[int] = None      # per GPU (10; 32 for the demo)
    grad_accum: int = 1                   # micro-batches per optimizer step
    lr: Optional[float] = None            # peak (5e-4; 1e-3 for the demo)
    min_lr: float = 0.0                   # end of the cosine
    weight_decay: float = 0.01            # on Linear weights only
    grad_clip: float = 1.0                # 0 disables
    warmup_steps: Optional[int] = None    # default: 2% of training, at most 5000 steps
    epochs: Optional[float] = None        # 100 (120 for coco; 4 for the demo)
    max_steps: Optional[int] = None       # overrides epochs
    stop_after: Optional[int] = None      # leave (with a checkpoint) after this many steps in this run
    # run
    out_dir: Optional[str] = None         # default out/stackformer-<data>
    seed: int = 0                         # model init and data order
    dtype: str = "bf16"                   # bf16 | fp32 on CUDA; CPU runs fp32
    compile: bool = True                  # torch.compile the Stackformer on CUDA (the first step compiles; CPU runs stay eager); --no-compile: eager
    compile_mode: str = "auto"            # auto (reduce-overhead on one GPU, default under DDP) | default | reduce-overhead (CUDA graphs, best at small batches) | max-autotune
    peak_tflops: float = 989.0            # for MFU: dense bf16 TFLOP/s of one GPU (H100/H200 datasheet)
    log_every: int = 50                   # steps between log lines (also one after the first step and at least every 30 s)
    eval_every: Optional[int] = None      # default 2000 (demo 500)
    eval_batches: int = 20                # validation batches per evaluation
    num_samples: int = 16                 # images in samples_<step>.png
    ckpt_every: int = 1000                # steps between checkpoints (also written at the end and on SIGINT/SIGTERM)
    ckpt_minutes: float = 30.0            # also checkpoint when this many minutes have passed since the last one
    encode_batch_size: int = 64           # batch size of the token pre-extraction
    num_workers: Optional[int] = None     # data loader processes for the token extraction (8, at most the CPU cores)
    resume: bool = False                  # continue from out_dir/ckpt.pt
    overwrite: bool = False               # start over in an --out-dir that holds a checkpoint (replaces it and its log)


RUN_CONTROL = {"max_steps", "stop_after", "epochs", "log_every", "eval_every", "eval_batches", "num_samples",
               "ckpt_every", "ckpt_minutes", "compile", "compile_mode", "resume", "data_dir", "out_dir", "encode_batch_size",
               "num_workers", "peak_tflops", "stage1"}


def resolve_defaults(cfg: TrainConfig, stage1_train: dict) -> TrainConfig:
    if cfg.data is None:
        cfg.data, cfg.data_dir = stage1_train["data"], cfg.data_dir or stage1_train.get("data_dir")
    demo = cfg.data == "shapes"
    defaults = dict(cond={"imagenet": "class", "coco": "text"}.get(cfg.data, "none"),
                    preset="demo" if demo else "base", batch_size=32 if demo else 10,
                    lr=1e-3 if demo else 5e-4, epochs=4.0 if demo else (120.0 if cfg.data == "coco" else 100.0),
                    eval_every=500 if demo else 2000, num_workers=default_workers(8), views=1 if demo else 8)
    cfg = fill_defaults(cfg, defaults, "stackformer")
    if cfg.cond_drop is None:
        cfg.cond_drop = 0.0 if cfg.cond == "none" else 0.1
    return cfg


def validate(cfg: TrainConfig):
    check(cfg.preset in PRESETS, f"unknown preset {cfg.preset!r}: choose one of {', '.join(PRESETS)}")
    check(cfg.cond in ("none", "class", "text"), f"--cond must be none, class or text, got {cfg.cond!r}")
    check(cfg.order in ("raster", "importance"), f"--order must be raster or importance, got {cfg.order!r}")
    check(cfg.variant in ("code-first", "position-first"), f"--variant must be code-first or position-first, got {cfg.variant!r}")
    check(cfg.dtype in ("bf16", "fp32"), f"--dtype must be bf16 or fp32, got {cfg.dtype!r}")
    check(cfg.compile_mode in COMPILE_MODES, f"--compile-mode must be one of {', '.join(COMPILE_MODES)}, got {cfg.compile_mode!r}")
    check_positive(cfg, "train_images", "views", "code_layers", "pos_layers", "batch_size", "grad_accum", "log_every",
                   "eval_every", "eval_batches", "ckpt_every", "encode_batch_size", "lr", "epochs", "max_steps")
    check(0.0 <= cfg.dropout < 1.0, f"--dropout must be in [0, 1), got {cfg.dropout}")
    check(0.0 <= cfg.cond_drop < 1.0, f"--cond-drop must be in [0, 1), got {cfg.cond_drop}")
    check(cfg.cond_drop == 0 or cfg.cond != "none", "--cond-drop needs --cond class or text (an unconditional model has no condition to drop)")
    check(cfg.num_workers >= 0, f"--num-workers must be >= 0, got {cfg.num_workers}")
    check(cfg.ckpt_minutes > 0, f"--ckpt-minutes must be positive, got {cfg.ckpt_minutes}")


def configure_optimizer(model: nn.Module, lr: float, weight_decay: float, betas: Tuple[float, float],
                        device_type: str) -> torch.optim.AdamW:
    """AdamW with weight decay on the weight matrices of Linear layers only.

    This is minGPT's split, which the official code uses: biases, LayerNorm gains, embedding
    tables, the start token and the absolute sequence embedding a are not decayed. Each of them
    is a per-token or per-channel value rather than a map between features, and pulling it
    toward zero does not regularise the model, it only biases what the value says.
    """
    decayed = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if id(p) in decayed], "weight_decay": weight_decay},
        {"params": [p for p in params if id(p) not in decayed], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=(device_type == "cuda"))


def flops_per_token(model: Stackformer) -> float:
    """Training FLOPs (forward + backward) per image token, i.e. per (code, position) pair, for MFU.

    As in the PaLM appendix and nanoGPT: a weight matrix with P entries costs 6·P FLOPs per token
    it processes, and attention over a context of S tokens costs 12·n_layer·d·S per token
    (QKᵀ and AV, 2 FLOPs per multiply-add, ×3 for the backward pass, causal mask not discounted).
    Without a caption both transformers run over S = N tokens, so this is
        6·(non-embedding params) + 12·(n_code_layers + n_pos_layers)·d·N.
    With a caption the lower transformer runs over S = L + N − 1 tokens; the total is divided by N.
    """
    d, N = model.config.n_embd, model.config.seq_len
    lower, _, upper, _ = model.stack()
    flops = 0
    for tower, S in ((lower, model.prefix_len + N - 1), (upper, N)):
        tower_params = sum(p.numel() for p in tower.parameters())
        flops += S * (6 * tower_params + 12 * len(tower.blocks) * d * S)
    head_params = sum(p.numel() for m in (model.code_head, model.pos_head) for p in m.parameters())
    flops += N * 6 * head_params
    return flops / N


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


# -----------------------------------------------------------------------------
# Token pre-extraction

def captions_of(dataset, index: int):
    if isinstance(dataset, data.ShapesDataset):
        return [dataset.caption(index)]
    return dataset.captions[index] if dataset.captions is not None else None


PART_IMAGES = 10000     # images per part file of the token extraction: the most an interruption can lose
VIEW_SEED = 7919        # views are drawn from seeds of (VIEW_SEED, view, image): the same in every run and on every rank


class ViewOf(torch.utils.data.Dataset):
    """View `view` of the images `indices` of a dataset. With augment, the dataset's training augmentation
    with a generator seeded from (view, image) alone; without, the dataset as it is (the centre crop)."""

    def __init__(self, dataset, indices, view: int, augment: bool):
        self.dataset, self.indices, self.view, self.augment = dataset, indices, view, augment

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, j):
        i = self.indices[j]
        return self.dataset[(i, data.sample_seed(VIEW_SEED, self.view, i))] if self.augment else self.dataset[i]


@torch.no_grad()
def encode_images(mqvae, images, flip: bool, batch_size: int, num_workers: int, device, unreadable, progress=None):
    """Encode every item of `images` and, with flip, its mirror image -> dict of numpy arrays: index (n,),
    label (n,), codes and positions (1 + flip, n, N) uint16 in the importance order the mask emits. Items
    whose file could not be read are left out (unreadable: data.UnreadableFiles)."""
    loader = DataLoader(images, batch_size=batch_size, num_workers=num_workers, pin_memory=device.type == "cuda",
                        worker_init_fn=ignore_interrupts)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    out = {k: [] for k in ("index", "label", "codes", "positions")}
    for batch in loader:
        keep = unreadable.note(batch["bad"])     # a replaced item would encode its neighbour twice
        if progress is not None:
            progress(len(keep))
        if not keep.any():
            continue
        batch = {k: v[keep] for k, v in batch.items()}
        x = batch["image"].to(device, non_blocking=True)
        codes, positions = [], []
        for mirrored in (False, True)[:1 + flip]:
            with autocast, reproducible_attention():   # the same images give the same token cache, run after run
                c, p, _ = mqvae.encode(x.flip(3) if mirrored else x)
            codes.append(c.cpu().numpy().astype(np.uint16))   # uint16 at once: 4x less host memory
            positions.append(p.cpu().numpy().astype(np.uint16))
        out["codes"].append(np.stack(codes))
        out["positions"].append(np.stack(positions))
        out["index"].append(batch["index"].numpy())
        out["label"].append(batch["label"].numpy())
    N = mqvae.config.seq_len
    result = {k: np.concatenate(out[k]) if out[k] else np.zeros(0, np.int64) for k in ("index", "label")}
    for k in ("codes", "positions"):
        result[k] = np.concatenate(out[k], axis=1) if out[k] else np.zeros((1 + flip, 0, N), np.uint16)
    return result


def build_token_cache(cfg, mqvae, stage1_sha: str, split: str, device, rank: int, world: int, tokenizer=None):
    """Encode `split` into out_dir/tokens/<split>/ and return the folder; reuse it while its key (stage-1 file,
    data, views, augmentation, captions) is the same. Training images get cfg.views views each (the centre
    crop for 1, else that many draws of the training augmentation), every view also mirrored with --flip;
    the rows of copy c = view·(1 + flip) + mirrored are images 0..M-1 in dataset order. Each rank encodes
    its share in part files of PART_IMAGES images; an interrupted extraction resumes from the parts it left."""
    folder = os.path.join(cfg.out_dir, "tokens", split)
    flip = cfg.flip and split == "train"
    views = cfg.views if split == "train" else 1
    image_size = mqvae.config.resolution
    # views > 1 are draws of the training augmentation that data.py gives this dataset (FFHQ: random resized
    # crop; the others: random crop), so the data and the number of views fix them
    key = dict(stage1_sha256=stage1_sha, data=cfg.data, data_dir=cfg.data_dir, image_size=image_size, flip=flip,
               views=views, split=split, train_images=cfg.train_images if split == "train" else None,
               captions=tokenizer.to_dict() if tokenizer is not None else None)
    meta_path, key_path = os.path.join(folder, "meta.json"), os.path.join(folder, "key.json")
    if os.path.isfile(meta_path) and json.load(open(meta_path)).get("key") == key:
        return folder
    dataset = data.build_dataset(cfg.data, cfg.data_dir, image_size, split)
    if split == "train":
        dataset = data.first_images(dataset, cfg.train_images)
    dataset = data.check_image_files({split: dataset}, cfg.out_dir)[split]
    files = isinstance(dataset, data.ImageFiles)
    check(views == 1 or files, f"--views {views} needs image files with a training augmentation; the shapes data "
                               f"draws each image one way only: use --views 1")
    if files and views == 1:
        dataset.mode = "eval"  # the resized, centre-cropped image (and its mirror)
    if rank == 0:   # parts left by an interrupted extraction of the same key are kept; anything else is stale
        if not (os.path.isfile(key_path) and json.load(open(key_path)) == key):
            shutil.rmtree(folder, ignore_errors=True)
            write_json(key_path, key)
    barrier()
    M, N, copies = len(dataset), mqvae.config.seq_len, views * (1 + flip)
    if rank == 0:
        print(f"encoding {split} split: {M} images x {views} view(s){' + mirror images' if flip else ''} = "
              f"{M * copies} sequences, {M * copies * N * 4 / 2 ** 20:.0f} MB -> {folder} "
              f"(key: stage-1 sha256 {stage1_sha[:12]})", flush=True)
    indices = list(range(rank, M, world))
    chunks = [indices[i:i + PART_IMAGES] for i in range(0, len(indices), PART_IMAGES)] or [[]]
    unreadable = data.UnreadableFiles(dataset, len(indices), "stage-2")
    progress = EncodingProgress(split, views * len(indices) * world, world, rank == 0)
    for view in range(views):
        for c, chunk in enumerate(chunks):
            path = os.path.join(folder, f"v{view}-r{rank}-of{world}-c{c}.npz")
            if os.path.isfile(path):          # done before an interruption
                progress.skip(len(chunk))
                continue
            part = encode_images(mqvae, ViewOf(dataset, chunk, view, views > 1), flip, cfg.encode_batch_size,
                                 cfg.num_workers, device, unreadable, progress.update)
            part["bad"] = np.array(sorted(unreadable.seen), dtype=np.int64)
            with atomic_path(path) as tmp, open(tmp, "wb") as fh:
                np.savez(fh, **part)
    barrier()
    if rank == 0:
        merge_token_parts(cfg, folder, dataset, key, views, flip, world, len(chunks), tokenizer)
    barrier()
    return folder


class EncodingProgress:
    """Rank 0's progress lines of the token extraction, as often as the training log's (LogCadence): after the
    first batch, then at least every LOG_SECONDS. Counts are rank 0's times the number of ranks."""

    def __init__(self, split: str, total: int, world: int, master: bool):
        self.split, self.total, self.world, self.master = split, total, world, master
        self.cadence = LogCadence(total)
        self.done = self.skipped = 0
        self.t0 = time.time()

    def skip(self, images: int):
        """Images a part file on disk already holds (an interrupted extraction resumed): counted, not timed."""
        self.done += images * self.world
        self.skipped += images * self.world

    def update(self, images: int):
        self.done += images * self.world
        if self.master and self.cadence.due(self.done):
            rate = (self.done - self.skipped) / max(time.time() - self.t0, 1e-9)
            print(f"encoding {self.split}: {self.done}/{self.total} images ({self.done / max(self.total, 1):.0%}), "
                  f"{rate:.1f} img/s, ETA {(self.total - self.done) / max(rate, 1e-9) / 60:.1f} min", flush=True)
            self.cadence.printed()


def merge_token_parts(cfg, folder: str, dataset, key: dict, views: int, flip: bool, world: int, num_chunks: int,
                      tokenizer):
    """Rank 0: gather every rank's parts into codes.npy, positions.npy, labels.npy (and the captions) in
    dataset order, copy after copy; write meta.json last, then delete the parts."""
    parts = [[dict(np.load(os.path.join(folder, f"v{view}-r{r}-of{world}-c{c}.npz")))
              for r in range(world) for c in range(num_chunks)] for view in range(views)]
    index = np.concatenate([p["index"] for p in parts[0]])
    order = np.argsort(index, kind="stable")                      # back to dataset order
    arrays = {}
    for name in ("codes", "positions"):
        copies = []
        for view_parts in parts:
            check(np.array_equal(np.sort(np.concatenate([p["index"] for p in view_parts])), index[order]),
                  "the views of the token extraction hold different images; delete the tokens folder and rerun")
            view_index = np.concatenate([p["index"] for p in view_parts])
            stacked = np.concatenate([p[name] for p in view_parts], axis=1)[:, np.argsort(view_index, kind="stable")]
            copies += list(stacked)                               # (M, N) per mirror
        arrays[name] = np.concatenate(copies)                     # (M·copies, N) uint16
    count = len(arrays["codes"]) // max(len(index), 1)
    labels = np.concatenate([p["label"] for p in parts[0]])[order].astype(np.int64)
    arrays["labels"] = np.concatenate([labels] * count)
    if cfg.cond == "text":
        caps = [captions_of(dataset, int(i)) for i in index[order]]
        check(all(caps), f"--cond text needs captions; {cfg.data} has none (use --data coco or shapes)")
        longest = max(len(c) for c in caps)
        tokens = np.zeros((len(caps), longest, tokenizer.text_len), dtype=np.int32)
        counts = np.array([len(c) for c in caps], dtype=np.int64)
        for row, texts in enumerate(caps):
            tokens[row, :len(texts)] = tokenizer.encode_batch(texts).numpy()
        arrays["caption_tokens"] = np.concatenate([tokens] * count)
        arrays["caption_counts"] = np.concatenate([counts] * count)
    for name, array in arrays.items():
        with atomic_path(os.path.join(folder, name + ".npy")) as tmp, open(tmp, "wb") as fh:
            np.save(fh, array)
    unreadable = sorted({int(b) for view_parts in parts for p in view_parts for b in p["bad"]})
    meta_path = os.path.join(folder, "meta.json")
    write_json(meta_path, dict(key=key, images=len(index), views=views, rows=int(arrays["codes"].shape[0]),
                               seq_len=int(arrays["codes"].shape[1]), unreadable=len(unreadable),
                               unreadable_files=[dataset.path(i) for i in unreadable[:100]]))
    for name in os.listdir(folder):
        if name.endswith(".npz") or name == "key.json":
            os.remove(os.path.join(folder, name))
    if unreadable:
        print(f"warning: {len(unreadable)} unreadable images were left out (listed in {meta_path})", file=sys.stderr)


class TokenSet:
    """The cached sequences of one split, memory-mapped, put in the requested order. Rows 0..M-1 are the
    M images; with flipped copies, row M + i is image i mirrored (`copies` = 2)."""

    def __init__(self, folder: str, order: str):
        self.codes = np.load(os.path.join(folder, "codes.npy"), mmap_mode="r")
        self.positions = np.load(os.path.join(folder, "positions.npy"), mmap_mode="r")
        self.labels = np.load(os.path.join(folder, "labels.npy"))
        self.caption_tokens = (np.load(os.path.join(folder, "caption_tokens.npy"), mmap_mode="r")
                               if os.path.isfile(os.path.join(folder, "caption_tokens.npy")) else None)
        self.caption_counts = (np.load(os.path.join(folder, "caption_counts.npy"))
                               if self.caption_tokens is not None else None)
        self.order = order
        with open(os.path.join(folder, "meta.json")) as fh:
            self.num_images = json.load(fh)["images"]
        self.copies = len(self.codes) // max(self.num_images, 1)

    def epoch_rows(self, seed: int, epoch: int) -> np.ndarray:
        """The rows of one epoch in order: every image once, as itself or (with flipped copies) mirrored
        with probability 1/2 — the random horizontal flip of the official code, drawn from the cache."""
        gen = torch.Generator().manual_seed(seed + epoch)
        rows = torch.randperm(self.num_images, generator=gen)
        if self.copies > 1:
            rows = rows + self.num_images * torch.randint(0, self.copies, (self.num_images,), generator=gen)
        return rows.numpy()

    def __len__(self):
        return self.codes.shape[0]

    def batch(self, rows: np.ndarray, gen: torch.Generator):
        """-> codes (B,N), positions (B,N) int64 in self.order, labels (B,), caption tokens (B,L) or None."""
        codes = torch.from_numpy(self.codes[rows].astype(np.int64))
        positions = torch.from_numpy(self.positions[rows].astype(np.int64))
        if self.order == "raster":  # the stored order is descending importance; sort by position
            positions, perm = positions.sort(dim=1)
            codes = codes.gather(1, perm)
        captions = None
        if self.caption_tokens is not None:  # one of the image's captions, drawn per sample
            counts = torch.from_numpy(self.caption_counts[rows])
            pick = (torch.rand(len(rows), generator=gen) * counts).long().numpy()
            captions = torch.from_numpy(self.caption_tokens[rows, pick].astype(np.int64))
        return codes, positions, torch.from_numpy(self.labels[rows]), captions


def condition(cfg_cond: str, labels, captions):
    return {"none": None, "class": labels, "text": captions}[cfg_cond]


def drop_conditions(model: Stackformer, cond: Optional[torch.Tensor], gen: torch.Generator) -> Optional[torch.Tensor]:
    """Classifier-free guidance's training: each sequence's condition becomes the null class or the empty
    caption with probability cond_drop, drawn from the step's own generator (a resumed run draws the same)."""
    p = model.config.cond_drop
    if cond is None or p == 0:
        return cond
    drop = (torch.rand(cond.size(0), generator=gen) < p).to(cond.device)
    drop = drop.view(-1, *([1] * (cond.dim() - 1)))                 # (B,) labels or (B, 1) for captions
    return torch.where(drop, model.null_condition(cond), cond)


# -----------------------------------------------------------------------------
# Training

def main(argv=None):
    launch(TrainConfig, train, __doc__.split("\n\n")[0].strip(), argv)


def train(cfg: TrainConfig, explicit: set, rank: int, world: int, device: torch.device):
    log = print if rank == 0 else (lambda *a, **k: None)
    stage1 = load_checkpoint(cfg.stage1, "mqvae")
    cfg = resolve_defaults(cfg, stage1["train_config"])
    ckpt_path, ckpt, cfg = resume_from(cfg, "stackformer", explicit, RUN_CONTROL, log)
    validate(cfg)
    if rank == 0 and device.type == "cpu" and cfg.preset not in ("demo", "tiny"):
        print(f"note: the full-size {cfg.preset} Stackformer is slow on a CPU; a short run: --preset demo --views 1 "
              f"--max-steps 1000")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    d = build_data(cfg, stage1, ckpt, rank, world, device)
    n = build_model(cfg, d, ckpt, world, device, log)
    # per-rank dropout from here on
    start_step = seed_or_restore_rng(ckpt, cfg.seed, rank, world, device, log,
                                     "the global batch, the data order and the random streams change")
    if ckpt is not None:
        log(f"resumed from {ckpt_path} at step {start_step}")
    run = TrainingRun(cfg, ckpt_path, ckpt is not None, start_step, d.total_steps, rank, world,
                      device, "Lower the learning rate")
    if rank == 0:
        describe_run(cfg, n, d)
    tokens_per_step = d.global_batch * n.config.seq_len
    sums = torch.zeros(3, device=device)      # loss, CE_code, CE_pos summed on the device between log lines
    count = 0
    stream = step_batches(d, cfg, start_step, rank, world, n.raw_model, device)
    n.model.train()
    step = start_step
    for step in range(start_step, d.total_steps):
        t0 = time.time()
        lr = warmup_cosine_lr(step, cfg.lr, d.warmup_steps, d.total_steps, cfg.min_lr)
        for group in n.optimizer.param_groups:
            group["lr"] = lr
        compiling = n.fallback.compiled and step == start_step
        terms = train_step(n, next(stream), cfg.grad_clip)
        sums += terms.sum(0)
        count += len(terms)
        run.guard.update(terms[:, 0].sum(), step + 1)
        done = step + 1
        if compiling:
            run.compiled_step(done, t0)
        else:
            run.step_times.append(time.time() - t0)
        if run.log_due(done):
            log_training(run, sums / max(count, 1), done, lr, tokens_per_step,
                         flops_per_token(n.raw_model) * tokens_per_step, d.steps_per_epoch)
            sums.zero_()
            count = 0
        if run.due(done, cfg.eval_every):
            report_evaluation(run, n, d, cfg, done, rank)
        save, stop = run.after_step(done)
        if save:
            run.save(done, checkpoint_state(cfg, n, d, stage1))
        if stop:
            log(run.stop_message(done))
            break
    if world > 1:
        log(check_identical_across_ranks(list(n.raw_model.parameters()), world, "parameters"))
    run.finish(step, f"; sample with: python sample.py --ckpt {ckpt_path}")


def train_step(n: SimpleNamespace, batches, grad_clip: float):
    """One optimizer step over the micro-batches [(codes, positions, cond), ...]: forward_backward (through
    the compile fallback), the gradient norm clipped to grad_clip (0: not), the update.
    -> (len(batches), 3) tensor: loss, CE_code and CE_pos of each micro-batch, detached."""
    terms = n.fallback(forward_backward, n, batches)
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(n.raw_model.parameters(), grad_clip)
    n.optimizer.step()
    n.optimizer.zero_grad(set_to_none=True)
    return terms


def forward_backward(n: SimpleNamespace, batches) -> torch.Tensor:
    """Each micro-batch's loss (Stackformer.forward with loss=True) backpropagated with weight
    1/len(batches); DDP all-reduces on the last one only. -> (len(batches), 3) detached terms."""
    terms = []
    for micro, (codes, positions, cond) in enumerate(batches):
        last = micro == len(batches) - 1
        sync = n.model.no_sync() if isinstance(n.model, DDP) and not last else nullcontext()
        if n.graphed:
            torch.compiler.cudagraph_mark_step_begin()  # the last replay's outputs are not read
        with sync:
            with n.autocast:
                loss, code_ce, pos_ce = n.model(codes, positions, cond, loss=True)
            (loss / len(batches)).backward()
        terms.append(torch.stack([loss.detach(), code_ce.detach(), pos_ce.detach()]))
    return torch.stack(terms)


def step_batches(d: SimpleNamespace, cfg: TrainConfig, step: int, rank: int, world: int,
                 model: Stackformer, device):
    """Endless stream, from `step` on, of each step's grad_accum micro-batches (codes, positions,
    cond) on the device. A step's rows come from a permutation per epoch (seed + epoch), sharded by
    rank, and its random draws from a generator seeded by (seed, step, rank): a resumed run reads
    exactly the rows and conditions an uninterrupted one would."""
    perm, perm_epoch = None, None
    while True:
        epoch, within = divmod(step, d.steps_per_epoch)
        if epoch != perm_epoch:
            perm, perm_epoch = d.train_tokens.epoch_rows(cfg.seed, epoch), epoch
        gen = torch.Generator().manual_seed(cfg.seed * 100_003 + step * world + rank)
        batches = []
        for micro in range(cfg.grad_accum):
            start = ((within * cfg.grad_accum + micro) * world + rank) * cfg.batch_size
            rows = np.sort(perm[start:start + cfg.batch_size])
            on_device = [t if t is None else t.to(device, non_blocking=True)
                         for t in d.train_tokens.batch(rows, gen)]
            codes, positions, labels, captions = on_device
            cond = drop_conditions(model, condition(cfg.cond, labels, captions), gen)
            batches.append((codes, positions, cond))
        yield batches
        step += 1


def build_data(cfg: TrainConfig, stage1: dict, ckpt: Optional[dict], rank: int, world: int,
               device) -> SimpleNamespace:
    """The frozen MQ-VAE, the tokenizer or class names of the condition, both splits' cached tokens,
    and the schedule they fix (steps, warmup)."""
    stage1_sha = file_sha256(cfg.stage1)
    if ckpt is not None and ckpt["stage1_sha256"] != stage1_sha:
        raise UserError(f"{cfg.stage1} is not the MQ-VAE this run was trained on (its SHA-256 "
                        f"changed); start a new --out-dir")
    mqvae = mqvae_from_checkpoint(stage1, device)
    mcfg = mqvae.config
    check(mcfg.codebook_size <= 65536 and mcfg.num_tokens <= 65536,
          "codes and positions are cached as uint16: codebook size and H*W must be at most 65536")
    tokenizer, classes = conditioning(cfg, ckpt, mcfg)
    folders = [build_token_cache(cfg, mqvae, stage1_sha, split, device, rank, world, tokenizer)
               for split in ("train", "val")]
    train_tokens, val_tokens = (TokenSet(folder, cfg.order) for folder in folders)
    global_batch = cfg.batch_size * world * cfg.grad_accum
    steps_per_epoch = train_tokens.num_images // global_batch  # an epoch sees every image once
    check(steps_per_epoch > 0, f"{train_tokens.num_images} training images are fewer than one "
                               f"global batch ({global_batch})")
    total_steps = cfg.max_steps or max(1, int(cfg.epochs * steps_per_epoch))
    warmup_steps = min(5000, total_steps // 50) if cfg.warmup_steps is None else cfg.warmup_steps
    return SimpleNamespace(stage1_sha=stage1_sha, mqvae=mqvae, tokenizer=tokenizer, classes=classes,
                           train_tokens=train_tokens, val_tokens=val_tokens,
                           global_batch=global_batch, steps_per_epoch=steps_per_epoch,
                           total_steps=total_steps, warmup_steps=warmup_steps)


def build_model(cfg: TrainConfig, d: SimpleNamespace, ckpt: Optional[dict], world: int, device,
                log) -> SimpleNamespace:
    """The Stackformer and its optimizer, restored from ckpt, then compiled and DDP-wrapped as the
    flags say: model is what the loop calls, raw_model the unwrapped module."""
    config = model_config(cfg, d.mqvae.config, d.classes, d.tokenizer)
    torch.manual_seed(cfg.seed)
    raw_model = Stackformer(config).to(device)
    optimizer = configure_optimizer(raw_model, cfg.lr, cfg.weight_decay, (0.9, 0.95), device.type)
    if ckpt is not None:
        raw_model.load_state_dict(ckpt["model"], strict=True)
        optimizer.load_state_dict(ckpt["optimizer"])
    model, mode = wrap_for_speed(raw_model, cfg, world, device, log)
    bf16 = device.type == "cuda" and cfg.dtype == "bf16"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else nullcontext()
    n = SimpleNamespace(config=config, raw_model=raw_model, model=model, optimizer=optimizer, compile_mode=mode,
                        graphed=mode == "reduce-overhead", autocast=autocast)

    def to_eager(failed: bool):
        """The compiled Stackformer back to the original (in place under DDP); after a failed attempt, its
        gradients cleared."""
        n.model = uncompile(n.model)
        n.graphed, n.compile_mode = False, None
        if failed:
            for p in raw_model.parameters():
                p.grad = None

    n.fallback = CompileFallback(mode is not None, to_eager, log, device,
                                 dist.new_group(backend="gloo") if world > 1 and mode is not None else None)
    return n


def report_evaluation(run: TrainingRun, n: SimpleNamespace, d: SimpleNamespace, cfg: TrainConfig,
                      step: int, rank: int):
    """The validation losses (every rank takes part); on rank 0 samples_<step>.png, a log line and
    a log.jsonl record."""
    run.check_finite(step)
    metrics = evaluate(n.raw_model, d.val_tokens, cfg, n.autocast, rank, run.world, run.device)
    if run.master:
        write_samples(n.raw_model, d.mqvae, d.val_tokens, cfg, n.autocast, step, run.device)
        run.log(f"eval step {step}: val code loss {metrics['val_code_loss']:.4f}, "
                f"pos loss {metrics['val_pos_loss']:.4f}")
        run.write_record(dict(step=step, **metrics))
    run.restart_timer(step)     # the evaluation's time is not training throughput


def checkpoint_state(cfg: TrainConfig, n: SimpleNamespace, d: SimpleNamespace, stage1: dict):
    """Everything but step and RNG states (TrainingRun.save adds them); it embeds the MQ-VAE, so
    sample.py rebuilds both models from this file alone."""
    return dict(kind="stackformer", stackformer_config=dataclasses.asdict(n.config),
                model=strip_compile_prefix(n.raw_model.state_dict()),
                mqvae_config=stage1["mqvae_config"], mqvae=stage1["mqvae"],
                tokenizer=d.tokenizer.to_dict() if d.tokenizer else None, classes=d.classes,
                image_size=d.mqvae.config.resolution, train_config=vars(cfg),
                optimizer=n.optimizer.state_dict(), stage1_sha256=d.stage1_sha)


def model_config(cfg: TrainConfig, mcfg, classes, tokenizer) -> StackformerConfig:
    """The Stackformer's configuration: the preset, the MQ-VAE's codebook and grid, the condition."""
    depths = {key: value for key, value in dict(n_code_layers=cfg.code_layers, n_pos_layers=cfg.pos_layers).items()
              if value is not None}
    return StackformerConfig(**{**PRESETS[cfg.preset], **depths}, codebook_size=mcfg.codebook_size,
                             num_positions=mcfg.num_tokens, seq_len=mcfg.seq_len, dropout=cfg.dropout,
                             cond=cfg.cond, num_classes=len(classes) if classes else 1000,
                             text_vocab_size=tokenizer.vocab_size if tokenizer else 0, abs_pos=cfg.abs_pos,
                             variant=cfg.variant, order=cfg.order, cond_drop=cfg.cond_drop)


def conditioning(cfg: TrainConfig, ckpt: Optional[dict], mcfg) -> tuple:
    """-> (WordTokenizer or None, class names or None) for --cond text / class. A new text run builds the
    tokenizer from the training captions; a resumed one takes the checkpoint's."""
    tokenizer, classes = None, None
    if cfg.cond == "text":
        if ckpt is not None:
            tokenizer = WordTokenizer.from_dict(ckpt["tokenizer"])
        else:
            train_images = data.first_images(data.build_dataset(cfg.data, cfg.data_dir, mcfg.resolution, "train"),
                                             cfg.train_images)
            if isinstance(train_images, data.ShapesDataset):
                texts = [train_images.caption(i) for i in range(len(train_images))]
            else:
                check(train_images.captions is not None,
                      f"--cond text needs captions; {cfg.data} has none (use --data coco with its captions JSON)")
                texts = [c for caps in train_images.captions for c in caps]
            tokenizer = WordTokenizer.build(texts, min_count=cfg.text_min_count)
    if cfg.cond == "class":
        probe = data.build_dataset(cfg.data, cfg.data_dir, mcfg.resolution, "val")
        classes = getattr(probe, "classes", None)
        check(classes is not None, f"--cond class needs labelled data: {cfg.data} has no classes "
                                   f"(ImageNet layout DIR/train/<class>/, or the shapes demo)")
    return tokenizer, classes


def compile_mode_for(mode: str, world: int) -> str:
    """--compile-mode auto: reduce-overhead on one GPU, where it replays forward and backward as CUDA graphs
    (at small batches a step is otherwise bound by the CPU launching ~2000 kernels, not by the GPU); the
    default mode under DDP, where reduce-overhead measured no faster (docs/speed.md)."""
    if mode == "auto":
        return "reduce-overhead" if world == 1 else "default"
    return mode


def wrap_for_speed(model: Stackformer, cfg: TrainConfig, world: int, device, log):
    """-> (the module the loop calls: compiled and/or DDP-wrapped as the flags say, the compile mode or None)."""
    mode = compile_mode_for(cfg.compile_mode, world) if cfg.compile and compiles_on(device) else None
    if mode is not None:
        model = compile_module(model, mode)
    if world > 1:
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
        if mode == "reduce-overhead":
            log("warning: under DDP, --compile-mode reduce-overhead measured no faster per GPU than the default mode "
                "(2 H200s, base, 10 sequences per GPU: 94k tok/s in all, against 141k on one GPU without DDP); "
                "a larger --batch-size per GPU scales better (docs/speed.md)")
    return model, mode


def describe_run(cfg: TrainConfig, n: SimpleNamespace, d: SimpleNamespace):
    """Rank 0: write config.json and print what will run."""
    scfg, model, train_tokens, global_batch = n.config, n.raw_model, d.train_tokens, d.global_batch
    os.makedirs(cfg.out_dir, exist_ok=True)
    write_json(os.path.join(cfg.out_dir, "config.json"), dict(train=vars(cfg), model=dataclasses.asdict(scfg)))
    print(json.dumps(vars(cfg)))
    print(f"Stackformer {cfg.preset}: {model.num_params() / 1e6:.2f}M parameters "
          f"({scfg.n_code_layers} code + {scfg.n_pos_layers} position layers, width {scfg.n_embd}, "
          f"{scfg.n_head} heads; {cfg.variant}, {cfg.order} order, abs pos {'on' if cfg.abs_pos else 'off'}, "
          f"cond {cfg.cond}" + (f", {cfg.cond_drop:.0%} of them dropped for guidance" if cfg.cond_drop else "") + ")")
    print(f"stage 1 {cfg.stage1}: V={scfg.codebook_size} codes, T={scfg.num_positions} positions, "
          f"N={scfg.seq_len} pairs per image")
    print(f"tokens: {train_tokens.num_images} train images ({len(train_tokens)} sequences: {train_tokens.copies} per "
          f"image, its views and their mirror images) / "
          f"{len(d.val_tokens)} val; global batch {global_batch} ({global_batch * scfg.seq_len} "
          f"tokens); {d.steps_per_epoch} steps/epoch, {d.total_steps} steps, peak lr {cfg.lr:g}, "
          f"warmup {d.warmup_steps}")
    print(f"torch.compile: {n.compile_mode} mode" if n.compile_mode else
          "torch.compile off: " + ("--no-compile" if not cfg.compile else "eager on the CPU (it compiles on CUDA only)"))


def log_training(run: TrainingRun, means: torch.Tensor, done: int, lr: float, tokens_per_step: int,
                 flops_per_step: float, steps_per_epoch: int):
    """Mean losses since the last log line (averaged over ranks), tokens/s, MFU and ETA."""
    run.check_finite(done)
    if run.world > 1:
        dist.all_reduce(means)
        means /= run.world
    if run.device.type == "cuda":
        torch.cuda.synchronize()
    steps, elapsed, eta = run.interval(done)
    tokens_per_s = tokens_per_step * steps / elapsed if steps else None      # None: the step compiled
    mfu = flops_per_step * steps / elapsed / (run.cfg.peak_tflops * 1e12 * run.world) if steps else None
    loss, code, pos = means.tolist()
    record = dict(step=done, epoch=round(done / steps_per_epoch, 4), lr=lr, loss=loss, code_loss=code,
                  pos_loss=pos, tokens_per_s=tokens_per_s, mfu=mfu, eta_s=eta)
    run.log(f"step {done}/{run.total_steps} ep {record['epoch']:.2f} | loss {loss:.4f} code {code:.4f} "
            f"pos {pos:.4f} | lr {lr:.2e} | " + (f"{tokens_per_s / 1e3:.1f}k tok/s, MFU {mfu:.1%} | ETA {eta / 60:.1f} min"
                                                 if steps else "speed and ETA from the next line"))
    run.write_record(record)


@torch.no_grad()
def evaluate(model: Stackformer, val_tokens, cfg: TrainConfig, autocast, rank: int, world: int, device) -> dict:
    """Mean CE_code and CE_pos over --eval-batches validation batches; each rank takes its share."""
    model.eval()
    gen = torch.Generator().manual_seed(1234)
    sums = torch.zeros(3, device=device)
    rows_all = np.arange(len(val_tokens))
    for b in range(cfg.eval_batches):
        rows = rows_all[(b * world + rank) * cfg.batch_size:(b * world + rank + 1) * cfg.batch_size]
        if len(rows) == 0:
            break
        codes, positions, labels, captions = (t.to(device) if t is not None else None
                                              for t in val_tokens.batch(rows, gen))
        with autocast:
            _, code_ce, pos_ce = model.loss(codes, positions, condition(cfg.cond, labels, captions))
        sums += torch.stack([code_ce.float() * len(rows), pos_ce.float() * len(rows),
                             torch.tensor(float(len(rows)), device=device)])
    if world > 1:
        dist.all_reduce(sums)
    model.train()
    return dict(val_code_loss=(sums[0] / sums[2]).item(), val_pos_loss=(sums[1] / sums[2]).item())


@torch.no_grad()
def write_samples(model: Stackformer, mqvae, val_tokens, cfg: TrainConfig, autocast, step: int, device):
    """samples_<step>.png: --num-samples images from the fast sampler, seeded with --seed (classes 0, 1, ...;
    captions of the first validation images)."""
    import fast_sampling    # here: it imports Triton, ~0.3 s at every start of the script otherwise
    n = cfg.num_samples
    cond = None
    if cfg.cond == "class":
        cond = torch.arange(n, device=device) % model.config.num_classes
    elif cfg.cond == "text":
        cond = val_tokens.batch(np.arange(n) % len(val_tokens), torch.Generator().manual_seed(1234))[3].to(device)
    with autocast:
        codes, positions = fast_sampling.generate(model, batch_size=n, cond=cond,
                                                  generator=torch.Generator(device=device).manual_seed(cfg.seed))
        images = mqvae.decode(codes, positions)
    save_grid((images.float().clamp(-1, 1) + 1) / 2, os.path.join(cfg.out_dir, f"samples_{step:07d}.png"),
              nrow=int(n ** 0.5 + 0.999))
    model.train()


if __name__ == "__main__":
    run_main(main)
