"""
The paper's central claim (main paper; supplementary Figs. 6-7): at the same code length, MQ-VAE, which
quantizes only the important quarter of a finer grid, reconstructs better than VQGAN, which quantizes
every token of a coarser grid. Paper scale: MQ-VAE f=8 keeping 25% of 32x32 against VQGAN f=16
(16x16), 256 codes each; small scale: f=4 keeping 25% of 16x16 against f=8 (8x8) at 64 px, 64 codes;
tiny: f=2 against f=4 at 16 px, 16 codes. Same encoder, quantizer, decoder, losses and recipe
(train_mqvae.py --masker none is the baseline).

Measured on the validation images: PSNR, rFID (fid.py between the reconstructions and their inputs),
the codes used, and on the shapes data the mask's lift (the share of kept tokens on the shapes over
chance), and the score's correlation with pixel detail (mask_r_detail). The picture: input | MQ-VAE's
importance map | MQ-VAE | VQGAN, the same images in each row.

    python experiments/equal_length.py                              # tiny, CPU, minutes
    python experiments/equal_length.py --scale small --seeds 3      # one GPU
    python experiments/equal_length.py --scale small --data data/photos64 --out experiments/out/photos/equal_length
"""

import os
import sys


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import Study, mean_std, run_experiment, run_main, verdict, write_results  # noqa: E402


def picture(study: Study, mqvae_run, vqgan_run, path: str, count: int = 8):
    """input | importance map (red high) | MQ-VAE | VQGAN for the first validation images, from seed 1's runs."""
    import torch
    import data
    import train_mqvae
    from utils import load_mqvae, save_grid
    mq = load_mqvae(study.path(mqvae_run.name, "ckpt.pt"))
    vq = load_mqvae(study.path(vqgan_run.name, "ckpt.pt"))
    val = data.build_dataset(study.data, study.data_dir, study.scale.image_size, "val")
    x = torch.stack([val[i]["image"] for i in range(min(count, len(val)))])
    with torch.no_grad():
        mq_rec, aux = mq(x)
        vq_rec, _ = vq(x)
    size = x.shape[-1]
    scores = aux["scores"].flatten(1)
    lo, hi = scores.min(1, keepdim=True).values, scores.max(1, keepdim=True).values
    norm = ((scores - lo) / (hi - lo + 1e-8)).view(len(x), 1, *aux["scores"].shape[1:])
    heat = torch.nn.functional.interpolate(train_mqvae.heat_colormap(norm), size=(size, size), mode="nearest")
    unit = lambda t: (t.float().clamp(-1, 1) + 1) / 2
    save_grid(torch.stack([unit(x), heat, unit(mq_rec), unit(vq_rec)], dim=1).flatten(0, 1), path, nrow=4)


MQVAE_ARM, VQGAN_ARM = "MQ-VAE (mask 75%)", "VQGAN (one level deeper, every token)"


def build(study: Study) -> dict:
    return {MQVAE_ARM: [study.stage1(seed) for seed in study.seeds],
            VQGAN_ARM: [study.stage1(seed, vqgan=True) for seed in study.seeds]}


def report(study: Study, arms: dict, out: str):
    from mqvae import PRESETS, MQVAEConfig
    numbers = {arm: [study.reconstruction_numbers(run) for run in runs] for arm, runs in arms.items()}
    scale = study.scale
    rows = []
    for arm, preset, keep in ((MQVAE_ARM, scale.mqvae_preset, 0.25), (VQGAN_ARM, scale.vqgan_preset, 1.0)):
        c = MQVAEConfig(**PRESETS[preset], resolution=scale.image_size, keep_ratio=keep,
                        masker="none" if keep == 1.0 else "adaptive")
        values = numbers[arm]
        column = lambda key, digits: mean_std([v.get(key, float("nan")) for v in values], digits)
        rows.append([arm, f"f={c.downsample_factor}, {c.grid_size}x{c.grid_size} grid, {c.seq_len}",
                     column("psnr", 2), column("rfid", 2), column("codes_used", 1),
                     column("lift", 2) if any("lift" in v for v in values) else "n/a",
                     column("r_detail", 2) if any("r_detail" in v for v in values) else "n/a"])
    mq, vq = numbers[MQVAE_ARM], numbers[VQGAN_ARM]
    notes = [verdict([v["rfid"] for v in mq], [v["rfid"] for v in vq], "MQ-VAE's rFID is lower than VQGAN's"),
             verdict([v["psnr"] for v in mq], [v["psnr"] for v in vq], "MQ-VAE's PSNR is higher than VQGAN's",
                     higher_is_better=True)]
    pictures = []
    mq1, vq1 = arms[MQVAE_ARM][0], arms[VQGAN_ARM][0]
    if all(os.path.isfile(study.path(r.name, "done.json")) for r in (mq1, vq1)):
        picture(study, mq1, vq1, os.path.join(out, "equal_length.png"))
        pictures.append("equal_length.png")
        notes.append(f"equal_length.png, seed {study.seeds[0]}: input | MQ-VAE's importance map (red high) | "
                     f"MQ-VAE | VQGAN")
    write_results(study, out, "Equal code length: MQ-VAE against VQGAN",
                  ["arm", "codes per image", "PSNR (dB)", "rFID", "codes used", "mask lift", "score vs detail r"],
                  rows, arms,
                  notes, pictures)


def main(argv=None):
    return run_experiment("equal_length", __doc__, build, report, argv)


if __name__ == "__main__":
    sys.exit(run_main(main))
