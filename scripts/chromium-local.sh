#!/usr/bin/env bash
# chromium-local.sh — Debian's headless Chromium for the page tests (the HTML night report).
#
# Usage:
#   chromium-local.sh install                      # as root, idempotent: apt-get install -y chromium
#                                                  # when /usr/bin/chromium is missing (runs apt-get
#                                                  # update only if the install fails, e.g. empty lists)
#   chromium-local.sh screenshot URL OUT.png [WxH] # headless screenshot of URL (default 1400x1000),
#                                                  # with a fresh profile that is removed afterwards
#
# The browser runs with the flags that work as root in a container (FIELD-NOTES "Browsers for
# page tests"): no sandbox, no GPU, no first-run, no background networking, no component
# updates, no sync. Environment: CHROMIUM (default /usr/bin/chromium), CHROMIUM_TIMEOUT
# (seconds, default 60).
set -euo pipefail

CHROMIUM="${CHROMIUM:-/usr/bin/chromium}"
TIMEOUT="${CHROMIUM_TIMEOUT:-60}"

usage() {
  echo "usage: $0 install | screenshot URL OUT.png [WIDTHxHEIGHT]" >&2
  exit 2
}

install() {
  if [ -x "$CHROMIUM" ]; then
    return 0
  fi
  if [ "$(id -u)" != 0 ]; then
    echo "chromium-local: $CHROMIUM is missing and installing it needs root" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y chromium >&2 || { apt-get update >&2 && apt-get install -y chromium >&2; }
  [ -x "$CHROMIUM" ] || { echo "chromium-local: $CHROMIUM still missing after install" >&2; exit 1; }
}

screenshot() {
  [ $# -ge 2 ] || usage
  local url="$1" out="$2" size="${3:-1400x1000}"
  [[ "$size" =~ ^[0-9]+x[0-9]+$ ]] || { echo "chromium-local: size must be WIDTHxHEIGHT, not $size" >&2; exit 2; }
  [ -x "$CHROMIUM" ] || { echo "chromium-local: $CHROMIUM is not installed (run: $0 install)" >&2; exit 1; }
  PROFILE="$(mktemp -d "${TMPDIR:-/tmp}/chromium-profile.XXXXXX")"
  trap 'rm -rf "$PROFILE"' EXIT
  local out_abs
  out_abs="$(cd "$(dirname "$out")" && pwd)/$(basename "$out")"
  rm -f "$out_abs"
  timeout "$TIMEOUT" "$CHROMIUM" --headless --no-sandbox --disable-gpu --no-first-run \
    --disable-background-networking --disable-component-update --disable-sync \
    --hide-scrollbars --user-data-dir="$PROFILE" \
    --screenshot="$out_abs" --window-size="${size/x/,}" "$url" >&2
  [ -s "$out_abs" ] || { echo "chromium-local: no screenshot written to $out_abs" >&2; exit 1; }
  echo "$out_abs"
}

cmd="${1:-}"
shift || true
case "$cmd" in
  install) install ;;
  screenshot) screenshot "$@" ;;
  *) usage ;;
esac
