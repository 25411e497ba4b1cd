"""docker-compose.yml and `render.py compose`: valid compose-spec, healthy dependency graph, stages on
the GPUs their placement names."""
import json
import re
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import render
import yaml
from check_jsonschema import builtin_schemas
from cosyvoice_common.stages import (
    GATEWAY_GRPC_PORT,
    GATEWAY_HTTP_PORT,
    SEED_OFFLINE_PORTS,
    SEED_STREAMING_PORTS,
    STAGE_NAMES,
)
from cosyvoice_launcher.placement import (
    SEED_FRONTS,
    STAGE_DOCKERFILE,
    compose_service_names,
    default_placement,
    load_placement,
    to_compose,
)

FRONTS = tuple(name for name, _, _ in SEED_FRONTS)      # seed-stream, seed-offline

REPO = Path(render.REPO_ROOT)
EXAMPLE = REPO / "deploy" / "placement.example.yaml"


def compose_schema() -> dict:
    path = Path(builtin_schemas.__file__).parent / "vendor" / "compose-spec.json"
    return json.loads(path.read_text())


def checked_in() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


_DEFAULTED = re.compile(r"\$\{[A-Za-z_]+:-([^}]*)\}")


def _parts(spec: str) -> list[str]:
    """'${HOST:-127.0.0.1}:${VAR:-50051}:50051' -> ['127.0.0.1', '50051', '50051'] (defaults applied)."""
    return _DEFAULTED.sub(lambda m: m.group(1).replace(":", "\0"), spec).split(":")


def host_port(spec: str) -> int:
    """'${HOST:-127.0.0.1}:${VAR:-50051}:50051' or '127.0.0.1:8000:8000' -> the host port."""
    return int(_parts(spec)[-2])


def host_ip(spec: str) -> str:
    parts = _parts(spec)
    return parts[0] if len(parts) == 3 else "0.0.0.0"


def test_published_ports_bind_to_loopback_unless_configured():
    for doc in (checked_in(), to_compose(load_placement(env={}, path=EXAMPLE))):
        published = [(name, p) for name, svc in doc["services"].items() for p in svc.get("ports", [])]
        assert published and all(host_ip(p) == "127.0.0.1" for _, p in published), published
        assert all(p.startswith("${PUBLISH_HOST:-127.0.0.1}:") for _, p in published)


def test_python_backend_services_get_shared_memory():
    doc = checked_in()
    for name, svc in doc["services"].items():
        if name in ("redis", "gateway"):
            assert "shm_size" not in svc
        else:                       # every tritonserver (stages, seed fronts) runs Python-backend stubs
            assert svc["shm_size"] == "${TRITON_SHM_SIZE:-1gb}", name


def check_structure(doc: dict, gpu_services: dict[str, list[str]]) -> None:
    services = doc["services"]
    for name, svc in services.items():
        assert "image" in svc or "build" in svc, name
        assert svc["healthcheck"]["test"][0] == "CMD", name
        for dep, cond in svc.get("depends_on", {}).items():
            assert dep in services, f"{name} depends on unknown {dep}"
            assert cond == {"condition": "service_healthy"}, name
        devices = svc.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices")
        if name in gpu_services:
            assert devices == [{"driver": "nvidia", "device_ids": gpu_services[name], "capabilities": ["gpu"]}], name
        else:
            assert devices is None, f"{name} reserves a GPU its placement does not give it"
    ports = [host_port(p) for svc in services.values() for p in svc.get("ports", [])]
    assert len(ports) == len(set(ports)), ports
    # only the gateway and the seed fronts publish; stage services must stay scalable (a fixed host port would clash)
    assert all("ports" not in svc for name, svc in services.items() if name not in ("gateway", *FRONTS))
    gw = services["gateway"]
    backends = set(services) - {"gateway", *FRONTS}          # every stage service and Redis
    assert set(gw["depends_on"]) == backends
    for front in FRONTS:
        assert set(services[front]["depends_on"]) == backends, front
    assert "redis-data:/data" in services["redis"]["volumes"] and "redis-data" in doc["volumes"]


def test_checked_in_compose_is_the_rendered_default_placement():
    assert checked_in() == to_compose(default_placement())
    text = (REPO / "docker-compose.yml").read_text()
    assert text == render.COMPOSE_HEADER + render.dump_yaml(to_compose(default_placement()))


@pytest.mark.parametrize("doc", [checked_in(), to_compose(load_placement(env={}, path=EXAMPLE))],
                         ids=["checked-in", "example"])
def test_compose_files_match_the_compose_spec_schema(doc):
    jsonschema.validate(doc, compose_schema())


def test_schema_check_catches_a_broken_file():
    doc = checked_in()
    doc["services"]["llm"]["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] = "gpu"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(doc, compose_schema())


def test_checked_in_compose_structure_and_public_ports():
    doc = checked_in()
    check_structure(doc, {s: ["0"] for s in STAGE_NAMES})
    ports = {host_port(p) for p in doc["services"]["gateway"]["ports"]}
    assert ports == {GATEWAY_GRPC_PORT, GATEWAY_HTTP_PORT}
    assert [host_port(p) for p in doc["services"]["seed-stream"]["ports"]] == list(SEED_STREAMING_PORTS)
    assert [host_port(p) for p in doc["services"]["seed-offline"]["ports"]] == list(SEED_OFFLINE_PORTS)
    env = doc["services"]["gateway"]["environment"]
    # one DNS name per stage: `--scale token2wav=3` adds addresses behind it, nothing else changes
    assert env["TOKEN2WAV_URLS"] == "token2wav:8401"
    assert env["REDIS_URL"] == "redis://redis:6379/0"
    assert env["COSYVOICE_API_KEY"] == "${COSYVOICE_API_KEY:-}"      # `COSYVOICE_API_KEY=k docker compose up`


def test_example_placement_puts_each_stage_on_its_gpus():
    doc = to_compose(load_placement(env={}, path=EXAMPLE))
    check_structure(doc, {"llm": ["0"], "token2wav-0": ["1"], "token2wav-1": ["2"],
                          "tokenizer": ["3"], "speaker": ["3"]})
    assert "token2wav" not in doc["services"]
    assert doc["services"]["gateway"]["environment"]["TOKEN2WAV_URLS"] == "token2wav-0:8401,token2wav-1:8401"
    assert doc["services"]["token2wav-1"]["environment"]["TRITON_INSTANCE_COUNT"] == "2"


@pytest.mark.parametrize("doc", [checked_in(), to_compose(load_placement(env={}, path=EXAMPLE))],
                         ids=["checked-in", "example"])
def test_every_stage_service_builds_the_one_stage_dockerfile_with_its_stage(doc):
    for name, svc in doc["services"].items():
        stage_name = svc.get("environment", {}).get("STAGE")
        if stage_name is None:
            continue
        assert name == stage_name or name.startswith(f"{stage_name}-")
        assert svc["build"] == {"context": ".", "dockerfile": STAGE_DOCKERFILE, "args": {"STAGE": stage_name}}
        assert (REPO / STAGE_DOCKERFILE).exists()
        assert svc["image"] == "${COSYVOICE_REGISTRY:-cosyvoice2}/" + stage_name + ":${COSYVOICE_TAG:-latest}"
    built = {svc["build"]["args"]["STAGE"] for svc in doc["services"].values() if "args" in svc.get("build", {})}
    assert built == set(STAGE_NAMES)
    for name in ("gateway", *FRONTS):                  # the gateway image keeps its own Dockerfile
        assert doc["services"][name]["build"] == {"context": ".", "dockerfile": "services/gateway/Dockerfile"}


def test_replicas_on_the_same_devices_become_one_scaled_service():
    doc = to_compose(load_placement(env={"TOKEN2WAV_REPLICAS": "3"}))
    svc = doc["services"]["token2wav"]
    assert svc["deploy"]["replicas"] == 3
    assert svc["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"] == ["0"]


def test_cpu_placement_reserves_no_gpu():
    doc = to_compose(load_placement(env={"PLACEMENT_DEFAULT_DEVICE": "cpu"}))
    check_structure(doc, {})
    assert {doc["services"][s]["environment"]["TRITON_INSTANCE_KIND"] for s in STAGE_NAMES} == {"KIND_CPU"}
    jsonschema.validate(doc, compose_schema())


def test_render_cli_compose_for_the_example_placement():
    out = subprocess.run([sys.executable, str(REPO / "deploy" / "render.py"), "compose", "--placement", str(EXAMPLE)],
                         capture_output=True, text=True, check=True, timeout=60).stdout
    assert yaml.safe_load(out) == to_compose(load_placement(env={}, path=EXAMPLE))


def test_render_cli_reports_a_bad_placement(tmp_path):
    bad = tmp_path / "p.yaml"
    bad.write_text("stages:\n  vocoder: {}\n")
    r = subprocess.run([sys.executable, str(REPO / "deploy" / "render.py"), "compose", "--placement", str(bad)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "unknown stage 'vocoder'" in r.stderr


# --- the seed-compatible fronts -------------------------------------------------------------------------

@pytest.mark.parametrize("name, decoupled, ports", SEED_FRONTS, ids=FRONTS)
@pytest.mark.parametrize("placement", [default_placement, lambda: load_placement(env={}, path=EXAMPLE)],
                         ids=["default", "example"])
def test_seed_front_is_a_tritonserver_of_the_gateway_image_on_its_own_ports(name, decoupled, ports, placement):
    placement = placement()
    doc = to_compose(placement)
    svc, gw = doc["services"][name], doc["services"]["gateway"]
    assert svc["image"] == gw["image"] and svc["build"] == gw["build"]
    assert svc["command"] == ["python", "/opt/cosyvoice/bin/seed_front.py"]
    http, grpc_, metrics = ports
    assert [(host_port(p), int(p.rsplit(":", 1)[1])) for p in svc["ports"]] == [(p, p) for p in ports]
    env = svc["environment"]
    assert env["SEED_DECOUPLED"] == ("true" if decoupled else "false")
    assert (env["TRITON_HTTP_PORT"], env["TRITON_GRPC_PORT"], env["TRITON_METRICS_PORT"]) == \
        (str(http), str(grpc_), str(metrics))
    # healthy = the front's Triton is ready, which needs its model (and so every stage) loaded
    assert svc["healthcheck"]["test"][:2] == ["CMD", "python3"]
    assert f"http://127.0.0.1:{http}/v2/health/ready" in svc["healthcheck"]["test"][-1]
    for stage in STAGE_NAMES:                                 # same stage replicas as the gateway
        key = f"{stage.upper()}_URLS"
        assert env[key] == gw["environment"][key]
        for host_and_port in env[key].split(","):
            assert host_and_port.split(":")[0] in compose_service_names(placement, stage)
            assert svc["depends_on"][host_and_port.split(":")[0]] == {"condition": "service_healthy"}
    assert env["REDIS_URL"] == gw["environment"]["REDIS_URL"]
    assert svc["depends_on"]["redis"] == {"condition": "service_healthy"}
    assert env["MODEL_DIR"] == gw["environment"]["MODEL_DIR"] and svc["volumes"] == gw["volumes"]   # same revision
    assert env["SEED_SPEAKER"] == "${SEED_SPEAKER:-001}"          # the seed's spk2info key, overridable
    assert {k for k in env if k.startswith("SEED_")} == {
        "SEED_DECOUPLED", "SEED_SPEAKER", "SEED_PROMPT_WAV", "SEED_PROMPT_TEXT", "SEED_LENGTH_FROM_TEXT",
        "SEED_LENGTH_K"}
    assert all(isinstance(v, str) for v in env.values())


def test_both_front_variants_are_in_the_checked_in_file_and_differ_only_in_mode_and_ports():
    services = checked_in()["services"]
    stream, offline = services["seed-stream"], services["seed-offline"]
    strip = {"SEED_DECOUPLED", "TRITON_HTTP_PORT", "TRITON_GRPC_PORT", "TRITON_METRICS_PORT"}
    assert {k: v for k, v in stream["environment"].items() if k not in strip} == \
        {k: v for k, v in offline["environment"].items() if k not in strip}
    assert (stream["environment"]["SEED_DECOUPLED"], offline["environment"]["SEED_DECOUPLED"]) == ("true", "false")
    assert "gateway" not in stream["depends_on"] and "gateway" not in offline["depends_on"]
