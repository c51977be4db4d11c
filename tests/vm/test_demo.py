"""The README's main command, run where dm-crypt exists (inside the guest)."""

from __future__ import annotations

import io

from csi_luks import demo


def test_demo_lifecycle_passes() -> None:
    out = io.StringIO()
    assert demo.run(out=out) == 0, out.getvalue()
    text = out.getvalue()
    assert (
        "marker not found" in text
        and "read back: csi-luks demo marker" in text
        and "nothing left behind" in text
    )
    assert text.count(" ok (") == 11 and "FAILED" not in text
