//! Strings across the C ABI, as the tests' C-like callers handle them.

use std::ffi::{c_char, CStr};

/// Takes ownership of a duet string and returns it (NULL → None), freeing it as a C caller
/// must, with `duet_string_free`.
pub fn take(s: *mut c_char) -> Option<String> {
    if s.is_null() {
        return None;
    }
    // SAFETY: a non-NULL string from the duet C ABI, NUL-terminated and not yet freed.
    let text = unsafe { CStr::from_ptr(s) }.to_string_lossy().into_owned();
    // SAFETY: freed once, by the library that allocated it.
    unsafe { duet::duet_string_free(s) };
    Some(text)
}
