#!/usr/bin/env bash
# System packages the test suite needs beyond the Python venv, installed only when missing (idempotent):
#   docker-compose (Debian's 1.29: `docker-compose config` validates the compose file without a Docker engine),
#   nginx (the load balancer of the deployment, run as a local process by tests/deploy), curl, redis-server,
#   chromium + chromium-driver (tests/web drive the demo page in a real headless browser, Debian's build with its
#   matching driver: nothing is downloaded at run time), espeak-ng (speech for examples/voice) and sox (audio
#   durations measured independently of the example's own code).
# Debian/Ubuntu with apt; run as root (or with sudo available). Does nothing when everything is present.
set -euo pipefail

declare -A PKG_OF=([docker-compose]=docker-compose [nginx]=nginx-light [curl]=curl [redis-server]=redis-server
                   [chromium]=chromium [chromedriver]=chromium-driver [espeak-ng]=espeak-ng [sox]=sox)
missing=()
for cmd in "${!PKG_OF[@]}"; do
  command -v "$cmd" >/dev/null 2>&1 || [[ -x "/usr/sbin/$cmd" ]] || missing+=("${PKG_OF[$cmd]}")
done
if [[ ${#missing[@]} -eq 0 ]]; then
  exit 0
fi

SUDO=()
if [[ $(id -u) -ne 0 ]]; then
  command -v sudo >/dev/null 2>&1 || { echo "install-test-deps: need root or sudo to install: ${missing[*]}" >&2; exit 1; }
  SUDO=(sudo)
fi
command -v apt-get >/dev/null 2>&1 || { echo "install-test-deps: no apt-get; install these yourself: ${missing[*]}" >&2; exit 1; }

echo "install-test-deps: installing ${missing[*]}" >&2
# Package scripts must not start services (nginx on :80, redis) on this machine: tests start their own.
made_policy=0
if [[ ! -e /usr/sbin/policy-rc.d ]]; then
  printf '#!/bin/sh\nexit 101\n' | "${SUDO[@]}" tee /usr/sbin/policy-rc.d >/dev/null
  "${SUDO[@]}" chmod +x /usr/sbin/policy-rc.d
  made_policy=1
fi
trap '[[ $made_policy -eq 1 ]] && "${SUDO[@]}" rm -f /usr/sbin/policy-rc.d' EXIT
export DEBIAN_FRONTEND=noninteractive
"${SUDO[@]}" apt-get update -qq
"${SUDO[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
