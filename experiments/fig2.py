"""
Supplementary Figure 2: samples of Stackformers trained on MQ-VAEs of different mask ratios (FFHQ). The
figure makes no quantitative claim; this script trains one MQ-VAE per keep ratio (25%, 50%, 75%, i.e.
mask ratios 75%, 50%, 25%) and a Stackformer on each, per seed, and reports what the ratio costs and
buys: codes per image, reconstruction (PSNR, rFID) and generation (FID, final validation losses).

Writes fig2_keep<k>.png, a sample grid per keep ratio (seed 1, the same sampling seed for every ratio).

    python experiments/fig2.py                              # tiny, CPU, minutes
    python experiments/fig2.py --scale small --seeds 3      # one GPU
"""

import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import Study, finish, mean_std, parse_args, run_main, write_results  # noqa: E402

KEEP_RATIOS = (0.25, 0.5, 0.75)


def main(argv=None):
    args = parse_args("fig2", __doc__.strip().split("\n\n")[0], argv)
    study = Study(args)
    stage1 = {(keep, seed): study.stage1(seed, keep_ratio=keep) for keep in KEEP_RATIOS for seed in study.seeds}
    stage2 = {key: study.stage2(run, key[1]) for key, run in stage1.items()}
    arms = {f"keep {keep:.0%} (mask {1 - keep:.0%})": [stage2[keep, seed] for seed in study.seeds]
            for keep in KEEP_RATIOS}
    failed = study.execute()
    from mqvae import PRESETS, MQVAEConfig
    rows, pictures = [], []
    for keep in KEEP_RATIOS:
        rec = [study.reconstruction_numbers(stage1[keep, seed]) for seed in study.seeds]
        gen = [study.generation_numbers(stage2[keep, seed]) for seed in study.seeds]
        c = MQVAEConfig(**PRESETS[study.scale.mqvae_preset], resolution=study.scale.image_size, keep_ratio=keep)
        rows.append([f"keep {keep:.0%} (mask {1 - keep:.0%})", f"{c.seq_len} of {c.num_tokens}",
                     mean_std([r["psnr"] for r in rec], 2), mean_std([r["rfid"] for r in rec], 2),
                     mean_std([g["fid"] for g in gen], 2), mean_std([g["code_loss"] for g in gen], 4),
                     mean_std([g["pos_loss"] for g in gen], 4)])
        grid = study.path(stage2[keep, study.seeds[0]].name + "-samples", "grid.png")
        if os.path.isfile(grid):
            name = f"fig2_keep{keep:g}.png"
            shutil.copyfile(grid, os.path.join(study.out, name))
            pictures.append(name)
    notes = [f"{', '.join(pictures)}: samples of seed {study.seeds[0]}'s Stackformer at each keep ratio"] if pictures else []
    write_results(study, "Figure 2: mask ratios", ["arm", "codes per image", "PSNR (dB)", "rFID", "FID",
                                                   "val code loss", "val position loss"], rows, arms, notes, pictures)
    return finish(study, failed)


if __name__ == "__main__":
    sys.exit(run_main(main))
