"""Tiny models shared by the unit tests."""

import torch
import torch.nn.functional as F
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


def colour_squares(n, seed, size=12, side=5):
    """Class c = a square of colour channel c at a random position on a dim noisy background."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    x = 0.2 + 0.2 * torch.rand(n, 3, size, size, generator=g)
    pos = torch.randint(0, size - side + 1, (n, 2), generator=g)
    mask = torch.zeros(n, size, size, dtype=torch.bool)
    for i, (r, c) in enumerate(pos.tolist()):
        mask[i, r:r + side, c:c + side] = True
    colour = F.one_hot(y, 3).float()[:, :, None, None] * 0.7 + 0.2
    return torch.where(mask[:, None], colour.expand_as(x), x), y, mask
