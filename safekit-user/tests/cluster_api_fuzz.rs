//! The REST API fuzzed from its own `OpenAPI` document with schemathesis
//! (`PyPI`, installed by `cargo xtask setup` in `target/schemathesis-venv`),
//! against two real daemons (`skap4`, 10.77.144.0/24): with an admin API
//! key (every operation, control verbs included: schemathesis finds the
//! module's name and runs them) and with a monitor key. No 5xx, every
//! answer conforms to the document (status code, content type, body
//! schema), schema-invalid requests are rejected with a 4xx; the daemons
//! still answer; and after the monitor's run, whose state-changing
//! requests are all rejected, nothing changed (module states and colours,
//! configuration files, users and keys). The event stream (which never
//! ends) is left out, and so is `config/apply`, which answers 501 until
//! `safekit config apply` exists; `cluster_api.rs` covers both.
//! `SAFEKIT_FUZZ_EXAMPLES` (default 30) sets the examples per operation.

mod common;

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use common::{LabModule, lab::bin_dir, serial, wait_for};

fn module() -> LabModule {
    LabModule {
        name: "web".into(),
        toml: r#"[service]
mode = "mirror"
defaultprim = "node1"

[heart]
pulse = "100ms"
timeout = "1s"
"#
        .into(),
        scripts: vec![],
    }
}

fn venv() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/schemathesis-venv/bin/schemathesis")
}

/// Everything the fuzzing must not change.
fn snapshot(lab: &common::Lab) -> Vec<String> {
    let mut out = Vec::new();
    for i in 1..=2 {
        let st = common::status(lab, i);
        for m in &st.modules {
            out.push(format!("node{i} {} {} {:?}", m.name, m.state, m.colour));
        }
        let etc = lab.root(i).join("etc/safekit");
        for f in [
            "cluster.toml",
            "modules/web/module.toml",
            "users.toml",
            "apikeys.toml",
        ] {
            out.push(std::fs::read_to_string(etc.join(f)).unwrap_or_default());
        }
    }
    out
}

/// Makes an API key on node 1; its token.
fn apikey(lab: &common::Lab, role: &str) -> String {
    let out = Command::new(bin_dir().join("safekit"))
        .arg("--root")
        .arg(lab.root(1))
        .args(["apikey", "create", "--role", role, "--name", role])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .unwrap()
        .trim()
        .to_owned()
}

/// Runs schemathesis from the client namespace with this token; its
/// output. Fails the test on any failure it reports.
fn fuzz(lab: &common::Lab, doc: &Path, base: &str, token: &str) -> String {
    let examples = std::env::var("SAFEKIT_FUZZ_EXAMPLES").unwrap_or_else(|_| "30".into());
    let out = Command::new("ip")
        .args(["netns", "exec", &lab.spec().client_ns()])
        .arg(venv())
        .args(["--no-color", "run"])
        .arg(doc)
        .args(["--url", base])
        .args(["-H", &format!("Authorization: Bearer {token}")])
        .args([
            "--checks",
            "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance,negative_data_rejection",
            "--phases",
            "examples,coverage,fuzzing",
            "--exclude-path",
            "/api/v1/events",
            // Answers 501 by design until `safekit config apply` exists
            // (cluster_api.rs checks that answer).
            "--exclude-path",
            "/api/v1/config/apply",
            "--workers",
            "1",
            "--max-examples",
            &examples,
            "--seed",
            "10",
            "--request-timeout",
            "50",
        ])
        .current_dir(lab.dir())
        .output()
        .expect("running schemathesis");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{text}");
    assert!(out.status.success(), "schemathesis found failures:\n{text}");
    text
}

#[test]
fn api_fuzzed_from_its_openapi_document() {
    let _g = serial();
    assert!(
        venv().exists(),
        "{} is missing: run cargo xtask setup",
        venv().display()
    );
    let mut lab = common::lab("skap4", 144, 2, vec![module()]);
    let admin = apikey(&lab, "admin");
    let monitor = apikey(&lab, "monitor");
    std::fs::copy(
        lab.root(1).join("etc/safekit/apikeys.toml"),
        lab.root(2).join("etc/safekit/apikeys.toml"),
    )
    .unwrap();
    lab.start_daemon(1).unwrap();
    lab.start_daemon(2).unwrap();
    for i in 1..=2 {
        assert!(
            lab.safekit(i, &["start", "-m", "web"])
                .unwrap()
                .status
                .success()
        );
    }
    let lq = |i: usize| {
        lab.safekit(i, &["state", "-m", "web", "-lq"])
            .unwrap()
            .status
            .code()
    };
    assert!(
        wait_for(Duration::from_secs(20), || lq(1) == Some(3)
            && lq(2) == Some(4))
        .is_some(),
        "PRIM/SECOND"
    );

    let base = format!("http://{}:9010", lab.spec().node_addr(1));
    let doc = lab.dir().join("openapi.json");
    let out = lab
        .exec(
            &lab.spec().client_ns(),
            &[
                "curl",
                "-sSf",
                "-H",
                &format!("Authorization: Bearer {admin}"),
                "-o",
                doc.to_str().unwrap(),
                &format!("{base}/api/v1/openapi.json"),
            ],
        )
        .unwrap();
    assert!(out.status.success(), "{out:?}");

    // An admin: every operation, verbs included (schemathesis finds the
    // module's name and runs real verbs: states change, legitimately).
    let text = fuzz(&lab, &doc, &base, &admin);
    assert!(text.contains("passed"), "{text}");
    for i in 1..=2 {
        let st = common::status(&lab, i);
        assert_eq!(st.node, format!("node{i}"), "node{i} still answers");
    }

    // A monitor: every state-changing request is rejected, and nothing
    // changes.
    let before = snapshot(&lab);
    let text = fuzz(&lab, &doc, &base, &monitor);
    assert!(text.contains("passed"), "{text}");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        snapshot(&lab),
        before,
        "rejected requests changed the cluster"
    );
    assert!(lab.daemon_pid(1).is_some() && lab.daemon_pid(2).is_some());
    drop(lab);
}
