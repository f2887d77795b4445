"""Attention-recovery diagnostics: how far the student's self-attention is from the teacher's, per layer.

The paper's analysis (Sec. 4, Fig. 4): the attention-map KL and attention-output error that its
losses minimise, and the two distances of its analysis notebook (Exp1), the ranking loss and the
cover length, measured on dev data for the quantized student before QAT (PTQ) and after.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from qatkd import batches, forward_internals, map_loss, output_loss

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
        cover_length  cover length of the teacher's top-5    } examples (cost grows as S^3; NaN for none)
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
    return {name: [v / counts[per[name]] if counts[per[name]] else math.nan for v in values]
            for name, values in sums.items()}


def print_recovery(ptq, qat):
    """Per-layer table: each measure as PTQ -> QAT."""
    names = [n for n in DIAGNOSTICS if n in ptq]
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
    names = [n for n in DIAGNOSTICS if n in ptq]
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
