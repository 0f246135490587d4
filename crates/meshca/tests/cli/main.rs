//! Integration tests: the built `meshca` binary against real peers
//! (openssl, curl, pkilint). One test binary, so one link for all of them.

mod common;
mod crl;
mod refusal;

mod crash;

mod admin_only;
mod agent;
mod attacks;
mod bad_input;
mod corrupt;
mod events;
mod hostile;
mod import;
mod impostor;
mod init;
mod issue;
mod leaks;
mod limits;
mod lint;
mod misuse;
mod proxy;
mod records;
mod replicas;
mod rotation;
mod scan;
mod schema;
mod serve;
mod skew;
mod tls;
mod tokens;
mod trust;
mod trust_etcd;
mod trust_proxy;
mod trust_vault;
mod vault;
mod verifiers;
