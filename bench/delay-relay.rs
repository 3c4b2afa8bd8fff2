//! A TCP relay that adds a fixed one-way delay in each direction: the stand-in for
//! `tc qdisc ... netem delay` on kernels built without netem (scripts/bench uses it only when
//! adding the netem qdisc fails).
//!
//! ```text
//! delay-relay LISTEN_ADDR TARGET_ADDR ONE_WAY_DELAY_US
//! ```
//!
//! Every chunk read from one side is written to the other side no earlier than
//! ONE_WAY_DELAY_US after it was read, in order, so a request/answer exchange through the relay
//! takes two delays more: the round-trip time added is 2 × ONE_WAY_DELAY_US. Bandwidth is not
//! limited. Each connection gets its own connection to TARGET_ADDR and four threads (a reader
//! and a writer per direction); a bounded queue between them holds at most
//! `QUEUE_CHUNKS × CHUNK_BYTES` per direction. It never touches any address but the two given.
//!
//! Built by scripts/bench with plain `rustc -O` (standard library only).

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::thread;
use std::time::{Duration, Instant};

/// Bytes read at most per chunk.
const CHUNK_BYTES: usize = 256 * 1024;
/// Chunks queued per direction at most (backpressure on the reader beyond).
const QUEUE_CHUNKS: usize = 1024;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 4 {
        eprintln!("usage: delay-relay LISTEN_ADDR TARGET_ADDR ONE_WAY_DELAY_US");
        std::process::exit(2);
    }
    let listen: SocketAddr = args[1].parse().unwrap_or_else(|e| fail("parse LISTEN_ADDR", e));
    let target: SocketAddr = args[2].parse().unwrap_or_else(|e| fail("parse TARGET_ADDR", e));
    let delay_us: u64 = args[3]
        .parse()
        .unwrap_or_else(|e| fail("parse ONE_WAY_DELAY_US", e));
    let delay = Duration::from_micros(delay_us);
    let listener = TcpListener::bind(listen).unwrap_or_else(|e| fail("bind", e));
    eprintln!("delay-relay: {listen} -> {target}, {delay_us} us each way");
    for client in listener.incoming() {
        let client = match client {
            Ok(c) => c,
            Err(e) => {
                eprintln!("delay-relay: accept: {e}");
                continue;
            }
        };
        let server = match TcpStream::connect(target) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("delay-relay: connect {target}: {e}");
                continue;
            }
        };
        for stream in [&client, &server] {
            let _ = stream.set_nodelay(true);
        }
        relay(&client, &server, delay);
        relay(&server, &client, delay);
    }
}

fn fail(what: &str, e: impl std::fmt::Display) -> ! {
    eprintln!("delay-relay: {what}: {e}");
    std::process::exit(2);
}

extern "C" {
    /// libc's prctl(2), which the standard library links already.
    fn prctl(option: i32, arg2: u64, arg3: u64, arg4: u64, arg5: u64) -> i32;
}

/// `PR_SET_TIMERSLACK` from <linux/prctl.h>.
const PR_SET_TIMERSLACK: i32 = 29;

/// Let this thread's sleeps end within 1 µs of their deadline: the default slack of 50 µs
/// (and more on a busy machine) would add itself to every delayed chunk.
fn tight_timers() {
    // SAFETY: PR_SET_TIMERSLACK takes a plain integer and only changes the calling thread's
    // timer slack; no memory is passed.
    unsafe {
        prctl(PR_SET_TIMERSLACK, 1_000, 0, 0, 0);
    }
}

/// Starts copying `from` → `to` with `delay`: one reader thread, one writer thread.
fn relay(from: &TcpStream, to: &TcpStream, delay: Duration) {
    let (Ok(from), Ok(to)) = (from.try_clone(), to.try_clone()) else {
        eprintln!("delay-relay: cannot clone a socket");
        return;
    };
    let (tx, rx) = sync_channel(QUEUE_CHUNKS);
    thread::spawn(move || read_side(from, tx, delay));
    thread::spawn(move || {
        tight_timers();
        write_side(to, rx)
    });
}

/// Reads chunks and queues each with the instant it may be written; an empty chunk marks EOF.
fn read_side(mut from: TcpStream, tx: SyncSender<(Instant, Vec<u8>)>, delay: Duration) {
    loop {
        let mut buf = vec![0u8; CHUNK_BYTES];
        let n = from.read(&mut buf).unwrap_or(0);
        buf.truncate(n);
        if tx.send((Instant::now() + delay, buf)).is_err() || n == 0 {
            return;
        }
    }
}

/// Writes each chunk once its instant has come; on EOF (or a write error) closes both ways.
fn write_side(mut to: TcpStream, rx: Receiver<(Instant, Vec<u8>)>) {
    while let Ok((due, buf)) = rx.recv() {
        let now = Instant::now();
        if due > now {
            thread::sleep(due - now);
        }
        if buf.is_empty() || to.write_all(&buf).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}
