//! A guest session moved between two daemons over the real vhost-user
//! protocol (`DEVICE_STATE`), as QEMU moves it: the source saves into a
//! stream, the destination loads it, and the guest goes on through the
//! handles it had, on the same volume.

use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::sync::Arc;

use fuse_backend_rs::abi::fuse_abi::Opcode;
use vhost::vhost_user::message::{VhostTransferStateDirection, VhostTransferStatePhase};
use vhost::vhost_user::VhostUserFrontend;

use super::frontend_kit::Kit;
use super::testkit::header;
use crate::fs::SessionError;
use crate::store::mem::MemStore;
use crate::store::Store;

const READ_BUF: u64 = 0x60000;
const IN_HEADER_LEN: usize = 40;

/// `SET_DEVICE_STATE_FD` for a save, as QEMU sends it: the stream the
/// state comes out of.
pub(super) fn start_save(src: &Kit) -> UnixStream {
    let (ours, theirs) = UnixStream::pair().unwrap();
    let reply = src
        .frontend()
        .set_device_state_fd(
            VhostTransferStateDirection::SAVE,
            VhostTransferStatePhase::STOPPED,
            OwnedFd::from(theirs),
        )
        .unwrap();
    assert!(reply.is_none(), "the backend asked for another fd");
    ours
}

/// Save the source's state through a stream, as QEMU does: the bytes.
pub(super) fn save(src: &Kit) -> Vec<u8> {
    let mut ours = start_save(src);
    let mut bytes = Vec::new();
    ours.read_to_end(&mut bytes).unwrap();
    src.frontend().check_device_state().unwrap();
    bytes
}

/// Load `bytes` into the destination; what CHECK_DEVICE_STATE answered.
pub(super) fn load(dst: &Kit, bytes: &[u8]) -> vhost::Result<()> {
    let (mut ours, theirs) = UnixStream::pair().unwrap();
    dst.frontend()
        .set_device_state_fd(
            VhostTransferStateDirection::LOAD,
            VhostTransferStatePhase::STOPPED,
            OwnedFd::from(theirs),
        )
        .unwrap();
    ours.write_all(bytes).unwrap();
    drop(ours);
    dst.frontend().check_device_state()
}

/// UNLINK `name` from the root.
pub(super) fn unlink(kit: &mut Kit, name: &str) {
    let mut body = name.as_bytes().to_vec();
    body.push(0);
    let h = header(IN_HEADER_LEN + body.len(), Opcode::Unlink as u32, 9);
    let out = kit.request(h, &body, &[(super::chains::REPLY, 4096, true)]);
    assert_eq!(out.error, 0, "UNLINK {name}");
}

#[test]
fn an_open_unlinked_file_moves_to_the_destination_and_survives_the_source() {
    let store: Arc<dyn Store> = Arc::new(MemStore::new(64 << 20));
    let mut src = Kit::start_on("migrate-src", Arc::clone(&store));
    src.init();
    let (nodeid, fh) = src.create("f");
    let data: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
    src.write(nodeid, fh, &data);
    // Open and unlinked: only the guest's reference keeps it.
    unlink(&mut src, "f");

    let bytes = save(&src);
    let mut dst = Kit::start_on("migrate-dst", Arc::clone(&store));
    load(&dst, &bytes).unwrap();
    // The source's frontend goes away, as QEMU's does after a migration:
    // the file it no longer serves must stay for the destination.
    drop(src);

    let (error, back) = dst.read(nodeid, fh, READ_BUF, 8192);
    assert_eq!(error, 0, "READ through the migrated handle");
    assert_eq!(back, data);
    assert!(store.get_inode(nodeid).unwrap().is_some());
}

#[test]
fn a_damaged_state_is_refused_and_the_destination_has_no_session() {
    let store: Arc<dyn Store> = Arc::new(MemStore::new(64 << 20));
    let mut src = Kit::start_on("migrate-bad-src", Arc::clone(&store));
    src.init();
    src.create("g");
    let mut bytes = save(&src);
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    let dst = Kit::start_on("migrate-bad-dst", Arc::clone(&store));
    assert!(load(&dst, &bytes).is_err(), "a damaged state was taken");
    assert_eq!(dst.fs.export_session(), Err(SessionError::NoSession));
    // The source still has its session: the guest goes on there.
    assert_eq!(src.fs.export_session().unwrap().handles.len(), 1);
}
