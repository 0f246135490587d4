//! Who may call what. Every route of the API (the OpenAPI document the
//! server serves lists them, and the table in `routes` must name each one)
//! is called as a workload (its own client certificate), as the holder of a
//! join token, with no credential, and as the admin, and each answer is
//! checked exactly: the status, and for a refusal the JSON `error.code` and
//! `error.message`. Deleting any `require_admin` in
//! crates/meshca-server/src/api.rs makes the workload and token rows of its
//! route fail.
//!
//! A new route is one row in `routes`; a route the document lists and the
//! table does not fails the test, and so does a row for a route the document
//! no longer has.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use serde_json::{Value, json};

use crate::common::*;

/// What one caller gets from one route.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Want {
    /// Served, with this status.
    Served(u16),
    /// Refused with this status, `error.code` and `error.message`.
    Refused(u16, &'static str, String),
}

/// One route, called once by each kind of caller (workload, token holder,
/// nobody, then the admin: the admin last, so that what it does, a
/// revocation or a deletion, is seen to be done by it and nobody before).
#[derive(Debug)]
struct Route {
    method: &'static str,
    /// The path as the OpenAPI document has it.
    template: &'static str,
    /// The path called.
    path: String,
    body: Option<String>,
    /// A stream that never ends (`/v1/events`): its status is read, then
    /// the call is cut off.
    stream: bool,
    workload: Want,
    token: Want,
    anonymous: Want,
    admin: Want,
    /// A JSON pointer into the admin's answer and the value it must have
    /// (that nobody before the admin did what the route does).
    admin_says: Option<(&'static str, Value)>,
}

/// Who calls, and the refusals every admin-only route gives them.
struct Callers {
    workload: Vec<String>,
    token: Vec<String>,
    token_id: String,
    admin: Vec<String>,
}

const ANONYMOUS_REFUSED: &str =
    "this endpoint needs the admin client certificate (meshca-data/admin/tls.crt)";
const WORKLOAD_REFUSED: &str = "workload default/web is not the admin";
const NO_CREDENTIAL: &str = "present a client certificate (admin, or the identity itself) or `Authorization: Bearer <join token>`";
const EVENTS_REFUSED: &str = "events need the admin certificate or a workload's own certificate";

impl Callers {
    fn not_admin_token(&self) -> Want {
        Want::Refused(
            403,
            "forbidden",
            format!("token {} is not the admin", self.token_id),
        )
    }

    /// A route only the admin may call.
    fn admin_only(
        &self,
        method: &'static str,
        template: &'static str,
        path: String,
        body: Option<String>,
        admin_status: u16,
    ) -> Route {
        Route {
            method,
            template,
            path,
            body,
            stream: false,
            workload: Want::Refused(403, "forbidden", WORKLOAD_REFUSED.into()),
            token: self.not_admin_token(),
            anonymous: Want::Refused(401, "unauthenticated", ANONYMOUS_REFUSED.into()),
            admin: Want::Served(admin_status),
            admin_says: None,
        }
    }

    /// A route anyone may call, credentials or not.
    fn public(&self, template: &'static str) -> Route {
        Route {
            method: "GET",
            template,
            path: template.to_owned(),
            body: None,
            stream: false,
            workload: Want::Served(200),
            token: Want::Served(200),
            anonymous: Want::Served(200),
            admin: Want::Served(200),
            admin_says: None,
        }
    }
}

/// What the table needs to know about the CA it runs against.
struct Fixture {
    /// The workload's (default/web) own serial.
    web_serial: String,
    /// A certificate the admin revokes.
    victim_serial: String,
    /// The one certificate of default/released, which the admin releases.
    released_serial: String,
    /// A token the admin deletes.
    victim_token_id: String,
    /// A CSR for /v1/sign (a JSON string).
    csr: String,
}

/// The table: every route of the API and what each caller gets.
fn routes(c: &Callers, f: &Fixture) -> Vec<Route> {
    let sign_body = format!(r#"{{"name":"web","csr":{}}}"#, f.csr);
    let mut own_identity = c.admin_only(
        "GET",
        "/v1/identities/{namespace}/{name}",
        "/v1/identities/default/web".into(),
        None,
        200,
    );
    own_identity.workload = Want::Served(200);
    let mut revoke = c.admin_only(
        "POST",
        "/v1/certificates/{serial}/revoke",
        format!("/v1/certificates/{}/revoke", f.victim_serial),
        Some("{}".into()),
        200,
    );
    revoke.admin_says = Some(("/already_revoked", json!(false)));
    let mut release = c.admin_only(
        "DELETE",
        "/v1/identities/{namespace}/{name}",
        "/v1/identities/default/released".into(),
        None,
        200,
    );
    release.admin_says = Some(("/revoked", json!([f.released_serial])));
    let mut own_record = c.admin_only(
        "GET",
        "/v1/certificates/{serial}",
        format!("/v1/certificates/{}", f.web_serial),
        None,
        200,
    );
    own_record.admin_says = Some(("/serial", json!(f.web_serial)));
    let mut by_cn = c.admin_only(
        "GET",
        "/v1/identities",
        "/v1/identities?cn=db.default.svc.cluster.local".into(),
        None,
        200,
    );
    by_cn.admin_says = Some(("/name", json!("db")));
    let mut rotate_one = c.admin_only(
        "POST",
        "/v1/identities/{namespace}/{name}/rotate",
        "/v1/identities/default/db/rotate".into(),
        None,
        200,
    );
    rotate_one.admin_says = Some(("/rotating", json!(["default/db"])));
    let mut new_token = c.admin_only(
        "POST",
        "/v1/tokens",
        "/v1/tokens".into(),
        Some(r#"{"name":"db"}"#.into()),
        201,
    );
    new_token.admin_says = Some(("/name", json!("db")));
    vec![
        // Certificates: a workload signs for itself; a token buys one for
        // its identity, by CSR or with a key the CA makes.
        Route {
            method: "POST",
            template: "/v1/sign",
            path: "/v1/sign".into(),
            body: Some(sign_body),
            stream: false,
            workload: Want::Served(200),
            token: Want::Served(200),
            anonymous: Want::Refused(401, "unauthenticated", NO_CREDENTIAL.into()),
            admin: Want::Served(200),
            admin_says: None,
        },
        Route {
            method: "POST",
            template: "/v1/issue",
            path: "/v1/issue".into(),
            body: Some(r#"{"name":"web"}"#.into()),
            stream: false,
            workload: Want::Refused(
                403,
                "forbidden",
                "a workload renews with /v1/sign and its own CSR".into(),
            ),
            token: Want::Served(200),
            anonymous: Want::Refused(401, "unauthenticated", NO_CREDENTIAL.into()),
            admin: Want::Served(200),
            admin_says: None,
        },
        c.admin_only(
            "GET",
            "/v1/certificates",
            "/v1/certificates".into(),
            None,
            200,
        ),
        // Even the workload's own record is the admin's.
        own_record,
        by_cn,
        // Another identity's certificate: the admin's; its own: the workload's too.
        c.admin_only(
            "GET",
            "/v1/identities/{namespace}/{name}",
            "/v1/identities/default/db".into(),
            None,
            200,
        ),
        own_identity,
        rotate_one,
        c.admin_only("POST", "/v1/rotate", "/v1/rotate".into(), None, 200),
        c.public("/v1/bundle"),
        c.public("/v1/bundle/custody"),
        c.public("/v1/crl"),
        c.public("/v1/crls"),
        c.public("/v1/openapi.json"),
        c.public("/healthz"),
        c.public("/readyz"),
        c.public("/metrics"),
        new_token,
        c.admin_only("GET", "/v1/tokens", "/v1/tokens".into(), None, 200),
        c.admin_only("GET", "/v1/ca", "/v1/ca".into(), None, 200),
        Route {
            method: "GET",
            template: "/v1/events",
            path: "/v1/events".into(),
            body: None,
            stream: true,
            workload: Want::Served(200),
            token: Want::Refused(401, "unauthenticated", EVENTS_REFUSED.into()),
            anonymous: Want::Refused(401, "unauthenticated", EVENTS_REFUSED.into()),
            admin: Want::Served(200),
            admin_says: None,
        },
        // What changes state, last: each is done by the admin, and only by it.
        c.admin_only(
            "DELETE",
            "/v1/tokens/{id}",
            format!("/v1/tokens/{}", f.victim_token_id),
            None,
            204,
        ),
        revoke,
        release,
        // A renewal of the intermediate under the same root: the other
        // credentials of this test stay valid.
        c.admin_only(
            "POST",
            "/v1/ca/rotate/{step}",
            "/v1/ca/rotate/intermediate".into(),
            None,
            200,
        ),
    ]
}

/// One call: (status, body). A stream is cut off after 2 s (curl's exit 28,
/// its status read before); anything else that curl cannot complete fails.
fn call(srv: &Server, route: &Route, auth: &[String]) -> (u16, String) {
    let max_time = if route.stream { "2" } else { "30" };
    let mut cmd = Command::new("curl");
    cmd.args([
        "-sS",
        "-o",
        "-",
        "-w",
        "\n%{http_code}",
        "-X",
        route.method,
        "--max-time",
        max_time,
        "--cacert",
    ])
    .arg(srv.dir.join("admin/ca.crt"))
    .args(auth);
    if let Some(b) = &route.body {
        cmd.args(["-H", "Content-Type: application/json", "--data-binary", b]);
    }
    let out = cmd
        .arg(format!("{}{}", srv.url(), route.path))
        .output()
        .unwrap();
    let finished = out.status.success() || (route.stream && out.status.code() == Some(28));
    assert!(
        finished,
        "curl {} {}: {:?} {}",
        route.method,
        route.path,
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "000"));
    let code: u16 = code.trim().parse().unwrap_or(0);
    if code >= 400 || route.path.starts_with("/metrics") {
        keep_output("http-body", body.as_bytes());
    }
    if route.path.starts_with("/v1/tokens") && route.method == "POST" && code == 201 {
        keep_secret("token", body.as_bytes());
    }
    (code, body.to_owned())
}

/// What is wrong with an answer, if anything.
fn check(got: &(u16, String), want: &Want) -> Option<String> {
    let (code, body) = got;
    match want {
        Want::Served(status) if code == status => None,
        Want::Refused(status, error_code, message) => {
            let v: Value = serde_json::from_str(body).unwrap_or(Value::Null);
            let ok = code == status
                && v["error"]["code"] == *error_code
                && v["error"]["message"] == message.as_str();
            (!ok).then(|| {
                format!(
                    "{code} {body}; expected {status} {{code: {error_code}, message: {message}}}"
                )
            })
        }
        Want::Served(status) => Some(format!(
            "{code} {}; expected {status}",
            body.chars().take(300).collect::<String>()
        )),
    }
}

fn serial_of(cert: &Path) -> String {
    let der = meshca_pki::parse_certs(&std::fs::read(cert).unwrap()).unwrap();
    meshca_pki::cert_facts(&der[0]).unwrap().serial.to_hex()
}

/// Every operation of the OpenAPI document the server serves, as
/// `METHOD /path`.
fn documented(srv: &Server) -> BTreeSet<String> {
    let (code, body) = srv.curl("GET", "/v1/openapi.json", None, &[]);
    assert_eq!(code, 200, "{body}");
    let doc: Value = serde_json::from_str(&body).unwrap();
    let mut ops = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            if [
                "get", "put", "post", "delete", "patch", "head", "options", "trace",
            ]
            .contains(&method.as_str())
            {
                ops.insert(format!("{} {path}", method.to_uppercase()));
            }
        }
    }
    ops
}

#[test]
fn every_route_answers_each_kind_of_caller_as_designed() {
    let tmp = scratch();
    let srv = Server::start(&tmp.path().join("data"), &[]);
    let out = |name: &str| tmp.path().join(name);
    for name in ["web", "db", "victim", "released"] {
        srv.cli_ok(&["issue", name, "--out", out(name).to_str().unwrap()]);
    }
    let token = srv
        .cli_ok(&["token", "create", "web", "--uses", "10"])
        .trim()
        .to_owned();
    let tid = token_id(&token);
    let victim_token = srv.cli_ok(&["token", "create", "db"]).trim().to_owned();
    let (csr, _key) = openssl_csr(tmp.path(), "web-csr", &[]);
    let callers = Callers {
        workload: cert_args(&out("web")),
        token: bearer(&token),
        token_id: tid.clone(),
        admin: srv.admin(),
    };
    let fixture = Fixture {
        web_serial: serial_of(&out("web").join("tls.crt")),
        victim_serial: serial_of(&out("victim").join("tls.crt")),
        released_serial: serial_of(&out("released").join("tls.crt")),
        victim_token_id: token_id(&victim_token),
        csr,
    };
    let table = routes(&callers, &fixture);

    // The table and the document name the same routes.
    let listed: BTreeSet<String> = table
        .iter()
        .map(|r| format!("{} {}", r.method, r.template))
        .collect();
    let documented = documented(&srv);
    let missing: Vec<&String> = documented.difference(&listed).collect();
    let stale: Vec<&String> = listed.difference(&documented).collect();
    assert!(
        missing.is_empty() && stale.is_empty(),
        "routes in /v1/openapi.json but not in this test's table (add a row saying who may call them): {missing:?}; rows for routes the document does not have: {stale:?}"
    );

    let mut wrong = Vec::new();
    for route in &table {
        let as_who: [(&str, &[String], &Want); 4] = [
            ("workload", callers.workload.as_slice(), &route.workload),
            ("token", callers.token.as_slice(), &route.token),
            ("anonymous", &[], &route.anonymous),
            ("admin", callers.admin.as_slice(), &route.admin),
        ];
        for (who, auth, want) in as_who {
            let got = call(&srv, route, auth);
            if let Some(why) = check(&got, want) {
                wrong.push(format!("{} {} as {who}: {why}", route.method, route.path));
                continue;
            }
            if who == "admin"
                && let Some((pointer, value)) = &route.admin_says
            {
                let v: Value = serde_json::from_str(&got.1).unwrap_or(Value::Null);
                if v.pointer(pointer) != Some(value) {
                    wrong.push(format!(
                        "{} {} as admin: {pointer} is {:?}, expected {value}",
                        route.method,
                        route.path,
                        v.pointer(pointer)
                    ));
                }
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "{} wrong answers:\n{}",
        wrong.len(),
        wrong.join("\n")
    );

    // The token bought the two certificates it was asked for (/v1/sign and
    // /v1/issue) and nothing else: no admin-only route took a use of it.
    let (code, body) = srv.curl("GET", "/v1/tokens", None, &srv.admin());
    assert_eq!(code, 200, "{body}");
    let tokens: Value = serde_json::from_str(&body).unwrap();
    let ours = tokens["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["id"] == tid.as_str())
        .unwrap_or_else(|| panic!("token {tid} is gone: {body}"));
    assert_eq!(ours["uses"], 2, "{ours}");
    assert!(
        !body.contains(&fixture.victim_token_id),
        "the deleted token is still listed: {body}"
    );
}

fn token_id(token: &str) -> String {
    token
        .strip_prefix("mct_")
        .and_then(|t| t.split_once('.'))
        .unwrap_or_else(|| panic!("not a join token: {token:?}"))
        .0
        .to_owned()
}
