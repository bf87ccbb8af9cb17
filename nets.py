"""The four CNNs of the report: AlexNet, VGG11, ResNet34/50/101 and GoogLeNet.

Written from the papers and torchvision's layouts, without pretrained weights.
Every network takes `num_classes` and `in_channels` (1 for grayscale), pools
adaptively before its classifier so other image sizes work, states its minimum
input side as `min_size`, and carries the shapes for a 3 x 224 x 224 input in
comments. `MODELS` maps a name to a factory; `summary` prints a shape table.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


def _check_size(x, min_size, name):
    # A clear message beats PyTorch's "output size is too small" from deep inside.
    h, w = x.shape[-2:]
    if min(h, w) < min_size:
        raise ValueError(f'{name} needs inputs of at least {min_size}x{min_size} pixels, '
                         f'got {h}x{w}; use a larger --image-size')


def _init_weights(model):
    """torchvision's scheme: Kaiming for convolutions, N(0, 0.01) for linear layers, BN as identity."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            # He et al. (2015) for ReLU nets; fan_out, as torchvision, keeps the gradients' variance.
            nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
        else:
            continue
        if m.bias is not None:
            nn.init.zeros_(m.bias)


def _classifier(in_features, num_classes, dropout_first):
    # AlexNet drops out before each hidden FC, VGG after it: same three FCs otherwise.
    layers = []
    for width in (in_features, 4096):
        fc, drop = [nn.Linear(width, 4096), nn.ReLU(inplace=True)], [nn.Dropout(0.5)]
        layers += drop + fc if dropout_first else fc + drop
    return nn.Sequential(*layers, nn.Linear(4096, num_classes))


class _PlainNet(nn.Module):
    """features -> avgpool -> classifier: the plain-stack layout of AlexNet and VGG."""

    def forward(self, x):
        _check_size(x, self.min_size, type(self).__name__)  # N x 3 x 224 x 224
        x = self.features(x)  # AlexNet: N x 256 x 6 x 6, VGG: N x 512 x 7 x 7
        x = self.avgpool(x)  # AlexNet: N x 256 x 6 x 6, VGG: N x 512 x 7 x 7
        x = torch.flatten(x, 1)  # AlexNet: N x 9216, VGG: N x 25088
        x = self.classifier(x)  # N x num_classes
        return x


class AlexNet(_PlainNet):
    """AlexNet (Krizhevsky et al., 2012) as in the report: 96-256-384-384-256.

    One-GPU layout without LRN (the VGG paper found LRN does not help). Needs
    inputs of at least 63x63: the stride-4 stem and three stride-2 pools must
    leave a 1x1 map. 58,301,829 parameters with 5 classes.
    """
    min_size = 63

    def __init__(self, num_classes=5, in_channels=3):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 96, kernel_size=11, stride=4, padding=2),  # 96 x 55 x 55
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),  # overlapping pool, 96 x 27 x 27
            nn.Conv2d(96, 256, kernel_size=5, padding=2),  # 256 x 27 x 27
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),  # 256 x 13 x 13
            nn.Conv2d(256, 384, kernel_size=3, padding=1),  # 384 x 13 x 13
            nn.ReLU(inplace=True),
            nn.Conv2d(384, 384, kernel_size=3, padding=1),  # 384 x 13 x 13
            nn.ReLU(inplace=True),
            nn.Conv2d(384, 256, kernel_size=3, padding=1),  # 256 x 13 x 13
            # The report's text has no ReLU here; classic AlexNet has one, and so do we.
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),  # 256 x 6 x 6
        )
        self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
        self.classifier = _classifier(256 * 6 * 6, num_classes, dropout_first=True)
        _init_weights(self)


CFGS = {'vgg11': [64, 'M', 128, 'M', 256, 256, 'M', 512, 512, 'M', 512, 512, 'M']}


class VGG(_PlainNet):
    """VGG (Simonyan & Zisserman, 2014); `CFGS['vgg11']` is configuration A.

    No BatchNorm, as in the paper's A (BN came a year later). Needs inputs of
    at least 2**pools pixels, 32x32 for the five pools of every standard cfg.
    128,786,821 parameters for VGG11 with 5 classes, the same as torchvision.
    """
    min_size = 32

    def __init__(self, cfg, num_classes=5, in_channels=3):
        super().__init__()
        self.min_size = 2 ** cfg.count('M')  # each 2x2 pool halves (floors) the side
        layers = []
        for v in cfg:
            if v == 'M':
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                conv = nn.Conv2d(in_channels, v, kernel_size=3, padding=1)
                layers += [conv, nn.ReLU(inplace=True)]
                in_channels = v
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = _classifier(512 * 7 * 7, num_classes, dropout_first=False)
        # Kaiming convs and N(0, 0.01) FCs, as torchvision. Xavier (the paper's later choice)
        # halves the signal's variance at every ReLU, and without BN this 11-layer stack then
        # starts slower (measured on fer5: RESULTS.md, Method).
        _init_weights(self)


def _conv_bn(in_planes, out_planes, kernel_size, stride=1):
    # Bias-free: the BatchNorm that follows has its own shift.
    return nn.Sequential(
        nn.Conv2d(in_planes, out_planes, kernel_size, stride, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_planes))


class BasicBlock(nn.Module):
    """Two 3x3 conv + BN with an identity shortcut (ResNet18/34)."""
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = _conv_bn(inplanes, planes, 3, stride)
        self.conv2 = _conv_bn(planes, planes, 3)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x  # N x inplanes x H x W
        out = self.relu(self.conv1(x))  # N x planes x H/stride x W/stride
        out = self.conv2(out)  # N x planes x H/stride x W/stride
        if self.downsample is not None:
            identity = self.downsample(x)  # N x planes x H/stride x W/stride
        return self.relu(out + identity)  # N x planes x H/stride x W/stride


class Bottleneck(nn.Module):
    """1x1 squeeze, 3x3, 1x1 expand x4 (ResNet50/101).

    The stride sits on the 3x3 conv (torchvision's "v1.5"); the paper put it on
    the first 1x1, whose stride skips three quarters of its input and costs a
    little accuracy.
    """
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = _conv_bn(inplanes, planes, 1)
        self.conv2 = _conv_bn(planes, planes, 3, stride)
        self.conv3 = _conv_bn(planes, planes * self.expansion, 1)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x  # N x inplanes x H x W
        out = self.relu(self.conv1(x))  # N x planes x H x W
        out = self.relu(self.conv2(out))  # N x planes x H/stride x W/stride
        out = self.conv3(out)  # N x 4*planes x H/stride x W/stride
        if self.downsample is not None:
            identity = self.downsample(x)  # N x 4*planes x H/stride x W/stride
        return self.relu(out + identity)  # N x 4*planes x H/stride x W/stride


class ResNet(nn.Module):
    """ResNet (He et al., 2015) with BasicBlock or Bottleneck stages.

    Works down to 1x1 inputs, as torchvision states: every stride-2 step maps a
    side H to ceil(H/2), so no map ever empties (below 32 pixels layer4 just
    sees a 1x1 map). With `include_top=False` the forward returns the pooled
    512 * expansion features instead of logits. Parameters with 5 classes:
    21,287,237 (34), 23,518,277 (50), 42,510,405 (101), as torchvision.
    """
    min_size = 1

    def __init__(self, block, layers, num_classes=5, in_channels=3, include_top=True):
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.num_features = 512 * block.expansion
        self.fc = nn.Linear(self.num_features, num_classes) if include_top else nn.Identity()
        _init_weights(self)

    def _make_layer(self, block, planes, blocks, stride=1):
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            # Projection shortcut (the paper's option B) only where the shape changes.
            downsample = _conv_bn(self.inplanes, planes * block.expansion, 1, stride)
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        _check_size(x, self.min_size, type(self).__name__)  # N x 3 x 224 x 224
        x = self.conv1(x)  # N x 64 x 112 x 112
        x = self.bn1(x)  # N x 64 x 112 x 112
        x = self.relu(x)  # N x 64 x 112 x 112
        x = self.maxpool(x)  # N x 64 x 56 x 56
        x = self.layer1(x)  # N x 64 x 56 x 56 (Bottleneck: 256)
        x = self.layer2(x)  # N x 128 x 28 x 28 (Bottleneck: 512)
        x = self.layer3(x)  # N x 256 x 14 x 14 (Bottleneck: 1024)
        x = self.layer4(x)  # N x 512 x 7 x 7 (Bottleneck: 2048)
        x = self.avgpool(x)  # N x 512 x 1 x 1 (Bottleneck: 2048)
        x = torch.flatten(x, 1)  # N x 512 (Bottleneck: 2048)
        x = self.fc(x)  # N x num_classes (no top: N x 512 / 2048)
        return x


class BasicConv2d(nn.Module):
    """Conv (no bias) + BatchNorm + ReLU, GoogLeNet's building block.

    The paper has no BatchNorm (it used LRN after the stem). We add BN after
    every conv, like torchvision, because training Inception v1 from scratch
    without it is fragile: the paper needed aux heads and a careful schedule.
    """

    def __init__(self, in_channels, out_channels, **kwargs):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **kwargs)
        self.bn = nn.BatchNorm2d(out_channels)

    def forward(self, x):
        x = self.conv(x)  # N x out_channels x H' x W'
        x = self.bn(x)  # N x out_channels x H' x W'
        return F.relu(x, inplace=True)  # N x out_channels x H' x W'


def _reduce(in_channels, reduce_channels, out_channels, kernel_size):
    # 1x1 "reduction" first: the paper's trick to keep the 3x3 and 5x5 convs cheap.
    return nn.Sequential(
        BasicConv2d(in_channels, reduce_channels, kernel_size=1),
        BasicConv2d(reduce_channels, out_channels, kernel_size=kernel_size,
                    padding=kernel_size // 2))


class Inception(nn.Module):
    """Four parallel branches concatenated on channels (Szegedy et al., 2014).

    The third branch is a real 5x5 conv as in the paper; torchvision uses a 3x3
    there, a known bug kept for its pretrained weights (pytorch/vision#906).
    """

    def __init__(self, in_channels, ch1x1, ch3x3red, ch3x3, ch5x5red, ch5x5, pool_proj):
        super().__init__()
        self.branch1 = BasicConv2d(in_channels, ch1x1, kernel_size=1)
        self.branch2 = _reduce(in_channels, ch3x3red, ch3x3, 3)
        self.branch3 = _reduce(in_channels, ch5x5red, ch5x5, 5)
        self.branch4 = nn.Sequential(
            nn.MaxPool2d(kernel_size=3, stride=1, padding=1, ceil_mode=True),
            BasicConv2d(in_channels, pool_proj, kernel_size=1))

    def forward(self, x):  # shapes for 3a: N x 192 x 28 x 28 in
        branch1 = self.branch1(x)  # N x ch1x1 x H x W (3a: 64 x 28 x 28)
        branch2 = self.branch2(x)  # N x ch3x3 x H x W (3a: 128 x 28 x 28)
        branch3 = self.branch3(x)  # N x ch5x5 x H x W (3a: 32 x 28 x 28)
        branch4 = self.branch4(x)  # N x pool_proj x H x W (3a: 32 x 28 x 28)
        return torch.cat([branch1, branch2, branch3, branch4], 1)  # 3a: N x 256 x 28 x 28


class InceptionAux(nn.Module):
    """The paper's auxiliary classifier, used only in training.

    The paper pools 5x5 with stride 3, which gives 4x4 from the 14x14 maps at
    224; an adaptive pool to 4x4 keeps the FC's 2048 inputs at any image size.
    """

    def __init__(self, in_channels, num_classes):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d((4, 4))
        self.conv = BasicConv2d(in_channels, 128, kernel_size=1)
        self.fc1 = nn.Linear(128 * 4 * 4, 1024)
        self.dropout = nn.Dropout(0.7)  # the paper's heavy 70% on the small aux head
        self.fc2 = nn.Linear(1024, num_classes)

    def forward(self, x):  # aux1: N x 512 x 14 x 14 in (aux2: 528)
        x = self.avgpool(x)  # N x 512 x 4 x 4 (aux2: 528)
        x = self.conv(x)  # N x 128 x 4 x 4
        x = torch.flatten(x, 1)  # N x 2048
        x = F.relu(self.fc1(x), inplace=True)  # N x 1024
        x = self.dropout(x)  # N x 1024
        x = self.fc2(x)  # N x num_classes
        return x


class GoogLeNet(nn.Module):
    """GoogLeNet / Inception v1 (Szegedy et al., 2014) with its two aux heads.

    Deviations from the paper: BatchNorm in every conv instead of LRN (see
    BasicConv2d); max pools with ceil_mode=True, like torchvision, so 224 gives
    112 -> 56 -> 28 -> 14 -> 7; the paper's 3x3 pool before stage 5 (torchvision
    uses 2x2). Convs get Kaiming init like our other nets: with BN after each
    conv the init scale hardly matters, and torchvision's truncated normal only
    mirrors the original TensorFlow weights.
    Needs inputs of at least 31x31: the stride-2 stem and four 3x3 stride-2
    pools must leave each pool an input of at least 2 pixels.
    10,326,191 parameters with 5 classes and aux heads (5,985,957 without).
    In training with `aux_logits` the forward returns (logits, aux1, aux2);
    in eval the aux heads are skipped and it returns the logits alone.
    """
    min_size = 31

    def __init__(self, num_classes=5, in_channels=3, aux_logits=True):
        super().__init__()
        self.aux_logits = aux_logits
        self.conv1 = BasicConv2d(in_channels, 64, kernel_size=7, stride=2, padding=3)
        self.maxpool1 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.conv2 = BasicConv2d(64, 64, kernel_size=1)
        self.conv3 = BasicConv2d(64, 192, kernel_size=3, padding=1)
        self.maxpool2 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.inception3a = Inception(192, 64, 96, 128, 16, 32, 32)
        self.inception3b = Inception(256, 128, 128, 192, 32, 96, 64)
        self.maxpool3 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.inception4a = Inception(480, 192, 96, 208, 16, 48, 64)
        self.inception4b = Inception(512, 160, 112, 224, 24, 64, 64)
        self.inception4c = Inception(512, 128, 128, 256, 24, 64, 64)
        self.inception4d = Inception(512, 112, 144, 288, 32, 64, 64)
        self.inception4e = Inception(528, 256, 160, 320, 32, 128, 128)
        self.maxpool4 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.inception5a = Inception(832, 256, 160, 320, 32, 128, 128)
        self.inception5b = Inception(832, 384, 192, 384, 48, 128, 128)
        # The aux heads push gradient into the middle of the net (the paper's weight: 0.3).
        self.aux1 = InceptionAux(512, num_classes) if aux_logits else None
        self.aux2 = InceptionAux(528, num_classes) if aux_logits else None
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.dropout = nn.Dropout(0.4)
        self.fc = nn.Linear(1024, num_classes)
        _init_weights(self)

    def forward(self, x):
        _check_size(x, self.min_size, type(self).__name__)  # N x 3 x 224 x 224
        use_aux = self.training and self.aux_logits
        x = self.conv1(x)  # N x 64 x 112 x 112
        x = self.maxpool1(x)  # N x 64 x 56 x 56
        x = self.conv2(x)  # N x 64 x 56 x 56
        x = self.conv3(x)  # N x 192 x 56 x 56
        x = self.maxpool2(x)  # N x 192 x 28 x 28
        x = self.inception3a(x)  # N x 256 x 28 x 28
        x = self.inception3b(x)  # N x 480 x 28 x 28
        x = self.maxpool3(x)  # N x 480 x 14 x 14
        x = self.inception4a(x)  # N x 512 x 14 x 14
        aux1 = self.aux1(x) if use_aux else None  # N x num_classes
        x = self.inception4b(x)  # N x 512 x 14 x 14
        x = self.inception4c(x)  # N x 512 x 14 x 14
        x = self.inception4d(x)  # N x 528 x 14 x 14
        aux2 = self.aux2(x) if use_aux else None  # N x num_classes
        x = self.inception4e(x)  # N x 832 x 14 x 14
        x = self.maxpool4(x)  # N x 832 x 7 x 7
        x = self.inception5a(x)  # N x 832 x 7 x 7
        x = self.inception5b(x)  # N x 1024 x 7 x 7
        x = self.avgpool(x)  # N x 1024 x 1 x 1
        x = torch.flatten(x, 1)  # N x 1024
        x = self.dropout(x)  # N x 1024
        x = self.fc(x)  # N x num_classes
        return (x, aux1, aux2) if use_aux else x


def alexnet(num_classes=5, in_channels=3):
    return AlexNet(num_classes, in_channels)


def vgg11(num_classes=5, in_channels=3):
    return VGG(CFGS['vgg11'], num_classes, in_channels)


def resnet34(num_classes=5, in_channels=3):
    return ResNet(BasicBlock, [3, 4, 6, 3], num_classes, in_channels)


def resnet50(num_classes=5, in_channels=3):
    return ResNet(Bottleneck, [3, 4, 6, 3], num_classes, in_channels)


def resnet101(num_classes=5, in_channels=3):
    return ResNet(Bottleneck, [3, 4, 23, 3], num_classes, in_channels)


def googlenet(num_classes=5, in_channels=3):
    return GoogLeNet(num_classes, in_channels)


MODELS = {'alexnet': alexnet, 'vgg11': vgg11, 'resnet34': resnet34,
          'resnet50': resnet50, 'resnet101': resnet101, 'googlenet': googlenet}


def summary(model, input_size=(1, 3, 224, 224)):
    """d2l-style table: output shape after each top-level child (each layer of a
    top-level nn.Sequential gets its own row), then the parameter count.
    Runs in eval mode, so GoogLeNet's aux heads do not appear."""
    rows, hooks = [], []
    for name, child in model.named_children():
        parts = child.named_children() if isinstance(child, nn.Sequential) else [('', child)]
        for sub, m in parts:
            label = f'{name}.{sub}' if sub else name
            hooks.append(m.register_forward_hook(
                lambda m, inp, out, label=label: rows.append(
                    f'{label:<16}{type(m).__name__:<20}{" x ".join(map(str, out.shape))}')))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(input_size, device=next(model.parameters()).device))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    total = sum(p.numel() for p in model.parameters())
    head = f'{type(model).__name__} (input {" x ".join(map(str, input_size))})'
    return '\n'.join([head, *rows, f'Total params: {total:,}'])
