"""Quantization-aware training of a Transformer encoder with knowledge distillation (Kim et al., 2022).

    python run.py --task mrpc --kd map --wbits 2
    python run.py --task mrpc --kd map --wbits 2 --teacher DIR --data_dir ../shared/data/glue/MRPC

Steps: load GLUE data and the teacher; fine-tune the teacher first if its classification head is
untrained (cached under --output_dir/teachers and reused); evaluate teacher and the quantized
student before training (PTQ); run QAT with the chosen KD loss; save the student; summarise.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import qatkd


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # error messages on one line, with the fix
    p.error = lambda msg: sys.exit(f"run.py: error: {msg} (see python run.py --help)")  # type: ignore[method-assign]
    g = p.add_argument_group("task and method (paper Sec. 4-5)")
    g.add_argument("--task", required=True, choices=list(qatkd.TASKS), help="GLUE task")
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
    g.add_argument("--include_padding", action="store_true",
                   help="as the original code: average rep/output/score MSE over padding positions too "
                        "(default: padding is excluded from every loss)")
    g = p.add_argument_group("models and data")
    g.add_argument("--teacher", default="bert-base-uncased",
                   help="hub id or local directory of the full-precision teacher; if its classification head "
                        "is untrained it is fine-tuned first and cached. Default: bert-base-uncased")
    g.add_argument("--data_dir", default=None,
                   help="directory with the GLUE TSV files of the task (train.tsv, dev.tsv); "
                        "default: download nyu-mll/glue from the hub")
    g.add_argument("--output_dir", default="runs",
                   help="root of all outputs: teachers/ (fine-tuned teachers) and one folder per run. Default: runs")
    g.add_argument("--run_name", default=None,
                   help="folder of this run under --output_dir. Default: TASK-KD-wWaA-seedS")
    g.add_argument("--overwrite", action="store_true", help="replace an earlier run in the same folder")
    g = p.add_argument_group("training (paper: 3 epochs, lr 2e-5, batch 32 / 16 for CoLA)")
    g.add_argument("--epochs", type=float, default=3.0, help="QAT epochs. Default: 3")
    g.add_argument("--lr", type=float, default=2e-5, help="peak learning rate (AdamW). Default: 2e-5")
    g.add_argument("--batch_size", type=int, default=None, help="default: 32, 16 for CoLA")
    g.add_argument("--max_len", type=int, default=None, help="max tokens per example. Default: 128, 64 for CoLA/SST-2")
    g.add_argument("--warmup", type=float, default=0.1, help="fraction of steps of linear warm-up. Default: 0.1")
    g.add_argument("--eval_every", type=int, default=None,
                   help="evaluate on dev every N steps (and at the end). Default: per task, e.g. 50 for MRPC")
    g.add_argument("--max_steps", type=int, default=0, help="stop after N steps (0: run all epochs)")
    g.add_argument("--seed", type=int, default=42, help="seed of QAT (data order, dropout). Default: 42")
    g = p.add_argument_group("teacher fine-tuning (when the teacher's head is untrained)")
    g.add_argument("--teacher_epochs", type=float, default=3.0, help="Default: 3")
    g.add_argument("--teacher_lr", type=float, default=2e-5, help="Default: 2e-5")
    g.add_argument("--teacher_seed", type=int, default=42, help="Default: 42")
    args = p.parse_args(argv)
    if not (2 <= args.abits <= 16 or args.abits == 32):
        p.error(f"--abits {args.abits} is out of range; use 2..16, or 32 for full precision")
    for name in ("batch_size", "max_len", "eval_every", "max_steps"):
        v = getattr(args, name)
        if v is not None and v < (0 if name in ("max_steps", "eval_every") else 1):
            p.error(f"--{name} must be positive, got {v}")
    task = qatkd.TASKS[args.task]
    args.batch_size = args.batch_size or task.batch_size
    args.max_len = args.max_len or task.max_len
    args.eval_every = task.eval_every if args.eval_every is None else args.eval_every
    args.run_name = args.run_name or f"{args.task}-{args.kd}-w{args.wbits}a{args.abits}-seed{args.seed}"
    return args


def fmt(metrics):
    return "  ".join(f"{k} {100 * v:6.2f}" for k, v in metrics.items()) if metrics else "-"


def get_teacher(args, task, data):
    """The task teacher: as given if its head is trained, else fine-tuned once and cached."""
    teacher, tokenizer, trained = qatkd.load_teacher(args.teacher, task)
    if trained:
        return teacher, tokenizer, args.teacher
    path = Path(args.teacher).resolve()
    slug = f"{path.parent.name}-{path.name}" if path.is_dir() else args.teacher.replace("/", "--")
    cache = Path(args.output_dir) / "teachers" / f"{task.name}-{slug}"
    if (cache / "config.json").is_file():
        how = json.loads((cache / "teacher_args.json").read_text()) if (cache / "teacher_args.json").is_file() else {}
        print(f"reusing the teacher fine-tuned in {cache} ({', '.join(f'{k} {v}' for k, v in how.items())}); "
              "delete it to fine-tune again")
        teacher, tokenizer, _ = qatkd.load_teacher(str(cache), task)
        return teacher, tokenizer, str(cache)
    print(f"teacher {args.teacher} has no trained {task.name} head: fine-tuning it in full precision "
          f"({args.teacher_epochs:g} epochs, lr {args.teacher_lr:g}) into {cache}")
    qatkd.set_seed(args.teacher_seed)
    cfg = qatkd.TrainConfig(epochs=args.teacher_epochs, lr=args.teacher_lr, batch_size=args.batch_size,
                            warmup=args.warmup, seed=args.teacher_seed, pad_id=tokenizer.pad_token_id or 0)
    feats = qatkd.tokenize(data["train"], tokenizer, args.max_len)
    result = qatkd.finetune_teacher(teacher, task, feats, cfg, log=lambda r: None)
    cache.parent.mkdir(parents=True, exist_ok=True)
    qatkd.save_model(teacher, cache, tokenizer, {"teacher_args.json": {
        "base": args.teacher, "epochs": args.teacher_epochs, "lr": args.teacher_lr, "seed": args.teacher_seed,
        "batch_size": args.batch_size, "max_len": args.max_len, "steps": result["steps"]}})
    return teacher, tokenizer, str(cache)


def main(argv=None):
    args = parse_args(argv)
    import transformers

    transformers.logging.set_verbosity_error()  # we say ourselves what is fine-tuned and loaded
    transformers.utils.logging.disable_progress_bar()
    start = time.time()
    task = qatkd.TASKS[args.task]
    run_dir = Path(args.output_dir) / args.run_name
    if (run_dir / "args.json").exists() and not args.overwrite:
        raise FileExistsError(f"{run_dir} already holds a run; pass --overwrite to replace it, or another --run_name")
    data = qatkd.load_glue(task, args.data_dir)
    print(f"{task.name}: {len(data['train'])} train examples, "
          + ", ".join(f"{len(v)} {k}" for k, v in data.items() if k != "train"))
    teacher, tokenizer, teacher_path = get_teacher(args, task, data)
    run_dir.mkdir(parents=True, exist_ok=True)
    qatkd.write_json(run_dir / "args.json", {**vars(args), "teacher_path": teacher_path})
    pad_id = tokenizer.pad_token_id or 0
    train_feats = qatkd.tokenize(data["train"], tokenizer, args.max_len)
    dev = {k: qatkd.tokenize(v, tokenizer, args.max_len) for k, v in data.items() if k != "train"}

    def evaluate(model, desc):
        return qatkd.evaluate(model, task, dev, args.batch_size, pad_id, desc)

    teacher_metrics = evaluate(teacher, "eval teacher")
    print(f"teacher (full precision)   {fmt(teacher_metrics)}")
    qatkd.set_seed(args.seed)
    student = qatkd.quantize_student(teacher, args.wbits, args.abits)
    ptq_metrics = evaluate(student, "eval PTQ")
    print(f"student W{args.wbits}A{args.abits} before QAT  {fmt(ptq_metrics)}")

    log_file = open(run_dir / "log.jsonl", "w")

    def log(record):
        log_file.write(json.dumps(record) + "\n")
        log_file.flush()

    cfg = qatkd.TrainConfig(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, warmup=args.warmup,
                            eval_every=args.eval_every, max_steps=args.max_steps, seed=args.seed, pad_id=pad_id)
    loss_fn = qatkd.qat_loss_fn(student, teacher, task, args.kd, args.map_coeff, args.output_coeff,
                                args.gt_coeff, args.include_padding)
    with log_file:
        result = qatkd.train(student, loss_fn, train_feats, cfg, lambda: evaluate(student, "eval"), task.metric, log,
                             desc=f"QAT {args.kd} W{args.wbits}A{args.abits}")
    qatkd.save_student(student, run_dir / "student", tokenizer)
    metrics = {"task": task.name, "kd": args.kd, "wbits": args.wbits, "abits": args.abits, "seed": args.seed,
               "selection_metric": task.metric, "teacher": teacher_metrics, "ptq": ptq_metrics, **result,
               "seconds_per_step": result["seconds"] / max(1, result["steps"]), "wall_seconds": time.time() - start}
    qatkd.write_json(run_dir / "metrics.json", metrics)
    wall = time.time() - start
    print(f"\n== summary: {task.name}, KD {args.kd}, W{args.wbits}A{args.abits}, seed {args.seed} ==")
    print(f"teacher                    {fmt(teacher_metrics)}")
    print(f"student before QAT (PTQ)   {fmt(ptq_metrics)}")
    print(f"student best (step {result['best_step']:>4})  {fmt(result['best'])}")
    print(f"student last (step {result['last_step']:>4})  {fmt(result['last'])}")
    print(f"{result['steps']} steps, {metrics['seconds_per_step']:.2f} s/step, wall time {wall / 60:.1f} min; "
          f"outputs in {run_dir}")
    return metrics


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError, FloatingPointError) as e:
        sys.exit(f"run.py: error: {e}")
    except KeyboardInterrupt:
        sys.exit("run.py: interrupted")
