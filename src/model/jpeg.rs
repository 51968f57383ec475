//! JPEG decoding through libjpeg-turbo with Pillow's settings (`jpeg.c`),
//! so that decode + resize is bit-exact with the original's `Image.open`.

use std::ffi::{c_char, c_int, c_uint, c_ulong};

extern "C" {
    fn genecis_jpeg_decode(
        data: *const u8,
        len: c_ulong,
        out: *mut *mut u8,
        width: *mut c_uint,
        height: *mut c_uint,
        channels: *mut c_int,
        err: *mut c_char,
        err_len: usize,
        max_pixels: u64,
    ) -> c_int;
    fn genecis_jpeg_free(p: *mut u8);
}

/// Whether `bytes` start like a JPEG file (SOI marker).
pub(crate) fn is_jpeg(bytes: &[u8]) -> bool {
    bytes.starts_with(&[0xFF, 0xD8, 0xFF])
}

/// Pixels as Pillow opens the file: 1 channel (L), 3 (RGB) or 4 (CMYK).
pub(crate) fn decode(bytes: &[u8], max_pixels: u64) -> Result<(u32, u32, usize, Vec<u8>), String> {
    let mut out: *mut u8 = std::ptr::null_mut();
    let (mut w, mut h, mut c): (c_uint, c_uint, c_int) = (0, 0, 0);
    let mut err = [0 as c_char; 256];
    // SAFETY: the shim reads `len` bytes from `data`, writes the out
    // parameters and at most `err.len()` bytes of message, and hands back a
    // buffer of w*h*c bytes that we copy and free once.
    let rc = unsafe {
        genecis_jpeg_decode(
            bytes.as_ptr(),
            bytes.len() as c_ulong,
            &mut out,
            &mut w,
            &mut h,
            &mut c,
            err.as_mut_ptr(),
            err.len(),
            max_pixels,
        )
    };
    if rc != 0 {
        // SAFETY: the shim NUL-terminates the message (snprintf).
        let msg = unsafe { std::ffi::CStr::from_ptr(err.as_ptr()) };
        return Err(format!("cannot decode JPEG: {}", msg.to_string_lossy()));
    }
    let n = w as usize * h as usize * c as usize;
    // SAFETY: on success `out` holds n bytes allocated by the shim.
    let data = unsafe { std::slice::from_raw_parts(out, n).to_vec() };
    // SAFETY: freed once, by the allocator that made it.
    unsafe { genecis_jpeg_free(out) };
    Ok((w, h, c as usize, data))
}
