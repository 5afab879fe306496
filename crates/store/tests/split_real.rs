//! Every real DICOM file of the test data: split into header and pixel objects and rebuilt
//! byte for byte; refused files refused with a reason; truncated files never panic.

use medledger_store::split::{self, Piece, SplitError};
use medledger_testkit::{manifest, test_data_dir};

const NATIVE: &[&str] = &[
    "1.2.840.10008.1.2",
    "1.2.840.10008.1.2.1",
    "1.2.840.10008.1.2.2",
];

/// What an independent reader (dicom-rs) says about a file's identifiers: `Ok(None)` if it
/// has study and series UIDs, `Ok(Some(name))` for the first one missing, `Err` if dicom-rs
/// cannot read the file.
fn missing_id(path: &std::path::Path) -> Result<Option<&'static str>, String> {
    let obj = dicom_object::OpenFileOptions::new()
        .open_file(path)
        .map_err(|e| e.to_string())?;
    let has = |tag| {
        obj.element(tag)
            .ok()
            .and_then(|e| e.to_str().ok())
            .is_some_and(|v| !v.trim_matches(['\0', ' ']).is_empty())
    };
    use dicom_dictionary_std::tags;
    Ok(if !has(tags::STUDY_INSTANCE_UID) {
        Some("Study Instance UID")
    } else if !has(tags::SERIES_INSTANCE_UID) {
        Some("Series Instance UID")
    } else {
        None
    })
}

#[test]
fn every_file_rebuilds_byte_for_byte() {
    let dir = test_data_dir();
    let mut split_ok = 0;
    let mut with_pixels = 0;
    let mut per_frame = 0;
    let mut refused = Vec::new();
    for entry in manifest() {
        let bytes = std::fs::read(dir.join(&entry.path)).unwrap();
        let name = entry.path.display().to_string();
        match split::split(&bytes) {
            Ok(s) => {
                split_ok += 1;
                let header = s.header_object(&bytes);
                let pixels: Vec<&[u8]> = s.pixels.iter().map(|r| &bytes[r.clone()]).collect();
                assert_eq!(
                    split::rebuild(&header, &pixels).unwrap(),
                    bytes,
                    "{name} does not rebuild"
                );
                // The same file as pieces, none copied: pixel pieces are the pixel objects.
                let parts = split::rebuild_parts(
                    bytes::Bytes::from(header.clone()),
                    pixels
                        .iter()
                        .map(|p| bytes::Bytes::copy_from_slice(p))
                        .collect(),
                )
                .unwrap();
                assert_eq!(parts.concat(), bytes, "{name} does not rebuild in pieces");
                // Pieces cover the file in order; pixel objects are real pixel bytes.
                let covered: usize = s
                    .pieces
                    .iter()
                    .map(|p| match p {
                        Piece::Inline(r) => r.len(),
                        Piece::Pixels(i) => s.pixels[*i].len(),
                    })
                    .sum();
                assert_eq!(covered, bytes.len(), "{name}");
                if !s.pixels.is_empty() {
                    with_pixels += 1;
                    let pixel_bytes: usize = s.pixels.iter().map(|r| r.len()).sum();
                    assert!(
                        header.len() < bytes.len() - pixel_bytes + 16 + 9 * s.pieces.len(),
                        "{name}: the header object holds pixel bytes"
                    );
                }
                if entry.frames > 1 && s.pixels.len() == entry.frames as usize {
                    per_frame += 1;
                }
                // Bit-packed (1-bit) frames need not start on a byte: those stay one object.
                if entry.frames > 1
                    && entry.bits_allocated % 8 == 0
                    && NATIVE.contains(&entry.transfer_syntax_uid.as_str())
                {
                    assert_eq!(
                        s.pixels.len(),
                        entry.frames as usize,
                        "{name}: native multi-frame pixel data must split per frame"
                    );
                }
                if entry.frames > 1 && name.contains("not_fragmented") {
                    assert_eq!(s.pixels.len(), entry.frames as usize, "{name}");
                }
            }
            Err(e) => {
                // Instances without a study or series (DICOMDIRs, private objects, cut-off
                // data sets) have no place in a study manifest: refused, naming the missing
                // UID. Where dicom-rs reads the file, it must agree the UID is missing.
                match (missing_id(&dir.join(&entry.path)), &e) {
                    (Ok(Some(which)), _) => assert_eq!(e, SplitError::MissingId(which), "{name}"),
                    (Ok(None), _) => panic!("{name} has its UIDs but was refused: {e}"),
                    (Err(_), SplitError::MissingId(_)) => {}
                    (Err(_), _) => assert!(
                        !entry.is_parseable(),
                        "{name} ({}) is a valid file and must split: {e}",
                        entry.parse_summary
                    ),
                }
                refused.push(format!("{name}: {e}"));
            }
        }
    }
    eprintln!(
        "{split_ok} files split ({with_pixels} with pixels, {per_frame} multi-frame per frame); \
         refused:\n  {}",
        refused.join("\n  ")
    );
    assert!(split_ok >= 360, "only {split_ok} files split");
    assert!(
        per_frame >= 20,
        "only {per_frame} multi-frame files split per frame"
    );
}

#[test]
fn truncated_and_damaged_files_never_panic() {
    let dir = test_data_dir();
    for entry in manifest().into_iter().step_by(7) {
        let bytes = std::fs::read(dir.join(&entry.path)).unwrap();
        let n = bytes.len();
        for cut in [0, 1, 131, 132, 200, n / 3, n / 2, n.saturating_sub(1)] {
            let part = &bytes[..cut.min(n)];
            if let Ok(s) = split::split(part) {
                let header = s.header_object(part);
                let pixels: Vec<&[u8]> = s.pixels.iter().map(|r| &part[r.clone()]).collect();
                assert_eq!(split::rebuild(&header, &pixels).unwrap(), part);
            }
        }
        // Flipped bytes in the first kilobyte (where lengths and tags are).
        let mut bad = bytes.clone();
        for i in (130..n.min(1024)).step_by(61) {
            bad[i] ^= 0xA5;
        }
        if let Ok(s) = split::split(&bad) {
            let header = s.header_object(&bad);
            let pixels: Vec<&[u8]> = s.pixels.iter().map(|r| &bad[r.clone()]).collect();
            assert_eq!(split::rebuild(&header, &pixels).unwrap(), bad);
        }
    }
}
