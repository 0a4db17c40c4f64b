//! Bill24's answers: the authorize answer (token, expiry) and a balance answer's code.
#![no_main]

use bill24::wire::{balance_code, parse_authorize, parse_expire_time};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = parse_authorize(data);
    let _ = balance_code(data);
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = parse_expire_time(text);
    }
});
