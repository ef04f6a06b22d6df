"""The townsquare image run by a real podman, the way the chart's pod spec says to run it.

`pod_flags` turns a rendered (or installed) pod spec into podman flags: the user, the
read-only root, the dropped capabilities, the volumes, the env, the ports and the memory
limit. A field it does not know stops the test: a setting the chart adds must be added
here too, or the smoke test would run the image differently from the chart.
`sandbox` asks the running process itself what it got (uid, capabilities, mounts, where it
can write), so the verdict never comes from the flags we passed.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from harness import REPO, free_loopback_port

PODMAN = REPO / "hack" / "image" / "podman.sh"
# The API server's certificate names kubernetes.default.svc, as in a pod; slirp4netns
# gives the container the host's loopback at this address, and nothing else of the host.
API_HOST = "kubernetes.default.svc"
HOST_LOOPBACK = "10.0.2.2"
NETWORK = [
    "--network", "slirp4netns:allow_host_loopback=true",
    "--add-host", f"{API_HOST}:{HOST_LOOPBACK}",
]  # fmt: skip


@cache
def built_image() -> str:
    """The image `make image` builds (hack/image/build.sh; nothing is rebuilt when warm),
    or TOWNSQUARE_IMAGE: any image in the project's podman storage, to check it instead."""
    given = os.environ.get("TOWNSQUARE_IMAGE")
    if given:
        assert podman("image", "exists", given).returncode == 0, (
            f"TOWNSQUARE_IMAGE={given} is not in podman's storage: hack/image/podman.sh pull it"
        )
        return given
    done = subprocess.run(
        [str(REPO / "hack" / "image" / "build.sh")], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, f"building the image failed ('make image'):\n{done.stderr[-3000:]}"
    return done.stdout.strip().splitlines()[-1]


def podman(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(PODMAN), *args], input=stdin, capture_output=True, text=True, check=False
    )


def image_config(image: str) -> dict[str, Any]:
    """The image's OCI config (User, Entrypoint, Cmd, ExposedPorts, Env)."""
    done = podman("image", "inspect", "--format", "{{json .Config}}", image)
    assert done.returncode == 0, done.stderr
    config: dict[str, Any] = json.loads(done.stdout)
    return config


# Fields that only place the pod or that podman has no use for are accepted and ignored.
POD_KEYS = {"serviceAccountName", "automountServiceAccountToken", "securityContext",
            "containers", "volumes", "nodeSelector", "affinity", "tolerations",
            "priorityClassName", "imagePullSecrets", "restartPolicy", "dnsPolicy",
            "schedulerName", "terminationGracePeriodSeconds", "serviceAccount",
            "enableServiceLinks", "topologySpreadConstraints"}  # fmt: skip
CONTAINER_KEYS = {"name", "image", "imagePullPolicy", "args", "ports", "livenessProbe",
                  "readinessProbe", "lifecycle", "env", "securityContext", "resources",
                  "volumeMounts", "terminationMessagePath",
                  "terminationMessagePolicy"}  # fmt: skip
SECURITY_KEYS = {"runAsNonRoot", "runAsUser", "runAsGroup", "fsGroup", "seccompProfile",
                 "allowPrivilegeEscalation", "readOnlyRootFilesystem", "privileged",
                 "capabilities"}  # fmt: skip


@dataclass
class PodRun:
    """podman flags for one container of a pod spec, and the host ports of its ports."""

    flags: list[str]
    args: list[str]
    ports: dict[str, int] = field(default_factory=dict)  # port name -> 127.0.0.1 port
    writable: list[str] = field(default_factory=list)  # the pod's volume mounts


def pod_flags(
    pod: dict[str, Any],
    container: dict[str, Any],
    fields: dict[str, str] | None = None,
    publish: bool = True,
    secrets: dict[str, dict[str, Path]] | None = None,
) -> PodRun:
    """How podman runs `container` of `pod` as a kubelet would (camelCase pod spec).

    `fields` gives the values of the env's fieldRefs (metadata.name, ...); `secrets` the
    files of each secret or configMap volume (volume name -> item path -> host file). With
    `publish`, every container port is published on a free 127.0.0.1 port; without, the container is
    meant for the host's network and binds its ports itself.
    """
    _known(pod, POD_KEYS, "pod spec")
    _known(container, CONTAINER_KEYS, "container")
    security = {**pod.get("securityContext", {}), **container.get("securityContext", {})}
    _known(security, SECURITY_KEYS, "securityContext")
    flags = ["--read-only-tmpfs=false"]  # a kubelet mounts no /run or /var/tmp of its own
    if "runAsUser" in security:
        flags += ["--user", f"{security['runAsUser']}:{security.get('runAsGroup', 0)}"]
    if security.get("readOnlyRootFilesystem"):
        flags.append("--read-only")
    if security.get("allowPrivilegeEscalation") is False:
        flags += ["--security-opt", "no-new-privileges"]
    if security.get("fsGroup") is not None:
        flags += ["--group-add", str(security["fsGroup"])]
    if security.get("privileged"):
        flags.append("--privileged")
    for capability in security.get("capabilities", {}).get("drop", []):
        flags += ["--cap-drop", capability]
    for capability in security.get("capabilities", {}).get("add", []):
        flags += ["--cap-add", capability]
    seccomp = security.get("seccompProfile", {}).get("type", "RuntimeDefault")
    assert seccomp == "RuntimeDefault", f"seccompProfile {seccomp}: podman runs its default"
    for variable in container.get("env", []):
        flags += ["--env", f"{variable['name']}={_env_value(variable, fields or {})}"]
    memory = container.get("resources", {}).get("limits", {}).get("memory")
    if memory:
        flags += ["--memory", str(quantity(memory))]
    volumes = {volume["name"]: volume for volume in pod.get("volumes", [])}
    run = PodRun(flags, list(container.get("args", [])))
    for mount in container.get("volumeMounts", []):
        volume = volumes[mount["name"]]
        source = volume.get("secret") or volume.get("configMap")
        if source is not None:
            items = source.get("items") or []
            given = (secrets or {}).get(volume["name"], {})
            assert {item["path"] for item in items} == set(given), f"volume {volume}: files?"
            for item in items:
                inside = f"{mount['mountPath'].rstrip('/')}/{item['path']}"
                flags += ["--volume", f"{given[item['path']]}:{inside}:ro"]
            continue
        assert set(volume) == {"name", "emptyDir"}, f"volume {volume}: emptyDir, secret or map"
        size = volume["emptyDir"].get("sizeLimit")
        options = f"rw,mode=1777{f',size={quantity(size)}' if size else ''}"
        flags += ["--tmpfs", f"{mount['mountPath']}:{options}"]
        run.writable.append(mount["mountPath"])
    for port in container.get("ports", []):
        host_port = free_loopback_port() if publish else int(port["containerPort"])
        if publish:
            flags += ["--publish", f"127.0.0.1:{host_port}:{port['containerPort']}"]
        run.ports[port.get("name", str(port["containerPort"]))] = host_port
    return run


def _env_value(variable: dict[str, Any], fields: dict[str, str]) -> str:
    if "value" in variable:
        return str(variable["value"])
    path = variable.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
    assert path in fields, f"env {variable}: only literal values and the fieldRefs given"
    return fields[path]


def quantity(text: str | int) -> int:
    """A Kubernetes quantity of bytes ("16Mi", "512Mi", "1G") as an integer."""
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "k": 10**3, "M": 10**6, "G": 10**9}
    value = str(text)
    for suffix, factor in units.items():
        if value.endswith(suffix):
            return int(float(value[: -len(suffix)]) * factor)
    return int(value)


def _known(mapping: dict[str, Any], known: set[str], what: str) -> None:
    unknown = set(mapping) - known
    assert not unknown, f"{what} sets {sorted(unknown)}: teach tests/e2e/container.py to run it"


# Runs inside the container as its own process: what the kernel says it was given.
PROBE = r"""
import json, os, stat
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
root = next(line.split() for line in open("/proc/self/mounts") if line.split()[1] == "/")
writable = []
for top, dirs, files in os.walk("/"):
    if top in ("/proc", "/sys", "/dev"):
        dirs[:] = []
        continue
    for name in dirs + files:
        path = os.path.join(top, name)
        if not os.path.islink(path) and os.access(path, os.W_OK):
            writable.append(path)
    dirs[:] = [d for d in dirs if os.path.join(top, d) not in writable]
sticky = [p for p in writable if os.stat(p).st_mode & (stat.S_ISVTX | stat.S_IWOTH)
          == (stat.S_ISVTX | stat.S_IWOTH) and os.path.isdir(p)]
print(json.dumps({
    "uid": int(status["Uid"].split()[1]), "gid": int(status["Gid"].split()[1]),
    "effective_capabilities": int(status["CapEff"].strip(), 16),
    "no_new_privileges": status["NoNewPrivs"].strip() == "1",
    "root_read_only": "ro" in root[3].split(","),
    "writable": sorted(writable), "shared_tmp": sorted(sticky),
}))
"""


@dataclass(frozen=True)
class Sandbox:
    """What a process in the container was given, as it sees it."""

    uid: int
    gid: int
    effective_capabilities: int
    no_new_privileges: bool
    root_read_only: bool
    writable: list[str]  # every path it may write (a writable directory hides its contents)
    shared_tmp: list[str]  # of those, world-writable sticky directories (/tmp-like)


def sandbox(image: str, flags: list[str]) -> Sandbox:
    """Starts the image with these flags and asks its process what it got."""
    done = podman("run", "--rm", *flags, "--entrypoint", "python3", image, "-c", PROBE)
    assert done.returncode == 0, done.stderr[-3000:]
    return Sandbox(**json.loads(done.stdout))


def chart_problems(seen: Sandbox, run: PodRun, chart_uid: int) -> list[str]:
    """Where the container differs from what the chart promises (README, values.yaml)."""
    problems = []
    if seen.uid == 0 or seen.uid != chart_uid:
        problems.append(f"runs as uid {seen.uid}, not the chart's non-root {chart_uid}")
    if not seen.root_read_only:
        problems.append("the root filesystem is writable")
    if seen.effective_capabilities:
        problems.append(f"holds capabilities {seen.effective_capabilities:#x}")
    if not seen.no_new_privileges:
        problems.append("may gain privileges (no_new_privs unset)")
    outside = [p for p in seen.writable if not any(_under(p, m) for m in run.writable)]
    if outside:
        problems.append(f"can write outside its volumes: {outside[:5]}")
    return problems


def image_problems(seen: Sandbox, config: dict[str, Any], chart_uid: int) -> list[str]:
    """Where the image, run with its own defaults only, is not what the chart expects."""
    problems = []
    user = str(config.get("User") or "0")
    if user.split(":")[0] in ("", "0", "root"):
        problems.append(f"the image's user is {user!r} (root)")
    if seen.uid == 0 or seen.uid != chart_uid:
        problems.append(f"its default user is uid {seen.uid}, not the chart's {chart_uid}")
    owned = sorted(set(seen.writable) - set(seen.shared_tmp))
    if owned:
        problems.append(f"its user can write the image's own files: {owned[:5]}")
    return problems


def _under(path: str, mount: str) -> bool:
    return path == mount or path.startswith(mount.rstrip("/") + "/")


def private_file(text: str, owner: int) -> Path:
    """A file only `owner` (the container's uid) may read: credentials for a mount."""
    handle, name = tempfile.mkstemp(prefix="townsquare-image-")
    with os.fdopen(handle, "w") as out:
        out.write(text)
    path = Path(name)
    path.chmod(0o400)
    if os.geteuid() == 0:
        os.chown(path, owner, -1)
    else:  # rootless podman: the container's uids are the user namespace's
        chowned = podman("unshare", "chown", str(owner), str(path))
        assert chowned.returncode == 0, chowned.stderr
    return path


class ContainerProcess:
    """`podman run` of the image in the foreground, with its output in a log file.

    The same surface as OperatorProcess (start, stop, kill, alive, log_text), so a
    scenario written for the operator on the host runs it from the image unchanged.
    """

    def __init__(self, image: str, run: PodRun, log: Path, *extra: str) -> None:
        self.image = image
        self.run = run
        self.log = log
        self.extra = extra
        self.name = f"townsquare-e2e-{os.getpid()}-{free_loopback_port()}"
        self.process: subprocess.Popen[bytes] | None = None
        self.exit_code: int | None = None

    def start(self) -> None:
        with self.log.open("ab") as sink:
            self.process = subprocess.Popen(
                [str(PODMAN), "run", "--rm", "--name", self.name, *self.run.flags,
                 *self.extra, self.image, *self.run.args],
                stdout=sink, stderr=subprocess.STDOUT,
            )  # fmt: skip

    def stop(self, grace: int = 30) -> None:
        """SIGTERM, then SIGKILL after `grace` seconds, as a kubelet does."""
        if self.alive():
            podman("stop", "--time", str(grace), self.name)
        self._reap()

    def kill(self) -> None:
        if self.alive():
            podman("kill", self.name)
        self._reap()

    def _reap(self) -> None:
        if self.process is not None:
            self.exit_code = self.process.wait(timeout=60)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""
