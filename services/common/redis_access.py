"""Least-privilege Redis users: one per component, each allowed only the keys and commands it uses.

Redis (7.0+) checks, per user, the command (`+cmd`, `+cmd|sub`), every key the command names
against the key globs (`~glob` read and write, `%R~glob` read only, `%W~glob` write only) and
every pub/sub channel against `&glob`. Two consequences shape the table below:

- EVAL and EVALSHA need read *and* write on every key they declare in KEYS (Redis cannot tell
  what a script does), and every command a script runs is checked again, key by key. So every
  Lua script of FIRST names its keys in KEYS (never builds one inside Lua), and a component
  that runs a script holds `~` (read-write) on the script's keys: the site agent's look script
  reads the cancel key, so a site may write cancel keys too — of the ids it knows (its own
  requests), which it could as well leave ungenerated.
- ACLs cannot partition databases: a user reaches the same key globs in every database. The
  rules allow SELECT only of the database in the setup's URL (`+select|<db>`, none for db 0),
  but a connection starts on db 0 and may act there without SELECT. Give a deployment its own
  server, or accept that its users share db 0's name space with it.

What each component may do (the key globs are built by schemas/names.py):

- gateway: read request streams, write its wake streams (XREAD, XADD, EXPIRE); set cancel keys
  and publish on the cancel channel; read and write the API-key and Globus caches and the quota
  counters (GET, SET, MGET; the admission script: GET, INCR, EXPIRE); read the site registry.
- batch-worker: read request streams (XRANGE, EXISTS) and the token counters (MGET); set cancel
  keys and publish on the cancel channel.
- router: the registry mirror (HSET, HGETALL; a script: HGET, HDEL); end streams (XADD,
  EXPIRE; a script: EXISTS) and read them (XREVRANGE, XRANGE); admission (the gateway's caches
  and quota counters, through the same calls and script) and request-id reservations (a
  script: SET NX, GET).
- accounting: add tokens to the token counters (INCRBY, EXPIRE).
- site agent (one user per site, the same rules): write and read request streams, claims and
  cancel keys (the look script: XREVRANGE, SET, GET, EXISTS; then XADD, EXPIRE, XRANGE);
  subscribe to the cancel channel. Never the caches, quota counters, request-id reservations,
  registry or supervisor keys.
- supervisor (`first sites supervise`): its lock and leases (SET NX, a script: GET, PEXPIRE,
  DEL; HGETALL, HSET); read the registry (HMGET).
- producer (one user per producer): read request streams (XREAD) and nothing else.
- keys (`first keys revoke`): delete an API key's cache entry.

Everyone may PING (the clients' health checks); scripts are run by EVALSHA, with SCRIPT LOAD
when the server lost them. A request id is an unguessable UUIDv7 and a site learns only the ids
routed to it, so streams, claims and cancel keys are one glob shared by every site.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, cast

import redis
from redis.connection import parse_url

from schemas import names
from services.common.rabbit_access import user_url

Role = Literal[
    "gateway", "batch-worker", "router", "accounting", "site", "supervisor", "producer", "keys"
]

STREAMS = names.stream_key("*")
REQUEST_IDS = names.request_id_key("*")
WAKES = names.wake_key("*")
CLAIMS = names.claim_key("*")
CANCELS = names.cancel_key("*")
APIKEYS = names.apikey_cache_key("*")
VERDICTS = names.globus_cache_key("*")
QUOTAS = names.quota_key_glob()
TOKENS = names.quota_key_glob("tokens")
LOCK = names.supervisor_key("lock")
LEASES = names.supervisor_key("leases")
SCRIPTS = "evalsha script|load"
"""How redis-py runs a registered script: EVALSHA, and SCRIPT LOAD when the server lacks it."""


def _commands(*words: str) -> tuple[str, ...]:
    """Return the commands named in `words` (each a space-separated list)."""
    return tuple(" ".join(words).split())


_USER_NAME = re.compile(r"[A-Za-z0-9_.@-]+")


@dataclass(frozen=True)
class Acl:
    """One user's permissions: key globs by access, channels and commands (Redis' names)."""

    user: str
    role: Role
    read: tuple[str, ...] = ()
    write: tuple[str, ...] = ()
    read_write: tuple[str, ...] = ()
    channels: tuple[str, ...] = ()
    commands: tuple[str, ...] = ()
    subject: str | None = None
    """The site id or producer name of a site's or producer's user."""

    def rules(self, db: int | None) -> tuple[str, ...]:
        """Return the `ACL SETUSER` rules (all but the password) for database `db`.

        They reset everything first, so applying them again replaces the previous rules. `db`
        None allows SELECT of any database (for a user made outside `first redis setup`).
        """
        select = ("select",) if db is None else (f"select|{db}",) if db else ()
        return (
            "on",
            "resetkeys",
            "resetchannels",
            "clearselectors",
            "-@all",
            *(f"%R~{glob}" for glob in self.read),
            *(f"%W~{glob}" for glob in self.write),
            *(f"~{glob}" for glob in self.read_write),
            *(f"&{channel}" for channel in self.channels),
            *(f"+{command}" for command in ("ping", *self.commands, *select)),
        )

    @property
    def label(self) -> str:
        return f"{self.role} {self.subject}" if self.subject else self.role


def acl_for(role: Role, user: str, subject: str | None = None) -> Acl:
    """Return the least permissions `role` needs (pure: the table in this module's docstring)."""
    if not _USER_NAME.fullmatch(user):
        raise ValueError(f"not a user name Redis and URLs take as is: {user!r}")
    if role == "gateway":
        return Acl(
            user,
            role,
            read=(STREAMS, names.REGISTRY_KEY),
            write=(CANCELS,),
            read_write=(WAKES, APIKEYS, VERDICTS, QUOTAS),
            channels=(names.CANCEL_CHANNEL,),
            commands=_commands("xread xadd expire set get mget incr publish hgetall", SCRIPTS),
        )
    if role == "batch-worker":
        return Acl(
            user,
            role,
            read=(STREAMS, TOKENS),
            write=(CANCELS,),
            channels=(names.CANCEL_CHANNEL,),
            commands=_commands("xrange exists mget set publish"),
        )
    if role == "router":
        return Acl(
            user,
            role,
            read_write=(STREAMS, REQUEST_IDS, names.REGISTRY_KEY, APIKEYS, VERDICTS, QUOTAS),
            commands=_commands(
                "eval xadd expire exists xrevrange xrange hset hgetall hget hdel get set incr",
                SCRIPTS,
            ),
        )
    if role == "accounting":
        return Acl(user, role, read_write=(TOKENS,), commands=_commands("incrby expire"))
    if role == "site":
        if not subject:
            raise ValueError("a site agent's user needs its site id")
        return Acl(
            user,
            role,
            read_write=(STREAMS, CLAIMS, CANCELS),
            channels=(names.CANCEL_CHANNEL,),
            commands=_commands(
                "xrevrange set get exists expire xadd xrange subscribe unsubscribe", SCRIPTS
            ),
            subject=subject,
        )
    if role == "supervisor":
        return Acl(
            user,
            role,
            read=(names.REGISTRY_KEY,),
            read_write=(LOCK, LEASES),
            commands=_commands("set get pexpire del hgetall hset hmget", SCRIPTS),
        )
    if role == "producer":
        return Acl(user, role, read=(STREAMS,), commands=_commands("xread"), subject=subject)
    return Acl(user, role, write=(APIKEYS,), commands=_commands("del"))


FIXED_ROLES: tuple[Role, ...] = ("gateway", "batch-worker", "router", "accounting")
"""The roles of one user each, besides sites and producers (and the operator's `keys`)."""


def plan(prefix: str, sites: list[str], producers: list[str]) -> list[Acl]:
    """Return one deployment's users: each fixed role, each site and each producer."""
    acls = [acl_for(role, f"{prefix}{role}") for role in (*FIXED_ROLES, "supervisor", "keys")]
    acls += [acl_for("site", f"{prefix}site-{site}", site) for site in sites]
    acls += [acl_for("producer", f"{prefix}producer-{p}", p) for p in producers]
    return acls


URL_VARIABLE: dict[Role, str] = {"producer": "FIRST_PRODUCER_REDIS_URL"}
"""The variable a role reads its Redis URL from, where it is not FIRST_REDIS_URL."""


def url_variable(role: Role) -> str:
    """Return the environment variable that carries `role`'s Redis URL."""
    return URL_VARIABLE.get(role, "FIRST_REDIS_URL")


@dataclass(frozen=True)
class Account:
    """A user the setup made or updated; `password` is None when it was left unchanged."""

    acl: Acl
    password: str | None


class Server:
    """One Redis server, through an administrator's connection (every call bounded)."""

    def __init__(self, admin_url: str, timeout_s: float = 10.0) -> None:
        self.url = admin_url
        parts = parse_url(admin_url)  # type: ignore[no-untyped-call]
        self.db = int(parts.get("db") or 0)
        self.where = f"{parts.get('host', '')}:{parts.get('port', 6379)}/{self.db}"
        """The server and database, without credentials (for messages)."""
        self._redis = redis.Redis.from_url(
            admin_url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s
        )

    def password_hashes(self, user: str) -> list[str] | None:
        """Return the SHA-256 hashes of the user's passwords; None if there is no such user."""
        found = self._redis.acl_getuser(user)
        return None if found is None else list(cast(dict[str, list[str]], found)["passwords"])

    def set_user(self, user: str, rules: Sequence[str]) -> None:
        self._redis.execute_command("ACL", "SETUSER", user, *rules)  # type: ignore[no-untyped-call]

    def delete_users(self, users: Sequence[str]) -> None:
        if users:
            self._redis.execute_command("ACL", "DELUSER", *users)  # type: ignore[no-untyped-call]

    def save(self) -> bool:
        """Write the users to the server's ACL file; False if it has none (they live in memory)."""
        try:
            self._redis.execute_command("ACL", "SAVE")  # type: ignore[no-untyped-call]
        except redis.ResponseError as exc:
            if "ACL file" not in str(exc):
                raise
            return False
        return True

    def open_default_user(self) -> bool:
        """Tell whether the `default` user is on without a password (anyone skips the ACLs)."""
        found = self._redis.acl_getuser("default")
        flags = cast(dict[str, list[str]], found or {}).get("flags", [])
        return "on" in flags and "nopass" in flags

    def close(self) -> None:
        self._redis.close()


def apply(servers: Sequence[Server], acls: Sequence[Acl], *, rotate: bool = False) -> list[Account]:
    """Make or update every user on every server, with the same password everywhere.

    A user that exists on some server keeps its password (copied by hash to the servers that
    lack it, so adding a server is a rerun); a new user, or every user with `rotate`, gets a new
    one. Each user is one `ACL SETUSER` per server, which Redis applies atomically.
    """
    accounts = []
    for acl in acls:
        known = (server.password_hashes(acl.user) for server in servers)
        hashes = next((found for found in known if found), None)
        password = None
        if rotate or hashes is None:
            password = secrets.token_urlsafe(24)
            secret = [f">{password}"]
        else:
            secret = [f"#{digest}" for digest in hashes]
        for server in servers:
            server.set_user(acl.user, ["resetpass", *secret, *acl.rules(server.db)])
        accounts.append(Account(acl, password))
    return accounts


def env_lines(admin_urls: Sequence[str], accounts: Sequence[Account]) -> list[str]:
    """Return, per account, its Redis URL on the first server (and, as comments, on the others).

    Passwords appear once: when they are issued.
    """
    lines = []
    for account in accounts:
        acl = account.acl
        lines.append(f"# {acl.label}: user {acl.user}")
        if account.password is None:
            lines.append("#   password unchanged (rerun with --rotate to issue a new one)")
            continue
        urls = [user_url(url, acl.user, account.password) for url in admin_urls]
        lines.append(f"{url_variable(acl.role)}={urls[0]}")
        lines.extend(f"#   the same user on another server: {url}" for url in urls[1:])
    return lines
