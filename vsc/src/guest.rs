//! A loopback guest with its storage attached: connect to `vspd`, open every SCSI controller it
//! offers, initialise storvsc and start a [`Disk`] on each. Used by `vscd`, `vmbus-demo` and the
//! tests.

use std::path::Path;
use std::sync::Arc;

use vmbus_proto::channel::Guid;

use crate::channel::GuestChannel;
use crate::client::{Client, Offer, SUPPORTED_VERSIONS};
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
    /// SCSI controller.
    pub fn attach(socket: &Path, memory_bytes: u64) -> Result<Self, Error> {
        let (front, messages) = Loopback::connect(socket, memory_bytes)?;
        let front = Arc::new(front);
        let mut client = Client::connect(front.clone(), messages, 0, &SUPPORTED_VERSIONS)?;
        let offers = client.request_offers()?;
        let mut disks = Vec::new();
        for o in offers
            .into_iter()
            .filter(|o| o.interface_type == Guid::SCSI)
        {
            let ch = GuestChannel::open(&mut client, &front, &o, STORAGE_RING_PAGES)?;
            let st = Storvsc::init(ch)?;
            let ctl = Controller::start(st, front.clone())?;
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
            if let Some(st) = d.shutdown()? {
                st.into_channel().close(&mut self.client, &self.front)?;
            }
        }
        self.client.unload()
    }
}
