"""The Helm chart deploy/helm/cosyvoice2, linted and rendered by the real helm with its default values, the
example values files and operator overrides; the objects are checked for what a cluster needs."""
import json

import pytest
import yaml
from cosyvoice_common.constants import REDIS_BOUND_ARGS
from cosyvoice_common.stages import (
    GATEWAY_GRPC_PORT,
    GATEWAY_HTTP_PORT,
    STAGE_NAMES,
    stage,
)
from helm_chart import (
    CHART,
    EXAMPLES,
    container,
    env_of,
    env_values,
    helm,
    template,
    template_error,
)

EXAMPLE_FILES = sorted(EXAMPLES.glob("*.yaml"))


def gpus_of(obj: dict) -> int:
    resources = container(obj).get("resources", {})
    limit = resources.get("limits", {}).get("nvidia.com/gpu", 0)
    assert resources.get("requests", {}).get("nvidia.com/gpu", 0) == limit
    return int(limit)


def pod_spec(obj: dict) -> dict:
    return obj["spec"]["template"]["spec"]


def volume_at(obj: dict, mount_path: str) -> dict:
    (mount,) = [m for m in container(obj)["volumeMounts"] if m["mountPath"] == mount_path]
    (volume,) = [v for v in pod_spec(obj)["volumes"] if v["name"] == mount["name"]]
    return volume


@pytest.mark.parametrize("values_file", [None, *EXAMPLE_FILES], ids=lambda f: f.stem if f else "default")
def test_helm_lint_passes(values_file):
    r = helm("lint", "--strict", str(CHART), *(["-f", str(values_file)] if values_file else []))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "1 chart(s) linted, 0 chart(s) failed" in r.stdout


def test_chart_stages_are_the_registry_stages_on_their_ports():
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert list(values["stages"]) == list(STAGE_NAMES)
    for name, s in values["stages"].items():
        ports = stage(name).ports()
        assert (s["httpPort"], s["grpcPort"], s["metricsPort"]) == (ports.http, ports.grpc, ports.metrics)


def test_default_values_render_every_stage_on_a_gpu_with_shared_memory():
    objs = template()
    for name in STAGE_NAMES:
        dep = objs[("Deployment", f"rel-{name}")]
        assert dep["spec"]["replicas"] == 1
        labels = dep["spec"]["template"]["metadata"]["labels"]
        assert dep["spec"]["selector"]["matchLabels"] == labels
        c = container(dep)
        assert c["image"] == f"cosyvoice2/{name}:latest" and c["imagePullPolicy"] == "IfNotPresent"
        ports = stage(name).ports()
        assert [(p["name"], p["containerPort"]) for p in c["ports"]] == [
            ("http", ports.http), ("grpc", ports.grpc), ("metrics", ports.metrics)]
        assert gpus_of(dep) == 1
        env = env_values(dep)
        assert all(isinstance(v, str) for v in env.values())          # Kubernetes rejects non-string env
        assert env == {"STAGE": name, "MODEL_DIR": "/models/cosyvoice2", "TRITON_HTTP_PORT": str(ports.http),
                       "TRITON_GRPC_PORT": str(ports.grpc), "TRITON_METRICS_PORT": str(ports.metrics),
                       "TRITON_INSTANCE_COUNT": "1", "TRITON_INSTANCE_KIND": "KIND_GPU", "TRITON_GPU_COUNT": "1"}
        assert c["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
        assert c["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": "http"}
        assert volume_at(dep, "/dev/shm") == {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": "1Gi"}}
        assert volume_at(dep, "/models/cosyvoice2")["persistentVolumeClaim"] == {
            "claimName": "cosyvoice2-models", "readOnly": True}
        assert pod_spec(dep)["securityContext"] == {"runAsNonRoot": True, "runAsUser": 10001}
        svc = objs[("Service", f"rel-{name}")]
        assert svc["spec"]["clusterIP"] == "None"                    # headless: the gateway balances over pods
        assert svc["spec"]["selector"] == labels
        assert [(p["port"], p["targetPort"]) for p in svc["spec"]["ports"]] == [
            (ports.http, "http"), (ports.grpc, "grpc"), (ports.metrics, "metrics")]
    assert not [k for k in objs if k[0] == "HorizontalPodAutoscaler"]      # needs prometheus-adapter: opt-in


def test_gateway_reaches_every_stage_and_redis_and_has_separate_liveness_and_readiness():
    objs = template()
    gw = objs[("Deployment", "rel-gateway")]
    c = container(gw)
    assert c["image"] == "cosyvoice2/gateway:latest"
    # alive = the process serves HTTP; ready = every stage answers: a stage rollout does not restart gateways
    assert c["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "http"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {"grpc": GATEWAY_GRPC_PORT, "http": GATEWAY_HTTP_PORT}
    env = env_values(gw)
    for name in STAGE_NAMES:
        host, port = env[stage(name).env("URLS")].split(":")
        svc = objs[("Service", host)]
        assert int(port) == stage(name).ports().grpc
        assert int(port) in {p["port"] for p in svc["spec"]["ports"]}
    redis_host = env["REDIS_URL"].split("//")[1].split(":")[0]
    assert ("Service", redis_host) in objs and ("StatefulSet", redis_host) in objs
    assert (env["GATEWAY_HOST"], env["GRPC_PORT"], env["HTTP_PORT"]) == ("0.0.0.0", "50051", "8080")
    svc = objs[("Service", "rel-gateway")]
    assert svc["spec"]["type"] == "ClusterIP"
    assert {p["port"] for p in svc["spec"]["ports"]} == {GATEWAY_GRPC_PORT, GATEWAY_HTTP_PORT}
    assert "/dev/shm" not in str(c["volumeMounts"])                   # no Python backend in the gateway


def test_nothing_is_exposed_outside_the_cluster_by_default():
    services = [o for (kind, _), o in template().items() if kind == "Service"]
    assert services and all(s["spec"].get("type", "ClusterIP") == "ClusterIP" for s in services)
    assert not [o for (kind, _), o in template().items() if kind == "Ingress"]


def test_redis_is_bounded_and_persistent():
    objs = template()
    sts = objs[("StatefulSet", "rel-redis")]
    c = container(sts)
    assert c["args"][-len(REDIS_BOUND_ARGS):] == list(REDIS_BOUND_ARGS)   # the launcher's bound, same values
    assert c["readinessProbe"]["exec"]["command"] == ["redis-cli", "ping"]
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["resources"]["requests"]["storage"] == "1Gi"
    assert {m["mountPath"] for m in c["volumeMounts"]} == {"/data"}


def test_cpu_only_values_ask_for_no_gpu_and_tell_triton_so():
    objs = template(EXAMPLES / "cpu-only.yaml")
    for name in STAGE_NAMES:
        dep = objs[("Deployment", f"rel-{name}")]
        assert gpus_of(dep) == 0
        env = env_values(dep)
        assert (env["TRITON_INSTANCE_KIND"], env["TRITON_GPU_COUNT"]) == ("KIND_CPU", "0")
        assert container(dep)["resources"] == {"requests": {"cpu": "1", "memory": "4Gi"}}
    assert "nvidia.com/gpu" not in yaml.safe_dump(list(objs.values()))


def test_two_gpu_values_place_llm_and_token2wav_on_a_gpu_each():
    objs = template(EXAMPLES / "two-gpus.yaml")
    deps = {name: objs[("Deployment", f"rel-{name}")] for name in STAGE_NAMES}
    assert {name: gpus_of(d) for name, d in deps.items()} == {"tokenizer": 0, "speaker": 0, "llm": 1, "token2wav": 1}
    assert env_values(deps["tokenizer"])["TRITON_INSTANCE_KIND"] == "KIND_CPU"
    assert env_values(deps["tokenizer"])["TOKENIZER_BACKEND"] == "onnx"       # the stage's own env, appended
    assert env_values(deps["token2wav"])["TRITON_INSTANCE_COUNT"] == "2"
    assert volume_at(deps["token2wav"], "/dev/shm")["emptyDir"]["sizeLimit"] == "2Gi"
    assert volume_at(deps["llm"], "/dev/shm")["emptyDir"]["sizeLimit"] == "1Gi"
    assert container(deps["llm"])["resources"] == {
        "requests": {"cpu": "4", "memory": "16Gi", "nvidia.com/gpu": 1},
        "limits": {"memory": "32Gi", "nvidia.com/gpu": 1}}
    for d in deps.values():                                   # the defaults' toleration reaches every stage
        assert pod_spec(d)["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    # token2wav autoscales: the HPA owns its replica count (a Deployment count would reset it on upgrade)
    assert "replicas" not in deps["token2wav"]["spec"] and deps["llm"]["spec"]["replicas"] == 1
    hpa = objs[("HorizontalPodAutoscaler", "rel-token2wav")]
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "rel-token2wav"}
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (1, 3)
    metric = hpa["spec"]["metrics"][0]["pods"]
    assert metric["metric"]["name"] == "triton_queue_duration_us_per_request"
    assert metric["target"] == {"type": "AverageValue", "averageValue": "10000"}   # default kept beside the override
    assert [k for k in objs if k[0] == "HorizontalPodAutoscaler"] == [("HorizontalPodAutoscaler", "rel-token2wav")]
    assert objs[("Deployment", "rel-gateway")]["spec"]["replicas"] == 2


def test_production_values_registry_secrets_scheduling_load_balancer_and_external_redis():
    objs = template(EXAMPLES / "production.yaml")
    for name in STAGE_NAMES:
        dep = objs[("Deployment", f"rel-{name}")]
        c = container(dep)
        assert c["image"] == f"registry.example.com/cosyvoice2/{name}:0.1.0" and c["imagePullPolicy"] == "Always"
        assert pod_spec(dep)["imagePullSecrets"] == [{"name": "regcred"}]
        assert pod_spec(dep)["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert {n: objs[("Deployment", f"rel-{n}")]["spec"]["replicas"] for n in STAGE_NAMES} == {
        "tokenizer": 1, "speaker": 1, "llm": 2, "token2wav": 3}
    gw = objs[("Deployment", "rel-gateway")]
    assert gw["spec"]["replicas"] == 3
    assert env_of(gw)["COSYVOICE_API_KEY"] == {
        "name": "COSYVOICE_API_KEY", "valueFrom": {"secretKeyRef": {"name": "tts-api-keys", "key": "keys"}}}
    assert env_values(gw)["REDIS_URL"] == "redis://redis.data.svc.cluster.local:6379/0"
    assert "nodeSelector" not in pod_spec(gw)                  # stage scheduling stays with the stages
    assert objs[("Service", "rel-gateway")]["spec"]["type"] == "LoadBalancer"
    assert not [k for k in objs if k[1].startswith("rel-redis") or "-seed-" in k[1]]


def test_a_stage_override_of_zero_or_false_wins_over_the_defaults():
    # --set stages.llm.gpus=0 must give a CPU llm even though stageDefaults.gpus is 1 (Helm's merge functions
    # treat 0 as unset; the chart sets keys one by one instead)
    objs = template(sets=("stages.llm.gpus=0", "stages.llm.replicas=3", "stageDefaults.autoscaling.enabled=true",
                          "stages.speaker.autoscaling.enabled=false"))
    llm = objs[("Deployment", "rel-llm")]
    assert gpus_of(llm) == 0 and env_values(llm)["TRITON_INSTANCE_KIND"] == "KIND_CPU"
    assert gpus_of(objs[("Deployment", "rel-token2wav")]) == 1
    assert objs[("HorizontalPodAutoscaler", "rel-llm")]["spec"]["minReplicas"] == 3
    assert ("HorizontalPodAutoscaler", "rel-speaker") not in objs
    assert objs[("Deployment", "rel-speaker")]["spec"]["replicas"] == 1


def test_operator_values_per_component():
    values = {
        "stageDefaults": {"env": [{"name": "LOG_LEVEL", "value": "debug"}], "affinity": {"nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [{"matchExpressions": [
                {"key": "gpu", "operator": "In", "values": ["h200"]}]}]}}}},
        "stages": {"llm": {"env": [{"name": "LLM_MAX_BATCH_SIZE", "value": "32"}],
                           "image": {"repository": "mirror.local/llm-trt", "tag": "v2", "pullPolicy": "Never"},
                           "nodeSelector": {"pool": "llm"}, "affinity": {}, "shmSize": "4Gi"}},
        "gateway": {"nodeSelector": {"pool": "cpu"}, "tolerations": [{"key": "cpu-only", "operator": "Exists"}],
                    "service": {"type": "NodePort", "annotations": {"a": "b"}}},
        "seedFronts": {"resources": {"limits": {"memory": "2Gi"}}, "shmSize": "256Mi",
                       "service": {"type": "LoadBalancer"}},
        "redis": {"maxmemory": "4gb", "storage": "10Gi", "nodeSelector": {"pool": "data"}},
    }
    objs = template(values=values)
    llm, t2w = objs[("Deployment", "rel-llm")], objs[("Deployment", "rel-token2wav")]
    assert list(env_values(llm))[-2:] == ["LOG_LEVEL", "LLM_MAX_BATCH_SIZE"]       # defaults' env, then the stage's
    assert list(env_values(t2w))[-1] == "LOG_LEVEL"
    assert container(llm)["image"] == "mirror.local/llm-trt:v2" and container(llm)["imagePullPolicy"] == "Never"
    assert container(t2w)["image"] == "cosyvoice2/token2wav:latest"
    assert pod_spec(llm)["nodeSelector"] == {"pool": "llm"}
    assert "affinity" not in pod_spec(llm)                                    # the stage's {} replaced the default
    assert pod_spec(t2w)["affinity"] == values["stageDefaults"]["affinity"]
    assert volume_at(llm, "/dev/shm")["emptyDir"]["sizeLimit"] == "4Gi"
    gw = objs[("Deployment", "rel-gateway")]
    assert pod_spec(gw)["nodeSelector"] == {"pool": "cpu"} and pod_spec(gw)["tolerations"][0]["key"] == "cpu-only"
    svc = objs[("Service", "rel-gateway")]
    assert svc["spec"]["type"] == "NodePort" and svc["metadata"]["annotations"] == {"a": "b"}
    for variant in ("stream", "offline"):
        front = objs[("Deployment", f"rel-seed-{variant}")]
        assert container(front)["resources"] == {"limits": {"memory": "2Gi"}}
        assert volume_at(front, "/dev/shm")["emptyDir"] == {"medium": "Memory", "sizeLimit": "256Mi"}
        assert objs[("Service", f"rel-seed-{variant}")]["spec"]["type"] == "LoadBalancer"
    redis = objs[("StatefulSet", "rel-redis")]
    assert container(redis)["args"][container(redis)["args"].index("--maxmemory") + 1] == "4gb"
    assert redis["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"] == "10Gi"
    assert pod_spec(redis)["nodeSelector"] == {"pool": "data"}


def test_redis_disabled_without_a_url_is_refused():
    assert "set redis.url" in template_error(sets=("redis.enabled=false",))


def check_seed_fronts(objs, want):
    """Each wanted front: a Deployment of the gateway image running the entrypoint, Triton probes, the
    gateway's stage URLs and Redis, /dev/shm for its Python backend, a Service on its three ports."""
    gateway_env = env_values(objs[("Deployment", "rel-gateway")])
    assert {n for (k, n) in objs if "-seed-" in n} == {f"rel-seed-{v}" for v in want}
    for variant, (ports, decoupled) in want.items():
        name = f"rel-seed-{variant}"
        dep, svc = objs[("Deployment", name)], objs[("Service", name)]
        labels = dep["spec"]["template"]["metadata"]["labels"]
        assert dep["spec"]["selector"]["matchLabels"] == labels == svc["spec"]["selector"]
        c = container(dep)
        assert c["image"] == "cosyvoice2/gateway:latest"
        assert c["command"] == ["python", "/opt/cosyvoice/bin/seed_front.py"]
        env = env_values(dep)
        assert all(isinstance(v, str) for v in env.values())
        assert env["SEED_DECOUPLED"] == decoupled and env["SEED_SPEAKER"] == "001"
        assert (env["TRITON_HTTP_PORT"], env["TRITON_GRPC_PORT"], env["TRITON_METRICS_PORT"]) == tuple(map(str, ports))
        for key in ("MODEL_DIR", "REDIS_URL", *(stage(s).env("URLS") for s in STAGE_NAMES)):
            assert env[key] == gateway_env[key], key
        assert c["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
        assert c["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": "http"}
        assert [(p["name"], p["containerPort"]) for p in c["ports"]] == list(zip(("http", "grpc", "metrics"), ports))
        assert [(p["port"], p["targetPort"]) for p in svc["spec"]["ports"]] == \
            list(zip(ports, ("http", "grpc", "metrics")))
        assert "resources" not in c                                  # CPU only: no GPU request
        assert volume_at(dep, "/dev/shm")["emptyDir"]["medium"] == "Memory"


def test_both_seed_fronts_by_default():
    check_seed_fronts(template(), {"stream": ((8000, 8001, 8002), "true"), "offline": ((8010, 8011, 8012), "false")})


@pytest.mark.parametrize("sets, left", [
    (("seedFronts.enabled=false",), {}),
    (("seedFronts.variants.offline.enabled=false",), {"stream": ((8000, 8001, 8002), "true")}),
    (("seedFronts.variants.stream.enabled=false",), {"offline": ((8010, 8011, 8012), "false")}),
], ids=["both-off", "offline-off", "stream-off"])
def test_seed_fronts_can_be_disabled_together_or_one_by_one(sets, left):
    objs = template(sets=sets)
    check_seed_fronts(objs, left)
    assert ("Deployment", "rel-gateway") in objs


def test_seed_front_settings_come_from_values():
    objs = template(values={"seedFronts": {"speaker": "alice", "promptWav": "/models/cosyvoice2/p.wav",
                                           "lengthFromText": "ratio", "variants": {"stream": {"replicas": 3}}}})
    dep = objs[("Deployment", "rel-seed-stream")]
    env = env_values(dep)
    assert (env["SEED_SPEAKER"], env["SEED_PROMPT_WAV"], env["SEED_LENGTH_FROM_TEXT"]) == (
        "alice", "/models/cosyvoice2/p.wav", "ratio")
    assert dep["spec"]["replicas"] == 3
    assert objs[("Deployment", "rel-seed-offline")]["spec"]["replicas"] == 1


def test_values_schema_names_the_registry_stages():
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert schema["properties"]["stages"]["propertyNames"]["enum"] == list(STAGE_NAMES)


@pytest.mark.parametrize("sets, message", [
    (("stages.tokeniser.replicas=2",), "tokeniser"),                         # a stage that does not exist
    (("stages.llm.replica=2",), "Additional property replica is not allowed"),
    (("gateway.replica=2",), "Additional property replica is not allowed"),
    (("gateway.service.type=Public",), "gateway.service.type"),
    (("stageDefaults.gpus=-1",), "stageDefaults.gpus"),
    (("redis.maxmemory=lots",), "redis.maxmemory"),
], ids=["unknown-stage", "stage-typo", "gateway-typo", "service-type", "negative-gpus", "maxmemory"])
def test_values_schema_refuses_mistakes_before_anything_renders(sets, message):
    assert message in template_error(sets=sets)
