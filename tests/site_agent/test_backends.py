"""What a heartbeat reports of a pool's load (pure): the agent's live count, not a stale scrape."""

from __future__ import annotations

from services.site_agent.backends import Load, Pool


def pool_with(in_flight: int, scraped_running: int, foreign: int = 0) -> Pool:
    pool = Pool("m", ["http://127.0.0.1:1"])
    instance = pool.instances[0]
    instance.in_flight = in_flight
    instance.load = Load(running=scraped_running, waiting=0)
    instance.foreign = foreign
    return pool


def test_requests_in_flight_count_at_once_whatever_the_last_scrape_said() -> None:
    status = pool_with(in_flight=6, scraped_running=0).status(8)  # scraped before they began
    assert (status.running, status.waiting, status.capacity) == (6, 0, 8)


def test_a_finished_request_frees_its_slot_before_the_next_scrape() -> None:
    status = pool_with(in_flight=2, scraped_running=8).status(8)  # scraped at a full wave
    assert (status.running, status.waiting) == (2, 0)


def test_other_clients_of_the_backend_count_and_beyond_the_slots_they_wait() -> None:
    status = pool_with(in_flight=7, scraped_running=3, foreign=3).status(8)
    assert (status.running, status.waiting) == (8, 2)
