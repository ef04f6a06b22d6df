"""Slot labels on rooms, so that each partition's watch asks the API server for its own rooms.

A room applied without the label (every new room: users do not set it) is seen by no
partition's room watch. Each partition therefore also watches the rooms with no valid slot
label, a set that is empty but for a moment after each creation, and labels those whose
hash falls in its own slots (`partitions.slot_of`): the label is a pure function of the
room's namespace and name, so two writers never disagree and no admission webhook is needed.
The room then enters its partition's watch as ADDED. One partition down leaves only its own
new rooms unlabelled, and those it would not serve anyway.

Blocking: runs on threads of its own, off kopf's event loop.
"""

from __future__ import annotations

import contextlib
import heapq
import threading
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import structlog
from kubernetes import watch
from kubernetes.client.rest import ApiException

from townsquare.api.models import GROUP, PLURAL, VERSION
from townsquare.kube.client import Cluster, _drained
from townsquare.partitions import SLOT_LABEL, Partition, slot_of, unlabelled_selector

WATCH_SECONDS = 300
"""A watch is ended by the server after this long and opened again, so a half-open
connection is noticed."""
RETRY_SECONDS = 1.0
LABEL_WORKERS = 8
"""Labels written at once: a first start of partitions over thousands of unlabelled rooms
labels them at the API server's pace, not one round trip at a time."""
FIRST_RETRY_SECONDS = 1.0
LAST_RETRY_SECONDS = 60.0


def retry_delay(failures: int) -> float:
    """Seconds before a failed label is written again: doubling from a second, at most a
    minute, so a room the API server refuses for a while (an outage, a webhook) is labelled
    soon after it accepts again, without hammering it meanwhile."""
    return float(min(LAST_RETRY_SECONDS, FIRST_RETRY_SECONDS * 2 ** max(0, failures - 1)))


class SlotLabeller:
    """Labels this partition's unlabelled rooms, in every namespace served (all: None)."""

    def __init__(
        self, cluster: Cluster, partition: Partition, namespaces: Iterable[str | None]
    ) -> None:
        self.cluster = cluster
        self.partition = partition
        self.namespaces = list(namespaces)
        self.stopping = threading.Event()
        self.labelled = 0
        self._pending: set[tuple[str, str]] = set()
        """Rooms whose label is queued or being written: a watch that the API server ended
        (it drops a watcher that reads too slowly) and that starts again shows them again."""
        self._lock = threading.Condition()
        self._retries: list[tuple[float, str, str, int]] = []
        """(when, namespace, room, failures so far): labels to write again, a heap."""
        self._writes = ThreadPoolExecutor(LABEL_WORKERS, thread_name_prefix="labeller")
        self._log = structlog.get_logger(component="labeller")

    def start(self) -> None:
        for namespace in self.namespaces:
            threading.Thread(
                target=self._follow, args=(namespace,), name="labeller", daemon=True
            ).start()
        threading.Thread(target=self._retry_when_due, name="labeller-retry", daemon=True).start()

    def stop(self) -> None:
        self.stopping.set()
        with self._lock:
            self._lock.notify_all()
        self._writes.shutdown(wait=False, cancel_futures=True)

    def _follow(self, namespace: str | None) -> None:
        while not self.stopping.is_set():
            try:
                self._watch(namespace)
            except Exception as error:  # the API server went away: watch again shortly
                self._log.warning("watching unlabelled rooms failed", error=str(error)[:200])
                self.stopping.wait(RETRY_SECONDS)

    def _watch(self, namespace: str | None) -> None:
        """Until the API server ends the watch (after WATCH_SECONDS, or sooner when this
        process read too slowly): the caller starts it again, and rooms still unlabelled
        are shown again."""
        custom = self.cluster.custom
        if namespace is None:
            listing: Any = custom.list_cluster_custom_object
            args: tuple[str, ...] = (GROUP, VERSION, PLURAL)
        else:
            listing = custom.list_namespaced_custom_object
            args = (GROUP, VERSION, namespace, PLURAL)
        stream = watch.Watch().stream(
            listing,
            *args,
            label_selector=unlabelled_selector(),
            timeout_seconds=WATCH_SECONDS,
            _request_timeout=(self.cluster.timeout[0], WATCH_SECONDS + 30),
        )
        for event in stream:
            if self.stopping.is_set():
                return
            meta = (event.get("object") or {}).get("metadata") or {}
            if event.get("type") in ("ADDED", "MODIFIED") and meta.get("namespace"):
                name, room_namespace = str(meta["name"]), str(meta["namespace"])
                if slot_of(room_namespace, name) in self.partition.slots:
                    self.submit(room_namespace, name)

    def submit(self, namespace: str, name: str) -> None:
        """Label the room soon, and again with backoff until it is labelled (or gone)."""
        with self._lock:
            if (namespace, name) in self._pending:
                return
            self._pending.add((namespace, name))
        self._writes.submit(self._label_pending, namespace, name, 0)

    def _label_pending(self, namespace: str, name: str, failures: int) -> None:
        done = False
        try:
            done = self.label(namespace, name)
        finally:
            with self._lock:
                if done or self.stopping.is_set():
                    self._pending.discard((namespace, name))
                else:
                    due = time.monotonic() + retry_delay(failures + 1)
                    heapq.heappush(self._retries, (due, namespace, name, failures + 1))
                    self._lock.notify_all()

    def _retry_when_due(self) -> None:
        """Hands each failed label back to the writers when its backoff has passed."""
        with self._lock:
            while not self.stopping.is_set():
                wait = self._retries[0][0] - time.monotonic() if self._retries else None
                if wait is not None and wait <= 0:
                    _, namespace, name, failures = heapq.heappop(self._retries)
                    with contextlib.suppress(RuntimeError):  # stopped meanwhile
                        self._writes.submit(self._label_pending, namespace, name, failures)
                else:
                    self._lock.wait(wait)

    def label(self, namespace: str, name: str) -> bool:
        """Write the room's slot label (a room gone meanwhile needs none); False when the
        API server refused it or could not be reached."""
        labels = {SLOT_LABEL: str(slot_of(namespace, name))}
        began = time.monotonic()
        try:
            response = self.cluster.custom.patch_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL, name, {"metadata": {"labels": labels}},
                _request_timeout=self.cluster.timeout, _preload_content=False,
            )  # fmt: skip
            _drained(response)
            self.labelled += 1
        except ApiException as exc:
            if exc.status == 404:
                return True
            self._log.warning(
                "labelling the room failed; retrying with backoff",
                namespace=namespace,
                room=name,
                status=exc.status,
                seconds=round(time.monotonic() - began, 2),
            )
            return False
        except Exception as error:  # unreachable, timed out: the same
            self._log.warning(
                "labelling the room failed; retrying with backoff",
                namespace=namespace,
                room=name,
                error=str(error)[:200],
            )
            return False
        return True
