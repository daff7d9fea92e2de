"""Writing a secret to a file only its owner can read (passwords, keys)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_private(path: Path, text: str) -> None:
    """Write `text` to `path` with mode 0600, replacing what was there.

    The text goes to a new file in the same folder (made with O_EXCL|O_NOFOLLOW, mode 0600, by
    `tempfile.mkstemp`) that then replaces `path`: a file that existed with a wider mode, was
    held open by someone, or was a symlink to elsewhere never receives the secret.
    """
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.replace(name, path)
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise
