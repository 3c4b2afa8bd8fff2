//! A TCP relay that adds a fixed one-way delay in each direction: the stand-in for
//! `tc qdisc ... netem delay` on kernels built without netem (scripts/bench uses it only when
//! adding the netem qdisc fails).
//!
//! ```text
//! delay-relay LISTEN_ADDR TARGET_ADDR ONE_WAY_DELAY_US [PROBE_LISTEN_ADDR]
//! delay-relay probe PROBE_ADDR COUNT
//! ```
//!
//! Every chunk read from one side is written to the other side ONE_WAY_DELAY_US after it was
//! read, in order, so a request/answer exchange through the relay takes two delays more: the
//! round-trip time added is 2 × ONE_WAY_DELAY_US. Bandwidth is not limited. Each connection
//! gets its own connection to TARGET_ADDR and four threads (a reader and a writer per
//! direction); a bounded queue between them holds at most `QUEUE_CHUNKS × CHUNK_BYTES` per
//! direction. It never touches any address but the ones given (and an echo listener of its own
//! on 127.0.0.1).
//!
//! A sleeping thread wakes some tens of microseconds after its deadline, more on a busy host,
//! which would add itself to every chunk: each writer aims early by the lateness it has seen
//! (a moving average), so chunks leave on time on average.
//!
//! Connections to PROBE_LISTEN_ADDR go through the same delayed path to an echo server inside
//! the relay instead of TARGET_ADDR. `delay-relay probe` sends COUNT 64-byte messages through
//! it one at a time (the first waits up to 10 s for the relay to listen) and prints the round
//! trips: `rtt_us p50 P50 p99 P99 min MIN max MAX`. That is the link the store traffic sees.
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
/// Written chunks' buffers kept per direction for the next reads, at most (the rest are freed).
const REUSED_BUFFERS: usize = 16;
/// Bytes of one probe message.
const PROBE_BYTES: usize = 64;
/// How long a probe waits for the relay to listen.
const PROBE_CONNECT_WAIT: Duration = Duration::from_secs(10);
/// Probe messages at most.
const PROBE_COUNT_MAX: usize = 100_000;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() == 4 && args[1] == "probe" {
        let addr: SocketAddr = args[2].parse().unwrap_or_else(|e| fail("parse PROBE_ADDR", e));
        let count: usize = args[3].parse().unwrap_or_else(|e| fail("parse COUNT", e));
        if count == 0 || count > PROBE_COUNT_MAX {
            fail("COUNT", format!("{count} is not in 1..={PROBE_COUNT_MAX}"));
        }
        probe(addr, count);
        return;
    }
    if args.len() != 4 && args.len() != 5 {
        eprintln!("usage: delay-relay LISTEN_ADDR TARGET_ADDR ONE_WAY_DELAY_US [PROBE_LISTEN_ADDR]");
        eprintln!("       delay-relay probe PROBE_ADDR COUNT");
        std::process::exit(2);
    }
    let listen: SocketAddr = args[1].parse().unwrap_or_else(|e| fail("parse LISTEN_ADDR", e));
    let target: SocketAddr = args[2].parse().unwrap_or_else(|e| fail("parse TARGET_ADDR", e));
    let delay_us: u64 = args[3]
        .parse()
        .unwrap_or_else(|e| fail("parse ONE_WAY_DELAY_US", e));
    let delay = Duration::from_micros(delay_us);
    let listener = TcpListener::bind(listen).unwrap_or_else(|e| fail("bind", e));
    if let Some(probe_listen) = args.get(4) {
        let probe_listen: SocketAddr = probe_listen
            .parse()
            .unwrap_or_else(|e| fail("parse PROBE_LISTEN_ADDR", e));
        let probes = TcpListener::bind(probe_listen).unwrap_or_else(|e| fail("bind probe", e));
        let echo = TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| fail("bind echo", e));
        let echo_addr = echo.local_addr().unwrap_or_else(|e| fail("echo address", e));
        thread::spawn(move || serve_echo(echo));
        thread::spawn(move || accept(probes, echo_addr, delay));
        eprintln!("delay-relay: probes on {probe_listen}");
    }
    eprintln!("delay-relay: {listen} -> {target}, {delay_us} us each way");
    accept(listener, target, delay);
}

fn fail(what: &str, e: impl std::fmt::Display) -> ! {
    eprintln!("delay-relay: {what}: {e}");
    std::process::exit(2);
}

/// Relays every connection accepted on `listener` to `target`.
fn accept(listener: TcpListener, target: SocketAddr, delay: Duration) {
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

/// Echoes every byte of every connection back, a thread per connection.
fn serve_echo(listener: TcpListener) {
    for conn in listener.incoming().flatten() {
        let _ = conn.set_nodelay(true);
        thread::spawn(move || {
            let (Ok(mut rd), mut wr) = (conn.try_clone(), conn) else {
                return;
            };
            let mut buf = vec![0u8; CHUNK_BYTES];
            while let Ok(n @ 1..) = rd.read(&mut buf) {
                if wr.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        });
    }
}

/// Measures round trips through a relay's probe port and prints them.
fn probe(addr: SocketAddr, count: usize) {
    let deadline = Instant::now() + PROBE_CONNECT_WAIT;
    let mut conn = loop {
        match TcpStream::connect(addr) {
            Ok(c) => break c,
            Err(e) if Instant::now() >= deadline => fail("connect to the probe port", e),
            Err(_) => thread::sleep(Duration::from_millis(20)),
        }
    };
    let _ = conn.set_nodelay(true);
    let _ = conn.set_read_timeout(Some(PROBE_CONNECT_WAIT));
    let msg = [0x5au8; PROBE_BYTES];
    let mut back = [0u8; PROBE_BYTES];
    let mut rtts = Vec::with_capacity(count);
    for _ in 0..count {
        let t = Instant::now();
        conn.write_all(&msg).unwrap_or_else(|e| fail("probe write", e));
        conn.read_exact(&mut back).unwrap_or_else(|e| fail("probe read", e));
        rtts.push(t.elapsed().as_micros() as u64);
    }
    rtts.sort_unstable();
    let at = |q: usize| rtts[(rtts.len() - 1) * q / 100];
    println!(
        "rtt_us p50 {} p99 {} min {} max {}",
        at(50),
        at(99),
        rtts[0],
        rtts[rtts.len() - 1]
    );
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

/// Starts copying `from` → `to` with `delay`: one reader thread, one writer thread. Buffers go
/// back from the writer to the reader for reuse.
fn relay(from: &TcpStream, to: &TcpStream, delay: Duration) {
    let (Ok(from), Ok(to)) = (from.try_clone(), to.try_clone()) else {
        eprintln!("delay-relay: cannot clone a socket");
        return;
    };
    let (tx, rx) = sync_channel(QUEUE_CHUNKS);
    let (give_back, take_back) = sync_channel(REUSED_BUFFERS);
    thread::spawn(move || read_side(from, tx, take_back, delay));
    thread::spawn(move || {
        tight_timers();
        write_side(to, rx, give_back)
    });
}

/// The instant a chunk may be written, its buffer (of `CHUNK_BYTES`) and how many bytes of it
/// were read; 0 marks EOF.
type Chunk = (Instant, Vec<u8>, usize);

/// Reads chunks and queues each with the instant it may be written.
fn read_side(mut from: TcpStream, tx: SyncSender<Chunk>, reuse: Receiver<Vec<u8>>, delay: Duration) {
    loop {
        // A reused buffer is written over as it is: only its first `n` bytes go on.
        let mut buf = reuse.try_recv().unwrap_or_else(|_| vec![0u8; CHUNK_BYTES]);
        let n = from.read(&mut buf).unwrap_or(0);
        if tx.send((Instant::now() + delay, buf, n)).is_err() || n == 0 {
            return;
        }
    }
}

/// Writes each chunk once its instant has come; on EOF (or a write error) closes both ways.
fn write_side(mut to: TcpStream, rx: Receiver<Chunk>, reuse: SyncSender<Vec<u8>>) {
    // Moving average of how late a sleep ends, in ns: sleeps aim that much early.
    let mut late_ns: u64 = 0;
    while let Ok((due, buf, n)) = rx.recv() {
        let now = Instant::now();
        let early = Duration::from_nanos(late_ns);
        if due > now + early {
            let aim = due - early;
            thread::sleep(aim - now);
            let woke = Instant::now();
            let late = woke.saturating_duration_since(aim).as_nanos() as u64;
            // 1/8 weight: follows a change of load within tens of chunks.
            late_ns = late_ns - late_ns / 8 + late / 8;
        }
        if n == 0 || to.write_all(&buf[..n]).is_err() {
            break;
        }
        let _ = reuse.try_send(buf);
    }
    let _ = to.shutdown(Shutdown::Write);
}
