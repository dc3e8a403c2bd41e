#!/usr/bin/env bash
# Installs the Debian tools the lab tests need (iptables/nftables for partitions, podman/runc/
# debootstrap for the image test; redis-server, redis-tools, sqlite3, socat and curl for the
# real-app tests and examples) when they are missing. Idempotent; never changes global podman
# settings (the tests point CONTAINERS_CONF at their own files). Without root or apt it says what
# is missing and exits 0: the tests that need those tools then fail with the same message.
set -euo pipefail
need=()
command -v iptables    >/dev/null 2>&1 || need+=(iptables)
command -v nft         >/dev/null 2>&1 || need+=(nftables)
command -v podman      >/dev/null 2>&1 || need+=(podman)
command -v runc        >/dev/null 2>&1 || need+=(runc)
command -v debootstrap >/dev/null 2>&1 || need+=(debootstrap)
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
command -v redis-cli   >/dev/null 2>&1 || need+=(redis-tools)
command -v socat       >/dev/null 2>&1 || need+=(socat)
command -v sqlite3     >/dev/null 2>&1 || need+=(sqlite3)
command -v curl        >/dev/null 2>&1 || need+=(curl)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "install-system-tools: missing ${need[*]}; run as root on Debian/Ubuntu to install them" >&2
    exit 0
fi
echo "install-system-tools: apt-get install ${need[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
