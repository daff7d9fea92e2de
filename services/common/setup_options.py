"""The options `first rabbit setup` and `first redis setup` share, and how they hand out the
env lines they make (passwords, printed once or written to an owner-only file)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from services.common.private_file import write_private

PrefixOption = Annotated[str, typer.Option(help="Prefix of the user names.")]
RotateOption = Annotated[bool, typer.Option(help="Give existing users new passwords.")]
OutOption = Annotated[
    Path | None, typer.Option(help="Write the env lines here (mode 0600), not to stdout.")
]


def hand_out(lines: list[str], out: Path | None) -> None:
    """Print the env lines, or write them to `out`, which only its owner may read."""
    text = "\n".join(lines) + "\n"
    if out is None:
        typer.echo(text, nl=False)
    else:
        write_private(out, text)
