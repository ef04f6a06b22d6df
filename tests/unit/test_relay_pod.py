"""The relay runs as its pod runs it: no API access, the map as a mounted file, parents by name.

Two `townsquare relay` processes and an origin, started with nothing but what the operator's
pod template gives a relay container (its env, the `<room>-shards` ConfigMap as a volume the
kubelet's way) and a hosts file standing in for the cluster's DNS. No KUBECONFIG, no
service-account token, a HOME with no ~/.kube. The verdicts come from the relays' own
/metrics and from what a listener hears.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import pytest
from relay_room import KEY, tree

from townsquare.api.manifest import parse_room
from townsquare.kube.children import relay_pod_template
from townsquare.relay.protocol import Decoder, Kind, control
from townsquare.relay.topology import relay_dns_name
from townsquare.sharding import ShardMap, rebalance, shard_of
from townsquare.tickets import sign

REPO = Path(__file__).resolve().parents[2]
NAMESPACE, ROOM = "ns", "r"


def pod_runner() -> ModuleType:
    """hack/cluster/podrunner.py: its volume writer and its relay environment."""
    spec = importlib.util.spec_from_file_location("podrunner", REPO / "hack/cluster/podrunner.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["podrunner"] = module
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def metric_at(ip: str, port: int, name: str) -> float | None:
    try:
        with urllib.request.urlopen(f"http://{ip}:{port}/metrics", timeout=2) as answer:
            text = answer.read().decode()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


def until(check: object, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if callable(check) and check():
            return
        time.sleep(0.1)
    raise AssertionError(f"not within {seconds} s: {what}")


def pod_container(
    ordinal: int, ip: str, ports: dict[str, int], origin: str, key_file: Path
) -> tuple[tuple[tuple[str, str], ...], tuple[str, ...]]:
    """The relay container's env and args as the operator declares them, fieldRefs resolved
    as a kubelet resolves them for pod `ordinal` (values under a mount path kept as is)."""
    room = parse_room(
        "apiVersion: townsquare.dev/v1alpha1\nkind: AudioRoom\nmetadata: {name: r}\n"
        "spec: {startTime: '2026-12-01T23:00:00Z', duration: 90m, expectedAudience: 10,"
        f" relay: {{image: 'registry.example/relay:1', listenersPerRelay: 10, args: [relay],"
        f" port: {ports['listeners']}, metricsPort: {ports['metrics']}}}}}\n"
    )
    template = relay_pod_template(ROOM, room.spec)
    (container,) = template["spec"]["containers"]
    fields = {
        "metadata.name": f"{ROOM}-relay-{ordinal}",
        "metadata.namespace": NAMESPACE,
        "status.podIP": ip,
        "metadata.annotations['townsquare.dev/origin']": origin,
    }
    env = []
    for entry in container["env"]:
        if "value" in entry:
            env.append((entry["name"], entry["value"]))
        else:
            env.append((entry["name"], fields[entry["valueFrom"]["fieldRef"]["fieldPath"]]))
    # the ticket key Secret's volume (the operator's --relay-ticket-secret), given directly
    env.append(("TOWNSQUARE_TICKET_KEY_FILE", str(key_file)))
    return tuple(env), tuple(container["args"])


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for process in started:
        process.terminate()
    for process in started:
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()


async def listen(address: tuple[str, int], ticket: str, until_move: float) -> tuple[int, str]:
    """Frames heard, then the reason of the first `move` notice (waits `until_move` s)."""
    reader, writer = await asyncio.open_connection(*address)
    writer.write(control(Kind.HELLO, {"v": 1, "role": "listener", "ticket": ticket}))
    decoder, frames = Decoder(), 0
    deadline = time.monotonic() + until_move
    try:
        while time.monotonic() < deadline:
            try:
                data = await asyncio.wait_for(reader.read(65536), 1.0)
            except TimeoutError:
                continue
            if not data:
                return frames, "closed"
            for message in decoder.feed(data):
                if message.kind is Kind.FRAME:
                    frames += 1
                elif message.kind in (Kind.MOVE, Kind.REFUSE):
                    return frames, f"{message.kind.name.lower()}: {message.fields()['reason']}"
        return frames, "no move"
    finally:
        writer.close()


def test_a_relay_runs_with_no_api_access_following_its_mounted_map_and_its_parent_by_name(
    tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    runner = pod_runner()
    key_file = tmp_path / "key"
    key_file.write_bytes(KEY)
    (tmp_path / "home").mkdir()
    # fanout 1: the origin feeds relay 0 only, relay 0 feeds relay 1
    shard_map = tree(2, fanout=1, capacity=10)
    assert shard_map.parents == {0: None, 1: 0}
    volume = tmp_path / "volumes" / "shard-map"

    def mount(published: ShardMap) -> None:
        files = {"shardmap.json": json.dumps(published.to_dict()).encode()}
        assert runner.write_volume(volume, files, 0o644)

    mount(shard_map)
    origin_port = free_port()
    processes.append(subprocess.Popen(
        [sys.executable, "-m", "townsquare", "origin", "--namespace", NAMESPACE, "--room", ROOM,
         "--ticket-key-file", str(key_file), "--port", str(origin_port), "--metrics-port", "0",
         "--map-file", str(volume / "shardmap.json"), "--frame-interval", "0.01"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    ))  # fmt: skip
    # Two pods: two loopback IPs, the same ports (as the room's relays have on a cluster).
    ips = ["127.13.0.1", "127.13.0.2"]
    ports = {"listeners": free_port(), "metrics": free_port()}
    hosts = tmp_path / "hosts"
    hosts.write_text(f"{ips[0]} {relay_dns_name(NAMESPACE, ROOM, 0)}\n")
    for ordinal, ip in enumerate(ips):
        env, args = pod_container(ordinal, ip, ports, f"127.0.0.1:{origin_port}", key_file)
        want = runner.Want(
            NAMESPACE, f"{ROOM}-relay-{ordinal}", "uid", ROOM, ip, env,
            (runner.Mount("/etc/townsquare/shards", "shard-map", "configMap", f"{ROOM}-shards",
                          (("shardmap.json", "shardmap.json"),), True),),
            args,
        )  # fmt: skip
        environment = runner.process_env(want, {"shard-map": volume}, hosts)
        environment["HOME"] = str(tmp_path / "home")
        leaked = [name for name in environment if name.startswith("KUBE")]
        assert not leaked, environment
        assert environment["TOWNSQUARE_MAP_FILE"] == str(volume / "shardmap.json")
        processes.append(subprocess.Popen(
            [sys.executable, "-m", "townsquare", *want.args], env=environment, cwd=tmp_path,
            stdout=(tmp_path / f"relay-{ordinal}.log").open("wb"), stderr=subprocess.STDOUT,
        ))  # fmt: skip

    def log(ordinal: int) -> str:
        return (tmp_path / f"relay-{ordinal}.log").read_text(errors="replace")[-3000:]

    def said(ordinal: int, name: str) -> float | None:
        with socket.socket() as probe:  # each relay serves /metrics on its own pod IP
            probe.settimeout(1)
            if probe.connect_ex((ips[ordinal], ports["metrics"])) != 0:
                return None
        return metric_at(ips[ordinal], ports["metrics"], name)

    # relay 1 found relay 0 by name and is fed by it, not by the origin
    until(lambda: said(0, "audioroom_relay_downstream_relays") == 1.0, 20,
          f"relay 0 feeding relay 1\n{log(0)}\n{log(1)}")  # fmt: skip
    # a listener whose shard the map gives relay 1: the relay judges it by its id
    listener = next(f"l{n}" for n in range(1000) if shard_map.relay_for(f"l{n}") == 1)
    claims = {"listener": listener, "room": f"{NAMESPACE}/{ROOM}", "pod": f"{ROOM}-relay-1",
              "shard": shard_of(listener, shard_map.shards),
              "generation": shard_map.generation}  # fmt: skip
    ticket = sign(KEY, "admit", claims, expires=time.time() + 60)

    async def hear_then_drain() -> tuple[int, str]:
        listening = asyncio.create_task(listen((ips[1], ports["listeners"]), ticket, 20))
        await asyncio.sleep(1.0)
        # the operator drains relay 1: the kubelet swaps the mounted map
        mount(rebalance(shard_map, active=[0], draining=[1], fanout=1).map)
        return await listening

    frames, reason = asyncio.run(hear_then_drain())
    assert frames > 20, (frames, reason, log(1))
    assert reason == "move: draining", (reason, log(1))
    assert said(1, "audioroom_relay_draining") == 1.0
    assert "kube" not in log(1).lower(), log(1)


def process_gone(pid: int) -> bool:
    """No such process, or only its zombie (dead, waiting for init to reap it)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return True
    return "\nState:\tZ" in status


def wait_for(predicate: Callable[[], bool], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl is Linux's")
def test_a_relay_goes_when_its_pod_runner_is_killed_outright() -> None:
    """A runner killed with SIGKILL cannot stop its relays; the kernel must (the earlier
    runner once left a relay process bound to a pod IP after the cluster was gone)."""
    script = str(REPO / "hack/cluster/podrunner.py")
    parent = subprocess.Popen(
        [sys.executable, "-c", (
            "import importlib.util, subprocess, sys, time\n"
            f"spec = importlib.util.spec_from_file_location('podrunner', {script!r})\n"
            "module = importlib.util.module_from_spec(spec); sys.modules['podrunner'] = module\n"
            "spec.loader.exec_module(module)\n"
            "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'],"
            " start_new_session=True, preexec_fn=module.die_with_parent)\n"
            "print(child.pid, flush=True); time.sleep(60)\n"
        )],
        stdout=subprocess.PIPE, cwd=REPO,
    )  # fmt: skip
    assert parent.stdout is not None
    child = int(parent.stdout.readline())
    assert not process_gone(child)
    parent.kill()
    parent.wait()
    assert wait_for(lambda: process_gone(child), 10), "the relay outlived its runner"


def test_a_new_runner_stops_the_relays_an_old_one_left_and_nothing_else(tmp_path: Path) -> None:
    runner = pod_runner()
    # Each child says it is up before the runner looks: Popen can return before the kernel
    # has published the new argv in /proc/PID/cmdline, and an orphan the runner reaps has
    # been running for a while. Without this, a loaded machine read an empty cmdline (CI).
    up = "import time; print('up', flush=True); time.sleep(60)"
    relay = subprocess.Popen(
        [sys.executable, "-c", up, "townsquare", "relay"], stdout=subprocess.PIPE
    )
    bystander = subprocess.Popen([sys.executable, "-c", up], stdout=subprocess.PIPE)
    try:
        for process in (relay, bystander):
            assert process.stdout is not None and process.stdout.readline() == b"up\n"
        (tmp_path / "ns_r-relay-0").write_text(str(relay.pid))
        (tmp_path / "ns_r-relay-1").write_text(str(bystander.pid))
        (tmp_path / "ns_r-relay-2").write_text("not a pid")
        runner.reap_orphans(tmp_path)
        assert relay.wait(timeout=10) == -signal.SIGKILL
        assert bystander.poll() is None, "a pid the runner no longer owns was killed"
        assert list(tmp_path.iterdir()) == []
    finally:
        for process in (relay, bystander):
            process.kill()
            process.wait()
            assert process.stdout is not None
            process.stdout.close()
