"""Peak memory through the CLI does not grow with the number of near-cap members in a shard
(issue 21 item 4: +130 MB per member before the byte budget). The benchmark's own measure runs
on small sizes; the figures at the issue's sizes come from ``python -m bench memory``."""

from bench import memory

MEMBER = 40 * memory.MIB  # over glibc's largest mmap threshold (32 MiB): each member is its own mapping


def test_peak_rss_stays_flat_as_near_cap_members_grow_and_every_member_is_rejected():
    peaks = memory.measure((3, 10), MEMBER, budget=48 * memory.MIB)  # raises unless all members are rejected
    # without the budget the 10-member shard sat whole in memory: 7 more members, +290 MB
    assert peaks[10] - peaks[3] < 2 * MEMBER
