"""Teacher and student: shapes for every modality combination, feature path, freezing, builders' checks."""

from __future__ import annotations

import logging

import pytest
import torch

from pkdot.errors import ConfigError, StageError
from pkdot.models import Student, Teacher, build_backbone, build_student, build_teacher, build_tnets

VIDEO = (4, 16, 16, 3)

COMBINATIONS = {
    "video+physio-spectrogram": (
        {"data.dataset": "biovid", "data.task": "binary"},
        {"video": VIDEO, "physio": (3, 65, 40)},
    ),
    "video+physio-window": (
        {"data.dataset": "biovid", "data.task": "multiclass", "model.physio_input": "window"},
        {"video": VIDEO, "physio": (3, 256)},
    ),
    "video+audio-valence": (
        {"data.dataset": "affwild2", "data.task": "valence", "data.privileged_modalities": ["audio"]},
        {"video": VIDEO, "audio": (8, 40)},
    ),
    "video+audio-arousal": (
        {"data.dataset": "affwild2", "data.task": "arousal", "data.privileged_modalities": ["audio"]},
        {"video": VIDEO, "audio": (8, 40)},
    ),
    "table-two": (
        {
            "data.dataset": "table",
            "data.task": "binary",
            "data.student_modalities": ["face"],
            "data.privileged_modalities": ["eda"],
        },
        {"face": (12,), "eda": (5,)},
    ),
    "table-three": (
        {
            "data.dataset": "table",
            "data.task": "multiclass",
            "data.num_classes": 5,
            "data.student_modalities": ["face"],
            "data.privileged_modalities": ["eda", "ecg"],
        },
        {"face": (12,), "eda": (5,), "ecg": (7,)},
    ),
}


def _inputs(
    random_input, shapes: dict[str, tuple[int, ...]], batch: int, seed: int = 0
) -> dict[str, torch.Tensor]:
    return {m: random_input(s, batch, seed + i) for i, (m, s) in enumerate(shapes.items())}


@pytest.mark.parametrize("name", list(COMBINATIONS))
def test_teacher_forward_shapes(tiny_config, random_input, name):
    overrides, shapes = COMBINATIONS[name]
    cfg = tiny_config(overrides)
    teacher = build_teacher(cfg, shapes, seed=0)
    assert isinstance(teacher, Teacher) and teacher.modalities == cfg.data.modalities
    out = teacher(_inputs(random_input, shapes, 3) | {"target": torch.zeros(3)})  # extra keys are ignored
    assert out.embedding.shape == (3, 16)
    assert out.logits.shape == (3, cfg.data.num_outputs)
    if cfg.data.is_regression:
        assert out.logits.shape == (3, 1) and out.logits.abs().max() <= 1.0
    assert set(out.tokens) == set(shapes)
    assert all(t.shape[0] == 3 and t.shape[2] == 16 for t in out.tokens.values())
    assert out.gates.shape == (3, len(shapes))


@pytest.mark.parametrize("name", list(COMBINATIONS))
@pytest.mark.parametrize("use_tnet", [True, False], ids=["tnet", "no-tnet"])
def test_student_forward_shapes_and_feature_path(tiny_config, random_input, name, use_tnet):
    overrides, shapes = COMBINATIONS[name]
    cfg = tiny_config({**overrides, "distill.use_tnet": use_tnet})
    student = build_student(cfg, shapes, tnets=build_tnets(cfg, seed=1) if use_tnet else None, seed=0).eval()
    modality = cfg.data.student_modalities[0]
    assert student.modality == modality
    x = random_input(shapes[modality], 3)
    out = student(x)
    assert out.embedding.shape == (3, 16)
    assert out.logits.shape == (3, cfg.data.num_outputs)
    expected = [modality, *cfg.data.privileged_modalities] if use_tnet else [modality]
    assert list(out.tokens) == expected
    assert out.gates.shape == (3, len(expected))
    for m in expected[1:]:
        assert out.tokens[m].shape == (3, 1, 16)  # one hallucinated token per privileged modality
        torch.testing.assert_close(out.tokens[m][:, 0], student.tnets[m](out.tokens[modality].mean(1)))
    assert len(student.tnets) == (len(cfg.data.privileged_modalities) if use_tnet else 0)
    from_features = student.forward_from_features(student.video_backbone(x))
    torch.testing.assert_close(from_features.logits, out.logits)
    torch.testing.assert_close(from_features.embedding, out.embedding)


def test_teacher_and_student_are_per_sample_in_eval_mode(tiny_config, random_input):
    overrides, shapes = COMBINATIONS["video+physio-spectrogram"]
    cfg = tiny_config(overrides)
    teacher = build_teacher(cfg, shapes, seed=0).eval()
    student = build_student(cfg, shapes, tnets=build_tnets(cfg, seed=1), seed=0).eval()
    batch = _inputs(random_input, shapes, 4)
    other = {m: t.clone() for m, t in batch.items()}
    for m, t in _inputs(random_input, shapes, 3, seed=10).items():
        other[m][1:] = t
    torch.testing.assert_close(teacher(other).embedding[0], teacher(batch).embedding[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        student(other["video"]).logits[0], student(batch["video"]).logits[0], atol=1e-5, rtol=1e-5
    )


def test_builders_are_deterministic_per_seed(tiny_config, random_input):
    overrides, shapes = COMBINATIONS["video+audio-valence"]
    cfg = tiny_config(overrides)
    x = _inputs(random_input, shapes, 2)
    a = build_teacher(cfg, shapes, seed=5).eval()(x).embedding
    b = build_teacher(cfg, shapes, seed=5).eval()(x).embedding
    c = build_teacher(cfg, shapes, seed=6).eval()(x).embedding
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _changed(before: dict[str, torch.Tensor], module: torch.nn.Module) -> list[str]:
    return [k for k, v in module.state_dict().items() if not torch.equal(before[k], v)]


def test_frozen_parts_get_no_gradient_and_do_not_change(tiny_config, random_input):
    overrides, shapes = COMBINATIONS["video+physio-spectrogram"]
    cfg = tiny_config(overrides)
    student = build_student(cfg, shapes, tnets=build_tnets(cfg, seed=1), freeze_backbone=True, seed=0)
    student.train()
    assert not student.video_backbone.training and not student.tnets.training  # frozen parts stay in eval
    assert student.fusion.training and student.head.training
    assert not any(p.requires_grad for p in student.video_backbone.parameters())
    assert not any(p.requires_grad for p in student.tnets.parameters())
    backbone, tnets, fusion, head = (
        _snapshot(m) for m in (student.video_backbone, student.tnets, student.fusion, student.head)
    )
    optimizer = torch.optim.Adam(student.parameters(), lr=0.1)
    out = student(random_input(VIDEO, 4))
    torch.nn.functional.cross_entropy(out.logits, torch.tensor([0, 1, 0, 1])).backward()
    assert all(p.grad is None for p in student.video_backbone.parameters())
    assert all(p.grad is None for p in student.tnets.parameters())
    optimizer.step()
    assert _changed(backbone, student.video_backbone) == []  # weights and batch-norm statistics
    assert _changed(tnets, student.tnets) == []
    assert _changed(fusion, student.fusion) and _changed(head, student.head)


def test_unfrozen_backbone_trains(tiny_config, random_input):
    overrides, shapes = COMBINATIONS["video+physio-spectrogram"]
    cfg = tiny_config({**overrides, "train.student_init": "teacher-finetune"})
    student = build_student(cfg, shapes, tnets=build_tnets(cfg, seed=1), seed=0).train()
    assert student.video_backbone.training and all(
        p.requires_grad for p in student.video_backbone.parameters()
    )
    before = _snapshot(student.video_backbone)
    optimizer = torch.optim.SGD([p for p in student.parameters() if p.requires_grad], lr=0.1)
    student(random_input(VIDEO, 4)).logits.sum().backward()
    optimizer.step()
    assert _changed(before, student.video_backbone)
    assert not any(p.requires_grad for p in student.tnets.parameters())


def test_build_student_copies_given_parts(tiny_config, random_input):
    overrides, shapes = COMBINATIONS["video+physio-spectrogram"]
    cfg = tiny_config(overrides)
    backbone = build_backbone("video", VIDEO, cfg.model, seed=3)
    tnets = build_tnets(cfg, seed=4)
    student = build_student(cfg, shapes, video_backbone=backbone, tnets=tnets, freeze_backbone=True)
    assert student.video_backbone is not backbone
    assert all(p.requires_grad for p in backbone.parameters())  # the caller's module is untouched
    assert all(p.requires_grad for p in tnets["physio"].parameters())
    x = random_input(VIDEO, 2)
    torch.testing.assert_close(student.video_backbone(x), backbone.eval()(x))
    v = torch.randn(2, 16)
    torch.testing.assert_close(student.tnets["physio"](v), tnets["physio"](v))


def test_build_teacher_uses_given_backbones(tiny_config):
    overrides, shapes = COMBINATIONS["video+physio-window"]
    cfg = tiny_config(overrides)
    video = build_backbone("video", VIDEO, cfg.model, seed=0)
    teacher = build_teacher(cfg, {"physio": shapes["physio"]}, backbones={"video": video})
    assert teacher.backbones["video"] is video
    with pytest.raises(StageError, match="embed_dim"):
        build_teacher(
            cfg,
            shapes,
            backbones={
                "video": build_backbone(
                    "video", VIDEO, tiny_config({**overrides, "model.embed_dim": 8}).model
                )
            },
        )
    with pytest.raises(StageError, match="built for input"):
        build_teacher(cfg, {**shapes, "video": (8, 16, 16, 3)}, backbones={"video": video})
    with pytest.raises(StageError, match="not modalities"):
        build_teacher(cfg, shapes, backbones={"audio": video})
    with pytest.raises(StageError, match="no input shape"):
        build_teacher(cfg, {"video": VIDEO})


def test_model_input_errors(tiny_config, random_input):
    overrides, shapes = COMBINATIONS["video+physio-spectrogram"]
    cfg = tiny_config(overrides)
    teacher = build_teacher(cfg, shapes)
    with pytest.raises(StageError, match="physio"):
        teacher({"video": random_input(VIDEO, 2)})
    student = build_student(cfg, shapes, tnets=build_tnets(cfg))
    with pytest.raises(StageError, match=r"\(B, N, 16\)"):
        student.forward_from_features(torch.randn(2, 16))


def test_build_student_errors(tiny_config, caplog):
    overrides, shapes = COMBINATIONS["table-three"]
    cfg = tiny_config(overrides)
    with pytest.raises(StageError, match="privileged modalities"):
        build_student(cfg, shapes, tnets={"eda": build_tnets(cfg)["eda"]})
    with pytest.raises(ConfigError, match="use_tnet is false"):
        build_student(tiny_config({**overrides, "distill.use_tnet": False}), shapes, tnets=build_tnets(cfg))
    with pytest.raises(ConfigError, match="one modality"):
        build_student(tiny_config({**overrides, "data.student_modalities": ["face", "gaze"]}), shapes)
    with caplog.at_level(logging.WARNING, logger="pkdot.models.student"):
        student = build_student(cfg, shapes)  # fresh T-Nets, e.g. to load a saved student into: warned
    assert isinstance(student, Student) and "freshly initialised" in caplog.text


def test_student_state_dict_round_trip(tiny_config, random_input):
    overrides, shapes = COMBINATIONS["video+audio-arousal"]
    cfg = tiny_config(overrides)
    trained = build_student(cfg, shapes, tnets=build_tnets(cfg, seed=1), seed=0).eval()
    restored = build_student(cfg, shapes, seed=9)
    restored.load_state_dict(trained.state_dict())
    restored.eval()
    x = random_input(VIDEO, 2)
    torch.testing.assert_close(restored(x).logits, trained(x).logits)
    assert not any(p.requires_grad for p in restored.tnets.parameters())


def test_student_exports_with_torch_export(tiny_config, random_input):
    overrides, shapes = COMBINATIONS["video+physio-spectrogram"]
    cfg = tiny_config(overrides)
    student = build_student(cfg, shapes, tnets=build_tnets(cfg, seed=1), seed=0).eval()
    x = random_input(VIDEO, 3)
    exported = torch.export.export(student, (x,))
    out = exported.module()(x)
    torch.testing.assert_close(out.logits, student(x).logits)
    torch.testing.assert_close(out.embedding, student(x).embedding)
