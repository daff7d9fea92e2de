"""Least-privilege RabbitMQ users: one per component, each allowed only what it does.

RabbitMQ checks three regular expressions per user and vhost (its access-control guide):
*configure* (declare or delete a queue or exchange), *write* (publish to an exchange; bind a
queue, which also needs *read* on the exchange) and *read* (consume from a queue; bind from an
exchange). Passive declares need nothing, and publishing to the default exchange is a write
to the resource `amq.default`. On a topic exchange, *topic permissions* (two more regular
expressions per exchange) limit the routing keys a user may publish with (write) and bind
with (read); a user without topic permissions on an exchange is not limited there. So an
operator declares the whole topology once with an administrator (`first rabbit setup`,
below), and every service then runs with `FIRST_DECLARE_TOPOLOGY=false` and a user that can
touch only its own queues and exchanges:

- gateway (and the batch worker): write first.requests; read first.batch.results.
- router: configure its own heartbeat and usage queues; write first.sites, first.control,
  first.dead, first.replies and its heartbeat and usage queues (to bind them); read
  first.router.requests, first.router.batch, first.router.ingress, first.dead,
  first.heartbeats and first.usage (to bind from them), its heartbeat and usage queues, and
  every site's interactive and batch queues (to move work off a site that died).
- accounting: read first.accounting.usage.
- site agent of S: write first.usage, first.heartbeats, first.replies; read
  first.site.S.interactive, first.site.S.batch, first.site.S.control.
- producer P: configure, write (to bind them) and read first.reply.P.*; write first.ingress;
  read first.replies (to bind from it), with topic permissions there that let it bind only
  routing keys under `first.reply.P.` (and publish none).

Nobody but the administrator writes `amq.default`: with it a component could publish into any
queue by name (another site's work or control, a producer's replies, the batch results, the
dead letters). Replies travel through `first.replies` instead, each reply queue bound by its
own name. A producer's reply queues carry its RabbitMQ user name (`names.reply_queue_prefix`):
the router accepts a `reply_to` only under the publisher's own prefix (RabbitMQ vouches for the
publisher through the `user_id` property), and its topic permission lets it bind only keys
under that prefix, so nobody can have results sent to, or read from, another producer's queue.
Site ids, producer names and the user prefix are plain names (`names.NAME_PATTERN`, no `.`):
one user's prefix is then never a prefix of another's.

Who may *send* what is checked by the consumers through the `user_id` property: the router
serves `first.requests` only from gateways (`FIRST_ROUTER_REQUEST_PUBLISHERS`) and a
heartbeat only from its own site's user (`FIRST_ROUTER_SITE_USER_PREFIX` + site id); a site
agent takes work and control only from routers (`FIRST_SITE_AGENT_ROUTER_USERS`). The setup
prints these settings for every component. Site queues are declared by the setup (a site
agent cannot declare queues); adding a site is one more `--site` on a rerun of the setup.
"""

from __future__ import annotations

import json
import re
import secrets
import urllib.parse
from dataclasses import dataclass, replace
from typing import Literal

import httpx

from schemas import names

Role = Literal["gateway", "router", "accounting", "site", "producer"]

DEFAULT_EXCHANGE: str = "amq.default"
"""The name RabbitMQ's permission checks give the default exchange (`""`)."""

_HEARTBEAT_QUEUE_PREFIX = names.heartbeat_queue("")
_ROUTER_USAGE_QUEUE_PREFIX = names.router_usage_queue("")


SITE_USER_INFIX: str = "site-"
"""A site's user is `<prefix>site-<site id>`: the router's FIRST_ROUTER_SITE_USER_PREFIX is
`<prefix>site-`."""


@dataclass(frozen=True)
class TopicGrant:
    """One user's topic permissions on one topic exchange (routing keys, regular expressions)."""

    exchange: str
    write: str
    read: str


@dataclass(frozen=True)
class Grant:
    """One user's permissions on one vhost (anchored regular expressions)."""

    user: str
    role: Role
    configure: str
    write: str
    read: str
    site_id: str | None = None
    topics: tuple[TopicGrant, ...] = ()
    producer: str | None = None
    """A producer's name (as given to the setup), which labels its env lines."""

    @property
    def label(self) -> str:
        """Return how the setup's output names this user's component ("site s1", "router")."""
        subject = self.site_id or self.producer
        return f"{self.role} {subject}" if subject else self.role


def check_plain(what: str, name: str) -> None:
    """Raise ValueError unless `name` is a plain name (no `.`: see names.NAME_PATTERN)."""
    if not names.is_plain_name(name):
        raise ValueError(f"{what} {name!r} must match {names.NAME_PATTERN} (no '.')")


def _exact(name: str) -> str:
    return re.escape(name)


def _prefixed(prefix: str) -> str:
    return re.escape(prefix) + ".+"


def _any(*fragments: str) -> str:
    """Return a regex matching exactly one of `fragments` (already regexes); none: nothing."""
    return "^(" + "|".join(fragments) + ")$" if fragments else "^$"


def grant_for(role: Role, user: str, site_id: str | None = None) -> Grant:
    """Return the least permissions `role` needs (pure: the table in this module's docstring)."""
    check_plain("user", user)
    if role == "gateway":
        return Grant(
            user,
            role,
            "^$",
            _any(_exact(names.REQUESTS_EXCHANGE)),
            _any(_exact(names.BATCH_RESULTS_QUEUE)),
        )
    if role == "router":
        beats = _prefixed(_HEARTBEAT_QUEUE_PREFIX)
        usage = _prefixed(_ROUTER_USAGE_QUEUE_PREFIX)
        write = (
            names.SITES_EXCHANGE,
            names.CONTROL_EXCHANGE,
            names.DEAD_EXCHANGE,
            names.REPLIES_EXCHANGE,
        )
        read = (
            names.ROUTER_REQUESTS_QUEUE,
            names.ROUTER_BATCH_QUEUE,
            names.ROUTER_INGRESS_QUEUE,
            names.DEAD_QUEUE,
        )
        # Work queues of every site: the mover empties those of a site whose heartbeats stopped.
        site_work = (
            re.escape(names.SITE_QUEUE_PREFIX) + r"[^.]+\.(" + "|".join(names.PRIORITIES) + ")"
        )
        return Grant(
            user,
            role,
            _any(beats, usage),
            _any(*map(_exact, write), beats, usage),
            _any(
                *map(_exact, (*read, names.HEARTBEATS_EXCHANGE, names.USAGE_EXCHANGE)),
                beats,
                usage,
                site_work,
            ),
        )
    if role == "accounting":
        return Grant(user, role, "^$", "^$", _any(_exact(names.ACCOUNTING_USAGE_QUEUE)))
    if role == "site":
        if not site_id:
            raise ValueError("a site agent's grant needs its site id")
        check_plain("site id", site_id)
        queues = [names.site_queue(site_id, p) for p in names.PRIORITIES]
        queues.append(names.site_control_queue(site_id))
        site_writes = (names.USAGE_EXCHANGE, names.HEARTBEATS_EXCHANGE, names.REPLIES_EXCHANGE)
        readable = _any(*map(_exact, queues))
        return Grant(user, role, "^$", _any(*map(_exact, site_writes)), readable, site_id)
    replies = _prefixed(names.reply_queue_prefix(user))
    # Binding its queues to first.replies needs write on them and read on the exchange; the
    # topic permission keeps the binding keys under its own prefix (RabbitMQ checks it on bind).
    own_keys = TopicGrant(
        names.REPLIES_EXCHANGE, "^$", "^" + re.escape(names.reply_queue_prefix(user))
    )
    return Grant(
        user,
        role,
        _any(replies),
        _any(_exact(names.INGRESS_EXCHANGE), replies),
        _any(replies, _exact(names.REPLIES_EXCHANGE)),
        topics=(own_keys,),
    )


def site_user(prefix: str, site_id: str) -> str:
    """Return the RabbitMQ user of site `site_id`'s agents."""
    return f"{prefix}{SITE_USER_INFIX}{site_id}"


def plan(prefix: str, sites: list[str], producers: list[str]) -> list[Grant]:
    """Return one deployment's grants: gateway, router, accounting, each site and producer.

    Raises ValueError for a site id, producer name or prefix that is not a plain name.
    """
    check_plain("user prefix", prefix)
    for producer in producers:
        check_plain("producer name", producer)
    grants = [grant_for(role, f"{prefix}{role}") for role in ("gateway", "router", "accounting")]
    grants += [grant_for("site", site_user(prefix, site), site) for site in sites]
    grants += [
        replace(grant_for("producer", f"{prefix}producer-{name}"), producer=name)
        for name in producers
    ]
    return grants


def user_url(admin_url: str, user: str, password: str) -> str:
    """Return `admin_url` (host, port, vhost, query) with another user's credentials."""
    parts = urllib.parse.urlsplit(admin_url)
    host = parts.hostname or "127.0.0.1"
    port = f":{parts.port}" if parts.port else ""
    quoted = f"{urllib.parse.quote(user, safe='')}:{urllib.parse.quote(password, safe='')}"
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{quoted}@{host}{port}"))


def vhost_of(amqp_url: str) -> str:
    """Return the vhost an AMQP URL names (AMQP's default is `/`)."""
    path = urllib.parse.urlsplit(amqp_url).path
    return urllib.parse.unquote(path[1:]) if len(path) > 1 else "/"


class SetupError(RuntimeError):
    """The management API refused a step (its status and body are in the message)."""


@dataclass(frozen=True)
class Account:
    """A user the setup made or updated; `password` is None when it was left unchanged."""

    grant: Grant
    password: str | None


class ManagementApi:
    """The few RabbitMQ management HTTP API calls the setup needs (bounded, typed errors)."""

    def __init__(self, client: httpx.Client, vhost: str) -> None:
        self._http = client
        self._vhost = urllib.parse.quote(vhost, safe="")

    def _check(self, response: httpx.Response, what: str) -> None:
        if response.status_code >= 300:
            raise SetupError(f"{what}: HTTP {response.status_code} {response.text[:200]}")

    def ensure_vhost(self) -> None:
        self._check(self._http.put(f"/vhosts/{self._vhost}"), "create vhost")

    def user_exists(self, user: str) -> bool:
        response = self._http.get(f"/users/{urllib.parse.quote(user, safe='')}")
        if response.status_code == 404:
            return False
        self._check(response, f"read user {user}")
        return True

    def put_user(self, user: str, password: str) -> None:
        body = {"password": password, "tags": ""}
        self._check(self._http.put(f"/users/{urllib.parse.quote(user, safe='')}", json=body), user)

    def permit_all(self, user: str) -> None:
        """Give `user` (the administrator running the setup) every permission on the vhost."""
        body = {"configure": ".*", "write": ".*", "read": ".*"}
        path = f"/permissions/{self._vhost}/{urllib.parse.quote(user, safe='')}"
        self._check(self._http.put(path, json=body), f"permissions of {user}")

    def put_permissions(self, grant: Grant) -> None:
        body = {"configure": grant.configure, "write": grant.write, "read": grant.read}
        path = f"/permissions/{self._vhost}/{urllib.parse.quote(grant.user, safe='')}"
        self._check(self._http.put(path, json=body), f"permissions of {grant.user}")
        for topic in grant.topics:
            body = {"exchange": topic.exchange, "write": topic.write, "read": topic.read}
            path = f"/topic-permissions/{self._vhost}/{urllib.parse.quote(grant.user, safe='')}"
            self._check(self._http.put(path, json=body), f"topic permissions of {grant.user}")


def apply(api: ManagementApi, grants: list[Grant], *, rotate: bool = False) -> list[Account]:
    """Create the vhost and every user (a new password only if new or `rotate`); set permissions.

    Rerunning it is safe: existing users keep their passwords and get the current permissions.
    """
    api.ensure_vhost()
    accounts = []
    for grant in grants:
        password = None
        if rotate or not api.user_exists(grant.user):
            password = secrets.token_urlsafe(24)
            api.put_user(grant.user, password)
        api.put_permissions(grant)
        accounts.append(Account(grant, password))
    return accounts


@dataclass(frozen=True)
class Peers:
    """Who each component must trust, by RabbitMQ user (printed into their settings)."""

    gateways: list[str]
    routers: list[str]
    site_user_prefix: str


def env_for(admin_url: str, account: Account, peers: Peers) -> dict[str, str]:
    """Return the environment a component runs with (its URL only if its password was issued)."""
    grant = account.grant
    env = {}
    if account.password is not None:
        env["FIRST_RABBIT_URL"] = user_url(admin_url, grant.user, account.password)
    if grant.role != "producer":
        env["FIRST_DECLARE_TOPOLOGY"] = "false"
    if grant.role == "router":
        env["FIRST_ROUTER_REQUEST_PUBLISHERS"] = json.dumps(peers.gateways)
        env["FIRST_ROUTER_SITE_USER_PREFIX"] = peers.site_user_prefix
    if grant.role == "site" and grant.site_id:
        env["FIRST_SITE_AGENT_SITE_ID"] = grant.site_id
        env["FIRST_SITE_AGENT_ROUTER_USERS"] = json.dumps(peers.routers)
    return env


def envs(
    admin_url: str, accounts: list[Account], prefix: str
) -> list[tuple[Grant, dict[str, str]]]:
    """Return each account's grant and environment (see `env_for`)."""
    peers = Peers(
        gateways=[a.grant.user for a in accounts if a.grant.role == "gateway"],
        routers=[a.grant.user for a in accounts if a.grant.role == "router"],
        site_user_prefix=site_user(prefix, ""),
    )
    return [(a.grant, env_for(admin_url, a, peers)) for a in accounts]


def env_lines(admin_url: str, accounts: list[Account], prefix: str) -> list[str]:
    """Return, per account, its environment as lines (passwords appear once: when issued)."""
    lines = []
    for (grant, env), account in zip(envs(admin_url, accounts, prefix), accounts, strict=True):
        lines.append(f"# {grant.label}: user {grant.user}")
        if account.password is None:
            lines.append("#   password unchanged (rerun with --rotate to issue a new one)")
        lines.extend(f"{name}={value}" for name, value in env.items())
    return lines
