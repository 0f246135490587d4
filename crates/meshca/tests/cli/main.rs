//! Integration tests: the built `meshca` binary against real peers
//! (openssl, curl, pkilint). One test binary, so one link for all of them.

mod common;

mod crash;

mod agent;
mod attacks;
mod bad_input;
mod hostile;
mod import;
mod init;
mod issue;
mod leaks;
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
mod trust;
mod trust_etcd;
mod trust_proxy;
mod trust_vault;
mod vault;
mod verifiers;
