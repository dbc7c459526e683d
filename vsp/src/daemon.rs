//! The daemon: listens on the partition socket and runs one session thread per front end.
//!
//! Who may connect: the peer's uid (`SO_PEERCRED`, recorded by the kernel at connect) must be
//! in [`DaemonConfig::allowed_uids`], checked before anything is read from the connection,
//! whatever the socket file's mode. How many: at most [`DaemonConfig::max_sessions`] sessions
//! at a time; a connection beyond is closed at once. Both refusals are logged (rate-limited).
//! Shutdown waits at most [`DaemonConfig::shutdown_timeout`] for the sessions (and through
//! them their channel workers) to end, whatever the peers do.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ringbuf::socket::SeqPacketListener;
use ringbuf::Event;

use crate::config::Access;
use crate::server::OfferSpec;
use crate::session::{DeviceFactory, Session, SessionConfig, SessionHandle};
use crate::synic::LogLimit;
use crate::Error;

/// The daemon's own limits and access rules, and the sessions' configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DaemonConfig {
    /// What each session is configured with.
    pub session: SessionConfig,
    /// The uids whose processes may connect (default: the daemon's own effective uid only;
    /// root is not implied).
    pub allowed_uids: Vec<u32>,
    /// Groups whose processes may also connect, whatever their uid (default none): a peer is
    /// allowed if its uid is in `allowed_uids` or its gid (the primary group it connected
    /// with, as `SO_PEERCRED` reports it) is here.
    pub allowed_gids: Vec<u32>,
    /// Most sessions at a time (default 64); each holds a thread, a guest's memory mappings
    /// and its channels' workers.
    pub max_sessions: usize,
    /// How long shutdown waits for the sessions to end (default 10 s); sessions still running
    /// then are abandoned to the process's exit.
    pub shutdown_timeout: Duration,
}

impl DaemonConfig {
    /// The configuration as the daemon applies it: a guest's budget of kernel mappings for
    /// scattered rings (`max_mapped_pieces`) is at most the process's budget
    /// ([`ringbuf::shmem::MapBudget::process`], half of `vm.max_map_count`) divided by
    /// `max_sessions`. Otherwise a few guests could spend the process's whole budget (eight of
    /// 4096 each, by default) and no other guest could open a channel.
    pub fn effective(mut self) -> Self {
        let process = ringbuf::shmem::MapBudget::process().limit();
        let share = process / self.max_sessions.max(1);
        let pieces = &mut self.session.limits.max_mapped_pieces;
        *pieces = (*pieces).min(share);
        self
    }
}

impl Default for DaemonConfig {
    fn default() -> Self {
        Self {
            session: SessionConfig::default(),
            allowed_uids: vec![rustix::process::geteuid().as_raw()],
            allowed_gids: Vec::new(),
            max_sessions: 64,
            shutdown_timeout: Duration::from_secs(10),
        }
    }
}

/// A bound, listening daemon.
pub struct Daemon {
    listener: SeqPacketListener,
    path: PathBuf,
    stop: Arc<Event>,
    reload: Arc<Event>,
    config: DaemonConfig,
    offers: Vec<OfferSpec>,
    /// Which front ends (by uid) may see each offer.
    access: Access,
    devices: DeviceFactory,
    /// Rate limit of the refused-connection log lines.
    refusals: LogLimit,
}

impl Daemon {
    /// Binds the socket at `path`. A stale socket file (nobody listening) is replaced; a live
    /// one is an error, so two daemons never share a path; anything at `path` that is not a
    /// socket is left alone, and is an error.
    pub fn bind(
        path: &Path,
        config: DaemonConfig,
        offers: Vec<OfferSpec>,
        access: Access,
        devices: DeviceFactory,
    ) -> Result<Self, Error> {
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            use std::os::unix::fs::FileTypeExt;
            if !meta.file_type().is_socket() {
                return Err(Error::Config(format!(
                    "{} exists and is not a socket: refusing to replace it",
                    path.display()
                )));
            }
            if ringbuf::socket::SeqPacket::connect(path).is_ok() {
                return Err(Error::Config(format!(
                    "{} is in use by a running daemon",
                    path.display()
                )));
            }
            std::fs::remove_file(path)
                .map_err(|e| Error::Config(format!("cannot replace {}: {e}", path.display())))?;
        }
        let listener = SeqPacketListener::bind(path)?;
        Ok(Self {
            listener,
            path: path.to_owned(),
            stop: Arc::new(Event::new()?),
            reload: Arc::new(Event::new()?),
            config: config.effective(),
            offers,
            access,
            devices,
            refusals: LogLimit::default(),
        })
    }

    /// The event that stops the daemon and all its sessions when signalled.
    pub fn stop_handle(&self) -> Arc<Event> {
        self.stop.clone()
    }

    /// The event that makes the daemon call its `reload` function and apply the new offers to
    /// every session (hot add and remove).
    pub fn reload_handle(&self) -> Arc<Event> {
        self.reload.clone()
    }

    /// Accepts front ends until stopped; then stops every session, waits for them and removes
    /// the socket file. When the reload event fires, `reload` gives the new set of offers: the
    /// ones that disappeared (by instance GUID) are rescinded from every guest, new ones offered.
    pub fn run(
        mut self,
        mut reload: impl FnMut() -> Result<(Vec<OfferSpec>, Access), Error>,
    ) -> Result<(), Error> {
        use rustix::event::{poll, PollFd, PollFlags};
        tracing::info!(socket = %self.path.display(), offers = self.offers.len(), "listening");
        // Each session with its front end's uid.
        let mut sessions: Vec<(JoinHandle<()>, SessionHandle, u32)> = Vec::new();
        let result = loop {
            let mut fds = [
                PollFd::new(&self.listener, PollFlags::IN),
                PollFd::new(self.stop.as_ref(), PollFlags::IN),
                PollFd::new(self.reload.as_ref(), PollFlags::IN),
            ];
            match poll(&mut fds, None) {
                Ok(_) => {}
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => break Err(Error::Socket(e)),
            }
            let ready = [0, 1, 2].map(|i| !fds[i].revents().is_empty());
            if ready[1] {
                break Ok(());
            }
            sessions.retain(|(t, ..)| !t.is_finished());
            if ready[2] {
                let _ = self.reload.wait();
                match reload() {
                    Ok((offers, access)) => self.apply_offers(offers, access, &sessions),
                    Err(e) => tracing::warn!(error = %e, "reload failed; keeping the offers"),
                }
            }
            if !ready[0] {
                continue;
            }
            let sock = match self.listener.accept() {
                Ok(s) => s,
                Err(e) => {
                    if let Some(suppressed) = self.refusals.allow() {
                        tracing::warn!(error = %e, suppressed, "accept failed");
                    }
                    // Out of descriptors, typically: the connection stays queued and the
                    // listener readable, so back off rather than spin until one is freed.
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
            };
            // Who is at the other end, before anything is read from it: the peer's uid, or why
            // the connection is refused.
            let admitted = match sock.peer_credentials() {
                Err(e) => Err(format!("no peer credentials: {e}")),
                Ok(c)
                    if !self.config.allowed_uids.contains(&c.uid.as_raw())
                        && !self.config.allowed_gids.contains(&c.gid.as_raw()) =>
                {
                    Err(format!(
                        "uid {} gid {} (pid {}) is not allowed",
                        c.uid.as_raw(),
                        c.gid.as_raw(),
                        c.pid.as_raw_nonzero()
                    ))
                }
                Ok(_) if sessions.len() >= self.config.max_sessions => {
                    Err(format!("{} sessions already (the limit)", sessions.len()))
                }
                Ok(c) => Ok(c.uid.as_raw()),
            };
            let uid = match admitted {
                Ok(uid) => uid,
                Err(why) => {
                    if let Some(suppressed) = self.refusals.allow() {
                        tracing::warn!(reason = %why, suppressed, "connection refused");
                    }
                    drop(sock);
                    continue;
                }
            };
            let (session, handle) = match Session::new(
                sock,
                self.stop.clone(),
                self.config.session.clone(),
                &self.visible_to(uid, &self.offers),
                self.devices.clone(),
            ) {
                Ok(s) => s,
                Err(e) => {
                    if let Some(suppressed) = self.refusals.allow() {
                        tracing::warn!(error = %e, suppressed, "cannot start a session");
                    }
                    continue;
                }
            };
            match std::thread::Builder::new()
                .name("vspd-session".into())
                .spawn(move || {
                    session.run();
                }) {
                Ok(t) => sessions.push((t, handle, uid)),
                Err(e) => {
                    if let Some(suppressed) = self.refusals.allow() {
                        tracing::warn!(error = %e, suppressed, "cannot start a session thread");
                    }
                }
            }
        };
        tracing::info!(sessions = sessions.len(), "shutting down");
        let _ = self.stop.signal();
        // The socket goes first: nobody can connect to a daemon that is going away.
        let _ = std::fs::remove_file(&self.path);
        let deadline = Instant::now() + self.config.shutdown_timeout;
        while sessions.iter().any(|(t, ..)| !t.is_finished()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        let mut stuck = 0;
        for (t, ..) in sessions {
            if t.is_finished() {
                let _ = t.join();
            } else {
                stuck += 1;
            }
        }
        if stuck > 0 {
            tracing::warn!(
                sessions = stuck,
                timeout = ?self.config.shutdown_timeout,
                "sessions did not end in time; exiting without them"
            );
        }
        result
    }

    fn apply_offers(
        &mut self,
        new: Vec<OfferSpec>,
        access: Access,
        sessions: &[(JoinHandle<()>, SessionHandle, u32)],
    ) {
        tracing::info!(offers = new.len(), "configuration reloaded");
        self.offers = new;
        self.access = access;
        for (_, h, uid) in sessions {
            h.set_offers(self.visible_to(*uid, &self.offers));
        }
    }

    /// The offers a front end of `uid` may see: a guest is never offered (so can never open)
    /// a device configured for other front ends.
    fn visible_to(&self, uid: u32, offers: &[OfferSpec]) -> Vec<OfferSpec> {
        offers
            .iter()
            .filter(|o| {
                self.access
                    .get(&o.interface_instance)
                    .is_none_or(|uids| uids.contains(&uid))
            })
            .cloned()
            .collect()
    }
}

/// Runs the daemon for `config` as `vspd` does: opens the disks, installs the signal handlers
/// (SIGTERM and SIGINT stop, SIGHUP calls `reload` and applies the new configuration's
/// offers), binds the socket and serves until stopped.
pub fn serve(
    config: crate::config::Config,
    mut reload: impl FnMut() -> Result<crate::config::Config, Error>,
) -> Result<(), Error> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let socket = config
        .socket
        .clone()
        .ok_or_else(|| Error::Config("no socket path: give --socket PATH".into()))?;
    let daemon_config = config.daemon_config();
    let registry = Arc::new(crate::devices::Registry::default());
    let offers = registry.update(&config)?;
    // Signal handlers first: once the socket exists, the daemon is fully set up.
    let mut signals =
        signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP]).map_err(Error::Thread)?;
    raise_fd_limit(&daemon_config);
    let daemon = Daemon::bind(
        &socket,
        daemon_config,
        offers,
        config.access(),
        registry.factory(),
    )?;
    let stop = daemon.stop_handle();
    let reload_event = daemon.reload_handle();
    let handle = signals.handle();
    let signal_thread = std::thread::Builder::new()
        .name("vspd-signals".into())
        .spawn(move || {
            for sig in signals.forever() {
                if sig == SIGHUP {
                    tracing::info!("SIGHUP: reloading the configuration");
                    let _ = reload_event.signal();
                } else {
                    tracing::info!(signal = sig, "stopping");
                    let _ = stop.signal();
                    return;
                }
            }
        })
        .map_err(Error::Thread)?;
    // Everything that needs more than serving does (binding the socket, the signal handlers)
    // is done: from here on every thread runs under the seccomp allowlist.
    if config.seccomp.unwrap_or(true) {
        if let Err(e) = ringbuf::sandbox::install() {
            handle.close();
            let _ = signal_thread.join();
            return Err(e.into());
        }
        tracing::info!("seccomp filter installed");
    } else {
        tracing::warn!("running without the seccomp filter (--no-seccomp)");
    }
    let result = daemon.run(|| {
        let config = reload()?;
        Ok((registry.update(&config)?, config.access()))
    });
    handle.close();
    let _ = signal_thread.join();
    result
}

/// Raises the soft limit of open descriptors to the hard limit. Front ends make the daemon hold
/// descriptors (a memory region, an irqfd per VP, several per open channel) within per-session
/// bounds, but the soft limit services start with (1024 under systemd) is spent by three front
/// ends that use theirs, after which no other guest can connect or open a channel. Warns if
/// even the hard limit is short of what half of `max_sessions` front ends may hold before
/// opening any channel (and notes it if only all of them could not).
fn raise_fd_limit(config: &DaemonConfig) {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut limit = getrlimit(Resource::Nofile);
    let hard = limit.maximum.unwrap_or(1 << 20);
    if limit.current.is_some_and(|soft| soft < hard) {
        limit.current = Some(hard);
        if let Err(e) = setrlimit(Resource::Nofile, limit) {
            tracing::warn!(error = %e, "cannot raise the limit of open files");
        }
    }
    let soft = getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX);
    let per_session =
        config.session.limits.max_regions as u64 + u64::from(vmbus_proto::partition::MAX_VPS) + 2;
    let needed = per_session.saturating_mul(config.max_sessions as u64);
    if needed / 2 > soft {
        // Not even half the sessions could hold their worst case: worth the operator's eye.
        tracing::warn!(
            limit = soft,
            needed,
            "the limit of open files is short of what max_sessions front ends may hold: \
             raise it (LimitNOFILE) or lower max_sessions"
        );
    } else if needed > soft {
        // Close (the worst case assumes 256 VPs in every session): a note, not a warning at
        // every start with the defaults on a host whose hard limit is 20000.
        tracing::info!(
            limit = soft,
            needed,
            "open files: a little short of every session's worst case"
        );
    } else {
        tracing::info!(limit = soft, "open files");
    }
}
