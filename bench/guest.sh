# Guest side of scripts/bench: runs inside the benchmark guest (busybox sh) as /test.sh, after
# a header the host writes with the parameters:
#   WORKLOADS   space-separated list, in order: warmup seqwrite seqread randwrite randread meta
#               fsync overwrite4k overwrite1m bigwrite files verify
#   SEQ_MB      size of the sequential file (and the file the random workloads use)
#   RAND_S      seconds of each random workload, after RAMP_S seconds of warm-up
#   META_FILES  small files created, stat'ed and unlinked
#   FSYNC_OPS   4 KiB appends, each followed by fsync
#   OW_S        seconds of each overwrite workload
#   BIG_MB      size of the big sequential write (daemon memory goal)
#   VERIFY_MB   size of the file the data check writes
#   FILES       one-byte files the files workload creates (in directories of 1000)
# Results go to the console, one per line, for bench/report.py:
#   BENCH <workload> <metric> <value>
#   BENCH <workload> written_bytes <n>  (bytes the workload passed to write(2) on the mount;
#                                        bench/report.py divides the daemon's disk writes by
#                                        their sum over the run)
#   BENCH-JSON <workload> / <fio JSON> / BENCH-JSON-END
#   BENCH-VERIFY ok <bytes> <sha256>   (the data check passed; scripts/bench requires it)
# Any failure ends the script with a non-zero status (set -e); the harness prints it as
# POHMELFS-EXIT=<status>.
set -e
STEP=start
# shellcheck disable=SC2154 # status is set inside the trap
trap 'status=$?; [ $status = 0 ] || echo "BENCH-FAIL status $status in step: $STEP"' EXIT

mount -t virtiofs pohmelfs /mnt
cd /mnt

# MS = milliseconds since boot (/proc/uptime has 10 ms resolution; phases here last seconds),
# without a fork (a forked child's writes would count in wchar_now); now_ms prints it.
clock_ms() {
	read -r up _ </proc/uptime
	# "12.05": the 1 prefix keeps a leading 0 of the fraction from reading as octal.
	MS=$((${up%.*} * 1000 + 1${up#*.} * 10 - 1000))
}
now_ms() {
	clock_ms
	echo "$MS"
}
drop_caches() {
	sync
	echo 3 >/proc/sys/vm/drop_caches
}
# wchar_now: WCHAR = the bytes this shell, and every child it has reaped, passed to write(2)
# (wchar of /proc/PID/io; the kernel adds a reaped child's counts to its parent). Read with
# builtins only, so that the reading itself writes nothing. Empty without task I/O accounting.
wchar_now() {
	WCHAR=""
	[ -r /proc/$$/io ] || return 0
	while read -r key val; do
		if [ "$key" = wchar: ]; then WCHAR=$val; fi
	done </proc/$$/io
}
# written WORKLOAD BEFORE [OTHER]: print the bytes written since wchar_now gave BEFORE, less
# OTHER bytes written elsewhere (fio's JSON report).
written() {
	wchar_now
	if [ -n "$WCHAR" ] && [ -n "$2" ]; then
		echo "BENCH $1 written_bytes $((WCHAR - $2 - ${3:-0}))"
	fi
}
# verify_data: the data check. Random bytes are written through the mount and into an
# independent copy in the guest's /tmp (RAM, not the mount); both then get the same unaligned
# overwrites (one write each), an extension past the end over a hole, and a truncation.
# The mount's file must equal the copy after the guest's caches are dropped, and again after
# an unmount and a new mount. Any difference fails the run.
verify_data() {
	ref=/tmp/verify.ref
	f=/mnt/verify
	head -c $((VERIFY_MB * 1048576)) /dev/urandom >$ref
	dd if=$ref of=$f bs=1M 2>/dev/null
	bytes=$((VERIFY_MB * 1048576))
	# "length seek": one write of length bytes at offset length * seek.
	for piece in "4097 3" "70001 5" "1000003 2" "65536 $((VERIFY_MB * 16 + 3))"; do
		# shellcheck disable=SC2086 # two words
		set -- $piece
		head -c "$1" /dev/urandom >/tmp/verify.piece
		for out in $ref $f; do
			dd if=/tmp/verify.piece of="$out" bs="$1" seek="$2" conv=notrunc 2>/dev/null
		done
		bytes=$((bytes + $1))
	done
	# Truncate both in the middle of the last write (dd without notrunc truncates at seek).
	for out in $ref $f; do
		dd if=/dev/null of="$out" bs=1 seek=$(((VERIFY_MB * 16 + 3) * 65536 + 12345)) 2>/dev/null
	done
	drop_caches
	cmp $ref $f || { echo "verify: $f differs from the copy in /tmp"; exit 1; }
	cd /
	umount /mnt
	mount -t virtiofs pohmelfs /mnt
	cd /mnt
	cmp $ref $f || { echo "verify: $f differs from the copy in /tmp after a new mount"; exit 1; }
	echo "BENCH verify written_bytes $bytes"
	echo "BENCH-VERIFY ok $(wc -c <$f) $(sha256sum <$f | cut -d' ' -f1)"
	rm $f $ref /tmp/verify.piece
}

# fio_counted NAME ARGS...: one fio job, its JSON report in /tmp/NAME.json, and the bytes it
# wrote on the console (fio's own byte counts leave out the writes of --ramp_time and of
# laying out a new file; wchar counts them all, and the report file, which is subtracted:
# what remains is the job's writes to the mount, to within a few bytes).
fio_counted() {
	name=$1
	shift
	wchar_now
	before=$WCHAR
	fio --name="$name" --ioengine=psync --eta=never --output-format=json --output="/tmp/$name.json" "$@"
	written "$name" "$before" "$(wc -c <"/tmp/$name.json")"
}
# fio_json NAME ARGS...: fio_counted, then its JSON report printed between markers.
fio_json() {
	fio_counted "$@"
	echo
	echo "BENCH-JSON $name"
	cat "/tmp/$name.json"
	echo "BENCH-JSON-END"
}

for w in $WORKLOADS; do
	STEP=$w
	echo "== $w"
	case $w in
	warmup)
		# Warms the daemon's code paths and the guest's fio binary; only the bytes it wrote
		# are reported.
		fio_counted warmup --filename=/mnt/warmup --rw=write --bs=1M --size=16M --end_fsync=1
		drop_caches
		cat /mnt/warmup >/dev/null
		rm /mnt/warmup
		;;
	seqwrite)
		fio_json seqwrite --filename=/mnt/seq --rw=write --bs=1M --size="${SEQ_MB}M" --end_fsync=1
		;;
	seqread)
		drop_caches
		fio_json seqread --filename=/mnt/seq --rw=read --bs=1M --size="${SEQ_MB}M"
		;;
	randwrite)
		fio_json randwrite --filename=/mnt/seq --rw=randwrite --bs=4k --size="${SEQ_MB}M" \
			--fsync=32 --time_based --runtime="$RAND_S" --ramp_time="$RAMP_S"
		;;
	randread)
		drop_caches
		fio_json randread --filename=/mnt/seq --rw=randread --bs=4k --size="${SEQ_MB}M" \
			--time_based --runtime="$RAND_S" --ramp_time="$RAMP_S"
		;;
	meta)
		mkdir /mnt/meta
		t0=$(now_ms)
		wchar_now
		before=$WCHAR
		i=0
		while [ $i -lt "$META_FILES" ]; do
			echo "$i" >/mnt/meta/f$i
			i=$((i + 1))
		done
		written meta "$before"
		t1=$(now_ms)
		# Forget the dentries and inodes: every stat below is a LOOKUP to the daemon.
		drop_caches
		echo "== meta.stat"
		t2=$(now_ms)
		i=0
		while [ $i -lt "$META_FILES" ]; do
			[ -e /mnt/meta/f$i ] || { echo "missing /mnt/meta/f$i"; exit 1; }
			i=$((i + 1))
		done
		t3=$(now_ms)
		echo "== meta.unlink"
		rm -r /mnt/meta
		t4=$(now_ms)
		echo "BENCH meta files $META_FILES"
		echo "BENCH meta create_ms $((t1 - t0))"
		echo "BENCH meta stat_ms $((t3 - t2))"
		echo "BENCH meta unlink_ms $((t4 - t3))"
		;;
	fsync)
		fio_json fsync --filename=/mnt/fsync --rw=write --bs=4k --size="$((FSYNC_OPS * 4))k" --fsync=1
		rm /mnt/fsync
		;;
	overwrite4k)
		# 4 KiB writes at random offsets of one 1 MiB region, fsync every 256 writes.
		fio_json overwrite4k --filename=/mnt/ow4k --size=1M --rw=randwrite --bs=4k \
			--norandommap --fsync=256 --time_based --runtime="$OW_S" --ramp_time="$RAMP_S"
		;;
	overwrite1m)
		# The whole 1 MiB region rewritten by each write, fsync every 16 writes.
		fio_json overwrite1m --filename=/mnt/ow1m --size=1M --rw=write --bs=1M \
			--fsync=16 --time_based --runtime="$OW_S" --ramp_time="$RAMP_S"
		;;
	bigwrite)
		fio_json bigwrite --filename=/mnt/big --rw=write --bs=1M --size="${BIG_MB}M" --end_fsync=1
		;;
	files)
		# FILES one-byte files, 1000 to a directory (create, write, close each, as an unpacked
		# tree does), left in place: the daemon's memory with that many inodes is the point.
		# The time of the first and of the last tenth shows whether creating slows down as
		# the count grows.
		mkdir /mnt/files
		tenth=$((FILES / 10))
		[ "$tenth" -gt 0 ] || tenth=1
		wchar_now
		before=$WCHAR
		clock_ms
		t0=$MS
		t_first=$t0
		t_last=$t0
		i=0
		while [ $i -lt "$FILES" ]; do
			if [ $((i % 1000)) = 0 ]; then mkdir /mnt/files/d$((i / 1000)); fi
			printf x >/mnt/files/d$((i / 1000))/f$i
			i=$((i + 1))
			if [ $i = "$tenth" ]; then
				clock_ms
				t_first=$MS
			fi
			if [ $i = $((FILES - tenth)) ]; then
				clock_ms
				t_last=$MS
			fi
		done
		clock_ms
		t1=$MS
		written files "$before"
		echo "BENCH files files $FILES"
		echo "BENCH files create_ms $((t1 - t0))"
		echo "BENCH files first_tenth_ms $((t_first - t0))"
		echo "BENCH files last_tenth_ms $((t1 - t_last))"
		# What the daemon keeps once the guest holds none of the inodes: drop the guest's
		# dentries and inodes (each eviction sends a FORGET), then give the daemon a second
		# to take them before the host samples its memory at the next line.
		sync
		echo 2 >/proc/sys/vm/drop_caches
		sleep 1
		echo "BENCH files dropped 1"
		;;
	verify)
		verify_data
		;;
	*)
		echo "unknown workload $w"
		exit 2
		;;
	esac
done
STEP=finish
cd /
umount /mnt
echo "BENCH-DONE"
