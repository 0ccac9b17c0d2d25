import pytest

from cai_bench.core.errors import UserError
from cai_bench.core.plan import (
    BITS_PER_SAMPLE,
    BYTES_PER_SAMPLE,
    partition_count,
    partition_sizes,
    samples_for_gb,
    samples_per_partition,
)


def test_sample_sizes_are_the_papers():
    assert BYTES_PER_SAMPLE == 20_524
    assert BITS_PER_SAMPLE == 164_160


def test_data_size_to_samples():
    assert samples_for_gb(1) == 2**30 // 20_524 == 52_316
    assert samples_for_gb(12.6) == 659_186


def test_partition_size_to_samples():
    # ceil(P * 2^20 / 20,524)
    assert [samples_per_partition(mb) for mb in (25, 50, 75, 100)] == [1278, 2555, 3832, 5110]


@pytest.mark.parametrize(("mb", "count"), [(25, 517), (50, 259), (75, 173), (100, 130)])
def test_partition_counts_for_the_full_set(mb, count):
    samples = samples_for_gb(12.6)
    assert partition_count(samples, mb) == count
    sizes = partition_sizes(samples, mb)
    assert len(sizes) == count
    assert sum(sizes) == samples
    assert max(sizes) - min(sizes) <= 1
    assert max(sizes) <= samples_per_partition(mb)


def test_one_gb_in_25_mb_partitions_is_the_papers_41_functions():
    assert partition_count(samples_for_gb(1), 25) == 41


def test_tiny_data_never_makes_empty_partitions():
    assert partition_sizes(3, 0.001) == [1, 1, 1]
    assert partition_sizes(5, 100) == [5]


@pytest.mark.parametrize("bad", [0, -1, 1e-9])
def test_sizes_that_hold_no_sample_are_errors(bad):
    with pytest.raises(UserError):
        samples_for_gb(bad)


def test_partition_size_must_be_positive():
    with pytest.raises(UserError, match="partition size must be a positive, finite number of MB"):
        samples_per_partition(0)
