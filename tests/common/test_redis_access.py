"""One least-privilege Redis user per component (`first redis setup`), against the real Redis.

Each attack is made as an attacker holding one component's Redis credentials, as the setup
printed them: it is refused (NOPERM, from Redis itself) and nothing changes. On main, every
component shares one unauthenticated Redis, so every one of these writes succeeds. The whole
stack running on these users (the gateway's, router's and accounting's own work) is the e2e
suite (tests/e2e/conftest.py, with real vLLM).
"""

from __future__ import annotations

import ast
import fnmatch
import re
import secrets
import subprocess
import sys
import urllib.parse
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
from redis.asyncio import Redis
from redis.exceptions import AuthenticationError, NoPermissionError, ResponseError

from schemas import names
from schemas.records import Chunk, Final, Usage
from services.access.request_ids import DuplicateRequestId, RequestIds
from services.common import streams
from services.common.private_file import write_private
from services.common.redis_access import acl_for
from services.common.redis_lock import RedisLock
from services.common.replies import read_reply
from services.gateway.inference import cancel
from services.site_agent.cancel import CancelWatcher
from services.site_agent.execution import LOOK_SCRIPT
from tests.faults.privates import PrivateRedis
from tests.sources import parse, python_files

FORBIDDEN_TO_SITES = [
    names.apikey_cache_key("0" * 64),
    names.globus_cache_key("0" * 64),
    names.quota_key("tokens", "user", "u1", "day", 0),
    names.quota_key("requests", "user", "u1", "minute", 0),
    names.REGISTRY_KEY,
    names.supervisor_key("lock"),
    names.supervisor_key("leases"),
    names.wake_key("r1"),
    names.request_id_key("r1"),
]


def reachable(globs: tuple[str, ...], key: str) -> bool:
    return any(fnmatch.fnmatchcase(key, glob) for glob in globs)


def test_a_site_reaches_streams_claims_and_cancels_and_nothing_else() -> None:
    acl = acl_for("site", "s", "alpha")
    everything = acl.read + acl.write + acl.read_write
    for key in (names.stream_key("r"), names.claim_key("r"), names.cancel_key("r")):
        assert reachable(everything, key), key
    for key in FORBIDDEN_TO_SITES:
        assert not reachable(everything, key), key
    assert acl.channels == (names.CANCEL_CHANNEL,)
    assert "publish" not in acl.commands


def test_only_the_router_writes_the_registry_and_only_accounting_adds_tokens() -> None:
    for role in ("gateway", "batch-worker", "accounting", "supervisor", "producer", "keys"):
        acl = acl_for(role, "u")  # type: ignore[arg-type]
        assert not reachable(acl.write + acl.read_write, names.REGISTRY_KEY), role
    assert acl_for("accounting", "u").read_write == (names.quota_key_glob("tokens"),)
    assert not reachable(
        acl_for("accounting", "u").read_write, names.quota_key("requests", "user", "u", "day", 0)
    )


def test_rules_allow_select_of_the_setups_database_only() -> None:
    acl = acl_for("producer", "p")
    assert "+select|7" in acl.rules(7)
    assert not any(rule.startswith("+select") for rule in acl.rules(0))
    assert "+select" in acl.rules(None)


def test_a_site_user_needs_its_site_id_and_names_must_be_plain() -> None:
    with pytest.raises(ValueError, match="site id"):
        acl_for("site", "s")
    with pytest.raises(ValueError, match="user name"):
        acl_for("gateway", "a b")


SERVICES = Path(__file__).resolve().parents[2] / "services"


def lua_scripts() -> list[tuple[str, str]]:
    """Every Lua script in services/ (a string constant that calls Redis), with its file."""
    found = []
    for path in python_files(SERVICES):
        for node in ast.walk(parse(path)):
            if isinstance(node, ast.Constant) and "redis.call(" in str(node.value):
                found.append((str(path.relative_to(SERVICES)), str(node.value)))
    return found


def test_every_lua_script_names_its_keys_in_keys() -> None:
    """ACLs check the keys a script declares before it runs; a key built inside Lua escapes it."""
    scripts = lua_scripts()
    assert len(scripts) >= 6, scripts  # the look, admission, end-if-new, registry and lock scripts
    for where, script in scripts:
        for key in re.findall(r"redis\.call\(\s*'\w+',\s*([^,)]+)", script):
            declared = key.startswith("KEYS[") or (key == "key" and "in ipairs(KEYS)" in script)
            assert declared, (where, key)
        assert "first:" not in script, where
        assert ".." not in script, where  # no key names concatenated in Lua


def run_setup(admin_urls: list[str], prefix: str, out: Path, *extra: str) -> str:
    """Run `first redis setup` as an operator does; return the env file it wrote."""
    argv = [sys.executable, "-c", "from services.cli import app; app()", "redis", "setup"]
    for url in admin_urls:
        argv += ["--admin-url", url]
    argv += ["--prefix", prefix, "--out", str(out), *extra]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    return out.read_text()


def parse_urls(text: str) -> dict[str, str]:
    """Read the env file: `# <label>: user <name>`, then its URL line; by label."""
    urls, label = {}, ""
    for line in text.splitlines():
        if line.startswith("# ") and ": user " in line:
            label = line[2:].split(":", 1)[0]
        elif line and not line.startswith("#"):
            urls[label] = line.split("=", 1)[1]
    return urls


def user_of(url: str) -> str:
    return url.split("//", 1)[1].split(":", 1)[0]


@dataclass
class Users:
    admin_url: str
    urls: dict[str, str]


@pytest.fixture(scope="module")
def users(
    new_redis_url: Callable[[], str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Users]:
    """Every component's user on a database of this module's own; deleted afterwards."""
    admin_url = new_redis_url()
    prefix = f"t{secrets.token_hex(3)}-"
    out = tmp_path_factory.mktemp("redis-users") / "redis.env"
    urls = parse_urls(run_setup([admin_url], prefix, out, "--site", "s1", "--producer", "p"))
    try:
        yield Users(admin_url, urls)
    finally:
        with redis.Redis.from_url(admin_url, socket_timeout=5) as admin:
            admin.acl_deluser(*map(user_of, urls.values()))


@pytest.fixture
async def as_role(users: Users) -> AsyncIterator[Callable[[str], Redis]]:
    """Clients that log in as one component's user (by its label: "site s1", "gateway" ...)."""
    made: list[Redis] = []

    def connect(label: str) -> Redis:
        made.append(Redis.from_url(users.urls[label], socket_timeout=5))
        return made[-1]

    yield connect
    for client in made:
        await client.aclose()


@pytest.fixture
async def admin(users: Users) -> AsyncIterator[Redis]:
    client = Redis.from_url(users.admin_url, socket_timeout=5)
    yield client
    await client.aclose()


PRINCIPAL = b"\x84\xa7user_id\xa1u"  # what sits in a cache entry; its bytes do not matter here


async def plant(admin: Redis) -> dict[str, object]:
    """Write what an attacker would forge; return every key's content (to compare after)."""
    apikey, verdict, tokens, requests, registry, lock, leases, wake, reqid = FORBIDDEN_TO_SITES
    await admin.set(apikey, PRINCIPAL)
    await admin.set(verdict, PRINCIPAL)
    await admin.set(tokens, 5)
    await admin.set(requests, 5)
    await admin.hset(registry, "s1", b"heartbeat")
    await admin.set(lock, b"token")
    await admin.hset(leases, "s1", b"1.0")
    await admin.xadd(wake, {b"w": b"1"})
    await admin.set(reqid, b"u1:digest")
    return await snapshot(admin)


async def snapshot(admin: Redis) -> dict[str, object]:
    out: dict[str, object] = {}
    for key in sorted(await admin.keys("*")):
        kind = (await admin.type(key)).decode()
        if kind == "string":
            out[key.decode()] = await admin.get(key)
        elif kind == "hash":
            out[key.decode()] = await admin.hgetall(key)
        else:
            out[key.decode()] = await admin.xrange(key)
    return out


FORGED = b"\x84\xa7user_id\xa4root\xa8is_admin\xc3"
APIKEY, VERDICT, TOKENS, REQUESTS, REGISTRY, LOCK, LEASES, WAKE, REQID = FORBIDDEN_TO_SITES
SITE_ATTACKS: list[tuple[object, ...]] = [
    ("SET", APIKEY, FORGED),  # mint an admin
    ("DEL", APIKEY),
    ("SET", VERDICT, FORGED),  # rewrite a Globus verdict
    ("DEL", VERDICT),
    ("INCR", REQUESTS),  # spend someone's quota
    ("SET", TOKENS, 0),  # or reset one's own
    ("DEL", TOKENS),
    ("HSET", REGISTRY, "ghost", b"heartbeat"),  # fake a site
    ("HDEL", REGISTRY, "s1"),
    ("DEL", REGISTRY),
    ("SET", LOCK, b"mine"),  # take the supervisor's lock
    ("HSET", LEASES, "s1", b"0"),
    ("XADD", WAKE, "*", "w", "1"),
    ("DEL", REQID),  # free a used request id for reuse
    ("SET", REQID, b"u2:digest"),
    ("PUBLISH", names.CANCEL_CHANNEL, "r1"),  # cancel other sites' work
    ("FLUSHDB",),  # (FLUSHALL is refused the same way; not tried here: a shared server)
    ("CONFIG", "GET", "*"),
    ("ACL", "LIST"),
    ("KEYS", "*"),
    ("SCAN", "0"),
    ("GET", APIKEY),
    ("EVAL", "return redis.call('SET', KEYS[1], ARGV[1])", 1, APIKEY, FORGED),
]


@pytest.mark.parametrize("attack", SITE_ATTACKS, ids=lambda a: " ".join(map(str, a))[:40])
async def test_a_site_agents_credentials_cannot_touch_what_is_not_a_sites(
    attack: tuple[object, ...], as_role: Callable[[str], Redis], admin: Redis
) -> None:
    before = await plant(admin)
    with pytest.raises(NoPermissionError):
        await as_role("site s1").execute_command(*attack)
    assert await snapshot(admin) == before


async def test_a_site_cannot_run_a_script_of_its_own_on_a_forbidden_key(
    as_role: Callable[[str], Redis], admin: Redis
) -> None:
    """The site may load scripts (its own look script): one declaring or hiding a key is refused."""
    site = as_role("site s1")
    before = await plant(admin)
    declared = await site.script_load("return redis.call('SET', KEYS[1], ARGV[1])")
    with pytest.raises(NoPermissionError):
        await site.evalsha(declared, 1, APIKEY, FORGED)  # type: ignore[misc]
    hidden = await site.script_load(f"return redis.call('SET', '{APIKEY}', ARGV[1])")
    with pytest.raises(ResponseError, match="can't access"):
        await site.evalsha(hidden, 0, FORGED)  # type: ignore[misc]
    assert await snapshot(admin) == before


async def test_a_site_cannot_grant_itself_more(
    as_role: Callable[[str], Redis], users: Users, admin: Redis
) -> None:
    user = user_of(users.urls["site s1"])
    before = await admin.acl_getuser(user)
    for attack in (("ACL", "SETUSER", user, "~*", "+@all"), ("ACL", "DELUSER", "default")):
        with pytest.raises(NoPermissionError):
            await as_role("site s1").execute_command(*attack)
    assert await admin.acl_getuser(user) == before


async def test_a_site_cannot_select_another_database(
    as_role: Callable[[str], Redis], users: Users
) -> None:
    other = (int(users.admin_url.rsplit("/", 1)[1]) % 15) + 1
    with pytest.raises(NoPermissionError):
        await as_role("site s1").execute_command("SELECT", other)


async def test_a_site_does_its_job_streams_claims_and_cancels(
    as_role: Callable[[str], Redis],
) -> None:
    site, gateway = as_role("site s1"), as_role("gateway")
    request_id = f"r-{secrets.token_hex(4)}"
    look = site.register_script(LOOK_SCRIPT)
    keys = [names.stream_key(request_id), names.claim_key(request_id)]
    keys.append(names.cancel_key(request_id))
    entries, holder, cancelled = await look(keys=keys, args=["s1/a/1", 15])
    assert (entries, holder, cancelled) == ([], b"s1/a/1", 0)
    assert not await site.set(names.claim_key(request_id), b"s1/b/2", nx=True, ex=15)
    await site.expire(names.claim_key(request_id), 15)
    await streams.append(site, request_id, Chunk(data=b"hi"), ttl_s=60)
    final = Final(outcome="completed", usage=Usage(), site_id="s1", finished_at=0.0)
    await streams.append(site, request_id, final, ttl_s=60)
    assert await streams.last_record(site, request_id) == final
    reply = await read_reply(site, request_id)
    assert reply is not None
    assert reply.outcome == "completed"
    # The gateway's cancel (its key and its message) reaches the site: on the channel...
    async with site.pubsub() as pubsub:
        await pubsub.subscribe(names.CANCEL_CHANNEL)
        assert await pubsub.get_message(timeout=5)  # the subscription's confirmation
        await cancel(gateway, request_id)
        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=5)
        assert message is not None
        assert message["data"] == request_id.encode()
    # ...and as the key its watcher polls.
    watcher = CancelWatcher(site, poll_s=0.2)
    with watcher.watch(request_id) as event:
        await watcher.poll()
        assert event.is_set()


async def test_a_producer_reads_streams_and_writes_nothing(
    as_role: Callable[[str], Redis], admin: Redis
) -> None:
    producer = as_role("producer p")
    before = await plant(admin)
    for attack in (("XADD", names.stream_key("r1"), "*", "r", b"forged"), ("GET", APIKEY)):
        with pytest.raises(NoPermissionError):
            await producer.execute_command(*attack)
    for attack in (("GET", VERDICT), ("HGETALL", REGISTRY), ("KEYS", "*")):
        with pytest.raises(NoPermissionError):
            await producer.execute_command(*attack)
    assert await snapshot(admin) == before
    await admin.xadd(names.stream_key("r2"), {names.RECORD_FIELD: b"x"})
    assert await producer.xread({names.stream_key("r2"): "0-0"})


async def test_the_other_users_do_their_job_and_no_more(
    as_role: Callable[[str], Redis], admin: Redis
) -> None:
    before = await plant(admin)
    refused: list[tuple[str, tuple[object, ...]]] = [
        ("gateway", ("XADD", names.stream_key("r1"), "*", "r", b"forged")),  # forge a result
        ("gateway", ("DEL", REQID)),  # only the router reserves request ids
        ("batch-worker", ("SET", APIKEY, FORGED)),
        ("batch-worker", ("DEL", REQID)),
        ("router", ("SET", LOCK, b"mine")),
        ("accounting", ("INCRBY", REQUESTS, -5)),  # only token counters
        ("supervisor", ("GET", APIKEY)),
        ("keys", ("GET", APIKEY)),
        ("producer p", ("DEL", REQID)),
    ]
    for label, attack in refused:
        with pytest.raises(NoPermissionError):
            await as_role(label).execute_command(*attack)
    assert await snapshot(admin) == before
    # The supervisor's lock and leases; the keys CLI's revocation.
    supervisor = as_role("supervisor")
    await admin.delete(LOCK)
    lock = RedisLock(supervisor, LOCK, ttl_s=5)
    assert await lock.hold()
    assert await lock.hold()
    await lock.release()
    assert not await admin.exists(LOCK)
    await supervisor.hset(LEASES, "s2", b"2.0")
    assert await supervisor.hmget(REGISTRY, ["s1"]) == [b"heartbeat"]
    assert await as_role("keys").delete(APIKEY) == 1
    ids = RequestIds(as_role("router"), skew_s=60)  # the router reserves request ids
    await ids.reserve("r-new", "u1:digest")
    with pytest.raises(DuplicateRequestId):
        await ids.reserve("r-new", "u2:digest")
    assert await as_role("accounting").incrby(TOKENS, 3) == 8


def hashes_of(url: str, user: str) -> list[str]:
    with redis.Redis.from_url(url, socket_timeout=5) as client:
        found = client.acl_getuser(user)
        return [] if found is None else list(found["passwords"])


def logs_in(url: str) -> bool:
    try:
        with redis.Redis.from_url(url, socket_timeout=5) as client:
            return bool(client.ping())
    except AuthenticationError:  # WRONGPASS
        return False


def on_server(url: str, port: int) -> str:
    """Return `url` (its user and password) on another server's database 0."""
    parts = urllib.parse.urlsplit(url)
    netloc = parts.netloc.rsplit(":", 1)[0] + f":{port}"
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc, path="/0"))


def test_setup_is_idempotent_rotates_and_gives_every_server_the_same_users(
    users: Users, tmp_path: Path
) -> None:
    first, second = users.admin_url, PrivateRedis(tmp_path)
    second.start()
    prefix = f"t{secrets.token_hex(3)}-"
    gateway, site = f"{prefix}gateway", f"{prefix}site-s1"
    try:
        urls = parse_urls(run_setup([first], prefix, tmp_path / "a.env", "--site", "s1"))
        hashes = hashes_of(first, site)
        assert hashes
        assert hashes_of(second.url, site) == []
        # Adding a server is a rerun: the users keep their passwords, which it gets too.
        text = run_setup([first, second.url], prefix, tmp_path / "b.env", "--site", "s1")
        assert "FIRST_REDIS_URL=" not in text
        assert "password unchanged" in text
        assert hashes_of(first, site) == hashes_of(second.url, site) == hashes
        assert logs_in(urls["site s1"])
        assert logs_in(on_server(urls["site s1"], second.port))
        # --rotate issues new passwords, on both servers; the old ones stop working.
        text = run_setup(
            [first, second.url], prefix, tmp_path / "c.env", "--site", "s1", "--rotate"
        )
        rotated = parse_urls(text)
        assert hashes_of(first, gateway) == hashes_of(second.url, gateway) != hashes
        assert logs_in(rotated["gateway"])
        assert not logs_in(urls["gateway"])
        assert logs_in(on_server(rotated["gateway"], second.port))
        assert f"the same user on another server: redis://{gateway}:" in text
        assert (tmp_path / "c.env").stat().st_mode & 0o777 == 0o600
    finally:
        second.stop()
        with redis.Redis.from_url(first, socket_timeout=5) as admin:
            made = [str(u) for u in admin.acl_users()]
            admin.acl_deluser(*[u for u in made if u.startswith(prefix)])


def test_the_env_file_replaces_a_symlink_or_a_wide_file_and_is_0600(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_text("keep")
    link = tmp_path / "redis.env"
    link.symlink_to(elsewhere)
    write_private(link, "SECRET=1\n")
    assert elsewhere.read_text() == "keep"
    assert not link.is_symlink()
    assert link.stat().st_mode & 0o777 == 0o600
    wide = tmp_path / "wide.env"
    wide.write_text("old")
    wide.chmod(0o644)
    write_private(wide, "SECRET=2\n")
    assert wide.read_text() == "SECRET=2\n"
    assert wide.stat().st_mode & 0o777 == 0o600
