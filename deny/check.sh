#!/usr/bin/env bash
# Runs cargo-deny over the workspace: advisories against the database checked in under
# deny/advisory-db (nothing is fetched), and the licence, ban and source policy of
# deny.toml.
#
#   deny/check.sh              check this workspace (fails on any finding)
#   deny/check.sh --self-test  also prove the check is not vacuous: a scratch
#                                         crate pinned to h2 0.4.3 must be refused
#
# cargo-deny reads an advisory database as a git checkout under its db-path, in a
# directory named after the database URL. The checked-in files are copied into such a
# checkout in a temporary directory (a throwaway commit, so the tool can read it);
# nothing is fetched. cargo-deny's own `--frozen` keeps cargo metadata offline, so the
# crates must be in the local cache (`cargo fetch --locked`, done here). Needs
# `cargo deny` on PATH and git.
set -euo pipefail
cd "$(dirname "$0")/.."

self_test=false
case "${1:-}" in
    --self-test) self_test=true ;;
    "") ;;
    *) echo "usage: $0 [--self-test]" >&2; exit 2 ;;
esac

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT

# The directory cargo-deny derives from db-urls in deny.toml
# (https://github.com/rustsec/advisory-db): "<last path segment>-<xxhash64 of the URL>".
db="$scratch/dbs/advisory-db-3157b0e258782691"
mkdir -p "$db"
cp -R deny/advisory-db/. "$db/"
git -C "$db" init -q
git -C "$db" add -A
git -C "$db" -c user.name=isthmus-ci -c user.email=ci@isthmus.invalid \
    commit -q -m "checked-in RustSec advisories (see deny/advisory-db/README.md)"

export ISTHMUS_ADVISORY_DB_ROOT="$scratch/dbs"
cargo fetch -q --locked
echo "advisories: $(find deny/advisory-db/crates -name 'RUSTSEC-*.md' | wc -l) checked-in advisories"
cargo deny --frozen check

if $self_test; then
    crate="$scratch/vulnerable"
    mkdir -p "$crate/src"
    cat >"$crate/Cargo.toml" <<'TOML'
[package]
name = "advisory-self-test"
version = "0.0.0"
edition = "2021"
publish = false

[dependencies]
# Below the fixes of RUSTSEC-2024-0332 (0.4.4) and RUSTSEC-2026-0258 (0.4.16).
h2 = "=0.4.3"

[workspace]
TOML
    : >"$crate/src/lib.rs"
    cp deny.toml "$crate/deny.toml"
    log="$scratch/self-test.log"
    # Resolving and downloading h2 0.4.3 needs crates.io; the check itself is offline.
    cargo generate-lockfile -q --manifest-path "$crate/Cargo.toml"
    cargo fetch -q --locked --manifest-path "$crate/Cargo.toml"
    if cargo deny --frozen --manifest-path "$crate/Cargo.toml" check advisories >"$log" 2>&1; then
        cat "$log"
        echo "advisories self-test FAILED: h2 0.4.3 passed the advisory check" >&2
        exit 1
    fi
    for id in RUSTSEC-2024-0332 RUSTSEC-2026-0258; do
        if ! grep -q "$id" "$log"; then
            cat "$log"
            echo "advisories self-test FAILED: h2 0.4.3 was refused, but not for $id" >&2
            exit 1
        fi
    done
    echo "advisories self-test: h2 0.4.3 refused for RUSTSEC-2024-0332 and RUSTSEC-2026-0258"
fi
