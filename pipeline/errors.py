"""Whose fault is it: the one module of error types.

Three kinds, and every caller decides by kind, never by catching ``ValueError``:

- :class:`BadInput`: the input (image, mask, parameters, rules, settings, LoRA file, dataset) cannot
  be used. Permanent: retrying cannot help. The processor turns it into a ``failed`` record with
  the message; the CLI exits 2 (configuration) or 4 (an input).
- :class:`ModelUnavailable`: a model role cannot be loaded (missing, offline, licence refused).
  It stops a daemon's start (exit 3) or fails the command clearly.
- everything else is an *internal error* (a bug, out of memory, a busy disk): the daemon logs the
  traceback and retries up to ``--max-attempts``, then writes ``failed`` with "internal error" and
  the exception's type.

:class:`QAFailed` is a bad-input kind of its own: an edit's result broke a guarantee (pixels outside
the edit changed, a moved product altered, a product lost). Nothing is written but the ``failed``
record; retrying the same seeds would give the same result.
"""

from __future__ import annotations

from typing import Any


class ProductStudioError(Exception):
    """Base of the product's own errors. ``permanent``: retrying the same input cannot help."""

    permanent = False


class BadInput(ProductStudioError):
    """The user's input or configuration is at fault; ``str()`` is the whole message."""

    permanent = True


class LoraError(BadInput):
    """A LoRA file or spec that cannot be used; ``str()`` names the file and the reason."""


class ParamsError(BadInput):
    """Action parameters that do not validate. ``problems``: ``[(field, reason)]``, ``field`` dotted
    (``"x"``, ``"loras.0.path"``) within the action; ``op`` the operation's name."""

    def __init__(self, op: str | None, problems: list[tuple[str, str]]):
        self.op = op
        self.problems = list(problems)
        super().__init__(self.format())

    def __reduce__(self) -> tuple:
        return (type(self), (self.op, self.problems))

    def format(self) -> str:
        what = f"{self.op}: " if self.op else ""
        return what + "; ".join(f"{f}: {r}" if f else r for f, r in self.problems)


class QAFailed(BadInput):
    """The QA gate refused a result. ``checks``: the checks as recorded (name, passed, figures)."""

    def __init__(self, message: str, checks: list[dict[str, Any]] | None = None):
        self.checks = list(checks or [])
        super().__init__(message)

    def __reduce__(self) -> tuple:
        return (type(self), (str(self), self.checks))


class ModelUnavailable(ProductStudioError):
    """A model role cannot be loaded or used; not the input's fault, not retried per image."""


class ModelLoadError(ModelUnavailable):
    """A role could not be located or loaded. ``str()`` names role, source and reason."""

    def __init__(self, role: str, source: str, reason: str, hint: str = ""):
        self.role, self.source, self.reason, self.hint = role, source, reason, hint
        msg = f"model role '{role}' ({source}): {reason}"
        super().__init__(msg + (f"\n  hint: {hint}" if hint else ""))

    def __reduce__(self) -> tuple:
        # Picklable with its own arguments: it crosses process boundaries (a Ray actor's warm-up).
        return (type(self), (self.role, self.source, self.reason, self.hint))


def is_bad_input(exc: BaseException) -> bool:
    """True for errors that are the input's fault (permanent): a ``failed`` record, no retry."""
    return isinstance(exc, BadInput) or bool(getattr(exc, "permanent", False))


def internal_error_message(exc: BaseException, attempts: int | None = None) -> str:
    """The ``failed`` record's error for an internal error: says so, with the exception's type."""
    tries = f" after {attempts} attempt{'s' if attempts != 1 else ''}" if attempts else ""
    return f"internal error{tries}: {type(exc).__name__}: {exc}"
