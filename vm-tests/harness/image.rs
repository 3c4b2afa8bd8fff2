//! The guest image: kernel and initramfs built by `images/build-guest`, once per test process.
//!
//! The script caches its output under `target/guest/<key>/`, so after the first build this is a
//! quick lookup. A failed build fails every test with the script's own error message; it is
//! never retried within one process.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use super::{repo_root, Failure, Result};

/// Files of one built guest.
#[derive(Debug)]
pub struct GuestImage {
    /// The guest kernel.
    pub kernel: PathBuf,
    /// Base initramfs (busybox, attr tools, modules, `/init`), an uncompressed newc archive.
    pub initramfs: PathBuf,
    /// fio and its shared libraries, a newc archive appended only for guests that run fio.
    pub fio: PathBuf,
    /// pjdfstest with its libraries, users and configuration; present only when pjdfstest was
    /// installed before the image was built.
    pub pjdfstest: PathBuf,
}

/// The guest image, built on first use.
pub fn guest_image() -> Result<&'static GuestImage> {
    static IMAGE: OnceLock<std::result::Result<GuestImage, String>> = OnceLock::new();
    IMAGE
        .get_or_init(build)
        .as_ref()
        .map_err(|message| Failure::new(message.clone()))
}

fn build() -> std::result::Result<GuestImage, String> {
    let script = repo_root().join("images/build-guest");
    let output = Command::new("bash")
        .arg(&script)
        .current_dir(repo_root())
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() {
        return Err(format!(
            "building the guest image failed ({}):\n{stderr}\n\
             fix: run scripts/test (it installs what the build needs), or run images/build-guest \
             by hand; set POHMELFS_SKIP_VM_TESTS=1 to skip the VM tests",
            output.status
        ));
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let dir = stdout
        .lines()
        .next_back()
        .map(|line| Path::new(line.trim()).to_path_buf())
        .ok_or_else(|| format!("images/build-guest printed no directory; stderr:\n{stderr}"))?;
    let image = GuestImage {
        kernel: dir.join("vmlinuz"),
        initramfs: dir.join("initramfs.img"),
        fio: dir.join("fio.img"),
        pjdfstest: dir.join("pjdfstest.img"),
    };
    for file in [&image.kernel, &image.initramfs, &image.fio] {
        if !file.is_file() {
            return Err(format!(
                "images/build-guest did not produce {}; stderr:\n{stderr}",
                file.display()
            ));
        }
    }
    Ok(image)
}
