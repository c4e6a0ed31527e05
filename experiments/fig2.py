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
from common import Study, mean_std, run_experiment, run_main, write_results  # noqa: E402

KEEP_RATIOS = (0.25, 0.5, 0.75)


def arm_name(keep: float) -> str:
    return f"keep {keep:.0%} (mask {1 - keep:.0%})"


def build(study: Study) -> dict:
    return {arm_name(keep): [study.stage2(study.stage1(seed, keep_ratio=keep), seed) for seed in study.seeds]
            for keep in KEEP_RATIOS}


def report(study: Study, arms: dict, out: str):
    from mqvae import PRESETS, MQVAEConfig
    rows, pictures = [], []
    for keep in KEEP_RATIOS:
        runs = arms[arm_name(keep)]
        rec = [study.reconstruction_numbers(study.runs[run.needs[0]]) for run in runs]     # their stage-1 runs
        gen = [study.generation_numbers(run) for run in runs]
        c = MQVAEConfig(**PRESETS[study.scale.mqvae_preset], resolution=study.scale.image_size, keep_ratio=keep)
        rows.append([arm_name(keep), f"{c.seq_len} of {c.num_tokens}",
                     mean_std([r["psnr"] for r in rec], 2), mean_std([r["rfid"] for r in rec], 2),
                     mean_std([g["fid"] for g in gen], 2), mean_std([g["code_loss"] for g in gen], 4),
                     mean_std([g["pos_loss"] for g in gen], 4)])
        grid = study.path(runs[0].name + "-samples", "grid.png")
        if os.path.isfile(grid):
            name = f"fig2_keep{keep:g}.png"
            shutil.copyfile(grid, os.path.join(out, name))
            pictures.append(name)
    notes = [f"{', '.join(pictures)}: samples of seed {study.seeds[0]}'s Stackformer at each keep ratio"] if pictures else []
    write_results(study, out, "Figure 2: mask ratios", ["arm", "codes per image", "PSNR (dB)", "rFID", "FID",
                                                        "val code loss", "val position loss"], rows, arms, notes,
                  pictures)


def main(argv=None):
    return run_experiment("fig2", __doc__, build, report, argv)


if __name__ == "__main__":
    sys.exit(run_main(main))
