"""Quantization-aware training of a Transformer encoder with knowledge distillation (Kim et al., 2022).

    python run.py --task mrpc --kd map --wbits 2
    python run.py --task mrpc --kd map --wbits 2 --teacher DIR --data_dir ../shared/data/glue/MRPC
    python run.py --train_file train.csv --validation_file dev.csv --teacher DIR --kd map

Steps: refuse an unusable teacher; load the data (a GLUE task, your files or a hub dataset) and the
teacher; fine-tune the teacher first if its classification head is untrained (cached under
--output_dir/teachers and reused); evaluate teacher and the quantized student before training
(PTQ); run QAT with the chosen KD loss; save and export the student; summarise.

Sections, in order:
    1. arguments     build_parser() mirrors the paper's hyperparameter table
    2. set-up        data, teacher (fine-tuned once, cached), the checks before any work
    3. one run       PTQ baseline, QAT, export, attention-recovery diagnostics, summary
    4. sweep         one results table over KD modes, seeds, teacher seeds and protocols
    5. benchmark     what a QAT step costs against plain fine-tuning; inference
    6. deployment    an exported student on the dev set (--eval_export)
    7. entry point   main(), torchrun set-up, one-line errors

On several processes (CPU: gloo, GPUs: nccl, one process per GPU):
    torchrun --nproc_per_node=N run.py --task mrpc --kd map --wbits 2 ...
--batch_size stays the global batch; rank 0 evaluates, logs and saves.
"""

import argparse
import contextlib
import csv
import functools
import json
import math
import os
import re
import statistics
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

try:
    import torch

    import qatkd
except ImportError as e:  # run outside the project's environment
    sys.exit(f"run.py: error: {e}; install the requirements first (README: set-up)")


# =============================================================================================
# 1. Arguments
# =============================================================================================


def int_list(text):
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


PROTOCOLS = ("default", "original")


def build_parser():
    """run.py's arguments, grouped as the paper's hyperparameter table (README: Flags lists them all)."""
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # error messages on one line, with the fix
    p.error = lambda msg: sys.exit(f"run.py: error: {msg} (see python run.py --help)")  # type: ignore[method-assign]
    g = p.add_argument_group("task and method")
    g.add_argument("--task", default=None, choices=list(qatkd.TASKS),
                   help="GLUE task (or your own data: --train_file/--validation_file, or --dataset)")
    g.add_argument("--kd", default="map", choices=qatkd.KD_MODES,
                   help="attention KD term added to prediction + hidden-state KD: score (TernaryBERT), "
                        "map (attention-map KL), output (attention-output MSE), unified (map + output), "
                        "pred (none). Default: map")
    g.add_argument("--wbits", type=int, default=2, choices=qatkd.WEIGHT_BITS,
                   help="weight bits: 1 binary, 2 ternary (paper), 4/8 uniform, 32 full precision. Default: 2")
    g.add_argument("--abits", type=int, default=8,
                   help="activation bits, 2..16 or 32 (full precision). Default: 8")
    g.add_argument("--map_coeff", type=float, default=1.0, help="weight of the attention-map loss. Default: 1")
    g.add_argument("--output_coeff", type=float, default=1.0,
                   help="weight of the attention-output loss. Default: 1")
    g.add_argument("--gt_coeff", type=float, default=0.0,
                   help="add this times the ground-truth cross-entropy to the KD loss (paper: 0). Default: 0")
    g.add_argument("--original_padding", action="store_true",
                   help="the original code's protocol: pad every training and evaluation batch to --max_len and "
                        "average the rep/output/score MSEs over padding too (default: batches padded to their "
                        "longest example, padding excluded from every loss)")
    g = p.add_argument_group("models and data")
    g.add_argument("--teacher", default="bert-base-uncased",
                   help="hub id or local directory of the full-precision teacher; if its classification head "
                        "is untrained it is fine-tuned first and cached. Default: bert-base-uncased")
    g.add_argument("--data_dir", default=None,
                   help="directory with the GLUE TSV files of the task (train.tsv, dev.tsv); "
                        "default: download nyu-mll/glue from the hub")
    g = p.add_argument_group("your own data (instead of --task): text classification or regression")
    g.add_argument("--train_file", default=None, help="training data: .csv, .tsv, .json or .jsonl")
    g.add_argument("--validation_file", default=None, help="dev data, same columns as --train_file")
    g.add_argument("--dataset", default=None, help="a dataset on the Hugging Face hub, by name")
    g.add_argument("--dataset_config", default=None, help="its configuration, if it has several")
    g.add_argument("--validation_split", default="validation", help="--dataset's dev split. Default: validation")
    g.add_argument("--text_columns", type=lambda s: s.split(","), default=None,
                   help="one or two comma-separated text columns. Default: sentence1,sentence2 if present, else "
                        "the columns other than the label")
    g.add_argument("--label_column", default="label",
                   help="names or integers: classification (classes sorted); floats: regression. Default: label")
    g.add_argument("--output_dir", default="runs",
                   help="root of all outputs: teachers/ (fine-tuned teachers) and one folder per run. Default: runs")
    g.add_argument("--run_name", default=None,
                   help="folder of this run under --output_dir. Default: TASK-KD-wWaA-seedS")
    g.add_argument("--overwrite", action="store_true",
                   help="replace an earlier run in the same folder (a sweep reruns runs made with other arguments)")
    g.add_argument("--mix_commits", action="store_true",
                   help="let --resume and --sweep reuse runs made by another commit of this code (recorded in their "
                        "args.json); default: refused, so that a table never mixes code versions")
    g.add_argument("--resume", action="store_true",
                   help="continue an interrupted run from its checkpoint (same arguments); the result is the same "
                        "as an uninterrupted run's")
    g.add_argument("--save_every", type=int, default=qatkd.TrainConfig.save_every,
                   help="write a checkpoint every N steps (and on Ctrl-C); 0: only on Ctrl-C. Default: 100")
    g = p.add_argument_group("training (paper: 3 epochs, lr 2e-5, batch 32 / 16 for CoLA)")
    g.add_argument("--epochs", type=float, default=qatkd.TrainConfig.epochs, help="QAT epochs. Default: 3")
    g.add_argument("--lr", type=float, default=qatkd.TrainConfig.lr, help="peak learning rate. Default: 2e-5")
    g.add_argument("--batch_size", type=int, default=None, help="default: 32, 16 for CoLA")
    g.add_argument("--max_len", type=int, default=None, help="max tokens per example. Default: 128, 64 for CoLA/SST-2")
    g.add_argument("--warmup", type=float, default=qatkd.TrainConfig.warmup, help="fraction of steps of linear warm-up. Default: 0.1")
    g.add_argument("--optimizer", default=qatkd.TrainConfig.optimizer, choices=qatkd.OPTIMIZERS,
                   help="bertadam: the official code's Adam without bias correction, gradients clipped per tensor "
                        "at 1.0; adamw: torch's AdamW with one global clip at 1.0. Default: bertadam")
    g.add_argument("--eval_every", type=int, default=None,
                   help="evaluate on dev every N steps (and at the end). Default: per task, e.g. 50 for MRPC")
    g.add_argument("--max_steps", type=int, default=qatkd.TrainConfig.max_steps, help="stop after N steps (0: run all epochs)")
    g.add_argument("--seed", type=int, default=qatkd.TrainConfig.seed, help="seed of QAT (data order, dropout). Default: 42")
    g.add_argument("--recompute", action="store_true",
                   help="recompute each student layer's forward in backward (activation checkpointing): the same "
                        "numbers in less memory, one more student forward per step")
    g.add_argument("--keep_denormals", action="store_true",
                   help="compute with denormal floats on CPU (slow on x86) instead of flushing them to zero")
    g = p.add_argument_group("teacher fine-tuning (when the teacher's head is untrained)")
    g.add_argument("--teacher_epochs", type=float, default=qatkd.TrainConfig.epochs, help="Default: 3")
    g.add_argument("--teacher_lr", type=float, default=qatkd.TrainConfig.lr, help="Default: 2e-5")
    g.add_argument("--teacher_seed", type=int, default=42,
                   help="seed of teacher fine-tuning (the new head's initialisation, data order, dropout); one seed, "
                        "one cached teacher. Default: 42")
    g = p.add_argument_group("analysis (the paper's attention-recovery measures)")
    g.add_argument("--rank_samples", type=int, default=64,
                   help="dev examples for the ranking-loss and cover-length diagnostics (cost grows as length^3). "
                        "Default: 64")
    g.add_argument("--sweep", action="store_true",
                   help="run teacher, PTQ and QAT for each --sweep_kd mode and --seeds seed, and write one results "
                        "table (OUTPUT_DIR/sweep-TASK-wWaA.md and .csv); finished runs are reused")
    g.add_argument("--sweep_kd", type=lambda s: s.split(","), default=list(qatkd.KD_MODES),
                   help="comma-separated KD modes for --sweep. Default: pred,score,map,output,unified")
    g.add_argument("--seeds", type=int_list, default=[42], help="comma-separated QAT seeds for --sweep. Default: 42")
    g.add_argument("--sweep_teacher_seeds", type=int_list, default=None,
                   help="comma-separated teacher seeds for --sweep: one fine-tuned teacher each. Default: --teacher_seed")
    g.add_argument("--sweep_protocols", type=lambda s: s.split(","), default=["default"],
                   help="comma-separated protocols for --sweep: default, original (as --original_padding). "
                        "Default: default")
    g = p.add_argument_group("benchmark (no training: times steps on one random batch of --batch_size x --max_len)")
    g.add_argument("--benchmark", action="store_true",
                   help="time a plain FP fine-tuning step against QAT steps (map, score, output, unified) and "
                        "inference; medians after warm-up, quantizer and loss shares, peak memory; GPU if present")
    g.add_argument("--bench_model", default="teacher", choices=("teacher", "bert-base"),
                   help="teacher: the --teacher architecture and weights; bert-base: a randomly initialised "
                        "BERT-base (12 layers, hidden 768), nothing downloaded. Default: teacher")
    g.add_argument("--bench_steps", type=int, default=10,
                   help="timed rounds (one step of every measurement each). Default: 10")
    g.add_argument("--bench_warmup", type=int, default=2, help="untimed rounds first. Default: 2")
    g.add_argument("--bench_memory", action="store_true",
                   help="also measure each phase's peak memory in a fresh process of its own (build, then 4 steps), "
                        "so that no phase hides another's: resident set size on CPU, allocator peak on a GPU")
    g.add_argument("--bench_phase", default=None, help=argparse.SUPPRESS)  # internal: the child of --bench_memory
    g.add_argument("--bench_inference", action="store_true",
                   help="time inference only: teacher, fake-quant student, exported integer student (ratios to the "
                        "teacher)")
    g = p.add_argument_group("deployment (no training: evaluates an exported student, student_packed/)")
    g.add_argument("--eval_export", default=None, metavar="DIR",
                   help="evaluate the exported student in DIR on the task's dev set: metric, examples per second, "
                        "memory")
    g.add_argument("--backend", default="int8", choices=("int8", "fake"),
                   help="int8: integer inference; fake: fp32 weights, fake-quantized activations. Default: int8")
    return p


def parse_args(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    if not (2 <= args.abits <= 16 or args.abits == 32):
        p.error(f"--abits {args.abits} is out of range; use 2..16, or 32 for full precision")
    for name in ("batch_size", "max_len", "eval_every", "max_steps", "save_every", "rank_samples", "bench_steps",
                 "bench_warmup"):
        v = getattr(args, name)
        least = 1 if name in ("batch_size", "max_len", "bench_steps") else 0
        if v is not None and v < least:
            p.error(f"--{name} must be at least {least}, got {v}")
    for name in ("epochs", "lr", "teacher_epochs", "teacher_lr"):  # a step size or a length: positive
        v = getattr(args, name)
        if not (v > 0 and math.isfinite(v)):
            p.error(f"--{name} must be a positive number, got {v:g}")
    for name in ("map_coeff", "output_coeff", "gt_coeff"):  # loss weights: a negative one would be maximised
        v = getattr(args, name)
        if not (v >= 0 and math.isfinite(v)):
            p.error(f"--{name} must be 0 or more, got {v:g}")
    if not 0 <= args.warmup < 1:
        p.error(f"--warmup is the fraction of steps that warm up: 0 or more and below 1, got {args.warmup:g}")
    if Path(args.output_dir).exists() and not Path(args.output_dir).is_dir():
        p.error(f"--output_dir {args.output_dir} is a file, not a folder; pass a folder")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and (args.sweep or args.benchmark):
        p.error(f"--{'sweep' if args.sweep else 'benchmark'} runs in one process; start it without torchrun")
    if world > 1 and args.batch_size is not None and args.batch_size < world:
        p.error(f"--batch_size {args.batch_size} is the global batch and must be at least the number of "
                f"processes ({world})")
    bad = [k for k in args.sweep_kd if k not in qatkd.KD_MODES]
    if bad:
        p.error(f"--sweep_kd: unknown KD mode {bad[0]!r}; use some of {','.join(qatkd.KD_MODES)}")
    bad = [k for k in args.sweep_protocols if k not in PROTOCOLS]
    if bad:
        p.error(f"--sweep_protocols: unknown protocol {bad[0]!r}; use some of {','.join(PROTOCOLS)}")
    args.sweep_teacher_seeds = args.sweep_teacher_seeds or [args.teacher_seed]
    sources = [f for f, on in (("--task", args.task), ("--train_file", args.train_file), ("--dataset", args.dataset))
               if on]
    if len(sources) != 1:
        p.error("pass one of --task (GLUE), --train_file with --validation_file, or --dataset"
                + (f"; got {' and '.join(sources)}" if sources else ""))
    if bool(args.train_file) != bool(args.validation_file):
        p.error("--train_file and --validation_file go together")
    if args.text_columns is not None and not 1 <= len(args.text_columns) <= 2:
        p.error(f"--text_columns takes one or two columns, got {len(args.text_columns)}")
    if args.benchmark and not args.task:
        p.error("--benchmark times a GLUE task's shapes: pass --task")
    if args.task:
        task = qatkd.TASKS[args.task]
        args.batch_size = args.batch_size or task.batch_size
        args.max_len = args.max_len or task.max_len
        args.eval_every = task.eval_every if args.eval_every is None else args.eval_every
        args.data_name = args.task
    else:  # your own data: the evaluation period follows its size (qatkd.data_task), once it is read
        args.batch_size, args.max_len = args.batch_size or 32, args.max_len or 128
        args.data_name = qatkd.data_name(args.train_file) if args.train_file else (
            args.dataset.replace("/", "--") + (f"-{args.dataset_config}" if args.dataset_config else ""))
    args.run_name = args.run_name or default_run_name(args)
    return args


def default_run_name(args):
    """TASK-KD-wWaA-seedS, then -tseedT for a teacher seed other than 42 and -original for the
    original padding protocol: runs that differ in what they compute never share a folder."""
    return (f"{args.data_name}-{args.kd}-w{args.wbits}a{args.abits}-seed{args.seed}"
            + (f"-tseed{args.teacher_seed}" if args.teacher_seed != 42 else "")
            + ("-original" if args.original_padding else ""))


# =============================================================================================
# 2. Set-up: data, teacher, the checks that come before any work
# =============================================================================================


@dataclass
class Setup:
    """What every run of a task shares: data, teacher, features, the teacher's dev score."""

    task: qatkd.Task
    teacher: object
    tokenizer: object
    teacher_path: str
    train: list
    dev: dict
    pad_id: int
    teacher_metrics: dict


def load_data(args):
    """(Task, {split: examples}): a GLUE task, your own files, or a hub dataset."""
    if args.task:
        task = qatkd.TASKS[args.task]
        return task, qatkd.load_glue(task, args.data_dir)
    if args.train_file:
        return qatkd.load_data_files(args.train_file, args.validation_file, args.text_columns, args.label_column)
    return qatkd.load_hub_dataset(args.dataset, args.dataset_config, args.validation_split, args.text_columns,
                                  args.label_column)


def get_teacher(args, task, data):
    """The task teacher: as given if its head is trained (the data's labels then put in its order, by
    name), else fine-tuned once and cached. Returns teacher, tokenizer, its path, task and data."""
    qatkd.set_seed(args.teacher_seed)  # an untrained head is initialised at random: seeded, so one seed, one teacher
    teacher, tokenizer, trained = qatkd.load_teacher(args.teacher, task)
    if trained:
        task, data, permuted = qatkd.align_labels(task, data, teacher.config.id2label)
        if permuted:
            print(f"the teacher orders the classes {', '.join(task.names or task.labels)}: the data's labels are "
                  "mapped onto that order")
        return teacher, tokenizer, args.teacher, task, data
    path = Path(args.teacher).resolve()
    slug = f"{path.parent.name}-{path.name}" if path.is_dir() else args.teacher.replace("/", "--")
    cache = Path(args.output_dir) / "teachers" / f"{task.name}-{slug}-seed{args.teacher_seed}"
    recipe = {"base": args.teacher, "epochs": args.teacher_epochs, "lr": args.teacher_lr, "seed": args.teacher_seed,
              "batch_size": args.batch_size, "max_len": args.max_len, "warmup": args.warmup, "optimizer": "adamw",
              "train_data": qatkd.fingerprint(data["train"])}
    if (cache / "config.json").is_file():
        how = json.loads((cache / "teacher_args.json").read_text()) if (cache / "teacher_args.json").is_file() else {}
        changed = [f"{k} {how[k]} (now {v})" for k, v in recipe.items() if k in how and how[k] != v and k != "base"]
        if changed:
            raise ValueError(f"{cache} holds a teacher fine-tuned with other settings: {', '.join(changed)}; pass the "
                             "same settings, or delete that folder to fine-tune again")
        print(f"reusing the teacher fine-tuned in {cache} ({', '.join(f'{k} {v}' for k, v in how.items())}); "
              "delete it to fine-tune again")
        teacher, tokenizer, _ = qatkd.load_teacher(str(cache), task)
        task, data, _ = qatkd.align_labels(task, data, teacher.config.id2label)
        return teacher, tokenizer, str(cache), task, data
    print(f"teacher {args.teacher} has no trained {task.name} head: fine-tuning it in full precision "
          f"({args.teacher_epochs:g} epochs, lr {args.teacher_lr:g}) into {cache}")
    qatkd.set_seed(args.teacher_seed)
    qatkd.name_labels(teacher.config, task)  # the fine-tuned teacher, its students and exports carry the class names
    cfg = qatkd.TrainConfig(epochs=args.teacher_epochs, lr=args.teacher_lr, batch_size=args.batch_size,
                            warmup=args.warmup, seed=args.teacher_seed, pad_id=tokenizer.pad_token_id or 0,
                            optimizer="adamw")  # as Hugging Face's run_glue, which the original README suggests
    feats = qatkd.tokenize(data["train"], tokenizer, args.max_len)
    result = qatkd.finetune_teacher(teacher.to(args.device), task, feats, cfg, log=lambda r: None)
    teacher.eval()
    if is_main():  # the other processes hold the same weights (DistributedDataParallel)
        cache.parent.mkdir(parents=True, exist_ok=True)
        qatkd.save_model(teacher, cache, tokenizer, {"teacher_args.json": {**recipe, "steps": result["steps"]}})
    return teacher, tokenizer, str(cache), task, data


def setup(args):
    qatkd.teacher_config(args.teacher)  # an unusable teacher is refused before any data is read
    task, data = load_data(args)
    print(f"{task.name}: {len(data['train'])} train examples, "
          + ", ".join(f"{len(v)} {k}" for k, v in data.items() if k != "train")
          + ("" if task.labels is None else f"; classes {', '.join(task.names or task.labels)}"))
    teacher, tokenizer, teacher_path, task, data = get_teacher(args, task, data)
    teacher.to(args.device)
    pad_id = tokenizer.pad_token_id or 0
    train = qatkd.tokenize(data["train"], tokenizer, args.max_len)
    dev = {k: qatkd.tokenize(v, tokenizer, args.max_len) for k, v in data.items() if k != "train"}
    env = Setup(task, teacher, tokenizer, teacher_path, train, dev, pad_id, {})
    if is_main():  # full precision ignores padding: the teacher's score is the same under both protocols
        env.teacher_metrics = qatkd.evaluate(teacher, task, dev, args.batch_size, pad_id, "eval teacher")
        print(f"teacher (full precision)     {fmt(env.teacher_metrics)}")
    return env


# arguments not compared when a run is resumed or reused by a sweep (--recompute changes no number)
NOT_COMPARED = ("resume", "overwrite", "mix_commits", "save_every", "teacher_path", "code", "keep_denormals",
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


@functools.lru_cache(maxsize=None)
def code_version():
    """The git commit of this code, with "+changes" if qatkd.py or run.py differ from it; "unknown" outside
    a git checkout. Recorded in every run's args.json and metrics.json. Read once, when main() starts: a
    long sweep records the code it runs, even if the files change meanwhile."""
    import subprocess

    here = Path(__file__).resolve().parent
    try:
        git = lambda *a: subprocess.run(["git", *a], cwd=here, capture_output=True, text=True, timeout=10)  # noqa
        commit = git("rev-parse", "--short=12", "HEAD")
        if commit.returncode:
            return "unknown"
        changed = git("status", "--porcelain", "--", "qatkd.py", "run.py").stdout.strip()
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


# =============================================================================================
# 3. One run: PTQ baseline, QAT, export, diagnostics, summary
# =============================================================================================


def run_qat(env, args, ptq=None):
    """One QAT run into OUTPUT_DIR/RUN_NAME; returns its metrics (also written to metrics.json)."""
    start = time.time()
    run_dir = Path(args.output_dir) / args.run_name
    checkpoint, log_path = run_dir / "checkpoint.pt", run_dir / "log.jsonl"
    if not is_main():  # another torchrun process: train on its shard; rank 0 does the rest
        student = qatkd.recompute_layers(qatkd.quantize_student(env.teacher, args.wbits, args.abits), args.recompute)
        qatkd.set_seed(args.seed)
        torch.distributed.barrier()  # rank 0 has removed a replaced run's checkpoint: never load a stale one
        qatkd.train(student, qat_loss(env, args), env.train, train_config(env, args),
                    checkpoint=checkpoint if args.resume else None)
        return None
    run_dir.mkdir(parents=True, exist_ok=True)
    if args.resume:  # the log continues from the checkpoint: drop what was logged after it
        step = qatkd.load_checkpoint(checkpoint)["loop"]["step"]
        print(f"resuming {run_dir} from step {step}")
        kept = [line for line in log_path.read_text().splitlines() if log_step(line) <= step]
        with qatkd.atomic_path(log_path) as tmp:
            tmp.write_text("".join(line + "\n" for line in kept))
    else:
        checkpoint.unlink(missing_ok=True)  # a stale checkpoint of a replaced run
        qatkd.write_json(run_dir / "args.json", {**{k: v for k, v in vars(args).items() if k != "device"},
                                                 "teacher_path": env.teacher_path, "code": code_version()})
    if torch.distributed.is_initialized():
        torch.distributed.barrier()  # the other processes start training only now
    ptq = ptq or ptq_baseline(env, args)
    student = qatkd.recompute_layers(qatkd.quantize_student(env.teacher, args.wbits, args.abits), args.recompute)
    qatkd.set_seed(args.seed)  # after the PTQ evaluation, so every torchrun process starts QAT in one RNG state
    with open(log_path, "a" if args.resume else "w") as log_file:

        def log(record):
            log_file.write(json.dumps(qatkd.json_ready(record)) + "\n")
            log_file.flush()

        result = qatkd.train(student, qat_loss(env, args), env.train, train_config(env, args),
                             lambda: evaluate(env, student, args), env.task.metric, log,
                             desc=f"QAT {args.kd} W{args.wbits}A{args.abits} seed {args.seed}", checkpoint=checkpoint)
    qatkd.save_student(student, run_dir / "student", env.tokenizer)
    sizes = export(env, student, run_dir / "student_packed")
    qat_recovery = recovery(env, student, args)
    print_recovery(ptq["recovery"], qat_recovery)
    plot_recovery(run_dir / "attention_recovery.png", ptq["recovery"], qat_recovery)
    metrics = {"task": env.task.name, "kd": args.kd, "wbits": args.wbits, "abits": args.abits, "seed": args.seed,
               "protocol": "original" if args.original_padding else "default", "code": code_version(),
               "teacher_path": env.teacher_path, "teacher_seed": args.teacher_seed,
               "selection_metric": env.task.metric, "teacher": env.teacher_metrics, "ptq": ptq["metrics"], **result,
               "attention_recovery": {"ptq": ptq["recovery"], "qat": qat_recovery}, "sizes": sizes,
               "wall_seconds": time.time() - start, "peak_memory_mb": peak_memory_mb(),
               "torch_threads": torch.get_num_threads()}
    qatkd.write_json(run_dir / "metrics.json", metrics)
    checkpoint.unlink(missing_ok=True)  # the run is complete: student/ and metrics.json hold it
    print(f"\n== summary: {env.task.name}, KD {args.kd}, W{args.wbits}A{args.abits}, seed {args.seed} ==")
    print(f"teacher                      {fmt(env.teacher_metrics)}")
    print(f"student before QAT (PTQ)     {fmt(ptq['metrics'])}")
    print(f"student best (step {result['best_step'] or '-':>5})    {fmt(result['best'])}")
    print(f"student last (step {result['last_step']:>5})    {fmt(result['last'])}")
    print(f"{result['steps']} steps, {result['seconds_per_step']:.2f} s per training step, wall time "
          f"{metrics['wall_seconds'] / 60:.1f} min, peak memory {metrics['peak_memory_mb'] / 1024:.1f} GB; "
          f"outputs in {run_dir}")
    return metrics


def train_config(env, args):
    return qatkd.TrainConfig(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, warmup=args.warmup,
                             eval_every=env.task.eval_every if args.eval_every is None else args.eval_every,
                             max_steps=args.max_steps, seed=args.seed, pad_id=env.pad_id,
                             optimizer=args.optimizer, save_every=args.save_every, pad_to=pad_to(args) or 0)


def qat_loss(env, args):
    return qatkd.qat_loss_fn(env.teacher, env.task, args.kd, args.map_coeff, args.output_coeff, args.gt_coeff,
                             args.original_padding)


def pad_to(args):
    """Batches padded to --max_len under --original_padding, else to their longest example."""
    return args.max_len if args.original_padding else None


def evaluate(env, model, args, desc="eval"):
    return qatkd.evaluate(model, env.task, env.dev, args.batch_size, env.pad_id, desc, pad_to(args))


def recovery(env, student, args):
    """Attention-recovery diagnostics of a student on the (first) dev split."""
    dev = next(iter(env.dev.values()))
    return qatkd.attention_recovery(student, env.teacher, dev, args.batch_size, env.pad_id, args.rank_samples,
                                    pad_to(args))


def ptq_baseline(env, args):
    """The quantized student before any training: dev score and attention-recovery diagnostics."""
    student = qatkd.quantize_student(env.teacher, args.wbits, args.abits)
    metrics = evaluate(env, student, args, "eval PTQ")
    print(f"student W{args.wbits}A{args.abits} before QAT    {fmt(metrics)}")
    return {"metrics": metrics, "recovery": recovery(env, student, args)}


def print_recovery(ptq, qat):
    """Per-layer table: each measure as PTQ -> QAT."""
    names = [n for n in qatkd.DIAGNOSTICS if n in ptq]
    print("\nattention recovery on dev, per layer (PTQ: quantized, before QAT -> after QAT)")
    print("layer " + "".join(f"{n:>22}" for n in names))
    for layer in range(len(ptq[names[0]])):
        print(f"{layer + 1:>5} " + "".join(f"{ptq[n][layer]:>10.4f} -> {qat[n][layer]:<8.4f}" for n in names))


def plot_recovery(path, ptq, qat):
    """One panel per measure, layers on the x-axis, PTQ vs QAT. Needs matplotlib; says so if absent."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        if not getattr(plot_recovery, "warned", False):  # say it once per process, then go on
            print("matplotlib is not installed: no attention-recovery plot (pip install matplotlib for one)")
            plot_recovery.warned = True
        return
    names = [n for n in qatkd.DIAGNOSTICS if n in ptq]
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3))
    for ax, n in zip(axes, names):
        layers = range(1, len(ptq[n]) + 1)
        ax.plot(layers, ptq[n], "o-", label="PTQ (no training)")
        ax.plot(layers, qat[n], "s-", label="QAT")
        ax.set(title=n.replace("_", " "), xlabel="layer", xticks=list(layers))
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def log_step(line):
    """The step of a log.jsonl line; a line torn by a kill counts as after every checkpoint."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError):
        return float("inf")


def export(env, student, path):
    """Packed low-bit export of the student, and a size table against the fp32 teacher."""
    sizes = qatkd.export_quantized(student, path, env.tokenizer)
    sizes["teacher_fp32_bytes"] = sum(p.numel() * 4 for p in env.teacher.state_dict().values())
    sizes["file_bytes"] = (Path(path) / "model.safetensors").stat().st_size
    sizes["ratio"] = sizes["teacher_fp32_bytes"] / sizes["file_bytes"]
    print(f"\npacked student exported to {path}")
    for label, key in (("teacher, fp32", "teacher_fp32_bytes"), ("packed student (file)", "file_bytes"),
                       ("  low-bit codes and scales", "packed_bytes"), ("  kept in full precision", "fp_bytes")):
        print(f"{label:<28}{sizes[key]:>14,} bytes")
    print(f"{'ratio':<28}{sizes['ratio']:>14.1f}x smaller")
    return sizes


def defined(v):
    return v is not None and not math.isnan(v)


def fmt(metrics):
    """Dev metrics in %, one line; an undefined value (a correlation of constant predictions) as 'undefined'."""
    return "  ".join(f"{k} {100 * v:6.2f}" if defined(v) else f"{k} undefined"
                     for k, v in metrics.items()) if metrics else "-"


def peak_memory_mb():
    """Peak resident memory of this process so far (Linux and macOS), in MiB."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 / (1024 if sys.platform == "darwin" else 1)


# =============================================================================================
# 4. Sweep: one results table over KD modes, seeds, teachers and protocols
# =============================================================================================


def sweep(args):
    """Teacher, PTQ and QAT for every --sweep_teacher_seeds teacher, --sweep_protocols protocol,
    --sweep_kd mode and --seeds seed; one table (Markdown and CSV) with mean ± std over seeds.

    A run whose folder already holds metrics.json is read, not repeated, so an interrupted sweep
    continues where it stopped (an interrupted run resumes from its checkpoint). A reused run must
    have been made with the same arguments and the same commit of the code: otherwise the sweep
    stops with one line naming the difference (--overwrite reruns it; --mix_commits accepts runs of
    another commit).
    """
    rows, teachers, start = [], [], time.time()
    for teacher_seed in args.sweep_teacher_seeds:
        env = setup(argparse.Namespace(**{**vars(args), "teacher_seed": teacher_seed}))
        metric = env.task.metric
        teachers.append(f"teacher seed {teacher_seed}: {env.teacher_path}, {fmt(env.teacher_metrics)}")
        rows.append((teacher_seed, "-", "teacher (FP)", [{"best": env.teacher_metrics, "last": env.teacher_metrics}]))
        for protocol in args.sweep_protocols:
            base = argparse.Namespace(**{**vars(args), "teacher_seed": teacher_seed, "sweep": False, "resume": False,
                                         "original_padding": protocol == "original"})
            ptq = ptq_baseline(env, base)
            rows.append((teacher_seed, protocol, f"PTQ W{args.wbits}A{args.abits}",
                         [{"best": ptq["metrics"], "last": ptq["metrics"],
                           "attention_recovery": {"qat": ptq["recovery"]}}]))
            for kd in args.sweep_kd:
                runs = [sweep_run(env, argparse.Namespace(**{**vars(base), "kd": kd, "seed": seed}), ptq)
                        for seed in args.seeds]
                rows.append((teacher_seed, protocol, f"QAT {kd}", runs))
    return write_sweep_table(args, metric, rows, teachers, time.time() - start)


def sweep_run(env, one, ptq):
    """One run of a sweep: read if finished with the same arguments and code, resumed if interrupted,
    else run (again, under --overwrite)."""
    one.run_name = default_run_name(one)
    run_dir = Path(one.output_dir) / one.run_name
    done, stored = run_dir / "metrics.json", run_dir / "args.json"
    if stored.is_file():
        old = json.loads(stored.read_text())
        changed = differing_args(old, one) + differing_code(old, one)
        if changed and not one.overwrite:
            raise ValueError(f"sweep: {run_dir} was made with other settings: {', '.join(changed)}; pass --overwrite "
                             "to rerun it" + (", or --mix_commits to use it" if not differing_args(old, one) else ""))
        if not changed and done.is_file():
            return json.loads(done.read_text())
        one.resume = not changed and (run_dir / "checkpoint.pt").is_file()  # an interrupted run continues
        one.overwrite = not one.resume  # else start again: a different run, or one stopped before its first checkpoint
    return run_qat(env, one, ptq)


def mean(values):
    return sum(values) / len(values)


def mean_std(values):
    values = [v for v in values if defined(v)]  # an undefined evaluation (null) is left out
    if not values:
        return "-"
    if len(values) == 1:
        return f"{100 * values[0]:.2f}"
    m = sum(values) / len(values)
    sd = (sum((v - m) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else 0.0
    return f"{100 * m:.2f} ± {100 * sd:.2f}"


SWEEP_MEASURES = ("map_kl", "output_mse", "output_cos", "rank_loss", "cover_length")


def write_sweep_table(args, metric, rows, teachers, seconds):
    """The sweep's table: one row per (teacher seed, protocol, model), mean ± std over QAT seeds of
    the best and last dev scores and of every diagnostic's mean over layers."""
    others = [k for k in rows[0][3][0]["last"] if k not in (metric, "acc_and_f1")]
    head = (["teacher seed", "protocol", "model", "seeds", f"best {metric}", f"last {metric}"]
            + [f"last {k}" for k in others] + list(SWEEP_MEASURES) + ["minutes per run"])
    table = []
    for teacher_seed, protocol, name, runs in rows:
        rec = [r.get("attention_recovery", {}).get("qat") for r in runs]
        measures = [("-" if None in rec else f"{mean([mean(r[m]) for r in rec]):.4g}") for m in SWEEP_MEASURES]
        wall = [r["wall_seconds"] / 60 for r in runs if "wall_seconds" in r]
        table.append([str(teacher_seed), protocol, name, ",".join(str(r["seed"]) for r in runs) if wall else "-",
                      mean_std([(r["best"] or {}).get(metric) for r in runs]),
                      mean_std([r["last"][metric] for r in runs])]
                     + [mean_std([r["last"][k] for r in runs]) for k in others] + measures
                     + [f"{mean(wall):.1f}" if wall else "-"])
    md = "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
                   + ["| " + " | ".join(r) + " |" for r in table])
    note = (f"{args.data_name}, W{args.wbits}A{args.abits}, code {code_version()}; "
            + "; ".join(teachers) + f"; sweep wall time {seconds / 60:.0f} min")
    suffix = ("" if args.sweep_protocols == ["default"] else "-" + "+".join(args.sweep_protocols)) + (
        "" if args.sweep_teacher_seeds == [42] else "-tseeds" + "+".join(map(str, args.sweep_teacher_seeds)))
    stem = Path(args.output_dir) / f"sweep-{args.data_name}-w{args.wbits}a{args.abits}{suffix}"
    stem.with_suffix(".md").write_text(note + "\n\n" + md + "\n")
    with open(stem.with_suffix(".csv"), "w", newline="") as f:
        csv.writer(f).writerows([head] + table)
    print(f"\n== sweep: {args.data_name}, {metric} on dev, mean ± std over seeds ==\n{note}\n\n{md}\n"
          f"written to {stem}.md and {stem}.csv")
    return table


# =============================================================================================
# 5. Benchmark: what a QAT step costs against plain fine-tuning, and inference
# =============================================================================================


@contextlib.contextmanager
def peak_memory(device, out):
    """Append to `out` the peak memory (MiB) inside the block: the CUDA allocator's peak on a GPU,
    else the process's resident set size sampled every 10 ms from /proc (Linux), else ru_maxrss."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        yield
        out.append(torch.cuda.max_memory_allocated(device) / 2 ** 20)
        return
    statm = Path("/proc/self/statm")
    if not statm.exists():
        yield
        out.append(peak_memory_mb())
        return
    page, peak, stop = os.sysconf("SC_PAGE_SIZE"), [0], threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], int(statm.read_text().split()[1]) * page)
            stop.wait(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield
    finally:
        stop.set()
        sampler.join()
        out.append(peak[0] / 2 ** 20)


def benchmark(args, argv=()):
    """Time, in one process on one random batch: a plain FP fine-tuning step (the HF default sdpa
    attention, and the eager attention QAT uses), a QAT step per KD mode (teacher forward + student
    forward/backward + loss + optimizer step, exactly train()'s), the same map step with the
    quantizers off (W32A32) to get the quantizers' share, the KD loss alone (forward + backward on
    stored internals) to get the loss's share, and inference: teacher, fake-quant student, exported
    integer student. Phases are timed in interleaved rounds, so their ratios are measured side by
    side. Writes a Markdown table and JSON to OUTPUT_DIR/benchmark-MODEL-bB-sS-DEVICE.{md,json}."""
    task = qatkd.TASKS[args.task]
    teacher, name = bench_teacher(args, task)
    batch = bench_batch(args, task, teacher)
    where = (torch.cuda.get_device_name(args.device) if args.device.type == "cuda"
             else f"CPU, {torch.get_num_threads()} threads, malloc: {malloc_settings()}")
    params = sum(p.numel() for p in teacher.parameters())
    print(f"benchmark: {name} ({params / 1e6:.1f}M parameters), batch {args.batch_size} x length {args.max_len} "
          f"(no padding), W{args.wbits}A{args.abits}, {where}; median of {args.bench_steps} rounds after "
          f"{args.bench_warmup} warm-up rounds")
    phases = bench_phases(args, task, teacher, batch)
    if args.bench_phase is not None:  # a child of --bench_memory: this one phase alone
        return phase_memory(phases[args.bench_phase], args.device)
    rows, steps = build_phases(phases, args.device)
    timed_rounds(rows, steps, args.bench_steps, args.bench_warmup, args.device)
    if args.bench_memory:
        fresh_process_memory(rows, args, argv)
    return bench_report(args, name, params, where, rows)


def malloc_settings():
    """glibc's MALLOC_* variables of this process, or "glibc defaults": on CPU they move the timings
    (freed memory handed back to the system is faulted in and zeroed again when next used), never a
    number the model computes."""
    return " ".join(f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith("MALLOC_")) or "glibc defaults"


def phase_memory(build, device):
    """Build one phase and run 4 steps of it in this (fresh) process; print its peak memory in MiB
    as the last line: the process's peak resident set (VmHWM) on CPU, the allocator's peak on a GPU;
    on CPU with glibc also malloc's peaks (heap_peaks)."""
    heap = heap_peaks() if device.type == "cpu" else None
    step = build()
    for _ in range(4):
        step()
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2 ** 20
    else:
        status = Path("/proc/self/status")
        peak = (int(re.search(r"VmHWM:\s+(\d+) kB", status.read_text()).group(1)) / 1024 if status.exists()
                else peak_memory_mb())
    print(json.dumps({"peak_memory_mb": peak, **(heap() if heap else {})}))


def heap_peaks():
    """Sample glibc's malloc statistics (mallinfo2) every 2 ms from now on; returns a function giving
    the peaks so far in MiB: "malloc_in_use_mb", the bytes handed out (live tensors and everything
    else malloc'd), and "malloc_footprint_mb", the heap and mmapped blocks it holds. The footprint
    above the bytes in use is freed memory glibc keeps. None where there is no glibc."""
    import ctypes

    class MallInfo2(ctypes.Structure):
        _fields_ = [(f, ctypes.c_size_t) for f in
                    ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                     "keepcost")]
    try:
        mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return None
    mallinfo2.restype = MallInfo2
    peak = {"malloc_in_use_mb": 0.0, "malloc_footprint_mb": 0.0}

    def sample():
        while True:
            m = mallinfo2()
            peak["malloc_in_use_mb"] = max(peak["malloc_in_use_mb"], (m.uordblks + m.hblkhd) / 2 ** 20)
            peak["malloc_footprint_mb"] = max(peak["malloc_footprint_mb"], (m.arena + m.hblkhd) / 2 ** 20)
            time.sleep(0.002)

    threading.Thread(target=sample, daemon=True).start()
    return lambda: dict(peak)


def fresh_process_memory(rows, args, argv):
    """--bench_memory: each phase once more, alone in a fresh process (same arguments), for its peak memory."""
    import subprocess

    from tqdm.auto import tqdm

    argv = [a for a in argv if a != "--bench_memory"]
    for r in tqdm(rows, desc="memory, a process per phase", dynamic_ncols=True):
        p = subprocess.run([sys.executable, str(Path(__file__).resolve()), *argv, "--bench_phase", r["step"]],
                           capture_output=True, text=True)
        if p.returncode:
            raise RuntimeError(f"--bench_memory: the process for phase {r['step']!r} failed: {p.stderr[-2000:]}")
        peaks = json.loads(p.stdout.strip().splitlines()[-1])
        r["fresh_peak_memory_mb"] = peaks.pop("peak_memory_mb")
        r.update({f"fresh_{k}": v for k, v in peaks.items()})


def bench_teacher(args, task):
    """The benchmarked model: the --teacher's architecture and weights, or a random BERT-base."""
    from transformers import AutoModelForSequenceClassification, BertConfig

    if args.bench_model == "bert-base":
        teacher = AutoModelForSequenceClassification.from_config(
            BertConfig(num_labels=task.num_labels), attn_implementation="qatkd")
        name = "random BERT-base"
    else:
        teacher = qatkd.load_teacher(args.teacher, task)[0]
        path = Path(args.teacher).resolve()  # a directory is named with its parent: ".../minilm/model"
        name = f"{path.parent.name}-{path.name}" if path.is_dir() else args.teacher
    return teacher.to(args.device).eval(), name


def bench_batch(args, task, teacher):
    """One random batch of --batch_size x --max_len tokens, no padding, with labels."""
    B, S, vocab = args.batch_size, args.max_len, teacher.config.vocab_size
    gen = torch.Generator().manual_seed(args.seed)
    batch = {"input_ids": torch.randint(vocab // 10, vocab, (B, S), generator=gen),
             "attention_mask": torch.ones(B, S, dtype=torch.long), "token_type_ids": torch.zeros(B, S, dtype=torch.long),
             "labels": torch.randint(0, task.num_labels, (B,), generator=gen)}
    return {k: v.to(args.device) for k, v in batch.items()}


def train_step(model, loss_fn, batch, opt=None):
    """One optimizer step of loss_fn(model, batch), as train() takes it (a function to time)."""
    opt = opt or qatkd.make_optimizer(model, qatkd.TrainConfig(), total_steps=1000)[0]

    def step():
        loss, _ = loss_fn(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def inference_step(model, batch):
    """A forward pass without autograd (a function to time)."""
    inputs = qatkd.model_inputs(model, batch)
    return torch.no_grad()(lambda: model(**inputs))


def cross_entropy(model, b):
    """Plain fine-tuning's loss."""
    return torch.nn.functional.cross_entropy(model(**qatkd.model_inputs(model, b)).logits, b["labels"]), {}


def kd_loss_step(teacher, student, batch, kd):
    """kd_loss forward + backward on stored internals of teacher and student (a function to time)."""
    with torch.no_grad():
        t = qatkd.forward_internals(teacher, batch)
    s = qatkd.forward_internals(student, batch)
    s = qatkd.Internals(*[[x.detach().requires_grad_() for x in v] if isinstance(v, list) else
                          v.detach().requires_grad_() for v in vars(s).values()])
    return lambda: qatkd.kd_loss(s, t, batch["attention_mask"], kd)[0].backward()


def exported_step(student, backend, batch, device):
    """Inference of the student as it ships: exported, then loaded with a backend (a function to time)."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        qatkd.export_quantized(student, d)
        return inference_step(qatkd.load_quantized(d, backend=backend, device=device), batch)


RECOMPUTED = "QAT map {wa}, layers recomputed in backward (--recompute)"
UNFUSED = "QAT map {wa}, unfused (plain quantizers and saved tensors, every internal kept)"


def unfused(step):
    """step, run with qatkd's fused quantizers and lean saved tensors (LEAN_SAVES) switched off: the
    QAT step as it was before they came (the same numbers; a function to time)."""
    def run():
        before = qatkd.FUSED, qatkd.LEAN_SAVES
        qatkd.FUSED = qatkd.LEAN_SAVES = False
        try:
            step()
        finally:
            qatkd.FUSED, qatkd.LEAN_SAVES = before

    return run


def unfused_map_loss(teacher):
    """qat_loss_fn(kd="map") keeping every attention internal, scores too, as before (a loss_fn)."""
    def loss_fn(student, b):
        with torch.no_grad():
            t = qatkd.forward_internals(teacher, b)
        return qatkd.kd_loss(qatkd.forward_internals(student, b), t, b["attention_mask"], "map")

    return loss_fn


def bench_phases(args, task, teacher, batch):
    """{label: build}, each build() returning the function that one round times."""
    import copy

    def fp(attn):
        model = copy.deepcopy(teacher).train()
        model.set_attn_implementation(attn)
        return model

    def quantized(wbits, abits, training=True):
        return qatkd.quantize_student(teacher, wbits, abits).train(training)

    wa, kds = f"W{args.wbits}A{args.abits}", ("map", "score", "output", "unified")
    shared = {}  # one student and optimizer for the four KD modes: memory for one, not four

    def student():
        if not shared:
            shared["student"] = quantized(args.wbits, args.abits)
            shared["opt"] = qatkd.make_optimizer(shared["student"], qatkd.TrainConfig(), total_steps=1000)[0]
        return shared["student"]

    phases = {}
    if not args.bench_inference:  # the training phases
        phases["FP fine-tuning (sdpa attention)"] = lambda: train_step(fp("sdpa"), cross_entropy, batch)
        phases["FP fine-tuning (eager attention)"] = lambda: train_step(fp("eager"), cross_entropy, batch)
        for kd in kds:
            phases[f"QAT {kd} {wa}"] = lambda kd=kd: train_step(student(), qatkd.qat_loss_fn(teacher, task, kd), batch,
                                                               shared["opt"])
        phases[UNFUSED.format(wa=wa)] = lambda: unfused(train_step(student(), unfused_map_loss(teacher), batch,
                                                                   shared["opt"]))
        phases[RECOMPUTED.format(wa=wa)] = lambda: train_step(qatkd.recompute_layers(quantized(args.wbits, args.abits)),
                                                              qatkd.qat_loss_fn(teacher, task), batch)
        phases["QAT map, quantizers off (W32A32)"] = lambda: train_step(quantized(32, 32),
                                                                      qatkd.qat_loss_fn(teacher, task), batch)
        for kd in kds:
            phases[f"KD loss {kd} alone (forward + backward)"] = lambda kd=kd: kd_loss_step(teacher, student(), batch,
                                                                                             kd)
    phases["inference: teacher"] = lambda: inference_step(teacher, batch)
    # inference on its own copy in eval mode: the shared student keeps training, with dropout
    phases[f"inference: student {wa}"] = lambda: inference_step(quantized(args.wbits, args.abits, False), batch)
    if args.abits <= 8 and args.wbits < 32:
        phases[f"inference: exported student {wa}, int8 backend"] = lambda: exported_step(
            quantized(args.wbits, args.abits, False), "int8", batch, args.device)
    return phases


def build_phases(phases, device):
    """Build each phase and run one step of it, recording its memory peak -> (rows, {label: step})."""
    rows, steps = [], {}
    for label, build in phases.items():
        mem = []
        with peak_memory(device, mem):
            steps[label] = build()
            steps[label]()
        rows.append({"step": label, "peak_memory_mb": mem[0], "times": []})
        print(f"  built {label:<44} peak memory {mem[0]:8.0f} MiB", flush=True)
    return rows, steps


def timed_rounds(rows, steps, n, warmup, device):
    """Run the phases in rounds, one step of each per round, so a drift in the machine's speed hits all
    alike: `warmup` untimed rounds (the allocator settles once every model exists), then `n` timed ones."""
    from tqdm.auto import tqdm

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for i in tqdm(range(warmup + n), desc="benchmark rounds", dynamic_ncols=True):
        for r in rows:
            sync()
            t0 = time.perf_counter()
            steps[r["step"]]()
            sync()
            if i >= warmup:
                r["times"].append(time.perf_counter() - t0)


def bench_report(args, name, params, where, rows):
    """Medians, ratios to the FP step, the quantizers' and the loss's shares; Markdown and JSON."""
    device, wa, n, w = args.device, f"W{args.wbits}A{args.abits}", args.bench_steps, args.bench_warmup
    # the rounds hold every phase's model at once: their peak is above each build's
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda" else peak_memory_mb()
    seconds = {r["step"]: statistics.median(r["times"]) for r in rows}
    reference = "inference: teacher" if args.bench_inference else "FP fine-tuning (sdpa attention)"
    for r in rows:
        r.update(seconds=seconds[r["step"]], vs_reference=seconds[r["step"]] / seconds[reference],
                 range=[min(r["times"]), max(r["times"])])
    fresh, heap = "fresh_peak_memory_mb" in rows[0], "fresh_malloc_in_use_mb" in rows[0]
    md = "\n".join([f"| step | median s | vs {reference} | range s | peak memory MiB (earlier rows' models resident) |"
                    + (" peak memory MiB, alone in a fresh process |" if fresh else "")
                    + (" of which malloc: peak in use / peak footprint MiB |" if heap else ""),
                    "|---|---|---|---|---|" + ("---|" if fresh else "") + ("---|" if heap else "")]
                   + [f"| {r['step']} | {r['seconds']:.3f} | {r['vs_reference']:.2f}x | {r['range'][0]:.3f} to "
                      f"{r['range'][1]:.3f} | {r['peak_memory_mb']:.0f} |"
                      + (f" {r['fresh_peak_memory_mb']:.0f} |" if fresh else "")
                      + (f" {r['fresh_malloc_in_use_mb']:.0f} / {r['fresh_malloc_footprint_mb']:.0f} |" if heap else "")
                      for r in rows])
    shares = {}
    if not args.bench_inference:
        qat = {kd: seconds[f"QAT {kd} {wa}"] for kd in ("map", "score", "output", "unified")}
        loss_seconds = {kd: seconds[f"KD loss {kd} alone (forward + backward)"] for kd in qat}
        off, plain = seconds["QAT map, quantizers off (W32A32)"], seconds[UNFUSED.format(wa=wa)]
        shares = {"quantizers_in_map_step": 1 - off / qat["map"], "quantizers_in_unfused_map_step": 1 - off / plain,
                  **{f"loss_in_{kd}_step": loss_seconds[kd] / qat[kd] for kd in qat}}
        fused = "fused" if device.type in qatkd.FUSED_DEVICES else f"as run (no fusion on {device.type})"
        md += (f"\n\nShare of the map QAT step spent in quantizers: {100 * shares['quantizers_in_map_step']:.0f}% "
               f"{fused}, {100 * shares['quantizers_in_unfused_map_step']:.0f}% unfused (map step with W32A32 vs {wa}); "
               f"unfused map step / FP step: {plain / seconds[reference]:.2f}x; in the KD loss: "
               + ", ".join(f"{kd} {100 * loss_seconds[kd] / qat[kd]:.0f}%" for kd in qat) + ".")
    md += f"\nPeak memory of the whole benchmark (the rounds, every phase's model resident): {peak:.0f} MiB."
    B, S = args.batch_size, args.max_len
    stem = Path(args.output_dir) / (f"benchmark-{name.replace(' ', '-').replace('/', '--')}-b{B}-s{S}-{device.type}"
                                    + ("-inference" if args.bench_inference else ""))
    stem.parent.mkdir(parents=True, exist_ok=True)
    header = (f"{name} ({params / 1e6:.1f}M parameters), batch {B} x length {S}, {wa}, {where}, "
              f"torch {torch.__version__}; median of {n} rounds after {w} warm-up rounds\n\n")
    stem.with_suffix(".md").write_text(header + md + "\n")
    qatkd.write_json(stem.with_suffix(".json"), {
        "model": name, "parameters": params, "batch_size": B, "seq_len": S, "wbits": args.wbits, "abits": args.abits,
        "device": where, "torch": torch.__version__, "steps": n, "warmup": w, "reference": reference, "rows": rows,
        "shares": shares, "peak_memory_mb": peak})
    summary = "" if args.bench_inference else f"map QAT / FP step: {seconds[f'QAT map {wa}'] / seconds[reference]:.2f}x; "
    print(f"\n{md}\n{summary}written to {stem}.md and {stem}.json")
    return rows


# =============================================================================================
# 6. Deployment: an exported student on the dev set
# =============================================================================================


def eval_export(args):
    """--eval_export DIR: the exported student on the task's dev set, as it would be deployed: dev
    metrics, examples per second (batches of --batch_size, dynamic padding), the loaded model's
    weight bytes and the process's peak resident memory."""
    if not (Path(args.eval_export) / "model.safetensors").is_file():
        raise FileNotFoundError(f"--eval_export: {args.eval_export} holds no exported student (model.safetensors); "
                                "run.py writes one to RUN_DIR/student_packed")
    from transformers import AutoTokenizer

    start = time.time()
    model = qatkd.load_quantized(args.eval_export, backend=args.backend, device=args.device)
    load_seconds = time.time() - start
    task, data = load_data(args)
    task, data, _ = qatkd.align_labels(task, data, model.config.id2label)
    tokenizer = AutoTokenizer.from_pretrained(args.eval_export)
    dev = {k: qatkd.tokenize(v, tokenizer, args.max_len) for k, v in data.items() if k != "train"}
    start = time.time()
    metrics = qatkd.evaluate(model, task, dev, args.batch_size, tokenizer.pad_token_id or 0, f"eval {args.backend}")
    seconds = time.time() - start
    examples = sum(len(v) for v in dev.values())
    weight_bytes = model_bytes(model)
    print(f"{args.eval_export} ({args.backend} backend, W{model.qatkd_bits['wbits']}A{model.qatkd_bits['abits']}) "
          f"on {task.name} dev: {fmt(metrics)}")
    print(f"{examples / seconds:.1f} examples per second ({examples} examples, batch {args.batch_size}, "
          f"{torch.get_num_threads()} threads, malloc: {malloc_settings()}); weights {weight_bytes / 1e6:.1f} MB "
          f"in memory; loaded in {load_seconds:.1f} s; peak resident memory {peak_memory_mb():.0f} MiB")
    return {"metrics": metrics, "examples_per_second": examples / seconds, "weight_bytes": weight_bytes,
            "peak_memory_mb": peak_memory_mb()}


def model_bytes(model):
    """Bytes of a model's parameters and buffers, and of the integer backend's prepacked weights."""
    tensors = list(model.parameters()) + list(model.buffers())
    packed = [p for m in model.modules() for p, _ in getattr(m, "packed", [])]
    return sum(t.numel() * t.element_size() for t in tensors) + sum(p.numel() for p in packed)


# arguments that may differ between a run and its resumption or its reuse by a sweep: they change no number


# =============================================================================================
# 7. Entry point
# =============================================================================================


def is_main():
    """True in a single process, and on rank 0 under torchrun."""
    return qatkd.distributed()[0] == 0


def init_device():
    """The device of this process; under torchrun (WORLD_SIZE > 1) also start the process group:
    nccl with one GPU per process (LOCAL_RANK), else gloo on CPU. Only rank 0 prints."""
    world, local_rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1:
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if not is_main():
            sys.stdout = open(os.devnull, "w")  # one report, from rank 0; errors still reach stderr
    return device


def main(argv=None):
    args = parse_args(argv)
    code_version()  # the code this process runs, read now
    import transformers

    transformers.logging.set_verbosity_error()  # we say ourselves what is fine-tuned and loaded
    transformers.utils.logging.disable_progress_bar()
    # Denormal floats (|x| < 1.2e-38: the far tail of a peaked softmax) take a slow path on x86
    # CPUs, up to 10% of a map-KD step; flushed to zero they cost nothing. Checked on real MRPC
    # steps: the same losses and weights, bit for bit. --keep_denormals computes with them.
    flush = torch.set_flush_denormal(not args.keep_denormals)  # True where the CPU supports it
    args.device = init_device()
    try:
        if args.benchmark:
            return benchmark(args, sys.argv[1:] if argv is None else [str(a) for a in argv])
        if args.eval_export:
            return eval_export(args)
        run_dir = Path(args.output_dir) / args.run_name
        if not args.sweep:
            check_run_dir(run_dir, args)
        if torch.distributed.is_initialized():
            torch.distributed.barrier()  # every process has checked the run folder before rank 0 writes to it
        return sweep(args) if args.sweep else run_qat(setup(args), args)
    finally:
        if flush and not args.keep_denormals:
            torch.set_flush_denormal(False)  # main() may be called from other code: leave the process as found
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError, ImportError, FloatingPointError) as e:
        sys.exit(f"run.py: error: {e}")
    except KeyboardInterrupt as e:
        sys.exit(f"run.py: {e or 'interrupted'}")
