//! Unit tests of `extent.rs`: the arithmetic of extent lists, their
//! checksums and their encoding.

use super::*;

fn seg(start: u32, len: u32, seg_off: u64) -> Extent {
    let bytes = vec![7u8; len as usize];
    Extent {
        start,
        len,
        data: Data::Segment(Piece {
            seg: 1,
            seg_off,
            start,
            len,
            crcs: page_crcs(seg_off, &[&bytes]),
        }),
    }
}

#[test]
fn overwrites_split_and_trim_and_records_round_trip() {
    let big = seg(0, 65536, 0);
    let list = insert(&[big], seg(4096, 4096, 65536 + 4096));
    assert_eq!(list.len(), 3);
    assert_eq!((list[0].start, list[0].len), (0, 4096));
    assert_eq!((list[2].start, list[2].len), (8192, 65536 - 8192));
    let dead = segment_pages_dead(&[seg(0, 65536, 0)], &list);
    assert_eq!(dead, vec![(1, 4096..8192)]);
    assert_eq!(live_bytes(&list)[&1], 65536);
    let inline = Extent {
        start: 10,
        len: 5,
        data: Data::Inline(Bytes::from_static(b"hello")),
    };
    let list = insert(&list, inline);
    let back = decode(&Bytes::from(encode(&list))).unwrap();
    assert_eq!(back, list);
    let cut = remove_range(&back, 11..13);
    assert_eq!(cut[1].data, Data::Inline(Bytes::from_static(b"h")));
    assert_eq!(cut[2].data, Data::Inline(Bytes::from_static(b"lo")));
}

/// The dead pages of random overwrites and cuts are exactly the pages
/// the old list touched and the new one does not, page by page.
#[test]
fn dead_pages_are_the_pages_no_window_touches_any_more() {
    use crate::check::torture::rng::Rng;
    use std::collections::BTreeSet;
    fn pages(list: &[Extent]) -> BTreeSet<(u64, u64)> {
        let mut out = BTreeSet::new();
        for (seg, r) in list.iter().filter_map(Extent::seg_window) {
            out.extend(pages_of(r).map(|p| (seg, p)));
        }
        out
    }
    let mut rng = Rng::new(47);
    let block = BLOCK_SIZE as u32;
    let mut next_off = [0u64; 3];
    for _ in 0..200 {
        let mut list: Vec<Extent> = Vec::new();
        for _ in 0..rng.range(1, 12) {
            let start = rng.below(u64::from(block)) as u32;
            let len = rng.range(1, u64::from(block - start) + 1) as u32;
            let s = rng.below(3) as usize;
            // A fresh segment page, congruent to the chunk offset.
            let seg_off = next_off[s] + u64::from(start) % PAGE;
            next_off[s] = (seg_off + u64::from(len)).div_ceil(PAGE) * PAGE;
            let mut e = seg(start, len, seg_off);
            if let Data::Segment(p) = &mut e.data {
                p.seg = s as u64 + 1;
            }
            let old = list.clone();
            list = if rng.percent(20) {
                remove_range(&old, start..start + len)
            } else {
                insert(&old, e)
            };
            let dead = segment_pages_dead(&old, &list);
            let want: Vec<(u64, u64)> = pages(&old).difference(&pages(&list)).copied().collect();
            let got: Vec<(u64, u64)> = dead
                .iter()
                .flat_map(|(seg, r)| (r.start / PAGE..r.end / PAGE).map(move |p| (*seg, p)))
                .collect();
            assert_eq!(got, want, "{old:?} -> {list:?}");
            assert!(dead
                .windows(2)
                .all(|w| w[0].0 < w[1].0 || w[0].1.end < w[1].1.start));
        }
    }
}

/// A window cut out of a piece keeps the piece's part in the pages it
/// touches, and exactly the checksums of those bytes.
#[test]
fn trimming_keeps_the_checksums_of_the_pages_still_touched() {
    let bytes: Vec<u8> = (0..10_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let piece = Piece {
        seg: 3,
        seg_off: 100,
        start: 100,
        len: 10_000,
        crcs: page_crcs(100, &[&bytes]),
    };
    let whole = Extent {
        start: 100,
        len: 10_000,
        data: Data::Segment(piece.clone()),
    };
    for (w, pages) in [
        (100..200, 0..1),
        (5000..7000, 1..2),
        (4000..4200, 0..2),
        (9000..10_100, 2..3),
        (100..10_100, 0..3),
    ] {
        let e = whole.clip(w.clone()).unwrap();
        let Data::Segment(t) = &e.data else {
            panic!("not a segment extent")
        };
        assert_eq!(t.pages(), pages, "window {w:?}");
        assert_eq!(t.seg_at(w.start), piece.seg_at(w.start));
        assert!(t.start <= e.start && e.end() <= t.start + t.len);
        let at = (t.seg_off - piece.seg_off) as usize;
        let kept = &bytes[at..at + t.len as usize];
        assert_eq!(t.crcs, page_crcs(t.seg_off, &[kept]), "window {w:?}");
        let back = decode(&Bytes::from(encode(std::slice::from_ref(&e)))).unwrap();
        assert_eq!(back, vec![e]);
    }
}

#[test]
fn sequential_whole_pieces_merge() {
    let list = insert(&[seg(0, 4096, 8192)], seg(4096, 4096, 12288));
    assert_eq!(list.len(), 1);
    assert_eq!((list[0].start, list[0].len), (0, 8192));
    let Data::Segment(p) = &list[0].data else {
        panic!("not a segment extent")
    };
    assert_eq!(p.crcs.len(), 2);
    assert_eq!(p.crcs, page_crcs(8192, &[&[7u8; 8192]]));
    // A scatter list checksums as its concatenation.
    let whole: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
    let (a, b) = whole.split_at(5000);
    assert_eq!(page_crcs(100, &[a, &[], b]), page_crcs(100, &[&whole]));
    assert_eq!(page_crcs(100, &[&whole]).len(), 3);
    // Not adjacent in the segment, or not from a page boundary: kept.
    assert_eq!(insert(&list, seg(8192, 4096, 20480)).len(), 2);
    assert_eq!(insert(&[seg(0, 100, 0)], seg(100, 100, 100)).len(), 2);
}

#[test]
fn garbage_is_corrupt_not_a_panic() {
    let full = encode(&[seg(100, 5000, 100), seg(6000, 10, 9000)]);
    for n in 0..full.len() {
        assert!(decode(&Bytes::copy_from_slice(&full[..n])).is_err());
    }
    let overlapping = encode(&[seg(100, 5000, 100), seg(200, 10, 9000)]);
    assert!(decode(&Bytes::from(overlapping)).is_err());
    let outside = encode(&[seg(65530, 10, 0)]);
    assert!(decode(&Bytes::from(outside)).is_err());
    assert!(decode(&Bytes::from_static(&[1, 255, 255, 255, 255])).is_err());
}

/// A read plan's in-place views say what `decode` says, and a record
/// with bytes after its last extent ends in an error there too.
#[test]
fn views_read_what_decode_reads() {
    let list = insert(&[seg(100, 5000, 100)], seg(6000, 10, 9000 + 6000 % 4096));
    let mut bytes = encode(&list);
    let record = Bytes::from(bytes.clone());
    let read: Vec<View> = views(&record).unwrap().collect::<Result<_, _>>().unwrap();
    let back: Vec<Extent> = read.iter().map(View::to_extent).collect();
    assert_eq!(back, list);
    let DataView::Segment(p) = &read[1].data else {
        panic!("not a segment view")
    };
    let Data::Segment(q) = &list[1].data else {
        panic!("not a segment extent")
    };
    assert_eq!(p.seg_at(6005), q.seg_at(6005));
    bytes.push(0);
    let bytes = Bytes::from(bytes);
    let last = views(&bytes).unwrap().last().unwrap();
    assert!(last.is_err(), "trailing byte read as {last:?}");
    assert_eq!(
        views(&bytes).unwrap().count(),
        3,
        "iteration ends at the error"
    );
}
