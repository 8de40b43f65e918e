//! A fault-injecting TCP relay of the test's own, between a proxy and its
//! upstream (`tc netem` is not available here: no `sch_netem` in the
//! kernel). Byte-transparent: each read from one side is written to the
//! other, after the faults it draws:
//!
//! - latency: every read waits `latency` plus a uniform draw from
//!   `jitter` before it is forwarded (per direction, in order);
//! - cuts: with probability `cut_per_mille`, a read from the upstream is
//!   not forwarded and both sides are reset (SO_LINGER 0): on a plain HTTP
//!   upstream, a connection that dies after the request went out and
//!   before any byte of its response;
//! - stalls: with probability `stall_per_mille`, a read from the upstream
//!   waits `stall` more before it is forwarded;
//! - cuts mid-response: with probability `cut_mid_per_mille`, a read from
//!   the upstream other than the connection's first has only its first
//!   half forwarded, then both sides are reset: a response whose head and
//!   part of whose body already went on dies (on a keep-alive connection
//!   such a read may also start the next response);
//! - resets after the handshake: with probability `reset_after_handshake_per_mille`
//!   per connection, its third read from the client (after the ClientHello
//!   and the client's Finished: its first request, when the request came
//!   in a read of its own) is not forwarded and both sides are reset: a
//!   TLS connection that dies as soon as it is up, before it answers;
//! - half-open: with probability `half_open_per_mille` per connection, the
//!   relay accepts it and never connects upstream: what the client sends
//!   is read and dropped, nothing is answered and the socket stays open
//!   until the client closes it (a peer that went away behind a middlebox
//!   still holding the connection: no reset, no FIN, no byte).
//!
//! Counts what it did, so a test can hold the proxy to it.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[derive(Clone, Debug, Default)]
pub struct Faults {
    pub latency: Duration,
    pub jitter: Duration,
    pub cut_per_mille: u64,
    pub cut_mid_per_mille: u64,
    pub stall_per_mille: u64,
    pub stall: Duration,
    pub reset_after_handshake_per_mille: u64,
    pub half_open_per_mille: u64,
}

#[derive(Default, Debug)]
pub struct Stats {
    pub connections: AtomicU64,
    pub cuts: AtomicU64,
    pub mid_cuts: AtomicU64,
    pub stalls: AtomicU64,
    pub handshake_resets: AtomicU64,
    pub half_open: AtomicU64,
}

pub struct Relay {
    pub addr: SocketAddr,
    pub stats: Arc<Stats>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A small deterministic generator (a test must be reproducible).
struct Draw(u64);

impl Draw {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }

    fn per_mille(&mut self, p: u64) -> bool {
        p > 0 && self.next() % 1000 < p
    }

    fn upto(&mut self, d: Duration) -> Duration {
        let us = d.as_micros() as u64;
        if us == 0 {
            Duration::ZERO
        } else {
            Duration::from_micros(self.next() % (us + 1))
        }
    }
}

/// Make closing `fd` send a reset (SO_LINGER with a zero timeout).
pub fn linger_zero(fd: std::os::fd::RawFd) {
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt(2) on a socket this relay owns, with a valid struct.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&l as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

impl Relay {
    pub async fn start(upstream: SocketAddr, faults: Faults) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stats = Arc::new(Stats::default());
        let s = stats.clone();
        let task = tokio::spawn(async move {
            let mut seed = 1;
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                seed += 1;
                let n = s.connections.fetch_add(1, Ordering::Relaxed);
                let (faults, stats) = (faults.clone(), s.clone());
                if Draw(seed * 104_729 + n).per_mille(faults.half_open_per_mille) {
                    stats.half_open.fetch_add(1, Ordering::Relaxed);
                    tokio::spawn(async move {
                        let mut client = client;
                        let mut sink = [0u8; 4096];
                        while matches!(client.read(&mut sink).await, Ok(n) if n > 0) {}
                    });
                    continue;
                }
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    pump_pair(client, server, faults, stats, seed * 7919 + n).await;
                });
            }
        });
        Relay { addr, stats, task }
    }
}

async fn pump_pair(client: TcpStream, server: TcpStream, f: Faults, stats: Arc<Stats>, seed: u64) {
    use std::os::fd::AsRawFd;
    let fds = (client.as_raw_fd(), server.as_raw_fd());
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    let up_faults = f.clone();
    let cut = Arc::new(tokio::sync::Notify::new());
    let (up_cut, up_stats) = (cut.clone(), stats.clone());
    // Client → upstream: latency, and the reset after the handshake.
    let up = tokio::spawn(async move {
        let mut draw = Draw(seed ^ 0x5bd1e995);
        let reset_at_third = draw.per_mille(up_faults.reset_after_handshake_per_mille);
        let mut buf = vec![0u8; 16 * 1024];
        let mut reads = 0;
        loop {
            let n = match cr.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            reads += 1;
            if reset_at_third && reads == 3 {
                up_stats.handshake_resets.fetch_add(1, Ordering::Relaxed);
                linger_zero(fds.0);
                linger_zero(fds.1);
                up_cut.notify_one();
                return;
            }
            tokio::time::sleep(up_faults.latency + draw.upto(up_faults.jitter)).await;
            if sw.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
        let _ = sw.shutdown().await;
    });
    // Upstream → client: latency, stalls, cuts.
    let mut draw = Draw(seed);
    let mut buf = vec![0u8; 16 * 1024];
    let mut reads = 0u64;
    loop {
        let n = tokio::select! {
            r = sr.read(&mut buf) => match r {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            },
            // Reset from the other direction: drop this side's halves too.
            _ = cut.notified() => return,
        };
        if draw.per_mille(f.cut_per_mille) {
            // Both sides reset once the last halves go: this one's now,
            // the other pump's as it is aborted.
            stats.cuts.fetch_add(1, Ordering::Relaxed);
            linger_zero(fds.0);
            linger_zero(fds.1);
            up.abort();
            return;
        }
        reads += 1;
        if reads > 1 && draw.per_mille(f.cut_mid_per_mille) {
            stats.mid_cuts.fetch_add(1, Ordering::Relaxed);
            let _ = cw.write_all(&buf[..n / 2]).await;
            linger_zero(fds.0);
            linger_zero(fds.1);
            up.abort();
            return;
        }
        let mut wait = f.latency + draw.upto(f.jitter);
        if draw.per_mille(f.stall_per_mille) {
            stats.stalls.fetch_add(1, Ordering::Relaxed);
            wait += f.stall;
        }
        tokio::time::sleep(wait).await;
        if cw.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = cw.shutdown().await;
    let _ = up.await;
}
