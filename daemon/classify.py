"""Whose fault an exception raised while processing an image is, as the worker acts on it.

Used by the worker (:mod:`daemon.worker`) and by the isolated child (:mod:`daemon.isolate`),
which sends the classification back with an exception it cannot pickle.

- *permanent*: bad input or parameters (:class:`pipeline.errors.BadInput`, or anything marked
  ``permanent = True``): the image fails at once;
- *fatal*: no image can succeed (:class:`pipeline.errors.ModelLoadError`, or anything marked
  ``fatal = True``): the image is requeued and the daemon stops;
- anything else is *transient*: retried with backoff up to ``max_attempts``.
"""

from __future__ import annotations

from pipeline.errors import ModelLoadError, is_bad_input

__all__ = ["describe", "is_fatal", "is_permanent"]


def is_permanent(exc: BaseException) -> bool:
    """Bad input (:class:`pipeline.errors.BadInput`, or anything marked ``permanent``): fail now."""
    return is_bad_input(exc)


def is_fatal(exc: BaseException) -> bool:
    """A model that cannot be loaded (or an error marked ``fatal``, e.g. :class:`daemon.isolate.ChildError`
    carrying a ModelLoadError from the child): every later image would fail the same way."""
    return getattr(exc, "fatal", False) is True or isinstance(exc, ModelLoadError)


def describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"
