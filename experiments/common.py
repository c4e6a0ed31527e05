"""
What the experiment scripts share: the three scales, the commands of one arm's runs (built from the
project's own CLIs), a runner that executes them in parallel and skips what already finished, the
numbers read back from the runs, and the results table.

Every run is one command of train_mqvae.py, train_stackformer.py, sample.py, data.py or fid.py, with
its own folder under the runs folder (--runs, default OUT/runs). A run whose folder holds `done.json`
finished and is not run again, so a study that is cut off loses only the runs in flight, and two
scripts given the same --runs share the runs they have in common (table3.py and fig1.py train the same
stage-2 arms). A trainer cut off mid-run continues from its checkpoint (every trainer command carries
--resume, which starts from scratch when there is no checkpoint).
"""

import argparse
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from utils import FlagParser, UserError, run_main  # noqa: E402  (the project's flag parser and error type)


# -----------------------------------------------------------------------------
# Scales: what each command looks like at tiny (CPU, tests), small (one GPU, 64 px) and paper scale

@dataclass
class Scale:
    name: str
    image_size: int
    mqvae_preset: str           # MQ-VAE at keep 25%: N = T/4 codes
    vqgan_preset: str           # VQGAN one level deeper: T/4 tokens, the same code length
    table3_preset: str          # supp. Table 3's MQ-VAE: f=16 at 256 px, a 16x16 grid, half of it kept
    stage1_flags: List[str]     # train_mqvae.py flags besides data, preset, masker, keep ratio and seed
    stackformer_preset: str
    depth: tuple                # (code layers, position layers) of every stage-2 run but Table 1's
    table1_divisor: int         # Table 1's depths (12+12, 6+12, ...) divided by this
    stage2_flags: List[str]
    samples: int                # images per arm for FID (the same for every arm)
    reference_images: int       # training images in the FID reference statistics
    sample_flags: List[str]
    fid_flags: List[str]
    jobs: int                   # runs at a time
    torchrun: bool = False      # launch trainers and sample.py on every visible GPU
    default_data: str = "shapes"

    @property
    def launcher(self) -> str:
        return "torchrun" if self.torchrun else "python"


SCALES = {
    # CPU, seconds per run: the tests run every script at this scale
    "tiny": Scale("tiny", 16, "tiny", "tiny-f4", "tiny",
                  ["--image-size", "16", "--batch-size", "4", "--max-steps", "6", "--eval-every", "6",
                   "--eval-images", "16", "--disc-start", "3", "--disc-layers", "2", "--perceptual-weight", "0",
                   "--codebook-weight", "0.1", "--lr", "3e-4", "--warmup-epochs", "0", "--num-workers", "0",
                   "--train-images", "64", "--log-every", "2"],
                  "tiny", (2, 2), 6,
                  ["--batch-size", "8", "--max-steps", "6", "--eval-every", "6", "--eval-batches", "1",
                   "--num-samples", "2", "--num-workers", "0", "--views", "1", "--train-images", "64",
                   "--log-every", "1"],
                  samples=16, reference_images=32, sample_flags=["--batch-size", "16", "--device", "cpu"],
                  fid_flags=["--device", "cpu", "--batch-size", "16", "--num-workers", "0", "--no-progress", "--dims", "64"],
                  jobs=2),
    # one GPU, 64 px, all arms side by side: the demo recipe (no LPIPS, commitment weight 0.1, lr 3e-4)
    "small": Scale("small", 64, "demo", "demo-f8", "demo",
                   ["--image-size", "64", "--batch-size", "16", "--max-steps", "1000", "--eval-every", "500",
                    "--eval-images", "512", "--disc-start", "500", "--perceptual-weight", "0",
                    "--codebook-weight", "0.1", "--lr", "3e-4", "--warmup-epochs", "0.02", "--num-workers", "1",
                    "--log-every", "100"],
                   "demo", (4, 2), 3,
                   ["--batch-size", "128", "--lr", "1e-3", "--max-steps", "1000", "--eval-every", "100",
                    "--eval-batches", "8", "--num-samples", "16", "--num-workers", "1", "--views", "1",
                    "--log-every", "25"],
                   samples=1000, reference_images=5000, sample_flags=["--batch-size", "500"],
                   fid_flags=["--batch-size", "200", "--num-workers", "1", "--no-progress"], jobs=16),
    # the supplementary's recipe: FFHQ 256, the CLIs' defaults (150 + 100 epochs), every visible GPU
    "paper": Scale("paper", 256, "f8", "f16", "f16", [], "base", (18, 6), 1, [],
                   samples=50000, reference_images=70000, sample_flags=["--batch-size", "64"],
                   fid_flags=["--batch-size", "200"], jobs=1, torchrun=True, default_data="ffhq"),
}


# -----------------------------------------------------------------------------
# Runs

@dataclass
class Run:
    name: str                       # its folder under the runs folder
    argv: List[str]                 # script and flags
    needs: Sequence[str] = ()       # runs that must finish first
    launcher: str = "python"        # python | torchrun

    def command(self) -> str:
        prefix = ["torchrun", "--standalone", f"--nproc_per_node={gpu_count()}"] if self.launcher == "torchrun" else ["python"]
        return " ".join(shlex.quote(a) for a in prefix + self.argv)


def gpu_count() -> int:
    try:
        import torch
        return max(1, torch.cuda.device_count())
    except ImportError:
        return 1


class Study:
    """The runs of one script, keyed by name, and the shell to run them in."""

    def __init__(self, args):
        self.scale: Scale = SCALES[args.scale]
        self.data = args.data or self.scale.default_data
        self.data_dir = args.data_dir
        self.seeds = list(range(1, args.seeds + 1))
        self.runs_dir = args.runs or os.path.join(args.out, "runs")
        self.fid_weights = args.fid_weights
        self.jobs = args.jobs or self.scale.jobs
        self.runs: Dict[str, Run] = {}
        self.tag = re.sub(r"[^\w.-]+", "-", os.path.basename(os.path.normpath(self.data)))

    def path(self, *parts) -> str:
        return os.path.join(self.runs_dir, *parts)

    def add(self, run: Run) -> Run:
        self.runs.setdefault(run.name, run)
        return run

    def data_flags(self) -> List[str]:
        return ["--data", self.data] + (["--data-dir", self.data_dir] if self.data_dir else [])

    # --- the commands

    def stage1(self, seed: int, keep_ratio: float = 0.25, vqgan: bool = False, preset: Optional[str] = None) -> Run:
        """train_mqvae.py: the MQ-VAE at this keep ratio, or the VQGAN baseline at the same code length
        (one level deeper, every token kept); then --analyse on the validation images, whose inputs and
        reconstructions the rFID compares."""
        s = self.scale
        preset = preset or (s.vqgan_preset if vqgan else s.mqvae_preset)
        model = ["--preset", preset] + (["--masker", "none"] if vqgan else ["--keep-ratio", f"{keep_ratio:g}"])
        name = f"s1-{self.tag}-{preset}-" + ("vqgan" if vqgan else f"k{keep_ratio:g}") + f"-seed{seed}"
        out = self.path(name)
        train = self.add(Run(name, ["train_mqvae.py", *self.data_flags(), *model, *s.stage1_flags,
                                    "--seed", str(seed), "--out-dir", out, "--resume"],
                             launcher=s.launcher))
        analyse = self.add(Run(name + "-analyse", ["train_mqvae.py", "--analyse", os.path.join(out, "ckpt.pt"),
                                                   "--save-images", "--out-dir", self.path(name + "-analyse")]
                               + (["--data-dir", self.data_dir] if self.data_dir else []), needs=[train.name]))
        self.add(Run(name + "-rfid", ["fid.py", self.path(analyse.name, "inputs.npz"),
                                      self.path(analyse.name, "reconstructions.npz"), *self.fid_flags()],
                     needs=[analyse.name]))
        return train

    def stage2(self, stage1: Run, seed: int, depth: Optional[tuple] = None, order: str = "raster",
               variant: str = "code-first", abs_pos: bool = True, fid: bool = True) -> Run:
        """train_stackformer.py on a stage-1 run's tokens; then (fid) sample.py and fid.py against the
        reference statistics of the training images."""
        s = self.scale
        code, pos = depth or s.depth
        options = (["--order", order] if order != "raster" else []) + \
                  (["--variant", variant] if variant != "code-first" else []) + ([] if abs_pos else ["--no-abs-pos"])
        suffix = "".join(f"-{o.lstrip('-')}" for o in options if o.startswith("--")) + \
            "".join(f"-{o}" for o in options if not o.startswith("--"))
        name = f"s2-{stage1.name[3:]}-L{code}x{pos}{suffix}-seed{seed}"
        out = self.path(name)
        train = self.add(Run(name, ["train_stackformer.py", "--stage1", self.path(stage1.name, "ckpt.pt"),
                                    "--preset", s.stackformer_preset, "--code-layers", str(code),
                                    "--pos-layers", str(pos), *options, *s.stage2_flags, "--seed", str(seed),
                                    "--out-dir", out, "--resume"],
                             needs=[stage1.name], launcher=s.launcher))
        if fid:
            samples = self.add(Run(name + "-samples", ["sample.py", "--ckpt", os.path.join(out, "ckpt.pt"),
                                                       "--num-samples", str(s.samples), *s.sample_flags,
                                                       "--npz", self.path(name + "-samples", "samples.npz"),
                                                       "--grid", self.path(name + "-samples", "grid.png"),
                                                       "--overwrite"],
                                   needs=[train.name], launcher=s.launcher))
            reference = self.reference()
            self.add(Run(name + "-fid", ["fid.py", self.path(samples.name, "samples.npz"),
                                         self.path(reference.name, "stats.npz"), *self.fid_flags()],
                         needs=[samples.name, reference.name]))
        return train

    def reference(self) -> Run:
        """FID reference statistics: the first training images, resized and centre-cropped as the models see them."""
        s = self.scale
        name = f"reference-{self.tag}-{s.image_size}px-{s.reference_images}"
        images = self.add(Run(name + "-images", ["data.py", self.data, "--size", str(s.image_size), "--split", "train",
                                                 "--n", str(s.reference_images),
                                                 "--npz", self.path(name + "-images", "images.npz")]
                              + (["--data-dir", self.data_dir] if self.data_dir else [])))
        return self.add(Run(name, ["fid.py", self.path(images.name, "images.npz"), "--save-stats",
                                   self.path(name, "stats.npz"), "--overwrite", *self.fid_flags()],
                            needs=[images.name]))

    def fid_flags(self) -> List[str]:
        return list(self.scale.fid_flags) + (["--weights", self.fid_weights] if self.fid_weights else [])

    # --- running them

    def execute(self):
        """Run every run not done yet, up to --jobs at a time, each after the runs it needs. A failed run
        is reported with the end of its log and the runs that need it are left out; the others go on."""
        os.makedirs(os.path.join(self.runs_dir, "logs"), exist_ok=True)
        done = {name for name in self.runs if os.path.isfile(self.path(name, "done.json"))}
        failed, running = set(), {}
        pending = [name for name in self.runs if name not in done]
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        print(f"{len(self.runs)} runs, {len(done)} done already; up to {self.jobs} at a time; "
              f"logs in {os.path.join(self.runs_dir, 'logs')}", flush=True)
        def stop(signum, frame):    # SIGTERM (a job's time limit) as Ctrl-C: the runs in flight are stopped too
            raise KeyboardInterrupt
        signal.signal(signal.SIGTERM, stop)
        try:
            self._schedule(pending, running, done, failed, env)
        finally:    # interrupted: stop the runs in flight (trainers checkpoint on SIGTERM and resume next time)
            for proc, log, _ in running.values():
                proc.terminate()
            for proc, log, _ in running.values():
                proc.wait()
                log.close()
        return failed

    def _schedule(self, pending, running, done, failed, env):
        while pending or running:
            for name in list(pending):
                run = self.runs[name]
                if any(need in failed for need in run.needs):
                    pending.remove(name)
                    failed.add(name)
                    print(f"skipped {name}: a run it needs failed", flush=True)
                elif len(running) < self.jobs and all(need in done for need in run.needs):
                    pending.remove(name)
                    os.makedirs(self.path(name), exist_ok=True)
                    log = open(os.path.join(self.runs_dir, "logs", name + ".log"), "w")
                    argv = shlex.split(run.command())
                    argv[0] = sys.executable if argv[0] == "python" else argv[0]
                    running[name] = (subprocess.Popen(argv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env),
                                     log, time.time())
            time.sleep(0.2)
            for name, (proc, log, started) in list(running.items()):
                if proc.poll() is None:
                    continue
                log.close()
                del running[name]
                seconds = time.time() - started
                if proc.returncode == 0:
                    with open(self.path(name, "done.json"), "w") as fh:
                        json.dump(dict(command=self.runs[name].command(), seconds=seconds), fh)
                    done.add(name)
                    print(f"done {name} ({seconds:.0f} s)", flush=True)
                else:
                    failed.add(name)
                    tail = open(os.path.join(self.runs_dir, "logs", name + ".log")).read().strip().splitlines()[-5:]
                    print(f"FAILED {name} (exit {proc.returncode}):\n    " + "\n    ".join(tail), flush=True)

    # --- reading their numbers

    def log_records(self, run: Run) -> List[dict]:
        path = self.path(run.name, "log.jsonl")
        if not os.path.isfile(path):
            return []
        with open(path) as fh:
            return [json.loads(line) for line in fh if line.strip()]

    def last_eval(self, run: Run, key: str) -> dict:
        evals = [r for r in self.log_records(run) if key in r]
        return evals[-1] if evals else {}

    def fid(self, name: str) -> float:
        """The FID that fid.py printed in run `name`'s log, NaN if it did not finish."""
        path = os.path.join(self.runs_dir, "logs", name + ".log")
        found = re.findall(r"^FID: ([-\d.eE+naif]+)$", open(path).read(), re.M) if os.path.isfile(path) else []
        return float(found[-1]) if found else float("nan")

    def analysis(self, stage1: Run) -> dict:
        path = self.path(stage1.name + "-analyse", "mask_analysis.json")
        return json.load(open(path)) if os.path.isfile(path) else {}

    def reconstruction_numbers(self, stage1: Run) -> dict:
        a = self.analysis(stage1)
        numbers = dict(psnr=a.get("val_psnr", float("nan")), rfid=self.fid(stage1.name + "-rfid"),
                       codes_used=a.get("val_codes_used", float("nan")))
        for key, name in (("mask_lift", "lift"), ("mask_r_detail", "r_detail")):
            if key in a:
                numbers[name] = a[key]
        return numbers

    def generation_numbers(self, stage2: Run) -> dict:
        last = self.last_eval(stage2, "val_code_loss")
        return dict(fid=self.fid(stage2.name + "-fid"), code_loss=last.get("val_code_loss", float("nan")),
                    pos_loss=last.get("val_pos_loss", float("nan")))


# -----------------------------------------------------------------------------
# The results table

GENERATION_HEADER = ["arm", "FID", "val code loss", "val position loss"]


def generation_table(study: "Study", arms: Dict[str, List[Run]]):
    """-> ({arm: [generation numbers per seed]}, rows of GENERATION_HEADER) for arms of stage-2 runs."""
    numbers = {arm: [study.generation_numbers(run) for run in runs] for arm, runs in arms.items()}
    rows = [[arm] + [mean_std([v[key] for v in values], digits) for key, digits in
                     (("fid", 2), ("code_loss", 4), ("pos_loss", 4))] for arm, values in numbers.items()]
    return numbers, rows

def mean_std(values: Sequence[float], digits: int) -> str:
    values = [v for v in values if v is not None]
    if not values or any(np.isnan(v) for v in values):
        return "—"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{np.mean(values):.{digits}f} ± {np.std(values, ddof=1):.{digits}f}"


def verdict(expected_better: Sequence[float], other: Sequence[float], claim: str, higher_is_better=False) -> str:
    """`claim` says the first set of numbers is the better one. It held when Welch's t-test finds the difference
    at p < 0.05 in that direction, did not hold when it finds it in the other, and is otherwise not separable
    at this scale. The difference is given as better minus other."""
    import scipy.stats
    a, b = np.asarray(expected_better, dtype=float), np.asarray(other, dtype=float)
    if len(a) < 2 or len(b) < 2 or np.isnan(a).any() or np.isnan(b).any():
        return f"{claim}: needs at least 2 finished seeds on each side"
    if np.std(a) == 0 and np.std(b) == 0:
        p = 0.0 if np.mean(a) != np.mean(b) else 1.0
    else:
        p = float(scipy.stats.ttest_ind(a, b, equal_var=False).pvalue)
    difference = np.mean(a) - np.mean(b)
    right_way = difference > 0 if higher_is_better else difference < 0
    outcome = ("held" if right_way else "did not hold (the opposite was measured)") if p < 0.05 \
        else "not separable at this scale"
    return f"{claim}: **{outcome}** (difference of means {difference:+.4g}, Welch's t-test p = {p:.2g})"


def write_results(study: Study, out: str, title: str, header: List[str], rows: List[List[str]],
                  arms_runs: Dict[str, List[Run]], notes: Sequence[str] = (), pictures: Sequence[str] = ()) -> str:
    """out/results.md: the table (mean ± std over seeds), the verdicts and notes, the pictures (files in out),
    and the command of every run of every arm."""
    lines = [f"# {title}", "",
             f"Scale `{study.scale.name}`, data `{study.data}`, seeds {', '.join(map(str, study.seeds))}; "
             f"each cell is the mean ± the standard deviation over seeds (sample std, ddof 1).", "",
             "| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    lines += [""] + [f"- {note}" for note in notes] + ([""] if notes else [])
    lines += [f"![{os.path.splitext(p)[0]}]({p})" for p in pictures] + ([""] if pictures else [])
    lines += ["## Commands", "", "Run from the repository root; every folder is under the runs folder.", ""]
    for arm, runs in arms_runs.items():
        lines += [f"**{arm}**", "", "```"]
        names = []
        for run in runs:
            names += [name for name in closure(study, run.name) if name not in names]
        lines += [study.runs[name].command() for name in names] + ["```", ""]
    path = os.path.join(out, "results.md")
    with open(path + ".tmp", "w") as fh:
        fh.write("\n".join(lines))
    os.replace(path + ".tmp", path)
    print("\n".join(lines[:lines.index("## Commands")]).rstrip())
    print(f"wrote {path}")
    return path


def closure(study: Study, name: str) -> List[str]:
    """The run `name`, the runs that follow from it (its analyse, rFID, samples and FID runs: their names
    extend its own) and everything they need, in an order they can run in."""
    order = []

    def visit(n):
        for need in study.runs[n].needs:
            visit(need)
        if n not in order:
            order.append(n)

    for n in study.runs:
        if n == name or n.startswith(name + "-"):
            visit(n)
    return order


# -----------------------------------------------------------------------------
# The command line every script shares

def parse_args(name: str, description: str, argv=None, extra=None) -> argparse.Namespace:
    parser = FlagParser(description=description)
    parser.add_argument("--scale", default="tiny", choices=list(SCALES),
                        help="tiny: built-in shapes on a CPU, minutes; small: one GPU, 64 px; paper: the "
                             "supplementary's recipe on every visible GPU (default: tiny)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per arm (default: 3)")
    parser.add_argument("--data", default=None, help="shapes | ffhq | imagenet | coco | PATH (default: shapes; ffhq at paper scale)")
    parser.add_argument("--data-dir", default=None, help="root of ffhq/imagenet/coco (default: data/<name>)")
    parser.add_argument("--out", default=None, help=f"where results.md and the pictures go (default: experiments/out/{name})")
    parser.add_argument("--runs", default=None, help="the runs folder (default: OUT/runs); scripts given the same "
                                                     "one share the runs they have in common")
    parser.add_argument("--jobs", type=int, default=None, help="runs at a time (default: 2 tiny, 16 small, 1 paper)")
    parser.add_argument("--fid-weights", default=None, help="fid.py --weights: the FID Inception state dict "
                                                            "(default: fid.py's own search)")
    for flag, kwargs in (extra or {}).items():
        parser.add_argument(flag, **kwargs)
    args = parser.parse_args(argv)
    if args.seeds < 1 or (args.jobs is not None and args.jobs < 1):
        raise UserError("--seeds and --jobs must be positive")
    args.out = args.out or os.path.join(REPO, "experiments", "out", name)
    return args


def run_experiment(name: str, doc: str, build, report, argv=None) -> int:
    """What every script's main does: its runs (build(study) -> {arm: [runs, one per seed]}), run what is not
    done yet, then its results (report(study, arms, out)) in --out."""
    args = parse_args(name, doc.strip().split("\n\n")[0], argv)
    study = Study(args)
    arms = build(study)
    failed = study.execute()
    os.makedirs(args.out, exist_ok=True)
    report(study, arms, args.out)
    return finish(failed)


def finish(failed) -> int:
    if failed:
        print(f"{len(failed)} runs failed or were skipped: {', '.join(sorted(failed))}; the table shows — for "
              f"them. Fix the cause and rerun the same command: finished runs are kept.", file=sys.stderr)
        return 1
    return 0
