"""Architectures the recipes need that torchvision lacks.

- CIFAR ResNets 20/32/44/56/110 (He et al., CVPR 2016, Sec. 4.2): 3 stages of 16/32/64 channels,
  6n+2 layers, option-A (zero-padding) shortcuts as in the original paper and the SL/Tf-KD code.
- MobileNetV1 (Howard et al., 2017) at ImageNet resolution, the WSLD R50 -> MobileNetV1 student.
- ``democnn``: a small 4-layer CNN for fast CPU demos and tests.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.models.registry import register_model


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.pad = cout - cin
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        sc = x
        if self.stride != 1 or self.pad:
            sc = x[:, :, ::self.stride, ::self.stride]
            sc = F.pad(sc, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        return F.relu(out + sc)


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs: [B, 3, 32, 32] -> [B, num_classes]."""

    def __init__(self, depth: int, num_classes: int = 10, width: int = 16):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError("depth must be 6n+2")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        layers = []
        cin = width
        for i, c in enumerate((width, 2 * width, 4 * width)):
            for j in range(n):
                layers.append(_BasicBlock(cin, c, 2 if (i > 0 and j == 0) else 1))
                cin = c
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layers(x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


for _d in (8, 14, 20, 32, 44, 56, 110):
    register_model(f"resnet{_d}")(lambda num_classes=10, _d=_d: CifarResNet(_d, num_classes))


class MobileNetV1(nn.Module):
    """MobileNetV1 (Howard et al. 2017): [B, 3, 224, 224] -> [B, num_classes]."""

    CFG = [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2)] + [(512, 1)] * 5 + [(1024, 2), (1024, 1)]

    def __init__(self, num_classes: int = 1000, width: float = 1.0):
        super().__init__()

        def conv_bn(cin: int, cout: int, stride: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(True))

        def conv_dw(cin: int, cout: int, stride: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False), nn.BatchNorm2d(cin), nn.ReLU(True),
                nn.Conv2d(cin, cout, 1, 1, 0, bias=False), nn.BatchNorm2d(cout), nn.ReLU(True),
            )

        c0 = int(32 * width)
        layers = [conv_bn(3, c0, 2)]
        cin = c0
        for c, s in self.CFG:
            layers.append(conv_dw(cin, int(c * width), s))
            cin = int(c * width)
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


register_model("mobilenet_v1")(lambda num_classes=1000: MobileNetV1(num_classes))


class DemoCNN(nn.Module):
    """Small CNN for CPU demos: [B, 3, H, W] -> [B, num_classes]; ``width`` scales every layer."""

    def __init__(self, num_classes: int = 10, width: int = 32):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(True),
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(2 * w), nn.ReLU(True),
            nn.Conv2d(2 * w, 4 * w, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(4 * w), nn.ReLU(True),
            nn.Conv2d(4 * w, 4 * w, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(4 * w), nn.ReLU(True),
        )
        self.fc = nn.Linear(4 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1))


register_model("democnn")(lambda num_classes=10: DemoCNN(num_classes, 32))
register_model("democnn_s")(lambda num_classes=10: DemoCNN(num_classes, 8))
