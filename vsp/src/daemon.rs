//! The daemon: listens on the partition socket and runs one session thread per front end.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;

use ringbuf::socket::SeqPacketListener;
use ringbuf::Event;

use crate::server::{OfferSpec, ServerConfig};
use crate::session::{DeviceFactory, Session};
use crate::Error;

/// A bound, listening daemon.
pub struct Daemon {
    listener: SeqPacketListener,
    path: PathBuf,
    stop: Arc<Event>,
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
            config,
            offers,
            devices,
        })
    }

    /// The event that stops the daemon and all its sessions when signalled.
    pub fn stop_handle(&self) -> Arc<Event> {
        self.stop.clone()
    }

    /// Accepts front ends until stopped; then stops every session, waits for them and removes
    /// the socket file.
    pub fn run(self) -> Result<(), Error> {
        use rustix::event::{poll, PollFd, PollFlags};
        tracing::info!(socket = %self.path.display(), offers = self.offers.len(), "listening");
        let mut sessions: Vec<JoinHandle<()>> = Vec::new();
        let result = loop {
            let mut fds = [
                PollFd::new(&self.listener, PollFlags::IN),
                PollFd::new(self.stop.as_ref(), PollFlags::IN),
            ];
            match poll(&mut fds, None) {
                Ok(_) => {}
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => break Err(Error::Socket(e)),
            }
            if !fds[1].revents().is_empty() {
                break Ok(());
            }
            if fds[0].revents().is_empty() {
                continue;
            }
            sessions.retain(|t| !t.is_finished());
            let sock = match self.listener.accept() {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    continue;
                }
            };
            let session = Session::new(
                sock,
                self.stop.clone(),
                self.config.clone(),
                &self.offers,
                self.devices.clone(),
            );
            match std::thread::Builder::new()
                .name("vspd-session".into())
                .spawn(move || {
                    session.run();
                }) {
                Ok(t) => sessions.push(t),
                Err(e) => tracing::warn!(error = %e, "cannot start a session thread"),
            }
        };
        tracing::info!(sessions = sessions.len(), "shutting down");
        let _ = self.stop.signal();
        for t in sessions {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
        result
    }
}
