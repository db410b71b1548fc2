#!/usr/bin/env bash
# Runs every test of the workspace, real servers included. Installs what the
# tests need on a fresh machine (PostgreSQL's binaries); the tests start and
# stop their own servers on throwaway directories and free loopback ports.
set -euo pipefail
cd "$(dirname "$0")/.."

have_postgres() {
    compgen -G "/usr/lib/postgresql/*/bin/postgres" >/dev/null || command -v postgres >/dev/null
}

if ! have_postgres; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "installing PostgreSQL's binaries (the tests start their own server)"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
    else
        echo "PostgreSQL is needed by the tests: run 'sudo apt-get install -y postgresql'" >&2
        exit 1
    fi
fi

# The TLS tests make their certificates with the openssl command.
if ! command -v openssl >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssl >/dev/null
    else
        echo "openssl is needed by the TLS tests: run 'sudo apt-get install -y openssl'" >&2
        exit 1
    fi
fi

# Two cores: keep the build and the test threads within them.
export CARGO_BUILD_JOBS="${CARGO_BUILD_JOBS:-2}"
cargo test --workspace --all-features "$@"
