import numpy as np
import pytest

from cai_bench.data import synthetic


@pytest.fixture(scope="module")
def galaxies():
    return synthetic.generate(seed=11, start=0, stop=2048)


def test_shapes_and_dtypes(galaxies):
    assert galaxies.images.shape == (2048, 5, 32, 32) and galaxies.images.dtype == np.float32
    assert galaxies.magnitudes.shape == (2048, 5) and galaxies.magnitudes.dtype == np.float64
    assert galaxies.redshift.shape == (2048,) and galaxies.redshift.dtype == np.float32
    assert galaxies.object_id.dtype == np.int64
    assert np.array_equal(galaxies.object_id, np.arange(2048))
    assert np.isfinite(galaxies.images).all()


def test_same_seed_same_values_other_seed_other_values(galaxies):
    again = synthetic.generate(seed=11, start=0, stop=600)
    other = synthetic.generate(seed=12, start=0, stop=600)
    assert np.array_equal(again.images, galaxies.images[:600])
    assert np.array_equal(again.magnitudes, galaxies.magnitudes[:600])
    assert not np.array_equal(other.images, again.images)


def test_any_range_equals_the_same_slice_of_the_whole(galaxies):
    # what makes a data set independent of its partitioning
    part = synthetic.generate(seed=11, start=700, stop=1500)
    assert np.array_equal(part.images, galaxies.images[700:1500])
    assert np.array_equal(part.redshift, galaxies.redshift[700:1500])
    assert np.array_equal(part.object_id, np.arange(700, 1500))


def test_redshift_is_distributed_like_the_sdss_main_sample(galaxies):
    z = galaxies.redshift
    assert z.min() >= 0.01 and z.max() <= 0.55
    assert 0.07 < np.median(z) < 0.14
    assert np.mean((z > 0.03) & (z < 0.2)) > 0.75  # "most between 0.03 and 0.2"
    counts, edges = np.histogram(z, bins=np.arange(0.0, 0.56, 0.025))
    assert 0.05 <= edges[np.argmax(counts)] <= 0.125  # peak near 0.1


def test_magnitudes_lie_in_the_sdss_ranges(galaxies):
    ranges = {"u": (15.0, 23.0), "g": (14.0, 20.5), "r": (12.8, 17.9), "i": (12.4, 17.7), "z": (12.0, 17.6)}
    for band, (lo, hi) in zip("ugriz", ranges.values(), strict=True):
        values = galaxies.magnitudes[:, "ugriz".index(band)]
        assert np.percentile(values, 1) > lo and np.percentile(values, 99) < hi, band


def test_colours_redden_and_galaxies_fade_with_redshift(galaxies):
    m, z = galaxies.magnitudes, galaxies.redshift
    g_r, r_i = m[:, 1] - m[:, 2], m[:, 2] - m[:, 3]
    assert 0.4 < np.median(g_r) < 1.0 and 0.25 < np.median(r_i) < 0.55
    assert np.corrcoef(z, g_r)[0, 1] > 0.2
    assert np.corrcoef(z, r_i)[0, 1] > 0.1
    assert np.corrcoef(z, m[:, 2])[0, 1] > 0.2  # farther galaxies are fainter


def test_images_show_a_centred_galaxy_whose_flux_follows_its_magnitude(galaxies):
    images = galaxies.images
    centre = images[:, :, 12:20, 12:20].mean(axis=(2, 3))
    corner = images[:, :, :4, :4].mean(axis=(2, 3))
    assert (centre > corner).mean() > 0.95
    # brighter r magnitude -> more flux in the r image
    r_flux = images[:, 2].sum(axis=(1, 2))
    assert np.corrcoef(galaxies.magnitudes[:, 2], np.log10(np.clip(r_flux, 1e-3, None)))[0, 1] < -0.8
    # sky noise: the u and z bands are noisier than g and r
    corner_std = np.median(images[:, :, :4, :4].std(axis=(2, 3)), axis=0)
    assert corner_std[0] > corner_std[1] and corner_std[4] > corner_std[2]
