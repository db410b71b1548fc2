#!/usr/bin/env bash
# Runs every test of the workspace, real servers included. Installs what the
# tests need on a fresh machine (PostgreSQL, Redis and etcd binaries, protoc);
# the tests start and stop their own servers on throwaway directories and free
# loopback ports.
set -euo pipefail
cd "$(dirname "$0")/.."

# Installs the Debian packages named after the command when it is missing;
# without root or apt, says what to run and stops.
need() {
    local what=$1 check=$2
    shift 2
    if eval "$check" >/dev/null 2>&1; then
        return
    fi
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "installing $what ($*): the tests start their own servers"
        if [ -z "${UPSILON_APT_UPDATED:-}" ]; then
            apt-get update -qq
            UPSILON_APT_UPDATED=1
        fi
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
    else
        echo "$what is needed by the tests: run 'sudo apt-get install -y $*'" >&2
        exit 1
    fi
}

need "PostgreSQL's binaries" 'compgen -G "/usr/lib/postgresql/*/bin/postgres" || command -v postgres' postgresql
# The TLS tests make their certificates with the openssl command.
need openssl 'command -v openssl' openssl
need redis-server 'command -v redis-server' redis-server
need etcd 'command -v etcd && command -v etcdctl' etcd-server etcd-client
# etcd-client compiles etcd's .proto files at build time.
need protoc 'command -v protoc' protobuf-compiler

# Two cores: keep the build and the test threads within them.
export CARGO_BUILD_JOBS="${CARGO_BUILD_JOBS:-2}"
cargo test --workspace --all-features "$@"
