//! The recipe parser on arbitrary text: it must never panic, hang or exhaust memory, whatever
//! the YAML (deep nesting, aliases, huge numbers, wrong types).
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use smelt::recipe::Recipe;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // A folder that does not exist: model paths resolve against it and are never opened.
    let _ = Recipe::parse(text, Path::new("/nonexistent/smelt-fuzz/recipe.yml"));
});
