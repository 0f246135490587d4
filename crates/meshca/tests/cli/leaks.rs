//! The secret-leak scan over the whole suite. Every test keeps what meshca
//! said (server, agent and proxy logs, audit logs, metrics, error bodies,
//! CLI errors) and every secret it handled (private keys, join tokens, seal
//! keys, Vault tokens) under `target/tmp/leakscan/` (see `common::sweep`).
//! `./test.sh` runs this test after all the others, over all of it: no
//! output may contain any of those secrets, a PEM private key of any kind, or
//! anything shaped like a join token.
#![allow(clippy::unwrap_used)]

use std::path::Path;

use aho_corasick::AhoCorasick;

use crate::common::leakscan_dir;

fn read_all(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| {
            let bytes = std::fs::read(e.path()).ok()?;
            Some((e.file_name().to_string_lossy().into_owned(), bytes))
        })
        .collect()
}

/// What would show a secret in an output: each base64 line of a PEM private
/// key (the first may be shared structure: 40+ characters of key material are
/// in every other line), the secret half of a join token (`mct_<id>.<secret>`,
/// the id is public), and any other secret file's lines.
fn needles(secret: &[u8]) -> Vec<String> {
    let text = String::from_utf8_lossy(secret);
    let mut out = Vec::new();
    if text.contains("PRIVATE KEY-----") {
        let mut inside = false;
        let mut first = true;
        for line in text.lines().map(str::trim) {
            if line.starts_with("-----BEGIN") {
                inside = line.contains("PRIVATE KEY");
                first = true;
            } else if line.starts_with("-----END") {
                inside = false;
            } else if inside && line.len() >= 40 {
                if !first {
                    out.push(line.to_owned());
                }
                first = false;
            }
        }
        return out;
    }
    let tokens = tokens_in(&text);
    if !tokens.is_empty() {
        return tokens
            .into_iter()
            .filter_map(|t| t.split_once('.').map(|(_, s)| s.to_owned()))
            .collect();
    }
    text.lines()
        .map(str::trim)
        .filter(|l| l.len() >= 16 && !l.starts_with('#'))
        .map(str::to_owned)
        .collect()
}

/// Every `mct_<16 hex>.<64 hex>` in `text`.
fn tokens_in(text: &str) -> Vec<String> {
    let hex = |s: &str| s.bytes().all(|b| b.is_ascii_hexdigit());
    text.match_indices("mct_")
        .filter_map(|(i, _)| {
            let t = text.get(i..i + 4 + 16 + 1 + 64)?;
            (hex(&t[4..20]) && &t[20..21] == "." && hex(&t[21..])).then(|| t.to_owned())
        })
        .collect()
}

#[test]
fn needles_and_tokens_are_found() {
    let token = format!("mct_{}.{}", "0a".repeat(8), "b1".repeat(32));
    assert_eq!(tokens_in(&format!("x {token}\n")), vec![token.clone()]);
    assert_eq!(needles(token.as_bytes()), vec!["b1".repeat(32)]);
    assert!(tokens_in("mct_00.11").is_empty());
    let pem = format!(
        "-----BEGIN PRIVATE KEY-----\n{}\n{}\n-----END PRIVATE KEY-----\n",
        "A".repeat(64),
        "B".repeat(64)
    );
    assert_eq!(needles(pem.as_bytes()), vec!["B".repeat(64)]);
}

#[test]
#[ignore = "run by ./test.sh after the rest of the suite, over what it kept"]
fn no_output_of_the_suite_contains_a_secret() {
    let outputs = read_all(&leakscan_dir("out"));
    let secrets = read_all(&leakscan_dir("secrets"));
    // The scan is only evidence if the suite really fed it.
    assert!(
        outputs.len() >= 100 && secrets.len() >= 50,
        "the suite kept {} outputs and {} secrets: run ./test.sh (the whole suite) first",
        outputs.len(),
        secrets.len()
    );
    let mut patterns: Vec<String> = Vec::new();
    let mut from: Vec<&str> = Vec::new();
    for (name, bytes) in &secrets {
        for n in needles(bytes) {
            patterns.push(n);
            from.push(name);
        }
    }
    patterns.push("PRIVATE KEY-----".to_owned());
    from.push("any PEM private key");
    let matcher = AhoCorasick::new(&patterns).unwrap();
    let mut leaks = Vec::new();
    let mut bytes_scanned = 0;
    for (name, bytes) in &outputs {
        bytes_scanned += bytes.len();
        if let Some(m) = matcher.find(bytes) {
            leaks.push(format!(
                "{name} contains {} (from {})",
                patterns[m.pattern()],
                from[m.pattern()]
            ));
        }
        for t in tokens_in(&String::from_utf8_lossy(bytes)) {
            leaks.push(format!("{name} contains the join token {t}"));
        }
    }
    println!(
        "leaks: {} outputs ({} KiB) scanned for {} secrets ({} patterns): {} leaks",
        outputs.len(),
        bytes_scanned / 1024,
        secrets.len(),
        patterns.len(),
        leaks.len()
    );
    assert!(leaks.is_empty(), "secrets leaked:\n{}", leaks.join("\n"));
}
