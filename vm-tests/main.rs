//! Guest boot tests: a Linux guest under QEMU mounts the file system over virtio-fs and runs a
//! workload against it.
//!
//! A test is a function taking the [`harness::VmTest`] of its run. The workloads:
//! - [`boot`]: the guest finds the device and mounts it;
//! - [`files`]: each POSIX operation with a check of its effect, many small files, fio with
//!   verification;
//! - [`durability`]: fsync through the page cache, remount, reboot, and a plain `sync` (or,
//!   under `--sync-on-close`, a close) before the daemon's SIGKILL;
//! - [`posix`]: pjdfstest in the guest;
//! - [`persistence`]: fsynced data after the daemon's SIGKILL, and after a store server restart;
//! - [`failover`]: a store server restarted under a guest's fsyncs;
//! - [`crash`]: power cuts and SIGKILLs around fsynced and dirty files, torture across restarts;
//! - [`space`]: a full volume answers ENOSPC;
//! - [`offline`]: writes return while the store server is paused, and only `sync` waits;
//! - [`migration`]: a live migration between two QEMU processes with files held open, and
//!   with a writer running through it (a log appended and fsynced every 50 ms, a file
//!   rewritten at full speed), and the downtimes;
//! - [`migration_hosts`]: the same between two daemons in network namespaces of their own
//!   reaching one store server or S3 service (root: `ip netns`);
//! - [`migration_back`]: between hosts on `pohmel://`, there and back to a third daemon, and
//!   with the store server killed and restarted during the migration;
//! - [`libvirt`]: pohmelfs started as libvirt starts a backend (inherited `--fd`, its argv of
//!   libvirt 9.0 and of current libvirt), and stopped with SIGTERM;
//! - [`libvirtd`]: a real libvirtd starts pohmelfs for a domain's `<filesystem>`, and two
//!   domains write and read back a volume through it;
//! - [`readonly`]: a snapshot served with `serve --readonly`: its point in time, and every
//!   change refused with EROFS;
//! - [`ci_boot`]: `scripts/ci-boot` boots 4 guests at once, each on its own clone of a
//!   golden root volume: each sees only its own writes, and the golden volume is unchanged;
//! - [`rootfs`]: a guest boots with its root on a volume `pohmelfs import` filled, and finds
//!   special files, owners, setuid bits, xattrs and hard links as in the source tree;
//!
//! the machinery lives in [`harness`], which also checks the daemon after every guest (no
//! panic; pohmelfs alive, `fs_internal_errors` 0).
//!
//! Most tests run twice, against pohmelfs and against the reference virtiofsd, as
//! `pohmelfs::<test>` and `virtiofsd::<test>` (e.g. `cargo test --test vm virtiofsd`). Those of
//! store servers (`pohmel://` volumes: restart, failover, the store server crash, torture
//! across restarts) and of a volume's capacity run against pohmelfs only, as
//! `pohmelfs_only::<test>`: virtiofsd has no store, and its shared directory has the host's
//! capacity.
//!
//! The guest image is built by `images/build-guest` on first use; QEMU, the image tools and
//! virtiofsd are installed by `scripts/test`. Missing tools fail the tests with the fix;
//! `POHMELFS_SKIP_VM_TESTS=1` skips them all and `POHMELFS_SKIP_VIRTIOFSD=1` skips the
//! reference runs.

// Test crate: a failed unwrap is a failed test, with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod boot;
mod ci_boot;
mod crash;
mod durability;
mod failover;
mod files;
mod harness;
mod libvirt;
mod libvirtd;
mod migration;
mod migration_back;
mod migration_hosts;
mod offline;
mod persistence;
mod posix;
mod readonly;
mod rootfs;
mod space;

/// Emits one `#[test]` per listed workload for one daemon.
macro_rules! tests_for_daemon {
    ($kind:ident; $($module:ident :: $test:ident),* $(,)?) => {
        $(
            #[test]
            fn $test() -> crate::harness::Result<()> {
                let kind = crate::harness::DaemonKind::$kind;
                let Some(vm) = crate::harness::VmTest::setup(kind, stringify!($test))? else {
                    return Ok(());
                };
                crate::$module::$test(&vm)?;
                vm.pass();
                Ok(())
            }
        )*
    };
}

/// Emits the `pohmelfs` and `virtiofsd` test modules, each with every listed workload.
macro_rules! vm_tests {
    ($($module:ident :: $test:ident),* $(,)?) => {
        /// The workloads against `pohmelfs serve`.
        mod pohmelfs {
            tests_for_daemon!(Pohmelfs; $($module::$test),*);
        }
        /// The same workloads against the reference virtiofsd.
        mod virtiofsd {
            tests_for_daemon!(Virtiofsd; $($module::$test),*);
        }
    };
}

vm_tests! {
    boot::boot_and_mount,
    files::round_trip,
    files::many_small_files,
    files::fio_verify,
    durability::big_file_fsync,
    durability::remount,
    durability::reboot,
    durability::plain_sync_survives_daemon_kill9,
    durability::sync_on_close_survives_daemon_kill9,
    posix::pjdfstest,
    persistence::fsynced_data_survives_daemon_kill,
    crash::crash_guest_power_cut,
    crash::crash_daemon_kill9,
    migration::live_migration_keeps_open_files,
    migration::live_migration_while_writing,
    migration::live_migration_while_appending,
    rootfs::rootfs_boot_keeps_special_files,
}

/// Tests of store servers (`pohmel://` volumes), of a volume's capacity, snapshots and clones,
/// and of pohmelfs's own command line as libvirt writes it: virtiofsd has no store or
/// snapshots, its shared directory has the host's capacity, and libvirt starts it with its own
/// options.
mod pohmelfs_only {
    tests_for_daemon!(
        Pohmelfs;
        persistence::store_server_restart,
        failover::failover_store_restart_under_guest_fsyncs,
        crash::crash_store_server_kill9,
        crash::crash_torture_across_restarts,
        space::full_volume_says_enospc,
        offline::writes_return_while_store_paused,
        libvirt::libvirt_argv_on_an_inherited_socket,
        libvirtd::libvirtd_starts_pohmelfs_for_a_domain,
        migration::refused_migration_resumes_at_the_source,
        migration_hosts::migration_between_hosts_pohmel,
        migration_hosts::migration_between_hosts_s3,
        migration_hosts::refused_migration_between_hosts_pohmel,
        migration_back::migration_there_and_back_pohmel,
        migration_back::store_restart_during_migration_pohmel,
        readonly::readonly_snapshot_refuses_changes,
        ci_boot::ci_boot_isolates_four_guests,
        ci_boot::ci_boot_isolates_four_guests_s3,
    );
}
