"""The test Prometheus scrapes what tests serve and answers PromQL through prometheus-api-client."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import requests
from harness import Prometheus, wait_until
from prometheus_client import CollectorRegistry, Gauge, start_http_server

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
