//! POSIX conformance in the guest: pjdfstest on the virtio-fs mount, for pohmelfs and for
//! the reference virtiofsd on the same guest. The counts are written to
//! `target/vm-tests/pjdfstest-<daemon>.txt`, which `scripts/test` prints.

use std::time::Duration;

use crate::harness::{target_dir, DaemonKind, Failure, Guest, Result, VmTest};

/// `passed failed skipped` from pjdfstest's `Summary:` line.
fn counts(summary: &str) -> Option<(u32, u32, u32)> {
    let number_before = |word: &str| -> Option<u32> {
        let words: Vec<&str> = summary
            .split([' ', ','])
            .filter(|w| !w.is_empty())
            .collect();
        let i = words.iter().position(|w| *w == word)?;
        words.get(i.checked_sub(1)?)?.parse().ok()
    };
    Some((
        number_before("passed")?,
        number_before("failed")?,
        number_before("skipped")?,
    ))
}

/// pjdfstest on the mount; pohmelfs must fail none, and both must pass most.
pub fn pjdfstest(vm: &VmTest) -> Result<()> {
    let mut builder = vm.daemon();
    if vm.kind() == DaemonKind::Pohmelfs {
        builder = builder.arg("--allow-device-nodes");
    }
    let daemon = builder.start()?;
    let out = Guest::new(&daemon)
        .with_pjdfstest()
        .timeout(Duration::from_secs(900))
        .script(
            r#"
step mount
mount -t virtiofs "$TAG" /mnt
mkdir /mnt/pjd
chmod 755 /mnt /mnt/pjd
step pjdfstest
NO_COLOR=1 pjdfstest -c /etc/pjdfstest.toml -p /mnt/pjd > /tmp/pjd.out 2>&1 || true
grep -E ' (FAILED|UNEXPECTEDLY)' /tmp/pjd.out | sed 's/^/PJDFAIL /' || true
summary=$(grep '^Summary:' /tmp/pjd.out) || { tail -20 /tmp/pjd.out; fail "pjdfstest did not finish"; }
echo "PJDFSTEST=$summary"
"#,
        )
        .run()?
        .expect_success()?;
    let summary = out
        .value("PJDFSTEST")
        .ok_or_else(|| Failure::new("the guest printed no PJDFSTEST= line"))?
        .to_owned();
    let (passed, failed, skipped) = counts(&summary)
        .ok_or_else(|| Failure::new(format!("cannot read counts from {summary:?}")))?;
    let line = format!(
        "pjdfstest guest {}: {passed} passed, {failed} failed, {skipped} skipped",
        vm.kind()
    );
    eprintln!("{line}");
    let report = target_dir()
        .join("vm-tests")
        .join(format!("pjdfstest-{}.txt", vm.kind()));
    std::fs::write(&report, format!("{line}\n"))
        .map_err(|e| Failure::new(format!("write {}: {e}", report.display())))?;
    if passed < 300 {
        return Err(Failure::new(format!(
            "{line}: expected at least 300 passing tests"
        )));
    }
    if vm.kind() == DaemonKind::Pohmelfs && failed > 0 {
        let failures: Vec<&str> = out
            .console
            .lines()
            .filter(|l| l.starts_with("PJDFAIL "))
            .collect();
        return Err(Failure::new(format!(
            "{line}: pohmelfs must fail none (see docs/posix.md):\n{}",
            failures.join("\n")
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::counts;

    #[test]
    fn summary_counts_parse() {
        assert_eq!(
            counts("Summary: 384 passed, 0 failed, 14 skipped"),
            Some((384, 0, 14))
        );
        assert_eq!(counts("nothing"), None);
    }
}
