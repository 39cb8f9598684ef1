"""Models users already have: reference-implementation checkpoints, timm / Hub layouts, diffusers denoisers.

The reference side is re-created here, independently of our models, as the reference repositories build it
(locuslab/smoothing ``archs/cifar_resnet.py`` + ``architectures.py`` + ``datasets.NormalizeLayer``; RuntianZ/macer
``model.py``; torchvision's ResNet-50 in ``DataParallel`` for ImageNet): random weights (incl. BatchNorm
statistics) are saved in their layout, loaded through our loader, and the logits must equal theirs.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from smoothtransfer.errors import UserError
from smoothtransfer.models.checkpoint import load_classifier, save_checkpoint
from smoothtransfer.models.external import load_external, load_peer_checkpoint, parse_source

CIFAR10 = ([0.4914, 0.4822, 0.4465], [0.2023, 0.1994, 0.2010])
CIFAR100 = ([0.5071, 0.4867, 0.4408], [0.2675, 0.2565, 0.2761])
IMAGENET = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])


# ---------------------------------------------------------------------------------------------------- the reference side


class RefNormalizeLayer(nn.Module):
    """Their NormalizeLayer: mean/std are plain tensor attributes (not buffers), so not in the state_dict."""

    def __init__(self, means, sds=None):
        super().__init__()
        self.means, self.sds = torch.tensor(means), None if sds is None else torch.tensor(sds)

    def forward(self, x):
        b, _, h, w = x.shape
        out = x - self.means.repeat((b, h, w, 1)).permute(0, 3, 1, 2)
        if self.sds is not None:  # None: SmoothAdv's InputCenterLayer
            out = out / self.sds.repeat((b, h, w, 1)).permute(0, 3, 1, 2)
        return out


class RefBasicBlock(nn.Module):
    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        residual = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + residual)


class RefCifarResNet(nn.Module):
    """bearpaw's CIFAR ResNet as locuslab/smoothing uses it (BasicBlock, depth 6n+2, AvgPool2d(8))."""

    def __init__(self, depth, num_classes=10):
        super().__init__()
        n = (depth - 2) // 6
        self.inplanes = 16
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(16, n)
        self.layer2 = self._make_layer(32, n, stride=2)
        self.layer3 = self._make_layer(64, n, stride=2)
        self.avgpool = nn.AvgPool2d(8)
        self.fc = nn.Linear(64, num_classes)

    def _make_layer(self, planes, blocks, stride=1):
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))
        layers = [RefBasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        layers += [RefBasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.avgpool(x).view(x.size(0), -1))


def ref_architecture(arch: str, dataset: str, center: bool = False) -> nn.Module:
    """``get_architecture`` of locuslab/smoothing (and its descendants): Sequential(normalize, net)."""
    if arch == "resnet50":
        from torchvision.models import resnet50

        net = nn.DataParallel(resnet50())
    else:
        depth = 20 if arch == "cifar_resnet20" else 110
        net = RefCifarResNet(depth, 1000 if arch.startswith("imagenet32") else 100 if "100" in arch[:8] else 10)
    mean, std = {"cifar10": CIFAR10, "cifar100": CIFAR100, "imagenet": IMAGENET, "imagenet32": CIFAR10}[dataset]
    return nn.Sequential(RefNormalizeLayer(mean, None if center else std), net)


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights and BatchNorm statistics (the initial 0/1 statistics would hide a mix-up); the last norm
    of each residual branch is scaled down so that 110 layers keep the logits O(1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, nn.Conv2d):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * math.sqrt(2.0 / fan_in))
            elif isinstance(m, nn.BatchNorm2d):
                scale = 0.2 if name.endswith(("bn2", "bn3")) and "layer" in name else 1.0
                m.weight.copy_(scale * (1 + 0.2 * torch.randn(m.weight.shape, generator=g)))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
            elif isinstance(m, nn.Linear):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) / math.sqrt(m.in_features))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
    return model.eval()


def save_like_cohen(model: nn.Module, arch: str, path, legacy: bool = False) -> None:
    """train.py's checkpoint: epoch, arch, state_dict and the SGD optimizer state (after one step)."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()  # momentum buffers in the optimizer state, as after training; moves the weights (restored by caller)
    torch.save({"epoch": 90, "arch": arch, "state_dict": state, "optimizer": opt.state_dict()}, path,
               _use_new_zipfile_serialization=not legacy)


# ---------------------------------------------------------------------------------------------------- reference checkpoints


@pytest.mark.parametrize("fmt,arch,dataset,center,legacy", [
    ("cohen", "cifar_resnet20", "cifar10", False, False),
    ("consistency", "cifar_resnet110", "cifar10", False, True),  # a 2019-style (pre-zip) torch file
    ("catrs", "cifar100_resnet110", "cifar100", False, False),
    ("smoothadv-center", "cifar_resnet20", "cifar10", True, False),
    ("smoothadv", "imagenet32_resnet110", "imagenet32", False, False),
])
def test_reference_cifar_checkpoints_give_their_logits(tmp_path, fmt, arch, dataset, center, legacy):
    ref = randomize(ref_architecture(arch, dataset, center))
    before = {k: v.clone() for k, v in ref.state_dict().items()}
    path = tmp_path / "checkpoint.pth.tar"
    save_like_cohen(ref, arch, path, legacy)
    ref.load_state_dict(before)
    assert all(k.startswith("1.") for k in before)  # their layout: the normalize layer holds no tensors
    model, info = load_classifier(f"{fmt}:{path}")
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        theirs, ours = ref(x), model(x)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    assert (ours.argmax(1) == theirs.argmax(1)).all()
    spec = model.spec
    assert spec["input_size"] == 32 and spec["norm"] == "batch" and spec["num_classes"] == ref[1].fc.out_features
    assert spec["arch"] == ("resnet20" if arch == "cifar_resnet20" else "resnet110")
    assert info["reference_arch"] == arch and info["epoch"] == 90 and info["identity"].startswith(f"{fmt}:sha256:")


def test_cohen_imagenet_resnet50_gives_their_logits(tmp_path):
    ref = randomize(ref_architecture("resnet50", "imagenet"))
    assert next(iter(ref.state_dict())).startswith("1.module.")
    torch.save({"epoch": 90, "arch": "resnet50", "state_dict": ref.state_dict()}, tmp_path / "r50.pth.tar")
    model, info = load_classifier(f"cohen:{tmp_path / 'r50.pth.tar'}")
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))  # any size; 224 in their runs
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=1e-4, atol=1e-4)
    assert model.spec["input_size"] == 224 and model.spec["mean"] == IMAGENET[0] and info["dataset"] == "imagenet"


def test_macer_checkpoint_has_no_input_normalisation(tmp_path):
    """RuntianZ/macer saves {'net': base_model.state_dict(), 'epoch'} of a bare ResNet-110 fed [0,1] pixels."""
    ref = randomize(RefCifarResNet(110))
    torch.save({"net": ref.state_dict(), "epoch": 440}, tmp_path / "440.pth")
    model, info = load_classifier(f"macer:{tmp_path / '440.pth'}")
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=1e-4, atol=1e-4)
    assert model.spec["mean"] == [0.0] * 3 and model.spec["std"] == [1.0] * 3 and info["epoch"] == 440


def test_converted_reference_model_saves_as_a_smoothtransfer_checkpoint(tmp_path):
    ref = randomize(ref_architecture("cifar_resnet20", "cifar10"))
    torch.save({"arch": "cifar_resnet20", "state_dict": ref.state_dict()}, tmp_path / "c.pt")
    model, info = load_peer_checkpoint(tmp_path / "c.pt", "cohen")
    save_checkpoint(tmp_path / "ours.pt", model, classes=None, dataset=info["dataset"], config={})
    again, _ = load_classifier(tmp_path / "ours.pt")
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(again(x), ref(x), rtol=1e-4, atol=1e-4)


def test_reference_checkpoint_errors(tmp_path):
    ref = randomize(ref_architecture("cifar_resnet20", "cifar10"))
    torch.save({"arch": "cifar_resnet20", "state_dict": ref.state_dict()}, tmp_path / "cohen.pt")
    torch.save({"net": ref[1].state_dict()}, tmp_path / "macer.pt")
    torch.save({"arch": "lenet", "state_dict": ref.state_dict()}, tmp_path / "lenet.pt")
    torch.save({"arch": "cifar_resnet110", "state_dict": ref.state_dict()}, tmp_path / "liar.pt")
    torch.save({"arch": "cifar_resnet20", "state_dict": ref.state_dict(), "args": torch.nn.ReLU()}, tmp_path / "pk.pt")
    cases = [
        (f"macer:{tmp_path / 'cohen.pt'}", "cohen:PATH"),
        (f"cohen:{tmp_path / 'macer.pt'}", "macer:PATH"),
        (f"cohen:{tmp_path / 'lenet.pt'}", "'lenet' is not supported"),
        (f"cohen:{tmp_path / 'liar.pt'}", "weights are a resnet20"),
        (f"cohen:{tmp_path / 'pk.pt'}", "refusing to load"),
        (f"cohen:{tmp_path / 'missing.pt'}", "not found"),
        ("cohen:", "names no path"),
    ]
    for arg, msg in cases:
        with pytest.raises(UserError, match=msg.replace("(", r"\(")):
            load_classifier(arg)
    with pytest.raises(UserError, match="pass it without"):  # a smoothtransfer checkpoint given a prefix
        model, _ = load_peer_checkpoint(tmp_path / "cohen.pt")
        save_checkpoint(tmp_path / "ours.pt", model, classes=None, dataset=None, config={})
        load_classifier(f"cohen:{tmp_path / 'ours.pt'}")


def test_parse_source(tmp_path):
    odd = tmp_path / "cohen:weird.pt"  # an existing file is a path, whatever its name
    odd.write_bytes(b"x")
    assert parse_source(odd) is None and parse_source(tmp_path / "plain.pt") is None
    assert str(parse_source("hf-hub:timm/resnet18.a1_in1k")) == "hf-hub:timm/resnet18.a1_in1k"
    assert parse_source("timm:resnet10t").fmt == "timm"
    with pytest.raises(UserError, match="not a directory"):
        parse_source(f"local-dir:{tmp_path / 'nope'}")


# ---------------------------------------------------------------------------------------------------- timm / Hub layouts


def _timm_reference(name: str, num_classes: int, seed: int = 0):
    import timm

    torch.manual_seed(seed)
    model = timm.create_model(name, num_classes=num_classes).eval()
    with torch.no_grad():
        for m in model.modules():  # non-trivial BN statistics
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model


def _their_preprocessing(model, x: torch.Tensor) -> torch.Tensor:
    """timm's preprocessing for a whole image: resize to the model's input size (its interpolation), then
    normalise with its mean/std (torch ops on the [0,1] tensor instead of PIL)."""
    cfg = model.pretrained_cfg
    size = tuple(cfg["input_size"][1:])
    x = F.interpolate(x, size=size, mode=cfg["interpolation"], align_corners=False)
    mean, std = torch.tensor(cfg["mean"]).view(1, -1, 1, 1), torch.tensor(cfg["std"]).view(1, -1, 1, 1)
    return (x - mean) / std


@pytest.mark.parametrize("name", ["test_vit.r160_in1k", "test_resnet.r160_in1k"])
def test_timm_save_pretrained_dir_loads_with_its_preprocessing(tmp_path, name):
    from timm.models import save_for_hf

    ref = _timm_reference(name, num_classes=5)
    save_for_hf(ref, str(tmp_path / "hub"), safe_serialization=True)
    assert {p.name for p in (tmp_path / "hub").iterdir()} >= {"config.json", "model.safetensors"}
    x = torch.rand(3, 3, 32, 32)  # dataset resolution; the model's own is 160
    for arg in (f"local-dir:{tmp_path / 'hub'}", str(tmp_path / "hub")):
        model, info = load_classifier(arg)
        with torch.no_grad():
            torch.testing.assert_close(model(x), ref(_their_preprocessing(ref, x)), rtol=1e-4, atol=1e-4)
    spec = model.spec
    assert spec["arch"] == "timm" and spec["resizes_input"] and spec["kwargs"]["image_size"] == [160, 160]
    assert spec["mean"] == list(ref.pretrained_cfg["mean"]) and info["identity"].startswith("local-dir:sha256:")
    # a converted checkpoint rebuilds offline from its spec
    save_checkpoint(tmp_path / "ours.pt", model, classes=None, dataset=None, config={})
    again, _ = load_classifier(tmp_path / "ours.pt")
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x))


def test_timm_pretrained_file_overlay(tmp_path):
    """``timm:NAME`` goes through timm.create_model(pretrained=True); pretrained_cfg_overlay=dict(file=...)
    reads the weights from a local file instead of downloading them."""
    from safetensors.torch import save_file

    ref = _timm_reference("test_resnet.r160_in1k", num_classes=1000, seed=3)
    save_file(ref.state_dict(), str(tmp_path / "w.safetensors"))
    model, info = load_external("timm:test_resnet.r160_in1k", pretrained_file=tmp_path / "w.safetensors")
    x = torch.rand(2, 3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(_their_preprocessing(ref, x)), rtol=1e-4, atol=1e-4)
    assert model.spec["kwargs"]["interpolation"] == "bilinear" and model.spec["num_classes"] == 1000


def test_hf_hub_id_reads_the_hub_layout(tmp_path, monkeypatch):
    """``hf-hub:ORG/NAME`` downloads config.json and weights with huggingface_hub; here the "download"
    returns files written locally in the Hub layout (legacy pytorch_model.bin only)."""
    import huggingface_hub
    from timm.models import save_for_hf

    ref = _timm_reference("test_resnet.r160_in1k", num_classes=3)
    save_for_hf(ref, str(tmp_path / "snap"), safe_serialization=False)
    asked = []

    def fake_download(repo, filename, revision=None, **kw):
        asked.append((repo, filename, revision))
        f = tmp_path / "snap" / filename
        if not f.exists():
            raise huggingface_hub.errors.EntryNotFoundError(f"{filename} not in {repo}")
        return str(f)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    model, info = load_classifier("hf-hub:someone/tiny@abc123")
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(_their_preprocessing(ref, x)), rtol=1e-4, atol=1e-4)
    assert ("someone/tiny", "config.json", "abc123") in asked and info["source"] == "hf-hub:someone/tiny@abc123"


def test_hub_errors(tmp_path, monkeypatch):
    import huggingface_hub

    def offline(*a, **k):
        raise huggingface_hub.errors.LocalEntryNotFoundError("offline and not in the cache")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(UserError, match="could not get the model"):
        load_classifier("hf-hub:timm/resnet18.a1_in1k")
    d = tmp_path / "tf"
    d.mkdir()
    (d / "config.json").write_text('{"architectures": ["ViTForImageClassification"]}')
    (d / "model.safetensors").write_bytes(b"")
    with pytest.raises(UserError, match="not a timm model config"):
        load_classifier(f"local-dir:{d}")


# ---------------------------------------------------------------------------------------------------- diffusers denoisers


def _tiny_unet(size: int = 32, seed: int = 0):
    from smoothtransfer.models.denoisers import create_diffusion_unet

    torch.manual_seed(seed)
    return create_diffusion_unet(size, 3, "tiny").eval()


def save_like_google_ddpm(unet, directory) -> None:
    """The layout of google/ddpm-cifar10-32: UNet config + pickled weights and the scheduler config at the repo
    root (the scheduler config in its old form: no prediction_type, no clip_sample_range), model_index.json."""
    import json

    unet.save_pretrained(directory, safe_serialization=False)
    (directory / "scheduler_config.json").write_text(json.dumps({
        "_class_name": "DDPMScheduler", "beta_end": 0.02, "beta_schedule": "linear", "beta_start": 0.0001,
        "clip_sample": True, "num_train_timesteps": 1000, "trained_betas": None, "variance_type": "fixed_large"}))
    (directory / "model_index.json").write_text(json.dumps({
        "_class_name": "DDPMPipeline", "scheduler": ["diffusers", "DDPMScheduler"], "unet": ["diffusers", "UNet2DModel"]}))


def one_shot_reference(unet, x_noisy: torch.Tensor, sigma: float) -> torch.Tensor:
    """Carlini et al.'s one-shot denoising, written out from the DDPM schedule (linear β 1e-4 … 0.02, T = 1000)."""
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    acp = torch.cumprod(1 - betas, 0)
    t = int(torch.argmin(((1 - acp) / acp - (2 * sigma) ** 2).abs()))
    a = float(acp[t])
    x_t = math.sqrt(a) * (2 * x_noisy - 1)
    eps = unet(x_t, torch.full((x_noisy.shape[0],), t), return_dict=False)[0]
    x0 = (x_t - math.sqrt(1 - a) * eps) / math.sqrt(a)
    return (x0.clamp(-1, 1) + 1) / 2


def test_google_ddpm_layout_is_the_one_shot_denoiser(tmp_path):
    from smoothtransfer.models.denoisers import DiffusionDenoiser, load_denoiser

    unet = _tiny_unet()
    save_like_google_ddpm(unet, tmp_path / "ddpm")
    assert (tmp_path / "ddpm" / "diffusion_pytorch_model.bin").exists()
    den = load_denoiser(tmp_path / "ddpm")
    assert isinstance(den, DiffusionDenoiser) and den.prediction_type == "epsilon" and den.image_size == 32
    x = torch.rand(2, 3, 32, 32)
    for sigma in (0.12, 0.25, 0.5, 1.0):
        x_noisy = x + sigma * torch.randn_like(x)
        with torch.no_grad():
            torch.testing.assert_close(den(x_noisy, sigma), one_shot_reference(unet, x_noisy, sigma),
                                       rtol=1e-4, atol=1e-4)


def test_ddpm_pipeline_layout_and_hub_prefix(tmp_path, monkeypatch):
    from diffusers import DDPMPipeline

    from smoothtransfer.models import denoisers
    from smoothtransfer.models.denoisers import create_ddpm_scheduler, load_denoiser

    unet = _tiny_unet()
    DDPMPipeline(unet=unet, scheduler=create_ddpm_scheduler()).save_pretrained(tmp_path / "pipe")
    x_noisy = torch.rand(1, 3, 32, 32) + 0.25 * torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(load_denoiser(tmp_path / "pipe")(x_noisy, 0.25),
                                   one_shot_reference(unet, x_noisy, 0.25), rtol=1e-4, atol=1e-4)
    asked = []
    monkeypatch.setattr(denoisers.DiffusionDenoiser, "from_pretrained",
                        classmethod(lambda cls, src, **kw: asked.append(src) or cls(unet, create_ddpm_scheduler())))
    load_denoiser("hf-hub:google/ddpm-cifar10-32")
    load_denoiser("google/ddpm-cifar10-32")
    assert asked == ["google/ddpm-cifar10-32"] * 2


def test_denoiser_in_front_of_a_resizing_timm_classifier(tmp_path):
    """Carlini et al.'s set-up: a 32 px diffusion denoiser, then an off-the-shelf classifier at its own size."""
    from timm.models import save_for_hf

    from smoothtransfer.models.denoisers import DenoisedClassifier, DiffusionDenoiser, create_ddpm_scheduler

    ref = _timm_reference("test_vit.r160_in1k", num_classes=4)
    save_for_hf(ref, str(tmp_path / "vit"), safe_serialization=True)
    classifier, _ = load_classifier(tmp_path / "vit")
    unet = _tiny_unet()
    dc = DenoisedClassifier(DiffusionDenoiser(unet, create_ddpm_scheduler()), classifier, 0.5)
    x_noisy = torch.rand(2, 3, 32, 32) + 0.5 * torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = ref(_their_preprocessing(ref, one_shot_reference(unet, x_noisy, 0.5)))
        torch.testing.assert_close(dc(x_noisy), expected, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------------- certify CLI


def _imagefolder(root, classes=("cat", "dog"), n=2, size=32) -> str:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                Image.fromarray((rng.random((size, size, 3)) * 255).astype(np.uint8)).save(root / split / c / f"{i}.png")
    return f"imagefolder:{root}"


def _certify(argv) -> int:
    import argparse

    from smoothtransfer.commands import certify

    p = argparse.ArgumentParser()
    certify.add_arguments(p)
    return certify.run(p.parse_args(argv))


def test_certify_cli_with_models_trained_elsewhere(tmp_path, monkeypatch, capsys):
    import json

    from timm.models import save_for_hf

    monkeypatch.setenv("SMOOTHTRANSFER_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    data = _imagefolder(tmp_path / "data")
    ref = randomize(ref_architecture("cifar_resnet20", "cifar10"))
    ref[1].fc = nn.Linear(64, 2)
    (tmp_path / "noise_0.25").mkdir()
    torch.save({"epoch": 90, "arch": "cifar_resnet20", "state_dict": ref.state_dict()},
               tmp_path / "noise_0.25" / "checkpoint.pth.tar")
    save_for_hf(_timm_reference("test_resnet.r160_in1k", num_classes=2), str(tmp_path / "hub"),
                safe_serialization=True)
    save_like_google_ddpm(_tiny_unet(), tmp_path / "ddpm")
    common = ["--dataset", data, "--sigma", "0.25", "--n0", "8", "--n", "16", "--batch-size", "16", "--max", "2",
              "--device", "cpu", "--workers", "1", "--no-progress"]
    runs = {
        "cohen": ["--checkpoint", "cohen:noise_0.25/checkpoint.pth.tar"],
        "hub": ["--checkpoint", f"local-dir:{tmp_path / 'hub'}", "--out", "hub-run"],
        "denoised": ["--checkpoint", "cohen:noise_0.25/checkpoint.pth.tar", "--denoiser", str(tmp_path / "ddpm"),
                     "--out", "dn-run"],
    }
    for name, argv in runs.items():
        assert _certify([*argv, *common]) == 0, name
    outs = [d for d in (tmp_path / "runs" / "certify").iterdir()]
    assert len(outs) == 1 and outs[0].name.startswith("cohen-noise_0.25-checkpoint"), outs
    out = outs[0]
    side = json.loads((out / "sigma_0.25.json").read_text())
    assert side["checkpoint"].startswith("cohen:") and "sha256" in json.dumps(side)
    assert len((tmp_path / "hub-run" / "sigma_0.25.tsv").read_text().splitlines()) == 3
    assert len((tmp_path / "dn-run" / "sigma_0.25.tsv").read_text().splitlines()) == 3
    # rerunning resumes (same identity); the same file read in another format is another model
    assert _certify([*runs["cohen"], *common]) == 0
    with pytest.raises(UserError, match="smoothadv-center:sha256"):
        _certify(["--checkpoint", "smoothadv-center:noise_0.25/checkpoint.pth.tar", "--out", str(out), *common])


def test_noise_profile_cli_with_a_reference_checkpoint(tmp_path, monkeypatch):
    import argparse
    import json

    from smoothtransfer.commands import noise_profile

    monkeypatch.setenv("SMOOTHTRANSFER_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    data = _imagefolder(tmp_path / "data")
    ref = randomize(RefCifarResNet(20, num_classes=2))
    torch.save({"net": ref.state_dict(), "epoch": 3}, tmp_path / "3.pth")
    p = argparse.ArgumentParser()
    noise_profile.add_arguments(p)
    args = p.parse_args(["--checkpoint", "macer:3.pth", "--dataset", data, "--sigmas", "0", "0.25", "--device", "cpu",
                         "--max", "2"])
    assert noise_profile.run(args) == 0
    out = next((tmp_path / "runs" / "noise_profile").iterdir())
    assert out.name.startswith("macer-") and json.loads(next(out.glob("*.json")).read_text())


def test_plain_path_to_a_reference_checkpoint_names_the_prefix(tmp_path):
    ref = randomize(ref_architecture("cifar_resnet20", "cifar10"))
    torch.save({"arch": "cifar_resnet20", "state_dict": ref.state_dict()}, tmp_path / "c.pth.tar")
    torch.save({"net": ref[1].state_dict(), "epoch": 1}, tmp_path / "m.pth")
    with pytest.raises(UserError, match=f"pass cohen:{tmp_path / 'c.pth.tar'}"):
        load_classifier(tmp_path / "c.pth.tar")
    with pytest.raises(UserError, match=f"pass macer:{tmp_path / 'm.pth'}"):
        load_classifier(tmp_path / "m.pth")


# ---------------------------------------------------------------------------------------------------- fine-tuning


def test_finetune_from_models_trained_elsewhere(tmp_path, monkeypatch):
    """finetune --init cohen:FILE / local-dir:DIR: a fresh head for the downstream classes, the rest theirs."""
    from timm.models import save_for_hf

    from smoothtransfer.config import load_train_config
    from smoothtransfer.train.loop import run_training

    monkeypatch.setenv("SMOOTHTRANSFER_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "down"
    _imagefolder(root, classes=("a", "b", "c"), n=4)
    down = root / "train"
    ref = randomize(ref_architecture("cifar_resnet20", "cifar10"))
    torch.save({"arch": "cifar_resnet20", "state_dict": ref.state_dict()}, tmp_path / "cohen.pt")
    tref = _timm_reference("test_resnet.r160_in1k", num_classes=7)
    save_for_hf(tref, str(tmp_path / "hub"), safe_serialization=True)
    base = ["batch_size=4", "eval_batch_size=16", "progress=false", "tensorboard=false", "device=cpu",
            "data.val_fraction=0.25", "checkpoint_every=0", "optim.lr=0.01", "amp=none", "epochs=1", "stage=finetune",
            f"data.dataset=imagefolder:{down}"]
    for name, init, mode in (("cohen", f"cohen:{tmp_path / 'cohen.pt'}", "full"),
                             ("hub", f"local-dir:{tmp_path / 'hub'}", "fixed")):
        path = run_training(load_train_config(None, [*base, f"init={init}", f"mode={mode}", f"out={tmp_path / name}"]))
        model, ckpt = load_classifier(path)
        assert model.num_classes == 3 and ckpt["classes"] == ["a", "b", "c"]
        if name == "hub":  # fixed features: every weight but the head is the hub model's
            assert model.spec["arch"] == "timm" and model.spec["resizes_input"]
            theirs = tref.state_dict()
            for k, v in model.backbone.model.state_dict().items():
                if not k.startswith("fc."):
                    assert torch.equal(v, theirs[k]), k
