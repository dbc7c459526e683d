//! NBD wire constants (from the NBD protocol specification, `doc/proto.md` of the NBD project) and
//! the fixed-size messages. All integers on the wire are big-endian.

/// `"NBDMAGIC"`, the first thing the server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `"IHAVEOPT"`: newstyle negotiation, and the start of every option request.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// The magic of every option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// The magic of a transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// The magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

/// Handshake flag: the server speaks fixed newstyle.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag: the server can leave out the 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag: the client speaks fixed newstyle.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: leave out the 124 zero bytes.
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// Transmission flag: always set.
pub const FLAG_HAS_FLAGS: u16 = 1 << 0;
/// Transmission flag: the export is read-only.
pub const FLAG_READ_ONLY: u16 = 1 << 1;
/// Transmission flag: `NBD_CMD_FLUSH` is supported.
pub const FLAG_SEND_FLUSH: u16 = 1 << 2;
/// Transmission flag: `NBD_CMD_FLAG_FUA` is supported.
pub const FLAG_SEND_FUA: u16 = 1 << 3;
/// Transmission flag: the medium is rotational.
pub const FLAG_ROTATIONAL: u16 = 1 << 4;
/// Transmission flag: `NBD_CMD_TRIM` is supported.
pub const FLAG_SEND_TRIM: u16 = 1 << 5;
/// Transmission flag: `NBD_CMD_WRITE_ZEROES` is supported.
pub const FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// Transmission flag: `NBD_CMD_FLAG_DF` is supported (structured replies only).
pub const FLAG_SEND_DF: u16 = 1 << 7;
/// Transmission flag: flush and FUA are visible across all connections.
pub const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;

/// Option: choose an export and enter transmission (no error reply possible).
pub const OPT_EXPORT_NAME: u32 = 1;
/// Option: end the negotiation.
pub const OPT_ABORT: u32 = 2;
/// Option: list the exports.
pub const OPT_LIST: u32 = 3;
/// Option: upgrade to TLS (not supported).
pub const OPT_STARTTLS: u32 = 5;
/// Option: describe an export.
pub const OPT_INFO: u32 = 6;
/// Option: describe an export and enter transmission.
pub const OPT_GO: u32 = 7;
/// Option: use structured replies (not supported).
pub const OPT_STRUCTURED_REPLY: u32 = 8;
/// Option: list metadata contexts (not supported).
pub const OPT_LIST_META_CONTEXT: u32 = 9;
/// Option: select metadata contexts (not supported).
pub const OPT_SET_META_CONTEXT: u32 = 10;
/// Option: use extended headers (not supported).
pub const OPT_EXTENDED_HEADERS: u32 = 11;

/// Option reply: done.
pub const REP_ACK: u32 = 1;
/// Option reply: one export of `NBD_OPT_LIST`.
pub const REP_SERVER: u32 = 2;
/// Option reply: one piece of information of `NBD_OPT_INFO`/`NBD_OPT_GO`.
pub const REP_INFO: u32 = 3;
/// Option reply: the option is not supported.
pub const REP_ERR_UNSUP: u32 = (1 << 31) | 1;
/// Option reply: refused by policy.
pub const REP_ERR_POLICY: u32 = (1 << 31) | 2;
/// Option reply: syntactically invalid.
pub const REP_ERR_INVALID: u32 = (1 << 31) | 3;
/// Option reply: no such export.
pub const REP_ERR_UNKNOWN: u32 = (1 << 31) | 6;
/// Option reply: the server is shutting down.
pub const REP_ERR_SHUTDOWN: u32 = (1 << 31) | 7;
/// Option reply: the client must request block sizes.
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = (1 << 31) | 8;
/// Option reply: the request or its reply is too large.
pub const REP_ERR_TOO_BIG: u32 = (1 << 31) | 9;

/// Information type: size and transmission flags.
pub const INFO_EXPORT: u16 = 0;
/// Information type: the canonical name.
pub const INFO_NAME: u16 = 1;
/// Information type: the description.
pub const INFO_DESCRIPTION: u16 = 2;
/// Information type: minimum, preferred and maximum block sizes.
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Command flag: force unit access.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
/// Command flag: `NBD_CMD_WRITE_ZEROES` must not deallocate.
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
/// Command flag: don't fragment (structured replies only).
pub const CMD_FLAG_DF: u16 = 1 << 2;
/// Command flag: one extent only (block status only).
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
/// Command flag: fail `NBD_CMD_WRITE_ZEROES` unless fast.
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

/// Command: read.
pub const CMD_READ: u16 = 0;
/// Command: write (a payload follows the header).
pub const CMD_WRITE: u16 = 1;
/// Command: disconnect (no reply).
pub const CMD_DISC: u16 = 2;
/// Command: flush.
pub const CMD_FLUSH: u16 = 3;
/// Command: trim.
pub const CMD_TRIM: u16 = 4;
/// Command: cache (not supported).
pub const CMD_CACHE: u16 = 5;
/// Command: write zeroes.
pub const CMD_WRITE_ZEROES: u16 = 6;
/// Command: block status (not supported).
pub const CMD_BLOCK_STATUS: u16 = 7;

/// Error value: operation not permitted.
pub const EPERM: u32 = 1;
/// Error value: I/O error.
pub const EIO: u32 = 5;
/// Error value: out of memory.
pub const ENOMEM: u32 = 12;
/// Error value: invalid argument.
pub const EINVAL: u32 = 22;
/// Error value: no space left.
pub const ENOSPC: u32 = 28;
/// Error value: value too large.
pub const EOVERFLOW: u32 = 75;
/// Error value: not supported.
pub const ENOTSUP: u32 = 95;
/// Error value: the server is shutting down.
pub const ESHUTDOWN: u32 = 108;

/// The largest option data accepted; a client sending more is disconnected.
pub const MAX_OPTION_DATA: u32 = 64 * 1024;
/// The longest export name (or other string) accepted.
pub const MAX_STRING: usize = 4096;
/// The largest read or write payload (advertised as the maximum block size).
pub const MAX_REQUEST: u32 = 32 * 1024 * 1024;

/// Size of a transmission request header.
pub const REQUEST_LEN: usize = 28;
/// Size of a simple reply header.
pub const REPLY_LEN: usize = 16;

/// A decoded transmission request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// Command flags (`CMD_FLAG_*`).
    pub flags: u16,
    /// Command type (`CMD_*`).
    pub kind: u16,
    /// The client's handle, echoed in the reply.
    pub cookie: u64,
    /// Byte offset.
    pub offset: u64,
    /// Byte length.
    pub len: u32,
}

impl Request {
    /// Decodes a request header; `None` if the magic is wrong.
    pub fn decode(b: &[u8; REQUEST_LEN]) -> Option<Self> {
        let magic = u32::from_be_bytes(b[0..4].try_into().unwrap());
        if magic != REQUEST_MAGIC {
            return None;
        }
        Some(Self {
            flags: u16::from_be_bytes(b[4..6].try_into().unwrap()),
            kind: u16::from_be_bytes(b[6..8].try_into().unwrap()),
            cookie: u64::from_be_bytes(b[8..16].try_into().unwrap()),
            offset: u64::from_be_bytes(b[16..24].try_into().unwrap()),
            len: u32::from_be_bytes(b[24..28].try_into().unwrap()),
        })
    }

    /// Encodes the header (what a client sends).
    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut b = [0u8; REQUEST_LEN];
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.kind.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.len.to_be_bytes());
        b
    }
}

/// Writes a simple reply header into `b`.
pub fn encode_simple_reply(b: &mut [u8], error: u32, cookie: u64) {
    b[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
}
