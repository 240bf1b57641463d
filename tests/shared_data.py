"""Where the tests find the real data: ``../shared/data`` beside the repository (absent on a user's machine).

Tests that use it fall back to generated data or skip cleanly when it is missing.
"""

from pathlib import Path

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
