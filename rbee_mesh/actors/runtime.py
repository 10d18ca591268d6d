"""Small pieces every actor's trio code shares."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def single_errors() -> Iterator[None]:
    """Re-raise an exception group that holds one exception as that exception.

    A context manager that yields inside a nursery gets its body's exception wrapped in a group
    (trio's strict exception groups); its caller expects the exception itself, as with any other
    context manager. Groups of several exceptions are left alone.
    """
    try:
        yield
    except BaseExceptionGroup as group:
        exc: BaseException = group
        while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
            exc = exc.exceptions[0]
        if exc is group:
            raise
        raise exc from None
