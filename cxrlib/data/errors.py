"""What the image readers share: their error types and the project's image-size limit.

:mod:`cxrlib.data.io` (every format) hands DICOM files to :mod:`cxrlib.data.dicom`, and the
DICOM reader raises the same kind of error under the same limit; both take them from here,
so neither needs the other.
"""

from __future__ import annotations

from cxrlib.errors import CxrInputError

#: Project limit on width x height, checked from the header before any pixel is decoded.
#: About 2.7x the largest flat-panel chest detector (43 cm at 100 um = 4300 x 4300 px), far
#: below what a few hundred KB of compressed zeros can claim. Pillow's own guard only warns
#: between 89 and 179 megapixels.
MAX_PIXELS = 50_000_000


class ImageReadError(CxrInputError, OSError):
    """An image that could not be read; ``path`` names it and the message says why.

    A :class:`~cxrlib.errors.CxrInputError` (a ``ValueError``) and, as before, an ``OSError``.
    """

    def __init__(self, path: str, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"cannot read image {self.path}: {reason}")

    def __reduce__(self):
        # OSError's default pickling passes the message as the only argument, which does not
        # match this __init__; worker processes need to send these errors back intact.
        return (type(self), (self.path, self.reason))


class DicomReadError(ImageReadError):
    """A DICOM file that could not be turned into an image; ``path`` names it."""
