"""What can be checked of the deployment without a Docker engine (none runs here): the
compose file against the compose specification's schema, and the Dockerfile's own commands
run as a script into a fresh directory, then the image's CMD and HEALTHCHECK run from it."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.uvicorn_process import free_port
from tests.qc_fixtures import tiny_weights

REPO = Path(__file__).resolve().parents[1]
CHECK = Path(sys.executable).with_name("check-jsonschema")


def _validate_compose(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(CHECK), "--builtin-schema", "vendor.compose-spec", str(path)],
                          capture_output=True, text=True, timeout=120)


def test_the_compose_file_follows_the_compose_specification(tmp_path):
    assert _validate_compose(REPO / "docker-compose.yml").returncode == 0
    broken = tmp_path / "docker-compose.yml"
    broken.write_text((REPO / "docker-compose.yml").read_text().replace("  healthcheck:", "  healthchek:"))
    result = _validate_compose(broken)
    assert result.returncode != 0 and "healthchek" in result.stdout


def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    text = dockerfile.read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def _env_pairs(rest: str) -> dict[str, str]:
    return dict(item.split("=", 1) for item in shlex.split(rest))


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_dockerfile_commands_build_a_working_service(tmp_path):
    stages: list[list[tuple[str, str]]] = []
    for op, rest in _instructions(REPO / "Dockerfile"):
        if op == "FROM":
            stages.append([])
        stages[-1].append((op, rest))
    build, runtime = stages
    app = tmp_path / "app"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CERVIXQC_", "VIRTUAL_ENV", "UV_"))}
    if (REPO / ".tools/bin/uv").exists():  # the bootstrapped uv, so the build needs no network for it
        env["PATH"] = f"{REPO / '.tools/bin'}:{env['PATH']}"
    for op, rest in build[1:]:
        if op == "WORKDIR":
            app.mkdir(parents=True, exist_ok=True)
        elif op == "ENV":
            env.update(_env_pairs(rest))
            env["UV_LINK_MODE"] = "hardlink"  # same files; copying 5 GB of CUDA torch is only slower
            # no bytecode (uv's variable and the Makefile's): 35 of the install's 36 s here, and what
            # it buys is a faster start of the image, not a working one
            env.update(UV_COMPILE_BYTECODE="0", COMPILE_BYTECODE="")
        elif op == "COPY":
            *sources, _ = shlex.split(rest)
            for src in sources:
                (shutil.copytree if (REPO / src).is_dir() else shutil.copy2)(REPO / src, app / src)
        elif op == "RUN":
            if rest.startswith("apt-get"):
                assert shutil.which("make"), "the build stage installs make; this machine must have it"
                continue
            run = subprocess.run(["bash", "-c", rest], cwd=app, env=env, capture_output=True, text=True, timeout=500)
            assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    venv_bin = app / ".venv/bin"
    assert not (venv_bin / "pytest").exists(), "the image must not carry the dev tools"
    runtime_env = {k: v for k, v in env.items() if not k.startswith("UV_")}
    args: dict[str, str] = {}
    for op, rest in runtime:
        if op == "ARG":  # build arguments at their defaults (the default image, not DEVICE=cpu)
            name, _, default = rest.partition("=")
            args[name] = default
        if op == "ENV":  # the image's /app is this test's build folder
            values = _env_pairs(rest)
            for name, default in args.items():
                values = {k: v.replace(f"${{{name}}}", default).replace(f"${name}", default) for k, v in values.items()}
            runtime_env.update({k: v.replace("$PATH", env["PATH"]).replace("/app/", f"{app}/")
                                for k, v in values.items()})
        if op == "HEALTHCHECK":
            health_cmd = json.loads(rest[rest.index("CMD") + 3:].strip())
        if op == "CMD":
            cmd = json.loads(rest)
    assert runtime_env["PATH"].startswith(f"{venv_bin}:")
    runtime_env.update(CERVIXQC_WEIGHTS_DIR=str(tiny_weights(tmp_path / "weights", 0.05)),
                       CERVIXQC_STATE_DIR=str(tmp_path / "state"), CERVIXQC_QUARANTINE_ROOT=str(tmp_path / "q"),
                       CERVIXQC_HOST="127.0.0.1", CERVIXQC_PORT=str(port := free_port()),
                       CERVIXQC_API_KEYS="deploy-test-key-0123456789")
    elsewhere = tmp_path / "run"
    elsewhere.mkdir()  # not the build tree: the installed package must stand alone
    server = subprocess.Popen(cmd, cwd=elsewhere, env=runtime_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline, failures = time.time() + 180, []
        while time.time() < deadline and server.poll() is None:
            check = subprocess.run(health_cmd, cwd=elsewhere, env=runtime_env, capture_output=True, text=True)
            if check.returncode == 0:
                break
            failures.append(check.stderr)
            time.sleep(1)
        else:
            raise AssertionError(f"HEALTHCHECK never passed: {server.stdout.read().decode()[-3000:] if server.poll() is not None else 'still starting'}")
        # while the models load it says why it fails, for `docker inspect`'s health log
        assert failures and f"no answer from http://127.0.0.1:{port}/readyz" in failures[0], failures[:1]
    finally:
        server.terminate()
        server.wait(30)


def test_dependencies_install_in_a_layer_no_code_change_invalidates():
    build = []
    for op, rest in _instructions(REPO / "Dockerfile"):
        if op == "FROM" and build:
            break
        build.append((op, rest))
    first_install = next(i for i, (op, rest) in enumerate(build) if op == "RUN" and "make install" in rest)
    copied = [src for op, rest in build[:first_install] if op == "COPY" for src in shlex.split(rest)[:-1]]
    assert sorted(copied) == ["Makefile", "pyproject.toml", "uv.lock"]
    assert "--no-install-project" in build[first_install][1]


def _docker_ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule for simple patterns: the last pattern matching the path or one of its
    parent folders decides, and `!` re-includes."""
    import fnmatch

    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        if any(fnmatch.fnmatchcase(p, pattern.lstrip("!")) for p in prefixes):
            ignored = not negate
    return ignored


def test_the_build_context_leaves_out_environments_caches_and_data_and_keeps_the_shipped_weights():
    patterns = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    for path in (".venv/bin/python", ".cache/real-data/x.jpg", ".git/HEAD", ".tools/bin/uv", "tests/test_deploy.py",
                 "pipelines/__pycache__/cli.cpython-311.pyc", "weights/recipe.sh", "weights/data/hard_negatives.csv",
                 "secrets/api-keys", ".env", "results/job/results.csv", "quarantine/non_regular/a.jpg"):
        assert _docker_ignored(path, patterns), path
    shipped = [p.name for p in (REPO / "weights").iterdir()
               if p.suffix in (".json", ".safetensors", ".xml", ".bin") or p.name == "README.md"]
    for path in ["Makefile", "pyproject.toml", "uv.lock", "README.md", "service/app.py", "models/io.py",
                 "pipelines/engine/qc.py", *(f"weights/{n}" for n in shipped)]:
        assert not _docker_ignored(path, patterns), path
    assert "weights/detector.openvino.bin" in [f"weights/{n}" for n in shipped]


def test_every_compose_service_rotates_its_container_log():
    import yaml

    services = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]
    assert set(services) == {"cervixqc", "cervixqc-cpu"}
    for name, service in services.items():
        logging = service.get("logging", {})
        assert logging.get("driver") == "json-file", name
        assert logging["options"]["max-size"] and int(logging["options"]["max-file"]) >= 2, name


def test_the_image_check_refuses_an_engine_that_does_not_answer_and_leaves_nothing(tmp_path):
    """IMAGE_CHECK_ENGINE=docker without its daemon failed at the disk check with a broken `df`
    line, and a refusal left an empty work folder (an audit). `false` stands for an engine whose
    `info` fails."""
    work = tmp_path / "work"
    r = subprocess.run(["bash", str(REPO / "tests" / "deploy" / "image_check.sh")], capture_output=True, text=True,
                       timeout=120, env={**os.environ, "IMAGE_CHECK_ENGINE": "false", "IMAGE_CHECK_DIR": str(work)})
    assert r.returncode == 1 and "false is installed but does not answer ('false info' failed" in r.stdout, r.stdout
    assert "df:" not in r.stdout + r.stderr and not work.exists()
