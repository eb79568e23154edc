"""Image sizes as detectron2's ``read_image`` returns them (EXIF orientation applied), from the header."""

#: EXIF orientations that swap width and height (``read_image`` applies them)
_ROTATED = (5, 6, 7, 8)


def oriented_size(im):
    """(width, height) of an open PIL image after its EXIF orientation (unreadable EXIF is ignored, as
    detectron2 does)."""
    w, h = im.size
    try:
        orientation = im.getexif().get(0x0112)
    except Exception:
        orientation = None
    return (h, w) if orientation in _ROTATED else (w, h)


def image_size(path):
    """(width, height) of the image file ``path`` (header only; EXIF orientation applied), None if unreadable."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return oriented_size(im)
    except Exception:
        return None
