"""Quantization-aware training of a Transformer encoder with knowledge distillation (Kim et al., 2022).

    python run.py --task mrpc --kd map --wbits 2
    python run.py --task mrpc --kd map --wbits 2 --teacher DIR --data_dir ../shared/data/glue/MRPC

Steps: load GLUE data and the teacher; fine-tune the teacher first if its classification head is
untrained (cached under --output_dir/teachers and reused); evaluate teacher and the quantized
student before training (PTQ); run QAT with the chosen KD loss; save the student; summarise.
"""

import argparse
import csv
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

try:
    import torch

    import qatkd
except ImportError as e:  # run outside the project's environment
    sys.exit(f"run.py: error: {e}; install the requirements first (README: set-up)")


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # error messages on one line, with the fix
    p.error = lambda msg: sys.exit(f"run.py: error: {msg} (see python run.py --help)")  # type: ignore[method-assign]
    g = p.add_argument_group("task and method")
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
    g.add_argument("--resume", action="store_true",
                   help="continue an interrupted run from its checkpoint (same arguments); the result is the same "
                        "as an uninterrupted run's")
    g.add_argument("--save_every", type=int, default=100,
                   help="write a checkpoint every N steps (and on Ctrl-C); 0: only on Ctrl-C. Default: 100")
    g = p.add_argument_group("training (paper: 3 epochs, lr 2e-5, batch 32 / 16 for CoLA)")
    g.add_argument("--epochs", type=float, default=3.0, help="QAT epochs. Default: 3")
    g.add_argument("--lr", type=float, default=2e-5, help="peak learning rate. Default: 2e-5")
    g.add_argument("--batch_size", type=int, default=None, help="default: 32, 16 for CoLA")
    g.add_argument("--max_len", type=int, default=None, help="max tokens per example. Default: 128, 64 for CoLA/SST-2")
    g.add_argument("--warmup", type=float, default=0.1, help="fraction of steps of linear warm-up. Default: 0.1")
    g.add_argument("--optimizer", default="bertadam", choices=qatkd.OPTIMIZERS,
                   help="bertadam: the official code's Adam without bias correction, gradients clipped per tensor "
                        "at 1.0; adamw: torch's AdamW with one global clip at 1.0. Default: bertadam")
    g.add_argument("--eval_every", type=int, default=None,
                   help="evaluate on dev every N steps (and at the end). Default: per task, e.g. 50 for MRPC")
    g.add_argument("--max_steps", type=int, default=0, help="stop after N steps (0: run all epochs)")
    g.add_argument("--seed", type=int, default=42, help="seed of QAT (data order, dropout). Default: 42")
    g = p.add_argument_group("teacher fine-tuning (when the teacher's head is untrained)")
    g.add_argument("--teacher_epochs", type=float, default=3.0, help="Default: 3")
    g.add_argument("--teacher_lr", type=float, default=2e-5, help="Default: 2e-5")
    g.add_argument("--teacher_seed", type=int, default=42, help="Default: 42")
    g = p.add_argument_group("analysis (the paper's attention-recovery measures)")
    g.add_argument("--rank_samples", type=int, default=64,
                   help="dev examples for the ranking-loss and cover-length diagnostics (cost grows as length^3). "
                        "Default: 64")
    g.add_argument("--sweep", action="store_true",
                   help="run teacher, PTQ and QAT for each --sweep_kd mode and --seeds seed, and write one results "
                        "table (OUTPUT_DIR/sweep-TASK-wWaA.md and .csv); finished runs are reused")
    g.add_argument("--sweep_kd", type=lambda s: s.split(","), default=list(qatkd.KD_MODES),
                   help="comma-separated KD modes for --sweep. Default: pred,score,map,output,unified")
    g.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[42],
                   help="comma-separated seeds for --sweep. Default: 42")
    args = p.parse_args(argv)
    if not (2 <= args.abits <= 16 or args.abits == 32):
        p.error(f"--abits {args.abits} is out of range; use 2..16, or 32 for full precision")
    for name in ("batch_size", "max_len", "eval_every", "max_steps", "save_every", "rank_samples"):
        v = getattr(args, name)
        least = 1 if name in ("batch_size", "max_len") else 0
        if v is not None and v < least:
            p.error(f"--{name} must be at least {least}, got {v}")
    bad = [k for k in args.sweep_kd if k not in qatkd.KD_MODES]
    if bad:
        p.error(f"--sweep_kd: unknown KD mode {bad[0]!r}; use some of {','.join(qatkd.KD_MODES)}")
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
                            warmup=args.warmup, seed=args.teacher_seed, pad_id=tokenizer.pad_token_id or 0,
                            optimizer="adamw")  # as Hugging Face's run_glue, which the original README suggests
    feats = qatkd.tokenize(data["train"], tokenizer, args.max_len)
    result = qatkd.finetune_teacher(teacher, task, feats, cfg, log=lambda r: None)
    teacher.eval()
    cache.parent.mkdir(parents=True, exist_ok=True)
    qatkd.save_model(teacher, cache, tokenizer, {"teacher_args.json": {
        "base": args.teacher, "epochs": args.teacher_epochs, "lr": args.teacher_lr, "seed": args.teacher_seed,
        "batch_size": args.batch_size, "max_len": args.max_len, "optimizer": "adamw", "steps": result["steps"]}})
    return teacher, tokenizer, str(cache)


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


def setup(args):
    task = qatkd.TASKS[args.task]
    data = qatkd.load_glue(task, args.data_dir)
    print(f"{task.name}: {len(data['train'])} train examples, "
          + ", ".join(f"{len(v)} {k}" for k, v in data.items() if k != "train"))
    teacher, tokenizer, teacher_path = get_teacher(args, task, data)
    pad_id = tokenizer.pad_token_id or 0
    train = qatkd.tokenize(data["train"], tokenizer, args.max_len)
    dev = {k: qatkd.tokenize(v, tokenizer, args.max_len) for k, v in data.items() if k != "train"}
    env = Setup(task, teacher, tokenizer, teacher_path, train, dev, pad_id, {})
    env.teacher_metrics = evaluate(env, teacher, args, "eval teacher")
    print(f"teacher (full precision)     {fmt(env.teacher_metrics)}")
    return env


def evaluate(env, model, args, desc="eval"):
    return qatkd.evaluate(model, env.task, env.dev, args.batch_size, env.pad_id, desc)


def recovery(env, student, args):
    """Attention-recovery diagnostics of a student on the (first) dev split."""
    dev = next(iter(env.dev.values()))
    return qatkd.attention_recovery(student, env.teacher, dev, args.batch_size, env.pad_id, args.rank_samples)


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


def run_qat(env, args, ptq=None):
    """One QAT run into OUTPUT_DIR/RUN_NAME; returns its metrics (also written to metrics.json)."""
    start = time.time()
    run_dir = Path(args.output_dir) / args.run_name
    run_dir.mkdir(parents=True, exist_ok=True)
    checkpoint, log_path = run_dir / "checkpoint.pt", run_dir / "log.jsonl"
    if args.resume:  # the log continues from the checkpoint: drop what was logged after it
        step = qatkd.load_checkpoint(checkpoint)["loop"]["step"]
        print(f"resuming {run_dir} from step {step}")
        kept = [line for line in log_path.read_text().splitlines() if log_step(line) <= step]
        with qatkd.atomic_path(log_path) as tmp:
            tmp.write_text("".join(line + "\n" for line in kept))
    else:
        checkpoint.unlink(missing_ok=True)  # a stale checkpoint of a replaced run
        qatkd.write_json(run_dir / "args.json", {**vars(args), "teacher_path": env.teacher_path})
    qatkd.set_seed(args.seed)
    ptq = ptq or ptq_baseline(env, args)
    student = qatkd.quantize_student(env.teacher, args.wbits, args.abits)
    cfg = qatkd.TrainConfig(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, warmup=args.warmup,
                            eval_every=args.eval_every, max_steps=args.max_steps, seed=args.seed, pad_id=env.pad_id,
                            optimizer=args.optimizer, save_every=args.save_every)
    loss_fn = qatkd.qat_loss_fn(student, env.teacher, env.task, args.kd, args.map_coeff, args.output_coeff,
                                args.gt_coeff, args.include_padding)
    with open(log_path, "a" if args.resume else "w") as log_file:

        def log(record):
            log_file.write(json.dumps(record) + "\n")
            log_file.flush()

        result = qatkd.train(student, loss_fn, env.train, cfg, lambda: evaluate(env, student, args), env.task.metric,
                             log, desc=f"QAT {args.kd} W{args.wbits}A{args.abits} seed {args.seed}",
                             checkpoint=checkpoint)
    qatkd.save_student(student, run_dir / "student", env.tokenizer)
    sizes = export(env, student, run_dir / "student_packed")
    qat_recovery = recovery(env, student, args)
    print_recovery(ptq["recovery"], qat_recovery)
    plot_recovery(run_dir / "attention_recovery.png", ptq["recovery"], qat_recovery)
    metrics = {"task": env.task.name, "kd": args.kd, "wbits": args.wbits, "abits": args.abits, "seed": args.seed,
               "selection_metric": env.task.metric, "teacher": env.teacher_metrics, "ptq": ptq["metrics"], **result,
               "attention_recovery": {"ptq": ptq["recovery"], "qat": qat_recovery}, "sizes": sizes,
               "wall_seconds": time.time() - start, "peak_memory_mb": peak_memory_mb(),
               "torch_threads": torch.get_num_threads()}
    qatkd.write_json(run_dir / "metrics.json", metrics)
    checkpoint.unlink(missing_ok=True)  # the run is complete: student/ and metrics.json hold it
    print(f"\n== summary: {env.task.name}, KD {args.kd}, W{args.wbits}A{args.abits}, seed {args.seed} ==")
    print(f"teacher                      {fmt(env.teacher_metrics)}")
    print(f"student before QAT (PTQ)     {fmt(ptq['metrics'])}")
    print(f"student best (step {result['best_step']:>5})    {fmt(result['best'])}")
    print(f"student last (step {result['last_step']:>5})    {fmt(result['last'])}")
    print(f"{result['steps']} steps, {result['seconds_per_step']:.2f} s per training step, wall time "
          f"{metrics['wall_seconds'] / 60:.1f} min, peak memory {metrics['peak_memory_mb'] / 1024:.1f} GB; "
          f"outputs in {run_dir}")
    return metrics


def peak_memory_mb():
    """Peak resident memory of this process so far (Linux and macOS), in MiB."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 / (1024 if sys.platform == "darwin" else 1)


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


def mean_std(values):
    if not values:
        return "-"
    if len(values) == 1:
        return f"{100 * values[0]:.2f}"
    m = sum(values) / len(values)
    sd = (sum((v - m) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else 0.0
    return f"{100 * m:.2f} ± {100 * sd:.2f}"


def sweep(env, args):
    """Teacher, PTQ and QAT for every --sweep_kd mode and --seeds seed; one table (Markdown and CSV).

    A run whose folder already holds metrics.json is read, not repeated, so an interrupted sweep
    continues where it stopped.
    """
    ptq = ptq_baseline(env, args)
    rows = [("teacher (FP)", [env.teacher_metrics], [env.teacher_metrics], None),
            (f"PTQ W{args.wbits}A{args.abits}", [ptq["metrics"]], [ptq["metrics"]], ptq["recovery"]["map_kl"])]
    for kd in args.sweep_kd:
        runs = []
        for seed in args.seeds:
            one = argparse.Namespace(**{**vars(args), "kd": kd, "seed": seed, "sweep": False,
                                        "run_name": f"{args.task}-{kd}-w{args.wbits}a{args.abits}-seed{seed}"})
            done = Path(args.output_dir) / one.run_name / "metrics.json"
            one.resume = (done.parent / "checkpoint.pt").is_file()  # an interrupted run continues
            runs.append(json.loads(done.read_text()) if done.is_file() else run_qat(env, one, ptq))
        kl = [sum(r["attention_recovery"]["qat"]["map_kl"]) / len(r["attention_recovery"]["qat"]["map_kl"])
              for r in runs]
        rows.append((f"QAT W{args.wbits}A{args.abits} {kd}", [r["best"] for r in runs], [r["last"] for r in runs],
                     [sum(kl) / len(kl)]))
    metric = env.task.metric
    head = ["model", "seeds", f"best {metric}", f"last {metric}", "mean attention-map KL"]
    table = []
    for name, best, last, kl in rows:
        kl_value = "-" if kl is None else f"{sum(kl) / len(kl):.4f}"
        seeds = len(best) if name.startswith("QAT") else "-"
        table.append([name, str(seeds), mean_std([b[metric] for b in best]), mean_std([x[metric] for x in last]),
                      kl_value])
    md = "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |"
                                                                                  for r in table])
    stem = Path(args.output_dir) / f"sweep-{args.task}-w{args.wbits}a{args.abits}"
    stem.with_suffix(".md").write_text(md + "\n")
    with open(stem.with_suffix(".csv"), "w", newline="") as f:
        csv.writer(f).writerows([head] + table)
    print(f"\n== sweep: {env.task.name}, {metric} on dev, mean ± std over seeds ==\n{md}\n"
          f"written to {stem}.md and {stem}.csv")
    return table


RESUMABLE = ("resume", "overwrite", "save_every", "teacher_path")  # may differ between a run and its resumption


def check_run_dir(run_dir, args):
    """Refuse to overwrite an earlier run by accident, and to resume one with other settings."""
    stored = run_dir / "args.json"
    if args.resume:
        if not (run_dir / "checkpoint.pt").is_file():
            done = " (it has finished)" if (run_dir / "metrics.json").is_file() else ""
            raise FileNotFoundError(f"--resume: {run_dir} holds no checkpoint to resume from{done}")
        old = json.loads(stored.read_text())
        changed = [f"--{k} {old[k]} (now {v})" for k, v in vars(args).items()
                   if k not in RESUMABLE and k in old and old[k] != v]
        if changed:
            raise ValueError(f"--resume: {run_dir} was started with other arguments: {', '.join(changed)}")
    elif stored.exists() and not args.overwrite:
        raise FileExistsError(f"{run_dir} already holds a run; pass --resume to continue it, --overwrite to replace "
                              "it, or another --run_name")


def main(argv=None):
    args = parse_args(argv)
    import transformers

    transformers.logging.set_verbosity_error()  # we say ourselves what is fine-tuned and loaded
    transformers.utils.logging.disable_progress_bar()
    run_dir = Path(args.output_dir) / args.run_name
    if not args.sweep:
        check_run_dir(run_dir, args)
    env = setup(args)
    return sweep(env, args) if args.sweep else run_qat(env, args)


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError, FloatingPointError) as e:
        sys.exit(f"run.py: error: {e}")
    except KeyboardInterrupt as e:
        sys.exit(f"run.py: {e or 'interrupted'}")
