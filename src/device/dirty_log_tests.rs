//! Dirty-page logging for live migration (`VHOST_F_LOG_ALL`,
//! `VHOST_USER_PROTOCOL_F_LOG_SHMFD`): once the frontend has sent its log,
//! every guest page the device writes is marked in it, and no other.

use super::chains::REPLY;
use super::frontend_kit::{Kit, USED_RING};
use super::testkit::OUT_LEN;

const PAGE: u64 = 4096;
/// Where the READ's data goes: two pages, apart from the reply header's.
const READ_BUF: u64 = 0x60000;
const READ_LEN: u32 = 2 * PAGE as u32;

fn pages(start: u64, len: u64) -> Vec<u64> {
    (start / PAGE..(start + len).div_ceil(PAGE)).collect()
}

#[test]
fn a_served_read_marks_exactly_the_pages_the_device_wrote() {
    let mut kit = Kit::start("dirty-log");
    kit.init();
    let (nodeid, fh) = kit.create("f");
    let data: Vec<u8> = (0..READ_LEN).map(|i| (i % 253) as u8).collect();
    kit.write(nodeid, fh, &data);
    assert!(
        kit.dirty_pages().contains(&(REPLY / PAGE)),
        "the replies so far were not logged: {:?}",
        kit.dirty_pages()
    );

    kit.clear_log();
    let (error, back) = kit.read(nodeid, fh, READ_BUF, READ_LEN);
    assert_eq!(error, 0, "READ");
    assert_eq!(back, data, "READ returned other bytes");

    // The reply header, the data, and the used ring: nothing else (not
    // the request, not the data the guest wrote itself).
    let mut want = pages(REPLY, u64::from(OUT_LEN));
    want.extend(pages(READ_BUF, u64::from(READ_LEN)));
    want.push(USED_RING / PAGE);
    want.sort_unstable();
    assert_eq!(kit.dirty_pages(), want, "dirty pages after one READ");
    assert_eq!(kit.metrics.requests_rejected.get(), 0);
}
