//! Fuzz target `wire_frame`: the client frame parser and the SSE body parser (herald-wire).
//! What it checks: `fuzz/src/wire_frame.rs`; how to run it: `docs/fuzzing.md`.

#[cfg(fuzzing)]
fn main() {
    afl::fuzz!(|data: &[u8]| herald_fuzz::wire_frame::check(data));
}

/// Without afl: replays the files named (or standard input).
#[cfg(not(fuzzing))]
fn main() {
    herald_fuzz::replay(herald_fuzz::wire_frame::check);
}
