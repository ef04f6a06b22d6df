"""Slot labels on rooms: a label the API server refused is written again, with backoff,
without waiting for the watch of unlabelled rooms to start again."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace
from typing import Any, cast

from kubernetes.client.rest import ApiException

from townsquare.kube import labelling
from townsquare.kube.client import Cluster
from townsquare.kube.labelling import SlotLabeller, retry_delay
from townsquare.partitions import SLOT_LABEL, Partition, slot_of


class RefusingApi:
    """Refuses the first `refusals` label writes (an API server restarting), then accepts."""

    def __init__(self, refusals: int) -> None:
        self.refusals = refusals
        self.attempts: list[float] = []
        self.labels: dict[str, str] = {}
        self.written = threading.Event()

    def patch_namespaced_custom_object(self, *args: Any, **kwargs: Any) -> Any:
        self.attempts.append(time.monotonic())
        if len(self.attempts) <= self.refusals:
            raise ApiException(status=503, reason="Service Unavailable")
        self.labels.update(args[5]["metadata"]["labels"])
        self.written.set()
        return SimpleNamespace(data=b"{}")


def test_a_refused_label_is_written_again_with_backoff() -> None:
    api = RefusingApi(refusals=2)
    cluster = cast(Cluster, SimpleNamespace(custom=api, timeout=(1.0, 1.0)))
    labeller = SlotLabeller(cluster, Partition(0, 1), [])
    original = labelling.FIRST_RETRY_SECONDS
    labelling.FIRST_RETRY_SECONDS = 0.05
    try:
        labeller.start()  # no namespace to watch: only the retries run
        labeller.submit("spaces", "launch")
        assert api.written.wait(10), f"still unlabelled after {len(api.attempts)} attempts"
    finally:
        labeller.stop()
        labelling.FIRST_RETRY_SECONDS = original
    assert api.labels == {SLOT_LABEL: str(slot_of("spaces", "launch"))}
    assert len(api.attempts) == 3
    first_wait, second_wait = (b - a for a, b in zip(api.attempts, api.attempts[1:], strict=False))
    assert first_wait >= 0.05 and second_wait >= 0.1, "waits double"


def test_the_backoff_doubles_from_a_second_to_at_most_a_minute() -> None:
    assert [retry_delay(n) for n in range(1, 9)] == [1, 2, 4, 8, 16, 32, 60, 60]
