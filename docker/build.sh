#!/usr/bin/env bash
# Build the kdpipe images (CPU and GPU) and push them to a registry the cluster can pull from;
# prints the `-S` settings that point a run at exactly the pushed images (by digest, so KFP's
# cache keys follow the image content, not a tag that can move).
#
#   docker/build.sh REGISTRY [TAG] [--no-push]
#   docker/build.sh ghcr.io/acme            # TAG defaults to the version in pyproject.toml
#   DOCKER=podman docker/build.sh registry.example.com/ml 0.1.0
#
# Then:  kdpipe submit --host URL -S kfp.cpu_image=... -S kfp.gpu_image=...
set -euo pipefail

usage() {
    sed -n '2,10s/^# \{0,1\}//p' "$0"
}

push=1
args=()
for arg in "$@"; do
    case "$arg" in
        --no-push) push=0 ;;
        -h | --help) usage; exit 0 ;;
        -*) echo "build.sh: unknown option $arg" >&2; usage >&2; exit 2 ;;
        *) args+=("$arg") ;;
    esac
done
if [[ ${#args[@]} -lt 1 || ${#args[@]} -gt 2 ]]; then
    usage >&2
    exit 2
fi

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
registry=${args[0]%/}
tag=${args[1]:-$(sed -n 's/^version = "\(.*\)"$/\1/p' "$root/pyproject.toml")}
docker=${DOCKER:-docker}
if [[ -z $tag ]]; then
    echo "build.sh: no TAG given and no version in pyproject.toml" >&2
    exit 2
fi

declare -A refs
for variant in cpu gpu; do
    if [[ $variant == cpu ]]; then
        name=kdpipe file=docker/Dockerfile
    else
        name=kdpipe-gpu file=docker/Dockerfile.gpu
    fi
    image="$registry/$name:$tag"
    echo "==> building $image from $file" >&2
    "$docker" build --file "$root/$file" --tag "$image" "$root"
    refs[$variant]=$image
    if ((push)); then
        echo "==> pushing $image" >&2
        "$docker" push "$image"
        refs[$variant]=$("$docker" image inspect --format '{{index .RepoDigests 0}}' "$image")
    fi
done

echo "-S kfp.cpu_image=${refs[cpu]} -S kfp.gpu_image=${refs[gpu]}"
