"""Helm chart deploy/helm/cosyvoice2: rendered (deploy/gotemplate.py) it equals placement.to_k8s, and the
objects have the structure a cluster needs (replicas, GPU requests, ports, HPA targets)."""
from pathlib import Path

import pytest
import yaml

import gotemplate
import render
from cosyvoice_common.placement import (
    HPA_QUEUE_METRIC, STAGES, default_placement, k8s_from_values, load_placement, to_helm_values, to_k8s,
)

EXAMPLE = Path(render.REPO_ROOT) / "deploy" / "placement.example.yaml"
PLACEMENTS = {
    "default": lambda: default_placement(),
    "example": lambda: load_placement(env={}, path=EXAMPLE),
    "cpu": lambda: load_placement(env={"PLACEMENT_DEFAULT_DEVICE": "cpu", "LLM_REPLICAS": "2", "LLM_DEVICES": "cuda:0,cuda:1"}),
}


def by_key(objs):
    out = {(o["kind"], o["metadata"]["name"]): o for o in objs}
    assert len(out) == len(objs), "two objects share kind and name"
    return out


def test_checked_in_values_are_the_default_placement():
    values = yaml.safe_load((render.CHART_DIR / "values.yaml").read_text())
    assert values == to_helm_values(default_placement())


@pytest.mark.parametrize("name", PLACEMENTS)
def test_chart_renders_what_the_generator_generates(name):
    placement = PLACEMENTS[name]()
    assert by_key(render.helm_template(to_helm_values(placement), "rel")) == by_key(to_k8s(placement, "rel"))


@pytest.mark.parametrize("name", PLACEMENTS)
def test_rendered_objects_have_the_structure_a_cluster_needs(name):
    placement = PLACEMENTS[name]()
    objs = by_key(render.helm_template(to_helm_values(placement), "rel"))
    services = {n: o for (k, n), o in objs.items() if k == "Service"}
    for stage, sp in placement.items():
        dep = objs[("Deployment", f"rel-{stage}")]
        assert dep["spec"]["replicas"] == sp.replicas
        labels = dep["spec"]["template"]["metadata"]["labels"]
        assert dep["spec"]["selector"]["matchLabels"] == labels
        (container,) = dep["spec"]["template"]["spec"]["containers"]
        gpus = len(sp.gpus_of_replica(0))
        want = {"requests": {"nvidia.com/gpu": gpus}, "limits": {"nvidia.com/gpu": gpus}} if gpus else {}
        assert container["resources"] == want
        env = {e["name"]: e["value"] for e in container["env"]}
        assert all(isinstance(v, str) for v in env.values())          # Kubernetes rejects non-string env
        assert env["STAGE"] == stage and env["TRITON_INSTANCE_COUNT"] == str(sp.instances_per_device)
        assert env["TRITON_INSTANCE_KIND"] == ("KIND_GPU" if gpus else "KIND_CPU")
        slot = next(s for s in placement.process_plan() if s.stage == stage)
        svc = services[f"rel-{stage}"]
        assert svc["spec"]["clusterIP"] == "None"                    # gateway balances over pod addresses
        assert svc["spec"]["selector"] == labels
        assert [(p["name"], p["port"]) for p in svc["spec"]["ports"]] == [
            ("http", slot.http_port), ("grpc", slot.grpc_port), ("metrics", slot.metrics_port)]
        named = {p["name"] for p in container["ports"]}
        assert {p["targetPort"] for p in svc["spec"]["ports"]} <= named
        hpa = objs[("HorizontalPodAutoscaler", f"rel-{stage}")]
        target = hpa["spec"]["scaleTargetRef"]
        assert ("Deployment", target["name"]) in objs and target["kind"] == "Deployment"
        assert hpa["spec"]["minReplicas"] == sp.replicas <= hpa["spec"]["maxReplicas"]
        assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == HPA_QUEUE_METRIC
    gw = objs[("Deployment", "rel-gateway")]
    (gc,) = gw["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e["value"] for e in gc["env"]}
    for stage in STAGES:
        host, port = env[f"{stage.upper()}_URLS"].split(":")
        assert int(port) in {p["port"] for p in services[host]["spec"]["ports"]}
    redis_host = env["REDIS_URL"].split("//")[1].split(":")[0]
    assert redis_host in services and ("StatefulSet", redis_host) in objs
    assert {p["port"] for p in services["rel-gateway"]["spec"]["ports"]} == {50051, 8080}
    assert gw["spec"]["replicas"] == placement.gateway_replicas
    check_seed_fronts(objs, env, {"stream": ((8000, 8001, 8002), "true"), "offline": ((8010, 8011, 8012), "false")})


def check_seed_fronts(objs, gateway_env, want):
    """Each wanted front: a Deployment of the gateway image running the entrypoint, Triton probes, the
    gateway's stage URLs and Redis, and a Service on its three ports; no other front exists."""
    fronts = {n for (k, n) in objs if k in ("Deployment", "Service") and "-seed-" in n}
    assert fronts == {f"rel-seed-{v}" for v in want}
    for variant, (ports, decoupled) in want.items():
        name = f"rel-seed-{variant}"
        dep, svc = objs[("Deployment", name)], objs[("Service", name)]
        labels = dep["spec"]["template"]["metadata"]["labels"]
        assert dep["spec"]["selector"]["matchLabels"] == labels == svc["spec"]["selector"]
        (c,) = dep["spec"]["template"]["spec"]["containers"]
        assert c["image"].endswith("/gateway:latest") and c["command"] == ["python", "/opt/cosyvoice/bin/seed_front.py"]
        env = {e["name"]: e["value"] for e in c["env"]}
        assert all(isinstance(v, str) for v in env.values())
        assert env["SEED_DECOUPLED"] == decoupled and env["SEED_SPEAKER"] == "001"
        assert (env["TRITON_HTTP_PORT"], env["TRITON_GRPC_PORT"], env["TRITON_METRICS_PORT"]) == tuple(map(str, ports))
        for key in ("MODEL_DIR", "REDIS_URL", *(f"{s.upper()}_URLS" for s in STAGES)):
            assert env[key] == gateway_env[key], key
        assert c["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
        assert c["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": "http"}
        assert [(p["name"], p["containerPort"]) for p in c["ports"]] == list(zip(("http", "grpc", "metrics"), ports))
        assert [(p["port"], p["targetPort"]) for p in svc["spec"]["ports"]] == \
            list(zip(ports, ("http", "grpc", "metrics")))
        assert "nvidia.com/gpu" not in str(c.get("resources", {}))       # CPU only: no GPU request


def test_disabling_autoscaling_for_a_stage_drops_its_hpa():
    values = to_helm_values(default_placement())
    values["stages"]["llm"]["autoscaling"]["enabled"] = False
    objs = by_key(render.helm_template(values))
    assert ("HorizontalPodAutoscaler", "cosyvoice2-llm") not in objs
    assert ("HorizontalPodAutoscaler", "cosyvoice2-token2wav") in objs


@pytest.mark.parametrize("switch, left", [
    (lambda v: v["seedFronts"].update(enabled=False), set()),
    (lambda v: v["seedFronts"]["variants"]["offline"].update(enabled=False), {"stream"}),
    (lambda v: v["seedFronts"]["variants"]["stream"].update(enabled=False), {"offline"}),
], ids=["both-off", "offline-off", "stream-off"])
def test_seed_fronts_can_be_disabled_together_or_one_by_one(switch, left):
    values = to_helm_values(default_placement())
    switch(values)
    objs = by_key(render.helm_template(values, "rel"))
    assert objs == by_key(k8s_from_values(values, "rel"))
    assert {n for (k, n) in objs if "-seed-" in n} == {f"rel-seed-{v}" for v in left}
    assert ("Deployment", "rel-gateway") in objs


def test_seed_front_settings_come_from_values():
    values = to_helm_values(default_placement())
    values["seedFronts"].update(speaker="alice", promptWav="/models/cosyvoice2/p.wav", lengthFromText="ratio")
    values["seedFronts"]["variants"]["stream"]["replicas"] = 3
    objs = by_key(render.helm_template(values, "rel"))
    assert objs == by_key(k8s_from_values(values, "rel"))
    dep = objs[("Deployment", "rel-seed-stream")]
    env = {e["name"]: e["value"] for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert (env["SEED_SPEAKER"], env["SEED_PROMPT_WAV"], env["SEED_LENGTH_FROM_TEXT"]) == (
        "alice", "/models/cosyvoice2/p.wav", "ratio")
    assert dep["spec"]["replicas"] == 3


def test_helm_template_cli_renders_the_chart(tmp_path):
    out = tmp_path / "k8s.yaml"
    assert render.main(["helm-template", "-o", str(out)]) == 0
    docs = [d for d in yaml.safe_load_all(out.read_text()) if d]
    assert by_key(docs) == by_key(to_k8s(default_placement()))


# --- the template renderer itself ---------------------------------------------------------------------

def test_gotemplate_trims_ranges_maps_in_key_order_and_branches():
    tpl = "a:\n{{- range $k, $v := .Values.m }}\n  {{ $k }}: {{ $v.n | quote }}{{ if gt $v.n 1 }} big{{ else if eq $v.n 1 }} one{{ else }} none{{ end }}\n{{- end }}\n"
    out = gotemplate.render(tpl, {"Values": {"m": {"z": {"n": 2}, "b": {"n": 1}, "c": {"n": 0}}}})
    assert out == 'a:\n  b: "1" one\n  c: "0" none\n  z: "2" big\n'


def test_gotemplate_functions_and_root_variable():
    ctx = {"Values": {"s": "x", "e": ""}, "Release": {"Name": "r"}}
    assert gotemplate.render("{{ upper .Values.s }}-{{ .Values.e | default \"d\" }}-{{ $.Release.Name }}", ctx) == "X-d-r"
    assert gotemplate.render("{{ if and (gt 2 1) (not .Values.e) }}y{{ end }}", ctx) == "y"
    assert gotemplate.render("{{/* comment */}}k", ctx) == "k"


@pytest.mark.parametrize("tpl, match", [
    ("{{ .Values.missing }}", "no key 'missing'"),
    ("{{ include \"x\" . }}", "unsupported action 'include'"),
    ("{{ if .Values.s }}x", "missing {{ end }}"),
    ("{{ end }}", "without if/range"),
    ("{{ $nope }}", "undefined variable"),
])
def test_gotemplate_rejects_what_it_cannot_render(tpl, match):
    with pytest.raises(gotemplate.TemplateError, match=match):
        gotemplate.render(tpl, {"Values": {"s": 1}})
