"""Core-tuning: contrast-regularized fine-tuning (Zhang et al., NeurIPS 2021, arXiv 2102.06605).

Core-tuning adds to the classification loss a focal supervised-contrastive loss on a small contrast head, and trains
the classifier on hardness-directed mixup features as well, which smooths its decision boundary. This module follows
the paper and the authors' reference code (github.com/Vanint/Core-tuning, ``Core-tuning.py``); where the two differ
from each other or from what is written here, the docstring of the function says which one we follow and why.

Everything works on pooled backbone features ``f`` [B, D] (for a timm model: ``forward_head(..., pre_logits=True)``)
and the model's own classifier, so the backbone is any timm model.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.loss import SoftTargetCrossEntropy


class ContrastHead(nn.Module):
    """The contrast head g: Linear(D, D) -> ReLU -> Linear(D, out), L2-normalized, as in the reference code."""

    def __init__(self, dim: int, out_dim: int = 256) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, dim)
        self.fc2 = nn.Linear(dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.fc2(F.relu(self.fc1(x))), dim=-1)


def focal_supcon_loss(
    z: torch.Tensor, labels: torch.Tensor, temperature: float = 0.07, gamma: float = 1.0
) -> torch.Tensor:
    """Focal supervised contrastive loss, Core-tuning's L_con.

    For L2-normalized embeddings ``z`` [N, K] and integer ``labels`` [N]:

        P_ip = exp(z_i.z_p / t) / sum_{a != i} exp(z_i.z_a / t)
        L_i  = -1/N * sum_{p in P(i)} (1 - P_ip)^gamma * log P_ip,   P(i) = {p != i : y_p = y_i}
        L    = mean of L_i over the anchors i with |P(i)| > 0   (anchors without a positive are skipped)

    The scale is the reference code's (``focal_SupConLoss``: ``(weight * mask * log_prob).mean(1)``, i.e. a sum over
    the positives divided by the batch size N, then summed and divided by the anchors that have a positive), so an
    eta means what it means there: its README's ``--eta_weight 0.1`` is our default. The paper writes 1/|P(i)|
    instead of 1/N; with Core-tuning's 3B rows (most mixed rows have no positive) that is N/|P(i)| times larger,
    28-40x on B=64, 10-class batches, which would make eta 0.1 act like eta 3 or more.
    gamma = 1 is what the reference code uses (its weight is ``1 - exp(log_prob)``, no exponent); gamma = 0 gives the
    plain SupCon loss (Khosla et al. 2020, L_out). The focal weight is not detached, as in the reference code. Its
    ``temperature / base_temperature`` factor is 1 at the defaults, so it is left out.
    """
    z = z.float()
    n = z.shape[0]
    self_mask = torch.eye(n, dtype=torch.bool, device=z.device)
    logits = z @ z.T / temperature
    # The denominator runs over a != i; self entries keep finite values so that no -inf * 0 reaches autograd.
    log_norm = torch.logsumexp(logits.masked_fill(self_mask, float("-inf")), dim=1, keepdim=True)
    log_prob = logits - log_norm
    pos = (labels.view(-1, 1) == labels.view(1, -1)) & ~self_mask
    prob = log_prob.masked_fill(self_mask, float("-inf")).exp()  # P_ia, 0 on the diagonal
    weight = (1.0 - prob).clamp_min(0.0).pow(gamma)
    term = torch.where(pos, weight * log_prob, torch.zeros_like(log_prob))
    has_pos = pos.any(1)
    if not bool(has_pos.any()):
        return z.sum() * 0.0  # no anchor has a positive: no signal, but keep the graph
    per_anchor = -term.sum(1)[has_pos] / n
    return per_anchor.mean()


@torch.no_grad()
def hardest_pairs(z: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of each anchor's hardest positive and hardest negative, by cosine similarity.

    Hardest positive: same label, not itself, lowest cosine. Hardest negative: other label, highest cosine.
    An anchor with no positive (alone in its class in the batch) or no negative (a one-class batch) gets itself, as
    the reference code does for positives; mixing with itself then just reproduces the anchor. Unlike the reference
    code, the similarities are masked with +-inf, not multiplied by 0, so a pair outside the set can never win.
    """
    zn = F.normalize(z.float(), dim=1)
    sim = zn @ zn.T
    n = z.shape[0]
    idx = torch.arange(n, device=z.device)
    same = labels.view(-1, 1) == labels.view(1, -1)
    pos_mask = same & ~torch.eye(n, dtype=torch.bool, device=z.device)
    neg_mask = ~same
    pos_idx = sim.masked_fill(~pos_mask, float("inf")).argmin(1)
    neg_idx = sim.masked_fill(~neg_mask, float("-inf")).argmax(1)
    pos_idx = torch.where(pos_mask.any(1), pos_idx, idx)
    neg_idx = torch.where(neg_mask.any(1), neg_idx, idx)
    return pos_idx, neg_idx


def sample_beta(n: int, alpha: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """n draws of Beta(alpha, alpha), reproducible from a torch.Generator.

    torch's Beta distribution takes no generator, so a 63-bit seed is drawn from ``generator`` and numpy's Beta
    sampler does the rest. Returns float32 on the CPU.
    """
    device = generator.device if generator is not None else "cpu"
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=device).item())
    return torch.from_numpy(np.random.default_rng(seed).beta(alpha, alpha, size=n)).float()


def sample_mixup_lambdas(
    n: int, alpha: float = 1.0, generator: torch.Generator | None = None, neg_anchor_max: float = 0.2
) -> tuple[torch.Tensor, torch.Tensor]:
    """(lam_neg, lam_pos), each [n], for ``hardness_mixup``.

    lam_pos ~ Beta(alpha, alpha). lam_neg = min(Beta(alpha, alpha), neg_anchor_max) is the anchor's share in a hard
    negative; the reference code draws the negative's share as max(Beta, 0.8), which is the same distribution since
    Beta(alpha, alpha) is symmetric. A small anchor share keeps the mix a negative that sits close to the anchor.
    """
    lam_neg = sample_beta(n, alpha, generator).clamp_max(neg_anchor_max)
    lam_pos = sample_beta(n, alpha, generator)
    return lam_neg, lam_pos


def hardness_mixup(
    features: torch.Tensor,
    labels_onehot: torch.Tensor,
    pos_idx: torch.Tensor,
    neg_idx: torch.Tensor,
    lam_neg: torch.Tensor | float,
    lam_pos: torch.Tensor | float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hardness-directed mixup: hard negatives and hard positives in feature space, with soft labels.

    For anchor i with hardest positive p(i) and hardest negative n(i) (see ``hardest_pairs``):

        rows 0..B-1   (hard negatives):  f = lam_neg_i f_i    + (1 - lam_neg_i) f_n(i),  y likewise
        rows B..2B-1  (hard positives):  f = lam_pos_i f_p(i) + (1 - lam_pos_i) f_n(i),  y likewise

    The hard positive mixes the hardest positive with the hardest negative, as in the paper and the reference code
    (mixing the anchor with its positive would make an easy positive). The hard negative's partner n(i) is the anchor's
    hardest negative (most similar other-class sample); the reference code instead mixes each anchor with a random
    shuffle of the batch (``random.shuffle(order)``, a partner that may even share its class) and uses the hardest
    negative only in the hard positives. Returns (mixed [2B, D], soft labels [2B, C]); soft-label rows sum to 1
    whenever the one-hot rows do. Gradients flow into ``features``.
    """
    b = features.shape[0]
    lam_neg = torch.as_tensor(lam_neg, dtype=features.dtype, device=features.device).expand(b).reshape(b, 1)
    lam_pos = torch.as_tensor(lam_pos, dtype=features.dtype, device=features.device).expand(b).reshape(b, 1)
    y = labels_onehot.to(features.dtype)
    f_neg, y_neg = features[neg_idx], y[neg_idx]
    mixed = torch.cat([lam_neg * features + (1 - lam_neg) * f_neg, lam_pos * features[pos_idx] + (1 - lam_pos) * f_neg])
    soft = torch.cat([lam_neg * y + (1 - lam_neg) * y_neg, lam_pos * y[pos_idx] + (1 - lam_pos) * y_neg])
    return mixed, soft


class CoreTuningOutput(NamedTuple):
    """The total loss, its two parts (for logging) and the logits of the un-mixed features (for accuracy)."""

    loss: torch.Tensor
    ce: torch.Tensor
    con: torch.Tensor
    logits: torch.Tensor


class CoreTuningLoss(nn.Module):
    """Core-tuning's objective; owns the contrast head, borrows the model's classifier at call time.

    With B pooled features f, integer labels y (one-hot Y, optionally label-smoothed) and the mixup of
    ``hardness_mixup`` (2B rows F~, Y~), let F* = [f; F~] and Y* = [Y; Y~] (3B rows). Then

        L_ce  = mean over the 3B rows of  -sum_c Y*_c log softmax(classifier(F*))_c
        L_con = focal_supcon_loss(contrast_head(F*), ids(Y*), temperature, gamma)
        loss  = L_ce + eta * L_con

    L_ce is the ordinary CE on the B real rows plus the smooth-classifier soft-target CE on the 2B mixed rows, one
    classifier for both, averaged together, as the reference code does ((1/3) CE + (2/3) smooth CE). ``ids(Y*)``
    gives equal ids to equal soft-label rows (the reference code's LabelEncoder over soft labels): real samples of
    a class are positives of each other, and a mixed row is a positive only of an identical mix, otherwise it acts
    as a negative for everyone. Unlike the reference code, the real rows are not detached from the backbone, and
    each hard negative mixes the anchor with its hardest negative, not with a random shuffle of the batch. L_con has
    the reference code's scale (see ``focal_supcon_loss``), so the default eta 0.1 is its README's.
    """

    def __init__(
        self,
        feature_dim: int,
        contrast_dim: int = 256,
        eta: float = 0.1,
        alpha: float = 1.0,
        temperature: float = 0.07,
        gamma: float = 1.0,
        label_smoothing: float = 0.0,
        neg_anchor_max: float = 0.2,
    ) -> None:
        super().__init__()
        self.contrast_head = ContrastHead(feature_dim, contrast_dim)
        self.eta = eta
        self.alpha = alpha
        self.temperature = temperature
        self.gamma = gamma
        self.label_smoothing = label_smoothing
        self.neg_anchor_max = neg_anchor_max

    def forward(
        self,
        features: torch.Tensor,
        labels: torch.Tensor,
        classifier: nn.Module,
        generator: torch.Generator | None = None,
    ) -> CoreTuningOutput:
        """features [B, D] (pre-logits), labels [B] int, classifier: the model's head (e.g. ``model.head``)."""
        logits = classifier(features)
        num_classes = logits.shape[-1]
        y = F.one_hot(labels, num_classes).to(features.dtype)
        if self.label_smoothing:
            y = y * (1 - self.label_smoothing) + self.label_smoothing / num_classes
        pos_idx, neg_idx = hardest_pairs(features.detach(), labels)
        lam_neg, lam_pos = sample_mixup_lambdas(features.shape[0], self.alpha, generator, self.neg_anchor_max)
        mixed, y_mixed = hardness_mixup(
            features, y, pos_idx, neg_idx, lam_neg.to(features.device), lam_pos.to(features.device)
        )
        all_f = torch.cat([features, mixed])
        all_y = torch.cat([y, y_mixed])
        all_logits = torch.cat([logits, classifier(mixed)])
        ce = SoftTargetCrossEntropy()(all_logits.float(), all_y)
        ids = torch.unique(all_y.detach(), dim=0, return_inverse=True)[1]
        con = focal_supcon_loss(self.contrast_head(all_f), ids, self.temperature, self.gamma)
        return CoreTuningOutput(ce + self.eta * con, ce.detach(), con.detach(), logits)
