"""Tiny models shared by the unit tests."""

import torch
from torch import nn


class TinyCNN(nn.Module):
    """conv-relu-conv-relu-pool-fc, with an in-place ReLU after a hooked layer on purpose."""

    default_layers = ["conv1", "conv2"]
    cam_layer = "conv2"

    def __init__(self, num_classes: int = 4, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1, stride=2)
        self.relu2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        h = self.relu2(self.conv2(self.relu1(self.conv1(x))))
        return self.fc(self.pool(h).flatten(1))


class OneConv(nn.Module):
    """1x1 conv (1 -> 2 channels, weights [1, -1], no bias), global average pool, fc: hand-computable."""

    cam_layer = "conv"
    default_layers = ["conv"]

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 1, bias=False)
        self.fc = nn.Linear(2, 2, bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([1.0, -1.0]).view(2, 1, 1, 1))
            self.fc.weight.copy_(torch.tensor([[1.0, 2.0], [0.5, -1.0]]))

    def forward(self, x):
        return self.fc(self.conv(x).mean(dim=(2, 3)))


def tiny_resnet(num_classes: int = 5):
    import torchvision

    torch.manual_seed(0)
    m = torchvision.models.resnet18(weights=None, num_classes=num_classes)
    m.eval()
    return m
