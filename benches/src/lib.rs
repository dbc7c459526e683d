//! Criterion benches of the VMBus stack's I/O paths; see `benches/` beside this crate and the
//! comparison scripts. This library holds what the benches share.
