#!/usr/bin/env bash
# Installs qemu-img (qemu-utils) and rsync when missing and the machine allows it (root with apt-get);
# otherwise says exactly what to install and fails.
set -euo pipefail
missing=()
command -v qemu-img >/dev/null || missing+=(qemu-utils)
command -v rsync >/dev/null || missing+=(rsync)
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing ${missing[*]} with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq "${missing[@]}" >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq "${missing[@]}"; }
    exit 0
fi
echo "missing outside tools: ${missing[*]}. Install them, e.g. 'sudo apt-get install ${missing[*]}'" >&2
exit 1
