"""How the daemon writes an option on the client's command line, and how it reads one back.

Every value goes as one word, ``--flag=value``: a value that begins with
``-`` (a job id, a user name) can then never be taken for an option, by our
client's argparse or by the legacy Go client's pflag.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional


def option(name: str, value: str) -> str:
    """``--name=value``, one argv word."""
    return f"{name}={value}"


def option_value(argv: Sequence[str], name: str) -> Optional[str]:
    """The value of ``name`` in ``argv``, written ``--name=value`` or ``--name value``."""
    prefix = name + "="
    for index, word in enumerate(argv):
        if word.startswith(prefix):
            return word[len(prefix) :]
        if word == name and index + 1 < len(argv):
            return argv[index + 1]
    return None
