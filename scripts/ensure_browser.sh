#!/usr/bin/env bash
# Provide Debian's Chromium and ChromeDriver for the dashboard's browser test (tests/test_browser.py).
# Called by `make test` (not by `make run`: the dashboard itself needs no browser on the server).
# Installs them with apt-get when they are missing and this user can install packages (root, or
# passwordless sudo); otherwise prints the one command to run and exits 1.
set -euo pipefail
CHROMIUM=/usr/bin/chromium
CHROMEDRIVER=/usr/bin/chromedriver
if [ -x "$CHROMIUM" ] && [ -x "$CHROMEDRIVER" ]; then
    exit 0
fi
if [ "${STRIDE_VIZ_SKIP_BROWSER:-}" = "1" ]; then
    echo "ensure_browser: Chromium missing; STRIDE_VIZ_SKIP_BROWSER=1, so the browser test will be skipped" >&2
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "ensure_browser: $CHROMIUM and $CHROMEDRIVER are missing and this is not a Debian-like system:" \
         "install Chromium and a matching ChromeDriver at those paths, or run with STRIDE_VIZ_SKIP_BROWSER=1" >&2
    exit 1
fi
if [ "$(id -u)" = "0" ]; then
    SUDO=""
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO="sudo -n"
else
    echo "ensure_browser: the browser test needs Chromium: run" \
         "'sudo apt-get update && sudo apt-get install -y chromium chromium-driver', then 'make test' again" >&2
    exit 1
fi
echo "ensure_browser: installing Debian's chromium and chromium-driver for the browser test" >&2
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium chromium-driver >/dev/null
for exe in "$CHROMIUM" "$CHROMEDRIVER"; do
    if [ ! -x "$exe" ]; then
        echo "ensure_browser: apt-get finished but $exe is still missing: install chromium and chromium-driver by hand" >&2
        exit 1
    fi
done
