"""
Supplementary Figure 1: training and validation curves (code loss, position loss) of the VQGAN baseline
and of the Stackformer settings of Table 3 (f=16, 50% mask ratio, FFHQ). The paper reads two things off
them: the importance-descending order's code and position losses are hard to converge while raster
order converges quickly, and the position loss drops very quickly. The Stackformer runs are Table 3's
(table3.py given the same --runs trains them once); the VQGAN baseline's Stackformer reads every token
of the VQGAN of equal_length.py, in raster order, so its position head has nothing to choose.

Writes fig1.png (rows: code loss, position loss; columns: training, validation; the mean over seeds,
the band from the lowest to the highest seed) and a table of the final losses.

    python experiments/fig1.py                              # tiny, CPU, minutes
    python experiments/fig1.py --scale small --seeds 3      # one GPU
"""

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import Study, mean_std, run_experiment, run_main, verdict, write_results  # noqa: E402
from table3 import ARMS, stage1_runs  # noqa: E402


def curves(study: Study, runs, key: str, evaluation: bool):
    """-> steps, (seeds, steps) values of `key` from the runs' log.jsonl (steps every run logged)."""
    logs = [{r["step"]: r[key] for r in study.log_records(run) if key in r} for run in runs]
    steps = sorted(set.intersection(*(set(log) for log in logs))) if logs and all(logs) else []
    return np.array(steps), np.array([[log[s] for s in steps] for log in logs])


def plot(study: Study, arms: dict, path: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), sharex=True)
    for row, (name, train_key, val_key) in enumerate((("code loss", "code_loss", "val_code_loss"),
                                                     ("position loss", "pos_loss", "val_pos_loss"))):
        for col, (key, what) in enumerate(((train_key, "training"), (val_key, "validation"))):
            ax = axes[row, col]
            for arm, runs in arms.items():
                steps, values = curves(study, runs, key, col == 1)
                if len(steps) == 0:
                    continue
                line, = ax.plot(steps, values.mean(0), label=arm)
                ax.fill_between(steps, values.min(0), values.max(0), color=line.get_color(), alpha=0.2)
            ax.set_title(f"{what} {name}")
            ax.set_xlabel("step")
            ax.set_ylabel("cross-entropy (nats)")
            ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    fig.suptitle(f"Stackformer losses, {study.data}, scale {study.scale.name}, {len(study.seeds)} seeds "
                 f"(line: mean, band: lowest to highest seed)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def build(study: Study) -> dict:
    stage1 = stage1_runs(study)
    arms = {"VQGAN baseline": [study.stage2(study.stage1(seed, vqgan=True), seed, fid=False) for seed in study.seeds]}
    arms.update({arm: [study.stage2(stage1[seed], seed, fid=False, **options) for seed in study.seeds]
                 for arm, (_, options) in ARMS.items()})
    return arms


def report(study: Study, arms: dict, out: str):
    final = {arm: [(study.last_eval(run, "val_code_loss"), study.last_eval(run, "code_loss")) for run in runs]
             for arm, runs in arms.items()}
    rows = []
    for arm, values in final.items():
        get = lambda i, key: [v[i].get(key, float("nan")) for v in values]
        rows.append([arm, mean_std(get(0, "val_code_loss"), 4), mean_std(get(0, "val_pos_loss"), 4),
                     mean_std(get(1, "code_loss"), 4), mean_std(get(1, "pos_loss"), 4)])
    val = lambda arm, key: [v[0].get(key, float("nan")) for v in final[arm]]
    notes = [verdict(val("Stackformer", "val_code_loss"), val("importance-descending order", "val_code_loss"),
                     "raster order ends at a lower validation code loss than the importance-descending order"),
             verdict(val("Stackformer", "val_pos_loss"), val("importance-descending order", "val_pos_loss"),
                     "raster order ends at a lower validation position loss than the importance-descending order"),
             "the VQGAN baseline reads every cell of its coarser grid in raster order: its position loss only has "
             "to learn that the next position is the next cell, and its code loss is per token of other sequences "
             "(all cells of a coarser grid, not half of a finer one), so neither compares directly with the others"]
    plot(study, arms, os.path.join(out, "fig1.png"))
    write_results(study, out, "Figure 1: training and validation curves",
                  ["arm", "final val code loss", "final val position loss", "last training code loss",
                   "last training position loss"], rows, arms, notes, ["fig1.png"])


def main(argv=None):
    return run_experiment("fig1", __doc__, build, report, argv)


if __name__ == "__main__":
    sys.exit(run_main(main))
