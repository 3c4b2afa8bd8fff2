//! The guest's initrd: the base image's initramfs, the optional images a test asks for (fio,
//! pjdfstest), and a newc archive with the test's script as `/test.sh` and, when asked for,
//! this build's `pohmelfs` binary with the libraries it links.

use std::fs::{self, File};
use std::io;
use std::path::Path;
use std::sync::OnceLock;

use super::cpio::{self, Entry};
use super::image::GuestImage;
use super::{target_dir, Failure, Result};

/// A file for the guest's initramfs: its path there, mode and bytes.
pub struct ExtraFile {
    name: String,
    mode: u32,
    data: Vec<u8>,
}

/// The stripped `pohmelfs` binary and the libraries `ldd` says it needs, read once per process.
pub fn guest_pohmelfs() -> Result<&'static [ExtraFile]> {
    static FILES: OnceLock<std::result::Result<Vec<ExtraFile>, String>> = OnceLock::new();
    let load = || -> std::result::Result<Vec<ExtraFile>, String> {
        let binary = Path::new(env!("CARGO_BIN_EXE_pohmelfs"));
        let stripped = target_dir()
            .join("vm-tests")
            .join(format!("pohmelfs-guest-{}", std::process::id()));
        let status = std::process::Command::new("strip")
            .arg("-o")
            .arg(&stripped)
            .arg(binary)
            .status()
            .map_err(|e| format!("run strip (apt-get install binutils): {e}"))?;
        if !status.success() {
            return Err(format!("strip {} failed: {status}", binary.display()));
        }
        let data = fs::read(&stripped).map_err(|e| format!("read {}: {e}", stripped.display()));
        let _ = fs::remove_file(&stripped);
        let mut files = vec![ExtraFile {
            name: "usr/bin/pohmelfs".to_owned(),
            mode: 0o755,
            data: data?,
        }];
        let ldd = std::process::Command::new("ldd")
            .arg(binary)
            .output()
            .map_err(|e| format!("run ldd: {e}"))?;
        let text = String::from_utf8_lossy(&ldd.stdout);
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" and the loader's own line.
        for line in text.lines() {
            let path = match line.split_whitespace().collect::<Vec<_>>().as_slice() {
                [_, "=>", path, ..] | [path, ..] if path.starts_with('/') => (*path).to_owned(),
                _ => continue,
            };
            let data = fs::read(&path).map_err(|e| format!("read {path}: {e}"))?;
            files.push(ExtraFile {
                name: path.trim_start_matches('/').to_owned(),
                mode: 0o755,
                data,
            });
        }
        Ok(files)
    };
    FILES
        .get_or_init(load)
        .as_deref()
        .map_err(|e| Failure::new(format!("put pohmelfs into the guest: {e}")))
}

/// `images/root-init` as the guest's `/init`, in place of the base image's: it boots the
/// daemon's volume as the root file system and runs `/test.sh` there.
pub fn root_init() -> Result<ExtraFile> {
    let path = super::repo_root().join("images/root-init");
    let data =
        fs::read(&path).map_err(|e| Failure::new(format!("read {}: {e}", path.display())))?;
    Ok(ExtraFile {
        name: "init".to_owned(),
        mode: 0o755,
        data,
    })
}

/// Writes base image [+ optional images] + an archive holding `/test.sh` (and `extra`) into
/// one initrd file.
pub fn write_initrd(
    initrd: &Path,
    image: &GuestImage,
    optional: &[&Path],
    script: &str,
    extra: &[&ExtraFile],
) -> Result<()> {
    let write = || -> io::Result<()> {
        let mut out = File::create(initrd)?;
        io::copy(&mut File::open(&image.initramfs)?, &mut out)?;
        for part in optional {
            io::copy(&mut File::open(part)?, &mut out)?;
        }
        let mut entries = vec![Entry {
            name: "test.sh",
            mode: 0o755,
            data: script.as_bytes(),
        }];
        entries.extend(extra.iter().map(|f| Entry {
            name: &f.name,
            mode: f.mode,
            data: &f.data,
        }));
        let archive = cpio::archive(&entries);
        io::Write::write_all(&mut out, &archive)
    };
    write().map_err(|e| Failure::new(format!("write {}: {e}", initrd.display())))
}
