"""The project's own error type: every user-facing mistake raises it with the bad value named."""


class SeqmixError(ValueError):
    """A configuration, input or state that seqmix cannot accept.

    Subclasses ``ValueError`` so callers that already catch bad values keep working.
    """


def choice_error(field: str, value, allowed) -> SeqmixError:
    """An error for ``field=value`` when only ``allowed`` values are accepted."""
    return SeqmixError(f"{field}={value!r} is not valid; expected one of {sorted(map(str, allowed))}")


def require_int(owner: str, field: str, value, minimum: int = 1, meaning: str = "") -> None:
    """Raise unless ``value`` is an integer >= ``minimum`` (bools are not integers here)."""
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        detail = f" ({meaning})" if meaning else ""
        raise SeqmixError(f"{owner}: {field}={value!r} is not valid; expected an integer >= {minimum}{detail}")


def require_bool(owner: str, field: str, value) -> None:
    """Raise unless ``value`` is True or False itself: "false", 0 or None would silently mean the opposite."""
    if not isinstance(value, bool):
        raise SeqmixError(f"{owner}: {field}={value!r} is not valid; expected True or False")
