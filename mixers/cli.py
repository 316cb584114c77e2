"""Argument handling shared by the small key=value command-line tools."""
from __future__ import annotations

import sys


def key_value_options(argv: list[str], usage: str, required: tuple[str, ...] = ()) -> dict[str, str]:
    """Parse ``key=value`` arguments; print ``usage`` and exit on -h/--help or a missing key."""
    if any(arg in ("-h", "--help") for arg in argv):
        print(usage)
        sys.exit(0)
    options = dict(arg.split("=", 1) for arg in argv if "=" in arg)
    unparsed = [arg for arg in argv if "=" not in arg]
    missing = [key for key in required if key not in options]
    if unparsed or missing:
        problem = f"expected key=value arguments, got {unparsed}" if unparsed else f"missing {', '.join(missing)}"
        print(f"error: {problem}\n{usage}", file=sys.stderr)
        sys.exit(2)
    return options
