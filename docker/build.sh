#!/usr/bin/env bash
# Build the kdpipe image (CPU; the GPU one with --gpu) from wheels made on this machine, and
# push it to a registry the cluster can pull from; prints the `-S` settings that point a run
# at exactly the pushed images (by digest, so KFP's cache keys follow the image content, not
# a tag that can move).
#
#   docker/build.sh [REGISTRY] [TAG] [--no-push] [--local-base] [--gpu]
#   docker/build.sh ghcr.io/acme --gpu      # TAG defaults to the version in pyproject.toml
#   docker/build.sh --local-base --no-push  # kdpipe:TAG here, for `kdpipe run --runner kfp-docker`
#   DOCKER=podman docker/build.sh registry.example.com/ml 0.1.0 --gpu
#
#   --no-push     build and tag only (no REGISTRY needed: the tags are kdpipe[-gpu]:TAG)
#   --local-base  CPU image on a Debian bookworm made here (debootstrap, as root; cached as
#                 kdpipe-base:bookworm) instead of pulling python:3.11-slim
#   --gpu         also the GPU image (its base is NVIDIA's TensorRT image: pulled)
#
# Every image is also tagged kdpipe[-gpu]:TAG locally. Then a cluster run:
#   kdpipe submit --host URL -S kfp.cpu_image=... -S kfp.gpu_image=...
# Environment: DOCKER (the engine's client), PYTHON (a Python 3.11, for pip wheel; default
# .venv's), DEBIAN_MIRROR (for --local-base; default: the first one in /etc/apt/sources*).
set -euo pipefail

usage() {
    sed -n '2,20s/^# \{0,1\}//p' "$0"
}

push=1 local_base=0 gpu=0
args=()
for arg in "$@"; do
    case "$arg" in
        --no-push) push=0 ;;
        --local-base) local_base=1 ;;
        --gpu) gpu=1 ;;
        -h | --help) usage; exit 0 ;;
        -*) echo "build.sh: unknown option $arg" >&2; usage >&2; exit 2 ;;
        *) args+=("$arg") ;;
    esac
done
if [[ ${#args[@]} -gt 2 || (${#args[@]} -eq 0 && $push == 1) ]]; then
    usage >&2
    exit 2
fi

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
registry=${args[0]:-}
registry=${registry%/}
tag=${args[1]:-$(sed -n 's/^version = "\(.*\)"$/\1/p' "$root/pyproject.toml")}
docker=${DOCKER:-docker}
python=${PYTHON:-}
if [[ -z $python ]]; then
    if [[ -x $root/.venv/bin/python ]]; then python=$root/.venv/bin/python; else python=python3; fi
fi
base=kdpipe-base:bookworm
if [[ -z $tag ]]; then
    echo "build.sh: no TAG given and no version in pyproject.toml" >&2
    exit 2
fi

wheels=$root/build/wheelhouse
mkdir -p "$wheels"
# One build at a time (two test workers, two shells): they share the wheelhouse.
exec 9> "$root/build/.build.lock"
if command -v flock > /dev/null; then flock 9; fi

# The CPU image's Python (python:3.11-slim, bookworm's python3): the wheels are built for it.
image_python=3.11

# The wheelhouse: every runtime dependency as a wheel, resolved here against constraints.txt
# (so the image holds what CI tested; torch as the CPU build this machine's pip finds), made
# again only when constraints.txt or pyproject.toml change; kdpipe's own wheel every time.
# SOURCE_DATE_EPOCH fixes the wheel's timestamps: unchanged sources give the same bytes,
# and docker reuses its layers.
wheelhouse() {
    local version stamp
    version=$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
    if [[ $version != "$image_python" ]]; then
        echo "build.sh: $python is Python $version; the image's is $image_python, and" \
            "the wheels are built for it: set PYTHON to a Python $image_python" >&2
        exit 1
    fi
    stamp=$(cat "$root/constraints.txt" "$root/pyproject.toml" | sha256sum | cut -d' ' -f1)
    if [[ ! -f $wheels/deps.sha256 || $(cat "$wheels/deps.sha256") != "$stamp" ]]; then
        echo "==> wheelhouse: resolving the dependencies against constraints.txt" >&2
        rm -rf "$wheels/deps" "$wheels/deps.tmp" "$wheels/deps.sha256"
        "$python" -m pip wheel --quiet --constraint "$root/constraints.txt" \
            --wheel-dir "$wheels/deps.tmp" "$root"
        rm -f "$wheels"/deps.tmp/kdpipe-*.whl
        # The pins to install, named as the wheels name them (name-version-tags.whl).
        (cd "$wheels/deps.tmp" && ls -- *.whl | sed -E 's/^([^-]+)-([^-]+)-.*$/\1==\2/') \
            > "$wheels/requirements.txt"
        mv "$wheels/deps.tmp" "$wheels/deps"
        echo "$stamp" > "$wheels/deps.sha256"
    fi
    rm -rf "$wheels/kdpipe" "$root/build/lib" "$root"/build/bdist.*  # no stale modules
    SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-315532800} "$python" -m pip wheel --quiet \
        --no-deps --wheel-dir "$wheels/kdpipe" "$root"
}

# The Debian mirror apt uses here (deb822 URIs: or one-line deb entries), security excluded.
debian_mirror() {
    if [[ -n ${DEBIAN_MIRROR:-} ]]; then echo "$DEBIAN_MIRROR"; return; fi
    local found
    found=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.sources \
        /etc/apt/sources.list.d/*.list 2> /dev/null \
        | sed -n -E 's/^(URIs:|deb)[[:space:]]+(\[[^]]*\][[:space:]]+)?(https?:[^[:space:]]+).*/\3/p' \
        | grep -v -- '-security' | grep -m1 -i debian || true)
    echo "${found:-http://deb.debian.org/debian}"
}

# kdpipe-base:bookworm: a minimal Debian bookworm with python3 and venv, made with
# debootstrap (no registry needed) and imported; kept, so only the first build pays for it.
local_base_image() {
    if "$docker" image inspect "$base" > /dev/null 2>&1; then
        echo "==> $base: present" >&2
        return
    fi
    if ! command -v debootstrap > /dev/null; then
        echo "build.sh: --local-base needs debootstrap (apt-get install debootstrap)" >&2
        exit 1
    fi
    if [[ $EUID -ne 0 ]]; then
        echo "build.sh: --local-base runs debootstrap, which needs root" >&2
        exit 1
    fi
    local mirror
    mirror=$(debian_mirror)
    rootfs=$(mktemp -d "${TMPDIR:-/tmp}/kdpipe-rootfs.XXXXXX")
    echo "==> $base: debootstrap bookworm from $mirror" >&2
    debootstrap --variant=minbase --include=python3,python3-venv bookworm "$rootfs" \
        "$mirror" > "$rootfs.log" 2>&1 || { tail -n 20 "$rootfs.log" >&2; exit 1; }
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    tar -C "$rootfs" -c . | "$docker" import - "$base" > /dev/null
}
rootfs=
# --one-file-system: a debootstrap that failed half-way may leave /proc mounted in it.
trap '[[ -z $rootfs ]] || rm -rf --one-file-system "$rootfs" "$rootfs.log"' EXIT

now() { date +%s; }

started=$(now)
wheelhouse
echo "==> wheelhouse ready in $(($(now) - started)) s" >&2
if ((local_base)); then
    local_base_image
fi

declare -A refs
variants=(cpu)
((gpu)) && variants+=(gpu)
for variant in "${variants[@]}"; do
    build_args=()
    if [[ $variant == cpu ]]; then
        name=kdpipe file=docker/Dockerfile
        ((local_base)) && build_args=(--build-arg "BASE_IMAGE=$base")
    else
        name=kdpipe-gpu file=docker/Dockerfile.gpu
    fi
    image=${registry:+$registry/}$name:$tag
    tags=(--tag "$image")
    [[ $image != "$name:$tag" ]] && tags+=(--tag "$name:$tag")
    echo "==> building $image from $file" >&2
    begun=$(now)
    # Progress to stderr: stdout is the -S line only.
    "$docker" build --file "$root/$file" "${build_args[@]}" "${tags[@]}" "$root" >&2
    size=$("$docker" image inspect --format '{{.Size}}' "$image")
    echo "==> $image: built in $(($(now) - begun)) s, $((size / 1000000)) MB" >&2
    refs[$variant]=$image
    if ((push)); then
        echo "==> pushing $image" >&2
        "$docker" push "$image" >&2
        refs[$variant]=$("$docker" image inspect --format '{{index .RepoDigests 0}}' "$image")
    fi
done
echo "==> done in $(($(now) - started)) s" >&2

settings="-S kfp.cpu_image=${refs[cpu]}"
((gpu)) && settings+=" -S kfp.gpu_image=${refs[gpu]}"
echo "$settings"
