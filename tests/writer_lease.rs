//! The liveness of a `pohmel://` volume's writer (`docs/protocol.md`,
//! "Writer claim"), with real processes: a `pohmelfs store` server on
//! 127.0.0.1 with a short writer lease and `pohmelfs serve` daemons on one
//! volume. A second daemon is refused while the first lives, naming it;
//! it opens the volume once the first is killed (SIGKILL), or once the
//! first, stopped (SIGSTOP), went unheard for a lease; a daemon started on
//! a restarted server waits the lease the server keeps the volume for the
//! writer it recorded; `--take-over` opens it at once.

// Test crate: a failed unwrap is a failed test, with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs::File;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use pohmelfs_testkit::store::secret_file;
use pohmelfs_testkit::{wait_until, ChildGuard, ScratchDir, StoreServer};

const SECRET: &str = "lease-secret-1234";
const POHMELFS: &str = env!("CARGO_BIN_EXE_pohmelfs");
/// The server's writer lease, and how often a claimed daemon makes itself
/// heard: ten keepalives a lease.
const LEASE_MS: u64 = 2000;
const KEEPALIVE_MS: u64 = 200;
const TIMEOUT: Duration = Duration::from_secs(60);
const POLL: Duration = Duration::from_millis(20);

struct Setup {
    dir: ScratchDir,
    server: StoreServer,
}

impl Setup {
    fn new(name: &str) -> Setup {
        let dir = ScratchDir::new(name).unwrap();
        let data = format!("file://{}/volumes", dir.path().display());
        let lease = LEASE_MS.to_string();
        let server = StoreServer::start_with(
            POHMELFS,
            dir.path(),
            "s",
            &data,
            Some(SECRET),
            &["--writer-lease-ms", &lease],
        )
        .unwrap();
        Setup { dir, server }
    }

    fn url(&self) -> String {
        format!(
            "pohmel://{}/vol?secret_file={}&timeout_ms=2000&give_up_ms=10000&keepalive_ms={KEEPALIVE_MS}",
            self.server.addr(),
            secret_file(self.dir.path()).display()
        )
    }

    fn log(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}.log"))
    }

    /// Start daemon `name` on the volume with `args`; it either serves
    /// (`Ok`, its log says it waits for a frontend) or exits (`Err`, its
    /// log).
    fn serve(&self, name: &str, args: &[&str]) -> Result<ChildGuard, String> {
        let log = self.log(name);
        let mut child = ChildGuard(
            Command::new(POHMELFS)
                .args(["serve", "--socket-path"])
                .arg(self.dir.path().join(format!("{name}.sock")))
                .arg("--store")
                .arg(self.url())
                .args(args)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(File::create(&log).unwrap())
                .spawn()
                .unwrap(),
        );
        let outcome = wait_until(TIMEOUT, POLL, || {
            if child.exited().is_some() {
                return Some(false);
            }
            std::fs::read_to_string(&log)
                .ok()?
                .contains("waiting for a frontend")
                .then_some(true)
        });
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        match outcome {
            Some(true) => Ok(child),
            Some(false) => Err(text),
            None => panic!("daemon {name} neither served nor exited in {TIMEOUT:?}: {text}"),
        }
    }

    /// The session daemon `name` logged when it connected.
    fn session(&self, name: &str) -> String {
        let text = std::fs::read_to_string(self.log(name)).unwrap();
        let line = text
            .lines()
            .find(|l| l.contains("connected to store"))
            .unwrap_or_else(|| panic!("no connection in {text}"));
        let at = line.find("session=").expect("a session") + "session=".len();
        line[at..at + 16].to_owned()
    }

    /// Wait until the server logged every connection closed (or ended
    /// with an error): as many as were authenticated.
    fn wait_closed(&self) {
        let counts = |text: &str| {
            let opened = text.matches("client authenticated").count();
            let closed = text.matches("connection closed").count()
                + text.matches("connection ended").count();
            (opened, closed)
        };
        let ok = wait_until(TIMEOUT, POLL, || {
            let (opened, closed) = counts(&self.server.log_text());
            opened == closed
        });
        assert!(
            ok.is_some(),
            "connections still open: {:?}",
            counts(&self.server.log_text())
        );
    }
}

/// The log of a daemon that must have been refused.
fn refusal(outcome: Result<ChildGuard, String>, what: &str) -> String {
    match outcome {
        Ok(_) => panic!("{what}: it serves"),
        Err(log) => log,
    }
}

/// The refusal a daemon logged names the live writer.
fn assert_refused_naming(log: &str, session: &str) {
    assert!(log.contains("writer is alive"), "{log}");
    assert!(
        log.contains(&format!("session {session} from 127.0.0.1:")),
        "{log}"
    );
    assert!(log.contains("--take-over"), "{log}");
}

#[test]
fn a_second_daemon_is_refused_while_the_first_lives_and_serves_once_it_is_killed() {
    let s = Setup::new("it-lease-kill");
    let mut first = s.serve("first", &[]).expect("the first daemon serves");
    let claimed = Instant::now();
    let session = s.session("first");

    let refused = refusal(s.serve("second", &[]), "a second daemon");
    assert_refused_naming(&refused, &session);
    // An idle writer keeps its claim past its lease: its keepalives are
    // what the server hears.
    let after = claimed + Duration::from_millis(3 * LEASE_MS);
    std::thread::sleep(after.saturating_duration_since(Instant::now()));
    let refused = refusal(s.serve("third", &[]), "a daemon after a lease");
    assert_refused_naming(&refused, &session);

    // Killed, its connection closes: the volume is free at once.
    first.kill();
    s.wait_closed();
    let _fourth = s
        .serve("fourth", &[])
        .expect("serves once the first is dead");
    let log = s.server.log_text();
    assert!(log.contains("claim refused"), "{log}");
}

#[test]
fn a_stopped_writer_loses_the_volume_after_its_lease() {
    let s = Setup::new("it-lease-stop");
    let first = s.serve("first", &[]).expect("the first daemon serves");
    let session = s.session("first");
    // Stopped, it holds its connection open and sends nothing.
    let pid = first.0.id().to_string();
    assert!(Command::new("kill")
        .args(["-STOP", &pid])
        .status()
        .unwrap()
        .success());
    let stopped = Instant::now();
    let refused = refusal(s.serve("second", &[]), "a daemon within the lease");
    assert_refused_naming(&refused, &session);
    // Tried again until granted, which needs the lease to pass unheard.
    let mut tries = 0;
    let served = wait_until(TIMEOUT, Duration::from_millis(100), || {
        tries += 1;
        s.serve(&format!("try{tries}"), &[]).ok()
    });
    let waited = stopped.elapsed();
    let _cont = Command::new("kill").args(["-CONT", &pid]).status();
    let _served = served.expect("a stopped writer's claim expires");
    assert!(
        waited >= Duration::from_millis(LEASE_MS - KEEPALIVE_MS),
        "granted after {waited:?}, within the lease"
    );
    drop(first);
}

/// A restarted server gives the writer it recorded a lease to come back: a daemon started
/// while that writer cannot (stopped with SIGSTOP before the restart) waits, and serves once
/// the lease after the server opened the volume again is over.
#[test]
fn a_restarted_server_keeps_the_volume_for_its_writer_a_lease() {
    let mut s = Setup::new("it-lease-restart");
    let first = s.serve("first", &[]).expect("the first daemon serves");
    let pid = first.0.id().to_string();
    assert!(Command::new("kill")
        .args(["-STOP", &pid])
        .status()
        .unwrap()
        .success());
    s.server.kill9();
    s.server.restart().unwrap();
    let restarted = Instant::now();
    let second = s.serve("second", &[]);
    let waited = restarted.elapsed();
    let _cont = Command::new("kill").args(["-CONT", &pid]).status();
    let _second = second.expect("a daemon serves once the recorded writer's lease is over");
    let log = std::fs::read_to_string(s.log("second")).unwrap();
    assert!(
        log.contains("keeps the volume a while for its last writer"),
        "{log}"
    );
    assert!(
        waited >= Duration::from_millis(LEASE_MS),
        "served after {waited:?}, within the lease"
    );
    drop(first);
}

/// A migration destination's open (the volume slot of `serve --incoming`) waits while
/// another daemon is the volume's live writer, and gives up at its bound naming it; once that
/// daemon is gone (SIGKILL) the same open succeeds at once.
#[test]
fn a_destination_waits_for_the_live_writer_and_opens_once_it_is_gone() {
    use pohmelfs::writeback::slot::{Opener, SlotError, VolumeSlot};
    let s = Setup::new("it-lease-slot");
    let mut first = s.serve("first", &[]).expect("the first daemon serves");
    let session = s.session("first");
    let url = s.url();
    let opener: Opener = Box::new(move |spare, standby| {
        pohmelfs::writeback::open_from(
            &url,
            pohmelfs::writeback::TxnConfig::default(),
            None,
            std::sync::Arc::default(),
            pohmelfs::store::engine::OpenMode::Existing { take_over: false },
            spare,
            standby,
        )
    });
    let wait = Duration::from_secs(1);
    let slot = VolumeSlot::incoming(&s.url(), opener, wait);
    let started = Instant::now();
    match slot.acquire(&[]) {
        Err(SlotError::StillHeld { holder, .. }) => {
            assert!(
                holder.starts_with(&format!("session {session} from 127.0.0.1:")),
                "{holder}"
            );
        }
        other => panic!("expected StillHeld, got {other:?}"),
    }
    assert!(started.elapsed() >= wait, "gave up before its bound");
    first.kill();
    s.wait_closed();
    slot.acquire(&[]).expect("open once the writer is gone");
    assert!(slot.current().is_some());
}

#[test]
fn take_over_opens_a_volume_a_live_daemon_serves() {
    let s = Setup::new("it-lease-takeover");
    let _first = s.serve("first", &[]).expect("the first daemon serves");
    let session = s.session("first");
    let _second = s
        .serve("second", &["--take-over"])
        .expect("--take-over serves");
    let log = s.server.log_text();
    assert!(
        log.contains("volume taken over from a live writer"),
        "{log}"
    );
    assert!(log.contains(&format!("session {session}")), "{log}");
}
