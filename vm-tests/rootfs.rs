//! A guest whose root file system is a pohmelfs volume. A small root is built on the host: the guest image's
//! busybox, attr tools and their libraries (unpacked from its initramfs), plus fixtures of
//! everything a root file system carries: character and block devices, a fifo, a socket,
//! setuid, setgid and sticky bits, files and a directory of other owners, a file capability
//! (`security.capability`), a `user.` xattr, hard links (a 3-link busybox and a pair), a
//! symlink and a sparse file. `pohmelfs import` copies it into a new volume, the guest boots
//! with `root=TAG rootfstype=virtiofs` (`images/root-init` switches root to it) and runs its
//! script there, with the root's own busybox; the script lists the root as [`LISTING`] does
//! (kinds and modes, owners, link counts, device numbers, mtimes, contents, symlink targets,
//! hard-link groups, xattrs) and fails unless the listing is the host's listing of the
//! source tree, line for line. `pohmelfs check` of the volume is clean afterwards. Against
//! the reference, virtiofsd serves the source tree itself: the same listing must come out.

use std::path::Path;
use std::process::Command;

use crate::harness::image::guest_image;
use crate::harness::{DaemonKind, Failure, Guest, Result, VmTest};

/// Lists the tree below the current directory into `$T/listing`, the same way under GNU
/// (host) and busybox (guest) tools. `./proc`, `./sys`, `./dev` and `./run` are left out:
/// the guest mounts other file systems there.
pub const LISTING: &str = r##"
names=$T/names
find . -xdev | LC_ALL=C sort | grep -v -e '^\./proc$' -e '^\./sys$' -e '^\./dev$' -e '^\./run$' >"$names"
{
    echo "# kind and mode, owner, links, device, mtime"
    xargs stat -c '%n %f %u:%g %h %t,%T %Y' <"$names"
    echo "# contents"
    find . -xdev -type f | LC_ALL=C sort | xargs md5sum
    echo "# symlinks"
    find . -xdev -type l | LC_ALL=C sort | while read -r l; do echo "$l -> $(readlink "$l")"; done
    echo "# hard-link groups"
    find . -xdev -type f -links +1 | xargs stat -c '%i %n' | LC_ALL=C sort -k2 |
        awk '{ names[$1] = names[$1] " " $2 } END { for (i in names) print names[i] }' | LC_ALL=C sort
    echo "# xattrs"
    xargs getfattr -h -d -m - -e hex <"$names" 2>/dev/null | grep -v '^$'
} >"$T/listing"
"##;

/// Fixtures added to the unpacked image, run by the host's `sh` in the tree. The tree's own
/// `setfattr` sets the xattrs (the host's libraries are what the image copied).
const FIXTURES: &str = r#"
set -e
mkdir -p proc sys dev run tmp etc fixtures/shared home/user
chmod 1777 tmp
mknod fixtures/null c 1 3
mknod fixtures/vdb b 254 16
mkfifo fixtures/fifo
cp bin/busybox fixtures/suid && chmod 4755 fixtures/suid
cp bin/busybox fixtures/sgid && chown 0:50 fixtures/sgid && chmod 2755 fixtures/sgid
chown 0:50 fixtures/shared && chmod 3775 fixtures/shared
echo "a user's note" >home/user/note
chown -R 1000:1000 home/user && chmod 700 home/user
cp bin/busybox fixtures/ping
# cap_net_raw+ep, as setcap writes it (VFS_CAP_REVISION_2, effective; bit 13 permitted)
./usr/bin/setfattr -n security.capability -v 0x0100000200200000000000000000000000000000 fixtures/ping
./usr/bin/setfattr -n user.note -v hello home/user/note
ln bin/busybox fixtures/busybox-hard
ln bin/busybox fixtures/busybox-hard2
echo pair >fixtures/pair1 && ln fixtures/pair1 fixtures/pair2
touch -d @1234567890 fixtures/pair1
ln -s ../bin/busybox fixtures/symlink
dd if=/dev/zero of=fixtures/sparse bs=1 count=0 seek=3M 2>/dev/null && echo end >>fixtures/sparse
"#;

/// Runs `command`, failing with its output unless it succeeds; its stdout.
pub fn run(command: &mut Command) -> Result<String> {
    let out = command
        .output()
        .map_err(|e| Failure::new(format!("run {command:?}: {e}")))?;
    if !out.status.success() {
        return Err(Failure::new(format!(
            "{command:?} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A small root file system in `tree`: the guest image's initramfs unpacked (busybox with
/// its applet links, attr tools, libraries, modules), the directories a root needs, and,
/// with `fixtures`, [`FIXTURES`].
pub fn build_tree(tree: &Path, fixtures: bool) -> Result<()> {
    let image = guest_image()?;
    std::fs::create_dir_all(tree)
        .map_err(|e| Failure::new(format!("create {}: {e}", tree.display())))?;
    let initramfs = std::fs::File::open(&image.initramfs)
        .map_err(|e| Failure::new(format!("open {}: {e}", image.initramfs.display())))?;
    run(Command::new("cpio")
        .args(["-idm", "--quiet"])
        .current_dir(tree)
        .stdin(initramfs))?;
    run(Command::new("sh")
        .args(["-c", "mkdir -p proc sys dev run tmp etc"])
        .current_dir(tree))?;
    if fixtures {
        run(Command::new("sh").args(["-c", FIXTURES]).current_dir(tree))?;
        std::os::unix::net::UnixListener::bind(tree.join("fixtures/socket"))
            .map_err(|e| Failure::new(format!("bind a socket in the tree: {e}")))?;
    }
    Ok(())
}

/// `pohmelfs format` and `pohmelfs import` of `tree` into the new volume `name`; its URL.
pub fn import_tree(vm: &VmTest, tree: &Path, name: &str) -> Result<String> {
    let url = vm.new_volume(name, &[])?;
    run(Command::new(env!("CARGO_BIN_EXE_pohmelfs"))
        .arg("import")
        .arg(tree)
        .arg(&url))?;
    Ok(url)
}

/// See the module documentation.
pub fn rootfs_boot_keeps_special_files(vm: &VmTest) -> Result<()> {
    let tree = vm.dir().join("tree");
    build_tree(&tree, true)?;
    let listing_dir = vm.dir().join("listing");
    std::fs::create_dir_all(&listing_dir)
        .map_err(|e| Failure::new(format!("create {}: {e}", listing_dir.display())))?;
    run(Command::new("sh")
        .args(["-c", LISTING])
        .env("T", &listing_dir)
        .current_dir(&tree))?;
    let expected = std::fs::read_to_string(listing_dir.join("listing"))
        .map_err(|e| Failure::new(format!("read the host's listing: {e}")))?;
    // The host listed the tree into listing/, outside what virtiofsd serves.
    let (daemon, url) = match vm.kind() {
        DaemonKind::Pohmelfs => {
            let url = import_tree(vm, &tree, "root")?;
            (vm.daemon().store(&url).start()?, Some(url))
        }
        DaemonKind::Virtiofsd => (vm.daemon().shared_dir(&tree).start()?, None),
    };
    let script = format!(
        r#"
step "the root is the volume"
grep -q "^$TAG / virtiofs " /proc/mounts || fail "/ is not $TAG: $(cat /proc/mounts)"
expect_eq "$(readlink /proc/1/exe)" "/bin/busybox" "init's binary"
step "list the root"
T=/run
cat >/run/expected <<'END-OF-LISTING'
{expected}END-OF-LISTING
cd /
{LISTING}
step "compare with the source tree's listing"
diff /run/expected /run/listing || fail "the root differs from the source tree"
step "the root is writable"
echo written >/written && sync
expect_eq "$(cat /written)" "written" "a file written to the root"
echo "LINES=$(wc -l </run/listing)"
"#
    );
    let out = Guest::new(&daemon)
        .root_boot()
        .script(&script)
        .run()?
        .expect_success()?;
    let lines = out.value("LINES").unwrap_or("?").trim().to_owned();
    eprintln!("rootfs: the guest's listing of its root matched the source tree ({lines} lines)");
    if let Some(url) = url {
        daemon.terminate()?;
        drop(daemon);
        run(Command::new(env!("CARGO_BIN_EXE_pohmelfs")).args(["check", "--store", &url]))?;
    }
    Ok(())
}
