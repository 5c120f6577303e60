#!/usr/bin/env bash
# A newcomer's path, proved on every CI run: a NEW venv with the pip it comes with, a normal
# (non-editable) install of this clone, the README's first command run from the clone's root,
# every --help with no optional extra installed, a script saved in the clone using each launcher
# the base install has, and a dry-run resolve of every extra and of [all].
#   ./scripts/check_install.sh [VENV_DIR]     (default: a temporary directory, removed at the end)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
venv=${1:-$tmp/venv}
python3 -m venv "$venv"
py="$venv/bin/python"
step() { printf '\n== %s (%s)\n' "$1" "$(date -u +%H:%M:%S)"; }

step "base install: pip install . ($("$py" -m pip --version | cut -d' ' -f1-2))"
"$venv/bin/pip" install -q --disable-pip-version-check .

step "cylon-store demo, from the clone's root"
PATH="$venv/bin:$PATH" cylon-store demo

step "every --help without optional extras"
"$venv/bin/cylon-store" --help >/dev/null
for cmd in demo clean serve bench lambda "lambda build" "lambda deploy" "lambda local"; do
    # shellcheck disable=SC2086  # "lambda build" is two words on purpose
    "$venv/bin/cylon-store" $cmd --help >/dev/null || { echo "cylon-store $cmd --help failed"; exit 1; }
done
for mod in bench/*.py; do
    name=$(basename "$mod" .py)
    grep -q '__main__' "$mod" || continue  # helpers of `cylon-store bench`, not entries
    "$py" -m "cylon_store.bench.$name" --help >/dev/null || { echo "--help of cylon_store.bench.$name failed"; exit 1; }
done
echo "ok"

step "cylon-store bench from the base install: missing extras are one line each, no traceback"
out=$(mktemp -d)
"$venv/bin/cylon-store" bench --ranks 2 --repeat 1 --sizes 1MB --backends memory,redis,s3,mpi \
    --workloads latency,exchange --out "$out" >"$out/stdout" 2>"$out/stderr" \
    || { cat "$out/stdout" "$out/stderr"; echo "cylon-store bench failed"; exit 1; }
grep -q "skip redis: needs redis" "$out/stderr" && grep -q "skip s3: needs boto3" "$out/stderr" \
    && ! grep -q Traceback "$out/stderr" && [ -s "$out/results.json" ] && [ -s "$out/report.md" ] \
    || { cat "$out/stdout" "$out/stderr"; echo "cylon-store bench did not skip cleanly"; exit 1; }
rm -rf "$out"
echo "ok"

step "a script saved in the clone's root, every launcher of the base install"
script="$root/.check-install-$$.py"
trap 'rm -rf "$tmp" "$script"' EXIT
cat > "$script" <<'PY'
import cylon_store as cs
from cylon_store import kernel
import pyarrow as pa

def count(comm):
    t = pa.table({"k": list(range(comm.rank, 100, comm.world_size))})
    return comm.allreduce(kernel.unique(comm, t).num_rows)

for launcher in ("local", "threads"):
    for store in ("memory://", "file://" + __import__("tempfile").mkdtemp()):
        assert cs.launch(count, 3, store=store, launcher=launcher, timeout=120) == [100] * 3

# the shuffle service needs no extra: serve it, run the same job over flight://, stop it
import os, signal, subprocess, sys
env = dict(os.environ, CYLON_STORE_TOKEN="check-install")
svc = subprocess.Popen([sys.executable, "-m", "cylon_store.cli", "serve"], stdout=subprocess.PIPE,
                       text=True, env=env)
try:
    line = svc.stdout.readline().split()
    assert line[:1] == ["serving"], line
    os.environ["CYLON_STORE_TOKEN"] = "check-install"
    assert cs.launch(count, 3, store=line[1], launcher="local", timeout=120) == [100] * 3
finally:
    svc.send_signal(signal.SIGTERM)
    assert svc.wait(30) == 0
print("cylon_store imported from", cs.__file__)
PY
"$py" "$script"

step "dry-run resolve of each extra and of [all]"
for extra in s3 dynamodb redis mpi ucx lambda fsspec ray dask bench test all; do
    start=$(date +%s)
    "$venv/bin/pip" install -q --disable-pip-version-check --dry-run ".[$extra]" >/dev/null
    echo "[$extra] resolves ($(( $(date +%s) - start )) s)"
done
