"""edgegen's conditional generator: noise z + text states -> RGB image, one forward pass.

Written to export cleanly: plain convolutions, nearest upsampling, matmul attention (the ``conv``
renderer) or matmul resampling of learned glyphs (the ``glyph`` renderer, emoji64's), no random numbers
in the graph and no shapes that depend on data. The batch axis is
the only dynamic one.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

# The value added to attention scores at padded tokens. Large enough to zero them after
# softmax, small enough to stay finite in fp16 and not to swamp INT8 calibration ranges.
MASK_VALUE = -1.0e4


@dataclass
class GeneratorConfig:
    image_size: int = 64
    noise_dim: int = 64
    text_dim: int = 384
    cond_dim: int = 256
    channels: list = field(default_factory=lambda: [256, 128, 64, 32])  # 4x4 base, one entry per x2 upsample
    attention_resolutions: list = field(default_factory=lambda: [8, 16])  # cross-attend to tokens here
    attention_dim: int = 128
    max_length: int = 32  # token positions the conditioning sees (tokenizer pads to this)
    # Concept memories: for each size n, the pooled text selects (softmax over a linear map of the
    # L2-normalised pooled text, as sentence embeddings are compared) from n learned vectors: a lookup
    # that generalises to paraphrases as far as the text encoder's sentence space does.
    concepts: list = field(default_factory=list)
    concept_dim: int = 64
    # Logits are multiplied by this before the softmax at inference: the renderer learned from exact
    # concepts (teacher forcing), so a near-one-hot lookup serves it best; finite, so the lookup stays smooth.
    concept_sharpness: float = 8.0
    # 0: each memory reads the mean of the token states (a bag of words: "green apple, red background"
    # and "red apple, green background" read the same). n > 0: each memory also pools the token states
    # with n learned attention heads of its own (MiniLM's states are contextual, so "green" in "green
    # apple" and in "green background" differ), and its keys read the mean and the heads together.
    concept_heads: int = 0
    concept_attention_dim: int = 64  # hidden width of the heads' token scorer
    # The first memory (the subject) also says how likely the prompt names any subject it knows: a logistic
    # head on its read, top logit and entropy, trained after the generator on captions of subjects it does
    # not know (training/known.py). It scales the reported probabilities only, never what is drawn.
    known_subject: bool = False
    pooled_cond: bool = True  # also condition on an MLP of the pooled text
    # "conv": upsampling conv decoder. "glyph": the three concept memories (subject, background, size)
    # drive a drawing layer directly: a learned RGBA glyph per subject, placed at a learned box size and
    # shifted by the noise, over a learned flat colour (see GlyphRenderer).
    renderer: str = "conv"
    glyph_side: int = 32  # glyph resolution (px) stored per subject
    glyph_boxes: list = field(default_factory=lambda: [32, 58])  # drawn box side (px): small, large
    jitter: int = 3  # max shift (px); shift = clip(round(jitter_scale * noise[0:2]))
    jitter_scale: float = 1.5

    def __post_init__(self):
        if isinstance(self.concepts, int):
            self.concepts = [self.concepts] if self.concepts else []
        if self.renderer not in ("conv", "glyph"):
            raise ValueError(f"renderer must be 'conv' or 'glyph', not {self.renderer!r}")
        if self.renderer == "glyph":
            if len(self.concepts) != 3 or self.concepts[2] != 3:
                raise ValueError(
                    "the glyph renderer needs concepts "
                    "[subjects, backgrounds, 3 sizes (not said, small, large)]"
                )
            if max(self.glyph_boxes) + 2 * self.jitter > self.image_size or len(self.glyph_boxes) != 2:
                raise ValueError(
                    f"glyph_boxes {self.glyph_boxes} (two sides) plus jitter {self.jitter} "
                    f"must fit in {self.image_size} px"
                )
            if self.noise_dim < 3:
                raise ValueError("the glyph renderer reads noise[0:3] (shift x, shift y, size when not said)")
        elif self.image_size != 4 * 2 ** len(self.channels):
            raise ValueError(
                f"image_size {self.image_size} needs {len(self.channels)} upsamplings from 4x4 "
                f"to equal 4*2**len(channels) = {4 * 2 ** len(self.channels)}"
            )

    @classmethod
    def load(cls, path: Path) -> GeneratorConfig:
        data = json.loads(Path(path).read_text())
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps({"model_type": "edgegen-gan-generator", **asdict(self)}, indent=2))


def masked_mean(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weights = mask.to(states.dtype).unsqueeze(-1)
    return (states * weights).sum(1) / weights.sum(1).clamp(min=1.0)


def normalise(x: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + 1e-6)


class ConceptMemory(nn.Module):
    """softmax(keys . what it reads from the text) @ values: a soft lookup of a learned concept vector.

    What it reads: the normalised mean of the token states and, with ``heads`` > 0, the normalised pools
    of the token states under each of its own attention heads (a small MLP scores each token; padded
    tokens are masked), concatenated. The heads let the background memory read the colour that goes
    with "background" and the emoji memory the words of the subject."""

    def __init__(
        self,
        text_dim: int,
        concepts: int,
        dim: int,
        sharpness: float = 1.0,
        heads: int = 0,
        attention_dim: int = 64,
        known: bool = False,
    ):
        super().__init__()
        self.sharpness = sharpness
        self.known = nn.Linear(text_dim * (1 + heads) + 2, 1) if known else None
        self.scorer = (
            nn.Sequential(nn.Linear(text_dim, attention_dim), nn.Tanh(), nn.Linear(attention_dim, heads))
            if heads
            else None
        )
        self.keys = nn.Linear(text_dim * (1 + heads), concepts, bias=False)
        self.values = nn.Parameter(torch.randn(concepts, dim) * 0.5)

    def read(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, L, D) token states, (B, L) mask -> (B, D * (1 + heads)): the normalised reads."""
        reads = [normalise(masked_mean(states, mask))]
        if self.scorer is not None:
            scores = self.scorer(states) + (1.0 - mask.to(states.dtype)).unsqueeze(-1) * MASK_VALUE
            pooled = torch.matmul(scores.softmax(1).transpose(1, 2), states)  # (B, heads, D)
            reads.append(normalise(pooled).flatten(1))
        return torch.cat(reads, -1) if len(reads) > 1 else reads[0]

    def logits(self, read: torch.Tensor) -> torch.Tensor:
        return self.keys(read)

    def reported(self, read: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """What the runtime reports: what the keys believe (the unsharpened softmax: the sharpened mix that
        is drawn is near one-hot even for a word it never saw), times, with a ``known`` head, the
        probability that the text names one of these concepts at all."""
        probs = logits.softmax(-1)
        if self.known is None:
            return probs
        return probs * torch.sigmoid(self.known(self.known_features(read, logits)))

    @staticmethod
    def known_features(read: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """The read, the top logit (/10) and minus the entropy of the softmax (as p.logits - logsumexp,
        which has no log(0) in fp16)."""
        top = logits.amax(-1, keepdim=True) / 10
        lse = torch.logsumexp(logits, -1, keepdim=True)
        neg_entropy = (logits.softmax(-1) * logits).sum(-1, keepdim=True) - lse
        return torch.cat([read, top, neg_entropy], -1)


class GlyphRenderer(nn.Module):
    """Draws from three concept memories: the subject's learned RGBA glyph (premultiplied colour + alpha,
    ``side`` px), resampled into a box of one of two sides and shifted by the noise, over the background
    memory's flat colour. The size memory's value is (a, b): P(large) = a + b * [noise[2] > 0], so
    "small" / "large" learn a fixed answer (b = 0) and "not said" lets the noise pick (a = 0, b = 1),
    as the training targets do. Placement is two bilinear resampling matrices per image (MatMuls, no
    data-dependent shapes): exact for the box that matches ``side``, smooth upsampling for the other."""

    def __init__(self, c: GeneratorConfig):
        super().__init__()
        self.c = c
        boxes = torch.tensor(c.glyph_boxes, dtype=torch.float32).view(1, -1, 1, 1, 1)  # (1, box, 1, 1, 1)
        # Both boxes and both axes in one tensor: the exported graph is one set of placement ops, not four
        # (on a CPU, each small ONNX op costs microseconds whatever its size).
        self.register_buffer(
            "corner", torch.div(c.image_size - boxes, 2, rounding_mode="floor"), persistent=False
        )
        self.register_buffer("scale", c.glyph_side / boxes, persistent=False)
        self.register_buffer(
            "pixel", torch.arange(c.image_size, dtype=torch.float32).view(1, 1, 1, -1, 1), persistent=False
        )
        self.register_buffer(
            "texel", torch.arange(c.glyph_side, dtype=torch.float32).view(1, 1, 1, 1, -1), persistent=False
        )

    @staticmethod
    def value_dims(c: GeneratorConfig) -> list[int]:
        """What each memory stores: RGBA glyph, RGB colour, (P(large), share decided by the noise)."""
        return [4 * c.glyph_side**2, 3, 2]

    def placement(self, shift):
        """(B, 2) integer shifts (x, y) -> (B, box, axis, image_size, side): bilinear weights from glyph
        texels to canvas pixels, for each box and axis."""
        origin = self.corner + shift.view(-1, 1, 2, 1, 1)
        u = (self.pixel - origin + 0.5) * self.scale - 0.5  # texel coordinate of each pixel centre
        return torch.relu(1.0 - (u - self.texel).abs())

    def forward(self, noise, subject, background, size):
        """noise (B, Z); the three memories' read values (B, dim) -> image (B, 3, H, W) in [-1, 1]."""
        s = self.c.glyph_side
        glyph = subject.view(-1, 1, 4, s, s)
        colour = background[:, :, None, None]
        fixed, by_noise = size.unbind(1)  # P(large) said by the text, and the share the noise's sign decides
        large = torch.clamp(fixed + by_noise * (torch.sign(noise[:, 2]) + 1.0) * 0.5, 0.0, 1.0)
        weight = torch.stack([1.0 - large, large], 1).view(-1, 2, 1, 1, 1)  # (B, box, 1, 1, 1)
        shift = torch.clamp(torch.round(noise[:, :2] * self.c.jitter_scale), -self.c.jitter, self.c.jitter)
        a = self.placement(shift)
        ax, ay = a[:, :, 0:1], a[:, :, 1:2]  # (B, box, 1, H, side)
        drawn = (weight * torch.matmul(torch.matmul(ay, glyph), ax.transpose(-1, -2))).sum(1)  # (B, 4, H, W)
        rgb = drawn[:, :3] + colour * (1.0 - drawn[:, 3:])
        return torch.clamp(rgb * 2.0 - 1.0, -1.0, 1.0)


class CrossAttention(nn.Module):
    """Image positions attend to text tokens; residual, single head, padded tokens masked."""

    def __init__(self, channels: int, text_dim: int, dim: int):
        super().__init__()
        self.norm = nn.GroupNorm(8 if channels % 8 == 0 else 1, channels)
        self.q = nn.Linear(channels, dim, bias=False)
        self.k = nn.Linear(text_dim, dim, bias=False)
        self.v = nn.Linear(text_dim, dim, bias=False)
        self.out = nn.Linear(dim, channels)
        self.scale = dim**-0.5

    def forward(self, x, states, mask):
        b, c, h, w = x.shape
        q = self.q(self.norm(x).flatten(2).transpose(1, 2))  # (B, HW, d)
        scores = torch.matmul(q, self.k(states).transpose(1, 2)) * self.scale  # (B, HW, L)
        scores = scores + (1.0 - mask.to(scores.dtype)).unsqueeze(1) * MASK_VALUE
        attended = torch.matmul(scores.softmax(-1), self.v(states))  # (B, HW, d)
        return x + self.out(attended).transpose(1, 2).reshape(b, c, h, w)


class UpBlock(nn.Module):
    """x2 nearest upsample, two 3x3 convs with conditional batch norm (scale/shift from the pooled text)."""

    def __init__(self, cin: int, cout: int, cond_dim: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(cout, affine=False)
        self.bn2 = nn.BatchNorm2d(cout, affine=False)
        self.film = nn.Linear(cond_dim, 4 * cout)
        self.skip = nn.Conv2d(cin, cout, 1)
        self.act = nn.LeakyReLU(0.2)

    def forward(self, x, cond):
        s1, b1, s2, b2 = self.film(cond)[:, :, None, None].chunk(4, dim=1)
        x = nn.functional.interpolate(x, scale_factor=2.0, mode="nearest")
        h = self.act(self.bn1(self.conv1(x)) * (1 + s1) + b1)
        h = self.act(self.bn2(self.conv2(h)) * (1 + s2) + b2)
        return h + self.skip(x)


class ConditionalGenerator(nn.Module):
    def __init__(self, config: GeneratorConfig):
        super().__init__()
        self.config = c = config
        if c.renderer == "glyph":
            self.glyphs = GlyphRenderer(c)
            self.memories = nn.ModuleList(
                ConceptMemory(
                    c.text_dim,
                    n,
                    d,
                    c.concept_sharpness,
                    c.concept_heads,
                    c.concept_attention_dim,
                    known=c.known_subject and i == 0,
                )
                for i, (n, d) in enumerate(zip(c.concepts, GlyphRenderer.value_dims(c)))
            )
            for m in self.memories:
                nn.init.zeros_(m.values)  # transparent glyphs on black; training fills them in
            return
        self.pool = nn.Sequential(nn.Linear(c.text_dim, c.cond_dim), nn.SiLU()) if c.pooled_cond else None
        self.memories = nn.ModuleList(
            ConceptMemory(
                c.text_dim,
                n,
                c.concept_dim,
                c.concept_sharpness,
                c.concept_heads,
                c.concept_attention_dim,
                known=c.known_subject and i == 0,
            )
            for i, n in enumerate(c.concepts)
        )
        width = c.noise_dim + (c.cond_dim if c.pooled_cond else 0) + c.concept_dim * len(c.concepts)
        self.cond = nn.Sequential(nn.Linear(width, c.cond_dim), nn.SiLU())
        self.stem = nn.Linear(width, c.channels[0] * 16)
        blocks, attns = [], []
        cin, size = c.channels[0], 4
        for cout in c.channels:
            size *= 2
            blocks.append(UpBlock(cin, cout, c.cond_dim))
            attns.append(
                CrossAttention(cout, c.text_dim, c.attention_dim)
                if size in c.attention_resolutions
                else nn.Identity()
            )
            cin = cout
        self.blocks = nn.ModuleList(blocks)
        self.attns = nn.ModuleList(attns)
        self.to_rgb = nn.Sequential(nn.GroupNorm(1, cin), nn.LeakyReLU(0.2), nn.Conv2d(cin, 3, 3, padding=1))

    def forward(self, noise, text_states, attention_mask, concept_labels=None):
        """noise (B, Z) float, text_states (B, L, D) float, attention_mask (B, L) int
        -> image (B, 3, H, W) in [-1, 1].
        ``concept_labels`` (training only): one label tensor per memory, looked up instead of the text."""
        return self.draw(noise, text_states, attention_mask, concept_labels)[0]

    def draw(self, noise, text_states, attention_mask, concept_labels=None):
        """-> (image, per memory its unsharpened probabilities over its concepts: None where labelled)."""
        labels = concept_labels or [None] * len(self.memories)
        text = [
            None if y is not None else m.read(text_states, attention_mask)
            for m, y in zip(self.memories, labels)
        ]
        logits = [None if r is None else m.logits(r) for m, r in zip(self.memories, text)]
        reads = [
            m.values[y] if y is not None else torch.matmul((lg * m.sharpness).softmax(-1), m.values)
            for m, y, lg in zip(self.memories, labels, logits)
        ]
        probs = [None if lg is None else m.reported(r, lg) for m, r, lg in zip(self.memories, text, logits)]
        if self.config.renderer == "glyph":
            return self.glyphs(noise, *reads), probs
        pooled = [self.pool(masked_mean(text_states, attention_mask))] if self.pool is not None else []
        zc = torch.cat([noise] + pooled + reads, dim=1)
        cond = self.cond(zc)
        x = self.stem(zc).reshape(-1, self.config.channels[0], 4, 4)
        for block, attn in zip(self.blocks, self.attns):
            x = block(x, cond)
            if not isinstance(attn, nn.Identity):
                x = attn(x, text_states, attention_mask)
        return torch.tanh(self.to_rgb(x)), probs


class GeneratorWithReading(nn.Module):
    """The generator, also returning what each concept memory read from the prompt: its (unsharpened)
    probabilities over its concepts (emoji, background, size for emoji64). An exported graph with these
    outputs lets the runtime say what it drew."""

    def __init__(self, generator: ConditionalGenerator):
        super().__init__()
        self.generator = generator

    def forward(self, noise, text_states, attention_mask):
        image, probs = self.generator.draw(noise, text_states, attention_mask)
        return (image, *probs)
