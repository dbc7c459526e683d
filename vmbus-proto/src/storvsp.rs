//! The synthetic storage protocol (storvsc/storvsp): the 64-byte [`VstorPacket`] and its bodies.
//!
//! Source: Linux `drivers/scsi/storvsc_drv.c`. Every packet is `operation, flags, status` and a
//! 52-byte body; the guest's SCSI requests travel as [`ScsiRequest`] (an SRB) in the body of an
//! [`VstorOperation::EXECUTE_SRB`] packet, with data buffers as GPA-direct ranges, and come back
//! in a completion with the SRB updated.

pub mod scsi;

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

open_enum! {
    /// `enum vstor_packet_operation`.
    pub enum VstorOperation: u32 {
        /// Completion of an I/O (host to guest).
        COMPLETE_IO = 1,
        /// The host removes the device.
        REMOVE_DEVICE = 2,
        /// Execute an SRB ([`ScsiRequest`]).
        EXECUTE_SRB = 3,
        /// Reset a LUN.
        RESET_LUN = 4,
        /// Reset the adapter.
        RESET_ADAPTER = 5,
        /// Reset the bus.
        RESET_BUS = 6,
        /// Start of initialisation.
        BEGIN_INITIALIZATION = 7,
        /// End of initialisation.
        END_INITIALIZATION = 8,
        /// Version negotiation ([`ProtocolVersion`]).
        QUERY_PROTOCOL_VERSION = 9,
        /// Channel properties ([`ChannelProperties`]).
        QUERY_PROPERTIES = 10,
        /// The host asks the guest to rescan the bus.
        ENUMERATE_BUS = 11,
        /// Fibre channel WWNs ([`FcWwnPacket`]).
        FCHBA_DATA = 12,
        /// Create subchannels (body: u16 count).
        CREATE_SUB_CHANNELS = 13,
    }
}

open_enum! {
    /// Storage protocol versions, `major << 8 | minor` (`VMSTOR_PROTO_VERSION_*`).
    pub enum StorageVersion: u16 {
        /// Windows Server 2008, 2.0.
        WIN6 = 0x0200,
        /// Windows 7, 4.2.
        WIN7 = 0x0402,
        /// Windows 8, 5.1: the SRB grows to 52 bytes.
        WIN8 = 0x0501,
        /// Windows 8.1, 6.0.
        WIN8_1 = 0x0600,
        /// Windows 10, 6.2.
        WIN10 = 0x0602,
    }
}

impl StorageVersion {
    /// The major number.
    pub const fn major(self) -> u8 {
        (self.0 >> 8) as u8
    }

    /// The minor number.
    pub const fn minor(self) -> u8 {
        self.0 as u8
    }

    /// The SRB size a guest speaking this version sends.
    pub const fn scsi_request_size(self) -> usize {
        if self.0 >= Self::WIN8.0 {
            SCSI_REQUEST_SIZE
        } else {
            SCSI_REQUEST_SIZE_PRE_WIN8
        }
    }
}

/// The versions Linux 6.1 offers, in order.
pub const LINUX_6_1_VERSIONS: [StorageVersion; 3] = [
    StorageVersion::WIN10,
    StorageVersion::WIN8_1,
    StorageVersion::WIN8,
];

/// Packet flag: the sender wants a completion (`REQUEST_COMPLETION_FLAG`).
pub const REQUEST_COMPLETION_FLAG: u32 = 1;

/// Longest CDB an SRB carries (`STORVSC_MAX_CMD_LEN`).
pub const MAX_CDB_LEN: usize = 16;
/// Sense bytes an SRB carries from Windows 8 on (`STORVSC_SENSE_BUFFER_SIZE`).
pub const SENSE_BUFFER_SIZE: usize = 20;
/// Sense bytes before Windows 8 (`PRE_WIN8_STORVSC_SENSE_BUFFER_SIZE` in kernels before 5.16).
pub const SENSE_BUFFER_SIZE_PRE_WIN8: usize = 18;
/// Size of the CDB/sense union in the SRB (`STORVSC_MAX_BUF_LEN_WITH_PADDING`).
pub const CDB_SENSE_AREA_SIZE: usize = 20;
/// SRB size from Windows 8 on.
pub const SCSI_REQUEST_SIZE: usize = 52;
/// SRB size before Windows 8: without the 16-byte Windows 8 extension (`vmscsi_size_delta`).
pub const SCSI_REQUEST_SIZE_PRE_WIN8: usize = 0x24;
/// Size of the body area of a [`VstorPacket`].
pub const PACKET_BODY_SIZE: usize = 52;

/// NT status values the host puts in [`VstorPacket::status`] (0 = success; Linux treats every
/// other value as failure).
pub mod status {
    /// STATUS_SUCCESS.
    pub const SUCCESS: u32 = 0;
    /// STATUS_DEVICE_BUSY.
    pub const DEVICE_BUSY: u32 = 0x8000_0011;
    /// STATUS_UNSUCCESSFUL.
    pub const UNSUCCESSFUL: u32 = 0xC000_0001;
    /// STATUS_INVALID_PARAMETER.
    pub const INVALID_PARAMETER: u32 = 0xC000_000D;
    /// STATUS_REVISION_MISMATCH: the proposed protocol version is refused.
    pub const REVISION_MISMATCH: u32 = 0xC000_0059;
    /// STATUS_INSUFFICIENT_RESOURCES.
    pub const INSUFFICIENT_RESOURCES: u32 = 0xC000_009A;
    /// STATUS_NOT_SUPPORTED.
    pub const NOT_SUPPORTED: u32 = 0xC000_00BB;
    /// STATUS_INVALID_DEVICE_STATE.
    pub const INVALID_DEVICE_STATE: u32 = 0xC000_0184;
}

/// SRB status (`srb_status`): a 6-bit code plus two flag bits.
pub mod srb_status {
    /// Pending.
    pub const PENDING: u8 = 0x00;
    /// Success.
    pub const SUCCESS: u8 = 0x01;
    /// Aborted.
    pub const ABORTED: u8 = 0x02;
    /// Error (see scsi_status and sense).
    pub const ERROR: u8 = 0x04;
    /// Busy.
    pub const BUSY: u8 = 0x05;
    /// Invalid request.
    pub const INVALID_REQUEST: u8 = 0x06;
    /// No device.
    pub const NO_DEVICE: u8 = 0x08;
    /// Timeout.
    pub const TIMEOUT: u8 = 0x09;
    /// Selection timeout.
    pub const SELECTION_TIMEOUT: u8 = 0x0A;
    /// Bus reset.
    pub const BUS_RESET: u8 = 0x0E;
    /// Data overrun/underrun.
    pub const DATA_OVERRUN: u8 = 0x12;
    /// Invalid LUN: Linux removes the device.
    pub const INVALID_LUN: u8 = 0x20;
    /// Internal error.
    pub const INTERNAL_ERROR: u8 = 0x30;
    /// Flag: the queue is frozen.
    pub const QUEUE_FROZEN: u8 = 0x40;
    /// Flag: the sense area holds valid sense data.
    pub const AUTOSENSE_VALID: u8 = 0x80;

    /// The code without the flag bits (`SRB_STATUS()`).
    pub const fn code(status: u8) -> u8 {
        status & !(QUEUE_FROZEN | AUTOSENSE_VALID)
    }
}

/// SRB flags (`srb_flags`, Windows 8 and later).
pub mod srb_flags {
    /// Queue action enable.
    pub const QUEUE_ACTION_ENABLE: u32 = 0x0000_0002;
    /// Disable disconnect.
    pub const DISABLE_DISCONNECT: u32 = 0x0000_0004;
    /// Disable synchronous transfer.
    pub const DISABLE_SYNCH_TRANSFER: u32 = 0x0000_0008;
    /// Bypass frozen queue.
    pub const BYPASS_FROZEN_QUEUE: u32 = 0x0000_0010;
    /// Disable autosense.
    pub const DISABLE_AUTOSENSE: u32 = 0x0000_0020;
    /// Data moves from device to guest.
    pub const DATA_IN: u32 = 0x0000_0040;
    /// Data moves from guest to device.
    pub const DATA_OUT: u32 = 0x0000_0080;
    /// No data.
    pub const NO_DATA_TRANSFER: u32 = 0;
    /// Either direction.
    pub const UNSPECIFIED_DIRECTION: u32 = DATA_IN | DATA_OUT;
    /// No queue freeze.
    pub const NO_QUEUE_FREEZE: u32 = 0x0000_0100;
    /// Adapter cache enable.
    pub const ADAPTER_CACHE_ENABLE: u32 = 0x0000_0200;
    /// Free sense buffer.
    pub const FREE_SENSE_BUFFER: u32 = 0x0000_0400;
    /// Part of D3 processing.
    pub const D3_PROCESSING: u32 = 0x0000_0800;
    /// Is active.
    pub const IS_ACTIVE: u32 = 0x0001_0000;
    /// Allocated from zone.
    pub const ALLOCATED_FROM_ZONE: u32 = 0x0002_0000;
    /// SG list from pool.
    pub const SGLIST_FROM_POOL: u32 = 0x0004_0000;
    /// Bypass locked queue.
    pub const BYPASS_LOCKED_QUEUE: u32 = 0x0008_0000;
    /// No keep awake.
    pub const NO_KEEP_AWAKE: u32 = 0x0010_0000;
    /// Port driver allocated sense.
    pub const PORT_DRIVER_ALLOCSENSE: u32 = 0x0020_0000;
    /// Port driver sense has port.
    pub const PORT_DRIVER_SENSEHASPORT: u32 = 0x0040_0000;
    /// Don't start next packet.
    pub const DONT_START_NEXT_PACKET: u32 = 0x0080_0000;
    /// Port driver reserved bits.
    pub const PORT_DRIVER_RESERVED: u32 = 0x0F00_0000;
    /// Class driver reserved bits.
    pub const CLASS_DRIVER_RESERVED: u32 = 0xF000_0000;
}

/// Queue tag meaning "untagged" (`SP_UNTAGGED`).
pub const SP_UNTAGGED: u8 = 0xff;
/// Queue action of a simple tagged request (`SRB_SIMPLE_TAG_REQUEST`).
pub const SRB_SIMPLE_TAG_REQUEST: u8 = 0x20;

open_enum! {
    /// `enum storvsc_request_type`: the SRB's `data_in` field.
    pub enum DataDirection: u8 {
        /// Guest to device.
        WRITE = 0,
        /// Device to guest.
        READ = 1,
        /// No data / unknown.
        UNKNOWN = 2,
    }
}

/// Channel property flag: the host supports subchannels
/// (`STORAGE_CHANNEL_SUPPORTS_MULTI_CHANNEL`).
pub const CHANNEL_SUPPORTS_MULTI_CHANNEL: u32 = 1;
/// Channel property flag: removable (`STORAGE_CHANNEL_REMOVABLE_FLAG`).
pub const CHANNEL_REMOVABLE: u32 = 1;
/// Channel property flag: emulated IDE (`STORAGE_CHANNEL_EMULATED_IDE_FLAG`).
pub const CHANNEL_EMULATED_IDE: u32 = 2;

/// `struct vstor_packet`: every storvsc packet, 64 bytes.
#[repr(C, packed)]
#[derive(
    Copy, Clone, Debug, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned,
)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct VstorPacket {
    /// The operation.
    pub operation: VstorOperation,
    /// Flags, see [`REQUEST_COMPLETION_FLAG`].
    pub flags: u32,
    /// Status from the host, see [`status`].
    pub status: u32,
    /// The body; interpret it with [`VstorPacket::body`] by operation.
    pub body: [u8; PACKET_BODY_SIZE],
}
const _: () = assert!(size_of::<VstorPacket>() == 64);

impl VstorPacket {
    /// A packet with a zero body.
    pub const fn new(operation: VstorOperation, flags: u32, status: u32) -> Self {
        Self {
            operation,
            flags,
            status,
            body: [0; PACKET_BODY_SIZE],
        }
    }

    /// Reads a body struct from the start of the body area.
    pub fn body<T: FromBytes>(&self) -> T {
        const { assert!(size_of::<T>() <= PACKET_BODY_SIZE) };
        // The size was asserted above, so the prefix read cannot fail.
        match T::read_from_prefix(&self.body) {
            Ok((v, _)) => v,
            Err(_) => unreachable!(),
        }
    }

    /// Writes a body struct at the start of the body area, leaving the rest unchanged.
    pub fn set_body<T: IntoBytes + Immutable>(&mut self, value: &T) {
        const { assert!(size_of::<T>() <= PACKET_BODY_SIZE) };
        self.body[..size_of::<T>()].copy_from_slice(value.as_bytes());
    }
}

/// `struct vmscsi_request`: the SCSI request block, 52 bytes from Windows 8 on (the first
/// [`SCSI_REQUEST_SIZE_PRE_WIN8`] before).
#[repr(C)]
#[derive(
    Copy, Clone, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct ScsiRequest {
    /// Length of this structure as the guest filled it.
    pub length: u16,
    /// SRB status, see [`srb_status`].
    pub srb_status: u8,
    /// SCSI status, see [`scsi::status`].
    pub scsi_status: u8,
    /// Port (controller) number.
    pub port_number: u8,
    /// Path (bus) id.
    pub path_id: u8,
    /// Target id.
    pub target_id: u8,
    /// LUN.
    pub lun: u8,
    /// Length of the CDB.
    pub cdb_length: u8,
    /// Length of the sense buffer the guest offers.
    pub sense_info_length: u8,
    /// Direction ([`DataDirection`]).
    pub data_in: DataDirection,
    /// Reserved.
    pub reserved: u8,
    /// Bytes to transfer; the host writes back the bytes transferred.
    pub data_transfer_length: u32,
    /// The CDB on the way in, sense data on the way back.
    pub cdb_or_sense: [u8; CDB_SENSE_AREA_SIZE],
    /// Reserved (Windows 8 extension starts here).
    pub reserve: u16,
    /// Queue tag.
    pub queue_tag: u8,
    /// Queue action.
    pub queue_action: u8,
    /// SRB flags, see [`srb_flags`].
    pub srb_flags: u32,
    /// Timeout in seconds.
    pub time_out_value: u32,
    /// Queue sort key (`queue_sort_ey` in Linux).
    pub queue_sort_key: u32,
}
const _: () = assert!(size_of::<ScsiRequest>() == SCSI_REQUEST_SIZE);

impl ScsiRequest {
    /// The CDB (`cdb_length` clamped to 16).
    pub fn cdb(&self) -> &[u8] {
        &self.cdb_or_sense[..usize::from(self.cdb_length).min(MAX_CDB_LEN)]
    }
}

/// `struct vmstorage_channel_properties`: the answer to [`VstorOperation::QUERY_PROPERTIES`].
#[repr(C)]
#[derive(
    Copy, Clone, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct ChannelProperties {
    /// Reserved.
    pub reserved: u32,
    /// Subchannels the host can create.
    pub max_channel_count: u16,
    /// Reserved.
    pub reserved1: u16,
    /// Flags, see [`CHANNEL_SUPPORTS_MULTI_CHANNEL`].
    pub flags: u32,
    /// Largest transfer in bytes.
    pub max_transfer_bytes: u32,
    /// Reserved.
    pub reserved2: u64,
}
const _: () = assert!(size_of::<ChannelProperties>() == 24);

/// `struct vmstorage_protocol_version`: the body of [`VstorOperation::QUERY_PROTOCOL_VERSION`].
#[repr(C)]
#[derive(
    Copy, Clone, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct ProtocolVersion {
    /// The version.
    pub major_minor: StorageVersion,
    /// Revision; Linux sends 0.
    pub revision: u16,
}
const _: () = assert!(size_of::<ProtocolVersion>() == 4);

/// `struct hv_fc_wwn_packet`: Fibre Channel world-wide names.
#[repr(C)]
#[derive(
    Copy, Clone, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct FcWwnPacket {
    /// Whether the primary is active.
    pub primary_active: u8,
    /// Reserved.
    pub reserved1: [u8; 3],
    /// Primary port WWN.
    pub primary_port_wwn: [u8; 8],
    /// Primary node WWN.
    pub primary_node_wwn: [u8; 8],
    /// Secondary port WWN.
    pub secondary_port_wwn: [u8; 8],
    /// Secondary node WWN.
    pub secondary_node_wwn: [u8; 8],
}
const _: () = assert!(size_of::<FcWwnPacket>() == 36);

/// The body of [`VstorOperation::CREATE_SUB_CHANNELS`]: how many subchannels to create.
#[repr(C)]
#[derive(
    Copy, Clone, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct SubchannelCount {
    /// The count.
    pub count: u16,
}
const _: () = assert!(size_of::<SubchannelCount>() == 2);

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn execute_srb_layout() {
        let mut srb = ScsiRequest {
            length: SCSI_REQUEST_SIZE as u16,
            target_id: 1,
            lun: 2,
            cdb_length: 10,
            data_in: DataDirection::READ,
            data_transfer_length: 4096,
            srb_flags: srb_flags::DATA_IN,
            ..Default::default()
        };
        srb.cdb_or_sense[0] = scsi::Opcode::READ_10.0;
        let mut p = VstorPacket::new(VstorOperation::EXECUTE_SRB, REQUEST_COMPLETION_FLAG, 0);
        p.set_body(&srb);
        let b = p.as_bytes();
        assert_eq!(b[0..4], [3, 0, 0, 0]);
        assert_eq!(b[4..8], [1, 0, 0, 0]);
        assert_eq!(b[12..14], [52, 0]);
        assert_eq!(b[12 + 6], 1);
        assert_eq!(b[12 + 7], 2);
        assert_eq!(b[12 + 8], 10);
        assert_eq!(b[12 + 10], 1);
        assert_eq!(b[12 + 12..12 + 16], 4096u32.to_le_bytes());
        assert_eq!(b[12 + 16], 0x28);
        assert_eq!(b[12 + 40..12 + 44], [0x40, 0, 0, 0]);
        let back = VstorPacket::read_from_bytes(b).unwrap();
        assert_eq!(back, p);
        let srb2: ScsiRequest = back.body();
        assert_eq!(srb2, srb);
        assert_eq!(srb2.cdb()[0], 0x28);
        assert_eq!(srb2.cdb().len(), 10);
    }

    #[test]
    fn version_body() {
        let mut p = VstorPacket::new(VstorOperation::QUERY_PROTOCOL_VERSION, 1, 0);
        p.set_body(&ProtocolVersion {
            major_minor: StorageVersion::WIN10,
            revision: 0,
        });
        assert_eq!(p.as_bytes()[12..16], [0x02, 0x06, 0, 0]);
        assert_eq!(StorageVersion::WIN8_1.major(), 6);
        assert_eq!(StorageVersion::WIN7.scsi_request_size(), 0x24);
        assert_eq!(StorageVersion::WIN8.scsi_request_size(), 52);
        assert_eq!(srb_status::code(0xC4), srb_status::ERROR);
    }

    proptest! {
        #[test]
        fn packets_round_trip(p in any::<[u8; 64]>()) {
            let v = VstorPacket::read_from_bytes(&p).unwrap();
            prop_assert_eq!(v.as_bytes(), &p[..]);
            let s: ScsiRequest = v.body();
            prop_assert!(s.cdb().len() <= MAX_CDB_LEN);
        }
    }
}
