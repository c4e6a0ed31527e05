"""
The test suite: CPU only, no downloads, tiny shapes. Run with `python -m pytest test_all.py`.
Each test name states the property it checks.
"""

import dataclasses
import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from PIL import Image

import bench
import data
import fast_sampling
import fid
import mqvae
import sample
import stackformer
import train_mqvae
import train_stackformer
import utils
from mqvae import MQVAE, PRESETS, MQVAEConfig
from stackformer import SamplingConfig, Stackformer, StackformerConfig, WordTokenizer
from utils import UserError, load_stackformer, run_main, save_checkpoint

torch.set_num_threads(2)
HERE = os.path.dirname(os.path.abspath(__file__))


def tiny_config(**overrides):
    return MQVAEConfig(**{**PRESETS["tiny"], "resolution": 16, **overrides})


def run_script(args, timeout=600, env_extra=None):
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **(env_extra or {}))
    return subprocess.run([sys.executable] + args, cwd=HERE, capture_output=True, text=True, timeout=timeout, env=env)


def read_jsonl(path):
    with open(path) as fh:
        return [json.loads(line) for line in fh]


# -----------------------------------------------------------------------------
# Stage 1: model

@pytest.mark.parametrize("f, ch_mult, size", [(8, (1, 1, 2, 2), 32), (16, (1, 1, 2, 2, 4), 64)])
def test_output_shapes_for_f8_and_f16(f, ch_mult, size):
    cfg = MQVAEConfig(ch=16, ch_mult=ch_mult, num_res_blocks=1, z_channels=16, codebook_size=32,
                      codebook_dim=8, demask_layers=2, resolution=size, keep_ratio=0.5)
    model = MQVAE(cfg).eval()
    assert cfg.downsample_factor == f
    x = torch.rand(2, 3, size, size) * 2 - 1
    x_rec, aux = model(x)
    grid = size // f
    N = int(0.5 * grid * grid)
    assert x_rec.shape == x.shape
    assert aux["codes"].shape == aux["positions"].shape == (2, N)
    assert aux["scores"].shape == (2, grid, grid)
    codes, positions, scores = model.encode(x)
    assert model.decode(codes, positions).shape == x.shape


@pytest.mark.parametrize("keep", [0.25, 0.3, 0.5, 0.7, 1.0])
def test_number_of_kept_tokens_is_floor_of_keep_ratio_times_T(keep):
    model = MQVAE(tiny_config(keep_ratio=keep)).eval()
    codes, positions, _ = model.encode(torch.zeros(3, 3, 16, 16))
    T = 64
    assert codes.shape[1] == int(keep * T)
    assert all(len(set(row.tolist())) == int(keep * T) for row in positions)  # distinct positions


def test_encode_returns_positions_in_descending_importance_order():
    model = MQVAE(tiny_config()).eval()
    codes, positions, scores = model.encode(torch.rand(4, 3, 16, 16) * 2 - 1)
    kept_scores = scores.flatten(1).gather(1, positions)
    assert (kept_scores[:, :-1] >= kept_scores[:, 1:]).all()
    assert torch.equal(positions, scores.flatten(1).topk(positions.shape[1], dim=1).indices)


def test_vectorised_mask_gather_equals_per_sample_loop():
    torch.manual_seed(0)
    mask = mqvae.AdaptiveMask(z_channels=8, codebook_dim=4, keep_ratio=0.25).eval()
    h = torch.randn(3, 8, 4, 4)
    z, z_commit, positions, scores = mask(h)
    assert torch.equal(z_commit, z)                     # official: the commitment term sees z itself
    for b in range(3):  # the official code's loop, one sample at a time
        s = scores[b].flatten()
        order = torch.sort(s, descending=True).indices[:4]
        tokens = F.layer_norm(h[b].flatten(1).t(), (8,))
        expected = mask.pre_projection(tokens[order] * s[order, None])
        assert torch.equal(positions[b], order)
        torch.testing.assert_close(z[b], expected)


def commitment_and_reconstruction_grads(through: bool):
    """Gradients of the scoring net, the encoder and the pre-projection from L_commit alone and from a
    reconstruction loss alone, for one fixed batch and set of weights."""
    torch.manual_seed(0)
    model = MQVAE(tiny_config(commit_through_score=through, beta=1.0))
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    parts = {"score": model.mask.score_net, "encoder": model.encoder, "pre": model.mask.pre_projection}
    grads = {}
    for which in ("commit", "rec"):
        model.zero_grad()
        x_rec, aux = model(x)
        (aux["commit_loss"] if which == "commit" else (x_rec - x).abs().mean()).backward()
        for name, module in parts.items():
            grads[which, name] = torch.cat([p.grad.flatten() if p.grad is not None else torch.zeros(p.numel())
                                            for p in module.parameters()])
    return grads


def test_commitment_off_the_score_leaves_the_scoring_net_to_the_reconstruction():
    on, off = commitment_and_reconstruction_grads(True), commitment_and_reconstruction_grads(False)
    assert on["commit", "score"].abs().max() > 1e-6          # official: L_commit reaches the scoring net
    assert off["commit", "score"].abs().max() == 0.0         # sg(s)·u: not at all
    for name in ("score", "encoder", "pre"):                # the reconstruction gradient is the same
        torch.testing.assert_close(off["rec", name], on["rec", name], rtol=0, atol=0)
    assert off["commit", "encoder"].abs().max() > 1e-6       # the encoder still commits to its codes
    assert off["commit", "pre"].abs().max() > 1e-6


def test_commitment_off_the_score_keeps_selection_codes_and_output():
    torch.manual_seed(0)
    on = MQVAE(tiny_config(commit_through_score=True)).eval()
    off = MQVAE(tiny_config(commit_through_score=False)).eval()
    off.load_state_dict(on.state_dict())
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    (rec_on, aux_on), (rec_off, aux_off) = on(x), off(x)
    assert torch.equal(rec_on, rec_off) and torch.equal(aux_on["codes"], aux_off["codes"])
    assert torch.equal(aux_on["positions"], aux_off["positions"])
    torch.testing.assert_close(aux_on["commit_loss"], aux_off["commit_loss"])   # same value, other gradient


def test_scatter_then_gather_is_identity():
    torch.manual_seed(0)
    demask = mqvae.AdaptiveDemask(tiny_config())
    B, T, D = 3, 64, 32
    positions = torch.stack([torch.randperm(T)[:16] for _ in range(B)])
    z_q = torch.randn(B, 16, D)
    canvas = demask.mask_token.expand(B, T, D).scatter(1, positions[..., None].expand(-1, -1, D), z_q)
    assert torch.equal(canvas.gather(1, positions[..., None].expand(-1, -1, D)), z_q)
    untouched = torch.ones(B, T, dtype=torch.bool).scatter(1, positions, False)
    assert torch.equal(canvas[untouched], demask.mask_token.expand(int(untouched.sum()), D))


def test_value_scaled_sdpa_equals_post_softmax_key_multiplied_attention():
    torch.manual_seed(0)
    B, T, C = 2, 10, 6
    q, k, v = torch.randn(3, B, 1, T, C).unbind(0)
    mu = torch.where(torch.rand(B, T) < 0.5, 1.0, 0.02)
    ours = F.scaled_dot_product_attention(q, k, v * mu[:, None, :, None])
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(C), dim=-1)  # official: softmax, then × μ_j
    official = (weights * mu[:, None, None, :]) @ v
    torch.testing.assert_close(ours, official, atol=1e-6, rtol=1e-5)
    assert (weights * mu[:, None, None, :]).sum(-1).max() < 1.0  # rows are left unnormalised


def test_attention_block_with_mu_matches_explicit_formula():
    torch.manual_seed(0)
    block = mqvae.AttnBlock(8).eval()
    x = torch.randn(2, 8, 3, 3)
    mu = torch.rand(2, 9)
    out = block(x, mu=mu)
    h = block.norm(x)
    q, k, v = (conv(h).flatten(2).transpose(1, 2) for conv in (block.q, block.k, block.v))
    weights = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(8), dim=-1) * mu[:, None, :]
    expected = x + block.proj_out((weights @ v).transpose(1, 2).reshape(2, 8, 3, 3))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_zero_mu_makes_output_independent_of_masked_values():
    torch.manual_seed(0)
    B, T, C = 2, 12, 4
    q, k, v = torch.randn(3, B, 1, T, C).unbind(0)
    masked = torch.rand(B, T) < 0.5
    mu = torch.where(masked, 0.0, 1.0)
    v2 = v.clone()
    v2[masked[:, None, :, None].expand_as(v)] = 100.0
    out1 = F.scaled_dot_product_attention(q, k, v * mu[:, None, :, None])
    out2 = F.scaled_dot_product_attention(q, k, v2 * mu[:, None, :, None])
    assert masked.any() and torch.equal(out1, out2)


def test_demask_mu_grows_by_square_root_per_layer():
    cfg = tiny_config(demask_layers=4)
    demask = mqvae.AdaptiveDemask(cfg)
    seen = []
    for block in demask.blocks:
        block.attn.register_forward_hook(lambda m, args, kwargs, out: seen.append(kwargs["mu"].clone()), with_kwargs=True)
    positions = torch.arange(16)[None]
    demask(torch.randn(1, 16, cfg.codebook_dim), positions, (8, 8))
    masked_mu = [float(m[0, 63]) for m in seen]
    kept_mu = [float(m[0, 0]) for m in seen]
    assert kept_mu == [1.0] * 4
    np.testing.assert_allclose(masked_mu, [0.02 ** (0.5 ** i) for i in range(4)], rtol=1e-6)


def test_hard_demask_excludes_masked_keys_entirely():
    torch.manual_seed(0)
    block = mqvae.AttnBlock(8).eval()
    x = torch.randn(1, 8, 2, 2)
    key_mask = torch.tensor([[True, True, False, False]])
    out = block(x, key_mask=key_mask)
    h = block.norm(x)
    q, k, v = (conv(h).flatten(2).transpose(1, 2) for conv in (block.q, block.k, block.v))
    weights = torch.softmax(q @ k[:, :2].transpose(1, 2) / math.sqrt(8), dim=-1)  # only the kept keys
    expected = x + block.proj_out((weights @ v[:, :2]).transpose(1, 2).reshape(1, 8, 2, 2))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_straight_through_gradient_reaches_encoder_and_scoring_net():
    torch.manual_seed(0)
    model = MQVAE(tiny_config()).train()
    x_rec, aux = model(torch.rand(2, 3, 16, 16) * 2 - 1)
    x_rec.abs().mean().backward()  # reconstruction only: no commitment term
    assert model.encoder.conv_in.weight.grad.abs().sum() > 0
    score_conv = model.mask.score_net[1]
    assert score_conv.weight.grad is not None and score_conv.weight.grad.abs().sum() > 0
    assert model.demask.mask_token.grad.abs().sum() > 0


def test_commitment_beta_sits_on_the_encoder_side():
    torch.manual_seed(0)
    for mode in ("ema", "grad"):
        vq = mqvae.VectorQuantizer(tiny_config(codebook=mode, codebook_size=8, codebook_dim=4))
        z = torch.randn(2, 5, 4, requires_grad=True)
        _, codes, loss = vq(z)
        loss.backward()
        z_q = vq.codebook.detach()[codes]
        # d/dz of β·mean((z - sg(z_q))²) is 2β(z - z_q)/numel: β multiplies the encoder's gradient
        torch.testing.assert_close(z.grad, 2 * 0.25 * (z.detach() - z_q) / z.numel())
        if mode == "grad":  # the codebook term carries weight 1, not β
            expected = torch.zeros(8, 4).index_add_(0, codes.flatten(), 2 * (z_q - z.detach()).reshape(-1, 4) / z.numel())
            torch.testing.assert_close(vq.codebook.grad, expected)


def test_ema_update_moves_code_towards_assigned_features_and_restarts_dead_codes():
    torch.manual_seed(0)
    vq = mqvae.VectorQuantizer(tiny_config(codebook_size=4, codebook_dim=2, restart_dead_codes=True))
    with torch.no_grad():
        vq.codebook.copy_(torch.tensor([[0.0, 0.0], [10.0, 10.0], [-10.0, 10.0], [10.0, -10.0]]))
        vq.embed_sum.copy_(vq.codebook)
        vq.cluster_size.copy_(torch.tensor([5.0, 5.0, 5.0, 0.0]))  # code 3 is dead
    features = torch.tensor([[1.0, 1.0]] * 8)[None]  # all nearest to code 0
    before = vq.codebook.clone()
    vq(features, collect_stats=True)
    assert torch.equal(vq.codebook, before)  # collected, not yet applied
    vq.ema_step()
    assert (vq.codebook[0] - 1.0).abs().sum() < (before[0] - 1.0).abs().sum()  # moved towards (1,1)
    torch.testing.assert_close(vq.codebook[3], torch.tensor([1.0, 1.0]), atol=1e-3, rtol=0)  # restarted from a feature
    assert vq.cluster_size[3] >= 1.0
    assert vq.cluster_size[1] == pytest.approx(5.0 * 0.99, rel=1e-6)


def test_ema_statistics_of_accumulated_micro_batches_equal_one_big_batch():
    torch.manual_seed(0)
    cfg = tiny_config(codebook_size=8, codebook_dim=3, restart_dead_codes=False)
    a, b = mqvae.VectorQuantizer(cfg), mqvae.VectorQuantizer(cfg)
    b.load_state_dict(a.state_dict())
    z = torch.randn(4, 5, 3)
    a(z[:2], collect_stats=True)
    a(z[2:], collect_stats=True)   # two micro-batches of one optimizer step
    a.ema_step()
    b(z, collect_stats=True)
    b.ema_step()
    torch.testing.assert_close(a.codebook, b.codebook)
    torch.testing.assert_close(a.cluster_size, b.cluster_size)
    before = a.codebook.clone()
    a.ema_step()                    # nothing collected since: no change
    assert torch.equal(a.codebook, before)


def test_quantizer_picks_nearest_code_and_eval_never_updates():
    torch.manual_seed(0)
    vq = mqvae.VectorQuantizer(tiny_config(codebook_size=16, codebook_dim=3))
    z = torch.randn(2, 7, 3)
    before = vq.codebook.clone()
    z_q, codes, _ = vq(z)
    expected = torch.cdist(z.reshape(-1, 3), vq.codebook).argmin(1)
    assert torch.equal(codes.flatten(), expected)
    torch.testing.assert_close(z_q, vq.codebook[codes])
    assert torch.equal(vq.codebook, before)


def test_adaptive_gan_weight_matches_formula_on_toy_graph():
    torch.manual_seed(0)
    w = torch.randn(3, 3, requires_grad=True)
    x = torch.randn(5, 3)
    out = x @ w
    rec = out.pow(2).mean()
    gan = -out.sum() * 0.01
    g_rec, = torch.autograd.grad(rec, w, retain_graph=True)
    g_gan, = torch.autograd.grad(gan, w)
    expected = min(0.75 * float(g_rec.norm() / (g_gan.norm() + 1e-4)), 1.0)
    assert train_mqvae.adaptive_gan_weight(g_rec, g_gan, 0.75, 1.0).item() == pytest.approx(expected, rel=1e-6)
    big = train_mqvae.adaptive_gan_weight(g_rec * 1e6, g_gan, 0.75, 1.0)
    assert big.item() == 1.0  # capped
    uncapped = train_mqvae.adaptive_gan_weight(g_rec, g_gan * 1e-9, 0.75, 1e9)
    assert uncapped.item() == pytest.approx(0.75 * 1e4, rel=1e-6)  # clamped to 1e4 before × 0.75


def test_last_layer_gradient_trick_equals_direct_backward():
    """The loop takes ∂L/∂x̃ first and backpropagates once; the result must equal autograd on the full sum."""
    torch.manual_seed(0)
    model = MQVAE(tiny_config()).eval()
    disc = mqvae.PatchDiscriminator(ndf=8, n_layers=1).eval()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    x_rec, aux = model(x)
    rec = (x - x_rec).abs().mean()
    g = -disc(x_rec).mean()
    grad_rec, = torch.autograd.grad(rec, x_rec, retain_graph=True)
    grad_g, = torch.autograd.grad(g, x_rec, retain_graph=True)
    last = model.last_layer()
    w_rec, = torch.autograd.grad(x_rec, last, grad_outputs=grad_rec, retain_graph=True)
    w_g, = torch.autograd.grad(x_rec, last, grad_outputs=grad_g, retain_graph=True)
    direct_rec, = torch.autograd.grad(rec, last, retain_graph=True)
    direct_g, = torch.autograd.grad(g, last, retain_graph=True)
    torch.testing.assert_close(w_rec, direct_rec)
    torch.testing.assert_close(w_g, direct_g)
    lam = 0.3
    torch.autograd.backward([x_rec, aux["commit_loss"]], [grad_rec + lam * grad_g, torch.ones_like(aux["commit_loss"])],
                            retain_graph=True)
    ours = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    (rec + lam * g + aux["commit_loss"]).backward()
    for a, p in zip(ours, model.parameters()):
        torch.testing.assert_close(a, p.grad, atol=1e-6, rtol=1e-5)


def test_hinge_losses_on_known_logits():
    real = torch.tensor([2.0, 0.5, -1.0])
    fake = torch.tensor([-2.0, 0.0, 1.0])
    # mean ReLU(1 - real) = (0 + 0.5 + 2)/3; mean ReLU(1 + fake) = (0 + 1 + 2)/3
    expected = 0.5 * (2.5 / 3 + 3.0 / 3)
    assert train_mqvae.hinge_d_loss(real, fake).item() == pytest.approx(expected)


def test_discriminator_layout_and_init():
    torch.manual_seed(0)
    disc = mqvae.PatchDiscriminator()
    convs = [m for m in disc.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.stride[0] for c in convs] == [2, 2, 2, 1, 1]
    assert [c.out_channels for c in convs] == [64, 128, 256, 512, 1]
    assert abs(convs[1].weight.std().item() - 0.02) < 0.002
    assert disc(torch.zeros(1, 3, 64, 64)).shape == (1, 1, 6, 6)


@pytest.fixture(scope="module")
def random_vgg_file(tmp_path_factory):
    import torchvision
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("vgg") / "vgg16-397923af.pth"
    torch.save(torchvision.models.vgg16().state_dict(), path)
    return str(path)


def test_lpips_of_identical_images_is_zero_with_head_loaded_strictly(random_vgg_file):
    import lpips
    lp = train_mqvae.build_lpips(random_vgg_file)
    head = torch.load(os.path.join(os.path.dirname(lpips.__file__), "weights", "v0.1", "vgg.pth"),
                      map_location="cpu", weights_only=True)
    for key, value in head.items():  # the real head, not a random one
        assert torch.equal(lp.state_dict()[key], value)
    assert not lp.training and not any(p.requires_grad for p in lp.parameters())
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert lp(x, x).abs().max().item() == 0.0
    assert lp(x, -x).min().item() > 0.0


def test_lpips_missing_vgg_file_names_file_and_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: (_ for _ in ()).throw(OSError("offline")))
    with pytest.raises(UserError) as err:
        train_mqvae.build_lpips(None)
    message = str(err.value)
    assert "vgg16-397923af.pth" in message and str(tmp_path / "hub" / "checkpoints") in message
    assert "--perceptual-weight 0" in message


def test_model_checkpoint_round_trip_gives_identical_outputs(tmp_path):
    torch.manual_seed(0)
    model = MQVAE(tiny_config()).train()
    model(torch.rand(4, 3, 16, 16) * 2 - 1)  # move EMA buffers and BN statistics away from init
    model.eval()
    path = str(tmp_path / "ckpt.pt")
    utils.save_checkpoint(dict(kind="mqvae", mqvae_config=vars(model.config), mqvae=model.state_dict()), path)
    loaded = utils.load_mqvae(path)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    assert torch.equal(model(x)[0], loaded(x)[0])
    codes, positions, _ = model.encode(x)
    assert torch.equal(model.decode(codes, positions), loaded.decode(codes.flip(1), positions.flip(1)))


def test_checkpoint_loading_errors_are_one_line(tmp_path):
    missing = str(tmp_path / "nope.pt")
    with pytest.raises(UserError, match="not found"):
        utils.load_checkpoint(missing, "mqvae")
    truncated = tmp_path / "trunc.pt"
    torch.save(dict(kind="mqvae", w=torch.zeros(1000)), truncated)
    truncated.write_bytes(truncated.read_bytes()[:100])
    with pytest.raises(UserError, match="truncated"):
        utils.load_checkpoint(str(truncated), "mqvae")
    other = tmp_path / "stage2.pt"
    torch.save(dict(kind="stackformer"), other)
    with pytest.raises(UserError, match="Stackformer"):
        utils.load_checkpoint(str(other), "mqvae")


def test_strict_load_rejects_missing_keys():
    model = MQVAE(tiny_config())
    state = model.state_dict()
    state.pop("demask.mask_token")
    with pytest.raises(RuntimeError, match="mask_token"):
        MQVAE(tiny_config()).load_state_dict(state, strict=True)


def test_decode_accepts_any_order():
    torch.manual_seed(0)
    model = MQVAE(tiny_config()).eval()
    codes, positions, _ = model.encode(torch.rand(2, 3, 16, 16) * 2 - 1)
    perm = torch.randperm(codes.shape[1])
    torch.testing.assert_close(model.decode(codes, positions), model.decode(codes[:, perm], positions[:, perm]))


def test_random_masker_keeps_n_random_positions_with_unit_scores():
    torch.manual_seed(0)
    model = MQVAE(tiny_config(masker="random")).eval()
    codes, positions, scores = model.encode(torch.zeros(2, 3, 16, 16))
    assert positions.shape == (2, 16) and (scores == 1).all()
    assert not torch.equal(positions[0].sort().values, positions[1].sort().values)


def test_bad_inputs_to_model_give_clear_errors():
    with pytest.raises(ValueError, match="keep ratio"):
        tiny_config(keep_ratio=1.5)
    with pytest.raises(ValueError, match="keep ratio"):
        tiny_config(keep_ratio=0.0)
    with pytest.raises(ValueError, match="not divisible"):
        MQVAE(tiny_config())(torch.zeros(1, 3, 15, 16))


# -----------------------------------------------------------------------------
# Stage 1: data

def test_shapes_dataset_is_deterministic_per_index_and_any_resolution():
    a, b = data.ShapesDataset(32, 10), data.ShapesDataset(32, 10)
    assert torch.equal(a[3]["image"], b[3]["image"])
    assert not torch.equal(a[3]["image"], a[4]["image"])
    assert data.ShapesDataset(48, 10)[0]["image"].shape == (3, 48, 48)
    x = a[0]["image"]
    assert x.min() >= -1 and x.max() <= 1
    val = data.ShapesDataset(32, 10, "val")
    assert not torch.equal(val[0]["image"], a[0]["image"])
    assert a.caption(0).startswith(("a ", "an ")) and a[0]["label"] in (0, 1, 2)


def _write_images(folder, count, size=20, seed=0):
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (size, size + 4, 3), dtype=np.uint8)).save(os.path.join(folder, f"{i:03d}.png"))


def test_corrupt_image_is_skipped_counted_and_named(tmp_path, capsys):
    folder = tmp_path / "imgs"
    _write_images(folder, 6)
    (folder / "002.png").write_bytes(b"not a png")
    ds = data.build_dataset(str(folder), None, 16, "train")
    index = [i for i, f in enumerate(ds.files) if f.endswith("002.png")][0]
    item = ds[index]
    assert item["bad"] == index and item["index"] != index and item["image"].shape == (3, 16, 16)


def test_image_loading_converts_odd_modes(tmp_path):
    gray16 = tmp_path / "g16.png"
    Image.fromarray(np.full((8, 8), 65535, dtype=np.uint16)).save(gray16)
    assert np.asarray(data.load_rgb(str(gray16))).min() == 255  # scaled, not clipped to garbage
    rgba = tmp_path / "rgba.png"
    Image.new("RGBA", (4, 4), (0, 0, 0, 0)).save(rgba)
    assert np.asarray(data.load_rgb(str(rgba))).min() == 255  # transparent -> white
    cmyk = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (4, 4), (0, 0, 0, 0)).save(cmyk)
    assert data.load_rgb(str(cmyk)).mode == "RGB"


def test_augmentation_is_deterministic_given_sample_seed(tmp_path):
    _write_images(tmp_path / "imgs", 3, size=40)
    ds = data.ImageFiles(data.list_images(str(tmp_path / "imgs")), 16, "rrc")
    assert torch.equal(ds[(1, 123)]["image"], ds[(1, 123)]["image"])
    assert not torch.equal(ds[(1, 123)]["image"], ds[(1, 124)]["image"])


def test_resumable_sampler_skips_exactly_the_consumed_samples():
    ds = data.ShapesDataset(8, 50)
    full = data.ResumableSampler(ds, num_replicas=2, rank=1, seed=3)
    full.set_epoch(4)
    resumed = data.ResumableSampler(ds, num_replicas=2, rank=1, seed=3)
    resumed.set_epoch(4, skip=10)
    assert list(resumed) == list(full)[10:]
    other_rank = data.ResumableSampler(ds, num_replicas=2, rank=0, seed=3)
    other_rank.set_epoch(4)
    assert not set(i for i, _ in other_rank) & set(i for i, _ in full)


def test_unknown_dataset_and_empty_folder_are_clear_errors(tmp_path):
    with pytest.raises(UserError, match="unknown dataset"):
        data.build_dataset("nonexistent-dataset-name", None, 16, "train")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no images"):
        data.build_dataset(str(tmp_path / "empty"), None, 16, "train")
    with pytest.raises(UserError, match="FFHQ folder") as err:
        data.build_dataset("ffhq", str(tmp_path / "missing"), 16, "train")
    assert "DIR/**/*.png" in str(err.value) and "ffhqtrain.txt" in str(err.value)     # the layout it expects
    with pytest.raises(UserError, match="no images") as err:
        data.build_dataset("ffhq", str(tmp_path / "empty"), 16, "train")
    assert "DIR/**/*.png" in str(err.value)


def test_the_file_check_names_every_unreadable_file_at_once_and_is_reused_until_the_folder_changes(
        tmp_path, monkeypatch, capsys):
    _write_images(tmp_path / "imgs", 200, size=8)
    (tmp_path / "imgs" / "zero.png").write_bytes(b"")
    (tmp_path / "imgs" / "text.jpg").write_bytes(b"this is not a jpeg\n")
    truncated = (tmp_path / "imgs" / "001.png").read_bytes()[:60]
    (tmp_path / "imgs" / "cut.png").write_bytes(truncated)     # its header reads: left to the loader
    out = str(tmp_path / "run")
    dataset = lambda: data.ImageFiles(data.list_images(str(tmp_path / "imgs")), 8, "eval")
    checked = data.check_image_files({"train": dataset()}, out)["train"]
    assert len(checked) == 201 and not {"zero.png", "text.jpg"} & {os.path.basename(f) for f in checked.files}
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning")]
    assert len(warnings) == 1 and "zero.png (empty file)" in warnings[0] and "text.jpg (" in warnings[0]
    assert "2 of 203 image files" in warnings[0]                 # 2 <= 1% of 203: left out, not an error
    saved = json.load(open(os.path.join(out, "checked_train.json")))
    assert saved["files"] == 203 and len(saved["unreadable"]) == 2

    def must_not_run(path):
        raise AssertionError("checked again")
    monkeypatch.setattr(data, "header_problem", must_not_run)
    again = data.check_image_files({"train": dataset()}, out)["train"]   # a resumed run: the saved result
    assert again.files == checked.files and "as checked before" in capsys.readouterr().out
    (tmp_path / "imgs" / "201.png").write_bytes((tmp_path / "imgs" / "002.png").read_bytes())   # the folder changed
    with pytest.raises(AssertionError, match="checked again"):
        data.check_image_files({"train": dataset()}, out)
    monkeypatch.undo()
    (tmp_path / "imgs" / "empty.png").write_bytes(b"")            # 3 of 205: more than 1%
    with pytest.raises(UserError, match="3 of 205 image files could not be read .more than 1%.") as err:
        data.check_image_files({"train": dataset()}, out)
    assert all(name in str(err.value) for name in ("zero.png", "text.jpg", "empty.png"))
    shapes = data.ShapesDataset(8, 10)
    assert data.check_image_files({"train": shapes}, str(tmp_path / "shapes"))["train"] is shapes
    assert not os.path.exists(tmp_path / "shapes")                # no files, nothing to check or keep


def test_training_names_all_unreadable_files_before_its_first_step(tmp_path):
    _write_images(tmp_path / "own", 39, size=24)
    (tmp_path / "own" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"garbage" * 10)
    (tmp_path / "own" / "zero.png").write_bytes(b"")
    r = run_script(TINY_TRAIN + ["--data", str(tmp_path / "own"), "--max-steps", "5", "--out-dir", str(tmp_path / "o")])
    assert r.returncode == 2 and "Traceback" not in r.stderr
    error = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "2 of 41 image files could not be read" in error[0]
    assert "corrupt.jpg" in error[0] and "zero.png (empty file)" in error[0]
    assert "step " not in r.stdout and not os.path.exists(tmp_path / "o" / "log.jsonl")


# -----------------------------------------------------------------------------
# Stage 1: training script

TINY_TRAIN = ["train_mqvae.py", "--preset", "tiny", "--image-size", "16", "--batch-size", "4", "--log-every", "1",
              "--eval-images", "8", "--disc-start", "1", "--num-workers", "0", "--disc-layers", "2", "--perceptual-weight", "0"]


def test_resume_gives_the_same_next_losses_as_an_uninterrupted_run(tmp_path):
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    r = run_script(TINY_TRAIN + ["--max-steps", "5", "--out-dir", full])
    assert r.returncode == 0, r.stderr
    r = run_script(TINY_TRAIN + ["--max-steps", "5", "--stop-after", "3", "--out-dir", part])
    assert r.returncode == 0, r.stderr
    assert torch.load(os.path.join(part, "ckpt.pt"), weights_only=True)["step"] == 3
    r = run_script(TINY_TRAIN + ["--max-steps", "5", "--resume", "--out-dir", part])
    assert r.returncode == 0, r.stderr
    losses = lambda d: {rec["step"]: rec["loss"] for rec in read_jsonl(os.path.join(d, "log.jsonl")) if "loss" in rec}
    a, b = losses(full), losses(part)
    assert a[4] == b[4] and a[5] == b[5]  # bitwise on CPU
    wa = torch.load(os.path.join(full, "ckpt.pt"), weights_only=True)["mqvae"]
    wb = torch.load(os.path.join(part, "ckpt.pt"), weights_only=True)["mqvae"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_training_writes_grid_log_checkpoint_and_reports_codebook_usage(tmp_path):
    out = str(tmp_path / "run")
    r = run_script(TINY_TRAIN + ["--max-steps", "3", "--out-dir", out])
    assert r.returncode == 0, r.stderr
    assert os.path.isfile(os.path.join(out, "recon_0000003.png"))
    grid = Image.open(os.path.join(out, "recon_0000003.png"))
    assert grid.size == (4 * 16 + 5 * 2, 8 * 16 + 9 * 2)  # 8 rows of input | map | kept | reconstruction
    records = read_jsonl(os.path.join(out, "log.jsonl"))
    train_rec = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_rec] == [1, 2, 3]
    assert all(0 < r["codes_used"] <= 64 and r["perplexity"] >= 1 for r in train_rec)
    assert train_rec[-1]["gan_weight"] > 0  # GAN on from step 1
    evals = [r for r in records if "val_psnr" in r]
    assert evals and all(0 <= r["mask_on_objects"] <= 1 and 0 < r["mask_chance"] < 1 and 0 <= r["mask_auroc"] <= 1
                         and abs(r["mask_lift"] - r["mask_on_objects"] / r["mask_chance"]) < 1e-9
                         and -1 <= r["mask_r_detail"] <= 1 and 0 <= r["mask_p_feature"] <= 1 for r in evals)
    assert "mask: " in r.stdout and "of kept tokens on objects" in r.stdout.splitlines()[-1]   # the last line
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["model"]["keep_ratio"] == 0.25 and config["train"]["preset"] == "tiny"
    ckpt = utils.load_checkpoint(os.path.join(out, "ckpt.pt"), "mqvae")
    assert {"mqvae", "disc", "opt_ae", "opt_disc", "step", "rng", "train_config", "mqvae_config"} <= set(ckpt)


def test_mask_statistics_count_kept_object_tokens_and_rank_scores():
    rng = np.random.default_rng(0)
    objects = np.zeros((2, 8))
    objects[:, :2] = 1.0                        # tokens 0, 1 fully on an object, token 2 a quarter (background)
    objects[:, 2] = 0.25
    kept = np.zeros((2, 8))
    kept[0, [0, 1, 5]] = kept[1, [0, 4, 5]] = 1  # 3 of the 6 kept tokens on objects
    detail = rng.random((2, 8))
    scores = 0.5 + detail                       # perfectly rising with detail
    m = train_mqvae.mask_statistics(scores, kept, detail * 3, detail, objects)
    assert m["mask_on_objects"] == 0.5 and m["mask_chance"] == 0.25 and m["mask_lift"] == 2.0
    assert abs(m["mask_r_detail"] - 1) < 1e-12 and abs(m["mask_r_feature"] - 1) < 1e-12
    ranked = np.tile(np.arange(8.0)[::-1], (2, 1))            # object tokens score highest: AUROC 1
    assert train_mqvae.mask_statistics(ranked, kept, detail, detail, objects)["mask_auroc"] == 1.0
    assert train_mqvae.mask_statistics(-ranked, kept, detail, detail, objects)["mask_auroc"] == 0.0
    flat = np.ones((2, 8))                      # ties everywhere: chance, and no correlation to report
    m = train_mqvae.mask_statistics(flat, kept, detail, detail, objects)
    assert m["mask_auroc"] == 0.5 and "mask_r_detail" not in m
    assert train_mqvae.inversion_warning(train_mqvae.mask_statistics(1 - detail, kept, detail, detail), False) is not None
    assert train_mqvae.inversion_warning(train_mqvae.mask_statistics(detail, kept, detail, detail), False) is None


def inverted_mask_checkpoint(path):
    """A tiny MQ-VAE whose scoring net scores flatness: conv3x3 computes a Laplacian of every feature channel
    (+ and − copies, so the ReLU gives its magnitude), conv1x1 sums them negatively. The score is then high
    where the features are locally constant, i.e. on flat image regions, and low at edges: an inverted map."""
    torch.manual_seed(0)
    cfg = tiny_config()
    model = MQVAE(cfg).eval()
    score_net = model.mask.score_net
    C = cfg.z_channels
    laplacian = torch.tensor([[-1.0, -1.0, -1.0], [-1.0, 8.0, -1.0], [-1.0, -1.0, -1.0]])
    with torch.no_grad():
        score_net[1].weight.zero_()
        score_net[1].bias.zero_()
        for c in range(C // 2):
            score_net[1].weight[2 * c, c] = laplacian
            score_net[1].weight[2 * c + 1, c] = -laplacian
        score_net[3].weight.fill_(-4.0 / C)
        score_net[3].bias.fill_(2.0)
    train_cfg = dataclasses.asdict(train_mqvae.TrainConfig(preset="tiny", image_size=16, batch_size=8, num_workers=0,
                                                           eval_images=64))
    save_checkpoint(dict(kind="mqvae", mqvae_config=dataclasses.asdict(cfg), train_config=train_cfg,
                         mqvae=model.state_dict(), step=0), str(path))


def test_the_inversion_warning_names_the_commit_path_only_on_a_run_that_takes_it():
    inverted = dict(mask_r_detail=-0.4, mask_p_detail=1e-12)
    off = train_mqvae.inversion_warning(inverted, False, 0.1, 0.25)
    assert "looks inverted" in off and "r = -0.40" in off
    assert "commit-through-score" not in off                      # the default: nothing to turn off
    assert "--codebook-weight 0.1 × β 0.25 = 0.025" in off and "--lr" in off
    on = train_mqvae.inversion_warning(inverted, True, 1.0, 0.25)
    assert "train with --no-commit-through-score" in on and "--codebook-weight 1 × β 0.25 = 0.25" in on
    assert train_mqvae.inversion_warning(dict(mask_r_detail=-0.4, mask_p_detail=0.5), True) is None  # not significant


def test_analysing_an_inverted_checkpoint_warns_and_writes_its_numbers(tmp_path, capsys):
    path = tmp_path / "inverted.pt"
    inverted_mask_checkpoint(path)
    metrics = train_mqvae.main(["--analyse", str(path), "--out-dir", str(tmp_path / "analysis")])
    out = capsys.readouterr().out
    assert metrics["mask_r_detail"] < -0.1 and metrics["mask_p_detail"] < 1e-3
    assert "looks inverted" in out and "--no-commit-through-score" in out
    saved = json.load(open(tmp_path / "analysis" / "mask_analysis.json"))
    assert saved["mask_r_detail"] == metrics["mask_r_detail"] and saved["val_images"] == 64
    assert Image.open(tmp_path / "analysis" / "mask_analysis.png").size == (4 * 16 + 5 * 2, 8 * 16 + 9 * 2)


def test_resuming_a_checkpoint_of_another_version_names_the_fields_that_do_not_fit():
    cfg = train_mqvae.TrainConfig()
    saved = dataclasses.asdict(cfg)
    assert utils.resumed_config(cfg, dict(saved), set(), set()) == dataclasses.replace(cfg, resume=True)
    older = {k: v for k, v in saved.items() if k != "disc_layers"}
    with pytest.raises(UserError, match=r"does not fit this version of the code \(disc_layers\)"):
        utils.resumed_config(cfg, older, set(), set())
    with pytest.raises(UserError, match=r"\(commit_through_score\)"):     # once an on/off string
        utils.resumed_config(cfg, dict(saved, commit_through_score="off"), set(), set())


def test_nan_loss_stops_training_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    calls = []
    real_hinge = train_mqvae.hinge_d_loss

    def poisoned(real, fake):  # the 4th discriminator loss (step 5: the GAN starts after step 1) is NaN
        calls.append(1)
        return real_hinge(real, fake) * (float("nan") if len(calls) == 4 else 1.0)

    monkeypatch.setattr(train_mqvae, "hinge_d_loss", poisoned)
    out = str(tmp_path / "run")
    with pytest.raises(UserError) as err:
        train_mqvae.main(TINY_TRAIN[1:] + ["--max-steps", "8", "--out-dir", out, "--ckpt-every", "1", "--log-every", "8"])
    assert "non-finite loss at step 5" in str(err.value) and "(step 4) was left untouched" in str(err.value)
    ckpt = utils.load_checkpoint(os.path.join(out, "ckpt.pt"), "mqvae")
    assert ckpt["step"] == 4
    assert all(torch.isfinite(v).all() for v in ckpt["mqvae"].values() if v.is_floating_point())


def test_cli_bad_values_give_one_line_errors(tmp_path):
    cases = [
        (["--keep-ratio", "1.5"], "keep ratio"),
        (["--image-size", "15"], "not divisible"),
        (["--data", str(tmp_path / "missing")], "unknown dataset"),
        (["--batch-size", "-1"], "--batch-size must be positive"),
        (["--preset", "huge"], "unknown preset"),
    ]
    for args, expected in cases:
        r = run_script(TINY_TRAIN + args + ["--max-steps", "1", "--out-dir", str(tmp_path / "o")])
        assert r.returncode == 2 and expected in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)


@pytest.mark.parametrize("extra", [[], ["--masker", "random", "--grad-accum", "2"]])
def test_two_process_gloo_ddp_keeps_parameters_and_codebooks_identical(tmp_path, extra):
    r = run_script(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"] + TINY_TRAIN + extra +
                   ["--max-steps", "2", "--out-dir", str(tmp_path / "ddp")], timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "identical across 2 ranks" in r.stdout
    assert f"global batch {8 * (2 if extra else 1)} (4 x 2 GPU" in r.stdout


# -----------------------------------------------------------------------------
# Stage 2: Stackformer model

V, T, N = 32, 16, 6          # codebook size, latent positions (4×4 grid), kept tokens
NUM_CLASSES, TEXT_VOCAB = 10, 20


def sf_config(**overrides) -> StackformerConfig:
    fields = dict(stackformer.PRESETS["tiny"], codebook_size=V, num_positions=T, seq_len=N,
                  num_classes=NUM_CLASSES, text_vocab_size=TEXT_VOCAB)
    fields.update(overrides)
    return StackformerConfig(**fields)


def sf_model(seed=0, **overrides) -> Stackformer:
    torch.manual_seed(seed)
    model = Stackformer(sf_config(**overrides))
    # a_t starts at zero; give it values so tests also see it at work.
    if model.abs_pos_emb is not None:
        nn.init.normal_(model.abs_pos_emb, std=0.02)
    return model.eval()


def sf_batch(config: StackformerConfig, batch_size=3, seed=1):
    """Codes, raster-ordered distinct positions and a matching condition."""
    gen = torch.Generator().manual_seed(seed)
    N, T = config.seq_len, config.num_positions
    codes = torch.randint(0, config.codebook_size, (batch_size, N), generator=gen)
    positions = torch.rand(batch_size, T, generator=gen).argsort(dim=1)[:, :N].sort(dim=1).values
    cond = None
    if config.cond == "class":
        cond = torch.randint(0, config.num_classes, (batch_size,), generator=gen)
    elif config.cond == "text":
        cond = torch.randint(0, config.text_vocab_size, (batch_size, config.text_len), generator=gen)
    return codes, positions, cond


def sf_max_diff(a, b):
    return (a - b).abs().max().item() if a.numel() else 0.0


# ---------------------------------------------------------------------------- alignment and causality

SF_CASES = [("code-first", "none"), ("position-first", "none"), ("code-first", "text")]


@pytest.mark.parametrize("variant,cond", SF_CASES)
def test_changing_a_future_token_changes_no_earlier_logits(variant, cond):
    model = sf_model(variant=variant, cond=cond)
    codes, positions, c = sf_batch(model.config)
    with torch.no_grad():
        code_logits, pos_logits = model(codes, positions, c)
    # The lower transformer predicts codes (Stackformer) or positions (Stackformer_r); the upper
    # one legitimately sees the lower target of its own step.
    code_first = variant == "code-first"
    base = {"lower": code_logits if code_first else pos_logits,
            "upper": pos_logits if code_first else code_logits}
    for j in range(N):
        for changed in ("lower", "upper"):
            new_codes, new_positions = codes.clone(), positions.clone()
            if (changed == "lower") == code_first:
                new_codes[:, j] = (new_codes[:, j] + 1) % V
            else:
                new_positions[:, j] = (new_positions[:, j] + 1) % T
            with torch.no_grad():
                out = model(new_codes, new_positions, c)
            new = {"lower": out[0] if code_first else out[1], "upper": out[1] if code_first else out[0]}
            # Lower logits at step t use inputs up to step t, i.e. tokens j < t: unchanged through j.
            assert sf_max_diff(new["lower"][:, :j + 1], base["lower"][:, :j + 1]) == 0.0
            if j + 1 < N:
                assert sf_max_diff(new["lower"][:, j + 1:], base["lower"][:, j + 1:]) > 1e-5
            # Upper logits at step t also see the lower target of step t.
            first_seen = j if changed == "lower" else j + 1
            assert sf_max_diff(new["upper"][:, :first_seen], base["upper"][:, :first_seen]) == 0.0
            if first_seen < N:
                assert sf_max_diff(new["upper"][:, first_seen:], base["upper"][:, first_seen:]) > 1e-5


@pytest.mark.parametrize("variant", ["code-first", "position-first"])
def test_second_prediction_sees_first_prediction_of_its_step_but_not_vice_versa(variant):
    model = sf_model(variant=variant)
    codes, positions, _ = sf_batch(model.config)
    t = 2
    with torch.no_grad():
        code_logits, pos_logits = model(codes, positions)
        other_code = codes.clone()
        other_code[:, t] = (codes[:, t] + 5) % V
        code_logits_c, pos_logits_c = model(other_code, positions)
        other_pos = positions.clone()
        other_pos[:, t] = (positions[:, t] + 5) % T
        code_logits_p, pos_logits_p = model(codes, other_pos)
    if variant == "code-first":
        # Step t predicts v_{t+1} without v_{t+1} or p_{t+1}; p_{t+1} from H_t + E_v(v_{t+1}).
        assert sf_max_diff(code_logits_c[:, t], code_logits[:, t]) == 0.0
        assert sf_max_diff(code_logits_p[:, t], code_logits[:, t]) == 0.0
        assert sf_max_diff(pos_logits_c[:, t], pos_logits[:, t]) > 1e-4
        assert sf_max_diff(pos_logits_p[:, t], pos_logits[:, t]) == 0.0
    else:
        # Stackformer_r: p_{t+1} first, then v_{t+1} from H_t + E_p(p_{t+1}).
        assert sf_max_diff(pos_logits_c[:, t], pos_logits[:, t]) == 0.0
        assert sf_max_diff(pos_logits_p[:, t], pos_logits[:, t]) == 0.0
        assert sf_max_diff(code_logits_p[:, t], code_logits[:, t]) > 1e-4
        assert sf_max_diff(code_logits_c[:, t], code_logits[:, t]) == 0.0


# ---------------------------------------------------------------------------- KV cache

# Every conditioning mode with each variant that supports it.
KV_CACHE_CASES = [("code-first", "none"), ("code-first", "class"), ("code-first", "text"),
                  ("position-first", "none"), ("position-first", "text")]


@pytest.mark.parametrize("variant,cond", KV_CACHE_CASES)
def test_kv_cache_logits_match_full_forward(variant, cond):
    check_kv_cache_logits(variant, cond, None)


@pytest.mark.parametrize("variant,cond", KV_CACHE_CASES)
def test_slot_kv_cache_of_the_fast_sampler_matches_full_forward(variant, cond):
    check_kv_cache_logits(variant, cond, fast_sampling.SlotKVCache)


def check_kv_cache_logits(variant, cond, cache_class):
    model = sf_model(variant=variant, cond=cond)
    codes, positions, c = sf_batch(model.config)
    with torch.no_grad():
        full = dict(zip((True, False), model(codes, positions, c)))     # is_code -> teacher-forced logits
    caches = (model.new_kv_caches() if cache_class is None else
              fast_sampling.slot_caches(model, codes.size(0), cache_class))
    seen = []

    def teacher(logits, t, is_code):    # each step's logits, then the true token in place of a draw
        seen.append(is_code)
        assert torch.allclose(logits, full[is_code][:, t], atol=1e-5), (t, is_code)
        return (codes if is_code else positions)[:, t]

    for t in range(N):
        model.sample_step(caches, t, codes, positions, c, teacher)
    assert seen == [variant == "code-first", variant != "code-first"] * N        # lower first, then upper


def test_kv_cache_step_ignores_slots_not_yet_written():
    torch.manual_seed(0)
    cache = fast_sampling.SlotKVCache(n_layer=1, max_len=10, batch_size=3, device="cpu")
    q, k, v = torch.randn(3, 3, 4, 1, 8).unbind(0)                  # (B, nh, 1, hd) each
    cache.allocate(0, k, v)
    cache.keys[0][:, :, :6], cache.values[0][:, :, :6] = torch.randn(2, 3, 4, 6, 8).unbind(0)   # slots 0..5 written
    keys, values = cache.keys[0].clone(), cache.values[0].clone()
    cache.begin_step(torch.tensor([6]))
    out = cache.attend(0, q, k, v)
    keys[:, :, 6:7], values[:, :, 6:7] = k, v
    assert torch.equal(cache.keys[0], keys) and torch.equal(cache.values[0], values)   # slot 6 written, no other
    expected = F.scaled_dot_product_attention(q, keys[:, :, :7], values[:, :, :7])
    assert (out - expected).abs().max() < 1e-6
    cache.keys[0][:, :, 7:], cache.values[0][:, :, 7:] = 1e4, -1e4    # garbage in the unwritten slots
    cache.begin_step(torch.tensor([6]))
    assert (cache.attend(0, q, k, v) - expected).abs().max() < 1e-6


# The Triton kernel of fast GPU sampling (fast_sampling.attend_cache). Without a GPU these tests run in
# a subprocess under Triton's interpreter (TRITON_INTERPRET=1, read when the kernel is defined).
TRITON_RUNS_HERE = fast_sampling.triton is not None and (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1")
needs_triton = pytest.mark.skipif(not TRITON_RUNS_HERE, reason="runs in test_triton_kernels_pass_under_the_interpreter")


def test_triton_kernels_pass_under_the_interpreter():
    if fast_sampling.triton is None:
        pytest.skip("this torch build has no Triton; attend_cache is never chosen (fast_sampling.use_kernel)")
    if TRITON_RUNS_HERE:
        pytest.skip("the tests run in this process")
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", "triton_kernel"],
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    passed = re.search(r"(\d+) passed", result.stdout)
    assert passed and int(passed.group(1)) == 8, result.stdout[-2000:]     # 5 + 1 + 2 below


@needs_triton
@pytest.mark.parametrize("variant,cond", KV_CACHE_CASES)
def test_triton_kernel_kv_cache_logits_match_full_forward(variant, cond):
    check_kv_cache_logits(variant, cond, fast_sampling.KernelKVCache)


@needs_triton
def test_triton_kernel_writes_the_slot_and_equals_masked_sdpa():
    torch.manual_seed(0)
    B, H, L = 2, 3, fast_sampling.CACHE_ATTENTION_BLOCK + 22         # slot s > BLOCK: two passes over the cache
    for head_dim in (8, 12):                                         # 12: padded to 16 inside the kernel
        for s in (0, 5, fast_sampling.CACHE_ATTENTION_BLOCK, L - 1):
            qkv = torch.randn(B, 1, 3, H, head_dim)                  # q, k, v as views of one projection
            q, k, v = (x.transpose(1, 2) for x in qkv.unbind(2))    # (B, H, 1, hd), strided
            k_cache, v_cache = torch.randn(B, H, L, head_dim), torch.randn(B, H, L, head_dim)
            k_want, v_want = k_cache.clone(), v_cache.clone()
            k_want[:, :, s:s + 1], v_want[:, :, s:s + 1] = k, v
            out = fast_sampling.attend_cache(q, k, v, k_cache, v_cache, torch.tensor([s]))
            assert torch.equal(k_cache, k_want) and torch.equal(v_cache, v_want)    # slot s written, no other
            mask = torch.arange(L)[None] <= s
            assert (out - F.scaled_dot_product_attention(q, k_want, v_want, attn_mask=mask)).abs().max() < 1e-5
            k_cache[:, :, s + 1:], v_cache[:, :, s + 1:] = 1e4, -1e4  # slots after s: never read
            assert torch.equal(fast_sampling.attend_cache(q, k, v, k_cache, v_cache, torch.tensor([s])), out)


@needs_triton
@pytest.mark.parametrize("greedy", [True, False])
def test_triton_kernel_fast_sampler_draws_the_reference_tokens(greedy):
    model = sf_model(variant="position-first", seq_len=20, num_positions=64)
    seeded = lambda: torch.Generator().manual_seed(5)
    reference = model.generate(batch_size=3, generator=seeded(), settings=SamplingConfig(greedy=greedy))
    fast = fast_sampling.generate(model, batch_size=3, generator=seeded(), kernel=True, settings=SamplingConfig(greedy=greedy))
    assert torch.equal(reference[0], fast[0]) and torch.equal(reference[1], fast[1])


def test_attend_cache_refuses_layouts_and_sizes_its_kernel_cannot_index():
    if fast_sampling.triton is None:
        pytest.skip("this torch build has no Triton")
    q = torch.zeros(2, 2, 1, 64)
    with pytest.raises(ValueError, match="equal strides"):        # V stored slots-last
        fast_sampling.attend_cache(q, q, q, torch.zeros(2, 2, 8, 64), torch.zeros(2, 2, 64, 8).transpose(2, 3),
                                   torch.tensor([0]))
    huge_k, huge_v = (torch.zeros(1, 1, 1, 64).expand(2 ** 16, 2 ** 5, 2 ** 4, 64) for _ in range(2))   # 2^31 elements
    with pytest.raises(ValueError, match="sample in smaller batches"):
        fast_sampling.attend_cache(q, q, q, huge_k, huge_v, torch.tensor([0]))


def test_fast_sampler_uses_the_kernel_on_gpus_with_triton_and_the_reference_cache_elsewhere(monkeypatch):
    assert not fast_sampling.use_kernel("cpu")
    assert fast_sampling.use_kernel("cuda") == (fast_sampling.triton is not None)
    monkeypatch.setattr(fast_sampling, "triton", None)
    assert not fast_sampling.use_kernel("cuda")
    with pytest.raises(ValueError, match="needs Triton"):
        fast_sampling.generate(sf_model(), batch_size=2, kernel=True)
    with pytest.raises(ValueError, match="CUDA"):
        fast_sampling.generate(sf_model(), batch_size=2, cuda_graph=True)


# ---------------------------------------------------------------------------- text conditioning

def test_first_code_depends_on_caption_and_its_last_token():
    model = sf_model(cond="text")
    codes, positions, text = sf_batch(model.config)
    with torch.no_grad():
        code_logits, _ = model(codes, positions, text)
        last_changed = text.clone()
        last_changed[:, -1] = (text[:, -1] + 1) % TEXT_VOCAB
        first_changed = text.clone()
        first_changed[:, 0] = (text[:, 0] + 1) % TEXT_VOCAB
        assert sf_max_diff(model(codes, positions, last_changed)[0][:, 0], code_logits[:, 0]) > 1e-4
        assert sf_max_diff(model(codes, positions, first_changed)[0][:, 0], code_logits[:, 0]) > 1e-4


def test_text_loss_counts_only_image_tokens():
    model = sf_model(cond="text")
    codes, positions, text = sf_batch(model.config, batch_size=4)
    with torch.no_grad():
        code_logits, pos_logits = model(codes, positions, text)
        total, code_ce, pos_ce = model.loss(codes, positions, text)
    assert code_logits.shape == (4, N, V) and pos_logits.shape == (4, N, T)
    per_token = F.cross_entropy(code_logits.reshape(-1, V), codes.reshape(-1), reduction="none")
    assert per_token.numel() == 4 * N
    assert torch.allclose(code_ce, per_token.mean())
    assert torch.allclose(pos_ce, F.cross_entropy(pos_logits.reshape(-1, T), positions.reshape(-1)))
    assert torch.allclose(total, code_ce + pos_ce)


def test_pos_weight_scales_the_position_loss():
    model = sf_model(pos_weight=0.5)
    codes, positions, _ = sf_batch(model.config)
    with torch.no_grad():
        total, code_ce, pos_ce = model.loss(codes, positions)
    assert torch.allclose(total, code_ce + 0.5 * pos_ce)


# ---------------------------------------------------------------------------- tokenizer

CAPTIONS = ["A dog runs on the grass.", "Two dogs on a beach", "a dog, a cat and THE sea!"]


def test_tokenizer_vocabulary_is_sorted_by_count_then_word():
    tok = WordTokenizer.build(CAPTIONS)
    # counts: a 4, dog 2, on 2, the 2, then single words alphabetically
    assert tok.words[:4] == ["a", "dog", "on", "the"]
    assert tok.words[4:] == sorted(tok.words[4:])
    assert tok.vocab_size == len(tok.words) + 2
    assert WordTokenizer.build(CAPTIONS, min_count=2).words == ["a", "dog", "on", "the"]
    assert WordTokenizer.build(CAPTIONS, max_size=2).words == ["a", "dog"]


def test_tokenizer_round_trips_known_words_and_maps_unknown_to_unk():
    tok = WordTokenizer.build(CAPTIONS)
    ids = tok.encode("The dog, on THE beach")
    assert len(ids) == 32 and ids[5:] == [0] * 27
    assert tok.decode(ids) == "the dog on the beach"
    ids = tok.encode("a zebra on the moon")
    assert ids[1] == WordTokenizer.unk_id and ids[4] == WordTokenizer.unk_id
    assert tok.decode(ids) == "a <unk> on the <unk>"


def test_tokenizer_truncates_and_pads_to_32():
    tok = WordTokenizer.build(CAPTIONS)
    batch = tok.encode_batch(["dog " * 40, "", "cat"])
    assert batch.shape == (3, 32) and batch.dtype == torch.long
    assert (batch[0] == tok.word_to_id["dog"]).all()
    assert (batch[1] == 0).all()
    assert batch[2, 0] == tok.word_to_id["cat"] and (batch[2, 1:] == 0).all()


def test_tokenizer_dict_round_trip_is_plain_python_and_equal():
    tok = WordTokenizer.build(CAPTIONS, text_len=32)
    d = tok.to_dict()
    assert all(isinstance(w, str) for w in d["words"]) and isinstance(d["text_len"], int)
    restored = WordTokenizer.from_dict(d)
    assert restored.to_dict() == d
    assert restored.encode(CAPTIONS[2]) == tok.encode(CAPTIONS[2])


# ---------------------------------------------------------------------------- generation

def test_sample_token_top_p_keeps_smallest_set_reaching_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log().expand(4000, -1)
    gen = torch.Generator().manual_seed(0)
    draws = stackformer.sample_token(logits, top_k=None, top_p=0.7, generator=gen)
    counts = torch.bincount(draws, minlength=4).float() / 4000
    assert counts[2] == 0 and counts[3] == 0               # 0.5 + 0.3 ≥ 0.7 already
    assert abs(counts[0].item() - 0.625) < 0.03            # renormalised 0.5 / 0.8
    top_one = stackformer.sample_token(logits, top_k=None, top_p=0.4, generator=gen)
    assert (top_one == 0).all()                            # the top token alone reaches 0.4
    top_two = stackformer.sample_token(logits, top_k=2, top_p=None, generator=gen)
    assert set(top_two.tolist()) == {0, 1}


def reference_sample_token(logits, noise, top_k, top_p):
    """sample_token's definition one row at a time in float64 Python: rank by logit (ties by
    index), keep logits ≥ the k-th, softmax, keep tokens while the mass ranked before them is
    below top_p, then the exponential race argmax p_i / E_i."""
    drawn = []
    for row, race in zip(logits.double().tolist(), noise.double().tolist()):
        ranked = sorted(range(len(row)), key=lambda i: (-row[i], i))
        kept = [i for i in ranked if top_k is None or row[i] >= row[ranked[top_k - 1]]]
        top = max(row[i] for i in kept)
        weight = {i: math.exp(row[i] - top) for i in kept}
        total = sum(weight.values())
        nucleus, mass = [], 0.0
        for i in kept:
            if top_p is not None and mass >= top_p:
                break
            nucleus.append(i)
            mass += weight[i] / total
        drawn.append(max(nucleus, key=lambda i: weight[i] / race[i]))
    return torch.tensor(drawn)


@pytest.mark.parametrize("top_k,top_p", [(4, None), (None, 0.6), (4, 0.6), (1, 0.9), (None, None)])
def test_sample_token_matches_its_definition_with_tied_logits(top_k, top_p):
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(300, 12, generator=gen) * 2).round() / 2      # steps of 0.5: many ties
    noise = torch.empty(300, 12).exponential_(1.0, generator=gen)
    drawn = stackformer.sample_token(logits, top_k=top_k, top_p=top_p, noise=noise)
    assert torch.equal(drawn, reference_sample_token(logits, noise, top_k, top_p))
    if top_k:   # every token tied with the k-th largest logit can be drawn, no other
        kth = logits.sort(dim=-1, descending=True).values[:, top_k - 1:top_k]
        assert (logits.gather(1, drawn[:, None]) >= kth).all()
        ties_beyond_k = ((logits == kth).sum(-1) > 1)
        assert ties_beyond_k.any()


def peaked_model(**overrides):
    # Untrained heads are nearly uniform; large head weights make them opinionated, so the
    # position rules have to do real work.
    model = sf_model(**overrides)
    with torch.no_grad():
        model.pos_head[1].weight.mul_(50)
        model.code_head[1].weight.mul_(50)
    return model


@pytest.mark.parametrize("seq_len", [N, T - 1, T])
def test_increasing_rule_gives_strictly_increasing_positions_in_range(seq_len):
    model = peaked_model(seq_len=seq_len)
    gen = torch.Generator().manual_seed(0)
    codes, positions = model.generate(batch_size=64, generator=gen, settings=SamplingConfig(temperature=2.0, top_k=0, top_p=1.0, pos_top_k=0, pos_top_p=1.0))
    assert positions.shape == (64, seq_len) and codes.shape == (64, seq_len)
    assert (positions >= 0).all() and (positions < T).all()
    assert (positions[:, 1:] > positions[:, :-1]).all()
    assert (codes >= 0).all() and (codes < V).all()


def test_unique_rule_never_repeats_a_position():
    model = peaked_model(seq_len=T - 2)
    gen = torch.Generator().manual_seed(0)
    _, positions = model.generate(batch_size=64, generator=gen, settings=SamplingConfig(position_rule="unique", temperature=2.0, pos_top_k=0, pos_top_p=1.0))
    assert (positions.sort(dim=1).values.diff(dim=1) > 0).all()
    assert (positions[:, 1:] < positions[:, :-1]).any()    # the rule does not force an order


def test_importance_order_defaults_to_the_unique_rule():
    model = peaked_model(seq_len=T - 2, order="importance")
    gen = torch.Generator().manual_seed(0)
    _, positions = model.generate(batch_size=64, generator=gen, settings=SamplingConfig(temperature=2.0, pos_top_k=0, pos_top_p=1.0))
    assert (positions.sort(dim=1).values.diff(dim=1) > 0).all()
    assert (positions[:, 1:] < positions[:, :-1]).any()


@pytest.mark.parametrize("variant,cond", [("code-first", "none"), ("code-first", "class"),
                                          ("code-first", "text"), ("position-first", "none")])
@pytest.mark.parametrize("rule", ["increasing", "unique"])
def test_greedy_samples_are_identical_with_and_without_kv_cache(variant, cond, rule):
    model = sf_model(variant=variant, cond=cond, seq_len=10)
    _, _, c = sf_batch(model.config, batch_size=4)
    kwargs = dict(batch_size=4, cond=c, settings=SamplingConfig(greedy=True, position_rule=rule))
    cached = model.generate(use_kv_cache=True, **kwargs)
    uncached = model.generate(use_kv_cache=False, **kwargs)
    assert torch.equal(cached[0], uncached[0]) and torch.equal(cached[1], uncached[1])


@pytest.mark.parametrize("variant,cond", KV_CACHE_CASES)
def test_fast_sampler_steps_from_device_tensors_draw_the_reference_tokens(variant, cond):
    # fast_sampling.generate runs Stackformer.sample_step with t a device tensor (what a CUDA graph
    # replays); on the CPU without a graph it must draw exactly the reference sampler's tokens.
    model = sf_model(variant=variant, cond=cond, seq_len=10)
    _, _, c = sf_batch(model.config, batch_size=3)
    seeded = lambda: torch.Generator().manual_seed(7)
    reference = model.generate(batch_size=3, cond=c, generator=seeded())
    fast = fast_sampling.generate(model, batch_size=3, cond=c, generator=seeded())
    assert torch.equal(reference[0], fast[0]) and torch.equal(reference[1], fast[1])


@pytest.mark.parametrize("cond", ["class", "text"])
def test_reused_sampler_draws_what_fresh_calls_draw_and_returns_independent_tensors(cond):
    # fast_sampling.generate(reuse=d) keeps its buffers (and on CUDA its graph) in d for the next call of
    # the same shape and settings; each call refills them, so it must sample exactly what a fresh call does.
    model = sf_model(cond=cond, seq_len=10)
    _, _, c1 = sf_batch(model.config, batch_size=4, seed=1)
    _, _, c2 = sf_batch(model.config, batch_size=4, seed=2)
    def sample(c, seed, **kwargs):
        return fast_sampling.generate(model, cond=c, generator=torch.Generator().manual_seed(seed), **kwargs)
    reuse = {}
    first = sample(c1, 0, reuse=reuse)
    state = reuse["state"]
    second = sample(c2, 1, reuse=reuse)
    third = sample(c1, 0, reuse=reuse)
    assert reuse["state"] is state and reuse["state"].caches is state.caches  # the same buffers every call
    for got, want in [(first, sample(c1, 0)), (second, sample(c2, 1)), (third, sample(c1, 0))]:
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert not torch.equal(first[0], second[0])
    # other settings or another batch size rebuild the kept state
    top1 = sample(c1, 0, reuse=reuse, settings=SamplingConfig(top_k=1))
    assert reuse["state"] is not state and torch.equal(top1[0], sample(c1, 0, settings=SamplingConfig(top_k=1))[0])
    two = sample(c1[:2], 0, reuse=reuse)
    assert reuse["state"].codes.shape[0] == 2 and torch.equal(two[0], sample(c1[:2], 0)[0])
    model.double()                                                          # new parameter storage
    sample(c1[:2], 0, reuse=reuse)
    assert reuse["key"][-1] == tuple(p.data_ptr() for p in model.parameters())


# ---------------------------------------------------------------------------- classifier-free guidance

def test_guided_logits_are_uncond_plus_scale_times_the_difference_with_a_linear_ramp():
    model = sf_model(cond="class", cond_drop=0.1)
    labels = torch.arange(2)
    logits = torch.randn(4, 7)
    cond, uncond = logits[:2], logits[2:]
    for schedule, t, scale in [("constant", 0, 3.0), ("linear", 0, 1 + 2.0 / N), ("linear", N - 1, 3.0)]:
        settings, rows, B = model.sampling_rows(None, labels, SamplingConfig(cfg_scale=3.0, cfg_schedule=schedule))
        assert B == 2 and torch.equal(rows, torch.tensor([0, 1, NUM_CLASSES, NUM_CLASSES]))
        guided = stackformer.guided_logits(logits, torch.tensor([t]), N, settings, is_code=True)
        torch.testing.assert_close(guided, uncond + scale * (cond - uncond))
    codes_only = SamplingConfig(cfg_scale=3.0, cfg_codes_only=True)
    assert torch.equal(stackformer.guided_logits(logits, torch.tensor([0]), N, codes_only, is_code=False), cond)


def test_guidance_scale_1_samples_exactly_plain_conditional_sampling_and_other_scales_differ():
    model = sf_model(cond="class", cond_drop=0.1, seq_len=10)
    labels = torch.arange(8) % NUM_CLASSES
    seeded = lambda: torch.Generator().manual_seed(4)
    plain = model.generate(cond=labels, generator=seeded())
    scale_1 = model.generate(cond=labels, generator=seeded(), settings=SamplingConfig(cfg_scale=1.0))
    assert all(torch.equal(a, b) for a, b in zip(plain, scale_1))
    guided = model.generate(cond=labels, generator=seeded(), settings=SamplingConfig(cfg_scale=4.0))
    assert not torch.equal(plain[0], guided[0])
    assert (guided[1][:, 1:] > guided[1][:, :-1]).all()              # the position rule still holds


@pytest.mark.parametrize("cond", ["class", "text"])
@pytest.mark.parametrize("options", [dict(cfg_scale=3.0), dict(cfg_scale=2.0, cfg_schedule="linear", cfg_codes_only=True)])
def test_guided_fast_sampler_draws_the_reference_tokens(cond, options):
    options = dict(settings=SamplingConfig(**options))
    model = sf_model(cond=cond, cond_drop=0.1, seq_len=10)
    _, _, c = sf_batch(model.config, batch_size=3)
    seeded = lambda: torch.Generator().manual_seed(6)
    reference = model.generate(cond=c, generator=seeded(), **options)
    no_cache = model.generate(cond=c, generator=seeded(), use_kv_cache=False, **options)
    reuse = {}
    fast = fast_sampling.generate(model, cond=c, generator=seeded(), reuse=reuse, **options)
    again = fast_sampling.generate(model, cond=c, generator=seeded(), reuse=reuse, **options)   # kept buffers
    for other in (no_cache, fast, again):
        assert torch.equal(reference[0], other[0]) and torch.equal(reference[1], other[1])


def test_text_guidance_reads_the_empty_caption_as_the_unconditional_stream(monkeypatch):
    model = sf_model(cond="text", cond_drop=0.1, seq_len=8)
    _, _, text = sf_batch(model.config, batch_size=2)
    seen = []
    start_input = stackformer.Stackformer._start_input
    monkeypatch.setattr(stackformer.Stackformer, "_start_input",
                        lambda self, cond, batch_size: seen.append(cond.clone()) or start_input(self, cond, batch_size))
    codes, positions = model.generate(cond=text, settings=SamplingConfig(greedy=True, cfg_scale=3.0))
    assert codes.shape == positions.shape == (2, 8)
    assert torch.equal(seen[0][:2], text) and (seen[0][2:] == 0).all()   # the pad id: the empty caption


def test_guidance_needs_a_model_trained_with_null_conditions():
    model = sf_model(cond="class")
    with pytest.raises(ValueError, match="cond_drop > 0"):
        model.generate(cond=torch.arange(2), settings=SamplingConfig(cfg_scale=2.0))
    assert model.class_emb.num_embeddings == NUM_CLASSES                 # no null class row without cond_drop
    assert sf_model(cond="class", cond_drop=0.1).class_emb.num_embeddings == NUM_CLASSES + 1
    with pytest.raises(ValueError, match="cond_drop"):
        sf_config(cond_drop=0.1)                                         # unconditional: nothing to drop
    with pytest.raises(ValueError, match="give cond"):
        sf_model(cond="class", cond_drop=0.1).generate(batch_size=2, settings=SamplingConfig(cfg_scale=2.0))


def test_condition_dropout_replaces_about_the_share_asked_for():
    gen = torch.Generator().manual_seed(0)
    model = sf_model(cond="class", cond_drop=0.1)
    labels = torch.randint(0, NUM_CLASSES, (20000,), generator=gen)
    dropped = train_stackformer.drop_conditions(model, labels, gen)
    rate = (dropped == NUM_CLASSES).float().mean().item()
    assert abs(rate - 0.1) < 0.01                                        # 20000 draws: std 0.002
    assert torch.equal(dropped[dropped != NUM_CLASSES], labels[dropped != NUM_CLASSES])
    text_model = sf_model(cond="text", cond_drop=0.3)
    captions = torch.randint(1, TEXT_VOCAB, (20000, text_model.config.text_len), generator=gen)
    empty = (train_stackformer.drop_conditions(text_model, captions, gen) == 0).all(1)
    assert abs(empty.float().mean().item() - 0.3) < 0.015
    assert train_stackformer.drop_conditions(sf_model(cond="class"), labels, gen) is labels   # cond_drop 0


def test_top_k_1_equals_greedy():
    model = sf_model(cond="class")
    labels = torch.arange(8) % NUM_CLASSES
    greedy = model.generate(cond=labels, settings=SamplingConfig(greedy=True))
    top1 = model.generate(cond=labels, generator=torch.Generator().manual_seed(3), settings=SamplingConfig(top_k=1, pos_top_k=1))
    assert torch.equal(greedy[0], top1[0]) and torch.equal(greedy[1], top1[1])


def test_same_seed_gives_same_samples_and_another_seed_differs():
    model = sf_model()
    def sample(seed):
        return model.generate(batch_size=8, generator=torch.Generator().manual_seed(seed))
    a, b, c = sample(0), sample(0), sample(1)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0]) and not torch.equal(a[1], c[1])


def test_class_and_text_conditions_change_greedy_samples():
    # Greedy decoding is deterministic, so within one batch rows differ only through their condition.
    def distinct_rows(codes, positions):
        return len(set(map(tuple, torch.cat([codes, positions], dim=1).tolist())))
    model = sf_model(cond="class")
    labels = torch.arange(NUM_CLASSES).repeat(2)
    codes, positions = model.generate(cond=labels, settings=SamplingConfig(greedy=True))
    assert torch.equal(codes[:NUM_CLASSES], codes[NUM_CLASSES:])
    assert distinct_rows(codes, positions) >= NUM_CLASSES // 2
    model = sf_model(cond="text")
    _, _, text = sf_batch(model.config, batch_size=8)
    codes, positions = model.generate(cond=text.repeat(2, 1), settings=SamplingConfig(greedy=True))
    assert torch.equal(codes[:8], codes[8:])
    assert distinct_rows(codes, positions) >= 4


def record_cudnn_attention_state(monkeypatch, module_class) -> list:
    """Make every forward of module_class append whether cuDNN attention is enabled at that moment."""
    seen = []
    forward = module_class.forward
    def spy(self, *args, **kwargs):
        seen.append(torch.backends.cuda.cudnn_sdp_enabled())
        return forward(self, *args, **kwargs)
    monkeypatch.setattr(module_class, "forward", spy)
    return seen


def test_generate_runs_only_reproducible_attention_kernels(monkeypatch):
    # cuDNN attention made CUDA sampling irreproducible; generate() must switch it off, then restore it.
    seen = record_cudnn_attention_state(monkeypatch, stackformer.CausalSelfAttention)
    model = sf_model(seq_len=6)
    before = torch.backends.cuda.cudnn_sdp_enabled()
    for use_kv_cache in (True, False):
        model.generate(batch_size=2, use_kv_cache=use_kv_cache)
    fast_sampling.generate(model, batch_size=2)
    assert len(seen) > 10 and not any(seen)
    assert torch.backends.cuda.cudnn_sdp_enabled() == before
    seen.clear()
    model(*sf_batch(model.config, batch_size=2)[:2])      # training keeps the default kernels
    assert seen and all(s == before for s in seen)


def test_token_extraction_runs_only_reproducible_attention_kernels(monkeypatch):
    seen = record_cudnn_attention_state(monkeypatch, mqvae.AttnBlock)
    model = mqvae.MQVAE(MQVAEConfig(**mqvae.PRESETS["tiny"], resolution=16)).eval()
    dataset = data.ShapesDataset(16, 6, "val")
    out = train_stackformer.encode_images(model, dataset, True, 4, 0, torch.device("cpu"), data.UnreadableFiles(dataset, 6, "x"))
    assert out["codes"].shape == (2, 6, 16) and seen and not any(seen)


def test_compiled_sampling_step_draws_the_same_tokens():
    # fast_sampling.generate(compile=True) compiles the per-step function that the CUDA graph replays; on
    # the CPU it runs compiled but without a graph. Same noise, same (fp32, tie-free) arithmetic up to rounding.
    model = sf_model(cond="class", seq_len=8)
    labels = torch.arange(4) % NUM_CLASSES
    eager = model.generate(cond=labels, generator=torch.Generator().manual_seed(5))
    compiled = fast_sampling.generate(model, cond=labels, generator=torch.Generator().manual_seed(5), compile=True)
    assert torch.equal(eager[0], compiled[0]) and torch.equal(eager[1], compiled[1])


def test_fast_sampler_makes_room_for_compiled_steps_of_several_batch_sizes(monkeypatch):
    # generate(compile=True) compiles its step once per batch size and settings; past torch's default
    # limit of 8 compiled versions a fullgraph compilation fails. The sampler raises the limit while it
    # samples and restores it after.
    name = fast_sampling.recompile_limit_name()
    seen = []
    inner = stackformer.Stackformer.sample_step
    def spy(self, *args, **kwargs):
        seen.append(getattr(torch._dynamo.config, name))
        return inner(self, *args, **kwargs)
    monkeypatch.setattr(stackformer.Stackformer, "sample_step", spy)
    with torch._dynamo.config.patch(**{name: 8}):
        fast_sampling.generate(sf_model(seq_len=4), batch_size=2)
        assert getattr(torch._dynamo.config, name) == 8
    assert set(seen) == {fast_sampling.COMPILED_STEPS} and fast_sampling.COMPILED_STEPS >= 4 * 8


def test_generate_restores_training_mode():
    model = sf_model().train()
    model.generate(batch_size=2)
    assert model.training


# ---------------------------------------------------------------------------- parameters and state

def test_no_abs_pos_removes_the_absolute_sequence_embedding():
    with_a = sf_model(abs_pos=True)
    without_a = sf_model(abs_pos=False)
    assert not any("abs_pos" in name for name, _ in without_a.named_parameters())
    assert with_a.num_params() - without_a.num_params() == N * with_a.config.n_embd


def test_no_buffers_in_state_dict():
    model = sf_model(cond="text")
    assert list(model.buffers()) == []       # no causal-mask buffers
    assert set(model.state_dict()) == {name for name, _ in model.named_parameters()}


@pytest.mark.parametrize("preset,expected", [("base", 307e6), ("large", 607e6)])
def test_preset_parameter_count_matches_paper(preset, expected):
    config = StackformerConfig(**stackformer.PRESETS[preset], codebook_size=1024, num_positions=1024, seq_len=256)
    with torch.device("meta"):
        model = Stackformer(config)
    assert abs(model.num_params() - expected) / expected < 0.02


def test_flops_per_token_follows_the_documented_formula():
    model = sf_model()
    cfg = model.config
    matmul_weights = (model.code_transformer, model.position_transformer, model.code_head, model.pos_head)
    expected = (6 * sum(p.numel() for m in matmul_weights for p in m.parameters())
                + 12 * (cfg.n_code_layers + cfg.n_pos_layers) * cfg.n_embd * cfg.seq_len)
    assert train_stackformer.flops_per_token(model) == pytest.approx(expected)


@pytest.mark.parametrize("cond", ["none", "class", "text"])
def test_state_dict_round_trip_gives_identical_logits(cond):
    model = sf_model(cond=cond)
    codes, positions, c = sf_batch(model.config)
    fresh = Stackformer(dataclasses.replace(model.config)).eval()
    fresh.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        a, b = model(codes, positions, c), fresh(codes, positions, c)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("cond", ["none", "class", "text"])
def test_optimizer_decays_exactly_the_linear_weights(cond):
    model = sf_model(cond=cond)
    opt = train_stackformer.configure_optimizer(model, lr=5e-4, weight_decay=0.01, betas=(0.9, 0.95),
                                          device_type="cpu")
    decay_group, no_decay_group = opt.param_groups
    assert decay_group["weight_decay"] == 0.01 and no_decay_group["weight_decay"] == 0.0
    decayed = {id(p) for p in decay_group["params"]}
    not_decayed = {id(p) for p in no_decay_group["params"]}
    linear_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    assert decayed == linear_weights
    assert not decayed & not_decayed
    assert decayed | not_decayed == {id(p) for p in model.parameters()}
    assert len(decay_group["params"]) + len(no_decay_group["params"]) == len(list(model.parameters()))
    names = {id(p): n for n, p in model.named_parameters()}
    for pid in not_decayed:
        assert names[pid].endswith(("bias", "emb.weight", "abs_pos_emb", "start_token")) \
            or ".ln_" in names[pid] or "head.0." in names[pid]


def test_config_rejects_unknown_choices():
    with pytest.raises(ValueError):
        sf_config(cond="image")
    with pytest.raises(ValueError):
        sf_config(variant="both")
    with pytest.raises(ValueError):
        sf_config(seq_len=T + 1)


# -----------------------------------------------------------------------------
# FID

# ---------------------------------------------------------------------------
# helpers and fixtures

@pytest.fixture(scope="module")
def fid_model():
    torch.manual_seed(0)
    m = fid.FIDInception()
    # default init shrinks activations layer by layer; He init keeps features O(1)
    # so the tolerances below actually test something
    for mod in m.modules():
        if isinstance(mod, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(mod.weight, nonlinearity="relu")
    return m


@pytest.fixture(scope="module")
def fid_model64(fid_model):
    """Same weights, features after the first max pool: the whole input pipeline at a tenth of the cost."""
    m = fid.FIDInception(dims=64)
    m.load_state_dict(fid_model.state_dict())
    return m


def fid_random_images(n, h=32, w=32, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def fid_to_unit(images):
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255


def fid_write_pngs(folder, images):
    folder.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        Image.fromarray(img).save(folder / f"img_{i:03d}.png")
    return folder


def fid_random_cov(d, n, rng):
    x = rng.standard_normal((n, d))
    return x.mean(0), np.cov(x, rowvar=False)


def fid_expected_key_names():
    """pytorch-fid's state-dict keys, spelled out from the Inception v3 block structure."""
    stem = ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "Conv2d_3b_1x1", "Conv2d_4a_3x3"]
    a = ["branch1x1", "branch5x5_1", "branch5x5_2", "branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3",
         "branch_pool"]
    b = ["branch3x3", "branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"]
    c = ["branch1x1", "branch7x7_1", "branch7x7_2", "branch7x7_3"] + [f"branch7x7dbl_{i}" for i in range(1, 6)] \
        + ["branch_pool"]
    d = ["branch3x3_1", "branch3x3_2"] + [f"branch7x7x3_{i}" for i in range(1, 5)]
    e = ["branch1x1", "branch3x3_1", "branch3x3_2a", "branch3x3_2b", "branch3x3dbl_1", "branch3x3dbl_2",
         "branch3x3dbl_3a", "branch3x3dbl_3b", "branch_pool"]
    blocks = {"Mixed_5b": a, "Mixed_5c": a, "Mixed_5d": a, "Mixed_6a": b, "Mixed_6b": c, "Mixed_6c": c,
              "Mixed_6d": c, "Mixed_6e": c, "Mixed_7a": d, "Mixed_7b": e, "Mixed_7c": e}
    convs = stem + [f"{blk}.{br}" for blk, branches in blocks.items() for br in branches]
    assert len(convs) == 94
    keys = []
    for name in convs:
        keys += [f"{name}.conv.weight"] + [f"{name}.bn.{p}" for p in ("weight", "bias", "running_mean", "running_var")]
    return keys + ["fc.weight", "fc.bias"]


def fid_random_state_dict(fid_model, keys, seed=1):
    g = torch.Generator().manual_seed(seed)
    shapes = fid_model.state_dict()
    state = {}
    for k in keys:
        if k.endswith("num_batches_tracked"):
            state[k] = torch.tensor(0)
        else:
            state[k] = torch.rand(shapes[k].shape, generator=g) + 0.5  # positive, so running_var is valid
    return state


# ---------------------------------------------------------------------------
# Frechet distance

def test_identical_statistics_give_zero():
    mu, sigma = fid_random_cov(8, 50, np.random.default_rng(0))
    assert abs(fid.frechet_distance(mu, sigma, mu, sigma)) < 1e-6


def test_equal_covariances_give_squared_mean_distance():
    rng = np.random.default_rng(1)
    mu1, sigma = fid_random_cov(8, 50, rng)
    mu2 = mu1 + rng.standard_normal(8)
    expected = float(np.sum((mu1 - mu2) ** 2))
    assert fid.frechet_distance(mu1, sigma, mu2, sigma) == pytest.approx(expected, rel=1e-8, abs=1e-8)


def test_diagonal_covariances_match_closed_form():
    rng = np.random.default_rng(2)
    a, b = rng.uniform(0.1, 3, 6), rng.uniform(0.1, 3, 6)
    mu1, mu2 = rng.standard_normal(6), rng.standard_normal(6)
    expected = np.sum((np.sqrt(a) - np.sqrt(b)) ** 2) + np.sum((mu1 - mu2) ** 2)
    assert fid.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-9)


def test_distance_is_symmetric():
    rng = np.random.default_rng(3)
    mu1, s1 = fid_random_cov(8, 40, rng)
    mu2, s2 = fid_random_cov(8, 40, rng)
    d12, d21 = fid.frechet_distance(mu1, s1, mu2, s2), fid.frechet_distance(mu2, s2, mu1, s1)
    assert d12 > 0
    assert d12 == pytest.approx(d21, rel=1e-8)


def test_singular_covariance_from_few_samples_is_finite_and_non_negative():
    rng = np.random.default_rng(4)
    mu1, s1 = fid_random_cov(16, 5, rng)  # rank 4 in 16 dims
    mu2, s2 = fid_random_cov(16, 5, rng)
    assert np.linalg.matrix_rank(s1) == 4
    d = fid.frechet_distance(mu1, s1, mu2 + 0.5, s2)
    assert np.isfinite(d) and d >= 0


def test_non_finite_sqrtm_is_retried_with_eps_on_both_diagonals(monkeypatch, capsys):
    real_sqrtm, calls = fid.linalg.sqrtm, []

    def flaky_sqrtm(m, *args, **kwargs):
        calls.append(m)
        if len(calls) == 1:  # pretend the product was singular
            nan = np.full_like(m, np.nan)
            return (nan, 0.0) if "disp" in kwargs else nan
        return real_sqrtm(m, *args, **kwargs)

    monkeypatch.setattr(fid.linalg, "sqrtm", flaky_sqrtm)
    a, b, eps = np.array([1.0, 2.0, 3.0]), np.array([0.5, 4.0, 1.0]), 1e-6
    mu = np.zeros(3)
    d = fid.frechet_distance(mu, np.diag(a), mu, np.diag(b), eps=eps)
    # SciPy versions without `disp` see one more call with the same matrix
    np.testing.assert_allclose(calls[0], np.diag(a * b))
    np.testing.assert_allclose(calls[-1], np.diag((a + eps) * (b + eps)))
    assert d == pytest.approx(a.sum() + b.sum() - 2 * np.sqrt((a + eps) * (b + eps)).sum(), rel=1e-12)
    assert "singular" in capsys.readouterr().err


def test_large_imaginary_component_is_an_error():
    # a "covariance" with a negative eigenvalue makes sqrtm genuinely complex
    with pytest.raises(fid.UserError, match="imaginary component up to 1"):
        fid.frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.diag([-1.0, 1.0]))


def test_mismatched_dims_are_an_error_naming_both():
    with pytest.raises(fid.UserError, match="dims 4 .* vs 6"):
        fid.frechet_distance(np.zeros(4), np.eye(4), np.zeros(6), np.eye(6))


# ---------------------------------------------------------------------------
# the network

def test_state_dict_keys_are_pytorch_fids(fid_model):
    keys = fid_expected_key_names()
    assert len(keys) == 472
    sd = fid_model.state_dict()
    assert {k for k in sd if not k.endswith("num_batches_tracked")} == set(keys)
    assert len(sd) == 472 + 94  # plus one num_batches_tracked per BatchNorm
    assert tuple(sd["fc.weight"].shape) == (1008, 2048)
    assert tuple(sd["fc.bias"].shape) == (1008,)
    assert tuple(sd["Conv2d_1a_3x3.conv.weight"].shape) == (32, 3, 3, 3)
    assert tuple(sd["Mixed_7c.branch_pool.conv.weight"].shape) == (192, 2048, 1, 1)
    assert tuple(sd["Mixed_7c.branch_pool.bn.running_var"].shape) == (192,)
    assert tuple(sd["Mixed_5b.branch_pool.conv.weight"].shape) == (32, 192, 1, 1)
    assert tuple(sd["Mixed_6e.branch7x7dbl_5.conv.weight"].shape) == (192, 192, 1, 7)


@pytest.mark.parametrize("with_counters", [False, True])
def test_random_state_dict_with_those_keys_loads_strictly(fid_model, with_counters):
    keys = fid_expected_key_names()
    if with_counters:
        keys += [k.replace("running_var", "num_batches_tracked") for k in keys if k.endswith("running_var")]
    state = fid_random_state_dict(fid_model, keys)
    original = {k: v.clone() for k, v in fid_model.state_dict().items()}
    try:
        fid.load_weights(fid_model, state)
        loaded = fid_model.state_dict()
        for k in ("fc.weight", "Mixed_7c.branch_pool.conv.weight", "Conv2d_1a_3x3.bn.running_var"):
            assert torch.equal(loaded[k], state[k])
    finally:
        fid_model.load_state_dict(original)


def test_weights_file_with_missing_key_names_it(fid_model):
    state = fid_random_state_dict(fid_model, fid_expected_key_names())
    del state["Mixed_7c.branch_pool.bn.running_var"]
    before = fid_model.fc.weight.clone()
    with pytest.raises(fid.UserError, match=r"missing 1 key\(s\): Mixed_7c\.branch_pool\.bn\.running_var"):
        fid.load_weights(fid_model, state)
    assert torch.equal(fid_model.fc.weight, before)  # nothing was loaded


def test_weights_file_with_extra_or_misshaped_key_names_it(fid_model, tmp_path):
    state = fid_random_state_dict(fid_model, fid_expected_key_names())
    state["AuxLogits.fc.weight"] = torch.zeros(1008, 768)
    path = tmp_path / "w.pth"
    torch.save(state, path)
    with pytest.raises(fid.UserError, match=r"unexpected 1 key\(s\): AuxLogits\.fc\.weight") as err:
        fid.load_weights(fid_model, path)
    assert "w.pth" in str(err.value)

    del state["AuxLogits.fc.weight"]
    state["fc.weight"] = torch.zeros(1000, 2048)
    with pytest.raises(fid.UserError, match=r"fc\.weight \(1000, 2048\) \(expected \(1008, 2048\)\)"):
        fid.load_weights(fid_model, state)


def test_feature_sizes_for_each_dims(fid_model):
    x = fid_to_unit(fid_random_images(2))
    with torch.inference_mode():
        for dims in (64, 192, 768, 2048):
            f = fid_model(x, dims=dims)
            assert tuple(f.shape) == (2, dims)
            assert torch.isfinite(f).all() and f.abs().mean() > 1e-2


def test_features_do_not_depend_on_batch_size(fid_model):
    x = fid_to_unit(fid_random_images(4, seed=5))
    with torch.inference_mode():
        together = fid_model(x)
        alone = torch.cat([fid_model(x[i:i + 1]) for i in range(4)])
    assert together.abs().mean() > 0.1
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=0)


def test_last_block_max_pools_where_torchvision_averages(fid_model):
    stock = torchvision.models.inception.InceptionE(2048).eval()
    stock.load_state_dict(fid_model.Mixed_7c.state_dict())
    x = torch.randn(1, 2048, 5, 5)  # signed input: max and mean of a window differ
    with torch.inference_mode():
        ours, theirs = fid_model.Mixed_7c(x), stock(x)
        pool_branch = fid_model.Mixed_7c.branch_pool(F.max_pool2d(x, 3, stride=1, padding=1))
    # channels: 320 (1x1) + 768 (3x3) + 768 (double 3x3) + 192 (pool)
    torch.testing.assert_close(ours[:, :1856], theirs[:, :1856], atol=0, rtol=0)
    torch.testing.assert_close(ours[:, 1856:], pool_branch, atol=0, rtol=0)
    assert (ours[:, 1856:] - theirs[:, 1856:]).abs().max() > 0.1


def test_inception_a_average_pool_ignores_padding(fid_model):
    stock = torchvision.models.inception.InceptionA(192, pool_features=32).eval()
    stock.load_state_dict(fid_model.Mixed_5b.state_dict())
    x = torch.rand(1, 192, 6, 6) + 1  # all positive, so zero padding lowers border averages
    with torch.inference_mode():
        ours, theirs = fid_model.Mixed_5b(x), stock(x)
        pool_branch = fid_model.Mixed_5b.branch_pool(F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False))
    torch.testing.assert_close(ours[:, -32:], pool_branch, atol=0, rtol=0)
    # interior windows see no padding, so only the border differs from torchvision
    torch.testing.assert_close(ours[..., 1:-1, 1:-1], theirs[..., 1:-1, 1:-1], atol=1e-6, rtol=0)
    assert (ours[:, -32:, 0, 0] - theirs[:, -32:, 0, 0]).abs().max() > 1e-3


# ---------------------------------------------------------------------------
# preprocessing

def fid_bilinear_reference(img, out_h, out_w):
    """Half-pixel-centre bilinear resize with edge clamping, in float64 numpy."""
    def taps(n_in, n_out):
        src = np.maximum((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0)
        lo = np.minimum(np.floor(src).astype(int), n_in - 1)
        hi = np.minimum(lo + 1, n_in - 1)
        return lo, hi, src - lo

    y0, y1, wy = taps(img.shape[0], out_h)
    x0, x1, wx = taps(img.shape[1], out_w)
    rows = img[y0] * (1 - wy)[:, None, None] + img[y1] * wy[:, None, None]
    return rows[:, x0] * (1 - wx)[None, :, None] + rows[:, x1] * wx[None, :, None]


def test_resize_matches_explicit_bilinear_reference():
    img = fid_random_images(1, h=5, w=7, seed=6)[0]
    ours = fid.preprocess(fid_to_unit(img[None]))[0].permute(1, 2, 0).numpy()
    expected = 2 * fid_bilinear_reference(img.astype(np.float64) / 255, 299, 299) - 1
    assert ours.shape == (299, 299, 3)
    np.testing.assert_allclose(ours, expected, atol=1e-5, rtol=0)


def test_resizing_a_299_input_is_an_exact_identity():
    x = torch.rand(2, 3, 299, 299)
    assert torch.equal(fid.preprocess(x), 2 * x - 1)


def test_array_channels_are_converted_like_pil():
    rgba = fid_random_images(2, h=6, w=5, seed=7).repeat(2, axis=-1)[..., :4]
    gray = rgba[..., 0]
    for arr, mode in ((rgba, "RGBA"), (gray, "L")):
        ours = fid._as_rgb_nhwc(arr, "test")
        for i in range(2):
            pil = np.array(Image.fromarray(arr[i], mode=mode).convert("RGB"))
            np.testing.assert_array_equal(ours[i], pil)


# ---------------------------------------------------------------------------
# statistics, inputs, weights files

def test_stats_save_load_round_trip(tmp_path):
    rng = np.random.default_rng(8)
    mu, sigma = fid_random_cov(8, 30, rng)
    meta = dict(num_images=30, num_failed=1, resolutions=[(32, 32), (24, 40)], dims=8,
                weights_name="w.pth", weights_sha256="ab" * 32)
    path = tmp_path / "ref.npz"
    fid.save_stats(path, mu, sigma, meta)
    mu2, sigma2, meta2 = fid.load_stats(path)
    np.testing.assert_array_equal(mu2, mu)
    np.testing.assert_array_equal(sigma2, sigma)
    assert meta2 == meta
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ref.npz"]  # no temp file left behind
    with np.load(path) as f:  # plain keys that pytorch-fid reads
        np.testing.assert_array_equal(f["mu"], mu)


def test_npz_images_and_folder_of_same_pixels_give_same_statistics(fid_model64, tmp_path):
    images = fid_random_images(8, seed=9)
    folder = fid_write_pngs(tmp_path / "imgs", images)
    np.savez(tmp_path / "imgs.npz", images=images)
    mu_f, sig_f, meta_f = fid.compute_statistics(folder, fid_model64, batch_size=4, device="cpu", num_workers=2,
                                                 progress=False)
    mu_n, sig_n, meta_n = fid.compute_statistics(tmp_path / "imgs.npz", fid_model64, batch_size=4, device="cpu",
                                                 num_workers=0, progress=False)
    np.testing.assert_allclose(mu_f, mu_n, rtol=0, atol=1e-12)
    np.testing.assert_allclose(sig_f, sig_n, rtol=0, atol=1e-12)
    assert mu_f.dtype == sig_f.dtype == np.float64 and sig_f.shape == (64, 64)
    assert mu_f.std() > 1e-3
    assert meta_f["num_images"] == meta_n["num_images"] == 8
    assert meta_f["resolutions"] == [(32, 32)] and meta_f["num_failed"] == 0


def test_mixed_sizes_are_resized_per_image_and_bad_files_skipped(fid_model64, tmp_path, monkeypatch, capsys):
    images = [fid_random_images(1, 32, 32, seed=10)[0], fid_random_images(1, 24, 40, seed=11)[0],
              fid_random_images(1, 32, 32, seed=12)[0]]
    folder = tmp_path / "mixed"
    folder.mkdir()
    for i, img in enumerate(images):
        Image.fromarray(img).save(folder / f"{i}.png")
    (folder / "sub").mkdir()
    (folder / "sub" / "broken.png").write_bytes(b"not a png")  # found recursively, then skipped

    monkeypatch.setattr(fid, "MAX_FAILED_FRACTION", 0.5)
    mu, _, meta = fid.compute_statistics(folder, fid_model64, batch_size=4, device="cpu", progress=False)
    assert "broken.png" in capsys.readouterr().err
    assert meta["num_images"] == 3 and meta["num_failed"] == 1
    assert meta["resolutions"] == [(24, 40), (32, 32)]
    with torch.inference_mode():
        one_by_one = torch.cat([fid_model64(fid_to_unit(img[None])) for img in images]).double().numpy()
    np.testing.assert_allclose(mu, one_by_one.mean(0), atol=1e-5, rtol=0)

    monkeypatch.setattr(fid, "MAX_FAILED_FRACTION", 0.01)
    with pytest.raises(fid.UserError, match="1 of 4 images are unreadable"):
        fid.compute_statistics(folder, fid_model64, batch_size=4, device="cpu", progress=False)


def test_missing_weights_message_names_file_url_and_folder(tmp_path, monkeypatch):
    hub = tmp_path / "no_hub"

    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(fid.UserError) as err:
        fid.build_inception()
    msg = str(err.value)
    assert "pt_inception-2015-12-05-6726825d.pth" in msg
    assert "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" \
           "pt_inception-2015-12-05-6726825d.pth" in msg
    assert str(hub / "checkpoints") in msg
    assert not any((hub / "checkpoints").iterdir())  # no partial file left


def test_download_lands_under_final_name_only_when_complete(fid_model, tmp_path, monkeypatch):
    hub = tmp_path / "hub"
    seen = []

    def fake_download(url, dst, *args, **kwargs):
        seen.append((url, dst))
        torch.save(fid_model.state_dict(), dst)

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    loaded = fid.build_inception(dims=64)
    final = hub / "checkpoints" / fid.WEIGHTS_NAME
    assert seen[0][0] == fid.WEIGHTS_URL and seen[0][1] != str(final)
    assert [p.name for p in final.parent.iterdir()] == [fid.WEIGHTS_NAME]
    assert loaded.dims == 64 and loaded.weights_sha256 == fid.sha256_file(final)
    assert torch.equal(loaded.fc.weight, fid_model.fc.weight)


# ---------------------------------------------------------------------------
# command line

def test_cli_nonexistent_path_fails_with_one_line(tmp_path, capsys):
    missing = tmp_path / "nope"
    rc = fid.main([str(missing), str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2      # as the other scripts' user errors
    assert err.count("\n") == 1 and str(missing) in err and "Traceback" not in err


def test_cli_fewer_than_two_images_fails(tmp_path, capsys):
    one = fid_write_pngs(tmp_path / "one", fid_random_images(1))
    two = fid_write_pngs(tmp_path / "two", fid_random_images(2))
    rc = fid.main([str(one), str(two), "--weights", str(tmp_path / "unused.pth")])
    err = capsys.readouterr().err
    assert rc != 0 and err.count("\n") == 1 and "at least 2" in err


def test_cli_stats_files_with_different_dims_fail_naming_both(tmp_path, capsys):
    rng = np.random.default_rng(13)
    fid.save_stats(tmp_path / "a.npz", *fid_random_cov(4, 10, rng))
    fid.save_stats(tmp_path / "b.npz", *fid_random_cov(6, 10, rng))
    rc = fid.main([str(tmp_path / "a.npz"), str(tmp_path / "b.npz")])
    err = capsys.readouterr().err
    assert rc != 0 and err.count("\n") == 1
    assert "a.npz has 4" in err and "b.npz has 6" in err


def test_cli_save_stats_then_compare_matches_library(fid_model, fid_model64, tmp_path, capsys):
    weights = tmp_path / "w.pth"
    torch.save(fid_model.state_dict(), weights)
    a = fid_write_pngs(tmp_path / "a", fid_random_images(3, seed=14))
    b = fid_write_pngs(tmp_path / "b", fid_random_images(3, seed=15))
    # dims 64 keeps the forward passes and the matrix square root cheap
    common = ["--weights", str(weights), "--dims", "64", "--device", "cpu", "--num-workers", "0", "--no-progress"]

    assert fid.main([str(a), "--save-stats", str(tmp_path / "a.npz")] + common) == 0
    mu_a, s_a, meta = fid.load_stats(tmp_path / "a.npz")
    assert meta["num_images"] == 3 and meta["dims"] == 64 and meta["resolutions"] == [(32, 32)]
    assert meta["weights_sha256"] == fid.sha256_file(weights)
    capsys.readouterr()

    assert fid.main([str(b), str(tmp_path / "a.npz")] + common) == 0
    out = capsys.readouterr().out.splitlines()
    mu_b, s_b, _ = fid.compute_statistics(b, fid_model64, batch_size=50, device="cpu", progress=False)
    assert out[0] == f"FID: {fid.frechet_distance(mu_b, s_b, mu_a, s_a):.4f}"
    assert out[1].startswith("protocol: A=3 images (folder, 32x32); B=3 images (stats file, 32x32); dims=64")
    assert f"sha256 {meta['weights_sha256'][:12]}" in out[1] and "299x299" in out[1]


def test_fid_copied_alone_into_an_empty_folder_gives_the_same_number(fid_model, tmp_path, capsys):
    import shutil
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(os.path.join(HERE, "fid.py"), alone / "fid.py")
    weights = tmp_path / "w.pth"
    torch.save(fid_model.state_dict(), weights)      # random weights under pytorch-fid's key names
    for name, seed in (("a", 16), ("b", 17)):
        np.savez(tmp_path / f"{name}.npz", images=fid_random_images(6, seed=seed))
    args = [str(tmp_path / "a.npz"), str(tmp_path / "b.npz"), "--weights", str(weights), "--dims", "64",
            "--device", "cpu", "--num-workers", "0", "--no-progress"]
    # only the copy is importable there; as many threads as this process, so the sums run alike
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()), PYTHONPATH="")
    copy = subprocess.run([sys.executable, "fid.py", *args], cwd=alone, env=env, capture_output=True, text=True)
    assert copy.returncode == 0, copy.stderr[-2000:]
    capsys.readouterr()
    assert fid.main(args) == 0                                       # in place, in this process
    in_place = capsys.readouterr().out.splitlines()[0]
    assert copy.stdout.splitlines()[0] == in_place and float(in_place.removeprefix("FID: ")) > 0


# -----------------------------------------------------------------------------
# Stage 2: training script (token cache, checkpoints, conditioning, errors)

@pytest.fixture(scope="module")
def stage1_ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("stage1")
    train_mqvae.main(TINY_TRAIN[1:] + ["--max-steps", "2", "--out-dir", str(out)])
    return str(out / "ckpt.pt")


@pytest.fixture(scope="module")
def labelled_folder(tmp_path_factory):
    """ImageNet layout (train/<class>/, val/<class>/) and COCO layout (captions JSON) of tiny images."""
    root = tmp_path_factory.mktemp("datasets")
    rng = np.random.default_rng(0)
    for split, count in (("train", 12), ("val", 4)):
        for c, name in enumerate(("n01", "n02", "n03")):
            _write_images(root / "imagenet" / split / name, count, size=16, seed=c + 10 * (split == "val"))
        folder = root / "coco" / f"{split}2014"
        _write_images(folder, count, size=16, seed=99 + (split == "val"))
        files = sorted(os.listdir(folder))
        meta = dict(images=[dict(id=i, file_name=f) for i, f in enumerate(files)],
                    annotations=[dict(image_id=i, caption=f"a {rng.choice(['red', 'blue'])} thing number {i}")
                                 for i in range(len(files)) for _ in range(2)])
        (root / "coco" / "annotations").mkdir(exist_ok=True)
        (root / "coco" / "annotations" / f"captions_{split}2014.json").write_text(json.dumps(meta))
    return root


def stage2_args(stage1, out, *extra):
    return ["--stage1", stage1, "--preset", "tiny", "--batch-size", "4", "--log-every", "1", "--eval-every", "100",
            "--eval-batches", "1", "--num-samples", "2", "--num-workers", "0", "--out-dir", str(out), *extra]


def test_stage2_token_cache_is_reused_and_rebuilt_when_stage1_changes(stage1_ckpt, labelled_folder, tmp_path):
    folder = str(labelled_folder / "imagenet" / "train")
    out = tmp_path / "s2"
    train_stackformer.main(stage2_args(stage1_ckpt, out, "--data", folder, "--max-steps", "1"))
    meta = out / "tokens" / "train" / "meta.json"
    first = json.loads(meta.read_text())
    assert first["views"] == 8 and first["rows"] == 8 * 2 * first["images"]   # the default: 8 views + mirror images
    mtime = meta.stat().st_mtime_ns
    train_stackformer.main(stage2_args(stage1_ckpt, out, "--data", folder, "--max-steps", "1", "--overwrite"))
    assert meta.stat().st_mtime_ns == mtime  # same stage 1: reused
    changed = tmp_path / "changed.pt"
    ckpt = torch.load(stage1_ckpt, weights_only=True)
    ckpt["mqvae"]["quantizer.codebook"] = ckpt["mqvae"]["quantizer.codebook"] + 1.0
    torch.save(ckpt, changed)
    train_stackformer.main(stage2_args(str(changed), out, "--data", folder, "--max-steps", "1", "--overwrite"))
    second = json.loads(meta.read_text())
    assert second["key"]["stage1_sha256"] != first["key"]["stage1_sha256"]
    assert second["key"]["stage1_sha256"] == train_stackformer.file_sha256(str(changed))


def test_a_class_folder_trains_class_conditional_with_guidance_and_samples_with_it(stage1_ckpt, labelled_folder,
                                                                                      both_checkpoints, tmp_path):
    out = tmp_path / "s2"                  # --data PATH in torchvision's ImageFolder layout: PATH/{train,val}/<class>/
    train_stackformer.main(stage2_args(stage1_ckpt, out, "--data", str(labelled_folder / "imagenet"), "--cond", "class",
                                       "--max-steps", "2"))
    ckpt = utils.load_checkpoint(str(out / "ckpt.pt"), "stackformer")
    assert ckpt["classes"] == ["n01", "n02", "n03"] and ckpt["stackformer_config"]["cond_drop"] == 0.1
    common = ["--ckpt", str(out / "ckpt.pt"), "--device", "cpu", "--n", "6", "--batch-size", "6", "--grid", "none"]
    sample.main(common + ["--npz", str(tmp_path / "plain.npz")])
    sample.main(common + ["--npz", str(tmp_path / "scale1.npz"), "--cfg-scale", "1"])
    sample.main(common + ["--npz", str(tmp_path / "scale3.npz"), "--cfg-scale", "3", "--cfg-schedule", "linear"])
    plain, scale1, scale3 = (np.load(tmp_path / f"{name}.npz")["images"] for name in ("plain", "scale1", "scale3"))
    assert np.array_equal(plain, scale1) and plain.shape == scale3.shape == (6, 16, 16, 3)
    _, unconditional = both_checkpoints
    with pytest.raises(UserError, match="needs a model trained with --cond-drop"):
        sample.main(["--ckpt", unconditional, "--device", "cpu", "--n", "2", "--cfg-scale", "2", "--grid", "none",
                     "--npz", str(tmp_path / "x.npz")])


def test_importance_and_raster_token_orders_differ_only_by_permutation(stage1_ckpt, labelled_folder, tmp_path):
    out = tmp_path / "s2"
    train_stackformer.main(stage2_args(stage1_ckpt, out, "--data", str(labelled_folder / "imagenet" / "train"),
                                       "--max-steps", "1", "--views", "1"))     # row 0: the centre crop of image 0
    gen = torch.Generator().manual_seed(0)
    rows = np.arange(10)
    raster = train_stackformer.TokenSet(str(out / "tokens" / "train"), "raster").batch(rows, gen)
    importance = train_stackformer.TokenSet(str(out / "tokens" / "train"), "importance").batch(rows, gen)
    assert (raster[1][:, 1:] > raster[1][:, :-1]).all()  # raster: strictly increasing positions
    assert not torch.equal(raster[1], importance[1])
    for b in range(10):
        pairs = lambda t: sorted(zip(t[1][b].tolist(), t[0][b].tolist()))
        assert pairs(raster) == pairs(importance)
    # the cached importance order is the encoder's: re-encoding the first image gives the same sequence
    model = utils.load_mqvae(stage1_ckpt)
    ds = data.build_dataset(str(labelled_folder / "imagenet" / "train"), None, 16, "train")
    ds.mode = "eval"
    codes, positions, _ = model.encode(ds[0]["image"][None])
    assert torch.equal(positions[0], importance[1][0]) and torch.equal(codes[0], importance[0][0])


def test_views_are_the_training_augmentations_draws_and_each_epoch_takes_one_per_image(stage1_ckpt, labelled_folder,
                                                                                       tmp_path):
    folder = str(labelled_folder / "imagenet" / "train")          # 35 training images; augmentation: crop + flip
    out = tmp_path / "s2"
    train_stackformer.main(stage2_args(stage1_ckpt, out, "--data", folder, "--max-steps", "1", "--views", "3"))
    meta = json.loads((out / "tokens" / "train" / "meta.json").read_text())
    M = meta["images"]
    assert M == 35 and meta["views"] == 3 and meta["rows"] == M * 3 * 2 and meta["key"]["views"] == 3
    tokens = train_stackformer.TokenSet(str(out / "tokens" / "train"), "importance")
    assert tokens.num_images == M and tokens.copies == 6
    model = utils.load_mqvae(stage1_ckpt)
    dataset = data.build_dataset(folder, None, 16, "train")
    i = 5
    views = []
    for view in range(3):
        image = dataset[(i, data.sample_seed(train_stackformer.VIEW_SEED, view, i))]["image"][None]
        for mirrored in (False, True):
            codes, positions, _ = model.encode(image.flip(3) if mirrored else image)
            row = (2 * view + mirrored) * M + i
            assert np.array_equal(tokens.codes[row], codes[0].numpy()) and np.array_equal(tokens.positions[row],
                                                                                          positions[0].numpy())
        views.append(image)
    assert not torch.equal(views[0], views[1]) and not torch.equal(views[1], views[2])   # three different crops
    rows = tokens.epoch_rows(seed=0, epoch=2)
    assert sorted(rows % M) == list(range(M)) and len(set(rows // M)) > 1           # each image once, copies mixed
    assert np.array_equal(rows, tokens.epoch_rows(seed=0, epoch=2))                     # the draw repeats on resume
    mtime = (out / "tokens" / "train" / "meta.json").stat().st_mtime_ns
    train_stackformer.main(stage2_args(stage1_ckpt, out, "--data", folder, "--max-steps", "1", "--views", "2",
                                       "--overwrite"))
    meta = json.loads((out / "tokens" / "train" / "meta.json").read_text())
    assert meta["views"] == 2 and meta["rows"] == M * 2 * 2                             # rebuilt for K = 2
    assert (out / "tokens" / "train" / "meta.json").stat().st_mtime_ns != mtime
    with pytest.raises(UserError, match="--views 1"):                                  # shapes: no augmentation
        train_stackformer.main(stage2_args(stage1_ckpt, tmp_path / "shapes", "--data", "shapes", "--max-steps", "1",
                                           "--views", "2"))


def test_an_interrupted_token_extraction_resumes_from_its_parts(stage1_ckpt, labelled_folder, tmp_path, monkeypatch):
    folder = str(labelled_folder / "imagenet" / "train")
    clean = tmp_path / "clean"
    monkeypatch.setattr(train_stackformer, "PART_IMAGES", 8)          # 35 images: 5 parts per view
    train_stackformer.main(stage2_args(stage1_ckpt, clean, "--data", folder, "--max-steps", "1", "--views", "2"))
    encode, calls, died = train_stackformer.encode_images, [], []
    def dies_at_the_fourth_part(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4 and not died:
            died.append(1)
            raise RuntimeError("preempted")                         # e.g. a preemption mid-extraction
        return encode(*args, **kwargs)
    monkeypatch.setattr(train_stackformer, "encode_images", dies_at_the_fourth_part)
    out = tmp_path / "resumed"
    with pytest.raises(RuntimeError, match="preempted"):
        train_stackformer.main(stage2_args(stage1_ckpt, out, "--data", folder, "--max-steps", "1", "--views", "2"))
    assert len(list((out / "tokens" / "train").glob("*.npz"))) == 3   # the parts done before the interruption
    calls.clear()
    train_stackformer.main(stage2_args(stage1_ckpt, out, "--data", folder, "--max-steps", "1", "--views", "2"))
    assert len(calls) == (10 - 3) + 1                                 # the missing parts, then the val split
    for name in ("codes", "positions", "labels"):
        assert np.array_equal(np.load(clean / "tokens" / "train" / f"{name}.npy"),
                              np.load(out / "tokens" / "train" / f"{name}.npy"))
    assert not list((out / "tokens" / "train").glob("*.npz"))         # parts removed after the merge


def test_an_epoch_sees_every_image_once_as_itself_or_mirrored(tmp_path):
    M, N = 50, 4
    np.save(tmp_path / "codes.npy", np.zeros((2 * M, N), np.uint16))
    np.save(tmp_path / "positions.npy", np.tile(np.arange(N, dtype=np.uint16), (2 * M, 1)))
    np.save(tmp_path / "labels.npy", np.zeros(2 * M, np.int64))
    (tmp_path / "meta.json").write_text(json.dumps(dict(images=M, rows=2 * M)))
    tokens = train_stackformer.TokenSet(str(tmp_path), "raster")
    assert tokens.num_images == M and tokens.copies == 2
    rows = tokens.epoch_rows(seed=0, epoch=3)
    assert sorted(rows % M) == list(range(M))              # each image exactly once
    mirrored = (rows >= M).mean()
    assert 0.25 < mirrored < 0.75                          # a fair coin per image
    assert not np.array_equal(rows, tokens.epoch_rows(seed=0, epoch=4))
    assert np.array_equal(rows, tokens.epoch_rows(seed=0, epoch=3))


def test_stage2_checkpoint_embeds_mqvae_and_reloads_strictly_with_identical_logits(stage1_ckpt, tmp_path, labelled_folder):
    out = tmp_path / "s2"
    train_stackformer.main(stage2_args(stage1_ckpt, out, "--data", "imagenet", "--data-dir",
                                       str(labelled_folder / "imagenet"), "--max-steps", "2"))
    model, stage1_model, tokenizer, ckpt = utils.load_stackformer(str(out / "ckpt.pt"))
    assert ckpt["stackformer_config"]["cond"] == "class" and ckpt["classes"] == ["n01", "n02", "n03"]
    assert tokenizer is None and "disc" not in ckpt
    reference = utils.load_mqvae(stage1_ckpt)
    for k, v in reference.state_dict().items():
        assert torch.equal(stage1_model.state_dict()[k], v)
    rebuilt = Stackformer(StackformerConfig(**ckpt["stackformer_config"])).eval()
    rebuilt.load_state_dict(ckpt["model"], strict=True)
    codes = torch.randint(0, 64, (2, 16))
    positions = torch.sort(torch.rand(2, 64).argsort(1)[:, :16], 1).values
    labels = torch.tensor([0, 2])
    for a, b in zip(model(codes, positions, labels), rebuilt(codes, positions, labels)):
        assert torch.equal(a, b)
    records = read_jsonl(str(out / "log.jsonl"))
    assert all("code_loss" in r and "pos_loss" in r and "mfu" in r for r in records if "loss" in r)


def test_stage2_resume_gives_the_same_next_losses_as_an_uninterrupted_run(stage1_ckpt, labelled_folder, tmp_path):
    folder = str(labelled_folder / "imagenet" / "train")
    full, part = tmp_path / "full", tmp_path / "part"
    train_stackformer.main(stage2_args(stage1_ckpt, full, "--data", folder, "--max-steps", "5"))
    train_stackformer.main(stage2_args(stage1_ckpt, part, "--data", folder, "--max-steps", "5", "--stop-after", "2"))
    train_stackformer.main(stage2_args(stage1_ckpt, part, "--data", folder, "--max-steps", "5", "--resume"))
    losses = lambda d: {r["step"]: r["loss"] for r in read_jsonl(str(d / "log.jsonl")) if "loss" in r}
    a, b = losses(full), losses(part)
    assert [a[s] for s in (3, 4, 5)] == [b[s] for s in (3, 4, 5)]
    wa = torch.load(full / "ckpt.pt", weights_only=True)["model"]
    wb = torch.load(part / "ckpt.pt", weights_only=True)["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_text_conditional_run_stores_tokenizer_built_from_training_captions(stage1_ckpt, labelled_folder, tmp_path):
    out = tmp_path / "s2"
    train_stackformer.main(stage2_args(stage1_ckpt, out, "--data", "coco", "--data-dir",
                                       str(labelled_folder / "coco"), "--max-steps", "1"))
    model, _, tokenizer, ckpt = utils.load_stackformer(str(out / "ckpt.pt"))
    assert ckpt["stackformer_config"]["cond"] == "text"
    assert {"red", "blue", "thing", "number"} <= set(tokenizer.words)
    assert model.config.text_vocab_size == tokenizer.vocab_size
    caps = np.load(out / "tokens" / "train" / "caption_tokens.npy")
    assert caps.shape[1:] == (2, 32) and (caps[:, :, 0] > 1).all()  # two captions per image, known first word


def test_stage2_bad_inputs_are_one_line_errors(stage1_ckpt, labelled_folder, tmp_path):
    s2 = tmp_path / "s2"
    train_stackformer.main(stage2_args(stage1_ckpt, s2, "--data", str(labelled_folder / "imagenet" / "train"),
                                       "--max-steps", "1"))
    truncated = tmp_path / "trunc.pt"
    truncated.write_bytes(open(stage1_ckpt, "rb").read()[:1000])
    cases = [
        (["--stage1", str(tmp_path / "missing.pt")], "not found"),
        (["--stage1", str(truncated)], "truncated"),
        (["--stage1", str(s2 / "ckpt.pt")], "Stackformer"),
        (["--data", str(labelled_folder / "coco" / "train2014"), "--cond", "class"], "needs labelled data"),
        (["--data", "coco", "--data-dir", str(labelled_folder / "imagenet")], "captions_train2014.json"),
        (["--preset", "huge"], "unknown preset"),
    ]
    for extra, expected in cases:
        args = stage2_args(stage1_ckpt, tmp_path / "err", "--max-steps", "1", "--data",
                           str(labelled_folder / "imagenet" / "train"))
        with pytest.raises(UserError, match=expected):
            train_stackformer.main(args + extra)


def test_two_process_gloo_stage2_keeps_parameters_identical(stage1_ckpt, labelled_folder, tmp_path):
    r = run_script(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train_stackformer.py"] +
                   stage2_args(stage1_ckpt, tmp_path / "ddp", "--data", str(labelled_folder / "imagenet" / "train"),
                               "--max-steps", "2"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "identical across 2 ranks" in r.stdout and "global batch 8" in r.stdout


# -----------------------------------------------------------------------------
# sample.py

SP_N, SP_T, SP_GRID = 16, 64, 8
SP_CLASSES = ["circle", "square", "triangle"]
SP_CAPTIONS = ["a red circle on a dark background", "a blue square", "a green triangle and a red circle"]


def write_checkpoint(path, cond="none", seed=0) -> str:
    """A Stackformer checkpoint laid out as train_stackformer.py writes it, with tiny random models."""
    torch.manual_seed(seed)
    mq_config = MQVAEConfig(**mqvae.PRESETS["tiny"], resolution=16)
    mq = MQVAE(mq_config).eval()
    tokenizer = WordTokenizer.build(SP_CAPTIONS) if cond == "text" else None
    extra = dict(num_classes=len(SP_CLASSES)) if cond == "class" else {}
    if cond == "text":
        extra = dict(text_vocab_size=tokenizer.vocab_size)
    config = StackformerConfig(**stackformer.PRESETS["tiny"], codebook_size=64, num_positions=SP_T, seq_len=SP_N,
                               cond=cond, **extra)
    model = Stackformer(config)
    with torch.no_grad():
        # Fresh models barely react to their inputs: codes start at U(±1/V), so every code decodes
        # to the same gray, and N(0, 0.02) weights leave a caption's words little say over the
        # padding after them. Wider weights make codes, classes and captions change the pixels.
        mq.quantizer.codebook.normal_(0.0, 1.0)
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.2)
    save_checkpoint(dict(kind="stackformer", stackformer_config=dataclasses.asdict(config), model=model.state_dict(),
                         mqvae_config=dataclasses.asdict(mq_config), mqvae=mq.state_dict(),
                         tokenizer=tokenizer.to_dict() if tokenizer else None,
                         classes=SP_CLASSES if cond == "class" else None, image_size=16,
                         train_config=dict(data="shapes"), step=123), path)
    return str(path)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpts")
    return {cond: write_checkpoint(folder / f"{cond}.pt", cond) for cond in ("none", "class", "text")}


def run_sample(*args):
    """sample.main in-process on CPU; returns its summary dict."""
    return sample.main(["--device", "cpu", *map(str, args)])


def npz_images(path):
    with np.load(path, allow_pickle=False) as f:
        return {key: f[key] for key in f.files}


def folder_images(folder, n):
    return np.stack([np.asarray(Image.open(os.path.join(folder, f"{i:06d}.png"))) for i in range(n)])


def differing(a, b):
    """How many images of a (B, H, W, 3) differ from their counterpart in b."""
    return int((a != b).reshape(len(a), -1).any(axis=1).sum())


# ---------------------------------------------------------------------------- reproducibility

def test_same_seed_gives_identical_images_and_another_seed_different_ones(ckpts, tmp_path):
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        run_sample("--ckpt", ckpts["none"], "--n", 6, "--batch-size", 4, "--seed", seed, "--grid", "none",
            "--npz", tmp_path / f"{name}.npz")
    a, b, c = (npz_images(tmp_path / f"{name}.npz")["images"] for name in "abc")
    assert a.shape == (6, 16, 16, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert differing(a, c) == 6
    assert differing(a[:3], a[3:]) == 3          # and the images of one run differ from each other


@pytest.mark.parametrize("n,batch_size,world", [(10, 4, 1), (10, 4, 3), (64, 64, 8), (5, 2, 8), (1, 64, 4),
                                                (100, 7, 3), (50000, 64, 8), (0, 4, 2)])
def test_shard_chunks_cover_every_index_exactly_once(n, batch_size, world):
    shares = [sample.shard_chunks(n, batch_size, rank, world) for rank in range(world)]
    indices = [i for share in shares for start, stop in share for i in range(start, stop)]
    assert sorted(indices) == list(range(n))                              # no gaps, no duplicates
    single = sample.shard_chunks(n, batch_size)
    assert sorted(c for share in shares for c in share) == single         # the same chunks for any world
    assert all(0 < stop - start <= batch_size and start % batch_size == 0 for start, stop in single)
    sizes = [len(share) for share in shares]
    assert max(sizes) - min(sizes) <= 1                                   # balanced to one chunk
    assert all(start // batch_size % world == rank for rank, share in enumerate(shares) for start, _ in share)


def test_an_image_depends_on_its_index_not_on_n_chunk_order_or_rank(ckpts):
    model, mq, _, _ = load_stackformer(ckpts["class"])
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0])
    reference = sample.sample_images(model, mq, 7, cond=labels, batch_size=3, seed=5)
    shorter = sample.sample_images(model, mq, 5, cond=labels[:5], batch_size=3, seed=5)
    assert np.array_equal(shorter, reference[:5])           # n = 5 cuts the chunk [3, 6) short; same pixels
    # Rank 1 of 2 first, then rank 0, as two processes would: the same image at every index.
    pieces = {}
    for rank in (1, 0):
        for start, stop in sample.shard_chunks(7, 3, rank, 2):
            chunk = sample.sample_chunk(model, mq, start, stop, 3, labels[start:stop], seed=5)
            pieces[start] = chunk.images.numpy()
    assert np.array_equal(np.concatenate([pieces[s] for s in sorted(pieces)]), reference)
    assert sample.chunk_seed(5, 0) != sample.chunk_seed(5, 3) != sample.chunk_seed(6, 0)


def test_an_image_depends_only_on_its_own_condition(ckpts, tmp_path):
    run_sample("--ckpt", ckpts["class"], "--n", 4, "--classes", "1,2", "--grid", "none", "--npz", tmp_path / "mixed.npz")
    run_sample("--ckpt", ckpts["class"], "--n", 4, "--class-id", "square", "--grid", "none", "--npz", tmp_path / "ones.npz")
    mixed, ones = npz_images(tmp_path / "mixed.npz"), npz_images(tmp_path / "ones.npz")
    assert mixed["labels"].tolist() == [1, 2, 1, 2] and ones["labels"].tolist() == [1, 1, 1, 1]   # "square" is class 1
    assert differing(mixed["images"][0::2], ones["images"][0::2]) == 0     # class 1 in both runs
    assert differing(mixed["images"][1::2], ones["images"][1::2]) == 2     # class 2 vs class 1


# ---------------------------------------------------------------------------- sampling controls

@pytest.mark.parametrize("cond", ["none", "class", "text"])
def test_kv_cache_and_full_recompute_give_the_same_tokens_under_greedy(ckpts, cond):
    model, _, tokenizer, _ = load_stackformer(ckpts[cond])
    c = {"none": None, "class": torch.tensor([0, 1, 2]), "text": tokenizer.encode_batch(SP_CAPTIONS) if tokenizer else None}[cond]
    cached = model.generate(batch_size=3, cond=c, use_kv_cache=True, settings=SamplingConfig(greedy=True))
    full = model.generate(batch_size=3, cond=c, use_kv_cache=False, settings=SamplingConfig(greedy=True))
    assert torch.equal(cached[0], full[0]) and torch.equal(cached[1], full[1])


def test_no_kv_cache_flag_writes_the_same_images_under_greedy(ckpts, tmp_path):
    run_sample("--ckpt", ckpts["class"], "--n", 3, "--greedy", "--grid", "none", "--npz", tmp_path / "kv.npz")
    run_sample("--ckpt", ckpts["class"], "--n", 3, "--greedy", "--no-kv-cache", "--grid", "none", "--npz", tmp_path / "full.npz")
    kv, full = npz_images(tmp_path / "kv.npz")["images"], npz_images(tmp_path / "full.npz")["images"]
    assert np.array_equal(kv, full)
    assert differing(kv[:1], kv[1:2]) == 1            # greedy images still differ by class


def test_sample_top_k_1_equals_greedy(ckpts, tmp_path):
    run_sample("--ckpt", ckpts["none"], "--n", 4, "--top-k", 1, "--pos-top-k", 1, "--seed", 3, "--grid", "none",
        "--npz", tmp_path / "k1.npz")
    run_sample("--ckpt", ckpts["none"], "--n", 4, "--greedy", "--grid", "none", "--npz", tmp_path / "greedy.npz")
    k1, greedy = npz_images(tmp_path / "k1.npz")["images"], npz_images(tmp_path / "greedy.npz")["images"]
    assert np.array_equal(k1, greedy)
    assert differing(k1[:1], k1[1:]) == 0             # no randomness left: one image, four times


def test_increasing_positions_strictly_increase_and_unique_positions_are_distinct(ckpts):
    model, mq, _, _ = load_stackformer(ckpts["none"])
    _, increasing = sample.sample_images(model, mq, 5, batch_size=5, return_positions=True, settings=SamplingConfig(position_rule="increasing"))
    _, unique = sample.sample_images(model, mq, 5, batch_size=5, return_positions=True, settings=SamplingConfig(position_rule="unique"))
    assert increasing.shape == unique.shape == (5, SP_N)
    assert (np.diff(increasing, axis=1) > 0).all() and increasing.min() >= 0 and increasing.max() < SP_T
    assert all(len(set(row)) == SP_N for row in unique.tolist()) and unique.min() >= 0 and unique.max() < SP_T


# ---------------------------------------------------------------------------- conditioning

def test_different_classes_give_different_images_and_all_classes_is_one_per_class(ckpts, tmp_path):
    for label in (0, 1):
        run_sample("--ckpt", ckpts["class"], "--n", 4, "--class-id", label, "--grid", "none", "--npz", tmp_path / f"{label}.npz")
    zero, one = npz_images(tmp_path / "0.npz")["images"], npz_images(tmp_path / "1.npz")["images"]
    assert differing(zero, one) == 4
    summary = run_sample("--ckpt", ckpts["class"], "--classes", "all", "--grid", "none", "--npz", tmp_path / "all.npz")
    assert summary["n"] == 3 and npz_images(tmp_path / "all.npz")["labels"].tolist() == [0, 1, 2]
    run_sample("--ckpt", ckpts["class"], "--n", 5, "--grid", "none", "--npz", tmp_path / "default.npz")
    assert npz_images(tmp_path / "default.npz")["labels"].tolist() == [0, 1, 2, 0, 1]   # no flag: all classes, cycled


def test_different_prompts_give_different_images(ckpts, tmp_path):
    for name, prompt in (("red", "a red circle"), ("blue", "a blue square")):
        run_sample("--ckpt", ckpts["text"], "--n", 3, "--prompt", prompt, "--grid", "none", "--npz", tmp_path / f"{name}.npz")
    red, blue = npz_images(tmp_path / "red.npz"), npz_images(tmp_path / "blue.npz")
    assert differing(red["images"], blue["images"]) == 3
    assert red["prompts"].tolist() == ["a red circle"] * 3


def test_prompts_file_gives_one_image_per_caption_and_warns_once_about_unknown_words(ckpts, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a zebra circle\n\na blue unicorn\n  a zebra square  \n")
    summary = run_sample("--ckpt", ckpts["text"], "--prompts-file", prompts, "--grid", "none", "--npz", tmp_path / "p.npz")
    assert summary["n"] == 3
    assert npz_images(tmp_path / "p.npz")["prompts"].tolist() == ["a zebra circle", "a blue unicorn", "a zebra square"]
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning")]
    assert len(warnings) == 1 and "unicorn, zebra" in warnings[0]


# ---------------------------------------------------------------------------- outputs

def test_npz_png_folder_and_library_hold_the_same_pixels(ckpts, tmp_path, capsys):
    summary = run_sample("--ckpt", ckpts["class"], "--n", 7, "--batch-size", 3, "--seed", 2, "--out-dir", tmp_path / "png",
                  "--npz", tmp_path / "s.npz", "--grid", tmp_path / "grid.png")
    stored = npz_images(tmp_path / "s.npz")
    pngs = folder_images(tmp_path / "png", 7)
    assert stored["images"].shape == (7, 16, 16, 3) and np.array_equal(stored["images"], pngs)
    assert sorted(os.listdir(tmp_path / "png")) == [f"{i:06d}.png" for i in range(7)] + ["sample_config.json"]
    model, mq, _, _ = load_stackformer(ckpts["class"])
    library = sample.sample_images(model, mq, 7, cond=torch.tensor([0, 1, 2] * 3)[:7], batch_size=3, seed=2)
    assert np.array_equal(library, pngs)
    grid = np.asarray(Image.open(tmp_path / "grid.png"))
    assert grid.shape == (2 + 3 * 18, 2 + 3 * 18, 3)             # 7 images, 3 columns (one class each), 2px padding
    assert np.array_equal(grid[2:18, 2:18], pngs[0]) and np.array_equal(grid[20:36, 2:18], pngs[3])
    out = capsys.readouterr().out
    assert summary["generated"] == 7 and "done: 7 images sampled" in out and "img/s" in out
    # chunks of 3, 3 and 1 images: the first also warms up, and the rate of the other 4 is reported beside it
    others_s = summary["token_s"] + summary["decode_s"] - summary["first_chunk_s"]
    assert 0 < summary["first_chunk_s"] and 0 < others_s
    assert abs(summary["steady_images_per_s"] - 4 / others_s) < 1e-6 * summary["steady_images_per_s"]
    assert f"the first chunk, which also warms up, took {summary['first_chunk_s']:.1f} s" in out


def test_skip_existing_regenerates_nothing_that_exists_and_resumes_to_the_uninterrupted_folder(ckpts, tmp_path):
    common = ("--ckpt", ckpts["none"], "--batch-size", 4, "--seed", 1, "--grid", "none")
    run_sample(*common, "--n", 10, "--out-dir", tmp_path / "full")
    full = folder_images(tmp_path / "full", 10)
    # Interrupted after 6 images: chunk [0, 4) is complete, chunk [4, 8) has two of its four PNGs.
    run_sample(*common, "--n", 6, "--out-dir", tmp_path / "resumed")
    first_chunk = [tmp_path / "resumed" / f"{i:06d}.png" for i in range(4)]
    before = [(os.stat(f).st_ino, os.stat(f).st_mtime_ns) for f in first_chunk]
    summary = run_sample(*common, "--n", 10, "--out-dir", tmp_path / "resumed", "--skip-existing", "--npz", tmp_path / "r.npz")
    assert (summary["skipped"], summary["generated"]) == (4, 6)
    assert [(os.stat(f).st_ino, os.stat(f).st_mtime_ns) for f in first_chunk] == before    # not rewritten
    assert np.array_equal(folder_images(tmp_path / "resumed", 10), full)
    assert np.array_equal(npz_images(tmp_path / "r.npz")["images"], full)       # skipped chunks read back
    again = run_sample(*common, "--n", 10, "--out-dir", tmp_path / "resumed", "--skip-existing")
    assert (again["skipped"], again["generated"]) == (10, 0)


def test_skip_existing_refuses_a_folder_sampled_with_other_settings(ckpts, tmp_path, capsys):
    run_sample("--ckpt", ckpts["none"], "--n", 2, "--grid", "none", "--out-dir", tmp_path / "png")
    with pytest.raises(SystemExit) as exit_info:
        run_main(sample.main, ["--device", "cpu", "--ckpt", ckpts["none"], "--n", "4", "--seed", "9", "--grid", "none",
                               "--out-dir", str(tmp_path / "png"), "--skip-existing"])
    assert exit_info.value.code == 2 and "seed differ" in capsys.readouterr().err


def test_show_positions_writes_a_second_grid_with_cells_without_code_dimmed(ckpts, tmp_path):
    summary = run_sample("--ckpt", ckpts["none"], "--n", 4, "--grid", tmp_path / "g.png", "--show-positions")
    assert summary["positions_grid"] == str(tmp_path / "g_positions.png")
    plain, marked = np.asarray(Image.open(tmp_path / "g.png")), np.asarray(Image.open(tmp_path / "g_positions.png"))
    assert plain.shape == marked.shape == (2 + 2 * 18, 2 + 2 * 18, 3)
    model, mq, _, _ = load_stackformer(ckpts["none"])
    images, positions = sample.sample_images(model, mq, 4, return_positions=True)
    expected = sample.image_grid(sample.mark_positions(images, positions, SP_GRID), 2)
    assert np.array_equal(marked, expected)
    # On a white image: the N kept cells (2×2 pixels each, f = 2) stay white, the rest is dimmed to 30 %.
    white = np.full((1, 16, 16, 3), 255, np.uint8)
    kept = sample.mark_positions(white, positions[:1], SP_GRID)
    assert (kept == 255).all(axis=-1).sum() == SP_N * 4 and (kept == 76).all(axis=-1).sum() == (SP_T - SP_N) * 4


def test_a_run_folder_as_ckpt_samples_from_its_ckpt_pt(tmp_path):
    write_checkpoint(tmp_path / "ckpt.pt")
    summary = run_sample("--ckpt", tmp_path, "--n", 2, "--batch-size", 2)
    assert summary["generated"] == 2 and summary["grid"] == str(tmp_path / "samples.png")
    (tmp_path / "no_run").mkdir()
    with pytest.raises(UserError, match="is a folder without a ckpt.pt"):
        run_sample("--ckpt", tmp_path / "no_run", "--n", 2)


def test_sample_usage_shows_ckpt_as_required(capsys):
    with pytest.raises(UserError, match="required: --ckpt"):
        sample.main(["--n", "2"])
    with pytest.raises(SystemExit):
        sample.main(["--help"])
    usage = capsys.readouterr().out.split("\n\n")[0]
    assert "--ckpt CKPT" in usage and "[--ckpt" not in usage


def test_default_grid_goes_next_to_the_checkpoint_only_for_small_n(tmp_path):
    ckpt = write_checkpoint(tmp_path / "ckpt.pt")
    summary = run_sample("--ckpt", ckpt, "--n", 2)
    assert summary["grid"] == str(tmp_path / "samples.png") and os.path.isfile(tmp_path / "samples.png")
    summary = run_sample("--ckpt", ckpt, "--n", 257, "--batch-size", 257, "--npz", tmp_path / "big.npz")
    assert summary["grid"] is None


# ---------------------------------------------------------------------------- bad input

def bad_cases(ckpts, tmp_path):
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(open(ckpts["none"], "rb").read()[:5000])
    stage1 = tmp_path / "mqvae.pt"
    mq_config = MQVAEConfig(**mqvae.PRESETS["tiny"], resolution=16)
    save_checkpoint(dict(kind="mqvae", mqvae_config=dataclasses.asdict(mq_config), mqvae=MQVAE(mq_config).state_dict()),
                    str(stage1))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    picture = tmp_path / "picture.png"
    Image.new("RGB", (4, 4)).save(picture)
    return [
        (["--ckpt", tmp_path / "missing.pt"], "checkpoint not found"),
        (["--ckpt", truncated], "cannot read checkpoint"),
        (["--ckpt", picture], "it is not a Stackformer (stage-2) checkpoint"),
        (["--ckpt", stage1], "is an MQ-VAE (stage-1) checkpoint"),
        (["--ckpt", ckpts["class"], "--class-id", 3], "class id 3 is out of range: this model has 3 classes, valid ids 0..2"),
        (["--ckpt", ckpts["class"], "--classes", "0,oval"], "unknown class 'oval'"),
        (["--ckpt", ckpts["none"], "--class-id", 0], "--class-id needs a class-conditional model, but this checkpoint is unconditional"),
        (["--ckpt", ckpts["text"], "--classes", "all"], "--classes needs a class-conditional model, but this checkpoint is text-conditional"),
        (["--ckpt", ckpts["class"], "--prompt", "a dog"], "--prompt needs a text-conditional model"),
        (["--ckpt", ckpts["none"], "--prompt", "a dog"], "--prompt needs a text-conditional model"),
        (["--ckpt", ckpts["text"]], "give --prompt TEXT or --prompts-file FILE"),
        (["--ckpt", ckpts["text"], "--prompts-file", tmp_path / "missing.txt"], "prompts file not found"),
        (["--ckpt", ckpts["text"], "--prompts-file", empty], "holds no prompts"),
        (["--ckpt", ckpts["none"], "--out-dir", a_file / "png"], "cannot write images to"),
        (["--ckpt", ckpts["none"], "--npz", a_file / "s.npz"], "cannot write the .npz to"),
        (["--ckpt", ckpts["none"], "--n", 0], "--n/--num-samples must be positive, got 0"),
        (["--ckpt", ckpts["none"], "--batch-size", -1], "--batch-size must be positive, got -1"),
        (["--ckpt", ckpts["none"], "--skip-existing"], "--skip-existing needs --out-dir"),
        (["--ckpt", ckpts["none"], "--grid", "none"], "nothing to write"),
        (["--ckpt", ckpts["none"], "--top-k", -1], "--top-k must be >= 0 (0 = off), got -1"),
        (["--ckpt", ckpts["none"], "--pos-temperature", 0], "--pos-temperature must be positive (greedy for argmax)"),
        (["--ckpt", ckpts["none"], "--position-rule", "random"], "--position-rule must be increasing or unique"),
        (["--ckpt", ckpts["none"], "--cfg-schedule", "cosine"], "--cfg-schedule must be constant or linear"),
    ]


def test_each_bad_input_is_one_error_line_with_exit_code_2_before_any_sampling(ckpts, tmp_path, capsys, monkeypatch):
    def no_sampling(*args, **kwargs):
        raise AssertionError("sampling started before the input was checked")
    monkeypatch.setattr(sample, "sample_chunk", no_sampling)
    for args, message in bad_cases(ckpts, tmp_path):
        with pytest.raises(SystemExit) as exit_info:
            run_main(sample.main, ["--device", "cpu", *map(str, args)])
        lines = capsys.readouterr().err.strip().splitlines()
        assert exit_info.value.code == 2, args
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (args, lines)
        assert "weights_only" not in lines[0]                    # torch's advice to load the file unsafely


def test_bad_input_from_the_shell_prints_no_traceback(ckpts, tmp_path):
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(open(ckpts["class"], "rb").read()[:5000])
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    for args in (["--ckpt", str(truncated)], ["--ckpt", ckpts["class"], "--class-id", "1000"]):
        result = subprocess.run([sys.executable, "sample.py", *args], cwd=HERE, env=env, capture_output=True, text=True)
        assert result.returncode == 2
        assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
        assert result.stderr.startswith("error: ")


# ---------------------------------------------------------------------------- several processes

def test_torchrun_ranks_write_the_same_npz_pngs_and_grids_as_one_process(ckpts, tmp_path):
    # 10 images in chunks of 3: rank 0 samples [0, 3) and [6, 9), rank 1 [3, 6) and [9, 10).
    common = ["--ckpt", ckpts["class"], "--num-samples", "10", "--batch-size", "3", "--show-positions"]
    run_sample(*common, "--npz", tmp_path / "one.npz", "--grid", tmp_path / "one.png")
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "sample.py", *common, "--npz", str(tmp_path / "two.npz"), "--grid", str(tmp_path / "two.png"),
                             "--out-dir", str(tmp_path / "png")], cwd=HERE, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    one, two = npz_images(tmp_path / "one.npz"), npz_images(tmp_path / "two.npz")
    assert np.array_equal(one["images"], two["images"]) and two["labels"].tolist() == [0, 1, 2] * 3 + [0]
    assert np.array_equal(folder_images(tmp_path / "png", 10), one["images"])
    for name in ("", "_positions"):
        assert np.array_equal(np.asarray(Image.open(tmp_path / f"one{name}.png")),
                              np.asarray(Image.open(tmp_path / f"two{name}.png")))
    assert not [f for f in os.listdir(tmp_path) if ".part" in f or f.endswith(".tmp")]   # parts merged and removed


# -----------------------------------------------------------------------------
# data.py export and bench.py

def test_data_export_writes_the_eval_images_as_uint8(tmp_path):
    path = str(tmp_path / "ref.npz")
    data.main(["shapes", "--size", "16", "--split", "val", "--n", "5", "--npz", path])
    images = np.load(path)["images"]
    assert images.shape == (5, 16, 16, 3) and images.dtype == np.uint8
    expected = ((data.ShapesDataset(16, 64, "val")[3]["image"].permute(1, 2, 0) + 1) * 127.5).round().byte().numpy()
    assert np.array_equal(images[3], expected)


def test_every_script_help_lists_its_flags_with_their_comments(capsys):
    for module, config in ((train_mqvae, train_mqvae.TrainConfig), (train_stackformer, train_stackformer.TrainConfig),
                           (sample, sample.SampleConfig)):
        text = utils.config_to_parser(config(), "x").format_help()
        comments = utils.field_comments(config)
        assert len(comments) == len(dataclasses.fields(config))      # every field documented
        assert "--batch-size" in text and comments["batch_size"].split()[0] in text
    with pytest.raises(SystemExit):
        sample.parse_config(["--help"])                              # sample.py's flags include the sampling settings
    text = " ".join(capsys.readouterr().out.split())
    comments = utils.field_comments(SamplingConfig)
    assert len(comments) == len(dataclasses.fields(SamplingConfig)) == 11
    assert all(f"--{name.replace('_', '-')}" in text and " ".join(comment.split()[:3]) in text
               for name, comment in comments.items())


def test_every_script_answers_help_and_flag_errors_without_loading_heavy_libraries(capsys, monkeypatch):
    """--help and a bogus flag for every script, run as __main__ in this process; and fid.py in a fresh
    interpreter answers both before it imports torch or scipy (seconds on a small CPU)."""
    scripts = {  # script: the arguments it requires, so that the bogus flag is the only error
        "train_mqvae.py": [], "train_stackformer.py": [], "sample.py": ["--ckpt", "x"], "fid.py": ["a", "b"],
        "data.py": ["shapes", "--npz", "x.npz"], "bench.py": [], "experiments/photos.py": ["--source", "x"],
        "docs/class_consistency.py": ["--ckpt", "x"], "docs/caption_consistency.py": ["--ckpt", "x"],
        **{f"experiments/{name}.py": [] for name in ("all", "equal_length", "fig1", "fig2", "table1", "table3")},
    }
    import runpy
    for script, required in scripts.items():
        path = os.path.join(HERE, script)
        monkeypatch.syspath_prepend(os.path.dirname(path))     # as `python script` does
        for args, code, expected in ((["--help"], 0, "usage"), (required + ["--no-such-flag"], 2, "--no-such-flag")):
            monkeypatch.setattr(sys, "argv", [script] + args)
            with pytest.raises(SystemExit) as stop:
                runpy.run_path(path, run_name="__main__")
            out = capsys.readouterr()
            assert stop.value.code == code and expected in (out.out + out.err).lower(), (script, args, out.err[-500:])
    probe = ("import runpy, sys\n"
             "sys.argv = ['fid.py'] + sys.argv[1:]\n"
             "try:\n"
             "    runpy.run_path('fid.py', run_name='__main__')\n"
             "finally:\n"
             "    print(sorted({'numpy', 'scipy', 'torch', 'torchvision'} & set(sys.modules)))\n")
    for args, code in ((["--help"], 0), (["a", "b", "--no-such-flag"], 2)):
        r = run_script(["-c", probe, *args])
        assert r.returncode == code and r.stdout.splitlines()[-1] == "[]", (args, r.stdout[-300:], r.stderr[-500:])


def test_caption_judge_finds_the_colours_an_image_shows():
    sys.path.insert(0, os.path.join(HERE, "docs"))
    import caption_consistency as cc
    image = np.full((20, 20, 3), 128, np.uint8)
    image[2:6, 2:6] = data.COLORS["red"]                      # 16 of 400 pixels: 4%
    image[10, 10] = data.COLORS["blue"]                       # 1 pixel: 0.25%
    image[12:14, 12:14] = np.array(data.COLORS["green"]) + 40  # 4%, but 40 off per channel
    judge = dict(tolerance=32, min_share=0.02)
    assert cc.shown_colours(image, ["red", "blue", "green", "yellow"], **judge) == [True, False, False, False]
    assert cc.shown_colours(image, ["green"], tolerance=48, min_share=0.01) == [True]
    assert cc.share_shown([image, image], [["red"], ["red", "blue", "white"]], **judge) == 0.5


def test_the_guidance_measurement_scripts_run_and_write_their_figures(ckpts, tmp_path):
    """docs/class_consistency.py and docs/caption_consistency.py on tiny checkpoints (scale 1: they have no null
    condition), so that the scripts behind docs/findings.md keep running as the code changes."""
    runs = [("class_consistency.py", ckpts["class"], ["--steps", "5", "--train-images", "64", "--val-images", "32",
                                                      "--grid", str(tmp_path / "c.png")]),
            ("caption_consistency.py", ckpts["text"], [])]
    for script, ckpt, extra in runs:
        out = tmp_path / f"{script}.json"
        r = run_script([os.path.join("docs", script), "--ckpt", ckpt, "--scales", "1", "--n", "6", "--batch-size", "3",
                        "--device", "cpu", "--json", str(out), *extra])
        assert r.returncode == 0, r.stderr[-2000:]
        result = json.load(open(out))
        assert list(result["scales"]) == ["1"] and result["n"] == 6
        assert all(0.0 <= v <= 1.0 for k, v in result.items() if isinstance(v, float))
    assert os.path.getsize(tmp_path / "c.png") > 0


def test_bench_cpu_smoke_runs_every_case(tmp_path):
    path = str(tmp_path / "bench.json")
    results = bench.main(["--cpu-smoke", "--json", path])
    saved = json.load(open(path))
    for key in ("mqvae_step_b2_eager", "mqvae_component_shares_b8_eager", "masking_cost_b2_eager",
                "stackformer_train_L16_b2_eager", "sampling_b2_kv", "sampling_b2_no-cache", "sampling_b2_kv_class_cfg1",
                "sampling_b2_kv_class_cfg2", "sampling_b2_kv_decoded_eager", "fid_features_b200"):
        assert key in saved and key in results
    assert saved["sampling_paths_agree"] is True                 # unconditional and guided, fp32
    assert saved["mqvae_step_b2_eager"]["images_per_s"] > 0
    cost = saved["masking_cost_b2_eager"]
    assert abs(cost["overhead"] - cost["masker_none"]["images_per_s"] / cost["masked"]["images_per_s"]) < 1e-9
    assert abs(sum(v["share"] for v in saved["mqvae_component_shares_b8_eager"].values()) - 1.0) < 1e-6


def test_bench_ddp_case_runs_under_torchrun_and_reports_scaling(tmp_path):
    path = tmp_path / "ddp.json"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "bench.py", "--ddp", "--cpu-smoke", "--json", str(path)],
                            cwd=HERE, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    saved = json.load(open(path))
    assert saved["world_size"] == 2
    rows = [v for v in saved.values() if isinstance(v, dict) and "scaling" in v]
    assert saved["one_gpu_modes"] == saved["ddp_modes"] == dict(mqvae=None, stackformer=None)     # CPU: eager
    assert len(rows) == 3 and all(r["one_gpu"] > 0 and r["all_gpus"] > 0 for r in rows)
    assert all(abs(r["scaling"] - r["all_gpus"] / r["one_gpu"]) < 1e-9 and abs(r["efficiency"] - r["scaling"] / 2) < 1e-9
               for r in rows)
    assert result.stdout.count("\n6 ") + result.stdout.startswith("6 ") == 3     # rank 0 prints each row once


def test_bench_ddp_needs_torchrun(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(utils.UserError, match="torchrun"):
        bench.main(["--ddp", "--cpu-smoke"])


# -----------------------------------------------------------------------------
# torch.compile: on by default on CUDA; a compile that fails falls back to eager and loses nothing

def failing_backend(graph_module, example_inputs):
    raise RuntimeError("no working C compiler (a test backend that always fails)")


@pytest.fixture
def compile_fails(monkeypatch):
    """The scripts compile on the CPU too, through a backend that always fails (as a missing compiler would)."""
    monkeypatch.setattr(utils, "COMPILE_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(utils, "COMPILE_BACKEND", failing_backend)
    yield
    torch.compiler.reset()


def test_stage1_compile_failure_says_so_once_and_trains_the_same_weights_as_eager(compile_fails, tmp_path, capsys):
    # random masker: the repeated step must draw what the failed attempt drew; grad-accum 2: every micro-batch
    args = TINY_TRAIN[1:] + ["--max-steps", "3", "--grad-accum", "2", "--masker", "random", "--eval-every", "2"]
    train_mqvae.main(args + ["--out-dir", str(tmp_path / "compiled")])
    out = capsys.readouterr().out
    assert out.count("torch.compile failed (BackendCompilerFailed") == 1 and "continuing eager" in out
    assert "torch.compile: the first step took" in out and "step 1/3" in out and "step 3/3" in out
    assert not utils.is_compiled(utils.load_mqvae(str(tmp_path / "compiled" / "ckpt.pt")))
    train_mqvae.main(args + ["--no-compile", "--out-dir", str(tmp_path / "eager")])
    assert "torch.compile failed" not in capsys.readouterr().out
    a, b = (torch.load(tmp_path / name / "ckpt.pt", weights_only=True) for name in ("compiled", "eager"))
    for key in ("mqvae", "disc"):
        assert a[key].keys() == b[key].keys() and all(torch.equal(a[key][k], b[key][k]) for k in a[key])
    losses = lambda name: [r["loss"] for r in read_jsonl(tmp_path / name / "log.jsonl") if "loss" in r]
    assert losses("compiled") == losses("eager") and len(losses("eager")) == 3


def test_stage2_compile_failure_says_so_once_and_trains_the_same_weights_as_eager(compile_fails, stage1_ckpt,
                                                                                  tmp_path, capsys):
    for name, extra in (("compiled", []), ("eager", ["--no-compile"])):
        train_stackformer.main(stage2_args(stage1_ckpt, tmp_path / name, "--max-steps", "2", "--grad-accum", "2",
                                           *extra))
        out = capsys.readouterr().out
        assert out.count("torch.compile failed (BackendCompilerFailed") == (name == "compiled")
    a, b = (torch.load(tmp_path / name / "ckpt.pt", weights_only=True)["model"] for name in ("compiled", "eager"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sampling_decodes_eager_when_compiling_the_decoder_fails(compile_fails, ckpts, tmp_path, capsys):
    common = ["--ckpt", ckpts["none"], "--n", 3, "--batch-size", 3, "--grid", "none"]
    run_sample(*common, "--npz", tmp_path / "compiled.npz")
    assert capsys.readouterr().out.count("torch.compile failed") == 1
    run_sample(*common, "--no-compile", "--npz", tmp_path / "eager.npz")
    a, b = (npz_images(tmp_path / f"{name}.npz")["images"] for name in ("compiled", "eager"))
    assert a.shape == (3, 16, 16, 3) and np.array_equal(a, b)


def test_compile_failure_under_torchrun_falls_back_on_both_ranks_and_keeps_them_identical(tmp_path):
    script = tmp_path / "train_mqvae_failing_compile.py"
    script.write_text(f"""import runpy, sys
sys.path.insert(0, {HERE!r})
import utils
def fail(graph_module, example_inputs):
    raise RuntimeError("no working C compiler (a test backend that always fails)")
utils.COMPILE_DEVICES, utils.COMPILE_BACKEND = ("cuda", "cpu"), fail
runpy.run_path({os.path.join(HERE, "train_mqvae.py")!r}, run_name="__main__")
""")
    r = run_script(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)] + TINY_TRAIN[1:] +
                   ["--max-steps", "2", "--out-dir", str(tmp_path / "ddp")])
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("torch.compile failed (BackendCompilerFailed") == 1 and "identical across 2 ranks" in r.stdout


def test_compile_is_on_by_default_on_cuda_only_and_off_with_no_compile():
    for module in (train_mqvae, train_stackformer, sample):
        config = module.TrainConfig() if module is not sample else sample.SampleConfig(ckpt="x")
        assert config.compile is True
    assert utils.compiles_on("cuda") and utils.compiles_on(torch.device("cuda", 1)) and not utils.compiles_on("cpu")
    assert train_mqvae.compile_mode_for("auto", 1) == train_mqvae.compile_mode_for("auto", 8) == "reduce-overhead"
    assert train_stackformer.compile_mode_for("auto", 1) == "reduce-overhead"
    assert train_stackformer.compile_mode_for("auto", 2) == "default"
    assert train_stackformer.compile_mode_for("max-autotune", 1) == "max-autotune"
    model = MQVAE(tiny_config())
    encoder, decoder = model.encoder, model.decoder
    model.encoder, model.decoder = torch.compile(model.encoder), torch.compile(model.decoder)
    assert utils.is_compiled(model) and utils.uncompile(model) is model
    assert model.encoder is encoder and model.decoder is decoder and not utils.is_compiled(model)


# -----------------------------------------------------------------------------
# Nothing lost: hostile files, failed writes, bad flags, kills

@pytest.fixture(scope="module")
def hostile_folder(tmp_path_factory):
    """400 ordinary images plus one of each kind of awkward file."""
    root = tmp_path_factory.mktemp("hostile")
    _write_images(root, 400, size=16)
    bad = {"zero.png": b"", "text.jpg": b"this is not a jpeg\n"}
    for name, content in bad.items():
        (root / name).write_bytes(content)
    good = root / "001.png"
    (root / "truncated.png").write_bytes(good.read_bytes()[:60])
    Image.new("L", (10000, 9000)).save(root / "bomb.png")                 # beyond PIL's decompression-bomb limit
    Image.new("RGB", (1, 1), (200, 10, 10)).save(root / "tiny1x1.png")     # loads, upscaled
    Image.fromarray(np.full((20, 20), 40000, dtype=np.uint16)).save(root / "gray16.png")
    Image.new("CMYK", (20, 20), (0, 255, 0, 0)).save(root / "cmyk.jpg")
    return root, ["zero.png", "text.jpg", "truncated.png", "bomb.png"], ["tiny1x1.png", "gray16.png", "cmyk.jpg"]


def test_each_hostile_file_is_loaded_or_skipped_with_its_index(hostile_folder):
    root, unreadable, readable = hostile_folder
    ds = data.ImageFiles(data.list_images(str(root)), 16, "eval")
    for name in unreadable + readable:
        index = ds.files.index(str(root / name))
        item = ds[index]
        assert item["image"].shape == (3, 16, 16) and torch.isfinite(item["image"]).all()
        if name in unreadable:
            assert item["bad"] == index and item["index"] != index, name
        else:
            assert item["bad"] == -1 and item["index"] == index, name
    red = ds[ds.files.index(str(root / "tiny1x1.png"))]["image"]
    assert red[0].min() > 0.5 and red[1].max() < -0.8       # the 1x1 red pixel fills the image


def test_training_proceeds_past_hostile_files_and_names_them(hostile_folder, tmp_path):
    root, unreadable, _ = hostile_folder
    r = run_script(TINY_TRAIN + ["--data", str(root), "--max-steps", "210", "--log-every", "100",
                                 "--eval-every", "1000", "--out-dir", str(tmp_path / "run")])
    assert r.returncode == 0, r.stderr[-2000:]
    named = [name for name in unreadable if name in r.stderr]
    assert len(named) >= 3, r.stderr                         # two epochs: each bad file met at least once, barring drop_last
    assert "Traceback" not in r.stderr


def test_a_corrupt_validation_file_is_reported_and_never_counted_twice(tmp_path):
    _write_images(tmp_path / "set" / "train", 24, size=16)
    _write_images(tmp_path / "set" / "val", 20, size=16, seed=1)
    broken = tmp_path / "set" / "val" / "010.png"             # image 10 of 20: its header reads, its pixels do not
    broken.write_bytes(broken.read_bytes()[:60])
    npz = tmp_path / "val.npz"
    r = run_script(["data.py", str(tmp_path / "set"), "--size", "16", "--npz", str(npz)])
    assert r.returncode == 0, r.stderr
    assert "010.png" in r.stderr and "1 unreadable files skipped" in r.stdout
    images = np.load(npz)["images"]
    assert len(images) == 19 and len({im.tobytes() for im in images}) == 19     # 19 readable, none twice
    out = tmp_path / "run"
    r = run_script(TINY_TRAIN + ["--data", str(tmp_path / "set"), "--max-steps", "2", "--eval-images", "100",
                                 "--out-dir", str(out)])
    assert r.returncode == 0, r.stderr
    assert "unreadable validation image" in r.stderr and "010.png" in r.stderr
    evals = [rec for rec in read_jsonl(out / "log.jsonl") if "val_psnr" in rec]
    assert evals[-1]["val_images"] == 19 and evals[-1]["val_skipped"] == 1


def test_too_many_unreadable_files_stop_training_with_a_clear_error(tmp_path):
    _write_images(tmp_path / "imgs", 20, size=16)
    for i in range(5):
        (tmp_path / "imgs" / f"broken{i}.png").write_bytes(b"")
    r = run_script(TINY_TRAIN + ["--data", str(tmp_path / "imgs"), "--max-steps", "20", "--out-dir", str(tmp_path / "o")])
    assert r.returncode == 2 and "could not be read (more than 1%)" in r.stderr and "Traceback" not in r.stderr


def test_failed_checkpoint_write_leaves_the_previous_checkpoint_loadable(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    utils.save_checkpoint(dict(kind="mqvae", step=1, w=torch.ones(10)), path)

    def dies_mid_write(obj, fh):
        fh.write(b"half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", dies_mid_write)
    with pytest.raises(OSError, match="No space"):
        utils.save_checkpoint(dict(kind="mqvae", step=2, w=torch.zeros(10)), path)
    monkeypatch.undo()
    ckpt = utils.load_checkpoint(path, "mqvae")
    assert ckpt["step"] == 1 and torch.equal(ckpt["w"], torch.ones(10))
    assert os.listdir(tmp_path) == ["ckpt.pt"]               # no temporary file left behind


@pytest.fixture(scope="module")
def both_checkpoints(tmp_path_factory, stage1_ckpt, labelled_folder):
    out = tmp_path_factory.mktemp("s2ckpt")
    train_stackformer.main(stage2_args(stage1_ckpt, out, "--data", str(labelled_folder / "imagenet" / "train"),
                                       "--max-steps", "1"))
    return stage1_ckpt, str(out / "ckpt.pt")


def test_every_script_rejects_bad_flags_with_one_line_and_no_traceback(both_checkpoints, tmp_path):
    stage1, stage2 = both_checkpoints
    missing = str(tmp_path / "missing")
    cases = [  # (script and arguments, text the error must contain)
        (TINY_TRAIN + ["--batch-size", "-4"], "--batch-size must be positive"),
        (TINY_TRAIN + ["--keep-ratio", "1.2"], "keep ratio"),
        (TINY_TRAIN + ["--data", "celeba"], "unknown dataset"),
        (TINY_TRAIN + ["--data", "ffhq", "--data-dir", missing], "not found"),
        (TINY_TRAIN + ["--image-size", "-16"], "--image-size must be positive"),
        (TINY_TRAIN + ["--compile", "--compile-mode", "graphs"], "--compile-mode"),
        (["train_stackformer.py", "--stage1", stage2], "Stackformer"),
        (["train_stackformer.py", "--stage1", missing], "not found"),
        (["train_stackformer.py", "--stage1", stage1, "--dropout", "1.5"], "--dropout"),
        (["train_stackformer.py", "--stage1", stage1, "--order", "random"], "--order"),
        (["train_stackformer.py", "--stage1", stage1, "--compile", "--compile-mode", "fast"], "--compile-mode"),
        (["sample.py", "--ckpt", stage1, "--device", "cpu"], "MQ-VAE"),
        (["sample.py", "--ckpt", missing, "--device", "cpu"], "not found"),
        (["sample.py", "--ckpt", stage2, "--n", "-3", "--device", "cpu"], "must be positive"),
        (["fid.py", missing, missing], "missing"),
        (["data.py", "shapes", "--size", "-1", "--npz", str(tmp_path / "x.npz")], "must be positive"),
        (TINY_TRAIN + ["--max-step", "5"], "did you mean --max-steps"),             # no abbreviations
        (TINY_TRAIN + ["--bach-size", "4"], "did you mean --batch-size"),           # a typo
        (TINY_TRAIN + ["--resume", "--overwrite"], "give one"),
        (TINY_TRAIN + ["--ckpt-minutes", "0"], "--ckpt-minutes must be positive"),
        (["train_stackformer.py", "--stage1", stage1, "--lrr", "1e-3"], "did you mean --lr"),
        (["sample.py", "--ckpt", stage2, "--temprature", "2"], "did you mean --temperature"),
        (["fid.py", missing, missing, "--batch", "5"], "did you mean --batch-size"),
        (["data.py", "shapes", "--sise", "3", "--npz", str(tmp_path / "x.npz")], "did you mean --size"),
        (["bench.py", "--case", "4"], "did you mean --cases"),
    ]
    assert len(cases) >= 25
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(2) as pool:     # each case is a process of its own; two at a time
        results = list(pool.map(lambda i: run_script(cases[i][0] + (["--out-dir", str(tmp_path / f"o{i}")]
                                                                   if cases[i][0][0].startswith("train") else [])),
                                range(len(cases))))
    for (args, expected), r in zip(cases, results):
        lines = [line for line in r.stderr.strip().splitlines() if line.strip()]
        assert r.returncode != 0, (args, r.stdout[-500:])
        assert "Traceback" not in r.stderr, (args, r.stderr[-1500:])
        assert expected.lower() in lines[-1].lower(), (args, lines[-3:])


def checkpoint_step(path, kind):
    """The step of the checkpoint at `path`, or 0 if there is none yet; every file found must load."""
    return utils.load_checkpoint(str(path), kind)["step"] if os.path.isfile(path) else 0


def kill_and_resume_until_done(args, out, kind, final_step, seed=0):
    """Start `args --resume` again and again and SIGKILL it at moments chosen from events the test sees,
    never from a clock, so that a machine of any speed gets the same kinds of kills:
      "step":  once the checkpoint on disk has reached a randomly drawn later step (a kill between steps);
      "write": once this run has saved at least once, as soon as a temporary checkpoint file appears
               (a kill in the middle of a checkpoint write, if the poll is quick enough to catch it);
      "start": right after starting, after a random fraction of the first checkpoint's wait (start-up).
    After every kill the checkpoint must load and its step never go backwards. Every "step" and "write"
    kill comes after at least one new checkpoint, so the runs always progress; the first kill is a
    "step" kill, so at least one kill happens however fast the machine is."""
    import random
    import signal
    import time
    rng = random.Random(seed)
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    ckpt = out / "ckpt.pt"
    last_step, kills, kinds = 0, 0, []

    def stat():
        try:
            return os.stat(ckpt).st_mtime_ns
        except FileNotFoundError:
            return None

    for attempt in range(45):                           # 1 + 2 start kills + at most 36 others + the last run
        remaining = final_step - last_step
        if attempt == 0:
            mode = "step"
        elif remaining <= 4:
            mode = "finish"                             # close to the end: let it run to completion
        else:
            mode = rng.choice(["step", "step", "write", "start"] if kinds.count("start") < 2 else ["step", "write"])
        target = last_step + rng.randint(1, min(8, remaining - 1)) if mode == "step" else None
        start_stamp = stat()
        proc = subprocess.Popen([sys.executable] + args + ["--out-dir", str(out), "--resume"], cwd=HERE, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        started = time.monotonic()
        polls_before_start_kill = rng.randint(0, 200)  # of 5 ms each: anywhere from exec to the first steps
        polls, saved_once, seen_stamp = 0, False, start_stamp
        while proc.poll() is None:
            time.sleep(0.005)
            polls += 1
            stamp = stat()
            if stamp != seen_stamp:                     # a new checkpoint was renamed into place
                seen_stamp, saved_once = stamp, True
                if mode == "step" and checkpoint_step(ckpt, kind) >= target:
                    break
            if mode == "write" and saved_once and os.path.exists(f"{ckpt}.tmp{proc.pid}"):   # atomic_path's name
                break
            if mode == "start" and polls >= polls_before_start_kill:
                break
        else:
            assert mode == "finish" or proc.returncode != 0 or kills >= 1, \
                f"the run finished before its {mode} kill ({time.monotonic() - started:.1f} s)"
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
            kinds.append(mode)
        stderr = proc.communicate()[1].decode(errors="replace")
        step = checkpoint_step(ckpt, kind)              # always loads
        assert step >= last_step, (step, last_step)
        last_step = step
        if proc.returncode == 0:
            break
        assert proc.returncode == -signal.SIGKILL, stderr[-2000:]   # only our kills may stop it
    assert proc.returncode == 0 and kills >= 1 and last_step == final_step, (proc.returncode, kills, last_step, kinds)
    return kinds


def test_sigkill_at_random_moments_never_loses_a_checkpoint_and_resume_matches(tmp_path):
    args = TINY_TRAIN + ["--max-steps", "40", "--ckpt-every", "1", "--log-every", "40", "--eval-every", "1000"]
    r = run_script(args + ["--out-dir", str(tmp_path / "full")])
    assert r.returncode == 0, r.stderr
    kill_and_resume_until_done(args, tmp_path / "killed", "mqvae", 40)
    full = torch.load(tmp_path / "full" / "ckpt.pt", weights_only=True)["mqvae"]
    resumed = torch.load(tmp_path / "killed" / "ckpt.pt", weights_only=True)["mqvae"]
    assert all(torch.equal(full[k], resumed[k]) for k in full)   # bitwise equal on CPU


def test_stage2_sigkill_at_random_moments_never_loses_a_checkpoint_and_resume_matches(stage1_ckpt, labelled_folder,
                                                                                      tmp_path):
    args = ["train_stackformer.py", "--stage1", stage1_ckpt, "--preset", "tiny", "--batch-size", "4", "--eval-every",
            "1000", "--num-workers", "0", "--data", str(labelled_folder / "imagenet" / "train"), "--max-steps", "60",
            "--ckpt-every", "1", "--log-every", "60"]
    r = run_script(args + ["--out-dir", str(tmp_path / "full")])
    assert r.returncode == 0, r.stderr
    kill_and_resume_until_done(args, tmp_path / "killed", "stackformer", 60, seed=1)
    full = torch.load(tmp_path / "full" / "ckpt.pt", weights_only=True)["model"]
    resumed = torch.load(tmp_path / "killed" / "ckpt.pt", weights_only=True)["model"]
    assert all(torch.equal(full[k], resumed[k]) for k in full)


def wait_for_log_steps(log_path, count, proc):
    """Block until log.jsonl holds `count` training lines (the event a test acts on), or the process ended."""
    import time
    while proc.poll() is None:
        if os.path.isfile(log_path) and sum('"loss"' in line for line in open(log_path)) >= count:
            return
        time.sleep(0.02)


def test_sigint_stops_after_the_step_with_a_checkpoint_and_resume_matches_an_uninterrupted_run(tmp_path):
    import signal
    args = TINY_TRAIN + ["--max-steps", "40", "--ckpt-every", "1000", "--eval-every", "1000"]
    full = run_script(args + ["--out-dir", str(tmp_path / "full")])
    assert full.returncode == 0, full.stderr
    out = tmp_path / "stopped"
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable] + args + ["--out-dir", str(out)], cwd=HERE, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for_log_steps(out / "log.jsonl", 5, proc)
    proc.send_signal(signal.SIGINT)                                  # Ctrl-C
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGINT and "Traceback" not in stderr, stderr[-2000:]
    assert "stopping after the current step" in stderr
    step = utils.load_checkpoint(str(out / "ckpt.pt"), "mqvae")["step"]
    assert 5 <= step < 40                                            # written at the step it stopped, not at 1000
    resume_line = stdout.strip().splitlines()[-1]
    assert f"stopped by SIGINT at step {step}" in resume_line and resume_line.endswith("--resume")
    r = run_script(resume_line.split("continue with: ")[1].split()[1:])   # the command it printed, minus "python"
    assert r.returncode == 0, r.stderr
    steps = [rec["step"] for rec in read_jsonl(out / "log.jsonl") if "loss" in rec]
    assert steps == list(range(1, 41))                               # every step logged once
    a = torch.load(tmp_path / "full" / "ckpt.pt", weights_only=True)["mqvae"]
    b = torch.load(out / "ckpt.pt", weights_only=True)["mqvae"]
    assert all(torch.equal(a[k], b[k]) for k in a)                   # bitwise equal on CPU


def test_a_second_signal_aborts_at_once_but_a_forwarded_repeat_does_not(monkeypatch):
    import signal
    now, exits = [100.0], []
    monkeypatch.setattr(utils.time, "monotonic", lambda: now[0])
    monkeypatch.setattr(utils.os, "_exit", exits.append)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        stop = utils.StopSignals()
        stop.handle(signal.SIGTERM, None)
        now[0] += 0.5
        stop.handle(signal.SIGINT, None)       # torchrun forwarding the terminal's Ctrl-C: the same request
        assert stop.requested == signal.SIGTERM and exits == []
        now[0] += 2.0
        stop.handle(signal.SIGINT, None)       # the user again: abort
        assert exits == [128 + signal.SIGINT]
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def test_resume_keeps_the_log_up_to_the_checkpoint_and_drops_a_line_cut_off_by_a_kill(tmp_path):
    import signal
    lines = [json.dumps(dict(step=s, loss=1.0)) + "\n" for s in (1, 2, 3, 4)] + ['{"step": 5, "lo']
    (tmp_path / "log.jsonl").write_text("".join(lines))
    cfg = train_mqvae.TrainConfig(out_dir=str(tmp_path))
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        utils.TrainingRun(cfg, str(tmp_path / "ckpt.pt"), True, 3, 10, 0, 1, torch.device("cpu"), "")
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    assert [rec["step"] for rec in read_jsonl(tmp_path / "log.jsonl")] == [1, 2, 3]


def test_log_lines_come_after_the_first_step_every_log_every_steps_and_at_least_every_30_seconds(tmp_path,
                                                                                                    monkeypatch):
    import signal
    now = [1000.0]
    monkeypatch.setattr(utils.time, "time", lambda: now[0])
    cfg = train_mqvae.TrainConfig(out_dir=str(tmp_path), log_every=50)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    logged = {}                                                     # step -> the time of its line
    try:
        run = utils.TrainingRun(cfg, str(tmp_path / "ckpt.pt"), False, 0, 200, 0, 1, torch.device("cpu"), "")
        for done in range(1, 201):
            step_s = 1.0 if done <= 100 else 12.0                   # fast steps, then slow ones
            now[0] += step_s
            run.step_times.append(step_s)
            if run.log_due(done):
                run.interval(done)
                logged[done] = now[0]
            run.after_step(done)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    steps = sorted(logged)
    assert steps[0] == 1 and {50, 100, 150, 200} <= set(steps)
    for a, b in zip(steps, steps[1:]):
        gap = logged[b] - logged[a]
        assert gap < utils.LOG_SECONDS + run.step_times[b - 1], (a, b)   # never silent much past 30 s
        assert gap >= utils.LOG_SECONDS or b % 50 == 0, (a, b)        # and no line the rules do not ask for
    assert steps[:5] == [1, 31, 50, 80, 100] and steps[5:8] == [103, 106, 109]   # 1 s steps, then 12 s ones


def test_training_logs_its_first_step_whatever_log_every_says(tmp_path):
    out = tmp_path / "run"
    r = run_script(TINY_TRAIN[:-8] + ["--log-every", "50", "--max-steps", "3", "--eval-images", "8", "--disc-start",
                                      "1", "--num-workers", "0", "--disc-layers", "2", "--perceptual-weight", "0",
                                      "--out-dir", str(out)])
    assert r.returncode == 0, r.stderr
    assert [rec["step"] for rec in read_jsonl(out / "log.jsonl") if "loss" in rec] == [1, 3]   # first, last
    assert r.stdout.count("step 1/3 ") == 1


def test_token_extraction_prints_progress_after_its_first_batch_and_at_least_every_30_seconds(monkeypatch, capsys):
    now = [0.0]
    monkeypatch.setattr(utils.time, "time", lambda: now[0])
    progress = train_stackformer.EncodingProgress("train", 640, 1, True)
    printed = []
    for batch in range(10):
        now[0] += 10.0                                              # 64 images every 10 s
        progress.update(64)
        printed.append(capsys.readouterr().out)
    assert [i for i, out in enumerate(printed) if out] == [0, 3, 6, 9]   # the first batch, then every 30 s
    assert "encoding train: 64/640 images (10%), 6.4 img/s, ETA 1.5 min" in printed[0]


def test_a_second_run_without_resume_leaves_the_checkpoint_untouched(tmp_path):
    out = str(tmp_path / "run")
    assert run_script(TINY_TRAIN + ["--max-steps", "3", "--out-dir", out]).returncode == 0
    before = open(os.path.join(out, "ckpt.pt"), "rb").read()
    log_before = open(os.path.join(out, "log.jsonl")).read()
    r = run_script(TINY_TRAIN + ["--max-steps", "1", "--out-dir", out])
    assert r.returncode == 2 and "--resume" in r.stderr and "--overwrite" in r.stderr and "Traceback" not in r.stderr
    assert open(os.path.join(out, "ckpt.pt"), "rb").read() == before
    assert open(os.path.join(out, "log.jsonl")).read() == log_before
    r = run_script(TINY_TRAIN + ["--max-steps", "1", "--out-dir", out, "--overwrite"])
    assert r.returncode == 0, r.stderr
    assert utils.load_checkpoint(os.path.join(out, "ckpt.pt"), "mqvae")["step"] == 1
    assert [rec["step"] for rec in read_jsonl(os.path.join(out, "log.jsonl")) if "loss" in rec] == [1]
    assert not os.path.exists(os.path.join(out, "recon_0000003.png"))       # the old run's pictures are gone


def test_sampling_and_fid_stats_refuse_to_overwrite_their_outputs_without_overwrite(both_checkpoints, tmp_path, capsys):
    _, stage2 = both_checkpoints
    grid, folder = str(tmp_path / "grid.png"), str(tmp_path / "pngs")
    args = ["--ckpt", stage2, "--device", "cpu", "--n", "4", "--batch-size", "4", "--grid", grid, "--out-dir", folder]
    sample.main(args)
    grid_bytes = open(grid, "rb").read()
    with pytest.raises(UserError, match="exists; give --overwrite"):
        sample.main(args + ["--seed", "1"])
    os.remove(grid)
    with pytest.raises(UserError, match="holds 4 sampled images already; --skip-existing .* --overwrite"):
        sample.main(args + ["--seed", "1"])
    sample.main(args + ["--seed", "1", "--overwrite"])
    assert open(grid, "rb").read() != grid_bytes                          # replaced: another seed
    stats = tmp_path / "stats.npz"
    fid.save_stats(stats, np.zeros(4), np.eye(4))
    before = stats.read_bytes()
    assert fid.main([folder, "--save-stats", str(stats), "--dims", "64"]) != 0 and stats.read_bytes() == before
    assert "stats.npz exists; give --overwrite" in capsys.readouterr().err


def test_sigterm_to_torchrun_stops_both_ranks_at_one_step_with_one_checkpoint(tmp_path):
    import signal
    out = tmp_path / "ddp"
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"] +
                            TINY_TRAIN + ["--max-steps", "100000", "--ckpt-every", "100000", "--out-dir", str(out)],
                            cwd=HERE, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    wait_for_log_steps(out / "log.jsonl", 3, proc)
    workers = subprocess.run(["ps", "-o", "pid=", "--ppid", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert len(workers) == 2
    proc.send_signal(signal.SIGTERM)                                 # the cluster preempts the job
    output = proc.communicate(timeout=180)[0]
    assert proc.returncode != 0
    stopped = re.findall(r"stopped by SIGTERM at step (\d+)", output)
    assert len(stopped) == 1, output[-3000:]                         # rank 0 reports the one step both stopped at
    ckpt = utils.load_checkpoint(str(out / "ckpt.pt"), "mqvae")
    assert ckpt["step"] == int(stopped[0]) >= 3 and len(ckpt["rng"]) == 2
    leftover = subprocess.run(["ps", "-o", "pid=", "-s", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert leftover == []                                            # no process of the job is left behind


def test_when_one_ddp_rank_dies_the_other_exits_within_a_timeout(tmp_path):
    import signal
    import time
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"] +
                            TINY_TRAIN + ["--max-steps", "100000", "--out-dir", str(tmp_path / "ddp")],
                            cwd=HERE, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    line = ""
    while "step" not in line or "/" not in line:       # wait until both ranks are training
        line = proc.stdout.readline()
        assert line or proc.poll() is None
    children = subprocess.run(["ps", "-o", "pid=", "--ppid", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert len(children) == 2
    os.kill(int(children[1]), signal.SIGKILL)          # one rank dies mid-training
    t0 = time.time()
    proc.communicate(timeout=120)
    assert proc.returncode != 0 and time.time() - t0 < 120
    assert subprocess.run(["ps", "-o", "pid=", "--ppid", str(proc.pid)], capture_output=True, text=True).stdout.strip() == ""


# -----------------------------------------------------------------------------
# The paper's experiments: the VQGAN baseline, the layer flags, the experiment scripts

def test_masker_none_is_vqgan_every_token_in_raster_order_and_no_mask_or_demask_weights():
    torch.manual_seed(0)
    cfg = MQVAEConfig(**{**PRESETS["tiny-f4"], "resolution": 16, "masker": "none", "keep_ratio": 1.0})
    model = MQVAE(cfg).eval()
    assert cfg.seq_len == cfg.num_tokens == 16
    assert not any(k.startswith(("mask.", "demask.")) for k in model.state_dict())
    assert {k.split(".")[0] for k in model.state_dict()} == {"encoder", "quant_conv", "quantizer", "decoder_input",
                                                             "decoder"}
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    codes, positions, scores = model.encode(x)
    assert codes.shape == (3, 16) and torch.equal(positions, torch.arange(16).expand(3, 16))
    assert torch.equal(scores, torch.ones(3, 4, 4))
    with torch.no_grad():
        forward = model(x)[0]
        perm = torch.randperm(16)
        shuffled = model.decode(codes[:, perm], positions[:, perm])
    assert torch.allclose(model.decode(codes, positions), forward, atol=1e-5)
    assert torch.allclose(shuffled, forward, atol=1e-5)
    with pytest.raises(ValueError, match="keep ratio must be 1"):
        MQVAEConfig(masker="none", keep_ratio=0.25)


def test_vqgan_and_mqvae_presets_at_equal_code_length():
    for mq, vq, size in (("demo", "demo-f8", 64), ("tiny", "tiny-f4", 16), ("f8", "f16", 256)):
        a = MQVAEConfig(**PRESETS[mq], resolution=size, keep_ratio=0.25)
        b = MQVAEConfig(**PRESETS[vq], resolution=size, keep_ratio=1.0, masker="none")
        assert b.downsample_factor == 2 * a.downsample_factor and a.seq_len == b.seq_len == b.num_tokens


def test_a_stackformer_on_vqgan_tokens_samples_every_position_in_raster_order():
    model = sf_model(num_positions=16, seq_len=16)
    codes, positions = model.generate(batch_size=4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(positions, torch.arange(16).expand(4, 16))


def test_code_and_position_layer_flags_override_the_preset():
    mcfg = tiny_config()
    cfg = train_stackformer.resolve_defaults(train_stackformer.TrainConfig(preset="demo", code_layers=3, pos_layers=5),
                                             dict(data="shapes"))
    scfg = train_stackformer.model_config(cfg, mcfg, None, None)
    assert (scfg.n_code_layers, scfg.n_pos_layers, scfg.n_embd) == (3, 5, stackformer.PRESETS["demo"]["n_embd"])
    default = train_stackformer.model_config(train_stackformer.resolve_defaults(
        train_stackformer.TrainConfig(preset="demo"), dict(data="shapes")), mcfg, None, None)
    assert (default.n_code_layers, default.n_pos_layers) == (4, 2)


def test_train_images_keeps_the_first_images_of_a_split(tmp_path):
    shapes = data.first_images(data.build_dataset("shapes", None, 16, "train"), 10)
    assert len(shapes) == 10
    folder = tmp_path / "images"
    _write_images(folder, 12)
    full = data.build_dataset(str(folder), None, 16, "train")
    cut = data.first_images(data.build_dataset(str(folder), None, 16, "train"), 5)
    assert cut.files == full.files[:5]


@pytest.mark.parametrize("better,other,expected", [([1.0, 1.1, 0.9], [2.0, 2.1, 1.9], "held"),
                                                   ([2.0, 2.1, 1.9], [1.0, 1.1, 0.9], "did not hold"),
                                                   ([1.0, 2.0, 3.0], [1.5, 2.5, 1.0], "not separable"),
                                                   ([1.0], [2.0, 3.0], "needs at least 2")])
def test_experiment_verdicts_follow_welchs_test(better, other, expected):
    sys.path.insert(0, os.path.join(HERE, "experiments"))
    import common
    assert expected in common.verdict(better, other, "x is lower")
    assert common.mean_std([1.0, 2.0, 3.0], 2) == "2.00 ± 1.00" and common.mean_std([float("nan")], 2) == "—"


def test_the_five_experiments_run_at_tiny_scale_and_a_script_rerun_skips_every_finished_run(fid_model, tmp_path):
    weights = tmp_path / "inception.pth"
    torch.save(fid_model.state_dict(), weights)
    runs, out = tmp_path / "runs", tmp_path / "out"
    common = ["--seeds", "1", "--runs", str(runs), "--fid-weights", str(weights)]
    r = run_script(["experiments/all.py", "--out", str(out)] + common, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    total = int(re.search(r"(\d+) runs, 0 done already", r.stdout).group(1))
    arms = {"equal_length": 2, "table1": 5, "table3": 4, "fig1": 5, "fig2": 3}
    pictures = {"equal_length": ["equal_length.png"], "fig1": ["fig1.png"],
                "fig2": ["fig2_keep0.25.png", "fig2_keep0.5.png", "fig2_keep0.75.png"]}
    r = run_script(["experiments/table3.py", "--out", str(tmp_path / "table3")] + common)   # one script on its own,
    assert r.returncode == 0, r.stderr[-3000:]                                             # on the same runs:
    assert re.search(r"(\d+) runs, \1 done already", r.stdout) and "\ndone " not in r.stdout   # nothing left to run
    for name, count in arms.items():
        for folder in [out / name] + ([tmp_path / name] if name == "table3" else []):
            table = (folder / "results.md").read_text()
            rows = [line for line in table.split("## Commands")[0].splitlines() if line.startswith("| ")][2:]
            assert len(rows) == count, table
            cells = [cell.strip() for row in rows for cell in row.strip("|").split("|")[1:]]
            numbers = [float(c) for c in cells if re.fullmatch(r"-?[\d.]+", c)]
            assert "—" not in cells and numbers and all(math.isfinite(v) for v in numbers), table
            assert all((folder / p).is_file() for p in pictures.get(name, []))
            assert "python train_mqvae.py" in table and ("python fid.py" in table or name == "fig1")
    analysed = np.load(next(runs.glob("s1-*-k0.25-seed1-analyse")) / "reconstructions.npz")["images"]
    assert analysed.shape == (16, 16, 16, 3) and analysed.dtype == np.uint8
    assert total == len(list(runs.glob("*/done.json")))
