//! `scripts/ci-boot` with 4 guests at once (pohmelfs only: the recipe is pohmelfs's clones).
//! A busybox root is imported into a golden volume and snapshotted; ci-boot clones the
//! snapshot per job and boots the 4 guests with their root on their clone. Each job writes
//! a file of its own, appends to a file every clone shares, deletes another, and lists what
//! its root holds; job 3 exits 7. The test checks that ci-boot reports each job's status
//! (and fails as a whole for job 3), that each job saw only its own writes, in its output
//! and in its kept clone, and that the golden volume's files are byte for byte what they
//! were, its root lists none of the jobs' names, and `pohmelfs check` finds it clean once
//! the clones are deleted.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use pohmelfs::store::engine::ReadOnlyVolume;
use pohmelfs::store::{Store, ROOT_INO};

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

/// See the module documentation.
pub fn ci_boot_isolates_four_guests(vm: &VmTest) -> Result<()> {
    let tree = vm.dir().join("tree");
    build_tree(&tree, false)?;
    let golden = import_tree(vm, &tree, "golden")?;
    let pohmelfs = env!("CARGO_BIN_EXE_pohmelfs");
    run(Command::new(pohmelfs).args(["snapshot", "create", &golden, "base"]))?;
    let golden_dir = vm.dir().join("golden");
    let before = files(&golden_dir)?;
    let names_before = root_names(&golden)?;

    let image = guest_image()?;
    let (work, out) = (vm.dir().join("work"), vm.dir().join("out"));
    let accel = match accelerator()? {
        Accel::Kvm => "kvm",
        Accel::Tcg => "tcg",
    };
    let result = Command::new(crate::harness::repo_root().join("scripts/ci-boot"))
        .args(["--jobs", &JOBS.to_string(), "--snapshot", "base", "--keep"])
        .arg("--work")
        .arg(&work)
        .arg("--out")
        .arg(&out)
        .arg("--kernel")
        .arg(&image.kernel)
        .arg("--initramfs")
        .arg(&image.initramfs)
        .args(["--accel", accel, "--timeout", "300"])
        .args(["--pohmelfs", pohmelfs])
        .arg("--qemu")
        .arg(qemu_binary()?)
        .args([&golden, JOB])
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
        let clone = format!("file://{}/job-{n}", work.display());
        let mut expected_names = names_before.clone();
        expected_names.retain(|name| name != "linuxrc");
        expected_names.extend([format!("big-{n}"), format!("ci-{n}")]);
        expected_names.sort();
        let names = root_names(&clone)?;
        if names != expected_names {
            return Err(Failure::new(format!(
                "clone {n} holds {names:?}, expected {expected_names:?}"
            )));
        }
    }

    if files(&golden_dir)? != before {
        return Err(Failure::new(
            "the golden volume's files changed while its clones were written",
        ));
    }
    let names_after = root_names(&golden)?;
    if names_after != names_before {
        return Err(Failure::new(format!(
            "the golden volume's root changed: {names_before:?} -> {names_after:?}"
        )));
    }
    for n in 1..=JOBS {
        let clone = work.join(format!("job-{n}"));
        std::fs::remove_dir_all(&clone)
            .map_err(|e| Failure::new(format!("remove {}: {e}", clone.display())))?;
    }
    run(Command::new(pohmelfs).args(["snapshot", "delete", &golden, "base"]))?;
    run(Command::new(pohmelfs).args(["check", "--store", &golden]))?;
    Ok(())
}
