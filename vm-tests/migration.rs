//! Live migration: a guest moves between two QEMU 10 processes on this host while it keeps
//! files open on the virtio-fs mount, and goes on reading and writing them through the same
//! descriptors at the destination. pohmelfs: two daemons on one `file://` volume, the
//! destination started with `--incoming`; the guest also holds a file it unlinked while it
//! was open. virtiofsd: two daemons on one shared directory (virtiofsd's `find-paths`
//! migration cannot carry an unlinked file, so its guest holds none). Prints the downtime
//! QEMU reports, to compare the two daemons. The same with a writer running in the guest
//! through the migration, appending and fsyncing or rewriting a file at full speed, whose
//! writes must all be there after it. And a migration the destination refuses: the guest
//! goes on at the source, which opens the volume again.
//! The same between hosts: [`crate::migration_hosts`].
//!
//! QEMU 7.2 cannot migrate a vhost-user-fs device (its `migrate` answers "State blocked by
//! non-migratable device"): `scripts/test` runs these in its QEMU 10 pass only
//! (`QEMU=target/qemu10/qemu-system-x86_64 cargo test --test vm migration`).

use crate::harness::migration::{
    expect_handed_over, expect_logged, expect_taken_over, Migration, MIGRATE_MARKER,
};
use crate::harness::{Daemon, DaemonKind, Failure, Result, VmTest};

/// The guest's workload; `unlinked` adds the file unlinked while open.
pub(crate) fn script(unlinked: bool) -> String {
    let (before, after) = if unlinked {
        (
            r#"
head -c 100000 /dev/urandom > /tmp/gone
cp /tmp/gone /mnt/gone
exec 5</mnt/gone
rm /mnt/gone
"#,
            r#"
expect_eq "$(cat <&5 | sha256sum)" "$(sha256sum < /tmp/gone)" "the unlinked file through its descriptor"
[ ! -e /mnt/gone ] || fail "the unlinked file has a name again"
exec 5<&-
"#,
        )
    } else {
        ("", "")
    };
    format!(
        r#"
step mount
mount -t virtiofs "$TAG" /mnt
step "open files before the migration"
head -c 300000 /dev/urandom > /tmp/kept
cp /tmp/kept /mnt/kept
exec 3<>/mnt/kept
{before}
exec 4</dev/ttyS1
sync
echo {MIGRATE_MARKER}
step "wait for the harness's line after the migration"
read -r go <&4
expect_eq "$go" "go" "the harness's line"
step "drop the guest's caches: reads go to the daemon"
echo 3 > /proc/sys/vm/drop_caches
step "read and write through the descriptors opened before the migration"
expect_eq "$(cat <&3 | sha256sum)" "$(sha256sum < /tmp/kept)" "kept, read through its descriptor"
printf AFTER >&3
exec 3>&-
{after}
step "the file as written after the migration"
sync
echo 3 > /proc/sys/vm/drop_caches
expect_eq "$(cat /mnt/kept | sha256sum)" "$( (cat /tmp/kept; printf AFTER) | sha256sum)" "kept after the write"
umount /mnt
"#
    )
}

/// The guest moves while it holds open files; the destination serves them.
pub fn live_migration_keeps_open_files(vm: &VmTest) -> Result<()> {
    let (source, destination, unlinked) = match vm.kind() {
        DaemonKind::Pohmelfs => {
            let url = vm.new_volume("volume", &[])?;
            let source = vm.daemon_in("src")?.store(&url).start()?;
            let destination = vm.daemon_in("dst")?.store(&url).arg("--incoming").start()?;
            (source, destination, true)
        }
        DaemonKind::Virtiofsd => {
            // One shared directory for both, as one volume for pohmelfs.
            let shared = vm.dir().join("shared");
            let source = vm.daemon_in("src")?.shared_dir(&shared).start()?;
            let destination = vm.daemon_in("dst")?.shared_dir(&shared).start()?;
            (source, destination, false)
        }
    };
    let migrated = Migration::new(vm.dir(), &source, &destination)
        .script(&script(unlinked))
        .run()?;
    let downtime = format!(
        "{}: live migration downtime {} ms, total {} ms",
        vm.kind(),
        migrated.downtime_ms,
        migrated.total_ms
    );
    eprintln!("{downtime}");
    migrated.output.expect_success()?;
    if vm.kind() == DaemonKind::Pohmelfs {
        expect_handed_over(&source, "source")?;
        expect_taken_over(&destination, "destination")?;
    }
    Ok(())
}

/// Blocks the full-speed writer cycles over.
const STREAM_BLOCKS: u32 = 32;

/// What the guest does through a migration (`writer_script`).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Writer {
    /// Rewrites a file of [`STREAM_BLOCKS`] MiB block after block, as fast as it can and
    /// without fsync; at the end the file must hold the block at every offset.
    FullSpeed,
    /// Appends a line to a log and fsyncs it every 50 ms; at the end the log must hold every
    /// line once, in order, with no gap.
    Appending,
}

/// The guest of a migration under `writer`: the writer runs from before the migration to
/// after it, then stops at a flag file and the guest checks what it wrote.
fn writer_script(writer: Writer) -> String {
    let (write, first, after, check) = match writer {
        Writer::FullSpeed => (
            format!(
                "dd if=/tmp/block of=/mnt/stream bs=1M seek=$((i % {STREAM_BLOCKS})) count=1 \
                 conv=notrunc 2>/dev/null"
            ),
            STREAM_BLOCKS + 8,
            STREAM_BLOCKS,
            format!(
                r#"i=0
while [ $i -lt {STREAM_BLOCKS} ]; do cat /tmp/block; i=$((i + 1)); done | sha256sum > /tmp/expected
expect_eq "$(sha256sum < /mnt/stream)" "$(cat /tmp/expected)" "the stream file""#
            ),
        ),
        Writer::Appending => (
            "echo \"line $i\" >> /mnt/log\n        \
             dd if=/dev/null of=/mnt/log conv=notrunc,fsync 2>/dev/null\n        \
             sleep 0.05"
                .to_owned(),
            10,
            10,
            r#"lines=$(wc -l < /mnt/log)
[ "$lines" -ge "$(written)" ] || fail "the log holds $lines lines, the writer fsynced $(written)"
seq "$lines" | sed 's/^/line /' | sha256sum > /tmp/expected
expect_eq "$(sha256sum < /mnt/log)" "$(cat /tmp/expected)" "the log, every line once and in order""#
                .to_owned(),
        ),
    };
    format!(
        r#"
step mount
mount -t virtiofs "$TAG" /mnt
head -c 1048576 /dev/urandom > /tmp/block
step "the writer"
(
    i=0
    while [ ! -e /tmp/stop ]; do
        i=$((i + 1))
        {write}
        echo $i > /tmp/count.new && mv /tmp/count.new /tmp/count
    done
) &
writer=$!
written() {{ cat /tmp/count 2>/dev/null || echo 0; }}
step "the writer's first writes"
while [ "$(written)" -lt {first} ]; do sleep 0.05; done
exec 4</dev/ttyS1
echo {MIGRATE_MARKER}
step "wait for the harness's line after the migration"
read -r go <&4
expect_eq "$go" "go" "the harness's line"
step "the writer goes on at the destination"
moved=$(written)
while [ "$(written)" -lt $((moved + {after})) ]; do sleep 0.05; done
touch /tmp/stop
wait $writer
echo "writes: $(written), $moved of them before the harness's line"
step "what the writer wrote"
sync
echo 3 > /proc/sys/vm/drop_caches
{check}
umount /mnt
"#
    )
}

/// The guest moves while a writer in it rewrites a file as fast as it can: the downtime
/// holds whatever the daemon must store of it (pohmelfs: its drain, which it logs), and the
/// writer goes on at the destination with nothing lost.
pub fn live_migration_while_writing(vm: &VmTest) -> Result<()> {
    migrate_under(vm, Writer::FullSpeed)
}

/// The guest moves while it appends a line to a log and fsyncs it every 50 ms; the log stays
/// gapless.
pub fn live_migration_while_appending(vm: &VmTest) -> Result<()> {
    migrate_under(vm, Writer::Appending)
}

fn migrate_under(vm: &VmTest, writer: Writer) -> Result<()> {
    let (source, destination) = match vm.kind() {
        DaemonKind::Pohmelfs => {
            let url = vm.new_volume("volume", &[])?;
            let source = vm.daemon_in("src")?.store(&url).start()?;
            let destination = vm.daemon_in("dst")?.store(&url).arg("--incoming").start()?;
            (source, destination)
        }
        DaemonKind::Virtiofsd => {
            let shared = vm.dir().join("shared");
            let source = vm.daemon_in("src")?.shared_dir(&shared).start()?;
            let destination = vm.daemon_in("dst")?.shared_dir(&shared).start()?;
            (source, destination)
        }
    };
    let migrated = Migration::new(vm.dir(), &source, &destination)
        .script(&writer_script(writer))
        .run()?;
    let drained = match vm.kind() {
        DaemonKind::Pohmelfs => drain_line(&source)?,
        DaemonKind::Virtiofsd => String::new(),
    };
    let writes = migrated
        .output
        .console
        .lines()
        .find_map(|l| l.trim().strip_prefix("writes: "))
        .unwrap_or("?")
        .to_owned();
    let what = match writer {
        Writer::FullSpeed => "while writing",
        Writer::Appending => "while appending",
    };
    eprintln!(
        "{}: live migration {what}: downtime {} ms, total {} ms{drained}; writes {writes}",
        vm.kind(),
        migrated.downtime_ms,
        migrated.total_ms
    );
    migrated.output.expect_success()?;
    if vm.kind() == DaemonKind::Pohmelfs {
        expect_handed_over(&source, "source")?;
        expect_logged(
            &destination,
            "destination",
            "migration: guest session taken over",
        )?;
    }
    Ok(())
}

/// The source's drain at the stop, from its log lines: the early let-go's
/// (`migration: let the volume go at the stop ...`, when the last queue
/// stopped) and the state's (`migration: drained ...`).
fn drain_line(source: &Daemon) -> Result<String> {
    let log = std::fs::read_to_string(source.log_path())
        .map_err(|e| Failure::new(format!("read the source's log: {e}")))?;
    let last = |what: &str| log.lines().rev().find(|l| l.contains(what));
    let fields = |line: &str| {
        line.split_whitespace()
            .filter(|f| f.contains("_ms=") || f.contains("_bytes=") || f.contains("early="))
            .collect::<Vec<&str>>()
            .join(" ")
    };
    let line = last("migration: drained").ok_or_else(|| {
        Failure::new(format!(
            "the source logged no drain\n{}",
            source.log_report()
        ))
    })?;
    let early = last("migration: let the volume go at the stop")
        .map(|l| format!(", let go at the stop: {}", fields(l)))
        .unwrap_or_default();
    Ok(format!(", source's drain {}{early}", fields(line)))
}

/// The destination refuses the guest (it negotiated the FUSE write-back cache, which the
/// destination does not offer): QEMU fails the migration and resumes the guest at the
/// source, whose volume was let go once the state was out. The source opens the volume
/// again at the guest's next request, sparing the file unlinked while open, and the guest
/// goes on there through the same descriptors.
pub fn refused_migration_resumes_at_the_source(vm: &VmTest) -> Result<()> {
    let url = vm.new_volume("volume", &[])?;
    let source = vm
        .daemon_in("src")?
        .store(&url)
        .arg("--writeback-cache")
        .start()?;
    let destination = vm.daemon_in("dst")?.store(&url).arg("--incoming").start()?;
    Migration::new(vm.dir(), &source, &destination)
        .script(&script(true))
        .run_refused()
}
