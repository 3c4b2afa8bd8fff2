//! The model's rules and errnos, step by step against what Linux does.

use super::*;

fn p(s: &str) -> Path {
    s.split('/').map(str::to_string).collect()
}

#[test]
#[allow(clippy::too_many_lines)] // one scenario: each step acts on the tree the last left
fn rules_and_errnos_follow_linux() {
    let mut m = Model::new(Features::all(), 0o022);
    let ok = Ok(Value::Unit);
    assert_eq!(
        m.apply(&Op::Mkdir {
            path: p("a"),
            mode: 0o777
        }),
        ok
    );
    assert_eq!(m.node(m.lookup(&p("a")).unwrap()).perm, 0o755);
    assert_eq!(
        m.apply(&Op::Mkdir {
            path: p("a/b"),
            mode: 0o700
        }),
        ok
    );
    assert_eq!(m.nlink(m.lookup(&p("a")).unwrap()), 3);
    assert_eq!(
        m.apply(&Op::Rmdir { path: p("a") }),
        Err(&[ENOTEMPTY, EEXIST][..])
    );
    assert_eq!(
        m.apply(&Op::Rename {
            from: p("a"),
            to: p("a/b/c")
        }),
        Err(&[EINVAL][..])
    );
    assert_eq!(
        m.apply(&Op::Rename {
            from: p("a/b"),
            to: p("a")
        }),
        Err(&[ENOTEMPTY, EEXIST][..])
    );
    let open = |path: &str, slot| Op::Open {
        slot,
        path: p(path),
        create: true,
        excl: false,
        trunc: false,
        append: false,
        mode: 0o644,
    };
    assert_eq!(m.apply(&open("a/f", 0)), ok);
    assert_eq!(m.apply(&open("a/f/x", 1)), Err(&[ENOTDIR][..]));
    assert_eq!(m.apply(&open("a/b", 1)), Err(&[EISDIR][..]));
    let data = Data {
        len: 10,
        pattern: 0,
        seed: 1,
    };
    assert_eq!(
        m.apply(&Op::Pwrite {
            slot: 0,
            offset: 100,
            data
        }),
        Ok(Value::Count(10))
    );
    assert_eq!(
        m.apply(&Op::Link {
            from: p("a/f"),
            to: p("g")
        }),
        ok
    );
    assert_eq!(
        m.apply(&Op::Link {
            from: p("a"),
            to: p("h")
        }),
        Err(&[EPERM][..])
    );
    assert_eq!(
        m.apply(&Op::Link {
            from: p("a"),
            to: p("g")
        }),
        Err(&[EEXIST][..])
    );
    let f = m.lookup(&p("g")).unwrap();
    assert_eq!(m.nlink(f), 2);
    assert_eq!(
        m.apply(&Op::Rename {
            from: p("a/f"),
            to: p("g")
        }),
        ok,
        "same inode: no-op"
    );
    assert_eq!(m.nlink(f), 2);
    assert_eq!(m.apply(&Op::Unlink { path: p("a/f") }), ok);
    assert_eq!(m.apply(&Op::Unlink { path: p("g") }), ok);
    // Unlinked but open: still there for the descriptor.
    assert_eq!(m.nlink(f), 0);
    assert_eq!(
        m.apply(&Op::Read {
            slot: 0,
            offset: 105,
            len: 100
        })
        .unwrap(),
        Value::Bytes(data.bytes()[5..].to_vec())
    );
    assert_eq!(m.apply(&Op::Close { slot: 0 }), ok);
    assert!(!m.nodes.contains_key(&f));
    assert_eq!(
        m.apply(&Op::Symlink {
            target: "zz/q".into(),
            path: p("s")
        }),
        ok
    );
    assert_eq!(
        m.apply(&open("s", 0)),
        Err(&[ENOENT][..]),
        "dangling symlink"
    );
    assert_eq!(m.apply(&Op::Unlink { path: p("s") }), ok);
    assert_eq!(m.apply(&Op::Unlink { path: p("a") }), Err(&[EISDIR][..]));
    assert_eq!(
        m.apply(&Op::Rename {
            from: p("a/b"),
            to: p("b2")
        }),
        ok
    );
    assert_eq!(m.node(m.lookup(&p("b2")).unwrap()).parent, m.root);
    assert_eq!(
        m.apply(&Op::RemoveXattr {
            path: p("a"),
            name: "user.a".into()
        }),
        Err(&[ENODATA][..])
    );
    let long = "x".repeat(256);
    assert_eq!(
        m.apply(&Op::Mkdir {
            path: vec![long],
            mode: 0o755
        }),
        Err(&[ENAMETOOLONG][..])
    );
}
