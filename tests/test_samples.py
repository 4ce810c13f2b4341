"""The background sample grid: medians, black bins, star rejection and super-samples."""

from __future__ import annotations

import numpy as np
import pytest

from nsg_gpu.samples import (
    SampleSet,
    bin_medians,
    bin_samples,
    make_grid,
    sample_cap,
    star_rejection,
    trail_rejection,
)


def test_bin_medians_ignore_zeros_and_saturation_and_flag_black_bins():
    grid = make_grid(45, 64, 10)
    assert (grid.x0, grid.y0, grid.n_cols, grid.n_rows) == (2, 3, 6, 4)
    data = np.full((1, 45, 64), 0.2, np.float32)
    data[0, 3:13, 2:12] = np.linspace(0.1, 0.3, 100).reshape(10, 10)
    data[0, 3, 2] = 1.0  # saturated: ignored
    data[0, 13:16, 12:15] = 0.0  # a 3x3 no-data region (9 %): bin invalid
    data[0, 3:13, 12:22][::3, ::3] = 0.0  # scattered zeros (clipped pixels): ignored, bin valid
    medians, valid = bin_medians(data, grid, white_level=1.0)
    assert medians[0, 0, 0] == pytest.approx(np.median(np.linspace(0.1, 0.3, 100)[1:]), rel=1e-5)
    assert not valid[1, 1] and valid[0, 0] and valid[0, 1]
    assert medians[0, 0, 1] == pytest.approx(0.2)


def test_star_rejection_and_binning():
    grid = make_grid(200, 200, 20)
    rejected = star_rejection(grid, [100.0], [100.0], [15.0])
    assert rejected[5, 5] and not rejected[5, 0] and not rejected[0, 0]
    n = 100
    samples = SampleSet(np.repeat(grid.centre_x, 10), np.tile(grid.centre_y, 10), np.ones((1, n)), np.ones(n))
    binned = bin_samples(samples, grid, max_samples=30)
    assert len(binned) <= 30 and binned.weight.sum() == n


def test_the_node_cap_falls_with_the_smoothness_and_a_plane_takes_every_sample(tmp_path):
    """NSG 7.4: the spline's nodes are capped at max_samples up to smoothness 0, the cap falls
    linearly to 500 at 4, and at 4 (a plane) nothing is merged: on a frame of about 3300
    background samples, the nodes fitted at each smoothness are within that cap, and the
    plane is fitted on every sample."""
    from nsg_gpu.gradient import model_gradient
    from nsg_gpu.io import read_frame
    from nsg_gpu.params import Parameters
    from nsg_gpu.reference import prepare_reference
    from nsg_gpu.synthetic import write_synthetic_set

    assert [sample_cap(2000, s) for s in (-2.0, 0.0, 2.0, 3.0, 4.0)] == [2000, 2000, 1250, 875, None]
    paths = write_synthetic_set(tmp_path, n_frames=2, seed=5, width=420, height=320, n_stars=120)
    target = read_frame(paths[1])
    nodes = {}
    for smoothness in (-2.0, 2.0, 3.0, 4.0):
        reference = prepare_reference(paths[0], Parameters(sample_size=6, gradient_smoothness=smoothness))
        model = model_gradient(reference, target, np.ones(1))
        nodes[smoothness] = (len(model.samples), model.n_samples)
    n = nodes[4.0][1]
    assert n > 2000, nodes
    assert nodes[-2.0][0] <= 2000 and nodes[2.0][0] <= 1250 and nodes[3.0][0] <= 875, nodes
    assert nodes[2.0][0] < nodes[-2.0][0] and nodes[4.0][0] == n, nodes  # merged more; the plane on all


@pytest.mark.parametrize("angle", [0.0, 0.4, 1.1, np.pi / 2])
def test_trail_rejection_takes_the_bins_that_come_near_the_trail(angle):
    """A bin is rejected where some point of its square lies within the reach of a trail:
    checked against the distances of a fine lattice of points over every bin, for a trail
    across the whole frame (exactly) and for a stretch of 120 px (every bin that comes within
    the reach is rejected, none farther than a bin's side beyond it)."""
    grid = make_grid(300, 400, 24)
    along = np.array([np.cos(angle), np.sin(angle)])
    reach = 6.0
    offsets = (np.arange(97) / 96 - 0.5) * grid.size
    for first, last in ((-np.inf, np.inf), (-40.0, 80.0)):
        trails = np.array([[205.3, 148.7, along[0], along[1], first, last]])
        rejected = trail_rejection(grid, trails, reach)
        for r, cy in enumerate(grid.centre_y):
            for c, cx in enumerate(grid.centre_x):
                px, py = np.meshgrid(cx + offsets, cy + offsets)
                position = np.clip((px - 205.3) * along[0] + (py - 148.7) * along[1], first, last)
                nearest_x, nearest_y = 205.3 + position * along[0], 148.7 + position * along[1]
                distance = np.hypot(px - nearest_x, py - nearest_y).min()
                if np.isinf(last) and abs(distance - reach) > 0.2:
                    assert rejected[r, c] == (distance < reach), (r, c, distance)
                elif distance < reach - 0.2:
                    assert rejected[r, c], (r, c, distance)
                elif distance > reach + grid.size:
                    assert not rejected[r, c], (r, c, distance)
        assert rejected.any() and not rejected.all()
    assert not trail_rejection(grid, np.zeros((0, 6)), reach).any()
