"""`amqps://` URLs work: a private RabbitMQ node speaking only TLS, with a throwaway CA.

The URL form is the plain one with the CA named in the query, read by aiormq (under
aio-pika, under FastStream, which passes the query through unchanged)::

    amqps://USER:PASS@HOST:5671/VHOST?cafile=/path/to/ca.crt

(also `capath=`, `cadata=` (base64), `certfile=`/`keyfile=` for a client certificate, and
`no_verify_ssl=1`, which turns verification off: never in production). Without `cafile`
the system's CAs are used. Percent-encode the path if it holds `&`, `#` or spaces. aio-pika's
docstring shows `ca_certs=`: aiormq ignores it.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Iterator

import aio_pika
import pytest
from faststream.rabbit import RabbitBroker

from schemas import names
from schemas.codec import message_decoder
from schemas.messages import IngressRequest, RunInference
from services.common import topology
from services.common.broker import make_broker, publish
from services.common.ids import new_request_id
from services.producer.client import Producer
from tests.faults.privates import PrivateRabbit


@pytest.fixture(scope="module")
def tls_rabbit() -> Iterator[PrivateRabbit]:
    """A RabbitMQ node whose only AMQP listener is TLS; its `url` is amqps:// with `cafile=`."""
    rabbit = PrivateRabbit(tls=True)
    try:
        rabbit.start()
        yield rabbit
    finally:
        try:
            rabbit.stop()  # bounded: rabbitmqctl 60 s, then the port 30 s
        finally:
            rabbit.remove()  # kills the node if it is still up; deletes its folder


async def _connected(url: str) -> RabbitBroker:
    broker = make_broker(url)
    await asyncio.wait_for(broker.connect(), 15)
    return broker


async def test_a_service_broker_speaks_tls_when_given_an_amqps_url(
    tls_rabbit: PrivateRabbit,
) -> None:
    broker = make_broker(tls_rabbit.url)
    subscriber = broker.subscriber(topology.ROUTER_REQUESTS)  # no handler: read with get_one
    try:
        await asyncio.wait_for(broker.start(), 15)
        await topology.declare_topology(broker)
        now = time.time()
        request = RunInference(
            request_id=new_request_id(), user_id="u-1", username="alice", model="m",
            endpoint="embeddings", body=b'{"model": "m", "input": "hi"}',
            created_at=now, expires_at=now + 60,
        )  # fmt: skip
        await publish(
            broker, request, exchange=topology.REQUESTS, routing_key=names.REQUEST_ROUTING_KEY,
            timeout=5,
        )  # fmt: skip
        got = await subscriber.get_one(timeout=5)
        assert got is not None, "the message never came back"
        assert message_decoder.decode(got.body) == request
    finally:
        await broker.stop()


async def test_the_producer_connection_speaks_tls_when_given_an_amqps_url(
    tls_rabbit: PrivateRabbit,
) -> None:
    broker = await _connected(tls_rabbit.url)  # the ingress exchange and queue must exist
    try:
        await topology.declare_topology(broker)
    finally:
        await broker.stop()
    # Only `submit` is used, which never touches Redis.
    async with Producer(tls_rabbit.url, "redis://127.0.0.1:1/0", "cred") as producer:
        request_id = await producer.submit("embeddings", {"model": "m", "input": "hi"})
    connection = await aio_pika.connect_robust(tls_rabbit.url, timeout=10)
    try:
        channel = await connection.channel()
        queue = await channel.get_queue(names.ROUTER_INGRESS_QUEUE)
        delivery = await queue.get(timeout=5, fail=False)
        assert delivery is not None, "the request never reached the router's ingress queue"
        request = message_decoder.decode(delivery.body)
        assert isinstance(request, IngressRequest)
        assert request.request_id == request_id
    finally:
        await connection.close()


_ATTEMPT = """
import asyncio, json, sys
import aio_pika
from aio_pika.exceptions import AMQPConnectionError
from services.common.broker import make_broker

async def main(url):
    failures = []
    for connect in (aio_pika.connect_robust, lambda u: make_broker(u).connect()):
        try:
            await asyncio.wait_for(connect(url), 10)
            failures.append(["connected", ""])
        except AMQPConnectionError as exc:
            failures.append([type(exc).__name__, type(exc.__cause__).__name__])
    print(json.dumps(failures))

asyncio.run(main(sys.argv[1]))
"""


def connect_failures(url: str) -> list[list[str]]:
    """Connect as the producer (aio-pika) and as a service (FastStream) would; return each
    failure's type and its cause's type. In a child process: a failed connect_robust leaves an
    un-awaited coroutine behind (aio-pika) whose warning would surface in some later test."""
    done = subprocess.run(
        [sys.executable, "-c", _ATTEMPT, url], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    failures: list[list[str]] = json.loads(done.stdout.splitlines()[-1])
    return failures


def test_plain_amqp_cannot_talk_to_the_tls_port(tls_rabbit: PrivateRabbit) -> None:
    plain = f"amqp://guest:guest@127.0.0.1:{tls_rabbit.port}/?timeout=5"
    assert [f[0] for f in connect_failures(plain)] == ["AMQPConnectionError"] * 2


def test_amqps_without_the_ca_fails_certificate_verification(tls_rabbit: PrivateRabbit) -> None:
    no_ca = f"amqps://guest:guest@127.0.0.1:{tls_rabbit.port}/?timeout=5"
    expected = ["AMQPConnectionError", "SSLCertVerificationError"]
    assert connect_failures(no_ca) == [expected] * 2
