"""The student as it ships: packed low-bit codes, and integer inference.

    export_quantized   the trained student as integer codes packed into bytes plus their scales, and the
                       full-precision parts (LayerNorms, biases, position embeddings, classifier) as they
                       are, in one safetensors file (no pickle); calibrate_clips gives it constant
                       activation clips, calibrated on one training batch, for static scales
    load_quantized     rebuilds it: backend "fake" (fp32 weights set to the quantized values: logits
                       bit-identical to the student's) or "int8" (integer matrix products: IntLinear,
                       IntEmbedding, int8_attention), with activation scales per batch (the original's),
                       per example, or static (int8 only)
    export_onnx        the same integer student as an ONNX graph (packed weight codes, integer products on
                       the activations' codes), for ONNX Runtime; OnnxStudent runs it, called like the
                       PyTorch model
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from typing import Optional
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

import qatkd
from qatkd import CLIP, QuantEmbedding, QuantLinear
from runtime import atomic_path, write_json

def pack_bits(codes, bits):
    """Pack non-negative integer codes (< 2^bits, bits in 1, 2, 4, 8) into uint8, 8 // bits per byte.

    codes: any shape -> [ceil(numel * bits / 8)] uint8; little end first.
    """
    per = 8 // bits
    flat = codes.reshape(-1).to(torch.uint8)
    flat = torch.cat([flat, flat.new_zeros(-flat.numel() % per)]).reshape(-1, per)
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=codes.device)
    return (flat << shifts).sum(-1, dtype=torch.uint8)


def unpack_bits(packed, bits, numel):
    """Inverse of pack_bits: [ceil(numel * bits / 8)] uint8 -> [numel] uint8 codes."""
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
    return ((packed[:, None] >> shifts) & (2 ** bits - 1)).reshape(-1)[:numel]


def weight_codes(w, bits, per_row=False):
    """Integer codes and scales with codes_to_weight(codes, scale, bits) == quantize_weight(w, bits).

    Returns (codes >= 0 as uint8, scale as float32 [1] or [rows, 1]) for bits 1, 2, 4, 8:
        1: code 0/1 for -alpha/+alpha     2: code 0/1/2 for -alpha/0/+alpha
        4, 8: code = round(w_c * s) + 2^(k-1) - 1, scale s (the weight is (code - offset) / s)
    """
    with torch.no_grad():
        if bits in (1, 2):
            q = qatkd.quantize_weight(w, bits, per_row)
            alpha = q.abs().amax(dim=(-1,) if per_row else tuple(range(q.dim())), keepdim=True)
            codes = (q > 0).to(torch.uint8) if bits == 1 else (torch.sign(q) + 1).to(torch.uint8)
            return codes, alpha.reshape(-1, 1) if per_row else alpha.reshape(1)
        s = uniform_scale(w.clamp(-CLIP, CLIP), bits, per_row)
        codes = torch.round(w.clamp(-CLIP, CLIP) * s) + (2 ** (bits - 1) - 1)
        return codes.to(torch.uint8), s.reshape(-1, 1) if per_row else s.reshape(1)


def uniform_scale(x, bits, per_row=False):
    """The scale s = (2^(k-1) - 1) / max |x| of qatkd.quantize_uniform (x already clipped): per tensor
    (shape [1, ..., 1]) or per row (keepdim)."""
    n = 2 ** (bits - 1) - 1
    top = x.abs().amax((-1,) if per_row else tuple(range(x.dim())), keepdim=True)
    return n / top.clamp_min(n * torch.finfo(x.dtype).tiny)


def codes_to_weight(codes, scale, bits):
    """Dequantize weight_codes(): the exact floats the student computed in its forward pass."""
    if bits == 1:
        return torch.where(codes.bool(), scale, -scale)
    if bits == 2:
        return (codes.to(scale.dtype) - 1) * scale
    return (codes.to(scale.dtype) - (2 ** (bits - 1) - 1)) / scale


PACKED_FILE = "qatkd_packed.safetensors"  # not model.safetensors: stock from_pretrained then fails instead of
# building the architecture with random weights where the packed codes are (it reads no qatkd codes)


def packed_file(path):
    """The packed weights file of an export_quantized folder (PACKED_FILE; model.safetensors in exports
    written before it was renamed), or None."""
    for name in (PACKED_FILE, "model.safetensors"):
        f = Path(path) / name
        if f.is_file() and (name == PACKED_FILE or "qatkd" in safetensors_metadata(f)):
            return f
    return None


def safetensors_metadata(path):
    """The metadata of a safetensors file (export_quantized writes "qatkd" there)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return f.metadata() or {}


def export_quantized(student, path, tokenizer=None, clips=None):
    """Write the student in packed low-bit form to path/ (PACKED_FILE, config, tokenizer).

    For each quantized weight W ("name.weight"): "name.weight.codes" (packed uint8),
    "name.weight.scale" (float32, per tensor or per row) and its shape in the metadata; every other
    tensor of the state dict stays as it is; clips (calibrate_clips), if given, for static scales.
    Returns {"packed_bytes", "fp_bytes"}: bytes of codes and scales, and bytes kept in full precision.
    """
    from safetensors.torch import save_file

    bits = student.qatkd_bits
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    quantized = {f"{name}.weight": (m, isinstance(m, QuantEmbedding)) for name, m in student.named_modules()
                 if isinstance(m, (QuantLinear, QuantEmbedding)) and m.wbits < 32}
    tensors, shapes, sizes = {}, {}, {"packed_bytes": 0, "fp_bytes": 0}
    for key, value in student.state_dict().items():
        value = value.detach().cpu()  # a student trained on a GPU is packed on the CPU
        if key in quantized:
            codes, scale = weight_codes(value, bits["wbits"], per_row=quantized[key][1])
            tensors[key + ".codes"] = pack_bits(codes, bits["wbits"])
            tensors[key + ".scale"] = scale.contiguous()
            shapes[key] = list(value.shape)
            sizes["packed_bytes"] += tensors[key + ".codes"].numel() + scale.numel() * scale.element_size()
        else:
            tensors[key] = value.contiguous()
            sizes["fp_bytes"] += value.numel() * value.element_size()
    tensors.update({key: torch.tensor(alpha, dtype=torch.float32) for key, alpha in (clips or {}).items()})
    sizes["fp_bytes"] += 4 * len(clips or {})
    meta = {"qatkd": json.dumps({**bits, "shapes": shapes})}
    with atomic_path(path / PACKED_FILE) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    student.config.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return sizes


SERVED_SCALES = ("batch", "example", "static")  # qatkd.ACT_SCALES, and static: calibrated clips (calibrate_clips)


def calibrate_clips(student, batch):
    """Static activation clips for serving, calibrated on one batch (a run's first training batch in
    file order): for each quantized Linear's input ("NAME.act_clip") and each self-attention's Q, K, V
    and P ("NAME.act_clip.q", ...), alpha = min(max |x| over the batch, 2.5), x as the student computes
    it with its own training-time scales. Served with the constant step alpha / (2^(a-1) - 1)
    (IntLinear, int8_attention): no maximum over a tensor at inference, and no answer depends on its
    batch. ALBERT's shared layer: the largest over its N calls. Returns {key: alpha} for export_quantized(clips=...)."""
    clips, undo, calls, was_training = {}, [], {}, student.training

    def keep(key, x):  # an all-zero activation gets a small positive clip: its codes are 0 all the same
        clips[key] = max(clips.get(key, 1e-6), float(x.detach().abs().max().clamp(max=qatkd.CLIP)))

    def recording(name, quant):  # Q, K, V, then P: the order in which qat_attention (and DeBERTa's) quantize
        def quantize(t):
            calls[name] = calls.get(name, -1) + 1
            keep(f"{name}.act_clip.{'qkvp'[calls[name] % 4]}", t)
            return quant(t)

        return quantize

    quantizers = {name: m.quantize_act for name, m in student.named_modules() if getattr(m, "quantize_act", None)}
    try:
        for name, m in student.named_modules():
            if isinstance(m, QuantLinear) and m.abits < 32:
                undo.append(m.register_forward_pre_hook(lambda _m, args, key=f"{name}.act_clip": keep(key, args[0])))
        for name, quant in quantizers.items():
            student.get_submodule(name).quantize_act = recording(name, quant)
        with torch.no_grad():
            student.eval()(**qatkd.model_inputs(student, batch))
    finally:
        for h in undo:
            h.remove()
        for name, quant in quantizers.items():
            student.get_submodule(name).quantize_act = quant
        student.train(was_training)
    if any((n + 1) % 4 for n in calls.values()):  # each attention call quantizes exactly Q, K, V and P
        raise RuntimeError(f"an attention quantized {calls} tensors, not Q, K, V and P per call; no clips for it")
    return clips


def trained_scales(trained, path):
    """The act_scale a student was trained with, refused in one line if qatkd no longer has it."""
    if trained not in qatkd.ACT_SCALES:  # "learned": PACT clips, removed (no better than per-batch scales)
        raise ValueError(f"{path} was trained with act_scale {trained}, which qatkd no longer has (learned clips were "
                         "removed: they did not beat per-batch scales); train the student again")
    return trained


def has_clips(path):
    """Whether the exported student at path/ holds calibrated clips (calibrate_clips), for static scales."""
    from safetensors import safe_open

    with safe_open(str(packed_file(Path(path))), "pt") as f:
        return any(".act_clip" in k for k in f.keys())


def clip_value(tensors, key, path):
    """The calibrated clip stored under key in tensors (a state dict): there and a positive number, or refused."""
    alpha = tensors.get(key)
    if alpha is None:
        raise ValueError(f"{path} holds no calibrated clip {key}: it was exported before runs calibrated clips, or "
                         "not by a run; use act_scale example")
    if alpha.dim() != 0 or not (torch.isfinite(alpha) and alpha > 0):
        raise ValueError(f"{path}: the calibrated clip {key} is {alpha.tolist()}, not a positive number")
    return alpha


def check_integer_bits(wbits, abits):
    """Refuse in one line a student that integer inference (the int8 backend, ONNX) cannot compute: weights
    or activations wider than 8 bits (its Linears would stay fp32, unquantized, under an "int8" label)."""
    for kind, bits in (("weights", wbits), ("activations", abits)):
        if bits > 8:
            raise ValueError(f"integer inference (the int8 backend, ONNX) needs {kind} of 8 bits or fewer; this "
                             f"student has {bits}-bit {kind}: evaluate it with the fake backend")


def load_quantized(path, backend="fake", device="cpu", act_scale=None, kernel=None):
    """Rebuild an exported student.

    act_scale: None (as it was trained), "batch" (one scale per tensor over the batch, padding
    included: the original's), "example" (one per example over its real tokens: a prediction that
    depends on its input only, as a served model's must) or "static" (int8 backend: constant scales
    from the clips calibrated on a training batch, calibrate_clips; faster, and also batch-independent).
    kernel: IntLinear's integer matmul (None: the device's best, int8_kernel).

    backend "fake": dequantized fp32 weights, activations fake-quantized as in training; logits
    bit-identical to the trained student's. Weights are set to the exact quantized values (wbits=32
    modules, so nothing is quantized twice); inputs, Q, K, V and attention probabilities keep abits.
    backend "int8": integer inference (IntLinear, IntEmbedding below): every quantized Linear keeps
    its int8 codes and multiplies integer codes in an int8 x int8 -> int32 kernel; the word
    embedding is looked up from its packed codes; nothing holds an fp32 copy of a quantized weight.
    Self-attention (int8_attention): Q K^T in fp32 on fake-quantized Q, K (as in training), P V on the codes
    of P and V with exact integer sums (DeBERTa: both in fp32 on fake-quantized Q, K, V, P).
    Logits agree with the fake path (the same scales) to float rounding (its fp32 sums round, the int32
    sums do not).
    """
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForSequenceClassification

    if backend not in ("fake", "int8"):
        raise ValueError(f"unknown backend {backend!r}; use fake or int8")
    path = Path(path)
    file = packed_file(path)
    if file is None:
        raise FileNotFoundError(f"{path} holds no exported student ({PACKED_FILE}); pass RUN_DIR/student_packed")
    with safe_open(str(file), "pt") as f:
        meta = json.loads(f.metadata()["qatkd"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    wbits, abits = meta["wbits"], meta["abits"]
    act_scale = act_scale or trained_scales(meta.get("act_scale", "batch"), path)
    if act_scale not in SERVED_SCALES:
        raise ValueError(f"unknown activation scale {act_scale!r}; use one of {SERVED_SCALES}")
    if act_scale == "static" and backend != "int8":
        raise ValueError("static scales are served by the int8 backend and ONNX; use backend int8")
    config = AutoConfig.from_pretrained(path)
    if act_scale == "static" and not qatkd.model_family(config).interface:
        raise ValueError(f"static scales are not available for {config.model_type} (its own attention); use act_scale batch")
    if act_scale == "example" and not qatkd.model_family(config).per_example:
        raise ValueError(f"per-example activation scales are not available for {config.model_type} (its "
                         "relative-position embeddings share the Linear layers of the tokens); use act_scale batch")
    if backend == "int8":
        check_integer_bits(wbits, abits)
    state = {k: v for k, v in tensors.items() if not k.endswith((".codes", ".scale")) and ".act_clip" not in k}
    codes = {key: unpack_bits(tensors[key + ".codes"], wbits, math.prod(shape)).reshape(shape)
             for key, shape in meta["shapes"].items()}
    if backend == "fake":
        state.update({key: codes_to_weight(c, tensors[key + ".scale"], wbits) for key, c in codes.items()})
    model = AutoModelForSequenceClassification.from_config(config)
    model.load_state_dict(state, strict=backend == "fake")
    model.to(device)  # the integer kernels are chosen for the device the codes live on
    if backend == "fake":
        student = qatkd.quantize_student(model, 32, abits, act_scale=act_scale)
    else:
        student, tokens = model, None
        if act_scale == "example":  # each call's token mask, for IntLinear and Q, K, V, P
            tokens = {}
            student.register_forward_pre_hook(lambda _m, _a, kw: tokens.update(mask=qatkd.token_mask(kw)),
                                              with_kwargs=True)
        for key, c in codes.items():
            name = key.removesuffix(".weight")
            parent, child = (name.rsplit(".", 1) + [""])[:2] if "." in name else ("", name)
            old = student.get_submodule(name)
            c, scale = c.to(device), tensors[key + ".scale"].to(device)
            if isinstance(old, nn.Embedding):
                new = IntEmbedding(c, scale, wbits)
            else:
                new = IntLinear(*signed_codes(c, scale, wbits), old.bias, abits,
                                None if tokens is None else (lambda: tokens["mask"]), kernel, wbits,
                                clip_value(tensors, f"{name}.act_clip", path) if act_scale == "static" else None)
            setattr(student.get_submodule(parent), child, new)
        if qatkd.model_family(config).interface:  # attention: int8_attention (P V in integers)
            from transformers import AttentionInterface
            from transformers.masking_utils import AttentionMaskInterface, eager_mask

            AttentionInterface.register("qatkd_int8", int8_attention)
            AttentionMaskInterface.register("qatkd_int8", eager_mask)
            student.set_attn_implementation("qatkd_int8")
            names, n = {id(m): name for name, m in student.named_modules()}, 2 ** (abits - 1) - 1
            for m in qatkd.self_attention_modules(student):
                static = None
                if act_scale == "static":  # Q, K, V, P: (alpha, step alpha / n, s = n / alpha), in float32
                    clips = [clip_value(tensors, f"{names[id(m)]}.act_clip.{w}", path).float() for w in "qkvp"]
                    static = [(float(a), (a / n).to(device), float(n / a)) for a in clips]
                m.qatkd_int8 = (n, None if tokens is None else (lambda: tokens["mask"]), static)
        else:  # DeBERTa: its own attention, with Q, K, V and P fake-quantized as in training
            qatkd.use_qatkd_attention(student)
            for m in qatkd.self_attention_modules(student):
                m.quantize_act = ((lambda t: qatkd.quantize_uniform(t, abits)) if tokens is None else
                                  (lambda t: qatkd.quantize_per_example(t, abits, tokens["mask"])))
    student.qatkd_bits = {"wbits": wbits, "abits": abits, "act_scale": act_scale}
    return student.eval()


SIGNED_OFFSET = {1: 1, 2: 1, 4: 7, 8: 127}  # W_q = code - offset (1 bit: 2 * code - 1), the codes of weight_codes


def signed_codes(codes, scale, bits):
    """int8 codes q and a step c with q * c == codes_to_weight(codes, scale, bits), the exported weight:
        1 bit: q = -1/+1, c = alpha     2 bits: q in {-1, 0, +1}, c = alpha
        4, 8 bits: q = code - (2^(k-1) - 1), c = 1 / s
    """
    if bits in (1, 2):
        q = codes.to(torch.int8) * 2 - 1 if bits == 1 else codes.to(torch.int8) - 1
        return q, float(scale.reshape(()))
    return (codes.to(torch.int16) - (2 ** (bits - 1) - 1)).to(torch.int8), 1.0 / float(scale.reshape(()))


def int8_kernel(device):
    """The integer matmul used on a device: "onednn" (CPU: oneDNN's uint8 x int8 -> int32 GEMM, which
    the fp32 student cannot use), "int_mm" (CUDA: torch._int_mm), else "plain" (an int32 matmul:
    exact, slow). torch._int_mm on a CPU without VNNI instructions is much slower than an fp32 GEMM,
    so it is not used on CPUs."""
    if device.type == "cuda":
        return "int_mm"
    if device.type == "cpu" and hasattr(torch.ops.onednn, "qlinear_pointwise") and torch.backends.mkldnn.is_available():
        return "onednn"
    return "plain"


def int_codes(xs, n, shift, dtype):
    """IntLinear's activation codes: round(clamp(xs, -n, n)) + shift, as dtype (int8 with shift 0, or
    uint8 with shift 128 for oneDNN). xs: the scaled activation, any shape, a fresh tensor (changed in
    place): x * s gives the codes of round(clamp(x, -2.5, 2.5) * s), the training-time quantizer's
    (s a float, or one scale per example that broadcasts against x); x / step_x those of
    round(clamp(x, -alpha, alpha) / step_x) (static: alpha / step_x rounds to n)."""
    return xs.clamp_(-n, n).round_().add_(shift).to(dtype)


@torch.library.custom_op("qatkd::matmul_integer", mutates_args=())
def matmul_integer(x: torch.Tensor, step: torch.Tensor, w: torch.Tensor, c: torch.Tensor, wide: bool) -> torch.Tensor:
    """IntLinear under torch.export: X_q = round(x / step) [..., K] (x / step within [-127, 127]; step a
    scalar tensor: 1 where x holds the scaled activation, alpha / n for static scales) times int8 w [K, N],
    the int32 sum times c (a scalar tensor) -> float [..., N]. Exact up to the one rounding of the float
    product. export_onnx writes it as three ONNX nodes:
        QuantizeLinear(x, step, 128) -> uint8 X_q + 128   (x / step, round half to even, as here)
        MatMulInteger(., w, a_zero_point 128) -> int32   (uint8 x int8: the kernel ONNX Runtime
                                                            optimizes; RESULTS.md measures the other)
        DequantizeLinear(., c) -> float(sum) * c
    and then fuses the last two into ONNX Runtime's MatMulIntegerToFloat (fuse_integer_rescale).
    wide (weights wider than 4 bits): X_q stays int8 (zero point 0) and the three nodes stay, because
    on x86 CPUs without VNNI the uint8 x int8 kernel sums pairs of products in int16, which |W_q| up
    to 127 can saturate; |W_q| <= 7 cannot (2 * 255 * 7 < 2^15).
    """
    return ((x / step).round().to(torch.int32) @ w.to(torch.int32)).to(x.dtype) * c


@matmul_integer.register_fake
def _(x, step, w, c, wide):
    return x.new_empty((*x.shape[:-1], w.shape[-1]))


def onnx_matmul_integer(x, step, w, c, wide):
    """matmul_integer's ONNX nodes (export_onnx's translation table)."""
    import onnx
    from onnxscript import opset18 as op

    def const(value, dtype):
        return op.Constant(value=onnx.helper.make_tensor("c", dtype, [], [value]))

    if wide:
        codes = op.QuantizeLinear(x, step, const(0, onnx.TensorProto.INT8))
        return op.DequantizeLinear(op.MatMulInteger(codes, w), c)
    codes = op.QuantizeLinear(x, step, const(128, onnx.TensorProto.UINT8))
    return op.DequantizeLinear(op.MatMulInteger(codes, w, const(128, onnx.TensorProto.UINT8)), c)


def onnx_quantize_codes(x, step, unsigned):
    """quantize_codes' ONNX node: QuantizeLinear(x, step, 0) (int8, or uint8 when unsigned)."""
    import onnx
    from onnxscript import opset18 as op

    kind = onnx.TensorProto.UINT8 if unsigned else onnx.TensorProto.INT8
    return op.QuantizeLinear(x, step, op.Constant(value=onnx.helper.make_tensor("zero", kind, [], [0])))


def onnx_matmul_codes(a, b, scale=None):
    """matmul_codes' ONNX nodes: Cast(MatMulInteger(a, b), float), or with a scale
    DequantizeLinear(MatMulInteger(a, b, 0), scale), which fuse_integer_rescale makes one MatMulIntegerToFloat."""
    import onnx
    from onnxscript import opset18 as op

    if scale is None:
        return op.Cast(op.MatMulInteger(a, b), to=onnx.TensorProto.FLOAT)
    zero = op.Constant(value=onnx.helper.make_tensor("zero", onnx.TensorProto.UINT8, [], [0]))
    return op.DequantizeLinear(op.MatMulInteger(a, b, zero), scale)


def graph_readers(graph):
    """{tensor name: the nodes of an onnx.GraphProto that read it}; a graph output also has None, its
    reader outside the graph."""
    readers = {o.name: [None] for o in graph.output}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    return readers


def fuse_integer_rescale(model):
    """MatMulInteger(X_q + 128, W_q, 128) -> DequantizeLinear(c) [-> Add(b)] becomes ONNX Runtime's
    MatMulIntegerToFloat(X_q + 128, W_q, 1, c, 128[, b]) (its com.microsoft domain): the same float(sum) * c
    [+ b], computed in the GEMM's output stage, so the int32 sums are never written out and read back. Only
    the pairs matmul_integer and matmul_codes write (uint8 codes with their zero point, a scalar c, the sum
    read by the DequantizeLinear alone; a bias vector added to nothing else); the fused node takes the
    DequantizeLinear's place, where c exists. model: an onnx.ModelProto, changed in place."""
    import onnx

    graph = model.graph
    readers = graph_readers(graph)
    ranks = {v.name: len(v.type.tensor_type.shape.dim) for v in graph.value_info}
    ranks.update({t.name: len(t.dims) for t in graph.initializer})
    products = {}  # the DequantizeLinear's input -> its MatMulInteger, for each pair to fuse
    for node in graph.node:
        after = readers.get(node.output[0], [])
        if node.op_type == "MatMulInteger" and len(node.input) == 3 and len(after) == 1 and after[0] is not None \
                and after[0].op_type == "DequantizeLinear" and len(after[0].input) == 2 and \
                ranks.get(after[0].input[1]) == 0:
            products[node.output[0]] = node
    vectors = {t.name for t in graph.initializer if len(t.dims) == 1}
    biases = {}  # a fused product's output -> the Add of a bias vector that alone reads it, absorbed as its bias
    for node in graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in products:
            after = readers.get(node.output[0], [])
            if len(after) == 1 and after[0] is not None and after[0].op_type == "Add" and \
                    after[0].input[0] == node.output[0] and after[0].input[1] in vectors:
                biases[node.output[0]] = after[0]
    absorbed = {id(add) for add in biases.values()}
    nodes, one = [], "qatkd_one"
    for node in graph.node:
        if node.op_type == "MatMulInteger" and node.output[0] in products or id(node) in absorbed:
            continue  # fused below, where its DequantizeLinear is
        product = products.get(node.input[0]) if node.op_type == "DequantizeLinear" else None
        if product is not None:
            x, w, zero_point = product.input
            add = biases.get(node.output[0])
            node = onnx.helper.make_node("MatMulIntegerToFloat", [x, w, one, node.input[1], zero_point, "",
                                                                  add.input[1]] if add else
                                         [x, w, one, node.input[1], zero_point],
                                         list((add or node).output), name=product.name, domain="com.microsoft")
        nodes.append(node)
    if len(nodes) == len(graph.node):
        return
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.append(onnx.helper.make_tensor(one, onnx.TensorProto.FLOAT, [], [1.0]))
    if all(o.domain != "com.microsoft" for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))


# the output range of ops whose outputs are bounded: a Clip after them cannot cut beyond it (GELU's
# minimum is -0.16997 at x = -0.752; its tanh approximation's -0.17004)
BOUNDED = {"Gelu": (-0.1701, math.inf), "Softmax": (0.0, 1.0)}


def drop_saturated_clips(model):
    """Clip(x, lo, hi) -> QuantizeLinear(step, zero point) gives the codes of QuantizeLinear alone where
    neither bound cuts anything that QuantizeLinear's saturation does not, and the Clip is removed. A bound
    is redundant when its code round(bound / step) + zero point is at or beyond the code type's limit
    (int8 [-128, 127], uint8 [0, 255]; with 8-bit static scales hi = alpha gives 127 + 128 = 255: the
    upper clip is the saturation) or when x's producer cannot pass it (BOUNDED). With static scales this
    removes the Clip before the FFN's second Linear (its input is GELU's output, > -0.1701 > -alpha).
    Only Clips read by the QuantizeLinear alone, with bounds, step (> 0) and zero point all 0-d
    initializers. model: an onnx.ModelProto, changed in place."""
    import numpy as np
    from onnx import numpy_helper

    graph = model.graph
    consts = {t.name: numpy_helper.to_array(t) for t in graph.initializer if not t.dims}
    made, readers = {o: n for n in graph.node for o in n.output}, graph_readers(graph)
    dropped = set()
    for node in graph.node:
        clip = made.get(node.input[0]) if node.op_type == "QuantizeLinear" and len(node.input) == 3 else None
        if clip is None or clip.op_type != "Clip" or len(clip.input) != 3 or len(readers[clip.output[0]]) != 1:
            continue
        if not all(name in consts for name in [*clip.input[1:], *node.input[1:]]) or consts[node.input[1]] <= 0:
            continue
        lo, hi = (float(consts[name]) for name in clip.input[1:])
        step, zero = consts[node.input[1]], consts[node.input[2]]
        qmin, qmax = np.iinfo(zero.dtype).min, np.iinfo(zero.dtype).max
        code = lambda bound: float(np.rint(np.float32(bound) / step)) + int(zero)  # noqa: E731
        producer = made.get(clip.input[0])
        kind = producer.op_type if producer is not None and producer.domain in ("", "com.microsoft") else None
        low, high = BOUNDED.get(kind, (-math.inf, math.inf))  # what x can be
        if (code(lo) <= qmin or low >= lo) and (code(hi) >= qmax or high <= hi):
            node.input[0] = clip.input[0]
            dropped.add(id(clip))
    if dropped:
        nodes = [n for n in graph.node if id(n) not in dropped]
        del graph.node[:]
        graph.node.extend(nodes)


def activation_scale(x, n, tokens=None):
    """The activation quantizer's scale s = n / min(max |x|, 2.5), as a tensor in x's dtype, bit for bit
    qatkd's quantizers' scale.

    tokens None: one per tensor (quantize_uniform's). tokens [B, S] (1 = token): one per example over
    its real tokens, the sequence in dim -2 (quantize_per_example's): a Linear's input x [B, S, d] ->
    s [B, 1, 1], attention's Q, K, V, P [B, H, S, X] -> [B, 1, 1, 1]; x [B, d] -> s [B, 1].
    """
    if tokens is None:
        top = x.abs().max()
    else:
        top = x.abs().amax(-1, keepdim=True)  # [..., S, 1] or [B, 1]
        if x.dim() > 2:  # then over the real tokens: padding left out
            real = tokens.to(x.dtype).reshape(tokens.shape[0], *[1] * (x.dim() - 3), -1, 1)
            top = (top * real).amax(tuple(range(1, x.dim() - 1)), keepdim=True)
    return n / top.clamp(max=CLIP).clamp_min(n * torch.finfo(x.dtype).tiny)


class IntLinear(nn.Module):
    """A QuantLinear computed in integers: y = (X_q W_q^T) * (c / s_x) + b.

    x: [..., in] float -> y: [..., out] float. W_q: int8 codes [out, in] with W = W_q * c (c: the
    weight's step, signed_codes); X_q = round(clamp(x, -2.5, 2.5) * s_x) are the activation's int8
    codes, with the training-time scale s_x = (2^(a-1) - 1) / max |clamp(x)| (per tensor, symmetric;
    per example over its real tokens when tokens, a function returning the batch's [B, S] token mask,
    is given) or, with a calibrated clip alpha (calibrate_clips), static: X_q = round(clamp(x, -alpha,
    alpha) / step_x) with step_x = alpha / (2^(a-1) - 1), one ONNX QuantizeLinear (it divides by the step
    where training multiplies by n / alpha: a code may differ by one where x / step_x lies within float
    rounding of a half-integer). X_q W_q^T is an int32 sum: exact. On CPU (oneDNN) X_q travels as
    uint8 X_q + 128 and the kernel subtracts the zero point exactly; on x86 CPUs without VNNI its
    uint8 x int8 products are summed in pairs in int16 and could saturate for |W_q| > 64, so 8-bit
    weights are split as W_q = 128 W_hi + W_lo (two exact GEMMs).
    Under torch.export (export_onnx, kernel "onnx": W_q kept packed, wbits per code, and unpacked by
    graph ops) the same arithmetic runs as graph ops around matmul_integer.
    """

    def __init__(self, q, step, bias, abits=8, tokens=None, kernel=None, wbits=8, clip=None):
        # tokens is a function, not the mask holder itself: torch.export replaces dict attributes by copies
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.abits, self.step, self.tokens, self.wbits = abits, step, tokens, wbits
        self.kernel = kernel or int8_kernel(q.device)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.alpha = None if clip is None else float(clip)  # the calibrated clip, a constant in the ONNX graph
        if self.kernel == "onnx":  # packed wbits codes (>= 0), unpacked by graph ops that ONNX Runtime folds at load
            unsigned = (q.to(torch.int16) + SIGNED_OFFSET[wbits]) // (1 + (wbits == 1))
            self.register_buffer("codes", pack_bits(unsigned, wbits))
        elif self.kernel == "onednn":  # prepacked once; kept as attributes (opaque tensors: not in the state dict)
            hi = torch.round(q.to(torch.float32) / 128).to(torch.int8) if q.abs().max() > 64 else None
            parts = [(q, 1)] if hi is None else [((q.to(torch.int16) - 128 * hi.to(torch.int16)).to(torch.int8), 1),
                                                   (hi, 128)]
            self.packed = [(torch.ops.onednn.qlinear_prepack(p, None), f)
                           for p, f in parts]
        else:
            self.register_buffer("q", q.contiguous())

    def forward(self, x):
        n = 2 ** (self.abits - 1) - 1
        tokens = None if self.tokens is None else self.tokens()
        step = None if self.alpha is None else x.new_tensor(self.alpha) / n  # static: step_x = alpha / n
        if torch.compiler.is_exporting():  # ONNX: graph ops, MatMulInteger for X_q W_q^T
            w = self.weight_codes().t()
            if step is not None:  # Clip(-alpha, alpha), QuantizeLinear(x, step_x); y = (X_q W_q^T) * (c step_x) + b
                y = matmul_integer(x.clamp(-self.alpha, self.alpha), step, w, self.step * step, self.wbits > 4)
            else:  # X_q = round(clamp(x * s_x, -n, n)): QuantizeLinear with step 1
                s, one = activation_scale(x, n, tokens), x.new_ones(())
                if tokens is None:
                    y = matmul_integer((x * s).clamp(-n, n), one, w, self.step / s, self.wbits > 4)
                else:  # * c, then / s_x, as below (c / s_x of shape [B, 1, 1] is no scalar)
                    y = matmul_integer((x * s).clamp(-n, n), one, w, x.new_tensor(self.step), self.wbits > 4) / s
            return y if self.bias is None else y + self.bias
        if step is not None:  # x / step_x, rounded, as ONNX Runtime's QuantizeLinear computes it
            xs, factor = x / step, self.step * float(step)
        elif tokens is None:
            lo, hi = torch.aminmax(x)
            m = float(torch.maximum(-lo, hi))
            s = n / max(min(m, CLIP), n * torch.finfo(x.dtype).tiny)  # the activation quantizer's scale, per tensor
            s = float(torch.tensor(s, dtype=x.dtype))  # in x's precision, as uniform_scale computes it
            xs, factor = x * s, self.step / s  # y = (X_q W_q^T) * c / s_x + b
        else:
            s = activation_scale(x, n, tokens)  # [B, 1, 1] or [B, 1]
            xs, factor = x * s, self.step
        onednn = self.kernel == "onednn"
        codes = int_codes(xs, n, 128 if onednn else 0, torch.uint8 if onednn else torch.int8)
        if onednn:
            qx, ones, zeros = codes, torch.ones(1), torch.zeros(1, dtype=torch.long)
            y = None
            for packed, f in self.packed:
                part = torch.ops.onednn.qlinear_pointwise(qx, factor * f, 128, packed, ones, zeros,
                                                          self.bias if y is None and tokens is None else None,
                                                          1.0, 0, torch.float32, "none", [], "")
                y = part if y is None else y + part
        else:
            flat, q = codes.reshape(-1, self.in_features), self.weight_codes()
            acc = torch._int_mm(flat, q.t()) if self.kernel == "int_mm" else flat.int() @ q.int().t()
            y = (acc.float() * factor).reshape(*x.shape[:-1], self.out_features)
            if tokens is None:
                return y if self.bias is None else y + self.bias
        if tokens is None:
            return y
        y = y / s  # per example: X_q W_q^T c, then / s_x, then + b
        return y if self.bias is None else y + self.bias

    def weight_codes(self):
        """W_q, int8 [out, in]."""
        if self.kernel != "onnx":
            return self.q
        c = unpack_bits(self.codes, self.wbits, self.out_features * self.in_features).to(torch.int16)
        q = c * (1 + (self.wbits == 1)) - SIGNED_OFFSET[self.wbits]
        return q.to(torch.int8).reshape(self.out_features, -1)

    def extra_repr(self):
        scale = "static" if self.alpha is not None else "per tensor" if self.tokens is None else "per example"
        return f"in_features={self.in_features}, out_features={self.out_features}, abits={self.abits}, {scale}, {self.kernel}"


class IntEmbedding(nn.Module):
    """The row-wise quantized word embedding, looked up from its packed codes: ids [B, S] -> [B, S, d].

    Holds the codes packed (4 per byte for ternary) and one scale per row; only the looked-up rows
    are unpacked, with the export's arithmetic (codes_to_weight), so it returns the fp32 student's
    embedding bit for bit. Under torch.export (export_onnx) the whole table is unpacked and then
    looked up: nodes on constants, which ONNX Runtime folds once at load, so a call only gathers.
    """

    def __init__(self, codes, scale, bits):
        super().__init__()
        self.num_embeddings, self.embedding_dim = codes.shape
        self.bits = bits  # what a code means (codes_to_weight)
        self.pack = bits if self.embedding_dim * bits % 8 == 0 else 8  # rows that do not fill whole bytes: 1 per byte
        self.register_buffer("codes", pack_bits(codes, self.pack).reshape(self.num_embeddings, -1))
        self.register_buffer("scale", scale.reshape(self.num_embeddings, 1))

    def forward(self, ids):
        if torch.compiler.is_exporting():  # ONNX: unpack the table [V, d] (folded at load), then gather
            table = unpack_bits(self.codes.reshape(-1), self.pack, self.num_embeddings * self.embedding_dim)
            codes = table.reshape(self.num_embeddings, self.embedding_dim)[ids]
        else:  # unpack only the rows looked up, [B, S, d * pack / 8] -> [B, S, d]
            rows = self.codes[ids].reshape(-1)
            codes = unpack_bits(rows, self.pack, ids.numel() * self.embedding_dim).reshape(*ids.shape, -1)
        return codes_to_weight(codes, self.scale[ids], self.bits)

    def extra_repr(self):
        return f"{self.num_embeddings}, {self.embedding_dim}, {self.bits}-bit codes"


@torch.library.custom_op("qatkd::quantize_codes", mutates_args=())
def quantize_codes(x: torch.Tensor, step: torch.Tensor, unsigned: bool) -> torch.Tensor:
    """round(x / step) as int8 codes (uint8 when unsigned), x / step within [-127, 127] ([0, 127]); round
    half to even; step a scalar tensor. ONNX: QuantizeLinear(x, step, 0) (torch.export would write Round,
    which ONNX Runtime runs slowly)."""
    return (x / step).round().to(torch.uint8 if unsigned else torch.int8)


@quantize_codes.register_fake
def _(x, step, unsigned):
    return torch.empty_like(x, dtype=torch.uint8 if unsigned else torch.int8)


@torch.library.custom_op("qatkd::matmul_codes", mutates_args=())
def matmul_codes(a: torch.Tensor, b: torch.Tensor, scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """a @ b for 8-bit codes (uint8 a [..., M, K], int8 b [..., K, N]) -> float32 [..., M, N], exact: each
    sum is an integer below 2^24 while K <= 1040 (|a|, |b| <= 127); times scale (a float32 scalar) if given.
    ONNX: Cast(MatMulInteger(a, b)), or MatMulIntegerToFloat(a, b, 1, scale) (onnx_matmul_codes)."""
    y = a.float() @ b.float()
    return y if scale is None else y * scale


@matmul_codes.register_fake
def _(a, b, scale=None):
    return a.new_empty((*a.shape[:-1], b.shape[-1]), dtype=torch.float32)


def int8_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **_):
    """qat_attention as the int8 backend and its ONNX graph compute it (inference: no dropout, no
    Teacher Intervention), with P V summed in integers.

    query, key, value: [B, H, S, d_h]; attention_mask: additive [B, 1, S, S] or None. module.qatkd_int8 is
    (n = 2^(a-1) - 1, a function returning the batch's [B, S] token mask or None, and None or, for Q, K, V
    and P, the calibrated clips' (alpha, step alpha / n, s = n / alpha)); without either, per-tensor scales.
        Q, K <- Q_a(Q), Q_a(K)                      fake-quantized: codes / s, the values qat_attention uses
        P = softmax(Q K^T / sqrt(d_h) + mask)
        C = (P_q V_q) / s_P / s_V                  P_q in [0, n], V_q in [-n, n]: the codes of Q_a(P), Q_a(V)
    C is qat_attention's Q_a(P) Q_a(V) with its sum exact (integers) instead of rounded in float. With
    scalar scales (per tensor, or static) C = (P_q V_q) * (1 / (s_P s_V)), as ONNX Runtime's
    MatMulIntegerToFloat computes it (matmul_codes).
    Returns (C as [B, S, H, d_h], P). Under pack_real_tokens (static scales) query, key and value come as
    [1, H, T, d_h] on the batch's T kept positions, and C goes back so: [1, T, H, d_h].
    """
    n, tokens, static = module.qatkd_int8
    tokens = None if tokens is None else tokens()
    pack = getattr(module, "qatkd_pack", lambda: None)()  # pack_real_tokens: Q, K, V come as [1, H, T, d_h]

    def codes(x, i, lo=-n):  # (codes, s): round(clamp(clamp(x, -2.5, 2.5) * s)) as int8, or uint8 for P (lo = 0)
        if static is None:
            s = activation_scale(x, n, tokens)
            return quantize_codes((x * s).clamp(lo, n), x.new_ones(()), lo == 0), s
        alpha, step, s = static[i]  # static: round(clamp(x, -alpha, alpha) / step), as in IntLinear
        return quantize_codes(x.clamp(0.0 if lo == 0 else -alpha, alpha), step, lo == 0), s

    (q, s_q), (k, s_k), (v, s_v) = codes(query, 0), codes(key, 1), codes(value, 2)
    if pack is not None:  # static codes are elementwise: taken on the kept positions, then spread
        q, k, v = (spread_rows(t, pack) for t in (q, k, v))
    scaling = query.size(-1) ** -0.5 if scaling is None else scaling
    # not DequantizeLinear: ONNX Runtime would fuse it into an int8 x int8 Q K^T that saturates int16 sums
    scores = torch.matmul(q.float() / s_q, (k.float() / s_k).transpose(-1, -2)) * scaling
    probs = torch.softmax(scores if attention_mask is None else scores + attention_mask, dim=-1)
    p, s_p = codes(probs, 3, 0)
    if tokens is None:  # scalar scales: the rescale inside ONNX Runtime's MatMulIntegerToFloat, * (1 / (s_P s_V))
        ctx = matmul_codes(p, v, torch.as_tensor(1 / (s_p * s_v), dtype=torch.float32, device=query.device))
    else:
        ctx = matmul_codes(p, v) / s_p / s_v
    qatkd.record_attention(module, scores, probs, ctx)  # forward_internals on a deployed student
    ctx = ctx.transpose(1, 2).contiguous()  # [B, S, H, d_h]
    if pack is not None:  # the kept positions' rows: [1, T, H, d_h]
        ctx = ctx.flatten(0, 1).index_select(0, pack["rows"]).unsqueeze(0)
    return ctx, probs


def spread_rows(x, pack):
    """pack_real_tokens' codes of Q, K or V, [1, H, T, d_h] on the T kept positions -> [B, H, S, d_h]:
    position i gets row pack["spread"][i], its own where kept, else (padding) the last kept row before
    it, which attention's mask gives weight exactly 0 (and a padded query's row is never read back)."""
    heads, d = x.shape[1], x.shape[3]
    flat = x.transpose(1, 2).reshape(-1, heads * d)  # [T, H d_h]
    return flat.index_select(0, pack["spread"]).view(*pack["shape"], heads, d).transpose(1, 2)


# Per family, the module that takes the embeddings [B, S, .] and returns the last hidden states [B, S, d]:
# with static scales the export runs it on the real tokens only (pack_real_tokens). ModernBERT is left
# out: its rotary positions are computed inside the layers from the sequence's shape
PACKED_ENCODER = {"bert": "BertEncoder", "roberta": "RobertaEncoder", "xlm-roberta": "XLMRobertaEncoder",
                  "camembert": "CamembertEncoder", "electra": "ElectraEncoder", "mobilebert": "MobileBertEncoder",
                  "albert": "AlbertTransformer", "distilbert": "Transformer"}


def pack_real_tokens(model):
    """Run the encoder's per-token layers (every Linear, LayerNorm, GELU, residual sum) on the batch's
    real tokens only, and each example's first position (the one the classifier reads: padding, if the
    batch is padded on the left). The encoder's input [B, S, .] becomes [1, T, .] (T kept positions);
    attention (int8_attention) quantizes Q, K, V there, spreads their codes to [B, H, S, d_h]
    (spread_rows; its scores, softmax and P V still cover every position) and gathers its context's
    kept rows; the encoder's output is [B, S, d] again, zeros at padding. With static scales every
    quantizer is elementwise, so each kept position gets the arithmetic it gets in the padded batch:
    the same logits, without the per-token work on padding. An example without any token is the
    exception (its first position's attention has no key to attend to, and spreading changes what it
    averages over instead). export_onnx calls it (NonZero, CumSum, Gather and one ScatterND in the
    graph) on a model called with keyword inputs. Refused: a family without a row in PACKED_ENCODER, a
    student without static scales, a model packed already. Returns the model, changed for good."""
    family = model.config.model_type
    if family not in PACKED_ENCODER:
        raise ValueError(f"pack_real_tokens does not know {family}'s encoder; export without it")
    if getattr(model, "qatkd_bits", {}).get("act_scale") != "static":  # other scales read padding or whole examples
        raise ValueError("pack_real_tokens needs a student loaded with static scales (load_quantized(..., \"int8\", "
                         "act_scale=\"static\"))")
    if getattr(model, "qatkd_packed", False):
        raise ValueError("pack_real_tokens: this model runs on its real tokens already")
    encoders = qatkd.modules_of(model, PACKED_ENCODER[family])
    if len(encoders) != 1:
        raise ValueError(f"pack_real_tokens: expected one {PACKED_ENCODER[family]} in the {family} model, found "
                         f"{len(encoders)}")
    pack = {}  # per call: shape [B, S]; rows [T], the kept positions in [B * S]; spread [B * S], where each reads

    def start(_model, _args, kw):
        mask = qatkd.token_mask(kw)
        keep = torch.cat([torch.ones_like(mask[:, :1]), mask[:, 1:]], 1).reshape(-1)
        pack.update(shape=mask.shape, rows=keep.nonzero().squeeze(-1), spread=keep.cumsum(0) - 1)

    def packed(_encoder, args, kw):  # [B, S, .] -> [1, T, .]
        h = args[0] if args else kw.pop("hidden_states")
        return (h.flatten(0, 1).index_select(0, pack["rows"]).unsqueeze(0), *args[1:]), kw

    def unpacked(_encoder, _args, _kw, out):  # [1, T, d] -> [B, S, d], zeros at padding
        h = out.last_hidden_state[0]
        full = h.new_zeros(math.prod(pack["shape"]), h.shape[-1]).index_copy(0, pack["rows"], h)
        out["last_hidden_state"] = full.view(*pack["shape"], -1)
        return out

    model.register_forward_pre_hook(start, with_kwargs=True)
    encoders[0].register_forward_pre_hook(packed, with_kwargs=True)
    encoders[0].register_forward_hook(unpacked, with_kwargs=True)
    for m in qatkd.self_attention_modules(model):
        m.qatkd_pack = lambda: pack  # a function: torch.export would copy a dict attribute
    model.qatkd_packed = True
    return model


class _Logits(nn.Module):
    """model(input_ids, attention_mask[, token_type_ids]) -> logits, the signature an ONNX graph takes."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        kw = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **kw).logits


ONNX_UNSUPPORTED = {"deberta-v2": "torch.export cannot trace its relative-position attention with a dynamic length"}


def export_onnx(path, out, act_scale="example", skip_padding=True):
    """The packed student at path/ (export_quantized) as an ONNX graph at out (model.onnx beside a
    copy of config and tokenizer): what load_quantized(path, "int8") computes.

    Inputs input_ids, attention_mask (and token_type_ids where the family has them), int64 [B, S],
    batch and length dynamic; output logits [B, C]. Every quantized Linear is packed weight codes
    (unpacked to int8 [in, out] by nodes ONNX Runtime folds at load) and an integer product on the
    activation's codes (per example over the real tokens with act_scale "example", per tensor with
    "batch", constant with "static"), rescaled once (matmul_integer, fuse_integer_rescale), with no Clip
    where QuantizeLinear's saturation does its work (drop_saturated_clips); attention's P V is a
    MatMulInteger on the codes of P and V (int8_attention); the word embedding is gathered from its
    codes, the table packed in the file and unpacked at load. skip_padding (static scales; every family
    of PACKED_ENCODER): the per-token layers run on the batch's real tokens only, the same logits for
    less work (pack_real_tokens); False: on every position, padding included. Returns the path of model.onnx.
    """
    import shutil

    import onnx
    import onnxscript.optimizer
    from onnxscript import opset18 as op

    from transformers import AutoConfig

    model_type = AutoConfig.from_pretrained(path).model_type
    if model_type in ONNX_UNSUPPORTED:
        raise ValueError(f"no ONNX export for {model_type}: {ONNX_UNSUPPORTED[model_type]}; use --eval_export / "
                         "--predict with the int8 backend")
    student = load_quantized(path, backend="int8", act_scale=act_scale, kernel="onnx")
    if skip_padding and act_scale == "static" and model_type in PACKED_ENCODER:
        pack_real_tokens(student)
    names = ["input_ids", "attention_mask"] + (["token_type_ids"] if student.config.type_vocab_size > 0 else [])
    example = tuple(torch.ones(2, 8, dtype=torch.long) for _ in names)
    batch, length = torch.export.Dim("batch"), torch.export.Dim("length")
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # the exporter's notes on optional packages
    with warnings.catch_warnings():  # and its deprecation and axis-naming notes: nothing a user can act on
        warnings.simplefilter("ignore")
        graph = torch.onnx.export(
            _Logits(student).eval(), example, dynamo=True, optimize=False, verbose=False, input_names=names,
            output_names=["logits"],
            dynamic_shapes={k: {0: batch, 1: length} for k in names},
            custom_translation_table={
                torch.ops.qatkd.matmul_integer.default: onnx_matmul_integer,
                torch.ops.qatkd.quantize_codes.default: onnx_quantize_codes,
                torch.ops.qatkd.matmul_codes.default: onnx_matmul_codes,
                torch.ops.aten.__rshift__.Tensor: lambda a, b: op.BitShift(a, b, direction="RIGHT")})
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    # folds constants, but not the packed weight codes (ONNX Runtime unpacks them once, at load): a small file
    onnxscript.optimizer.optimize(graph.model, input_size_limit=16)
    model = graph.model_proto
    fuse_integer_rescale(model)
    drop_saturated_clips(model)
    for node in model.graph.node:  # the exporter's per-node stack traces (this machine's paths): a third of the file
        del node.metadata_props[:]
    with atomic_path(out / "model.onnx") as tmp:
        onnx.save(model, str(tmp))
        onnx.checker.check_model(str(tmp))
    for f in Path(path).iterdir():
        if f.suffix != ".safetensors" and f.is_file():
            shutil.copy(f, out / f.name)
    write_json(out / "quantization.json", student.qatkd_bits)
    return out / "model.onnx"


# ONNX Runtime graph optimizations left out of every session: its fused SkipLayerNormalization kernel takes
# longer than the Add and LayerNormalization it would replace on x86 CPUs (RESULTS.md: serving)
ORT_DISABLED_OPTIMIZERS = ["SkipLayerNormFusion"]


class OnnxStudent:
    """A student exported by export_onnx, run by ONNX Runtime (CPU) and called like the PyTorch model:
    model(input_ids=..., attention_mask=...[, token_type_ids=...]).logits -> [B, C] float tensor.
    (bench.serving runs the teacher's ONNX graphs through it too: the same session settings.)"""

    def __init__(self, path, threads=None, file="model.onnx"):
        import onnxruntime as ort
        from transformers import AutoConfig

        path = Path(path)
        self.options = ort.SessionOptions()
        if threads:
            self.options.intra_op_num_threads = threads
        self.file = path / file
        self.session = ort.InferenceSession(str(self.file), self.options, providers=["CPUExecutionProvider"],
                                            disabled_optimizers=ORT_DISABLED_OPTIMIZERS)
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.config = AutoConfig.from_pretrained(path)
        bits = path / "quantization.json"  # absent for a model qatkd did not quantize (bench.teacher_onnx)
        self.qatkd_bits = json.loads(bits.read_text()) if bits.is_file() else None
        self.device, self.training = torch.device("cpu"), False

    def weight_bytes(self):
        """Bytes of the initializers ONNX Runtime holds after its graph optimizations (the student's packed
        codes unpacked, constants folded), before its kernels prepack them."""
        import onnx

        return sum(onnx.numpy_helper.to_array(t).nbytes for t in self.optimized_graph().initializer)

    def optimized_graph(self, disabled=ORT_DISABLED_OPTIMIZERS):
        """The graph ONNX Runtime runs after its graph optimizations (less those disabled), as an onnx GraphProto."""
        import tempfile

        import onnx
        import onnxruntime as ort

        with tempfile.TemporaryDirectory() as tmp:
            self.options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
            self.options.log_severity_level = 3  # not the note that the optimized graph suits this CPU only
            try:
                ort.InferenceSession(str(self.file), self.options, providers=["CPUExecutionProvider"],
                                     disabled_optimizers=disabled)
            finally:
                self.options.optimized_model_filepath = ""
            return onnx.load(str(Path(tmp) / "optimized.onnx")).graph

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        if token_type_ids is None:  # as transformers does: all segment 0
            token_type_ids = torch.zeros_like(input_ids)
        feed = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
        logits = self.session.run(["logits"], {k: feed[k].cpu().numpy() for k in self.inputs})[0]
        return SimpleNamespace(logits=torch.from_numpy(logits))

    __call__ = forward

    def eval(self):
        return self

    def train(self, mode=True):
        return self


def predictions(model, logits):
    """Rows of a prediction: {"label", "probabilities": {class: p}} for a classifier (classes by
    model.config.id2label), {"score"} for a regression head (one output)."""
    if logits.shape[-1] == 1:
        return [{"score": float(v)} for v in logits[:, 0]]
    names = [model.config.id2label[i] for i in range(logits.shape[-1])]
    probs = logits.float().softmax(-1)
    return [{"label": names[int(p.argmax())], "probabilities": {n: round(float(v), 6) for n, v in zip(names, p)}}
            for p in probs]
