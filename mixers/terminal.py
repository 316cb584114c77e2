"""Text seqmix prints but did not write itself, with its control characters made visible.

A run's records, a checkpoint's tokenizer, a model's samples and a study's storage can come from
someone else, and their text can hold control characters that a terminal acts on when they are
printed: escape sequences that recolour, retitle or clear it, a carriage return that overwrites
the line, bidirectional overrides that show characters in another order than they are stored.
Every table seqmix prints, its error messages, the training sample and ``seqmix generate`` pass
such text through ``escape_controls``, which writes each of those characters as the escape
Python's ``repr`` uses (``\\x1b``, ``\\r``, ``\\u202e``), so the reader sees it and the
terminal does not act on it. ``mask_url_secrets`` hides the passwords of database URLs in what is
printed or recorded (a storage URL quoted in an error, a sweep's overrides).
"""
from __future__ import annotations

import re

# C0 controls and DEL, C1 controls (U+009B is a one-character CSI to some terminals), the
# bidirectional embeddings, overrides and isolates, and lone surrogates (no encoding writes them:
# printed, they would raise).
CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069\ud800-\udfff]")


def escape_controls(text: str, keep: str = "") -> str:
    """``text`` with every control character but those in ``keep`` (e.g. ``"\\n\\t"``) written as
    its Python escape: ``escape_controls("a\\x1b[2Jb")`` is ``"a\\\\x1b[2Jb"``."""

    def shown(match: re.Match) -> str:
        character = match.group()
        return character if character in keep else repr(character)[1:-1]

    return CONTROLS.sub(shown, text)


# The password of a URL's user (``scheme://user:password@host``), up to the last ``@`` (a password
# can hold one unencoded), and a password-like query parameter (libpq takes ``?password=``).
URL_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^:/?#@\s]*):[^\s]*@")
QUERY_SECRET = re.compile(r"(?P<key>[?&;](?:password|passwd|pwd|pass|sslpassword|secret|token|api_?key)=)[^&#;\s'\"]*",
                          re.IGNORECASE)


def mask_url_secrets(text: str) -> str:
    """``text`` with every URL's password, and every password-like query parameter's value, shown as ``***``."""
    return QUERY_SECRET.sub(r"\g<key>***", URL_PASSWORD.sub(r"\g<head>:***@", text))
