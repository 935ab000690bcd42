//! The fuzz targets' bodies (`fuzz/src/lib.rs`, which `cargo fuzz` runs with
//! libFuzzer on nightly) run here, on stable, on every committed seed in
//! `fuzz/seeds/<target>/`: the seeds are regression inputs, and a change of
//! the crate's API that breaks a target breaks this build.

#[path = "../fuzz/src/lib.rs"]
mod targets;

use std::path::Path;

/// A target's body.
type Body = fn(&[u8]);

const TARGETS: [(&str, Body); 4] = [
    ("client_op", targets::client_op),
    ("http_head", targets::http_head),
    ("inflate", targets::inflate),
    ("ws_frame", targets::ws_frame),
];

fn seeds(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds").join(target);
    let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| {
            let p = e.unwrap().path();
            (p.file_name().unwrap().to_string_lossy().into_owned(), std::fs::read(&p).unwrap())
        })
        .collect();
    out.sort();
    assert!(!out.is_empty(), "no seeds in {}", dir.display());
    out
}

#[test]
fn every_fuzz_target_is_replayed_here() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/fuzz_targets");
    let mut on_disk: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path().file_stem().unwrap().to_string_lossy().into_owned())
        .collect();
    on_disk.sort();
    let here: Vec<&str> = TARGETS.iter().map(|(n, _)| *n).collect();
    assert_eq!(on_disk, here, "a fuzz target without a replay here (or the reverse)");
}

#[test]
fn every_seed_runs_through_its_target() {
    for (target, body) in TARGETS {
        for (name, data) in seeds(target) {
            // A panic names the seed.
            let r = std::panic::catch_unwind(|| body(&data));
            assert!(r.is_ok(), "fuzz target {target} panicked on seed {name}");
            // And every prefix of it: truncated input is what fuzzing starts from.
            for n in 0..data.len() {
                let r = std::panic::catch_unwind(|| body(&data[..n]));
                assert!(r.is_ok(), "fuzz target {target} panicked on the first {n} bytes of seed {name}");
            }
        }
    }
}

/// The op seeds are ops the parser accepts, so they start the fuzzer inside
/// every op's branch (history and `since` included).
#[test]
fn the_op_seeds_parse_and_cover_history_and_since() {
    let seeds = seeds("client_op");
    for (name, data) in &seeds {
        assert!(corecast::protocol::ClientOp::parse(data).is_ok(), "seed {name} does not parse");
    }
    let text: Vec<String> = seeds.iter().map(|(_, d)| String::from_utf8_lossy(d).into_owned()).collect();
    assert!(text.iter().any(|t| t.contains(r#""op":"history""#)), "a history seed");
    assert!(text.iter().any(|t| t.contains(r#""op":"subscribe""#) && t.contains(r#""since""#)), "a since seed");
}
