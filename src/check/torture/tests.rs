//! The torture on a local directory: clean runs (these count towards the
//! 20,000 operations CI runs), a deliberate bug caught with its shortest
//! failing prefix, and a saved model that catches later damage.

use super::*;

/// A scratch directory on the build machine's disk (`target/`, like the VM
/// tests), not a tmpfs that may lack features.
fn scratch() -> tempfile::TempDir {
    let base = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/torture-tests");
    std::fs::create_dir_all(&base).unwrap();
    tempfile::tempdir_in(base).unwrap()
}

fn report(out: &[u8]) -> String {
    String::from_utf8_lossy(out).into_owned()
}

#[test]
fn seeded_runs_on_a_local_directory_find_no_divergence() {
    let dir = scratch();
    let mut total = 0;
    // 4 x 5,000: CI's share of the 20,000 operations.
    for seed in 1..=4 {
        let mut cfg = Config::new(dir.path().to_path_buf(), seed, 5_000);
        cfg.full_every = 500;
        let mut out = Vec::new();
        let o = run(&cfg, &mut out).unwrap();
        let text = report(&out);
        assert!(o.divergence.is_none(), "seed {seed}:\n{text}");
        assert!(
            text.ends_with(&format!(
                "torture: 5000 operations, 0 divergences, seed {seed}\n"
            )),
            "{text}"
        );
        total += o.ops;
    }
    assert_eq!(total, 20_000);
}

#[test]
fn a_lost_write_is_caught_at_its_step_with_the_shortest_prefix() {
    let dir = scratch();
    let mut cfg = Config::new(dir.path().to_path_buf(), 11, 3_000);
    cfg.full_every = 400;
    // Which step the 40th pwrite is (the model alone decides the operations).
    let mut rng = Rng::new(cfg.seed);
    let mut m = Model::new(Features::all(), current_umask());
    let mut pwrites = 0;
    let mut step_of = None;
    for step in 0..cfg.ops {
        let op = gen::generate(&mut rng, &m, &cfg.limits);
        if let Op::Pwrite { data, .. } = &op {
            pwrites += 1;
            // The first pwrite from the 40th on whose loss shows: random
            // bytes, not empty.
            if pwrites >= 40 && data.pattern == 0 && data.len > 0 && step_of.is_none() {
                step_of = Some((pwrites, step));
            }
        }
        let _ = m.apply(&op);
    }
    let (nth, step) = step_of.expect("a random pwrite");
    cfg.fault = Some(Fault { skip_pwrite: nth });
    let mut out = Vec::new();
    let o = run(&cfg, &mut out).unwrap();
    let text = report(&out);
    let d = o
        .divergence
        .as_ref()
        .unwrap_or_else(|| panic!("not caught:\n{text}"));
    assert_eq!(d.step, step, "{text}");
    assert!(d.op.starts_with("pwrite["), "{text}");
    assert_eq!(o.shortest_prefix, Some(step + 1), "{text}");
    assert!(
        text.contains(&format!("--seed 11 --ops {}", step + 1)),
        "{text}"
    );
    assert!(text.contains(&format!("{step:>8}  pwrite[")), "{text}");
    assert!(text.ends_with("1 divergences, seed 11\n"), "{text}");
}

#[test]
fn a_saved_model_verifies_and_then_catches_damage() {
    let dir = scratch();
    let model_file = dir.path().join("model");
    let mut cfg = Config::new(dir.path().to_path_buf(), 5, 3_000);
    cfg.save_model = Some(model_file.clone());
    let mut out = Vec::new();
    let o = run(&cfg, &mut out).unwrap();
    assert!(o.divergence.is_none(), "{}", report(&out));

    let mut out = Vec::new();
    assert_eq!(
        verify_saved(&model_file, None, &mut out).unwrap(),
        0,
        "{}",
        report(&out)
    );
    assert!(report(&out).contains(", 0 differences"));

    // Damage one file and add a stranger.
    let saved = verify::Saved::parse(&std::fs::read_to_string(&model_file).unwrap()).unwrap();
    let (victim, _) = saved
        .records
        .iter()
        .find(|(_, r)| r.kind == 'f' && r.size > Some(0))
        .expect("a non-empty file");
    let root = cfg.root();
    let path = root.join(victim);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[0] ^= 0xff;
    std::fs::write(&path, bytes).unwrap();
    std::fs::write(root.join("stranger"), b"x").unwrap();
    let mut out = Vec::new();
    let n = verify_saved(&model_file, None, &mut out).unwrap();
    let text = report(&out);
    assert_eq!(n, 2, "{text}");
    assert!(
        text.contains(&format!("torture: verify: {victim}: content ")),
        "{text}"
    );
    assert!(
        text.contains("torture: verify: stranger: unexpected f"),
        "{text}"
    );
}

#[test]
fn a_run_directory_is_never_reused() {
    let dir = scratch();
    let cfg = Config::new(dir.path().to_path_buf(), 3, 10);
    run(&cfg, &mut Vec::new()).unwrap();
    assert!(matches!(
        run(&cfg, &mut Vec::new()),
        Err(TortureError::Exists(_))
    ));
}

#[test]
fn saved_models_round_trip_through_text() {
    let mut m = Model::new(Features::all(), 0o022);
    let mut rng = Rng::new(9);
    for _ in 0..500 {
        let op = gen::generate(&mut rng, &m, &Limits::default());
        let _ = m.apply(&op);
    }
    let saved = verify::Saved {
        root: "/x/seed-9".into(),
        seed: 9,
        ops: 500,
        features: Features::all(),
        records: verify::model_records(&close_model(&m)),
    };
    assert!(saved.records.len() > 5);
    assert_eq!(verify::Saved::parse(&saved.to_text()).unwrap(), saved);
    assert!(verify::Saved::parse("something else").is_err());
}
