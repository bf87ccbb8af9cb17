import os
import sys

import pytest
import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from nets import MODELS, summary  # noqa: E402

NAMES = ['alexnet', 'vgg11', 'resnet34', 'resnet50', 'resnet101', 'googlenet']
PARAMS = {'alexnet': 58_301_829, 'vgg11': 128_786_821, 'resnet34': 21_287_237,
          'resnet50': 23_518_277, 'resnet101': 42_510_405, 'googlenet': 10_326_191}


@pytest.fixture(scope='module', autouse=True)
def one_thread():
    """Batch-1/2 forwards gain little from threads, and on busy shared cores
    spinning intra-op threads made this file 2-3x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def shaped(name, **kwargs):
    """MODELS[name](**kwargs) in eval mode, its weights and buffers zeros: these tests
    check shapes and counts, and drawing VGG11's 129M random weights alone took seconds
    of a quick suite. Built on the meta device (nothing allocated or initialised), then
    given real, zeroed memory."""
    with torch.device('meta'):
        model = MODELS[name](**kwargs)
    model = model.to_empty(device='cpu')
    with torch.no_grad():
        for t in (*model.parameters(), *model.buffers()):
            t.zero_()
    return model.eval()


@pytest.fixture(scope='module')
def build():
    """Each default model built once for the whole module (shaped), in eval mode."""
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = shaped(name)
        return cache[name]
    return get


@pytest.fixture(scope='module')
def x224():
    return torch.randn(1, 3, 224, 224)


def trace(model, x, names):
    """Run the named children of `model` in order; return {name: C x H x W}."""
    shapes = {}
    with torch.no_grad():
        for name in names:
            x = getattr(model, name)(x)
            shapes[name] = tuple(x.shape[1:])
    return shapes


def test_models_dict():
    assert sorted(MODELS) == sorted(NAMES)


@pytest.mark.parametrize('name', NAMES)
def test_param_count(build, name):
    assert sum(p.numel() for p in build(name).parameters()) == PARAMS[name]


def feature_shapes(model, x, kinds):
    """C x H x W after each layer of `model.features` that is one of `kinds`."""
    shapes = []
    with torch.no_grad():
        for layer in model.features:
            x = layer(x)
            if isinstance(layer, kinds):
                shapes.append(tuple(x.shape[1:]))
    return shapes


def test_alexnet_shapes(build, x224):
    shapes = feature_shapes(build('alexnet'), x224, (nn.Conv2d, nn.MaxPool2d))
    assert shapes == [(96, 55, 55), (96, 27, 27), (256, 27, 27), (256, 13, 13),
                      (384, 13, 13), (384, 13, 13), (256, 13, 13), (256, 6, 6)]


def test_vgg11_block_shapes(build, x224):
    shapes = feature_shapes(build('vgg11'), x224, nn.MaxPool2d)
    assert shapes == [(64, 112, 112), (128, 56, 56), (256, 28, 28), (512, 14, 14), (512, 7, 7)]


@pytest.mark.parametrize('name, width', [('resnet34', 1), ('resnet50', 4)])
def test_resnet_stage_shapes(build, x224, name, width):
    names = ['conv1', 'bn1', 'relu', 'maxpool', 'layer1', 'layer2', 'layer3', 'layer4']
    shapes = trace(build(name), x224, names)
    assert shapes['relu'] == (64, 112, 112)
    assert shapes['maxpool'] == (64, 56, 56)
    assert [shapes[f'layer{i}'] for i in range(1, 5)] == [
        (64 * width, 56, 56), (128 * width, 28, 28), (256 * width, 14, 14), (512 * width, 7, 7)]


def test_googlenet_stage_shapes(build, x224):
    expected = {
        'conv1': (64, 112, 112), 'maxpool1': (64, 56, 56), 'conv2': (64, 56, 56),
        'conv3': (192, 56, 56), 'maxpool2': (192, 28, 28),
        'inception3a': (256, 28, 28), 'inception3b': (480, 28, 28), 'maxpool3': (480, 14, 14),
        'inception4a': (512, 14, 14), 'inception4b': (512, 14, 14), 'inception4c': (512, 14, 14),
        'inception4d': (528, 14, 14), 'inception4e': (832, 14, 14), 'maxpool4': (832, 7, 7),
        'inception5a': (832, 7, 7), 'inception5b': (1024, 7, 7)}
    assert trace(build('googlenet'), x224, list(expected)) == expected


@pytest.mark.parametrize('name', NAMES)
def test_logits_at_min_size(build, name):
    model = build(name)
    with torch.no_grad():
        assert model(torch.randn(2, 3, model.min_size, model.min_size)).shape == (2, 5)


@pytest.mark.slow  # a batch of 224 px faces through every network: seconds; the stage shapes above are at 224
@pytest.mark.parametrize('name', NAMES)
def test_logits_at_224(build, name):
    with torch.no_grad():
        assert build(name)(torch.randn(2, 3, 224, 224)).shape == (2, 5)


@pytest.mark.parametrize('name', NAMES)
def test_too_small_input_raises(build, name):
    model = build(name)
    small = model.min_size - 1
    message = f'at least {model.min_size}x{model.min_size} pixels, got {small}x{small}'
    with pytest.raises(ValueError, match=message):
        model(torch.randn(1, 3, small, small))


@pytest.mark.parametrize('name', NAMES)
def test_grayscale_and_num_classes(name):
    model = shaped(name, num_classes=7, in_channels=1)
    with torch.no_grad():
        assert model(torch.randn(2, 1, model.min_size, model.min_size)).shape == (2, 7)


def test_googlenet_aux_outputs():
    model = MODELS['googlenet']()
    x = torch.randn(2, 3, 64, 64)
    out = model.train()(x)
    assert isinstance(out, tuple) and [o.shape for o in out] == [(2, 5)] * 3
    with torch.no_grad():
        assert model.eval()(x).shape == (2, 5)


def test_resnet_without_top():
    from nets import BasicBlock, ResNet
    model = ResNet(BasicBlock, [1, 1, 1, 1], include_top=False).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 64)).shape == (2, 512)


@pytest.mark.parametrize('name', ['alexnet', 'googlenet'])
def test_summary(build, name):
    text = summary(build(name))
    assert text.splitlines()[-2].endswith('1 x 5')
    assert f'Total params: {PARAMS[name]:,}' in text
