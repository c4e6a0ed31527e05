"""
Supplementary Table 3: ablations of the Stackformer on MQ-VAE tokens with f=16 and a 50% mask ratio
(L = 128 codes per image; FFHQ). The paper: Stackformer 8.36 FID; without the absolute sequence
embedding 8.53; trained on the importance-descending order instead of raster order 26.87;
Stackformer_r (position first, then code) 8.69. At small scale the MQ-VAE is f=4 at 64 px, the same
16x16 grid and L = 128; at tiny scale f=2 at 16 px (8x8, L = 32).

Measured: FID (the same sample count for every arm) and the final validation code and position losses.

    python experiments/table3.py                              # tiny, CPU, minutes
    python experiments/table3.py --scale small --seeds 3      # one GPU
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (GENERATION_HEADER, Study, generation_table, run_experiment, run_main, verdict,  # noqa: E402
                    write_results)

# arm -> (paper FID, train_stackformer.py options)
ARMS = {"Stackformer": (8.36, {}),
        "w/o absolute sequence embedding": (8.53, dict(abs_pos=False)),
        "importance-descending order": (26.87, dict(order="importance")),
        "Stackformer_r (position first)": (8.69, dict(variant="position-first"))}


def stage1_runs(study: Study) -> dict:
    """Table 3's MQ-VAE, keep 50%, one per seed (fig1.py trains its Stackformers on the same)."""
    return {seed: study.stage1(seed, keep_ratio=0.5, preset=study.scale.table3_preset) for seed in study.seeds}


def build(study: Study) -> dict:
    stage1 = stage1_runs(study)
    return {f"{arm} (paper FID {paper})": [study.stage2(stage1[seed], seed, **options) for seed in study.seeds]
            for arm, (paper, options) in ARMS.items()}


def report(study: Study, arms: dict, out: str):
    numbers, rows = generation_table(study, arms)
    fid = [[v["fid"] for v in values] for values in numbers.values()]     # in the order of ARMS
    notes = [verdict(fid[0], fid[2], "raster order gives a lower FID than the importance-descending order"),
             verdict(fid[0], fid[3], "Stackformer gives a lower FID than Stackformer_r"),
             verdict(fid[0], fid[1], "the absolute sequence embedding lowers the FID")]
    write_results(study, out, "Table 3: sequence order, Stackformer_r and the absolute sequence embedding",
                  GENERATION_HEADER, rows, arms, notes)


def main(argv=None):
    return run_experiment("table3", __doc__, build, report, argv)


if __name__ == "__main__":
    sys.exit(run_main(main))
