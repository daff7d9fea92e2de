"""`GET /v1/models` lists a model a site may start (cold) and says where it is in what state."""

from __future__ import annotations

import time

from redis.asyncio import Redis

from schemas import names
from schemas.codec import encode
from schemas.messages import ModelStatus, SiteHeartbeat
from services.access.settings import DEFAULT_CATALOGUE
from services.gateway.registry import overall_state
from tests.gateway.conftest import GatewayUnderTest


def beat(site_id: str, model: str, state: str) -> SiteHeartbeat:
    status = ModelStatus(
        model=model,
        state=state,
        instances=0,
        running=0,
        waiting=0,
        capacity=0,  # type: ignore[arg-type]
    )
    return SiteHeartbeat(
        site_id=site_id, agent_id="a", sent_at=time.time() + 3600, interval_s=5.0, models=(status,)
    )


def test_the_overall_state_is_the_most_useful_one_among_sites() -> None:
    assert overall_state({"a": "cold", "b": "starting"}) == "starting"
    assert overall_state({"a": "draining", "b": "hot", "c": "cold"}) == "hot"
    assert overall_state({"a": "cold"}) == "cold"
    assert overall_state({}) == "cold"


async def test_models_show_their_state_overall_and_per_site(gateway: GatewayUnderTest) -> None:
    model = DEFAULT_CATALOGUE[0].name
    async with Redis.from_url(gateway.settings.redis_url) as redis:
        await redis.hset(names.REGISTRY_KEY, "cold-site", encode(beat("cold-site", model, "cold")))
        await redis.hset(
            names.REGISTRY_KEY, "busy-site", encode(beat("busy-site", model, "starting"))
        )
        try:
            headers = {"authorization": f"Bearer {gateway.key}"}
            reply = await gateway.client.get(f"/v1/models/{model}", headers=headers)
        finally:
            await redis.hdel(names.REGISTRY_KEY, "cold-site", "busy-site")
    assert reply.status_code == 200
    body = reply.json()
    assert body["state"] == "starting"
    assert body["site_states"] == {"busy-site": "starting", "cold-site": "cold"}
