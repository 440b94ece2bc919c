//! The allocator of everything that links the training crate (`duet-train` and the tests that
//! train): mimalloc instead of glibc's malloc. A CPU training step allocates and
//! frees hundreds of multi-megabyte activation and gradient buffers; glibc serves each from
//! fresh `mmap`ed pages that the kernel must fault in and zero (perf: ~15 % of a `small`
//! caption step in the kernel, another ~10 % in libc). mimalloc reuses them: 1.56 → 1.33 s a
//! step, and 1.11 s with [`keep_freed_memory`] (docs/TRAINING.md).

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Stops mimalloc from returning freed pages to the OS shortly after a free (its default, 1 s
/// in the mimalloc this builds): the next step asks for the same buffers again, and
/// re-faulting them cost another 14 % of a step. The process's peak memory is unchanged — it
/// still holds one step's working set — it just does not give it back between steps. A
/// `MIMALLOC_PURGE_DELAY` set in the environment wins. Called first thing by `duet-train` and
/// by the end-to-end tests' training fixtures.
pub fn keep_freed_memory() {
    use libmimalloc_sys::{mi_option_set, mi_option_t};
    // `mi_option_purge_delay` is entry 15 of `mi_option_e` in the mimalloc.h that
    // libmimalloc-sys 0.1 builds (between `mi_option_eager_commit_delay` = 14 and
    // `mi_option_use_numa_nodes` = 16, which the crate names); the crate has no constant for it.
    const PURGE_DELAY: mi_option_t = libmimalloc_sys::mi_option_use_numa_nodes - 1;
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
        return;
    }
    // SAFETY: setting a mimalloc option is a plain call with no pointers, allowed at any time.
    unsafe { mi_option_set(PURGE_DELAY, -1) }
}
