"""Teachers and students on disk.

    load_teacher    a full-precision encoder from a local folder or the hub, refused in one line if unusable
    task_teacher    the task's teacher: as given if its head is trained, else fine-tuned once and cached
    save_student    the student's latent weights, config, tokenizer and bit widths; load_student: back
"""

from __future__ import annotations

import json
from pathlib import Path

import data
import qatkd
import runtime
from runtime import atomic_path, write_json

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def teacher_config(name_or_path):
    """The teacher's config, read before anything else: a missing path, a path without a model, an
    unreachable hub id or an unsupported architecture is refused here, in one line."""
    from transformers import AutoConfig

    path = Path(name_or_path)
    looks_local = path.exists() or name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1
    if looks_local and not path.is_dir():
        raise FileNotFoundError(f"teacher {name_or_path} is a file, not a model folder; pass the folder that holds "
                                "config.json and the weights" if path.exists() else
                                f"teacher directory {name_or_path} does not exist")
    if looks_local and not (path / "config.json").is_file():
        raise FileNotFoundError(f"teacher directory {name_or_path} holds no model (no config.json)")
    if looks_local and not any((path / f).is_file() for f in WEIGHT_FILES):
        raise FileNotFoundError(f"teacher directory {name_or_path} holds a config but no weights (no model.safetensors "
                                "or pytorch_model.bin); save the model into it with save_pretrained")
    try:
        config = AutoConfig.from_pretrained(name_or_path)
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"could not load teacher {name_or_path!r}: not a local model directory, and the "
                                f"hub could not provide it ({type(e).__name__}); pass --teacher DIR") from None
    qatkd.model_family(config)
    return config


def load_teacher(name_or_path, task):
    """A full-precision sequence classifier for the task, its tokenizer, and whether its head is trained.

    name_or_path: a hub id or a local directory (save_pretrained layout). A checkpoint that has
    no classification head (a plain encoder, e.g. bert-base-uncased or all-MiniLM-L6-v2) comes up
    with a freshly initialised head: head_trained is False and it must be fine-tuned first.
    A classification head with the wrong number of labels is refused. The model's attention runs
    through qatkd's (use_qatkd_attention), which computes what the original does.
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    config = teacher_config(name_or_path)
    trained_head = any(a.endswith("ForSequenceClassification") for a in (config.architectures or []))
    if trained_head and config.num_labels != task.num_labels:
        raise ValueError(f"teacher {name_or_path} has a {config.num_labels}-label head but task {task.name} needs "
                         f"{task.num_labels}; pass a teacher fine-tuned on {task.name}, or its base encoder")
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(
            name_or_path, num_labels=task.num_labels, output_loading_info=True)
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    except Exception as e:  # a truncated or corrupt weights file, a broken tokenizer: say which, in one line
        why = (str(e).strip().splitlines() or [""])[0][:160]
        raise ValueError(f"could not load teacher {name_or_path}: {type(e).__name__}: {why}; its files may be "
                         "truncated or corrupt: save or download it again") from None
    return qatkd.use_qatkd_attention(model), tokenizer, trained_head and not info["missing_keys"]


def teacher_cache(args, task, examples):
    """Where the task's teacher fine-tuned from args.teacher is cached, OUTPUT_DIR/teachers/NAME, and its
    recipe. NAME holds the task (or "data" for your own), the data's fingerprint (the same data in
    another file format gets the same teacher; other data never does), the base model and the seed.
    A cached teacher fine-tuned with another recipe is refused in one line."""
    path = Path(args.teacher).resolve()
    slug = f"{path.parent.name}-{path.name}" if path.is_dir() else args.teacher.replace("/", "--")
    fp = data.fingerprint(task, examples["train"])
    cache = Path(args.output_dir) / "teachers" / f"{args.task or 'data'}-{fp[:8]}-{slug}-seed{args.teacher_seed}"
    recipe = {"base": args.teacher, "epochs": args.teacher_epochs, "lr": args.teacher_lr, "seed": args.teacher_seed,
              "batch_size": args.batch_size, "max_len": args.max_len, "warmup": args.warmup, "optimizer": "adamw",
              "train_data": fp}
    if (cache / "config.json").is_file():
        how = json.loads((cache / "teacher_args.json").read_text()) if (cache / "teacher_args.json").is_file() else {}
        changed = [f"{k} {how[k]} (now {v})" for k, v in recipe.items() if k in how and how[k] != v and k != "base"]
        if changed:
            raise ValueError(f"{cache} holds a teacher fine-tuned with other settings: {', '.join(changed)}; pass the "
                             "same settings, or delete that folder to fine-tune again")
    return cache, recipe


def finetune_teacher(args, teacher, tokenizer, task, examples, cache, recipe):
    """Fine-tune the teacher's new head (and its encoder) in full precision on the labels, and cache it."""
    epochs = f"{args.teacher_epochs:g} epoch{'' if args.teacher_epochs == 1 else 's'}"
    print(f"teacher {args.teacher} has no trained {task.name} head: fine-tuning it in full precision "
          f"({epochs}, lr {args.teacher_lr:g}) into {cache}")
    runtime.set_seed(args.teacher_seed)
    data.name_labels(teacher.config, task)  # the fine-tuned teacher, its students and exports carry the class names
    # DEVIATION (teacher optimizer): the original gives no teacher recipe and points to Hugging Face's
    # run_glue: torch's AdamW (bias correction, one global gradient clip), not BertAdam, fine-tunes the teacher
    cfg = qatkd.TrainConfig(epochs=args.teacher_epochs, lr=args.teacher_lr, batch_size=args.batch_size,
                            warmup=args.warmup, seed=args.teacher_seed, pad_id=tokenizer.pad_token_id or 0,
                            optimizer="adamw")
    feats = data.tokenize(examples["train"], tokenizer, args.max_len)
    result = runtime.run_training(teacher.to(args.device), qatkd.teacher_loss_fn(task.labels is None), feats, cfg,
                                  log=lambda record: None, desc="teacher")
    teacher.eval()
    if runtime.distributed()[0] == 0:  # the other processes hold the same weights (DistributedDataParallel)
        cache.parent.mkdir(parents=True, exist_ok=True)
        save_model(teacher, cache, tokenizer, {"teacher_args.json": {**recipe, "steps": result["step"]}})


def save_model(model, path, tokenizer=None, extra=None, rename=None):
    """save_pretrained into path (safetensors), atomically: write a sibling temp dir, then rename.

    extra: {filename: json object} written beside it (the student's quantization.json); rename: {file: new name}.
    """
    with atomic_path(path) as tmp:
        model.save_pretrained(tmp)
        for old, new in (rename or {}).items():
            (tmp / old).rename(tmp / new)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, obj in (extra or {}).items():
            write_json(tmp / name, obj)


LATENT_FILE = "qatkd_latent.safetensors"  # not model.safetensors: stock from_pretrained then fails instead of
# loading the latent weights as an unquantized model (the student's answers are those of its quantized weights)


def save_student(student, path, tokenizer=None):
    """The student's latent full-precision weights (LATENT_FILE), config, tokenizer and quantization.json."""
    save_model(student, path, tokenizer, {"quantization.json": student.qatkd_bits},
               rename={"model.safetensors": LATENT_FILE})


def load_student(path, act_scale=None):
    """Rebuild a student saved by save_student: the architecture, its latent weights, re-quantized
    (activation scales as trained, or act_scale: "batch" or "example")."""
    import export

    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForSequenceClassification

    path = Path(path)
    bits = json.loads((path / "quantization.json").read_text())
    weights = path / LATENT_FILE if (path / LATENT_FILE).is_file() else path / "model.safetensors"  # or as saved before
    model = AutoModelForSequenceClassification.from_config(AutoConfig.from_pretrained(path))
    missing = model.load_state_dict(load_file(weights), strict=False).missing_keys  # tied weights are stored once
    state, loaded = model.state_dict(), {t.data_ptr() for k, t in model.state_dict().items() if k not in missing}
    untied = [k for k in missing if state[k].data_ptr() not in loaded]
    if untied:
        raise ValueError(f"{weights} lacks {len(untied)} of the student's tensors ({untied[0]}, ...); it is not this "
                         "student's weights file")
    trained = export.trained_scales(bits.get("act_scale", "batch"), path)
    return qatkd.quantize_student(model.eval(), bits["wbits"], bits["abits"], act_scale=act_scale or trained)


def deploy_act_scale(path):
    """The activation scales a student is served with: per example (an answer independent of its batch),
    or per batch for a family that has no per-example scales (DeBERTa)."""
    from transformers import AutoConfig

    if not (Path(path) / "config.json").is_file():
        return "example"  # not a model folder: load_any_student says so
    return "example" if qatkd.model_family(AutoConfig.from_pretrained(path)).per_example else "batch"


def onnx_without_scales(path, act_scale):
    """path, an ONNX export, unless activation scales are asked of it: a graph has its own, fixed when exported."""
    if act_scale:
        raise ValueError(f"{path} is an ONNX graph whose activation scales were fixed when it was exported; leave "
                         "act_scale out, or export it again with --export_onnx --act_scale")
    return path


def load_any_student(path, backend="int8", act_scale=None, device="cpu"):
    """A trained or exported student from its folder, for inference: an ONNX graph (model.onnx, export_onnx),
    a packed student (student_packed/, export_quantized) or a trained one (student/, save_student), with the
    activation scales it is served with (act_scale None: deploy_act_scale). Anything else is refused in one line."""
    import export

    path = Path(path)
    if (path / "model.onnx").is_file():
        return export.OnnxStudent(onnx_without_scales(path, act_scale))
    act_scale = act_scale or deploy_act_scale(path)
    if not path.is_dir():
        raise FileNotFoundError(f"no student folder {path}; pass RUN_DIR/student, RUN_DIR/student_packed or an "
                                "ONNX export (student_packed_onnx)")
    if (path / "quantization.json").is_file():
        if act_scale == "static":
            raise ValueError(f"static scales are served from the export with the run's calibrated clips; pass "
                             f"{path.with_name('student_packed')} instead of {path}")
        return load_student(path, act_scale).to(device).eval()
    if export.packed_file(path) is not None:
        return export.load_quantized(path, backend=backend, device=device, act_scale=act_scale)
    raise ValueError(f"{path} is not a qatkd student (no quantization.json, packed codes or model.onnx); pass "
                     "RUN_DIR/student, RUN_DIR/student_packed or an ONNX export")


def checkpointable(config):
    """Whether transformers can recompute this family's layers in backward (activation checkpointing)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING

    return MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING[type(config)].supports_gradient_checkpointing
