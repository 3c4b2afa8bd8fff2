#!/bin/bash
# The daemon's CPU per workload on the host, without a guest: mount a fresh file:// volume with
# `pohmelfs mount` and run bench/guest.sh's main workloads with fio on it, one after the
# other, printing for each the daemon's user + system CPU (from /proc/PID/stat), its CPU and
# context switches per operation (fio's reads + writes; 3 per file for meta), and with
# LOG_LEVEL=info the daemon's counters at the end. With PERF=DIR, each workload also runs
# under `perf record` attached to the daemon (DIR/WORKLOAD.data; PERF_CG sets the call-graph
# option, default -g, e.g. PERF_CG="--call-graph dwarf,32768"; the store server's in
# DIR/WORKLOAD.store.data).
#
#   bench/host-cpu.sh BINARY [WORKLOAD...] [-- pohmelfs mount options...]
#   e.g. bench/host-cpu.sh target/release/pohmelfs seqwrite seqread
#
# Workloads (default: all, in this order): seqwrite seqread randwrite randread meta fsync;
# also unlink (META_FILES one-line files, created, synced and looked up before the measure,
# removed by `rm -r`, or one `rm` each META_PACE seconds apart as a slow guest's `rm -r` does).
# Sizes as in scripts/bench, smaller by default to fit a shared machine: SEQ_MB (512),
# RAND_S (10), META_FILES (5000), FSYNC_OPS (1000); STORE_QUERY=k=v&... is appended to the
# store URL (engine settings such as checkpoint_ms); META_PACE=SECONDS pauses after each
# file the meta workload creates (a TCG guest creates one every ~3 ms). A FUSE mount is not
# a virtio-fs guest (requests come through /dev/fuse, the host's page cache stands in for
# the guest's), but the daemon runs the same fs -> writeback -> store code for both. Cold
# reads: fio invalidates the file's page cache at the start of each job (`invalidate=1`).
#
# STORE_SERVER=1 serves the volume from a `pohmelfs store` on loopback instead (pohmel://, as
# scripts/bench's store-0ms case) and prints the server's CPU per workload beside the daemon's.
#
# Needs root (/dev/fuse, drop_caches). Leaves nothing behind.
set -euo pipefail
[ $# -ge 1 ] || { sed -n 2,20p "$0"; exit 2; }
bin=$1
shift
workloads=()
while [ $# -gt 0 ] && [ "$1" != -- ]; do
	workloads+=("$1")
	shift
done
[ "${1:-}" = -- ] && shift
[ ${#workloads[@]} -gt 0 ] || workloads=(seqwrite seqread randwrite randread meta fsync)
META_PACE=${META_PACE:-}
exec {pace_fd}<> <(:)
SEQ_MB=${SEQ_MB:-512} RAND_S=${RAND_S:-10} META_FILES=${META_FILES:-5000} FSYNC_OPS=${FSYNC_OPS:-1000}
work=$(mktemp -d)
mkdir "$work/mnt"
mnt=$work/mnt
store_pid=""
if [ -n "${STORE_SERVER:-}" ]; then
	mkdir "$work/srv"
	"$bin" format "file://$work/srv/vol${STORE_QUERY:+?$STORE_QUERY}" >/dev/null
	"$bin" store --listen 127.0.0.1:0 --data "file://$work/srv" --addr-file "$work/store.addr" \
		--log-level warn 2>"$work/store.log" &
	store_pid=$!
	for _ in $(seq 100); do
		[ -s "$work/store.addr" ] && break
		sleep 0.1
	done
	[ -s "$work/store.addr" ] || { cat "$work/store.log"; exit 1; }
	url="pohmel://$(cat "$work/store.addr")/vol"
else
	"$bin" format "file://$work/vol" >/dev/null
	url="file://$work/vol${STORE_QUERY:+?$STORE_QUERY}"
fi
"$bin" mount "$mnt" --store "$url" --log-level "${LOG_LEVEL:-warn}" "$@" 2>"$work/daemon.log" &
pid=$!
cleanup() {
	kill -TERM "$pid" 2>/dev/null && wait "$pid" || true
	[ -z "$store_pid" ] || { kill -TERM "$store_pid" 2>/dev/null && wait "$store_pid" || true; }
	# The daemon's counters for the whole run (with LOG_LEVEL=info).
	grep -o 'counters=.*' "$work/daemon.log" || true
	rm -rf "$work"
}
trap cleanup EXIT
for _ in $(seq 100); do
	mountpoint -q "$mnt" && break
	sleep 0.1
done
mountpoint -q "$mnt" || { cat "$work/daemon.log"; exit 1; }
# cpu_ticks: the daemon's utime + stime (fields 14 and 15; the name in field 2 has no spaces).
cpu_ticks() { awk '{print $14 + $15}' "/proc/${1:-$pid}/stat"; }
hz=$(getconf CLK_TCK)
# switches: voluntary + involuntary context switches of all the daemon's threads.
switches() { cat /proc/"$pid"/task/*/status | awk '/ctxt_switches/ {n += $2} END {print n}'; }
# fio_run NAME ARGS...: one fio job; its read + write operations go to $work/ops.
fio_run() {
	fio --name="$1" --ioengine=psync --eta=never --output-format=json --output="$work/fio.json" \
		--directory="$mnt" "${@:2}" >/dev/null
	python3 -c 'import json,sys; j=json.load(open(sys.argv[1]))["jobs"][0]; print(j["read"]["total_ios"]+j["write"]["total_ios"])' \
		"$work/fio.json" >"$work/ops"
}
# The file the read and random workloads use, laid out once when seqwrite does not run first.
need_files() {
	mkdir "$mnt/unlink"
	for ((i = 0; i < META_FILES; i++)); do echo "$i" >"$mnt/unlink/f$i"; done
	sync -f "$mnt"
	for ((i = 0; i < META_FILES; i++)); do [ -e "$mnt/unlink/f$i" ]; done
}
need_seq() { [ -e "$mnt/seq" ] || fio_run layout --filename=seq --rw=write --bs=1M --size="${SEQ_MB}M" --end_fsync=1; }
run() {
	case $1 in
	seqwrite) fio_run seqwrite --filename=seq --rw=write --bs=1M --size="${SEQ_MB}M" --end_fsync=1 ;;
	seqread) fio_run seqread --filename=seq --rw=read --bs=1M --size="${SEQ_MB}M" ;;
	randwrite) fio_run randwrite --filename=seq --rw=randwrite --bs=4k --size="${SEQ_MB}M" \
		--fsync=32 --time_based --runtime="$RAND_S" ;;
	randread) fio_run randread --filename=seq --rw=randread --bs=4k --size="${SEQ_MB}M" \
		--time_based --runtime="$RAND_S" ;;
	meta)
		mkdir "$mnt/meta"
		for ((i = 0; i < META_FILES; i++)); do
			echo "$i" >"$mnt/meta/f$i"
			# Without a fork: read times out on a pipe nobody writes.
			[ -z "$META_PACE" ] || read -r -t "$META_PACE" -u "$pace_fd" || true
		done
		sync -f "$mnt"
		echo 2 >/proc/sys/vm/drop_caches
		for ((i = 0; i < META_FILES; i++)); do [ -e "$mnt/meta/f$i" ]; done
		rm -r "$mnt/meta"
		sync -f "$mnt"
		;;
	unlink)
		if [ -n "$META_PACE" ]; then
			for ((i = 0; i < META_FILES; i++)); do
				rm "$mnt/unlink/f$i"
				read -r -t "$META_PACE" -u "$pace_fd" || true
			done
			rmdir "$mnt/unlink"
		else
			rm -r "$mnt/unlink"
		fi
		sync -f "$mnt"
		;;
	fsync)
		fio_run fsync --filename=fsync --rw=write --bs=4k --size="$((FSYNC_OPS * 4))k" --fsync=1
		rm "$mnt/fsync"
		;;
	*) echo "unknown workload $1" >&2; exit 2 ;;
	esac
}
for w in "${workloads[@]}"; do
	case $w in seqread | randwrite | randread) need_seq ;; unlink) need_files ;; esac
	if [ -n "${PERF:-}" ]; then
		perf record -q -F 499 ${PERF_CG:--g} -p "$pid" -o "$PERF/$w.data" 2>/dev/null &
		perf_pid=$!
		if [ -n "$store_pid" ]; then
			perf record -q -F 499 ${PERF_CG:--g} -p "$store_pid" -o "$PERF/$w.store.data" 2>/dev/null &
			perf_pid="$perf_pid $!"
		fi
		sleep 0.5
	fi
	echo 0 >"$work/ops"
	c0=$(cpu_ticks) s0=$(switches) sc0=$([ -z "$store_pid" ] || cpu_ticks "$store_pid")
	t0=$EPOCHREALTIME
	run "$w"
	t1=$EPOCHREALTIME
	c1=$(cpu_ticks) s1=$(switches) sc1=$([ -z "$store_pid" ] || cpu_ticks "$store_pid")
	ops=$(cat "$work/ops")
	[ "$w" = meta ] && ops=$((3 * META_FILES))
	[ "$w" = unlink ] && ops=$META_FILES
	# shellcheck disable=SC2086 # one or two pids
	[ -n "${PERF:-}" ] && { kill -INT $perf_pid; wait $perf_pid || true; }
	cpu_us=$(((c1 - c0) * 1000000 / hz))
	echo "$w cpu_s=$(echo "scale=2; $cpu_us / 1000000" | bc) wall_s=$(echo "scale=2; ($t1 - $t0) / 1" | bc)" \
		"ops=$ops cpu_us_per_op=$((cpu_us / (ops > 0 ? ops : 1))) switches_per_op=$(((s1 - s0) / (ops > 0 ? ops : 1)))" \
		${store_pid:+"store_cpu_s=$(echo "scale=2; ($sc1 - $sc0) / $hz" | bc)"}
done
