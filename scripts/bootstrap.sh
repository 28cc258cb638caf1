#!/usr/bin/env bash
# bootstrap.sh — make this checkout ready to run: system packages, npm dependencies (which builds
# native/ with node-gyp), TypeScript build.
#
# Usage: bash scripts/bootstrap.sh          (as root on Debian 12; idempotent)
#
# * Installs only the Debian packages that dpkg-query reports missing, with apt-get from the
#   configured Debian mirrors; a machine that has them all does no apt work.
# * Runs `npm ci` (registry: npm) unless node_modules already matches package-lock.json, package.json
#   and native/ sources (stamp in node_modules/.qcow2fuse-bootstrap), then `npm run build`.
# * Points node-gyp at the local Node headers (npm_config_nodedir) so nothing is downloaded from
#   nodejs.org; fails if they are absent rather than fetch them.
# * Checks /dev/fuse (loading the fuse module if needed) and warns loudly if FUSE is unavailable.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"

log() { printf '[bootstrap] %s\n' "$*" >&2; }
die() { printf '[bootstrap] ERROR: %s\n' "$*" >&2; exit 1; }

# Debian packages: FUSE 2 library (fuse-native) and fusermount; QEMU tools (the test oracle and the
# bench peers); filesystem/data tools used by tests and the demo; compilers and headers for native/
# and fs-ext (node-gyp needs python3, make, g++).
PACKAGES=(
  libfuse2 fuse3 libfuse3-dev
  qemu-utils qemu-system-common
  e2fsprogs fio util-linux jq kmod
  zlib1g-dev libzstd-dev libdeflate-dev pkg-config
  build-essential python3
)

installed() { [ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null)" = installed ]; }

missing=()
for pkg in "${PACKAGES[@]}"; do installed "$pkg" || missing+=("$pkg"); done
if [ ${#missing[@]} -gt 0 ]; then
  [ "$(id -u)" = 0 ] || die "missing Debian packages: ${missing[*]} — run this script as root to install them"
  log "installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}"
else
  log "system packages: all present"
fi

# FUSE: the kernel module may be built in or loadable; the device node must exist.
if [ ! -c /dev/fuse ]; then
  modprobe fuse 2>/dev/null || true
fi
if [ -c /dev/fuse ]; then
  log "/dev/fuse: present"
else
  log "WARNING: /dev/fuse is missing (modprobe fuse failed): mounts will not work; tests that mount fail under CI=true and skip otherwise"
fi

# Node: the project needs Node >= 20 (Debian 12's own nodejs is 18, so it cannot come from apt here).
command -v node >/dev/null || die "node not found: install Node.js >= 20 (e.g. the nodesource nodejs package)"
node_major=$(node -p 'process.versions.node.split(".")[0]')
[ "$node_major" -ge 20 ] || die "Node.js >= 20 required, found $(node --version)"
command -v npm >/dev/null || die "npm not found"

# node-gyp (for native/ and fs-ext) must use headers already on the machine.
if [ -z "${npm_config_nodedir:-}" ]; then
  node_prefix=$(dirname "$(dirname "$(readlink -f "$(command -v node)")")")
  node_version=$(node -p 'process.versions.node')
  if [ -f "$node_prefix/include/node/node_api.h" ]; then
    export npm_config_nodedir=$node_prefix
  elif [ -f "$HOME/.cache/node-gyp/$node_version/include/node/node_api.h" ]; then
    export npm_config_nodedir=$HOME/.cache/node-gyp/$node_version
  else
    die "no Node.js headers for $node_version under $node_prefix/include/node (node-gyp would download them); install the headers that belong to this Node"
  fi
fi
log "node $(node --version), npm $(npm --version 2>/dev/null), headers from $npm_config_nodedir"

stamp_file=node_modules/.qcow2fuse-bootstrap
stamp=$( { node --version; cat package.json package-lock.json; find native -maxdepth 1 -type f \( -name '*.c' -o -name '*.h' -o -name '*.gyp' \) -print0 | sort -z | xargs -0 -r cat; } | sha256sum | cut -d' ' -f1)
if [ -f "$stamp_file" ] && [ "$(cat "$stamp_file")" = "$stamp" ] && [ -n "$(find native/build -name '*.node' 2>/dev/null | head -1)" ]; then
  log "npm dependencies and native addon: up to date"
else
  log "npm ci (builds native/ via the install script)"
  npm ci --no-audit --no-fund
  echo "$stamp" > "$stamp_file"
fi

log "npm run build"
npm run build --silent
log "ready"
