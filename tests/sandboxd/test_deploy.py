"""deploy/: the systemd unit (systemd-analyze verify where it is installed, its keys and flags
otherwise, and the daemon run under the unit's capability bounding set) and the Kubernetes manifests
(the bundled OpenAPI schemas of kubernetes-validate, offline, and how the pieces refer to each other)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from sandboxd.client import connect

from .conftest import needs_root

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "deploy/systemd/sandboxd.service"
K8S = ROOT / "deploy/k8s"
# <linux/capability.h>
CAP_NUMBERS = {"CHOWN": 0, "DAC_OVERRIDE": 1, "DAC_READ_SEARCH": 2, "FOWNER": 3, "FSETID": 4, "KILL": 5,
               "SETGID": 6, "SETUID": 7, "SETPCAP": 8, "NET_BIND_SERVICE": 10, "NET_ADMIN": 12, "NET_RAW": 13,
               "SYS_CHROOT": 18, "SYS_PTRACE": 19, "SYS_ADMIN": 21, "SYS_RESOURCE": 24, "MKNOD": 27,
               "AUDIT_WRITE": 29, "SETFCAP": 31}


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """systemd unit syntax: [Section], Key=Value, backslash continuations, # and ; comments."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    logical = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not logical and (not line or line[0] in "#;"):
            continue
        if line.endswith("\\"):
            logical += line[:-1] + " "
            continue
        line, logical = logical + line, ""
        if line.startswith("["):
            assert line.endswith("]"), f"bad section header {line!r}"
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None and "=" in line, f"key outside a section or without '=': {line!r}"
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(" ".join(value.split()))
    return sections


def serve_flags() -> set[str]:
    out = subprocess.run([sys.executable, "-m", "sandboxd", "serve", "--help"], capture_output=True, text=True,
                         check=True).stdout
    return set(re.findall(r"(--[a-z][a-z-]+)", out))


def flags_in(args: list[str]) -> set[str]:
    return {a.split("=", 1)[0] for a in args if a.startswith("--")}


# -- systemd -----------------------------------------------------------------------------------------


def test_unit_has_what_operations_rely_on():
    unit = parse_unit(UNIT.read_text())
    service = unit["Service"]
    one = {key: values[-1] for key, values in service.items()}
    exec_start = one["ExecStart"].split()
    assert exec_start[1] == "serve" and exec_start[0].endswith("/sandboxd")
    assert "${CREDENTIALS_DIRECTORY}/token" in exec_start
    assert one["LoadCredential"].startswith("token:")
    assert "--root" in exec_start and exec_start[exec_start.index("--root") + 1] == "${STATE_DIRECTORY}"
    assert one["StateDirectory"] == "sandboxd" and one["StateDirectoryMode"] == "0700"
    assert one["Delegate"] == "yes" and one["Restart"] == "on-failure"
    assert int(one["LimitNOFILE"]) >= 65536
    assert "doctor" in one["ExecStartPre"].split()
    assert one["KillSignal"] == "SIGTERM" and one["NoNewPrivileges"] == "yes"
    # Settings that would break namespaces, mounts or cgroups are absent (each is explained in a comment).
    for key in ("RestrictNamespaces", "SystemCallFilter", "ProtectControlGroups", "ProtectKernelTunables",
                "PrivateDevices", "DevicePolicy", "ProtectClock", "MemoryDenyWriteExecute", "PrivateNetwork"):
        assert key not in service, f"{key}= would break sandboxes"
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]


def test_unit_passes_only_flags_sandboxd_has():
    service = parse_unit(UNIT.read_text())["Service"]
    assert flags_in(service["ExecStart"][-1].split()) <= serve_flags()
    doctor_help = subprocess.run([sys.executable, "-m", "sandboxd", "doctor", "--help"], capture_output=True,
                                 text=True, check=True).stdout
    assert flags_in(service["ExecStartPre"][-1].split()) <= set(re.findall(r"(--[a-z][a-z-]+)", doctor_help))


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_verify(tmp_path):
    """verify checks every key and that the executables exist: point them at this checkout's script."""
    script = shutil.which("sandboxd", path=os.path.dirname(sys.executable))
    if script is None:
        pytest.skip("no sandboxd script next to this Python (pip install -e . makes one)")
    unit = tmp_path / "sandboxd.service"
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/sandboxd", script))
    res = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=120)
    complaints = [line for line in (res.stdout + res.stderr).splitlines() if "sandboxd.service" in line]
    assert res.returncode == 0 and not complaints, res.stdout + res.stderr
    # ... and it would have complained about a key systemd does not know.
    unit.write_text(unit.read_text().replace("Delegate=yes", "Delegate=yes\nDelegateAll=yes"))
    res = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=120)
    assert "DelegateAll" in res.stdout + res.stderr


@needs_root
@pytest.mark.skipif(shutil.which("setpriv") is None, reason="util-linux setpriv is not installed")
async def test_daemon_serves_under_the_units_capability_bounding_set(tmp_path, git_repo):
    """The unit's CapabilityBoundingSet and NoNewPrivileges, applied with setpriv: the daemon passes
    the daemon test's whole API pass (create, exec, snapshot, restore, fork, diff, files)."""
    from .test_daemon import exercise

    service = parse_unit(UNIT.read_text())["Service"]
    caps = [c.removeprefix("CAP_") for c in service["CapabilityBoundingSet"][-1].split()]
    assert set(caps) <= set(CAP_NUMBERS), f"unknown capability in the unit: {set(caps) - set(CAP_NUMBERS)}"
    bounding = "-all," + ",".join(f"+{c.lower()}" for c in caps)
    setpriv = ["setpriv", f"--bounding-set={bounding}", "--inh-caps=-all", "--nnp"]
    # ExecStartPre: doctor runs (and mounts its probe overlay) under the same limits.
    res = subprocess.run([*setpriv, sys.executable, "-m", "sandboxd", "doctor", "--root", str(tmp_path / "root"),
                          "--json"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    sock = tmp_path / "d.sock"
    log = open(tmp_path / "log", "w")
    proc = subprocess.Popen([*setpriv, sys.executable, "-m", "sandboxd", "serve", "--root", str(tmp_path / "root"),
                             "--listen", f"unix:{sock}", "--log-level", "WARNING"], stderr=log)
    log.close()
    try:
        deadline = time.monotonic() + 30
        while "serving on" not in (tmp_path / "log").read_text():
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "log").read_text()
            time.sleep(0.05)
        status = Path(f"/proc/{proc.pid}/status").read_text()
        effective = int(re.search(r"CapEff:\s*([0-9a-f]+)", status).group(1), 16)
        ours = int(re.search(r"CapBnd:\s*([0-9a-f]+)", Path("/proc/self/status").read_text()).group(1), 16)
        assert effective == sum(1 << CAP_NUMBERS[c] for c in caps) & ours  # the limits really apply
        assert re.search(r"NoNewPrivs:\s*1", status)
        repo, commit = git_repo
        async with connect(f"unix:{sock}") as node:
            await exercise(node, repo, commit)
    finally:
        proc.terminate()
        assert proc.wait(60) == 0, (tmp_path / "log").read_text()


# -- Kubernetes --------------------------------------------------------------------------------------


def manifests() -> dict[str, dict]:
    """kind -> the one object of that kind across deploy/k8s/*.yaml."""
    out: dict[str, dict] = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                assert doc["kind"] not in out, f"two {doc['kind']} objects"
                out[doc["kind"]] = doc
    return out


def test_manifests_validate_against_the_kubernetes_schemas():
    kv = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate (bundles the "
                             "Kubernetes OpenAPI schemas; works offline)")
    objects = manifests()
    assert set(objects) == {"DaemonSet", "Service", "Secret"}
    for version in ("1.28", kv.latest_version()):
        for kind, obj in objects.items():
            kv.validate(obj, version, strict=True)  # strict: unknown fields are errors
    broken = yaml.safe_load((K8S / "daemonset.yaml").read_text())
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["exec"]["cmd"] = ["x"]
    with pytest.raises(kv.ValidationError, match="cmd"):
        kv.validate(broken, kv.latest_version(), strict=True)


def test_manifests_refer_to_each_other_and_to_real_flags():
    objects = manifests()
    ds, svc, secret = objects["DaemonSet"], objects["Service"], objects["Secret"]
    pod = ds["spec"]["template"]
    labels = pod["metadata"]["labels"]
    assert ds["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert svc["spec"]["selector"].items() <= labels.items() and svc["spec"]["clusterIP"] == "None"
    (container,) = pod["spec"]["containers"]
    args = container["args"]
    assert args[0] == "serve" and flags_in(args) <= serve_flags()
    opts = {}
    for a in args[1:]:
        key, _, value = a.partition("=")
        opts.setdefault(key, []).append(value)
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    # state: a hostPath at --root; token: the Secret, mounted where --token-file points
    assert mounts["state"] == opts["--root"][0] and volumes["state"]["hostPath"]["path"] == opts["--root"][0]
    assert volumes["token"]["secret"]["secretName"] == secret["metadata"]["name"]
    assert opts["--token-file"][0] == f"{mounts['token']}/token" and "token" in secret["stringData"]
    assert any(addr.startswith("tcp://0.0.0.0:") for addr in opts["--listen"])
    # readiness is `sandboxd doctor --json` on the same state dir; liveness is the daemon's own loop
    probe = container["readinessProbe"]["exec"]["command"]
    assert probe[:2] == ["sandboxd", "doctor"] and "--json" in probe
    assert probe[probe.index("--root") + 1] == opts["--root"][0]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert opts["--metrics-listen"][0].endswith(f":{ports['metrics']}")
    assert {p["targetPort"] for p in svc["spec"]["ports"]} == set(ports)
    assert container["securityContext"]["privileged"] is True
    assert pod["spec"]["nodeSelector"] and pod["spec"]["tolerations"]
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]
