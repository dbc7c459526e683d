//! The listening socket: accepts connections, one thread each, until told to stop.

use std::collections::HashMap;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rustix::event::{poll, PollFd, PollFlags};

use super::transmission::{self, Pool};
use super::{handshake, proto, Export};
use crate::Error;

/// Bounds on what clients can make the server hold. Each one is a `vscd --nbd-*` option.
///
/// Memory: request data (reads and writes in flight, and their replies until the client takes
/// them) is bounded per connection by `connection_budget`, and for the server by `server_budget`
/// plus `connection_reserve` per connection. A connection takes a request's share of the server's
/// memory from its own reserve first, so that however much the other connections hold (clients
/// that ask for large reads and never take the replies hold their budget until the reply
/// timeout closes them), small requests of every connection keep being served.
///
/// Threads: one per connection (handshakes included) and at most `max_workers` worker threads for
/// the requests that block (flush, trim, zeroing, large reads and writes); a connection that has
/// none runs them on its own thread, and reads no further request meanwhile.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Connections past their handshake served at once; more are closed as soon as they are
    /// accepted (or, if the cap was reached meanwhile, once their handshake is done).
    pub max_connections: usize,
    /// Connections in their handshake at once (they do not count against `max_connections`);
    /// when a new one arrives with this many, the one that has been at it longest is closed.
    pub max_handshakes: usize,
    /// The longest a whole handshake may take; then the connection is closed.
    pub handshake_timeout: Duration,
    /// Worker threads per connection (requests of one connection in progress at once).
    pub workers_per_connection: usize,
    /// Worker threads of the whole server.
    pub max_workers: usize,
    /// Requests of one connection queued for a busy worker.
    pub queue_per_connection: usize,
    /// Request data (reads and writes) of one connection held in memory at once, in bytes.
    /// Requests without data (flush, trim, write zeroes) count 4 KiB each.
    pub connection_budget: u64,
    /// Request data of each connection held in memory outside `server_budget`, in bytes: what
    /// keeps a connection going when the others hold all of `server_budget` (0: none).
    pub connection_reserve: u64,
    /// Request data held in memory by all connections beyond their reserves, in bytes.
    pub server_budget: u64,
    /// The longest a reply may wait for a client that takes none of it (the socket staying
    /// full); then the connection is closed, freeing its budget.
    pub reply_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 64,
            max_handshakes: 16,
            handshake_timeout: Duration::from_secs(10),
            workers_per_connection: 16,
            max_workers: 128,
            queue_per_connection: 64,
            connection_budget: 64 << 20,
            connection_reserve: 1 << 20,
            server_budget: 512 << 20,
            reply_timeout: Duration::from_secs(60),
        }
    }
}

/// An NBD server on a Unix socket.
pub struct NbdServer {
    listener: UnixListener,
    path: PathBuf,
    /// Device and inode of the socket file we made, so that only that one is removed.
    ident: Option<(u64, u64)>,
    exports: Arc<[Export]>,
    limits: Limits,
}

impl std::fmt::Debug for NbdServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdServer")
            .field("path", &self.path)
            .field("exports", &self.exports)
            .finish()
    }
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> Error {
    let what = what.into();
    move |source| Error::NbdIo { what, source }
}

fn validate(exports: &[Export]) -> Result<(), Error> {
    if exports.is_empty() {
        return Err(Error::NbdConfig("no exports".into()));
    }
    for (i, e) in exports.iter().enumerate() {
        if e.name.len() > proto::MAX_STRING || e.description.len() > proto::MAX_STRING {
            return Err(Error::NbdConfig(format!(
                "export {:?}: name or description longer than {} bytes",
                e.name,
                proto::MAX_STRING
            )));
        }
        if exports[..i].iter().any(|o| o.name == e.name) {
            return Err(Error::NbdConfig(format!("export {:?} twice", e.name)));
        }
        let bs = e.device.block_size();
        if !bs.is_power_of_two() || bs > 65536 {
            return Err(Error::NbdConfig(format!(
                "export {:?}: block size {bs} is not a power of two up to 64 KiB",
                e.name
            )));
        }
    }
    Ok(())
}

impl NbdServer {
    /// Binds a Unix socket at `path` (mode 0600; a stale socket there is replaced, a live one or
    /// anything that is not a socket is an error) serving `exports`. The first export is also the
    /// default one, for the empty name.
    pub fn bind(path: &Path, exports: Vec<Export>) -> Result<Self, Error> {
        validate(&exports)?;
        match std::fs::symlink_metadata(path) {
            Ok(m) if m.file_type().is_socket() => {
                if UnixStream::connect(path).is_ok() {
                    return Err(Error::NbdConfig(format!(
                        "{}: another server is listening there",
                        path.display()
                    )));
                }
                // Stale: replaced below.
            }
            Ok(_) => {
                return Err(Error::NbdConfig(format!(
                    "{}: exists and is not a socket",
                    path.display()
                )))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(format!("{}", path.display()))(e)),
        }
        let listener = bind_private(path)?;
        let ident = std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()));
        tracing::info!(path = %path.display(), exports = exports.len(), "NBD server listening");
        Ok(Self {
            listener,
            path: path.to_owned(),
            ident,
            exports: exports.into(),
            limits: Limits::default(),
        })
    }

    /// Replaces the default [`Limits`].
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Serves until `stop` is signalled (the event is only watched, not consumed), one thread per
    /// connection. Then stops accepting, ends every connection's input (requests in progress are
    /// still answered), waits for the connection threads and removes the socket.
    pub fn run(self, stop: Arc<ringbuf::Event>) -> Result<(), Error> {
        self.listener
            .set_nonblocking(true)
            .map_err(io_err("NBD listener"))?;
        let shared = Arc::new(Shared {
            warnings: Mutex::default(),
            exports: Arc::clone(&self.exports),
            limits: self.limits.clone(),
            pool: Pool::new(&self.limits),
            conns: Mutex::new(HashMap::new()),
        });
        let mut threads: Vec<JoinHandle<()>> = Vec::new();
        let next_id = AtomicU64::new(0);
        loop {
            let mut fds = [
                PollFd::new(&self.listener, PollFlags::IN),
                PollFd::new(&*stop, PollFlags::IN),
            ];
            match poll(&mut fds, None) {
                Ok(_) => {}
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(io_err("poll on the NBD listener")(e.into())),
            }
            if !fds[1].revents().is_empty() {
                break;
            }
            loop {
                match self.listener.accept() {
                    Ok((stream, _)) => {
                        let id = next_id.fetch_add(1, Ordering::Relaxed);
                        if let Some(t) = Shared::start(&shared, id, stream) {
                            threads.push(t);
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        // Out of descriptors or the like: back off instead of spinning.
                        if let Some(suppressed) = shared.warn_allowed() {
                            tracing::warn!(suppressed, "NBD accept failed: {e}");
                        }
                        std::thread::sleep(Duration::from_millis(100));
                        break;
                    }
                }
            }
            // Reap the connections that ended.
            let (done, live): (Vec<_>, Vec<_>) = threads.into_iter().partition(|t| t.is_finished());
            threads = live;
            for t in done {
                let _ = t.join();
            }
        }
        tracing::info!(path = %self.path.display(), "NBD server stopping");
        for c in lock(&shared.conns).values() {
            let _ = c.stream.shutdown(std::net::Shutdown::Read);
        }
        for t in threads {
            let _ = t.join();
        }
        Ok(())
        // Dropping self removes the socket.
    }
}

impl Drop for NbdServer {
    fn drop(&mut self) {
        let ours = std::fs::symlink_metadata(&self.path)
            .ok()
            .map(|m| (m.dev(), m.ino()));
        if ours.is_some() && ours == self.ident {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Binds at `path` with mode 0600 from the start (see [`listen_private`]): bound under a
/// temporary name in the same directory, then renamed over `path` (which also replaces a stale
/// socket atomically).
fn bind_private(path: &Path) -> Result<UnixListener, Error> {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".nbd-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    match listen_private(&tmp) {
        Ok(l) => {
            if let Err(e) = std::fs::rename(&tmp, path) {
                let _ = std::fs::remove_file(&tmp);
                return Err(io_err(format!("binding {}", path.display()))(e));
            }
            Ok(l)
        }
        Err(_) => {
            // The temporary name may not fit in a socket address: bind in place.
            let _ = std::fs::remove_file(path);
            listen_private(path).map_err(io_err(format!("binding {}", path.display())))
        }
    }
}

/// A listening Unix socket whose file at `path` has mode 0600 (less the umask) from the moment
/// it exists: the mode is set on the socket before `bind`, which creates the file with the
/// socket's mode (Linux), so no client can connect in a window before a `chmod`.
pub(crate) fn listen_private(path: &Path) -> io::Result<UnixListener> {
    use rustix::net::{bind, listen, socket_with, AddressFamily, SocketAddrUnix, SocketFlags};
    let fd = socket_with(
        AddressFamily::UNIX,
        rustix::net::SocketType::STREAM,
        SocketFlags::CLOEXEC,
        None,
    )?;
    rustix::fs::fchmod(&fd, rustix::fs::Mode::from_raw_mode(0o600))?;
    bind(&fd, &SocketAddrUnix::new(path)?)?;
    listen(&fd, 128)?;
    Ok(UnixListener::from(fd))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// What the connection threads share.
/// A rate limit for the warnings clients can cause: at most `BURST` a minute; the lines
/// suppressed are counted and reported with the next one let through.
#[derive(Debug, Default)]
struct WarnLimit {
    start: Option<Instant>,
    used: u32,
    suppressed: u64,
}

impl WarnLimit {
    const BURST: u32 = 10;
    const WINDOW: Duration = Duration::from_secs(60);

    /// Whether a warning may be logged now; if so, `Some(lines suppressed since the last)`.
    fn allow(&mut self) -> Option<u64> {
        let now = Instant::now();
        if self
            .start
            .is_none_or(|s| now.duration_since(s) >= Self::WINDOW)
        {
            (self.start, self.used) = (Some(now), 0);
        }
        if self.used >= Self::BURST {
            self.suppressed += 1;
            return None;
        }
        self.used += 1;
        Some(std::mem::take(&mut self.suppressed))
    }
}

struct Shared {
    /// Rate limit of the warnings clients cause (connections refused or dropped for lack of
    /// room): a client reconnecting in a loop at the limit must not flood the log.
    warnings: Mutex<WarnLimit>,
    exports: Arc<[Export]>,
    limits: Limits,
    pool: Arc<Pool>,
    /// The live connections, to end them on stop (and handshakes that take too long).
    conns: Mutex<HashMap<u64, Conn>>,
}

/// A live connection.
struct Conn {
    stream: UnixStream,
    /// Since when it is in its handshake; `None` once served.
    handshake: Option<Instant>,
    /// Closed to make room for a newer handshake (its thread is ending).
    evicted: bool,
}

/// Removes a connection from the registry when its thread ends.
struct Registered<'a>(&'a Shared, u64);

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        lock(&self.0.conns).remove(&self.1);
    }
}

impl Shared {
    fn warn_allowed(&self) -> Option<u64> {
        lock(&self.warnings).allow()
    }

    /// Starts a thread for a new connection, or refuses it by closing. A connection in its
    /// handshake takes one of `max_handshakes` places, the oldest one's if they are all taken
    /// (a client that opens connections and dawdles cannot keep others from being served).
    fn start(this: &Arc<Self>, id: u64, stream: UnixStream) -> Option<JoinHandle<()>> {
        {
            let mut conns = lock(&this.conns);
            let served = conns.values().filter(|c| c.handshake.is_none()).count();
            if served >= this.limits.max_connections {
                if let Some(suppressed) = this.warn_allowed() {
                    tracing::warn!(
                        suppressed,
                        "NBD: {served} connections already, refusing another"
                    );
                }
                return None;
            }
            // Evicted connections linger until their threads notice: bounded too.
            let max_handshakes = this.limits.max_handshakes.max(1);
            if conns.len() - served >= 2 * max_handshakes {
                if let Some(suppressed) = this.warn_allowed() {
                    tracing::warn!(
                        suppressed,
                        "NBD: too many connections closing, refusing another"
                    );
                }
                return None;
            }
            let mut handshaking: Vec<(&u64, &mut Conn)> = conns
                .iter_mut()
                .filter(|(_, c)| c.handshake.is_some() && !c.evicted)
                .collect();
            if handshaking.len() >= max_handshakes {
                handshaking.sort_by_key(|(_, c)| c.handshake);
                let (old, c) = &mut handshaking[0];
                tracing::info!(
                    id = **old,
                    "NBD: {max_handshakes} handshakes in progress; closing the oldest"
                );
                let _ = c.stream.shutdown(std::net::Shutdown::Both);
                c.evicted = true;
            }
            match stream.try_clone() {
                Ok(s) => {
                    conns.insert(
                        id,
                        Conn {
                            stream: s,
                            handshake: Some(Instant::now()),
                            evicted: false,
                        },
                    );
                }
                Err(e) => {
                    tracing::warn!("NBD: cannot register a connection: {e}");
                    return None;
                }
            }
        }
        let shared = Arc::clone(this);
        let spawned = std::thread::Builder::new()
            .name(format!("nbd-conn-{id}"))
            .spawn(move || {
                let _registered = Registered(&shared, id);
                let ready = || shared.ready(id);
                let r = serve_connection(
                    &stream,
                    &shared.exports,
                    &shared.limits,
                    &shared.pool,
                    &ready,
                );
                match r {
                    Ok(()) => tracing::debug!(id, "NBD connection closed"),
                    Err(e) => tracing::info!(id, "NBD connection dropped: {e}"),
                }
            });
        match spawned {
            Ok(t) => Some(t),
            Err(e) => {
                tracing::warn!("NBD: cannot start a connection thread: {e}");
                lock(&this.conns).remove(&id);
                None
            }
        }
    }

    /// A connection's handshake is done: whether it may be served (it was not evicted, and
    /// `max_connections` is not reached).
    fn ready(&self, id: u64) -> bool {
        let mut conns = lock(&self.conns);
        let served = conns.values().filter(|c| c.handshake.is_none()).count();
        match conns.get_mut(&id) {
            Some(c) if !c.evicted && served < self.limits.max_connections => {
                c.handshake = None;
                true
            }
            _ => {
                if let Some(suppressed) = self.warn_allowed() {
                    tracing::warn!(
                        id,
                        suppressed,
                        "NBD: no room left for a connection past its handshake"
                    );
                }
                false
            }
        }
    }
}

/// Serves one client on a stream connected elsewhere (a socket passed in by a supervisor, a
/// socketpair): the handshake, then transmission, until the client disconnects or breaks the
/// protocol (an error). `limits.server_budget` and `max_workers` apply to this connection
/// alone; `max_connections` and `max_handshakes` do not apply.
pub fn serve_stream(stream: &UnixStream, exports: &[Export], limits: &Limits) -> io::Result<()> {
    serve_connection(stream, exports, limits, &Pool::new(limits), &|| true)
}

/// The stream during the handshake: each read and write may wait only for what is left until
/// the handshake's deadline, so that the whole handshake, not each step, is bounded.
struct Deadline<'a> {
    stream: &'a UnixStream,
    deadline: Instant,
}

impl Deadline<'_> {
    fn left(&self) -> io::Result<Duration> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "handshake not done within the handshake timeout",
            ));
        }
        Ok(left)
    }
}

impl io::Read for Deadline<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.stream.set_read_timeout(Some(self.left()?))?;
        let mut s = self.stream;
        s.read(buf)
    }
}

impl io::Write for Deadline<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.stream.set_write_timeout(Some(self.left()?))?;
        let mut s = self.stream;
        s.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Serves one connection: handshake, then transmission.
pub(crate) fn serve_connection(
    stream: &UnixStream,
    exports: &[Export],
    limits: &Limits,
    pool: &Arc<Pool>,
    ready: &dyn Fn() -> bool,
) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    let mut s = Deadline {
        stream,
        deadline: Instant::now() + limits.handshake_timeout,
    };
    let Some(i) = handshake::negotiate(&mut s, exports)? else {
        return Ok(());
    };
    if !ready() {
        return Ok(());
    }
    let export = &exports[i];
    tracing::debug!(export = %export.name, "NBD transmission");
    stream.set_read_timeout(None)?;
    stream.set_write_timeout(None)?;
    transmission::serve(stream, export, limits, pool)
}
