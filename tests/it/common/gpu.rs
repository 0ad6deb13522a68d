//! The GPU side of the test helpers: one device shared by a test binary (lavapipe starts its
//! own worker threads per device), and a policy for machines without an adapter.

use std::sync::{Arc, OnceLock};

use smelt::backend::gpu::GpuContext;

/// Without an adapter the GPU tests are skipped with a note, unless SMELT_REQUIRE_GPU is set
/// (`.ci/run` sets it): then a missing GPU is a failure, so CI can never pass by skipping.
fn unavailable(e: &smelt::Error) -> Option<Arc<GpuContext>> {
    if std::env::var_os("SMELT_REQUIRE_GPU").is_some() {
        panic!("SMELT_REQUIRE_GPU is set but no GPU adapter works: {e}");
    }
    eprintln!("note: GPU tests skipped, no adapter: {e}");
    None
}

/// libwayland, probed by the Vulkan loader, complains on stderr when XDG_RUNTIME_DIR is unset
/// (the binary sets it at start-up for the same reason).
fn quiet_wayland() {
    if std::env::var_os("XDG_RUNTIME_DIR").is_none() {
        std::env::set_var("XDG_RUNTIME_DIR", std::env::temp_dir());
    }
}

/// The device shared by every test of this binary.
pub fn gpu_context() -> Option<Arc<GpuContext>> {
    static CTX: OnceLock<Result<Arc<GpuContext>, String>> = OnceLock::new();
    match CTX.get_or_init(|| {
        quiet_wayland();
        GpuContext::new(None)
            .map(Arc::new)
            .map_err(|e| e.to_string())
    }) {
        Ok(c) => Some(c.clone()),
        Err(e) => unavailable(&smelt::Error::Gpu(e.clone())),
    }
}

/// A device of its own, for tests that count what a context does (pipelines built).
pub fn fresh_gpu_context() -> Option<Arc<GpuContext>> {
    quiet_wayland();
    match GpuContext::new(None) {
        Ok(c) => Some(Arc::new(c)),
        Err(e) => unavailable(&e),
    }
}
