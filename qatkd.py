"""qatkd: knowledge distillation for quantization-aware training of Transformer encoders.

A reference implementation of

    Minsoo Kim, Sihwa Lee, Sukjin Hong, Du-Seong Chang, Jungwook Choi.
    "Understanding and Improving Knowledge Distillation for Quantization-Aware Training
    of Large Transformer Encoders." EMNLP 2022, arXiv:2211.11014.

This file is the method and only the method, top to bottom in data-flow order:

    1. quantizers              ternary, binary and uniform k-bit, with the clipped straight-through estimator
    2. quantized modules       QuantLinear, QuantEmbedding, the quantized self-attention
    3. student and internals   FAMILIES (one row per encoder family), quantize_student, forward_internals
    4. KD losses               prediction, hidden states, attention scores (TernaryBERT), attention map
                               and attention output (the paper's), and their sum
    5. optimizer and training  BertAdam with its schedule, batches, the training loop
    6. teacher and QAT         teacher fine-tuning, the QAT objective

Everything here is plain torch (and transformers for the encoders): the code that runs is the
formula its docstring states. Data, export and integer inference, diagnostics, files and
processes live in the modules beside it. The official code (MarsJacobs/kd-qat-large-enc, derived
from TernaryBERT) is the reference for what is computed; every deliberate difference is marked
with a DEVIATION comment that names it where it is made, and README.md lists them by the same names.
"""

from __future__ import annotations

import copy
import inspect
import math
import time
import types
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

CLIP = 2.5  # every quantizer clips its input to [-2.5, 2.5] first (TernaryBERT's clip_val)
TWN_THRESHOLD = 0.7  # ternary threshold Delta = 0.7 * mean |w| (TWN, Li et al. 2016)
PROB_FLOOR = 1e-8  # the map loss clamps probabilities to at least this before the logarithm
ADAM_EPS = 1e-6  # BertAdam's epsilon (and AdamW's, for teacher fine-tuning)
WEIGHT_BITS = (1, 2, 4, 8, 32)  # 32: full precision


# =============================================================================================
# 1. Quantizers
#
# Weights and activations are quantized on the fly in every forward pass; the full-precision
# ("latent") weights are what the optimizer updates. Gradients pass straight through the rounding,
# except where the input lies outside the clip range (Bengio et al. 2013; TernaryBERT).
# =============================================================================================


class ClipSTE(torch.autograd.Function):
    """Straight-through estimator with clipping, as in TernaryBERT (Zhang et al. 2020).

        forward:  q = levels(clamp(x, -clip, clip))        x: any shape; levels: x_c -> q, same shape
        backward: dL/dx = dL/dq * 1[|x| < clip]             thresholds and scales get no gradient
    """

    @staticmethod
    def forward(ctx, x, levels, clip):
        ctx.save_for_backward(x.abs() < clip)
        return levels(x.clamp(-clip, clip))

    @staticmethod
    def backward(ctx, grad):
        (inside,) = ctx.saved_tensors
        return torch.where(inside, grad, 0.0), None, None


def ternarize(w, per_row=False, clip=CLIP):
    """2-bit weights: ternary weight networks (TWN, Li et al. 2016), as TernaryBERT uses them.

    w: any shape. One scale for the tensor, or one per row (per_row: over the last dim; the paper
    quantizes the word embedding [vocab, d] row by row):
        w_c = clamp(w, -2.5, 2.5);   Delta = 0.7 * mean |w_c|
        alpha = mean of |w_c| over {|w_c| > Delta}
        q = alpha * sign(w_c) where |w_c| > Delta, else 0          q in {-alpha, 0, +alpha}
    Gradient: straight through, zero where |w| >= 2.5 (ClipSTE).
    """

    def levels(wc):
        dims = (-1,) if per_row else tuple(range(wc.dim()))
        a = wc.abs()
        keep = a > TWN_THRESHOLD * a.mean(dims, keepdim=True)
        # DEVIATION (empty ternary rows): a row with no |w_c| above Delta gives 0; the original divides 0 / 0 there (NaN)
        alpha = (a * keep).sum(dims, keepdim=True) / keep.sum(dims, keepdim=True).clamp_min(1)
        return wc.sign() * keep * alpha

    return ClipSTE.apply(w, levels, clip)


def binarize(w, per_row=False, clip=CLIP):
    """1-bit weights (BinaryConnect with a scale, as XNOR-Net): q = alpha * sign(w_c).

    w: any shape; w_c = clamp(w, -2.5, 2.5); alpha = mean |w_c| per tensor (or per row, last dim).
    Exactly two levels {-alpha, +alpha}: w_c = 0 maps to +alpha. Gradient as ternarize's.
    """

    def levels(wc):
        alpha = wc.abs().mean((-1,) if per_row else tuple(range(wc.dim())), keepdim=True)
        return torch.where(wc < 0, -alpha, alpha)

    return ClipSTE.apply(w, levels, clip)


def quantize_uniform(x, bits, per_row=False, clip=CLIP):
    """Symmetric uniform k-bit quantizer (TernaryBERT's SymQuantizer), for weights and activations.

    x: any shape. The scale comes from the tensor itself in this forward pass (dynamic: no
    calibration), one per tensor or one per row (last dim):
        x_c = clamp(x, -2.5, 2.5);   n = 2^(k-1) - 1;   s = n / max |x_c|
        q = round(x_c * s) / s                     2^k - 1 levels, 0 among them; |q - x_c| <= 1 / (2s)
    round() rounds half to even. An all-zero x gives q = 0. Gradient as ternarize's.
    """

    def levels(xc):
        n = 2 ** (bits - 1) - 1
        top = xc.abs().amax((-1,) if per_row else tuple(range(xc.dim())), keepdim=True)
        s = n / top.clamp_min(n * torch.finfo(xc.dtype).tiny)
        return torch.round(xc * s) / s

    return ClipSTE.apply(x, levels, clip)


def quantize_per_example(x, bits, tokens, clip=CLIP):
    """quantize_uniform with one scale per example, from its real tokens only: an example's codes then do
    not depend on its batch neighbours or on padding, as a served model's must not.

    tokens: [B, S], 1 = token, 0 = padding. x: [B, S, d] (a Linear's input), [B, H, S, X] or [B*H, S, X]
    (attention's Q, K, V, P: the sequence in dim -2), or [B, d] (one vector per example):
        s_b = (2^(k-1) - 1) / max |x_c| over example b's real tokens;     q = round(x_c * s_b) / s_b
    (padding, left out of the max, is clamped to the same 2^k - 1 levels).
    Gradient as quantize_uniform's.
    """
    B = tokens.shape[0]

    def levels(xc):
        n = 2 ** (bits - 1) - 1
        if xc.dim() > 2 and xc.shape[-2] != tokens.shape[1]:
            raise ValueError(f"per-example scales need the sequence in dim -2; got {tuple(xc.shape)} for {tuple(tokens.shape)}")
        grid = xc.reshape(B, -1, *xc.shape[-2:]) if xc.dim() > 2 else xc.reshape(B, 1, 1, -1)  # [B, H, S, X]
        real = tokens.to(xc.dtype)[:, None, :, None] if xc.dim() > 2 else 1.0
        top = (grid.abs().amax(-1, keepdim=True) * real).amax((1, 2, 3), keepdim=True)  # [B, 1, 1, 1]
        s = n / top.clamp_min(n * torch.finfo(xc.dtype).tiny)
        return (torch.round(grid * s).clamp(-n, n) / s).reshape(xc.shape)

    return ClipSTE.apply(x, levels, clip)


def quantize_weight(w, bits, per_row=False):
    """Weight quantizer by bit width: 1 binary, 2 ternary, 4 and 8 uniform, 32 full precision."""
    if bits == 32:
        return w
    if bits == 1:
        return binarize(w, per_row)
    if bits == 2:
        return ternarize(w, per_row)
    if bits in (4, 8):
        # DEVIATION (k-bit weights): the original's "4-bit" weight quantizer (TwnQuantizer_mx) has 17 levels
        # and its >= 4-bit embedding another quantizer; here every k-bit weight has at most 2^k - 1 levels.
        return quantize_uniform(w, bits, per_row)
    raise ValueError(f"unsupported weight bit width {bits}; use one of {WEIGHT_BITS}")


# =============================================================================================
# 2. Quantized modules
#
# The student keeps the teacher's parameter names (a QuantLinear is an nn.Linear, a QuantEmbedding
# an nn.Embedding), so a student's weights load into the plain architecture and back.
# =============================================================================================


class QuantLinear(nn.Linear):
    """y = Q_a(x) Q_w(W)^T + b: quantized weight and input, full-precision bias (TernaryBERT, the paper).

    x: [..., in_features] -> y: [..., out_features]. W is the latent full-precision weight, quantized
    in every forward pass. act_quant(x, bits) is the activation quantizer: quantize_uniform (per
    tensor, the paper's) unless another is passed in; abits = 32 leaves x as it is.
    """

    def __init__(self, in_features, out_features, bias=True, wbits=2, abits=8, act_quant=quantize_uniform,
                 device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device, dtype)
        self.wbits, self.abits, self.act_quant = wbits, abits, act_quant

    def forward(self, x):
        if self.abits < 32:
            x = self.act_quant(x, self.abits)
        return F.linear(x, quantize_weight(self.weight, self.wbits), self.bias)

    def extra_repr(self):
        return f"{super().extra_repr()}, wbits={self.wbits}, abits={self.abits}"


class QuantEmbedding(nn.Embedding):
    """Word embedding with row-wise quantized weights (one scale per vocabulary entry): ids [B, S] -> [B, S, d].

    Row-wise quantization of the looked-up rows equals the looked-up rows of the quantized matrix,
    so only the B*S rows of the batch are quantized.
    """

    def __init__(self, num_embeddings, embedding_dim, padding_idx=None, wbits=2, device=None, dtype=None):
        super().__init__(num_embeddings, embedding_dim, padding_idx, device=device, dtype=dtype)
        self.wbits = wbits

    def forward(self, ids):
        return quantize_weight(F.embedding(ids, self.weight, self.padding_idx), self.wbits, per_row=True)

    def extra_repr(self):
        return f"{super().extra_repr()}, wbits={self.wbits}"


def qat_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **_):
    """Eager self-attention with the student's activation quantizers (official modeling_quant.py).

    Called through transformers' attention interface (use_qatkd_attention); teacher and student both
    use it. query, key, value: [B, H, S, d_h]; attention_mask: additive [B, 1, S, S] or None.
    module.quantize_act is Q_a (set by quantize_student; absent in a teacher: no quantization):
        Q, K, V <- Q_a(Q), Q_a(K), Q_a(V)
        A = Q K^T / sqrt(d_h)                  scores                            [B, H, S, S]
        P = softmax(A + mask)                  attention map                     [B, H, S, S]
        C = Q_a(dropout(P)) V                  context; P is quantized after dropout  [B, H, S, d_h]
    Teacher Intervention (phase 1, forward_internals' feed): "map" puts the teacher's P_t in place of P
    in the context (C = Q_a(dropout(P_t)) V), "context" its C_t in place of C; A and P stay the
    student's own, for the losses. While forward_internals runs, (A, P, C) are recorded: the scores
    without the additive mask, the map before dropout and quantization. Returns (C as [B, S, H, d_h], P).
    """
    quant = getattr(module, "quantize_act", None) or (lambda t: t)
    mode, teacher = getattr(module, "qatkd_feed", (None, None))
    q, k, v = quant(query), quant(key), quant(value)
    scaling = q.size(-1) ** -0.5 if scaling is None else scaling
    scores = torch.matmul(q, k.transpose(-1, -2)) * scaling
    probs = torch.softmax(scores if attention_mask is None else scores + attention_mask, dim=-1)
    used = next(teacher) if mode == "map" else probs  # Teacher Intervention "map": the teacher's P_t
    ctx = torch.matmul(quant(F.dropout(used, p=dropout, training=module.training)), v)
    ctx = next(teacher) if mode == "context" else ctx  # Teacher Intervention "context": the teacher's C_t
    record_attention(module, scores, probs, ctx)
    return ctx.transpose(1, 2).contiguous(), probs


def record_attention(module, scores, probs, ctx):
    """While forward_internals runs: append (A, P, C) to module.qatkd_record, each None unless kept."""
    record = getattr(module, "qatkd_record", None)
    if record is not None:
        keep = module.qatkd_keep
        # DEVIATION (masked scores): the scores are recorded without the additive mask; the original records
        # them with it and zeroes entries <= -100 in its score loss; score_loss masks padded keys explicitly
        record.append(tuple(t if name in keep else None for t, name in
                            ((scores, "scores"), (probs, "probs"), (ctx, "context"))))


def deberta_attention(module, hidden_states, attention_mask, output_attentions=False, query_states=None,
                      relative_pos=None, rel_embeddings=None):
    """DeBERTa-v2/v3 disentangled self-attention with the student's quantizers.

    DeBERTa does not use the attention interface: this replaces DisentangledSelfAttention.forward,
    the same operations in the same order as transformers', plus Q_a on Q, K, V and P.
    hidden_states: [B, S, d]; attention_mask: [B, 1, S, S] (1 = both tokens valid).
        Q, K, V <- Q_a(Q), Q_a(K), Q_a(V)                          [B*H, S, d_h]
        A = Q K^T / sqrt(3 d_h) + c2p(Q) + p2c(K)                  content and relative-position terms
        P = softmax(A masked);  C = Q_a(dropout(P)) V              [B, H, S, S], [B, H, S, d_h]
    Teacher Intervention and the record (A, P, C) as in qat_attention. Returns (ctx [B, S, d], P or None).
    DEVIATION (other families): the relative-position keys and queries (c2p, p2c) are quantized-weight
    projections of the position embeddings, not quantized again as activations: they depend on no input.
    """
    from transformers.models.deberta_v2.modeling_deberta_v2 import scaled_size_sqrt

    quant, heads = getattr(module, "quantize_act", None) or (lambda t: t), module.num_attention_heads
    query_states = hidden_states if query_states is None else query_states
    q = quant(module.transpose_for_scores(module.query_proj(query_states), heads))
    k = quant(module.transpose_for_scores(module.key_proj(hidden_states), heads))
    v = quant(module.transpose_for_scores(module.value_proj(hidden_states), heads))
    scale_factor = 1 + ("c2p" in module.pos_att_type) + ("p2c" in module.pos_att_type)
    scores = torch.bmm(q, k.transpose(-1, -2) / scaled_size_sqrt(q, scale_factor).to(dtype=q.dtype))
    if module.relative_attention:
        rel = module.pos_dropout(rel_embeddings)
        scores = scores + module.disentangled_attention_bias(q, k, relative_pos, rel, scale_factor)
    scores = scores.view(-1, heads, scores.size(-2), scores.size(-1))  # [B, H, S, S]
    probs = torch.softmax(scores.masked_fill(~attention_mask.bool(), torch.finfo(q.dtype).min), dim=-1)
    mode, teacher = getattr(module, "qatkd_feed", (None, None))  # Teacher Intervention, as in qat_attention
    dropped = F.dropout(next(teacher) if mode == "map" else probs, p=module.dropout.p, training=module.training)
    ctx = torch.matmul(quant(dropped.view(-1, probs.size(-2), probs.size(-1))), v)  # [B*H, S, d_h]
    ctx = next(teacher) if mode == "context" else ctx.view(probs.shape[:-1] + ctx.shape[-1:])  # [B, H, S, d_h]
    record_attention(module, scores, probs, ctx)
    ctx = ctx.permute(0, 2, 1, 3).contiguous()
    return ctx.view(*ctx.shape[:-2], -1), (probs if output_attentions else None)


# =============================================================================================
# 3. Student and internals
#
# One row per encoder family says where qatkd reads its internals. Nothing is guessed from module
# names: a family that is not in the table is refused.
# =============================================================================================


@dataclass(frozen=True)
class Family:
    """Where one encoder family (config.model_type) keeps what the KD losses read.

    attention   class of the self-attention module (it computes the scores and the softmax)
    output      the module whose output is the attention sub-layer output Y ("Class.attribute" for a
                child of Class), read from its input instead if tap="input"
    classifier  the task head's final projection, which stays full precision
    pre_ln      pre-LayerNorm layers: Y = X + MHA(LN(X)); else Y = LN(MHA(X) + X)
    interface   attention runs through transformers' attention interface (else deberta_attention)
    per_example every quantized input belongs to one example (DeBERTa's relative-position embeddings
                go through the same Linear layers as the tokens: no per-example scale for them)
    proj        the attention's output projection W_O ("Class.attribute"), read or replaced by Teacher
                Intervention
    qkv         the attention module's Q, K, V projections (one name: fused, output [Q | K | V])
    """

    attention: str
    output: str
    proj: str
    classifier: str = "classifier"
    tap: str = "output"
    pre_ln: bool = False
    interface: bool = True
    per_example: bool = True
    qkv: tuple = ("query", "key", "value")


# DEVIATION (other families): the original quantizes BERT only; every family here follows its rule, and a
# head's hidden dense layer (RoBERTa, ELECTRA, DistilBERT, ModernBERT, DeBERTa) is quantized as BERT's pooler
FAMILIES = {
    "bert": Family("BertSelfAttention", "BertSelfOutput", "BertSelfOutput.dense"),
    "roberta": Family("RobertaSelfAttention", "RobertaSelfOutput", "RobertaSelfOutput.dense", "classifier.out_proj"),
    "xlm-roberta": Family("XLMRobertaSelfAttention", "XLMRobertaSelfOutput", "XLMRobertaSelfOutput.dense",
                          "classifier.out_proj"),
    "camembert": Family("CamembertSelfAttention", "CamembertSelfOutput", "CamembertSelfOutput.dense",
                        "classifier.out_proj"),
    "electra": Family("ElectraSelfAttention", "ElectraSelfOutput", "ElectraSelfOutput.dense", "classifier.out_proj"),
    "mobilebert": Family("MobileBertSelfAttention", "MobileBertSelfOutput", "MobileBertSelfOutput.dense"),
    "distilbert": Family("DistilBertSelfAttention", "TransformerBlock.sa_layer_norm", "DistilBertSelfAttention.out_lin",
                         qkv=("q_lin", "k_lin", "v_lin")),
    # one shared layer; its attention ends with the LayerNorm
    "albert": Family("AlbertAttention", "AlbertAttention", "AlbertAttention.dense"),
    # pre-LN: the residual stream after attention is the input of the FFN's LayerNorm
    "modernbert": Family("ModernBertAttention", "ModernBertEncoderLayer.mlp_norm", "ModernBertAttention.Wo", tap="input",
                         pre_ln=True, qkv=("Wqkv",)),
    "deberta-v2": Family("DisentangledSelfAttention", "DebertaV2SelfOutput", "DebertaV2SelfOutput.dense",
                         interface=False, per_example=False, qkv=("query_proj", "key_proj", "value_proj")),  # also v3
}


def model_family(config):
    """The FAMILIES row of a model config; an unsupported architecture is refused in one line."""
    family = FAMILIES.get(config.model_type)
    if family is None:
        raise ValueError(f"qatkd does not support model type {config.model_type!r}; supported: {', '.join(FAMILIES)}")
    if getattr(config, "conv_kernel_size", 0) > 0:  # DeBERTa-v2 xlarge/xxlarge: a convolution beside layer 1
        raise ValueError(f"qatkd does not support {config.model_type} with a convolution layer (conv_kernel_size "
                         f"{config.conv_kernel_size}); DeBERTa-v2/v3 base and large have none")
    return family


def modules_of(model, spec):
    """Modules named by a Family field, in order: "Class" (every instance) or "Class.attribute"."""
    cls, _, attr = spec.partition(".")
    found = [m for m in model.modules() if type(m).__name__ == cls]
    return [getattr(m, attr) for m in found] if attr else found


def self_attention_modules(model):
    """The self-attention modules of a model, in layer order (ALBERT: its one shared module)."""
    return modules_of(model, model_family(model.config).attention)


def use_qatkd_attention(model):
    """Route a model's self-attention through qat_attention (deberta_attention for DeBERTa); idempotent.

    transformers 5 calls a custom attention function by the name it is registered under, and builds
    the padding mask with the mask function registered under the same name: without one it builds no
    mask at all and padded keys get attention silently. So the two are registered here, together.
    Until quantize_student gives the attention modules a quantizer nothing is quantized: a teacher
    computes what transformers' eager attention computes. Returns the model.
    """
    if not model_family(model.config).interface:
        for m in self_attention_modules(model):
            m.forward = types.MethodType(deberta_attention, m)  # an instance attribute: a deepcopy rebinds it
        return model
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register("qatkd", qat_attention)
    AttentionMaskInterface.register("qatkd", eager_mask)  # additive: 0 to keep, dtype-min to drop (and windows)
    if not model.config._attn_implementation.startswith("qatkd"):  # qatkd_int8: export's integer inference
        model.set_attn_implementation("qatkd")
    return model


ACT_SCALES = ("batch", "example")


def quantize_student(teacher, wbits=2, abits=8, act_quant=quantize_uniform, act_scale="batch"):
    """A quantized deep copy of a full-precision sequence classifier (the paper's W2A8 set-up).

    The same rule in every family (FAMILIES), as the original code quantizes BERT:
    - every nn.Linear -> QuantLinear(wbits, abits): attention, FFN, embedding projections, and the
      pooler or the head's hidden dense layer;
    - the word embedding -> row-wise quantized QuantEmbedding(wbits);
    - inside self-attention, Q, K, V and the attention probabilities after dropout -> abits;
    - full precision: the head's final projection (Family.classifier), LayerNorms, biases, position,
      token-type and relative-position embeddings.
    act_quant(x, bits): the activation quantizer of every Linear input and of Q, K, V, P. act_scale
    "batch": its scale per tensor over the whole batch, padding included (the original's); "example":
    quantize_per_example, the batch's attention_mask taken from each call. The latent weights start as
    the teacher's; with wbits = abits = 32 the student computes what the teacher does.
    """
    if wbits not in WEIGHT_BITS:
        raise ValueError(f"unsupported weight bit width {wbits}; use one of {WEIGHT_BITS}")
    if not (2 <= abits <= 16 or abits == 32):
        raise ValueError(f"unsupported activation bit width {abits}; use 2..16, or 32 for full precision")
    if act_scale not in ACT_SCALES:
        raise ValueError(f"unknown activation scale {act_scale!r}; use one of {ACT_SCALES}")
    if act_scale == "example" and act_quant is not quantize_uniform:
        raise ValueError("act_scale='example' quantizes with quantize_per_example; pass act_quant or act_scale, not both")
    family = model_family(teacher.config)
    if act_scale == "example" and not family.per_example:
        raise ValueError(f"per-example activation scales are not available for {teacher.config.model_type} (its "
                         "relative-position embeddings share the Linear layers of the tokens); use act_scale batch")
    student = use_qatkd_attention(copy.deepcopy(teacher))
    if act_scale == "example":  # each call's tokens, for quantize_per_example
        tokens = {}
        student.register_forward_pre_hook(lambda _m, _a, kw: tokens.update(mask=token_mask(kw)), with_kwargs=True)
        act_quant = lambda x, bits: quantize_per_example(x, bits, tokens["mask"])  # noqa: E731
    keep = student.get_submodule(family.classifier)
    for parent in list(student.modules()):
        for name, child in parent.named_children():
            if type(child) is nn.Linear and child is not keep:
                q = QuantLinear(child.in_features, child.out_features, child.bias is not None, wbits, abits, act_quant,
                                device="meta")
                q.weight, q.bias = child.weight, child.bias
                setattr(parent, name, q)
    emb = student.get_input_embeddings()
    qemb = QuantEmbedding(emb.num_embeddings, emb.embedding_dim, emb.padding_idx, wbits, device="meta")
    qemb.weight = emb.weight
    student.set_input_embeddings(qemb)
    for m in self_attention_modules(student):
        # DEVIATION (activation bits): abits governs Q, K, V and P too; the original always quantizes those to 8 bits
        m.quantize_act = None if abits == 32 else (lambda t, bits=abits: act_quant(t, bits))
    student.qatkd_bits = {"wbits": wbits, "abits": abits, "act_scale": act_scale}
    return student


def token_mask(inputs):
    """The [B, S] token mask of a model call's keyword inputs: attention_mask, or all ones."""
    mask = inputs.get("attention_mask")
    return torch.ones_like(inputs["input_ids"]) if mask is None else mask


@dataclass
class Internals:
    """What the KD losses read from one forward pass (N layers, C classes, H heads).

    logits         [B, C]
    hidden_states  N+1 x [B, S, d]      embedding output, then every layer's output
    attn_scores    N   x [B, H, S, S]   pre-softmax scores Q K^T / sqrt(d_h), without the mask
                                        (DeBERTa: content and relative-position terms together)
    attn_probs     N   x [B, H, S, S]   softmax probabilities, before dropout and quantization
    attn_outputs   N   x [B, S, d]      attention sub-layer output Y, the FFN's input: post-LN
                                        families LN(MHA(X) + X); pre-LN (ModernBERT) X + MHA(LN(X))
    attn_context   N   x [B, H, S, d_h] context C = Q_a(dropout(P)) V, per head      (Teacher Intervention)
    attn_proj      N   x [B, S, d]      W_O C + b, before dropout, residual and LayerNorm (Teacher Intervention)
    (an attn_* list is None when forward_internals did not keep it)
    """

    logits: torch.Tensor
    hidden_states: list
    attn_scores: list | None
    attn_probs: list | None
    attn_outputs: list | None
    attn_context: list | None = None
    attn_proj: list | None = None


MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def model_inputs(model, batch):
    """The entries of batch that the model takes (DistilBERT and ModernBERT take no token_type_ids)."""
    accepted = inspect.signature(getattr(model, "module", model).forward).parameters
    return {k: batch[k] for k in MODEL_INPUTS if k in batch and k in accepted}


def forward_internals(model, batch, keep=("scores", "probs", "outputs"), feed=None):
    """Run a teacher or student on batch (a dict with input_ids, attention_mask [, token_type_ids]).

    keep: which attention internals to record; a tensor per layer that the loss does not read need
    not stay in memory (KD_ATTENTION says which each loss reads). The internals leave the model two
    ways: each self-attention module holds a list, qatkd_record, for the length of the call, and its
    attention function appends (scores, probs, context) to it; hooks on the Family's output module and
    output projection collect the attention sub-layer outputs and W_O C + b. A model wrapped in
    DistributedDataParallel is called as is.
    feed: Teacher Intervention (phase 1), (mode, the teacher's Internals of this batch): see intervene.
    """
    net, model = model, getattr(model, "module", model)
    family = model_family(model.config)
    use_qatkd_attention(model)
    record, outputs, projected, hooks = [], [], [], []
    for m in (modules_of(model, family.output) if "outputs" in keep else ()):
        if family.tap == "input":
            hooks.append(m.register_forward_pre_hook(lambda _m, args: outputs.append(args[0])))
        else:
            hooks.append(m.register_forward_hook(lambda _m, _i, out: outputs.append(
                out[0] if isinstance(out, tuple) else out)))
    for m in (modules_of(model, family.proj) if "proj" in keep else ()):
        hooks.append(m.register_forward_hook(lambda _m, _i, out: projected.append(out)))
    attention = self_attention_modules(model)
    try:
        hooks += intervene(model, *feed) if feed else []
        for m in attention:
            m.qatkd_record, m.qatkd_keep = record, keep
        out = net(**model_inputs(model, batch), output_hidden_states=True)
    finally:
        for m in attention:
            del m.qatkd_record, m.qatkd_keep
            m.__dict__.pop("qatkd_feed", None)
        for h in hooks:
            h.remove()
    scores, probs, context = zip(*record) if record else ((), (), ())
    return Internals(out.logits, list(out.hidden_states),
                     list(scores) if "scores" in keep else None, list(probs) if "probs" in keep else None,
                     outputs if "outputs" in keep else None, list(context) if "context" in keep else None,
                     projected if "proj" in keep else None)


# Teacher Intervention (Kim et al., EACL 2023): which teacher tensor each mode feeds into the student
TI_FEED = {"map": "probs", "context": "context", "output": "proj"}


def intervene(student, mode, teacher):
    """Feed the teacher's tensors into the student's forward pass, layer by layer (TI's phase 1).

    teacher: the teacher's Internals of the same batch, holding TI_FEED[mode]. In layer i:
        map      C = Q_a(dropout(P_t[i])) V            Q, K read a detached input; V the live one
        context  C = C_t[i]                            Q, K, V read a detached input
        output   W_O C + b = O_t[i]  (then the student's own dropout, residual and LayerNorm; Q, K, V detached)
    The student's own scores and map are still computed (from the detached Q, K) for the losses, so Q
    and K learn only through the attention loss, and the layer input gets no gradient through them.
    Returns the hooks (forward_internals removes them after the call).
    DeBERTa: its query and key projections also project the relative-position embeddings; those read
    a detached input as well during phase 1.
    """
    if mode not in TI_FEED:
        raise ValueError(f"unknown Teacher Intervention mode {mode!r}; use one of {tuple(TI_FEED)}")
    family, tensors = model_family(student.config), getattr(teacher, f"attn_{TI_FEED[mode]}")
    if tensors is None:
        raise ValueError(f"Teacher Intervention {mode!r} needs the teacher's {TI_FEED[mode]}: keep it in forward_internals")
    feed, hooks = iter(tensors), []  # one tensor per layer, taken in the order the layers run
    detach = lambda _m, args: (args[0].detach(),) + args[1:]  # noqa: E731
    for attn in self_attention_modules(student):
        projections = [getattr(attn, name) for name in family.qkv]
        if mode == "map" and len(projections) == 1:  # fused [Q | K | V]: Q, K from the detached input
            hooks.append(projections[0].register_forward_hook(lambda m, args, out: torch.cat(
                [m.forward(args[0].detach())[..., :2 * out.size(-1) // 3], out[..., 2 * out.size(-1) // 3:]], -1)))
        else:
            hooks += [p.register_forward_pre_hook(detach) for p in projections[:2 if mode == "map" else 3]]
        if mode != "output":
            attn.qatkd_feed = (mode, feed)
    if mode == "output":
        hooks += [m.register_forward_hook(lambda _m, _i, _out: next(feed)) for m in modules_of(student, family.proj)]
    return hooks


# =============================================================================================
# 4. KD losses
#
# Each takes per-layer lists of [B, ...] tensors and the [B, S] attention mask (1 = token,
# 0 = padding) and sums over layers, as the official code does (no averaging over layers).
#
# DEVIATION (padding): the official code pads every batch to max_len and masks padding only in the
# map loss; its MSE terms average over padded positions too, so each is diluted by the batch's share
# of real tokens (the score term by its share of real query-key pairs). Here batches are padded only
# to their longest example and padding is excluded from every loss. include_padding=True, on batches
# padded to max_len (run.py --original_padding), gives every term the original's value.
#
# Reductions: the MSE terms pool over the batch's valid positions (a sample counts with its number of
# tokens, or for the score loss of query-key pairs); the map and prediction terms average per sample.
# =============================================================================================


def masked_mse(a, b, mask):
    """Mean of (a - b)^2 over the positions where mask is 1. a, b: [B, S, ...]; mask: [B, S]."""
    m = mask.to(a.dtype).reshape(*mask.shape, *([1] * (a.dim() - mask.dim())))
    return ((a - b) ** 2 * m).sum() / (m.sum() * a[0, 0].numel()).clamp_min(1)


def pred_loss(s_logits, t_logits, regression=False):
    """Prediction-layer distillation (TinyBERT Eq. 10, no temperature). s_logits, t_logits: [B, C].

    Classification: the official soft cross-entropy, mean_b -sum_c softmax(z_T)_c log softmax(z_S)_c,
    minus the teacher's entropy:  L_pred = mean_b KL(softmax(z_T) || softmax(z_S)).
    Regression (C = 1): MSE(z_S, z_T).
    """
    if regression:
        return F.mse_loss(s_logits, t_logits)
    # DEVIATION (prediction loss): reported as the KL (soft cross-entropy minus the teacher's entropy, a constant): the same
    # gradient as the original's, and zero when the student matches the teacher
    t_log = t_logits.log_softmax(-1)
    return (t_log.exp() * (t_log - s_logits.log_softmax(-1))).sum(-1).mean()


def rep_loss(s_hidden, t_hidden, mask, include_padding=False):
    """Hidden-state distillation (TinyBERT Eq. 8): L_rep = sum_{l=0..N} MSE(H_S^l, H_T^l).

    s_hidden, t_hidden: N+1 x [B, S, d] (embedding output and every layer's); mask: [B, S].
    MSE over the batch's valid tokens and d; include_padding: over all B*S*d entries, as the original.
    """
    mask = torch.ones_like(mask) if include_padding else mask
    return sum(masked_mse(s, t, mask) for s, t in zip(s_hidden, t_hidden))


def score_loss(s_scores, t_scores, mask, include_padding=False):
    """Attention-score distillation, the TernaryBERT baseline: L_score = sum_l MSE(A_S^l, A_T^l).

    s_scores, t_scores: N x [B, H, S, S] pre-softmax scores; mask: [B, S], L_b valid tokens of sample b:
        MSE^l = sum_b sum_h sum_{i, j < L_b} (A_S - A_T)^2 / (H * sum_b L_b^2)
    include_padding: as the original, zero the padded key columns and average over all B*H*S*S
    entries (padded query rows over valid keys included).
    """
    keys = mask[:, None, None, :].to(s_scores[0].dtype)  # [B, 1, 1, S]
    if include_padding:
        return sum((((s - t) * keys) ** 2).mean() for s, t in zip(s_scores, t_scores))
    pairs = mask[:, None, :, None].to(keys.dtype) * keys  # [B, 1, S, S]
    n = pairs.sum() * s_scores[0].size(1)
    return sum((((s - t) ** 2) * pairs).sum() / n for s, t in zip(s_scores, t_scores))


def map_loss(s_probs, t_probs, mask, eps=PROB_FLOOR):
    """Attention-map loss L_map (the paper's proposal): KL(teacher || student) per query row.

    s_probs, t_probs: N x [B, H, S, S] softmax probabilities (before dropout); mask: [B, S], L_b
    valid tokens of sample b; p = max(P, 1e-8):
        KL_{b,h} = (1 / L_b) sum_{i < L_b} sum_{j < L_b} p_T log(p_T / p_S)
        L_map = sum_l mean_{b,h} KL_{b,h}
    Padded keys and padded query rows are excluded, as in the official code (main.py:716-760).
    """
    m = mask.to(s_probs[0].dtype)
    pairs = m[:, None, :, None] * m[:, None, None, :]  # [B, 1, S, S]
    lengths = m.sum(-1)[:, None]  # [B, 1]
    total = 0.0
    for s, t in zip(s_probs, t_probs):
        p_t, p_s = t.clamp_min(eps), s.clamp_min(eps)
        kl = ((p_t.log() - p_s.log()) * p_t * pairs).sum((-1, -2))  # [B, H]
        total = total + (kl / lengths).mean()
    return total


def output_loss(s_outputs, t_outputs, mask, include_padding=False):
    """Attention-output loss L_out (the paper's proposal): L_out = sum_l MSE(Y_S^l, Y_T^l).

    Y^l = LN(MHA(X^l) + X^l): the attention sub-layer output after the residual add and LayerNorm,
    the FFN's input (pre-LN encoders: X^l + MHA(LN(X^l)), see Internals). s_outputs, t_outputs:
    N x [B, S, d]; mask: [B, S]. Reduced as rep_loss.
    """
    mask = torch.ones_like(mask) if include_padding else mask
    return sum(masked_mse(s, t, mask) for s, t in zip(s_outputs, t_outputs))


KD_MODES = ("pred", "score", "map", "output", "unified")
# the attention internals each mode's loss reads (forward_internals keeps only these during QAT)
KD_ATTENTION = {"pred": (), "score": ("scores",), "map": ("probs",), "output": ("outputs",),
                "unified": ("probs", "outputs")}


def kd_loss(student, teacher, mask, kd="map", map_coeff=1.0, output_coeff=1.0, regression=False,
            include_padding=False):
    """The QAT objective (official main.py:769): prediction + hidden states + an attention term.

    student, teacher: Internals; mask: [B, S]. kd selects the attention term:
        pred     L_pred + L_rep                                   (no attention term: an ablation)
        score    L_pred + L_rep + L_score                         (TernaryBERT baseline)
        map      L_pred + L_rep + map_coeff * L_map               (the paper's attention-map loss)
        output   L_pred + L_rep + output_coeff * L_out            (the paper's attention-output loss)
        unified  L_pred + L_rep + map_coeff * L_map + output_coeff * L_out
    Returns (total, {term name: value}).
    """
    if kd not in KD_MODES:
        raise ValueError(f"unknown KD mode {kd!r}; use one of {KD_MODES}")
    for name in KD_ATTENTION[kd]:
        if getattr(student, f"attn_{name}") is None or getattr(teacher, f"attn_{name}") is None:
            raise ValueError(f"kd={kd!r} needs the attention {name}: call forward_internals with "
                             f"keep={KD_ATTENTION[kd]}")
    terms = {"pred": pred_loss(student.logits, teacher.logits, regression),
             "rep": rep_loss(student.hidden_states, teacher.hidden_states, mask, include_padding)}
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
# 5. Optimizer and training
# =============================================================================================


@dataclass
class TrainConfig:
    """The optimisation settings of teacher fine-tuning and QAT: the official main.py's defaults."""

    epochs: float = 3.0
    lr: float = 2e-5
    batch_size: int = 32  # 16 for CoLA
    warmup: float = 0.1  # fraction of the steps with linear warm-up, then linear decay to 0
    weight_decay: float = 0.01  # on matrices only, not on biases and LayerNorms
    max_grad_norm: float = 1.0
    optimizer: str = "bertadam"  # "bertadam" (the official code's) or "adamw" (torch's)
    eval_every: int = 0  # evaluate every N steps; 0: only after the last step
    max_steps: int = 0  # 0: the epochs decide
    seed: int = 42  # data order; dropout draws from the global generator, seeded by the caller
    pad_id: int = 0
    pad_to: int = 0  # 0: pad each batch to its longest example; else to this length (the original: max_len)
    ti: str = ""  # Teacher Intervention (TI_MODES) for the first ti_steps steps, then a fresh optimizer; "": none
    ti_steps: int = 0

    def total_steps(self, n_train):
        steps = math.ceil(self.epochs * math.ceil(n_train / self.batch_size))
        return min(steps, self.max_steps) if self.max_steps else steps

    def phase_steps(self, total, step):
        """The number of steps of the optimizer and schedule that train step `step` (0-based): all of
        them, or with Teacher Intervention phase 1's ti_steps and phase 2's total - ti_steps."""
        return total if not self.ti else self.ti_steps if step < self.ti_steps else total - self.ti_steps


TI_MODES = ("gradual",) + tuple(TI_FEED)


def ti_mode(ti, step, ti_steps):
    """Teacher Intervention's mode at training step `step` (0-based); None in phase 2 or without TI.

    A single mode (map, context, output) holds for all of phase 1. gradual, the paper's: output for
    the first ti_steps / 6 steps, context for the next ti_steps / 6, map for the remaining 2/3
    (ti_steps 60: steps 0-9, 10-19, 20-59). Unclear in the authors' code for a ti_steps that 6 does
    not divide: here ti_steps // 6 each.
    """
    if not ti or step >= ti_steps:
        return None
    if ti != "gradual":
        return ti
    return "output" if step < ti_steps // 6 else "context" if step < 2 * (ti_steps // 6) else "map"


class BertAdam(torch.optim.Optimizer):
    """The official code's optimizer (TernaryBERT's transformer/optimization.py), per parameter tensor:

        g <- g * min(1, max_grad_norm / ||g||)       each tensor clipped on its own
        m <- b1 m + (1 - b1) g;   v <- b2 v + (1 - b2) g^2
        p <- p - lr * (m / (sqrt(v) + eps) + weight_decay * p)
    Adam with decoupled weight decay and no bias correction, so its early updates are larger than
    Adam's by (1 - b1^t) / sqrt(1 - b2^t). lr is the scheduled rate (make_optimizer).
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


def warmup_linear(step, total, warmup):
    """The learning-rate multiplier of step `step` (0-based) of `total`, as the original's
    WarmupLinearSchedule: linear warm-up over the first `warmup` fraction of the steps, then linear
    decay to 0 at the last step:
        p = step / total;     p / warmup  if p < warmup,  else  max((p - 1) / (warmup - 1), 0)
    The warm-up is fractional: with 345 steps and warmup 0.1 it spans 34.5 steps (step 34: 34 / 34.5).
    """
    p = step / total
    return p / warmup if p < warmup else max((p - 1.0) / (warmup - 1.0), 0.0)


def make_optimizer(model, cfg, total_steps):
    """The optimizer (eps 1e-6, weight decay on matrices only) and its schedule (warmup_linear).

    cfg.optimizer "bertadam": the official BertAdam (no bias correction, per-tensor clipping);
    "adamw": torch's AdamW (bias correction), with one global clip applied by train().
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
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda step: warmup_linear(step, total_steps, cfg.warmup))


def collate(features, pad_id=0, pad_to=None):
    """Pad features (dicts of token lists and a label) to the longest of them, or to pad_to tokens
    -> a dict of tensors [B, S] and labels [B]."""
    longest = pad_to or max(len(f["input_ids"]) for f in features)
    batch = {k: torch.tensor([f[k] + [pad_id if k == "input_ids" else 0] * (longest - len(f[k])) for f in features])
             for k in MODEL_INPUTS if k in features[0]}
    regression = isinstance(features[0]["labels"], float)
    batch["labels"] = torch.tensor([f["labels"] for f in features], dtype=torch.float if regression else torch.long)
    return batch


def batches(features, batch_size, pad_id=0, shuffle=False, seed=0, start=0, device="cpu", pad_to=None):
    """Padded batches (collate) on `device`, from batch number `start` on. shuffle: in the order of a
    torch generator seeded with `seed`, so one seed gives one order, and a resumed epoch the same."""
    # DEVIATION (padding): padded to the batch's longest example; the original pads to max_len (section 4).
    # DEVIATION (data order): each epoch is shuffled by its own generator (seed + epoch, training_batches),
    # not by the global one, so that a resumed run continues in the same order
    order = torch.randperm(len(features), generator=torch.Generator().manual_seed(seed)) if shuffle \
        else torch.arange(len(features))
    for i in range(start * batch_size, len(features), batch_size):
        batch = collate([features[j] for j in order[i:i + batch_size].tolist()], pad_id, pad_to)
        yield {k: v.to(device) for k, v in batch.items()}


def training_batches(train_feats, cfg, step, device="cpu"):
    """(epoch, batch) for training steps `step` to cfg.total_steps: epochs in a seeded order (cfg.seed + epoch)."""
    total, per_epoch = cfg.total_steps(len(train_feats)), math.ceil(len(train_feats) / cfg.batch_size)
    while step < total:
        epoch, skip = divmod(step, per_epoch)
        for batch in batches(train_feats, cfg.batch_size, cfg.pad_id, True, cfg.seed + epoch, skip, device,
                             cfg.pad_to or None):
            yield epoch, batch
            step += 1
            if step == total:
                return


def new_loop_state():
    """train()'s state before step 1: what a checkpoint stores besides weights and optimizer."""
    return {"step": 0, "seconds": 0.0, "eval_seconds": 0.0, "best": None, "best_step": None, "last": None,
            "last_step": None}


def train(model, loss_fn, train_feats, cfg, evaluate_fn=None, metric="acc", log=print, desc="train",
          opt=None, sched=None, state=None, after_step=None, progress=None):
    """The training loop of teacher fine-tuning and QAT (official main.py).

    Each step: loss, terms = loss_fn(model, batch); backward; (AdamW: one global gradient clip);
    opt.step(); sched.step(); log({"step", "epoch", "lr", "loss", term: value ...}). With Teacher
    Intervention (cfg.ti) the first cfg.ti_steps steps call loss_fn(model, batch, mode) (ti_mode), and
    phase 2 starts with a fresh optimizer and schedule over the remaining steps. A non-finite loss
    stops training with FloatingPointError naming the step and the term. Every cfg.eval_every steps
    and after the last step, evaluate_fn() -> {metric: value} is logged, and the last and the best
    evaluations are kept (best on `metric`: the first best, never an undefined NaN).
    opt, sched, state: an optimizer, schedule and loop state to continue from (runtime.py restores
    them from a checkpoint); by default new ones (make_optimizer, new_loop_state). after_step(state,
    opt, sched) runs after every step (runtime.py checkpoints there). progress(total=, initial=,
    desc=): the progress bar, tqdm's by default. Returns the loop state, with seconds_per_step (training time
    per step, evaluations excluded).
    """
    from tqdm.auto import tqdm

    progress = progress or (lambda **kw: tqdm(dynamic_ncols=True, **kw))
    total = cfg.total_steps(len(train_feats))
    if cfg.ti and not 0 < cfg.ti_steps < total:
        raise ValueError(f"Teacher Intervention's {cfg.ti_steps} phase-1 steps leave no phase 2 in {total} steps")
    state = state or new_loop_state()
    if opt is None:
        opt, sched = make_optimizer(model, cfg, cfg.phase_steps(total, state["step"]))
    start = time.time() - state["seconds"]
    model.train()
    with progress(total=total, initial=state["step"], desc=desc) as bar:
        for epoch, batch in training_batches(train_feats, cfg, state["step"], next(model.parameters()).device):
            if cfg.ti and state["step"] == cfg.ti_steps:  # TI phase 2: ordinary KD-QAT with a fresh optimizer
                opt, sched = make_optimizer(model, cfg, total - cfg.ti_steps)
            mode = ti_mode(cfg.ti, state["step"], cfg.ti_steps)
            loss, terms = loss_fn(model, batch, mode) if mode else loss_fn(model, batch)
            values = {k: float(v.detach()) for k, v in {"loss": loss, **terms}.items()}
            if not math.isfinite(values["loss"]):
                bad = [k for k in terms if not math.isfinite(values[k])] or ["total"]
                raise FloatingPointError(f"loss is {values['loss']} at step {state['step'] + 1} (term: {', '.join(bad)})")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.optimizer == "adamw":  # BertAdam clips each tensor itself
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            opt.step()
            sched.step()
            state["step"] += 1
            bar.update(1)
            bar.set_postfix(loss=f"{values['loss']:.4f}")
            log({"step": state["step"], "epoch": epoch, "lr": sched.get_last_lr()[0], **values,
                 **({"ti": mode} if mode else {})})
            if evaluate_fn is not None and ((cfg.eval_every and state["step"] % cfg.eval_every == 0)
                                            or state["step"] == total):
                # DEVIATION (evaluation): the original's last evaluation is at step total - 1, and a run whose metric never
                # exceeds 0 crashes; here the last one follows the last step, and best and last are both kept
                evaluate_and_select(evaluate_fn, metric, state, log, bar.write)
            state["seconds"] = time.time() - start
            if after_step is not None:
                after_step(state, opt, sched)
    return {**state, "seconds_per_step": (state["seconds"] - state["eval_seconds"]) / max(1, state["step"])}


def evaluate_and_select(evaluate_fn, metric, state, log=print, write=print):
    """Evaluate, log, and keep in state the last and the best evaluation (on `metric`; NaN never best)."""
    begin = time.time()
    metrics = evaluate_fn()
    state["eval_seconds"] += time.time() - begin
    undefined = [k for k, v in metrics.items() if math.isnan(v)]  # e.g. the correlation of constant predictions
    log({"step": state["step"], "eval": metrics, **({"undefined": undefined} if undefined else {})})
    state.update(last=metrics, last_step=state["step"])
    if undefined:
        state.setdefault("undefined_steps", []).append(state["step"])
    if not math.isnan(metrics[metric]) and (state["best"] is None or metrics[metric] > state["best"][metric]):
        state.update(best=metrics, best_step=state["step"])
    write(f"step {state['step']}: " + "  ".join(f"{k} {100 * v:.2f}" for k, v in metrics.items()))


# =============================================================================================
# 6. Teacher and QAT
# =============================================================================================


def teacher_loss_fn(regression=False):
    """loss_fn(model, batch) for train() that fine-tunes a full-precision teacher on the ground truth:
    cross-entropy, or MSE for regression. (The original gives no teacher recipe; it points to Hugging
    Face's run_glue, whose optimizer, AdamW, the command line uses: TrainConfig(optimizer="adamw").)"""

    def loss_fn(model, b):
        logits = model(**model_inputs(model, b)).logits
        loss = F.mse_loss(logits.squeeze(-1), b["labels"]) if regression else F.cross_entropy(logits, b["labels"])
        return loss, {"gt": loss}

    return loss_fn


def qat_loss_fn(teacher, kd="map", map_coeff=1.0, output_coeff=1.0, gt_coeff=0.0, regression=False,
                include_padding=False):
    """loss_fn(student, batch) for train(): the teacher's forward without a graph, the student's, kd_loss.

    loss_fn(student, batch, intervention): Teacher Intervention's phase 1 (a TI_FEED mode): the same
    losses, the teacher's tensors fed into the student's forward pass (intervene).

    gt_coeff > 0 adds gt_coeff * the cross-entropy (MSE for regression) with the labels; the paper
    distils only (0). DEVIATION (ground-truth loss): the original's ground-truth term is a summed NLL, and its regression
    branch compares with the teacher's logits; here it is a mean over the batch, against the labels.
    """
    if kd not in KD_MODES:
        raise ValueError(f"unknown KD mode {kd!r}; use one of {KD_MODES}")
    teacher.eval()

    def loss_fn(student, b, intervention=None):
        keep = KD_ATTENTION[kd]
        with torch.no_grad():  # the teacher is fixed: no graph, no saved activations
            t = forward_internals(teacher, b, keep + ((TI_FEED[intervention],) if intervention else ()))
        s = forward_internals(student, b, keep, feed=(intervention, t) if intervention else None)
        loss, terms = kd_loss(s, t, b["attention_mask"], kd, map_coeff, output_coeff, regression, include_padding)
        if gt_coeff:
            logits = s.logits.squeeze(-1) if regression else s.logits
            terms["gt"] = (F.mse_loss if regression else F.cross_entropy)(logits, b["labels"])
            loss = loss + gt_coeff * terms["gt"]
        return loss, terms

    return loss_fn
