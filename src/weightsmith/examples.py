"""The small models used throughout the docs, the tests and ``weightsmith demo``."""

from __future__ import annotations

from typing import Any

__all__ = ["mlp", "tied_mlp", "model_a", "model_b"]


def mlp() -> Any:
    """The running example: ``Sequential(Linear(4, 8), ReLU(), Linear(8, 1))``."""
    from torch import nn

    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))


def tied_mlp() -> Any:
    """A variant that reuses one ``Linear(8, 8)`` twice, so its parameters are tied."""
    from torch import nn

    shared = nn.Linear(8, 8)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), shared, nn.ReLU(), shared, nn.Linear(8, 1))


def model_a() -> Any:
    """Model A of the warm-start scenario: a backbone and a 3-class head."""
    from torch import nn

    class ModelA(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Linear(4, 8)
            self.norm = nn.LayerNorm(8)
            self.fc = nn.Linear(8, 8)
            self.head = nn.Linear(8, 3)

        def forward(self, x: Any) -> Any:
            return self.head(self.fc(self.norm(self.conv1(x)).relu()).relu())

    return ModelA()


def model_b() -> Any:
    """Model B: model A with ``conv1`` renamed to ``backbone_conv`` and a new 5-class head."""
    from torch import nn

    class ModelB(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone_conv = nn.Linear(4, 8)
            self.norm = nn.LayerNorm(8)
            self.fc = nn.Linear(8, 8)
            self.classifier = nn.Linear(8, 5)

        def forward(self, x: Any) -> Any:
            return self.classifier(self.fc(self.norm(self.backbone_conv(x)).relu()).relu())

    return ModelB()
