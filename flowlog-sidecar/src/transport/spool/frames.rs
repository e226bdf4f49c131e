//! A spool segment's bytes: records framed as length (u32 LE), CRC-32 of the
//! payload (u32 LE), payload. Pure functions over bytes, kept apart from the
//! file handling so that the fuzz target `spool_segment` (fuzz/) reads
//! segments with exactly this code.

/// Frame header: length (u32 LE) and CRC-32 of the payload (u32 LE).
pub const HEADER: usize = 8;

/// Appends `payload` as one frame.
pub fn frame(out: &mut Vec<u8>, payload: &[u8]) {
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    out.extend_from_slice(payload);
}

/// Every intact record of a segment, oldest first, and whether a torn or
/// corrupt tail followed them (how many records it held is unknown). A
/// length is checked against the bytes there before anything is copied.
pub fn records(data: &[u8]) -> (Vec<&[u8]>, bool) {
    let mut out = Vec::new();
    let mut rest = data;
    while let Some((head, body)) = rest.split_first_chunk::<HEADER>() {
        let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]);
        let crc = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
        let Some((payload, next)) = usize::try_from(len).ok().and_then(|n| body.split_at_checked(n)) else {
            return (out, true);
        };
        if crc32fast::hash(payload) != crc {
            return (out, true);
        }
        out.push(payload);
        rest = next;
    }
    (out, !rest.is_empty())
}
