//! INQUIRY: standard data and the VPD pages 0x00, 0x80, 0x83, 0xB0, 0xB1 and 0xB2.

use vmbus_proto::storvsp::scsi::{
    code_set, designator_type, lbp, vpd, DesignationDescriptorHeader, InquiryCdb, InquiryData,
    VpdBlockDeviceCharacteristics, VpdBlockLimits, VpdLogicalBlockProvisioning, VpdPageHeader,
    DEVICE_TYPE_DISK, INQUIRY_CMDQUE, INQUIRY_EVPD, NON_ROTATING_MEDIUM, RESPONSE_DATA_FORMAT_2,
    VERSION_SPC4,
};
use zerocopy::byteorder::big_endian::{U16, U32, U64};
use zerocopy::{FromZeros, IntoBytes};

use super::{
    parse, truncated, Check, Response, ScsiDisk, INVALID_FIELD, MAX_UNMAP_BLOCKS,
    MAX_UNMAP_DESCRIPTORS, MAX_WRITE_SAME_BLOCKS, PRODUCT_ID, PRODUCT_REVISION, VENDOR_ID,
};

/// INQUIRY byte 1 bit 1: CMDDT (obsolete; refused).
const INQUIRY_CMDDT: u8 = 0x02;
/// INQUIRY byte 3 bit 4: HISUP, hierarchical LUN addressing.
const INQUIRY_HISUP: u8 = 0x10;
/// NAA field (top 4 bits) of a locally assigned NAA designator.
const NAA_LOCAL: u64 = 3 << 60;

/// The VPD pages supported, in ascending order (page 0x00 lists them).
const SUPPORTED_PAGES: [u8; 6] = [
    vpd::SUPPORTED_PAGES,
    vpd::UNIT_SERIAL_NUMBER,
    vpd::DEVICE_IDENTIFICATION,
    vpd::BLOCK_LIMITS,
    vpd::BLOCK_DEVICE_CHARACTERISTICS,
    vpd::LOGICAL_BLOCK_PROVISIONING,
];

/// Standard INQUIRY data (36 bytes) with the given peripheral qualifier/type byte.
pub(super) fn standard(peripheral: u8) -> Vec<u8> {
    InquiryData {
        peripheral,
        rmb: 0,
        version: VERSION_SPC4,
        response_data_format: INQUIRY_HISUP | RESPONSE_DATA_FORMAT_2,
        additional_length: (size_of::<InquiryData>() - 5) as u8,
        flags5: 0,
        flags6: 0,
        flags7: INQUIRY_CMDQUE,
        vendor_id: VENDOR_ID,
        product_id: PRODUCT_ID,
        product_revision: PRODUCT_REVISION,
    }
    .as_bytes()
    .to_vec()
}

/// A VPD page: its header (page length from `body`) and `body`.
fn page(code: u8, body: &[u8]) -> Vec<u8> {
    let header = VpdPageHeader {
        peripheral: DEVICE_TYPE_DISK,
        page_code: code,
        page_length: U16::new(body.len() as u16),
    };
    let mut data = header.as_bytes().to_vec();
    data.extend_from_slice(body);
    data
}

/// Appends a logical-unit designation descriptor.
fn designator(out: &mut Vec<u8>, code_set: u8, kind: u8, designator: &[u8]) {
    let header = DesignationDescriptorHeader {
        code_set,
        designator_type: kind, // PIV 0, association 0: the logical unit
        reserved: 0,
        designator_length: designator.len() as u8,
    };
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(designator);
}

impl ScsiDisk {
    /// INQUIRY: standard data when EVPD=0 (a page code then is INVALID FIELD IN CDB), else the
    /// VPD page; cut to the allocation length.
    pub(super) fn inquiry(&self, cdb: &[u8]) -> Result<Response, Check> {
        let c = parse::<InquiryCdb>(cdb)?;
        if c.flags & INQUIRY_CMDDT != 0 {
            return Err(INVALID_FIELD);
        }
        let data = if c.flags & INQUIRY_EVPD == 0 {
            if c.page_code != 0 {
                return Err(INVALID_FIELD);
            }
            standard(DEVICE_TYPE_DISK)
        } else {
            self.vpd_page(c.page_code)?
        };
        let alloc = c.allocation_length.get().into();
        Ok(Response::with_data(truncated(data, alloc, u32::MAX)))
    }

    fn vpd_page(&self, code: u8) -> Result<Vec<u8>, Check> {
        let info = &self.info;
        Ok(match code {
            vpd::SUPPORTED_PAGES => page(code, &SUPPORTED_PAGES),
            vpd::UNIT_SERIAL_NUMBER => page(code, info.serial.as_bytes()),
            vpd::DEVICE_IDENTIFICATION => {
                let mut body = Vec::new();
                let naa = NAA_LOCAL | (info.naa & !(0xf << 60));
                designator(
                    &mut body,
                    code_set::BINARY,
                    designator_type::NAA,
                    U64::new(naa).as_bytes(),
                );
                let t10 = [&VENDOR_ID[..], &PRODUCT_ID, info.serial.as_bytes()].concat();
                designator(
                    &mut body,
                    code_set::ASCII,
                    designator_type::T10_VENDOR_ID,
                    &t10,
                );
                page(code, &body)
            }
            vpd::BLOCK_LIMITS => {
                let mut p = VpdBlockLimits {
                    wsnz: 1,
                    max_transfer_length: U32::new(info.max_transfer_blocks),
                    optimal_transfer_length: U32::new(info.optimal_io_blocks),
                    max_write_same_length: U64::new(MAX_WRITE_SAME_BLOCKS.into()),
                    ..Default::default()
                };
                if info.discard {
                    p.max_unmap_lba_count = U32::new(MAX_UNMAP_BLOCKS);
                    p.max_unmap_block_descriptor_count = U32::new(MAX_UNMAP_DESCRIPTORS);
                    // Unmap in host pages: smaller holes only zero part of a page.
                    p.optimal_unmap_granularity =
                        U32::new(4096u32.checked_div(info.block_size).unwrap_or(1).max(1));
                }
                page(code, &p.as_bytes()[size_of::<VpdPageHeader>()..])
            }
            vpd::BLOCK_DEVICE_CHARACTERISTICS => {
                let mut p = VpdBlockDeviceCharacteristics::new_zeroed();
                if !info.rotational {
                    p.medium_rotation_rate = U16::new(NON_ROTATING_MEDIUM);
                }
                page(code, &p.as_bytes()[size_of::<VpdPageHeader>()..])
            }
            vpd::LOGICAL_BLOCK_PROVISIONING => {
                let mut p = VpdLogicalBlockProvisioning::default();
                if info.discard {
                    p.flags = lbp::LBPU | lbp::LBPWS | lbp::LBPWS10;
                    p.provisioning_type = lbp::TYPE_THIN;
                }
                page(code, &p.as_bytes()[size_of::<VpdPageHeader>()..])
            }
            _ => return Err(INVALID_FIELD),
        })
    }
}
