"""
Stackformer: the second stage of "Not All Image Regions Matter: Masked Vector Quantization for
Autoregressive Image Generation" (Huang, Mao, Wang, Zhang; CVPR 2023).

MQ-VAE keeps only N of the T = H·W latent positions, so an image becomes N (code, position)
pairs (v_1, p_1), ..., (v_N, p_N): codes v ∈ [0, V), positions p ∈ [0, T) as raster indices
row·W + col. Stackformer models them autoregressively with two causal transformers stacked on
each other. At step t:

    Code-Transformer      reads E_v(v_t) + E_p(p_t) + a_t     its hidden state H_t predicts v_{t+1}
    Position-Transformer  reads H_t + E_v(v_{t+1})           and predicts p_{t+1}

so every step first decides *what* comes next and then *where* it goes. v_0 is the condition (a
start token, a class, or a 32-token text prefix), p_0 a start position, a_t a learned absolute
sequence embedding. Stackformer_r (supp. Table 3, `variant="position-first"`) swaps the roles:
the sequence-reading transformer predicts p_{t+1} and the stacked one predicts v_{t+1} from
H_t + E_p(p_{t+1}). The code calls the transformer that reads the sequence the *lower* one and the
one stacked on it the *upper* one.

The model only: config, both transformers, conditioning (none, class, text with a word-level
tokenizer), the reference sampler `generate()` with a KV cache (fast_sampling.py replays its steps).

    model = Stackformer(StackformerConfig(**PRESETS["base"], codebook_size=V, num_positions=T, seq_len=N))
    loss, code_ce, pos_ce = model.loss(codes, positions)     # (B, N) int64 each, raster order
    codes, positions = model.generate(batch_size=16)         # (B, N) each
"""

import re
from collections import Counter
from dataclasses import dataclass, replace
from typing import Iterable, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


# -----------------------------------------------------------------------------
# Configuration

@dataclass
class StackformerConfig:
    codebook_size: int = 1024       # V, codes of the MQ-VAE codebook
    num_positions: int = 1024       # T = H·W latent positions (32×32 for f=8)
    seq_len: int = 256              # N, kept tokens per image (⌊keep ratio · T⌋)
    n_code_layers: int = 18         # Code-Transformer depth
    n_pos_layers: int = 6           # Position-Transformer depth
    n_embd: int = 1024              # d (the supplementary's n_e)
    n_head: int = 16
    dropout: float = 0.1            # on embeddings, residual branches and attention probabilities
    cond: str = "none"              # "none" | "class" | "text"
    num_classes: int = 1000         # class-conditional: number of labels
    text_vocab_size: int = 0        # text-conditional: WordTokenizer.vocab_size
    text_len: int = 32              # text-conditional: caption length in tokens (supp. §1)
    abs_pos: bool = True            # learned absolute sequence embedding a_t (supp. Table 3)
    variant: str = "code-first"     # "code-first" (Stackformer) | "position-first" (Stackformer_r)
    order: str = "raster"           # order of the training sequences: "raster" | "importance"
    pos_weight: float = 1.0         # loss = CE_code + pos_weight · CE_pos
    cond_drop: float = 0.0          # share of null conditions in training (> 0 for guidance)

    def __post_init__(self):
        choices = dict(cond=("none", "class", "text"), variant=("code-first", "position-first"),
                       order=("raster", "importance"))
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be {' or '.join(allowed)}: {getattr(self, name)!r}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd {self.n_embd} is not divisible by n_head {self.n_head}")
        if not 0 < self.seq_len <= self.num_positions:
            raise ValueError(f"seq_len {self.seq_len} must lie in [1, num_positions]")
        if self.cond == "text" and self.text_vocab_size <= 0:
            raise ValueError("cond='text' needs text_vocab_size (the tokenizer's vocab_size)")
        if not 0.0 <= self.cond_drop < 1.0 or (self.cond_drop > 0 and self.cond == "none"):
            raise ValueError(f"cond_drop {self.cond_drop} must lie in [0, 1); 0 without condition")


# Architecture presets; the data fixes codebook_size, num_positions and seq_len.
PRESETS = {
    "tiny":  dict(n_code_layers=2,  n_pos_layers=2,  n_embd=64,   n_head=4),   # unit tests
    "demo":  dict(n_code_layers=4,  n_pos_layers=2,  n_embd=256,  n_head=8),   # synthetic data
    "small": dict(n_code_layers=12, n_pos_layers=12, n_embd=1024, n_head=16),  # the released config
    "base":  dict(n_code_layers=18, n_pos_layers=6,  n_embd=1024, n_head=16),  # supp. Table 2: 307M
    "large": dict(n_code_layers=36, n_pos_layers=12, n_embd=1024, n_head=16),  # supp. Table 2: 607M
}


# -----------------------------------------------------------------------------
# Transformer blocks (pre-LN, minGPT / taming style, as the official code)

class CausalSelfAttention(nn.Module):

    def __init__(self, config: StackformerConfig):
        super().__init__()
        self.n_head, self.dropout = config.n_head, config.dropout
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.proj = nn.Linear(config.n_embd, config.n_embd)
        self.resid_drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, cache: Optional["KVCache"] = None, layer: int = 0):
        B, S, d = x.shape
        q, k, v = (z.view(B, S, self.n_head, d // self.n_head).transpose(1, 2)    # (B, nh, S, hd)
                   for z in self.qkv(x).split(d, dim=2))
        if cache is None:       # training: the whole sequence at once
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout * self.training, is_causal=True)
        else:                   # sampling: only the new token(s); the cache holds the earlier ones
            y = cache.attend(layer, q, k, v)
        y = y.transpose(1, 2).reshape(B, S, d)                            # (B, S, d)
        return self.resid_drop(self.proj(y))


class MLP(nn.Module):

    def __init__(self, config: StackformerConfig):
        super().__init__()
        self.fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.gelu = nn.GELU()
        self.proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.drop(self.proj(self.gelu(self.fc(x))))


class Block(nn.Module):

    def __init__(self, config: StackformerConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x, cache: Optional["KVCache"] = None, layer: int = 0):
        x = x + self.attn(self.ln_1(x), cache, layer)
        return x + self.mlp(self.ln_2(x))


class CausalTransformer(nn.Module):
    """Causal blocks; returns the last hidden states (no final LayerNorm: each head has its own)."""

    def __init__(self, config: StackformerConfig, n_layer: int):
        super().__init__()
        self.blocks = nn.ModuleList([Block(config) for _ in range(n_layer)])

    def forward(self, x: torch.Tensor, cache: Optional["KVCache"] = None,
                slots: Optional[torch.Tensor] = None) -> torch.Tensor:
        # Training: x is the whole sequence (B, S, d). Sampling: the new token(s), to cache `slots`.
        if cache is not None:
            cache.begin_step(slots)
        for layer, block in enumerate(self.blocks):
            x = block(x, cache, layer)
        return x


# -----------------------------------------------------------------------------
# Stackformer

class Stackformer(nn.Module):

    def __init__(self, config: StackformerConfig):
        super().__init__()
        self.config = config
        d, V, T, N = config.n_embd, config.codebook_size, config.num_positions, config.seq_len
        self.code_first = config.variant == "code-first"     # else Stackformer_r
        # Inputs of the lower transformer before image step 1: the start step, or the whole caption.
        self.prefix_len = config.text_len if config.cond == "text" else 1

        self.code_emb = nn.Embedding(V, d)          # E_v
        self.pos_emb = nn.Embedding(T + 1, d)       # E_p; row T is the start position p_0
        # a_t, the "extra absolute sequence position embedding": which step of the sequence this is,
        # as opposed to E_p, which says where in the image the token sits. Zero-init as official.
        self.abs_pos_emb = nn.Parameter(torch.zeros(1, N, d)) if config.abs_pos else None
        if config.cond == "none":
            self.start_token = nn.Parameter(torch.empty(1, 1, d))       # v_0 of every sequence
            nn.init.normal_(self.start_token, mean=0.0, std=0.02)
        elif config.cond == "class":
            # v_0 = the class; trained with cond_drop, row num_classes is the null class of guidance
            self.class_emb = nn.Embedding(config.num_classes + (config.cond_drop > 0), d)
        else:
            # The caption is a causal prefix with its own token and position embeddings.
            self.text_tok_emb = nn.Embedding(config.text_vocab_size, d)
            self.text_pos_emb = nn.Embedding(config.text_len, d)
        self.drop = nn.Dropout(config.dropout)

        self.code_transformer = CausalTransformer(config, config.n_code_layers)
        self.position_transformer = CausalTransformer(config, config.n_pos_layers)
        # Heads read the last hidden state through their own LayerNorm; no biases, as official.
        self.code_head = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, V, bias=False))
        self.pos_head = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, T, bias=False))

        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module):
        # N(0, 0.02) for every Linear/Embedding, zero biases; LayerNorm keeps weight 1, bias 0.
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def stack(self) -> Tuple[CausalTransformer, nn.Module, CausalTransformer, nn.Module]:
        """(lower transformer, its head, upper transformer, its head)."""
        code = (self.code_transformer, self.code_head)
        position = (self.position_transformer, self.pos_head)
        return (*code, *position) if self.code_first else (*position, *code)

    # --- embeddings

    def null_condition(self, cond: torch.Tensor) -> torch.Tensor:
        """The unconditional stand-in for `cond` that training with cond_drop put in its place: the
        null class, or the empty caption (all padding)."""
        if self.config.cond == "class":
            return torch.full_like(cond, self.config.num_classes)
        return torch.zeros_like(cond)                    # WordTokenizer.pad_id

    def _start_input(self, cond: Optional[torch.Tensor], batch_size: int) -> torch.Tensor:
        """Step 0 of the lower transformer: (B, 1, d), or (B, L, d) for a caption."""
        mode = self.config.cond
        if (cond is None) != (mode == "none"):
            raise ValueError(f"cond must be None exactly when the model is unconditional: {mode!r}")
        if mode == "text":
            # The caption takes the role of step 0: its last token's hidden state predicts v_1.
            return self.text_tok_emb(cond) + self.text_pos_emb.weight   # (B, L, d)
        if mode == "class":
            first = self.class_emb(cond)[:, None]                        # (B, 1, d)
        else:
            first = self.start_token.expand(batch_size, -1, -1)         # (B, 1, d)
        x = first + self.pos_emb.weight[self.config.num_positions]      # + E_p(p_0)
        if self.abs_pos_emb is not None:
            x = x + self.abs_pos_emb[:, :1]                              # + a_0
        return x

    # --- teacher-forced passes: training, and the no-KV-cache sampling path

    def _lower(self, prev_codes: torch.Tensor, prev_positions: torch.Tensor,
               cond: Optional[torch.Tensor]) -> torch.Tensor:
        """H_0, ..., H_S (B, S+1, d) from the inputs v_1..v_S, p_1..p_S (B, S) and the condition."""
        B, S = prev_codes.shape
        x = self.code_emb(prev_codes) + self.pos_emb(prev_positions)     # E_v(v_t) + E_p(p_t)
        if self.abs_pos_emb is not None:
            x = x + self.abs_pos_emb[:, 1:S + 1]                          # + a_t
        x = torch.cat([self._start_input(cond, B), x], dim=1)
        h = self.stack()[0](self.drop(x))                                # (B, prefix_len + S, d)
        return h[:, -(S + 1):]      # for text, H_0 is the last caption token's state

    def _upper(self, h: torch.Tensor, lower_targets: torch.Tensor) -> torch.Tensor:
        """Upper hidden states (B, S, d) from H_t (B, S, d) plus the embedded true next lower token.
        No dropout on this input: the official code drops out the lower input's embeddings only."""
        embed = self.code_emb if self.code_first else self.pos_emb   # E_v(v_{t+1}) or E_p(p_{t+1})
        return self.stack()[2](h + embed(lower_targets))

    def forward(self, codes: torch.Tensor, positions: torch.Tensor,
                cond: Optional[torch.Tensor] = None, loss: bool = False):
        """Teacher-forced logits: codes, positions (B, S) int64 are v_1..v_S, p_1..p_S (1 ≤ S ≤ N),
        cond None, labels (B,) or captions (B, L). -> code_logits (B, S, V), pos_logits (B, S, T):
        step t predicts codes[:, t], positions[:, t]. loss=True -> (CE_code + pos_weight · CE_pos,
        CE_code, CE_pos), means over the B·S image tokens (not the caption); computed here, so that
        DDP and torch.compile, which wrap forward, wrap the loss too."""
        _, lower_head, _, upper_head = self.stack()
        h = self._lower(codes[:, :-1], positions[:, :-1], cond)         # (B, S, d): H_0..H_{S-1}
        g = self._upper(h, codes if self.code_first else positions)      # (B, S, d)
        code_logits, pos_logits = lower_head(h), upper_head(g)
        if not self.code_first:         # Stackformer_r: the lower transformer predicts positions
            code_logits, pos_logits = pos_logits, code_logits
        if not loss:
            return code_logits, pos_logits
        # fp32: under bf16 autocast the logits are bf16, too coarse for a log-softmax over V classes
        code_ce = F.cross_entropy(code_logits.flatten(0, 1).float(), codes.flatten())
        pos_ce = F.cross_entropy(pos_logits.flatten(0, 1).float(), positions.flatten())
        return code_ce + self.config.pos_weight * pos_ce, code_ce, pos_ce

    def loss(self, codes: torch.Tensor, positions: torch.Tensor, cond=None):
        """(total, CE_code, CE_pos): forward(codes, positions, cond, loss=True)."""
        return self(codes, positions, cond, loss=True)

    # --- sampling: one token per step and transformer, with a KV cache

    def new_kv_caches(self) -> Tuple["KVCache", "KVCache"]:
        """Empty caches for the lower and the upper transformer."""
        lower, _, upper, _ = self.stack()
        N = self.config.seq_len
        return KVCache(len(lower.blocks), self.prefix_len + N - 1), KVCache(len(upper.blocks), N)

    @torch.no_grad()
    def sample_step(self, caches: Tuple["KVCache", "KVCache"], t, codes: torch.Tensor,
                    positions: torch.Tensor, cond: Optional[torch.Tensor], draw):
        """Step t of cached sampling: H_t from step t's input alone (the caches hold the steps
        before); draw(logits, t, is_code) picks and records the lower token (the code; the position
        for Stackformer_r), then the upper one from H_t plus that token. t = 0 (an int) reads cond;
        t ≥ 1 reads v_t, p_t from codes, positions (rows, N) and may be a (1,) device tensor, for a
        CUDA graph replaying one step for every t. Cache slot: prefix_len - 1 + t below, t above."""
        lower, lower_head, upper, upper_head = self.stack()
        offset, device = self.prefix_len - 1, codes.device
        step = torch.as_tensor(t, device=device).reshape(1)
        if isinstance(t, int) and t == 0:
            x = self._start_input(cond, codes.size(0))                      # (rows, prefix_len, d)
            slots = torch.arange(offset + 1, device=device)
        else:
            previous = step - 1
            x = self.code_emb(codes[:, previous]) + self.pos_emb(positions[:, previous])
            if self.abs_pos_emb is not None:
                x = x + self.abs_pos_emb[0].index_select(0, step)               # + a_t
            slots = step + offset
        h = lower(self.drop(x), caches[0], slots)[:, -1]                         # H_t (rows, d)
        token = draw(lower_head(h), t, self.code_first)
        embed = self.code_emb if self.code_first else self.pos_emb
        g = upper((h + embed(token))[:, None], caches[1], step)[:, 0]
        draw(upper_head(g), t, not self.code_first)

    def sampling_rows(self, batch_size: Optional[int], cond: Optional[torch.Tensor], settings):
        """-> (settings with the position rule filled in, the condition rows the model reads: with
        guidance 2B, cond and its null stand-in, B), or a ValueError for a call that cannot work."""
        if cond is not None and batch_size not in (None, cond.size(0)):
            raise ValueError(f"batch_size {batch_size} but cond has {cond.size(0)} rows")
        batch_size = batch_size if cond is None else cond.size(0)
        if batch_size is None:
            raise ValueError("give batch_size (unconditional) or cond")
        scale = settings.cfg_scale
        if scale != 1:
            if cond is None:
                raise ValueError(f"cfg_scale {scale} guides towards a condition: give cond")
            if not self.config.cond_drop > 0:
                raise ValueError(f"cfg_scale {scale} needs a model trained with null conditions "
                                 f"(cond_drop > 0); this one was not: sample with cfg_scale 1")
            cond = torch.cat([cond, self.null_condition(cond)])
        rule = {"raster": "increasing", "importance": "unique"}[self.config.order]   # the data's
        return replace(settings, position_rule=settings.position_rule or rule), cond, batch_size

    @torch.no_grad()
    def generate(self, batch_size: Optional[int] = None, cond: Optional[torch.Tensor] = None,
                 settings: Optional["SamplingConfig"] = None, generator=None, use_kv_cache=True):
        """Sample N (code, position) pairs per image -> codes (B, N), positions (B, N): each step
        the code, then its position (the reverse for Stackformer_r), drawn as settings say (see
        draw_token). cond: None, labels (B,) or captions (B, L); generator: a torch.Generator on the
        model's device. use_kv_cache=False recomputes the whole prefix each step (the reference for
        checking the cache). Runs in eval mode (then restored), reproducible attention only."""
        settings, cond, B = self.sampling_rows(batch_size, cond, settings or SamplingConfig())
        rows = B if cond is None else cond.size(0)
        N, device = self.config.seq_len, self.code_emb.weight.device
        codes = torch.zeros(rows, N, dtype=torch.long, device=device)
        positions = torch.zeros(rows, N, dtype=torch.long, device=device)
        noise = step_noise(settings, B, self.config, device, generator)

        def draw(logits, t, is_code):
            token = draw_token(logits, t, is_code, settings, positions,
                               noise=None if noise is None else noise[0 if is_code else 1][t])
            (codes if is_code else positions)[:, t] = token
            return token

        was_training = self.training
        self.eval()
        with reproducible_attention():
            caches = self.new_kv_caches()
            for t in range(N):
                if use_kv_cache:
                    self.sample_step(caches, t, codes, positions, cond, draw)
                    continue
                _, lower_head, _, upper_head = self.stack()
                h = self._lower(codes[:, :t], positions[:, :t], cond)            # (rows, t+1, d)
                draw(lower_head(h[:, -1]), t, self.code_first)
                g = self._upper(h, (codes if self.code_first else positions)[:, :t + 1])[:, -1]
                draw(upper_head(g), t, not self.code_first)
        self.train(was_training)
        return codes[:B], positions[:B]

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


# -----------------------------------------------------------------------------
# Sampling: the settings, the KV cache, the per-step draw, the position rules

@dataclass
class SamplingConfig:
    """How generate() draws each token (defaults of the official code); sample.py's flags."""
    temperature: float = 1.0                # code logits are divided by this
    top_k: int = 100                        # codes: keep the k most likely (0 = off)
    top_p: float = 0.95                     # codes: nucleus mass (1 = off)
    pos_temperature: Optional[float] = None  # position logits are divided by this (default: temperature)
    pos_top_k: int = 10                     # positions: keep the k most likely (0 = off)
    pos_top_p: float = 0.95                 # positions: nucleus mass (1 = off)
    position_rule: Optional[str] = None     # increasing | unique (default: by the model's order)
    greedy: bool = False                    # argmax everywhere: no temperature, filters or noise
    cfg_scale: float = 1.0                  # guidance: logits uncond + s·(cond − uncond); 1 = none
    cfg_schedule: str = "constant"          # constant | linear (s from 1 at step 1 to cfg_scale)
    cfg_codes_only: bool = False            # guide the codes only; positions: conditional logits

    def __post_init__(self):
        # Each message starts with the field's name, which sample.py turns into its flag.
        pos_temperature = self.temperature if self.pos_temperature is None else self.pos_temperature
        positive = "be positive (greedy for argmax)"
        rules, schedules = (None, "increasing", "unique"), ("constant", "linear")
        for name, ok, rule in [
                ("temperature", self.greedy or self.temperature > 0, positive),
                ("pos_temperature", self.greedy or pos_temperature > 0, positive),
                ("top_k", self.top_k >= 0, "be >= 0 (0 = off)"),
                ("pos_top_k", self.pos_top_k >= 0, "be >= 0 (0 = off)"),
                ("top_p", 0 < self.top_p <= 1, "lie in (0, 1] (1 = off)"),
                ("pos_top_p", 0 < self.pos_top_p <= 1, "lie in (0, 1] (1 = off)"),
                ("position_rule", self.position_rule in rules, "be increasing or unique"),
                ("cfg_scale", self.cfg_scale >= 0, "be >= 0 (1 = no guidance)"),
                ("cfg_schedule", self.cfg_schedule in schedules, "be constant or linear")]:
            if not ok:
                raise ValueError(f"{name} must {rule}, got {getattr(self, name)!r}")


class KVCache:
    """Keys and values (B, n_head, max_len, head_dim) per layer, so a step runs only its new token (the official
    code recomputes the prefix, twice a step); fast_sampling.SlotKVCache has fixed shapes, for CUDA graphs."""

    def __init__(self, n_layer: int, max_len: int):
        self.max_len = max_len
        self.keys, self.values, self.length = [None] * n_layer, [None] * n_layer, [0] * n_layer

    def begin_step(self, slots: torch.Tensor):
        pass    # the step's tokens follow the ones before; a slot cache writes them to `slots`

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Write k, v (B, n_head, S, head_dim) after the positions cached, then attend q over all of them."""
        if self.keys[layer] is None:
            B, n_head, _, head_dim = k.shape
            self.keys[layer], self.values[layer] = (t.new_empty(B, n_head, self.max_len, head_dim) for t in (k, v))
        start, end = self.length[layer], self.length[layer] + k.size(2)
        self.keys[layer][:, :, start:end], self.values[layer][:, :, start:end] = k, v
        self.length[layer] = end
        # Several tokens come only at step 0 (a caption), into an empty cache: causal among them.
        k, v = self.keys[layer][:, :, :end], self.values[layer][:, :, :end]
        return F.scaled_dot_product_attention(q, k, v, is_causal=q.size(2) > 1)


def step_noise(settings: SamplingConfig, batch_size: int, config: StackformerConfig, device,
               generator: Optional[torch.Generator], out=None):
    """sample_token's Exp(1) draws for all N steps, taken before the first: codes (N, B, V), then
    positions (N, B, T) (None when greedy); the seed's tokens rest on this order. out: to refill."""
    if settings.greedy:
        return None
    N, B = config.seq_len, batch_size
    out = out or (torch.empty(N, B, config.codebook_size, device=device),
                  torch.empty(N, B, config.num_positions, device=device))
    for draws in out:
        draws.exponential_(1.0, generator=generator)
    return out


def guided_logits(logits: torch.Tensor, t: torch.Tensor, num_steps: int, settings: SamplingConfig,
                  is_code: bool) -> torch.Tensor:
    """Classifier-free guidance: (2B, K) logits of the conditional and the unconditional rows ->
    (B, K) uncond + s·(cond − uncond). t: the (1,) step tensor, for the linear ramp of s."""
    cond, uncond = logits.float().chunk(2)
    if not is_code and settings.cfg_codes_only:
        return cond
    scale = settings.cfg_scale
    if settings.cfg_schedule == "linear":       # 1 at the first step, cfg_scale at the last
        scale = 1 + (scale - 1) * (t.float() + 1) / num_steps
    return uncond + scale * (cond - uncond)


def draw_token(logits: torch.Tensor, t, is_code: bool, settings: SamplingConfig,
               positions: torch.Tensor, noise: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Step t's code (is_code) or position for every row of logits (rows, K) -> (rows,): guidance,
    the position rule (filled in by Stackformer.sampling_rows), then sample_token with noise, step
    t's draws (B, K). positions (rows, N): those drawn before t. With guidance the rows are B
    conditional and B unconditional sequences; both get the token drawn from the guided logits, so
    they stay one sequence read under two conditions. t: an int or (CUDA graphs) a (1,) tensor."""
    t = torch.as_tensor(t, device=logits.device).reshape(1)
    s = settings
    if s.cfg_scale != 1:
        logits = guided_logits(logits, t, positions.size(1), s, is_code)            # (B, K)
    if is_code:
        temperature, top_k, top_p = s.temperature, s.top_k, s.top_p
    else:
        taken = positions[:logits.size(0)]
        forbidden = forbidden_positions(taken, t, logits.size(-1), s.position_rule)
        logits = logits.masked_fill(forbidden, float("-inf"))
        temperature = s.temperature if s.pos_temperature is None else s.pos_temperature
        top_k, top_p = s.pos_top_k, s.pos_top_p
    token = sample_token(logits, temperature, top_k, top_p, s.greedy, noise=noise)
    return token.repeat(2) if s.cfg_scale != 1 else token


def reproducible_attention():
    """SDPA restricted to backends whose forward pass is bitwise reproducible: left to choose, torch
    2.11 on an H200 ran the KV-cache attention (bf16, boolean mask) on cuDNN, and two identical
    sampling runs drew different codes after about 70 steps; without cuDNN (flash, memory-efficient
    or math attention) the tokens were identical run after run."""
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                        SDPBackend.MATH])


def sample_token(logits: torch.Tensor, temperature: float = 1.0, top_k: Optional[int] = None,
                 top_p: Optional[float] = None, greedy: bool = False, generator=None,
                 noise: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One token per row of logits (B, K) → (B,): top-k on logits, softmax, top-p, then a draw.

    top-k keeps the tokens whose logit is at least the k-th largest (ties included, as official).
    top-p (nucleus) then keeps the smallest set of most likely tokens whose probability reaches
    top_p: a token is dropped when those ranked before it already reach top_p, so the top token
    stays. Ranked by logit, equal logits by index; -inf entries (forbidden positions) stay
    impossible. top_k None/0, top_p None/≥1: that filter is off. Greedy: the argmax, no more.
    noise: Exp(1) draws (B, K) to use instead of drawing them from `generator`."""
    logits = logits.float()
    if greedy:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    race = torch.empty_like(logits).exponential_(generator=generator) if noise is None else noise
    nucleus = top_p is not None and top_p < 1.0
    order = None
    if top_k or nucleus:
        # Both filters act on the tokens ranked by logit: one stable sort serves both (in sampling's
        # CUDA graph it replaced a top-k kernel plus a second sort of the probabilities).
        logits, order = logits.sort(dim=-1, descending=True, stable=True)          # (B, K) ranked
        race = race.gather(-1, order)
    if top_k:
        k = min(top_k, logits.size(-1))
        kth_largest = logits[:, k - 1:k]                                            # (B, 1)
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    probs = F.softmax(logits, dim=-1)
    if nucleus:
        mass_before = probs.cumsum(dim=-1) - probs      # of the tokens ranked before each one
        probs = probs.masked_fill(mass_before >= top_p, 0.0)
    # A categorical draw as an "exponential race": argmax_i p_i / E_i with E_i ~ Exp(1) picks i
    # with probability p_i / sum(p), so the kept probabilities need no renormalising.
    # torch.multinomial draws the same way but checks its input with a host sync first; this keeps
    # the step loop sync-free. The clamp guards an E_i of exactly 0.
    winner = (probs / race.clamp_min(torch.finfo(race.dtype).tiny)).argmax(dim=-1)
    return winner if order is None else order.gather(-1, winner[:, None])[:, 0]


def forbidden_positions(positions: torch.Tensor, t, num_positions: int, rule: str) -> torch.Tensor:
    """(B, T) bool: positions that may not be sampled at 0-based step t, given positions[:, :t].
    "unique": any position already taken. "increasing": p_{t+1} must exceed p_t and leave room for
    the N - 1 - t positions still to come, so p_{t+1} ≤ T - N + t (the first lies in 0..T-N).
    t: an int, or a (1,) int64 tensor (then no Python value is involved: CUDA-graph safe)."""
    B, N = positions.shape
    t = torch.as_tensor(t, device=positions.device).reshape(1)
    candidates = torch.arange(num_positions, device=positions.device)   # (T,)
    if rule == "unique":
        filled = (torch.arange(N, device=positions.device) < t).float().expand(B, N)  # steps < t
        taken = torch.zeros(B, num_positions, device=positions.device)
        return taken.scatter_reduce_(1, positions, filled, reduce="amax") > 0
    previous = positions.gather(1, (t - 1).clamp_min(0).expand(B, 1))  # (B, 1)
    previous = torch.where(t > 0, previous, torch.full_like(previous, -1))
    return (candidates <= previous) | (candidates > num_positions - N + t)


# -----------------------------------------------------------------------------
# Text conditioning: a word-level tokenizer built from the training captions

class WordTokenizer:
    """Lowercased words → ids, fixed length text_len (supp. §1: 32), stored in the checkpoint.

    A word is a maximal run of Unicode letters and digits (regex [^\\W_]+ after lowercasing);
    everything else separates words: "A dog's ball." → ["a", "dog", "s", "ball"]. Ids: 0 = pad,
    1 = unknown word, then the vocabulary sorted by count (descending), ties alphabetically."""

    pad_id, unk_id = 0, 1
    word_pattern = re.compile(r"[^\W_]+")

    def __init__(self, words: List[str], text_len: int = 32):
        self.words = list(words)                 # id 2 + i is words[i]
        self.text_len = text_len
        self.word_to_id = {w: i + 2 for i, w in enumerate(self.words)}

    @classmethod
    def split(cls, text: str) -> List[str]:
        return cls.word_pattern.findall(text.lower())

    @classmethod
    def build(cls, captions: Iterable[str], min_count: int = 1, max_size: Optional[int] = None,
              text_len: int = 32) -> "WordTokenizer":
        """Vocabulary of the words seen min_count times or more; max_size keeps the commonest."""
        counts = Counter(word for caption in captions for word in cls.split(caption))
        words = sorted((w for w in counts if counts[w] >= min_count), key=lambda w: (-counts[w], w))
        return cls(words[:max_size] if max_size is not None else words, text_len)

    @property
    def vocab_size(self) -> int:
        return len(self.words) + 2

    def encode(self, text: str) -> List[int]:
        """text_len ids: truncated, then padded at the end with pad_id."""
        ids = [self.word_to_id.get(w, self.unk_id) for w in self.split(text)][:self.text_len]
        return ids + [self.pad_id] * (self.text_len - len(ids))

    def encode_batch(self, texts: Iterable[str]) -> torch.Tensor:
        return torch.tensor([self.encode(t) for t in texts], dtype=torch.long)   # (B, text_len)

    def decode(self, ids) -> str:
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else ids
        return " ".join("<unk>" if i == self.unk_id else self.words[i - 2]
                        for i in ids if i != self.pad_id)

    def to_dict(self) -> dict:
        """Plain Python types only, which torch.load(weights_only=True) reads back."""
        return {"words": list(self.words), "text_len": self.text_len}

    @classmethod
    def from_dict(cls, d: dict) -> "WordTokenizer":
        return cls(d["words"], d["text_len"])
