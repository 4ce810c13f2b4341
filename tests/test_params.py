"""NSG's parameters and their Auto rules: NSG's worked examples, and the same values whatever
the data's units."""

from __future__ import annotations

import re

import numpy as np
import pytest
from astropy.io import fits
from typer.testing import CliRunner

from nsg_gpu.cli import app
from nsg_gpu.errors import ReferenceFrameError
from nsg_gpu.params import Parameters, auto_sample_size, degrees_per_pixel, resolve_parameters
from nsg_gpu.reference import prepare_reference
from nsg_gpu.run import normalize
from nsg_gpu.synthetic import SyntheticField

runner = CliRunner()


@pytest.mark.parametrize(
    ("pixel", "focal", "width", "height", "size", "gap", "bg_delta"),
    [
        pytest.param(6.0, 1000, 4096, 4096, 91, 1, 6, id="6um-1000mm"),
        pytest.param(3.76, 500, 6248, 4176, 114, 1, 5, id="3.76um-500mm"),
        pytest.param(3.76, 2000, 6248, 4176, 114, 5, 19, id="3.76um-2000mm"),
        pytest.param(2.4, 250, 3008, 3008, 67, 1, 5, id="2.4um-250mm"),
    ],
)
def test_auto_rules_match_nsg_worked_examples(pixel, focal, width, height, size, gap, bg_delta):
    """The worked examples of the algorithm reference (section 8)."""
    a = degrees_per_pixel(pixel, focal)
    assert auto_sample_size(width, height, pixel, a) == size
    resolved = resolve_parameters(
        Parameters(),
        width=width,
        height=height,
        header_focal_length_mm=focal,
        header_pixel_size_um=pixel,
        reference_max=1.0,
        max_star_flux=100.0,
        n_reference_stars=1000,
    )
    assert resolved.aperture_gap == gap
    assert resolved.aperture_bg_delta == bg_delta
    assert resolved.linear_range == 0.7
    assert resolved.sample_size == size


def test_parameters_reject_nonsense():
    with pytest.raises(ValueError, match="star_flux_tolerance"):
        Parameters(star_flux_tolerance=0.5)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("aperture_add", -1.0),
        ("aperture_add", 11.0),
        ("aperture_gap", -0.5),
        ("aperture_gap", 51.0),
        ("aperture_bg_delta", 0.5),
        ("aperture_bg_delta", 60.0),
        ("limit_sample_stars_percent", -5.0),
        ("limit_sample_stars_percent", 101.0),
        ("sample_star_growth_rate", -1.0),
        ("focal_length_mm", -500.0),
        ("focal_length_mm", 0.0),
        ("pixel_size_um", 0.0),
        ("weight_keyword", "W=1"),
        ("weight_keyword", "WEIGHT 1"),
        ("weight_keyword", "NSGS0"),
        ("weight_keyword", "noise00"),
        ("weight_keyword", "EXPTIME"),
        ("gradient_smoothness", 9.0),
        ("gradient_smoothness", -9.0),
    ],
)
def test_parameters_out_of_nsgs_ranges_are_one_line_naming_the_option(field, value):
    """NSG's ranges (aperture add 0-10, gap 0-50, background delta 1-50, limit 0-100 %, a
    growth rate not negative), optics that are positive and a weight keyword FITS can hold:
    out of them, the option is named before any frame is read (they ran, and a negative growth
    rate made negative rejection circles; a keyword with '=' failed every frame on writing)."""
    with pytest.raises(ValueError, match=field):
        Parameters(**{field: value})
    flag = {"focal_length_mm": "--focal-length", "pixel_size_um": "--pixel-size"}.get(
        field, "--" + field.replace("_", "-")
    )
    result = runner.invoke(app, ["normalize", "nothing.fits", "-r", "nothing.fits", "-o", "out", flag, str(value)])
    assert result.exit_code == 1 and f"({flag})" in result.output and "Traceback" not in result.output


def test_a_lower_case_weight_keyword_replaces_the_card_an_input_carries(tmp_path):
    """``--weight-keyword nweight`` kept an input's NWEIGHT = 5 beside the new card, and
    astropy read the stale one first; the keyword is now upper case, as FITS has it."""
    from astropy.io import fits

    from nsg_gpu.run import normalize
    from nsg_gpu.synthetic import write_synthetic_set

    paths = write_synthetic_set(tmp_path / "in", n_frames=2, seed=4, width=500, height=400, n_stars=500)
    with fits.open(paths[1], mode="update") as hdul:
        hdul[0].header["NWEIGHT"] = 5.0
    params = Parameters(weight_keyword="nweight", min_weight=0, min_transmission=0)
    assert params.weight_keyword == "NWEIGHT"
    run = normalize(paths, reference=paths[0], output_dir=tmp_path / "o", params=params)
    header = fits.getheader(run.frames[1].output)
    assert [card.keyword for card in header.cards].count("NWEIGHT") == 1
    assert header["NWEIGHT"] == run.frames[1].weight != 5.0


#: White level of 16-bit data (BITPIX 16, BZERO 32768).
ADU = 65535.0


@pytest.mark.parametrize(
    ("max_star_flux", "binding"),
    [
        pytest.param(17.8, "cap", id="cap-binds"),  # a brightest star of 17.8 in [0, 1] units
        pytest.param(2000.0, "reach", id="reach-binds"),
    ],
)
def test_auto_rules_do_not_depend_on_the_data_units(max_star_flux, binding):
    """The same reference in [0, 1] and in 16-bit ADU: values in pixel or flux units scale
    with the white level, the others are equal, and the circles are the same in pixels."""
    common = dict(width=1200, height=900, header_focal_length_mm=530.0, header_pixel_size_um=3.76)
    common["n_reference_stars"] = 700
    unit = resolve_parameters(Parameters(), **common, reference_max=0.93, max_star_flux=max_star_flux)
    adu = resolve_parameters(
        Parameters(), **common, reference_max=0.93 * ADU, max_star_flux=max_star_flux * ADU, white_level=ADU
    )
    reach = max(2, round(0.0375 / degrees_per_pixel(3.76, 530.0)))
    expected_rate = 0.25 if binding == "cap" else reach / max_star_flux
    assert unit.sample_star_growth_rate == pytest.approx(expected_rate, rel=1e-12)
    # The brightest star's circle grows by the same number of pixels.
    assert adu.sample_star_growth_rate * max_star_flux * ADU == pytest.approx(expected_rate * max_star_flux, rel=1e-12)
    assert unit.linear_range == 0.651 and adu.linear_range == pytest.approx(0.651 * ADU, rel=1e-12)
    for name in ("sample_size", "limit_sample_stars_percent", "aperture_gap", "aperture_bg_delta"):
        assert getattr(adu, name) == getattr(unit, name), name


@pytest.fixture(scope="module")
def frames_in_two_units(tmp_path_factory):
    """Three 600x450 synthetic frames written three times, as float [0, 1], as 16-bit ADU with
    BZERO 32768 and as the same ADU in a 32-bit integer file, holding the same values (the
    floats are the ADU divided by 65535), and as floats in ADU of more than 16 bits (four
    times the counts, a hot pixel of its own value in each target's corner), and as floats in
    [0, 1] whose targets' saturated cores a flat lifted beyond 1."""
    root = tmp_path_factory.mktemp("units")
    field = SyntheticField(width=600, height=450, n_frames=3, n_stars=800, seed=4)
    paths = {"float": [], "adu": [], "adu32": [], "wide": [], "overshoot": []}
    for unit in paths:
        (root / unit).mkdir()
    for k, truth in enumerate(field.frames):
        data = field.render(k)[0]
        counts = np.where(data > 0, np.maximum(np.rint(data * ADU), 1), 0)
        for unit, values in (
            ("float", (counts / ADU).astype(np.float32)),
            ("adu", counts.astype(np.uint16)),
            ("adu32", counts.astype(np.int32)),
            ("wide", _beyond_sixteen_bits(counts, k)),
            ("overshoot", _overshoot((counts / ADU).astype(np.float32), k)),
        ):
            path = root / unit / f"{truth.name}.fits"
            fits.PrimaryHDU(values, header=field.header(k)).writeto(path)
            paths[unit].append(path)
    with fits.open(paths["adu"][0]) as hdul:
        assert (hdul[0].header["BITPIX"], hdul[0].header["BZERO"]) == (16, 32768)
    with fits.open(paths["adu32"][0]) as hdul:
        assert hdul[0].header["BITPIX"] == 32 and "BZERO" not in hdul[0].header
    return paths


def _beyond_sixteen_bits(counts: np.ndarray, k: int) -> np.ndarray:
    wide = (4 * counts).astype(np.float32)
    if k:  # the reference's brightest pixel sets the linear range; the targets' do not
        wide[3, 3] = 300000 + 1000 * k
    return wide


def _overshoot(floats: np.ndarray, k: int) -> np.ndarray:
    if k:
        floats[floats > 0.9] *= np.float32(1.1)
    return floats


@pytest.mark.parametrize(
    "params",
    [
        pytest.param(Parameters(), id="header-optics"),  # the 0.25 cap on the growth rate binds
        pytest.param(Parameters(focal_length_mm=10.0), id="wide-field"),  # the 2 px reach binds
    ],
)
def test_reference_is_the_same_in_adu(frames_in_two_units, params):
    """Prepared from float and from 16-bit files, the reference rejects the same samples with
    the same circles and measures the same stars."""
    unit = prepare_reference(frames_in_two_units["float"][0], params)
    adu = prepare_reference(frames_in_two_units["adu"][0], params)
    assert (unit.frame.white_level, adu.frame.white_level) == (1.0, ADU)
    np.testing.assert_allclose(adu.circles, unit.circles, rtol=0, atol=1e-4)
    assert adu.rejected.sum() > 0
    np.testing.assert_array_equal(adu.rejected, unit.rejected)
    np.testing.assert_array_equal(adu.photometry_index, unit.photometry_index)
    assert adu.params.sample_size == unit.params.sample_size
    assert adu.params.limit_sample_stars_percent == unit.params.limit_sample_stars_percent
    assert adu.params.linear_range == pytest.approx(unit.params.linear_range * ADU, rel=1e-6)
    assert adu.params.sample_star_growth_rate == pytest.approx(unit.params.sample_star_growth_rate / ADU, rel=1e-4)


def test_linear_range_in_zero_to_one_on_adu_frames_is_refused_with_the_value(frames_in_two_units, tmp_path):
    """NSG's "linear range 0.7" copied onto 16-bit frames: in their units it leaves every
    star out, and every frame failed for want of stars. It is refused, naming the reference
    and the value that means 0.7 of the white level; on frames in [0, 1] it is NSG's."""
    with pytest.raises(ReferenceFrameError, match=r"--linear-range 0.7 is in the data's units.*45874.5") as caught:
        prepare_reference(frames_in_two_units["adu"][0], Parameters(linear_range=0.7))
    assert str(caught.value.path) == str(frames_in_two_units["adu"][0])
    assert prepare_reference(frames_in_two_units["float"][0], Parameters(linear_range=0.7)).params.linear_range == 0.7
    adu = prepare_reference(frames_in_two_units["adu"][0], Parameters(linear_range=0.7 * ADU))
    assert adu.params.linear_range == pytest.approx(0.7 * ADU)
    result = runner.invoke(
        app, ["normalize", *map(str, frames_in_two_units["adu"]), "-o", str(tmp_path / "o"), "--linear-range", "0.7"]
    )
    assert result.exit_code == 1 and "give --linear-range 45874.5" in result.output


def test_growth_rate_in_zero_to_one_units_on_adu_frames_is_refused_with_the_value(frames_in_two_units):
    """NSG's cap of 0.25 px per unit of [0, 1] flux given on 16-bit frames grows the brightest
    star's circle by hundreds of thousands of pixels; it is refused with the rate in the data's
    units. On frames in [0, 1] the same rate is NSG's."""
    with pytest.raises(ReferenceFrameError, match=r"more than the frame's 600.*is 3.81e-06 here"):
        prepare_reference(frames_in_two_units["adu"][0], Parameters(sample_star_growth_rate=0.25))
    unit = prepare_reference(frames_in_two_units["float"][0], Parameters(sample_star_growth_rate=0.25))
    adu = prepare_reference(frames_in_two_units["adu"][0], Parameters(sample_star_growth_rate=0.25 / ADU))
    np.testing.assert_allclose(adu.circles, unit.circles, rtol=0, atol=1e-4)


def test_run_is_the_same_in_adu(frames_in_two_units, tmp_path):
    """A whole run on float and on 16-bit files: the same samples and star pairs per frame,
    the same transmissions."""
    keep_all = Parameters(min_weight=0, min_transmission=0)
    runs = {
        unit: normalize(paths, reference=paths[0], output_dir=tmp_path / unit, params=keep_all)
        for unit, paths in frames_in_two_units.items()
    }
    unit, adu = runs["float"].frames, runs["adu"].frames
    assert [f.status for f in unit + adu] == ["reference", "ok", "ok"] * 2
    # A 32-bit integer file holding a 16-bit camera's counts is read as the 16-bit file: with
    # the type's white level (2^31 - 1) the linear range, rounded to a thousandth of it, came
    # out at 0.7 of it, and the saturated stars were measured as linear ones.
    for a, b in zip(adu, runs["adu32"].frames):
        assert (b.status, b.star_pairs, b.samples) == (a.status, a.star_pairs, a.samples)
        np.testing.assert_array_equal(b.transmission, a.transmission)
        assert b.weight == a.weight
    # Floats in ADU beyond 16 bits read their white level from their brightest pixel, which
    # differs from frame to frame: they are in the units of one another (every target failed
    # with "units unlike the reference's").
    wide = runs["wide"].frames
    assert [f.status for f in wide] == ["reference", "ok", "ok"]
    for a, b in zip(adu, wide):
        np.testing.assert_allclose(b.transmission, a.transmission, rtol=0, atol=1e-4)
    # Floats in [0, 1] with saturated cores beyond 1 are still in [0, 1] (they were read as
    # ADU up to 65535, and failed against the reference in [0, 1]).
    lifted = runs["overshoot"].frames
    assert [f.status for f in lifted] == ["reference", "ok", "ok"]
    assert max(f.high for f in lifted) > 1
    for a, b in zip(unit, lifted):
        np.testing.assert_allclose(b.transmission, a.transmission, rtol=0, atol=1e-4)
    assert [f.samples for f in adu] == [f.samples for f in unit]
    assert [f.star_pairs for f in adu] == [f.star_pairs for f in unit]
    for a, b in zip(unit, adu):
        np.testing.assert_allclose(b.transmission, a.transmission, rtol=0, atol=1e-4)


def test_linear_range_of_a_reference_far_below_its_white_level_is_its_own(tmp_path):
    """NSG rounds the linear range (0.7 of the reference's maximum) to a thousandth of the
    white level; a reference whose brightest pixel is under a thousandth of it (a dark frame in
    a wide integer type) rounded to 0, and the fallback, 0.7 of the white level, took every
    saturated star for a linear one. It keeps 0.7 of its own maximum."""
    common = dict(width=1200, height=900, header_focal_length_mm=530.0, header_pixel_size_um=3.76)
    resolved = resolve_parameters(
        Parameters(), **common, n_reference_stars=700, reference_max=30000.0, max_star_flux=4e5, white_level=2**31 - 1
    )
    assert resolved.linear_range == pytest.approx(0.7 * 30000.0, rel=1e-12)
    dim = resolve_parameters(Parameters(), **common, n_reference_stars=700, reference_max=6e-4, max_star_flux=0.01)
    assert dim.linear_range == pytest.approx(0.7 * 6e-4, rel=1e-12)
    # At a thousandth of the white level and more, NSG's rounding.
    assert resolve_parameters(
        Parameters(), **common, n_reference_stars=700, reference_max=0.0015, max_star_flux=0.02
    ).linear_range == pytest.approx(0.001)


def test_the_auto_linear_range_of_colour_is_read_on_the_brightest_channel(tmp_path):
    """NSG's linear range is 0.7 of the reference's brightest pixel: on a colour reference
    whose green and blue are a third of its red, 0.7 of the red's maximum, not of the colour
    intensity's (min + max) / 2, against which the stars' peaks in their brightest channel
    (red here) dropped a third of the unsaturated bright stars."""
    from nsg_gpu.reference import prepare_reference

    field = SyntheticField(width=500, height=400, n_frames=1, n_stars=600, seed=6, colour=True)
    data = field.render(0).astype(np.float32)
    data[1:] *= np.float32(0.3)
    path = tmp_path / "unbalanced.fits"
    fits.PrimaryHDU(data, header=field.header(0)).writeto(path)
    reference = prepare_reference(path)
    assert reference.params.linear_range == pytest.approx(round(1000 * 0.7 * float(data.max())) / 1000)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("reject_circles", "10,20,30;5", "is not 'x,y' or 'x,y,r'"),
        ("reject_circles", "10,20,900", "must be in (0, 800]"),
        ("reject_circles", "a,b", "is not 'x,y' or 'x,y,r'"),
        ("photometry_region", "0,0,10", "is not 'x0,y0,x1,y1'"),
        ("photometry_region", "10,0,5,20", "has no area"),
    ],
)
def test_manual_circles_and_the_photometry_region_are_checked(field, value, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        Parameters(**{field: value})


def test_manual_circles_reject_samples_and_the_region_picks_the_photometry_stars(tmp_path):
    """NSG's manual rejection circles ('x,y[,r]', r 20 by default) leave out the background
    samples by the stars' rule (a bin within r + half a bin of the centre), and its photometry
    ROI keeps the stars within it alone for the scale; without them, neither happens."""
    from nsg_gpu.reference import prepare_reference

    field = SyntheticField(width=500, height=400, n_frames=1, n_stars=600, seed=9)
    path = tmp_path / "ref.fits"
    fits.PrimaryHDU(field.render(0)[0], header=field.header(0)).writeto(path)
    plain = prepare_reference(path, Parameters(sample_size=20))
    chosen = prepare_reference(
        path, Parameters(sample_size=20, reject_circles="250,200,60; 40,40", photometry_region="0,0,250,200")
    )
    grid = chosen.grid
    cx, cy = np.meshgrid(grid.centre_x, grid.centre_y)
    for x, y, r in ((250, 200, 60), (40, 40, 20)):
        inside = np.hypot(cx - x, cy - y) < r + grid.size / 2
        assert inside.any() and chosen.rejected[inside].all() and not plain.rejected[inside].all()
    stars = chosen.stars
    x, y = stars.x[chosen.photometry_index], stars.y[chosen.photometry_index]
    assert len(x) >= 10 and (x < 250).all() and (y < 200).all()
    px, py = plain.stars.x[plain.photometry_index], plain.stars.y[plain.photometry_index]
    assert ((px >= 250) | (py >= 200)).sum() > len(x)  # the plain run measures the others too
