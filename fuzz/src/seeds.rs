//! `seeds TARGET DIR`: write the seed inputs of fuzz target TARGET
//! (`pohmelfs::fuzz::seeds`) into DIR, one file each (scripts/fuzz).

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [target, dir] = args.as_slice() else {
        eprintln!("usage: seeds TARGET DIR");
        return ExitCode::FAILURE;
    };
    let Some(seeds) = pohmelfs::fuzz::seeds(target) else {
        eprintln!("no fuzz target {target}");
        return ExitCode::FAILURE;
    };
    for (i, seed) in seeds.iter().enumerate() {
        let path = std::path::Path::new(dir).join(format!("seed-{i}"));
        if let Err(e) = std::fs::write(&path, seed) {
            eprintln!("cannot write {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
    }
    ExitCode::SUCCESS
}
