//! A fault-injecting TCP proxy for chaos tests: clients (worker processes)
//! talk to Redis through it, and the test makes the network misbehave.
//!
//! It listens on a free 127.0.0.1 port and forwards every connection to a
//! Redis port. Knobs, settable while it runs through the shared [`Proxy`]:
//!
//! * [`Proxy::lose_replies`]: for each chunk a client sends, after the chunk
//!   was forwarded, with this probability both sockets are closed and the
//!   server's reply is never forwarded. The request reached Redis and ran;
//!   only the answer is lost — the worst case for a client, which cannot tell
//!   whether its write happened.
//! * [`Proxy::cut_all`]: closes every open connection now.
//! * [`Proxy::refuse`]: while on, new connections are accepted and closed at once.
//!
//! [`Proxy::replies_dropped`] counts the replies lost on purpose, and
//! [`Proxy::connection_ends`] tells, per upstream connection (by the local
//! port Redis sees, as MONITOR shows it, and the wall-clock time it ended,
//! which tells apart two connections that got the same port), who ended it. The proxy
//! and all its connections stop when the [`Proxy`] is dropped.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::RngExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// How long a lost-reply connection waits for the server's answer (which it
/// then throws away) before closing: long enough that the request surely ran.
const REPLY_WAIT: Duration = Duration::from_secs(2);

/// Probabilities are stored as parts per billion so they fit an atomic.
const PPB: f64 = 1e9;

struct Shared {
    upstream: SocketAddr,
    lose_ppb: AtomicU64,
    refusing: AtomicBool,
    dropped: AtomicU64,
    accepted: AtomicU64,
    /// Cancelled by `cut_all`: every connection accepted before holds a clone.
    cut: Mutex<CancellationToken>,
    /// Cancelled when the proxy is dropped.
    stop: CancellationToken,
    /// Every ended upstream connection, in the order they ended.
    ends: Mutex<Vec<ConnEnd>>,
}

/// One ended upstream connection.
#[derive(Clone, Copy, Debug)]
pub struct ConnEnd {
    /// Its local port: MONITOR shows its commands as from `127.0.0.1:<port>`.
    pub port: u16,
    /// When it ended, µs since the epoch (this machine's clock, which Redis shares).
    pub ended_us: u64,
    pub end: End,
}

/// Who ended a proxied connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum End {
    /// The client closed it (or died: the kernel closes a killed process's sockets).
    Client,
    /// Redis closed it.
    Server,
    /// The proxy, losing a reply on purpose.
    LostReply,
    /// The proxy, in `cut_all` or when dropped.
    Cut,
}

/// The running proxy; see the module docs.
pub struct Proxy {
    shared: Arc<Shared>,
    addr: SocketAddr,
}

impl Proxy {
    /// Starts forwarding a free loopback port to `127.0.0.1:<redis_port>`.
    pub async fn start(redis_port: u16) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("proxy: bind a loopback port");
        let addr = listener.local_addr().expect("proxy: local address");
        let shared = Arc::new(Shared {
            upstream: SocketAddr::from(([127, 0, 0, 1], redis_port)),
            lose_ppb: AtomicU64::new(0),
            refusing: AtomicBool::new(false),
            dropped: AtomicU64::new(0),
            accepted: AtomicU64::new(0),
            cut: Mutex::new(CancellationToken::new()),
            stop: CancellationToken::new(),
            ends: Mutex::new(Vec::new()),
        });
        tokio::spawn(accept_loop(listener, shared.clone()));
        Proxy { shared, addr }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// `redis://127.0.0.1:<proxy port>/`, for clients that should suffer.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port())
    }

    /// From now on, lose the reply to each client chunk with this probability.
    pub fn lose_replies(&self, probability: f64) {
        let ppb = (probability.clamp(0.0, 1.0) * PPB) as u64;
        self.shared.lose_ppb.store(ppb, Ordering::SeqCst);
    }

    /// Closes every connection open now (new ones are accepted as usual).
    pub fn cut_all(&self) {
        let old = std::mem::take(&mut *lock(&self.shared.cut));
        old.cancel();
    }

    /// While on, new connections are accepted and closed at once.
    pub fn refuse(&self, on: bool) {
        self.shared.refusing.store(on, Ordering::SeqCst);
    }

    /// Replies thrown away by `lose_replies` so far.
    pub fn replies_dropped(&self) -> u64 {
        self.shared.dropped.load(Ordering::SeqCst)
    }

    /// How each ended upstream connection ended, in the order they ended.
    pub fn connection_ends(&self) -> Vec<ConnEnd> {
        lock(&self.shared.ends).clone()
    }

    /// Connections accepted so far (refused ones included).
    pub fn connections_accepted(&self) -> u64 {
        self.shared.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shared.stop.cancel();
        self.cut_all();
    }
}

/// How the connection from `port` that was open at `at_us` (the MONITOR
/// time of one of its commands) ended; None if it had not ended in `ends`.
pub fn end_of(ends: &[ConnEnd], port: u16, at_us: u64) -> Option<ConnEnd> {
    ends.iter().find(|e| e.port == port && e.ended_us >= at_us).copied()
}

/// Now, µs since the epoch.
pub fn now_us() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(0)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let accepted = tokio::select! {
            _ = shared.stop.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let Ok((client, _)) = accepted else {
            // Out of file descriptors or the like: try again shortly.
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        shared.accepted.fetch_add(1, Ordering::SeqCst);
        if shared.refusing.load(Ordering::SeqCst) {
            drop(client);
            continue;
        }
        let cut = lock(&shared.cut).clone();
        tokio::spawn(forward(client, shared.clone(), cut));
    }
}

/// Pumps one connection both ways in one task, so that the decision to lose
/// a reply is taken before the server's answer could be forwarded.
async fn forward(client: TcpStream, shared: Arc<Shared>, cut: CancellationToken) {
    let Ok(server) = TcpStream::connect(shared.upstream).await else {
        return; // Redis away: the client sees a closed connection.
    };
    let port = server.local_addr().map(|a| a.port()).unwrap_or(0);
    let end = pump(client, server, &shared, &cut).await;
    lock(&shared.ends).push(ConnEnd { port, ended_us: now_us(), end });
}

async fn pump(mut client: TcpStream, mut server: TcpStream, shared: &Shared, cut: &CancellationToken) -> End {
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let mut from_client = vec![0u8; 64 * 1024];
    let mut from_server = vec![0u8; 64 * 1024];
    loop {
        tokio::select! {
            _ = cut.cancelled() => return End::Cut,
            _ = shared.stop.cancelled() => return End::Cut,
            read = client.read(&mut from_client) => {
                let n = match read { Ok(0) | Err(_) => return End::Client, Ok(n) => n };
                if server.write_all(&from_client[..n]).await.is_err() {
                    return End::Server;
                }
                if lose_this_one(shared) {
                    swallow_reply(&mut server).await;
                    shared.dropped.fetch_add(1, Ordering::SeqCst);
                    return End::LostReply; // both sockets close here, the reply unsent
                }
            }
            read = server.read(&mut from_server) => {
                let n = match read { Ok(0) | Err(_) => return End::Server, Ok(n) => n };
                if client.write_all(&from_server[..n]).await.is_err() {
                    return End::Client;
                }
            }
        }
    }
}

fn lose_this_one(shared: &Shared) -> bool {
    let ppb = shared.lose_ppb.load(Ordering::SeqCst);
    ppb > 0 && rand::rng().random_range(0..1_000_000_000u64) < ppb
}

/// Waits (bounded) for the server's answer and throws it away: its arrival
/// proves the request was executed, which is the case this knob is about.
/// A request without a reply yet (a blocking BLPOP, half a command) is cut
/// after `REPLY_WAIT` anyway.
async fn swallow_reply(server: &mut TcpStream) {
    let mut sink = [0u8; 4096];
    let _ = tokio::time::timeout(REPLY_WAIT, server.read(&mut sink)).await;
}
