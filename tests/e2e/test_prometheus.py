"""The test Prometheus scrapes what tests serve and answers PromQL through prometheus-api-client."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

import aiohttp
import pytest
import requests
from harness import Prometheus, wait_until
from prometheus_client import CollectorRegistry, Gauge, start_http_server

from townsquare.edge.reports import PrometheusReports, Readings

pytestmark = pytest.mark.e2e


@pytest.fixture
def listeners() -> Iterator[tuple[str, Gauge]]:
    """A /metrics endpoint on loopback with one gauge; yields its address and the gauge."""
    registry = CollectorRegistry()
    gauge = Gauge(
        "audioroom_relay_listeners", "connected listeners", ["room", "pod"], registry=registry
    )
    server, thread = start_http_server(0, addr="127.0.0.1", registry=registry)
    yield f"127.0.0.1:{server.server_port}", gauge
    server.shutdown()
    thread.join(timeout=5)


QUERY = 'audioroom_relay_listeners{room="launch"}'


def publish(gauge: Gauge, listeners: int) -> None:
    gauge.labels(room="launch", pod="launch-relay-0").set(listeners)


def wait_for(prometheus: Prometheus, listeners: int) -> None:
    wait_until(lambda: prometheus.value(QUERY) == listeners, 20, f"{QUERY} to be {listeners}")


def test_prometheus_scrapes_a_target_and_answers_promql(
    prometheus: Prometheus, listeners: tuple[str, Gauge]
) -> None:
    address, gauge = listeners
    publish(gauge, 1234)

    prometheus.add_target(address)

    wait_for(prometheus, 1234)
    publish(gauge, 1500)
    wait_for(prometheus, 1500)
    assert prometheus.value(f'up{{instance="{address}"}}') == 1


def test_prometheus_can_be_stopped_and_started_again(
    prometheus: Prometheus, listeners: tuple[str, Gauge]
) -> None:
    address, gauge = listeners
    publish(gauge, 7)
    prometheus.add_target(address)
    wait_for(prometheus, 7)
    url = prometheus.url

    prometheus.stop()
    with pytest.raises(requests.exceptions.ConnectionError):
        prometheus.value(QUERY)

    publish(gauge, 8)
    prometheus.start()
    assert prometheus.url == url
    wait_for(prometheus, 8)


def exporter(stack: contextlib.ExitStack, counts: dict[str, int]) -> str:
    """A /metrics endpoint serving `audioroom_relay_listeners` for pods of one room."""
    registry = CollectorRegistry()
    gauge = Gauge(
        "audioroom_relay_listeners",
        "connected listeners",
        ["namespace", "room", "pod"],
        registry=registry,
    )
    for pod, count in counts.items():
        gauge.labels(namespace="ns", room="launch", pod=pod).set(count)
    server, thread = start_http_server(0, addr="127.0.0.1", registry=registry)
    stack.callback(thread.join, 5)
    stack.callback(server.shutdown)
    return f"127.0.0.1:{server.server_port}"


def test_the_edge_adds_up_a_pod_reported_by_its_relay_and_by_a_load_generator(
    prometheus: Prometheus,
) -> None:
    """A relay process counts its real listeners and a load generator the simulated ones
    it placed on the same pod: the edge must see the sum, and one source alone as is."""
    source = PrometheusReports(prometheus.url)

    def counts() -> dict[str, int]:
        async def read() -> Readings:
            async with aiohttp.ClientSession() as session:
                return await source.read(session)

        reports = asyncio.run(read()).reports
        return {key[2]: report.listeners for key, report in reports.items() if key[0] == "ns"}

    series = 'count(audioroom_relay_listeners{namespace="ns"})'
    with contextlib.ExitStack() as relay_stack, contextlib.ExitStack() as load_stack:
        prometheus.add_target(exporter(relay_stack, {"launch-relay-0": 7}))
        load = exporter(load_stack, {"launch-relay-0": 5, "launch-relay-1": 3})
        prometheus.add_target(load)
        wait_until(lambda: prometheus.value(series) == 3, 30, "both exporters scraped")
        assert counts() == {"launch-relay-0": 12, "launch-relay-1": 3}

        # The load generator stops answering (a busy process fails its scrape): its series
        # go stale, but relay-0 must not look 5 listeners emptier and take joins past its
        # capacity; relay-1, which nobody reports any more, drops out.
        load_stack.close()

        def load_series_gone() -> bool:
            counts()  # the edge reads every second meanwhile
            return prometheus.value(series) == 1

        wait_until(load_series_gone, 30, "the load generator's series gone")
        assert counts() == {"launch-relay-0": 12}
