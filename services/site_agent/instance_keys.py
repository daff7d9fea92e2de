"""The per-instance keys that guard vLLM instances: made, stored, read and checked.

An instance the agent starts listens only behind the relay (services/site_agent/relay.py),
which wants `Authorization: Bearer <key>` on every request. The agent makes the key when it
starts the instance and keeps it in a 0600 file in an owner-only folder of its state folder;
the job's relay reads it from there. The key never appears on a command line (others read
/proc/*/cmdline) nor in the job script. Instances someone else runs (`urls`) name a key file
the same way (siteconfig's `api_key_file`, FIRST_SITE_AGENT_BACKEND_KEY_FILES).

Stdlib only: the relay imports this module on the compute node.
"""

from __future__ import annotations

import hmac
import os
import secrets
import stat
from pathlib import Path

from services.common.private_file import write_private

KEY_BYTES = 32
"""Entropy of a key (secrets.token_urlsafe: 43 characters)."""


class KeyFileError(RuntimeError):
    """A key file is missing, empty, or readable by others than its owner."""


def new_key() -> str:
    """Return a fresh instance key."""
    return secrets.token_urlsafe(KEY_BYTES)


def write_key(path: Path, key: str) -> None:
    """Write `key` to `path` (mode 0600) in a folder made owner-only (0700).

    The key never lies in a file others can read, not even for a moment (`write_private`).
    """
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)  # mkdir's mode does not apply to a folder that exists
    write_private(path, key + "\n")


def read_key(path: Path) -> str:
    """Return the key in `path`; KeyFileError unless it is a non-empty owner-only file."""
    try:
        mode = path.stat().st_mode
        key = path.read_text().strip()
    except OSError as exc:
        raise KeyFileError(f"cannot read key file {path}: {exc}") from exc
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyFileError(f"key file {path} is open to others (mode {mode & 0o777:o}): chmod 600")
    if not key:
        raise KeyFileError(f"key file {path} is empty")
    return key


def bearer(key: str) -> dict[str, str]:
    """Return the header that presents `key` ({} for no key)."""
    return {"authorization": f"Bearer {key}"} if key else {}


def authorized(header: str | None, expected: bytes) -> bool:
    """Tell whether an Authorization header presents the key `expected` (constant time)."""
    if header is None:
        return False
    scheme, _, presented = header.partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(presented.strip().encode(), expected)
