"""`F`: one flag as a dataclass field carrying its help text (shared by every flag module)."""

from __future__ import annotations

from dataclasses import field


def F(default, help: str, **kw):  # noqa: A002 - mirrors argparse
    """A flag: a dataclass field carrying its help text and extra argparse options."""
    return field(default=default, metadata={"help": help, **kw})
