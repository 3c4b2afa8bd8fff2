#!/bin/bash
# The daemon's CPU per unlink on the host, without a guest: mount a fresh file:// volume with
# `pohmelfs mount`, create N one-line files, sync, look each up once, then remove them (`rm -r`,
# or one `rm` each PACE seconds apart with PACE=SECONDS, as a slow guest's `rm -r` does) and
# print the daemon's user + system CPU over the removal (from /proc/PID/stat).
#
#   bench/host-unlink.sh BINARY [N] [-- pohmelfs mount options...]
#   e.g. PACE=0.003 bench/host-unlink.sh target/release/pohmelfs 3000
#
# Needs root (/dev/fuse). Leaves nothing behind.
set -euo pipefail
[ $# -ge 1 ] || { sed -n 2,10p "$0"; exit 2; }
bin=$1
n=${2:-3000}
shift $(($# >= 2 ? 2 : 1))
[ "${1:-}" = -- ] && shift
work=$(mktemp -d)
mkdir "$work/mnt"
"$bin" format "file://$work/vol" >/dev/null
"$bin" mount "$work/mnt" --store "file://$work/vol" --log-level warn "$@" 2>"$work/daemon.log" &
pid=$!
cleanup() {
	kill -TERM "$pid" 2>/dev/null && wait "$pid" || true
	rm -rf "$work"
}
trap cleanup EXIT
for _ in $(seq 100); do
	mountpoint -q "$work/mnt" && break
	sleep 0.1
done
mountpoint -q "$work/mnt" || { cat "$work/daemon.log"; exit 1; }
mkdir "$work/mnt/m"
for ((i = 0; i < n; i++)); do echo "$i" >"$work/mnt/m/f$i"; done
sync -f "$work/mnt"
for ((i = 0; i < n; i++)); do [ -e "$work/mnt/m/f$i" ]; done
cpu_ticks() { awk '{print $14 + $15}' "/proc/$pid/stat"; }
hz=$(getconf CLK_TCK)
c0=$(cpu_ticks)
t0=$EPOCHREALTIME
if [ -n "${PACE:-}" ]; then
	exec {pace_fd}<> <(:)
	for ((i = 0; i < n; i++)); do
		rm "$work/mnt/m/f$i"
		# Without a fork: read times out on a pipe nobody writes.
		read -r -t "$PACE" -u "$pace_fd" || true
	done
	rmdir "$work/mnt/m"
else
	rm -r "$work/mnt/m"
fi
sync -f "$work/mnt"
t1=$EPOCHREALTIME
c1=$(cpu_ticks)
cpu_us=$(((c1 - c0) * 1000000 / hz))
echo "unlink n=$n pace=${PACE:-none} cpu_s=$(echo "scale=2; $cpu_us / 1000000" | bc)" \
	"wall_s=$(echo "scale=2; ($t1 - $t0) / 1" | bc) cpu_us_per_unlink=$((cpu_us / n))"
