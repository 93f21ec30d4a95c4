"""A chunk held near or past the visibility timeout is redelivered to another worker: the worker says so."""

from __future__ import annotations

from worker.tasks import visibility_warning


def test_a_chunk_well_within_the_timeout_is_quiet() -> None:
    assert visibility_warning(10.0, 3600) is None
    assert visibility_warning(2880.0, 3600) is None


def test_a_chunk_near_or_past_the_timeout_is_named_with_the_fix() -> None:
    near = visibility_warning(3000.0, 3600)
    assert near is not None
    assert "close to SDFARM_VISIBILITY_TIMEOUT (3600s)" in near
    past = visibility_warning(4000.0, 3600)
    assert past == ("held 4000s before its upload, past SDFARM_VISIBILITY_TIMEOUT (3600s): Redis may deliver it"
                    " to another worker too; raise the timeout or lower SDFARM_CHUNK_SIZE")
