//! Heap profiles, with the `heap-profile` feature: jemalloc is the
//! allocator, built with its sampling profiler, which `--heap-profile`
//! activates; every service then serves `GET /debug/pprof/heap` (a gzipped
//! pprof protobuf: `go tool pprof -http=: heap.pb.gz`) on its HTTP port.
//! Without the feature the system allocator stays, and `--heap-profile`
//! is refused: the default build's memory per connection must not change.

use crate::config::ConfigError;

#[cfg(feature = "heap-profile")]
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc reads its options from this symbol before the first
/// allocation: the profiler is compiled in but inactive (no sampling cost)
/// until `--heap-profile`; once active, one allocation is sampled per
/// 512 KiB allocated on average (2^19).
#[cfg(feature = "heap-profile")]
#[allow(non_upper_case_globals, unsafe_code)]
// SAFETY: jemalloc reads the symbol as a NUL-terminated string, which it is,
// and nothing else defines it.
#[unsafe(export_name = "malloc_conf")]
pub static malloc_conf: &[u8] = b"prof:true,prof_active:false,lg_prof_sample:19\0";

/// Starts sampling and adds `/debug/pprof/heap` to every service's HTTP
/// port. Must run before the services build their routes.
#[cfg(feature = "heap-profile")]
pub fn enable() -> Result<(), ConfigError> {
    let ctl = jemalloc_pprof::PROF_CTL
        .as_ref()
        .ok_or_else(|| ConfigError::new("--heap-profile: jemalloc's profiler is not available"))?;
    ctl.try_lock()
        .map_err(|e| ConfigError::caused("--heap-profile: jemalloc's profiler is busy", e))?
        .activate()
        .map_err(|e| {
            ConfigError::caused("--heap-profile: could not activate jemalloc's profiler", e)
        })?;
    herald_ops::set_debug_routes(
        axum::Router::new().route("/debug/pprof/heap", axum::routing::get(heap)),
    );
    tracing::info!("heap profiling on: GET /debug/pprof/heap on the HTTP port");
    Ok(())
}

#[cfg(feature = "heap-profile")]
async fn heap() -> axum::response::Response {
    use axum::http::{StatusCode, header};
    use axum::response::IntoResponse;
    let Some(ctl) = jemalloc_pprof::PROF_CTL.as_ref() else {
        return (StatusCode::SERVICE_UNAVAILABLE, "heap profiling is off\n").into_response();
    };
    let mut ctl = ctl.lock().await;
    match ctl.dump_pprof() {
        Ok(pprof) => (
            [
                (header::CONTENT_TYPE, "application/octet-stream"),
                (
                    header::CONTENT_DISPOSITION,
                    "attachment; filename=\"heap.pb.gz\"",
                ),
            ],
            pprof,
        )
            .into_response(),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("could not write a heap profile: {e}\n"),
        )
            .into_response(),
    }
}

#[cfg(not(feature = "heap-profile"))]
pub fn enable() -> Result<(), ConfigError> {
    Err(ConfigError::new(
        "--heap-profile: this herald was built without the heap-profile feature \
         (cargo build --release --bin herald --features heap-profile)",
    ))
}
