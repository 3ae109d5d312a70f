"""Models for the datasets metafleet targets, small enough to adapt on a Raspberry Pi.

Every norm layer is a GroupNorm: it holds no running statistics (the functional core treats buffers as
constants) and it behaves the same on a 5-example support set as on a large batch, which BatchNorm does not.
Parameter counts in the docstrings are checked by the tests.
"""

from __future__ import annotations

from torch import Tensor, nn


class SinusoidMLP(nn.Module):
    """MLP 1-40-40-1 with ReLU, the MAML paper's sinusoid regressor: 1,761 parameters."""

    def __init__(self, hidden: int = 40):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(1, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def _conv1d_block(channels_in: int, channels_out: int, pool: bool) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv1d(channels_in, channels_out, kernel_size=5, padding=2),
        nn.GroupNorm(8, channels_out),
        nn.ReLU(),
    ]
    if pool:
        layers.append(nn.MaxPool1d(2))
    return nn.Sequential(*layers)


class SensorCNN(nn.Module):
    """1D-CNN for windows of 6-channel inertial data, input (batch, 6, 100): 32,615 parameters (7 classes).

    Three conv blocks (32, 64, 64 channels, kernel 5, GroupNorm), global average pooling, a linear head.
    """

    def __init__(self, num_classes: int = 7, channels: int = 6):
        super().__init__()
        self.features = nn.Sequential(
            _conv1d_block(channels, 32, pool=True),
            _conv1d_block(32, 64, pool=True),
            _conv1d_block(64, 64, pool=False),
            nn.AdaptiveAvgPool1d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(64, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def _conv2d_block(channels_in: int, channels_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(channels_in, channels_out, kernel_size=3, padding=1),
        nn.GroupNorm(8, channels_out),
        nn.ReLU(),
        nn.MaxPool2d(2),
    )


class ConvNet4(nn.Module):
    """The standard 4-block conv net of few-shot learning (Vinyals et al. 2016; MAML) for 1x28x28 images.

    Four blocks of 3x3 conv (64 filters), norm, ReLU, 2x2 max-pool take 28x28 to 1x1x64; then a linear head.
    112,261 parameters for 5 classes (112,586 for 10, 113,236 for 20).
    """

    def __init__(self, num_classes: int = 5, channels_in: int = 1, width: int = 64):
        super().__init__()
        self.features = nn.Sequential(
            _conv2d_block(channels_in, width),
            _conv2d_block(width, width),
            _conv2d_block(width, width),
            _conv2d_block(width, width),
            nn.Flatten(),
        )
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


class CharLSTM(nn.Module):
    """Next-character LSTM of LEAF's Shakespeare task: embedding 8, two LSTM layers of 128, a linear head.

    213,712 parameters for an 80-character vocabulary (LEAF's two layers of 256 have 819,920 and cost about
    twice the time per step on one CPU thread). Input (batch, time) of character ids; output (batch, time,
    vocab), the logits for the next character at every position (the last one: after the window).
    """

    def __init__(self, vocab_size: int = 80, embedding_dim: int = 8, hidden: int = 128, layers: int = 2):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embedding_dim)
        self.lstm = nn.LSTM(embedding_dim, hidden, num_layers=layers, batch_first=True)
        self.head = nn.Linear(hidden, vocab_size)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.lstm(self.embedding(x))
        return self.head(out)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
