#!/usr/bin/env bash
# What the full test suite needs from the system, beside Python and make: a PostgreSQL server
# (the robustness tests start one on loopback), SLURM with munge (the cluster tests run workers as a
# job array on a one-node cluster) and Chromium (the MLflow UI test opens the run table headless).
# Installed with apt-get when they are missing and this user may (root, or sudo without a password);
# otherwise one line names what to install and how, and the exit status is 1.
# SYSDEPS_ROOT (tests only) looks for the programs below another root folder.
set -euo pipefail
R="${SYSDEPS_ROOT:-}"
missing=()
have() { for path in "$@"; do [ -x "$path" ] && return 0; done; return 1; }
have "$R"/usr/lib/postgresql/*/bin/initdb "$R/usr/bin/initdb" "$R/usr/local/bin/initdb" || missing+=(postgresql)
have "$R/usr/sbin/slurmctld" "$R/usr/bin/slurmctld" || missing+=(slurm-wlm)
have "$R/usr/sbin/munged" "$R/usr/bin/munged" || missing+=(munge)
have "$R/usr/bin/chromium" || missing+=(chromium)
[ ${#missing[@]} -eq 0 ] && exit 0

if ! command -v apt-get >/dev/null 2>&1; then
    echo "make test: missing ${missing[*]} (no apt-get here: install them with your system's package manager)" >&2
    exit 1
fi
if [ "$(id -u)" -eq 0 ]; then
    as=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true >/dev/null 2>&1; then
    as=(sudo -n)
else
    echo "make test: missing ${missing[*]}: install them with 'sudo apt-get update && sudo apt-get install -y ${missing[*]}'" >&2
    exit 1
fi
echo "make test: installing ${missing[*]} (apt-get)" >&2
export DEBIAN_FRONTEND=noninteractive
"${as[@]}" apt-get update -qq >/dev/null
"${as[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
