//! Dirty-page logging for live migration (`VHOST_F_LOG_ALL`,
//! `VHOST_USER_PROTOCOL_F_LOG_SHMFD`): once the frontend has sent its log,
//! every guest page the device writes is marked in it, and no other.

use std::mem::size_of;

use fuse_backend_rs::abi::fuse_abi::{
    CreateIn, EntryOut, InitIn, Opcode, OpenOut, ReadIn, WriteIn, WriteOut,
};
use vm_memory::{ByteValued, Bytes, GuestAddress};

use super::chains::{BULK, REPLY};
use super::frontend_kit::{Kit, USED_RING};
use super::testkit::{header, OUT_LEN};

const IN_HEADER_LEN: usize = 40;
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
    let init = InitIn {
        major: 7,
        minor: 31,
        ..InitIn::default()
    };
    let h = header(IN_HEADER_LEN + size_of::<InitIn>(), Opcode::Init as u32, 1);
    let out = kit.request(h, init.as_slice(), &[(REPLY, 4096, true)]);
    assert_eq!(out.error, 0, "INIT");

    let mut body = CreateIn {
        flags: libc::O_RDWR as u32,
        mode: libc::S_IFREG | 0o644,
        ..CreateIn::default()
    }
    .as_slice()
    .to_vec();
    body.extend_from_slice(b"f\0");
    let h = header(IN_HEADER_LEN + body.len(), Opcode::Create as u32, 2);
    let out = kit.request(h, &body, &[(REPLY, 4096, true)]);
    assert_eq!(out.error, 0, "CREATE");
    let entry: EntryOut = kit
        .mem
        .read_obj(GuestAddress(REPLY + u64::from(OUT_LEN)))
        .unwrap();
    let open: OpenOut = kit
        .mem
        .read_obj(GuestAddress(
            REPLY + u64::from(OUT_LEN) + size_of::<EntryOut>() as u64,
        ))
        .unwrap();

    let data: Vec<u8> = (0..READ_LEN).map(|i| (i % 253) as u8).collect();
    kit.mem.write_slice(&data, GuestAddress(BULK)).unwrap();
    let write = WriteIn {
        fh: open.fh,
        size: READ_LEN,
        ..WriteIn::default()
    };
    let mut h = header(
        IN_HEADER_LEN + size_of::<WriteIn>() + data.len(),
        Opcode::Write as u32,
        3,
    );
    h.nodeid = entry.nodeid;
    let out = kit.request(
        h,
        write.as_slice(),
        &[(BULK, READ_LEN, false), (REPLY, 4096, true)],
    );
    assert_eq!(out.error, 0, "WRITE");
    let written: WriteOut = kit
        .mem
        .read_obj(GuestAddress(REPLY + u64::from(OUT_LEN)))
        .unwrap();
    assert_eq!(written.size, READ_LEN);
    assert!(
        kit.dirty_pages().contains(&(REPLY / PAGE)),
        "the replies so far were not logged: {:?}",
        kit.dirty_pages()
    );

    kit.clear_log();
    let read = ReadIn {
        fh: open.fh,
        size: READ_LEN,
        ..ReadIn::default()
    };
    let mut h = header(IN_HEADER_LEN + size_of::<ReadIn>(), Opcode::Read as u32, 4);
    h.nodeid = entry.nodeid;
    let out = kit.request(
        h,
        read.as_slice(),
        &[(REPLY, OUT_LEN, true), (READ_BUF, READ_LEN, true)],
    );
    assert_eq!(out.error, 0, "READ");
    let mut back = vec![0u8; READ_LEN as usize];
    kit.mem
        .read_slice(&mut back, GuestAddress(READ_BUF))
        .unwrap();
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
