//! MODE SENSE (6)/(10) and MODE SELECT (6)/(10): the caching page (WCE is the one changeable
//! parameter) and the control page.

use vmbus_proto::storvsp::scsi::{
    asc, mode_page, CachingModePage, ControlModePage, ModeParameterHeader10, ModeParameterHeader6,
    Opcode, CACHING_WCE,
};
use zerocopy::byteorder::big_endian::U16;
use zerocopy::IntoBytes;

use super::{
    be16, parse, truncated, Check, Response, ScsiDisk, INVALID_FIELD, INVALID_PARAMETER,
    MAX_MODE_SELECT_LEN, PARAMETER_LENGTH,
};

/// MODE SENSE byte 1: DBD, disable block descriptors.
const MODE_SENSE_DBD: u8 = 0x08;
/// MODE SENSE (10) byte 1: LLBAA, long LBA block descriptors accepted.
const MODE_SENSE_LLBAA: u8 = 0x10;
/// MODE SELECT byte 1: PF, the parameters are in page format.
const MODE_SELECT_PF: u8 = 0x10;
/// MODE SELECT byte 1: SP, save pages.
const MODE_SELECT_SP: u8 = 0x01;
/// Byte 0 of a mode page: SPF, the page is in sub-page format.
const PAGE_SPF: u8 = 0x40;
/// MODE SENSE subpage code asking for all subpages (with page 0x3F).
const ALL_SUBPAGES: u8 = 0xFF;
/// MODE PARAMETER HEADER (10) flags: LONGLBA, the block descriptors are 16 bytes.
const HEADER_LONGLBA: u8 = 0x01;
/// Length of a short (and general) block descriptor.
const SHORT_BLOCK_DESCRIPTOR_LEN: usize = 8;
/// Length of a long LBA block descriptor.
const LONG_BLOCK_DESCRIPTOR_LEN: usize = 16;
/// Control page byte 3: queue algorithm modifier 1, unrestricted reordering allowed.
const CONTROL_QAM_UNRESTRICTED: u8 = 0x10;

impl ScsiDisk {
    /// The caching page with values of page control `pc` (not saved).
    fn caching_page(&self, pc: u8) -> CachingModePage {
        let wce = match pc {
            mode_page::PC_CURRENT => self.state.write_cache(),
            _ => true, // default: enabled; changeable: the WCE bit
        };
        CachingModePage {
            page_code: mode_page::CACHING,
            page_length: (size_of::<CachingModePage>() - 2) as u8,
            flags: if wce { CACHING_WCE } else { 0 },
            ..Default::default()
        }
    }

    /// The control page with values of page control `pc` (not saved); nothing is changeable.
    fn control_page(pc: u8) -> ControlModePage {
        ControlModePage {
            page_code: mode_page::CONTROL,
            page_length: (size_of::<ControlModePage>() - 2) as u8,
            queue_flags: if pc == mode_page::PC_CHANGEABLE {
                0
            } else {
                CONTROL_QAM_UNRESTRICTED
            },
            ..Default::default()
        }
    }

    /// The device-specific parameter of the mode parameter header: WP when read-only, and
    /// DPOFUA (FUA is honoured).
    fn device_specific(&self) -> u8 {
        let wp = if self.readonly() {
            mode_page::DEVICE_SPECIFIC_WP
        } else {
            0
        };
        wp | mode_page::DEVICE_SPECIFIC_DPOFUA
    }

    /// MODE SENSE (6) or (10): pages 0x08, 0x0A or 0x3F (both), subpage 0 (or 0xFF with 0x3F),
    /// page control current, changeable or default (saved: SAVING PARAMETERS NOT SUPPORTED);
    /// a block descriptor unless DBD (long with LLBAA in the 10-byte form).
    pub(super) fn mode_sense(&self, cdb: &[u8]) -> Result<Response, Check> {
        let ten = cdb[0] == Opcode::MODE_SENSE_10.0;
        let (flags, page, subpage, alloc) = if ten {
            let c = parse::<[u8; 10]>(cdb)?;
            (c[1], c[2], c[3], be16(&c[7..]))
        } else {
            let c = parse::<[u8; 6]>(cdb)?;
            (c[1] & !MODE_SENSE_LLBAA, c[2], c[3], usize::from(c[4]))
        };
        let pc = page >> 6;
        let code = page & mode_page::PAGE_CODE_MASK;
        if pc == mode_page::PC_SAVED {
            return Err(Check::illegal(asc::SAVING_PARAMETERS_NOT_SUPPORTED));
        }
        if subpage != 0 && !(code == mode_page::ALL && subpage == ALL_SUBPAGES) {
            return Err(INVALID_FIELD);
        }
        let mut pages = Vec::new();
        if code == mode_page::CACHING || code == mode_page::ALL {
            pages.extend_from_slice(self.caching_page(pc).as_bytes());
        }
        if code == mode_page::CONTROL || code == mode_page::ALL {
            pages.extend_from_slice(Self::control_page(pc).as_bytes());
        }
        if pages.is_empty() {
            return Err(INVALID_FIELD);
        }

        // Block descriptor: zeros for the changeable values (nothing in it can change).
        let long = ten && flags & MODE_SENSE_LLBAA != 0;
        let mut descriptor = Vec::new();
        if flags & MODE_SENSE_DBD == 0 {
            let (blocks, block_size) = if pc == mode_page::PC_CHANGEABLE {
                (0, 0)
            } else {
                (self.info.blocks, self.info.block_size)
            };
            if long {
                descriptor.extend_from_slice(&blocks.to_be_bytes());
                descriptor.extend_from_slice(&[0; 4]);
                descriptor.extend_from_slice(&block_size.to_be_bytes());
            } else {
                let blocks = u32::try_from(blocks).unwrap_or(u32::MAX);
                descriptor.extend_from_slice(&blocks.to_be_bytes());
                descriptor.extend_from_slice(&(block_size & 0x00ff_ffff).to_be_bytes());
            }
        }

        let mut data = if ten {
            let len = size_of::<ModeParameterHeader10>() + descriptor.len() + pages.len();
            ModeParameterHeader10 {
                mode_data_length: U16::new((len - 2) as u16),
                medium_type: 0,
                device_specific: self.device_specific(),
                flags: if long && !descriptor.is_empty() {
                    HEADER_LONGLBA
                } else {
                    0
                },
                reserved: 0,
                block_descriptor_length: U16::new(descriptor.len() as u16),
            }
            .as_bytes()
            .to_vec()
        } else {
            let len = size_of::<ModeParameterHeader6>() + descriptor.len() + pages.len();
            ModeParameterHeader6 {
                mode_data_length: (len - 1) as u8,
                medium_type: 0,
                device_specific: self.device_specific(),
                block_descriptor_length: descriptor.len() as u8,
            }
            .as_bytes()
            .to_vec()
        };
        data.extend_from_slice(&descriptor);
        data.extend_from_slice(&pages);
        Ok(Response::with_data(truncated(data, alloc, u32::MAX)))
    }

    /// MODE SELECT (6) or (10): PF must be set and SP clear; block descriptors must repeat the
    /// current block length (and the capacity or 0); pages must be the caching page, differing
    /// from the current values in WCE only, or the unchanged control page. Applied only when
    /// the whole list is valid.
    pub(super) fn mode_select(
        &mut self,
        cdb: &[u8],
        data_len: u32,
        data_out: &[u8],
    ) -> Result<Response, Check> {
        let ten = cdb[0] == Opcode::MODE_SELECT_10.0;
        let (flags, len) = if ten {
            let c = parse::<[u8; 10]>(cdb)?;
            (c[1], be16(&c[7..]))
        } else {
            let c = parse::<[u8; 6]>(cdb)?;
            (c[1], usize::from(c[4]))
        };
        if flags & MODE_SELECT_SP != 0 {
            return Err(INVALID_FIELD);
        }
        if len == 0 {
            return Ok(Response::good());
        }
        if flags & MODE_SELECT_PF == 0 {
            return Err(INVALID_FIELD);
        }
        if len > MAX_MODE_SELECT_LEN || len > data_len as usize {
            return Err(PARAMETER_LENGTH);
        }
        let list = data_out.get(..len).ok_or(PARAMETER_LENGTH)?;

        let (header_len, medium_type, descriptors_len, long) = if ten {
            let h = list.get(..8).ok_or(PARAMETER_LENGTH)?;
            (8, h[2], be16(&h[6..]), h[4] & HEADER_LONGLBA != 0)
        } else {
            let h = list.get(..4).ok_or(PARAMETER_LENGTH)?;
            (4, h[1], usize::from(h[3]), false)
        };
        if medium_type != 0 {
            return Err(INVALID_PARAMETER);
        }
        let rest = &list[header_len..];
        let descriptors = rest.get(..descriptors_len).ok_or(PARAMETER_LENGTH)?;
        self.check_block_descriptors(descriptors, long)?;

        let mut write_cache = self.state.write_cache();
        let mut pages = &rest[descriptors_len..];
        while !pages.is_empty() {
            if pages.len() < 2 {
                return Err(PARAMETER_LENGTH);
            }
            if pages[0] & PAGE_SPF != 0 {
                return Err(INVALID_PARAMETER);
            }
            let page = pages
                .get(..2 + usize::from(pages[1]))
                .ok_or(PARAMETER_LENGTH)?;
            // PS (bit 7 of byte 0) is reserved in MODE SELECT.
            let code = page[0] & mode_page::PAGE_CODE_MASK;
            let body = &page[1..];
            match code {
                mode_page::CACHING => {
                    let current = self.caching_page(mode_page::PC_CURRENT);
                    let expected = &current.as_bytes()[1..];
                    if body.len() != expected.len() {
                        return Err(INVALID_PARAMETER);
                    }
                    let differs = body.iter().zip(expected).enumerate().any(|(i, (&b, &e))| {
                        let mask = if i == 1 { !CACHING_WCE } else { 0xff };
                        (b ^ e) & mask != 0
                    });
                    if differs {
                        return Err(INVALID_PARAMETER);
                    }
                    write_cache = body[1] & CACHING_WCE != 0;
                }
                mode_page::CONTROL => {
                    let current = Self::control_page(mode_page::PC_CURRENT);
                    if body != &current.as_bytes()[1..] {
                        return Err(INVALID_PARAMETER);
                    }
                }
                _ => return Err(INVALID_PARAMETER),
            }
            pages = &pages[page.len()..];
        }
        self.state.set_write_cache(write_cache);
        Ok(Response::good())
    }

    /// Block descriptors of MODE SELECT may only restate the block length; their number of
    /// blocks is the capacity or 0 (unchanged).
    fn check_block_descriptors(&self, descriptors: &[u8], long: bool) -> Result<(), Check> {
        let size = if long {
            LONG_BLOCK_DESCRIPTOR_LEN
        } else {
            SHORT_BLOCK_DESCRIPTOR_LEN
        };
        if !descriptors.len().is_multiple_of(size) {
            return Err(PARAMETER_LENGTH);
        }
        for d in descriptors.chunks_exact(size) {
            let (blocks, block_size) = if long {
                let blocks = u64::from_be_bytes(d[..8].try_into().unwrap_or_default());
                let block_size = u32::from_be_bytes(d[12..16].try_into().unwrap_or_default());
                (blocks, block_size)
            } else {
                let blocks = u32::from_be_bytes(d[..4].try_into().unwrap_or_default());
                let capped = u32::try_from(self.info.blocks).unwrap_or(u32::MAX);
                let blocks = if blocks == capped {
                    self.info.blocks
                } else {
                    blocks.into()
                };
                (blocks, u32::from_be_bytes([0, d[5], d[6], d[7]]))
            };
            if block_size != self.info.block_size || (blocks != 0 && blocks != self.info.blocks) {
                return Err(INVALID_PARAMETER);
            }
        }
        Ok(())
    }
}
