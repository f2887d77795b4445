"""TinyBERT's data augmentation (Jiao et al. 2020, Algorithm 1; huawei-noah TinyBERT/data_augmentation.py).

The training set grows by word replacement: each word of a text that is alphabetic and not a stop
word gets up to M candidates, from a masked language model when it is one word piece, else from
its nearest neighbours in a word-vector file (GloVe text format); then N times, each such word is
replaced with probability p by one of its candidates, drawn uniformly. The original text comes first
and a variant already made is dropped, so a text gives 1 to N + 1 texts. Labels are the original's:
distillation learns from the teacher's outputs on the new texts. The teacher is fine-tuned on the
original data; only QAT sees the augmented set (run.py --augment N --augment_mlm PATH).
Needs a BERT-style (WordPiece) masked LM and, for words of several pieces, word vectors.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
import re
from pathlib import Path

import torch

M, P = 15, 0.4  # candidates per word, and the probability of replacing a word (TinyBERT's defaults)
VECTOR_LIMIT = 100_000  # word vectors read: the file's first (most frequent) words, as TinyBERT's
STOP_WORDS = frozenset("""
i me my myself we our ours ourselves you you're you've you'll you'd your yours yourself yourselves he him his himself
she she's her hers herself it it's its itself they them their theirs themselves this that that'll these those am is
are was were be been being have has had having do does did doing a an the and but if or because as until while of at
by for with about against between into through during before after above below to from up down in out on off over
under again further then once here there all any both each few more most other some such no nor not only own same so
than too very s t can will just don don't should should've now d ll m o re ve y ain aren aren't couldn couldn't didn
didn't doesn doesn't hadn hadn't hasn hasn't haven haven't isn isn't ma mightn mightn't mustn mustn't needn needn't shan
shan't shouldn shouldn't wasn wasn't weren weren't won won't wouldn wouldn't 's 're""".split())  # TinyBERT's list


def load_mlm(path):
    """(masked LM in eval mode, its tokenizer) from a local folder; anything but a WordPiece tokenizer is refused."""
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    if not (Path(path) / "config.json").is_file():
        raise FileNotFoundError(f"--augment_mlm {path}: no model folder (config.json); pass a local BERT-style masked LM")
    tokenizer = AutoTokenizer.from_pretrained(path)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or type(backend.model).__name__ != "WordPiece" or tokenizer.mask_token is None:
        raise ValueError(f"--augment_mlm {path}: TinyBERT's augmentation needs a WordPiece masked LM (BERT-style, "
                         "'##' continuations); this tokenizer is not one")
    return AutoModelForMaskedLM.from_pretrained(path).eval(), tokenizer


def load_word_vectors(path, limit=VECTOR_LIMIT):
    """(words, {word: row}, unit-length vectors [V, d]) of a GloVe text file: "word x1 ... xd" per line."""
    words, rows = [], []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if len(words) == limit:
                break
            word, *values = line.rstrip("\n").split(" ")
            try:
                rows.append([float(v) for v in values])
            except ValueError:
                raise ValueError(f"{path}:{lineno}: not 'word x1 ... xd' with numbers; pass a GloVe text file") from None
            if not values or len(rows[-1]) != len(rows[0]):
                raise ValueError(f"{path}:{lineno}: {len(values)} numbers, the first line has {len(rows[0])}")
            words.append(word)
    if not words:
        raise ValueError(f"{path}: no word vectors")
    vectors = torch.tensor(rows, dtype=torch.float64)
    return words, {w: i for i, w in enumerate(words)}, vectors / vectors.norm(dim=1, keepdim=True).clamp_min(1e-300)


def words_of(text, tokenizer):
    """The text's words as the tokenizer splits them before word pieces (lower-cased for an uncased model, as
    TinyBERT's: its variants are these words joined by spaces)."""
    backend = tokenizer.backend_tokenizer
    normal = backend.normalizer.normalize_str(text) if backend.normalizer else text
    return [w for w, _ in backend.pre_tokenizer.pre_tokenize_str(normal)]


@torch.no_grad()
def mlm_candidates(words, targets, mlm, tokenizer, m=M):
    """{i: the masked LM's m likeliest pieces at word i, '##' pieces dropped} for the single-piece words i in targets.

    As TinyBERT: the input is [CLS] pieces-with-word-i-masked [SEP] pieces [SEP] (segments 0 and 1), one row
    per target word, in batches of at most about 2^27 logits. A text too long for the model's positions gets none."""
    pieces = [tokenizer.tokenize(w) for w in words]
    flat = [p for ps in pieces for p in ps]
    start = [sum(len(ps) for ps in pieces[:i]) for i in range(len(words))]
    length = 2 * len(flat) + 3
    if not targets or length > mlm.config.max_position_embeddings:
        return {}
    ids = tokenizer.convert_tokens_to_ids([tokenizer.cls_token] + flat + [tokenizer.sep_token] + flat + [tokenizer.sep_token])
    segments = [0] * (len(flat) + 2) + [1] * (len(flat) + 1)
    out, device = {}, mlm.device
    rows = max(1, 2 ** 27 // (length * mlm.config.vocab_size))
    for first in range(0, len(targets), rows):
        chunk = targets[first:first + rows]
        batch = torch.tensor([ids] * len(chunk), device=device)
        for row, i in enumerate(chunk):
            batch[row, 1 + start[i]] = tokenizer.mask_token_id
        logits = mlm(input_ids=batch, token_type_ids=torch.tensor([segments] * len(chunk), device=device)).logits
        for row, i in enumerate(chunk):
            top = torch.argsort(logits[row, 1 + start[i]], descending=True)[:m].tolist()
            out[i] = [t for t in tokenizer.convert_ids_to_tokens(top) if not t.startswith("##")]
    return out


def vector_candidates(word, vectors, m=M):
    """The m words nearest to word by cosine (itself left out), title-cased if word is; [] if it has no vector."""
    words, index, unit = vectors
    if word not in index:
        return []
    sim = unit @ unit[index[word]]
    near = [words[j] for j in torch.argsort(sim, descending=True)[:m + 1].tolist() if j != index[word]][:m]
    return [w.title() for w in near] if word.istitle() else near


def candidates(words, mlm, tokenizer, vectors=None, m=M):
    """{i: candidates} for each word i that is alphabetic and not a stop word: the masked LM's for a word of one
    piece, the word vectors' for a word of several (none without vectors); a word with none keeps itself."""
    chosen = [i for i, w in enumerate(words) if re.fullmatch("[a-z]+", w.lower()) and w.lower() not in STOP_WORDS]
    single = [i for i in chosen if len(tokenizer.tokenize(words[i])) == 1]
    from_mlm = mlm_candidates(words, single, mlm, tokenizer, m)
    return {i: (from_mlm.get(i) if i in single else vector_candidates(words[i], vectors, m) if vectors else [])
            or [words[i]] for i in chosen}


def augment_text(text, mlm, tokenizer, vectors=None, n=20, p=P, rng=random):
    """[text] and up to n new texts (words joined by spaces), each word with candidates replaced with probability p.

    DEVIATION (augmented copies): a draw that replaces nothing is left out; TinyBERT keeps it once, a copy of the text
    with its words joined by spaces."""
    words = words_of(text, tokenizer)
    options = candidates(words, mlm, tokenizer, vectors)
    texts, seen = [text], {" ".join(words)}
    for _ in range(n):
        new = list(words)
        for i, choices in options.items():
            pick = rng.choice(choices)  # drawn for every word, replaced or not: TinyBERT's order of draws
            if rng.random() < p:
                new[i] = pick
        if " ".join(new) not in seen:
            seen.add(" ".join(new))
            texts.append(" ".join(new))
    return texts


def augment_examples(examples, mlm, tokenizer, vectors=None, n=20, p=P, seed=0, progress=None):
    """Examples (text_a, text_b or None, label) -> each example, then its variants: text_a's with text_b kept,
    then text_b's with text_a kept (TinyBERT augments each text of a pair in turn). progress(total=, desc=):
    a progress display (runtime.progress_bar), or None.

    DEVIATION (augmented pairs): TinyBERT's script writes the original pair twice and pairs text_b's variants with text_a's
    last variant (it edits the row in place); here the original comes once and each variant beside the other original.
    """
    rng, out = random.Random(seed), []
    with (progress or (lambda **kw: contextlib.nullcontext()))(total=len(examples), desc="augment") as bar:
        for a, b, label in examples:
            out.append((a, b, label))
            out += [(v, b, label) for v in augment_text(a, mlm, tokenizer, vectors, n, p, rng)[1:]]
            if b is not None:
                out += [(a, v, label) for v in augment_text(b, mlm, tokenizer, vectors, n, p, rng)[1:]]
            if bar is not None:
                bar.update(1)
    return out


def augmented_train(examples, n, mlm_path, vectors_path, folder, progress=None, device="cpu"):
    """augment_examples of a training set, made once and kept in folder/ (a JSON Lines file named by what
    decides it: the data, n, M, P, the stop words, the masked LM's and the word vectors' files), then read
    back: augmenting is slow (one masked-LM pass per text)."""
    from runtime import atomic_path

    files = [f for p in (mlm_path, vectors_path) if p for f in sorted(Path(p).rglob("*") if Path(p).is_dir() else [Path(p)])
             if f.is_file()]
    key = json.dumps([examples, n, M, P, VECTOR_LIMIT, sorted(STOP_WORDS),
                      [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files]])
    path = Path(folder) / f"train-aug{n}-{hashlib.sha256(key.encode()).hexdigest()[:12]}.jsonl"
    if path.is_file():
        print(f"reusing the augmented training set {path}")
        return [tuple(json.loads(line)) for line in path.read_text().splitlines()]
    mlm, tokenizer = load_mlm(mlm_path)
    vectors = load_word_vectors(vectors_path) if vectors_path else None
    out = augment_examples(examples, mlm.to(device), tokenizer, vectors, n, progress=progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps(e) + "\n" for e in out))
    print(f"augmented training set: {len(examples)} -> {len(out)} examples, written to {path}")
    return out
