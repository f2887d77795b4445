"""The benchmark: what a QAT step costs against plain fine-tuning, and inference, in one process.

    python run.py --task mrpc --benchmark --teacher DIR [--bench_memory] [--bench_inference]

Phases are timed in interleaved rounds (one step of each per round), so a drift in the machine's
speed hits all alike; medians, ratios to the full-precision step, the quantizers' and the loss's
shares, peak memory. Writes OUTPUT_DIR/benchmark-MODEL-bB-sS-DEVICE.{md,json}.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

import data
import export
import models
import qatkd
import runtime

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
        out.append(runtime.peak_memory_mb())
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
    side. Writes a Markdown table and JSON to OUTPUT_DIR/benchmark-MODEL-bB-sS-DEVICE[-inference][-actSCALE].{md,json}."""
    task = data.TASKS[args.task]
    teacher, name = bench_teacher(args, task)
    batch = bench_batch(args, task, teacher)
    where = (torch.cuda.get_device_name(args.device) if args.device.type == "cuda"
             else f"CPU, {torch.get_num_threads()} threads, malloc: {runtime.malloc_settings()}")
    params = sum(p.numel() for p in teacher.parameters())
    print(f"benchmark: {name} ({params / 1e6:.1f}M parameters), batch {args.batch_size} x length {args.max_len} "
          f"(no padding), W{args.wbits}A{args.abits}, activation scales {act_scale_of(args)}, {where}; "
          f"median of {args.bench_steps} rounds after "
          f"{args.bench_warmup} warm-up rounds")
    phases = bench_phases(args, task, teacher, batch)
    if args.bench_phase is not None:  # a child of --bench_memory: this one phase alone
        return phase_memory(phases[args.bench_phase], args.device)
    rows, steps = build_phases(phases, args.device)
    timed_rounds(rows, steps, args.bench_steps, args.bench_warmup, args.device)
    if args.bench_memory:
        fresh_process_memory(rows, args, argv)
    return bench_report(args, name, params, where, rows)


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
        peak = runtime.peak_memory_mb()
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
        p = subprocess.run([sys.executable, str(Path(__file__).resolve().with_name("run.py")), *argv, "--bench_phase", r["step"]],
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
        teacher = qatkd.use_qatkd_attention(AutoModelForSequenceClassification.from_config(
            BertConfig(num_labels=task.num_labels)))
        name = "random BERT-base"
    else:
        teacher = models.load_teacher(args.teacher, task)[0]
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
                          v if v is None else v.detach().requires_grad_() for v in vars(s).values()])
    return lambda: qatkd.kd_loss(s, t, batch["attention_mask"], kd)[0].backward()


def exported_step(student, backend, batch, device):
    """Inference of the student as it ships: exported, then loaded with a backend (a function to time)."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        export.export_quantized(student, d)
        return inference_step(export.load_quantized(d, backend=backend, device=device), batch)


RECOMPUTED = "QAT map {wa}, layers recomputed in backward (--recompute)"


def recomputed(student):
    """The student with each layer recomputed in backward (run.py --recompute): transformers' own
    activation checkpointing, non-reentrant (what the KD losses read leaves the layers by side ways)."""
    student.activation_checkpointing_enable({"use_reentrant": False})
    return student


def act_scale_of(args):
    """The activation scales the benchmark's quantized students have: --act_scale's, batch by default or at abits 32."""
    return (args.act_scale or "batch") if args.abits < 32 else "batch"


def bench_phases(args, task, teacher, batch):
    """{label: build}, each build() returning the function that one round times."""
    import copy

    def fp(attn):
        model = copy.deepcopy(teacher).train()
        model.set_attn_implementation(attn)
        return model

    def quantized(wbits, abits, training=True):
        """A student with --act_scale's activation scales."""
        act_scale = act_scale_of(args) if abits < 32 else "batch"
        return qatkd.quantize_student(teacher, wbits, abits, act_scale=act_scale).train(training)

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
            phases[f"QAT {kd} {wa}"] = lambda kd=kd: train_step(student(), qatkd.qat_loss_fn(teacher, kd), batch,
                                                               shared["opt"])
        phases[RECOMPUTED.format(wa=wa)] = lambda: train_step(recomputed(quantized(args.wbits, args.abits)),
                                                              qatkd.qat_loss_fn(teacher), batch)
        phases["QAT map, quantizers off (W32A32)"] = lambda: train_step(quantized(32, 32),
                                                                      qatkd.qat_loss_fn(teacher), batch)
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
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda" else runtime.peak_memory_mb()
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
        off = seconds["QAT map, quantizers off (W32A32)"]
        shares = {"quantizers_in_map_step": 1 - off / qat["map"],
                  **{f"loss_in_{kd}_step": loss_seconds[kd] / qat[kd] for kd in qat}}
        md += (f"\n\nShare of the map QAT step spent in quantizers: {100 * shares['quantizers_in_map_step']:.0f}% "
               f"(map step with W32A32 vs {wa}); in the KD loss: "
               + ", ".join(f"{kd} {100 * loss_seconds[kd] / qat[kd]:.0f}%" for kd in qat) + ".")
    md += f"\nPeak memory of the whole benchmark (the rounds, every phase's model resident): {peak:.0f} MiB."
    B, S = args.batch_size, args.max_len
    stem = Path(args.output_dir) / (f"benchmark-{name.replace(' ', '-').replace('/', '--')}-b{B}-s{S}-{device.type}"
                                    + ("-inference" if args.bench_inference else "")
                                    + (f"-act{act_scale_of(args)}" if act_scale_of(args) != "batch" else ""))
    stem.parent.mkdir(parents=True, exist_ok=True)
    header = (f"{name} ({params / 1e6:.1f}M parameters), batch {B} x length {S}, {wa}, activation scales "
              f"{act_scale_of(args)}, {where}, "
              f"torch {torch.__version__}; median of {n} rounds after {w} warm-up rounds\n\n")
    stem.with_suffix(".md").write_text(header + md + "\n")
    runtime.write_json(stem.with_suffix(".json"), {
        "model": name, "parameters": params, "batch_size": B, "seq_len": S, "wbits": args.wbits, "abits": args.abits,
        "act_scale": act_scale_of(args), "device": where, "torch": torch.__version__, "steps": n, "warmup": w,
        "reference": reference, "rows": rows,
        "shares": shares, "peak_memory_mb": peak})
    summary = "" if args.bench_inference else f"map QAT / FP step: {seconds[f'QAT map {wa}'] / seconds[reference]:.2f}x; "
    print(f"\n{md}\n{summary}written to {stem}.md and {stem}.json")
    return rows


SERVING = {  # --serving: what is compared, each in a fresh process
    "teacher, PyTorch fp32": "teacher-pytorch",
    "teacher, ONNX Runtime fp32": "teacher-onnx",
    "teacher, ONNX Runtime quantize_dynamic int8": "teacher-onnx-int8",
    "student, PyTorch int8 backend": "student-int8",
    "student, ONNX Runtime": "student-onnx",
    "student, PyTorch int8 backend, static scales": "student-int8-static",  # a run's export with calibrated clips
    "student, ONNX Runtime, static scales": "student-onnx-static",
}


def teacher_onnx(teacher_dir, out):
    """The fine-tuned teacher as ONNX in out/: model.onnx (fp32, torch's TorchScript-based exporter,
    opset 17: quantize_dynamic's shape inference rejects the dynamo exporter's graph) and
    model_int8.onnx (onnxruntime.quantization.quantize_dynamic, int8 weights: no training, no data)."""
    import logging
    import shutil
    import warnings

    from onnxruntime.quantization import QuantType, quantize_dynamic
    from transformers import AutoModelForSequenceClassification

    out.mkdir(parents=True, exist_ok=True)
    model = AutoModelForSequenceClassification.from_pretrained(teacher_dir, attn_implementation="eager").eval()
    names = ["input_ids", "attention_mask"] + (["token_type_ids"] if model.config.type_vocab_size > 0 else [])
    with warnings.catch_warnings(), runtime.atomic_path(out / "model.onnx") as tmp:
        warnings.simplefilter("ignore")  # the exporter's deprecation notes
        torch.onnx.export(export._Logits(model), tuple(torch.ones(2, 8, dtype=torch.long) for _ in names), str(tmp),
                          dynamo=False, input_names=names, output_names=["logits"], opset_version=17,
                          dynamic_axes={k: {0: "batch", 1: "length"} for k in names})
    logging.getLogger().setLevel(logging.ERROR)  # not its advice to pre-process: the graph is used as exported
    with runtime.atomic_path(out / "model_int8.onnx") as tmp:
        quantize_dynamic(str(out / "model.onnx"), str(tmp), weight_type=QuantType.QInt8)
    for f in Path(teacher_dir).iterdir():
        if f.is_file() and f.suffix in (".json", ".txt", ".model"):
            shutil.copy(f, out / f.name)


def serving_inputs(run):
    """--serving's inputs, checked before any work: (the run's fine-tuned teacher folder, its student_packed/)."""
    from transformers import AutoConfig

    teacher, packed = Path(json.loads((run / "metrics.json").read_text())["teacher_path"]), run / "student_packed"
    if not (teacher / "model.safetensors").is_file():
        raise FileNotFoundError(f"--serving: the run's teacher {teacher} is not a folder with model.safetensors (it "
                                "moved, or came from the hub); run --serving where the run was made")
    if export.packed_file(packed) is None:
        raise FileNotFoundError(f"--serving: {packed} holds no exported student")
    bits = json.loads(export.safetensors_metadata(export.packed_file(packed))["qatkd"])
    try:
        export.check_integer_bits(bits["wbits"], bits["abits"])
    except ValueError as e:
        raise ValueError(f"--serving: {e}") from None
    model_type = AutoConfig.from_pretrained(packed).model_type
    if model_type in export.ONNX_UNSUPPORTED:
        raise ValueError(f"--serving: no ONNX export for {model_type}: {export.ONNX_UNSUPPORTED[model_type]}")
    return teacher, packed


SERVING_REFERENCE = "teacher, ONNX Runtime quantize_dynamic int8"  # what takes minutes, not hours of training


def serving_rows(rounds, side=None):
    """--serving's table rows from {model: [one measurement per round]}: each speed the median over
    rounds, the peak memory the largest, the rest from the first round (the same in every round); side:
    {model: its speeds over the int8 teacher's timed side by side} (side_by_side_ratios), where timed so."""
    side = side or {}
    return [{"model": name, **rs[0], "latency_ms": statistics.median(r["latency_ms"] for r in rs),
             "examples_per_second": statistics.median(r["examples_per_second"] for r in rs),
             "peak_memory_mb": max(r["peak_memory_mb"] for r in rs), "rounds": rs, "side_by_side": side.get(name)}
            for name, rs in rounds.items()]


def side_by_side_ratios(times, reference=SERVING_REFERENCE):
    """{model: [(seconds for the dev set at batch 32, median batch-1 latency) per round]}, the models timed
    in turn in one process -> {model: {"throughput": x, "latency": y}}: the median over rounds of the
    reference's time over the model's (throughput, > 1: faster) and of the model's latency over the
    reference's (< 1: faster). The models of one round share the machine's state of that moment, so a
    slow spell moves both sides of a ratio alike; separate processes need not (RESULTS.md: serving)."""
    base = times[reference]
    assert all(len(ts) == len(base) for ts in times.values()), "every model timed in every round"
    return {name: {"throughput": statistics.median(b[0] / t[0] for t, b in zip(ts, base)),
                   "latency": statistics.median(t[1] / b[1] for t, b in zip(ts, base))} for name, ts in times.items()}


def serving(args, argv=()):
    """--serving RUN_DIR: the table a user deciding how to ship needs. The run's teacher (PyTorch fp32,
    ONNX Runtime fp32, ONNX Runtime's dynamic int8 quantization of it) and its student (int8 backend,
    ONNX Runtime; with the scales it is served with by default, models.deploy_act_scale, and with static
    scales where its export holds calibrated clips), each alone in a fresh process: dev metrics, file
    bytes, weight bytes in memory, latency at batch 1 (median over 200 dev examples one at a time, after
    10 untimed), throughput at batch 32 (the dev set in file order, after one untimed batch), peak
    resident memory. args.serving_rounds rounds over the models, so that a slow spell of a shared
    machine falls on every model alike: each speed is the median over rounds, the peak the largest
    (every round's values are kept in the JSON). Then the ONNX Runtime graphs side by side in one more
    process, 2 x args.serving_rounds rounds in turn: their speeds over the int8 teacher's
    (side_by_side_ratios), the comparison to read on a machine whose speed drifts. The ONNX graphs are
    made afresh in RUN_DIR/serving/ (teacher/, student/, student_static/); writes RUN_DIR/serving.{md,json}."""
    import subprocess

    from tqdm.auto import tqdm

    run = Path(args.serving)
    teacher, packed = serving_inputs(run)
    teacher_onnx(teacher, run / "serving" / "teacher")
    export.export_onnx(packed, run / "serving" / "student", act_scale=models.deploy_act_scale(packed))
    kinds = serving_kinds(packed)
    if "student-onnx-static" in kinds.values():
        export.export_onnx(packed, run / "serving" / "student_static", act_scale="static")
    rounds, child = {name: [] for name in kinds}, [sys.executable, str(Path(__file__).resolve().with_name("run.py")),
                                                   *argv, "--serving_model"]
    todo = [(name, kind) for _ in range(args.serving_rounds) for name, kind in kinds.items()] + [
        ("the ONNX Runtime graphs side by side", "side-by-side")]
    for name, kind in tqdm(todo, desc="serving: a process per model and round", dynamic_ncols=True):
        try:
            p = subprocess.run(child + [kind], capture_output=True, text=True, timeout=3600)  # a hang guard
        except subprocess.TimeoutExpired:
            raise ValueError(f"--serving: the process for {name} ran over an hour; is the machine busy?") from None
        if p.returncode:
            last = (p.stderr.strip().splitlines() or ["no message"])[-1]
            raise ValueError(f"--serving: the process for {name} failed: {last}")
        result = json.loads(p.stdout.strip().splitlines()[-1])
        if kind == "side-by-side":
            side = result
        else:
            rounds[name].append(result)
    rows = serving_rows(rounds, side)
    where = (f"{runtime.cpu_name()}, {rows[0]['threads']} threads, code {runtime.code_version()}, "
             f"median of {args.serving_rounds} rounds")
    metrics = list(rows[0]["metrics"])[:2]
    head = ["model", " / ".join(metrics), "file MB", "weights in memory MB", "latency, batch 1 (ms)",
            "throughput, batch 32 (examples/s)", "side by side: throughput / latency, over the int8 teacher's",
            "peak resident memory (MiB)"]
    table = [[r["model"], " / ".join(f"{100 * r['metrics'][k]:.2f}" for k in metrics), f"{r['file_bytes'] / 1e6:.1f}",
              f"{r['weight_bytes'] / 1e6:.1f}", f"{r['latency_ms']:.1f}", f"{r['examples_per_second']:.1f}",
              "-" if r["side_by_side"] is None else
              f"{r['side_by_side']['throughput']:.2f}x / {r['side_by_side']['latency']:.2f}x",
              f"{r['peak_memory_mb']:.0f}"] for r in rows]
    md = "\n".join([f"{run.name} on {args.data_name} dev; {where}", "", "| " + " | ".join(head) + " |",
                    "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in table] +
                   ["", f"*side by side*: the ONNX Runtime graphs timed in turn in one process, "
                    f"{2 * args.serving_rounds} rounds; the median over rounds of the int8 teacher's time at batch "
                    "32 over the model's (> 1: more throughput) and of the model's batch-1 latency over the "
                    "teacher's (< 1: faster)"])
    (run / "serving.md").write_text(md + "\n")
    runtime.write_json(run / "serving.json", {"where": where, "rows": rows})
    print(f"\n{md}\n\nwritten to {run / 'serving.md'} and serving.json")
    return rows


def serving_kinds(packed):
    """--serving's models {name: kind}: SERVING, the static-scale rows only where the export holds clips."""
    return {name: kind for name, kind in SERVING.items() if not kind.endswith("static") or export.has_clips(packed)}


def serving_load(args, run, kind):
    """One --serving model, ready to time: (model, its tokenized dev set, its pad id, the task, its file)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    import experiment

    teacher, packed = serving_inputs(run)
    made = run / "serving"
    folder, file = {"teacher-pytorch": (teacher, "model.safetensors"),
                    "teacher-onnx": (made / "teacher", "model.onnx"),
                    "teacher-onnx-int8": (made / "teacher", "model_int8.onnx"),
                    "student-int8": (packed, export.packed_file(packed).name),
                    "student-onnx": (made / "student", "model.onnx"),
                    "student-int8-static": (packed, export.packed_file(packed).name),
                    "student-onnx-static": (made / "student_static", "model.onnx")}[kind]
    if kind == "teacher-pytorch":
        model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    elif kind.startswith("student-int8"):
        model = export.load_quantized(folder, "int8", act_scale="static" if kind.endswith("static") else
                                      models.deploy_act_scale(folder))
    else:
        model = export.OnnxStudent(folder, threads=torch.get_num_threads(), file=file)
    if not args.task and not args.train_file and not args.dataset:  # --validation_file alone: classes by name
        args.train_file = args.validation_file
    task, examples = experiment.load_data(args)
    task, examples, _ = data.align_labels(task, examples, model.config.id2label, "model")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    dev = data.tokenize(examples[next(k for k in examples if k != "train")], tokenizer, args.max_len)
    return model, dev, tokenizer.pad_token_id or 0, task, folder / file


def serving_speed(model, dev, pad):
    """(seconds for the dev set in batches of 32 after one untimed batch, median latency at batch 1 over 200
    dev examples after 10 untimed, the logits, the batches)."""
    with torch.inference_mode():
        ones, latency = list(qatkd.batches(dev[:210], 1, pad)), []
        for i, b in enumerate(ones):
            start = time.perf_counter()
            model(**qatkd.model_inputs(model, b))
            latency += [time.perf_counter() - start] if i >= 10 else []
        batches = list(qatkd.batches(dev, 32, pad))
        model(**qatkd.model_inputs(model, batches[0]))
        start = time.perf_counter()
        logits = [model(**qatkd.model_inputs(model, b)).logits for b in batches]
        seconds = time.perf_counter() - start
    return seconds, statistics.median(latency), logits, batches


def serving_model(args):
    """The child of --serving: one model (args.serving_model) measured, its row as JSON on the last line;
    or ("side-by-side") the ONNX Runtime graphs timed in turn, 2 x args.serving_rounds rounds, their
    side_by_side_ratios with each round's times as JSON."""
    import experiment

    run = Path(args.serving)
    if args.serving_model == "side-by-side":
        kinds = {name: kind for name, kind in serving_kinds(serving_inputs(run)[1]).items() if "onnx" in kind}
        loaded = {name: serving_load(args, run, kind)[:3] for name, kind in kinds.items()}
        times = {name: [] for name in loaded}
        for i in range(2 * args.serving_rounds):  # every other round in reverse order: no model always first
            for name in list(loaded)[::1 if i % 2 == 0 else -1]:
                times[name].append(serving_speed(*loaded[name])[:2])
        ratios = side_by_side_ratios(times)
        print(json.dumps({name: {**ratios[name], "rounds": times[name]} for name in times}))
        return
    model, dev, pad, task, file = serving_load(args, run, args.serving_model)
    seconds, latency, logits, batches = serving_speed(model, dev, pad)
    metrics = data.task_metrics(task, torch.cat(logits).float(), torch.cat([b["labels"] for b in batches]))
    peak = runtime.peak_memory_mb()  # before model_bytes, which has ONNX Runtime load the graph once more
    print(json.dumps({"metrics": metrics, "file_bytes": file.stat().st_size, "weight_bytes": experiment.model_bytes(model),
                      "latency_ms": 1000 * latency, "examples_per_second": len(dev) / seconds,
                      "peak_memory_mb": peak, "threads": torch.get_num_threads()}))
