#!/usr/bin/env bash
# End-to-end self-test of the Node interop harness, with Node only: server.js (the real
# @cryb/mesa 1.5.8 server) and both upstream clients (client.js: @cryb/mesa's Node
# Client as "alice"; browser-client.js: mesa-js-client 1.4.8 as "bob").
# Checks: hello, heartbeats answered and the connections kept, authenticate() resolving
# with {"id":...}, ECHO, global and targeted BROADCAST, a server-side send, and both
# clients reconnecting after server.js is stopped and restarted on the same port.
# Usage: tests/node/selftest.sh   (after `npm ci` in tests/node). Exit 0 = pass.
# SELFTEST_KEEP=1 keeps the logs directory.
set -euo pipefail

cd "$(dirname "$0")"

# Bound the whole run; GNU timeout signals the whole process group, background nodes too.
if [ -z "${MESA_SELFTEST_BOUNDED:-}" ]; then
  MESA_SELFTEST_BOUNDED=1 exec timeout --kill-after=5 120 bash "$0" "$@"
fi

if [ ! -d node_modules/@cryb/mesa ] || [ ! -d node_modules/mesa-js-client ]; then
  echo "selftest: node_modules missing; run 'npm ci' in tests/node first" >&2
  exit 2
fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/mesa-node-selftest.XXXXXX")
PIDS=()
STATUS=1

cleanup() {
  local pid
  for pid in "${PIDS[@]}"; do
    kill "$pid" 2>/dev/null || true
  done
  wait 2>/dev/null || true
  if [ "$STATUS" -ne 0 ] || [ -n "${SELFTEST_KEEP:-}" ]; then
    echo "selftest: logs kept in $WORK" >&2
  else
    rm -rf "$WORK"
  fi
}
trap cleanup EXIT

fail() {
  echo "selftest: FAIL: $*" >&2
  local f
  for f in "$WORK"/*.out "$WORK"/*.err; do
    [ -s "$f" ] || continue
    echo "----- $f (last 30 lines, heartbeats left out)" >&2
    grep -vF '"event":"heartbeat' "$f" | tail -n 30 >&2 || true
  done
  exit 1
}

step() { echo "selftest: $*"; }

count() { # FILE FIXED-STRING -> number of lines containing it
  grep -cF -- "$2" "$1" 2>/dev/null || true
}

wait_for() { # FILE FIXED-STRING [MIN-COUNT] [SECONDS]
  local file=$1 pattern=$2 min=${3:-1} seconds=${4:-10}
  local deadline=$((SECONDS + seconds))
  while [ "$(count "$file" "$pattern")" -lt "$min" ]; do
    [ "$SECONDS" -lt "$deadline" ] || fail "timed out waiting for $min x '$pattern' in $(basename "$file")"
    sleep 0.05
  done
}

assert_absent() { # FILE FIXED-STRING WHAT
  [ "$(count "$1" "$2")" -eq 0 ] || fail "$3: found '$2' in $(basename "$1")"
}

PORT=$(node -e 'const s = require("net").createServer().listen(0, "127.0.0.1", () => { console.log(s.address().port); s.close() })')
URL="ws://127.0.0.1:$PORT"
OPTIONS='{"heartbeat":{"enabled":true,"interval":500,"maxAttempts":3},"reconnect":{"enabled":true,"interval":500}}'
step "port $PORT, options $OPTIONS, logs in $WORK"

# Each process reads its commands from a FIFO that this script keeps open on an fd.
start_server() { # NAME STDIN
  node server.js "$PORT" "$OPTIONS" < "$2" > "$WORK/$1.out" 2> "$WORK/$1.err" &
  SERVER_PID=$!
  PIDS+=("$SERVER_PID")
}

mkfifo "$WORK/server1.in" "$WORK/alice.in" "$WORK/bob.in"

start_server server1 "$WORK/server1.in"
exec 5> "$WORK/server1.in"
wait_for "$WORK/server1.out" "{\"event\":\"listening\",\"port\":$PORT}"
step "server listening"

node client.js "$URL" < "$WORK/alice.in" > "$WORK/alice.out" 2> "$WORK/alice.err" &
ALICE_PID=$!
PIDS+=("$ALICE_PID")
exec 6> "$WORK/alice.in"
node browser-client.js "$URL" < "$WORK/bob.in" > "$WORK/bob.out" 2> "$WORK/bob.err" &
BOB_PID=$!
PIDS+=("$BOB_PID")
exec 7> "$WORK/bob.in"
alice() { echo "$1" >&6; }
bob() { echo "$1" >&7; }

# Connected and hello. Commands are sent only after "connected": upstream's own queue of
# sends made before the socket opens crashes the Node client and is dropped by
# mesa-js-client.
HELLO='{"event":"hello","d":{"c_heartbeat_interval":500,"c_reconnect_interval":500,"c_authentication_timeout":10000,"rules":["sends_user_object"]}}'
for who in alice bob; do
  wait_for "$WORK/$who.out" '{"event":"connected","isInitialConnection":true,"isInitialSessionConnection":true,"isAutomaticReconnection":false}'
  wait_for "$WORK/$who.out" "$HELLO"
done
wait_for "$WORK/server1.out" '"event":"connection"' 2
step "both clients connected, hello received"

alice '{"cmd":"authenticate","data":{"token":"alice"},"shouldSync":true}'
bob '{"cmd":"authenticate","data":{"token":"bob"}}'
wait_for "$WORK/alice.out" '{"event":"authenticated","user":{"id":"alice"}}'
wait_for "$WORK/bob.out" '{"event":"authenticated","user":{"id":"bob"}}'
wait_for "$WORK/server1.out" '"event":"authenticated"' 2
step "authenticate() resolved with {\"id\":\"alice\"} and {\"id\":\"bob\"}"

alice '{"cmd":"send","op":0,"t":"ECHO","d":{"who":"alice","n":1}}'
bob '{"cmd":"send","op":0,"t":"ECHO","d":{"who":"bob","n":1}}'
wait_for "$WORK/alice.out" '{"event":"message","op":0,"t":"ECHO","d":{"who":"alice","n":1},"s":null}'
wait_for "$WORK/bob.out" '{"event":"message","op":0,"t":"ECHO","d":{"who":"bob","n":1},"s":null}'
assert_absent "$WORK/alice.out" '"who":"bob"' "ECHO goes only to its sender"
assert_absent "$WORK/bob.out" '"who":"alice"' "ECHO goes only to its sender"
step "ECHO came back to each sender"

# Heartbeats every 500 ms: wait for 6 more beats (3 s), all answered, nobody dropped.
a0=$(count "$WORK/alice.out" '"event":"heartbeat"')
b0=$(count "$WORK/bob.out" '"event":"heartbeat"')
wait_for "$WORK/alice.out" '"event":"heartbeat"' $((a0 + 6)) 8
wait_for "$WORK/bob.out" '"event":"heartbeat"' $((b0 + 6)) 8
wait_for "$WORK/server1.out" '"event":"heartbeat_ack"' 12 4
assert_absent "$WORK/alice.out" '"tries"' "every heartbeat answered"
assert_absent "$WORK/bob.out" '"tries"' "every heartbeat answered"
for who in alice bob; do
  assert_absent "$WORK/$who.out" '"event":"disconnected"' "connection kept"
done
assert_absent "$WORK/server1.out" '"event":"disconnection"' "connections kept"
step "heartbeats answered for $(( $(count "$WORK/alice.out" '"event":"heartbeat"') )) beats, connections kept"

alice '{"cmd":"send","op":0,"t":"BROADCAST","d":{"from":"alice","n":2}}'
wait_for "$WORK/bob.out" '{"event":"message","op":0,"t":"BROADCAST","d":{"from":"alice","n":2},"s":null}'
wait_for "$WORK/alice.out" '{"event":"message","op":0,"t":"BROADCAST","d":{"from":"alice","n":2},"s":null}'
step "global BROADCAST from alice reached bob (and alice)"

bob '{"cmd":"send","op":0,"t":"BROADCAST","d":{"to":["alice","bob"],"except":["bob"],"n":3}}'
wait_for "$WORK/alice.out" '{"event":"message","op":0,"t":"BROADCAST","d":{"to":["alice","bob"],"except":["bob"],"n":3},"s":null}'
sleep 0.3
assert_absent "$WORK/bob.out" '"n":3' "d.except removes bob"
step "targeted BROADCAST from bob reached alice only"

echo '{"cmd":"send","op":0,"t":"NOTICE","d":{"n":4},"to":["bob"]}' >&5
wait_for "$WORK/bob.out" '{"event":"message","op":0,"t":"NOTICE","d":{"n":4},"s":null}'
sleep 0.3
assert_absent "$WORK/alice.out" '"t":"NOTICE"' "server send to bob only"
step "server-side send (stdin command) reached bob only"

# Stop the server, let the clients fail to reconnect a few times, restart it.
kill -TERM "$SERVER_PID"
rc=0
wait "$SERVER_PID" || rc=$?
exec 5>&-
[ "$rc" -eq 0 ] || fail "server.js exited with $rc on SIGTERM"
wait_for "$WORK/server1.out" '{"event":"exit","signal":"SIGTERM"}'
for who in alice bob; do
  wait_for "$WORK/$who.out" '"willAttemptReconnect":true}'
done
step "server stopped by SIGTERM (exit 0); both clients will attempt to reconnect"
sleep 1.2

start_server server2 /dev/null
wait_for "$WORK/server2.out" "{\"event\":\"listening\",\"port\":$PORT}"
step "server restarted on port $PORT"

for who in alice bob; do
  wait_for "$WORK/$who.out" '{"event":"connected","isInitialConnection":false,"isInitialSessionConnection":false,"isAutomaticReconnection":true}' 1 10
  wait_for "$WORK/$who.out" "$HELLO" 2
done
wait_for "$WORK/server2.out" '"event":"connection"' 2
step "both clients reconnected automatically"

# Upstream clients do not authenticate again by themselves after a reconnection.
alice '{"cmd":"authenticate","data":{"token":"alice"}}'
bob '{"cmd":"authenticate","data":{"token":"bob"}}'
wait_for "$WORK/alice.out" '{"event":"authenticated","user":{"id":"alice"}}' 2
wait_for "$WORK/bob.out" '{"event":"authenticated","user":{"id":"bob"}}' 2
alice '{"cmd":"send","op":0,"t":"BROADCAST","d":{"from":"alice","n":5}}'
bob '{"cmd":"send","op":0,"t":"ECHO","d":{"who":"bob","n":6}}'
wait_for "$WORK/bob.out" '{"event":"message","op":0,"t":"BROADCAST","d":{"from":"alice","n":5},"s":null}'
wait_for "$WORK/bob.out" '{"event":"message","op":0,"t":"ECHO","d":{"who":"bob","n":6},"s":null}'
step "after re-authentication, BROADCAST and ECHO work on the new server"

alice '{"cmd":"exit"}'
bob '{"cmd":"exit"}'
for pid in "$ALICE_PID" "$BOB_PID"; do
  rc=0
  wait "$pid" || rc=$?
  [ "$rc" -eq 0 ] || fail "a client exited with $rc"
done
exec 6>&- 7>&-
wait_for "$WORK/server2.out" '"event":"disconnection"' 2
kill -TERM "$SERVER_PID"
rc=0
wait "$SERVER_PID" || rc=$?
[ "$rc" -eq 0 ] || fail "restarted server.js exited with $rc on SIGTERM"

for f in "$WORK"/*.out; do
  assert_absent "$f" '"event":"crash"' "no crash"
done
STATUS=0
step "PASS"
