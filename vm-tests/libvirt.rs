//! pohmelfs started as libvirt starts a virtio-fs backend (`src/qemu/qemu_virtiofs.c`,
//! `qemuVirtioFSBuildCommandLine`): no subcommand, the vhost-user socket bound by the manager
//! and inherited as `--fd=N`, the volume named by the shared directory, and virtiofsd's options.
//! A guest writes through the argv of libvirt 9.0 (Debian bookworm: every option in `-o`),
//! the daemon is stopped with SIGTERM (the stop contract: it drains, exits 0), and a second
//! guest reads the files back through current libvirt's argv (`--shared-dir`, separate
//! options), whose directory holds a `pohmelfs.conf` naming the same volume.

use crate::harness::daemon::INHERITED_FD;
use crate::harness::{Failure, Guest, Result, VmTest};

/// The first guest writes and syncs files; prints the sum of its own copy.
const WRITE: &str = r#"
step mount
mount -t virtiofs "$TAG" /mnt
step "write and sync"
mkdir -p /mnt/lv
head -c 3000000 /dev/urandom > /tmp/a
cp /tmp/a /mnt/lv/a
printf 'from libvirt 9.0 argv\n' > /mnt/lv/b
sync
echo "SUMS=$(cat /tmp/a /mnt/lv/b | sha256sum | cut -d' ' -f1)"
umount /mnt
"#;

fn check_script(sums: &str) -> String {
    format!(
        r#"
step mount
mount -t virtiofs "$TAG" /mnt
step "read back"
expect_eq "$(cat /mnt/lv/a /mnt/lv/b | sha256sum | cut -d' ' -f1)" "{sums}" "sha256 of the files"
expect_eq "$(cat /mnt/lv/b)" "from libvirt 9.0 argv" "content of b"
umount /mnt
"#
    )
}

pub fn libvirt_argv_on_an_inherited_socket(vm: &VmTest) -> Result<()> {
    let url = vm.new_volume("vm1", &[])?;
    let dir = url.trim_start_matches("file://").to_owned();
    let fd = format!("--fd={INHERITED_FD}");
    let source = format!("source={dir},cache=always,sandbox=chroot,xattr,flock,no_posix_lock");
    let daemon = vm
        .daemon()
        .inherited_socket(&[&fd, "-o", &source, "--thread-pool-size=4"])
        .start()?;
    let out = Guest::new(&daemon).script(WRITE).run()?.expect_success()?;
    let sums = out
        .value("SUMS")
        .filter(|s| s.len() == 64)
        .map(str::to_owned)
        .ok_or_else(|| Failure::new("the first guest printed no SUMS=<sha256> line"))?;
    let status = daemon.terminate()?;
    if !status.success() {
        return Err(Failure::new(format!(
            "SIGTERM after a synced guest: exit {status}, not 0 (everything was stored)\n{}",
            daemon.log_report()
        )));
    }
    drop(daemon);

    let shared = vm.dir().join("shared");
    let conf = format!("# the volume behind <source dir=…>\nstore = {url}\n");
    std::fs::create_dir_all(&shared)
        .and_then(|()| std::fs::write(shared.join("pohmelfs.conf"), conf))
        .map_err(|e| Failure::new(format!("write {}/pohmelfs.conf: {e}", shared.display())))?;
    let shared = shared.to_string_lossy().into_owned();
    let daemon = vm
        .daemon()
        .inherited_socket(&[
            &fd,
            "--shared-dir",
            &shared,
            "--cache",
            "never",
            "--sandbox",
            "chroot",
            "--xattr",
            "--thread-pool-size=0",
            "--rlimit-nofile=4096",
        ])
        .start()?;
    Guest::new(&daemon)
        .script(&check_script(&sums))
        .run()?
        .expect_success()?;
    Ok(())
}
