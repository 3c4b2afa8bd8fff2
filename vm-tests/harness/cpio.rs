//! A writer for the "newc" cpio format, the format the Linux kernel unpacks as initramfs.
//!
//! The harness hands each guest its `/test.sh` as a small archive appended to the base image
//! (the kernel unpacks concatenated archives in order), so tests need no `cpio` tool. This
//! writer only knows regular files; it must never be fed names with a leading `/` or `..`.

/// One regular file to put in an archive.
pub struct Entry<'a> {
    /// Path inside the archive, relative to the root, e.g. `test.sh`.
    pub name: &'a str,
    /// Permission bits, e.g. `0o755`.
    pub mode: u32,
    pub data: &'a [u8],
}

const MAGIC: &str = "070701";
const MODE_REGULAR_FILE: u32 = 0o100_000;
const TRAILER: &str = "TRAILER!!!";

/// Encodes `entries` as one newc archive, trailer included.
pub fn archive(entries: &[Entry<'_>]) -> Vec<u8> {
    let mut out = Vec::new();
    for (index, entry) in entries.iter().enumerate() {
        let ino = u32::try_from(index + 1).expect("fewer than 2^32 entries");
        let size = u32::try_from(entry.data.len()).expect("newc entries are below 4 GiB");
        push_header(
            &mut out,
            ino,
            MODE_REGULAR_FILE | entry.mode,
            1,
            size,
            entry.name,
        );
        out.extend_from_slice(entry.data);
        pad_to_4(&mut out);
    }
    push_header(&mut out, 0, 0, 1, 0, TRAILER);
    out
}

/// Header, name and its NUL, padded so the data starts on a 4-byte boundary.
fn push_header(out: &mut Vec<u8>, ino: u32, mode: u32, nlink: u32, size: u32, name: &str) {
    debug_assert!(!name.starts_with('/') && !name.contains('\0'));
    let name_size = u32::try_from(name.len() + 1).expect("short names");
    // ino mode uid gid nlink mtime filesize devmajor devminor rdevmajor rdevminor namesize check
    let fields = [ino, mode, 0, 0, nlink, 0, size, 0, 0, 0, 0, name_size, 0];
    out.extend_from_slice(MAGIC.as_bytes());
    for field in fields {
        out.extend_from_slice(format!("{field:08x}").as_bytes());
    }
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    pad_to_4(out);
}

fn pad_to_4(out: &mut Vec<u8>) {
    while out.len() % 4 != 0 {
        out.push(0);
    }
}

#[cfg(test)]
mod tests {
    use super::{archive, Entry};

    #[test]
    fn layout_of_one_file_and_trailer() {
        let bytes = archive(&[Entry {
            name: "test.sh",
            mode: 0o755,
            data: b"echo hi\n",
        }]);
        // 110-byte header + "test.sh\0" = 118, padded to 120; 8 data bytes end at 128.
        assert_eq!(&bytes[..6], b"070701");
        assert_eq!(&bytes[6..14], b"00000001", "ino");
        assert_eq!(&bytes[14..22], b"000081ed", "mode: regular file 0755");
        assert_eq!(&bytes[54..62], b"00000008", "file size");
        assert_eq!(&bytes[94..102], b"00000008", "name size with NUL");
        assert_eq!(&bytes[110..118], b"test.sh\0");
        assert_eq!(&bytes[118..120], b"\0\0");
        assert_eq!(&bytes[120..128], b"echo hi\n");
        assert_eq!(&bytes[128..134], b"070701");
        assert_eq!(&bytes[128 + 110..128 + 121], b"TRAILER!!!\0");
        assert_eq!(bytes.len() % 4, 0);
    }

    #[test]
    fn data_is_padded_to_four_bytes() {
        let bytes = archive(&[
            Entry {
                name: "a",
                mode: 0o644,
                data: b"x",
            },
            Entry {
                name: "b",
                mode: 0o644,
                data: b"",
            },
        ]);
        // "a": header 110 + "a\0" = 112; data 1 byte padded to 4 -> second header at 116.
        assert_eq!(&bytes[116..122], b"070701");
        assert_eq!(bytes.len() % 4, 0);
    }
}
