"""
The test suite: CPU only, no downloads, tiny shapes. Run with `python -m pytest test_all.py`.
Each test name states the property it checks.
"""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import data
import mqvae
import train_mqvae
from mqvae import MQVAE, PRESETS, MQVAEConfig, UserError

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
    z, positions, scores = mask(h)
    for b in range(3):  # the official code's loop, one sample at a time
        s = scores[b].flatten()
        order = torch.sort(s, descending=True).indices[:4]
        tokens = F.layer_norm(h[b].flatten(1).t(), (8,))
        expected = mask.pre_projection(tokens[order] * s[order, None])
        assert torch.equal(positions[b], order)
        torch.testing.assert_close(z[b], expected)


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
    vq(features, update_codebook=True)
    assert (vq.codebook[0] - 1.0).abs().sum() < (before[0] - 1.0).abs().sum()  # moved towards (1,1)
    torch.testing.assert_close(vq.codebook[3], torch.tensor([1.0, 1.0]), atol=1e-3, rtol=0)  # restarted from a feature
    assert vq.cluster_size[3] >= 1.0
    assert vq.cluster_size[1] == pytest.approx(5.0 * 0.99, rel=1e-6)


def test_quantizer_picks_nearest_code_and_eval_never_updates():
    torch.manual_seed(0)
    vq = mqvae.VectorQuantizer(tiny_config(codebook_size=16, codebook_dim=3))
    z = torch.randn(2, 7, 3)
    before = vq.codebook.clone()
    z_q, codes, _ = vq(z, update_codebook=False)
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
    mqvae.save_checkpoint(dict(kind="mqvae", mqvae_config=vars(model.config), mqvae=model.state_dict()), path)
    loaded = mqvae.load_mqvae(path)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    assert torch.equal(model(x)[0], loaded(x)[0])
    codes, positions, _ = model.encode(x)
    assert torch.equal(model.decode(codes, positions), loaded.decode(codes.flip(1), positions.flip(1)))


def test_checkpoint_loading_errors_are_one_line(tmp_path):
    missing = str(tmp_path / "nope.pt")
    with pytest.raises(UserError, match="not found"):
        mqvae.load_checkpoint(missing, "mqvae")
    truncated = tmp_path / "trunc.pt"
    torch.save(dict(kind="mqvae", w=torch.zeros(1000)), truncated)
    truncated.write_bytes(truncated.read_bytes()[:100])
    with pytest.raises(UserError, match="truncated"):
        mqvae.load_checkpoint(str(truncated), "mqvae")
    other = tmp_path / "stage2.pt"
    torch.save(dict(kind="stackformer"), other)
    with pytest.raises(UserError, match="Stackformer"):
        mqvae.load_checkpoint(str(other), "mqvae")


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
    with pytest.raises(UserError, match="keep ratio"):
        tiny_config(keep_ratio=1.5)
    with pytest.raises(UserError, match="keep ratio"):
        tiny_config(keep_ratio=0.0)
    with pytest.raises(UserError, match="not divisible"):
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
    with pytest.raises(UserError, match="FFHQ folder"):
        data.build_dataset("ffhq", str(tmp_path / "missing"), 16, "train")


# -----------------------------------------------------------------------------
# Stage 1: training script

TINY_TRAIN = ["train_mqvae.py", "--preset", "tiny", "--image-size", "16", "--batch-size", "4", "--log-every", "1",
              "--eval-images", "8", "--disc-start", "1", "--num-workers", "0", "--disc-layers", "2"]


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
    assert any("val_psnr" in r for r in records)
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["model"]["keep_ratio"] == 0.25 and config["train"]["preset"] == "tiny"
    ckpt = mqvae.load_checkpoint(os.path.join(out, "ckpt.pt"), "mqvae")
    assert {"mqvae", "disc", "opt_ae", "opt_disc", "step", "rng", "train_config", "mqvae_config"} <= set(ckpt)


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
    ckpt = mqvae.load_checkpoint(os.path.join(out, "ckpt.pt"), "mqvae")
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


def test_two_process_gloo_ddp_keeps_parameters_and_codebooks_identical(tmp_path):
    r = run_script(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"] + TINY_TRAIN +
                   ["--max-steps", "2", "--out-dir", str(tmp_path / "ddp")], timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "identical across 2 ranks" in r.stdout
    assert "global batch 8 (4 x 2 GPU" in r.stdout
