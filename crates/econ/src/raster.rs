//! PNG versions of the SVG plots, rasterised from the same SVG text with
//! resvg (pure Rust), so the two never disagree.
//!
//! Text needs a font. [`Rasteriser::with_system_fonts`] loads the fonts
//! installed on the machine and maps the generic families the plots ask for
//! (`sans-serif`, and `serif` as usvg's last resort) to one that exists. On a
//! machine without any font the plots still rasterise, without their text;
//! [`Rasteriser::font_family`] is then `None` so that the caller can say so.
//! This module returns bytes; writing files is the caller's business.

use std::sync::Arc;

use resvg::{tiny_skia, usvg};

use crate::error::{EconError, Result};

/// Families tried, in order, for the plots' `sans-serif` text: common on
/// Debian/Ubuntu (`fonts-dejavu-core`, `fonts-liberation`), other Linux
/// distributions, macOS and Windows.
const SANS_SERIF: [&str; 8] = [
    "DejaVu Sans",
    "Liberation Sans",
    "Noto Sans",
    "Helvetica",
    "Arial",
    "FreeSans",
    "Cantarell",
    "Roboto",
];

/// Turns the report's SVG plots into PNG images.
#[derive(Debug)]
pub struct Rasteriser {
    options: usvg::Options<'static>,
    family: Option<String>,
}

impl Rasteriser {
    /// Uses the fonts installed on this machine.
    pub fn with_system_fonts() -> Rasteriser {
        let mut db = usvg::fontdb::Database::new();
        db.load_system_fonts();
        Rasteriser::with_fonts(db)
    }

    /// Uses no font at all: shapes only. For comparisons in tests, and what
    /// [`Rasteriser::with_system_fonts`] amounts to on a machine without fonts.
    pub fn without_fonts() -> Rasteriser {
        Rasteriser::with_fonts(usvg::fontdb::Database::new())
    }

    /// Uses the fonts of `db` (for example fonts loaded from a directory).
    pub fn with_fonts(mut db: usvg::fontdb::Database) -> Rasteriser {
        let family = pick_family(&db);
        if let Some(f) = &family {
            db.set_sans_serif_family(f.as_str());
            db.set_serif_family(f.as_str());
        }
        let options = usvg::Options {
            fontdb: Arc::new(db),
            ..usvg::Options::default()
        };
        Rasteriser { options, family }
    }

    /// The font family text is drawn in; `None` when no font was found, in
    /// which case the PNG images carry no text.
    pub fn font_family(&self) -> Option<&str> {
        self.family.as_deref()
    }

    /// Rasterises `svg` at `scale` times its size in pixels (its `width` and
    /// `height`, or its view box) on its own background, and encodes it as PNG.
    pub fn png(&self, svg: &str, scale: f32) -> Result<Vec<u8>> {
        let fail = |message: String| EconError::Analysis(format!("rasterising a plot: {message}"));
        if !(scale.is_finite() && scale > 0.0) {
            return Err(fail(format!(
                "scale must be a positive number, got {scale}"
            )));
        }
        let tree = usvg::Tree::from_str(svg, &self.options).map_err(|e| fail(e.to_string()))?;
        let size = tree.size().to_int_size().scale_by(scale).ok_or_else(|| {
            fail(format!(
                "{}x{} pixels at scale {scale} is not a valid image size",
                tree.size().width(),
                tree.size().height()
            ))
        })?;
        let mut pixmap = tiny_skia::Pixmap::new(size.width(), size.height()).ok_or_else(|| {
            fail(format!(
                "cannot allocate {}x{} pixels",
                size.width(),
                size.height()
            ))
        })?;
        resvg::render(
            &tree,
            tiny_skia::Transform::from_scale(scale, scale),
            &mut pixmap.as_mut(),
        );
        pixmap.encode_png().map_err(|e| fail(e.to_string()))
    }
}

/// The first preferred sans-serif family present, else any family present.
fn pick_family(db: &usvg::fontdb::Database) -> Option<String> {
    let present = |name: &str| {
        db.faces()
            .any(|f| f.families.iter().any(|(n, _)| n.eq_ignore_ascii_case(name)))
    };
    SANS_SERIF
        .iter()
        .find(|n| present(n))
        .map(|n| n.to_string())
        .or_else(|| {
            db.faces()
                .filter_map(|f| f.families.first().map(|(n, _)| n.clone()))
                .min()
        })
}
