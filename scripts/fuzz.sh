#!/usr/bin/env bash
# Coverage-guided fuzzing of the parsers clients reach, with AFL++ through
# cargo-afl, on stable Rust (docs/fuzzing.md): the targets of fuzz/
# (wire_frame, ws_frames, token), built with `cargo afl build --release`.
#
#   scripts/fuzz.sh [--seconds N] [TARGET...]   fuzz each target for N seconds
#                                               (default 300), one after another
#   scripts/fuzz.sh --replay [TARGET...]        run every seed of fuzz/corpus/
#                                               through the built targets, without
#                                               afl-fuzz: a quick check that they
#                                               build and pass their seeds
#   scripts/fuzz.sh --replay --plain [TARGET...]
#                                               the same with a plain `cargo build`
#                                               (no afl, no cargo-afl): the same
#                                               checks, a quarter of the build time
#
# Fails if a target crashed (a panic or a failed check), and prints where
# the crashing inputs are and how to replay one. afl-fuzz's output (queue,
# crashes, hangs, fuzzer_stats) goes to $CARGO_TARGET_DIR/afl/TARGET
# (fuzz/target/afl/TARGET by default) and is replaced by the next run.
#
# cargo-afl is installed with `cargo install` when missing or of another
# version; installing it builds AFL++ (afl-fuzz and its runtime) from the
# sources it ships, with make and a C compiler. No LLVM or clang is needed:
# coverage comes from rustc's own instrumentation (the AFL++ LLVM plugins,
# which need nightly Rust, are not used).
set -euo pipefail
cd "$(dirname "$0")/.."
root="$PWD"

# Pinned with the `afl` crate in fuzz/Cargo.toml: the runtime cargo-afl
# builds is the one the crate's version expects.
CARGO_AFL_VERSION=0.18.2
TARGETS=(wire_frame ws_frames token)

seconds=300
replay=false
plain=false
chosen=()
while [ $# -gt 0 ]; do
  case "$1" in
  --seconds)
    seconds="${2:?--seconds needs a number}"
    shift 2
    ;;
  --replay)
    replay=true
    shift
    ;;
  --plain)
    plain=true
    shift
    ;;
  -h | --help)
    sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
    exit 0
    ;;
  -*)
    echo "scripts/fuzz.sh: unknown option $1 (see --help)" >&2
    exit 2
    ;;
  *)
    chosen+=("$1")
    shift
    ;;
  esac
done
[ ${#chosen[@]} -gt 0 ] || chosen=("${TARGETS[@]}")
for t in "${chosen[@]}"; do
  [[ " ${TARGETS[*]} " == *" $t "* ]] || {
    echo "scripts/fuzz.sh: no target $t; the targets: ${TARGETS[*]}" >&2
    exit 2
  }
done

fail() {
  echo "fuzz: FAILED: $*" >&2
  exit 1
}

# The fuzz crate is a workspace of its own: its target directory is
# fuzz/target unless CARGO_TARGET_DIR says otherwise.
target="${CARGO_TARGET_DIR:-$root/fuzz/target}"
mkdir -p "$target"
target="$(cd "$target" && pwd)"
export CARGO_TARGET_DIR="$target"

# The versions Herald ships: the main workspace's lock file, which cargo
# trims to what the fuzz crate uses (and completes with afl's).
cp Cargo.lock fuzz/Cargo.lock

if $plain; then
  $replay || fail "--plain goes with --replay: afl-fuzz needs the afl build"
  echo "fuzz: building the targets without afl (cargo build, into $target)"
  started=$SECONDS
  (cd fuzz && cargo build --bins) || fail "the build of the fuzz targets failed"
  echo "fuzz: built in $((SECONDS - started)) s"
  started=$SECONDS
  for t in "${chosen[@]}"; do
    # Without afl a target replays the files it is given, and names each.
    "$target/debug/$t" "fuzz/corpus/$t" 2>"$target/replay-$t.log" || {
      tail -n 30 "$target/replay-$t.log" >&2
      fail "$t crashed on the last seed named above (replay it: $target/debug/$t FILE)"
    }
    echo "fuzz: $t: $(tail -n 1 "$target/replay-$t.log")"
  done
  echo "fuzz: replayed in $((SECONDS - started)) s"
  exit 0
fi

if [ "$(cargo afl --version 2>/dev/null | awk '{print $2}')" != "$CARGO_AFL_VERSION" ]; then
  echo "fuzz: installing cargo-afl $CARGO_AFL_VERSION (it builds AFL++ too; a minute or two)"
  cargo install --locked --version "$CARGO_AFL_VERSION" cargo-afl || fail "could not install cargo-afl"
fi
# Installing cargo-afl builds AFL++ for the current rustc; after a Rust
# update (or an install that could not build it) it is built here.
if ! out="$(cargo afl config --build 2>&1)"; then
  grep -q "already built" <<<"$out" || {
    echo "$out" >&2
    fail "could not build AFL++ (cargo afl config --build; it needs make and a C compiler)"
  }
fi

echo "fuzz: building the targets (cargo afl build --release, into $target)"
started=$SECONDS
(cd fuzz && cargo afl build --release --bins) || fail "the build of the fuzz targets failed"
echo "fuzz: built in $((SECONDS - started)) s"

if $replay; then
  started=$SECONDS
  for t in "${chosen[@]}"; do
    bin="$target/release/$t"
    n=0
    for seed in fuzz/corpus/"$t"/*; do
      [ -f "$seed" ] || continue
      if ! "$bin" <"$seed" >/dev/null 2>"$target/replay-$t.log"; then
        cat "$target/replay-$t.log" >&2
        fail "$t crashed on the seed $seed (replay it: $bin < $seed)"
      fi
      n=$((n + 1))
    done
    [ "$n" -gt 0 ] || fail "no seeds in fuzz/corpus/$t"
    echo "fuzz: $t: $n seeds, no crash"
  done
  echo "fuzz: replayed in $((SECONDS - started)) s"
  exit 0
fi

# afl-fuzz refuses to start on machines set up for something else unless
# told to go on: CPU frequency scaling it cannot check, a core_pattern that
# pipes core dumps to a program (crashes are still seen: the targets abort).
export AFL_SKIP_CPUFREQ=1
export AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES=1
export AFL_NO_UI=1
# Inside a container the CPU to bind to may not be free: run anyway.
export AFL_TRY_AFFINITY=1

stat() { sed -n "s/^$2 *: //p" "$1"; }

crashed=()
for t in "${chosen[@]}"; do
  out="$target/afl/$t"
  rm -rf "$out"
  mkdir -p "$out"
  args=(-i "fuzz/corpus/$t" -o "$out" -V "$seconds")
  [ -f "fuzz/dict/$t.dict" ] && args+=(-x "fuzz/dict/$t.dict")
  echo "fuzz: $t for $seconds s (afl-fuzz's log: $out/afl-fuzz.log)"
  cargo afl fuzz "${args[@]}" -- "$target/release/$t" >"$out/afl-fuzz.log" 2>&1 ||
    fail "afl-fuzz did not run $t: $(tail -n 20 "$out/afl-fuzz.log")"
  stats="$out/default/fuzzer_stats"
  [ -f "$stats" ] || fail "afl-fuzz left no fuzzer_stats for $t: $(tail -n 20 "$out/afl-fuzz.log")"
  echo "fuzz: $t: $(stat "$stats" execs_done) runs, $(stat "$stats" execs_per_sec)/s;" \
    "edges $(stat "$stats" edges_found) of $(stat "$stats" total_edges) ($(stat "$stats" bitmap_cvg));" \
    "corpus $(stat "$stats" corpus_count); crashes $(stat "$stats" saved_crashes);" \
    "hangs $(stat "$stats" saved_hangs)"
  if [ "$(stat "$stats" saved_hangs)" != 0 ]; then
    echo "fuzz: $t: inputs that ran past the time limit: $out/default/hangs/" >&2
  fi
  if [ "$(stat "$stats" saved_crashes)" != 0 ]; then
    crashed+=("$t")
    echo "fuzz: $t CRASHED; the inputs:" >&2
    ls -1 "$out"/default/crashes/id:* >&2
    echo "  replay one: $target/release/$t < FILE" >&2
    echo "  or, with the panic's backtrace: (cd fuzz && cargo run --bin $t -- FILE)" >&2
  fi
done
[ ${#crashed[@]} -eq 0 ] || fail "crashes in: ${crashed[*]}"
echo "fuzz: no crash"
