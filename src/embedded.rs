//! A private `redis-server` on a free loopback port, for the demo, the
//! benchmark and the tests. It lives in its own temp dir and is stopped (by
//! its PID) when the handle drops, or when this process dies.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

/// A running private redis-server.
pub struct RedisServer {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
    /// The extra config arguments it was started with, given again by
    /// [`RedisServer::kill_and_restart`] and [`RedisServer::start_again`].
    extra: Vec<String>,
}

/// Where `redis-server` is on PATH, if anywhere.
pub fn find_redis_server() -> Option<PathBuf> {
    find_on_path("redis-server")
}

/// Where the executable `name` is on PATH, if anywhere.
pub(crate) fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|dir| dir.join(name)).find(|p| p.is_file())
}

pub const INSTALL_HINT: &str = "redis-server was not found on PATH. Install it (Debian/Ubuntu: \
    `sudo apt-get install -y redis-server`; macOS: `brew install redis`) or point REDIS_URL at a running Redis.";

/// The Redis settings runledger recommends for a server of its own; the
/// private server starts with them, and the README's Redis section explains
/// them. A run hash holds its metadata as one JSON value; at Redis's default
/// limit of 64 bytes per value a run with ~200 bytes of metadata is stored as
/// a hash table rather than a listpack, which doubles its memory.
pub const RECOMMENDED_CONFIG: &[(&str, &str)] = &[("hash-max-listpack-value", "1024")];

impl RedisServer {
    /// Starts redis-server from PATH with persistence off and [`RECOMMENDED_CONFIG`].
    pub fn start() -> Result<RedisServer> {
        RedisServer::start_with(&[])
    }

    /// Starts redis-server with extra config arguments (`["--maxmemory", "1gb"]`).
    pub fn start_with(extra: &[&str]) -> Result<RedisServer> {
        let binary = find_redis_server().ok_or_else(|| Error::Server(INSTALL_HINT.into()))?;
        let mut last_error = String::new();
        for _ in 0..5 {
            let port = free_port()?;
            match RedisServer::spawn(&binary, port, extra) {
                Ok(server) => return Ok(server),
                Err(e) => last_error = e.to_string(),
            }
        }
        Err(Error::Server(format!("could not start redis-server: {last_error}")))
    }

    fn spawn(binary: &Path, port: u16, extra: &[&str]) -> Result<RedisServer> {
        let dir = tempfile::Builder::new()
            .prefix("runledger-redis-")
            .tempdir()
            .map_err(|e| Error::Server(format!("temp dir: {e}")))?;
        let extra: Vec<String> = extra.iter().map(|a| a.to_string()).collect();
        let child = spawn_child(binary, port, dir.path(), &extra)?;
        let mut server = RedisServer { child, port, dir, extra };
        // On an error the server is dropped, which stops it.
        wait_until_up(&mut server.child, port, &server.dir.path().join("redis.log"), Duration::from_secs(10))?;
        Ok(server)
    }

    /// Kills the server (SIGKILL to our own child, by PID: no shutdown save,
    /// as in a crash) and starts redis-server again on the same port, in the
    /// same data dir, with the same arguments. Whatever the old process had
    /// persisted (its AOF or RDB file) is loaded again; with persistence off
    /// (the default) the new server is empty. Retries for up to 10 s while the
    /// old socket lingers.
    pub fn kill_and_restart(&mut self) -> Result<()> {
        self.stop();
        self.start_again()
    }

    /// Starts redis-server again after [`RedisServer::stop`]: same port, same
    /// data dir (so persisted data is reloaded), same arguments. A test can
    /// `stop()`, keep the server away for a while, then call this. Does
    /// nothing when the server is still running. Retries for up to 10 s while
    /// the old socket lingers (or the port is briefly taken).
    pub fn start_again(&mut self) -> Result<()> {
        if matches!(self.child.try_wait(), Ok(None)) {
            return Ok(());
        }
        let binary = find_redis_server().ok_or_else(|| Error::Server(INSTALL_HINT.into()))?;
        let log = self.dir.path().join("redis.log");
        let started = Instant::now();
        loop {
            let mut child = spawn_child(&binary, self.port, self.dir.path(), &self.extra)?;
            // Loading a large AOF takes a while; the wait is for the first PING answer.
            match wait_until_up(&mut child, self.port, &log, Duration::from_secs(30)) {
                Ok(()) => {
                    self.child = child;
                    return Ok(());
                }
                Err(e) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    if started.elapsed() > Duration::from_secs(10) {
                        return Err(e);
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }

    /// Stops the server and starts a new one on the same port in a fresh,
    /// empty dir, without the extra arguments (what a Redis restart that lost
    /// its data looks like to clients). To keep the data, see
    /// [`RedisServer::kill_and_restart`].
    pub fn restart(&mut self) -> Result<()> {
        self.stop();
        let binary = find_redis_server().ok_or_else(|| Error::Server(INSTALL_HINT.into()))?;
        let dir = std::mem::replace(
            &mut self.dir,
            tempfile::Builder::new()
                .prefix("runledger-redis-")
                .tempdir()
                .map_err(|e| Error::Server(format!("temp dir: {e}")))?,
        );
        let started = Instant::now();
        loop {
            // The old socket may linger for a moment after the kill.
            match RedisServer::spawn(&binary, self.port, &[]) {
                Ok(mut fresh) => {
                    std::mem::swap(self, &mut fresh);
                    drop(dir);
                    return Ok(());
                }
                Err(e) if started.elapsed() > Duration::from_secs(10) => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Stops the server (SIGKILL to our own child, by PID) and waits for it.
    /// [`RedisServer::start_again`] brings it back with its data.
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Spawns the private server's process: persistence off unless `extra` turns it on.
fn spawn_child(binary: &Path, port: u16, dir: &Path, extra: &[String]) -> Result<Child> {
    let mut command = server_command(binary, port, dir);
    command.args(["--appendonly", "no"]).args(extra);
    command.spawn().map_err(|e| Error::Server(format!("spawn {}: {e}", binary.display())))
}

/// A redis-server on 127.0.0.1:`port` in `dir`, logging to `dir/redis.log`,
/// with RDB snapshots off, [`RECOMMENDED_CONFIG`], no output, and dying with
/// its parent. Callers add persistence and the rest.
pub(crate) fn server_command(binary: &Path, port: u16, dir: &Path) -> Command {
    let mut command = Command::new(binary);
    command
        .arg("--port")
        .arg(port.to_string())
        .arg("--bind")
        .arg("127.0.0.1")
        .arg("--dir")
        .arg(dir)
        .args(["--save", ""])
        .arg("--logfile")
        .arg(dir.join("redis.log"))
        .args(RECOMMENDED_CONFIG.iter().flat_map(|(name, value)| [format!("--{name}"), value.to_string()]))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    die_with_parent(&mut command);
    command
}

/// Waits until a just-spawned server answers PING on `port`; an error (with
/// the end of its log) when it exits first or is silent for `timeout`.
pub(crate) fn wait_until_up(child: &mut Child, port: u16, log: &Path, timeout: Duration) -> Result<()> {
    wait_answering(child, port, log, timeout, || if ping(port) { Ok(()) } else { Err("no PONG".to_string()) })
}

/// Waits until `probe` (a PING as the caller talks to the server: password,
/// TLS) succeeds; an error with the end of the server's log when it exits
/// first, or with the probe's last error when it stays silent for `timeout`.
pub(crate) fn wait_answering(
    child: &mut Child,
    port: u16,
    log: &Path,
    timeout: Duration,
    mut probe: impl FnMut() -> std::result::Result<(), String>,
) -> Result<()> {
    let started = Instant::now();
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(5).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            return Err(Error::Server(format!(
                "redis-server on port {port} exited with {status}: {}",
                tail.join(" | ")
            )));
        }
        let last = match probe() {
            Ok(()) => return Ok(()),
            Err(e) => e,
        };
        if started.elapsed() > timeout {
            return Err(Error::Server(format!("redis-server on port {port}: no answer after {timeout:?}: {last}")));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Makes the spawned process get SIGKILL when the thread that spawned it
/// exits, so a server dies with us even if we are killed before Drop runs.
pub(crate) fn die_with_parent(command: &mut Command) {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::process::CommandExt;
        unsafe {
            command.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = command;
}

pub(crate) fn free_port() -> Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| Error::Server(format!("no free port: {e}")))?;
    listener.local_addr().map(|a| a.port()).map_err(|e| Error::Server(format!("no free port: {e}")))
}

pub(crate) fn ping(port: u16) -> bool {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else { return false };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    if stream.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 16];
    matches!(stream.read(&mut buf), Ok(n) if buf[..n].starts_with(b"+PONG"))
}
