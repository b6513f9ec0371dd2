"""DeiT-style distillation through a distillation token (Touvron et al. 2021, arXiv 2012.12877).

``deit_loss`` is DeiT's ``DistillationLoss`` as a pure function. ``DistilledClassifier`` adds a distillation token
and head to a timm ``Beit`` without touching its weights or state-dict keys, so the fine-tuned backbone still loads
into timm.

Relative position bias for the extra token: Beit has no absolute position for its CLS token; its bias tables hold
three extra entries (cls->token, token->cls, cls->cls) on top of the patch-to-patch entries. The distillation token
reuses CLS's entries: for the token order [cls, dist, patches] the bias is the [cls, patches] bias with CLS's row and
column repeated, so dist->patch = cls->patch, patch->dist = patch->cls, and every prefix-prefix pair (cls<->dist,
dist->dist) = cls->cls. No new parameters; gradients of the dist token's bias go to the CLS entries of the same
table. The shared bias is expanded before it is passed to the blocks; for per-block tables each block's attention
gets a ``_get_rel_pos_bias`` that returns the expanded bias (an instance attribute, so the class is untouched).
"""

from __future__ import annotations

import types

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from timm.layers import trunc_normal_
from timm.models.beit import Beit


def deit_loss(
    cls_logits: torch.Tensor,
    dist_logits: torch.Tensor,
    targets: torch.Tensor,
    teacher_logits: torch.Tensor,
    kind: str = "soft",
    tau: float = 3.0,
    alpha: float = 0.5,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """DeiT's distillation loss: (1 - alpha) * CE(cls, targets) + alpha * distillation term.

    ``targets`` are class indices [B] or soft targets [B, C] (timm mixup/cutmix); the base CE handles both.
    soft: tau^2 * KL(softmax(teacher/tau) || softmax(dist/tau)), summed and divided by ``dist_logits.numel()``
    (= B*C), exactly as DeiT computes ``F.kl_div(..., reduction='sum', log_target=True) * tau*tau / numel``.
    hard: CE(dist, argmax teacher); at DeiT's default alpha = 0.5 this is 0.5*CE(cls, y) + 0.5*CE(dist, y_t).
    The teacher logits are detached.
    """
    if targets.ndim == 2:
        base = -(targets * F.log_softmax(cls_logits, dim=-1)).sum(-1).mean()
    else:
        base = F.cross_entropy(cls_logits, targets, label_smoothing=label_smoothing)
    teacher_logits = teacher_logits.detach()
    if kind == "soft":
        distill = (
            F.kl_div(
                F.log_softmax(dist_logits / tau, dim=1),
                F.log_softmax(teacher_logits / tau, dim=1),
                reduction="sum",
                log_target=True,
            )
            * (tau * tau)
            / dist_logits.numel()
        )
    elif kind == "hard":
        distill = F.cross_entropy(dist_logits, teacher_logits.argmax(dim=1))
    else:
        raise ValueError(f"deit_loss kind must be 'soft' or 'hard', not {kind!r}")
    return base * (1 - alpha) + distill * alpha


def expand_prefix_bias(bias: torch.Tensor, extra: int = 1) -> torch.Tensor:
    """Give ``extra`` new prefix tokens, placed right after CLS, CLS's relative position bias.

    ``bias`` [..., 1+P, 1+P] (token order [cls, patches]) -> [..., 1+extra+P, 1+extra+P] (order [cls, new, patches]).
    """
    n = bias.shape[-1]
    idx = torch.cat(
        [torch.zeros(1 + extra, dtype=torch.long, device=bias.device), torch.arange(1, n, device=bias.device)]
    )
    return bias.index_select(-2, idx).index_select(-1, idx)


def _prefix_expanded_rel_pos_bias(attn: nn.Module) -> torch.Tensor:
    """Replacement for a Beit Attention's ``_get_rel_pos_bias``: the class's bias, expanded for the dist token."""
    return expand_prefix_bias(type(attn)._get_rel_pos_bias(attn), attn.fd_extra_prefix_tokens)


class DistilledClassifier(nn.Module):
    """A timm Beit with a DeiT distillation token after CLS and a distillation head.

    Token order is [cls, dist, patches]. The class head keeps the backbone's pooling: with ``global_pool='avg'``
    it mean-pools the patch tokens only (the dist token is excluded), otherwise it takes CLS. The dist head reads
    the dist token. Both go through the backbone's final norms (``norm`` then ``fc_norm``), as DeiT runs CLS and dist
    through one final norm. Train mode returns (cls_logits, dist_logits); eval mode returns their average, as DeiT.

    The backbone's blocks are changed in place to expect the extra token (see the module docstring), so after
    wrapping, run the backbone only through this wrapper. ``backbone.state_dict()`` is unchanged in keys and shapes.
    """

    num_prefix_tokens = 2

    def __init__(self, backbone: Beit, num_classes: int | None = None) -> None:
        super().__init__()
        if not isinstance(backbone, Beit):
            raise TypeError(f"DistilledClassifier wraps a timm Beit, not {type(backbone).__name__}")
        num_classes = backbone.num_classes if num_classes is None else num_classes
        if num_classes <= 0:
            raise ValueError("DistilledClassifier needs a backbone with a classifier head (num_classes > 0)")
        if backbone.num_classes != num_classes:
            backbone.reset_classifier(num_classes)
        self.backbone = backbone
        self.num_classes = num_classes
        dim = backbone.embed_dim
        self.dist_token = nn.Parameter(torch.zeros(1, 1, dim))
        trunc_normal_(self.dist_token, std=0.02)
        self.head_dist = nn.Linear(dim, num_classes)
        trunc_normal_(self.head_dist.weight, std=0.02)
        nn.init.zeros_(self.head_dist.bias)
        for blk in backbone.blocks:
            if blk.attn.relative_position_bias_table is not None:
                blk.attn.fd_extra_prefix_tokens = 1
                blk.attn._get_rel_pos_bias = types.MethodType(_prefix_expanded_rel_pos_bias, blk.attn)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images -> tokens [B, 2 + P, D] after the last block and ``norm``."""
        bb = self.backbone
        x = bb.patch_embed(x)
        b = x.shape[0]
        cls = bb.cls_token.expand(b, -1, -1)
        dist = self.dist_token.expand(b, -1, -1)
        if bb.pos_embed is not None:  # an absolute table has one prefix slot: the dist token shares CLS's
            cls = cls + bb.pos_embed[:, :1]
            dist = dist + bb.pos_embed[:, :1]
            x = x + bb.pos_embed[:, 1:]
        x = bb.pos_drop(torch.cat([cls, dist, x], dim=1))
        rel_pos_bias = expand_prefix_bias(bb.rel_pos_bias()) if bb.rel_pos_bias is not None else None
        for blk in bb.blocks:
            if bb.grad_checkpointing and not torch.jit.is_scripting():
                x = torch.utils.checkpoint.checkpoint(blk, x, rel_pos_bias, use_reentrant=False)
            else:
                x = blk(x, shared_rel_pos_bias=rel_pos_bias)
        return bb.norm(x)

    def forward_head(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens -> (cls_logits, dist_logits)."""
        bb = self.backbone
        pooled = x[:, self.num_prefix_tokens :].mean(dim=1) if bb.global_pool == "avg" else x[:, 0]
        cls_logits = bb.head(bb.head_drop(bb.fc_norm(pooled)))
        dist_logits = self.head_dist(bb.head_drop(bb.fc_norm(x[:, 1])))
        return cls_logits, dist_logits

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        cls_logits, dist_logits = self.forward_head(self.forward_features(x))
        if self.training:
            return cls_logits, dist_logits
        return (cls_logits + dist_logits) / 2

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """The backbone's no-decay names (tokens, bias tables) plus the dist token."""
        return {"dist_token"} | {f"backbone.{n}" for n in self.backbone.no_weight_decay()}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        """Beit's layer grouping under the ``backbone.`` prefix; the dist token is stem, ``head_dist`` is head."""
        return dict(
            stem=r"^backbone\.(?:cls_token|pos_embed|patch_embed|rel_pos_bias)|^dist_token",
            blocks=[(r"^backbone\.blocks\.(\d+)", None), (r"^backbone\.norm", (99999,))],
        )
