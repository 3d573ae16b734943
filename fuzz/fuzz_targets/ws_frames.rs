//! Fuzz target `ws_frames`: the edge's WebSocket frame reader, fed whole and in pieces.
//! What it checks: `fuzz/src/ws_frames.rs`; how to run it: `docs/fuzzing.md`.

#[cfg(fuzzing)]
fn main() {
    // Set up once, before AFL++ forks the runs.
    let target = std::panic::AssertUnwindSafe(herald_fuzz::ws_frames::Target::new());
    afl::fuzz!(|data: &[u8]| {
        target.check(data);
    });
}

/// Without afl: replays the files named (or standard input).
#[cfg(not(fuzzing))]
fn main() {
    let target = herald_fuzz::ws_frames::Target::new();
    herald_fuzz::replay(|data| {
        target.check(data);
    });
}
