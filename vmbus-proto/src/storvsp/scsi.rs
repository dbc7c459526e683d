//! The SCSI commands and data a synthetic disk answers: opcodes, status, sense data, CDBs and
//! the parameter data of INQUIRY, VPD pages, READ CAPACITY, MODE SENSE, UNMAP and REPORT LUNS.
//!
//! Values follow SPC-4 and SBC-3 as Linux's `include/scsi/scsi_proto.h` and `drivers/target`
//! use them. Multi-byte fields are big-endian, as SCSI defines them.

use zerocopy::byteorder::big_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

open_enum! {
    /// SCSI operation codes (the first CDB byte).
    pub enum Opcode: u8 {
        /// TEST UNIT READY.
        TEST_UNIT_READY = 0x00,
        /// REQUEST SENSE.
        REQUEST_SENSE = 0x03,
        /// FORMAT UNIT.
        FORMAT_UNIT = 0x04,
        /// READ (6).
        READ_6 = 0x08,
        /// WRITE (6).
        WRITE_6 = 0x0A,
        /// INQUIRY.
        INQUIRY = 0x12,
        /// MODE SELECT (6).
        MODE_SELECT_6 = 0x15,
        /// RESERVE (6).
        RESERVE_6 = 0x16,
        /// RELEASE (6).
        RELEASE_6 = 0x17,
        /// MODE SENSE (6).
        MODE_SENSE_6 = 0x1A,
        /// START STOP UNIT.
        START_STOP_UNIT = 0x1B,
        /// SEND DIAGNOSTIC.
        SEND_DIAGNOSTIC = 0x1D,
        /// PREVENT ALLOW MEDIUM REMOVAL.
        PREVENT_ALLOW_MEDIUM_REMOVAL = 0x1E,
        /// READ CAPACITY (10).
        READ_CAPACITY_10 = 0x25,
        /// READ (10).
        READ_10 = 0x28,
        /// WRITE (10).
        WRITE_10 = 0x2A,
        /// WRITE AND VERIFY (10).
        WRITE_VERIFY_10 = 0x2E,
        /// VERIFY (10).
        VERIFY_10 = 0x2F,
        /// SYNCHRONIZE CACHE (10).
        SYNCHRONIZE_CACHE_10 = 0x35,
        /// WRITE BUFFER.
        WRITE_BUFFER = 0x3B,
        /// READ BUFFER.
        READ_BUFFER = 0x3C,
        /// WRITE SAME (10).
        WRITE_SAME_10 = 0x41,
        /// UNMAP.
        UNMAP = 0x42,
        /// READ TOC/PMA/ATIP.
        READ_TOC = 0x43,
        /// GET CONFIGURATION.
        GET_CONFIGURATION = 0x46,
        /// GET EVENT STATUS NOTIFICATION.
        GET_EVENT_STATUS_NOTIFICATION = 0x4A,
        /// MODE SELECT (10).
        MODE_SELECT_10 = 0x55,
        /// RESERVE (10).
        RESERVE_10 = 0x56,
        /// RELEASE (10).
        RELEASE_10 = 0x57,
        /// MODE SENSE (10).
        MODE_SENSE_10 = 0x5A,
        /// PERSISTENT RESERVE IN.
        PERSISTENT_RESERVE_IN = 0x5E,
        /// PERSISTENT RESERVE OUT.
        PERSISTENT_RESERVE_OUT = 0x5F,
        /// Variable-length CDB.
        VARIABLE_LENGTH = 0x7F,
        /// EXTENDED COPY.
        EXTENDED_COPY = 0x83,
        /// RECEIVE COPY RESULTS.
        RECEIVE_COPY_RESULTS = 0x84,
        /// ATA PASS-THROUGH (16).
        ATA_16 = 0x85,
        /// READ (16).
        READ_16 = 0x88,
        /// COMPARE AND WRITE.
        COMPARE_AND_WRITE = 0x89,
        /// WRITE (16).
        WRITE_16 = 0x8A,
        /// WRITE AND VERIFY (16).
        WRITE_VERIFY_16 = 0x8E,
        /// VERIFY (16).
        VERIFY_16 = 0x8F,
        /// SYNCHRONIZE CACHE (16).
        SYNCHRONIZE_CACHE_16 = 0x91,
        /// WRITE SAME (16).
        WRITE_SAME_16 = 0x93,
        /// ZBC OUT.
        ZBC_OUT = 0x94,
        /// ZBC IN.
        ZBC_IN = 0x95,
        /// SERVICE ACTION IN (16): READ CAPACITY (16) and others by service action.
        SERVICE_ACTION_IN_16 = 0x9E,
        /// SERVICE ACTION OUT (16).
        SERVICE_ACTION_OUT_16 = 0x9F,
        /// REPORT LUNS.
        REPORT_LUNS = 0xA0,
        /// ATA PASS-THROUGH (12).
        ATA_12 = 0xA1,
        /// SECURITY PROTOCOL IN.
        SECURITY_PROTOCOL_IN = 0xA2,
        /// MAINTENANCE IN (REPORT SUPPORTED OPERATION CODES and others).
        MAINTENANCE_IN = 0xA3,
        /// MAINTENANCE OUT.
        MAINTENANCE_OUT = 0xA4,
        /// READ (12).
        READ_12 = 0xA8,
        /// WRITE (12).
        WRITE_12 = 0xAA,
        /// WRITE AND VERIFY (12).
        WRITE_VERIFY_12 = 0xAE,
        /// VERIFY (12).
        VERIFY_12 = 0xAF,
        /// SECURITY PROTOCOL OUT.
        SECURITY_PROTOCOL_OUT = 0xB5,
    }
}

/// Service actions (low 5 bits of CDB byte 1) of SERVICE ACTION IN (16) and MAINTENANCE IN.
pub mod service_action {
    /// SERVICE ACTION IN (16): READ CAPACITY (16).
    pub const READ_CAPACITY_16: u8 = 0x10;
    /// SERVICE ACTION IN (16): GET LBA STATUS.
    pub const GET_LBA_STATUS: u8 = 0x12;
    /// MAINTENANCE IN: REPORT SUPPORTED OPERATION CODES.
    pub const REPORT_SUPPORTED_OPERATION_CODES: u8 = 0x0C;
    /// PERSISTENT RESERVE IN: READ KEYS.
    pub const PR_IN_READ_KEYS: u8 = 0x00;
    /// PERSISTENT RESERVE IN: READ RESERVATION.
    pub const PR_IN_READ_RESERVATION: u8 = 0x01;
    /// PERSISTENT RESERVE IN: REPORT CAPABILITIES.
    pub const PR_IN_REPORT_CAPABILITIES: u8 = 0x02;
    /// PERSISTENT RESERVE IN: READ FULL STATUS.
    pub const PR_IN_READ_FULL_STATUS: u8 = 0x03;
    /// PERSISTENT RESERVE OUT: REGISTER.
    pub const PR_OUT_REGISTER: u8 = 0x00;
    /// PERSISTENT RESERVE OUT: RESERVE.
    pub const PR_OUT_RESERVE: u8 = 0x01;
    /// PERSISTENT RESERVE OUT: RELEASE.
    pub const PR_OUT_RELEASE: u8 = 0x02;
    /// PERSISTENT RESERVE OUT: CLEAR.
    pub const PR_OUT_CLEAR: u8 = 0x03;
    /// PERSISTENT RESERVE OUT: PREEMPT.
    pub const PR_OUT_PREEMPT: u8 = 0x04;
    /// PERSISTENT RESERVE OUT: PREEMPT AND ABORT.
    pub const PR_OUT_PREEMPT_AND_ABORT: u8 = 0x05;
    /// PERSISTENT RESERVE OUT: REGISTER AND IGNORE EXISTING KEY.
    pub const PR_OUT_REGISTER_AND_IGNORE_EXISTING_KEY: u8 = 0x06;
}

/// SCSI status bytes (SAM).
pub mod status {
    /// GOOD.
    pub const GOOD: u8 = 0x00;
    /// CHECK CONDITION: sense data describes the error.
    pub const CHECK_CONDITION: u8 = 0x02;
    /// CONDITION MET.
    pub const CONDITION_MET: u8 = 0x04;
    /// BUSY.
    pub const BUSY: u8 = 0x08;
    /// RESERVATION CONFLICT.
    pub const RESERVATION_CONFLICT: u8 = 0x18;
    /// TASK SET FULL.
    pub const TASK_SET_FULL: u8 = 0x28;
    /// ACA ACTIVE.
    pub const ACA_ACTIVE: u8 = 0x30;
    /// TASK ABORTED.
    pub const TASK_ABORTED: u8 = 0x40;
}

open_enum! {
    /// Sense keys (low 4 bits of byte 2 of fixed-format sense data).
    pub enum SenseKey: u8 {
        /// NO SENSE.
        NO_SENSE = 0x0,
        /// RECOVERED ERROR.
        RECOVERED_ERROR = 0x1,
        /// NOT READY.
        NOT_READY = 0x2,
        /// MEDIUM ERROR.
        MEDIUM_ERROR = 0x3,
        /// HARDWARE ERROR.
        HARDWARE_ERROR = 0x4,
        /// ILLEGAL REQUEST.
        ILLEGAL_REQUEST = 0x5,
        /// UNIT ATTENTION.
        UNIT_ATTENTION = 0x6,
        /// DATA PROTECT.
        DATA_PROTECT = 0x7,
        /// BLANK CHECK.
        BLANK_CHECK = 0x8,
        /// VENDOR SPECIFIC.
        VENDOR_SPECIFIC = 0x9,
        /// COPY ABORTED.
        COPY_ABORTED = 0xA,
        /// ABORTED COMMAND.
        ABORTED_COMMAND = 0xB,
        /// VOLUME OVERFLOW.
        VOLUME_OVERFLOW = 0xD,
        /// MISCOMPARE.
        MISCOMPARE = 0xE,
    }
}

/// An additional sense code and its qualifier.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct AdditionalSense {
    /// ASC.
    pub asc: u8,
    /// ASCQ.
    pub ascq: u8,
}

/// Additional sense codes a disk reports.
pub mod asc {
    use super::AdditionalSense;

    const fn a(asc: u8, ascq: u8) -> AdditionalSense {
        AdditionalSense { asc, ascq }
    }

    /// NO ADDITIONAL SENSE INFORMATION.
    pub const NO_ADDITIONAL_SENSE: AdditionalSense = a(0x00, 0x00);
    /// LOGICAL UNIT NOT READY, CAUSE NOT REPORTABLE.
    pub const LUN_NOT_READY: AdditionalSense = a(0x04, 0x00);
    /// WRITE ERROR.
    pub const WRITE_ERROR: AdditionalSense = a(0x0C, 0x00);
    /// UNRECOVERED READ ERROR.
    pub const UNRECOVERED_READ_ERROR: AdditionalSense = a(0x11, 0x00);
    /// PARAMETER LIST LENGTH ERROR.
    pub const PARAMETER_LIST_LENGTH_ERROR: AdditionalSense = a(0x1A, 0x00);
    /// MISCOMPARE DURING VERIFY OPERATION.
    pub const MISCOMPARE_DURING_VERIFY: AdditionalSense = a(0x1D, 0x00);
    /// INVALID COMMAND OPERATION CODE.
    pub const INVALID_COMMAND_OPCODE: AdditionalSense = a(0x20, 0x00);
    /// LOGICAL BLOCK ADDRESS OUT OF RANGE.
    pub const LBA_OUT_OF_RANGE: AdditionalSense = a(0x21, 0x00);
    /// INVALID FIELD IN CDB.
    pub const INVALID_FIELD_IN_CDB: AdditionalSense = a(0x24, 0x00);
    /// LOGICAL UNIT NOT SUPPORTED.
    pub const LUN_NOT_SUPPORTED: AdditionalSense = a(0x25, 0x00);
    /// INVALID FIELD IN PARAMETER LIST.
    pub const INVALID_FIELD_IN_PARAMETER_LIST: AdditionalSense = a(0x26, 0x00);
    /// WRITE PROTECTED.
    pub const WRITE_PROTECTED: AdditionalSense = a(0x27, 0x00);
    /// SPACE ALLOCATION FAILED WRITE PROTECT: a thin-provisioned write found no space.
    pub const SPACE_ALLOCATION_FAILED: AdditionalSense = a(0x27, 0x07);
    /// NOT READY TO READY CHANGE, MEDIUM MAY HAVE CHANGED.
    pub const NOT_READY_TO_READY_CHANGE: AdditionalSense = a(0x28, 0x00);
    /// POWER ON, RESET, OR BUS DEVICE RESET OCCURRED.
    pub const POWER_ON_RESET: AdditionalSense = a(0x29, 0x00);
    /// CAPACITY DATA HAS CHANGED.
    pub const CAPACITY_DATA_CHANGED: AdditionalSense = a(0x2A, 0x09);
    /// SAVING PARAMETERS NOT SUPPORTED.
    pub const SAVING_PARAMETERS_NOT_SUPPORTED: AdditionalSense = a(0x39, 0x00);
    /// MEDIUM NOT PRESENT.
    pub const MEDIUM_NOT_PRESENT: AdditionalSense = a(0x3A, 0x00);
    /// REPORTED LUNS DATA HAS CHANGED.
    pub const REPORTED_LUNS_DATA_CHANGED: AdditionalSense = a(0x3F, 0x0E);
    /// INTERNAL TARGET FAILURE.
    pub const INTERNAL_TARGET_FAILURE: AdditionalSense = a(0x44, 0x00);
}

/// Response code of current-error fixed-format sense data.
pub const SENSE_RESPONSE_CURRENT_FIXED: u8 = 0x70;
/// Response code of deferred-error fixed-format sense data.
pub const SENSE_RESPONSE_DEFERRED_FIXED: u8 = 0x71;
/// Bit 7 of the response code byte: the information field is valid.
pub const SENSE_VALID: u8 = 0x80;

/// Fixed-format sense data (SPC-4 4.5.3), 18 bytes.
#[repr(C)]
#[derive(
    Copy,
    Clone,
    Debug,
    Default,
    PartialEq,
    Eq,
    FromBytes,
    IntoBytes,
    Immutable,
    KnownLayout,
    Unaligned,
)]
pub struct SenseData {
    /// VALID (bit 7) and response code (0x70 current, 0x71 deferred).
    pub response_code: u8,
    /// Obsolete.
    pub obsolete: u8,
    /// FILEMARK (bit 7), EOM (bit 6), ILI (bit 5), sense key (bits 0-3).
    pub flags_sense_key: u8,
    /// Information.
    pub information: U32,
    /// Bytes that follow this field (10 for the 18-byte form).
    pub additional_sense_length: u8,
    /// Command-specific information.
    pub command_specific_information: U32,
    /// Additional sense code.
    pub asc: u8,
    /// Additional sense code qualifier.
    pub ascq: u8,
    /// Field replaceable unit code.
    pub field_replaceable_unit_code: u8,
    /// SKSV (bit 7 of byte 0) and sense-key specific information.
    pub sense_key_specific: [u8; 3],
}
const _: () = assert!(size_of::<SenseData>() == 18);

impl SenseData {
    /// Current-error sense data with the given key and additional sense.
    pub fn new(key: SenseKey, sense: AdditionalSense) -> Self {
        Self {
            response_code: SENSE_RESPONSE_CURRENT_FIXED,
            flags_sense_key: key.0 & 0xf,
            additional_sense_length: (size_of::<Self>() - 8) as u8,
            asc: sense.asc,
            ascq: sense.ascq,
            ..Default::default()
        }
    }

    /// The sense key.
    pub const fn sense_key(&self) -> SenseKey {
        SenseKey(self.flags_sense_key & 0xf)
    }
}

/// A 6-byte CDB of the READ (6)/WRITE (6) form: 21-bit LBA, 8-bit length (0 means 256).
#[repr(C)]
#[derive(
    Copy,
    Clone,
    Debug,
    Default,
    PartialEq,
    Eq,
    FromBytes,
    IntoBytes,
    Immutable,
    KnownLayout,
    Unaligned,
)]
pub struct Cdb6 {
    /// Operation code.
    pub opcode: Opcode,
    /// Bits 0-4: LBA bits 16-20.
    pub lba_high: u8,
    /// LBA bits 0-15.
    pub lba_low: U16,
    /// Transfer length in blocks (0 means 256 for READ/WRITE (6)) or allocation length.
    pub length: u8,
    /// Control.
    pub control: u8,
}
const _: () = assert!(size_of::<Cdb6>() == 6);

impl Cdb6 {
    /// The 21-bit LBA.
    pub fn lba(&self) -> u32 {
        u32::from(self.lba_high & 0x1f) << 16 | u32::from(self.lba_low.get())
    }

    /// The transfer length of READ (6)/WRITE (6), where 0 means 256 blocks.
    pub fn transfer_blocks(&self) -> u32 {
        if self.length == 0 {
            256
        } else {
            u32::from(self.length)
        }
    }
}

/// A 10-byte CDB of the READ (10)/WRITE (10) form.
#[repr(C)]
#[derive(
    Copy,
    Clone,
    Debug,
    Default,
    PartialEq,
    Eq,
    FromBytes,
    IntoBytes,
    Immutable,
    KnownLayout,
    Unaligned,
)]
pub struct Cdb10 {
    /// Operation code.
    pub opcode: Opcode,
    /// RDPROTECT/WRPROTECT, DPO (bit 4), FUA (bit 3) etc.
    pub flags: u8,
    /// Logical block address.
    pub lba: U32,
    /// Group number (bits 0-4).
    pub group: u8,
    /// Transfer length in blocks.
    pub transfer_length: U16,
    /// Control.
    pub control: u8,
}
const _: () = assert!(size_of::<Cdb10>() == 10);

/// A 12-byte CDB of the READ (12)/WRITE (12) form.
#[repr(C)]
#[derive(
    Copy,
    Clone,
    Debug,
    Default,
    PartialEq,
    Eq,
    FromBytes,
    IntoBytes,
    Immutable,
    KnownLayout,
    Unaligned,
)]
pub struct Cdb12 {
    /// Operation code.
    pub opcode: Opcode,
    /// Flags, as in [`Cdb10`].
    pub flags: u8,
    /// Logical block address.
    pub lba: U32,
    /// Transfer length in blocks.
    pub transfer_length: U32,
    /// Group number.
    pub group: u8,
    /// Control.
    pub control: u8,
}
const _: () = assert!(size_of::<Cdb12>() == 12);

/// A 16-byte CDB of the READ (16)/WRITE (16) form.
#[repr(C)]
#[derive(
    Copy,
    Clone,
    Debug,
    Default,
    PartialEq,
    Eq,
    FromBytes,
    IntoBytes,
    Immutable,
    KnownLayout,
    Unaligned,
)]
pub struct Cdb16 {
    /// Operation code.
    pub opcode: Opcode,
    /// Flags, as in [`Cdb10`] (service action for SERVICE ACTION IN).
    pub flags: u8,
    /// Logical block address.
    pub lba: U64,
    /// Transfer length in blocks (allocation length for SERVICE ACTION IN).
    pub transfer_length: U32,
    /// Group number.
    pub group: u8,
    /// Control.
    pub control: u8,
}
const _: () = assert!(size_of::<Cdb16>() == 16);

/// CDB flag bit: force unit access.
pub const CDB_FUA: u8 = 0x08;
/// CDB flag bit: disable page out.
pub const CDB_DPO: u8 = 0x10;

/// The INQUIRY CDB.
#[repr(C)]
#[derive(
    Copy,
    Clone,
    Debug,
    Default,
    PartialEq,
    Eq,
    FromBytes,
    IntoBytes,
    Immutable,
    KnownLayout,
    Unaligned,
)]
pub struct InquiryCdb {
    /// [`Opcode::INQUIRY`].
    pub opcode: Opcode,
    /// Bit 0: EVPD (return the VPD page `page_code`).
    pub flags: u8,
    /// VPD page code.
    pub page_code: u8,
    /// Allocation length.
    pub allocation_length: U16,
    /// Control.
    pub control: u8,
}
const _: () = assert!(size_of::<InquiryCdb>() == 6);

/// INQUIRY EVPD bit.
pub const INQUIRY_EVPD: u8 = 0x01;

/// Peripheral device type of a direct-access block device.
pub const DEVICE_TYPE_DISK: u8 = 0x00;
/// Peripheral device type of a CD/DVD device.
pub const DEVICE_TYPE_CDROM: u8 = 0x05;
/// Peripheral qualifier/type byte for "no device at this LUN" (qualifier 3, type 0x1F).
pub const PERIPHERAL_NOT_CONNECTED: u8 = 0x7F;
/// INQUIRY version byte for SPC-3.
pub const VERSION_SPC3: u8 = 0x05;
/// INQUIRY version byte for SPC-4.
pub const VERSION_SPC4: u8 = 0x06;
/// Response data format 2 (the only valid one); also set HISUP (0x10) as needed.
pub const RESPONSE_DATA_FORMAT_2: u8 = 0x02;
/// INQUIRY byte 7 CMDQUE bit: the device supports command queuing.
pub const INQUIRY_CMDQUE: u8 = 0x02;
/// INQUIRY byte 1 RMB bit: removable medium.
pub const INQUIRY_RMB: u8 = 0x80;

/// Standard INQUIRY data (SPC-4 6.6.2), the first 36 bytes.
#[repr(C)]
#[derive(
    Copy,
    Clone,
    Debug,
    Default,
    PartialEq,
    Eq,
    FromBytes,
    IntoBytes,
    Immutable,
    KnownLayout,
    Unaligned,
)]
pub struct InquiryData {
    /// Peripheral qualifier (bits 5-7) and device type (bits 0-4).
    pub peripheral: u8,
    /// RMB (bit 7).
    pub rmb: u8,
    /// Version, see [`VERSION_SPC4`].
    pub version: u8,
    /// NORMACA, HISUP (bit 4) and response data format (bits 0-3, = 2).
    pub response_data_format: u8,
    /// Bytes that follow this field (31 for 36-byte data).
    pub additional_length: u8,
    /// SCCS, ACC, TPGS, 3PC, PROTECT.
    pub flags5: u8,
    /// ENCSERV, MULTIP etc.
    pub flags6: u8,
    /// CMDQUE (bit 1) etc.
    pub flags7: u8,
    /// T10 vendor identification, ASCII, space padded.
    pub vendor_id: [u8; 8],
    /// Product identification, ASCII, space padded.
    pub product_id: [u8; 16],
    /// Product revision level, ASCII, space padded.
    pub product_revision: [u8; 4],
}
const _: () = assert!(size_of::<InquiryData>() == 36);

/// VPD page codes.
pub mod vpd {
    /// Supported VPD pages.
    pub const SUPPORTED_PAGES: u8 = 0x00;
    /// Unit serial number.
    pub const UNIT_SERIAL_NUMBER: u8 = 0x80;
    /// Device identification.
    pub const DEVICE_IDENTIFICATION: u8 = 0x83;
    /// Block limits.
    pub const BLOCK_LIMITS: u8 = 0xB0;
    /// Block device characteristics.
    pub const BLOCK_DEVICE_CHARACTERISTICS: u8 = 0xB1;
    /// Logical block provisioning.
    pub const LOGICAL_BLOCK_PROVISIONING: u8 = 0xB2;
}

/// The 4-byte header of every VPD page; page 0x00 follows it with one byte per supported page,
/// page 0x80 with the serial number, page 0x83 with designation descriptors.
#[repr(C)]
#[derive(
    Copy,
    Clone,
    Debug,
    Default,
    PartialEq,
    Eq,
    FromBytes,
    IntoBytes,
    Immutable,
    KnownLayout,
    Unaligned,
)]
pub struct VpdPageHeader {
    /// Peripheral qualifier and device type.
    pub peripheral: u8,
    /// Page code, see [`vpd`].
    pub page_code: u8,
    /// Bytes that follow this header.
    pub page_length: U16,
}
const _: () = assert!(size_of::<VpdPageHeader>() == 4);

/// Designation descriptor code sets.
pub mod code_set {
    /// Binary.
    pub const BINARY: u8 = 1;
    /// ASCII.
    pub const ASCII: u8 = 2;
    /// UTF-8.
    pub const UTF8: u8 = 3;
}

/// Designator types (bits 0-3 of byte 1 of a designation descriptor).
pub mod designator_type {
    /// Vendor specific.
    pub const VENDOR_SPECIFIC: u8 = 0;
    /// T10 vendor ID based.
    pub const T10_VENDOR_ID: u8 = 1;
    /// EUI-64 based.
    pub const EUI64: u8 = 2;
    /// NAA.
    pub const NAA: u8 = 3;
    /// Relative target port identifier.
    pub const RELATIVE_TARGET_PORT: u8 = 4;
    /// Target port group.
    pub const TARGET_PORT_GROUP: u8 = 5;
    /// Logical unit group.
    pub const LOGICAL_UNIT_GROUP: u8 = 6;
    /// MD5 logical unit identifier.
    pub const MD5_LOGICAL_UNIT: u8 = 7;
    /// SCSI name string.
    pub const SCSI_NAME_STRING: u8 = 8;
}

/// The header of one designation descriptor of VPD page 0x83; `designator_length` bytes follow.
#[repr(C)]
#[derive(
    Copy,
    Clone,
    Debug,
    Default,
    PartialEq,
    Eq,
    FromBytes,
    IntoBytes,
    Immutable,
    KnownLayout,
    Unaligned,
)]
pub struct DesignationDescriptorHeader {
    /// Protocol identifier (bits 4-7) and code set (bits 0-3).
    pub code_set: u8,
    /// PIV (bit 7), association (bits 4-5), designator type (bits 0-3).
    pub designator_type: u8,
    /// Reserved.
    pub reserved: u8,
    /// Length of the designator.
    pub designator_length: u8,
}
const _: () = assert!(size_of::<DesignationDescriptorHeader>() == 4);

/// VPD page 0xB0, block limits (SBC-3 6.5.3), 64 bytes.
#[repr(C)]
#[derive(
    Copy,
    Clone,
    Debug,
    Default,
    PartialEq,
    Eq,
    FromBytes,
    IntoBytes,
    Immutable,
    KnownLayout,
    Unaligned,
)]
pub struct VpdBlockLimits {
    /// Header, page length 0x3C.
    pub header: VpdPageHeader,
    /// WSNZ (bit 0): WRITE SAME with 0 blocks is refused.
    pub wsnz: u8,
    /// Maximum COMPARE AND WRITE length in blocks.
    pub max_compare_and_write_length: u8,
    /// Optimal transfer length granularity in blocks.
    pub optimal_transfer_length_granularity: U16,
    /// Maximum transfer length in blocks.
    pub max_transfer_length: U32,
    /// Optimal transfer length in blocks.
    pub optimal_transfer_length: U32,
    /// Maximum prefetch length.
    pub max_prefetch_length: U32,
    /// Maximum blocks one UNMAP may unmap.
    pub max_unmap_lba_count: U32,
    /// Maximum UNMAP block descriptors.
    pub max_unmap_block_descriptor_count: U32,
    /// Optimal unmap granularity in blocks.
    pub optimal_unmap_granularity: U32,
    /// UGAVALID (bit 31) and unmap granularity alignment.
    pub unmap_granularity_alignment: U32,
    /// Maximum WRITE SAME length in blocks.
    pub max_write_same_length: U64,
    /// Maximum atomic transfer length.
    pub max_atomic_transfer_length: U32,
    /// Atomic alignment.
    pub atomic_alignment: U32,
    /// Atomic transfer length granularity.
    pub atomic_transfer_length_granularity: U32,
    /// Maximum atomic transfer length with atomic boundary.
    pub max_atomic_transfer_length_with_boundary: U32,
    /// Maximum atomic boundary size.
    pub max_atomic_boundary_size: U32,
}
const _: () = assert!(size_of::<VpdBlockLimits>() == 64);

/// VPD page 0xB1, block device characteristics (SBC-3 6.5.2), 64 bytes.
#[repr(C)]
#[derive(
    Copy, Clone, Debug, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned,
)]
pub struct VpdBlockDeviceCharacteristics {
    /// Header, page length 0x3C.
    pub header: VpdPageHeader,
    /// Medium rotation rate: 1 = non-rotating (solid state).
    pub medium_rotation_rate: U16,
    /// Product type.
    pub product_type: u8,
    /// WABEREQ, WACEREQ, nominal form factor (bits 0-3).
    pub form_factor: u8,
    /// ZONED (bits 4-5), FUAB (bit 1), VBULS (bit 0).
    pub flags: u8,
    /// Reserved.
    pub reserved: [u8; 55],
}
const _: () = assert!(size_of::<VpdBlockDeviceCharacteristics>() == 64);

/// Medium rotation rate of a non-rotating medium.
pub const NON_ROTATING_MEDIUM: u16 = 1;

/// VPD page 0xB2, logical block provisioning (SBC-3 6.5.4), without provisioning group
/// descriptors.
#[repr(C)]
#[derive(
    Copy,
    Clone,
    Debug,
    Default,
    PartialEq,
    Eq,
    FromBytes,
    IntoBytes,
    Immutable,
    KnownLayout,
    Unaligned,
)]
pub struct VpdLogicalBlockProvisioning {
    /// Header, page length 4.
    pub header: VpdPageHeader,
    /// Threshold exponent.
    pub threshold_exponent: u8,
    /// LBPU (bit 7), LBPWS (bit 6), LBPWS10 (bit 5), LBPRZ (bits 2-4), ANC_SUP (bit 1), DP.
    pub flags: u8,
    /// Provisioning type (bits 0-2): 0 full, 1 resource, 2 thin.
    pub provisioning_type: u8,
    /// Reserved.
    pub reserved: u8,
}
const _: () = assert!(size_of::<VpdLogicalBlockProvisioning>() == 8);

/// Logical block provisioning flags.
pub mod lbp {
    /// LBPU: UNMAP is supported.
    pub const LBPU: u8 = 0x80;
    /// LBPWS: WRITE SAME (16) with UNMAP is supported.
    pub const LBPWS: u8 = 0x40;
    /// LBPWS10: WRITE SAME (10) with UNMAP is supported.
    pub const LBPWS10: u8 = 0x20;
    /// LBPRZ (lowest bit of the field): unmapped blocks read as zero.
    pub const LBPRZ: u8 = 0x04;
    /// Provisioning type thin.
    pub const TYPE_THIN: u8 = 2;
}

/// READ CAPACITY (10) parameter data.
#[repr(C)]
#[derive(
    Copy,
    Clone,
    Debug,
    Default,
    PartialEq,
    Eq,
    FromBytes,
    IntoBytes,
    Immutable,
    KnownLayout,
    Unaligned,
)]
pub struct ReadCapacity10Data {
    /// Last LBA, or 0xFFFFFFFF if it does not fit (use READ CAPACITY (16)).
    pub last_lba: U32,
    /// Block length in bytes.
    pub block_length: U32,
}
const _: () = assert!(size_of::<ReadCapacity10Data>() == 8);

/// READ CAPACITY (16) parameter data.
#[repr(C)]
#[derive(
    Copy,
    Clone,
    Debug,
    Default,
    PartialEq,
    Eq,
    FromBytes,
    IntoBytes,
    Immutable,
    KnownLayout,
    Unaligned,
)]
pub struct ReadCapacity16Data {
    /// Last LBA.
    pub last_lba: U64,
    /// Block length in bytes.
    pub block_length: U32,
    /// P_TYPE (bits 1-3) and PROT_EN (bit 0).
    pub protection: u8,
    /// P_I_EXPONENT (bits 4-7) and logical blocks per physical block exponent (bits 0-3).
    pub exponents: u8,
    /// LBPME (bit 15), LBPRZ (bit 14), lowest aligned LBA (bits 0-13).
    pub lbp_lowest_aligned: U16,
    /// Reserved.
    pub reserved: [u8; 16],
}
const _: () = assert!(size_of::<ReadCapacity16Data>() == 32);

/// READ CAPACITY (16) LBPME bit of `lbp_lowest_aligned`: logical block provisioning enabled.
pub const READ_CAPACITY_LBPME: u16 = 0x8000;
/// READ CAPACITY (16) LBPRZ bit of `lbp_lowest_aligned`: unmapped blocks read as zero.
pub const READ_CAPACITY_LBPRZ: u16 = 0x4000;

/// Mode page codes and page control.
pub mod mode_page {
    /// Caching mode page.
    pub const CACHING: u8 = 0x08;
    /// Control mode page.
    pub const CONTROL: u8 = 0x0A;
    /// All pages.
    pub const ALL: u8 = 0x3F;
    /// Mask of the page code in byte 2 of MODE SENSE / byte 0 of a page.
    pub const PAGE_CODE_MASK: u8 = 0x3F;
    /// PS bit of a page's byte 0: the page can be saved.
    pub const PS: u8 = 0x80;
    /// Page control (bits 6-7 of MODE SENSE byte 2): current values.
    pub const PC_CURRENT: u8 = 0;
    /// Page control: changeable values.
    pub const PC_CHANGEABLE: u8 = 1;
    /// Page control: default values.
    pub const PC_DEFAULT: u8 = 2;
    /// Page control: saved values.
    pub const PC_SAVED: u8 = 3;
    /// Device-specific parameter bit of a disk: write protected.
    pub const DEVICE_SPECIFIC_WP: u8 = 0x80;
    /// Device-specific parameter bit of a disk: DPO and FUA are supported.
    pub const DEVICE_SPECIFIC_DPOFUA: u8 = 0x10;
}

/// Mode parameter header of MODE SENSE (6) / MODE SELECT (6).
#[repr(C)]
#[derive(
    Copy,
    Clone,
    Debug,
    Default,
    PartialEq,
    Eq,
    FromBytes,
    IntoBytes,
    Immutable,
    KnownLayout,
    Unaligned,
)]
pub struct ModeParameterHeader6 {
    /// Bytes that follow this field.
    pub mode_data_length: u8,
    /// Medium type.
    pub medium_type: u8,
    /// Device-specific parameter: WP (bit 7), DPOFUA (bit 4) for disks.
    pub device_specific: u8,
    /// Length of the block descriptors that follow.
    pub block_descriptor_length: u8,
}
const _: () = assert!(size_of::<ModeParameterHeader6>() == 4);

/// Mode parameter header of MODE SENSE (10) / MODE SELECT (10).
#[repr(C)]
#[derive(
    Copy,
    Clone,
    Debug,
    Default,
    PartialEq,
    Eq,
    FromBytes,
    IntoBytes,
    Immutable,
    KnownLayout,
    Unaligned,
)]
pub struct ModeParameterHeader10 {
    /// Bytes that follow this field.
    pub mode_data_length: U16,
    /// Medium type.
    pub medium_type: u8,
    /// Device-specific parameter.
    pub device_specific: u8,
    /// LONGLBA (bit 0).
    pub flags: u8,
    /// Reserved.
    pub reserved: u8,
    /// Length of the block descriptors that follow.
    pub block_descriptor_length: U16,
}
const _: () = assert!(size_of::<ModeParameterHeader10>() == 8);

/// Caching mode page 0x08 (SBC-3 6.4.5), 20 bytes.
#[repr(C)]
#[derive(
    Copy,
    Clone,
    Debug,
    Default,
    PartialEq,
    Eq,
    FromBytes,
    IntoBytes,
    Immutable,
    KnownLayout,
    Unaligned,
)]
pub struct CachingModePage {
    /// PS (bit 7), SPF (bit 6), page code 0x08.
    pub page_code: u8,
    /// Page length, 0x12.
    pub page_length: u8,
    /// IC, ABPF, CAP, DISC, SIZE, WCE (bit 2), MF (bit 1), RCD (bit 0).
    pub flags: u8,
    /// Demand read / write retention priority.
    pub retention_priority: u8,
    /// Disable prefetch transfer length.
    pub disable_prefetch_transfer_length: U16,
    /// Minimum prefetch.
    pub minimum_prefetch: U16,
    /// Maximum prefetch.
    pub maximum_prefetch: U16,
    /// Maximum prefetch ceiling.
    pub maximum_prefetch_ceiling: U16,
    /// FSW (bit 7), LBCSS (bit 6), DRA (bit 5), NV_DIS (bit 0).
    pub flags2: u8,
    /// Number of cache segments.
    pub number_of_cache_segments: u8,
    /// Cache segment size.
    pub cache_segment_size: U16,
    /// Reserved.
    pub reserved: u8,
    /// Obsolete.
    pub obsolete: [u8; 3],
}
const _: () = assert!(size_of::<CachingModePage>() == 20);

/// Caching page flag: write cache enabled.
pub const CACHING_WCE: u8 = 0x04;
/// Caching page flag: read cache disabled.
pub const CACHING_RCD: u8 = 0x01;

/// Control mode page 0x0A (SPC-4 7.5.8), 12 bytes.
#[repr(C)]
#[derive(
    Copy,
    Clone,
    Debug,
    Default,
    PartialEq,
    Eq,
    FromBytes,
    IntoBytes,
    Immutable,
    KnownLayout,
    Unaligned,
)]
pub struct ControlModePage {
    /// PS (bit 7), SPF (bit 6), page code 0x0A.
    pub page_code: u8,
    /// Page length, 0x0A.
    pub page_length: u8,
    /// TST (bits 5-7), TMF_ONLY, DPICZ, D_SENSE (bit 2), GLTSD (bit 1), RLEC (bit 0).
    pub flags: u8,
    /// Queue algorithm modifier (bits 4-7), NUAR, QERR (bits 1-2).
    pub queue_flags: u8,
    /// VS, RAC, UA_INTLCK_CTRL (bits 4-5), SWP (bit 3).
    pub flags4: u8,
    /// ATO (bit 7), TAS (bit 6), ATMPE, RWWP, autoload mode (bits 0-2).
    pub flags5: u8,
    /// Obsolete.
    pub obsolete: U16,
    /// Busy timeout period in 100 ms units.
    pub busy_timeout_period: U16,
    /// Extended self-test completion time in seconds.
    pub extended_self_test_completion_time: U16,
}
const _: () = assert!(size_of::<ControlModePage>() == 12);

/// UNMAP parameter list header; block descriptors follow.
#[repr(C)]
#[derive(
    Copy,
    Clone,
    Debug,
    Default,
    PartialEq,
    Eq,
    FromBytes,
    IntoBytes,
    Immutable,
    KnownLayout,
    Unaligned,
)]
pub struct UnmapListHeader {
    /// Bytes that follow this field.
    pub data_length: U16,
    /// Bytes of block descriptors.
    pub block_descriptor_data_length: U16,
    /// Reserved.
    pub reserved: [u8; 4],
}
const _: () = assert!(size_of::<UnmapListHeader>() == 8);

/// One UNMAP block descriptor.
#[repr(C)]
#[derive(
    Copy,
    Clone,
    Debug,
    Default,
    PartialEq,
    Eq,
    FromBytes,
    IntoBytes,
    Immutable,
    KnownLayout,
    Unaligned,
)]
pub struct UnmapBlockDescriptor {
    /// First block.
    pub lba: U64,
    /// Number of blocks.
    pub block_count: U32,
    /// Reserved.
    pub reserved: [u8; 4],
}
const _: () = assert!(size_of::<UnmapBlockDescriptor>() == 16);

/// REPORT LUNS parameter data header; 8-byte LUN entries follow.
#[repr(C)]
#[derive(
    Copy,
    Clone,
    Debug,
    Default,
    PartialEq,
    Eq,
    FromBytes,
    IntoBytes,
    Immutable,
    KnownLayout,
    Unaligned,
)]
pub struct ReportLunsHeader {
    /// Bytes of LUN list (8 per LUN).
    pub lun_list_length: U32,
    /// Reserved.
    pub reserved: [u8; 4],
}
const _: () = assert!(size_of::<ReportLunsHeader>() == 8);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sense_bytes() {
        let s = SenseData::new(SenseKey::ILLEGAL_REQUEST, asc::INVALID_FIELD_IN_CDB);
        let b = s.as_bytes();
        assert_eq!(b.len(), 18);
        assert_eq!(b[0], 0x70);
        assert_eq!(b[2], 5);
        assert_eq!(b[7], 10);
        assert_eq!((b[12], b[13]), (0x24, 0));
        assert_eq!(
            SenseData::read_from_bytes(b).unwrap().sense_key(),
            SenseKey::ILLEGAL_REQUEST
        );
    }

    #[test]
    fn cdbs_are_big_endian() {
        let c =
            Cdb10::read_from_bytes(&[0x28, 0, 0x01, 0x02, 0x03, 0x04, 0, 0x00, 0x08, 0]).unwrap();
        assert_eq!(c.opcode, Opcode::READ_10);
        assert_eq!(c.lba.get(), 0x0102_0304);
        assert_eq!(c.transfer_length.get(), 8);
        let c6 = Cdb6::read_from_bytes(&[0x08, 0xff, 0x12, 0x34, 0, 0]).unwrap();
        assert_eq!(c6.lba(), 0x1f_1234);
        assert_eq!(c6.transfer_blocks(), 256);
        let c16 = Cdb16 {
            opcode: Opcode::SERVICE_ACTION_IN_16,
            flags: service_action::READ_CAPACITY_16,
            transfer_length: U32::new(32),
            ..Default::default()
        };
        assert_eq!(c16.as_bytes()[..2], [0x9e, 0x10]);
        assert_eq!(c16.as_bytes()[10..14], [0, 0, 0, 32]);
        let cap = ReadCapacity16Data {
            last_lba: U64::new(0x1_0000_0000),
            block_length: U32::new(512),
            lbp_lowest_aligned: U16::new(READ_CAPACITY_LBPME),
            ..Default::default()
        };
        assert_eq!(cap.as_bytes()[..12], [0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 2, 0]);
        assert_eq!(cap.as_bytes()[14], 0x80);
    }

    #[test]
    fn pages_have_their_offsets() {
        assert_eq!(
            core::mem::offset_of!(VpdBlockLimits, max_unmap_lba_count),
            20
        );
        assert_eq!(
            core::mem::offset_of!(VpdBlockLimits, unmap_granularity_alignment),
            32
        );
        assert_eq!(
            core::mem::offset_of!(VpdBlockLimits, max_write_same_length),
            36
        );
        assert_eq!(
            core::mem::offset_of!(VpdBlockLimits, max_atomic_boundary_size),
            60
        );
        assert_eq!(core::mem::offset_of!(CachingModePage, flags2), 12);
        assert_eq!(
            core::mem::offset_of!(ControlModePage, busy_timeout_period),
            8
        );
        assert_eq!(core::mem::offset_of!(InquiryData, vendor_id), 8);
        assert_eq!(core::mem::offset_of!(InquiryData, product_id), 16);
        assert_eq!(core::mem::offset_of!(InquiryData, product_revision), 32);
        assert_eq!(core::mem::offset_of!(SenseData, asc), 12);
    }
}

arbitrary_from_bytes!(
    SenseData,
    Cdb6,
    Cdb10,
    Cdb12,
    Cdb16,
    InquiryCdb,
    InquiryData,
    VpdPageHeader,
    DesignationDescriptorHeader,
    VpdBlockLimits,
    VpdBlockDeviceCharacteristics,
    VpdLogicalBlockProvisioning,
    ReadCapacity10Data,
    ReadCapacity16Data,
    ModeParameterHeader6,
    ModeParameterHeader10,
    CachingModePage,
    ControlModePage,
    UnmapListHeader,
    UnmapBlockDescriptor,
    ReportLunsHeader,
);
