"""Classifier from a distilled student, and layer-wise LR decay.

The FD student has one relative position bias shared by all blocks. Fine-tuning (FD, following BEiT) gives each
block its own table, initialised from the shared one, pools the patch tokens by their mean, normalises with
``fc_norm`` and puts a new head on top. Copying the table into every block leaves the function unchanged: the
fine-tuned model starts exactly where distillation stopped (the test checks ``forward_features`` equality).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import timm
import torch
import torch.nn as nn
from timm.models.beit import checkpoint_filter_fn
from timm.optim import param_groups_layer_decay

from fdpipe.errors import FdpipeError
from fdpipe.training.optim import fd_no_weight_decay

SHARED_TABLE = "rel_pos_bias.relative_position_bias_table"
DEFAULT_DROP_PREFIXES: tuple[str, ...] = ("projector.", "proj_head.", "head.")
DEFAULT_ARCH = "beit_base_patch16_224"


def remap_shared_rel_pos_bias(
    state_dict: Mapping[str, torch.Tensor],
    depth: int,
    drop_prefixes: Sequence[str] = DEFAULT_DROP_PREFIXES,
) -> dict[str, torch.Tensor]:
    """Turn a shared-bias student's state dict into one for per-block bias (use_rel_pos_bias=True, shared=False).

    - ``rel_pos_bias.relative_position_bias_table`` is copied (cloned) into ``blocks.{i}.attn.relative_position_
      bias_table`` for i < depth, and removed. If a block already has its own table (a model built with both), the
      shared one is added to it, since Beit adds both biases.
    - ``relative_position_index`` keys are dropped: timm regenerates them from the window size (they are
      non-persistent buffers in timm >= 1.0), as timm's own Beit checkpoint filter does.
    - A leading ``module.`` (DDP) is stripped; keys under ``drop_prefixes`` (the distillation projection head, an
      old head) are dropped.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        key = key.removeprefix("module.")
        if "relative_position_index" in key or any(key.startswith(p) for p in drop_prefixes):
            continue
        out[key] = value
    block_ids = {int(m.group(1)) for k in out if (m := re.match(r"blocks\.(\d+)\.", k))}
    if block_ids and max(block_ids) >= depth:
        raise FdpipeError(
            f"the checkpoint has {max(block_ids) + 1} blocks but depth={depth} was given; pass the student's depth"
        )
    table = out.pop(SHARED_TABLE, None)
    if table is None:
        return out
    for i in range(depth):
        key = f"blocks.{i}.attn.relative_position_bias_table"
        out[key] = out[key] + table if key in out else table.clone()
    return out


def classifier_from_distilled(
    distilled_state_dict: Mapping[str, torch.Tensor],
    model_args: Mapping[str, Any],
    num_classes: int,
    drop_path: float = 0.1,
    arch: str = DEFAULT_ARCH,
    drop_prefixes: Sequence[str] = DEFAULT_DROP_PREFIXES,
) -> nn.Module:
    """A timm Beit classifier initialised from a distilled student: per-block RPB, mean pooling + fc_norm, new head.

    ``model_args`` are the student's ``timm.create_model`` keyword arguments (an ``arch``/``model_name`` entry, if
    present, overrides ``arch``). The bias, pooling, class count and drop path are forced to the fine-tuning recipe.
    The state dict goes through ``remap_shared_rel_pos_bias`` and timm's Beit checkpoint filter (which resizes
    patch embedding and bias tables when the fine-tuning resolution differs) and is loaded strictly apart from:
    missing ``head.*`` always, and ``fc_norm.*`` when the student had none; the student's final ``norm.*`` is dropped
    (mean-pooling Beit has ``norm = Identity``; BEiT/MAE fine-tuning start ``fc_norm`` fresh too). The head keeps
    timm's Beit init: trunc-normal(0.02) scaled by ``head_init_scale`` (0.001), bias 0, as BEiT fine-tuning.
    """
    args = dict(model_args)
    arch = args.pop("arch", args.pop("model_name", arch))
    for key in ("pretrained", "num_classes", "drop_path_rate", "global_pool", "use_fc_norm"):
        args.pop(key, None)
    args.update(use_rel_pos_bias=True, use_shared_rel_pos_bias=False)
    model = timm.create_model(
        arch, pretrained=False, num_classes=num_classes, drop_path_rate=drop_path, global_pool="avg", **args
    )
    depth = len(model.blocks)
    state = remap_shared_rel_pos_bias(distilled_state_dict, depth, drop_prefixes)
    state = {k: v for k, v in state.items() if not (k.startswith("norm.") or k.startswith("head."))}
    state = checkpoint_filter_fn(state, model)
    missing, unexpected = model.load_state_dict(state, strict=False)
    expected_missing = {"head.weight", "head.bias"} | {k for k in ("fc_norm.weight", "fc_norm.bias") if k not in state}
    if unexpected or set(missing) != expected_missing:
        raise FdpipeError(
            f"the distilled checkpoint does not fit {arch} with {args}: missing "
            f"{sorted(set(missing) - expected_missing)[:5]}, unexpected {sorted(unexpected)[:5]}; "
            "pass the student's model arguments from its config.json"
        )
    return model


def layer_decay_param_groups(
    model: nn.Module, lr: float, weight_decay: float = 0.05, layer_decay: float = 0.75
) -> list[dict[str, Any]]:
    """AdamW parameter groups with layer-wise LR decay (BEiT), built by ``timm.optim.param_groups_layer_decay``.

    layer_id is 0 for patch_embed / cls_token / pos_embed / the shared bias (and a DeiT dist token), i+1 for block i,
    and depth+1 for fc_norm / head; each group gets ``lr_scale = layer_decay ** (depth + 1 - layer_id)`` and an
    explicit ``lr = lr * lr_scale``. timm's schedulers multiply their value by ``lr_scale``, so they keep the ratio;
    a plain torch scheduler scales the explicit ``lr``, which is the same. No weight decay on 1-D parameters
    (biases, norms, layer scale) or on the model's ``no_weight_decay()`` names (tokens, position embeddings); the
    relative position bias tables decay, as in FD (``training.fd_no_weight_decay``).
    """
    no_wd = fd_no_weight_decay(model)
    groups = param_groups_layer_decay(
        model, weight_decay=weight_decay, no_weight_decay_list=no_wd, layer_decay=layer_decay
    )
    for group in groups:
        group["lr"] = lr * group["lr_scale"]
    return groups
