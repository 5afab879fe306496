//! PNG plots: decoded back, they are images of the SVG's size (times the
//! scale) with the plot drawn and its text rendered in a system font.

use medledger_econ::raster::Rasteriser;
use medledger_econ::{AnalysisOptions, Model, report, run_analysis, svg};

/// An RGBA image decoded from PNG bytes.
struct Image {
    width: usize,
    height: usize,
    rgba: Vec<u8>,
}

impl Image {
    fn decode(bytes: &[u8]) -> Image {
        let mut reader = png::Decoder::new(std::io::Cursor::new(bytes))
            .read_info()
            .expect("a PNG header");
        let mut buf = vec![
            0;
            reader
                .output_buffer_size()
                .expect("image size fits in memory")
        ];
        let info = reader.next_frame(&mut buf).expect("PNG pixel data");
        assert_eq!(info.color_type, png::ColorType::Rgba, "RGBA output");
        assert_eq!(info.bit_depth, png::BitDepth::Eight);
        buf.truncate(info.buffer_size());
        Image {
            width: info.width as usize,
            height: info.height as usize,
            rgba: buf,
        }
    }

    fn pixel(&self, x: usize, y: usize) -> [u8; 4] {
        let i = (y * self.width + x) * 4;
        self.rgba[i..i + 4].try_into().unwrap()
    }

    /// Pixels in `[x0, x1) × [y0, y1)` that are not opaque white.
    fn ink(&self, x0: usize, x1: usize, y0: usize, y1: usize) -> usize {
        (y0..y1)
            .flat_map(|y| (x0..x1).map(move |x| (x, y)))
            .filter(|&(x, y)| self.pixel(x, y) != [255, 255, 255, 255])
            .count()
    }

    fn differing(&self, other: &Image) -> usize {
        self.rgba
            .chunks_exact(4)
            .zip(other.rgba.chunks_exact(4))
            .filter(|(a, b)| a != b)
            .count()
    }
}

fn hiv() -> Model {
    Model::from_path(
        &std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../models/examples/hiv-briggs-2-5.toml"),
    )
    .unwrap()
}

fn system_fonts() -> Rasteriser {
    let r = Rasteriser::with_system_fonts();
    assert!(
        r.font_family().is_some(),
        "no system font found: install one (Debian: apt-get install fonts-dejavu-core)"
    );
    r
}

#[test]
fn png_has_the_svg_size_the_plot_and_its_text() {
    let m = hiv();
    let opts = AnalysisOptions {
        psa_iterations: Some(200),
        skip_owsa: true,
        ..Default::default()
    };
    let a = run_analysis(&m, &opts, &|_| {}).unwrap();
    let svg = svg::ceac(&m, a.psa.as_ref().unwrap());
    assert!(
        svg.contains(r#"width="780" height="440""#),
        "plot size changed"
    );

    let with_text = Image::decode(&system_fonts().png(&svg, 2.0).unwrap());
    assert_eq!((with_text.width, with_text.height), (1560, 880));
    // White background, plot frame and curves drawn.
    assert_eq!(with_text.pixel(2, 2), [255, 255, 255, 255]);
    let all = with_text.ink(0, 1560, 0, 880);
    assert!(all > 10_000, "only {all} drawn pixels");

    // The same SVG without any font: shapes only.
    let shapes = Image::decode(&Rasteriser::without_fonts().png(&svg, 2.0).unwrap());
    assert_eq!((shapes.width, shapes.height), (1560, 880));
    assert!(
        with_text.differing(&shapes) > 5_000,
        "text adds few pixels: {}",
        with_text.differing(&shapes)
    );
    // The title, centred over the plot area at y = 22 (SVG units), is text only.
    let title = |img: &Image| img.ink(2 * 86, 2 * (780 - 236), 2 * 5, 2 * 28);
    assert!(
        title(&with_text) > 500,
        "title not rendered: {}",
        title(&with_text)
    );
    assert_eq!(title(&shapes), 0);
}

#[test]
fn scale_sets_the_pixel_size_and_bad_input_is_an_error() {
    let r = Rasteriser::without_fonts();
    let svg = r##"<svg xmlns="http://www.w3.org/2000/svg" width="40" height="30"><rect x="10" y="10" width="20" height="10" fill="#0072B2"/></svg>"##;
    let img = Image::decode(&r.png(svg, 1.0).unwrap());
    assert_eq!((img.width, img.height), (40, 30));
    assert_eq!(img.pixel(15, 15), [0x00, 0x72, 0xB2, 255]);
    assert_eq!(
        img.pixel(5, 5),
        [0, 0, 0, 0],
        "transparent outside the SVG's shapes"
    );
    let img = Image::decode(&r.png(svg, 3.0).unwrap());
    assert_eq!((img.width, img.height), (120, 90));
    assert!(r.png("<svg", 1.0).is_err());
    assert!(r.png(svg, 0.0).is_err());
}

#[test]
fn every_report_plot_rasterises() {
    let m = hiv();
    let opts = AnalysisOptions {
        psa_iterations: Some(100),
        ..Default::default()
    };
    let a = run_analysis(&m, &opts, &|_| {}).unwrap();
    let dir = std::env::temp_dir().join(format!("medledger-econ-raster-{}", std::process::id()));
    let files = report::write_report(&m, &a, &dir).unwrap();
    let names: Vec<String> = files
        .plots
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    for want in ["trace_mono.svg", "ce_plane.svg", "ceac.svg", "tornado.svg"] {
        assert!(
            names.iter().any(|n| n == want),
            "{want} not among {names:?}"
        );
    }
    let r = system_fonts();
    for p in &files.plots {
        let svg = std::fs::read_to_string(p).unwrap();
        let img = Image::decode(&r.png(&svg, 1.0).unwrap());
        assert!(img.width >= 300 && img.height >= 200, "{}", p.display());
        assert!(
            img.ink(0, img.width, 0, img.height) > 1_000,
            "{}",
            p.display()
        );
    }
    std::fs::remove_dir_all(&dir).ok();
}
