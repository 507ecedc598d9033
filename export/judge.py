"""emoji64's judge: a small CNN that names the emoji and the background colour of a 64x64 image.

Used to score generated images (adherence, Fréchet judge distance) and, frozen, as a training signal.
Plain convs, batch norm, global average pooling and linears, so it exports to ONNX as is.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from torch import nn


@dataclass
class JudgeConfig:
    n_emoji: int = 320
    n_backgrounds: int = 10
    channels: list = field(default_factory=lambda: [32, 48, 96, 192])  # one stride-2 stage each: 64 -> 4 px
    feature_dim: int = 128

    @classmethod
    def load(cls, path: Path) -> JudgeConfig:
        data = json.loads(Path(path).read_text())
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps({"model_type": "edgegen-emoji-judge", **asdict(self)}, indent=2))


def conv_bn(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
    )


class Judge(nn.Module):
    def __init__(self, config: JudgeConfig):
        super().__init__()
        self.config = c = config
        layers, cin = [], 3
        for cout in c.channels:  # a stride-2 conv then a 3x3 conv per stage
            layers += [conv_bn(cin, cout, 2), conv_bn(cout, cout)]
            cin = cout
        self.body = nn.Sequential(*layers)
        self.features = nn.Sequential(nn.Linear(cin, c.feature_dim), nn.ReLU())
        self.emoji_head = nn.Linear(c.feature_dim, c.n_emoji)
        self.background_head = nn.Linear(c.feature_dim, c.n_backgrounds)

    def forward(self, image):
        """image (B, 3, 64, 64) in [-1, 1] -> emoji logits (B, n_emoji), background logits (B, n_bg),
        features (B, F)."""
        f = self.features(self.body(image).mean(dim=(2, 3)))
        return self.emoji_head(f), self.background_head(f), f


def load_judge(path: Path) -> Judge:
    from safetensors.torch import load_file

    path = Path(path)
    judge = Judge(JudgeConfig.load(path / "config.json"))
    judge.load_state_dict(load_file(path / "model.safetensors"))
    return judge.eval()
