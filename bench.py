"""
Speed benchmarks for every stage, on one GPU (CUDA-synchronised timing after warm-up).

    python bench.py                     # all cases, prints a table, writes bench.json
    python bench.py --cases 1,2         # only some: 1 MQ-VAE step, 2 cost of masking, 3 Stackformer
                                        # training, 4 sampling (plain and guided), 5 FID features
    python bench.py --no-compile        # eager rows only (by default cases 1-4 measure each stage as the
                                        # scripts run it by default, compiled on CUDA, and with --no-compile)
    python bench.py --cpu-smoke         # every case once with tiny models on the CPU (what the tests run)
    torchrun --standalone --nproc_per_node=2 bench.py --ddp
                                        # case 6: cases 1 and 3 with DDP on every GPU, against one GPU

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

def random_lpips(device):
    import lpips
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return lpips.LPIPS(net="vgg", pretrained=False, pnet_rand=True, verbose=False).to(device).eval().requires_grad_(False)


def ddp_device_ids(device):
    return [device.index] if device.type == "cuda" else None


def mqvae_step_bench(cfg, batch, device, gan=True, use_lpips=True, compile_mode=None, check_sync=False,
                     channels_last=False, ddp=False, warmup=3, iters=10):
    """A full training iteration (both optimizers and the EMA step), as train_mqvae.py runs it.
    compile_mode: None runs eager (--no-compile); else the parts train_mqvae.py compiles are compiled in
    that mode ("reduce-overhead" replays them as CUDA graphs). ddp: wrapped as under torchrun (images/s
    is then per GPU). A config with masker "none" is the VQGAN baseline: the same network without mask
    and de-mask, every token quantized."""
    torch.manual_seed(0)
    model = mqvae.MQVAE(cfg).to(device).train()
    disc = mqvae.PatchDiscriminator().to(device).train()
    lp = random_lpips(device) if use_lpips else None
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    for m in (model, disc, lp):
        if m is not None:
            m.to(memory_format=memory_format)
    compile = compile_mode is not None
    if compile:
        torch._dynamo.reset()
        train_mqvae.compile_for_training(model, disc, compile_mode)     # D in the default mode, as the trainer
    train_model, train_disc = model, disc
    if ddp:
        train_model = DDP(model, device_ids=ddp_device_ids(device),
                          find_unused_parameters=cfg.masker != "none" and cfg.keep_ratio >= 1.0)
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


def component_shares(cfg, batch, device, compile_mode=None, warmup=2, iters=5):
    """Forward+backward time of each part run alone on inputs of its real shape (bf16 on CUDA), as a
    share of their sum: where an MQ-VAE training iteration spends its time. compile_mode: the parts that
    train_mqvae.py compiles (encoder, de-mask, decoder) compiled in that mode, the others eager, as there."""
    torch.manual_seed(0)
    model = mqvae.MQVAE(cfg).to(device).train()
    disc = mqvae.PatchDiscriminator().to(device).train()
    lp = random_lpips(device)
    encoder, demask, decoder = model.encoder, model.demask, model.decoder
    if compile_mode is not None:
        torch._dynamo.reset()
        encoder, demask, decoder = (utils.compile_module(m, compile_mode) for m in (encoder, demask, decoder))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    R, G, N = cfg.resolution, cfg.grid_size, cfg.seq_len
    x = torch.rand(batch, 3, R, R, device=device) * 2 - 1
    h = torch.randn(batch, cfg.z_channels, G, G, device=device, requires_grad=True)
    z = torch.randn(batch, N, cfg.codebook_dim, device=device, requires_grad=True)
    positions = torch.rand(batch, G * G, device=device).topk(N, dim=1).indices
    g = torch.randn(batch, cfg.ch * cfg.ch_mult[-1], G, G, device=device, requires_grad=True)
    x_rec = x.clone().requires_grad_(True)
    parts = {
        "encoder": lambda: encoder(x),
        "mask": lambda: model.mask(h)[0],
        "quantizer": lambda: quantize_and_update(model.quantizer, z),
        "de-mask": lambda: demask(z, positions, (G, G)),
        "decoder": lambda: decoder(g),
        "lpips": lambda: lp(x, x_rec),
        "discriminator (G and D passes)": lambda: torch.cat([disc(x_rec).flatten(), disc(x).flatten(),
                                                              disc(x_rec.detach()).flatten()]),
    }
    times = {}
    for name, forward in parts.items():
        def run():
            if compile_mode == "reduce-overhead":
                torch.compiler.cudagraph_mark_step_begin()
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


def stackformer_train_bench(preset, seq_len, num_positions, batch, device, compile_mode=None, ddp=False, warmup=3,
                            iters=10):
    """train_stackformer.train_step (bf16 autocast, the default grad clip, fused AdamW), one
    micro-batch; compile_mode: None eager (--no-compile), else compiled in that mode as train_stackformer.py
    does; ddp: wrapped as there under torchrun (tokens/s and MFU are then per GPU)."""
    torch.manual_seed(0)
    cfg = stackformer.StackformerConfig(**stackformer.PRESETS[preset], codebook_size=1024 if preset != "tiny" else 64,
                                        num_positions=num_positions, seq_len=seq_len)
    model = stackformer.Stackformer(cfg).to(device).train()
    optimizer = train_stackformer.configure_optimizer(model, 5e-4, 0.01, (0.9, 0.95), device.type)
    if compile_mode is not None:
        torch._dynamo.reset()
    step_model = utils.compile_module(model, compile_mode) if compile_mode is not None else model
    if ddp:
        step_model = DDP(step_model, device_ids=ddp_device_ids(device))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    codes, positions = random_sequences(batch, seq_len, num_positions, cfg.codebook_size, device)
    n = SimpleNamespace(model=step_model, raw_model=model, optimizer=optimizer, autocast=autocast,   # train_step's
                        graphed=compile_mode == "reduce-overhead", fallback=lambda fn, *args: fn(*args))

    def step():
        train_stackformer.train_step(n, [(codes, positions, None)], train_stackformer.TrainConfig.grad_clip)

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


def default_modes(device, no_compile: bool) -> dict:
    """The torch.compile mode each stage runs in by default on one GPU of this device (None: eager), as
    the README's commands run them; --no-compile (the default before compile was) gives eager rows only."""
    if no_compile or device.type != "cuda":
        return dict(mqvae=None, stackformer=None)
    return dict(mqvae=train_mqvae.compile_mode_for(train_mqvae.TrainConfig.compile_mode, world=1),
                stackformer=train_stackformer.compile_mode_for(train_stackformer.TrainConfig.compile_mode, world=1))


def label(mode) -> str:
    return "--no-compile (eager)" if mode is None else f"default (compiled, {mode})"


def suffix(mode) -> str:
    return "eager" if mode is None else "default"


# -----------------------------------------------------------------------------
# Case 6: scaling over GPUs

def ddp_scaling(no_compile: bool, smoke: bool, json_path: str) -> dict:
    """Cases 1 (MQ-VAE step, batch 8 per GPU) and 3 (Stackformer base, N=256, batch 10 and 64 per GPU) on one GPU,
    then with DDP on all of them, each compiled as the trainers compile it there (one GPU, and under DDP).
    Rank 0 measures one GPU alone before the process group exists (the EMA codebook would otherwise wait for
    the other ranks); the others wait for it in the rendezvous."""
    utils.check("RANK" in os.environ, "--ddp runs under torchrun: torchrun --standalone --nproc_per_node=2 bench.py --ddp")
    rank, local_rank, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    cuda = torch.cuda.is_available() and not smoke
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    fast, f8 = settings(device, smoke)
    sf = ("tiny", 16, 64) if smoke else ("base", 256, 1024)
    compiled = cuda and not no_compile

    def modes(ddp):
        if not compiled:
            return dict(mqvae=None, stackformer=None)
        n = world if ddp else 1
        return dict(mqvae=train_mqvae.compile_mode_for(train_mqvae.TrainConfig.compile_mode, n),
                    stackformer=train_stackformer.compile_mode_for(train_stackformer.TrainConfig.compile_mode, n))
    cases = [("1 MQ-VAE train step, LPIPS+GAN, batch 8/GPU", "images_per_s", "img/s",
              lambda ddp: mqvae_step_bench(f8, 8, device, compile_mode=modes(ddp)["mqvae"], ddp=ddp, **fast)),
             *((f"3 Stackformer {sf[0]} train, N={sf[1]}, batch {b}/GPU", "tokens_per_s", "tok/s",
                lambda ddp, b=b: stackformer_train_bench(*sf, b, device, compile_mode=modes(ddp)["stackformer"],
                                                         ddp=ddp, **fast))
               for b in (10, 64))]
    single = [run(False)[key] for _, key, _, run in cases] if rank == 0 else None
    _, world, _, device = utils.setup_distributed()
    results = dict(world_size=world, one_gpu_modes=modes(False), ddp_modes=modes(True))
    for i, (name, key, unit, run) in enumerate(cases):
        total = run(True)[key] * world   # every rank runs the same step in lockstep
        if rank == 0:
            scaling = total / single[i]
            results[name] = dict(one_gpu=single[i], all_gpus=total, scaling=scaling, efficiency=scaling / world)
            print(f"6 {name}: 1 GPU {single[i]:.1f} {unit}, {world} GPUs "
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
        print(f"{name:<86}  {value:>24}  {note}", flush=True)
        with open(self.json_path, "w") as fh:
            json.dump(self, fh, indent=2)
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def case_1(b: SimpleNamespace):
    """MQ-VAE training step (LPIPS + GAN): the default command's (compiled) against --no-compile; where the
    step's time goes."""
    results, f8, device, mode = b.results, b.f8, b.device, b.modes["mqvae"]
    runs = [(2, None)] if b.smoke else [*([(8, mode)] if mode else []), (8, None), (32, None)]
    for batch, m in runs:
        r = mqvae_step_bench(f8, batch, device, compile_mode=m, check_sync=m is None and batch <= 8, **b.fast)
        results[f"mqvae_step_b{batch}_{suffix(m)}"] = r
        results.row(f"1 MQ-VAE train step, LPIPS+GAN, batch {batch}, {label(m)}", f"{r['images_per_s']:.1f} img/s",
                    f"{r['peak_memory_gb']:.1f} GB peak" + (f"; host sync: {r['host_sync_in_forward_backward']}"
                                                           if "host_sync_in_forward_backward" in r else ""))
    for m in ([mode] if mode else []) + [None]:
        shares = component_shares(f8, 2 if b.smoke else 8, device, compile_mode=m,
                                  **({"warmup": 1, "iters": 1} if b.smoke else {}))
        results[f"mqvae_component_shares_b8_{suffix(m)}"] = shares
        results.row(f"1 share of fwd+bwd time (parts run alone), {label(m)}", "",
                    ", ".join(f"{k} {v['share']:.0%}" for k, v in shares.items()))


def case_2(b: SimpleNamespace):
    """What masking costs: the autoencoder step (no LPIPS, no GAN) of MQ-VAE against the same network with
    masker "none" (VQGAN: no mask, no de-mask, every token quantized), default (compiled) and eager."""
    results, f8, device, mode = b.results, b.f8, b.device, b.modes["mqvae"]
    vqgan = mqvae.MQVAEConfig(**{**vars(f8), "masker": "none", "keep_ratio": 1.0})
    batch = 2 if b.smoke else 8
    for m in ([mode] if mode else []) + [None]:
        masked = mqvae_step_bench(f8, batch, device, gan=False, use_lpips=False, compile_mode=m, **b.fast)
        plain = mqvae_step_bench(vqgan, batch, device, gan=False, use_lpips=False, compile_mode=m, **b.fast)
        overhead = plain["images_per_s"] / masked["images_per_s"]
        results[f"masking_cost_b{batch}_{suffix(m)}"] = dict(masked=masked, masker_none=plain, overhead=overhead)
        results.row(f"2 autoencoder step, batch {batch}, {label(m)}: MQ-VAE keep 25% / --masker none",
                    f"{masked['images_per_s']:.1f} / {plain['images_per_s']:.1f} img/s", f"masking overhead {overhead:.2f}x")


def case_3(b: SimpleNamespace):
    """Stackformer training throughput and MFU, default (compiled) against --no-compile."""
    results, mode = b.results, b.modes["stackformer"]
    seq_len, num_positions = b.lengths[0]
    runs = [(2, None)] if b.smoke else [(batch, m) for batch in (10, 128) for m in ([mode] if mode else []) + [None]]
    for batch, m in runs:
        r = stackformer_train_bench(b.sf_preset, seq_len, num_positions, batch, b.device, compile_mode=m, **b.fast)
        results[f"stackformer_train_L{seq_len}_b{batch}_{suffix(m)}"] = r
        results.row(f"3 Stackformer {b.sf_preset} ({r['params_m']:.0f}M) train, N={seq_len}, batch {batch}, {label(m)}",
                    f"{r['tokens_per_s'] / 1e3:.1f}k tok/s", f"MFU {r['mfu']:.1%}, {r['peak_memory_gb']:.1f} GB")


def case_4(b: SimpleNamespace):
    """Sampling speed: the fast sampler (the default: CUDA graph), with its step compiled (--compile-step),
    the reference KV-cache loop, no cache; with MQ-VAE decoding (eager, compiled); the cost of
    classifier-free guidance (a class-conditional model at scale 1 and 2)."""
    results, device = b.results, b.device
    seq_len, num_positions = b.lengths[0]
    compiled = b.modes["mqvae"] is not None     # CUDA and not --no-compile

    def row(name, mode, batch, decoder=None, scale=None, iters=2):
        r = sampling_bench(b.sf_preset, seq_len, num_positions, batch, device, mode, decoder=decoder, cfg_scale=scale,
                           iters=1 if b.smoke else iters)
        results[name] = r
        return r

    check_compiled = compiled
    results["sampling_paths_agree"] = sampling_paths_agree(device, compile=check_compiled,
                                                           preset=b.sf_preset if b.smoke else "demo")
    results.row("4 fp32 tokens equal: fast / KV / no-cache" + (" / compiled step" if check_compiled else ""),
                str(results["sampling_paths_agree"]), "greedy and seeded; unconditional and guided")
    batches = [2] if b.smoke else [64, 256]
    for batch in batches:
        modes = (["kv", "no-cache"] if b.smoke else ["graph", "kv"] + (["graph+compile"] if compiled else [])
                 + (["no-cache"] if batch == 64 else []))
        for mode in modes:
            torch._dynamo.reset()   # each batch size compiles afresh, as in a sample.py run
            r = row(f"sampling_b{batch}_{mode}", mode, batch, iters=1 if mode == "no-cache" else 2)
            name = {"graph": "fast sampler (default: CUDA graph)", "graph+compile": "--compile-step",
                    "kv": "reference KV-cache loop", "no-cache": "no KV cache"}[mode]
            results.row(f"4 sampling {b.sf_preset}, N={seq_len}, batch {batch}, {name}, tokens only",
                        f"{r['images_per_s']:.1f} img/s", f"{r['seconds_per_batch']:.2f} s/batch")
    mode = "kv" if b.smoke else "graph"
    for decode_compiled in ([True] if compiled else []) + [False]:
        decoder = mqvae.MQVAE(b.f8).to(device).eval()
        if decode_compiled:     # as sample.py compiles its decoding
            torch._dynamo.reset()
            import sample
            sample.compile_decoding(decoder, lambda message: None)
        for batch in batches:
            r = row(f"sampling_b{batch}_{mode}_decoded_{'compiled' if decode_compiled else 'eager'}", mode, batch,
                    decoder=decoder)
            results.row(f"4 sampling batch {batch}, {mode}, with MQ-VAE decoding (fp32, "
                        f"{'compiled' if decode_compiled else 'eager'})", f"{r['images_per_s']:.1f} img/s")
    for batch in batches:      # the cost of classifier-free guidance: a second stream of B rows
        for scale in (1.0, 2.0):
            r = row(f"sampling_b{batch}_{mode}_class_cfg{scale:g}", mode, batch, scale=scale)
            results.row(f"4 sampling {b.sf_preset}, N={seq_len}, batch {batch}, {mode}, class, cfg scale {scale:g}, tokens only",
                        f"{r['images_per_s']:.1f} img/s", f"{r['seconds_per_batch']:.2f} s/batch")


def case_5(b: SimpleNamespace):
    """FID Inception features against pytorch-fid's network (when installed)."""
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
    parser.add_argument("--no-compile", action="store_true",
                        help="eager rows only (the default commands compile on CUDA: both are measured without this)")
    parser.add_argument("--ddp", action="store_true",
                        help="case 6 only, under torchrun: cases 1 and 3 with DDP on every GPU against one GPU")
    parser.add_argument("--json", default="bench.json", help="where to write the results")
    args = parser.parse_args(argv)
    if args.ddp:
        return ddp_scaling(args.no_compile, args.cpu_smoke, args.json)
    cases = sorted({int(c) for c in args.cases.split(",")})
    utils.check(all(c in CASES for c in cases), f"--cases takes numbers from {sorted(CASES)}, got {args.cases}")
    smoke = args.cpu_smoke
    device = torch.device("cpu" if smoke or not torch.cuda.is_available() else "cuda")
    fast, f8 = settings(device, smoke)
    sf_preset, lengths = ("tiny", [(16, 64)]) if smoke else ("base", [(256, 1024)])
    b = SimpleNamespace(results=Results(args.json, device), device=device, fast=fast, f8=f8, sf_preset=sf_preset,
                        lengths=lengths, smoke=smoke, modes=default_modes(device, args.no_compile))
    for c in cases:
        CASES[c](b)
    return b.results


if __name__ == "__main__":
    utils.run_main(main)
