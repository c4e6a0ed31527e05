"""
What the scripts share and the models do not need: the user-error type, checkpoint files, DDP set-up,
config dataclass -> argparse, resuming, per-rank random streams, the NaN guard, the learning-rate
schedule and image files. Only the scripts import it; mqvae.py and stackformer.py import nothing
of the project.
"""

import argparse
import contextlib
import dataclasses
import difflib
import gc
import inspect
import json
import math
import os
import re
import shlex
import signal
import sys
import time
from typing import Optional

import torch
import torch.distributed as dist

from mqvae import MQVAE, MQVAEConfig
from stackformer import Stackformer, StackformerConfig, WordTokenizer


# -----------------------------------------------------------------------------
# Errors the user can fix: one line on stderr, exit status 2, no traceback

class UserError(Exception):
    """A problem with the user's input; scripts print it as one line and exit non-zero."""


def check(condition: bool, message: str):
    if not condition:
        raise UserError(message)


def check_positive(cfg, *names: str):
    """Each named config field, where set (not None), must be > 0; the error names the flag."""
    for name in names:
        value = getattr(cfg, name)
        check(value is None or value > 0, f"--{name.replace('_', '-')} must be positive, got {value}")



# -----------------------------------------------------------------------------
# torch.compile: on by default on CUDA, and never the end of a run

COMPILE_MODES = ("auto", "default", "reduce-overhead", "max-autotune")  # auto: what each trainer measured fastest
COMPILE_DEVICES = ("cuda",)     # where the scripts compile unless --no-compile; CPU runs stay eager
COMPILE_BACKEND = "inductor"    # torch.compile's backend (the tests put in one that fails)


def compiles_on(device) -> bool:
    return torch.device(device).type in COMPILE_DEVICES


def compile_module(module, mode: str = "default"):
    """torch.compile(module) with the project's backend; `mode` is inductor's."""
    if COMPILE_BACKEND == "inductor":
        return torch.compile(module, mode=mode)
    return torch.compile(module, backend=COMPILE_BACKEND)


def _optimized_module_class():
    """torch.compile's wrapper class, or None while nothing was compiled (its module is not imported yet)."""
    return getattr(sys.modules.get("torch._dynamo.eval_frame"), "OptimizedModule", None)


def uncompile(module):
    """The module without torch.compile's wrappers: a compiled module gives back its original, and compiled
    children are swapped for theirs in place. Parameters are the same tensors, so optimizers keep working."""
    wrapper = _optimized_module_class()
    if wrapper is None:
        return module
    if isinstance(module, wrapper):
        module = module._orig_mod
    for name, child in list(module.named_children()):
        plain = uncompile(child)
        if plain is not child:
            setattr(module, name, plain)
    return module


def is_compiled(module) -> bool:
    wrapper = _optimized_module_class()
    return wrapper is not None and any(isinstance(m, wrapper) for m in module.modules())


class CompileFallback:
    """Runs steps through torch.compile'd modules; when compiling or running them raises, it prints one line
    and runs the same step again eager, so compile never ends a run. `to_eager(failed)` swaps the compiled
    modules for their originals and, where this rank's attempt failed, clears what it left (gradients, pending
    statistics); the random
    state is put back first, so the repeat draws what the failed attempt drew. Errors the user must see
    (bad input, a stop signal, out of memory) pass through. Under DDP (`group`: a gloo group) the ranks agree
    after every step, and all fall back when one did: the failed rank repeats its step before the agreement,
    so its gradients join the all-reduce the others are already in."""

    PASS_THROUGH = (UserError, KeyboardInterrupt, torch.cuda.OutOfMemoryError)

    def __init__(self, compiled: bool, to_eager, log, device, group=None):
        self.compiled, self.to_eager, self.log, self.device, self.group = compiled, to_eager, log, device, group

    def __call__(self, fn, *args):
        if not self.compiled:
            return fn(*args)
        rng = (torch.get_rng_state(), torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None)
        failed = None
        try:
            out = fn(*args)
        except self.PASS_THROUGH:
            raise
        except Exception as error:      # anything torch.compile raises: inductor, Triton, dynamo, a missing compiler
            failed = error
        if failed is not None:
            self.fall_back(failed)
            torch.set_rng_state(rng[0])
            if rng[1] is not None:
                torch.cuda.set_rng_state(rng[1], self.device)
            out = fn(*args)
        if self.group is not None:
            flag = torch.tensor([int(failed is not None)])
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
            if flag.item() and self.compiled:
                self.fall_back(None)
        return out

    def fall_back(self, error):
        if error is not None:
            first = (str(error).strip().splitlines() or [""])[0][:200]
            self.log(f"torch.compile failed ({type(error).__name__}: {first}); continuing eager (--no-compile "
                     f"skips compiling)")
        else:
            self.log("torch.compile failed on another rank; continuing eager on every rank")
        self.compiled = False
        self.to_eager(error is not None)
        torch.compiler.reset()


# -----------------------------------------------------------------------------
# Checkpoints

CHECKPOINT_KINDS = {"mqvae": "an MQ-VAE (stage-1) checkpoint, written by train_mqvae.py",
                    "stackformer": "a Stackformer (stage-2) checkpoint, written by train_stackformer.py"}


@contextlib.contextmanager
def atomic_path(path: str):
    """Yields a temporary name beside `path`. When the block finishes it replaces `path`; if the block
    fails it is deleted. A crash or a full disk mid-write therefore never leaves a half-written file
    under the real name. The temporary name ends in ".tmp<pid>", not in an image extension, so a folder
    scan never mistakes a leftover for an image: writers must be given a file handle or a format."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_checkpoint(obj: dict, path: str):
    """Written atomically and synced to disk: the previous checkpoint survives any failure."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        torch.save(obj, fh)
        fh.flush()
        os.fsync(fh.fileno())


def run_checkpoint(path: str) -> str:
    """A checkpoint file, or a run's --out-dir, which stands for the ckpt.pt in it."""
    if os.path.isdir(path):
        check(os.path.isfile(os.path.join(path, "ckpt.pt")),
              f"{path} is a folder without a ckpt.pt (a run writes it at its first checkpoint); give a checkpoint")
        return os.path.join(path, "ckpt.pt")
    return path


def load_checkpoint(path: str, kind: str, map_location="cpu") -> dict:
    """Load a checkpoint of the given kind ("mqvae" or "stackformer") or raise a one-line UserError."""
    if os.path.isdir(path):
        raise UserError(f"{path} is a folder; give the checkpoint file in it (e.g. {os.path.join(path, 'ckpt.pt')})")
    if not os.path.isfile(path):
        raise UserError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated file, not a torch file, pickled objects we refuse to run
        # torch's own message advises loading with weights_only=False, which would run the file's code
        raise UserError(f"cannot read checkpoint {path}: it is not {CHECKPOINT_KINDS[kind]}, but an empty, "
                        f"truncated or other file (torch.load raised {type(e).__name__})") from None
    found = ckpt.get("kind") if isinstance(ckpt, dict) else None
    if found != kind:
        what = CHECKPOINT_KINDS.get(found, "not a checkpoint of this project")
        raise UserError(f"{path} is {what}; expected {CHECKPOINT_KINDS[kind]}")
    return ckpt


def strip_compile_prefix(state_dict: dict) -> dict:
    """torch.compile and DDP wrap modules; store plain names so any script can load strictly."""
    out = {}
    for key, value in state_dict.items():
        for prefix in ("_orig_mod.", "module."):
            key = key.replace(prefix, "")
        out[key] = value
    return out


# What a checkpoint holds (train_mqvae.py and train_stackformer.py write them):
#   kind="mqvae":       mqvae_config (dict), mqvae (state dict), disc, opt_ae, opt_disc, train_config, step, rng
#   kind="stackformer": stackformer_config, model, mqvae_config + mqvae (the frozen stage 1, so the file
#                       alone rebuilds both), tokenizer (WordTokenizer.to_dict() or None), classes (names or
#                       None), image_size, train_config, optimizer, step, rng, stage1_sha256

def rebuild_strictly(model_class, config_class, ckpt: dict, config_key: str, weights_key: str, what: str):
    """model_class(config_class(**ckpt[config_key])) holding ckpt[weights_key], loaded strictly; a config or weights
    that do not fit this code are a one-line UserError naming `what`."""
    try:
        model = model_class(config_class(**ckpt[config_key]))
        model.load_state_dict(ckpt[weights_key], strict=True)
    except (TypeError, ValueError, RuntimeError, KeyError) as e:
        raise UserError(f"{what}: the weights do not match their config "
                        f"({type(e).__name__}: {str(e).splitlines()[0]})") from None
    return model


def mqvae_from_checkpoint(ckpt: dict, device="cpu") -> MQVAE:
    """Rebuild an MQ-VAE from a checkpoint dict (stage 1, or the copy a Stackformer checkpoint embeds),
    loading every weight strictly, in eval mode."""
    return rebuild_strictly(MQVAE, MQVAEConfig, ckpt, "mqvae_config", "mqvae", "the MQ-VAE").to(device).eval()


def load_mqvae(path: str, device="cpu") -> MQVAE:
    return mqvae_from_checkpoint(load_checkpoint(path, "mqvae"), device)


def load_stackformer(path: str, device="cpu"):
    """-> (Stackformer in eval mode, MQ-VAE in eval mode, WordTokenizer or None, checkpoint dict).
    Every weight is loaded strictly; a wrong, missing or truncated file is a one-line UserError."""
    ckpt = load_checkpoint(path, "stackformer")
    model = rebuild_strictly(Stackformer, StackformerConfig, ckpt, "stackformer_config", "model", f"{path}: the Stackformer")
    tokenizer = WordTokenizer.from_dict(ckpt["tokenizer"]) if ckpt.get("tokenizer") else None
    return model.to(device).eval(), mqvae_from_checkpoint(ckpt, device), tokenizer, ckpt


# -----------------------------------------------------------------------------
# torchrun / DDP

def setup_distributed():
    """-> (rank, world_size, local_rank, device). torchrun sets RANK/WORLD_SIZE/LOCAL_RANK;
    NCCL on CUDA, gloo on CPU. A plain `python script.py` runs as rank 0 of 1."""
    if "RANK" not in os.environ:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return 0, 1, 0, device
    rank, world, local_rank = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        dist.init_process_group("nccl")
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return rank, world, local_rank, device


def barrier():
    """dist.barrier() when there is a process group (else nothing), naming this rank's GPU under NCCL (else NCCL
    guesses it from the rank, and warns)."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


def cleanup_distributed():
    """Leave the process group at the end of a run that succeeded on every rank. What still holds the
    group (DDP's reducer, kept alive by reference cycles) is collected first, and the ranks meet at a
    barrier, so none tears the group down while another still uses it. After an error, leave the group
    to the process exit: destroying it while another rank waits in a collective can hang."""
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        barrier()
        dist.destroy_process_group()


# -----------------------------------------------------------------------------
# Config dataclass -> command line

def field_comments(cls) -> dict:
    """The comment after each field of a config dataclass, so that --help says what the code says."""
    comments = {}
    for line in inspect.getsource(cls).splitlines():
        match = re.match(r"\s+(\w+):[^#]*#\s*(.*)$", line)
        if match:
            comments[match.group(1)] = match.group(2)
    return comments


class FlagParser(argparse.ArgumentParser):
    """argparse for every script: no abbreviations (`--max-step` is not taken for `--max-steps`), and a bad
    command line is a one-line UserError that names the closest valid flag, not a page of usage."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def error(self, message: str):
        flags = [s for action in self._actions for s in action.option_strings]
        typed = re.findall(r"(--?[\w-]+)", message.split(":", 1)[1]) if "unrecognized arguments" in message else []
        hints = [f"{flag} (did you mean {close[0]}?)" for flag in typed
                 for close in [difflib.get_close_matches(flag.split("=")[0], flags, n=1, cutoff=0.6)] if close]
        raise UserError(f"unknown flag {', '.join(hints)}; see --help" if hints else f"{message}; see --help")


def config_to_parser(defaults, description: str, required=()) -> FlagParser:
    """A FlagParser with the flags of the config dataclass `defaults` (add_config_flags); the fields named in
    `required` must be given."""
    parser = FlagParser(description=description)
    add_config_flags(parser, defaults, required)
    return parser


def add_config_flags(parser: argparse.ArgumentParser, defaults, required=()):
    """One flag per dataclass field: `--batch-size 8` and `--batch-size=8` both work; booleans get
    `--flag/--no-flag`; a field whose default is None takes the type named in its annotation; the
    field's comment is its help text, followed by the default where the comment does not give it.
    The fields named in `required` must be given (and show so in the usage line)."""
    help_texts = field_comments(type(defaults))
    for f in dataclasses.fields(defaults):
        name = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        annotation = str(f.type)
        help_text = help_texts.get(f.name, "")
        if default not in (None, "") and "default" not in help_text:
            help_text += f" (default: {default})"
        help_text = help_text.replace("%", "%%")  # argparse formats help with %
        if isinstance(default, bool) or "bool" in annotation:
            parser.add_argument(name, action=argparse.BooleanOptionalAction, default=default, help=help_text)
        else:
            kind = (int if "int" in annotation else float if "float" in annotation else str)
            parser.add_argument(name, type=kind, default=default, help=help_text,
                                metavar=f.name.upper(), required=f.name in required)


def launch(config_class, train_fn, description: str, argv=None):
    """The entry point of both training scripts: flags -> config_class, torchrun's process group
    (if any), then train_fn(cfg, explicit_flags, rank, world_size, device)."""
    parser = config_to_parser(config_class(), description)
    args = parser.parse_args(argv)
    explicit = explicit_flags(parser, argv if argv is not None else sys.argv[1:])
    rank, world, _, device = setup_distributed()
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}   # TrainingRun replaces them
    try:
        result = train_fn(config_class(**vars(args)), explicit, rank, world, device)
    except Interrupted as stopped:      # every rank stopped at the same step, with a checkpoint
        cleanup_distributed()
        sys.exit(stopped.code)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    cleanup_distributed()
    return result


def explicit_flags(parser: argparse.ArgumentParser, argv) -> set:
    """Names of the options the user actually typed (so --resume knows what to override)."""
    probe = argparse.ArgumentParser(add_help=False)
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            kwargs = dict(dest=action.dest, default=argparse.SUPPRESS)
            if isinstance(action, argparse.BooleanOptionalAction):
                probe.add_argument(*action.option_strings, action=argparse.BooleanOptionalAction, **kwargs)
            else:
                probe.add_argument(*action.option_strings, nargs=action.nargs, **kwargs)
    known, _ = probe.parse_known_args(argv)
    return set(vars(known))


def run_main(main_fn, argv=None):
    """Run a script's main(): a UserError becomes one line on stderr and exit status 2."""
    try:
        return main_fn(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


# -----------------------------------------------------------------------------
# Training runs: the NaN guard, resuming, per-rank random streams, the learning-rate schedule

class NonFiniteGuard:
    """Remembers on the device the first (1-based) step whose loss was NaN or inf, so the loop needs no
    host sync per step. `check`, called where the loop syncs anyway (logging, evaluation, before every
    checkpoint), stops the run before a bad state can overwrite the last good checkpoint."""

    def __init__(self, device):
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)

    def update(self, loss: torch.Tensor, step: int):
        bad = ~torch.isfinite(loss.detach()) & (self.first_bad < 0)
        self.first_bad.copy_(torch.where(bad, step, self.first_bad))

    def check(self, step: int, ckpt_path: str, last_saved, hint: str):
        bad = self.first_bad.clone()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        if bad.item() >= 0:
            where = (f"the checkpoint {ckpt_path} (step {last_saved}) was left untouched" if last_saved is not None
                     else "no checkpoint was written")
            raise UserError(f"non-finite loss at step {bad.item()}; stopped at step {step}; {where}. {hint}, then --resume")


def ignore_interrupts(worker_id: int):
    """worker_init_fn of the training loaders: Ctrl-C reaches every process of the terminal's group, and a
    loader worker that dies of it would break the graceful stop of StopSignals in the main process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def default_workers(wanted: int = 8) -> int:
    """Loader processes: `wanted`, but no more than this machine's CPU cores."""
    return max(1, min(wanted, os.cpu_count() or 1))


class Interrupted(Exception):
    """A run stopped by SIGINT/SIGTERM after writing its checkpoint; launch() exits with `code`."""

    def __init__(self, code: int):
        super().__init__(code)
        self.code = code


class StopSignals:
    """SIGINT (Ctrl-C) and SIGTERM (a cluster's preemption): the first asks the training loop to stop after the
    current step, with a checkpoint; another one, 2 s or more later, aborts at once (the last checkpoint stays
    whole: every write is atomic). A repeat within 2 s is taken as the same request, since torchrun forwards to
    its workers the Ctrl-C that the terminal already sent them."""

    def __init__(self):
        self.requested, self.first_at = 0, 0.0
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self.handle)

    def handle(self, signum, frame):
        now = time.monotonic()
        if self.requested and now - self.first_at >= 2.0:
            print(f"{signal.Signals(signum).name} again: aborting now; the last checkpoint is intact",
                  file=sys.stderr, flush=True)
            os._exit(128 + signum)
        if not self.requested:
            self.requested, self.first_at = signum, now
            print(f"{signal.Signals(signum).name}: stopping after the current step, with a checkpoint "
                  f"(send it again to abort at once)", file=sys.stderr, flush=True)


LOG_SECONDS = 30.0      # the longest a run that trains or extracts goes without a progress line


class LogCadence:
    """When a long loop prints a progress line: after its first step, every `every` steps (if given), after its
    last, and once LOG_SECONDS have passed since the line before, whatever --log-every says: the full-size
    model on a CPU takes seconds a step, and 50 silent steps looked like a hang."""

    def __init__(self, total: int, every: Optional[int] = None):
        self.total, self.every = total, every
        self.lines, self.last_line = 0, time.time()

    def counted(self, done: int) -> bool:
        """Due by the count of steps alone (the same answer on every rank)."""
        return self.lines == 0 or done == self.total or (self.every is not None and done % self.every == 0)

    def overdue(self, ahead: float = 0.0) -> bool:
        """LOG_SECONDS since the last line will have passed `ahead` seconds from now."""
        return time.time() + ahead - self.last_line >= LOG_SECONDS

    def due(self, done: int) -> bool:
        return self.counted(done) or self.overdue()

    def printed(self):
        self.lines, self.last_line = self.lines + 1, time.time()


class TrainingRun:
    """The bookkeeping both training loops share: logging on rank 0 (stdout and out_dir/log.jsonl), the
    NaN guard, atomic checkpoints holding every rank's RNG state, step times for the ETA, and when to
    log, evaluate, checkpoint and stop, which every rank must answer alike. `cfg` needs out_dir, log_every,
    eval_every, ckpt_every, ckpt_minutes and stop_after."""

    def __init__(self, cfg, ckpt_path: str, resumed: bool, start_step: int, total_steps: int, rank: int, world: int,
                 device, nan_hint: str):
        self.cfg, self.ckpt_path, self.nan_hint = cfg, ckpt_path, nan_hint
        self.start_step, self.total_steps = start_step, total_steps
        self.master, self.world, self.device = rank == 0, world, device
        self.guard = NonFiniteGuard(device)
        self.last_saved = start_step if resumed else None     # the step of the checkpoint on disk
        self.log_path = os.path.join(cfg.out_dir, "log.jsonl")
        self.step_times = []
        self.t_log = self.t_saved = time.time()
        self.timed_from = start_step                            # the step the speed in the next log line counts from
        self.cadence = LogCadence(total_steps, cfg.log_every)
        self.log_overdue = False                                # agreed by after_step for the next step
        self.signals = StopSignals()
        self.interrupted = 0                                    # the signal that stopped the run
        # The per-step agreement on signals and wall-clock checkpoints goes over a CPU (gloo) group, so that
        # it never waits for the GPU.
        self.control = dist.new_group(backend="gloo") if world > 1 else None
        if self.master and not resumed:     # a new run (or one started over): no pictures of an earlier one
            for name in os.listdir(cfg.out_dir) if os.path.isdir(cfg.out_dir) else []:
                if re.fullmatch(r"(recon|samples)_\d+\.png", name):
                    os.remove(os.path.join(cfg.out_dir, name))
        if self.master and os.path.isfile(self.log_path):
            # A resumed run logs the steps after its checkpoint again: drop the lines the checkpoint did not
            # keep, so every step appears once (a new run starts the log afresh).
            keep = []
            if resumed:
                with open(self.log_path) as fh:
                    keep = [line for line in fh if logged_step(line) <= start_step]
            with atomic_path(self.log_path) as tmp, open(tmp, "w") as fh:
                fh.writelines(keep)

    def log(self, message: str):
        if self.master:
            print(message, flush=True)

    def write_record(self, record: dict):
        """One JSON line in log.jsonl (rank 0)."""
        if self.master:
            with open(self.log_path, "a") as fh:
                fh.write(json.dumps(record) + "\n")

    def check_finite(self, step: int):
        """Stop with a clear error if any rank saw a NaN/inf loss (a sync point: call where the loop syncs anyway)."""
        self.guard.check(step, self.ckpt_path, self.last_saved, self.nan_hint)

    def save(self, step: int, state: dict):
        """Checkpoint `state` plus the step and every rank's RNG state, atomically, after the NaN check."""
        self.check_finite(step)
        rngs = gather_rng_states(self.device, self.world)
        if self.master:
            save_checkpoint(dict(state, step=step, rng=rngs), self.ckpt_path)
        self.last_saved, self.t_saved = step, time.time()

    def due(self, done: int, every: int) -> bool:
        return done % every == 0 or done == self.total_steps

    def log_due(self, done: int) -> bool:
        """Whether step `done` logs, the same on every rank (logging all-reduces): as LogCadence says, where
        the wall-clock part was agreed at the end of the step before."""
        return self.cadence.counted(done) or self.log_overdue

    def after_step(self, done: int):
        """-> (checkpoint now, stop now), the same on every rank. A checkpoint is due every ckpt_every steps,
        every ckpt_minutes of wall time, at the end, and before stopping; the run stops at --stop-after or
        at a signal (self.interrupted then names it). The same agreement settles whether the next step logs
        by the clock: if it would end LOG_SECONDS or more after the last line (one step takes about as long
        as the last one did)."""
        signum = self.signals.requested
        overdue = time.time() - self.t_saved >= self.cfg.ckpt_minutes * 60
        log_overdue = self.cadence.overdue(ahead=self.step_times[-1] if self.step_times else 0.0)
        if self.control is not None:
            flags = torch.tensor([signum, int(overdue), int(log_overdue)])
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.control)
            signum, overdue, log_overdue = int(flags[0]), bool(flags[1]), bool(flags[2])
        self.interrupted, self.log_overdue = signum, log_overdue
        stop = bool(signum) or (self.cfg.stop_after is not None and done - self.start_step >= self.cfg.stop_after)
        return self.due(done, self.cfg.ckpt_every) or overdue or stop, stop

    def stop_message(self, done: int) -> str:
        """What to tell the user when the loop stops early."""
        if not self.interrupted:
            return f"stopping after {self.cfg.stop_after} steps (--stop-after) at step {done}; continue with --resume"
        args = [a for a in sys.argv[1:] if a != "--resume"] + ["--resume"]
        launcher = (f"torchrun --nproc_per_node={self.world} " if self.world > 1 else "python ") + sys.argv[0]
        return (f"stopped by {signal.Signals(self.interrupted).name} at step {done}; checkpoint {self.ckpt_path}; "
                f"continue with: {launcher} {' '.join(shlex.quote(a) for a in args)}")

    def interval(self, done: int):
        """-> (steps and seconds since the timer last started, ETA in seconds from the mean of the last
        log_every step times); restarts the timer."""
        now = time.time()
        elapsed, steps = now - self.t_log, done - self.timed_from
        self.restart_timer(done)
        self.cadence.printed()
        recent = self.step_times[-self.cfg.log_every:]
        return max(steps, 0), max(elapsed, 1e-9), (self.total_steps - done) * sum(recent) / max(len(recent), 1)

    def restart_timer(self, done: int):
        """Speed is measured from here (after a log line, an evaluation, the compiling first step)."""
        self.t_log, self.timed_from = time.time(), done

    def compiled_step(self, done: int, t0: float):
        """The first step of a compiled run, begun at time t0: it compiled. Log how long it took, and keep
        it out of the speed and the ETA (its time is not added to step_times)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.log(f"torch.compile: the first step took {time.time() - t0:.1f} s (compiling; --no-compile skips it); "
                 f"speed is measured from the next step")
        self.restart_timer(done)

    def finish(self, last_step: int, note: str = ""):
        """The closing line; a run stopped by a signal raises Interrupted (exit status 128 + the signal)."""
        if self.interrupted:
            raise Interrupted(128 + self.interrupted)
        if self.start_step >= self.total_steps:
            self.log(f"nothing to do: the checkpoint is at step {self.start_step} of {self.total_steps}")
        elif last_step + 1 == self.total_steps:
            self.log(f"done: {self.total_steps} steps; checkpoint {self.ckpt_path}{note}")


def logged_step(line: str) -> float:
    """The step of a log.jsonl line; a line cut off by a killed process counts as after every step."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


def fill_defaults(cfg, defaults: dict, stage: str):
    """Flags left at None take the value `defaults` gives for this data; --out-dir defaults to out/<stage>-<data>."""
    for key, value in defaults.items():
        if getattr(cfg, key) is None:
            setattr(cfg, key, value)
    if cfg.out_dir is None:
        cfg.out_dir = os.path.join("out", f"{stage}-" + os.path.basename(os.path.normpath(cfg.data)))
    return cfg


def resumed_config(cfg, saved: dict, explicit: set, run_control: set):
    """The configuration of a resumed run: the checkpoint's, except the run-control flags the user typed
    now (and --stop-after, which applies to one invocation). Any other flag typed with a different
    value is an error: the model, data and optimiser of a run cannot change half-way. So is a
    checkpoint whose configuration has other fields or types than this code's (another version of
    the code wrote it)."""
    fields = dataclasses.fields(cfg)
    other = sorted(set(saved) ^ {f.name for f in fields}) + [
        f.name for f in fields
        if f.name in saved and isinstance(getattr(cfg, f.name), bool) != isinstance(saved[f.name], bool)]
    check(not other, f"the checkpoint's configuration does not fit this version of the code "
                     f"({', '.join(other)}); start a new --out-dir")
    resumed = type(cfg)(**saved)
    for key in explicit - run_control:
        check(getattr(cfg, key) == getattr(resumed, key),
              f"--{key.replace('_', '-')} {getattr(cfg, key)} differs from the checkpoint's "
              f"{getattr(resumed, key)}; start a new --out-dir to change it")
    for key in explicit & run_control:
        setattr(resumed, key, getattr(cfg, key))
    resumed.stop_after, resumed.resume, resumed.overwrite = cfg.stop_after, True, False
    return resumed


def resume_from(cfg, kind: str, explicit: set, run_control: set, log):
    """-> (checkpoint path out_dir/ckpt.pt, the checkpoint or None, the run's configuration). With --resume and
    a checkpoint there, the checkpoint's configuration as resumed_config merges it; otherwise cfg unchanged."""
    path = os.path.join(cfg.out_dir, "ckpt.pt")
    check(not (cfg.resume and cfg.overwrite), "--resume continues the run in --out-dir, --overwrite starts it over; give one")
    if cfg.resume and os.path.isfile(path):
        ckpt = load_checkpoint(path, kind)
        return path, ckpt, resumed_config(cfg, ckpt["train_config"], explicit, run_control)
    if cfg.resume:
        log(f"--resume: no checkpoint at {path}, starting from scratch")
    elif os.path.isfile(path) and not cfg.overwrite:
        raise UserError(f"{cfg.out_dir} already holds a run's checkpoint; continue it with --resume, or start it over "
                        f"with --overwrite (which replaces its checkpoint and log), or give another --out-dir")
    return path, None, cfg


def check_identical_across_ranks(tensors, world: int, what: str) -> str:
    """Gather a sum and an absolute sum (float64) of each tensor from every rank and raise a UserError
    unless all ranks agree; DDP and the all-reduced codebook update must keep them identical."""
    local = torch.stack([t.detach().double().sum() for t in tensors] + [t.detach().double().abs().sum() for t in tensors])
    gathered = [torch.zeros_like(local) for _ in range(world)]
    dist.all_gather(gathered, local)
    if not all(torch.equal(gathered[0], g) for g in gathered[1:]):
        raise UserError(f"ranks diverged: {what} checksums differ across {world} ranks")
    return f"rank consistency: all {len(tensors)} {what} identical across {world} ranks"


def warmup_cosine_lr(step: int, peak: float, warmup_steps: int, total_steps: int, min_lr: float = 0.0) -> float:
    """Linear warmup to `peak` over warmup_steps, then cosine decay to min_lr at total_steps."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr + 0.5 * (peak - min_lr) * (1 + math.cos(math.pi * progress))


def gather_rng_states(device: torch.device, world: int) -> list:
    """Every rank's CPU (and CUDA) RNG state, for the checkpoint: resuming restores each rank's own."""
    state = dict(cpu=torch.get_rng_state(), cuda=torch.cuda.get_rng_state(device) if device.type == "cuda" else None)
    if world == 1:
        return [state]
    states = [None] * world
    dist.all_gather_object(states, state)
    return states


def seed_or_restore_rng(ckpt: Optional[dict], seed: int, rank: int, world: int, device: torch.device, log,
                        changes: str) -> int:
    """Per-rank random streams: a fresh run seeds seed + rank; a resumed one restores this rank's state
    saved by gather_rng_states. If the world size changed, there is no state to restore: it re-seeds and
    warns that `changes` (what differs from the uninterrupted run). Returns the step to start from."""
    if ckpt is None:
        torch.manual_seed(seed + rank)
        return 0
    states, start_step = ckpt["rng"], ckpt["step"]
    if len(states) == world:
        torch.set_rng_state(states[rank]["cpu"])
        if device.type == "cuda" and states[rank].get("cuda") is not None:
            torch.cuda.set_rng_state(states[rank]["cuda"], device)
    else:
        torch.manual_seed(seed + rank + start_step)
        log(f"warning: the checkpoint was written by {len(states)} processes, this run has {world}: {changes} "
            f"from here on")
    return start_step


# -----------------------------------------------------------------------------
# Files

def save_grid(images, path: str, nrow: int):
    """images (B,3,H,W) in [0,1] -> one PNG, written atomically."""
    import torchvision.utils
    with atomic_path(path) as tmp:
        torchvision.utils.save_image(images, tmp, nrow=nrow, padding=2, pad_value=1.0, format="png")


def write_json(path: str, obj):
    with atomic_path(path) as tmp, open(tmp, "w") as fh:
        json.dump(obj, fh, indent=2, default=str)
