#!/bin/sh
# Debian packages the test suite drives for real: a headless browser, Redis, PostgreSQL,
# faketime (the scheduler tests run once more under a clock 400 days ahead), and Node.js
# with npm for the official ollama JavaScript library's tests; systemd-analyze verifies the unit.
set -eu
need=""
command -v chromium >/dev/null 2>&1 || need="$need chromium"
command -v chromedriver >/dev/null 2>&1 || need="$need chromium-driver"
command -v redis-server >/dev/null 2>&1 || need="$need redis-server"
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need="$need postgresql"
command -v faketime >/dev/null 2>&1 || need="$need faketime"
command -v npm >/dev/null 2>&1 || need="$need nodejs npm"
command -v systemd-analyze >/dev/null 2>&1 || need="$need systemd"
[ -z "$need" ] && exit 0
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
echo "installing Debian packages:$need"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends $need >/dev/null
