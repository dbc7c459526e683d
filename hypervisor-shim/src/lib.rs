//! The hypervisor shim: a thin VMM over KVM that lets an unmodified Linux guest find the VMBus
//! devices served by `vspd`.
//!
//! Not filled in yet. It will hold: guest RAM in a memfd; the vCPU loop over kvm-ioctls; the
//! userspace Hyper-V interface (CPUID leaves, synthetic MSRs through the MSR filter, the
//! hypercall page whose `out` exits carry HvPostMessage and HvSignalEvent, SynIC message and
//! event delivery); Linux boot (bzImage, initrd, ACPI tables with the VMBus device); a 16550
//! console; and the front end of the partition socket that attaches the guest to `vspd`.
//! See `docs/ARCHITECTURE.md`.
