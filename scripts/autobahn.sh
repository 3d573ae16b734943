#!/usr/bin/env bash
# WebSocket conformance: runs the Autobahn TestSuite's cases 1-7, 9 and 10
# (framing, pings, reserved bits and opcodes, fragmentation, UTF-8, closing,
# performance, auto-fragmentation) against the edge's own WebSocket reader,
# writer and size limit, served as an echo by the `echo` example of
# herald-edge. Cases 12 and 13 test compression, which the edge does not
# offer. The cases are driven by PyPI's `kosoku`, installed into a venv
# under the target directory.
#
#   scripts/autobahn.sh
#
# Prints a summary (results counted, the date, kosoku's version, the
# commit) to keep in docs/autobahn.md, and fails if any case ends FAILED or
# UNIMPLEMENTED. The report (index.json, one HTML page per case) stays in
# target/autobahn/report. Costs a release build of the example alone (a few
# minutes from nothing) and about a minute of cases.
set -euo pipefail
cd "$(dirname "$0")/.."

# Pinned, so that a new release of the suite cannot change the verdict unseen.
KOSOKU_VERSION=0.1.0
CASES=(1.* 2.* 3.* 4.* 5.* 6.* 7.* 9.* 10.*)
# The performance cases (9.*) send messages of up to 16 MiB.
MAX_MESSAGE_BYTES=20000000

target="${CARGO_TARGET_DIR:-target}"
work="$target/autobahn"
venv="$target/autobahn-venv"
report="$work/report"

fail() {
  echo "autobahn: FAILED: $*" >&2
  exit 1
}

echo "autobahn: building the echo example (release)"
cargo build --release -p herald-edge --example echo || fail "the release build of the echo example failed"

if ! "$venv/bin/python" -m pip show kosoku 2>/dev/null | grep -qx "Version: $KOSOKU_VERSION"; then
  echo "autobahn: installing kosoku $KOSOKU_VERSION from PyPI into $venv"
  python3 -m venv "$venv" || fail "could not create a Python venv in $venv (python3 with venv is needed)"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "kosoku==$KOSOKU_VERSION" ||
    fail "could not install kosoku $KOSOKU_VERSION from PyPI"
fi

rm -rf "$work"
mkdir -p "$work"
# Port 0: the echo picks a free port and prints where it listens.
"$target/release/examples/echo" --listen 127.0.0.1:0 --max-message-bytes "$MAX_MESSAGE_BYTES" \
  >"$work/echo.log" 2>&1 &
echo_pid=$!
trap 'kill "$echo_pid" 2>/dev/null || true' EXIT
addr=""
for _ in $(seq 100); do
  addr="$(grep -o '127\.0\.0\.1:[0-9]*' "$work/echo.log" | head -n 1 || true)"
  [ -n "$addr" ] && break
  kill -0 "$echo_pid" 2>/dev/null || fail "the echo server exited: $(cat "$work/echo.log")"
  sleep 0.1
done
[ -n "$addr" ] || fail "the echo server did not say where it listens within 10 s"
echo "autobahn: echo serving on $addr; running cases ${CASES[*]}"

includes=()
for c in "${CASES[@]}"; do includes+=(-i "$c"); done
started=$(date +%s)
# kosoku exits non-zero when a case fails; the verdict below reads the report.
"$venv/bin/kosoku" -m fuzzingclient "$addr" "${includes[@]}" -o "$report" -p 2 \
  >"$work/kosoku.log" 2>&1 || true
took=$(($(date +%s) - started))
[ -f "$report/index.json" ] || fail "kosoku wrote no report; its output: $(tail -n 20 "$work/kosoku.log")"

commit="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
if [ -n "$(git status --porcelain 2>/dev/null)" ]; then commit="$commit (with uncommitted changes)"; fi

status=0
"$venv/bin/python" - "$report/index.json" "$KOSOKU_VERSION" "$commit" "$took" <<'EOF' || status=$?
import collections, datetime, json, sys

path, version, commit, took = sys.argv[1:]
index = json.load(open(path))
cases = {case: r for agent in index.values() for case, r in agent.items()}
order = lambda case: [int(p) for p in case.split(".")]
# Passing results, best first; anything else (FAILED, UNIMPLEMENTED, and
# closes that are WRONG CODE, UNCLEAN, FAILED BY CLIENT) is a failure.
passing = ["OK", "INFORMATIONAL", "NON-STRICT"]
rank = lambda result: passing.index(result) if result in passing else len(passing)
counts = collections.Counter()
bad = []
noted = []
for case in sorted(cases, key=order):
    r = cases[case]
    # A case counts by the worse of its two results.
    worst = max(r["behavior"], r["behaviorClose"], key=rank)
    counts[worst] += 1
    line = f"  {case}: behavior {r['behavior']}, close {r['behaviorClose']} (remote close code {r.get('remoteCloseCode')})"
    if worst not in passing:
        bad.append(line)
    elif worst != "OK":
        noted.append(line)

print()
print(f"Autobahn cases 1-7, 9, 10 against the edge's echo: {len(cases)} cases")
print(f"  date {datetime.date.today().isoformat()}, kosoku {version}, commit {commit}, {took} s of cases")
shown = ["OK", "NON-STRICT", "INFORMATIONAL", "UNIMPLEMENTED", "FAILED"]
for result in shown + sorted(set(counts) - set(shown)):
    print(f"  {result:<14} {counts.get(result, 0)}")
if noted:
    print("Passed, but not plain OK:")
    print("\n".join(noted))
if bad:
    print("Failed:")
    print("\n".join(bad))
    sys.exit(1)
EOF
echo "autobahn: report in $report/index.html"
exit $status
