"""Who is calling, whatever the credential was (an API key or a Globus Auth token)."""

from __future__ import annotations

import msgspec


class Principal(msgspec.Struct, frozen=True, kw_only=True):
    """An authenticated caller.

    `groups` are Globus group ids (empty for API keys); `domain` is the identity provider's
    domain of a Globus identity; `expires_at` is the credential's expiry (None: an API key,
    which lasts until revoked).
    """

    user_id: str
    username: str
    groups: tuple[str, ...] = ()
    is_admin: bool = False
    domain: str = ""
    identity_set: tuple[str, ...] = ()
    expires_at: float | None = None
