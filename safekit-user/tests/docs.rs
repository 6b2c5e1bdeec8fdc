//! The documentation the package installs, as an operator meets it: every
//! generated man page renders with man(1) without a groff warning and says
//! what it should, and the bash completion loads and completes.

#[path = "../examples/gen_assets.rs"]
mod gen_assets;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

/// The generated assets in a directory of their own, removed at the end.
struct Assets(PathBuf);

impl Assets {
    fn generate(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("safekit-docs-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        gen_assets::generate(&dir).expect("generate");
        Self(dir)
    }
}

impl Drop for Assets {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `man -l PAGE` as text: (output, groff warnings).
fn man(page: &Path) -> (String, String) {
    let out = Command::new("man")
        .args(["--warnings", "-E", "UTF-8", "-l"])
        .arg(page)
        .env("MANWIDTH", "80")
        .env("MAN_KEEP_FORMATTING", "0")
        .env("MANPAGER", "cat")
        .output()
        .expect("man (Debian package man-db) is installed by cargo xtask setup");
    assert!(out.status.success(), "man -l {}: {out:?}", page.display());
    (
        // Overstriking (bold/underline) removed, words separated by single
        // spaces (filled lines break anywhere), for matching.
        strip_overstrike(&String::from_utf8_lossy(&out.stdout))
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" "),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn strip_overstrike(s: &str) -> String {
    let mut out = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if chars.peek() == Some(&'\u{8}') {
            chars.next();
            continue;
        }
        out.push(c);
    }
    out
}

#[test]
fn every_man_page_renders_without_warnings() {
    let assets = Assets::generate("man");
    let dir = assets.0.join("man");
    let mut pages: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    pages.sort();
    let names: Vec<String> = pages
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    for want in [
        "safekit.1",
        "safekit-logview.1",
        "safekit-start.1",
        "safekitd.8",
        "safekit-cluster.toml.5",
        "safekit-module.toml.5",
    ] {
        assert!(names.iter().any(|n| n == want), "{want} not in {names:?}");
    }
    for p in &pages {
        let (text, warnings) = man(p);
        assert!(
            warnings.trim().is_empty(),
            "{}: groff warnings:\n{warnings}",
            p.display()
        );
        assert!(text.contains("NAME"), "{}: {text}", p.display());
    }

    // What an operator looks for on each.
    let (safekit, _) = man(&dir.join("safekit.1"));
    for word in ["SYNOPSIS", "logview", "state", "swap", "Exit codes"] {
        assert!(
            safekit.contains(word),
            "safekit(1) lacks {word:?}:\n{safekit}"
        );
    }
    let (logview, _) = man(&dir.join("safekit-logview.1"));
    assert!(
        logview.contains("--follow") && logview.contains("--lines"),
        "{logview}"
    );
    let (daemon, _) = man(&dir.join("safekitd.8"));
    assert!(
        daemon.contains("--root") && daemon.contains("safekitd.service"),
        "{daemon}"
    );
    let (cluster, _) = man(&dir.join("safekit-cluster.toml.5"));
    for word in [
        "key_file",
        "replication",
        "ports.heartbeat",
        "8888",
        "head -c 32",
    ] {
        assert!(
            cluster.contains(word),
            "safekit-cluster.toml(5) lacks {word:?}"
        );
    }
    let (module, _) = man(&dir.join("safekit-module.toml.5"));
    for word in [
        "defaultprim",
        "boot",
        "nice_stop_timeout",
        "[[check.tcp]]",
        "resync_bandwidth",
        "client_ip_port",
    ] {
        assert!(
            module.contains(word),
            "safekit-module.toml(5) lacks {word:?}"
        );
    }
    println!("{} pages rendered without warnings", pages.len());
}

/// Completes `words` (the last one being typed) with the generated bash
/// completion, loaded in a fresh bash.
fn complete(script: &Path, words: &[&str]) -> Vec<String> {
    let line = words.join(" ");
    let quoted: Vec<String> = words.iter().map(|w| format!("'{w}'")).collect();
    let prog = format!(
        "source '{}' || exit 3\ncomplete -p safekit >/dev/null || exit 4\nCOMP_WORDS=({})\nCOMP_CWORD={}\nCOMP_LINE='{line}'\nCOMP_POINT={}\n_safekit safekit '{}' '{}'\nprintf '%s\\n' \"${{COMPREPLY[@]}}\"\n",
        script.display(),
        quoted.join(" "),
        words.len() - 1,
        line.len(),
        words[words.len() - 1],
        words[words.len().saturating_sub(2)],
    );
    let out = Command::new("bash")
        .args(["--norc", "--noprofile", "-c", &prog])
        .output()
        .expect("bash");
    assert!(
        out.status.success(),
        "bash completion failed to load or run: {out:?}"
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

#[test]
fn bash_completion_loads_and_completes_subcommands_and_options() {
    let assets = Assets::generate("bash");
    let script = assets.0.join("completions/safekit.bash");
    let subcommands = complete(&script, &["safekit", "sta"]);
    assert!(
        subcommands.iter().any(|w| w == "state") && subcommands.iter().any(|w| w == "start"),
        "safekit sta<TAB>: {subcommands:?}"
    );
    assert!(!subcommands.iter().any(|w| w == "stop"), "{subcommands:?}");
    let options = complete(&script, &["safekit", "logview", "--"]);
    for want in ["--follow", "--lines", "--module"] {
        assert!(
            options.iter().any(|w| w == want),
            "safekit logview --<TAB> lacks {want}: {options:?}"
        );
    }
    for (file, needle) in [
        ("_safekit", "#compdef safekit"),
        ("safekit.fish", "complete -c safekit"),
        ("safekitd.bash", "safekitd"),
    ] {
        let text = std::fs::read_to_string(assets.0.join("completions").join(file)).unwrap();
        assert!(text.contains(needle), "{file}");
    }
}
