//! Which device serves which offer: the daemon's registry of SCSI controllers and their disks
//! (opened once, shared by every guest's channels) and NICs, and the device factory sessions use
//! when a channel opens.
//!
//! A controller's channels in one guest form a group: the primary channel takes the disks the
//! configuration names when it opens, with a fresh unit state per LUN (write cache, write
//! protection), and every subchannel of that primary serves the very same disks and states,
//! whatever a reload changed in between. So a MODE SELECT on any queue holds for all of them,
//! and one guest's writes never split across two images.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, Weak};

use ringbuf::guestmem::GuestMemory;
use vmbus_proto::channel::Guid;

use crate::channel::{Device, UnimplementedDevice};
use crate::config::Config;
use crate::disk::DiskFile;
use crate::netvsp::{Group as NetGroup, Netvsp, NetvspSpec, Nic, NicSettings};
use crate::scsi::LunState;
use crate::server::OfferSpec;
use crate::session::{DeviceContext, DeviceFactory};
use crate::storvsp::{LunSpec, Storvsp};
use crate::Error;

/// A disk of a controller as configured: its LUN, path and open file.
#[derive(Debug, Clone)]
struct LunConfig {
    lun: u8,
    path: PathBuf,
    file: Arc<DiskFile>,
}

/// The channels of one controller in one guest: found by instance and guest memory (each
/// session has its own), holding the disks its primary channel opened with.
struct Group {
    instance: Guid,
    /// The session's guest memory. A `Weak` keeps the allocation, so no other session's memory
    /// can have the same address while this entry exists.
    mem: Weak<GuestMemory>,
    /// Alive while any channel of the group is (each `Storvsp` holds it).
    disks: Weak<[LunSpec]>,
    queues: u16,
}

/// Opens a NIC's TAP; a failure (no /dev/net/tun, no CAP_NET_ADMIN) is logged, and the NIC's
/// channels fail to open until a later try succeeds.
fn open_nic(s: &NicSettings) -> Option<Arc<Nic>> {
    match Nic::open_tap(s) {
        Ok(nic) => {
            tracing::info!(tap = %s.tap, mtu = s.mtu, queues = s.queues, vlan = ?s.vlan, "NIC opened");
            Some(nic)
        }
        Err(e) => {
            tracing::warn!(tap = %s.tap, error = %e, source = ?std::error::Error::source(&e),
                "cannot open the NIC's TAP; its channel will not open");
            None
        }
    }
}

/// A configured NIC: its settings and its open TAP (`None` until it could be opened).
type NicEntry = (NicSettings, Option<Arc<Nic>>);

/// A NIC's channels in one guest: instance, guest memory, group.
type NetGroupEntry = (Guid, Weak<GuestMemory>, Weak<NetGroup>);

/// The devices behind the offers, by instance GUID.
#[derive(Default)]
pub struct Registry {
    /// Per controller: its disks and how many queues it may have.
    controllers: Mutex<HashMap<Guid, (Vec<LunConfig>, u16)>>,
    /// Controllers whose primary channel is open in some guest.
    groups: Mutex<Vec<Group>>,
    /// The NICs, by instance: their settings and open TAP (`None` until it could be opened).
    nics: Mutex<HashMap<Guid, NicEntry>>,
    /// NICs whose primary channel is open in some guest: instance, guest memory, group.
    net_groups: Mutex<Vec<NetGroupEntry>>,
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
        self.update_nics(config)?;
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
                luns.push(LunConfig {
                    lun,
                    path: d.path,
                    file,
                });
            }
            next.insert(c.instance, (luns, queues));
        }
        // A disk now configured read-only (and nowhere writable) takes no more writes, on any
        // open channel. (A disk that left the configuration is not touched: its controller is
        // rescinded, or a channel that keeps it serves it until it closes.) The new
        // configuration is in place first, so a primary channel opening meanwhile either gets
        // it or is among the groups below.
        let mut read_only: HashMap<PathBuf, bool> = HashMap::new();
        for l in next.values().flat_map(|(l, _)| l) {
            *read_only.entry(l.path.clone()).or_insert(true) &= l.file.readonly();
        }
        *self.controllers.lock().unwrap_or_else(|e| e.into_inner()) = next;
        for disks in self.live_groups().iter() {
            for l in disks
                .iter()
                .filter(|l| !l.file.readonly() && read_only.get(&l.path) == Some(&true))
            {
                tracing::info!(path = %l.path.display(), lun = l.lun,
                    "disk no longer writable: write-protected on open channels");
                l.state.write_protect();
            }
        }
        Ok(offers)
    }

    /// Opens the TAPs of new or changed NICs (keeping those whose settings did not change) and
    /// forgets removed ones (a TAP stays open while a channel uses its NIC).
    fn update_nics(&self, config: &Config) -> Result<(), Error> {
        let wanted = config.nic_settings()?;
        let current = self.nics.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let mut next = HashMap::new();
        for (id, s) in wanted {
            let nic = match current.get(&id) {
                Some((old, Some(nic))) if *old == s => Some(nic.clone()),
                _ => open_nic(&s),
            };
            next.insert(id, (s, nic));
        }
        *self.nics.lock().unwrap_or_else(|e| e.into_inner()) = next;
        Ok(())
    }

    /// The NIC `instance`, if configured, its TAP opened now if it could not be before.
    pub fn nic(&self, instance: Guid) -> Option<Arc<Nic>> {
        let mut nics = self.nics.lock().unwrap_or_else(|e| e.into_inner());
        let (s, nic) = nics.get_mut(&instance)?;
        if nic.is_none() {
            *nic = open_nic(s);
        }
        nic.clone()
    }

    /// The group a channel of NIC `instance` joins in the guest whose memory is `mem`: a new
    /// one for a primary channel, its primary's for a subchannel.
    fn net_group_for(
        &self,
        instance: Guid,
        mem: &Arc<GuestMemory>,
        subchannel: bool,
    ) -> Result<Arc<NetGroup>, Error> {
        let mut groups = self.net_groups.lock().unwrap_or_else(|e| e.into_inner());
        groups.retain(|(_, m, g)| m.strong_count() > 0 && g.strong_count() > 0);
        let mine = |(i, m, _): &NetGroupEntry| {
            *i == instance && std::ptr::eq(m.as_ptr(), Arc::as_ptr(mem))
        };
        if subchannel {
            return groups
                .iter()
                .find(|g| mine(g))
                .and_then(|(_, _, g)| g.upgrade())
                .ok_or_else(|| {
                    Error::Config(format!(
                        "subchannel of {instance} without its primary channel"
                    ))
                });
        }
        let nic = self
            .nic(instance)
            .ok_or_else(|| Error::Config(format!("no NIC for {instance}")))?;
        let group = NetGroup::new(nic);
        groups.retain(|g| !mine(g));
        groups.push((instance, Arc::downgrade(mem), Arc::downgrade(&group)));
        Ok(group)
    }

    /// The disks of every group with a channel still open (forgetting the others).
    fn live_groups(&self) -> Vec<Arc<[LunSpec]>> {
        let mut groups = self.groups.lock().unwrap_or_else(|e| e.into_inner());
        groups.retain(|g| g.disks.strong_count() > 0 && g.mem.strong_count() > 0);
        groups.iter().filter_map(|g| g.disks.upgrade()).collect()
    }

    /// The disks and queue count for a channel of controller `instance` in the guest whose
    /// memory is `mem`: a primary channel (`subchannel` false) takes what the configuration
    /// names now, with fresh unit states, and starts a group; a subchannel joins its primary's
    /// group (refused if there is none: the primary closed).
    fn disks_for(
        &self,
        instance: Guid,
        mem: &Arc<GuestMemory>,
        subchannel: bool,
    ) -> Result<(Arc<[LunSpec]>, u16), Error> {
        let mut groups = self.groups.lock().unwrap_or_else(|e| e.into_inner());
        groups.retain(|g| g.disks.strong_count() > 0 && g.mem.strong_count() > 0);
        let mine =
            |g: &Group| g.instance == instance && std::ptr::eq(g.mem.as_ptr(), Arc::as_ptr(mem));
        if subchannel {
            return groups
                .iter()
                .find(|g| mine(g))
                .and_then(|g| Some((g.disks.upgrade()?, g.queues)))
                .ok_or_else(|| {
                    Error::Config(format!(
                        "subchannel of {instance} without its primary channel"
                    ))
                });
        }
        let (luns, queues) = self
            .controllers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&instance)
            .cloned()
            .ok_or_else(|| Error::Config(format!("no disk for {instance}")))?;
        let disks: Arc<[LunSpec]> = luns
            .into_iter()
            .map(|l| LunSpec {
                lun: l.lun,
                path: l.path,
                file: l.file,
                state: LunState::new(),
            })
            .collect();
        // A reopened primary replaces the group of the previous one.
        groups.retain(|g| !mine(g));
        groups.push(Group {
            instance,
            mem: Arc::downgrade(mem),
            disks: Arc::downgrade(&disks),
            queues,
        });
        Ok((disks, queues))
    }

    /// The factory sessions call when a channel opens.
    pub fn factory(self: &Arc<Self>) -> DeviceFactory {
        let me = self.clone();
        Arc::new(
            move |ctx: &DeviceContext<'_>| -> Result<Box<dyn Device>, Error> {
                if ctx.interface_type == Guid::SCSI {
                    let subchannel = ctx.subchannel_index != 0;
                    let (luns, queues) =
                        me.disks_for(ctx.interface_instance, ctx.mem, subchannel)?;
                    return Ok(Box::new(Storvsp::new(
                        luns,
                        ctx.mem.clone(),
                        queues,
                        subchannel,
                        Some(ctx.request_subchannels.clone()),
                    )?));
                }
                if ctx.interface_type == Guid::NETWORK {
                    let subchannel = ctx.subchannel_index != 0;
                    let group = me.net_group_for(ctx.interface_instance, ctx.mem, subchannel)?;
                    return Ok(Box::new(Netvsp::new(NetvspSpec {
                        group,
                        index: ctx.subchannel_index,
                        relid: ctx.relid,
                        mem: ctx.mem.clone(),
                        gpadls: ctx.gpadls.clone(),
                        request_subchannels: Some(ctx.request_subchannels.clone()),
                    })?));
                }
                Ok(Box::new(UnimplementedDevice::new(ctx.interface_type)))
            },
        )
    }
}
