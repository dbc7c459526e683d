//! The [`open_enum!`] macro.

/// Declares an open enum: a transparent newtype over an integer with named constants.
///
/// Unlike a Rust `enum`, any integer is a valid value, so a value read from the wire never has to
/// be rejected at parse time; code matches on the named constants and answers the rest.
///
/// ```
/// vmbus_proto::open_enum! {
///     /// A colour.
///     pub enum Colour: u16 {
///         /// Red.
///         RED = 1,
///         /// Green.
///         GREEN = 2,
///     }
/// }
/// assert_eq!(Colour::RED.0, 1);
/// assert_eq!(format!("{:?}", Colour(2)), "GREEN");
/// assert_eq!(format!("{:?}", Colour(9)), "Colour(0x9)");
/// ```
#[macro_export]
macro_rules! open_enum {
    // Internal arm: `$extra` are additional derives (`Unaligned` for byte-sized enums).
    (
        @impl [$($extra:path),*]
        $(#[$meta:meta])*
        $vis:vis enum $name:ident : $ty:ty {
            $(
                $(#[$vmeta:meta])*
                $variant:ident = $value:expr
            ),* $(,)?
        }
    ) => {
        $(#[$meta])*
        #[repr(transparent)]
        #[derive(
            Copy, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Default,
            $crate::__zerocopy::FromBytes,
            $crate::__zerocopy::IntoBytes,
            $crate::__zerocopy::Immutable,
            $crate::__zerocopy::KnownLayout,
            $($extra),*
        )]
        #[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
        $vis struct $name(pub $ty);

        #[allow(missing_docs)]
        impl $name {
            $(
                $(#[$vmeta])*
                pub const $variant: $name = $name($value);
            )*

            /// The name of this value, or `None` if it is not one of the named constants.
            pub const fn name(self) -> Option<&'static str> {
                match self.0 {
                    $(
                        v if v == $value => Some(stringify!($variant)),
                    )*
                    _ => None,
                }
            }
        }

        impl ::core::fmt::Debug for $name {
            fn fmt(&self, f: &mut ::core::fmt::Formatter<'_>) -> ::core::fmt::Result {
                match self.name() {
                    Some(n) => f.write_str(n),
                    None => write!(f, "{}({:#x})", stringify!($name), self.0),
                }
            }
        }

        impl From<$ty> for $name {
            fn from(v: $ty) -> Self {
                $name(v)
            }
        }

        impl From<$name> for $ty {
            fn from(v: $name) -> $ty {
                v.0
            }
        }
    };
    // Byte-sized enums are also `Unaligned`, so packed and byte-order structs can hold them.
    (
        $(#[$meta:meta])*
        $vis:vis enum $name:ident : u8 { $($body:tt)* }
    ) => {
        $crate::open_enum! {
            @impl [$crate::__zerocopy::Unaligned]
            $(#[$meta])*
            $vis enum $name : u8 { $($body)* }
        }
    };
    (
        $(#[$meta:meta])*
        $vis:vis enum $name:ident : $ty:ty { $($body:tt)* }
    ) => {
        $crate::open_enum! {
            @impl []
            $(#[$meta])*
            $vis enum $name : $ty { $($body)* }
        }
    };
}
