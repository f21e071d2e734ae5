#!/usr/bin/env bash
# Installs the outside tools a target needs when missing and the machine allows it (root with apt-get);
# otherwise says exactly what to install and fails. Arguments: the commands needed (default: every one
# the tests use: qemu-img, rsync, redis-server, faketime (libfaketime: a host agent with a skewed clock),
# and for the real QEMU guests: qemu-system-x86_64, busybox (static: the guest's userland), mkfs.ext4 and
# e2fsck (the guests' data disks), mkfs.fat, mcopy and syslinux (the guest's bootable disk), qemu-nbd and
# qemu-io (independent NBD peers), tcpdump (captures on the links between network namespaces:
# tests/test_tls_netns.py), chromium and chromedriver (the browser the console's tests drive with Selenium:
# tests/test_console_browser.py)). Also, as names that are not commands, what building and running the
# package's compiled parts need (sites/storage/xts_build.py, OpenSSL's AES-XTS, and datapath/writepath_build.py,
# the NBD write path, libc only; `make install` asks for
# them): gcc, libc-headers, openssl-headers, python-headers (those of $PYTHON, default python3) and
# libcrypto (OpenSSL 3's libcrypto.so.3).
set -euo pipefail
declare -A package=([qemu-img]=qemu-utils [rsync]=rsync [redis-server]=redis-server [faketime]=faketime
    [qemu-system-x86_64]=qemu-system-x86 [busybox]=busybox-static [mkfs.ext4]=e2fsprogs [e2fsck]=e2fsprogs
    [qemu-nbd]=qemu-utils [qemu-io]=qemu-utils [tcpdump]=tcpdump [mkfs.fat]=dosfstools [mcopy]=mtools
    [syslinux]=syslinux [chromium]=chromium [chromedriver]=chromium-driver [gcc]=gcc [libc-headers]=libc6-dev
    [openssl-headers]=libssl-dev [python-headers]=python3-dev [libcrypto]=libssl3)
# Whether a name that is not a command is there.
present() {
    case "$1" in
        libc-headers) [ -e /usr/include/stdio.h ] ;;
        openssl-headers) [ -e /usr/include/openssl/evp.h ] ;;
        python-headers) "${PYTHON:-python3}" -c 'import os, sysconfig, sys
sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' ;;
        # ldconfig lives in /sbin, which a non-root PATH may lack. (grep reads it all: no SIGPIPE under pipefail.)
        libcrypto) { command -v ldconfig >/dev/null && ldconfig -p || /sbin/ldconfig -p; } 2>/dev/null \
            | grep 'libcrypto\.so\.3 ' >/dev/null ;;
        # mkfs.ext4 and e2fsck live in /sbin, which a non-root PATH may lack.
        *) command -v "$1" >/dev/null || [ -x "/sbin/$1" ] || [ -x "/usr/sbin/$1" ] ;;
    esac
}
wanted=("$@")
[ ${#wanted[@]} -eq 0 ] && wanted=(qemu-img rsync redis-server faketime qemu-system-x86_64 busybox mkfs.ext4 e2fsck
    mkfs.fat mcopy syslinux qemu-nbd qemu-io tcpdump chromium chromedriver)
missing=()
for tool in "${wanted[@]}"; do
    [ -n "${package[$tool]:-}" ] || { echo "ensure-tools.sh: no package known for command '$tool'" >&2; exit 2; }
    present "$tool" || missing+=("${package[$tool]}")
done
# Two commands of one package are installed once.
mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u | sed '/^$/d')
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing ${missing[*]} with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    # --no-install-recommends: qemu-system-x86 would otherwise pull in a desktop's worth of packages.
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null 2>&1 \
        || { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}"; }
    exit 0
fi
echo "missing outside tools: ${missing[*]}. Install them, e.g. 'sudo apt-get install --no-install-recommends ${missing[*]}'" >&2
exit 1
