//! `meshca.toml`, through the parser the binary uses: never a panic; every
//! refusal names the file; an accepted file is valid, and what `init` would
//! write for it reads back equal.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use meshca::config::Config;

fuzz_target!(|data: &[u8]| {
    let path = Path::new("/etc/meshca/meshca.toml");
    match Config::parse(data, path) {
        Ok(c) => {
            let text = c.to_toml().expect("an accepted config encodes");
            let again = Config::parse(text.as_bytes(), path).expect("an encoded config parses");
            assert_eq!(again, c);
        }
        Err(e) => {
            let msg = format!("{e:#}");
            assert!(
                msg.contains("meshca.toml"),
                "the refusal does not name the file: {msg}"
            );
        }
    }
});
