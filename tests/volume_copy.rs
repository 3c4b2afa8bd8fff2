//! `pohmelfs copy` as an operator runs it, between real stores: a
//! `file://` volume into S3 (moto), then that S3 volume into a store
//! server's volume (`pohmel://` on loopback), each verified by the command
//! and read back here. A volume a daemon holds is refused as a source.

// Test crate: a failed unwrap is a failed test, with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

use pohmelfs::store::engine::OpenMode;
use pohmelfs::store::{Dirent, FileKind, Inode, Op, Store, Txn, ROOT_INO};
use pohmelfs_testkit::store::secret_file;
use pohmelfs_testkit::{format_volume, skip_requested, Moto, ScratchDir, StoreServer};

const POHMELFS: &str = env!("CARGO_BIN_EXE_pohmelfs");
const SECRET: &str = "test-secret-copy";

fn contents() -> Vec<u8> {
    (0..3 << 20).map(|i| (i % 241) as u8).collect()
}

/// A root directory with one file of `contents()`.
fn populate(url: &str) {
    let s = pohmelfs::store::open_once_as(url, OpenMode::Existing { take_over: false }).unwrap();
    let mut root = Inode {
        kind: FileKind::Directory,
        perm: 0o755,
        nlink: 2,
        parent: ROOT_INO,
        ..Inode::regular(ROOT_INO, 0)
    };
    root.uid = 0;
    let data = contents();
    s.commit(Txn {
        ops: vec![
            Op::PutInode(root),
            Op::PutInode(Inode::regular(100, data.len() as u64)),
            Op::Write {
                ino: 100,
                offset: 0,
                data: data.into(),
            },
            Op::PutDirent {
                parent: ROOT_INO,
                dirent: Dirent {
                    name: b"f".to_vec(),
                    ino: 100,
                    kind: FileKind::Regular,
                    cookie: 101,
                },
            },
        ],
    })
    .unwrap();
}

/// `pohmelfs ARGS` with moto's credentials in its environment.
fn pohmelfs(args: &[&str]) -> std::process::Output {
    Command::new(POHMELFS)
        .args(args)
        .envs(Moto::CLI_ENV)
        .output()
        .unwrap()
}

/// `pohmelfs copy SRC DST`: its stdout, or a panic with its stderr.
fn copy(src: &str, dst: &str) -> String {
    let out = pohmelfs(&["copy", src, dst]);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(out.status.success(), "copy {src} {dst}: {stderr}");
    assert!(stdout.contains("copied 2 inodes"), "{stdout}");
    assert!(stdout.contains("the copy equals the source"), "{stdout}");
    stdout
}

fn read_back(store: &dyn Store) -> Vec<u8> {
    let entry = store.lookup(ROOT_INO, b"f").unwrap().expect("f copied");
    let size = store.get_inode(entry.ino).unwrap().unwrap().size;
    let mut buf = vec![0u8; size as usize];
    store.read(entry.ino, 0, &mut buf).unwrap();
    buf
}

#[test]
fn a_volume_goes_from_file_to_s3_to_a_store_server() {
    if skip_requested("POHMELFS_SKIP_S3_TESTS", "the copy test through S3") {
        return;
    }
    let dir = ScratchDir::new("it-copy").unwrap();
    let local = format!("file://{}", dir.join("local").display());
    format_volume(POHMELFS, &local, &[]).unwrap();
    populate(&local);

    let moto = Moto::start(dir.path(), "pohmelfs-copy").expect("start moto_server");
    let s3 = moto.cli_url("volumes/copied");
    let formatted = pohmelfs(&["format", &s3]);
    assert!(formatted.status.success(), "{formatted:?}");
    copy(&local, &s3);
    {
        let with_keys = moto.url("volumes/copied");
        let s3_store =
            pohmelfs::store::open_once_as(&with_keys, OpenMode::Existing { take_over: false })
                .unwrap();
        assert!(read_back(&*s3_store) == contents(), "S3 copy differs");
    }

    let data = dir.join("srv");
    std::fs::create_dir(&data).unwrap();
    let server = StoreServer::start(
        POHMELFS,
        dir.path(),
        "srv",
        &format!("file://{}", data.display()),
        Some(SECRET),
    )
    .expect("start store server");
    let remote = format!(
        "pohmel://{}/vol?secret_file={}",
        server.addr(),
        secret_file(dir.path()).display()
    );
    copy(&s3, &remote);
    let remote_store = pohmelfs::net::open(&remote).unwrap();
    assert!(
        read_back(&*remote_store) == contents(),
        "server copy differs"
    );

    // Run again after it finished: nothing to do.
    let again = pohmelfs(&["copy", &local, &s3]);
    assert!(again.status.success(), "{again:?}");
    assert!(String::from_utf8_lossy(&again.stdout).contains("is a verified copy"));
    // A copy never lands on a volume that holds other files: the store
    // server's copy differs from a new source.
    let other = format!("file://{}", dir.join("other").display());
    format_volume(POHMELFS, &other, &[]).unwrap();
    populate(&other);
    {
        let s =
            pohmelfs::store::open_once_as(&other, OpenMode::Existing { take_over: false }).unwrap();
        let mut t = Txn::new();
        t.push(Op::Write {
            ino: 100,
            offset: 0,
            data: vec![0xee; 10].into(),
        });
        s.commit(t).unwrap();
    }
    let out = pohmelfs(&["copy", &other, &s3]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("holds files and is not an unfinished copy"),
        "{err}"
    );
}

#[test]
fn a_source_a_daemon_holds_is_refused() {
    let dir = ScratchDir::new("it-copy-held").unwrap();
    let (src, dst) = (
        format!("file://{}", dir.join("a").display()),
        format!("file://{}", dir.join("b").display()),
    );
    format_volume(POHMELFS, &src, &[]).unwrap();
    format_volume(POHMELFS, &dst, &[]).unwrap();
    let _held =
        pohmelfs::store::open_once_as(&src, OpenMode::Existing { take_over: false }).unwrap();
    let out = Command::new(POHMELFS)
        .args(["copy", &src, &dst])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is held by"), "{err}");
}
