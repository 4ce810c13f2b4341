"""The ``nsg`` command line: thin commands that parse, call one library function and report.

Exit codes: 0 when every frame was done; 1 for an error that stops the run (one line on
stderr, from :class:`~nsg_gpu.errors.NSGError`; ``NSG_DEBUG=1`` shows the traceback); 2 for a
usage error (an unknown option, a missing argument); 3 when some frames failed and the others
were done. Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import functools
import inspect as pyinspect
import json
import os
import sys
import typing
from pathlib import Path
from typing import Annotated, Optional

import typer

from .backend import BACKEND_NAMES
from .display import RunDisplay, StackDisplay
from .errors import NSGError, ParameterError
from .io import OUTPUT_FORMATS
from .params import Parameters
from .pixel_rejection import METHODS
from .stacking import MAPS
from .synthetic import SCENARIOS
from .version import __version__

__all__ = ["app", "main"]

#: Exit codes of ``nsg`` (README "Exit codes"); 2, a usage error, is click's.
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_FRAMES_FAILED = 3
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports it


def _choices(name: str, values, doc: str) -> type[enum.Enum]:
    """An Enum of the library's ``values`` (strings), through which typer offers choices."""
    choices = enum.Enum(name, {value: value for value in values}, type=str)
    choices.__doc__ = doc
    return choices


BackendName = _choices("BackendName", BACKEND_NAMES, "The array backends by name (backend.select_backend).")
OutputFormat = _choices("OutputFormat", OUTPUT_FORMATS, "The formats nsg normalize writes.")
RejectionMethod = _choices(
    "RejectionMethod", ("auto", *METHODS), "Pixel rejection of nsg stack (pixel_rejection.METHODS, or auto)."
)
Maps = _choices("Maps", MAPS, "Where nsg stack writes the coverage and rejection maps.")


#: The array backend of ``nsg normalize`` and ``nsg stack``; a value not among the choices is a
#: usage error (exit code 2), as for every option with choices.
BackendOption = Annotated[
    BackendName,
    typer.Option(case_sensitive=False, help="Array backend: auto (CuPy when a GPU is usable), numpy or cupy."),
]

app = typer.Typer(
    name="nsg",
    help="Normalize registered astronomical frames to a reference: photometric scale, sky gradient and weight.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # Click's plain help: typer's boxed tables cut option names short in a terminal of 80
    # columns (--limit-sample-s...), and its type column took the room of the help.
    rich_markup_mode=None,
)


def _version(value: bool):
    if value:
        typer.echo(f"nsg-gpu {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        Optional[bool],
        typer.Option("--version", metavar="", callback=_version, is_eager=True, help="Print the version and exit."),
    ] = None,
):
    """nsg-gpu: NormalizeScaleGradient for stacks of frames, on the GPU or the CPU."""


def _one_line_errors(command):
    """Turn the library's known errors into one line on stderr and exit code 1; anything else
    is a bug and keeps its traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except NSGError as exc:
            if os.environ.get("NSG_DEBUG"):
                raise
            typer.echo(f"nsg: error: {exc}", err=True)
            raise typer.Exit(code=EXIT_ERROR) from None
        except KeyboardInterrupt:
            if os.environ.get("NSG_DEBUG"):
                raise
            typer.echo(
                "nsg: interrupted: the same command again finishes the job (nsg normalize and nsg stack write "
                "each output complete or not at all; nsg normalize keeps the frames it completed)",
                err=True,
            )
            raise typer.Exit(code=EXIT_INTERRUPTED) from None

    return wrapper


def _parameter_option(item: dataclasses.Field, annotation) -> pyinspect.Parameter:
    """The typer option of one :class:`~nsg_gpu.params.Parameters` field, from its metadata."""
    meta = item.metadata
    help_text = meta["help"]
    if meta["auto"]:
        help_text += f" [default: Auto, {meta['auto']}]"
    flag = meta["flag"] or "--" + item.name.replace("_", "-")
    default = item.default
    if meta["choices"]:  # typer offers choices through an Enum
        annotation = _choices(item.name.title(), meta["choices"], meta["help"])
        default = annotation(default)
    flag_only = {"metavar": ""} if annotation is bool else {}  # a flag takes no value
    option = typer.Option(*flag.split(" "), help=help_text, show_default=meta["auto"] is None, **flag_only)
    return pyinspect.Parameter(
        item.name, pyinspect.Parameter.KEYWORD_ONLY, default=default, annotation=Annotated[annotation, option]
    )


def _parameter_options(command):
    """Give ``command`` one option per field of :class:`~nsg_gpu.params.Parameters`, declared
    once there (help, default, Auto rule), and call it with them gathered as ``params``."""
    hints = typing.get_type_hints(Parameters)
    fields = dataclasses.fields(Parameters)
    signature = pyinspect.signature(command, eval_str=True)
    own = [p for name, p in signature.parameters.items() if name != "params"]
    options = [_parameter_option(item, hints[item.name]) for item in fields]

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        values = {item.name: kwargs.pop(item.name) for item in fields if item.name in kwargs}
        values = {name: getattr(value, "value", value) for name, value in values.items()}
        return command(*args, **kwargs, params=Parameters(**values))

    del wrapper.__wrapped__
    wrapper.__signature__ = signature.replace(parameters=own + options)
    wrapper.__annotations__ = {p.name: p.annotation for p in own + options}
    return wrapper


@app.command()
@_one_line_errors
@_parameter_options
def normalize(
    frames: Annotated[
        list[Path],
        typer.Argument(
            metavar="FRAMES",
            help="Registered FITS or XISF frames, or directories of them (the reference may be among them).",
        ),
    ],
    reference: Annotated[
        str,
        typer.Option(
            "--reference",
            "-r",
            help="Reference frame (a path, or the name or stem of one of FRAMES), or 'auto' to choose the frame with the best star signal-to-noise among those that cover the area most frames share and have a calm gradient.",
        ),
    ] = "auto",
    output_dir: Annotated[
        Path, typer.Option("--output-dir", "-o", help="Directory for <stem>_nsg.fits, results.csv and results.json.")
    ] = Path("nsg"),
    backend: BackendOption = BackendName.auto,
    postfix: Annotated[str, typer.Option(help="Appended to each input's stem for its output name.")] = "_nsg",
    output_format: Annotated[
        OutputFormat, typer.Option(case_sensitive=False, help="Format of the normalized frames: fits or xisf.")
    ] = OutputFormat.fits,
    overwrite: Annotated[
        bool,
        typer.Option(
            metavar="",
            help="Redo every frame; without it, outputs left complete by an earlier run with the same "
            "reference and parameters are kept.",
        ),
    ] = False,
    stop_on_error: Annotated[bool, typer.Option(metavar="", help="Stop at the first frame that fails.")] = False,
    scheduler: Annotated[
        Optional[str],
        typer.Option(
            help="Run on the Dask cluster of this scheduler (tcp://host:8786, or a scheduler file); its workers must see the frames and the output directory at the same paths."
        ),
    ] = None,
    workers: Annotated[
        Optional[int], typer.Option(help="Run on a local Dask cluster of N worker processes (one thread each).")
    ] = None,
    gpus: Annotated[
        Optional[str],
        typer.Option(
            help="Run on a local dask-cuda cluster with one worker per GPU: 'all' or N; implies --backend cupy."
        ),
    ] = None,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", metavar="", help="Print only the summary and failures.")
    ] = False,
    json_lines: Annotated[
        bool,
        typer.Option(
            "--json",
            metavar="",
            help="Print one JSON object per frame (its results row) and one for the run, nothing else.",
        ),
    ] = False,
    plots: Annotated[
        bool,
        typer.Option(
            metavar="", help="Write the diagnostic plots of every frame to DIR/plots (a few chosen frames always)."
        ),
    ] = False,
    html_report: Annotated[
        bool,
        typer.Option("--report/--no-report", metavar="", help="Write DIR/report.html with charts and diagnostics."),
    ] = True,
    stack_output: Annotated[
        Optional[Path],
        typer.Option(
            "--stack",
            help="After the run, stack the accepted outputs into this master FITS file (nsg stack DIR -o PATH "
            "with its defaults: NWEIGHT weights, rejection by the frame count).",
        ),
    ] = None,
    *,
    params: Parameters,
):
    """Normalize FRAMES to a reference and write <stem>_nsg.fits with NSG's keywords."""
    from .backend import select_backend
    from .run import check_output_dir
    from .run import normalize as run_normalize

    backend, output_format = backend.value, output_format.value

    check_output_dir(output_dir)  # before the progress bar: a one-line error, nothing started
    if stack_output is not None:
        from .io import expand_frames
        from .stacking import check_master_name

        check_master_name(stack_output)
        if Path(stack_output).resolve() in {p.resolve() for p in expand_frames(frames)}:
            raise ParameterError(f"{stack_output}: --stack names one of the frames; choose another path")

    clustered = scheduler is not None or workers is not None or gpus is not None
    if gpus is not None:
        from .cluster import ClusterError, check_cluster_options, parse_gpus, require_dask_cuda

        check_cluster_options(scheduler=scheduler, workers=workers, gpus=gpus)  # the options first
        parse_gpus(gpus)
        if backend == "numpy":
            raise ClusterError("--gpus runs the cupy backend; drop --backend numpy or use --workers N")
        require_dask_cuda()
        backend = "cupy"
    chosen = select_backend(backend)
    cluster = contextlib.nullcontext()
    if clustered:  # Dask is imported only here
        from .cluster import open_cluster

        notify = None if quiet or json_lines else (lambda line: typer.echo(line, err=True))
        cluster = open_cluster(scheduler=scheduler, workers=workers, gpus=gpus, notify=notify)
    display = RunDisplay(quiet=quiet, json_lines=json_lines)
    with cluster as executor, display:
        if executor is not None and not quiet and not json_lines:
            display.note(executor.describe())
        run = run_normalize(
            frames,
            reference=reference,
            output_dir=output_dir,
            params=params,
            backend=chosen,
            postfix=postfix,
            stop_on_error=stop_on_error,
            progress=display.frame_done,
            plots=plots,
            report=html_report,
            overwrite=overwrite,
            output_format=output_format,
            executor=executor,
        )
    display.finish(run, backend=chosen.name, output_dir=output_dir)
    skipped = False
    if stack_output is not None:
        from .stacking import stack as run_stack

        report_page = Path(run.report) if run.report else False
        with StackDisplay(quiet=quiet, json_lines=json_lines) as shown:
            result = run_stack(
                [output_dir],
                stack_output,
                weights=params.weight_keyword,
                backend=chosen,
                report=report_page,
                progress=shown.band_done,
            )
        shown.finish(result)
        skipped = bool(result.skipped)
    if run.failed or skipped:
        raise typer.Exit(code=EXIT_FRAMES_FAILED)


@app.command()
@_one_line_errors
def stack(
    inputs: Annotated[
        list[Path],
        typer.Argument(
            metavar="DIR_OR_FRAMES",
            help="Normalized frames (FITS or XISF), or directories of nsg normalize outputs: their accepted "
            "frames (the files of weights.csv; never those of rejected/).",
        ),
    ],
    output: Annotated[Path, typer.Option("--output", "-o", help="The master, a float32 FITS file.")],
    weights: Annotated[
        str,
        typer.Option(
            help="NWEIGHT (the frames' NSG weight), equal, noise (1/sigma^2 per channel: NOISExx cards, else "
            "measured on the middle rows), or the name of another header keyword holding a weight."
        ),
    ] = "NWEIGHT",
    rejection: Annotated[
        RejectionMethod,
        typer.Option(
            help="Pixel rejection; auto goes by the frames with data at each pixel: noise clipping (against the "
            "sky's noise and a share of each pixel's peak, so stars keep their light) below 8 frames, then NSG's "
            "rule: sigma clipping to 10, winsorized sigma clipping to 19, generalized ESD from 20 (none for 1-2 "
            "frames)."
        ),
    ] = RejectionMethod.auto,
    low: Annotated[
        Optional[float],
        typer.Option(
            help="Low threshold of the chosen --rejection: a fraction of the median for percentile, sigmas for "
            "sigma, winsorized, linear and noise. [default: 0.2, 3.5, 3.5, 5, 4]"
        ),
    ] = None,
    high: Annotated[
        Optional[float],
        typer.Option(help="High threshold of the chosen --rejection (as --low). [default: 0.1, 2.5, 2.2, 4, 3]"),
    ] = None,
    clip_low: Annotated[bool, typer.Option("--clip-low/--no-clip-low", help="Reject low samples at all.")] = True,
    clip_high: Annotated[bool, typer.Option("--clip-high/--no-clip-high", help="Reject high samples at all.")] = True,
    winsorization_cutoff: Annotated[
        float,
        typer.Option(help="Winsorized clipping: samples beyond this many sigma start at the centre; 0 turns it off."),
    ] = 3.5,
    esd_alpha: Annotated[float, typer.Option(help="Generalized ESD: significance of the outlier test.")] = 0.05,
    esd_outliers: Annotated[
        float, typer.Option(help="Generalized ESD: largest share of a pixel's samples that may be outliers.")
    ] = 0.3,
    esd_low_relaxation: Annotated[
        float, typer.Option(help="Generalized ESD: low deviations are divided by this (1: symmetric).")
    ] = 1.0,
    signal_share: Annotated[
        float,
        typer.Option(
            help="Noise clipping: the share of each pixel's peak (its median over the frames above its row's at "
            "3 px) by which frames may differ there; 0 clips against the sky's noise alone."
        ),
    ] = 1.5,
    memory: Annotated[
        Optional[str],
        typer.Option(
            help="Memory budget of the whole process, e.g. 4G; the band height follows from it. "
            "[default: half the available memory, at most 8G]"
        ),
    ] = None,
    backend: BackendOption = BackendName.auto,
    maps: Annotated[
        Maps,
        typer.Option(
            help="Coverage and low/high rejection-count maps: hdus (extensions COVERAGE, REJLOW, REJHIGH of the "
            "master), files (<stem>_coverage.fits, _rejlow, _rejhigh) or none."
        ),
    ] = Maps.hdus,
    csv_path: Annotated[
        Optional[Path],
        typer.Option("--csv", help="Per-frame table. [default: <master stem>_stack.csv beside the master]"),
    ] = None,
    html_report: Annotated[
        bool,
        typer.Option(
            "--report/--no-report",
            help="Add a Stack section to report.html: the run's report of a stacked directory, else one "
            "beside the master.",
        ),
    ] = True,
    spool_dir: Annotated[
        Optional[Path],
        typer.Option(
            help="Where compressed FITS and XISF inputs are decompressed once (a frame's size each). "
            "[default: a temporary folder beside the master]"
        ),
    ] = None,
    threads: Annotated[
        Optional[int], typer.Option(help="CPU threads combining pixels. [default: the number of cores]")
    ] = None,
    stop_on_error: Annotated[bool, typer.Option(help="Stop at the first bad frame instead of leaving it out.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print only the summary and problems.")] = False,
    json_lines: Annotated[
        bool, typer.Option("--json", help="Print one JSON object per band and one for the stack, nothing else.")
    ] = False,
):
    """Integrate normalized frames into a master: weights, pixel rejection, no-data, streamed in bands."""
    from .backend import select_backend
    from .pixel_rejection import Rejection
    from .stacking import stack as run_stack

    backend = backend.value

    settings = Rejection(
        method=rejection.value,
        low=low,
        high=high,
        clip_low=clip_low,
        clip_high=clip_high,
        cutoff=winsorization_cutoff,
        esd_alpha=esd_alpha,
        esd_outliers=esd_outliers,
        esd_low_relaxation=esd_low_relaxation,
        signal_share=signal_share,
    )
    chosen = select_backend(backend)
    report_page = _stack_report_page(inputs, output) if html_report else False
    with StackDisplay(quiet=quiet, json_lines=json_lines) as shown:
        result = run_stack(
            inputs,
            output,
            weights=weights,
            rejection=settings,
            memory=memory,
            backend=chosen,
            maps=maps.value,
            csv_path=csv_path,
            report=report_page,
            spool_dir=spool_dir,
            stop_on_error=stop_on_error,
            threads=threads,
            progress=shown.band_done,
        )
    shown.finish(result)
    if result.skipped:
        raise typer.Exit(code=EXIT_FRAMES_FAILED)


def _stack_report_page(inputs: list[Path], output: Path) -> Path:
    """The run's report.html when one directory of nsg normalize is stacked, else the master's
    own page beside it (:func:`~nsg_gpu.stacking.stack_page_path`)."""
    from .stacking import stack_page_path

    if len(inputs) == 1 and inputs[0].is_dir() and (inputs[0] / "report.html").is_file():
        return inputs[0] / "report.html"
    return stack_page_path(output)


@app.command()
@_one_line_errors
def inspect(
    frames: Annotated[
        list[Path], typer.Argument(metavar="FRAMES", help="FITS or XISF frames to measure, or directories of them.")
    ],
    json_output: Annotated[bool, typer.Option("--json", metavar="", help="Print the table as a JSON list.")] = False,
    detection_sigma: Annotated[
        float, typer.Option(help=dataclasses.fields(Parameters)[0].metadata["help"])
    ] = Parameters.detection_sigma,
):
    """Measure FRAMES and rank them as --reference auto does (the first row is its choice).

    A directory stands for its FITS and XISF frames. Exits with 3 when a frame cannot be read.
    """
    from .io import expand_frames
    from .select import inspect_frames

    ranked = inspect_frames(expand_frames(frames), detection_sigma=detection_sigma)
    unreadable = any(s.error for s in ranked)
    if json_output:
        typer.echo(json.dumps([s.row() for s in ranked], indent=2, allow_nan=False, default=str))
        if unreadable:
            raise typer.Exit(code=EXIT_FRAMES_FAILED)
        return
    from rich.console import Console
    from rich.padding import Padding
    from rich.table import Table

    def number(value, fmt: str) -> str:
        return "" if value is None else format(value, fmt)

    # Off a terminal (a pipe, a file) rich would squeeze the table into 80 columns; COLUMNS,
    # where set, says the width.
    console = Console(highlight=False, width=None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 200)
    columns = (
        "#", "file", "date", "exp (s)", "filter", "alt / airmass", "median", "noise", "noise/s",
        "stars", "FWHM", "coverage", "gradient", "star SNR", "note",
    )  # fmt: skip
    rows = []
    for s in ranked:
        altitude = " / ".join(v for v in (number(s.altitude, ".1f"), number(s.airmass, ".3f")) if v)
        rows.append(
            (
                str(s.rank),
                s.path.name,
                s.date_obs or "",
                number(s.exposure, "g"),
                s.filter or "",
                altitude,
                number(s.median, ".4g"),
                number(s.noise or None, ".3g"),
                number(s.noise_per_second, ".3g"),
                "" if s.error else str(s.stars) if s.shared_stars is None else f"{s.stars} ({s.shared_stars} shared)",
                number(s.fwhm, ".2f"),
                "" if s.missing_area is None else f"{s.coverage:.1%} ({s.missing_area:.1%} missed)",
                number(s.gradient or None, ".1f"),
                number(s.star_snr or None, ".0f"),
                s.error or s.note,
            )
        )
    title = "Frames ranked as --reference auto ranks them"
    # The table where every cell fits whole on one line, else each frame as its name, then its
    # figures (rich would crop the table, or cut or fold every cell).
    needed = sum(max([len(h), *(len(r[k]) for r in rows)]) for k, h in enumerate(columns)) + 3 * len(columns) + 1
    if console.width < needed:
        console.print(title, highlight=False)
        for row in rows:
            console.print(f"{row[0]}. {row[1]}: {row[-1]}", highlight=False)
            figures = ", ".join(f"{heading} {value}" for heading, value in zip(columns[2:-1], row[2:-1]) if value)
            console.print(Padding(figures, (0, 0, 0, 3)), highlight=False)
    else:
        table = Table(title=title, title_justify="left")
        for heading in columns:
            justify = "left" if heading in ("file", "date", "filter", "note") else "right"
            table.add_column(heading, justify=justify, overflow="fold")  # a cell folds, never cut short
        for row in rows:
            table.add_row(*row)
        console.print(table)
    if ranked and ranked[0].candidate:
        console.print(f"--reference auto would choose {ranked[0].path.name}", highlight=False)
    else:
        console.print("no frame is a candidate reference", highlight=False)
    if unreadable:
        raise typer.Exit(code=EXIT_FRAMES_FAILED)


@app.command()
@_one_line_errors
def synth(
    directory: Annotated[Path, typer.Argument(metavar="DIR", help="Where to write the frames and truth.json.")],
    scenario: Annotated[
        str,
        typer.Option(
            help=f"Named settings: {', '.join(SCENARIOS)} (nsg_gpu.synthetic.SCENARIOS); the options below "
            "override them."
        ),
    ] = "default",
    frames: Annotated[
        int, typer.Option("--frames", "-n", help="Number of frames; the first is the natural reference.")
    ] = 5,
    width: Annotated[Optional[int], typer.Option(help="Frame width (px); default 2000 or the scenario's.")] = None,
    height: Annotated[Optional[int], typer.Option(help="Frame height (px); default 1400 or the scenario's.")] = None,
    colour: Annotated[
        Optional[bool],
        typer.Option("--colour/--mono", metavar="", help="Three-channel colour frames; default the scenario's."),
    ] = None,
    stars: Annotated[Optional[int], typer.Option(help="Stars in the field; default 3500 or the scenario's.")] = None,
    seed: Annotated[int, typer.Option(help="Random seed; the same seed gives the same frames.")] = 1,
    rotation: Annotated[
        Optional[float],
        typer.Option(
            help="Registered targets also seen turned about the centre by up to this many degrees "
            "(the scenarios that register their targets: all but default)."
        ),
    ] = None,
    elongation: Annotated[
        Optional[float],
        typer.Option(
            help="Targets' stars drawn out along one direction (a tracking error, wind) by up to this "
            "ellipticity, 1 - minor/major axis; the reference's stay round."
        ),
    ] = None,
    warm_pixels: Annotated[
        Optional[float],
        typer.Option(
            help="This share of the sensor's pixels warm, 5-30 times the sky's noise above their light, "
            "the same pixels in every frame (registration moves them with the frame); e.g. 3e-4."
        ),
    ] = None,
    upscale: Annotated[
        int,
        typer.Option(
            min=1,
            max=4,
            help="Write every frame, the reference too, as a registration that upscales by this factor "
            "writes it (Siril's x2, a drizzle's grid): zoomed by a cubic spline; truth.json's noises "
            "and shifts stay the capture's.",
        ),
    ] = 1,
):
    """Write synthetic registered frames with known transmission, gradient, noise and
    registration offsets (see truth.json)."""
    from .synthetic import SyntheticSpec, write_synthetic_set

    chosen = {
        "width": width,
        "height": height,
        "colour": colour,
        "n_stars": stars,
        "rotation": rotation,
        "max_ellipticity": elongation,
        "warm_pixel_fraction": warm_pixels,
    }
    spec = SyntheticSpec.from_scenario(
        scenario, n_frames=frames, seed=seed, **{k: v for k, v in chosen.items() if v is not None}
    )
    paths = write_synthetic_set(directory, spec, upscale=upscale)
    typer.echo(f"{len(paths)} frames written to {directory} (truth in {directory / 'truth.json'})")


@app.command()
@_one_line_errors
def info(
    backend: Annotated[
        BackendName, typer.Option(case_sensitive=False, help="Backend to resolve: auto, numpy or cupy.")
    ] = BackendName.auto,
):
    """Print the backend that would run and why, the GPU and its memory, and library versions."""
    from .backend import describe_backend

    backend = backend.value

    lines = describe_backend(backend)
    typer.echo(f"nsg-gpu {__version__}")
    for line in lines:
        typer.echo(line)


def main() -> None:
    """Entry point of ``nsg``."""
    app()
