//! The guest does not wait for the network (pohmelfs only): with the store server paused
//! (SIGSTOP), writes through descriptors the guest already held — an append of a whole page,
//! an append to a page that is only partly on the store, an overwrite of part of a page the
//! daemon never read — and the create of a file all return, while a `sync` waits. Once the
//! store is resumed (SIGCONT) the `sync` returns and every byte is there: read back after
//! `drop_caches`, and from a new daemon on the same store.
//!
//! The first guest writes the files through one daemon, which then stops, so that the
//! daemon under test holds neither their pages nor their extended attributes: everything
//! the write path could ask the store for, it would have to.

use std::time::Duration;

use crate::harness::store::StoreServer;
use crate::harness::{Failure, Guest, Result, VmTest};

/// The guest asks for the pause and the resume with these console lines.
const PAUSE: &str = "POHMELFS-MARK=pause-store";
const RESUME: &str = "POHMELFS-MARK=resume-store";
/// Bound on the guest's writes while the store is paused (they need no store: they return
/// in milliseconds; the bound leaves room for a slow TCG guest).
const WRITES_WAIT_S: u32 = 30;
/// How long a `sync` must stay blocked for the store to count as paused.
const SYNC_BLOCKED_S: u32 = 3;
/// Bound on the `sync` after the resume (the daemon resends after its ack timeout).
const SYNC_WAIT_S: u32 = 120;

/// The files' contents, the same in every guest.
const CONTENT_FN: &str = r#"
base() { seq 1 100000 | head -c "$1"; }
page() { seq 100001 200000 | head -c 4096; }
patch() { seq 300001 400000 | tr '0-9' 'a-j' | head -c 100; }
"#;

/// The first guest: the files, synced, through a daemon that then stops.
fn setup_script() -> String {
    format!(
        r#"{CONTENT_FN}
step mount
mount -t virtiofs "$TAG" /mnt
step "write the files"
mkdir /mnt/d
base 8192 > /mnt/d/append
base 10000 > /mnt/d/tail
base 16384 > /mnt/d/part
sync
umount /mnt
"#
    )
}

/// The second guest: open the files, ask for the pause, wait until a `sync` blocks, write,
/// check a `sync` blocks, ask for the resume, check the `sync` returns and the bytes.
fn paused_script() -> String {
    format!(
        r#"{CONTENT_FN}
# Wait up to $2 seconds for the file $1, which a background job writes when it ends.
ended() {{
    n=0
    while [ $n -lt $(($2 * 10)) ]; do
        [ -e "$1" ] && return 0
        usleep 100000
        n=$((n + 1))
    done
    return 1
}}
step mount
mount -t virtiofs "$TAG" /mnt
step "open the files; a directory of this session"
exec 3>>/mnt/d/append
exec 4>>/mnt/d/tail
exec 5<>/mnt/d/part
mkdir /mnt/new
page > /tmp/page
patch > /tmp/patch
step "pause the store"
echo "{PAUSE}"
paused=0
i=0
while [ $i -lt 100 ]; do
    echo probe > /mnt/new/probe$i
    (set +e; sync -f /mnt/new; echo > /tmp/probe$i) &
    if ! ended /tmp/probe$i {SYNC_BLOCKED_S}; then paused=1; break; fi
    i=$((i + 1))
done
[ $paused = 1 ] || fail "every sync returned: the store was never paused"
step "write while the store is paused"
(
    set +e
    dd if=/tmp/page bs=4096 count=1 >&3 2>/dev/null &&
        dd if=/tmp/patch bs=100 count=1 >&4 2>/dev/null &&
        dd if=/tmp/patch bs=100 count=1 seek=50 >&5 2>/dev/null &&
        echo hello > /mnt/new/created &&
        echo done > /tmp/wrote
    echo > /tmp/ended
) &
ended /tmp/ended {WRITES_WAIT_S} || fail "the writes did not return within {WRITES_WAIT_S} s of the pause"
[ -f /tmp/wrote ] || fail "the writes failed"
step "a sync waits for the store"
(set +e; sync; echo $? > /tmp/status; mv /tmp/status /tmp/synced) &
if ended /tmp/synced {SYNC_BLOCKED_S}; then fail "sync returned while the store was paused"; fi
step "resume the store"
echo "{RESUME}"
ended /tmp/synced {SYNC_WAIT_S} || fail "sync did not return within {SYNC_WAIT_S} s of the resume"
expect_eq "$(cat /tmp/synced)" 0 "exit status of sync"
exec 3>&- 4>&- 5>&-
step "read back after drop_caches"
{{ base 8192; page; }} > /tmp/append
{{ base 10000; patch; }} > /tmp/tail
base 16384 > /tmp/part
dd if=/tmp/patch of=/tmp/part bs=100 count=1 seek=50 conv=notrunc 2>/dev/null
echo hello > /tmp/created
echo 3 > /proc/sys/vm/drop_caches
for f in d/append d/tail d/part new/created; do
    cmp /mnt/$f /tmp/${{f#*/}} || fail "$f differs from what was written"
done
echo "SUMS=$(cat /tmp/append /tmp/tail /tmp/part /tmp/created | sha256sum | cut -d' ' -f1)"
umount /mnt
"#
    )
}

/// The third guest, on a new daemon: the same bytes.
fn check_script(sums: &str) -> String {
    format!(
        r#"
step mount
mount -t virtiofs "$TAG" /mnt
step "read back through a new daemon"
expect_eq "$(cd /mnt && cat d/append d/tail d/part new/created | sha256sum | cut -d' ' -f1)" "{sums}" "sha256 of the files"
umount /mnt
"#
    )
}

/// Writes return while the store server is paused; only `sync` waits for it.
pub fn writes_return_while_store_paused(vm: &VmTest) -> Result<()> {
    let server = StoreServer::start(vm.dir(), &format!("file://{}/store", vm.dir().display()))?;
    let url = format!("pohmel://{}/vol", server.addr());
    let start = || {
        vm.daemon()
            .store(&url)
            .arg("--fsync-timeout-ms")
            .arg((Duration::from_secs(u64::from(SYNC_WAIT_S) * 2).as_millis()).to_string())
            .start()
    };
    let daemon = start()?;
    Guest::new(&daemon)
        .script(&setup_script())
        .run()?
        .expect_success()?;
    daemon.stop();
    drop(daemon);

    let daemon = start()?;
    let out = Guest::new(&daemon)
        .script(&paused_script())
        .on_console(PAUSE, || server.pause())
        .on_console(RESUME, || server.resume())
        .run();
    // Never leave the store stopped, whatever the guest did.
    server.resume()?;
    let out = out?.expect_success()?;
    let sums = out
        .value("SUMS")
        .filter(|s| s.len() == 64)
        .map(str::to_owned)
        .ok_or_else(|| Failure::new("the second guest printed no SUMS=<sha256> line"))?;
    daemon.stop();
    drop(daemon);

    let daemon = start()?;
    Guest::new(&daemon)
        .script(&check_script(&sums))
        .run()?
        .expect_success()?;
    Ok(())
}
