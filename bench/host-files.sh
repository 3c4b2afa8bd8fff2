#!/bin/bash
# The many-files memory check on the host, without a guest: mount a fresh file:// volume with
# `pohmelfs mount`, create one-byte files 1000 to a directory (as bench/guest.sh's files
# workload does), and at each checkpoint sync, drop the host's dentries and inodes (each
# eviction sends a FORGET, so the daemon is left with files nobody holds) and print the
# daemon's RssAnon and the files/s so far.
#
#   bench/host-files.sh BINARY N1,N2,... [pohmelfs mount options...]
#   e.g. bench/host-files.sh target/release/pohmelfs 20000,100000 --cache-size 256M
#
# Needs root (/dev/fuse, drop_caches). Leaves nothing behind.
set -euo pipefail
[ $# -ge 2 ] || { sed -n 2,10p "$0"; exit 2; }
bin=$1 checks=$2
shift 2
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
rss_kib() { awk '/^RssAnon/ {print $2}' "/proc/$pid/status"; }
echo "start rss_anon_kib=$(rss_kib)"
n=0
t0=$EPOCHREALTIME
for c in ${checks//,/ }; do
	while ((n < c)); do
		((n % 1000 == 0)) && mkdir "$work/mnt/d$((n / 1000))"
		printf x >"$work/mnt/d$((n / 1000))/f$n"
		n=$((n + 1))
	done
	t1=$EPOCHREALTIME
	sync -f "$work/mnt"
	echo 2 >/proc/sys/vm/drop_caches
	# FORGETs are sent as the kernel evicts; give the daemon a second to take them.
	sleep 1
	echo "files=$n rss_anon_kib=$(rss_kib) files_per_s=$(echo "$n / ($t1 - $t0)" | bc)"
done
