"""Model registry: the paper's parameter counts (Zhang et al. 2017, appendix A), shapes, bad input."""

from __future__ import annotations

import pytest
import torch

from deepfit.models import MODELS, build_model, count_parameters
from kernelfit.errors import InputError

# Independent references: the counts printed in Zhang et al. (2017), Table 1, and the closed form
# for the MLPs (weights + biases, 28*28*3 = 2352 inputs after the centre crop).
PAPER_COUNTS = {
    "mlp-1x512": 1_209_866,
    "mlp-3x512": 1_735_178,
    "alexnet-small": 1_387_786,
    "inception-small": 1_649_402,
    "inception-small-nobn": 1_649_402,
}


def test_mlp_closed_form_matches_paper():
    assert 2352 * 512 + 512 + 512 * 10 + 10 == PAPER_COUNTS["mlp-1x512"]
    assert 2352 * 512 + 512 + 2 * (512 * 512 + 512) + 512 * 10 + 10 == PAPER_COUNTS["mlp-3x512"]


@pytest.mark.parametrize("name", sorted(PAPER_COUNTS))
def test_paper_parameter_count(name):
    torch.manual_seed(0)
    model = build_model(name, input_shape=(3, 28, 28), num_classes=10)
    assert count_parameters(model) == PAPER_COUNTS[name]
    assert MODELS[name].paper_params == PAPER_COUNTS[name]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_forward_shape_and_backward(name):
    torch.manual_seed(0)
    shape = (3, 28, 28) if name != "mlp2" else (1, 28, 28)
    model = build_model(name, input_shape=shape, num_classes=10)
    x = torch.randn(4, *shape)
    out = model(x)
    assert out.shape == (4, 10)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_mlp2_width_closed_form():
    model = build_model("mlp2", input_shape=(1, 28, 28), width=100)
    assert count_parameters(model) == 784 * 100 + 100 + 100 * 10 + 10


def test_inception_nobn_has_no_batchnorm_and_bn_has():
    bn = build_model("inception-small")
    nobn = build_model("inception-small-nobn")
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in bn.modules())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in nobn.modules())


def test_inception_spatial_path_is_28_14_7():
    # The paper mean-pools a 7x7 map: check the feature map entering the pool is 7x7.
    model = build_model("inception-small")
    seen = {}
    pool = [m for m in model.modules() if isinstance(m, torch.nn.AdaptiveAvgPool2d)][0]

    def hook(module, inputs, output):
        seen["shape"] = tuple(inputs[0].shape)  # returns None: must not replace the output

    pool.register_forward_hook(hook)
    model.eval()
    model(torch.randn(2, 3, 28, 28))
    assert seen["shape"] == (2, 336, 7, 7)


def test_alexnet_lrn_matches_tensorflow_formula():
    # TF: x / (bias + alpha * sum_{|j-i|<=4} x_j^2) ** beta with alpha = 0.001/9, bias = 1, beta = 0.75.
    model = build_model("alexnet-small")
    lrn = [m for m in model.modules() if isinstance(m, torch.nn.LocalResponseNorm)][0]
    x = torch.randn(1, 64, 3, 3, dtype=torch.float64) * 5
    sq = x**2
    ref = torch.empty_like(x)
    for i in range(64):
        lo, hi = max(0, i - 4), min(64, i + 5)
        ref[:, i] = x[:, i] / (1.0 + 0.001 / 9 * sq[:, lo:hi].sum(1)) ** 0.75
    torch.testing.assert_close(lrn(x), ref)


def test_unknown_model_lists_valid_names():
    with pytest.raises(InputError) as e:
        build_model("resnet-9000")
    for name in MODELS:
        assert name in str(e.value)


def test_wrong_input_shape_is_refused():
    model = build_model("mlp-1x512", input_shape=(3, 28, 28))
    with pytest.raises(InputError, match="28"):
        model(torch.randn(2, 3, 32, 32))


def test_too_small_image_is_refused():
    with pytest.raises(InputError, match="height/width"):
        build_model("inception-small", input_shape=(3, 2, 2))


def test_unsupported_option_is_refused():
    with pytest.raises(InputError, match="width"):
        build_model("mlp-1x512", width=10)
    with pytest.raises(InputError, match="batch norm"):
        build_model("inception-small-nobn", batch_norm=True)
