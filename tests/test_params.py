"""NSG's parameters and their Auto rules against NSG's worked examples."""

from __future__ import annotations

import pytest

from nsg_gpu.params import Parameters, auto_sample_size, degrees_per_pixel, resolve_parameters


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
