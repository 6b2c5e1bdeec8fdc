//! nftables expressions built attribute by attribute over `nftnl-sys`.
//!
//! The `nftnl` crate covers a fixed subset of expressions, always loading
//! into register 1. The farm filter needs more: the `hash` (jhash)
//! expression, loads into chosen 32-bit registers (a concatenation is two
//! adjacent registers), `objref` to named counters, `meta set` and payload
//! writes. One small [`Expr`] type carries an expression name and its
//! attributes; the constructors below name what each one does in `nft`
//! syntax.

use std::{
    ffi::{CStr, CString},
    ptr::NonNull,
};

use nftnl::{Rule, expr::Expression};
use nftnl_sys as sys;

/// A 32-bit data register (`NFT_REG32_00` + n). Concatenations take
/// adjacent ones, each component padded to 4 bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Reg(u32);

/// `NFT_REG32_00`.
pub(crate) const R0: Reg = Reg(8);
/// `NFT_REG32_01`.
pub(crate) const R1: Reg = Reg(9);
/// The verdict register (`NFT_REG_VERDICT`).
const VERDICT_REG: u32 = 0;

/// Where a payload offset counts from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Base {
    /// `@ll`: the Ethernet header.
    Link = 0,
    /// `@nh`: the IP header.
    Network = 1,
    /// `@th`: the TCP/UDP header (only when the IP header is valid and the
    /// packet is not a non-first fragment).
    Transport = 2,
}

/// `meta` keys used here (`enum nft_meta_keys`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum MetaKey {
    /// `meta protocol`: the Ethernet type (`skb->protocol`), 2 bytes.
    Protocol = 1,
    /// `meta mark`: `skb->mark`, 4 bytes (host order).
    Mark = 3,
    /// `meta iif`: the input interface index, 4 bytes (host order).
    Iif = 4,
    /// `meta nfproto`: IPv4 or IPv6 in an `inet` table, 1 byte.
    NfProto = 15,
    /// `meta l4proto`: the transport protocol, 1 byte.
    L4Proto = 16,
    /// `meta pkttype`: host, broadcast, multicast, other host; 1 byte.
    PktType = 19,
}

/// Comparison operators (`enum nft_cmp_ops`); the kernel compares the
/// register and the data as byte strings (`memcmp`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Cmp {
    /// `==`.
    Eq = 0,
    /// `!=`.
    Neq = 1,
    /// `<`.
    Lt = 2,
    /// `>=`.
    Gte = 5,
}

/// Final verdicts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// `accept`: at the ingress hook, on to the stack.
    Accept,
    /// `drop`.
    Drop,
    /// `jump <chain>`.
    Jump(CString),
}

/// `NFT_OBJECT_COUNTER`.
pub(crate) const OBJECT_COUNTER: u32 = 1;

#[derive(Debug, Clone)]
enum Attr {
    U32(u32, u32),
    Str(u32, CString),
    Data(u32, Vec<u8>),
}

/// One expression: a name (`payload`, `cmp`, `hash`...) and its attributes.
#[derive(Debug, Clone)]
pub(crate) struct Expr {
    name: &'static CStr,
    attrs: Vec<Attr>,
}

fn attr16(a: u32) -> u16 {
    // Attribute numbers of libnftnl are small enums.
    u16::try_from(a).unwrap_or(u16::MAX)
}

fn len32(data: &[u8]) -> u32 {
    // Expression data is at most a few registers long.
    u32::try_from(data.len()).unwrap_or(u32::MAX)
}

impl Expression for Expr {
    fn to_expr(&self, _rule: &Rule) -> NonNull<sys::nftnl_expr> {
        // SAFETY: `name` is a NUL-terminated expression name; libnftnl
        // returns a fresh expression or NULL (out of memory).
        let raw = unsafe { sys::nftnl_expr_alloc(self.name.as_ptr()) };
        let Some(e) = NonNull::new(raw) else {
            // As nftnl itself does: nothing sensible is left to do.
            std::process::abort();
        };
        for a in &self.attrs {
            match a {
                // SAFETY: `e` is a live expression; libnftnl copies the
                // value (integers, strings with strdup, data with memcpy),
                // so borrowing our buffers for the call is enough.
                Attr::U32(k, v) => unsafe { sys::nftnl_expr_set_u32(e.as_ptr(), attr16(*k), *v) },
                // SAFETY: as above; `s` is NUL-terminated.
                Attr::Str(k, s) => unsafe {
                    sys::nftnl_expr_set_str(e.as_ptr(), attr16(*k), s.as_ptr());
                },
                // SAFETY: as above; `d` is valid for `d.len()` bytes.
                Attr::Data(k, d) => unsafe {
                    sys::nftnl_expr_set(e.as_ptr(), attr16(*k), d.as_ptr().cast(), len32(d));
                },
            }
        }
        e
    }
}

impl Expr {
    fn new(name: &'static CStr) -> Self {
        Self {
            name,
            attrs: Vec::new(),
        }
    }

    fn u32(mut self, attr: u32, v: u32) -> Self {
        self.attrs.push(Attr::U32(attr, v));
        self
    }

    fn data(mut self, attr: u32, d: &[u8]) -> Self {
        self.attrs.push(Attr::Data(attr, d.to_vec()));
        self
    }

    fn str(mut self, attr: u32, s: &CStr) -> Self {
        self.attrs.push(Attr::Str(attr, s.to_owned()));
        self
    }
}

/// `@base,offset*8,len*8` loaded into `dreg` (zero-padded to 4 bytes).
pub(crate) fn load(base: Base, offset: u32, len: u32, dreg: Reg) -> Expr {
    Expr::new(c"payload")
        .u32(sys::NFTNL_EXPR_PAYLOAD_DREG, dreg.0)
        .u32(sys::NFTNL_EXPR_PAYLOAD_BASE, base as u32)
        .u32(sys::NFTNL_EXPR_PAYLOAD_OFFSET, offset)
        .u32(sys::NFTNL_EXPR_PAYLOAD_LEN, len)
}

/// Writes `len` bytes of `sreg` at `offset` of the Ethernet header (no
/// checksum to fix: the IP header is untouched).
pub(crate) fn write_link(offset: u32, len: u32, sreg: Reg) -> Expr {
    Expr::new(c"payload")
        .u32(sys::NFTNL_EXPR_PAYLOAD_SREG, sreg.0)
        .u32(sys::NFTNL_EXPR_PAYLOAD_BASE, Base::Link as u32)
        .u32(sys::NFTNL_EXPR_PAYLOAD_OFFSET, offset)
        .u32(sys::NFTNL_EXPR_PAYLOAD_LEN, len)
        .u32(sys::NFTNL_EXPR_PAYLOAD_CSUM_TYPE, 0)
}

/// `meta <key>` loaded into `dreg`.
pub(crate) fn meta(key: MetaKey, dreg: Reg) -> Expr {
    Expr::new(c"meta")
        .u32(sys::NFTNL_EXPR_META_KEY, key as u32)
        .u32(sys::NFTNL_EXPR_META_DREG, dreg.0)
}

/// `meta <key> set` from `sreg`.
pub(crate) fn meta_set(key: MetaKey, sreg: Reg) -> Expr {
    Expr::new(c"meta")
        .u32(sys::NFTNL_EXPR_META_KEY, key as u32)
        .u32(sys::NFTNL_EXPR_META_SREG, sreg.0)
}

/// Compares `sreg` with `data` (as many bytes as `data` has).
pub(crate) fn cmp(sreg: Reg, op: Cmp, data: &[u8]) -> Expr {
    Expr::new(c"cmp")
        .u32(sys::NFTNL_EXPR_CMP_SREG, sreg.0)
        .u32(sys::NFTNL_EXPR_CMP_OP, op as u32)
        .data(sys::NFTNL_EXPR_CMP_DATA, data)
}

/// `reg = (reg & mask) ^ 0` over `mask.len()` bytes.
pub(crate) fn and(reg: Reg, mask: &[u8]) -> Expr {
    Expr::new(c"bitwise")
        .u32(sys::NFTNL_EXPR_BITWISE_SREG, reg.0)
        .u32(sys::NFTNL_EXPR_BITWISE_DREG, reg.0)
        .u32(sys::NFTNL_EXPR_BITWISE_LEN, len32(mask))
        .data(sys::NFTNL_EXPR_BITWISE_MASK, mask)
        .data(sys::NFTNL_EXPR_BITWISE_XOR, &vec![0; mask.len()])
}

/// `jhash <len bytes from sreg> mod <modulus> seed <seed>` into `dreg`:
/// the kernel computes `reciprocal_scale(jhash(data, len, seed), modulus)`.
/// The seed is always given: without it the kernel picks a random one.
pub(crate) fn jhash(sreg: Reg, len: u32, modulus: u32, seed: u32, dreg: Reg) -> Expr {
    Expr::new(c"hash")
        .u32(sys::NFTNL_EXPR_HASH_TYPE, 0) // NFT_HASH_JENKINS
        .u32(sys::NFTNL_EXPR_HASH_SREG, sreg.0)
        .u32(sys::NFTNL_EXPR_HASH_DREG, dreg.0)
        .u32(sys::NFTNL_EXPR_HASH_LEN, len)
        .u32(sys::NFTNL_EXPR_HASH_MODULUS, modulus)
        .u32(sys::NFTNL_EXPR_HASH_SEED, seed)
        .u32(sys::NFTNL_EXPR_HASH_OFFSET, 0)
}

/// `<sreg> @set`: the rule goes on only when the key is in the set.
pub(crate) fn lookup(sreg: Reg, set: &CStr, set_id: u32) -> Expr {
    Expr::new(c"lookup")
        .u32(sys::NFTNL_EXPR_LOOKUP_SREG, sreg.0)
        .str(sys::NFTNL_EXPR_LOOKUP_SET, set)
        .u32(sys::NFTNL_EXPR_LOOKUP_SET_ID, set_id)
}

/// `counter name <name>`: counts into a named counter object of the table.
pub(crate) fn counter_ref(name: &CStr) -> Expr {
    Expr::new(c"objref")
        .u32(sys::NFTNL_EXPR_OBJREF_IMM_TYPE, OBJECT_COUNTER)
        .str(sys::NFTNL_EXPR_OBJREF_IMM_NAME, name)
}

/// An anonymous `counter` (its packets show in `nft list`).
pub(crate) fn counter() -> Expr {
    Expr::new(c"counter")
}

/// Loads constant bytes into `dreg`.
pub(crate) fn immediate(dreg: Reg, data: &[u8]) -> Expr {
    Expr::new(c"immediate")
        .u32(sys::NFTNL_EXPR_IMM_DREG, dreg.0)
        .data(sys::NFTNL_EXPR_IMM_DATA, data)
}

/// The rule's verdict.
pub(crate) fn verdict(v: &Verdict) -> Expr {
    let e = Expr::new(c"immediate").u32(sys::NFTNL_EXPR_IMM_DREG, VERDICT_REG);
    match v {
        Verdict::Accept => e.u32(sys::NFTNL_EXPR_IMM_VERDICT, 1), // NF_ACCEPT
        Verdict::Drop => e.u32(sys::NFTNL_EXPR_IMM_VERDICT, 0),   // NF_DROP
        Verdict::Jump(chain) => e
            .u32(sys::NFTNL_EXPR_IMM_VERDICT, libc::NFT_JUMP.cast_unsigned())
            .str(sys::NFTNL_EXPR_IMM_CHAIN, chain),
    }
}
