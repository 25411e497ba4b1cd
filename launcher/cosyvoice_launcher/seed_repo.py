"""Launcher side of the seed-compatible fronts: the numpy<2 interpreter their Python stub embeds, and the two
`cosyvoice2` model repositories rendered from the one template (the seed recipe's run.sh stage 2).

    python -m cosyvoice_launcher.seed_repo render --out DIR      # both repositories, from the environment
    python -m cosyvoice_launcher.seed_repo stub-env [--wheels .whl]
"""
from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from cosyvoice_common.contracts import SEED_MODEL
from cosyvoice_common.settings import from_env
from cosyvoice_common.stages import DEFAULT_REDIS_URL, STAGES
from cosyvoice_gateway.seed import SeedFrontSettings, template_params

from cosyvoice_launcher.placement import SEED_FRONTS
from cosyvoice_launcher.triton import PACKAGE_ROOTS, REPO_ROOT, render_model_repository

# --- the stub's interpreter environment (numpy < 2) ---------------------------------------------------------
# numpy<2 for BYTES; async-timeout for redis.asyncio when the stub's libpython is older than 3.11.3.
STUB_PACKAGES = ("numpy<2", "async-timeout")


def stub_environment(stub_bin: Path, base_env: Mapping[str, str]) -> dict[str, str]:
    """PATH (the numpy<2 environment first) and LD_LIBRARY_PATH for the front's tritonserver.

    The wheel's stub links `libpython3.X.so.1.0` and takes whichever the loader finds first (here the
    system's 3.11.2) while importing this interpreter's stdlib (3.11.7): extension modules such as `_ssl`
    then fail to load, and redis-py cannot be imported. This interpreter's own libpython goes first.
    """
    import sysconfig

    env = {"PATH": f"{stub_bin}{os.pathsep}{base_env.get('PATH', '')}"}
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    ldlibrary = sysconfig.get_config_var("INSTSONAME") or ""
    if libdir and ldlibrary and (Path(libdir) / ldlibrary).exists():
        rest = base_env.get("LD_LIBRARY_PATH", "")
        env["LD_LIBRARY_PATH"] = f"{libdir}{os.pathsep}{rest}" if rest else libdir
    return env


def ensure_stub_python(target: Path, wheel_dirs: Sequence[Path] = ()) -> Path:
    """A venv (no pip) whose site-packages holds numpy < 2 and a .pth onto this interpreter's import path.

    Put its `bin` first on the front tritonserver's PATH: the Python-backend stub then embeds this
    environment, so BYTES inputs arrive intact. Built once (a stamp file records the inputs); numpy
    comes from `wheel_dirs` (e.g. .whl/ on a machine without network) or the package index.
    Returns the `bin` directory.
    """
    target = Path(target).resolve()
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    own_paths = [p for p in sys.path if p.endswith(("site-packages", "dist-packages")) and not p.startswith(str(target))]
    pth_lines = [*(str(p) for p in PACKAGE_ROOTS), *own_paths]
    stamp_text = "\n".join([sys.version, *STUB_PACKAGES, *pth_lines])
    stamp = target / ".stub-env"
    if stamp.exists() and stamp.read_text() == stamp_text and (target / "bin" / "python").exists():
        return target / "bin"
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    subprocess.run(["rm", "-rf", str(tmp)], check=True)
    base_python = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base_python, "-m", "venv", "--without-pip", str(tmp)], check=True)
    tmp_site = tmp / "lib" / version / "site-packages"
    find_links = [arg for d in wheel_dirs if Path(d).is_dir() for arg in ("--find-links", str(d))]
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--only-binary=:all:",
                    "--target", str(tmp_site), *find_links, *STUB_PACKAGES], check=True)
    # Appended after the env's own site-packages: its numpy wins, everything else comes from ours.
    (tmp_site / "zz-cosyvoice-stack.pth").write_text("\n".join(pth_lines) + "\n")
    (tmp / ".stub-env").write_text(stamp_text)
    subprocess.run(["rm", "-rf", str(target)], check=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(tmp, target)
    except OSError:   # a parallel launcher won the race
        subprocess.run(["rm", "-rf", str(tmp)], check=True)
    return target / "bin"


def render_repositories(out_dir: Path, model_dir: Path, stage_urls: Mapping[str, str], redis_url: str,
                        settings: SeedFrontSettings) -> dict[str, Path]:
    """run.sh stage 2: the two `cosyvoice2` repositories (streaming, offline) from the one template."""
    template = REPO_ROOT / "services/gateway/model_repository"
    return {name: render_model_repository(template, Path(out_dir) / name,
                                          template_params(decoupled, model_dir, stage_urls, redis_url, settings))
            for name, decoupled, _ in SEED_FRONTS}


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m cosyvoice_launcher.seed_repo")
    sub = parser.add_subparsers(dest="command", required=True)
    render = sub.add_parser("render", help="render the streaming and offline cosyvoice2 repositories")
    render.add_argument("--out", type=Path, required=True)
    stub = sub.add_parser("stub-env", help="build the numpy<2 interpreter the fronts' Python stub embeds")
    stub.add_argument("--target", type=Path, default=Path("build/seed-stub-python"))
    stub.add_argument("--wheels", type=Path, action="append", default=[], help="a folder of wheels to install from")
    args = parser.parse_args(argv)
    if args.command == "stub-env":
        print(ensure_stub_python(args.target, args.wheels))
        return 0
    env = os.environ
    urls = {s.urls_env: env.get(s.urls_env, f"127.0.0.1:{s.ports().grpc}") for s in STAGES}
    model_dir = env.get("MODEL_DIR")
    if not model_dir:
        raise SystemExit("set MODEL_DIR (the model directory the fronts load the tokenizer and spk2info.pt from)")
    repos = render_repositories(args.out, Path(model_dir).resolve(), urls, env.get("REDIS_URL", DEFAULT_REDIS_URL),
                                from_env(SeedFrontSettings, env))
    for name, path in repos.items():
        print(f"{name}: {path / SEED_MODEL / 'config.pbtxt'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
