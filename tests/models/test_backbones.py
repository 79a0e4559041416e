"""Backbones: token shapes, input checks, normalisation, determinism, pretrained video weights."""

from __future__ import annotations

import pytest
import torch

from pkdot.errors import ConfigError, StageError
from pkdot.models import (
    LogMelCNN,
    MLPBackbone,
    SpectrogramCNN,
    UnimodalModel,
    VideoBackbone,
    WindowCNN,
    build_backbone,
)
from pkdot.models.heads import TaskHead
from pkdot.models.video import KINETICS_MEAN, KINETICS_STD

VIDEO = (4, 16, 16, 3)

CASES = [
    # modality, shape, overrides, class, expected tokens
    ("video", VIDEO, {"model.video_backbone": "small3d"}, VideoBackbone, 2),
    ("video", VIDEO, {"model.video_backbone": "r3d18"}, VideoBackbone, 1),
    ("video", (8, 16, 16, 3), {"model.video_backbone": "r3d18"}, VideoBackbone, 1),
    ("physio", (3, 65, 40), {}, SpectrogramCNN, 3),
    ("physio", (2, 256), {"model.physio_input": "window"}, WindowCNN, 8),
    ("audio", (8, 40), {}, LogMelCNN, 3),
    ("eda", (7,), {}, MLPBackbone, 1),
]


@pytest.mark.parametrize(("modality", "shape", "overrides", "cls", "tokens"), CASES)
def test_backbone_tokens(tiny_config, random_input, modality, shape, overrides, cls, tokens):
    cfg = tiny_config(overrides)
    backbone = build_backbone(modality, shape, cfg.model, seed=0).eval()  # eval: no dropout between calls
    assert isinstance(backbone, cls)
    assert backbone.embed_dim == 16 and backbone.modality == modality
    x = random_input(shape, 3)
    out = backbone(x)
    assert out.shape == (3, tokens, 16)
    assert torch.isfinite(out).all()
    out.sum().backward()  # differentiable end to end
    assert all(p.grad is not None for p in backbone.parameters())


def test_backbone_is_per_sample_in_eval_mode(tiny_config, random_input):
    backbone = build_backbone("physio", (3, 65, 40), tiny_config().model, seed=0).eval()
    x = random_input((3, 65, 40), 4)
    alone = backbone(x[:1])
    other = x.clone()
    other[1:] = random_input((3, 65, 40), 3, seed=9)
    torch.testing.assert_close(backbone(other)[:1], alone, atol=1e-5, rtol=1e-5)


def test_build_backbone_is_deterministic_per_seed(tiny_config, random_input):
    cfg = tiny_config()
    x = random_input(VIDEO, 2)
    a = build_backbone("video", VIDEO, cfg.model, seed=3).eval()
    b = build_backbone("video", VIDEO, cfg.model, seed=3).eval()
    c = build_backbone("video", VIDEO, cfg.model, seed=4).eval()
    torch.testing.assert_close(a(x), b(x))
    assert not torch.allclose(a(x), c(x))


def test_video_normalisation_and_layout():
    backbone = VideoBackbone(VIDEO, 16, arch="small3d", width=4)
    x = torch.zeros((1, *VIDEO), dtype=torch.uint8)
    x[..., 0] = 255  # red channel full, green/blue zero
    x[0, 1, ..., 1] = 51  # frame 1: green 0.2
    norm = backbone.normalise(x)
    assert norm.shape == (1, 3, 4, 16, 16)  # (B, 3, T, H, W)
    torch.testing.assert_close(
        norm[0, 0], torch.full((4, 16, 16), (1.0 - KINETICS_MEAN[0]) / KINETICS_STD[0])
    )
    torch.testing.assert_close(norm[0, 2], torch.full((4, 16, 16), -KINETICS_MEAN[2] / KINETICS_STD[2]))
    torch.testing.assert_close(
        norm[0, 1, 1], torch.full((16, 16), (0.2 - KINETICS_MEAN[1]) / KINETICS_STD[1])
    )
    torch.testing.assert_close(norm[0, 1, 0], torch.full((16, 16), -KINETICS_MEAN[1] / KINETICS_STD[1]))


def test_input_checks(tiny_config, random_input):
    cfg = tiny_config()
    video = build_backbone("video", VIDEO, cfg.model)
    with pytest.raises(StageError, match="uint8"):
        video(random_input(VIDEO, 2).float())
    with pytest.raises(StageError, match=r"\(B, 4, 16, 16, 3\)"):
        video(torch.zeros((2, 5, 16, 16, 3), dtype=torch.uint8))
    spec = build_backbone("physio", (3, 65, 40), cfg.model)
    with pytest.raises(StageError, match="floating"):
        spec(torch.zeros((2, 3, 65, 40), dtype=torch.int64))
    # float64 features are accepted and computed in the network's dtype
    assert spec(random_input((3, 65, 40), 2).double()).dtype == torch.float32


def test_build_backbone_errors(tiny_config):
    cfg = tiny_config()
    with pytest.raises(ConfigError, match="physio_input"):
        build_backbone("physio", (3, 256), cfg.model)  # spectrogram configured, window given
    with pytest.raises(ConfigError, match="no backbone for modality 'eda'"):
        build_backbone("eda", (3, 256), cfg.model)
    with pytest.raises(ConfigError, match=r"\(T, H, W, 3\)"):
        build_backbone("video", (4, 16, 16), cfg.model)


def test_r3d18_body_uses_torchvision_names():
    w = 4
    body = VideoBackbone((4, 16, 16, 3), 16, arch="r3d18", width=w).body
    state = body.state_dict()
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    expected = {"stem.0.weight", *(f"stem.1.{k}" for k in bn)}
    for layer in range(1, 5):
        for block in range(2):
            prefix = f"layer{layer}.{block}"
            for conv in ("conv1", "conv2"):
                expected |= {f"{prefix}.{conv}.0.weight", *(f"{prefix}.{conv}.1.{k}" for k in bn)}
            if layer > 1 and block == 0:
                expected |= {f"{prefix}.downsample.0.weight", *(f"{prefix}.downsample.1.{k}" for k in bn)}
    assert set(state) == expected
    assert state["stem.0.weight"].shape == (w, 3, 3, 7, 7)
    assert state["layer4.0.downsample.0.weight"].shape == (8 * w, 4 * w, 1, 1, 1)
    assert state["layer2.0.conv1.0.weight"].shape == (2 * w, w, 3, 3, 3)


def _weights_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_pretrained_video_loads_whole_backbone(tiny_config, tmp_path):
    source = build_backbone("video", VIDEO, tiny_config().model, seed=1)
    path = tmp_path / "video.pt"
    torch.save(source.state_dict(), path)
    loaded = build_backbone("video", VIDEO, tiny_config({"model.pretrained_video": str(path)}).model, seed=2)
    fresh = build_backbone("video", VIDEO, tiny_config().model, seed=2)
    assert _weights_equal(loaded, source)
    assert not _weights_equal(fresh, source)


def test_pretrained_video_loads_body_only_file(tiny_config, tmp_path):
    overrides = {"model.video_backbone": "r3d18"}
    source = build_backbone("video", VIDEO, tiny_config(overrides).model, seed=1)
    state = {**source.body.state_dict(), "fc.weight": torch.zeros(400, 32), "fc.bias": torch.zeros(400)}
    path = tmp_path / "r3d18_kinetics.pt"
    torch.save(state, path)
    cfg = tiny_config({**overrides, "model.pretrained_video": str(path)})
    loaded = build_backbone("video", VIDEO, cfg.model, seed=2)
    fresh = build_backbone("video", VIDEO, tiny_config(overrides).model, seed=2)
    assert _weights_equal(loaded.body, source.body)
    assert _weights_equal(loaded.projection, fresh.projection)  # projection as initialised


def test_pretrained_video_wrong_files(tiny_config, tmp_path):
    other = build_backbone("video", VIDEO, tiny_config({"model.video_width": 8}).model)
    wrong_width = tmp_path / "wide.pt"
    torch.save(other.state_dict(), wrong_width)
    with pytest.raises(ConfigError, match="pretrained_video.*wrong shape"):
        cfg = tiny_config({"model.video_width": 6, "model.pretrained_video": str(wrong_width)})
        build_backbone("video", VIDEO, cfg.model)
    wrong_arch = tmp_path / "r3d.pt"
    torch.save(
        build_backbone("video", VIDEO, tiny_config({"model.video_backbone": "r3d18"}).model).state_dict(),
        wrong_arch,
    )
    with pytest.raises(ConfigError, match="does not match the small3d"):
        build_backbone("video", VIDEO, tiny_config({"model.pretrained_video": str(wrong_arch)}).model)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="not a readable"):
        build_backbone("video", VIDEO, tiny_config({"model.pretrained_video": str(garbage)}).model)
    with pytest.raises(ConfigError, match="does not exist"):
        build_backbone(
            "video", VIDEO, tiny_config({"model.pretrained_video": str(tmp_path / "nope.pt")}).model
        )
    not_a_dict = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], not_a_dict)
    with pytest.raises(ConfigError, match="state_dict"):
        build_backbone("video", VIDEO, tiny_config({"model.pretrained_video": str(not_a_dict)}).model)


def test_task_heads(random_input):
    z = random_input((16,), 5) * 10
    binary, five = TaskHead(16, 2, regression=False), TaskHead(16, 5, regression=False)
    assert binary(z).shape == (5, 2) and five(z).shape == (5, 5)
    regression = TaskHead(16, 1, regression=True)
    out = regression(z)
    assert out.shape == (5, 1) and out.abs().max() <= 1.0
    with pytest.raises(StageError):
        TaskHead(16, 2, regression=True)
    with pytest.raises(StageError):
        TaskHead(16, 1, regression=False)


def test_unimodal_model(tiny_config, random_input):
    backbone = build_backbone("audio", (8, 40), tiny_config().model, seed=0)
    model = UnimodalModel(backbone, 1, regression=True)
    x = random_input((8, 40), 3)
    out = model(x)
    assert out.embedding.shape == (3, 16) and out.logits.shape == (3, 1)
    assert out.tokens["audio"].shape == (3, 3, 16)
    torch.testing.assert_close(out.embedding, out.tokens["audio"].mean(1))
    assert out.logits.abs().max() <= 1.0
