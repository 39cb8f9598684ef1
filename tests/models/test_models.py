"""Models: every architecture with every norm, the Classifier interface, specs, and LoRA."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from smoothtransfer.errors import UserError
from smoothtransfer.models import (
    MODELS,
    Classifier,
    InputNormalize,
    apply_lora,
    build_from_spec,
    create_classifier,
    get_norm_layer,
    lora_parameters,
    merge_lora,
)
from smoothtransfer.models.factory import _pretrained_mean_std
from smoothtransfer.models.lora import randomize_lora_
from smoothtransfer.models.normalize import CIFAR10_MEAN, CIFAR10_STD
from smoothtransfer.models.norms import GROUP_RULES, group_norm_groups, largest_group_divisor
from smoothtransfer.models.wrn import WideResNet

NORMS = ["batch", "group", "layer", "instance"]
CNNS = [n for n in MODELS.names() if MODELS.get(n).family == "cnn"]
VITS = [n for n in MODELS.names() if MODELS.get(n).family == "vit"]
# Cheap enough for the default run on a shared 2-core CPU; the rest run under -m slow.
FAST_CNNS = ["resnet20", "resnet56", "resnet110", "resnet18"]


def _has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def _forward_backward(model: Classifier, size: int = 32, num_classes: int = 10) -> None:
    torch.manual_seed(0)
    x = torch.rand(2, model.spec["in_chans"], size, size)
    model.train()
    logits = model(x)
    assert logits.shape == (2, num_classes)
    assert torch.isfinite(logits).all()
    logits.logsumexp(dim=1).sum().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    model.eval()
    with torch.no_grad():
        feats = model.forward_features(x)
    assert feats.shape == (2, model.num_features)


# ---------------------------------------------------------------- norms and input normalisation


def test_norm_layers():
    assert isinstance(get_norm_layer("batch")(16), nn.BatchNorm2d)
    group, layer, inst = get_norm_layer("group")(64), get_norm_layer("layer")(64), get_norm_layer("instance")(64)
    assert isinstance(group, nn.GroupNorm) and group.num_groups == 16  # 4 channels per group at C = 64
    assert isinstance(layer, nn.GroupNorm) and layer.num_groups == 1
    assert isinstance(inst, nn.GroupNorm) and inst.num_groups == 64 and inst.affine
    assert get_norm_layer("group")(16).num_groups == 4
    assert get_norm_layer("group")(256).num_groups == 32
    # the c4 rule: largest divisor of C that is <= min(32, C // 4); the legacy max32 rule: <= 32
    channels = (3, 4, 16, 24, 32, 48, 64, 96, 128, 160, 256, 640, 2048)
    assert [group_norm_groups(c) for c in channels] == [1, 1, 4, 6, 8, 12, 16, 24, 32, 32, 32, 32, 32]
    assert all(c // group_norm_groups(c) >= 4 for c in channels if c >= 4)
    assert [largest_group_divisor(c) for c in (16, 48, 64, 640, 7)] == [16, 24, 32, 32, 7]
    assert [group_norm_groups(c, "max32") for c in (16, 48, 64, 640, 7)] == [16, 24, 32, 32, 7]
    assert get_norm_layer("group", "max32")(16).num_groups == 16
    assert set(GROUP_RULES) == {"c4", "max32"}
    with pytest.raises(UserError, match="unknown group_rule 'gn8'"):
        get_norm_layer("group", "gn8")
    x = torch.randn(2, 64, 4, 4)
    # "layer" normalises each sample over (C, H, W)
    y = layer(x)
    assert torch.allclose(y.mean(dim=(1, 2, 3)), torch.zeros(2), atol=1e-5)
    with pytest.raises(UserError, match="unknown norm 'bn'"):
        get_norm_layer("bn")


def test_input_normalize():
    norm = InputNormalize([0.5, 0.25, 0.0], [0.5, 0.5, 1.0])
    x = torch.rand(2, 3, 4, 4)
    y = norm(x)
    assert torch.allclose(y[:, 0], (x[:, 0] - 0.5) / 0.5)
    assert torch.allclose(y[:, 2], x[:, 2])
    assert set(norm.state_dict()) == {"mean", "std"}
    assert norm(x.to(torch.bfloat16)).dtype == torch.bfloat16
    with pytest.raises(UserError, match="std must be > 0"):
        InputNormalize([0.5], [0.0])
    with pytest.raises(UserError, match="3 channels but std has 1"):
        InputNormalize([0.5, 0.5, 0.5], [0.5])


# ---------------------------------------------------------------- every model x every norm


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("name", CNNS)
def test_cnn_structure_every_norm(name, norm):
    # Built on the meta device: checks the module structure of even the largest models in milliseconds.
    with torch.device("meta"):
        model = create_classifier(name, 10, norm=norm)
    assert _has_batchnorm(model) == (norm == "batch")
    if norm != "batch":
        norm_modules = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
        assert norm_modules
        expected = {"group": None, "layer": 1, "instance": "C"}[norm]
        for m in norm_modules:
            if expected == 1:
                assert m.num_groups == 1
            elif expected == "C":
                assert m.num_groups == m.num_channels
            else:
                # a real group norm: never one channel per group (that is InstanceNorm), >= 4 per group
                assert m.num_groups == group_norm_groups(m.num_channels)
                assert m.num_channels // m.num_groups >= 4, (name, m)
                assert m.num_groups > 1 or m.num_channels < 8, (name, m)
    assert model.spec["norm"] == norm
    if norm == "group":
        assert model.spec["kwargs"]["group_rule"] == "c4"
        assert model.spec["norm_groups"] == {str(m.num_channels): m.num_groups for m in norm_modules}
    else:
        assert "group_rule" not in model.spec["kwargs"] and "norm_groups" not in model.spec


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("name", FAST_CNNS)
def test_cnn_forward_backward_fast(name, norm):
    _forward_backward(create_classifier(name, 10, norm=norm))


@pytest.mark.parametrize("norm", NORMS)
def test_wide_resnet_class_every_norm(norm):
    # The WRN-28-10 code path at a cheap depth/width; wrn28_10 itself runs under -m slow.
    backbone = WideResNet(10, 2, 5, get_norm_layer(norm), dropout=0.1)
    model = Classifier(InputNormalize(CIFAR10_MEAN, CIFAR10_STD), backbone,
                       {"arch": "wrn10_2", "in_chans": 3, "num_classes": 5, "kwargs": {}})
    _forward_backward(model, num_classes=5)
    assert _has_batchnorm(model) == (norm == "batch")


def test_timm_bottleneck_resnet_group_norm():
    model = create_classifier("resnet50", 10, norm="group")
    assert not _has_batchnorm(model)
    _forward_backward(model)


@pytest.mark.slow
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("name", [n for n in CNNS if n not in FAST_CNNS])
def test_cnn_forward_backward_slow(name, norm):
    model = create_classifier(name, 10, norm=norm)
    assert _has_batchnorm(model) == (norm == "batch")
    _forward_backward(model)


def test_vit_tiny_forward_backward():
    model = create_classifier("vit_tiny_patch4_32", 10)
    assert model.spec["norm"] == "layer"
    assert isinstance(model.backbone.norm, nn.LayerNorm)
    assert not _has_batchnorm(model)
    _forward_backward(model)


@pytest.mark.slow
def test_vit_small_forward_backward():
    _forward_backward(create_classifier("vit_small_patch4_32", 10, norm="layer"))


def test_vit_base_resizes_small_inputs():
    # One ViT-B/16 block is enough to exercise the timm path and the 32px -> 224px resize.
    model = create_classifier("vit_base_patch16_224", 10, depth=1)
    assert model.spec["kwargs"] == {"depth": 1, "resize_to": 224}
    assert model.backbone.patch_embed.img_size == (224, 224)
    _forward_backward(model, size=32)


@pytest.mark.slow
def test_vit_base_224_forward_backward():
    model = create_classifier("vit_base_patch16_224", 10, input_size=224)
    assert model.resize_to is None
    _forward_backward(model, size=224)


@pytest.mark.parametrize("name", VITS)
def test_vits_reject_cnn_norms(name):
    with pytest.raises(UserError, match="always uses LayerNorm"):
        create_classifier(name, 10, norm="batch")


# ---------------------------------------------------------------- the Classifier interface


@pytest.mark.parametrize("name", ["resnet20", "resnet18", "vit_tiny_patch4_32"])
def test_normalisation_first_and_head_interface(name):
    torch.manual_seed(0)
    model = create_classifier(name, 7, mean=[0.1, 0.2, 0.3], std=[0.3, 0.2, 0.1]).eval()
    assert next(iter(model.children())) is model.normalize
    keys = list(model.state_dict())
    assert keys[:2] == ["normalize.mean", "normalize.std"]
    assert model.spec["mean"] == pytest.approx([0.1, 0.2, 0.3]) and model.spec["std"] == pytest.approx([0.3, 0.2, 0.1])
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        logits = model(x)
        assert torch.allclose(logits, model.backbone(model.normalize(x)))
        feats = model.forward_features(x)
        assert feats.shape == (2, model.num_features)
        assert torch.allclose(model.head(feats), logits, atol=1e-5)
    assert isinstance(model.head, nn.Linear) and model.head.in_features == model.num_features
    head, rest = model.head_parameters(), model.backbone_parameters()
    assert {id(p) for p in head} | {id(p) for p in rest} == {id(p) for p in model.parameters()}
    assert not {id(p) for p in head} & {id(p) for p in rest}
    json.dumps(model.spec)


@pytest.mark.parametrize("name", ["resnet20", "resnet18", "vit_tiny_patch4_32"])
def test_reset_head(name):
    model = create_classifier(name, 10)
    before = {n: (p, p.detach().clone()) for n, p in model.named_parameters()}
    old_head = {id(p) for p in model.head_parameters()}
    model.reset_head(3)
    assert model.spec["num_classes"] == 3 and model.num_classes == 3
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 3)
    new_head = {id(p) for p in model.head_parameters()}
    assert not old_head & new_head
    for n, p in model.named_parameters():
        if id(p) in new_head:
            assert n not in before or before[n][0] is not p
        else:
            assert before[n][0] is p and torch.equal(before[n][1], p)
    with pytest.raises(UserError, match="num_classes"):
        model.reset_head(0)


def test_build_from_spec_round_trip():
    torch.manual_seed(0)
    model = create_classifier("resnet18", 4, norm="layer", input_size=32, drop_rate=0.0).eval()
    spec = json.loads(json.dumps(model.spec))
    assert spec["kwargs"] == {"stem": "cifar", "drop_rate": 0.0, "resize_to": None}
    clone = build_from_spec(spec).eval()
    clone.load_state_dict(model.state_dict())
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(clone(x), model(x))
    with pytest.raises(UserError, match="unknown model 'resnet9000'"):
        build_from_spec({**spec, "arch": "resnet9000"})
    with pytest.raises(UserError, match="missing"):
        build_from_spec({"arch": "resnet20"})


@pytest.mark.parametrize("name", ["resnet20", "wrn28_10", "resnet50"])
def test_group_norm_spec_round_trip_and_legacy_specs(name, tmp_path):
    from smoothtransfer.models.checkpoint import load_classifier, save_checkpoint

    with torch.device("meta"):
        model = create_classifier(name, 10, norm="group")
        legacy = create_classifier(name, 10, norm="group", group_rule="max32")
    spec = json.loads(json.dumps(model.spec))
    assert spec["kwargs"]["group_rule"] == "c4"
    with torch.device("meta"):
        assert build_from_spec(spec).spec["norm_groups"] == spec["norm_groups"]
        # a spec written before group_rule existed (no group_rule, no norm_groups) rebuilds with the old rule
        old = json.loads(json.dumps(legacy.spec))
        del old["kwargs"]["group_rule"], old["norm_groups"]
        rebuilt = build_from_spec(old)
    assert rebuilt.spec["kwargs"]["group_rule"] == "max32" and rebuilt.spec["norm_groups"] == legacy.spec["norm_groups"]
    assert [m.num_groups for m in rebuilt.modules() if isinstance(m, nn.GroupNorm)] == \
        [m.num_groups for m in legacy.modules() if isinstance(m, nn.GroupNorm)]
    if name == "resnet20":  # the 16/32-channel stages: legacy = one channel per group, c4 = 4 per group
        assert legacy.spec["norm_groups"] == {"16": 16, "32": 32, "64": 32}
        assert spec["norm_groups"] == {"16": 4, "32": 8, "64": 16}
        # an old checkpoint loads and computes exactly what it computed before the rule changed
        torch.manual_seed(0)
        trained = create_classifier(name, 10, norm="group", group_rule="max32").eval()
        trained.spec = old
        save_checkpoint(tmp_path / "old.pt", trained, classes=None, dataset="x", config={})
        loaded, _ = load_classifier(tmp_path / "old.pt")
        x = torch.rand(2, 3, 32, 32)
        assert torch.equal(loaded(x), trained(x))
        assert loaded.spec["norm_groups"] == legacy.spec["norm_groups"]
        with pytest.raises(UserError, match="records GroupNorm groups"):
            build_from_spec({**spec, "norm_groups": legacy.spec["norm_groups"]})
    with pytest.raises(UserError, match="group_rule applies to norm='group' only"):
        create_classifier(name, 10, norm="layer", group_rule="c4")


def test_resnet_stems():
    with torch.device("meta"):
        small = create_classifier("resnet18", 10)
        large = create_classifier("resnet18", 10, input_size=224)
        forced = create_classifier("resnet50", 10, norm="group", stem="imagenet")
        resized = create_classifier("resnet50", 10, resize_to=224)
    assert small.backbone.conv1.kernel_size == (3, 3) and isinstance(small.backbone.maxpool, nn.Identity)
    assert large.backbone.conv1.kernel_size == (7, 7) and large.spec["kwargs"]["stem"] == "imagenet"
    assert forced.backbone.conv1.kernel_size == (7, 7)
    assert resized.spec["kwargs"] == {"stem": "imagenet", "resize_to": 224}
    with pytest.raises(UserError, match="stem"):
        create_classifier("resnet18", 10, stem="tiny")


def test_defaults_and_pretrained_norm_stats():
    model = create_classifier("resnet20", 10)
    assert model.spec["mean"] == pytest.approx(CIFAR10_MEAN) and model.spec["std"] == pytest.approx(CIFAR10_STD)
    assert model.spec["norm"] == "batch" and model.spec["lora"] is None and model.spec["pretrained"] is False
    # ViT-B/16's ImageNet weights expect 0.5/0.5 normalisation (read from timm's config, no download)
    assert _pretrained_mean_std("vit_base_patch16_224") == ([0.5] * 3, [0.5] * 3)
    gray = create_classifier("resnet20", 2, in_chans=1, mean=[0.5], std=[0.25])
    assert gray(torch.rand(2, 1, 32, 32)).shape == (2, 2)


@pytest.mark.parametrize("call, match", [
    (lambda: create_classifier("resnet21", 10), "did you mean 'resnet20'"),
    (lambda: create_classifier("resnet20", 10, norm="bn"), "unknown norm"),
    (lambda: create_classifier("resnet20", 0), "num_classes"),
    (lambda: create_classifier("resnet20", 10, mean=[0.5, 0.5, 0.5]), "both mean and std"),
    (lambda: create_classifier("resnet20", 10, mean=[0.5], std=[0.5]), "in_chans is 3"),
    (lambda: create_classifier("resnet20", 10, in_chans=1), "pass mean and std"),
    (lambda: create_classifier("resnet20", 10, width=3), "takes no extra model options"),
    (lambda: create_classifier("wrn28_10", 10, width=3), "only takes the model option 'dropout'"),
    (lambda: create_classifier("vit_tiny_patch4_32", 10, not_an_option=1), "invalid model option"),
    (lambda: create_classifier("resnet20", 10, pretrained=True), "no pretrained weights"),
    (lambda: create_classifier("vit_tiny_patch4_32", 10, pretrained=True), "no public pretrained"),
    (lambda: create_classifier("resnet50", 10, norm="group", pretrained=True), "trained with BatchNorm"),
    (lambda: create_classifier("vit_tiny_patch4_32", 10, input_size=30), "multiple of patch_size"),
    (lambda: create_classifier("resnet20", 10, resize_to=0), "resize_to"),
])
def test_bad_input_raises_user_error(call, match):
    with pytest.raises(UserError, match=match):
        call()


def test_freeze_backbone_keeps_norm_statistics():
    model = create_classifier("resnet20", 10)
    model.freeze_backbone()
    assert [p.requires_grad for p in model.parameters()].count(True) == 2
    model.train()
    bn = model.backbone.bn1
    stats = bn.running_mean.clone()
    assert not bn.training and model.head.training
    model(torch.rand(2, 3, 32, 32)).sum().backward()
    assert torch.equal(bn.running_mean, stats)
    model.freeze_backbone(False)
    model.train()
    assert bn.training and all(p.requires_grad for p in model.parameters())


# ---------------------------------------------------------------- LoRA


@pytest.mark.parametrize("name, n_targets", [("resnet20", 21), ("vit_tiny_patch4_32", 12)])
def test_lora_trainable_parameters(name, n_targets):
    model = apply_lora(create_classifier(name, 10), rank=2, alpha=4)
    lora = model.spec["lora"]
    assert lora["rank"] == 2 and lora["alpha"] == 4 and len(lora["targets"]) == n_targets
    if name.startswith("vit"):
        assert all(t.endswith("attn.qkv") for t in lora["targets"])
    json.dumps(model.spec)
    adapters = {id(p) for p in lora_parameters(model)}
    head = {id(p) for p in model.head_parameters()}
    assert len(adapters) == 2 * n_targets
    for n, p in model.named_parameters():
        assert p.requires_grad == (id(p) in adapters or id(p) in head), n


def test_lora_step_changes_only_adapters_and_head():
    torch.manual_seed(0)
    model = apply_lora(create_classifier("resnet20", 10, norm="group"))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    # An optimizer over *all* parameters, as a careless training loop would build it.
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(2):  # lora_A only gets gradient once lora_B is non-zero
        opt.zero_grad()
        nn.functional.cross_entropy(model(torch.rand(4, 3, 32, 32)), torch.tensor([0, 1, 2, 3])).backward()
        opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p)}
    assert changed
    assert all(".lora_" in n or n.startswith("backbone.fc.") for n in changed), changed
    assert any(".lora_A." in n for n in changed) and any(".lora_B." in n for n in changed)


@pytest.mark.parametrize("name", ["resnet20", "vit_tiny_patch4_32"])
def test_lora_merge_matches_unmerged(name):
    torch.manual_seed(0)
    model = apply_lora(create_classifier(name, 10), rank=4, alpha=8).eval()
    randomize_lora_(model, std=0.05, generator=torch.Generator().manual_seed(1))
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        plain = create_classifier(name, 10).eval()
        unmerged = model(x)
        base_sd = {k: v for k, v in model.state_dict().items() if ".lora_" not in k}
        plain.load_state_dict({k.replace(".base_layer", ""): v for k, v in base_sd.items()})
        assert not torch.allclose(plain(x), unmerged, atol=1e-4)  # the adapters do change the output
        merged = merge_lora(model)(x)
    assert torch.allclose(merged, unmerged, atol=1e-4, rtol=1e-4)
    assert model.spec["lora"] is None
    assert list(model.state_dict()) == list(plain.state_dict())
    assert all(p.requires_grad for p in model.parameters())
    rebuilt = build_from_spec(model.spec).eval()
    rebuilt.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(rebuilt(x), merged)


def test_lora_spec_rebuild_loads_state_dict():
    torch.manual_seed(0)
    model = apply_lora(create_classifier("vit_tiny_patch4_32", 5, depth=2), targets=["qkv", "mlp.fc1"]).eval()
    assert model.spec["lora"]["targets"] == ["blocks.0.attn.qkv", "blocks.0.mlp.fc1", "blocks.1.attn.qkv",
                                             "blocks.1.mlp.fc1"]
    randomize_lora_(model)
    rebuilt = build_from_spec(json.loads(json.dumps(model.spec))).eval()
    rebuilt.load_state_dict(model.state_dict())
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model(x))
    assert {id(p) for p in rebuilt.parameters() if p.requires_grad} == (
        {id(p) for p in lora_parameters(rebuilt)} | {id(p) for p in rebuilt.head_parameters()})


def test_lora_bad_input():
    model = create_classifier("resnet20", 10)
    with pytest.raises(UserError, match="matches no layer"):
        apply_lora(model, targets=["qkv"])
    with pytest.raises(UserError, match="matches no layer"):
        apply_lora(model, targets=["fc"])  # the head is trained in full, never adapted
    with pytest.raises(UserError, match="only Linear and Conv2d"):
        apply_lora(model, targets=["bn1"])
    with pytest.raises(UserError, match="rank"):
        apply_lora(model, rank=0)
    apply_lora(model)
    with pytest.raises(UserError, match="already has LoRA"):
        apply_lora(model)
    assert merge_lora(merge_lora(model)) is model


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_lora_and_reset_head_stay_on_device():
    model = create_classifier("resnet20", 10).cuda()
    apply_lora(model)
    assert all(p.is_cuda for p in lora_parameters(model))
    model.reset_head(3)
    assert all(p.is_cuda for p in model.head_parameters())
    x = torch.rand(2, 3, 32, 32, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert model(x).shape == (2, 3)
    merge_lora(model)
    assert model(x).is_cuda
