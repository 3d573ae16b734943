//! Fuzz target `token`: JWT verification of any text a client presents (herald-auth).
//! What it checks: `fuzz/src/token.rs`; how to run it: `docs/fuzzing.md`.

#[cfg(fuzzing)]
fn main() {
    // Set up once, before AFL++ forks the runs.
    let target = std::panic::AssertUnwindSafe(herald_fuzz::token::Target::new());
    afl::fuzz!(|data: &[u8]| {
        target.check(data);
    });
}

/// Without afl: replays the files named (or standard input).
#[cfg(not(fuzzing))]
fn main() {
    let target = herald_fuzz::token::Target::new();
    herald_fuzz::replay(|data| {
        target.check(data);
    });
}
