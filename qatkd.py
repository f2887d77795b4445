"""qatkd: knowledge distillation for quantization-aware training of Transformer encoders.

A readable reference implementation of

    Minsoo Kim, Sihwa Lee, Sukjin Hong, Du-Seong Chang, Jungwook Choi.
    "Understanding and Improving Knowledge Distillation for Quantization-Aware Training
    of Large Transformer Encoders." EMNLP 2022, arXiv:2211.11014.

Read it top to bottom; the sections follow the data flow:

    1. quantizers              ternary / binary / uniform k-bit, straight-through gradients;
                               the activation quantizer fused into one compiled pass (CPU)
    2. quantized modules       QuantLinear, QuantEmbedding, the quantized self-attention functions;
                               quantized activations kept for backward as int8 codes
    3. student and internals   FAMILIES (one row per encoder family), quantize_student(),
                               recompute_layers() (less memory), forward_internals() -> Internals
    4. KD losses               pred, rep, score (TernaryBERT), map, output, unified (the paper's)
    5. data and metrics        the eight GLUE tasks, your own files or a hub dataset
    6. teacher                 load, refuse what is unsupported
    7. training and evaluation one loop for teacher fine-tuning and for QAT: train()
    8. diagnostics             how far the student's attention is from the teacher's, per layer
    9. export and inference    the student as real low-bit codes; integer inference (int8 backend)
   10. files and processes     atomic writes, checkpoints, RNG state, torchrun

The official code (MarsJacobs/kd-qat-large-enc, derived from TernaryBERT) is the reference for
what is computed. Where we deviate on purpose, the code says so in a comment starting with
"DEVIATION", and README.md lists every one of them.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
import json
import math
import os
import random
import re
import shutil
import time
import types
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

# The paper's constants, named once
CLIP = 2.5  # every quantizer clips its input to [-2.5, 2.5] first (TernaryBERT's clip_val)
TWN_THRESHOLD = 0.7  # ternary threshold Delta = 0.7 * mean |w| (TWN, Li et al. 2016)
PROB_FLOOR = 1e-8  # the map loss clamps probabilities to at least this before the logarithm
ADAM_EPS = 1e-6  # BertAdam's epsilon (and AdamW's, for teacher fine-tuning)


# =============================================================================================
# 1. Quantizers
#
# Weights and activations are quantized on the fly in every forward pass; the full-precision
# ("latent") weights are what the optimizer updates. Gradients use the straight-through
# estimator (STE, Bengio et al. 2013) with clipping: d q(x) / d x = 1 where |x| < 2.5, else 0.
# =============================================================================================


def ste_reference(x, q, clip=CLIP):
    """The straight-through estimator with clipping, written plainly: the value of q, the gradient
    of x where |x| < clip and zero elsewhere (dL/dx = dL/dq * 1[|x| < clip]). x, q: same shape."""
    inside = (x.abs() < clip).to(x.dtype)
    return q.detach() + (x - x.detach()) * inside


def ternarize_reference(w, clip=CLIP):
    """ternarize (per tensor) written plainly; ternarize computes the same numbers, faster."""
    wc = w.detach().clamp(-clip, clip)
    a = wc.abs()
    keep = a > TWN_THRESHOLD * a.mean()
    alpha = (a * keep).sum() / keep.sum().clamp_min(1)
    return ste_reference(w, torch.where(keep, alpha * wc.sign(), torch.zeros_like(wc)), clip)


def quantize_uniform_reference(x, bits, clip=CLIP):
    """quantize_uniform (per tensor) written plainly; quantize_uniform computes the same numbers, faster."""
    xc = x.detach().clamp(-clip, clip)
    n = 2 ** (bits - 1) - 1
    s = n / xc.abs().amax().clamp_min(n * torch.finfo(x.dtype).tiny)
    return ste_reference(x, torch.round(xc * s) / s, clip)


class ClipSTE(torch.autograd.Function):
    """Straight-through estimator with clipping, as in TernaryBERT (Zhang et al. 2020).

    forward:  q = levels(clamp(x, -clip, clip))      any shape
    backward: dL/dx = dL/dq * 1[|x| < clip]           scales and thresholds get no gradient
    The plain formula is ste_reference above (a test checks that both give the same numbers).
    Fast paths (same numbers): on CPU one read pass finds min and max of x; if every |x| < clip,
    the clamp and the backward mask are identities and are skipped (no copy of x is kept for
    backward). On a GPU that check would stall the device once per quantizer (a host sync), so
    there the clamp and mask always run. The mask is applied by hardtanh's backward kernel, which
    computes exactly dL/dq * 1[-clip < x < clip] in one fused pass (5x faster than masked_fill);
    given ActQuant's bool mask 1[|x| >= clip] instead of x, by torch.where (the same numbers).
    """

    check_devices = ("cpu",)  # device types where the clamp-skipping check (a host sync) is worth it

    @staticmethod
    def forward(ctx, x, levels, clip):
        inside = False
        if x.device.type in ClipSTE.check_devices:
            lo, hi = torch.aminmax(x)
            inside = bool((hi < clip) & (lo > -clip))
        ctx.save_for_backward(None if inside else x)
        ctx.clip = clip
        return levels(x if inside else x.clamp(-clip, clip))

    @staticmethod
    def backward(ctx, grad, *_no_grad_outputs):
        (x,) = ctx.saved_tensors
        if x is None:
            return grad, None, None
        if x.dtype == torch.bool:  # ActQuant keeps the mask 1[|x| >= clip] where it comes for free
            return torch.where(x, 0.0, grad), None, None  # = hardtanh's backward, bit for bit
        return torch.ops.aten.hardtanh_backward(grad, x, -ctx.clip, ctx.clip), None, None


def _reduce_dims(x, per_row):
    """Dims a scale is shared over: the last dim for per-row scales, else the whole tensor."""
    return (-1,) if per_row else tuple(range(x.dim()))


def ternarize(w, per_row=False, clip=CLIP):
    """2-bit weights: ternary weight networks (TWN, Li et al. 2016), as in TernaryBERT.

    w: any shape. per_row=False: one scale for the tensor; True: one per row (slice along the
    last dim), which the paper uses for the word-embedding matrix [vocab, d].
        w_c = clamp(w, -2.5, 2.5)
        Delta = 0.7 * mean |w_c|
        alpha = mean of |w_c| over {|w_c| > Delta}
        q = alpha * sign(w_c) where |w_c| > Delta, else 0          q in {-alpha, 0, +alpha}
    Gradient: straight-through, zero where |w| >= 2.5. An all-zero row stays zero (the original
    divides 0/0 there). The plain formula: ternarize_reference.
    """

    def levels(wc):  # fast path: in place on its own temporaries
        a, dims = wc.abs(), _reduce_dims(wc, per_row)
        delta = TWN_THRESHOLD * a.mean(dim=dims, keepdim=True)
        keep = a > delta
        alpha = a.mul_(keep).sum(dim=dims, keepdim=True) / keep.sum(dim=dims, keepdim=True).clamp_min(1)
        return wc.sign().mul_(keep).mul_(alpha)  # in place on temporaries: no extra full-size copies

    return ClipSTE.apply(w, levels, clip)


def binarize(w, per_row=False, clip=CLIP):
    """1-bit weights (BinaryConnect with a scale, XNOR-Net style): q = alpha * sign(w_c).

    w: any shape; w_c = clamp(w, -2.5, 2.5); alpha = mean |w_c| per tensor (or per row, last
    dim). Exactly two levels {-alpha, +alpha}: w_c = 0 maps to +alpha. Straight-through gradient,
    zero where |w| >= 2.5.
    """

    def levels(wc):
        alpha = wc.abs().mean(dim=_reduce_dims(wc, per_row), keepdim=True)
        return torch.where(wc < 0, -alpha, alpha)

    return ClipSTE.apply(w, levels, clip)


def quantize_uniform(x, bits, per_row=False, clip=CLIP):
    """Symmetric uniform k-bit quantizer (TernaryBERT's SymQuantizer), for weights and activations.

    x: any shape. The scale comes from the tensor itself in this forward pass (dynamic, no
    calibration), per tensor or per row (last dim):
        x_c = clamp(x, -2.5, 2.5);   n = 2^(k-1) - 1;   s = n / max|x_c|
        q = round(x_c * s) / s                             2^k - 1 levels, 0 exactly representable
    so |q - x_c| <= 1 / (2 s), half a step. Straight-through gradient, zero where |x| >= 2.5.
    The plain formula: quantize_uniform_reference.
    """

    def levels(xc):
        s = uniform_scale(xc, bits, per_row)
        return (xc * s).round_().div_(s)  # = round(x_c * s) / s, in place on one temporary

    return ClipSTE.apply(x, levels, clip)


def uniform_scale(xc, bits, per_row=False):
    """s = (2^(k-1) - 1) / max|x_c| of quantize_uniform: per tensor, or per row (keepdim)."""
    lo, hi = torch.aminmax(xc, dim=-1, keepdim=True) if per_row else torch.aminmax(xc)
    return scale_for_max(torch.maximum(-lo, hi), bits)  # max |x_c| in one read pass, no |x_c| temporary


def scale_for_max(m, bits):
    """s = (2^(k-1) - 1) / m for m = max |x_c| (any shape), finite even for an all-zero tensor."""
    n = 2 ** (bits - 1) - 1
    return n / m.clamp_min(n * torch.finfo(m.dtype).tiny)


WEIGHT_BITS = (1, 2, 4, 8, 32)


def quantize_weight(w, bits, per_row=False):
    """Weight quantizer by bit width: 1 binary, 2 ternary, 4/8 uniform, 32 full precision."""
    if bits == 32:
        return w
    if bits == 1:
        return binarize(w, per_row)
    if bits == 2:
        return ternarize(w, per_row)
    if bits in (4, 8):
        # DEVIATION: the original's "4-bit" weight quantizer (TwnQuantizer_mx) has 17 levels; this
        # one has at most 2^k - 1, as a k-bit code must.
        return quantize_uniform(w, bits, per_row)
    raise ValueError(f"unsupported weight bit width {bits}; use one of {WEIGHT_BITS}")


def quantize_act(x, bits):
    """Activation quantizer: per-tensor dynamic symmetric uniform (8-bit in the paper); 32 = off.

    The numbers of quantize_uniform(x, bits), computed by ActQuant (the hot path: activations are
    over 90 % of the elements a QAT step quantizes). x: any shape -> the same shape. To copy the
    quantizer into another project, quantize_uniform (with ClipSTE) is the self-contained one.
    """
    return x if bits >= 32 else quantize_act_codes(x, bits)[0]


def quantize_act_codes(x, bits):
    """quantize_act, also returning the integer codes: (q, codes, s) with q = codes / s exactly.

    codes: int8 (int16 above 8 bits), x's shape; s: the 0-d scale. saved_as_codes uses them.
    """
    return ActQuant.apply(x, bits, CLIP)


class ActQuant(torch.autograd.Function):
    """quantize_uniform per tensor, for activations, in two passes over x instead of five.

    forward:  one aminmax pass: s = n / min(max|x|, clip) (= uniform_scale(clamp(x)) exactly, as
              clamping commutes with the max) and whether every |x| < clip (CPU only: a host sync);
              one elementwise pass (fused_levels): c = round(clamp(x) * s), q = c / s, codes = c,
              and (compiled path) the mask 1[|x| >= clip].
    backward: dL/dx = dL/dq * 1[|x| < clip] in one pass, as ClipSTE, and nothing at all is kept or
              computed when every |x| < clip. For the mask, backward keeps the compiled pass's bool
              mask (1 byte per element) where it has one (LEAN_SAVES), else x (4 bytes; building a
              mask in a separate pass costs more than the whole fused forward).
    The plain formula: quantize_uniform_reference (a test checks values and gradients bit for bit).
    """

    @staticmethod
    def forward(ctx, x, bits, clip):
        lo, hi = torch.aminmax(x)
        m = torch.maximum(-lo, hi)  # max |x|
        s = scale_for_max(m.clamp(max=clip), bits)  # max |clamp(x)| = min(max |x|, clip)
        inside = x.device.type in ClipSTE.check_devices and bool(m < clip)
        q, codes, outside = fused_levels(x, s, None if inside else clip, torch.int8 if bits <= 8 else torch.int16)
        ctx.save_for_backward(None if inside else outside if LEAN_SAVES and outside is not None else x)
        ctx.clip = clip
        ctx.mark_non_differentiable(codes, s)
        return q, codes, s

    backward = staticmethod(ClipSTE.backward)  # the same mask, from the same saved x (or None)


def plain_levels(x, s, clip, dtype):
    """c = round(clamp(x, -clip, clip) * s) -> (q = c / s, codes = c as dtype, None); clip=None: no
    clamp. Three passes over x (four with the clamp), in place on one temporary."""
    c = (x if clip is None else x.clamp(-clip, clip)).mul(s).round_()
    codes = c.to(dtype)  # before the division, which works in place on c
    return c.div_(s), codes, None


FUSED = True  # run plain_levels as one compiled kernel (torch.compile) where it pays; False: always plain
FUSED_DEVICES = ("cpu",)  # where it pays and is bit-exact: see fused_levels
FUSE_MIN_NUMEL = 2 ** 16  # smaller tensors stay plain: no compile for tiny models, nothing to gain
_compiled = {}  # "fn": the compiled plain_levels, or None once compiling has failed (warned once)


def fused_levels(x, s, clip, dtype):
    """plain_levels' numbers in one pass on CPU: inductor (torch.compile, dynamic shapes) generates
    one vectorised C++ loop; the same operations in the same order, each exactly rounded, so the
    same bits (tested). Compiled once per process on first use (a few seconds; inductor caches the
    kernels on disk); where compiling fails (no C++ compiler) a warning says so once and
    plain_levels runs. x: any shape; s: 0-d scale; clip: a float or None (no clamp).
    Not on a GPU (FUSED_DEVICES): measured on an H200 the compiled kernel made the MiniLM map step
    slower (0.100 s against 0.080 s: a step of ~100 tiny kernels is bound by launch and dispatch
    overhead, which a compiled call adds to), and Triton's division differs from torch's by one
    unit in the last place on a quarter of the elements.
    Returns (q, codes, outside), each x's shape and strides: outside = 1[|x| >= clip] (bool) from the
    compiled pass, None from plain_levels."""
    flat = _memory_order(x) if may_fuse(x) else None  # None also for a layout with gaps: plain
    if flat is None:
        return plain_levels(x, s, clip, dtype)
    if "fn" not in _compiled:
        _compiled["fn"] = torch.compile(_levels_for_compile, dynamic=True)
    try:
        # one compiled graph for every shape: the elements in memory order, clamped always (free here)
        q, codes, outside = _compiled["fn"](flat, s, CLIP if clip is None else clip, dtype)
        return tuple(t.as_strided(x.shape, x.stride()) for t in (q, codes, outside.view(torch.bool)))  # x's layout
    except Exception as e:  # noqa: BLE001 -- any compiler failure: fall back, say so once
        _compile_failed(e)
        return fused_levels(x, s, clip, dtype)


def may_fuse(x):
    """Whether x may go through a compiled pass: FUSED, compiling has not failed, a device of
    FUSED_DEVICES and at least FUSE_MIN_NUMEL elements (fused_levels, int_codes)."""
    failed = "fn" in _compiled and _compiled["fn"] is None
    return FUSED and not failed and x.device.type in FUSED_DEVICES and x.numel() >= FUSE_MIN_NUMEL


def _compile_failed(e):
    """Warn once that torch.compile failed; from then on every quantizer runs plain."""
    import warnings

    warnings.warn(f"qatkd: torch.compile is unavailable ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                  f"the quantizers run unfused (same numbers, slower)", stacklevel=3)
    _compiled["fn"] = None


def _memory_order(x):
    """x's elements as a 1-d view in memory order (x: any shape and strides without gaps or
    overlaps, e.g. a transposed view), or None."""
    expect = 1
    for stride, size in sorted((st, sz) for st, sz in zip(x.stride(), x.shape) if sz > 1):
        if stride != expect:
            return None
        expect *= size
    # a new tensor on x's memory, not a view of it: the compiled graph is guarded on a view's base
    return x.new_empty(0).set_(x.untyped_storage(), x.storage_offset(), (x.numel(),), (1,))


def _levels_for_compile(x, s, clip, dtype):
    c = x.clamp(-clip, clip).mul(s).round()  # not in place: inductor fuses it
    # the mask (where hardtanh's backward is 0) as int8 0/1: a bool output would not be vectorised (10x slower)
    return c.div(s), c.to(dtype), torch.where((x <= -clip) | (x >= clip), 1.0, 0.0).to(torch.int8)


# =============================================================================================
# 2. Quantized modules
#
# The student keeps the teacher's parameter names (QuantLinear is an nn.Linear, QuantEmbedding an
# nn.Embedding), so a student checkpoint loads into the plain architecture and back. Memory: what
# autograd keeps for backward is kept lean, with the same numbers: a quantized matrix-product input
# as its int8 codes, a dropout mask and the STE's clip mask as bools, no copies in the map loss.
# =============================================================================================


# False: autograd keeps what the plain operations keep (quantized activations and dropout noise in
# fp32, x for the STE's mask, the map loss's clamped copies): the step as before, for the benchmark
LEAN_SAVES = True
# > 0 while a layer under recompute_layers runs (section 3). saved_as_codes then stands aside: a
# tensor its hooks packed would not be checkpoint's to drop and would stay for the whole backward
# (MiniLM, batch 32 x 128: 1605 MiB in use at the step's peak, against 1004 MiB without)
_recomputing = 0


@contextlib.contextmanager
def saved_as_codes(q, codes, s):
    """While open, autograd keeps q (a quantized activation, q = codes / s exactly) as its integer
    codes wherever an operation saves it for backward, and rebuilds codes / s when backward needs it:
    the same bits, 4x less memory for an 8-bit activation (a matrix product saves its inputs).
    Other saved tensors are kept as they are; inside a recomputed layer (_recomputing) nothing is
    repacked: checkpoint keeps nothing there. q, codes: same shape; s: 0-d scale."""
    if (not LEAN_SAVES or codes.dtype == torch.int16 or codes.stride() != q.stride()
            or not torch.is_grad_enabled() or _recomputing):  # >8 bits, another layout, nothing saved, recomputed
        yield
        return
    storage = q.untyped_storage().data_ptr()

    def pack(t):  # t: q or a view of it (a matrix product saves a reshaped view)
        if t.untyped_storage().data_ptr() != storage:
            return t
        return codes, s, t.shape, t.stride(), t.storage_offset() - q.storage_offset()

    def unpack(packed):
        if isinstance(packed, torch.Tensor):
            return packed
        c, scale, shape, stride, offset = packed
        return c.to(scale.dtype).div_(scale).as_strided(shape, stride, offset)

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield


def quantized_matmul(a, b, abits):
    """Q_a(a) @ b, autograd keeping Q_a(a) as codes (saved_as_codes). a: [..., S, K], b: [..., K, N]."""
    if abits >= 32:
        return torch.matmul(a, b)
    q, codes, s = quantize_act_codes(a, abits)
    with saved_as_codes(q, codes, s):
        return torch.matmul(q, b)


class QuantLinear(nn.Linear):
    """y = Q_a(x) Q_w(W)^T + b: quantized weight and input, full-precision bias (TernaryBERT / the paper).

    x: [..., in_features] -> y: [..., out_features]. W is the latent full-precision weight.
    """

    def __init__(self, in_features, out_features, bias=True, wbits=2, abits=8, device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device, dtype)
        self.wbits, self.abits = wbits, abits

    def forward(self, x):
        # Q_w(W) in every forward pass, evaluation included: no cache that a write through .data could
        # leave stale (caching it saved 2 to 6 % of an evaluation's time)
        w = quantize_weight(self.weight, self.wbits)
        if self.abits >= 32:
            return F.linear(x, w, self.bias)
        q, codes, s = quantize_act_codes(x, self.abits)
        with saved_as_codes(q, codes, s):  # F.linear keeps Q_a(x) for dL/dW: as int8 codes
            return F.linear(q, w, self.bias)

    def extra_repr(self):
        return f"{super().extra_repr()}, wbits={self.wbits}, abits={self.abits}"


class QuantEmbedding(nn.Embedding):
    """Word embedding with row-wise quantized weights (one scale per vocabulary entry).

    ids: [B, S] -> [B, S, d]. Row-wise quantization of the looked-up rows equals the looked-up
    rows of the row-wise quantized matrix, so only the B*S rows in the batch are quantized.
    """

    def __init__(self, num_embeddings, embedding_dim, padding_idx=None, wbits=2, device=None, dtype=None):
        super().__init__(num_embeddings, embedding_dim, padding_idx, device=device, dtype=dtype)
        self.wbits = wbits

    def forward(self, ids):
        return quantize_weight(F.embedding(ids, self.weight, self.padding_idx), self.wbits, per_row=True)

    def extra_repr(self):
        return f"{super().extra_repr()}, wbits={self.wbits}"


def lean_dropout(x, p, training):
    """F.dropout(x, p, training): the same random draws and the same bits. On CPU (LEAN_SAVES) through
    BoolDropout, which keeps a bool mask for backward where F.dropout keeps an fp32 noise tensor:
    1 byte instead of 4 per element (a [B, H, S, S] attention map, a [B, S, d] hidden state)."""
    if LEAN_SAVES and training and 0 < p < 1 and x.device.type == "cpu":
        return BoolDropout.apply(x, p)
    return F.dropout(x, p=p, training=training)  # on a GPU, F.dropout keeps a bool mask itself


class BoolDropout(torch.autograd.Function):
    """CPU dropout as ATen computes it (noise = bernoulli(1 - p) / (1 - p); y = x * noise), keeping
    for backward the noise as a bool mask (one pass: its nonzeros), not the fp32 noise itself.
    Backward rebuilds the noise from the mask: dL/dx = dL/dy * noise. x: any shape -> the same shape."""

    @staticmethod
    def forward(ctx, x, p):
        noise = torch.empty_like(x).bernoulli_(1 - p)  # the same draws as F.dropout's
        ctx.save_for_backward(noise.bool())
        ctx.p = p
        return x * noise.div_(1 - p)

    @staticmethod
    def backward(ctx, grad):
        (keep,) = ctx.saved_tensors
        return grad * keep.to(grad.dtype).div_(1 - ctx.p), None


class LeanDropout(nn.Dropout):
    """nn.Dropout through lean_dropout: quantize_student puts one in place of each of the student's."""

    def forward(self, x):
        if self.inplace:
            return F.dropout(x, self.p, self.training, inplace=True)
        return lean_dropout(x, self.p, self.training)


def qat_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **_):
    """Eager self-attention with the student's activation quantizers (official modeling_quant.py).

    Registered with transformers' attention interface as "qatkd"; teacher and student both use it.
    query, key, value: [B, H, S, d_h]; attention_mask: additive [B, 1, S, S] or None.
        Q, K, V <- Q_a(Q), Q_a(K), Q_a(V)          (abits = module.qatkd_abits, 32 = off)
        A = Q K^T / sqrt(d_h)                      pre-softmax scores        [B, H, S, S]
        P = softmax(A + mask)                      attention map             [B, H, S, S]
        ctx = Q_a(dropout(P)) V                    P is quantized after dropout (lean_dropout)
    While forward_internals() runs, module.qatkd_record is a list and (A, P) is appended to it:
    the scores without the additive mask, the map before dropout and quantization, as the KD
    losses use them (None for the one module.qatkd_keep leaves out). Returns ctx as [B, S, H, d_h] and P.
    """
    abits = getattr(module, "qatkd_abits", 32)
    q, k, v = quantize_act(query, abits), quantize_act(key, abits), quantize_act(value, abits)
    scaling = q.size(-1) ** -0.5 if scaling is None else scaling
    scores = torch.matmul(q, k.transpose(-1, -2)) * scaling
    probs = torch.softmax(scores if attention_mask is None else scores + attention_mask, dim=-1)
    record_attention(module, scores, probs)
    dropped = lean_dropout(probs, dropout, module.training)
    ctx = quantized_matmul(dropped, v, abits)
    return ctx.transpose(1, 2).contiguous(), probs



def record_attention(module, scores, probs):
    """While forward_internals() runs: append (A, P) to module.qatkd_record, each None unless in
    module.qatkd_keep. A, P: [B, H, S, S]."""
    record = getattr(module, "qatkd_record", None)
    if record is not None:
        keep = module.qatkd_keep
        record.append((scores if "scores" in keep else None, probs if "probs" in keep else None))


def _register_attention():
    """Register qat_attention and its mask function under the name "qatkd".

    In transformers 5 a custom attention function also needs a mask function registered under
    the same name; without one the model builds no padding mask at all and padded keys get
    attention silently. The eager mask is additive: 0 to keep, dtype-min to drop (it also carries
    ModernBERT's sliding window).
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register("qatkd", qat_attention)
    AttentionMaskInterface.register("qatkd", eager_mask)


_register_attention()


def deberta_attention(module, hidden_states, attention_mask, output_attentions=False, query_states=None,
                      relative_pos=None, rel_embeddings=None):
    """DeBERTa-v2/v3 disentangled self-attention with the student's quantizers.

    Replaces DisentangledSelfAttention.forward (DeBERTa does not use the attention interface);
    the same operations in the same order as transformers', plus Q_a on Q, K, V and P.
    hidden_states: [B, S, d]; attention_mask: [B, 1, S, S] (1 = both tokens valid).
        Q, K, V <- Q_a(Q), Q_a(K), Q_a(V)                          [B*H, S, d_h]
        A = Q K^T / sqrt(3 d_h) + c2p(Q) + p2c(K)                  content and relative-position terms
        P = softmax(A masked)                                      [B, H, S, S]
        ctx = Q_a(dropout(P)) V
    The relative-position keys and queries (c2p, p2c) are the QuantLinear projections of the
    relative-position embeddings; they depend on no input (constants at inference) and are not
    quantized again. (A, P) is recorded as in qat_attention. Returns (ctx [B, S, d], P or None).
    """
    from transformers.models.deberta_v2.modeling_deberta_v2 import scaled_size_sqrt

    abits, heads = getattr(module, "qatkd_abits", 32), module.num_attention_heads
    query_states = hidden_states if query_states is None else query_states
    q = quantize_act(module.transpose_for_scores(module.query_proj(query_states), heads), abits)
    k = quantize_act(module.transpose_for_scores(module.key_proj(hidden_states), heads), abits)
    v = quantize_act(module.transpose_for_scores(module.value_proj(hidden_states), heads), abits)
    scale_factor = 1 + ("c2p" in module.pos_att_type) + ("p2c" in module.pos_att_type)
    scores = torch.bmm(q, k.transpose(-1, -2) / scaled_size_sqrt(q, scale_factor).to(dtype=q.dtype))
    if module.relative_attention:
        rel = module.pos_dropout(rel_embeddings)
        scores = scores + module.disentangled_attention_bias(q, k, relative_pos, rel, scale_factor)
    scores = scores.view(-1, heads, scores.size(-2), scores.size(-1))  # [B, H, S, S]
    probs = torch.softmax(scores.masked_fill(~attention_mask.bool(), torch.finfo(q.dtype).min), dim=-1)
    record_attention(module, scores, probs)
    dropped = lean_dropout(probs, module.dropout.p, module.training)
    ctx = quantized_matmul(dropped.view(-1, probs.size(-2), probs.size(-1)), v, abits)  # [B*H, S, d_h]
    ctx = ctx.view(-1, heads, ctx.size(-2), ctx.size(-1)).permute(0, 2, 1, 3).contiguous()
    return ctx.view(*ctx.shape[:-2], -1), (probs if output_attentions else None)


# =============================================================================================
# 3. Student patching and capture of internals
#
# One row per encoder family says where qatkd reads its internals. Nothing is guessed from
# module names: a family that is not in the table is refused.
# =============================================================================================


@dataclass(frozen=True)
class Family:
    """Where one encoder family (config.model_type) keeps what the KD losses read.

    layer       class of one encoder layer (attention + FFN): the unit recompute_layers recomputes
    attention   class of the self-attention module: it computes the scores and the softmax
    output      the module that produces the attention sub-layer output Y ("Class.attribute"
                for a child of Class), read from its output, or from its input if tap="input"
    classifier  the task head's final projection, which stays full precision
    pre_ln      pre-LayerNorm layers: Y = X + MHA(LN(X)); else Y = LN(MHA(X) + X)
    interface   attention runs through transformers' attention interface (else deberta_attention)
    """

    layer: str
    attention: str
    output: str
    classifier: str = "classifier"
    tap: str = "output"
    pre_ln: bool = False
    interface: bool = True


FAMILIES = {
    "bert": Family("BertLayer", "BertSelfAttention", "BertSelfOutput"),
    "roberta": Family("RobertaLayer", "RobertaSelfAttention", "RobertaSelfOutput", "classifier.out_proj"),
    "xlm-roberta": Family("XLMRobertaLayer", "XLMRobertaSelfAttention", "XLMRobertaSelfOutput", "classifier.out_proj"),
    "camembert": Family("CamembertLayer", "CamembertSelfAttention", "CamembertSelfOutput", "classifier.out_proj"),
    "electra": Family("ElectraLayer", "ElectraSelfAttention", "ElectraSelfOutput", "classifier.out_proj"),
    "mobilebert": Family("MobileBertLayer", "MobileBertSelfAttention", "MobileBertSelfOutput"),
    "distilbert": Family("TransformerBlock", "DistilBertSelfAttention", "TransformerBlock.sa_layer_norm"),
    # one AlbertLayer, called once per layer; its attention module ends with the LayerNorm
    "albert": Family("AlbertLayer", "AlbertAttention", "AlbertAttention"),
    # pre-LN: the residual stream after attention is the input of the FFN's LayerNorm
    "modernbert": Family("ModernBertEncoderLayer", "ModernBertAttention", "ModernBertEncoderLayer.mlp_norm",
                         tap="input", pre_ln=True),
    # also DeBERTa-v3
    "deberta-v2": Family("DebertaV2Layer", "DisentangledSelfAttention", "DebertaV2SelfOutput", interface=False),
}


def model_family(config):
    """The FAMILIES row of a model config; an unsupported architecture is refused in one line."""
    family = FAMILIES.get(config.model_type)
    if family is None:
        raise ValueError(f"qatkd does not support model type {config.model_type!r}; supported: "
                         f"{', '.join(FAMILIES)}")
    if getattr(config, "conv_kernel_size", 0) > 0:  # DeBERTa-v2 xlarge/xxlarge: a convolution beside layer 1
        raise ValueError(f"qatkd does not support {config.model_type} with a convolution layer (conv_kernel_size "
                         f"{config.conv_kernel_size}); DeBERTa-v2/v3 base and large have none")
    return family


def _modules_of(model, spec):
    """Modules named by a Family field: "Class" (every instance) or "Class.attribute"."""
    cls, _, attr = spec.partition(".")
    found = [m for m in model.modules() if type(m).__name__ == cls]
    return [getattr(m, attr) for m in found] if attr else found


def self_attention_modules(model):
    """The self-attention modules of a model, in layer order (one per layer; ALBERT shares one)."""
    return _modules_of(model, model_family(model.config).attention)


def use_qatkd_attention(model):
    """Route a model's self-attention through qat_attention / deberta_attention (idempotent).

    Interface families switch their attention implementation to "qatkd"; DeBERTa's attention
    modules get deberta_attention as their forward. Until quantize_student sets qatkd_abits,
    nothing is quantized: a teacher computes exactly what it computed before.
    """
    if model_family(model.config).interface:
        if model.config._attn_implementation != "qatkd":
            model.set_attn_implementation("qatkd")
        return model
    for m in self_attention_modules(model):
        m.forward = types.MethodType(deberta_attention, m)  # an instance attribute: a deepcopy rebinds it
    return model


def quantize_student(teacher, wbits=2, abits=8):
    """A quantized deep copy of a full-precision sequence classifier (the paper's W2A8 set-up).

    The same rule in every family (FAMILIES):
    - every nn.Linear -> QuantLinear(wbits, abits): attention, FFN, embedding projections, and
      the pooler or the head's hidden dense layer (BERT's pooler is quantized in the original);
    - the word embedding -> row-wise quantized QuantEmbedding(wbits);
    - inside self-attention Q, K, V and the post-dropout attention probabilities -> abits;
    - full precision: the task head's final projection (Family.classifier), LayerNorms, biases,
      position/token-type/relative-position embeddings;
    - every nn.Dropout -> LeanDropout (the same numbers, less memory kept for backward).
    The latent weights start as the teacher's. With wbits=abits=32 the student computes exactly
    what the teacher does.
    """
    if wbits not in WEIGHT_BITS:
        raise ValueError(f"unsupported weight bit width {wbits}; use one of {WEIGHT_BITS}")
    if not (2 <= abits <= 16 or abits == 32):
        raise ValueError(f"unsupported activation bit width {abits}; use 2..16, or 32 for full precision")
    family = model_family(teacher.config)
    student = use_qatkd_attention(copy.deepcopy(teacher))
    keep = student.get_submodule(family.classifier)
    for parent in list(student.modules()):
        for name, child in parent.named_children():
            if type(child) is nn.Linear and child is not keep:
                q = QuantLinear(child.in_features, child.out_features, child.bias is not None, wbits, abits, "meta")
                q.weight, q.bias = child.weight, child.bias
                setattr(parent, name, q)
            elif type(child) is nn.Dropout:  # the same draws, a bool mask kept for backward
                setattr(parent, name, LeanDropout(child.p, child.inplace))
    emb = student.get_input_embeddings()
    qemb = QuantEmbedding(emb.num_embeddings, emb.embedding_dim, emb.padding_idx, wbits, "meta")
    qemb.weight = emb.weight
    student.set_input_embeddings(qemb)
    for m in self_attention_modules(student):
        m.qatkd_abits = abits
    student.qatkd_bits = {"wbits": wbits, "abits": abits}
    return student


def recompute_layers(model, on=True):
    """Activation checkpointing, with the same numbers: while the model trains (autograd on), each
    encoder layer (Family.layer) keeps for backward only its inputs, and backward reruns the
    layer's forward to rebuild what its operations saved (torch.utils.checkpoint, which restores the
    RNG state first, so dropout draws the same masks). A QAT step then holds one layer's saved
    activations at a time instead of N layers', for one more student forward per step. What the KD
    losses read (maps, scores, hidden states, attention outputs) stays in memory: the losses use it.
    on=False undoes it. Returns the model.

    Non-reentrant checkpointing, on purpose: the internals leave a layer through qatkd_record and
    hooks, not through its outputs, and only the non-reentrant variant gives a tensor made inside
    the layer its gradient whichever way it leaves (the reentrant one runs the layer without a graph).
    """
    for layer in _modules_of(model, model_family(model.config).layer):
        if on:
            layer.forward = types.MethodType(_recomputed_forward, layer)  # a deepcopy rebinds it
        else:
            layer.__dict__.pop("forward", None)
    return model


def _recomputed_forward(layer, *args, **kwargs):
    """The layer's own forward, under torch.utils.checkpoint while it trains with autograd on."""
    forward = type(layer).forward
    if layer.training and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(_in_recomputed_layer, forward, layer, *args, use_reentrant=False,
                                                 **kwargs)
    return forward(layer, *args, **kwargs)


def _in_recomputed_layer(forward, layer, *args, **kwargs):
    """forward(layer, ...) with _recomputing raised (section 2), in the first pass and the rerun alike."""
    global _recomputing
    _recomputing += 1
    try:
        return forward(layer, *args, **kwargs)
    finally:
        _recomputing -= 1


@dataclass
class Internals:
    """What the KD losses read from one forward pass (N layers, C classes, H heads).

    logits         [B, C]
    hidden_states  N+1 x [B, S, d]      embedding output, then every layer's output
    attn_scores    N   x [B, H, S, S]   pre-softmax scores Q K^T / sqrt(d_h), without the mask
                                        (DeBERTa: content and relative-position terms together)
    attn_probs     N   x [B, H, S, S]   softmax probabilities, before dropout and quantization
    attn_outputs   N   x [B, S, d]      attention sub-layer output Y, the FFN's input:
                                        post-LN families LN(MHA(X) + X); pre-LN (ModernBERT)
                                        X + MHA(LN(X)), the residual stream after attention
    (each attn_* is None if forward_internals did not keep it)
    """

    logits: torch.Tensor
    hidden_states: list
    attn_scores: list
    attn_probs: list
    attn_outputs: list


MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def model_inputs(model, batch):
    """The entries of batch that the model takes (DistilBERT and ModernBERT take no token_type_ids)."""
    accepted = inspect.signature(getattr(model, "module", model).forward).parameters
    return {k: batch[k] for k in MODEL_INPUTS if k in batch and k in accepted}


def forward_internals(model, batch, keep=("scores", "probs", "outputs")):
    """Run the model on batch (a dict with input_ids, attention_mask [, token_type_ids]).

    keep: the attention internals to record ("scores", "probs", "outputs"); the others are left
    out (None in Internals): a tensor per layer that the KD loss does not read need not stay in
    memory (KD_ATTENTION says which each loss reads).

    Works for teacher and student alike, bare or wrapped in DistributedDataParallel. The model's
    attention is switched to qatkd's (use_qatkd_attention) if it is not yet. How the internals
    get out: each self-attention module holds a list, qatkd_record, for the length of the call,
    and its attention function appends (scores, probs) to it; a hook on the Family's output
    module collects the attention sub-layer outputs. Returns Internals.
    """
    net, model = model, getattr(model, "module", model)  # a DistributedDataParallel wrapper is called as is
    family = model_family(model.config)
    use_qatkd_attention(model)
    record, outputs, hooks = [], [], []
    attention = self_attention_modules(model)
    for m in (_modules_of(model, family.output) if "outputs" in keep else ()):
        if family.tap == "input":
            hooks.append(m.register_forward_pre_hook(lambda _m, args: outputs.append(args[0])))
        else:
            hooks.append(m.register_forward_hook(lambda _m, _i, out: outputs.append(
                out[0] if isinstance(out, tuple) else out)))
    try:
        for m in attention:
            m.qatkd_record, m.qatkd_keep = record, keep
        out = net(**model_inputs(model, batch), output_hidden_states=True)
    finally:
        for m in attention:
            del m.qatkd_record, m.qatkd_keep
        for h in hooks:
            h.remove()
    return Internals(
        logits=out.logits,
        hidden_states=list(out.hidden_states),
        attn_scores=[s for s, _ in record] if "scores" in keep else None,
        attn_probs=[p for _, p in record] if "probs" in keep else None,
        attn_outputs=outputs if "outputs" in keep else None,
    )


# =============================================================================================
# 4. KD losses
#
# Each takes per-layer lists of [B, ...] tensors plus the [B, S] attention mask (1 = token,
# 0 = padding) and sums over layers, as the official code does (no averaging over layers).
#
# DEVIATION (padding): the official code pads every batch to max_len and masks padding only in the
# map loss; its MSE terms average over padded positions too, so each is diluted by the batch's
# share of real tokens (the score term by its share of real query-key pairs: about 0.42 on MRPC,
# 0.18 on CoLA). Here batches are padded only to their longest example and padding is excluded
# from every loss. include_padding=True on batches padded to max_len (run.py --original_padding)
# gives every term the original's value.
#
# Reductions: the MSE terms pool over the whole batch (a sample counts with its number of tokens,
# or for the score loss of query-key pairs, i.e. the square of its length); the map and
# prediction terms average per sample (every sample counts alike).
# =============================================================================================


def _masked_mse(a, b, mask):
    """Mean of (a - b)^2 over positions where mask is 1. a, b: [B, S, ...]; mask: [B, S]."""
    m = mask.to(a.dtype).reshape(*mask.shape, *([1] * (a.dim() - mask.dim())))
    return ((a - b) ** 2 * m).sum() / (m.sum() * a[0, 0].numel()).clamp_min(1)


def pred_loss(s_logits, t_logits, regression=False):
    """Prediction-layer distillation (TinyBERT Eq. 10, no temperature).

    s_logits, t_logits: [B, C]. Classification: the soft cross-entropy of the official code,
        CE = mean_b  - sum_c softmax(z_T)_c log softmax(z_S)_c,
    minus the teacher's entropy (a constant), i.e. mean_b KL(softmax(z_T) || softmax(z_S)): the
    same gradient, and zero when the student matches the teacher.
    Regression (STS-B, C = 1): MSE(z_S, z_T).
    """
    if regression:
        return F.mse_loss(s_logits, t_logits)
    t_log = t_logits.log_softmax(-1)
    return (t_log.exp() * (t_log - s_logits.log_softmax(-1))).sum(-1).mean()


def rep_loss(s_hidden, t_hidden, mask, include_padding=False):
    """Hidden-state distillation (TinyBERT Eq. 8): L_rep = sum_{l=0..N} MSE(H_S^l, H_T^l).

    s_hidden, t_hidden: N+1 x [B, S, d] (embedding output and every layer); mask: [B, S].
    MSE = sum over the batch's valid tokens and d / (valid tokens * d): pooled over the batch, so a
    sample weighs as its length. include_padding: the mean over all B*S*d entries, as the original.
    """
    mask = torch.ones_like(mask) if include_padding else mask
    return sum(_masked_mse(s, t, mask) for s, t in zip(s_hidden, t_hidden))


def score_loss(s_scores, t_scores, mask, include_padding=False):
    """Attention-score distillation, the TernaryBERT baseline: L_score = sum_l MSE(A_S^l, A_T^l).

    s_scores, t_scores: N x [B, H, S, S] pre-softmax scores; mask: [B, S], L_b valid tokens.
        MSE^l = sum_b sum_h sum_{i, j < L_b} (A_S - A_T)^2 / (H * sum_b L_b^2)
    pooled over the whole batch: a sample weighs as the square of its length. include_padding: as
    the original, zero the padded key columns and average over all B*H*S*S entries (padded query
    rows over valid keys included).
    """
    keys = mask[:, None, None, :].to(s_scores[0].dtype)  # [B, 1, 1, S]
    if include_padding:
        return sum((((s - t) * keys) ** 2).mean() for s, t in zip(s_scores, t_scores))
    pairs = mask[:, None, :, None].to(keys.dtype) * keys  # [B, 1, S, S]
    n = pairs.sum() * s_scores[0].size(1)
    return sum((((s - t) ** 2) * pairs).sum() / n for s, t in zip(s_scores, t_scores))


def map_loss_reference(s_probs, t_probs, mask, eps=PROB_FLOOR):
    """map_loss written plainly (map_loss computes the same numbers with less memory traffic)."""
    m = mask.to(s_probs[0].dtype)
    pairs, lengths = m[:, None, :, None] * m[:, None, None, :], m.sum(-1)[:, None]  # [B, 1, S, S], [B, 1]
    total = 0.0
    for s, t in zip(s_probs, t_probs):
        p_t, p_s = t.clamp_min(eps), s.clamp_min(eps)
        kl = ((p_t.log() - p_s.log()) * p_t * pairs).sum((-1, -2))  # [B, H]
        total = total + (kl / lengths).mean()
    return total


def map_loss(s_probs, t_probs, mask, eps=PROB_FLOOR, chunk=2 ** 20):
    """Attention-map loss L_map (the paper's proposal): KL(teacher || student) per query row.

    s_probs, t_probs: N x [B, H, S, S] softmax probabilities (before dropout); mask: [B, S],
    L_b = number of valid tokens of sample b.
        KL_{b,h} = (1 / L_b) sum_{i < L_b} sum_{j < L_b} p_T log(p_T / p_S),  p = max(P, 1e-8)
        L_map = sum_l mean_{b,h} KL_{b,h}
    Padded keys and padded query rows are excluded, as in the official code. The plain formula:
    map_loss_reference. Speed (same numbers): on CPU, KL_{b,h} is computed for groups of samples of about `chunk`
    elements (4 MB), whose temporaries stay in the cache and are recycled by the allocator instead
    of being fresh 25 MB buffers (page faults) in every step; a sample's sum is the same either
    way. On a GPU the whole batch is one group (fewer kernel launches). Memory (same numbers):
    MapKL's backward keeps no clamped copies of the maps (LEAN_SAVES).
    """
    m = mask.to(s_probs[0].dtype)
    pairs = m[:, None, :, None] * m[:, None, None, :]  # [B, 1, S, S]
    lengths = m.sum(-1)[:, None]  # [B, 1]
    b = max(1, chunk // s_probs[0][0].numel()) if mask.device.type == "cpu" else len(mask)  # samples per group
    total = 0.0
    for s, t in zip(s_probs, t_probs):
        lean = LEAN_SAVES and not t.requires_grad  # MapKL gives no gradient to a teacher's map
        kl = MapKL.apply(s, t, pairs, eps, b) if lean else _map_kl(s, t, pairs, eps, b)  # [B, H]
        total = total + (kl / lengths).mean()
    return total


def _map_kl(s, t, pairs, eps, b):
    """sum_{i, j} p_T log(p_T / p_S) * pairs, per sample and head -> [B, H], for groups of b samples.
    s, t: [B, H, S, S]; pairs: [B, 1, S, S]."""
    kl = []
    for s_, t_, pairs_ in zip(s.split(b), t.split(b), pairs.split(b)):
        t_ = t_.clamp_min(eps)
        # (log p_T - log p_S) * p_T * pairs, in place on one temporary: the same operations in
        # the same order as the plain expression, so the same numbers, with 3 fewer copies
        kl.append(t_.log().sub_(s_.clamp_min(eps).log()).mul_(t_).mul_(pairs_).sum((-1, -2)))  # [b, H]
    return torch.cat(kl)


class MapKL(torch.autograd.Function):
    """_map_kl with a hand-written backward: autograd would keep max(p_S, eps) and max(p_T, eps), two
    [B, H, S, S] copies per layer, for the whole backward pass; MapKL keeps only s and t, which are
    alive anyway (softmax keeps p_S, the teacher's record p_T), and recomputes the rest per group:
        dKL_{b,h} / dp_S = -p_T * pairs / max(p_S, eps)   where p_S >= eps, else 0
    in autograd's order of operations for the plain expression, so the same bits (tested)."""

    @staticmethod
    def forward(ctx, s, t, pairs, eps, b):
        ctx.save_for_backward(s, t, pairs)
        ctx.eps, ctx.b = eps, b
        return _map_kl(s, t, pairs, eps, b)

    @staticmethod
    def backward(ctx, grad):  # grad: [B, H]
        s, t, pairs = ctx.saved_tensors
        eps, b, out = ctx.eps, ctx.b, []
        for s_, t_, pairs_, g in zip(s.split(b), t.split(b), pairs.split(b), grad.split(b)):
            # sum -> * pairs -> * p_T -> (log p_T) - (.) -> log -> clamp_min, as autograd chains them
            d = g[..., None, None].mul(pairs_).mul_(t_.clamp_min(eps)).neg_().div_(s_.clamp_min(eps))
            out.append(torch.where(s_ >= eps, d, 0.0))
        return torch.cat(out), None, None, None, None


def output_loss(s_outputs, t_outputs, mask, include_padding=False):
    """Attention-output loss L_out (the paper's proposal): L_out = sum_l MSE(Y_S^l, Y_T^l).

    Y^l = LN(MHA(X^l) + X^l): the attention sub-layer output after the residual add and
    LayerNorm, i.e. the FFN's input (pre-LN encoders: X^l + MHA(LN(X^l)), see Internals).
    s_outputs, t_outputs: N x [B, S, d]; mask: [B, S]. Pooled over the batch's valid tokens as
    rep_loss; include_padding: the mean over all B*S*d entries, as the original.
    """
    mask = torch.ones_like(mask) if include_padding else mask
    return sum(_masked_mse(s, t, mask) for s, t in zip(s_outputs, t_outputs))


KD_MODES = ("pred", "score", "map", "output", "unified")
# the attention internals each mode's loss reads (forward_internals records only these in QAT)
KD_ATTENTION = {"pred": (), "score": ("scores",), "map": ("probs",), "output": ("outputs",),
                "unified": ("probs", "outputs")}


def check_kd_mode(kd):
    """Refuse an unknown KD mode in one line."""
    if kd not in KD_MODES:
        raise ValueError(f"unknown KD mode {kd!r}; use one of {KD_MODES}")


def kd_loss(student, teacher, mask, kd="map", map_coeff=1.0, output_coeff=1.0, regression=False,
            include_padding=False):
    """The total QAT objective (official main.py:769): prediction + hidden states + one attention term.

    student, teacher: Internals; mask: [B, S]. kd selects the attention term:
        pred     L_pred + L_rep                                   (no attention term, an ablation)
        score    L_pred + L_rep + L_score                         (TernaryBERT baseline)
        map      L_pred + L_rep + map_coeff * L_map               (paper's attention-map loss)
        output   L_pred + L_rep + output_coeff * L_out            (paper's attention-output loss)
        unified  L_pred + L_rep + map_coeff * L_map + output_coeff * L_out
    Returns (total, {term name: value}).
    """
    check_kd_mode(kd)
    for name in KD_ATTENTION[kd]:
        if getattr(student, f"attn_{name}") is None or getattr(teacher, f"attn_{name}") is None:
            raise ValueError(f"kd={kd!r} needs the attention {name}: call forward_internals with "
                             f"keep={KD_ATTENTION[kd]}")
    terms = {
        "pred": pred_loss(student.logits, teacher.logits, regression),
        "rep": rep_loss(student.hidden_states, teacher.hidden_states, mask, include_padding),
    }
    total = terms["pred"] + terms["rep"]
    if kd == "score":
        terms["score"] = score_loss(student.attn_scores, teacher.attn_scores, mask, include_padding)
        total = total + terms["score"]
    if kd in ("map", "unified"):
        terms["map"] = map_loss(student.attn_probs, teacher.attn_probs, mask)
        total = total + map_coeff * terms["map"]
    if kd in ("output", "unified"):
        terms["output"] = output_loss(student.attn_outputs, teacher.attn_outputs, mask, include_padding)
        total = total + output_coeff * terms["output"]
    return total, terms


# =============================================================================================
# 5. Data and metrics: the eight GLUE tasks
# =============================================================================================


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
        Task("cola", BINARY, metric="mcc", max_len=64, batch_size=16, eval_every=50, scores=("mcc",),
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
    columns = train_table.column_names
    text_columns = tuple(text_columns or default_text_columns(columns, label_column))
    for table, at in tables.values():
        for c in (*text_columns, label_column):
            if c not in table.column_names:
                kind = "label column" if c == label_column else "column"
                raise ValueError(f"{at(0).split(':')[0]}: no {kind} {c!r}; its columns are: "
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


def fingerprint(examples):
    """A short hash of a list of examples: a cached teacher records the data it was fine-tuned on."""
    import hashlib

    return hashlib.sha1(repr(examples).encode()).hexdigest()[:16]


def align_labels(task, data, id2label):
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
    raise ValueError(f"the teacher's labels ({', '.join(heads)}) do not match the data's "
                     f"({', '.join(task.names or task.labels)}); pass a teacher trained on these classes")


def tokenize(examples, tokenizer, max_len):
    """Token ids per example, pairs truncated longest-first to max_len (special tokens included)."""
    a = [e[0] for e in examples]
    b = [e[1] for e in examples] if examples[0][1] is not None else None
    enc = tokenizer(a, b, truncation=True, max_length=max_len)
    feats = [{k: enc[k][i] for k in MODEL_INPUTS if k in enc} for i in range(len(examples))]
    for f, e in zip(feats, examples):
        f["labels"] = e[2]
    return feats


def collate(features, pad_id=0, pad_to=None):
    """Pad a list of features to the longest in the batch (dynamic padding), or to pad_to tokens (the
    original code pads every batch to max_len) -> dict of tensors."""
    longest = pad_to or max(len(f["input_ids"]) for f in features)
    batch = {}
    for k in MODEL_INPUTS:
        if k in features[0]:
            pad = pad_id if k == "input_ids" else 0
            batch[k] = torch.tensor([f[k] + [pad] * (longest - len(f[k])) for f in features])
    label = features[0]["labels"]
    batch["labels"] = torch.tensor([f["labels"] for f in features], dtype=torch.float if isinstance(label, float)
                                   else torch.long)
    return batch


def batches(features, batch_size, pad_id=0, shuffle=False, seed=0, start=0, device="cpu", pad_to=None, drop_below=1):
    """Yield padded batches on `device` (collate: dynamic padding, or to pad_to), from batch number
    `start` on; shuffle with a torch generator seeded by `seed`, so one seed gives one order (and a
    resumed epoch the same order). A last batch of fewer than drop_below examples is dropped."""
    order = torch.randperm(len(features), generator=torch.Generator().manual_seed(seed)) if shuffle \
        else torch.arange(len(features))
    for i in range(start * batch_size, len(features), batch_size):
        if len(features) - i < drop_below:
            return
        batch = collate([features[j] for j in order[i:i + batch_size].tolist()], pad_id, pad_to)
        yield {k: v.to(device) for k, v in batch.items()}


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


# =============================================================================================
# 6. Teacher
# =============================================================================================


def teacher_config(name_or_path):
    """The teacher's config, read before anything else: a missing path, a path without a model, an
    unreachable hub id or an unsupported architecture is refused here, in one line."""
    from transformers import AutoConfig

    path = Path(name_or_path)
    looks_local = path.exists() or name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1
    if looks_local and not path.is_dir():
        raise FileNotFoundError(f"teacher directory {name_or_path} does not exist")
    if looks_local and not (path / "config.json").is_file():
        raise FileNotFoundError(f"teacher directory {name_or_path} holds no model (no config.json)")
    try:
        config = AutoConfig.from_pretrained(name_or_path)
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"could not load teacher {name_or_path!r}: not a local model directory, and the "
                                f"hub could not provide it ({type(e).__name__}); pass --teacher DIR") from None
    model_family(config)
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
    return use_qatkd_attention(model), tokenizer, trained_head and not info["missing_keys"]


# =============================================================================================
# 7. Training and evaluation
# =============================================================================================


def set_seed(seed):
    """Seed python, numpy and torch: on CPU a seed fixes the whole run."""
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:
        pass


@torch.no_grad()
def evaluate(model, task, dev_sets, batch_size, pad_id=0, desc="eval", pad_to=None):
    """Dev metrics of a model. dev_sets: {split: features}; MNLI's second split gets suffix _mm.

    Batches are formed in file order, so a result is reproducible: note that the student's
    activation scales are per batch (as in the original), so they depend on the batch size and on
    the padding (pad_to: pad every batch to that length, as the original code).
    """
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    out = {}
    for i, feats in enumerate(dev_sets.values()):
        logits, labels = [], []
        for b in tqdm(batches(feats, batch_size, pad_id, device=model.device, pad_to=pad_to), desc=desc,
                      total=math.ceil(len(feats) / batch_size), leave=False, dynamic_ncols=True):
            logits.append(model(**model_inputs(model, b)).logits.float().cpu())
            labels.append(b["labels"].cpu())
        metrics = task_metrics(task, torch.cat(logits), torch.cat(labels))
        out.update({k + ("_mm" if i else ""): v for k, v in metrics.items()})
    model.train(was_training)
    return out


@dataclass
class TrainConfig:
    """Optimisation settings shared by teacher fine-tuning and QAT (official main.py defaults)."""

    epochs: float = 3.0
    lr: float = 2e-5
    batch_size: int = 32
    warmup: float = 0.1  # fraction of steps with linear warm-up, then linear decay to 0
    weight_decay: float = 0.01  # on matrices only, not on biases and LayerNorm
    max_grad_norm: float = 1.0
    optimizer: str = "bertadam"  # "bertadam" (official code) or "adamw" (torch)
    save_every: int = 100  # checkpoint every N steps (needs train(checkpoint=...)); 0: only on Ctrl-C
    eval_every: int = 0  # 0: evaluate only at the end
    max_steps: int = 0  # 0: epochs decide
    seed: int = 42
    pad_id: int = 0
    pad_to: int = 0  # 0: pad each batch to its longest example; else to this length (the original: max_len)

    def steps_per_epoch(self, n_train, world=1):
        """Batches per epoch. Under torchrun (world > 1) a last batch of fewer examples than processes
        is dropped: a process would get no example."""
        full, rest = divmod(n_train, self.batch_size)
        return full + (rest >= world if world > 1 else rest > 0)

    def total_steps(self, n_train, world=1):
        steps = math.ceil(self.epochs * self.steps_per_epoch(n_train, world))
        return min(steps, self.max_steps) if self.max_steps else steps


class BertAdam(torch.optim.Optimizer):
    """The official code's optimizer (TernaryBERT's transformer/optimization.py), step by step:

        g <- g * min(1, max_grad_norm / ||g||)       each parameter tensor clipped on its own
        m <- b1 m + (1 - b1) g;   v <- b2 v + (1 - b2) g^2
        p <- p - lr * (m / (sqrt(v) + eps) + weight_decay * p)
    Adam with decoupled weight decay but no bias correction: its updates are larger than Adam's
    by (1 - b1^t) / sqrt(1 - b2^t), e.g. 3.2x at step 100 and 1.9x at step 345.
    """

    def __init__(self, params, lr=2e-5, betas=(0.9, 0.999), eps=ADAM_EPS, weight_decay=0.0, max_grad_norm=1.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      max_grad_norm=max_grad_norm))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if group["max_grad_norm"] > 0:
                    torch.nn.utils.clip_grad_norm_(p, group["max_grad_norm"])
                g, state = p.grad, self.state[p]
                if not state:
                    state["m"], state["v"] = torch.zeros_like(p), torch.zeros_like(p)
                state["m"].mul_(b1).add_(g, alpha=1 - b1)
                state["v"].mul_(b2).addcmul_(g, g, value=1 - b2)
                update = state["m"] / (state["v"].sqrt() + group["eps"])
                if group["weight_decay"] > 0:
                    update.add_(p, alpha=group["weight_decay"])
                p.add_(update, alpha=-group["lr"])


OPTIMIZERS = ("bertadam", "adamw")


def make_optimizer(model, cfg, total_steps):
    """Optimizer (eps 1e-6, weight decay on matrices only) and linear warm-up/decay schedule.

    cfg.optimizer "bertadam": the official BertAdam above (no bias correction, per-tensor
    clipping); "adamw": torch's AdamW (bias correction) with one global clip, applied in train().
    """
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    if cfg.optimizer == "bertadam":
        opt = BertAdam(groups, lr=cfg.lr, eps=ADAM_EPS, max_grad_norm=cfg.max_grad_norm)
    elif cfg.optimizer == "adamw":
        opt = torch.optim.AdamW(groups, lr=cfg.lr, eps=ADAM_EPS)
    else:
        raise ValueError(f"unknown optimizer {cfg.optimizer!r}; use one of {OPTIMIZERS}")
    warm = int(cfg.warmup * total_steps)

    def schedule(step):
        return step / max(1, warm) if step < warm else max(0.0, (total_steps - step) / max(1, total_steps - warm))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, schedule)


def train(model, loss_fn, train_feats, cfg, evaluate_fn=None, metric="acc", log=print, desc="train",
          checkpoint=None):
    """One training loop for teacher fine-tuning and QAT.

    loss_fn(model, batch) -> (loss, {term: value}); evaluate_fn() -> dev metrics, run every
    cfg.eval_every steps and after the last step; log(record) receives every step's loss terms
    and every evaluation. A non-finite loss stops training with FloatingPointError naming the step
    and the term. Returns the best (selected on `metric`, first best kept; an undefined, NaN,
    metric never) and the last evaluation, the number of steps, and the seconds spent (in all, in
    evaluation, per training step).

    checkpoint: a file path. If it exists, training continues from it; the state is saved there
    every cfg.save_every steps and when Ctrl-C (SIGINT) arrives, after the step in progress,
    which then raises KeyboardInterrupt. On CPU a resumed run ends exactly as an uninterrupted one.

    Several processes (torchrun, process group initialised): the model is wrapped in
    DistributedDataParallel; every process draws the same global batch of cfg.batch_size and
    trains on its own contiguous slice of it, gradients are averaged across processes, each draws
    its own dropout, and only rank 0 evaluates, logs (losses averaged over processes) and saves.
    """
    from tqdm.auto import tqdm

    rank, world = distributed()
    net = model if world == 1 else nn.parallel.DistributedDataParallel(model)
    total = cfg.total_steps(len(train_feats), world)
    opt, sched = make_optimizer(model, cfg, total)
    loop = restore(checkpoint, model, opt, sched)
    if world > 1:  # each process draws its own dropout masks (the data order comes from its own generator)
        torch.manual_seed(cfg.seed + 10_000 * rank + loop["step"])
    step, main, start = loop["step"], rank == 0, time.time() - loop["seconds"]
    model.train()
    with stop_on_ctrl_c() as interrupted, tqdm(total=total, initial=step, desc=desc, dynamic_ncols=True,
                                              disable=not main) as bar:
        for epoch, batch in training_batches(train_feats, cfg, step, total, next(model.parameters()).device, rank,
                                             world):
            loss, terms = loss_fn(net, batch)  # teacher and student forward, the KD loss
            values = checked_values(loss, terms, world, step, checkpoint)  # averaged over processes
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.optimizer == "adamw":  # BertAdam clips each tensor itself
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            opt.step()
            sched.step()
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{values['loss']:.4f}")
            if main:
                log({"step": step, "epoch": epoch, "lr": sched.get_last_lr()[0], **values})
                if evaluate_fn is not None and ((cfg.eval_every and step % cfg.eval_every == 0) or step == total):
                    evaluate_and_select(evaluate_fn, metric, loop, step, log, bar.write)
                if checkpoint is not None and ((cfg.save_every and step % cfg.save_every == 0) or interrupted):
                    loop.update(step=step, seconds=time.time() - start)
                    save_checkpoint(checkpoint, model, opt, sched, loop)
            if interrupted:
                raise KeyboardInterrupt(f"interrupted after step {step}" + (f"; resume from {checkpoint}"
                                                                            if checkpoint else ""))
    seconds = time.time() - start
    return {**loop["result"], "steps": step, "seconds": seconds, "eval_seconds": loop["eval_seconds"],
            "seconds_per_step": (seconds - loop["eval_seconds"]) / max(1, step)}


def training_batches(train_feats, cfg, step, total, device="cpu", rank=0, world=1):
    """(epoch, batch) from training step `step` to `total`: epochs in a seeded order (cfg.seed +
    epoch), so a resumed run continues where it stopped; under several processes, this process's
    slice of every global batch (a last batch smaller than the process count is dropped)."""
    while step < total:
        epoch, skip = divmod(step, cfg.steps_per_epoch(len(train_feats), world))
        for batch in batches(train_feats, cfg.batch_size, cfg.pad_id, shuffle=True, seed=cfg.seed + epoch,
                             start=skip, device=device, pad_to=cfg.pad_to or None, drop_below=world):
            if world > 1:
                batch = {k: v.tensor_split(world)[rank] for k, v in batch.items()}
            yield epoch, batch
            step += 1
            if step == total:
                return


def checked_values(loss, terms, world, step, checkpoint=None):
    """{"loss": total, term: value} as floats, averaged over processes (so all stop together); a
    non-finite total raises FloatingPointError naming the step and the term."""
    values = torch.stack([loss.detach(), *(torch.as_tensor(v).detach() for v in terms.values())])
    if world > 1:
        torch.distributed.all_reduce(values)
        values /= world
    values = dict(zip(["loss", *terms], values.tolist()))
    if not math.isfinite(values["loss"]):
        bad = [k for k in terms if not math.isfinite(values[k])] or ["total"]
        raise FloatingPointError(f"loss is {values['loss']} at step {step + 1} (term: {', '.join(bad)})"
                                 + (f"; the last good checkpoint is {checkpoint}" if checkpoint else ""))
    return values


def evaluate_and_select(evaluate_fn, metric, loop, step, log, write=print):
    """Evaluate, log, and keep the last and the best evaluation (on `metric`; NaN is never best)."""
    eval_start = time.time()
    metrics = evaluate_fn()
    loop["eval_seconds"] += time.time() - eval_start
    undefined = [k for k, v in metrics.items() if math.isnan(v)]  # e.g. the correlation of constant predictions
    log({"step": step, "eval": metrics, **({"undefined": undefined} if undefined else {})})
    result = loop["result"]
    result.update(last=metrics, last_step=step)
    if undefined:
        result.setdefault("undefined_steps", []).append(step)
    if not math.isnan(metrics[metric]) and (result["best"] is None or metrics[metric] > result["best"][metric]):
        result.update(best=metrics, best_step=step)
    write(f"step {step}: " + "  ".join(f"{k} {100 * v:.2f}" for k, v in metrics.items()))


def finetune_teacher(model, task, train_feats, cfg, evaluate_fn=None, log=print):
    """Full-precision fine-tuning with the ground truth: cross-entropy, or MSE for STS-B."""

    def loss_fn(net, b):
        logits = net(**model_inputs(net, b)).logits
        if task.labels is None:
            loss = F.mse_loss(logits.squeeze(-1), b["labels"])
        else:
            loss = F.cross_entropy(logits, b["labels"])
        return loss, {"gt": loss}

    return train(model, loss_fn, train_feats, cfg, evaluate_fn, task.metric, log, desc="teacher")


def qat_loss_fn(teacher, task, kd="map", map_coeff=1.0, output_coeff=1.0, gt_coeff=0.0, include_padding=False):
    """loss_fn(student, batch) for train(): teacher forward without a graph, student forward, kd_loss.

    gt_coeff > 0 adds gt_coeff * cross-entropy with the labels (off in the paper: KD only).
    """
    check_kd_mode(kd)
    regression = task.labels is None
    teacher.eval()

    def loss_fn(student, b):
        with torch.no_grad():  # the teacher is fixed: no graph, no saved activations
            t = forward_internals(teacher, b, KD_ATTENTION[kd])
        s = forward_internals(student, b, KD_ATTENTION[kd])
        loss, terms = kd_loss(s, t, b["attention_mask"], kd, map_coeff, output_coeff, regression, include_padding)
        if gt_coeff:
            logits = s.logits.squeeze(-1) if regression else s.logits
            terms["gt"] = (F.mse_loss if regression else F.cross_entropy)(logits, b["labels"])
            loss = loss + gt_coeff * terms["gt"]
        return loss, terms

    return loss_fn


def save_model(model, path, tokenizer=None, extra=None):
    """save_pretrained into path (safetensors), atomically: write a sibling temp dir, then rename.

    extra: {filename: json object} written beside it (the student's quantization.json).
    """
    with atomic_path(path) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, obj in (extra or {}).items():
            write_json(tmp / name, obj)


def save_student(student, path, tokenizer=None):
    """The student's latent full-precision weights, config, tokenizer and quantization.json."""
    save_model(student, path, tokenizer, {"quantization.json": student.qatkd_bits})


def load_student(path):
    """Rebuild a student saved by save_student: the architecture, its latent weights, re-quantized."""
    from transformers import AutoModelForSequenceClassification

    bits = json.loads((Path(path) / "quantization.json").read_text())
    model = AutoModelForSequenceClassification.from_pretrained(path)
    return quantize_student(model, bits["wbits"], bits["abits"])


# =============================================================================================
# 8. Attention-recovery diagnostics (the paper's analysis, Fig. 4)
#
# How far the student's self-attention is from the teacher's, per layer, on dev data: the
# attention-map KL and attention-output error that the paper's losses minimise, and the two
# attention-distance measures of its analysis (ranking loss and cover length).
# =============================================================================================


def rank_loss(s_probs, t_probs, mask):
    """Pairwise ranking loss between attention maps (Liu et al. 2021), on the paper's scale (Fig. 4).

    s_probs, t_probs: [B, H, S, S]; mask: [B, S]; L = valid tokens of a sample. Per head, as the
    paper's analysis notebook (Exp1) computes it, a sum over every query row r < L and key pairs
    i in [0, L-2], j in [1, L-1]:
        R_h = sum_r sum_i sum_j max(0, -(s_ri - s_rj) * sign(t_ri - t_rj))
    Returns [B], the mean of R_h over heads; 0 when the student orders every row as the teacher.
    A sum, not a mean: it grows as L^3, so compare students on the same examples only.
    """
    out = []
    for b in range(s_probs.shape[0]):
        L = int(mask[b].sum())
        s, t = s_probs[b, :, :L, :L], t_probs[b, :, :L, :L]  # [H, L, L]
        ds = s[..., :-1, None] - s[..., None, 1:]  # s_ri - s_rj, i < L-1, j >= 1   [H, L, L-1, L-1]
        dt = t[..., :-1, None] - t[..., None, 1:]
        out.append(torch.relu(-ds * torch.sign(dt)).sum((-1, -2, -3)).mean())
    return torch.stack(out)


COVER_TOP_K = 5  # the paper's cover length follows the teacher's 5 largest keys of each row


def cover_length(s_probs, t_probs, mask, k=COVER_TOP_K):
    """Cover-length ratio of the teacher's top-k keys in the student's ranking (the paper's Fig. 4).

    s_probs, t_probs: [B, H, S, S]; mask: [B, S]; L = valid tokens of a sample. As the paper's
    analysis notebook (Exp1): for each query row r < L-1, the deepest 0-based position that any
    of the teacher's k largest keys takes in the student's descending order, divided by L; these
    summed over the rows and divided by L:
        C_h = (1 / L) sum_{r < L-1} max_{key in top_k(t_r)} pos_{s_r}(key) / L
    Returns [B], the mean of C_h over heads. Its minimum, (k - 1)(L - 1) / L^2 for L >= k, means
    the student's top-k is the teacher's.
    """
    out = []
    for b in range(s_probs.shape[0]):
        L = int(mask[b].sum())
        s, t = s_probs[b, :, :L - 1, :L], t_probs[b, :, :L - 1, :L]  # rows r < L-1  [H, L-1, L]
        top = t.argsort(dim=-1, descending=True, stable=True)[..., :k]  # [H, L-1, k]
        position = s.argsort(dim=-1, descending=True, stable=True).argsort(dim=-1)  # 0-based rank of each key
        out.append(position.gather(-1, top).amax(-1).float().div(L).sum(-1).div(L).mean())
    return torch.stack(out)


DIAGNOSTICS = ("map_kl", "output_mse", "output_cos", "rank_loss", "cover_length")


@torch.no_grad()
def attention_recovery(student, teacher, features, batch_size, pad_id=0, rank_samples=64, pad_to=None):
    """Per-layer distance between student and teacher self-attention on dev features.

    Returns {measure: [one value per layer]} for
        map_kl        KL(teacher || student) per query row, masked as in map_loss, mean per sample
        output_mse    MSE of the attention sub-layer outputs over valid tokens
        output_cos    cosine similarity of those outputs per valid token (1 = same direction)
        rank_loss     pairwise ranking loss of the maps      } on the first rank_samples
        cover_length  cover length of the teacher's top-5    } examples (cost grows as S^3)
    Both models run in eval mode (no dropout), batched in file order.
    """
    was = student.training, teacher.training
    student.eval(), teacher.eval()
    sums, counts = None, {"samples": 0, "tokens": 0, "ranked": 0}
    for batch in batches(features, batch_size, pad_id, device=student.device, pad_to=pad_to):
        s, t = forward_internals(student, batch), forward_internals(teacher, batch)
        sums = sums or {name: [0.0] * len(s.attn_probs) for name in DIAGNOSTICS}
        mask = batch["attention_mask"]
        B, tokens = mask.shape[0], int(mask.sum())
        n_rank = max(0, min(B, rank_samples - counts["ranked"]))
        for layer, (sp, tp, so, to) in enumerate(zip(s.attn_probs, t.attn_probs, s.attn_outputs, t.attn_outputs)):
            sums["map_kl"][layer] += float(map_loss([sp], [tp], mask)) * B
            sums["output_mse"][layer] += float(output_loss([so], [to], mask)) * tokens
            sums["output_cos"][layer] += float((F.cosine_similarity(so, to, dim=-1) * mask).sum())
            if n_rank:
                sums["rank_loss"][layer] += float(rank_loss(sp[:n_rank], tp[:n_rank], mask[:n_rank]).sum())
                sums["cover_length"][layer] += float(cover_length(sp[:n_rank], tp[:n_rank], mask[:n_rank]).sum())
        counts["samples"] += B
        counts["tokens"] += tokens
        counts["ranked"] += n_rank
    student.train(was[0]), teacher.train(was[1])
    per = {"map_kl": "samples", "output_mse": "tokens", "output_cos": "tokens", "rank_loss": "ranked",
           "cover_length": "ranked"}
    return {name: [v / counts[per[name]] for v in values] for name, values in sums.items()}


# =============================================================================================
# 9. Packed low-bit export
#
# The trained student as it would ship: integer codes packed into bytes plus their scales, and
# the full-precision parts (LayerNorms, biases, position/token-type embeddings, classifier) as
# they are, in one safetensors file (no pickle). load_quantized() rebuilds a model whose logits
# are bit-identical to the student's.
# =============================================================================================


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
            q = quantize_weight(w, bits, per_row)
            alpha = q.abs().amax(dim=_reduce_dims(q, per_row), keepdim=True)
            codes = (q > 0).to(torch.uint8) if bits == 1 else (torch.sign(q) + 1).to(torch.uint8)
            return codes, alpha.reshape(-1, 1) if per_row else alpha.reshape(1)
        s = uniform_scale(w.clamp(-CLIP, CLIP), bits, per_row)
        codes = torch.round(w.clamp(-CLIP, CLIP) * s) + (2 ** (bits - 1) - 1)
        return codes.to(torch.uint8), s.reshape(-1, 1) if per_row else s.reshape(1)


def codes_to_weight(codes, scale, bits):
    """Dequantize weight_codes(): the exact floats the student computed in its forward pass."""
    if bits == 1:
        return torch.where(codes.bool(), scale, -scale)
    if bits == 2:
        return (codes.to(scale.dtype) - 1) * scale
    return (codes.to(scale.dtype) - (2 ** (bits - 1) - 1)) / scale


def export_quantized(student, path, tokenizer=None):
    """Write the student in packed low-bit form to path/ (model.safetensors, config, tokenizer).

    For each quantized weight W ("name.weight"): "name.weight.codes" (packed uint8),
    "name.weight.scale" (float32, per tensor or per row) and its shape in the metadata; every other
    tensor of the state dict stays as it is. Returns {"packed_bytes", "fp_bytes"}: bytes of codes
    and scales, and bytes kept in full precision.
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
    meta = {"qatkd": json.dumps({**bits, "shapes": shapes})}
    with atomic_path(path / "model.safetensors") as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    student.config.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return sizes


def load_quantized(path, backend="fake", device="cpu"):
    """Rebuild an exported student.

    backend "fake": dequantized fp32 weights, activations fake-quantized as in training; logits
    bit-identical to the trained student's. Weights are set to the exact quantized values (wbits=32
    modules, so nothing is quantized twice); inputs, Q, K, V and attention probabilities keep abits.
    backend "int8": integer inference (IntLinear, IntEmbedding below): every quantized Linear keeps
    its int8 codes and multiplies integer codes in an int8 x int8 -> int32 kernel; the word
    embedding is looked up from its packed codes; nothing holds an fp32 copy of a quantized weight.
    Self-attention's Q K^T and P V products stay fp32 on fake-quantized Q, K, V, P (as in training).
    Logits agree with the fake path to float rounding (its fp32 sums round, the int32 sums do not).
    """
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForSequenceClassification

    if backend not in ("fake", "int8"):
        raise ValueError(f"unknown backend {backend!r}; use fake or int8")
    path = Path(path)
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        meta = json.loads(f.metadata()["qatkd"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    wbits, abits = meta["wbits"], meta["abits"]
    if backend == "int8" and abits > 8:
        raise ValueError(f"the int8 backend needs activations of 8 bits or fewer; this student has {abits}")
    state = {k: v for k, v in tensors.items() if not k.endswith((".codes", ".scale"))}
    codes = {key: unpack_bits(tensors[key + ".codes"], wbits, math.prod(shape)).reshape(shape)
             for key, shape in meta["shapes"].items()}
    if backend == "fake":
        state.update({key: codes_to_weight(c, tensors[key + ".scale"], wbits) for key, c in codes.items()})
    model = AutoModelForSequenceClassification.from_config(AutoConfig.from_pretrained(path))
    model.load_state_dict(state, strict=backend == "fake")
    model.to(device)  # the integer kernels are chosen for the device the codes live on
    if backend == "fake":
        student = quantize_student(model, 32, abits)
    else:
        student = use_qatkd_attention(model)
        for key, c in codes.items():
            name = key.removesuffix(".weight")
            parent, child = (name.rsplit(".", 1) + [""])[:2] if "." in name else ("", name)
            old = student.get_submodule(name)
            c, scale = c.to(device), tensors[key + ".scale"].to(device)
            if isinstance(old, nn.Embedding):
                new = IntEmbedding(c, scale, wbits)
            else:
                new = IntLinear(*signed_codes(c, scale, wbits), old.bias, abits)
            setattr(student.get_submodule(parent), child, new)
        for m in self_attention_modules(student):
            m.qatkd_abits = abits
    student.qatkd_bits = {"wbits": wbits, "abits": abits}
    return student.eval()


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
    exact, slow). torch._int_mm on a CPU without VNNI instructions is slower than fp32 (measured
    here: 25x), so it is not used there."""
    if device.type == "cuda":
        return "int_mm"
    if device.type == "cpu" and hasattr(torch.ops.onednn, "qlinear_pointwise") and torch.backends.mkldnn.is_available():
        return "onednn"
    return "plain"


def int_codes(x, s, n, shift, dtype):
    """IntLinear's activation codes: round(clamp(x * s, -n, n)) + shift, as dtype (int8 with shift 0,
    or uint8 with shift 128 for oneDNN). Clamping x * s to [-n, n] gives the codes of
    round(clamp(x, -2.5, 2.5) * s), the training-time quantizer's. x: any shape; s: a float.
    One compiled pass on CPU (FUSED, as fused_levels), else four plain ones; the same bits."""
    if may_fuse(x) and x.is_contiguous():
        if "int" not in _compiled:
            _compiled["int"] = torch.compile(_int_codes_for_compile, dynamic=True)
        try:
            return _compiled["int"](x.view(-1), torch.tensor(s, dtype=x.dtype), n, shift, dtype).view(x.shape)
        except Exception as e:  # noqa: BLE001 -- any compiler failure: fall back, say so once
            _compile_failed(e)
    return (x * s).clamp_(-n, n).round_().add_(shift).to(dtype)


def _int_codes_for_compile(x, s, n, shift, dtype):
    return (x * s).clamp(-n, n).round().add(shift).to(dtype)


class IntLinear(nn.Module):
    """A QuantLinear computed in integers: y = (X_q W_q^T) * (c / s_x) + b.

    x: [..., in] float -> y: [..., out] float. W_q: int8 codes [out, in] with W = W_q * c (c: the
    weight's step, signed_codes); X_q = round(clamp(x, -2.5, 2.5) * s_x) are the activation's int8
    codes with exactly the training-time scale s_x = (2^(a-1) - 1) / max |clamp(x)| (per tensor,
    symmetric). X_q W_q^T is an int32 sum: exact. On CPU (oneDNN) X_q travels as uint8 X_q + 128
    and the kernel subtracts the zero point exactly; on x86 CPUs without VNNI its uint8 x int8
    products are summed in pairs in int16 and could saturate for |W_q| > 64, so 8-bit weights are
    split as W_q = 128 W_hi + W_lo (two exact GEMMs).
    """

    def __init__(self, q, step, bias, abits=8):
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.abits, self.step, self.kernel = abits, step, int8_kernel(q.device)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        if self.kernel == "onednn":  # prepacked once; kept as attributes (opaque tensors: not in the state dict)
            hi = torch.round(q.to(torch.float32) / 128).to(torch.int8) if q.abs().max() > 64 else None
            parts = [(q, 1)] if hi is None else [((q.to(torch.int16) - 128 * hi.to(torch.int16)).to(torch.int8), 1),
                                                   (hi, 128)]
            self.packed = [(torch.ops.onednn.qlinear_prepack(p, None), f) for p, f in parts]
        else:
            self.register_buffer("q", q.contiguous())

    def forward(self, x):
        n = 2 ** (self.abits - 1) - 1
        lo, hi = torch.aminmax(x)
        m = float(torch.maximum(-lo, hi))
        s = n / max(min(m, CLIP), n * torch.finfo(x.dtype).tiny)  # the activation quantizer's scale, per tensor
        s = float(torch.tensor(s, dtype=x.dtype))  # in x's precision, as uniform_scale computes it
        onednn = self.kernel == "onednn"
        codes = int_codes(x, s, n, 128 if onednn else 0, torch.uint8 if onednn else torch.int8)
        factor = self.step / s  # y = (X_q W_q^T) * c / s_x + b
        if onednn:
            qx, ones, zeros = codes, torch.ones(1), torch.zeros(1, dtype=torch.long)
            y = None
            for packed, f in self.packed:
                part = torch.ops.onednn.qlinear_pointwise(qx, factor * f, 128, packed, ones, zeros,
                                                          self.bias if y is None else None, 1.0, 0, torch.float32,
                                                          "none", [], "")
                y = part if y is None else y + part
            return y
        flat = codes.reshape(-1, self.in_features)
        acc = torch._int_mm(flat, self.q.t()) if self.kernel == "int_mm" else flat.int() @ self.q.int().t()
        y = (acc.float() * factor).reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, abits={self.abits}, {self.kernel}"


class IntEmbedding(nn.Module):
    """The row-wise quantized word embedding, looked up from its packed codes: ids [B, S] -> [B, S, d].

    Holds the codes packed (4 per byte for ternary) and one scale per row; only the looked-up rows
    are unpacked, with the export's arithmetic (codes_to_weight), so it returns the fp32 student's
    embedding bit for bit.
    """

    def __init__(self, codes, scale, bits):
        super().__init__()
        self.num_embeddings, self.embedding_dim = codes.shape
        self.bits = bits  # what a code means (codes_to_weight)
        self.pack = bits if self.embedding_dim * bits % 8 == 0 else 8  # rows that do not fill whole bytes: 1 per byte
        self.register_buffer("codes", pack_bits(codes, self.pack).reshape(self.num_embeddings, -1))
        self.register_buffer("scale", scale.reshape(self.num_embeddings, 1))

    def forward(self, ids):
        rows = self.codes[ids]  # [B, S, d * pack / 8]
        codes = unpack_bits(rows.reshape(-1), self.pack, ids.numel() * self.embedding_dim)
        return codes_to_weight(codes.reshape(*ids.shape, self.embedding_dim), self.scale[ids], self.bits)

    def extra_repr(self):
        return f"{self.num_embeddings}, {self.embedding_dim}, {self.bits}-bit codes"


# =============================================================================================
# 10. Files, checkpoints and processes
#
# The plumbing that lets a run survive a kill and run on several processes: atomic writes,
# checkpoints of tensors and plain values (no pickled code), RNG state, the process group.
# =============================================================================================


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary sibling of path to write; rename it onto path once written.

    A kill mid-write leaves only the temporary (file or directory), never a half-written path.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    if tmp.is_dir():  # left behind by an earlier kill
        shutil.rmtree(tmp)
    tmp.unlink(missing_ok=True)
    yield tmp
    if path.is_dir():
        shutil.rmtree(path)
    os.replace(tmp, path)


def json_ready(obj):
    """obj with every NaN float as None (JSON's null: NaN is not JSON), recursively."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_ready(v) for v in obj]
    return obj


def write_json(path, obj):
    """Write JSON atomically, so a kill leaves no half file; an undefined (NaN) value is written as null."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(json_ready(obj), indent=2) + "\n")


def restore(checkpoint, model, opt, sched):
    """train()'s loop state: from the checkpoint file if one exists (weights, optimizer, schedule and
    RNG states restored in place), else a fresh start."""
    if checkpoint is None or not Path(checkpoint).is_file():
        return {"step": 0, "seconds": 0.0, "eval_seconds": 0.0,
                "result": {"best": None, "best_step": None, "last": None, "last_step": None}}
    state = load_checkpoint(checkpoint)
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return state["loop"]


@contextlib.contextmanager
def stop_on_ctrl_c():
    """Yield a list that becomes non-empty when Ctrl-C (SIGINT) arrives, so that train() can finish
    the step in progress, save and stop; the previous handler is restored afterwards."""
    import signal

    interrupted = []
    try:
        previous = signal.signal(signal.SIGINT, lambda *_: interrupted.append(True))
    except ValueError:  # not the main thread
        previous = None
    try:
        yield interrupted
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


def rng_state():
    """Python, numpy and torch (CPU) random states, to continue a run exactly; as tensors and plain
    Python values only, so that a checkpoint loads with torch.load(weights_only=True)."""
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    try:
        import numpy as np

        name, keys, pos, has_gauss, gauss = np.random.get_state()
        state["numpy"] = [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss]
    except ImportError:
        pass
    return state


def set_rng_state(state):
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        import numpy as np

        name, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))


def save_checkpoint(path, model, opt, sched, loop):
    """Everything train() needs to continue: weights, optimizer, schedule, RNG states, loop state.

    Written atomically (temporary file, then rename): a kill never leaves a half-written checkpoint.
    """
    with atomic_path(path) as tmp:
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(), "rng": rng_state(), "loop": loop}, tmp)


def load_checkpoint(path):
    """A checkpoint of save_checkpoint: tensors and plain values only (weights_only=True: nothing is
    unpickled that could run code). A file holding anything else is refused."""
    import pickle

    try:
        return torch.load(path, weights_only=True)
    except pickle.UnpicklingError as e:
        why = (str(e).strip().splitlines() or [""])[0][:120]
        raise ValueError(f"{path} holds more than tensors and plain values ({why}); refusing to unpickle it: "
                         "delete it to start the run again") from None


def distributed():
    """(rank, world size) under torchrun once the process group is initialised; else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1
