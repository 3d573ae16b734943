//! Herald's fuzz targets: what each one checks of an input, shared by the
//! AFL++ binaries (`cargo afl build`, `--cfg fuzzing`) and by the plain
//! binaries that replay files (`cargo build`). See `docs/fuzzing.md`.

pub mod token;
pub mod wire_frame;
pub mod ws_frames;

use std::path::{Path, PathBuf};

/// The `main` of a target outside afl: runs `check` on each file named on
/// the command line (a directory stands for the files in it, in name
/// order), or on standard input when none is named. A panic names the file
/// and exits non-zero, as a crash under afl-fuzz would.
pub fn replay(check: impl Fn(&[u8])) {
    let args: Vec<PathBuf> = std::env::args_os().skip(1).map(PathBuf::from).collect();
    if args.is_empty() {
        let mut input = Vec::new();
        std::io::Read::read_to_end(&mut std::io::stdin(), &mut input).expect("reading stdin");
        check(&input);
        return;
    }
    let mut files = Vec::new();
    for arg in &args {
        collect(arg, &mut files);
    }
    for file in &files {
        let input = std::fs::read(file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        eprintln!("{}", file.display());
        check(&input);
    }
    eprintln!("{} inputs, no crash", files.len());
}

fn collect(path: &Path, files: &mut Vec<PathBuf>) {
    if path.is_dir() {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
            .map(|entry| entry.expect("a directory entry").path())
            .filter(|p| p.is_file())
            .collect();
        entries.sort();
        files.extend(entries);
    } else {
        files.push(path.to_path_buf());
    }
}
