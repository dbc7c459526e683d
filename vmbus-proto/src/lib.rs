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

/// Implements `arbitrary::Arbitrary` for plain-data types by filling their bytes (zero-padded
/// when the input runs out); used for types holding zerocopy byte-order integers, which do not
/// implement `Arbitrary` themselves.
macro_rules! arbitrary_from_bytes {
    ($($t:ty),* $(,)?) => {
        $(
            #[cfg(feature = "arbitrary")]
            impl<'a> arbitrary::Arbitrary<'a> for $t {
                fn arbitrary(u: &mut arbitrary::Unstructured<'a>) -> arbitrary::Result<Self> {
                    let mut bytes = [0u8; size_of::<$t>()];
                    u.fill_buffer(&mut bytes)?;
                    <$t as zerocopy::FromBytes>::read_from_bytes(&bytes[..])
                        .map_err(|_| arbitrary::Error::IncorrectFormat)
                }

                fn size_hint(_depth: usize) -> (usize, Option<usize>) {
                    (size_of::<$t>(), Some(size_of::<$t>()))
                }
            }
        )*
    };
}

pub mod channel;
pub mod netvsp;
pub mod partition;
pub mod ring;
pub mod rndis;
pub mod storvsp;
pub mod synic;

#[doc(hidden)]
pub use zerocopy as __zerocopy;
