//! Generates the documentation the Debian package installs:
//!
//! - `man/safekit.1` and one `man/safekit-<subcommand>.1` per subcommand,
//!   `man/safekitd.8`: from the clap definitions (`clap_mangen`);
//! - `man/safekit-cluster.toml.5`, `man/safekit-module.toml.5`: from the
//!   configuration reference, `conf/README.md` (its tables become tagged
//!   paragraphs);
//! - `completions/safekit.bash`, `_safekit` (zsh), `safekit.fish`, and the
//!   same for `safekitd` (`clap_complete`).
//!
//! `cargo run -p safekit-user --example gen_assets -- OUT_DIR` (what `cargo
//! xtask package` runs). `tests/docs.rs` includes this file to render the
//! pages with man and load the completions in bash.

#![allow(
    dead_code,
    unreachable_pub,
    reason = "also included by tests/docs.rs, which does not call main"
)]

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result};
use clap::CommandFactory as _;

fn main() -> Result<()> {
    let out = std::env::args_os()
        .nth(1)
        .map(PathBuf::from)
        .context("usage: gen_assets OUT_DIR")?;
    for f in generate(&out)? {
        println!("{}", f.display());
    }
    Ok(())
}

/// The configuration reference shipped in the repository.
#[must_use]
pub fn conf_readme() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../conf/README.md")
}

/// Writes every page and completion under `out` (`man/`, `completions/`);
/// returns the files written.
pub fn generate(out: &Path) -> Result<Vec<PathBuf>> {
    let man = out.join("man");
    let comp = out.join("completions");
    std::fs::create_dir_all(&man)?;
    std::fs::create_dir_all(&comp)?;
    let mut files = Vec::new();

    let cli = safekit::cli::Cli::command();
    clap_mangen::generate_to(cli.clone(), &man).context("safekit man pages")?;
    let daemon = safekit::daemon::Args::command();
    let mut page = Vec::new();
    clap_mangen::Man::new(daemon.clone())
        .section("8")
        .render(&mut page)?;
    std::fs::write(man.join("safekitd.8"), page)?;

    let reference = std::fs::read_to_string(conf_readme()).context("reading conf/README.md")?;
    std::fs::write(man.join("safekit-cluster.toml.5"), cluster_page(&reference))?;
    std::fs::write(man.join("safekit-module.toml.5"), module_page(&reference))?;
    for e in std::fs::read_dir(&man)? {
        files.push(e?.path());
    }

    for (mut cmd, name) in [(cli, "safekit"), (daemon, "safekitd")] {
        for shell in [
            clap_complete::Shell::Bash,
            clap_complete::Shell::Zsh,
            clap_complete::Shell::Fish,
        ] {
            files.push(clap_complete::generate_to(shell, &mut cmd, name, &comp)?);
        }
    }
    files.sort();
    Ok(files)
}

/// The `## name` sections of a markdown text, with the text before the
/// first one under "".
fn sections(md: &str) -> Vec<(String, String)> {
    let mut out = vec![(String::new(), String::new())];
    for line in md.lines() {
        if let Some(h) = line.strip_prefix("## ") {
            out.push((h.trim().to_owned(), String::new()));
        } else if !line.starts_with("# ") {
            let last = out.last_mut().expect("never empty");
            last.1.push_str(line);
            last.1.push('\n');
        }
    }
    out
}

fn section<'a>(all: &'a [(String, String)], name: &str) -> &'a str {
    all.iter()
        .find(|(n, _)| n == name)
        .map_or("", |(_, t)| t.as_str())
}

fn header(name: &str, section: &str, what: &str) -> String {
    format!(
        ".TH {} {section} \"\" \"safekit {}\" \"safekit\"\n.ad l\n.SH NAME\n{name} \\- {what}\n",
        name.to_uppercase(),
        env!("CARGO_PKG_VERSION")
    )
}

/// safekit-cluster.toml(5): the files, the key, checking, value syntax and
/// every key of cluster.toml.
#[must_use]
pub fn cluster_page(md: &str) -> String {
    let all = sections(md);
    let mut page = header(
        "safekit-cluster.toml",
        "5",
        "the safekit cluster configuration",
    );
    page.push_str(".SH SYNOPSIS\n/etc/safekit/cluster.toml\n");
    page.push_str(".SH DESCRIPTION\n");
    // The reference's first paragraph speaks of the repository's conf/.
    let intro = all[0].1.trim_start();
    let intro = intro.split_once("\n\n").map_or(intro, |(_, rest)| rest);
    page.push_str(
        ".PP\nThe configuration of a node lives in /etc/safekit. Examples \
(a cluster, a mirror module \\fBweb\\fR and a farm module \\fBfront\\fR, with their \
scripts) are in /etc/safekit/examples.\n",
    );
    page.push_str(&roff(intro));
    for (title, name) in [
        ("THE CLUSTER KEY", "The cluster key"),
        ("CHECKING A CONFIGURATION", "Checking a configuration"),
        ("VALUE SYNTAX", "Value syntax"),
        ("KEYS", "cluster.toml"),
    ] {
        let _ = writeln!(page, ".SH {title}");
        page.push_str(&roff(section(&all, name)));
    }
    page.push_str(
        ".SH SEE ALSO\n\\fBsafekit-module.toml\\fR(5), \\fBsafekit\\fR(1), \\fBsafekitd\\fR(8)\n",
    );
    page
}

/// safekit-module.toml(5): value syntax and every key of module.toml.
#[must_use]
pub fn module_page(md: &str) -> String {
    let all = sections(md);
    let mut page = header(
        "safekit-module.toml",
        "5",
        "the configuration of a safekit application module",
    );
    page.push_str(
        ".SH SYNOPSIS\n/etc/safekit/modules/\\fIAM\\fR/module.toml, scripts in /etc/safekit/modules/\\fIAM\\fR/bin/\n",
    );
    page.push_str(".SH DESCRIPTION\n");
    page.push_str(&roff(section(&all, "module.toml")));
    for (title, name) in [
        ("VALUE SYNTAX", "Value syntax"),
        ("CHECKING A CONFIGURATION", "Checking a configuration"),
        ("NOTES", "Choices made where the specification is silent"),
    ] {
        let _ = writeln!(page, ".SH {title}");
        page.push_str(&roff(section(&all, name)));
    }
    page.push_str(
        ".SH SEE ALSO\n\\fBsafekit-cluster.toml\\fR(5), \\fBsafekit\\fR(1), \\fBsafekitd\\fR(8)\n",
    );
    page
}

/// Markdown (the subset conf/README.md uses: `###`/`####` headings,
/// paragraphs, fenced code, `-` lists, tables, `code`, **bold**, links) to
/// man(7).
#[must_use]
pub fn roff(md: &str) -> String {
    let mut out = String::new();
    let mut lines = md.lines().peekable();
    let mut para = String::new();
    let flush = |para: &mut String, out: &mut String| {
        if !para.trim().is_empty() {
            out.push_str(".PP\n");
            out.push_str(&line_start(&inline(para.trim())));
            out.push('\n');
        }
        para.clear();
    };
    while let Some(line) = lines.next() {
        if let Some(h) = line
            .strip_prefix("#### ")
            .or_else(|| line.strip_prefix("### "))
        {
            flush(&mut para, &mut out);
            let _ = writeln!(out, ".SS \"{}\"", plain(h.trim()).replace('"', ""));
        } else if line.starts_with("```") {
            flush(&mut para, &mut out);
            out.push_str(".PP\n.RS 4\n.nf\n");
            for code in lines.by_ref() {
                if code.starts_with("```") {
                    break;
                }
                out.push_str(&line_start(&escape(code)));
                out.push('\n');
            }
            out.push_str(".fi\n.RE\n");
        } else if line.starts_with('|') {
            flush(&mut para, &mut out);
            let mut rows = vec![cells(line)];
            while let Some(next) = lines.peek().filter(|l| l.starts_with('|')) {
                let row = cells(next);
                lines.next();
                if !row
                    .iter()
                    .all(|c| c.chars().all(|ch| ch == '-' || ch == ':'))
                {
                    rows.push(row);
                }
            }
            table(&rows, &mut out);
        } else if let Some(item) = line.strip_prefix("- ") {
            flush(&mut para, &mut out);
            let mut text = item.trim().to_owned();
            while let Some(more) = lines.peek().filter(|l| l.starts_with("  ")) {
                text.push(' ');
                text.push_str(more.trim());
                lines.next();
            }
            out.push_str(".IP \\(bu 2\n");
            out.push_str(&line_start(&inline(&text)));
            out.push('\n');
        } else if line.trim().is_empty() {
            flush(&mut para, &mut out);
        } else {
            para.push_str(line.trim());
            para.push(' ');
        }
    }
    flush(&mut para, &mut out);
    out
}

/// Cells of a table row, `|` inside backquotes kept.
fn cells(line: &str) -> Vec<String> {
    let mut cells = Vec::new();
    let mut cur = String::new();
    let mut code = false;
    for ch in line.trim().trim_start_matches('|').chars() {
        match ch {
            '`' => {
                code = !code;
                cur.push(ch);
            }
            '|' if !code => cells.push(std::mem::take(&mut cur).trim().to_owned()),
            _ => cur.push(ch),
        }
    }
    if !cur.trim().is_empty() {
        cells.push(cur.trim().to_owned());
    }
    cells
}

/// A table as tagged paragraphs, the classic man page layout (a table of
/// four columns does not fit 80 columns): the first cell is the tag, each
/// other cell a line `Header: value` under it.
fn table(rows: &[Vec<String>], out: &mut String) {
    let Some((head, body)) = rows.split_first() else {
        return;
    };
    for row in body {
        let _ = writeln!(
            out,
            ".TP\n{}",
            line_start(&inline(row.first().map_or("", String::as_str)))
        );
        let lines: Vec<String> = row
            .iter()
            .enumerate()
            .skip(1)
            .filter(|(_, c)| !c.is_empty())
            .map(|(i, c)| {
                let h = head.get(i).map_or("", String::as_str);
                line_start(&format!("\\fI{}\\fR: {}", plain(h), inline(c)))
            })
            .collect();
        out.push_str(&lines.join("\n.br\n"));
        out.push('\n');
    }
}

/// Inline markup: `code` and **bold** in bold, links as their text.
fn inline(text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(i) = rest.find(['`', '*', '[']) {
        out.push_str(&breakable(&escape(&rest[..i])));
        let tail = &rest[i..];
        if let Some(body) = tail.strip_prefix('`')
            && let Some(end) = body.find('`')
        {
            let _ = write!(out, "\\fB{}\\fR", breakable(&escape(&body[..end])));
            rest = &body[end + 1..];
        } else if let Some(body) = tail.strip_prefix("**")
            && let Some(end) = body.find("**")
        {
            let _ = write!(out, "\\fB{}\\fR", breakable(&escape(&body[..end])));
            rest = &body[end + 2..];
        } else if let Some(body) = tail.strip_prefix('[')
            && let Some(close) = body.find("](")
            && let Some(end) = body[close..].find(')')
        {
            out.push_str(&escape(&body[..close]));
            rest = &body[close + end + 1..];
        } else {
            out.push_str(&escape(&tail[..1]));
            rest = &tail[1..];
        }
    }
    out.push_str(&breakable(&escape(rest)));
    out
}

/// Running text may break after a `/` (long `a/b/c/d` words in narrow
/// table columns).
fn breakable(text: &str) -> String {
    text.replace('/', "/\\:")
}

/// Text without markup (headings).
fn plain(text: &str) -> String {
    escape(&text.replace(['`', '*'], ""))
}

/// roff escapes: backslash, and any non-ASCII character as `\[uXXXX]`.
fn escape(text: &str) -> String {
    let mut out = String::new();
    for ch in text.chars() {
        match ch {
            '\\' => out.push_str("\\e"),
            '-' => out.push_str("\\-"),
            c if c.is_ascii() => out.push(c),
            c => {
                let _ = write!(out, "\\[u{:04X}]", u32::from(c));
            }
        }
    }
    out
}

/// A text line may not start with `.` or `'` (a request): `\&` first.
fn line_start(text: &str) -> String {
    text.lines()
        .map(|l| {
            if l.starts_with(['.', '\'']) {
                format!("\\&{l}")
            } else {
                l.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}
