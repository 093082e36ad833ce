"""The container images, statically: each Dockerfile's shape (multi-stage, pinned registry base, numeric non-root
user, the right extras per target), its ENTRYPOINT against the console script and subcommand it names and against
what the chart and the operator run, and the build context that .dockerignore lets through; and that the CPU
engine never imports torch (a merge with torch made unimportable). The built images themselves are exercised by
tests/test_containers_e2e.py where a container engine is installed."""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from modelmerge.cli import build_parser
from modelmerge.contract import METHODS
from modelmerge_engine.precompile import DTYPES, SEED_ENV, SeededCacheLocator, required_examples
from tests.helpers.helm_chart import CHART, ROOT

IMAGES = {  # Dockerfile → (extra, the chart Deployment that runs it or None)
    "operator/Dockerfile": ("operator", "operator-deployment.yaml"),
    "api/Dockerfile": ("api", "api-deployment.yaml"),
    "merge_image/Dockerfile": ("engine", None),
}
# (Dockerfile, target) → the extras its virtualenv gets, in install order
TARGETS = {
    ("operator/Dockerfile", "operator"): ["operator"],
    ("api/Dockerfile", "api"): ["api"],
    ("merge_image/Dockerfile", "merge-cpu"): ["engine"],
    ("merge_image/Dockerfile", "merge"): ["engine", "engine,gpu,eval"],
}
FINAL_TARGET = {"operator/Dockerfile": "operator", "api/Dockerfile": "api", "merge_image/Dockerfile": "merge"}
RUN_AS = "10001"
SEED = "/opt/numba-cache"


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


def stage_named(dockerfile: Path, name: str) -> list[tuple[str, str]]:
    (stage,) = [s for s in stages(dockerfile) if s[0][1].split()[-1] == name]
    return stage


def lineage(dockerfile: Path, target: str) -> list[list[tuple[str, str]]]:
    """The stages a target is built from, itself last (FROM <earlier stage> followed within the file)."""
    chain = [stage_named(dockerfile, target)]
    names = {s[0][1].split()[-1] for s in stages(dockerfile)}
    while (parent := chain[0][0][1].split()[0]) in names:
        chain.insert(0, stage_named(dockerfile, parent))
    return chain


def effective(dockerfile: Path, target: str) -> list[tuple[str, str]]:
    """The instructions that shape a target's image: its lineage's, in order."""
    return [instruction for stage in lineage(dockerfile, target) for instruction in stage]


def entrypoint(dockerfile: Path) -> list[str]:
    path = str(dockerfile.relative_to(ROOT))
    (value,) = [rest for keyword, rest in effective(dockerfile, FINAL_TARGET[path]) if keyword == "ENTRYPOINT"]
    return json.loads(value)


def environment(instructions: list[tuple[str, str]]) -> dict[str, str]:
    """What the ENV instructions set, in order (NAME=value pairs, shell quoting)."""
    return dict(pair.split("=", 1) for keyword, rest in instructions if keyword == "ENV" for pair in shlex.split(rest))


def console_scripts() -> dict[str, str]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


@pytest.mark.parametrize("path,target", list(TARGETS))
def test_target_is_multi_stage_pinned_non_root_and_installs_its_extras_only(path, target):
    dockerfile = ROOT / path
    all_stages = stages(dockerfile)
    assert len(all_stages) >= 2, "multi-stage: a build stage and a runtime stage"
    base = build_args(dockerfile)["PYTHON_IMAGE"]
    assert re.fullmatch(r"docker\.io/library/python:3\.11\.\d+-slim-bookworm(@sha256:[0-9a-f]{64})?", base), base
    names = {stage[0][1].split()[-1] for stage in all_stages}
    assert all(stage[0][1].split()[0] in ("${PYTHON_IMAGE}", *names) for stage in all_stages), "every stage on the pin"
    runtime = effective(dockerfile, target)
    users = [rest for keyword, rest in runtime if keyword == "USER"]
    assert users and users[-1] == f"{RUN_AS}:{RUN_AS}", users
    # The runtime copies the virtualenv built for it and nothing else: no compilers, no pip cache, no sources;
    # the merge images also the numba kernels compiled for that virtualenv (test_merge_images_ship_...).
    copies = [rest for keyword, rest in runtime if keyword == "COPY"]
    assert re.fullmatch(r"--from=(\S+) /opt/venv /opt/venv", copies[0]), copies
    build_stage = copies[0].split()[0].removeprefix("--from=")
    assert copies[1:] == ([f"--from={build_stage} {SEED} {SEED}"] if path == "merge_image/Dockerfile" else []), copies
    runs = " ".join(rest for keyword, rest in effective(dockerfile, build_stage) if keyword == "RUN")
    installs = re.findall(r'pip install (?:--no-deps --no-build-isolation )?"\.\[([\w,]+)\]"', runs)
    assert installs == TARGETS[path, target], installs
    # Dependencies come from pyproject.toml's extra before the sources (a source change keeps that layer).
    assert re.findall(r"pip-install-deps\.sh (\w+)", runs) == TARGETS[path, target][:1]
    assert bool(re.search(r'pip install [^&]*"torch', runs)) == ("gpu" in ",".join(TARGETS[path, target]))


@pytest.mark.parametrize("target", ["merge-cpu", "merge"])
def test_merge_images_ship_kernels_precompiled_after_the_last_install_with_the_runtime_env_to_load_them(target):
    """numba's index is keyed on the engine's source stamps: the precompile runs after the virtualenv's last pip
    install (one that reinstalls the engine makes an earlier cache stale), into the folder the runtime copies from
    the same stage, then --verify fails the build if a kernel did not come from that cache. The runtime loads it
    through SeededCacheLocator (never as NUMBA_CACHE_DIR: read-only, numba would skip it), with the CPU target of
    the build, fixed on both sides (numba keys its cache on it; the build machine's CPU is not the nodes')."""
    dockerfile = ROOT / "merge_image/Dockerfile"
    runtime = effective(dockerfile, target)
    copies = [rest for keyword, rest in runtime if keyword == "COPY"]
    build_stage = copies[0].split()[0].removeprefix("--from=")
    build = effective(dockerfile, build_stage)
    runs = [i for i, (keyword, _) in enumerate(build) if keyword == "RUN"]
    installs = [i for i in runs if re.search(r"pip install|pip-install-deps", build[i][1])]
    precompile = "/opt/venv/bin/python -m modelmerge_engine.precompile $PRECOMPILE"
    (compiles,) = [i for i in runs if precompile in build[i][1]]
    assert compiles > installs[-1], "the kernels must be compiled after the last install"
    assert f"{precompile} --verify" in build[compiles][1]
    assert 'case "$PRECOMPILE" in ""|skip)' in build[compiles][1]  # an empty seed when skipped, still copied
    stage_args = [rest for keyword, rest in stage_named(dockerfile, build_stage) if keyword == "ARG"]
    assert {"PRECOMPILE", "NUMBA_CPU_NAME"} <= set(stage_args), stage_args
    at_build, at_runtime = environment(build[:compiles]), environment(runtime)
    assert at_build["NUMBA_CACHE_DIR"] == SEED and "NUMBA_CACHE_DIR" not in at_runtime
    target_cpu = {name: at_build[name] for name in ("NUMBA_CPU_NAME", "NUMBA_CPU_FEATURES")}
    assert target_cpu == {"NUMBA_CPU_NAME": "${NUMBA_CPU_NAME}", "NUMBA_CPU_FEATURES": ""}
    assert {name: at_runtime[name] for name in target_cpu} == target_cpu
    assert "NUMBA_CPU_NAME" in [rest for keyword, rest in stage_named(dockerfile, "runtime") if keyword == "ARG"]
    assert at_runtime[SEED_ENV] == SEED
    module, _, name = at_runtime["NUMBA_CACHE_LOCATOR_CLASSES"].rpartition(".")
    assert (module, name) == (SeededCacheLocator.__module__, SeededCacheLocator.__name__)


def test_release_precompile_covers_every_method_and_dtype_for_a_cpu_llvm_knows():
    """The default PRECOMPILE (release images): every method (no --methods), every dtype, 1-8 fine-tunes; and the
    default NUMBA_CPU_NAME is a processor this llvmlite knows (an unknown one is ignored with a warning: host
    code keyed on a name that means nothing)."""
    defaults = build_args(ROOT / "merge_image/Dockerfile")
    flags = dict(zip(*[iter(shlex.split(defaults["PRECOMPILE"]))] * 2, strict=True))
    assert flags == {"--max-models": "8", "--dtypes": ",".join(DTYPES)}, flags
    env = {**os.environ, "NUMBA_CPU_NAME": defaults["NUMBA_CPU_NAME"], "NUMBA_CPU_FEATURES": ""}
    compiled = subprocess.run([sys.executable, "-c", "import numba; print(numba.njit(lambda x: x + 1)(1))"],
                              capture_output=True, text=True, env=env)
    assert compiled.returncode == 0 and compiled.stdout == "2\n", compiled.stderr
    assert "not a recognized processor" not in compiled.stderr, compiled.stderr


def test_the_cpu_merge_image_carries_no_torch_and_the_gpu_one_does():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    requirement_names = {extra: {re.split(r"[<>=\[ ;]", r)[0].lower() for r in reqs} for extra, reqs in extras.items()}
    for extra in ("engine", "operator", "api"):
        assert "torch" not in requirement_names[extra], extra
    assert {"torch", "modelmerge"} <= requirement_names["gpu"]


@pytest.mark.parametrize("path", ["operator/Dockerfile", "api/Dockerfile", "merge_image/Dockerfile"])
def test_pip_gets_the_ca_bundle_only_as_a_build_secret(path):
    """The CA bundle of a TLS-intercepting proxy reaches pip through the `pip_cert` secret mount of the RUN that
    installs, never through COPY or ARG (which would leave it in a layer or the history)."""
    for keyword, rest in instructions(ROOT / path):
        downloads = "pip-install-deps.sh" in rest or re.search(r"pip install (?!--no-deps)", rest)
        if keyword == "RUN" and downloads:
            assert rest.startswith("--mount=type=secret,id=pip_cert "), rest
            uses_it = "pip-install-deps.sh" in rest or "PIP_CERT=/run/secrets/pip_cert" in rest
            assert uses_it, f"pip does not use the mounted secret: {rest}"
        assert not (keyword in ("COPY", "ADD", "ARG", "ENV") and re.search(r"cert|\.crt|\.pem", rest, re.I)), rest
    script = (ROOT / "hack" / "pip-install-deps.sh").read_text()
    assert "export PIP_CERT=/run/secrets/pip_cert" in script


@pytest.mark.parametrize("path", list(IMAGES))
def test_entrypoint_is_the_console_script_and_a_real_subcommand(path):
    argv = entrypoint(ROOT / path)
    assert argv[0] in console_scripts(), f"{argv[0]} is not a [project.scripts] entry"
    assert console_scripts()[argv[0]] == "modelmerge.cli:console"
    subcommand = argv[1]
    expected = {"operator": "operator", "api": "serve", "engine": "merge"}[IMAGES[path][0]]
    assert subcommand == expected
    assert build_parser().parse_args(argv[1:]).command == subcommand
    # The console script of this environment really runs the ENTRYPOINT (its --help).
    script = Path(sys.executable).parent / argv[0]
    result = subprocess.run([str(script), *argv[1:], "--help"], capture_output=True, text=True)
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




# torch made unimportable in a fresh interpreter, then the CLI run as the merge image runs it.
NO_TORCH = """
import sys
class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError(f"torch is not installed in the CPU merge image (import of {name})")
sys.meta_path.insert(0, NoTorch())
from modelmerge.cli import main
code = main(sys.argv[1:])
assert not [m for m in sys.modules if m == "torch" or m.startswith("torch.")], "torch was imported"
sys.exit(code)
"""


@pytest.fixture(scope="module")
def tiny_family(tmp_path_factory):
    from tests.helpers.models import make_family

    return make_family(tmp_path_factory.mktemp("family"), n=2)


def merge_without_torch(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", NO_TORCH, "merge", "--progress", "lines", *args],
                          capture_output=True, text=True, cwd=ROOT)


@pytest.mark.parametrize("method", list(METHODS))
def test_cpu_engine_merges_without_torch(tiny_family, tmp_path, method):
    """What the CPU merge image (the `engine` extra, no torch) runs, here with torch unimportable: every method
    merges, and the output is byte-identical to the same merge in this environment (where torch exists)."""
    base, finetunes = tiny_family
    fewest, most = METHODS[method].models  # passthrough and slerp take one model, the others two here
    finetunes = finetunes[:max(fewest, min(len(finetunes), most or len(finetunes)))]
    flags = ["--base-model", str(base), "--models-to-merge", ",".join(map(str, finetunes)), "--merge-method", method]
    for name, value in required_examples(method).items():  # slerp's t
        flags += [f"--{name.replace('_', '-')}", str(value)]
    if method == "mask_merging":
        flags += ["--weight-mask-rates", "0.5,0.5", "--mask-strategy", "magnitude"]
    result = merge_without_torch(*flags, "--output-dir", str(tmp_path / "no-torch"))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.splitlines()[-1])["status"] == "succeeded"
    reference = subprocess.run([sys.executable, "-m", "modelmerge.cli", "merge", "--progress", "none", *flags,
                                "--output-dir", str(tmp_path / "reference")], capture_output=True, text=True)
    assert reference.returncode == 0, reference.stderr
    shards = sorted(p.name for p in (tmp_path / "reference").glob("*.safetensors"))
    assert shards and shards == sorted(p.name for p in (tmp_path / "no-torch").glob("*.safetensors"))
    for name in shards:
        assert (tmp_path / "no-torch" / name).read_bytes() == (tmp_path / "reference" / name).read_bytes(), name


def test_use_gpu_without_torch_names_the_missing_extra(tiny_family, tmp_path):
    """use_gpu in the CPU merge image (no torch) fails with a message saying what to install, and leaves nothing."""
    base, finetunes = tiny_family
    output = tmp_path / "merged"
    result = merge_without_torch("--base-model", str(base), "--models-to-merge", ",".join(map(str, finetunes)),
                                 "--merge-method", "task_arithmetic", "--use-gpu", "--output-dir", str(output))
    assert result.returncode == 1, result.stderr
    summary = json.loads(result.stdout.splitlines()[-1])
    assert summary["status"] == "failed"
    assert "use_gpu needs torch" in summary["error"] and "'gpu' extra" in summary["error"], summary["error"]
    assert not output.exists() and not list(tmp_path.glob(".merged*"))
