#!/usr/bin/env bash
# Installs the outside tools a target needs when missing and the machine allows it (root with apt-get);
# otherwise says exactly what to install and fails. Arguments: the commands needed (default: every one
# the tests use: qemu-img, rsync, redis-server, faketime (libfaketime: a host agent with a skewed clock)).
set -euo pipefail
declare -A package=([qemu-img]=qemu-utils [rsync]=rsync [redis-server]=redis-server [faketime]=faketime)
wanted=("$@")
[ ${#wanted[@]} -eq 0 ] && wanted=(qemu-img rsync redis-server faketime)
missing=()
for tool in "${wanted[@]}"; do
    command -v "$tool" >/dev/null || missing+=("${package[$tool]}")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing ${missing[*]} with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq "${missing[@]}" >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq "${missing[@]}"; }
    exit 0
fi
echo "missing outside tools: ${missing[*]}. Install them, e.g. 'sudo apt-get install ${missing[*]}'" >&2
exit 1
