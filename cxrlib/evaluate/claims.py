"""Claims worded from intervals: one rule for every comparison the project reports.

A difference is called a difference only when its 95% interval excludes zero; otherwise the
text says "no difference shown". The interval must cover what varies between reruns
(training seeds and test patients, :func:`cxrlib.evaluate.stats.seed_patient_resamples`),
or a rerun on another machine can reverse the claim. Notebooks, the generated results page
(``RUN_DIR/results.md``) and ``python -m cxrlib compare`` all word their claims here, so text
and numbers cannot disagree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

NO_DIFFERENCE = "no difference shown"


@dataclass(frozen=True)
class Claim:
    """A compared quantity: ``estimate`` of ``treatment - baseline`` (or of one value against a
    reference) with its interval, and the words for each direction."""

    subject: str
    estimate: float
    low: float
    high: float
    up: str = "higher"
    down: str = "lower"

    @property
    def direction(self) -> int:
        """+1 when the interval lies above zero, -1 below, 0 when it contains zero or is undefined."""
        if any(math.isnan(x) for x in (self.estimate, self.low, self.high)):
            return 0
        return 1 if self.low > 0 else -1 if self.high < 0 else 0

    @property
    def verdict(self) -> str:
        return {1: self.up, -1: self.down, 0: NO_DIFFERENCE}[self.direction]

    def sentence(self, digits: int = 3) -> str:
        """E.g. ``"real + G_NC + G_PC vs real, sensitivity: higher (+0.120, 95% CI +0.040 to +0.200)"``."""
        if math.isnan(self.estimate):
            return f"{self.subject}: not measured"
        return (f"{self.subject}: {self.verdict} ({self.estimate:+.{digits}f}, 95% CI "
                f"{self.low:+.{digits}f} to {self.high:+.{digits}f})")


def difference_claim(subject: str, estimate: float, low: float, high: float, *, up: str = "higher",
                     down: str = "lower") -> Claim:
    """A :class:`Claim` from a difference and its interval (``NaN`` where unmeasured)."""
    as_float = [float("nan") if value is None else float(value) for value in (estimate, low, high)]
    return Claim(subject, *as_float, up=up, down=down)
