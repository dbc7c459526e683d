//! The daemon's configuration: command line, optionally merged with a TOML file.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use vmbus_proto::channel::Guid;

use crate::server::OfferSpec;
use crate::Error;

/// One disk, served on its own SCSI controller channel.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    /// Image file or block device.
    pub path: PathBuf,
    /// Refuse writes (DATA PROTECT).
    #[serde(default)]
    pub readonly: bool,
    /// Open with O_DIRECT (aligned requests bypass the page cache).
    #[serde(default)]
    pub direct: bool,
    /// Queues (the primary channel plus subchannels), 1 to 64.
    #[serde(default = "one")]
    pub queues: u16,
    /// The SCSI controller to put the disk on: disks naming the same number share one
    /// controller (one VMBus channel), as LUNs of target 0. Without it, a disk gets a controller
    /// of its own.
    #[serde(default)]
    pub controller: Option<u32>,
    /// The disk's LUN on its controller (0 to 63); by default the next free one.
    #[serde(default)]
    pub lun: Option<u8>,
    /// The uids of the front ends this disk is offered to (`uids=1000:1001` on the command
    /// line, `uids = [1000, 1001]` in the file); by default every front end that may connect.
    /// A controller is offered to a front end only if every disk on it is.
    #[serde(default)]
    pub uids: Option<UidList>,
}

/// A list of uids: `1000`, `"1000:1001"` or `[1000, 1001]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UidList(pub Vec<u32>);

impl<'de> Deserialize<'de> for UidList {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Form {
            One(u32),
            List(Vec<u32>),
            Text(String),
        }
        match Form::deserialize(d)? {
            Form::One(u) => Ok(Self(vec![u])),
            Form::List(v) => Ok(Self(v)),
            Form::Text(t) => t
                .split(':')
                .map(|u| u.trim().parse::<u32>())
                .collect::<Result<_, _>>()
                .map(Self)
                .map_err(|_| serde::de::Error::custom(format!("`{t}` is not a list of uids"))),
        }
    }
}

/// Which front ends (by uid) each offer is visible to, by instance GUID; an offer not listed
/// is visible to every front end that may connect.
pub type Access = std::collections::HashMap<Guid, Vec<u32>>;

/// Most LUNs on one controller.
pub const MAX_LUNS: u8 = 64;

/// A SCSI controller: one storage channel offer and the disks on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Controller {
    /// The offer's instance GUID.
    pub instance: Guid,
    /// The disks, with their LUNs.
    pub disks: Vec<(u8, DiskConfig)>,
}

fn one() -> u16 {
    1
}

/// One NIC, backed by a TAP device.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NicConfig {
    /// The TAP device's name: created if missing, opened if it exists.
    pub tap: String,
    /// The guest's MAC address (`02:00:00:00:00:01`); by default a stable locally administered
    /// address derived from the NIC's instance id.
    #[serde(default)]
    pub mac: Option<String>,
    /// The MTU, 68 to 9000 (default 1500); the TAP's is set to it (plus 4 with a VLAN).
    #[serde(default)]
    pub mtu: Option<u32>,
    /// A VLAN id (1 to 4094): frames are tagged toward the host TAP and untagged toward the
    /// guest.
    #[serde(default)]
    pub vlan: Option<u16>,
    /// Queues (the primary channel plus subchannels, one TAP queue each), 1 to 64.
    #[serde(default = "one")]
    pub queues: u16,
    /// The uids of the front ends this NIC is offered to; by default every one (see
    /// [`DiskConfig::uids`]).
    #[serde(default)]
    pub uids: Option<UidList>,
}

/// The whole configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The partition socket's path.
    pub socket: Option<PathBuf>,
    /// Disks.
    #[serde(default, rename = "disk")]
    pub disks: Vec<DiskConfig>,
    /// NICs.
    #[serde(default, rename = "nic")]
    pub nics: Vec<NicConfig>,
    /// Largest GPADL a guest may create, in bytes (default 1 GiB).
    pub max_gpadl_bytes: Option<u64>,
    /// The uids allowed to connect (`--allow-uid`); the daemon's own uid is always allowed,
    /// root is not implied.
    #[serde(default)]
    pub allow_uid: Vec<u32>,
    /// The gids whose processes may also connect (`--allow-gid`); none by default.
    #[serde(default)]
    pub allow_gid: Vec<u32>,
    /// Most sessions (front ends) at a time (default 64).
    pub max_sessions: Option<usize>,
    /// Most channels a guest may have open at a time (default 256).
    pub max_channels: Option<usize>,
    /// Most GPADLs a guest may hold (default 4096).
    pub max_gpadls: Option<usize>,
    /// Most guest memory all of a guest's GPADLs may describe, in bytes (default 16 GiB).
    pub max_total_gpadl_bytes: Option<u64>,
    /// Most channel messages queued per VP for a guest that does not take them (default 1024).
    pub max_queued_messages: Option<usize>,
    /// Most guest memory one front end may register, all regions together, in bytes (default
    /// 1 TiB; see `SessionLimits::max_memory_bytes`).
    pub max_memory_bytes: Option<u64>,
    /// Most kernel mappings one guest's scattered rings may hold (default 4096, and at most the
    /// process's budget divided by `max_sessions`: see `DaemonConfig::effective`).
    pub max_mapped_pieces: Option<usize>,
    /// Run under the seccomp filter once set up (default true; `--no-seccomp` turns it off,
    /// for debugging). See `ringbuf::sandbox`.
    pub seccomp: Option<bool>,
}

impl Config {
    /// The daemon's limits and access rules: the defaults, overridden by what is set here.
    /// Read at start; a reload changes only the offers.
    pub fn daemon_config(&self) -> crate::daemon::DaemonConfig {
        let mut d = crate::daemon::DaemonConfig {
            allowed_gids: self.allow_gid.clone(),
            ..Default::default()
        };
        for &uid in &self.allow_uid {
            if !d.allowed_uids.contains(&uid) {
                d.allowed_uids.push(uid);
            }
        }
        let server = &mut d.session.server;
        if let Some(v) = self.max_gpadl_bytes {
            server.max_gpadl_bytes = v;
        }
        if let Some(v) = self.max_channels {
            server.max_open_channels = v;
        }
        if let Some(v) = self.max_gpadls {
            server.max_gpadls = v;
        }
        if let Some(v) = self.max_total_gpadl_bytes {
            server.max_total_gpadl_bytes = v;
        }
        if let Some(v) = self.max_queued_messages {
            d.session.limits.max_queued_messages = v;
        }
        if let Some(v) = self.max_memory_bytes {
            d.session.limits.max_memory_bytes = v;
        }
        if let Some(v) = self.max_mapped_pieces {
            d.session.limits.max_mapped_pieces = v;
        }
        if let Some(v) = self.max_sessions {
            d.max_sessions = v;
        }
        d
    }

    /// Reads a TOML configuration file.
    pub fn from_file(path: &Path) -> Result<Self, Error> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::Config(format!("cannot read {}: {e}", path.display())))?;
        toml::from_str(&text).map_err(|e| Error::Config(format!("{}: {e}", path.display())))
    }

    /// The SCSI controllers the disks make, in order of first appearance, with LUNs assigned.
    pub fn controllers(&self) -> Result<Vec<Controller>, Error> {
        let mut out: Vec<(Option<u32>, Controller)> = Vec::new();
        let mut seen: Vec<String> = Vec::new();
        for d in &self.disks {
            let at = match d.controller {
                Some(n) => out.iter().position(|(c, _)| *c == Some(n)),
                None => None,
            };
            let idx = match at {
                Some(i) => i,
                None => {
                    // Stable across restarts: named controllers by number, others by the disk's
                    // path (and which occurrence of that path this is).
                    let name = match d.controller {
                        Some(n) => format!("controller-{n}"),
                        None => d.path.to_string_lossy().into_owned(),
                    };
                    let n = seen.iter().filter(|s| **s == name).count();
                    seen.push(name.clone());
                    out.push((
                        d.controller,
                        Controller {
                            instance: instance(1, &name, n),
                            disks: Vec::new(),
                        },
                    ));
                    out.len() - 1
                }
            };
            let c = &mut out[idx].1;
            let lun = match d.lun {
                Some(l) => l,
                None => (0..MAX_LUNS)
                    .find(|l| !c.disks.iter().any(|(x, _)| x == l))
                    .unwrap_or(MAX_LUNS),
            };
            if lun >= MAX_LUNS || c.disks.iter().any(|(x, _)| *x == lun) {
                return Err(Error::Config(format!(
                    "disk {}: LUN {lun} is taken or out of range (0 to {})",
                    d.path.display(),
                    MAX_LUNS - 1
                )));
            }
            c.disks.push((lun, d.clone()));
        }
        Ok(out.into_iter().map(|(_, c)| c).collect())
    }

    /// Checks values that the types cannot.
    pub fn validate(&self) -> Result<(), Error> {
        self.controllers()?;
        for d in &self.disks {
            if !(1..=64).contains(&d.queues) {
                return Err(Error::Config(format!(
                    "disk {}: queues must be 1 to 64",
                    d.path.display()
                )));
            }
            let meta = std::fs::metadata(&d.path)
                .map_err(|e| Error::Config(format!("disk {}: {e}", d.path.display())))?;
            use std::os::unix::fs::FileTypeExt;
            if !(meta.is_file() || meta.file_type().is_block_device()) {
                return Err(Error::Config(format!(
                    "disk {}: not a regular file or block device",
                    d.path.display()
                )));
            }
        }
        for n in &self.nics {
            if n.tap.is_empty() || n.tap.len() > 15 || n.tap.contains(['/', ' ', '\0']) {
                return Err(Error::Config(format!(
                    "nic tap={:?}: not a valid interface name",
                    n.tap
                )));
            }
        }
        self.nic_settings()?;
        Ok(())
    }

    /// Every NIC's settings, by instance GUID (the same as its offer's).
    pub fn nic_settings(&self) -> Result<Vec<(Guid, crate::netvsp::NicSettings)>, Error> {
        use crate::netvsp::{MAX_MTU, MAX_QUEUES, MIN_MTU};
        let mut seen: Vec<&str> = Vec::new();
        let mut out = Vec::new();
        for n in &self.nics {
            let k = seen.iter().filter(|s| **s == n.tap).count();
            seen.push(&n.tap);
            let id = instance(2, &n.tap, k);
            let bad = |what: &str| Error::Config(format!("nic tap={}: {what}", n.tap));
            let mtu = n.mtu.unwrap_or(1500);
            if !(MIN_MTU..=MAX_MTU).contains(&mtu) {
                return Err(bad(&format!("mtu must be {MIN_MTU} to {MAX_MTU}")));
            }
            if !(1..=MAX_QUEUES).contains(&n.queues) {
                return Err(bad(&format!("queues must be 1 to {MAX_QUEUES}")));
            }
            if n.vlan.is_some_and(|v| !(1..=4094).contains(&v)) {
                return Err(bad("vlan must be 1 to 4094"));
            }
            let mac = match &n.mac {
                Some(m) => parse_mac(m)
                    .ok_or_else(|| bad("mac must be a unicast address like 02:00:00:00:00:01"))?,
                None => default_mac(id),
            };
            out.push((
                id,
                crate::netvsp::NicSettings {
                    tap: n.tap.clone(),
                    mac,
                    mtu,
                    vlan: n.vlan,
                    queues: n.queues,
                },
            ));
        }
        Ok(out)
    }

    /// Which front ends each offer is for ([`DiskConfig::uids`], [`NicConfig::uids`]).
    pub fn access(&self) -> Access {
        let mut access = Access::new();
        for c in self.controllers().unwrap_or_default() {
            let mut lists = c.disks.iter().filter_map(|(_, d)| d.uids.as_ref());
            if let Some(first) = lists.next() {
                let mut allowed = first.0.clone();
                for l in lists {
                    allowed.retain(|u| l.0.contains(u));
                }
                access.insert(c.instance, allowed);
            }
        }
        let mut seen: Vec<&str> = Vec::new();
        for n in &self.nics {
            let k = seen.iter().filter(|s| **s == n.tap).count();
            seen.push(&n.tap);
            if let Some(l) = &n.uids {
                access.insert(instance(2, &n.tap, k), l.0.clone());
            }
        }
        access
    }

    /// The channel offers this configuration makes: one SCSI controller per disk, then one
    /// network channel per NIC. Instance GUIDs derive from the disk's path or the TAP's name
    /// (and which occurrence of it this is), so they are stable across restarts and reloads and
    /// a reload can tell which devices went away.
    pub fn offers(&self) -> Vec<OfferSpec> {
        let mut v: Vec<OfferSpec> = self
            .controllers()
            .unwrap_or_default()
            .into_iter()
            .map(|c| offer(Guid::SCSI, c.instance))
            .collect();
        let mut seen: Vec<&str> = Vec::new();
        for n in &self.nics {
            let k = seen.iter().filter(|s| **s == n.tap).count();
            v.push(offer(Guid::NETWORK, instance(2, &n.tap, k)));
            seen.push(&n.tap);
        }
        v
    }
}

/// A stable instance GUID: 64-bit FNV-1a of the device's name, its kind and its occurrence,
/// behind a fixed prefix.
fn instance(kind: u8, name: &str, occurrence: usize) -> Guid {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name
        .bytes()
        .chain([kind])
        .chain((occurrence as u32).to_le_bytes())
    {
        h = (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
    }
    let mut g = *b"vmbus-st\0\0\0\0\0\0\0\0";
    g[8..16].copy_from_slice(&h.to_be_bytes());
    Guid(g)
}

/// `aa:bb:cc:dd:ee:ff` (or with `-`), unicast.
fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split([':', '-']);
    for b in &mut mac {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    (parts.next().is_none() && mac[0] & 1 == 0 && mac != [0; 6]).then_some(mac)
}

/// A stable, locally administered, unicast address from an instance GUID.
fn default_mac(id: Guid) -> [u8; 6] {
    let g = id.0;
    [0x02, g[11], g[12], g[13], g[14], g[15]]
}

fn offer(class: Guid, instance: Guid) -> OfferSpec {
    OfferSpec {
        interface_type: class,
        interface_instance: instance,
        subchannel_index: 0,
        mmio_megabytes: 0,
        flags: 0,
        user_defined: [0; 120],
    }
}

/// Parses a `key=value,key=value` option as the TOML table it stands for, so the command line
/// and the file accept exactly the same keys and values.
pub fn parse_kv<T: serde::de::DeserializeOwned>(what: &str, s: &str) -> Result<T, Error> {
    let mut table = toml::Table::new();
    for part in s.split(',').filter(|p| !p.is_empty()) {
        let (k, v) = part
            .split_once('=')
            .ok_or_else(|| Error::Config(format!("--{what} {s}: `{part}` is not key=value")))?;
        let value = match v {
            "on" | "true" | "yes" => toml::Value::Boolean(true),
            "off" | "false" | "no" => toml::Value::Boolean(false),
            _ => match v.parse::<i64>() {
                Ok(n) if k != "path" && k != "tap" => toml::Value::Integer(n),
                _ => toml::Value::String(v.to_string()),
            },
        };
        if table.insert(k.to_string(), value).is_some() {
            return Err(Error::Config(format!("--{what} {s}: `{k}` given twice")));
        }
    }
    T::deserialize(table).map_err(|e| Error::Config(format!("--{what} {s}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_line_options_parse_like_the_file() {
        let d: DiskConfig = parse_kv("disk", "path=/tmp/x.img,readonly=on,queues=4").unwrap();
        assert_eq!(
            d,
            DiskConfig {
                path: "/tmp/x.img".into(),
                readonly: true,
                direct: false,
                queues: 4,
                controller: None,
                lun: None,
                uids: None,
            }
        );
        // Two disks on one controller, LUNs assigned and given; a taken LUN is refused.
        let two: Config = toml::from_str(
            "[[disk]]\npath = \"a\"\ncontroller = 1\n[[disk]]\npath = \"b\"\ncontroller = 1\nlun = 5\n[[disk]]\npath = \"c\"\n",
        )
        .unwrap();
        let cs = two.controllers().unwrap();
        assert_eq!(cs.len(), 2);
        assert_eq!(
            cs[0].disks.iter().map(|(l, _)| *l).collect::<Vec<_>>(),
            [0, 5]
        );
        assert_eq!(two.offers().len(), 2);
        let clash: Config = toml::from_str(
            "[[disk]]\npath = \"a\"\ncontroller = 1\nlun = 2\n[[disk]]\npath = \"b\"\ncontroller = 1\nlun = 2\n",
        )
        .unwrap();
        assert!(clash.controllers().is_err());
        let n: NicConfig = parse_kv("nic", "tap=tap0").unwrap();
        assert_eq!(n.tap, "tap0");
        let n: NicConfig = parse_kv(
            "nic",
            "tap=t1,mac=02:aa:bb:cc:dd:ee,mtu=9000,vlan=100,queues=4",
        )
        .unwrap();
        let c = Config {
            nics: vec![n.clone()],
            ..Default::default()
        };
        let s = c.nic_settings().unwrap();
        assert_eq!(s[0].1.mac, [2, 0xaa, 0xbb, 0xcc, 0xdd, 0xee]);
        assert_eq!(
            (s[0].1.mtu, s[0].1.vlan, s[0].1.queues),
            (9000, Some(100), 4)
        );
        assert_eq!(s[0].0, c.offers()[0].interface_instance);
        for bad in [
            "mac=01:00:00:00:00:01",
            "mac=02:00",
            "mtu=9001",
            "mtu=67",
            "vlan=4095",
            "queues=0",
            "queues=65",
        ] {
            let n: NicConfig = parse_kv("nic", &format!("tap=t1,{bad}")).unwrap();
            let c = Config {
                nics: vec![n],
                ..Default::default()
            };
            assert!(c.nic_settings().is_err(), "{bad}");
        }
        // The default address: locally administered, unicast, stable, different per NIC.
        let two: Config = toml::from_str("[[nic]]\ntap = \"a\"\n[[nic]]\ntap = \"b\"\n").unwrap();
        let s = two.nic_settings().unwrap();
        assert_eq!(s[0].1.mac[0], 2);
        assert_ne!(s[0].1.mac, s[1].1.mac);
        assert_eq!(two.nic_settings().unwrap(), s);
        assert!(parse_kv::<DiskConfig>("disk", "path=a,bogus=1").is_err());
        assert!(
            parse_kv::<DiskConfig>("disk", "readonly=on").is_err(),
            "path is required"
        );
        assert!(parse_kv::<DiskConfig>("disk", "path=a,path=b").is_err());
        assert!(parse_kv::<DiskConfig>("disk", "path").is_err());
        let f: Config = toml::from_str(
            "socket = \"/run/v.sock\"\n[[disk]]\npath = \"a.img\"\ndirect = true\n[[nic]]\ntap = \"t1\"\n",
        )
        .unwrap();
        assert_eq!(f.disks[0].queues, 1);
        assert!(f.disks[0].direct);
        assert_eq!(f.offers().len(), 2);
        assert_eq!(f.offers()[0].interface_type, Guid::SCSI);
        assert_eq!(f.offers()[1].interface_type, Guid::NETWORK);
        assert_ne!(instance(1, "a", 0), instance(1, "a", 1));
        assert_ne!(instance(1, "a", 0), instance(2, "a", 0));
        assert_eq!(instance(1, "a.img", 0), instance(1, "a.img", 0));
    }

    #[test]
    fn limits_and_allowed_uids_from_the_file() {
        let c: Config = toml::from_str(
            "allow_uid = [1000, 0]\nmax_sessions = 3\nmax_channels = 9\nmax_gpadls = 7\nmax_total_gpadl_bytes = 65536\nmax_queued_messages = 5\nmax_memory_bytes = 8192\nmax_mapped_pieces = 100\n",
        )
        .unwrap();
        let d = c.daemon_config();
        let me = rustix::process::geteuid().as_raw();
        assert_eq!(d.allowed_uids[0], me, "the daemon's own uid comes first");
        assert!(d.allowed_uids.contains(&1000) && d.allowed_uids.contains(&0));
        assert_eq!(d.max_sessions, 3);
        assert_eq!(d.session.server.max_open_channels, 9);
        assert_eq!(d.session.server.max_gpadls, 7);
        assert_eq!(d.session.server.max_total_gpadl_bytes, 65536);
        assert_eq!(d.session.limits.max_queued_messages, 5);
        assert_eq!(d.session.limits.max_memory_bytes, 8192);
        assert_eq!(d.session.limits.max_mapped_pieces, 100);
        // Three sessions share the process's budget: each may have a third of it, at most.
        let share = ringbuf::shmem::MapBudget::process().limit() / 3;
        assert_eq!(
            d.effective().session.limits.max_mapped_pieces,
            100.min(share)
        );
        let d = Config::default().daemon_config().effective();
        let share = ringbuf::shmem::MapBudget::process().limit() / 64;
        assert_eq!(d.session.limits.max_mapped_pieces, 4096.min(share));
        let none = Config::default().daemon_config();
        assert_eq!(none.allowed_uids, [me], "only the daemon's uid by default");
    }

    #[test]
    fn offers_can_be_limited_to_front_ends() {
        let d: DiskConfig = parse_kv("disk", "path=a.img,uids=1000:1001").unwrap();
        assert_eq!(d.uids, Some(UidList(vec![1000, 1001])));
        let d: DiskConfig = parse_kv("disk", "path=a.img,uids=7").unwrap();
        assert_eq!(d.uids, Some(UidList(vec![7])));
        assert!(parse_kv::<DiskConfig>("disk", "path=a.img,uids=7:x").is_err());
        let c: Config = toml::from_str(
            "[[disk]]\npath = \"a.img\"\ncontroller = 1\nuids = [1, 2]\n\
             [[disk]]\npath = \"b.img\"\ncontroller = 1\nuids = [2, 3]\n\
             [[disk]]\npath = \"c.img\"\n\
             [[nic]]\ntap = \"t0\"\nuids = 5\n",
        )
        .unwrap();
        let offers = c.offers();
        let access = c.access();
        assert_eq!(access.len(), 2, "the open disk c.img is not listed");
        assert_eq!(
            access[&offers[0].interface_instance],
            [2],
            "a controller: every disk's uid"
        );
        assert!(!access.contains_key(&offers[1].interface_instance));
        assert_eq!(access[&offers[2].interface_instance], [5]);
    }

    #[test]
    fn validation_reports_what_is_wrong() {
        let c = Config {
            disks: vec![DiskConfig {
                path: "/nonexistent/disk.img".into(),
                readonly: false,
                direct: false,
                queues: 1,
                controller: None,
                lun: None,
                uids: None,
            }],
            ..Config::default()
        };
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("/nonexistent/disk.img"), "{e}");
        let c = Config {
            nics: vec![NicConfig {
                tap: "a-name-that-is-too-long".into(),
                mac: None,
                mtu: None,
                vlan: None,
                queues: 1,
                uids: None,
            }],
            ..Config::default()
        };
        assert!(c.validate().is_err());
    }
}
