"""Experiments: one run (teacher, PTQ, QAT, export, diagnostics, summary), sweeps of runs, and an
exported student on a dev set. run.py parses the arguments and calls these.

    setup         data and teacher (fine-tuned once and cached), the teacher's dev score
    run_qat       one QAT run into OUTPUT_DIR/RUN_NAME: log.jsonl, metrics.json, student/, student_packed/
    sweep         runs over KD modes, seeds, teacher seeds and protocols, and one results table
    eval_export   an exported student on the dev set: metrics, speed, memory
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

import data
import diagnostics
import export
import models
import qatkd
import runtime

# the recipe arguments a run folder's name carries when they are not the paper's: (name, default, tag)
RECIPE_TAGS = (("lr", 2e-5, "lr"), ("epochs", 3.0, "ep"))


def recipe_suffix(args):
    """-lrX and -epN for a learning rate or a number of epochs other than the paper's (2e-5, 3); -tiMODESTEPS
    with Teacher Intervention; -actexample for per-example activation scales; -trainN for a training subset;
    -augN for TinyBERT's data augmentation."""
    return ("".join(f"-{tag}{getattr(args, name):g}" for name, default, tag in RECIPE_TAGS
                    if getattr(args, name) != default)
            + (f"-ti{args.ti}{args.ti_steps}" if getattr(args, "ti", None) else "")
            + ("-actexample" if getattr(args, "act_scale", None) == "example" else "")
            + (f"-train{args.train_examples}" if getattr(args, "train_examples", None) else "")
            + (f"-aug{args.augment}" if getattr(args, "augment", None) else ""))


def default_run_name(args):
    """TASK-KD-wWaA-seedS, then -tseedT for a teacher seed other than 42, -original for the original
    padding protocol, then the recipe_suffix: runs that differ in what they compute never share a folder."""
    return (f"{args.data_name}-{args.kd}-w{args.wbits}a{args.abits}-seed{args.seed}"
            + (f"-tseed{args.teacher_seed}" if args.teacher_seed != 42 else "")
            + ("-original" if args.original_padding else "") + recipe_suffix(args))


@dataclass
class Setup:
    """What every run of a task shares: data, teacher, features, the teacher's dev score."""

    task: data.Task
    teacher: object
    tokenizer: object
    teacher_path: str
    train: list
    dev: dict
    pad_id: int
    teacher_metrics: dict
    teacher_warning: str | None = None


def load_data(args):
    """(Task, {split: examples}): a GLUE task, your own files, or a hub dataset; with --train_examples N,
    a fixed random subset of N training examples in their file order (seed 0: the same for every run)."""
    if args.task:
        task = data.TASKS[args.task]
        task, examples = task, data.load_glue(task, args.data_dir)
    elif args.train_file:
        task, examples = data.load_data_files(args.train_file, args.validation_file, args.text_columns,
                                              args.label_column)
    else:
        task, examples = data.load_hub_dataset(args.dataset, args.dataset_config, args.validation_split,
                                               args.text_columns, args.label_column)
    n = getattr(args, "train_examples", None)
    if n and "train" in examples:
        train = examples["train"]
        if n > len(train):
            raise ValueError(f"--train_examples {n}: the training set has {len(train)} examples; pass at most "
                             f"{len(train)}, or leave it out for all")
        examples["train"] = [train[i] for i in sorted(random.Random(0).sample(range(len(train)), n))]
    return task, examples


def setup(args, check_run=True):
    """Data, teacher and features; the teacher's dev score. Every input is checked before any work:
    the teacher (path, architecture, weights, label count, a cached teacher's recipe), --recompute,
    the data; then, with check_run, the run folder (runtime.check_run_dir); then the teacher is
    fine-tuned if its head is untrained. Sets args.data_name and a default args.run_name."""
    config = models.teacher_config(args.teacher)
    if args.recompute and not models.checkpointable(config):
        raise ValueError(f"--recompute: transformers has no activation checkpointing for {config.model_type}; "
                         "run without --recompute")
    task, examples = load_data(args)
    if args.ti:
        steps = qatkd.TrainConfig(epochs=args.epochs, batch_size=args.batch_size,
                                  max_steps=args.max_steps).total_steps(len(examples["train"]))
        if args.ti_steps >= steps:
            raise ValueError(f"--ti_steps {args.ti_steps} leaves no steps for Teacher Intervention's second phase: "
                             f"QAT has {steps} steps here; pass a smaller --ti_steps")
    runtime.set_seed(args.teacher_seed)  # an untrained head is initialised at random: seeded, one seed one teacher
    teacher, tokenizer, trained = models.load_teacher(args.teacher, task)
    teacher_path, cache = args.teacher, None
    if not trained:
        cache, recipe = models.teacher_cache(args, task, examples)
        if (cache / "config.json").is_file():
            print(f"reusing the teacher fine-tuned in {cache}; delete it to fine-tune again")
            teacher, tokenizer, _ = models.load_teacher(str(cache), task)
            teacher_path, cache = str(cache), None
    if cache is None:  # a trained head, or the cached teacher: the data's classes in its order, by name
        task, examples, permuted = data.align_labels(task, examples, teacher.config.id2label)
        if permuted:
            print(f"the teacher orders the classes {', '.join(task.names or task.labels)}: the data's labels are "
                  "mapped onto that order")
    args.data_name = task.name if args.task else f"{task.name}-{data.fingerprint(task, examples['train'])[:6]}"
    args.run_name = args.run_name or default_run_name(args)
    if check_run:
        runtime.check_run_dir(Path(args.output_dir) / args.run_name, args)
        if torch.distributed.is_initialized():
            torch.distributed.barrier()  # every process has checked the run folder before rank 0 writes to it
    print(f"{task.name}: {len(examples['train'])} train examples, "
          + ", ".join(f"{len(v)} {k}" for k, v in examples.items() if k != "train")
          + ("" if task.labels is None else f"; classes {', '.join(task.names or task.labels)}"))
    if cache is not None:
        models.finetune_teacher(args, teacher, tokenizer, task, examples, cache, recipe)
        teacher_path = str(cache)
    teacher.to(args.device)
    pad_id = tokenizer.pad_token_id or 0
    if getattr(args, "augment", None):  # QAT only: the teacher has been fine-tuned on the original data
        import augment

        for turn in ("make", "read"):  # under torchrun, rank 0 makes the augmented set and the others read it
            if (turn == "make") == is_main():
                augmented = augment.augmented_train(examples["train"], args.augment, args.augment_mlm,
                                                    args.augment_vectors, Path(args.output_dir) / "augmented",
                                                    runtime.progress_bar, args.device)
            if turn == "make" and torch.distributed.is_initialized():
                torch.distributed.barrier()
        examples["train"] = augmented
    train = data.tokenize(examples["train"], tokenizer, args.max_len)
    dev = {k: data.tokenize(v, tokenizer, args.max_len) for k, v in examples.items() if k != "train"}
    env = Setup(task, teacher, tokenizer, teacher_path, train, dev, pad_id, {})
    if is_main():  # full precision ignores padding: the teacher's score is the same under both protocols
        predictions = data.predict(teacher, dev, args.batch_size, pad_id, "eval teacher", progress=runtime.progress_bar)
        for i, (logits, labels) in enumerate(predictions.values()):
            env.teacher_metrics.update({k + ("_mm" if i else ""): v for k, v in
                                        data.task_metrics(task, logits, labels).items()})
        print(f"teacher (full precision)     {fmt(env.teacher_metrics)}")
        env.teacher_warning = data.useless(task, *next(iter(predictions.values())))
        if env.teacher_warning:
            print(f"\nWARNING: the teacher is useless: {env.teacher_warning}; QAT would distil it faithfully into a "
                  "useless student. Likely fixes: fine-tune it longer or faster (--teacher_epochs, --teacher_lr"
                  + ("; MiniLM needs 1e-4" if args.teacher_lr < 1e-4 else "") + "), check --label_column and the "
                  "data, or pass a teacher fine-tuned on this task"
                  + (f"; delete the cached teacher {teacher_path} to fine-tune again" if not trained else "") + "\n",
                  file=sys.stderr, flush=True)
    return env


def is_main():
    """True in a single process, and on rank 0 under torchrun."""
    return runtime.distributed()[0] == 0


def student_for(env, args):
    """The quantized student of a run; with --recompute each layer is recomputed in backward
    (transformers' activation checkpointing, non-reentrant: the same numbers in less memory)."""
    student = qatkd.quantize_student(env.teacher, args.wbits, args.abits, act_scale=args.act_scale or "batch")
    if args.recompute:
        student.activation_checkpointing_enable({"use_reentrant": False})
    return student


def run_qat(env, args, ptq=None):
    """One QAT run into OUTPUT_DIR/RUN_NAME; returns its metrics (also written to metrics.json)."""
    start = time.time()
    run_dir = Path(args.output_dir) / args.run_name
    checkpoint, log_path = run_dir / "checkpoint.pt", run_dir / "log.jsonl"
    if not is_main():  # another torchrun process: train on its slice; rank 0 does the rest
        student = student_for(env, args)
        runtime.set_seed(args.seed)
        torch.distributed.barrier()  # rank 0 has removed a replaced run's checkpoint: never load a stale one
        runtime.run_training(student, qat_loss(env, args), env.train, train_config(env, args),
                             checkpoint=checkpoint if args.resume else None)
        return None
    run_dir.mkdir(parents=True, exist_ok=True)
    if args.resume:  # the log continues from the checkpoint: drop what was logged after it
        loop = runtime.load_checkpoint(checkpoint)["loop"]
        step, start = loop["step"], start - loop.get("wall_seconds", 0.0)  # the wall time of the whole run
        print(f"resuming {run_dir} from step {step}")
        kept = [line for line in log_path.read_text().splitlines() if log_step(line) <= step]
        with runtime.atomic_path(log_path) as tmp:
            tmp.write_text("".join(line + "\n" for line in kept))
    else:
        checkpoint.unlink(missing_ok=True)  # a stale checkpoint of a replaced run
        runtime.write_json(run_dir / "args.json", {**{k: v for k, v in vars(args).items() if k != "device"},
                                                   "teacher_path": env.teacher_path, "code": runtime.code_version()})
    if torch.distributed.is_initialized():
        torch.distributed.barrier()  # the other processes start training only now
    ptq = ptq or ptq_baseline(env, args)
    student = student_for(env, args)
    runtime.set_seed(args.seed)  # after the PTQ evaluation, so every torchrun process starts QAT in one RNG state
    with open(log_path, "a" if args.resume else "w") as log_file:

        def log(record):
            log_file.write(json.dumps(runtime.json_ready(record)) + "\n")
            log_file.flush()

        result = runtime.run_training(student, qat_loss(env, args), env.train, train_config(env, args),
                                      lambda: evaluate(env, student, args), env.task.metric, log,
                                      f"QAT {args.kd} W{args.wbits}A{args.abits} seed {args.seed}", checkpoint,
                                      args.save_every, started=start)
    result["steps"] = result.pop("step")
    models.save_student(student, run_dir / "student", env.tokenizer)
    sizes = export_student(env, student, run_dir / "student_packed", args)
    qat_recovery = recovery(env, student, args)
    diagnostics.print_recovery(ptq["recovery"], qat_recovery)
    diagnostics.plot_recovery(run_dir / "attention_recovery.png", ptq["recovery"], qat_recovery)
    metrics = {"task": env.task.name, "kd": args.kd, "wbits": args.wbits, "abits": args.abits, "seed": args.seed,
               "protocol": "original" if args.original_padding else "default", "code": runtime.code_version(),
               "teacher_path": env.teacher_path, "teacher_seed": args.teacher_seed,
               "selection_metric": env.task.metric, "f1_class": data.f1_class(env.task),
               "teacher": env.teacher_metrics, "teacher_warning": env.teacher_warning, "ptq": ptq["metrics"], **result,
               "attention_recovery": {"ptq": ptq["recovery"], "qat": qat_recovery}, "sizes": sizes,
               "wall_seconds": time.time() - start, "peak_memory_mb": runtime.peak_memory_mb(),
               "torch_threads": torch.get_num_threads()}
    runtime.write_json(run_dir / "metrics.json", metrics)
    if not args.keep_checkpoint:
        checkpoint.unlink(missing_ok=True)  # the run is complete: student/ and metrics.json hold it
    print(f"\n== summary: {env.task.name}, KD {args.kd}, W{args.wbits}A{args.abits}, seed {args.seed} ==")
    print(f"teacher                      {fmt(env.teacher_metrics)}")
    print(f"student before QAT (PTQ)     {fmt(ptq['metrics'])}")
    print(f"student best (step {result['best_step'] or '-':>5})    {fmt(result['best'])}")
    print(f"student last (step {result['last_step']:>5})    {fmt(result['last'])}")
    if metrics["f1_class"] is not None:
        print(f"(f1: the F1 of class {metrics['f1_class']!r})")
    print(f"{result['steps']} step{'s' * (result['steps'] != 1)}, {result['seconds_per_step']:.2f} s per training step, wall time "
          f"{metrics['wall_seconds'] / 60:.1f} min, peak memory {metrics['peak_memory_mb'] / 1024:.1f} GB; "
          f"outputs in {run_dir}")
    return metrics


def train_config(env, args):
    return qatkd.TrainConfig(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, warmup=args.warmup,
                             eval_every=env.task.eval_every if args.eval_every is None else args.eval_every,
                             max_steps=args.max_steps, seed=args.seed, pad_id=env.pad_id,
                             optimizer=args.optimizer, pad_to=pad_to(args) or 0, ti=args.ti or "",
                             ti_steps=args.ti_steps if args.ti else 0)


def qat_loss(env, args):
    return qatkd.qat_loss_fn(env.teacher, args.kd, args.map_coeff, args.output_coeff, args.gt_coeff,
                             env.task.labels is None, args.original_padding)


def pad_to(args):
    """Batches padded to --max_len under --original_padding, else to their longest example."""
    return args.max_len if args.original_padding else None


def evaluate(env, model, args, desc="eval"):
    return data.evaluate(model, env.task, env.dev, args.batch_size, env.pad_id, desc, pad_to(args), runtime.progress_bar)


def recovery(env, student, args):
    """Attention-recovery diagnostics of a student on the (first) dev split."""
    dev = next(iter(env.dev.values()))
    return diagnostics.attention_recovery(student, env.teacher, dev, args.batch_size, env.pad_id, args.rank_samples,
                                          pad_to(args))


def ptq_baseline(env, args):
    """The quantized student before any training: dev score and attention-recovery diagnostics."""
    student = qatkd.quantize_student(env.teacher, args.wbits, args.abits, act_scale=args.act_scale or "batch")
    metrics = evaluate(env, student, args, "eval PTQ")
    print(f"student W{args.wbits}A{args.abits} before QAT    {fmt(metrics)}")
    return {"metrics": metrics, "recovery": recovery(env, student, args)}


def log_step(line):
    """The step of a log.jsonl line; a line torn by a kill counts as after every checkpoint."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError):
        return float("inf")


def export_student(env, student, path, args):
    """Packed low-bit export of the student, with its clips for static scales calibrated on the first
    training batch in file order (export.calibrate_clips), and a size table against the fp32 teacher."""
    first = next(qatkd.batches(env.train, args.batch_size, env.pad_id, device=args.device, pad_to=pad_to(args)))
    # DeBERTa's own attention has no static scales: no clips for it
    clips = export.calibrate_clips(student, first) if qatkd.model_family(student.config).interface else None
    sizes = export.export_quantized(student, path, env.tokenizer, clips)
    sizes["teacher_fp32_bytes"] = sum(p.numel() * 4 for p in env.teacher.state_dict().values())
    sizes["file_bytes"] = export.packed_file(path).stat().st_size
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
        one = argparse.Namespace(**{**vars(args), "teacher_seed": teacher_seed})
        env = setup(one, check_run=False)
        args.data_name, metric = one.data_name, env.task.metric
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
        changed = runtime.differing_args(old, one) + runtime.differing_code(old, one)
        if changed and not one.overwrite:
            raise ValueError(f"sweep: {run_dir} was made with other settings: {', '.join(changed)}; pass --overwrite "
                             "to rerun it" + (", or --mix_commits to use it" if not runtime.differing_args(old, one) else ""))
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
        values = [[v for r in rec for v in r[m]] if None not in rec else [None] for m in SWEEP_MEASURES]
        measures = ["-" if not all(map(defined, v)) else f"{mean([mean(r[m]) for r in rec]):.4g}"
                    for m, v in zip(SWEEP_MEASURES, values)]
        wall = [r["wall_seconds"] / 60 for r in runs if "wall_seconds" in r]
        table.append([str(teacher_seed), protocol, name, ",".join(str(r["seed"]) for r in runs) if wall else "-",
                      mean_std([(r["best"] or {}).get(metric) for r in runs]),
                      mean_std([r["last"][metric] for r in runs])]
                     + [mean_std([r["last"][k] for r in runs]) for k in others] + measures
                     + [f"{mean(wall):.1f}" if wall else "-"])
    md = "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
                   + ["| " + " | ".join(r) + " |" for r in table])
    note = (f"{args.data_name}, W{args.wbits}A{args.abits}, code {runtime.code_version()}; "
            + "; ".join(teachers) + f"; sweep wall time {seconds / 60:.0f} min")
    suffix = ("" if args.sweep_protocols == ["default"] else "-" + "+".join(args.sweep_protocols)) + (
        "" if args.sweep_teacher_seeds == [42] else "-tseeds" + "+".join(map(str, args.sweep_teacher_seeds)))
    stem = Path(args.output_dir) / f"sweep-{args.data_name}-w{args.wbits}a{args.abits}{suffix}{recipe_suffix(args)}"
    stem.with_name(stem.name + ".md").write_text(note + "\n\n" + md + "\n")  # not with_suffix: -lr2.5e-05 has a dot
    with open(stem.with_name(stem.name + ".csv"), "w", newline="") as f:
        csv.writer(f).writerows([head] + table)
    print(f"\n== sweep: {args.data_name}, {metric} on dev, mean ± std over seeds ==\n{note}\n\n{md}\n"
          f"written to {stem}.md and {stem}.csv")
    return table


def eval_export(args):
    """--eval_export DIR: the exported student on the task's dev set, as it would be deployed: dev
    metrics, examples per second (batches of --batch_size, dynamic padding), the loaded model's
    weight bytes and the process's peak resident memory."""
    folder = Path(args.eval_export)
    onnx = (folder / "model.onnx").is_file()
    if not onnx and export.packed_file(folder) is None:
        if (folder / "model.safetensors").is_file() or (folder / models.LATENT_FILE).is_file():
            raise ValueError(f"--eval_export: {folder} holds a full-precision model, not an exported student; pass "
                             "RUN_DIR/student_packed")
        raise FileNotFoundError(f"--eval_export: {folder} holds no exported student ({export.PACKED_FILE} or "
                                "model.onnx); run.py writes one to RUN_DIR/student_packed, --export_onnx to "
                                "student_packed_onnx")
    from transformers import AutoTokenizer

    start = time.time()
    act_scale = args.act_scale or models.deploy_act_scale(folder)
    model = (export.OnnxStudent(models.onnx_without_scales(folder, args.act_scale)) if onnx else
             export.load_quantized(folder, backend=args.backend, device=args.device, act_scale=act_scale))
    backend = "ONNX Runtime" if onnx else f"{args.backend} backend"
    load_seconds = time.time() - start
    if not args.task and not args.train_file and not args.dataset:  # --validation_file alone: classes by name
        args.train_file = args.validation_file
    task, examples = load_data(args)
    task, examples, _ = data.align_labels(task, examples, model.config.id2label, "student")
    tokenizer = AutoTokenizer.from_pretrained(args.eval_export)
    dev = {k: data.tokenize(v, tokenizer, args.max_len) for k, v in examples.items() if k != "train"}
    start = time.time()
    metrics = data.evaluate(model, task, dev, args.batch_size, tokenizer.pad_token_id or 0, f"eval {backend}")
    seconds = time.time() - start
    n = sum(len(v) for v in dev.values())
    peak = runtime.peak_memory_mb()  # before model_bytes, which has ONNX Runtime load the graph once more
    weight_bytes = model_bytes(model)
    print(f"{args.eval_export} ({backend}, W{model.qatkd_bits['wbits']}A{model.qatkd_bits['abits']}, activation scales "
          f"{'' if model.qatkd_bits['act_scale'] == 'static' else 'per '}{model.qatkd_bits['act_scale']}) "
          f"on {args.validation_file or task.name + ' dev'}: {fmt(metrics)}")
    print(f"{n / seconds:.1f} examples per second ({n} examples, batch {args.batch_size}, "
          f"{torch.get_num_threads()} threads, malloc: {runtime.malloc_settings()}); weights {weight_bytes / 1e6:.1f} MB "
          f"in memory; loaded in {load_seconds:.1f} s; peak resident memory {peak:.0f} MiB")
    return {"metrics": metrics, "examples_per_second": n / seconds, "weight_bytes": weight_bytes,
            "peak_memory_mb": peak}


def predict(args):
    """--predict DIR: a student's answers on new text (--text A [B], or each row of --input FILE): the label
    and every class's probability (the score, for regression), as JSON Lines on stdout or in
    FILE-predictions.jsonl beside the input file."""
    from transformers import AutoTokenizer

    if not Path(args.predict).is_dir():
        raise FileNotFoundError(f"--predict: no student folder {args.predict}")
    model = models.load_any_student(args.predict, args.backend, args.act_scale, args.device)
    tokenizer = AutoTokenizer.from_pretrained(args.predict)
    if args.text:
        pairs = [(args.text[0], args.text[1] if len(args.text) > 1 else None, 0)]
        out = None
    else:
        table, where = data.read_data_file(args.input)
        columns = args.text_columns
        if not columns:
            rest = [c for c in table.column_names if c != args.label_column]
            if args.label_column not in table.column_names and len(rest) == 2 and "sentence1" not in rest:
                raise ValueError(f"{args.input}: cannot tell whether {rest[0]!r} and {rest[1]!r} are a pair of texts or "
                                 f"a text and its label (no column {args.label_column!r}); pass --text_columns")
            columns = data.default_text_columns(table.column_names, args.label_column)
        for c in columns:
            if c not in table.column_names:
                raise ValueError(f"{args.input}: no column {c!r}; its columns are: {', '.join(table.column_names)}; "
                                 "pass --text_columns a[,b]")
        for i, row in enumerate(table):
            if any(row[c] is None for c in columns):  # as in training: missing text refused, "" kept
                raise ValueError(f"{where(i)}: empty text in column {next(c for c in columns if row[c] is None)!r}")
        pairs = [(str(row[columns[0]]), str(row[columns[1]]) if len(columns) > 1 else None, 0) for row in table]
        out = Path(args.input).with_name(Path(args.input).stem + "-predictions.jsonl")
    feats = data.tokenize(pairs, tokenizer, args.max_len)
    progress = None if out else (lambda **kw: contextlib.nullcontext(SimpleNamespace(update=lambda n: None)))
    logits = data.predict(model, {"input": feats}, args.batch_size, tokenizer.pad_token_id or 0, "predict",
                          progress=progress)["input"][0]
    rows = export.predictions(model, logits)
    lines = "".join(json.dumps(r) + "\n" for r in rows)
    if out is None:
        print(lines, end="")
    else:
        with runtime.atomic_path(out) as tmp:
            Path(tmp).write_text(lines)
        print(f"{len(rows)} predictions in {out}")
    return rows


def export_onnx(args):
    """--export_onnx DIR: the exported student in DIR as an ONNX graph in DIR_onnx/."""
    folder = Path(args.export_onnx)
    if export.packed_file(folder) is None:
        raise FileNotFoundError(f"--export_onnx: {folder} holds no exported student; pass RUN_DIR/student_packed")
    out = folder.with_name(folder.name + "_onnx")
    path = export.export_onnx(folder, out, act_scale=args.act_scale or models.deploy_act_scale(folder))
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB); evaluate it with --eval_export {out}")
    return path


def model_bytes(model):
    """Bytes of a model's parameters and buffers, and of the integer backend's prepacked weights."""
    if isinstance(model, export.OnnxStudent):
        return model.weight_bytes()  # the initializers ONNX Runtime holds, the weights' codes unpacked
    tensors = list(model.parameters()) + list(model.buffers())
    prepacked = [p for m in model.modules() for p, _ in getattr(m, "packed", [])]
    return sum(t.numel() * t.element_size() for t in tensors) + sum(p.numel() for p in prepacked)
