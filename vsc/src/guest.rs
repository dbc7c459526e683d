//! A loopback guest with its storage attached: connect to `vspd`, open every SCSI controller it
//! offers, initialise storvsc and start a [`Disk`] on each. Used by `vscd`, `vmbus-demo` and the
//! tests.

use std::path::Path;
use std::sync::Arc;

use vmbus_proto::channel::Guid;

use crate::channel::GuestChannel;
use crate::client::{Client, Event, Offer, SUPPORTED_VERSIONS};
use crate::loopback::Loopback;
use crate::storvsc::{Controller, Disk, Storvsc};
use crate::Error;

/// Ring pages each way of a storage channel (control page included): 256 KiB of data.
pub const STORAGE_RING_PAGES: usize = 65;

/// A loopback guest and its disks.
pub struct StorageGuest {
    /// The front end.
    pub front: Arc<Loopback>,
    /// The VMBus client.
    pub client: Client,
    /// The disks (every LUN of every controller), with the offers they came from.
    pub disks: Vec<(Offer, Arc<Disk>)>,
}

impl std::fmt::Debug for StorageGuest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StorageGuest")
            .field("disks", &self.disks.len())
            .finish()
    }
}

impl StorageGuest {
    /// Attaches to the daemon at `socket` with `memory_bytes` of guest memory and opens every
    /// SCSI controller, with one queue per CPU where the host offers subchannels.
    pub fn attach(socket: &Path, memory_bytes: u64) -> Result<Self, Error> {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        Self::attach_with_queues(socket, memory_bytes, cpus)
    }

    /// As [`attach`](Self::attach), with at most `queues` queues (channels) per controller.
    pub fn attach_with_queues(
        socket: &Path,
        memory_bytes: u64,
        queues: usize,
    ) -> Result<Self, Error> {
        let (front, messages) = Loopback::connect(socket, memory_bytes)?;
        let front = Arc::new(front);
        let mut client = Client::connect(front.clone(), messages, 0, &SUPPORTED_VERSIONS)?;
        let offers = client.request_offers()?;
        let mut disks = Vec::new();
        for o in offers
            .into_iter()
            .filter(|o| o.interface_type == Guid::SCSI && o.subchannel_index == 0)
        {
            let ch = GuestChannel::open(&mut client, &front, &o, STORAGE_RING_PAGES)?;
            let mut st = Storvsc::init(ch)?;
            let mut channels = Vec::new();
            let props = st.properties();
            let want = queues
                .saturating_sub(1)
                .min(usize::from(props.max_channel_count)) as u16;
            if props.flags & vmbus_proto::storvsp::CHANNEL_SUPPORTS_MULTI_CHANNEL != 0 && want > 0 {
                st.create_subchannels(want)?;
                let mut subs = Vec::new();
                let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
                while subs.len() < usize::from(want) {
                    let left = deadline.saturating_duration_since(std::time::Instant::now());
                    match client.next_event(left)? {
                        Some(Event::Offer(sub))
                            if sub.interface_instance == o.interface_instance =>
                        {
                            subs.push(sub)
                        }
                        Some(other) => tracing::debug!(?other, "event while creating subchannels"),
                        None => return Err(Error::Timeout),
                    }
                }
                for sub in subs {
                    let ch = GuestChannel::open(&mut client, &front, &sub, STORAGE_RING_PAGES)?;
                    channels.push(st.subchannel(ch));
                }
            }
            channels.insert(0, st);
            let ctl = Controller::start_queues(channels, front.clone())?;
            for lun in ctl.report_luns()? {
                disks.push((o.clone(), ctl.disk(lun)?));
            }
        }
        Ok(Self {
            front,
            client,
            disks,
        })
    }

    /// Flushes every disk, closes the channels and disconnects.
    pub fn detach(mut self) -> Result<(), Error> {
        for (_, d) in &self.disks {
            let _ = d.flush();
        }
        // A controller stops once, with its first disk; the others find it stopped.
        for (_, d) in std::mem::take(&mut self.disks) {
            // Subchannels close before their primary (it comes first in the list).
            for st in d.shutdown()?.into_iter().rev() {
                st.into_channel().close(&mut self.client, &self.front)?;
            }
        }
        self.client.unload()
    }
}
