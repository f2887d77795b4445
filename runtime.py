"""Runs on disk and on several processes: atomic files, checkpoints and resuming, Ctrl-C, torchrun.

    run_training     qatkd.train, resumable from a checkpoint, stopping cleanly on Ctrl-C, and under
                     torchrun on several processes (DistributedDataParallel)
    check_run_dir    a run folder is never overwritten by accident, nor resumed with other arguments
                     or other code
    atomic_path      every file is written to a temporary name and renamed: a kill never leaves half a file
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path

import torch

import qatkd

# ---------------------------------------------------------------------------------------------
# files
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary sibling of path to write; rename it onto path once written.

    A kill mid-write leaves only the temporary (file or directory), never a half-written path.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    if tmp.is_dir():  # left behind by an earlier kill
        shutil.rmtree(tmp)
    tmp.unlink(missing_ok=True)
    yield tmp
    if path.is_dir():
        shutil.rmtree(path)
    os.replace(tmp, path)


def json_ready(obj):
    """obj with every NaN float as None (JSON's null: NaN is not JSON), recursively."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_ready(v) for v in obj]
    return obj


def write_json(path, obj):
    """Write JSON atomically; an undefined (NaN) value is written as null."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(json_ready(obj), indent=2) + "\n")


# ---------------------------------------------------------------------------------------------
# seeds and checkpoints
# ---------------------------------------------------------------------------------------------


def set_seed(seed):
    """Seed python, numpy and torch: on CPU a seed fixes the whole run."""
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:
        pass


def rng_state():
    """Python, numpy and torch (CPU) random states, as tensors and plain values only, so that a
    checkpoint loads with torch.load(weights_only=True)."""
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    try:
        import numpy as np

        name, keys, pos, has_gauss, gauss = np.random.get_state()
        state["numpy"] = [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss]
    except ImportError:
        pass
    return state


def set_rng_state(state):
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        import numpy as np

        name, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))


def save_checkpoint(path, model, opt, sched, state):
    """Everything training needs to continue: weights, optimizer, schedule, RNG states, loop state."""
    with atomic_path(path) as tmp:
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                    "rng": rng_state(), "loop": state}, tmp)


def load_checkpoint(path):
    """A checkpoint of save_checkpoint: tensors and plain values only (weights_only=True: nothing is
    unpickled that could run code). A file holding anything else is refused."""
    import pickle

    try:
        return torch.load(path, weights_only=True)
    except pickle.UnpicklingError as e:
        why = (str(e).strip().splitlines() or [""])[0][:120]
        raise ValueError(f"{path} holds more than tensors and plain values ({why}); refusing to unpickle it: "
                         "delete it to start the run again") from None


@contextlib.contextmanager
def stop_on_ctrl_c():
    """Yield a list that becomes non-empty when Ctrl-C (SIGINT) arrives, so that training can finish
    the step in progress, save and stop; the previous handler is restored afterwards."""
    import signal

    interrupted = []
    try:
        previous = signal.signal(signal.SIGINT, lambda *_: interrupted.append(True))
    except ValueError:  # not the main thread
        previous = None
    try:
        yield interrupted
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


# ---------------------------------------------------------------------------------------------
# training: resumable, and on several processes
# ---------------------------------------------------------------------------------------------


class LineProgress:
    """tqdm's interface for logs: where the output is not a terminal, a plain line every `every` seconds
    (and a last one for anything that took longer), instead of a bar redrawn with carriage returns."""

    def __init__(self, total=None, initial=0, desc="", every=60.0, **_):
        self.total, self.n, self.desc, self.every, self.postfix = total, initial, desc, every, ""
        self.start = self.printed = time.time()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if time.time() - self.start >= self.every:
            self.line()

    def update(self, n=1):
        self.n += n
        if time.time() - self.printed >= self.every:
            self.line()

    def set_postfix(self, **values):
        self.postfix = ", ".join(f"{k} {v}" for k, v in values.items())

    def write(self, text):
        print(text, flush=True)

    def line(self):
        elapsed = time.time() - self.start
        done = f"{self.n}/{self.total} ({100 * self.n / self.total:.0f} %)" if self.total else f"{self.n}"
        left = (f", about {elapsed / self.n * (self.total - self.n) / 60:.0f} min left"
                if self.total and self.n else "")
        print(f"{self.desc}: {done}, {elapsed / 60:.1f} min{left}" + (f"; {self.postfix}" if self.postfix else ""),
              file=sys.stderr, flush=True)
        self.printed = time.time()


def progress_bar(**kw):
    """A progress display for train(progress=...) and data.evaluate: tqdm's bar on a terminal, else
    plain lines now and then (LineProgress), so that a log file reads as text."""
    from tqdm.auto import tqdm

    return tqdm(dynamic_ncols=True, **kw) if sys.stderr.isatty() else LineProgress(**kw)


def distributed():
    """(rank, world size) under torchrun once the process group is initialised; else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_device():
    """The device of this process; under torchrun (WORLD_SIZE > 1) also start the process group: nccl
    with one GPU per process (LOCAL_RANK), else gloo on CPU. Only rank 0 prints."""
    world, local_rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1:
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if distributed()[0] != 0:
            sys.stdout = open(os.devnull, "w")  # one report, from rank 0; errors still reach stderr
    return device


def sharded(loss_fn, ddp, rank, world):
    """loss_fn on this process's contiguous slice of every global batch, through DistributedDataParallel
    (which averages the gradients). The loss and its terms come back averaged over the processes (the
    loss's gradient stays this process's), so every process logs and checks the same values. A batch
    with fewer examples than processes gives a process without a slice the batch's last example."""
    import torch.distributed as dist

    def loss_on_slice(_model, batch, *intervention):
        n = len(batch["labels"])
        rows = torch.arange(n).tensor_split(world)[rank]
        rows = rows if len(rows) else torch.tensor([n - 1])
        loss, terms = loss_fn(ddp, {k: v[rows.to(v.device)] for k, v in batch.items()}, *intervention)
        values = torch.stack([loss.detach(), *(torch.as_tensor(v).detach() for v in terms.values())])
        dist.all_reduce(values)
        values /= world
        return loss + (values[0] - loss).detach(), dict(zip(terms, values[1:]))

    return loss_on_slice


def run_training(model, loss_fn, train_feats, cfg, evaluate_fn=None, metric="acc", log=print, desc="train",
                 checkpoint=None, save_every=100, progress=None, started=None):
    """qatkd.train, resumable and on several processes.

    checkpoint: a file path. If it exists, training continues from it (weights, optimizer, schedule,
    RNG states and loop state restored); it is written every save_every steps (0: never) and when
    Ctrl-C arrives, after the step in progress, which then raises KeyboardInterrupt. On CPU a resumed
    run ends exactly as an uninterrupted one.
    Under torchrun (process group initialised): every process draws the same global batch and trains
    on its own slice (sharded); each draws its own dropout (seeded from cfg.seed, its rank and the
    step); only rank 0 evaluates, logs and saves. progress: the progress display (progress_bar by
    default). started: the run's start (time.time()), kept in the checkpoint as the wall time so far.
    """
    from tqdm.auto import tqdm

    progress = progress or progress_bar
    rank, world = distributed()
    saved = load_checkpoint(checkpoint) if checkpoint is not None and Path(checkpoint).is_file() else None
    state = saved["loop"] if saved else None
    # the optimizer of the step to come (Teacher Intervention: phase 1's or phase 2's)
    opt, sched = qatkd.make_optimizer(model, cfg, cfg.phase_steps(cfg.total_steps(len(train_feats)),
                                                                  state["step"] if state else 0))
    if saved:
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        sched.load_state_dict(saved["scheduler"])
        set_rng_state(saved["rng"])
    main = rank == 0
    if world > 1:
        torch.manual_seed(cfg.seed + 10_000 * rank + (state or {}).get("step", 0))
        loss_fn = sharded(loss_fn, torch.nn.parallel.DistributedDataParallel(model), rank, world)
        progress = progress if main else functools.partial(tqdm, disable=True)
    with stop_on_ctrl_c() as interrupted:

        def after_step(state, opt, sched):
            if started is not None:
                state["wall_seconds"] = time.time() - started
            if main and checkpoint is not None and ((save_every and state["step"] % save_every == 0) or interrupted):
                save_checkpoint(checkpoint, model, opt, sched, state)
            if interrupted:
                raise KeyboardInterrupt(f"interrupted after step {state['step']}"
                                        + (f"; resume from {checkpoint}" if checkpoint else ""))

        try:
            return qatkd.train(model, loss_fn, train_feats, cfg, evaluate_fn if main else None, metric,
                               log if main else (lambda record: None), desc, opt, sched, state, after_step, progress)
        except FloatingPointError as e:
            if checkpoint is None:
                raise
            raise FloatingPointError(f"{e}; the last good checkpoint is {checkpoint}") from None


# ---------------------------------------------------------------------------------------------
# run folders
# ---------------------------------------------------------------------------------------------


# arguments not compared when a run is resumed or reused by a sweep: they change no number (--recipe sets
# --lr, which is compared)
NOT_COMPARED = ("recipe", "resume", "overwrite", "mix_commits", "save_every", "keep_checkpoint", "teacher_path", "code",
                "recompute", "sweep", "sweep_kd", "seeds", "sweep_teacher_seeds", "sweep_protocols", "benchmark",
                "bench_model", "bench_steps", "bench_warmup", "bench_memory", "bench_phase", "device")


def differing_args(old, args):
    """'--name stored (now value)' for every argument of args that a run's args.json holds otherwise."""
    return [f"--{k} {old[k]} (now {v})" for k, v in vars(args).items()
            if k not in NOT_COMPARED and k in old and old[k] != v]


def differing_code(old, args):
    """['code X (now Y)'] when the run's recorded commit is not this code's, unless --mix_commits."""
    now, then = code_version(), old.get("code", "unrecorded")
    return [] if then == now or args.mix_commits else [f"code {then} (now {now})"]


CODE_FILES = ("qatkd.py", "data.py", "models.py", "export.py", "diagnostics.py", "runtime.py", "run.py", "experiment.py",
              "augment.py")


@functools.lru_cache(maxsize=None)
def code_version():
    """The git commit of this code, with "+changes" if a file that computes a number differs from it;
    "unknown" outside a git checkout. Read once per process: a long sweep records the code it runs."""
    import subprocess

    here = Path(__file__).resolve().parent
    try:
        git = lambda *a: subprocess.run(["git", *a], cwd=here, capture_output=True, text=True, timeout=10)  # noqa
        commit = git("rev-parse", "--short=12", "HEAD")
        if commit.returncode:
            return "unknown"
        changed = git("status", "--porcelain", "--", *CODE_FILES).stdout.strip()
        return commit.stdout.strip() + ("+changes" if changed else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def check_run_dir(run_dir, args):
    """Refuse to overwrite an earlier run by accident, and to resume one with other settings or code."""
    stored = run_dir / "args.json"
    if args.resume:
        if not (run_dir / "checkpoint.pt").is_file():
            done = " (it has finished)" if (run_dir / "metrics.json").is_file() else ""
            raise FileNotFoundError(f"--resume: {run_dir} holds no checkpoint to resume from{done}")
        old = json.loads(stored.read_text())
        changed = differing_args(old, args)
        if changed:
            raise ValueError(f"--resume: {run_dir} was started with other arguments: {', '.join(changed)}")
        if differing_code(old, args):
            raise ValueError(f"--resume: {run_dir} was started by other code: {differing_code(old, args)[0]}; pass "
                             "--mix_commits to continue it anyway")
    elif stored.exists() and not args.overwrite:
        raise FileExistsError(f"{run_dir} already holds a run; pass --resume to continue it, --overwrite to replace "
                              "it, or another --run_name")


def cpu_name():
    """The CPU's model name (Linux: /proc/cpuinfo), else what platform.processor() says."""
    import platform

    info = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in info.read_text().splitlines()
             if line.startswith("model name")] if info.exists() else []
    return names[0] if names else platform.processor() or "unknown CPU"


def peak_memory_mb():
    """Peak resident memory of this process so far, in MiB: VmHWM on Linux (ru_maxrss there keeps the
    peak of a parent that started this process by fork and exec), ru_maxrss on macOS."""
    import re
    import resource

    status = Path("/proc/self/status")
    hwm = re.search(r"VmHWM:\s+(\d+) kB", status.read_text()) if status.exists() else None
    if hwm:
        return int(hwm.group(1)) / 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 / (1024 if sys.platform == "darwin" else 1)


_KEPT = []  # set once keep_freed_memory() has applied: what malloc_settings reports


def keep_freed_memory():
    """Tell glibc to keep the memory this process frees instead of handing it back to the system
    (mallopt M_MMAP_MAX = 0 and a 2 GiB M_TRIM_THRESHOLD, as MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_
    would). A training or inference step frees and reallocates the same large temporaries (attention
    maps of batch x heads x length^2) every step; handed back, their pages are faulted in and zeroed
    by the kernel again in the next step. It changes no number. Not applied where the user has set
    glibc's MALLOC_* variables (theirs rule), nor outside glibc. Returns whether it applied."""
    import ctypes

    if any(k.startswith("MALLOC_") for k in os.environ) or sys.platform != "linux":
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # glibc's malloc.h
    applied = bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 2 ** 31 - 1))
    if applied:
        _KEPT.append(True)
    return applied


def malloc_settings():
    """How glibc's allocator runs in this process: the MALLOC_* variables, run.py's keep_freed_memory,
    or "glibc defaults". On CPU it moves the timings, never a number the model computes."""
    variables = " ".join(f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith("MALLOC_"))
    return variables or ("keeping freed memory (run.py's default)" if _KEPT else "glibc defaults")
