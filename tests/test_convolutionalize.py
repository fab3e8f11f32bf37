"""convolutionalize: the dense net equals the classifier run on every window (at the net's stride).

Tolerance: fp64 nets, max abs difference <= 1e-10 (only summation order differs); fp32 patch CNN
logits <= 1e-4 relative to the logit scale, and identical argmax wherever the top-2 margin
exceeds that tolerance.
"""

import pytest
import torch
from torch import nn

from fcnfast.hsi.engine import predict_dense, predict_patches
from fcnfast.hsi.models import PatchCNN
from fcnfast.models.convolutionalize import convolutionalize


def _windows(net, x, window, stride):
    """The classifier on every window, top-left corners at multiples of the stride: (N, K, oh, ow)."""
    wh, ww = window
    sy, sx = stride
    n, _, h, w = x.shape
    rows = range(0, h - wh + 1, sy)
    cols = range(0, w - ww + 1, sx)
    out = torch.stack(
        [torch.stack([net(x[:, :, r : r + wh, c : c + ww]) for c in cols], -1) for r in rows], -2
    )
    return out


def _randomize_bn(net):
    for m in net.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)


CASES = {
    "valid_convs": (
        lambda: nn.Sequential(
            nn.Conv2d(3, 8, 3),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 6, 3),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(6 * 3 * 3, 16),
            nn.ReLU(),
            nn.Dropout(0.5),
            nn.Linear(16, 5),
        ),
        3,
        (7, 7),
    ),
    "pooling_stride2": (
        lambda: nn.Sequential(
            nn.Conv2d(2, 4, 3),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(4, 4, 3),
            nn.Flatten(),
            nn.Linear(4 * 2 * 2, 7),
            nn.Tanh(),
            nn.Linear(7, 3),
        ),
        2,
        (10, 10),
    ),
    "rectangular_bn1d_nested": (
        lambda: nn.Sequential(
            nn.Sequential(nn.Conv2d(4, 5, (3, 1)), nn.LeakyReLU()),
            nn.AvgPool2d((1, 2)),
            nn.Flatten(),
            nn.Sequential(nn.Linear(5 * 3 * 3, 9), nn.BatchNorm1d(9), nn.GELU()),
            nn.Linear(9, 4),
            nn.LogSoftmax(dim=1),
        ),
        4,
        (5, 6),
    ),
    "strided_conv_head_only": (
        lambda: nn.Sequential(nn.Conv2d(3, 4, 2, stride=2), nn.Flatten(), nn.Linear(4 * 2 * 3, 2)),
        3,
        (4, 6),
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_dense_equals_every_window(case):
    build, channels, window = CASES[case]
    torch.manual_seed(0)
    net = build().double()
    _randomize_bn(net)
    net.eval()
    dense = convolutionalize(net, window).eval()
    assert dense.window == window
    for m in dense.modules():
        assert not isinstance(m, (nn.Linear, nn.Flatten)), "left a %s in the dense net" % m
    x = torch.randn(2, channels, window[0] + 9, window[1] + 7, dtype=torch.float64)
    with torch.no_grad():
        expected = _windows(net, x, window, dense.stride)
        actual = dense(x)
    assert actual.shape == expected.shape
    assert (actual - expected).abs().max().item() <= 1e-10


def test_stride_is_product_of_layer_strides():
    build, _, window = CASES["pooling_stride2"]
    assert convolutionalize(build(), window).stride == (2, 2)
    assert convolutionalize(CASES["valid_convs"][0](), (7, 7)).stride == (1, 1)


def test_input_size_with_channels_and_no_modification():
    torch.manual_seed(1)
    net = CASES["valid_convs"][0]().eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    dense = convolutionalize(net, (3, 7, 7))
    assert dense[-1].weight.shape == (5, 16, 1, 1)
    first_head = [m for m in dense if isinstance(m, nn.Conv2d)][2]
    assert first_head.kernel_size == (3, 3) and first_head.weight.shape == (16, 6, 3, 3)
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert any(isinstance(m, nn.Linear) for m in net)


def test_patch_cnn_dense_equals_patch_by_patch():
    """The HSI claim: the trained-shape patch CNN, convolutionalized, gives the same per-pixel
    predictions as classifying the reflect-padded patch of every pixel."""
    torch.manual_seed(0)
    model = PatchCNN(bands=6, num_classes=4, window=9, width=8, hidden=16).eval()
    _randomize_bn(model)
    scene = torch.randn(6, 23, 19)
    per_patch = predict_patches(model, scene, batch_size=100)
    dense = predict_dense(model, scene)
    assert dense.shape == per_patch.shape == (4, 23, 19)
    tol = 1e-4 * max(1.0, per_patch.abs().max().item())
    assert (dense - per_patch).abs().max().item() <= tol
    top2 = per_patch.topk(2, dim=0).values
    clear = (top2[0] - top2[1]) > 2 * tol
    assert clear.float().mean() > 0.9
    assert torch.equal(dense.argmax(0)[clear], per_patch.argmax(0)[clear])


def test_padded_conv_warns():
    net = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Flatten(), nn.Linear(2 * 5 * 5, 3))
    with pytest.warns(UserWarning, match="padded"):
        convolutionalize(net, (5, 5))


@pytest.mark.parametrize(
    "net, size, match",
    [
        (nn.Sequential(nn.Conv2d(1, 2, 3), nn.Linear(2, 3)), (5, 5), "exactly one nn.Flatten"),
        (nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten()), (5, 5), "no nn.Linear"),
        (nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(7, 3)), (5, 5), "in_features=7"),
        (
            nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(18, 3), nn.Softmax(dim=0)),
            (5, 5),
            "dim=0",
        ),
        (
            nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(18, 3), nn.LayerNorm(3)),
            (5, 5),
            "LayerNorm",
        ),
        (nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(18, 3)), (5,), "input_size"),
        (nn.Linear(3, 3), (5, 5), "nn.Sequential"),
    ],
)
def test_errors(net, size, match):
    with pytest.raises(ValueError, match=match):
        convolutionalize(net, size)
