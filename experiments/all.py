"""
All five experiments side by side: one set of runs (the runs they share are run once), executed together
so that the GPU is never idle between scripts, then each script's results in OUT/<script>/results.md.

    python experiments/all.py                                      # tiny, CPU
    python experiments/all.py --scale small --seeds 3 --out experiments/out/shapes
    python experiments/all.py --scale small --seeds 3 --data data/photos64 --out experiments/out/photos
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import equal_length, fig1, fig2, table1, table3  # noqa: E402,E401
from common import Study, finish, parse_args, run_main  # noqa: E402

SCRIPTS = {"equal_length": equal_length, "table3": table3, "fig1": fig1, "table1": table1, "fig2": fig2}


def main(argv=None):
    args = parse_args("all", __doc__.strip().split("\n\n")[0], argv)
    study = Study(args)
    arms = {name: script.build(study) for name, script in SCRIPTS.items()}
    failed = study.execute()
    for name, script in SCRIPTS.items():
        out = os.path.join(args.out, name)
        os.makedirs(out, exist_ok=True)
        script.report(study, arms[name], out)
    return finish(failed)


if __name__ == "__main__":
    sys.exit(run_main(main))
