//! Which device serves which offer: the daemon's registry of disks (opened once, shared by every
//! guest's channels) and NICs, and the device factory sessions use when a channel opens.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use vmbus_proto::channel::Guid;

use crate::channel::{Device, UnimplementedDevice};
use crate::config::Config;
use crate::disk::DiskFile;
use crate::server::OfferSpec;
use crate::session::{DeviceContext, DeviceFactory};
use crate::storvsp::Storvsp;
use crate::Error;

struct DiskEntry {
    path: PathBuf,
    file: Arc<DiskFile>,
}

/// The devices behind the offers, by instance GUID.
#[derive(Default)]
pub struct Registry {
    disks: Mutex<HashMap<Guid, DiskEntry>>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry").finish_non_exhaustive()
    }
}

impl Registry {
    /// Opens the configuration's disks (those not open yet) and forgets removed ones; returns
    /// the offers. Disks stay open while a channel uses them (their `Arc`).
    pub fn update(&self, config: &Config) -> Result<Vec<OfferSpec>, Error> {
        let offers = config.offers();
        let mut opened = HashMap::new();
        {
            let disks = self.disks.lock().unwrap_or_else(|e| e.into_inner());
            for (offer, d) in offers.iter().zip(&config.disks) {
                let id = offer.interface_instance;
                if let Some(e) = disks.get(&id) {
                    opened.insert(
                        id,
                        DiskEntry {
                            path: e.path.clone(),
                            file: e.file.clone(),
                        },
                    );
                } else {
                    let file = DiskFile::open(&d.path, d.readonly, d.direct)?;
                    tracing::info!(path = %d.path.display(), size = file.size(), readonly = d.readonly, direct = d.direct, "disk opened");
                    opened.insert(
                        id,
                        DiskEntry {
                            path: d.path.clone(),
                            file,
                        },
                    );
                }
            }
        }
        *self.disks.lock().unwrap_or_else(|e| e.into_inner()) = opened;
        Ok(offers)
    }

    /// The factory sessions call when a channel opens.
    pub fn factory(self: &Arc<Self>) -> DeviceFactory {
        let me = self.clone();
        Arc::new(
            move |ctx: &DeviceContext<'_>| -> Result<Box<dyn Device>, Error> {
                if ctx.interface_type == Guid::SCSI {
                    let disks = me.disks.lock().unwrap_or_else(|e| e.into_inner());
                    let entry = disks.get(&ctx.interface_instance).ok_or_else(|| {
                        Error::Config(format!("no disk for {}", ctx.interface_instance))
                    })?;
                    let dev = Storvsp::new(entry.file.clone(), &entry.path, ctx.mem.clone())?;
                    return Ok(Box::new(dev));
                }
                Ok(Box::new(UnimplementedDevice::new(ctx.interface_type)))
            },
        )
    }
}
