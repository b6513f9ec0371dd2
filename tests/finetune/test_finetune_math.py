"""Fine-tuning math: Core-tuning, DeiT distillation, RPB remap, layer decay. CPU, seconds."""

from __future__ import annotations

import math

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

from conftest import randomized_zero_init

from fdpipe.finetune.core import (
    CoreTuningLoss,
    focal_supcon_loss,
    hardest_pairs,
    hardness_mixup,
    sample_mixup_lambdas,
)
from fdpipe.finetune.deit import DistilledClassifier, deit_loss, expand_prefix_bias
from fdpipe.finetune.model import classifier_from_distilled, layer_decay_param_groups, remap_shared_rel_pos_bias

STUDENT_ARGS = dict(
    embed_dim=48,
    depth=3,
    num_heads=3,
    patch_size=8,
    img_size=32,
    use_abs_pos_emb=False,
    init_values=0.1,
    qkv_bias=True,
)


def _beit(shared: bool, num_classes: int = 0, seed: int = 0, **overrides) -> torch.nn.Module:
    """A small FD-style Beit with every parameter random, so zero-initialised tables and biases matter."""
    torch.manual_seed(seed)
    args = {**STUDENT_ARGS, **overrides}
    model = timm.create_model(
        "beit_base_patch16_224",
        pretrained=False,
        use_rel_pos_bias=not shared,
        use_shared_rel_pos_bias=shared,
        num_classes=num_classes,
        **args,
    )
    return randomized_zero_init(model, 0.5)


# --- Core-tuning -----------------------------------------------------------------------------------------------


def test_focal_supcon_matches_hand_loops() -> None:
    """The vectorised loss equals its formula written as loops: per anchor, the focal-weighted log-probabilities of
    its positives summed and divided by the batch size N, averaged over the anchors (catches a wrong weight/mean)."""
    z = F.normalize(torch.tensor([[1.0, 0.2], [0.8, 0.5], [-0.3, 1.0], [-1.0, -0.4]]), dim=1)
    labels = torch.tensor([0, 0, 1, 1])
    t, gamma = 0.5, 2.0
    total, anchors = 0.0, 0
    for i in range(4):
        denom = sum(math.exp(float(z[i] @ z[a]) / t) for a in range(4) if a != i)
        positives = [p for p in range(4) if p != i and labels[p] == labels[i]]
        acc = 0.0
        for p in positives:
            prob = math.exp(float(z[i] @ z[p]) / t) / denom
            acc += (1 - prob) ** gamma * math.log(prob)
        total += -acc / 4  # N = 4 rows
        anchors += 1
    expected = total / anchors
    got = focal_supcon_loss(z, labels, temperature=t, gamma=gamma)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    # gamma = 0 is plain SupCon, which is larger (the focal weight is <= 1)
    assert focal_supcon_loss(z, labels, temperature=t, gamma=0.0).item() > got.item()


def test_focal_supcon_skips_anchors_without_positives() -> None:
    """A singleton class adds no anchor term (but stays in denominators) and no NaN: the mean is over the two anchors
    that have a positive, each term divided by N = 3 (catches a 0/0 or a mean over all anchors)."""
    z = F.normalize(torch.tensor([[1.0, 0.0], [0.3, 1.0], [0.6, 0.5]]), dim=1)
    t = 0.5
    s = (z @ z.T / t).tolist()
    expected = 0.0
    for i, j in ((0, 1), (1, 0)):
        prob = math.exp(s[i][j]) / (math.exp(s[i][j]) + math.exp(s[i][2]))
        expected += -(1 - prob) * math.log(prob) / 3 / 2
    got = focal_supcon_loss(z, torch.tensor([0, 0, 1]), temperature=t)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_hardest_pairs_on_hand_made_embedding() -> None:
    """Hardest positive = least similar same-class sample; hardest negative = most similar other-class sample."""
    z = torch.tensor(
        [
            [1.0, 0.0],  # 0: class 0
            [0.95, 0.3],  # 1: class 0, close to 0
            [0.0, 1.0],  # 2: class 0, far from 0
            [0.8, 0.6],  # 3: class 1, close to 0
            [-1.0, 0.0],  # 4: class 1, opposite to 0
            [0.0, -1.0],  # 5: class 2, alone in its class
        ]
    )
    labels = torch.tensor([0, 0, 0, 1, 1, 2])
    pos, neg = hardest_pairs(z, labels)
    assert pos[0] == 2 and neg[0] == 3
    assert pos[2] == 0 or pos[2] == 1  # both class-0 peers; the less similar one must win
    cos = F.normalize(z, dim=1) @ F.normalize(z, dim=1).T
    assert cos[2, pos[2]] == min(cos[2, 0], cos[2, 1])
    assert pos[3] == 4 and neg[3] == 1  # sample 1 (cos 0.94) beats sample 0 (0.8) and 2 (0.6)
    assert pos[5] == 5  # no positive: falls back to itself
    assert labels[neg[5]] != 2


def test_hardest_pairs_never_picks_outside_the_set() -> None:
    """All positive similarities > 0 and all negative < 0 (the reference code's multiply-by-0 mask fails here)."""
    z = torch.tensor([[1.0, 0.0], [0.9, 0.2], [0.8, 0.3], [-1.0, 0.1], [-0.9, -0.2]])
    labels = torch.tensor([0, 0, 0, 1, 1])
    pos, neg = hardest_pairs(z, labels)
    assert all(labels[pos[i]] == labels[i] and pos[i] != i for i in range(5))
    assert all(labels[neg[i]] != labels[i] for i in range(5))


def test_hardness_mixup_shapes_and_lambdas() -> None:
    """Rows 0..B-1 mix anchor with its hardest negative; rows B..2B-1 mix hardest positive with hardest negative."""
    b, d, c = 4, 5, 3
    g = torch.Generator().manual_seed(0)
    f = torch.randn(b, d, generator=g)
    labels = torch.tensor([0, 0, 1, 2])
    y = F.one_hot(labels, c).float()
    pos_idx = torch.tensor([1, 0, 2, 3])
    neg_idx = torch.tensor([2, 3, 0, 1])
    lam_neg = torch.tensor([0.1, 0.2, 0.15, 0.05])
    lam_pos = torch.tensor([0.3, 0.6, 0.9, 0.5])
    mixed, soft = hardness_mixup(f, y, pos_idx, neg_idx, lam_neg, lam_pos)
    assert mixed.shape == (2 * b, d) and soft.shape == (2 * b, c)
    torch.testing.assert_close(soft.sum(1), torch.ones(2 * b))
    for i in range(b):
        torch.testing.assert_close(mixed[i], lam_neg[i] * f[i] + (1 - lam_neg[i]) * f[neg_idx[i]])
        torch.testing.assert_close(mixed[b + i], lam_pos[i] * f[pos_idx[i]] + (1 - lam_pos[i]) * f[neg_idx[i]])
        assert soft[i, labels[i]] == pytest.approx(float(lam_neg[i]))
        assert soft[i, labels[neg_idx[i]]] == pytest.approx(1 - float(lam_neg[i]))
        if labels[pos_idx[i]] != labels[neg_idx[i]]:
            assert soft[b + i, labels[pos_idx[i]]] == pytest.approx(float(lam_pos[i]))


def test_mixup_lambdas_reproducible_and_bounded() -> None:
    """Same generator seed, same lambdas; the anchor share of a hard negative never exceeds 0.2."""
    a = sample_mixup_lambdas(64, 1.0, torch.Generator().manual_seed(3))
    b = sample_mixup_lambdas(64, 1.0, torch.Generator().manual_seed(3))
    torch.testing.assert_close(a[0], b[0])
    torch.testing.assert_close(a[1], b[1])
    assert float(a[0].max()) <= 0.2 + 1e-6 and float(a[0].min()) >= 0.0
    assert 0.0 <= float(a[1].min()) and float(a[1].max()) <= 1.0 and float(a[1].std()) > 0.1


def reference_focal_supcon(features: torch.Tensor, labels_onehot: torch.Tensor, num_classes: int) -> float:
    """Vanint/Core-tuning's ``focal_SupConLoss(features, labels, mixup=True)`` (Core-tuning.py), transcribed line by
    line for the CPU. sklearn's LabelEncoder is np.unique's inverse; the soft-label codes are formed in float64 (the
    reference's float32 codes could merge two distinct mixes)."""
    temperature = 0.07
    base_temperature = 0.07
    batch_size = features.shape[0]
    weight_index = torch.tensor(10 ** np.arange(num_classes)).unsqueeze(1)
    labels_ = labels_onehot.double().mm(weight_index.double()).squeeze(1).numpy()
    labels = torch.unsqueeze(torch.tensor(np.unique(labels_, return_inverse=True)[1]), 1)
    labels = labels.contiguous().view(-1, 1)
    mask = torch.eq(labels, labels.T).float()
    anchor_feature = features.float()
    contrast_feature = features.float()
    anchor_dot_contrast = torch.div(torch.matmul(anchor_feature, contrast_feature.T), temperature)
    logits_max, _ = torch.max(anchor_dot_contrast, dim=1, keepdim=True)
    logits = anchor_dot_contrast - logits_max.detach()
    logits_mask = torch.scatter(torch.ones_like(mask), 1, torch.arange(batch_size).view(-1, 1), 0)
    mask = mask * logits_mask
    exp_logits = torch.exp(logits) * logits_mask
    log_prob = logits - torch.log(exp_logits.sum(1, keepdim=True))
    weight = 1 - torch.exp(log_prob)
    mean_log_prob_pos = (weight * mask * log_prob).mean(1)
    mean_log_prob_pos = -(temperature / base_temperature) * mean_log_prob_pos
    mean_log_prob_pos = mean_log_prob_pos.view(batch_size)
    n_nonzero = torch.nonzero(mask.sum(1)).shape[0]
    return float(mean_log_prob_pos.sum() / n_nonzero)


def test_contrast_term_has_the_reference_codes_scale() -> None:
    """On a fixed B=64, 10-class batch, Core-tuning's L_con equals the reference code's formula over the same 3B
    contrasted rows, so eta 0.1 (the reference README's) weighs it as there (catches the paper's 1/|P(i)|, which
    makes L_con tens of times larger)."""
    b, d, k = 64, 32, 10
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(b, d, generator=g)
    labels = torch.randperm(b, generator=g) % k
    loss_fn = CoreTuningLoss(d, contrast_dim=16)
    head = torch.nn.Linear(d, k)
    with torch.no_grad():
        con = loss_fn(feats, labels, head, generator=torch.Generator().manual_seed(1)).con
        # the rows the loss contrasts: the real features, then its hard negatives and hard positives
        y = F.one_hot(labels, k).float()
        pos_idx, neg_idx = hardest_pairs(feats, labels)
        lam_neg, lam_pos = sample_mixup_lambdas(b, 1.0, torch.Generator().manual_seed(1))
        mixed, y_mixed = hardness_mixup(feats, y, pos_idx, neg_idx, lam_neg, lam_pos)
        z = loss_fn.contrast_head(torch.cat([feats, mixed]))
    assert con.item() == pytest.approx(reference_focal_supcon(z, torch.cat([y, y_mixed]), k), rel=1e-4)


def test_core_tuning_loss_backpropagates_to_backbone() -> None:
    """The combined loss reaches the first block and the contrast head (catches a detached feature path)."""
    model = _beit(shared=False, num_classes=4).train()
    x = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 0, 1, 1, 2, 3])
    loss_fn = CoreTuningLoss(model.num_features)
    feats = model.forward_head(model.forward_features(x), pre_logits=True)
    out = loss_fn(feats, labels, model.head, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out.loss) and out.con > 0 and out.ce > 0
    assert out.logits.shape == (6, 4)
    torch.testing.assert_close(out.loss.detach(), out.ce + 0.1 * out.con)
    out.loss.backward()
    assert model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert loss_fn.contrast_head.fc1.weight.grad.abs().sum() > 0


def test_core_tuning_contrast_term_reaches_backbone() -> None:
    """Raising eta changes the backbone gradient by eta * grad(L_con) (catches a contrast path cut off the backbone)."""
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    labels = torch.tensor([0, 0, 1, 2])
    grads = []
    for eta in (0.0, 1.0):
        model = _beit(shared=False, num_classes=3).train()
        torch.manual_seed(5)
        loss_fn = CoreTuningLoss(model.num_features, eta=eta)
        feats = model.forward_head(model.forward_features(x), pre_logits=True)
        loss_fn(feats, labels, model.head, generator=torch.Generator().manual_seed(0)).loss.backward()
        grads.append(model.blocks[0].attn.qkv.weight.grad.clone())
    assert not torch.allclose(grads[0], grads[1])


# --- DeiT ------------------------------------------------------------------------------------------------------


def test_deit_soft_and_hard_equal_direct_computation() -> None:
    """Soft: KL(teacher||student) at tau, * tau^2 / (B*C); hard: CE against teacher argmax; mixed by alpha."""
    g = torch.Generator().manual_seed(0)
    cls, dist, teacher = (torch.randn(5, 7, generator=g) for _ in range(3))
    y = torch.tensor([0, 3, 6, 2, 2])
    tau, alpha = 2.0, 0.3
    pt = torch.softmax(teacher / tau, 1)
    ps = torch.softmax(dist / tau, 1)
    kl = (pt * (pt.log() - ps.log())).sum() * tau * tau / dist.numel()
    ce = -torch.log_softmax(cls, 1)[torch.arange(5), y].mean()
    expected_soft = (1 - alpha) * ce + alpha * kl
    got = deit_loss(cls, dist, y, teacher, kind="soft", tau=tau, alpha=alpha)
    torch.testing.assert_close(got, expected_soft)
    ce_dist = -torch.log_softmax(dist, 1)[torch.arange(5), teacher.argmax(1)].mean()
    got_hard = deit_loss(cls, dist, y, teacher, kind="hard")
    torch.testing.assert_close(got_hard, 0.5 * ce + 0.5 * ce_dist)
    # soft targets (mixup) for the base CE
    soft_y = F.one_hot(y, 7).float()
    torch.testing.assert_close(deit_loss(cls, dist, soft_y, teacher, tau=tau, alpha=alpha), expected_soft)


@pytest.mark.parametrize("shared", [True, False])
def test_distilled_classifier_eval_is_average_of_heads(shared: bool) -> None:
    """Eval returns (cls + dist) / 2 of the train-mode outputs, for shared and per-block bias (DeiT inference)."""
    model = DistilledClassifier(_beit(shared=shared, num_classes=5))
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    model.train()
    cls_logits, dist_logits = model(x)
    assert cls_logits.shape == dist_logits.shape == (2, 5)
    model.eval()
    torch.testing.assert_close(model(x), (cls_logits + dist_logits) / 2)


def test_deit_top1_is_the_average_of_the_two_heads() -> None:
    """evaluate() reports DeiT's headline, the prediction of (cls + dist) / 2, as top1, and the class head alone as
    top1_cls: here the class head is always wrong and the distillation head outvotes it."""
    from fdpipe.finetune.evaluate import evaluate

    model = DistilledClassifier(_beit(shared=True, num_classes=2))
    with torch.no_grad():  # constant logits: class head [1, 0] (says 0), dist head [0, 3] (says 1)
        for head, bias in ((model.backbone.head, [1.0, 0.0]), (model.head_dist, [0.0, 3.0])):
            head.weight.zero_()
            head.bias.copy_(torch.tensor(bias))
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    m = evaluate(model, [(x, torch.ones(4, dtype=torch.long))], torch.device("cpu"))
    assert (m["top1"], m["top1_cls"]) == (100.0, 0.0)


@pytest.mark.parametrize("shared", [True, False])
def test_dist_token_gets_cls_position_bias(shared: bool) -> None:
    """With dist_token := cls_token the two prefix tokens stay identical through every block.

    Only true if dist->patch, patch->dist and prefix-prefix biases copy CLS's entries; zero or patch biases for the
    dist token would make them differ.
    """
    model = DistilledClassifier(_beit(shared=shared, num_classes=5)).eval()
    with torch.no_grad():
        model.dist_token.copy_(model.backbone.cls_token)
    tokens = model.forward_features(torch.randn(2, 3, 32, 32))
    assert tokens.shape == (2, 2 + 16, STUDENT_ARGS["embed_dim"])
    torch.testing.assert_close(tokens[:, 0], tokens[:, 1])


def test_expand_prefix_bias_copies_cls_row_and_column() -> None:
    """The expanded bias: dist row = cls row, dist column = cls column, patch block unchanged."""
    bias = torch.randn(3, 5, 5)
    out = expand_prefix_bias(bias)
    assert out.shape == (3, 6, 6)
    torch.testing.assert_close(out[:, 2:, 2:], bias[:, 1:, 1:])
    torch.testing.assert_close(out[:, 1, 2:], bias[:, 0, 1:])
    torch.testing.assert_close(out[:, 2:, 1], bias[:, 1:, 0])
    assert torch.all(out[:, :2, :2] == bias[:, :1, :1])


# --- classifier from a distilled student ---------------------------------------------------------------------


def test_remap_puts_shared_table_in_every_block_and_keeps_function() -> None:
    """Per-block model loaded from the remapped dict computes the same forward_features as the shared one."""
    student = _beit(shared=True)
    state = student.state_dict()
    state["projector.weight"] = torch.randn(4, STUDENT_ARGS["embed_dim"])  # an FD projection head, to be dropped
    remapped = remap_shared_rel_pos_bias(state, depth=STUDENT_ARGS["depth"])
    table = student.rel_pos_bias.relative_position_bias_table
    for i in range(STUDENT_ARGS["depth"]):
        torch.testing.assert_close(remapped[f"blocks.{i}.attn.relative_position_bias_table"], table.detach())
    assert "rel_pos_bias.relative_position_bias_table" not in remapped
    assert not any(k.startswith("projector.") for k in remapped)
    per_block = _beit(shared=False, seed=1)
    per_block.load_state_dict(remapped, strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(per_block.forward_features(x), student.forward_features(x))


def test_remap_tables_are_independent_copies() -> None:
    """Each block's table is its own tensor, so fine-tuning one block does not move the others."""
    remapped = remap_shared_rel_pos_bias(_beit(shared=True).state_dict(), depth=STUDENT_ARGS["depth"])
    remapped["blocks.0.attn.relative_position_bias_table"].add_(1.0)
    assert not torch.equal(
        remapped["blocks.0.attn.relative_position_bias_table"], remapped["blocks.1.attn.relative_position_bias_table"]
    )


def test_classifier_from_distilled_keeps_features_and_adds_head() -> None:
    """The classifier's forward_features equals the student's; pooling is mean + fc_norm; the head is new."""
    student = _beit(shared=True)
    clf = classifier_from_distilled(student.state_dict(), STUDENT_ARGS, num_classes=7, drop_path=0.0).eval()
    assert clf.global_pool == "avg" and isinstance(clf.fc_norm, torch.nn.LayerNorm)
    assert clf.rel_pos_bias is None and clf.blocks[0].attn.relative_position_bias_table is not None
    assert clf.head.out_features == 7
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(clf.forward_features(x), student.forward_features(x))
        assert clf(x).shape == (2, 7)


def test_classifier_from_distilled_rejects_wrong_architecture() -> None:
    """A student of another width does not load silently."""
    from fdpipe.errors import FdpipeError

    student = _beit(shared=True)
    with pytest.raises((FdpipeError, RuntimeError)):
        classifier_from_distilled(student.state_dict(), {**STUDENT_ARGS, "embed_dim": 96}, num_classes=3)


def test_layer_decay_groups_follow_depth_formula() -> None:
    """lr = base * decay^(depth + 1 - layer_id); no decay on tokens and 1-D params; the bias tables decay (FD)."""
    clf = classifier_from_distilled(_beit(shared=True).state_dict(), STUDENT_ARGS, num_classes=3, drop_path=0.0)
    depth, lr, decay = STUDENT_ARGS["depth"], 1e-3, 0.5
    groups = layer_decay_param_groups(clf, lr=lr, weight_decay=0.05, layer_decay=decay)
    by_name = {}
    names = {id(p): n for n, p in clf.named_parameters()}
    for g in groups:
        for p in g["params"]:
            by_name[names[id(p)]] = g
    assert set(by_name) == set(names.values())

    def layer_id(name: str) -> int:
        if name.startswith(("cls_token", "patch_embed")):
            return 0
        if name.startswith("blocks."):
            return int(name.split(".")[1]) + 1
        return depth + 1

    for name, g in by_name.items():
        assert g["lr"] == pytest.approx(lr * decay ** (depth + 1 - layer_id(name))), name
        p = dict(clf.named_parameters())[name]
        no_wd = p.ndim <= 1 or name == "cls_token"  # FD decays the bias tables (its ViT skips tokens only)
        assert g["weight_decay"] == (0.0 if no_wd else 0.05), name
    assert by_name["head.weight"]["lr"] == pytest.approx(lr)
    assert by_name["cls_token"]["lr"] == pytest.approx(lr * decay ** (depth + 1))


def test_layer_decay_on_distilled_classifier() -> None:
    """The DeiT wrapper groups like its backbone: dist token with the stem, dist head with the head."""
    model = DistilledClassifier(_beit(shared=False, num_classes=3))
    depth, lr, decay = STUDENT_ARGS["depth"], 1.0, 0.5
    groups = layer_decay_param_groups(model, lr=lr, weight_decay=0.05, layer_decay=decay)
    names = {id(p): n for n, p in model.named_parameters()}
    lr_of = {names[id(p)]: (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}
    assert lr_of["dist_token"] == (pytest.approx(decay ** (depth + 1)), 0.0)
    assert lr_of["backbone.cls_token"][0] == pytest.approx(decay ** (depth + 1))
    assert lr_of["backbone.blocks.0.attn.qkv.weight"][0] == pytest.approx(decay**depth)
    assert lr_of["head_dist.weight"][0] == pytest.approx(1.0)
    assert lr_of["backbone.head.weight"][0] == pytest.approx(1.0)
