"""
MQ-VAE: the first stage of "Not All Image Regions Matter: Masked Vector Quantization for
Autoregressive Image Generation" (Huang, Mao, Wang, Zhang; CVPR 2023).

    x ──Encoder──► Ẑ (B,C,H,W) ──AdaptiveMask──► keep the N = ⌊k·H·W⌋ most important tokens
      ──VectorQuantizer──► Ẑ^q (B,N,D), codes (B,N) ──AdaptiveDemask──► full grid (B,C',H,W)
      ──Decoder──► x̃

Only the kept tokens are quantized, so an image costs N codes plus their N positions instead of
H·W codes. The mask is learned end-to-end (no extra loss): the scoring net's score multiplies
each kept token, so the reconstruction loss tells it which regions matter.

With masker="none" the same file builds the VQGAN baseline the paper compares against: every
token quantized, no mask and no de-mask (MQVAE's docstring).

This file holds the model and the PatchGAN discriminator used to train it, nothing else: the
training loop and its losses are in train_mqvae.py, checkpoints and DDP in utils.py.

    model = MQVAE(MQVAEConfig(**PRESETS["f8"], resolution=256, keep_ratio=0.25))
    x_rec, aux = model(x)                        # training forward (x in [-1, 1])
    codes, positions, scores = model.encode(x)   # (B,N) codes, (B,N) raster positions, (B,H,W)
    x_rec = model.decode(codes, positions)       # any order of the N pairs
"""

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


# -----------------------------------------------------------------------------
# Configuration

@dataclass
class MQVAEConfig:
    resolution: int = 256                 # training image size; fixes where attention sits
    in_channels: int = 3
    ch: int = 128                         # base width of encoder/decoder
    ch_mult: Tuple[int, ...] = (1, 1, 2, 2)  # one entry per level; f = 2 ** (len(ch_mult) - 1)
    num_res_blocks: int = 2
    attn_resolutions: Optional[Tuple[int, ...]] = None  # None: attention at the latent grid only
    z_channels: int = 256                 # C, channels of Ẑ
    dropout: float = 0.0
    keep_ratio: float = 0.25              # k = 1 - mask ratio; N = int(k * H * W)
    masker: str = "adaptive"              # "adaptive" (the paper) | "random" (ablation) | "none" (VQGAN)
    codebook_size: int = 1024             # V
    codebook_dim: int = 256               # D
    codebook: str = "ema"                 # "ema" (official code) | "grad" (VQ-VAE codebook loss)
    beta: float = 0.25                    # commitment weight β
    commit_through_score: bool = True     # official: L_commit sees s·u, its gradient reaches the scoring net; False: sg(s)·u
    ema_decay: float = 0.99
    ema_eps: float = 1e-5
    restart_dead_codes: bool = True       # EMA only: re-seed codes whose EMA count fell below 1
    demask_layers: int = 8                # ResBlock + masked attention pairs in the de-mask stack
    demask_mu_init: float = 0.02          # μ for masked keys in the first de-mask layer
    demask_attn: str = "soft"             # "soft" (official code) | "hard" (Fig. 2c: masked keys excluded)

    def __post_init__(self):
        self.ch_mult = tuple(self.ch_mult)
        if self.attn_resolutions is not None:
            self.attn_resolutions = tuple(self.attn_resolutions)
        problems = [
            (0.0 < self.keep_ratio <= 1.0, f"keep ratio must be in (0, 1], got {self.keep_ratio} (mask ratio = 1 - keep ratio)"),
            (self.masker in ("adaptive", "random", "none"), f"masker must be adaptive|random|none, got {self.masker!r}"),
            (self.masker != "none" or self.keep_ratio == 1.0,
             f"masker none (VQGAN) quantizes every token: keep ratio must be 1, got {self.keep_ratio}"),
            (self.codebook in ("ema", "grad"), f"codebook must be ema|grad, got {self.codebook!r}"),
            (self.demask_attn in ("soft", "hard"), f"demask attention must be soft|hard, got {self.demask_attn!r}"),
            (self.resolution % self.downsample_factor == 0,
             f"image size {self.resolution} is not divisible by the downsampling factor f={self.downsample_factor}"),
        ]
        for ok, message in problems:
            if not ok:
                raise ValueError(message)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def grid_size(self) -> int:
        return self.resolution // self.downsample_factor

    @property
    def num_tokens(self) -> int:          # T
        return self.grid_size ** 2

    @property
    def seq_len(self) -> int:             # N
        return num_kept(self.keep_ratio, self.num_tokens)


# f=8 is the released configuration; f=16 and f=32 follow the supplementary's description of
# adding / removing one level of VQGAN (notes §2.1). demo and tiny are small, for CPU runs.
PRESETS = {
    "f8":   dict(ch=128, ch_mult=(1, 1, 2, 2), num_res_blocks=2, z_channels=256),
    "f16":  dict(ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, z_channels=256),
    "f32":  dict(ch=128, ch_mult=(1, 1, 2, 2, 4, 4), num_res_blocks=2, z_channels=256),
    "demo": dict(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=64,
                 codebook_size=256, codebook_dim=64, demask_layers=4),        # f=4
    "tiny": dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=32,
                 codebook_size=64, codebook_dim=32, demask_layers=2),         # f=2, for tests
    # one level more than demo / tiny: the VQGAN baselines whose grid holds as many tokens as the
    # 25% that demo / tiny keep (the paper's f=16 VQGAN against f=8 MQ-VAE, at small scale)
    "demo-f8": dict(ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=1, z_channels=64,
                    codebook_size=256, codebook_dim=64, demask_layers=4),     # f=8
    "tiny-f4": dict(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=32,
                    codebook_size=64, codebook_dim=32, demask_layers=2),      # f=4
}


def num_kept(keep_ratio: float, num_tokens: int) -> int:
    """N = int(k·T), floored as the official code does, and at least one token."""
    return max(1, int(keep_ratio * num_tokens))


# -----------------------------------------------------------------------------
# VQGAN building blocks (taming-transformers' layout and parameter names)

def Normalize(channels: int) -> nn.GroupNorm:
    groups = 32 if channels % 32 == 0 else math.gcd(channels, 32)  # tiny presets have < 32 channels
    return nn.GroupNorm(groups, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = Normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = Normalize(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all H·W positions (VQGAN). With `mu`, the attention weight
    on key j is multiplied by μ_j after the softmax (the de-mask's key mask, see AdaptiveDemask);
    with `key_mask`, masked keys are excluded from the softmax (Fig. 2c)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = Normalize(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x, mu=None, key_mask=None):
        B, C, H, W = x.shape
        h = self.norm(x).flatten(2).transpose(1, 2)                                  # (B,T,C) tokens
        # The q, k, v 1x1 convs as one matmul over tokens. Laid out (B,T,3C), q, k and v have unit
        # stride along C, which the fused (flash) attention kernels need; the convs' (B,C,T) output
        # would make SDPA fall back to its unfused path, several times slower here.
        w = torch.cat([self.q.weight, self.k.weight, self.v.weight]).flatten(1)   # (3C, C)
        b = torch.cat([self.q.bias, self.k.bias, self.v.bias])
        q, k, v = F.linear(h, w, b).unsqueeze(1).chunk(3, dim=-1)                  # (B,1,T,C) each
        if mu is not None:
            # softmax(q·kᵀ/√C)_ij · μ_j · v_j  ==  softmax(q·kᵀ/√C) @ (μ ⊙ v): scaling the values by μ
            # is the official post-softmax key multiplication (rows left unnormalised), and it keeps
            # the fused flash/memory-efficient attention kernels usable.
            v = v * mu[:, None, :, None].to(v.dtype)
        attn_mask = key_mask[:, None, None, :] if key_mask is not None else None  # (B,1,1,T), True = attend
        h = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)        # (B,1,T,C)
        h = F.linear(h.squeeze(1), self.proj_out.weight.flatten(1), self.proj_out.bias)  # proj_out, (B,T,C)
        return x + h.transpose(1, 2).reshape(B, C, H, W)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric pad as VQGAN, so H -> H/2 exactly


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _attn_resolutions(cfg: MQVAEConfig):
    return cfg.attn_resolutions if cfg.attn_resolutions is not None else (cfg.grid_size,)


def _run_level(level: nn.Module, h):
    """One resolution level of the encoder or decoder: its ResNet blocks, each followed by its attention
    block where the level has them."""
    for j, block in enumerate(level.block):
        h = block(h)
        if len(level.attn) > 0:
            h = level.attn[j](h)
    return h


class Encoder(nn.Module):
    """The VQGAN encoder: x (B,3,R,R) -> Ẑ (B,z_channels,R/f,R/f)."""

    def __init__(self, cfg: MQVAEConfig):
        super().__init__()
        attn_res = _attn_resolutions(cfg)
        in_mult = (1,) + cfg.ch_mult
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList()
        res = cfg.resolution
        for i, mult in enumerate(cfg.ch_mult):
            level = nn.Module()
            level.block, level.attn = nn.ModuleList(), nn.ModuleList()
            block_in = cfg.ch * in_mult[i]
            for _ in range(cfg.num_res_blocks):
                level.block.append(ResnetBlock(block_in, cfg.ch * mult, cfg.dropout))
                block_in = cfg.ch * mult
                if res in attn_res:
                    level.attn.append(AttnBlock(block_in))
            if i != len(cfg.ch_mult) - 1:
                level.downsample = Downsample(block_in)
                res //= 2
            self.down.append(level)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, cfg.dropout)
        self.mid.attn_1 = AttnBlock(block_in)
        self.mid.block_2 = ResnetBlock(block_in, block_in, cfg.dropout)
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, cfg.z_channels, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.down:
            h = _run_level(level, h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


# -----------------------------------------------------------------------------
# The three MQ-VAE modules between encoder and decoder: adaptive mask, quantizer, adaptive de-mask

class AdaptiveMask(nn.Module):
    """Scores every latent token, keeps the top N and turns them into codebook-space vectors.

    score s = sigmoid(BN(conv1x1(ReLU(conv3x3(norm(Ẑ))))))   per position, (B, H·W)
    kept    = top-N positions by the *detached* score, in descending-score order
    z_i     = W_pre · (s_i · LN(Ẑ_i)) = s_i · u_i,  u_i = W_pre · LN(Ẑ_i)   for each kept i

    The selection itself is not differentiable; the scoring net learns only through s_i, which
    scales each kept token: tokens whose scale matters for reconstruction get pushed up.

    The commitment term β‖z_i − sg(Ẑ^q_i)‖² sees s_i too in the official code, so its gradient
    pushes down the scores of the tokens that quantize worst, which are often the detailed ones:
    on object-centric data the map can learn to keep the background (docs/findings.md). With
    commit_through_score=False the commitment term sees sg(s_i) · u_i instead, and the scoring net
    learns from the reconstruction alone; z_i, the selection and the codebook are unchanged.
    """

    def __init__(self, z_channels: int, codebook_dim: int, keep_ratio: float, mode: str = "adaptive",
                 commit_through_score: bool = True):
        super().__init__()
        self.keep_ratio, self.mode, self.commit_through_score = keep_ratio, mode, commit_through_score
        # the random-mask ablation has no scoring net (unused weights would also break DDP)
        self.score_net = None if mode == "random" else nn.Sequential(
            nn.GroupNorm(1, z_channels, affine=False),  # one norm over (C,H,W) per sample, any grid size
            nn.Conv2d(z_channels, z_channels, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(z_channels, 1, 1),
            nn.BatchNorm2d(1),
            nn.Sigmoid(),
        )
        self.pre_projection = nn.Linear(z_channels, codebook_dim, bias=False)

    def forward(self, h):
        """Ẑ (B,C,H,W) -> z (B,N,D), z_commit (B,N,D) (what L_commit sees), positions (B,N), scores (B,H,W)."""
        B, C, H, W = h.shape
        N = num_kept(self.keep_ratio, H * W)
        tokens = F.layer_norm(h.flatten(2).transpose(1, 2).float(), (C,))        # (B,T,C), no affine
        if self.mode == "adaptive":
            # fp32 even under bf16 autocast: bf16 scores tie often, and ties would decide the top-N
            with torch.autocast(device_type=h.device.type, enabled=False):
                scores = self.score_net(h.float()).flatten(1)                      # (B,T) in (0,1)
            positions = scores.detach().topk(N, dim=1, sorted=True).indices        # (B,N) importance order
        else:  # ablation: N random positions, every score 1
            scores = torch.ones(B, H * W, device=h.device)
            positions = torch.rand(B, H * W, device=h.device).topk(N, dim=1).indices
        kept = tokens.gather(1, positions[..., None].expand(-1, -1, C))           # (B,N,C) LN(Ẑ_i)
        u = self.pre_projection(kept)                                             # (B,N,D)
        s = scores.gather(1, positions)[..., None]                                # (B,N,1) s_i, not detached
        z = s * u                                                                 # = W_pre·(s_i·LN(Ẑ_i))
        z_commit = z if self.commit_through_score else s.detach() * u
        return z, z_commit, positions, scores.view(B, H, W)


class VectorQuantizer(nn.Module):
    """Nearest-neighbour quantization of the N kept tokens with a straight-through gradient.

    "ema" (official code): the codebook is not trained by gradient; each code moves to the EMA mean
    of the features assigned to it. Codes that stop being used (EMA count < 1) are restarted from
    random features of the current batch, so the codebook does not collapse onto a few entries.
    Counts and sums are all-reduced and restart candidates broadcast from rank 0, so every rank
    holds the same codebook. "grad": the VQ-VAE codebook loss ||sg(Ẑ) - Ẑ^q||² trains the codes.
    In both, the encoder side gets the commitment loss β·||Ẑ - sg(Ẑ^q)||².

    EMA bookkeeping: forward(z, collect_stats=True) only collects the per-code counts and sums;
    ema_step() applies them, once per optimizer step (after all gradient-accumulation micro-batches).
    The official code updates twice per step, because its discriminator pass re-runs the model.
    """

    def __init__(self, cfg: MQVAEConfig):
        super().__init__()
        V, D = cfg.codebook_size, cfg.codebook_dim
        self.num_codes, self.dim, self.beta, self.mode = V, D, cfg.beta, cfg.codebook
        self.decay, self.eps, self.restart = cfg.ema_decay, cfg.ema_eps, cfg.restart_dead_codes
        init = torch.empty(V, D).uniform_(-1.0 / V, 1.0 / V)
        if self.mode == "ema":
            self.register_buffer("codebook", init)
            self.register_buffer("cluster_size", torch.zeros(V))  # EMA of per-code counts n_k
            self.register_buffer("embed_sum", init.clone())       # EMA of per-code feature sums m_k
        else:
            self.codebook = nn.Parameter(init)
        self._pending = None  # statistics collected since the last ema_step: [counts, sums, features]

    def lookup(self, codes):
        return F.embedding(codes, self.codebook)

    def forward(self, z, collect_stats: bool = False, z_commit=None):
        """z (B,N,D) -> (Ẑ^q with the straight-through gradient, codes (B,N), L_commit). L_commit is taken
        on z_commit when given (AdaptiveMask's sg(s)·u), else on z."""
        B, N, D = z.shape
        z = z.float()                                     # distances and EMA statistics in fp32
        flat = z.reshape(-1, D)                           # (B·N, D)
        with torch.autocast(device_type=z.device.type, enabled=False):
            distances = (flat.pow(2).sum(1, keepdim=True) - 2 * flat @ self.codebook.t()
                         + self.codebook.pow(2).sum(1)[None])                    # (B·N, V)
        codes = distances.argmin(1)
        z_q = self.lookup(codes).view(B, N, D)            # Ẑ^q, from the codebook before this step's update
        if collect_stats and self.mode == "ema":
            self._collect(flat.detach(), codes)
        commit_input = z if z_commit is None else z_commit.float()
        commit_loss = self.beta * F.mse_loss(commit_input, z_q.detach())  # β·||Ẑ - sg(Ẑ^q)||²
        if self.mode == "grad":
            commit_loss = commit_loss + F.mse_loss(z_q, z.detach())      # ||sg(Ẑ) - Ẑ^q||² trains the codes
        # Straight-through estimator: the forward value is Ẑ^q, the backward passes the decoder's
        # gradient to Ẑ unchanged (argmin has no useful gradient).
        z_q = z + (z_q - z).detach()
        return z_q, codes.view(B, N), commit_loss

    @torch.no_grad()
    def _collect(self, flat, codes):
        counts = torch.zeros(self.num_codes, device=flat.device).index_add_(
            0, codes, torch.ones_like(codes, dtype=torch.float))
        sums = torch.zeros(self.num_codes, self.dim, device=flat.device).index_add_(0, codes, flat)
        if self._pending is None:
            self._pending = [counts, sums, [flat]]
        else:
            self._pending[0] += counts
            self._pending[1] += sums
            self._pending[2].append(flat)

    @torch.no_grad()
    def ema_step(self):
        """Move the codes to the EMA means of the features collected since the last call, and restart
        dead codes. Call once per optimizer step on every rank (it all-reduces); a no-op if nothing was
        collected (eval, or the "grad" codebook)."""
        if self._pending is None:
            return
        counts, sums, flats = self._pending
        self._pending = None
        flat = torch.cat(flats)
        V = self.num_codes
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if distributed:
            dist.all_reduce(counts)
            dist.all_reduce(sums)
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.embed_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        if self.restart:
            candidates = flat
            if candidates.shape[0] < V:  # too few features: tile them and jitter the copies
                repeats = -(-V // candidates.shape[0])
                candidates = candidates.repeat(repeats, 1)
                candidates = candidates + torch.randn_like(candidates) * 0.01 / math.sqrt(self.dim)
            candidates = candidates[torch.randperm(candidates.shape[0], device=flat.device)[:V]]  # (V,D)
            if distributed:
                dist.broadcast(candidates, src=0)
            dead = self.cluster_size < 1.0                                    # (V,)
            self.embed_sum.copy_(torch.where(dead[:, None], candidates, self.embed_sum))
            self.cluster_size.copy_(torch.where(dead, torch.ones_like(self.cluster_size), self.cluster_size))
        # Laplace-smoothed counts keep e_k = m_k / n_k finite for codes that are rarely used.
        total = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.eps) / (total + V * self.eps) * total
        self.codebook.copy_(self.embed_sum / smoothed[:, None])


class DemaskBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.resblock = ResnetBlock(channels, channels)
        self.attn = AttnBlock(channels)


class AdaptiveDemask(nn.Module):
    """Rebuilds the full H×W map from the N quantized tokens.

    The kept vectors are scattered back to their positions, every other position gets a learned
    mask token, and a stack of [ResBlock → key-masked self-attention] fills in the masked regions.
    In layer l the weight on key j is scaled by μ_j: 1 for kept tokens and μ⁽¹⁾ = 0.02 for masked
    ones, with μ ← √μ after every layer. Information first flows from the kept tokens only, and
    the masked positions are admitted gradually as they get filled in (official code; the hard
    variant of Fig. 2c excludes masked keys in every layer).
    """

    def __init__(self, cfg: MQVAEConfig):
        super().__init__()
        D, width = cfg.codebook_dim, cfg.ch * cfg.ch_mult[-1]
        self.mu_init, self.hard = cfg.demask_mu_init, cfg.demask_attn == "hard"
        self.mask_token = nn.Parameter(torch.empty(D).uniform_(-1.0 / D, 1.0 / D))
        self.proj_in = nn.Conv2d(D, width, 1)
        self.conv_in = nn.Conv2d(width, width, 3, padding=1)  # the decoder's conv_in, moved here
        self.blocks = nn.ModuleList(DemaskBlock(width) for _ in range(cfg.demask_layers))
        self.final_block = ResnetBlock(width, width)

    def forward(self, z_q, positions, grid_hw):
        B, N, D = z_q.shape
        H, W = grid_hw
        # Scatter Ẑ^q to its positions on a canvas filled with the mask token (out of place, so both
        # the kept vectors and the mask token receive gradient).
        canvas = self.mask_token.to(z_q.dtype).expand(B, H * W, D)
        canvas = canvas.scatter(1, positions[..., None].expand(-1, -1, D), z_q)          # (B,T,D)
        kept = torch.zeros(B, H * W, dtype=torch.bool, device=z_q.device).scatter(1, positions, True)
        h = self.conv_in(self.proj_in(canvas.transpose(1, 2).reshape(B, D, H, W)))
        mu = torch.where(kept, 1.0, self.mu_init)                                      # (B,T)
        for block in self.blocks:
            h = block.resblock(h)
            h = block.attn(h, key_mask=kept) if self.hard else block.attn(h, mu=mu)
            mu = mu.sqrt()
        return self.final_block(h)


class DecoderInput(nn.Module):
    """The VQGAN baseline (masker "none") in place of the de-mask: VQGAN's post-quantization 1x1 conv,
    then its decoder's conv_in and mid block (ResBlock, attention, ResBlock), the parts that MQ-VAE's
    de-mask replaces. Every position holds a quantized token, so there is nothing to fill in."""

    def __init__(self, cfg: MQVAEConfig):
        super().__init__()
        width = cfg.ch * cfg.ch_mult[-1]
        self.post_quant_conv = nn.Conv2d(cfg.codebook_dim, cfg.z_channels, 1)
        self.conv_in = nn.Conv2d(cfg.z_channels, width, 3, padding=1)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(width, width, cfg.dropout)
        self.mid.attn_1 = AttnBlock(width)
        self.mid.block_2 = ResnetBlock(width, width, cfg.dropout)

    def forward(self, z_q_grid):
        h = self.conv_in(self.post_quant_conv(z_q_grid))
        return self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))


class Decoder(nn.Module):
    """The VQGAN decoder without conv_in and mid block: the de-mask module (or, for the VQGAN baseline,
    DecoderInput) takes their place and feeds it a (B, ch·ch_mult[-1], H, W) map."""

    def __init__(self, cfg: MQVAEConfig):
        super().__init__()
        attn_res = _attn_resolutions(cfg)
        block_in = cfg.ch * cfg.ch_mult[-1]
        res = cfg.grid_size
        self.up = nn.ModuleList()
        for i in reversed(range(len(cfg.ch_mult))):
            level = nn.Module()
            level.block, level.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(cfg.num_res_blocks + 1):
                level.block.append(ResnetBlock(block_in, cfg.ch * cfg.ch_mult[i], cfg.dropout))
                block_in = cfg.ch * cfg.ch_mult[i]
                if res in attn_res:
                    level.attn.append(AttnBlock(block_in))
            if i != 0:
                level.upsample = Upsample(block_in)
                res *= 2
            self.up.insert(0, level)  # up[0] is the full-resolution level, as in taming
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, cfg.in_channels, 3, padding=1)

    def features(self, h):
        """Everything but the last conv (which the adaptive GAN weight differentiates at)."""
        for level in reversed(self.up):
            h = _run_level(level, h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return F.silu(self.norm_out(h))

    def forward(self, h):
        return self.conv_out(self.features(h))


# -----------------------------------------------------------------------------
# MQ-VAE

class MQVAE(nn.Module):
    """MQ-VAE; with masker "none", the VQGAN baseline of the paper's comparisons: the same encoder,
    quantizer and decoder, every one of the H·W tokens quantized (N = T, positions 0..T-1 in raster
    order, every score 1), no scoring net and no de-mask (DecoderInput stands in for the de-mask)."""

    def __init__(self, cfg: MQVAEConfig):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        if cfg.masker == "none":
            self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.codebook_dim, 1)    # VQGAN's, Ẑ -> codebook dim
        else:
            self.mask = AdaptiveMask(cfg.z_channels, cfg.codebook_dim, cfg.keep_ratio, cfg.masker,
                                     cfg.commit_through_score)
        self.quantizer = VectorQuantizer(cfg)
        if cfg.masker == "none":
            self.decoder_input = DecoderInput(cfg)
        else:
            self.demask = AdaptiveDemask(cfg)
        self.decoder = Decoder(cfg)

    def _check_input(self, x):
        f = self.config.downsample_factor
        if x.dim() != 4 or x.shape[1] != self.config.in_channels:
            raise ValueError(f"expected images of shape (B, {self.config.in_channels}, H, W), got {tuple(x.shape)}")
        if x.shape[2] % f or x.shape[3] % f:
            raise ValueError(f"image size {tuple(x.shape[2:])} is not divisible by the downsampling factor f={f}")

    def _select(self, h):
        """Ẑ (B,C,H,W) -> z (B,N,D), z_commit (B,N,D), positions (B,N), scores (B,H,W): the adaptive
        mask, or for the VQGAN baseline every token in raster order."""
        if self.config.masker != "none":
            return self.mask(h)
        B, _, H, W = h.shape
        z = self.quant_conv(h).flatten(2).transpose(1, 2)                          # (B,T,D)
        positions = torch.arange(H * W, device=h.device).expand(B, -1)             # (B,T)
        return z, z, positions, torch.ones(B, H, W, device=h.device)

    def _to_decoder(self, z_q, positions, grid_hw):
        """The N quantized tokens at their positions -> the decoder's input map (B, ch·ch_mult[-1], H, W)."""
        if self.config.masker != "none":
            return self.demask(z_q, positions, grid_hw)
        B, T, D = z_q.shape
        grid = torch.zeros_like(z_q).scatter(1, positions[..., None].expand(-1, -1, D), z_q)   # raster order
        return self.decoder_input(grid.transpose(1, 2).reshape(B, D, *grid_hw))

    def forward(self, x):
        """x (B,3,H,W) in [-1,1] -> (x̃, aux). In training mode the EMA codebook statistics are
        collected; call self.quantizer.ema_step() once per optimizer step to apply them."""
        self._check_input(x)
        h = self.encoder(x)                                            # Ẑ grid (B,C,H',W')
        z, z_commit, positions, scores = self._select(h)               # (B,N,D) twice, (B,N), (B,H',W')
        z_q, codes, commit_loss = self.quantizer(z, collect_stats=self.training, z_commit=z_commit)
        x_rec = self.decoder(self._to_decoder(z_q, positions, h.shape[2:]))
        # feature_norms ‖Ẑ_i‖ (B,H',W'): for relating the importance map to the features (supp. Fig. 5)
        return x_rec, dict(commit_loss=commit_loss, codes=codes, positions=positions, scores=scores,
                           feature_norms=h.detach().float().norm(dim=1))

    @torch.no_grad()
    def encode(self, x):
        """-> codes (B,N), positions (B,N) raster indices row*W+col, in descending-importance order,
        and the importance map (B,H',W'). Never updates the codebook."""
        self._check_input(x)
        z, _, positions, scores = self._select(self.encoder(x))
        _, codes, _ = self.quantizer(z)
        return codes, positions, scores

    def decode(self, codes, positions, grid_hw=None):
        """codes, positions (B,N) in any order -> images (B,3,H,W), not clamped."""
        if grid_hw is None:
            grid_hw = (self.config.grid_size, self.config.grid_size)
        T = grid_hw[0] * grid_hw[1]
        if codes.shape != positions.shape:
            raise ValueError(f"codes {tuple(codes.shape)} and positions {tuple(positions.shape)} differ in shape")
        z_q = self.quantizer.lookup(codes)
        return self.decoder(self._to_decoder(z_q, positions.clamp(0, T - 1), grid_hw))

    def last_layer(self):
        return self.decoder.conv_out.weight


# -----------------------------------------------------------------------------
# PatchGAN discriminator (pix2pix / VQGAN NLayerDiscriminator)

class PatchDiscriminator(nn.Module):
    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3):
        super().__init__()
        layers = [nn.Conv2d(in_channels, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2 ** n, 8)
            stride = 2 if n < n_layers else 1
            layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, stride, 1, bias=False),
                       nn.BatchNorm2d(ndf * mult), nn.LeakyReLU(0.2, True)]
        layers.append(nn.Conv2d(ndf * mult, 1, 4, 1, 1))  # one real/fake logit per patch
        self.main = nn.Sequential(*layers)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        return self.main(x)
