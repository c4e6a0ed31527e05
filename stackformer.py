"""
Stackformer: the second stage of "Not All Image Regions Matter: Masked Vector Quantization for
Autoregressive Image Generation" (Huang, Mao, Wang, Zhang; CVPR 2023).

MQ-VAE keeps only N of the T = H·W latent positions, so an image becomes N (code, position)
pairs (v_1, p_1), ..., (v_N, p_N): codes v ∈ [0, V), positions p ∈ [0, T) as raster indices
row·W + col. Stackformer models them autoregressively with two causal transformers stacked on
each other. At step t:

    Code-Transformer      reads E_v(v_t) + E_p(p_t) + a_t       its hidden state H_t predicts v_{t+1}
    Position-Transformer  reads H_t + E_v(v_{t+1})             and predicts p_{t+1}

so every step first decides *what* comes next and then *where* it goes. v_0 is the condition (a
start token, a class, or a 32-token text prefix), p_0 a start position, a_t a learned absolute
sequence embedding. Stackformer_r (supp. Table 3, `variant="position-first"`) swaps the roles:
the sequence-reading transformer predicts p_{t+1} and the stacked one predicts v_{t+1} from
H_t + E_p(p_{t+1}). In the code we call the transformer that reads the sequence the *lower* one
and the transformer stacked on it the *upper* one.

This file holds the model only: config and presets, both transformers, conditioning
(unconditional, class, text with a word-level tokenizer) and the reference sampler `generate()`
with a KV cache. The training loop is in train_stackformer.py; fast_sampling.py runs the same
sampling steps as CUDA graphs with a fused attention kernel.

    config = StackformerConfig(**PRESETS["base"], codebook_size=1024, num_positions=1024, seq_len=256)
    model = Stackformer(config)
    loss, code_ce, pos_ce = model.loss(codes, positions)     # (B, N) int64 each, raster order
    codes, positions = model.generate(batch_size=16)         # (B, N) each
"""

import re
from collections import Counter
from dataclasses import dataclass
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
    abs_pos: bool = True            # learned absolute sequence embedding a_t (supp. Table 3 ablation)
    variant: str = "code-first"     # "code-first" (Stackformer) | "position-first" (Stackformer_r)
    order: str = "raster"           # order of the training sequences: "raster" | "importance"
    pos_weight: float = 1.0         # loss = CE_code + pos_weight · CE_pos
    cond_drop: float = 0.0          # training-time share of null conditions (classifier-free guidance needs > 0)

    def __post_init__(self):
        if self.cond not in ("none", "class", "text"):
            raise ValueError(f"cond must be none, class or text, got {self.cond!r}")
        if self.variant not in ("code-first", "position-first"):
            raise ValueError(f"variant must be code-first or position-first, got {self.variant!r}")
        if self.order not in ("raster", "importance"):
            raise ValueError(f"order must be raster or importance, got {self.order!r}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd {self.n_embd} is not divisible by n_head {self.n_head}")
        if not 0 < self.seq_len <= self.num_positions:
            raise ValueError(f"seq_len {self.seq_len} must lie in [1, num_positions={self.num_positions}]")
        if self.cond == "text" and self.text_vocab_size <= 0:
            raise ValueError("cond='text' needs text_vocab_size (the tokenizer's vocab_size)")
        if not 0.0 <= self.cond_drop < 1.0 or (self.cond_drop > 0 and self.cond == "none"):
            raise ValueError(f"cond_drop must lie in [0, 1) and needs a class or text condition, got {self.cond_drop}")


# Architecture presets; the data fixes codebook_size, num_positions and seq_len.
PRESETS = {
    "tiny":  dict(n_code_layers=2,  n_pos_layers=2,  n_embd=64,   n_head=4),   # unit tests
    "demo":  dict(n_code_layers=4,  n_pos_layers=2,  n_embd=256,  n_head=8),   # minutes on synthetic data
    "small": dict(n_code_layers=12, n_pos_layers=12, n_embd=1024, n_head=16),  # the released config
    "base":  dict(n_code_layers=18, n_pos_layers=6,  n_embd=1024, n_head=16),  # supp. Table 2: 307M
    "large": dict(n_code_layers=36, n_pos_layers=12, n_embd=1024, n_head=16),  # supp. Table 2: 607M
}


# -----------------------------------------------------------------------------
# Transformer blocks (pre-LN, minGPT / taming style, as the official code)

class CausalSelfAttention(nn.Module):

    def __init__(self, config: StackformerConfig):
        super().__init__()
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.proj = nn.Linear(config.n_embd, config.n_embd)
        self.resid_drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, cache: Optional["KVCache"] = None, layer: int = 0) -> torch.Tensor:
        B, S, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=2)
        q = q.view(B, S, self.n_head, d // self.n_head).transpose(1, 2)   # (B, nh, S, hd)
        k = k.view(B, S, self.n_head, d // self.n_head).transpose(1, 2)   # (B, nh, S, hd)
        v = v.view(B, S, self.n_head, d // self.n_head).transpose(1, 2)   # (B, nh, S, hd)
        if cache is None:       # training: the whole sequence at once
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0,
                                               is_causal=True)
        else:                   # generation: only the new token(s); the cache holds the earlier ones
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
        x = x + self.mlp(self.ln_2(x))
        return x


class CausalTransformer(nn.Module):
    """A stack of causal blocks; returns the last hidden states (no final LayerNorm: each head has its own)."""

    def __init__(self, config: StackformerConfig, n_layer: int):
        super().__init__()
        self.blocks = nn.ModuleList([Block(config) for _ in range(n_layer)])

    def forward(self, x: torch.Tensor, cache: Optional["KVCache"] = None,
                slots: Optional[torch.Tensor] = None) -> torch.Tensor:
        # Training: x is the whole sequence (B, S, d). Generation: x holds only the new token(s),
        # which go to `slots` of `cache`.
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

        self.code_emb = nn.Embedding(V, d)          # E_v
        self.pos_emb = nn.Embedding(T + 1, d)       # E_p; row T is the start position p_0
        # a_t, the "extra absolute sequence position embedding": which step of the sequence this
        # is, as opposed to E_p, which says where in the image the token sits. Zero-init as official.
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

    # Which transformer reads the sequence (lower) and which is stacked on top of it (upper).
    @property
    def code_first(self) -> bool:
        return self.config.variant == "code-first"

    @property
    def lower(self) -> CausalTransformer:
        return self.code_transformer if self.code_first else self.position_transformer

    @property
    def upper(self) -> CausalTransformer:
        return self.position_transformer if self.code_first else self.code_transformer

    @property
    def lower_head(self) -> nn.Module:
        return self.code_head if self.code_first else self.pos_head

    @property
    def upper_head(self) -> nn.Module:
        return self.pos_head if self.code_first else self.code_head

    def embed_lower_prediction(self, tokens: torch.Tensor) -> torch.Tensor:
        """E_v(v_{t+1}) for Stackformer, E_p(p_{t+1}) for Stackformer_r: what the upper transformer adds to H_t."""
        return self.code_emb(tokens) if self.code_first else self.pos_emb(tokens)

    def null_condition(self, cond: torch.Tensor) -> torch.Tensor:
        """The unconditional stand-in for `cond` that training with cond_drop put in its place: the null
        class, or the empty caption (all padding)."""
        if self.config.cond == "class":
            return torch.full_like(cond, self.config.num_classes)
        return torch.zeros_like(cond)                    # WordTokenizer.pad_id

    @property
    def prefix_len(self) -> int:
        """Length of the lower transformer's input before image step 1: the start step, or the caption."""
        return self.config.text_len if self.config.cond == "text" else 1

    # --- inputs of the lower transformer

    def _start_input(self, cond: Optional[torch.Tensor], batch_size: int) -> torch.Tensor:
        """Step 0 of the lower transformer: (B, 1, d), or (B, L, d) for a caption."""
        mode = self.config.cond
        if (cond is None) != (mode == "none"):
            raise ValueError(f"cond must be None exactly when the model is unconditional (cond={mode!r})")
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

    def _step_input(self, codes: torch.Tensor, positions: torch.Tensor, first_step: int) -> torch.Tensor:
        """E_v(v_t) + E_p(p_t) + a_t for steps t = first_step, ..., first_step + S - 1: (B, S, d)."""
        x = self.code_emb(codes) + self.pos_emb(positions)
        if self.abs_pos_emb is not None:
            x = x + self.abs_pos_emb[:, first_step:first_step + codes.size(1)]
        return x

    # --- teacher-forced passes (training; also the no-KV-cache generation path)

    def _lower(self, prev_codes: torch.Tensor, prev_positions: torch.Tensor,
               cond: Optional[torch.Tensor]) -> torch.Tensor:
        """H_0, ..., H_S (B, S+1, d) from the inputs v_1..v_S, p_1..p_S (B, S) and the condition."""
        B, S = prev_codes.shape
        x = torch.cat([self._start_input(cond, B), self._step_input(prev_codes, prev_positions, 1)], dim=1)
        h = self.lower(self.drop(x))                                     # (B, prefix_len + S, d)
        return h[:, -(S + 1):]      # for text, H_0 is the last caption token's state

    def _upper(self, h: torch.Tensor, lower_targets: torch.Tensor) -> torch.Tensor:
        """Upper hidden states (B, S, d) from H_t (B, S, d) plus the embedded true next lower token."""
        # No extra dropout here: the official code applies embedding dropout to the lower input only.
        return self.upper(h + self.embed_lower_prediction(lower_targets))

    def forward(self, codes: torch.Tensor, positions: torch.Tensor,
                cond: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forced logits for a batch of sequences.

        codes, positions: (B, S) int64, v_1..v_S and p_1..p_S (1 ≤ S ≤ N); cond: None, class labels
        (B,) or caption tokens (B, L). Returns code_logits (B, S, V) and pos_logits (B, S, T);
        step t predicts v_{t+1} and p_{t+1}, i.e. codes[:, t] and positions[:, t].
        """
        h = self._lower(codes[:, :-1], positions[:, :-1], cond)         # (B, S, d): H_0..H_{S-1}
        lower_targets = codes if self.code_first else positions
        g = self._upper(h, lower_targets)                                # (B, S, d)
        lower_logits, upper_logits = self.lower_head(h), self.upper_head(g)
        if self.code_first:
            return lower_logits, upper_logits
        return upper_logits, lower_logits

    def loss(self, codes: torch.Tensor, positions: torch.Tensor,
             cond: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(total, CE_code, CE_pos): mean cross-entropies over all B·N image tokens (never the caption)."""
        code_logits, pos_logits = self(codes, positions, cond)
        code_ce = F.cross_entropy(code_logits.flatten(0, 1), codes.flatten())
        pos_ce = F.cross_entropy(pos_logits.flatten(0, 1), positions.flatten())
        return code_ce + self.config.pos_weight * pos_ce, code_ce, pos_ce

    # --- sampling (the reference sampler; fast_sampling.py replays sample_step as a CUDA graph)

    def new_kv_caches(self, batch_size: int, cache_class=None) -> Tuple["KVCache", "KVCache"]:
        """Empty caches for the lower and the upper transformer (slot layout: see KVCache)."""
        cache_class = cache_class or KVCache
        device = self.code_emb.weight.device
        N = self.config.seq_len
        lower = cache_class(len(self.lower.blocks), self.prefix_len + N - 1, batch_size, device)
        upper = cache_class(len(self.upper.blocks), N, batch_size, device)
        return lower, upper

    @torch.no_grad()
    def lower_step(self, cache: "KVCache", t, prev_code: Optional[torch.Tensor],
                   prev_position: Optional[torch.Tensor], cond: Optional[torch.Tensor]) -> torch.Tensor:
        """H_t (B, d) from step t's input alone; the cache holds steps < t.

        t = 0 (a Python int) reads the condition; prev_code, prev_position are ignored. For t ≥ 1,
        t may be an int or a (1,) int64 tensor on the model's device, and v_t, p_t (B,) are read:
        with a tensor nothing in the step depends on a Python value, so it can be captured once in
        a CUDA graph and replayed for every t.
        """
        offset = self.prefix_len - 1           # slot of step t is offset + t
        if isinstance(t, int) and t == 0:
            x = self._start_input(cond, cache.batch_size)                # (B, prefix_len, d)
            return self.lower(self.drop(x), cache, cache.slot_ids[:offset + 1])[:, -1]
        t = torch.as_tensor(t, device=cache.slot_ids.device).reshape(1)
        x = self.code_emb(prev_code) + self.pos_emb(prev_position)      # (B, d)
        if self.abs_pos_emb is not None:
            x = x + self.abs_pos_emb[0].index_select(0, t)               # + a_t
        return self.lower(self.drop(x[:, None]), cache, t + offset)[:, -1]

    @torch.no_grad()
    def upper_step(self, cache: "KVCache", t, h: torch.Tensor, lower_token: torch.Tensor) -> torch.Tensor:
        """Upper hidden state (B, d) at step t (int or (1,) tensor) from H_t (B, d) and the chosen next lower token (B,)."""
        t = torch.as_tensor(t, device=cache.slot_ids.device).reshape(1)
        x = (h + self.embed_lower_prediction(lower_token))[:, None]     # (B, 1, d)
        return self.upper(x, cache, t)[:, 0]

    @torch.no_grad()
    def sample_step(self, sampler: "Sampler", caches: Tuple["KVCache", "KVCache"], t, cond=None):
        """Step t of cached sampling: the lower prediction (the code; the position for Stackformer_r) is
        drawn from H_t, then the upper one from H_t plus the drawn token. Step 0 reads the condition
        (t a Python 0); for t ≥ 1, t may be a (1,) device tensor (see lower_step)."""
        lower_cache, upper_cache = caches
        if isinstance(t, int) and t == 0:
            h = self.lower_step(lower_cache, 0, None, None, cond)
        else:
            prev = torch.as_tensor(t, device=sampler.codes.device).reshape(1) - 1
            h = self.lower_step(lower_cache, t, sampler.codes.index_select(1, prev)[:, 0],
                                sampler.positions.index_select(1, prev)[:, 0], None)
        lower_token = sampler.draw(self.lower_head(h), t, is_code=self.code_first)
        g = self.upper_step(upper_cache, t, h, lower_token)
        sampler.draw(self.upper_head(g), t, is_code=not self.code_first)

    @torch.no_grad()
    def generate(self, batch_size: Optional[int] = None, cond: Optional[torch.Tensor] = None,
                 temperature: float = 1.0, top_k: Optional[int] = 100, top_p: Optional[float] = 0.95,
                 pos_temperature: Optional[float] = None, pos_top_k: Optional[int] = 10,
                 pos_top_p: Optional[float] = 0.95, position_rule: Optional[str] = None, greedy: bool = False,
                 cfg_scale: float = 1.0, cfg_schedule: str = "constant", cfg_codes_only: bool = False,
                 use_kv_cache: bool = True, generator: Optional[torch.Generator] = None
                 ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Sample N (code, position) pairs per image: codes (B, N), positions (B, N).

        Each step samples the code, then its position (the reverse for Stackformer_r). Logits are
        filtered by top-k, then nucleus top-p, then sampled (argmax if greedy); see sample_token.
        position_rule: "increasing" (positions strictly increase and leave room for the remaining
        steps, like the raster-ordered training data) or "unique" (official: only no repeats).
        None picks "increasing" for raster-order models and "unique" for importance-order ones.
        cfg_scale: classifier-free guidance (models trained with cond_drop > 0): each step's logits are
        uncond + s·(cond − uncond), the unconditional stream running beside the conditional one as a batch
        of 2B; 1 is plain conditional sampling. cfg_schedule "linear" ramps s from 1 to cfg_scale over the
        steps; cfg_codes_only guides the codes and leaves the positions to the conditional logits.
        generator: a torch.Generator on the model's device. All the randomness of the N steps is drawn
        from it up front (Sampler), so every path consumes the same noise: the same seed gives the same
        tokens with and without the KV cache, and in fast_sampling.generate.
        use_kv_cache=False recomputes the whole prefix every step (the reference for checking the cache).
        Runs with reproducible attention kernels only (see reproducible_attention); the model is put
        in eval mode for sampling and restored afterwards.
        """
        sampler = Sampler(self, batch_size, cond, temperature, top_k, top_p, pos_temperature, pos_top_k, pos_top_p,
                          position_rule, greedy, cfg_scale, cfg_schedule, cfg_codes_only)
        sampler.draw_noise(generator)
        was_training = self.training
        self.eval()
        with reproducible_attention():
            if use_kv_cache:
                caches = self.new_kv_caches(sampler.rows)
                for t in range(self.config.seq_len):
                    self.sample_step(sampler, caches, t, sampler.cond)
            else:
                lower_tokens = sampler.codes if self.code_first else sampler.positions
                for t in range(self.config.seq_len):
                    h = self._lower(sampler.codes[:, :t], sampler.positions[:, :t], sampler.cond)   # (rows, t+1, d)
                    sampler.draw(self.lower_head(h[:, -1]), t, is_code=self.code_first)
                    g = self._upper(h, lower_tokens[:, :t + 1])[:, -1]
                    sampler.draw(self.upper_head(g), t, is_code=not self.code_first)
        self.train(was_training)
        return sampler.result()

    # --- bookkeeping

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Parameter count; exclude_embeddings keeps only the transformers and the heads (matmul weights)."""
        if exclude_embeddings:
            modules = (self.code_transformer, self.position_transformer, self.code_head, self.pos_head)
            return sum(p.numel() for m in modules for p in m.parameters())
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self) -> float:
        """Training FLOPs (forward + backward) per image token, i.e. per (code, position) pair, for MFU.

        As in the PaLM appendix and nanoGPT: a weight matrix with P entries costs 6·P FLOPs per token
        it processes, and attention over a context of S tokens costs 12·n_layer·d·S per token
        (QKᵀ and AV, 2 FLOPs per multiply-add, ×3 for the backward pass, causal mask not discounted).
        Without a caption both transformers run over S = N tokens, so this is
            6·(non-embedding params) + 12·(n_code_layers + n_pos_layers)·d·N.
        With a caption the lower transformer runs over S = L + N − 1 tokens; the total is divided by N.
        """
        cfg = self.config
        d, N = cfg.n_embd, cfg.seq_len
        flops = 0
        for tower, S in ((self.lower, self.prefix_len + N - 1), (self.upper, N)):
            tower_params = sum(p.numel() for p in tower.parameters())
            flops += S * (6 * tower_params + 12 * len(tower.blocks) * d * S)
        head_params = sum(p.numel() for m in (self.code_head, self.pos_head) for p in m.parameters())
        flops += N * 6 * head_params
        return flops / N


# -----------------------------------------------------------------------------
# Sampling: the KV cache, the per-step draw, the position rules

class KVCache:
    """Keys and values of one transformer during generation, preallocated for the whole sample.

    Every layer owns K and V tensors of shape (B, n_head, max_len, head_dim). A step writes the keys
    and values of its new token(s) into fixed slots with `index_copy_` and attends over the whole
    cache with a causal mask (slot j is visible from slot s iff j ≤ s), rather than over a slice
    `[:, :, :s+1]`: every step then has the same shapes and reads its slot numbers from a tensor,
    never from a Python int, so a step can be compiled and captured in a CUDA graph as it is
    (fast_sampling.py). The price, reading unwritten slots too, is what fast_sampling's kernel saves.

    Slot layout (filled by Stackformer.lower_step / upper_step):
      lower transformer, cond none/class: slot t holds step t's input E_v(v_t) + E_p(p_t) + a_t,
          slot 0 the start step (condition token + start position); max_len = N.
      lower transformer, cond text: slots 0..L-1 hold the L text tokens, prefilled in one causal
          pass; slot L-1+t holds image step t ≥ 1; max_len = L + N - 1.
      upper transformer: slot t holds H_t + E_v(v_{t+1}) (code-first) or H_t + E_p(p_{t+1})
          (position-first); max_len = N.
    """

    def __init__(self, n_layer: int, max_len: int, batch_size: int, device):
        self.max_len, self.batch_size = max_len, batch_size
        self.slot_ids = torch.arange(max_len, device=device)    # (max_len,)
        self.keys: List[Optional[torch.Tensor]] = [None] * n_layer
        self.values: List[Optional[torch.Tensor]] = [None] * n_layer
        self.slots: Optional[torch.Tensor] = None               # (S,) slots of the current step
        self.mask: Optional[torch.Tensor] = None                # (S, max_len) slots it may attend to

    def begin_step(self, slots: torch.Tensor):
        self.slots = slots
        self.mask = self.slot_ids[None, :] <= slots[:, None]    # (S, max_len), causal

    def allocate(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        # At the first write, so that the cache takes the dtype autocast gives k and v.
        if self.keys[layer] is None:
            B, n_head, _, head_dim = k.shape
            self.keys[layer] = k.new_zeros(B, n_head, self.max_len, head_dim)
            self.values[layer] = v.new_zeros(B, n_head, self.max_len, head_dim)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Write k, v (B, n_head, S, head_dim) into this step's slots, then attend q over the cache."""
        self.allocate(layer, k, v)
        self.keys[layer].index_copy_(2, self.slots, k)
        self.values[layer].index_copy_(2, self.slots, v)
        return F.scaled_dot_product_attention(q, self.keys[layer], self.values[layer], attn_mask=self.mask)


class Sampler:
    """One batch being sampled: the settings, the tokens drawn so far, codes and positions (rows, N), and the
    random numbers of all N steps, drawn up front by draw_noise. Drawing them up front is what lets the
    cached, uncached and graphed paths consume exactly the same noise, and keeps the step loop free of
    host syncs. With guidance (cfg_scale ≠ 1) the model runs rows = 2B sequences, the B conditional ones
    and B unconditional ones (cond replaced by the null condition); both get the token drawn from the
    guided logits, so they stay the same sequence read under two conditions."""

    def __init__(self, model: "Stackformer", batch_size: Optional[int], cond: Optional[torch.Tensor],
                 temperature: float = 1.0, top_k: Optional[int] = 100, top_p: Optional[float] = 0.95,
                 pos_temperature: Optional[float] = None, pos_top_k: Optional[int] = 10,
                 pos_top_p: Optional[float] = 0.95, position_rule: Optional[str] = None, greedy: bool = False,
                 cfg_scale: float = 1.0, cfg_schedule: str = "constant", cfg_codes_only: bool = False):
        cfg = model.config
        if cond is not None:
            if batch_size is not None and batch_size != cond.size(0):
                raise ValueError(f"batch_size {batch_size} but cond has {cond.size(0)} rows")
            batch_size = cond.size(0)
        if batch_size is None:
            raise ValueError("give batch_size (unconditional) or cond")
        rule = position_rule or ("increasing" if cfg.order == "raster" else "unique")
        if rule not in ("increasing", "unique"):
            raise ValueError(f"position_rule must be increasing or unique, got {rule!r}")
        if cfg_schedule not in ("constant", "linear"):
            raise ValueError(f"cfg_schedule must be constant or linear, got {cfg_schedule!r}")
        self.guided = cfg_scale != 1.0
        if self.guided and cond is None:
            raise ValueError(f"cfg_scale {cfg_scale} guides towards a condition: give cond (class labels or captions)")
        if self.guided and not cfg.cond_drop > 0:
            raise ValueError(f"cfg_scale {cfg_scale} needs a model trained with null conditions (cond_drop > 0); "
                             f"this one was not: sample with cfg_scale 1")
        self.code_filter = (temperature, top_k, top_p)
        self.pos_filter = (temperature if pos_temperature is None else pos_temperature, pos_top_k, pos_top_p)
        self.rule, self.greedy, self.batch_size = rule, greedy, batch_size
        self.cfg_scale, self.cfg_linear, self.cfg_codes_only = cfg_scale, cfg_schedule == "linear", cfg_codes_only
        self.set_condition(model, cond)
        self.rows = 2 * batch_size if self.guided else batch_size
        device = model.code_emb.weight.device
        B, N, T, V = batch_size, cfg.seq_len, cfg.num_positions, cfg.codebook_size
        self.codes = torch.zeros(self.rows, N, dtype=torch.long, device=device)
        self.positions = torch.zeros(self.rows, N, dtype=torch.long, device=device)
        # Exp(1) draws for the categorical "race" of sample_token, one set per step
        self.code_noise = None if greedy else torch.empty(N, B, V, device=device)
        self.pos_noise = None if greedy else torch.empty(N, B, T, device=device)

    def draw_noise(self, generator: Optional[torch.Generator] = None):
        if not self.greedy:
            self.code_noise.exponential_(1.0, generator=generator)
            self.pos_noise.exponential_(1.0, generator=generator)

    def set_condition(self, model, cond: Optional[torch.Tensor]):
        """What the model reads: cond, followed with guidance by its null stand-in for the unconditional rows."""
        self.cond = torch.cat([cond, model.null_condition(cond)]) if self.guided else cond

    def guide(self, logits: torch.Tensor, t: torch.Tensor, is_code: bool) -> torch.Tensor:
        """(2B, K) logits of the conditional and the unconditional rows -> (B, K) guided ones."""
        cond, uncond = logits.float().chunk(2)
        if not is_code and self.cfg_codes_only:
            return cond
        scale = self.cfg_scale
        if self.cfg_linear:     # 1 at the first step, cfg_scale at the last (t a device tensor: graph-safe)
            scale = 1 + (scale - 1) * (t.float() + 1) / self.codes.size(1)
        return uncond + scale * (cond - uncond)

    def draw(self, logits: torch.Tensor, t, is_code: bool) -> torch.Tensor:
        """Draw step t's code or position from logits (rows, V or T), record it, and return it (rows,);
        t int or (1,) tensor."""
        t = torch.as_tensor(t, device=logits.device).reshape(1)
        tokens, noise = (self.codes, self.code_noise) if is_code else (self.positions, self.pos_noise)
        temperature, top_k, top_p = self.code_filter if is_code else self.pos_filter
        if self.guided:
            logits = self.guide(logits, t, is_code)                                     # (B, K)
        if not is_code:
            taken = self.positions[:self.batch_size]
            logits = logits.masked_fill(forbidden_positions(taken, t, logits.size(-1), self.rule), float("-inf"))
        race = None if noise is None else noise.index_select(0, t)[0]                   # (B, K)
        token = sample_token(logits, temperature, top_k, top_p, self.greedy, noise=race)
        if self.guided:
            token = token.repeat(2)                     # the same token for both streams
        tokens.index_copy_(1, t, token[:, None])
        return token

    def result(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """codes, positions (B, N) of the conditional rows."""
        return self.codes[:self.batch_size], self.positions[:self.batch_size]


def reproducible_attention():
    """Restrict scaled_dot_product_attention to backends whose forward pass is bitwise reproducible.

    With the default choice, torch 2.11 on an H200 ran the KV-cache attention (bf16, boolean mask)
    on cuDNN, and two identical sampling runs drew different codes after about 70 steps. Restricted
    to the memory-efficient or the math backend, the tokens were identical run after run. Flash
    attention, which takes no mask, stays allowed for the unmasked causal passes. cuDNN is left out.
    """
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def sample_token(logits: torch.Tensor, temperature: float = 1.0, top_k: Optional[int] = None,
                 top_p: Optional[float] = None, greedy: bool = False,
                 generator: Optional[torch.Generator] = None, noise: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One token per row of logits (B, K) → (B,): top-k on logits, softmax, top-p, then a draw.

    top-k keeps the tokens whose logit is at least the k-th largest (ties with it included, as in
    the official code). top-p (nucleus) then keeps the smallest set of most likely tokens whose
    probability reaches top_p: a token is dropped when the tokens ranked before it already reach
    top_p, so the top token always stays. Ranking is by logit, equal logits by token index.
    Entries already at -inf (forbidden positions) stay impossible. top_k None/0 and top_p None/≥1
    switch that filter off. Greedy takes the argmax and ignores temperature and the filters.
    noise: Exp(1) draws (B, K) to use instead of drawing them from `generator`.
    """
    logits = logits.float()
    if greedy:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    race = noise if noise is not None else torch.empty_like(logits).exponential_(1.0, generator=generator)
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
    # with probability p_i / sum(p), so the kept probabilities need no renormalising. torch.multinomial
    # draws the same way but first checks its input with a host sync; this keeps the step loop
    # sync-free. The clamp guards an E_i of exactly 0.
    winner = (probs / race.clamp_min(torch.finfo(race.dtype).tiny)).argmax(dim=-1)
    return winner if order is None else order.gather(-1, winner[:, None])[:, 0]


def forbidden_positions(positions: torch.Tensor, t, num_positions: int, rule: str) -> torch.Tensor:
    """(B, T) bool: positions that may not be sampled at 0-based step t, given positions[:, :t].

    "unique": any position already taken. "increasing": p_{t+1} must exceed p_t and leave room for
    the N - 1 - t positions still to come, so p_{t+1} ≤ T - N + t (the first lies in 0..T-N).
    t is an int or a (1,) int64 tensor (then no Python value is involved: CUDA-graph safe).
    """
    B, N = positions.shape
    t = torch.as_tensor(t, device=positions.device).reshape(1)
    candidates = torch.arange(num_positions, device=positions.device)   # (T,)
    if rule == "unique":
        filled = (torch.arange(N, device=positions.device) < t).float().expand(B, N)   # steps already sampled
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
    1 = unknown word, then the vocabulary sorted by count (descending), ties alphabetically.
    """

    pad_id = 0
    unk_id = 1
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
        """Vocabulary of the words seen at least min_count times; max_size keeps the most frequent (specials not counted)."""
        counts = Counter(word for caption in captions for word in cls.split(caption))
        words = sorted((w for w, n in counts.items() if n >= min_count), key=lambda w: (-counts[w], w))
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
        return " ".join("<unk>" if i == self.unk_id else self.words[i - 2] for i in ids if i != self.pad_id)

    def to_dict(self) -> dict:
        """Plain Python types only, so torch.load(weights_only=True) can read a checkpoint holding it."""
        return {"words": list(self.words), "text_len": self.text_len}

    @classmethod
    def from_dict(cls, d: dict) -> "WordTokenizer":
        return cls(d["words"], d["text_len"])
