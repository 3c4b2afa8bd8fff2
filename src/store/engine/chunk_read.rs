//! Reading one chunk's bytes as its extent list names them: inline bytes,
//! segment files (`file://`) or data objects (`s3://`, checked ranged
//! reads).

use super::extent::{Data, Extent};
use super::objects::Objects;
use super::segment::Segments;
use crate::store::StoreError;

/// Where the extents of a volume point: its segment files (`file://`) or
/// its data objects (`s3://`); neither keeps every byte inline.
#[derive(Clone, Copy, Default)]
pub struct Files<'a> {
    pub segments: Option<&'a Segments>,
    pub objects: Option<&'a Objects>,
}

/// Fill `out` with the chunk bytes from chunk offset `from` on, as `list`
/// holds them (zeros where no extent is). Object extents are fetched with
/// one ranged read each, checked against their checksums.
pub async fn read_chunk(
    files: Files<'_>,
    list: &[Extent],
    from: u32,
    out: &mut [u8],
) -> Result<(), StoreError> {
    let segments = files.segments;
    out.fill(0);
    let to = from + out.len() as u32;
    for e in list {
        let (s, t) = (e.start.max(from), e.end().min(to));
        if s >= t {
            continue;
        }
        let dst = &mut out[(s - from) as usize..(t - from) as usize];
        match (&e.data, files.objects) {
            (Data::Inline(b), _) => {
                dst.copy_from_slice(&b[(s - e.start) as usize..(t - e.start) as usize])
            }
            (Data::Segment(p), Some(objects)) => {
                dst.copy_from_slice(&objects.read_piece(p, s..t).await?)
            }
            (Data::Segment(p), None) => {
                let segs = segments.ok_or_else(|| {
                    StoreError::Corrupt(format!(
                        "extent in segment {} on a volume without segments",
                        p.seg
                    ))
                })?;
                segs.read_at(p.seg, p.seg_at(s), dst).map_err(|e| {
                    if e.kind() == std::io::ErrorKind::UnexpectedEof {
                        StoreError::Corrupt(format!("extent past the end of segment {}", p.seg))
                    } else {
                        StoreError::Io(e)
                    }
                })?;
            }
        }
    }
    Ok(())
}
