"""Quantization-aware training of a Transformer encoder with knowledge distillation (Kim et al., 2022).

    python run.py --task mrpc --kd map --wbits 2
    python run.py --task mrpc --kd map --wbits 2 --teacher DIR --data_dir ../shared/data/glue/MRPC
    python run.py --train_file train.csv --validation_file dev.csv --teacher DIR --kd map

Steps: refuse an unusable teacher; load the data (a GLUE task, your files or a hub dataset) and the
teacher; fine-tune the teacher first if its classification head is untrained (cached under
--output_dir/teachers and reused); evaluate the teacher and the quantized student before training
(PTQ); run QAT with the chosen KD loss; save and export the student; summarise.

On several processes (CPU: gloo, GPUs: nccl, one process per GPU):
    torchrun --nproc_per_node=N run.py --task mrpc --kd map --wbits 2 ...
--batch_size stays the global batch; rank 0 evaluates, logs and saves.
"""

import argparse
import math
import os
import sys
from pathlib import Path

# What the parser offers, written out so that --help imports no torch (a test checks each against
# qatkd.py and data.py, which define them)
TASKS = ("cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte")  # data.TASKS
KD_MODES = ("pred", "score", "map", "output", "unified")  # qatkd.KD_MODES
WEIGHT_BITS = (1, 2, 4, 8, 32)  # qatkd.WEIGHT_BITS
OPTIMIZERS = ("bertadam", "adamw")  # qatkd.OPTIMIZERS
TI_MODES = ("gradual", "map", "context", "output")  # qatkd.TI_MODES
ACT_SCALES = ("batch", "example", "static")  # qatkd.ACT_SCALES, and export.SERVED_SCALES' static
PAPER = {"epochs": 3.0, "lr": 2e-5, "warmup": 0.1, "seed": 42, "max_steps": 0}  # qatkd.TrainConfig's defaults
# --recipe: the settings each recipe changes (flags given on the command line win). best: chosen on MRPC
# (RESULTS.md, "Closing the gap to the teacher"): 5x the paper's learning rate, the same steps and time
RECIPES = {"paper": {}, "best": {"lr": 1e-4}}


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
    g.add_argument("--task", default=None, choices=TASKS,
                   help="GLUE task (or your own data: --train_file/--validation_file, or --dataset)")
    g.add_argument("--kd", default="map", choices=KD_MODES,
                   help="attention KD term added to prediction + hidden-state KD: score (TernaryBERT), "
                        "map (attention-map KL), output (attention-output MSE), unified (map + output), "
                        "pred (none). Default: map")
    g.add_argument("--wbits", type=int, default=2, choices=WEIGHT_BITS,
                   help="weight bits: 1 binary, 2 ternary (paper), 4/8 uniform, 32 full precision. Default: 2")
    g.add_argument("--abits", type=int, default=8,
                   help="activation bits, 2..16 or 32 (full precision). Default: 8")
    g.add_argument("--map_coeff", type=float, default=1.0, help="weight of the attention-map loss. Default: 1")
    g.add_argument("--output_coeff", type=float, default=1.0,
                   help="weight of the attention-output loss. Default: 1")
    g.add_argument("--gt_coeff", type=float, default=0.0,
                   help="add this times the ground-truth cross-entropy to the KD loss (paper: 0). Default: 0")
    g.add_argument("--act_scale", default=None, choices=ACT_SCALES,
                   help="activation scales: batch (one per tensor over the whole batch, padding included: the "
                        "original's), example (one per example over its real tokens: an answer that does not "
                        "depend on its batch) or, to serve (int8 backend, ONNX), static (constant scales from clips "
                        "the run calibrated on its first training batch: faster, and batch-independent too). "
                        "Default: batch for training, example for --eval_export, --predict and --export_onnx")
    g.add_argument("--ti", default=None, choices=TI_MODES,
                   help="Teacher Intervention (Kim et al., EACL 2023): for the first --ti_steps steps the "
                        "teacher's attention outputs (output), contexts (context) or maps (map) replace the "
                        "student's in every layer; gradual (the paper's): output, context, then map. Then "
                        "ordinary QAT with a fresh optimizer for the remaining steps. Default: none")
    g.add_argument("--ti_steps", type=int, default=None,
                   help="steps of the intervention phase. Default: 60, 120 for CoLA")
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
    g.add_argument("--train_examples", type=int, default=None, metavar="N",
                   help="train on a fixed random subset of N training examples (the same for every run and the "
                        "teacher; runs named -trainN). Default: all")
    g.add_argument("--augment", type=int, default=None, metavar="N",
                   help="TinyBERT's data augmentation for QAT (the teacher trains on the original data): up to N "
                        "word-replaced variants of each text (TinyBERT: 20-30), made once with --augment_mlm and "
                        "kept in OUTPUT_DIR/augmented; runs named -augN. Default: none")
    g.add_argument("--augment_mlm", default=None, metavar="DIR",
                   help="local BERT-style (WordPiece) masked LM that proposes replacements of one-piece words")
    g.add_argument("--augment_vectors", default=None, metavar="FILE",
                   help="GloVe-format word vectors that propose replacements of words of several pieces "
                        "(without them such words stay)")
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
    g = p.add_argument_group("outputs and runs")
    g.add_argument("--output_dir", default="runs",
                   help="root of all outputs: teachers/ (fine-tuned teachers) and one folder per run. Default: runs")
    g.add_argument("--run_name", default=None,
                   help="folder of this run under --output_dir. Default: TASK-KD-wWaA-seedS (your own data: "
                        "NAME-FINGERPRINT-KD-wWaA-seedS), with -tseedT, -original, -lrX, -epN where they apply")
    g.add_argument("--overwrite", action="store_true",
                   help="replace an earlier run in the same folder (a sweep reruns runs made with other arguments)")
    g.add_argument("--mix_commits", action="store_true",
                   help="let --resume and --sweep reuse runs made by another commit of this code (recorded in their "
                        "args.json); default: refused, so that a table never mixes code versions")
    g.add_argument("--resume", action="store_true",
                   help="continue an interrupted run from its checkpoint (same arguments); the result is the same "
                        "as an uninterrupted run's")
    g.add_argument("--keep_checkpoint", action="store_true",
                   help="keep checkpoint.pt once the run has finished (default: removed; student/ holds the weights)")
    g.add_argument("--save_every", type=int, default=100,
                   help="write a checkpoint every N steps (and on Ctrl-C); 0: only on Ctrl-C. Default: 100")
    g = p.add_argument_group("training (paper: 3 epochs, lr 2e-5, batch 32 / 16 for CoLA)")
    g.add_argument("--epochs", type=float, default=PAPER["epochs"], help="QAT epochs. Default: 3")
    g.add_argument("--recipe", default="paper", choices=tuple(RECIPES),
                   help="paper: the paper's settings; best: the recipe that came closest to the teacher on "
                        "MRPC (README: Results): --lr 1e-4, the same steps and time. Default: paper")
    g.add_argument("--lr", type=float, default=None, help="peak learning rate. Default: 2e-5 (--recipe best: 1e-4)")
    g.add_argument("--batch_size", type=int, default=None, help="default: 32, 16 for CoLA")
    g.add_argument("--max_len", type=int, default=None, help="max tokens per example. Default: 128, 64 for CoLA/SST-2")
    g.add_argument("--warmup", type=float, default=PAPER["warmup"], help="fraction of steps of linear warm-up. Default: 0.1")
    g.add_argument("--optimizer", default="bertadam", choices=OPTIMIZERS,
                   help="bertadam: the official code's Adam without bias correction, gradients clipped per tensor "
                        "at 1.0; adamw: torch's AdamW with one global clip at 1.0. Default: bertadam")
    g.add_argument("--eval_every", type=int, default=None,
                   help="evaluate on dev every N steps (and at the end). Default: per task, e.g. 50 for MRPC")
    g.add_argument("--max_steps", type=int, default=PAPER["max_steps"], help="stop after N steps (0: run all epochs)")
    g.add_argument("--seed", type=int, default=PAPER["seed"], help="seed of QAT (data order, dropout). Default: 42")
    g.add_argument("--recompute", action="store_true",
                   help="recompute each student layer's forward in backward (activation checkpointing): the same "
                        "numbers in less memory, one more student forward per step")
    g = p.add_argument_group("teacher fine-tuning (when the teacher's head is untrained)")
    g.add_argument("--teacher_epochs", type=float, default=PAPER["epochs"], help="Default: 3")
    g.add_argument("--teacher_lr", type=float, default=PAPER["lr"], help="Default: 2e-5 (MiniLM: 1e-4)")
    g.add_argument("--teacher_seed", type=int, default=42,
                   help="seed of teacher fine-tuning (the new head's initialisation, data order, dropout); one seed, "
                        "one cached teacher. Default: 42")
    g = p.add_argument_group("analysis (the paper's attention-recovery measures)")
    g.add_argument("--rank_samples", type=int, default=64,
                   help="dev examples for the ranking-loss and cover-length diagnostics (cost grows as length^3). "
                        "Default: 64")
    g = p.add_argument_group("sweeps (one results table over runs)")
    g.add_argument("--sweep", action="store_true",
                   help="run teacher, PTQ and QAT for each --sweep_kd mode and --seeds seed, and write one results "
                        "table (OUTPUT_DIR/sweep-TASK-wWaA.md and .csv); finished runs are reused")
    g.add_argument("--sweep_kd", type=lambda s: s.split(","), default=list(KD_MODES),
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
    g = p.add_argument_group("deployment (no training: an exported student, student_packed/)")
    g.add_argument("--eval_export", default=None, metavar="DIR",
                   help="evaluate the exported student in DIR on the task's dev set: metric, examples per second, "
                        "memory")
    g.add_argument("--export_onnx", default=None, metavar="DIR",
                   help="write the exported student in DIR (student_packed/) as an ONNX graph for ONNX Runtime to "
                        "DIR_onnx/ (model.onnx, config, tokenizer); --eval_export DIR_onnx evaluates it")
    g.add_argument("--predict", default=None, metavar="DIR",
                   help="a student's answers on new text: DIR is RUN_DIR/student, RUN_DIR/student_packed or an ONNX "
                        "export; with --text A [B] (printed) or --input FILE (FILE-predictions.jsonl)")
    g.add_argument("--text", nargs="+", default=None, metavar="TEXT",
                   help="--predict: one text, or the two texts of a pair")
    g.add_argument("--input", default=None, metavar="FILE",
                   help="--predict: a CSV/TSV/JSON Lines file; text columns as --text_columns (a label column "
                        "is ignored)")
    g.add_argument("--serving", default=None, metavar="RUN_DIR",
                   help="the comparison for shipping: the run's teacher (PyTorch, ONNX Runtime fp32 and its dynamic "
                        "int8 quantization) and student (int8 backend, ONNX Runtime; per-example and, where the run "
                        "calibrated clips, static scales) on the dev set: metric, file and "
                        "weight bytes, latency at batch 1, throughput at batch 32, peak memory, each model in a "
                        "fresh process; then the ONNX Runtime graphs side by side in one process, their speeds over "
                        "the int8 teacher's; RUN_DIR/serving.md. Data: the run's, unless given")
    g.add_argument("--serving_rounds", type=int, default=3,
                   help="--serving: rounds over the models (a fresh process each time); the table gives each "
                        "speed's median over rounds, and the side-by-side ratios the median over twice as many "
                        "rounds. Default: 3")
    g.add_argument("--serving_model", default=None, help=argparse.SUPPRESS)  # internal: a child of --serving
    g.add_argument("--backend", default="int8", choices=("int8", "fake"),
                   help="int8: integer inference; fake: fp32 weights, fake-quantized activations. Default: int8")
    return p


def parse_args(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    for name, value in {"lr": PAPER["lr"], **RECIPES[args.recipe]}.items():  # a flag given explicitly wins
        setattr(args, name, value if getattr(args, name) is None else getattr(args, name))
    if not (2 <= args.abits <= 16 or args.abits == 32):
        p.error(f"--abits {args.abits} is out of range; use 2..16, or 32 for full precision")
    for name in ("batch_size", "max_len", "eval_every", "max_steps", "save_every", "rank_samples", "bench_steps",
                 "bench_warmup", "serving_rounds", "train_examples", "augment"):
        v = getattr(args, name)
        least = 1 if name in ("batch_size", "max_len", "bench_steps", "serving_rounds", "train_examples",
                              "augment") else 0
        if v is not None and v < least:
            p.error(f"--{name} must be at least {least}, got {v}")
    for name in ("epochs", "lr", "teacher_epochs", "teacher_lr"):  # a step size or a length: positive
        v = getattr(args, name)
        if not (v > 0 and math.isfinite(v)):
            p.error(f"--{name} must be a positive number, got {v:g}")
    for name in ("lr", "teacher_lr"):
        v = getattr(args, name)
        if v >= 1:
            p.error(f"--{name} {v:g} makes Adam diverge on a Transformer; fine-tuning rates are about 1e-5 to 1e-4 "
                    "(the paper: 2e-5)")
        if v > 1e-2:
            print(f"run.py: warning: --{name} {v:g} is far above the usual 1e-5 to 1e-4 for fine-tuning; training "
                  "will likely diverge", file=sys.stderr)
    for name in ("map_coeff", "output_coeff", "gt_coeff"):  # loss weights: a negative one would be maximised
        v = getattr(args, name)
        if not (v >= 0 and math.isfinite(v)):
            p.error(f"--{name} must be 0 or more, got {v:g}")
    if args.ti_steps is not None and not args.ti:
        p.error("--ti_steps is the length of Teacher Intervention's first phase: pass --ti too")
    if args.ti_steps is not None and args.ti_steps < 1:
        p.error(f"--ti_steps must be at least 1, got {args.ti_steps}")
    if bool(args.augment) != bool(args.augment_mlm):
        p.error("--augment N and --augment_mlm DIR go together (the masked LM proposes the replacements)")
    if args.augment_vectors and not args.augment:
        p.error("--augment_vectors goes with --augment N and --augment_mlm DIR")
    for name in ("augment_mlm", "augment_vectors"):
        v = getattr(args, name)
        if v and not Path(v).exists():
            p.error(f"--{name} {v}: no such {'file' if name == 'augment_vectors' else 'folder'}")
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
    bad = [k for k in args.sweep_kd if k not in KD_MODES]
    if bad:
        p.error(f"--sweep_kd: unknown KD mode {bad[0]!r}; use some of {','.join(KD_MODES)}")
    bad = [k for k in args.sweep_protocols if k not in PROTOCOLS]
    if bad:
        p.error(f"--sweep_protocols: unknown protocol {bad[0]!r}; use some of {','.join(PROTOCOLS)}")
    args.sweep_teacher_seeds = args.sweep_teacher_seeds or [args.teacher_seed]
    if args.serving:
        run = Path(args.serving)
        missing = [f for f in ("args.json", "metrics.json", "student_packed/config.json") if not (run / f).is_file()]
        if missing:
            p.error(f"--serving: {run} is not a finished run folder (no {missing[0]}); pass RUN_DIR, e.g. "
                    "runs/mrpc-map-w2a8-seed42")
        import json

        saved = json.loads((run / "args.json").read_text())
        args.max_len = args.max_len or saved.get("max_len")  # the length it was trained with
        if not (args.task or args.train_file or args.dataset or args.validation_file):  # the run's own data
            for k in ("task", "data_dir", "train_file", "validation_file", "dataset", "dataset_config",
                      "validation_split", "text_columns", "label_column"):
                setattr(args, k, saved.get(k, getattr(args, k)))
    sources = [f for f, on in (("--task", args.task), ("--train_file", args.train_file), ("--dataset", args.dataset))
               if on]
    if args.predict and bool(args.text) == bool(args.input):
        p.error("--predict takes --text A [B] or --input FILE (one of them)")
    if args.text and len(args.text) > 2:
        p.error(f"--text takes one text or the two of a pair, got {len(args.text)}")
    if (args.text or args.input) and not args.predict:
        p.error("--text and --input go with --predict DIR")
    deploy = args.eval_export or args.export_onnx or args.predict or args.serving
    if args.act_scale == "static" and not (args.eval_export or args.export_onnx or args.predict):
        p.error("--act_scale static serves an exported student (--eval_export, --predict, --export_onnx) with the "
                "clips its run calibrated; train with batch or example (--serving adds the static rows itself)")
    if args.act_scale == "static" and args.backend == "fake":
        p.error("--act_scale static is served by the int8 backend and ONNX; leave --backend fake out")
    if deploy and not sources and args.validation_file:  # an exported student needs only the data it evaluates
        sources = ["--validation_file"]
    if len(sources) != 1 and not (args.export_onnx or args.predict):
        p.error(("--eval_export needs the data it evaluates: pass --task (GLUE), --validation_file or --dataset"
                 if args.eval_export and not sources else
                 "pass one of --task (GLUE), --train_file with --validation_file, or --dataset")
                + (f"; got {' and '.join(sources)}" if sources else ""))
    if bool(args.train_file) != bool(args.validation_file) and not (deploy and args.validation_file):
        p.error("--train_file and --validation_file go together")
    if args.text_columns is not None and not 1 <= len(args.text_columns) <= 2:
        p.error(f"--text_columns takes one or two columns, got {len(args.text_columns)}")
    if args.benchmark and not args.task:
        p.error("--benchmark times a GLUE task's shapes: pass --task")
    return args


def task_defaults(args):
    """--batch_size, --max_len, --eval_every and --ti_steps left unset take the GLUE task's values (the
    original's), or 32, 128 and 60 for your own data (whose evaluation period follows its size, once it is read)."""
    import data

    if args.task:
        task = data.TASKS[args.task]
        args.batch_size = args.batch_size or task.batch_size
        args.max_len = args.max_len or task.max_len
        args.eval_every = task.eval_every if args.eval_every is None else args.eval_every
    else:
        args.batch_size, args.max_len = args.batch_size or 32, args.max_len or 128
    if args.ti:
        args.ti_steps = args.ti_steps or (data.TASKS[args.task].ti_steps if args.task else data.Task.ti_steps)
    return args


def offline_if_hub_unreachable(args):
    """Where the run needs the Hugging Face hub (a hub teacher, GLUE without --data_dir, --dataset) and the
    hub does not answer within 3 s, set HF_HUB_OFFLINE and HF_DATASETS_OFFLINE before transformers and
    datasets are imported: what is cached loads, what is not fails at once instead of after a minute of
    retries. Returns whether it did."""
    import socket
    from urllib.parse import urlparse

    local_teacher = Path(args.teacher).exists() or args.teacher.startswith((".", "/", "~"))
    needs_hub = not local_teacher or (args.task and not args.data_dir) or args.dataset
    if not needs_hub or os.environ.get("HF_HUB_OFFLINE") or args.eval_export or args.export_onnx or args.predict \
            or args.serving:
        return False
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=3).close()
        return False
    except OSError:
        os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"
        return True


def main(argv=None):
    args = parse_args(argv)
    offline_if_hub_unreachable(args)  # before transformers and datasets are imported: they read it then
    try:
        import torch
        import transformers

        import experiment
        import runtime
    except ImportError as e:  # run outside the project's environment
        raise ImportError(f"{e}; install the requirements first (README: Set-up and tests)") from None
    task_defaults(args)
    runtime.code_version()  # the code this process runs, read now
    transformers.logging.set_verbosity_error()  # we say ourselves what is fine-tuned and loaded
    transformers.utils.logging.disable_progress_bar()
    runtime.keep_freed_memory()  # glibc: the same numbers, no page faults for each step's temporaries
    args.device = runtime.init_device()
    try:
        if args.benchmark:
            import bench

            return bench.benchmark(args, sys.argv[1:] if argv is None else [str(a) for a in argv])
        if args.serving:
            import bench

            args.data_name = args.task or Path(args.validation_file or args.dataset).stem
            return bench.serving_model(args) if args.serving_model else bench.serving(
                args, sys.argv[1:] if argv is None else [str(a) for a in argv])
        if args.export_onnx:
            return experiment.export_onnx(args)
        if args.predict:
            return experiment.predict(args)
        if args.eval_export:
            return experiment.eval_export(args)
        if args.sweep:
            return experiment.sweep(args)
        env = experiment.setup(args)  # every input checked, then the run folder, then the teacher fine-tuned
        return experiment.run_qat(env, args)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError, ImportError, FloatingPointError) as e:
        sys.exit(f"run.py: error: {e}")
    except KeyboardInterrupt as e:  # Ctrl-C: the checkpoint is saved; exit as a shell expects of SIGINT
        print(f"run.py: {e or 'interrupted'}", file=sys.stderr)
        sys.exit(130)
