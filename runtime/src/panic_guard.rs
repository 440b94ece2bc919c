//! Panics of the libraries duet calls (tract, onnxruntime's bindings, tokenizers), caught and
//! turned into typed errors — quietly.
//!
//! `catch_unwind` stops a panic but not its report: the process's panic hook has already
//! printed "thread … panicked at …" to stderr, which belongs to the host application (a C
//! program embedding `libduet`) or shows a user a crash that was in fact handled. [`catch`]
//! installs, once, a hook that stays silent for panics inside a [`catch`] on the same thread
//! and records their location; every other panic goes to the hook that was there before, as
//! if nothing had changed.

use std::any::Any;
use std::cell::{Cell, RefCell};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Once;

thread_local! {
    /// How many [`catch`] calls this thread is inside (they nest: a callback may call back).
    static DEPTH: Cell<u32> = const { Cell::new(0) };
    /// Where the last quiet panic happened.
    static LOCATION: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Runs `f`; a panic inside it is returned as `Err` with its message and location, and is not
/// printed.
pub fn catch<R>(f: impl FnOnce() -> R) -> Result<R, String> {
    install_hook();
    // A location left by a panic that was caught elsewhere (a pool thread's) is not this one's.
    LOCATION.with(|l| l.borrow_mut().take());
    DEPTH.with(|d| d.set(d.get() + 1));
    let result = catch_unwind(AssertUnwindSafe(f));
    DEPTH.with(|d| d.set(d.get() - 1));
    result.map_err(|payload| {
        let at = LOCATION
            .with(|l| l.borrow_mut().take())
            .map(|l| format!(" at {l}"))
            .unwrap_or_default();
        format!("panicked{at}: {}", message(payload.as_ref()))
    })
}

/// Makes every panic on this thread quiet, for a thread of a pool whose work is always run
/// under a [`catch`] on another thread (rayon hands a worker's panic to the thread that waits
/// for the work): without it a panic in a piece of a split product would be printed there,
/// although the [`catch`] that receives it reports it as an error.
pub fn quiet_thread() {
    install_hook();
    DEPTH.with(|d| d.set(d.get() + 1));
}

fn install_hook() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if DEPTH.with(Cell::get) == 0 {
                previous(info);
                return;
            }
            let at = info
                .location()
                .map(|l| format!("{}:{}", l.file(), l.line()));
            LOCATION.with(|p| *p.borrow_mut() = at);
        }));
    });
}

/// The text of a panic payload (`panic!` with a literal or a formatted message).
pub fn message(payload: &(dyn Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_caught_panic_is_returned_with_its_message_and_location() {
        let e = catch(|| -> u32 { panic!("boom {}", 7) }).unwrap_err();
        assert!(e.contains("boom 7"), "{e}");
        assert!(e.contains("runtime/src/panic_guard.rs:"), "{e}");
        assert_eq!(catch(|| 5).unwrap(), 5);
        // Nested: the inner panic is caught by the inner call.
        let outer = catch(|| catch(|| -> () { panic!("inner") }).unwrap_err());
        assert!(outer.unwrap().contains("inner"));
    }
}
