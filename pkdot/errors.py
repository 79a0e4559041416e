"""One small error hierarchy: every message names the file/field and what was expected."""

from __future__ import annotations


class PkdotError(Exception):
    """Base class of every error pkdot raises on purpose."""


class ConfigError(PkdotError):
    """A run configuration is invalid (names the field)."""


class DatasetError(PkdotError):
    """A dataset root, manifest or recording is not what the adapter expects (names the path)."""


class FeatureError(PkdotError):
    """Feature extraction failed on an input (names the sample/file and the reason)."""


class StaleCacheError(PkdotError):
    """An embedding cache does not match the teacher checkpoint it claims to come from."""


class StageError(PkdotError):
    """A pipeline stage is missing an upstream artifact or was given inconsistent inputs."""


class InfrastructureError(PkdotError):
    """A transient failure of the machinery, not of the input (a Ray worker or node died, out of memory, an
    object store full, I/O): the flow retries it, re-running resumes (see :func:`pkdot.ray_utils.is_infrastructure_error`)."""
