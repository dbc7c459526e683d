//! The ACPI tables a Linux guest reads to find its CPUs, interrupt controllers and the VMBus:
//! RSDP -> XSDT -> {FADT -> DSDT, MADT}, built with the rust-vmm `acpi_tables` crate.
//!
//! - FADT: a hardware-reduced platform (`HW_REDUCED_ACPI`: no PM timer, no SCI, no GPE
//!   blocks), with the sleep control/status registers at [`SLEEP_PORT`] (a write of
//!   SLP_TYP 5 | SLP_EN powers off, see [`is_power_off`]) and the reset register at port 0xCF9
//!   (value 6), so that `poweroff` and `reboot` in the guest end the VM.
//! - MADT: one enabled local APIC per vCPU (APIC id = VP index), the in-kernel IOAPIC.
//! - DSDT: `\_SB.VMBS`, the device `hv_vmbus` binds to (`_HID` "VMBus", `_CID` "VMBUS": the
//!   two ids in Linux's `vmbus_acpi_device_ids`), with a `_CRS` of one interrupt (on x86 the
//!   driver only records it; VMBus interrupts arrive on the SINT vector), and `\_S5_` for
//!   power-off.

use acpi_tables::aml;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;

/// Where the tables go: the RSDP first (16-byte aligned, inside the 0xE0000-0xFFFFF range an
/// ACPI OS scans), the other tables after it. The e820 map marks the range reserved.
pub const ACPI_BASE: u64 = 0xE_0000;
/// End of the range the tables may use.
pub const ACPI_END: u64 = 0x10_0000;
/// The FADT's sleep control and status register (one byte each, ports 0x3C0 and 0x3C1).
pub const SLEEP_PORT: u16 = 0x3C0;
/// The SLP_TYP value `\_S5_` names: written with SLP_EN to [`SLEEP_PORT`], it powers off.
pub const S5_SLP_TYP: u8 = 5;
/// The IOAPIC's MMIO base (KVM's in-kernel IOAPIC).
pub const IOAPIC_ADDR: u32 = 0xFEC0_0000;
/// The local APICs' MMIO base.
pub const LAPIC_ADDR: u32 = 0xFEE0_0000;
/// The interrupt in the VMBus device's `_CRS`.
pub const VMBUS_IRQ: u32 = 5;

const OEM_ID: [u8; 6] = *b"VMBUSS";
const OEM_TABLE: [u8; 8] = *b"VMBUSVM ";
const OEM_REVISION: u32 = 1;

/// The tables laid out from [`ACPI_BASE`]: each table's guest-physical address and bytes.
pub struct Tables {
    /// (address, bytes), the RSDP first.
    pub tables: Vec<(u64, Vec<u8>)>,
}

impl Tables {
    /// The RSDP's address (for `boot_params.acpi_rsdp_addr`).
    pub fn rsdp(&self) -> u64 {
        self.tables[0].0
    }

    /// The table with this signature ("RSD PTR " for the RSDP, else 4 bytes such as "DSDT").
    pub fn find(&self, signature: &[u8]) -> Option<&(u64, Vec<u8>)> {
        self.tables.iter().find(|(_, b)| b.starts_with(signature))
    }
}

fn bytes(t: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    t.to_aml_bytes(&mut v);
    v
}

/// The DSDT's AML: the VMBus device and `\_S5_`.
fn dsdt_aml() -> Vec<u8> {
    let irq = aml::Interrupt::new(true, true, false, false, VMBUS_IRQ);
    let crs = aml::ResourceTemplate::new(vec![&irq]);
    let hid = aml::Name::new("_HID".into(), &"VMBus");
    let cid = aml::Name::new("_CID".into(), &"VMBUS");
    let uid = aml::Name::new("_UID".into(), &aml::ZERO);
    let crs = aml::Name::new("_CRS".into(), &crs);
    let vmbus = aml::Device::new("\\_SB_.VMBS".into(), vec![&hid, &cid, &uid, &crs]);
    let slp = [S5_SLP_TYP, 0, 0, 0];
    let s5 = aml::Package::new(slp.iter().map(|b| b as &dyn Aml).collect());
    let s5 = aml::Name::new("_S5_".into(), &s5);
    let mut v = bytes(&vmbus);
    v.extend(bytes(&s5));
    v
}

/// Builds the tables for `vcpus` processors.
pub fn build(vcpus: u32) -> Tables {
    let mut dsdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE, OEM_REVISION);
    dsdt.append_slice(&dsdt_aml());
    let dsdt = dsdt.as_slice().to_vec();

    let mut madt = MADT::new(
        OEM_ID,
        OEM_TABLE,
        OEM_REVISION,
        LocalInterruptController::Address(LAPIC_ADDR),
    );
    for vp in 0..vcpus {
        // MAX_VCPUS is 64: the ids fit a byte.
        let id = vp as u8;
        madt.add_structure(ProcessorLocalApic::new(id, id, EnabledStatus::Enabled));
    }
    madt.add_structure(IoApic::new(0, IOAPIC_ADDR, 0));
    let madt = bytes(&madt);

    let align = |a: u64| a.next_multiple_of(16);
    let rsdp_at = ACPI_BASE;
    let xsdt_at = align(rsdp_at + Rsdp::len() as u64);
    // The XSDT holds two entries: its size is known before the others are placed.
    let xsdt_len = 36 + 2 * 8;
    let fadt_at = align(xsdt_at + xsdt_len);
    let dsdt_at = align(fadt_at + acpi_tables::fadt::FADT::len() as u64);
    let madt_at = align(dsdt_at + dsdt.len() as u64);

    let io = |port: u16| {
        GAS::new(
            AddressSpace::SystemIo,
            8,
            0,
            AccessSize::ByteAccess,
            port.into(),
        )
    };
    let mut fadt = FADTBuilder::new(OEM_ID, OEM_TABLE, OEM_REVISION)
        .dsdt_64(dsdt_at)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    fadt.sleep_control_reg = io(SLEEP_PORT);
    fadt.sleep_status_reg = io(SLEEP_PORT + 1);
    fadt.reset_reg = io(crate::vm::RESET_PORT);
    fadt.reset_value = 6;
    fadt.hypervisor_vendor_identity = u64::from_le_bytes(*b"VMBUSSHM").into();
    let fadt = bytes(&fadt.finalize());

    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE, OEM_REVISION);
    xsdt.add_entry(fadt_at);
    xsdt.add_entry(madt_at);
    let xsdt = bytes(&xsdt);
    debug_assert_eq!(xsdt.len() as u64, xsdt_len);

    let rsdp = bytes(&Rsdp::new(OEM_ID, xsdt_at));
    Tables {
        tables: vec![
            (rsdp_at, rsdp),
            (xsdt_at, xsdt),
            (fadt_at, fadt),
            (dsdt_at, dsdt),
            (madt_at, madt),
        ],
    }
}

/// Whether a byte written to [`SLEEP_PORT`] enters S5 (SLP_EN, bit 5, with SLP_TYP in bits
/// 2-4 equal to [`S5_SLP_TYP`]).
pub fn is_power_off(value: u8) -> bool {
    value & (1 << 5) != 0 && (value >> 2) & 7 == S5_SLP_TYP
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    fn u32_at(b: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
    }

    fn u64_at(b: &[u8], at: usize) -> u64 {
        u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
    }

    #[test]
    fn every_table_checksums_to_zero_and_states_its_length() {
        let t = build(4);
        let (_, rsdp) = t.find(b"RSD PTR ").unwrap();
        assert_eq!(rsdp.len(), 36);
        assert_eq!(sum(&rsdp[..20]), 0, "ACPI 1.0 checksum");
        assert_eq!(sum(rsdp), 0, "extended checksum");
        for sig in [b"XSDT", b"FACP", b"DSDT", b"APIC"] {
            let (at, b) = t.find(sig).unwrap();
            assert_eq!(sum(b), 0, "{} checksum", String::from_utf8_lossy(sig));
            assert_eq!(u32_at(b, 4) as usize, b.len());
            assert_eq!(at % 16, 0);
            assert!(*at >= ACPI_BASE && at + b.len() as u64 <= ACPI_END);
        }
        // No two tables overlap.
        let mut spans: Vec<_> = t
            .tables
            .iter()
            .map(|(a, b)| (*a, a + b.len() as u64))
            .collect();
        spans.sort();
        assert!(spans.windows(2).all(|w| w[0].1 <= w[1].0));
    }

    #[test]
    fn the_pointers_lead_from_the_rsdp_to_every_table() {
        let t = build(2);
        let (_, rsdp) = t.find(b"RSD PTR ").unwrap();
        assert_eq!(rsdp[15], 2, "revision 2: the XSDT is used");
        let xsdt_at = u64_at(rsdp, 24);
        let (at, xsdt) = t.find(b"XSDT").unwrap();
        assert_eq!(*at, xsdt_at);
        let entries: Vec<u64> = (36..xsdt.len())
            .step_by(8)
            .map(|o| u64_at(xsdt, o))
            .collect();
        let (fadt_at, fadt) = t.find(b"FACP").unwrap();
        let (madt_at, _) = t.find(b"APIC").unwrap();
        assert_eq!(entries, vec![*fadt_at, *madt_at]);
        // X_DSDT at offset 140, flags at 112: HW_REDUCED_ACPI (bit 20) and RESET_REG_SUP.
        let (dsdt_at, _) = t.find(b"DSDT").unwrap();
        assert_eq!(u64_at(fadt, 140), *dsdt_at);
        let flags = u32_at(fadt, 112);
        assert_ne!(flags & (1 << 20), 0, "HW_REDUCED_ACPI");
        assert_ne!(flags & (1 << 10), 0, "RESET_REG_SUP");
        // RESET_REG: system I/O, port 0xCF9, value 6.
        assert_eq!(fadt[116], 1);
        assert_eq!(u64_at(fadt, 120), 0xCF9);
        assert_eq!(fadt[128], 6);
        // SLEEP_CONTROL_REG (offset 244): system I/O at SLEEP_PORT.
        assert_eq!(fadt[244], 1);
        assert_eq!(u64_at(fadt, 248), u64::from(SLEEP_PORT));
    }

    #[test]
    fn madt_lists_each_vcpu_and_the_ioapic() {
        let t = build(3);
        let (_, madt) = t.find(b"APIC").unwrap();
        assert_eq!(u32_at(madt, 36), LAPIC_ADDR);
        let mut at = 44;
        let mut apics = Vec::new();
        let mut ioapics = Vec::new();
        while at < madt.len() {
            let (kind, len) = (madt[at], madt[at + 1] as usize);
            match kind {
                0 => {
                    assert_eq!(len, 8);
                    assert_eq!(u32_at(madt, at + 4) & 1, 1, "enabled");
                    apics.push((madt[at + 2], madt[at + 3]));
                }
                1 => {
                    assert_eq!(len, 12);
                    ioapics.push((u32_at(madt, at + 4), u32_at(madt, at + 8)));
                }
                k => panic!("unexpected MADT structure {k}"),
            }
            at += len;
        }
        assert_eq!(at, madt.len());
        assert_eq!(apics, vec![(0, 0), (1, 1), (2, 2)]);
        assert_eq!(ioapics, vec![(IOAPIC_ADDR, 0)]);
    }

    /// Finds `Name(NAME, ...)` in AML: NameOp (0x08) then the 4-byte name; returns what
    /// follows.
    fn name<'a>(aml: &'a [u8], n: &[u8; 4]) -> &'a [u8] {
        let pat = [&[0x08u8][..], n].concat();
        let at = aml
            .windows(5)
            .position(|w| w == pat.as_slice())
            .unwrap_or_else(|| panic!("no Name({})", String::from_utf8_lossy(n)));
        &aml[at + 5..]
    }

    #[test]
    fn dsdt_has_the_vmbus_device_linux_matches() {
        let t = build(1);
        let (_, dsdt) = t.find(b"DSDT").unwrap();
        let aml = &dsdt[36..];
        // Device (ExtOp 0x5B, DeviceOp 0x82) named \_SB_.VMBS (root, DualNamePrefix path).
        let dev = aml
            .windows(2)
            .position(|w| w == [0x5B, 0x82])
            .expect("a Device");
        let path = [&b"\\\x2E"[..], b"_SB_VMBS"].concat();
        assert!(aml[dev..dev + 16].windows(10).any(|w| w == path.as_slice()));
        // _HID and _CID: strings (StringPrefix 0x0D), NUL-terminated; hv_vmbus matches both.
        assert!(name(aml, b"_HID").starts_with(b"\x0DVMBus\0"));
        assert!(name(aml, b"_CID").starts_with(b"\x0DVMBUS\0"));
        // _CRS: a buffer (0x11) holding one Extended Interrupt descriptor (0x89, length 6,
        // consumer + edge, one interrupt, VMBUS_IRQ) and the end tag (0x79, 0).
        let crs = name(aml, b"_CRS");
        assert_eq!(crs[0], 0x11, "BufferOp");
        let desc = [0x89, 6, 0, 0b11, 1];
        let at = crs
            .windows(5)
            .position(|w| w == desc)
            .expect("the interrupt descriptor");
        assert_eq!(u32_at(crs, at + 5), VMBUS_IRQ);
        assert_eq!(&crs[at + 9..at + 11], &[0x79, 0]);
        // _S5_: a package whose first element is the SLP_TYP the sleep port checks.
        let s5 = name(aml, b"_S5_");
        assert_eq!(s5[0], 0x12, "PackageOp");
        // PkgLength, NumElements 4, then BytePrefix (0x0A) and the value.
        assert_eq!(&s5[2..5], &[4, 0x0A, S5_SLP_TYP]);
    }

    #[test]
    fn only_slp_en_with_s5_powers_off() {
        assert!(is_power_off((S5_SLP_TYP << 2) | 0x20));
        assert!(!is_power_off(S5_SLP_TYP << 2), "SLP_EN clear");
        assert!(!is_power_off((3 << 2) | 0x20), "another sleep state");
        assert!(!is_power_off(0));
    }
}
