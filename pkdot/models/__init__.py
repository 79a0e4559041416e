"""Models: modality backbones, gated cross-attention fusion, T-Net, the multimodal teacher and the student."""

from __future__ import annotations

from pkdot.models.fusion import GatedCrossAttentionFusion
from pkdot.models.heads import Backbone, MLPBackbone, UnimodalModel
from pkdot.models.physio import LogMelCNN, SpectrogramCNN, WindowCNN
from pkdot.models.student import Student, build_student
from pkdot.models.teacher import Teacher, build_backbone, build_teacher
from pkdot.models.tnet import TNet, build_tnets, mmd_rbf
from pkdot.models.video import VideoBackbone, load_pretrained_video

__all__ = [
    "Backbone",
    "GatedCrossAttentionFusion",
    "LogMelCNN",
    "MLPBackbone",
    "SpectrogramCNN",
    "Student",
    "TNet",
    "Teacher",
    "UnimodalModel",
    "VideoBackbone",
    "WindowCNN",
    "build_backbone",
    "build_student",
    "build_teacher",
    "build_tnets",
    "load_pretrained_video",
    "mmd_rbf",
]
