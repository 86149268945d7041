#!/usr/bin/env bash
# Debian/Ubuntu packages the service (and with --tests, its tests) need; installs only what is missing.
set -euo pipefail

# Without arguments, what the service needs (`make run`): ffmpeg decodes audio and util-linux's
# setpriv ties it to the service's life. With --tests, also what the tests and benchmarks need
# (`make test`): the deployment's (real nginx, systemd-analyze, shellcheck, curl as the client,
# openssl for test certificates), the web page's (Debian's chromium, driven by Playwright through
# its path), the cluster mode's (Debian's redis-server and postgresql, started by the tests on
# loopback ports; on a systemd host Debian also starts their default services on localhost) and
# the benchmarks' (espeak-ng synthesises speech with known text, bench/peers.py).
packages=(ffmpeg util-linux)
case "${1:-}" in
  --tests)
    packages+=(curl nginx openssl systemd shellcheck espeak-ng redis-server postgresql)
    # Ubuntu has no chromium package: its chromium-browser installs the snap.
    # shellcheck source=/dev/null
    if (. /etc/os-release && [ "$ID" = ubuntu ]); then packages+=(chromium-browser); else packages+=(chromium); fi
    ;;
  "") ;;
  *) echo "usage: $0 [--tests]" >&2; exit 2 ;;
esac
# Ubuntu's python3 cannot make a virtualenv without python3-venv (no ensurepip).
python3 -c "import ensurepip" 2>/dev/null || packages+=(python3-venv)

missing=()
for package in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "ok installed" || missing+=("$package")
done
[ ${#missing[@]} -eq 0 ] && exit 0

sudo=""
[ "$(id -u)" -eq 0 ] || sudo=sudo
echo "installing system packages: ${missing[*]}"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
