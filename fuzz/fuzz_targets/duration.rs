//! Go durations: never panic; accepted input formats and parses back equal.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshca_pki::{format_duration, parse_duration};

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(d) = parse_duration(s) {
        assert_eq!(
            parse_duration(&format_duration(d)).expect("formatted parses"),
            d
        );
    }
});
