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

/// The secrets too short to look for anywhere: lines of 4 to 15
/// characters of a secret file that is neither a PEM key nor holds a join
/// token (the dev Vault token `root`, a test's `s.not-a-token`). As plain
/// substrings they would be found in every output (`root rotation`,
/// `kind="root"`): they are looked for only where a secret's value stands
/// ([`short_secret_leaks`]).
fn short_secrets(secret: &[u8]) -> Vec<String> {
    let text = String::from_utf8_lossy(secret);
    if text.contains("PRIVATE KEY-----") || !tokens_in(&text).is_empty() {
        return Vec::new();
    }
    text.lines()
        .map(str::trim)
        .filter(|l| (4..16).contains(&l.len()) && !l.starts_with('#'))
        .map(str::to_owned)
        .collect()
}

/// `bytes` without terminal colour sequences (`ESC [ ... m`), which a log
/// puts between a field's name and its value.
fn strip_ansi(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == 0x1b && bytes.get(i + 1) == Some(&b'[') {
            let mut j = i + 2;
            while j < bytes.len() && (bytes[j].is_ascii_digit() || bytes[j] == b';') {
                j += 1;
            }
            if bytes.get(j).is_some_and(u8::is_ascii_alphabetic) {
                i = j + 1;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    out
}

/// Characters a token, a header or a query value is made of: an occurrence
/// of a secret next to one is part of a longer word (`groot`, `rootless`).
fn token_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"._~+/-".contains(&b)
}

/// Names under which a value is a secret.
const SECRET_KEYS: [&str; 7] = [
    "token",
    "secret",
    "password",
    "passwd",
    "authorization",
    "credential",
    "apikey",
];

/// Whether the occurrence of a short secret at `text[start..end]` stands
/// where a secret's value would: the whole of a line, or the value of a
/// name that holds secrets (`token=root`, `token: root`, `"token":"root"`,
/// `X-Vault-Token: root`, `Authorization: Bearer root`,
/// `vault_token: Some("root")`, `--token root`). Anywhere else
/// (`root rotation`, `kind="root"`, `rootless`) it is a word, not a leak.
fn short_secret_leaks(text: &[u8], start: usize, end: usize) -> bool {
    let value = &text[start..end];
    if text.get(end).copied().is_some_and(token_char)
        || start.checked_sub(1).is_some_and(|i| token_char(text[i]))
    {
        return false; // part of a longer word
    }
    let line_start = text[..start]
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |i| i + 1);
    let line_end = text[end..]
        .iter()
        .position(|&b| b == b'\n')
        .map_or(text.len(), |i| end + i);
    if text[line_start..line_end].trim_ascii() == value {
        return true;
    }
    // Walk back from the value to the name it is the value of.
    let mut before = &text[line_start..start];
    before = strip_quote(before);
    before = before.strip_suffix(b"Some(").unwrap_or(before);
    let value_after_blank = before.last().is_some_and(|b| *b == b' ' || *b == b'\t');
    before = before.trim_ascii_end();
    for scheme in [&b"bearer"[..], b"basic"] {
        let Some(at) = before.len().checked_sub(scheme.len()) else {
            continue;
        };
        if before[at..].eq_ignore_ascii_case(scheme) && (at == 0 || !name_char(before[at - 1])) {
            before = before[..at].trim_ascii_end();
            break;
        }
    }
    let separated = before.last().is_some_and(|b| *b == b'=' || *b == b':');
    if separated {
        before = strip_quote(before[..before.len() - 1].trim_ascii_end());
    }
    let name_start = before
        .iter()
        .rposition(|b| !name_char(*b))
        .map_or(0, |i| i + 1);
    let name = String::from_utf8_lossy(&before[name_start..]).to_ascii_lowercase();
    // Only a flag takes its value after a blank (`--token root`).
    if name.is_empty() || !(separated || (value_after_blank && name.starts_with("--"))) {
        return false;
    }
    let name = name.replace(['-', '_'], "");
    SECRET_KEYS.iter().any(|k| name.contains(k))
}

fn strip_quote(s: &[u8]) -> &[u8] {
    s.strip_suffix(b"\"")
        .or_else(|| s.strip_suffix(b"'"))
        .unwrap_or(s)
}

fn name_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b'-'
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
fn short_secrets_are_found_where_a_value_stands_and_only_there() {
    let vault_token = b"root".as_slice();
    assert_eq!(short_secrets(vault_token), vec!["root".to_owned()]);
    assert!(needles(vault_token).is_empty(), "too short for a substring");
    assert!(
        short_secrets(format!("mct_{}.{}", "0a".repeat(8), "b1".repeat(32)).as_bytes()).is_empty()
    );
    let leak = |text: &str| {
        let plain = strip_ansi(text.as_bytes());
        let m = AhoCorasick::new(["root"]).unwrap();
        m.find_overlapping_iter(&plain)
            .any(|m| short_secret_leaks(&plain, m.start(), m.end()))
    };
    for text in [
        "GET /v1/sys/health?token=root HTTP/1.1",
        "vault token: root",
        r#"{"client_token":"root","policies":["root"]}"#,
        r#"{"token": "root"}"#,
        "X-Vault-Token: root",
        "authorization: Bearer root",
        "BAO_TOKEN=root bao status",
        r#"VaultConfig { token: Some("root"), addr: "http://x" }"#,
        "meshca serve --vault-token root",
        "root",
        "  root\n",
        "\x1b[3mvault_token\x1b[0m\x1b[2m=\x1b[0mroot",
        "secret_id='root'",
    ] {
        assert!(leak(text), "not found in {text:?}");
    }
    for text in [
        "meshca_expiry_seconds{kind=\"root\"} 315359999",
        r#"{"kind":"root","serial":"01"}"#,
        "error: root rotation: nothing to activate",
        "the token root is not a leak without a separator",
        "token=rootless",
        "token=groot",
        "path=/var/lib/root",
        "--root root.crt",
        "issued by the root, token refunded",
        "X-Vault-Token: s.root",
    ] {
        assert!(!leak(text), "a false leak in {text:?}");
    }
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
    let mut short: Vec<String> = Vec::new();
    let mut short_from: Vec<&str> = Vec::new();
    for (name, bytes) in &secrets {
        for n in short_secrets(bytes) {
            if !short.contains(&n) {
                short.push(n);
                short_from.push(name);
            }
        }
    }
    let short_matcher = AhoCorasick::new(&short).unwrap();
    let mut short_seen = 0usize;
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
        if !short.is_empty() {
            let plain = strip_ansi(bytes);
            for m in short_matcher.find_overlapping_iter(&plain) {
                short_seen += 1;
                if short_secret_leaks(&plain, m.start(), m.end()) {
                    let line_start = plain[..m.start()]
                        .iter()
                        .rposition(|&b| b == b'\n')
                        .map_or(0, |i| i + 1);
                    let shown = String::from_utf8_lossy(
                        &plain[line_start.max(m.start().saturating_sub(80))..m.end()],
                    );
                    leaks.push(format!(
                        "{name} contains the short secret {:?} (from {}) as a value: {shown}",
                        short[m.pattern()],
                        short_from[m.pattern()]
                    ));
                }
            }
        }
    }
    println!(
        "leaks: {} outputs ({} KiB) scanned for {} secrets ({} patterns, and {} short secrets \
         {short:?} where a value stands: {short_seen} occurrences looked at): {} leaks",
        outputs.len(),
        bytes_scanned / 1024,
        secrets.len(),
        patterns.len(),
        short.len(),
        leaks.len()
    );
    assert!(leaks.is_empty(), "secrets leaked:\n{}", leaks.join("\n"));
}
