//! The REST API against real daemons (issue 10), with `curl` from the
//! client namespace:
//!
//! - `api_roles_verbs_proxy_and_swap` (`skap1`, 10.77.141.0/24): anonymous
//!   callers get 401 everywhere but `ready.txt` (and the console page);
//!   each role does exactly what it may (monitor reads and gets 403 on
//!   verbs, configuration check and snapshots; control runs verbs; admin
//!   checks configuration and downloads snapshots); every endpoint's
//!   success and error answers; a swap through the API exchanges the roles
//!   as `safekit swap` does; proxy mode reaches node2 from node1 with the
//!   caller's role enforced there; keys and users made on node1 work on
//!   node2 once its config dir has the same files.
//! - `api_security_sessions_and_tls` (`skap2`, 10.77.142.0/24): wrong
//!   passwords and the login rate limit, forged and expired session
//!   cookies, state-changing requests without (or with a wrong) CSRF token
//!   change nothing, cookie flags, proxy mode between nodes over HTTPS
//!   (node2's HTTP port closed), HTTPS with the certificates of `safekit
//!   certs init` (TLS 1.3 and 1.2 accepted, TLS 1.1 refused), the health
//!   check revealing nothing but ready / not ready.

mod common;

use std::{
    io::Write as _,
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use common::{Lab, LabModule, LabSpec, lab::bin_dir, serial, use_built_binaries, wait_for};

/// The mirror module `web`: no replicated directory, no VIP, short
/// timeouts, node1 primary by default.
fn web() -> LabModule {
    LabModule {
        name: "web".into(),
        toml: r#"[service]
mode = "mirror"
defaultprim = "node1"

[heart]
pulse = "100ms"
timeout = "1s"

[[check.tcp]]
host = "127.0.0.1"
port = 9010
interval = "1s"
timeout = "500ms"
"#
        .into(),
        scripts: vec![],
    }
}

fn lab_with(prefix: &str, subnet: u8, cluster_extra: &str) -> Lab {
    use_built_binaries();
    let spec = LabSpec {
        prefix: prefix.to_owned(),
        nodes: 2,
        subnet,
        modules: vec![web()],
        cluster_extra: cluster_extra.to_owned(),
    };
    Lab::up(
        spec,
        &std::path::PathBuf::from(format!("/tmp/safekit-test-{prefix}")),
    )
    .expect("lab up")
}

/// `safekit --root <node i> args` with `stdin` on its standard input.
fn safekit_stdin(lab: &Lab, node: usize, args: &[&str], stdin: &str) -> (i32, String, String) {
    let mut child = Command::new(bin_dir().join("safekit"))
        .arg("--root")
        .arg(lab.root(node))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn safekit");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Makes an API key on node 1; returns its token (the last line printed).
fn apikey(lab: &Lab, role: &str) -> String {
    let (code, out, err) = safekit_stdin(
        lab,
        1,
        &[
            "apikey",
            "create",
            "--role",
            role,
            "--name",
            &format!("{role}-key"),
        ],
        "",
    );
    assert_eq!(code, 0, "apikey create: {err}");
    let token = out.lines().last().unwrap().trim().to_owned();
    assert!(
        token.starts_with("skk_"),
        "token alone on the last line: {out}"
    );
    token
}

/// Copies node 1's users, keys and TLS files to node 2 (as an operator
/// copies the configuration directory).
fn copy_auth_to_node2(lab: &Lab) {
    let from = lab.root(1).join("etc/safekit");
    let to = lab.root(2).join("etc/safekit");
    for f in ["users.toml", "apikeys.toml"] {
        if from.join(f).exists() {
            std::fs::copy(from.join(f), to.join(f)).unwrap();
        }
    }
    if from.join("tls").exists() {
        let st = Command::new("cp")
            .arg("-a")
            .arg(from.join("tls"))
            .arg(&to)
            .status()
            .unwrap();
        assert!(st.success());
    }
}

/// One curl answer.
#[derive(Debug)]
struct Answer {
    code: u16,
    body: String,
    headers: String,
}

impl Answer {
    fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {} {}", self.code, self.body))
    }
}

/// `curl` from the client namespace: `args` then the URL.
fn curl(lab: &Lab, args: &[&str], url: &str) -> Answer {
    curl_in(lab, &lab.spec().client_ns(), args, url)
}

/// `curl` from namespace `ns`.
fn curl_in(lab: &Lab, ns: &str, args: &[&str], url: &str) -> Answer {
    let hdr = lab
        .dir()
        .join(format!("curl-headers-{}", std::process::id()));
    let out = lab
        .exec(
            ns,
            &[
                &["curl", "-sS", "--max-time", "45", "-D"],
                &[hdr.to_str().unwrap(), "-w", "\n%{http_code}"][..],
                args,
                &[url],
            ]
            .concat(),
        )
        .expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    Answer {
        code: code.trim().parse().unwrap_or(0),
        body: body.to_owned(),
        headers: std::fs::read_to_string(&hdr).unwrap_or_default(),
    }
}

fn url(lab: &Lab, node: usize, path: &str) -> String {
    format!("http://{}:9010{path}", lab.spec().node_addr(node))
}

fn bearer(token: &str) -> String {
    format!("Authorization: Bearer {token}")
}

fn get(lab: &Lab, node: usize, token: &str, path: &str) -> Answer {
    curl(lab, &["-H", &bearer(token)], &url(lab, node, path))
}

fn post(lab: &Lab, node: usize, token: &str, path: &str, body: &str) -> Answer {
    curl(
        lab,
        &[
            "-X",
            "POST",
            "-H",
            &bearer(token),
            "-H",
            "Content-Type: application/json",
            "--data-binary",
            body,
        ],
        &url(lab, node, path),
    )
}

/// `safekit state -m web -lq` exit code on node `i`.
fn lq(lab: &Lab, node: usize) -> i32 {
    lab.safekit(node, &["state", "-m", "web", "-lq"])
        .unwrap()
        .status
        .code()
        .unwrap_or(-1)
}

const STOP: i32 = 0;
const ALONE: i32 = 2;
const PRIM: i32 = 3;
const SECOND: i32 = 4;

fn wait_roles(lab: &Lab, n1: i32, n2: i32) -> bool {
    wait_for(Duration::from_secs(20), || {
        lq(lab, 1) == n1 && lq(lab, 2) == n2
    })
    .is_some()
}

/// The state of `web` in a `GET /api/v1/modules` answer.
fn api_state(a: &Answer) -> (String, String) {
    let v = a.json();
    let m = v
        .as_array()
        .and_then(|a| a.iter().find(|m| m["name"] == "web"))
        .unwrap_or_else(|| panic!("no web in {}", a.body));
    (
        m["state"].as_str().unwrap().to_owned(),
        m["colour"].as_str().unwrap().to_owned(),
    )
}

fn start_pair(lab: &mut Lab) {
    lab.start_daemon(1).unwrap();
    lab.start_daemon(2).unwrap();
    for i in 1..=2 {
        let out = lab.safekit(i, &["start", "-m", "web"]).unwrap();
        assert!(out.status.success(), "start: {out:?}");
    }
    assert!(wait_roles(lab, PRIM, SECOND), "PRIM/SECOND");
}

#[test]
#[expect(
    clippy::too_many_lines,
    reason = "one cluster, every role against every endpoint"
)]
fn api_roles_verbs_proxy_and_swap() {
    let _g = serial();
    // An [api] table with defaults: /metrics needs credentials.
    let mut lab = lab_with("skap1", 141, "\n[api]\n");
    let (code, _, err) = safekit_stdin(
        &lab,
        1,
        &[
            "user",
            "add",
            "alice",
            "--role",
            "admin",
            "--password-stdin",
        ],
        "alice's password\n",
    );
    assert_eq!(code, 0, "user add: {err}");
    let monitor = apikey(&lab, "monitor");
    let control = apikey(&lab, "control");
    let admin = apikey(&lab, "admin");
    let keys = std::fs::read_to_string(lab.root(1).join("etc/safekit/apikeys.toml")).unwrap();
    assert!(!keys.contains(&control[20..]), "tokens are stored hashed");
    copy_auth_to_node2(&lab);
    start_pair(&mut lab);

    // Anonymous: 401 everywhere but ready.txt and the console page.
    assert_eq!(
        curl(&lab, &[], &url(&lab, 1, "/var/modules/web/ready.txt")).code,
        200
    );
    assert_eq!(curl(&lab, &[], &url(&lab, 1, "/")).code, 200);
    for (method, path) in [
        ("GET", "/api/v1/modules"),
        ("GET", "/api/v1/modules/web"),
        ("GET", "/api/v1/status"),
        ("GET", "/api/v1/cluster"),
        ("GET", "/api/v1/modules/web/log"),
        ("GET", "/api/v1/modules/web/history"),
        ("GET", "/api/v1/config"),
        ("GET", "/api/v1/snapshot"),
        ("GET", "/api/v1/events"),
        ("GET", "/api/v1/openapi.json"),
        ("GET", "/api/v1/session"),
        ("GET", "/api/v1/nodes/node2/modules"),
        ("GET", "/metrics"),
        ("POST", "/api/v1/modules/web/stop"),
        ("POST", "/api/v1/modules/web/swap"),
        ("POST", "/api/v1/config/check"),
        ("POST", "/api/v1/config/apply"),
        ("POST", "/api/v1/logout"),
    ] {
        let a = curl(&lab, &["-X", method], &url(&lab, 1, path));
        assert_eq!(a.code, 401, "anonymous {method} {path}: {a:?}");
        assert!(a.json()["error"].is_string(), "JSON error body");
    }
    let wrong = get(&lab, 1, "skk_00000000_forged", "/api/v1/modules");
    assert_eq!(wrong.code, 401, "a forged key");
    assert_eq!(lq(&lab, 1), PRIM, "nothing changed");

    // Monitor: reads everything, 403 on verbs, configuration check, snapshot.
    let a = get(&lab, 1, &monitor, "/api/v1/modules");
    assert_eq!(a.code, 200, "{a:?}");
    assert_eq!(api_state(&a), ("PRIM".into(), "green".into()));
    let a = get(&lab, 2, &monitor, "/api/v1/modules");
    assert_eq!(
        api_state(&a),
        ("SECOND".into(), "green".into()),
        "key valid on node2"
    );
    let m = get(&lab, 1, &monitor, "/api/v1/modules/web").json();
    assert_eq!(m["peers"][0]["node"], "node2");
    assert_eq!(m["peers"][0]["state"], "SECOND");
    assert_eq!(get(&lab, 1, &monitor, "/api/v1/modules/nope").code, 404);
    let c = get(&lab, 1, &monitor, "/api/v1/cluster").json();
    assert_eq!(c["node"], "node1");
    assert_eq!(c["nodes"].as_array().unwrap().len(), 2);
    assert_eq!(
        get(&lab, 1, &monitor, "/api/v1/status").json()["node"],
        "node1"
    );
    let doc = get(&lab, 1, &monitor, "/api/v1/openapi.json").json();
    assert!(doc["paths"]["/api/v1/modules/{module}/{verb}"]["post"].is_object());
    let metrics = get(&lab, 1, &monitor, "/metrics");
    assert_eq!(metrics.code, 200);
    assert!(
        metrics.body.contains("safekit_module_state"),
        "{}",
        metrics.body
    );
    let cfg = get(&lab, 1, &monitor, "/api/v1/config").json();
    let files: Vec<&str> = cfg["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["path"].as_str().unwrap())
        .collect();
    assert_eq!(files, ["cluster.toml", "modules/web/module.toml"]);
    assert!(
        !cfg.to_string().contains("argon2"),
        "no users in the config read"
    );
    let hist = get(&lab, 1, &monitor, "/api/v1/modules/web/history").json();
    let states: Vec<&str> = hist["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["state"].as_str().unwrap())
        .collect();
    assert_eq!(states.first(), Some(&"STOP"), "{hist}");
    assert_eq!(states.last(), Some(&"PRIM"), "{hist}");
    for (path, body) in [
        ("/api/v1/modules/web/swap", ""),
        ("/api/v1/modules/web/stop", ""),
        (
            "/api/v1/modules/web/set",
            r#"{"resource":"custom.x","value":"up"}"#,
        ),
        ("/api/v1/config/check", r#"{"files":[]}"#),
        ("/api/v1/config/apply", r#"{"files":[]}"#),
    ] {
        let a = post(&lab, 1, &monitor, path, body);
        assert_eq!(a.code, 403, "monitor POST {path}: {a:?}");
    }
    assert_eq!(get(&lab, 1, &monitor, "/api/v1/snapshot").code, 403);
    assert_eq!(lq(&lab, 1), PRIM, "monitor changed nothing");
    assert_eq!(lq(&lab, 2), SECOND);

    // Module log, paged.
    let page = get(&lab, 1, &monitor, "/api/v1/modules/web/log?limit=2").json();
    assert_eq!(page["lines"].as_array().unwrap().len(), 2);
    let total = page["total"].as_u64().unwrap();
    assert!(total >= 2);
    assert_eq!(page["from"].as_u64().unwrap(), total - 2);
    let first = get(&lab, 1, &monitor, "/api/v1/modules/web/log?from=0&limit=1").json();
    assert_eq!(first["lines"].as_array().unwrap().len(), 1);
    assert_eq!(
        get(&lab, 1, &monitor, "/api/v1/modules/web/log?limit=x").code,
        400,
        "bad page"
    );

    // Control: verbs, with their refusals.
    assert_eq!(
        post(&lab, 1, &control, "/api/v1/modules/web/bogus", "").code,
        404
    );
    assert_eq!(
        post(&lab, 1, &control, "/api/v1/modules/nope/start", "").code,
        404
    );
    let a = post(&lab, 2, &control, "/api/v1/modules/web/prim", "");
    assert_eq!(a.code, 409, "prim refused while the peer is primary: {a:?}");
    let a = post(
        &lab,
        1,
        &control,
        "/api/v1/modules/web/stop?sync=nosync",
        "",
    );
    assert_eq!(a.code, 400, "nosync is for swap only");
    let a = post(
        &lab,
        1,
        &control,
        "/api/v1/modules/web/set",
        r#"{"resource":"custom.nope","value":"down"}"#,
    );
    assert_eq!(a.code, 409, "no such resource: {a:?}");
    assert_eq!(
        post(&lab, 1, &control, "/api/v1/config/check", r#"{"files":[]}"#).code,
        403
    );
    assert_eq!(
        (lq(&lab, 1), lq(&lab, 2)),
        (PRIM, SECOND),
        "refusals changed nothing"
    );

    // A swap through the API exchanges the roles as `safekit swap` does.
    let a = post(&lab, 1, &control, "/api/v1/modules/web/swap", "");
    assert_eq!(a.code, 200, "{a:?}");
    assert!(wait_roles(&lab, SECOND, PRIM), "API swap: node2 primary");
    // Recorded in the commands log like the CLI's, under the API identity.
    let commands =
        std::fs::read_to_string(lab.root(1).join("var/log/safekit/commands.log")).unwrap();
    assert!(
        commands
            .lines()
            .any(|l| l.contains("| api control-key (control, key) |")
                && l.contains("swap")
                && l.contains("| ok")),
        "API swap in the commands log:\n{commands}"
    );
    assert_eq!(
        api_state(&get(&lab, 2, &monitor, "/api/v1/modules")),
        ("PRIM".into(), "green".into())
    );
    let out = lab.safekit(2, &["swap", "-m", "web"]).unwrap();
    assert!(out.status.success(), "CLI swap: {out:?}");
    assert!(
        wait_roles(&lab, PRIM, SECOND),
        "CLI swap: node1 primary again"
    );

    // Proxy mode: node2 through node1, the role enforced on node2.
    let a = get(&lab, 1, &monitor, "/api/v1/nodes/node2/status");
    assert_eq!(a.code, 200, "{a:?}");
    assert_eq!(a.json()["node"], "node2");
    assert_eq!(
        api_state(&get(&lab, 1, &monitor, "/api/v1/nodes/node2/modules")),
        ("SECOND".into(), "green".into())
    );
    let a = post(
        &lab,
        1,
        &monitor,
        "/api/v1/nodes/node2/modules/web/stop",
        "",
    );
    assert_eq!(a.code, 403, "monitor through the proxy: {a:?}");
    assert_eq!(
        get(&lab, 1, &monitor, "/api/v1/nodes/node9/status").code,
        404
    );
    let a = get(&lab, 1, &monitor, "/api/v1/nodes/node2/modules/no%20such");
    assert_eq!(a.code, 404, "{a:?}");
    assert!(
        a.json()["error"]
            .as_str()
            .unwrap()
            .contains("no module \"no such\" on node node2"),
        "answered by node2, the path as encoded: {a:?}"
    );
    let a = get(
        &lab,
        1,
        &monitor,
        "/api/v1/nodes/node2/modules/web/log?limit=1",
    );
    assert_eq!(
        a.json()["lines"].as_array().unwrap().len(),
        1,
        "query forwarded"
    );
    let a = post(
        &lab,
        1,
        &control,
        "/api/v1/nodes/node2/modules/web/stop",
        "",
    );
    assert_eq!(a.code, 200, "control through the proxy: {a:?}");
    assert!(wait_roles(&lab, ALONE, STOP), "node2 stopped through node1");
    let a = post(
        &lab,
        1,
        &control,
        "/api/v1/nodes/node2/modules/web/start",
        "",
    );
    assert_eq!(a.code, 200, "{a:?}");
    assert!(
        wait_roles(&lab, PRIM, SECOND),
        "node2 started through node1"
    );
    // A proxied request cannot be replayed or forged.
    let forged = curl(
        &lab,
        &["-H", "X-Safekit-Proxy: node1;eve;admin;1;00;00"],
        &url(&lab, 2, "/api/v1/status"),
    );
    assert_eq!(forged.code, 401, "{forged:?}");

    // Admin: configuration check at its line, apply (refused when invalid,
    // nothing written; applied on every node otherwise), snapshot.
    let bad = r#"{"files":[{"path":"modules/web/module.toml","text":"[service]\nmode = \"mirror\"\n\n[heart]\npulse = \"fast\"\n"}]}"#;
    let a = post(&lab, 1, &admin, "/api/v1/config/check", bad).json();
    assert_eq!(a["ok"], false, "{a}");
    let e = &a["errors"][0];
    assert_eq!(e["file"], "modules/web/module.toml", "{a}");
    assert_eq!(e["line"], 5, "{a}");
    assert_eq!(e["key"], "heart.pulse", "{a}");
    let good = format!(
        r#"{{"files":[{{"path":"modules/web/module.toml","text":{}}}]}}"#,
        serde_json::Value::String(web().toml)
    );
    let a = post(&lab, 1, &admin, "/api/v1/config/check", &good).json();
    assert_eq!(a["ok"], true, "{a}");
    let a = post(
        &lab,
        1,
        &admin,
        "/api/v1/config/check",
        r#"{"files":[{"path":"../cluster.key","text":""}]}"#,
    );
    assert_eq!(a.code, 400);
    let on_disk =
        std::fs::read_to_string(lab.root(1).join("etc/safekit/modules/web/module.toml")).unwrap();
    assert_eq!(on_disk, web().toml, "check changed nothing");
    let a = post(&lab, 1, &admin, "/api/v1/config/apply", bad);
    assert_eq!(a.code, 422, "{a:?}");
    let body = a.json();
    assert_eq!(body["errors"][0]["key"], "heart.pulse", "{body}");
    assert!(
        body["error"]
            .as_str()
            .is_some_and(|e| e.contains("nothing written")),
        "{body}"
    );
    for n in [1, 2] {
        let on_disk =
            std::fs::read_to_string(lab.root(n).join("etc/safekit/modules/web/module.toml"))
                .unwrap();
        assert_eq!(
            on_disk,
            web().toml,
            "node{n}: a refused apply wrote nothing"
        );
    }
    let a = post(&lab, 1, &admin, "/api/v1/config/apply", &good);
    assert_eq!(a.code, 200, "{a:?}");
    let body = a.json();
    assert_eq!(body["ok"], true, "{body}");
    let results: Vec<&str> = body["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["result"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(results.len(), 2, "{body}");
    assert!(
        results.iter().all(|r| *r == "applied" || *r == "unchanged"),
        "{body}"
    );
    let tgz = lab.dir().join("snap.tar.gz");
    let a = curl(
        &lab,
        &["-H", &bearer(&admin), "-o", tgz.to_str().unwrap()],
        &url(&lab, 1, "/api/v1/snapshot"),
    );
    assert_eq!(a.code, 200);
    let list = Command::new("tar").arg("tzf").arg(&tgz).output().unwrap();
    let list = String::from_utf8_lossy(&list.stdout);
    assert!(
        list.contains("status.json") && list.contains("module.toml"),
        "{list}"
    );
    for secret in ["cluster.key", "users.toml", "apikeys.toml"] {
        assert!(!list.contains(secret), "{secret} in the snapshot: {list}");
    }

    // The event stream sends the status at once.
    let a = curl(
        &lab,
        &["-N", "--max-time", "2", "-H", &bearer(&monitor)],
        &url(&lab, 1, "/api/v1/events"),
    );
    assert!(a.body.contains("event: status"), "{a:?}");
    assert!(a.body.contains("\"node\":\"node1\""), "{a:?}");

    // Checkers and their last results (the primary runs the tcp checker).
    let m = get(&lab, 1, &monitor, "/api/v1/modules/web").json();
    let tcp = m["checkers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == "tcp0")
        .unwrap_or_else(|| panic!("no tcp0 checker in {m}"));
    assert_eq!(tcp["up"], true, "{tcp}");
    assert!(tcp["at_ms"].as_u64().unwrap() > 0);

    // A removed key stops working at once.
    let (code, _, _) = safekit_stdin(&lab, 1, &["apikey", "del", "monitor-key"], "");
    assert_eq!(code, 0);
    assert_eq!(get(&lab, 1, &monitor, "/api/v1/modules").code, 401);
    drop(lab);
}

/// Logs in as `user` on node 1 over HTTPS: (answer, cookie value, csrf).
fn login(lab: &Lab, ns: &str, ca: &Path, user: &str, password: &str) -> (Answer, String, String) {
    let body = serde_json::json!({"user": user, "password": password}).to_string();
    let a = curl_in(
        lab,
        ns,
        &[
            "--cacert",
            ca.to_str().unwrap(),
            "-X",
            "POST",
            "-H",
            "Content-Type: application/json",
            "--data-binary",
            &body,
        ],
        &https_url(lab, "/api/v1/login"),
    );
    let cookie = a
        .headers
        .lines()
        .find_map(|l| {
            l.to_lowercase()
                .strip_prefix("set-cookie: safekit_session=")
                .map(str::to_owned)
        })
        .map(|v| v.split(';').next().unwrap_or("").to_owned())
        .unwrap_or_default();
    let csrf = if a.code == 200 {
        a.json()["csrf"].as_str().unwrap_or("").to_owned()
    } else {
        String::new()
    };
    (a, cookie, csrf)
}

fn https_url(lab: &Lab, path: &str) -> String {
    format!("https://{}:9453{path}", lab.spec().node_addr(1))
}

/// A request with the session cookie (and a CSRF header, if given).
fn with_cookie(
    lab: &Lab,
    ns: &str,
    ca: &Path,
    method: &str,
    path: &str,
    cookie: &str,
    csrf: Option<&str>,
) -> Answer {
    let c = format!("Cookie: safekit_session={cookie}");
    let h = format!("X-CSRF-Token: {}", csrf.unwrap_or(""));
    let mut args = vec!["--cacert", ca.to_str().unwrap(), "-X", method, "-H", &c];
    if csrf.is_some() {
        args.extend(["-H", &h]);
    }
    curl_in(lab, ns, &args, &https_url(lab, path))
}

fn s_client(lab: &Lab, version: &str) -> (bool, String) {
    let addr = format!("{}:9453", lab.spec().node_addr(1));
    let out = lab
        .exec(
            &lab.spec().client_ns(),
            &[
                "sh",
                "-c",
                &format!(
                    "echo | timeout 10 openssl s_client -connect {addr} {version} -cipher 'DEFAULT@SECLEVEL=0' 2>&1"
                ),
            ],
        )
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let ok = text.contains("BEGIN CERTIFICATE") || text.contains("Server certificate");
    (ok && out.status.success(), text)
}

#[test]
#[expect(clippy::too_many_lines, reason = "one cluster, every security check")]
fn api_security_sessions_and_tls() {
    let _g = serial();
    let mut lab = lab_with("skap2", 142, "\n[api]\nsession_ttl = \"4s\"\n");
    for (user, role, pw) in [
        ("op", "control", "op's password"),
        ("op2", "control", "op2's password"),
        ("viewer", "monitor", "viewer's password"),
    ] {
        let (code, _, err) = safekit_stdin(
            &lab,
            1,
            &["user", "add", user, "--role", role, "--password-stdin"],
            &format!("{pw}\n"),
        );
        assert_eq!(code, 0, "{err}");
    }
    let (code, _, err) = safekit_stdin(
        &lab,
        1,
        &["user", "add", "x", "--role", "root", "--password-stdin"],
        "whatever1\n",
    );
    assert_ne!(code, 0, "bad role refused");
    assert!(err.contains("not a role"), "{err}");
    let users = std::fs::read_to_string(lab.root(1).join("etc/safekit/users.toml")).unwrap();
    assert!(
        users.contains("$argon2id$") && !users.contains("op's password"),
        "{users}"
    );
    let (code, out, err) = safekit_stdin(&lab, 1, &["certs", "init"], "");
    assert_eq!(code, 0, "certs init: {err}");
    assert!(out.contains("node2.crt"), "{out}");
    copy_auth_to_node2(&lab);
    start_pair(&mut lab);
    let ca = lab.root(1).join("etc/safekit/tls/ca.crt");

    // The health check: ready or not, nothing else.
    let ready = curl(&lab, &[], &url(&lab, 1, "/var/modules/web/ready.txt"));
    assert_eq!((ready.code, ready.body.as_str()), (200, "ready\n"));
    let second = curl(&lab, &[], &url(&lab, 2, "/var/modules/web/ready.txt"));
    let unknown = curl(
        &lab,
        &[],
        &url(&lab, 2, "/var/modules/nosuchmodule/ready.txt"),
    );
    assert_eq!((second.code, second.body.as_str()), (404, "not ready\n"));
    assert_eq!(
        (unknown.code, unknown.body.as_str()),
        (404, "not ready\n"),
        "an unknown module looks like a module that is not ready"
    );
    let https_ready = curl(
        &lab,
        &["--cacert", ca.to_str().unwrap()],
        &https_url(&lab, "/var/modules/web/ready.txt"),
    );
    assert_eq!(
        https_ready.code, 200,
        "HTTPS with the cluster CA: {https_ready:?}"
    );
    for h in ["server:", "x-powered-by:"] {
        assert!(
            !ready.headers.to_lowercase().contains(h),
            "{h} in {}",
            ready.headers
        );
    }

    // TLS 1.3 and 1.2 only.
    let (ok13, t13) = s_client(&lab, "-tls1_3");
    assert!(ok13, "TLS 1.3: {t13}");
    let (ok12, t12) = s_client(&lab, "-tls1_2");
    assert!(ok12, "TLS 1.2: {t12}");
    let (ok11, t11) = s_client(&lab, "-tls1_1");
    assert!(!ok11, "TLS 1.1 accepted: {t11}");
    assert!(
        !t11.contains("no protocols available"),
        "the client must offer TLS 1.1 for this check to mean anything: {t11}"
    );

    // Wrong password, then the rate limit (per client address and name).
    let client = lab.spec().client_ns();
    let other = lab.spec().node_ns(2);
    let (a, cookie, _) = login(&lab, &client, &ca, "op", "wrong password");
    assert_eq!(a.code, 401, "{a:?}");
    assert!(cookie.is_empty(), "no session for a wrong password");
    let (a, _, _) = login(&lab, &client, &ca, "nobody", "wrong password");
    assert_eq!(a.code, 401, "same answer for an unknown user");
    assert_eq!(a.json()["error"], "wrong user or password");
    for _ in 0..3 {
        assert_eq!(
            login(&lab, &client, &ca, "op", "wrong password").0.code,
            401
        );
    }
    let (a, cookie, _) = login(&lab, &client, &ca, "op", "op's password");
    assert_eq!(a.code, 429, "sixth attempt within a minute: {a:?}");
    assert!(cookie.is_empty(), "even with the right password");
    assert!(
        a.headers.to_lowercase().contains("retry-after:"),
        "{}",
        a.headers
    );
    let (a, _, _) = login(&lab, &client, &ca, "viewer", "viewer's password");
    assert_eq!(a.code, 429, "same client, another name");
    assert_eq!(login(&lab, &other, &ca, "op", "wrong again").0.code, 401);
    let (a, _, _) = login(&lab, &other, &ca, "op", "op's password");
    assert_eq!(a.code, 429, "same name (5 failures), another client");

    // From another client address (node2's namespace), a monitor logs in.
    let (a, viewer, csrf) = login(&lab, &other, &ca, "viewer", "viewer's password");
    assert_eq!(a.code, 200, "{a:?}");
    let set_cookie = a
        .headers
        .to_lowercase()
        .lines()
        .find(|l| l.starts_with("set-cookie: safekit_session="))
        .unwrap_or_else(|| panic!("no cookie: {}", a.headers))
        .to_owned();
    for flag in ["httponly", "samesite=strict", "secure", "path=/"] {
        assert!(set_cookie.contains(flag), "{flag} missing: {set_cookie}");
    }
    let me = with_cookie(&lab, &other, &ca, "GET", "/api/v1/session", &viewer, None);
    assert_eq!(me.code, 200, "{me:?}");
    assert_eq!(me.json()["role"], "monitor");
    assert_eq!(me.json()["csrf"], csrf.as_str());
    let a = with_cookie(
        &lab,
        &other,
        &ca,
        "POST",
        "/api/v1/modules/web/stop",
        &viewer,
        Some(&csrf),
    );
    assert_eq!(a.code, 403, "monitor session: {a:?}");

    // Proxy mode between nodes with certificates goes over HTTPS: node2's
    // plain HTTP port closed, node2 still answers through node1.
    let nft = |rule: &str| {
        let out = lab
            .exec(&lab.spec().node_ns(2), &["nft", rule])
            .expect("nft");
        assert!(out.status.success(), "nft {rule}: {out:?}");
    };
    nft(
        "add table inet skap2test; add chain inet skap2test input { type filter hook input priority 0; tcp dport 9010 drop; }",
    );
    let a = with_cookie(
        &lab,
        &other,
        &ca,
        "GET",
        "/api/v1/nodes/node2/status",
        &viewer,
        None,
    );
    assert_eq!(a.code, 200, "through HTTPS between nodes: {a:?}");
    assert_eq!(a.json()["node"], "node2");
    nft("delete table inet skap2test");

    // Forged cookie.
    let forged = "ab".repeat(32);
    let a = with_cookie(&lab, &other, &ca, "GET", "/api/v1/modules", &forged, None);
    assert_eq!(a.code, 401, "{a:?}");

    // CSRF: a control user's session without (or with a wrong) token
    // changes nothing; with it the verb runs.
    let (a, op, csrf) = login(&lab, &other, &ca, "op2", "op2's password");
    assert_eq!(a.code, 200, "{a:?}");
    let a = with_cookie(
        &lab,
        &other,
        &ca,
        "POST",
        "/api/v1/modules/web/stop",
        &op,
        None,
    );
    assert_eq!(a.code, 403, "no CSRF token: {a:?}");
    assert!(a.body.contains("CSRF"), "{a:?}");
    let a = with_cookie(
        &lab,
        &other,
        &ca,
        "POST",
        "/api/v1/modules/web/stop",
        &op,
        Some("0123"),
    );
    assert_eq!(a.code, 403, "wrong CSRF token: {a:?}");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        (lq(&lab, 1), lq(&lab, 2)),
        (PRIM, SECOND),
        "rejected requests changed nothing"
    );
    let a = with_cookie(
        &lab,
        &other,
        &ca,
        "POST",
        "/api/v1/modules/web/stop",
        &op,
        Some(&csrf),
    );
    assert_eq!(a.code, 200, "with the CSRF token: {a:?}");
    assert!(wait_for(Duration::from_secs(10), || lq(&lab, 1) == STOP).is_some());
    let a = with_cookie(
        &lab,
        &other,
        &ca,
        "POST",
        "/api/v1/logout",
        &op,
        Some(&csrf),
    );
    assert_eq!(a.code, 200);
    let a = with_cookie(&lab, &other, &ca, "GET", "/api/v1/modules", &op, None);
    assert_eq!(a.code, 401, "after logout");

    // Expired cookie (session_ttl = 4s).
    std::thread::sleep(Duration::from_millis(4200));
    let a = with_cookie(&lab, &other, &ca, "GET", "/api/v1/modules", &viewer, None);
    assert_eq!(a.code, 401, "expired: {a:?}");
    assert!(a.body.contains("expired"), "{a:?}");
    drop(lab);
}
