//! The shim's side of the partition socket (`docs/partition-socket.md`): it attaches a VM to a
//! running `vspd`. HELLO and ADD_MEMORY (the guest-RAM memfd, one region per KVM slot) when it
//! attaches; SET_VP with the VP's irqfd when the guest programs SIMP, SIEFP, SCONTROL or the
//! VMBus SINT; POST_MESSAGE and EOM from the vCPUs; the daemon's CHANNEL_SIGNAL eventfds are
//! kept by connection id and written on HvSignalEvent.
#![allow(unsafe_code)] // kvm-ioctls takes eventfds as vmm-sys-util's EventFd: one conversion.

use crate::vm::GuestRam;
use crate::{Error, Result};
use ringbuf::socket::SeqPacket;
use std::collections::HashMap;
use std::os::fd::{BorrowedFd, FromRawFd, IntoRawFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;
use vmbus_proto::partition::{
    self, status, AddMemory, ChannelSignal, Eom, Hello, HelloReply, Kind, PostMessage, SetVp,
    SignalEvent, Status,
};
use vmbus_proto::synic::HvPostMessageInput;
use vmm_sys_util::eventfd::EventFd;

/// Turns an owned descriptor into vmm-sys-util's `EventFd`, the type kvm-ioctls takes for
/// KVM_IRQFD and KVM_IOEVENTFD (the kernel checks that it is an eventfd).
pub(crate) fn event_fd(fd: OwnedFd) -> EventFd {
    // SAFETY: `into_raw_fd` hands over the only owner of the descriptor; the EventFd becomes
    // its owner and closes it.
    unsafe { EventFd::from_raw_fd(fd.into_raw_fd()) }
}

fn vsp_err(what: impl Into<String>) -> Error {
    Error::Vsp(what.into())
}

/// A VM's connection to `vspd`.
pub struct Link {
    sock: SeqPacket,
    /// Eventfds from CHANNEL_SIGNAL, by connection id.
    channels: Mutex<HashMap<u32, EventFd>>,
    /// Requests the daemon refused (a STATUS other than OK after attaching).
    refused: AtomicU64,
    /// Set when the VM is ending: a send waiting for room in the socket gives up.
    stopping: AtomicBool,
}

/// How long a send waits for room in the socket between looks at [`Link::stop_sending`].
const SEND_WAIT: Duration = Duration::from_millis(20);

impl Link {
    /// Connects to the daemon at `socket`, says HELLO for `vp_count` VPs and hands it guest
    /// RAM.
    pub fn attach(socket: &Path, vp_count: u32, ram: &GuestRam) -> Result<Self> {
        let sock = SeqPacket::connect(socket)
            .map_err(|e| vsp_err(format!("cannot connect to {}: {e}", socket.display())))?;
        let link = Link {
            sock,
            channels: Mutex::new(HashMap::new()),
            refused: AtomicU64::new(0),
            stopping: AtomicBool::new(false),
        };
        let hello = Hello {
            version: partition::VERSION,
            vp_count,
        };
        link.send(&partition::encode(Kind::HELLO, &hello), &[])?;
        let reply: HelloReply = link.expect(Kind::HELLO_REPLY)?;
        if reply.version != partition::VERSION || reply.status != status::OK {
            return Err(vsp_err(format!(
                "vspd refused the session: version {}, status {}",
                reply.version, reply.status
            )));
        }
        for (gpa, fd_offset, len) in ram.slots() {
            let add = AddMemory {
                gpa,
                len,
                fd_offset,
            };
            link.send(&partition::encode(Kind::ADD_MEMORY, &add), &[ram.fd()])?;
            let st: Status = link.expect(Kind::STATUS)?;
            if st.status != status::OK {
                return Err(vsp_err(format!(
                    "vspd refused guest memory {gpa:#x}+{len:#x}: status {}",
                    st.status
                )));
            }
        }
        Ok(link)
    }

    /// Sends, waiting for room in the socket (the daemon reads all the time), but never past
    /// [`Link::stop_sending`], so that a stalled daemon cannot keep a vCPU thread from ending.
    fn send(&self, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> Result<()> {
        use rustix::event::{poll, PollFd, PollFlags, Timespec};
        loop {
            if self.try_send(bytes, fds)? {
                return Ok(());
            }
            if self.stopping.load(Ordering::SeqCst) {
                return Err(vsp_err("the VM is ending with a message to vspd unsent"));
            }
            let wait = Timespec {
                tv_sec: 0,
                tv_nsec: SEND_WAIT.as_nanos() as _,
            };
            let mut fds = [PollFd::new(&self.sock, PollFlags::OUT)];
            match poll(&mut fds, Some(&wait)) {
                Ok(_) | Err(rustix::io::Errno::INTR) => {}
                Err(e) => return Err(vsp_err(format!("poll the vspd socket: {e}"))),
            }
        }
    }

    fn try_send(&self, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> Result<bool> {
        self.sock
            .try_send(bytes, fds)
            .map_err(|e| vsp_err(format!("send to vspd: {e}")))
    }

    /// Makes sends give up instead of waiting for room (the VM is ending).
    pub fn stop_sending(&self) {
        self.stopping.store(true, Ordering::SeqCst);
    }

    /// Reads the next message, which must be `kind` (only while attaching, before the reader
    /// runs).
    fn expect<T: zerocopy::FromBytes>(&self, kind: Kind) -> Result<T> {
        let mut buf = [0u8; partition::MAX_MESSAGE_SIZE];
        let d = self
            .sock
            .recv(&mut buf)
            .map_err(|e| vsp_err(format!("receive from vspd: {e}")))?
            .ok_or_else(|| vsp_err("vspd closed the connection"))?;
        let (k, body) = partition::split(&buf[..d.len]).map_err(|e| vsp_err(e.to_string()))?;
        if k != kind {
            return Err(vsp_err(format!("vspd sent {k:?} where {kind:?} was due")));
        }
        partition::body(k, body).map_err(|e| vsp_err(e.to_string()))
    }

    /// Tells the daemon a VP's SynIC state, with the irqfd that raises its VMBus SINT.
    pub fn set_vp(&self, set: SetVp, irqfd: BorrowedFd<'_>) -> Result<()> {
        self.send(&partition::encode(Kind::SET_VP, &set), &[irqfd])
    }

    /// Forwards a validated HvPostMessage without waiting: `Ok(false)` when the socket is full
    /// (the guest gets HV_STATUS_INSUFFICIENT_BUFFERS and retries, as on Hyper-V).
    pub fn post(&self, vp: u32, input: HvPostMessageInput) -> Result<bool> {
        let msg = PostMessage {
            vp,
            reserved: 0,
            input,
        };
        self.try_send(&partition::encode(Kind::POST_MESSAGE, &msg), &[])
    }

    /// Forwards an HvSignalEvent of a connection with no bound eventfd (SIGNAL_EVENT) without
    /// waiting: `Ok(false)` when the socket is full.
    pub fn signal_slow(&self, connection_id: u32, flag: u16) -> Result<bool> {
        let body = SignalEvent {
            connection_id,
            flag_number: u32::from(flag),
        };
        self.try_send(&partition::encode(Kind::SIGNAL_EVENT, &body), &[])
    }

    /// Forwards an EOM.
    pub fn eom(&self, vp: u32) -> Result<()> {
        self.send(&partition::encode(Kind::EOM, &Eom { vp, reserved: 0 }), &[])
    }

    /// Whether the daemon handed an eventfd for `connection_id`.
    pub fn knows_channel(&self, connection_id: u32) -> bool {
        self.channels
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(&connection_id)
    }

    /// Writes the eventfd of `connection_id`; false if there is none.
    pub fn signal(&self, connection_id: u32) -> bool {
        let channels = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        match channels.get(&connection_id) {
            Some(fd) => {
                // A full counter (EAGAIN) means a signal is pending already.
                let _ = fd.write(1);
                true
            }
            None => false,
        }
    }

    /// Requests the daemon refused since attaching.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// Reads the daemon's messages until the connection ends or [`Link::shutdown`]: STATUS
    /// answers (refusals are counted and logged), CHANNEL_SIGNAL and CHANNEL_SIGNAL_REMOVED.
    /// `on_channel(connection_id, eventfd, true)` is called when a channel's eventfd arrives
    /// (the VM binds it with KVM_IOEVENTFD), `(connection_id, eventfd, false)` when it goes.
    pub fn serve(&self, mut on_channel: impl FnMut(u32, &EventFd, bool)) -> Result<()> {
        let mut buf = [0u8; partition::MAX_MESSAGE_SIZE];
        loop {
            let Some(mut d) = self
                .sock
                .recv(&mut buf)
                .map_err(|e| vsp_err(format!("receive from vspd: {e}")))?
            else {
                return Ok(());
            };
            let (kind, body) =
                partition::split(&buf[..d.len]).map_err(|e| vsp_err(e.to_string()))?;
            match kind {
                Kind::STATUS => {
                    let st: Status =
                        partition::body(kind, body).map_err(|e| vsp_err(e.to_string()))?;
                    if st.status != status::OK {
                        self.refused.fetch_add(1, Ordering::Relaxed);
                        eprintln!(
                            "vmbus-vm: vspd refused {:?}: status {}",
                            st.request, st.status
                        );
                    }
                }
                Kind::CHANNEL_SIGNAL => {
                    let c: ChannelSignal =
                        partition::body(kind, body).map_err(|e| vsp_err(e.to_string()))?;
                    let fd = d
                        .fds
                        .pop()
                        .ok_or_else(|| vsp_err("CHANNEL_SIGNAL without its eventfd"))?;
                    let fd = event_fd(fd);
                    let mut channels = self.channels.lock().unwrap_or_else(|e| e.into_inner());
                    if let Some(old) = channels.remove(&c.connection_id) {
                        on_channel(c.connection_id, &old, false);
                    }
                    on_channel(c.connection_id, &fd, true);
                    channels.insert(c.connection_id, fd);
                }
                Kind::CHANNEL_SIGNAL_REMOVED => {
                    let c: ChannelSignal =
                        partition::body(kind, body).map_err(|e| vsp_err(e.to_string()))?;
                    let gone = self
                        .channels
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(&c.connection_id);
                    if let Some(fd) = gone {
                        on_channel(c.connection_id, &fd, false);
                    }
                }
                other => return Err(vsp_err(format!("vspd sent an unexpected {other:?}"))),
            }
        }
    }

    /// Ends [`Link::serve`] (and the session: the daemon sees the connection close).
    pub fn shutdown(&self) {
        let _ = rustix::net::shutdown(&self.sock, rustix::net::Shutdown::Both);
    }
}
