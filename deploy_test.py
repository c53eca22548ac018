"""The deployment files in deploy/: the Kubernetes overlays rendered by `kubectl kustomize` and validated
offline against a pinned Kubernetes version's schemas (kubernetes-validate, strict: no unknown field), the
custom resources it has no schema for (KEDA, Prometheus Operator) checked here, and every file checked
against the server it deploys (settings, ports, probes, drain, metrics). HAProxy's configuration is checked
by `haproxy -c`; scaleout_test.py runs it in front of real replicas."""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from typing import Any

import kubernetes_validate
import pytest
import yaml

import server
from testing import ROOT

KUBERNETES_VERSION = "1.32.0"  # the oldest release the manifests promise to work on
KUSTOMIZE = ROOT / "deploy" / "kubernetes"
OVERLAYS = ("gpu", "cpu")
HAPROXY_CFG = ROOT / "deploy" / "haproxy" / "haproxy.cfg"
# What the Deployment sets that is not one of the server's settings: where the caches go.
CACHE_ENV = {"HF_HOME", "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", "NUMBA_CACHE_DIR", "HOME", "XDG_CACHE_HOME"}
LOAD_GAUGES = ("tts_slots_busy_fraction", "tts_requests_waiting", "tts_slots")


def tool(name: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} is needed for this test ({'make install' if name == 'haproxy' else 'README Tests'})"
    return path


def render(overlay: str) -> list[dict[str, Any]]:
    result = subprocess.run(
        [tool("kubectl"), "kustomize", str(KUSTOMIZE / "overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request: pytest.FixtureRequest) -> list[dict[str, Any]]:
    return render(request.param)


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    [doc] = all_of(docs, kind)
    return doc


def all_of(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [doc for doc in docs if doc["kind"] == kind]


def container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    [tts] = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    return tts


def env_of(tts: dict[str, Any]) -> dict[str, str]:
    return {item["name"]: item.get("value", "") for item in tts["env"]}


def test_every_object_is_valid_against_the_pinned_kubernetes_schemas(rendered: list[dict[str, Any]]) -> None:
    custom = {"ScaledObject", "ServiceMonitor"}  # no schema in kubernetes-validate: checked below
    names = [(doc["kind"], doc["metadata"]["name"]) for doc in rendered]
    assert len(names) == len(set(names)), names
    for doc in rendered:
        if doc["kind"] not in custom:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_the_validator_refuses_what_kubernetes_would() -> None:
    """The check above has teeth: an unknown field (strict) and a wrong type each fail."""
    deployment = one(render("cpu"), "Deployment")
    template = deployment["spec"]["template"]

    def with_pod(pod: dict[str, Any]) -> dict[str, Any]:
        return {**deployment, "spec": {**deployment["spec"], "template": {**template, "spec": pod}}}

    pod = template["spec"]
    kubernetes_validate.validate(with_pod(pod), KUBERNETES_VERSION, strict=True)
    for broken in (
        {**pod, "terminationGracePeriod": 90},
        {**pod, "containers": [{**pod["containers"][0], "readinesProbe": {}}]},
        {**pod, "terminationGracePeriodSeconds": "ninety"},
    ):
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(with_pod(broken), KUBERNETES_VERSION, strict=True)


def test_the_deployment_runs_the_server_as_its_settings_and_drain_need(rendered: list[dict[str, Any]]) -> None:
    pod = one(rendered, "Deployment")["spec"]["template"]["spec"]
    tts = container(rendered)
    env = env_of(tts)
    known = {f.metadata["env"] for f in dataclasses.fields(server.Settings)}
    assert set(env) - known == CACHE_ENV, set(env) - known - CACHE_ENV
    settings = server.Settings.from_env({k: v for k, v in env.items() if k in known})
    # Ports: the container's and the Service's are the ones the server listens on.
    ports = {p["name"]: p["containerPort"] for p in tts["ports"]}
    assert ports == {"http": settings.port, "wyoming": settings.wyoming_port, "audiosocket": settings.audiosocket_port}
    service = {p["name"]: p["targetPort"] for p in one(rendered, "Service")["spec"]["ports"]}
    assert service == {name: name for name in ports}
    # Probes: readiness and startup on /ready, liveness on /health; startup long enough for a first download.
    assert tts["readinessProbe"]["httpGet"] == tts["startupProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
    assert tts["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    startup = tts["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600
    # Drain: preStop's sleep, then SHUTDOWN_GRACE_S and the flush all fit before the kubelet's SIGKILL.
    command = tts["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    needed = int(command[1]) + settings.shutdown_grace_s + 2 * server.SHUTDOWN_FLUSH_SECONDS
    assert pod["terminationGracePeriodSeconds"] > needed + 5
    # Non-root on a read-only root filesystem; what the server writes goes to volumes.
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    assert tts["securityContext"]["readOnlyRootFilesystem"] is True
    assert tts["securityContext"]["allowPrivilegeEscalation"] is False
    mounts = {m["mountPath"]: m["name"] for m in tts["volumeMounts"]}
    writable = [settings.voices_dir, env["HF_HOME"], env["TORCHINDUCTOR_CACHE_DIR"], env["TRITON_CACHE_DIR"]]
    writable += [env["NUMBA_CACHE_DIR"], env["HOME"], env["XDG_CACHE_HOME"]]
    for path in writable:
        assert any(path == m or path.startswith(m + "/") for m in mounts), path
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert set(mounts.values()) == set(volumes)
    claims = {v["persistentVolumeClaim"]["claimName"] for v in volumes.values() if "persistentVolumeClaim" in v}
    assert claims == {pvc["metadata"]["name"] for pvc in all_of(rendered, "PersistentVolumeClaim")}
    assert volumes[mounts[settings.voices_dir]]["persistentVolumeClaim"]["claimName"] == "tts-voices"


def test_the_voices_volume_is_shared_and_the_selectors_match_the_pods(rendered: list[dict[str, Any]]) -> None:
    claims = {doc["metadata"]["name"]: doc for doc in all_of(rendered, "PersistentVolumeClaim")}
    assert claims["tts-voices"]["spec"]["accessModes"] == ["ReadWriteMany"]
    assert "tts-model-cache" in claims
    deployment, service = one(rendered, "Deployment"), one(rendered, "Service")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert service["spec"]["selector"].items() <= labels.items()
    pdb = one(rendered, "PodDisruptionBudget")["spec"]
    assert pdb["selector"]["matchLabels"].items() <= labels.items() and pdb["maxUnavailable"] == 1
    monitor = one(rendered, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    [endpoint] = monitor["spec"]["endpoints"]
    assert endpoint["path"] == "/metrics" and endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}


def exported_gauges() -> set[str]:
    """The metric names the server's load collector yields, read from a stand-in speaker's counts."""
    empty = server.CacheCounts(0, 0, 0, 0, 0, 0)
    counts = server.SpeakerCounts(True, True, {}, 3, 1, 0, True, 32, None, empty, empty)
    return {metric.name for metric in server.load_metrics(counts)}


def names_in(query: str) -> set[str]:
    return set(re.findall(r"\btts_[a-z_]+", query))


def test_gpu_pods_take_one_gpu_and_keda_scales_them_on_the_servers_load() -> None:
    objects = render("gpu")
    tts = container(objects)
    assert tts["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert env_of(tts)["DEVICE"] == "cuda"
    scaled = one(objects, "ScaledObject")
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    spec = scaled["spec"]
    assert spec["scaleTargetRef"]["name"] == one(objects, "Deployment")["metadata"]["name"]
    assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
    behavior = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    # The behaviour is an autoscaling/v2 HPA's: validate it as one.
    hpa = {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": "keda-hpa-tts"},
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "tts"},
            "maxReplicas": spec["maxReplicaCount"],
            "behavior": behavior,
        },
    }
    kubernetes_validate.validate(hpa, KUBERNETES_VERSION, strict=True)
    assert behavior["scaleDown"]["stabilizationWindowSeconds"] >= 300
    [trigger] = spec["triggers"]
    assert trigger["type"] == "prometheus" and trigger["metricType"] == "AverageValue"
    metadata = trigger["metadata"]
    assert set(metadata) <= {"serverAddress", "query", "threshold", "ignoreNullValues", "activationThreshold"}
    assert all(isinstance(value, str) for value in metadata.values())  # KEDA's metadata is strings only
    assert 0 < float(metadata["threshold"]) < 1
    assert names_in(metadata["query"]) == set(LOAD_GAUGES) <= exported_gauges()
    assert metadata["query"].count("(") == metadata["query"].count(")")
    ingress = one(objects, "Ingress")["metadata"]["annotations"]
    assert ingress["nginx.ingress.kubernetes.io/proxy-buffering"] == "off"
    assert int(ingress["nginx.ingress.kubernetes.io/proxy-read-timeout"]) >= 3600
    assert "http_429" in ingress["nginx.ingress.kubernetes.io/proxy-next-upstream"].split()
    [rule] = one(objects, "Ingress")["spec"]["rules"]
    assert rule["http"]["paths"][0]["backend"]["service"]["name"] == one(objects, "Service")["metadata"]["name"]


def test_cpu_pods_run_piper_and_a_plain_hpa_reads_the_adapters_load_metric() -> None:
    objects = render("cpu")
    tts = container(objects)
    assert "nvidia.com/gpu" not in tts["resources"].get("limits", {})
    assert env_of(tts)["TTS_MODEL"] == "piper"
    hpa = one(objects, "HorizontalPodAutoscaler")["spec"]
    [metric] = hpa["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["target"]["type"] == "AverageValue"
    assert metric["pods"]["target"]["averageValue"] == "8"  # Piper: one slot, 16 real-time streams on 2 cores
    values = yaml.safe_load((KUSTOMIZE / "components" / "hpa" / "prometheus-adapter-values.yaml").read_text())
    [rule] = values["rules"]["custom"]
    assert rule["name"]["as"] == metric["pods"]["metric"]["name"]
    assert names_in(rule["metricsQuery"]) == set(LOAD_GAUGES) <= exported_gauges()
    assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}


def haproxy_check(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tool("haproxy"), "-c", "-f", str(HAPROXY_CFG)],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_haproxy_configuration_is_valid_and_needs_every_replica() -> None:
    replicas = {f"TTS_REPLICA_{n}": f"127.0.0.1:{8000 + n}" for n in (1, 2, 3)}
    checked = haproxy_check(replicas)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    missing = haproxy_check({**replicas, "TTS_REPLICA_3": ""})
    assert missing.returncode != 0
    text = HAPROXY_CFG.read_text()
    for needed in ("balance leastconn", "option httpchk GET /ready", "option redispatch", "option http-buffer-request"):
        assert needed in text, needed
    assert re.search(r"retry-on [^\n]*\b503\b", text) and "http-response set-status 503 if { status 429 }" in text


def sections(text: str) -> Iterator[tuple[str, list[str]]]:
    """HAProxy's sections: header line, then its lines (comments dropped)."""
    header, lines = "", list[str]()
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].rstrip()
        if not line:
            continue
        if not line.startswith((" ", "\t")):
            if header:
                yield header, lines
            header, lines = line, []
        else:
            lines.append(line.strip())
    yield header, lines


def test_every_replica_section_turns_429_into_a_marked_503() -> None:
    replica_sections = {h: body for h, body in sections(HAPROXY_CFG.read_text()) if h.startswith("listen replica_")}
    assert len(replica_sections) == 3
    for header, body in replica_sections.items():
        full = body.index("http-response set-header x-tts-full 1 if { status 429 }")
        assert full < body.index("http-response set-status 503 if { status 429 }")
        assert body[0].endswith(f'-replica-{header.split()[1].removeprefix("replica_")}"')  # its bind line
