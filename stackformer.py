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

This file holds the model only: config and presets, both transformers with a KV cache,
conditioning (unconditional, class, text with a word-level tokenizer), `generate()`, and the
optimizer / FLOPs helpers the training script uses. The training loop is in train_stackformer.py.

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

try:    # ships with torch's CUDA builds on Linux; used for one fused kernel in cached sampling
    import triton
    import triton.language as tl
except ImportError:
    triton = None


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


# Architecture presets; the data fixes codebook_size, num_positions and seq_len.
PRESETS = {
    "tiny":  dict(n_code_layers=2,  n_pos_layers=2,  n_embd=64,   n_head=4),   # unit tests
    "demo":  dict(n_code_layers=4,  n_pos_layers=2,  n_embd=256,  n_head=8),   # minutes on synthetic data
    "small": dict(n_code_layers=12, n_pos_layers=12, n_embd=1024, n_head=16),  # the released config
    "base":  dict(n_code_layers=18, n_pos_layers=6,  n_embd=1024, n_head=16),  # supp. Table 2: 307M
    "large": dict(n_code_layers=36, n_pos_layers=12, n_embd=1024, n_head=16),  # supp. Table 2: 607M
}


# -----------------------------------------------------------------------------
# KV cache

class KVCache:
    """Keys and values of one transformer during generation, preallocated for the whole sample.

    Every layer owns K and V tensors of shape (B, n_head, max_len, head_dim). A step writes the
    keys/values of its new token(s) into fixed slots with `index_copy_` and then attends over the
    preallocated cache (its first attend_len slots), with a boolean mask that admits slot j for a
    query in slot s iff j ≤ s. We chose this over slicing `[:, :, :s+1]` because then every decode
    step has the same shapes and the transformers read their slots from a tensor, never from a
    Python length: no host sync, nothing to recompile per length, and a transformer step can be
    captured in a CUDA graph (once the two per-step views taken in Stackformer.lower_step, the slot
    ids and a_t, are indexed by a device tensor too). The price: a step reads every slot it attends
    over, written or not. For `base` at batch 64 and N = 256 the whole cache is 1.6 GB in bf16,
    against 0.6 GB of weights. So steps attend over the first `attend_len` slots only, a Python int
    that Stackformer.generate raises a few times per sample (see its cache_segments): a handful of
    shapes, one CUDA graph each, and on average little more than half the cache read per step.
    On GPUs with Triton, graphed and compiled steps use attend_cache instead ("kernel" form), which
    writes the new slot itself and reads only the slots written so far.

    Slot layout (filled by Stackformer.lower_step / upper_step):
      lower transformer, cond none/class: slot t holds step t's input E_v(v_t) + E_p(p_t) + a_t,
          slot 0 the start step (condition token + start position); max_len = N.
      lower transformer, cond text: slots 0..L-1 hold the L text tokens, prefilled in one causal
          pass; slot L-1+t holds image step t ≥ 1; max_len = L + N - 1.
      upper transformer: slot t holds H_t + E_v(v_{t+1}) (code-first) or H_t + E_p(p_{t+1})
          (position-first); max_len = N.
    """

    def __init__(self, n_layer: int, max_len: int, batch_size: int, device, one_query: str = "sdpa"):
        if one_query not in ONE_QUERY_FORMS:
            raise ValueError(f"one_query must be one of {ONE_QUERY_FORMS}, got {one_query!r}")
        if one_query == "kernel" and triton is None:
            raise ValueError("one_query='kernel' needs Triton, which this torch build lacks; use 'matmul' or 'reduce'")
        self.max_len = max_len
        self.one_query = one_query                              # how single-query steps attend (attend_one_query)
        self.batch_size = batch_size
        self.slot_ids = torch.arange(max_len, device=device)    # (max_len,)
        self.attend_len = max_len                               # steps attend over slots < attend_len
        self.keys: List[Optional[torch.Tensor]] = [None] * n_layer
        self.values: List[Optional[torch.Tensor]] = [None] * n_layer
        self.slots: Optional[torch.Tensor] = None               # (S,) slots of the current step
        self.mask: Optional[torch.Tensor] = None                # (S, attend_len) slots it may attend to

    @property
    def slot_major_values(self) -> bool:
        """The reduce form sums V over the slots; stored as (B, n_head, head_dim, max_len), that sum runs
        along contiguous memory (store still returns the usual (B, n_head, L, head_dim) view)."""
        return self.one_query == "reduce"

    def begin_step(self, slots: torch.Tensor):
        self.slots = slots
        if self.one_query == "kernel" and slots.numel() == 1:
            self.mask = None        # attend_cache reads the causal limit from slots itself
        else:
            self.mask = self.slot_ids[None, :self.attend_len] <= slots[:, None]   # (S, attend_len), causal

    def _allocate(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        # At the first write, so the cache takes the dtype autocast gives k and v.
        if self.keys[layer] is None:
            B, n_head, _, head_dim = k.shape
            self.keys[layer] = k.new_zeros(B, n_head, self.max_len, head_dim)
            value_shape = (B, n_head, head_dim, self.max_len) if self.slot_major_values else self.keys[layer].shape
            self.values[layer] = v.new_zeros(value_shape)

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, n_head, S, head_dim) into this step's slots; return the layer's cache, slots < attend_len."""
        self._allocate(layer, k, v)
        self.keys[layer].index_copy_(2, self.slots, k)
        if self.slot_major_values:
            # Written through the stored tensor itself: through a transposed view of it, inductor
            # copied the whole cache every step (0.7 ms more a step for `base` at batch 64 on an H200).
            self.values[layer].index_copy_(3, self.slots, v.transpose(2, 3))
            values = self.values[layer].transpose(2, 3)
        else:
            values = self.values[layer].index_copy_(2, self.slots, v)
        return self.keys[layer][:, :, :self.attend_len], values[:, :, :self.attend_len]

    def store_and_attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The "kernel" form for one new token (S = 1): store k, v and attend q over the slots up to its own, in
        one attend_cache call. Returns (B, n_head, 1, head_dim)."""
        self._allocate(layer, k, v)
        return attend_cache(q, k, v, self.keys[layer], self.values[layer], self.slots)


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

    def forward(self, x: torch.Tensor, cache: Optional[KVCache] = None, layer: int = 0) -> torch.Tensor:
        B, S, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=2)
        q = q.view(B, S, self.n_head, d // self.n_head).transpose(1, 2)   # (B, nh, S, hd)
        k = k.view(B, S, self.n_head, d // self.n_head).transpose(1, 2)   # (B, nh, S, hd)
        v = v.view(B, S, self.n_head, d // self.n_head).transpose(1, 2)   # (B, nh, S, hd)
        dropout_p = self.dropout if self.training else 0.0
        if cache is None:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        elif S == 1 and cache.one_query == "kernel":    # a decode step, graphed or compiled, on a GPU
            y = cache.store_and_attend(layer, q, k, v)
        else:
            k, v = cache.store(layer, k, v)                               # (B, nh, attend_len, hd)
            if S == 1 and cache.one_query != "sdpa":    # the same without Triton (see attend_one_query)
                y = attend_one_query(q, k, v, cache.mask, cache.one_query)
            else:
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=cache.mask, dropout_p=dropout_p)
        y = y.transpose(1, 2).reshape(B, S, d)                            # (B, S, d)
        return self.resid_drop(self.proj(y))


ONE_QUERY_FORMS = ("sdpa", "matmul", "reduce", "kernel")


def attend_one_query(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                     form: str = "matmul") -> torch.Tensor:
    """softmax(q·kᵀ/√hd) · v for one query per sequence, q (B, nh, 1, hd), over the cache's slots
    k, v (B, nh, L, hd) where mask (1, L) is True; scores and softmax in fp32.

    The same attention as scaled_dot_product_attention with that mask. SDPA's fused kernels tile
    the queries in blocks of 64, so with a single query most of their work is wasted; a decode step
    mostly streams K and V from memory. Two ways to write it:
      "matmul": two batched matrix-vector products. For a step replayed as a CUDA graph of eager
          kernels: on an H200 (base, batch 64, bf16, graph, compiled) a step took 2.28 ms with SDPA
          and 2.00 ms with this.
      "reduce": elementwise products summed over hd, then over L. Only for a compiled step, where
          inductor fuses each into one reduction that reads K (or V) once: 1.77 ms a step against
          1.92 ms for "matmul" (base, batch 64, N = 256, four cache runs). With V stored slots-last
          (KVCache), its V reductions took 234 µs a step in place of 330. Run eagerly it would
          materialise (B, nh, L, hd) fp32 products.
    In a plain eager loop, bound by the CPU launching kernels, either costs more kernels than it
    saves, so eager steps keep SDPA's one. On GPUs with Triton, graphed and compiled steps use the
    attend_cache kernel below instead; these forms are what runs without it (decode_attention_form).
    """
    scale = q.size(-1) ** -0.5
    if form == "reduce":
        scores = (q.float() * k.float()).sum(-1).unsqueeze(-2) * scale                 # (B, nh, 1, L)
    else:
        scores = (q @ k.transpose(-1, -2)).float() * scale                             # (B, nh, 1, L)
    weights = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)
    if form == "reduce":
        return (weights.transpose(-1, -2) * v.float()).sum(-2, keepdim=True).to(v.dtype)   # (B, nh, 1, hd)
    return weights.to(v.dtype) @ v                                                      # (B, nh, 1, hd)


# A decode step's attention and cache write as one kernel. Graphed or compiled, the forms above take
# five kernels or more per layer (two cache writes, scores, softmax statistics, weighted sum of V),
# each a launch and a pass over memory, and they read every slot a run attends over, written or not. This
# kernel does the same for one query per sequence: a program per (sequence, head) writes the new key
# and value into slot s, then streams the head's cached K and V rows for slots 0..s-1 once, BLOCK
# slots at a time, keeping a running max, softmax denominator and weighted sum of V (the online
# softmax of flash attention), all in fp32; slot s itself it takes from the new key and value in
# registers. It reads s from device memory, so a graph replays it for every step, and no slot beyond
# s. Its sums run in a fixed order: the same inputs give the same bits in every process (nothing is
# autotuned). Block and warps: picked from twelve settings timed on an H200 (see attend_cache).
CACHE_ATTENTION_BLOCK = 128     # slots per iteration
CACHE_ATTENTION_WARPS = 2

if triton is not None:
    @triton.jit
    def _attend_cache_kernel(q_ptr, k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, out_ptr, slot_ptr, scale,
                             n_head, head_dim, q_stride_b, q_stride_h, k_stride_b, k_stride_h,
                             v_stride_b, v_stride_h, cache_stride_b, cache_stride_h, cache_stride_l,
                             HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr):
        program = tl.program_id(0)                 # one (sequence b, head h)
        b, h = program // n_head, program % n_head
        dims = tl.arange(0, HEAD_DIM)              # HEAD_DIM: head_dim rounded up to a power of 2
        in_head = dims < head_dim
        q = tl.load(q_ptr + b * q_stride_b + h * q_stride_h + dims, mask=in_head, other=0.0).to(tl.float32) * scale
        k_new = tl.load(k_ptr + b * k_stride_b + h * k_stride_h + dims, mask=in_head, other=0.0)
        v_new = tl.load(v_ptr + b * v_stride_b + h * v_stride_h + dims, mask=in_head, other=0.0)
        slot = tl.load(slot_ptr)
        k_cache_ptr += b * cache_stride_b + h * cache_stride_h
        v_cache_ptr += b * cache_stride_b + h * cache_stride_h
        tl.store(k_cache_ptr + slot * cache_stride_l + dims, k_new, mask=in_head)
        tl.store(v_cache_ptr + slot * cache_stride_l + dims, v_new, mask=in_head)
        # Start from slot s alone: its score is the running max, its weight exp(0) = 1.
        running_max = tl.sum(k_new.to(tl.float32) * q, axis=0)
        denominator = tl.full([], 1.0, tl.float32)
        weighted_v = v_new.to(tl.float32)
        for start in range(0, slot, BLOCK):        # then slots 0..s-1 from the cache
            slots = start + tl.arange(0, BLOCK)
            written = slots < slot
            rows = written[:, None] & in_head[None, :]
            offsets = slots[:, None] * cache_stride_l + dims[None, :]
            k = tl.load(k_cache_ptr + offsets, mask=rows, other=0.0)
            v = tl.load(v_cache_ptr + offsets, mask=rows, other=0.0)
            scores = tl.sum(k.to(tl.float32) * q[None, :], axis=1)                   # (BLOCK,)
            scores = tl.where(written, scores, float("-inf"))
            new_max = tl.maximum(running_max, tl.max(scores, axis=0))
            rescale = tl.exp(running_max - new_max)
            weights = tl.exp(scores - new_max)                                       # (BLOCK,)
            denominator = denominator * rescale + tl.sum(weights, axis=0)
            weighted_v = weighted_v * rescale + tl.sum(weights[:, None] * v.to(tl.float32), axis=0)
            running_max = new_max
        out = weighted_v / denominator
        tl.store(out_ptr + program * head_dim + dims, out.to(out_ptr.dtype.element_ty), mask=in_head)


@torch.library.custom_op("stackformer::attend_cache", mutates_args=("k_cache", "v_cache"))
def attend_cache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                 v_cache: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
    """Write k, v into slot s of the caches, then softmax(q·kᵀ/√hd) · v over cache slots 0..s.

    q, k, v (B, nh, 1, hd), one new token per sequence; k_cache, v_cache (B, nh, L, hd) with equal
    strides; slot (1,) int64 on the same device, s < L. Every head_dim row must be contiguous.
    Returns (B, nh, 1, hd) in q's dtype. The Triton kernel above; a custom op so that torch.compile
    calls it as it is inside a compiled step. On an H200 (bf16, B 64, 16 heads of 64, timed in a CUDA
    graph) it took 7.3, 9.7 and 26.3 µs at s = 63, 127 and 255, cache writes included, against 29.8,
    33.4 and 46.1 µs for attend_one_query's matmul form over s + 1 slots without them. Of the twelve
    settings timed (BLOCK 32-256, 1-4 warps) none was fastest at every s; the others took 5.5-57.7 µs."""
    B, n_head, _, head_dim = q.shape
    if k_cache.stride() != v_cache.stride() or q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1 \
            or k_cache.stride(-1) != 1:
        raise ValueError("attend_cache needs contiguous head_dim rows and K and V caches of equal strides")
    if k_cache.numel() >= 2 ** 31:      # the kernel's offsets are 32-bit
        raise ValueError(f"a KV cache of {k_cache.numel()} elements is too large for attend_cache; sample in smaller batches")
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    _attend_cache_kernel[(B * n_head,)](
        q, k, v, k_cache, v_cache, out, slot, head_dim ** -0.5, n_head, head_dim,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        HEAD_DIM=triton.next_power_of_2(head_dim), BLOCK=CACHE_ATTENTION_BLOCK, num_warps=CACHE_ATTENTION_WARPS)
    return out


@attend_cache.register_fake
def _(q, k, v, k_cache, v_cache, slot):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


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

    def forward(self, x, cache: Optional[KVCache] = None, layer: int = 0):
        x = x + self.attn(self.ln_1(x), cache, layer)
        x = x + self.mlp(self.ln_2(x))
        return x


class CausalTransformer(nn.Module):
    """A stack of causal blocks; returns the last hidden states (no final LayerNorm: each head has its own)."""

    def __init__(self, config: StackformerConfig, n_layer: int):
        super().__init__()
        self.blocks = nn.ModuleList([Block(config) for _ in range(n_layer)])

    def forward(self, x: torch.Tensor, cache: Optional[KVCache] = None,
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
            self.class_emb = nn.Embedding(config.num_classes, d)       # v_0 = the class
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

    # --- cached generation: one new token per step in each transformer

    def new_kv_caches(self, batch_size: int, one_query: str = "sdpa") -> Tuple[KVCache, KVCache]:
        """Empty caches for the lower and the upper transformer (slot layout: see KVCache)."""
        device = self.code_emb.weight.device
        N = self.config.seq_len
        lower = KVCache(len(self.lower.blocks), self.prefix_len + N - 1, batch_size, device, one_query)
        upper = KVCache(len(self.upper.blocks), N, batch_size, device, one_query)
        return lower, upper

    @torch.no_grad()
    def lower_step(self, cache: KVCache, t, prev_code: Optional[torch.Tensor],
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
    def upper_step(self, cache: KVCache, t, h: torch.Tensor, lower_token: torch.Tensor) -> torch.Tensor:
        """Upper hidden state (B, d) at step t (int or (1,) tensor) from H_t (B, d) and the chosen next lower token (B,)."""
        t = torch.as_tensor(t, device=cache.slot_ids.device).reshape(1)
        x = (h + self.embed_lower_prediction(lower_token))[:, None]     # (B, 1, d)
        return self.upper(x, cache, t)[:, 0]

    def generate(self, *args, **kwargs) -> Tuple[torch.Tensor, torch.Tensor]:
        """Sample N (code, position) pairs per image; see _generate for the arguments.

        Runs with reproducible attention kernels only (see reproducible_attention): the same
        generator seed gives the same tokens, run after run."""
        with reproducible_attention(), room_for_compiled_steps():
            return self._generate(*args, **kwargs)

    @torch.no_grad()
    def _generate(self, batch_size: Optional[int] = None, cond: Optional[torch.Tensor] = None,
                  temperature: float = 1.0, top_k: Optional[int] = 100, top_p: Optional[float] = 0.95,
                  pos_temperature: Optional[float] = None, pos_top_k: Optional[int] = 10,
                  pos_top_p: Optional[float] = 0.95, position_rule: Optional[str] = None,
                  greedy: bool = False, use_kv_cache: bool = True,
                  generator: Optional[torch.Generator] = None,
                  cuda_graph: Optional[bool] = None, compile: bool = False,
                  cache_segments: Optional[int] = None, reuse: Optional[dict] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Sample N (code, position) pairs per image: codes (B, N), positions (B, N).

        Each step samples the code, then its position (the reverse for Stackformer_r). Logits are
        filtered by top-k, then nucleus top-p, then sampled (argmax if greedy); see sample_token.
        position_rule: "increasing" (positions strictly increase and leave room for the remaining
        steps, like the raster-ordered training data) or "unique" (official: only no repeats).
        None picks "increasing" for raster-order models and "unique" for importance-order ones.
        use_kv_cache=False recomputes the whole prefix every step (reference path for checks).
        generator: a torch.Generator on the model's device, for reproducible samples. All the
        randomness of the N steps is drawn from it up front, so the cached, uncached and
        CUDA-graph paths consume exactly the same noise.
        cuda_graph: replay steps 2..N as captured CUDA graphs, one per cache run (default: on CUDA
        with the KV cache, when no autocast is active; cast the model to bf16 instead of using
        autocast). A step launches a few hundred small kernels; replaying them as a graph removes
        the per-kernel CPU cost.
        Eager steps attend with SDPA; graphed and compiled ones with the attend_cache kernel on a GPU
        with Triton, else with attend_one_query's matmul (graphed) or reduce (compiled) form.
        compile: torch.compile the per-step function of the KV-cache path first (then captured in the
        CUDA graph): fewer, fused kernels per step, at the price of compiling first, once per cache
        run (22 s for `base` with attend_cache's one run on an H200); each batch size compiles anew.
        With reuse, `base` at N = 256 and batch 64 sampled 194 img/s compiled against 153 graphed.
        Its arithmetic differs from the eager step's, so the samples differ too; calls in one process
        repeat exactly. Inductor tunes its kernels when it first builds them: with the reduce form, two
        processes that each compiled afresh drew different codes on H200s; with attend_cache, the one
        such pair checked drew the same codes.
        cache_segments: with the KV cache, steps 1..N-1 run in at most this many runs (cache_runs);
        a run's steps attend over the cache slots written by the run's end, not over all N (each
        run is one CUDA graph capture, and one compilation with compile). 1 reads the whole cache
        every step. Default: 1 with attend_cache, which reads only the written slots anyway; 4 for the
        matmul and reduce forms (on an H200, base, N = 256, graphed, matmul form: batch 256 231 img/s
        against 203 with 1, batch 64 the same 94); 1 for eager steps (a plain loop is bound by the CPU;
        there runs cost more than they save: 20.5 img/s against 25.1 at batch 64, measured with an
        earlier version of the runs whose lengths were not multiples of 16).
        Changing it changes the order of float sums, so samples can differ in the last bits.
        reuse: a dict owned by the caller, for many calls of one shape (sample.py's chunks). The first
        call stores its buffers and CUDA graphs in it; a later call with the same batch size, settings
        and parameter storage replays those graphs instead of warming up and capturing again. Tokens
        are the same either way (checked on an H200, graphed and compiled). There, for `base` at
        N = 256 and before attend_cache, it took graphed sampling from 92.5 to 105.1 img/s at batch 64
        and from 219.3 to 249.7 at batch 256, compiled sampling from 131.6 to 150.1 at batch 64 (three
        timed calls after one untimed call, with and without a kept dict). Other calls replace its contents; drop the dict
        to free the memory. KV-cache path only.
        The model is put in eval mode for sampling and restored afterwards.
        """
        cfg = self.config
        if cond is not None:
            if batch_size is not None and batch_size != cond.size(0):
                raise ValueError(f"batch_size {batch_size} but cond has {cond.size(0)} rows")
            batch_size = cond.size(0)
        if batch_size is None:
            raise ValueError("give batch_size (unconditional) or cond")
        rule = position_rule or ("increasing" if cfg.order == "raster" else "unique")
        if rule not in ("increasing", "unique"):
            raise ValueError(f"position_rule must be increasing or unique, got {rule!r}")
        pos_temperature = temperature if pos_temperature is None else pos_temperature
        device = self.code_emb.weight.device
        B, N, T, V = batch_size, cfg.seq_len, cfg.num_positions, cfg.codebook_size
        if cuda_graph is None:
            cuda_graph = device.type == "cuda" and use_kv_cache and not torch.is_autocast_enabled()
        if cuda_graph and not (device.type == "cuda" and use_kv_cache):
            raise ValueError("cuda_graph needs a CUDA model and use_kv_cache=True")

        one_query = decode_attention_form(device, cuda_graph, compile)
        if cache_segments is None:      # attend_cache reads the written slots only: runs would save nothing
            cache_segments = 4 if one_query in ("matmul", "reduce") else 1
        # What a kept sampler (reuse) was built for; parameters moved or re-allocated invalidate its graphs.
        key = (B, temperature, top_k, top_p, pos_temperature, pos_top_k, pos_top_p, rule, greedy, cuda_graph,
               compile, cache_segments, str(device), tuple(p.data_ptr() for p in self.parameters()))
        kept = reuse if reuse is not None and use_kv_cache and reuse.get("key") == key else None
        if kept is not None:
            codes, positions, code_noise, pos_noise, t_now, lower_cache, upper_cache = kept["buffers"]
        else:
            codes = torch.zeros(B, N, dtype=torch.long, device=device)
            positions = torch.zeros(B, N, dtype=torch.long, device=device)
            code_noise = pos_noise = None
            if not greedy:
                code_noise, pos_noise = torch.empty(N, B, V, device=device), torch.empty(N, B, T, device=device)
        noise = None
        if not greedy:  # Exp(1) draws for the categorical "race" of sample_token, one set per step
            code_noise.exponential_(1.0, generator=generator)
            pos_noise.exponential_(1.0, generator=generator)
            noise = (code_noise, pos_noise) if self.code_first else (pos_noise, code_noise)

        def pick(logits, t, which):
            """which 0: the lower prediction, 1: the upper one; t int or (1,) tensor."""
            is_code = (which == 0) == self.code_first
            if not is_code:
                logits = logits.masked_fill(forbidden_positions(positions, t, T, rule), float("-inf"))
            race = noise[which].index_select(0, torch.as_tensor(t, device=device).reshape(1))[0] if noise else None
            if is_code:
                return sample_token(logits, temperature, top_k, top_p, greedy, noise=race)
            return sample_token(logits, pos_temperature, pos_top_k, pos_top_p, greedy, noise=race)

        def record(token, t, which):
            target = codes if (which == 0) == self.code_first else positions
            target.index_copy_(1, torch.as_tensor(t, device=device).reshape(1), token[:, None])

        was_training = self.training
        self.eval()
        if not use_kv_cache:
            for t in range(N):
                h_all = self._lower(codes[:, :t], positions[:, :t], cond)           # (B, t+1, d)
                h = h_all[:, -1]
                lower_token = pick(self.lower_head(h), t, 0)
                record(lower_token, t, 0)
                lower_tokens = codes if self.code_first else positions
                g = self._upper(h_all, lower_tokens[:, :t + 1])[:, -1]
                record(pick(self.upper_head(g), t, 1), t, 1)
            self.train(was_training)
            return codes, positions

        if kept is None:
            lower_cache, upper_cache = self.new_kv_caches(B, one_query)
            t_now = torch.zeros(1, dtype=torch.long, device=device)   # the step counter, on the device

        def step():
            """One step t = t_now ≥ 1, entirely from device tensors; advances t_now."""
            prev = t_now - 1
            h = self.lower_step(lower_cache, t_now, codes.index_select(1, prev)[:, 0],
                                positions.index_select(1, prev)[:, 0], None)
            lower_token = pick(self.lower_head(h), t_now, 0)
            record(lower_token, t_now, 0)
            g = self.upper_step(upper_cache, t_now, h, lower_token)
            record(pick(self.upper_head(g), t_now, 1), t_now, 1)
            t_now.add_(1)

        if compile:
            step = torch.compile(step, fullgraph=True, dynamic=False)
        graphs = kept["graphs"] if kept is not None else {}     # run -> its captured step (over these buffers)

        # Step 0 reads the condition (a whole caption for text) and fills the caches' first slots.
        h = self.lower_step(lower_cache, 0, None, None, cond)
        lower_token = pick(self.lower_head(h), 0, 0)
        record(lower_token, 0, 0)
        g = self.upper_step(upper_cache, 0, h, lower_token)
        record(pick(self.upper_head(g), 0, 1), 0, 1)
        t_now.fill_(1)
        # Steps 1..N-1 run in at most cache_segments runs; during a run the transformers attend over the cache
        # slots up to the run's last step only (KVCache.attend_len), so the shapes stay fixed per run.
        first = 1
        for run, (last, lower_len, upper_len) in enumerate(cache_runs(N, self.prefix_len, cache_segments)):
            lower_cache.attend_len, upper_cache.attend_len = lower_len, upper_len
            count = last - first + 1        # steps first..last
            first = last + 1
            if not cuda_graph:
                for _ in range(count):
                    step()
                continue
            if run in graphs:       # captured by an earlier call (reuse)
                for _ in range(count):
                    graphs[run].replay()
                continue
            # Real steps run on a side stream before the first capture, as CUDA graphs require; a
            # compiled step also runs once for each new run's shapes, so it compiles outside capture.
            warmup = min(2 if run == 0 else int(compile), count)
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                for _ in range(warmup):
                    step()
            torch.cuda.current_stream(device).wait_stream(side)
            if count > warmup:
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    step()          # recorded, not run: every replay is one more step
                for _ in range(count - warmup):
                    graph.replay()
                if reuse is not None:
                    graphs[run] = graph
                del graph
        self.train(was_training)
        if reuse is None:
            return codes, positions
        if kept is None:
            reuse.clear()
            reuse.update(key=key, buffers=(codes, positions, code_noise, pos_noise, t_now, lower_cache, upper_cache),
                         graphs=graphs)
        return codes.clone(), positions.clone()     # the kept buffers are overwritten by the next call

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
# Sampling helpers

def reproducible_attention():
    """Restrict scaled_dot_product_attention to backends whose forward pass is bitwise reproducible.

    With the default choice, torch 2.11 on an H200 ran the KV-cache attention (bf16, boolean mask)
    on cuDNN, and two identical sampling runs drew different codes after about 70 steps. Restricted
    to the memory-efficient or the math backend, the tokens were identical run after run. Flash
    attention, which takes no mask, stays allowed for the unmasked causal passes. cuDNN is left out.
    """
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


COMPILED_STEPS = 64     # compiled sampling steps kept (one per batch size and cache run)


def room_for_compiled_steps():
    """Raise torch.compile's limit on compiled versions of one function (8 by default; a fullgraph
    compile fails past it) to COMPILED_STEPS while sampling: generate(compile=True) compiles its
    step once per batch size and cache run, so two batch sizes of four runs already fill 8."""
    import torch._dynamo        # not loaded by `import torch` in every version
    name = recompile_limit_name()
    return torch._dynamo.config.patch(**{name: max(getattr(torch._dynamo.config, name), COMPILED_STEPS)})


def recompile_limit_name() -> str:
    """The torch._dynamo.config entry that bounds the compiled versions of a function."""
    import torch._dynamo
    return "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"   # torch < 2.6


def decode_attention_form(device, cuda_graph: bool, compile: bool) -> str:
    """How generate()'s cached steps attend (KVCache.one_query): the attend_cache kernel for graphed
    or compiled steps on a GPU with Triton; without Triton attend_one_query's "reduce" form when
    compiled, its "matmul" form when graphed; SDPA in a plain eager loop."""
    if not (cuda_graph or compile):
        return "sdpa"
    if triton is not None and torch.device(device).type == "cuda":
        return "kernel"
    return "reduce" if compile else "matmul"


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


ATTEND_QUANTUM = 16     # attended cache lengths are multiples of this (aligned rows for the matmuls)


def cache_runs(num_steps: int, prefix_len: int, segments: int) -> List[Tuple[int, int, int]]:
    """Split steps 1..num_steps-1 of cached generation into at most `segments` runs.

    Returns (last step, lower attend_len, upper attend_len) per run: during the run the lower and
    the upper transformer attend over that many leading cache slots, enough for every step of the
    run (lower step t writes slot prefix_len - 1 + t, upper step t slot t). Run ends split the lower
    cache into near-equal parts, lengths rounded up to ATTEND_QUANTUM, capped at the cache size.
    """
    if segments < 1:
        raise ValueError(f"cache_segments must be at least 1, got {segments}")
    lower_max = prefix_len + num_steps - 1

    def attend(needed, cap):
        return min(cap, -(-needed // ATTEND_QUANTUM) * ATTEND_QUANTUM)

    runs, last = [], 0
    for j in range(1, segments + 1):
        end = min(num_steps - 1, attend(-(-lower_max * j // segments), lower_max) - prefix_len)
        if end > last:
            last = end
            runs.append((last, attend(prefix_len + last, lower_max), attend(last + 1, num_steps)))
    return runs


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


# -----------------------------------------------------------------------------
# Optimizer

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


# -----------------------------------------------------------------------------
# Checkpoints (written by train_stackformer.py; everything sample.py needs is in the one file)
#
#   kind="stackformer", stackformer_config (dict), model (state dict), mqvae_config + mqvae (the
#   frozen stage 1, strict), tokenizer (WordTokenizer.to_dict() or None), classes (list of class
#   names or None), image_size, train_config, optimizer, step, rng, stage1_sha256

def load_stackformer(path: str, device="cpu"):
    """-> (Stackformer in eval mode, MQ-VAE in eval mode, WordTokenizer or None, checkpoint dict).
    Every weight is loaded strictly; a wrong, missing or truncated file is a one-line UserError."""
    from mqvae import UserError, load_checkpoint, mqvae_from_checkpoint
    ckpt = load_checkpoint(path, "stackformer")
    try:
        model = Stackformer(StackformerConfig(**ckpt["stackformer_config"]))
        model.load_state_dict(ckpt["model"], strict=True)
    except (TypeError, ValueError, RuntimeError, KeyError) as e:
        raise UserError(f"{path}: the Stackformer weights do not match their config "
                        f"({type(e).__name__}: {str(e).splitlines()[0]})") from None
    tokenizer = WordTokenizer.from_dict(ckpt["tokenizer"]) if ckpt.get("tokenizer") else None
    return model.to(device).eval(), mqvae_from_checkpoint(ckpt, device), tokenizer, ckpt
