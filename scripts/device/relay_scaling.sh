#!/usr/bin/env bash
# Does `tokenflow serve --workers N` scale throughput with cores? Run on a machine with 16 cores (x86-64,
# Python 3.12 at python3, no internet needed), in the repository root, with the kit of
# scripts/device/build_kit.sh copied along (.devkit/whl, .devkit/redis):
#
#   OUT=/tmp/relay-scaling bash scripts/device/relay_scaling.sh
#
# What it does:
#   1. installs the carried wheels (the project's pins) into /tmp/site and puts it and the repository first on
#      PYTHONPATH (the project itself runs from the tree: python3 -m gateway.cli);
#   2. starts the carried redis-server (Debian 12's, through its own glibc loader) on a free port, pinned to
#      the last core, no persistence;
#   3. runs `bench relay` on the other cores (15): with --workers N the gateway is pinned to N cores, the rig
#      (UPSTREAMS fast engine processes on one port, LOADGENS load generators) to the rest; --streams-per-worker
#      gives each worker count the same load per worker:
#        unpaced (gateway-none, 50 tokens/s per stream) at NONE_SPW streams per worker, for WORKERS;
#        then, while time is left, paced (gateway-smooth, 20 tokens/s per stream) at SMOOTH_SPW per worker;
#   4. writes to $OUT: env.txt (machine, versions), log.txt (everything printed), redis.txt (Redis INFO at the
#      end), none/{report.json,table.md}, smooth/{report.json,table.md} (partial.json in place of report.json
#      for a stage stopped by its time limit).
# Each case is ramp + warmup + window (3 + 4 + 10 s) plus about 5 s of start and stop.
set -u
OUT=${OUT:-/tmp/relay-scaling}
KIT=${KIT:-.devkit}
PY=${PY:-python3}
WORKERS=${WORKERS:-1,2,4}
NONE_SPW=${NONE_SPW:-1000,2000}
SMOOTH_SPW=${SMOOTH_SPW:-1500}
UPSTREAMS=${UPSTREAMS:-6}
LOADGENS=${LOADGENS:-5}
TIMING=${TIMING:---ramp 3 --warmup 4 --window 10}
BUDGET_S=${BUDGET_S:-420}  # no stage starts past this, and each stops by it
T0=$(date +%s)
mkdir -p "$OUT"
exec > >(tee -a "$OUT/log.txt") 2>&1
left() { echo $((BUDGET_S - ($(date +%s) - T0))); }
export PYTHONUNBUFFERED=1

{
  echo "date: $(date -u)"; uname -a; echo "nproc: $(nproc)"; grep -m1 'model name' /proc/cpuinfo
  echo "affinity: $(taskset -pc $$ 2>/dev/null)"; echo "ulimit -n: $(ulimit -n) (hard $(ulimit -Hn))"
  echo "python: $($PY -VV)"; echo "taskset: $(command -v taskset || echo missing)"
  grep -E 'MemTotal' /proc/meminfo; cat /proc/loadavg
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
ulimit -n 1048576 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
echo "ulimit -n now $(ulimit -n)" | tee -a "$OUT/env.txt"

# 1. the wheels
if [ -d "$KIT/whl" ] && [ "${SKIP_WHEELS:-0}" != 1 ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$KIT"/whl/*.whl \
    || { echo "wheel install failed"; exit 3; }
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
$PY - > /tmp/imports.txt 2>&1 <<'EOF'
import importlib
for m in ("aiohttp", "uvloop", "orjson", "redis", "hiredis", "pydantic", "pydantic_core", "pydantic_settings", "yaml",
          "prometheus_client", "multidict", "yarl"):
    mod = importlib.import_module(m)
    print(f"{m} {getattr(mod, '__version__', '?')} {mod.__file__}")
import gateway.cli, bench.relay  # noqa: F401
print("project imports ok")
EOF
rc=$?
tee -a "$OUT/env.txt" < /tmp/imports.txt
[ $rc = 0 ] || { echo "imports failed"; exit 4; }

# taskset: the bench pins through it; a stand-in on sched_setaffinity if the machine lacks it
if ! command -v taskset >/dev/null; then
  mkdir -p /tmp/bin
  cat > /tmp/bin/taskset <<EOF
#!$(command -v $PY)
import os, sys
assert sys.argv[1] == "-c"
cpus = set()
for part in sys.argv[2].split(","):
    a, _, b = part.partition("-")
    cpus.update(range(int(a), int(b or a) + 1))
os.sched_setaffinity(0, cpus)
os.execvp(sys.argv[3], sys.argv[3:])
EOF
  chmod +x /tmp/bin/taskset
  export PATH=/tmp/bin:$PATH
  echo "taskset: stand-in /tmp/bin/taskset" | tee -a "$OUT/env.txt"
fi

# 2. Redis on the last core
CPUS=$($PY -c 'import os; print(" ".join(map(str, sorted(os.sched_getaffinity(0)))))')
LAST=${CPUS##* }
BENCH_CPUS=$($PY -c "import os; print(','.join(str(c) for c in sorted(os.sched_getaffinity(0)) if c != $LAST) or '$LAST')")
RPORT=$($PY -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
R=$KIT/redis
RLIB=$R/lib/x86_64-linux-gnu:$R/usr/lib/x86_64-linux-gnu
RARGS=(--port "$RPORT" --bind 127.0.0.1 --save "" --appendonly no --protected-mode no --daemonize no
       --logfile /tmp/redis-bench.log)
if command -v redis-server >/dev/null && [ ! -d "$R" ]; then
  taskset -c "$LAST" redis-server "${RARGS[@]}" &
else
  taskset -c "$LAST" "$R/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2" --library-path "$RLIB" "$R/usr/bin/redis-server" \
    "${RARGS[@]}" &
fi
RPID=$!
ok=0
for _ in $(seq 100); do
  if $PY -c "import redis; redis.Redis(port=$RPORT, socket_timeout=1).ping()" 2>/dev/null; then ok=1; break; fi
  sleep 0.1
done
if [ $ok != 1 ]; then
  echo "redis-server did not start (pid $RPID):"; cat /tmp/redis-bench.log 2>/dev/null
  echo "trying the system loader with LD_LIBRARY_PATH"
  kill "$RPID" 2>/dev/null
  LD_LIBRARY_PATH=$R/usr/lib/x86_64-linux-gnu taskset -c "$LAST" "$R/usr/bin/redis-server" "${RARGS[@]}" &
  RPID=$!
  sleep 1
  $PY -c "import redis; redis.Redis(port=$RPORT, socket_timeout=1).ping()" || { cat /tmp/redis-bench.log; exit 5; }
fi
REDIS_URL=redis://127.0.0.1:$RPORT/0
echo "redis pid $RPID on core $LAST, $REDIS_URL; bench on cores $BENCH_CPUS" | tee -a "$OUT/env.txt"

# 3. the benchmarks
stage() {  # stage NAME TARGETS STREAMS_PER_WORKER
  local name=$1 targets=$2 spw=$3 t
  t=$(left)
  if [ "$t" -lt 60 ]; then echo "== $name: skipped, ${t}s left"; return; fi
  echo "== $name: $targets at $spw streams per worker, workers $WORKERS (${t}s left)"
  local cmd=(taskset -c "$BENCH_CPUS" "$PY" -m gateway.cli bench relay --targets "$targets" --workers "$WORKERS"
             --streams-per-worker --streams "$spw" --store redis --redis-url "$REDIS_URL" --upstreams "$UPSTREAMS"
             --loadgens "$LOADGENS" $TIMING --out "/tmp/relay-$name")
  echo "${cmd[*]}"
  timeout -s TERM "$t" "${cmd[@]}"
  echo "(exit $?)"
  mkdir -p "$OUT/$name"
  for f in report.json table.md; do cp "/tmp/relay-$name/$f" "$OUT/$name/" 2>/dev/null; done
  [ -f "$OUT/$name/report.json" ] || cp "/tmp/relay-$name/partial.json" "$OUT/$name/" 2>/dev/null
}
stage none gateway-none "$NONE_SPW"
stage smooth gateway-smooth "$SMOOTH_SPW"

# 4. Redis at the end
$PY - "$RPORT" > "$OUT/redis.txt" 2>&1 <<'EOF'
import sys, redis
r = redis.Redis(port=int(sys.argv[1]))
for section in ("server", "cpu", "stats", "memory", "commandstats"):
    for k, v in r.info(section).items():
        print(f"{k}: {v}")
EOF
grep -E '^(redis_version|used_cpu_sys|used_cpu_user|total_commands_processed|used_memory_human|cmdstat_(evalsha|xadd|xrange|set|get|hset|exec))' "$OUT/redis.txt"
kill "$RPID" 2>/dev/null
echo "total $(( $(date +%s) - T0 ))s"
