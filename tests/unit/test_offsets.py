"""Detecting input records that never reached the agent."""

from pipeline.offsets import OffsetTracker


def test_contiguous_offsets_and_redeliveries_are_no_gap():
    t = OffsetTracker()
    assert [t.observe("o", 0, x) for x in (5, 6, 7, 3, 4, 5)] == [None] * 6


def test_a_forward_jump_reports_the_skipped_range():
    t = OffsetTracker()
    t.observe("o", 0, 10)
    assert t.observe("o", 0, 14) == (11, 13)


def test_first_record_after_a_rebalance_must_be_the_committed_offset():
    t = OffsetTracker()
    assert t.observe("o", 2, 152, committed=33) == (33, 151)
    t.reset()
    assert t.observe("o", 2, 33, committed=33) is None


def test_partitions_are_tracked_separately():
    t = OffsetTracker()
    t.observe("o", 0, 1)
    assert t.observe("o", 1, 50) is None
    assert t.observe("r", 0, 9) is None
