//! safekit user space: the `safekitd` daemon and the `safekit` CLI share this
//! library.

pub mod config;
pub mod mirror;
