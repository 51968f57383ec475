/* JPEG decoding with the system's libjpeg-turbo, set up as Pillow's
 * JpegDecode.c sets it up (ISLOW DCT, fancy upsampling, libjpeg's own colour
 * conversion to RGB or grayscale; CMYK as stored), so decoded pixels are
 * Pillow's. A C shim keeps libjpeg's struct layout and setjmp error handling
 * on the C side of the FFI. */
#include <setjmp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jpeglib.h>
#include <jerror.h>

struct genecis_err {
    struct jpeg_error_mgr pub;
    jmp_buf jump;
    int truncated;
};

static void genecis_error_exit(j_common_ptr cinfo) {
    struct genecis_err *e = (struct genecis_err *)cinfo->err;
    longjmp(e->jump, 1);
}

/* Warnings do not stop decoding (as in Pillow); a premature end of the data
 * is remembered, because Pillow refuses a truncated file. */
static void genecis_emit_message(j_common_ptr cinfo, int level) {
    struct genecis_err *e = (struct genecis_err *)cinfo->err;
    if (level < 0 && cinfo->err->msg_code == JWRN_JPEG_EOF) {
        e->truncated = 1;
    }
}

static void genecis_output_message(j_common_ptr cinfo) { (void)cinfo; }

/* Decodes `len` bytes. On success returns 0 and sets *out (free it with
 * genecis_jpeg_free), *width, *height and *channels (1 grayscale, 3 RGB,
 * 4 CMYK as Pillow's "CMYK;I" raw mode gives it). On failure returns 1 and
 * writes a message into err. */
int genecis_jpeg_decode(const unsigned char *data, unsigned long len, unsigned char **out,
                        unsigned int *width, unsigned int *height, int *channels, char *err,
                        size_t err_len, unsigned long long max_pixels) {
    struct jpeg_decompress_struct cinfo;
    struct genecis_err jerr;
    unsigned char *volatile buf = NULL;
    memset(&cinfo, 0, sizeof(cinfo));
    cinfo.err = jpeg_std_error(&jerr.pub);
    jerr.pub.error_exit = genecis_error_exit;
    jerr.pub.emit_message = genecis_emit_message;
    jerr.pub.output_message = genecis_output_message;
    jerr.truncated = 0;
    if (setjmp(jerr.jump)) {
        char msg[JMSG_LENGTH_MAX];
        (*cinfo.err->format_message)((j_common_ptr)&cinfo, msg);
        snprintf(err, err_len, "%s", msg);
        jpeg_destroy_decompress(&cinfo);
        free(buf);
        return 1;
    }
    jpeg_create_decompress(&cinfo);
    jpeg_mem_src(&cinfo, data, len);
    jpeg_read_header(&cinfo, TRUE);
    /* Refused before any pixel buffer exists: a few bytes may claim a
       65000x65000 image. */
    unsigned long long pixels = (unsigned long long)cinfo.image_width * cinfo.image_height;
    if (pixels > max_pixels) {
        snprintf(err, err_len,
                 "the header claims %ux%u = %llu pixels, over the limit of %llu "
                 "(Pillow's decompression-bomb rule)",
                 cinfo.image_width, cinfo.image_height, pixels, max_pixels);
        jpeg_destroy_decompress(&cinfo);
        return 1;
    }
    switch (cinfo.num_components) {
    case 1:
        cinfo.out_color_space = JCS_GRAYSCALE;
        break;
    case 3:
        cinfo.out_color_space = JCS_RGB;
        break;
    case 4:
        cinfo.out_color_space = JCS_CMYK;
        break;
    default:
        snprintf(err, err_len, "JPEG with %d components is not supported", cinfo.num_components);
        jpeg_destroy_decompress(&cinfo);
        return 1;
    }
    jpeg_start_decompress(&cinfo);
    size_t stride = (size_t)cinfo.output_width * cinfo.output_components;
    buf = malloc(stride * cinfo.output_height + 1);
    if (!buf) {
        snprintf(err, err_len, "out of memory for a %ux%u image", cinfo.output_width,
                 cinfo.output_height);
        jpeg_destroy_decompress(&cinfo);
        return 1;
    }
    while (cinfo.output_scanline < cinfo.output_height) {
        JSAMPROW row = buf + stride * cinfo.output_scanline;
        jpeg_read_scanlines(&cinfo, &row, 1);
    }
    if (jerr.truncated) {
        snprintf(err, err_len, "image file is truncated");
        jpeg_destroy_decompress(&cinfo);
        free(buf);
        return 1;
    }
    jpeg_finish_decompress(&cinfo);
    if (cinfo.output_components == 4) {
        /* Adobe's inverted CMYK, which Pillow assumes for every CMYK JPEG. */
        size_t n = stride * cinfo.output_height;
        for (size_t i = 0; i < n; i++) buf[i] = 255 - buf[i];
    }
    *out = buf;
    *width = cinfo.output_width;
    *height = cinfo.output_height;
    *channels = cinfo.output_components;
    jpeg_destroy_decompress(&cinfo);
    return 0;
}

void genecis_jpeg_free(unsigned char *p) { free(p); }
