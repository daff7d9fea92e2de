"""One least-privilege RabbitMQ user per component (`first rabbit setup`).

The pure grants are checked against names; then, on a real vhost, every user is shown to
do its own work and to be refused (ACCESS_REFUSED from RabbitMQ itself) outside it. The whole
stack running on these users is the e2e suite (tests/e2e/conftest.py, with real vLLM).
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import aio_pika
import pytest
from aio_pika.abc import AbstractChannel
from aio_pika.exceptions import ChannelClosed

from schemas import names
from services.common.rabbit_access import DEFAULT_EXCHANGE, grant_for, plan
from tests.common.rabbit_users import Operation, Users, attempt, least_privilege_users
from tests.conftest import RABBIT_API


def matches(pattern: str, name: str) -> bool:
    return re.search(pattern, name) is not None  # RabbitMQ's own test: a regex search


def test_the_router_may_make_only_its_heartbeat_queues_and_read_only_its_own() -> None:
    grant = grant_for("router", "r")
    assert matches(grant.configure, names.heartbeat_queue("abc"))
    assert not matches(grant.configure, names.ROUTER_REQUESTS_QUEUE)
    assert not matches(grant.configure, names.SITES_EXCHANGE)
    assert matches(grant.read, names.ROUTER_INGRESS_QUEUE)
    assert not matches(grant.read, names.ACCOUNTING_USAGE_QUEUE)
    assert not matches(grant.write, names.REQUESTS_EXCHANGE)
    assert not matches(grant.write, names.USAGE_EXCHANGE)
    assert matches(grant.read, names.site_queue("alpha", "batch"))  # to move off a dead site
    assert not matches(grant.read, names.site_control_queue("alpha"))


def test_a_site_reads_its_own_queues_only() -> None:
    grant = grant_for("site", "s", "alpha")
    assert matches(grant.read, names.site_queue("alpha", "batch"))
    assert not matches(grant.read, names.site_queue("alpha2", "batch"))
    assert not matches(grant.read, names.site_queue("beta", "interactive"))
    assert grant.configure == "^$"


def test_a_producer_may_touch_only_first_ingress_and_its_own_reply_queues() -> None:
    grant = grant_for("producer", "p1")
    assert matches(grant.write, names.INGRESS_EXCHANGE)
    assert not matches(grant.write, names.REQUESTS_EXCHANGE)
    assert matches(grant.read, names.reply_queue_prefix("p1") + "results")
    assert not matches(grant.read, names.reply_queue_prefix("p2") + "results")
    assert not matches(grant.configure, names.reply_queue_prefix("p1"))  # a name is needed


def test_nobody_writes_the_default_exchange_and_replies_have_their_own() -> None:
    for grant in plan("first-", ["s1"], ["p"]):
        assert not matches(grant.write, DEFAULT_EXCHANGE), grant.role
    assert matches(grant_for("router", "r").write, names.REPLIES_EXCHANGE)
    assert matches(grant_for("site", "s", "alpha").write, names.REPLIES_EXCHANGE)


def test_a_producer_binds_first_replies_only_with_keys_under_its_own_prefix() -> None:
    grant = grant_for("producer", "p1")
    assert matches(grant.read, names.REPLIES_EXCHANGE)
    assert matches(grant.write, names.reply_queue_prefix("p1") + "results")  # to bind it
    (topic,) = grant.topics
    assert topic.exchange == names.REPLIES_EXCHANGE
    assert matches(topic.read, names.reply_queue_prefix("p1") + "results")
    assert not matches(topic.read, names.reply_queue_prefix("p1x") + "results")
    assert not matches(topic.read, "#")
    assert not matches(topic.write, "anything")


@pytest.mark.parametrize(
    ("sites", "producers"), [(["a.b"], []), ([], ["lab.x"]), ([], ["*"]), (["#"], [])]
)
def test_the_plan_refuses_names_that_are_not_plain(sites: list[str], producers: list[str]) -> None:
    with pytest.raises(ValueError, match=re.escape("(no '.')")):
        plan("first-", sites, producers)


def test_a_site_grant_without_a_site_id_is_an_error() -> None:
    with pytest.raises(ValueError, match="site id"):
        grant_for("site", "s")


@pytest.fixture(scope="module")
def users(
    new_rabbit_url: Callable[[], str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, Users]]:
    admin_url = new_rabbit_url()
    workdir = tmp_path_factory.mktemp("rabbit-users")
    with least_privilege_users(admin_url, ["s1", "s2"], workdir, ("p",)) as made:
        yield admin_url, made


async def publish_to(channel: AbstractChannel, exchange: str) -> None:
    target = await channel.get_exchange(exchange, ensure=False)
    await target.publish(aio_pika.Message(b"x"), routing_key="x", timeout=5)


async def ignore(_message: aio_pika.abc.AbstractIncomingMessage) -> None:
    return None


async def consume_from(channel: AbstractChannel, queue: str) -> None:
    declared = await channel.get_queue(queue, ensure=False)
    await declared.consume(ignore, timeout=5)


async def declare(channel: AbstractChannel, queue: str) -> None:
    await channel.declare_queue(queue, durable=True, timeout=5)


REFUSED: list[tuple[str, str, Operation]] = [
    ("gateway", "publish to first.ingress", lambda c: publish_to(c, names.INGRESS_EXCHANGE)),
    ("gateway", "read the router's queue", lambda c: consume_from(c, "first.router.requests")),
    ("router", "publish usage", lambda c: publish_to(c, names.USAGE_EXCHANGE)),
    ("router", "declare a work queue", lambda c: declare(c, "first.router.requests2")),
    ("accounting", "publish usage", lambda c: publish_to(c, names.USAGE_EXCHANGE)),
    ("site s1", "read site s2's work", lambda c: consume_from(c, "first.site.s2.interactive")),
    ("site s1", "publish to a site queue", lambda c: publish_to(c, names.SITES_EXCHANGE)),
    ("site s1", "declare its own queue", lambda c: declare(c, "first.site.s1.extra")),
    ("producer p", "publish to first.requests", lambda c: publish_to(c, names.REQUESTS_EXCHANGE)),
    ("producer p", "read the dead letters", lambda c: consume_from(c, names.DEAD_QUEUE)),
    ("producer p", "declare another's reply queue", lambda c: declare(c, "first.reply.x.y")),
]


@pytest.mark.parametrize(("label", "what", "operation"), REFUSED, ids=[r[1] for r in REFUSED])
async def test_each_component_is_refused_outside_its_own_work(
    users: tuple[str, Users], label: str, what: str, operation: Operation
) -> None:
    _admin, made = users
    with pytest.raises(ChannelClosed, match="ACCESS_REFUSED"):
        await attempt(made.urls[label], operation)


async def test_each_component_can_do_its_own_work(users: tuple[str, Users]) -> None:
    _admin, made = users
    allowed: list[tuple[str, Operation]] = [
        ("gateway", lambda c: publish_to(c, names.REQUESTS_EXCHANGE)),
        ("router", lambda c: consume_from(c, names.ROUTER_INGRESS_QUEUE)),
        ("router", lambda c: publish_to(c, names.SITES_EXCHANGE)),
        ("accounting", lambda c: consume_from(c, names.ACCOUNTING_USAGE_QUEUE)),
        ("site s2", lambda c: consume_from(c, names.site_queue("s2", "batch"))),
        ("site s2", lambda c: publish_to(c, names.HEARTBEATS_EXCHANGE)),
        ("producer p", lambda c: publish_to(c, names.INGRESS_EXCHANGE)),
    ]
    for label, operation in allowed:
        await attempt(made.urls[label], operation)  # raises ChannelClosed if refused
    producer_user = made.prefix + "producer-p"
    reply_queue = names.reply_queue_prefix(producer_user) + "results"
    await attempt(made.urls["producer p"], lambda c: declare(c, reply_queue))


def test_rerunning_the_setup_keeps_passwords_and_says_so(
    users: tuple[str, Users], tmp_path: Path
) -> None:
    admin_url, made = users
    argv = [sys.executable, "-c", "from services.cli import app; app()", "rabbit", "setup"]
    argv += ["--admin-url", admin_url, "--prefix", made.prefix, "--api-url", RABBIT_API]
    argv += ["--site", "s1", "--site", "s2", "--producer", "p"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("password unchanged") == 6
    assert "FIRST_RABBIT_URL" not in done.stdout
    assert "6 users" in done.stderr
