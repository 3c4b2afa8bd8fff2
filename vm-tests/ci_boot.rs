//! `scripts/ci-boot` with 4 guests at once (pohmelfs only: the recipe is pohmelfs's clones),
//! on a `file://` golden volume and on an `s3://` one in an S3 service (moto). A busybox root
//! is imported into a golden volume and snapshotted; ci-boot clones the snapshot per job and
//! boots the 4 guests with their root on their clone. Each job writes a file of its own,
//! appends to a file every clone shares, deletes another, and lists what its root holds; job 3
//! exits 7. The test checks that ci-boot reports each job's status (and fails as a whole for
//! job 3), that each job saw only its own writes, in its output and in its kept clone, and
//! that the golden volume holds what it held (on `file://` its files byte for byte, on both
//! every name, mode and byte of its tree), its root lists none of the jobs' names, and
//! `pohmelfs check` finds it clean once the clones are deleted; on `s3://` the deleted clones
//! leave no object behind.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use pohmelfs::store::engine::ReadOnlyVolume;
use pohmelfs::store::{FileKind, Store, ROOT_INO};
use pohmelfs_testkit::Moto;

use crate::harness::image::guest_image;
use crate::harness::qemu::{accelerator, qemu_binary, Accel};
use crate::harness::{Failure, Result, VmTest};
use crate::rootfs::{build_tree, import_tree, run};

const JOBS: u32 = 4;

/// Each job's command (run by ci-boot in its guest's root).
const JOB: &str = r#"set -e
echo "job $CI_JOB" >/ci-$CI_JOB
head -c 300000 /dev/urandom >/big-$CI_JOB
echo "changed by $CI_JOB" >>/init
rm /linuxrc
sync
echo "SEEN=$(ls / | grep -e '^ci-' -e '^big-' -e '^linuxrc$' | tr '\n' ' ')"
[ "$CI_JOB" != 3 ] || exit 7"#;

/// Every file below `dir` with its bytes.
fn files(dir: &Path) -> Result<BTreeMap<PathBuf, Vec<u8>>> {
    let mut out = BTreeMap::new();
    let mut todo = vec![dir.to_owned()];
    while let Some(d) = todo.pop() {
        let entries = std::fs::read_dir(&d)
            .map_err(|e| Failure::new(format!("read {}: {e}", d.display())))?;
        for e in entries {
            let path = e
                .map_err(|e| Failure::new(format!("read {}: {e}", d.display())))?
                .path();
            if path.is_dir() {
                todo.push(path);
            } else {
                let bytes = std::fs::read(&path)
                    .map_err(|e| Failure::new(format!("read {}: {e}", path.display())))?;
                out.insert(path, bytes);
            }
        }
    }
    Ok(out)
}

/// The names in the root directory of the volume at `url`, opened read-only.
fn root_names(url: &str) -> Result<Vec<String>> {
    let volume = ReadOnlyVolume::open(url)
        .map_err(|e| Failure::new(format!("open {url} read-only: {e}")))?;
    let entries = volume
        .readdir(ROOT_INO, 0, 10_000)
        .map_err(|e| Failure::new(format!("readdir of {url}: {e}")))?;
    let mut names: Vec<String> = entries
        .iter()
        .map(|d| String::from_utf8_lossy(&d.name).into_owned())
        .collect();
    names.sort();
    Ok(names)
}

/// A file ci-boot wrote, trimmed.
fn read_out(path: &Path) -> Result<String> {
    std::fs::read_to_string(path)
        .map(|s| s.replace('\r', "").trim().to_owned())
        .map_err(|e| Failure::new(format!("read {}: {e}", path.display())))
}

/// What the volume at `url` (opened read-only) holds below its root: each path with its
/// mode and its bytes (a file's data, a symlink's target; nothing for the other kinds).
fn volume_tree(url: &str) -> Result<BTreeMap<String, (u32, Vec<u8>)>> {
    let volume = ReadOnlyVolume::open(url)
        .map_err(|e| Failure::new(format!("open {url} read-only: {e}")))?;
    let fail = |what: String| move |e| Failure::new(format!("{what} in {url}: {e}"));
    let mut out = BTreeMap::new();
    let mut todo = vec![(ROOT_INO, String::new())];
    while let Some((dir, path)) = todo.pop() {
        let mut after = 0;
        loop {
            let entries = volume
                .readdir(dir, after, 1_000)
                .map_err(fail(format!("readdir {path}/")))?;
            let Some(last) = entries.last() else { break };
            after = last.cookie;
            for entry in &entries {
                let name = format!("{path}/{}", String::from_utf8_lossy(&entry.name));
                let inode = volume
                    .get_inode(entry.ino)
                    .map_err(fail(format!("inode of {name}")))?
                    .ok_or_else(|| Failure::new(format!("{name}: no inode in {url}")))?;
                let bytes = match entry.kind {
                    FileKind::Regular => {
                        let len = usize::try_from(inode.size)
                            .map_err(|_| Failure::new(format!("{name}: {} bytes", inode.size)))?;
                        let mut buf = vec![0; len];
                        volume
                            .read(entry.ino, 0, &mut buf)
                            .map_err(fail(format!("read {name}")))?;
                        buf
                    }
                    FileKind::Symlink => volume
                        .readlink(entry.ino)
                        .map_err(fail(format!("readlink {name}")))?
                        .unwrap_or_default(),
                    FileKind::Directory => {
                        todo.push((entry.ino, name.clone()));
                        Vec::new()
                    }
                    _ => Vec::new(),
                };
                out.insert(name, (entry.kind.mode_bits() | inode.perm, bytes));
            }
        }
    }
    Ok(out)
}

/// Where a test's golden volume and its clones live.
enum Place {
    /// In directories of the test's own.
    File,
    /// In a bucket of an S3 service (moto) of the test's own.
    S3(Moto),
}

impl Place {
    /// The environment `pohmelfs` commands (and ci-boot) need for this place's URLs.
    fn env(&self) -> &'static [(&'static str, &'static str)] {
        match self {
            Place::File => &[],
            Place::S3(_) => &Moto::CLI_ENV,
        }
    }

    /// `pohmelfs` with this place's environment.
    fn pohmelfs(&self) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_pohmelfs"));
        command.envs(self.env().iter().copied());
        command
    }

    /// The golden volume, `tree` imported: its URL for commands and for this process (which
    /// has no credentials in its environment).
    fn golden(&self, vm: &VmTest, tree: &Path) -> Result<(String, String)> {
        match self {
            Place::File => import_tree(vm, tree, "golden").map(|url| (url.clone(), url)),
            Place::S3(moto) => {
                let url = moto.cli_url("golden");
                run(self.pohmelfs().args(["format", &url]))?;
                run(self.pohmelfs().arg("import").arg(tree).arg(&url))?;
                Ok((url, moto.url("golden")))
            }
        }
    }

    /// The URLs (for commands, for this process) of job `n`'s clone, which ci-boot kept.
    fn clone_of(&self, work: &Path, n: u32) -> Result<(String, String)> {
        match self {
            Place::File => {
                let url = format!("file://{}/job-{n}", work.display());
                Ok((url.clone(), url))
            }
            Place::S3(moto) => {
                // ci-boot names its clones GOLDEN.ci-boot-PID/job-N.
                let prefix = self.clone_prefix()?.ok_or_else(|| {
                    Failure::new("ci-boot left no clone in the bucket (it ran with --keep)")
                })?;
                let name = format!("{prefix}/job-{n}");
                Ok((moto.cli_url(&name), moto.url(&name)))
            }
        }
    }

    /// On S3, the prefix ci-boot put its clones under (`None` when no object is left there).
    fn clone_prefix(&self) -> Result<Option<String>> {
        let Place::S3(moto) = self else {
            return Ok(None);
        };
        let keys = moto
            .keys("golden.ci-boot-")
            .map_err(|e| Failure::new(format!("list the bucket: {e}")))?;
        Ok(keys
            .first()
            .and_then(|k| k.split('/').next())
            .map(str::to_owned))
    }

    /// Delete the clone of job `n` (its URL for commands).
    fn delete_clone(&self, work: &Path, n: u32, url: &str) -> Result<()> {
        match self {
            Place::File => {
                let clone = work.join(format!("job-{n}"));
                std::fs::remove_dir_all(&clone)
                    .map_err(|e| Failure::new(format!("remove {}: {e}", clone.display())))
            }
            Place::S3(_) => run(self.pohmelfs().args(["clone", "--delete", url])).map(drop),
        }
    }
}

/// See the module documentation: on `file://`.
pub fn ci_boot_isolates_four_guests(vm: &VmTest) -> Result<()> {
    isolates_four_guests(vm, Place::File)
}

/// See the module documentation: on `s3://`.
pub fn ci_boot_isolates_four_guests_s3(vm: &VmTest) -> Result<()> {
    let moto = Moto::start(vm.dir(), "ci-boot")?;
    isolates_four_guests(vm, Place::S3(moto))
}

/// Fails unless the golden volume (its URL here, its directory on `file://`) holds what it
/// held before the jobs: its files (`file://`), its tree and its root's names.
fn expect_unchanged(
    golden_here: &str,
    golden_dir: &Path,
    files_before: Option<BTreeMap<PathBuf, Vec<u8>>>,
    tree_before: &BTreeMap<String, (u32, Vec<u8>)>,
    names_before: &[String],
) -> Result<()> {
    if let Some(before) = files_before {
        if files(golden_dir)? != before {
            return Err(Failure::new(
                "the golden volume's files changed while its clones were written",
            ));
        }
    }
    let tree_after = volume_tree(golden_here)?;
    if tree_after != *tree_before {
        let changed: Vec<&String> = tree_before
            .keys()
            .chain(tree_after.keys())
            .filter(|k| tree_before.get(*k) != tree_after.get(*k))
            .take(10)
            .collect();
        return Err(Failure::new(format!(
            "the golden volume's tree changed while its clones were written: {changed:?}"
        )));
    }
    let names_after = root_names(golden_here)?;
    if names_after != names_before {
        return Err(Failure::new(format!(
            "the golden volume's root changed: {names_before:?} -> {names_after:?}"
        )));
    }
    Ok(())
}

/// Runs ci-boot on snapshot `base` of `golden`, the clones kept in `work`, the outputs in
/// `out`; its report, once it exited with status 1 (job 3 fails).
fn run_ci_boot(place: &Place, golden: &str, work: &Path, out: &Path) -> Result<String> {
    let image = guest_image()?;
    let accel = match accelerator()? {
        Accel::Kvm => "kvm",
        Accel::Tcg => "tcg",
    };
    let result = Command::new(crate::harness::repo_root().join("scripts/ci-boot"))
        .envs(place.env().iter().copied())
        .args(["--jobs", &JOBS.to_string(), "--snapshot", "base", "--keep"])
        .arg("--work")
        .arg(work)
        .arg("--out")
        .arg(out)
        .arg("--kernel")
        .arg(&image.kernel)
        .arg("--initramfs")
        .arg(&image.initramfs)
        .args(["--accel", accel, "--timeout", "300"])
        .args(["--pohmelfs", env!("CARGO_BIN_EXE_pohmelfs")])
        .arg("--qemu")
        .arg(qemu_binary()?)
        .args([golden, JOB])
        .output()
        .map_err(|e| Failure::new(format!("run scripts/ci-boot: {e}")))?;
    let report = format!(
        "scripts/ci-boot ({}):\n{}{}",
        result.status,
        String::from_utf8_lossy(&result.stdout),
        String::from_utf8_lossy(&result.stderr)
    );
    eprintln!("{report}");
    if result.status.code() != Some(1) {
        return Err(Failure::new(format!(
            "expected exit status 1 (job 3 exits 7): {report}"
        )));
    }
    Ok(report)
}

fn isolates_four_guests(vm: &VmTest, place: Place) -> Result<()> {
    let tree = vm.dir().join("tree");
    build_tree(&tree, false)?;
    let (golden, golden_here) = place.golden(vm, &tree)?;
    run(place
        .pohmelfs()
        .args(["snapshot", "create", &golden, "base"]))?;
    let golden_dir = vm.dir().join("golden");
    let files_before = match place {
        Place::File => Some(files(&golden_dir)?),
        Place::S3(_) => None,
    };
    let tree_before = volume_tree(&golden_here)?;
    let names_before = root_names(&golden_here)?;

    let (work, out) = (vm.dir().join("work"), vm.dir().join("out"));
    let report = run_ci_boot(&place, &golden, &work, &out)?;
    let mut clones = Vec::new();
    for n in 1..=JOBS {
        let status = read_out(&out.join(format!("job-{n}.status")))?;
        let expected = if n == 3 { "7" } else { "0" };
        if status != expected {
            return Err(Failure::new(format!(
                "job {n}: status {status}, expected {expected}; {report}"
            )));
        }
        let output = read_out(&out.join(format!("job-{n}.out")))?;
        let seen = output
            .lines()
            .find_map(|l| l.strip_prefix("SEEN="))
            .unwrap_or("(no SEEN= line)")
            .trim();
        if seen != format!("big-{n} ci-{n}") {
            return Err(Failure::new(format!(
                "job {n} saw {seen:?} in its root, expected only its own big-{n} and ci-{n}:\n\
                 {output}"
            )));
        }
        let (clone, clone_here) = place.clone_of(&work, n)?;
        let mut expected_names = names_before.clone();
        expected_names.retain(|name| name != "linuxrc");
        expected_names.extend([format!("big-{n}"), format!("ci-{n}")]);
        expected_names.sort();
        let names = root_names(&clone_here)?;
        if names != expected_names {
            return Err(Failure::new(format!(
                "clone {n} holds {names:?}, expected {expected_names:?}"
            )));
        }
        clones.push(clone);
    }

    expect_unchanged(
        &golden_here,
        &golden_dir,
        files_before,
        &tree_before,
        &names_before,
    )?;
    for (n, clone) in (1..=JOBS).zip(&clones) {
        place.delete_clone(&work, n, clone)?;
    }
    if let Some(prefix) = place.clone_prefix()? {
        return Err(Failure::new(format!(
            "objects left under {prefix}/ after every clone was deleted"
        )));
    }
    run(place
        .pohmelfs()
        .args(["snapshot", "delete", &golden, "base"]))?;
    run(place.pohmelfs().args(["check", "--store", &golden]))?;
    Ok(())
}
