"""The container images, as far as they can be checked without a Docker engine: each Dockerfile's shape (multi-stage,
pinned base, numeric non-root user, the right extra), its ENTRYPOINT against the console script and subcommand it
names and against what the chart and the operator run, the build context that .dockerignore lets through, and —
in throwaway virtual environments built from that context exactly as the build stages do — that the operator and
API dependency sets import and start without torch."""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from modelmerge.cli import build_parser
from tests.helpers.helm_chart import CHART, ROOT

IMAGES = {  # Dockerfile → (extra, the chart Deployment that runs it or None)
    "operator/Dockerfile": ("operator", "operator-deployment.yaml"),
    "api/Dockerfile": ("api", "api-deployment.yaml"),
    "merge_image/Dockerfile": ("engine", None),
}
RUN_AS = "10001"


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    current = ""
    for line in dockerfile.read_text().splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        current += " " + stripped.rstrip("\\").strip() if current else stripped.rstrip("\\").strip()
        if not stripped.endswith("\\"):
            keyword, _, rest = current.partition(" ")
            out.append((keyword.upper(), rest.strip()))
            current = ""
    return out


def stages(dockerfile: Path) -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for keyword, rest in instructions(dockerfile):
        if keyword == "FROM":
            result.append([])
        if result:
            result[-1].append((keyword, rest))
    return result


def build_args(dockerfile: Path) -> dict[str, str]:
    """Global ARG defaults (before the first FROM)."""
    found = {}
    for keyword, rest in instructions(dockerfile):
        if keyword == "FROM":
            break
        if keyword == "ARG" and "=" in rest:
            name, value = rest.split("=", 1)
            found[name] = value.strip('"')
    return found


def entrypoint(dockerfile: Path) -> list[str]:
    final = stages(dockerfile)[-1] if "merge_image" not in str(dockerfile) else _stage(dockerfile, "merge")
    (value,) = [rest for keyword, rest in final if keyword == "ENTRYPOINT"]
    return json.loads(value)


def _stage(dockerfile: Path, name: str) -> list[tuple[str, str]]:
    (stage,) = [s for s in stages(dockerfile) if s[0][1].split()[-1] == name]
    return stage


def console_scripts() -> dict[str, str]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


@pytest.mark.parametrize("path", list(IMAGES))
def test_dockerfile_is_multi_stage_pinned_non_root_and_installs_its_extra_only(path):
    dockerfile = ROOT / path
    extra, _ = IMAGES[path]
    all_stages = stages(dockerfile)
    assert len(all_stages) >= 2, "multi-stage: a build stage and a runtime stage"
    base = build_args(dockerfile)["PYTHON_IMAGE"]
    assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm(@sha256:[0-9a-f]{64})?", base), base
    assert all(stage[0][1].split()[0] in ("${PYTHON_IMAGE}",) for stage in all_stages), "every stage on the pin"
    runtime = all_stages[-1] if extra != "engine" else _stage(dockerfile, "merge")
    users = [rest for keyword, rest in runtime if keyword == "USER"]
    assert users and users[-1] == f"{RUN_AS}:{RUN_AS}", users
    runs = " ".join(rest for stage in all_stages for keyword, rest in stage if keyword == "RUN")
    installs = re.findall(r'pip install "\.\[(\w+)\]"', runs)
    assert installs == [extra], installs
    # The runtime stage copies the built virtualenv only: no compilers, no pip cache, no sources.
    copies = [rest for keyword, rest in runtime if keyword == "COPY"]
    assert copies == ["--from=build /opt/venv /opt/venv"], copies


@pytest.mark.parametrize("path", list(IMAGES))
def test_entrypoint_is_the_console_script_and_a_real_subcommand(path):
    argv = entrypoint(ROOT / path)
    assert argv[0] in console_scripts(), f"{argv[0]} is not a [project.scripts] entry"
    assert console_scripts()[argv[0]] == "modelmerge.cli:main"
    subcommand = argv[1]
    expected = {"operator": "operator", "api": "serve", "engine": "merge"}[IMAGES[path][0]]
    assert subcommand == expected
    assert build_parser().parse_args(argv[1:]).command == subcommand
    # The console script of this environment really runs the ENTRYPOINT (its --help).
    script = Path(sys.executable).parent / argv[0]
    result = subprocess.run([str(script), *argv[1:], "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and f"usage: modelmerge {subcommand}" in result.stdout, result.stderr


@pytest.mark.parametrize("path", ["operator/Dockerfile", "api/Dockerfile"])
def test_chart_runs_the_image_entrypoint(path):
    template = (CHART / "templates" / IMAGES[path][1]).read_text()
    (command,) = re.findall(r"command: (\[.*\])", template)
    assert yaml.safe_load(command) == entrypoint(ROOT / path)


def test_operator_runs_the_merge_image_entrypoint():
    from modelmerge_operator.config import OperatorConfig
    from modelmerge_operator.manifests import RUN_AS as OPERATOR_RUN_AS

    assert [*OperatorConfig().merge_command, "merge"] == entrypoint(ROOT / "merge_image/Dockerfile")
    assert str(OPERATOR_RUN_AS) == RUN_AS
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert str(values["podSecurityContext"]["runAsUser"]) == RUN_AS


def test_exposed_ports_match_the_chart():
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    expose = {path: [rest for keyword, rest in stages(ROOT / path)[-1] if keyword == "EXPOSE"] for path in
              ("operator/Dockerfile", "api/Dockerfile")}
    assert expose == {"operator/Dockerfile": [str(values["operator"]["livenessPort"])],
                      "api/Dockerfile": [str(values["api"]["port"])]}


def dockerignore_allows(relative: str) -> bool:
    """Docker's rule: the last matching pattern wins; `!` re-includes."""
    allowed = True
    for raw in (ROOT / ".dockerignore").read_text().splitlines():
        pattern = raw.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        parts = relative.split("/")
        prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
        matched = any(fnmatch.fnmatchcase(p, pattern) for p in prefixes)
        if pattern.startswith("**/"):
            matched = matched or any(fnmatch.fnmatchcase(part, pattern[3:]) for part in parts)
        if matched:
            allowed = negate
    return allowed


def context_sources(dockerfile: Path) -> list[str]:
    """The repository paths the build stage COPYs from the context."""
    sources = []
    for keyword, rest in stages(dockerfile)[0]:
        if keyword == "COPY" and not rest.startswith("--from"):
            sources.extend(rest.split()[:-1])
    return sources


@pytest.mark.parametrize("path", list(IMAGES))
def test_build_context_has_what_the_build_copies_and_nothing_else(path):
    for source in context_sources(ROOT / path):
        assert (ROOT / source).exists(), source
        for file in ([ROOT / source] if (ROOT / source).is_file() else (ROOT / source).rglob("*.py")):
            assert dockerignore_allows(str(file.relative_to(ROOT))), f"{file} is excluded by .dockerignore"
    for excluded in (".venv/bin/python", ".git/HEAD", "tests/test_rbac.py", "bench/bench_engine.py",
                     "charts/modelmerge/values.yaml", "modelmerge/__pycache__/cli.cpython-311.pyc"):
        assert not dockerignore_allows(excluded), excluded
    assert dockerignore_allows("tests/helpers/models.py")  # the kind e2e fixture image makes tiny models with it


def _copy_context(dockerfile: Path, dest: Path) -> Path:
    """The build stage's /src: what its COPY lines take from the context (minus caches)."""
    for source in context_sources(dockerfile):
        target = dest / source
        if (ROOT / source).is_dir():
            shutil.copytree(ROOT / source, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / source, target)
    return dest


CHECKS = {
    "operator": ("import importlib.util, sys, modelmerge_operator.handlers, modelmerge_operator.main, kopf; "
                 "assert importlib.util.find_spec('torch') is None; assert 'torch' not in sys.modules"),
    "api": ("import importlib.util, sys, modelmerge_api.app, modelmerge_api.kube, modelmerge_api.server, uvicorn; "
            "assert importlib.util.find_spec('torch') is None; assert 'torch' not in sys.modules"),
}


@pytest.mark.parametrize("extra", ["operator", "api"])
def test_dependency_set_imports_and_starts_without_torch(extra, tmp_path):
    """What the build stage does, in a throwaway venv: `pip install ".[<extra>]"` from the copied context, then the
    image's imports and its ENTRYPOINT's --help. Uses pip's cache; skipped when no package index is reachable."""
    dockerfile = ROOT / f"{extra}/Dockerfile"
    src = _copy_context(dockerfile, tmp_path / "src")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    env.pop("PYTHONPATH", None)
    install = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", f"{src}[{extra}]"], capture_output=True,
                             text=True, timeout=600, env=env)
    if install.returncode != 0:
        if re.search(r"No matching distribution|Could not find a version|NewConnectionError|Network is unreachable"
                     r"|Temporary failure in name resolution", install.stderr):
            pytest.skip(f"no package index reachable: {install.stderr.strip().splitlines()[-1]}")
        raise AssertionError(install.stderr)
    clean_env = {**env, "PATH": f"{venv / 'bin'}:{os.environ['PATH']}"}
    subprocess.run([str(venv / "bin" / "python"), "-c", CHECKS[extra]], check=True, timeout=120, cwd=tmp_path,
                   env=clean_env)
    argv = entrypoint(dockerfile)
    result = subprocess.run([str(venv / "bin" / argv[0]), *argv[1:], "--help"], capture_output=True, text=True,
                            timeout=120, cwd=tmp_path, env=clean_env)
    assert result.returncode == 0 and f"usage: modelmerge {argv[1]}" in result.stdout, result.stderr
    frozen = subprocess.run([str(venv / "bin" / "pip"), "freeze"], capture_output=True, text=True, check=True,
                            env=env).stdout.lower()
    assert not re.search(r"^(torch|transformers|safetensors|nvidia-)", frozen, re.M), frozen
    other = {"operator": ("fastapi", "uvicorn"), "api": ("kopf",)}[extra]
    assert not any(re.search(rf"^{name}==", frozen, re.M) for name in other), frozen
