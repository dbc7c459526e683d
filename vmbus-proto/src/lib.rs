//! Wire formats of the VMBus paravirtual I/O stack, laid out byte for byte as Linux and Hyper-V
//! lay them out.
//!
//! Every struct is `#[repr(C)]` (or `packed` where the C type is), derives zerocopy's traits,
//! and carries a compile-time size assertion. Values that come off the wire as enumerations are
//! *open enums* (see [`open_enum!`]): a newtype over the integer with named constants, so an
//! unknown value from a hostile peer is representable and can be answered, never a panic.
//!
//! This crate does no I/O and contains no unsafe code.

#![forbid(unsafe_code)]

#[macro_use]
mod open_enum;

pub mod ring;

#[doc(hidden)]
pub use zerocopy as __zerocopy;
