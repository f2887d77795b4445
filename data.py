"""Data for qatkd: the GLUE tasks, your own files or a hub dataset, tokenization, dev metrics.

    TASKS              the eight GLUE tasks with the original code's settings (main.py:392-401)
    load_glue          GLUE TSV files (or the hub's nyu-mll/glue)
    load_data_files    your own CSV / TSV / JSON / JSON Lines files; load_hub_dataset: a hub dataset
    align_labels       a trained head's class order, matched by name
    tokenize           examples -> token ids (qatkd.batches pads them)
    task_metrics       accuracy, F1, MCC, correlations;  evaluate: a model's dev metrics

Every reader returns examples (text_a, text_b or None, label index or float); after reading, GLUE
and your own data take one path. Bad input raises ValueError or FileNotFoundError in one line that
names the file and the line.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

import qatkd

@dataclass(frozen=True)
class Task:
    """One classification or regression task: how its labels read, how it is scored, its settings.

    The eight GLUE tasks are rows of TASKS; your own data gets a Task from data_task().
    """

    name: str
    labels: tuple | None  # class labels as the data writes them, in the model's output order; None = regression
    metric: str = "acc"  # the dev metric a checkpoint is selected on
    max_len: int = 128
    batch_size: int = 32
    eval_every: int = 50
    ti_steps: int = 60  # Teacher Intervention's first phase (its paper: 60 steps, 120 for CoLA)
    scores: tuple = ()  # metrics besides accuracy: "f1" (of the positive class), "acc_and_f1", "mcc", "macro_f1"
    names: tuple | None = None  # the classes' names, as a trained head's config.id2label may call them
    positive: int = 1  # the class whose F1 "f1" reports
    hub_keys: tuple = ()  # GLUE: text columns in the hub dataset nyu-mll/glue
    tsv_columns: tuple = ()  # GLUE: (text_a, text_b or None, label) in the TSV file: header names, or indices
    dev_files: tuple = (("validation", "dev.tsv"),)

    @property
    def num_labels(self):
        return 1 if self.labels is None else len(self.labels)


BINARY, NLI2 = ("0", "1"), ("entailment", "not_entailment")
PAIR_F1 = ("f1", "acc_and_f1")
TASKS = {
    t.name: t
    for t in [  # label names as in the hub's nyu-mll/glue; settings of the original code (main.py:392-401)
        Task("cola", BINARY, metric="mcc", max_len=64, batch_size=16, eval_every=50, ti_steps=120, scores=("mcc",),
             names=("unacceptable", "acceptable"), hub_keys=("sentence",), tsv_columns=(3, None, 1)),
        Task("sst2", BINARY, metric="acc", max_len=64, batch_size=32, eval_every=100, names=("negative", "positive"),
             hub_keys=("sentence",), tsv_columns=("sentence", None, "label")),
        Task("mrpc", BINARY, metric="acc", max_len=128, batch_size=32, eval_every=50, scores=PAIR_F1,
             names=("not_equivalent", "equivalent"), hub_keys=("sentence1", "sentence2"),
             tsv_columns=("#1 String", "#2 String", "Quality")),
        Task("stsb", None, metric="corr", max_len=128, batch_size=32, eval_every=100,
             hub_keys=("sentence1", "sentence2"), tsv_columns=("sentence1", "sentence2", "score")),
        Task("qqp", BINARY, metric="acc", max_len=128, batch_size=32, eval_every=1000, scores=PAIR_F1,
             names=("not_duplicate", "duplicate"), hub_keys=("question1", "question2"),
             tsv_columns=("question1", "question2", "is_duplicate")),
        Task("mnli", ("entailment", "neutral", "contradiction"), metric="acc", max_len=128, batch_size=32,
             eval_every=8000, hub_keys=("premise", "hypothesis"), tsv_columns=("sentence1", "sentence2", "gold_label"),
             dev_files=(("validation_matched", "dev_matched.tsv"), ("validation_mismatched", "dev_mismatched.tsv"))),
        Task("qnli", NLI2, metric="acc", max_len=128, batch_size=32, eval_every=1000, hub_keys=("question", "sentence"),
             tsv_columns=("question", "sentence", "label")),
        Task("rte", NLI2, metric="acc", max_len=128, batch_size=32, eval_every=20, hub_keys=("sentence1", "sentence2"),
             tsv_columns=("sentence1", "sentence2", "label")),
    ]
}


def read_glue_tsv(path, task):
    """Examples (text_a, text_b or None, label) from a GLUE TSV file.

    Tab-separated with no quote processing (sentences contain bare "), UTF-8 with an optional
    BOM (MRPC has one), a header row except for CoLA. Bad rows raise ValueError naming file:line.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"missing data file {path}; --data_dir must hold the GLUE TSV files of task {task.name}")
    raw = path.read_bytes()
    try:
        lines = raw.decode("utf-8-sig").split("\n")
    except UnicodeDecodeError:
        bad = next(i for i, line in enumerate(raw.split(b"\n"), 1) if not _decodes(line))
        raise ValueError(f"{path}:{bad}: not valid UTF-8; save the file as UTF-8") from None
    cols = task.tsv_columns
    start = 0
    if isinstance(cols[2], str):  # named columns: find them in the header
        header = lines[0].rstrip("\r").split("\t")
        missing = [c for c in cols if c is not None and c not in header]
        if missing:
            raise ValueError(f"{path}:1: header has no column {missing[0]!r}; is this the GLUE {task.name} file?")
        cols = tuple(None if c is None else header.index(c) for c in cols)
        start = 1
    need = max(c for c in cols if c is not None) + 1
    examples = []
    for lineno, line in enumerate(lines[start:], start + 1):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        f = line.split("\t")
        if len(f) < need:
            raise ValueError(f"{path}:{lineno}: expected at least {need} tab-separated fields, found {len(f)}")
        a, b, y = f[cols[0]], None if cols[1] is None else f[cols[1]], f[cols[2]].strip()
        if task.labels is None:
            try:
                label = float(y)
            except ValueError:
                raise ValueError(f"{path}:{lineno}: label {y!r} is not a number") from None
            if not math.isfinite(label):
                raise ValueError(f"{path}:{lineno}: label {y!r} is not a finite number")
        elif y in task.labels:
            label = task.labels.index(y)
        else:
            raise ValueError(f"{path}:{lineno}: label {y!r} is not one of {', '.join(task.labels)}")
        examples.append((a, b, label))
    if not examples:
        raise ValueError(f"{path}: no examples")
    return examples


def _decodes(line):
    try:
        line.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def load_glue(task, data_dir=None):
    """{"train": [...], "validation": [...], ...} lists of (text_a, text_b, label).

    From data_dir in the GLUE TSV layout (train.tsv, dev.tsv; MNLI dev_matched/dev_mismatched),
    or, without data_dir, from the Hugging Face hub (dataset nyu-mll/glue).
    """
    if data_dir is not None:
        files = (("train", "train.tsv"),) + task.dev_files
        return {split: read_glue_tsv(Path(data_dir) / name, task) for split, name in files}
    try:
        from datasets import load_dataset
    except ImportError:
        raise ImportError(f"loading GLUE {task.name} from the hub needs the datasets package (pip install "
                          "datasets); or pass --data_dir with the GLUE TSV files") from None
    try:
        ds = load_dataset("nyu-mll/glue", task.name)
    except Exception as e:  # offline, or the hub is unreachable
        raise ConnectionError(f"could not load GLUE {task.name} from the hub ({type(e).__name__}); "
                           "pass --data_dir with the GLUE TSV files") from None
    keys = task.hub_keys + (None,) * (2 - len(task.hub_keys))
    return {
        split: [(r[keys[0]], None if keys[1] is None else r[keys[1]], r["label"]) for r in ds[split]]
        for split in ("train",) + tuple(s for s, _ in task.dev_files)
    }


# Your own data: CSV, TSV, JSON or JSON Lines files, or a hub dataset, read with datasets' builders.
# Everything after reading (examples, tokenization, training, metrics) is the path GLUE takes.

# CSV/TSV: no value is read as missing ("NA", "null" or "nan" in a text stay text); TSV: no quoting (as GLUE)
DATA_FORMATS = {".csv": ("csv", {"na_filter": False}), ".tsv": ("csv", {"sep": "\t", "quoting": 3, "na_filter": False}),
                ".json": ("json", {}), ".jsonl": ("json", {})}


def _datasets():
    try:
        import datasets
    except ImportError:
        raise ImportError("reading data files or hub datasets needs the datasets package (pip install datasets)") from None
    datasets.disable_progress_bars()
    return datasets


def _first_bad_line(path, suffix):
    """' (line N: why)' for the first line of a file that cannot be read, where the format tells."""
    import csv
    import io

    raw = Path(path).read_bytes()
    for i, line in enumerate(raw.split(b"\n"), 1):
        if not _decodes(line):
            return f" (line {i}: not valid UTF-8)"
    text = raw.decode("utf-8-sig")
    if suffix == ".jsonl":
        for i, line in enumerate(text.split("\n"), 1):
            try:
                line.strip() and json.loads(line)
            except ValueError:
                return f" (line {i}: not valid JSON)"
    if suffix in (".csv", ".tsv"):
        kw = {"delimiter": "\t", "quoting": csv.QUOTE_NONE} if suffix == ".tsv" else {}
        rows = list(csv.reader(io.StringIO(text), **kw))
        for i, row in enumerate(rows[1:], 2):
            if row and len(row) != len(rows[0]):
                return f" (line {i}: {len(row)} fields, the header has {len(rows[0])})"
    return ""


def read_data_file(path):
    """A CSV (comma), TSV (tab, no quoting), JSON or JSON Lines file as a datasets.Dataset, and
    where(i) naming the file and line (or record) of row i for error messages."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"missing data file {path}")
    if path.suffix.lower() not in DATA_FORMATS:
        raise ValueError(f"{path}: unknown format {path.suffix!r}; use one of {', '.join(DATA_FORMATS)}")
    rows = [line for line in path.read_bytes().splitlines() if line.strip()]
    if len(rows) <= (path.suffix.lower() in (".csv", ".tsv")):  # nothing, or a header only
        raise ValueError(f"{path}: no examples (the file holds {'a header only' if rows else 'nothing'})")
    builder, kw = DATA_FORMATS[path.suffix.lower()]
    datasets = _datasets()
    level = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its own report of a bad file: ours is one line
    try:
        table = datasets.load_dataset(builder, data_files=str(path), split="train", **kw)
    except Exception as e:  # the builders raise many kinds: name the file, and the line where we can
        while (e.__cause__ or e.__context__) is not None:  # the innermost error says what is wrong
            e = e.__cause__ or e.__context__
        why = (str(e).strip().splitlines() or [type(e).__name__])[-1][:160]
        raise ValueError(f"{path}: cannot be read as {path.suffix[1:].upper()}"
                         f"{_first_bad_line(path, path.suffix.lower())}: {why}") from None
    finally:
        datasets.logging.set_verbosity(level)
    suffix = path.suffix.lower()
    line = {".csv": 2, ".tsv": 2, ".jsonl": 1}.get(suffix)  # line of row 0 (a header line first in CSV/TSV)
    return table, (lambda i: f"{path}:{i + line}" if line else f"{path}: record {i + 1}")


def default_text_columns(columns, label_column):
    """As Hugging Face's run_glue: sentence1 and sentence2 if present, else the non-label columns
    (one or two; with more, qatkd asks instead of taking the first two as run_glue does)."""
    if "sentence1" in columns:
        return ("sentence1", "sentence2") if "sentence2" in columns else ("sentence1",)
    rest = [c for c in columns if c != label_column]
    if not 1 <= len(rest) <= 2:
        raise ValueError(f"cannot tell the text columns among {', '.join(columns)}; pass --text_columns a[,b]")
    return tuple(rest)


def examples_from_tables(tables, text_columns=None, label_column="label"):
    """Examples (text_a, text_b or None, label index or float) from {split: (datasets.Dataset, where)}.

    Labels: a ClassLabel column keeps its names and order; strings, integers or booleans make a
    classification task whose classes are the training split's values sorted (numbers ascending,
    strings in Unicode order); floats make a regression task. Returns (classes or None, {split:
    examples}). Bad labels or columns raise ValueError naming file and line.
    """
    train_table, where = tables["train"]
    for table, at in tables.values():  # the label column first: without it, no text column can be told
        if label_column not in table.column_names:
            raise ValueError(f"{at(0).split(':')[0]}: no label column {label_column!r}; its columns are: "
                             f"{', '.join(table.column_names)}; pass --label_column with the one that holds the labels")
    text_columns = tuple(text_columns or default_text_columns(train_table.column_names, label_column))
    if label_column in text_columns:
        raise ValueError(f"--text_columns {','.join(text_columns)} includes the label column {label_column!r}: the "
                         "model would read the answer; pass only the text columns")
    for table, at in tables.values():
        for c in text_columns:
            if c not in table.column_names:
                raise ValueError(f"{at(0).split(':')[0]}: no column {c!r}; its columns are: "
                                 f"{', '.join(table.column_names)}")
    feature = train_table.features[label_column]
    kinds, labels = {}, {}
    for split, (table, at) in tables.items():
        values = labels[split] = _numbers(table[label_column])
        for i, v in enumerate(values):
            if v is None or v == "":
                raise ValueError(f"{at(i)}: empty label")
        kinds[split] = "class" if hasattr(table.features[label_column], "names") else (
            "float" if any(isinstance(v, float) for v in values) else
            "str" if all(isinstance(v, str) for v in values) else
            "int" if all(isinstance(v, (int, bool)) for v in values) else "mixed")
        if kinds[split] == "mixed":
            i = next(i for i, v in enumerate(values) if type(v) is not type(values[0]))
            raise ValueError(f"{at(i)}: label {values[i]!r} mixes types with the earlier labels ({values[0]!r}); "
                             "use one kind: names, integers, or floats for regression")
    if kinds["train"] == "class":
        classes = tuple(feature.names)
    elif kinds["train"] == "float":
        classes = None
    else:
        classes = tuple(sorted(set(labels["train"])))
        if len(classes) < 2:
            raise ValueError(f"{where(0).split(':')[0]}: the label column {label_column!r} has one class only "
                             f"({classes[0]!r}); a classifier needs at least two")
    if len(set(kinds.values())) > 1:
        other = next(k for k in kinds.values() if k != kinds["train"])
        raise ValueError(f"the labels are {KINDS[kinds['train']]} in the training data but {KINDS[other]} in the "
                         "validation data; use one kind")
    index = None if classes is None or kinds["train"] == "class" else {c: i for i, c in enumerate(classes)}
    out = {}
    for split, (table, at) in tables.items():
        texts = [table[c] for c in text_columns]
        examples = []
        for i, y in enumerate(labels[split]):
            if classes is None and not math.isfinite(y):
                raise ValueError(f"{at(i)}: label {y} is not a finite number")
            if index is not None and y not in index:
                raise ValueError(f"{at(i)}: label {y!r} does not occur in the training data (its classes: "
                                 f"{', '.join(map(str, classes))})")
            text = [col[i] for col in texts]
            if any(t is None for t in text):
                raise ValueError(f"{at(i)}: empty text in column {text_columns[text.index(None)]!r}")
            examples.append((str(text[0]), str(text[1]) if len(text) > 1 else None,
                             float(y) if classes is None else y if index is None else index[y]))
        if not examples:
            raise ValueError(f"{at(0).split(':')[0]}: no examples")
        out[split] = examples
    return (None if classes is None else tuple(map(str, classes))), out


KINDS = {"class": "class names", "float": "numbers (regression)", "str": "names", "int": "integers"}


def _numbers(values):
    """Labels that a CSV/TSV reader left as text but that all read as numbers, as numbers (ints if all
    are integers); other values unchanged."""
    if not values or not all(isinstance(v, str) and v.strip() for v in values):
        return values
    try:
        floats = [float(v) for v in values]
    except ValueError:
        return values
    ints = all(re.fullmatch(r"\s*[-+]?\d+\s*", v) for v in values)
    return [int(v) for v in values] if ints else floats


def data_task(name, classes, n_train, batch_size=32):
    """The Task of your own data: accuracy and macro-F1 (and F1 of the second class, the positive
    one, when there are two), or Pearson/Spearman for regression; max length 128, batch 32, an
    evaluation about four times per epoch."""
    every = max(10, math.ceil(math.ceil(n_train / batch_size) / 4))
    if classes is None:
        return Task(name, None, "corr", eval_every=every)
    scores = ("macro_f1", "f1") if len(classes) == 2 else ("macro_f1",)
    return Task(name, tuple(classes), "acc", eval_every=every, scores=scores, names=tuple(classes))


def load_data_files(train_file, validation_file, text_columns=None, label_column="label"):
    """(Task, {"train": examples, "validation": examples}) from two CSV/TSV/JSON/JSON Lines files."""
    tables = {"train": read_data_file(train_file), "validation": read_data_file(validation_file)}
    classes, data = examples_from_tables(tables, text_columns, label_column)
    return data_task(data_name(train_file), classes, len(data["train"])), data


def load_hub_dataset(name, config=None, validation_split="validation", text_columns=None, label_column="label"):
    """(Task, {"train": examples, "validation": examples}) from a dataset on the Hugging Face hub."""
    datasets = _datasets()
    try:
        ds = datasets.load_dataset(name, config)
    except Exception as e:  # offline, or the hub is unreachable
        raise ConnectionError(f"could not load dataset {name!r} from the hub ({type(e).__name__}); pass "
                              "--train_file and --validation_file with local files instead") from None
    for split in ("train", validation_split):
        if split not in ds:
            raise ValueError(f"dataset {name!r} has no split {split!r}; its splits: {', '.join(ds)}"
                             + ("; pass --validation_split" if split == validation_split else ""))
    tables = {s: (ds[k], lambda i, k=k: f"{name}[{k}]: row {i + 1}")
              for s, k in (("train", "train"), ("validation", validation_split))}
    classes, data = examples_from_tables(tables, text_columns, label_column)
    full = name.replace("/", "--") + (f"-{config}" if config else "")
    return data_task(full, classes, len(data["train"])), data


def data_name(train_file):
    """A run's name for a data file: its stem, or its folder's name for a generic stem (train.csv)."""
    path = Path(train_file).resolve()
    return path.parent.name if path.stem.lower() in ("train", "training", "data") else path.stem


def name_labels(config, task):
    """Write the task's class names into a model config (id2label, label2id), to travel with it."""
    if task.labels is not None:
        config.id2label = dict(enumerate(task.names or task.labels))
        config.label2id = {name: i for i, name in config.id2label.items()}


def fingerprint(task, examples):
    """A short hash of a task's classes and a list of its examples, whatever file format they came from:
    cached teachers and default run folders are named by it, so different data never share one."""
    import hashlib

    return hashlib.sha1(repr((task.names or task.labels, examples)).encode()).hexdigest()[:16]


def align_labels(task, data, id2label, model="teacher"):
    """Put the data's classes in a trained head's order, matched by name (case and _/-/space ignored).

    id2label: {index: name} of the teacher's config. Generic names (LABEL_0, LABEL_1, ...) say
    nothing: the data's order is taken as the head's. Otherwise every name must match one of the
    data's classes (task.names, or the labels as written): the examples' labels and the task are
    permuted into the head's order, so the student inherits it and every metric is right.
    Returns (task, data, permuted); names that do not match raise ValueError listing both sets.
    """
    heads = [str(id2label[i]) for i in range(len(id2label))]
    if task.labels is None or all(re.fullmatch(r"LABEL_\d+", n) for n in heads):
        return task, data, False
    norm = lambda x: re.sub(r"[\s_-]+", "_", str(x).strip().lower())  # noqa: E731
    for ours in (task.names, task.labels):
        if ours and sorted(map(norm, ours)) == sorted(map(norm, heads)):
            order = [list(map(norm, ours)).index(norm(n)) for n in heads]  # head class j is our class order[j]
            if order == list(range(len(order))):
                return task, data, False
            new = {old: j for j, old in enumerate(order)}
            task = dataclasses.replace(task, labels=tuple(task.labels[i] for i in order), positive=new[task.positive],
                                       names=None if task.names is None else tuple(task.names[i] for i in order))
            return task, {k: [(a, b, new[y]) for a, b, y in v] for k, v in data.items()}, True
    ours = [str(c) for c in task.names or task.labels]
    listed = lambda xs: ", ".join(xs[:8]) + (f", ... ({len(xs)} in all)" if len(xs) > 8 else "")  # noqa: E731
    raise ValueError(f"the {model}'s labels ({listed(heads)}) do not match the data's ({listed(ours)}); "
                     + ("pass a teacher trained on these classes" if model == "teacher" else
                        f"evaluate the {model} on data with its classes (check --label_column)"))


def tokenize(examples, tokenizer, max_len):
    """Token ids per example, pairs truncated longest-first to max_len (special tokens included)."""
    # DEVIATION (tokenization): the teacher's own (fast) tokenizer, truncating pairs longest-first to max_len tokens with
    # the special tokens; the original's BertTokenizer truncates to max_seq - 3 before adding them (the same lengths)
    a = [e[0] for e in examples]
    b = [e[1] for e in examples] if examples[0][1] is not None else None
    enc = tokenizer(a, b, truncation=True, max_length=max_len)
    feats = [{k: enc[k][i] for k in qatkd.MODEL_INPUTS if k in enc} for i in range(len(examples))]
    for f, e in zip(feats, examples):
        f["labels"] = e[2]
    return feats


def _confusion(preds, labels, positive=1):
    """(tp, tn, fp, fn) of predictions against labels, for the class `positive` against the rest."""
    pairs = [(p == positive, y == positive) for p, y in zip(preds, labels)]
    return tuple(sum(p == a and y == b for p, y in pairs) for a, b in ((1, 1), (0, 0), (1, 0), (0, 1)))


def _mcc(preds, labels):
    tp, tn, fp, fn = _confusion(preds, labels)
    denom = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return (tp * tn - fp * fn) / denom if denom else 0.0


def _f1(preds, labels, positive=1):
    tp, _, fp, fn = _confusion(preds, labels, positive)
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


def task_metrics(task, logits, labels):
    """Dev metrics: accuracy and task.scores (F1 of the positive class, its mean with accuracy,
    Matthews correlation, macro-F1 over the classes); Pearson/Spearman for regression.

    logits: [N, C]; labels: [N]. Values are fractions (0..1), not percentages. A correlation of
    constant predictions is undefined: NaN.
    """
    if task.labels is None:
        from scipy.stats import pearsonr, spearmanr

        p, y = logits.squeeze(-1).tolist(), labels.tolist()
        constant = len(set(p)) < 2 or len(set(y)) < 2
        pearson = math.nan if constant else float(pearsonr(p, y)[0])
        spearman = math.nan if constant else float(spearmanr(p, y)[0])
        return {"pearson": pearson, "spearman": spearman, "corr": (pearson + spearman) / 2}
    preds, y = logits.argmax(-1).tolist(), labels.tolist()
    out = {"acc": sum(p == t for p, t in zip(preds, y)) / len(y)}
    if "f1" in task.scores:
        out["f1"] = _f1(preds, y, task.positive)
    if "acc_and_f1" in task.scores:
        out["acc_and_f1"] = (out["acc"] + out["f1"]) / 2
    if "mcc" in task.scores:
        out["mcc"] = _mcc(preds, y)
    if "macro_f1" in task.scores:
        out["macro_f1"] = sum(_f1(preds, y, c) for c in range(task.num_labels)) / task.num_labels
    return out


def useless(task, logits, labels):
    """Why a model's dev predictions are useless, or None: one class predicted for every example,
    an accuracy no better than always predicting the most frequent class, or (regression) a
    correlation that is undefined or not positive. logits: [N, C]; labels: [N]."""
    if task.labels is None:
        corr = task_metrics(task, logits, labels)["corr"]
        return None if corr > 0 else f"its predictions do not correlate with the labels (corr {corr:.3f})"
    names, preds = task.names or task.labels, logits.argmax(-1)
    if len(preds.unique()) == 1:
        return f"it predicts one class ({names[int(preds[0])]!r}) for all {len(preds)} dev examples"
    counts = torch.bincount(labels, minlength=task.num_labels)
    acc, majority = float((preds == labels).float().mean()), float(counts.max()) / len(labels)
    if acc <= majority:
        return (f"its accuracy ({100 * acc:.2f}) is no better than always predicting the most frequent class "
                f"({names[int(counts.argmax())]!r}: {100 * majority:.2f})")
    return None


def f1_class(task):
    """The name of the class whose F1 the metrics report as "f1" (None if they report none)."""
    return str((task.names or task.labels)[task.positive]) if "f1" in task.scores else None


@torch.no_grad()
def predict(model, dev_sets, batch_size, pad_id=0, desc="eval", pad_to=None, progress=None):
    """{split: (logits [N, C], labels [N])} of a model on dev_sets ({split: features}), batched in file
    order. progress(total=, desc=): the progress display, tqdm's by default (runtime.progress_bar)."""
    from tqdm.auto import tqdm

    progress = progress or (lambda **kw: tqdm(leave=False, dynamic_ncols=True, **kw))
    was_training = model.training
    model.eval()
    out = {}
    for split, feats in dev_sets.items():
        logits, labels = [], []
        with progress(total=math.ceil(len(feats) / batch_size), desc=desc) as bar:
            for b in qatkd.batches(feats, batch_size, pad_id, device=model.device, pad_to=pad_to):
                logits.append(model(**qatkd.model_inputs(model, b)).logits.float().cpu())
                labels.append(b["labels"].cpu())
                bar.update(1)
        out[split] = torch.cat(logits), torch.cat(labels)
    model.train(was_training)
    return out


def evaluate(model, task, dev_sets, batch_size, pad_id=0, desc="eval", pad_to=None, progress=None):
    """Dev metrics of a model (task_metrics); MNLI's second split gets the suffix _mm.

    Batches are formed in file order, so a result is reproducible. The student's activation scales
    are per batch (as in the original), so its metrics depend on the batch size and on the padding
    (pad_to: every batch padded to that length, as the original code pads them).
    """
    out = {}
    for i, (logits, labels) in enumerate(predict(model, dev_sets, batch_size, pad_id, desc, pad_to, progress).values()):
        out.update({k + ("_mm" if i else ""): v for k, v in task_metrics(task, logits, labels).items()})
    return out
