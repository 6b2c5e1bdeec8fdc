//! Farm module (SPEC §6).

pub mod assign;
pub mod filter;
pub mod membership;
