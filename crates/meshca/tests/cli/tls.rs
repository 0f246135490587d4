//! Real TLS stacks accept what meshca issues: an openssl s_server requiring
//! client certificates, with curl and openssl s_client as clients.
#![allow(clippy::unwrap_used)]

use std::process::{Command, Stdio};

use crate::common::*;

#[test]
fn mtls_handshake_between_two_issued_certificates() {
    let ca = Ca::new(&[]);
    let server = ca.issue("web", "server", &["--profile", "server"]);
    let client = ca.issue("shell", "client", &["--profile", "client"]);
    // s_server wants the chain (the intermediate) separately.
    let chain = split_pem(&std::fs::read_to_string(server.join("tls.crt")).unwrap());
    std::fs::write(ca.path("server/chain.pem"), &chain[1]).unwrap();

    // Waited for until it listens itself, started again on another port
    // when its port was taken meanwhile.
    let (_srv, ports) = start_listening(
        1,
        &ca.path("s_server.log"),
        |ports| {
            let mut cmd = Command::new("openssl");
            cmd.args([
                "s_server",
                "-quiet",
                "-accept",
                &ports[0].to_string(),
                "-www",
                "-tls1_3",
                "-cert",
                server.join("tls.crt").to_str().unwrap(),
                "-key",
                server.join("tls.key").to_str().unwrap(),
                "-cert_chain",
                ca.path("server/chain.pem").to_str().unwrap(),
                "-CAfile",
                server.join("ca.crt").to_str().unwrap(),
                "-Verify",
                "2",
                "-verify_return_error",
            ])
            .stdin(Stdio::null());
            cmd
        },
        |_| true,
    );
    let port = ports[0];

    // curl checks the server's name against the certificate's DNS SANs.
    let host = "web.default.svc.cluster.local";
    let resolve = format!("{host}:{port}:127.0.0.1");
    let url = format!("https://{host}:{port}/");
    let body = tool(
        "curl",
        &[
            "-sS",
            "--fail",
            "--max-time",
            "10",
            "--tlsv1.3",
            "--resolve",
            &resolve,
            "--cacert",
            client.join("ca.crt").to_str().unwrap(),
            "--cert",
            client.join("tls.crt").to_str().unwrap(),
            "--key",
            client.join("tls.key").to_str().unwrap(),
            &url,
        ],
    );
    assert!(body.contains("TLSv1.3"), "{body}");

    // Without a client certificate the server refuses the handshake.
    let out = Command::new("curl")
        .args([
            "-sS",
            "--fail",
            "--max-time",
            "10",
            "--resolve",
            &resolve,
            "--cacert",
            client.join("ca.crt").to_str().unwrap(),
            &url,
        ])
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "a client without a certificate got through"
    );
    assert_ne!(
        out.status.code(),
        Some(28),
        "curl timed out rather than being refused"
    );

    // A client certificate from another CA is refused too.
    let other = Ca::new(&[]);
    let stranger = other.issue("shell", "stranger", &["--profile", "client"]);
    let out = Command::new("curl")
        .args([
            "-sS",
            "--fail",
            "--max-time",
            "10",
            "--resolve",
            &resolve,
            "--cacert",
            client.join("ca.crt").to_str().unwrap(),
            "--cert",
            stranger.join("tls.crt").to_str().unwrap(),
            "--key",
            stranger.join("tls.key").to_str().unwrap(),
            &url,
        ])
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "a certificate from another CA got through"
    );
    assert_ne!(
        out.status.code(),
        Some(28),
        "curl timed out rather than being refused"
    );

    // openssl s_client verifies the server and presents the client chain
    // (its stdin closed: it ends after the handshake; `timeout` bounds it).
    let out = Command::new("timeout")
        .args([
            "30",
            "openssl",
            "s_client",
            "-connect",
            &format!("127.0.0.1:{port}"),
            "-tls1_3",
            "-servername",
            host,
            "-verify_hostname",
            host,
            "-verify_return_error",
            "-CAfile",
            client.join("ca.crt").to_str().unwrap(),
            "-cert",
            client.join("tls.crt").to_str().unwrap(),
            "-key",
            client.join("tls.key").to_str().unwrap(),
            "-cert_chain",
            client.join("tls.crt").to_str().unwrap(),
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("Verify return code: 0 (ok)"),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
