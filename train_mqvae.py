"""
Train the MQ-VAE (stage 1): VQGAN's losses and nothing special for the mask (supplementary §1).

    L_AE = L_rec + λ·L_G + w·L_commit        w = --codebook-weight: the commitment weight in effect is w·β
                                             (1.0 × 0.25 = 0.25; the demo's 0.1 × 0.25 = 0.025)
    L_rec    = |x - x̃|₁ (official code; --rec-loss l2 is the supplementary's ||x - x̃||²) + 1.0·LPIPS(x, x̃)
    L_commit = β·||Ẑ - sg(Ẑ^q)||², β = 0.25  (plus the codebook loss with --codebook grad); by default taken
                                             on sg(s)·u, so the mask learns from L_rec alone (--commit-through-score)
    L_G      = -mean D(x̃)                    hinge GAN, PatchGAN discriminator D
    λ        = min(0.75 · ||∇_W L_rec|| / (||∇_W L_G|| + 1e-4), 1.0), W = the decoder's last layer
    L_D      = ½·[mean ReLU(1 - D(x)) + mean ReLU(1 + D(x̃))]

Adam(0.5, 0.9) for both networks, lr = 4.5e-6 × global batch, linear warmup (FFHQ 5 epochs,
ImageNet 0.5) then cosine. bf16 autocast + TF32 on CUDA, DDP through torchrun.

    python train_mqvae.py                                     # demo: built-in shapes, ~5 min on 2 CPU cores
    python train_mqvae.py --data ffhq --data-dir data/ffhq    # one GPU
    torchrun --standalone --nproc_per_node=8 train_mqvae.py --data ffhq
    torchrun --nnodes=2 --nproc_per_node=8 --node_rank=0 --master_addr=HOST --master_port=29500 \
        train_mqvae.py --data imagenet                        # multi-node: run on each node with its rank
    python train_mqvae.py --data ffhq --resume                # continue out/mqvae-ffhq/ckpt.pt exactly

    python train_mqvae.py --analyse out/mqvae-ffhq/ckpt.pt   # only measure a checkpoint's mask

Outputs in --out-dir: config.json, log.jsonl (one JSON line per log step and per evaluation),
recon_<step>.png (input | importance map | kept regions | reconstruction), ckpt.pt. Every evaluation
also measures where the mask keeps (mask_statistics): its correlation with pixel detail and feature
magnitude, and on the shapes data the share of kept tokens on the shapes; it warns when the map looks
inverted.
"""

import dataclasses
import json
import os
import socket
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader

import data
from mqvae import MQVAE, MQVAEConfig, PRESETS, PatchDiscriminator
from utils import (COMPILE_MODES, CompileFallback, TrainingRun, UserError, atomic_path, barrier, check,
                   check_identical_across_ranks, check_positive, compile_module, compiles_on, default_workers, fill_defaults, ignore_interrupts, launch, load_checkpoint, mqvae_from_checkpoint, resume_from, run_main,
                   save_grid, uncompile, seed_or_restore_rng, strip_compile_prefix, warmup_cosine_lr, write_json)


# -----------------------------------------------------------------------------
# Configuration: every default in one place. None means "chosen from --data" (see DATA_DEFAULTS).

@dataclass
class TrainConfig:
    # data
    data: str = "shapes"                  # shapes | ffhq | imagenet | coco | PATH to a folder of images
    data_dir: Optional[str] = None        # root of ffhq/imagenet/coco (default data/<name>)
    image_size: Optional[int] = None      # 256 for real data, 32 for the shapes demo
    train_images: Optional[int] = None    # train on the first N training images only (default: all)
    num_workers: Optional[int] = None     # data loader processes per GPU (8, at most the CPU cores; 0 for shapes, drawn in-process)
    # model
    preset: Optional[str] = None          # f8 | f16 | f32 | demo | tiny (f8 for real data, demo for shapes)
    keep_ratio: Optional[float] = None    # k; the mask ratio is 1 - k (N = int(k·H·W) codes per image); 0.25 (1 for masker none)
    masker: str = "adaptive"              # adaptive | random (ablation) | none (the VQGAN baseline: every token quantized, no mask, no de-mask)
    codebook: str = "ema"                 # ema (official) | grad (VQ-VAE codebook loss)
    codebook_size: Optional[int] = None   # V (preset default: 1024)
    codebook_dim: Optional[int] = None    # D (preset default: 256)
    demask_attn: str = "soft"             # soft (official) | hard (Fig. 2c)
    # losses
    rec_loss: str = "l1"                  # l1 (official) | l2 (supplementary)
    perceptual_weight: Optional[float] = None  # LPIPS weight (1.0; 0 for the shapes demo)
    codebook_weight: Optional[float] = None  # w: multiplies L_commit = β·||Ẑ - sg(Ẑ^q)||² (β = 0.25 in the quantizer), so the commitment weight in effect is w × 0.25 (1.0; 0.1 for the shapes demo, in effect 0.025)
    commit_through_score: bool = False    # L_commit on s·u (official); off: on sg(s)·u (docs/findings.md)
    disc_weight: float = 0.75             # 0.75 × adaptive λ
    disc_weight_max: float = 1.0          # cap on λ (official code)
    disc_start: Optional[int] = None      # step at which the GAN terms switch on (0; later for the demo)
    disc_layers: int = 3                  # PatchGAN depth (3: 70x70 patches)
    lpips_vgg: Optional[str] = None       # path of torchvision's vgg16-397923af.pth (default: torch hub cache)
    # optimisation
    batch_size: Optional[int] = None      # per GPU (8; 16 for the demo)
    grad_accum: int = 1                   # micro-batches per optimizer step
    base_lr: float = 4.5e-6               # lr = base_lr × global batch (batch × GPUs × accumulation)
    lr: Optional[float] = None            # set to override the scaled lr (the demo: 3e-4)
    min_lr: float = 0.0                   # end of the cosine
    warmup_epochs: Optional[float] = None # ffhq 5, imagenet 0.5
    epochs: Optional[float] = None        # ffhq 150, imagenet 50
    max_steps: Optional[int] = None       # overrides epochs
    stop_after: Optional[int] = None      # leave (with a checkpoint) after this many steps in this run; for time-limited jobs
    # run
    out_dir: Optional[str] = None         # default out/mqvae-<data>
    seed: int = 2021                      # model init and data order
    dtype: str = "bf16"                   # bf16 | fp32 (autocast dtype on CUDA; CPU runs fp32)
    compile: bool = True                  # torch.compile encoder, de-mask, decoder and discriminator on CUDA (the first step compiles; CPU runs stay eager); --no-compile: eager
    compile_mode: str = "auto"            # auto (= reduce-overhead: encoder, de-mask, decoder as CUDA graphs) | default | reduce-overhead | max-autotune
    channels_last: bool = False           # NHWC memory layout for the convolutional networks (CUDA)
    log_every: int = 50                   # steps between log lines (also one after the first step and at least every 30 s)
    eval_every: Optional[int] = None      # steps between evaluations (default 2000; demo 250)
    eval_images: Optional[int] = None     # validation images per evaluation (1000; 256 for the demo)
    ckpt_every: int = 1000                # steps between checkpoints (also written at the end and on SIGINT/SIGTERM)
    ckpt_minutes: float = 30.0            # also checkpoint when this many minutes have passed since the last one
    usage_window: int = 100               # codebook usage = distinct codes over the last this many steps
    resume: bool = False                  # continue from out_dir/ckpt.pt
    overwrite: bool = False               # start over in an --out-dir that holds a checkpoint (replaces it and its log)
    analyse: Optional[str] = None         # only measure this checkpoint's mask on the validation split: mask_analysis.json/.png
    save_images: bool = False             # with --analyse: also write inputs.npz and reconstructions.npz (uint8) of those images; rFID = python fid.py inputs.npz reconstructions.npz


DATA_DEFAULTS = {
    # The demo: minutes on a CPU. LPIPS needs downloaded VGG weights, so it is off. --codebook-weight 0.1 (times
    # the quantizer's β = 0.25: a commitment weight of 0.025 in effect) and lr 3e-4: with the official 1.0, or
    # at lr 1e-3, the short runs' masks drifted off the shapes in most seeds; with these, 3 of 3 seeds kept them
    # (docs/findings.md has the table).
    "shapes":   dict(image_size=32, preset="demo", batch_size=16, perceptual_weight=0.0, codebook_weight=0.1,
                     disc_start=1000, warmup_epochs=0.02, epochs=1.0, eval_every=250, eval_images=256, lr=3e-4,
                     num_workers=0),
    "ffhq":     dict(warmup_epochs=5.0, epochs=150.0),
    "imagenet": dict(warmup_epochs=0.5, epochs=50.0),
    "coco":     dict(warmup_epochs=0.5, epochs=50.0),
    "folder":   dict(warmup_epochs=1.0, epochs=100.0),
}
COMMON_DEFAULTS = dict(image_size=256, preset="f8", batch_size=8, perceptual_weight=1.0, codebook_weight=1.0,
                       disc_start=0, eval_every=2000, eval_images=1000, num_workers=default_workers(8))

# Flags that may change when resuming; the others (model, data, optimiser) come from the checkpoint.
RUN_CONTROL = {"max_steps", "stop_after", "epochs", "num_workers", "log_every", "eval_every", "eval_images", "ckpt_every",
               "ckpt_minutes", "compile", "compile_mode", "channels_last", "usage_window", "resume", "data_dir",
               "lpips_vgg", "out_dir"}

def resolve_defaults(cfg: TrainConfig) -> TrainConfig:
    kind = cfg.data if cfg.data in DATA_DEFAULTS else "folder"
    keep_ratio = 1.0 if cfg.masker == "none" else 0.25
    return fill_defaults(cfg, {**COMMON_DEFAULTS, **DATA_DEFAULTS[kind], "keep_ratio": keep_ratio}, "mqvae")


def validate(cfg: TrainConfig):
    check(cfg.preset in PRESETS, f"unknown preset {cfg.preset!r}: choose one of {', '.join(PRESETS)}")
    check_positive(cfg, "image_size", "train_images", "batch_size", "grad_accum", "max_steps", "epochs", "log_every",
                   "eval_every", "ckpt_every", "eval_images", "usage_window")
    check(cfg.rec_loss in ("l1", "l2"), f"--rec-loss must be l1 or l2, got {cfg.rec_loss!r}")
    check(cfg.dtype in ("bf16", "fp32"), f"--dtype must be bf16 or fp32, got {cfg.dtype!r}")
    check(cfg.compile_mode in COMPILE_MODES, f"--compile-mode must be one of {', '.join(COMPILE_MODES)}, got {cfg.compile_mode!r}")
    check(cfg.perceptual_weight >= 0 and cfg.disc_weight >= 0, "loss weights must be non-negative")
    check(cfg.num_workers >= 0, f"--num-workers must be >= 0, got {cfg.num_workers}")
    check(cfg.ckpt_minutes > 0, f"--ckpt-minutes must be positive, got {cfg.ckpt_minutes}")
    check(cfg.disc_layers >= 1, f"--disc-layers must be >= 1, got {cfg.disc_layers}")
    min_size = 2 ** cfg.disc_layers * 3  # the last two 4x4 convs need a map of at least 3x3 after the strided ones
    check(cfg.disc_weight == 0 or cfg.image_size >= min_size,
          f"a {cfg.disc_layers}-layer discriminator needs images of at least {min_size}px; "
          f"lower --disc-layers or use --disc-weight 0")


def model_config(cfg: TrainConfig) -> MQVAEConfig:
    overrides = {k: v for k, v in dict(codebook_size=cfg.codebook_size, codebook_dim=cfg.codebook_dim).items()
                 if v is not None}
    try:
        return MQVAEConfig(**{**PRESETS[cfg.preset], **overrides}, resolution=cfg.image_size,
                           keep_ratio=cfg.keep_ratio, masker=cfg.masker, codebook=cfg.codebook,
                           demask_attn=cfg.demask_attn, commit_through_score=cfg.commit_through_score)
    except ValueError as e:     # the model's own checks (keep ratio, image size vs f, ...)
        raise UserError(str(e)) from None


def compile_mode_for(mode: str, world: int) -> str:
    """--compile-mode auto: reduce-overhead, on one GPU and under DDP. At batch 8 the de-mask stack's small
    kernels otherwise leave the GPU waiting for the CPU to launch them (docs/speed.md)."""
    return "reduce-overhead" if mode == "auto" else mode


def compile_for_training(model: MQVAE, disc: Optional[PatchDiscriminator] = None, mode: str = "default"):
    """torch.compile the convolutional parts in place (mode: torch.compile's), so that utils.uncompile can
    put the originals back. The decoder's last conv stays eager: the adaptive GAN weight takes two gradients
    at its weight every step, and through a compiled region each of those would run the whole decoder
    backward instead of one conv's. D gets the default mode: it is differentiated twice per step (λ, then
    its own loss)."""
    model.encoder = compile_module(model.encoder, mode)
    middle = "decoder_input" if model.config.masker == "none" else "demask"     # what feeds the decoder
    setattr(model, middle, compile_module(getattr(model, middle), mode))
    model.decoder.features = compile_module(model.decoder.features, mode)
    if disc is not None:
        disc.main = compile_module(disc.main, "default")


# -----------------------------------------------------------------------------
# LPIPS with the VGG16 trunk loaded from torchvision's file and the linear head loaded strictly

VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"


def default_vgg_path() -> str:
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(VGG16_URL))


def fetch_vgg16(path: str):
    """Download torchvision's VGG16 weights to `path` when the network allows; else a clear error."""
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        previous = socket.getdefaulttimeout()
        socket.setdefaulttimeout(20)
        try:
            with atomic_path(path) as tmp:
                torch.hub.download_url_to_file(VGG16_URL, tmp, progress=False)
        finally:
            socket.setdefaulttimeout(previous)
    except Exception as e:
        raise UserError(f"LPIPS needs torchvision's VGG16 weights and they could not be downloaded "
                        f"({type(e).__name__}). Put {os.path.basename(VGG16_URL)} (from {VGG16_URL}) in "
                        f"{os.path.dirname(path)}/, or pass --lpips-vgg PATH, or train with --perceptual-weight 0") from None


def build_lpips(vgg_path: Optional[str] = None):
    """lpips.LPIPS (VGG) in eval mode, frozen. Both parts are loaded strictly: the lpips package's
    own loader uses strict=False, and a silently random head is how several VQGAN clones trained."""
    import lpips
    if vgg_path is None:
        vgg_path = default_vgg_path()
        if not os.path.isfile(vgg_path):
            fetch_vgg16(vgg_path)
    elif not os.path.isfile(vgg_path):
        raise UserError(f"--lpips-vgg file not found: {vgg_path}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = lpips.LPIPS(net="vgg", pretrained=False, pnet_rand=True, verbose=False)
    try:
        vgg = torch.load(vgg_path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"cannot read VGG16 weights {vgg_path}: {type(e).__name__}") from None
    head_path = os.path.join(os.path.dirname(lpips.__file__), "weights", "v0.1", "vgg.pth")
    head = torch.load(head_path, map_location="cpu", weights_only=True)
    state = {k: v for k, v in model.state_dict().items() if k.startswith("scaling_layer.")}  # constants
    for key in model.state_dict():
        if key.startswith("net."):  # lpips keeps torchvision's layer indices: net.slice2.5.weight = features.5.weight
            source = "features." + key.split(".", 2)[2]
            if source not in vgg:
                raise UserError(f"{vgg_path} is not torchvision's VGG16 state dict (missing {source})")
            state[key] = vgg[source]
    state.update(head)
    for key in model.state_dict():  # `lins` is a ModuleList aliasing lin0..lin4: same tensors, second name
        if key.startswith("lins."):
            _, index, rest = key.split(".", 2)
            if f"lin{index}.{rest}" in head:
                state[key] = head[f"lin{index}.{rest}"]
    missing, unexpected = set(model.state_dict()) - set(state), set(state) - set(model.state_dict())
    if missing or unexpected:
        raise UserError(f"LPIPS weights do not match: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
    model.load_state_dict(state, strict=True)
    return model.eval().requires_grad_(False)


# -----------------------------------------------------------------------------
# Losses

def hinge_d_loss(logits_real, logits_fake):
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def adaptive_gan_weight(grad_rec, grad_gan, disc_weight: float, max_weight: float):
    """VQGAN's λ = ||∇_W L_rec|| / (||∇_W L_G|| + 1e-4), clamped to [0, 1e4], × disc_weight, then capped
    (official code) — balancing the two terms at the decoder's last layer W, where both act directly."""
    weight = torch.linalg.vector_norm(grad_rec) / (torch.linalg.vector_norm(grad_gan) + 1e-4)
    return (weight.clamp(0.0, 1e4) * disc_weight).clamp(max=max_weight).detach()


def ddp_discriminator(disc, device_ids):
    """D under DDP without buffer broadcasts. D is always in training mode, so its BatchNorm running
    statistics are never used; not broadcasting them also lets D run twice (real, fake) before one
    backward. torch ≥ 2.14 calls the flag deprecated but says to keep it for exactly this use (rank-local
    buffers) until its replacement exists, so that warning is silenced here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*broadcast_buffers.*", category=FutureWarning)
        return DDP(disc, device_ids=device_ids, broadcast_buffers=False)


def losses_and_backward(model, disc, raw_model, raw_disc, lpips_fn, x, cfg, gan_on: bool, autocast) -> dict:
    """One micro-batch: the autoencoder's losses and backward, then the discriminator's, on the same
    reconstruction (the official code re-runs the whole autoencoder for the discriminator step).
    Gradients are scaled by 1/grad_accum. Returns detached loss terms and the model's aux outputs."""
    zero = torch.zeros((), device=x.device)
    with autocast:
        x_rec, aux = model(x)
    x_rec = x_rec.float()
    rec = (x - x_rec).abs().mean() if cfg.rec_loss == "l1" else (x - x_rec).pow(2).mean()
    with autocast:
        perceptual = lpips_fn(x, x_rec).mean().float() if lpips_fn is not None else zero
        # the generator's view of D: the unwrapped module, so this pass is invisible to D's DDP
        logits_fake_g = raw_disc(x_rec).float() if gan_on else None
    loss_rec = rec + cfg.perceptual_weight * perceptual
    commit = aux["commit_loss"] * cfg.codebook_weight
    if gan_on:
        g_loss = -logits_fake_g.mean()
        # λ needs ∇_W L_rec and ∇_W L_G at the decoder's last layer W. Take both gradients with respect
        # to x̃ first (the backward through LPIPS and D that the update needs anyway), push each through
        # the last conv alone for λ, then run ONE backward of the whole autoencoder with
        # ∂L_AE/∂x̃ = ∂L_rec/∂x̃ + λ·∂L_G/∂x̃. Same gradients as backpropagating L_rec + λ·L_G + L_commit,
        # without a second pass through LPIPS and D.
        grad_rec, = torch.autograd.grad(loss_rec, x_rec, retain_graph=True)
        grad_g, = torch.autograd.grad(g_loss, x_rec, retain_graph=True)
        last = raw_model.last_layer()
        w_rec, = torch.autograd.grad(x_rec, last, grad_outputs=grad_rec, retain_graph=True)
        w_g, = torch.autograd.grad(x_rec, last, grad_outputs=grad_g, retain_graph=True)
        gan_weight = adaptive_gan_weight(w_rec, w_g, cfg.disc_weight, cfg.disc_weight_max)
        torch.autograd.backward([x_rec, commit], [(grad_rec + gan_weight * grad_g) / cfg.grad_accum,
                                                  torch.full_like(commit, 1.0 / cfg.grad_accum)])
    else:
        g_loss, gan_weight = zero, zero
        ((loss_rec + commit) / cfg.grad_accum).backward()
    loss = loss_rec + gan_weight * g_loss + commit
    if gan_on:
        with autocast:
            logits_real = disc(x).float()
            logits_fake = disc(x_rec.detach()).float()
        d_loss = hinge_d_loss(logits_real, logits_fake)
        (d_loss / cfg.grad_accum).backward()
        real_mean, fake_mean = logits_real.detach().mean(), logits_fake.detach().mean()
    else:
        d_loss, real_mean, fake_mean = zero, zero, zero
    return dict(loss=loss.detach(), rec=rec.detach(), lpips=perceptual.detach(), commit=commit.detach(),
                g_loss=g_loss.detach(), d_loss=d_loss.detach(), gan_weight=gan_weight, logits_real=real_mean,
                logits_fake=fake_mean, aux=aux)


def forward_backward(n: SimpleNamespace, xs: list, cfg, gan_on: bool, world: int) -> list:
    """losses_and_backward over a step's micro-batches xs; DDP all-reduces gradients on the last one only.
    -> each micro-batch's outputs."""
    outs = []
    for micro, x in enumerate(xs):
        sync = world == 1 or micro == len(xs) - 1
        if n.graphed:
            torch.compiler.cudagraph_mark_step_begin()  # the last replay's outputs are no longer read
        with (nullcontext() if sync else n.model.no_sync()), (nullcontext() if sync else n.disc.no_sync()):
            outs.append(losses_and_backward(n.model, n.disc, n.raw_model, n.raw_disc, n.lpips_fn, x, cfg, gan_on,
                                            n.autocast))
    return outs


def update(n: SimpleNamespace, gan_on: bool):
    """The end of a training step, after its micro-batches: the autoencoder's update, the codebook's
    EMA step (once per step, whatever the accumulation) and, with the GAN on, the discriminator's."""
    n.opt_ae.step()
    n.opt_ae.zero_grad(set_to_none=True)
    n.raw_model.quantizer.ema_step()
    if gan_on:
        n.opt_d.step()
        n.opt_d.zero_grad(set_to_none=True)


# -----------------------------------------------------------------------------
# Pictures: input | importance map | kept regions | reconstruction

def heat_colormap(t):
    """t (B,1,H,W) in [0,1] -> (B,3,H,W) in [0,1], blue (low) to red (high), like 'jet'."""
    return torch.cat([(1.5 - (4 * t - c).abs()).clamp(0, 1) for c in (3.0, 2.0, 1.0)], dim=1)


def visualisation_grid(x, x_rec, scores, positions):
    """One row per image, as the supplementary's Figures 6-7. All tensors on CPU, images in [-1,1]."""
    B, _, S, _ = x.shape
    Hs, Ws = scores.shape[1:]
    flat = scores.flatten(1)
    lo, hi = flat.min(1, keepdim=True).values, flat.max(1, keepdim=True).values
    norm = ((flat - lo) / (hi - lo + 1e-8)).view(B, 1, Hs, Ws)
    heat = F.interpolate(heat_colormap(norm), size=(S, S), mode="nearest")
    kept = torch.zeros(B, Hs * Ws).scatter(1, positions, 1.0).view(B, 1, Hs, Ws)
    kept = F.interpolate(kept, size=(S, S), mode="nearest")
    image = (x.clamp(-1, 1) + 1) / 2
    kept_view = image * kept + (0.25 + 0.25 * image) * (1 - kept) * 0.6  # masked regions dimmed
    recon = (x_rec.clamp(-1, 1) + 1) / 2
    return torch.stack([image, heat, kept_view, recon], dim=1).flatten(0, 1)  # (B·4,3,S,S)


# -----------------------------------------------------------------------------
# Evaluation

@torch.no_grad()
def evaluate(model, val_set, cfg, device, autocast, lpips_fn, rank, world, graphed=False, keep_images=None):
    """Mean L1, PSNR (on [0,1] images) and LPIPS over the first --eval-images validation images, the
    number of distinct codes they use, and how the importance map relates to the images (mask_statistics;
    not for the VQGAN baseline, which keeps every token). Each rank takes a shard; sums are all-reduced,
    per-token arrays gathered. keep_images: a list that receives (inputs, reconstructions) as uint8
    (B, H, W, 3) arrays, batch by batch (this rank's shard). -> (metrics, picture)."""
    model.eval()
    n = min(cfg.eval_images, len(val_set))
    indices = list(range(rank, n, world))
    loader = DataLoader(torch.utils.data.Subset(val_set, indices), batch_size=cfg.batch_size,
                        num_workers=cfg.num_workers, pin_memory=device.type == "cuda", worker_init_fn=ignore_interrupts,
                        generator=torch.Generator())
    V, f = model.config.codebook_size, model.config.downsample_factor
    sums = torch.zeros(5, device=device)  # l1, psnr, lpips, count, skipped
    used = torch.zeros(V, device=device)
    tokens = {k: [] for k in ("scores", "kept", "feature_norms", "detail", "objects")}   # per token, (B, T) each
    shown = []
    unreadable = data.UnreadableFiles(val_set, len(indices), "validation")
    for batch in loader:
        keep = unreadable.note(batch["bad"])        # a replaced item would count its neighbour twice
        if not keep.any():
            continue
        batch = {k: v[keep] for k, v in batch.items()}
        x = batch["image"].to(device, non_blocking=True)
        if graphed:
            torch.compiler.cudagraph_mark_step_begin()
        with autocast:
            x_rec, aux = model(x)
        x_rec = x_rec.float()
        l1 = (x - x_rec).abs().flatten(1).mean(1)
        mse = ((x.clamp(-1, 1) - x_rec.clamp(-1, 1)) / 2).pow(2).flatten(1).mean(1)
        psnr = 10 * torch.log10(1.0 / mse.clamp_min(1e-10))
        lp = lpips_fn(x, x_rec).flatten() if lpips_fn is not None else torch.zeros_like(l1)
        sums[:4] += torch.stack([l1.sum(), psnr.sum(), lp.float().sum(), torch.tensor(float(len(x)), device=device)])
        used.index_fill_(0, aux["codes"].flatten(), 1.0)
        scores = aux["scores"].float().flatten(1)                                           # (B, T)
        tokens["scores"].append(scores)
        tokens["kept"].append(torch.zeros_like(scores).scatter_(1, aux["positions"], 1.0))
        tokens["feature_norms"].append(aux["feature_norms"].flatten(1))
        tokens["detail"].append(F.unfold(x, f, stride=f).std(dim=1))                         # pixel std per patch
        if "objects" in batch:
            tokens["objects"].append(F.avg_pool2d(batch["objects"].to(device), f).flatten(1))   # coverage per patch
        if keep_images is not None:
            keep_images.append((data.to_uint8(x).cpu().numpy(), data.to_uint8(x_rec).cpu().numpy()))
        if len(shown) < 8:  # the first 8 images go into the picture
            shown.append((x.cpu(), x_rec.cpu(), aux["scores"].float().cpu(), aux["positions"].cpu()))
    tokens = {k: torch.cat(v).cpu().numpy() for k, v in tokens.items() if v}
    sums[4] = len(unreadable.seen)
    if world > 1:
        dist.all_reduce(sums)
        dist.all_reduce(used, op=dist.ReduceOp.MAX)
        shards = [None] * world
        dist.all_gather_object(shards, tokens)
        tokens = {k: np.concatenate([shard[k] for shard in shards if k in shard]) for k in tokens}
    model.train()
    count = max(sums[3].item(), 1.0)
    metrics = dict(val_l1=sums[0].item() / count, val_psnr=sums[1].item() / count,
                   val_codes_used=int(used.sum().item()), val_images=int(sums[3].item()))
    if sums[4] > 0:
        metrics["val_skipped"] = int(sums[4].item())      # unreadable validation files left out
    if lpips_fn is not None:
        metrics["val_lpips"] = sums[2].item() / count
    if "scores" in tokens and model.config.masker != "none":
        metrics.update(mask_statistics(**tokens))
    picture = [torch.cat(parts)[:8] for parts in zip(*shown)] if shown else None
    return metrics, picture


def mask_statistics(scores, kept, feature_norms, detail, objects=None) -> dict:
    """How the importance map relates to the images; per-token arrays (images, T).

    mask_r_detail, mask_p_detail: Pearson r and p between the score and the std of the pixels of the
        token's patch (its detail). A map that keeps what matters correlates positively; clearly
        negative means it keeps flat regions (see inversion_warning).
    mask_r_feature, mask_p_feature: the same with the encoded feature magnitude ‖Ẑ_i‖ (supp. Fig. 5).
    With objects (the fraction of each token's patch that objects cover; the shapes data knows it),
    a token is on an object when that fraction is at least 1/2, and:
    mask_on_objects: the share of kept tokens on objects; mask_chance: the share of all tokens on
        objects, what a random mask keeps; mask_lift: their ratio (1 = no better than random);
    mask_auroc: the AUROC of the score for object against background tokens, the mean over images
        that have both (0.5 = chance, 1 = every object token scores above every background token).
    """
    import scipy.stats      # here, not at the top: it adds half a second to every start of the script
    metrics = {}
    if scores.std() > 0:     # the random-mask ablation scores every token 1: no correlation to speak of
        for name, values in (("detail", detail), ("feature", feature_norms)):
            r, p = scipy.stats.pearsonr(scores.ravel(), values.ravel())
            metrics[f"mask_r_{name}"], metrics[f"mask_p_{name}"] = float(r), float(p)
    if objects is not None:
        on = objects >= 0.5
        metrics["mask_on_objects"] = float((kept * on).sum() / max(kept.sum(), 1))
        metrics["mask_chance"] = float(on.mean())
        metrics["mask_lift"] = metrics["mask_on_objects"] / max(metrics["mask_chance"], 1e-12)
        n_on = on.sum(1)
        both = (n_on > 0) & (n_on < on.shape[1])
        if both.any():
            ranks = scipy.stats.rankdata(scores[both], axis=1)                   # ties share their mean rank
            n_pos, n_neg = n_on[both], on.shape[1] - n_on[both]
            auroc = ((ranks * on[both]).sum(1) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
            metrics["mask_auroc"] = float(auroc.mean())
    return metrics


def mask_summary(metrics: dict) -> Optional[str]:
    """One line: where the kept tokens sit, for the log and the end of a run."""
    parts = []
    if "mask_lift" in metrics:
        parts.append(f"{metrics['mask_on_objects']:.0%} of kept tokens on objects (chance {metrics['mask_chance']:.0%}), "
                     f"lift {metrics['mask_lift']:.2f}" + (f", AUROC {metrics['mask_auroc']:.2f}" if "mask_auroc" in metrics else ""))
    if "mask_r_detail" in metrics:
        parts.append(f"score vs pixel detail r = {metrics['mask_r_detail']:.2f}, vs feature magnitude "
                     f"r = {metrics['mask_r_feature']:.2f}")
    return "mask: " + "; ".join(parts) if parts else None


def inversion_warning(metrics: dict, commit_through_score: bool, codebook_weight: Optional[float] = None,
                      beta: float = 0.25) -> Optional[str]:
    """A warning when the importance map is clearly anti-correlated with pixel detail: it keeps flat regions.
    It names what moved the map in docs/findings.md: the commitment weight (this run's, where known), the
    learning rate and, only where this run takes it (commit_through_score), the commitment path."""
    r, p = metrics.get("mask_r_detail"), metrics.get("mask_p_detail")
    if r is None or not (r < -0.1 and p < 1e-3):
        return None
    weight = (f"here --codebook-weight {codebook_weight:g} × β {beta:g} = {codebook_weight * beta:g}; "
              if codebook_weight is not None else "--codebook-weight; ")
    path = ("; and this run takes L_commit through the scores (the official term), which kept the background in "
            "6 of 12 runs there: train with --no-commit-through-score" if commit_through_score else "")
    return (f"warning: the importance map looks inverted: its correlation with pixel detail is r = {r:.2f} "
            f"(p = {p:.1g}), so the mask keeps flat regions and drops detailed ones. What moved the map in "
            f"docs/findings.md: the commitment weight ({weight}0.1 kept the shapes in every short demo run, 1.0 "
            f"not always) and the learning rate (--lr; 3e-4 held maps that drifted at 1e-3){path}")


# -----------------------------------------------------------------------------
# Training

def main(argv=None):
    return launch(TrainConfig, train, __doc__.split("\n\n")[0].strip(), argv)


def train(cfg: TrainConfig, explicit: set, rank: int, world: int, device: torch.device):
    log = print if rank == 0 else (lambda *a, **k: None)
    if cfg.analyse:
        return analyse_checkpoint(cfg, explicit, rank, world, device)
    cfg = resolve_defaults(cfg)
    ckpt_path, ckpt, cfg = resume_from(cfg, "mqvae", explicit, RUN_CONTROL, log)
    validate(cfg)
    mcfg = model_config(cfg)
    d = build_data(cfg, rank, world, device)
    n = build_networks(cfg, mcfg, d.peak_lr, ckpt, rank, world, device)
    # per-rank randomness (random masker) from here on
    start_step = seed_or_restore_rng(ckpt, cfg.seed, rank, world, device, log, "the global batch, the lr it "
                                     "scales, the data order and the random streams all change")
    run = TrainingRun(cfg, ckpt_path, ckpt is not None, start_step, d.total_steps, rank, world, device,
                      "Lower the learning rate or use --dtype fp32")
    if ckpt is not None:
        log(f"resumed from {ckpt_path} at step {start_step}")
    if rank == 0:
        describe_run(cfg, mcfg, d, n, world)
        if device.type == "cpu" and cfg.preset not in ("demo", "tiny"):
            print(f"note: the full-size {cfg.preset} MQ-VAE at {cfg.image_size}px takes seconds to minutes a step on a "
                  f"CPU; a short run: --preset demo --image-size 64 --perceptual-weight 0 --max-steps 1000")
    stats = TrainingStats(mcfg.codebook_size, device)
    unreadable = data.UnreadableFiles(d.train_set, len(d.train_set) // world, "training")
    metrics = {}            # of the last evaluation
    stream = micro_batches(d, cfg, start_step)
    n.model.train()
    n.disc.train()
    step = start_step
    for step in range(start_step, d.total_steps):
        t0 = time.time()
        lr = warmup_cosine_lr(step, d.peak_lr, d.warmup_steps, d.total_steps, cfg.min_lr)
        for group in n.opt_ae.param_groups + n.opt_d.param_groups:
            group["lr"] = lr
        gan_on = cfg.disc_weight > 0 and step >= cfg.disc_start
        xs = []
        for batch in (next(stream) for _ in range(cfg.grad_accum)):
            unreadable.note(batch["bad"])       # counted and named; the loader put the next image in its place
            xs.append(batch["image"].to(device, non_blocking=True).contiguous(memory_format=n.memory_format))
        compiling = n.fallback.compiled and step == start_step
        for out in n.fallback(forward_backward, n, xs, cfg, gan_on, world):
            run.guard.update(out["loss"] + out["d_loss"], step + 1)
            stats.add(out, step)
        update(n, gan_on)
        done = step + 1
        if compiling:
            run.compiled_step(done, t0)
        else:
            run.step_times.append(time.time() - t0)
        if run.log_due(done):
            log_training(run, stats, done, lr, d, cfg)
        if run.due(done, cfg.eval_every):
            run.check_finite(done)
            metrics, picture = n.fallback(evaluate, n.raw_model, d.val_set, cfg, device, n.autocast, n.lpips_fn,
                                          rank, world, n.graphed)
            report_evaluation(run, done, metrics, picture, mcfg)
            run.restart_timer(done)     # the speed in the log counts training steps only
        save, stop = run.after_step(done)
        if save:
            run.save(done, checkpoint_state(n, mcfg, cfg, done / d.steps_per_epoch))
        if stop:
            log(run.stop_message(done))
            break
    if world > 1:
        log(rank_consistency(n.raw_model, n.raw_disc, world))
    run.finish(step)
    if mask_summary(metrics):
        log(f"last evaluation, {mask_summary(metrics)}")


def analyse_checkpoint(cfg: TrainConfig, explicit: set, rank: int, world: int, device):
    """--analyse CKPT: evaluate a checkpoint on the validation split of its data (--data-dir, --eval-images,
    --batch-size and --num-workers may be given) and write mask_analysis.json and mask_analysis.png
    (input | importance map | kept regions | reconstruction) to --out-dir, by default beside the checkpoint."""
    ckpt = load_checkpoint(cfg.analyse, "mqvae")
    run_cfg = TrainConfig(**ckpt["train_config"])
    for key in explicit & {"data_dir", "eval_images", "batch_size", "num_workers"}:
        setattr(run_cfg, key, getattr(cfg, key))
    check(not cfg.save_images or world == 1, "--analyse --save-images runs as one process (python, not torchrun)")
    model = mqvae_from_checkpoint(ckpt, device)
    val_set = data.build_dataset(run_cfg.data, run_cfg.data_dir, run_cfg.image_size, "val")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    images = [] if cfg.save_images else None
    metrics, picture = evaluate(model, val_set, run_cfg, device, autocast, None, rank, world, keep_images=images)
    if rank != 0:
        return metrics
    out_dir = cfg.out_dir if "out_dir" in explicit else os.path.dirname(os.path.abspath(cfg.analyse))
    if images:
        for name, part in (("inputs", 0), ("reconstructions", 1)):
            with atomic_path(os.path.join(out_dir, name + ".npz")) as tmp, open(tmp, "wb") as fh:
                np.savez(fh, images=np.concatenate([batch[part] for batch in images]))
    write_json(os.path.join(out_dir, "mask_analysis.json"), dict(ckpt=os.path.abspath(cfg.analyse),
                                                                 step=ckpt["step"], **metrics))
    save_grid(visualisation_grid(*picture), os.path.join(out_dir, "mask_analysis.png"), nrow=4)
    print(f"{cfg.analyse} (step {ckpt['step']}), {metrics['val_images']} validation images of {run_cfg.data}: "
          f"PSNR {metrics['val_psnr']:.2f} dB, {metrics['val_codes_used']} codes used")
    for line in (mask_summary(metrics), inversion_warning(metrics, model.config.commit_through_score,
                                                          run_cfg.codebook_weight, model.config.beta)):
        if line:
            print(line)
    print(f"wrote {os.path.join(out_dir, 'mask_analysis.json')} and mask_analysis.png"
          + (", inputs.npz and reconstructions.npz" if images else ""))
    return metrics


def build_data(cfg: TrainConfig, rank: int, world: int, device) -> SimpleNamespace:
    """Datasets, the resumable sampler and loader, and the schedule they fix (steps, warmup, lr)."""
    built = {"train": data.first_images(data.build_dataset(cfg.data, cfg.data_dir, cfg.image_size, "train"),
                                        cfg.train_images),
             "val": data.build_dataset(cfg.data, cfg.data_dir, cfg.image_size, "val")}
    splits = data.check_image_files(built, cfg.out_dir)
    train_set, val_set = splits["train"], splits["val"]
    global_batch = cfg.batch_size * world * cfg.grad_accum
    steps_per_epoch = len(train_set) // global_batch
    check(steps_per_epoch > 0, f"the training set has {len(train_set)} images, fewer than one global batch "
                               f"({global_batch}); lower --batch-size")
    sampler = data.ResumableSampler(train_set, num_replicas=world, rank=rank, seed=cfg.seed)
    loader = DataLoader(train_set, batch_size=cfg.batch_size, sampler=sampler, num_workers=cfg.num_workers,
                        pin_memory=device.type == "cuda", drop_last=True,
                        persistent_workers=False, prefetch_factor=4 if cfg.num_workers > 0 else None,
                        worker_init_fn=ignore_interrupts, generator=torch.Generator())  # own RNG: starting an epoch must not draw from the global one
    return SimpleNamespace(train_set=train_set, val_set=val_set, sampler=sampler, loader=loader,
                           global_batch=global_batch, steps_per_epoch=steps_per_epoch,
                           total_steps=cfg.max_steps or max(1, int(cfg.epochs * steps_per_epoch)),
                           warmup_steps=int(cfg.warmup_epochs * steps_per_epoch),
                           peak_lr=cfg.lr if cfg.lr is not None else cfg.base_lr * global_batch)


def build_networks(cfg: TrainConfig, mcfg: MQVAEConfig, peak_lr: float, ckpt: Optional[dict], rank: int, world: int,
                   device) -> SimpleNamespace:
    """MQ-VAE, discriminator, LPIPS and both optimizers, restored from ckpt, then compiled and DDP-wrapped
    as the flags say. model/disc are what the loop calls; raw_model/raw_disc the unwrapped modules."""
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = MQVAE(mcfg).to(device)
    disc = PatchDiscriminator(n_layers=cfg.disc_layers).to(device)
    if cfg.perceptual_weight > 0 and cfg.lpips_vgg is None and not os.path.isfile(default_vgg_path()):
        if rank == 0:  # one download, not one per process
            fetch_vgg16(default_vgg_path())
        barrier()
    lpips_fn = build_lpips(cfg.lpips_vgg).to(device) if cfg.perceptual_weight > 0 else None
    cuda = device.type == "cuda"
    opt_ae = torch.optim.Adam(model.parameters(), lr=peak_lr, betas=(0.5, 0.9), **({"fused": True} if cuda else {}))
    opt_d = torch.optim.Adam(disc.parameters(), lr=peak_lr, betas=(0.5, 0.9), **({"fused": True} if cuda else {}))
    if ckpt is not None:
        model.load_state_dict(ckpt["mqvae"], strict=True)
        disc.load_state_dict(ckpt["disc"], strict=True)
        opt_ae.load_state_dict(ckpt["opt_ae"])
        opt_d.load_state_dict(ckpt["opt_disc"])
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    for m in (model, disc, lpips_fn):
        if m is not None:
            m.to(memory_format=memory_format)
    raw_model, raw_disc = model, disc
    compiled = cfg.compile and compiles_on(device)
    mode = compile_mode_for(cfg.compile_mode, world)
    if compiled:
        compile_for_training(model, disc, mode)     # in place: model and disc stay the modules DDP wraps
    if world > 1:
        ddp_args = dict(device_ids=[device.index] if cuda else None,
                        find_unused_parameters=mcfg.masker != "none" and mcfg.keep_ratio >= 1.0)  # the mask token: unused at 100%
        model, disc = DDP(model, **ddp_args), ddp_discriminator(disc, ddp_args["device_ids"])
    n = SimpleNamespace(model=model, disc=disc, raw_model=raw_model, raw_disc=raw_disc, lpips_fn=lpips_fn,
                        opt_ae=opt_ae, opt_d=opt_d, memory_format=memory_format,
                        compile_mode=mode if compiled else None, graphed=compiled and mode == "reduce-overhead",
                        autocast=torch.autocast("cuda", dtype=torch.bfloat16) if cuda and cfg.dtype == "bf16"
                        else nullcontext())

    def to_eager(failed: bool):
        """The compiled parts back to the originals; after a failed attempt, what it left cleared."""
        uncompile(raw_model)
        uncompile(raw_disc)
        vars(raw_model.decoder).pop("features", None)     # the compiled method: the class's is found again
        n.graphed, n.compile_mode = False, None
        if failed:
            for p in list(raw_model.parameters()) + list(raw_disc.parameters()):
                p.grad = None
            raw_model.quantizer._pending = None     # the failed attempt's codebook statistics

    log = print if rank == 0 else (lambda *a, **k: None)
    n.fallback = CompileFallback(compiled, to_eager, log, device,
                                 dist.new_group(backend="gloo") if world > 1 and compiled else None)
    return n


def describe_run(cfg: TrainConfig, mcfg: MQVAEConfig, d: SimpleNamespace, n: SimpleNamespace, world: int):
    """Rank 0: write config.json and print what will run."""
    os.makedirs(cfg.out_dir, exist_ok=True)
    write_json(os.path.join(cfg.out_dir, "config.json"), dict(train=vars(cfg), model=dataclasses.asdict(mcfg)))
    millions = lambda m: sum(p.numel() for p in m.parameters()) / 1e6
    model = n.raw_model
    print(json.dumps(vars(cfg)))
    parts = (f"decoder input {millions(model.decoder_input):.2f}M" if mcfg.masker == "none" else
             f"mask {millions(model.mask):.2f}M, de-mask {millions(model.demask):.2f}M")
    print(f"{'VQGAN baseline (masker none)' if mcfg.masker == 'none' else 'MQ-VAE'} {cfg.preset}: "
          f"{millions(model):.2f}M parameters (encoder {millions(model.encoder):.2f}M, {parts}, "
          f"decoder {millions(model.decoder):.2f}M); discriminator {millions(n.raw_disc):.2f}M")
    print(f"f={mcfg.downsample_factor}: {mcfg.grid_size}x{mcfg.grid_size} grid, keep {mcfg.keep_ratio:.0%} -> "
          f"N={mcfg.seq_len} codes per image; codebook {mcfg.codebook_size}x{mcfg.codebook_dim} ({mcfg.codebook}); "
          f"commitment weight {cfg.codebook_weight:g} (--codebook-weight) × β {mcfg.beta:g} = "
          f"{cfg.codebook_weight * mcfg.beta:g}")
    print(f"data {cfg.data}: {len(d.train_set)} train / {len(d.val_set)} val images; global batch {d.global_batch} "
          f"({cfg.batch_size} x {world} GPU x {cfg.grad_accum} accum); {d.steps_per_epoch} steps/epoch, "
          f"{d.total_steps} steps, peak lr {d.peak_lr:.3g}, warmup {d.warmup_steps} steps")
    print(f"torch.compile: {n.compile_mode} mode (encoder, {'decoder input' if mcfg.masker == 'none' else 'de-mask'}, "
          f"decoder; discriminator default mode)" if n.compile_mode else
          "torch.compile off: " + ("--no-compile" if not cfg.compile else "eager on the CPU (it compiles on CUDA only)"))
    if n.lpips_fn is None:
        print("perceptual loss off (--perceptual-weight 0): LPIPS is neither trained on nor reported")


def micro_batches(d: SimpleNamespace, cfg: TrainConfig, step: int):
    """Endless stream of micro-batches, resuming at `step` inside its epoch."""
    epoch, skip = divmod(step, d.steps_per_epoch)
    while True:
        d.sampler.set_epoch(epoch, skip=skip * cfg.batch_size * cfg.grad_accum)
        it = iter(d.loader)
        for _ in range((d.steps_per_epoch - skip) * cfg.grad_accum):
            yield next(it)
        del it
        epoch, skip = epoch + 1, 0


class TrainingStats:
    """Loss terms summed on the device between log lines (no host sync per step), and codebook usage:
    the step each code was last chosen (usage over a sliding window) and counts since the last log
    (perplexity)."""

    names = ["loss", "rec", "lpips", "commit", "g_loss", "d_loss", "gan_weight", "logits_real", "logits_fake"]

    def __init__(self, codebook_size: int, device):
        self.sums = torch.zeros(len(self.names), device=device)
        self.count = 0
        self.last_used = torch.full((codebook_size,), -10 ** 9, dtype=torch.long, device=device)
        self.code_counts = torch.zeros(codebook_size, device=device)

    def add(self, out: dict, step: int):
        codes = out["aux"]["codes"].flatten()
        self.last_used.index_fill_(0, codes, step)
        self.code_counts.index_add_(0, codes, torch.ones_like(codes, dtype=torch.float))
        self.sums += torch.stack([out[name] for name in self.names]).float()
        self.count += 1


def log_training(run: TrainingRun, stats: TrainingStats, done: int, lr: float, d: SimpleNamespace, cfg: TrainConfig):
    """Means since the last log line (averaged over ranks), codebook usage and perplexity, speed and ETA."""
    run.check_finite(done)
    k = len(stats.names)
    totals = torch.cat([stats.sums / max(stats.count, 1), stats.code_counts])
    used = stats.last_used.clone()
    if run.world > 1:
        dist.all_reduce(totals)
        totals[:k] /= run.world
        dist.all_reduce(used, op=dist.ReduceOp.MAX)
    p = totals[k:] / totals[k:].sum().clamp_min(1)
    perplexity = torch.exp(-(p * p.clamp_min(1e-12).log()).sum()).item()
    usage = int((used > done - 1 - cfg.usage_window).sum().item())
    values = dict(zip(stats.names, totals[:k].tolist()))
    steps, elapsed, eta = run.interval(done)
    images_per_s = d.global_batch * steps / elapsed if steps else None     # None: the step compiled
    record = dict(step=done, epoch=round(done / d.steps_per_epoch, 4), lr=lr, **values, codes_used=usage,
                  perplexity=perplexity, images_per_s=images_per_s, eta_s=eta)
    V = stats.code_counts.numel()
    run.log(f"step {done}/{run.total_steps} ep {record['epoch']:.2f} | loss {values['loss']:.4f} rec {values['rec']:.4f} "
            f"lpips {values['lpips']:.4f} commit {values['commit']:.4f} g {values['g_loss']:.3f} "
            f"d {values['d_loss']:.3f} λ {values['gan_weight']:.3f} D(x) {values['logits_real']:.2f} "
            f"D(x̃) {values['logits_fake']:.2f} | codes {usage}/{V} ppl {perplexity:.1f} | lr {lr:.2e} | "
            + (f"{images_per_s:.1f} img/s | ETA {eta / 60:.1f} min" if steps else "speed and ETA from the next line"))
    run.write_record(record)
    stats.sums.zero_()
    stats.code_counts.zero_()
    stats.count = 0


def report_evaluation(run: TrainingRun, step: int, metrics: dict, picture, mcfg: MQVAEConfig):
    """Rank 0: the picture recon_<step>.png, log lines (the metrics, where the mask keeps, a warning if it
    looks inverted) and a log.jsonl record."""
    if not run.master:
        return
    if picture is not None:
        save_grid(visualisation_grid(*picture), os.path.join(run.cfg.out_dir, f"recon_{step:07d}.png"), nrow=4)
    run.log(f"eval step {step}: " + " ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                             for k, v in metrics.items() if k.startswith("val_")))
    for line in (mask_summary(metrics), inversion_warning(metrics, mcfg.commit_through_score, run.cfg.codebook_weight,
                                                          mcfg.beta)):
        if line:
            run.log(line)
    run.write_record(dict(step=step, **metrics))


def checkpoint_state(n: SimpleNamespace, mcfg: MQVAEConfig, cfg: TrainConfig, epoch: float) -> dict:
    """Everything but step and RNG states (TrainingRun.save adds them): sample.py and train_stackformer.py
    rebuild the MQ-VAE from mqvae_config + mqvae alone."""
    return dict(kind="mqvae", mqvae_config=dataclasses.asdict(mcfg), train_config=vars(cfg),
                mqvae=strip_compile_prefix(n.raw_model.state_dict()), disc=strip_compile_prefix(n.raw_disc.state_dict()),
                opt_ae=n.opt_ae.state_dict(), opt_disc=n.opt_d.state_dict(), epoch=epoch)


def rank_consistency(model, disc, world: int) -> str:
    """Every parameter and the codebook buffers (codebook, EMA counts and sums) compared across ranks.
    BatchNorm running statistics are rank-local between forwards (DDP re-broadcasts rank 0's at each
    one) and left out."""
    tensors = list(model.parameters()) + list(model.quantizer.buffers()) + list(disc.parameters())
    codebook = model.quantizer.codebook.detach().double().sum().item()
    return (check_identical_across_ranks(tensors, world, "parameters and codebook buffers")
            + f" (codebook checksum {codebook:.6f})")


if __name__ == "__main__":
    run_main(main)
