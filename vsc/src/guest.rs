//! A loopback guest with its storage attached: connect to `vspd`, open every SCSI controller it
//! offers, initialise storvsc and start a [`Disk`] on each. Used by `vscd`, `vmbus-demo` and the
//! tests.
//!
//! With [`StorageGuest::attach_with`] and a [`Reconnect`] policy the guest survives a restart
//! of the daemon: a thread waits for the daemon to go away, then connects again (every
//! [`Reconnect::retry`], for as long as it takes), opens the same controllers (matched by
//! instance id) with as many subchannels as before, redoes the storvsc handshake and hands the
//! channels to the controllers' queues, which send their requests in flight again. Meanwhile
//! the queues hold requests for [`Reconnect::hold`], then fail them (and new ones) until the
//! daemon is back.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmbus_proto::channel::{Guid, VmbusVersion};

use crate::channel::GuestChannel;
use crate::client::{Client, Event, Offer, SUPPORTED_VERSIONS};
use crate::loopback::Loopback;
use crate::storvsc::{Controller, Disk, Storvsc};
use crate::synic::HostInterface;
use crate::Error;

/// Ring pages each way of a storage channel (control page included): 256 KiB of data.
pub const STORAGE_RING_PAGES: usize = 65;

/// How a guest rides out a restart of its daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reconnect {
    /// How long requests wait for the daemon to come back before they fail (then new ones fail
    /// at once until it is back; the guest keeps trying to reconnect whatever this is).
    pub hold: Duration,
    /// The pause between two attempts to reconnect.
    pub retry: Duration,
}

impl Default for Reconnect {
    fn default() -> Self {
        Self {
            hold: Duration::from_secs(60),
            retry: Duration::from_millis(100),
        }
    }
}

/// How to attach a [`StorageGuest`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestConfig {
    /// Guest memory, in bytes.
    pub memory_bytes: u64,
    /// Queues (channels) per controller at most.
    pub queues: usize,
    /// Reconnect after a daemon restart (`None`: requests fail once the daemon is gone).
    pub reconnect: Option<Reconnect>,
}

impl GuestConfig {
    /// `memory_bytes` of memory, a queue per CPU, no reconnection.
    pub fn new(memory_bytes: u64) -> Self {
        Self {
            memory_bytes,
            queues: std::thread::available_parallelism().map_or(1, |n| n.get()),
            reconnect: None,
        }
    }
}

/// A controller the guest opened: its instance, and its queues.
struct Attached {
    instance: Guid,
    ctl: Arc<Controller>,
}

/// What the guest and its reconnection thread share.
struct Link {
    client: Mutex<Client>,
    /// Reconnections done.
    reconnects: AtomicU64,
}

/// A loopback guest and its disks.
pub struct StorageGuest {
    /// The front end.
    pub front: Arc<Loopback>,
    link: Arc<Link>,
    /// The disks (every LUN of every controller), with the offers they came from.
    pub disks: Vec<(Offer, Arc<Disk>)>,
    /// The reconnection thread and what stops it.
    supervisor: Option<(Arc<ringbuf::Event>, JoinHandle<()>)>,
}

impl std::fmt::Debug for StorageGuest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StorageGuest")
            .field("disks", &self.disks.len())
            .finish()
    }
}

/// Opens the SCSI controller of `primary` with up to `queues` channels: the storvsc handshake on
/// the primary, then subchannels if the host offers multi-queue. On failure the channels it
/// opened are abandoned (their pages freed): the caller drops the session.
fn open_controller(
    client: &mut Client,
    front: &Arc<Loopback>,
    primary: &Offer,
    queues: usize,
) -> Result<Vec<Storvsc>, Error> {
    let ch = GuestChannel::open(client, front, primary, STORAGE_RING_PAGES)?;
    let mut st = Storvsc::try_init(ch).map_err(|b| {
        let (ch, e) = *b;
        ch.abandon(front);
        e
    })?;
    let mut subchannels = Vec::new();
    match open_subchannels(client, front, primary, queues, &mut st, &mut subchannels) {
        Ok(()) => {
            subchannels.insert(0, st);
            Ok(subchannels)
        }
        Err(e) => {
            for s in subchannels {
                s.into_channel().abandon(front);
            }
            st.into_channel().abandon(front);
            Err(e)
        }
    }
}

fn open_subchannels(
    client: &mut Client,
    front: &Arc<Loopback>,
    primary: &Offer,
    queues: usize,
    st: &mut Storvsc,
    opened: &mut Vec<Storvsc>,
) -> Result<(), Error> {
    let props = st.properties();
    let want = queues
        .saturating_sub(1)
        .min(usize::from(props.max_channel_count)) as u16;
    if props.flags & vmbus_proto::storvsp::CHANNEL_SUPPORTS_MULTI_CHANNEL == 0 || want == 0 {
        return Ok(());
    }
    st.create_subchannels(want)?;
    let mut subs = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while subs.len() < usize::from(want) {
        let left = deadline.saturating_duration_since(Instant::now());
        match client.next_event(left)? {
            Some(Event::Offer(sub)) if sub.interface_instance == primary.interface_instance => {
                subs.push(sub)
            }
            Some(other) => tracing::debug!(?other, "event while creating subchannels"),
            None => return Err(Error::Timeout),
        }
    }
    for sub in subs {
        let ch = GuestChannel::open(client, front, &sub, STORAGE_RING_PAGES)?;
        opened.push(st.subchannel(ch));
    }
    Ok(())
}

impl StorageGuest {
    /// Attaches to the daemon at `socket` with `memory_bytes` of guest memory and opens every
    /// SCSI controller, with one queue per CPU where the host offers subchannels.
    pub fn attach(socket: &Path, memory_bytes: u64) -> Result<Self, Error> {
        Self::attach_with(socket, GuestConfig::new(memory_bytes))
    }

    /// As [`attach`](Self::attach), with at most `queues` queues (channels) per controller.
    pub fn attach_with_queues(
        socket: &Path,
        memory_bytes: u64,
        queues: usize,
    ) -> Result<Self, Error> {
        Self::attach_with(
            socket,
            GuestConfig {
                queues,
                ..GuestConfig::new(memory_bytes)
            },
        )
    }

    /// Attaches as `config` says (with a reconnection thread if it asks for one).
    pub fn attach_with(socket: &Path, config: GuestConfig) -> Result<Self, Error> {
        let (front, messages) = Loopback::connect(socket, config.memory_bytes)?;
        let front = Arc::new(front);
        let mut client = Client::connect(front.clone(), messages, 0, &SUPPORTED_VERSIONS)?;
        let offers = client.request_offers()?;
        let mut disks = Vec::new();
        let mut attached = Vec::new();
        for o in offers
            .into_iter()
            .filter(|o| o.interface_type == Guid::SCSI && o.subchannel_index == 0)
        {
            let channels = open_controller(&mut client, &front, &o, config.queues)?;
            let ctl = Controller::start_queues(channels, front.clone())?;
            if let Some(r) = config.reconnect {
                ctl.set_hold(r.hold);
            }
            for lun in ctl.report_luns()? {
                disks.push((o.clone(), ctl.disk(lun)?));
            }
            attached.push(Attached {
                instance: o.interface_instance,
                ctl,
            });
        }
        let link = Arc::new(Link {
            client: Mutex::new(client),
            reconnects: AtomicU64::new(0),
        });
        let supervisor = match config.reconnect {
            Some(policy) => {
                let stop = Arc::new(ringbuf::Event::new()?);
                let sup = Supervisor {
                    socket: socket.to_owned(),
                    front: front.clone(),
                    link: link.clone(),
                    controllers: attached,
                    policy,
                    stop: stop.clone(),
                };
                let t = std::thread::Builder::new()
                    .name("vsc-reconnect".into())
                    .spawn(move || sup.run())
                    .map_err(Error::Thread)?;
                Some((stop, t))
            }
            None => None,
        };
        Ok(Self {
            front,
            link,
            disks,
            supervisor,
        })
    }

    /// The VMBus version of the current session.
    pub fn version(&self) -> VmbusVersion {
        self.link
            .client
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .version()
    }

    /// Reconnections to a restarted daemon so far.
    pub fn reconnects(&self) -> u64 {
        self.link.reconnects.load(Ordering::Relaxed)
    }

    fn stop_supervisor(&mut self) {
        if let Some((stop, t)) = self.supervisor.take() {
            let _ = stop.signal();
            let _ = t.join();
        }
    }

    /// Flushes every disk, closes the channels and disconnects. With the daemon away (and so
    /// no flush possible) it stops the queues, failing what they hold.
    pub fn detach(mut self) -> Result<(), Error> {
        self.stop_supervisor();
        if !self.front.host_alive() {
            for (_, d) in std::mem::take(&mut self.disks) {
                d.shutdown()?;
            }
            return Err(Error::Disconnected);
        }
        for (_, d) in &self.disks {
            let _ = d.flush();
        }
        let mut client = self.link.client.lock().unwrap_or_else(|e| e.into_inner());
        // A controller stops once, with its first disk; the others find it stopped.
        for (_, d) in std::mem::take(&mut self.disks) {
            // Subchannels close before their primary (it comes first in the list).
            for st in d.shutdown()?.into_iter().rev() {
                let ch = st.into_channel();
                if ch.host_alive() {
                    ch.close(&mut client, &self.front)?;
                } else {
                    // Opened in a session that is over (the reconnection had not reached it).
                    ch.abandon(&self.front);
                }
            }
        }
        client.unload()
    }
}

impl Drop for StorageGuest {
    fn drop(&mut self) {
        self.stop_supervisor();
    }
}

/// The reconnection thread's state.
struct Supervisor {
    socket: PathBuf,
    front: Arc<Loopback>,
    link: Arc<Link>,
    controllers: Vec<Attached>,
    policy: Reconnect,
    stop: Arc<ringbuf::Event>,
}

impl Supervisor {
    fn run(self) {
        use rustix::event::{poll, PollFd, PollFlags, Timespec};
        loop {
            // Wait for the daemon to go away (or to be stopped).
            let mut fds = [
                PollFd::new(self.front.lost_event(), PollFlags::IN),
                PollFd::new(&*self.stop, PollFlags::IN),
            ];
            match poll(&mut fds, None) {
                Ok(_) | Err(rustix::io::Errno::INTR) => {}
                Err(e) => {
                    tracing::error!("reconnection thread: {e}");
                    return;
                }
            }
            if !fds[1].revents().is_empty() {
                return;
            }
            if fds[0].revents().is_empty() {
                continue;
            }
            tracing::warn!("the daemon went away; reconnecting");
            for a in &self.controllers {
                a.ctl.host_lost();
            }
            let since = Instant::now();
            let mut attempts = 0u64;
            loop {
                attempts += 1;
                match self.reattach() {
                    Ok(()) => break,
                    Err(e) => {
                        if attempts == 1 || attempts.is_multiple_of(50) {
                            let cause = std::error::Error::source(&e)
                                .map_or_else(String::new, |c| format!(": {c}"));
                            tracing::info!(attempts, "reconnection failed: {e}{cause}");
                        }
                    }
                }
                let ts = Timespec::try_from(self.policy.retry).unwrap_or(Timespec {
                    tv_sec: 1,
                    tv_nsec: 0,
                });
                let mut fds = [PollFd::new(&*self.stop, PollFlags::IN)];
                if poll(&mut fds, Some(&ts)).is_ok_and(|n| n > 0) {
                    return;
                }
            }
            self.link.reconnects.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(after = ?since.elapsed(), attempts, "reconnected to the daemon");
        }
    }

    /// One attempt: a new session, the same controllers reopened, their channels handed over.
    fn reattach(&self) -> Result<(), Error> {
        let messages = self.front.reconnect(&self.socket)?;
        let mut client = Client::connect(self.front.clone(), messages, 0, &SUPPORTED_VERSIONS)?;
        let offers = client.request_offers()?;
        let mut opened = Vec::new();
        let result = (|| {
            for a in &self.controllers {
                let Some(o) = offers.iter().find(|o| {
                    o.interface_type == Guid::SCSI
                        && o.subchannel_index == 0
                        && o.interface_instance == a.instance
                }) else {
                    tracing::warn!(instance = %a.instance, "controller not offered any more");
                    continue;
                };
                let channels = open_controller(&mut client, &self.front, o, a.ctl.queue_count())?;
                if channels.len() < a.ctl.queue_count() {
                    tracing::warn!(
                        instance = %a.instance,
                        queues = a.ctl.queue_count(),
                        channels = channels.len(),
                        "fewer channels than before: the other queues stay without a host"
                    );
                }
                opened.push((a, channels));
            }
            Ok(())
        })();
        if let Err(e) = result {
            // The next attempt starts a new session: these channels die with this one.
            for (_, channels) in opened {
                for st in channels {
                    st.into_channel().abandon(&self.front);
                }
            }
            return Err(e);
        }
        for (a, channels) in opened {
            for st in a.ctl.replace_channels(channels) {
                st.into_channel().abandon(&self.front);
            }
        }
        *self.link.client.lock().unwrap_or_else(|e| e.into_inner()) = client;
        Ok(())
    }
}
