"""The error classes every edgegen layer raises.

Messages follow one style: ``subject | what is wrong: value. Note: what to do``.
The CLI prints the message alone (no traceback) and exits with ``exit_code``.
"""

from __future__ import annotations


class EdgegenError(Exception):
    """Base of every error edgegen raises on purpose."""

    exit_code = 1

    def __init__(self, subject: str, problem: str, note: str = ""):
        self.subject, self.problem, self.note = subject, problem, note
        text = f"{subject} | {problem}"
        if note:
            text += f". Note: {note}"
        super().__init__(text)


class BadInputError(EdgegenError, ValueError):
    """A caller passed an argument the runtime cannot use (prompt, seed, shape...)."""

    exit_code = 2


class BadBundleError(EdgegenError):
    """A bundle is unreadable, tampered with, or not of a schema this runtime knows."""


class EngineMismatchError(BadBundleError):
    """An engine was built for another TensorRT version or GPU."""


class BackendUnavailableError(EdgegenError):
    """A backend asked for by name cannot run on this machine."""


class ValidationFailedError(EdgegenError):
    """Exported graphs disagree with PyTorch beyond tolerance, or a quality gate failed."""


class CheckpointError(BadInputError):
    """A checkpoint directory is missing parts or holds weights edgegen refuses to load."""
