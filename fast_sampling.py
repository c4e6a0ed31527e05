"""
Fast sampling: Stackformer.generate's cached steps, replayed as CUDA graphs, optionally compiled,
with one fused Triton kernel for the attention of each new token. Same tokens as the reference
sampler in stackformer.py (checked in fp32 by the tests); what it changes is speed only.

Why it is faster (base, N = 256, batch 64, bf16, one H200; docs/speed.md has the measurements):
  - A step launches a few hundred small kernels; the plain loop is bound by the CPU launching them.
    Captured once as a CUDA graph, every later step is one replay: ~8x over the eager loop.
  - attend_cache writes the new key and value and attends over the slots written so far in one
    kernel per layer, reading nothing past the current step; SlotKVCache's SDPA reads all N slots.
  - --compile fuses the remaining elementwise work of a step (torch.compile, then captured).
  - `reuse` keeps the buffers and graphs of one call for the next call of the same shape.

    codes, positions = fast_sampling.generate(model, batch_size=64, generator=g)       # graphed
    codes, positions = fast_sampling.generate(model, batch_size=64, generator=g, compile=True)

Without CUDA the steps run eagerly (compiled if asked); without Triton they attend with the
SlotKVCache (SDPA over the whole cache).
"""

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from stackformer import SamplingConfig, Stackformer, draw_token, reproducible_attention, step_noise

try:    # ships with torch's CUDA builds on Linux
    import triton
    import triton.language as tl
except ImportError:
    triton = None


# -----------------------------------------------------------------------------
# attend_cache: one decode step's cache write and attention, one kernel per layer

# A decode step's attention and cache write as one kernel. Written with torch ops, graphed or
# compiled, they take five kernels or more per layer (two cache writes, scores, softmax statistics,
# weighted sum of V), each a launch and a pass over memory, and they read every slot of the cache,
# written or not. This kernel does the same for one query per sequence: a program per (sequence,
# head) writes the new key and value into slot s, then streams the head's cached K and V rows for
# slots 0..s-1 once, BLOCK slots at a time, keeping a running max, softmax denominator and weighted
# sum of V (the online softmax of flash attention), all in fp32; slot s itself it takes from the new
# key and value in registers. It reads s from device memory, so a graph replays it for every step,
# and no slot beyond s. Its sums run in a fixed order: the same inputs give the same bits in every
# process (nothing is autotuned). Block and warps: picked from twelve settings timed on an H200.
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
    calls it as it is inside a compiled step. Its timings against the torch forms it replaced are in
    docs/speed.md."""
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


class SlotKVCache:
    """stackformer.KVCache shaped for CUDA graphs: preallocated for the whole sample.

    Every layer owns K and V tensors of shape (B, n_head, max_len, head_dim). A step writes the keys
    and values of its new token(s) into fixed slots with `index_copy_` and attends over the whole
    cache with a causal mask (slot j is visible from slot s iff j ≤ s), rather than over a slice
    `[:, :, :s+1]`: every step then has the same shapes and reads its slot numbers from a tensor,
    never from a Python int, so a step can be compiled and captured in a CUDA graph as it
    is. The price, reading unwritten slots too, is what attend_cache saves.

    Slot layout (filled by Stackformer.sample_step):
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
        self.mask: Optional[torch.Tensor] = None                # (S, max_len) slots it may see

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
        """Write k, v (B, n_head, S, head_dim) into the step's slots; attend q over the cache."""
        self.allocate(layer, k, v)
        self.keys[layer].index_copy_(2, self.slots, k)
        self.values[layer].index_copy_(2, self.slots, v)
        keys, values = self.keys[layer], self.values[layer]
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=self.mask)


def slot_caches(model: Stackformer, batch_size: int, cache_class=SlotKVCache):
    """Empty slot caches for the lower and the upper transformer (layout: see SlotKVCache)."""
    lower, _, upper, _ = model.stack()
    N, device = model.config.seq_len, model.code_emb.weight.device
    return (cache_class(len(lower.blocks), model.prefix_len + N - 1, batch_size, device),
            cache_class(len(upper.blocks), N, batch_size, device))


class KernelKVCache(SlotKVCache):
    """SlotKVCache, except that a step with one new token per sequence writes and attends
    with attend_cache. Multi-token steps (a caption prefilled at step 0) use the reference path."""

    def begin_step(self, slots: torch.Tensor):
        if slots.numel() == 1:
            self.slots, self.mask = slots, None     # attend_cache reads the causal limit from it
        else:
            super().begin_step(slots)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if q.size(2) > 1:
            return super().attend(layer, q, k, v)
        self.allocate(layer, k, v)
        return attend_cache(q, k, v, self.keys[layer], self.values[layer], self.slots)


# -----------------------------------------------------------------------------
# torch.compile's limit on compiled versions of the step

COMPILED_STEPS = 64     # compiled versions of the sampling step kept (one per batch size and settings)


def room_for_compiled_steps():
    """Raise torch.compile's limit on compiled versions of one function (8 by default; a fullgraph
    compile fails past it) to COMPILED_STEPS while sampling: generate(compile=True) compiles its
    step once per batch size and sampling settings, and a benchmark or a notebook can use more than 8."""
    import torch._dynamo        # not loaded by `import torch` in every version
    name = recompile_limit_name()
    return torch._dynamo.config.patch(**{name: max(getattr(torch._dynamo.config, name), COMPILED_STEPS)})


def recompile_limit_name() -> str:
    """The torch._dynamo.config entry that bounds the compiled versions of a function."""
    import torch._dynamo
    return "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"   # torch < 2.6


# -----------------------------------------------------------------------------
# The fast sampler

def use_kernel(device) -> bool:
    """attend_cache runs on CUDA devices when Triton imports (on the CPU only under Triton's interpreter)."""
    return triton is not None and torch.device(device).type == "cuda"


class SamplingState:
    """One batch being sampled, shaped for CUDA graphs: every tensor a step reads or writes is
    allocated once and only ever updated in place. The tokens (rows, N) start at zero, the Exp(1)
    draws of all N steps are drawn before the first one (step_noise), the step index t is a device
    tensor, and the KV caches have fixed slots. `reuse` keeps the state, and its graph, for the next
    call."""

    def __init__(self, model: Stackformer, settings: SamplingConfig, rows: int, cache_class):
        device = model.code_emb.weight.device
        self.settings, self.cond, self.noise, self.graph = settings, None, None, None
        self.codes = torch.zeros(rows, model.config.seq_len, dtype=torch.long, device=device)
        self.positions = torch.zeros_like(self.codes)
        self.caches = slot_caches(model, rows, cache_class)
        self.t = torch.zeros(1, dtype=torch.long, device=device)       # the step counter

    def draw(self, logits: torch.Tensor, t, is_code: bool) -> torch.Tensor:
        """Stackformer.sample_step's draw: step t's token (t: int or (1,) tensor), kept in place."""
        t = torch.as_tensor(t, device=logits.device).reshape(1)
        draws = None if self.noise is None else self.noise[0 if is_code else 1]        # (N, B, K)
        noise = None if draws is None else draws.index_select(0, t)[0]
        token = draw_token(logits, t, is_code, self.settings, self.positions, noise)
        (self.codes if is_code else self.positions).index_copy_(1, t, token[:, None])
        return token

    def step(self, model: Stackformer):
        """Step t = self.t ≥ 1, entirely from device tensors; advances self.t."""
        model.sample_step(self.caches, self.t, self.codes, self.positions, None, self.draw)
        self.t.add_(1)


@torch.no_grad()
def generate(model: Stackformer, batch_size: Optional[int] = None, cond: Optional[torch.Tensor] = None,
             settings: Optional[SamplingConfig] = None, generator: Optional[torch.Generator] = None,
             cuda_graph: Optional[bool] = None, compile: bool = False, kernel: Optional[bool] = None,
             reuse: Optional[dict] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """model.generate(batch_size, cond, settings, generator), faster: same steps, same noise.

    cuda_graph: after two warm-up steps, capture one step as a CUDA graph and replay it for the
        rest (default: on CUDA when no autocast is active; cast the model to bf16 instead).
    compile: torch.compile the step first (then captured): fewer, fused kernels per step, after a
        compilation of ~22 s for `base` on an H200, again for each batch size. Its arithmetic
        differs from the eager step's, so the samples differ from the reference sampler's in bf16;
        calls in one process repeat exactly.
    kernel: attend with attend_cache (default: use_kernel(device)).
    reuse: a dict owned by the caller, for many calls of one shape (sample.py's chunks). The first
        call stores its SamplingState (buffers and graph) in it; a later call with the same batch
        size, settings and parameter storage refills the noise and replays that graph instead of
        warming up and capturing again. Tokens are the same either way. Other calls replace its
        contents; drop the dict to free the memory.
    """
    device = model.code_emb.weight.device
    if cuda_graph is None:
        cuda_graph = device.type == "cuda" and not torch.is_autocast_enabled()
    if cuda_graph and device.type != "cuda":
        raise ValueError("cuda_graph needs a model on a CUDA device")
    kernel = use_kernel(device) if kernel is None else kernel
    if kernel and triton is None:
        raise ValueError("kernel=True needs Triton, which this torch build lacks")
    settings, cond, B = model.sampling_rows(batch_size, cond, settings or SamplingConfig())
    # What a kept state was built for; parameters moved or re-allocated invalidate its graph.
    storage = tuple(p.data_ptr() for p in model.parameters())
    key = (B, settings, cuda_graph, compile, kernel, str(device), storage)
    kept = reuse is not None and reuse.get("key") == key
    rows = B if cond is None else cond.size(0)
    state = reuse["state"] if kept else SamplingState(model, settings, rows,
                                                      KernelKVCache if kernel else SlotKVCache)
    state.cond = cond
    state.noise = step_noise(settings, B, model.config, device, generator, out=state.noise)
    was_training = model.training
    model.eval()
    with reproducible_attention(), room_for_compiled_steps():
        # step 0 reads the condition, in shapes of its own (a caption is L tokens at once)
        model.sample_step(state.caches, 0, state.codes, state.positions, state.cond, state.draw)
        state.t.fill_(1)
        run_later_steps(model, state, cuda_graph, compile)
    model.train(was_training)
    codes, positions = state.codes[:B], state.positions[:B]
    if reuse is None:
        return codes, positions
    if not kept:
        reuse.clear()
        reuse.update(key=key, state=state)
    return codes.clone(), positions.clone()     # the kept buffers are overwritten by the next call


def run_later_steps(model: Stackformer, state: SamplingState, cuda_graph: bool, compile: bool):
    """Steps 1..N-1: replays of the state's graph, captured now if it has none, or eager steps."""
    N = model.config.seq_len

    def step():
        state.step(model)

    if compile:
        step = torch.compile(step, fullgraph=True, dynamic=False)
    if state.graph is not None:                 # captured by an earlier call (reuse)
        for _ in range(N - 1):
            state.graph.replay()
    elif not cuda_graph:
        for _ in range(N - 1):
            step()
    else:
        # Real steps run on a side stream before the capture, as CUDA graphs require; a compiled
        # step compiles during them, outside the capture.
        device = state.t.device
        warmup = min(2, N - 1)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(warmup):
                step()
        torch.cuda.current_stream(device).wait_stream(side)
        if N - 1 > warmup:
            state.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(state.graph):
                step()          # recorded, not run: every replay is one more step
            for _ in range(N - 1 - warmup):
                state.graph.replay()
