use proptest::prelude::*;
use vmbus_proto::storvsp::scsi::{asc, status, AdditionalSense, Opcode, SenseKey};
use zerocopy::IntoBytes;

use super::*;

const BLOCKS: u64 = 0x1_0000;
const ILLEGAL: u8 = 0x05;

fn info() -> DiskInfo {
    DiskInfo {
        blocks: BLOCKS,
        block_size: 512,
        readonly: false,
        discard: true,
        serial: "SN-0042".into(),
        naa: 0x0123_4567_89ab_cdef,
        max_transfer_blocks: 2048,
        optimal_io_blocks: 8,
        rotational: false,
    }
}

fn disk() -> ScsiDisk {
    ScsiDisk::new(info())
}

fn disk_with(f: impl FnOnce(&mut DiskInfo)) -> ScsiDisk {
    let mut i = info();
    f(&mut i);
    ScsiDisk::new(i)
}

fn exec(d: &mut ScsiDisk, cdb: &[u8]) -> Action {
    d.execute(0, cdb, 1 << 24, &[])
}

fn done(a: Action) -> Response {
    match a {
        Action::Done(r) => r,
        other => panic!("expected a response, got {other:?}"),
    }
}

/// Runs `cdb` and expects GOOD; returns the data.
fn good(d: &mut ScsiDisk, cdb: &[u8]) -> Vec<u8> {
    let r = done(exec(d, cdb));
    assert_eq!(r.status, status::GOOD, "{r:?}");
    assert!(r.sense.is_none());
    r.data
}

/// Asserts CHECK CONDITION with fixed current sense of this key and ASC/ASCQ.
fn assert_check(r: &Response, key: u8, sense: AdditionalSense) {
    assert_eq!(r.status, status::CHECK_CONDITION, "{r:?}");
    assert!(r.data.is_empty());
    let s = r.sense.expect("sense data");
    let b = s.as_bytes();
    assert_eq!(b.len(), 18);
    assert_eq!(b[0], 0x70);
    assert_eq!(b[2], key);
    assert_eq!(b[7], 10);
    assert_eq!((b[12], b[13]), (sense.asc, sense.ascq), "{r:?}");
}

fn check(d: &mut ScsiDisk, cdb: &[u8], key: u8, sense: AdditionalSense) {
    let r = done(exec(d, cdb));
    assert_check(&r, key, sense);
}

fn cdb10(op: Opcode, flags: u8, lba: u32, len: u16) -> [u8; 10] {
    let mut c = [0; 10];
    c[0] = op.0;
    c[1] = flags;
    c[2..6].copy_from_slice(&lba.to_be_bytes());
    c[7..9].copy_from_slice(&len.to_be_bytes());
    c
}

fn cdb12(op: Opcode, flags: u8, lba: u32, len: u32) -> [u8; 12] {
    let mut c = [0; 12];
    c[0] = op.0;
    c[1] = flags;
    c[2..6].copy_from_slice(&lba.to_be_bytes());
    c[6..10].copy_from_slice(&len.to_be_bytes());
    c
}

fn cdb16(op: Opcode, flags: u8, lba: u64, len: u32) -> [u8; 16] {
    let mut c = [0; 16];
    c[0] = op.0;
    c[1] = flags;
    c[2..10].copy_from_slice(&lba.to_be_bytes());
    c[10..14].copy_from_slice(&len.to_be_bytes());
    c
}

fn inquiry(evpd: bool, page: u8, alloc: u16) -> [u8; 6] {
    let a = alloc.to_be_bytes();
    [0x12, u8::from(evpd), page, a[0], a[1], 0]
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().unwrap())
}

// ---- INQUIRY and VPD ----

#[test]
fn inquiry_standard_data() {
    let d = good(&mut disk(), &inquiry(false, 0, 255));
    assert_eq!(d.len(), 36);
    assert_eq!(d[0], 0x00, "qualifier 0, direct access");
    assert_eq!(d[1], 0, "not removable");
    assert_eq!(d[2], 0x06, "SPC-4");
    assert_eq!(d[3], 0x12, "HISUP, response data format 2");
    assert_eq!(d[4], 31, "additional length");
    assert_eq!(d[7] & 0x02, 0x02, "CMDQUE");
    assert_eq!(&d[8..16], b"VMBUSRS ");
    assert_eq!(&d[16..32], b"Virtual Disk    ");
    assert_eq!(&d[32..36], b"0001");
}

#[test]
fn inquiry_truncated_to_allocation_length_and_buffer() {
    let mut dk = disk();
    assert_eq!(good(&mut dk, &inquiry(false, 0, 5)).len(), 5);
    assert_eq!(good(&mut dk, &inquiry(false, 0, 0)).len(), 0);
    let r = done(dk.execute(0, &inquiry(false, 0, 255), 3, &[]));
    assert_eq!(r.data, [0, 0, 6]);
    let r = done(dk.execute(0, &inquiry(true, 0x83, 255), 7, &[]));
    assert_eq!(r.data.len(), 7);
}

#[test]
fn inquiry_page_code_without_evpd_is_invalid() {
    check(
        &mut disk(),
        &inquiry(false, 0x80, 255),
        ILLEGAL,
        asc::INVALID_FIELD_IN_CDB,
    );
}

#[test]
fn inquiry_cmddt_is_invalid() {
    check(
        &mut disk(),
        &[0x12, 0x02, 0, 0, 36, 0],
        ILLEGAL,
        asc::INVALID_FIELD_IN_CDB,
    );
}

#[test]
fn vpd_supported_pages() {
    let d = good(&mut disk(), &inquiry(true, 0x00, 255));
    assert_eq!(d, [0, 0, 0, 6, 0x00, 0x80, 0x83, 0xB0, 0xB1, 0xB2]);
}

#[test]
fn vpd_unit_serial_number() {
    let d = good(&mut disk(), &inquiry(true, 0x80, 255));
    assert_eq!(d, b"\0\x80\0\x07SN-0042");
    // Non-printable characters are dropped, the serial cut to 20 bytes.
    let mut dk = disk_with(|i| i.serial = "a\u{7}b\u{e9}c0123456789012345678901234".into());
    let d = good(&mut dk, &inquiry(true, 0x80, 255));
    assert_eq!(&d[..4], [0, 0x80, 0, 20]);
    assert_eq!(&d[4..], b"abc01234567890123456");
}

#[test]
fn vpd_device_identification() {
    let d = good(&mut disk(), &inquiry(true, 0x83, 255));
    assert_eq!(&d[..2], [0, 0x83]);
    assert_eq!(usize::from(u16::from_be_bytes([d[2], d[3]])), d.len() - 4);
    // NAA, binary, logical unit, 8 bytes, NAA type 3 (locally assigned).
    assert_eq!(&d[4..8], [0x01, 0x03, 0, 8]);
    assert_eq!(
        u64::from_be_bytes(d[8..16].try_into().unwrap()),
        0x3123_4567_89ab_cdef
    );
    // T10 vendor ID, ASCII: vendor, product, serial.
    assert_eq!(&d[16..20], [0x02, 0x01, 0, 8 + 16 + 7]);
    assert_eq!(&d[20..28], b"VMBUSRS ");
    assert_eq!(&d[28..44], b"Virtual Disk    ");
    assert_eq!(&d[44..], b"SN-0042");
}

#[test]
fn vpd_block_limits() {
    let d = good(&mut disk(), &inquiry(true, 0xB0, 255));
    assert_eq!(d.len(), 64);
    assert_eq!(&d[..4], [0, 0xB0, 0, 0x3C]);
    assert_eq!(d[4], 1, "WSNZ");
    assert_eq!(be32(&d[8..]), 2048, "maximum transfer length");
    assert_eq!(be32(&d[12..]), 8, "optimal transfer length");
    assert_eq!(be32(&d[20..]), 0xFFFF_FFFF, "no maximum unmap LBA count");
    assert_eq!(be32(&d[24..]), MAX_UNMAP_DESCRIPTORS);
    assert_eq!(be32(&d[28..]), 8, "4 KiB unmap granularity");
    assert_eq!(
        u64::from_be_bytes(d[36..44].try_into().unwrap()),
        u64::from(MAX_WRITE_SAME_BLOCKS)
    );
    let d = good(
        &mut disk_with(|i| i.discard = false),
        &inquiry(true, 0xB0, 255),
    );
    assert_eq!(&d[20..32], [0; 12], "no unmap limits without discard");
}

#[test]
fn vpd_block_device_characteristics() {
    let d = good(&mut disk(), &inquiry(true, 0xB1, 255));
    assert_eq!(d.len(), 64);
    assert_eq!(&d[..6], [0, 0xB1, 0, 0x3C, 0, 1]);
    let d = good(
        &mut disk_with(|i| i.rotational = true),
        &inquiry(true, 0xB1, 255),
    );
    assert_eq!(&d[4..6], [0, 0], "rotation rate not reported");
}

#[test]
fn vpd_logical_block_provisioning() {
    let d = good(&mut disk(), &inquiry(true, 0xB2, 255));
    assert_eq!(d, [0, 0xB2, 0, 4, 0, 0xE0, 2, 0]);
    let d = good(
        &mut disk_with(|i| i.discard = false),
        &inquiry(true, 0xB2, 255),
    );
    assert_eq!(d, [0, 0xB2, 0, 4, 0, 0, 0, 0]);
}

#[test]
fn vpd_unknown_page_is_invalid() {
    check(
        &mut disk(),
        &inquiry(true, 0x89, 255),
        ILLEGAL,
        asc::INVALID_FIELD_IN_CDB,
    );
}

// ---- Simple commands ----

#[test]
fn test_unit_ready_start_stop_prevent_allow() {
    let mut d = disk();
    assert!(good(&mut d, &[0x00, 0, 0, 0, 0, 0]).is_empty());
    assert!(good(&mut d, &[0x1B, 0, 0, 0, 1, 0]).is_empty());
    assert!(good(&mut d, &[0x1E, 0, 0, 0, 0, 0]).is_empty());
}

#[test]
fn request_sense_returns_no_sense_or_the_last_error() {
    let mut d = disk();
    let s = good(&mut d, &[0x03, 0, 0, 0, 252, 0]);
    assert_eq!(s.len(), 18);
    assert_eq!((s[0], s[2], s[7], s[12], s[13]), (0x70, 0, 10, 0, 0));
    check(&mut d, &[0xFF], ILLEGAL, asc::INVALID_COMMAND_OPCODE);
    let s = good(&mut d, &[0x03, 0, 0, 0, 252, 0]);
    assert_eq!((s[0], s[2], s[12], s[13]), (0x70, ILLEGAL, 0x20, 0));
    // Retrieved once; a good command in between clears it too.
    let s = good(&mut d, &[0x03, 0, 0, 0, 252, 0]);
    assert_eq!((s[2], s[12]), (0, 0));
    check(&mut d, &[0xFF], ILLEGAL, asc::INVALID_COMMAND_OPCODE);
    good(&mut d, &[0, 0, 0, 0, 0, 0]);
    let s = good(&mut d, &[0x03, 0, 0, 0, 252, 0]);
    assert_eq!((s[2], s[12]), (0, 0));
    // Allocation length truncates.
    assert_eq!(good(&mut d, &[0x03, 0, 0, 0, 8, 0]).len(), 8);
}

#[test]
fn request_sense_descriptor_format_is_invalid() {
    check(
        &mut disk(),
        &[0x03, 1, 0, 0, 252, 0],
        ILLEGAL,
        asc::INVALID_FIELD_IN_CDB,
    );
}

#[test]
fn unknown_opcode() {
    let mut d = disk();
    check(&mut d, &[0xC0; 16], ILLEGAL, asc::INVALID_COMMAND_OPCODE);
    check(
        &mut d,
        &[0x04, 0, 0, 0, 0, 0],
        ILLEGAL,
        asc::INVALID_COMMAND_OPCODE,
    );
    check(
        &mut d,
        &[0xA3, 0x0C, 0, 0, 0, 0, 0, 0, 0, 0x40, 0, 0],
        ILLEGAL,
        asc::INVALID_COMMAND_OPCODE,
    );
    check(&mut d, &[], ILLEGAL, asc::INVALID_COMMAND_OPCODE);
}

#[test]
fn short_cdb_and_naca_are_invalid_fields() {
    let mut d = disk();
    check(
        &mut d,
        &[0x28, 0, 0, 0, 0],
        ILLEGAL,
        asc::INVALID_FIELD_IN_CDB,
    );
    check(&mut d, &[0x12, 0, 0, 0], ILLEGAL, asc::INVALID_FIELD_IN_CDB);
    check(
        &mut d,
        &[0x00, 0, 0, 0, 0, 0x04],
        ILLEGAL,
        asc::INVALID_FIELD_IN_CDB,
    );
    // Extra bytes after the CDB (the SRB's 16-byte area) are ignored.
    let mut c = [0u8; 16];
    c[..6].copy_from_slice(&inquiry(false, 0, 36));
    assert_eq!(good(&mut d, &c).len(), 36);
}

// ---- READ CAPACITY ----

#[test]
fn read_capacity_10() {
    let d = good(&mut disk(), &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(d, [0, 0, 0xFF, 0xFF, 0, 0, 2, 0]);
    let mut big = disk_with(|i| {
        i.blocks = 1 << 33;
        i.block_size = 4096;
    });
    let d = good(&mut big, &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(d, [0xFF, 0xFF, 0xFF, 0xFF, 0, 0, 0x10, 0]);
    let mut edge = disk_with(|i| i.blocks = 1 << 32);
    let d = good(&mut edge, &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(&d[..4], [0xFF; 4]);
    let r = done(disk().execute(0, &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], 4, &[]));
    assert_eq!(r.data, [0, 0, 0xFF, 0xFF]);
}

#[test]
fn read_capacity_16() {
    let c = cdb16(Opcode::SERVICE_ACTION_IN_16, 0x10, 0, 32);
    let mut big = disk_with(|i| i.blocks = (1 << 33) + 5);
    let d = good(&mut big, &c);
    assert_eq!(d.len(), 32);
    assert_eq!(
        u64::from_be_bytes(d[..8].try_into().unwrap()),
        (1 << 33) + 4
    );
    assert_eq!(be32(&d[8..]), 512);
    assert_eq!(d[12], 0, "no protection");
    assert_eq!(d[13], 0, "one logical block per physical block");
    assert_eq!(&d[14..16], [0x80, 0], "LBPME");
    let d = good(&mut disk_with(|i| i.discard = false), &c);
    assert_eq!(&d[14..16], [0, 0]);
    let d = good(
        &mut disk(),
        &cdb16(Opcode::SERVICE_ACTION_IN_16, 0x10, 0, 12),
    );
    assert_eq!(d.len(), 12);
}

#[test]
fn service_action_in_other_than_read_capacity_is_invalid() {
    check(
        &mut disk(),
        &cdb16(Opcode::SERVICE_ACTION_IN_16, 0x12, 0, 32),
        ILLEGAL,
        asc::INVALID_FIELD_IN_CDB,
    );
}

// ---- READ / WRITE ----

#[test]
fn read_6_zero_length_is_256_blocks() {
    let a = disk().execute(0, &[0x08, 0x00, 0x00, 0x10, 0, 0], 256 * 512, &[]);
    assert_eq!(
        a,
        Action::Read {
            lba: 0x10,
            blocks: 256,
            fua: false
        }
    );
    let a = disk().execute(0, &[0x0A, 0, 0x12, 0x34, 8, 0], 4096, &[]);
    assert_eq!(
        a,
        Action::Write {
            lba: 0x1234,
            blocks: 8,
            fua: false
        }
    );
    // 21-bit LBA: the top 3 bits of byte 1 are not part of it.
    let mut big = disk_with(|i| i.blocks = 1 << 22);
    let a = big.execute(0, &[0x08, 0xFF, 0xFF, 0xFF, 1, 0], 512, &[]);
    assert_eq!(
        a,
        Action::Read {
            lba: 0x1F_FFFF,
            blocks: 1,
            fua: false
        }
    );
}

#[test]
fn read_6_lba_is_checked() {
    // LBA 0x10000 is one past the end.
    check(
        &mut disk(),
        &[0x08, 0x01, 0x00, 0x00, 1, 0],
        ILLEGAL,
        asc::LBA_OUT_OF_RANGE,
    );
}

#[test]
fn read_write_10_12_16_with_fua() {
    let mut d = disk();
    let a = exec(&mut d, &cdb10(Opcode::READ_10, 0x08, 100, 8));
    assert_eq!(
        a,
        Action::Read {
            lba: 100,
            blocks: 8,
            fua: true
        }
    );
    let a = exec(&mut d, &cdb10(Opcode::WRITE_10, 0x08, 100, 8));
    assert_eq!(
        a,
        Action::Write {
            lba: 100,
            blocks: 8,
            fua: true
        }
    );
    let a = exec(&mut d, &cdb12(Opcode::READ_12, 0, 7, 9));
    assert_eq!(
        a,
        Action::Read {
            lba: 7,
            blocks: 9,
            fua: false
        }
    );
    let a = exec(&mut d, &cdb12(Opcode::WRITE_12, 0, 7, 9));
    assert_eq!(
        a,
        Action::Write {
            lba: 7,
            blocks: 9,
            fua: false
        }
    );
    let a = exec(&mut d, &cdb16(Opcode::READ_16, 0, BLOCKS - 1, 1));
    assert_eq!(
        a,
        Action::Read {
            lba: BLOCKS - 1,
            blocks: 1,
            fua: false
        }
    );
    let a = exec(&mut d, &cdb16(Opcode::WRITE_16, 0x08, 0, 2048));
    assert_eq!(
        a,
        Action::Write {
            lba: 0,
            blocks: 2048,
            fua: true
        }
    );
}

#[test]
fn write_and_verify_is_a_fua_write() {
    let a = exec(&mut disk(), &cdb10(Opcode::WRITE_VERIFY_10, 0x02, 1, 1));
    assert_eq!(
        a,
        Action::Write {
            lba: 1,
            blocks: 1,
            fua: true
        }
    );
}

#[test]
fn zero_length_transfer_is_good_without_io() {
    let mut d = disk();
    assert!(good(&mut d, &cdb10(Opcode::READ_10, 0, 5, 0)).is_empty());
    assert!(good(&mut d, &cdb16(Opcode::WRITE_16, 0, BLOCKS - 1, 0)).is_empty());
    // ... but its LBA must still name a block.
    check(
        &mut d,
        &cdb10(Opcode::READ_10, 0, BLOCKS as u32, 0),
        ILLEGAL,
        asc::LBA_OUT_OF_RANGE,
    );
}

#[test]
fn transfer_beyond_capacity_is_lba_out_of_range() {
    let mut d = disk();
    assert!(matches!(
        exec(&mut d, &cdb10(Opcode::READ_10, 0, BLOCKS as u32 - 8, 8)),
        Action::Read { .. }
    ));
    check(
        &mut d,
        &cdb10(Opcode::READ_10, 0, BLOCKS as u32 - 8, 9),
        ILLEGAL,
        asc::LBA_OUT_OF_RANGE,
    );
    check(
        &mut d,
        &cdb12(Opcode::WRITE_12, 0, u32::MAX, 1),
        ILLEGAL,
        asc::LBA_OUT_OF_RANGE,
    );
}

#[test]
fn lba_overflow_is_caught() {
    let mut d = disk_with(|i| i.blocks = u64::MAX);
    check(
        &mut d,
        &cdb16(Opcode::READ_16, 0, u64::MAX - 1, 4),
        ILLEGAL,
        asc::LBA_OUT_OF_RANGE,
    );
    check(
        &mut d,
        &cdb16(Opcode::WRITE_SAME_16, 0x01, u64::MAX - 1, 4),
        ILLEGAL,
        asc::LBA_OUT_OF_RANGE,
    );
}

#[test]
fn transfer_longer_than_buffer_fails() {
    let mut d = disk();
    let r = done(d.execute(0, &cdb10(Opcode::READ_10, 0, 0, 8), 8 * 512 - 1, &[]));
    assert_check(&r, ILLEGAL, asc::INVALID_FIELD_IN_CDB);
    let r = done(d.execute(0, &cdb10(Opcode::WRITE_10, 0, 0, 1), 0, &[]));
    assert_check(&r, ILLEGAL, asc::INVALID_FIELD_IN_CDB);
    // A larger buffer is fine.
    let a = d.execute(0, &cdb10(Opcode::READ_10, 0, 0, 8), 1 << 16, &[]);
    assert!(matches!(a, Action::Read { blocks: 8, .. }));
}

#[test]
fn transfer_above_maximum_is_invalid() {
    check(
        &mut disk(),
        &cdb10(Opcode::READ_10, 0, 0, 2049),
        ILLEGAL,
        asc::INVALID_FIELD_IN_CDB,
    );
    let mut unlimited = disk_with(|i| i.max_transfer_blocks = 0);
    assert!(matches!(
        exec(&mut unlimited, &cdb10(Opcode::READ_10, 0, 0, 2049)),
        Action::Read { .. }
    ));
}

#[test]
fn protection_fields_are_invalid() {
    check(
        &mut disk(),
        &cdb10(Opcode::READ_10, 0x20, 0, 1),
        ILLEGAL,
        asc::INVALID_FIELD_IN_CDB,
    );
    check(
        &mut disk(),
        &cdb16(Opcode::WRITE_16, 0x60, 0, 1),
        ILLEGAL,
        asc::INVALID_FIELD_IN_CDB,
    );
}

#[test]
fn readonly_refuses_writes() {
    let mut d = disk_with(|i| i.readonly = true);
    for cdb in [
        &[0x0A, 0, 0, 0, 1, 0][..],
        &cdb10(Opcode::WRITE_10, 0, 0, 1),
        &cdb12(Opcode::WRITE_12, 0, 0, 1),
        &cdb16(Opcode::WRITE_16, 0, 0, 1),
        &cdb10(Opcode::WRITE_VERIFY_10, 0, 0, 1),
        &cdb10(Opcode::WRITE_SAME_10, 0, 0, 1),
        &cdb16(Opcode::WRITE_SAME_16, 0x09, 0, 1),
        &cdb10(Opcode::UNMAP, 0, 0, 24),
    ] {
        let r = done(d.execute(0, cdb, 4096, &[0; 512]));
        assert_check(&r, 0x07, asc::WRITE_PROTECTED);
    }
    assert!(matches!(
        exec(&mut d, &cdb10(Opcode::READ_10, 0, 0, 1)),
        Action::Read { .. }
    ));
}

#[test]
fn disabled_write_cache_makes_writes_fua() {
    let mut d = disk();
    set_wce(&mut d, false);
    assert!(!d.write_cache_enabled());
    assert_eq!(
        exec(&mut d, &cdb10(Opcode::WRITE_10, 0, 0, 1)),
        Action::Write {
            lba: 0,
            blocks: 1,
            fua: true
        }
    );
    assert_eq!(
        exec(&mut d, &cdb10(Opcode::READ_10, 0, 0, 1)),
        Action::Read {
            lba: 0,
            blocks: 1,
            fua: false
        }
    );
}

/// The write cache is a property of the unit, not of the queue: MODE SELECT on one queue of a
/// multi-queue controller holds for every other queue sharing its state.
#[test]
fn write_cache_setting_is_shared_by_every_queue_of_the_unit() {
    let state = LunState::new();
    let mut q0 = ScsiDisk::with_state(info(), state.clone());
    let mut q1 = ScsiDisk::with_state(info(), state.clone());
    let alone = disk();
    set_wce(&mut q0, false);
    assert!(!q1.write_cache_enabled() && !state.write_cache());
    assert!(alone.write_cache_enabled(), "another unit keeps its cache");
    assert_eq!(
        exec(&mut q1, &cdb10(Opcode::WRITE_10, 0, 0, 1)),
        Action::Write {
            lba: 0,
            blocks: 1,
            fua: true
        }
    );
    assert_eq!(mode_sense6(&mut q1, true, 0x08)[6], 0, "WCE off seen on q1");
    set_wce(&mut q1, true);
    assert!(q0.write_cache_enabled());
}

#[test]
fn write_same_is_durable_when_the_write_cache_is_off() {
    let mut d = disk();
    set_wce(&mut d, false);
    let mut data = [0u8; 512];
    data[0] = 1;
    for (cdb, block) in [
        (cdb10(Opcode::WRITE_SAME_10, 0, 10, 4), data),
        (cdb10(Opcode::WRITE_SAME_10, 0, 10, 4), [0; 512]),
    ] {
        let a = d.execute(0, &cdb, 512, &block);
        assert!(matches!(a, Action::WriteSame { fua: true, .. }), "{a:?}");
    }
    let ndob = cdb16(Opcode::WRITE_SAME_16, 0x09, 0, 1);
    assert!(matches!(
        d.execute(0, &ndob, 0, &[]),
        Action::WriteSame { fua: true, .. }
    ));
}

/// A unit the host write-protects (a reload made its disk read-only) refuses changes on every
/// queue at once, and says so in MODE SENSE.
#[test]
fn host_write_protection_applies_to_every_queue_at_once() {
    let state = LunState::new();
    let mut q0 = ScsiDisk::with_state(info(), state.clone());
    let mut q1 = ScsiDisk::with_state(info(), state.clone());
    assert!(matches!(
        exec(&mut q1, &cdb10(Opcode::WRITE_10, 0, 0, 1)),
        Action::Write { .. }
    ));
    state.write_protect();
    for q in [&mut q0, &mut q1] {
        assert!(q.readonly());
        let r = done(q.execute(0, &cdb10(Opcode::WRITE_10, 0, 0, 1), 512, &[]));
        assert_check(&r, 0x07, asc::WRITE_PROTECTED);
        assert_eq!(mode_sense6(q, true, 0x08)[2] & 0x80, 0x80, "WP bit");
        assert!(matches!(
            exec(q, &cdb10(Opcode::READ_10, 0, 0, 1)),
            Action::Read { .. }
        ));
    }
}

// ---- SYNCHRONIZE CACHE, VERIFY ----

#[test]
fn synchronize_cache() {
    let mut d = disk();
    assert_eq!(
        exec(&mut d, &cdb10(Opcode::SYNCHRONIZE_CACHE_10, 0, 0, 0)),
        Action::Flush
    );
    assert_eq!(
        exec(&mut d, &cdb16(Opcode::SYNCHRONIZE_CACHE_16, 0x02, 10, 20)),
        Action::Flush
    );
    check(
        &mut d,
        &cdb16(Opcode::SYNCHRONIZE_CACHE_16, 0, BLOCKS, 0),
        ILLEGAL,
        asc::LBA_OUT_OF_RANGE,
    );
    check(
        &mut d,
        &cdb10(Opcode::SYNCHRONIZE_CACHE_10, 0, BLOCKS as u32 - 1, 2),
        ILLEGAL,
        asc::LBA_OUT_OF_RANGE,
    );
}

#[test]
fn verify_checks_the_range_only() {
    let mut d = disk();
    assert!(good(&mut d, &cdb10(Opcode::VERIFY_10, 0, 0, 100)).is_empty());
    assert!(good(&mut d, &cdb12(Opcode::VERIFY_12, 0, 0, 100)).is_empty());
    assert!(good(&mut d, &cdb16(Opcode::VERIFY_16, 0, BLOCKS - 1, 1)).is_empty());
    check(
        &mut d,
        &cdb16(Opcode::VERIFY_16, 0, BLOCKS - 1, 2),
        ILLEGAL,
        asc::LBA_OUT_OF_RANGE,
    );
    check(
        &mut d,
        &cdb10(Opcode::VERIFY_10, 0x02, 0, 1),
        ILLEGAL,
        asc::INVALID_FIELD_IN_CDB,
    );
}

// ---- UNMAP ----

fn unmap_list(descriptors: &[(u64, u32)]) -> Vec<u8> {
    let bdl = (descriptors.len() * 16) as u16;
    let mut l = Vec::new();
    l.extend_from_slice(&(bdl + 6).to_be_bytes());
    l.extend_from_slice(&bdl.to_be_bytes());
    l.extend_from_slice(&[0; 4]);
    for &(lba, n) in descriptors {
        l.extend_from_slice(&lba.to_be_bytes());
        l.extend_from_slice(&n.to_be_bytes());
        l.extend_from_slice(&[0; 4]);
    }
    l
}

fn unmap(d: &mut ScsiDisk, list: &[u8]) -> Action {
    let cdb = cdb10(Opcode::UNMAP, 0, 0, list.len() as u16);
    assert_eq!(
        d.data_out_len(&cdb),
        list.len().min(MAX_UNMAP_PARAMETER_LEN)
    );
    d.execute(0, &cdb, list.len() as u32, list)
}

fn unmap_check(d: &mut ScsiDisk, list: &[u8], sense: AdditionalSense) {
    assert_check(&done(unmap(d, list)), ILLEGAL, sense);
}

#[test]
fn unmap_ranges() {
    let mut d = disk();
    let a = unmap(&mut d, &unmap_list(&[(0, 8), (100, 0), (BLOCKS - 1, 1)]));
    assert_eq!(
        a,
        Action::Unmap(vec![
            UnmapRange { lba: 0, blocks: 8 },
            UnmapRange {
                lba: BLOCKS - 1,
                blocks: 1
            }
        ])
    );
    // Only empty descriptors, or none: nothing to do.
    assert!(good_action(unmap(&mut d, &unmap_list(&[(5, 0)]))));
    assert!(good_action(unmap(&mut d, &unmap_list(&[]))));
    // Parameter list length 0: nothing transferred, nothing to do.
    let r = done(d.execute(0, &cdb10(Opcode::UNMAP, 0, 0, 0), 0, &[]));
    assert_eq!(r.status, status::GOOD);
    // An incomplete last descriptor is ignored.
    let mut l = unmap_list(&[(1, 1)]);
    l[2..4].copy_from_slice(&20u16.to_be_bytes());
    l.extend_from_slice(&[0; 4]);
    assert_eq!(
        unmap(&mut d, &l),
        Action::Unmap(vec![UnmapRange { lba: 1, blocks: 1 }])
    );
}

fn good_action(a: Action) -> bool {
    matches!(a, Action::Done(r) if r.status == status::GOOD)
}

#[test]
fn unmap_descriptor_validation() {
    let mut d = disk();
    unmap_check(
        &mut d,
        &unmap_list(&[(0, 1), (BLOCKS, 1)]),
        asc::LBA_OUT_OF_RANGE,
    );
    unmap_check(
        &mut d,
        &unmap_list(&[(BLOCKS - 1, 2)]),
        asc::LBA_OUT_OF_RANGE,
    );
    unmap_check(&mut d, &unmap_list(&[(u64::MAX, 2)]), asc::LBA_OUT_OF_RANGE);
    let mut big = disk_with(|i| i.blocks = 1 << 40);
    let too_many: Vec<_> = (0..=MAX_UNMAP_DESCRIPTORS as u64).map(|i| (i, 1)).collect();
    unmap_check(
        &mut big,
        &unmap_list(&too_many),
        asc::INVALID_FIELD_IN_PARAMETER_LIST,
    );
    let max: Vec<_> = (0..MAX_UNMAP_DESCRIPTORS as u64).map(|i| (i, 1)).collect();
    assert!(matches!(unmap(&mut big, &unmap_list(&max)), Action::Unmap(r) if r.len() == 256));
    // No maximum LBA count (VPD 0xB0 says FFFFFFFFh): descriptors as long as a u32 allows,
    // together well over 2^32 blocks.
    let long: Vec<_> = (0..4u64).map(|i| (i << 32, u32::MAX)).collect();
    assert!(matches!(unmap(&mut big, &unmap_list(&long)), Action::Unmap(r) if r.len() == 4));
}

#[test]
fn unmap_malformed_lists() {
    let mut d = disk();
    // Shorter than the header.
    unmap_check(&mut d, &[0, 6, 0, 0], asc::PARAMETER_LIST_LENGTH_ERROR);
    // Descriptor length beyond the list.
    let mut l = unmap_list(&[(0, 1)]);
    l[2..4].copy_from_slice(&32u16.to_be_bytes());
    unmap_check(&mut d, &l, asc::PARAMETER_LIST_LENGTH_ERROR);
    // The list is longer than the initiator's buffer, or than what the caller copied.
    let l = unmap_list(&[(0, 1)]);
    let r = done(d.execute(0, &cdb10(Opcode::UNMAP, 0, 0, 24), 16, &l));
    assert_check(&r, ILLEGAL, asc::PARAMETER_LIST_LENGTH_ERROR);
    let r = done(d.execute(0, &cdb10(Opcode::UNMAP, 0, 0, 24), 24, &l[..16]));
    assert_check(&r, ILLEGAL, asc::PARAMETER_LIST_LENGTH_ERROR);
    // ANCHOR is not supported.
    let r = done(d.execute(0, &cdb10(Opcode::UNMAP, 1, 0, 24), 24, &l));
    assert_check(&r, ILLEGAL, asc::INVALID_FIELD_IN_CDB);
}

#[test]
fn unmap_without_discard_is_an_invalid_opcode() {
    let mut d = disk_with(|i| i.discard = false);
    let l = unmap_list(&[(0, 1)]);
    assert_eq!(d.data_out_len(&cdb10(Opcode::UNMAP, 0, 0, 24)), 0);
    let r = done(d.execute(0, &cdb10(Opcode::UNMAP, 0, 0, 24), 24, &l));
    assert_check(&r, ILLEGAL, asc::INVALID_COMMAND_OPCODE);
}

// ---- WRITE SAME ----

#[test]
fn write_same_fills() {
    let mut d = disk();
    let zeros = [0u8; 512];
    let mut data = [0u8; 512];
    data[511] = 1;
    let ws10 = cdb10(Opcode::WRITE_SAME_10, 0, 10, 100);
    assert_eq!(d.data_out_len(&ws10), 512);
    let a = d.execute(0, &ws10, 512, &data);
    assert_eq!(
        a,
        Action::WriteSame {
            lba: 10,
            blocks: 100,
            fill: Fill::Data,
            fua: false,
        }
    );
    let a = d.execute(0, &ws10, 512, &zeros);
    assert_eq!(
        a,
        Action::WriteSame {
            lba: 10,
            blocks: 100,
            fill: Fill::Zeros { may_unmap: false },
            fua: false,
        }
    );
    let ws16 = cdb16(Opcode::WRITE_SAME_16, 0x08, 10, 100);
    let a = d.execute(0, &ws16, 512, &zeros);
    assert_eq!(
        a,
        Action::WriteSame {
            lba: 10,
            blocks: 100,
            fill: Fill::Zeros { may_unmap: true },
            fua: false,
        }
    );
    // UNMAP with non-zero data must write the data.
    let a = d.execute(0, &ws16, 512, &data);
    assert!(matches!(
        a,
        Action::WriteSame {
            fill: Fill::Data,
            ..
        }
    ));
    // NDOB: no data-out buffer, zeros.
    let ndob = cdb16(Opcode::WRITE_SAME_16, 0x09, 0, 1);
    assert_eq!(d.data_out_len(&ndob), 0);
    let a = d.execute(0, &ndob, 0, &[]);
    assert_eq!(
        a,
        Action::WriteSame {
            lba: 0,
            blocks: 1,
            fill: Fill::Zeros { may_unmap: true },
            fua: false,
        }
    );
    // Without discard the UNMAP bit is ignored.
    let mut nd = disk_with(|i| i.discard = false);
    let a = nd.execute(0, &ws16, 512, &zeros);
    assert!(matches!(
        a,
        Action::WriteSame {
            fill: Fill::Zeros { may_unmap: false },
            ..
        }
    ));
}

#[test]
fn write_same_errors() {
    let mut d = disk();
    let zeros = [0u8; 512];
    for (cdb, sense) in [
        (
            cdb16(Opcode::WRITE_SAME_16, 0, 0, 0),
            asc::INVALID_FIELD_IN_CDB,
        ),
        (
            cdb16(Opcode::WRITE_SAME_16, 0, 0, MAX_WRITE_SAME_BLOCKS + 1),
            asc::INVALID_FIELD_IN_CDB,
        ),
        (
            cdb16(Opcode::WRITE_SAME_16, 0x10, 0, 1),
            asc::INVALID_FIELD_IN_CDB,
        ),
        (
            cdb16(Opcode::WRITE_SAME_16, 0x02, 0, 1),
            asc::INVALID_FIELD_IN_CDB,
        ),
        (
            cdb16(Opcode::WRITE_SAME_16, 0, BLOCKS - 1, 2),
            asc::LBA_OUT_OF_RANGE,
        ),
    ] {
        assert_check(&done(d.execute(0, &cdb, 512, &zeros)), ILLEGAL, sense);
    }
    let ws = cdb10(Opcode::WRITE_SAME_10, 0, 0, 1);
    assert_check(
        &done(d.execute(0, &ws, 511, &zeros)),
        ILLEGAL,
        asc::INVALID_FIELD_IN_CDB,
    );
    assert_check(
        &done(d.execute(0, &ws, 512, &zeros[..100])),
        ILLEGAL,
        asc::PARAMETER_LIST_LENGTH_ERROR,
    );
}

// ---- MODE SENSE / MODE SELECT ----

fn mode_sense6(d: &mut ScsiDisk, dbd: bool, page: u8) -> Vec<u8> {
    good(d, &[0x1A, if dbd { 0x08 } else { 0 }, page, 0, 255, 0])
}

fn mode_sense10(d: &mut ScsiDisk, flags: u8, page: u8, subpage: u8) -> Vec<u8> {
    good(d, &[0x5A, flags, page, subpage, 0, 0, 0, 1, 0, 0])
}

#[test]
fn mode_sense_6_caching_page() {
    let mut d = disk();
    let m = mode_sense6(&mut d, false, 0x08);
    assert_eq!(m.len(), 4 + 8 + 20);
    assert_eq!(
        m[..4],
        [31, 0, 0x10, 8],
        "length, medium, DPOFUA, descriptor length"
    );
    assert_eq!(m[4..12], [0, 1, 0, 0, 0, 0, 2, 0], "blocks, block length");
    assert_eq!(m[12..15], [0x08, 0x12, 0x04], "caching page, WCE");
    assert!(m[15..].iter().all(|&b| b == 0));
    let m = mode_sense6(&mut d, true, 0x08);
    assert_eq!(m.len(), 24);
    assert_eq!(m[..4], [23, 0, 0x10, 0]);
    assert_eq!(m[4..7], [0x08, 0x12, 0x04]);
}

#[test]
fn mode_sense_control_and_all_pages() {
    let mut d = disk();
    let m = mode_sense6(&mut d, true, 0x0A);
    assert_eq!(m[..4], [15, 0, 0x10, 0]);
    assert_eq!(m[4..6], [0x0A, 0x0A]);
    assert_eq!(m[6], 0, "D_SENSE clear: fixed-format sense");
    let m = mode_sense6(&mut d, true, 0x3F);
    assert_eq!(m.len(), 4 + 20 + 12);
    assert_eq!(m[0], 35);
    assert_eq!((m[4], m[24]), (0x08, 0x0A));
    let m = mode_sense10(&mut d, 0x08, 0x3F, 0xFF);
    assert_eq!(m.len(), 8 + 20 + 12);
}

#[test]
fn mode_sense_10_long_block_descriptor() {
    let mut d = disk_with(|i| i.blocks = 1 << 33);
    let m = mode_sense10(&mut d, 0x10, 0x08, 0);
    assert_eq!(m.len(), 8 + 16 + 20);
    assert_eq!(m[..8], [0, 42, 0, 0x10, 1, 0, 0, 16]);
    assert_eq!(u64::from_be_bytes(m[8..16].try_into().unwrap()), 1 << 33);
    assert_eq!(be32(&m[20..]), 512);
    // Without LLBAA: the short form, blocks capped.
    let m = mode_sense10(&mut d, 0, 0x08, 0);
    assert_eq!(m[..8], [0, 34, 0, 0x10, 0, 0, 0, 8]);
    assert_eq!(m[8..16], [0xFF, 0xFF, 0xFF, 0xFF, 0, 0, 2, 0]);
}

#[test]
fn mode_sense_readonly_sets_wp() {
    let m = mode_sense6(&mut disk_with(|i| i.readonly = true), true, 0x3F);
    assert_eq!(m[2], 0x90);
}

#[test]
fn mode_sense_page_control() {
    let mut d = disk();
    set_wce(&mut d, false);
    let m = mode_sense6(&mut d, true, 0x08);
    assert_eq!(m[6], 0, "current: WCE off");
    let m = mode_sense6(&mut d, true, 0x40 | 0x08);
    assert_eq!(m[6], 0x04, "changeable: WCE");
    let m = mode_sense6(&mut d, true, 0x40 | 0x0A);
    assert!(
        m[6..].iter().all(|&b| b == 0),
        "control: nothing changeable"
    );
    let m = mode_sense6(&mut d, true, 0x80 | 0x08);
    assert_eq!(m[6], 0x04, "default: WCE on");
    check(
        &mut d,
        &[0x1A, 0x08, 0xC0 | 0x08, 0, 255, 0],
        ILLEGAL,
        asc::SAVING_PARAMETERS_NOT_SUPPORTED,
    );
}

#[test]
fn mode_sense_invalid_pages() {
    let mut d = disk();
    check(
        &mut d,
        &[0x1A, 0, 0x1C, 0, 255, 0],
        ILLEGAL,
        asc::INVALID_FIELD_IN_CDB,
    );
    check(
        &mut d,
        &[0x1A, 0, 0x08, 1, 255, 0],
        ILLEGAL,
        asc::INVALID_FIELD_IN_CDB,
    );
    check(
        &mut d,
        &[0x1A, 0, 0x08, 0xFF, 255, 0],
        ILLEGAL,
        asc::INVALID_FIELD_IN_CDB,
    );
}

#[test]
fn mode_sense_truncated() {
    let mut d = disk();
    assert_eq!(good(&mut d, &[0x1A, 0, 0x3F, 0, 4, 0]), [43, 0, 0x10, 8]);
    let r = done(d.execute(0, &[0x5A, 0, 0x3F, 0, 0, 0, 0, 1, 0, 0], 10, &[]));
    assert_eq!(r.data.len(), 10);
}

/// MODE SELECT (6) of the current caching page with WCE set to `wce`, as Linux's sd does it.
fn set_wce(d: &mut ScsiDisk, wce: bool) {
    let m = mode_sense6(d, true, 0x08);
    let mut list = vec![0, 0, 0, 0];
    list.extend_from_slice(&m[4..]);
    list[4] &= 0x7F;
    list[6] = (list[6] & !0x04) | if wce { 0x04 } else { 0 };
    let cdb = [0x15, 0x10, 0, 0, list.len() as u8, 0];
    assert_eq!(d.data_out_len(&cdb), list.len());
    let r = done(d.execute(0, &cdb, list.len() as u32, &list));
    assert_eq!(r.status, status::GOOD, "{r:?}");
}

#[test]
fn mode_select_round_trip_of_wce() {
    let mut d = disk();
    assert!(d.write_cache_enabled());
    set_wce(&mut d, false);
    assert!(!d.write_cache_enabled());
    assert_eq!(mode_sense6(&mut d, true, 0x08)[6], 0);
    set_wce(&mut d, true);
    assert_eq!(mode_sense6(&mut d, true, 0x08)[6], 0x04);

    // MODE SELECT (10) with a block descriptor restating the geometry and both pages.
    let m = mode_sense10(&mut d, 0, 0x3F, 0);
    let mut list = m.clone();
    list[0..2].copy_from_slice(&[0, 0]);
    list[3] = 0;
    list[16 + 2] &= !0x04; // caching page after header (8) and descriptor (8)
    let cdb = [0x55, 0x10, 0, 0, 0, 0, 0, 0, list.len() as u8, 0];
    assert_eq!(d.data_out_len(&cdb), list.len());
    let r = done(d.execute(0, &cdb, list.len() as u32, &list));
    assert_eq!(r.status, status::GOOD, "{r:?}");
    assert!(!d.write_cache_enabled());
}

fn select6(d: &mut ScsiDisk, flags: u8, list: &[u8]) -> Response {
    let cdb = [0x15, flags, 0, 0, list.len() as u8, 0];
    done(d.execute(0, &cdb, list.len() as u32, list))
}

fn caching_list(d: &mut ScsiDisk) -> Vec<u8> {
    let m = mode_sense6(d, true, 0x08);
    let mut list = vec![0, 0, 0, 0];
    list.extend_from_slice(&m[4..]);
    list
}

#[test]
fn mode_select_refuses_other_changes() {
    let mut d = disk();
    let base = caching_list(&mut d);
    let bad = |f: &dyn Fn(&mut Vec<u8>)| {
        let mut l = base.clone();
        f(&mut l);
        l
    };
    let param = asc::INVALID_FIELD_IN_PARAMETER_LIST;
    // RCD, another caching field, page length, unknown page, sub-page format, medium type.
    for (list, sense) in [
        (bad(&|l| l[6] |= 0x01), param),
        (bad(&|l| l[12] = 0x80), param),
        (bad(&|l| l[5] = 0x10), param),
        (bad(&|l| l[5] = 0x13), asc::PARAMETER_LIST_LENGTH_ERROR),
        (bad(&|l| l[4] = 0x1C), param),
        (bad(&|l| l[4] = 0x48), param),
        (bad(&|l| l[1] = 1), param),
        (bad(&|l| l.truncate(14)), asc::PARAMETER_LIST_LENGTH_ERROR),
        (bad(&|l| l.push(0x08)), asc::PARAMETER_LIST_LENGTH_ERROR),
        (bad(&|l| l.truncate(3)), asc::PARAMETER_LIST_LENGTH_ERROR),
    ] {
        assert_check(&select6(&mut d, 0x10, &list), ILLEGAL, sense);
    }
    // A shorter page length with the bytes to match is still not the caching page.
    let mut l = base.clone();
    l[5] = 2;
    l.truncate(8);
    assert_check(&select6(&mut d, 0x10, &l), ILLEGAL, param);
    // A changed control page.
    let m = mode_sense6(&mut d, true, 0x0A);
    let mut l = vec![0, 0, 0, 0];
    l.extend_from_slice(&m[4..]);
    assert_eq!(select6(&mut d, 0x10, &l).status, status::GOOD);
    l[6] |= 0x04; // D_SENSE
    assert_check(&select6(&mut d, 0x10, &l), ILLEGAL, param);
    // PS in a page is ignored.
    let mut l = base.clone();
    l[4] |= 0x80;
    assert_eq!(select6(&mut d, 0x10, &l).status, status::GOOD);
}

#[test]
fn mode_select_is_all_or_nothing() {
    let mut d = disk();
    let mut l = caching_list(&mut d);
    l[6] &= !0x04;
    l.extend_from_slice(&[0x1C, 2, 0, 0]);
    assert_check(
        &select6(&mut d, 0x10, &l),
        ILLEGAL,
        asc::INVALID_FIELD_IN_PARAMETER_LIST,
    );
    assert!(d.write_cache_enabled());
}

#[test]
fn mode_select_cdb_checks() {
    let mut d = disk();
    let l = caching_list(&mut d);
    assert_check(
        &select6(&mut d, 0x11, &l),
        ILLEGAL,
        asc::INVALID_FIELD_IN_CDB,
    );
    assert_check(
        &select6(&mut d, 0x00, &l),
        ILLEGAL,
        asc::INVALID_FIELD_IN_CDB,
    );
    assert_eq!(select6(&mut d, 0x00, &[]).status, status::GOOD);
    // The list is longer than the buffer, or the caller copied less.
    let cdb = [0x15, 0x10, 0, 0, l.len() as u8, 0];
    let r = done(d.execute(0, &cdb, 4, &l));
    assert_check(&r, ILLEGAL, asc::PARAMETER_LIST_LENGTH_ERROR);
    let r = done(d.execute(0, &cdb, 64, &l[..10]));
    assert_check(&r, ILLEGAL, asc::PARAMETER_LIST_LENGTH_ERROR);
}

#[test]
fn mode_select_block_descriptors() {
    let mut d = disk();
    let page = &caching_list(&mut d)[4..];
    let with_descriptor = |blocks: u32, len: u32| {
        let mut l = vec![0, 0, 0, 8];
        l.extend_from_slice(&blocks.to_be_bytes());
        l.extend_from_slice(&len.to_be_bytes());
        l.extend_from_slice(page);
        l
    };
    let l = with_descriptor(0, 512);
    assert_eq!(select6(&mut d, 0x10, &l).status, status::GOOD);
    let l = with_descriptor(BLOCKS as u32, 512);
    assert_eq!(select6(&mut d, 0x10, &l).status, status::GOOD);
    let l = with_descriptor(0, 4096);
    assert_check(
        &select6(&mut d, 0x10, &l),
        ILLEGAL,
        asc::INVALID_FIELD_IN_PARAMETER_LIST,
    );
    let l = with_descriptor(5, 512);
    assert_check(
        &select6(&mut d, 0x10, &l),
        ILLEGAL,
        asc::INVALID_FIELD_IN_PARAMETER_LIST,
    );
}

// ---- REPORT LUNS, missing LUNs ----

fn report_luns_cdb(select: u8, alloc: u32) -> [u8; 12] {
    let mut c = [0; 12];
    c[0] = 0xA0;
    c[2] = select;
    c[6..10].copy_from_slice(&alloc.to_be_bytes());
    c
}

#[test]
fn report_luns_lists_the_luns() {
    let r = report_luns(&report_luns_cdb(0, 4096), 4096, &[0, 1, 5]);
    assert_eq!(r.status, status::GOOD);
    assert_eq!(r.data.len(), 32);
    assert_eq!(r.data[..8], [0, 0, 0, 24, 0, 0, 0, 0]);
    assert_eq!(r.data[8..16], [0; 8]);
    assert_eq!(r.data[16..24], [0, 1, 0, 0, 0, 0, 0, 0]);
    assert_eq!(r.data[24..32], [0, 5, 0, 0, 0, 0, 0, 0]);
    // Truncation keeps the full list length in the header.
    let r = report_luns(&report_luns_cdb(2, 16), 4096, &[0, 1, 5]);
    assert_eq!(r.data[..4], [0, 0, 0, 24]);
    assert_eq!(r.data.len(), 16);
    let r = report_luns(&report_luns_cdb(0, 4096), 12, &[0, 1, 5]);
    assert_eq!(r.data.len(), 12);
    // Well-known logical units only: none.
    let r = report_luns(&report_luns_cdb(1, 4096), 4096, &[0, 1]);
    assert_eq!(r.data, [0; 8]);
    // Through the disk: its own LUN.
    let mut d = disk();
    let data = good(&mut d, &report_luns_cdb(0, 4096));
    assert_eq!(data, [0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    let r = done(d.execute(3, &report_luns_cdb(0, 4096), 4096, &[]));
    assert_eq!(r.data[8..10], [0, 3]);
}

#[test]
fn report_luns_invalid_fields() {
    for cdb in [
        &report_luns_cdb(0, 15)[..],
        &report_luns_cdb(0x10, 4096),
        &report_luns_cdb(0, 4096)[..11],
    ] {
        let r = report_luns(cdb, 4096, &[0]);
        assert_check(&r, ILLEGAL, asc::INVALID_FIELD_IN_CDB);
    }
}

#[test]
fn missing_lun() {
    let r = no_lun_response(&inquiry(false, 0, 255), 4096);
    assert_eq!(r.status, status::GOOD);
    assert_eq!(r.data.len(), 36);
    assert_eq!(r.data[0], 0x7F);
    let r = no_lun_response(&inquiry(false, 0, 255), 1);
    assert_eq!(r.data, [0x7F]);
    let r = no_lun_response(&inquiry(true, 0, 255), 4096);
    assert_check(&r, ILLEGAL, asc::LUN_NOT_SUPPORTED);
    let r = no_lun_response(&inquiry(false, 0x80, 255), 4096);
    assert_check(&r, ILLEGAL, asc::INVALID_FIELD_IN_CDB);
    for cdb in [
        &[0u8, 0, 0, 0, 0, 0][..],
        &cdb10(Opcode::READ_10, 0, 0, 1),
        &[0xFF],
        &[],
    ] {
        assert_check(&no_lun_response(cdb, 4096), ILLEGAL, asc::LUN_NOT_SUPPORTED);
    }
    let r = no_lun_response(&[0x03, 0, 0, 0, 252, 0], 4096);
    assert_eq!(r.status, status::GOOD);
    assert_eq!(
        (r.data[0], r.data[2], r.data[12], r.data[13]),
        (0x70, ILLEGAL, 0x25, 0)
    );
    let r = no_lun_response(&report_luns_cdb(0, 4096), 4096);
    assert_eq!(r.data, [0; 8]);
}

// ---- Unit attention ----

#[test]
fn capacity_change_posts_a_unit_attention() {
    let mut d = disk();
    d.set_capacity(BLOCKS * 2);
    // INQUIRY and REPORT LUNS do not report it.
    good(&mut d, &inquiry(false, 0, 36));
    good(&mut d, &report_luns_cdb(0, 4096));
    check(
        &mut d,
        &[0, 0, 0, 0, 0, 0],
        0x06,
        asc::CAPACITY_DATA_CHANGED,
    );
    good(&mut d, &[0, 0, 0, 0, 0, 0]);
    let c = good(&mut d, &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(be32(&c), (BLOCKS * 2 - 1) as u32);
    // REQUEST SENSE returns and clears it.
    d.set_capacity(BLOCKS);
    let s = good(&mut d, &[0x03, 0, 0, 0, 18, 0]);
    assert_eq!((s[2], s[12], s[13]), (0x06, 0x2A, 0x09));
    assert!(matches!(
        exec(&mut d, &cdb10(Opcode::READ_10, 0, 0, 1)),
        Action::Read { .. }
    ));
}

// ---- Completion of block I/O ----

#[test]
fn io_done_maps_errors() {
    const EIO: i32 = 5;
    const ENOSPC: i32 = 28;
    const EROFS: i32 = 30;
    const EOPNOTSUPP: i32 = 95;
    assert_eq!(ScsiDisk::io_done(IoKind::Read, Ok(())), Response::good());
    assert_eq!(ScsiDisk::io_done(IoKind::Write, Ok(())), Response::good());
    assert_check(
        &ScsiDisk::io_done(IoKind::Read, Err(EIO)),
        0x03,
        asc::UNRECOVERED_READ_ERROR,
    );
    for kind in [
        IoKind::Write,
        IoKind::Flush,
        IoKind::WriteSame,
        IoKind::Unmap,
    ] {
        assert_check(&ScsiDisk::io_done(kind, Err(EIO)), 0x03, asc::WRITE_ERROR);
    }
    let r = ScsiDisk::io_done(IoKind::Write, Err(ENOSPC));
    assert_check(&r, 0x07, asc::SPACE_ALLOCATION_FAILED);
    assert_eq!((r.sense.unwrap().asc, r.sense.unwrap().ascq), (0x27, 0x07));
    assert_check(
        &ScsiDisk::io_done(IoKind::Write, Err(EROFS)),
        0x07,
        asc::WRITE_PROTECTED,
    );
    assert_eq!(
        ScsiDisk::io_done(IoKind::Unmap, Err(EOPNOTSUPP)),
        Response::good()
    );
    assert_eq!(Action::Unmap(Vec::new()).io_kind(), Some(IoKind::Unmap));
    assert_eq!(Action::Done(Response::good()).io_kind(), None);
}

#[test]
fn sense_key_constants_match_the_tests() {
    assert_eq!(SenseKey::ILLEGAL_REQUEST.0, ILLEGAL);
    assert_eq!(SenseKey::DATA_PROTECT.0, 0x07);
    assert_eq!(SenseKey::MEDIUM_ERROR.0, 0x03);
    assert_eq!(SenseKey::UNIT_ATTENTION.0, 0x06);
}

// ---- Hostile input ----

const OPCODES: &[u8] = &[
    0x00, 0x03, 0x08, 0x0A, 0x12, 0x15, 0x1A, 0x1B, 0x1E, 0x25, 0x28, 0x2A, 0x2E, 0x2F, 0x35, 0x41,
    0x42, 0x55, 0x5A, 0x88, 0x8A, 0x8E, 0x8F, 0x91, 0x93, 0x9E, 0xA0, 0xA8, 0xAA, 0xAE, 0xAF,
];

fn cdb_strategy() -> impl Strategy<Value = Vec<u8>> {
    let byte = prop_oneof![Just(0u8), 0u8..4, any::<u8>()];
    (
        prop_oneof![4 => prop::sample::select(OPCODES), 1 => any::<u8>()],
        prop::collection::vec(byte, 0..18),
    )
        .prop_map(|(op, rest)| {
            let mut c = vec![op];
            c.extend(rest);
            c
        })
}

fn info_strategy() -> impl Strategy<Value = DiskInfo> {
    (
        prop_oneof![0u64..300, any::<u64>()],
        prop::sample::select(vec![512u32, 4096]),
        any::<bool>(),
        any::<bool>(),
        0u32..300,
    )
        .prop_map(|(blocks, block_size, readonly, discard, max)| DiskInfo {
            blocks,
            block_size,
            readonly,
            discard,
            max_transfer_blocks: max,
            ..info()
        })
}

proptest! {
    #[test]
    fn hostile_cdbs_get_checked_answers(
        info in info_strategy(),
        commands in prop::collection::vec(
            (cdb_strategy(), prop_oneof![0u32..70_000, any::<u32>()],
             prop::collection::vec(prop_oneof![Just(0u8), any::<u8>()], 0..700)),
            1..8,
        ),
    ) {
        let mut d = ScsiDisk::new(info.clone());
        let capacity = info.blocks;
        let bs = u64::from(info.block_size);
        let in_range = |lba: u64, blocks: u32| {
            blocks > 0 && lba.checked_add(blocks.into()).is_some_and(|e| e <= capacity)
        };
        for (cdb, data_len, data_out) in commands {
            // As the caller does: at most what the disk asks for and the buffer holds.
            let n = d.data_out_len(&cdb).min(data_len as usize).min(data_out.len());
            let action = d.execute(0, &cdb, data_len, &data_out[..n]);
            match action {
                Action::Done(r) => {
                    prop_assert!(r.data.len() <= data_len as usize);
                    prop_assert_eq!(r.status == status::CHECK_CONDITION, r.sense.is_some());
                    prop_assert!(r.status == status::GOOD || r.status == status::CHECK_CONDITION);
                    if r.sense.is_some() {
                        prop_assert!(r.data.is_empty());
                    }
                }
                Action::Read { lba, blocks, .. } | Action::Write { lba, blocks, .. } => {
                    prop_assert!(in_range(lba, blocks));
                    prop_assert!(u64::from(blocks) * bs <= u64::from(data_len));
                    prop_assert!(info.max_transfer_blocks == 0 || blocks <= info.max_transfer_blocks);
                    if matches!(action, Action::Write { .. }) {
                        prop_assert!(!info.readonly);
                    }
                }
                Action::Flush => {}
                Action::Unmap(ranges) => {
                    prop_assert!(!info.readonly && info.discard);
                    prop_assert!(!ranges.is_empty());
                    prop_assert!(ranges.len() <= MAX_UNMAP_DESCRIPTORS as usize);
                    for r in ranges {
                        prop_assert!(in_range(r.lba, r.blocks));
                    }
                }
                Action::WriteSame {
                    lba, blocks, fill, ..
                } => {
                    prop_assert!(!info.readonly);
                    prop_assert!(in_range(lba, blocks));
                    prop_assert!(blocks <= MAX_WRITE_SAME_BLOCKS);
                    if fill == Fill::Data {
                        prop_assert!(n as u64 >= bs);
                    }
                    if let Fill::Zeros { may_unmap: true } = fill {
                        prop_assert!(info.discard);
                    }
                }
            }
        }
    }

    #[test]
    fn hostile_report_luns_and_missing_lun(
        cdb in cdb_strategy(),
        data_len in prop_oneof![0u32..100, any::<u32>()],
        luns in prop::collection::vec(any::<u8>(), 0..20),
    ) {
        let r = report_luns(&cdb, data_len, &luns);
        prop_assert!(r.data.len() <= data_len as usize);
        prop_assert_eq!(r.status == status::CHECK_CONDITION, r.sense.is_some());
        let r = no_lun_response(&cdb, data_len);
        prop_assert!(r.data.len() <= data_len as usize);
        prop_assert_eq!(r.status == status::CHECK_CONDITION, r.sense.is_some());
    }
}
