//! Runs the embedded mirror VIP lease program (`safekit_lease`, tcx) through
//! `BPF_PROG_TEST_RUN` on a table of frames: the verifier accepts it, an ARP
//! request for a leased VIP becomes the reply from the interface's MAC and
//! is redirected, IPv4 to a leased VIP gets the lease mark, everything else
//! goes on untouched. Needs root (`CAP_BPF`).

use aya::{
    maps::HashMap,
    programs::{SchedClassifier, TestRun as _, TestRunOptions},
};
use safekit::{ebpf, sys::lease::LEASE_PROGRAM};
use safekit_common::{
    PROTO_TCP, VipKey,
    lease::{LEASE_MARK, LeaseValue},
};

/// tcx verdicts.
const TCX_NEXT: u32 = u32::MAX;
const TCX_REDIRECT: u32 = 7;

const VIP: [u8; 4] = [10, 9, 1, 100];
const OTHER: [u8; 4] = [10, 9, 1, 101];
const IFMAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const IFINDEX: u32 = 1;
const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xcc];
const CLIENT_IP: [u8; 4] = [10, 9, 1, 250];
/// `sizeof(struct __sk_buff)` (Linux 5.16 and later), and where its `mark`
/// is.
const SKB_CTX: usize = 192;
const SKB_MARK: usize = 8;

fn arp(
    dst: [u8; 6],
    src: [u8; 6],
    op: u16,
    sha: [u8; 6],
    spa: [u8; 4],
    tha: [u8; 6],
    tpa: [u8; 4],
) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0x00, 6, 4]);
    f.extend_from_slice(&op.to_be_bytes());
    f.extend_from_slice(&sha);
    f.extend_from_slice(&spa);
    f.extend_from_slice(&tha);
    f.extend_from_slice(&tpa);
    f
}

fn request(tpa: [u8; 4]) -> Vec<u8> {
    arp([0xff; 6], CLIENT_MAC, 1, CLIENT_MAC, CLIENT_IP, [0; 6], tpa)
}

fn tcp_to(daddr: [u8; 4]) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&IFMAC);
    f.extend_from_slice(&CLIENT_MAC);
    f.extend_from_slice(&[0x08, 0x00]);
    f.extend_from_slice(&[0x45, 0, 0, 40, 0, 1, 0x40, 0, 64, PROTO_TCP, 0, 0]);
    f.extend_from_slice(&CLIENT_IP);
    f.extend_from_slice(&daddr);
    f.extend_from_slice(&[0x9c, 0x40, 0, 80]);
    f.extend_from_slice(&[0; 16]);
    f
}

/// A frame, the mark it comes with, and what the program must do.
struct Case {
    name: &'static str,
    frame: Vec<u8>,
    mark: u32,
    verdict: u32,
    /// Expected output frame (None: unchanged).
    output: Option<Vec<u8>>,
    /// Expected mark afterwards.
    mark_out: u32,
}

fn cases() -> Vec<Case> {
    let mut padded = request(VIP);
    padded.extend_from_slice(&[0; 18]);
    let mut padded_reply = arp(CLIENT_MAC, IFMAC, 2, IFMAC, VIP, CLIENT_MAC, CLIENT_IP);
    padded_reply.extend_from_slice(&[0; 18]);
    vec![
        Case {
            name: "ARP request for the leased VIP: the reply from the interface's MAC",
            frame: request(VIP),
            mark: 0,
            verdict: TCX_REDIRECT,
            output: Some(arp(CLIENT_MAC, IFMAC, 2, IFMAC, VIP, CLIENT_MAC, CLIENT_IP)),
            mark_out: 0,
        },
        Case {
            name: "padded ARP request (60 bytes): the padding is kept",
            frame: padded,
            mark: 0,
            verdict: TCX_REDIRECT,
            output: Some(padded_reply),
            mark_out: 0,
        },
        Case {
            name: "ARP request for another address: untouched",
            frame: request(OTHER),
            mark: 0,
            verdict: TCX_NEXT,
            output: None,
            mark_out: 0,
        },
        Case {
            name: "ARP reply about the VIP: untouched",
            frame: arp(IFMAC, CLIENT_MAC, 2, CLIENT_MAC, VIP, IFMAC, CLIENT_IP),
            mark: 0,
            verdict: TCX_NEXT,
            output: None,
            mark_out: 0,
        },
        Case {
            name: "truncated ARP request: untouched",
            frame: request(VIP)[..30].to_vec(),
            mark: 0,
            verdict: TCX_NEXT,
            output: None,
            mark_out: 0,
        },
        Case {
            name: "IPv4 to the leased VIP: lease mark set",
            frame: tcp_to(VIP),
            mark: 0,
            verdict: TCX_NEXT,
            output: None,
            mark_out: LEASE_MARK,
        },
        Case {
            name: "IPv4 to the leased VIP with a mark: the other bits kept",
            frame: tcp_to(VIP),
            mark: 0x5,
            verdict: TCX_NEXT,
            output: None,
            mark_out: 0x5 | LEASE_MARK,
        },
        Case {
            name: "IPv4 to another address: no mark",
            frame: tcp_to(OTHER),
            mark: 0,
            verdict: TCX_NEXT,
            output: None,
            mark_out: 0,
        },
    ]
}

#[test]
fn lease_answers_arp_for_its_vips_and_marks_their_traffic() {
    let mut bpf = ebpf::load().expect("loading the embedded eBPF object");
    let prog: &mut SchedClassifier = bpf
        .program_mut(LEASE_PROGRAM)
        .expect("program in object")
        .try_into()
        .expect("a tc program");
    prog.load().expect("verifier accepts the lease program");
    let mut vips: HashMap<_, VipKey, LeaseValue> =
        HashMap::try_from(bpf.map_mut("LEASE_VIPS").unwrap()).unwrap();
    vips.insert(
        &VipKey { addr: VIP },
        &LeaseValue {
            mac: IFMAC,
            pad: [0; 2],
            ifindex: IFINDEX,
        },
        0,
    )
    .unwrap();
    let prog: &SchedClassifier = bpf.program(LEASE_PROGRAM).unwrap().try_into().unwrap();
    let mut failures = Vec::new();
    for case in cases() {
        let mut ctx_in = [0u8; SKB_CTX];
        ctx_in[SKB_MARK..SKB_MARK + 4].copy_from_slice(&case.mark.to_ne_bytes());
        let mut ctx_out = [0u8; SKB_CTX];
        let mut out = vec![0u8; case.frame.len() + 256];
        let r = prog
            .test_run(TestRunOptions {
                data_in: Some(&case.frame),
                data_out: Some(&mut out),
                ctx_in: Some(&ctx_in),
                ctx_out: Some(&mut ctx_out),
                ..TestRunOptions::default()
            })
            .unwrap_or_else(|e| panic!("{}: test run failed: {e}", case.name));
        out.truncate(r.data_size_out as usize);
        let mark = u32::from_ne_bytes(ctx_out[SKB_MARK..SKB_MARK + 4].try_into().unwrap());
        if r.return_value != case.verdict {
            failures.push(format!(
                "{}: verdict {:#x}, expected {:#x}",
                case.name, r.return_value, case.verdict
            ));
        }
        let want = case.output.clone().unwrap_or_else(|| case.frame.clone());
        if out != want {
            failures.push(format!(
                "{}: output frame differs\n got {out:02x?}\nwant {want:02x?}",
                case.name
            ));
        }
        if mark != case.mark_out {
            failures.push(format!(
                "{}: mark {mark:#x}, expected {:#x}",
                case.name, case.mark_out
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
