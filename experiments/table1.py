"""
Supplementary Table 1: the Stackformer's split of layers between the Code-Transformer and the
Position-Transformer. The paper (small version, 12+12 layers, FFHQ): FID 7.67 at 12+12, 8.32 without
6 code layers (6+12), 8.10 at 6+18, 7.74 without 6 position layers (12+6), 7.53 at 18+6; code layers
matter more than position layers. Here every depth is divided by the scale's divisor (small: 3, so
4+4, 2+4, 2+6, 4+2, 6+2; tiny: 6), on the tokens of one MQ-VAE per seed (keep 25%).

Measured: FID (sample.py, then fid.py against the training images; the same sample count for every
arm) and the final validation code and position losses.

    python experiments/table1.py                              # tiny, CPU, minutes
    python experiments/table1.py --scale small --seeds 3      # one GPU
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (GENERATION_HEADER, Study, generation_table, run_experiment, run_main, verdict,  # noqa: E402
                    write_results)

PAPER_DEPTHS = [(12, 12), (6, 12), (6, 18), (12, 6), (18, 6)]     # (code layers, position layers)
PAPER_FID = {(12, 12): 7.67, (6, 12): 8.32, (6, 18): 8.10, (12, 6): 7.74, (18, 6): 7.53}


def arm_name(study: Study, code: int, pos: int) -> str:
    divisor = study.scale.table1_divisor
    return (f"{max(1, code // divisor)} code + {max(1, pos // divisor)} position layers "
            f"(paper {code}+{pos}: FID {PAPER_FID[code, pos]})")


def build(study: Study) -> dict:
    stage1 = {seed: study.stage1(seed) for seed in study.seeds}
    divisor = study.scale.table1_divisor
    return {arm_name(study, code, pos): [study.stage2(stage1[seed], seed, depth=(max(1, code // divisor),
                                                                                   max(1, pos // divisor)))
                                         for seed in study.seeds] for code, pos in PAPER_DEPTHS}


def report(study: Study, arms: dict, out: str):
    numbers, rows = generation_table(study, arms)
    fid = lambda code, pos: [v["fid"] for v in numbers[arm_name(study, code, pos)]]
    notes = [verdict(fid(12, 12), fid(6, 12), "removing code layers (12+12 -> 6+12) raises the FID"),
             verdict(fid(12, 6), fid(6, 12), "removing position layers costs less than removing code layers "
                                             "(FID of 12+6 below 6+12)")]
    write_results(study, out, "Table 1: code layers against position layers",
                  GENERATION_HEADER, rows, arms, notes)


def main(argv=None):
    return run_experiment("table1", __doc__, build, report, argv)


if __name__ == "__main__":
    sys.exit(run_main(main))
