"""
Speed benchmarks for every stage, on one GPU (CUDA-synchronised timing after warm-up).

    python bench.py                     # all cases, prints a table, writes bench.json
    python bench.py --cases 1,2         # only some: 1 MQ-VAE step, 2 cost of masking, 3 Stackformer
                                        # training, 4 sampling (plain and guided), 5 FID features
    python bench.py --compile           # cases 1-4 also with torch.compile (cases 1-3 also with CUDA graphs)
    python bench.py --cpu-smoke         # every case once with tiny models on the CPU (what the tests run)
    torchrun --standalone --nproc_per_node=2 bench.py --ddp
                                        # case 6: cases 1 and 3 with DDP on every GPU, against one GPU
    torchrun --standalone --nproc_per_node=2 bench.py --ddp --compile --compile-mode reduce-overhead

Random data and random weights throughout (speed does not depend on them); LPIPS uses a random
VGG trunk of the real shape. Case 1 also runs one training step under
torch.cuda.set_sync_debug_mode("error"), which raises on any host-device synchronisation. Case 5 also
times pytorch-fid's network with the same weights and compares the features, when pytorch-fid is
installed (it is not a dependency: `pip install pytorch-fid` for the comparison).
"""

import gc
import json
import os
import statistics
import time
from contextlib import nullcontext
from types import SimpleNamespace

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

import mqvae
import stackformer
import train_mqvae
import train_stackformer
import utils

H200_BF16_TFLOPS = 989.0


def timed(fn, device, warmup=3, iters=10):
    """Seconds per call of fn(), after warm-up, synchronised on CUDA."""
    for _ in range(warmup):
        fn()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    sync()
    return (time.perf_counter() - t0) / iters


def peak_memory_gb(device):
    return torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else 0.0


# -----------------------------------------------------------------------------
# Cases 1-2: the MQ-VAE training iteration

class PlainAutoencoder(nn.Module):
    """The same encoder, quantizer and decoder with no mask and no de-mask: every one of the H·W
    tokens is quantized and fed to the decoder (a 1x1 conv stands in for the de-mask's input
    projection). The reference for the cost of masking."""

    def __init__(self, cfg: mqvae.MQVAEConfig):
        super().__init__()
        self.config = cfg
        self.encoder = mqvae.Encoder(cfg)
        self.pre_projection = nn.Linear(cfg.z_channels, cfg.codebook_dim, bias=False)
        self.quantizer = mqvae.VectorQuantizer(cfg)
        self.post_projection = nn.Conv2d(cfg.codebook_dim, cfg.ch * cfg.ch_mult[-1], 1)
        self.decoder = mqvae.Decoder(cfg)

    def forward(self, x):
        h = self.encoder(x)
        B, C, H, W = h.shape
        z = self.pre_projection(h.flatten(2).transpose(1, 2))                     # (B,T,D)
        z_q, codes, commit = self.quantizer(z, collect_stats=self.training)
        x_rec = self.decoder(self.post_projection(z_q.transpose(1, 2).reshape(B, -1, H, W)))
        return x_rec, dict(commit_loss=commit, codes=codes)

    def last_layer(self):
        return self.decoder.conv_out.weight


def random_lpips(device):
    import lpips
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return lpips.LPIPS(net="vgg", pretrained=False, pnet_rand=True, verbose=False).to(device).eval().requires_grad_(False)


def ddp_device_ids(device):
    return [device.index] if device.type == "cuda" else None


def mqvae_step_bench(cfg, batch, device, plain=False, gan=True, use_lpips=True, compile=False, check_sync=False,
                     channels_last=False, ddp=False, warmup=3, iters=10, compile_mode="default"):
    """A full training iteration (both optimizers and the EMA step). ddp: wrap as train_mqvae.py does under
    torchrun (images/s is then per GPU). compile_mode "reduce-overhead" replays the compiled autoencoder
    parts as CUDA graphs, as train_mqvae.py --compile --compile-mode reduce-overhead does."""
    torch.manual_seed(0)
    model = (PlainAutoencoder(cfg) if plain else mqvae.MQVAE(cfg)).to(device).train()
    disc = mqvae.PatchDiscriminator().to(device).train()
    lp = random_lpips(device) if use_lpips else None
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    for m in (model, disc, lp):
        if m is not None:
            m.to(memory_format=memory_format)
    if compile:
        if plain:
            model.encoder = torch.compile(model.encoder, mode=compile_mode)
            model.decoder = torch.compile(model.decoder, mode=compile_mode)
        else:
            train_mqvae.compile_for_training(model, compile_mode)
        disc = torch.compile(disc)   # default mode: D is differentiated twice per step (λ, then the loss)
    train_model, train_disc = model, disc
    if ddp:
        train_model = DDP(model, device_ids=ddp_device_ids(device),
                          find_unused_parameters=not plain and cfg.keep_ratio >= 1.0)
        train_disc = train_mqvae.ddp_discriminator(disc, ddp_device_ids(device))
    fused = {"fused": True} if device.type == "cuda" else {}
    opt_ae = torch.optim.Adam(model.parameters(), lr=1e-5, betas=(0.5, 0.9), **fused)
    opt_d = torch.optim.Adam(disc.parameters(), lr=1e-5, betas=(0.5, 0.9), **fused)
    networks = SimpleNamespace(opt_ae=opt_ae, opt_d=opt_d, raw_model=model)   # train_mqvae.update's
    tcfg = SimpleNamespace(rec_loss="l1", perceptual_weight=1.0 if use_lpips else 0.0, codebook_weight=1.0,
                           disc_weight=0.75, disc_weight_max=1.0, grad_accum=1)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    x = (torch.rand(batch, 3, cfg.resolution, cfg.resolution, device=device) * 2 - 1).contiguous(memory_format=memory_format)

    def step():
        if compile and compile_mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()
        train_mqvae.losses_and_backward(train_model, train_disc, model, disc, lp, x, tcfg, gan, autocast)
        train_mqvae.update(networks, gan)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = timed(step, device, warmup, iters)
    result = dict(images_per_s=batch / seconds, ms_per_step=seconds * 1e3, peak_memory_gb=peak_memory_gb(device))
    if check_sync and device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            train_mqvae.losses_and_backward(model, disc, model, disc, lp, x, tcfg, gan, autocast)
            result["host_sync_in_forward_backward"] = "none"
        except RuntimeError as e:
            result["host_sync_in_forward_backward"] = str(e).splitlines()[0]
        finally:
            torch.cuda.set_sync_debug_mode("default")
        opt_ae.zero_grad(set_to_none=True)
        opt_d.zero_grad(set_to_none=True)
    return result


def quantize_and_update(quantizer, z):
    z_q = quantizer(z, collect_stats=True)[0]
    quantizer.ema_step()
    return z_q


def component_shares(cfg, batch, device, warmup=2, iters=5):
    """Forward+backward time of each part run alone on inputs of its real shape (bf16 on CUDA), as a
    share of their sum: where an MQ-VAE training iteration spends its time."""
    torch.manual_seed(0)
    model = mqvae.MQVAE(cfg).to(device).train()
    disc = mqvae.PatchDiscriminator().to(device).train()
    lp = random_lpips(device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    R, G, N = cfg.resolution, cfg.grid_size, cfg.seq_len
    x = torch.rand(batch, 3, R, R, device=device) * 2 - 1
    h = torch.randn(batch, cfg.z_channels, G, G, device=device, requires_grad=True)
    z = torch.randn(batch, N, cfg.codebook_dim, device=device, requires_grad=True)
    positions = torch.rand(batch, G * G, device=device).topk(N, dim=1).indices
    g = torch.randn(batch, cfg.ch * cfg.ch_mult[-1], G, G, device=device, requires_grad=True)
    x_rec = x.clone().requires_grad_(True)
    parts = {
        "encoder": lambda: model.encoder(x),
        "mask": lambda: model.mask(h)[0],
        "quantizer": lambda: quantize_and_update(model.quantizer, z),
        "de-mask": lambda: model.demask(z, positions, (G, G)),
        "decoder": lambda: model.decoder(g),
        "lpips": lambda: lp(x, x_rec),
        "discriminator (G and D passes)": lambda: torch.cat([disc(x_rec).flatten(), disc(x).flatten(),
                                                              disc(x_rec.detach()).flatten()]),
    }
    times = {}
    for name, forward in parts.items():
        def run():
            with autocast:
                out = forward()
            out.float().mean().backward()
        times[name] = timed(run, device, warmup, iters)
    total = sum(times.values())
    return {name: dict(ms=t * 1e3, share=t / total) for name, t in times.items()}


# -----------------------------------------------------------------------------
# Cases 3-4: Stackformer training and sampling

def random_sequences(batch, seq_len, num_positions, codebook_size, device):
    codes = torch.randint(0, codebook_size, (batch, seq_len), device=device)
    positions = torch.rand(batch, num_positions, device=device).topk(seq_len, dim=1).indices.sort(dim=1).values
    return codes, positions


def stackformer_train_bench(preset, seq_len, num_positions, batch, device, compile=False, ddp=False, warmup=3, iters=10,
                            compile_mode="default"):
    """train_stackformer.train_step (bf16 autocast, the default grad clip, fused AdamW), one
    micro-batch; ddp: wrapped as there under torchrun (tokens/s and MFU are then per GPU)."""
    torch.manual_seed(0)
    cfg = stackformer.StackformerConfig(**stackformer.PRESETS[preset], codebook_size=1024 if preset != "tiny" else 64,
                                        num_positions=num_positions, seq_len=seq_len)
    model = stackformer.Stackformer(cfg).to(device).train()
    optimizer = train_stackformer.configure_optimizer(model, 5e-4, 0.01, (0.9, 0.95), device.type)
    if compile:
        torch._dynamo.reset()
    step_model = torch.compile(model, mode=compile_mode) if compile else model
    if ddp:
        step_model = DDP(step_model, device_ids=ddp_device_ids(device))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    codes, positions = random_sequences(batch, seq_len, num_positions, cfg.codebook_size, device)
    graphed = compile and compile_mode == "reduce-overhead"

    def step():
        train_stackformer.train_step(step_model, optimizer, [(codes, positions, None)], autocast,
                                     train_stackformer.TrainConfig.grad_clip, graphed)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = timed(step, device, warmup, iters)
    tokens_per_s = batch * seq_len / seconds
    mfu = train_stackformer.flops_per_token(model) * tokens_per_s / (H200_BF16_TFLOPS * 1e12)
    return dict(tokens_per_s=tokens_per_s, mfu=mfu, ms_per_step=seconds * 1e3, params_m=model.num_params() / 1e6,
                peak_memory_gb=peak_memory_gb(device))


def sampling_model(preset, seq_len, num_positions, device, guided=False, **config):
    """A random Stackformer for the sampling cases; guided: class-conditional (1000 classes) with a null class,
    so that classifier-free guidance runs."""
    torch.manual_seed(0)
    if guided:
        config.update(cond="class", num_classes=1000, cond_drop=0.1)
    cfg = stackformer.StackformerConfig(**stackformer.PRESETS[preset], codebook_size=1024 if preset != "tiny" else 64,
                                        num_positions=num_positions, seq_len=seq_len, **config)
    return stackformer.Stackformer(cfg).to(device).eval()


def sampling_bench(preset, seq_len, num_positions, batch, device, mode, decoder=None, iters=2, cfg_scale=None):
    """mode: "graph" (fast_sampling: steps replayed as a CUDA graph), "graph+compile" (the step compiled
    first), "kv" (the reference sampler: KV cache, eager), "no-cache". cfg_scale: a class-conditional model,
    classes cycled, sampled at that guidance scale (1: conditional, no second stream)."""
    import fast_sampling    # here, not in the timing: it imports Triton, ~0.3 s at every start of bench.py otherwise
    guided = cfg_scale is not None
    model = sampling_model(preset, seq_len, num_positions, device, guided=guided)
    if device.type == "cuda":
        model.to(torch.bfloat16)
    rows = dict(cond=torch.arange(batch, device=device) % 1000) if guided else {"batch_size": batch}
    settings = stackformer.SamplingConfig(cfg_scale=cfg_scale if guided else 1.0)
    fast = dict(cuda_graph=mode.startswith("graph"), compile=mode == "graph+compile",
                reuse={})   # as sample.py: graphs captured by the first (warm-up) batch, replayed by the others

    def run():
        if mode == "no-cache":
            codes, positions = model.generate(settings=settings, use_kv_cache=False, **rows)
        elif mode == "kv":
            codes, positions = model.generate(settings=settings, **rows)   # the reference, eager
        else:
            codes, positions = fast_sampling.generate(model, settings=settings, **fast, **rows)
        if decoder is not None:  # fp32, 64 images at a time, as sample.py does
            with torch.no_grad():
                for i in range(0, batch, 64):
                    decoder.decode(codes[i:i + 64], positions[i:i + 64])

    seconds = timed(run, device, warmup=1, iters=iters)    # the first call also sets up cuBLAS and the graphs
    return dict(images_per_s=batch / seconds, seconds_per_batch=seconds)


def sampling_paths_agree(device, compile=False, preset="demo") -> bool:
    """Do the fast sampler (CUDA graph, attend_cache kernel, compiled with compile), the reference KV-cache
    sampler and the no-cache path draw the same tokens? fp32, small models, greedy and seeded draws:
    unconditional, and class-conditional with guidance (scale 2, and a linear ramp to 3 on the codes only)."""
    import fid      # for exact_fp32; imported here, not at the top, for the reason fid_bench gives
    import fast_sampling    # as in sampling_bench
    agree = True
    cases = [(False, {}), (True, dict(cfg_scale=2.0)),
             (True, dict(cfg_scale=3.0, cfg_schedule="linear", cfg_codes_only=True))]
    for guided, guidance in cases:
        model = sampling_model(preset, 64, 256, device, guided=guided)
        rows = dict(cond=torch.arange(8, device=device) % 1000) if guided else dict(batch_size=8)
        for greedy in (True, False):
            seeded = lambda: torch.Generator(device=device).manual_seed(1)
            settings = stackformer.SamplingConfig(greedy=greedy, **guidance)
            # TF32 rounds differently in each path, and guidance amplifies that into other tokens
            with fid.exact_fp32():
                outs = [model.generate(settings=settings, generator=seeded(), **rows),
                        model.generate(settings=settings, generator=seeded(), use_kv_cache=False,
                                       **rows),
                        fast_sampling.generate(model, settings=settings, generator=seeded(), **rows)]
                if compile:
                    outs.append(fast_sampling.generate(model, settings=settings, generator=seeded(),
                                                       compile=True, **rows))
            agree &= all(torch.equal(outs[0][0], o[0]) and torch.equal(outs[0][1], o[1]) for o in outs[1:])
    return agree


# -----------------------------------------------------------------------------
# Case 5: FID features

def pytorch_fid_with_weights(state_dict, device):
    """pytorch-fid's own InceptionV3 (2048-d pool features) holding the given weights, or None when the
    pytorch-fid package is not installed. Its loader would download the weights file; it is handed ours
    instead (the key names are the same), so the two networks can be compared on one machine."""
    try:
        from pytorch_fid import inception as pf
    except ImportError:
        return None
    download = pf.load_state_dict_from_url
    pf.load_state_dict_from_url = lambda *args, **kwargs: state_dict
    try:
        model = pf.InceptionV3([pf.InceptionV3.BLOCK_INDEX_BY_DIM[2048]])
    finally:
        pf.load_state_dict_from_url = download
    return model.to(device).eval()


def fid_bench(batch, device, rounds=6, iters=10):
    """Our FID Inception, and pytorch-fid's with the same random weights when it is installed: images/s
    (median over `rounds` of `iters` batches; with both networks the rounds alternate, first one then the
    other leading) and the largest feature difference on the same uint8 images. cuDNN autotuning is off,
    as fid.py runs (its algorithm choice could differ from run to run, and so could the features)."""
    import fid      # here: torchvision's Inception costs a second at every start of bench.py otherwise
    torch.manual_seed(0)
    model = fid.FIDInception().to(device).eval()
    images = torch.randint(0, 256, (batch, 3, 256, 256), dtype=torch.uint8, device=device)

    def ours():
        with torch.inference_mode(), fid.exact_fp32():
            return model(images.float() / 255.0)

    nets = {"images_per_s": ours}
    reference = pytorch_fid_with_weights(model.state_dict(), device)
    if reference is not None:
        def theirs():
            with torch.inference_mode(), fid.exact_fp32():
                return reference(images.float() / 255.0)[0].flatten(1)
        nets["pytorch_fid_images_per_s"] = theirs
    autotune = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = False
    try:
        speeds = {key: [] for key in nets}
        for r in range(rounds):
            for key in (list(nets) if r % 2 == 0 else list(nets)[::-1]):
                speeds[key].append(batch / timed(nets[key], device, warmup=2, iters=iters))
        result = {key: statistics.median(v) for key, v in speeds.items()}
        if reference is not None:
            result["max_feature_difference"] = (ours() - theirs()).abs().max().item()
    finally:
        torch.backends.cudnn.benchmark = autotune
    return result


def settings(device, smoke: bool):
    """TF32 and cuDNN autotuning on CUDA, as the training scripts set them. Returns the timing arguments
    (one step each for the smoke run) and the stage-1 configuration: the official one (f=8, 256x256,
    keep 25%, codebook 1024x256), or a tiny stand-in for the smoke run."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    fast = dict(warmup=1, iters=1) if smoke else {}
    f8 = (mqvae.MQVAEConfig(**mqvae.PRESETS["tiny"], resolution=32) if smoke else
          mqvae.MQVAEConfig(**mqvae.PRESETS["f8"], resolution=256, keep_ratio=0.25))
    return fast, f8


# -----------------------------------------------------------------------------
# Case 6: scaling over GPUs

def ddp_scaling(compile: bool, smoke: bool, json_path: str, compile_mode: str = "default") -> dict:
    """Cases 1 (MQ-VAE step, batch 8 per GPU) and 3 (Stackformer base, N=256, batch 10 and 64 per GPU) on one GPU,
    then with DDP on all of them. Rank 0 measures one GPU alone before the process group exists (the
    EMA codebook would otherwise wait for the other ranks); the others wait for it in the rendezvous."""
    utils.check("RANK" in os.environ, "--ddp runs under torchrun: torchrun --standalone --nproc_per_node=2 bench.py --ddp")
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    cuda = torch.cuda.is_available() and not smoke
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    fast, f8 = settings(device, smoke)
    sf = ("tiny", 16, 64) if smoke else ("base", 256, 1024)
    cases = [("1 MQ-VAE train step, LPIPS+GAN, batch 8/GPU", "images_per_s", "img/s",
              lambda ddp: mqvae_step_bench(f8, 8, device, compile=compile, ddp=ddp, compile_mode=compile_mode, **fast)),
             *((f"3 Stackformer {sf[0]} train, N={sf[1]}, batch {b}/GPU", "tokens_per_s", "tok/s",
                lambda ddp, b=b: stackformer_train_bench(*sf, b, device, compile=compile, ddp=ddp,
                                                         compile_mode=compile_mode, **fast))
               for b in (10, 64))]
    single = [run(False)[key] for _, key, _, run in cases] if rank == 0 else None
    _, world, _, device = utils.setup_distributed()
    results = dict(world_size=world, compiled=compile, compile_mode=compile_mode if compile else None)
    for i, (name, key, unit, run) in enumerate(cases):
        total = run(True)[key] * world   # every rank runs the same step in lockstep
        if rank == 0:
            scaling = total / single[i]
            results[name] = dict(one_gpu=single[i], all_gpus=total, scaling=scaling, efficiency=scaling / world)
            print(f"6 {name}{f', compiled ({compile_mode})' if compile else ''}: 1 GPU {single[i]:.1f} {unit}, {world} GPUs "
                  f"{total:.1f} {unit}: {scaling:.2f}x ({scaling / world:.0%} efficiency)", flush=True)
            with open(json_path, "w") as fh:
                json.dump(results, fh, indent=2)
    utils.cleanup_distributed()
    return results


class Results(dict):
    """The measurements by name; each table row is printed, and the JSON rewritten, as soon as it is measured."""

    def __init__(self, json_path: str, device: torch.device):
        super().__init__(device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                         torch=torch.__version__)
        self.json_path, self.device = json_path, device
        print(f"{self['device']}, torch {self['torch']}", flush=True)

    def row(self, name: str, value: str, note: str = ""):
        print(f"{name:<72}  {value:>26}  {note}", flush=True)
        with open(self.json_path, "w") as fh:
            json.dump(self, fh, indent=2)
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def case_1(b: SimpleNamespace, compiled: bool):
    """MQ-VAE training step (LPIPS + GAN) at several batch sizes; compiled: default and reduce-overhead modes."""
    results, f8, device = b.results, b.f8, b.device
    if not compiled:
        variants = [(8, False), (32, False), (64, False), (8, True)]
        for batch, channels_last in ([(2, True)] if b.smoke else variants):
            r = mqvae_step_bench(f8, batch, device, check_sync=batch in (2, 8), channels_last=channels_last, **b.fast)
            results[f"mqvae_step_b{batch}" + ("_channels_last" if channels_last else "")] = r
            results.row(f"1 MQ-VAE train step, LPIPS+GAN, batch {batch}" + (", channels_last" if channels_last else ""),
                        f"{r['images_per_s']:.1f} img/s",
                        f"{r['peak_memory_gb']:.1f} GB peak; host sync: {r.get('host_sync_in_forward_backward', '-')}")
        shares = component_shares(f8, 2 if b.smoke else 8, device, **({"warmup": 1, "iters": 1} if b.smoke else {}))
        results["mqvae_component_shares_b8"] = shares
        results.row("1 share of fwd+bwd time (parts run alone)", "",
                    ", ".join(f"{k} {v['share']:.0%}" for k, v in shares.items()))
        return
    for channels_last in (False, True):
        torch._dynamo.reset()
        r = mqvae_step_bench(f8, 8, device, channels_last=channels_last, compile=True)
        results[f"mqvae_step_b8{'_channels_last' if channels_last else ''}_compiled"] = r
        results.row(f"1 MQ-VAE train step, LPIPS+GAN, batch 8{', channels_last' if channels_last else ''}, compiled",
                    f"{r['images_per_s']:.1f} img/s", f"{r['peak_memory_gb']:.1f} GB peak")
    # at batch 8 the step is bound by kernel launches; CUDA graphs remove that bound
    torch._dynamo.reset()
    r = mqvae_step_bench(f8, 8, device, compile=True, compile_mode="reduce-overhead")
    results["mqvae_step_b8_compiled_reduce_overhead"] = r
    results.row("1 MQ-VAE train step, LPIPS+GAN, batch 8, compiled (reduce-overhead)",
                f"{r['images_per_s']:.1f} img/s", f"{r['peak_memory_gb']:.1f} GB peak")


def case_2(b: SimpleNamespace, compiled: bool):
    """What masking costs: the autoencoder step (no LPIPS, no GAN) of MQ-VAE against a plain VQ autoencoder."""
    results, f8, device = b.results, b.f8, b.device
    if not compiled:
        for batch in ([2] if b.smoke else [8, 32]):
            full = mqvae_step_bench(f8, batch, device, gan=False, use_lpips=False, **b.fast)
            no_mask = mqvae_step_bench(mqvae.MQVAEConfig(**{**vars(f8), "keep_ratio": 1.0}), batch, device,
                                       gan=False, use_lpips=False, **b.fast)
            plain = mqvae_step_bench(f8, batch, device, plain=True, gan=False, use_lpips=False, **b.fast)
            results[f"masking_cost_b{batch}"] = dict(masked=full, keep_100=no_mask, plain=plain,
                                                     overhead=plain["images_per_s"] / full["images_per_s"])
            results.row(f"2 autoencoder step, batch {batch}: MQ-VAE keep 25% / keep 100% / plain",
                        f"{full['images_per_s']:.1f} / {no_mask['images_per_s']:.1f} / {plain['images_per_s']:.1f} img/s",
                        f"masking overhead {plain['images_per_s'] / full['images_per_s']:.2f}x")
        return
    for mode in ("default", "reduce-overhead"):
        torch._dynamo.reset()
        full = mqvae_step_bench(f8, 8, device, gan=False, use_lpips=False, compile=True, compile_mode=mode)
        torch._dynamo.reset()
        plain = mqvae_step_bench(f8, 8, device, plain=True, gan=False, use_lpips=False, compile=True, compile_mode=mode)
        key = "masking_cost_b8_compiled" + ("" if mode == "default" else "_reduce_overhead")
        results[key] = dict(masked=full, plain=plain, overhead=plain["images_per_s"] / full["images_per_s"])
        results.row(f"2 autoencoder step, batch 8, compiled ({mode}): MQ-VAE keep 25% / plain",
                    f"{full['images_per_s']:.1f} / {plain['images_per_s']:.1f} img/s",
                    f"masking overhead {plain['images_per_s'] / full['images_per_s']:.2f}x")


def case_3(b: SimpleNamespace, compiled: bool):
    """Stackformer training throughput and MFU."""
    results = b.results
    runs = ([(seq_len, num_positions, batch, None) for seq_len, num_positions in b.lengths
             for batch in ([2] if b.smoke else [10, 64, 128])] if not compiled else
            [(*b.lengths[0], batch, mode) for batch, mode in ((10, "reduce-overhead"), (10, "default"), (128, "default"))])
    for seq_len, num_positions, batch, mode in runs:
        options = b.fast if mode is None else dict(compile=True, compile_mode=mode)
        r = stackformer_train_bench(b.sf_preset, seq_len, num_positions, batch, b.device, **options)
        suffix = "" if mode is None else f", compiled ({mode})"
        results[f"stackformer_train_L{seq_len}_b{batch}" + ("" if mode is None else f"_compiled_{mode}")] = r
        results.row(f"3 Stackformer {b.sf_preset} ({r['params_m']:.0f}M) train, N={seq_len}, batch {batch}{suffix}",
                    f"{r['tokens_per_s'] / 1e3:.1f}k tok/s", f"MFU {r['mfu']:.1%}, {r['peak_memory_gb']:.1f} GB")


def case_4(b: SimpleNamespace, compiled: bool):
    """Sampling speed: the fast sampler (graph, and compiled), the reference KV-cache loop, no cache; the cost of
    classifier-free guidance (a class-conditional model at scale 1 and 2)."""
    results, device = b.results, b.device
    seq_len, num_positions = b.lengths[0]
    if compiled:
        for batch, scale in ((64, None), (256, None), (64, 1.0), (64, 2.0)):
            torch._dynamo.reset()   # each batch size compiles afresh, as in a sample.py run
            r = sampling_bench(b.sf_preset, seq_len, num_positions, batch, device, "graph+compile", cfg_scale=scale)
            name = "" if scale is None else f"_class_cfg{scale:g}"
            results[f"sampling_b{batch}_graph_compiled{name}"] = r
            results.row(f"4 sampling {b.sf_preset}, N={seq_len}, batch {batch}, graph, compiled step"
                        + ("" if scale is None else f", class, cfg scale {scale:g}") + ", tokens only",
                        f"{r['images_per_s']:.1f} img/s", f"{r['seconds_per_batch']:.2f} s/batch")
        return
    decoder = mqvae.MQVAE(b.f8).to(device).eval()
    check_compiled = b.compile and not b.smoke
    results["sampling_paths_agree"] = sampling_paths_agree(device, compile=check_compiled, preset=b.sf_preset if b.smoke else "demo")
    results.row("4 fp32 tokens equal: fast / KV / no-cache" + (" / compiled" if check_compiled else ""),
                str(results["sampling_paths_agree"]), "greedy and seeded; unconditional and guided")
    for batch in ([2] if b.smoke else [64, 256]):
        for mode in (["kv", "no-cache"] if b.smoke else ["graph", "kv", "no-cache"]):
            r = sampling_bench(b.sf_preset, seq_len, num_positions, batch, device, mode,
                               iters=1 if b.smoke or mode == "no-cache" else 2)
            results[f"sampling_b{batch}_{mode}"] = r
            results.row(f"4 sampling {b.sf_preset}, N={seq_len}, batch {batch}, {mode}, tokens only",
                        f"{r['images_per_s']:.1f} img/s", f"{r['seconds_per_batch']:.2f} s/batch")
        mode = "kv" if b.smoke else "graph"
        r = sampling_bench(b.sf_preset, seq_len, num_positions, batch, device, mode, decoder=decoder,
                           iters=1 if b.smoke else 2)
        results[f"sampling_b{batch}_{mode}_with_decoding"] = r
        results.row(f"4 sampling batch {batch}, {mode}, with MQ-VAE decoding", f"{r['images_per_s']:.1f} img/s")
    guided_batches, mode = ([2], "kv") if b.smoke else ([64, 256], "graph")
    for batch in guided_batches:      # the cost of classifier-free guidance: a second stream of B rows
        for scale in (1.0, 2.0):
            r = sampling_bench(b.sf_preset, seq_len, num_positions, batch, device, mode, cfg_scale=scale,
                               iters=1 if b.smoke else 2)
            results[f"sampling_b{batch}_{mode}_class_cfg{scale:g}"] = r
            results.row(f"4 sampling {b.sf_preset}, N={seq_len}, batch {batch}, {mode}, class, cfg scale {scale:g}, tokens only",
                        f"{r['images_per_s']:.1f} img/s", f"{r['seconds_per_batch']:.2f} s/batch")


def case_5(b: SimpleNamespace, compiled: bool):
    """FID Inception features against pytorch-fid's network (when installed)."""
    if compiled:
        return
    fid_batch = 2 if b.smoke else 200
    r = fid_bench(fid_batch, b.device, **(dict(rounds=1, iters=1) if b.smoke else {}))
    b.results["fid_features_b200"] = r
    b.results.row("5 FID Inception features (fp32, no TF32)", f"{r['images_per_s']:.0f} img/s",
                  f"batch {fid_batch}; pytorch-fid, same weights: {r['pytorch_fid_images_per_s']:.0f} img/s, largest feature "
                  f"difference {r['max_feature_difference']:.1e}" if "pytorch_fid_images_per_s" in r
                  else f"batch {fid_batch}; pytorch-fid not installed, no comparison")


CASES = {1: case_1, 2: case_2, 3: case_3, 4: case_4, 5: case_5}


def main(argv=None):
    parser = utils.FlagParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("--cases", default="1,2,3,4,5", help="comma-separated case numbers")
    parser.add_argument("--cpu-smoke", action="store_true", help="each case once, tiny models, CPU")
    parser.add_argument("--compile", action="store_true", help="cases 1-4 also with torch.compile")
    parser.add_argument("--compile-mode", default="default", choices=utils.COMPILE_MODES,
                        help="with --ddp --compile: torch.compile mode of both cases")
    parser.add_argument("--ddp", action="store_true",
                        help="case 6 only, under torchrun: cases 1 and 3 with DDP on every GPU against one GPU")
    parser.add_argument("--json", default="bench.json", help="where to write the results")
    args = parser.parse_args(argv)
    if args.ddp:
        return ddp_scaling(args.compile, args.cpu_smoke, args.json, args.compile_mode)
    cases = sorted({int(c) for c in args.cases.split(",")})
    utils.check(all(c in CASES for c in cases), f"--cases takes numbers from {sorted(CASES)}, got {args.cases}")
    smoke = args.cpu_smoke
    device = torch.device("cpu" if smoke or not torch.cuda.is_available() else "cuda")
    fast, f8 = settings(device, smoke)
    sf_preset, lengths = ("tiny", [(16, 64)]) if smoke else ("base", [(256, 1024), (128, 256)])
    b = SimpleNamespace(results=Results(args.json, device), device=device, fast=fast, f8=f8, sf_preset=sf_preset,
                        lengths=lengths, smoke=smoke, compile=args.compile)
    for c in cases:
        CASES[c](b, compiled=False)
    if args.compile and not smoke:  # last, since compiling takes a while
        for c in cases:
            CASES[c](b, compiled=True)
    return b.results


if __name__ == "__main__":
    utils.run_main(main)
