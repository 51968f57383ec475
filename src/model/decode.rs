//! Image files to pixels as Pillow's `Image.open` gives them: JPEG through
//! libjpeg-turbo with Pillow's settings (`jpeg.rs`), PNG and the rest
//! through the image crate, and the decompression-bomb limit checked on the
//! header before any pixel buffer exists.

use std::path::Path;

use image::DynamicImage;

use super::jpeg;
use super::preprocess::{Mode, Raster};

/// Pillow's `Image.MAX_IMAGE_PIXELS` (1 GiB / 4 / 3): above it Pillow
/// warns; above twice it, it refuses (`DecompressionBombError`).
pub const PILLOW_MAX_IMAGE_PIXELS: u64 = 89_478_485;

/// The largest image decoded, in pixels: Pillow's refusal threshold unless
/// a stage's `max_image_pixels` sets another. Checked against the file's
/// header before any pixel buffer is allocated.
static MAX_PIXELS: std::sync::atomic::AtomicU64 =
    std::sync::atomic::AtomicU64::new(2 * PILLOW_MAX_IMAGE_PIXELS);

pub(crate) fn set_max_pixels(n: u64) {
    MAX_PIXELS.store(n, std::sync::atomic::Ordering::Relaxed);
}

fn max_pixels() -> u64 {
    MAX_PIXELS.load(std::sync::atomic::Ordering::Relaxed)
}

/// The refusal of an image over the pixel limit.
fn too_large(w: u64, h: u64) -> String {
    format!(
        "the image is {w}x{h} = {} pixels, over the limit of {} (Pillow's decompression-bomb rule); raise params.max_image_pixels if the file is genuine",
        w * h,
        max_pixels()
    )
}

/// Reads an image file as Pillow's `Image.open` would give its pixels.
pub(crate) fn open(path: &Path) -> Result<Raster, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    decode(&bytes).map_err(|e| format!("{}: {e}", path.display()))
}

/// [`open`] of bytes already read.
pub(crate) fn decode(bytes: &[u8]) -> Result<Raster, String> {
    if jpeg::is_jpeg(bytes) {
        let (width, height, c, data) = jpeg::decode(bytes, max_pixels())
            .map_err(|e| e.replace("(Pillow's decompression-bomb rule)", "(Pillow's decompression-bomb rule); raise params.max_image_pixels if the file is genuine"))?;
        let mode = match c {
            1 => Mode::L,
            3 => Mode::Rgb,
            _ => Mode::Cmyk,
        };
        return Ok(Raster {
            width,
            height,
            mode,
            data,
        });
    }
    // A PNG's colour type is byte 25 of the file (IHDR); 3 = palette.
    let palette = bytes.starts_with(b"\x89PNG\r\n\x1a\n") && bytes.get(25) == Some(&3);
    let reader = image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| e.to_string())?;
    let (w, h) = reader.into_dimensions().map_err(|e| e.to_string())?;
    if w as u64 * h as u64 > max_pixels() {
        return Err(too_large(w as u64, h as u64));
    }
    let img = image::load_from_memory(bytes).map_err(|e| e.to_string())?;
    let (width, height) = (img.width(), img.height());
    let (mode, data) = match img {
        _ if palette => (Mode::P, img.into_rgb8().into_raw()),
        DynamicImage::ImageLuma8(g) => (Mode::L, g.into_raw()),
        DynamicImage::ImageRgb8(c) => (Mode::Rgb, c.into_raw()),
        // LA resizes as premultiplied La, which is RGBa with equal colours.
        DynamicImage::ImageRgba8(_) | DynamicImage::ImageLumaA8(_) => {
            (Mode::Rgba, img.into_rgba8().into_raw())
        }
        other => (Mode::Rgb, other.into_rgb8().into_raw()),
    };
    Ok(Raster {
        width,
        height,
        mode,
        data,
    })
}
