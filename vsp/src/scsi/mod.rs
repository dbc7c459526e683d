//! The SCSI disk a storvsp LUN presents: CDB parsing and checking, the answers that need no
//! I/O (INQUIRY, VPD pages, READ CAPACITY, MODE SENSE/SELECT, REQUEST SENSE, REPORT LUNS), and
//! the block I/O the others turn into. Pure logic: no I/O, no guest memory.
//!
//! The caller (storvsp) does, per SRB:
//!
//! 1. `n = disk.data_out_len(cdb)`; if `n > 0`, copy `min(n, data_transfer_length)` bytes from
//!    the start of the guest's data-out buffer (parameter lists are small and bounded).
//! 2. `disk.execute(lun, cdb, data_transfer_length, &data_out)` returns an [`Action`]: either a
//!    finished [`Response`] (status, data-in bytes, sense) or block I/O to run.
//! 3. After running the block I/O, [`ScsiDisk::io_done`] turns its result into the [`Response`].
//!
//! REPORT LUNS and commands to a LUN without a disk are answered by [`report_luns`] and
//! [`no_lun_response`], since only the caller knows which LUNs exist.
//!
//! Semantics follow SPC-4 and SBC-3 as Linux's `sd` driver uses them: fixed-format sense data
//! only, no protection information, a single initiator, no saved mode pages.

mod inquiry;
mod mode;
#[cfg(test)]
mod tests;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use vmbus_proto::storvsp::scsi::{
    asc, service_action, status, AdditionalSense, Cdb10, Cdb12, Cdb16, Cdb6, InquiryCdb, Opcode,
    ReadCapacity10Data, ReadCapacity16Data, ReportLunsHeader, SenseData, SenseKey,
    UnmapBlockDescriptor, UnmapListHeader, CDB_FUA, PERIPHERAL_NOT_CONNECTED, READ_CAPACITY_LBPME,
};

use zerocopy::byteorder::big_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// T10 vendor identification in INQUIRY data (8 ASCII bytes, space padded).
///
/// Linux's storvsc only enables WRITE SAME for vendor `Msft` (on protocol WIN10 and later); with
/// this vendor it leaves WRITE SAME off and discards with UNMAP.
pub const VENDOR_ID: [u8; 8] = *b"VMBUSRS ";
/// Product identification in INQUIRY data (16 ASCII bytes, space padded).
pub const PRODUCT_ID: [u8; 16] = *b"Virtual Disk    ";
/// Product revision level in INQUIRY data (4 ASCII bytes).
pub const PRODUCT_REVISION: [u8; 4] = *b"0001";

/// Most block descriptors one UNMAP may carry (VPD page 0xB0).
pub const MAX_UNMAP_DESCRIPTORS: u32 = 256;
/// The MAXIMUM UNMAP LBA COUNT of VPD page 0xB0: `FFFFFFFFh`, no maximum. Deallocating is a
/// hole punched per descriptor (`fallocate`), whatever its length, so the backend has no
/// limit to report; each descriptor is still checked against the capacity, and their number
/// against [`MAX_UNMAP_DESCRIPTORS`]. (A limit of 4 Mi blocks made a 3 GiB TRIM from a client
/// that does not split by it fail with EINVAL.)
pub const MAX_UNMAP_BLOCKS: u32 = u32::MAX;
/// Most blocks one WRITE SAME may write (VPD page 0xB0).
pub const MAX_WRITE_SAME_BLOCKS: u32 = 0x0040_0000;
/// Longest UNMAP parameter list looked at: the header and [`MAX_UNMAP_DESCRIPTORS`] descriptors.
pub const MAX_UNMAP_PARAMETER_LEN: usize = size_of::<UnmapListHeader>()
    + MAX_UNMAP_DESCRIPTORS as usize * size_of::<UnmapBlockDescriptor>();
/// Longest MODE SELECT parameter list accepted (a header, a block descriptor and both pages
/// take at most 56 bytes).
pub const MAX_MODE_SELECT_LEN: usize = 256;

/// NACA bit of the CONTROL byte (the last CDB byte); ACA is not supported.
const CONTROL_NACA: u8 = 0x04;
/// RDPROTECT/WRPROTECT/VRPROTECT bits of CDB byte 1; protection information is not supported.
const CDB_PROTECT: u8 = 0xE0;
/// WRITE SAME / UNMAP byte 1: ANCHOR (anchored LBAs are not supported).
const CDB_ANCHOR_WS: u8 = 0x10;
/// UNMAP byte 1: ANCHOR.
const CDB_ANCHOR_UNMAP: u8 = 0x01;
/// WRITE SAME byte 1: UNMAP.
const CDB_UNMAP: u8 = 0x08;
/// WRITE SAME byte 1: the obsolete PBDATA and LBDATA bits.
const CDB_PBDATA_LBDATA: u8 = 0x06;
/// WRITE SAME (16) byte 1: NDOB, no data-out buffer (write zeros).
const CDB_NDOB: u8 = 0x01;
/// VERIFY byte 1: BYTCHK (bits 1-2).
const CDB_BYTCHK: u8 = 0x06;
/// REQUEST SENSE byte 1: DESC (descriptor-format sense, not supported).
const CDB_DESC: u8 = 0x01;

/// What the disk is: its size, geometry and identity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskInfo {
    /// Capacity in logical blocks.
    pub blocks: u64,
    /// Logical block size in bytes: 512 or 4096.
    pub block_size: u32,
    /// Writes, UNMAP and WRITE SAME are refused with DATA PROTECT / WRITE PROTECTED.
    pub readonly: bool,
    /// The backend can deallocate (UNMAP, WRITE SAME with UNMAP); reported as thin provisioning.
    pub discard: bool,
    /// Unit serial number (VPD page 0x80); non-printable characters are dropped and it is cut
    /// to 20 bytes.
    pub serial: String,
    /// The low 60 bits of the locally assigned NAA designator (NAA type 3) of VPD page 0x83;
    /// should be unique per disk (a hash of its path, say).
    pub naa: u64,
    /// Maximum transfer length in blocks (VPD page 0xB0); longer READ/WRITE fail with INVALID
    /// FIELD IN CDB. 0: no limit.
    pub max_transfer_blocks: u32,
    /// Optimal transfer length in blocks (VPD page 0xB0); 0: not reported.
    pub optimal_io_blocks: u32,
    /// The medium rotates (VPD page 0xB1 reports "not reported" rather than non-rotating).
    pub rotational: bool,
}

/// A finished command: what goes back in the SRB.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    /// SCSI status, see [`status`].
    pub status: u8,
    /// Data-in bytes for the initiator; never longer than the command's buffer.
    pub data: Vec<u8>,
    /// Fixed-format sense data, present exactly when `status` is CHECK CONDITION.
    pub sense: Option<SenseData>,
}

impl Response {
    /// GOOD without data.
    pub fn good() -> Self {
        Self::with_data(Vec::new())
    }

    /// GOOD with data-in bytes.
    pub fn with_data(data: Vec<u8>) -> Self {
        Self {
            status: status::GOOD,
            data,
            sense: None,
        }
    }

    /// CHECK CONDITION with the given sense key and additional sense.
    pub fn check_condition(key: SenseKey, sense: AdditionalSense) -> Self {
        Self {
            status: status::CHECK_CONDITION,
            data: Vec::new(),
            sense: Some(SenseData::new(key, sense)),
        }
    }
}

/// What WRITE SAME writes to each block of its range.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Fill {
    /// The first `block_size` bytes of the data-out buffer (already fetched via
    /// [`ScsiDisk::data_out_len`]), replicated to every block.
    Data,
    /// Zeros: afterwards the range must read as zeros.
    Zeros {
        /// The initiator allows deallocation (UNMAP bit, discard supported): the caller may
        /// deallocate as long as the range then reads as zeros (a punched hole does).
        may_unmap: bool,
    },
}

/// One range of an UNMAP, checked against the capacity; never empty.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct UnmapRange {
    /// First block.
    pub lba: u64,
    /// Number of blocks (at least 1).
    pub blocks: u32,
}

/// What the caller does for a command. Every range is checked: it lies within the capacity and
/// is not empty, and a [`Action::Read`] or [`Action::Write`] fits in the command's buffer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// The command is finished; nothing to do but complete the SRB.
    Done(Response),
    /// Read `blocks` blocks at `lba` into the data-in buffer, then call [`ScsiDisk::io_done`].
    Read {
        /// First block.
        lba: u64,
        /// Number of blocks.
        blocks: u32,
        /// FUA was set: a read may ignore it (the backend has no cache of its own to bypass).
        fua: bool,
    },
    /// Write `blocks` blocks at `lba` from the data-out buffer, then call [`ScsiDisk::io_done`].
    Write {
        /// First block.
        lba: u64,
        /// Number of blocks.
        blocks: u32,
        /// The write must be durable before completion (FUA set, or the write cache disabled).
        fua: bool,
    },
    /// SYNCHRONIZE CACHE: make every completed write durable.
    Flush,
    /// UNMAP: deallocate these ranges (they may overlap). Afterwards their contents are
    /// unspecified (LBPRZ is not claimed), so deallocation may also be skipped.
    Unmap(Vec<UnmapRange>),
    /// WRITE SAME: fill `blocks` blocks at `lba`.
    WriteSame {
        /// First block.
        lba: u64,
        /// Number of blocks (at least 1, at most [`MAX_WRITE_SAME_BLOCKS`]).
        blocks: u32,
        /// What to write.
        fill: Fill,
        /// The range must be durable before completion (the write cache is disabled).
        fua: bool,
    },
}

/// The kind of block I/O an [`Action`] asked for, to turn its result into a [`Response`].
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum IoKind {
    /// [`Action::Read`].
    Read,
    /// [`Action::Write`].
    Write,
    /// [`Action::Flush`].
    Flush,
    /// [`Action::Unmap`].
    Unmap,
    /// [`Action::WriteSame`].
    WriteSame,
}

impl Action {
    /// The kind of block I/O this action asks for; `None` for [`Action::Done`].
    pub fn io_kind(&self) -> Option<IoKind> {
        match self {
            Action::Done(_) => None,
            Action::Read { .. } => Some(IoKind::Read),
            Action::Write { .. } => Some(IoKind::Write),
            Action::Flush => Some(IoKind::Flush),
            Action::Unmap(_) => Some(IoKind::Unmap),
            Action::WriteSame { .. } => Some(IoKind::WriteSame),
        }
    }
}

/// A command that ends in CHECK CONDITION: its sense key and additional sense.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
struct Check {
    key: SenseKey,
    asc: AdditionalSense,
}

impl Check {
    const fn illegal(asc: AdditionalSense) -> Self {
        Self {
            key: SenseKey::ILLEGAL_REQUEST,
            asc,
        }
    }

    fn response(self) -> Response {
        Response::check_condition(self.key, self.asc)
    }
}

const INVALID_FIELD: Check = Check::illegal(asc::INVALID_FIELD_IN_CDB);
const INVALID_OPCODE: Check = Check::illegal(asc::INVALID_COMMAND_OPCODE);
const LBA_OUT_OF_RANGE: Check = Check::illegal(asc::LBA_OUT_OF_RANGE);
const INVALID_PARAMETER: Check = Check::illegal(asc::INVALID_FIELD_IN_PARAMETER_LIST);
const PARAMETER_LENGTH: Check = Check::illegal(asc::PARAMETER_LIST_LENGTH_ERROR);
const WRITE_PROTECTED: Check = Check {
    key: SenseKey::DATA_PROTECT,
    asc: asc::WRITE_PROTECTED,
};

/// Reads the fixed part of a CDB as `T` (whose size is the CDB's length): a shorter CDB, or one
/// asking for ACA (NACA in the CONTROL byte), is INVALID FIELD IN CDB. Extra bytes are ignored.
fn parse<T: FromBytes + KnownLayout + Immutable>(cdb: &[u8]) -> Result<T, Check> {
    let n = size_of::<T>();
    let bytes = cdb.get(..n).ok_or(INVALID_FIELD)?;
    if bytes[n - 1] & CONTROL_NACA != 0 {
        return Err(INVALID_FIELD);
    }
    T::read_from_bytes(bytes).map_err(|_| INVALID_FIELD)
}

fn be16(b: &[u8]) -> usize {
    usize::from(u16::from_be_bytes([b[0], b[1]]))
}

/// `data` cut to the allocation length and the initiator's buffer.
fn truncated(mut data: Vec<u8>, alloc_len: usize, data_len: u32) -> Vec<u8> {
    let data_len = usize::try_from(data_len).unwrap_or(usize::MAX);
    data.truncate(alloc_len.min(data_len));
    data
}

/// The state of a logical unit that every queue serving it shares: each channel of a
/// multi-queue controller has its own [`ScsiDisk`], and what one of them changes (MODE SELECT)
/// or what the host changes (write protection on reload) must hold for all of them at once.
#[derive(Debug)]
pub struct LunState {
    /// WCE of the caching mode page: writes may complete before they are durable.
    write_cache: AtomicBool,
    /// Writes are refused (DATA PROTECT / WRITE PROTECTED) whatever [`DiskInfo::readonly`]
    /// says: set by the host when the disk's configuration became read-only.
    write_protected: AtomicBool,
}

impl Default for LunState {
    fn default() -> Self {
        Self {
            write_cache: AtomicBool::new(true),
            write_protected: AtomicBool::new(false),
        }
    }
}

impl LunState {
    /// The state of a new logical unit: write cache enabled, not write protected.
    pub fn new() -> Arc<Self> {
        Arc::default()
    }

    /// Whether the write cache is enabled.
    pub fn write_cache(&self) -> bool {
        // Acquire pairs with the Release in `set_write_cache`: a command that the initiator
        // sends after seeing MODE SELECT complete (on any queue) sees its setting. (The ring
        // and the eventfd between the two already order them; this says so locally.)
        self.write_cache.load(Ordering::Acquire)
    }

    /// Enables or disables the write cache (MODE SELECT, caching page).
    pub fn set_write_cache(&self, on: bool) {
        self.write_cache.store(on, Ordering::Release);
    }

    /// Whether the host write-protected the unit.
    pub fn write_protected(&self) -> bool {
        // Acquire pairs with the Release in `write_protect`.
        self.write_protected.load(Ordering::Acquire)
    }

    /// Refuses every later write, UNMAP and WRITE SAME of every queue (there is no way back:
    /// a disk made writable again is a new logical unit).
    pub fn write_protect(&self) {
        self.write_protected.store(true, Ordering::Release);
    }
}

/// One SCSI disk (a logical unit) as one queue sees it: its [`DiskInfo`], the [`LunState`] it
/// shares with the other queues of the unit, and this queue's own state.
#[derive(Debug)]
pub struct ScsiDisk {
    info: DiskInfo,
    /// Shared by every queue of the unit.
    state: Arc<LunState>,
    /// A unit attention condition to report on the next command (other than INQUIRY, REPORT
    /// LUNS, REQUEST SENSE).
    unit_attention: Option<AdditionalSense>,
    /// Sense data of the last command that ended in CHECK CONDITION from [`ScsiDisk::execute`],
    /// until the next command: what REQUEST SENSE returns.
    last_sense: Option<SenseData>,
}

impl ScsiDisk {
    /// A disk with the write cache enabled and no pending unit attention, whose state no other
    /// queue shares. The serial number is cut to 20 printable ASCII bytes. A disk of 0 blocks
    /// refuses every block command.
    pub fn new(info: DiskInfo) -> Self {
        Self::with_state(info, LunState::new())
    }

    /// A disk whose unit state (write cache, write protection) is `state`, shared with the
    /// other queues of the same unit.
    pub fn with_state(mut info: DiskInfo, state: Arc<LunState>) -> Self {
        debug_assert!(
            info.block_size.is_power_of_two() && info.block_size >= 512,
            "block size {} is not a power of two of at least 512",
            info.block_size
        );
        info.serial = info
            .serial
            .chars()
            .filter(|c| c.is_ascii_graphic() || *c == ' ')
            .take(20)
            .collect();
        Self {
            info,
            state,
            unit_attention: None,
            last_sense: None,
        }
    }

    /// What the disk is.
    pub fn info(&self) -> &DiskInfo {
        &self.info
    }

    /// Whether the write cache is enabled (WCE, changed by MODE SELECT). When it is not, every
    /// [`Action::Write`] has `fua` set.
    pub fn write_cache_enabled(&self) -> bool {
        self.state.write_cache()
    }

    /// The unit state this queue shares with the others.
    pub fn state(&self) -> &Arc<LunState> {
        &self.state
    }

    /// Whether changes are refused: a read-only disk, or one the host write-protected since.
    pub fn readonly(&self) -> bool {
        self.info.readonly || self.state.write_protected()
    }

    /// Changes the capacity (the backing file grew) and posts a unit attention CAPACITY DATA
    /// HAS CHANGED, on which Linux's storvsc rescans the device.
    pub fn set_capacity(&mut self, blocks: u64) {
        self.info.blocks = blocks;
        self.unit_attention = Some(asc::CAPACITY_DATA_CHANGED);
    }

    /// How many bytes of the data-out buffer [`ScsiDisk::execute`] wants to see for `cdb`: the
    /// parameter list of UNMAP (at most [`MAX_UNMAP_PARAMETER_LEN`]) and MODE SELECT (at most
    /// [`MAX_MODE_SELECT_LEN`]), the block of WRITE SAME; 0 for every other command (WRITE's
    /// data stays in guest memory). The caller copies `min(this, data_len)` bytes.
    pub fn data_out_len(&self, cdb: &[u8]) -> usize {
        let Some(&op) = cdb.first() else { return 0 };
        match Opcode(op) {
            Opcode::UNMAP if cdb.len() >= 10 && self.info.discard => {
                be16(&cdb[7..]).min(MAX_UNMAP_PARAMETER_LEN)
            }
            Opcode::MODE_SELECT_6 if cdb.len() >= 6 => usize::from(cdb[4]),
            Opcode::MODE_SELECT_10 if cdb.len() >= 10 => be16(&cdb[7..]).min(MAX_MODE_SELECT_LEN),
            Opcode::WRITE_SAME_10 => self.info.block_size as usize,
            Opcode::WRITE_SAME_16 if cdb.get(1).is_some_and(|f| f & CDB_NDOB != 0) => 0,
            Opcode::WRITE_SAME_16 => self.info.block_size as usize,
            _ => 0,
        }
    }

    /// Parses, checks and runs `cdb` (untrusted: any length and content) for LUN `lun`.
    ///
    /// `data_len` is the length of the initiator's buffer (the SRB's data transfer length);
    /// `data_out` holds the first bytes of the data-out buffer as asked for by
    /// [`ScsiDisk::data_out_len`] (shorter is answered as a parameter list length error). `lun`
    /// only names the unit in REPORT LUNS, which the caller should rather answer with
    /// [`report_luns`] listing every LUN of the target.
    pub fn execute(&mut self, lun: u8, cdb: &[u8], data_len: u32, data_out: &[u8]) -> Action {
        let action = match self.dispatch(lun, cdb, data_len, data_out) {
            Ok(Action::Done(mut r)) => {
                r.data = truncated(r.data, usize::MAX, data_len);
                Action::Done(r)
            }
            Ok(action) => action,
            Err(check) => Action::Done(check.response()),
        };
        self.last_sense = match &action {
            Action::Done(r) => r.sense,
            _ => None,
        };
        action
    }

    /// The response to a finished block I/O of `kind`: GOOD, or CHECK CONDITION for an errno.
    ///
    /// ENOSPC and EDQUOT give DATA PROTECT / SPACE ALLOCATION FAILED WRITE PROTECT (Linux fails
    /// such writes with -ENOSPC), EROFS DATA PROTECT / WRITE PROTECTED, EOPNOTSUPP of an UNMAP
    /// GOOD (unmapping is advisory); any other error is MEDIUM ERROR, UNRECOVERED READ ERROR for
    /// reads and WRITE ERROR otherwise. A short transfer should be passed as `Err(EIO)`.
    pub fn io_done(kind: IoKind, result: Result<(), i32>) -> Response {
        use rustix::io::Errno;
        let Err(errno) = result else {
            return Response::good();
        };
        let errno = Errno::from_raw_os_error(errno);
        if errno == Errno::NOSPC || errno == Errno::DQUOT {
            return Response::check_condition(SenseKey::DATA_PROTECT, asc::SPACE_ALLOCATION_FAILED);
        }
        if errno == Errno::ROFS {
            return Response::check_condition(SenseKey::DATA_PROTECT, asc::WRITE_PROTECTED);
        }
        match kind {
            IoKind::Unmap if errno == Errno::OPNOTSUPP => Response::good(),
            IoKind::Read => {
                Response::check_condition(SenseKey::MEDIUM_ERROR, asc::UNRECOVERED_READ_ERROR)
            }
            _ => Response::check_condition(SenseKey::MEDIUM_ERROR, asc::WRITE_ERROR),
        }
    }

    fn dispatch(
        &mut self,
        lun: u8,
        cdb: &[u8],
        data_len: u32,
        data_out: &[u8],
    ) -> Result<Action, Check> {
        let Some(&op) = cdb.first() else {
            return Err(INVALID_OPCODE);
        };
        let op = Opcode(op);
        if !matches!(
            op,
            Opcode::INQUIRY | Opcode::REPORT_LUNS | Opcode::REQUEST_SENSE
        ) {
            if let Some(ua) = self.unit_attention.take() {
                return Err(Check {
                    key: SenseKey::UNIT_ATTENTION,
                    asc: ua,
                });
            }
        }
        let done = |r: Response| Ok(Action::Done(r));
        match op {
            Opcode::TEST_UNIT_READY => {
                parse::<[u8; 6]>(cdb)?;
                done(Response::good())
            }
            Opcode::START_STOP_UNIT => {
                parse::<[u8; 6]>(cdb)?;
                done(Response::good())
            }
            Opcode::PREVENT_ALLOW_MEDIUM_REMOVAL => {
                parse::<[u8; 6]>(cdb)?;
                done(Response::good())
            }
            Opcode::REQUEST_SENSE => done(self.request_sense(cdb)?),
            Opcode::INQUIRY => done(self.inquiry(cdb)?),
            Opcode::REPORT_LUNS => done(report_luns(cdb, data_len, &[lun])),
            Opcode::READ_CAPACITY_10 => done(self.read_capacity_10(cdb)?),
            Opcode::SERVICE_ACTION_IN_16 => done(self.read_capacity_16(cdb)?),
            Opcode::MODE_SENSE_6 | Opcode::MODE_SENSE_10 => done(self.mode_sense(cdb)?),
            Opcode::MODE_SELECT_6 | Opcode::MODE_SELECT_10 => {
                done(self.mode_select(cdb, data_len, data_out)?)
            }
            Opcode::READ_6 | Opcode::WRITE_6 => {
                let c = parse::<Cdb6>(cdb)?;
                let write = op == Opcode::WRITE_6;
                self.block_io(write, c.lba().into(), c.transfer_blocks(), 0, data_len)
            }
            Opcode::READ_10 | Opcode::WRITE_10 | Opcode::WRITE_VERIFY_10 => {
                let c = parse::<Cdb10>(cdb)?;
                let flags = verify_fua(op, c.flags);
                let (lba, blocks) = (c.lba.get().into(), c.transfer_length.get().into());
                self.block_io(op != Opcode::READ_10, lba, blocks, flags, data_len)
            }
            Opcode::READ_12 | Opcode::WRITE_12 | Opcode::WRITE_VERIFY_12 => {
                let c = parse::<Cdb12>(cdb)?;
                let flags = verify_fua(op, c.flags);
                let (lba, blocks) = (c.lba.get().into(), c.transfer_length.get());
                self.block_io(op != Opcode::READ_12, lba, blocks, flags, data_len)
            }
            Opcode::READ_16 | Opcode::WRITE_16 | Opcode::WRITE_VERIFY_16 => {
                let c = parse::<Cdb16>(cdb)?;
                let flags = verify_fua(op, c.flags);
                let (lba, blocks) = (c.lba.get(), c.transfer_length.get());
                self.block_io(op != Opcode::READ_16, lba, blocks, flags, data_len)
            }
            Opcode::VERIFY_10 => {
                let c = parse::<Cdb10>(cdb)?;
                self.verify(c.flags, c.lba.get().into(), c.transfer_length.get().into())
            }
            Opcode::VERIFY_12 => {
                let c = parse::<Cdb12>(cdb)?;
                self.verify(c.flags, c.lba.get().into(), c.transfer_length.get())
            }
            Opcode::VERIFY_16 => {
                let c = parse::<Cdb16>(cdb)?;
                self.verify(c.flags, c.lba.get(), c.transfer_length.get())
            }
            Opcode::SYNCHRONIZE_CACHE_10 => {
                let c = parse::<Cdb10>(cdb)?;
                self.synchronize_cache(c.lba.get().into(), c.transfer_length.get().into())
            }
            Opcode::SYNCHRONIZE_CACHE_16 => {
                let c = parse::<Cdb16>(cdb)?;
                self.synchronize_cache(c.lba.get(), c.transfer_length.get())
            }
            Opcode::WRITE_SAME_10 => {
                let c = parse::<Cdb10>(cdb)?;
                let flags = c.flags & !CDB_NDOB; // bit 0 is reserved in the 10-byte form
                let (lba, blocks) = (c.lba.get().into(), c.transfer_length.get().into());
                self.write_same(flags, lba, blocks, data_len, data_out)
            }
            Opcode::WRITE_SAME_16 => {
                let c = parse::<Cdb16>(cdb)?;
                let (lba, blocks) = (c.lba.get(), c.transfer_length.get());
                self.write_same(c.flags, lba, blocks, data_len, data_out)
            }
            Opcode::UNMAP => self.unmap(cdb, data_len, data_out),
            _ => Err(INVALID_OPCODE),
        }
    }

    /// Checks that `blocks` blocks at `lba` lie within the capacity; with 0 blocks, that `lba`
    /// names a block.
    fn check_range(&self, lba: u64, blocks: u32) -> Result<(), Check> {
        let capacity = self.info.blocks;
        match lba.checked_add(blocks.into()) {
            Some(end) if end <= capacity && lba < capacity => Ok(()),
            _ => Err(LBA_OUT_OF_RANGE),
        }
    }

    fn block_io(
        &self,
        write: bool,
        lba: u64,
        blocks: u32,
        flags: u8,
        data_len: u32,
    ) -> Result<Action, Check> {
        if flags & CDB_PROTECT != 0 {
            return Err(INVALID_FIELD);
        }
        let max = self.info.max_transfer_blocks;
        if max != 0 && blocks > max {
            return Err(INVALID_FIELD);
        }
        self.check_range(lba, blocks)?;
        if write && self.readonly() {
            return Err(WRITE_PROTECTED);
        }
        if blocks == 0 {
            return Ok(Action::Done(Response::good()));
        }
        // A transfer longer than the initiator's buffer fails this command alone.
        if u64::from(blocks) * u64::from(self.info.block_size) > u64::from(data_len) {
            return Err(INVALID_FIELD);
        }
        let fua = flags & CDB_FUA != 0;
        Ok(if write {
            Action::Write {
                lba,
                blocks,
                fua: fua || !self.state.write_cache(),
            }
        } else {
            Action::Read { lba, blocks, fua }
        })
    }

    /// VERIFY with BYTCHK=0 checks the range only (the medium is always readable); BYTCHK≠0
    /// (compare with data-out) is not supported: INVALID FIELD IN CDB.
    fn verify(&self, flags: u8, lba: u64, blocks: u32) -> Result<Action, Check> {
        if flags & (CDB_PROTECT | CDB_BYTCHK) != 0 {
            return Err(INVALID_FIELD);
        }
        self.check_range(lba, blocks)?;
        Ok(Action::Done(Response::good()))
    }

    /// SYNCHRONIZE CACHE flushes everything; the range (0 blocks: to the end) is only checked.
    fn synchronize_cache(&self, lba: u64, blocks: u32) -> Result<Action, Check> {
        if blocks == 0 {
            if lba >= self.info.blocks {
                return Err(LBA_OUT_OF_RANGE);
            }
        } else {
            self.check_range(lba, blocks)?;
        }
        Ok(Action::Flush)
    }

    fn write_same(
        &self,
        flags: u8,
        lba: u64,
        blocks: u32,
        data_len: u32,
        data_out: &[u8],
    ) -> Result<Action, Check> {
        if flags & (CDB_PROTECT | CDB_ANCHOR_WS | CDB_PBDATA_LBDATA) != 0 {
            return Err(INVALID_FIELD);
        }
        // WSNZ is set in VPD page 0xB0: 0 blocks ("to the end of the medium") is refused.
        if blocks == 0 || blocks > MAX_WRITE_SAME_BLOCKS {
            return Err(INVALID_FIELD);
        }
        self.check_range(lba, blocks)?;
        if self.readonly() {
            return Err(WRITE_PROTECTED);
        }
        let fua = !self.state.write_cache();
        let may_unmap = flags & CDB_UNMAP != 0 && self.info.discard;
        if flags & CDB_NDOB != 0 {
            let fill = Fill::Zeros { may_unmap };
            return Ok(Action::WriteSame {
                lba,
                blocks,
                fill,
                fua,
            });
        }
        let block_size = self.info.block_size as usize;
        if (data_len as usize) < block_size {
            return Err(INVALID_FIELD);
        }
        let block = data_out.get(..block_size).ok_or(PARAMETER_LENGTH)?;
        let fill = if block.iter().all(|&b| b == 0) {
            Fill::Zeros { may_unmap }
        } else {
            Fill::Data
        };
        Ok(Action::WriteSame {
            lba,
            blocks,
            fill,
            fua,
        })
    }

    fn unmap(&self, cdb: &[u8], data_len: u32, data_out: &[u8]) -> Result<Action, Check> {
        if !self.info.discard {
            return Err(INVALID_OPCODE);
        }
        let c = parse::<[u8; 10]>(cdb)?;
        if c[1] & CDB_ANCHOR_UNMAP != 0 {
            return Err(INVALID_FIELD);
        }
        if self.readonly() {
            return Err(WRITE_PROTECTED);
        }
        let len = be16(&c[7..]);
        if len == 0 {
            return Ok(Action::Done(Response::good()));
        }
        let header_len = size_of::<UnmapListHeader>();
        if len < header_len || len > data_len as usize {
            return Err(PARAMETER_LENGTH);
        }
        let list = data_out
            .get(..len.min(MAX_UNMAP_PARAMETER_LEN))
            .ok_or(PARAMETER_LENGTH)?;
        let (header, rest) =
            UnmapListHeader::read_from_prefix(list).map_err(|_| PARAMETER_LENGTH)?;
        let descriptors_len = usize::from(header.block_descriptor_data_length.get());
        if header_len + descriptors_len > len {
            return Err(PARAMETER_LENGTH);
        }
        // An incomplete last descriptor is ignored (SBC-3 5.28.2).
        let count = descriptors_len / size_of::<UnmapBlockDescriptor>();
        if count > MAX_UNMAP_DESCRIPTORS as usize {
            return Err(INVALID_PARAMETER);
        }
        let (descriptors, _) = <[UnmapBlockDescriptor]>::ref_from_prefix_with_elems(rest, count)
            .map_err(|_| PARAMETER_LENGTH)?;
        let mut ranges = Vec::with_capacity(count);
        for d in descriptors {
            let (lba, blocks) = (d.lba.get(), d.block_count.get());
            if blocks == 0 {
                continue;
            }
            self.check_range(lba, blocks)?;
            ranges.push(UnmapRange { lba, blocks });
        }
        Ok(if ranges.is_empty() {
            Action::Done(Response::good())
        } else {
            Action::Unmap(ranges)
        })
    }

    /// REQUEST SENSE: the pending unit attention, else the sense of the previous command if it
    /// failed, else NO SENSE; fixed format only (DESC=1 is INVALID FIELD IN CDB).
    fn request_sense(&mut self, cdb: &[u8]) -> Result<Response, Check> {
        let c = parse::<[u8; 6]>(cdb)?;
        if c[1] & CDB_DESC != 0 {
            return Err(INVALID_FIELD);
        }
        let sense = match self.unit_attention.take() {
            Some(ua) => SenseData::new(SenseKey::UNIT_ATTENTION, ua),
            None => self
                .last_sense
                .take()
                .unwrap_or_else(|| SenseData::new(SenseKey::NO_SENSE, asc::NO_ADDITIONAL_SENSE)),
        };
        let data = sense.as_bytes().to_vec();
        Ok(Response::with_data(truncated(data, c[4].into(), u32::MAX)))
    }

    fn last_lba(&self) -> u64 {
        self.info.blocks.saturating_sub(1)
    }

    /// READ CAPACITY (10): the last LBA, or 0xFFFFFFFF when it does not fit (use the 16-byte
    /// form). The obsolete LBA and PMI fields are ignored.
    fn read_capacity_10(&self, cdb: &[u8]) -> Result<Response, Check> {
        parse::<[u8; 10]>(cdb)?;
        let data = ReadCapacity10Data {
            last_lba: U32::new(u32::try_from(self.last_lba()).unwrap_or(u32::MAX)),
            block_length: U32::new(self.info.block_size),
        };
        Ok(Response::with_data(data.as_bytes().to_vec()))
    }

    /// SERVICE ACTION IN (16): READ CAPACITY (16) only.
    fn read_capacity_16(&self, cdb: &[u8]) -> Result<Response, Check> {
        let c = parse::<Cdb16>(cdb)?;
        if c.flags & 0x1f != service_action::READ_CAPACITY_16 {
            return Err(INVALID_FIELD);
        }
        let lbp = if self.info.discard {
            READ_CAPACITY_LBPME
        } else {
            0
        };
        let data = ReadCapacity16Data {
            last_lba: U64::new(self.last_lba()),
            block_length: U32::new(self.info.block_size),
            lbp_lowest_aligned: lbp.into(),
            ..Default::default()
        };
        let alloc = c.transfer_length.get() as usize;
        Ok(Response::with_data(truncated(
            data.as_bytes().to_vec(),
            alloc,
            u32::MAX,
        )))
    }
}

/// WRITE AND VERIFY is a write that must be durable (the verify cannot fail); its BYTCHK bit
/// (bit 1) is ignored, since comparing with what was just written cannot miscompare.
fn verify_fua(op: Opcode, flags: u8) -> u8 {
    match op {
        Opcode::WRITE_VERIFY_10 | Opcode::WRITE_VERIFY_12 | Opcode::WRITE_VERIFY_16 => {
            (flags & !0x02) | CDB_FUA
        }
        _ => flags,
    }
}

/// The answer to REPORT LUNS `cdb` (untrusted) for a target whose LUNs are `luns`, cut to the
/// allocation length and to `data_len`. SELECT REPORT 0 and 2 list `luns` (single-level
/// peripheral addressing), 1 (well-known LUs) lists none; an allocation length below 16 or
/// another SELECT REPORT is INVALID FIELD IN CDB.
pub fn report_luns(cdb: &[u8], data_len: u32, luns: &[u8]) -> Response {
    let c = match parse::<[u8; 12]>(cdb) {
        Ok(c) => c,
        Err(check) => return check.response(),
    };
    let alloc = u32::from_be_bytes([c[6], c[7], c[8], c[9]]) as usize;
    let luns = match c[2] {
        0 | 2 => luns,
        1 => &[],
        _ => return INVALID_FIELD.response(),
    };
    if alloc < 16 {
        return INVALID_FIELD.response();
    }
    let header = ReportLunsHeader {
        lun_list_length: U32::new(luns.len() as u32 * 8),
        ..Default::default()
    };
    let mut data = header.as_bytes().to_vec();
    for &lun in luns {
        data.extend_from_slice(&[0, lun, 0, 0, 0, 0, 0, 0]);
    }
    Response::with_data(truncated(data, alloc, data_len))
}

/// The answer to `cdb` (untrusted) sent to a LUN without a disk: INQUIRY returns standard data
/// with peripheral qualifier 3 / type 0x1F (so Linux skips the LUN), REQUEST SENSE returns
/// ILLEGAL REQUEST / LOGICAL UNIT NOT SUPPORTED as its data, REPORT LUNS an empty list (the
/// caller should rather answer it with [`report_luns`]), every other command CHECK CONDITION
/// ILLEGAL REQUEST / LOGICAL UNIT NOT SUPPORTED.
pub fn no_lun_response(cdb: &[u8], data_len: u32) -> Response {
    let not_supported = Check::illegal(asc::LUN_NOT_SUPPORTED);
    match cdb.first().map(|&op| Opcode(op)) {
        Some(Opcode::INQUIRY) => match parse::<InquiryCdb>(cdb) {
            Ok(c) if c.flags & 0x03 == 0 && c.page_code == 0 => {
                let data = inquiry::standard(PERIPHERAL_NOT_CONNECTED);
                let alloc = c.allocation_length.get().into();
                Response::with_data(truncated(data, alloc, data_len))
            }
            Ok(c) if c.flags & 0x03 == 0 => INVALID_FIELD.response(),
            Ok(_) => not_supported.response(),
            Err(check) => check.response(),
        },
        Some(Opcode::REQUEST_SENSE) => match parse::<[u8; 6]>(cdb) {
            Ok(c) if c[1] & CDB_DESC == 0 => {
                let sense = SenseData::new(SenseKey::ILLEGAL_REQUEST, asc::LUN_NOT_SUPPORTED);
                Response::with_data(truncated(sense.as_bytes().to_vec(), c[4].into(), data_len))
            }
            Ok(_) => INVALID_FIELD.response(),
            Err(check) => check.response(),
        },
        Some(Opcode::REPORT_LUNS) => report_luns(cdb, data_len, &[]),
        _ => not_supported.response(),
    }
}
