"""The one base class of every "bad input" error the project raises.

A file, archive, manifest, recipe or command-line value the project refuses raises a
subclass of :class:`CxrInputError` whose message names the input and says what is wrong, in
one line. Callers that take untrusted input catch this one type; the command line turns it
into one line on stderr and exit status 2. The subclasses live next to the code that raises
them:

- :class:`cxrlib.data.io.ImageReadError` (also an ``OSError``), and its
  :class:`cxrlib.data.dicom.DicomReadError`;
- :class:`cxrlib.data.manifest.ManifestError`;
- :class:`cxrlib.data.recipes.RecipeError`;
- :class:`cxrlib.data.download.ArchiveError` (also a ``DownloadError``): unsafe members and
  archives over the size, ratio or member-count limits.

``CxrInputError`` is a ``ValueError``, so code written against ``ValueError`` keeps working.
"""

from __future__ import annotations


class CxrInputError(ValueError):
    """Input the project refuses; the message names it and says why."""


__all__ = ["CxrInputError"]
