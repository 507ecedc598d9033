"""The shipped emoji64 judge recognises real renders (the adherence metric rests on it)."""

from pathlib import Path

import edgegen.export
import numpy as np
import pytest
import torch

from training.dataset import font_available, random_labels, render_batch, to_tensor

JUDGE = Path(edgegen.export.__file__).parent / "emoji64" / "judge"


@pytest.mark.skipif(
    not font_available(), reason="Noto Color Emoji not installed (apt-get install fonts-noto-color-emoji)"
)
def test_shipped_judge_classifies_fresh_renders():
    from edgegen.export.judge import load_judge

    judge = load_judge(JUDGE)
    rng = np.random.default_rng(20261122)  # a stream the judge's training never drew
    batch = render_batch(rng, *random_labels(rng, 400))
    with torch.no_grad():
        emoji, background, features = judge(to_tensor(batch.images))
    assert features.shape == (400, judge.config.feature_dim)
    emoji_acc = (emoji.argmax(1).numpy() == batch.emoji).mean()
    background_acc = (background.argmax(1).numpy() == batch.background).mean()
    assert emoji_acc >= 0.98, f"emoji accuracy {emoji_acc:.3f}"
    assert background_acc >= 0.98, f"background accuracy {background_acc:.3f}"


def test_judge_exports_to_onnx(tmp_path):
    import onnxruntime as ort
    from edgegen.export.judge import Judge, JudgeConfig

    judge = Judge(JudgeConfig(n_emoji=7, n_backgrounds=3)).eval()  # random weights: the graph is what matters
    x = torch.rand(4, 3, 64, 64) * 2 - 1
    path = tmp_path / "judge.onnx"
    torch.onnx.export(
        judge,
        (x,),
        str(path),
        input_names=["image"],
        output_names=["emoji", "background", "features"],
        dynamic_axes={"image": {0: "batch"}},
        dynamo=False,
    )
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        None, {"image": x[:3].numpy()}
    )
    with torch.no_grad():
        want = judge(x[:3])
    for g, w in zip(got, want):
        assert g.shape == tuple(w.shape) and np.abs(g - w.numpy()).max() < 1e-4
