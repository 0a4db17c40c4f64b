//! The balance request body parser: any bytes give a valid code or a refusal.
#![no_main]

use bill24_gateway::internals::{parse_body, validate_sync_code};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(code) = parse_body(data) {
        assert!(validate_sync_code(&code).is_ok());
    }
});
