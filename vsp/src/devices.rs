//! Which device serves which offer: the daemon's registry of SCSI controllers and their disks
//! (opened once, shared by every guest's channels) and NICs, and the device factory sessions use
//! when a channel opens.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use vmbus_proto::channel::Guid;

use crate::channel::{Device, UnimplementedDevice};
use crate::config::Config;
use crate::disk::DiskFile;
use crate::server::OfferSpec;
use crate::session::{DeviceContext, DeviceFactory};
use crate::storvsp::{LunSpec, Storvsp};
use crate::Error;

/// The devices behind the offers, by instance GUID.
#[derive(Default)]
pub struct Registry {
    /// Per controller: its disks and how many queues it may have.
    controllers: Mutex<HashMap<Guid, (Vec<LunSpec>, u16)>>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry").finish_non_exhaustive()
    }
}

impl Registry {
    /// Opens the configuration's disks (keeping those already open) and forgets removed ones;
    /// returns the offers. A disk stays open while a channel uses it (its `Arc`).
    pub fn update(&self, config: &Config) -> Result<Vec<OfferSpec>, Error> {
        let offers = config.offers();
        let controllers = config.controllers()?;
        let open: HashMap<(PathBuf, bool, bool), Arc<DiskFile>> = {
            let current = self.controllers.lock().unwrap_or_else(|e| e.into_inner());
            current
                .values()
                .flat_map(|(l, _)| l)
                .map(|l| {
                    (
                        (l.path.clone(), l.file.readonly(), l.file.is_direct()),
                        l.file.clone(),
                    )
                })
                .collect()
        };
        let mut next = HashMap::new();
        for c in controllers {
            let mut luns = Vec::new();
            let queues = c.disks.iter().map(|(_, d)| d.queues).max().unwrap_or(1);
            for (lun, d) in c.disks {
                let file = match open.get(&(d.path.clone(), d.readonly, d.direct)) {
                    Some(f) => f.clone(),
                    None => {
                        let f = DiskFile::open(&d.path, d.readonly, d.direct)?;
                        tracing::info!(path = %d.path.display(), lun, size = f.size(),
                            readonly = d.readonly, direct = d.direct, "disk opened");
                        f
                    }
                };
                luns.push(LunSpec {
                    lun,
                    path: d.path,
                    file,
                });
            }
            next.insert(c.instance, (luns, queues));
        }
        *self.controllers.lock().unwrap_or_else(|e| e.into_inner()) = next;
        Ok(offers)
    }

    /// The factory sessions call when a channel opens.
    pub fn factory(self: &Arc<Self>) -> DeviceFactory {
        let me = self.clone();
        Arc::new(
            move |ctx: &DeviceContext<'_>| -> Result<Box<dyn Device>, Error> {
                if ctx.interface_type == Guid::SCSI {
                    let (luns, queues) = me
                        .controllers
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .get(&ctx.interface_instance)
                        .cloned()
                        .ok_or_else(|| {
                            Error::Config(format!("no disk for {}", ctx.interface_instance))
                        })?;
                    return Ok(Box::new(Storvsp::new(
                        &luns,
                        ctx.mem.clone(),
                        queues,
                        ctx.subchannel_index != 0,
                        Some(ctx.request_subchannels.clone()),
                    )?));
                }
                Ok(Box::new(UnimplementedDevice::new(ctx.interface_type)))
            },
        )
    }
}
