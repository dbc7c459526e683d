//! The daemon: listens on the partition socket and runs one session thread per front end.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;

use ringbuf::socket::SeqPacketListener;
use ringbuf::Event;

use crate::server::{OfferSpec, ServerConfig};
use crate::session::{Control, DeviceFactory, Session, SessionHandle};
use crate::Error;

/// A bound, listening daemon.
pub struct Daemon {
    listener: SeqPacketListener,
    path: PathBuf,
    stop: Arc<Event>,
    reload: Arc<Event>,
    config: ServerConfig,
    offers: Vec<OfferSpec>,
    devices: DeviceFactory,
}

impl Daemon {
    /// Binds the socket at `path`. A stale socket file (nobody listening) is replaced; a live
    /// one is an error, so two daemons never share a path.
    pub fn bind(
        path: &Path,
        config: ServerConfig,
        offers: Vec<OfferSpec>,
        devices: DeviceFactory,
    ) -> Result<Self, Error> {
        if path.exists() {
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
            config,
            offers,
            devices,
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
        mut reload: impl FnMut() -> Result<Vec<OfferSpec>, Error>,
    ) -> Result<(), Error> {
        use rustix::event::{poll, PollFd, PollFlags};
        tracing::info!(socket = %self.path.display(), offers = self.offers.len(), "listening");
        let mut sessions: Vec<(JoinHandle<()>, SessionHandle)> = Vec::new();
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
            sessions.retain(|(t, _)| !t.is_finished());
            if ready[2] {
                let _ = self.reload.wait();
                match reload() {
                    Ok(new) => self.apply_offers(new, &sessions),
                    Err(e) => tracing::warn!(error = %e, "reload failed; keeping the offers"),
                }
            }
            if !ready[0] {
                continue;
            }
            let sock = match self.listener.accept() {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    continue;
                }
            };
            let (session, handle) = match Session::new(
                sock,
                self.stop.clone(),
                self.config.clone(),
                &self.offers,
                self.devices.clone(),
            ) {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot start a session");
                    continue;
                }
            };
            match std::thread::Builder::new()
                .name("vspd-session".into())
                .spawn(move || {
                    session.run();
                }) {
                Ok(t) => sessions.push((t, handle)),
                Err(e) => tracing::warn!(error = %e, "cannot start a session thread"),
            }
        };
        tracing::info!(sessions = sessions.len(), "shutting down");
        let _ = self.stop.signal();
        for (t, _) in sessions {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
        result
    }

    fn apply_offers(&mut self, new: Vec<OfferSpec>, sessions: &[(JoinHandle<()>, SessionHandle)]) {
        let mut changes = Vec::new();
        for old in &self.offers {
            if !new
                .iter()
                .any(|n| n.interface_instance == old.interface_instance)
            {
                changes.push(Control::Remove(old.interface_instance));
            }
        }
        for n in &new {
            if !self
                .offers
                .iter()
                .any(|o| o.interface_instance == n.interface_instance)
            {
                changes.push(Control::Add(n.clone()));
            }
        }
        tracing::info!(changes = changes.len(), "configuration reloaded");
        for c in changes {
            for (_, h) in sessions {
                h.send(c.clone());
            }
        }
        self.offers = new;
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
    let mut server = ServerConfig::default();
    if let Some(max) = config.max_gpadl_bytes {
        server.max_gpadl_bytes = max;
    }
    let registry = Arc::new(crate::devices::Registry::default());
    let offers = registry.update(&config)?;
    // Signal handlers first: once the socket exists, the daemon is fully set up.
    let mut signals =
        signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP]).map_err(Error::Thread)?;
    let daemon = Daemon::bind(&socket, server, offers, registry.factory())?;
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
    let result = daemon.run(|| registry.update(&reload()?));
    handle.close();
    let _ = signal_thread.join();
    result
}
