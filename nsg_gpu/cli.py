"""The ``nsg`` command line: thin commands that parse, call one library function and report.

Known errors (:class:`~nsg_gpu.errors.NSGError`) end as one line on stderr and exit code 1;
set ``NSG_DEBUG=1`` for the traceback.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from . import __version__
from .errors import NSGError
from .params import Parameters

__all__ = ["app", "main"]

app = typer.Typer(
    name="nsg",
    help="Normalize registered astronomical frames to a reference: photometric scale, sky gradient and weight.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool):
    if value:
        typer.echo(f"nsg-gpu {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        Optional[bool], typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = None,
):
    """nsg-gpu: NormalizeScaleGradient for stacks of frames, on the GPU or the CPU."""


Auto = Optional[float]
#: The library's defaults (NSG's), shown and used by the options.
_DEFAULTS = Parameters()


def _one_line_errors(command):
    """Turn the library's known errors into one line on stderr and exit code 1."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except NSGError as exc:
            if os.environ.get("NSG_DEBUG"):
                raise
            typer.echo(f"nsg: error: {exc}", err=True)
            raise typer.Exit(code=1) from None
        except ValueError as exc:  # parameter validation
            if os.environ.get("NSG_DEBUG"):
                raise
            typer.echo(f"nsg: error: {exc}", err=True)
            raise typer.Exit(code=1) from None

    return wrapper


@app.command()
@_one_line_errors
def normalize(
    frames: Annotated[list[Path], typer.Argument(help="Registered FITS frames (the reference may be among them).")],
    reference: Annotated[
        str,
        typer.Option(
            "--reference",
            "-r",
            help="Reference frame, or 'auto' to choose the frame with the best star signal-to-noise among those with full coverage and a calm gradient.",
        ),
    ] = "auto",
    output_dir: Annotated[
        Path, typer.Option("--output-dir", "-o", help="Directory for <stem>_nsg.fits, results.csv and results.json.")
    ] = Path("nsg"),
    backend: Annotated[
        str, typer.Option(help="Array backend: auto (CuPy when a GPU is usable), numpy or cupy.")
    ] = "auto",
    detection_sigma: Annotated[
        float, typer.Option(help="Star detection threshold, in noise units of the matched-filter image.")
    ] = _DEFAULTS.detection_sigma,
    linear_range: Annotated[
        Auto,
        typer.Option(
            help="Stars peaking at or above this are not measured. [default: Auto, 0.7 x the reference's maximum]"
        ),
    ] = None,
    star_search_radius: Annotated[
        float, typer.Option(help="Largest star shift (px) between reference and target after recentring.")
    ] = _DEFAULTS.star_search_radius,
    star_flux_tolerance: Annotated[
        float,
        typer.Option(
            help="Star pairs whose flux ratio is off the first estimate by more than this factor are dropped."
        ),
    ] = _DEFAULTS.star_flux_tolerance,
    outlier_removal: Annotated[
        float, typer.Option(help="Percentage of star pairs removed as the farthest from the fitted line.")
    ] = _DEFAULTS.outlier_removal,
    aperture_fwhm: Annotated[
        float, typer.Option(help="Photometry aperture radius in units of the larger FWHM of the two frames.")
    ] = _DEFAULTS.aperture_fwhm,
    aperture_add: Annotated[
        float, typer.Option(help="Pixels added to the aperture radius and to the sample rejection circles.")
    ] = _DEFAULTS.aperture_add,
    aperture_gap: Annotated[
        Auto, typer.Option(help="Gap (px) between aperture and background annulus. [default: Auto]")
    ] = None,
    aperture_bg_delta: Annotated[
        Auto, typer.Option(help="Width (px) of the background annulus. [default: Auto]")
    ] = None,
    min_star_pairs: Annotated[
        int, typer.Option(help="Fewer usable star pairs than this fails the frame (NSG flags fewer than 3).")
    ] = _DEFAULTS.min_star_pairs,
    sample_size: Annotated[
        Optional[int], typer.Option(help="Side (px) of the background samples. [default: Auto]")
    ] = None,
    limit_sample_stars_percent: Annotated[
        Auto, typer.Option(help="Share (%) of reference stars, brightest first, that reject samples. [default: Auto]")
    ] = None,
    sample_star_growth_rate: Annotated[
        Auto, typer.Option(help="Growth of the rejection circles per unit of star flux. [default: Auto]")
    ] = None,
    gradient_smoothness: Annotated[
        float, typer.Option(help="log10 of the spline smoothing; 4 fits a plane.")
    ] = _DEFAULTS.gradient_smoothness,
    max_samples: Annotated[
        int, typer.Option(help="Samples are merged into super-samples above this count.")
    ] = _DEFAULTS.max_samples,
    weight_keyword: Annotated[str, typer.Option(help="Header keyword for the weight.")] = _DEFAULTS.weight_keyword,
    truncate: Annotated[
        bool, typer.Option("--truncate/--no-truncate", help="Clip outputs to [0, white level] as NSG does.")
    ] = _DEFAULTS.truncate,
    focal_length: Annotated[
        Auto, typer.Option(help="Focal length (mm) when the header has no FOCALLEN. [default: header, else 1000]")
    ] = None,
    pixel_size: Annotated[
        Auto, typer.Option(help="Pixel size (um) when the header has no XPIXSZ. [default: header, else 6]")
    ] = None,
    postfix: Annotated[str, typer.Option(help="Appended to each input's stem for its output name.")] = "_nsg",
    stop_on_error: Annotated[bool, typer.Option(help="Stop at the first frame that fails.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print only the summary.")] = False,
):
    """Normalize FRAMES to a reference and write <stem>_nsg.fits with NSG's keywords."""
    from .backend import select_backend
    from .pipeline import normalize as run_normalize
    from .progress import RunProgress

    params = Parameters(
        detection_sigma=detection_sigma,
        linear_range=linear_range,
        star_search_radius=star_search_radius,
        star_flux_tolerance=star_flux_tolerance,
        outlier_removal=outlier_removal,
        aperture_fwhm=aperture_fwhm,
        aperture_add=aperture_add,
        aperture_gap=aperture_gap,
        aperture_bg_delta=aperture_bg_delta,
        min_star_pairs=min_star_pairs,
        sample_size=sample_size,
        limit_sample_stars_percent=limit_sample_stars_percent,
        sample_star_growth_rate=sample_star_growth_rate,
        gradient_smoothness=gradient_smoothness,
        max_samples=max_samples,
        weight_keyword=weight_keyword,
        truncate=truncate,
        focal_length_mm=focal_length,
        pixel_size_um=pixel_size,
    )
    chosen = select_backend(backend)
    tracker: list[RunProgress] = []

    def report(result, done, total):
        if not tracker:
            tracker.append(RunProgress(total))
        progress = tracker[0]
        progress.update(done)
        if quiet:
            return
        name = Path(result.path).name
        if result.status == "failed":
            typer.echo(f"[{done}/{total}] FAILED {result.error}", err=True)
        elif result.status == "reference":
            typer.echo(f"[{done}/{total}] {name}: reference, {result.star_pairs} stars")
        else:
            transmission = " ".join(f"{t:.4f}" for t in result.transmission)
            typer.echo(
                f"[{done}/{total}] {name}: transmission {transmission}  weight {result.weight:.3f}  "
                f"pairs {result.star_pairs}  samples {result.samples}  {result.seconds:.1f} s  "
                f"({progress.summary()})"
            )

    run = run_normalize(
        frames,
        reference=reference,
        output_dir=output_dir,
        params=params,
        backend=chosen,
        postfix=postfix,
        stop_on_error=stop_on_error,
        progress=report,
    )
    if run.reference_reason and not quiet:
        typer.echo(f"reference: {Path(run.reference).name}: {run.reference_reason}")
    done = sum(1 for f in run.frames if f.status != "failed")
    typer.echo(
        f"{done} of {len(run.frames)} frames normalized on {chosen.name}; results in {output_dir / 'results.csv'}"
    )
    if run.failed:
        typer.echo(f"{len(run.failed)} frame(s) failed:", err=True)
        for f in run.failed:
            typer.echo(f"  {f.error}", err=True)
        raise typer.Exit(code=2)


@app.command()
@_one_line_errors
def synth(
    directory: Annotated[Path, typer.Argument(help="Where to write the frames and truth.json.")],
    frames: Annotated[
        int, typer.Option("--frames", "-n", help="Number of frames; the first is the natural reference.")
    ] = 5,
    width: Annotated[int, typer.Option(help="Frame width (px).")] = 2000,
    height: Annotated[int, typer.Option(help="Frame height (px).")] = 1400,
    colour: Annotated[bool, typer.Option("--colour/--mono", help="Three-channel colour frames.")] = False,
    stars: Annotated[int, typer.Option(help="Stars in the field.")] = 3500,
    seed: Annotated[int, typer.Option(help="Random seed; the same seed gives the same frames.")] = 1,
):
    """Write synthetic registered frames with known transmission and gradient (see truth.json)."""
    from .synthetic import write_synthetic_set

    paths = write_synthetic_set(
        directory, n_frames=frames, width=width, height=height, colour=colour, n_stars=stars, seed=seed
    )
    typer.echo(f"{len(paths)} frames written to {directory} (truth in {directory / 'truth.json'})")


@app.command()
@_one_line_errors
def info(
    backend: Annotated[str, typer.Option(help="Backend to resolve: auto, numpy or cupy.")] = "auto",
):
    """Print the backend that would run and why, with library versions."""
    import numpy
    import scipy

    from .backend import cupy_status, select_backend

    usable, reason = cupy_status()
    chosen = select_backend(backend)
    typer.echo(f"nsg-gpu {__version__}")
    typer.echo(f"backend: {chosen.name} (asked: {backend}; GPU: {reason})")
    typer.echo(f"numpy {numpy.__version__}, scipy {scipy.__version__}, python {sys.version.split()[0]}")


def main() -> None:
    """Entry point of ``nsg``."""
    app()
